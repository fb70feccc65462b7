//! The check-in protocol, version 1: HTTP(S) with JSON bodies, documented in
//! `docs/protocol.md`. These types are the one definition shared by the server, the agent
//! and the load benchmark, so the two ends cannot drift apart. The crate holds nothing else
//! (serde types, bounds checks, the enrolment proof): the agent links it without any of the
//! server stack.
//!
//! The shape follows seed 000's imaging process: the device checks in with its identity and
//! state, the server answers "nothing, check in again in N s" or hands it a task; while the
//! task runs the device posts progress, and at the end a final result with the transcript.
//! Every message that changes state carries an id so a retry is never applied twice: tasks
//! have server ids, results carry a report id chosen by the device.

use serde::{Deserialize, Serialize};

/// Bumped on any incompatible change; the server answers 400 to versions it does not speak.
pub const PROTOCOL_VERSION: u32 = 1;

/// `POST`: a [`CheckIn`] body, a [`CheckInReply`] answer.
pub const CHECKIN_PATH: &str = "/api/v1/checkin";

/// `GET /api/v1/tasks/{id}`: the task again (only the device it belongs to may read it).
pub fn task_path(task: u64) -> String {
    format!("/api/v1/tasks/{task}")
}

/// `POST`: a [`ProgressReport`], a [`ProgressReply`] answer.
pub fn progress_path(task: u64) -> String {
    format!("/api/v1/tasks/{task}/progress")
}

/// `POST`: a [`TaskResult`], a [`ResultReply`] answer.
pub fn result_path(task: u64) -> String {
    format!("/api/v1/tasks/{task}/result")
}

/// What a device sends at every check-in.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct CheckIn {
    pub protocol: u32,
    pub device: DeviceIdentity,
    /// Disks and partitions as the device sees them now (the server validates jobs against
    /// this inventory: target exists, space).
    #[serde(default)]
    pub disks: Vec<DiskReport>,
    /// Seed 000's autogenic flags.
    #[serde(default)]
    pub autogenic: Autogenic,
    /// A task the device was running when it stopped (power cut, agent restart): the server
    /// sends it again so the device resumes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub current_task: Option<u64>,
    /// Final results that could not be delivered before (kept on the boot partition).
    #[serde(default)]
    pub results: Vec<TaskResult>,
    /// At first contact only (no credential yet): [`enrolment_proof`] of the MAC under the
    /// site enrolment secret from the boot partition. Without it (or with a wrong one) the
    /// device enrols pending the administrator's approval.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub enrol_proof: Option<String>,
    /// Set when the device is in maintenance: re-imaging from the backup partition failed
    /// on several boots in a row, so the agent stays at its console instead of booting a
    /// half-written OS. The text says why; the server shows the device as Maintenance until
    /// a check-in without it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maintenance: Option<String>,
    /// The task kinds this agent understands ([`TaskKind::name`]). The server hands a
    /// device only tasks of kinds it announced; absent (an agent older than the field):
    /// [`V1_TASK_KINDS`]. Use [`CheckIn::knows`].
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task_kinds: Option<Vec<String>>,
}

/// The task kinds every agent of protocol v1 understands (a check-in without
/// `task_kinds`).
pub const V1_TASK_KINDS: [&str; 4] = ["deploy", "capture", "reboot", "boot_guest"];

/// Every task kind this crate defines: what an agent built with it announces.
pub const ALL_TASK_KINDS: [&str; 6] = [
    "deploy",
    "capture",
    "reboot",
    "boot_guest",
    "convert",
    "session",
];

/// Most task kinds a check-in may announce.
pub const MAX_TASK_KINDS: usize = 64;

impl CheckIn {
    /// Does the device's agent understand tasks of `kind` (a [`TaskKind::name`])?
    pub fn knows(&self, kind: &str) -> bool {
        match &self.task_kinds {
            Some(k) => k.iter().any(|k| k == kind),
            None => V1_TASK_KINDS.contains(&kind),
        }
    }
}

