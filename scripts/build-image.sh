#!/bin/bash
# Builds zeroboot's OCI image from Debian's packages only (no registry is
# needed): a Debian 12 root made by debootstrap with what a template build
# needs (the kernel source and its build tools, debootstrap, erofs-utils,
# e2fsprogs), plus target/release/zeroboot, committed with buildah.
#
#   scripts/build-image.sh [TAG]      (default: zeroboot:<version>-<commit>)
#
# The Debian root is cached under $ZEROBOOT_CACHE/image-base/<hash of its
# package list and mirror>.tar, so a rebuild after a code change only adds
# the binary (seconds). Needs root, debootstrap and buildah (Debian's).
# ZEROBOOT_DEBIAN_MIRROR picks another mirror, as for template builds.
set -euo pipefail
cd "$(dirname "$0")/.."
version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -1)
tag="${1:-zeroboot:${version}-$(git rev-parse --short=12 HEAD)}"
binary=target/release/zeroboot
[ -x "$binary" ] || { echo "build-image: $binary is missing: cargo build --release first" >&2; exit 1; }
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || { echo "build-image: $tool is missing (apt-get install $tool)" >&2; exit 1; }
done
mirror="${ZEROBOOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
# What `zeroboot template build` runs on the host (scripts/install-deps.sh),
# and certificates for `zeroboot template import https://...`.
packages=linux-source-6.1,build-essential,flex,bison,bc,libelf-dev,libssl-dev,debootstrap,erofs-utils,e2fsprogs,xz-utils,tar,ca-certificates,python3-pip
cache="${ZEROBOOT_CACHE:-$HOME/.cache/zeroboot}/image-base"
key=$(printf '%s\n%s\nbookworm\n' "$packages" "$mirror" | sha256sum | cut -c1-16)
base="$cache/$key.tar"
if [ ! -f "$base" ]; then
  echo "build-image: debootstrap of Debian 12 with the build tools (minutes; cached as $base)"
  mkdir -p "$cache"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror" >"$cache/$key.log" 2>&1 ||
    { tail -20 "$cache/$key.log" >&2; echo "build-image: debootstrap failed" >&2; exit 1; }
  chroot "$root" apt-get clean
  rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/*.bin "$root"/usr/share/doc "$root"/usr/share/man
  tar -C "$root" --numeric-owner -cf "$base.partial" .
  mv "$base.partial" "$base"
  rm -rf "$root"
  trap - EXIT
fi
container=$(buildah from scratch)
trap 'buildah rm "$container" >/dev/null 2>&1 || true' EXIT
buildah add --quiet "$container" "$base" /
buildah copy --quiet --chmod 0755 "$container" "$binary" /usr/local/bin/zeroboot
buildah config \
  --env ZEROBOOT_CACHE=/var/lib/zeroboot \
  --env ZEROBOOT_LOG_FORMAT=json \
  --port 8080 \
  --volume /var/lib/zeroboot \
  --workingdir / \
  --entrypoint '["/usr/local/bin/zeroboot"]' \
  --cmd '["serve", "--listen", "0.0.0.0:8080"]' \
  --label org.opencontainers.image.title=zeroboot \
  --label org.opencontainers.image.version="$version" \
  --label org.opencontainers.image.revision="$(git rev-parse HEAD)" \
  "$container"
buildah commit --quiet --rm "$container" "$tag" >/dev/null
trap - EXIT
echo "build-image: $tag ($(podman image inspect --format '{{.Size}}' "$tag" 2>/dev/null | awk '{printf "%d MiB", $1/1048576}'))"
