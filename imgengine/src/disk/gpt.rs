//! GPT (UEFI spec 2.10 §5.3) through the `gpt` crate, with the checks the crate leaves out.
//!
//! The crate asserts (panics) on an entry size other than 128 bytes, reads as many entries
//! as the header claims and does not check the entry array's CRC; so both headers are
//! parsed here first, and only a header whose CRC, entry size, entry count and entry-array
//! CRC are sane is handed to the crate. The crate then reads the header and entries (the
//! primary if valid, else the backup, like firmware does).
//!
//! [`relocate_backup`] writes, by hand (the crate rewrites the whole table and would need
//! the partitions re-added), what `sgdisk -e` does after a deploy onto a larger disk: the
//! backup moves to the last LBAs and the primary header points at it.

use ::gpt::disk::LogicalBlockSize;
use ::gpt::partition_types as types;
use ::gpt::GptConfig;

use crate::disk::RawPartition;
use crate::error::{Error, IoContext, Result};
use crate::extent::Extent;
use crate::fs::window::Window;
use crate::io::{ReadAt, WriteAt};

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
    // The crate takes any primary header whose own CRC is right and then fails on its
    // entry array's CRC; firmware and Linux use the backup then (a table rewrite cut
    // between the primary's entries and header leaves exactly that). So when only the
    // backup is valid, the crate is shown a blank primary header and reads the backup.
    let masked = Masked {
        dev,
        from: if primary.is_none() { ss } else { 0 },
        to: if primary.is_none() { 2 * ss } else { 0 },
    };
    let win = Window::new(&masked, 0, sectors * ss);
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

/// `dev` with the bytes `from..to` read as zeros.
struct Masked<'a, D: ReadAt + ?Sized> {
    dev: &'a D,
    from: u64,
    to: u64,
}

impl<D: ReadAt + ?Sized> ReadAt for Masked<'_, D> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.dev.read_exact_at(buf, offset)?;
        let end = offset.saturating_add(buf.len() as u64);
        let (a, b) = (self.from.max(offset), self.to.min(end));
        if a < b {
            buf[(a - offset) as usize..(b - offset) as usize].fill(0);
        }
        Ok(())
    }
}

/// `buf.len()` bytes at `offset` of `target`, as an engine error naming the place.
fn read_at(target: &(impl WriteAt + ?Sized), buf: &mut [u8], offset: u64) -> Result<()> {
    target.read_exact_at(buf, offset).ctx(|| {
        format!(
            "reading {} bytes at offset {offset} of {}",
            buf.len(),
            target.path().display()
        )
    })
}

