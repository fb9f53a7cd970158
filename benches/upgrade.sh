#!/usr/bin/env bash
# Replacing the proxy under load: sluice's upgrade (listening sockets handed
# to a new process over SCM_RIGHTS) beside HAProxy 2.6's master-worker
# reload, HAProxy's old-style `-sf` restart and a plain stop-and-start of
# sluice, each under the same stream of fresh connections. See
# benches/README.md.
#
#   benches/upgrade.sh            5 hand-overs per mode (~1 min)
#   QUICK=1 benches/upgrade.sh    2 hand-overs per mode (~30 s)
#
# Knobs (environment): HANDOVERS (per mode), SPACING (s between the end of
# one hand-over and the start of the next), LEAD and TAIL (s of load before
# the first and after the last), WINDOW (s either side of a hand-over that
# count as "around" it), THREADS (load threads), TIMEOUT (s per request),
# PROXY_CPU, LOAD_CPU, MODES (space-separated subset of: sluice_upgrade
# haproxy_reload haproxy_sf sluice_restart), KEEP_WORK=1 keeps the temp dir
# with every log, RESULTS_DIR (benches/results) where the tables go.
#
# Exit status: 0 when the table was written (failed hand-overs and failed
# requests are in it and its notes); 1 on a harness error (the build
# failed, a backend would not start, sluice could not be started at all).

set -Eeuo pipefail
export LC_ALL=C # EPOCHREALTIME with a decimal point

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BENCH="$ROOT/benches"
RESULTS=${RESULTS_DIR:-"$BENCH/results"}
SLUICE="$ROOT/target/release/sluice"

QUICK=${QUICK:-0}
if [[ $QUICK == 1 ]]; then
  HANDOVERS=${HANDOVERS:-2}
  LEAD=${LEAD:-1}
  TAIL=${TAIL:-1}
else
  HANDOVERS=${HANDOVERS:-5}
  LEAD=${LEAD:-3}
  TAIL=${TAIL:-2}
fi
SPACING=${SPACING:-1}
WINDOW=${WINDOW:-1}
THREADS=${THREADS:-4}
TIMEOUT=${TIMEOUT:-3}
PROXY_CPU=${PROXY_CPU:-1}
LOAD_CPU=${LOAD_CPU:-0}
MODES=${MODES:-"sluice_upgrade haproxy_reload haproxy_sf sluice_restart"}
ALL_MODES=(sluice_upgrade haproxy_reload haproxy_sf sluice_restart)
declare -A LABEL=(
  [sluice_upgrade]="sluice upgrade"
  [haproxy_reload]="HAProxy master-worker reload"
  [haproxy_sf]="HAProxy -sf restart"
  [sluice_restart]="sluice stop + start"
)

NOTES=()
STATUS=0

log() { printf '[upgrade-bench %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
note() { NOTES+=("$*"); log "note: $*"; }
die() { log "error: $*"; exit 1; }
trap 'log "error: harness failed at line $LINENO: $BASH_COMMAND"' ERR

# ---------------------------------------------------------------- processes

WORK=$(mktemp -d /tmp/sluice-upgrade-bench.XXXXXX)

# shellcheck source=benches/procs.sh
. "$BENCH/procs.sh"

listening() { [[ -n $(ss -Hltn "sport = :$1" 2>/dev/null) ]]; }

# The inodes of the sockets listening on a port: the same after a
# hand-over when the socket itself was passed on, not bound again.
listen_inodes() {
  ss -Hltne "sport = :$1" 2>/dev/null | grep -o 'ino:[0-9]*' | sort -u | tr '\n' ' ' || true
}

# wait_listen PORT PID WHAT [SECONDS]: polls until something listens on PORT.
wait_listen() {
  local port=$1 pid=$2 what=$3 deadline=$((SECONDS + ${4:-15}))
  while :; do
    listening "$port" && return 0
    if ! alive "$pid"; then
      log "$what exited before listening on 127.0.0.1:$port"
      return 1
    fi
    if ((SECONDS >= deadline)); then
      log "$what is not listening on 127.0.0.1:$port after ${4:-15} s"
      return 1
    fi
    sleep 0.01
  done
}

# wait_exit PID SECONDS: polls until PID has exited.
wait_exit() {
  local pid=$1 deadline=$((SECONDS + $2))
  while alive "$pid"; do
    ((SECONDS >= deadline)) && return 1
    sleep 0.01
  done
}

have() { command -v "$1" >/dev/null 2>&1; }
now() { echo "$EPOCHREALTIME"; }

# Host-wide count of connections dropped because a listen queue was full.
listen_overflows() {
  awk '/^TcpExt:/ { if (!h) { for (i = 1; i <= NF; i++) if ($i == "ListenOverflows") c = i; h = 1 }
                    else print $c + 0 }' /proc/net/netstat
}

