#!/usr/bin/env bash
# Benchmark sluice side by side with HAProxy (with and without splice),
# nginx stream and a direct connection. See benches/README.md.
#
#   CAP=30 benches/run.sh        capped run: each proxy limited to 30% of
#                                CPU 0 by a cgroup, the load on CPU 1, five
#                                alternating rounds (~15 min)
#   benches/run.sh               uncapped run (~5 min)
#   QUICK=1 benches/run.sh       smoke run (~1 min)
#
# Knobs (environment): DURATION (s per wrk run), IPERF_TIME (s per iperf3
# run), WARMUP (s of wrk before the keep-alive run, 0 = none), CONNS (wrk
# connections), IDLE_CONNS, PROXY_CPU, LOAD_CPU, TARGETS (space-separated
# subset of: sluice haproxy haproxy_splice nginx direct uring epoll_min; the
# last two, the io_uring probe's two engines, only when named), PROBE_ARGS
# (extra uring-probe arguments, such as --buf-size 65536), KEEP_WORK=1
# keeps the temp dir with every log, RESULTS_DIR (benches/results) where
# the tables go.
#
# Exit status: 0 when the table was written (failed cells are explained in
# its notes); 1 on a harness error (build failed, a backend would not start,
# sluice could not be started at all).

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
RESULTS=${RESULTS_DIR:-"$BENCH/results"}
SLUICE="$ROOT/target/release/sluice"
PROBE="$BENCH/uring/target/release/uring-probe"
RATE_GEN="$ROOT/target/release/examples/rate"

QUICK=${QUICK:-0}
# CAP: percent of one CPU each proxy may use (cgroup CPU quota), so that
# the proxy, not wrk and the backends, sets the pace; empty: no cap.
CAP=${CAP:-}
# The quota's period: the cap holds over each period, so a throttled
# proxy can wait up to the rest of one (shorter is smoother, costs more).
CAP_PERIOD_US=${CAP_PERIOD_US:-100000}
if [[ -n $CAP ]]; then
  [[ $CAP =~ ^[0-9]+$ ]] && ((CAP >= 1 && CAP <= 100)) || {
    echo "benches/run.sh: CAP=$CAP is not a percent of one CPU (1 to 100)" >&2
    exit 1
  }
  # The same cap, pinning and single worker for every proxy; more rounds,
  # since a capped run's noise is its own.
  [[ $QUICK == 1 ]] || ROUNDS=${ROUNDS:-5}
  PROXY_CPU=${PROXY_CPU:-0}
  LOAD_CPU=${LOAD_CPU:-1}
  SLUICE_CONFIG_EXTRA=${SLUICE_CONFIG_EXTRA:-workers = 1}
fi
# Top-level sluice config lines, such as 'runtime = "multi-thread"'.
SLUICE_CONFIG_EXTRA=${SLUICE_CONFIG_EXTRA:-}
if [[ $QUICK == 1 ]]; then
  ROUNDS=${ROUNDS:-1}
  DURATION=${DURATION:-2}
  IPERF_TIME=${IPERF_TIME:-2}
  IDLE_CONNS=${IDLE_CONNS:-1000}
  WARMUP=${WARMUP:-1}
else
  # Load runs are repeated in rounds, every target once per round, and the
  # median is reported: this machine's noise is larger than the gaps.
  ROUNDS=${ROUNDS:-3}
  DURATION=${DURATION:-8}
  IPERF_TIME=${IPERF_TIME:-10}
  IDLE_CONNS=${IDLE_CONNS:-10000}
  WARMUP=${WARMUP:-1}
fi
CONNS=${CONNS:-50}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
TARGETS=${TARGETS:-"sluice haproxy haproxy_splice nginx direct"}
NGINX_STREAM_MODULE=${NGINX_STREAM_MODULE:-/usr/lib/nginx/modules/ngx_stream_module.so}

PROBE_ARGS=${PROBE_ARGS:-}
declare -A LABEL=(
  [sluice]="sluice" [haproxy]="HAProxy" [haproxy_splice]="HAProxy splice"
  [nginx]="nginx stream" [direct]="direct"
  [uring]="io_uring probe" [epoll_min]="epoll probe"
)
# uring and epoll_min: benches/uring's minimal proxy on its two engines,
# to measure io_uring's ceiling; run only when TARGETS names them.
ALL_TARGETS=(sluice haproxy haproxy_splice nginx direct uring epoll_min)

declare -A R=()      # R[target:metric] = value, or a word such as skipped
NOTES=()
STATUS=0

