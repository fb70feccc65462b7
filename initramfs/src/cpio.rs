//! The "newc" cpio format the kernel unpacks into its initial root file system
//! (Documentation/driver-api/early-userspace/buffer-format.rst).
//!
//! Every entry is a 110-byte ASCII header (`070701` and thirteen 8-digit hex fields), the
//! NUL-terminated name, padding to 4 bytes, the data, padding to 4 bytes; the archive ends
//! with an entry named `TRAILER!!!`. Reproducibility comes from the caller: this writer takes
//! the inode number, owner and mtime as given and adds nothing from the build machine.

use std::io::{self, Write};

/// `S_IFMT` kinds, as the kernel's initramfs unpacker reads them from `c_mode`.
pub const S_IFDIR: u32 = 0o040000;
pub const S_IFREG: u32 = 0o100000;
pub const S_IFLNK: u32 = 0o120000;
pub const S_IFCHR: u32 = 0o020000;

/// One archive member as it is written: everything the header carries.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub ino: u32,
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub nlink: u32,
    pub mtime: u32,
    pub filesize: u32,
    pub rdev_major: u32,
    pub rdev_minor: u32,
}

/// Writes newc entries to `out`, keeping the running offset for the 4-byte alignment.
pub struct NewcWriter<W: Write> {
    out: W,
    offset: u64,
}

impl<W: Write> NewcWriter<W> {
    pub fn new(out: W) -> Self {
        NewcWriter { out, offset: 0 }
    }

    /// Write one entry; `data` must be `h.filesize` bytes (the symlink target for links).
    pub fn entry(&mut self, name: &str, h: &Header, data: &[u8]) -> io::Result<()> {
        if data.len() as u64 != u64::from(h.filesize) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "cpio entry {name}: header says {} bytes, {} given",
                    h.filesize,
                    data.len()
                ),
            ));
        }
        let namesize = u32::try_from(name.len() + 1)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "cpio entry name too long"))?;
        // devmajor/devminor name the device the file lived on; 0 for all, like `cpio
        // --reproducible`. The check field is only used by the `070702` variant.
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            h.ino,
            h.mode,
            h.uid,
            h.gid,
            h.nlink,
            h.mtime,
            h.filesize,
            0,
            0,
            h.rdev_major,
            h.rdev_minor,
            namesize,
            0
        );
        self.put(header.as_bytes())?;
        self.put(name.as_bytes())?;
        self.put(&[0])?;
        self.pad()?;
        self.put(data)?;
        self.pad()
    }

    /// Write the `TRAILER!!!` entry and hand back the sink.
    pub fn finish(mut self) -> io::Result<W> {
        let h = Header {
            ino: 0,
            mode: 0,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            filesize: 0,
            rdev_major: 0,
            rdev_minor: 0,
        };
        self.entry("TRAILER!!!", &h, &[])?;
        Ok(self.out)
    }

    fn put(&mut self, b: &[u8]) -> io::Result<()> {
        self.out.write_all(b)?;
        self.offset += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> io::Result<()> {
        let n = (4 - (self.offset % 4) as usize) % 4;
        self.put(&[0u8; 3][..n])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_and_padding_follow_the_kernel_format() {
        let mut w = NewcWriter::new(Vec::new());
        let h = Header {
            ino: 1,
            mode: S_IFREG | 0o644,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            filesize: 3,
            rdev_major: 0,
            rdev_minor: 0,
        };
        w.entry("ab", &h, b"xyz").unwrap();
        let out = w.finish().unwrap();
        assert!(out.starts_with(b"07070100000001000081a4"));
        // 110 header + "ab\0" = 113, padded to 116; data 3 bytes padded to 120.
        assert_eq!(&out[110..113], b"ab\0");
        assert_eq!(&out[116..119], b"xyz");
        assert_eq!(&out[120..126], b"070701");
        assert_eq!(out.len() % 4, 0);
        assert!(out.windows(10).any(|w| w == b"TRAILER!!!"));
    }

    #[test]
    fn size_mismatch_is_refused() {
        let mut w = NewcWriter::new(Vec::new());
        let h = Header {
            ino: 1,
            mode: S_IFREG,
            uid: 0,
            gid: 0,
            nlink: 1,
            mtime: 0,
            filesize: 5,
            rdev_major: 0,
            rdev_minor: 0,
        };
        assert!(w.entry("a", &h, b"xy").is_err());
    }
}
