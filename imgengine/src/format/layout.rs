//! The fixed binary records of an image: the preamble, the inline chunk header, the
//! signature block and the footer. All integers little-endian; every record that can be
//! damaged in transit carries its own CRC32 so a flipped byte is reported as the record
//! it hit, not as a confusing error further on. Byte tables: `docs/image-format.md`.

use crate::error::{Error, ErrorKind, Result};

/// First 8 bytes of every image. PNG-style: the high byte catches 7-bit transports, CR LF
/// and ^Z catch text-mode mangling, so a damaged download fails at byte 0.
pub const MAGIC: [u8; 8] = *b"\x89IMG\r\n\x1a\n";
/// Major version: readers refuse an unknown major (layout changes).
pub const FORMAT_MAJOR: u16 = 1;
/// Minor version: additions an older reader can ignore (new JSON fields).
pub const FORMAT_MINOR: u16 = 0;

pub const PREAMBLE_FIXED_LEN: usize = 20;
pub const CHUNK_HEADER_LEN: usize = 76;
pub const SIGNATURE_BLOCK_LEN: usize = 104;
pub const FOOTER_LEN: usize = 36;

/// The metadata JSON is a few KiB; 1 MiB bounds what a hostile preamble can make us allocate.
pub const MAX_META_LEN: u32 = 1 << 20;
/// Chunks are a few MiB of disk; 64 MiB bounds the allocation per chunk in flight.
pub const MAX_CHUNK_RAW: u64 = 64 << 20;

pub const CHUNK_MAGIC: [u8; 4] = *b"ICHK";
pub const MANIFEST_MAGIC: [u8; 4] = *b"IMAN";
pub const SIGNATURE_MAGIC: [u8; 4] = *b"ISIG";
pub const FOOTER_MAGIC: [u8; 4] = *b"IEND";

/// Where the manifest sits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// Written by a capture to a pipe: chunks first, manifest and footer at the end.
    Streaming,
    /// Rewritten by `seal_and_sign`: manifest and signature right after the preamble.
    Sealed,
}

impl Layout {
    fn code(self) -> u8 {
        match self {
            Layout::Streaming => 1,
            Layout::Sealed => 2,
        }
    }
}

/// What a chunk holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChunkKind {
    /// File-system or raw content.
    Data,
    /// Partition-table bytes: a deploy writes these last.
    Table,
    /// A run of zeros: no payload; a deploy zeroes (punches) the range.
    Zero,
}

impl ChunkKind {
    pub fn code(self) -> u8 {
        match self {
            ChunkKind::Data => 0,
            ChunkKind::Table => 1,
            ChunkKind::Zero => 2,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(ChunkKind::Data),
            1 => Some(ChunkKind::Table),
            2 => Some(ChunkKind::Zero),
            _ => None,
        }
    }
}

/// How a chunk's payload is encoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Stored,
    Zstd,
}

impl Compression {
    pub fn code(self) -> u8 {
        match self {
            Compression::Stored => 0,
            Compression::Zstd => 1,
        }
    }

    pub fn from_code(c: u8) -> Option<Self> {
        match c {
            0 => Some(Compression::Stored),
            1 => Some(Compression::Zstd),
            _ => None,
        }
    }
}

/// Upper bound of a zstd frame for `raw` input bytes (ZSTD_COMPRESSBOUND from zstd.h).
pub fn zstd_bound(raw: u64) -> u64 {
    let small = if raw < (128 << 10) {
        ((128 << 10) - raw) >> 11
    } else {
        0
    };
    raw + (raw >> 8) + small
}

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

/// The preamble: magic, versions, layout, the metadata JSON, and a CRC over all of it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Preamble {
    pub major: u16,
    pub minor: u16,
    pub layout: Layout,
    pub meta_json: Vec<u8>,
}

