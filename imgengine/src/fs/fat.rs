//! FAT12/16/32: boot-sector geometry, label, and the used map read from the FAT itself.
//!
//! Layout (Microsoft "FAT: General Overview of On-Disk Format", 2000): reserved sectors
//! (boot sector, FSInfo and the backup boot sector on FAT32), then `NumFATs` copies of the
//! FAT, then (FAT12/16 only) the fixed root directory, then the data area of clusters
//! numbered from 2. The FAT type is decided the way Linux and dosfstools decide it, not by the
//! type string: a FAT12/16 FAT size field of 0 means FAT32 (whatever the cluster count:
//! `mkfs.fat -F 32` on a small partition gives fewer than 65,525 clusters); otherwise the
//! cluster count decides (< 4085: FAT12, < 65525: FAT16), as the Microsoft spec says.
//!
//! A cluster is in use when its FAT entry is non-zero (allocated, end of chain, or marked
//! bad); everything before the data area is metadata and always captured.

use crate::error::{IoContext, Result};
use crate::extent::Extent;
use crate::fs::{broken, FsKind};
use crate::io::ReadAt;

/// The BPB fields a capture needs, validated against each other and the partition size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootSector {
    pub bytes_per_sector: u32,
    pub sectors_per_cluster: u32,
    pub reserved_sectors: u32,
    pub num_fats: u32,
    pub root_entries: u32,
    pub total_sectors: u64,
    pub fat_sectors: u64,
    /// First sector of the data area (cluster 2).
    pub first_data_sector: u64,
    pub cluster_count: u64,
    kind: FsKind,
    label: Option<String>,
}

