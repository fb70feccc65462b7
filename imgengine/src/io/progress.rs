//! Progress reporting: the pipelines say what they are doing and how far they are, the
//! caller (the `img` console, the boot agent's screen, a test) decides how to show it.

/// A sink for progress events. `Sync` because the pipelines report from worker threads.
pub trait Progress: Sync {
    /// A new phase starts (`"deploying"`, `"checking target"`); `total` in bytes if known.
    fn begin(&self, what: &str, total: Option<u64>);
    /// `bytes` more of the current phase are done.
    fn advance(&self, bytes: u64);
    /// The current phase is over.
    fn end(&self);
}

/// Progress that goes nowhere (tests, library callers that do not care).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn begin(&self, _what: &str, _total: Option<u64>) {}
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};

    struct Sum(AtomicU64);
    impl Progress for Sum {
        fn begin(&self, _what: &str, _total: Option<u64>) {}
        fn advance(&self, bytes: u64) {
            self.0.fetch_add(bytes, Ordering::Relaxed);
        }
        fn end(&self) {}
    }

    #[test]
    fn progress_is_usable_from_threads() {
        let s = Sum(AtomicU64::new(0));
        std::thread::scope(|sc| {
            for _ in 0..4 {
                sc.spawn(|| s.advance(10));
            }
        });
        assert_eq!(s.0.load(Ordering::Relaxed), 40);
        NoProgress.begin("x", None);
        NoProgress.advance(1);
        NoProgress.end();
    }
}
