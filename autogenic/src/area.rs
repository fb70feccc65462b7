//! The backup area: the image kept in the backup partition's preallocated segments, and
//! its status record.
//!
//! [`BackupArea::open`] finds the partition by its GPT name or FAT label `IMGBACKUP`
//! (never by position), reads its FAT with `grub::bootpart`'s reader, and checks that
//! STATUS.DAT and every IMAGE.NNN segment are contiguous, disjoint and inside the
//! partition. From then on it reads and writes only inside those extents: nothing
//! allocates, the FAT and directories are never written.
//!
//! The status is a small JSON document ([`AreaStatus`]) in grub::store's two-slot record
//! format (magic, sequence, CRC): a write goes into the slot not holding the newest valid
//! record, then fdatasync, so a power cut leaves the old or the new status, never a
//! mixture. [`BackupArea::commit`] syncs the image bytes BEFORE it writes the status that
//! counts them, so `verified_bytes` never claims bytes that are not on the flash.
//!
//! A status whose record is valid but whose content is not (unknown JSON, sizes that do not
//! fit the area) reads as "no image": the area's content can always be downloaded again,
//! and nothing is imaged from an area whose status cannot be trusted.

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use anyhow::{bail, Context};
use grub::bootpart::{BootPartition, Disk, FileDisk};
use grub::store::{self, SLOT_LEN};
use imgengine::disk::{DiskLayout, PartitionInfo};
use imgengine::fs::FsKind;
use imgengine::source::{RangeRead, Source};
use protocol::ImageStamp;
use serde::{Deserialize, Serialize};

use crate::backupfs::{segment_name, DIR, LABEL, STATUS_FILE, STATUS_LEN};

/// What the area holds, as its status record says.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AreaStatus {
    /// The image's name and version (None: the area holds nothing).
    pub image: Option<ImageStamp>,
    /// The digest of the image's manifest (`Manifest::digest`): which image, exactly.
    pub manifest_digest: String,
    /// The image file's length in bytes.
    pub size: u64,
    /// Bytes from offset 0 written, verified and synced.
    pub verified_bytes: u64,
    /// All `size` bytes are there and verified: the area can be imaged from.
    pub complete: bool,
}

impl AreaStatus {
    /// The status is consistent with an area of `capacity` bytes.
    fn sane(&self, capacity: u64) -> bool {
        self.size <= capacity
            && self.verified_bytes <= self.size
            && (!self.complete || (self.verified_bytes == self.size && self.image.is_some()))
            && (self.image.is_some() || self.size == 0)
    }
}

/// What a status file's bytes say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DecodedStatus {
    /// The status (empty when no record is valid, or the valid one is not usable).
    pub status: AreaStatus,
    /// Slot and sequence number of the newest valid record.
    pub newest: Option<(usize, u64)>,
    /// Why a valid record was not used.
    pub note: Option<String>,
}

/// Records numbered above this are ignored (see [`decode_status`]).
pub const MAX_SEQ: u64 = 1 << 62;

/// Decode the status file `file` (untrusted bytes) of an area of `capacity` bytes: the
/// newest valid record (magic, version, length, CRC), its JSON, checked against the area.
pub fn decode_status(file: &[u8], capacity: u64) -> DecodedStatus {
    let mut d = DecodedStatus::default();
    // The newest valid record, as grub::store::newest finds it, among sequence numbers a
    // commit can still count up from (a damaged or hostile record with a huge number is
    // ignored, so it can never pin the status).
    let mut best: Option<(usize, u64, &[u8])> = None;
    for i in 0..2 {
        let Some(slot) = file.get(i * SLOT_LEN..(i + 1) * SLOT_LEN) else {
            continue;
        };
        if let Some((seq, p)) = store::decode_slot(slot).filter(|(seq, _)| *seq <= MAX_SEQ) {
            if best.is_none_or(|(_, s, _)| seq > s) {
                best = Some((i, seq, p));
            }
        }
    }
    if let Some((slot, seq, payload)) = best {
        d.newest = Some((slot, seq));
        match serde_json::from_slice::<AreaStatus>(payload) {
            Ok(s) if s.sane(capacity) => d.status = s,
            Ok(s) => {
                d.note = Some(format!(
                    "status record {seq} does not fit the area ({} of {} bytes verified, capacity {capacity}): treated as empty",
                    s.verified_bytes, s.size
                ))
            }
            Err(e) => {
                d.note = Some(format!(
                    "status record {seq} cannot be read ({e}): treated as empty"
                ))
            }
        }
    }
    d
}

/// Fuzz entry point: a status file's bytes. Never panics; what it accepts is sane and
/// reads back the same after it is written again.
pub fn fuzz_status(data: &[u8]) {
    let cap = 1u64 << 40;
    let d = decode_status(data, cap);
    assert!(d.status.sane(cap));
    if let Some((slot, seq)) = d.newest {
        assert!(slot < 2);
        let payload = serde_json::to_vec(&d.status).expect("encodes");
        let rec = store::encode_slot(seq + 1, &payload, None).expect("fits a slot");
        let mut file = data.to_vec();
        file.resize(STATUS_LEN as usize, 0);
        let at = (1 - slot) * SLOT_LEN;
        file[at..at + rec.len()].copy_from_slice(&rec);
        let again = decode_status(&file, cap);
        assert_eq!(again.status, d.status);
        assert_eq!(again.newest, Some((1 - slot, seq + 1)));
    }
}

