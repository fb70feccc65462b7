//! Capture: a disk or one partition into an image, used blocks only.
//!
//! The plan comes first: for each partition, the file system's own allocation map
//! ([`crate::fs::used_map`]) gives the ranges worth reading; content we do not understand
//! (and everything with `raw`) is read whole with runs of zeros recorded as zero chunks;
//! for a whole disk, the partition-table sectors become "table" chunks placed last in the
//! image (a deploy writes them last) and the space outside partitions (boot-loader gaps)
//! is unknown content. Then a reader thread walks the plan in chunks, workers compress,
//! and the caller's thread writes the records in order onto `out`, which may be a pipe.

use std::fs::File;
use std::io::{BufWriter, Seek, SeekFrom, Write};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::disk::{self, DiskLayout, TableKind};
use crate::error::{Error, IoContext, Result};
use crate::extent::{self, Extent};
use crate::format::{self, ChunkHeader, ChunkKind, Content, ImageMeta, ImageWriter};
use crate::fs;
use crate::io::ordered::{pipeline_depth, run_ordered, Item};
use crate::io::Progress;

/// Zero runs shorter than this stay inside a data chunk (zstd makes them nearly free); a
/// longer run becomes a zero chunk, which a deploy turns into a hole or a BLKZEROOUT.
const MIN_ZERO_RUN: u64 = 64 << 10;
/// Zero detection granularity: the page size, which is also the hole granularity.
const BLOCK: u64 = 4096;

/// What to capture and how.
#[derive(Debug, Clone)]
pub struct CaptureOptions {
    /// 0 (stored) .. 9 (smallest); see [`format::zstd_level`].
    pub comp: u8,
    pub name: String,
    pub version: String,
    pub models: Vec<String>,
    pub description: Option<String>,
    /// Disk bytes per chunk (default 4 MiB; 64 KiB .. 64 MiB, a multiple of 4 KiB).
    pub chunk_size: u32,
    /// Compression threads; 0 = one per CPU.
    pub threads: usize,
    /// Ignore file-system maps: read everything, elide zero runs.
    pub raw: bool,
}

impl Default for CaptureOptions {
    fn default() -> Self {
        CaptureOptions {
            comp: 3,
            name: String::new(),
            version: String::new(),
            models: Vec::new(),
            description: None,
            chunk_size: 4 << 20,
            threads: 0,
            raw: false,
        }
    }
}

/// What a capture produced.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CaptureSummary {
    pub chunks: u64,
    /// Uncompressed bytes stored (data and table chunks).
    pub data_bytes: u64,
    /// Size of the image written.
    pub image_bytes: u64,
    /// Bytes the file systems report in use, plus unknown content outside long zero runs,
    /// plus the partition tables.
    pub used_bytes: u64,
}

/// One range of the plan, in image coordinates (disk offsets for a whole disk, partition
/// offsets for a partition image).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Piece {
    /// Allocated per the file system: every byte goes into data chunks.
    Used(Extent),
    /// Not understood: read all, zero runs become zero chunks.
    Unknown(Extent),
    /// Partition-table bytes.
    Table(Extent),
}

/// Number of worker threads for `requested` (0 = one per CPU).
pub fn worker_threads(requested: usize) -> usize {
    if requested > 0 {
        requested
    } else {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    }
}

/// `[0, len)` minus `covered` (any order, may overlap).
fn gaps(len: u64, covered: &[Extent]) -> Vec<Extent> {
    let mut out = Vec::new();
    let mut pos = 0;
    for e in extent::normalize(covered.to_vec(), 0) {
        let Some(e) = e.clip(len) else { continue };
        if e.offset > pos {
            out.push(Extent::new(pos, e.offset - pos));
        }
        pos = pos.max(e.end().unwrap_or(len));
    }
    if pos < len {
        out.push(Extent::new(pos, len - pos));
    }
    out
}

