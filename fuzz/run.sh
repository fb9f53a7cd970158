#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: FUZZ_SECONDS each (default
# 60), starting from a scratch copy of its committed seeds in
# fuzz/seeds/<target>/ so that the seeds stay as they are. Prints one line
# per target and exits non-zero if any target found a crash (libFuzzer
# then leaves the reproducer in fuzz/artifacts/<target>/).
#
# Needs rustup with a nightly toolchain; installs cargo-fuzz, and a C++
# compiler for libFuzzer, when missing.
#
#   bash fuzz/run.sh --check-lock    only check that fuzz/Cargo.lock is
#                                    current (seconds; scripts/test.sh runs
#                                    it first, so a stale lock fails at once)
set -euo pipefail
cd "$(dirname "$0")/.."

# cargo fuzz has no --locked: refuse if fuzz/Cargo.lock is stale.
check_lock() {
  local err
  err="$(mktemp)"
  if ! cargo +nightly metadata --locked --format-version 1 \
    --manifest-path fuzz/Cargo.toml >/dev/null 2>"$err"; then
    cat "$err" >&2
    rm -f "$err"
    echo "fuzz: fuzz/Cargo.lock does not match fuzz/Cargo.toml; refresh it: (cd fuzz && cargo +nightly metadata --format-version 1 >/dev/null)" >&2
    return 1
  fi
  rm -f "$err"
}
if [[ "${1:-}" == --check-lock ]]; then
  check_lock
  exit
fi

seconds="${FUZZ_SECONDS:-60}"
targets=(config admin proxy_header)

if ! [[ "$seconds" =~ ^[1-9][0-9]*$ ]]; then
  echo "fuzz: FUZZ_SECONDS must be a whole number of seconds, not \`$seconds\`" >&2
  exit 2
fi
if ! rustup run nightly rustc --version >/dev/null 2>&1; then
  echo "fuzz: cargo fuzz needs a nightly toolchain: rustup toolchain install nightly" >&2
  exit 2
fi
if ! command -v c++ >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq g++ >/dev/null
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
  cargo install cargo-fuzz --locked
fi

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT

check_lock

failed=0
for t in "${targets[@]}"; do
  cargo +nightly fuzz build "$t" 2>"$work/$t.build" || {
    cat "$work/$t.build" >&2
    echo "fuzz $t: FAILED to build" >&2
    exit 1
  }
  corpus="$work/corpus-$t"
  mkdir -p "$corpus"
  cp -R "fuzz/seeds/$t/." "$corpus/"
  log="$work/$t.log"
  # -timeout: a single input taking this long is a hang, reported as such.
  if cargo +nightly fuzz run "$t" "$corpus" -- \
    -max_total_time="$seconds" -timeout=30 -print_final_stats=1 >"$log" 2>&1; then
    runs="$(sed -n 's/^Done \([0-9]*\) runs in \([0-9]*\) second.*/\1 runs in \2 s/p' "$log" | tail -n1)"
    echo "fuzz $t: ok, ${runs:-no run count}, corpus $(ls "$corpus" | wc -l) inputs"
  else
    failed=1
    tail -n 60 "$log" >&2
    artifact="$(sed -n 's/.*Test unit written to \(.*\)$/\1/p' "$log" | tail -n1)"
    echo "fuzz $t: CRASH, reproducer ${artifact:-(none written; see the log above)}; rerun with: cargo +nightly fuzz run $t ${artifact:-}" >&2
  fi
done
exit "$failed"