/// The disk shared by the FAT reader (at open), the area and its image readers.
#[derive(Clone)]
struct Shared(Arc<Mutex<Box<dyn Disk>>>);

impl Shared {
    fn lock(&self) -> std::io::Result<std::sync::MutexGuard<'_, Box<dyn Disk>>> {
        self.0
            .lock()
            .map_err(|_| std::io::Error::other("the disk's lock was poisoned by a panic"))
    }
}

impl Disk for Shared {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.lock()?.read_at(buf, offset)
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        self.lock()?.write_at(buf, offset)
    }
    fn sync(&mut self) -> std::io::Result<()> {
        self.lock()?.sync()
    }
    fn size(&self) -> u64 {
        self.lock().map(|d| d.size()).unwrap_or(0)
    }
}

struct AsReadAt<'a>(&'a dyn Disk);

impl imgengine::io::ReadAt for AsReadAt<'_> {
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        self.0.read_at(buf, offset)
    }
}

/// The backup partition of a disk layout: the partition whose GPT name or file-system
/// label is `IMGBACKUP`. None when there is none; an error when several claim it.
pub fn locate(layout: &DiskLayout) -> anyhow::Result<Option<&PartitionInfo>> {
    let named = |l: &Option<String>| l.as_deref().is_some_and(|l| l.eq_ignore_ascii_case(LABEL));
    let found: Vec<&PartitionInfo> = layout
        .partitions
        .iter()
        .filter(|p| named(&p.label) || named(&p.fs_label))
        .collect();
    match found.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(one)),
        many => bail!(
            "partitions {} are all named {LABEL}: which one is the backup partition is not clear; rename the others with sgdisk -c",
            many.iter()
                .map(|p| p.number.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    }
}

/// The image in the area as a ranged reader (what a deploy reads).
struct AreaReader {
    disk: Shared,
    segments: Vec<(u64, u64)>,
    len: u64,
}

/// Call `f(disk offset, range in buf)` for each segment piece of `[offset, offset+n)`.
fn pieces(
    segments: &[(u64, u64)],
    offset: u64,
    n: usize,
    mut f: impl FnMut(u64, std::ops::Range<usize>) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let end = offset + n as u64;
    let mut seg_start = 0u64;
    for &(at, len) in segments {
        let seg_end = seg_start + len;
        let from = offset.max(seg_start);
        let to = end.min(seg_end);
        if from < to {
            f(
                at + (from - seg_start),
                (from - offset) as usize..(to - offset) as usize,
            )?;
        }
        seg_start = seg_end;
        if seg_start >= end {
            break;
        }
    }
    Ok(())
}

impl RangeRead for AreaReader {
    fn len(&self) -> u64 {
        self.len
    }
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.len)
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let d = self.disk.lock()?;
        pieces(&self.segments, offset, buf.len(), |at, r| {
            d.read_at(&mut buf[r], at)
        })
    }
}

/// The backup partition of a disk, opened.
pub struct BackupArea {
    disk: Shared,
    name: PathBuf,
    writable: bool,
    number: u32,
    start: u64,
    len: u64,
    sector_size: u32,
    /// Disk offset of STATUS.DAT.
    status_at: u64,
    /// (disk offset, length) of IMAGE.000, IMAGE.001, ...
    segments: Vec<(u64, u64)>,
    status: AreaStatus,
    /// Slot and sequence of the newest valid record (None: none yet).
    newest: Option<(usize, u64)>,
    /// Why the status record was not used, when it was not.
    status_note: Option<String>,
}

impl BackupArea {
    /// Find and open the backup partition of `disk` (block device or disk-image file).
    pub fn open(disk: &Path, writable: bool) -> anyhow::Result<BackupArea> {
        let shared = Shared(Arc::new(Mutex::new(Box::new(FileDisk::open(
            disk, writable,
        )?))));
        let (part, ss) = Self::find(&shared, disk)?;
        // The table was just read: the FAT reader opens the partition by its range.
        let bp = BootPartition::open_range(disk, false, part.number, part.start, part.len)?;
        Self::with_partition(shared, bp, disk, writable, ss)
    }

    /// The same over any disk; `name` is what messages call it.
    pub fn from_disk(
        disk: Box<dyn Disk>,
        name: &Path,
        writable: bool,
    ) -> anyhow::Result<BackupArea> {
        let shared = Shared(Arc::new(Mutex::new(disk)));
        let (part, ss) = Self::find(&shared, name)?;
        let bp =
            BootPartition::from_disk(Box::new(shared.clone()), name, false, Some(part.number))?;
        if (bp.partition_start(), bp.partition_len()) != (part.start, part.len) {
            bail!(
                "the partition table of {} changed while it was read",
                name.display()
            );
        }
        Self::with_partition(shared, bp, name, writable, ss)
    }

