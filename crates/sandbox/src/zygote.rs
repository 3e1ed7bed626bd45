//! The zygote: one process per template that has done a worker's start-up
//! once (the executable loaded and relocated, the runtime up, `/dev/kvm`
//! and the template opened) and clones every new worker from itself. A
//! sandbox then costs a clone of a small process instead of an `execve`,
//! and its worker shares the zygote's pages until it writes them.
//!
//! The zygote never makes a VM: KVM ties a VM to the process that made it,
//! so each clone makes its own, as a spawned worker does. It starts no
//! thread either, so a clone is a copy of a process in a known state.
//!
//! The host talks to it over a Unix socket on its stdin. Once it has opened
//! the template it sends [`OPENED`] (or [`NOT_OPENED`], and ends), so that
//! every worker sees the template as it was when the host opened it. A
//! request is one byte carrying one descriptor, the worker's end of a
//! socket pair, which becomes the worker's stdin and stdout; the answer is
//! the new worker's pid as a little-endian `i32`, or a negative errno. The
//! worker is cloned with `CLONE_PARENT`: it is the host's child, not the
//! zygote's, so the host waits for it and reads how it ended exactly as for
//! a spawned one, and its parent-death signal ties it to the host.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::worker::{self, WorkerError};

#[derive(Debug, thiserror::Error)]
pub enum ZygoteError {
    #[error("the zygote's socket to the host: {0}")]
    Control(#[from] std::io::Error),
    /// A worker cloned from the zygote ended with this error.
    #[error(transparent)]
    Worker(#[from] WorkerError),
}

/// The byte of a request; any other is answered with `EINVAL`.
pub(crate) const CLONE_WORKER: u8 = 1;
/// The zygote's first byte: the template is open, requests may come.
pub(crate) const OPENED: u8 = 1;
/// The zygote's first byte when it could not open the template.
pub(crate) const NOT_OPENED: u8 = 0;

/// Runs a zygote for the template in `dir`, with the host's socket on
/// stdin, until the host closes it. In each worker it clones, this returns
/// when the worker is done.
pub fn serve(dir: &Path) -> Result<(), ZygoteError> {
    worker::die_with_parent();
    let control = UnixStream::from(std::io::stdin().as_fd().try_clone_to_owned()?);
    // Opened once, before the host sends a request. Without it the host
    // spawns workers, whose answers to Prepare say what is wrong.
    let Ok(opened) = worker::open(dir) else {
        (&control).write_all(&[NOT_OPENED])?;
        return Ok(());
    };
    (&control).write_all(&[OPENED])?;
    // Opening the template freed much of what it allocated (the state
    // file's bytes, the page-table walk's sets), in chunks scattered over
    // the heap. A worker's allocations would then land in them, each on a
    // page of its own that the worker copies from this process. Trimming
    // coalesces the free chunks and hands their whole pages back, so a
    // worker's allocations pack into few pages.
    // SAFETY: malloc_trim only rearranges the allocator's free memory; no
    // other thread runs here.
    unsafe { libc::malloc_trim(0) };
    loop {
        let (request, end) = match receive(&control)? {
            None => return Ok(()),
            Some(got) => got,
        };
        let answer = match (request, end) {
            (CLONE_WORKER, Some(end)) => match clone_parent() {
                Ok(0) => {
                    // The new worker: the socket pair's end is all it talks to.
                    drop(control);
                    become_stdio(end)?;
                    worker::die_with_parent();
                    return Ok(worker::serve_opened(Ok(opened))?);
                }
                Ok(pid) => pid,
                Err(e) => -e.raw_os_error().unwrap_or(libc::EIO),
            },
            _ => -libc::EINVAL,
        };
        (&control).write_all(&answer.to_le_bytes())?;
    }
}

/// The next request: its byte and the descriptor it carried, or `None` when
/// the host has closed the socket.
fn receive(control: &UnixStream) -> Result<Option<(u8, Option<OwnedFd>)>, std::io::Error> {
    let mut byte = [0u8; 1];
    let mut fds: [RawFd; 1] = [-1];
    let mut iov = [libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: byte.len(),
    }];
    let (read, fd_count) = loop {
        // SAFETY: the one iovec points at `byte`, which outlives the call;
        // any byte may be written there.
        match unsafe { control.recv_with_fds(&mut iov, &mut fds) } {
            Ok(got) => break got,
            Err(e) if e.errno() == libc::EINTR => continue,
            Err(e) => return Err(std::io::Error::from_raw_os_error(e.errno())),
        }
    };
    // SAFETY: the kernel gave this process the descriptor with the message;
    // nothing else owns it.
    let end = (fd_count == 1).then(|| unsafe { OwnedFd::from_raw_fd(fds[0]) });
    Ok((read == 1).then_some((byte[0], end)))
}

/// `clone(CLONE_PARENT)`: like `fork`, but the child's parent is this
/// process's parent. Returns the child's pid, or 0 in the child.
fn clone_parent() -> Result<i32, std::io::Error> {
    // The C library has no call for it. What its `fork` does besides the
    // system call (fork handlers, resetting locks other threads may hold)
    // has nothing to do in a process with one thread that holds no lock
    // here. The exit signal is the zygote's own (SIGCHLD), as
    // `CLONE_PARENT` says.
    // SAFETY: without CLONE_VM or a new stack the child runs on a copy of
    // this process's memory and stack, as after `fork`; no pointer is
    // passed.
    let pid = unsafe {
        libc::syscall(
            libc::SYS_clone,
            (libc::CLONE_PARENT | libc::SIGCHLD) as libc::c_ulong,
            0usize,
            0usize,
            0usize,
            0usize,
        )
    };
    if pid < 0 {
        return Err(std::io::Error::last_os_error());
    }
    i32::try_from(pid).map_err(|_| std::io::Error::from_raw_os_error(libc::EOVERFLOW))
}

/// Makes `end` this process's stdin and stdout.
fn become_stdio(end: OwnedFd) -> Result<(), std::io::Error> {
    for target in [libc::STDIN_FILENO, libc::STDOUT_FILENO] {
        // SAFETY: dup2 between two open descriptors; the one it replaces is
        // this process's stdin or stdout, which nothing here holds.
        if unsafe { libc::dup2(end.as_raw_fd(), target) } < 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}
