//! Autogenic imaging (seed 001): a device keeps an image in a backup partition on its own
//! flash, downloaded in the background (BI), and re-images its OS partition from it at the
//! next boot (PI) without a download.
//!
//! This crate knows the disk: the layout rules, the backup partition's file system, the
//! area holding the image and its status, and the conversion of a device's partition
//! table. It knows nothing of the agent (check-ins, tasks, the imaging status record on the
//! boot-agent partition): the agent calls it.
//!
//! # API (stable: the agent's BI/PI code builds on it)
//!
//! [`area`], the image kept in the backup partition:
//! - [`BackupArea::open`]`(disk: &Path, writable) -> Result<BackupArea>`: finds the
//!   partition named (GPT name or FAT label) [`LABEL`] = `IMGBACKUP`, never by position;
//!   checks its files are contiguous and disjoint. [`BackupArea::from_disk`] takes a
//!   `Box<dyn grub::bootpart::Disk>` (tests, fuzzing). [`area::locate`]`(&DiskLayout)`:
//!   just whether a layout has one (inventory's `SupportImgBackup`).
//! - [`BackupArea::status`]`() -> &AreaStatus { image: Option<ImageStamp>,
//!   manifest_digest: String, size, verified_bytes, complete }`; [`BackupArea::reload`];
//!   [`BackupArea::status_note`] (why a record was ignored).
//! - [`BackupArea::begin`]`(stamp, digest, size) -> Result<u64>`: same digest and size:
//!   returns `verified_bytes` (resume from there, e.g. HTTP Range); else resets the status
//!   to the new image (committed) and returns 0. Refuses an image larger than
//!   [`BackupArea::capacity`], naming both sizes.
//! - [`BackupArea::write_at`]`(offset, &[u8])`: image bytes, across segments, not synced.
//! - [`BackupArea::commit`]`(verified_bytes)`: fdatasync of the image bytes, then the status
//!   slot write and fdatasync (power-cut safe: old or new status).
//! - [`BackupArea::finish`]`()`: verified == size → `complete: true`.
//! - [`BackupArea::clear`]`()`: status empty.
//! - [`BackupArea::read_at`]`(offset, &mut [u8])`; [`BackupArea::capacity`],
//!   [`BackupArea::describe`], [`BackupArea::partition_number`], `partition_start`,
//!   `partition_len`, `segments`, `sector_size`.
//! - [`BackupArea::image_source`]`() -> Result<imgengine::source::Source>` (complete images
//!   only): an UNCHANGED deploy reads it with all its checks:
//!   `imgengine::deploy::OpenedImage::open_source(area.image_source()?)?.deploy(disk,
//!   Some("2"), &opts, &progress)`.
//!
//! [`backupfs`], the backup partition's FAT32: [`backupfs::format`]`(disk, start, len,
//! sector_size)`, [`backupfs::format_path`], [`backupfs::plan`] (geometry without
//! writing), [`backupfs::capacity_for`]`(partition_len, sector_size)`.
//!
//! [`layout`], the seed's rules (pure): [`layout::compute`]`(&LayoutRequest) ->
//! Result<Layout>`, [`layout::same_flash_size`]`(planned, actual)`,
//! [`layout::parse_size`]`("600MB")`.
//!
//! [`convert`], applying a layout to a disk: [`convert::plan_for_disk`]`(disk, image,
//! backup) -> Result<Plan>` (reads the disk, computes the layout), [`convert::apply`]`(disk,
//! &Plan) -> Result<BackupArea>` (partition table, then the backup's format).

pub mod area;
pub mod backupfs;
pub mod convert;
pub mod layout;

pub use area::{AreaStatus, BackupArea};
pub use backupfs::LABEL;
pub use protocol::ImageStamp;
