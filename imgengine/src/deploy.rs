//! Deploy: an image from a file, a pipe or an HTTP(S) URL onto a disk or a partition,
//! verified before written, and `verify`, the same pipeline without a target.
//!
//! The order of events is the safety argument:
//! 1. the preamble (and, sealed, the manifest and signature) is read and, when the agent
//!    has trusted keys, the signature is checked: nothing has been opened for writing yet;
//! 2. the target is opened and checked against the image (size, whole disk or partition),
//!    a resume journal is written, and for a whole disk the partition-table regions are
//!    zeroed, so a deploy that dies from here on leaves a disk that does not look valid;
//! 3. chunks stream through: a reader thread parses records and checks each header against
//!    the manifest, workers check CRC32, decompress and check SHA-256, and the caller's
//!    thread writes them in image order; the first bad chunk stops everything, so the
//!    target is never written past it;
//! 4. the table chunks, held back, are written last, the target synced, the journal removed;
//!    a GPT image on a larger disk then has its backup moved to the disk's end.
//!
//! Resume: with the manifest known up front (sealed, or a streaming image on a source that
//! can read ranges), the target's chunk regions are hashed in parallel and only the chunks
//! that differ are fetched, neighbours coalesced into one range request.
//!
//! Raw images (.img, .img.zst, .img.gz, .img.xz) are recognised by their magic bytes and
//! written with holes for zero blocks.

use std::fs;
use std::io::{BufReader, Read};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::capture::worker_threads;
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{
    self,
    reader::{read_expected_header, read_payload},
    ChunkHeader, ChunkKind, Content, ImageHead, ImageInfo, ImageReader, Layout, Manifest,
    ManifestEntry,
};
use crate::io::ordered::{pipeline_depth, run_ordered, run_weighted, Item};
use crate::io::{PeekReader, Progress};
use crate::sign::{self, VerifyingKey};
use crate::source::{HttpConfig, Location, Source};
use crate::target::Target;

mod plan;
mod stream;

use stream::{stream_chunk, weight, Out, PIPELINE_BYTES, STREAM_OVER};

/// Whether to pick up an interrupted deploy.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeMode {
    /// Resume when a journal says the same image was being deployed to the same target.
    Auto,
    /// Always compare the target with the manifest and fetch only what differs.
    Always,
    /// Always write everything.
    Never,
}

/// How to deploy.
#[derive(Debug, Clone)]
pub struct DeployOptions {
    /// Non-empty: only sealed images signed by one of these keys are deployed.
    pub trusted_keys: Vec<VerifyingKey>,
    pub resume: ResumeMode,
    /// Where resume journals live.
    pub state_dir: PathBuf,
    /// Verification threads; 0 = one per CPU.
    pub threads: usize,
    pub http: HttpConfig,
    /// Addition: write a partition image over a whole disk (a "superfloppy": one file
    /// system, no partition table). Without it such a deploy is refused, because it would
    /// overwrite the disk's partition table.
    pub partition_onto_disk: bool,
}

impl Default for DeployOptions {
    fn default() -> Self {
        DeployOptions {
            trusted_keys: Vec::new(),
            resume: ResumeMode::Auto,
            state_dir: PathBuf::from("/var/lib/img"),
            threads: 0,
            http: HttpConfig::default(),
            partition_onto_disk: false,
        }
    }
}

/// What a deploy did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeploySummary {
    /// Chunks written (data, table and zero chunks).
    pub chunks_written: u64,
    /// Chunks found intact on the target and not fetched (resume).
    pub chunks_skipped: u64,
    /// Bytes of data written (zero ranges not counted).
    pub bytes_written: u64,
    /// Bytes read from the source.
    pub bytes_fetched: u64,
    /// The image was a raw disk image, not ours.
    pub raw: bool,
    /// Addition: the target was compared with the manifest and only differences fetched.
    pub resumed: bool,
    /// Addition: things the user should know (why a resume did not happen, ...).
    pub notes: Vec<String>,
}

/// Table chunks are held in memory until the end: a GPT is 33 sectors at each end, so
/// 4 MiB is far above anything legitimate and bounds what a hostile image can make us hold.
const MAX_HELD_TABLE_BYTES: u64 = 4 << 20;
/// Bytes read from the front of a source to tell what it is (and, for zstd, the frame
/// header with the content size: at most 18 bytes).
const HEAD_BYTES: usize = 18;
/// Raw images are written in blocks of this size.
const RAW_BLOCK: usize = 4 << 20;

/// The sequential read of a source, as the image reader sees it.
type SourceStream = PeekReader<BufReader<Box<dyn Read + Send>>>;

/// Reads from the source go through one 256 KiB buffer: chunk headers are 76 bytes and
/// would otherwise each cost a read system call (or an HTTP body read); payloads larger
/// than the buffer bypass it.
fn buffered(r: Box<dyn Read + Send>) -> BufReader<Box<dyn Read + Send>> {
    BufReader::with_capacity(256 << 10, r)
}

/// What the magic bytes say a source holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SourceFormat {
    Ours,
    Zstd,
    Gzip,
    Xz,
    Raw,
}

fn sniff(head: &[u8]) -> SourceFormat {
    if head.starts_with(&format::MAGIC) {
        SourceFormat::Ours
    } else if head.starts_with(&[0x28, 0xB5, 0x2F, 0xFD]) {
        SourceFormat::Zstd
    } else if head.starts_with(&[0x1F, 0x8B]) {
        SourceFormat::Gzip
    } else if head.starts_with(&[0xFD, 0x37, 0x7A, 0x58, 0x5A, 0x00]) {
        SourceFormat::Xz
    } else {
        SourceFormat::Raw
    }
}

