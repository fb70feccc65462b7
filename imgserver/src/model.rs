//! Seed 003's job model, as pure functions over plain rows so every storage backend shares
//! it: validation of a task against the device's last inventory (errors stop the task,
//! warnings are recorded and shown), the batch rule for parallel and sequential jobs, the
//! device states, and version ordering.

use serde::{Deserialize, Serialize};

use crate::protocol::{After, CheckIn, DiskReport};

/// Device states (seed 003, "イメージ更新中および更新後のデバイス状態の変化").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceState {
    /// The normal state: no imaging going on.
    Operational,
    /// A task was handed to the device and has not ended.
    UpgradeInProgress,
    /// A task failed (or the device went silent during one) and the device did not come back
    /// within the reload wait time; an administrator resets it by hand.
    Maintenance,
    /// The device cannot take the scheduled work as it is (a validation error such as a
    /// missing partition); an administrator fixes it and resets it by hand.
    ConfigurationRequired,
}

impl DeviceState {
    pub fn as_str(self) -> &'static str {
        match self {
            DeviceState::Operational => "operational",
            DeviceState::UpgradeInProgress => "upgrade_in_progress",
            DeviceState::Maintenance => "maintenance",
            DeviceState::ConfigurationRequired => "configuration_required",
        }
    }

    pub fn parse(s: &str) -> DeviceState {
        match s {
            "upgrade_in_progress" => DeviceState::UpgradeInProgress,
            "maintenance" => DeviceState::Maintenance,
            "configuration_required" => DeviceState::ConfigurationRequired,
            _ => DeviceState::Operational,
        }
    }

    /// As the seed's console shows it.
    pub fn title(self) -> &'static str {
        match self {
            DeviceState::Operational => "Operational",
            DeviceState::UpgradeInProgress => "Upgrade In Progress",
            DeviceState::Maintenance => "Maintenance",
            DeviceState::ConfigurationRequired => "Configuration Required",
        }
    }
}

/// The seed's `MAX_RELOAD_WAIT_TIME` default: 15 minutes.
pub const DEFAULT_RELOAD_WAIT_SECS: u64 = 15 * 60;

/// The state to show now: a device that failed (or went silent mid-task) and has not been
/// seen since for longer than the reload wait is in Maintenance.
pub fn effective_state(
    stored: DeviceState,
    last_seen: u64,
    trouble_since: Option<u64>,
    now: u64,
    reload_wait: u64,
) -> DeviceState {
    match (stored, trouble_since) {
        (DeviceState::Maintenance, _) => DeviceState::Maintenance,
        (_, Some(t)) if last_seen <= t && now.saturating_sub(t) > reload_wait => {
            DeviceState::Maintenance
        }
        (DeviceState::UpgradeInProgress, None) if now.saturating_sub(last_seen) > reload_wait => {
            DeviceState::Maintenance
        }
        (s, _) => s,
    }
}

/// Task states.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TaskState {
    /// Waiting for the device to check in (and for its batch's turn).
    Pending,
    /// Validation failed: never sent.
    Rejected,
    /// Handed to the device.
    Sent,
    /// The device reported progress.
    Running,
    Succeeded,
    Failed,
    /// Aborted by the administrator, or stopped because another device failed (on error: stop).
    Aborted,
}

impl TaskState {
    pub fn as_str(self) -> &'static str {
        match self {
            TaskState::Pending => "pending",
            TaskState::Rejected => "rejected",
            TaskState::Sent => "sent",
            TaskState::Running => "running",
            TaskState::Succeeded => "succeeded",
            TaskState::Failed => "failed",
            TaskState::Aborted => "aborted",
        }
    }

    pub fn parse(s: &str) -> TaskState {
        match s {
            "rejected" => TaskState::Rejected,
            "sent" => TaskState::Sent,
            "running" => TaskState::Running,
            "succeeded" => TaskState::Succeeded,
            "failed" => TaskState::Failed,
            "aborted" => TaskState::Aborted,
            _ => TaskState::Pending,
        }
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Rejected | TaskState::Succeeded | TaskState::Failed | TaskState::Aborted
        )
    }
}

/// What to do with the rest of a job when one device fails (seed 003).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnError {
    Stop,
    Continue,
}

