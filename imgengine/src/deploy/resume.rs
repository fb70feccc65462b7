//! Resume: with the manifest known up front (sealed, or a streaming image on a source that
//! can read ranges), the target's chunk regions are hashed in parallel and only the chunks
//! that differ are fetched, neighbours coalesced into one range request. Whether to look
//! at all is decided from the journal ([`super::journal`]) and the user's choice: a
//! matching journal checks every chunk, no journal probes the first few, so a re-run of a
//! finished deploy fetches nothing and a target holding something else costs a few reads.

use std::io::{BufReader, Read};
use std::path::Path;

use sha2::{Digest, Sha256};

use crate::error::Result;
use crate::format::{
    reader::{read_expected_header, read_payload},
    ChunkHeader, ChunkKind, ChunkRecord, Manifest, ManifestEntry,
};
use crate::io::ordered::{pipeline_depth, run_ordered, run_weighted, Item};
use crate::io::{Progress, BUFFER_SIZE};
use crate::source::{Location, Source};
use crate::target::Target;

use super::chunk::verify_payload;
use super::journal::Journal;
use super::sequence::decode;
use super::sink::ChunkSink;
use super::stream::{stream_chunk, weight, Emit, PIPELINE_BYTES, STREAM_OVER};
use super::ResumeMode;

/// How much of the target to compare with the manifest before deploying.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum IntactCheck {
    /// Write everything.
    None,
    /// Every data chunk (a matching journal says this target was being deployed).
    All,
    /// The first chunks, and all of them only if some of those are intact: a target that
    /// holds something else costs a few chunk reads, a re-run of a finished deploy skips
    /// everything.
    Probe,
}

/// How much of the target to check, from the user's choice, the journal (`journal`: the
/// one this deploy would write; `None` when the manifest is not known up front) and
/// whether the source can be read at an offset. Why a resume cannot happen goes to `notes`.
pub(super) fn decide(
    mode: ResumeMode,
    src: &Location,
    ranges: bool,
    journal: Option<&Journal>,
    journal_path: &Path,
    notes: &mut Vec<String>,
) -> IntactCheck {
    let check = match (mode, journal) {
        (ResumeMode::Never, _) => IntactCheck::None,
        (_, None) => {
            if mode == ResumeMode::Always || Journal::load(journal_path).is_some() {
                notes.push(format!("{src} is a stream without a manifest up front: cannot resume, deploying everything"));
            }
            IntactCheck::None
        }
        (ResumeMode::Always, Some(_)) => IntactCheck::All,
        (ResumeMode::Auto, Some(j)) if Journal::load(journal_path).as_ref() == Some(j) => {
            IntactCheck::All
        }
        (ResumeMode::Auto, Some(_)) => IntactCheck::Probe,
    };
    if check != IntactCheck::None && !ranges {
        if check == IntactCheck::All {
            notes.push(format!(
                "{src} cannot be read at an offset (a pipe): cannot resume, deploying everything"
            ));
        }
        return IntactCheck::None;
    }
    check
}

