//! MBR partition tables: the four primary entries through `mbrman`, and the chain of
//! extended boot records (EBRs) for logical partitions walked here.
//!
//! mbrman can walk the chain too, but its walk adds untrusted 32-bit LBAs without overflow
//! checks (a panic in debug builds) and follows the chain as long as the disk allows; the
//! walk here uses checked arithmetic, requires each link to move forward and stops after
//! [`MAX_LOGICAL`] partitions. EBR layout: entry 1 is the logical partition, relative to
//! this EBR; entry 2 links to the next EBR, relative to the start of the extended partition.

use mbrman::MBRHeader;

use crate::disk::RawPartition;
use crate::error::{Error, IoContext, Result};
use crate::extent::Extent;
use crate::fs::window::Window;
use crate::io::ReadAt;

/// Linux's own limit on partitions per disk is far above what MBR users make; 128 logicals
/// keeps a looping or hostile chain short.
const MAX_LOGICAL: usize = 128;

const SECTOR: u64 = 512;

/// True when one of the four primary entries is a GPT protective entry (type 0xEE).
pub(crate) fn has_protective_entry(sector0: &[u8; 512]) -> bool {
    (0..4).any(|i| sector0[446 + i * 16 + 4] == 0xEE)
}

/// The name fdisk gives an MBR partition type.
pub fn type_name(sys: u8) -> &'static str {
    match sys {
        0x01 => "FAT12",
        0x04 => "FAT16 <32M",
        0x05 => "Extended",
        0x06 => "FAT16",
        0x07 => "HPFS/NTFS/exFAT",
        0x0b => "W95 FAT32",
        0x0c => "W95 FAT32 (LBA)",
        0x0e => "W95 FAT16 (LBA)",
        0x0f => "W95 Ext'd (LBA)",
        0x11 => "Hidden FAT12",
        0x14 => "Hidden FAT16 <32M",
        0x16 => "Hidden FAT16",
        0x17 => "Hidden HPFS/NTFS",
        0x1b => "Hidden W95 FAT32",
        0x1c => "Hidden W95 FAT32 (LBA)",
        0x1e => "Hidden W95 FAT16 (LBA)",
        0x27 => "Hidden NTFS WinRE",
        0x82 => "Linux swap / Solaris",
        0x83 => "Linux",
        0x85 => "Linux extended",
        0x8e => "Linux LVM",
        0xa5 => "FreeBSD",
        0xee => "GPT",
        0xef => "EFI (FAT-12/16/32)",
        0xfd => "Linux raid autodetect",
        _ => "Unknown",
    }
}

fn is_extended(sys: u8) -> bool {
    matches!(sys, 0x05 | 0x0f | 0x85)
}

fn raw(number: u32, sys: u8, lba: u64, sectors: u64) -> RawPartition {
    RawPartition {
        number,
        start: lba * SECTOR,
        len: sectors * SECTOR,
        type_id: format!("{sys:#04x}"),
        type_name: type_name(sys).to_string(),
        label: None,
    }
}

/// One 16-byte entry of an MBR or EBR: (type, start LBA, sectors).
fn entry(sector: &[u8; 512], i: usize) -> (u8, u64, u64) {
    let e = &sector[446 + i * 16..462 + i * 16];
    let lba = u32::from_le_bytes([e[8], e[9], e[10], e[11]]);
    let n = u32::from_le_bytes([e[12], e[13], e[14], e[15]]);
    (e[4], u64::from(lba), u64::from(n))
}

