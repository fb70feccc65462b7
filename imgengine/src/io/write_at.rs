//! Positioned writes to a disk or a partition, for code that repairs on-disk structures in
//! place (the GPT backup moved to the end of a larger disk) without knowing how the disk
//! was opened: [`crate::target::Target`] implements it, and the partition-table code
//! depends on this trait rather than on the target (which itself reads partition tables).

use std::path::Path;

use super::ReadAt;
use crate::error::Result;

/// A writable window of a disk, addressed from 0.
pub trait WriteAt: ReadAt {
    /// Bytes in the window.
    fn size(&self) -> u64;
    /// The device or file, for messages.
    fn path(&self) -> &Path;
    /// Write all of `buf` at `offset`; out of bounds is an error, never a growth.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<()>;
    /// Make `[offset, offset + len)` read as zeros.
    fn zero_range(&self, offset: u64, len: u64) -> Result<()>;
    /// Put what was written on stable storage (a device cache flush).
    fn sync(&self) -> Result<()>;
}
