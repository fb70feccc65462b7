//! The binary's global allocator: musl's `malloc` with a small, bounded cache of large freed
//! blocks in front of it.
//!
//! Why: musl maps every block above about 128 KiB with its own `mmap` and unmaps it on `free`.
//! A multicast receiver at 2 % loss decodes nearly every block with RaptorQ, and the
//! decoder allocates its work areas (0.2 to 2 MB each) afresh for every block: measured with
//! 128-symbol blocks, about 17,000 of a receiver's 28,000 page faults for a 64 MiB disk, each
//! page mapped, zeroed by the kernel and unmapped again. A general-purpose allocator (mimalloc) removed them but raised
//! the on-the-fly master's peak resident memory from 57 to 79 MiB, above the 64 MiB bound, and
//! added 120 KB to the binary. This cache keeps at most [`SLOTS`] freed blocks of
//! [`MIN`]..=[`MAX`] bytes, [`BUDGET`] bytes in all, and hands one back only for a request of
//! exactly its size class: the resident cost is bounded by [`BUDGET`], and everything else goes
//! straight to musl as before.
//!
//! Size classes: a request of `MIN..=MAX` bytes (alignment at most 16, what `malloc` gives) is
//! rounded up to a multiple of [`GRAIN`] (at most 1/8 more) and allocated from musl at
//! that size, so the size a block is freed with names its class exactly; `realloc` keeps that
//! rule (see [`actual_size`]).

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Smallest block the cache keeps: musl's own threshold for mapping a block by itself. (Caching
/// from 16 KiB up, which musl serves from small mapped groups, measured more page faults, not
/// fewer: the small blocks took the slots the decoder's large ones need.)
pub const MIN: usize = 128 * 1024;
/// Largest block the cache keeps: the RaptorQ decoder's work areas for a 512-symbol block
/// are 0.74, 1.29 and 2.11 MB (counted with `strace -e mmap` on a receiver).
pub const MAX: usize = 2560 * 1024;
/// Size classes are multiples of this (at most 1/8 above the request, as `MIN / GRAIN` = 8).
pub const GRAIN: usize = 16 * 1024;
/// At most this many cached blocks.
pub const SLOTS: usize = 12;
/// At most this many cached bytes (resident: every cached block has been used).
pub const BUDGET: usize = 6 * 1024 * 1024;
/// The alignment `malloc` guarantees on x86-64; larger alignments bypass the cache.
const MALLOC_ALIGN: usize = 16;

/// The size the system allocator is asked for, for a request of `size` bytes at `align`.
pub const fn actual_size(size: usize, align: usize) -> usize {
    if align <= MALLOC_ALIGN && size >= MIN && size <= MAX {
        size.div_ceil(GRAIN) * GRAIN
    } else {
        size
    }
}

struct Slots {
    /// `(address, size)`; address 0 is an empty slot.
    blocks: [(usize, usize); SLOTS],
    bytes: usize,
}

/// The allocator: [`System`] plus the cache.
pub struct BlockCache {
    slots: Mutex<Slots>,
}

impl BlockCache {
    pub const fn new() -> Self {
        BlockCache {
            slots: Mutex::new(Slots {
                blocks: [(0, 0); SLOTS],
                bytes: 0,
            }),
        }
    }

    /// A cached block of exactly `actual` bytes, taken out of the cache.
    fn take(&self, actual: usize) -> Option<*mut u8> {
        // The lock is never held across an allocation, so it cannot be taken twice by one
        // thread; a poisoned lock (impossible: nothing in it panics) just bypasses the cache.
        let mut s = self.slots.lock().ok()?;
        let i = s.blocks.iter().position(|&(a, n)| a != 0 && n == actual)?;
        let (addr, n) = s.blocks[i];
        s.blocks[i] = (0, 0);
        s.bytes -= n;
        Some(addr as *mut u8)
    }

