//! The chunk sink: where verified chunks go. Each is written at its own disk offset, so
//! chunks may come in any order (the deploy pipeline delivers them in image order, a
//! multicast receiver as they arrive); zero chunks become holes or zeroed ranges; the
//! partition-table chunks are held in memory and written only by [`ChunkSink::finish`],
//! after everything else is on stable storage, so a deploy that dies part-way leaves a disk
//! without a valid table rather than a valid table over missing data.

use crate::error::{Error, Result};
use crate::format::{ChunkHeader, ChunkKind};
use crate::io::Progress;
use crate::target::Target;

use super::chunk::VerifiedChunk;
use super::plan::ExtentCheck;
use super::stream::Out;
use super::DeploySummary;

/// Table chunks are held in memory until the end: a GPT is 33 sectors at each end, so
/// 4 MiB is far above anything legitimate and bounds what a hostile image can make us hold.
const MAX_HELD_TABLE_BYTES: u64 = 4 << 20;

/// Writes verified chunks onto a target by offset, holding table chunks back.
///
/// Use: [`ChunkSink::new`], then [`ChunkSink::put`] for each chunk (and
/// [`ChunkSink::skip_intact`] for each one found already on the target), then
/// [`ChunkSink::finish`]. The caller checks every chunk's extent against the target and
/// the image's table regions before the first `put` (the deploy does it from the manifest).
pub struct ChunkSink<'a> {
    target: &'a Target,
    /// Set when the chunks were not checked up front (no manifest before the chunks).
    extent_check: Option<ExtentCheck>,
    held_tables: Vec<VerifiedChunk>,
    held_bytes: u64,
    pub(super) summary: DeploySummary,
    progress: &'a dyn Progress,
    /// A streamed chunk partly written and not yet verified.
    partial: Option<ChunkHeader>,
}

impl<'a> ChunkSink<'a> {
    /// A sink writing onto `target`, advancing `progress` by the disk bytes of each chunk.
    pub fn new(target: &'a Target, progress: &'a dyn Progress) -> Self {
        ChunkSink {
            target,
            extent_check: None,
            held_tables: Vec::new(),
            held_bytes: 0,
            summary: DeploySummary::default(),
            progress,
            partial: None,
        }
    }

    /// Check each chunk's extent as it arrives (a streaming image on a pipe, whose
    /// manifest comes only after its chunks).
    pub(super) fn checking_each(mut self, check: Option<ExtentCheck>) -> Self {
        self.extent_check = check;
        self
    }

    /// Write one verified chunk (a table chunk is held until [`ChunkSink::finish`]).
    pub fn put(&mut self, v: VerifiedChunk) -> Result<()> {
        let h = *v.header();
        if let Some(c) = &mut self.extent_check {
            c.check(&h)?;
        }
        match h.kind {
            ChunkKind::Table => {
                self.held_bytes += h.raw_len;
                if self.held_bytes > MAX_HELD_TABLE_BYTES {
                    return Err(Error::corrupt(format!(
                        "{}: partition-table chunks exceed {MAX_HELD_TABLE_BYTES} bytes",
                        h.describe()
                    )));
                }
                self.held_tables.push(v);
                return Ok(());
            }
            ChunkKind::Zero => self.target.zero_range(h.disk_offset, h.raw_len)?,
            ChunkKind::Data => {
                self.target.write_sparse_at(v.data(), h.disk_offset)?;
                self.summary.bytes_written += h.raw_len;
            }
        }
        self.summary.chunks_written += 1;
        self.progress.advance(h.raw_len);
        Ok(())
    }

    /// Count a chunk that was found intact on the target and not fetched.
    pub fn skip_intact(&mut self) {
        self.summary.chunks_skipped += 1;
    }

    /// What was written so far.
    pub fn summary(&self) -> &DeploySummary {
        &self.summary
    }

    /// Take what the deploy pipeline delivers: whole chunks, or the pieces of a large one
    /// streamed through and verified at its end.
    pub(super) fn take(&mut self, out: Out) -> Result<()> {
        match out {
            Out::Whole(v) => self.put(v),
            Out::Piece {
                header,
                offset,
                data,
            } => {
                if offset == 0 {
                    if let Some(c) = &mut self.extent_check {
                        c.check(&header)?;
                    }
                    self.partial = Some(header);
                }
                self.target
                    .write_sparse_at(&data, header.disk_offset + offset)?;
                self.progress.advance(data.len() as u64);
                Ok(())
            }
            Out::End(h) => {
                self.partial = None;
                self.summary.chunks_written += 1;
                self.summary.bytes_written += h.raw_len;
                Ok(())
            }
        }
    }

