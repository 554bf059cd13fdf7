#!/usr/bin/env bash
# Installs meshnode on a Debian/Ubuntu VM: binary, systemd unit, user, example config.
#   sudo bash deploy/install.sh [path/to/meshnode]     (default: target/release/meshnode)
# Then: sudo meshnode join --token T ADDR --config /etc/meshnode/meshnode.toml --no-start
#       sudo systemctl enable --now meshnode
# (or copy certificates into /var/lib/meshnode and write the config by hand).
set -euo pipefail
cd "$(dirname "$0")"
BIN=${1:-../target/release/meshnode}
[ "$(id -u)" -eq 0 ] || { echo "install.sh: run as root" >&2; exit 1; }
[ -x "$BIN" ] || { echo "install.sh: no meshnode binary at $BIN (cargo build --release -p meshnode-cli)" >&2; exit 1; }

echo "==> binary: /usr/local/bin/meshnode"
install -m 0755 "$BIN" /usr/local/bin/meshnode
echo "==> user: meshnode (systemd-sysusers)"
install -m 0644 meshnode.sysusers /usr/lib/sysusers.d/meshnode.conf
systemd-sysusers /usr/lib/sysusers.d/meshnode.conf
echo "==> state: /var/lib/meshnode (0700, owned by meshnode)"
install -d -m 0700 -o meshnode -g meshnode /var/lib/meshnode
echo "==> config dir: /etc/meshnode (example: meshnode.example.toml)"
install -d -m 0755 /etc/meshnode
install -m 0644 meshnode.example.toml /etc/meshnode/meshnode.example.toml
echo "==> unit: /etc/systemd/system/meshnode.service"
install -m 0644 meshnode.service /etc/systemd/system/meshnode.service
systemctl daemon-reload 2>/dev/null || echo "    (systemd is not running here: run 'systemctl daemon-reload' on the VM)"
/usr/local/bin/meshnode validate --config /etc/meshnode/meshnode.example.toml || true
echo
echo "next: meshnode join --token T ADDR --config /etc/meshnode/meshnode.toml --no-start"
echo "      (token from \`meshnode token create\` on a CA node), then:"
echo "      systemctl enable --now meshnode && systemctl status meshnode"