/// A verified chunk ready for the target.
struct Verified {
    header: ChunkHeader,
    data: Vec<u8>,
}

/// The resume journal: which image was going where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Journal {
    manifest_digest: String,
    target: String,
    part: Option<String>,
    target_len: u64,
}

impl Journal {
    fn path(state_dir: &Path, target: &str, part: Option<&str>) -> PathBuf {
        let key = Sha256::digest(format!("{target}\0{}", part.unwrap_or("")).as_bytes());
        state_dir.join(format!("deploy-{}.json", hex::encode(&key[..8])))
    }

    fn load(path: &Path) -> Option<Journal> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    fn store(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).ctx(|| format!("creating state directory {}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::invalid("encoding the resume journal").with_source(e))?;
        // Written, synced, renamed, and the directory synced: after a power cut the journal
        // is either the old one or the new one, complete, and it is on disk before the
        // target's tables are invalidated.
        let mut f =
            fs::File::create(&tmp).ctx(|| format!("writing resume journal {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, &body)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("writing resume journal {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("writing resume journal {}", path.display()))?;
        sync_dir(dir)
    }

    /// Remove the journal after a finished deploy (and make the removal durable).
    fn remove(path: &Path) {
        if fs::remove_file(path).is_ok() {
            let _ = sync_dir(path.parent().unwrap_or(Path::new(".")));
        }
    }
}

/// fsync a directory, so that a rename or removal in it survives a power cut.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

/// Check the signature of a sealed head against `trusted` (or only its own key when
/// `trusted` is empty); refuse unsigned images when `trusted` is not empty.
fn check_trust(
    layout: Layout,
    preamble: &[u8],
    manifest: Option<&[u8]>,
    sig: Option<&format::SignatureBlock>,
    trusted: &[VerifyingKey],
) -> Result<Option<String>> {
    match (layout, manifest, sig) {
        (Layout::Sealed, Some(m), Some(s)) => Ok(Some(sign::verify_image(preamble, m, s, trusted)?.to_string())),
        _ if trusted.is_empty() => Ok(None),
        _ => Err(Error::new(
            ErrorKind::Signature,
            "image is not signed (streaming layout) and this agent only deploys signed images: seal it with `img seal -key <secret>`",
        )),
    }
}

/// Open the target the image's content asks for and check it fits. A target smaller than
/// the image is refused, never grown; a missing path is an error, never created.
fn open_target(
    target: &Path,
    part: Option<&str>,
    content: &Content,
    min_size: u64,
    partition_onto_disk: bool,
) -> Result<Target> {
    let t = match (part, content) {
        (Some(_), Content::Disk { .. }) => {
            return Err(Error::invalid(format!(
                "the image holds a whole disk; deploy it to {} without a partition",
                target.display()
            )))
        }
        (Some(spec), Content::Partition { .. }) => Target::open_partition(target, spec)?.0,
        (None, Content::Partition { partition }) if !partition_onto_disk => {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "the image holds one partition ({}{}) and {} is a whole disk: writing it there would overwrite the disk's partition table; name the partition to restore into with -part=N or -part=LABEL, or add -wholedisk to write it over the whole disk (a disk without a partition table)",
                    partition.fs.as_str(),
                    partition
                        .label
                        .as_deref()
                        .or(partition.fs_label.as_deref())
                        .map(|l| format!(", label {l}"))
                        .unwrap_or_default(),
                    target.display()
                ),
            ))
        }
        (None, _) => Target::open_disk(target, None)?,
    };
    if t.len() < min_size {
        return Err(Error::new(
            ErrorKind::Target,
            format!("{} has {} bytes but the image needs at least {min_size}; use a larger disk or partition", target.display(), t.len()),
        ));
    }
    Ok(t)
}

/// Zero the partition-table regions of a whole-disk target (the image's and the ones
/// the target has now), so a deploy that fails part-way leaves no valid-looking table.
fn invalidate_tables(t: &Target, content: &Content) -> Result<()> {
    let Content::Disk { layout } = content else {
        return Ok(());
    };
    let mut regions = layout.table_extents.clone();
    if let Ok(current) = crate::disk::read_layout(t, t.len()) {
        regions.extend(current.table_extents);
    }
    for e in crate::extent::normalize(regions, 0) {
        if let Some(e) = e.clip(t.len()) {
            t.zero_range(e.offset, e.len)?;
        }
    }
    // On stable storage before the first data write: otherwise the device may keep the old
    // table in its write cache while new data reaches the medium, and a power cut leaves an
    // old table over new data. fdatasync on a block device is a cache flush.
    t.sync()
}

/// Writes verified chunks to the target in order, holding table chunks back.
struct ChunkSink<'a> {
    target: &'a Target,
    /// Set when the chunks were not checked up front (no manifest before the chunks).
    extent_check: Option<plan::ExtentCheck>,
    held_tables: Vec<Verified>,
    held_bytes: u64,
    summary: DeploySummary,
    progress: &'a dyn Progress,
    /// A streamed chunk partly written and not yet verified.
    partial: Option<ChunkHeader>,
}

impl ChunkSink<'_> {
    /// Take what the pipeline delivers.
    fn take(&mut self, out: Out) -> Result<()> {
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
    fn scrub(&mut self) {
        if let Some(h) = self.partial.take() {
            let _ = self.target.zero_range(h.disk_offset, h.raw_len);
            let _ = self.target.sync();
        }
    }

    fn put(&mut self, v: Verified) -> Result<()> {
        let h = v.header;
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
                self.target.write_sparse_at(&v.data, h.disk_offset)?;
                self.summary.bytes_written += h.raw_len;
            }
        }
        self.summary.chunks_written += 1;
        self.progress.advance(h.raw_len);
        Ok(())
    }

    /// Write the held table chunks and sync.
    fn finish(mut self) -> Result<DeploySummary> {
        if !self.held_tables.is_empty() {
            // Data first on stable storage, then the table: after a power cut the disk
            // either has no table or a table over complete data, never a table over holes.
            self.target.sync()?;
        }
        for v in std::mem::take(&mut self.held_tables) {
            self.target.write_at(&v.data, v.header.disk_offset)?;
            self.summary.bytes_written += v.header.raw_len;
            self.summary.chunks_written += 1;
        }
        self.target.sync()?;
        Ok(self.summary)
    }
}

