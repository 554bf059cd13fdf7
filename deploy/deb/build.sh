#!/usr/bin/env bash
# Builds the Debian package from a binary that is already built (CI packages
# the one it tested; no second build):
#   bash deploy/deb/build.sh target/release/meshnode [OUTDIR]   -> OUTDIR/meshnode_<version>_<arch>.deb
# Completions and man pages come from the binary itself (clap_complete,
# clap_mangen), so they match its command line.
set -euo pipefail
bin=$(realpath "$1")
out=$(realpath -m "${2:-target/deb}")
cd "$(dirname "$0")/../.."
[ -x "$bin" ] || { echo "no executable at $bin" >&2; exit 64; }
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
stage=$(mktemp -d)
trap 'rm -rf "$stage"' EXIT

install -D -m0755 "$bin" "$stage/usr/bin/meshnode"
strip --strip-debug "$stage/usr/bin/meshnode"
sed 's#/usr/local/bin/meshnode#/usr/bin/meshnode#g' deploy/meshnode.service \
  | install -D -m0644 /dev/stdin "$stage/lib/systemd/system/meshnode.service"
install -D -m0644 deploy/meshnode.sysusers "$stage/usr/lib/sysusers.d/meshnode.conf"
install -D -m0644 deploy/meshnode.tmpfiles "$stage/usr/lib/tmpfiles.d/meshnode.conf"
{
  echo "# meshnode: packaged example (meshnode join replaces this file)"
  cat deploy/meshnode.example.toml
} | install -D -m0644 /dev/stdin "$stage/etc/meshnode/meshnode.toml"

"$bin" completions bash | install -D -m0644 /dev/stdin "$stage/usr/share/bash-completion/completions/meshnode"
"$bin" completions zsh | install -D -m0644 /dev/stdin "$stage/usr/share/zsh/vendor-completions/_meshnode"
"$bin" completions fish | install -D -m0644 /dev/stdin "$stage/usr/share/fish/vendor_completions.d/meshnode.fish"
"$bin" man --out "$stage/usr/share/man/man1" 2>/dev/null
gzip -9n "$stage"/usr/share/man/man1/*.1

install -d "$stage/usr/share/doc/meshnode"
cat > "$stage/usr/share/doc/meshnode/copyright" <<COPY
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: meshnode
Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
COPY

install -d "$stage/DEBIAN"
for s in postinst prerm postrm; do
  install -m0755 "deploy/deb/$s" "$stage/DEBIAN/$s"
done
echo /etc/meshnode/meshnode.toml > "$stage/DEBIAN/conffiles"
size=$(du -sk --exclude=DEBIAN "$stage" | cut -f1)
cat > "$stage/DEBIAN/control" <<CONTROL
Package: meshnode
Version: $version
Architecture: $arch
Maintainer: meshnode developers <meshnode@localhost>
Installed-Size: $size
Depends: libc6 (>= 2.34), systemd, procps
Section: net
Priority: optional
Description: multi-cluster service mesh node in one binary
 Gossip discovery over QUIC, mutual-TLS tunnels, gateway federation between
 clusters and a one-command join. Run 'meshnode join' to give this machine an
 identity, then 'systemctl enable --now meshnode'.
CONTROL
mkdir -p "$out"
deb="$out/meshnode_${version}_${arch}.deb"
dpkg-deb --root-owner-group -Zxz --build "$stage" "$deb" >/dev/null
echo "$deb"
