//! Seed 001's autogenic imaging, the server's side, as pure functions (the job model's
//! habit: everything here takes plain rows and answers a decision, so it is table-tested
//! without a database):
//!
//! - [`parse_rsp`]: the package script `image.rsp` that comes with an image (untrusted
//!   text, bounded); a `<BackupImage>` tag in it marks the image autogenic;
//! - what the server knows of a device's backup partition from its check-in
//!   ([`BackupView`], [`backup_holds`]);
//! - the validation of BI (deploy with `after: copy_only`), PI (`from_backup`), BI+PI and
//!   the conversion job ([`validate_backup_deploy`], [`validate_convert`]);
//! - the seed's disk layout of an autogenic-capable device ([`layout`]) and the rule that
//!   every device of a conversion job has the same flash size ([`same_flash`]);
//! - the Maintenance a device reports at check-in ([`maintenance_at_checkin`]) and the
//!   rollback that re-images from local flash ([`rollback_from_backup`]).
//!
//! The layout rules are the seed's (step 4, "Autogenic Device Creation"); the agent's
//! `autogenic` crate computes the same layout on the device and is the one that writes it.

use crate::model::{DeviceState, JobOptions, Validation};
use crate::protocol::{After, CheckIn, DiskReport, ImageStamp};
use crate::store::ImageRow;

pub const MIB: u64 = 1 << 20;
/// The seed's "Non-PXE Size": the boot-agent partition is 16 MB.
pub const BOOT_AGENT_SIZE: u64 = 16 * MIB;
/// The backup partition is the image's size plus 100 MB by default.
pub const BACKUP_SLACK: u64 = 100 * MIB;
/// Flash up to this size may get a larger backup partition; above it the OS partition is
/// laid out within the first 4096 MB.
pub const SMALL_FLASH: u64 = 4096 * MIB;

/// Longest `image.rsp` accepted: a package script is a few hundred bytes.
pub const RSP_MAX_BYTES: usize = 64 * 1024;
/// Most tags read from one `image.rsp`.
pub const RSP_MAX_TAGS: usize = 4096;
/// Longest tag name read.
const RSP_MAX_TAG: usize = 64;

/// What the server reads from a package script.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Rsp {
    /// The tag names (opening or empty-element tags), in order, as written.
    pub tags: Vec<String>,
    /// The seed's `<BackupImage>` tag is present: the image is autogenic.
    pub backup_image: bool,
}

/// Read an `image.rsp` (seed 001: "search the package script for the `<BackupImage>`
/// tag"). The file comes with an image from anywhere, so it is bounded: at most
/// [`RSP_MAX_BYTES`], text (UTF-8, UTF-16 with its byte-order mark as Windows tools write it,
/// or a single-byte code page), at most [`RSP_MAX_TAGS`] tags. Anything that is not a
/// well-formed tag name is text, not a tag; a NUL byte in 8-bit text means it is not a
/// script at all.
pub fn parse_rsp(bytes: &[u8]) -> Result<Rsp, String> {
    if bytes.len() > RSP_MAX_BYTES {
        return Err(format!(
            "image.rsp is {} bytes, more than {RSP_MAX_BYTES}: not a package script (give the right file with --rsp, or --autogenic)",
            bytes.len()
        ));
    }
    let text = decode_text(bytes)?;
    let mut rsp = Rsp::default();
    let mut rest = text.as_str();
    while let Some(at) = rest.find('<') {
        rest = &rest[at + 1..];
        if rest.starts_with('/') || rest.starts_with('!') || rest.starts_with('?') {
            continue;
        }
        let end = rest
            .find(|c: char| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | ':')))
            .unwrap_or(rest.len());
        let name = &rest[..end];
        let closes = rest[end..].starts_with(['>', '/', ' ', '\t', '\r', '\n']);
        if name.is_empty() || name.len() > RSP_MAX_TAG || !closes {
            continue;
        }
        if rsp.tags.len() == RSP_MAX_TAGS {
            return Err(format!(
                "image.rsp has more than {RSP_MAX_TAGS} tags: not a package script"
            ));
        }
        if name.eq_ignore_ascii_case("BackupImage") {
            rsp.backup_image = true;
        }
        rsp.tags.push(name.to_string());
        rest = &rest[end..];
    }
    Ok(rsp)
}

