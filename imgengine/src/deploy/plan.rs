//! The deploy plan check: every chunk extent of an image, from its manifest (or, for a
//! streaming image on a pipe, one chunk at a time as it arrives), is checked against the
//! target and against the partition-table extents the image declares, before anything of
//! it is written (and, with the manifest known up front, before the target's tables are
//! invalidated). An image that cannot fit, whose chunks overlap, or whose table chunks
//! land outside the table regions (a "table" written over partition data after the data
//! was verified) is refused while the target is still untouched.

use std::collections::BTreeMap;

use crate::error::{Error, Result};
use crate::extent::{self, Extent};
use crate::format::{layout::MAX_CHUNK_RAW, ChunkHeader, ChunkKind, Content, ImageMeta};

/// The rules one image's chunks must follow on one target.
pub(super) struct ExtentCheck {
    /// Bytes of the target window (the disk, or the partition).
    target_len: u64,
    /// The image's declared size: no chunk may end past it.
    image_len: u64,
    /// Largest data or table chunk: the image's chunk size (never above the format limit).
    max_raw: u64,
    /// Where table chunks may go (normalized); data and zero chunks must stay out.
    tables: Vec<Extent>,
    /// Extents of the chunks checked so far: start -> end.
    seen: BTreeMap<u64, u64>,
}

impl ExtentCheck {
    pub fn new(meta: &ImageMeta, target_len: u64) -> ExtentCheck {
        let tables = match &meta.content {
            Content::Disk { layout } => extent::normalize(layout.table_extents.clone(), 0),
            Content::Partition { .. } => Vec::new(),
        };
        ExtentCheck {
            target_len,
            image_len: meta.min_target_size,
            max_raw: u64::from(meta.chunk_size).min(MAX_CHUNK_RAW),
            tables,
            seen: BTreeMap::new(),
        }
    }

    /// Check one chunk and remember its extent.
    pub fn check(&mut self, h: &ChunkHeader) -> Result<()> {
        let what = h.describe();
        let start = h.disk_offset;
        let end = start
            .checked_add(h.raw_len)
            .ok_or_else(|| Error::corrupt(format!("{what}: extent overflows")))?;
        if h.kind != ChunkKind::Zero && h.raw_len > self.max_raw {
            return Err(Error::corrupt(format!(
                "{what}: {} bytes is more than the image's chunk size {}",
                h.raw_len, self.max_raw
            )));
        }
        if end > self.image_len {
            return Err(Error::corrupt(format!(
                "{what}: ends at byte {end}, past the {} bytes the image says it covers",
                self.image_len
            )));
        }
        if end > self.target_len {
            return Err(Error::new(
                crate::error::ErrorKind::Target,
                format!(
                    "{what}: ends at byte {end} but the target has {} bytes; use a larger disk or partition",
                    self.target_len
                ),
            ));
        }
        let in_table = |e: &Extent| e.offset <= start && end <= e.offset + e.len;
        let touches_table = |e: &Extent| e.offset < end && start < e.offset + e.len;
        match h.kind {
            ChunkKind::Table if !self.tables.iter().any(in_table) => {
                return Err(Error::corrupt(format!(
                    "{what}: a partition-table chunk outside the image's table regions"
                )))
            }
            ChunkKind::Data | ChunkKind::Zero if self.tables.iter().any(touches_table) => {
                return Err(Error::corrupt(format!(
                    "{what}: a data chunk over the image's partition-table region"
                )))
            }
            _ => {}
        }
        // The nearest chunk starting at or before `start`, and the first one after it.
        if let Some((&s, &e)) = self.seen.range(..=start).next_back() {
            if e > start {
                return Err(overlap(&what, s, e));
            }
        }
        if let Some((&s, &e)) = self.seen.range(start..).next() {
            if s < end {
                return Err(overlap(&what, s, e));
            }
        }
        self.seen.insert(start, end);
        Ok(())
    }
}

fn overlap(what: &str, s: u64, e: u64) -> Error {
    Error::corrupt(format!(
        "{what}: overlaps another chunk's bytes {s}..{e}; the image is corrupt or forged"
    ))
}

/// Check a whole manifest's chunks up front.
pub(super) fn check_all<'a>(
    meta: &ImageMeta,
    target_len: u64,
    headers: impl IntoIterator<Item = &'a ChunkHeader>,
) -> Result<ExtentCheck> {
    let mut c = ExtentCheck::new(meta, target_len);
    for h in headers {
        c.check(h)?;
    }
    Ok(c)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{DiskLayout, TableKind};
    use crate::format::{codec::zero_chunk, Compression};

    fn meta(tables: Vec<Extent>) -> ImageMeta {
        let mut m = crate::format::testimg::meta(1 << 20);
        m.content = Content::Disk {
            layout: DiskLayout {
                table: TableKind::Mbr,
                disk_size: 1 << 20,
                sector_size: 512,
                partitions: vec![],
                table_extents: tables,
            },
        };
        m
    }

    fn h(index: u64, kind: ChunkKind, off: u64, len: u64) -> ChunkHeader {
        let mut h = zero_chunk(index, off, len);
        h.kind = kind;
        if kind != ChunkKind::Zero {
            h.compression = Compression::Stored;
            h.comp_len = len as u32;
        }
        h
    }

    #[test]
    fn good_plan_passes() {
        let m = meta(vec![Extent::new(0, 512)]);
        let hs = [
            h(0, ChunkKind::Data, 4096, 65536),
            h(1, ChunkKind::Zero, 65536 + 4096, 500_000),
            h(2, ChunkKind::Table, 0, 512),
        ];
        check_all(&m, 1 << 20, &hs).unwrap();
    }

    #[test]
    fn each_rule_is_enforced() {
        let m = meta(vec![Extent::new(0, 512)]);
        let cases: Vec<(Vec<ChunkHeader>, u64, &str)> = vec![
            // Overlap with the previous chunk, and with a later one listed earlier.
            (
                vec![
                    h(0, ChunkKind::Data, 4096, 8192),
                    h(1, ChunkKind::Data, 8192, 4096),
                ],
                1 << 20,
                "overlaps",
            ),
            (
                vec![
                    h(0, ChunkKind::Data, 8192, 4096),
                    h(1, ChunkKind::Zero, 4096, 8192),
                ],
                1 << 20,
                "overlaps",
            ),
            (
                vec![h(0, ChunkKind::Table, 4096, 512)],
                1 << 20,
                "outside the image's table",
            ),
            (
                vec![h(0, ChunkKind::Data, 0, 4096)],
                1 << 20,
                "over the image's partition-table",
            ),
            (
                vec![h(0, ChunkKind::Data, 4096, 65537)],
                1 << 20,
                "chunk size",
            ),
            (
                vec![h(0, ChunkKind::Zero, 4096, 1 << 20)],
                4 << 20,
                "past the",
            ),
            (
                vec![h(0, ChunkKind::Data, 65536, 65536)],
                100_000,
                "larger disk",
            ),
        ];
        for (hs, target, want) in cases {
            let e = check_all(&m, target, &hs).err().expect(want);
            assert!(e.to_string().contains(want), "{want}: {e}");
        }
    }
}