# ---------------------------------------------------------------- preflight

for t in python3 taskset ss pgrep cargo git; do
  have "$t" || die "$t is required by the harness itself"
done
NCPU=$(nproc --all)
if ((NCPU < 2)); then
  note "only $NCPU CPU: proxy and load share CPU 0, numbers are not comparable to a 2-core run"
  PROXY_CPU=0
  LOAD_CPU=0
fi
HAVE_HAPROXY=1
have haproxy || { HAVE_HAPROXY=0; note "haproxy not installed: apt-get install haproxy (HAProxy rows skipped)"; }
ulimit -n 65536 2>/dev/null || true

# ---------------------------------------------------------------- build

log "building sluice (cargo build --release)"
if ! (cd "$ROOT" && cargo build --release) >"$WORK/build.log" 2>&1; then
  tail -n 30 "$WORK/build.log" >&2
  die "cargo build --release failed"
fi
[[ -x $SLUICE ]] || die "$SLUICE missing after the build"
# Two copies of the same build: each upgrade starts the other file, as a
# real upgrade starts a new one.
mkdir -p "$WORK/bin-a" "$WORK/bin-b"
cp "$SLUICE" "$WORK/bin-a/sluice"
cp "$SLUICE" "$WORK/bin-b/sluice"
BIN_A="$WORK/bin-a/sluice"
BIN_B="$WORK/bin-b/sluice"

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
V_HAPROXY=$( ((HAVE_HAPROXY)) && haproxy -v 2>&1 | head -n 1 | awk '{print $3}' || echo "not installed")
V_PYTHON=$(python3 -c 'import platform; print(platform.python_version())')

# ---------------------------------------------------------------- backends
# Two `sluice web` servers on LOAD_CPU, with the load generator.

BE1=$(free_port)
start "$LOAD_CPU" "$WORK/web1.log" "$SLUICE" web --listen "127.0.0.1:$BE1" --name web1
wait_listen "$BE1" "$PID" "backend web1" || die "backend web1 did not start: $(tail -n 3 "$WORK/web1.log")"
BE2=$(free_port)
start "$LOAD_CPU" "$WORK/web2.log" "$SLUICE" web --listen "127.0.0.1:$BE2" --name web2
wait_listen "$BE2" "$PID" "backend web2" || die "backend web2 did not start: $(tail -n 3 "$WORK/web2.log")"
log "backends: web1=$BE1 web2=$BE2"

# ---------------------------------------------------------------- proxies
# Every mode listens on a fresh port P; CUR is the process serving it.

P="" CUR="" DIR=""

sluice_start() { # binary; sets CUR (the config is $DIR/sluice.toml)
  start "$PROXY_CPU" "$DIR/sluice.log" env RUST_LOG=warn "$1" run --config "$DIR/sluice.toml"
  CUR=$PID
  wait_listen "$P" "$CUR" sluice
}