    /// Keeps a freed block of `actual` bytes if there is room; false when the caller must free it.
    fn keep(&self, ptr: *mut u8, actual: usize) -> bool {
        let Ok(mut s) = self.slots.lock() else {
            return false;
        };
        if s.bytes + actual > BUDGET {
            return false;
        }
        let Some(i) = s.blocks.iter().position(|&(a, _)| a == 0) else {
            return false;
        };
        s.blocks[i] = (ptr as usize, actual);
        s.bytes += actual;
        true
    }

    /// Number of cached blocks and their bytes (for tests).
    pub fn cached(&self) -> (usize, usize) {
        let s = self.slots.lock().expect("cache lock");
        (s.blocks.iter().filter(|&&(a, _)| a != 0).count(), s.bytes)
    }
}

impl Default for BlockCache {
    fn default() -> Self {
        Self::new()
    }
}

fn cacheable(layout: Layout) -> bool {
    layout.align() <= MALLOC_ALIGN && layout.size() >= MIN && layout.size() <= MAX
}

// SAFETY: every block handed out is either fresh from `System` at `actual_size` bytes with the
// caller's alignment, or a block of exactly that actual size and an alignment of at most 16
// that a caller freed earlier and nobody else holds (a slot is emptied under the lock before its
// block is returned). Blocks are returned to `System` with the same actual size they were
// allocated with, and `realloc` keeps the invariant "actual size = actual_size(layout)".
#[allow(unsafe_code)]
unsafe impl GlobalAlloc for BlockCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if !cacheable(layout) {
            // SAFETY: the caller's contract, passed on unchanged.
            return unsafe { System.alloc(layout) };
        }
        let actual = actual_size(layout.size(), layout.align());
        if let Some(p) = self.take(actual) {
            return p;
        }
        // SAFETY: actual >= size > 0 and the alignment is the caller's, a power of two.
        unsafe { System.alloc(Layout::from_size_align_unchecked(actual, layout.align())) }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if !cacheable(layout) {
            // SAFETY: the caller's contract, passed on unchanged.
            return unsafe { System.alloc_zeroed(layout) };
        }
        let actual = actual_size(layout.size(), layout.align());
        if let Some(p) = self.take(actual) {
            // SAFETY: p is a block of `actual` >= size bytes that only this caller holds.
            unsafe { std::ptr::write_bytes(p, 0, layout.size()) };
            return p;
        }
        // SAFETY: as in `alloc`; calloc of a fresh mapping does not zero it twice.
        unsafe { System.alloc_zeroed(Layout::from_size_align_unchecked(actual, layout.align())) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        if cacheable(layout) {
            let actual = actual_size(layout.size(), layout.align());
            if self.keep(ptr, actual) {
                return;
            }
            // SAFETY: the block was allocated from System at `actual` bytes (see `alloc`).
            return unsafe {
                System.dealloc(
                    ptr,
                    Layout::from_size_align_unchecked(actual, layout.align()),
                )
            };
        }
        // SAFETY: the caller's contract, passed on unchanged.
        unsafe { System.dealloc(ptr, layout) }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old_actual = actual_size(layout.size(), layout.align());
        let new_actual = actual_size(new_size, layout.align());
        if old_actual == new_actual {
            // The block already has room: same size class (or the same exact size).
            return ptr;
        }
        // SAFETY: the block was allocated from System at `old_actual` bytes with this alignment
        // (a cached block too: it was allocated at its class size); System's realloc (musl's,
        // which can move a mapping with mremap instead of copying) returns one of
        // `new_actual` bytes, the size a later dealloc or realloc of `new_size` assumes.
        unsafe {
            System.realloc(
                ptr,
                Layout::from_size_align_unchecked(old_actual, layout.align()),
                new_actual,
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_mid_sized_blocks_are_rounded_to_their_class() {
        assert_eq!(actual_size(100, 8), 100);
        assert_eq!(actual_size(MIN - 1, 8), MIN - 1);
        assert_eq!(actual_size(MIN, 8), MIN);
        assert_eq!(actual_size(MIN + 1, 8), MIN + GRAIN);
        assert_eq!(actual_size(200_000, 8), 212_992); // 13 steps of 16 KiB
        assert_eq!(actual_size(212_992, 8), 212_992);
        // Never more than 1/8 above the request.
        for size in (MIN..=MAX).step_by(997) {
            let a = actual_size(size, 16);
            assert!(a >= size && a - size <= size / 8, "{size} -> {a}");
        }
        assert_eq!(actual_size(MAX, 16), MAX);
        assert_eq!(actual_size(MAX + 1, 8), MAX + 1);
        // Larger alignments than malloc's bypass the cache and keep their exact size.
        assert_eq!(actual_size(MIN + 1, 64), MIN + 1);
    }

    #[allow(unsafe_code)]
    #[test]
    fn a_freed_block_serves_the_next_request_of_its_class_and_no_other() {
        let c = BlockCache::new();
        let l = Layout::from_size_align(200_000, 8).unwrap();
        // SAFETY: each block is used within its layout and freed once with it.
        unsafe {
            let a = c.alloc(l);
            assert!(!a.is_null());
            std::ptr::write_bytes(a, 0xAB, l.size());
            c.dealloc(a, l);
            assert_eq!(c.cached(), (1, actual_size(200_000, 8)));
            // Another size class is not served from it.
            let other = Layout::from_size_align(400_000, 8).unwrap();
            let b = c.alloc(other);
            assert_ne!(b, a);
            assert_eq!(c.cached().0, 1);
            c.dealloc(b, other);
            // The same class (a slightly different size) is, and zeroed when asked.
            let l2 = Layout::from_size_align(200_001, 8).unwrap();
            let z = c.alloc_zeroed(l2);
            assert_eq!(z, a);
            assert!(std::slice::from_raw_parts(z, l2.size())
                .iter()
                .all(|&x| x == 0));
            assert_eq!(c.cached().0, 1, "the 400 kB block stays cached");
            c.dealloc(z, l2);
            assert_eq!(c.cached().0, 2);
        }
    }

    #[allow(unsafe_code)]
    #[test]
    fn the_cache_never_holds_more_than_its_budget_or_its_slots() {
        let c = BlockCache::new();
        let l = Layout::from_size_align(MAX, 16).unwrap();
        // SAFETY: each block is freed once with its own layout.
        unsafe {
            let blocks: Vec<*mut u8> = (0..8).map(|_| c.alloc(l)).collect();
            for &b in &blocks {
                assert!(!b.is_null());
                c.dealloc(b, l);
            }
            assert_eq!(c.cached(), (BUDGET / MAX, BUDGET / MAX * MAX));
            let s = Layout::from_size_align(MIN, 16).unwrap();
            let small: Vec<*mut u8> = (0..SLOTS + 4).map(|_| c.alloc(s)).collect();
            for &b in &small {
                c.dealloc(b, s);
            }
            let (n, bytes) = c.cached();
            assert!(n <= SLOTS && bytes <= BUDGET, "{n} blocks, {bytes} bytes");
        }
    }

    #[allow(unsafe_code)]
    #[test]
    fn realloc_across_classes_keeps_the_contents_and_the_size_rule() {
        let c = BlockCache::new();
        let mut size = 1000;
        let l = Layout::from_size_align(size, 8).unwrap();
        // SAFETY: the block is always reallocated and freed with the layout it last had.
        unsafe {
            let mut p = c.alloc(l);
            std::ptr::write_bytes(p, 7, size);
            // Grow through small, cached and beyond-cache sizes, then shrink back.
            for next in [150_000, 150_100, 600_000, 2_000_000, 300_000, 5000] {
                let q = c.realloc(p, Layout::from_size_align(size, 8).unwrap(), next);
                assert!(!q.is_null());
                let keep = size.min(next).min(1000);
                assert!(std::slice::from_raw_parts(q, keep).iter().all(|&x| x == 7));
                if next > size {
                    std::ptr::write_bytes(q.add(size), 7, next - size);
                }
                p = q;
                size = next;
            }
            c.dealloc(p, Layout::from_size_align(size, 8).unwrap());
        }
    }
}