/// Per manifest entry, whether the target already holds it; `None`: deploy everything.
pub(super) fn intact(
    t: &Target,
    manifest: Option<&Manifest>,
    check: IntactCheck,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Option<Vec<bool>>> {
    match (manifest, check) {
        (Some(m), IntactCheck::All) => Ok(Some(intact_chunks(t, &m.entries, threads, progress)?)),
        (Some(m), IntactCheck::Probe) => probe_intact(t, m, threads, progress),
        _ => Ok(None),
    }
}

/// Data chunks hashed before `IntactCheck::Probe` decides: at most this many, and no more
/// than [`PROBE_BYTES`] of the target (at least one chunk). A small disk would otherwise be
/// read whole before the first byte is written, and a slow flash takes seconds for 64 MiB
/// (while a multicast session already runs).
const PROBE_CHUNKS: usize = 16;
const PROBE_BYTES: u64 = 16 << 20;
/// Target bytes hashed per read.
const HASH_PIECE: u64 = 1 << 20;

fn probe_intact(
    t: &Target,
    m: &Manifest,
    threads: usize,
    progress: &dyn Progress,
) -> Result<Option<Vec<bool>>> {
    let (mut chunks, mut bytes) = (0, 0u64);
    let cut = m
        .entries
        .iter()
        .position(|e| {
            if e.header.kind != ChunkKind::Data {
                return false;
            }
            if chunks >= PROBE_CHUNKS || (chunks > 0 && bytes >= PROBE_BYTES) {
                return true;
            }
            chunks += 1;
            bytes += e.header.raw_len;
            false
        })
        .unwrap_or(m.entries.len());
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
            // A reused buffer (see io::pool): one per chunk would be mapped and faulted in anew.
            let want = h.raw_len.min(HASH_PIECE) as usize;
            let mut buf = crate::io::pool::take(want);
            buf.resize(want, 0);
            let mut sha = Sha256::new();
            let mut off = 0;
            while off < h.raw_len {
                let n = (h.raw_len - off).min(HASH_PIECE) as usize;
                t.read_at(&mut buf[..n], h.disk_offset + off)?;
                sha.update(&buf[..n]);
                off += n as u64;
            }
            crate::io::pool::give(buf);
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
pub(super) fn fetch_missing(
    src: &Source,
    manifest: &Manifest,
    intact: &[bool],
    threads: usize,
    sink: &mut ChunkSink<'_>,
) -> Result<()> {
    let groups = missing_runs(manifest, intact, sink)?;
    run_weighted(
        threads,
        pipeline_depth(threads),
        PIPELINE_BYTES,
        |emit| {
            for run in &groups {
                if !fetch_run(src, run, emit) {
                    break;
                }
            }
            Ok(())
        },
        decode,
        |out| sink.take(out),
    )
}

/// The data and table chunks to fetch, as runs of consecutive chunks. Intact chunks are
/// counted as skipped and zero chunks, which need no fetching, written here.
fn missing_runs(
    manifest: &Manifest,
    intact: &[bool],
    sink: &mut ChunkSink<'_>,
) -> Result<Vec<Vec<ManifestEntry>>> {
    let mut runs: Vec<Vec<ManifestEntry>> = Vec::new();
    for (e, &ok) in manifest.entries.iter().zip(intact) {
        if ok {
            sink.skip_intact();
            continue;
        }
        if e.header.kind == ChunkKind::Zero {
            sink.put(verify_payload(ChunkRecord {
                header: e.header,
                image_offset: e.image_offset,
                payload: Vec::new(),
            })?)?;
            continue;
        }
        match runs.last_mut() {
            Some(run)
                if run
                    .last()
                    .is_some_and(|l| l.header.index + 1 == e.header.index) =>
            {
                run.push(*e)
            }
            _ => runs.push(vec![*e]),
        }
    }
    Ok(runs)
}

/// Read one run of chunks with one range request, each header checked against its
/// manifest entry, and hand them to the pipeline (large ones streamed in pieces). Returns
/// false when the pipeline stopped or an error was handed on in place of a chunk.
fn fetch_run(src: &Source, run: &[ManifestEntry], emit: &mut Emit<'_>) -> bool {
    let (first, last) = (run[0], run[run.len() - 1]);
    let len = last.image_offset + last.record_len() - first.image_offset;
    let stream = match src.read_range(first.image_offset, len) {
        Ok(s) => s,
        Err(e) => {
            emit(Item::Ready(Err(e)), 0);
            return false;
        }
    };
    let mut r = BufReader::with_capacity(BUFFER_SIZE, stream);
    for e in run {
        let h = match read_expected_header(&mut r, e) {
            Ok(h) => h,
            Err(err) => {
                emit(Item::Ready(Err(err)), 0);
                return false;
            }
        };
        let comp_len = u64::from(h.comp_len);
        if h.raw_len > STREAM_OVER {
            if !stream_chunk(h, &mut (&mut r).take(comp_len), emit) {
                return false;
            }
            continue;
        }
        let item = match read_payload(&mut r, comp_len, || format!("{}: payload", h.describe())) {
            Ok(payload) => Item::Job(ChunkRecord {
                header: h,
                image_offset: e.image_offset,
                payload,
            }),
            Err(err) => {
                emit(Item::Ready(Err(err)), 0);
                return false;
            }
        };
        if !emit(item, weight(&h)) {
            return false;
        }
    }
    true
}
