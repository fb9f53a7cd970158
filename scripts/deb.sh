#!/usr/bin/env bash
# Builds the Debian package and checks it: the release binary, the systemd
# unit, /etc/sluice/sluice.toml, the example configs, the man pages and the
# bash, zsh and fish completions (all generated from the binary first),
# then unpacks it into a throwaway root and runs the packaged binary's
# --version and `check` on the packaged config.
#
#   bash scripts/deb.sh      -> target/debian/sluice_VERSION-1_ARCH.deb
#
# cargo-deb is installed with `cargo install cargo-deb --locked` if missing.
set -euo pipefail
cd "$(dirname "$0")/.."

command -v cargo-deb >/dev/null || cargo install cargo-deb --locked
cargo build --release --locked
bin=target/release/sluice

out=target/package
rm -rf "$out"
mkdir -p "$out/man" "$out/completions"
"$bin" man --dir "$out/man" >/dev/null
gzip -9n "$out"/man/*.1
"$bin" completions bash >"$out/completions/sluice"
"$bin" completions zsh >"$out/completions/_sluice"
"$bin" completions fish >"$out/completions/sluice.fish"

deb=$(cargo deb --no-build --locked | tail -n1)
echo "built $deb"

# What the package holds.
contents=$(dpkg-deb -c "$deb" | awk '{print $NF}')
for want in \
  ./usr/bin/sluice \
  ./lib/systemd/system/sluice.service \
  ./etc/sluice/sluice.toml \
  ./usr/share/doc/sluice/examples/web-80-443.toml \
  ./usr/share/man/man1/sluice.1.gz \
  ./usr/share/man/man1/sluice-ctl-drain.1.gz \
  ./usr/share/bash-completion/completions/sluice \
  ./usr/share/zsh/vendor-completions/_sluice \
  ./usr/share/fish/vendor_completions.d/sluice.fish; do
  if ! grep -qxF "$want" <<<"$contents"; then
    echo "scripts/deb.sh: $deb lacks $want" >&2
    exit 1
  fi
done
# An upgrade of the package keeps an admin's edits to the config.
if ! dpkg-deb -I "$deb" conffiles | grep -qxF /etc/sluice/sluice.toml; then
  echo "scripts/deb.sh: /etc/sluice/sluice.toml is not a conffile" >&2
  exit 1
fi

# Unpacked into a throwaway root, the packaged binary runs and accepts
# the packaged config (the file alone: this machine has no /var/lib/sluice).
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT
dpkg-deb -x "$deb" "$root"
"$root/usr/bin/sluice" --version
"$root/usr/bin/sluice" check --file-only --config "$root/etc/sluice/sluice.toml"
echo "scripts/deb.sh: $deb is whole"
