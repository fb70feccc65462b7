//! Converting a device to the autogenic layout: the partition table rewritten around the
//! boot-agent partition, then the backup partition formatted.
//!
//! The disk is read with the imaging engine's table code (`imgengine::disk::read_layout`,
//! opened through `imgengine::target::Target`); the GPT is then rewritten here, in place,
//! from its own bytes: the boot-agent partition's 128-byte entry is copied unchanged (same
//! index, type, GUID, attributes, name), entry 2 becomes the OS partition (its type, GUID
//! and name kept when there was a partition 2, so a `root=PARTUUID=` still finds it),
//! entry 3 the backup partition (GPT name `IMGBACKUP`, Microsoft basic data), every other
//! entry is cleared (the plan lists them). The header's disk GUID, usable range and entry
//! array position are kept; only the entry-array and header CRCs change. The boot-agent
//! partition's bytes are never written.
//!
//! # Write order, and what a power cut at each step leaves
//!
//! 1. the backup entry array and backup header (end of the disk), then fdatasync. A cut
//!    before this completes: the primary table is the old one and valid, the device boots
//!    as before; the backup table, if torn, is simply invalid.
//! 2. the primary entry array, then the primary header, then fdatasync. A cut inside this
//!    step: either the old primary header is still there, whose entry-array CRC no longer
//!    matches the new entries, so every reader (firmware, Linux, this engine) falls back
//!    to the new backup table; or the new header is there and valid. Either way the table
//!    read is the old one or the new one, whole, and the boot-agent partition's entry is
//!    the same in both, so the device always boots its agent.
//! 3. the kernel is asked to re-read the table (block devices; a failure is only a note).
//! 4. the backup partition is formatted ([`crate::backupfs::format`]: boot sector cleared
//!    first, written last). A cut before its end leaves partition 3 named IMGBACKUP
//!    without a file system: [`crate::BackupArea::open`] says so, and running the
//!    conversion again finds the table already right and only formats.
//!
//! The OS partition's old content is not touched, but a partition that moved or shrank no
//! longer holds a usable file system: the conversion is followed by a deploy of the image
//! into partition 2 (the agent's convert task does that).

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use imgengine::disk::{DiskLayout, PartitionInfo, TableKind};
use imgengine::io::ReadAt;
use imgengine::target::Target;

use crate::backupfs::{self, Geometry, LABEL};
use crate::layout::{self, BootAgent, Layout, LayoutRequest};

/// Microsoft basic data, as stored (mixed endian): EBD0A0A2-B9E5-4433-87C0-68B6B72699C7.
const BASIC_DATA: [u8; 16] = [
    0xA2, 0xA0, 0xD0, 0xEB, 0xE5, 0xB9, 0x33, 0x44, 0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99, 0xC7,
];
const ENTRY: usize = 128;
const MAX_ENTRIES: u32 = 16384;

/// A conversion worked out for one disk.
#[derive(Debug, Clone)]
pub struct Plan {
    pub disk: PathBuf,
    pub layout: Layout,
    /// The disk's table as it is.
    pub current: DiskLayout,
    /// Partitions (other than the boot agent's) that the new table replaces or drops.
    pub replaced: Vec<PartitionInfo>,
    /// The table already is this layout: only the backup partition is formatted.
    pub table_unchanged: bool,
}

/// What [`apply`] did.
#[derive(Debug, Clone)]
pub struct Converted {
    pub table_written: bool,
    pub geometry: Geometry,
    pub notes: Vec<String>,
}

/// Work out the conversion of `current` (a disk of `current.disk_size` bytes) for an image
/// of `image` bytes and an optional backup size. Pure.
pub fn plan_for_layout(
    disk: &Path,
    current: DiskLayout,
    image: u64,
    backup: Option<u64>,
) -> anyhow::Result<Plan> {
    let ba = grub::bootpart::choose(&current.partitions).cloned();
    let boot_agent = match &ba {
        Some(p) => BootAgent::Existing {
            number: p.number,
            start: p.start,
            len: p.len,
        },
        None => BootAgent::New { needed: None },
    };
    let layout = layout::compute(&LayoutRequest {
        flash: current.disk_size,
        sector_size: current.sector_size,
        boot_agent,
        image,
        backup,
    })?;
    let same = |p: &PartitionInfo, want: &layout::Part| p.start == want.start && p.len == want.len;
    let replaced: Vec<PartitionInfo> = current
        .partitions
        .iter()
        .filter(|p| ba.as_ref().is_none_or(|b| b.number != p.number))
        .filter(|p| {
            !((p.number == 2 && same(p, &layout.os))
                || (p.number == 3 && same(p, &layout.backup) && p.label.as_deref() == Some(LABEL)))
        })
        .cloned()
        .collect();
    let others = current
        .partitions
        .iter()
        .filter(|p| ba.as_ref().is_none_or(|b| b.number != p.number))
        .count();
    let table_unchanged = current.table == TableKind::Gpt && replaced.is_empty() && others == 2;
    Ok(Plan {
        disk: disk.to_path_buf(),
        layout,
        current,
        replaced,
        table_unchanged,
    })
}