setup_sluice() {
  ADMIN=$(free_port)
  # max_connections as HAProxy's maxconn below; the default (100000) is
  # more than this machine's open-file limit and only draws a warning.
  cat >"$DIR/sluice.toml" <<EOF
max_connections = 4096

[admin]
listen = "127.0.0.1:$ADMIN"

[[service]]
name = "web"
listen = "127.0.0.1:$P"
backends = ["web1", "web2"]

[[backend]]
name = "web1"
address = "127.0.0.1:$BE1"
health_check = "none"

[[backend]]
name = "web2"
address = "127.0.0.1:$BE2"
health_check = "none"
EOF
  if ! "$SLUICE" check --config "$DIR/sluice.toml" >"$DIR/check.log" 2>&1; then
    note "sluice check rejected the benchmark config: $(tail -n 1 "$DIR/check.log")"
    return 1
  fi
  sluice_start "$BIN_A"
}

haproxy_config() { # file [extra global lines]
  cat >"$1" <<EOF
global
    nbthread 1
    maxconn 4096
${2:-}

defaults
    mode tcp
    timeout connect 5s
    timeout client 30s
    timeout server 30s

frontend web
    bind 127.0.0.1:$P
    default_backend web
backend web
    balance roundrobin
    server web1 127.0.0.1:$BE1
    server web2 127.0.0.1:$BE2
EOF
  if ! haproxy -c -q -f "$1" >"$DIR/check.log" 2>&1; then
    note "haproxy -c rejected the benchmark config: $(head -n 3 "$DIR/check.log" | tr '\n' ' ')"
    return 1
  fi
}

# Master-worker: the master (CUR) forks one worker; a reload re-executes
# the master, which passes the listeners to the new worker.
setup_haproxy_reload() {
  haproxy_config "$DIR/haproxy.cfg" \
    "    stats socket $DIR/stats.sock mode 600 level admin expose-fd listeners" || return 1
  start "$PROXY_CPU" "$DIR/haproxy.log" haproxy -W -db -S "$DIR/master.sock" -f "$DIR/haproxy.cfg"
  CUR=$PID
  wait_listen "$P" "$CUR" "haproxy master-worker" || return 1
  WORKER=$(workers_of "$CUR")
  [[ -n $WORKER ]] || { log "haproxy master $CUR has no worker"; return 1; }
}

workers_of() { pgrep -P "$1" 2>/dev/null | tr '\n' ' ' | sed 's/ $//'; }

# master_cli COMMAND: one command on the master CLI socket, reply on stdout.
master_cli() {
  python3 - "$DIR/master.sock" "$1" <<'EOF'
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.settimeout(5)
s.connect(sys.argv[1])
s.sendall(sys.argv[2].encode() + b"\n")
out = b""
while True:
    try:
        b = s.recv(65536)
    except (ConnectionResetError, socket.timeout):
        break
    if not b:
        break
    out += b
sys.stdout.write(out.decode(errors="replace"))
EOF
}

# Old style: one process, no master; a new one binds beside it
# (SO_REUSEPORT) and tells it to finish with -sf.
setup_haproxy_sf() {
  haproxy_config "$DIR/haproxy.cfg" || return 1
  start "$PROXY_CPU" "$DIR/haproxy.log" haproxy -db -f "$DIR/haproxy.cfg"
  CUR=$PID
  wait_listen "$P" "$CUR" haproxy
}

# ---------------------------------------------------------------- hand-overs
# handover MODE N: replaces the proxy once; returns 1 (with HO_ERR) if the
# hand-over itself failed. The caller records its begin and end.

HO_ERR=""

