//! Step 3 when the image is read front to back: a reader thread parses the chunk records
//! and checks each header against the manifest when it is known, workers check CRC32,
//! decompress and check SHA-256 ([`super::chunk`]), and the caller's thread hands the
//! chunks, in image order, to the sink; the first bad chunk stops everything, so the
//! target is never written past it. `verify` runs the same pipeline without a sink.

use std::io::Read;

use crate::error::{Error, Result};
use crate::format::{ChunkRecord, ImageReader, Manifest};
use crate::io::ordered::{pipeline_depth, run_weighted, Item};
use crate::io::Progress;

use super::chunk::{check_in_manifest, verify_payload};
use super::sink::ChunkSink;
use super::stream::{stream_chunk, weight, Out, PIPELINE_BYTES, STREAM_OVER};

/// The work of a pipeline worker: a whole chunk's payload checks.
pub(super) fn decode(rec: ChunkRecord) -> Result<Out> {
    verify_payload(rec).map(Out::Whole)
}

/// Stream every chunk of `reader` through verification into `sink` (`None`: verify only).
/// `expected`: the manifest known before the chunks (sealed, or read from the end).
pub(super) fn stream_chunks<R: Read + Send>(
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
                            if let Err(e) = check_in_manifest(m, &rec.header, rec.image_offset) {
                                emit(Item::Ready(Err(e)), 0);
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
                    Out::Whole(v) => progress.advance(v.header().raw_len),
                    Out::Piece { data, .. } => progress.advance(data.len() as u64),
                    Out::End(_) => {}
                }
                Ok(())
            }
        },
    )
}
