//! The target side of a deploy: opened and checked against the image before anything is
//! written (step 2), its partition-table regions invalidated before the first chunk, and
//! fixed up after the last one (step 4): a partition image's boot sector told where it
//! now starts, a GPT moved to the end of a disk larger than the image's.

use std::path::Path;

use crate::error::{Error, ErrorKind, Result};
use crate::format::{Content, ImageMeta, Manifest};
use crate::target::Target;

use super::plan::{self, ExtentCheck};

/// Open the target the image's content asks for and check it fits. A target smaller than
/// the image is refused, never grown; a missing path is an error, never created.
pub(super) fn open_target(
    target: &Path,
    part: Option<&str>,
    meta: &ImageMeta,
    partition_onto_disk: bool,
) -> Result<Target> {
    let t = match (part, &meta.content) {
        (Some(_), Content::Disk { .. }) => {
            return Err(Error::invalid(format!(
                "the image holds a whole disk; deploy it to {} without a partition",
                target.display()
            )))
        }
        (Some(spec), Content::Partition { .. }) => Target::open_partition(target, spec)?.0,
        (None, Content::Partition { partition }) if !partition_onto_disk => {
            return Err(Error::new(
                ErrorKind::Target,
                format!(
                    "the image holds one partition ({}{}) and {} is a whole disk: writing it there would overwrite the disk's partition table; name the partition to restore into with -part=N or -part=LABEL, or add -wholedisk to write it over the whole disk (a disk without a partition table)",
                    partition.fs.as_str(),
                    partition
                        .label
                        .as_deref()
                        .or(partition.fs_label.as_deref())
                        .map(|l| format!(", label {l}"))
                        .unwrap_or_default(),
                    target.display()
                ),
            ))
        }
        (None, _) => Target::open_disk(target, None)?,
    };
    let min_size = meta.min_target_size;
    if t.len() < min_size {
        return Err(Error::new(
            ErrorKind::Target,
            format!("{} has {} bytes but the image needs at least {min_size}; use a larger disk or partition", target.display(), t.len()),
        ));
    }
    Ok(t)
}

/// Every chunk extent checked against the target and the image's table regions: all of
/// them now when the manifest is known (nothing is written or invalidated yet); otherwise
/// (a streaming image on a pipe) the check the sink applies to each chunk as it arrives.
pub(super) fn check_extents(
    meta: &ImageMeta,
    target_len: u64,
    manifest: Option<&Manifest>,
) -> Result<Option<ExtentCheck>> {
    match manifest {
        Some(m) => {
            plan::check_all(meta, target_len, m.entries.iter().map(|e| &e.header))?;
            Ok(None)
        }
        None => Ok(Some(ExtentCheck::new(meta, target_len))),
    }
}

/// Zero the partition-table regions of a whole-disk target (the image's and the ones
/// the target has now), so a deploy that fails part-way leaves no valid-looking table.
pub(super) fn invalidate_tables(t: &Target, content: &Content) -> Result<()> {
    let Content::Disk { layout } = content else {
        return Ok(());
    };
    let mut regions = layout.table_extents.clone();
    if let Ok(current) = crate::disk::read_layout(t, t.len()) {
        regions.extend(current.table_extents);
    }
    for e in crate::extent::normalize(regions, 0) {
        if let Some(e) = e.clip(t.len()) {
            t.zero_range(e.offset, e.len)?;
        }
    }
    // On stable storage before the first data write: otherwise the device may keep the old
    // table in its write cache while new data reaches the medium, and a power cut leaves an
    // old table over new data. fdatasync on a block device is a cache flush.
    t.sync()
}

/// After the tables are written: a partition image told where it now starts, a GPT
/// image's backup moved to the end of a larger disk. Returns notes for the user.
pub(super) fn fix_up(
    target: &Path,
    part: Option<&str>,
    t: &Target,
    content: &Content,
) -> Result<Vec<String>> {
    let mut notes = Vec::new();
    // A partition image may land at another offset than where it was captured.
    if part.is_some() {
        notes.extend(fix_hidden_sectors(target, t)?);
    }
    // A GPT image on a larger disk: the backup must sit in the target's last LBA (UEFI
    // §5.3.2), not where the source disk ended.
    if let Content::Disk { layout } = content {
        if layout.table == crate::disk::TableKind::Gpt && layout.disk_size < t.len() {
            crate::disk::gpt::relocate_backup(t, layout.sector_size)?;
            notes.push(format!(
                "the image's disk had {} bytes, {} has {}: moved the GPT backup to its end",
                layout.disk_size,
                target.display(),
                t.len()
            ));
        }
    }
    Ok(notes)
}

/// The hidden-sectors field of a partition image's boot sector set to where the partition
/// `t` of the disk at `disk` starts ([`crate::fs::hidden`]).
pub(super) fn fix_hidden_sectors(disk: &Path, t: &Target) -> Result<Option<String>> {
    crate::fs::hidden::fix_hidden_sectors(t, t.base(), lba_size(disk, t))
}

/// The logical sector size that partition LBAs of the disk at `disk` are counted in: the
/// device's for a block device, the partition table's for an image file (a GPT made for
/// 4 KiB sectors), else 512.
fn lba_size(disk: &Path, part: &Target) -> u64 {
    if part.is_block_device() {
        return part.sector_size();
    }
    Target::open_disk_read_only(disk)
        .ok()
        .and_then(|d| crate::disk::read_layout(&d, d.len()).ok())
        .map(|l| l.sector_size)
        .unwrap_or(512)
}
