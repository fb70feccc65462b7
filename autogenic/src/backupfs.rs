//! The backup partition's file system: FAT32 made here (there is no mkfs in the initramfs),
//! with every file preallocated, contiguous and at its final size.
//!
//! ```text
//! /                      volume label IMGBACKUP
//! /IMGBACK/STATUS.DAT    512 KiB: two 256 KiB slots in grub::store's record format
//! /IMGBACK/IMAGE.000     the image's bytes 0 .. 4 GiB - 1 cluster
//! /IMGBACK/IMAGE.001     the next 4 GiB - 1 cluster, ... until the partition is full
//! ```
//!
//! FAT32 files are at most 4 GiB − 1 byte long, so the image is cut into segments of
//! 4 GiB − 1 cluster (a whole number of clusters). [`format`] writes the boot sector and its
//! backup, FSInfo and its backup, both FATs (one chain per file, cluster after cluster),
//! the two directories and a zeroed status file; the segments' data is not written (fast on
//! flash). Afterwards nothing allocates: the area writes only inside these files' clusters,
//! so a power cut can damage nothing but the bytes being written, and `fsck.fat -n` stays
//! clean.
//!
//! Write order: the boot sector is zeroed and synced first, then everything else is written
//! and synced, then the boot sector last and synced. A cut before the end leaves a
//! partition without a FAT boot sector, which [`crate::area::BackupArea::open`] reports as
//! "not formatted" (convert again), never a half-made file system that looks valid.

use anyhow::{bail, Context};
use grub::bootpart::Disk;

/// GPT partition name and FAT volume label of the backup partition.
pub const LABEL: &str = "IMGBACKUP";
/// The directory holding the area's files.
pub const DIR: &str = "/IMGBACK";
/// The status file: two slots of [`grub::store::SLOT_LEN`].
pub const STATUS_FILE: &str = "/IMGBACK/STATUS.DAT";
/// Its length.
pub const STATUS_LEN: u64 = grub::store::FILE_LEN as u64;
/// At most this many segments (IMAGE.000 to IMAGE.999).
pub const MAX_SEGMENTS: usize = 1000;
/// FAT32's smallest legal cluster count (fewer is FAT16 to Windows).
const MIN_CLUSTERS: u64 = 65525;
/// The data area starts on a 1 MiB boundary of the partition (flash erase blocks).
const ALIGN: u64 = 1 << 20;
/// The largest FAT32 cluster count (28-bit cluster numbers, reserved values above).
const MAX_CLUSTERS: u64 = 0x0FFF_FFF5;
const EOC: u32 = 0x0FFF_FFFF;

/// The path of segment `i`: "/IMGBACK/IMAGE.000".
pub fn segment_name(i: usize) -> String {
    format!("{DIR}/IMAGE.{i:03}")
}

/// What [`format`] makes of a partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Geometry {
    pub bytes_per_sector: u32,
    pub sectors_per_cluster: u32,
    pub reserved_sectors: u32,
    pub fat_sectors: u32,
    pub total_sectors: u32,
    pub cluster_count: u32,
    /// Clusters of the /IMGBACK directory.
    pub dir_clusters: u32,
    /// First cluster of STATUS.DAT.
    pub status_cluster: u32,
    /// (first cluster, length in bytes) of each segment, in order.
    pub segments: Vec<(u32, u64)>,
}

impl Geometry {
    pub fn cluster_size(&self) -> u64 {
        u64::from(self.bytes_per_sector) * u64::from(self.sectors_per_cluster)
    }
    /// Bytes of image the segments hold together.
    pub fn capacity(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }
    /// Byte offset of cluster `c` from the partition's start.
    pub fn cluster_offset(&self, c: u32) -> u64 {
        (u64::from(self.reserved_sectors) + 2 * u64::from(self.fat_sectors))
            * u64::from(self.bytes_per_sector)
            + (u64::from(c) - 2) * self.cluster_size()
    }
    fn first_free(&self) -> u32 {
        match self.segments.last() {
            Some(&(c, len)) => c + len.div_ceil(self.cluster_size()) as u32,
            None => self.status_cluster + (STATUS_LEN / self.cluster_size()) as u32,
        }
    }
    /// Clusters no file uses (left over when [`MAX_SEGMENTS`] is reached).
    pub fn free_clusters(&self) -> u32 {
        self.cluster_count + 2 - self.first_free()
    }
    /// The cluster runs of the files, (first, count), ending with a chain end: root,
    /// /IMGBACK, STATUS.DAT, segments.
    fn runs(&self) -> Vec<(u32, u32)> {
        let cs = self.cluster_size();
        let mut v = vec![
            (2, 1),
            (3, self.dir_clusters),
            (self.status_cluster, (STATUS_LEN / cs) as u32),
        ];
        v.extend(
            self.segments
                .iter()
                .map(|&(c, len)| (c, len.div_ceil(cs) as u32)),
        );
        v
    }
}