handover() {
  local mode=$1 n=$2 out old new rc deadline
  HO_ERR=""
  out="$DIR/handover.$n.log"
  case $mode in
    sluice_upgrade)
      new=$BIN_B
      ((n % 2 == 0)) && new=$BIN_A
      rc=0
      taskset -c "$LOAD_CPU" "$SLUICE" ctl --admin "http://127.0.0.1:$ADMIN" \
        upgrade --binary "$new" --wait 30s >"$out" 2>&1 || rc=$?
      old=$CUR
      new=$(sed -n 's/.*handed over to pid \([0-9]*\).*/\1/p' "$out" | head -n 1)
      if [[ -n $new ]]; then
        # The new process is the old one's child, then init's: not ours
        # to wait for, but ours to stop at the end.
        PIDS+=("$new")
        CUR=$new
      fi
      if ((rc != 0)) || [[ -z $new ]]; then
        HO_ERR="sluice ctl upgrade exited $rc: $(tr '\n' ' ' <"$out")"
        return 1
      fi
      if ! wait_exit "$old" 5; then
        HO_ERR="old pid $old still runs after ctl upgrade returned"
        return 1
      fi
      wait "$old" 2>/dev/null || true
      forget "$old"
      alive "$CUR" || { HO_ERR="new pid $CUR is not running"; return 1; }
      ;;
    haproxy_reload)
      old=$WORKER
      master_cli reload >"$out" 2>&1 || true
      # Done when the master has one worker, not the old one.
      deadline=$((SECONDS + 30))
      while :; do
        new=$(workers_of "$CUR")
        if [[ -n $new && $new != *" "* && $new != "$old" ]]; then
          break
        fi
        if ! alive "$CUR"; then
          HO_ERR="haproxy master exited during reload: $(tail -n 3 "$DIR/haproxy.log" | tr '\n' ' ')"
          return 1
        fi
        if ((SECONDS >= deadline)); then
          HO_ERR="after 30 s the master's workers are '$new' (old: $old); show proc: $(master_cli 'show proc' 2>&1 | tr '\n' ' ')"
          return 1
        fi
        sleep 0.01
      done
      WORKER=$new
      ;;
    haproxy_sf)
      old=$CUR
      start "$PROXY_CPU" "$DIR/haproxy.log" haproxy -db -f "$DIR/haproxy.cfg" -sf "$old"
      CUR=$PID
      if ! wait_exit "$old" 30; then
        HO_ERR="old haproxy $old still runs 30 s after haproxy -sf"
        return 1
      fi
      wait "$old" 2>/dev/null || true
      forget "$old"
      alive "$CUR" || { HO_ERR="new haproxy exited: $(tail -n 3 "$DIR/haproxy.log" | tr '\n' ' ')"; return 1; }
      listening "$P" || { HO_ERR="nothing listens on $P after haproxy -sf"; return 1; }
      ;;
    sluice_restart)
      # Polled every 10 ms (stop_pid polls every 50 ms): the gap measured
      # is sluice's, not the harness's.
      old=$CUR
      kill -TERM "$old"
      if ! wait_exit "$old" 30; then
        HO_ERR="sluice $old still runs 30 s after SIGTERM"
        stop_pid "$old"
        return 1
      fi
      wait "$old" 2>/dev/null || true
      forget "$old"
      if ! sluice_start "$BIN_A"; then
        HO_ERR="sluice did not start again: $(tail -n 3 "$DIR/sluice.log" | tr '\n' ' ')"
        return 1
      fi
      ;;
  esac
}

# check_pinned PID WHAT: notes once per mode if PID may run elsewhere than
# PROXY_CPU (a process the proxy starts itself inherits its affinity).
check_pinned() {
  local cpus
  cpus=$(taskset -pc "$1" 2>/dev/null | sed 's/.*: //') || return 0
  if [[ -n $cpus && $cpus != "$PROXY_CPU" && -z ${UNPINNED[$MODE]:-} ]]; then
    UNPINNED[$MODE]=1
    note "${LABEL[$MODE]}: $2 (pid $1) may run on CPUs $cpus, not only $PROXY_CPU"
  fi
}

# ---------------------------------------------------------------- one run

declare -A RESULT HOFAIL OVF UNPINNED KEPT
MODE=""

