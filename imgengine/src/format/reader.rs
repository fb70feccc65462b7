//! Reading an image front to back from any `Read` (pipe, HTTP body, file): the preamble,
//! the sealed manifest and signature when present, then one chunk record at a time with
//! its header checked against the manifest (sealed) or against the running chunk index
//! (streaming), and finally the end records. The reader checks structure only; payload
//! CRC/SHA-256 checks happen in [`super::codec::decode_chunk`] on worker threads.

use std::io::{self, Read};

use super::layout::{
    ChunkHeader, Footer, Layout, Preamble, SignatureBlock, CHUNK_HEADER_LEN, CHUNK_MAGIC,
    FOOTER_LEN, FOOTER_MAGIC, MANIFEST_MAGIC, PREAMBLE_FIXED_LEN, SIGNATURE_BLOCK_LEN,
};
use super::manifest::{Manifest, ManifestEntry, MANIFEST_HEADER_LEN};
use super::ImageMeta;
use crate::error::{Error, ErrorKind, Result};

/// One chunk record as read from the image: header, where it was, and its raw payload.
#[derive(Debug)]
pub struct ChunkRecord {
    pub header: ChunkHeader,
    pub image_offset: u64,
    pub payload: Vec<u8>,
}

/// The manifest and signature a sealed image carries before its chunks.
#[derive(Debug, Clone)]
pub struct SealedHead {
    pub manifest: Manifest,
    pub manifest_bytes: Vec<u8>,
    pub signature: SignatureBlock,
}

/// Read exactly `buf.len()` bytes; end of stream becomes `Truncated` with `what` as context.
pub(crate) fn read_exact_or(
    r: &mut impl Read,
    buf: &mut [u8],
    what: impl FnOnce() -> String,
) -> Result<()> {
    r.read_exact(buf).map_err(|e| {
        let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
            ErrorKind::Truncated
        } else {
            ErrorKind::Io
        };
        Error::new(kind, what()).with_source(e)
    })
}

/// Read a `len`-byte payload without allocating it all up front (a truncated stream with a
/// large claimed length must not cost that much memory before failing).
pub(crate) fn read_payload(
    r: &mut impl Read,
    len: u64,
    what: impl FnOnce() -> String,
) -> Result<Vec<u8>> {
    // Grown in 1 MiB steps of read_exact (large reads, no probing), so a truncated stream
    // claiming a large payload costs at most 1 MiB more than it delivered.
    const STEP: u64 = 1 << 20;
    // A reused buffer when one that fits is idle (no new memory either way).
    let mut v = crate::io::pool::take(len.min(usize::MAX as u64) as usize);
    while (v.len() as u64) < len {
        let got = v.len();
        let n = (len - got as u64).min(STEP) as usize;
        // Exactly: the deploy pipeline counts a payload's bytes, not a doubled capacity.
        v.reserve_exact(n);
        v.resize(got + n, 0);
        if let Err(e) = r.read_exact(&mut v[got..]) {
            let kind = if e.kind() == io::ErrorKind::UnexpectedEof {
                ErrorKind::Truncated
            } else {
                ErrorKind::Io
            };
            return Err(Error::new(
                kind,
                format!("{}: image ends within a {len}-byte payload", what()),
            )
            .with_source(e));
        }
    }
    Ok(v)
}

/// Read the preamble: returns it, its raw bytes and the parsed metadata.
pub fn read_preamble(r: &mut impl Read) -> Result<(Preamble, Vec<u8>, ImageMeta)> {
    let mut fixed = [0u8; PREAMBLE_FIXED_LEN];
    read_exact_or(r, &mut fixed, || "image preamble".into())?;
    let (_, _, _, meta_len) = Preamble::decode_fixed(&fixed)?;
    let mut bytes = fixed.to_vec();
    bytes.resize(PREAMBLE_FIXED_LEN + meta_len as usize + 4, 0);
    read_exact_or(r, &mut bytes[PREAMBLE_FIXED_LEN..], || {
        "image metadata".into()
    })?;
    let preamble = Preamble::decode(&bytes)?;
    let meta = ImageMeta::from_json(&preamble.meta_json)?;
    Ok((preamble, bytes, meta))
}

