//! GPT (UEFI spec 2.10 §5.3) through the `gpt` crate, with the checks the crate leaves out.
//!
//! The crate asserts (panics) on an entry size other than 128 bytes, reads as many entries
//! as the header claims and does not check the entry array's CRC; so both headers are
//! parsed here first, and only a header whose CRC, entry size, entry count and entry-array
//! CRC are sane is handed to the crate. The crate then reads the header and entries (the
//! primary if valid, else the backup, like firmware does).

use ::gpt::disk::LogicalBlockSize;
use ::gpt::partition_types as types;
use ::gpt::GptConfig;

use crate::disk::RawPartition;
use crate::error::{Error, IoContext, Result};
use crate::extent::Extent;
use crate::fs::window::Window;
use crate::io::ReadAt;

/// A sane upper bound on entries: 128 is standard, a few tools allow more; 16384 entries
/// are 2 MiB of table, already absurd.
const MAX_ENTRIES: u32 = 16384;

/// The header fields needed to check a header and to locate the table on disk.
#[derive(Debug, Clone, Copy)]
struct RawHeader {
    current_lba: u64,
    backup_lba: u64,
    entries_lba: u64,
    num_entries: u32,
    entries_crc: u32,
}

impl RawHeader {
    fn entry_sectors(&self, ss: u64) -> u64 {
        (u64::from(self.num_entries) * 128).div_ceil(ss)
    }
}

/// The header at `lba`, if it has the signature, a valid CRC, 128-byte entries, a sane
/// entry count, an entry array inside the disk with a valid CRC.
fn read_header(
    dev: &(impl ReadAt + ?Sized),
    disk_size: u64,
    ss: u64,
    lba: u64,
) -> Result<Option<RawHeader>> {
    let Some(at) = lba
        .checked_mul(ss)
        .filter(|a| a.checked_add(ss).is_some_and(|e| e <= disk_size))
    else {
        return Ok(None);
    };
    let mut h = [0u8; 92];
    dev.read_exact_at(&mut h, at)
        .ctx(|| format!("reading the GPT header at offset {at}"))?;
    if &h[0..8] != b"EFI PART" {
        return Ok(None);
    }
    // The crate checks the CRC over the 92 defined bytes; do the same so we agree on which
    // header is valid.
    let stored = u32::from_le_bytes(h[16..20].try_into().expect("4 bytes"));
    let mut z = h;
    z[16..20].fill(0);
    if crc32fast::hash(&z) != stored {
        return Ok(None);
    }
    let u64_at = |o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    let u32_at = |o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let hdr = RawHeader {
        current_lba: u64_at(24),
        backup_lba: u64_at(32),
        entries_lba: u64_at(72),
        num_entries: u32_at(80),
        entries_crc: u32_at(88),
    };
    let entry_size = u32_at(84);
    if entry_size != 128 {
        return Err(Error::corrupt(format!(
            "GPT header at offset {at} has {entry_size}-byte partition entries (only 128 is supported); capture the whole disk raw with -raw"
        )));
    }
    if hdr.num_entries == 0 || hdr.num_entries > MAX_ENTRIES {
        return Err(Error::corrupt(format!(
            "GPT header at offset {at} claims {} partition entries; repair the table with sgdisk or capture the whole disk raw with -raw",
            hdr.num_entries
        )));
    }
    let bytes = u64::from(hdr.num_entries) * 128;
    let Some(start) = hdr
        .entries_lba
        .checked_mul(ss)
        .filter(|s| s.checked_add(bytes).is_some_and(|e| e <= disk_size))
    else {
        return Ok(None);
    };
    let mut entries = vec![0u8; bytes as usize];
    dev.read_exact_at(&mut entries, start)
        .ctx(|| format!("reading the GPT entries at offset {start}"))?;
    if crc32fast::hash(&entries) != hdr.entries_crc {
        return Ok(None);
    }
    Ok(Some(hdr))
}

/// A readable name for a partition type GUID, in the words `sgdisk -L` uses.
pub fn type_name(guid: &::gpt::partition_types::Type) -> &'static str {
    let table: &[(&types::Type, &str)] = &[
        (&types::EFI, "EFI system partition"),
        (&types::BASIC, "Microsoft basic data"),
        (&types::MICROSOFT_RESERVED, "Microsoft reserved"),
        (&types::WINDOWS_RECOVERY, "Windows RE"),
        (&types::WINDOWS_METADATA, "Windows LDM metadata"),
        (&types::WINDOWS_DATA, "Windows LDM data"),
        (&types::BIOS, "BIOS boot partition"),
        (&types::LINUX_FS, "Linux filesystem"),
        (&types::LINUX_SWAP, "Linux swap"),
        (&types::LINUX_LVM, "Linux LVM"),
        (&types::LINUX_RAID, "Linux RAID"),
        (&types::LINUX_HOME, "Linux /home"),
        (&types::LINUX_ROOT_X64, "Linux x86-64 root (/)"),
        (&types::LINUX_ROOT_X86, "Linux x86 root (/)"),
        (&types::LINUX_LUKS, "Linux LUKS"),
        (&types::MACOS_HFSPLUS, "Apple HFS/HFS+"),
    ];
    table
        .iter()
        .find(|(t, _)| t.guid == guid.guid)
        .map(|(_, n)| *n)
        .unwrap_or("Unknown")
}

