//! A master that sends its own disk without an image file: the image exists only as its
//! head and manifest, and each chunk record is made again from the disk when the carousel
//! (or a repair) needs it.
//!
//! Pass 1 ([`OnTheFly::capture`]) is `img -make`'s own capture ([`capture::capture_to`]: the
//! same plan, used blocks only, the same chunking and compression) written onto a sink: the
//! compressed bytes are counted and dropped, and what stays is the metadata and the
//! manifest (every chunk's kind, disk offset, lengths, CRC32 and SHA-256, image offset),
//! hence the manifest digest every packet carries. After that, chunk k is its disk bytes
//! read again and compressed again at the same zstd level (zstd is deterministic for the
//! same input, level and library), and the result must equal the manifest's entry — inline
//! header, lengths, CRC32 and SHA-256 — before a byte of it is sent. If the disk changed
//! under the master, the read fails with an error naming the chunk and the session stops:
//! no client ever receives data that does not match the manifest it verifies against.
//!
//! Memory stays bounded: a few recently made chunk records ([`CACHE_BYTES`]), never the
//! image. Zero chunks (long runs of zeros outside file systems) have no payload and are not
//! read again.

use std::collections::VecDeque;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::rc::Rc;

use super::chunks::ChunkSource;
use crate::capture::{self, CaptureOptions, CaptureSummary};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::layout::{Footer, Preamble, CHUNK_HEADER_LEN};
use crate::format::{self, ChunkKind, ImageHead, Layout, Manifest};
use crate::io::Progress;

/// Chunk records kept after they were made (at least one, whatever its size): the
/// carousel reads an object block by block, and repairs come soon after a block was sent.
pub const CACHE_BYTES: usize = 8 << 20;

/// One chunk record: the inline header and the payload, kept apart so the payload
/// `encode_chunk` returns is kept as it is, not copied.
pub struct Record {
    header: [u8; CHUNK_HEADER_LEN],
    payload: Vec<u8>,
}

impl Record {
    pub fn len(&self) -> usize {
        CHUNK_HEADER_LEN + self.payload.len()
    }

    pub fn is_empty(&self) -> bool {
        false
    }

    /// Copy the record's bytes from `at` into `buf` (as many as fit); returns how many.
    pub fn copy_to(&self, at: usize, buf: &mut [u8]) -> usize {
        let mut n = 0;
        if at < CHUNK_HEADER_LEN {
            n = (CHUNK_HEADER_LEN - at).min(buf.len());
            buf[..n].copy_from_slice(&self.header[at..at + n]);
        }
        let p = (at + n).saturating_sub(CHUNK_HEADER_LEN);
        let m = (self.payload.len().saturating_sub(p)).min(buf.len() - n);
        buf[n..n + m].copy_from_slice(&self.payload[p..p + m]);
        n + m
    }

    /// The record's bytes, as in the image file.
    pub fn to_vec(&self) -> Vec<u8> {
        let mut v = self.header.to_vec();
        v.extend_from_slice(&self.payload);
        v
    }
}

/// The image of a disk or partition, made chunk by chunk when read.
pub struct OnTheFly {
    shown: String,
    dev: File,
    /// Device offset of image offset 0 (the partition's start, or 0 for a disk).
    origin: u64,
    zstd_level: i32,
    head: ImageHead,
    /// Where the manifest starts: the image's tail (manifest and footer) follows the chunks.
    tail_at: u64,
    tail: Vec<u8>,
    cache: VecDeque<(u64, Rc<Record>)>,
    cached: usize,
    summary: CaptureSummary,
    /// Chunk records made again from the disk (cache misses), for the master's summary.
    pub remade: u64,
}

