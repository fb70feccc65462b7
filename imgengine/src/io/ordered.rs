//! An ordered parallel map: one producer thread reads (disk blocks for a capture, chunk
//! records for a deploy), `threads` workers do the CPU work (compress; check, decompress,
//! hash), and the caller's thread consumes the results strictly in production order
//! (write the image; write the target). At most `depth` items are in flight, so memory is
//! bounded by `depth` chunks whatever the image size; `run_weighted` bounds them by bytes
//! too, so memory does not grow with the chunk size either.
//!
//! Each item gets a one-slot result channel whose receiver is queued, in order, to the
//! consumer; the bounded queue of receivers is what limits the items in flight. When the
//! consumer stops (an error, in order: nothing after a bad chunk is consumed) it drops the
//! queue and the producer's next send fails, which tells it to stop.

use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Condvar, Mutex};

use crate::error::{Error, Result};

/// Items in flight for `threads` workers: two more than the workers so none waits for the
/// reader, but at most 6, so that with 4 MiB chunks (a few MiB of payload plus 4 MiB
/// decoded each) the pipelines stay near 32 MiB however many threads are asked for.
pub fn pipeline_depth(threads: usize) -> usize {
    (threads + 2).min(6)
}

/// What a producer hands over: work for a worker, or a result that needs no work (a zero
/// chunk, or the producer's own error, which must reach the consumer in order).
pub enum Item<J, R> {
    Job(J),
    Ready(Result<R>),
}

/// Run the pipeline. `produce` gets an emitter that returns `false` once the consumer has
/// stopped (the producer should then return). Returns the first error in production order.
pub fn run_ordered<J, R, P, W, C>(
    threads: usize,
    depth: usize,
    produce: P,
    work: W,
    consume: C,
) -> Result<()>
where
    J: Send,
    R: Send,
    P: FnOnce(&mut dyn FnMut(Item<J, R>) -> bool) -> Result<()> + Send,
    W: Fn(J) -> Result<R> + Sync,
    C: FnMut(R) -> Result<()>,
{
    run_weighted(
        threads,
        depth,
        u64::MAX,
        |emit| produce(&mut |item| emit(item, 0)),
        work,
        consume,
    )
}

/// Bytes of the items in flight: the producer waits before emitting an item that would
/// take the total over the limit (an item heavier than the limit waits until it is alone),
/// the consumer gives an item's bytes back once it has consumed it. Closed when the
/// consumer stops, so a waiting producer is released.
struct Budget {
    limit: u64,
    state: Mutex<(u64, bool)>,
    freed: Condvar,
}

impl Budget {
    /// Wait for room for `n` bytes; false once closed.
    fn take(&self, n: u64) -> bool {
        let Ok(mut st) = self.state.lock() else {
            return false;
        };
        while !st.1 && st.0 > 0 && st.0.saturating_add(n) > self.limit {
            st = match self.freed.wait(st) {
                Ok(s) => s,
                Err(_) => return false,
            };
        }
        if st.1 {
            return false;
        }
        st.0 = st.0.saturating_add(n);
        true
    }

    fn give(&self, n: u64) {
        if let Ok(mut st) = self.state.lock() {
            st.0 = st.0.saturating_sub(n);
        }
        self.freed.notify_all();
    }

    fn close(&self) {
        if let Ok(mut st) = self.state.lock() {
            st.1 = true;
        }
        self.freed.notify_all();
    }
}