impl Preamble {
    pub fn new(layout: Layout, meta_json: Vec<u8>) -> Self {
        Preamble {
            major: FORMAT_MAJOR,
            minor: FORMAT_MINOR,
            layout,
            meta_json,
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(PREAMBLE_FIXED_LEN + self.meta_json.len() + 4);
        v.extend_from_slice(&MAGIC);
        v.extend_from_slice(&self.major.to_le_bytes());
        v.extend_from_slice(&self.minor.to_le_bytes());
        v.push(self.layout.code());
        v.extend_from_slice(&[0u8; 3]);
        v.extend_from_slice(&(self.meta_json.len() as u32).to_le_bytes());
        v.extend_from_slice(&self.meta_json);
        let crc = crc32fast::hash(&v);
        v.extend_from_slice(&crc.to_le_bytes());
        v
    }

    /// Check the fixed part (magic, version, layout) and return the metadata length.
    pub fn decode_fixed(b: &[u8; PREAMBLE_FIXED_LEN]) -> Result<(u16, u16, Layout, u32)> {
        if b[..8] != MAGIC {
            return Err(Error::corrupt(
                "image preamble: bad magic (not an img image, or damaged at byte 0)",
            ));
        }
        let major = u16_at(b, 8);
        let minor = u16_at(b, 10);
        if major != FORMAT_MAJOR {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("image format version {major}.{minor}; this img reads version {FORMAT_MAJOR}.x: upgrade img"),
            ));
        }
        let layout = match b[12] {
            1 => Layout::Streaming,
            2 => Layout::Sealed,
            other => {
                return Err(Error::corrupt(format!(
                    "image preamble: unknown layout {other}"
                )))
            }
        };
        let meta_len = u32_at(b, 16);
        if meta_len > MAX_META_LEN {
            return Err(Error::corrupt(format!(
                "image preamble: metadata length {meta_len} exceeds the {MAX_META_LEN}-byte limit"
            )));
        }
        Ok((major, minor, layout, meta_len))
    }

    /// Decode a whole preamble from `b` (which must be exactly fixed + meta + crc bytes).
    pub fn decode(b: &[u8]) -> Result<Preamble> {
        let fixed: &[u8; PREAMBLE_FIXED_LEN] = b
            .get(..PREAMBLE_FIXED_LEN)
            .and_then(|s| s.try_into().ok())
            .ok_or_else(|| Error::new(ErrorKind::Truncated, "image preamble"))?;
        let (major, minor, layout, meta_len) = Self::decode_fixed(fixed)?;
        let total = PREAMBLE_FIXED_LEN + meta_len as usize + 4;
        if b.len() != total {
            return Err(Error::new(
                ErrorKind::Truncated,
                "image preamble: shorter than its metadata length says",
            ));
        }
        let crc = u32_at(b, total - 4);
        if crc32fast::hash(&b[..total - 4]) != crc {
            return Err(Error::corrupt(
                "image preamble: CRC mismatch (metadata damaged)",
            ));
        }
        Ok(Preamble {
            major,
            minor,
            layout,
            meta_json: b[PREAMBLE_FIXED_LEN..total - 4].to_vec(),
        })
    }
}

/// The header in front of every chunk's payload (and, with `image_offset`, a manifest entry).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkHeader {
    pub index: u64,
    pub kind: ChunkKind,
    pub compression: Compression,
    /// Bytes of disk the chunk covers.
    pub raw_len: u64,
    /// Where on the disk (or partition) the chunk goes.
    pub disk_offset: u64,
    /// Payload bytes following the header.
    pub comp_len: u32,
    /// CRC32 of the payload.
    pub crc32: u32,
    /// SHA-256 of the uncompressed bytes (all zero for Zero chunks).
    pub sha256: [u8; 32],
}

impl ChunkHeader {
    /// Chunk `index` at `disk_offset`: the phrase every chunk error starts with.
    pub fn describe(&self) -> String {
        format!("chunk {} at disk offset {}", self.index, self.disk_offset)
    }