run_mode() { # mode
  local mode=$1 load marks n b e ovf0 ino setup=failed
  MODE=$mode
  DIR="$WORK/$mode"
  mkdir -p "$DIR"
  P=$(free_port)
  CUR="" WORKER=""
  log "=== ${LABEL[$mode]}: proxy on 127.0.0.1:$P"
  case $mode in
    sluice_upgrade | sluice_restart) setup_sluice && setup=ok ;;
    haproxy_reload) setup_haproxy_reload && setup=ok ;;
    haproxy_sf) setup_haproxy_sf && setup=ok ;;
  esac
  if [[ $setup != ok ]]; then
    note "${LABEL[$mode]}: the proxy did not start: $(tail -n 3 "$DIR"/*.log 2>/dev/null | tr '\n' ' ')"
    RESULT[$mode]=failed
    [[ $mode == sluice_* ]] && STATUS=1
    [[ -n $CUR ]] && stop_pid "$CUR"
    return 0
  fi
  ovf0=$(listen_overflows)
  marks="$DIR/marks.txt"
  : >"$marks"
  start "$LOAD_CPU" "$DIR/load.log" python3 "$BENCH/connload.py" --port "$P" \
    --threads "$THREADS" --timeout "$TIMEOUT" --window "$WINDOW" \
    --marks "$marks" --out "$DIR/load.json" --max-seconds 600
  load=$PID
  sleep "$LEAD"
  HOFAIL[$mode]=0
  KEPT[$mode]=0
  for ((n = 1; n <= HANDOVERS; n++)); do
    ino=$(listen_inodes "$P")
    b=$(now)
    if ! handover "$mode" "$n"; then
      e=$(now)
      HOFAIL[$mode]=$((HOFAIL[$mode] + 1))
      note "${LABEL[$mode]}: hand-over $n failed: $HO_ERR"
      echo "$b $e failed-$n" >>"$marks"
      if ! alive "${CUR:-0}" || ! listening "$P"; then
        note "${LABEL[$mode]}: nothing serves any more; the run stops after $n hand-over(s)"
        break
      fi
    else
      e=$(now)
      echo "$b $e $n" >>"$marks"
      if [[ -n $ino && $(listen_inodes "$P") == "$ino" ]]; then
        KEPT[$mode]=$((KEPT[$mode] + 1))
      fi
    fi
    if [[ $mode == haproxy_reload ]]; then
      check_pinned "${WORKER:-0}" "the new worker"
    else
      check_pinned "${CUR:-0}" "the new process"
    fi
    log "${LABEL[$mode]}: hand-over $n took $(awk -v b="$b" -v e="$e" 'BEGIN {printf "%.0f", (e - b) * 1000}') ms"
    ((n < HANDOVERS)) && sleep "$SPACING"
  done
  sleep "$TAIL"
  kill -TERM "$load" 2>/dev/null || true
  wait "$load" 2>/dev/null || true
  forget "$load"
  OVF[$mode]=$(($(listen_overflows) - ovf0))
  if [[ -s $DIR/load.json ]]; then
    RESULT[$mode]="$DIR/load.json"
  else
    note "${LABEL[$mode]}: the load generator wrote no result: $(tail -n 3 "$DIR/load.log" | tr '\n' ' ')"
    RESULT[$mode]=failed
  fi
  if [[ $mode == sluice_* ]]; then
    local w
    w=$(grep -c -E 'WARN|ERROR|panick' "$DIR/sluice.log" || true)
    if ((w > 0)); then
      note "${LABEL[$mode]}: sluice logged $w WARN/ERROR lines; the most frequent: $(grep -E 'WARN|ERROR|panick' "$DIR/sluice.log" | sed -e 's/\x1b\[[0-9;]*m//g' -e 's/^[0-9T:.Z-]* *//' -e 's/client=[0-9.:]*//g' | sort | uniq -c | sort -rn | head -n 3 | tr -s ' ' | tr '\n' ';')"
    fi
  fi
  [[ -n $CUR ]] && stop_pid "$CUR"
  CUR=""
}

for mode in "${ALL_MODES[@]}"; do
  if [[ " $MODES " != *" $mode "* ]]; then
    RESULT[$mode]="not run"
    continue
  fi
  if [[ $mode == haproxy_* ]] && ((!HAVE_HAPROXY)); then
    RESULT[$mode]=skipped
    continue
  fi
  run_mode "$mode"
