//! Seccomp filters for zeroboot's processes: the worker (strict: what a
//! guest can reach), the server (looser: it serves HTTP and starts
//! workers, but may not debug, mount, load modules or make namespaces), and
//! the template builder's boot thread. A crate of its own so that the
//! sandbox layer and the template build each use it without depending on
//! the other.
//!
//! # The worker
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
//! | with networking only: `socket` (`AF_INET`), `connect`, `sendto`, `recvfrom`, `sendmsg`, `recvmsg`, `setsockopt`, `getsockopt`, `getsockname`, `getpeername`, `shutdown`, `epoll_*`, `poll` | the network backend's thread ([`NETWORK_BACKEND`]) |
//!
//! Everything else is refused, among them `execve`, `clone`/`fork`,
//! `socket` (any but `AF_INET`, and that one without networking),
//! `connect`, `ptrace`, `open` for writing, `kill` of another process, and
//! new executable mappings.

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
/// The terminal ioctl type (`'T'`): `TCGETS`, `FIONBIO`, `FIOCLEX`.
const TTYIO: u64 = 0x54;

/// What any zeroboot thread needs: memory, locks, time, signals, the
/// deadline timer, randomness, and reading and writing open descriptors.
const RUNTIME: &[i64] = &[
    libc::SYS_brk,
    libc::SYS_munmap,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_futex,
    libc::SYS_sched_yield,
    libc::SYS_getrandom,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_rt_sigaction,
    libc::SYS_rt_sigprocmask,
    libc::SYS_rt_sigreturn,
    libc::SYS_sigaltstack,
    libc::SYS_restart_syscall,
    libc::SYS_timer_create,
    libc::SYS_timer_settime,
    libc::SYS_timer_delete,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_eventfd2,
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_pread64,
    libc::SYS_close,
    libc::SYS_lseek,
    libc::SYS_statx,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
];

/// Starting threads: with `clone` (see [`clone_without_namespaces`]);
/// `clone3` is allowed so that [`no_clone3`]'s `ENOSYS` is the only answer
/// (of two errno answers, the newer filter's would win).
const THREADS: &[i64] = &[
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_rseq,
    libc::SYS_prctl,
    libc::SYS_sched_getaffinity,
];

/// Creating, writing, renaming and removing files and directories.
const FILE_WRITES: &[i64] = &[
    libc::SYS_pwrite64,
    libc::SYS_fcntl,
    libc::SYS_openat,
    libc::SYS_ftruncate,
    libc::SYS_fallocate,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
    // Dropping a new memory file from the page cache (page_cache::release_page_cache).
    libc::SYS_fadvise64,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_copy_file_range,
    libc::SYS_sendfile,
    libc::SYS_fchmod,
    libc::SYS_getcwd,
    libc::SYS_readlink,
    libc::SYS_access,
    libc::SYS_faccessat2,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// What the server does besides [`RUNTIME`] and [`THREADS`]: descriptors,
/// `epoll`, sockets (families checked), and starting and ending workers.
const SERVING: &[i64] = &[
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close_range,
    libc::SYS_dup,
    libc::SYS_dup2,
    libc::SYS_dup3,
    libc::SYS_fcntl,
    libc::SYS_access,
    libc::SYS_faccessat2,
    libc::SYS_readlink,
    libc::SYS_getcwd,
    libc::SYS_pipe2,
    libc::SYS_poll,
    libc::SYS_ppoll,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_socketpair,
    libc::SYS_bind,
    libc::SYS_listen,
    libc::SYS_accept4,
    libc::SYS_connect,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_setsockopt,
    libc::SYS_getsockopt,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getppid,
    libc::SYS_getuid,
    libc::SYS_geteuid,
    libc::SYS_getgid,
    libc::SYS_getegid,
    libc::SYS_prlimit64,
    libc::SYS_uname,
    libc::SYS_arch_prctl,
    libc::SYS_set_tid_address,
    libc::SYS_seccomp,
    libc::SYS_execve,
    libc::SYS_wait4,
    libc::SYS_waitid,
    libc::SYS_kill,
];

type Rules = BTreeMap<i64, Vec<SeccompRule>>;

fn allow(rules: &mut Rules, calls: &[i64]) {
    for &call in calls {
        rules.insert(call, vec![]);
    }
}

/// `call` is allowed when the low 32 bits of argument `arg`, masked with
/// `mask`, equal one of `values`. (Every flag and request number checked
/// here fits in 32 bits.)
fn allow_masked(rules: &mut Rules, call: i64, arg: u8, mask: u64, values: &[u64]) -> Result<(), SeccompError> {
    let alternatives = values
        .iter()
        .map(|&v| SeccompRule::new(vec![Cond::new(arg, Len::Dword, Op::MaskedEq(mask), v)?]))
        .collect::<Result<_, _>>()?;
    rules.insert(call, alternatives);
    Ok(())
}

/// `ioctl` with a request of one of these types (bits 8..16).
fn allow_ioctl_types(rules: &mut Rules, types: &[u64]) -> Result<(), SeccompError> {
    let values: Vec<u64> = types.iter().map(|t| t << 8).collect();
    allow_masked(rules, libc::SYS_ioctl, 1, 0xff00, &values)
}

/// `mmap` and `mprotect` without `PROT_EXEC`.
fn allow_mappings_without_exec(rules: &mut Rules) -> Result<(), SeccompError> {
    let exec = libc::PROT_EXEC as u64;
    allow_masked(rules, libc::SYS_mmap, 2, exec, &[0])?;
    allow_masked(rules, libc::SYS_mprotect, 2, exec, &[0])
}

/// `clone` without namespace flags.
fn clone_without_namespaces(rules: &mut Rules) -> Result<(), SeccompError> {
    let namespaces = (libc::CLONE_NEWNS
        | libc::CLONE_NEWUTS
        | libc::CLONE_NEWIPC
        | libc::CLONE_NEWUSER
        | libc::CLONE_NEWPID
        | libc::CLONE_NEWNET
        | libc::CLONE_NEWCGROUP) as u64;
    allow_masked(rules, libc::SYS_clone, 0, namespaces, &[0])
}

fn compile(rules: Rules, refused: SeccompAction) -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(rules, refused, SeccompAction::Allow, TargetArch::x86_64)?;
    Ok(filter.try_into()?)
}