fn decode_text(bytes: &[u8]) -> Result<String, String> {
    let utf16 = |le: bool, body: &[u8]| -> Result<String, String> {
        if !body.len().is_multiple_of(2) {
            return Err("image.rsp: UTF-16 text with an odd number of bytes".into());
        }
        let units = body.chunks_exact(2).map(|c| {
            if le {
                u16::from_le_bytes([c[0], c[1]])
            } else {
                u16::from_be_bytes([c[0], c[1]])
            }
        });
        char::decode_utf16(units)
            .collect::<Result<String, _>>()
            .map_err(|_| "image.rsp: broken UTF-16 text".to_string())
    };
    match bytes {
        [0xff, 0xfe, body @ ..] => utf16(true, body),
        [0xfe, 0xff, body @ ..] => utf16(false, body),
        _ => {
            let body = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
            if body.contains(&0) {
                return Err(
                    "image.rsp contains NUL bytes: not a package script (give the right file with --rsp, or --autogenic)".into(),
                );
            }
            // A single-byte code page reads as Latin-1: tag names are ASCII either way.
            Ok(match std::str::from_utf8(body) {
                Ok(s) => s.to_string(),
                Err(_) => body.iter().map(|&b| b as char).collect(),
            })
        }
    }
}

/// Read a package script from disk: at most [`RSP_MAX_BYTES`] + 1 bytes are read, so a
/// wrong, huge file is refused without reading it whole.
pub fn read_rsp(path: &std::path::Path) -> Result<Rsp, String> {
    use std::io::Read;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut buf = Vec::new();
    f.take(RSP_MAX_BYTES as u64 + 1)
        .read_to_end(&mut buf)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    parse_rsp(&buf).map_err(|e| format!("{}: {e}", path.display()))
}

/// A package directory (seed 001: "the package holds the image file and one script file
/// named image.rsp"): its image file and its `image.rsp`, if any. Hidden files are
/// ignored; more than one candidate image file is refused, naming them.
pub fn package_dir(
    dir: &std::path::Path,
) -> Result<(std::path::PathBuf, Option<std::path::PathBuf>), String> {
    let entries = std::fs::read_dir(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let (mut rsp, mut images) = (None, Vec::new());
    for e in entries.take(10_000) {
        let e = e.map_err(|e| format!("{}: {e}", dir.display()))?;
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if name.starts_with('.') || !path.is_file() {
            continue;
        }
        if name.eq_ignore_ascii_case("image.rsp") {
            rsp = Some(path);
        } else if !name.to_ascii_lowercase().ends_with(".rsp") {
            images.push(path);
        }
    }
    images.sort();
    match images.len() {
        0 => Err(format!(
            "package {} holds no image file (only: {})",
            dir.display(),
            if rsp.is_some() { "image.rsp" } else { "nothing" }
        )),
        1 => Ok((images.remove(0), rsp)),
        _ => Err(format!(
            "package {} holds several files that could be the image ({}): register the image file itself with --rsp {}/image.rsp",
            dir.display(),
            images
                .iter()
                .map(|p| p.file_name().unwrap_or_default().to_string_lossy().into_owned())
                .collect::<Vec<_>>()
                .join(", "),
            dir.display()
        )),
    }
}

// ---- the device's backup partition, as its check-in reports it ----

/// The disk a job works on: the named one, else the first (the system disk).
pub fn job_disk<'a>(inv: &'a CheckIn, disk: Option<&str>) -> Option<&'a DiskReport> {
    match disk {
        Some(n) => inv.disks.iter().find(|d| d.name == n),
        None => inv.disks.first(),
    }
}

/// The flash (disk) size a conversion job plans with.
pub fn flash_size(inv: &CheckIn, disk: Option<&str>) -> Option<u64> {
    job_disk(inv, disk).map(|d| d.size)
}

/// Does the device have a backup partition (seed 000's `SupportImgBackup`)?
pub fn has_backup_partition(inv: &CheckIn) -> bool {
    inv.autogenic.support_img_backup || inv.autogenic.backup_partition_size > 0
}

/// The backup partition as the administrator sees it (seed 001 step 7).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct BackupView {
    /// The device has a backup partition (`SupportImgBackup=1`).
    pub supported: bool,
    /// A complete, verified image is there (`BackupImagePresent=1`).
    pub present: bool,
    /// `BackImageVer`.
    pub version: Option<String>,
    /// The image being downloaded there or held there (name and version).
    pub image: Option<ImageStamp>,
    /// Bytes of it verified so far, and its size (BI progress; resumes from `bytes`).
    pub bytes: u64,
    pub size: u64,
    /// Size of the backup partition.
    pub partition_size: u64,
}

impl BackupView {
    pub fn of(inv: &CheckIn) -> BackupView {
        let a = &inv.autogenic;
        BackupView {
            supported: has_backup_partition(inv),
            present: a.backup_image_present,
            version: a.back_image_ver.clone(),
            image: a.backup_image.clone(),
            bytes: a.backup_bytes,
            size: a.backup_size,
            partition_size: a.backup_partition_size,
        }
    }