fn decode(rec: format::ChunkRecord) -> Result<Out> {
    let header = rec.header;
    let data = format::decode_chunk(&header, rec.payload)?;
    Ok(Out::Whole(Verified { header, data }))
}

/// Stream every chunk of `reader` through verification into `sink` (`None`: verify only).
/// `expected`: the manifest known before the chunks (sealed, or read from the end).
fn stream_chunks<R: Read + Send>(
    reader: &mut ImageReader<R>,
    expected: Option<&Manifest>,
    threads: usize,
    mut sink: Option<&mut ChunkSink<'_>>,
    progress: &dyn Progress,
) -> Result<()> {
    reader.defer_payloads_over(STREAM_OVER);
    run_weighted(
        threads,
        pipeline_depth(threads),
        PIPELINE_BYTES,
        |emit| {
            loop {
                match reader.next_chunk() {
                    Ok(Some(rec)) => {
                        if let Some(m) = expected {
                            let want = m.entries.get(rec.header.index as usize);
                            if want
                                != Some(&ManifestEntry {
                                    header: rec.header,
                                    image_offset: rec.image_offset,
                                })
                            {
                                emit(
                                    Item::Ready(Err(Error::corrupt(format!(
                                        "{}: does not match the manifest (chunks swapped, replaced or moved)",
                                        rec.header.describe()
                                    )))),
                                    0,
                                );
                                return Ok(());
                            }
                        }
                        if reader.is_deferred(&rec.header) {
                            if !stream_chunk(rec.header, &mut reader.deferred_payload(), emit) {
                                return Ok(());
                            }
                            continue;
                        }
                        let w = weight(&rec.header);
                        if !emit(Item::Job(rec), w) {
                            return Ok(());
                        }
                    }
                    Ok(None) => break,
                    Err(e) => {
                        emit(Item::Ready(Err(e)), 0);
                        return Ok(());
                    }
                }
            }
            if let (Some(m), Some((got, _))) = (expected, reader.manifest()) {
                if got != m {
                    emit(
                        Item::Ready(Err(Error::corrupt(
                            "the manifest at the end of the image differs from the one read first",
                        ))),
                        0,
                    );
                }
            }
            Ok(())
        },
        decode,
        |out: Out| match sink.as_deref_mut() {
            Some(s) => s.take(out),
            None => {
                match out {
                    Out::Whole(v) => progress.advance(v.header.raw_len),
                    Out::Piece { data, .. } => progress.advance(data.len() as u64),
                    Out::End(_) => {}
                }
                Ok(())
            }
        },
    )
}

/// How much of the target to compare with the manifest before deploying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum IntactCheck {
    /// Write everything.
    None,
    /// Every data chunk (a matching journal says this target was being deployed).
    All,
    /// The first chunks, and all of them only if some of those are intact: a target that
    /// holds something else costs a few chunk reads, a re-run of a finished deploy skips
    /// everything.
    Probe,
}

/// Data chunks hashed before `IntactCheck::Probe` decides.
const PROBE_CHUNKS: usize = 16;
/// Target bytes hashed per read.
const HASH_PIECE: u64 = 1 << 20;