/// Read a manifest block whose 4-byte magic has already been consumed (`magic_read`) or not.
/// `max_entries` bounds the count by what the image can plausibly hold (see
/// [`plausible_chunks`]) before anything is allocated for it.
pub fn read_manifest(
    r: &mut impl Read,
    magic_read: bool,
    max_entries: u64,
) -> Result<(Manifest, Vec<u8>)> {
    let mut head = [0u8; MANIFEST_HEADER_LEN];
    let start = if magic_read {
        head[..4].copy_from_slice(&MANIFEST_MAGIC);
        4
    } else {
        0
    };
    read_exact_or(r, &mut head[start..], || "manifest header".into())?;
    let count = Manifest::decode_count(&head)?;
    if count > max_entries {
        return Err(Error::corrupt(format!(
            "manifest: {count} chunks is more than an image of this size can hold ({max_entries})"
        )));
    }
    let len =
        Manifest::encoded_len(count).ok_or_else(|| Error::corrupt("manifest size overflows"))?;
    let mut bytes = head.to_vec();
    bytes.extend(read_payload(r, len - MANIFEST_HEADER_LEN as u64, || {
        format!("manifest of {count} chunks")
    })?);
    let m = Manifest::decode(&bytes)?;
    Ok((m, bytes))
}

/// The most chunks an image for a target of `min_target_size` bytes can have: every chunk
/// covers at least one 512-byte sector (the smallest FAT cluster), plus slack for tables.
pub fn plausible_chunks(min_target_size: u64) -> u64 {
    (min_target_size / 512).saturating_add(64)
}

/// Read one chunk header at the current position and check it is exactly `expected`'s
/// (the payload is left to read).
pub fn read_expected_header(r: &mut impl Read, expected: &ManifestEntry) -> Result<ChunkHeader> {
    let what = expected.header.describe();
    let mut hb = [0u8; CHUNK_HEADER_LEN];
    read_exact_or(r, &mut hb, || format!("{what}: header"))?;
    let header = ChunkHeader::decode(&hb, &format!("where {what} was expected"))?;
    if header != expected.header {
        return Err(Error::corrupt(format!(
            "{what}: found chunk {} (disk offset {}) that does not match the manifest: chunks swapped or replaced",
            header.index, header.disk_offset
        )));
    }
    Ok(header)
}

/// Read one chunk record at the current position and check it is exactly `expected`.
pub fn read_expected_chunk(r: &mut impl Read, expected: &ManifestEntry) -> Result<ChunkRecord> {
    let what = expected.header.describe();
    let header = read_expected_header(r, expected)?;
    let payload = read_payload(r, u64::from(header.comp_len), || format!("{what}: payload"))?;
    Ok(ChunkRecord {
        header,
        image_offset: expected.image_offset,
        payload,
    })
}

/// A front-to-back reader of one image.
pub struct ImageReader<R> {
    r: R,
    pos: u64,
    pub preamble: Preamble,
    pub preamble_bytes: Vec<u8>,
    pub meta: ImageMeta,
    pub sealed: Option<SealedHead>,
    next: u64,
    seen: Vec<ManifestEntry>,
    trailing: Option<(Manifest, Vec<u8>)>,
    finished: bool,
    /// Data and table chunks longer than this come back without their payload, which the
    /// caller then streams with [`ImageReader::deferred_payload`] (addition: memory that
    /// does not grow with the chunk size).
    defer_over: u64,
    /// Payload bytes of the last chunk not yet read by the caller.
    pending: u64,
}

