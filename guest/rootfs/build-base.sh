#!/bin/bash
# Build the guest's base root filesystem from Debian's packages.
#   guest/rootfs/build-base.sh OUT_DIR
# Reads OUT_DIR/packages (Debian packages, one a line) and OUT_DIR/wheels
# (pip requirements, one a line), both written by zeroboot from the template
# spec, which has checked every entry (crates/template/src/spec.rs).
# Produces OUT_DIR/base.tar: Debian 13 ("trixie") minbase + those packages +
# those wheels, pruned of docs, locales, test suites and package-manager
# state. The agent is added later (zeroboot builds the final erofs image), so
# editing the agent does not rerun debootstrap.
#
# Debian 13 rather than the host's Debian 12: its Python is 3.13, whose
# immortal objects (None, small ints, interned strings, static types) are
# never written by reference counting, so a fork writes fewer pages; and
# users expect a current Python. The guest kernel stays Debian 12's 6.1.
set -euo pipefail
out="${1:?usage: build-base.sh OUT_DIR}"
suite=trixie
# The guest's CPython and glibc, for the wheels pip downloads.
python_version=3.13
glibc_minor=41
mirror="${ZEROBOOT_DEBIAN_MIRROR:-http://deb.debian.org/debian}"
packages="$(paste -sd, "$out/packages")"
mapfile -t wheels < <(grep -v '^$' "$out/wheels" || true)
mkdir -p "$out"
root="$out/root"
rm -rf "$root"
echo "debootstrap $suite ($packages) from $mirror"
debootstrap --variant=minbase --include="$packages" "$suite" "$root" "$mirror"
if ((${#wheels[@]})); then
	# Binary wheels only: the guest has no compiler, and a wheel is what the
	# spec asked for. The host's pip downloads them (with the host's network
	# settings: proxies, certificates, indexes) for the guest's Python and
	# glibc; the guest's pip installs them offline.
	echo "pip download ${wheels[*]}"
	wheelhouse="$root/tmp/zeroboot-wheels"
	mkdir -p "$wheelhouse"
	# pip does not widen a --platform to older glibcs: name them all.
	platforms=(--platform manylinux1_x86_64 --platform manylinux2010_x86_64 --platform manylinux2014_x86_64)
	for minor in $(seq 17 "$glibc_minor"); do platforms+=(--platform "manylinux_2_${minor}_x86_64"); done
	python3 -m pip download --disable-pip-version-check --no-cache-dir --only-binary=:all: \
		"${platforms[@]}" --python-version "$python_version" --implementation cp \
		--abi "cp${python_version/./}" --abi abi3 --abi none \
		--dest "$wheelhouse" -- "${wheels[@]}"
	echo "pip install (in the guest's root) ${wheels[*]}"
	chroot "$root" /usr/bin/env -i PATH=/usr/bin:/bin HOME=/root python3 -m pip install \
		--no-index --find-links /tmp/zeroboot-wheels --no-cache-dir --only-binary=:all: \
		--break-system-packages --root-user-action=ignore --disable-pip-version-check \
		-- "${wheels[@]}"
	rm -rf "$wheelhouse"
fi
echo "pruning"
rm -rf "$root"/usr/share/{doc,man,info,locale,i18n,lintian,linda,bug,common-licenses,bash-completion,zsh,menu}
rm -rf "$root"/var/cache/apt/* "$root"/var/lib/apt/lists/* "$root"/var/log/*
rm -rf "$root"/usr/lib/python"$python_version"/{test,idlelib,tkinter,turtledemo,ensurepip,lib2to3,pydoc_data}
for site in "$root"/usr/lib/python3/dist-packages "$root"/usr/local/lib/python3*/dist-packages; do
	if [ -d "$site" ]; then
		# numpy.testing imports numpy/_core/tests/_natype.py (numpy 2.2),
		# and scipy.stats imports numpy.testing: that one stays.
		find "$site" -mindepth 2 -type d -name tests ! -path '*/numpy/_core/tests' -prune -exec rm -rf {} +
	fi
done
rm -rf "$root"/usr/lib/x86_64-linux-gnu/gconv
rm -rf "$root"/usr/share/perl "$root"/usr/lib/x86_64-linux-gnu/perl-base
# The guest has no network and no users: keep /etc small and predictable.
echo "zeroboot" > "$root"/etc/hostname
echo "archiving"
tar -C "$root" --numeric-owner -cf "$out/base.tar.tmp" .
mv "$out/base.tar.tmp" "$out/base.tar"
rm -rf "$root"
echo "base ready: $(du -h "$out/base.tar" | cut -f1)"
