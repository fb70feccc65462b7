//! One chunk in, one chunk out: compression into an independent zstd frame with its CRC32
//! and SHA-256, and the reverse with the checks in the order the format promises (CRC of
//! the payload first, so transport damage is found before spending time in zstd; SHA-256 of
//! the result last, so nothing unverified reaches the target).

use sha2::{Digest, Sha256};

use super::layout::{ChunkHeader, ChunkKind, Compression};
use crate::error::{Error, ErrorKind, Result};

/// The user's compression level 0..9 as a zstd level (0 = stored, no zstd). The steps are
/// spread over zstd's useful range: 1-3 fast (deploy-bound networks), 4-6 balanced, 7-9
/// slow captures for images deployed many times. zstd 19 is the top of the non-"ultra"
/// range, whose window sizes would not matter for 4 MiB chunks anyway.
pub fn zstd_level(comp: u8) -> Result<i32> {
    Ok(match comp {
        0 => 0,
        1 => 1,
        2 => 2,
        3 => 3,
        4 => 5,
        5 => 7,
        6 => 9,
        7 => 12,
        8 => 15,
        9 => 19,
        other => {
            return Err(Error::invalid(format!(
                "compression level {other}: use 0 (none) to 9 (smallest)"
            )))
        }
    })
}

/// Compress `data` (disk bytes at `disk_offset`) into chunk `index`; `zstd_level` 0 stores.
/// Takes the buffer so a stored chunk's payload is the buffer itself, not a copy.
pub fn encode_chunk(
    index: u64,
    kind: ChunkKind,
    disk_offset: u64,
    data: Vec<u8>,
    zstd_level: i32,
) -> Result<(ChunkHeader, Vec<u8>)> {
    let sha256: [u8; 32] = Sha256::digest(&data).into();
    let raw_len = data.len() as u64;
    let (compression, payload) = if zstd_level == 0 {
        (Compression::Stored, data)
    } else {
        let p = zstd::bulk::compress(&data, zstd_level).map_err(|e| {
            Error::io(
                format!("compressing chunk {index} at disk offset {disk_offset}"),
                e,
            )
        })?;
        // Incompressible data (already compressed files, encrypted volumes) is stored: the
        // image is no larger, and the deploy skips zstd and a second buffer for it.
        if p.len() >= data.len() {
            (Compression::Stored, data)
        } else {
            (Compression::Zstd, p)
        }
    };
    let comp_len = u32::try_from(payload.len()).map_err(|_| {
        Error::invalid(format!(
            "chunk {index}: {raw_len} bytes is too large for one chunk"
        ))
    })?;
    let header = ChunkHeader {
        index,
        kind,
        compression,
        raw_len,
        disk_offset,
        comp_len,
        crc32: crc32fast::hash(&payload),
        sha256,
    };
    header.check_bounds()?;
    Ok((header, payload))
}

/// The header of a zero run: no payload, nothing to hash.
pub fn zero_chunk(index: u64, disk_offset: u64, len: u64) -> ChunkHeader {
    ChunkHeader {
        index,
        kind: ChunkKind::Zero,
        compression: Compression::Stored,
        raw_len: len,
        disk_offset,
        comp_len: 0,
        crc32: 0,
        sha256: [0; 32],
    }
}

thread_local! {
    /// One zstd decompression context per worker thread, kept across chunks (a fresh one
    /// per chunk is a large allocation, mapped and unmapped every time).
    static ZSTD: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
        const { std::cell::RefCell::new(None) };
}

