//! The hidden-sectors field of a partition's boot sector, after the partition's content was
//! written at another place than where it was captured.
//!
//! FAT (BPB offset 0x1C, `BPB_HiddSec`) and NTFS (offset 0x1C too) record how many sectors
//! precede the partition on its disk: the start LBA. Linux ignores it, but boot code uses it
//! to find the volume: Windows does not boot from an NTFS whose value is wrong, nor DOS-era
//! loaders from such a FAT. A partition image restored into a partition that starts
//! elsewhere (or a raw image of a partition written there) carries the old value, so after
//! the deploy the field is set to the partition's start in the disk's logical sectors.
//!
//! The copies are fixed too, so that `fsck.fat` and `ntfsfix` find them equal to the boot
//! sector: FAT32's backup boot sector (`BPB_BkBootSec`, normally sector 6) and NTFS's backup
//! in the partition's last sector and right after the declared volume end. A copy is only
//! rewritten when it was identical to the boot sector before the change: anything else is
//! not ours to touch.

use crate::error::{IoContext, Result};
use crate::fs::{fat, ntfs};
use crate::io::WriteAt;

/// Where the field is, in both FAT and NTFS boot sectors.
const HIDDEN_AT: usize = 0x1C;

/// The boot-sector copies (byte offsets in the partition, the boot sector itself first) of
/// the FAT or NTFS boot sector `head` (512 bytes at least) in a partition of `part_len`
/// bytes, with the file-system name; `None` for anything else. Pure, for the fuzz target:
/// every offset returned lies inside the partition with room for 512 bytes.
pub fn boot_sector_copies(head: &[u8], part_len: u64) -> Option<(&'static str, Vec<u64>)> {
    if head.len() < 512 || part_len < 512 {
        return None;
    }
    let le16 = |at: usize| u64::from(u16::from_le_bytes([head[at], head[at + 1]]));
    let fits = |off: u64| off.checked_add(512).is_some_and(|end| end <= part_len);
    let mut copies = vec![0u64];
    let kind = if ntfs::looks_like_ntfs(head) {
        let bps = le16(0x0B);
        if !matches!(bps, 512 | 1024 | 2048 | 4096) {
            return None;
        }
        let total = u64::from_le_bytes(head[0x28..0x30].try_into().ok()?);
        // mkntfs writes a copy right after the declared volume end; the partition's last
        // sector holds the one Windows uses.
        if let Some(after) = total.checked_mul(bps) {
            copies.push(after);
        }
        copies.push((part_len / bps).saturating_sub(1) * bps);
        "NTFS"
    } else {
        let bs = fat::BootSector::parse(head, part_len).ok()?;
        if bs.kind() == crate::fs::FsKind::Fat32 {
            let backup = le16(50);
            if backup != 0 && backup < u64::from(bs.reserved_sectors) {
                copies.push(backup * u64::from(bs.bytes_per_sector));
            }
        }
        "FAT"
    };
    copies.retain(|&o| fits(o));
    copies.sort_unstable();
    copies.dedup();
    Some((kind, copies))
}