impl OnTheFly {
    /// Pass 1: capture `disk` (or its partition `part`) as `img -make` does, keeping only
    /// the head and the manifest.
    pub fn capture(
        disk: &Path,
        part: Option<&str>,
        opts: &CaptureOptions,
        progress: &dyn Progress,
    ) -> Result<OnTheFly> {
        let shown = disk.display().to_string();
        let c = capture::capture_to(disk, part, std::io::sink(), opts, progress)?;
        give_back_freed_memory();
        let preamble_bytes = Preamble::new(Layout::Streaming, c.meta.to_json()?).encode();
        let manifest_bytes = c.manifest.encode();
        let tail_at = c
            .manifest
            .entries
            .last()
            .map(|e| e.image_offset + e.record_len())
            .unwrap_or(preamble_bytes.len() as u64);
        let footer = Footer {
            manifest_offset: tail_at,
            manifest_len: manifest_bytes.len() as u64,
            chunk_count: c.manifest.entries.len() as u64,
        };
        let mut tail = manifest_bytes.clone();
        tail.extend_from_slice(&footer.encode());
        let image_len = tail_at + tail.len() as u64;
        // The writer counted every byte of the image it did not keep: the head and tail
        // made here must fill exactly that image.
        if image_len != c.summary.image_bytes
            || c.manifest
                .entries
                .first()
                .is_some_and(|e| e.image_offset != preamble_bytes.len() as u64)
        {
            return Err(Error::corrupt(format!(
                "{shown}: the session's image head does not match its capture ({image_len} against {} bytes)",
                c.summary.image_bytes
            )));
        }
        let dev = File::open(disk).ctx(|| format!("opening {shown} for reading"))?;
        Ok(OnTheFly {
            shown,
            dev,
            origin: c.origin,
            zstd_level: c.meta.zstd_level,
            head: ImageHead {
                preamble_bytes,
                meta: c.meta,
                layout: Layout::Streaming,
                manifest: c.manifest,
                manifest_bytes,
                signature: None,
                image_len,
            },
            tail_at,
            tail,
            cache: VecDeque::new(),
            cached: 0,
            summary: c.summary,
            remade: 0,
        })
    }

    /// What pass 1 found (chunks, used and stored bytes, the image's size).
    pub fn summary(&self) -> &CaptureSummary {
        &self.summary
    }

    pub fn manifest(&self) -> &Manifest {
        &self.head.manifest
    }

    /// Chunk record `index` (inline header and payload), exactly as `img -make` wrote it:
    /// from the cache, or read from the disk, compressed and checked against the manifest.
    pub fn record(&mut self, index: u64) -> Result<Rc<Record>> {
        if let Some((_, r)) = self.cache.iter().find(|(i, _)| *i == index) {
            return Ok(r.clone());
        }
        let entry = *self
            .head
            .manifest
            .entries
            .get(index as usize)
            .ok_or_else(|| Error::invalid(format!("chunk {index}: past the image's end")))?;
        let want = entry.header;
        let rec = if want.kind == ChunkKind::Zero {
            Record {
                header: want.encode(),
                payload: Vec::new(),
            }
        } else {
            let mut data = vec![0u8; want.raw_len as usize];
            let at = self.origin + want.disk_offset;
            self.dev
                .read_exact_at(&mut data, at)
                .ctx(|| format!("reading {} at offset {at} for chunk {index}", self.shown))?;
            let (h, payload) =
                format::encode_chunk(index, want.kind, want.disk_offset, data, self.zstd_level)?;
            if h != want {
                return Err(Error::new(
                    ErrorKind::Corrupt,
                    format!(
                        "{}: chunk {index} ({} bytes at disk offset {}) changed since the session's image was captured (its SHA-256 no longer matches the manifest); the session stops so that no client gets data its manifest does not vouch for: keep the disk unchanged (nothing mounted read-write) and start the session again",
                        self.shown, want.raw_len, want.disk_offset
                    ),
                ));
            }
            Record {
                header: h.encode(),
                payload,
            }
        };
        self.remade += 1;
        let rec = Rc::new(rec);
        while !self.cache.is_empty() && self.cached + rec.len() > CACHE_BYTES {
            if let Some((_, old)) = self.cache.pop_front() {
                self.cached -= old.len();
            }
        }
        self.cached += rec.len();
        self.cache.push_back((index, rec.clone()));
        Ok(rec)
    }
}

/// Pass 1's buffers are freed, but glibc keeps them in the worker threads' arenas, where
/// the session's allocations (on the main thread) do not reuse them: hand them back to the
/// system. musl (the shipped static binary) unmaps large buffers when they are freed.
#[allow(unsafe_code)]
fn give_back_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim only releases free memory of the allocator's arenas; it takes no
    // pointer and is safe to call at any time from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

impl ChunkSource for OnTheFly {
    fn head(&self) -> &ImageHead {
        &self.head
    }

