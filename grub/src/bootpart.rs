//! The boot-agent partition as a set of files that can be read, and rewritten in place,
//! without mounting it.
//!
//! # API (stable: other parts of the product build on it)
//!
//! - [`BootPartition::open`]`(disk, writable)`: find the boot-agent partition of a block
//!   device or disk-image file (the FAT partition labelled `BOOTAGENT`, by file-system label
//!   or GPT name, else partition 1 when it holds FAT) and read its FAT geometry;
//!   [`BootPartition::open_number`] takes a partition number instead.
//! - [`BootPartition::describe`]: "partition 1 of disk.img (fat32 \"BOOTAGENT\", offset …, … bytes)".
//! - [`BootPartition::partition_number`], [`BootPartition::partition_start`],
//!   [`BootPartition::partition_len`], [`BootPartition::disk`].
//! - [`BootPartition::read_file`]`(path) -> Option<Vec<u8>>` (None: no such file),
//!   [`BootPartition::list_dir`]`(path)`, [`BootPartition::file_len`]`(path)`.
//! - [`BootPartition::file_extents`]`(path) -> Vec<(disk offset, len)>`: where the file's
//!   bytes are on the disk, in file order, covering exactly its length.
//! - [`BootPartition::overwrite_in_place`]`(path, offset_in_file, bytes)`: write `bytes`
//!   over the file's existing bytes, straight to its clusters, then `fdatasync`. It refuses
//!   to write past the file's length: the file's size, its directory entry, the FAT and
//!   every other sector of the file system are never written.
//!
//! # Why not the `fatfs` crate (or a mount) for this
//!
//! `img -install` creates the partition with `fatfs`, but `fatfs` 0.3 cannot be used to
//! update a file safely: every `File::write` sets the volume's dirty flag and rewrites the
//! file's directory entry (its modification time) on close, and a directory sector that
//! tears in a power cut can lose every entry in it. Nor does it tell where a file's
//! clusters are. Mounting needs the kernel's vfat module in the initrd, leaves the writes
//! to the page cache, and behaves differently on a disk-image file. So this module reads the
//! FAT itself (boot sector parsed by the imaging engine's FAT code, directories and cluster
//! chains walked here with bounds and loop checks, long names included), and writes only
//! inside a file's existing clusters. The FAT and the directory entries are read, never
//! written, so a power cut during a write can damage nothing but the bytes being written;
//! the records kept in those bytes ([`crate::store`]) are built to survive exactly that.
//!
//! Everything read from the partition is treated as untrusted: cluster numbers are checked
//! against the cluster count, chains are bounded by it (no loops), directory walks are
//! bounded, and a file's chain must be long enough for its recorded size.

use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use imgengine::disk::PartitionInfo;
use imgengine::fs::fat::BootSector;
use imgengine::fs::FsKind;
use imgengine::io::ReadAt;

/// The file-system label `img -install` gives the boot-agent partition.
pub const LABEL: &str = "BOOTAGENT";

/// The largest FAT this module loads into memory (a FAT32 of 64 GiB with 4 KiB clusters has
/// a 64 MiB FAT; a boot-agent partition is tens of MiB).
const MAX_FAT_BYTES: u64 = 64 << 20;
/// The largest directory walked (entries are 32 bytes: 65536 entries is FAT's own limit).
const MAX_DIR_BYTES: u64 = 65536 * 32;
/// The deepest path looked up.
const MAX_DEPTH: usize = 32;

/// Where the partition's bytes are: a block device or disk-image file, or memory in tests.
pub trait Disk: Send {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()>;
    /// Make every write so far durable (fdatasync).
    fn sync(&mut self) -> io::Result<()>;
    fn size(&self) -> u64;
}

/// A block device or disk-image file.
pub struct FileDisk {
    file: File,
    size: u64,
}

impl FileDisk {
    pub fn open(path: &Path, writable: bool) -> anyhow::Result<FileDisk> {
        let mut file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .with_context(|| {
                format!(
                    "opening {}{}",
                    path.display(),
                    if writable { " for writing" } else { "" }
                )
            })?;
        // lseek to the end gives the size of a file and of a block device alike.
        let size = file
            .seek(SeekFrom::End(0))
            .with_context(|| format!("finding the size of {}", path.display()))?;
        Ok(FileDisk { file, size })
    }
}

impl Disk for FileDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        FileExt::read_exact_at(&self.file, buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        self.file.write_all_at(buf, offset)
    }
    fn sync(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn size(&self) -> u64 {
        self.size
    }
}

/// A disk in memory (tests, fuzzing).
pub struct MemDisk(pub Vec<u8>);

