//! A small process-wide pool of large byte buffers, so the buffers a deploy or a multicast
//! receiver fills for every chunk (a received object, a payload, its decompressed bytes)
//! are allocated a bounded number of times per run instead of once per chunk.
//!
//! Why: the static binary uses musl's allocator, which maps every allocation over 128 KiB
//! with its own `mmap` and unmaps it on free; a 4 MiB buffer then costs a `munmap` and a
//! page fault per 4 KiB page each time it is used afresh. Measured on a multicast receiver
//! (perf, release musl build, 2 % loss), page faults and `munmap` were about 30 % of its
//! CPU time. A buffer taken from here is already mapped and faulted in.
//!
//! Bounded: the pool holds at most [`MAX_BUFFERS`] idle buffers and [`MAX_IDLE_BYTES`] of
//! idle capacity; beyond that a returned buffer is freed as before. Buffers smaller than
//! [`MIN_POOLED`] are not kept (the allocator serves those from its heap cheaply).

use std::sync::Mutex;

/// Smallest capacity worth keeping: musl maps allocations above 128 KiB on their own.
pub const MIN_POOLED: usize = 128 << 10;
/// Idle buffers kept at most.
pub const MAX_BUFFERS: usize = 8;
/// Idle capacity kept at most, in bytes (on top of the buffers in use).
pub const MAX_IDLE_BYTES: usize = 24 << 20;

static POOL: Mutex<Vec<Vec<u8>>> = Mutex::new(Vec::new());

/// An empty buffer with a capacity of at least `min_cap` bytes when the pool has one (the
/// smallest that fits), otherwise an empty `Vec` that allocates nothing until used; the
/// caller reserves what it needs either way.
pub fn take(min_cap: usize) -> Vec<u8> {
    if min_cap < MIN_POOLED {
        return Vec::new();
    }
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    let best = p
        .iter()
        .enumerate()
        .filter(|(_, b)| b.capacity() >= min_cap)
        .min_by_key(|(_, b)| b.capacity())
        .map(|(i, _)| i);
    match best {
        Some(i) => p.swap_remove(i),
        None => Vec::new(),
    }
}

/// Hand a buffer back for reuse (its contents are discarded). Small buffers, and any
/// beyond the pool's bounds, are freed.
pub fn give(mut buf: Vec<u8>) {
    if buf.capacity() < MIN_POOLED || buf.capacity() > MAX_IDLE_BYTES {
        return;
    }
    buf.clear();
    let mut p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    p.push(buf);
    // Over a bound: free the smallest buffers first (the large ones are the costly ones to
    // map and fault in again).
    while p.len() > MAX_BUFFERS || p.iter().map(Vec::capacity).sum::<usize>() > MAX_IDLE_BYTES {
        let Some(i) = p
            .iter()
            .enumerate()
            .min_by_key(|(_, b)| b.capacity())
            .map(|(i, _)| i)
        else {
            break;
        };
        p.swap_remove(i);
    }
}

/// Idle buffers and their total capacity (for tests).
pub fn idle() -> (usize, usize) {
    let p = POOL.lock().unwrap_or_else(|e| e.into_inner());
    (p.len(), p.iter().map(Vec::capacity).sum())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reuses_buffers_within_bounds() {
        // Tests share the process-wide pool: only facts that hold whatever else runs.
        let mut b = take(1 << 20);
        b.reserve_exact(1 << 20);
        b.extend_from_slice(&[7u8; 1000]);
        give(b);
        let again = take(1 << 20);
        // Another test may have taken it in between; when we got one, it is empty and fits.
        assert!(again.is_empty());
        if again.capacity() > 0 {
            assert!(again.capacity() >= 1 << 20);
        }
        give(again);
        // Small buffers are not kept, and asking for little gives a fresh Vec.
        assert_eq!(take(100).capacity(), 0);
        for _ in 0..3 * MAX_BUFFERS {
            give(Vec::with_capacity(4 << 20));
        }
        let (n, bytes) = idle();
        assert!(n <= MAX_BUFFERS, "{n} idle buffers");
        assert!(bytes <= MAX_IDLE_BYTES, "{bytes} idle bytes");
        // Too large to keep idle at all.
        give(Vec::with_capacity(MAX_IDLE_BYTES + 1));
        assert!(idle().1 <= MAX_IDLE_BYTES);
    }
}
