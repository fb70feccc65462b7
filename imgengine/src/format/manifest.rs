//! The manifest: one entry per chunk, in image order, with everything needed to check a
//! chunk without trusting its inline header (its disk offset, its place in the image, its
//! lengths, CRC32 and SHA-256). A sealed image carries it up front, signed, so a deploy can
//! refuse a bad image before writing anything and can fetch any chunk by HTTP Range.

use sha2::{Digest, Sha256};

use super::layout::{ChunkHeader, ChunkKind, Compression, CHUNK_HEADER_LEN, MANIFEST_MAGIC};
use crate::error::{Error, Result};

pub const MANIFEST_HEADER_LEN: usize = 16;
pub const MANIFEST_ENTRY_LEN: usize = 76;
/// One million chunks: 4 TiB of used data at the default chunk size, 76 MiB of manifest.
pub const MAX_MANIFEST_ENTRIES: u64 = 1 << 20;

/// One chunk as the manifest describes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ManifestEntry {
    pub header: ChunkHeader,
    /// Offset of the chunk's inline header in the image file.
    pub image_offset: u64,
}

impl ManifestEntry {
    /// Bytes of the chunk record in the image (inline header + payload).
    pub fn record_len(&self) -> u64 {
        CHUNK_HEADER_LEN as u64 + u64::from(self.header.comp_len)
    }

    fn encode_into(&self, v: &mut Vec<u8>) {
        let h = &self.header;
        v.extend_from_slice(&h.index.to_le_bytes());
        v.push(h.kind.code());
        v.push(h.compression.code());
        v.extend_from_slice(&[0, 0]);
        v.extend_from_slice(&h.raw_len.to_le_bytes());
        v.extend_from_slice(&h.disk_offset.to_le_bytes());
        v.extend_from_slice(&self.image_offset.to_le_bytes());
        v.extend_from_slice(&h.comp_len.to_le_bytes());
        v.extend_from_slice(&h.crc32.to_le_bytes());
        v.extend_from_slice(&h.sha256);
    }

    fn decode(b: &[u8]) -> Result<ManifestEntry> {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let index = u64_at(0);
        let disk_offset = u64_at(20);
        let what = format!("manifest entry for chunk {index} at disk offset {disk_offset}");
        let kind = ChunkKind::from_code(b[8])
            .ok_or_else(|| Error::corrupt(format!("{what}: unknown chunk kind {}", b[8])))?;
        let compression = Compression::from_code(b[9])
            .ok_or_else(|| Error::corrupt(format!("{what}: unknown compression {}", b[9])))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[44..76]);
        let header = ChunkHeader {
            index,
            kind,
            compression,
            raw_len: u64_at(12),
            disk_offset,
            comp_len: u32_at(36),
            crc32: u32_at(40),
            sha256,
        };
        header.check_bounds()?;
        Ok(ManifestEntry {
            header,
            image_offset: u64_at(28),
        })
    }
}

/// The list of chunks of one image.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Manifest {
    pub entries: Vec<ManifestEntry>,
}

impl Manifest {
    /// Encoded size of a manifest with `count` entries.
    pub fn encoded_len(count: u64) -> Option<u64> {
        count
            .checked_mul(MANIFEST_ENTRY_LEN as u64)?
            .checked_add(MANIFEST_HEADER_LEN as u64 + 4)
    }

    /// Magic, reserved word, entry count, entries, CRC32 of all the preceding bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut v =
            Vec::with_capacity(MANIFEST_HEADER_LEN + self.entries.len() * MANIFEST_ENTRY_LEN + 4);
        v.extend_from_slice(&MANIFEST_MAGIC);
        v.extend_from_slice(&[0u8; 4]);
        v.extend_from_slice(&(self.entries.len() as u64).to_le_bytes());
        for e in &self.entries {
            e.encode_into(&mut v);
        }
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// The entry count from the first 16 bytes, bounded: used to know how much to read.
    pub fn decode_count(head: &[u8; MANIFEST_HEADER_LEN]) -> Result<u64> {
        if head[0..4] != MANIFEST_MAGIC {
            return Err(Error::corrupt("manifest: bad magic"));
        }
        let count = u64::from_le_bytes(head[8..16].try_into().expect("8 bytes"));
        if count > MAX_MANIFEST_ENTRIES {
            return Err(Error::corrupt(format!(
                "manifest: {count} chunks exceeds the limit of {MAX_MANIFEST_ENTRIES}"
            )));
        }
        Ok(count)
    }