/// Check and decode a chunk's payload: CRC32, then decompression bounded by `raw_len`,
/// then SHA-256. Returns the disk bytes (empty for Zero chunks).
pub fn decode_chunk(h: &ChunkHeader, payload: Vec<u8>) -> Result<Vec<u8>> {
    let what = h.describe();
    if payload.len() as u64 != u64::from(h.comp_len) {
        return Err(Error::new(
            ErrorKind::Truncated,
            format!(
                "{what}: payload is {} bytes, header says {}",
                payload.len(),
                h.comp_len
            ),
        ));
    }
    if h.kind == ChunkKind::Zero {
        return Ok(Vec::new());
    }
    if crc32fast::hash(&payload) != h.crc32 {
        return Err(Error::corrupt(format!(
            "{what}: CRC32 mismatch (damaged in transit or on disk); re-download the image"
        )));
    }
    let data = match h.compression {
        Compression::Stored => payload,
        Compression::Zstd => {
            // raw_len is bounded by MAX_CHUNK_RAW in check_bounds, so this capacity is too.
            // Into a reused buffer, with a reused context: see io::pool for why.
            let mut out = crate::io::pool::take(h.raw_len as usize);
            out.reserve_exact(h.raw_len as usize);
            let r = ZSTD.with(|d| {
                let mut d = d.borrow_mut();
                if d.is_none() {
                    *d = Some(zstd::bulk::Decompressor::new()?);
                }
                d.as_mut()
                    .expect("set above")
                    .decompress_to_buffer(&payload, &mut out)
            });
            crate::io::pool::give(payload);
            if let Err(e) = r {
                crate::io::pool::give(out);
                return Err(
                    Error::corrupt(format!("{what}: zstd frame does not decode")).with_source(e),
                );
            }
            out
        }
    };
    if data.len() as u64 != h.raw_len {
        return Err(Error::corrupt(format!(
            "{what}: decodes to {} bytes, header says {}",
            data.len(),
            h.raw_len
        )));
    }
    let sha: [u8; 32] = Sha256::digest(&data).into();
    if sha != h.sha256 {
        return Err(Error::corrupt(format!(
            "{what}: SHA-256 mismatch; the image is corrupt, re-create or re-download it"
        )));
    }
    Ok(data)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Vec<u8> {
        (0..100_000u32)
            .flat_map(|i| (i % 251).to_le_bytes())
            .collect()
    }

    #[test]
    fn round_trip_all_levels() {
        let data = sample();
        for comp in 0..=9 {
            let lvl = zstd_level(comp).unwrap();
            let (h, p) = encode_chunk(3, ChunkKind::Data, 4096, data.clone(), lvl).unwrap();
            assert_eq!(
                h.compression,
                if comp == 0 {
                    Compression::Stored
                } else {
                    Compression::Zstd
                }
            );
            assert_eq!(decode_chunk(&h, p).unwrap(), data);
        }
        assert!(zstd_level(10).is_err());
    }

    #[test]
    fn crc_then_sha_are_checked() {
        let data = sample();
        let (h, p) = encode_chunk(3, ChunkKind::Data, 4096, data.clone(), 3).unwrap();
        let mut bad = p.clone();
        bad[10] ^= 0x40;
        let e = decode_chunk(&h, bad).unwrap_err();
        assert!(
            e.to_string().contains("CRC32")
                && e.to_string().contains("chunk 3 at disk offset 4096"),
            "{e}"
        );
        // A payload that matches its CRC but not the content hash (forged or mixed-up chunk).
        let (other, op) = encode_chunk(3, ChunkKind::Data, 4096, data[..1000].to_vec(), 3).unwrap();
        let mut h2 = other;
        h2.sha256 = h.sha256;
        let e = decode_chunk(&h2, op).unwrap_err();
        assert!(e.to_string().contains("SHA-256"), "{e}");
        let e = decode_chunk(&h, p[..5].to_vec()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated);
    }

    #[test]
    fn incompressible_data_is_stored() {
        let mut x = 1u32;
        let data: Vec<u8> = (0..100_000)
            .map(|_| {
                x = x.wrapping_mul(1_103_515_245).wrapping_add(12_345);
                (x >> 24) as u8
            })
            .collect();
        let (h, p) = encode_chunk(0, ChunkKind::Data, 0, data.clone(), 19).unwrap();
        assert_eq!(h.compression, Compression::Stored);
        assert_eq!(decode_chunk(&h, p).unwrap(), data);
    }

    #[test]
    fn reused_buffers_never_widen_the_bound_or_leak_old_bytes() {
        // A 1 MiB chunk decoded into a buffer from the pool (io::pool), then a chunk whose
        // frame decodes to more than its header says, into what may be that buffer again:
        // refused, although the buffer would hold it.
        let big: Vec<u8> = (0..(1u32 << 20)).map(|i| (i % 7) as u8).collect();
        let (h, p) = encode_chunk(1, ChunkKind::Data, 0, big.clone(), 3).unwrap();
        crate::io::pool::give(decode_chunk(&h, p).unwrap());
        let data = sample();
        let (mut h, p) = encode_chunk(2, ChunkKind::Data, 0, data.clone(), 3).unwrap();
        let honest = h;
        h.raw_len = 1000;
        let e = decode_chunk(&h, p.clone()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
        // Decoded into a reused buffer: exactly its own bytes, nothing of the one before.
        for _ in 0..3 {
            let out = decode_chunk(&honest, p.clone()).unwrap();
            assert!(out == data);
            crate::io::pool::give(out);
        }
    }

    #[test]
    fn zero_chunk_has_no_payload() {
        let h = zero_chunk(1, 0, 1 << 30);
        h.check_bounds().unwrap();
        assert!(decode_chunk(&h, Vec::new()).unwrap().is_empty());
    }
}
