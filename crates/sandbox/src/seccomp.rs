//! The worker's seccomp filter.
//!
//! A worker installs it once its VM is prepared and before the VM first
//! runs, so everything a guest can reach (exit handling, the mailbox, the
//! pipes to the host) runs under it, in every thread of the worker. A call
//! outside the list kills the worker (`SECCOMP_RET_KILL_PROCESS`, SIGSYS);
//! the host then reports the sandbox as ended.
//!
//! What the worker does after `Prepare`, and so what is allowed (measured
//! with `strace -ff` over the sandbox tests, plus the paths they do not
//! reach, such as exit and a panic):
//!
//! | calls | why |
//! |---|---|
//! | `ioctl` on KVM requests only (type `0xAE`) | `KVM_RUN`, state get/set, `KVM_IRQFD` |
//! | `eventfd2` | the console's interrupt (`KVM_IRQFD`) at start |
//! | `read`, `write`, `close` | the pipes to the host, stderr logs |
//! | `openat` read-only (no `O_CREAT`, `O_TRUNC`, write access), `lseek`, `pread64`, `statx`, `fstat`, `newfstatat` | `/proc/self/pagemap` (live snapshots) and `/proc/self/smaps` (stats) |
//! | `mmap`, `mprotect` without `PROT_EXEC`; `munmap`, `mremap`, `madvise`, `brk` | the allocator |
//! | `timer_create`, `timer_settime`, `timer_delete`, `rt_sigaction`, `rt_sigprocmask`, `rt_sigreturn`, `sigaltstack` | the deadline timer and its signal |
//! | `getrandom` | CRNG keys and generator seeds for the guest |
//! | `clock_gettime`, `clock_nanosleep`, `nanosleep`, `futex`, `sched_yield`, `gettid`, `getpid`, `restart_syscall` | time and locks |
//! | `tgkill` to this process only, `exit`, `exit_group` | exit, and `abort` on a panic |
//!
//! Everything else is refused, among them `execve`, `clone`/`fork`,
//! `socket`, `connect`, `ptrace`, `open` for writing, `kill` of another
//! process, and new executable mappings.