/// The enrolment proof a device sends at first contact: HMAC-SHA256 of `img-enrol-v1\n`
/// and its normalized MAC under the site enrolment secret (the text of `enrol.key`, trimmed),
/// in hex. The secret itself never travels, and a proof seen by someone else only enrols
/// that one MAC, only while it is not enrolled.
pub fn enrolment_proof(secret: &str, mac: &str) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.trim().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(b"img-enrol-v1\n");
    m.update(normalize_mac(mac).unwrap_or_default().as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// Does `proof` prove knowledge of `secret` for `mac`? (Constant-time comparison.)
pub fn check_enrolment_proof(secret: &str, mac: &str, proof: &str) -> bool {
    use hmac::Mac;
    let Ok(bytes) = hex::decode(proof.trim()) else {
        return false;
    };
    let mut m = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.trim().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(b"img-enrol-v1\n");
    m.update(normalize_mac(mac).unwrap_or_default().as_bytes());
    m.verify_slice(&bytes).is_ok()
}

/// Who the device is. The MAC of the boot NIC is the key the administrator schedules by.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceIdentity {
    /// Boot NIC MAC, lowercase `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub serial: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hostname: Option<String>,
    #[serde(default)]
    pub ram_bytes: u64,
    #[serde(default)]
    pub agent_version: String,
}

/// One disk of the device.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DiskReport {
    /// How the device names it (`/dev/mmcblk0`, or the disk-image path in tests).
    pub name: String,
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// `gpt`, `mbr` or `none`.
    #[serde(default)]
    pub table: String,
    #[serde(default)]
    pub partitions: Vec<PartitionReport>,
    /// The image last written to the whole disk, if the last deploy was a disk image.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStamp>,
    /// The number of the boot-agent partition (the agent's own: GRUB, kernel, its store).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_agent_partition: Option<u32>,
}

/// One partition of a disk.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PartitionReport {
    pub number: u32,
    pub start: u64,
    pub size: u64,
    /// File system as the engine detected it (`fat32`, `ntfs`, `unknown`, ...).
    #[serde(default)]
    pub fs: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    /// The image name and version last written here by the agent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStamp>,
}

/// An image name and version, as stamped by the agent after a successful deploy.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageStamp {
    pub name: String,
    pub version: String,
}

/// Seed 000's autogenic flags, spelled on the wire as the original agent spelled them.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Autogenic {
    #[serde(rename = "SupportImgBackup", default)]
    pub support_img_backup: bool,
    #[serde(rename = "BackupImagePresent", default)]
    pub backup_image_present: bool,
    #[serde(
        rename = "BackImageVer",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub back_image_ver: Option<String>,
    /// The image in the backup partition (name and version) and how much of it is there:
    /// `backup_bytes` of `backup_size` verified (BI resumes from there). Absent on devices
    /// without a backup partition.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_image: Option<ImageStamp>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backup_bytes: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backup_size: u64,
    /// Size of the backup partition in bytes (0: none).
    #[serde(default, skip_serializing_if = "is_zero")]
    pub backup_partition_size: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The server's answer to a check-in.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CheckInReply {
    pub protocol: u32,
    /// The server's number for this device.
    pub device: u64,
    /// Set once, at enrolment: the device's credential. Store it on the boot partition and
    /// send it as `Authorization: Bearer <credential>` from now on; the server keeps only
    /// its hash and cannot show it again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
    /// Report ids from `CheckIn::results` that are now recorded (drop them from the outbox).
    #[serde(default)]
    pub acked: Vec<String>,
    /// True while the device's enrolment awaits the administrator's approval (`imgserver
    /// approve MAC`): it is told to wait and gets no task until then.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pending_approval: bool,
    pub action: Action,
}

/// What the device is to do next.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Nothing to do: check in again in `seconds` (a boot agent boots the guest OS now).
    Wait { seconds: u32 },
    /// Run this task.
    Run { task: Task },
}

/// One device's share of an administrator's job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Task {
    /// Unique per device and job; progress and results name it.
    pub id: u64,
    /// The administrator's job number (`imgserver job N`).
    pub job: u64,
    #[serde(flatten)]
    pub kind: TaskKind,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum TaskKind {
    Deploy(DeploySpec),
    Capture(CaptureSpec),
    Reboot,
    BootGuest,
    /// Seed 001 step 4: make the device autogenic-capable (boot-agent, OS and backup
    /// partitions), then image the OS partition with the job's image.
    Convert(ConvertSpec),
    /// Join a multicast session (`img -session NAME -client`) whose master the server runs,
    /// and write its image; what the session does not deliver comes from `image.url`.
    /// (Boxed: it would make every task message larger in memory than it needs.)
    Session(Box<SessionSpec>),
}

