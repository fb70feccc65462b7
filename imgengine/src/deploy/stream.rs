//! Memory that does not grow with the chunk size. Chunks of up to [`STREAM_OVER`] disk
//! bytes travel whole through the pipeline (payload and decoded bytes, checked before any
//! of it is written); the pipeline holds at most [`PIPELINE_BYTES`] of them. A larger chunk
//! (up to 64 MiB) is streamed by the reader thread in 1 MiB pieces: its payload's CRC32 and
//! its content's SHA-256 are computed as the pieces go to the target, and the chunk counts
//! as written only when both match at its end; on a mismatch (or any error part-way) the
//! deploy zeroes the chunk's region before it reports the error, so unverified bytes do
//! not stay on the target. Everything before the chunk is verified as before, and nothing
//! after it is written.

use std::io::{self, BufReader, Read};

use sha2::{Digest, Sha256};

use crate::error::{Error, ErrorKind, Result};
use crate::format::{ChunkHeader, ChunkKind, ChunkRecord, Compression};
use crate::io::ordered::Item;

use super::chunk::VerifiedChunk;

/// Chunks with more disk bytes than this are streamed in pieces.
pub(super) const STREAM_OVER: u64 = 8 << 20;
/// Bytes of chunks (payload plus decoded content) in flight in a deploy pipeline.
pub(super) const PIPELINE_BYTES: u64 = 32 << 20;
/// Decoded bytes per piece of a streamed chunk.
const PIECE: usize = 1 << 20;
/// zstd window accepted for a streamed chunk: 8 MiB is what level 19 (our highest) uses;
/// a frame asking for more is refused instead of allocating it.
const MAX_WINDOW_LOG: u32 = 23;

/// What the deploy pipeline delivers to the writer, in image order.
pub(super) enum Out {
    /// A chunk checked whole.
    Whole(VerifiedChunk),
    /// Part of a streamed chunk: `data` goes at `offset` bytes into its extent.
    Piece {
        header: ChunkHeader,
        offset: u64,
        data: Vec<u8>,
    },
    /// A streamed chunk whose checksums matched at its end.
    End(ChunkHeader),
}

/// Memory a whole chunk takes in the pipeline until it is written.
pub(super) fn weight(h: &ChunkHeader) -> u64 {
    u64::from(h.comp_len)
        + if h.kind == ChunkKind::Zero {
            0
        } else {
            h.raw_len
        }
}

/// The emitter of a weighted pipeline.
pub(super) type Emit<'a> = dyn FnMut(Item<ChunkRecord, Out>, u64) -> bool + 'a;

/// Stream the chunk `h` from `payload` (exactly its `comp_len` bytes) as pieces, then its
/// `End`, or an error in their place. Returns false when the pipeline stopped (the
/// producer should return).
pub(super) fn stream_chunk(h: ChunkHeader, payload: &mut dyn Read, emit: &mut Emit<'_>) -> bool {
    match pieces(h, payload, emit) {
        Ok(true) => emit(Item::Ready(Ok(Out::End(h))), 0),
        Ok(false) => false,
        Err(e) => {
            emit(Item::Ready(Err(e)), 0);
            false
        }
    }
}

/// Reads through, counting and CRC-ing every byte.
struct Crc<'a> {
    r: &'a mut dyn Read,
    crc: crc32fast::Hasher,
    n: u64,
}

impl Read for Crc<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.r.read(buf)?;
        self.crc.update(&buf[..n]);
        self.n += n as u64;
        Ok(n)
    }
}

/// Fill `buf` as far as the reader goes; returns the bytes read.
fn fill(r: &mut impl Read, buf: &mut [u8]) -> io::Result<usize> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(got)
}

fn pieces(h: ChunkHeader, payload: &mut dyn Read, emit: &mut Emit<'_>) -> Result<bool> {
    let what = h.describe();
    if h.kind != ChunkKind::Data {
        return Err(Error::corrupt(format!(
            "{what}: a partition-table chunk of {} bytes (tables are a few sectors)",
            h.raw_len
        )));
    }
    let comp_len = u64::from(h.comp_len);
    let mut src = Crc {
        r: payload,
        crc: crc32fast::Hasher::new(),
        n: 0,
    };
    let mut sha = Sha256::new();
    let mut off = 0u64;
    let decoded: Result<bool> = (|| {
        let mut dec: Box<dyn Read + '_> = match h.compression {
            Compression::Stored => Box::new(&mut src),
            Compression::Zstd => {
                let mut d = zstd::stream::read::Decoder::with_buffer(BufReader::with_capacity(
                    128 << 10,
                    &mut src,
                ))
                .map_err(|e| Error::corrupt(format!("{what}: zstd")).with_source(e))?
                .single_frame();
                d.window_log_max(MAX_WINDOW_LOG)
                    .map_err(|e| Error::corrupt(format!("{what}: zstd")).with_source(e))?;
                Box::new(d)
            }
        };
        // One byte more than the chunk holds is asked for, to notice a longer frame.
        let mut dec = dec.by_ref().take(h.raw_len + 1);
        loop {
            let mut buf = vec![0u8; PIECE];
            let n = fill(&mut dec, &mut buf).map_err(|e| {
                Error::corrupt(format!("{what}: zstd frame does not decode")).with_source(e)
            })?;
            if n == 0 {
                return Ok(true);
            }
            if off + n as u64 > h.raw_len {
                return Err(Error::corrupt(format!(
                    "{what}: decodes to more than {} bytes",
                    h.raw_len
                )));
            }
            buf.truncate(n);
            sha.update(&buf);
            let item = Out::Piece {
                header: h,
                offset: off,
                data: buf,
            };
            off += n as u64;
            if !emit(Item::Ready(Ok(item)), n as u64) {
                return Ok(false);
            }
        }
    })();
    // Whatever the decoder left (bytes after the frame, or all of it after an error) is
    // read, so the CRC covers the whole payload and a short payload shows as truncated.
    let rest = io::copy(&mut src, &mut io::sink());
    if src.n < comp_len || rest.is_err() {
        return Err(Error::new(
            ErrorKind::Truncated,
            format!("{what}: image ends within a {comp_len}-byte payload"),
        ));
    }
    if !decoded? {
        return Ok(false);
    }
    if src.crc.finalize() != h.crc32 {
        return Err(Error::corrupt(format!(
            "{what}: CRC32 mismatch (damaged in transit or on disk); re-download the image"
        )));
    }
    if off != h.raw_len {
        return Err(Error::corrupt(format!(
            "{what}: decodes to {off} bytes, header says {}",
            h.raw_len
        )));
    }
    if <[u8; 32]>::from(sha.finalize()) != h.sha256 {
        return Err(Error::corrupt(format!(
            "{what}: SHA-256 mismatch; the image is corrupt, re-create or re-download it"
        )));
    }
    Ok(true)
}