    /// One line: `os 8.0 (complete)`, `os 8.0: 40% (BI 420 MiB of 1.0 GiB)`, `empty`, `-`.
    pub fn text(&self) -> String {
        if !self.supported {
            return "-".into();
        }
        let name = match (&self.image, &self.version) {
            (Some(i), _) => format!("{} {}", i.name, i.version),
            (None, Some(v)) => format!("version {v}"),
            (None, None) => return "empty".into(),
        };
        let percent = (self.bytes.min(self.size).saturating_mul(100)).checked_div(self.size);
        match percent {
            _ if self.present => format!("{name} (complete)"),
            Some(p) => format!(
                "{name}: {p}% (BI {} of {})",
                mib(self.bytes),
                mib(self.size)
            ),
            None => format!("{name} (incomplete)"),
        }
    }
}

fn mib(b: u64) -> String {
    format!("{} MiB", b / MIB)
}

/// Does the device's backup partition hold exactly this image, complete and verified?
pub fn backup_holds(inv: &CheckIn, name: &str, version: &str) -> bool {
    let a = &inv.autogenic;
    if !(has_backup_partition(inv) && a.backup_image_present) {
        return false;
    }
    match &a.backup_image {
        Some(s) => s.name == name && s.version == version,
        // An agent that reports only the seed's flags: the version is all it says.
        None => a.back_image_ver.as_deref() == Some(version),
    }
}

// ---- validation ----

/// The job's autogenic flags, in the seed's words.
pub fn job_words(opts: &JobOptions) -> Option<&'static str> {
    match (
        opts.backup_only && opts.after == After::CopyOnly,
        opts.from_backup,
        opts.fetch_to_backup,
    ) {
        (_, true, true) => Some("download to the backup partition and image from it (BI+PI)"),
        (_, true, false) => Some("image from the backup partition (PI)"),
        (true, false, _) => Some("download to the backup partition (BI)"),
        _ => None,
    }
}

/// The job's autogenic flags in short (`BI`, `PI`, `BI+PI`), for lists.
pub fn short_words(opts: &JobOptions) -> Option<&'static str> {
    job_words(opts).map(|w| {
        if w.contains("BI+PI") {
            "BI+PI"
        } else if w.contains("(PI)") {
            "PI"
        } else {
            "BI"
        }
    })
}

/// The flags a request may combine (before anything is looked up): BI / PI go with a
/// deploy, `backup_size` with a conversion, `fetch_to_backup` only with `from_backup`.
pub fn check_request(kind: &str, o: &JobOptions) -> Result<(), String> {
    let autogenic = o.from_backup || o.fetch_to_backup || o.backup_only;
    if autogenic && kind != "deploy" {
        return Err(format!(
            "--backup-only and --from-backup go with a deploy (--image), not a {kind} job"
        ));
    }
    if o.fetch_to_backup && !o.from_backup {
        return Err(
            "fetch_to_backup goes with from_backup (BI+PI); for BI alone use --backup-only".into(),
        );
    }
    if o.backup_only && o.after != After::CopyOnly {
        return Err(
            "backup_only means after: copy_only (BI); for BI then PI give --backup-only --from-backup".into(),
        );
    }
    if o.from_backup && o.after == After::CopyOnly {
        return Err(
            "from_backup images the OS partition, so it cannot be copy-only: give --backup-only --from-backup for BI then PI".into(),
        );
    }
    if o.backup_size.is_some() && kind != "convert" {
        return Err("--backup-size goes with --convert".into());
    }
    if o.backup_size == Some(0) {
        return Err("--backup-size 0: give a size, or leave it out for image + 100 MB".into());
    }
    Ok(())
}

fn need_autogenic(img: &ImageRow, what: &str, v: &mut Validation) {
    if !img.autogenic {
        v.errors.push(format!(
            "image {} {} is not autogenic, so it cannot {what}: register it with `imgserver image add FILE --autogenic` (or a package whose image.rsp has <BackupImage>)",
            img.name, img.version
        ));
    }
}

