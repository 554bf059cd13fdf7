#!/usr/bin/env bash
# Builds the OCI image with Debian's buildah, from scratch: the binary, exactly
# the shared libraries `ldd` names, a passwd entry for the non-root user
# 65532, and the data dir. No base image is downloaded.
#   bash deploy/oci/build.sh target/release/meshnode [IMAGE]   (default localhost/meshnode:<version>)
set -euo pipefail
bin=$(realpath "$1")
cd "$(dirname "$0")/../.."
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image=${2:-localhost/meshnode:$version}
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
uid=65532
ctr=$(buildah from scratch)
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
root=$(buildah mount "$ctr")
install -D -m0755 "$bin" "$root/usr/bin/meshnode"
strip --strip-debug "$root/usr/bin/meshnode"
for lib in $(ldd "$bin" | grep -o '/[^ ]*'); do
  install -D -m0755 "$(readlink -f "$lib")" "$root$lib"
done
install -d -m0755 "$root/etc/meshnode"
install -d -m0700 -o "$uid" -g "$uid" "$root/var/lib/meshnode"
install -d -m1777 "$root/tmp"
echo "meshnode:x:$uid:$uid:meshnode agent:/var/lib/meshnode:/nonexistent" > "$root/etc/passwd"
echo "meshnode:x:$uid:" > "$root/etc/group"
buildah umount "$ctr" >/dev/null
buildah config \
  --user "$uid:$uid" \
  --workingdir /var/lib/meshnode \
  --entrypoint '["/usr/bin/meshnode"]' \
  --cmd '["run", "--config", "/etc/meshnode/meshnode.toml"]' \
  --port 9470/udp \
  --volume /var/lib/meshnode \
  --env MESHNODE_LOG_FORMAT=json \
  --label org.opencontainers.image.title=meshnode \
  --label "org.opencontainers.image.version=$version" \
  --label org.opencontainers.image.licenses=Apache-2.0 \
  "$ctr"
buildah commit --quiet "$ctr" "$image" >/dev/null
echo "$image"
