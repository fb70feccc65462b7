//! The image format: a preamble with the image's metadata, chunks of a few MiB of disk
//! each compressed into its own zstd frame with CRC32 and SHA-256, and a manifest listing
//! every chunk. Two layouts share these records: "streaming" (manifest at the end, written
//! by a capture onto a pipe) and "sealed" (manifest and ed25519 signature right after the
//! preamble, so a deploy can check the signature before writing a byte and can fetch any
//! chunk by HTTP Range). The byte tables are in `docs/image-format.md`.
//!
//! Independent frames are the point of the design: they decompress in parallel, a lost
//! connection resumes at a chunk boundary, a multicast receiver can ask for the chunks it
//! missed, and two images can be compared chunk by chunk.

pub mod codec;
pub mod layout;
pub mod manifest;
pub mod reader;
pub mod signature;
pub mod writer;

use std::io::Read;

use serde::{Deserialize, Serialize};

pub use codec::{decode_chunk, encode_chunk, zero_chunk, zstd_level};
pub use layout::{
    ChunkHeader, ChunkKind, Compression, Layout, SignatureBlock, FORMAT_MAJOR, FORMAT_MINOR, MAGIC,
};
pub use manifest::{Manifest, ManifestEntry};
pub use reader::{ChunkRecord, ImageReader, SealedHead};
pub use signature::KeyId;
pub use writer::ImageWriter;

use crate::disk::{DiskLayout, PartitionInfo};
use crate::error::{Error, ErrorKind, Result};
use crate::source::Source;
use layout::{Footer, FOOTER_LEN, SIGNATURE_BLOCK_LEN};

/// What an image is: shown by `img info`, checked by a deploy before it writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageMeta {
    /// Major format version (same as the preamble's); see the versioning rule.
    pub format_version: u32,
    pub name: String,
    pub version: String,
    /// Hardware models the image is meant for (empty: any).
    pub models: Vec<String>,
    /// Smallest disk (whole-disk image) or partition (partition image) it fits on, bytes.
    pub min_target_size: u64,
    /// Creation time, Unix seconds.
    pub created: u64,
    /// Compression level as the user gave it (0..9).
    pub comp_level: u8,
    /// The zstd level it mapped to (0 = stored).
    pub zstd_level: i32,
    /// Nominal chunk size in bytes (chunks may be shorter).
    pub chunk_size: u32,
    pub content: Content,
    pub description: Option<String>,
}

/// Whole disk (with its partition table) or one partition.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum Content {
    Disk { layout: DiskLayout },
    Partition { partition: PartitionInfo },
}

impl PartialEq for Content {
    fn eq(&self, other: &Self) -> bool {
        // The disk types are not PartialEq; their JSON form is their identity here.
        serde_json::to_value(self).ok() == serde_json::to_value(other).ok()
    }
}

impl ImageMeta {
    pub fn to_json(&self) -> Result<Vec<u8>> {
        let v = serde_json::to_vec(self)
            .map_err(|e| Error::invalid("encoding image metadata").with_source(e))?;
        if v.len() > layout::MAX_META_LEN as usize {
            return Err(Error::invalid(format!(
                "image metadata is {} bytes, over the 1 MiB limit: shorten the description",
                v.len()
            )));
        }
        Ok(v)
    }

    /// Parse and sanity-check the metadata JSON of a preamble.
    pub fn from_json(b: &[u8]) -> Result<ImageMeta> {
        let m: ImageMeta = serde_json::from_slice(b)
            .map_err(|e| Error::corrupt("image metadata JSON does not parse").with_source(e))?;
        if m.format_version != u32::from(FORMAT_MAJOR) {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!(
                    "image metadata format version {}: upgrade img",
                    m.format_version
                ),
            ));
        }
        if m.comp_level > 9 || u64::from(m.chunk_size) > layout::MAX_CHUNK_RAW {
            return Err(Error::corrupt(format!(
                "image metadata: compression level {} or chunk size {} out of range",
                m.comp_level, m.chunk_size
            )));
        }
        Ok(m)
    }
}

/// What `img info` shows.
#[derive(Debug, Clone, Serialize)]
pub struct ImageInfo {
    pub meta: ImageMeta,
    pub sealed: bool,
    /// Key id (hex) of the signature; `read_info` checks it against the embedded key only,
    /// `verify` against the trusted keys.
    pub signed_by: Option<String>,
    pub chunks: u64,
    /// Uncompressed bytes of data and table chunks.
    pub data_bytes: u64,
    /// Size of the image file, when known.
    pub image_bytes: Option<u64>,
    /// SHA-256 of the manifest (hex): the image's identity.
    pub manifest_digest: String,
}