    /// The backup partition of the disk and the table's sector size.
    fn find(shared: &Shared, name: &Path) -> anyhow::Result<(PartitionInfo, u64)> {
        let layout = imgengine::disk::read_layout(&AsReadAt(shared), shared.size())
            .with_context(|| format!("reading the partition table of {}", name.display()))?;
        let part = locate(&layout)?.with_context(|| {
            format!(
                "{} has no backup partition (GPT name or FAT label {LABEL}); it has: {}. `img -convert` makes one",
                name.display(),
                layout.describe_partitions()
            )
        })?;
        if part.fs != FsKind::Fat32 {
            bail!(
                "partition {} of {} is named {LABEL} but holds {} instead of the backup area's FAT32 (a conversion cut short?): run `img -convert` again",
                part.number,
                name.display(),
                part.fs
            );
        }
        Ok((part.clone(), layout.sector_size))
    }

    fn with_partition(
        shared: Shared,
        bp: BootPartition,
        name: &Path,
        writable: bool,
        sector_size: u64,
    ) -> anyhow::Result<BackupArea> {
        let what = bp.describe();
        let (number, start, len) = (
            bp.partition_number(),
            bp.partition_start(),
            bp.partition_len(),
        );
        let one_extent = |path: &str| -> anyhow::Result<(u64, u64)> {
            let ext = bp.file_extents(path)?;
            match ext.as_slice() {
                [one] => Ok(*one),
                [] => bail!("{path} on {what} is empty"),
                _ => bail!(
                    "{path} on {what} is fragmented ({} pieces): the backup area's files must be contiguous; run `img -convert` again to reformat it",
                    ext.len()
                ),
            }
        };
        let missing = |p: &str| {
            format!("{what} has no {p}: it is not a backup area; run `img -convert` again to reformat it")
        };
        match bp.file_len(STATUS_FILE)? {
            Some(STATUS_LEN) => {}
            Some(n) => bail!("{STATUS_FILE} on {what} is {n} bytes, not {STATUS_LEN}: run `img -convert` again to reformat it"),
            None => bail!(missing(STATUS_FILE)),
        }
        let status = one_extent(STATUS_FILE)?;
        let mut nums: Vec<usize> = bp
            .list_dir(DIR)
            .with_context(|| missing(DIR))?
            .into_iter()
            .filter(|e| !e.is_dir)
            .filter_map(|e| {
                let up = e.name.to_ascii_uppercase();
                let n = up.strip_prefix("IMAGE.")?;
                (n.len() == 3 && n.bytes().all(|b| b.is_ascii_digit()))
                    .then(|| n.parse().ok())
                    .flatten()
            })
            .collect();
        nums.sort_unstable();
        if nums.is_empty() {
            bail!(missing(&segment_name(0)));
        }
        if nums.iter().enumerate().any(|(i, &n)| i != n) {
            bail!(
                "the segments on {what} are not numbered IMAGE.000 onwards without a gap ({}): run `img -convert` again to reformat it",
                nums.iter()
                    .map(|n| format!("{n:03}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            );
        }
        let mut segments = Vec::with_capacity(nums.len());
        for i in nums {
            segments.push(one_extent(&segment_name(i))?);
        }
        // A hostile or damaged FAT can cross-link files: writing one would then overwrite
        // another. Every extent must stand alone.
        let mut all: Vec<(u64, u64)> = segments.clone();
        all.push(status);
        all.sort_unstable();
        for w in all.windows(2) {
            if w[0].0 + w[0].1 > w[1].0 {
                bail!("the backup area's files overlap on {what} (cross-linked clusters): run `img -convert` again to reformat it");
            }
        }
        drop(bp);
        let mut area = BackupArea {
            disk: shared,
            name: name.to_path_buf(),
            writable,
            number,
            start,
            len,
            sector_size: sector_size as u32,
            status_at: status.0,
            segments,
            status: AreaStatus::default(),
            newest: None,
            status_note: None,
        };
        area.reload()?;
        Ok(area)
    }

    /// Read the status record again.
    pub fn reload(&mut self) -> anyhow::Result<()> {
        let mut file = vec![0u8; STATUS_LEN as usize];
        self.disk
            .read_at(&mut file, self.status_at)
            .with_context(|| format!("reading {STATUS_FILE} on {}", self.describe()))?;
        let d = decode_status(&file, self.capacity());
        self.status = d.status;
        self.newest = d.newest;
        self.status_note = d.note;
        Ok(())
    }

    /// "backup partition 3 of /dev/sda (offset …, … bytes)".
    pub fn describe(&self) -> String {
        format!(
            "backup partition {} of {} (offset {}, {} bytes)",
            self.number,
            self.name.display(),
            self.start,
            self.len
        )
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
    /// The disk's logical sector size (the unit in which a write can tear).
    pub fn sector_size(&self) -> u32 {
        self.sector_size
    }
    /// (disk offset, length) of each segment, in image order.
    pub fn segments(&self) -> &[(u64, u64)] {
        &self.segments
    }
    /// Disk offset of STATUS.DAT.
    pub fn status_offset(&self) -> u64 {
        self.status_at
    }
    /// Bytes of image the area holds.
    pub fn capacity(&self) -> u64 {
        self.segments.iter().map(|s| s.1).sum()
    }
    /// The status as last read or written.
    pub fn status(&self) -> &AreaStatus {
        &self.status
    }
    /// Why the status record on the partition was not used (then [`Self::status`] is
    /// empty).
    pub fn status_note(&self) -> Option<&str> {
        self.status_note.as_deref()
    }

    fn need_writable(&self) -> anyhow::Result<()> {
        if !self.writable {
            bail!("{} was opened read-only", self.describe());
        }
        Ok(())
    }

    fn write_status(&mut self, s: AreaStatus) -> anyhow::Result<()> {
        self.need_writable()?;
        let payload = serde_json::to_vec(&s).context("encoding the backup area's status")?;
        let (slot, seq) = match self.newest {
            Some((i, seq)) => (1 - i, seq + 1),
            None => (0, 1),
        };
        let rec = store::encode_slot(seq, &payload, None)
            .context("the backup area's status is too large")?;
        let what = self.describe();
        self.disk
            .write_at(&rec, self.status_at + (slot * SLOT_LEN) as u64)
            .and_then(|_| self.disk.sync())
            .with_context(|| format!("writing {STATUS_FILE} on {what}"))?;
        self.newest = Some((slot, seq));
        self.status = s;
        self.status_note = None;
        Ok(())
    }

    /// Start (or resume) keeping image `stamp` with manifest digest `digest`, `size` bytes.
    /// The same digest and size as the status: nothing changes, and the returned offset is
    /// where the download resumes (`verified_bytes`). Anything else: the status is reset to
    /// this image with 0 bytes verified (committed before any byte of it is written), and
    /// 0 is returned. Refused when the image is larger than the area.
    pub fn begin(&mut self, stamp: ImageStamp, digest: &str, size: u64) -> anyhow::Result<u64> {
        self.need_writable()?;
        if size > self.capacity() {
            bail!(
                "the image is {size} bytes ({} MiB) and {} holds {} bytes ({} MiB): convert the device again with a larger backup partition",
                size.div_ceil(1 << 20),
                self.describe(),
                self.capacity(),
                self.capacity() >> 20
            );
        }
        if size == 0 || digest.is_empty() {
            bail!("an image of {size} bytes with manifest digest {digest:?} cannot be kept in the backup area");
        }
        let s = &self.status;
        if s.manifest_digest == digest && s.size == size && s.image.is_some() {
            if s.image.as_ref() != Some(&stamp) {
                let mut s = s.clone();
                s.image = Some(stamp);
                self.write_status(s)?;
            }
            return Ok(self.status.verified_bytes);
        }
        self.write_status(AreaStatus {
            image: Some(stamp),
            manifest_digest: digest.to_string(),
            size,
            verified_bytes: 0,
            complete: false,
        })?;
        Ok(0)
    }

    /// Write `buf` at image offset `offset` (across segments). Only inside the image begun
    /// with [`Self::begin`]; not synced (that is [`Self::commit`]'s job).
    pub fn write_at(&mut self, offset: u64, buf: &[u8]) -> anyhow::Result<()> {
        self.need_writable()?;
        if self.status.image.is_none() || self.status.complete {
            bail!(
                "{}: call begin() for a new image before writing it",
                self.describe()
            );
        }
        let size = self.status.size;
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > size)
        {
            bail!(
                "writing {} bytes at offset {offset} would pass the end of the {size}-byte image in {}",
                buf.len(),
                self.describe()
            );
        }
        let what = self.describe();
        let mut d = self.disk.lock()?;
        pieces(&self.segments, offset, buf.len(), |at, r| {
            d.write_at(&buf[r], at)
        })
        .with_context(|| format!("writing the image at offset {offset} into {what}"))
    }

    /// Read image bytes at `offset` (up to the area's capacity, whatever the status says).
    pub fn read_at(&self, offset: u64, buf: &mut [u8]) -> anyhow::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.capacity())
        {
            bail!(
                "reading {} bytes at offset {offset} passes the end of {} ({} bytes)",
                buf.len(),
                self.describe(),
                self.capacity()
            );
        }
        let d = self.disk.lock()?;
        pieces(&self.segments, offset, buf.len(), |at, r| {
            d.read_at(&mut buf[r], at)
        })
        .with_context(|| {
            format!(
                "reading the image at offset {offset} from {}",
                self.describe()
            )
        })
    }

    /// Record that bytes `0..verified_bytes` are written and verified: the image bytes are
    /// synced first, then the status record is written and synced.
    pub fn commit(&mut self, verified_bytes: u64) -> anyhow::Result<()> {
        self.need_writable()?;
        if self.status.image.is_none() || self.status.complete {
            bail!("{}: nothing begun to commit", self.describe());
        }
        if verified_bytes > self.status.size {
            bail!(
                "{verified_bytes} verified bytes claimed for a {}-byte image",
                self.status.size
            );
        }
        let what = self.describe();
        self.disk
            .sync()
            .with_context(|| format!("syncing {what}"))?;
        let mut s = self.status.clone();
        s.verified_bytes = verified_bytes;
        self.write_status(s)
    }

    /// The whole image is written and verified: commit it as complete.
    pub fn finish(&mut self) -> anyhow::Result<()> {
        self.need_writable()?;
        let s = &self.status;
        if s.image.is_none() || s.verified_bytes != s.size {
            bail!(
                "{}: the image is not complete ({} of {} bytes verified)",
                self.describe(),
                s.verified_bytes,
                s.size
            );
        }
        let what = self.describe();
        self.disk
            .sync()
            .with_context(|| format!("syncing {what}"))?;
        let mut s = s.clone();
        s.complete = true;
        self.write_status(s)
    }

    /// Forget the image (status: empty). The bytes stay but nothing will read them.
    pub fn clear(&mut self) -> anyhow::Result<()> {
        self.write_status(AreaStatus::default())
    }

    /// The complete image as a source for the imaging engine: an unchanged deploy reads it
    /// (`imgengine::deploy::OpenedImage::open_source(area.image_source()?)?.deploy(...)`)
    /// with every check it makes of a download.
    pub fn image_source(&self) -> anyhow::Result<Source> {
        if !self.status.complete {
            bail!(
                "{} holds no complete image ({} of {} bytes verified){}",
                self.describe(),
                self.status.verified_bytes,
                self.status.size,
                self.status_note
                    .as_deref()
                    .map(|n| format!("; {n}"))
                    .unwrap_or_default()
            );
        }
        let reader = AreaReader {
            disk: self.disk.clone(),
            segments: self.segments.clone(),
            len: self.status.size,
        };
        Ok(Source::from_ranged(&self.describe(), Arc::new(reader)))
    }
}

/// Fuzz entry point: `data` is a whole disk. Opening its backup area must never panic, and
/// writes through an opened area must stay inside the area's own files.
pub fn fuzz_area(data: &[u8]) {
    let Ok(mut a) = BackupArea::from_disk(
        Box::new(grub::bootpart::MemDisk(data.to_vec())),
        Path::new("fuzz.img"),
        true,
    ) else {
        return;
    };
    let _ = a.status();
    let cap = a.capacity();
    let mut owned: Vec<(u64, u64)> = a.segments().to_vec();
    owned.push((a.status_offset(), STATUS_LEN));
    let n = cap.min(3000);
    if n > 0 && a.begin(ImageStamp::default(), "d", n).is_ok() {
        a.write_at(0, &vec![0x5A; n as usize]).unwrap();
        a.commit(n).unwrap();
        let mut back = vec![0u8; n as usize];
        a.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0x5A));
        let d = a.disk.lock().unwrap();
        let mut whole = vec![0u8; data.len()];
        d.read_at(&mut whole, 0).unwrap();
        owned.sort_unstable();
        let mut pos = 0usize;
        for (at, l) in owned {
            assert!(
                whole[pos..at as usize] == data[pos..at as usize],
                "write outside the area's files"
            );
            pos = pos.max((at + l) as usize);
        }
        assert!(
            whole[pos..] == data[pos..],
            "write outside the area's files"
        );
    }
}