impl Disk for MemDisk {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.as_slice().read_exact_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
        let start = usize::try_from(offset).map_err(|_| io::ErrorKind::UnexpectedEof)?;
        let end = start
            .checked_add(buf.len())
            .filter(|&e| e <= self.0.len())
            .ok_or(io::ErrorKind::UnexpectedEof)?;
        self.0[start..end].copy_from_slice(buf);
        Ok(())
    }
    fn sync(&mut self) -> io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.0.len() as u64
    }
}

/// `imgengine`'s parsers read through [`ReadAt`].
struct AsReadAt<'a>(&'a dyn Disk);

impl ReadAt for AsReadAt<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
        self.0.read_at(buf, offset)
    }
}

/// One entry of a directory listing.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// The long name when there is one, else the 8.3 name.
    pub name: String,
    pub is_dir: bool,
    pub len: u64,
}

/// A directory entry as found on disk.
#[derive(Debug, Clone)]
struct RawEntry {
    long: Option<String>,
    short: String,
    attr: u8,
    first_cluster: u32,
    len: u64,
}

impl RawEntry {
    fn is_dir(&self) -> bool {
        self.attr & 0x10 != 0
    }
    fn name(&self) -> &str {
        self.long.as_deref().unwrap_or(&self.short)
    }
    fn matches(&self, want: &str) -> bool {
        self.short.eq_ignore_ascii_case(want)
            || self
                .long
                .as_deref()
                .is_some_and(|l| l.to_lowercase() == want.to_lowercase())
    }
}

/// The boot-agent partition of a disk, opened for reading (and in-place writing).
pub struct BootPartition {
    disk: Box<dyn Disk>,
    disk_name: PathBuf,
    writable: bool,
    number: u32,
    start: u64,
    len: u64,
    kind: FsKind,
    label: Option<String>,
    bs: BootSector,
    /// FAT32: the root directory's first cluster.
    root_cluster: u32,
    /// The first FAT, whole.
    fat: Vec<u8>,
}

/// Which partition is the boot-agent partition: labelled `BOOTAGENT` (file-system label or
/// GPT name) and FAT, else partition 1 when it is FAT.
pub fn choose(parts: &[PartitionInfo]) -> Option<&PartitionInfo> {
    let is_fat = |p: &&PartitionInfo| matches!(p.fs, FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32);
    let labelled = |p: &&PartitionInfo| {
        p.fs_label
            .as_deref()
            .is_some_and(|l| l.eq_ignore_ascii_case(LABEL))
            || p.label
                .as_deref()
                .is_some_and(|l| l.eq_ignore_ascii_case(LABEL))
    };
    parts
        .iter()
        .find(|p| is_fat(p) && labelled(p))
        .or_else(|| parts.iter().find(|p| is_fat(p) && p.number == 1))
}

impl BootPartition {
    /// Find and open the boot-agent partition of `disk` (block device or disk-image file).
    pub fn open(disk: &Path, writable: bool) -> anyhow::Result<BootPartition> {
        let d = FileDisk::open(disk, writable)?;
        BootPartition::from_disk(Box::new(d), disk, writable, None)
    }

    /// Open partition `number` of `disk` as the boot-agent partition (it must hold FAT).
    pub fn open_number(disk: &Path, writable: bool, number: u32) -> anyhow::Result<BootPartition> {
        let d = FileDisk::open(disk, writable)?;
        BootPartition::from_disk(Box::new(d), disk, writable, Some(number))
    }

    /// The same over any [`Disk`]; `name` is what messages call it.
    pub fn from_disk(
        disk: Box<dyn Disk>,
        name: &Path,
        writable: bool,
        number: Option<u32>,
    ) -> anyhow::Result<BootPartition> {
        let size = disk.size();
        let layout = imgengine::disk::read_layout(&AsReadAt(disk.as_ref()), size)
            .with_context(|| format!("reading the partition table of {}", name.display()))?;
        let part = match number {
            Some(n) => layout
                .partitions
                .iter()
                .find(|p| p.number == n)
                .with_context(|| {
                    format!(
                        "{} has no partition {n}; it has: {}",
                        name.display(),
                        layout.describe_partitions()
                    )
                })?,
            None => choose(&layout.partitions).with_context(|| {
                format!(
                    "{} has no boot-agent partition (a FAT partition labelled {LABEL}, or partition 1 with FAT); it has: {}. `img -install` makes one",
                    name.display(),
                    layout.describe_partitions()
                )
            })?,
        }
        .clone();
        BootPartition::with_partition(disk, name, writable, part)
    }