/// Everything before the chunks (and the manifest wherever it is).
#[derive(Debug, Clone)]
pub struct ImageHead {
    pub preamble_bytes: Vec<u8>,
    pub meta: ImageMeta,
    pub layout: Layout,
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: Option<SignatureBlock>,
    pub image_len: u64,
}

impl ImageHead {
    pub fn info(&self) -> Result<ImageInfo> {
        let signed_by = match &self.signature {
            Some(sig) => Some(
                sig.check(&self.preamble_bytes, &self.manifest_bytes)?
                    .to_string(),
            ),
            None => None,
        };
        Ok(ImageInfo {
            meta: self.meta.clone(),
            sealed: self.layout == Layout::Sealed,
            signed_by,
            chunks: self.manifest.entries.len() as u64,
            data_bytes: self.manifest.data_bytes(),
            image_bytes: Some(self.image_len),
            manifest_digest: self.manifest.digest(),
        })
    }
}

fn read_all(mut r: impl Read, len: u64, what: &str) -> Result<Vec<u8>> {
    reader::read_payload(&mut r, len, || what.to_string())
}

/// Read the preamble and the manifest of an image on a range-capable source (file, HTTP
/// with `Accept-Ranges`) without reading the chunks: sealed from the front, streaming from
/// the footer at the end.
pub fn fetch_head(src: &Source) -> Result<ImageHead> {
    let first = fetch_first(src)?;
    fetch_head_after(src, first)
}

/// Bytes [`fetch_first`] reads: the preamble's fixed part and, unless the metadata is
/// unusually long, the whole preamble, in one request.
pub const FIRST_BYTES: u64 = 4096;

/// The first [`FIRST_BYTES`] of a range-capable source (fewer if it is shorter), in one
/// range request: enough to tell what the source holds and, for an image, to read its
/// preamble.
pub fn fetch_first(src: &Source) -> Result<Vec<u8>> {
    let image_len = known_len(src)?;
    let len = image_len.min(FIRST_BYTES);
    read_all(src.read_range(0, len)?, len, "image preamble")
}

fn known_len(src: &Source) -> Result<u64> {
    src.len().ok_or_else(|| {
        Error::new(
            ErrorKind::Unsupported,
            "image size unknown: cannot read its manifest without reading it all",
        )
    })
}

/// [`fetch_head`] for a caller that already read the source's first bytes with
/// [`fetch_first`] (to tell what it holds): they are not requested again.
pub fn fetch_head_after(src: &Source, first: Vec<u8>) -> Result<ImageHead> {
    let image_len = known_len(src)?;
    // Small range requests, not one open-ended read: over HTTP a dropped connection would
    // still have made the server push the whole image into the socket.
    let range = |off: u64, len: u64, what: &str| read_all(src.read_range(off, len)?, len, what);
    let fixed: &[u8; layout::PREAMBLE_FIXED_LEN] = first
        .get(..layout::PREAMBLE_FIXED_LEN)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::new(ErrorKind::Truncated, "image preamble"))?;
    let (_, _, layout, meta_len) = layout::Preamble::decode_fixed(fixed)?;
    let preamble_len = (layout::PREAMBLE_FIXED_LEN + meta_len as usize + 4) as u64;
    let preamble_bytes = match first.get(..preamble_len as usize) {
        Some(b) => b.to_vec(),
        None => range(0, preamble_len, "image preamble")?,
    };
    let (_, _, meta) = reader::read_preamble(&mut &preamble_bytes[..])?;
    if layout == Layout::Sealed {
        let mh = range(
            preamble_len,
            manifest::MANIFEST_HEADER_LEN as u64,
            "manifest header",
        )?;
        let count = Manifest::decode_count(
            mh.as_slice()
                .try_into()
                .map_err(|_| Error::corrupt("manifest header"))?,
        )?;
        if count > reader::plausible_chunks(meta.min_target_size)
            || count.saturating_mul(76) > image_len
        {
            return Err(Error::corrupt(format!(
                "manifest: {count} chunks is more than this image can hold"
            )));
        }
        let mlen = Manifest::encoded_len(count)
            .ok_or_else(|| Error::corrupt("manifest size overflows"))?;
        let rest = range(
            preamble_len,
            mlen + SIGNATURE_BLOCK_LEN as u64,
            "manifest and signature",
        )?;
        let mut r = ImageReader::open(preamble_bytes.as_slice().chain(rest.as_slice()))?;
        let s = r
            .sealed
            .take()
            .ok_or_else(|| Error::corrupt("sealed image without a manifest"))?;
        return Ok(ImageHead {
            preamble_bytes,
            meta,
            layout: Layout::Sealed,
            manifest: s.manifest,
            manifest_bytes: s.manifest_bytes,
            signature: Some(s.signature),
            image_len,
        });
    }
    let footer_at = image_len
        .checked_sub(FOOTER_LEN as u64)
        .filter(|&o| o >= preamble_len)
        .ok_or_else(|| Error::new(ErrorKind::Truncated, "image ends before its footer"))?;
    let fb: [u8; FOOTER_LEN] = read_all(
        src.read_range(footer_at, FOOTER_LEN as u64)?,
        FOOTER_LEN as u64,
        "image footer",
    )?
    .try_into()
    .map_err(|_| Error::new(ErrorKind::Truncated, "image footer"))?;
    let footer = Footer::decode(&fb).map_err(|e| {
        Error::new(
            ErrorKind::Truncated,
            format!("{e}: the image is incomplete"),
        )
    })?;
    if footer.manifest_offset < preamble_len
        || footer.manifest_offset.checked_add(footer.manifest_len) != Some(footer_at)
        || Manifest::encoded_len(footer.chunk_count) != Some(footer.manifest_len)
        || footer.chunk_count > reader::plausible_chunks(meta.min_target_size)
    {
        return Err(Error::corrupt(
            "image footer: manifest position inconsistent with the image size",
        ));
    }
    let manifest_bytes = read_all(
        src.read_range(footer.manifest_offset, footer.manifest_len)?,
        footer.manifest_len,
        "manifest",
    )?;
    let manifest = Manifest::decode(&manifest_bytes)?;
    let end = manifest
        .entries
        .last()
        .map(|e| e.image_offset + e.record_len())
        .unwrap_or(preamble_len);
    if manifest
        .entries
        .first()
        .is_some_and(|e| e.image_offset != preamble_len)
        || end != footer.manifest_offset
    {
        return Err(Error::corrupt(
            "manifest: chunk positions do not fill the image",
        ));
    }
    Ok(ImageHead {
        preamble_bytes,
        meta,
        layout: Layout::Streaming,
        manifest,
        manifest_bytes,
        signature: None,
        image_len,
    })
}