/// Job options beyond the image (stored as JSON with the job).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobOptions {
    #[serde(default)]
    pub partition: Option<String>,
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub preserve: Vec<String>,
    #[serde(default = "yes")]
    pub backup_first: bool,
    #[serde(default)]
    pub after: After,
    #[serde(default = "stop")]
    pub on_error: OnError,
    /// Devices imaged at once: 1 is sequential; 0 means all at once.
    #[serde(default)]
    pub batch: u32,
    /// Capture jobs: name and version of the new image, compression.
    #[serde(default)]
    pub capture_name: Option<String>,
    #[serde(default)]
    pub capture_version: Option<String>,
    #[serde(default)]
    pub comp: Option<u8>,
    /// Jobs at a time (`crate::admin::window`): devices get the work only from `at` (Unix
    /// seconds) and, if `until` is set, before it; the others wait.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub at: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub until: Option<u64>,
}

fn yes() -> bool {
    true
}

fn stop() -> OnError {
    OnError::Stop
}

impl Default for JobOptions {
    fn default() -> Self {
        JobOptions {
            partition: None,
            disk: None,
            preserve: Vec::new(),
            backup_first: true,
            after: After::Reboot,
            on_error: OnError::Stop,
            batch: 0,
            capture_name: None,
            capture_version: None,
            comp: None,
            at: None,
            until: None,
        }
    }
}

/// What the server knows of a registered image, for validation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageFacts {
    pub name: String,
    pub version: String,
    /// A whole-disk image (else a partition image).
    pub whole_disk: bool,
    pub min_target_size: u64,
    pub models: Vec<String>,
    /// RAM the device should have (the engine's buffers; 0: no requirement).
    pub min_ram: u64,
}

/// Validation findings for one device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Validation {
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl Validation {
    pub fn ok(&self) -> bool {
        self.errors.is_empty()
    }
}

/// Validate a deploy of `image` with `opts` against the device's last check-in (seed 003,
/// "デバイスで提案されたイメージの更新を検証する"): missing install location and too little
/// space are errors; too little RAM, an incompatible model, a backup the device cannot hold
/// and a same-or-older version are warnings, as in the seed.
pub fn validate_deploy(
    image: &ImageFacts,
    opts: &JobOptions,
    device: Option<&CheckIn>,
) -> Validation {
    let mut v = Validation::default();
    let Some(dev) = device else {
        v.warnings
            .push("device has not checked in yet: validated again when it does".into());
        return v;
    };
    let disk = pick_disk(&dev.disks, opts.disk.as_deref());
    let Some(disk) = disk else {
        match &opts.disk {
            Some(d) => v.errors.push(format!(
                "disk {d} does not exist on the device (it reports: {})",
                disk_names(&dev.disks)
            )),
            None => v
                .errors
                .push("the device reports no disk to install on".into()),
        }
        return v;
    };
    let copy_only = opts.after == After::CopyOnly;
    let target_size = if copy_only {
        None
    } else if let Some(spec) = &opts.partition {
        match find_partition(disk, spec) {
            Some(p) => Some(p.size),
            None => {
                let have: Vec<String> = disk
                    .partitions
                    .iter()
                    .map(|p| p.number.to_string())
                    .collect();
                v.errors.push(format!(
                    "partition {spec} does not exist on {} (partitions: {}): fix the layout or choose another",
                    disk.name,
                    if have.is_empty() { "none".into() } else { have.join(", ") }
                ));
                None
            }
        }
    } else {
        Some(disk.size)
    };
    if let Some(size) = target_size {
        if image.min_target_size > size {
            v.errors.push(format!(
                "not enough space: the image needs {} bytes, the target has {size}",
                image.min_target_size
            ));
        }
    }
    if opts.partition.is_some() && image.whole_disk && !copy_only {
        v.errors.push(
            "a whole-disk image cannot be written to one partition: leave out --partition".into(),
        );
    }
    if opts.partition.is_none() && !image.whole_disk && !copy_only {
        v.errors
            .push("a partition image needs a target partition: add --partition".into());
    }
    for keep in &opts.preserve {
        if find_partition(disk, keep).is_none() {
            v.errors.push(format!(
                "partition {keep} to preserve does not exist on {}",
                disk.name
            ));
        }
    }
    if image.min_ram > 0 && dev.device.ram_bytes < image.min_ram {
        v.warnings.push(format!(
            "device has {} bytes of RAM, the image wants {}",
            dev.device.ram_bytes, image.min_ram
        ));
    }
    if !image.models.is_empty() {
        match &dev.device.model {
            Some(m) if image.models.iter().any(|x| x.eq_ignore_ascii_case(m)) => {}
            Some(m) => v.warnings.push(format!(
                "image is made for {}, device is a {m}",
                image.models.join(", ")
            )),
            None => v.warnings.push(format!(
                "device reports no model; image is made for {}",
                image.models.join(", ")
            )),
        }
    }
    if (opts.backup_first || copy_only) && !dev.autogenic.support_img_backup {
        v.warnings.push(
            "device has no backup partition (SupportImgBackup=0): the backup is skipped".into(),
        );
    }
    let current = match &opts.partition {
        Some(spec) => find_partition(disk, spec).and_then(|p| p.image.clone()),
        None => disk.image.clone(),
    };
    if let Some(cur) = current {
        if cur.name == image.name
            && compare_versions(&image.version, &cur.version) != std::cmp::Ordering::Greater
        {
            v.warnings.push(format!(
                "version {} is the same as or older than the installed {}",
                image.version, cur.version
            ));
        }
    }
    v
}

