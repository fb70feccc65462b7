//! A reader that lets the deploy look at the first bytes of a stream (to tell our format
//! from zstd, gzip, xz or a raw image by their magic numbers) and then read the stream
//! from byte 0 as if nothing had been consumed: a pipe cannot be rewound.

use std::io::{self, Read};

/// Wraps `R`, buffering up to the first `n` bytes for [`PeekReader::peek`].
pub struct PeekReader<R> {
    inner: R,
    head: Vec<u8>,
    pos: usize,
}

impl<R: Read> PeekReader<R> {
    /// Read up to `n` bytes from `inner` now (fewer only at end of stream).
    pub fn new(mut inner: R, n: usize) -> io::Result<Self> {
        let mut head = vec![0u8; n];
        let mut got = 0;
        while got < n {
            match inner.read(&mut head[got..]) {
                Ok(0) => break,
                Ok(k) => got += k,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        head.truncate(got);
        Ok(PeekReader {
            inner,
            head,
            pos: 0,
        })
    }

    /// The first bytes of the stream (shorter than asked only if the stream is).
    pub fn peek(&self) -> &[u8] {
        &self.head
    }
}

impl<R: Read> Read for PeekReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if self.pos < self.head.len() {
            let n = buf.len().min(self.head.len() - self.pos);
            buf[..n].copy_from_slice(&self.head[self.pos..self.pos + n]);
            self.pos += n;
            return Ok(n);
        }
        self.inner.read(buf)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peeked_bytes_are_read_again() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut p = PeekReader::new(&data[..], 8).unwrap();
        assert_eq!(p.peek(), &data[..8]);
        let mut out = Vec::new();
        p.read_to_end(&mut out).unwrap();
        assert_eq!(out, data);
    }

    #[test]
    fn short_stream_peeks_what_there_is() {
        let p = PeekReader::new(&[1u8, 2][..], 8).unwrap();
        assert_eq!(p.peek(), &[1, 2]);
    }
}