/// The cluster size for a FAT32 of `len` bytes: Microsoft's defaults (4 KiB up to 8 GiB,
/// 8 KiB to 16 GiB, 16 KiB to 32 GiB, 32 KiB above), smaller when the volume would
/// otherwise have fewer than FAT32's 65525 clusters, never below one sector.
fn cluster_size_for(len: u64, bps: u64) -> u64 {
    let mut cs: u64 = match len {
        l if l <= 8 << 30 => 4096,
        l if l <= 16 << 30 => 8192,
        l if l <= 32 << 30 => 16384,
        _ => 32768,
    };
    while cs > bps && len / cs < MIN_CLUSTERS + MIN_CLUSTERS / 8 {
        cs /= 2;
    }
    cs.max(bps)
}

/// The smallest partition [`plan`] accepts (with 512-byte sectors): FAT32's minimum
/// cluster count at 512-byte clusters, the FAT, alignment and the status file.
pub const MIN_PARTITION: u64 = 40 << 20;

/// Compute what [`format`] would make of a partition of `len` bytes with `bps`-byte
/// sectors (512 or 4096). Errors name the sizes.
pub fn plan(len: u64, bps: u32) -> anyhow::Result<Geometry> {
    if !matches!(bps, 512 | 1024 | 2048 | 4096) {
        bail!("sector size {bps} is not 512, 1024, 2048 or 4096");
    }
    let b = u64::from(bps);
    let total = (len / b).min(u64::from(u32::MAX));
    let cs = cluster_size_for(total * b, b);
    let spc = cs / b;
    let align = (ALIGN / b).max(1);
    let mut fat = 1u64;
    let (reserved, clusters) = loop {
        let reserved = (32 + 2 * fat).div_ceil(align) * align - 2 * fat;
        let data = total.saturating_sub(reserved + 2 * fat);
        let clusters = (data / spc).min(MAX_CLUSTERS);
        let need = ((clusters + 2) * 4).div_ceil(b);
        if need <= fat {
            break (reserved, clusters);
        }
        fat = need;
    };
    if clusters < MIN_CLUSTERS || reserved > u64::from(u16::MAX) {
        bail!(
            "a backup partition of {len} bytes is too small for FAT32 ({clusters} clusters of {cs} bytes; FAT32 needs {MIN_CLUSTERS}): make it at least {} MiB",
            MIN_PARTITION >> 20
        );
    }
    // Root directory: one cluster (the label and /IMGBACK). /IMGBACK: ".", "..", the
    // status file and up to MAX_SEGMENTS segments.
    let max_per_seg = (1u64 << 32) / cs - 1;
    let status_clusters = STATUS_LEN / cs;
    let data_clusters = clusters;
    // Entries needed depend on the segment count, which depends on what the directory
    // leaves: settle it in two passes.
    let mut dir_clusters = 1u64;
    let segments = loop {
        let first = 3 + dir_clusters;
        let status = first;
        let mut next = status + status_clusters;
        let end = data_clusters + 2;
        if next >= end {
            bail!(
                "a backup partition of {len} bytes leaves no room for an image after its file system"
            );
        }
        let mut segs = Vec::new();
        while next < end && segs.len() < MAX_SEGMENTS {
            let n = (end - next).min(max_per_seg);
            segs.push((next as u32, n * cs));
            next += n;
        }
        let need = (3 + segs.len() as u64) * 32;
        let have = dir_clusters * cs;
        if need <= have {
            break segs;
        }
        dir_clusters = need.div_ceil(cs);
    };
    Ok(Geometry {
        bytes_per_sector: bps,
        sectors_per_cluster: spc as u32,
        reserved_sectors: reserved as u32,
        fat_sectors: fat as u32,
        total_sectors: total as u32,
        cluster_count: clusters as u32,
        dir_clusters: dir_clusters as u32,
        status_cluster: (3 + dir_clusters) as u32,
        segments,
    })
}

