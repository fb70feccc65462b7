//! BI (seed 001): download an image into the backup area, chunk by chunk, each chunk
//! checked before it counts.
//!
//! 1. The image's head (preamble, manifest, signature) is read with range requests and
//!    its signature checked against the trusted keys, as a deploy does; an unsigned image
//!    only with the lab setting `unsigned_images = yes`.
//! 2. The manifest's digest names the image: an area that holds part of the same image
//!    resumes at its `verified_bytes` (always a chunk boundary); any other image starts
//!    from byte 0.
//! 3. The head bytes are written from the head that was checked (not fetched twice); the
//!    chunks come in one range request from the resume point; each chunk's header must be
//!    the manifest's entry, its CRC32 and its decompressed SHA-256 must match, and only
//!    then is it written and, every few MiB, `commit(verified_bytes)` (synced first).
//! 4. At the end the whole area is read back through the engine's own `verify` (every
//!    chunk, manifest and signature again) before it is marked complete.
//!
//! A lost connection is resumed by the HTTP reader itself (Range from the byte it reached);
//! a longer outage ends this try, and the next one (or the next boot: the task is still
//! the current one) starts from the committed bytes.

use std::io::Read;

use anyhow::Context;
use imgengine::deploy;
use imgengine::format::layout::CHUNK_HEADER_LEN;
use imgengine::format::{self, ChunkHeader, ChunkRecord, Layout};
use imgengine::io::progress::Progress;
use imgengine::sign::VerifyingKey;
use imgengine::source::{HttpConfig, Location, Source};
use imgengine::ErrorKind;
use protocol::ImageStamp;

use super::area::Area;

/// Commit the area at least every this many bytes.
pub const COMMIT_EVERY: u64 = 4 << 20;

/// What a BI did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BiSummary {
    /// The image's size in the area.
    pub size: u64,
    /// Where this run started (0: from the beginning).
    pub resumed_from: u64,
    /// Bytes read from the network by this run.
    pub fetched: u64,
    /// The area already held this image whole: nothing was fetched.
    pub already: bool,
    pub digest: String,
}

fn net(e: std::io::Error, what: &str) -> imgengine::Error {
    imgengine::Error::new(ErrorKind::Network, what.to_string()).with_source(e)
}

fn read_exactly(r: &mut dyn Read, n: usize, what: &str) -> imgengine::Result<Vec<u8>> {
    let mut b = vec![0u8; n];
    r.read_exact(&mut b).map_err(|e| net(e, what))?;
    Ok(b)
}

/// Check the head's signature as a deploy does: a trusted key when there are any, else
/// (lab) only its own; unsigned only when `keys` is empty.
fn check_trust(head: &format::ImageHead, keys: &[VerifyingKey]) -> anyhow::Result<()> {
    match (head.layout, &head.signature) {
        (Layout::Sealed, Some(s)) => {
            imgengine::sign::verify_image(&head.preamble_bytes, &head.manifest_bytes, s, keys)
                .map_err(anyhow::Error::new)
                .context("checking the image's signature")?;
        }
        _ if keys.is_empty() => {}
        _ => anyhow::bail!(
            "the image is not signed and this device only stores signed images: seal it with `img -sign IMAGE -key=KEYFILE`"
        ),
    }
    Ok(())
}

