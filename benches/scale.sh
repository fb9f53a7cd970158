#!/usr/bin/env bash
# sluice with many idle connections: RSS as they open, in four steps (is
# the cost per connection flat?), and the admin API's latency while they
# are open: GET /backends and one page of GET /backends/{name}/connections.
# See benches/README.md.
#
#   benches/scale.sh                  100,000 connections (fewer when the
#                                     open-file limit cannot allow them)
#   CONNS=20000 benches/scale.sh      another count
#
# The clients connect from 127.0.0.2 to 127.0.0.5 and the backends listen
# on 127.0.0.6 to 127.0.0.9, so no address pair runs out of its ~28,000
# ephemeral ports. Everything but sluice runs on LOAD_CPU.

set -Eeuo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
RESULTS=${RESULTS_DIR:-"$BENCH/results"}
SLUICE="$ROOT/target/release/sluice"
WANT=${CONNS:-100000}
PROXY_CPU=${PROXY_CPU:-0}
LOAD_CPU=${LOAD_CPU:-1}
SAMPLES=${SAMPLES:-100}
STEPS=4

log() { printf '[scale %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "error: $*"; exit 1; }
NOTES=()
note() { NOTES+=("$*"); log "note: $*"; }

WORK=$(mktemp -d /tmp/sluice-scale.XXXXXX)
# shellcheck source=benches/procs.sh
. "$BENCH/procs.sh"

rss_kb() { awk '/^VmRSS:/ {print $2}' "/proc/$1/status"; }
status_field() { sed -n "s/.*\b$2=\([0-9]*\).*/\1/p" "$1" 2>/dev/null | head -n 1; }

# wait_field FILE KEY COUNT SECONDS: until FILE says KEY=COUNT, or the
# deadline, or 10 s without a change.
wait_field() {
  local f=$1 key=$2 want=$3 deadline=$((SECONDS + $4)) cur last="" since=$SECONDS
  while :; do
    cur=$(status_field "$f" "$key")
    [[ ${cur:-0} == "$want" ]] && return 0
    [[ $cur != "$last" ]] && last=$cur since=$SECONDS
    ((SECONDS >= deadline || SECONDS - since >= 10)) && return 1
    sleep 0.1
  done
}

# Each proxied connection holds two descriptors in sluice; the client and
# the holder hold one each in their own processes.
ulimit -n 1048576 2>/dev/null || ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
NOFILE=$(ulimit -n)
N=$WANT
if ((2 * N + 300 > NOFILE)); then
  N=$(((NOFILE - 300) / 2 / 1000 * 1000))
  note "$N connections, not $WANT: the open-file limit here is $NOFILE and cannot be raised (raising the hard limit needs CAP_SYS_RESOURCE; sluice needs two descriptors per connection)"
fi
((N >= STEPS * 100)) || die "the open-file limit $NOFILE leaves room for too few connections"

log "building sluice (cargo build --release --locked)"
(cd "$ROOT" && cargo build --release --locked) >"$WORK/build.log" 2>&1 || {
  tail -n 20 "$WORK/build.log" >&2
  die "cargo build failed"
}

PORT_HOLD=$(free_port)
HOLD_STATUS="$WORK/hold.status"
start "$LOAD_CPU" "$WORK/hold.log" python3 "$BENCH/idle.py" hold --port "$PORT_HOLD" \
  --host 127.0.0.6 --host 127.0.0.7 --host 127.0.0.8 --host 127.0.0.9 \
  --status "$HOLD_STATUS" --max-seconds 3600
for _ in $(seq 100); do
  [[ -n $(ss -Hltn "sport = :$PORT_HOLD" 2>/dev/null) ]] && break
  sleep 0.05
done

P_IDLE=$(free_port)
P_ADMIN=$(free_port)
cat >"$WORK/sluice.toml" <<EOF
max_connections = $((N + 1000))
[admin]
listen = "127.0.0.1:$P_ADMIN"

[[service]]
name = "idle"
listen = "127.0.0.1:$P_IDLE"
EOF
for i in 1 2 3 4; do
  cat >>"$WORK/sluice.toml" <<EOF

[[backend]]
name = "hold$i"
address = "127.0.0.$((5 + i)):$PORT_HOLD"
health_check = "none"
EOF
done
"$SLUICE" check --config "$WORK/sluice.toml" >"$WORK/check.log" 2>&1 || die "sluice check: $(tail -n 1 "$WORK/check.log")"
start "$PROXY_CPU" "$WORK/sluice.log" env RUST_LOG=warn "$SLUICE" run --config "$WORK/sluice.toml"
SLUICE_PID=$PID
for _ in $(seq 200); do
  [[ -n $(ss -Hltn "sport = :$P_ADMIN" 2>/dev/null) ]] && break
  sleep 0.05
done
ADMIN="127.0.0.1:$P_ADMIN"

latency() { # path -> "p50 p99 max bytes"
  taskset -c "$LOAD_CPU" python3 "$BENCH/admin_latency.py" --admin "$ADMIN" --path "$1" --n "$SAMPLES"
}

settled_rss() {
  local prev cur i
  prev=$(rss_kb "$SLUICE_PID")
  for ((i = 0; i < 30; i++)); do
    sleep 0.2
    cur=$(rss_kb "$SLUICE_PID")
    [[ $cur == "$prev" ]] && break
    prev=$cur
  done
  rss_kb "$SLUICE_PID"
}

ROWS=()
row() { # conns rss_kb
  local b c
  b=$(latency /backends) || die "GET /backends failed"
  c=$(latency "/backends/hold1/connections?limit=1000") || die "GET /backends/hold1/connections failed"
  ROWS+=("$1 $2 $b $c")
  log "conns=$1 rss=${2} KiB /backends: $b; connections page: $c"
}

RSS0=$(settled_rss)
row 0 "$RSS0"
step=$((N / STEPS))
for ((s = 1; s <= STEPS; s++)); do
  st="$WORK/open.$s.status"
  log "opening $step more (to $((s * step)))"
  start "$LOAD_CPU" "$WORK/open.$s.log" python3 "$BENCH/idle.py" open --port "$P_IDLE" \
    --count "$step" --concurrency 200 --status "$st" --max-seconds 3600 \
    --source 127.0.0.2 --source 127.0.0.3 --source 127.0.0.4 --source 127.0.0.5
  if ! wait_field "$HOLD_STATUS" live $((s * step)) $((60 + step / 200)); then
    die "only $(status_field "$HOLD_STATUS" live) of $((s * step)) reached the backends (client: $(cat "$st"); sluice: $(tail -n 2 "$WORK/sluice.log" | tr '\n' ' '))"
  fi
  row $((s * step)) "$(settled_rss)"
done

CPU_MODEL=$(awk -F': ' '/^model name/ {print $2; exit}' /proc/cpuinfo)
COMMIT=$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo unknown)
{
  echo "# sluice with many idle connections"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| date | $(date -u +%Y-%m-%dT%H:%M:%SZ) |"
  echo "| machine | $CPU_MODEL, $(nproc --all) CPUs, $(awk '/^MemTotal/ {printf "%.1f", $2 / 1048576}' /proc/meminfo) GiB RAM, Linux $(uname -r) |"
  echo "| sluice | commit $COMMIT, default settings, on CPU $PROXY_CPU; clients, backends and the admin calls on CPU $LOAD_CPU |"
  echo "| admin calls | $SAMPLES of each at every step, each on a new connection; the page is \`?limit=1000\` of one backend's $((N / 4)) at most |"
  echo
  echo "| connections | RSS MiB | KiB per connection (this step) | GET /backends p50 / p99 ms | GET …/connections?limit=1000 p50 / p99 ms (bytes) |"
  echo "|--:|--:|--:|--:|--:|"
  prev_c=0 prev_r=$RSS0
  for r in "${ROWS[@]}"; do
    read -r c rss b50 b99 _bmax _bb p50 p99 _pmax pb <<<"$r"
    per="—"
    ((c > prev_c)) && per=$(awk -v a="$rss" -v b="$prev_r" -v n=$((c - prev_c)) 'BEGIN {printf "%.2f", (a - b) / n}')
    echo "| $c | $(awk -v k="$rss" 'BEGIN {printf "%.1f", k / 1024}') | $per | $b50 / $b99 | $p50 / $p99 ($pb) |"
    prev_c=$c prev_r=$rss
  done
  if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    echo
    for n in "${NOTES[@]}"; do echo "- $n"; done
  fi
} >"$WORK/table.md"
mkdir -p "$RESULTS"
stamp=$(date -u +%Y%m%d-%H%M%S)
cp "$WORK/table.md" "$RESULTS/scale-latest.md"
cp "$WORK/table.md" "$RESULTS/scale-$stamp.md"
cat "$WORK/table.md"
log "written: $RESULTS/scale-latest.md"