/// The image capacity of a backup partition of `len` bytes (what [`format`] leaves for
/// the segments).
pub fn capacity_for(len: u64, bps: u32) -> anyhow::Result<u64> {
    Ok(plan(len, bps)?.capacity())
}

/// A 32-byte directory entry.
fn dir_entry(name: &[u8; 11], attr: u8, cluster: u32, size: u32, stamp: (u16, u16)) -> [u8; 32] {
    let mut e = [0u8; 32];
    e[..11].copy_from_slice(name);
    e[11] = attr;
    let (time, date) = stamp;
    // Creation, access and write times alike.
    e[14..16].copy_from_slice(&time.to_le_bytes());
    e[16..18].copy_from_slice(&date.to_le_bytes());
    e[18..20].copy_from_slice(&date.to_le_bytes());
    e[20..22].copy_from_slice(&((cluster >> 16) as u16).to_le_bytes());
    e[22..24].copy_from_slice(&time.to_le_bytes());
    e[24..26].copy_from_slice(&date.to_le_bytes());
    e[26..28].copy_from_slice(&(cluster as u16).to_le_bytes());
    e[28..32].copy_from_slice(&size.to_le_bytes());
    e
}

/// DOS (time, date) of now, UTC.
fn dos_now() -> (u16, u16) {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    let days = (secs / 86400) as i64;
    let rem = secs % 86400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    let y = y.clamp(1980, 2107);
    let date = (((y - 1980) as u16) << 9) | ((m as u16) << 5) | d as u16;
    let time =
        (((rem / 3600) as u16) << 11) | ((((rem / 60) % 60) as u16) << 5) | ((rem % 60) / 2) as u16;
    (time, date)
}

fn volume_id() -> u32 {
    let mut b = [0u8; 4];
    if getrandom::getrandom(&mut b).is_err() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos() ^ d.as_secs() as u32)
            .unwrap_or(0x1234_5678);
        b = t.to_le_bytes();
    }
    u32::from_le_bytes(b)
}

/// The boot sector (first `bps` bytes of the partition).
fn boot_sector(g: &Geometry, hidden_sectors: u32, vol_id: u32) -> Vec<u8> {
    let mut s = vec![0u8; g.bytes_per_sector as usize];
    s[0..3].copy_from_slice(&[0xEB, 0x58, 0x90]);
    s[3..11].copy_from_slice(b"IMGAGENT");
    s[11..13].copy_from_slice(&(g.bytes_per_sector as u16).to_le_bytes());
    s[13] = g.sectors_per_cluster as u8;
    s[14..16].copy_from_slice(&(g.reserved_sectors as u16).to_le_bytes());
    s[16] = 2;
    s[21] = 0xF8;
    s[24..26].copy_from_slice(&63u16.to_le_bytes());
    s[26..28].copy_from_slice(&255u16.to_le_bytes());
    s[28..32].copy_from_slice(&hidden_sectors.to_le_bytes());
    s[32..36].copy_from_slice(&g.total_sectors.to_le_bytes());
    s[36..40].copy_from_slice(&g.fat_sectors.to_le_bytes());
    s[44..48].copy_from_slice(&2u32.to_le_bytes());
    s[48..50].copy_from_slice(&1u16.to_le_bytes());
    s[50..52].copy_from_slice(&6u16.to_le_bytes());
    s[64] = 0x80;
    s[66] = 0x29;
    s[67..71].copy_from_slice(&vol_id.to_le_bytes());
    s[71..82].copy_from_slice(b"IMGBACKUP  ");
    s[82..90].copy_from_slice(b"FAT32   ");
    // Not bootable: int 18h (try the next boot device), then halt.
    s[90..94].copy_from_slice(&[0xCD, 0x18, 0xEB, 0xFE]);
    s[510] = 0x55;
    s[511] = 0xAA;
    s
}

