#!/bin/bash
# Build the zeroboot guest kernel from Debian's linux-source-6.1.
#   guest/kernel/build.sh OUT_DIR
# Writes OUT_DIR/{vmlinux,System.map,config}. The caller (zeroboot's artifact
# cache) decides whether a build is needed from the hash of this directory.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
out="${1:?usage: build.sh OUT_DIR}"
tarball=/usr/src/linux-source-6.1.tar.xz
[ -f "$tarball" ] || { echo "missing $tarball: run scripts/install-deps.sh" >&2; exit 1; }
mkdir -p "$out"
work="$out/src"
rm -rf "$work"
mkdir -p "$work"
echo "unpacking $tarball"
tar xf "$tarball" -C "$work"
cd "$work"/linux-source-6.1
for p in "$here"/patches/*.patch; do
  echo "applying $(basename "$p")"
  patch -p1 --quiet --forward < "$p"
done
echo "configuring: tinyconfig + zeroboot.config"
make -s tinyconfig >/dev/null
cat "$here/zeroboot.config" >> .config
make -s olddefconfig >/dev/null
bad=0
while read -r line; do
  case "$line" in
    CONFIG_*=*)
      grep -qx -- "$line" .config || { echo "config option lost: $line" >&2; bad=1; } ;;
    "# CONFIG_"*" is not set")
      opt="${line#\# }"; opt="${opt%% *}"
      if grep -q "^$opt=" .config; then echo "config option still set: $opt" >&2; bad=1; fi ;;
  esac
done < "$here/zeroboot.config"
[ "$bad" = 0 ] || exit 1
echo "compiling vmlinux with $(nproc) jobs"
make -j"$(nproc)" vmlinux
[ -f vmlinux ] || { echo "vmlinux was not produced" >&2; exit 1; }
cp vmlinux "$out/vmlinux.tmp" && mv "$out/vmlinux.tmp" "$out/vmlinux"
cp System.map "$out/System.map"
cp .config "$out/config"
cd "$out"
rm -rf "$work"
echo "kernel ready: $(du -h vmlinux | cut -f1)"