    /// After a failure: a streamed chunk that did not verify must not stay on the target.
    pub fn scrub(&mut self) {
        if let Some(h) = self.partial.take() {
            let _ = self.target.zero_range(h.disk_offset, h.raw_len);
            let _ = self.target.sync();
        }
    }

    /// Sync what was written, then write the held table chunks and sync again; returns
    /// what was done.
    pub fn finish(mut self) -> Result<DeploySummary> {
        if !self.held_tables.is_empty() {
            // Data first on stable storage, then the table: after a power cut the disk
            // either has no table or a table over complete data, never a table over holes.
            self.target.sync()?;
        }
        for v in std::mem::take(&mut self.held_tables) {
            let h = v.header();
            self.target.write_at(v.data(), h.disk_offset)?;
            self.summary.bytes_written += h.raw_len;
            self.summary.chunks_written += 1;
        }
        self.target.sync()?;
        Ok(self.summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::deploy::chunk::verify_payload;
    use crate::format::{encode_chunk, zero_chunk, ChunkRecord};
    use crate::io::NoProgress;

    fn verified(index: u64, kind: ChunkKind, offset: u64, data: Vec<u8>) -> VerifiedChunk {
        let (header, payload) = encode_chunk(index, kind, offset, data, 3).unwrap();
        verify_payload(ChunkRecord {
            header,
            image_offset: 0,
            payload,
        })
        .unwrap()
    }

    fn target(name: &str, len: u64) -> (std::path::PathBuf, Target) {
        let p = std::env::temp_dir().join(format!("imgengine-sink-{name}-{}", std::process::id()));
        std::fs::write(&p, vec![0x55u8; len as usize]).unwrap();
        let t = Target::open_disk(&p, None).unwrap();
        (p, t)
    }

    #[test]
    fn writes_by_offset_in_any_order_and_tables_last() {
        let (p, t) = target("order", 1 << 20);
        let mut sink = ChunkSink::new(&t, &NoProgress);
        let data: Vec<u8> = (0..65536u32).map(|i| (i * 7 % 251) as u8).collect();
        sink.put(verified(2, ChunkKind::Data, 131072, data.clone()))
            .unwrap();
        sink.put(verified(0, ChunkKind::Table, 0, vec![0xAA; 512]))
            .unwrap();
        let zero = zero_chunk(1, 65536, 65536);
        sink.put(
            verify_payload(ChunkRecord {
                header: zero,
                image_offset: 0,
                payload: Vec::new(),
            })
            .unwrap(),
        )
        .unwrap();
        sink.skip_intact();
        let disk = std::fs::read(&p).unwrap();
        assert!(disk[..512].iter().all(|&b| b == 0x55), "table held back");
        assert!(disk[65536..131072].iter().all(|&b| b == 0));
        assert!(disk[131072..196608] == data[..]);
        assert_eq!(sink.summary().chunks_written, 2);
        let s = sink.finish().unwrap();
        let disk = std::fs::read(&p).unwrap();
        assert!(
            disk[..512].iter().all(|&b| b == 0xAA),
            "table written at the end"
        );
        assert!(
            disk[512..65536].iter().all(|&b| b == 0x55),
            "nothing else touched"
        );
        assert_eq!((s.chunks_written, s.chunks_skipped), (3, 1));
        assert_eq!(s.bytes_written, 65536 + 512);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn table_chunks_held_in_memory_are_bounded() {
        let (p, t) = target("bound", 8 << 20);
        let mut sink = ChunkSink::new(&t, &NoProgress);
        let mut last = Ok(());
        for i in 0..5u64 {
            last = sink.put(verified(i, ChunkKind::Table, i << 20, vec![1; 1 << 20]));
            if last.is_err() {
                assert_eq!(i, 4, "the fifth MiB is over the limit");
                break;
            }
        }
        let e = last.unwrap_err();
        assert!(
            e.to_string().contains("partition-table chunks exceed"),
            "{e}"
        );
        drop(sink);
        assert!(
            std::fs::read(&p).unwrap().iter().all(|&b| b == 0x55),
            "held tables are not written without finish"
        );
        std::fs::remove_file(&p).unwrap();
    }
}
