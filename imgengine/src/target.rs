//! Where an image goes: a window `[base, base + len)` on a block device or a regular
//! (disk-image) file, written with positioned I/O so several threads can share one
//! `&Target`.
//!
//! Zero blocks are not written as data when they need not be: on a regular file they
//! become holes (`fallocate(FALLOC_FL_PUNCH_HOLE)`), on a block device `BLKZEROOUT` lets the
//! device zero them (thin provisioning, SSDs with deterministic read-after-trim). Either
//! way the result reads back as zeros; where neither works a plain zero write is used.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, FileTypeExt};
use std::path::{Path, PathBuf};

use crate::disk::{self, PartitionInfo};
use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::io::{ReadAt, WriteAt};

/// All block-device ioctls of the engine (`<linux/fs.h>`), in one place.
#[allow(unsafe_code)]
pub mod ioctl {
    use std::fs::File;
    use std::os::unix::io::AsRawFd;

    // BLKGETSIZE64 = _IOR(0x12, 114, size_t): device size in bytes.
    nix::ioctl_read!(blkgetsize64_raw, 0x12, 114, u64);
    // BLKSSZGET = _IO(0x12, 104), argument int *: logical sector size.
    nix::ioctl_read_bad!(
        blksszget_raw,
        nix::request_code_none!(0x12, 104),
        libc::c_int
    );
    // BLKZEROOUT = _IO(0x12, 127), argument uint64_t[2] = {start, len}: zero a byte range
    // (both multiples of the logical sector size).
    nix::ioctl_write_ptr_bad!(blkzeroout_raw, nix::request_code_none!(0x12, 127), [u64; 2]);
    // BLKDISCARD = _IO(0x12, 119), same argument: discard (trim) a byte range.
    nix::ioctl_write_ptr_bad!(blkdiscard_raw, nix::request_code_none!(0x12, 119), [u64; 2]);
    // BLKRRPART = _IO(0x12, 95): re-read the partition table.
    nix::ioctl_none!(blkrrpart_raw, 0x12, 95);

    pub fn blkgetsize64(f: &File) -> nix::Result<u64> {
        let mut size = 0u64;
        // SAFETY: the fd is open for the lifetime of `f`; the kernel writes one u64 into
        // `size`, which outlives the call.
        unsafe { blkgetsize64_raw(f.as_raw_fd(), &mut size) }?;
        Ok(size)
    }

    pub fn blksszget(f: &File) -> nix::Result<u32> {
        let mut ss: libc::c_int = 0;
        // SAFETY: as above; the kernel writes one int.
        unsafe { blksszget_raw(f.as_raw_fd(), &mut ss) }?;
        Ok(u32::try_from(ss).unwrap_or(512))
    }

    pub fn blkzeroout(f: &File, start: u64, len: u64) -> nix::Result<()> {
        let range = [start, len];
        // SAFETY: the kernel only reads the two u64s of `range`, which outlives the call.
        unsafe { blkzeroout_raw(f.as_raw_fd(), &range) }?;
        Ok(())
    }

    pub fn blkdiscard(f: &File, start: u64, len: u64) -> nix::Result<()> {
        let range = [start, len];
        // SAFETY: the kernel only reads the two u64s of `range`, which outlives the call.
        unsafe { blkdiscard_raw(f.as_raw_fd(), &range) }?;
        Ok(())
    }

    pub fn blkrrpart(f: &File) -> nix::Result<()> {
        // SAFETY: no argument; the fd is valid for the lifetime of `f`.
        unsafe { blkrrpart_raw(f.as_raw_fd()) }?;
        Ok(())
    }
}

/// Zero runs shorter than this, or not aligned to it, are written as data: holes and
/// BLKZEROOUT work in file-system blocks / device sectors, and 4 KiB is both the page
/// size and the usual file-system block.
const SPARSE_BLOCK: u64 = 4096;
/// Zero runs shorter than this inside written data are written, not punched.
const MIN_HOLE: u64 = 64 << 10;

/// True when `block` is all zeros; compares against a static zero page so the check runs
/// as one vectorised memcmp instead of a byte loop.
fn is_zero_block(block: &[u8]) -> bool {
    static ZERO: [u8; SPARSE_BLOCK as usize] = [0; SPARSE_BLOCK as usize];
    block.len() <= ZERO.len() && block == &ZERO[..block.len()]
}

