//! Deploy: an image from a file, a pipe or an HTTP(S) URL onto a disk or a partition,
//! verified before written, and `verify`, the same pipeline without a target.
//!
//! The order of events is the safety argument, one file per step:
//! 1. [`head`]: the source is opened once and its first bytes read once; the preamble
//!    (and, sealed, the manifest and signature) is read and, when the agent has trusted
//!    keys, the signature is checked: nothing has been opened for writing yet;
//! 2. [`target`](self::target): the target is opened and checked against the image (size,
//!    whole disk or partition) and every chunk extent against both ([`plan`]); a resume
//!    journal is written ([`journal`]), and for a whole disk the partition-table regions
//!    are zeroed, so a deploy that dies from here on leaves a disk that does not look valid;
//! 3. chunks stream through ([`sequence`]): a reader thread parses records and checks each
//!    header against the manifest, workers check CRC32, decompress and check SHA-256
//!    ([`chunk`]; chunks over 8 MiB go through in pieces, [`stream`]), and the caller's
//!    thread writes them in image order ([`sink`]); the first bad chunk stops everything,
//!    so the target is never written past it. On a resume ([`resume`]) only the chunks
//!    the target lacks are fetched, by range requests;
//! 4. the table chunks, held back, are written last, the target synced, the journal
//!    removed; a GPT image on a larger disk then has its backup moved to the disk's end.
//!
//! Raw images (.img, .img.zst, .img.gz, .img.xz) are recognised by their first bytes and
//! written with holes for zero blocks ([`raw`]).
//!
//! A receiver that gets chunks another way, in any order (multicast), deploys with
//! [`OpenedImage::deploy_fed`]: steps 1, 2 and 4 as above, and in step 3 the chunks the
//! target lacks come from its [`ChunkFeed`] as they arrive ([`fed`]). [`ChunkSink`] and
//! [`verify_chunk`] are public for the same use.

use std::path::{Path, PathBuf};

use crate::capture::worker_threads;
use crate::error::{Error, ErrorKind, Result};
use crate::format::{ImageInfo, Layout, Manifest};
use crate::io::Progress;
use crate::sign::VerifyingKey;
use crate::source::{HttpConfig, Location, Source};

mod chunk;
mod fed;
mod head;
mod journal;
mod plan;
mod raw;
mod resume;
mod sequence;
mod sink;
mod stream;
mod target;
#[cfg(test)]
mod tests;

pub use chunk::{check_in_manifest, verify_chunk, verify_payload, VerifiedChunk};
pub use fed::ChunkFeed;
pub use head::OpenedImage;
pub use sink::ChunkSink;

use head::{Content, Head};
use journal::Journal;

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

/// Deploy the image at `src` onto `target` (a block device or a disk-image file), or onto
/// its partition `part` (number, GPT name or FS label) for a partition image.
pub fn deploy(
    src: &Location,
    target: &Path,
    part: Option<&str>,
    opts: &DeployOptions,
    progress: &dyn Progress,
) -> Result<DeploySummary> {
    OpenedImage::open(src, &opts.http)?.deploy(target, part, opts, progress)
}

impl OpenedImage {
    /// Deploy what [`OpenedImage::open`] found onto `target` (or its partition `part`), as
    /// [`deploy`] does, without opening the source or reading its head again.
    pub fn deploy(
        self,
        target: &Path,
        part: Option<&str>,
        opts: &DeployOptions,
        progress: &dyn Progress,
    ) -> Result<DeploySummary> {
        match self.content {
            Content::Raw(image) => {
                raw::deploy_raw(image, &self.source, target, part, opts, progress)
            }
            Content::Image(head) => {
                deploy_image(self.source, head, target, part, opts, progress, None)
            }
        }
    }

    /// Deploy an image in our format whose manifest was read up front, as
    /// [`OpenedImage::deploy`] does, except that the chunks the target lacks come from
    /// `feed`, in any order, instead of from the source.
    pub fn deploy_fed(
        self,
        target: &Path,
        part: Option<&str>,
        opts: &DeployOptions,
        progress: &dyn Progress,
        feed: &mut dyn ChunkFeed,
    ) -> Result<DeploySummary> {
        let loc = self.source.location().clone();
        match self.content {
            Content::Image(head) if head.manifest_known => {
                deploy_image(self.source, head, target, part, opts, progress, Some(feed))
            }
            _ => Err(Error::new(
                ErrorKind::Unsupported,
                format!("{loc}: only an image in our format with its manifest up front can be deployed from chunks in any order"),
            )),
        }
    }
}