/// Header and manifest of an image: from the front and the end where the source allows
/// ranges, otherwise by reading the stream to its end (chunks are skipped, not checked).
pub fn read_info(src: &mut Source) -> Result<ImageInfo> {
    if src.supports_ranges() && src.len().is_some() {
        return fetch_head(src)?.info();
    }
    let stream = std::io::BufReader::with_capacity(crate::io::BUFFER_SIZE, src.stream()?);
    let mut r = ImageReader::open(stream)?;
    while r.next_chunk()?.is_some() {}
    let (manifest, manifest_bytes) = r
        .manifest()
        .map(|(m, b)| (m.clone(), b.to_vec()))
        .unwrap_or_default();
    let signature = r.sealed.as_ref().map(|s| s.signature);
    ImageHead {
        preamble_bytes: r.preamble_bytes.clone(),
        meta: r.meta.clone(),
        layout: r.preamble.layout,
        manifest,
        manifest_bytes,
        signature,
        image_len: r.position(),
    }
    .info()
}

/// The manifest of the sealed form of an image: same chunks, placed after a preamble of
/// `preamble_len` bytes, the manifest and the signature block.
pub fn sealed_manifest(streaming: &Manifest, preamble_len: u64) -> Result<Manifest> {
    let mlen = Manifest::encoded_len(streaming.entries.len() as u64)
        .ok_or_else(|| Error::corrupt("manifest size overflows"))?;
    let mut off = preamble_len + mlen + SIGNATURE_BLOCK_LEN as u64;
    let mut entries = Vec::with_capacity(streaming.entries.len());
    for e in &streaming.entries {
        entries.push(ManifestEntry {
            header: e.header,
            image_offset: off,
        });
        off = off
            .checked_add(e.record_len())
            .ok_or_else(|| Error::corrupt("image size overflows"))?;
    }
    Ok(Manifest { entries })
}

/// Fuzz entry point: parse an image from arbitrary bytes, decoding every chunk. Must never
/// panic, whatever the input.
pub fn fuzz_parse_image(data: &[u8]) {
    let Ok(mut r) = ImageReader::open(data) else {
        return;
    };
    while let Ok(Some(rec)) = r.next_chunk() {
        let _ = decode_chunk(&rec.header, rec.payload);
    }
}

