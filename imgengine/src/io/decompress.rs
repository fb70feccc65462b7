//! A reader that decompresses what it reads when the stream's first bytes are the magic
//! number of zstd, gzip or xz, and passes anything else through unchanged: a raw disk
//! image may come as `.img`, `.img.zst`, `.img.gz` or `.img.xz`, and the name of a file
//! (or a URL, or a pipe) is no evidence of what it holds. The stream is sniffed here and
//! nowhere else (the shape of coreos-installer's `src/io/compress.rs`).
//!
//! Concatenated frames and members are read as one stream, as the command-line tools
//! write and read them (`zstd`, `pigz`, `xz -T`).

use std::io::{self, BufReader, Read};

use super::PeekReader;

/// A compression a raw disk image may come in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compressor {
    Zstd,
    Gzip,
    Xz,
}

/// zstd frame magic (RFC 8878 §3.1.1).
const ZSTD_MAGIC: [u8; 4] = [0x28, 0xB5, 0x2F, 0xFD];
/// gzip member ID1, ID2 (RFC 1952 §2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1F, 0x8B];
/// xz stream header magic (xz file format §2.1.1.1).
const XZ_MAGIC: [u8; 6] = [0xFD, b'7', b'z', b'X', b'Z', 0x00];

impl Compressor {
    /// Bytes a [`PeekReader`] should hold for [`DecompressReader::new`]: the longest magic
    /// is 6 bytes, and a zstd frame header, which may carry the content size, is at most
    /// 18 (RFC 8878 §3.1.1.1).
    pub const SNIFF_LEN: usize = 18;

    /// What the first bytes of a stream say; `None`: not compressed (or not in a way we
    /// know, which is the same for a raw image).
    pub fn sniff(head: &[u8]) -> Option<Compressor> {
        if head.starts_with(&ZSTD_MAGIC) {
            Some(Compressor::Zstd)
        } else if head.starts_with(&GZIP_MAGIC) {
            Some(Compressor::Gzip)
        } else if head.starts_with(&XZ_MAGIC) {
            Some(Compressor::Xz)
        } else {
            None
        }
    }
}

enum Decoder<R: Read> {
    Plain(PeekReader<R>),
    Zstd(zstd::stream::read::Decoder<'static, BufReader<PeekReader<R>>>),
    Gzip(flate2::read::MultiGzDecoder<PeekReader<R>>),
    Xz(xz2::read::XzDecoder<PeekReader<R>>),
}

/// Reads `R` decompressed according to its own first bytes.
pub struct DecompressReader<R: Read> {
    decoder: Decoder<R>,
    content_len: Option<u64>,
}

impl<R: Read> DecompressReader<R> {
    /// Choose the decoder from what `source` peeked (it should have peeked
    /// [`Compressor::SNIFF_LEN`] bytes, fewer only when the stream is that short).
    pub fn new(source: PeekReader<R>) -> io::Result<Self> {
        let head = source.peek();
        let kind = Compressor::sniff(head);
        // zstd writes the content size into the first frame's header for files (not for a
        // pipe): an image too large for its target is then refused before a byte is written.
        let content_len = match kind {
            Some(Compressor::Zstd) => zstd::zstd_safe::get_frame_content_size(head).ok().flatten(),
            _ => None,
        };
        let decoder = match kind {
            None => Decoder::Plain(source),
            Some(Compressor::Zstd) => Decoder::Zstd(zstd::stream::read::Decoder::new(source)?),
            Some(Compressor::Gzip) => Decoder::Gzip(flate2::read::MultiGzDecoder::new(source)),
            Some(Compressor::Xz) => Decoder::Xz(xz2::read::XzDecoder::new_multi_decoder(source)),
        };
        Ok(DecompressReader {
            decoder,
            content_len,
        })
    }

    /// The compression found, `None` for a stream passed through.
    pub fn compressor(&self) -> Option<Compressor> {
        match self.decoder {
            Decoder::Plain(_) => None,
            Decoder::Zstd(_) => Some(Compressor::Zstd),
            Decoder::Gzip(_) => Some(Compressor::Gzip),
            Decoder::Xz(_) => Some(Compressor::Xz),
        }
    }

