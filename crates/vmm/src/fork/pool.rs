//! Values made ahead of time on a background thread: VM shells here
//! ([`super::Template`]), prepared worker processes in `zeroboot-sandbox`.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, TryRecvError};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

/// Values made ahead of time on a background thread: up to `size` kept
/// ready, taken without waiting. Used for VM shells here and for prepared
/// worker processes by `zeroboot-sandbox`.
///
/// The replacement for a taken value is made once the taker drops the
/// [`Refill`] that came with it, or [`REFILL_AT_LATEST`] after the take,
/// not at once: making one (a process, a VM) while the taker starts its
/// sandbox competes with it for the CPU, which took a worker's spawn p99
/// from about 0.35 ms to 1–2.5 ms on a 2-core host.
pub struct ReadyPool<T: Send + 'static> {
    // A Mutex so that values can be taken from many threads at once.
    ready: Mutex<Receiver<T>>,
    /// Set when a taker finds no value ready; the filler clears it as it
    /// starts making the next one ([`Demand`]).
    missed: Arc<AtomicBool>,
    permits: Arc<Permits>,
    filler: Option<JoinHandle<()>>,
}

/// How long the filler waits for a taker to drop its [`Refill`]: a taker
/// that holds it through a first request that runs for seconds, or keeps
/// a sandbox idle, does not leave the pool empty.
pub const REFILL_AT_LATEST: Duration = Duration::from_millis(50);

/// What a [`ReadyPool`]'s filler knows of demand as it starts making a value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Demand {
    /// Every taker since the last value was made found one ready: the value
    /// will probably wait in the pool for a while.
    KeptUp,
    /// A taker found the pool empty since the last value was made: requests
    /// come faster than values are made, and this one will be taken at once.
    Behind,
}

/// Which values the filler may make, shared by the pool, its filler and
/// the [`Refill`]s out.
#[derive(Default)]
struct Permits {
    state: Mutex<PermitState>,
    changed: Condvar,
}

#[derive(Default)]
struct PermitState {
    /// Values the filler may make now.
    free: usize,
    /// Values taken whose [`Refill`] is still held: its ticket and when
    /// the filler may make its replacement anyway. In taking order, so
    /// the first is due first.
    held: VecDeque<(u64, Instant)>,
    next_ticket: u64,
    /// Set as the pool is dropped: the filler stops.
    closed: bool,
}

impl Permits {
    fn lock(&self) -> MutexGuard<'_, PermitState> {
        // The state stays consistent through a panic (every change is one
        // statement), so a poisoned lock is still usable.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until the filler may make a value; false once the pool is
    /// closed.
    fn acquire(&self) -> bool {
        let mut state = self.lock();
        loop {
            if state.closed {
                return false;
            }
            if state.free > 0 {
                state.free -= 1;
                return true;
            }
            let now = Instant::now();
            state = match state.held.front() {
                Some(&(_, due)) if due <= now => {
                    state.held.pop_front();
                    return true;
                }
                Some(&(_, due)) => {
                    let wait = due - now;
                    self.changed
                        .wait_timeout(state, wait)
                        .map_or_else(|e| e.into_inner().0, |(s, _)| s)
                }
                None => self
                    .changed
                    .wait(state)
                    .unwrap_or_else(std::sync::PoisonError::into_inner),
            };
        }
    }

    fn hold(&self) -> u64 {
        let mut state = self.lock();
        let ticket = state.next_ticket;
        state.next_ticket += 1;
        state.held.push_back((ticket, Instant::now() + REFILL_AT_LATEST));
        self.changed.notify_one();
        ticket
    }

    fn release(&self, ticket: u64) {
        let mut state = self.lock();
        // Not held any more once the filler went ahead without it.
        if let Some(at) = state.held.iter().position(|&(t, _)| t == ticket) {
            state.held.remove(at);
            state.free += 1;
            self.changed.notify_one();
        }
    }

    fn close(&self) {
        self.lock().closed = true;
        self.changed.notify_all();
    }
}

/// Returned with a value taken from a [`ReadyPool`]: dropping it lets the
/// pool make the value's replacement (which it does anyway
/// [`REFILL_AT_LATEST`] after the take). It may outlive the pool.
pub struct Refill {
    permits: Arc<Permits>,
    ticket: u64,
}

impl Drop for Refill {
    fn drop(&mut self) {
        self.permits.release(self.ticket);
    }
}