    /// Open partition `number` at `start`, `len` bytes, without reading the partition table
    /// again (the agent's periodic commits: the table was read at boot, and reading every
    /// partition's allocation map each time would cost more than the commit). The FAT boot
    /// sector is still parsed and checked against `len`.
    pub fn open_range(
        disk: &Path,
        writable: bool,
        number: u32,
        start: u64,
        len: u64,
    ) -> anyhow::Result<BootPartition> {
        let d = FileDisk::open(disk, writable)?;
        if start.checked_add(len).is_none_or(|end| end > d.size()) {
            bail!(
                "partition {number} (offset {start}, {len} bytes) lies outside {}",
                disk.display()
            );
        }
        let mut head = [0u8; 512];
        d.read_at(&mut head, start)
            .with_context(|| format!("reading the boot sector of {}", disk.display()))?;
        let probe = imgengine::fs::probe(&AsReadAt(&d), start, len).ok();
        let part = PartitionInfo {
            number,
            start,
            len,
            type_id: String::new(),
            type_name: String::new(),
            label: None,
            fs: probe.as_ref().map_or(FsKind::Unknown, |p| p.kind),
            fs_label: probe.and_then(|p| p.label),
            used_bytes: None,
        };
        BootPartition::with_partition(Box::new(d), disk, writable, part)
    }

    fn with_partition(
        disk: Box<dyn Disk>,
        name: &Path,
        writable: bool,
        part: PartitionInfo,
    ) -> anyhow::Result<BootPartition> {
        let bs =
            imgengine::fs::fat::read_boot_sector(&AsReadAt(disk.as_ref()), part.start, part.len)
                .with_context(|| {
                    format!(
                        "partition {} of {} is not a readable FAT file system",
                        part.number,
                        name.display()
                    )
                })?;
        let mut head = [0u8; 512];
        disk.read_at(&mut head, part.start)
            .with_context(|| format!("reading the boot sector of {}", name.display()))?;
        let root_cluster = u32::from_le_bytes([head[44], head[45], head[46], head[47]]);
        let kind = bs.kind();
        if kind == FsKind::Fat32 && !(2..bs.cluster_count + 2).contains(&u64::from(root_cluster)) {
            bail!(
                "partition {} of {}: FAT32 root directory cluster {root_cluster} is outside the volume",
                part.number,
                name.display()
            );
        }
        let bps = u64::from(bs.bytes_per_sector);
        let fat_bytes = match kind {
            FsKind::Fat12 => ((bs.cluster_count + 2) * 3).div_ceil(2),
            FsKind::Fat16 => (bs.cluster_count + 2) * 2,
            _ => (bs.cluster_count + 2) * 4,
        };
        if fat_bytes > MAX_FAT_BYTES {
            bail!(
                "partition {} of {}: its FAT is {fat_bytes} bytes, too large for a boot-agent partition",
                part.number,
                name.display()
            );
        }
        let mut fat = vec![0u8; fat_bytes as usize];
        disk.read_at(&mut fat, part.start + u64::from(bs.reserved_sectors) * bps)
            .with_context(|| {
                format!(
                    "reading the FAT of partition {} of {}",
                    part.number,
                    name.display()
                )
            })?;
        let label = part.fs_label.clone().or(part.label.clone());
        Ok(BootPartition {
            disk,
            disk_name: name.to_path_buf(),
            writable,
            number: part.number,
            start: part.start,
            len: part.len,
            kind,
            label,
            bs,
            root_cluster,
            fat,
        })
    }

    pub fn partition_number(&self) -> u32 {
        self.number
    }
    pub fn partition_start(&self) -> u64 {
        self.start
    }
    pub fn partition_len(&self) -> u64 {
        self.len
    }
    pub fn disk(&self) -> &Path {
        &self.disk_name
    }
    pub fn fs_kind(&self) -> FsKind {
        self.kind
    }
    /// The size of the device's sectors as the file system records it (the unit in which a
    /// write can tear).
    pub fn sector_size(&self) -> u32 {
        self.bs.bytes_per_sector
    }

    /// "partition 1 of /dev/sda (fat32 "BOOTAGENT", offset 1048576, 67108864 bytes)".
    pub fn describe(&self) -> String {
        format!(
            "partition {} of {} ({}{}, offset {}, {} bytes)",
            self.number,
            self.disk_name.display(),
            self.kind,
            self.label
                .as_deref()
                .map(|l| format!(" \"{l}\""))
                .unwrap_or_default(),
            self.start,
            self.len
        )
    }

    fn cluster_size(&self) -> u64 {
        self.bs.cluster_size()
    }

    /// Disk offset of cluster `c` (checked by the caller to be in range).
    fn cluster_offset(&self, c: u32) -> u64 {
        self.start + self.bs.data_offset() + (u64::from(c) - 2) * self.cluster_size()
    }

    fn valid_cluster(&self, c: u32) -> bool {
        c >= 2 && u64::from(c) < self.bs.cluster_count + 2
    }

