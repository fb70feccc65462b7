//! A `Read + Seek (+ Write)` view of `[base, base + len)` on anything that can [`ReadAt`].
//!
//! The `ntfs` and `gpt` crates want a seekable stream; the engine reads devices through
//! positioned reads so that a `&[u8]` (fuzzing, tests) and a block device look the same.
//! Writing is refused: these parsers only ever look.

use std::io::{self, Read, Seek, SeekFrom, Write};

use crate::io::ReadAt;

pub(crate) struct Window<'a, D: ReadAt + ?Sized> {
    dev: &'a D,
    base: u64,
    len: u64,
    pos: u64,
    zero_padded: bool,
}

impl<'a, D: ReadAt + ?Sized> Window<'a, D> {
    pub(crate) fn new(dev: &'a D, base: u64, len: u64) -> Self {
        Window {
            dev,
            base,
            len,
            pos: 0,
            zero_padded: false,
        }
    }

    /// Reads past the end of the window return zeros instead of end-of-file.
    ///
    /// For the `ntfs` crate: it parses structures with binrw, and its conversion of binrw
    /// errors hits `unreachable!()` for an I/O error wrapped in binrw's parse context, so
    /// an end-of-file in the middle of a structure (a truncated volume, a data run pointing
    /// past the partition) would panic instead of returning an error. Zeros past the end
    /// never validate as NTFS structures, so the crate reports them as bad data instead;
    /// the used map itself is clipped to the partition.
    pub(crate) fn zero_padded(mut self) -> Self {
        self.zero_padded = true;
        self
    }
}

impl<D: ReadAt + ?Sized> std::fmt::Debug for Window<'_, D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Window(base={}, len={}, pos={})",
            self.base, self.len, self.pos
        )
    }
}

impl<D: ReadAt + ?Sized> Read for Window<'_, D> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.len {
            if !self.zero_padded {
                return Ok(0);
            }
            buf.fill(0);
            self.pos = self.pos.saturating_add(buf.len() as u64);
            return Ok(buf.len());
        }
        let n = (buf.len() as u64).min(self.len - self.pos) as usize;
        let abs = self
            .base
            .checked_add(self.pos)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidInput, "offset overflows u64"))?;
        self.dev.read_exact_at(&mut buf[..n], abs)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl<D: ReadAt + ?Sized> Seek for Window<'_, D> {
    fn seek(&mut self, pos: SeekFrom) -> io::Result<u64> {
        let new = match pos {
            SeekFrom::Start(p) => Some(p),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        let new = new.ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "seek before start or past u64")
        })?;
        self.pos = new;
        Ok(new)
    }
}

impl<D: ReadAt + ?Sized> Write for Window<'_, D> {
    fn write(&mut self, _buf: &[u8]) -> io::Result<usize> {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            "read-only view of the disk",
        ))
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_inside_the_window_only() {
        let data: Vec<u8> = (0..100u8).collect();
        let mut w = Window::new(data.as_slice(), 10, 20);
        let mut buf = [0u8; 8];
        w.seek(SeekFrom::Start(16)).unwrap();
        assert_eq!(w.read(&mut buf).unwrap(), 4);
        assert_eq!(&buf[..4], &[26, 27, 28, 29]);
        assert_eq!(w.read(&mut buf).unwrap(), 0);
        assert_eq!(w.seek(SeekFrom::End(-2)).unwrap(), 18);
        assert!(w.seek(SeekFrom::Current(-100)).is_err());
        assert!(w.write(&[1]).is_err());
        let mut p = Window::new(data.as_slice(), 90, 10).zero_padded();
        let mut big = [1u8; 16];
        assert_eq!(p.read(&mut big).unwrap(), 10);
        assert_eq!(p.read(&mut big).unwrap(), 16);
        assert_eq!(big, [0; 16]);
    }
}