/// Move the GPT backup (entry array and header) to the last sectors of `target`, for a
/// whole-disk image deployed onto a disk larger than the one it was captured from.
///
/// UEFI §5.3.2 puts the backup header in the disk's last LBA and firmware and the kernel
/// look for it there; the image's backup lands where the source disk ended. This is what
/// `sgdisk -e` does: the partitions stay where they are, the last usable LBA grows to just
/// before the new backup entry array, and the primary header points at the new backup.
///
/// Order, for a power cut at any point: the new backup is written and synced first (a
/// valid primary plus a valid backup at the end), then the primary header is rewritten and
/// synced, then the stale backup header is zeroed. Nothing happens when the backup already
/// sits in the last LBA. The primary header is untrusted (it came from the image): its
/// CRC, entry size, entry count and entry array are checked by [`read_header`], its header
/// size and usable range here.
pub fn relocate_backup(target: &(impl WriteAt + ?Sized), sector_size: u64) -> Result<()> {
    let ss = sector_size;
    let where_ = || format!("the GPT on {}", target.path().display());
    let corrupt = |what: &str| {
        Error::corrupt(format!(
            "{}: {what}; repair it with `sgdisk -e` or redeploy",
            where_()
        ))
    };
    if !(512..=65536).contains(&ss) || !ss.is_power_of_two() {
        return Err(Error::invalid(format!(
            "{}: sector size {ss} is not a power of two in 512..=65536",
            where_()
        )));
    }
    let sectors = target.size() / ss;
    if sectors < 3 {
        return Err(corrupt("the disk is too small for a GPT"));
    }
    let Some(hdr) = read_header(target, target.size(), ss, 1)? else {
        return Err(corrupt("the primary header is missing or fails its CRC"));
    };
    let new_backup = sectors - 1;
    if hdr.current_lba != 1 || hdr.entries_lba < 2 {
        return Err(corrupt(
            "the primary header does not name LBA 1 as its own or puts its entries before LBA 2",
        ));
    }
    if hdr.backup_lba == new_backup {
        return Ok(());
    }
    let mut primary = vec![0u8; ss as usize];
    read_at(target, &mut primary, ss)?;
    let u32_at = |h: &[u8], o: usize| u32::from_le_bytes(h[o..o + 4].try_into().expect("4 bytes"));
    let u64_at = |h: &[u8], o: usize| u64::from_le_bytes(h[o..o + 8].try_into().expect("8 bytes"));
    // read_header checked the CRC over 92 bytes; a header claiming another size would
    // need its CRC over that size, which we do not write.
    if u32_at(&primary, 12) != 92 {
        return Err(corrupt("the primary header size is not 92 bytes"));
    }
    let first_usable = u64_at(&primary, 40);
    let last_usable = u64_at(&primary, 48);
    let entry_sectors = hdr.entry_sectors(ss);
    let primary_entries_end = hdr
        .entries_lba
        .checked_add(entry_sectors)
        .ok_or_else(|| corrupt("the primary entry array overflows"))?;
    let new_entries_lba = new_backup
        .checked_sub(entry_sectors)
        .filter(|&l| l > primary_entries_end)
        .ok_or_else(|| corrupt("the backup entry array does not fit the disk"))?;
    let new_last_usable = new_entries_lba - 1;
    // The partitions must already lie in the old usable range, which must end before the
    // old backup and below the new one: only the free space at the end grows.
    if first_usable < primary_entries_end
        || first_usable > last_usable
        || last_usable >= hdr.backup_lba
        || last_usable > new_last_usable
        || hdr.backup_lba > new_backup
    {
        return Err(corrupt(&format!(
            "usable sectors {first_usable}..={last_usable} with the backup header at {} do not fit below sector {new_entries_lba}",
            hdr.backup_lba
        )));
    }

    // The entry array, as verified by read_header (its CRC stays the same), padded to
    // whole sectors.
    let entries_bytes = u64::from(hdr.num_entries) * 128;
    let mut entries = vec![0u8; (entry_sectors * ss) as usize];
    read_at(
        target,
        &mut entries[..entries_bytes as usize],
        hdr.entries_lba * ss,
    )?;

    let seal = |h: &mut [u8]| {
        h[16..20].fill(0);
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
    };
    let mut backup = primary.clone();
    backup[24..32].copy_from_slice(&new_backup.to_le_bytes());
    backup[32..40].copy_from_slice(&1u64.to_le_bytes());
    backup[48..56].copy_from_slice(&new_last_usable.to_le_bytes());
    backup[72..80].copy_from_slice(&new_entries_lba.to_le_bytes());
    seal(&mut backup);
    target.write_at(&entries, new_entries_lba * ss)?;
    target.write_at(&backup, new_backup * ss)?;
    target.sync()?;

    primary[32..40].copy_from_slice(&new_backup.to_le_bytes());
    primary[48..56].copy_from_slice(&new_last_usable.to_le_bytes());
    seal(&mut primary);
    target.write_at(&primary, ss)?;
    grow_protective_mbr(target, hdr.backup_lba, new_backup)?;
    target.sync()?;

    // The old backup header now lies in free space: zero it so no tool finds a second,
    // stale backup (the old entry array without its header is inert).
    // When the disk grew by less than the entry array, the old header lies under the new
    // entries and is already overwritten.
    if hdr.backup_lba < new_entries_lba {
        target.zero_range(hdr.backup_lba * ss, ss)?;
    }
    target.sync()
}

/// For a plain (raw) disk image just written onto `target`: when it carries a GPT whose
/// primary header puts the backup before the target's last LBA (the image's disk was
/// smaller), move the backup to the end with [`relocate_backup`], as a deploy of our format
/// does. The sector size is found as [`read`] finds it (512, then 4096). Returns a note for
/// the user when the backup was moved; no GPT is not an error.
pub fn relocate_backup_of_raw_image(target: &(impl WriteAt + ?Sized)) -> Result<Option<String>> {
    for ss in [512u64, 4096] {
        let sectors = target.size() / ss;
        if sectors < 3 {
            continue;
        }
        let Some(hdr) = read_header(target, target.size(), ss, 1)? else {
            continue;
        };
        if hdr.backup_lba == sectors - 1 {
            return Ok(None);
        }
        relocate_backup(target, ss)?;
        return Ok(Some(format!(
            "moved the raw image's GPT backup header from sector {} to the end of {} (sector {})",
            hdr.backup_lba,
            target.path().display(),
            sectors - 1
        )));
    }
    Ok(None)
}

