//! Worker processes as the host sees them: started from the template's
//! zygote ([`crate::zygote`]) or, without one, spawned with `execve`; killed,
//! and waited for off the caller's path.

use std::ffi::OsString;
use std::fs::File;
use std::io::Read;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{channel, Sender};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

use vmm_sys_util::sock_ctrl_msg::ScmSocket;

use crate::zygote::{CLONE_WORKER, OPENED};

/// How long the zygote may take to answer a request (a clone takes well
/// under a millisecond; only a stuck zygote comes near this).
const ZYGOTE_DEADLINE: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
#[error("cannot start the sandbox process {program}: {source}")]
pub struct SpawnError {
    pub program: PathBuf,
    pub source: std::io::Error,
}

/// How to start a worker: a program and its arguments, to which the
/// template's directory is appended (after `--zygote` for a zygote). The
/// CLI's is `zeroboot worker`, which runs [`crate::worker::serve`], or
/// [`crate::zygote::serve`] with `--zygote`.
#[derive(Debug, Clone)]
pub struct WorkerCommand {
    pub program: PathBuf,
    pub args: Vec<OsString>,
}

impl WorkerCommand {
    /// This executable, with `args`.
    pub fn current_exe(args: &[&str]) -> std::io::Result<Self> {
        Ok(Self {
            program: std::env::current_exe()?,
            args: args.iter().map(OsString::from).collect(),
        })
    }

    /// The program with its arguments, told this process's pid.
    fn command(&self) -> std::process::Command {
        let mut command = std::process::Command::new(&self.program);
        command
            .args(&self.args)
            .env(crate::worker::HOST_PID_ENV, std::process::id().to_string())
            .stderr(Stdio::inherit());
        command
    }

    fn spawn_error(&self, source: std::io::Error) -> SpawnError {
        SpawnError {
            program: self.program.clone(),
            source,
        }
    }
}

/// A worker process just started, and the host's ends of its stdin and
/// stdout (a pipe each, or both one socket).
pub(crate) struct Started {
    pub process: WorkerProcess,
    pub to: File,
    pub from: File,
}

/// A template's zygote, and the socket its requests go over.
pub(crate) struct Zygote {
    /// Taken only when dropped.
    process: Option<Child>,
    control: UnixStream,
}

impl Zygote {
    /// Starts one for the template in `dir`. It must be started from a
    /// thread that lives as long as the template: a parent-death signal
    /// follows the thread that started the process, and every worker
    /// cloned from it counts that thread as its parent.
    pub fn start(command: &WorkerCommand, dir: &Path) -> Result<Self, SpawnError> {
        let (control, theirs) = UnixStream::pair().map_err(|e| command.spawn_error(e))?;
        let process = command
            .command()
            .arg("--zygote")
            .arg(dir)
            .stdin(Stdio::from(OwnedFd::from(theirs)))
            .stdout(Stdio::null())
            .spawn()
            .map_err(|e| command.spawn_error(e))?;
        // Dropped on any error below: that kills and reaps it.
        let mut zygote = Self {
            process: Some(process),
            control,
        };
        zygote
            .control
            .set_read_timeout(Some(ZYGOTE_DEADLINE))
            .map_err(|e| command.spawn_error(e))?;
        // Ordering: the template is open in the zygote before this returns,
        // so that its workers see the template as the host opened it, even
        // if its files change right after.
        let mut first = [0u8; 1];
        zygote
            .control
            .read_exact(&mut first)
            .map_err(|e| command.spawn_error(e))?;
        if first[0] != OPENED {
            let e = std::io::Error::other("the zygote could not open the template");
            return Err(command.spawn_error(e));
        }
        Ok(zygote)
    }

    pub fn pid(&self) -> Option<u32> {
        self.process.as_ref().map(Child::id)
    }