fn le16(b: &[u8], at: usize) -> u32 {
    u32::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

/// A boot sector that claims to be FAT: jump instruction, 0x55AA signature, and the
/// "FAT" type string of the FAT12/16 or FAT32 extended BPB. Returns the kind the string
/// names (used only when the geometry is broken, to say what was found).
pub(crate) fn claimed_kind(head: &[u8]) -> Option<FsKind> {
    if head.len() < 512 || head[510..512] != [0x55, 0xAA] || !(head[0] == 0xEB || head[0] == 0xE9) {
        return None;
    }
    match (&head[54..62], &head[82..90]) {
        (b"FAT12   ", _) => Some(FsKind::Fat12),
        (b"FAT16   ", _) => Some(FsKind::Fat16),
        (_, b"FAT32   ") => Some(FsKind::Fat32),
        (t, _) if t.starts_with(b"FAT") => Some(FsKind::Fat16),
        _ => None,
    }
}

impl BootSector {
    /// Parse and cross-check the BPB in `head` (at least 512 bytes) of a partition of
    /// `part_len` bytes. The error text says which value is wrong.
    pub fn parse(head: &[u8], part_len: u64) -> std::result::Result<BootSector, String> {
        if claimed_kind(head).is_none() {
            return Err("no FAT boot sector signature".into());
        }
        let bps = le16(head, 11);
        if !matches!(bps, 512 | 1024 | 2048 | 4096) {
            return Err(format!("bytes per sector {bps}"));
        }
        let spc = u32::from(head[13]);
        if spc == 0 || !spc.is_power_of_two() {
            return Err(format!("sectors per cluster {spc}"));
        }
        let reserved = le16(head, 14);
        if reserved == 0 {
            return Err("0 reserved sectors".into());
        }
        let num_fats = u32::from(head[16]);
        if num_fats == 0 {
            return Err("0 FAT copies".into());
        }
        let root_entries = le16(head, 17);
        let total = match le16(head, 19) {
            0 => u64::from(le32(head, 32)),
            n => u64::from(n),
        };
        let fat16_size = le16(head, 22);
        let fat_sectors = match fat16_size {
            0 => u64::from(le32(head, 36)),
            n => u64::from(n),
        };
        if total == 0 || fat_sectors == 0 {
            return Err(format!("total sectors {total}, FAT sectors {fat_sectors}"));
        }
        let bps64 = u64::from(bps);
        let root_dir_sectors = (u64::from(root_entries) * 32).div_ceil(bps64);
        let first_data = u64::from(num_fats)
            .checked_mul(fat_sectors)
            .and_then(|f| f.checked_add(u64::from(reserved)))
            .and_then(|f| f.checked_add(root_dir_sectors))
            .ok_or("FAT area size overflows")?;
        if first_data >= total {
            return Err(format!(
                "data area starts at sector {first_data}, beyond the {total} sectors of the volume"
            ));
        }
        let fs_bytes = total.checked_mul(bps64).ok_or("volume size overflows")?;
        if fs_bytes > part_len {
            return Err(format!(
                "volume of {fs_bytes} bytes is larger than its {part_len}-byte partition"
            ));
        }
        let cluster_count = (total - first_data) / u64::from(spc);
        // Linux (fs/fat/inode.c) and dosfstools decide as follows: a FAT size of 0 in the
        // FAT12/16 field means FAT32, whatever the cluster count (mkfs.fat -F 32 makes such
        // volumes with fewer than 65,525 clusters on small partitions); otherwise the
        // cluster count decides between FAT12 and FAT16, as the Microsoft spec says.
        let kind = if fat16_size == 0 {
            FsKind::Fat32
        } else if cluster_count < 4085 {
            FsKind::Fat12
        } else if cluster_count < 65525 {
            FsKind::Fat16
        } else {
            return Err(format!(
                "{cluster_count} clusters are too many for FAT16, but the FAT16 FAT size field is {fat16_size}, not 0 as FAT32 needs"
            ));
        };
        if kind == FsKind::Fat32 && root_entries != 0 {
            return Err(format!(
                "FAT32 (FAT16 FAT size 0) with a FAT12/16 root directory of {root_entries} entries"
            ));
        }
        // FAT32 cluster numbers are 28 bits, and 0x0FFFFFF7 and up are reserved values.
        if kind == FsKind::Fat32 && cluster_count > 0x0FFF_FFF5 {
            return Err(format!("{cluster_count} clusters are too many for FAT32"));
        }
        // The FAT must have an entry for every cluster (+ the two reserved entries).
        let entries = cluster_count + 2;
        let fat_needed = match kind {
            FsKind::Fat12 => (entries * 3).div_ceil(2),
            FsKind::Fat16 => entries * 2,
            _ => entries * 4,
        };
        if fat_needed > fat_sectors * bps64 {
            return Err(format!(
                "{cluster_count} clusters need {fat_needed} bytes of FAT, the FAT has {}",
                fat_sectors * bps64
            ));
        }
        // Volume label of the extended BPB (signature 0x29); "NO NAME" means none.
        let (sig_at, label_at) = if kind == FsKind::Fat32 {
            (66, 71)
        } else {
            (38, 43)
        };
        let label = if head[sig_at] == 0x29 {
            let s = String::from_utf8_lossy(&head[label_at..label_at + 11])
                .trim_end()
                .to_string();
            (!s.is_empty() && s != "NO NAME").then_some(s)
        } else {
            None
        };
        Ok(BootSector {
            bytes_per_sector: bps,
            sectors_per_cluster: spc,
            reserved_sectors: reserved,
            num_fats,
            root_entries,
            total_sectors: total,
            fat_sectors,
            first_data_sector: first_data,
            cluster_count,
            kind,
            label,
        })
    }

    pub fn kind(&self) -> FsKind {
        self.kind
    }

    pub fn label(&self) -> Option<String> {
        self.label.clone()
    }

    pub fn cluster_size(&self) -> u64 {
        u64::from(self.bytes_per_sector) * u64::from(self.sectors_per_cluster)
    }

    /// Byte offset (in the partition) of the first data cluster, number 2.
    pub fn data_offset(&self) -> u64 {
        self.first_data_sector * u64::from(self.bytes_per_sector)
    }
}

/// Read the boot sector of the FAT at `offset`; a broken one is an error naming the offset.
pub fn read_boot_sector(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Result<BootSector> {
    let mut head = [0u8; 512];
    dev.read_exact_at(&mut head, offset)
        .ctx(|| format!("reading the FAT boot sector at offset {offset}"))?;
    BootSector::parse(&head, len).map_err(|why| broken("FAT", offset, why))
}

/// How many FAT bytes are read at a time: big enough to keep a disk streaming, small
/// enough that a 2 TiB FAT32 does not need its whole FAT in memory. A multiple of 4 so a
/// FAT16/FAT32 entry never straddles two reads.
const FAT_BLOCK: u64 = 1 << 20;

/// The used extents (relative to the partition start, sorted, not yet normalized) of the
/// FAT file system at `offset`: everything up to the data area plus every cluster whose
/// entry in the first FAT is non-zero.
pub fn used_extents(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Result<Vec<Extent>> {
    let bs = read_boot_sector(dev, offset, len)?;
    let bps = u64::from(bs.bytes_per_sector);
    let fat_start = offset + u64::from(bs.reserved_sectors) * bps; // < len, checked by parse
    let csize = bs.cluster_size();
    let data = bs.data_offset();
    let mut runs = Runs {
        out: vec![Extent::new(0, data)],
        data,
        csize,
        start: None,
    };
    let last = bs.cluster_count + 2; // one past the last cluster number

    match bs.kind {
        FsKind::Fat12 => {
            // At most 4086 entries of 12 bits: read the whole table at once.
            let bytes = (last * 3).div_ceil(2);
            let mut fat = vec![0u8; bytes as usize];
            dev.read_exact_at(&mut fat, fat_start)
                .ctx(|| format!("reading the FAT at offset {fat_start}"))?;
            for c in 2..last {
                let i = (c + c / 2) as usize;
                let pair = u16::from_le_bytes([fat[i], fat.get(i + 1).copied().unwrap_or(0)]);
                let v = if c % 2 == 0 { pair & 0x0FFF } else { pair >> 4 };
                runs.cluster(c, v != 0);
            }
        }
        FsKind::Fat16 | FsKind::Fat32 => {
            let width: u64 = if bs.kind == FsKind::Fat16 { 2 } else { 4 };
            let total = last * width;
            let mut buf = vec![0u8; FAT_BLOCK.min(total) as usize];
            let mut pos = 0u64;
            while pos < total {
                let n = (total - pos).min(FAT_BLOCK) as usize;
                let at = fat_start + pos;
                dev.read_exact_at(&mut buf[..n], at)
                    .ctx(|| format!("reading the FAT at offset {at}"))?;
                for (k, e) in buf[..n].chunks_exact(width as usize).enumerate() {
                    let c = pos / width + k as u64;
                    if c < 2 {
                        continue;
                    }
                    // FAT32 entries are 28 bits; the top 4 are reserved (spec §4).
                    let used = if width == 2 {
                        e != [0, 0]
                    } else {
                        le32(e, 0) & 0x0FFF_FFFF != 0
                    };
                    runs.cluster(c, used);
                }
                pos += n as u64;
            }
        }
        _ => unreachable!("read_boot_sector only returns FAT kinds"),
    }
    runs.cluster(last, false);
    Ok(runs.out)
}

/// Turns a sequence of used/free cluster flags into byte extents, one per run.
struct Runs {
    out: Vec<Extent>,
    data: u64,
    csize: u64,
    start: Option<u64>,
}

impl Runs {
    fn cluster(&mut self, c: u64, used: bool) {
        match (used, self.start) {
            (true, None) => self.start = Some(c),
            (false, Some(s)) => {
                self.out.push(Extent::new(
                    self.data + (s - 2) * self.csize,
                    (c - s) * self.csize,
                ));
                self.start = None;
            }
            _ => {}
        }
    }
}

/// Fuzz entry point for the FAT parser alone.
pub fn fuzz_fat(data: &[u8]) {
    let len = data.len() as u64;
    if let Ok(ext) = used_extents(data, 0, len) {
        for e in ext {
            assert!(
                e.end().is_some_and(|end| end <= len),
                "extent {e:?} outside the partition"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::{used_map, TestRng};

    /// A minimal FAT16 volume (512-byte sectors, 1 sector/cluster, 1 reserved,
    /// 2 FATs of 80 sectors, 512 root entries, 20480 sectors).
    fn fat16_image() -> Vec<u8> {
        let total: u64 = 20480;
        let mut img = vec![0u8; (total * 512) as usize];
        img[0] = 0xEB;
        img[11..13].copy_from_slice(&512u16.to_le_bytes());
        img[13] = 1;
        img[14..16].copy_from_slice(&1u16.to_le_bytes());
        img[16] = 2;
        img[17..19].copy_from_slice(&512u16.to_le_bytes());
        img[19..21].copy_from_slice(&(total as u16).to_le_bytes());
        img[22..24].copy_from_slice(&80u16.to_le_bytes());
        img[38] = 0x29;
        img[43..54].copy_from_slice(b"TESTVOL    ");
        img[54..62].copy_from_slice(b"FAT16   ");
        img[510] = 0x55;
        img[511] = 0xAA;
        // FAT: media + EOC, then cluster 2 (end of chain), 3 -> 4 -> EOC, 10 bad.
        let fat = 512;
        for (c, v) in [
            (0u16, 0xFFF8u16),
            (1, 0xFFFF),
            (2, 0xFFFF),
            (3, 4),
            (4, 0xFFFF),
            (10, 0xFFF7),
        ] {
            let i = fat + usize::from(c) * 2;
            img[i..i + 2].copy_from_slice(&v.to_le_bytes());
        }
        img
    }

    #[test]
    fn fat16_geometry_label_and_used_clusters() {
        let img = fat16_image();
        let bs = BootSector::parse(&img[..512], img.len() as u64).unwrap();
        assert_eq!(bs.kind(), FsKind::Fat16);
        assert_eq!(bs.label().as_deref(), Some("TESTVOL"));
        assert_eq!(bs.first_data_sector, 1 + 160 + 32);
        let data = bs.data_offset();
        let m = used_map(img.as_slice(), 0, img.len() as u64).unwrap();
        assert_eq!(m.kind, FsKind::Fat16);
        assert_eq!(
            m.extents.unwrap(),
            vec![
                Extent::new(0, data + 3 * 512),
                Extent::new(data + 8 * 512, 512)
            ]
        );
        assert_eq!(m.used_bytes, data + 4 * 512);
    }

    /// What `mkfs.fat -F 32` makes on small partitions: a FAT32 (FAT size 16 = 0, root in
    /// a cluster) with fewer than 65,525 clusters. Linux and dosfstools read it as FAT32;
    /// counting clusters alone calls it FAT16, and a capture then reads the FAT with 16-bit
    /// entries and drops the files.
    #[test]
    fn small_fat32_from_mkfs_is_fat32_and_its_files_are_used() {
        for (kb, extra) in [(8192, ""), (32768, ""), (16384, "-S 4096 -s 1")] {
            // mtools reads such a volume as FAT16 too and cannot write to it; fusefat (the
            // FAT FUSE driver) reads it as FAT32, as the Linux kernel does.
            let script = format!(
                "mkfs.fat -C -F 32 {extra} -n SMALL32 v.img {kb} >/dev/null 2>&1
                 head -c 300000 /dev/urandom > a
                 mkdir m; fusefat -f -o rw+ v.img m & pid=$!
                 for _ in $(seq 100); do mountpoint -q m && break; sleep 0.1; done
                 cp a m/A; mkdir m/D; cp a m/D/B
                 fusermount -u m; wait $pid
                 fsck.fat -n v.img >/dev/null"
            );
            let img = crate::fs::made_by(&script, "v.img");
            let len = img.len() as u64;
            let bs = BootSector::parse(&img[..512], len).unwrap();
            assert!(bs.cluster_count < 65525, "{kb} KiB {extra}: {bs:?}");
            assert_eq!(bs.kind(), FsKind::Fat32, "{kb} KiB {extra}");
            assert_eq!(bs.label().as_deref(), Some("SMALL32"));
            let m = used_map(img.as_slice(), 0, len).unwrap();
            assert_eq!(m.kind, FsKind::Fat32);
            // Metadata, the root and D directories, and two copies of the 300 000-byte file.
            let data = bs.data_offset();
            assert!(
                m.used_bytes >= data + 2 * 300_000 + 2 * bs.cluster_size(),
                "{kb} KiB {extra}: {} bytes used",
                m.used_bytes
            );
            // The file's bytes are inside the map (64 non-zero bytes in a row: only file data).
            let a = img.windows(64).position(|w| w.iter().all(|&b| b != 0));
            let covered = |at: u64| {
                m.extents
                    .as_ref()
                    .unwrap()
                    .iter()
                    .any(|e| e.offset <= at && at < e.offset + e.len)
            };
            assert!(
                a.is_some_and(|at| covered(at as u64)),
                "{a:?} {:?} {bs:?}",
                m.extents
            );
            let last_nonzero = img.iter().rposition(|&b| b != 0).unwrap() as u64;
            assert!(
                covered(last_nonzero),
                "{kb} KiB {extra}: byte {last_nonzero}"
            );
        }
    }

    #[test]
    fn volume_larger_than_partition_is_an_error_naming_the_offset() {
        let img = fat16_image();
        let mut disk = vec![0u8; 4096];
        disk.extend_from_slice(&img);
        let err = used_map(disk.as_slice(), 4096, img.len() as u64 - 512).unwrap_err();
        let s = err.to_string();
        assert!(s.contains("offset 4096") && s.contains("-raw"), "{s}");
    }

    /// FAT12/16/32 volumes made by mkfs.fat with files from mcopy, then mutated where the
    /// parser looks (boot sector, FSInfo, backup boot sector, start of the FAT).
    #[test]
    fn mutated_mkfs_fat_volumes_never_panic() {
        let mut rng = TestRng(0xFA7);
        for (fat, kb, extra) in [(12, 2048, ""), (16, 20000, ""), (32, 40000, "-s 1")] {
            let script = format!(
                "mkfs.fat -C -F {fat} {extra} -n VOL{fat} v.img {kb} >/dev/null
                 head -c 70000 /dev/zero | tr '\\0' x > a
                 mcopy -i v.img a ::A; mmd -i v.img ::D; mcopy -i v.img a ::D/B"
            );
            let mut img = crate::fs::made_by(&script, "v.img");
            let len = img.len() as u64;
            let m = used_map(img.as_slice(), 0, len).unwrap();
            let want = format!("VOL{fat}");
            assert_eq!(m.label.as_deref(), Some(want.as_str()));
            let bs = BootSector::parse(&img[..512], len).unwrap();
            let fat_at = bs.reserved_sectors as usize * 512;
            let hot = [(0, 512), (512, 1536), (6 * 512, 512), (fat_at, 512)];
            for _ in 0..1000 {
                let undo = rng.mutate_in(&mut img, &hot);
                crate::fs::fuzz_used_map(&img);
                crate::fs::restore(&mut img, undo);
            }
        }
    }

    #[test]
    fn mutated_boot_sectors_never_panic() {
        let base = fat16_image();
        let mut rng = TestRng(42);
        for _ in 0..3000 {
            let mut img = base.clone();
            rng.mutate(&mut img, 1024);
            crate::fs::fuzz_used_map(&img);
            fuzz_fat(&img);
        }
    }
}