impl TaskKind {
    pub fn name(&self) -> &'static str {
        match self {
            TaskKind::Deploy(_) => "deploy",
            TaskKind::Convert(_) => "convert",
            TaskKind::Capture(_) => "capture",
            TaskKind::Reboot => "reboot",
            TaskKind::BootGuest => "boot_guest",
            TaskKind::Session(_) => "session",
        }
    }
}

/// Write an image onto the device.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeploySpec {
    pub image: ImageRef,
    /// Disk to write (a name from the device's inventory); None: the device's system disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Partition (number or label) for a partition image; None: the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    /// Partitions (numbers or labels) whose content must survive ("Preserve Data Partition(s)").
    #[serde(default)]
    pub preserve: Vec<String>,
    /// Capture what is there now into the device's backup location first (seed 003, default yes).
    #[serde(default)]
    pub backup_first: bool,
    #[serde(default)]
    pub after: After,
    /// Seed 001's PI: image the OS partition from the image in the device's backup
    /// partition, in the imaging engine at the next boot (no download in that boot). With
    /// `fetch_to_backup` the image is first downloaded there (BI then PI, the seed's case
    /// 2); without it the backup must already hold exactly this image, else the device
    /// rejects the task.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub from_backup: bool,
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub fetch_to_backup: bool,
}

/// Seed 001 step 4, "Autogenic Capable Device": the layout the device must get.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ConvertSpec {
    /// The autogenic image the OS partition is imaged with after the new layout is made;
    /// its size sets the backup partition's default size (image + 100 MB).
    pub image: ImageRef,
    /// Disk to convert; None: the device's system disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Backup partition size in bytes when the administrator enlarged it (only on flash of
    /// 4096 MB or less); None: image size + 100 MB.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backup_size: Option<u64>,
    /// The flash size the job was planned for: a device with another size rejects it.
    pub flash_size: u64,
}

/// A multicast session to join as a client (docs/multicast.md).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionSpec {
    /// The session's name (its group address is derived from it).
    pub name: String,
    /// The group address when the server overrides the derived one (`-addr=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub addr: Option<String>,
    /// The image the session sends; its URL is the HTTP Range fallback for what the
    /// session does not deliver.
    pub image: ImageRef,
    /// Disk to write; None: the device's system disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    /// Partition (number or label) for a partition image; None: the whole disk.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
}

/// The image a deploy fetches: from the server's repository or any HTTP(S) server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImageRef {
    pub name: String,
    pub version: String,
    pub url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// Marked autogenic-capable on the server (seed 001: `<BackupImage>` in `image.rsp`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub autogenic: bool,
}

/// What to do once the image is written (seed 003's install options).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum After {
    /// Install and reboot into the new image.
    #[default]
    Reboot,
    /// Install, then carry on without rebooting.
    NoReboot,
    /// Only copy the image into the device's backup location (seed 001's BI): no install.
    CopyOnly,
}

impl After {
    pub fn parse(s: &str) -> Option<After> {
        match s {
            "reboot" => Some(After::Reboot),
            "no-reboot" | "no_reboot" => Some(After::NoReboot),
            "copy-only" | "copy_only" => Some(After::CopyOnly),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            After::Reboot => "reboot",
            After::NoReboot => "no-reboot",
            After::CopyOnly => "copy-only",
        }
    }
}

/// Capture a partition or the disk and upload it into the server's repository.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaptureSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disk: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<String>,
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub models: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    /// Compression level 0..9 (seed 002's `-comp`).
    #[serde(default = "default_comp")]
    pub comp: u8,
    /// Where to PUT the image; carries a one-time key for this task, so the plain HTTP
    /// upload needs no other credential.
    pub upload_url: String,
}

fn default_comp() -> u8 {
    1
}