    /// Decode and check a whole manifest block: CRC, entry order (index = position),
    /// records back to back in the image without overlap, disk ranges without overflow.
    pub fn decode(b: &[u8]) -> Result<Manifest> {
        let head: &[u8; MANIFEST_HEADER_LEN] = b
            .get(..MANIFEST_HEADER_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::corrupt("manifest: shorter than its header"))?;
        let count = Self::decode_count(head)?;
        let len =
            Self::encoded_len(count).ok_or_else(|| Error::corrupt("manifest: size overflows"))?;
        if b.len() as u64 != len {
            return Err(Error::corrupt(format!(
                "manifest: {} bytes, but {count} entries need {len}",
                b.len()
            )));
        }
        let body = &b[..b.len() - 4];
        let crc = u32::from_le_bytes(b[b.len() - 4..].try_into().expect("4 bytes"));
        if crc32fast::hash(body) != crc {
            return Err(Error::corrupt("manifest: CRC mismatch (manifest damaged)"));
        }
        let mut entries = Vec::with_capacity(count as usize);
        let mut next_image_offset: Option<u64> = None;
        for (i, raw) in body[MANIFEST_HEADER_LEN..]
            .chunks_exact(MANIFEST_ENTRY_LEN)
            .enumerate()
        {
            let e = ManifestEntry::decode(raw)?;
            if e.header.index != i as u64 {
                return Err(Error::corrupt(format!(
                    "manifest: entry {i} claims to be chunk {} (disk offset {})",
                    e.header.index, e.header.disk_offset
                )));
            }
            if let Some(min) = next_image_offset {
                if e.image_offset < min {
                    return Err(Error::corrupt(format!(
                        "manifest: {} overlaps the previous chunk in the image",
                        e.header.describe()
                    )));
                }
            }
            next_image_offset =
                Some(e.image_offset.checked_add(e.record_len()).ok_or_else(|| {
                    Error::corrupt(format!(
                        "manifest: {} image offset overflows",
                        e.header.describe()
                    ))
                })?);
            entries.push(e);
        }
        Ok(Manifest { entries })
    }

    /// Hex SHA-256 of the encoded manifest: the image's identity for resume journals.
    pub fn digest(&self) -> String {
        hex::encode(Sha256::digest(self.encode()))
    }

    /// Uncompressed bytes of data and table chunks.
    pub fn data_bytes(&self) -> u64 {
        self.entries
            .iter()
            .filter(|e| e.header.kind != ChunkKind::Zero)
            .map(|e| e.header.raw_len)
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn sample(n: u64) -> Manifest {
        let mut off = 100;
        let entries = (0..n)
            .map(|i| {
                let header = ChunkHeader {
                    index: i,
                    kind: if i == 0 {
                        ChunkKind::Table
                    } else {
                        ChunkKind::Data
                    },
                    compression: Compression::Zstd,
                    raw_len: 4096,
                    disk_offset: i * 4096,
                    comp_len: 50,
                    crc32: i as u32,
                    sha256: [i as u8; 32],
                };
                let e = ManifestEntry {
                    header,
                    image_offset: off,
                };
                off += e.record_len();
                e
            })
            .collect();
        Manifest { entries }
    }

    #[test]
    fn round_trip_and_digest() {
        let m = sample(5);
        let b = m.encode();
        assert_eq!(b.len() as u64, Manifest::encoded_len(5).unwrap());
        let d = Manifest::decode(&b).unwrap();
        assert_eq!(d, m);
        assert_eq!(d.digest(), m.digest());
        assert_eq!(m.data_bytes(), 5 * 4096);
        assert_ne!(sample(4).digest(), m.digest());
    }

    #[test]
    fn damage_and_lies_are_caught() {
        let b = sample(3).encode();
        let mut bad = b.clone();
        bad[30] ^= 1;
        assert!(Manifest::decode(&bad).is_err());
        assert!(Manifest::decode(&b[..b.len() - 1]).is_err());
        let mut huge = b.clone();
        huge[8..16].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(Manifest::decode(&huge)
            .unwrap_err()
            .to_string()
            .contains("exceeds"));
        // Entries out of order (swapped) are refused even with a valid CRC.
        let mut m = sample(3);
        m.entries.swap(1, 2);
        assert!(Manifest::decode(&m.encode()).is_err());
        // Overlapping records in the image.
        let mut m = sample(3);
        m.entries[2].image_offset = m.entries[1].image_offset;
        assert!(Manifest::decode(&m.encode()).is_err());
    }
}
