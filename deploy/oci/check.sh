#!/usr/bin/env bash
# Checks the image deploy/oci/build.sh made: it runs `meshnode --version`
# inside it (buildah's chroot isolation: this CI machine's cgroup layout
# rules out crun), as the image's non-root user, and holds nothing but the
# binary, its libraries, passwd/group and the empty directories.
#   bash deploy/oci/check.sh IMAGE
set -euo pipefail
image=$1
export STORAGE_DRIVER=${STORAGE_DRIVER:-vfs}
fail() { echo "FAIL: $*" >&2; exit 1; }
ctr=$(buildah from "$image")
trap 'buildah rm "$ctr" >/dev/null 2>&1 || true' EXIT
user=$(buildah inspect --format '{{.OCIv1.Config.User}}' "$image")
[ "$user" = "65532:65532" ] || fail "image user is $user, not 65532"
version=$(buildah run --isolation chroot "$ctr" -- /usr/bin/meshnode --version)
echo "inside the image: $version"
grep -q '^meshnode ' <<<"$version" || fail "meshnode --version said: $version"
# Writes as the image's user: a CA made in /tmp belongs to 65532.
buildah run --isolation chroot "$ctr" -- /usr/bin/meshnode ca init --mesh acme --out /tmp/ca >/dev/null
root=$(buildah mount "$ctr")
owner=$(stat -c '%u' "$root/tmp/ca/ca.key")
[ "$owner" = 65532 ] || fail "files written in the container belong to uid $owner"
buildah umount "$ctr" >/dev/null
# The layout, from a fresh container (`buildah run` adds /etc/hosts and friends).
fresh=$(buildah from "$image")
root=$(buildah mount "$fresh")
files=$(cd "$root" && find . -type f | sort)
expected=$(printf '%s\n' ./etc/group ./etc/passwd ./usr/bin/meshnode \
  $(ldd "$root/usr/bin/meshnode" | grep -o '/[^ ]*' | sed 's#^#.#') | sort)
buildah umount "$fresh" >/dev/null
buildah rm "$fresh" >/dev/null
[ "$files" = "$expected" ] || fail "unexpected files in the image:
$(diff <(echo "$expected") <(echo "$files") || true)"
echo "image checks passed ($(echo "$files" | wc -l) files)"