fn probe_intact(
    t: &Target,
    m: &Manifest,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Option<Vec<bool>>> {
    let cut = m
        .entries
        .iter()
        .enumerate()
        .filter(|(_, e)| e.header.kind == ChunkKind::Data)
        .nth(PROBE_CHUNKS)
        .map_or(m.entries.len(), |(i, _)| i);
    let mut intact = intact_chunks(t, &m.entries[..cut], threads, progress)?;
    if !intact.iter().any(|&ok| ok) {
        return Ok(None);
    }
    intact.extend(intact_chunks(t, &m.entries[cut..], threads, progress)?);
    Ok(Some(intact))
}

/// Hash the target's regions of the data chunks among `entries` in parallel (each in 1 MiB
/// reads, so memory does not grow with the chunk size); returns, per entry, whether the
/// target already holds it.
fn intact_chunks(
    t: &Target,
    entries: &[ManifestEntry],
    threads: usize,
    progress: &dyn Progress,
) -> Result<Vec<bool>> {
    let total = entries
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .map(|e| e.header.raw_len)
        .sum();
    progress.begin("checking target", Some(total));
    let mut intact = Vec::with_capacity(entries.len());
    run_ordered(
        threads,
        pipeline_depth(threads),
        |emit| {
            for e in entries {
                let item = if e.header.kind == ChunkKind::Data {
                    Item::Job(e.header)
                } else {
                    Item::Ready(Ok(false))
                };
                if !emit(item) {
                    break;
                }
            }
            Ok(())
        },
        |h: ChunkHeader| {
            if h.disk_offset
                .checked_add(h.raw_len)
                .is_none_or(|end| end > t.len())
            {
                return Ok(false);
            }
            let mut buf = vec![0u8; h.raw_len.min(HASH_PIECE) as usize];
            let mut sha = Sha256::new();
            let mut off = 0;
            while off < h.raw_len {
                let n = (h.raw_len - off).min(HASH_PIECE) as usize;
                t.read_at(&mut buf[..n], h.disk_offset + off)?;
                sha.update(&buf[..n]);
                off += n as u64;
            }
            progress.advance(h.raw_len);
            Ok(<[u8; 32]>::from(sha.finalize()) == h.sha256)
        },
        |ok| {
            intact.push(ok);
            Ok(())
        },
    )?;
    progress.end();
    Ok(intact)
}

/// Fetch and write only the chunks not `intact`, runs of neighbours in one range request.
fn fetch_missing(
    src: &Source,
    manifest: &Manifest,
    intact: &[bool],
    threads: usize,
    sink: &mut ChunkSink<'_>,
) -> Result<()> {
    // Zero chunks need no fetching.
    let mut groups: Vec<Vec<ManifestEntry>> = Vec::new();
    for (e, &ok) in manifest.entries.iter().zip(intact) {
        if ok {
            sink.summary.chunks_skipped += 1;
            continue;
        }
        if e.header.kind == ChunkKind::Zero {
            sink.take(Out::Whole(Verified {
                header: e.header,
                data: Vec::new(),
            }))?;
            continue;
        }
        match groups.last_mut() {
            Some(g)
                if g.last()
                    .is_some_and(|l| l.header.index + 1 == e.header.index) =>
            {
                g.push(*e)
            }
            _ => groups.push(vec![*e]),
        }
    }
    run_weighted(
        threads,
        pipeline_depth(threads),
        PIPELINE_BYTES,
        |emit| {
            for g in &groups {
                let (first, last) = (g[0], g[g.len() - 1]);
                let len = last.image_offset + last.record_len() - first.image_offset;
                let stream = match src.read_range(first.image_offset, len) {
                    Ok(s) => s,
                    Err(e) => {
                        emit(Item::Ready(Err(e)), 0);
                        return Ok(());
                    }
                };
                let mut r = BufReader::with_capacity(256 << 10, stream);
                for e in g {
                    let h = match read_expected_header(&mut r, e) {
                        Ok(h) => h,
                        Err(err) => {
                            emit(Item::Ready(Err(err)), 0);
                            return Ok(());
                        }
                    };
                    let comp_len = u64::from(h.comp_len);
                    if h.raw_len > STREAM_OVER {
                        if !stream_chunk(h, &mut (&mut r).take(comp_len), emit) {
                            return Ok(());
                        }
                        continue;
                    }
                    let item = match read_payload(&mut r, comp_len, || {
                        format!("{}: payload", h.describe())
                    }) {
                        Ok(payload) => Item::Job(format::ChunkRecord {
                            header: h,
                            image_offset: e.image_offset,
                            payload,
                        }),
                        Err(err) => {
                            emit(Item::Ready(Err(err)), 0);
                            return Ok(());
                        }
                    };
                    if !emit(item, weight(&h)) {
                        return Ok(());
                    }
                }
            }
            Ok(())
        },
        decode,
        |out| sink.take(out),
    )
}

/// Deploy the image at `src` onto `target` (a block device or a disk-image file), or onto
/// its partition `part` (number, GPT name or FS label) for a partition image.
pub fn deploy(
    src: &Location,
    target: &Path,
    part: Option<&str>,
    opts: &DeployOptions,
    progress: &dyn Progress,
) -> Result<DeploySummary> {
    let mut source = Source::open(src, &opts.http)?;
    let threads = worker_threads(opts.threads);
    let ranges = source.supports_ranges() && source.len().is_some();
    let mut notes = Vec::new();

    // Step 1: what is it, and is it trusted? Nothing is opened for writing before this.
    let mut head: Option<ImageHead> = None;
    if ranges {
        let mut magic = Vec::new();
        source
            .read_range(0, source.len().unwrap_or(0).min(HEAD_BYTES as u64))?
            .read_to_end(&mut magic)
            .ctx(|| format!("reading {src}"))?;
        let kind = sniff(&magic);
        if kind != SourceFormat::Ours {
            let stream =
                PeekReader::new(buffered(source.stream()?), 0).ctx(|| format!("reading {src}"))?;
            return deploy_raw(stream, &magic, kind, &source, target, part, opts, progress);
        }
        head = Some(format::fetch_head(&source)?);
    }
    // Without ranges, the stream is all there is: the preamble (and a sealed manifest) come
    // from its front. With ranges the head was read above and the stream is opened only if
    // the chunks are to be read in sequence.
    let mut reader: Option<ImageReader<SourceStream>> = None;
    let head = match head {
        Some(h) => h,
        None => {
            let stream = PeekReader::new(buffered(source.stream()?), HEAD_BYTES)
                .ctx(|| format!("reading {src}"))?;
            let kind = sniff(stream.peek());
            if kind != SourceFormat::Ours {
                let first = stream.peek().to_vec();
                return deploy_raw(stream, &first, kind, &source, target, part, opts, progress);
            }
            let r = ImageReader::open(stream)?;
            let h = ImageHead {
                preamble_bytes: r.preamble_bytes.clone(),
                meta: r.meta.clone(),
                layout: r.preamble.layout,
                manifest: r
                    .sealed
                    .as_ref()
                    .map(|s| s.manifest.clone())
                    .unwrap_or_default(),
                manifest_bytes: r
                    .sealed
                    .as_ref()
                    .map(|s| s.manifest_bytes.clone())
                    .unwrap_or_default(),
                signature: r.sealed.as_ref().map(|s| s.signature),
                image_len: 0,
            };
            reader = Some(r);
            h
        }
    };
    // The manifest is known up front unless this is a streaming image on a pipe.
    let manifest_known = ranges || head.layout == Layout::Sealed;
    let manifest_bytes = manifest_known.then_some(head.manifest_bytes.as_slice());
    check_trust(
        head.layout,
        &head.preamble_bytes,
        manifest_bytes,
        head.signature.as_ref(),
        &opts.trusted_keys,
    )?;
    let manifest: Option<Manifest> = manifest_known.then(|| head.manifest.clone());

    // Step 2: the target, and every chunk extent checked against it and against the
    // image's table regions before anything is written or invalidated.
    let meta = head.meta.clone();
    let t = open_target(
        target,
        part,
        &meta.content,
        meta.min_target_size,
        opts.partition_onto_disk,
    )?;
    let extent_check = match &manifest {
        Some(m) => {
            plan::check_all(&meta, t.len(), m.entries.iter().map(|e| &e.header))?;
            None
        }
        // A streaming image on a pipe: each chunk is checked as it arrives, before it is
        // written.
        None => Some(plan::ExtentCheck::new(&meta, t.len())),
    };
    let journal_path = Journal::path(&opts.state_dir, &target.display().to_string(), part);
    let journal = manifest.as_ref().map(|m| Journal {
        manifest_digest: m.digest(),
        target: target.display().to_string(),
        part: part.map(str::to_string),
        target_len: t.len(),
    });
    let journal_matches = journal
        .as_ref()
        .is_some_and(|j| Journal::load(&journal_path).as_ref() == Some(j));
    let check = match (opts.resume, &journal) {
        (ResumeMode::Never, _) => IntactCheck::None,
        (_, None) => {
            if opts.resume == ResumeMode::Always || Journal::load(&journal_path).is_some() {
                notes.push(format!("{src} is a stream without a manifest up front: cannot resume, deploying everything"));
            }
            IntactCheck::None
        }
        (ResumeMode::Always, Some(_)) => IntactCheck::All,
        (ResumeMode::Auto, Some(_)) if journal_matches => IntactCheck::All,
        (ResumeMode::Auto, Some(_)) => IntactCheck::Probe,
    };
    let check = if check != IntactCheck::None && !ranges {
        if check == IntactCheck::All {
            notes.push(format!(
                "{src} cannot be read at an offset (a pipe): cannot resume, deploying everything"
            ));
        }
        IntactCheck::None
    } else {
        check
    };
    if let Some(j) = &journal {
        j.store(&journal_path)?;
    }
    invalidate_tables(&t, &meta.content)?;

    // Step 3: the chunks.
    let total = manifest
        .as_ref()
        .map(|m| m.entries.iter().map(|e| e.header.raw_len).sum());
    let mut sink = ChunkSink {
        target: &t,
        extent_check,
        held_tables: Vec::new(),
        held_bytes: 0,
        summary: DeploySummary::default(),
        progress,
        partial: None,
    };
    let intact = match (&manifest, check) {
        (Some(m), IntactCheck::All) => Some(intact_chunks(&t, &m.entries, threads, progress)?),
        (Some(m), IntactCheck::Probe) => probe_intact(&t, m, threads, progress)?,
        _ => None,
    };
    match (&manifest, intact) {
        (Some(m), Some(intact)) => {
            drop(reader);
            progress.begin("deploying", total);
            let r = fetch_missing(&source, m, &intact, threads, &mut sink);
            if r.is_err() {
                sink.scrub();
            }
            r?;
            sink.summary.resumed = true;
        }
        _ => {
            let mut reader = match reader {
                Some(r) => r,
                None => {
                    let r = ImageReader::open(
                        PeekReader::new(buffered(source.stream()?), 0)
                            .ctx(|| format!("reading {src}"))?,
                    )?;
                    let same_manifest = r
                        .sealed
                        .as_ref()
                        .is_none_or(|s| s.manifest_bytes == head.manifest_bytes);
                    if r.preamble_bytes != head.preamble_bytes || !same_manifest {
                        return Err(Error::corrupt(format!(
                            "{src}: the image changed while it was being read"
                        )));
                    }
                    r
                }
            };
            progress.begin("deploying", total);
            let r = stream_chunks(
                &mut reader,
                manifest.as_ref(),
                threads,
                Some(&mut sink),
                progress,
            );
            if r.is_err() {
                sink.scrub();
            }
            r?;
        }
    }

    // Step 4: tables last, sync, forget the journal.
    let mut summary = sink.finish()?;
    // A partition image may land at another offset than where it was captured.
    if part.is_some() {
        notes.extend(crate::fs::hidden::fix_hidden_sectors(target, &t)?);
    }
    // A GPT image on a larger disk: the backup must sit in the target's last LBA (UEFI
    // §5.3.2), not where the source disk ended.
    if let Content::Disk { layout } = &meta.content {
        if layout.table == crate::disk::TableKind::Gpt && layout.disk_size < t.len() {
            crate::disk::gpt::relocate_backup(&t, layout.sector_size)?;
            notes.push(format!(
                "the image's disk had {} bytes, {} has {}: moved the GPT backup to its end",
                layout.disk_size,
                target.display(),
                t.len()
            ));
        }
    }
    progress.end();
    if journal.is_some() {
        Journal::remove(&journal_path);
    }
    summary.bytes_fetched = source.bytes_fetched();
    summary.notes = notes;
    Ok(summary)
}

/// Deploy an ordinary raw image (possibly zstd/gzip/xz compressed).
#[allow(clippy::too_many_arguments)]
fn deploy_raw<R: Read + Send + 'static>(
    stream: PeekReader<R>,
    first: &[u8],
    kind: SourceFormat,
    source: &Source,
    target: &Path,
    part: Option<&str>,
    opts: &DeployOptions,
    progress: &dyn Progress,
) -> Result<DeploySummary> {
    if !opts.trusted_keys.is_empty() {
        return Err(Error::new(
            ErrorKind::Signature,
            format!("{} is a raw disk image, which cannot carry a signature, and this agent only deploys signed images", source.location()),
        ));
    }
    let what = source.location().to_string();
    let mut dec: Box<dyn Read + Send> = match kind {
        SourceFormat::Zstd => Box::new(
            zstd::stream::read::Decoder::new(stream).ctx(|| format!("starting zstd on {what}"))?,
        ),
        SourceFormat::Gzip => Box::new(flate2::read::MultiGzDecoder::new(stream)),
        SourceFormat::Xz => Box::new(xz2::read::XzDecoder::new_multi_decoder(stream)),
        _ => Box::new(stream),
    };
    // The image's size, or at least a lower bound, before anything is written: a plain
    // file's length, or the content size a zstd frame header carries (the first frame's:
    // `zstd` writes it for files).
    let known_len = match kind {
        SourceFormat::Raw => source.len(),
        SourceFormat::Zstd => zstd::zstd_safe::get_frame_content_size(first)
            .ok()
            .flatten(),
        _ => None,
    };
    // Never grown or created: an uncompressed image larger than the target is refused
    // here; a compressed one (its size is known only at its end) stops with the same error
    // at the target's end.
    let t = match part {
        Some(spec) => Target::open_partition(target, spec)?.0,
        None => Target::open_disk(target, None)?,
    };
    let too_large = |len: u64| {
        Error::new(
            ErrorKind::Target,
            format!(
                "the image is larger than {} ({len} bytes or more, the target has {}); use a larger disk or partition",
                target.display(),
                t.len()
            ),
        )
    };
    if let Some(len) = known_len.filter(|&l| l > t.len()) {
        return Err(too_large(len));
    }
    progress.begin("deploying raw image", known_len);
    let mut summary = DeploySummary {
        raw: true,
        ..Default::default()
    };
    run_ordered(
        1,
        2,
        |emit| {
            let mut off = 0u64;
            loop {
                let mut buf = vec![0u8; RAW_BLOCK];
                let mut got = 0;
                while got < buf.len() {
                    match dec.read(&mut buf[got..]) {
                        Ok(0) => break,
                        Ok(n) => got += n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                        Err(e) => {
                            let kind = if matches!(kind, SourceFormat::Raw) {
                                ErrorKind::Io
                            } else {
                                ErrorKind::Corrupt
                            };
                            emit(Item::Ready(Err(Error::new(
                                kind,
                                format!(
                                    "{what}: reading at uncompressed offset {}",
                                    off + got as u64
                                ),
                            )
                            .with_source(e))));
                            return Ok(());
                        }
                    }
                }
                if got == 0 {
                    return Ok(());
                }
                buf.truncate(got);
                if !emit(Item::<(), _>::Ready(Ok((off, buf)))) {
                    return Ok(());
                }
                off += got as u64;
            }
        },
        |_: ()| Err(Error::invalid("no work")),
        |(off, buf): (u64, Vec<u8>)| {
            let n = buf.len() as u64;
            if off + n > t.len() {
                return Err(too_large(off + n));
            }
            t.write_sparse_at(&buf, off)?;
            summary.chunks_written += 1;
            summary.bytes_written += n;
            progress.advance(n);
            Ok(())
        },
    )?;
    // A raw GPT disk image on a larger disk: the backup header belongs in the last LBA.
    if part.is_none() {
        t.sync()?;
        summary
            .notes
            .extend(crate::disk::gpt::relocate_backup_of_raw_image(&t)?);
    }
    // A raw image of a partition (the -raw fallback) written into another partition.
    if part.is_some() {
        summary
            .notes
            .extend(crate::fs::hidden::fix_hidden_sectors(target, &t)?);
    }
    t.sync()?;
    progress.end();
    summary.bytes_fetched = source.bytes_fetched();
    Ok(summary)
}

