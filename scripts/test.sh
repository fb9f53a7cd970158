#!/usr/bin/env bash
# The whole test run, from a fresh machine: installs what the tests need
# (real nginx, curl, iproute2 and nftables for the network-namespace fault
# tests, keepalived for the pair behind a floating address, kmod to load
# netem, a C++ compiler for libFuzzer, python3-venv for schemathesis,
# systemd for `systemd-analyze verify` of the unit, etcd for the cluster
# tests, protoc to build etcd's client, prometheus, whose server scrapes
# /metrics in tests/metrics.rs, and Chromium and chromedriver for the
# dashboard's browser test, and docker-compose to check the compose file
# without a container engine), runs
# every test, runs schemathesis against the admin
# API's OpenAPI document, then fuzzes each target for a bounded time.
# `.ci/run` calls exactly this; README gives it as the test command.
#
#   bash scripts/test.sh                          everything (fuzz: 60 s a target)
#   FUZZ_SECONDS=10 bash scripts/test.sh          a shorter fuzz run
#   SKIP_FUZZ=1 bash scripts/test.sh              no fuzz run
#   SKIP_SCHEMATHESIS=1 bash scripts/test.sh      no schemathesis run
#   SKIP_DEB=1 bash scripts/test.sh               no Debian package build
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the tests use, by the command each provides.
declare -A packages=([nginx]=nginx [curl]=curl [ip]=iproute2 [tc]=iproute2 [nft]=nftables
  [keepalived]=keepalived [modprobe]=kmod [c++]=g++ [systemd-analyze]=systemd
  [etcd]=etcd-server [protoc]=protobuf-compiler [prometheus]=prometheus [promtool]=prometheus
  [chromium]=chromium [chromedriver]=chromium-driver [docker-compose]=docker-compose)
need=()
for cmd in "${!packages[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || need+=("${packages[$cmd]}")
done
# schemathesis goes into a virtualenv, and Debian keeps venv's ensurepip
# in python3-venv (which brings python3).
if [ "${SKIP_SCHEMATHESIS:-0}" != 1 ] && ! python3 -c 'import ensurepip, venv' >/dev/null 2>&1; then
  need+=(python3-venv)
fi
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "scripts/test.sh: missing ${need[*]}; install them (as root: apt-get install ${need[*]}) and run again" >&2
    exit 1
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq $(printf '%s\n' "${need[@]}" | sort -u) >/dev/null
  # The tests start their own Prometheus on a loopback port; the package's
  # service (and the node exporter it recommends), where the install
  # started them, would only run on.
  if [[ " ${need[*]} " == *" prometheus "* ]]; then
    for s in prometheus prometheus-node-exporter; do
      { systemctl disable --now "$s" || service "$s" stop; } >/dev/null 2>&1 || true
    done
  fi
fi

# netem is a module on stock kernels; where it cannot be loaded, the lossy
# link test (tests/netns.rs) drops packets with nftables instead.
modprobe sch_netem 2>/dev/null || true

# A stale fuzz/Cargo.lock (the fuzz crate builds sluice, so a new
# dependency changes it) fails now, not after every test has run.
if [ "${SKIP_FUZZ:-0}" != 1 ] && rustup run nightly rustc --version >/dev/null 2>&1; then
  bash fuzz/run.sh --check-lock
fi

# Cluster mode is a feature (its etcd client needs protoc to build): the
# tests run with it, and the default build, which README's run command
# makes, must still compile.
cargo check --locked
cargo test --locked --features cluster

# The compose file parses and refers to what exists (no engine needed).
SLUICE_TOKEN=check docker-compose --file docker-compose.yml config --quiet

# A property-based run of the admin API against its OpenAPI document, so a
# 5xx or a reply the document does not allow fails the run
# (scripts/schemathesis.sh).
if [ "${SKIP_SCHEMATHESIS:-0}" != 1 ]; then
  bash scripts/schemathesis.sh
fi

# The Debian package, built and checked: its contents, and its binary run
# from a throwaway root on its own config (scripts/deb.sh).
if [ "${SKIP_DEB:-0}" != 1 ]; then
  bash scripts/deb.sh
fi

# Fuzz the config parser and the admin API's request path, so a panic or
# a 5xx that slipped past the tests fails the run (fuzz/run.sh).
if [ "${SKIP_FUZZ:-0}" != 1 ]; then
  FUZZ_SECONDS="${FUZZ_SECONDS:-60}" bash fuzz/run.sh
fi
