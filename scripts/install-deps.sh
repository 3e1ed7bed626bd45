#!/bin/bash
# Installs what zeroboot needs to build its guest on Debian 12 (bookworm):
# the kernel source and its build tools, debootstrap, erofs-utils and
# e2fsprogs (the disk image),
# wrk for the HTTP load figures, haproxy and iproute2 for the several-node
# test (scripts/cluster.py), and buildah, podman and runc for the image
# (scripts/build-image.sh, scripts/test-image.sh), and dnsmasq-base for the
# network test's DNS server (scripts/network.py).
# Safe to run again: it only installs what is missing.
set -euo pipefail
packages=(
  linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev
  debootstrap erofs-utils e2fsprogs xz-utils tar
  wrk python3-venv python3-pip haproxy iproute2 buildah podman runc
  dnsmasq-base
)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  echo "installing: ${missing[*]}"
  $sudo apt-get update -q
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -q --no-install-recommends "${missing[@]}"
fi
command -v cargo >/dev/null || { echo "cargo not found: install Rust (https://rustup.rs) first" >&2; exit 1; }
# Only the SDK tests need these.
command -v python3 >/dev/null || { echo "python3 not found: the Python SDK tests need it" >&2; exit 1; }
command -v npm >/dev/null || { echo "npm not found: the TypeScript SDK tests need Node.js 18+ and npm" >&2; exit 1; }
if [ -e /dev/kvm ]; then
  # The server runs as an unprivileged user in group kvm (deploy/systemd),
  # and a test runs it that way: give group kvm read and write on /dev/kvm,
  # as Debian's udev rules do on a standard install.
  if [ "$(stat -c %G:%a /dev/kvm)" != "kvm:660" ]; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    getent group kvm >/dev/null || $sudo groupadd --system kvm
    $sudo chgrp kvm /dev/kvm
    $sudo chmod 660 /dev/kvm
    echo "/dev/kvm: group kvm, mode 660"
  fi
else
  echo "warning: /dev/kvm is missing; zeroboot needs KVM to run sandboxes" >&2
fi
echo "dependencies ready"
