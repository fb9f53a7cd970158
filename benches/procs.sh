# shellcheck shell=bash
# Process helpers shared by benches/run.sh and benches/upgrade.sh: start
# commands pinned to a CPU, stop them (children first, TERM then KILL),
# and stop every one of them on exit. Sourced after the script defines
# log() and sets WORK; processes started here are listed in PIDS.

PIDS=()

alive() { # pid: running and not a zombie
  local st
  st=$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -d' ' -f1) || return 1
  [[ -n $st && $st != Z && $st != X ]]
}

# forget PID: no longer ours to stop (it exited; its number may be reused).
forget() {
  local keep=() p
  for p in "${PIDS[@]}"; do
    [[ $p == "$1" ]] || keep+=("$p")
  done
  PIDS=("${keep[@]}")
}

stop_pid() { # pid: TERM (children first), up to 5 s, then KILL; reaps it
  local pid=$1 i c
  [[ -n $pid ]] || return 0
  for c in $(pgrep -P "$pid" 2>/dev/null || true); do
    kill -TERM "$c" 2>/dev/null || true
  done
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < 100; i++)); do
    alive "$pid" || break
    sleep 0.05
  done
  if alive "$pid"; then
    for c in $(pgrep -P "$pid" 2>/dev/null || true); do
      kill -KILL "$c" 2>/dev/null || true
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  wait "$pid" 2>/dev/null || true
  forget "$pid"
}

# shellcheck disable=SC2317 # called by the EXIT trap
cleanup() {
  local rc=$? p
  trap - ERR EXIT INT TERM
  for ((p = ${#PIDS[@]} - 1; p >= 0; p--)); do
    stop_pid "${PIDS[p]}"
  done
  # The script's own teardown (such as a cgroup), once nothing runs in it.
  if declare -F on_cleanup >/dev/null; then on_cleanup || true; fi
  if [[ ${KEEP_WORK:-0} == 1 ]]; then
    log "logs kept in $WORK"
  else
    rm -rf "$WORK"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# start CPU LOG CMD...: starts CMD pinned to CPU in the background, its
# output appended to LOG; sets PID.
start() {
  local cpu=$1 logf=$2
  shift 2
  taskset -c "$cpu" "$@" >>"$logf" 2>&1 </dev/null &
  PID=$!
  PIDS+=("$PID")
}

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# start_nginx_http CPU DIR BODY: a one-worker nginx in DIR on a free
# loopback port that answers every request 200 with BODY and a newline,
# keeping connections alive for as long as a benchmark runs; sets PORT
# and PID. The caller waits for it to listen. NOFILE, when set, raises
# its descriptor limit.
start_nginx_http() {
  local cpu=$1 dir=$2 body=$3
  mkdir -p "$dir/tmp"
  PORT=$(free_port)
  cat >"$dir/nginx.conf" <<EOF
daemon off;
master_process off;
worker_processes 1;
${NOFILE:+worker_rlimit_nofile $NOFILE;}
pid $dir/nginx.pid;
error_log $dir/error.log warn;
events { worker_connections 4096; }
http {
    access_log off;
    keepalive_requests 1000000;
    keepalive_timeout 75s;
    client_body_temp_path $dir/tmp/body;
    proxy_temp_path $dir/tmp/proxy;
    fastcgi_temp_path $dir/tmp/fastcgi;
    uwsgi_temp_path $dir/tmp/uwsgi;
    scgi_temp_path $dir/tmp/scgi;
    server {
        listen 127.0.0.1:$PORT backlog=4096;
        location / { return 200 "$body\n"; }
    }
}
EOF
  start "$cpu" "$dir/stderr.log" nginx -p "$dir" -c "$dir/nginx.conf" -e "$dir/error.log"
}