log() { printf '[bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
note() { NOTES+=("$*"); log "note: $*"; }
die() { log "error: $*"; exit 1; }
trap 'log "error: harness failed at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- processes

WORK=$(mktemp -d /tmp/sluice-bench.XXXXXX)

# shellcheck source=benches/procs.sh
. "$BENCH/procs.sh"

# wait_listen PORT PID WHAT [SECONDS]: polls until something listens on PORT.
wait_listen() {
  local port=$1 pid=$2 what=$3 deadline=$((SECONDS + ${4:-15}))
  while :; do
    if [[ -n $(ss -Hltn "sport = :$port" 2>/dev/null) ]]; then
      return 0
    fi
    if ! alive "$pid"; then
      log "$what exited before listening on 127.0.0.1:$port"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$what is not listening on 127.0.0.1:$port after ${4:-15} s"
      return 1
    fi
    sleep 0.05
  done
}

cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{print $12 + $13}'; }
rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
CLK_TCK=$(getconf CLK_TCK)

have() { command -v "$1" >/dev/null 2>&1; }

# ---------------------------------------------------------------- CPU cap
# A cgroup with a CPU quota of CAP% of one CPU: cgroup v2's cpu.max where
# the unified hierarchy has the cpu controller, else v1's cfs quota.

CGROUP=""
cap_setup() {
  local v2=/sys/fs/cgroup
  if [[ -f $v2/cgroup.controllers ]] && grep -qw cpu "$v2/cgroup.controllers"; then
    CGROUP=$v2/sluice-bench.$$
    echo "+cpu" >"$v2/cgroup.subtree_control" 2>/dev/null || true
    mkdir "$CGROUP" || return 1
    echo "$((CAP * CAP_PERIOD_US / 100)) $CAP_PERIOD_US" >"$CGROUP/cpu.max" || return 1
  elif [[ -d /sys/fs/cgroup/cpu ]]; then
    CGROUP=/sys/fs/cgroup/cpu/sluice-bench.$$
    mkdir "$CGROUP" || return 1
    echo "$CAP_PERIOD_US" >"$CGROUP/cpu.cfs_period_us" || return 1
    echo $((CAP * CAP_PERIOD_US / 100)) >"$CGROUP/cpu.cfs_quota_us" || return 1
  else
    return 1
  fi
}

# cap_pid PID: moves a process (every thread, and its later children)
# under the quota.
cap_pid() {
  [[ -n $CGROUP && -n $1 ]] || return 0
  echo "$1" >"$CGROUP/cgroup.procs"
}

# The throttled periods so far, to say whether the cap bit.
cap_throttled() {
  [[ -n $CGROUP ]] || { echo 0; return; }
  awk '$1 == "nr_throttled" {print $2}' "$CGROUP/cpu.stat" 2>/dev/null || echo 0
}

# Called by procs.sh's cleanup once every process is stopped.
on_cleanup() { cap_teardown; }

cap_teardown() {
  [[ -n $CGROUP && -d $CGROUP ]] || return 0
  # Whatever is left goes back to the root before the group goes.
  local root=${CGROUP%/*} p
  while read -r p; do echo "$p" >"$root/cgroup.procs" 2>/dev/null || true; done <"$CGROUP/cgroup.procs"
  rmdir "$CGROUP" 2>/dev/null || true
}

# ---------------------------------------------------------------- preflight

for t in python3 taskset ss cargo git; do
  have "$t" || die "$t is required by the harness itself"
done
NCPU=$(nproc --all)
if ((NCPU < 2)); then
  note "only $NCPU CPU: proxy and load share CPU 0, numbers are not comparable to a 2-core run"
  PROXY_CPU=0
  LOAD_CPU=0
fi

# Idle connections: every proxy holds two descriptors per connection.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
IDLE_N=$IDLE_CONNS
if ((2 * IDLE_N + 200 > NOFILE)); then
  IDLE_N=$(((NOFILE - 200) / 2 / 100 * 100))
  note "idle test uses $IDLE_N connections, not $IDLE_CONNS: the open-files limit is $NOFILE and cannot be raised here (a proxy needs two descriptors per connection; raise it with ulimit -n / LimitNOFILE, which needs CAP_SYS_RESOURCE above the hard limit)"
fi

HAVE_WRK=1 HAVE_IPERF=1 HAVE_NGINX=1 HAVE_STREAM=1 HAVE_HAPROXY=1
have wrk || { HAVE_WRK=0; note "wrk not installed: apt-get install wrk (HTTP rows skipped)"; }
have iperf3 || { HAVE_IPERF=0; note "iperf3 not installed: apt-get install iperf3 (bulk rows skipped)"; }
have nginx || { HAVE_NGINX=0; HAVE_STREAM=0; note "nginx not installed: apt-get install nginx libnginx-mod-stream (no HTTP backends: HTTP rows skipped; nginx stream skipped)"; }
if ((HAVE_NGINX)) && [[ ! -f $NGINX_STREAM_MODULE ]]; then
  HAVE_STREAM=0
  note "nginx stream module not installed ($NGINX_STREAM_MODULE): apt-get install libnginx-mod-stream"
fi
have haproxy || { HAVE_HAPROXY=0; note "haproxy not installed: apt-get install haproxy"; }

if [[ -n $CAP ]]; then
  cap_setup || die "CAP=$CAP needs a writable cgroup CPU controller (cgroup v2 cpu.max or v1 /sys/fs/cgroup/cpu), as root"
  log "each proxy capped at $CAP% of CPU $PROXY_CPU ($CGROUP)"
fi

# ---------------------------------------------------------------- build

log "building sluice and the constant-rate load generator (cargo build --release)"
if ! (cd "$ROOT" && cargo build --release && cargo build --release --example rate) >"$WORK/build.log" 2>&1; then
  tail -n 30 "$WORK/build.log" >&2
  die "cargo build --release failed"
fi
[[ -x $SLUICE ]] || die "$SLUICE missing after the build"
if [[ " $TARGETS " == *" uring "* || " $TARGETS " == *" epoll_min "* ]]; then
  log "building uring-probe (cargo build --release --manifest-path benches/uring/Cargo.toml)"
  if ! cargo build --release --manifest-path "$BENCH/uring/Cargo.toml" >"$WORK/build-probe.log" 2>&1; then
    tail -n 30 "$WORK/build-probe.log" >&2
    die "building uring-probe failed"
  fi
fi

# ---------------------------------------------------------------- machine

CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
MEM_GIB=$(awk '/^MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo)
KERNEL=$(uname -r)
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
DATE_UTC=$(date -u +%Y-%m-%dT%H:%M:%SZ)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
if [[ -n $(git -C "$ROOT" status --porcelain -- src Cargo.toml Cargo.lock 2>/dev/null) ]]; then
  COMMIT="$COMMIT + uncommitted changes in src/"
fi
ver() { "$@" 2>&1 | head -n 1 || true; }
V_HAPROXY=$( ((HAVE_HAPROXY)) && ver haproxy -v | awk '{print $3}' || echo "not installed")
V_NGINX=$( ((HAVE_NGINX)) && ver nginx -v | sed 's|.*nginx/||' || echo "not installed")
V_WRK=$( ((HAVE_WRK)) && ver wrk -v | awk '{print $2}' || echo "not installed")
V_IPERF=$( ((HAVE_IPERF)) && ver iperf3 --version | awk '{print $2}' || echo "not installed")

# ---------------------------------------------------------------- backends
# Everything but the proxy runs on LOAD_CPU.

BE_WEB1="" BE_WEB2="" BE_IPERF="" BE_HOLD=""

start_nginx_backend() { # name -> sets PORT
  local name=$1 dir="$WORK/$1"
  start_nginx_http "$LOAD_CPU" "$dir" "$name"
  wait_listen "$PORT" "$PID" "nginx backend $name" || {
    cat "$dir/stderr.log" "$dir/error.log" >&2 2>/dev/null || true
    die "nginx backend $name did not start"
  }
}

if ((HAVE_NGINX)); then
  start_nginx_backend web1
  BE_WEB1=$PORT
  start_nginx_backend web2
  BE_WEB2=$PORT
fi
if ((HAVE_IPERF)); then
  BE_IPERF=$(free_port)
  start "$LOAD_CPU" "$WORK/iperf3-server.log" iperf3 -s -B 127.0.0.1 -p "$BE_IPERF"
  wait_listen "$BE_IPERF" "$PID" "iperf3 server" || die "iperf3 server did not start"
fi
BE_HOLD=$(free_port)
HOLD_STATUS="$WORK/hold.status"
start "$LOAD_CPU" "$WORK/hold.log" python3 "$BENCH/idle.py" hold --port "$BE_HOLD" \
  --status "$HOLD_STATUS" --max-seconds 1800
wait_listen "$BE_HOLD" "$PID" "idle-connection holder" || die "idle-connection holder did not start"
log "backends: nginx web1=${BE_WEB1:--} web2=${BE_WEB2:--} iperf3=${BE_IPERF:--} holder=$BE_HOLD"

# ---------------------------------------------------------------- proxies
# start_proxy TARGET sets PROXY_PID (the process that moves the bytes) and
# P_WEB, P_BULK, P_IDLE, or returns 1 with a note.

PROXY_PID="" PROXY_MAIN="" PROXY_LOG=""
P_WEB="" P_BULK="" P_IDLE=""
RUN=0

proxy_ports() {
  P_WEB=$(free_port)
  P_BULK=$(free_port)
  P_IDLE=$(free_port)
}

wait_proxy() { # what
  local p
  for p in "$P_WEB" "$P_BULK" "$P_IDLE"; do
    wait_listen "$p" "$PROXY_MAIN" "$1" || return 1
  done
}

sluice_config() { # file
  local f=$1 hc='health_check = "none"'
  cat >"$f" <<EOF
$SLUICE_CONFIG_EXTRA
# What this machine's open-file limit allows (two descriptors each).
max_connections = $(((NOFILE - 200) / 2))
[admin]
listen = "127.0.0.1:$(free_port)"

[[service]]
name = "web"
listen = "127.0.0.1:$P_WEB"
backends = ["web1", "web2"]

[[service]]
name = "bulk"
listen = "127.0.0.1:$P_BULK"
backends = ["iperf"]

[[service]]
name = "idle"
listen = "127.0.0.1:$P_IDLE"
backends = ["hold"]

[[backend]]
name = "web1"
address = "127.0.0.1:${BE_WEB1:-9}"
$hc

[[backend]]
name = "web2"
address = "127.0.0.1:${BE_WEB2:-9}"
$hc

[[backend]]
name = "iperf"
address = "127.0.0.1:${BE_IPERF:-9}"
$hc

[[backend]]
name = "hold"
address = "127.0.0.1:$BE_HOLD"
$hc
EOF
}

start_sluice() {
  local dir="$WORK/sluice.$RUN" f
  mkdir -p "$dir"
  f="$dir/sluice.toml"
  proxy_ports
  sluice_config "$f"
  if ! "$SLUICE" check --config "$f" >"$dir/check.log" 2>&1; then
    note "sluice check rejected the benchmark config: $(tail -n 1 "$dir/check.log")"
    return 1
  fi
  PROXY_LOG="$dir/stderr.log"
  start "$PROXY_CPU" "$PROXY_LOG" env RUST_LOG=warn "$SLUICE" run --config "$f"
  PROXY_MAIN=$PID PROXY_PID=$PID
  wait_proxy sluice
}

start_haproxy() { # splice 0|1
  local dir="$WORK/haproxy.$RUN" f splice="" maxconn maxpipes
  mkdir -p "$dir"
  f="$dir/haproxy.cfg"
  proxy_ports
  [[ $1 == 1 ]] && splice=$'    option splice-request\n    option splice-response'
  # HAProxy reserves 2 descriptors per connection and 2 per pipe up front,
  # and refuses to start if the open-files limit cannot cover them.
  maxconn=$((IDLE_N + 20))
  maxpipes=$(((NOFILE - 2 * maxconn - 60) / 2))
  ((maxpipes > 1024)) && maxpipes=1024
  ((maxpipes < 16)) && maxpipes=16
  cat >"$f" <<EOF
global
    nbthread 1
    maxconn $maxconn
    maxpipes $maxpipes

defaults
    mode tcp
    maxconn $maxconn
    timeout connect 5s
    timeout client 10m
    timeout server 10m
$splice

frontend web
    bind 127.0.0.1:$P_WEB
    default_backend web
backend web
    balance roundrobin
    server web1 127.0.0.1:${BE_WEB1:-9}
    server web2 127.0.0.1:${BE_WEB2:-9}

frontend bulk
    bind 127.0.0.1:$P_BULK
    default_backend bulk
backend bulk
    server iperf 127.0.0.1:${BE_IPERF:-9}

frontend idle
    bind 127.0.0.1:$P_IDLE
    default_backend idle
backend idle
    server hold 127.0.0.1:$BE_HOLD
EOF
  if ! haproxy -c -q -f "$f" >"$dir/check.log" 2>&1; then
    note "haproxy -c rejected the benchmark config: $(head -n 3 "$dir/check.log" | tr '\n' ' ')"
    return 1
  fi
  PROXY_LOG="$dir/stderr.log"
  start "$PROXY_CPU" "$PROXY_LOG" haproxy -db -f "$f"
  PROXY_MAIN=$PID PROXY_PID=$PID
  wait_proxy haproxy
}

start_nginx_stream() {
  local dir="$WORK/nginx-stream.$RUN" wc i
  mkdir -p "$dir"
  proxy_ports
  wc=$((2 * IDLE_N + 512))
  ((wc > NOFILE)) && wc=$NOFILE
  cat >"$dir/nginx.conf" <<EOF
load_module $NGINX_STREAM_MODULE;
daemon off;
master_process on;
worker_processes 1;
worker_rlimit_nofile $NOFILE;
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections $wc; }
stream {
    upstream web {
        server 127.0.0.1:${BE_WEB1:-9};
        server 127.0.0.1:${BE_WEB2:-9};
    }
    server { listen 127.0.0.1:$P_WEB; proxy_pass web; }
    server { listen 127.0.0.1:$P_BULK; proxy_pass 127.0.0.1:${BE_IPERF:-9}; }
    server { listen 127.0.0.1:$P_IDLE; proxy_pass 127.0.0.1:$BE_HOLD; proxy_timeout 10m; }
}
EOF
  PROXY_LOG="$dir/error.log"
  start "$PROXY_CPU" "$dir/stderr.log" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
  PROXY_MAIN=$PID
  wait_proxy "nginx stream" || return 1
  # The worker moves the bytes; the master only supervises it.
  PROXY_PID=""
  for ((i = 0; i < 100; i++)); do
    PROXY_PID=$(pgrep -P "$PROXY_MAIN" | head -n 1 || true)
    [[ -n $PROXY_PID ]] && break
    sleep 0.05
  done
  [[ -n $PROXY_PID ]] || { log "nginx stream worker did not appear"; return 1; }
}

# start_probe TARGET ENGINE: uring-probe --mode ENGINE, one process and one
# thread for all three listeners, so the cap and the pinning hold all of it.
start_probe() {
  local dir="$WORK/probe-$1.$RUN"
  mkdir -p "$dir"
  proxy_ports
  PROXY_LOG="$dir/stderr.log"
  # shellcheck disable=SC2086 # PROBE_ARGS is a list of arguments
  start "$PROXY_CPU" "$PROXY_LOG" "$PROBE" --mode "$2" $PROBE_ARGS \
    --listen "127.0.0.1:$P_WEB" --backend "127.0.0.1:${BE_WEB1:-9}" --backend "127.0.0.1:${BE_WEB2:-9}" \
    --listen "127.0.0.1:$P_BULK" --backend "127.0.0.1:${BE_IPERF:-9}" \
    --listen "127.0.0.1:$P_IDLE" --backend "127.0.0.1:$BE_HOLD"
  PROXY_MAIN=$PID PROXY_PID=$PID
  wait_proxy "${LABEL[$1]}"
}

start_target() { # target
  RUN=$((RUN + 1))
  PROXY_PID="" PROXY_MAIN="" PROXY_LOG=""
  case $1 in
    sluice) start_sluice ;;
    haproxy) start_haproxy 0 ;;
    haproxy_splice) start_haproxy 1 ;;
    nginx) start_nginx_stream ;;
    uring) start_probe uring uring ;;
    epoll_min) start_probe epoll_min epoll ;;
    direct)
      P_WEB=$BE_WEB1 P_BULK=$BE_IPERF P_IDLE=""
      return 0
      ;;
  esac || return 1
  # Under the cap from here on: the process that moves the bytes, and
  # its supervisor where there is one.
  cap_pid "$PROXY_MAIN" && cap_pid "$PROXY_PID"
}

stop_target() {
  [[ -n $PROXY_MAIN ]] && stop_pid "$PROXY_MAIN"
  PROXY_PID="" PROXY_MAIN=""
}

# proxy_ok TARGET: true while the proxy still runs; notes a crash once.
proxy_ok() {
  [[ -z $PROXY_MAIN ]] && return 0
  alive "$PROXY_PID" && alive "$PROXY_MAIN" && return 0
  note "${LABEL[$1]} exited during the run; last log lines: $(tail -n 3 "$PROXY_LOG" 2>/dev/null | tr '\n' ' ')"
  return 1
}

# ---------------------------------------------------------------- measurements

to_ms() { # wrk time such as 850.00us, 1.23ms, 1.02s, 1.00m
  awk -v t="$1" 'BEGIN {
    if (t ~ /us$/) { sub(/us$/, "", t); printf "%.3f", t / 1000 }
    else if (t ~ /ms$/) { sub(/ms$/, "", t); printf "%.3f", t }
    else if (t ~ /m$/) { sub(/m$/, "", t); printf "%.3f", t * 60000 }
    else if (t ~ /s$/) { sub(/s$/, "", t); printf "%.3f", t * 1000 }
    else print "?" }'
}

# Busy and total ticks of one CPU, from /proc/stat: "busy total".
cpu_busy() {
  awk -v c="cpu$1" '$1 == c { b = $2 + $3 + $4 + $7 + $8; print b, b + $5 + $6 }' /proc/stat
}

# run_wrk TARGET NAME [wrk args...]: sets W_RPS W_P50 W_P99 W_ERR, and
# W_US (proxy CPU-µs per request), W_PBUSY and W_LBUSY (% busy of the
# proxy's and the load's CPU), or returns 1
run_wrk() {
  local target=$1 name=$2 out c0="" c1="" l0 l1 n
  shift 2
  out="$WORK/wrk.$target.$name.round$ROUND.txt"
  [[ -n $PROXY_PID ]] && c0=$(cpu_ticks "$PROXY_PID")
  l0=$(cpu_busy "$LOAD_CPU")
  if ! timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" \
    wrk -t1 -c"$CONNS" -d"${DURATION}s" --latency "$@" "http://127.0.0.1:$P_WEB/" >"$out" 2>&1; then
    note "${LABEL[$target]}: wrk ($name) failed: $(tail -n 2 "$out" | tr '\n' ' ')"
    return 1
  fi
  l1=$(cpu_busy "$LOAD_CPU")
  [[ -n $PROXY_PID ]] && c1=$(cpu_ticks "$PROXY_PID")
  n=$(awk '/ requests in / {print $1}' "$out")
  W_LBUSY=$(awk -v a="$l0" -v b="$l1" 'BEGIN { split(a, x, " "); split(b, y, " ");
    if (y[2] > x[2]) printf "%.0f", 100 * (y[1] - x[1]) / (y[2] - x[2]); else print "error" }')
  if [[ -n $c0 && -n $c1 && -n $n ]]; then
    W_US=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v n="$n" \
      'BEGIN { if (n > 0) printf "%.1f", 1e6 * d / hz / n; else print "error" }')
    W_PBUSY=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v s="$DURATION" \
      'BEGIN { printf "%.0f", 100 * d / hz / s }')
  else
    W_US=n/a W_PBUSY=n/a
  fi
  W_RPS=$(awk '/^Requests\/sec:/ {printf "%.0f", $2}' "$out")
  W_P50=$(to_ms "$(awk '$1 == "50%" {print $2}' "$out")")
  W_P99=$(to_ms "$(awk '$1 == "99%" {print $2}' "$out")")
  W_ERR=$(awk '/Socket errors:/ {gsub(",", ""); s += $4 + $6 + $8 + $10}
               /Non-2xx or 3xx/ {s += $NF} END {print s + 0}' "$out")
  if [[ -z $W_RPS ]]; then
    note "${LABEL[$target]}: wrk ($name) printed no result: $(tail -n 2 "$out" | tr '\n' ' ')"
    return 1
  fi
  if ((W_ERR > 0)); then
    note "${LABEL[$target]}: wrk ($name) saw $W_ERR errors: $(grep -E 'Socket errors|Non-2xx' "$out" | tr '\n' ' ')"
  fi
}

bench_http() { # target
  local t=$1
  if ((!HAVE_WRK || !HAVE_NGINX)); then
    for m in rps p50 p99 cps errs usreq uscon pbusy lbusy pbusyc lbusyc; do R[$t:$m]=skipped; done
    return 0
  fi
  if ((WARMUP > 0)); then
    timeout $((WARMUP + 20)) taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"${WARMUP}s" \
      "http://127.0.0.1:$P_WEB/" >/dev/null 2>&1 || true
  fi
  log "${LABEL[$t]}: keep-alive HTTP, wrk ${DURATION}s"
  local e1=error e2=error
  if proxy_ok "$t" && run_wrk "$t" keepalive; then
    R[$t:rps]=$W_RPS R[$t:p50]=$W_P50 R[$t:p99]=$W_P99
    R[$t:usreq]=$W_US R[$t:pbusy]=$W_PBUSY R[$t:lbusy]=$W_LBUSY
    e1=$W_ERR
  else
    R[$t:rps]=error R[$t:p50]=error R[$t:p99]=error
    R[$t:usreq]=error R[$t:pbusy]=error R[$t:lbusy]=error
  fi
  log "${LABEL[$t]}: new connection per request, wrk ${DURATION}s"
  if proxy_ok "$t" && run_wrk "$t" close -H 'Connection: close'; then
    R[$t:cps]=$W_RPS
    R[$t:uscon]=$W_US R[$t:pbusyc]=$W_PBUSY R[$t:lbusyc]=$W_LBUSY
    e2=$W_ERR
  else
    R[$t:cps]=error R[$t:uscon]=error R[$t:pbusyc]=error R[$t:lbusyc]=error
  fi
  R[$t:errs]="$e1 / $e2"
}

bench_bulk_one() { # target streams
  local t=$1 n=$2 out c0 c1 res
  out="$WORK/iperf.$t.P$n.round$ROUND.json"
  R[$t:gbps$n]=error R[$t:cpugb$n]=error
  proxy_ok "$t" || return 0
  log "${LABEL[$t]}: bulk, iperf3 -P $n ${IPERF_TIME}s"
  [[ -n $PROXY_PID ]] && c0=$(cpu_ticks "$PROXY_PID")
  if ! timeout $((IPERF_TIME + 30)) taskset -c "$LOAD_CPU" \
    iperf3 -c 127.0.0.1 -p "$P_BULK" -t "$IPERF_TIME" -P "$n" -J --connect-timeout 3000 >"$out" 2>&1; then
    note "${LABEL[$t]}: iperf3 -P $n failed: $(python3 - "$out" <<'EOF'
import json, sys
try:
    print(json.load(open(sys.argv[1])).get("error", "no error message"))
except Exception:
    print(open(sys.argv[1]).read()[-200:].replace("\n", " "))
EOF
)"
    return 0
  fi
  [[ -n $PROXY_PID ]] && c1=$(cpu_ticks "$PROXY_PID")
  res=$(python3 - "$out" <<'EOF'
import json, sys
e = json.load(open(sys.argv[1]))["end"]["sum_received"]
print(f'{e["bits_per_second"] / 1e9:.2f} {e["bytes"]}')
EOF
) || {
    note "${LABEL[$t]}: iperf3 -P $n output unreadable"
    return 0
  }
  R[$t:gbps$n]=${res% *}
  if [[ -n $PROXY_PID ]]; then
    R[$t:cpugb$n]=$(awk -v d=$((c1 - c0)) -v hz="$CLK_TCK" -v b="${res#* }" \
      'BEGIN { if (b > 0) printf "%.3f", (d / hz) / (b / 1e9); else print "error" }')
  else
    R[$t:cpugb$n]=n/a
  fi
}

bench_bulk() {
  local t=$1
  if ((!HAVE_IPERF)); then
    for m in gbps1 gbps4 cpugb1 cpugb4; do R[$t:$m]=skipped; done
    return 0
  fi
  bench_bulk_one "$t" 1
  bench_bulk_one "$t" 4
}

status_field() { # file key
  sed -n "s/.*\b$2=\([0-9]*\).*/\1/p" "$1" 2>/dev/null | head -n 1
}

# wait_holder_live COUNT SECONDS: polls until the holder has COUNT live
# connections; gives up after SECONDS, or after 10 s without any change.
wait_holder_live() {
  local want=$1 deadline=$((SECONDS + $2)) live last="" since=$SECONDS
  while :; do
    live=$(status_field "$HOLD_STATUS" live)
    [[ ${live:-0} == "$want" ]] && return 0
    if [[ $live != "$last" ]]; then
      last=$live since=$SECONDS
    fi
    ((SECONDS >= deadline || SECONDS - since >= 10)) && return 1
    sleep 0.05
  done
}

# Host-wide count of connections dropped because a listen queue was full.
listen_overflows() {
  awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 }
                    else print $c + 0 }' /proc/net/netstat
}