/// The plan for one partition (or a table-less disk) at `start`, in partition coordinates.
fn plan_partition(
    dev: &File,
    start: u64,
    len: u64,
    opts: &CaptureOptions,
    bridge: u64,
) -> Result<(Vec<Piece>, Option<u64>)> {
    if opts.raw {
        return Ok((vec![Piece::Unknown(Extent::new(0, len))], None));
    }
    let map = fs::used_map(dev, start, len)?;
    Ok(match map.extents {
        Some(ext) => {
            let pieces = extent::normalize(ext, bridge)
                .into_iter()
                .filter_map(|e| e.clip(len))
                .map(Piece::Used)
                .collect();
            (pieces, Some(map.used_bytes))
        }
        None => (vec![Piece::Unknown(Extent::new(0, len))], None),
    })
}

fn shift(p: Piece, by: u64) -> Piece {
    match p {
        Piece::Used(e) => Piece::Used(Extent::new(e.offset + by, e.len)),
        Piece::Unknown(e) => Piece::Unknown(Extent::new(e.offset + by, e.len)),
        Piece::Table(e) => Piece::Table(Extent::new(e.offset + by, e.len)),
    }
}

/// The whole-disk plan: partitions by their maps, gaps as unknown content, tables last.
fn plan_disk(
    dev: &File,
    layout: &DiskLayout,
    size: u64,
    opts: &CaptureOptions,
    bridge: u64,
) -> Result<(Vec<Piece>, u64)> {
    if layout.table == TableKind::None {
        let (p, used) = plan_partition(dev, 0, size, opts, bridge)?;
        return Ok((p, used.unwrap_or(0)));
    }
    let mut pieces = Vec::new();
    let mut covered: Vec<Extent> = layout.table_extents.clone();
    let mut used = 0;
    for p in &layout.partitions {
        let (pp, u) = plan_partition(dev, p.start, p.len, opts, bridge)?;
        used += u.unwrap_or(0);
        pieces.extend(pp.into_iter().map(|x| shift(x, p.start)));
        covered.push(Extent::new(p.start, p.len));
    }
    pieces.extend(gaps(size, &covered).into_iter().map(Piece::Unknown));
    pieces.sort_by_key(|p| match p {
        Piece::Used(e) | Piece::Unknown(e) | Piece::Table(e) => e.offset,
    });
    let tables = extent::normalize(layout.table_extents.clone(), 0);
    pieces.extend(
        tables
            .into_iter()
            .filter_map(|e| e.clip(size))
            .map(Piece::Table),
    );
    Ok((pieces, used))
}

/// A unit of work for the compressors.
struct Job {
    index: u64,
    kind: ChunkKind,
    disk_offset: u64,
    data: Vec<u8>,
}

/// A compressed chunk on its way to the image, and the non-zero bytes it came from.
struct Encoded {
    header: ChunkHeader,
    payload: Vec<u8>,
}

/// Capture the disk at `disk` (block device or image file), or its partition `part`
/// (number, GPT name or FS label), onto `out`.
pub fn capture(
    disk: &Path,
    part: Option<&str>,
    out: &mut (dyn Write + Send),
    opts: &CaptureOptions,
    progress: &dyn Progress,
) -> Result<CaptureSummary> {
    let out = BufWriter::with_capacity(crate::io::BUFFER_SIZE, out);
    capture_to(disk, part, out, opts, progress).map(|c| c.summary)
}

/// What [`capture_to`] made: besides the summary, the image's metadata and manifest, and
/// where image offset 0 is on the device (a partition's start, or 0).
#[derive(Debug, Clone)]
pub struct Captured {
    pub summary: CaptureSummary,
    pub meta: ImageMeta,
    pub manifest: format::Manifest,
    pub origin: u64,
}

