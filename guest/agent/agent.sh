#!/bin/bash
# zeroboot guest agent for bash: PID 1 of a bash template's guest.
#
# Boot: the `zeroboot` builtin (native/zeroboot_bash.c) mounts the kernel
# filesystems, maps the mailbox and credits the host's boot entropy; the
# agent applies the template's environment, runs the exec path once, then
# rings READY. The host snapshots the VM at that store.
#
# Each request runs as `bash -c` would run it, in a subshell: `exit` ends only
# the request, and each request starts from the agent's state (files
# persist). Its stdin, stdout and stderr are files on tmpfs, opened by the
# subshell before its request arrives; the builtin sends the output back
# through the mailbox with a RESULT doorbell from the subshell's EXIT trap,
# before the subshell is torn down.
#
# The first subshell is forked before the snapshot and rings READY itself,
# so a fork's first request pays for no process creation: forking bash costs
# hundreds of milliseconds where guest kernel mode is emulated. If a
# subshell dies without answering (a signal, `exec`, its own EXIT trap), the
# agent answers for it (`zeroboot reap`).
enable -f /zeroboot/zeroboot_bash.so zeroboot || exit 1
zeroboot boot || exit 1
echo "zeroboot-agent: filesystems mounted, entropy seeded"
# Requests run as the sandbox's user (uid 1000, home /home/user) unless
# they ask for root; each subshell switches (`zeroboot request`).
export PATH=/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin HOME=/home/user USER=user LOGNAME=user LANG=C.UTF-8
# The template spec's environment, written into the image by zeroboot.
if [ -r /zeroboot/env.sh ]; then
	. /zeroboot/env.sh
fi
cd /home/user || exit 1
io=/run/zeroboot
mkdir -p "$io" || exit 1
: >"$io/stdin"
# The exec path once, so the pages it touches are mapped before the snapshot.
for code in 'echo warm' 'echo warm >&2; exit 3' 'x=$((RANDOM + 1))'; do
	(eval "$code") <"$io/stdin" >"$io/stdout" 2>"$io/stderr"
done
echo "zeroboot-agent: ready"
first=1
while :; do
	(
		zeroboot attach "$io"
		if ((first)); then
			# This subshell's pages are the agent's until it writes them,
			# and it has no page table entries for bash's code yet: map
			# and copy them all now, not one fault at a time in every fork.
			zeroboot prefault
			# Then move what is hot onto 2 MiB pages: a fork maps each
			# with one fault instead of one per 4 KiB page.
			zeroboot hugify
			# The request's user, ahead: a fresh fork's request as that
			# user makes no system call for it.
			zeroboot become-user
			# The READY store is the snapshot: every fork resumes here.
			zeroboot ready
		fi
		zeroboot request
		ok=$?
		trap 'zeroboot respond "$?"' EXIT
		# Never run the code as someone it did not ask to be.
		((ok == 0)) || exit 1
		RANDOM=$ZB_SEED
		unset ZB_SEED first ok
		# The request's context: its variables, then its directory.
		if [[ -n $ZB_ENV_NAMES ]]; then
			export $ZB_ENV_NAMES
		fi
		if [[ -n $ZB_CWD ]] && ! cd -- "$ZB_CWD" 2>/dev/null; then
			echo "zeroboot: cwd $ZB_CWD: No such file or directory" >&2
			exit 1
		fi
		unset ZB_CWD ZB_ENV_NAMES
		eval "$ZB_CODE"
	)
	zeroboot reap "$?" "$io"
	first=0
done