fn fsinfo(g: &Geometry) -> Vec<u8> {
    let mut s = vec![0u8; g.bytes_per_sector as usize];
    s[0..4].copy_from_slice(&0x4161_5252u32.to_le_bytes());
    s[484..488].copy_from_slice(&0x6141_7272u32.to_le_bytes());
    let free = g.free_clusters();
    s[488..492].copy_from_slice(&free.to_le_bytes());
    let next = if free > 0 { g.first_free() } else { u32::MAX };
    s[492..496].copy_from_slice(&next.to_le_bytes());
    s[508..512].copy_from_slice(&0xAA55_0000u32.to_le_bytes());
    s
}

/// The FAT entry of cluster `c` (0 and 1 are the reserved entries).
fn fat_value(runs: &[(u32, u32)], c: u32) -> u32 {
    match c {
        0 => 0x0FFF_FFF8,
        1 => EOC,
        _ => {
            let i = runs.partition_point(|&(first, _)| first <= c);
            if i == 0 {
                return 0;
            }
            let (first, n) = runs[i - 1];
            if c >= first + n {
                0
            } else if c + 1 == first + n {
                EOC
            } else {
                c + 1
            }
        }
    }
}

fn io(what: &str, e: std::io::Error) -> anyhow::Error {
    anyhow::Error::new(e).context(what.to_string())
}

/// Format the `len` bytes at `start` of `disk` as the backup partition (sector size
/// `bps`). Returns what it made. See the module docs for the order of writes.
pub fn format(disk: &mut dyn Disk, start: u64, len: u64, bps: u32) -> anyhow::Result<Geometry> {
    let g = plan(len, bps)?;
    if start.checked_add(len).is_none_or(|e| e > disk.size()) {
        bail!(
            "the backup partition (offset {start}, {len} bytes) lies outside the {}-byte disk",
            disk.size()
        );
    }
    let b = u64::from(bps);
    // 1. No boot sector: until step 3 this is not a file system.
    disk.write_at(&vec![0u8; bps as usize], start)
        .map_err(|e| io("clearing the backup partition's boot sector", e))?;
    disk.sync().map_err(|e| io("syncing the disk", e))?;

    // 2. Reserved sectors (FSInfo, backups), FATs, directories, the status file.
    let hidden = u32::try_from(start / b).unwrap_or(u32::MAX);
    let vol = volume_id();
    let boot = boot_sector(&g, hidden, vol);
    let mut reserved = vec![0u8; (g.reserved_sectors as usize) * bps as usize];
    let info = fsinfo(&g);
    let s = bps as usize;
    reserved[s..2 * s].copy_from_slice(&info);
    reserved[6 * s..7 * s].copy_from_slice(&boot);
    reserved[7 * s..8 * s].copy_from_slice(&info);
    disk.write_at(&reserved[s..], start + b)
        .map_err(|e| io("writing the backup partition's reserved sectors", e))?;

    let runs = g.runs();
    let fat_bytes = u64::from(g.fat_sectors) * b;
    let entries = fat_bytes / 4;
    const PIECE: u64 = 1 << 20;
    let mut at = 0u64;
    while at < fat_bytes {
        let n = PIECE.min(fat_bytes - at);
        let mut buf = Vec::with_capacity(n as usize);
        let first = at / 4;
        for c in first..first + n / 4 {
            let v = if c < u64::from(g.cluster_count) + 2 && c < entries {
                fat_value(&runs, c as u32)
            } else {
                0
            };
            buf.extend_from_slice(&v.to_le_bytes());
        }
        for copy in 0..2u64 {
            let off = start + u64::from(g.reserved_sectors) * b + copy * fat_bytes + at;
            disk.write_at(&buf, off)
                .map_err(|e| io("writing the backup partition's FAT", e))?;
        }
        at += n;
    }

    let stamp = dos_now();
    let cs = g.cluster_size() as usize;
    let mut root = vec![0u8; cs];
    root[..32].copy_from_slice(&dir_entry(b"IMGBACKUP  ", 0x08, 0, 0, stamp));
    root[32..64].copy_from_slice(&dir_entry(b"IMGBACK    ", 0x10, 3, 0, stamp));
    disk.write_at(&root, start + g.cluster_offset(2))
        .map_err(|e| io("writing the backup partition's root directory", e))?;
    let mut dir = vec![0u8; cs * g.dir_clusters as usize];
    dir[..32].copy_from_slice(&dir_entry(b".          ", 0x10, 3, 0, stamp));
    dir[32..64].copy_from_slice(&dir_entry(b"..         ", 0x10, 0, 0, stamp));
    dir[64..96].copy_from_slice(&dir_entry(
        b"STATUS  DAT",
        0x20,
        g.status_cluster,
        STATUS_LEN as u32,
        stamp,
    ));
    for (i, &(c, l)) in g.segments.iter().enumerate() {
        let mut name = *b"IMAGE      ";
        name[8..11].copy_from_slice(format!("{i:03}").as_bytes());
        let o = 96 + 32 * i;
        dir[o..o + 32].copy_from_slice(&dir_entry(&name, 0x20, c, l as u32, stamp));
    }
    disk.write_at(&dir, start + g.cluster_offset(3))
        .map_err(|e| io("writing the backup partition's /IMGBACK directory", e))?;
    // The status file starts empty: a previous format's records must not come back.
    disk.write_at(
        &vec![0u8; STATUS_LEN as usize],
        start + g.cluster_offset(g.status_cluster),
    )
    .map_err(|e| io("clearing the backup partition's status file", e))?;
    disk.sync().map_err(|e| io("syncing the disk", e))?;

    // 3. The boot sector: from now on it is a file system.
    disk.write_at(&boot, start)
        .map_err(|e| io("writing the backup partition's boot sector", e))?;
    disk.sync().map_err(|e| io("syncing the disk", e))?;
    Ok(g)
}