    /// The FAT entry of cluster `c`: Ok(Some(next)), Ok(None) at the end of the chain.
    fn next_cluster(&self, c: u32) -> anyhow::Result<Option<u32>> {
        let c64 = c as usize;
        let (v, eoc) = match self.kind {
            FsKind::Fat12 => {
                let i = c64 + c64 / 2;
                let pair = u16::from_le_bytes([self.fat[i], *self.fat.get(i + 1).unwrap_or(&0)]);
                let v = if c & 1 == 0 { pair & 0x0FFF } else { pair >> 4 };
                (u32::from(v), 0xFF8)
            }
            FsKind::Fat16 => (
                u32::from(u16::from_le_bytes([
                    self.fat[2 * c64],
                    self.fat[2 * c64 + 1],
                ])),
                0xFFF8,
            ),
            _ => (
                u32::from_le_bytes([
                    self.fat[4 * c64],
                    self.fat[4 * c64 + 1],
                    self.fat[4 * c64 + 2],
                    self.fat[4 * c64 + 3],
                ]) & 0x0FFF_FFFF,
                0x0FFF_FFF8,
            ),
        };
        if v >= eoc {
            return Ok(None);
        }
        if !self.valid_cluster(v) {
            bail!(
                "{}: the FAT chain breaks after cluster {c} (entry {v:#x})",
                self.describe()
            );
        }
        Ok(Some(v))
    }

    /// The clusters of the chain starting at `first`, at most `limit` of them (more is an
    /// error only when `exact` is false; loops end at the cluster count).
    fn chain(&self, first: u32, limit: u64) -> anyhow::Result<Vec<u32>> {
        let mut out = Vec::new();
        if first == 0 {
            return Ok(out);
        }
        if !self.valid_cluster(first) {
            bail!(
                "{}: a chain starts at invalid cluster {first}",
                self.describe()
            );
        }
        let mut c = first;
        loop {
            out.push(c);
            if out.len() as u64 >= limit {
                return Ok(out);
            }
            if out.len() as u64 > self.bs.cluster_count {
                bail!(
                    "{}: the FAT chain from cluster {first} loops",
                    self.describe()
                );
            }
            match self.next_cluster(c)? {
                Some(n) => c = n,
                None => return Ok(out),
            }
        }
    }

    /// The raw bytes of a directory: the fixed root of FAT12/16, or a cluster chain.
    fn dir_bytes(&self, first_cluster: Option<u32>) -> anyhow::Result<Vec<u8>> {
        let bps = u64::from(self.bs.bytes_per_sector);
        match first_cluster {
            None if self.kind != FsKind::Fat32 => {
                let at = u64::from(self.bs.reserved_sectors)
                    + u64::from(self.bs.num_fats) * self.bs.fat_sectors;
                let len = u64::from(self.bs.root_entries) * 32;
                let mut buf = vec![0u8; len as usize];
                self.disk
                    .read_at(&mut buf, self.start + at * bps)
                    .with_context(|| {
                        format!("reading the root directory of {}", self.describe())
                    })?;
                Ok(buf)
            }
            c => {
                let first = c.unwrap_or(self.root_cluster);
                let limit = MAX_DIR_BYTES.div_ceil(self.cluster_size());
                let clusters = self.chain(first, limit)?;
                let mut buf = vec![0u8; clusters.len() * self.cluster_size() as usize];
                for (i, c) in clusters.iter().enumerate() {
                    let cs = self.cluster_size() as usize;
                    self.disk
                        .read_at(&mut buf[i * cs..(i + 1) * cs], self.cluster_offset(*c))
                        .with_context(|| format!("reading a directory of {}", self.describe()))?;
                }
                Ok(buf)
            }
        }
    }

    fn entries(&self, first_cluster: Option<u32>) -> anyhow::Result<Vec<RawEntry>> {
        Ok(parse_dir(
            &self.dir_bytes(first_cluster)?,
            self.kind == FsKind::Fat32,
        ))
    }

    /// The entry at `path` ("/AGENT/STATE.DAT", "boot/grub/grubenv"); None when a component
    /// is missing. The root itself has no entry.
    fn lookup(&self, path: &str) -> anyhow::Result<Option<RawEntry>> {
        let parts: Vec<&str> = path
            .split('/')
            .filter(|s| !s.is_empty() && *s != ".")
            .collect();
        if parts.len() > MAX_DEPTH {
            bail!("path {path} is too deep");
        }
        let mut dir: Option<u32> = None;
        let mut found = None;
        for (i, name) in parts.iter().enumerate() {
            let entries = self.entries(dir)?;
            let Some(e) = entries.into_iter().find(|e| e.matches(name)) else {
                return Ok(None);
            };
            if i + 1 < parts.len() {
                if !e.is_dir() {
                    return Ok(None);
                }
                // A ".." to the root is cluster 0.
                dir = (e.first_cluster != 0).then_some(e.first_cluster);
            }
            found = Some(e);
        }
        Ok(found)
    }