/// [`capture`] onto any writer, returning what the image's head and manifest hold too. A
/// multicast master that sends its own disk runs it onto `std::io::sink()` and makes each
/// chunk again when it is needed (`multicast::onthefly`).
pub fn capture_to<W: Write>(
    disk: &Path,
    part: Option<&str>,
    out: W,
    opts: &CaptureOptions,
    progress: &dyn Progress,
) -> Result<Captured> {
    let zstd_level = format::zstd_level(opts.comp)?;
    let cs = u64::from(opts.chunk_size);
    if !(64 << 10..=format::layout::MAX_CHUNK_RAW).contains(&cs) || cs % BLOCK != 0 {
        return Err(Error::invalid(format!(
            "chunk size {cs}: use a multiple of 4096 between 64 KiB and 64 MiB (default 4 MiB)"
        )));
    }
    let shown = disk.display().to_string();
    let mut dev = File::open(disk).ctx(|| format!("opening {shown} for reading"))?;
    // Seeking to the end gives the size of block devices and files alike.
    let size = dev
        .seek(SeekFrom::End(0))
        .ctx(|| format!("finding the size of {shown}"))?;
    let layout = disk::read_layout(&dev, size)?;
    // Bridging gaps up to 1/16 of a chunk keeps a fragmented FAT at a few chunks per
    // chunk-size of data, at the cost of reading (and compressing) some free clusters.
    let bridge = (cs / 16).min(1 << 20);
    let (origin, content, min_target_size, pieces, fs_used) = match part {
        Some(spec) => {
            let p = layout
                .find(spec)
                .map_err(|e| Error::new(e.kind(), format!("{shown}: {}", e.context())))?
                .clone();
            let (pieces, used) = plan_partition(&dev, p.start, p.len, opts, bridge)?;
            (
                p.start,
                Content::Partition {
                    partition: p.clone(),
                },
                p.len,
                pieces,
                used.unwrap_or(0),
            )
        }
        None => {
            let (pieces, used) = plan_disk(&dev, &layout, size, opts, bridge)?;
            (
                0,
                Content::Disk {
                    layout: layout.clone(),
                },
                size,
                pieces,
                used,
            )
        }
    };
    let meta = ImageMeta {
        format_version: u32::from(format::FORMAT_MAJOR),
        name: opts.name.clone(),
        version: opts.version.clone(),
        models: opts.models.clone(),
        min_target_size,
        created: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        comp_level: opts.comp,
        zstd_level,
        chunk_size: opts.chunk_size,
        content,
        description: opts.description.clone(),
    };
    let total: u64 = pieces
        .iter()
        .map(|p| match p {
            Piece::Used(e) | Piece::Unknown(e) | Piece::Table(e) => e.len,
        })
        .sum();
    progress.begin("capturing", Some(total));

    let threads = worker_threads(opts.threads);
    let mut writer = ImageWriter::streaming(out, &meta)?;
    let mut unknown_nonzero = 0u64;
    let dev_ref = &dev;
    let unknown_nonzero_ref = &mut unknown_nonzero;
    run_ordered(
        threads,
        pipeline_depth(threads),
        move |emit| {
            produce(
                dev_ref,
                &shown,
                origin,
                cs,
                &pieces,
                emit,
                progress,
                unknown_nonzero_ref,
            )
        },
        |job: Job| {
            let (header, payload) =
                format::encode_chunk(job.index, job.kind, job.disk_offset, job.data, zstd_level)?;
            Ok(Encoded { header, payload })
        },
        |enc: Encoded| writer.write_chunk(&enc.header, &enc.payload),
    )?;
    let (manifest, image_bytes, _) = writer.finish()?;
    progress.end();
    let data_bytes = manifest.data_bytes();
    let table_bytes: u64 = manifest
        .entries
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Table)
        .map(|e| e.header.raw_len)
        .sum();
    Ok(Captured {
        summary: CaptureSummary {
            chunks: manifest.entries.len() as u64,
            data_bytes,
            image_bytes,
            used_bytes: fs_used + unknown_nonzero + table_bytes,
        },
        meta,
        manifest,
        origin,
    })
}

fn read_block(dev: &File, shown: &str, buf: &mut [u8], offset: u64) -> Result<()> {
    dev.read_exact_at(buf, offset)
        .ctx(|| format!("reading {shown} at offset {offset}"))
}