/// A window on a block device or a disk-image file.
#[derive(Debug)]
pub struct Target {
    file: File,
    path: PathBuf,
    base: u64,
    len: u64,
    blockdev: bool,
    sector_size: u64,
}

impl Target {
    /// Whole disk, for writing. A missing path is an error (never created: a mistyped
    /// target must not become a new file), and so is a disk or file shorter than `min_len`
    /// (never extended). Block device: size from BLKGETSIZE64.
    pub fn open_disk(path: &Path, min_len: Option<u64>) -> Result<Target> {
        Target::open_with(path, true, min_len)
    }

    /// Whole disk opened for reading only, for capture and `img -dump` (addition): works on
    /// read-only media and never creates or extends a file.
    pub fn open_disk_read_only(path: &Path) -> Result<Target> {
        Target::open_with(path, false, None)
    }

    /// One partition, read only (addition; see `open_partition`).
    pub fn open_partition_read_only(path: &Path, spec: &str) -> Result<(Target, PartitionInfo)> {
        Target::open_disk_read_only(path)?.partition(path, spec)
    }

    fn open_with(path: &Path, write: bool, min_len: Option<u64>) -> Result<Target> {
        let shown = path.display();
        let exists = path.exists();
        // A mistyped /dev/sdX must not become a regular file on devtmpfs that swallows a
        // whole image in RAM, nor a mistyped file name a new file of the image's size.
        if !exists {
            return Err(Error::new(
                ErrorKind::Target,
                format!("{shown} does not exist; list the disks with img -dump, or for a disk-image file create it first (truncate -s SIZE {shown})"),
            ));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(write)
            .truncate(false)
            .open(path)
            .ctx(|| {
                format!(
                    "opening {shown} for {}",
                    if write { "writing" } else { "reading" }
                )
            })?;
        let meta = file.metadata().ctx(|| format!("examining {shown}"))?;
        let blockdev = meta.file_type().is_block_device();
        let (len, sector_size) = if blockdev {
            let size = ioctl::blkgetsize64(&file)
                .map_err(|e| Error::io(format!("BLKGETSIZE64 on {shown}"), e.into()))?;
            let ss = ioctl::blksszget(&file).map(u64::from).unwrap_or(512);
            (size, ss)
        } else if meta.is_file() {
            (meta.len(), 512)
        } else {
            return Err(Error::new(ErrorKind::Target, format!("{shown} is neither a block device nor a regular file; give a disk (/dev/sda) or an image file")));
        };
        if let Some(min) = min_len {
            if len < min {
                return Err(Error::new(
                    ErrorKind::Target,
                    format!("{shown} has {len} bytes but the image needs at least {min}; use a larger disk (or, for a disk-image file, make it larger: truncate -s {min} {shown})"),
                ));
            }
        }
        Ok(Target {
            file,
            path: path.to_path_buf(),
            base: 0,
            len,
            blockdev,
            sector_size,
        })
    }

    /// One partition of a disk found by spec (number or label) through `disk::read_layout`.
    pub fn open_partition(path: &Path, spec: &str) -> Result<(Target, PartitionInfo)> {
        Target::open_disk(path, None)?.partition(path, spec)
    }

    fn partition(self, path: &Path, spec: &str) -> Result<(Target, PartitionInfo)> {
        let disk = self;
        let layout = disk::read_layout(&disk, disk.len)?;
        let part = layout
            .find(spec)
            .map_err(|e| Error::new(e.kind(), format!("{}: {}", path.display(), e.context())))?
            .clone();
        let t = disk.window(part.start, part.len)?;
        Ok((t, part))
    }

    /// A sub-window `[offset, offset + len)` of this one (addition to the agreed API: lets
    /// a whole-disk deploy write a partition's chunks with partition-relative offsets).
    pub fn window(&self, offset: u64, len: u64) -> Result<Target> {
        self.check(offset, len)?;
        let file = self
            .file
            .try_clone()
            .ctx(|| format!("duplicating the handle of {}", self.path.display()))?;
        Ok(Target {
            file,
            path: self.path.clone(),
            base: self.base + offset,
            len,
            blockdev: self.blockdev,
            sector_size: self.sector_size,
        })
    }

    pub fn len(&self) -> u64 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn is_block_device(&self) -> bool {
        self.blockdev
    }

    /// Start of this window on the device (addition).
    pub fn base(&self) -> u64 {
        self.base
    }

    /// Logical sector size (BLKSSZGET; 512 for files) (addition).
    pub fn sector_size(&self) -> u64 {
        self.sector_size
    }

    fn check(&self, offset: u64, len: u64) -> Result<u64> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(self.base + offset),
            _ => Err(Error::new(
                ErrorKind::Target,
                format!(
                    "{len} bytes at offset {offset} do not fit {} ({} bytes from offset {})",
                    self.path.display(),
                    self.len,
                    self.base
                ),
            )),
        }
    }

    /// Write `buf` at `offset` (relative to the window), bounds-checked.
    pub fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let abs = self.check(offset, buf.len() as u64)?;
        self.file.write_all_at(buf, abs).ctx(|| {
            format!(
                "writing {} bytes at offset {abs} of {}",
                buf.len(),
                self.path.display()
            )
        })
    }

    /// Like `write_at` but 4 KiB-aligned all-zero blocks become holes (FALLOC_FL_PUNCH_HOLE
    /// on a file, BLKZEROOUT on a block device; plain zero write if unsupported). The result
    /// reads the same.
    pub fn write_sparse_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        let abs = self.check(offset, buf.len() as u64)?;
        let block = SPARSE_BLOCK as usize;
        let mut i = 0usize; // start of the pending data run in buf
                            // Align block boundaries to the device, not to the buffer.
        let mut pos =
            (((SPARSE_BLOCK - abs % SPARSE_BLOCK) % SPARSE_BLOCK) as usize).min(buf.len());
        while pos + block <= buf.len() {
            if !is_zero_block(&buf[pos..pos + block]) {
                pos += block;
                continue;
            }
            // Extend the zero run as far as it goes.
            let mut zend = pos + block;
            while zend + block <= buf.len() && is_zero_block(&buf[zend..zend + block]) {
                zend += block;
            }
            // A short zero run stays in the data write: one pwrite of a few zero pages is
            // cheaper than splitting the write and a journaled hole punch for each of them
            // (NTFS and FAT metadata areas are full of isolated zero blocks).
            if ((zend - pos) as u64) < MIN_HOLE {
                pos = zend;
                continue;
            }
            if i < pos {
                self.write_at(&buf[i..pos], offset + i as u64)?;
            }
            self.zero_abs(abs + pos as u64, (zend - pos) as u64)?;
            i = zend;
            pos = zend;
        }
        if i < buf.len() {
            self.write_at(&buf[i..], offset + i as u64)?;
        }
        Ok(())
    }

    /// Zero `[offset, offset + len)` with the same hole/zero-out logic.
    pub fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        let abs = self.check(offset, len)?;
        // Unaligned head and tail are written; the aligned middle is punched.
        let a = abs.div_ceil(SPARSE_BLOCK) * SPARSE_BLOCK;
        let b = (abs + len) / SPARSE_BLOCK * SPARSE_BLOCK;
        if a >= b {
            return self.write_zeros(abs, len);
        }
        self.write_zeros(abs, a - abs)?;
        self.zero_abs(a, b - a)?;
        self.write_zeros(b, abs + len - b)
    }

    /// Zero an aligned absolute range: hole / BLKZEROOUT, else zero writes.
    fn zero_abs(&self, abs: u64, len: u64) -> Result<()> {
        if len == 0 {
            return Ok(());
        }
        let done = if self.blockdev {
            ioctl::blkzeroout(&self.file, abs, len).is_ok()
        } else {
            punch_hole(&self.file, abs, len).is_ok()
        };
        if done {
            Ok(())
        } else {
            self.write_zeros(abs, len)
        }
    }

    fn write_zeros(&self, mut abs: u64, len: u64) -> Result<()> {
        static Z: [u8; 64 * 1024] = [0; 64 * 1024];
        let end = abs + len;
        while abs < end {
            let n = (end - abs).min(Z.len() as u64) as usize;
            self.file
                .write_all_at(&Z[..n], abs)
                .ctx(|| format!("writing zeros at offset {abs} of {}", self.path.display()))?;
            abs += n as u64;
        }
        Ok(())
    }

    /// Read `buf.len()` bytes at `offset` (relative to the window).
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let abs = self.check(offset, buf.len() as u64)?;
        FileExt::read_exact_at(&self.file, buf, abs).ctx(|| {
            format!(
                "reading {} bytes at offset {abs} of {}",
                buf.len(),
                self.path.display()
            )
        })
    }

    /// Flush written data to the device (fdatasync; on a block device this flushes the
    /// device's write cache too).
    pub fn sync(&self) -> Result<()> {
        self.file
            .sync_data()
            .ctx(|| format!("flushing {}", self.path.display()))
    }

    /// Ask the kernel to re-read the partition table after a whole-disk deploy (addition).
    /// A no-op on files; EBUSY/EINVAL (a partition is mounted, or a loop device without
    /// partition scanning) are reported as errors for the caller to print as a warning.
    pub fn reread_partitions(&self) -> Result<()> {
        if !self.blockdev {
            return Ok(());
        }
        ioctl::blkrrpart(&self.file)
            .map_err(|e| Error::io(format!("BLKRRPART on {}", self.path.display()), e.into()))
    }

    /// Discard (trim) the whole window on a block device before a full deploy (addition).
    /// Unsupported devices return an error the caller may ignore.
    pub fn discard_all(&self) -> Result<()> {
        if !self.blockdev {
            return punch_hole(&self.file, self.base, self.len)
                .map_err(|e| Error::io(format!("punching {}", self.path.display()), e.into()));
        }
        ioctl::blkdiscard(&self.file, self.base, self.len)
            .map_err(|e| Error::io(format!("BLKDISCARD on {}", self.path.display()), e.into()))
    }
}