/// Read an MBR (sector 0 already checked for 0x55AA) and its logical partitions.
pub(crate) fn read(
    dev: &(impl ReadAt + ?Sized),
    disk_size: u64,
) -> Result<(Vec<RawPartition>, Vec<Extent>)> {
    let mut win = Window::new(dev, 0, disk_size);
    let header = MBRHeader::read_from(&mut win).map_err(|e| {
        Error::corrupt(format!(
            "reading the MBR: {e}; repair it with fdisk or capture the whole disk raw with -raw"
        ))
    })?;
    let mut parts = Vec::new();
    let mut extents = vec![Extent::new(0, SECTOR)];
    let mut extended = None;
    for (i, e) in header.iter() {
        if e.is_unused() || e.sectors == 0 {
            continue;
        }
        if is_extended(e.sys) {
            if extended.is_none() {
                extended = Some((u64::from(e.starting_lba), u64::from(e.sectors)));
            }
            continue;
        }
        parts.push(raw(
            i as u32,
            e.sys,
            u64::from(e.starting_lba),
            u64::from(e.sectors),
        ));
    }

    if let Some((ext_lba, ext_sectors)) = extended {
        let ext_end = ext_lba + ext_sectors;
        let mut rel = 0u64; // EBR position relative to the extended partition
        let mut number = 5u32;
        let mut ebrs = 0usize;
        loop {
            ebrs += 1;
            if ebrs > MAX_LOGICAL + 1 {
                return Err(Error::corrupt(format!("more than {MAX_LOGICAL} extended boot records; capture the whole disk raw with -raw")));
            }
            let ebr_lba = ext_lba + rel;
            let at = ebr_lba * SECTOR;
            if ebr_lba >= ext_end || at + SECTOR > disk_size {
                return Err(Error::corrupt(format!(
                    "extended boot record {number} at sector {ebr_lba} is outside the extended partition or the disk; repair it with fdisk or capture the whole disk raw with -raw"
                )));
            }
            let mut ebr = [0u8; 512];
            dev.read_exact_at(&mut ebr, at)
                .ctx(|| format!("reading the extended boot record at offset {at}"))?;
            if ebr[510..512] != [0x55, 0xAA] {
                if rel == 0 {
                    break; // an empty extended partition need not have an EBR
                }
                return Err(Error::corrupt(format!(
                    "extended boot record at offset {at} has no 55AA signature; repair it with fdisk or capture the whole disk raw with -raw"
                )));
            }
            extents.push(Extent::new(at, SECTOR));
            let (sys, lrel, lsectors) = entry(&ebr, 0);
            if sys != 0 && lsectors != 0 {
                parts.push(raw(number, sys, ebr_lba + lrel, lsectors));
                number += 1;
            }
            let (nsys, next, _) = entry(&ebr, 1);
            if nsys == 0 || next == 0 {
                break;
            }
            if next <= rel {
                return Err(Error::corrupt(format!(
                    "extended boot record at offset {at} links backwards (to sector {}); repair it with fdisk or capture the whole disk raw with -raw",
                    ext_lba + next
                )));
            }
            rel = next;
        }
    }
    Ok((parts, extents))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::disk::{fuzz_read_layout, read_layout, TableKind};
    use crate::fs::TestRng;

    fn put(sector: &mut [u8], i: usize, sys: u8, lba: u32, n: u32) {
        let e = &mut sector[446 + i * 16..462 + i * 16];
        e[4] = sys;
        e[8..12].copy_from_slice(&lba.to_le_bytes());
        e[12..16].copy_from_slice(&n.to_le_bytes());
    }

    /// 8 MiB disk: p1 FAT32 LBA at 2048 (4096 sectors), extended at 6144 (10240 sectors)
    /// holding logicals 5 (2048 sectors) and 6 (4096 sectors).
    fn mbr_image() -> Vec<u8> {
        let mut img = vec![0u8; 8 << 20];
        put(&mut img, 0, 0x0c, 2048, 4096);
        put(&mut img, 1, 0x05, 6144, 10240);
        img[510] = 0x55;
        img[511] = 0xAA;
        let ebr1 = 6144 * 512;
        put(&mut img[ebr1..], 0, 0x83, 2048, 2048);
        put(&mut img[ebr1..], 1, 0x05, 4096, 6144);
        img[ebr1 + 510] = 0x55;
        img[ebr1 + 511] = 0xAA;
        let ebr2 = (6144 + 4096) * 512;
        put(&mut img[ebr2..], 0, 0x07, 2048, 4096);
        img[ebr2 + 510] = 0x55;
        img[ebr2 + 511] = 0xAA;
        img
    }

    #[test]
    fn primary_and_logical_partitions() {
        let img = mbr_image();
        let l = read_layout(img.as_slice(), img.len() as u64).unwrap();
        assert_eq!(l.table, TableKind::Mbr);
        let got: Vec<(u32, u64, u64, &str)> = l
            .partitions
            .iter()
            .map(|p| (p.number, p.start / 512, p.len / 512, p.type_id.as_str()))
            .collect();
        assert_eq!(
            got,
            vec![
                (1, 2048, 4096, "0x0c"),
                (5, 8192, 2048, "0x83"),
                (6, 12288, 4096, "0x07")
            ]
        );
        assert_eq!(l.partitions[0].type_name, "W95 FAT32 (LBA)");
        assert_eq!(
            l.table_extents,
            vec![
                Extent::new(0, 512),
                Extent::new(6144 * 512, 512),
                Extent::new(10240 * 512, 512)
            ]
        );
    }

    #[test]
    fn looping_chain_is_an_error() {
        let mut img = mbr_image();
        let ebr2 = (6144 + 4096) * 512;
        put(&mut img[ebr2..], 1, 0x05, 4096, 10);
        let e = read_layout(img.as_slice(), img.len() as u64).unwrap_err();
        assert!(e.to_string().contains("links backwards"), "{e}");
    }

    #[test]
    fn partition_past_the_disk_end_names_it() {
        let mut img = mbr_image();
        put(&mut img, 2, 0x83, 16000, 4096);
        let e = read_layout(img.as_slice(), img.len() as u64).unwrap_err();
        assert!(e.to_string().contains("partition 3"), "{e}");
    }

    /// An MBR made by sfdisk with an extended partition and two logical ones, mutated in
    /// the MBR and both EBRs.
    #[test]
    fn mutated_sfdisk_tables_never_panic() {
        let mut img = crate::fs::made_by(
            "truncate -s 16M m.img
             printf 'label: dos\\nstart=2048, size=4M, type=c\\nstart=10240, type=5\\nsize=3M, type=83\\nsize=2M, type=7\\n' | sfdisk -q m.img",
            "m.img",
        );
        let l = read_layout(img.as_slice(), img.len() as u64).unwrap();
        let numbers: Vec<u32> = l.partitions.iter().map(|p| p.number).collect();
        assert_eq!(numbers, vec![1, 5, 6]);
        let hot: Vec<(usize, usize)> = l
            .table_extents
            .iter()
            .map(|e| (e.offset as usize + 446, 66))
            .collect();
        let mut rng = TestRng(0x3B3);
        for _ in 0..3000 {
            let undo = rng.mutate_in(&mut img, &hot);
            fuzz_read_layout(&img);
            crate::fs::restore(&mut img, undo);
        }
    }

    #[test]
    fn mutated_tables_never_panic() {
        let base = mbr_image();
        let mut rng = TestRng(5);
        let hot = [0usize, 6144 * 512, 10240 * 512];
        for i in 0..3000 {
            let mut img = base.clone();
            let h = hot[i % 3];
            rng.mutate(&mut img[h..], 512);
            fuzz_read_layout(&img);
        }
    }
}