/// Read `disk` (block device or disk-image file) and work out its conversion.
pub fn plan_for_disk(disk: &Path, image: u64, backup: Option<u64>) -> anyhow::Result<Plan> {
    let t = Target::open_disk_read_only(disk)?;
    let current = imgengine::disk::read_layout(&t, t.len())
        .with_context(|| format!("reading the partition table of {}", disk.display()))?;
    plan_for_layout(disk, current, image, backup)
}

fn mb(b: u64) -> String {
    format!("{} MB", b.div_ceil(layout::MB))
}

impl Plan {
    /// The layout, what is kept and what is replaced, as `img -layout` prints it.
    pub fn describe(&self) -> String {
        let mut s = format!("{}: ", self.disk.display());
        s += &self.layout.describe();
        if !self.layout.boot_agent_kept {
            s += "note: the disk has no boot-agent partition: `img -install` makes one (a conversion needs it)\n";
        }
        if self.table_unchanged {
            s += "the partition table already has this layout\n";
        } else {
            for p in &self.replaced {
                s += &format!(
                    "replaced: partition {} ({}, {}{})\n",
                    p.number,
                    p.fs,
                    mb(p.len),
                    p.label
                        .as_deref()
                        .map(|l| format!(", name \"{l}\""))
                        .unwrap_or_default()
                );
            }
        }
        s
    }
}

fn le32(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"))
}
fn le64(b: &[u8], o: usize) -> u64 {
    u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"))
}

fn seal(h: &mut [u8]) {
    h[16..20].fill(0);
    let crc = crc32fast::hash(&h[..92]);
    h[16..20].copy_from_slice(&crc.to_le_bytes());
}

fn random_guid() -> [u8; 16] {
    let mut g = [0u8; 16];
    getrandom::getrandom(&mut g).expect("the OS random number generator");
    g[7] = (g[7] & 0x0F) | 0x40;
    g[8] = (g[8] & 0x3F) | 0x80;
    g
}

fn set_name(e: &mut [u8], name: &str) {
    e[56..128].fill(0);
    for (i, u) in name.encode_utf16().take(36).enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
}

/// The new entry array (pure): `old` with the boot agent's entry kept byte for byte, 2 and
/// 3 set from the layout, everything else cleared. `guid` makes new partition GUIDs.
fn new_entries(
    old: &[u8],
    ss: u64,
    l: &Layout,
    mut guid: impl FnMut() -> [u8; 16],
) -> anyhow::Result<Vec<u8>> {
    let n = old.len() / ENTRY;
    if n < 3 {
        bail!("the GPT has {n} entries; the layout needs 3");
    }
    let ba = l.boot_agent;
    let bi = (ba.number as usize)
        .checked_sub(1)
        .filter(|&i| i < n)
        .context("the boot-agent partition's entry is outside the GPT")?;
    let be = &old[bi * ENTRY..(bi + 1) * ENTRY];
    if le64(be, 32) != ba.start / ss || le64(be, 40) != ba.end() / ss - 1 {
        bail!(
            "GPT entry {} does not describe the boot-agent partition (offset {}, {} bytes)",
            ba.number,
            ba.start,
            ba.len
        );
    }
    let mut out = vec![0u8; old.len()];
    out[bi * ENTRY..(bi + 1) * ENTRY].copy_from_slice(be);
    let used = |e: &[u8]| e[..16].iter().any(|&b| b != 0);
    for (p, default_name) in [(l.os, "OS"), (l.backup, LABEL)] {
        let i = p.number as usize - 1;
        let prev = &old[i * ENTRY..(i + 1) * ENTRY];
        let e = &mut out[i * ENTRY..(i + 1) * ENTRY];
        let keep = used(prev) && (p.number == 2 || name_of(prev) == LABEL);
        if keep && p.number == 2 {
            // The OS partition keeps its type, GUID and name (a PARTUUID still finds it).
            e[..32].copy_from_slice(&prev[..32]);
            e[56..128].copy_from_slice(&prev[56..128]);
        } else {
            e[..16].copy_from_slice(&BASIC_DATA);
            if keep {
                e[16..32].copy_from_slice(&prev[16..32]);
            } else {
                e[16..32].copy_from_slice(&guid());
            }
            set_name(e, default_name);
        }
        e[32..40].copy_from_slice(&(p.start / ss).to_le_bytes());
        e[40..48].copy_from_slice(&(p.end() / ss - 1).to_le_bytes());
        e[48..56].fill(0);
    }
    Ok(out)
}