bench_idle() { # target; the proxy was started fresh for this test
  local t=$1 before after prev cur i client status live n
  R[$t:rss0]=error R[$t:idle]=error
  proxy_ok "$t" || return 0
  if ! wait_holder_live 0 30; then
    note "${LABEL[$t]}: holder still has $(status_field "$HOLD_STATUS" live) connections from the previous run"
  fi
  before=$(rss_kb "$PROXY_PID")
  R[$t:rss0]=$(awk -v k="$before" 'BEGIN {printf "%.1f", k / 1024}')
  log "${LABEL[$t]}: $IDLE_N idle connections"
  status="$WORK/open.$t.status"
  start "$LOAD_CPU" "$WORK/open.$t.log" python3 "$BENCH/idle.py" open --port "$P_IDLE" \
    --count "$IDLE_N" --status "$status" --max-seconds 300
  client=$PID
  n=$IDLE_N
  if ! wait_holder_live "$IDLE_N" $((30 + IDLE_N / 200)); then
    n=$(status_field "$HOLD_STATUS" live)
    note "${LABEL[$t]}: only ${n:-0} of $IDLE_N idle connections reached the backend (client: $(cat "$status" 2>/dev/null); proxy log: $(tail -n 2 "$PROXY_LOG" | tr '\n' ' '))"
    if ((${n:-0} * 10 < IDLE_N * 9)); then
      stop_pid "$client"
      wait_holder_live 0 30 || true
      return 0
    fi
    note "${LABEL[$t]}: RSS per idle connection is over the $n that reached the backend"
  fi
  # Connections are up on both sides; let RSS settle (stable or 3 s).
  prev=$(rss_kb "$PROXY_PID")
  for ((i = 0; i < 15; i++)); do
    sleep 0.2
    cur=$(rss_kb "$PROXY_PID")
    [[ $cur == "$prev" ]] && break
    prev=$cur
  done
  after=$(rss_kb "$PROXY_PID")
  live=$(status_field "$status" open)
  if [[ $live != "$IDLE_N" ]]; then
    note "${LABEL[$t]}: the client holds $live of $IDLE_N connections ($(cat "$status"))"
  fi
  R[$t:idle]=$(awk -v a="$after" -v b="$before" -v n="$n" 'BEGIN {printf "%.1f", (a - b) / n}')
  stop_pid "$client"
  wait_holder_live 0 30 || true
}