/// Fuzz entry point: parse a manifest block and a footer from arbitrary bytes.
pub fn fuzz_parse_manifest(data: &[u8]) {
    if let Ok(m) = Manifest::decode(data) {
        let _ = m.digest();
        let _ = sealed_manifest(&m, 100);
    }
    let _ = reader::read_manifest(&mut &data[..], false, 1 << 12);
    if let Some(fb) = data
        .get(..FOOTER_LEN)
        .and_then(|b| <[u8; FOOTER_LEN]>::try_from(b).ok())
    {
        let _ = Footer::decode(&fb);
    }
    if let Some(sb) = data
        .get(..SIGNATURE_BLOCK_LEN)
        .and_then(|b| <[u8; SIGNATURE_BLOCK_LEN]>::try_from(b).ok())
    {
        let _ = SignatureBlock::decode(&sb);
    }
}

/// Small in-memory images for the unit tests of this module, `sign` and `deploy`.
#[cfg(test)]
pub(crate) mod testimg {
    use super::*;
    use crate::disk::{DiskLayout, TableKind};

    pub fn meta(len: u64) -> ImageMeta {
        ImageMeta {
            format_version: 1,
            name: "test".into(),
            version: "1".into(),
            models: vec![],
            min_target_size: len,
            created: 0,
            comp_level: 3,
            zstd_level: 3,
            chunk_size: 64 << 10,
            content: Content::Disk {
                layout: DiskLayout {
                    table: TableKind::None,
                    disk_size: len,
                    sector_size: 512,
                    partitions: vec![],
                    table_extents: vec![],
                },
            },
            description: None,
        }
    }