/// Validate BI, PI and BI+PI against the device's last check-in: an autogenic image, a
/// backup partition, and for PI alone that exact image already complete in it. Errors name
/// the device and the way out. Nothing for a plain deploy.
pub fn validate_backup_deploy(img: &ImageRow, opts: &JobOptions, dev: &CheckIn) -> Validation {
    let mut v = Validation::default();
    let Some(what) = job_words(opts) else {
        return v;
    };
    let mac = &dev.device.mac;
    need_autogenic(img, what, &mut v);
    if !has_backup_partition(dev) {
        v.errors.push(format!(
            "device {mac} has no backup partition (SupportImgBackup=0), so it cannot {what}: convert it first with `imgserver schedule add --mac {mac} --image {}:{} --convert`",
            img.name, img.version
        ));
        return v;
    }
    let a = &dev.autogenic;
    if opts.from_backup && !opts.fetch_to_backup && !backup_holds(dev, &img.name, &img.version) {
        let has = match (&a.backup_image, &a.back_image_ver) {
            (Some(s), _) if a.backup_image_present => format!("{} {}", s.name, s.version),
            (Some(s), _) => format!(
                "{} {} incomplete ({} of {} bytes)",
                s.name, s.version, a.backup_bytes, a.backup_size
            ),
            (None, Some(ver)) if a.backup_image_present => format!("version {ver}"),
            _ => "no image".into(),
        };
        v.errors.push(format!(
            "the backup partition of device {mac} holds {has}, not {} {}: schedule `--backup-only` first (BI), or `--backup-only --from-backup` to download and image in one job",
            img.name, img.version
        ));
    }
    if a.backup_partition_size > 0 {
        if let Some(size) = img.size {
            if size > a.backup_partition_size {
                v.errors.push(format!(
                    "image {} {} is {size} bytes, the backup partition of device {mac} holds {}: convert it again with a larger --backup-size (flash of 4096 MB or less) or use a smaller image",
                    img.name, img.version, a.backup_partition_size
                ));
            }
        }
    }
    v
}

/// The seed's layout of an autogenic-capable device.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    pub flash: u64,
    pub boot_agent: u64,
    pub os: u64,
    pub backup: u64,
    /// Flash left free (flash over 4096 MB: the seed lays the OS out within 4096 MB).
    pub free: u64,
}

/// Seed 001 step 4's layout: boot-agent partition 16 MB (a larger one the device already
/// has is kept), backup = image size + 100 MB (larger only on flash of 4096 MB or less, and
/// never smaller than that), OS partition = flash (or 4096 MB on larger flash) − boot agent −
/// backup, and it must hold `os_needs` bytes (the image's minimum target size). Refusals
/// name the sizes.
pub fn layout(
    flash: u64,
    boot_agent_now: Option<u64>,
    image_size: u64,
    backup: Option<u64>,
    os_needs: u64,
) -> Result<Layout, String> {
    let boot_agent = boot_agent_now.unwrap_or(0).max(BOOT_AGENT_SIZE);
    let default_backup = image_size.saturating_add(BACKUP_SLACK);
    let backup = match backup {
        None => default_backup,
        Some(b) if b < default_backup => {
            return Err(format!(
                "a backup partition of {} MiB cannot hold the image ({} MiB + 100 MiB = {} MiB): leave out --backup-size",
                b / MIB,
                image_size / MIB,
                default_backup / MIB
            ))
        }
        Some(b) if b > default_backup && flash > SMALL_FLASH => {
            return Err(format!(
                "the backup partition can be enlarged only on flash of 4096 MiB or less; this flash is {} MiB: leave out --backup-size (it is {} MiB)",
                flash / MIB,
                default_backup / MIB
            ))
        }
        Some(b) => b,
    };
    let span = flash.min(SMALL_FLASH);
    let os = span
        .checked_sub(boot_agent)
        .and_then(|r| r.checked_sub(backup))
        .filter(|os| *os > 0 && *os >= os_needs)
        .ok_or_else(|| {
            format!(
                "{} MiB of flash{} cannot hold the boot agent ({} MiB), the backup partition ({} MiB) and an OS partition of at least {} MiB: use a smaller image{}",
                flash / MIB,
                if flash > SMALL_FLASH { " (the seed lays it out within 4096 MiB)" } else { "" },
                boot_agent / MIB,
                backup / MIB,
                os_needs.max(1).div_ceil(MIB),
                if backup > default_backup { " or a smaller --backup-size" } else { "" }
            )
        })?;
    Ok(Layout {
        flash,
        boot_agent,
        os,
        backup,
        free: flash - span,
    })
}