/// Validate a capture: the source must exist.
pub fn validate_capture(opts: &JobOptions, device: Option<&CheckIn>) -> Validation {
    let mut v = Validation::default();
    let Some(dev) = device else {
        v.warnings
            .push("device has not checked in yet: validated again when it does".into());
        return v;
    };
    match pick_disk(&dev.disks, opts.disk.as_deref()) {
        None => v.errors.push(format!(
            "no disk to capture (the device reports: {})",
            disk_names(&dev.disks)
        )),
        Some(disk) => {
            if let Some(spec) = &opts.partition {
                if find_partition(disk, spec).is_none() {
                    v.errors
                        .push(format!("partition {spec} does not exist on {}", disk.name));
                }
            }
        }
    }
    v
}

/// The size of what a capture job reads on this device (the partition, or the whole disk),
/// from its last inventory: an upload can hardly be larger (see `api::capture_cap`).
pub fn capture_source_size(opts: &JobOptions, device: Option<&CheckIn>) -> Option<u64> {
    let disk = pick_disk(&device?.disks, opts.disk.as_deref())?;
    match &opts.partition {
        Some(spec) => find_partition(disk, spec).map(|p| p.size),
        None => Some(disk.size),
    }
}

fn disk_names(disks: &[DiskReport]) -> String {
    if disks.is_empty() {
        "no disks".into()
    } else {
        disks
            .iter()
            .map(|d| d.name.as_str())
            .collect::<Vec<_>>()
            .join(", ")
    }
}

fn pick_disk<'a>(disks: &'a [DiskReport], name: Option<&str>) -> Option<&'a DiskReport> {
    match name {
        Some(n) => disks.iter().find(|d| d.name == n),
        None => disks.first(),
    }
}

fn find_partition<'a>(
    disk: &'a DiskReport,
    spec: &str,
) -> Option<&'a crate::protocol::PartitionReport> {
    match spec.parse::<u32>() {
        Ok(n) => disk.partitions.iter().find(|p| p.number == n),
        Err(_) => disk
            .partitions
            .iter()
            .find(|p| p.label.as_deref() == Some(spec)),
    }
}