/// What a worker's network backend needs besides [`RUNTIME`]: IPv4
/// sockets (the family is checked) to connect out and to forward DNS, and
/// `epoll` to wait on them. Its thread is started before the filter is
/// installed, so starting threads stays refused.
const NETWORK_BACKEND: &[i64] = &[
    libc::SYS_connect,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_getsockname,
    libc::SYS_getpeername,
    libc::SYS_shutdown,
    libc::SYS_recvfrom,
    libc::SYS_recvmsg,
    libc::SYS_sendto,
    libc::SYS_sendmsg,
    libc::SYS_epoll_create1,
    libc::SYS_epoll_ctl,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_poll,
    libc::SYS_ppoll,
];

/// Whether a worker's sandbox has a network (and so a backend thread).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WorkerNetwork {
    None,
    Backend,
}

/// The worker's filter (see the module documentation), for process `pid`.
pub fn worker_filter(pid: u32, network: WorkerNetwork) -> Result<BpfProgram, SeccompError> {
    let mut rules = Rules::new();
    allow(&mut rules, RUNTIME);
    allow_ioctl_types(&mut rules, &[KVMIO])?;
    let writing = (libc::O_ACCMODE | libc::O_CREAT | libc::O_TRUNC) as u64;
    allow_masked(&mut rules, libc::SYS_openat, 2, writing, &[0])?;
    allow_mappings_without_exec(&mut rules)?;
    if network == WorkerNetwork::Backend {
        allow(&mut rules, NETWORK_BACKEND);
        allow_masked(
            &mut rules,
            libc::SYS_socket,
            0,
            u64::from(u32::MAX),
            &[libc::AF_INET as u64],
        )?;
    }
    // Signals to this process only (abort on a panic).
    rules.insert(
        libc::SYS_tgkill,
        vec![SeccompRule::new(vec![Cond::new(
            0,
            Len::Dword,
            Op::Eq,
            u64::from(pid),
        )?])?],
    );
    compile(rules, SeccompAction::KillProcess)
}

/// Whether the server writes files (see [`server_filters`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServerFiles {
    ReadOnly,
    WritesPausedSandboxes,
}

