//! Values made ahead of time on a background thread: VM shells here
//! ([`super::Template`]), prepared worker processes in `zeroboot-sandbox`.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender, TryRecvError};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;

/// Values made ahead of time on a background thread: up to `size` kept
/// ready, taken without waiting. Used for VM shells here and for prepared
/// worker processes by `zeroboot-sandbox`.
///
/// The replacement for a taken value is made once the taker drops the
/// [`Refill`] that came with it, not at once: making one (a process, a VM)
/// while the taker starts its sandbox competes with it for the CPU, which
/// took a worker's spawn p99 from about 0.35 ms to 1–2.5 ms on a 2-core host.
pub struct ReadyPool<T: Send + 'static> {
    // A Mutex so that values can be taken from many threads at once.
    ready: Mutex<Receiver<T>>,
    /// Set when a taker finds no value ready; the filler clears it as it
    /// starts making the next one ([`Demand`]).
    missed: Arc<AtomicBool>,
    /// One permit per value the filler may make; None once dropping.
    permits: Option<SyncSender<()>>,
    filler: Option<JoinHandle<()>>,
}

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

/// Returned with a value taken from a [`ReadyPool`]: dropping it lets the
/// pool make the value's replacement.
pub struct Refill<'a>(&'a SyncSender<()>);

impl Drop for Refill<'_> {
    fn drop(&mut self) {
        // The channel holds at most `size` permits, as many as values can
        // be outstanding, so it has room; a closed pool needs none.
        let _ = self.0.try_send(());
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
        let (permits, permits_rx) = sync_channel(size);
        for _ in 0..size {
            permits.try_send(()).ok()?;
        }
        let missed = Arc::new(AtomicBool::new(false));
        let seen = missed.clone();
        let filler = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                // recv fails once the pool is dropped, and so does send.
                while permits_rx.recv().is_ok() {
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
            permits: Some(permits),
            filler: Some(filler),
        })
    }

    /// A ready value, if there is one now, and the [`Refill`] to drop once
    /// the caller's time-critical part is done.
    pub fn take(&self) -> Option<(T, Refill<'_>)> {
        let value = match self.ready.lock().ok()?.try_recv() {
            Ok(value) => value,
            Err(TryRecvError::Empty) => {
                self.missed.store(true, Ordering::Release);
                return None;
            }
            Err(TryRecvError::Disconnected) => return None,
        };
        Some((value, Refill(self.permits.as_ref()?)))
    }
}

impl<T: Send + 'static> Drop for ReadyPool<T> {
    fn drop(&mut self) {
        // Closing the permits stops a waiting filler; dropping the receiver
        // (and the values in it) makes the send of one that is making a
        // value fail, and it returns.
        self.permits = None;
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

    #[test]
    fn a_taken_value_is_replaced_only_after_its_refill_is_dropped() {
        let made = Arc::new(AtomicUsize::new(0));
        let counter = made.clone();
        let pool = ReadyPool::start(
            "test-pool",
            2,
            move |_| counter.fetch_add(1, Ordering::SeqCst),
            |_| false,
        )
        .expect("pool");
        assert!(wait_for(&made, 2), "the pool fills to its size");
        let (first, refill) = pool.take().expect("a ready value");
        assert_eq!(first, 0);
        std::thread::sleep(Duration::from_millis(50));
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