/// `run_ordered` with in-flight items bounded by bytes as well as by count: the emitter
/// takes each item's weight (its bytes in memory until consumed: payload plus decoded
/// data), and at most `budget` bytes are in flight, whatever the size of the items.
pub fn run_weighted<J, R, P, W, C>(
    threads: usize,
    depth: usize,
    budget: u64,
    produce: P,
    work: W,
    mut consume: C,
) -> Result<()>
where
    J: Send,
    R: Send,
    P: FnOnce(&mut dyn FnMut(Item<J, R>, u64) -> bool) -> Result<()> + Send,
    W: Fn(J) -> Result<R> + Sync,
    C: FnMut(R) -> Result<()>,
{
    let threads = threads.max(1);
    let depth = depth.max(1);
    let budget = Budget {
        limit: budget,
        state: Mutex::new((0, false)),
        freed: Condvar::new(),
    };
    let budget = &budget;
    let (order_tx, order_rx) = sync_channel::<(Receiver<Result<R>>, u64)>(depth);
    let (job_tx, job_rx) = sync_channel::<(J, SyncSender<Result<R>>)>(depth);
    let job_rx = Mutex::new(job_rx);
    let (job_rx, work) = (&job_rx, &work);
    std::thread::scope(|s| {
        for _ in 0..threads {
            s.spawn(move || loop {
                // The lock is held only while waiting for the next job, not while working.
                let next = match job_rx.lock() {
                    Ok(rx) => rx.recv(),
                    Err(_) => return,
                };
                match next {
                    Ok((job, tx)) => {
                        let _ = tx.send(work(job));
                    }
                    Err(_) => return,
                }
            });
        }
        let producer = s.spawn(move || {
            let mut emit = |item: Item<J, R>, weight: u64| -> bool {
                if !budget.take(weight) {
                    return false;
                }
                let (tx, rx) = sync_channel(1);
                if order_tx.send((rx, weight)).is_err() {
                    return false;
                }
                match item {
                    Item::Job(j) => job_tx.send((j, tx)).is_ok(),
                    Item::Ready(r) => tx.send(r).is_ok(),
                }
            };
            produce(&mut emit)
        });
        let mut result = Ok(());
        for (rx, weight) in order_rx.iter() {
            let r = match rx.recv() {
                Ok(Ok(r)) => consume(r),
                Ok(Err(e)) => Err(e),
                Err(_) => Err(Error::new(
                    crate::error::ErrorKind::Io,
                    "a pipeline worker stopped unexpectedly",
                )),
            };
            budget.give(weight);
            if let Err(e) = r {
                result = Err(e);
                break;
            }
        }
        budget.close();
        drop(order_rx);
        let produced = producer.join().unwrap_or_else(|_| {
            Err(Error::new(
                crate::error::ErrorKind::Io,
                "the pipeline reader stopped unexpectedly",
            ))
        });
        result.and(produced)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;

    #[test]
    fn results_arrive_in_order() {
        let mut out = Vec::new();
        run_ordered(
            4,
            3,
            |emit| {
                for i in 0..200u64 {
                    let item = if i % 10 == 0 {
                        Item::Ready(Ok(i * 2))
                    } else {
                        Item::Job(i)
                    };
                    if !emit(item) {
                        break;
                    }
                }
                Ok(())
            },
            |i| {
                // Uneven work so workers finish out of order.
                std::thread::sleep(std::time::Duration::from_micros((i % 7) * 50));
                Ok(i * 2)
            },
            |r| {
                out.push(r);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, (0..200u64).map(|i| i * 2).collect::<Vec<_>>());
    }

    #[test]
    fn first_error_in_order_stops_everything() {
        let mut consumed = Vec::new();
        let e = run_ordered(
            2,
            2,
            |emit| {
                for i in 0..1_000_000u64 {
                    if !emit(Item::Job(i)) {
                        return Ok(());
                    }
                }
                Ok(())
            },
            |i| {
                if i == 5 {
                    Err(Error::corrupt(format!("item {i}")))
                } else {
                    Ok(i)
                }
            },
            |r| {
                consumed.push(r);
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert_eq!(consumed, vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn bytes_in_flight_stay_within_the_budget() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let in_flight = AtomicU64::new(0);
        let peak = AtomicU64::new(0);
        let heavy_done = std::sync::atomic::AtomicBool::new(false);
        let mut out = Vec::new();
        run_weighted(
            4,
            64,
            100,
            |emit| {
                for i in 0..200u64 {
                    // Weights 1..=40, and one heavier than the whole budget.
                    let w = if i == 77 { 250 } else { i % 40 + 1 };
                    let now = in_flight.fetch_add(w, Ordering::SeqCst) + w;
                    // Not counted: the heavy item, which waits until it is alone.
                    let heavy = if (78..).contains(&i) && !heavy_done.load(Ordering::SeqCst) {
                        250
                    } else {
                        0
                    };
                    if i != 77 {
                        peak.fetch_max(now.saturating_sub(heavy), Ordering::SeqCst);
                    }
                    if !emit(Item::Job((i, w)), w) {
                        break;
                    }
                }
                Ok(())
            },
            |(i, w): (u64, u64)| Ok((i, w)),
            |(i, w)| {
                // An item's weight is only given back after it is consumed.
                in_flight.fetch_sub(w, Ordering::SeqCst);
                if i == 77 {
                    heavy_done.store(true, Ordering::SeqCst);
                }
                out.push(i);
                Ok(())
            },
        )
        .unwrap();
        assert_eq!(out, (0..200).collect::<Vec<_>>());
        // The producer counts an item just before emit waits for room for it, so one
        // item's weight (at most 40) may be counted ahead.
        let p = peak.load(Ordering::SeqCst);
        assert!(p <= 100 + 40, "peak {p}");
    }

    #[test]
    fn a_stopped_consumer_releases_a_producer_waiting_for_budget() {
        let e = run_weighted(
            1,
            8,
            10,
            |emit| {
                for i in 0..100u64 {
                    if !emit(Item::Job(i), 10) {
                        return Ok(());
                    }
                }
                Ok(())
            },
            Ok,
            |i| {
                if i == 3 {
                    Err(Error::corrupt("stop"))
                } else {
                    Ok(())
                }
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
    }

    #[test]
    fn producer_error_is_delivered_in_place() {
        let mut consumed = 0;
        let e = run_ordered(
            2,
            2,
            |emit| {
                emit(Item::Job(1u32));
                emit(Item::Ready(Err(Error::new(ErrorKind::Truncated, "cut"))));
                Ok(())
            },
            Ok,
            |_| {
                consumed += 1;
                Ok(())
            },
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated);
        assert_eq!(consumed, 1);
    }
}
