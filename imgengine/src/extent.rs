//! Byte ranges on a disk or inside a partition, and the arithmetic every capture needs on
//! them (sorting, merging, clipping), with checked offsets: extents come from untrusted
//! allocation maps.

/// A byte range `[offset, offset + len)`.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize,
)]
pub struct Extent {
    pub offset: u64,
    pub len: u64,
}

impl Extent {
    pub const fn new(offset: u64, len: u64) -> Self {
        Extent { offset, len }
    }

    /// One past the last byte; `None` when the range would overflow `u64`.
    pub fn end(&self) -> Option<u64> {
        self.offset.checked_add(self.len)
    }

    /// This extent clipped to `[0, limit)`; `None` when nothing is left.
    pub fn clip(&self, limit: u64) -> Option<Extent> {
        if self.offset >= limit || self.len == 0 {
            return None;
        }
        let end = self.end().unwrap_or(u64::MAX).min(limit);
        Some(Extent::new(self.offset, end - self.offset))
    }
}

/// Sort `extents`, drop empty ones, and merge those that overlap or lie closer than
/// `bridge` bytes apart (bridging small gaps costs a few bytes of reading but saves a chunk
/// boundary per gap on a fragmented file system).
pub fn normalize(mut extents: Vec<Extent>, bridge: u64) -> Vec<Extent> {
    extents.retain(|e| e.len > 0);
    extents.sort();
    let mut out: Vec<Extent> = Vec::with_capacity(extents.len());
    for e in extents {
        let e_end = e.end().unwrap_or(u64::MAX);
        if let Some(last) = out.last_mut() {
            let last_end = last.end().unwrap_or(u64::MAX);
            if e.offset <= last_end.saturating_add(bridge) {
                if e_end > last_end {
                    last.len = e_end - last.offset;
                }
                continue;
            }
        }
        out.push(e);
    }
    out
}

/// Total bytes covered by (already normalized) extents.
pub fn total_len(extents: &[Extent]) -> u64 {
    extents.iter().map(|e| e.len).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_overlapping_adjacent_and_bridged() {
        let v = vec![
            Extent::new(100, 10),
            Extent::new(0, 10),
            Extent::new(10, 5),
            Extent::new(112, 8),
            Extent::new(500, 0),
        ];
        assert_eq!(
            normalize(v.clone(), 0),
            vec![
                Extent::new(0, 15),
                Extent::new(100, 10),
                Extent::new(112, 8)
            ]
        );
        assert_eq!(
            normalize(v, 2),
            vec![Extent::new(0, 15), Extent::new(100, 20)]
        );
    }

    #[test]
    fn clip_and_overflow() {
        assert_eq!(Extent::new(10, 100).clip(50), Some(Extent::new(10, 40)));
        assert_eq!(Extent::new(60, 10).clip(50), None);
        assert_eq!(Extent::new(u64::MAX - 1, 10).end(), None);
        assert_eq!(
            normalize(vec![Extent::new(u64::MAX - 1, 10), Extent::new(5, 1)], 0).len(),
            2
        );
    }
}
