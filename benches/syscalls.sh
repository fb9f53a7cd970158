#!/usr/bin/env bash
# System calls per proxied connection, counted exactly by strace: the
# measure for the per-connection levers, which move a cost too small for
# a timed run to tell from noise.
#
#   benches/syscalls.sh                 sluice and HAProxy, 2,000 connections
#   N=5000 TARGETS=sluice benches/syscalls.sh
#   SLUICE=/path/to/sluice benches/syscalls.sh     another build
#
# Each connection sends one `Connection: close` request to nginx through
# the proxy and reads the reply to its end; one at a time, so every count
# is per connection (under load, epoll_wait and the accept that finds the
# queue empty are shared by several). Needs nginx, strace and, for the
# HAProxy column, haproxy.
set -euo pipefail
cd "$(dirname "$0")/.."

N=${N:-2000}
TARGETS=${TARGETS:-"sluice haproxy"}
SLUICE=${SLUICE:-target/release/sluice}
WORK=$(mktemp -d /tmp/sluice-syscalls.XXXXXX)
log() { printf '[syscalls] %s\n' "$*" >&2; }
# shellcheck source=benches/procs.sh
. benches/procs.sh

for cmd in nginx strace python3; do
  command -v "$cmd" >/dev/null || { log "$cmd is not installed (apt-get install $cmd)"; exit 1; }
done
if [[ $TARGETS == *sluice* && ! -x $SLUICE ]]; then
  cargo build --release --quiet
fi

wait_port() { # port
  local i
  for ((i = 0; i < 100; i++)); do
    python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null && return 0
    sleep 0.1
  done
  log "nothing listens on port $1"
  return 1
}

start_nginx_http 1 "$WORK/nginx" hello
BE=$PORT
wait_port "$BE"

# count TARGET: prints "syscall per-connection" lines, most first.
count() {
  local t=$1 port proxy
  port=$(free_port)
  case $t in
    sluice)
      cat >"$WORK/sluice.toml" <<EOF
workers = 1
[admin]
listen = "127.0.0.1:$(free_port)"
[[service]]
name = "web"
listen = "127.0.0.1:$port"
backends = ["a"]
[[backend]]
name = "a"
address = "127.0.0.1:$BE"
health_check = "none"
EOF
      start 0 "$WORK/sluice.log" env RUST_LOG=warn "$SLUICE" run --config "$WORK/sluice.toml"
      ;;
    haproxy)
      cat >"$WORK/haproxy.cfg" <<EOF
global
  nbthread 1
defaults
  mode tcp
  timeout connect 5s
  timeout client 60s
  timeout server 60s
listen web
  bind 127.0.0.1:$port
  server a 127.0.0.1:$BE
EOF
      start 0 "$WORK/haproxy.log" haproxy -db -f "$WORK/haproxy.cfg"
      ;;
    *)
      log "unknown target $t (sluice or haproxy)"
      return 1
      ;;
  esac
  proxy=$PID
  wait_port "$port"
  strace -f -c -o "$WORK/$t.strace" -p "$proxy" 2>/dev/null &
  local tracer=$!
  # strace says nothing once attached: wait until it shows in the
  # proxy's status as its tracer.
  local i
  for ((i = 0; i < 100; i++)); do
    [[ $(awk '/^TracerPid:/ {print $2}' "/proc/$proxy/status") != 0 ]] && break
    sleep 0.05
  done
  python3 - "$port" "$N" <<'EOF'
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    s = socket.create_connection(("127.0.0.1", port))
    s.sendall(b"GET / HTTP/1.1\r\nHost: bench\r\nConnection: close\r\n\r\n")
    got = b""
    while chunk := s.recv(4096):
        got += chunk
    assert got.startswith(b"HTTP/1.1 200"), got[:40]
    s.close()
EOF
  kill -INT "$tracer"
  wait "$tracer" 2>/dev/null || true
  stop_pid "$proxy"
  awk -v n="$N" -v t="$t" '
    $NF == "total" { next }
    $4 ~ /^[0-9]+$/ && $4 >= n / 2 { per[$NF] = $4 / n; sum += $4 / n; if ($NF != "epoll_wait") calls += $4 / n }
    END {
      for (c in per) printf "%s %-14s %6.2f\n", t, c, per[c] | "sort -k3 -nr"
      close("sort -k3 -nr")
      printf "%s %-14s %6.2f\n", t, "all", sum
      printf "%s %-14s %6.2f\n", t, "all_but_wait", calls
    }' "$WORK/$t.strace"
}

for t in $TARGETS; do
  count "$t"
done