    /// A new worker cloned from the zygote, as this process's child.
    pub fn clone_worker(&mut self) -> Result<Started, std::io::Error> {
        let (ours, theirs) = UnixStream::pair()?;
        self.control
            .send_with_fd(&[CLONE_WORKER][..], theirs.as_raw_fd())
            .map_err(|e| std::io::Error::from_raw_os_error(e.errno()))?;
        drop(theirs);
        let mut answer = [0u8; 4];
        self.control.read_exact(&mut answer)?;
        let pid = i32::from_le_bytes(answer);
        if pid <= 0 {
            return Err(std::io::Error::from_raw_os_error(-pid));
        }
        let from = File::from(OwnedFd::from(ours.try_clone()?));
        Ok(Started {
            process: WorkerProcess::Cloned {
                pid: pid.unsigned_abs(),
                status: None,
            },
            to: File::from(OwnedFd::from(ours)),
            from,
        })
    }
}

impl Drop for Zygote {
    fn drop(&mut self) {
        if let Some(mut process) = self.process.take() {
            let _ = process.kill();
            reap(WorkerProcess::Spawned(process));
        }
    }
}

/// Spawns a worker for the template in `dir` with `execve`.
pub(crate) fn spawn(command: &WorkerCommand, dir: &Path) -> Result<Started, SpawnError> {
    let mut child = command
        .command()
        .arg(dir)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| command.spawn_error(e))?;
    let (Some(to), Some(from)) = (child.stdin.take(), child.stdout.take()) else {
        let _ = child.kill();
        reap(WorkerProcess::Spawned(child));
        let no_pipes = std::io::Error::other("no pipes to the worker");
        return Err(command.spawn_error(no_pipes));
    };
    Ok(Started {
        process: WorkerProcess::Spawned(child),
        to: File::from(OwnedFd::from(to)),
        from: File::from(OwnedFd::from(from)),
    })
}

/// A worker process, a child of this one either way.
pub(crate) enum WorkerProcess {
    Spawned(Child),
    /// Cloned by the zygote with `CLONE_PARENT`; `status` once waited for
    /// (after which the pid is no longer this process's to signal).
    Cloned {
        pid: u32,
        status: Option<ExitStatus>,
    },
}

impl WorkerProcess {
    pub fn id(&self) -> u32 {
        match self {
            Self::Spawned(child) => child.id(),
            Self::Cloned { pid, .. } => *pid,
        }
    }

    pub fn kill(&mut self) {
        match self {
            Self::Spawned(child) => {
                let _ = child.kill();
            }
            Self::Cloned { pid, status: None } => {
                // SAFETY: kill(2) of a child not yet waited for, so the pid
                // is still this process's child's.
                unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
            }
            Self::Cloned { status: Some(_), .. } => {}
        }
    }

    pub fn wait(&mut self) -> std::io::Result<ExitStatus> {
        match self {
            Self::Spawned(child) => child.wait(),
            Self::Cloned {
                status: Some(status), ..
            } => Ok(*status),
            Self::Cloned { pid, status } => {
                let mut raw = 0;
                loop {
                    // SAFETY: waits for a child of this process; `raw` lives
                    // across the call.
                    let rc = unsafe { libc::waitpid(*pid as libc::pid_t, &mut raw, 0) };
                    if rc >= 0 {
                        break;
                    }
                    let e = std::io::Error::last_os_error();
                    if e.kind() != std::io::ErrorKind::Interrupted {
                        return Err(e);
                    }
                }
                let ended = ExitStatus::from_raw(raw);
                *status = Some(ended);
                Ok(ended)
            }
        }
    }
}

/// Waits for a killed worker on a thread of its own, so that none stays a
/// zombie and no caller waits for a VM to be torn down (some milliseconds
/// here).
pub(crate) fn reap(process: WorkerProcess) {
    let unsent = match reaper().lock() {
        Ok(tx) => tx.send(process).err().map(|back| back.0),
        Err(_) => Some(process),
    };
    if let Some(mut process) = unsent {
        let _ = process.wait();
    }
}

/// The thread that waits for killed workers.
fn reaper() -> &'static Mutex<Sender<WorkerProcess>> {
    static REAPER: OnceLock<Mutex<Sender<WorkerProcess>>> = OnceLock::new();
    REAPER.get_or_init(|| {
        let (tx, rx) = channel::<WorkerProcess>();
        // If the thread cannot start, the send fails and the dropper waits.
        let _ = std::thread::Builder::new()
            .name("zeroboot-reaper".into())
            .spawn(move || {
                for mut process in rx {
                    let _ = process.wait();
                }
            });
        Mutex::new(tx)
    })
}
