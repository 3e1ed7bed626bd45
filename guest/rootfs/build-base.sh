#!/bin/bash
# Build the guest's base root filesystem from Debian's packages.
#   guest/rootfs/build-base.sh OUT_DIR
# Produces OUT_DIR/base.tar: Debian 12 minbase + python3 + numpy, pruned of
# docs, locales, test suites and package-manager state. The agent is added
# later (zeroboot builds the final erofs image), so editing the agent does not
# rerun debootstrap.
set -euo pipefail
out="${1:?usage: build-base.sh OUT_DIR}"
mirror="${ZEROBOOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="python3,python3-numpy"
mkdir -p "$out"
root="$out/root"
rm -rf "$root"
echo "debootstrap bookworm ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" bookworm "$root" "$mirror"
echo "pruning"
rm -rf "$root"/usr/share/{doc,man,info,locale,i18n,lintian,linda,bug,common-licenses,bash-completion,zsh,menu}
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*
rm -rf "$root"/usr/lib/python3.11/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data}
find "$root"/usr/lib/python3/dist-packages/numpy -type d -name tests -prune -exec rm -rf {} +
rm -rf "$root"/usr/lib/x86_64-linux-gnu/gconv
rm -rf "$root"/usr/share/perl "$root"/usr/lib/x86_64-linux-gnu/perl-base
# The guest has no network and no users: keep /etc small and predictable.
echo "zeroboot" > "$root"/etc/hostname
echo "archiving"
tar -C "$root" --numeric-owner -cf "$out/base.tar.tmp" .
mv "$out/base.tar.tmp" "$out/base.tar"
rm -rf "$root"
echo "base ready: $(du -h "$out/base.tar" | cut -f1)"