/// Walk the plan chunk by chunk, reading the device; `origin` is where image offset 0 is
/// on the device.
#[allow(clippy::too_many_arguments)]
fn produce(
    dev: &File,
    shown: &str,
    origin: u64,
    cs: u64,
    pieces: &[Piece],
    emit: &mut dyn FnMut(Item<Job, Encoded>) -> bool,
    progress: &dyn Progress,
    unknown_nonzero: &mut u64,
) -> Result<()> {
    let sparse = dev.metadata().map(|m| m.is_file()).unwrap_or(false);
    let mut index = 0u64;
    let mut next_index = || {
        index += 1;
        index - 1
    };
    for piece in pieces {
        match *piece {
            Piece::Used(e) | Piece::Table(e) => {
                let kind = if matches!(piece, Piece::Table(_)) {
                    ChunkKind::Table
                } else {
                    ChunkKind::Data
                };
                let mut off = e.offset;
                let end = e.offset + e.len;
                while off < end {
                    let n = (end - off).min(cs);
                    let mut data = vec![0u8; n as usize];
                    if let Err(err) = read_block(dev, shown, &mut data, origin + off) {
                        emit(Item::Ready(Err(err)));
                        return Ok(());
                    }
                    progress.advance(n);
                    if !emit(Item::Job(Job {
                        index: next_index(),
                        kind,
                        disk_offset: off,
                        data,
                    })) {
                        return Ok(());
                    }
                    off += n;
                }
            }
            Piece::Unknown(e) => {
                // Pending zero run, merged across blocks; emitted before the next data.
                let mut zero: Option<Extent> = None;
                let mut off = e.offset;
                let end = e.offset + e.len;
                while off < end {
                    // A hole in a sparse image file reads as zeros: skip it unread.
                    let hole = hole_len(dev, sparse, origin + off, end - off);
                    if hole > 0 {
                        zero = Some(match zero {
                            Some(z) => Extent::new(z.offset, z.len + hole),
                            None => Extent::new(off, hole),
                        });
                        progress.advance(hole);
                        off += hole;
                        continue;
                    }
                    let n = (end - off).min(cs);
                    let mut data = vec![0u8; n as usize];
                    if let Err(err) = read_block(dev, shown, &mut data, origin + off) {
                        emit(Item::Ready(Err(err)));
                        return Ok(());
                    }
                    progress.advance(n);
                    for (seg, is_zero) in split_zero_runs(&data) {
                        let seg_off = off + seg.offset;
                        if is_zero {
                            zero = Some(match zero {
                                Some(z) => Extent::new(z.offset, z.len + seg.len),
                                None => Extent::new(seg_off, seg.len),
                            });
                            continue;
                        }
                        if let Some(z) = zero.take() {
                            let h = format::zero_chunk(next_index(), z.offset, z.len);
                            if !emit(Item::Ready(Ok(Encoded {
                                header: h,
                                payload: Vec::new(),
                            }))) {
                                return Ok(());
                            }
                        }
                        let bytes =
                            data[seg.offset as usize..(seg.offset + seg.len) as usize].to_vec();
                        *unknown_nonzero += seg.len;
                        if !emit(Item::Job(Job {
                            index: next_index(),
                            kind: ChunkKind::Data,
                            disk_offset: seg_off,
                            data: bytes,
                        })) {
                            return Ok(());
                        }
                    }
                    off += n;
                }
                if let Some(z) = zero.take() {
                    let h = format::zero_chunk(next_index(), z.offset, z.len);
                    if !emit(Item::Ready(Ok(Encoded {
                        header: h,
                        payload: Vec::new(),
                    }))) {
                        return Ok(());
                    }
                }
            }
        }
    }
    Ok(())
}

/// Length of the hole at `pos` in a regular file (0 if data, not a file, or the hole is
/// shorter than [`MIN_ZERO_RUN`]), at most `max`, in whole [`BLOCK`]s. `SEEK_DATA`
/// (lseek(2)) finds the next data; ENXIO means only a hole follows.
fn hole_len(dev: &File, sparse: bool, pos: u64, max: u64) -> u64 {
    use std::os::fd::AsRawFd;
    if !sparse {
        return 0;
    }
    let Ok(p) = i64::try_from(pos) else { return 0 };
    let data = match nix::unistd::lseek(dev.as_raw_fd(), p, nix::unistd::Whence::SeekData) {
        Ok(d) => d as u64,
        Err(nix::errno::Errno::ENXIO) => u64::MAX,
        Err(_) => return 0,
    };
    let len = data.saturating_sub(pos).min(max) / BLOCK * BLOCK;
    if len >= MIN_ZERO_RUN {
        len
    } else {
        0
    }
}

/// Whether a block (at most [`BLOCK`] bytes) is all zeros. A slice comparison is a
/// `memcmp`, several times faster than a byte loop: a raw capture of a mostly empty disk
/// spends its time here.
fn is_zero(block: &[u8]) -> bool {
    static ZEROS: [u8; BLOCK as usize] = [0; BLOCK as usize];
    block == &ZEROS[..block.len()]
}

