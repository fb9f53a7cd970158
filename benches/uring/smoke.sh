#!/usr/bin/env bash
# Correctness smoke for uring-probe, each engine in turn, and the io_uring
# one again with only 4 provided buffers and its shutdowns through the
# ring (about 10 s each): HTTP through
# nginx, a byte-exact bulk transfer both ways (once with a late reader, so
# the proxy must hold back), a half-closed client, a backend that refuses,
# and no descriptor left behind once the load has stopped. Exits 1 on the
# first failure.
#
#   benches/uring/smoke.sh              both engines
#   MODES=uring benches/uring/smoke.sh  one
#
# Needs nginx, wrk, curl and python3.

set -Eeuo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
BENCH=$(cd "$HERE/.." && pwd)
PROBE="$HERE/target/release/uring-probe"
MODES=${MODES:-"uring epoll"}
BULK_MB=${BULK_MB:-100}

log() { printf '[smoke %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }
die() { log "FAIL: $*"; exit 1; }

WORK=$(mktemp -d /tmp/uring-smoke.XXXXXX)
# shellcheck source=benches/procs.sh
. "$BENCH/procs.sh"

for t in nginx wrk curl python3 ss; do
  command -v "$t" >/dev/null || die "$t is required"
done

log "building uring-probe"
cargo build --release --quiet --manifest-path "$HERE/Cargo.toml" || die "build failed"

wait_listen() { # port pid what
  local i
  for ((i = 0; i < 200; i++)); do
    [[ -n $(ss -Hltn "sport = :$1") ]] && return 0
    alive "$2" || die "$3 exited before listening on $1"
    sleep 0.05
  done
  die "$3 is not listening on $1"
}

start_nginx() { # name -> PORT
  start_nginx_http 0-1 "$WORK/$1" "$1"
  wait_listen "$PORT" "$PID" "nginx $1"
}

start_nginx web1
WEB1=$PORT
start_nginx web2
WEB2=$PORT
ECHO=$(free_port)
start 0-1 "$WORK/echo.log" python3 "$HERE/smoke.py" echo --port "$ECHO"
wait_listen "$ECHO" "$PID" "echo server"
# Nothing listens here: every connect to it is refused.
REFUSED=$(free_port)

fds() { ls "/proc/$1/fd" | wc -l; }

# wait_fds PID WANT: up to 5 s for the descriptor count to come back.
wait_fds() {
  local i
  for ((i = 0; i < 100; i++)); do
    [[ $(fds "$1") == "$2" ]] && return 0
    sleep 0.05
  done
  return 1
}

check_mode() { # mode [extra probe arguments]
  local mode=$1 pweb pecho pref pid base out i body close hdr what
  pweb=$(free_port) pecho=$(free_port) pref=$(free_port)
  shift
  start 0-1 "$WORK/probe.$mode.log" "$PROBE" --mode "$mode" "$@" \
    --listen "127.0.0.1:$pweb" --backend "127.0.0.1:$WEB1" --backend "127.0.0.1:$WEB2" \
    --listen "127.0.0.1:$pecho" --backend "127.0.0.1:$ECHO" \
    --listen "127.0.0.1:$pref" --backend "127.0.0.1:$REFUSED"
  pid=$PID
  for p in $pweb $pecho $pref; do wait_listen "$p" "$pid" "uring-probe --mode $mode"; done
  base=$(fds "$pid")
  log "$mode: pid $pid, $base descriptors at rest"

  # (a) HTTP: the right status and length, round-robin over both backends.
  body=""
  for i in 1 2 3 4; do
    out=$(curl -sS -H 'Connection: close' -o "$WORK/body" -w '%{http_code} %{size_download}' "http://127.0.0.1:$pweb/") ||
      die "$mode: curl failed"
    [[ $out == "200 5" ]] || die "$mode: curl got '$out', expected '200 5'"
    body+=$(cat "$WORK/body")
  done
  [[ $body == web1web2web1web2 || $body == web2web1web2web1 ]] || die "$mode: not round-robin: $body"
  for close in 0 1; do
    hdr=(-H "Connection: keep-alive") what=keep-alive
    ((close)) && hdr=(-H "Connection: close") what="Connection: close"
    wrk -t1 -c20 -d3s "${hdr[@]}" "http://127.0.0.1:$pweb/" >"$WORK/wrk.txt" 2>&1 || die "$mode: wrk failed"
    grep -qE 'Socket errors|Non-2xx' "$WORK/wrk.txt" && die "$mode: wrk $what: $(grep -E 'Socket errors|Non-2xx' "$WORK/wrk.txt")"
    log "$mode: wrk $what: $(awk '/^Requests\/sec/ {print $2}' "$WORK/wrk.txt") requests/s, no errors"
  done
  wait_fds "$pid" "$base" || die "$mode: $(fds "$pid") descriptors after wrk, $base at rest (leak)"

  # (b) Bulk, byte-exact both ways; then with a late reader.
  python3 "$HERE/smoke.py" bulk --port "$pecho" --mb "$BULK_MB" || die "$mode: bulk"
  python3 "$HERE/smoke.py" bulk --port "$pecho" --mb 20 --delay-read 1 || die "$mode: bulk with a late reader"

  # (c) A half-closed client still gets its reply: echo, and HTTP/1.0.
  python3 "$HERE/smoke.py" halfclose --port "$pecho" --payload "hello, half-closed" --expect "hello, half-closed" ||
    die "$mode: half-close (echo)"
  python3 "$HERE/smoke.py" halfclose --port "$pweb" --payload 'GET / HTTP/1.0\r\n\r\n' --expect "200 OK" ||
    die "$mode: half-close (HTTP)"

  # (d) A refused backend connect closes the client.
  python3 "$HERE/smoke.py" refused --port "$pref" || die "$mode: refused backend"

  # (e) Idle connections hold two descriptors each and release them,
  # closed by a FIN or a reset; nothing is left after the whole run.
  python3 "$HERE/smoke.py" idle --port "$pecho" --count 200 --pid "$pid" --base "$base" || die "$mode: idle"
  wait_fds "$pid" "$base" || die "$mode: $(fds "$pid") descriptors at the end, $base at rest (leak)"
  alive "$pid" || die "$mode: the probe exited"
  if [[ -s $WORK/probe.$mode.log ]]; then
    log "$mode: the probe logged: $(sort "$WORK/probe.$mode.log" | uniq -c | head -n 5 | tr '\n' ';')"
  fi
  log "$mode: all checks passed, $(fds "$pid") descriptors at the end"
  stop_pid "$pid"
}

for m in $MODES; do
  check_mode "$m"
  if [[ $m == uring ]]; then
    # Again with fewer buffers than one direction may queue, so that
    # receives run the ring dry (ENOBUFS) and must be re-armed; and with
    # the shutdown through the ring.
    log "uring with 4 provided buffers and --shutdown ring"
    check_mode uring --buffers 4 --shutdown ring
  fi
done
log "PASS: $MODES"