/// Progress of a running task, posted every few seconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressReport {
    /// Increases with every report of this task; older or repeated ones are ignored.
    pub seq: u64,
    /// What the device is doing ("backup", "deploy", "capture", "verify").
    #[serde(default)]
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub percent: Option<f32>,
    pub bytes: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub total: Option<u64>,
    /// Bytes per second over the last interval.
    pub rate: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProgressReply {
    /// False when the report was older than one already recorded.
    pub recorded: bool,
    /// The administrator aborted the job. Seed 003: a started device still runs to the
    /// end; the flag is informative.
    #[serde(default)]
    pub abort: bool,
}

/// How a task ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Succeeded,
    Failed,
    /// The device refused the task before starting it (validation on the device).
    Rejected,
}

/// The final status of a task, with its transcript.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskResult {
    pub task: u64,
    /// Chosen by the device once per result (random hex); a result sent twice under the
    /// same id is recorded once.
    pub report: String,
    pub outcome: Outcome,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
    /// The log lines of this task, oldest first.
    #[serde(default)]
    pub transcript: Vec<String>,
    /// What is now on the target (deploy) or what was uploaded (capture).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<ImageStamp>,
    #[serde(default)]
    pub bytes: u64,
    /// Unix seconds on the device's clock.
    #[serde(default)]
    pub finished: u64,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ResultReply {
    /// False when this report id had been recorded before (a retry).
    pub recorded: bool,
}

/// Every non-2xx answer carries this body.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErrorReply {
    pub error: String,
}

/// Limits on what a check-in may carry: a device's message is untrusted input, and the
/// server stores it. Generous for real devices (a thin client has one to three disks).
pub const MAX_DISKS: usize = 64;
pub const MAX_PARTITIONS: usize = 256;
pub const MAX_RESULTS: usize = 256;
pub const MAX_TRANSCRIPT_LINES: usize = 20_000;
pub const MAX_TEXT: usize = 4096;

/// Why a message was refused.
#[derive(Debug)]
pub struct DecodeError(pub String);

impl std::fmt::Display for DecodeError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for DecodeError {}

fn limit(what: &str, n: usize, max: usize) -> Result<(), DecodeError> {
    if n > max {
        return Err(DecodeError(format!(
            "{what}: {n} is more than the {max} allowed"
        )));
    }
    Ok(())
}

fn text(what: &str, s: &Option<String>) -> Result<(), DecodeError> {
    limit(what, s.as_ref().map_or(0, String::len), MAX_TEXT)
}

/// Check the counts and lengths of a final result.
pub fn check_result(r: &TaskResult) -> Result<(), DecodeError> {
    limit("result report id length", r.report.len(), 128)?;
    if r.report.is_empty() {
        return Err(DecodeError("result without a report id".into()));
    }
    text("result message length", &r.message)?;
    limit("transcript lines", r.transcript.len(), MAX_TRANSCRIPT_LINES)?;
    for l in &r.transcript {
        limit("transcript line length", l.len(), MAX_TEXT)?;
    }
    Ok(())
}

/// Decode a check-in body and check its counts and lengths: the server's entry point for
/// device input (and the fuzz target's).
pub fn decode_checkin(bytes: &[u8]) -> Result<CheckIn, DecodeError> {
    let c: CheckIn = serde_json::from_slice(bytes).map_err(|e| {
        DecodeError(format!(
            "check-in is not protocol v{PROTOCOL_VERSION} JSON: {e}"
        ))
    })?;
    limit("MAC length", c.device.mac.len(), 64)?;
    limit(
        "enrolment proof length",
        c.enrol_proof.as_ref().map_or(0, String::len),
        128,
    )?;
    for (what, v) in [
        ("serial", &c.device.serial),
        ("uuid", &c.device.uuid),
        ("model", &c.device.model),
        ("hostname", &c.device.hostname),
    ] {
        text(what, v)?;
    }
    limit("agent version length", c.device.agent_version.len(), 256)?;
    if let Some(k) = &c.task_kinds {
        limit("task kinds", k.len(), MAX_TASK_KINDS)?;
        for k in k {
            limit("task kind length", k.len(), 32)?;
        }
    }
    limit("disks", c.disks.len(), MAX_DISKS)?;
    for d in &c.disks {
        limit("disk name length", d.name.len(), MAX_TEXT)?;
        limit("partitions", d.partitions.len(), MAX_PARTITIONS)?;
    }
    limit("results", c.results.len(), MAX_RESULTS)?;
    for r in &c.results {
        check_result(r)?;
    }
    Ok(c)
}