/// A 48 MiB disk in memory: a GPT (protective MBR, both headers) with partition 1 named
/// IMGBACKUP from 1 MiB, 45 MiB, formatted by [`crate::backupfs::format`]. The fuzz
/// target's starting point (random bytes never make a FAT32 of 40 MiB).
pub fn template_disk() -> Vec<u8> {
    const SIZE: usize = 48 << 20;
    let sectors = (SIZE / 512) as u64;
    let mut d = vec![0u8; SIZE];
    d[446 + 4] = 0xEE;
    d[446 + 8..446 + 12].copy_from_slice(&1u32.to_le_bytes());
    d[446 + 12..446 + 16].copy_from_slice(&((sectors - 1) as u32).to_le_bytes());
    d[510] = 0x55;
    d[511] = 0xAA;
    let mut e = vec![0u8; 128 * 128];
    // Microsoft basic data, mixed endian.
    e[..16].copy_from_slice(&[
        0xA2, 0xA0, 0xD0, 0xEB, 0xE5, 0xB9, 0x33, 0x44, 0x87, 0xC0, 0x68, 0xB6, 0xB7, 0x26, 0x99,
        0xC7,
    ]);
    e[16..32].fill(0x42);
    e[32..40].copy_from_slice(&2048u64.to_le_bytes());
    e[40..48].copy_from_slice(&(2048u64 + (45 << 20) / 512 - 1).to_le_bytes());
    for (i, u) in LABEL.encode_utf16().enumerate() {
        e[56 + 2 * i..58 + 2 * i].copy_from_slice(&u.to_le_bytes());
    }
    let ecrc = crc32fast::hash(&e);
    let header = |current: u64, backup: u64, entries: u64| {
        let mut h = [0u8; 512];
        h[..8].copy_from_slice(b"EFI PART");
        h[8..12].copy_from_slice(&0x0001_0000u32.to_le_bytes());
        h[12..16].copy_from_slice(&92u32.to_le_bytes());
        h[24..32].copy_from_slice(&current.to_le_bytes());
        h[32..40].copy_from_slice(&backup.to_le_bytes());
        h[40..48].copy_from_slice(&34u64.to_le_bytes());
        h[48..56].copy_from_slice(&(sectors - 34).to_le_bytes());
        h[56..72].fill(0x24);
        h[72..80].copy_from_slice(&entries.to_le_bytes());
        h[80..84].copy_from_slice(&128u32.to_le_bytes());
        h[84..88].copy_from_slice(&128u32.to_le_bytes());
        h[88..92].copy_from_slice(&ecrc.to_le_bytes());
        let crc = crc32fast::hash(&h[..92]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        h
    };
    d[512..1024].copy_from_slice(&header(1, sectors - 1, 2));
    d[1024..1024 + e.len()].copy_from_slice(&e);
    let last = (sectors - 1) as usize * 512;
    d[last..last + 512].copy_from_slice(&header(sectors - 1, 1, sectors - 33));
    let be = (sectors - 33) as usize * 512;
    d[be..be + e.len()].copy_from_slice(&e);
    let mut m = grub::bootpart::MemDisk(d);
    crate::backupfs::format(&mut m, 1 << 20, 45 << 20, 512).expect("the template formats");
    m.0
}

/// The template disk with changes on top, recording every write (fuzzing without copying
/// 48 MiB per input).
struct Overlay {
    base: &'static [u8],
    changes: std::collections::BTreeMap<u64, Vec<u8>>,
    writes: Arc<Mutex<Vec<(u64, u64)>>>,
}

impl Overlay {
    fn sector(&self, i: u64) -> &[u8] {
        match self.changes.get(&i) {
            Some(s) => s,
            None => &self.base[(i * 512) as usize..(i * 512 + 512) as usize],
        }
    }
    fn put(&mut self, offset: u64, buf: &[u8]) {
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (i, o) = (at / 512, (at % 512) as usize);
            let n = (512 - o).min(buf.len() - pos);
            let mut s = self.sector(i).to_vec();
            s[o..o + n].copy_from_slice(&buf[pos..pos + n]);
            self.changes.insert(i, s);
            pos += n;
        }
    }
}

