#!/usr/bin/env bash
# Checks the Debian package in a scratch Debian 12 root (debootstrap from the
# Debian registry): contents, install, the unit (systemd-analyze verify),
# `meshnode join --no-start` against a CA node on loopback, upgrade over
# itself (a changed conffile is kept), remove, purge.
#   sudo bash deploy/deb/check.sh target/deb/meshnode_<version>_<arch>.deb
set -euo pipefail
deb=$(realpath "$1")
here=$(cd "$(dirname "$0")/../.." && pwd)
bin=${MESHNODE_BIN:-$here/target/debug/meshnode}
bin=$(realpath "$bin")
root=${MESHNODE_DEB_ROOT:-/var/cache/meshnode-ci/bookworm}
fail() { echo "FAIL: $*" >&2; exit 1; }
step() { echo "-- $*"; }

if [ ! -x "$root/usr/bin/apt-get" ] || [ ! -x "$root/usr/bin/systemd-analyze" ]; then
  command -v debootstrap >/dev/null || {
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends debootstrap >/dev/null
  }
  step "debootstrap a Debian 12 root in $root (once; kept for later runs)"
  rm -rf "$root" && mkdir -p "$root"
  debootstrap --variant=minbase --include=systemd bookworm "$root" http://deb.debian.org/debian >/dev/null
fi

work=$(mktemp -d)
ca_pid=
cleanup() {
  [ -n "$ca_pid" ] && kill "$ca_pid" 2>/dev/null || true
  umount "$root/proc" 2>/dev/null || true
  rm -rf "$work" "$root/tmp/meshnode.deb"
}
trap cleanup EXIT
mountpoint -q "$root/proc" || mount -t proc proc "$root/proc"
in_root() { chroot "$root" "$@"; }

step "contents"
listing=$(dpkg-deb --contents "$deb")
for f in ./usr/bin/meshnode ./lib/systemd/system/meshnode.service \
         ./usr/lib/sysusers.d/meshnode.conf ./usr/lib/tmpfiles.d/meshnode.conf \
         ./etc/meshnode/meshnode.toml ./usr/share/man/man1/meshnode.1.gz \
         ./usr/share/man/man1/meshnode-join.1.gz \
         ./usr/share/bash-completion/completions/meshnode \
         ./usr/share/zsh/vendor-completions/_meshnode \
         ./usr/share/fish/vendor_completions.d/meshnode.fish \
         ./usr/share/doc/meshnode/copyright; do
  grep -q " $f\$" <<<"$listing" || fail "$f is not in the package"
done
grep -q ' root/root .* ./usr/bin/meshnode$' <<<"$listing" || fail "files must belong to root"
[ "$(dpkg-deb --ctrl-tarfile "$deb" | tar -xO ./conffiles)" = /etc/meshnode/meshnode.toml ] || fail "conffiles"

step "install (apt install ./meshnode_*.deb)"
cp /etc/resolv.conf "$root/etc/resolv.conf"
in_root apt-get update -qq >/dev/null
cp "$deb" "$root/tmp/meshnode.deb"
in_root sh -c 'cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq ./meshnode.deb' >/dev/null
in_root /usr/bin/meshnode --version
in_root getent passwd meshnode >/dev/null || fail "no meshnode user"
[ "$(in_root stat -c '%U %a' /var/lib/meshnode)" = "meshnode 700" ] || fail "data dir: $(in_root stat -c '%U %a' /var/lib/meshnode)"
verify=$(in_root systemd-analyze verify /lib/systemd/system/meshnode.service 2>&1) || fail "verify: $verify"
[ -z "$verify" ] || fail "systemd-analyze verify: $verify"
enabled=$(in_root systemctl is-enabled meshnode.service 2>/dev/null || true)
[ "$enabled" = disabled ] || fail "the unit must not be enabled before join (is-enabled: $enabled)"
in_root sh -c 'man -w meshnode >/dev/null 2>&1 || test -f /usr/share/man/man1/meshnode.1.gz'

step "join --no-start against a CA node on loopback"
"$bin" ca init --mesh acme --out "$work/ca" >/dev/null
"$bin" cert issue --ca "$work/ca" --cluster east --node ca-1 --out "$work/ca-1" >/dev/null
port=$((20000 + RANDOM % 20000))
admin=127.0.0.1:$((port + 1))
cat > "$work/ca-1/meshnode.toml" <<CFG
node = "ca-1"
cluster = "east"
mesh = "acme"
data_dir = "$work/ca-1"
bind = "127.0.0.1:$port"
admin = "$admin"
[ca]
key = "$work/ca/ca.key"
CFG
MESHNODE_LOG=warn "$bin" run --config "$work/ca-1/meshnode.toml" >"$work/ca.log" 2>&1 &
ca_pid=$!
for _ in $(seq 100); do
  "$bin" status --admin "$admin" >/dev/null 2>&1 && break
  sleep 0.1
done
token=$("$bin" token create --admin "$admin" --data-dir "$work/ca-1")
in_root /usr/bin/meshnode join --token "$token" "127.0.0.1:$port" --node pkg-1 \
  --no-start --config /etc/meshnode/meshnode.toml --data-dir /var/lib/meshnode >/dev/null
grep -q '^node = "pkg-1"' "$root/etc/meshnode/meshnode.toml" || fail "join did not replace the packaged example config"
[ "$(in_root stat -c '%U %a' /var/lib/meshnode/node.key)" = "meshnode 600" ] || fail "node.key must be the agent user's, 0600"
in_root /usr/bin/meshnode validate --config /etc/meshnode/meshnode.toml | grep -q valid || fail "the joined config does not validate"

step "upgrade over itself: the joined config (a changed conffile) stays"
sum=$(sha256sum "$root/etc/meshnode/meshnode.toml")
in_root sh -c 'cd /tmp && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --reinstall -o Dpkg::Options::=--force-confold ./meshnode.deb' >/dev/null
[ "$(sha256sum "$root/etc/meshnode/meshnode.toml")" = "$sum" ] || fail "upgrade changed the config"
[ -f "$root/var/lib/meshnode/node.key" ] || fail "upgrade lost the identity"

step "remove: binary gone, config and identity kept"
in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get remove -y -qq meshnode' >/dev/null
[ ! -e "$root/usr/bin/meshnode" ] || fail "binary left after remove"
[ -f "$root/etc/meshnode/meshnode.toml" ] && [ -f "$root/var/lib/meshnode/node.key" ] || fail "remove must keep config and identity"

step "purge: config and state gone"
in_root sh -c 'DEBIAN_FRONTEND=noninteractive apt-get purge -y -qq meshnode' >/dev/null
[ ! -e "$root/etc/meshnode/meshnode.toml" ] || fail "config left after purge"
[ ! -e "$root/var/lib/meshnode" ] || fail "state left after purge"
echo "package checks passed"
