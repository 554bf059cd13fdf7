#!/usr/bin/env bash
# Prints the path of a promtool: the one on PATH, else Debian's, unpacked
# from the prometheus package into /var/cache/meshnode-ci/promtool (no
# install, so no Prometheus server is set up or started).
set -euo pipefail
if command -v promtool >/dev/null 2>&1; then
  command -v promtool
  exit 0
fi
dir=/var/cache/meshnode-ci/promtool
if [ ! -x "$dir/usr/bin/promtool" ]; then
  mkdir -p "$dir"
  (cd "$dir" && apt-get download prometheus >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null && apt-get download prometheus >/dev/null; })
  deb=$(ls "$dir"/prometheus_*.deb | head -n 1)
  (cd "$dir" && dpkg-deb --fsys-tarfile "$deb" | tar -x ./usr/bin/promtool)
  rm -f "$dir"/prometheus_*.deb
fi
echo "$dir/usr/bin/promtool"