impl<R: Read> ImageReader<R> {
    /// Read the preamble (and, sealed, the manifest and signature block).
    pub fn open(mut r: R) -> Result<Self> {
        let (preamble, preamble_bytes, meta) = read_preamble(&mut r)?;
        let mut pos = preamble_bytes.len() as u64;
        let sealed = if preamble.layout == Layout::Sealed {
            let (manifest, manifest_bytes) =
                read_manifest(&mut r, false, plausible_chunks(meta.min_target_size))?;
            let mut sb = [0u8; SIGNATURE_BLOCK_LEN];
            read_exact_or(&mut r, &mut sb, || "signature block".into())?;
            let signature = SignatureBlock::decode(&sb)?;
            pos += manifest_bytes.len() as u64 + SIGNATURE_BLOCK_LEN as u64;
            if let Some(first) = manifest.entries.first() {
                if first.image_offset != pos {
                    return Err(Error::corrupt(format!(
                        "manifest: chunk 0 placed at image offset {}, expected {pos}",
                        first.image_offset
                    )));
                }
            }
            Some(SealedHead {
                manifest,
                manifest_bytes,
                signature,
            })
        } else {
            None
        };
        Ok(ImageReader {
            r,
            pos,
            preamble,
            preamble_bytes,
            meta,
            sealed,
            next: 0,
            seen: Vec::new(),
            trailing: None,
            finished: false,
            defer_over: u64::MAX,
            pending: 0,
        })
    }

    /// From now on, data and table chunks with more than `raw_len` disk bytes are returned
    /// with an empty payload: the caller must read it all from [`Self::deferred_payload`]
    /// before asking for the next chunk.
    pub fn defer_payloads_over(&mut self, raw_len: u64) {
        self.defer_over = raw_len;
    }

    /// True when `header`'s payload was left for [`Self::deferred_payload`].
    pub fn is_deferred(&self, header: &ChunkHeader) -> bool {
        header.kind != super::ChunkKind::Zero && header.raw_len > self.defer_over
    }

    /// The payload of the chunk just returned, when deferred: exactly its `comp_len` bytes
    /// (fewer if the image ends early: the caller must check the count).
    pub fn deferred_payload(&mut self) -> io::Take<&mut R> {
        let n = std::mem::take(&mut self.pending);
        (&mut self.r).take(n)
    }

    /// Bytes consumed so far.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// The manifest: from the front (sealed) or, after the last chunk, from the end.
    pub fn manifest(&self) -> Option<(&Manifest, &[u8])> {
        if let Some(s) = &self.sealed {
            return Some((&s.manifest, &s.manifest_bytes));
        }
        self.trailing.as_ref().map(|(m, b)| (m, b.as_slice()))
    }

    /// The payload of `header`, read now, or left pending when deferred.
    fn payload_of(&mut self, header: &ChunkHeader) -> Result<Vec<u8>> {
        if self.is_deferred(header) {
            self.pending = u64::from(header.comp_len);
            return Ok(Vec::new());
        }
        read_payload(&mut self.r, u64::from(header.comp_len), || {
            format!("{}: payload", header.describe())
        })
    }

    fn after(&self) -> String {
        match self.seen.last() {
            Some(e) => format!(
                "after chunk {} (disk offset {})",
                e.header.index, e.header.disk_offset
            ),
            None => "before the first chunk".into(),
        }
    }

    fn expected_next(&self) -> String {
        match &self.sealed {
            Some(s) => match s.manifest.entries.get(self.next as usize) {
                Some(e) => format!("expected {}", e.header.describe()),
                None => "expected the end record".into(),
            },
            None => format!("expected chunk {} or the end records", self.next),
        }
    }