    /// The entries of the directory at `path` ("/" for the root), without "." and "..".
    pub fn list_dir(&self, path: &str) -> anyhow::Result<Vec<Entry>> {
        let first = if path.split('/').all(|s| s.is_empty()) {
            None
        } else {
            match self.lookup(path)? {
                Some(e) if e.is_dir() => (e.first_cluster != 0).then_some(e.first_cluster),
                Some(_) => bail!("{path} on {} is a file, not a directory", self.describe()),
                None => bail!("no directory {path} on {}", self.describe()),
            }
        };
        Ok(self
            .entries(first)?
            .into_iter()
            .filter(|e| e.short != "." && e.short != "..")
            .map(|e| Entry {
                name: e.name().to_string(),
                is_dir: e.is_dir(),
                len: if e.is_dir() { 0 } else { e.len },
            })
            .collect())
    }

    fn file_entry(&self, path: &str) -> anyhow::Result<Option<RawEntry>> {
        match self.lookup(path)? {
            Some(e) if e.is_dir() => bail!("{path} on {} is a directory", self.describe()),
            other => Ok(other),
        }
    }

    /// The length of the file at `path`, None when there is none.
    pub fn file_len(&self, path: &str) -> anyhow::Result<Option<u64>> {
        Ok(self.file_entry(path)?.map(|e| e.len))
    }

    fn extents_of(&self, e: &RawEntry, path: &str) -> anyhow::Result<Vec<(u64, u64)>> {
        if e.len == 0 {
            return Ok(Vec::new());
        }
        let cs = self.cluster_size();
        let need = e.len.div_ceil(cs);
        let clusters = self.chain(e.first_cluster, need)?;
        if (clusters.len() as u64) < need {
            bail!(
                "{path} on {} is {} bytes but its cluster chain holds only {} bytes: run fsck.fat on the partition",
                self.describe(),
                e.len,
                clusters.len() as u64 * cs
            );
        }
        let mut out: Vec<(u64, u64)> = Vec::new();
        let mut left = e.len;
        for c in clusters {
            let n = left.min(cs);
            let at = self.cluster_offset(c);
            match out.last_mut() {
                Some((o, l)) if *o + *l == at => *l += n,
                _ => out.push((at, n)),
            }
            left -= n;
        }
        Ok(out)
    }

    /// Where the bytes of the file at `path` are on the disk: (disk offset, length) runs in
    /// file order, covering exactly the file's length.
    pub fn file_extents(&self, path: &str) -> anyhow::Result<Vec<(u64, u64)>> {
        let e = self
            .file_entry(path)?
            .with_context(|| format!("no file {path} on {}", self.describe()))?;
        self.extents_of(&e, path)
    }

    /// The contents of the file at `path`; None when there is no such file.
    pub fn read_file(&self, path: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let Some(e) = self.file_entry(path)? else {
            return Ok(None);
        };
        let ext = self.extents_of(&e, path)?;
        let mut out = vec![0u8; e.len as usize];
        let mut pos = 0usize;
        for (at, n) in ext {
            let n = n as usize;
            self.disk
                .read_at(&mut out[pos..pos + n], at)
                .with_context(|| format!("reading {path} on {}", self.describe()))?;
            pos += n;
        }
        Ok(Some(out))
    }

    /// Write `bytes` over the file at `path` from `offset_in_file`, straight to its
    /// clusters, then fdatasync. Refuses to write past the file's end; never writes the
    /// directory entry, the FAT or anything outside the file's clusters.
    pub fn overwrite_in_place(
        &mut self,
        path: &str,
        offset_in_file: u64,
        bytes: &[u8],
    ) -> anyhow::Result<()> {
        if !self.writable {
            bail!("{} was opened read-only", self.describe());
        }
        let e = self
            .file_entry(path)?
            .with_context(|| format!("no file {path} on {}", self.describe()))?;
        let end = offset_in_file
            .checked_add(bytes.len() as u64)
            .filter(|&end| end <= e.len)
            .with_context(|| {
                format!(
                    "writing {} bytes at offset {offset_in_file} of {path} on {} would grow the {}-byte file; it is rewritten in place only",
                    bytes.len(),
                    self.describe(),
                    e.len
                )
            })?;
        let ext = self.extents_of(&e, path)?;
        let mut file_pos = 0u64;
        for (at, n) in ext {
            let (lo, hi) = (file_pos, file_pos + n);
            file_pos = hi;
            let from = offset_in_file.max(lo);
            let to = end.min(hi);
            if from >= to {
                continue;
            }
            let src = &bytes[(from - offset_in_file) as usize..(to - offset_in_file) as usize];
            self.disk
                .write_at(src, at + (from - lo))
                .with_context(|| format!("writing {path} on {}", self.describe()))?;
        }
        self.disk
            .sync()
            .with_context(|| format!("syncing {}", self.disk_name.display()))?;
        Ok(())
    }
}

