//! Seed 003's job model, as pure functions over plain rows so every storage backend shares
//! it: validation of a task against the device's last inventory (errors stop the task,
//! warnings are recorded and shown), the batch rule for parallel and sequential jobs, the
//! device states, and version ordering.

use serde::{Deserialize, Serialize};

use crate::protocol::{After, CheckIn, DiskReport, ImageStamp, Outcome, TaskResult};
use crate::store::{DeviceRow, ImageRow, JobRow};

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
    pub const ALL: [DeviceState; 4] = [
        DeviceState::Operational,
        DeviceState::UpgradeInProgress,
        DeviceState::Maintenance,
        DeviceState::ConfigurationRequired,
    ];

    /// A stored state; an unknown word (a newer server wrote it) reads as Operational.
    pub fn parse(s: &str) -> DeviceState {
        s.parse().unwrap_or(DeviceState::Operational)
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

/// The stored state after a check-in: a device whose failure was recorded longer than the
/// reload wait ago and that only now comes back stays in Maintenance until the
/// administrator resets it (what [`effective_state`] showed meanwhile becomes stored).
pub fn state_at_checkin(
    stored: DeviceState,
    trouble_since: Option<u64>,
    now: u64,
    reload_wait: u64,
) -> DeviceState {
    match (stored, trouble_since) {
        (DeviceState::Operational, Some(t)) if now.saturating_sub(t) > reload_wait => {
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
    pub const ALL: [TaskState; 7] = [
        TaskState::Pending,
        TaskState::Rejected,
        TaskState::Sent,
        TaskState::Running,
        TaskState::Succeeded,
        TaskState::Failed,
        TaskState::Aborted,
    ];

    /// A stored state; an unknown word (a newer server wrote it) reads as Pending.
    pub fn parse(s: &str) -> TaskState {
        s.parse().unwrap_or(TaskState::Pending)
    }

    pub fn is_final(self) -> bool {
        matches!(
            self,
            TaskState::Rejected | TaskState::Succeeded | TaskState::Failed | TaskState::Aborted
        )
    }
}

/// The one spelling of each state word: `as_str` writes it (to the database, the command
/// line, the API), `FromStr` reads it back and refuses any other word.
macro_rules! state_words {
    ($t:ident { $($v:ident = $s:literal),+ $(,)? }) => {
        impl $t {
            pub fn as_str(self) -> &'static str {
                match self {
                    $($t::$v => $s,)+
                }
            }
        }

        impl std::str::FromStr for $t {
            type Err = String;

            fn from_str(s: &str) -> Result<Self, String> {
                match s {
                    $($s => Ok($t::$v),)+
                    _ => Err(format!("{s:?} is not a {}", stringify!($t))),
                }
            }
        }

        impl std::fmt::Display for $t {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

state_words!(DeviceState {
    Operational = "operational",
    UpgradeInProgress = "upgrade_in_progress",
    Maintenance = "maintenance",
    ConfigurationRequired = "configuration_required",
});

state_words!(TaskState {
    Pending = "pending",
    Rejected = "rejected",
    Sent = "sent",
    Running = "running",
    Succeeded = "succeeded",
    Failed = "failed",
    Aborted = "aborted",
});

/// Job states (`JobRow::state` holds the word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobState {
    /// Its tasks are handed out as devices check in (and reach devices that enrol later).
    Active,
    /// A device failed and the job's policy is "on error: stop".
    Stopped,
    /// Aborted by the administrator.
    Aborted,
    /// Removed by the administrator: no longer listed.
    Removed,
}

state_words!(JobState {
    Active = "active",
    Stopped = "stopped",
    Aborted = "aborted",
    Removed = "removed",
});

/// Job kinds (`JobRow::kind` holds the word).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobKind {
    Deploy,
    Capture,
    Reboot,
    BootGuest,
    /// Seed 001 step 4: lay the device out for autogenic imaging, then image it.
    Convert,
    /// Join the server's multicast session (`imgserver session start`, `crate::mcast`).
    Session,
}

state_words!(JobKind {
    Deploy = "deploy",
    Capture = "capture",
    Reboot = "reboot",
    BootGuest = "boot_guest",
    Convert = "convert",
    Session = "session",
});

/// The word a device's enrolment approval holds while it waits for the administrator
/// (`imgserver approve`); no value means approved.
pub const APPROVAL_PENDING: &str = "pending";

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
    /// Seed 001's PI: image from the device's backup partition (`crate::autogenic`); with
    /// `fetch_to_backup` the image is downloaded there first (BI+PI). BI alone is
    /// `after: copy_only` with `backup_only` (`--backup-only`, validated as BI; a plain
    /// `--then copy-only` keeps seed 003's "copy only" with its warning).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_backup: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub backup_only: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fetch_to_backup: bool,
    /// Conversion jobs: the backup partition size the administrator chose (None: image +
    /// 100 MB) and the flash size the job was planned for (every device's).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_size: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flash_size: Option<u64>,
    /// Session jobs (`crate::mcast`): the session's name and its group address when the
    /// administrator overrode the derived one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_addr: Option<String>,
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
            from_backup: false,
            backup_only: false,
            fetch_to_backup: false,
            backup_size: None,
            flash_size: None,
            session: None,
            session_addr: None,
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
    // BI and PI (`crate::autogenic`) make a missing backup partition an error instead.
    if (opts.backup_first || copy_only)
        && !opts.backup_only
        && !opts.from_backup
        && !dev.autogenic.support_img_backup
    {
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

// ---- State transitions, as plans the store applies in one transaction ----

/// The job's validation of one device (errors reject the task, warnings are recorded).
pub fn validate_task(job: &JobRow, image: Option<&ImageRow>, inv: Option<&CheckIn>) -> Validation {
    match (job.kind.parse::<JobKind>(), image) {
        (Ok(JobKind::Deploy), Some(img)) => {
            let mut v = validate_deploy(&img.facts, &job.options, inv);
            if let Some(dev) = inv {
                let a = crate::autogenic::validate_backup_deploy(img, &job.options, dev);
                v.errors.extend(a.errors);
                v.warnings.extend(a.warnings);
            }
            v
        }
        (Ok(JobKind::Convert), Some(img)) => match inv {
            Some(dev) => crate::autogenic::validate_convert(img, &job.options, dev),
            None => validate_deploy(&img.facts, &job.options, None),
        },
        (Ok(JobKind::Session), Some(img)) => validate_deploy(&img.facts, &job.options, inv),
        (Ok(JobKind::Deploy | JobKind::Convert | JobKind::Session), None) => Validation {
            errors: vec!["the job's image was unregistered".into()],
            ..Default::default()
        },
        (Ok(JobKind::Capture), _) => validate_capture(&job.options, inv),
        _ => Validation::default(),
    }
}

/// The image stamp currently on the target a job writes (recorded for rollback).
pub fn current_stamp(inv: Option<&CheckIn>, opts: &JobOptions) -> Option<ImageStamp> {
    let inv = inv?;
    let disk = pick_disk(&inv.disks, opts.disk.as_deref())?;
    match &opts.partition {
        None => disk.image.clone(),
        Some(spec) => find_partition(disk, spec).and_then(|p| p.image.clone()),
    }
}

/// The message of the pending tasks a failure stops (seed 003: on error stop).
pub const STOPPED_BY_ERROR: &str = "job stopped: another device failed (on error: stop)";
/// The message of the pending tasks the administrator aborts.
pub const ABORTED_BY_ADMIN: &str = "aborted by the administrator";

/// Does a failed or rejected task of `job` stop the job (and abort its pending tasks)?
pub fn stops_job(job: &JobRow) -> bool {
    job.options.on_error == OnError::Stop && job.state == JobState::Active.as_str()
}

fn rejection_message(v: &Validation) -> String {
    format!("validation failed: {}", v.errors.join("; "))
}

/// A task made when its job is scheduled: pending, or rejected at once (with its message)
/// when validation against the device's last inventory fails.
pub fn new_task_state(v: &Validation) -> (TaskState, Option<String>) {
    if v.ok() {
        (TaskState::Pending, None)
    } else {
        (TaskState::Rejected, Some(rejection_message(v)))
    }
}

/// A task handed out earlier and not finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Unfinished {
    pub task: u64,
    pub job: u64,
    pub kind: Option<JobKind>,
    /// A PI (`JobOptions::from_backup`): resumed by the device's own disk, not over PXE.
    pub from_backup: bool,
}

/// One job that may give a device work at a check-in, as the store found it.
#[derive(Debug, Clone, Copy)]
pub struct Candidate<'a> {
    pub job: &'a JobRow,
    pub image: Option<&'a ImageRow>,
    /// The device's pending task of this job; None for a job for all devices or a group
    /// that has not reached this device yet (its task would be the job's last).
    pub task: Option<u64>,
    /// The states of all the job's tasks, in id order.
    pub job_tasks: &'a [(u64, TaskState)],
}

/// A pending task validation rejects.
#[derive(Debug, Clone, PartialEq)]
pub struct Rejection {
    /// Index into the candidates.
    pub candidate: usize,
    pub validation: Validation,
    /// The task's message.
    pub message: String,
    /// The device's new state and reason (none while it is in Maintenance).
    pub device: Option<(DeviceState, String)>,
    /// The job stops (on error: stop); its pending tasks are aborted with [`STOPPED_BY_ERROR`].
    pub stop_job: bool,
    pub transcript: String,
}

/// The task handed to the device now.
#[derive(Debug, Clone, PartialEq)]
pub struct Handover {
    /// Index into the candidates.
    pub candidate: usize,
    pub validation: Validation,
    /// What the target holds now (for rollback).
    pub prev_image: Option<ImageStamp>,
    /// A capture: the task gets the fresh upload key.
    pub upload_key: bool,
    /// The device's new state and reason (none while it is in Maintenance).
    pub device: Option<(DeviceState, String)>,
    pub transcript: Vec<String>,
}

/// What a check-in does about tasks. Empty: nothing to do.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TaskPlan {
    /// Hand an unfinished task again (resume after a reboot); a capture gets a new upload
    /// key. Nothing else is looked at.
    pub resend: Option<Unfinished>,
    /// Pending tasks rejected on the way, in candidate order (all before `send`).
    pub rejected: Vec<Rejection>,
    pub send: Option<Handover>,
    /// Pending tasks the device's agent cannot run (it did not announce their kind): they
    /// stay pending with this message, in candidate order.
    pub held: Vec<(usize, String)>,
}

impl TaskPlan {
    /// The first task the plan touches (a rejection counts: the check-in records it), as
    /// the PXE decision describes it; None when the device has nothing to do.
    pub fn boot_work(&self, candidates: &[Candidate]) -> Option<String> {
        if let Some(u) = &self.resend {
            // Seed 001: PI runs in the imaging engine of the device's own disk (a power cut
            // in the middle leads back there), never in a network-booted agent.
            if u.from_backup {
                return None;
            }
            return Some(format!("task {} of job {} unfinished", u.task, u.job));
        }
        let (c, rejected) = match (self.rejected.first(), &self.send) {
            (Some(r), _) => (r.candidate, true),
            (None, Some(s)) => (s.candidate, false),
            (None, None) => return None,
        };
        let Candidate { job, image, .. } = candidates[c];
        // A PI is not PXE work: before it the device boots from its disk (seed 001), whose
        // boot agent checks in and gets it.
        if !rejected && job.options.from_backup {
            return None;
        }
        let mut what = match image {
            Some(img) => format!("job {} {} {} {}", job.id, job.kind, img.name, img.version),
            None => format!("job {} {}", job.id, job.kind),
        };
        // A task validation will reject still boots the agent: its check-in records the
        // rejection (Configuration Required) where the administrator sees it.
        if rejected {
            what.push_str(", to be rejected by validation");
        }
        Some(what)
    }
}

/// The batch rule for a candidate: may its task start now?
fn batch_turn(c: &Candidate) -> bool {
    let batch = c.job.options.batch;
    let pos = match c.task {
        Some(t) => c.job_tasks.iter().position(|(id, _)| *id == t).unwrap_or(0),
        None => c.job_tasks.len(),
    };
    let start = batch_start(batch, pos).min(c.job_tasks.len());
    let unfinished = c.job_tasks[..start]
        .iter()
        .filter(|(_, s)| !s.is_final())
        .count();
    batch_allows(batch, pos, unfinished)
}

/// Why `job`'s task cannot go to a device whose last check-in is `inv`: its agent did not
/// announce the job's kind (an agent older than the kind). None: it may.
pub fn unknown_kind(job: &JobRow, inv: Option<&CheckIn>) -> Option<String> {
    let default = CheckIn::default();
    let inv = inv.unwrap_or(&default);
    (!inv.knows(&job.kind)).then(|| {
        format!(
            "the device's agent does not know {} tasks: update the agent (it waits, pending)",
            job.kind
        )
    })
}

/// The task to hand `device` at a check-in (seed 003): an unfinished one again, else the
/// first candidate (pending tasks in id order, then jobs reaching the device for the first
/// time) that its job's batch rule lets start and validation accepts; candidates validation
/// rejects on the way are rejected. A device awaiting enrolment approval gets nothing.
pub fn plan_next_task(
    device: &DeviceRow,
    unfinished: Option<Unfinished>,
    candidates: &[Candidate],
) -> TaskPlan {
    let mut plan = TaskPlan::default();
    if device.pending {
        return plan;
    }
    if unfinished.is_some() {
        plan.resend = unfinished;
        return plan;
    }
    let inv = device.inventory.as_ref();
    let in_maintenance = device.state == DeviceState::Maintenance;
    let task_name = |c: &Candidate| c.task.map_or_else(|| "(new)".into(), |t| t.to_string());
    for (n, c) in candidates.iter().enumerate() {
        if !batch_turn(c) {
            continue;
        }
        let job = c.job;
        if let Some(why) = unknown_kind(job, inv) {
            plan.held.push((n, why));
            continue;
        }
        let v = validate_task(job, c.image, inv);
        if !v.ok() {
            let message = rejection_message(&v);
            plan.rejected.push(Rejection {
                candidate: n,
                device: (!in_maintenance).then(|| {
                    (
                        DeviceState::ConfigurationRequired,
                        format!("job {}: {message}", job.id),
                    )
                }),
                stop_job: stops_job(job),
                transcript: format!(
                    "task {} of job {} rejected: {message}",
                    task_name(c),
                    job.id
                ),
                validation: v,
                message,
            });
            continue;
        }
        let what = match c.image {
            Some(img) => format!("{} {} {}", job.kind, img.name, img.version),
            None => job.kind.clone(),
        };
        let mut transcript = vec![format!(
            "task {} of job {} sent: {what}",
            task_name(c),
            job.id
        )];
        transcript.extend(
            v.warnings
                .iter()
                .map(|w| format!("validation warning: {w}")),
        );
        plan.send = Some(Handover {
            candidate: n,
            prev_image: current_stamp(inv, &job.options),
            upload_key: job.kind == JobKind::Capture.as_str(),
            device: (!in_maintenance).then(|| {
                (
                    DeviceState::UpgradeInProgress,
                    format!("job {} ({})", job.id, job.kind),
                )
            }),
            transcript,
            validation: v,
        });
        break;
    }
    plan
}

/// What a final result of a task does.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultPlan {
    pub task: TaskState,
    /// The transcript line, also the device's trouble reason after a failure.
    pub summary: String,
    /// Success: the device leaves Upgrade In Progress for Operational.
    pub device_done: bool,
    /// Success of a deploy that changed the device: the image it now runs.
    pub device_image: Option<ImageStamp>,
    /// Failure or rejection: the device is back to Operational (Maintenance stays) with
    /// this trouble; it shows as Maintenance if it does not check in within the reload wait.
    pub trouble: bool,
    pub stop_job: bool,
}