/// The server's filters. `zeroboot serve` installs them on every thread
/// once its templates are open and before it serves; workers it starts
/// inherit them and add their own. A call outside the list fails with
/// `EPERM` rather than killing the server: the server holds every running
/// sandbox, and a refused call in an unusual path should cost one request.
///
/// Allowed, as measured with `strace -f` over every endpoint: memory,
/// threads and locks; files opened without `O_CREAT`, `O_TRUNC` or write-only
/// access (the worker opens `/dev/kvm` read-write); IPv4, IPv6 and Unix
/// sockets; pipes, `epoll`, `poll`; starting workers (`clone` without
/// namespace flags, `execve`, `wait4`, `kill`); terminal and KVM `ioctl`s;
/// and what a worker does before its own filter, `seccomp` and `prctl`
/// included. Refused, among others: `ptrace`, `process_vm_readv`,
/// `mount`, `pivot_root`, `chroot`, `unshare`, `setns`, `bpf`,
/// `perf_event_open`, `init_module`, `kexec_load`, `keyctl`, `userfaultfd`,
/// `io_uring_setup`, `setuid`. `clone3`, whose flags a filter cannot read,
/// answers `ENOSYS`, so the C library falls back to `clone`, whose flags it
/// can.
///
/// With [`ServerFiles::WritesPausedSandboxes`] the server may also create,
/// write, rename and remove files (the builder's [`FILE_WRITES`]): it
/// writes paused sandboxes to disk and removes them when they resume.
pub fn server_filters(files: ServerFiles) -> Result<[BpfProgram; 2], SeccompError> {
    let mut rules = Rules::new();
    allow(&mut rules, RUNTIME);
    allow(&mut rules, THREADS);
    allow(&mut rules, SERVING);
    // Executable mappings too: a worker's dynamic loader maps the C library
    // under these filters, before the worker's own.
    allow(&mut rules, &[libc::SYS_mmap, libc::SYS_mprotect]);
    match files {
        ServerFiles::ReadOnly => {
            let writing = (libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC) as u64;
            allow_masked(&mut rules, libc::SYS_openat, 2, writing, &[0])?;
        }
        ServerFiles::WritesPausedSandboxes => allow(&mut rules, FILE_WRITES),
    }
    allow_ioctl_types(&mut rules, &[KVMIO, TTYIO])?;
    let families = [libc::AF_UNIX, libc::AF_INET, libc::AF_INET6].map(|f| f as u64);
    allow_masked(&mut rules, libc::SYS_socket, 0, u64::from(u32::MAX), &families)?;
    clone_without_namespaces(&mut rules)?;
    Ok([compile(rules, SeccompAction::Errno(libc::EPERM as u32))?, no_clone3()?])
}

/// `clone3` answers `ENOSYS`: the C library then starts threads and
/// processes with `clone`, whose flags a filter can check.
fn no_clone3() -> Result<BpfProgram, SeccompError> {
    let filter = SeccompFilter::new(
        BTreeMap::from([(libc::SYS_clone3, vec![])]),
        SeccompAction::Allow,
        SeccompAction::Errno(libc::ENOSYS as u32),
        TargetArch::x86_64,
    )?;
    Ok(filter.try_into()?)
}

/// The filters for the thread of `zeroboot template build` that boots the
/// template's guest and writes the template (a root process): what a worker
/// may do, plus creating, writing, renaming and removing files and
/// directories, and threads (without namespaces). Refused calls fail with
/// `EPERM`. No `execve`, sockets, `mount`, `ptrace` or module loading; the
/// steps that need those (debootstrap, the kernel build) run before, on
/// other threads, on trusted inputs. As for the server, `clone3` answers
/// `ENOSYS`.
pub fn builder_filters() -> Result<[BpfProgram; 2], SeccompError> {
    let mut rules = Rules::new();
    allow(&mut rules, RUNTIME);
    allow(&mut rules, THREADS);
    allow(&mut rules, FILE_WRITES);
    allow(&mut rules, &[libc::SYS_tgkill]);
    allow_ioctl_types(&mut rules, &[KVMIO, TTYIO])?;
    allow_mappings_without_exec(&mut rules)?;
    clone_without_namespaces(&mut rules)?;
    // In this order: the allowlist refuses `seccomp` itself.
    Ok([no_clone3()?, compile(rules, SeccompAction::Errno(libc::EPERM as u32))?])
}