# run_load TARGET: one round of the load runs (HTTP, bulk) on a fresh proxy.
run_load() {
  local t=$1 ovf0 th0
  case $t in
    haproxy | haproxy_splice) ((HAVE_HAPROXY)) || { mark "$t" "skipped"; return 0; } ;;
    nginx) ((HAVE_STREAM)) || { mark "$t" "skipped"; return 0; } ;;
  esac
  log "=== ${LABEL[$t]}, round $ROUND of $ROUNDS"
  ovf0=$(listen_overflows)
  th0=$(cap_throttled)
  if ! start_target "$t"; then
    note "${LABEL[$t]} did not start: $(tail -n 3 "$PROXY_LOG" 2>/dev/null | tr '\n' ' ')"
    stop_target
    mark "$t" "failed"
    if [[ $t == sluice ]]; then STATUS=1; fi
    return 0
  fi
  bench_http "$t"
  bench_bulk "$t"
  proxy_ok "$t" || true
  stop_target
  OVF[$t]=$((${OVF[$t]:-0} + $(listen_overflows) - ovf0))
  THROTTLED[$t]=$((${THROTTLED[$t]:-0} + $(cap_throttled) - th0))
}

# run_latency TARGET RATE: latency at a fixed request rate on a fresh
# proxy (examples/rate.rs: requests go out on schedule and latency counts
# from when each was due, so a stall is not hidden by a slower load).
run_latency() {
  local t=$1 rate=$2 out
  R[$t:lp50]=skipped R[$t:lp99]=skipped R[$t:lp999]=skipped
  ((HAVE_NGINX)) || return 0
  [[ ${R[$t:rps]} == skipped || ${R[$t:rps]} == failed ]] && return 0
  if ! start_target "$t"; then
    stop_target
    R[$t:lp50]=failed R[$t:lp99]=failed R[$t:lp999]=failed
    return 0
  fi
  log "${LABEL[$t]}: fixed rate $rate requests/s, ${DURATION}s"
  out="$WORK/rate.$t.txt"
  if timeout $((DURATION + 30)) taskset -c "$LOAD_CPU" "$RATE_GEN" "127.0.0.1:$P_WEB" "$rate" "$DURATION" "$CONNS" >"$out" 2>&1; then
    R[$t:lp50]=$(sed -n 's/.* p50_ms=\([0-9.]*\).*/\1/p' "$out")
    R[$t:lp99]=$(sed -n 's/.* p99_ms=\([0-9.]*\).*/\1/p' "$out")
    R[$t:lp999]=$(sed -n 's/.* p999_ms=\([0-9.]*\).*/\1/p' "$out")
    local errs late
    errs=$(sed -n 's/.*errors=\([0-9]*\).*/\1/p' "$out")
    late=$(sed -n 's/.*late_p99_ms=\([0-9.]*\).*/\1/p' "$out")
    LATE+="${LABEL[$t]} ${late:-?} ms, "
    ((${errs:-0} > 0)) && note "${LABEL[$t]}: $errs errors at the fixed rate ($(cat "$out"))"
  else
    note "${LABEL[$t]}: the fixed-rate run failed: $(tail -n 2 "$out" | tr '\n' ' ')"
    R[$t:lp50]=error R[$t:lp99]=error R[$t:lp999]=error
  fi
  proxy_ok "$t" || true
  stop_target
}