/// The transition a device's final result makes (the task must not have ended already).
pub fn plan_result(job: &JobRow, r: &TaskResult) -> ResultPlan {
    let task = match r.outcome {
        Outcome::Succeeded => TaskState::Succeeded,
        Outcome::Failed => TaskState::Failed,
        Outcome::Rejected => TaskState::Rejected,
    };
    let summary = format!(
        "task {} {}{}",
        r.task,
        task.as_str(),
        r.message
            .as_ref()
            .map(|m| format!(": {m}"))
            .unwrap_or_default()
    );
    let ok = task == TaskState::Succeeded;
    let changes_image = (job.kind == JobKind::Deploy.as_str()
        && job.options.after != After::CopyOnly)
        || job.kind == JobKind::Convert.as_str()
        || job.kind == JobKind::Session.as_str();
    ResultPlan {
        task,
        summary,
        device_done: ok,
        device_image: if ok && changes_image {
            r.image.clone()
        } else {
            None
        },
        trouble: !ok,
        stop_job: !ok && stops_job(job),
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
    fn a_device_back_after_the_reload_wait_stays_in_maintenance() {
        use DeviceState::*;
        let w = 900;
        // (stored, trouble since, now, stored after the check-in)
        let rows = [
            (Operational, None, 10_000, Operational),
            (Operational, Some(100), 100 + w, Operational),
            (Operational, Some(100), 101 + w, Maintenance),
            (Operational, Some(5_000), 100, Operational),
            (UpgradeInProgress, Some(100), 10_000, UpgradeInProgress),
            (
                ConfigurationRequired,
                Some(100),
                10_000,
                ConfigurationRequired,
            ),
            (Maintenance, None, 10_000, Maintenance),
        ];
        for (stored, since, now, after) in rows {
            assert_eq!(
                state_at_checkin(stored, since, now, w),
                after,
                "{stored:?} {since:?} {now}"
            );
        }
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

    // ---- the plans: one table per pure transition ----

    fn job_row(id: u64, kind: JobKind, batch: u32, on_error: OnError) -> JobRow {
        JobRow {
            id,
            kind: kind.as_str().into(),
            image: (kind == JobKind::Deploy).then_some(1),
            options: JobOptions {
                partition: Some("2".into()),
                batch,
                on_error,
                ..Default::default()
            },
            selector: "all".into(),
            state: JobState::Active.as_str().into(),
            created: 0,
            note: None,
        }
    }

    fn image_row(version: &str, min_size: u64) -> ImageRow {
        ImageRow {
            id: 1,
            name: "os".into(),
            version: version.into(),
            file: Some("os.img".into()),
            url: None,
            size: None,
            facts: ImageFacts {
                min_target_size: min_size,
                ..image(version)
            },
            sealed: true,
            signed_by: None,
            description: None,
            added: 0,
            captured_from: None,
            autogenic: false,
        }
    }

    fn device_row(state: DeviceState, pending: bool) -> DeviceRow {
        DeviceRow {
            id: 7,
            mac: "52:54:00:00:00:01".into(),
            group: None,
            enrolled: true,
            serial: None,
            model: None,
            ram_bytes: 0,
            agent_version: None,
            state,
            state_reason: None,
            last_seen: None,
            trouble_since: None,
            image: None,
            inventory: Some(device()),
            pending,
            enrol_addr: None,
        }
    }

    use TaskState::{Failed as F, Pending as P, Running as R, Succeeded as S};

    #[test]
    fn words_round_trip_and_unknown_words_are_refused() {
        for s in DeviceState::ALL {
            assert_eq!(s.as_str().parse::<DeviceState>(), Ok(s));
        }
        for s in TaskState::ALL {
            assert_eq!(s.as_str().parse::<TaskState>(), Ok(s));
        }
        for s in [
            JobState::Active,
            JobState::Stopped,
            JobState::Aborted,
            JobState::Removed,
        ] {
            assert_eq!(s.as_str().parse::<JobState>(), Ok(s));
        }
        for k in [
            JobKind::Deploy,
            JobKind::Capture,
            JobKind::Reboot,
            JobKind::BootGuest,
            JobKind::Session,
        ] {
            assert_eq!(k.as_str().parse::<JobKind>(), Ok(k));
            // The serde spelling is the same word.
            assert_eq!(serde_json::to_string(&k).unwrap(), format!("\"{k}\""));
        }
        assert!("Active".parse::<JobState>().is_err());
        assert!("".parse::<TaskState>().is_err());
        assert_eq!(TaskState::parse("from a newer server"), TaskState::Pending);
        assert_eq!(DeviceState::parse("?"), DeviceState::Operational);
    }

    #[test]
    fn task_kinds_the_agent_did_not_announce_stay_pending_with_a_reason() {
        let img = image_row("8.0", 1 << 20);
        let mut session = job_row(3, JobKind::Session, 0, OnError::Stop);
        session.options.session = Some("room1".into());
        session.image = Some(1);
        let convert = job_row(4, JobKind::Convert, 0, OnError::Stop);
        let deploy = job_row(5, JobKind::Deploy, 0, OnError::Stop);
        let mut old = device_row(DeviceState::Operational, false);
        // An agent older than the field: the v1 kinds.
        old.inventory.as_mut().unwrap().task_kinds = None;
        let tasks: &[(u64, TaskState)] = &[(10, TaskState::Pending)];
        let cands = |jobs: &[&JobRow]| -> Vec<(JobRow, u64)> {
            jobs.iter().map(|j| ((*j).clone(), 10)).collect()
        };
        let owned = cands(&[&session, &convert, &deploy]);
        let c: Vec<Candidate> = owned
            .iter()
            .map(|(j, t)| Candidate {
                job: j,
                image: Some(&img),
                task: Some(*t),
                job_tasks: tasks,
            })
            .collect();
        let plan = plan_next_task(&old, None, &c);
        // Session and convert are held (not rejected, not sent); the deploy goes.
        assert_eq!(plan.held.len(), 2, "{plan:?}");
        assert_eq!(plan.held[0].0, 0);
        assert_eq!(plan.held[1].0, 1);
        assert!(
            plan.held[0]
                .1
                .contains("the device's agent does not know session tasks: update the agent"),
            "{}",
            plan.held[0].1
        );
        assert!(plan.held[1].1.contains("convert tasks"));
        assert!(plan.rejected.is_empty());
        assert_eq!(plan.send.as_ref().map(|s| s.candidate), Some(2));
        // An agent that announced session gets it (validated as a deploy of the image).
        let mut new = old.clone();
        new.inventory.as_mut().unwrap().task_kinds =
            Some(crate::protocol::ALL_TASK_KINDS.map(String::from).to_vec());
        let plan = plan_next_task(&new, None, &c);
        assert!(plan.held.is_empty());
        assert_eq!(plan.send.as_ref().map(|s| s.candidate), Some(0));
        // An agent that announced a list without reboot does not get a reboot either.
        let mut narrow = old.clone();
        narrow.inventory.as_mut().unwrap().task_kinds = Some(vec!["deploy".into()]);
        let reboot = job_row(6, JobKind::Reboot, 0, OnError::Stop);
        let c = [Candidate {
            job: &reboot,
            image: None,
            task: Some(10),
            job_tasks: tasks,
        }];
        let plan = plan_next_task(&narrow, None, &c);
        assert!(plan.send.is_none());
        assert!(plan.held[0].1.contains("reboot tasks"));
    }

    #[test]
    fn next_task_plans() {
        let big = image_row("8.0", 100 << 20);
        let too_big = image_row("8.0", 4 << 30);
        let seq_stop = job_row(3, JobKind::Deploy, 1, OnError::Stop);
        let seq_go_on = job_row(4, JobKind::Deploy, 1, OnError::Continue);
        let parallel = job_row(5, JobKind::Deploy, 0, OnError::Stop);
        let reboot = job_row(6, JobKind::Reboot, 0, OnError::Stop);
        let ok = device_row(DeviceState::Operational, false);
        let maint = device_row(DeviceState::Maintenance, false);
        let pending = device_row(DeviceState::Operational, true);
        let first: &[(u64, TaskState)] = &[(10, P), (11, P)];
        let second_waits: &[(u64, TaskState)] = &[(10, R), (11, P)];
        let second_goes: &[(u64, TaskState)] = &[(10, F), (11, P)];
        let c = |job, image, task, job_tasks| Candidate {
            job,
            image,
            task,
            job_tasks,
        };
        // (what, device, unfinished, candidates, resend, rejected candidates, sent candidate)
        type Row<'a> = (
            &'a str,
            &'a DeviceRow,
            Option<Unfinished>,
            Vec<Candidate<'a>>,
            bool,
            Vec<usize>,
            Option<usize>,
        );
        let unfinished = Some(Unfinished {
            task: 9,
            job: 2,
            kind: Some(JobKind::Capture),
            from_backup: false,
        });
        let rows: Vec<Row> = vec![
            ("nothing scheduled", &ok, None, vec![], false, vec![], None),
            (
                "pending approval gets nothing",
                &pending,
                None,
                vec![c(&parallel, Some(&big), Some(10), first)],
                false,
                vec![],
                None,
            ),
            (
                "an unfinished task is resent before anything else",
                &ok,
                unfinished,
                vec![c(&parallel, Some(&big), Some(10), first)],
                true,
                vec![],
                None,
            ),
            (
                "first of a sequential job goes",
                &ok,
                None,
                vec![c(&seq_stop, Some(&big), Some(10), first)],
                false,
                vec![],
                Some(0),
            ),
            (
                "second of a sequential job waits for the first",
                &ok,
                None,
                vec![c(&seq_stop, Some(&big), Some(11), second_waits)],
                false,
                vec![],
                None,
            ),
            (
                "second goes once the first ended, even failed",
                &ok,
                None,
                vec![c(&seq_go_on, Some(&big), Some(11), second_goes)],
                false,
                vec![],
                Some(0),
            ),
            (
                "a job reaching the device for the first time is its last task",
                &ok,
                None,
                vec![c(&seq_stop, Some(&big), None, second_waits)],
                false,
                vec![],
                None,
            ),
            (
                "a rejected candidate is skipped and the next one sent",
                &ok,
                None,
                vec![
                    c(&seq_stop, Some(&too_big), Some(10), first),
                    c(&parallel, Some(&big), Some(12), &[(12, P)]),
                ],
                false,
                vec![0],
                Some(1),
            ),
            (
                "a held-back candidate is skipped, not rejected",
                &ok,
                None,
                vec![
                    c(&seq_stop, Some(&too_big), Some(11), second_waits),
                    c(&reboot, None, Some(13), &[(13, P)]),
                ],
                false,
                vec![],
                Some(1),
            ),
            (
                "a deploy whose image is gone is rejected",
                &ok,
                None,
                vec![c(&parallel, None, Some(10), first)],
                false,
                vec![0],
                None,
            ),
            (
                "maintenance: the task is sent but the state stays",
                &maint,
                None,
                vec![c(&parallel, Some(&big), Some(10), first)],
                false,
                vec![],
                Some(0),
            ),
        ];
        for (what, dev, unfinished, cands, resend, rejected, sent) in rows {
            let plan = plan_next_task(dev, unfinished, &cands);
            assert_eq!(plan.resend.is_some(), resend, "{what}");
            let got: Vec<usize> = plan.rejected.iter().map(|r| r.candidate).collect();
            assert_eq!(got, rejected, "{what}");
            assert_eq!(plan.send.as_ref().map(|s| s.candidate), sent, "{what}");
            let in_maint = dev.state == DeviceState::Maintenance;
            for r in &plan.rejected {
                assert!(r.message.starts_with("validation failed: "), "{what}");
                assert_eq!(
                    r.stop_job,
                    cands[r.candidate].job.options.on_error == OnError::Stop,
                    "{what}"
                );
                assert_eq!(
                    r.device.as_ref().map(|d| d.0),
                    (!in_maint).then_some(DeviceState::ConfigurationRequired),
                    "{what}"
                );
            }
            if let Some(s) = &plan.send {
                assert_eq!(
                    s.device.as_ref().map(|d| d.0),
                    (!in_maint).then_some(DeviceState::UpgradeInProgress),
                    "{what}"
                );
                assert!(s.validation.ok(), "{what}");
                assert!(s.transcript[0].contains(" sent: "), "{what}");
            }
            // The PXE decision reads the same plan: work exactly when the check-in would
            // touch a task.
            let work = plan.boot_work(&cands);
            assert_eq!(
                work.is_some(),
                resend || !rejected.is_empty() || sent.is_some(),
                "{what}"
            );
            if !rejected.is_empty() {
                assert!(
                    work.unwrap().ends_with(", to be rejected by validation"),
                    "{what}"
                );
            }
        }
    }

    #[test]
    fn a_pi_is_handed_over_but_is_not_pxe_work() {
        // Seed 001: before PI the device boots from its disk, whose agent checks in.
        let img = image_row("8.0", 1 << 20);
        let mut pi = job_row(3, JobKind::Deploy, 0, OnError::Stop);
        pi.options.from_backup = true;
        let mut dev = device_row(DeviceState::Operational, false);
        let inv = dev.inventory.as_mut().unwrap();
        inv.autogenic.backup_image_present = true;
        inv.autogenic.backup_image = Some(ImageStamp {
            name: "os".into(),
            version: "8.0".into(),
        });
        let mut auto = img.clone();
        auto.autogenic = true;
        let tasks: &[(u64, TaskState)] = &[(10, P)];
        // (what, job, image, resend, sent, PXE work)
        let rows = [
            ("PI to be sent", &pi, &auto, None, true, false),
            (
                "PI of an ordinary image: rejected, so PXE work",
                &pi,
                &img,
                None,
                false,
                true,
            ),
            (
                "PI unfinished",
                &pi,
                &auto,
                Some(Unfinished {
                    task: 10,
                    job: 3,
                    kind: Some(JobKind::Deploy),
                    from_backup: true,
                }),
                false,
                false,
            ),
            (
                "network deploy unfinished",
                &pi,
                &auto,
                Some(Unfinished {
                    task: 10,
                    job: 3,
                    kind: Some(JobKind::Deploy),
                    from_backup: false,
                }),
                false,
                true,
            ),
        ];
        for (what, job, image, resend, sent, work) in rows {
            let c = [Candidate {
                job,
                image: Some(image),
                task: Some(10),
                job_tasks: tasks,
            }];
            let plan = plan_next_task(&dev, resend, &c);
            assert_eq!(plan.send.is_some(), sent, "{what}: {plan:?}");
            assert_eq!(plan.boot_work(&c).is_some(), work, "{what}");
        }
    }

    #[test]
    fn the_handover_records_the_previous_image_and_the_upload_key() {
        let img = image_row("8.0", 100 << 20);
        let deploy = job_row(3, JobKind::Deploy, 0, OnError::Stop);
        let mut capture = job_row(4, JobKind::Capture, 0, OnError::Stop);
        capture.image = None;
        let dev = device_row(DeviceState::Operational, false);
        let tasks: &[(u64, TaskState)] = &[(10, P)];
        for (job, image, prev, key) in [
            (&deploy, Some(&img), Some("7.2"), false),
            (&capture, None, Some("7.2"), true),
        ] {
            let c = [Candidate {
                job,
                image,
                task: Some(10),
                job_tasks: tasks,
            }];
            let plan = plan_next_task(&dev, None, &c);
            let s = plan.send.expect("sent");
            assert_eq!(s.prev_image.map(|p| p.version).as_deref(), prev);
            assert_eq!(s.upload_key, key);
        }
        let what = plan_next_task(
            &dev,
            None,
            &[Candidate {
                job: &deploy,
                image: Some(&img),
                task: None,
                job_tasks: &[],
            }],
        )
        .boot_work(&[Candidate {
            job: &deploy,
            image: Some(&img),
            task: None,
            job_tasks: &[],
        }]);
        assert_eq!(what.as_deref(), Some("job 3 deploy os 8.0"));
    }

    #[test]
    fn result_plans() {
        let stamp = ImageStamp {
            name: "os".into(),
            version: "8.0".into(),
        };
        let mut copy_only = job_row(3, JobKind::Deploy, 0, OnError::Stop);
        copy_only.options.after = After::CopyOnly;
        let mut stopped = job_row(3, JobKind::Deploy, 0, OnError::Stop);
        stopped.state = JobState::Stopped.as_str().into();
        // (job, outcome, task state, done, image recorded, trouble, stop job)
        let rows = [
            (
                job_row(3, JobKind::Deploy, 0, OnError::Stop),
                Outcome::Succeeded,
                S,
                true,
                true,
                false,
                false,
            ),
            (copy_only, Outcome::Succeeded, S, true, false, false, false),
            (
                job_row(3, JobKind::Capture, 0, OnError::Stop),
                Outcome::Succeeded,
                S,
                true,
                false,
                false,
                false,
            ),
            (
                job_row(3, JobKind::Deploy, 0, OnError::Stop),
                Outcome::Failed,
                F,
                false,
                false,
                true,
                true,
            ),
            (
                job_row(3, JobKind::Deploy, 0, OnError::Continue),
                Outcome::Failed,
                F,
                false,
                false,
                true,
                false,
            ),
            (
                job_row(3, JobKind::Deploy, 0, OnError::Stop),
                Outcome::Rejected,
                TaskState::Rejected,
                false,
                false,
                true,
                true,
            ),
            (stopped, Outcome::Failed, F, false, false, true, false),
        ];
        for (n, (job, outcome, state, done, image, trouble, stop)) in rows.into_iter().enumerate() {
            let r = TaskResult {
                task: 10,
                report: "r".into(),
                outcome,
                message: Some("disk full".into()),
                transcript: Vec::new(),
                image: Some(stamp.clone()),
                bytes: 0,
                finished: 0,
            };
            let plan = plan_result(&job, &r);
            assert_eq!(plan.task, state, "row {n}");
            assert_eq!(
                plan.summary,
                format!("task 10 {}: disk full", state.as_str()),
                "row {n}"
            );
            assert_eq!(plan.device_done, done, "row {n}");
            assert_eq!(plan.device_image.is_some(), image, "row {n}");
            assert_eq!(plan.trouble, trouble, "row {n}");
            assert_eq!(plan.stop_job, stop, "row {n}");
        }
        let ok = Validation::default();
        assert_eq!(new_task_state(&ok), (TaskState::Pending, None));
        let bad = Validation {
            errors: vec!["no partition 9".into()],
            warnings: Vec::new(),
        };
        assert_eq!(
            new_task_state(&bad),
            (
                TaskState::Rejected,
                Some("validation failed: no partition 9".into())
            )
        );
    }
}