/// The short name of an 8.3 entry as text: "NAME.EXT", with the lower-case flags of byte 12
/// (set by Windows and by fatfs/Linux for names like "grub.cfg") applied.
fn short_name(e: &[u8]) -> String {
    let mut base: Vec<u8> = e[0..8].to_vec();
    if base[0] == 0x05 {
        base[0] = 0xE5;
    }
    let ext = &e[8..11];
    let lower = |b: &[u8], yes: bool| -> String {
        let s: String = b
            .iter()
            .map(|&c| if c.is_ascii() { c as char } else { '_' })
            .collect::<String>()
            .trim_end()
            .to_string();
        if yes {
            s.to_ascii_lowercase()
        } else {
            s
        }
    };
    let b = lower(&base, e[12] & 0x08 != 0);
    let x = lower(ext, e[12] & 0x10 != 0);
    if x.is_empty() {
        b
    } else {
        format!("{b}.{x}")
    }
}

fn lfn_checksum(short: &[u8]) -> u8 {
    short[..11]
        .iter()
        .fold(0u8, |sum, &c| sum.rotate_right(1).wrapping_add(c))
}

/// Parse the 32-byte entries of a directory (untrusted bytes: anything goes).
fn parse_dir(buf: &[u8], fat32: bool) -> Vec<RawEntry> {
    let mut out = Vec::new();
    // Long-name pieces collected before their short entry: (checksum, UTF-16 units by slot).
    let mut lfn: Vec<(u8, u8, Vec<u16>)> = Vec::new();
    for e in buf.chunks_exact(32) {
        match e[0] {
            0x00 => break,
            0xE5 => {
                lfn.clear();
                continue;
            }
            _ => {}
        }
        let attr = e[11];
        if attr & 0x3F == 0x0F {
            let mut units = Vec::with_capacity(13);
            for r in [1..11, 14..26, 28..32] {
                for p in e[r].chunks_exact(2) {
                    units.push(u16::from_le_bytes([p[0], p[1]]));
                }
            }
            if e[0] & 0x40 != 0 {
                lfn.clear();
            }
            lfn.push((e[13], e[0] & 0x1F, units));
            continue;
        }
        if attr & 0x08 != 0 {
            // Volume label.
            lfn.clear();
            continue;
        }
        let sum = lfn_checksum(e);
        let long = if !lfn.is_empty() && lfn.iter().all(|(c, _, _)| *c == sum) {
            // Pieces come last-first; order them by sequence number.
            let mut pieces = std::mem::take(&mut lfn);
            pieces.sort_by_key(|(_, seq, _)| *seq);
            let units: Vec<u16> = pieces
                .into_iter()
                .flat_map(|(_, _, u)| u)
                .take_while(|&u| u != 0)
                .collect();
            String::from_utf16(&units).ok().filter(|s| !s.is_empty())
        } else {
            None
        };
        lfn.clear();
        let hi = if fat32 {
            u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
        } else {
            0
        };
        let first_cluster = hi | u32::from(u16::from_le_bytes([e[26], e[27]]));
        out.push(RawEntry {
            long,
            short: short_name(e),
            attr,
            first_cluster,
            len: u64::from(u32::from_le_bytes([e[28], e[29], e[30], e[31]])),
        });
    }
    out
}

/// Fuzz entry point: `data` is a whole disk; open its boot-agent partition, list and read
/// everything reachable, and rewrite a file in place. Must never panic, and an in-place
/// write must never change anything outside the file's own extents.
pub fn fuzz_bootpart(data: &[u8]) {
    let Ok(mut bp) = BootPartition::from_disk(
        Box::new(MemDisk(data.to_vec())),
        Path::new("fuzz.img"),
        true,
        None,
    ) else {
        return;
    };
    let mut files = Vec::new();
    let mut dirs = vec![String::new()];
    let mut budget = 64;
    while let Some(d) = dirs.pop() {
        budget -= 1;
        if budget == 0 {
            break;
        }
        let Ok(list) = bp.list_dir(&d) else { continue };
        for e in list.into_iter().take(16) {
            if e.name.contains('/') || e.name.is_empty() {
                continue;
            }
            let p = format!("{d}/{}", e.name);
            if e.is_dir {
                dirs.push(p);
            } else {
                files.push(p);
            }
        }
    }
    for f in files.iter().take(8) {
        let _ = bp.read_file(f);
        if let Ok(ext) = bp.file_extents(f) {
            let len: u64 = ext.iter().map(|(_, l)| l).sum();
            let part_end = bp.start + bp.len;
            for (at, l) in &ext {
                assert!(at + l <= part_end, "extent outside the partition");
            }
            if len > 0 {
                let n = len.min(700) as usize;
                let mut before = vec![0u8; data.len()];
                bp.disk.read_at(&mut before, 0).unwrap();
                let pattern = vec![0xA5u8; n];
                if bp.overwrite_in_place(f, 0, &pattern).is_ok() {
                    // Only bytes inside the extents may differ.
                    let mut after = vec![0u8; before.len()];
                    bp.disk.read_at(&mut after, 0).unwrap();
                    assert_same_outside(&before, &after, &ext);
                }
                assert!(bp.overwrite_in_place(f, len, &[1]).is_err());
            }
        }
    }
}

