//! The backend thread: a thin mio loop around one [`Stack`] and its
//! [`GuestLink`].

use std::io;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use crate::error::NetError;
use crate::link::GuestLink;
use crate::stack::Stack;
use crate::stats::{Counters, NetStats};
use crate::NetConfig;

const GUEST_TOKEN: Token = Token(0);
const HOST_TOKEN: Token = Token(1);
const STOP_TOKEN: Token = Token(2);
const EVENTS_CAPACITY: usize = 8;

/// One sandbox's network backend, running on a thread of its own until the
/// handle is dropped.
pub struct Backend {
    stop: Arc<AtomicBool>,
    waker: Waker,
    counters: Arc<Counters>,
    thread: Option<JoinHandle<()>>,
}

impl Backend {
    /// Starts the backend's thread. Setup errors (the DNS socket, the
    /// poller) come back here rather than from the thread.
    pub fn spawn(config: NetConfig, link: Box<dyn GuestLink>) -> Result<Backend, NetError> {
        let stack = Stack::new(config)?;
        let poll = Poll::new().map_err(NetError::Poller)?;
        let register = |fd, token, what| {
            poll.registry()
                .register(&mut SourceFd(&fd), token, Interest::READABLE)
                .map_err(|source| NetError::Register { what, source })
        };
        register(link.wake_fd(), GUEST_TOKEN, "guest link's wake descriptor")?;
        if let Some(fd) = stack.host_events_fd() {
            register(fd, HOST_TOKEN, "host sockets' poller")?;
        }
        let waker = Waker::new(poll.registry(), STOP_TOKEN).map_err(|source| NetError::Register {
            what: "backend's stop waker",
            source,
        })?;
        let stop = Arc::new(AtomicBool::new(false));
        let counters = stack.counters();
        let (started, running) = std::sync::mpsc::sync_channel(0);
        let thread = std::thread::Builder::new()
            .name("zeroboot-net".to_owned())
            .spawn({
                let stop = Arc::clone(&stop);
                move || {
                    // Returns once the thread runs: the C library's and
                    // std's start-up calls (rseq, robust futex list, the
                    // thread's name) are behind it, so a seccomp filter
                    // installed after `spawn` need not allow them.
                    let _ = started.send(());
                    run(poll, stack, link, &stop)
                }
            })
            .map_err(NetError::Thread)?;
        running
            .recv()
            .map_err(|_| NetError::Thread(io::Error::other("the backend thread ended at its start")))?;
        Ok(Backend {
            stop,
            waker,
            counters,
            thread: Some(thread),
        })
    }

    /// Counters for tests and stats: connections opened/refused, bytes each
    /// way, DNS queries answered/refused.
    pub fn stats(&self) -> NetStats {
        self.counters.snapshot()
    }
}

fn run(mut poll: Poll, mut stack: Stack, mut link: Box<dyn GuestLink>, stop: &AtomicBool) {
    let mut events = Events::with_capacity(EVENTS_CAPACITY);
    loop {
        // Cleared before draining, so a frame sent after the drain wakes
        // the next wait instead of being lost between the two.
        link.clear_wake();
        link.drain_sent(&mut |frame| stack.from_guest(frame));
        stack.poll(Instant::now());
        stack.send_to_guest(&mut |frame| link.deliver(frame));
        if stop.load(Ordering::Acquire) {
            break;
        }
        // Frames the guest has no buffer for wait for its wake (it gave
        // buffers), not for a timer.
        let timeout = stack.poll_delay(Instant::now());
        if let Err(error) = poll.poll(&mut events, timeout) {
            if error.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            tracing::error!(%error, "network backend poll failed; the sandbox loses its network");
            break;
        }
    }
    // Dropping the stack closes every host socket.
    drop(stack);
}

impl Drop for Backend {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Err(error) = self.waker.wake() {
            // Joining could then wait for ever; the thread still stops at
            // its next wake, and its sockets close then.
            tracing::error!(%error, "could not wake the network thread; leaving it to stop on its own");
            return;
        }
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("the network thread panicked");
            }
        }
    }
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("stats", &self.stats())
            .finish_non_exhaustive()
    }
}
