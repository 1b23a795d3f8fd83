//! An ordered parallel pipeline: workers produce items `0..n` in any order, one consumer
//! receives them strictly in index order. At most `window` items are produced ahead of the
//! consumer, which bounds memory no matter how fast generation outruns the disk.

use std::collections::BTreeMap;
use std::sync::{Condvar, Mutex, MutexGuard};

struct State<T> {
    next_claim: usize,
    next_consume: usize,
    ready: BTreeMap<usize, T>,
    /// Set when the consumer failed or a worker panicked: everyone stops.
    stop: bool,
}

struct Shared<T> {
    state: Mutex<State<T>>,
    /// Signalled when the consumer takes an item (room in the window) or on stop.
    room: Condvar,
    /// Signalled when a worker finishes an item or on stop.
    ready: Condvar,
}

impl<T> Shared<T> {
    fn lock(&self) -> MutexGuard<'_, State<T>> {
        // A worker panic is handled through `stop`; the data itself stays consistent.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Stops the pipeline if a worker unwinds, so the consumer does not wait forever;
/// `thread::scope` then re-raises the panic.
struct PanicGuard<'a, T>(&'a Shared<T>);

impl<T> Drop for PanicGuard<'_, T> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.0.lock().stop = true;
            self.0.room.notify_all();
            self.0.ready.notify_all();
        }
    }
}

/// Runs `produce(i)` for every `i in 0..n` on `threads` workers and calls `consume(i, item)`
/// in increasing `i`. The first consumer error stops the workers and is returned.
pub fn run_ordered<T, E>(
    n: usize,
    threads: usize,
    window: usize,
    produce: impl Fn(usize) -> T + Sync,
    mut consume: impl FnMut(usize, T) -> Result<(), E>,
) -> Result<(), E>
where
    T: Send,
{
    let window = window.max(1);
    let shared = Shared {
        state: Mutex::new(State {
            next_claim: 0,
            next_consume: 0,
            ready: BTreeMap::new(),
            stop: false,
        }),
        room: Condvar::new(),
        ready: Condvar::new(),
    };
    let worker = || {
        let _guard = PanicGuard(&shared);
        loop {
            let i = {
                let mut st = shared.lock();
                loop {
                    if st.stop || st.next_claim >= n {
                        return;
                    }
                    if st.next_claim < st.next_consume + window {
                        break;
                    }
                    st = shared.room.wait(st).unwrap_or_else(|e| e.into_inner());
                }
                st.next_claim += 1;
                st.next_claim - 1
            };
            let item = produce(i);
            shared.lock().ready.insert(i, item);
            shared.ready.notify_one();
        }
    };

    std::thread::scope(|scope| {
        for _ in 0..threads.max(1) {
            scope.spawn(worker);
        }
        for i in 0..n {
            let item = {
                let mut st = shared.lock();
                loop {
                    if let Some(item) = st.ready.remove(&i) {
                        st.next_consume = i + 1;
                        break item;
                    }
                    if st.stop {
                        // A worker panicked; the scope re-raises it once we return.
                        return Ok(());
                    }
                    st = shared.ready.wait(st).unwrap_or_else(|e| e.into_inner());
                }
            };
            shared.room.notify_all();
            if let Err(e) = consume(i, item) {
                shared.lock().stop = true;
                shared.room.notify_all();
                return Err(e);
            }
        }
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    #[test]
    fn delivers_in_order_with_bounded_lookahead() {
        let consumed = AtomicUsize::new(0);
        let max_ahead = AtomicUsize::new(0);
        let mut seen = Vec::new();
        let window = 3;
        run_ordered(
            200,
            4,
            window,
            |i| {
                let ahead = i - consumed.load(Ordering::SeqCst);
                max_ahead.fetch_max(ahead, Ordering::SeqCst);
                // Uneven work so completions arrive out of order.
                std::thread::sleep(std::time::Duration::from_micros((i % 7) as u64 * 50));
                i * 2
            },
            |i, v| {
                seen.push((i, v));
                consumed.store(i + 1, Ordering::SeqCst);
                Ok::<_, ()>(())
            },
        )
        .unwrap();
        assert_eq!(seen, (0..200).map(|i| (i, i * 2)).collect::<Vec<_>>());
        // `consumed` trails the pipeline's own counter by at most one item.
        assert!(max_ahead.load(Ordering::SeqCst) <= window);
    }

    #[test]
    fn consumer_error_stops_the_pipeline() {
        let produced = AtomicUsize::new(0);
        let r = run_ordered(
            10_000,
            2,
            4,
            |i| {
                produced.fetch_add(1, Ordering::SeqCst);
                i
            },
            |i, _| if i == 5 { Err("disk full") } else { Ok(()) },
        );
        assert_eq!(r, Err("disk full"));
        assert!(produced.load(Ordering::SeqCst) < 100);
    }

    #[test]
    fn zero_items_is_fine() {
        run_ordered(0, 3, 2, |i| i, |_, _| Ok::<_, ()>(())).unwrap();
    }
}