fn name_of(e: &[u8]) -> String {
    let units: Vec<u16> = e[56..128]
        .chunks_exact(2)
        .map(|c| u16::from_le_bytes([c[0], c[1]]))
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

/// The primary GPT: header sector and entry array, checked.
struct Primary {
    header: Vec<u8>,
    entries: Vec<u8>,
    entries_lba: u64,
    backup_lba: u64,
    first_usable: u64,
    last_usable: u64,
}

fn read_primary(t: &Target, ss: u64) -> anyhow::Result<Primary> {
    let name = t.path().display().to_string();
    let damaged = |why: &str| {
        anyhow::anyhow!("the primary GPT of {name} {why}: repair the table first (`sgdisk -v` shows it, `sgdisk -e` or your partitioning tool fixes it)")
    };
    let mut header = vec![0u8; ss as usize];
    t.read_exact_at(&mut header, ss)
        .with_context(|| format!("reading the GPT header of {name}"))?;
    if &header[..8] != b"EFI PART" || le32(&header, 12) != 92 {
        return Err(damaged("is missing or has an unknown header size"));
    }
    let mut z = header[..92].to_vec();
    z[16..20].fill(0);
    if crc32fast::hash(&z) != le32(&header, 16) {
        return Err(damaged("fails its CRC"));
    }
    let num = le32(&header, 80);
    if le32(&header, 84) != ENTRY as u32 || num == 0 || num > MAX_ENTRIES {
        return Err(damaged("has an unusual entry array"));
    }
    let entries_lba = le64(&header, 72);
    let mut entries = vec![0u8; num as usize * ENTRY];
    t.read_exact_at(&mut entries, entries_lba.saturating_mul(ss))
        .with_context(|| format!("reading the GPT entries of {name}"))?;
    if crc32fast::hash(&entries) != le32(&header, 88) {
        return Err(damaged("has an entry array that fails its CRC"));
    }
    Ok(Primary {
        entries_lba,
        backup_lba: le64(&header, 32),
        first_usable: le64(&header, 40),
        last_usable: le64(&header, 48),
        header,
        entries,
    })
}

/// A grub [`grub::bootpart::Disk`] over an engine [`Target`] (the backup's format).
struct TargetDisk<'a>(&'a Target);

impl grub::bootpart::Disk for TargetDisk<'_> {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        Target::write_at(self.0, buf, offset).map_err(std::io::Error::other)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Target::sync(self.0).map_err(std::io::Error::other)
    }
    fn size(&self) -> u64 {
        self.0.len()
    }
}