/// Format the partition of a disk-image file or block device.
pub fn format_path(
    path: &std::path::Path,
    start: u64,
    len: u64,
    bps: u32,
) -> anyhow::Result<Geometry> {
    let mut d = grub::bootpart::FileDisk::open(path, true)?;
    format(&mut d, start, len, bps).with_context(|| {
        format!(
            "formatting the backup partition at offset {start} of {}",
            path.display()
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn geometry_fills_the_partition_with_segments_under_4_gib() {
        for (len, bps) in [
            (40u64 << 20, 512u32),
            (100 << 20, 512),
            (1 << 30, 512),
            (3900 << 20, 512),
            (9 << 30, 512),
            (20 << 30, 4096),
        ] {
            let g = plan(len, bps).unwrap();
            let cs = g.cluster_size();
            assert!(u64::from(g.cluster_count) >= MIN_CLUSTERS, "{len}");
            // Data area aligned to 1 MiB.
            assert_eq!(g.cluster_offset(2) % (1 << 20), 0, "{len}");
            // FAT covers every cluster.
            assert!(
                u64::from(g.fat_sectors) * u64::from(bps) >= (u64::from(g.cluster_count) + 2) * 4
            );
            for &(_, l) in &g.segments {
                assert!(l <= (1u64 << 32) - cs, "segment {l} of {len}");
                assert_eq!(l % cs, 0);
            }
            // Everything is used; the data area ends inside the partition.
            assert_eq!(g.free_clusters(), 0, "{len}");
            assert!(g.cluster_offset(g.cluster_count + 2) <= len);
            let waste = len - g.capacity();
            assert!(
                waste
                    < (1 << 20)
                        + STATUS_LEN
                        + 2 * u64::from(g.fat_sectors) * u64::from(bps)
                        + 4 * cs,
                "{len}: {waste}"
            );
            let want_segs = g.capacity().div_ceil((1u64 << 32) - cs) as usize;
            assert_eq!(g.segments.len(), want_segs, "{len}");
        }
        assert_eq!(plan(9 << 30, 512).unwrap().segments.len(), 3);
        let e = plan(20 << 20, 512).unwrap_err().to_string();
        assert!(
            e.contains("too small for FAT32") && e.contains("40 MiB"),
            "{e}"
        );
    }

    #[test]
    fn fat_values_chain_each_run_and_end_it() {
        let runs = [(2, 1), (3, 2), (5, 3)];
        let v: Vec<u32> = (0..10).map(|c| fat_value(&runs, c)).collect();
        assert_eq!(v, [0x0FFF_FFF8, EOC, EOC, 4, EOC, 6, 7, EOC, 0, 0]);
    }
}