# run_idle TARGET: memory on a fresh process, so load does not blur it.
run_idle() {
  local t=$1 ovf0
  if [[ $t == direct ]]; then
    R[$t:rss0]=n/a R[$t:idle]=n/a
    return 0
  fi
  [[ ${R[$t:rps]} == skipped ]] && return 0
  ovf0=$(listen_overflows)
  if start_target "$t"; then
    bench_idle "$t"
    proxy_ok "$t" || true
  else
    R[$t:rss0]=failed R[$t:idle]=failed
    note "${LABEL[$t]} did not start for the idle test: $(tail -n 3 "$PROXY_LOG" 2>/dev/null | tr '\n' ' ')"
  fi
  scan_log "$t"
  stop_target
  OVF[$t]=$((${OVF[$t]:-0} + $(listen_overflows) - ovf0))
}

LOAD_METRICS="rps p50 p99 cps gbps1 gbps4 cpugb1 cpugb4 usreq uscon pbusy lbusy pbusyc lbusyc"

# collect TARGET: keeps this round's load metrics.
collect() {
  local m
  for m in $LOAD_METRICS; do V[$1:$m]+="${R[$1:$m]} "; done
  E[$1]+="${R[$1:errs]}; "
}

# settle TARGET: the median of each load metric over the rounds; a word
# such as "error" in any round is reported instead.
settle() {
  local m vals word
  for m in $LOAD_METRICS; do
    vals=${V[$1:$m]}
    word=$(tr ' ' '\n' <<<"$vals" | grep -v -E '^$|^[0-9.]+$' | head -n 1 || true)
    if [[ -n $word ]]; then
      R[$1:$m]=$word
    else
      R[$1:$m]=$(tr ' ' '\n' <<<"$vals" | grep -v '^$' | sort -g | awk '{a[NR] = $1} END {print a[int((NR + 1) / 2)]}')
      # The spread over the rounds, lowest to highest.
      SPREAD[$1:$m]=$(tr ' ' '\n' <<<"$vals" | grep -v '^$' | sort -g | awk 'NR == 1 {lo = $1} {hi = $1} END {if (NR > 1) printf "%s–%s", lo, hi}')
    fi
  done
  # Errors: the sum over the rounds, keep-alive / close.
  R[$1:errs]=$(tr ';' '\n' <<<"${E[$1]}" | awk -F/ 'NF == 2 {k += $1; c += $2} END {printf "%d / %d", k, c}')
}