    pub fn encode(&self) -> [u8; CHUNK_HEADER_LEN] {
        let mut b = [0u8; CHUNK_HEADER_LEN];
        b[0..4].copy_from_slice(&CHUNK_MAGIC);
        b[4..12].copy_from_slice(&self.index.to_le_bytes());
        b[12] = self.kind.code();
        b[13] = self.compression.code();
        b[16..24].copy_from_slice(&self.raw_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.disk_offset.to_le_bytes());
        b[32..36].copy_from_slice(&self.comp_len.to_le_bytes());
        b[36..40].copy_from_slice(&self.crc32.to_le_bytes());
        b[40..72].copy_from_slice(&self.sha256);
        let crc = crc32fast::hash(&b[..72]);
        b[72..76].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decode and bounds-check a chunk header; `after` names the previous chunk for errors.
    pub fn decode(b: &[u8; CHUNK_HEADER_LEN], after: &str) -> Result<ChunkHeader> {
        if b[0..4] != CHUNK_MAGIC {
            return Err(Error::corrupt(format!("chunk header {after}: bad magic")));
        }
        let index = u64_at(b, 4);
        let disk_offset = u64_at(b, 24);
        if crc32fast::hash(&b[..72]) != u32_at(b, 72) {
            return Err(Error::corrupt(format!(
                "chunk header {after}: CRC mismatch (header damaged)"
            )));
        }
        let what = format!("chunk {index} at disk offset {disk_offset}");
        let kind = ChunkKind::from_code(b[12])
            .ok_or_else(|| Error::corrupt(format!("{what}: unknown chunk kind {}", b[12])))?;
        let compression = Compression::from_code(b[13])
            .ok_or_else(|| Error::corrupt(format!("{what}: unknown compression {}", b[13])))?;
        let mut sha256 = [0u8; 32];
        sha256.copy_from_slice(&b[40..72]);
        let h = ChunkHeader {
            index,
            kind,
            compression,
            raw_len: u64_at(b, 16),
            disk_offset,
            comp_len: u32_at(b, 32),
            crc32: u32_at(b, 36),
            sha256,
        };
        h.check_bounds()?;
        Ok(h)
    }

    /// The limits every header and manifest entry must respect.
    pub fn check_bounds(&self) -> Result<()> {
        let what = self.describe();
        if self.raw_len == 0 {
            return Err(Error::corrupt(format!("{what}: empty chunk")));
        }
        if self.disk_offset.checked_add(self.raw_len).is_none() {
            return Err(Error::corrupt(format!(
                "{what}: length {} overflows the disk offset",
                self.raw_len
            )));
        }
        match self.kind {
            ChunkKind::Zero => {
                if self.comp_len != 0 {
                    return Err(Error::corrupt(format!("{what}: zero chunk with a payload")));
                }
            }
            ChunkKind::Data | ChunkKind::Table => {
                if self.raw_len > MAX_CHUNK_RAW {
                    return Err(Error::corrupt(format!(
                        "{what}: chunk length {} exceeds the {MAX_CHUNK_RAW}-byte limit",
                        self.raw_len
                    )));
                }
                let comp = u64::from(self.comp_len);
                let ok = match self.compression {
                    Compression::Stored => comp == self.raw_len,
                    Compression::Zstd => comp > 0 && comp <= zstd_bound(self.raw_len),
                };
                if !ok {
                    return Err(Error::corrupt(format!(
                        "{what}: payload length {} impossible for {} bytes of content",
                        self.comp_len, self.raw_len
                    )));
                }
            }
        }
        Ok(())
    }
}

/// The signature block of a sealed image: algorithm, the signer's public key, the signature.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SignatureBlock {
    pub public_key: [u8; 32],
    pub signature: [u8; 64],
}

/// Algorithm code for ed25519 in the signature block.
pub const SIG_ALG_ED25519: u32 = 1;

impl SignatureBlock {
    pub fn encode(&self) -> [u8; SIGNATURE_BLOCK_LEN] {
        let mut b = [0u8; SIGNATURE_BLOCK_LEN];
        b[0..4].copy_from_slice(&SIGNATURE_MAGIC);
        b[4..8].copy_from_slice(&SIG_ALG_ED25519.to_le_bytes());
        b[8..40].copy_from_slice(&self.public_key);
        b[40..104].copy_from_slice(&self.signature);
        b
    }

    pub fn decode(b: &[u8; SIGNATURE_BLOCK_LEN]) -> Result<SignatureBlock> {
        if b[0..4] != SIGNATURE_MAGIC {
            return Err(Error::corrupt(
                "signature block: bad magic (sealed image damaged)",
            ));
        }
        let alg = u32_at(b, 4);
        if alg != SIG_ALG_ED25519 {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("signature algorithm {alg}: upgrade img"),
            ));
        }
        let mut public_key = [0u8; 32];
        public_key.copy_from_slice(&b[8..40]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&b[40..104]);
        Ok(SignatureBlock {
            public_key,
            signature,
        })
    }
}

/// The end record: where the manifest is, so a range-capable reader finds it from the end.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Footer {
    pub manifest_offset: u64,
    pub manifest_len: u64,
    pub chunk_count: u64,
}

