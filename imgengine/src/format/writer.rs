//! Writing an image front to back onto any `Write`, pipes included: the streaming layout
//! (preamble, chunk records, manifest, footer) needs no seeking because the manifest is
//! built while the chunks go out and written last, with a footer that points back at it.
//! The sealed layout is written in one pass too, from a manifest known in advance.

use std::io::Write;

use super::layout::{ChunkHeader, Footer, Layout, Preamble, SignatureBlock, CHUNK_HEADER_LEN};
use super::manifest::{Manifest, ManifestEntry};
use super::ImageMeta;
use crate::error::{Error, IoContext, Result};
use crate::io::CountingWriter;

/// Writes one image record by record, keeping the offsets for the manifest.
pub struct ImageWriter<W: Write> {
    w: CountingWriter<W>,
    entries: Vec<ManifestEntry>,
    layout: Layout,
    preamble_len: u64,
    sealed_manifest: Option<Manifest>,
}

impl<W: Write> ImageWriter<W> {
    /// Start a streaming-layout image: writes the preamble.
    pub fn streaming(w: W, meta: &ImageMeta) -> Result<Self> {
        let mut w = CountingWriter::new(w);
        let pre = Preamble::new(Layout::Streaming, meta.to_json()?).encode();
        w.write_all(&pre)
            .ctx(|| "writing the image preamble".into())?;
        Ok(ImageWriter {
            w,
            entries: Vec::new(),
            layout: Layout::Streaming,
            preamble_len: pre.len() as u64,
            sealed_manifest: None,
        })
    }

    /// Start a sealed-layout image: preamble, `manifest` (whose image offsets must already be
    /// the sealed ones) and the signature block. The chunks written next must match it.
    pub fn sealed(
        w: W,
        preamble_bytes: &[u8],
        manifest_bytes: &[u8],
        signature: &SignatureBlock,
    ) -> Result<Self> {
        let mut w = CountingWriter::new(w);
        let manifest = Manifest::decode(manifest_bytes)?;
        w.write_all(preamble_bytes)
            .ctx(|| "writing the image preamble".into())?;
        w.write_all(manifest_bytes)
            .ctx(|| "writing the manifest".into())?;
        w.write_all(&signature.encode())
            .ctx(|| "writing the signature".into())?;
        Ok(ImageWriter {
            w,
            entries: Vec::new(),
            layout: Layout::Sealed,
            preamble_len: preamble_bytes.len() as u64,
            sealed_manifest: Some(manifest),
        })
    }

    /// Bytes written so far.
    pub fn position(&self) -> u64 {
        self.w.count()
    }

    /// Append chunk `header.index` (which must be the next index) with its payload.
    pub fn write_chunk(&mut self, header: &ChunkHeader, payload: &[u8]) -> Result<()> {
        let what = header.describe();
        if header.index != self.entries.len() as u64
            || payload.len() as u64 != u64::from(header.comp_len)
        {
            return Err(Error::invalid(format!(
                "{what}: written out of order or with a wrong payload length"
            )));
        }
        let entry = ManifestEntry {
            header: *header,
            image_offset: self.w.count(),
        };
        if let Some(m) = &self.sealed_manifest {
            if m.entries.get(self.entries.len()) != Some(&entry) {
                return Err(Error::invalid(format!(
                    "{what}: does not match the sealed manifest"
                )));
            }
        }
        self.w
            .write_all(&header.encode())
            .ctx(|| format!("writing {what}"))?;
        self.w
            .write_all(payload)
            .ctx(|| format!("writing {what}"))?;
        debug_assert_eq!(
            self.w.count(),
            entry.image_offset + CHUNK_HEADER_LEN as u64 + payload.len() as u64
        );
        self.entries.push(entry);
        Ok(())
    }

    /// Write the end records; returns the manifest, the image size and the writer.
    pub fn finish(mut self) -> Result<(Manifest, u64, W)> {
        let manifest = match self.layout {
            Layout::Streaming => {
                let manifest = Manifest {
                    entries: std::mem::take(&mut self.entries),
                };
                let bytes = manifest.encode();
                let footer = Footer {
                    manifest_offset: self.w.count(),
                    manifest_len: bytes.len() as u64,
                    chunk_count: manifest.entries.len() as u64,
                };
                self.w
                    .write_all(&bytes)
                    .ctx(|| "writing the manifest".into())?;
                self.w
                    .write_all(&footer.encode())
                    .ctx(|| "writing the image footer".into())?;
                manifest
            }
            Layout::Sealed => {
                let manifest = self.sealed_manifest.take().unwrap_or_default();
                if manifest.entries.len() != self.entries.len() {
                    return Err(Error::invalid(format!(
                        "sealed image: {} of {} chunks written",
                        self.entries.len(),
                        manifest.entries.len()
                    )));
                }
                let footer = Footer {
                    manifest_offset: self.preamble_len,
                    manifest_len: Manifest::encoded_len(manifest.entries.len() as u64).unwrap_or(0),
                    chunk_count: manifest.entries.len() as u64,
                };
                self.w
                    .write_all(&footer.encode())
                    .ctx(|| "writing the image footer".into())?;
                manifest
            }
        };
        self.w.flush().ctx(|| "flushing the image".into())?;
        let len = self.w.count();
        Ok((manifest, len, self.w.into_inner()))
    }
}