impl Disk for Overlay {
    fn read_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.base.len() as u64)
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut pos = 0usize;
        while pos < buf.len() {
            let at = offset + pos as u64;
            let (i, o) = (at / 512, (at % 512) as usize);
            let n = (512 - o).min(buf.len() - pos);
            buf[pos..pos + n].copy_from_slice(&self.sector(i)[o..o + n]);
            pos += n;
        }
        Ok(())
    }
    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        if offset
            .checked_add(buf.len() as u64)
            .is_none_or(|e| e > self.base.len() as u64)
        {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        self.writes
            .lock()
            .expect("not poisoned")
            .push((offset, buf.len() as u64));
        self.put(offset, buf);
        Ok(())
    }
    fn sync(&mut self) -> std::io::Result<()> {
        Ok(())
    }
    fn size(&self) -> u64 {
        self.base.len() as u64
    }
}

/// Fuzz entry point: `data` is a list of 4-byte mutations (region, offset (2 bytes),
/// value) of [`template_disk`]'s partition table, boot sector, FAT, directories and status
/// file. Opening must never panic, and writes through an opened area must stay inside its
/// own files.
pub fn fuzz_area_mutations(data: &[u8]) {
    static T: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    let base: &'static [u8] = T.get_or_init(template_disk);
    let g = crate::backupfs::plan(45 << 20, 512).expect("the template's geometry");
    let p = 1u64 << 20;
    let hot = [
        0u64,
        p,
        p + u64::from(g.reserved_sectors) * 512,
        p + g.cluster_offset(2),
        p + g.cluster_offset(g.status_cluster),
        base.len() as u64 - 33 * 512,
    ];
    let writes = Arc::new(Mutex::new(Vec::new()));
    let mut o = Overlay {
        base,
        changes: Default::default(),
        writes: writes.clone(),
    };
    for m in data.chunks_exact(4).take(64) {
        let at = hot[m[0] as usize % hot.len()] + u64::from(u16::from_le_bytes([m[1], m[2]]));
        o.put(at.min(base.len() as u64 - 1), &[m[3]]);
    }
    let Ok(mut a) = BackupArea::from_disk(Box::new(o), Path::new("fuzz.img"), true) else {
        return;
    };
    let mut owned: Vec<(u64, u64)> = a.segments().to_vec();
    owned.push((a.status_offset(), STATUS_LEN));
    let n = a.capacity().min(5000);
    if n > 0 && a.begin(ImageStamp::default(), "d", n).is_ok() {
        a.write_at(0, &vec![0x5A; n as usize]).unwrap();
        a.commit(n).unwrap();
        let mut back = vec![0u8; n as usize];
        a.read_at(0, &mut back).unwrap();
        assert!(back.iter().all(|&b| b == 0x5A));
        assert_eq!(a.status().verified_bytes, n);
    }
    for (at, len) in writes.lock().expect("not poisoned").iter() {
        assert!(
            owned.iter().any(|(o, l)| at >= o && at + len <= o + l),
            "a write at {at} ({len} bytes) outside the area's files"
        );
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::backupfs;
    use grub::bootpart::MemDisk;
    use std::io::Read;
    use std::process::Command;

    /// A temporary file path, unique per call.
    pub(crate) fn temp(name: &str) -> PathBuf {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        std::env::temp_dir().join(format!(
            "autogenic-{}-{}-{name}",
            std::process::id(),
            NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        ))
    }

    /// A sparse GPT disk of `mib` MiB: partition 1 BOOTAGENT (16 MiB), 2 "OS" (`os` MiB),
    /// 3 IMGBACKUP (the rest), formatted by [`backupfs::format`]. None without sgdisk.
    pub(crate) fn disk(mib: u64, os: u64) -> Option<(PathBuf, backupfs::Geometry)> {
        let p = temp("disk.img");
        std::fs::File::create(&p)
            .unwrap()
            .set_len(mib << 20)
            .unwrap();
        let ok = Command::new("sgdisk")
            .args(["-o", "-n1:2048:+16M", "-c1:BOOTAGENT", "-t1:ef00"])
            .arg(format!("-n2:0:+{os}M"))
            .args(["-c2:OS", "-n3:0:0", "-c3:IMGBACKUP", "-t3:0700"])
            .arg(&p)
            .output()
            .ok()?
            .status
            .success();
        assert!(ok, "sgdisk failed");
        let start = (17 + os) << 20;
        let len = (mib << 20) - start - (1 << 20);
        let g = backupfs::format_path(&p, start, len, 512).unwrap();
        Some((p, g))
    }

    fn skip() {
        eprintln!("SKIPPED: sgdisk is not installed (scripts/install-deps.sh)");
    }

    #[test]
    fn a_formatted_partition_opens_and_keeps_an_image_across_segments() {
        // 9.5 GiB backup: three segments.
        let Some((p, g)) = disk(9800, 100) else {
            return skip();
        };
        let mut a = BackupArea::open(&p, true).unwrap();
        assert_eq!(a.partition_number(), 3);
        assert_eq!(a.segments().len(), 3);
        assert_eq!(a.capacity(), g.capacity());
        assert_eq!(a.status(), &AreaStatus::default());
        let seg0 = a.segments()[0].1;
        let size = seg0 + 3_000_000;
        let stamp = ImageStamp {
            name: "wes7".into(),
            version: "2".into(),
        };
        assert_eq!(a.begin(stamp.clone(), "abc", size).unwrap(), 0);
        // Bytes across the boundary of IMAGE.000 and IMAGE.001.
        let data: Vec<u8> = (0..5_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
        let at = seg0 - 2_000_000;
        a.write_at(at, &data).unwrap();
        a.commit(1000).unwrap();
        assert!(a.write_at(size - 10, &[0; 11]).is_err());
        let mut back = vec![0u8; data.len()];
        a.read_at(at, &mut back).unwrap();
        assert!(back == data);
        // Reopened: resumes at the committed offset; another image restarts at 0.
        let mut a = BackupArea::open(&p, true).unwrap();
        assert_eq!(a.status().verified_bytes, 1000);
        assert_eq!(a.begin(stamp.clone(), "abc", size).unwrap(), 1000);
        assert!(a.image_source().is_err());
        assert!(a.finish().is_err());
        a.commit(size).unwrap();
        a.finish().unwrap();
        let mut src = a.image_source().unwrap();
        assert_eq!(src.len(), Some(size));
        let mut got = Vec::new();
        src.read_range(at, data.len() as u64)
            .unwrap()
            .read_to_end(&mut got)
            .unwrap();
        assert!(got == data);
        assert!(src.stream().is_ok());
        let a2 = BackupArea::open(&p, false).unwrap();
        assert!(a2.status().complete);
        let mut a = a2;
        assert!(a.commit(1).is_err(), "read-only");
        let mut a = BackupArea::open(&p, true).unwrap();
        assert_eq!(a.begin(stamp.clone(), "other", size).unwrap(), 0);
        assert!(!a.status().complete);
        let e = a
            .begin(stamp, "x", a.capacity() + 1)
            .unwrap_err()
            .to_string();
        assert!(e.contains("convert the device again"), "{e}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn torn_status_writes_read_back_old_or_new() {
        let Some((p, _)) = disk(80, 20) else {
            return skip();
        };
        let image = std::fs::read(&p).unwrap();
        let mut a = BackupArea::from_disk(Box::new(MemDisk(image)), &p, true).unwrap();
        // A long name: the record spans several sectors.
        let stamp = ImageStamp {
            name: "n".repeat(1500),
            version: "1".into(),
        };
        a.begin(stamp.clone(), "d1", 4096).unwrap();
        a.commit(512).unwrap();
        let old = a.status().clone();
        let mut new = old.clone();
        new.verified_bytes = 1024;
        let payload = serde_json::to_vec(&new).unwrap();
        let (slot, seq) = a.newest.unwrap();
        let rec = store::encode_slot(seq + 1, &payload, None).unwrap();
        assert!(rec.len() > 3 * 512);
        let at = a.status_at + ((1 - slot) * SLOT_LEN) as u64;
        let base = {
            let d = a.disk.lock().unwrap();
            let mut v = vec![0u8; d.size() as usize];
            d.read_at(&mut v, 0).unwrap();
            v
        };
        for cut in (0..=rec.len()).step_by(512).chain([rec.len()]) {
            let mut d = base.clone();
            d[at as usize..at as usize + cut].copy_from_slice(&rec[..cut]);
            let b = BackupArea::from_disk(Box::new(MemDisk(d)), &p, false).unwrap();
            let s = b.status();
            if cut == rec.len() {
                assert_eq!(s, &new);
            } else {
                assert_eq!(s, &old, "cut at {cut}");
            }
        }
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn fragmented_missing_or_hostile_areas_are_refused_with_the_way_out() {
        let Some((p, g)) = disk(200, 20) else {
            return skip();
        };
        let base = std::fs::read(&p).unwrap();
        let part = (37u64 << 20) as usize;
        let fat = part + g.reserved_sectors as usize * 512;
        // Break the chain of STATUS.DAT in both FATs: a file of another length.
        let mut d = base.clone();
        let c = g.status_cluster as usize + 3;
        for copy in 0..2 {
            let o = fat + copy * g.fat_sectors as usize * 512 + 4 * c;
            d[o..o + 4].copy_from_slice(&0x0FFF_FFFFu32.to_le_bytes());
        }
        let e = BackupArea::from_disk(Box::new(MemDisk(d)), &p, false)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("fsck.fat"), "{e:#}");
        // No boot sector: "run img -convert again".
        let mut d = base.clone();
        d[part..part + 512].fill(0);
        let e = BackupArea::from_disk(Box::new(MemDisk(d)), &p, false)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("img -convert"), "{e:#}");
        // A valid record with garbage JSON reads as empty, with a note.
        let mut a = BackupArea::from_disk(Box::new(MemDisk(base.clone())), &p, true).unwrap();
        let rec = store::encode_slot(5, b"{not json", None).unwrap();
        {
            let mut dd = a.disk.clone();
            dd.write_at(&rec, a.status_at).unwrap();
        }
        a.reload().unwrap();
        assert_eq!(a.status(), &AreaStatus::default());
        assert!(a.status_note().unwrap().contains("cannot be read"));
        // A status that claims more than the area holds is ignored too.
        let bad = AreaStatus {
            image: Some(ImageStamp::default()),
            manifest_digest: "d".into(),
            size: a.capacity() + 1,
            verified_bytes: 0,
            complete: false,
        };
        let rec = store::encode_slot(6, &serde_json::to_vec(&bad).unwrap(), None).unwrap();
        a.disk
            .clone()
            .write_at(&rec, a.status_at + SLOT_LEN as u64)
            .unwrap();
        a.reload().unwrap();
        assert!(a.status_note().unwrap().contains("does not fit"));
        // No IMGBACKUP partition at all.
        let e = BackupArea::from_disk(Box::new(MemDisk(vec![0; 1 << 20])), &p, false)
            .err()
            .unwrap();
        assert!(format!("{e:#}").contains("no backup partition"), "{e:#}");
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn the_fuzz_template_opens_and_mutations_never_panic() {
        let a = BackupArea::from_disk(
            Box::new(MemDisk(template_disk())),
            Path::new("t.img"),
            false,
        )
        .unwrap();
        assert_eq!(a.partition_number(), 1);
        assert_eq!(a.segments().len(), 1);
        fuzz_area_mutations(&[]);
        let mut rng = 0xFACE_u64;
        for _ in 0..300 {
            let mut m = Vec::new();
            for _ in 0..1 + rng % 6 {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                m.extend_from_slice(&rng.to_le_bytes()[..4]);
            }
            fuzz_area_mutations(&m);
        }
    }

    #[test]
    fn a_huge_sequence_number_cannot_pin_the_status() {
        let mut file = vec![0u8; STATUS_LEN as usize];
        let s = AreaStatus {
            image: Some(ImageStamp::default()),
            manifest_digest: "d".into(),
            size: 10,
            verified_bytes: 5,
            complete: false,
        };
        let rec = store::encode_slot(u64::MAX, &serde_json::to_vec(&s).unwrap(), None).unwrap();
        file[..rec.len()].copy_from_slice(&rec);
        assert_eq!(decode_status(&file, 100), DecodedStatus::default());
        let ok = store::encode_slot(3, &serde_json::to_vec(&s).unwrap(), None).unwrap();
        file[SLOT_LEN..SLOT_LEN + ok.len()].copy_from_slice(&ok);
        assert_eq!(decode_status(&file, 100).status, s);
        fuzz_status(&file);
        fuzz_status(&file[..100]);
        fuzz_status(&[]);
    }

    /// Deterministic stand-in for the fuzz target: mutate the boot sector, FAT, directories
    /// and status of a real area.
    #[test]
    fn mutated_areas_never_panic_or_write_outside_their_files() {
        let Some((p, g)) = disk(80, 20) else {
            return skip();
        };
        let base = std::fs::read(&p).unwrap();
        let _ = std::fs::remove_file(&p);
        let part = 37usize << 20;
        let fat = part + g.reserved_sectors as usize * 512;
        let dirs = part + g.cluster_offset(2) as usize;
        let status = part + g.cluster_offset(g.status_cluster) as usize;
        let hot = [
            (part, 512),
            (fat, 4096),
            (dirs, 2048),
            (status, 512),
            (512, 1024),
        ];
        let mut rng = 0x5EED_u64;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..60 {
            let mut m = base.clone();
            for _ in 0..1 + next() % 6 {
                let (at, len) = hot[(next() % hot.len() as u64) as usize];
                let i = at + (next() % len as u64) as usize;
                m[i] = next() as u8;
            }
            fuzz_area(&m);
        }
    }
}