/// Set the hidden-sectors field of the FAT or NTFS boot sector at the start of `part` (a
/// partition that starts `start` bytes into its disk, whose LBAs count `ss`-byte sectors)
/// and of its identical copies to the partition's start LBA. Returns a note for the user
/// when something was changed; other content, a boot sector that does not parse, or a
/// start beyond 32 bits is left alone.
pub fn fix_hidden_sectors(
    part: &(impl WriteAt + ?Sized),
    start: u64,
    ss: u64,
) -> Result<Option<String>> {
    let len = part.size();
    if len < 512 || ss == 0 {
        return Ok(None);
    }
    let read = |buf: &mut [u8; 512], off: u64| {
        part.read_exact_at(buf, off).ctx(|| {
            format!(
                "reading 512 bytes at offset {off} of {}",
                part.path().display()
            )
        })
    };
    let mut head = [0u8; 512];
    read(&mut head, 0)?;
    let Some((kind, copies)) = boot_sector_copies(&head, len) else {
        return Ok(None);
    };
    let old = u32::from_le_bytes(head[HIDDEN_AT..HIDDEN_AT + 4].try_into().expect("4 bytes"));
    if !start.is_multiple_of(ss) {
        return Ok(Some(format!(
            "the {kind} partition at byte {start} does not start on a {ss}-byte sector: its hidden-sectors field ({old}) was left alone"
        )));
    }
    let Ok(start) = u32::try_from(start / ss) else {
        return Ok(Some(format!(
            "the {kind} partition starts at sector {}, beyond what its 32-bit hidden-sectors field can hold: left at {old}",
            start / ss
        )));
    };
    if old == start {
        return Ok(None);
    }
    let mut new = head;
    new[HIDDEN_AT..HIDDEN_AT + 4].copy_from_slice(&start.to_le_bytes());
    // Copies first, the boot sector last: until the end, the boot sector still matches
    // what a re-run compares against.
    let mut buf = [0u8; 512];
    for &off in copies.iter().rev() {
        if off == 0 {
            continue;
        }
        read(&mut buf, off)?;
        if buf == head {
            part.write_at(&new, off)?;
        }
    }
    part.write_at(&new, 0)?;
    part.sync()?;
    Ok(Some(format!(
        "set the {kind} boot sector's hidden sectors from {old} to {start}, the partition's start sector"
    )))
}

/// Fuzz entry point: the copies of any boot sector lie inside the partition.
pub fn fuzz_hidden(data: &[u8]) {
    let len = data.len() as u64;
    if let Some((_, copies)) = boot_sector_copies(data, len) {
        for o in copies {
            assert!(
                o + 512 <= len,
                "copy at {o} outside the {len}-byte partition"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::TestRng;

    #[test]
    fn copies_of_mkfs_fat32_and_mkntfs_boot_sectors() {
        let fat = crate::fs::made_by("mkfs.fat -C -F 32 -s 1 v.img 40000 >/dev/null", "v.img");
        let (k, c) = boot_sector_copies(&fat[..512], fat.len() as u64).unwrap();
        assert_eq!((k, c), ("FAT", vec![0, 6 * 512]));
        assert_eq!(fat[..512], fat[6 * 512..7 * 512]);
        let fat16 = crate::fs::made_by("mkfs.fat -C -F 16 v.img 20000 >/dev/null", "v.img");
        assert_eq!(
            boot_sector_copies(&fat16[..512], fat16.len() as u64).unwrap(),
            ("FAT", vec![0])
        );
        let nt = crate::fs::made_by(
            "truncate -s 4M n.img; mkntfs -F -Q -q n.img >/dev/null 2>&1",
            "n.img",
        );
        let len = nt.len() as u64;
        let (k, c) = boot_sector_copies(&nt[..512], len).unwrap();
        assert_eq!(k, "NTFS");
        assert_eq!(*c.last().unwrap(), len - 512);
        for o in &c {
            assert_eq!(nt[..512], nt[*o as usize..*o as usize + 512], "copy at {o}");
        }
        assert_eq!(boot_sector_copies(&[0u8; 512], 4096), None);
    }

    #[test]
    fn mutated_boot_sectors_never_panic_and_stay_inside() {
        let mut rng = TestRng(0x1C);
        for script in [
            "mkfs.fat -C -F 32 -s 1 v.img 40000 >/dev/null",
            "mkfs.fat -C -F 12 v.img 2000 >/dev/null",
            "truncate -s 2M v.img; mkntfs -F -Q -q v.img >/dev/null 2>&1",
        ] {
            let img = crate::fs::made_by(script, "v.img");
            let mut head = img[..4096].to_vec();
            for _ in 0..2000 {
                let undo = rng.mutate_in(&mut head, &[(0, 90)]);
                let cut = rng.below(4097) as usize;
                fuzz_hidden(&head[..cut]);
                let len = rng.below(1 << 40);
                if let Some((_, c)) = boot_sector_copies(&head, len) {
                    assert!(c.iter().all(|&o| o + 512 <= len));
                }
                crate::fs::restore(&mut head, undo);
            }
        }
    }
}