    /// The next chunk, or `None` once the end records have been read and checked.
    pub fn next_chunk(&mut self) -> Result<Option<ChunkRecord>> {
        if self.finished {
            return Ok(None);
        }
        if self.pending != 0 {
            return Err(Error::invalid(
                "the previous chunk's payload was not read (a caller bug)",
            ));
        }
        let mut magic = [0u8; 4];
        let (after, expected) = (self.after(), self.expected_next());
        read_exact_or(&mut self.r, &mut magic, || {
            format!("image ends {after}; {expected}")
        })?;
        match magic {
            CHUNK_MAGIC => {
                let rec = if let Some(s) = &self.sealed {
                    let Some(entry) = s.manifest.entries.get(self.next as usize).copied() else {
                        return Err(Error::corrupt(format!(
                            "more chunks than the manifest lists ({after})"
                        )));
                    };
                    if entry.image_offset != self.pos {
                        return Err(Error::corrupt(format!(
                            "{}: not at the image offset the manifest gives",
                            entry.header.describe()
                        )));
                    }
                    let mut chained = io::Cursor::new(CHUNK_MAGIC).chain(&mut self.r);
                    let header = read_expected_header(&mut chained, &entry)?;
                    let payload = self.payload_of(&header)?;
                    ChunkRecord {
                        header,
                        image_offset: entry.image_offset,
                        payload,
                    }
                } else {
                    let mut hb = [0u8; CHUNK_HEADER_LEN];
                    hb[..4].copy_from_slice(&CHUNK_MAGIC);
                    read_exact_or(&mut self.r, &mut hb[4..], || {
                        format!("chunk header {after}")
                    })?;
                    let header = ChunkHeader::decode(&hb, &after)?;
                    if header.index != self.next {
                        return Err(Error::corrupt(format!(
                            "{}: found where chunk {} should be ({after}): chunks out of order or missing",
                            header.describe(),
                            self.next
                        )));
                    }
                    let payload = self.payload_of(&header)?;
                    ChunkRecord {
                        header,
                        image_offset: self.pos,
                        payload,
                    }
                };
                self.pos += CHUNK_HEADER_LEN as u64 + u64::from(rec.header.comp_len);
                self.next += 1;
                self.seen.push(ManifestEntry {
                    header: rec.header,
                    image_offset: rec.image_offset,
                });
                Ok(Some(rec))
            }
            MANIFEST_MAGIC if self.sealed.is_none() => {
                let manifest_offset = self.pos;
                let (m, bytes) = read_manifest(
                    &mut self.r,
                    true,
                    plausible_chunks(self.meta.min_target_size),
                )?;
                if m.entries != self.seen {
                    return Err(Error::corrupt(format!(
                        "the manifest at the end lists {} chunks that differ from the {} chunks read",
                        m.entries.len(),
                        self.seen.len()
                    )));
                }
                self.pos += bytes.len() as u64;
                let footer = self.read_footer()?;
                if footer.manifest_offset != manifest_offset
                    || footer.manifest_len != bytes.len() as u64
                {
                    return Err(Error::corrupt(
                        "image footer does not point at the manifest",
                    ));
                }
                self.trailing = Some((m, bytes));
                self.finished = true;
                Ok(None)
            }
            FOOTER_MAGIC if self.sealed.is_some() => {
                let count = self
                    .sealed
                    .as_ref()
                    .map(|s| s.manifest.entries.len() as u64)
                    .unwrap_or(0);
                if self.next != count {
                    return Err(Error::new(
                        ErrorKind::Truncated,
                        format!("image ends {after}; {expected}"),
                    ));
                }
                let footer = self.read_footer_with_magic()?;
                if footer.manifest_offset != self.preamble_bytes.len() as u64 {
                    return Err(Error::corrupt(
                        "image footer does not point at the manifest",
                    ));
                }
                self.finished = true;
                Ok(None)
            }
            _ => Err(Error::corrupt(format!(
                "unknown record {after} at image offset {}; {expected}",
                self.pos
            ))),
        }
    }

    fn read_footer(&mut self) -> Result<Footer> {
        let mut magic = [0u8; 4];
        read_exact_or(&mut self.r, &mut magic, || {
            "image footer (image truncated after the manifest)".into()
        })?;
        if magic != FOOTER_MAGIC {
            return Err(Error::corrupt("image footer: bad magic"));
        }
        self.read_footer_with_magic()
    }

    fn read_footer_with_magic(&mut self) -> Result<Footer> {
        let mut b = [0u8; FOOTER_LEN];
        b[..4].copy_from_slice(&FOOTER_MAGIC);
        read_exact_or(&mut self.r, &mut b[4..], || "image footer".into())?;
        let f = Footer::decode(&b)?;
        if f.chunk_count != self.next {
            return Err(Error::corrupt(format!(
                "image footer counts {} chunks, the image has {}",
                f.chunk_count, self.next
            )));
        }
        self.pos += FOOTER_LEN as u64;
        Ok(f)
    }
}