record_overflows() { # target
  local ovf=${OVF[$1]:-0}
  R[$1:ovf]=$ovf
  if ((ovf > 0)); then
    note "${LABEL[$1]}: the kernel dropped $ovf connection attempts on a full listen queue during its runs (TcpExt ListenOverflows; the counter is host-wide, so other programs' connections count too)"
  fi
}

# scan_log TARGET: reports warnings and errors the proxy logged.
scan_log() {
  local t=$1 n logs pat='WARN|ERROR|panick'
  case $t in
    sluice) logs=$(ls "$WORK"/sluice.*/stderr.log 2>/dev/null || true) ;;
    # The probe writes only when something failed.
    uring | epoll_min) logs=$(ls "$WORK"/probe-"$t".*/stderr.log 2>/dev/null || true) pat=. ;;
    *) return 0 ;;
  esac
  [[ -n $logs ]] || return 0
  n=$(cat $logs | grep -c -E "$pat" || true)
  if ((n > 0)); then
    note "${LABEL[$t]} logged $n WARN/ERROR lines; the most frequent: $(cat $logs | grep -E "$pat" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[0-9T:.Z-]* *//' -e 's/client=[0-9.:]*//g' | sort | uniq -c | sort -rn | head -n 3 | tr -s ' ' | tr '\n' ';')"
  fi
}

