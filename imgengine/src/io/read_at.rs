//! Positioned reads from a device, a file or memory: the one way the partition-table and
//! file-system parsers look at a disk, so they can be fuzzed on plain byte slices.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;

/// Read exactly `buf.len()` bytes at `offset`; reading past the end is `UnexpectedEof`.
pub trait ReadAt {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

impl ReadAt for File {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(self, buf, offset)
    }
}

impl ReadAt for [u8] {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        let start =
            usize::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let end = start
            .checked_add(buf.len())
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        let src = self
            .get(start..end)
            .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
        buf.copy_from_slice(src);
        Ok(())
    }
}

impl ReadAt for Vec<u8> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.as_slice().read_exact_at(buf, offset)
    }
}

impl<T: ReadAt + ?Sized> ReadAt for &T {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        (**self).read_exact_at(buf, offset)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slice_reads_are_bounds_checked() {
        let data = vec![1u8, 2, 3, 4];
        let mut b = [0u8; 2];
        data.read_exact_at(&mut b, 2).unwrap();
        assert_eq!(b, [3, 4]);
        assert_eq!(
            data.read_exact_at(&mut b, 3).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
        assert_eq!(
            data.read_exact_at(&mut b, u64::MAX).unwrap_err().kind(),
            io::ErrorKind::UnexpectedEof
        );
    }
}
