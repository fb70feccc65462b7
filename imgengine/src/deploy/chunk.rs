//! Verifying one chunk before a byte of it reaches a target: its header and its place in
//! the image must be the manifest's entry for its index (the manifest is covered by the
//! signature), its payload's CRC32 must match (the cheap check that catches damage in
//! transit), and it must decompress, within the length its header declares, to bytes whose
//! SHA-256 is the header's.
//!
//! The deploy pipeline does the manifest check on its reader thread and the rest on its
//! workers; a receiver that gets chunks in any order (multicast) calls [`verify_chunk`] on
//! each and hands the result to a [`super::ChunkSink`].

use crate::error::{Error, Result};
use crate::format::{self, ChunkHeader, ChunkRecord, Manifest, ManifestEntry};

/// A chunk whose checks passed, with its disk bytes (none for a zero chunk). Only the
/// functions of this module make one, so holding one means the checks were done.
#[derive(Debug)]
pub struct VerifiedChunk {
    header: ChunkHeader,
    data: Vec<u8>,
}

impl VerifiedChunk {
    /// The chunk's header: where its bytes go (`disk_offset`, `raw_len`) and its kind.
    pub fn header(&self) -> &ChunkHeader {
        &self.header
    }

    /// The decoded disk bytes (`raw_len` of them; empty for a zero chunk).
    pub fn data(&self) -> &[u8] {
        &self.data
    }
}

impl Drop for VerifiedChunk {
    /// Its buffer goes back to the pool for the next chunk (see `io::pool`).
    fn drop(&mut self) {
        crate::io::pool::give(std::mem::take(&mut self.data));
    }
}

/// The manifest check: the chunk found at `image_offset` with `header` must be exactly
/// the manifest's entry for its index (chunks swapped, replaced, moved or not in the image
/// at all are refused).
pub fn check_in_manifest(
    manifest: &Manifest,
    header: &ChunkHeader,
    image_offset: u64,
) -> Result<()> {
    let want = manifest.entries.get(header.index as usize);
    if want
        != Some(&ManifestEntry {
            header: *header,
            image_offset,
        })
    {
        return Err(Error::corrupt(format!(
            "{}: does not match the manifest (chunks swapped, replaced or moved)",
            header.describe()
        )));
    }
    Ok(())
}

/// The payload checks: CRC32 of the compressed bytes, decompression bounded by the
/// header's length, SHA-256 of the result. A zero chunk carries no payload and passes
/// with no bytes.
pub fn verify_payload(rec: ChunkRecord) -> Result<VerifiedChunk> {
    let header = rec.header;
    let data = format::decode_chunk(&header, rec.payload)?;
    Ok(VerifiedChunk { header, data })
}

/// Both checks, for one chunk received on its own.
pub fn verify_chunk(rec: ChunkRecord, manifest: &Manifest) -> Result<VerifiedChunk> {
    check_in_manifest(manifest, &rec.header, rec.image_offset)?;
    verify_payload(rec)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::ErrorKind;
    use crate::format::{testimg, ImageReader};

    fn records() -> (Vec<ChunkRecord>, Manifest) {
        let img = testimg::image(&testimg::disk(300_000), 64 << 10);
        let mut r = ImageReader::open(&img[..]).unwrap();
        let mut recs = Vec::new();
        while let Some(rec) = r.next_chunk().unwrap() {
            recs.push(rec);
        }
        let m = r.manifest().unwrap().0.clone();
        (recs, m)
    }

    #[test]
    fn good_chunks_pass_in_any_order() {
        let disk = testimg::disk(300_000);
        let (mut recs, m) = records();
        recs.reverse();
        for rec in recs {
            let v = verify_chunk(rec, &m).unwrap();
            let h = *v.header();
            if h.raw_len != 0 && !v.data().is_empty() {
                let at = h.disk_offset as usize;
                assert!(v.data() == &disk[at..at + h.raw_len as usize]);
            }
        }
    }

    #[test]
    fn each_check_refuses_what_it_should() {
        let (mut recs, m) = records();
        // Moved: the right chunk at another place in the image.
        let mut moved = ChunkRecord {
            header: recs[1].header,
            image_offset: recs[1].image_offset + 1,
            payload: recs[1].payload.clone(),
        };
        let e = verify_chunk(moved, &m).unwrap_err();
        assert!(e.to_string().contains("does not match the manifest"), "{e}");
        // Swapped: chunk 2's header at chunk 1's place.
        moved = ChunkRecord {
            header: recs[2].header,
            image_offset: recs[1].image_offset,
            payload: recs[2].payload.clone(),
        };
        assert!(verify_chunk(moved, &m).is_err());
        // A flipped payload byte: the CRC32.
        let mut bad = recs.remove(0);
        bad.payload[3] ^= 0x20;
        let e = verify_chunk(bad, &m).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("CRC32"), "{e}");
    }
}