/// Installs `filter` on the calling thread (and threads it starts), for good.
pub fn install_on_this_thread(filter: &BpfProgram) -> Result<(), SeccompError> {
    Ok(seccompiler::apply_filter(filter)?)
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
        in_child_under(&[worker_filter(0, WorkerNetwork::None).unwrap()], f)
    }

    /// Runs `f` in a forked child under `filters`; its wait status.
    fn in_child_under(filters: &[BpfProgram], f: impl FnOnce() -> i32) -> libc::c_int {
        // SAFETY: the child calls only async-signal-safe functions (the
        // filter install is prctl + seccomp; `f` makes raw system calls),
        // then _exit.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let code = match filters.iter().try_for_each(|f| seccompiler::apply_filter(f)) {
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

    fn errno() -> i32 {
        std::io::Error::last_os_error().raw_os_error().unwrap_or(0)
    }

    /// Calls under the server's filters: each bit of the result says one
    /// behaved as it should.
    fn server_calls() -> i32 {
        let mut ok = 0;
        // SAFETY: plain system calls with literal arguments; descriptors
        // they open are left to the child's exit.
        unsafe {
            if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) >= 0 {
                ok |= 1;
            }
            if libc::socket(libc::AF_PACKET, libc::SOCK_RAW, 0) < 0 && errno() == libc::EPERM {
                ok |= 2;
            }
            if libc::unshare(libc::CLONE_NEWUSER) < 0 && errno() == libc::EPERM {
                ok |= 4;
            }
            if libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0) < 0 && errno() == libc::EPERM {
                ok |= 8;
            }
            if libc::syscall(libc::SYS_clone3, 0, 0) < 0 && errno() == libc::ENOSYS {
                ok |= 16;
            }
            if libc::open(
                c"/tmp/zeroboot-seccomp-test".as_ptr(),
                libc::O_WRONLY | libc::O_CREAT,
                0o600,
            ) < 0
                && errno() == libc::EPERM
            {
                ok |= 32;
            }
            if libc::open(c"/proc/self/status".as_ptr(), libc::O_RDONLY) >= 0 {
                ok |= 64;
            }
        }
        ok
    }

    #[test]
    fn the_server_may_serve_and_start_workers_but_not_debug_or_make_namespaces() {
        let status = in_child_under(&server_filters(ServerFiles::ReadOnly).unwrap(), server_calls);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 127, "bits of server_calls that held");
        // A server that pauses sandboxes writes files, and is otherwise as
        // confined: bit 32 (creating a file refused) is the one that goes.
        let status = in_child_under(
            &server_filters(ServerFiles::WritesPausedSandboxes).unwrap(),
            server_calls,
        );
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 127 - 32, "bits of server_calls that held");
    }

    /// Calls under the builder's filter; bits as in [`server_calls`].
    fn builder_calls() -> i32 {
        let mut ok = 0;
        let path = c"/tmp/zeroboot-seccomp-builder-test";
        // SAFETY: plain system calls on literal paths and null-terminated
        // argument lists.
        unsafe {
            let fd = libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC, 0o600);
            if fd >= 0 && libc::write(fd, c"x".as_ptr().cast(), 1) == 1 && libc::unlink(path.as_ptr()) == 0 {
                ok |= 1;
            }
            let argv = [c"/bin/true".as_ptr(), std::ptr::null()];
            if libc::execv(c"/bin/true".as_ptr(), argv.as_ptr()) < 0 && errno() == libc::EPERM {
                ok |= 2;
            }
            if libc::socket(libc::AF_INET, libc::SOCK_STREAM, 0) < 0 && errno() == libc::EPERM {
                ok |= 4;
            }
        }
        ok
    }

    #[test]
    fn the_builder_may_write_its_files_but_not_exec_or_open_sockets() {
        let status = in_child_under(&builder_filters().unwrap(), builder_calls);
        assert!(libc::WIFEXITED(status), "status {status:#x}");
        assert_eq!(libc::WEXITSTATUS(status), 7, "bits of builder_calls that held");
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

    #[test]
    fn a_worker_with_a_network_may_open_ipv4_sockets_only() {
        let inet = in_child_under(&[worker_filter(0, WorkerNetwork::Backend).unwrap()], || {
            // SAFETY: plain system calls with no pointers.
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_NONBLOCK, 0) };
            // SAFETY: as above.
            let epoll = unsafe { libc::epoll_create1(0) };
            if fd >= 0 && epoll >= 0 {
                7
            } else {
                1
            }
        });
        assert!(
            libc::WIFEXITED(inet) && libc::WEXITSTATUS(inet) == 7,
            "status {inet:#x}"
        );
        for family in [libc::AF_UNIX, libc::AF_INET6, libc::AF_NETLINK] {
            let status = in_child_under(&[worker_filter(0, WorkerNetwork::Backend).unwrap()], || {
                // SAFETY: a plain system call with no pointers.
                unsafe { libc::socket(family, libc::SOCK_STREAM, 0) };
                0
            });
            assert!(
                libc::WIFSIGNALED(status) && libc::WTERMSIG(status) == libc::SIGSYS,
                "family {family}: status {status:#x}"
            );
        }
    }
}