mark() { # target word: every metric of a target
  local m
  for m in rps p50 p99 cps errs gbps1 gbps4 cpugb1 cpugb4 rss0 idle ovf lp50 lp99 lp999 usreq uscon pbusy lbusy pbusyc lbusyc; do
    R[$1:$m]=$2
  done
}

# ---------------------------------------------------------------- run

declare -A V E OVF SPREAD THROTTLED
SELECTED=()
for t in "${ALL_TARGETS[@]}"; do
  if [[ " $TARGETS " == *" $t "* ]]; then
    SELECTED+=("$t")
  else
    mark "$t" "not run"
  fi
done
for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
  for t in "${SELECTED[@]}"; do
    run_load "$t"
    collect "$t"
  done
done
for t in "${SELECTED[@]}"; do
  [[ ${R[$t:rps]} == skipped || ${R[$t:rps]} == failed ]] && continue
  settle "$t"
  run_idle "$t"
  record_overflows "$t"
done
# The fixed rate: 70% of HAProxy's keep-alive capacity in this run (of
# sluice's when HAProxy did not run), the same for every proxy.
RATE_BASE=${R[haproxy:rps]:-} RATE_FROM="HAProxy's"
[[ $RATE_BASE =~ ^[0-9.]+$ ]] || RATE_BASE=${R[sluice:rps]:-} RATE_FROM="sluice's"
[[ $RATE_BASE =~ ^[0-9.]+$ ]] || RATE_BASE=${R[epoll_min:rps]:-} RATE_FROM="the epoll probe's"
FIXED_RATE="" LATE=""
if [[ $RATE_BASE =~ ^[0-9.]+$ ]]; then
  FIXED_RATE=$(awk -v r="$RATE_BASE" 'BEGIN {printf "%d", r * 0.7}')
  for t in "${SELECTED[@]}"; do
    run_latency "$t" "$FIXED_RATE"
  done
fi

# ---------------------------------------------------------------- report

ratio() { # a b: a / b, or a dash when either is not a number
  awk -v a="$1" -v b="$2" 'BEGIN {
    if (a ~ /^[0-9.]+$/ && b ~ /^[0-9.]+$/ && b + 0 > 0) printf "%.2f", a / b; else print "—" }'
}

ROWS=(
  "rps|keep-alive HTTP requests/s ↑"
  "p50|keep-alive p50 latency, ms ↓"
  "p99|keep-alive p99 latency, ms ↓"
  "lp50|fixed-rate p50 latency, ms ↓ (${FIXED_RATE:-—} requests/s)"
  "lp99|fixed-rate p99 latency, ms ↓"
  "lp999|fixed-rate p99.9 latency, ms ↓"
  "cps|new connections/s (Connection: close) ↑"
  "errs|wrk errors (keep-alive / close)"
  "usreq|proxy CPU-µs per keep-alive request ↓"
  "uscon|proxy CPU-µs per new connection ↓"
  "busy|CPU busy %, proxy core / load core, keep-alive"
  "busyc|CPU busy %, proxy core / load core, new connections"
  "gbps1|bulk, 1 stream, Gbit/s ↑"
  "gbps4|bulk, 4 streams, Gbit/s ↑"
  "cpugb1|proxy CPU-s per GB, 1 stream ↓"
  "cpugb4|proxy CPU-s per GB, 4 streams ↓"
  "rss0|proxy RSS at start, MiB ↓"
  "idle|RSS per idle connection, KiB ↓ ($IDLE_N conns)"
)