/// Apply `plan` to its disk: the partition table (unless it already is the layout), then
/// the backup partition's format. See the module docs for the order.
pub fn apply(plan: &Plan) -> anyhow::Result<Converted> {
    let disk = &plan.disk;
    let name = disk.display().to_string();
    let l = &plan.layout;
    if !l.boot_agent_kept {
        bail!("{name} has no boot-agent partition (a FAT partition labelled BOOTAGENT, or partition 1 with FAT): run `img -install` first, then convert");
    }
    match plan.current.table {
        TableKind::Gpt => {}
        TableKind::Mbr => bail!("{name} has an MBR partition table: only GPT disks are converted (make it GPT, e.g. `sgdisk -g`, and check the boot agent still boots)"),
        TableKind::None => bail!("{name} has no partition table: make a GPT with the boot-agent partition first (`sgdisk`, then `img -install`)"),
    }
    let t = Target::open_disk(disk, None)?;
    // The disk must still be the one planned.
    let now = imgengine::disk::read_layout(&t, t.len())
        .with_context(|| format!("reading the partition table of {name}"))?;
    if now.disk_size != plan.current.disk_size || now.partitions != plan.current.partitions {
        bail!(
            "the partition table of {name} changed since the conversion was planned: plan it again"
        );
    }
    let ss = now.sector_size;
    let mut notes = Vec::new();
    let mut table_written = false;
    if !plan.table_unchanged {
        let p = read_primary(&t, ss)?;
        let sectors = t.len() / ss;
        if p.backup_lba != sectors - 1 {
            bail!("the GPT of {name} does not end at the disk's last sector (its backup header is at sector {} of {sectors}): move it with `sgdisk -e` first", p.backup_lba);
        }
        let (first, last) = (l.os.start / ss, l.backup.end() / ss - 1);
        if first < p.first_usable || last > p.last_usable {
            bail!(
                "the layout (sectors {first}..={last}) does not fit the GPT's usable sectors {}..={} of {name}",
                p.first_usable,
                p.last_usable
            );
        }
        let entries = new_entries(&p.entries, ss, l, random_guid)?;
        let entry_sectors = (entries.len() as u64).div_ceil(ss);
        let backup_entries_lba = p.backup_lba - entry_sectors;
        if backup_entries_lba <= p.last_usable {
            bail!("the GPT of {name} leaves no room for its backup entry array after the last usable sector");
        }
        let mut padded = entries.clone();
        padded.resize((entry_sectors * ss) as usize, 0);
        let crc = crc32fast::hash(&entries);
        let mut primary = p.header.clone();
        primary[88..92].copy_from_slice(&crc.to_le_bytes());
        seal(&mut primary);
        let mut backup = primary.clone();
        backup[24..32].copy_from_slice(&p.backup_lba.to_le_bytes());
        backup[32..40].copy_from_slice(&1u64.to_le_bytes());
        backup[72..80].copy_from_slice(&backup_entries_lba.to_le_bytes());
        seal(&mut backup);
        // 1. the backup table, synced.
        t.write_at(&padded, backup_entries_lba * ss)?;
        t.write_at(&backup, p.backup_lba * ss)?;
        t.sync()?;
        // 2. the primary: entries, then header, synced.
        t.write_at(&padded, p.entries_lba * ss)?;
        t.write_at(&primary, ss)?;
        t.sync()?;
        table_written = true;
        // 3. the kernel's view.
        if let Err(e) = t.reread_partitions() {
            notes.push(format!(
                "the kernel did not re-read the partition table ({e}); it will at the next boot"
            ));
        }
    }
    // 4. the backup partition.
    let geometry = backupfs::format(&mut TargetDisk(&t), l.backup.start, l.backup.len, ss as u32)
        .with_context(|| format!("formatting the backup partition of {name}"))?;
    Ok(Converted {
        table_written,
        geometry,
        notes,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::{Part, MB};

    fn layout() -> Layout {
        Layout {
            flash: 2048 * MB,
            sector_size: 512,
            boot_agent: Part {
                number: 1,
                start: MB,
                len: 16 * MB,
            },
            boot_agent_kept: true,
            os: Part {
                number: 2,
                start: 17 * MB,
                len: 1000 * MB,
            },
            backup: Part {
                number: 3,
                start: 1017 * MB,
                len: 800 * MB,
            },
            free: 0,
            backup_capacity: 0,
            notes: vec![],
        }
    }

    fn entry(ty: u8, guid: u8, first: u64, last: u64, name: &str) -> Vec<u8> {
        let mut e = vec![0u8; ENTRY];
        e[..16].fill(ty);
        e[16..32].fill(guid);
        e[32..40].copy_from_slice(&first.to_le_bytes());
        e[40..48].copy_from_slice(&last.to_le_bytes());
        e[48] = 0x55;
        set_name(&mut e, name);
        e
    }

    #[test]
    fn entries_keep_the_boot_agent_byte_for_byte_and_the_os_identity() {
        let mut old = Vec::new();
        old.extend(entry(1, 0x11, 2048, 2048 + 32767, "BOOTAGENT"));
        old.extend(entry(2, 0x22, 40000, 50000, "Windows"));
        old.extend(entry(3, 0x33, 50001, 60000, "data"));
        old.extend(entry(4, 0x44, 60001, 70000, "more"));
        old.resize(128 * ENTRY, 0);
        let l = layout();
        let new = new_entries(&old, 512, &l, || [0xAB; 16]).unwrap();
        assert_eq!(new.len(), old.len());
        assert_eq!(new[..ENTRY], old[..ENTRY], "boot agent entry identical");
        let e2 = &new[ENTRY..2 * ENTRY];
        assert_eq!(e2[..32], old[ENTRY..ENTRY + 32], "OS type and GUID kept");
        assert_eq!(name_of(e2), "Windows");
        assert_eq!((le64(e2, 32), le64(e2, 40)), (17 * 2048, 1017 * 2048 - 1));
        assert_eq!(e2[48..56], [0; 8]);
        let e3 = &new[2 * ENTRY..3 * ENTRY];
        assert_eq!(e3[..16], BASIC_DATA);
        assert_eq!(e3[16..32], [0xAB; 16], "a new partition gets a new GUID");
        assert_eq!(name_of(e3), "IMGBACKUP");
        assert_eq!((le64(e3, 32), le64(e3, 40)), (1017 * 2048, 1817 * 2048 - 1));
        assert!(new[3 * ENTRY..].iter().all(|&b| b == 0), "others cleared");
        // A wrong boot-agent entry is refused.
        let mut bad = old.clone();
        bad[32] ^= 1;
        assert!(new_entries(&bad, 512, &l, || [0; 16]).is_err());
        // An existing IMGBACKUP keeps its GUID.
        let mut again = new.clone();
        again[2 * ENTRY + 16..2 * ENTRY + 32].fill(0x77);
        let n2 = new_entries(&again, 512, &l, || [0xCD; 16]).unwrap();
        assert_eq!(n2[2 * ENTRY + 16..2 * ENTRY + 32], [0x77; 16]);
    }
}
