#!/bin/bash
# What a per-sandbox network backend other than ours costs to set up, for
# docs/network.md ("Why not TAP or passt"): a network namespace with a TAP
# device in it, made and removed (CAP_NET_ADMIN), and a passt process
# started until its socket listens, with its resident memory. Needs root,
# iproute2 and Debian's passt package.
#   scripts/network-backends.sh [COUNT]     (default 50)
set -euo pipefail
n=${1:-50}
ms() { echo "($2 - $1) * 1000 / $n" | bc -l | cut -c1-6; }
made=$(date +%s.%N)
for i in $(seq "$n"); do
  ip netns add "zbm$i"
  ip -n "zbm$i" tuntap add tap0 mode tap
  ip -n "zbm$i" link set tap0 up
done
removing=$(date +%s.%N)
for i in $(seq "$n"); do ip netns del "zbm$i"; done
removed=$(date +%s.%N)
echo "netns + TAP per sandbox: make $(ms "$made" "$removing") ms, remove $(ms "$removing" "$removed") ms"
# passt drops to nobody before it binds its socket.
dir=$(mktemp -d)
chmod 1777 "$dir"
trap 'pkill -f "^passt" || true; rm -rf "$dir"' EXIT
started=$(date +%s.%N)
for i in $(seq "$n"); do passt -q -f -s "$dir/$i.sock" >/dev/null 2>&1 & done
while [ "$(find "$dir" -name '*.sock' | wc -l)" -lt "$n" ]; do sleep 0.001; done
listening=$(date +%s.%N)
rss=$(ps -o rss= -p "$(pgrep -d, -f '^passt')" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
echo "passt per sandbox: started and listening $(ms "$started" "$listening") ms ($n started at once), RSS $rss KiB (median)"