/// Panics when `before` and `after` differ anywhere outside `ext` (disk offset, length).
fn assert_same_outside(before: &[u8], after: &[u8], ext: &[(u64, u64)]) {
    let mut ext = ext.to_vec();
    ext.sort_unstable();
    let mut pos = 0usize;
    for (at, l) in ext {
        let at = at as usize;
        if at > pos {
            assert!(
                before[pos..at] == after[pos..at],
                "bytes outside the file changed"
            );
        }
        pos = pos.max(at + l as usize);
    }
    assert!(
        before[pos..] == after[pos..],
        "bytes outside the file changed"
    );
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::process::Command;

    /// Run `script` (sh) in a fresh temporary directory and return the bytes of `out`.
    pub(crate) fn made_by(script: &str, out: &str) -> Option<Vec<u8>> {
        // One folder per call: tests run in parallel threads of one process, and two of
        // them once got the same clock reading.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let dir = std::env::temp_dir().join(format!(
            "grub-bootpart-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let st = Command::new("sh")
            .arg("-ec")
            .arg(script)
            .current_dir(&dir)
            .status()
            .ok()?;
        let r = st.success().then(|| std::fs::read(dir.join(out)).unwrap());
        let _ = std::fs::remove_dir_all(&dir);
        r
    }

    /// Size of the disks [`disk`] makes: FAT32 needs 65525 clusters (33 MiB at 512 bytes).
    fn disk_mib(fat: u32) -> usize {
        if fat == 32 {
            40
        } else {
            8
        }
    }

    /// A GPT disk whose partition 1 (name "boot", from sector 2048 to 1 MiB before the end)
    /// is a FAT `fat` volume labelled BOOTAGENT with a few files (long names, a
    /// sub-directory, a fragmented file) and partition 2 (the last MiB) is blank. The
    /// bytes of small.bin and big.bin follow the disk (see [`split`]).
    pub(crate) fn disk(fat: u32) -> Vec<u8> {
        let mib = disk_mib(fat);
        let kib = (mib - 2) * 1024;
        let spc = if fat == 12 { 4 } else { 1 };
        let script = format!(
            "truncate -s {mib}M d.img
             sgdisk -o -n 1:2048:+{kib}K -c 1:boot -t 1:0700 -n 2:0:0 d.img >/dev/null
             mkfs.fat -C -F {fat} -s {spc} -n BOOTAGENT p.img {kib} >/dev/null
             head -c 3000 /dev/urandom > small.bin
             head -c 70001 /dev/urandom > big.bin
             mmd -i p.img ::boot ::boot/grub ::AGENT
             mcopy -i p.img small.bin ::boot/grub/grubenv
             mcopy -i p.img small.bin ::a1; mcopy -i p.img small.bin ::a2
             mcopy -i p.img big.bin '::AGENT/A Long File Name.dat'
             mdel -i p.img ::a1
             mcopy -i p.img big.bin ::AGENT/FRAG.DAT
             dd if=p.img of=d.img bs=512 seek=2048 conv=notrunc status=none
             cat small.bin big.bin >> d.img"
        );
        made_by(&script, "d.img")
            .expect("sgdisk, mkfs.fat and mtools are needed (scripts/install-deps.sh)")
    }

    /// Split what [`disk`] made into the disk, small.bin and big.bin.
    pub(crate) fn split(mut d: Vec<u8>) -> (Vec<u8>, Vec<u8>, Vec<u8>) {
        let len = d.len() - 73001;
        let mut small = d.split_off(len);
        let big = small.split_off(3000);
        (d, small, big)
    }

    fn open(d: Vec<u8>) -> BootPartition {
        BootPartition::from_disk(Box::new(MemDisk(d)), Path::new("d.img"), true, None).unwrap()
    }

    #[test]
    fn finds_reads_lists_and_maps_files_on_fat12_16_32() {
        for fat in [12, 16, 32] {
            let (d, small, big) = split(disk(fat));
            let bp = open(d);
            assert_eq!(bp.partition_number(), 1);
            assert_eq!(bp.partition_start(), 2048 * 512);
            assert!(bp.describe().contains("\"BOOTAGENT\""), "{}", bp.describe());
            assert_eq!(bp.read_file("/boot/grub/grubenv").unwrap().unwrap(), small);
            assert_eq!(bp.read_file("BOOT/GRUB/GRUBENV").unwrap().unwrap(), small);
            assert_eq!(bp.read_file("/a2").unwrap().unwrap(), small);
            assert_eq!(
                bp.read_file("/AGENT/a long file name.DAT")
                    .unwrap()
                    .unwrap(),
                big
            );
            assert_eq!(bp.read_file("/AGENT/FRAG.DAT").unwrap().unwrap(), big);
            assert!(bp.read_file("/a1").unwrap().is_none());
            assert!(bp.read_file("/nope/x").unwrap().is_none());
            assert!(bp.read_file("/boot").is_err());
            let names: Vec<String> = bp
                .list_dir("/AGENT")
                .unwrap()
                .into_iter()
                .map(|e| e.name)
                .collect();
            assert_eq!(names, vec!["A Long File Name.dat", "FRAG.DAT"], "FAT{fat}");
            let root = bp.list_dir("/").unwrap();
            assert!(
                root.iter().any(|e| e.name == "boot" && e.is_dir),
                "{root:?}"
            );
            let ext = bp.file_extents("/AGENT/FRAG.DAT").unwrap();
            assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), big.len() as u64);
        }
    }

    #[test]
    fn in_place_writes_touch_only_the_file_and_never_grow_it() {
        for fat in [12, 16, 32] {
            let (d, small, _big) = split(disk(fat));
            let before = d.clone();
            let mut bp = open(d);
            let ext = bp.file_extents("/a2").unwrap();
            let mut new = small.clone();
            new[100..2900].fill(7);
            bp.overwrite_in_place("/a2", 100, &new[100..2900]).unwrap();
            assert_eq!(bp.read_file("/a2").unwrap().unwrap(), new);
            let mut after = vec![0u8; before.len()];
            bp.disk.read_at(&mut after, 0).unwrap();
            assert_same_outside(&before, &after, &ext);
            let e = bp.overwrite_in_place("/a2", 2999, &[1, 2]).unwrap_err();
            assert!(e.to_string().contains("would grow"), "{e}");
            assert!(bp.overwrite_in_place("/missing", 0, &[1]).is_err());
        }
    }

    #[test]
    fn open_range_skips_the_table_but_checks_the_fat() {
        let (d, small, _) = split(disk(16));
        let path = std::env::temp_dir().join(format!("bootpart-range-{}", std::process::id()));
        std::fs::write(&path, &d).unwrap();
        let full = BootPartition::open(&path, false).unwrap();
        let (n, start, len) = (
            full.partition_number(),
            full.partition_start(),
            full.partition_len(),
        );
        let bp = BootPartition::open_range(&path, false, n, start, len).unwrap();
        assert_eq!(bp.read_file("/a2").unwrap().unwrap(), small);
        assert_eq!(bp.describe(), full.describe());
        assert!(BootPartition::open_range(&path, false, n, start, d.len() as u64).is_err());
        assert!(BootPartition::open_range(&path, false, n, start + 512, len - 512).is_err());
        let _ = std::fs::remove_file(&path);
    }

    #[test]
    fn read_only_refuses_writes_and_no_fat_partition_is_named() {
        let (d, ..) = split(disk(16));
        let mut bp =
            BootPartition::from_disk(Box::new(MemDisk(d)), Path::new("d.img"), false, None)
                .unwrap();
        assert!(bp.overwrite_in_place("/a2", 0, &[1]).is_err());
        let blank = vec![0u8; 1 << 20];
        let e = BootPartition::from_disk(Box::new(MemDisk(blank)), Path::new("x.img"), false, None)
            .err()
            .unwrap();
        assert!(
            format!("{e:#}").contains("no boot-agent partition"),
            "{e:#}"
        );
    }

    /// Deterministic stand-in for the fuzz target: mutate the boot sector, FAT and
    /// directories of a real volume and run the fuzz entry point.
    #[test]
    fn mutated_partitions_never_panic_or_write_outside_the_file() {
        let (base, ..) = split(disk(16));
        let p = 2048 * 512;
        let mut rng = 0x5EED_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let bp = open(base.clone());
        let root = p + (1 + 2 * bp.bs.fat_sectors as usize) * 512;
        let hot = [(p, 512), (p + 512, 4096), (root, 4096)];
        let img = base;
        for _ in 0..200 {
            let mut m = img.clone();
            for _ in 0..1 + next() % 8 {
                let (at, len) = hot[(next() % 3) as usize];
                let i = at + (next() % len as u64) as usize;
                m[i] = next() as u8;
            }
            fuzz_bootpart(&m);
        }
    }
}