    /// A pseudo-random but compressible disk of `len` bytes with a zero hole in the middle.
    pub fn disk(len: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        let mut d: Vec<u8> = (0..len)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                if i % 7 == 0 {
                    (x & 0xff) as u8
                } else {
                    (i / 97) as u8
                }
            })
            .collect();
        let hole = len / 3..len / 3 + len / 4;
        d[hole].fill(0);
        d
    }

    /// A streaming image of `disk` cut into `chunk`-byte data chunks (zero chunks for
    /// all-zero pieces).
    pub fn image(disk: &[u8], chunk: usize) -> Vec<u8> {
        let mut m = meta(disk.len() as u64);
        m.chunk_size = chunk as u32;
        let mut w = ImageWriter::streaming(Vec::new(), &m).unwrap();
        for (i, piece) in disk.chunks(chunk).enumerate() {
            let off = (i * chunk) as u64;
            if piece.iter().all(|&b| b == 0) {
                w.write_chunk(&zero_chunk(i as u64, off, piece.len() as u64), &[])
                    .unwrap();
            } else {
                let (h, p) =
                    encode_chunk(i as u64, ChunkKind::Data, off, piece.to_vec(), 3).unwrap();
                w.write_chunk(&h, &p).unwrap();
            }
        }
        w.finish().unwrap().2
    }

    /// Read an image back into a disk of `len` bytes, checking everything.
    pub fn replay(img: &[u8], len: usize) -> Result<Vec<u8>> {
        let mut out = vec![0u8; len];
        let mut r = ImageReader::open(img)?;
        while let Some(rec) = r.next_chunk()? {
            let h = rec.header;
            let data = decode_chunk(&h, rec.payload)?;
            if h.kind != ChunkKind::Zero {
                out[h.disk_offset as usize..][..data.len()].copy_from_slice(&data);
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::testimg::*;
    use super::*;
    use layout::CHUNK_HEADER_LEN;

    #[test]
    fn streaming_round_trip() {
        let d = disk(600_000);
        let img = image(&d, 64 << 10);
        assert!(img.len() < d.len());
        assert_eq!(replay(&img, d.len()).unwrap(), d);
        let mut r = ImageReader::open(&img[..]).unwrap();
        while r.next_chunk().unwrap().is_some() {}
        let (m, _) = r.manifest().unwrap();
        assert_eq!(m.entries.len(), 10);
        assert!(m.entries.iter().any(|e| e.header.kind == ChunkKind::Zero));
    }

    fn chunk_offsets(img: &[u8]) -> Vec<(u64, u64)> {
        let mut r = ImageReader::open(img).unwrap();
        let mut v = vec![];
        while let Some(rec) = r.next_chunk().unwrap() {
            v.push((
                rec.image_offset,
                CHUNK_HEADER_LEN as u64 + u64::from(rec.header.comp_len),
            ));
        }
        v
    }

    #[test]
    fn flipped_byte_names_the_chunk() {
        let d = disk(300_000);
        let img = image(&d, 64 << 10);
        let offs = chunk_offsets(&img);
        // A byte in chunk 1's payload.
        let mut bad = img.clone();
        bad[(offs[1].0 + CHUNK_HEADER_LEN as u64 + 10) as usize] ^= 0x10;
        let e = replay(&bad, d.len()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(
            e.to_string().contains("chunk 1 at disk offset 65536"),
            "{e}"
        );
        // A byte in chunk 4's header.
        let mut bad = img.clone();
        bad[(offs[4].0 + 20) as usize] ^= 1;
        let e = replay(&bad, d.len()).unwrap_err();
        assert!(e.to_string().contains("after chunk 3"), "{e}");
    }

    #[test]
    fn truncation_is_reported_everywhere() {
        let d = disk(200_000);
        let img = image(&d, 64 << 10);
        for cut in [0, 5, 30, img.len() / 2, img.len() - 40, img.len() - 1] {
            let e = replay(&img[..cut], d.len()).unwrap_err();
            assert!(
                matches!(e.kind(), ErrorKind::Truncated | ErrorKind::Corrupt),
                "cut {cut}: {e}"
            );
        }
        let e = replay(&img[..img.len() / 2], d.len()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    }

    #[test]
    fn swapped_chunks_are_refused() {
        let d = disk(300_000);
        let img = image(&d, 64 << 10);
        let offs = chunk_offsets(&img);
        let (a, b) = (offs[0], offs[1]);
        let mut bad = img[..a.0 as usize].to_vec();
        bad.extend_from_slice(&img[b.0 as usize..(b.0 + b.1) as usize]);
        bad.extend_from_slice(&img[a.0 as usize..(a.0 + a.1) as usize]);
        bad.extend_from_slice(&img[(b.0 + b.1) as usize..]);
        let e = replay(&bad, d.len()).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(
            e.to_string().contains("chunk 1 at disk offset 65536")
                && e.to_string().contains("out of order"),
            "{e}"
        );
    }

    #[test]
    fn unknown_major_version_asks_for_an_upgrade() {
        let mut img = image(&disk(10_000), 4096);
        img[8] = 9;
        let e = ImageReader::open(&img[..]).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Unsupported);
        assert!(e.to_string().contains("upgrade img"));
    }

    #[test]
    fn manifest_count_is_bounded_by_the_target_size_before_allocating() {
        let mut m = meta(4096);
        m.min_target_size = 4096;
        let mut img = layout::Preamble::new(Layout::Sealed, m.to_json().unwrap()).encode();
        img.extend_from_slice(b"IMAN\0\0\0\0");
        img.extend_from_slice(&1_000_000u64.to_le_bytes());
        let e = ImageReader::open(&img[..]).err().unwrap();
        assert_eq!(e.kind(), ErrorKind::Corrupt);
        assert!(e.to_string().contains("more than"), "{e}");
    }

    /// Deterministic pseudo-random and mutated-valid inputs for the fuzz entry points, so
    /// the plain test suite exercises the parsers without cargo-fuzz.
    #[test]
    fn fuzz_entry_points_survive_random_and_mutated_input() {
        let valid = image(&disk(50_000), 8192);
        let mut r = ImageReader::open(&valid[..]).unwrap();
        let mut records = Vec::new();
        while let Some(rec) = r.next_chunk().unwrap() {
            records.push(rec);
        }
        let (streaming_manifest, manifest) =
            r.manifest().map(|(m, b)| (m.clone(), b.to_vec())).unwrap();
        // The same chunks in the sealed layout (the parser does not check the signature).
        let pre = layout::Preamble::new(Layout::Sealed, r.meta.to_json().unwrap()).encode();
        let sm = sealed_manifest(&streaming_manifest, pre.len() as u64).unwrap();
        let sig = SignatureBlock {
            public_key: [0; 32],
            signature: [0; 64],
        };
        let mut w = ImageWriter::sealed(Vec::new(), &pre, &sm.encode(), &sig).unwrap();
        for rec in &records {
            w.write_chunk(&rec.header, &rec.payload).unwrap();
        }
        let sealed = w.finish().unwrap().2;
        assert_eq!(replay(&sealed, 50_000).unwrap(), disk(50_000));
        let mut x = 0x9e37_79b9_7f4a_7c15u64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..3000 {
            let n = (rnd() % 600) as usize;
            let random: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
            fuzz_parse_image(&random);
            fuzz_parse_manifest(&random);
            for base in [&valid, &manifest, &sealed] {
                let mut m = base.clone();
                for _ in 0..1 + i % 4 {
                    let p = (rnd() as usize) % m.len();
                    m[p] ^= 1 << (rnd() % 8);
                }
                if i % 5 == 0 {
                    m.truncate((rnd() as usize) % m.len());
                }
                fuzz_parse_image(&m);
                fuzz_parse_manifest(&m);
            }
        }
    }
}