fn punch_hole(file: &File, abs: u64, len: u64) -> nix::Result<()> {
    use nix::fcntl::{fallocate, FallocateFlags};
    use std::os::unix::io::AsRawFd;
    let off = i64::try_from(abs).map_err(|_| nix::errno::Errno::EINVAL)?;
    let l = i64::try_from(len).map_err(|_| nix::errno::Errno::EINVAL)?;
    // KEEP_SIZE is required together with PUNCH_HOLE (fallocate(2)).
    fallocate(
        file.as_raw_fd(),
        FallocateFlags::FALLOC_FL_PUNCH_HOLE | FallocateFlags::FALLOC_FL_KEEP_SIZE,
        off,
        l,
    )
}

impl WriteAt for Target {
    fn size(&self) -> u64 {
        self.len
    }
    fn path(&self) -> &Path {
        Target::path(self)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()> {
        Target::write_at(self, buf, offset)
    }
    fn zero_range(&self, offset: u64, len: u64) -> Result<()> {
        Target::zero_range(self, offset, len)
    }
    fn sync(&self) -> Result<()> {
        Target::sync(self)
    }
}

impl ReadAt for Target {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let abs = match offset.checked_add(buf.len() as u64) {
            Some(end) if end <= self.len => self.base + offset,
            _ => return Err(std::io::ErrorKind::UnexpectedEof.into()),
        };
        FileExt::read_exact_at(&self.file, buf, abs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    fn tmp(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("imgengine-target-{}-{name}", std::process::id()))
    }