/// Grow a protective MBR's 0xEE partition that ended at the old backup LBA to the new one
/// (UEFI §5.2.3: it covers LBA 1 to the last LBA, or 0xFFFFFFFF when the disk is larger).
/// Hybrid MBRs (more than one entry in use) and entries not ending at the old backup are
/// left alone.
fn grow_protective_mbr(
    target: &(impl WriteAt + ?Sized),
    old_backup: u64,
    new_backup: u64,
) -> Result<()> {
    let mut mbr = [0u8; 512];
    read_at(target, &mut mbr, 0)?;
    if mbr[510..512] != [0x55, 0xAA] {
        return Ok(());
    }
    let used: Vec<usize> = (0..4)
        .map(|i| 446 + 16 * i)
        .filter(|&o| mbr[o + 4] != 0)
        .collect();
    let [o] = used[..] else {
        return Ok(());
    };
    let start = u32::from_le_bytes(mbr[o + 8..o + 12].try_into().expect("4 bytes"));
    let size = u32::from_le_bytes(mbr[o + 12..o + 16].try_into().expect("4 bytes"));
    if mbr[o + 4] != 0xEE || start != 1 || u64::from(size) != old_backup {
        return Ok(());
    }
    let new_size = u32::try_from(new_backup).unwrap_or(u32::MAX);
    mbr[o + 12..o + 16].copy_from_slice(&new_size.to_le_bytes());
    target.write_at(&mbr, 0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{fuzz_read_layout, read_layout, TableKind};
    use crate::fs::TestRng;
    use crate::target::Target;

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

    /// A temp dir for the relocation tests, removed on drop.
    struct Scratch(std::path::PathBuf);
    impl Scratch {
        fn new(tag: &str) -> Scratch {
            let d =
                std::env::temp_dir().join(format!("imgengine-gpt-{tag}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&d);
            std::fs::create_dir_all(&d).unwrap();
            Scratch(d)
        }
    }
    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    fn sgdisk(args: &[&str], disk: &std::path::Path) -> String {
        let out = std::process::Command::new("sgdisk")
            .args(args)
            .arg(disk)
            .output()
            .expect("running sgdisk (gdisk, scripts/install-deps.sh)");
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The partition lines of `sgdisk -p` (number, start, end, size, code, name).
    fn partition_lines(p: &str) -> Vec<String> {
        p.lines()
            .skip_while(|l| !l.starts_with("Number"))
            .skip(1)
            .map(str::to_string)
            .collect()
    }

    fn last_usable(p: &str) -> u64 {
        let l = p
            .lines()
            .find(|l| l.contains("last usable sector is"))
            .unwrap();
        l.rsplit(' ').next().unwrap().parse().unwrap()
    }

    /// A 64 MiB sgdisk GPT with two partitions, copied into a 96 MiB file.
    fn grown_disk(dir: &Scratch) -> (std::path::PathBuf, Vec<u8>) {
        let small = crate::fs::made_by(
            "truncate -s 64M d.img
             sgdisk -n 1:2048:+8M -t 1:ef00 -c 1:ESP -n 2:0:+40M -t 2:0700 -c 2:data d.img >/dev/null",
            "d.img",
        );
        let path = dir.0.join("big.img");
        std::fs::write(&path, &small).unwrap();
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(96 << 20).unwrap();
        (path, small)
    }

    #[test]
    fn relocated_backup_passes_sgdisk_verify() {
        let dir = Scratch::new("grow");
        let (path, small) = grown_disk(&dir);
        let small_path = dir.0.join("small.img");
        std::fs::write(&small_path, &small).unwrap();
        let before = sgdisk(&["-p"], &small_path);
        // As deployed: sgdisk finds the backup in the wrong place.
        assert!(!sgdisk(&["-v"], &path).contains("No problems found"));

        let t = Target::open_disk(&path, None).unwrap();
        relocate_backup(&t, 512).unwrap();
        let v = sgdisk(&["-v"], &path);
        assert!(v.contains("No problems found"), "{v}");
        let after = sgdisk(&["-p"], &path);
        assert_eq!(partition_lines(&after), partition_lines(&before));
        assert_eq!(partition_lines(&after).len(), 2);
        assert_eq!(last_usable(&before), (64 << 11) - 34);
        assert_eq!(last_usable(&after), (96 << 11) - 34);
        // The stale backup header at the old end is gone; the new one is in the last LBA.
        let mut h = [0u8; 8];
        t.read_at(&mut h, (64 << 20) - 512).unwrap();
        assert_eq!(h, [0; 8]);
        t.read_at(&mut h, (96 << 20) - 512).unwrap();
        assert_eq!(&h, b"EFI PART");
        // Idempotent: a second run finds the backup already at the end.
        relocate_backup(&t, 512).unwrap();
        assert!(sgdisk(&["-v"], &path).contains("No problems found"));
    }

    /// Mutated primary headers (mostly re-sealed so they get past the CRC) are refused or
    /// relocated, never a panic.
    #[test]
    fn mutated_primary_headers_never_panic() {
        let dir = Scratch::new("mut");
        let (path, small) = grown_disk(&dir);
        let t = Target::open_disk(&path, None).unwrap();
        let head = &small[..34 * 512];
        let mut rng = TestRng(0x5EC7);
        for i in 0..300 {
            let mut h = head.to_vec();
            rng.mutate_in(&mut h, &[(512, 92)]);
            if i % 4 != 0 {
                let mut z = h[512..604].to_vec();
                z[16..20].fill(0);
                let c = crc32fast::hash(&z).to_le_bytes();
                h[512 + 16..512 + 20].copy_from_slice(&c);
            }
            t.write_at(&h, 0).unwrap();
            let _ = relocate_backup(&t, 512);
            let _ = relocate_backup(&t, 4096);
        }
        assert!(relocate_backup(&t, 1000).is_err());
    }
}