/// The seed's rule for a conversion job: every device has the same flash size (a device
/// that has not checked in yet has none). Answers that size.
pub fn same_flash(devices: &[(String, Option<u64>)]) -> Result<u64, String> {
    let known: Vec<&(String, Option<u64>)> = devices.iter().filter(|(_, s)| s.is_some()).collect();
    let unknown: Vec<&str> = devices
        .iter()
        .filter(|(_, s)| s.is_none())
        .map(|(m, _)| m.as_str())
        .collect();
    let Some((_, Some(first))) = known.first() else {
        return Err(format!(
            "converting needs each device's flash size from its check-in, and no device of the job has checked in yet{}: let them check in first",
            if unknown.is_empty() { String::new() } else { format!(" ({})", unknown.join(", ")) }
        ));
    };
    let odd: Vec<String> = known
        .iter()
        .filter(|(_, s)| *s != Some(*first))
        .map(|(m, s)| format!("{m} has {} MiB", s.unwrap_or(0) / MIB))
        .collect();
    if !odd.is_empty() {
        return Err(format!(
            "all devices of a conversion job must have the same flash size ({} has {} MiB; {}): schedule one conversion job per flash size",
            known[0].0,
            first / MIB,
            odd.join(", ")
        ));
    }
    Ok(*first)
}

/// Validate a conversion of one device: an autogenic partition image of known size, the
/// job's flash size, and the seed's layout fits.
pub fn validate_convert(img: &ImageRow, opts: &JobOptions, dev: &CheckIn) -> Validation {
    let mut v = Validation::default();
    let mac = &dev.device.mac;
    need_autogenic(img, "convert a device", &mut v);
    if img.facts.whole_disk {
        v.errors.push(format!(
            "image {} {} is a whole-disk image; a conversion images the OS partition of the new layout: use a partition image",
            img.name, img.version
        ));
    }
    let Some(disk) = job_disk(dev, opts.disk.as_deref()) else {
        v.errors.push(format!(
            "device {mac} reports no disk{} to convert: check --disk",
            opts.disk
                .as_deref()
                .map(|d| format!(" {d}"))
                .unwrap_or_default()
        ));
        return v;
    };
    if let Some(planned) = opts.flash_size {
        if disk.size != planned {
            v.errors.push(format!(
                "device {mac} has {} MiB of flash, the conversion job was planned for {} MiB: schedule a conversion job for its flash size",
                disk.size / MIB,
                planned / MIB
            ));
            return v;
        }
    }
    let Some(size) = img.size else {
        v.errors.push(format!(
            "the size of image {} {} is unknown, so the backup partition cannot be sized: register it from a file or a server that says its length",
            img.name, img.version
        ));
        return v;
    };
    let boot_agent = disk
        .boot_agent_partition
        .and_then(|n| disk.partitions.iter().find(|p| p.number == n))
        .map(|p| p.size);
    if let Err(e) = layout(
        disk.size,
        boot_agent,
        size,
        opts.backup_size,
        img.facts.min_target_size,
    ) {
        v.errors.push(format!("device {mac}: {e}"));
    }
    if has_backup_partition(dev) {
        v.warnings.push(format!(
            "device {mac} already has a backup partition: converting lays its disk out again"
        ));
    }
    v
}

// ---- check-in and rollback ----

/// How the reason of a Maintenance the device reported begins (a check-in without
/// `maintenance` clears only this kind, never an administrator's or the reload wait's).
pub const REPORTED_MAINTENANCE: &str = "the device reports maintenance: ";
/// Longest reason kept from a check-in.
const MAINTENANCE_REASON_MAX: usize = 300;

/// The device's state and reason after a check-in with or without `maintenance` (None: no
/// change): a reported reason puts it in Maintenance with that reason (bounded); a later
/// check-in without one takes a Maintenance the device itself reported back to Operational.
pub fn maintenance_at_checkin(
    stored: DeviceState,
    reason: Option<&str>,
    reported: Option<&str>,
) -> Option<(DeviceState, Option<String>)> {
    match reported {
        Some(r) => {
            let r: String = r
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(MAINTENANCE_REASON_MAX)
                .collect();
            let r = r.trim();
            Some((
                DeviceState::Maintenance,
                Some(format!(
                    "{REPORTED_MAINTENANCE}{}",
                    if r.is_empty() { "(no reason given)" } else { r }
                )),
            ))
        }
        None if stored == DeviceState::Maintenance
            && reason.is_some_and(|r| r.starts_with(REPORTED_MAINTENANCE)) =>
        {
            Some((DeviceState::Operational, None))
        }
        None => None,
    }
}

/// Does a rollback to `prev` re-image this device from its backup partition (PI) rather
/// than download? Yes when the image is autogenic and the backup holds exactly it.
pub fn rollback_from_backup(inv: Option<&CheckIn>, prev: &ImageRow) -> bool {
    prev.autogenic && inv.is_some_and(|i| backup_holds(i, &prev.name, &prev.version))
}

#[cfg(test)]
mod tests;
