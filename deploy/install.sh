#!/usr/bin/env bash
# Installs meshnode on a Debian/Ubuntu VM: binary, systemd unit, user, example config.
#   sudo bash deploy/install.sh [path/to/meshnode]     (default: target/release/meshnode)
# Then: sudo meshnode join --token T ADDR --config /etc/meshnode/meshnode.toml --no-start
#       sudo systemctl enable --now meshnode
# (or copy certificates into /var/lib/meshnode and write the config by hand).
#
# ROOT=/some/dir installs into that directory as if it were / (a scratch root
# for tests or image builds): the user goes into ROOT/etc/passwd and systemd
# is not asked to reload.
set -euo pipefail
# Resolve the binary against the caller's directory, before moving to ours.
BIN=${1:-$(dirname "$0")/../target/release/meshnode}
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "install.sh: no meshnode binary at $BIN (cargo build --release -p meshnode-cli)" >&2; exit 1; }
BIN=$(realpath "$BIN")
ROOT=${ROOT:-}
if [ -n "$ROOT" ]; then ROOT=$(realpath "$ROOT"); fi
cd "$(dirname "$0")"

echo "==> binary: $ROOT/usr/local/bin/meshnode"
install -d -m 0755 "$ROOT/usr/local/bin" "$ROOT/usr/lib/sysusers.d" "$ROOT/etc/systemd/system"
install -m 0755 "$BIN" "$ROOT/usr/local/bin/meshnode"
echo "==> user: meshnode (systemd-sysusers)"
install -m 0644 meshnode.sysusers "$ROOT/usr/lib/sysusers.d/meshnode.conf"
if [ -n "$ROOT" ]; then
  install -d -m 0755 "$ROOT/etc"
  systemd-sysusers --root="$ROOT" "$ROOT/usr/lib/sysusers.d/meshnode.conf"
  # The user exists in ROOT's passwd only: own by number.
  owner=$(awk -F: '$1 == "meshnode" { print $3 ":" $4 }' "$ROOT/etc/passwd")
  [ -n "$owner" ] || { echo "install.sh: systemd-sysusers made no meshnode user in $ROOT" >&2; exit 1; }
else
  systemd-sysusers /usr/lib/sysusers.d/meshnode.conf
  owner=meshnode:meshnode
fi
echo "==> state: $ROOT/var/lib/meshnode (0700, owned by meshnode)"
install -d -m 0700 -o "${owner%%:*}" -g "${owner##*:}" "$ROOT/var/lib/meshnode"
echo "==> config dir: $ROOT/etc/meshnode (example: meshnode.example.toml)"
install -d -m 0755 "$ROOT/etc/meshnode"
install -m 0644 meshnode.example.toml "$ROOT/etc/meshnode/meshnode.example.toml"
echo "==> unit: $ROOT/etc/systemd/system/meshnode.service"
install -m 0644 meshnode.service "$ROOT/etc/systemd/system/meshnode.service"
if [ -z "$ROOT" ]; then
  systemctl daemon-reload 2>/dev/null || echo "    (systemd is not running here: run 'systemctl daemon-reload' on the VM)"
fi
"$ROOT/usr/local/bin/meshnode" validate --config "$ROOT/etc/meshnode/meshnode.example.toml" || true
echo
echo "next: meshnode join --token T ADDR --config /etc/meshnode/meshnode.toml --no-start"
echo "      (token from \`meshnode token create\` on a CA node), then:"
echo "      systemctl enable --now meshnode && systemctl status meshnode"