/// Cut `data` into alternating segments: zero runs of at least [`MIN_ZERO_RUN`] (block
/// aligned) and everything else. Returns (segment relative to `data`, is_zero).
fn split_zero_runs(data: &[u8]) -> Vec<(Extent, bool)> {
    let len = data.len() as u64;
    let mut zero_blocks: Vec<Extent> = Vec::new();
    let mut off = 0u64;
    while off < len {
        let n = (len - off).min(BLOCK);
        if is_zero(&data[off as usize..(off + n) as usize]) {
            match zero_blocks.last_mut() {
                Some(z) if z.offset + z.len == off => z.len += n,
                _ => zero_blocks.push(Extent::new(off, n)),
            }
        }
        off += n;
    }
    // Short runs in the middle stay in the data; runs touching either end of the block are
    // kept as zero so they can merge with the neighbouring block's run.
    zero_blocks.retain(|z| z.len >= MIN_ZERO_RUN || z.offset == 0 || z.offset + z.len == len);
    let mut out = Vec::new();
    let mut pos = 0;
    for z in zero_blocks {
        if z.offset > pos {
            out.push((Extent::new(pos, z.offset - pos), false));
        }
        out.push((z, true));
        pos = z.offset + z.len;
    }
    if pos < len {
        out.push((Extent::new(pos, len - pos), false));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gaps_are_the_complement() {
        let g = gaps(
            100,
            &[
                Extent::new(10, 10),
                Extent::new(15, 20),
                Extent::new(90, 20),
            ],
        );
        assert_eq!(g, vec![Extent::new(0, 10), Extent::new(35, 55)]);
        assert_eq!(gaps(10, &[]), vec![Extent::new(0, 10)]);
    }

    #[test]
    fn zero_runs_are_split_out() {
        let mut d = vec![1u8; 512 << 10];
        d[100 << 10..300 << 10].fill(0); // long run inside: zero chunk
        d[400 << 10..404 << 10].fill(0); // one short block inside: stays data
        d[(512 - 8) << 10..].fill(0); // short run at the end: zero (merges with next block)
        let s = split_zero_runs(&d);
        assert_eq!(
            s,
            vec![
                (Extent::new(0, 100 << 10), false),
                (Extent::new(100 << 10, 200 << 10), true),
                (Extent::new(300 << 10, 204 << 10), false),
                (Extent::new(504 << 10, 8 << 10), true),
            ]
        );
        assert_eq!(
            split_zero_runs(&[0u8; 100]),
            vec![(Extent::new(0, 100), true)]
        );
        assert_eq!(
            split_zero_runs(&[7u8; 100]),
            vec![(Extent::new(0, 100), false)]
        );
    }

    fn tmp(name: &str) -> std::path::PathBuf {
        std::env::temp_dir().join(format!("imgengine-capture-{name}-{}", std::process::id()))
    }

    #[test]
    fn raw_capture_of_a_tableless_file_round_trips() {
        let p = tmp("raw");
        let disk = format::testimg::disk(3 << 20);
        std::fs::write(&p, &disk).unwrap();
        let mut out = Vec::new();
        let opts = CaptureOptions {
            raw: true,
            chunk_size: 256 << 10,
            threads: 2,
            ..Default::default()
        };
        let s = capture(&p, None, &mut out, &opts, &crate::io::NoProgress).unwrap();
        assert_eq!(s.image_bytes, out.len() as u64);
        assert!(
            s.data_bytes < disk.len() as u64,
            "the zero hole is not stored"
        );
        assert_eq!(format::testimg::replay(&out, disk.len()).unwrap(), disk);
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn bad_options_are_refused() {
        let mut out = Vec::new();
        let p = Path::new("/nonexistent");
        let o = CaptureOptions {
            comp: 12,
            ..Default::default()
        };
        assert!(capture(p, None, &mut out, &o, &crate::io::NoProgress).is_err());
        let o = CaptureOptions {
            chunk_size: 1000,
            ..Default::default()
        };
        assert!(capture(p, None, &mut out, &o, &crate::io::NoProgress)
            .unwrap_err()
            .to_string()
            .contains("chunk size"));
    }
}