    /// A fresh sparse file of `len` bytes (targets are never created by `open_disk`).
    fn sized(p: &Path, len: u64) {
        let _ = std::fs::remove_file(p);
        File::create(p).unwrap().set_len(len).unwrap();
    }

    #[test]
    fn file_is_neither_created_nor_extended_and_is_bounds_checked() {
        let p = tmp("create");
        let _ = std::fs::remove_file(&p);
        let e = Target::open_disk(&p, None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Target);
        assert!(e.to_string().contains("does not exist"), "{e}");
        assert!(!p.exists(), "a missing target is never created");
        sized(&p, 4096);
        let e = Target::open_disk(&p, Some(1 << 20)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Target);
        assert_eq!(std::fs::metadata(&p).unwrap().len(), 4096, "never extended");
        sized(&p, 1 << 20);
        let t = Target::open_disk(&p, Some(1 << 20)).unwrap();
        assert_eq!(t.len(), 1 << 20);
        assert!(!t.is_block_device());
        t.write_at(b"hello", 100).unwrap();
        let mut b = [0u8; 5];
        t.read_at(&mut b, 100).unwrap();
        assert_eq!(&b, b"hello");
        let e = t.write_at(b"xx", (1 << 20) - 1).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Target);
        assert!(t.write_at(b"x", u64::MAX).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn sparse_writes_read_back_the_same_and_make_holes() {
        let p = tmp("sparse");
        sized(&p, 4 << 20);
        let t = Target::open_disk(&p, Some(4 << 20)).unwrap();
        // Fill with 0xAA so holes are observable as zeros only when punched correctly.
        t.write_at(&vec![0xAA; 4 << 20], 0).unwrap();
        t.sync().unwrap();
        let blocks_before = std::fs::metadata(&p).unwrap().blocks();
        let mut buf = vec![0u8; 3 << 20];
        buf[10] = 1; // data in the first (unaligned) block
        buf[(2 << 20) + 5] = 7; // data in the middle
        let off = 1000; // not block aligned
        t.write_sparse_at(&buf, off).unwrap();
        let mut back = vec![0u8; buf.len()];
        t.read_at(&mut back, off).unwrap();
        assert!(back == buf);
        let mut edge = [0u8; 2];
        t.read_at(&mut edge, off - 1).unwrap();
        assert_eq!(edge[0], 0xAA);
        t.sync().unwrap();
        let blocks_after = std::fs::metadata(&p).unwrap().blocks();
        // About 3 MiB of the 4 MiB became holes (when the fs supports punching).
        assert!(
            blocks_after < blocks_before,
            "{blocks_after} !< {blocks_before}"
        );
        t.zero_range(5, 100_000).unwrap();
        let mut z = vec![1u8; 100_000];
        t.read_at(&mut z, 5).unwrap();
        assert!(z.iter().all(|&b| b == 0));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn short_zero_runs_are_written_over_old_data() {
        let p = tmp("shortzero");
        sized(&p, 1 << 20);
        let t = Target::open_disk(&p, Some(1 << 20)).unwrap();
        t.write_at(&vec![0xAA; 1 << 20], 0).unwrap();
        // Data, an 8 KiB zero run (below MIN_HOLE: written as data), data, a 128 KiB zero
        // run (punched), data.
        let mut buf = vec![1u8; 4096];
        buf.extend(vec![0u8; 8192]);
        buf.extend(vec![2u8; 4096]);
        buf.extend(vec![0u8; 128 << 10]);
        buf.extend(vec![3u8; 4096]);
        t.write_sparse_at(&buf, 0).unwrap();
        let mut back = vec![0xFFu8; buf.len()];
        t.read_at(&mut back, 0).unwrap();
        assert!(
            back == buf,
            "old 0xAA bytes must not survive in zero runs of any length"
        );
        assert!(is_zero_block(&[0u8; 4096]) && !is_zero_block(&buf[..4096]));
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn partition_window_is_relative() {
        let p = tmp("window");
        sized(&p, 65536);
        let t = Target::open_disk(&p, Some(65536)).unwrap();
        let w = t.window(4096, 8192).unwrap();
        w.write_at(b"abc", 0).unwrap();
        let mut b = [0u8; 3];
        t.read_at(&mut b, 4096).unwrap();
        assert_eq!(&b, b"abc");
        assert!(w.write_at(b"a", 8192).is_err());
        assert!(t.window(60000, 8192).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn non_blockdev_paths() {
        // /dev/null is a character device: neither a disk nor an image file.
        let e = Target::open_disk(Path::new("/dev/null"), None).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Target);
        // On a regular file the ioctls fail cleanly (ENOTTY), never crash.
        let p = tmp("ioctl");
        let f = File::create(&p).unwrap();
        assert!(ioctl::blkgetsize64(&f).is_err());
        assert!(ioctl::blkzeroout(&f, 0, 4096).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn missing_devices_are_not_created() {
        let e =
            Target::open_disk(Path::new("/dev/imgengine-no-such-disk"), Some(4096)).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Target);
        assert!(!Path::new("/dev/imgengine-no-such-disk").exists());
        let p = tmp("ro-missing");
        let _ = std::fs::remove_file(&p);
        assert!(Target::open_disk_read_only(&p).is_err());
        assert!(!p.exists());
    }

    #[test]
    fn read_only_target_reads_but_cannot_write() {
        let p = tmp("ro");
        std::fs::write(&p, vec![7u8; 8192]).unwrap();
        let t = Target::open_disk_read_only(&p).unwrap();
        let mut b = [0u8; 2];
        t.read_at(&mut b, 8190).unwrap();
        assert_eq!(b, [7, 7]);
        assert!(t.write_at(b"x", 0).is_err());
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn target_is_sync() {
        fn assert_sync<T: Sync + Send>() {}
        assert_sync::<Target>();
    }
}