/// Fetch `src` into `area` as `stamp` (see the module docs). `keys` empty means the lab
/// setting allows unsigned images (the caller decided).
pub fn fetch(
    area: &mut dyn Area,
    src: &Location,
    http: &HttpConfig,
    keys: &[VerifyingKey],
    stamp: &ImageStamp,
    progress: &dyn Progress,
    log: &dyn Fn(String),
) -> anyhow::Result<BiSummary> {
    let source = Source::open(src, http).map_err(anyhow::Error::new)?;
    if !source.supports_ranges() || source.len().is_none() {
        anyhow::bail!(
            "{src}: the server does not answer range requests with a known size, which a download into the backup partition needs (to check the head first and to resume)"
        );
    }
    let head = format::fetch_head(&source)
        .map_err(anyhow::Error::new)
        .context("reading the image's head")?;
    check_trust(&head, keys)?;
    let digest = head.manifest.digest();
    let size = head.image_len;
    let entries = &head.manifest.entries;
    let first_off = entries
        .first()
        .map(|e| e.image_offset)
        .unwrap_or(head.preamble_bytes.len() as u64);
    let chunks_end = entries
        .last()
        .map(|e| e.image_offset + e.record_len())
        .unwrap_or(first_off);
    // The bytes before the first chunk and after the last, rebuilt from the checked head.
    let mut head_bytes = head.preamble_bytes.clone();
    let mut tail_bytes = Vec::new();
    match head.layout {
        Layout::Sealed => {
            head_bytes.extend_from_slice(&head.manifest_bytes);
            if let Some(s) = &head.signature {
                head_bytes.extend_from_slice(&s.encode());
            }
            // The sealed layout ends with a footer pointing back at the manifest.
            tail_bytes.extend_from_slice(
                &format::layout::Footer {
                    manifest_offset: head.preamble_bytes.len() as u64,
                    manifest_len: head.manifest_bytes.len() as u64,
                    chunk_count: entries.len() as u64,
                }
                .encode(),
            );
        }
        Layout::Streaming => {
            tail_bytes.extend_from_slice(&head.manifest_bytes);
            tail_bytes.extend_from_slice(
                &format::layout::Footer {
                    manifest_offset: chunks_end,
                    manifest_len: head.manifest_bytes.len() as u64,
                    chunk_count: entries.len() as u64,
                }
                .encode(),
            );
        }
    }
    if head_bytes.len() as u64 != first_off || chunks_end + tail_bytes.len() as u64 != size {
        anyhow::bail!("{src}: the image's parts do not add up to its size ({size} bytes): refused");
    }
    let cap = area.capacity();
    if size > cap {
        anyhow::bail!(
            "{} {} is {size} bytes and {} holds at most {cap}: convert the device again with a larger backup partition",
            stamp.name,
            stamp.version,
            area.describe()
        );
    }

    let st = area.status()?;
    if st.holds(&digest) && st.size == size {
        log(format!(
            "{} already holds {} {} (manifest {}): nothing to fetch",
            area.describe(),
            stamp.name,
            stamp.version,
            &digest[..12]
        ));
        return Ok(BiSummary {
            size,
            already: true,
            digest,
            ..Default::default()
        });
    }
    let same = st.digest.as_deref() == Some(digest.as_str()) && st.size == size;
    // Resume only at a chunk boundary the area committed.
    let mut pos = if same {
        let v = st.verified_bytes;
        if v == first_off || v == chunks_end || entries.iter().any(|e| e.image_offset == v) {
            v
        } else {
            0
        }
    } else {
        0
    };
    if pos == 0 {
        if st.image.is_some() {
            log(format!(
                "{} held {}: it is replaced by {} {}",
                area.describe(),
                st.describe(),
                stamp.name,
                stamp.version
            ));
        }
        area.begin(stamp, &digest, size)?;
        area.write_at(0, &head_bytes)?;
        area.commit(first_off)?;
        pos = first_off;
    } else {
        log(format!(
            "resuming the download into {} at byte {pos} of {size}",
            area.describe()
        ));
    }
    let resumed_from = if same { st.verified_bytes } else { 0 };
    progress.begin("downloading into the backup partition", Some(size));
    progress.advance(pos);
    let before = source.bytes_fetched();
    if pos < chunks_end {
        let k = entries
            .iter()
            .position(|e| e.image_offset == pos)
            .expect("pos is a chunk boundary");
        let mut body = source
            .read_range(pos, chunks_end - pos)
            .map_err(anyhow::Error::new)?;
        let mut since_commit = 0u64;
        for e in &entries[k..] {
            let hb = read_exactly(&mut body, CHUNK_HEADER_LEN, "reading a chunk header")
                .map_err(anyhow::Error::new)?;
            let hdr: &[u8; CHUNK_HEADER_LEN] = hb.as_slice().try_into().expect("header length");
            let header = ChunkHeader::decode(hdr, &format!("at image offset {}", e.image_offset))
                .map_err(anyhow::Error::new)?;
            let payload = read_exactly(
                &mut body,
                header.comp_len as usize,
                "reading a chunk's payload",
            )
            .map_err(anyhow::Error::new)?;
            let rec = ChunkRecord {
                header,
                image_offset: e.image_offset,
                payload: payload.clone(),
            };
            deploy::verify_chunk(rec, &head.manifest)
                .map_err(anyhow::Error::new)
                .with_context(|| {
                    format!(
                        "{src}: chunk {} failed its check: nothing of it is stored",
                        e.header.index
                    )
                })?;
            area.write_at(e.image_offset, &hb)?;
            area.write_at(e.image_offset + CHUNK_HEADER_LEN as u64, &payload)?;
            let n = e.record_len();
            pos = e.image_offset + n;
            since_commit += n;
            progress.advance(n);
            if since_commit >= COMMIT_EVERY {
                area.commit(pos)?;
                since_commit = 0;
            }
        }
        area.commit(pos)?;
    }
    if !tail_bytes.is_empty() {
        area.write_at(chunks_end, &tail_bytes)?;
        area.commit(size)?;
        progress.advance(tail_bytes.len() as u64);
    }
    progress.end();
    let fetched = source.bytes_fetched() - before;
    // The whole area read back and checked again before it counts as a backup.
    let back = verify_source(&area.source()?, keys, &imgengine::io::progress::NoProgress)
        .context("reading the backup back: it is fetched again at the next try")?;
    if back != digest {
        anyhow::bail!("the backup read back is not the image that was fetched");
    }
    area.finish()?;
    log(format!(
        "{} {} stored in {} and verified ({size} bytes, {fetched} fetched now{})",
        stamp.name,
        stamp.version,
        area.describe(),
        if resumed_from > 0 {
            format!(", resumed at byte {resumed_from}")
        } else {
            String::new()
        }
    ));
    Ok(BiSummary {
        size,
        resumed_from,
        fetched,
        already: false,
        digest,
    })
}

