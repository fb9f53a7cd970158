#!/usr/bin/env bash
# A property-based run of the admin API against its OpenAPI document
# (src/admin/openapi.json, served at GET /openapi.json) with schemathesis:
# the debug binary runs `sluice run` over two `sluice web` backends on free
# loopback ports, and schemathesis sends each operation generated requests,
# valid and invalid, failing on a 5xx or on a reply whose status, content
# type or body the document does not allow. scripts/test.sh calls it after
# `cargo test`; it also runs alone:
#
#   bash scripts/schemathesis.sh
#   ST_MAX_EXAMPLES=200 bash scripts/schemathesis.sh   more cases per operation
#   ST_SEED=1234 bash scripts/schemathesis.sh          replay a run's seed
#
# schemathesis goes into a virtualenv under target/ (python3 -m venv;
# Debian's python3-venv, which scripts/test.sh installs).
#
# Bounded: `wait=` on a drain holds the reply until the backend has no
# connection, and no client connects through sluice here, so every drain is
# over at once whatever wait= schemathesis draws; --request-timeout and an
# overall timeout catch a reply that hangs anyway, as a failure.
set -euo pipefail
cd "$(dirname "$0")/.."

version=4.32.5
venv=target/schemathesis-venv
st="$PWD/$venv/bin/schemathesis"
if ! "$st" --version 2>/dev/null | grep -qF "$version"; then
  python3 -m venv "$venv" || {
    echo "scripts/schemathesis.sh: python3 -m venv failed; install python3-venv (apt-get install python3-venv)" >&2
    exit 1
  }
  "$venv/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$version"
fi

cargo build --locked --quiet
bin=target/debug/sluice

work=$(mktemp -d)
pids=()
cleanup() {
  for pid in "${pids[@]}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${pids[@]}"; do
    wait "$pid" 2>/dev/null || true
  done
  rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# Waits until file $1 has a line matching the extended regex $2, and prints
# the match's last field (an address); fails after 30 s.
address_in() {
  for _ in $(seq 300); do
    if line=$(grep -Eo "$2" "$1" 2>/dev/null | head -n1) && [ -n "$line" ]; then
      echo "${line##*[ =]}"
      return 0
    fi
    sleep 0.1
  done
  echo "scripts/schemathesis.sh: no line matching '$2' in $1:" >&2
  cat "$1" >&2
  return 1
}

for name in web1 web2; do
  "$bin" web --listen 127.0.0.1:0 --name "$name" >"$work/$name.log" 2>&1 &
  pids+=($!)
done
web1=$(address_in "$work/web1.log" 'listening on [0-9.:]+')
web2=$(address_in "$work/web2.log" 'listening on [0-9.:]+')

# A state file, so that replies carry `saved` and its schema is checked too.
cat >"$work/sluice.toml" <<EOF
shutdown_grace = "1s"
state_file = "$work/state.json"

[admin]
listen = "127.0.0.1:0"

[[service]]
name = "web"
listen = "127.0.0.1:0"

[[backend]]
name = "web1"
address = "$web1"

[[backend]]
name = "web2"
address = "$web2"
EOF
RUST_LOG=info "$bin" run --config "$work/sluice.toml" >"$work/sluice.log" 2>&1 &
pids+=($!)
admin=$(address_in "$work/sluice.log" 'admin API listening listen=[0-9.:]+')

"$venv/bin/python" - "$admin" <<'EOF'
import sys, time, urllib.request
url = f"http://{sys.argv[1]}/healthz"
for _ in range(300):
    try:
        with urllib.request.urlopen(url, timeout=1) as r:
            if r.status == 200:
                sys.exit(0)
    except OSError:
        pass
    time.sleep(0.1)
sys.exit(f"scripts/schemathesis.sh: {url} does not answer 200")
EOF

seed=()
if [ -n "${ST_SEED:-}" ]; then
  seed=(--seed "$ST_SEED")
fi
status=0
# POST /upgrade is left out: it would replace the sluice under test with a
# new process (tests/upgrade.rs tests it). So are POST /leave and /join: a
# leave turns /healthz to 503 on purpose, and holds a wait= reply for its
# 5 s settle (tests/leave.rs and tests/openapi.rs test them). So is GET
# /events: its reply is a stream that does not end while sluice serves, so
# each call would hang until the client gives up (tests/events.rs and
# tests/openapi.rs test it). Run from the work directory:
# schemathesis keeps its cache (.schemathesis/)
# in the current one, and it goes away with the rest.
(
  cd "$work"
  timeout 150 "$st" run "http://$admin/openapi.json" \
    --checks not_a_server_error,status_code_conformance,content_type_conformance,response_schema_conformance \
    --max-examples "${ST_MAX_EXAMPLES:-50}" \
    --request-timeout 10 \
    --generation-database none \
    --workers 2 \
    --no-color \
    --exclude-path /upgrade \
    --exclude-path /leave \
    --exclude-path /join \
    --exclude-path /events \
    "${seed[@]}"
) || status=$?
if [ "$status" -ne 0 ]; then
  [ "$status" -eq 124 ] && echo "scripts/schemathesis.sh: schemathesis did not finish within 150 s" >&2
  echo "--- sluice log (last 50 lines) ---" >&2
  tail -n 50 "$work/sluice.log" >&2
  exit "$status"
fi
# The API kept serving throughout.
if ! kill -0 "${pids[2]}" 2>/dev/null; then
  echo "scripts/schemathesis.sh: sluice exited during the run" >&2
  tail -n 50 "$work/sluice.log" >&2
  exit 1
fi