# Columns: the five usual targets always, so tables compare run to run,
# then each probe engine that ran; ratio columns as numerator:denominator.
COLS=(sluice haproxy haproxy_splice nginx direct)
RATIOS=(sluice:haproxy sluice:haproxy_splice sluice:direct)
for t in uring epoll_min; do
  [[ " ${SELECTED[*]} " == *" $t "* ]] && COLS+=("$t")
done
if [[ " ${SELECTED[*]} " == *" uring "* && " ${SELECTED[*]} " == *" epoll_min "* ]]; then
  RATIOS+=(uring:epoll_min)
fi

mode="full, median of $ROUNDS rounds (lowest–highest in brackets)"
[[ -n $CAP ]] && mode="capped at $CAP% of one CPU, median of $ROUNDS alternating rounds (lowest–highest in brackets)"
[[ $QUICK == 1 ]] && mode="QUICK=1, $ROUNDS round(s)"
{
  echo "# sluice benchmark"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| date | $DATE_UTC |"
  echo "| machine | $CPU_MODEL, $NCPU CPUs, $MEM_GIB GiB RAM, Linux $KERNEL |"
  echo "| sluice | commit $COMMIT |"
  echo "| peers | HAProxy $V_HAPROXY, nginx $V_NGINX, wrk $V_WRK, iperf3 $V_IPERF |"
  echo "| run | $mode: wrk -t1 -c$CONNS ${DURATION} s per run (${WARMUP} s warm-up), iperf3 ${IPERF_TIME} s per run, $IDLE_N idle connections |"
  echo "| load average | $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (other work on the machine skews the numbers) |"
  echo "| sluice settings | ${SLUICE_CONFIG_EXTRA:-defaults} (with one CPU: one worker) |"
  if [[ " ${COLS[*]} " == *" uring "* || " ${COLS[*]} " == *" epoll_min "* ]]; then
    echo "| probe | benches/uring (uring-probe), one thread; defaults: 16 KiB reads, 1,024 provided buffers, shutdown as a system call${PROBE_ARGS:+; arguments: $PROBE_ARGS} |"
  fi
  echo "| pinning | proxy alone on CPU $PROXY_CPU (taskset -c $PROXY_CPU, one thread/worker); backends, wrk, iperf3 and idle client on CPU $LOAD_CPU |"
  if [[ -n $CAP ]]; then
    th=""
    for t in "${SELECTED[@]}"; do [[ $t == direct ]] || th+="${LABEL[$t]} ${THROTTLED[$t]:-0}, "; done
    echo "| CPU cap | each proxy in a cgroup with a quota of $CAP% of one CPU ($((CAP * CAP_PERIOD_US / 100)) µs per $((CAP_PERIOD_US / 1000)) ms); periods it was throttled in the load runs: ${th%, } (throttling in every run means the cap, not the load side, set the pace) |"
  fi
  echo
  hdr="| metric " sep="|---"
  for t in "${COLS[@]}"; do hdr+="| ${LABEL[$t]} " sep+="|--:"; done
  for r in "${RATIOS[@]}"; do hdr+="| ${LABEL[${r%:*}]} ÷ ${LABEL[${r#*:}]} " sep+="|--:"; done
  echo "$hdr|"
  echo "$sep|"
  blank=$(printf '| %.0s' "${RATIOS[@]}")
  for row in "${ROWS[@]}"; do
    m=${row%%|*}
    line="| ${row#*|} "
    for t in "${COLS[@]}"; do
      if [[ -n ${SPREAD[$t:$m]:-} && " rps cps p99 gbps1 gbps4 " == *" $m "* ]]; then
        line+="| ${R[$t:$m]:-—} (${SPREAD[$t:$m]}) "
      else
        line+="| ${R[$t:$m]:-—} "
      fi
    done
    if [[ $m == busy || $m == busyc ]]; then
      line="| ${row#*|} "
      for t in "${COLS[@]}"; do
        line+="| ${R[$t:p$m]:-—} / ${R[$t:l$m]:-—} "
      done
      line+="$blank|"
    elif [[ $m == errs ]]; then
      line+="$blank|"
    else
      for r in "${RATIOS[@]}"; do
        line+="| $(ratio "${R[${r%:*}:$m]:-}" "${R[${r#*:}:$m]:-}") "
      done
      line+="|"
    fi
    echo "$line"
  done
  echo
  echo "↑ higher is better, ↓ lower is better; a ratio is the first-named value divided by the second's."
  echo "Direct is wrk or iperf3 straight to one backend, with no proxy: the limit of this machine."
  echo "The fixed-rate rows send requests on a schedule (examples/rate.rs, $CONNS keep-alive connections) at 70% of $RATE_FROM keep-alive requests/s in this run, and count each latency from when the request was due; a single run each, not a median. How late requests left their connection (p99; a connection sends its next request only after the last reply, so a stalled proxy makes them late, and direct shows the generator's own precision): ${LATE%, }."
  echo "CPU busy % shows which side limits a row: a load core near 100% means wrk and the backends, not the proxy, set the pace."
  if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    echo
    for n in "${NOTES[@]}"; do
      echo "- $n"
    done
  fi
} >"$WORK/table.md"

mkdir -p "$RESULTS"
stamp=$(date -u +%Y%m%d-%H%M%S)
[[ $QUICK == 1 ]] && stamp+="-quick"
cp "$WORK/table.md" "$RESULTS/latest.md"
cp "$WORK/table.md" "$RESULTS/$stamp.md"
cat "$WORK/table.md"
log "written: $RESULTS/latest.md and $RESULTS/$stamp.md"
exit "$STATUS"