/// Check an image on a range-capable source without writing anything: its head and
/// signature (as [`fetch`] does), then every chunk against the manifest (header, CRC32,
/// SHA-256), in image order. Returns the manifest digest.
pub fn verify_source(
    source: &Source,
    keys: &[VerifyingKey],
    progress: &dyn Progress,
) -> anyhow::Result<String> {
    let head = format::fetch_head(source)
        .map_err(anyhow::Error::new)
        .context("reading the image's head")?;
    check_trust(&head, keys)?;
    let entries = &head.manifest.entries;
    let total: u64 = entries.iter().map(|e| e.record_len()).sum();
    progress.begin("checking the backup", Some(total));
    if let (Some(first), Some(last)) = (entries.first(), entries.last()) {
        let end = last.image_offset + last.record_len();
        let mut body = source
            .read_range(first.image_offset, end - first.image_offset)
            .map_err(anyhow::Error::new)?;
        let mut pos = first.image_offset;
        for e in entries {
            if e.image_offset != pos {
                anyhow::bail!(
                    "manifest: chunk {} is not where the previous one ends",
                    e.header.index
                );
            }
            let hb = read_exactly(&mut body, CHUNK_HEADER_LEN, "reading a chunk header")
                .map_err(anyhow::Error::new)?;
            let hdr: &[u8; CHUNK_HEADER_LEN] = hb.as_slice().try_into().expect("header length");
            let header = ChunkHeader::decode(hdr, &format!("at image offset {pos}"))
                .map_err(anyhow::Error::new)?;
            let payload = read_exactly(
                &mut body,
                header.comp_len as usize,
                "reading a chunk's payload",
            )
            .map_err(anyhow::Error::new)?;
            deploy::verify_chunk(
                ChunkRecord {
                    header,
                    image_offset: pos,
                    payload,
                },
                &head.manifest,
            )
            .map_err(anyhow::Error::new)?;
            pos += e.record_len();
            progress.advance(e.record_len());
        }
    }
    progress.end();
    Ok(head.manifest.digest())
}