/// Decode the server's answer (the agent's entry point for server input).
pub fn decode_reply(bytes: &[u8]) -> Result<CheckInReply, DecodeError> {
    serde_json::from_slice(bytes).map_err(|e| {
        DecodeError(format!(
            "check-in answer is not protocol v{PROTOCOL_VERSION} JSON: {e}"
        ))
    })
}

/// Normalise a MAC to lowercase colon form; None if it is not six hex octets.
pub fn normalize_mac(s: &str) -> Option<String> {
    let hex: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    let seps = s
        .chars()
        .filter(|c| !c.is_ascii_hexdigit())
        .all(|c| matches!(c, ':' | '-' | '.'));
    if hex.len() != 12 || !seps {
        return None;
    }
    let lower = hex.to_ascii_lowercase();
    let octets: Vec<&str> = (0..6).map(|i| &lower[i * 2..i * 2 + 2]).collect();
    Some(octets.join(":"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn task_kinds_default_to_the_v1_set_and_are_bounded() {
        // An agent older than the field: the v1 kinds only.
        let old =
            decode_checkin(br#"{"protocol":1,"device":{"mac":"52:54:00:00:00:01"}}"#).unwrap();
        assert_eq!(old.task_kinds, None);
        for k in V1_TASK_KINDS {
            assert!(old.knows(k), "{k}");
        }
        assert!(!old.knows("session"));
        assert!(!old.knows("convert"));
        // A new agent: what it announced, nothing more.
        let new = decode_checkin(
            br#"{"protocol":1,"device":{"mac":"52:54:00:00:00:01"},"task_kinds":["deploy","session"]}"#,
        )
        .unwrap();
        assert!(new.knows("session"));
        assert!(!new.knows("convert"));
        assert!(!new.knows("reboot"));
        // Absent stays absent on the wire (an old server sees what it always saw).
        assert!(!serde_json::to_string(&old).unwrap().contains("task_kinds"));
        // Bounded: too many, or too long.
        let many = format!(
            r#"{{"protocol":1,"device":{{"mac":"m"}},"task_kinds":[{}]}}"#,
            vec!["\"deploy\""; MAX_TASK_KINDS + 1].join(",")
        );
        assert!(decode_checkin(many.as_bytes()).is_err());
        let long = format!(
            r#"{{"protocol":1,"device":{{"mac":"m"}},"task_kinds":["{}"]}}"#,
            "x".repeat(33)
        );
        assert!(decode_checkin(long.as_bytes()).is_err());
        // Every kind the crate defines is in ALL_TASK_KINDS.
        for k in [TaskKind::Reboot, TaskKind::BootGuest] {
            assert!(ALL_TASK_KINDS.contains(&k.name()));
        }
        for k in V1_TASK_KINDS {
            assert!(ALL_TASK_KINDS.contains(&k));
        }
    }

    #[test]
    fn checkin_round_trips_with_seed_flag_names() {
        let c = CheckIn {
            protocol: PROTOCOL_VERSION,
            device: DeviceIdentity {
                mac: "52:54:00:12:34:56".into(),
                ..Default::default()
            },
            autogenic: Autogenic {
                support_img_backup: true,
                backup_image_present: true,
                back_image_ver: Some("7.1".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let text = serde_json::to_string(&c).unwrap();
        assert!(text.contains("\"SupportImgBackup\":true"), "{text}");
        assert!(text.contains("\"BackImageVer\":\"7.1\""), "{text}");
        assert_eq!(serde_json::from_str::<CheckIn>(&text).unwrap(), c);
    }

    #[test]
    fn actions_are_tagged() {
        let wait = serde_json::to_value(Action::Wait { seconds: 60 }).unwrap();
        assert_eq!(wait, serde_json::json!({"action": "wait", "seconds": 60}));
        let run = Action::Run {
            task: Task {
                id: 7,
                job: 2,
                kind: TaskKind::Reboot,
            },
        };
        let v = serde_json::to_value(&run).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"action": "run", "task": {"id": 7, "job": 2, "kind": "reboot"}})
        );
        assert_eq!(serde_json::from_value::<Action>(v).unwrap(), run);
    }

    #[test]
    fn deploy_task_round_trips() {
        let t = Task {
            id: 1,
            job: 1,
            kind: TaskKind::Deploy(DeploySpec {
                image: ImageRef {
                    name: "os".into(),
                    version: "2".into(),
                    url: "https://s/repo/os.img".into(),
                    size: Some(5),
                    autogenic: false,
                },
                disk: None,
                partition: Some("2".into()),
                preserve: vec!["3".into()],
                backup_first: true,
                after: After::NoReboot,
                from_backup: false,
                fetch_to_backup: false,
            }),
        };
        let text = serde_json::to_string(&t).unwrap();
        assert!(text.contains("\"after\":\"no_reboot\""), "{text}");
        assert_eq!(serde_json::from_str::<Task>(&text).unwrap(), t);
    }

    #[test]
    fn session_task_round_trips_and_optional_fields_may_be_absent() {
        let t = Task {
            id: 3,
            job: 9,
            kind: TaskKind::Session(Box::new(SessionSpec {
                name: "room1".into(),
                addr: None,
                image: ImageRef {
                    name: "os".into(),
                    version: "2".into(),
                    url: "https://s/repo/os.img".into(),
                    size: None,
                    autogenic: false,
                },
                disk: None,
                partition: None,
            })),
        };
        let v = serde_json::to_value(&t).unwrap();
        assert_eq!(
            v,
            serde_json::json!({"id": 3, "job": 9, "kind": "session", "name": "room1",
                "image": {"name": "os", "version": "2", "url": "https://s/repo/os.img"}})
        );
        assert_eq!(serde_json::from_value::<Task>(v).unwrap(), t);
    }

    /// The fuzz entry points never panic on pseudo-random or mutated valid input.
    #[test]
    fn decoders_survive_random_and_mutated_input() {
        let valid = serde_json::to_vec(&CheckIn {
            protocol: 1,
            device: DeviceIdentity {
                mac: "52:54:00:00:00:01".into(),
                ..Default::default()
            },
            disks: vec![DiskReport {
                name: "d".into(),
                partitions: vec![PartitionReport::default()],
                ..Default::default()
            }],
            ..Default::default()
        })
        .unwrap();
        assert!(decode_checkin(&valid).is_ok());
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for i in 0..4000 {
            let mut buf = valid.clone();
            if i % 2 == 0 {
                for _ in 0..(next() % 8 + 1) {
                    let at = (next() as usize) % buf.len();
                    buf[at] = next() as u8;
                }
            } else {
                buf = (0..(next() % 300)).map(|_| next() as u8).collect();
            }
            let _ = decode_checkin(&buf);
            let _ = decode_reply(&buf);
        }
        let many = format!(
            "{{\"protocol\":1,\"device\":{{\"mac\":\"x\"}},\"disks\":[{}]}}",
            vec!["{\"name\":\"d\",\"size\":1}"; 65].join(",")
        );
        assert!(decode_checkin(many.as_bytes())
            .unwrap_err()
            .0
            .contains("disks: 65"));
    }

    #[test]
    fn macs_normalise() {
        assert_eq!(
            normalize_mac("52-54-00-AB-cd-EF").as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
        assert_eq!(
            normalize_mac("525400abcdef").as_deref(),
            Some("52:54:00:ab:cd:ef")
        );
        assert_eq!(normalize_mac("52:54:00:ab:cd"), None);
        assert_eq!(normalize_mac("52:54:00:ab:cd:eg"), None);
    }
    #[test]
    fn enrolment_proofs_bind_secret_and_mac() {
        let p = enrolment_proof("site secret\n", "52-54-00-AA-BB-CC");
        assert!(check_enrolment_proof(
            "site secret",
            "52:54:00:aa:bb:cc",
            &p
        ));
        assert!(!check_enrolment_proof(
            "other secret",
            "52:54:00:aa:bb:cc",
            &p
        ));
        assert!(!check_enrolment_proof(
            "site secret",
            "52:54:00:aa:bb:cd",
            &p
        ));
        assert!(!check_enrolment_proof(
            "site secret",
            "52:54:00:aa:bb:cc",
            "not hex"
        ));
        assert!(!check_enrolment_proof(
            "site secret",
            "52:54:00:aa:bb:cc",
            ""
        ));
    }
}