done

# ---------------------------------------------------------------- report

ROWS="$WORK/rows.tsv"
: >"$ROWS"
for mode in "${ALL_MODES[@]}"; do
  printf '%s\t%s\t%s\t%s\t%s\t%s\n' "$mode" "${LABEL[$mode]}" "${RESULT[$mode]}" \
    "${HOFAIL[$mode]:-0}" "${OVF[$mode]:-0}" "${KEPT[$mode]:-0}" >>"$ROWS"
done

run_desc="$HANDOVERS hand-overs per mode, ${SPACING} s apart, ${LEAD} s of load before the first and ${TAIL} s after the last"
[[ $QUICK == 1 ]] && run_desc="QUICK=1: $run_desc"
{
  echo "# Replacing the proxy under load"
  echo
  echo "| | |"
  echo "|---|---|"
  echo "| date | $DATE_UTC |"
  echo "| machine | $CPU_MODEL, $NCPU CPUs, $MEM_GIB GiB RAM, Linux $KERNEL |"
  echo "| sluice | commit $COMMIT |"
  echo "| peers | HAProxy $V_HAPROXY; load: benches/connload.py on Python $V_PYTHON |"
  echo "| run | $run_desc; load: $THREADS threads, each a new connection and one \`GET /\` with \`Connection: close\` after another, ${TIMEOUT} s timeout; \"around\" = requests begun within ${WINDOW} s before a hand-over began to ${WINDOW} s after it ended |"
  echo "| load average | $LOAD_START at the start, $(cut -d' ' -f1-3 /proc/loadavg) at the end (other work on the machine skews the numbers) |"
  echo "| pinning | proxy on CPU $PROXY_CPU (taskset -c $PROXY_CPU; processes it starts inherit it); backends (2 × \`sluice web\`), load generator and the commands that drive the hand-overs on CPU $LOAD_CPU |"
  echo
  python3 - "$ROWS" "$HANDOVERS" <<'EOF'
import json, statistics, sys

rows_file, want = sys.argv[1], int(sys.argv[2])
KIND_NAMES = [("refused", "refused"), ("reset", "reset"), ("timeout", "timeout"),
              ("bad_reply", "bad reply"), ("other", "other")]

def failed(s):
    n = s["failed_total"]
    if not n:
        return "0"
    parts = [f"{s['failed'][k]} {name}" for k, name in KIND_NAMES if s["failed"][k]]
    return f"**{n}** ({', '.join(parts)})"

def ms(v):
    return "—" if v is None else (f"{v:.1f}" if v >= 10 else f"{v:.2f}")

def lat(s):
    l = s["latency_ms"]
    return f"{ms(l['p99'])} / {ms(l['max'])}"

print("| mode | hand-overs done | same listening socket after | requests (per s) | failed | p99 / max ms, whole run | requests around hand-overs | failed around | p99 / max ms, around | longest wait for a reply around, ms | hand-over took, ms (median, max) |")
print("|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
notes = []
for line in open(rows_file):
    mode, label, res, hofail, ovf, kept = line.rstrip("\n").split("\t")
    if not res.endswith(".json"):
        print(f"| {label} | {res} | | | | | | | | | |")
        continue
    d = json.load(open(res))
    o, a = d["overall"], d["around"]
    hos = d["handovers"]
    ok_hos = [h for h in hos if not h["label"].startswith("failed")]
    took = [h["duration_ms"] for h in hos]
    took_s = f"{statistics.median(took):.0f}, {max(took):.0f}" if took else "—"
    print(f"| {label} | {len(ok_hos)} of {want} | {kept} of {len(ok_hos)} | {o['total']} ({d['requests_per_s']:.0f}) | {failed(o)} "
          f"| {lat(o)} | {a['total']} | {failed(a)} | {lat(a)} | {a['longest_gap_ms']:.1f} | {took_s} |")
    if o["failed_total"]:
        det = "; ".join(f"{k}: {v}" for k, v in sorted(d["detail"].items(), key=lambda x: -x[1]) if not k.startswith("ok"))
        per = ", ".join(str(h["failed_total"]) for h in hos)
        notes.append(f"{label}: failures by kind and where: {det}. Per hand-over window: {per}.")
        if d["outside"]["failed_total"]:
            notes.append(f"{label}: {d['outside']['failed_total']} failures outside the hand-over windows.")
    odd = {k: v for k, v in d["detail"].items() if k.startswith("ok")}
    if odd:
        notes.append(f"{label}: counted as successes: {odd}.")
    if int(ovf) > 0:
        notes.append(f"{label}: the kernel dropped {ovf} connection attempts on a full listen queue during the run "
                     "(TcpExt ListenOverflows, host-wide).")
print()
print("\"longest wait for a reply\": the longest time, within one hand-over's window, between two successful replies (all threads together).")
print("\"same listening socket after\": hand-overs after which the port's listening socket was the same one (its inode, from `ss -e`), passed on rather than bound again.")
print("\"hand-over took\": from the command until the old process had exited (HAProxy -sf, sluice upgrade; sluice's includes ctl polling `/healthz` every 200 ms for that), the master had only the new worker (HAProxy reload), or the new process listened (stop + start).")
print("Latencies are of successful requests, from before `connect()` until the proxy closed the connection; failures are counted, not timed.")
for n in notes:
    print(f"NOTE\t{n}")
EOF
} >"$WORK/table.raw"

grep -v $'^NOTE\t' "$WORK/table.raw" >"$WORK/table.md"
while IFS= read -r n; do NOTES+=("$n"); done < <(sed -n $'s/^NOTE\t//p' "$WORK/table.raw")
{
  echo
  echo "How each mode is driven:"
  echo
  echo "- **sluice upgrade**: \`sluice ctl --admin http://ADMIN upgrade --binary COPY --wait 30s\`, alternating between two copies of the release binary; the hand-over ends when ctl returns, after the old process exited."
  echo "- **HAProxy master-worker reload**: \`haproxy -W -db -S master.sock -f cfg\` with \`stats socket ... level admin expose-fd listeners\`; \`reload\` sent to the master CLI socket (the same as \`kill -USR2\` on the master, per the 2.6 management guide; in master-worker mode the master passes the listeners to the new worker over its internal socket pair). The hand-over ends when the master has one worker again and it is a new one."
  echo "- **HAProxy -sf restart**: \`haproxy -db -f cfg -sf OLDPID\`, no master and no \`-x\`: the new process binds its own socket beside the old one (SO_REUSEPORT) and sends it SIGUSR1; the old one closes its listener and finishes. The hand-over ends when the old process has exited."
  echo "- **sluice stop + start**: SIGTERM, wait for the exit, start \`sluice run\` again; the hand-over ends when the new process listens. This is what the harness sees when the listening socket is closed."
  if ((${#NOTES[@]})); then
    echo
    echo "Notes:"
    echo
    for n in "${NOTES[@]}"; do
      echo "- $n"
    done
  fi
} >>"$WORK/table.md"

mkdir -p "$RESULTS"
stamp=$(date -u +%Y%m%d-%H%M%S)
[[ $QUICK == 1 ]] && stamp+="-quick"
cp "$WORK/table.md" "$RESULTS/upgrade-latest.md"
cp "$WORK/table.md" "$RESULTS/upgrade-$stamp.md"
if [[ ${KEEP_WORK:-0} == 1 ]]; then
  for mode in "${ALL_MODES[@]}"; do
    [[ -f $WORK/$mode/load.json ]] && log "${LABEL[$mode]}: $WORK/$mode/load.json"
  done
fi
cat "$WORK/table.md"
log "written: $RESULTS/upgrade-latest.md and $RESULTS/upgrade-$stamp.md"
exit "$STATUS"