    /// The decompressed size when the stream declares it before its data (a zstd frame
    /// header with the content size); `None` otherwise, including for a plain stream,
    /// whose size is its source's.
    pub fn content_len(&self) -> Option<u64> {
        self.content_len
    }
}

impl<R: Read> Read for DecompressReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.decoder {
            Decoder::Plain(r) => r.read(buf),
            Decoder::Zstd(r) => r.read(buf),
            Decoder::Gzip(r) => r.read(buf),
            Decoder::Xz(r) => r.read(buf),
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    fn data() -> Vec<u8> {
        (0..300_000u32).map(|i| (i / 7 % 251) as u8).collect()
    }

    fn compressed(data: &[u8]) -> Vec<(Option<Compressor>, Vec<u8>)> {
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
        gz.write_all(data).unwrap();
        let mut xz = xz2::write::XzEncoder::new(Vec::new(), 1);
        xz.write_all(data).unwrap();
        vec![
            (None, data.to_vec()),
            (
                Some(Compressor::Zstd),
                zstd::bulk::compress(data, 3).unwrap(),
            ),
            (Some(Compressor::Gzip), gz.finish().unwrap()),
            (Some(Compressor::Xz), xz.finish().unwrap()),
        ]
    }

    fn open(bytes: &[u8]) -> DecompressReader<&[u8]> {
        DecompressReader::new(PeekReader::new(bytes, Compressor::SNIFF_LEN).unwrap()).unwrap()
    }

    #[test]
    fn each_format_is_sniffed_and_decoded() {
        let d = data();
        for (kind, bytes) in compressed(&d) {
            let mut r = open(&bytes);
            assert_eq!(r.compressor(), kind);
            let mut out = Vec::new();
            r.read_to_end(&mut out).unwrap();
            assert!(out == d, "{kind:?}");
        }
    }

    #[test]
    fn zstd_declares_its_content_size() {
        let d = data();
        for (kind, bytes) in compressed(&d) {
            let want = (kind == Some(Compressor::Zstd)).then_some(d.len() as u64);
            assert_eq!(open(&bytes).content_len(), want, "{kind:?}");
        }
    }

    #[test]
    fn magic_numbers() {
        assert_eq!(
            Compressor::sniff(&[0x28, 0xB5, 0x2F, 0xFD, 0]),
            Some(Compressor::Zstd)
        );
        assert_eq!(Compressor::sniff(&[0x1F, 0x8B]), Some(Compressor::Gzip));
        assert_eq!(
            Compressor::sniff(&[0xFD, b'7', b'z', b'X', b'Z', 0]),
            Some(Compressor::Xz)
        );
        assert_eq!(Compressor::sniff(b"\xEB\x58\x90MSDOS"), None);
        assert_eq!(Compressor::sniff(b"\x89IMG\r\n\x1a\n"), None);
        assert_eq!(Compressor::sniff(b""), None);
        assert_eq!(Compressor::sniff(&[0x1F]), None);
    }

    #[test]
    fn concatenated_members_read_as_one_stream() {
        let d = data();
        let (a, b) = d.split_at(100_000);
        let mut gz = Vec::new();
        for part in [a, b] {
            let mut e = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
            e.write_all(part).unwrap();
            gz.extend(e.finish().unwrap());
        }
        let mut zst = zstd::bulk::compress(a, 1).unwrap();
        zst.extend(zstd::bulk::compress(b, 1).unwrap());
        for bytes in [gz, zst] {
            let mut out = Vec::new();
            open(&bytes).read_to_end(&mut out).unwrap();
            assert!(out == d);
        }
    }

    #[test]
    fn damaged_compressed_stream_is_an_error() {
        let d = data();
        for (kind, mut bytes) in compressed(&d) {
            if kind.is_none() {
                continue;
            }
            let n = bytes.len();
            bytes[n / 2] ^= 0x55;
            bytes.truncate(n - 3);
            let mut out = Vec::new();
            assert!(open(&bytes).read_to_end(&mut out).is_err(), "{kind:?}");
        }
    }
}