    fn read_at(&mut self, mut offset: u64, mut buf: &mut [u8]) -> Result<()> {
        let image_len = self.head.image_len;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|end| end > image_len)
        {
            return Err(Error::invalid(format!(
                "{}: {} bytes at image offset {offset} are past the image's {image_len} bytes",
                self.shown,
                buf.len()
            )));
        }
        while !buf.is_empty() {
            let pre = self.head.preamble_bytes.len() as u64;
            let n;
            if offset < pre {
                n = (pre - offset).min(buf.len() as u64) as usize;
                buf[..n].copy_from_slice(&self.head.preamble_bytes[offset as usize..][..n]);
            } else if offset >= self.tail_at {
                let at = (offset - self.tail_at) as usize;
                n = buf.len();
                buf.copy_from_slice(&self.tail[at..at + n]);
            } else {
                let entries = &self.head.manifest.entries;
                let i = entries.partition_point(|e| e.image_offset <= offset) - 1;
                let start = entries[i].image_offset;
                let rec = self.record(i as u64)?;
                n = rec.copy_to((offset - start) as usize, buf);
            }
            offset += n as u64;
            buf = &mut buf[n..];
        }
        Ok(())
    }

    fn describe(&self) -> String {
        format!("{} (captured on the fly)", self.shown)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::{ImageMeta, ImageReader};
    use crate::io::NoProgress;

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("imgengine-otf-{name}-{}", std::process::id()))
    }

    /// The image `img -make` writes of `disk` (part `part`) with `opts`.
    fn made(disk: &Path, part: Option<&str>, opts: &CaptureOptions) -> Vec<u8> {
        let mut out = Vec::new();
        capture::capture(disk, part, &mut out, opts, &NoProgress).unwrap();
        out
    }

    /// Every byte the on-the-fly source gives equals `img -make`'s image of the same disk:
    /// the head (apart from the creation time, which is the moment of each capture), every
    /// chunk record read whole and read in odd pieces across records, and the tail.
    fn same_as_make(disk: &Path, part: Option<&str>, opts: &CaptureOptions) -> OnTheFly {
        let img = made(disk, part, opts);
        let mut otf = OnTheFly::capture(disk, part, opts, &NoProgress).unwrap();
        let r = ImageReader::open(&img[..]).unwrap();
        let pre = r.preamble_bytes.len();
        let head = otf.head().clone();
        assert_eq!(head.preamble_bytes.len(), pre);
        let mut meta: ImageMeta = head.meta.clone();
        meta.created = r.meta.created;
        assert_eq!(meta, r.meta);
        assert_eq!(head.image_len, img.len() as u64);
        let entries = head.manifest.entries.clone();
        assert!(entries.len() > 3, "{} chunks only", entries.len());
        for e in entries.iter().rev() {
            let at = e.image_offset as usize;
            let rec = otf.record(e.header.index).unwrap();
            assert_eq!(rec.len() as u64, e.record_len());
            assert_eq!(
                &rec.to_vec()[..],
                &img[at..at + e.record_len() as usize],
                "chunk {}",
                e.header.index
            );
        }
        // Through the trait, from the first chunk to the end, in pieces that straddle
        // records (the carousel's blocks do not, but nothing relies on it).
        let mut pos = pre as u64;
        let mut step = 1000u64;
        while pos < img.len() as u64 {
            let n = step.min(img.len() as u64 - pos) as usize;
            let mut buf = vec![0u8; n];
            otf.read_at(pos, &mut buf).unwrap();
            assert!(buf == img[pos as usize..][..n], "bytes at {pos}");
            pos += n as u64;
            step = step * 3 % 700_001 + 1;
        }
        let mut buf = [0u8; 8];
        assert!(otf.read_at(img.len() as u64 - 4, &mut buf).is_err());
        // The whole image reads back as a valid image with the same manifest.
        let mut whole = vec![0u8; img.len()];
        otf.read_at(0, &mut whole).unwrap();
        let mut r = ImageReader::open(&whole[..]).unwrap();
        while r.next_chunk().unwrap().is_some() {}
        assert_eq!(r.manifest().unwrap().0, &head.manifest);
        otf
    }

    fn opts(comp: u8, chunk_kib: u32) -> CaptureOptions {
        CaptureOptions {
            comp,
            name: "otf".into(),
            version: "1".into(),
            chunk_size: chunk_kib << 10,
            threads: 2,
            ..Default::default()
        }
    }

    #[test]
    fn fat32_from_mkfs_matches_make() {
        let img = crate::fs::made_by(
            "mkfs.fat -C -F 32 -s 1 -n OTF v.img 40000 >/dev/null
             head -c 700000 /dev/urandom > a
             seq 1 400000 > b
             mcopy -i v.img a ::A
             mmd -i v.img ::D
             mcopy -i v.img b ::D/B",
            "v.img",
        );
        let p = tmp("fat32");
        std::fs::write(&p, &img).unwrap();
        let otf = same_as_make(&p, None, &opts(3, 256));
        assert!(
            otf.summary().data_bytes < img.len() as u64 / 4,
            "used blocks only"
        );
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn raw_unknown_content_matches_make() {
        let p = tmp("raw");
        std::fs::write(&p, format::testimg::disk(3 << 20)).unwrap();
        let otf = same_as_make(&p, None, &opts(0, 64));
        assert!(
            otf.manifest()
                .entries
                .iter()
                .any(|e| e.header.kind == ChunkKind::Zero),
            "the zero run is a zero chunk"
        );
        let _ = same_as_make(&p, None, &opts(9, 128));
        let _ = std::fs::remove_file(&p);
    }

    /// A GPT disk with a FAT32 partition and a partition of content no file system claims:
    /// the whole disk (tables last), and each partition alone.
    #[test]
    fn gpt_disk_with_two_partitions_matches_make() {
        let img = crate::fs::made_by(
            "truncate -s 40M d.img
             sgdisk -n1:2048:+34M -t1:0700 -c1:DATA -n2:0:0 -t2:8300 d.img >/dev/null
             mkfs.fat -C -F 32 -s 1 -n OTF p1.img 34816 >/dev/null
             seq 1 300000 > b
             head -c 500000 /dev/urandom > a
             mcopy -i p1.img b ::B
             mcopy -i p1.img a ::A
             dd if=p1.img of=d.img bs=512 seek=2048 conv=notrunc status=none
             start=$(sgdisk -i2 d.img | sed -n 's/^First sector: \\([0-9]*\\).*/\\1/p')
             seq 1 200000 | dd of=d.img bs=512 seek=$start conv=notrunc status=none",
            "d.img",
        );
        let p = tmp("gpt");
        std::fs::write(&p, &img).unwrap();
        let otf = same_as_make(&p, None, &opts(1, 256));
        assert!(
            otf.manifest()
                .entries
                .iter()
                .any(|e| e.header.kind == ChunkKind::Table),
            "the partition tables are chunks"
        );
        same_as_make(&p, Some("1"), &opts(6, 128));
        same_as_make(&p, Some("2"), &opts(2, 64));
        let _ = std::fs::remove_file(&p);
    }

    /// A block written after pass 1 is found when its chunk is made again: the read fails,
    /// naming the chunk, and nothing of it is returned; other chunks still read.
    #[test]
    fn a_changed_block_is_detected_and_named() {
        let p = tmp("changed");
        std::fs::write(&p, format::testimg::disk(2 << 20)).unwrap();
        let mut otf = OnTheFly::capture(&p, None, &opts(3, 64), &NoProgress).unwrap();
        let entries = otf.manifest().entries.clone();
        let victim = entries
            .iter()
            .filter(|e| e.header.kind == ChunkKind::Data)
            .nth(3)
            .copied()
            .unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
        let at = victim.header.disk_offset + victim.header.raw_len / 2;
        let old = std::fs::read(&p).unwrap()[at as usize];
        f.write_all_at(&[old ^ 0x5a], at).unwrap();
        drop(f);
        let mut buf = vec![0xeeu8; victim.record_len() as usize];
        let e = otf.read_at(victim.image_offset, &mut buf).unwrap_err();
        let s = e.to_string();
        let i = victim.header.index;
        assert!(
            s.contains(&format!("chunk {i} ("))
                && s.contains(&format!("disk offset {}", victim.header.disk_offset))
                && s.contains("changed"),
            "{s}"
        );
        assert!(otf.record(i).is_err(), "it stays refused");
        let other = entries[(i as usize + 1) % entries.len()];
        let mut buf = vec![0u8; other.record_len() as usize];
        otf.read_at(other.image_offset, &mut buf).unwrap();
        let _ = std::fs::remove_file(&p);
    }
}