/// Steps 1 (trust) to 4 for an image in our format whose head was read.
fn deploy_image(
    mut source: Source,
    opened: Head,
    target: &Path,
    part: Option<&str>,
    opts: &DeployOptions,
    progress: &dyn Progress,
    feed: Option<&mut dyn ChunkFeed>,
) -> Result<DeploySummary> {
    let Head {
        head,
        manifest_known,
        reader,
    } = opened;
    let src = source.location().clone();
    let threads = worker_threads(opts.threads);
    let ranges = source.supports_ranges() && source.len().is_some();
    let mut notes = Vec::new();

    // Step 1: is it trusted? Nothing is opened for writing before this.
    head::check_trust(&head, &opts.trusted_keys)?;
    // The manifest is known up front unless this is a streaming image on a pipe.
    let manifest = manifest_known.then_some(&head.manifest);

    // Step 2: the target, and every chunk extent checked against it and against the
    // image's table regions before anything is written or invalidated.
    let t = target::open_target(target, part, &head.meta, opts.partition_onto_disk)?;
    let extent_check = target::check_extents(&head.meta, t.len(), manifest)?;
    let journal_path = Journal::path(&opts.state_dir, target, part);
    let journal = manifest.map(|m| Journal::new(m, target, part, t.len()));
    let check = resume::decide(
        opts.resume,
        &src,
        ranges,
        journal.as_ref(),
        &journal_path,
        &mut notes,
    );
    if let Some(j) = &journal {
        j.store(&journal_path)?;
    }
    target::invalidate_tables(&t, &head.meta.content)?;

    // Step 3: the chunks: only the missing ones by range requests, or all in sequence.
    let total = manifest.map(|m| m.entries.iter().map(|e| e.header.raw_len).sum());
    let mut sink = ChunkSink::new(&t, progress).checking_each(extent_check);
    let intact = resume::intact(&t, manifest, check, threads, progress)?;
    let result = match (manifest, intact, feed) {
        (Some(m), intact, Some(feed)) => {
            drop(reader);
            progress.begin("deploying", total);
            sink.summary.resumed = intact.is_some();
            fed::deploy_fed(feed, m, intact.as_deref(), threads, &mut sink)
        }
        (_, _, Some(_)) => Err(Error::invalid(
            "chunks in any order need the manifest up front",
        )),
        (Some(m), Some(intact), None) => {
            drop(reader);
            progress.begin("deploying", total);
            sink.summary.resumed = true;
            resume::fetch_missing(&source, m, &intact, threads, &mut sink)
        }
        (_, _, None) => {
            let mut reader = match reader {
                Some(r) => r,
                None => head::reopen(&mut source, &head)?,
            };
            progress.begin("deploying", total);
            sequence::stream_chunks(&mut reader, manifest, threads, Some(&mut sink), progress)
        }
    };
    if let Err(e) = result {
        sink.scrub();
        return Err(e);
    }

    // Step 4: tables last, sync, fix-ups, forget the journal.
    let mut summary = sink.finish()?;
    notes.extend(target::fix_up(target, part, &t, &head.meta.content)?);
    progress.end();
    if journal.is_some() {
        Journal::remove(&journal_path);
    }
    summary.bytes_fetched = source.bytes_fetched();
    summary.notes = notes;
    Ok(summary)
}

/// Read the whole image, check every chunk, the manifest and the signature (against
/// `opts.trusted_keys` when there are any), write nothing; returns what `img info` shows.
pub fn verify(src: &Location, opts: &DeployOptions, progress: &dyn Progress) -> Result<ImageInfo> {
    let opened = OpenedImage::from_source(Source::open(src, &opts.http)?, false)?;
    let Content::Image(opened) = opened.content else {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{src} is a raw disk image: it has no checksums to verify"),
        ));
    };
    let Head { head, reader, .. } = opened;
    // Opened without ranges: the head came from the stream, which goes on with the chunks.
    let Some(mut reader) = reader else {
        return Err(Error::invalid(format!(
            "{src}: the image was not read front to back"
        )));
    };
    let signed_by = head::check_trust(&head, &opts.trusted_keys)?;
    let expected: Option<Manifest> = reader.sealed.as_ref().map(|s| s.manifest.clone());
    progress.begin(
        "verifying",
        expected
            .as_ref()
            .map(|m| m.entries.iter().map(|e| e.header.raw_len).sum()),
    );
    sequence::stream_chunks(
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
