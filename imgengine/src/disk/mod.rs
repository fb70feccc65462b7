//! The layout of a whole disk (a block device or a disk-image file): its partition table,
//! where that table lives, and every partition with its file system.
//!
//! GPT is read through the `gpt` crate and MBR (with the extended/logical chain walked
//! here, see [`mbr`]) through `mbrman`; both crates are given a read-only [`Window`] over
//! the disk. The crates trust some header fields (GPT entry size, entry count), so those
//! are checked first ([`gpt`]), and every partition is checked to lie inside the disk.
//!
//! Partition numbers are what Linux uses: the GPT entry index (1-based), MBR slots 1..4 and
//! logical partitions from 5 in chain order. The extended container itself is not a
//! partition here: its only content is the EBR chain, which is part of `table_extents`.
//!
//! [`Window`]: crate::fs::window::Window

pub mod blockdev;
pub mod gpt;
pub mod mbr;

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::extent::Extent;
use crate::fs::{self, FsKind};
use crate::io::ReadAt;

pub use blockdev::list_block_devices;

/// Which partition table a disk carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum TableKind {
    Gpt,
    Mbr,
    /// No partition table: the disk is one file system or unknown content.
    None,
}

/// One partition of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PartitionInfo {
    pub number: u32,
    /// Byte offset from the start of the disk.
    pub start: u64,
    /// Length in bytes.
    pub len: u64,
    /// GPT type GUID text (upper case), or MBR type as "0x0c".
    pub type_id: String,
    /// "EFI System", "Microsoft basic data", "FAT32 (LBA)", ...
    pub type_name: String,
    /// GPT partition name.
    pub label: Option<String>,
    pub fs: FsKind,
    pub fs_label: Option<String>,
    /// Bytes in use per the file system's map; None when unknown or the map is broken.
    pub used_bytes: Option<u64>,
}

impl PartitionInfo {
    /// One past the last byte, checked.
    pub fn end(&self) -> Option<u64> {
        self.start.checked_add(self.len)
    }
}

/// The layout of a disk.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskLayout {
    pub table: TableKind,
    pub disk_size: u64,
    pub sector_size: u64,
    pub partitions: Vec<PartitionInfo>,
    /// Where the partition table lives (MBR sector; GPT protective MBR + primary header +
    /// entries, and backup entries + header at the end): captured as "table" chunks that a
    /// deploy writes last.
    pub table_extents: Vec<Extent>,
}

/// A partition as the table parsers see it, before the file system is probed.
pub(crate) struct RawPartition {
    pub number: u32,
    pub start: u64,
    pub len: u64,
    pub type_id: String,
    pub type_name: String,
    pub label: Option<String>,
}

/// Read the partition table of a disk of `disk_size` bytes and probe every partition's file
/// system (kind, label, used bytes). No table gives `TableKind::None` and no partitions.
pub fn read_layout(dev: &(impl ReadAt + ?Sized), disk_size: u64) -> Result<DiskLayout> {
    let (table, sector_size, raw, table_extents) = read_table(dev, disk_size)?;
    let mut partitions = Vec::with_capacity(raw.len());
    for p in raw {
        let end = p.start.checked_add(p.len).filter(|&e| e <= disk_size).ok_or_else(|| {
            Error::corrupt(format!(
                "partition {} (start {}, {} bytes) extends beyond the end of the {disk_size}-byte disk; fix the partition table or capture the whole disk raw with -raw",
                p.number, p.start, p.len
            ))
        })?;
        debug_assert!(end <= disk_size);
        let probe = fs::probe(dev, p.start, p.len).unwrap_or(fs::FsProbe {
            kind: FsKind::Unknown,
            label: None,
        });
        // used_bytes is a display figure: a broken map is reported as unknown here and as
        // an error by the capture, which is where the user can choose -raw.
        let used_bytes = if probe.kind.has_used_map() {
            fs::used_map(dev, p.start, p.len).ok().map(|m| m.used_bytes)
        } else {
            None
        };
        partitions.push(PartitionInfo {
            number: p.number,
            start: p.start,
            len: p.len,
            type_id: p.type_id,
            type_name: p.type_name,
            label: p.label,
            fs: probe.kind,
            fs_label: probe.label,
            used_bytes,
        });
    }
    Ok(DiskLayout {
        table,
        disk_size,
        sector_size,
        partitions,
        table_extents,
    })
}

type Table = (TableKind, u64, Vec<RawPartition>, Vec<Extent>);

fn read_table(dev: &(impl ReadAt + ?Sized), disk_size: u64) -> Result<Table> {
    if disk_size < 512 {
        return Ok((TableKind::None, 512, Vec::new(), Vec::new()));
    }
    let mut mbr = [0u8; 512];
    dev.read_exact_at(&mut mbr, 0)
        .ctx(|| "reading the partition table (sector 0)".to_string())?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok((TableKind::None, 512, Vec::new(), Vec::new()));
    }
    // A GPT disk has a protective MBR with one 0xEE entry; look for the header at LBA 1 for
    // 512-byte and 4096-byte logical sectors (UEFI spec 2.10 §5.3.2).
    if mbr::has_protective_entry(&mbr) {
        for ss in [512u64, 4096] {
            if let Some((parts, extents)) = gpt::read(dev, disk_size, ss)? {
                return Ok((TableKind::Gpt, ss, parts, extents));
            }
        }
        return Err(Error::corrupt(
            "the protective MBR announces a GPT but neither GPT header is valid; repair it with sgdisk or capture the whole disk raw with -raw",
        ));
    }
    // A FAT or NTFS boot sector also ends in 55 AA: a "superfloppy" without a table.
    if fs::fat::claimed_kind(&mbr).is_some() || fs::ntfs::looks_like_ntfs(&mbr) {
        return Ok((TableKind::None, 512, Vec::new(), Vec::new()));
    }
    let (parts, extents) = mbr::read(dev, disk_size)?;
    Ok((TableKind::Mbr, 512, parts, extents))
}