impl Footer {
    pub fn encode(&self) -> [u8; FOOTER_LEN] {
        let mut b = [0u8; FOOTER_LEN];
        b[0..4].copy_from_slice(&FOOTER_MAGIC);
        b[8..16].copy_from_slice(&self.manifest_offset.to_le_bytes());
        b[16..24].copy_from_slice(&self.manifest_len.to_le_bytes());
        b[24..32].copy_from_slice(&self.chunk_count.to_le_bytes());
        let crc = crc32fast::hash(&b[..32]);
        b[32..36].copy_from_slice(&crc.to_le_bytes());
        b
    }

    pub fn decode(b: &[u8; FOOTER_LEN]) -> Result<Footer> {
        if b[0..4] != FOOTER_MAGIC {
            return Err(Error::corrupt(
                "image footer: bad magic (image truncated or damaged at the end)",
            ));
        }
        if crc32fast::hash(&b[..32]) != u32_at(b, 32) {
            return Err(Error::corrupt("image footer: CRC mismatch"));
        }
        Ok(Footer {
            manifest_offset: u64_at(b, 8),
            manifest_len: u64_at(b, 16),
            chunk_count: u64_at(b, 24),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header() -> ChunkHeader {
        ChunkHeader {
            index: 7,
            kind: ChunkKind::Data,
            compression: Compression::Zstd,
            raw_len: 4 << 20,
            disk_offset: 1 << 20,
            comp_len: 1234,
            crc32: 0xdead_beef,
            sha256: [5u8; 32],
        }
    }

    #[test]
    fn chunk_header_round_trip() {
        let h = header();
        let b = h.encode();
        assert_eq!(ChunkHeader::decode(&b, "x").unwrap(), h);
    }

    #[test]
    fn chunk_header_damage_is_reported() {
        let mut b = header().encode();
        b[20] ^= 1;
        let e = ChunkHeader::decode(&b, "after chunk 6").unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("after chunk 6"), "{e}");
    }

    #[test]
    fn chunk_header_bounds() {
        let mut h = header();
        h.raw_len = MAX_CHUNK_RAW + 1;
        assert!(ChunkHeader::decode(&h.encode(), "x").is_err());
        let mut h = header();
        h.compression = Compression::Stored;
        assert!(ChunkHeader::decode(&h.encode(), "x").is_err());
        let mut h = header();
        h.disk_offset = u64::MAX - 1;
        assert!(ChunkHeader::decode(&h.encode(), "x").is_err());
        let mut h = header();
        h.kind = ChunkKind::Zero;
        assert!(ChunkHeader::decode(&h.encode(), "x").is_err());
        h.comp_len = 0;
        h.raw_len = 1 << 40;
        assert!(ChunkHeader::decode(&h.encode(), "x").is_ok());
    }

    #[test]
    fn preamble_round_trip_and_version_rule() {
        let p = Preamble::new(Layout::Sealed, b"{\"a\":1}".to_vec());
        let b = p.encode();
        assert_eq!(Preamble::decode(&b).unwrap(), p);
        let mut bad = b.clone();
        bad[8] = 2;
        let e = Preamble::decode(&bad).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("upgrade img"));
        let mut bad = b.clone();
        bad[22] ^= 1;
        assert_eq!(
            Preamble::decode(&bad).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
        let mut bad = b;
        bad[16..20].copy_from_slice(&(MAX_META_LEN + 1).to_le_bytes());
        assert_eq!(
            Preamble::decode(&bad).unwrap_err().kind(),
            ErrorKind::Corrupt
        );
    }

    #[test]
    fn footer_and_signature_round_trip() {
        let f = Footer {
            manifest_offset: 99,
            manifest_len: 20,
            chunk_count: 0,
        };
        assert_eq!(Footer::decode(&f.encode()).unwrap(), f);
        let mut b = f.encode();
        b[9] ^= 1;
        assert!(Footer::decode(&b).is_err());
        let s = SignatureBlock {
            public_key: [1; 32],
            signature: [2; 64],
        };
        assert_eq!(SignatureBlock::decode(&s.encode()).unwrap(), s);
    }

    #[test]
    fn zstd_bound_matches_the_library() {
        for n in [0usize, 1, 1000, 128 << 10, 4 << 20] {
            assert!(
                zstd_bound(n as u64) >= zstd::zstd_safe::compress_bound(n) as u64,
                "{n}"
            );
        }
    }
}
