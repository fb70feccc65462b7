//! Step 1 of a deploy: the source opened once, its first bytes read once, and what they
//! say passed on to everything after. An image in our format has its head read (the
//! preamble with the image's metadata, and the manifest and signature when they are known
//! up front) and trusted or refused before any target is opened; anything else is a raw
//! disk image, read through a [`DecompressReader`] that recognises its own compression.
//!
//! A source that can be read at an offset (a file, an HTTP server answering Range
//! requests) has its head read with a few small range requests: a streaming image's
//! manifest sits at its end, and knowing it up front is what makes resume possible. Any
//! other source (a pipe, a server without Range) is read once, front to back, and the head
//! is simply its first records.

use std::io::{BufReader, Read};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::{self, ImageHead, ImageMeta, ImageReader, Layout};
use crate::io::{Compressor, DecompressReader, PeekReader, BUFFER_SIZE};
use crate::sign::{self, VerifyingKey};
use crate::source::{HttpConfig, Location, Source};

/// The sequential read of a source, through one buffer.
pub(super) type Buffered = BufReader<Box<dyn Read + Send>>;
/// The same with its first bytes kept for a second look, as the image reader sees it.
pub(super) type SourceStream = PeekReader<Buffered>;

/// An image source, opened and identified: what a deploy learned before writing anything.
///
/// [`OpenedImage::open`] reads the head; [`OpenedImage::meta`] shows what the image says
/// of itself (the models it is meant for, its size) so the caller can check it against
/// the device; [`OpenedImage::deploy`] then goes on from there without opening or reading
/// the head again.
pub struct OpenedImage {
    pub(super) source: Source,
    pub(super) content: Content,
}

/// What the first bytes said.
#[allow(clippy::large_enum_variant)] // one per deploy, never copied: its size does not matter
pub(super) enum Content {
    Image(Head),
    Raw(DecompressReader<Buffered>),
}

/// The head of an image in our format.
pub(super) struct Head {
    pub head: ImageHead,
    /// The manifest was read before the chunks (sealed, or on a range-capable source).
    pub manifest_known: bool,
    /// The stream, positioned after the head, when the head came from it.
    pub reader: Option<ImageReader<SourceStream>>,
}

impl OpenedImage {
    /// Open `src` and read what it holds: for an image in our format, its head (with range
    /// requests when the source allows them), for a raw image, its compression.
    pub fn open(src: &Location, http: &HttpConfig) -> Result<OpenedImage> {
        Self::from_source(Source::open(src, http)?, true)
    }

    /// Open an already made source (e.g. [`Source::from_ranged`]) as [`OpenedImage::open`]
    /// opens a location.
    pub fn open_source(source: Source) -> Result<OpenedImage> {
        Self::from_source(source, true)
    }

    /// `use_ranges` false: read the source front to back even if it could do ranges
    /// (`verify` reads every byte anyway).
    pub(super) fn from_source(mut source: Source, use_ranges: bool) -> Result<OpenedImage> {
        if use_ranges && source.supports_ranges() && source.len().is_some() {
            let first = format::fetch_first(&source)?;
            if first.starts_with(&format::MAGIC) {
                let head = format::fetch_head_after(&source, first)?;
                return Ok(OpenedImage {
                    source,
                    content: Content::Image(Head {
                        head,
                        manifest_known: true,
                        reader: None,
                    }),
                });
            }
            // A raw image is read in sequence on every source.
        }
        let loc = source.location().clone();
        let peek = Compressor::SNIFF_LEN.max(format::MAGIC.len());
        let stream = PeekReader::new(
            BufReader::with_capacity(BUFFER_SIZE, source.stream()?),
            peek,
        )
        .ctx(|| format!("reading {loc}"))?;
        if !stream.peek().starts_with(&format::MAGIC) {
            let raw = DecompressReader::new(stream).ctx(|| format!("starting zstd on {loc}"))?;
            return Ok(OpenedImage {
                source,
                content: Content::Raw(raw),
            });
        }
        let r = ImageReader::open(stream)?;
        let sealed = r.sealed.as_ref();
        let head = ImageHead {
            preamble_bytes: r.preamble_bytes.clone(),
            meta: r.meta.clone(),
            layout: r.preamble.layout,
            manifest: sealed.map(|s| s.manifest.clone()).unwrap_or_default(),
            manifest_bytes: sealed.map(|s| s.manifest_bytes.clone()).unwrap_or_default(),
            signature: sealed.map(|s| s.signature),
            image_len: 0,
        };
        Ok(OpenedImage {
            source,
            content: Content::Image(Head {
                manifest_known: head.layout == Layout::Sealed,
                head,
                reader: Some(r),
            }),
        })
    }

    /// What the image says of itself; `None` for a raw disk image, which says nothing.
    pub fn meta(&self) -> Option<&ImageMeta> {
        match &self.content {
            Content::Image(h) => Some(&h.head.meta),
            Content::Raw(_) => None,
        }
    }

    /// Where it is read from.
    pub fn location(&self) -> &Location {
        self.source.location()
    }
}

/// Check the signature of a sealed head against `trusted` (or only its own key when
/// `trusted` is empty); refuse unsigned images when `trusted` is not empty. Returns the
/// signer's key id.
pub(super) fn check_trust(head: &ImageHead, trusted: &[VerifyingKey]) -> Result<Option<String>> {
    match (head.layout, &head.signature) {
        (Layout::Sealed, Some(s)) => Ok(Some(
            sign::verify_image(&head.preamble_bytes, &head.manifest_bytes, s, trusted)?
                .to_string(),
        )),
        _ if trusted.is_empty() => Ok(None),
        _ => Err(Error::new(
            ErrorKind::Signature,
            "image is not signed (streaming layout) and this agent only deploys signed images: seal it with `img -sign IMAGE -key=KEYFILE`",
        )),
    }
}

/// The chunks in sequence after a head read by range requests: the stream from byte 0,
/// whose head must be the one already read and trusted.
pub(super) fn reopen(source: &mut Source, head: &ImageHead) -> Result<ImageReader<SourceStream>> {
    let loc = source.location().clone();
    let stream = PeekReader::new(BufReader::with_capacity(BUFFER_SIZE, source.stream()?), 0)
        .ctx(|| format!("reading {loc}"))?;
    let r = ImageReader::open(stream)?;
    let same_manifest = r
        .sealed
        .as_ref()
        .is_none_or(|s| s.manifest_bytes == head.manifest_bytes);
    if r.preamble_bytes != head.preamble_bytes || !same_manifest {
        return Err(Error::corrupt(format!(
            "{loc}: the image changed while it was being read"
        )));
    }
    Ok(r)
}