/// Order versions the way people write them: dot/dash-separated numeric parts compare as
/// numbers ("10.2" > "9.14"), other parts as text, a longer version with an equal prefix is
/// newer ("8.3.1" > "8.3").
pub fn compare_versions(a: &str, b: &str) -> std::cmp::Ordering {
    use std::cmp::Ordering;
    let split = |s: &str| {
        s.split(['.', '-', '_', '(', ')'])
            .filter(|p| !p.is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    let (pa, pb) = (split(a), split(b));
    for (x, y) in pa.iter().zip(pb.iter()) {
        let o = match (x.parse::<u64>(), y.parse::<u64>()) {
            (Ok(m), Ok(n)) => m.cmp(&n),
            _ => x.cmp(y),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len())
}

/// The batch rule (seed 003, parallel / sequential): tasks of a job are taken in id order in
/// batches of `batch` devices (0: all at once, 1: sequential); a task may start only when
/// every task of the earlier batches has ended. `position` is the task's index in that
/// order, `unfinished_before` the number of unfinished tasks of earlier batches.
pub fn batch_allows(batch: u32, position: usize, unfinished_before: usize) -> bool {
    batch == 0 || position < batch as usize || unfinished_before == 0
}

/// The index of the first task of `position`'s batch.
pub fn batch_start(batch: u32, position: usize) -> usize {
    if batch == 0 {
        0
    } else {
        position - position % batch as usize
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::{Autogenic, DeviceIdentity, ImageStamp, PartitionReport};
    use std::cmp::Ordering;

    fn device() -> CheckIn {
        CheckIn {
            device: DeviceIdentity {
                mac: "52:54:00:00:00:01".into(),
                model: Some("Z90".into()),
                ram_bytes: 1 << 30,
                ..Default::default()
            },
            disks: vec![DiskReport {
                name: "/dev/sda".into(),
                size: 1 << 30,
                partitions: vec![
                    PartitionReport {
                        number: 1,
                        size: 16 << 20,
                        label: Some("AGENT".into()),
                        ..Default::default()
                    },
                    PartitionReport {
                        number: 2,
                        size: 512 << 20,
                        image: Some(ImageStamp {
                            name: "os".into(),
                            version: "7.2".into(),
                        }),
                        ..Default::default()
                    },
                ],
                ..Default::default()
            }],
            autogenic: Autogenic {
                support_img_backup: true,
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn image(version: &str) -> ImageFacts {
        ImageFacts {
            name: "os".into(),
            version: version.into(),
            min_target_size: 100 << 20,
            models: vec!["Z90".into()],
            ..Default::default()
        }
    }

    fn part(p: &str) -> JobOptions {
        JobOptions {
            partition: Some(p.into()),
            ..Default::default()
        }
    }

    #[test]
    fn clean_upgrade_validates() {
        let v = validate_deploy(&image("7.10"), &part("2"), Some(&device()));
        assert_eq!(v, Validation::default());
    }

    #[test]
    fn missing_partition_and_space_are_errors() {
        let v = validate_deploy(&image("8"), &part("5"), Some(&device()));
        assert!(v.errors[0].contains("partition 5 does not exist"), "{v:?}");
        let mut big = image("8");
        big.min_target_size = 600 << 20;
        let v = validate_deploy(&big, &part("2"), Some(&device()));
        assert!(v.errors[0].contains("not enough space"), "{v:?}");
        assert!(!v.ok());
    }

    #[test]
    fn model_ram_and_older_version_are_warnings() {
        let mut img = image("7.2");
        img.models = vec!["Other".into()];
        img.min_ram = 4 << 30;
        let v = validate_deploy(&img, &part("AGENT"), Some(&device()));
        assert!(
            v.errors[0].contains("not enough space"),
            "partitions are found by label too: {v:?}"
        );
        let v = validate_deploy(&img, &part("2"), Some(&device()));
        assert!(v.ok(), "{v:?}");
        assert_eq!(v.warnings.len(), 3, "{v:?}");
        assert!(v.warnings.iter().any(|w| w.contains("same as or older")));
    }

    #[test]
    fn whole_disk_image_needs_whole_disk() {
        let mut img = image("8");
        img.whole_disk = true;
        assert!(!validate_deploy(&img, &part("2"), Some(&device())).ok());
        assert!(validate_deploy(&img, &JobOptions::default(), Some(&device())).ok());
    }

    #[test]
    fn versions_compare_numerically() {
        assert_eq!(compare_versions("10.2", "9.14"), Ordering::Greater);
        assert_eq!(compare_versions("8.3", "8.3.1"), Ordering::Less);
        assert_eq!(compare_versions("8.4(2)", "8.4(2)"), Ordering::Equal);
        assert_eq!(compare_versions("1.0-beta", "1.0-alpha"), Ordering::Greater);
    }

    #[test]
    fn batches_wait_for_earlier_batches() {
        assert!(batch_allows(0, 50, 3));
        assert!(batch_allows(2, 1, 0));
        assert!(!batch_allows(2, 2, 1));
        assert!(batch_allows(2, 3, 0));
        assert!(!batch_allows(1, 1, 1));
        assert_eq!(batch_start(3, 7), 6);
    }

    #[test]
    fn maintenance_after_reload_wait() {
        let w = DEFAULT_RELOAD_WAIT_SECS;
        assert_eq!(
            effective_state(DeviceState::Operational, 100, Some(100), 100 + w + 1, w),
            DeviceState::Maintenance
        );
        assert_eq!(
            effective_state(DeviceState::Operational, 200, Some(100), 100 + w + 1, w),
            DeviceState::Operational
        );
        assert_eq!(
            effective_state(DeviceState::UpgradeInProgress, 100, None, 100 + w / 2, w),
            DeviceState::UpgradeInProgress
        );
        assert_eq!(
            effective_state(DeviceState::UpgradeInProgress, 100, None, 101 + w, w),
            DeviceState::Maintenance
        );
    }
}