impl DiskLayout {
    /// The partition named by `spec`: a number ("2"), a GPT partition name or a file-system
    /// label (exact match first, then case-insensitive). The error lists what exists.
    pub fn find(&self, spec: &str) -> Result<&PartitionInfo> {
        let spec = spec.trim();
        if let Ok(n) = spec.parse::<u32>() {
            if let Some(p) = self.partitions.iter().find(|p| p.number == n) {
                return Ok(p);
            }
        } else {
            let exact: Vec<&PartitionInfo> = self
                .partitions
                .iter()
                .filter(|p| p.label.as_deref() == Some(spec) || p.fs_label.as_deref() == Some(spec))
                .collect();
            let matches = if exact.is_empty() {
                self.partitions
                    .iter()
                    .filter(|p| {
                        p.label
                            .as_deref()
                            .is_some_and(|l| l.eq_ignore_ascii_case(spec))
                            || p.fs_label
                                .as_deref()
                                .is_some_and(|l| l.eq_ignore_ascii_case(spec))
                    })
                    .collect()
            } else {
                exact
            };
            match matches.as_slice() {
                [one] => return Ok(one),
                [] => {}
                many => {
                    let nums: Vec<String> = many.iter().map(|p| p.number.to_string()).collect();
                    return Err(Error::invalid(format!(
                        "partition \"{spec}\" is ambiguous: partitions {} carry that label; give the number instead",
                        nums.join(", ")
                    )));
                }
            }
        }
        // The disk lacks what the job needs: a target problem (exit 5), not a typo in the
        // command line, because the same name is right on a correctly laid-out device.
        Err(Error::new(
            ErrorKind::Target,
            format!(
                "no partition \"{spec}\" on this disk; it has: {}",
                self.describe_partitions()
            ),
        ))
    }

    /// "1 (EFI, fat32 \"ESP\"), 2 (ntfs \"Windows\")" — for error messages.
    pub fn describe_partitions(&self) -> String {
        if self.partitions.is_empty() {
            return format!("no partitions (table: {:?})", self.table);
        }
        let items: Vec<String> = self
            .partitions
            .iter()
            .map(|p| {
                let mut s = format!("{} ({}", p.number, p.fs);
                if let Some(l) = &p.label {
                    s.push_str(&format!(", name \"{l}\""));
                }
                if let Some(l) = &p.fs_label {
                    s.push_str(&format!(", label \"{l}\""));
                }
                s.push(')');
                s
            })
            .collect();
        items.join(", ")
    }
}

/// A block device as `img -dump` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockDeviceInfo {
    pub path: PathBuf,
    pub size: u64,
    pub model: Option<String>,
    pub removable: bool,
}

/// Fuzz entry point: read the layout of `data` as a whole disk. Must never panic.
pub fn fuzz_read_layout(data: &[u8]) {
    let size = data.len() as u64;
    if let Ok(l) = read_layout(data, size) {
        for p in &l.partitions {
            assert!(
                p.end().is_some_and(|e| e <= size),
                "partition {} outside the disk",
                p.number
            );
        }
        for e in &l.table_extents {
            assert!(
                e.end().is_some_and(|end| end <= size),
                "table extent {e:?} outside the disk"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn part(number: u32, label: Option<&str>, fs_label: Option<&str>) -> PartitionInfo {
        PartitionInfo {
            number,
            start: u64::from(number) * 1024,
            len: 1024,
            type_id: "0x0c".into(),
            type_name: "FAT32 (LBA)".into(),
            label: label.map(Into::into),
            fs: FsKind::Fat32,
            fs_label: fs_label.map(Into::into),
            used_bytes: None,
        }
    }

    #[test]
    fn find_by_number_name_and_label() {
        let l = DiskLayout {
            table: TableKind::Gpt,
            disk_size: 1 << 20,
            sector_size: 512,
            partitions: vec![
                part(1, Some("EFI system"), Some("ESP")),
                part(2, None, Some("DATA")),
                part(5, None, Some("data")),
            ],
            table_extents: vec![],
        };
        assert_eq!(l.find("2").unwrap().number, 2);
        assert_eq!(l.find("ESP").unwrap().number, 1);
        assert_eq!(l.find("EFI system").unwrap().number, 1);
        assert_eq!(l.find("esp").unwrap().number, 1);
        assert_eq!(l.find("data").unwrap().number, 5);
        let e = l.find("3").unwrap_err().to_string();
        assert!(
            e.contains("no partition \"3\"") && e.contains("label \"ESP\""),
            "{e}"
        );
        let e = l.find("Data").unwrap_err().to_string();
        assert!(e.contains("ambiguous"), "{e}");
    }

    #[test]
    fn blank_and_tiny_disks_have_no_table() {
        let zeros = vec![0u8; 8192];
        let l = read_layout(zeros.as_slice(), 8192).unwrap();
        assert_eq!(l.table, TableKind::None);
        assert!(l.partitions.is_empty());
        assert_eq!(
            read_layout(&zeros[..100], 100).unwrap().table,
            TableKind::None
        );
    }
}