/// Read the whole image, check every chunk, the manifest and the signature (against
/// `opts.trusted_keys` when there are any), write nothing; returns what `img info` shows.
pub fn verify(src: &Location, opts: &DeployOptions, progress: &dyn Progress) -> Result<ImageInfo> {
    let mut source = Source::open(src, &opts.http)?;
    let stream = PeekReader::new(buffered(source.stream()?), 8).ctx(|| format!("reading {src}"))?;
    if sniff(stream.peek()) != SourceFormat::Ours {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{src} is a raw disk image: it has no checksums to verify"),
        ));
    }
    let mut reader = ImageReader::open(stream)?;
    let (mb, sig) = match &reader.sealed {
        Some(s) => (Some(s.manifest_bytes.clone()), Some(s.signature)),
        None => (None, None),
    };
    let signed_by = check_trust(
        reader.preamble.layout,
        &reader.preamble_bytes,
        mb.as_deref(),
        sig.as_ref(),
        &opts.trusted_keys,
    )?;
    let expected = reader.sealed.as_ref().map(|s| s.manifest.clone());
    progress.begin(
        "verifying",
        expected
            .as_ref()
            .map(|m| m.entries.iter().map(|e| e.header.raw_len).sum()),
    );
    stream_chunks(
        &mut reader,
        expected.as_ref(),
        worker_threads(opts.threads),
        None,
        progress,
    )?;
    progress.end();
    let (manifest, _) = reader
        .manifest()
        .ok_or_else(|| Error::new(ErrorKind::Truncated, format!("{src}: no manifest")))?;
    Ok(ImageInfo {
        meta: reader.meta.clone(),
        sealed: reader.preamble.layout == Layout::Sealed,
        signed_by,
        chunks: manifest.entries.len() as u64,
        data_bytes: manifest.data_bytes(),
        image_bytes: Some(reader.position()),
        manifest_digest: manifest.digest(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testimg;
    use crate::io::NoProgress;
    use crate::sign::SigningKey;

    struct Dir(PathBuf);
    impl Dir {
        fn new(name: &str) -> Dir {
            let d = std::env::temp_dir()
                .join(format!("imgengine-deploy-{name}-{}", std::process::id()));
            let _ = fs::remove_dir_all(&d);
            fs::create_dir_all(&d).unwrap();
            Dir(d)
        }
        fn p(&self, n: &str) -> PathBuf {
            self.0.join(n)
        }
        fn opts(&self) -> DeployOptions {
            DeployOptions {
                state_dir: self.p("state"),
                threads: 2,
                ..Default::default()
            }
        }
    }
    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = fs::remove_dir_all(&self.0);
        }
    }

    const LEN: usize = 1 << 20;
    const CHUNK: usize = 64 << 10;

    fn setup(d: &Dir, sealed_with: Option<&SigningKey>) -> (PathBuf, Vec<u8>) {
        let disk = testimg::disk(LEN);
        let img = d.p("a.img");
        fs::write(&img, testimg::image(&disk, CHUNK)).unwrap();
        if let Some(k) = sealed_with {
            sign::seal_and_sign(&img, &img, k).unwrap();
        }
        (img, disk)
    }

    fn entries(img: &Path) -> Vec<ManifestEntry> {
        let bytes = fs::read(img).unwrap();
        let mut r = ImageReader::open(&bytes[..]).unwrap();
        while r.next_chunk().unwrap().is_some() {}
        r.manifest().unwrap().0.entries.clone()
    }

    #[test]
    fn deploys_streaming_and_sealed_onto_junk() {
        let d = Dir::new("basic");
        let key = SigningKey::generate();
        for sealed in [false, true] {
            let (img, disk) = setup(&d, sealed.then_some(&key));
            let tgt = d.p("t.raw");
            fs::write(&tgt, vec![0xAAu8; LEN]).unwrap();
            let s = deploy(
                &Location::File(img.clone()),
                &tgt,
                None,
                &d.opts(),
                &NoProgress,
            )
            .unwrap();
            assert_eq!(fs::read(&tgt).unwrap(), disk, "sealed={sealed}");
            assert!(!s.raw && !s.resumed && s.chunks_written == 16, "{s:?}");
            let info = verify(&Location::File(img), &d.opts(), &NoProgress).unwrap();
            assert_eq!(info.sealed, sealed);
            assert_eq!(info.signed_by.is_some(), sealed);
        }
    }

    #[test]
    fn trusted_keys_refuse_unsigned_and_wrong_key_before_writing() {
        let d = Dir::new("trust");
        let key = SigningKey::generate();
        let (img, _) = setup(&d, None);
        let tgt = d.p("t.raw");
        let junk = vec![0x55u8; LEN];
        fs::write(&tgt, &junk).unwrap();
        let mut opts = d.opts();
        opts.trusted_keys = vec![key.verifying_key()];
        let e = deploy(&Location::File(img.clone()), &tgt, None, &opts, &NoProgress).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
        sign::seal_and_sign(&img, &img, &SigningKey::generate()).unwrap();
        let e = deploy(&Location::File(img.clone()), &tgt, None, &opts, &NoProgress).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
        assert!(e.to_string().contains("not trusted"), "{e}");
        assert_eq!(fs::read(&tgt).unwrap(), junk, "nothing written");
        sign::seal_and_sign(&img, &img, &key).unwrap();
        deploy(&Location::File(img), &tgt, None, &opts, &NoProgress).unwrap();
    }

    #[test]
    fn corrupt_chunk_stops_before_it() {
        let d = Dir::new("corrupt");
        let (img, disk) = setup(&d, None);
        let es = entries(&img);
        let bad = es[5];
        let mut bytes = fs::read(&img).unwrap();
        bytes[(bad.image_offset + 76 + 3) as usize] ^= 0x20;
        fs::write(&img, &bytes).unwrap();
        let tgt = d.p("t.raw");
        let junk = vec![0x55u8; LEN];
        fs::write(&tgt, &junk).unwrap();
        let e = deploy(&Location::File(img), &tgt, None, &d.opts(), &NoProgress).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(
            e.to_string().contains(&format!(
                "chunk 5 at disk offset {}",
                bad.header.disk_offset
            )),
            "{e}"
        );
        let got = fs::read(&tgt).unwrap();
        let cut = bad.header.disk_offset as usize;
        assert_eq!(
            &got[..cut],
            &disk[..cut],
            "chunks before the bad one are written"
        );
        assert_eq!(
            &got[cut..],
            &junk[cut..],
            "nothing at or after the bad chunk"
        );
    }

    #[test]
    fn interrupted_deploy_resumes_fetching_only_the_rest() {
        let d = Dir::new("resume");
        let key = SigningKey::generate();
        let (img, disk) = setup(&d, Some(&key));
        let full = fs::read(&img).unwrap();
        let es = entries(&img);
        // The first attempt sees the image cut in chunk 9 (a dead connection).
        let cut = es[9].image_offset + 100;
        fs::write(&img, &full[..cut as usize]).unwrap();
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0x55u8; LEN]).unwrap();
        let e = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &d.opts(),
            &NoProgress,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
        assert!(e.to_string().contains("chunk 9"), "{e}");
        // Second attempt with the whole image: chunks 0..9 are on the target already.
        fs::write(&img, &full).unwrap();
        let s = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &d.opts(),
            &NoProgress,
        )
        .unwrap();
        assert!(s.resumed, "{s:?}");
        assert_eq!(fs::read(&tgt).unwrap(), disk);
        let zero_before = es[..9]
            .iter()
            .filter(|e| e.header.kind == ChunkKind::Zero)
            .count() as u64;
        assert_eq!(s.chunks_skipped, 9 - zero_before, "{s:?}");
        let later: u64 = es[9..].iter().map(|e| e.record_len()).sum();
        assert!(
            s.bytes_fetched < later + 8192,
            "fetched {} for {} bytes of later chunks",
            s.bytes_fetched,
            later
        );
        // The journal is gone after success; a third run still finds every data chunk
        // intact (the default check) and fetches none of them.
        let s = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &d.opts(),
            &NoProgress,
        )
        .unwrap();
        let data = es
            .iter()
            .filter(|e| e.header.kind == ChunkKind::Data)
            .count() as u64;
        assert!(s.resumed && s.chunks_skipped == data, "{s:?}");
        assert_eq!(fs::read(&tgt).unwrap(), disk);
        // -resume=never writes everything again.
        let mut never = d.opts();
        never.resume = ResumeMode::Never;
        let s = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &never,
            &NoProgress,
        )
        .unwrap();
        assert!(!s.resumed && s.chunks_skipped == 0, "{s:?}");
    }

    #[test]
    fn big_chunks_are_streamed_and_one_that_fails_its_check_is_zeroed() {
        let d = Dir::new("big");
        let len = 24 << 20;
        let chunk = 12 << 20; // above STREAM_OVER: streamed in pieces
        let disk = testimg::disk(len);
        let img = d.p("big.img");
        let good = testimg::image(&disk, chunk);
        fs::write(&img, &good).unwrap();
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0x55u8; len]).unwrap();
        let mut never = d.opts();
        never.resume = ResumeMode::Never;
        let s = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &never,
            &NoProgress,
        )
        .unwrap();
        assert_eq!(s.chunks_written, 2, "{s:?}");
        assert!(fs::read(&tgt).unwrap() == disk);
        verify(&Location::File(img.clone()), &d.opts(), &NoProgress).unwrap();

        // Cut inside chunk 1: truncated, and none of chunk 1 stays.
        let es = entries(&img);
        let cut = es[1].image_offset + 76 + u64::from(es[1].header.comp_len) / 2;
        fs::write(&img, &good[..cut as usize]).unwrap();
        fs::write(&tgt, vec![0x55u8; len]).unwrap();
        let e = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &never,
            &NoProgress,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
        let got = fs::read(&tgt).unwrap();
        assert!(
            got[chunk..].iter().all(|&b| b == 0) || got[chunk..].iter().all(|&b| b == 0x55),
            "no unverified bytes of chunk 1 stay"
        );

        // A flipped byte late in chunk 1's payload: chunk 0 stays, chunk 1's region is
        // zeroed (not left with unverified bytes), the error names the chunk.
        let mut bad = good.clone();
        let at = es[1].image_offset + 76 + u64::from(es[1].header.comp_len) - 10;
        bad[at as usize] ^= 0x01;
        fs::write(&img, &bad).unwrap();
        fs::write(&tgt, vec![0x55u8; len]).unwrap();
        let e = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &never,
            &NoProgress,
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("chunk 1 at disk offset"), "{e}");
        let got = fs::read(&tgt).unwrap();
        assert!(got[..chunk] == disk[..chunk], "chunk 0 written");
        assert!(got[chunk..].iter().all(|&b| b == 0), "chunk 1 zeroed");
        let e = verify(&Location::File(img.clone()), &d.opts(), &NoProgress).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

        // The good image again, with the resume path (range reads of big chunks): chunk 0
        // is found intact.
        fs::write(&img, &good).unwrap();
        let s = deploy(&Location::File(img), &tgt, None, &d.opts(), &NoProgress).unwrap();
        assert!(s.resumed && s.chunks_skipped == 1, "{s:?}");
        assert!(fs::read(&tgt).unwrap() == disk);
    }

    #[test]
    fn raw_images_plain_and_compressed() {
        let d = Dir::new("raw");
        let disk = testimg::disk(LEN);
        let plain = d.p("r.img");
        fs::write(&plain, &disk).unwrap();
        let zst = d.p("r.img.zst");
        fs::write(&zst, zstd::bulk::compress(&disk, 3).unwrap()).unwrap();
        let gz = d.p("r.img.gz");
        let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        std::io::Write::write_all(&mut enc, &disk).unwrap();
        fs::write(&gz, enc.finish().unwrap()).unwrap();
        let xz = d.p("r.img.xz");
        let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
        std::io::Write::write_all(&mut enc, &disk).unwrap();
        fs::write(&xz, enc.finish().unwrap()).unwrap();
        for src in [plain, zst, gz, xz] {
            let tgt = d.p("t.raw");
            fs::write(&tgt, vec![0x55u8; LEN]).unwrap();
            let s = deploy(
                &Location::File(src.clone()),
                &tgt,
                None,
                &d.opts(),
                &NoProgress,
            )
            .unwrap();
            assert!(s.raw);
            assert_eq!(fs::read(&tgt).unwrap(), disk, "{}", src.display());
        }
    }

    #[test]
    fn sniffing() {
        assert_eq!(sniff(&format::MAGIC), SourceFormat::Ours);
        assert_eq!(sniff(&[0x28, 0xB5, 0x2F, 0xFD, 0]), SourceFormat::Zstd);
        assert_eq!(sniff(&[0x1F, 0x8B]), SourceFormat::Gzip);
        assert_eq!(sniff(&[0xFD, b'7', b'z', b'X', b'Z', 0]), SourceFormat::Xz);
        assert_eq!(sniff(b"\xEB\x58\x90MSDOS"), SourceFormat::Raw);
        assert_eq!(sniff(b""), SourceFormat::Raw);
    }
}
