//! Step 3 when the chunks come from a receiver in any order (a multicast session): the
//! receiver is told which chunks the target lacks, then hands over chunk records as they
//! arrive. Each is checked against the manifest (its header and its place in the image)
//! on the feeding thread, its payload on the workers, as in [`super::sequence`]; the sink
//! writes each at its own disk offset and holds the tables back, so the order does not
//! matter. A chunk the deploy did not ask for, one given twice, or a feed that ends with
//! chunks still missing stops the deploy with an error.

use crate::error::{Error, ErrorKind, Result};
use crate::format::{ChunkKind, ChunkRecord, Manifest};
use crate::io::ordered::{pipeline_depth, run_weighted, Item};

use super::chunk::{check_in_manifest, verify_payload};
use super::sequence::decode;
use super::sink::ChunkSink;
use super::stream::{stream_chunk, weight, PIPELINE_BYTES, STREAM_OVER};

/// Where the chunks of a fed deploy come from.
pub trait ChunkFeed: Send {
    /// Called once, before the first [`ChunkFeed::next`]: per manifest entry, whether the
    /// deploy needs its record (false: intact on the target already, or a zero chunk,
    /// which needs no bytes).
    fn start(&mut self, wanted: &[bool]) -> Result<()>;
    /// A wanted chunk record not given before, in any order; `Ok(None)`: the feed has
    /// nothing more to give (the deploy then fails, naming what is missing).
    fn next(&mut self) -> Result<Option<ChunkRecord>>;
}

/// Take the chunks the target lacks (`intact`: `None` when nothing was checked) from
/// `feed` and write them through `sink`.
pub(super) fn deploy_fed(
    feed: &mut dyn ChunkFeed,
    manifest: &Manifest,
    intact: Option<&[bool]>,
    threads: usize,
    sink: &mut ChunkSink<'_>,
) -> Result<()> {
    let mut wanted = Vec::with_capacity(manifest.entries.len());
    for (i, e) in manifest.entries.iter().enumerate() {
        if intact.is_some_and(|v| v.get(i) == Some(&true)) {
            sink.skip_intact();
            wanted.push(false);
        } else if e.header.kind == ChunkKind::Zero {
            sink.put(verify_payload(ChunkRecord {
                header: e.header,
                image_offset: e.image_offset,
                payload: Vec::new(),
            })?)?;
            wanted.push(false);
        } else {
            wanted.push(true);
        }
    }
    let mut remaining = wanted.iter().filter(|&&w| w).count();
    feed.start(&wanted)?;
    run_weighted(
        threads,
        pipeline_depth(threads),
        PIPELINE_BYTES,
        |emit| {
            while remaining > 0 {
                let rec = match feed.next() {
                    Ok(Some(rec)) => rec,
                    Ok(None) => {
                        let first = wanted.iter().position(|&w| w).unwrap_or(0);
                        emit(
                            Item::Ready(Err(Error::new(
                                ErrorKind::Truncated,
                                format!(
                                    "the chunks ended with {remaining} still missing (chunk {first} is one)"
                                ),
                            ))),
                            0,
                        );
                        return Ok(());
                    }
                    Err(e) => {
                        emit(Item::Ready(Err(e)), 0);
                        return Ok(());
                    }
                };
                if let Err(e) = check_in_manifest(manifest, &rec.header, rec.image_offset) {
                    emit(Item::Ready(Err(e)), 0);
                    return Ok(());
                }
                let i = rec.header.index as usize;
                if !std::mem::replace(&mut wanted[i], false) {
                    emit(
                        Item::Ready(Err(Error::invalid(format!(
                            "{}: given twice, or not asked for",
                            rec.header.describe()
                        )))),
                        0,
                    );
                    return Ok(());
                }
                remaining -= 1;
                if rec.header.raw_len > STREAM_OVER {
                    let h = rec.header;
                    if !stream_chunk(h, &mut &rec.payload[..], emit) {
                        return Ok(());
                    }
                    continue;
                }
                let w = weight(&rec.header);
                if !emit(Item::Job(rec), w) {
                    return Ok(());
                }
            }
            Ok(())
        },
        decode,
        |out| sink.take(out),
    )
}