/// Read a GPT with logical sector size `ss`. `Ok(None)` when neither header is valid.
pub(crate) fn read(
    dev: &(impl ReadAt + ?Sized),
    disk_size: u64,
    ss: u64,
) -> Result<Option<(Vec<RawPartition>, Vec<Extent>)>> {
    let sectors = disk_size / ss;
    if sectors < 3 {
        return Ok(None);
    }
    let primary = read_header(dev, disk_size, ss, 1)?;
    // The crate looks for the backup in the last whole sector of the device.
    let backup = read_header(dev, disk_size, ss, sectors - 1)?;
    let Some(hdr) = primary.or(backup) else {
        return Ok(None);
    };

    let lb = if ss == 512 {
        LogicalBlockSize::Lb512
    } else {
        LogicalBlockSize::Lb4096
    };
    let win = Window::new(dev, 0, sectors * ss);
    let disk = GptConfig::new()
        .writable(false)
        .only_valid_headers(false)
        .logical_block_size(lb)
        .open_from_device(win)
        .map_err(|e| Error::corrupt(format!("reading the GPT: {e}; repair it with sgdisk or capture the whole disk raw with -raw")))?;

    let mut parts = Vec::new();
    for (&number, p) in disk.partitions() {
        if !p.is_used() {
            continue;
        }
        let bad = || {
            Error::corrupt(format!(
                "GPT partition {number} (sectors {}..={}) does not fit the {disk_size}-byte disk; repair the table with sgdisk or capture the whole disk raw with -raw",
                p.first_lba, p.last_lba
            ))
        };
        if p.first_lba > p.last_lba || p.last_lba >= sectors {
            return Err(bad());
        }
        let start = p.first_lba.checked_mul(ss).ok_or_else(bad)?;
        let len = (p.last_lba - p.first_lba + 1)
            .checked_mul(ss)
            .ok_or_else(bad)?;
        let label = p.name.trim_end_matches('\0').to_string();
        parts.push(RawPartition {
            number,
            start,
            len,
            type_id: p
                .part_type_guid
                .guid
                .hyphenated()
                .to_string()
                .to_uppercase(),
            type_name: type_name(&p.part_type_guid).to_string(),
            label: (!label.is_empty()).then_some(label),
        });
    }

    // Table extents: sector 0 (protective MBR) up to the end of the primary entries, and the
    // backup entries up to the backup header. Derived from whichever headers are valid.
    let mut extents = Vec::new();
    let clip = |e: Extent| e.clip(sectors * ss);
    let p = primary.unwrap_or(RawHeader {
        current_lba: 1,
        entries_lba: 2,
        ..hdr
    });
    let primary_end = p
        .entries_lba
        .saturating_add(p.entry_sectors(ss))
        .max(2)
        .saturating_mul(ss);
    extents.extend(clip(Extent::new(0, primary_end)));
    let b = backup.unwrap_or(RawHeader {
        current_lba: p.backup_lba,
        entries_lba: p.backup_lba.saturating_sub(p.entry_sectors(ss)),
        ..hdr
    });
    if b.current_lba < sectors && b.entries_lba <= b.current_lba {
        let from = b.entries_lba.saturating_mul(ss);
        extents.extend(clip(Extent::new(from, (b.current_lba + 1) * ss - from)));
    }
    Ok(Some((parts, crate::extent::normalize(extents, 0))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{fuzz_read_layout, read_layout, TableKind};
    use crate::fs::TestRng;

    /// Build a GPT disk image in memory with the gpt crate itself (the e2e suite checks the
    /// same against sgdisk).
    fn gpt_image() -> Vec<u8> {
        let size = 4 << 20;
        let mut cur = std::io::Cursor::new(vec![0u8; size]);
        let mbr = ::gpt::mbr::ProtectiveMBR::with_lb_size(((size / 512) - 1) as u32);
        mbr.overwrite_lba0(&mut cur).unwrap();
        let mut disk = GptConfig::new()
            .writable(true)
            .logical_block_size(LogicalBlockSize::Lb512)
            .create_from_device(cur, None)
            .unwrap();
        disk.update_partitions(std::collections::BTreeMap::new())
            .unwrap();
        disk.add_partition("ESP", 1 << 20, types::EFI, 0, None)
            .unwrap();
        disk.add_partition("data", 1 << 20, types::BASIC, 0, None)
            .unwrap();
        disk.write().unwrap().into_inner()
    }

    #[test]
    fn partitions_names_types_and_table_extents() {
        let img = gpt_image();
        let size = img.len() as u64;
        let l = read_layout(img.as_slice(), size).unwrap();
        assert_eq!(l.table, TableKind::Gpt);
        assert_eq!(l.partitions.len(), 2);
        let p1 = &l.partitions[0];
        assert_eq!(
            (p1.number, p1.label.as_deref(), p1.type_name.as_str()),
            (1, Some("ESP"), "EFI system partition")
        );
        assert_eq!(p1.type_id, "C12A7328-F81F-11D2-BA4B-00A0C93EC93B");
        assert_eq!(p1.len, 1 << 20);
        assert_eq!(l.find("data").unwrap().number, 2);
        assert_eq!(
            l.table_extents,
            vec![
                Extent::new(0, 34 * 512),
                Extent::new(size - 33 * 512, 33 * 512)
            ]
        );
    }

    #[test]
    fn native_4k_sector_disk() {
        let size = 8 << 20;
        let mut cur = std::io::Cursor::new(vec![0u8; size]);
        let mbr = ::gpt::mbr::ProtectiveMBR::with_lb_size(((size / 4096) - 1) as u32);
        mbr.overwrite_lba0(&mut cur).unwrap();
        let mut disk = GptConfig::new()
            .writable(true)
            .logical_block_size(LogicalBlockSize::Lb4096)
            .create_from_device(cur, None)
            .unwrap();
        disk.update_partitions(std::collections::BTreeMap::new())
            .unwrap();
        disk.add_partition("data", 2 << 20, types::LINUX_FS, 0, None)
            .unwrap();
        let img = disk.write().unwrap().into_inner();
        let l = read_layout(img.as_slice(), size as u64).unwrap();
        assert_eq!((l.table, l.sector_size), (TableKind::Gpt, 4096));
        assert_eq!(l.partitions[0].len, 2 << 20);
        assert_eq!(l.partitions[0].start % 4096, 0);
        assert_eq!(l.partitions[0].type_name, "Linux filesystem");
    }

    #[test]
    fn broken_primary_falls_back_to_backup() {
        let mut img = gpt_image();
        img[512 + 20] ^= 0xff; // primary header CRC no longer matches
        let l = read_layout(img.as_slice(), img.len() as u64).unwrap();
        assert_eq!(l.partitions.len(), 2);
    }

    /// A GPT made by sgdisk (with a FAT partition from mkfs.fat, so read_layout's probes
    /// run too), mutated in the protective MBR, both headers and both entry arrays.
    #[test]
    fn mutated_sgdisk_tables_never_panic() {
        let mut img = crate::fs::made_by(
            "truncate -s 8M d.img
             sgdisk -n 1:2048:+3M -t 1:ef00 -c 1:ESP -n 2:0:0 -t 2:0700 -c 2:data d.img >/dev/null
             mkfs.fat --offset 2048 -F 12 -n ESP d.img 3072 >/dev/null 2>&1",
            "d.img",
        );
        let size = img.len();
        let l = read_layout(img.as_slice(), size as u64).unwrap();
        assert_eq!(l.partitions.len(), 2);
        assert_eq!(l.find("ESP").unwrap().fs, crate::fs::FsKind::Fat12);
        let hot = [
            (446, 66),
            (512, 92),
            (1024, 256),
            (size - 33 * 512, 256),
            (size - 512, 92),
            (2048 * 512, 512),
        ];
        let mut rng = TestRng(0x6E7);
        for i in 0..2000 {
            let undo = rng.mutate_in(&mut img, &hot);
            if i % 2 == 0 {
                // Re-seal both header CRCs so mutations of the header fields get past the
                // CRC check and reach the entry-count, entry-size and bounds checks.
                for at in [512, size - 512] {
                    let mut h = img[at..at + 92].to_vec();
                    h[16..20].fill(0);
                    let c = crc32fast::hash(&h).to_le_bytes();
                    let old: Vec<(usize, u8)> =
                        (0..4).map(|k| (at + 16 + k, img[at + 16 + k])).collect();
                    img[at + 16..at + 20].copy_from_slice(&c);
                    fuzz_read_layout(&img);
                    crate::fs::restore(&mut img, old);
                }
            } else {
                fuzz_read_layout(&img);
            }
            crate::fs::restore(&mut img, undo);
        }
    }

    #[test]
    fn mutated_tables_never_panic() {
        let base = gpt_image();
        let mut rng = TestRng(99);
        for i in 0..2000 {
            let mut img = base.clone();
            rng.mutate(&mut img, 34 * 512);
            if i % 3 == 0 {
                // Re-seal the primary header CRC so mutations reach the entry checks.
                let mut h = img[512..604].to_vec();
                h[16..20].fill(0);
                let c = crc32fast::hash(&h);
                img[512 + 16..512 + 20].copy_from_slice(&c.to_le_bytes());
            }
            fuzz_read_layout(&img);
        }
    }
}