use std::collections::BTreeMap;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen as Len, SeccompCmpOp as Op, SeccompCondition as Cond, SeccompFilter,
    SeccompRule, TargetArch,
};

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the seccomp filter: {0}")]
    Build(#[from] seccompiler::BackendError),
    #[error("installing the seccomp filter: {0}")]
    Install(#[from] seccompiler::Error),
}

/// The KVM ioctl type (`KVMIO`): bits 8..16 of every KVM request number.
const KVMIO: u64 = 0xAE;

/// The worker's filter (see the module documentation), for process `pid`.
pub fn worker_filter(pid: u32) -> Result<BpfProgram, SeccompError> {
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = BTreeMap::new();
    let any = [
        libc::SYS_eventfd2,
        libc::SYS_read,
        libc::SYS_write,
        libc::SYS_close,
        libc::SYS_lseek,
        libc::SYS_pread64,
        libc::SYS_statx,
        libc::SYS_fstat,
        libc::SYS_newfstatat,
        libc::SYS_munmap,
        libc::SYS_mremap,
        libc::SYS_madvise,
        libc::SYS_brk,
        libc::SYS_timer_create,
        libc::SYS_timer_settime,
        libc::SYS_timer_delete,
        libc::SYS_rt_sigaction,
        libc::SYS_rt_sigprocmask,
        libc::SYS_rt_sigreturn,
        libc::SYS_sigaltstack,
        libc::SYS_getrandom,
        libc::SYS_clock_gettime,
        libc::SYS_clock_nanosleep,
        libc::SYS_nanosleep,
        libc::SYS_futex,
        libc::SYS_sched_yield,
        libc::SYS_gettid,
        libc::SYS_getpid,
        libc::SYS_restart_syscall,
        libc::SYS_exit,
        libc::SYS_exit_group,
    ];
    for call in any {
        rules.insert(call, vec![]);
    }
    let only = |conditions: Vec<Cond>| SeccompRule::new(conditions).map(|rule| vec![rule]);
    // Request numbers are 32 bits; the type is bits 8..16.
    rules.insert(
        libc::SYS_ioctl,
        only(vec![Cond::new(1, Len::Dword, Op::MaskedEq(0xff00), KVMIO << 8)?])?,
    );
    let not_writing = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    rules.insert(
        libc::SYS_openat,
        only(vec![Cond::new(2, Len::Dword, Op::MaskedEq(not_writing), 0)?])?,
    );
    let exec = libc::PROT_EXEC as u64;
    rules.insert(
        libc::SYS_mmap,
        only(vec![Cond::new(2, Len::Dword, Op::MaskedEq(exec), 0)?])?,
    );
    rules.insert(
        libc::SYS_mprotect,
        only(vec![Cond::new(2, Len::Dword, Op::MaskedEq(exec), 0)?])?,
    );
    rules.insert(
        libc::SYS_tgkill,
        only(vec![Cond::new(0, Len::Dword, Op::Eq, u64::from(pid))?])?,
    );
    let filter = SeccompFilter::new(
        rules,
        SeccompAction::KillProcess,
        SeccompAction::Allow,
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// Installs `filter` on every thread of this process, for good.
pub fn install(filter: &BpfProgram) -> Result<(), SeccompError> {
    Ok(seccompiler::apply_filter_all_threads(filter)?)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` in a forked child under the worker filter; its wait status.
    fn in_filtered_child(f: impl FnOnce() -> i32) -> libc::c_int {
        // Built before the fork: the child only installs it and runs `f`.
        let filter = worker_filter(0).unwrap();
        // SAFETY: the child calls only async-signal-safe functions (the
        // filter install is prctl + seccomp; `f` makes raw system calls),
        // then _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let code = match seccompiler::apply_filter(&filter) {
                Ok(()) => f(),
                Err(_) => 100,
            };
            // SAFETY: ends the child without running the parent's atexit state.
            unsafe { libc::_exit(code) };
        }
        assert!(child > 0, "fork failed");
        let mut status = 0;
        // SAFETY: waits for our own child.
        assert_eq!(unsafe { libc::waitpid(child, &mut status, 0) }, child);
        status
    }

    /// One system call the filter must refuse, by number in [`FORBIDDEN`].
    fn forbidden_call(which: usize) -> i32 {
        // SAFETY: each call's pointers are to live locals or literals; each
        // is refused before it runs anyway.
        unsafe {
            match which {
                0 => libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0),
                1 => libc::open(
                    c"/tmp/zeroboot-seccomp-test".as_ptr(),
                    libc::O_WRONLY | libc::O_CREAT,
                    0o600,
                ),
                2 => libc::ioctl(0, libc::TCGETS),
                3 => {
                    let flags = libc::MAP_PRIVATE | libc::MAP_ANONYMOUS;
                    let p = libc::mmap(
                        std::ptr::null_mut(),
                        4096,
                        libc::PROT_READ | libc::PROT_EXEC,
                        flags,
                        -1,
                        0,
                    );
                    i32::from(p == libc::MAP_FAILED)
                }
                _ => libc::fork(),
            }
        }
    }

    const FORBIDDEN: [&str; 5] = [
        "socket",
        "openat for writing",
        "a non-KVM ioctl",
        "an executable mapping",
        "fork",
    ];

    #[test]
    fn allowed_calls_run_and_a_forbidden_one_kills_the_worker() {
        let allowed = in_filtered_child(|| {
            let mut buf = [0u8; 8];
            // SAFETY: getrandom into a local buffer, then a zero-length write.
            let (got, wrote) = unsafe {
                (
                    libc::getrandom(buf.as_mut_ptr().cast(), buf.len(), 0),
                    libc::write(2, buf.as_ptr().cast(), 0),
                )
            };
            if got == 8 && wrote == 0 {
                7
            } else {
                1
            }
        });
        assert!(
            libc::WIFEXITED(allowed) && libc::WEXITSTATUS(allowed) == 7,
            "status {allowed:#x}"
        );

        for (which, name) in FORBIDDEN.iter().enumerate() {
            let status = in_filtered_child(|| forbidden_call(which));
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "{name}: status {status:#x}, expected death by SIGSYS"
            );
        }
    }
}