impl<T: Send + 'static> ReadyPool<T> {
    /// Starts thread `name`, which calls `make` to keep up to `size` values
    /// ready, telling it whether the pool is keeping up. It stops after a
    /// value for which `is_last` holds (a failure, which the next taker
    /// receives), or when the pool is dropped. None if `size` is 0 or the
    /// thread cannot start.
    pub fn start(
        name: &str,
        size: usize,
        mut make: impl FnMut(Demand) -> T + Send + 'static,
        is_last: fn(&T) -> bool,
    ) -> Option<Self> {
        if size == 0 {
            return None;
        }
        let (tx, rx) = sync_channel(size);
        let permits = Arc::new(Permits::default());
        permits.lock().free = size;
        let missed = Arc::new(AtomicBool::new(false));
        let seen = missed.clone();
        let filler_permits = permits.clone();
        let filler = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // send fails once the pool is dropped.
                while filler_permits.acquire() {
                    let demand = if seen.swap(false, Ordering::AcqRel) {
                        Demand::Behind
                    } else {
                        Demand::KeptUp
                    };
                    let value = make(demand);
                    let last = is_last(&value);
                    if tx.send(value).is_err() || last {
                        return;
                    }
                }
            })
            .ok()?;
        Some(Self {
            ready: Mutex::new(rx),
            missed,
            permits,
            filler: Some(filler),
        })
    }

    /// A ready value, if there is one now, and the [`Refill`] to drop once
    /// the caller's time-critical part is done.
    pub fn take(&self) -> Option<(T, Refill)> {
        let value = match self.ready.lock().ok()?.try_recv() {
            Ok(value) => value,
            Err(TryRecvError::Empty) => {
                self.missed.store(true, Ordering::Release);
                return None;
            }
            Err(TryRecvError::Disconnected) => return None,
        };
        let ticket = self.permits.hold();
        Some((
            value,
            Refill {
                permits: self.permits.clone(),
                ticket,
            },
        ))
    }
}

impl<T: Send + 'static> Drop for ReadyPool<T> {
    fn drop(&mut self) {
        // Closing the permits stops a waiting filler; dropping the receiver
        // (and the values in it) makes the send of one that is making a
        // value fail, and it returns.
        self.permits.close();
        let (_, dead) = sync_channel::<T>(0);
        drop(std::mem::replace(&mut self.ready, Mutex::new(dead)));
        if let Some(filler) = self.filler.take() {
            let _ = filler.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    fn wait_for(made: &AtomicUsize, n: usize) -> bool {
        let end = Instant::now() + Duration::from_secs(5);
        while Instant::now() < end {
            if made.load(Ordering::SeqCst) == n {
                return true;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        false
    }

    /// A pool of `size` whose values count up from 0, and how many it made.
    fn counting_pool(size: usize) -> (ReadyPool<usize>, Arc<AtomicUsize>) {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let pool = ReadyPool::start(
            "test-pool",
            size,
            move |_| counter.fetch_add(1, Ordering::SeqCst),
            |_| false,
        )
        .expect("pool");
        (pool, made)
    }

    #[test]
    fn a_taken_value_is_replaced_only_after_its_refill_is_dropped() {
        let (pool, made) = counting_pool(2);
        assert!(wait_for(&made, 2), "the pool fills to its size");
        let (first, refill) = pool.take().expect("a ready value");
        assert_eq!(first, 0);
        std::thread::sleep(REFILL_AT_LATEST / 3);
        assert_eq!(
            made.load(Ordering::SeqCst),
            2,
            "no replacement while the taker holds its refill"
        );
        drop(refill);
        assert!(wait_for(&made, 3), "the replacement follows the refill");
        let (second, refill) = pool.take().expect("a ready value");
        assert_eq!(second, 1);
        drop(refill);
        drop(pool);
    }

    #[test]
    fn a_held_refill_delays_the_replacement_only_so_long() {
        let (pool, made) = counting_pool(1);
        assert!(wait_for(&made, 1), "the pool fills");
        let taken = Instant::now();
        let (_, refill) = pool.take().expect("a ready value");
        assert!(wait_for(&made, 2), "the replacement is made with the refill held");
        assert!(
            taken.elapsed() >= REFILL_AT_LATEST,
            "not before REFILL_AT_LATEST: {:?}",
            taken.elapsed()
        );
        drop(pool);
        // Its permit is gone with the pool: dropping it changes nothing.
        drop(refill);
    }

    #[test]
    fn the_filler_is_told_when_a_taker_found_the_pool_empty() {
        let made = Arc::new(AtomicUsize::new(0));
        let demands = Arc::new(Mutex::new(Vec::new()));
        let (counter, seen) = (made.clone(), demands.clone());
        let pool = ReadyPool::start(
            "test-pool",
            1,
            move |demand| {
                seen.lock().expect("demands").push(demand);
                counter.fetch_add(1, Ordering::SeqCst)
            },
            |_| false,
        )
        .expect("pool");
        assert!(wait_for(&made, 1), "the pool fills");
        let (_, refill) = pool.take().expect("a ready value");
        assert!(pool.take().is_none(), "the pool is empty until the refill");
        drop(refill);
        assert!(wait_for(&made, 2), "the replacement follows the refill");
        let (_, refill) = pool.take().expect("a ready value");
        drop(refill);
        assert!(wait_for(&made, 3), "the replacement follows the refill");
        assert_eq!(
            *demands.lock().expect("demands"),
            [Demand::KeptUp, Demand::Behind, Demand::KeptUp],
            "only the value made after a miss is made Behind"
        );
        drop(pool);
    }

    #[test]
    fn the_filler_stops_after_a_last_value() {
        let pool = ReadyPool::start("test-pool", 3, |_| 7, |&v| v == 7).expect("pool");
        let end = Instant::now() + Duration::from_secs(5);
        let taken = loop {
            if let Some((v, refill)) = pool.take() {
                drop(refill);
                break Some(v);
            }
            if Instant::now() > end {
                break None;
            }
            std::thread::sleep(Duration::from_millis(5));
        };
        assert_eq!(taken, Some(7));
        std::thread::sleep(Duration::from_millis(50));
        assert!(pool.take().is_none(), "nothing is made after a last value");
    }
}
