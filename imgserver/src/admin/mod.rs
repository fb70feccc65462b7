//! The administrator's side of the server: one core that the JSON API
//! (`/api/v1/admin/`, [`api`]), the web console and the command line on the server host
//! (`crate::cli`) all call, so every way in checks the same roles, validates jobs the same way
//! and records every change in the same audit trail.
//!
//! # A guide for callers (the web console, the API, the CLI)
//!
//! 1. Get an [`Admin`]: `Admin::open(data_dir, store)` (the store is the server's
//!    `Arc<dyn Store>`; the admin tables sit in the same database file). In the server's
//!    axum handlers get one with [`api::state`] (from the server's `Arc<AppState>`), then
//!    [`api::call`] authenticates the request's bearer token and runs a closure over the
//!    core on a blocking thread, answering JSON or [`api::error_response`].
//! 2. Find out who is asking: `admin.authenticate(bearer_token)` gives an [`Actor`] (the
//!    token's name and [`Role`]) or [`AdminError::Unauthorized`]. Device credentials are
//!    never admin tokens (another table; a device credential is refused here, and an admin
//!    token is refused by the device API). On the server host the CLI acts as
//!    [`Actor::host`] (role admin, name `host:USER`).
//! 3. Call an operation with that actor. Each checks the role first
//!    ([`AdminError::Forbidden`] names the role needed) and records a change in the audit
//!    trail with who and when:
//!    - viewer (reads): [`Admin::devices`] with a [`DeviceFilter`], [`Admin::device`]
//!      (inventory, state, image, backup image, history), [`Admin::images`],
//!      [`Admin::jobs`], [`Admin::job`] (per-device progress), [`Admin::transcript`],
//!      [`Admin::audit`], [`Admin::validate`] (the validation table, nothing created);
//!    - operator (changes the fleet): [`Admin::create_job`] (with `validate_only` it is
//!      [`Admin::validate`]), [`Admin::abort_job`], [`Admin::retry_job`],
//!      [`Admin::rollback_job`], [`Admin::remove_job`], [`Admin::make_operational`],
//!      [`Admin::set_group`];
//!    - admin (also the repository, enrolment and tokens): [`Admin::add_image_file`],
//!      [`Admin::add_image_url`], [`Admin::remove_image`], [`Admin::approve`],
//!      [`Admin::forget`], [`Admin::add_token`], [`Admin::tokens`], [`Admin::revoke_token`].
//! 4. Jobs: describe one with a [`JobRequest`] (the same options as `imgserver schedule
//!    add`: target, what, partition, disk, preserve, backup, then, on error, batch,
//!    compression, note, and the window `at` / `until`, typed in the administrator's time
//!    zone `tz`). [`Admin::create_job`] answers a [`JobCreated`] with the validation table
//!    ([`ValidationRow`]): devices with errors (install location missing, not enough space)
//!    get no work from the job; warnings (RAM, model, same or older version, no backup
//!    partition) do not stop it. When every device of a fixed target (`mac:` or `macs:`)
//!    has errors, nothing is created and the error carries the table
//!    ([`AdminError::Blocked`]).
//! 5. Times are Unix seconds in every struct; show them with [`window::show`] in the
//!    administrator's zone ([`window::zone`]).
//!
//! Everything here is synchronous (SQLite): from async code call it on a blocking thread.

pub mod api;
pub mod db;
pub mod sessions;
pub mod window;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::model::{self, DeviceState, JobOptions, TaskState, Validation};
use crate::protocol::{CheckIn, ImageStamp, ProgressReport};
use crate::store::{
    AuditEntry, AuditHook, DeviceRow, ImageRow, JobRow, NewJob, Store, StoreError, TaskRow,
};

pub use db::{AuditRow, TokenInfo};

/// What an administrator may do. Each role includes the ones below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Role {
    /// Reads everything: fleet, devices, images, jobs, transcripts, audit.
    Viewer,
    /// Also schedules, validates, aborts, retries and rolls back jobs; sets devices
    /// Operational and their group.
    Operator,
    /// Also manages the image repository, enrolments (approve, forget) and admin tokens.
    Admin,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Viewer => "viewer",
            Role::Operator => "operator",
            Role::Admin => "admin",
        }
    }

    pub fn parse(s: &str) -> Option<Role> {
        match s {
            "viewer" => Some(Role::Viewer),
            "operator" => Some(Role::Operator),
            "admin" => Some(Role::Admin),
            _ => None,
        }
    }
}

/// Who is acting: a token's name and role, or the host's user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Actor {
    pub name: String,
    pub role: Role,
}

impl Actor {
    /// The command line on the server host: whoever can open the database file is root of
    /// this server anyway, so it acts as admin, recorded as `host:$USER`.
    pub fn host() -> Actor {
        let user = std::env::var("SUDO_USER")
            .or_else(|_| std::env::var("USER"))
            .unwrap_or_else(|_| format!("uid{}", nix::unistd::getuid()));
        Actor {
            name: format!("host:{user}"),
            role: Role::Admin,
        }
    }

    /// [`AdminError::Forbidden`] unless this actor has at least `role`.
    pub fn require(&self, role: Role, what: &str) -> Result<(), AdminError> {
        if self.role >= role {
            Ok(())
        } else {
            Err(AdminError::Forbidden(format!(
                "{what} needs the {} role; token {:?} is {}: ask an administrator for a token with `imgserver admin add NAME --role {}`",
                role.as_str(),
                self.name,
                self.role.as_str(),
                role.as_str()
            )))
        }
    }
}

/// Errors of the admin core; each names the thing and the way out.
#[derive(Debug, thiserror::Error)]
pub enum AdminError {
    #[error("{0}")]
    Unauthorized(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    /// Every device of the job has validation errors: nothing was created.
    #[error("{0}")]
    Blocked(String, Vec<ValidationRow>),
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("{0:#}")]
    Other(#[from] anyhow::Error),
}

pub type Result<T, E = AdminError> = std::result::Result<T, E>;

/// Admin tokens: a prefix that says what it is, then 256 random bits.
pub const TOKEN_PREFIX: &str = "imgadm_";

/// Device list filters (all optional, combined with AND).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct DeviceFilter {
    /// `operational`, `upgrade_in_progress`, `maintenance`, `configuration_required`,
    /// `pending_approval` or `not_enrolled`.
    #[serde(default)]
    pub state: Option<String>,
    #[serde(default)]
    pub group: Option<String>,
    /// Image name (any version), or `name:version`.
    #[serde(default)]
    pub image: Option<String>,
    #[serde(default)]
    pub model: Option<String>,
    /// Case-insensitive text searched in MAC, serial, model, host name, group, image.
    #[serde(default)]
    pub q: Option<String>,
}

/// A device in the fleet list.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceSummary {
    pub mac: String,
    /// `state` as shown now (seed 003's states, Maintenance after the reload wait), or
    /// `pending_approval` / `not_enrolled`.
    pub state: String,
    /// The state as the console titles it ("Configuration Required").
    pub state_title: String,
    pub state_reason: Option<String>,
    pub image: Option<ImageStamp>,
    pub model: Option<String>,
    pub serial: Option<String>,
    pub hostname: Option<String>,
    pub group: Option<String>,
    pub agent_version: Option<String>,
    pub ram_bytes: u64,
    pub last_seen: Option<u64>,
    pub enrol_addr: Option<String>,
    /// The backup partition (seed 001 step 7); None until the device checked in.
    #[serde(default)]
    pub backup: Option<BackupImage>,
}

/// The backup image a device keeps (seed 000's autogenic flags, and seed 001 step 7: the
/// backup partition's image, version and BI progress).
pub type BackupImage = crate::autogenic::BackupView;

/// One task of a device's history (seed 003's device History tab).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HistoryRow {
    pub job: u64,
    pub task: u64,
    pub kind: String,
    pub image: Option<String>,
    pub state: TaskState,
    pub changed_by: Option<String>,
    pub last_action: u64,
    pub message: Option<String>,
}

/// One device in full.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeviceDetail {
    #[serde(flatten)]
    pub summary: DeviceSummary,
    /// The last check-in's inventory: identity, disks, partitions (with the image stamp on
    /// each), autogenic flags. None until the device checked in.
    pub inventory: Option<CheckIn>,
    pub backup_image: BackupImage,
    pub history: Vec<HistoryRow>,
}

/// A job as the administrator describes it (API body of `POST /api/v1/admin/jobs`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct JobRequest {
    /// `mac:MAC`, `group:NAME`, `all`, or `macs:MAC,MAC,...` (devices known to the server).
    pub target: String,
    /// `deploy` (needs `image`), `capture` (needs `capture`), `reboot`, `boot_guest`.
    pub kind: String,
    /// `NAME`, `NAME:VERSION` or the image id (deploy).
    #[serde(default)]
    pub image: Option<String>,
    /// `NAME:VERSION` of the image to make (capture).
    #[serde(default)]
    pub capture: Option<String>,
    /// partition, disk, preserve, backup_first, after, on_error, batch, comp (as the CLI).
    #[serde(default)]
    pub options: JobOptions,
    /// Start of the window: a time in `tz` (`2026-11-29 07:30`), RFC 3339 with offset,
    /// `@UNIX`, `now` or `+10m`. None: at once.
    #[serde(default)]
    pub at: Option<String>,
    /// End of the window (same forms). None: open-ended.
    #[serde(default)]
    pub until: Option<String>,
    /// IANA zone `at` and `until` are written in (default: the server's `TZ`).
    #[serde(default)]
    pub tz: Option<String>,
    #[serde(default)]
    pub note: Option<String>,
    /// Only validate: answer the table, create nothing.
    #[serde(default)]
    pub validate_only: bool,
}

/// One line of the validation table (seed 003: success, warning or error per device).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ValidationRow {
    pub mac: String,
    /// `success`, `warning` or `error`.
    pub status: String,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
}

impl ValidationRow {
    pub fn new(mac: String, v: &Validation) -> ValidationRow {
        let status = if !v.ok() {
            "error"
        } else if !v.warnings.is_empty() {
            "warning"
        } else {
            "success"
        };
        ValidationRow {
            mac,
            status: status.into(),
            errors: v.errors.clone(),
            warnings: v.warnings.clone(),
        }
    }
}

/// What creating a job (or validating one) answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobCreated {
    /// None for a validate-only run.
    pub job: Option<u64>,
    pub validation: Vec<ValidationRow>,
    /// Devices whose errors keep them out of the job.
    pub blocked: Vec<String>,
}

/// Per-task counts of a job.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Counts {
    pub pending: usize,
    pub running: usize,
    pub succeeded: usize,
    /// Failed, rejected by validation, or aborted.
    pub failed: usize,
    pub total: usize,
}

/// A job in the jobs list (seed 003's Jobs list: name, last action, status, changed by,
/// description, schedule).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobSummary {
    pub id: u64,
    pub kind: String,
    /// `NAME VERSION` deployed, `-> NAME VERSION` captured, or None.
    pub image: Option<String>,
    pub target: String,
    /// `active`, `done`, `done with errors`, `stopped`, `aborted`.
    pub state: String,
    pub created: u64,
    pub changed_by: Option<String>,
    pub last_action: u64,
    pub note: Option<String>,
    pub at: Option<u64>,
    pub until: Option<u64>,
    pub window: window::Window,
    pub counts: Counts,
}

/// One device's line in a job.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TaskView {
    pub task: u64,
    pub mac: String,
    pub state: TaskState,
    pub progress: Option<ProgressReport>,
    pub previous_image: Option<ImageStamp>,
    pub updated: u64,
    pub sent_at: Option<u64>,
    pub finished: Option<u64>,
    pub message: Option<String>,
    pub errors: Vec<String>,
    pub warnings: Vec<String>,
    /// Why a pending task waits (the window, the batch rule, the device's next check-in).
    pub waiting: Option<String>,
    pub ignored_results: u64,
}

/// One job in full: options and per-device progress.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JobDetail {
    #[serde(flatten)]
    pub summary: JobSummary,
    pub options: JobOptions,
    pub tasks: Vec<TaskView>,
    pub history: Vec<AuditRow>,
}

/// A transcript line (seed 003's Transcript: what happened on the device, in order).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TranscriptLine {
    pub at: u64,
    pub task: Option<u64>,
    pub line: String,
}

/// The admin core over the server's store and data directory.
pub struct Admin {
    store: Arc<dyn Store>,
    db: db::AdminDb,
    data: PathBuf,
    /// Seed 003's reload wait, for showing Maintenance.
    pub reload_wait: u64,
}

fn now() -> u64 {
    crate::api::now()
}

fn stamp(i: &ImageStamp) -> String {
    format!("{} {}", i.name, i.version)
}

impl Admin {
    /// The admin core for the server whose data directory is `data` (the database is
    /// `data/imgserver.db`, the repository `data/repo`).
    pub fn open(data: &Path, store: Arc<dyn Store>, reload_wait: u64) -> Result<Admin> {
        let db = db::AdminDb::open(&data.join("imgserver.db"))?;
        Ok(Admin {
            store,
            db,
            data: data.to_path_buf(),
            reload_wait,
        })
    }

    /// The audit record of `by` doing `action` on `target` now.
    fn entry(by: &Actor, action: &str, target: String, detail: String) -> AuditEntry {
        AuditEntry {
            at: now(),
            actor: by.name.clone(),
            role: by.role.as_str(),
            action: action.to_string(),
            target,
            detail,
        }
    }

    /// Run `change` (one store write) and its audit record as one transaction: `describe`
    /// makes the record's target and detail from the store write's answer (None: the write
    /// changed nothing, so nothing is recorded).
    fn audited<T>(
        &self,
        by: &Actor,
        action: &str,
        change: impl FnOnce() -> Result<T>,
        describe: impl FnOnce(&dyn std::any::Any) -> Option<(String, String)> + 'static,
    ) -> Result<T> {
        let (who, what) = (by.clone(), action.to_string());
        let hook: AuditHook = Box::new(move |out: &dyn std::any::Any| {
            let (target, detail) = describe(out)?;
            Some(Self::entry(&who, &what, target, detail))
        });
        let (out, recorded) = crate::store::with_audit(hook, change);
        let out = out?;
        if !recorded {
            // Fail closed: a change the audit trail did not see is a bug, not a success.
            return Err(AdminError::Other(anyhow::anyhow!(
                "{action}: the change made no store write to record it with"
            )));
        }
        Ok(out)
    }

    // ---- tokens ----

    /// Who presents this bearer token.
    pub fn authenticate(&self, token: &str) -> Result<Actor> {
        let token = token.trim();
        if !token.starts_with(TOKEN_PREFIX) {
            return Err(AdminError::Unauthorized(
                "not an admin token (admin tokens start with imgadm_; device credentials never grant admin access): get one with `imgserver admin add NAME --role viewer|operator|admin` on the server".into(),
            ));
        }
        match self
            .db
            .token_by_hash(&crate::api::hash_secret(token), now())?
        {
            Some((name, role)) => Ok(Actor { name, role }),
            None => Err(AdminError::Unauthorized(
                "unknown or revoked admin token: ask an administrator for a new one".into(),
            )),
        }
    }

    /// Issue a token; the token is returned once and stored only hashed.
    pub fn add_token(&self, by: &Actor, name: &str, role: Role) -> Result<String> {
        by.require(Role::Admin, "issuing admin tokens")?;
        let ok = !name.is_empty()
            && name.len() <= 64
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | '@'));
        if !ok {
            return Err(AdminError::Invalid(format!(
                "token name {name:?}: use 1 to 64 letters, digits, '.', '_', '-' or '@'"
            )));
        }
        let token = format!("{TOKEN_PREFIX}{}", crate::api::new_secret());
        self.db.add_token(
            name,
            role,
            &crate::api::hash_secret(&token),
            &Self::entry(
                by,
                "token.add",
                format!("token:{name}"),
                role.as_str().into(),
            ),
        )?;
        Ok(token)
    }

    pub fn tokens(&self, by: &Actor) -> Result<Vec<TokenInfo>> {
        by.require(Role::Admin, "listing admin tokens")?;
        self.db.tokens()
    }

    pub fn revoke_token(&self, by: &Actor, name: &str) -> Result<()> {
        by.require(Role::Admin, "revoking admin tokens")?;
        let audit = Self::entry(by, "token.revoke", format!("token:{name}"), String::new());
        if !self.db.revoke(name, &audit)? {
            return Err(AdminError::NotFound(format!(
                "no live admin token {name:?}: see `imgserver admin list`"
            )));
        }
        Ok(())
    }

    /// The audit trail, newest first (`target` e.g. `job:7`, `device:MAC`).
    pub fn audit(&self, by: &Actor, target: Option<&str>, limit: u32) -> Result<Vec<AuditRow>> {
        by.require(Role::Viewer, "reading the audit trail")?;
        self.db.audit(target, limit.clamp(1, 10_000))
    }

    // ---- devices ----

    fn summary(&self, d: &DeviceRow, now: u64) -> DeviceSummary {
        let (state, title) = if d.pending {
            (
                "pending_approval".to_string(),
                "Pending Approval".to_string(),
            )
        } else if !(d.enrolled || d.last_seen.is_some()) {
            ("not_enrolled".to_string(), "Not Enrolled".to_string())
        } else {
            let s = model::effective_state(
                d.state,
                d.last_seen.unwrap_or(0),
                d.trouble_since,
                now,
                self.reload_wait,
            );
            (s.as_str().to_string(), s.title().to_string())
        };
        DeviceSummary {
            mac: d.mac.clone(),
            state,
            state_title: title,
            state_reason: d.state_reason.clone(),
            image: d.image.clone(),
            model: d.model.clone(),
            serial: d.serial.clone(),
            hostname: d.inventory.as_ref().and_then(|i| i.device.hostname.clone()),
            group: d.group.clone(),
            agent_version: d.agent_version.clone(),
            ram_bytes: d.ram_bytes,
            last_seen: d.last_seen,
            enrol_addr: d.enrol_addr.clone(),
            backup: d.inventory.as_ref().map(BackupImage::of),
        }
    }

    /// The fleet, filtered.
    pub fn devices(&self, by: &Actor, f: &DeviceFilter) -> Result<Vec<DeviceSummary>> {
        by.require(Role::Viewer, "listing devices")?;
        let now = now();
        let q = f.q.as_ref().map(|q| q.to_lowercase());
        Ok(self
            .store
            .devices()?
            .iter()
            .map(|d| self.summary(d, now))
            .filter(|s| f.state.as_ref().is_none_or(|x| &s.state == x))
            .filter(|s| f.group.as_ref().is_none_or(|g| s.group.as_ref() == Some(g)))
            .filter(|s| {
                f.model.as_ref().is_none_or(|m| {
                    s.model
                        .as_deref()
                        .is_some_and(|x| x.eq_ignore_ascii_case(m))
                })
            })
            .filter(|s| {
                f.image.as_ref().is_none_or(|spec| {
                    s.image
                        .as_ref()
                        .is_some_and(|i| match spec.split_once(':') {
                            Some((n, v)) => i.name == n && i.version == v,
                            None => &i.name == spec,
                        })
                })
            })
            .filter(|s| {
                q.as_ref().is_none_or(|q| {
                    [
                        Some(&s.mac),
                        s.serial.as_ref(),
                        s.model.as_ref(),
                        s.hostname.as_ref(),
                        s.group.as_ref(),
                    ]
                    .into_iter()
                    .flatten()
                    .any(|x| x.to_lowercase().contains(q))
                        || s.image
                            .as_ref()
                            .is_some_and(|i| stamp(i).to_lowercase().contains(q))
                })
            })
            .collect())
    }

    fn mac(mac: &str) -> Result<String> {
        crate::protocol::normalize_mac(mac).ok_or_else(|| {
            AdminError::Invalid(format!("{mac:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
        })
    }

    fn device_row(&self, mac: &str) -> Result<DeviceRow> {
        self.store
            .device(mac)?
            .ok_or_else(|| AdminError::NotFound(format!("no device {mac}: see the device list")))
    }

    /// One device: inventory, state, image, backup image, history.
    pub fn device(&self, by: &Actor, mac: &str) -> Result<DeviceDetail> {
        by.require(Role::Viewer, "reading a device")?;
        let mac = Self::mac(mac)?;
        let d = self.device_row(&mac)?;
        let creators = self.db.job_creators()?;
        let images: BTreeMap<u64, ImageRow> = self
            .store
            .images()?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
        let mut history = Vec::new();
        for (j, tasks) in self.store.jobs()? {
            for t in tasks.iter().filter(|t| t.device == d.id) {
                history.push(HistoryRow {
                    job: j.id,
                    task: t.id,
                    kind: j.kind.clone(),
                    image: job_image(&j, &images),
                    state: t.state,
                    changed_by: creators.get(&j.id).cloned(),
                    last_action: t.updated,
                    message: t.message.clone(),
                });
            }
        }
        history.sort_by_key(|h| std::cmp::Reverse(h.task));
        let backup_image = d
            .inventory
            .as_ref()
            .map(BackupImage::of)
            .unwrap_or_default();
        Ok(DeviceDetail {
            summary: self.summary(&d, now()),
            inventory: d.inventory.clone(),
            backup_image,
            history,
        })
    }

    /// Seed 003's "Make Device Operational".
    pub fn make_operational(&self, by: &Actor, mac: &str) -> Result<()> {
        by.require(Role::Operator, "making a device Operational")?;
        let mac = Self::mac(mac)?;
        let d = self.device_row(&mac)?;
        let (target, was) = (format!("device:{mac}"), format!("was {}", d.state.as_str()));
        self.audited(
            by,
            "device.operational",
            || {
                Ok(self
                    .store
                    .set_device_state(&mac, DeviceState::Operational, None)?)
            },
            move |_| Some((target, was)),
        )
    }

    /// Put a device in a group (None: no group). A device not known yet is pre-staged.
    pub fn set_group(&self, by: &Actor, mac: &str, group: Option<&str>) -> Result<()> {
        by.require(Role::Operator, "setting a device's group")?;
        let mac = Self::mac(mac)?;
        let group = group.map(str::trim).filter(|g| !g.is_empty());
        if let Some(g) = group {
            if g.len() > 64 || g.chars().any(|c| c.is_control() || c == ',') {
                return Err(AdminError::Invalid(format!(
                    "group {g:?}: up to 64 characters, no commas or control characters"
                )));
            }
        }
        let (target, detail) = (
            format!("device:{mac}"),
            group.unwrap_or("(none)").to_string(),
        );
        self.audited(
            by,
            "device.group",
            || Ok(self.store.set_group(&mac, group)?),
            move |_| Some((target, detail)),
        )
    }

    /// Delete the device's records so it enrols and can be imaged again.
    pub fn forget(&self, by: &Actor, mac: &str) -> Result<()> {
        by.require(Role::Admin, "forgetting a device")?;
        let mac = Self::mac(mac)?;
        let target = format!("device:{mac}");
        let found = self.audited(
            by,
            "device.forget",
            || Ok(self.store.forget(&mac)?),
            move |found| found_then(found, target),
        )?;
        if !found {
            return Err(AdminError::NotFound(format!(
                "no device {mac}: see the device list"
            )));
        }
        Ok(())
    }

    /// Approve an enrolment made without the site enrolment secret.
    pub fn approve(&self, by: &Actor, mac: &str) -> Result<()> {
        by.require(Role::Admin, "approving an enrolment")?;
        let mac = Self::mac(mac)?;
        let target = format!("device:{mac}");
        let found = self.audited(
            by,
            "device.approve",
            || Ok(self.store.approve(&mac, now())?),
            move |found| found_then(found, target),
        )?;
        if !found {
            return Err(AdminError::NotFound(format!(
                "{mac} has no enrolment waiting for approval"
            )));
        }
        Ok(())
    }

    pub fn transcript(
        &self,
        by: &Actor,
        mac: &str,
        task: Option<u64>,
    ) -> Result<Vec<TranscriptLine>> {
        by.require(Role::Viewer, "reading a transcript")?;
        let mac = Self::mac(mac)?;
        self.device_row(&mac)?;
        Ok(self
            .store
            .transcript(&mac, task)?
            .into_iter()
            .map(|(at, task, line)| TranscriptLine { at, task, line })
            .collect())
    }

    // ---- images ----

    pub fn images(&self, by: &Actor) -> Result<Vec<ImageRow>> {
        by.require(Role::Viewer, "listing images")?;
        Ok(self.store.images()?)
    }

    /// Register an image file (moved into the repository when `move_it`, else copied).
    pub fn add_image_file(
        &self,
        by: &Actor,
        file: &Path,
        move_it: bool,
        min_ram: u64,
    ) -> Result<ImageRow> {
        self.add_image_file_as(by, file, move_it, min_ram, false)
    }

    /// [`Admin::add_image_file`], marked autogenic (seed 001) when `autogenic`.
    pub fn add_image_file_as(
        &self,
        by: &Actor,
        file: &Path,
        move_it: bool,
        min_ram: u64,
        autogenic: bool,
    ) -> Result<ImageRow> {
        by.require(Role::Admin, "registering images")?;
        self.audited(
            by,
            "image.add",
            || {
                crate::repo::add_file_as(
                    self.store.as_ref(),
                    &self.data.join("repo"),
                    file,
                    move_it,
                    min_ram,
                    autogenic,
                )
                .map_err(repo_error)
            },
            |added| image_added(added, "file"),
        )
    }

    /// Register an image kept on another HTTP(S) server.
    pub fn add_image_url(
        &self,
        by: &Actor,
        url: &str,
        ca: Option<PathBuf>,
        min_ram: u64,
    ) -> Result<ImageRow> {
        self.add_image_url_as(by, url, ca, min_ram, false)
    }

    /// [`Admin::add_image_url`], marked autogenic (seed 001) when `autogenic`.
    pub fn add_image_url_as(
        &self,
        by: &Actor,
        url: &str,
        ca: Option<PathBuf>,
        min_ram: u64,
        autogenic: bool,
    ) -> Result<ImageRow> {
        by.require(Role::Admin, "registering images")?;
        if !(url.starts_with("https://") || url.starts_with("http://")) {
            return Err(AdminError::Invalid(format!(
                "{url:?} is not an http(s) URL"
            )));
        }
        let http = imgengine::source::HttpConfig {
            ca_file: ca,
            timeout: Some(std::time::Duration::from_secs(30)),
            retries: 2,
            authorization: None,
        };
        let from = url.to_string();
        self.audited(
            by,
            "image.add",
            || {
                crate::repo::add_url_as(self.store.as_ref(), url, &http, min_ram, autogenic)
                    .map_err(repo_error)
            },
            move |added| image_added(added, &from),
        )
    }

    /// `NAME`, `NAME:VERSION` or an id.
    pub fn find_image(&self, spec: &str) -> Result<ImageRow> {
        if let Ok(id) = spec.parse::<u64>() {
            if let Some(img) = self.store.image_by_id(id)? {
                return Ok(img);
            }
        }
        let (name, version) = match spec.split_once(':') {
            Some((n, v)) => (n, Some(v)),
            None => (spec, None),
        };
        self.store
            .image(name, version)?
            .ok_or_else(|| AdminError::NotFound(format!("no image {spec}: see the image list")))
    }

    /// Unregister an image (and delete its repository file).
    pub fn remove_image(&self, by: &Actor, spec: &str) -> Result<ImageRow> {
        by.require(Role::Admin, "removing images")?;
        let img = self.find_image(spec)?;
        let (target, detail) = (
            format!("image:{}", img.id),
            format!("{} {}", img.name, img.version),
        );
        self.audited(
            by,
            "image.remove",
            || {
                crate::repo::remove(self.store.as_ref(), &self.data.join("repo"), &img)
                    .map_err(repo_error)
            },
            move |_| Some((target, detail)),
        )?;
        Ok(img)
    }

    // ---- jobs ----

    /// Turn a request into the store's job and the devices it reaches now.
    fn resolve(&self, req: &JobRequest) -> Result<(NewJob, Option<ImageRow>, Vec<DeviceTarget>)> {
        let now = now();
        let kind = req.kind.as_str();
        let mut options = req.options.clone();
        crate::autogenic::check_request(kind, &options).map_err(AdminError::Invalid)?;
        let (image, image_id) = match kind {
            "deploy" | "convert" | "session" => {
                if kind == "session" && options.session.is_none() {
                    return Err(AdminError::Invalid(
                        "a session job is made by `imgserver session start NAME`".into(),
                    ));
                }
                let spec = req.image.as_deref().ok_or_else(|| {
                    AdminError::Invalid(format!(
                        "a {kind} job needs an image (NAME[:VERSION] or id)"
                    ))
                })?;
                let img = self.find_image(spec)?;
                if let (Some(from), None) = (&img.captured_from, &img.signed_by) {
                    return Err(AdminError::Conflict(format!(
                        "image {} {} was captured from {from} and nobody signed it yet: look at it, then `imgserver image sign {}:{} --key KEYFILE`",
                        img.name, img.version, img.name, img.version
                    )));
                }
                let id = img.id;
                (Some(img), Some(id))
            }
            "capture" => {
                let spec = req.capture.as_deref().unwrap_or_default();
                let (n, v) = spec.split_once(':').ok_or_else(|| {
                    AdminError::Invalid(format!(
                        "capture {spec:?}: give NAME:VERSION for the new image"
                    ))
                })?;
                if n.is_empty() || v.is_empty() {
                    return Err(AdminError::Invalid(format!(
                        "capture {spec:?}: give NAME:VERSION for the new image"
                    )));
                }
                options.capture_name = Some(n.into());
                options.capture_version = Some(v.into());
                (None, None)
            }
            "reboot" | "boot_guest" => (None, None),
            other => {
                return Err(AdminError::Invalid(format!(
                    "job kind {other:?}: use deploy, convert, capture, reboot or boot_guest"
                )))
            }
        };
        if let Some(c) = options.comp {
            if c > 9 {
                return Err(AdminError::Invalid(format!("comp {c}: use 0..9")));
            }
        }
        let tz = window::zone(req.tz.as_deref())?;
        let at = req
            .at
            .as_deref()
            .map(|s| window::parse_time(s, &tz, now))
            .transpose()?;
        let until = req
            .until
            .as_deref()
            .map(|s| window::parse_time(s, &tz, now))
            .transpose()?;
        window::check(at, until, now)?;
        options.at = at;
        options.until = until;
        let all = self.store.devices()?;
        let target = req.target.trim();
        let (selector, devices, targets) = if let Some(m) = target.strip_prefix("mac:") {
            let mac = Self::mac(m)?;
            let d = all.iter().find(|d| d.mac == mac);
            (
                format!("mac:{mac}"),
                Vec::new(),
                vec![DeviceTarget {
                    mac,
                    inventory: d.and_then(|d| d.inventory.clone()),
                }],
            )
        } else if let Some(list) = target.strip_prefix("macs:") {
            let mut ids = Vec::new();
            let mut t = Vec::new();
            for m in list.split(',').map(str::trim).filter(|m| !m.is_empty()) {
                let mac = Self::mac(m)?;
                let d = all.iter().find(|d| d.mac == mac).ok_or_else(|| {
                    AdminError::NotFound(format!(
                        "device {mac} is not known: schedule it alone with mac:{mac} to pre-stage it"
                    ))
                })?;
                if !ids.contains(&d.id) {
                    ids.push(d.id);
                    t.push(DeviceTarget {
                        mac,
                        inventory: d.inventory.clone(),
                    });
                }
            }
            if ids.is_empty() {
                return Err(AdminError::Invalid("macs: give at least one MAC".into()));
            }
            ("list".to_string(), ids, t)
        } else if let Some(g) = target.strip_prefix("group:") {
            let g = g.trim();
            if g.is_empty() {
                return Err(AdminError::Invalid("group: give a group name".into()));
            }
            let t = all
                .iter()
                .filter(|d| d.group.as_deref() == Some(g))
                .map(|d| DeviceTarget {
                    mac: d.mac.clone(),
                    inventory: d.inventory.clone(),
                })
                .collect();
            (format!("group:{g}"), Vec::new(), t)
        } else if target == "all" {
            let t = all
                .iter()
                .map(|d| DeviceTarget {
                    mac: d.mac.clone(),
                    inventory: d.inventory.clone(),
                })
                .collect();
            ("all".to_string(), Vec::new(), t)
        } else {
            return Err(AdminError::Invalid(format!(
                "target {target:?}: use mac:MAC, macs:MAC,MAC,..., group:NAME or all"
            )));
        };
        if kind == "convert" {
            // Seed 001 step 4: one flash size for every device of the job, planned now.
            let sizes: Vec<(String, Option<u64>)> = targets
                .iter()
                .map(|t| {
                    let size = t
                        .inventory
                        .as_ref()
                        .and_then(|i| crate::autogenic::flash_size(i, options.disk.as_deref()));
                    (t.mac.clone(), size)
                })
                .collect();
            options.flash_size =
                Some(crate::autogenic::same_flash(&sizes).map_err(AdminError::Invalid)?);
        }
        let job = NewJob {
            kind: kind.to_string(),
            image: image_id,
            options,
            selector,
            devices,
            note: req.note.clone().filter(|n| !n.trim().is_empty()),
        };
        Ok((job, image, targets))
    }

    /// Seed 003's validation table for a job, without creating anything.
    pub fn validate(&self, by: &Actor, req: &JobRequest) -> Result<Vec<ValidationRow>> {
        by.require(Role::Viewer, "validating a job")?;
        let (job, image, targets) = self.resolve(req)?;
        Ok(validation_table(&job, image.as_ref(), &targets))
    }

    /// Create a job (or, with `validate_only`, only validate it). Devices with validation
    /// errors get no work from it; when no device of a fixed target passes, nothing is
    /// created ([`AdminError::Blocked`]).
    pub fn create_job(&self, by: &Actor, req: &JobRequest) -> Result<JobCreated> {
        if req.validate_only {
            let validation = self.validate(by, req)?;
            let blocked = blocked(&validation);
            return Ok(JobCreated {
                job: None,
                validation,
                blocked,
            });
        }
        by.require(Role::Operator, "scheduling jobs")?;
        let (job, image, targets) = self.resolve(req)?;
        let table = validation_table(&job, image.as_ref(), &targets);
        let fixed = job.selector.starts_with("mac:") || job.selector == "list";
        if fixed && !table.is_empty() && table.iter().all(|r| r.status == "error") {
            return Err(AdminError::Blocked(
                format!(
                    "no job created: validation errors on every device ({})",
                    table
                        .iter()
                        .map(|r| format!("{}: {}", r.mac, r.errors.join("; ")))
                        .collect::<Vec<_>>()
                        .join(" | ")
                ),
                table,
            ));
        }
        self.insert_job(by, "job.create", &job, req.note.as_deref())
    }

    fn insert_job(
        &self,
        by: &Actor,
        action: &str,
        job: &NewJob,
        _note: Option<&str>,
    ) -> Result<JobCreated> {
        let what = match (&job.kind[..], job.image) {
            (k @ ("deploy" | "convert" | "session"), Some(i)) => self
                .store
                .image_by_id(i)?
                .map(|i| {
                    let how = crate::autogenic::job_words(&job.options)
                        .map(|w| format!(", {w}"))
                        .unwrap_or_default();
                    format!("{k} {} {}{how}", i.name, i.version)
                })
                .unwrap_or_else(|| k.into()),
            (k, _) => k.to_string(),
        };
        let mut detail = format!("{what} for {}", job.selector);
        if let Some(a) = job.options.at {
            detail.push_str(&format!(
                ", at {}",
                window::show(a, &jiff::tz::TimeZone::UTC)
            ));
        }
        if let Some(u) = job.options.until {
            detail.push_str(&format!(
                ", until {}",
                window::show(u, &jiff::tz::TimeZone::UTC)
            ));
        }
        let (id, report) = self.audited(
            by,
            action,
            || Ok(self.store.add_job(job, now())?),
            move |made| {
                let (id, report) = made.downcast_ref::<(u64, Vec<(String, Validation)>)>()?;
                let blocked = blocked(&rows(report));
                if !blocked.is_empty() {
                    detail.push_str(&format!(", blocked by validation: {}", blocked.join(", ")));
                }
                Some((format!("job:{id}"), detail))
            },
        )?;
        let validation = rows(&report);
        let blocked = blocked(&validation);
        Ok(JobCreated {
            job: Some(id),
            validation,
            blocked,
        })
    }

    fn job_rows(&self, id: u64) -> Result<(JobRow, Vec<TaskRow>)> {
        self.store
            .job(id)?
            .filter(|(j, _)| j.state != "removed")
            .ok_or_else(|| AdminError::NotFound(format!("no job {id}: see the job list")))
    }

    fn job_summary(
        &self,
        j: &JobRow,
        tasks: &[TaskRow],
        images: &BTreeMap<u64, ImageRow>,
        creators: &std::collections::HashMap<u64, String>,
        now: u64,
    ) -> JobSummary {
        let mut c = Counts {
            total: tasks.len(),
            ..Default::default()
        };
        for t in tasks {
            match t.state {
                TaskState::Pending => c.pending += 1,
                TaskState::Sent | TaskState::Running => c.running += 1,
                TaskState::Succeeded => c.succeeded += 1,
                _ => c.failed += 1,
            }
        }
        let last_action = tasks
            .iter()
            .map(|t| t.updated)
            .max()
            .unwrap_or(j.created)
            .max(j.created);
        JobSummary {
            id: j.id,
            kind: j.kind.clone(),
            image: job_image(j, images),
            target: j.selector.clone(),
            state: shown_state(j, tasks),
            created: j.created,
            changed_by: creators.get(&j.id).cloned(),
            last_action,
            note: j.note.clone(),
            at: j.options.at,
            until: j.options.until,
            window: window::window(&j.options, now),
            counts: c,
        }
    }

    /// All jobs, newest first.
    pub fn jobs(&self, by: &Actor) -> Result<Vec<JobSummary>> {
        by.require(Role::Viewer, "listing jobs")?;
        let images: BTreeMap<u64, ImageRow> = self
            .store
            .images()?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
        let creators = self.db.job_creators()?;
        let now = now();
        let mut out: Vec<JobSummary> = self
            .store
            .jobs()?
            .iter()
            .map(|(j, t)| self.job_summary(j, t, &images, &creators, now))
            .collect();
        out.reverse();
        Ok(out)
    }

    /// One job with per-device progress and its audit history.
    pub fn job(&self, by: &Actor, id: u64) -> Result<JobDetail> {
        by.require(Role::Viewer, "reading a job")?;
        let (j, tasks) = self.job_rows(id)?;
        let images: BTreeMap<u64, ImageRow> = self
            .store
            .images()?
            .into_iter()
            .map(|i| (i.id, i))
            .collect();
        let creators = self.db.job_creators()?;
        let now = now();
        let summary = self.job_summary(&j, &tasks, &images, &creators, now);
        let win = window::window(&j.options, now);
        let tasks = tasks
            .iter()
            .map(|t| TaskView {
                task: t.id,
                mac: t.mac.clone(),
                state: t.state,
                progress: t.progress.clone(),
                previous_image: t.prev_image.clone(),
                updated: t.updated,
                sent_at: t.sent_at,
                finished: t.finished,
                message: t.message.clone(),
                errors: t.validation.errors.clone(),
                warnings: t.validation.warnings.clone(),
                waiting: (t.state == TaskState::Pending && j.state == "active").then(
                    || match win {
                        window::Window::NotYet(_) => "waiting for the window to open".into(),
                        window::Window::Closed(_) => {
                            "the window closed before the device checked in: retry the job".into()
                        }
                        _ => "waiting for the device's next check-in (and its batch's turn)".into(),
                    },
                ),
                ignored_results: t.ignored_results,
            })
            .collect();
        Ok(JobDetail {
            summary,
            options: j.options.clone(),
            tasks,
            history: self.db.audit(Some(&format!("job:{id}")), 1000)?,
        })
    }

    /// Seed 003's Abort: devices not started are cancelled; devices already imaging finish.
    pub fn abort_job(&self, by: &Actor, id: u64) -> Result<usize> {
        by.require(Role::Operator, "aborting jobs")?;
        self.audited(
            by,
            "job.abort",
            || Ok(self.store.abort_job(id, now())?),
            move |n| {
                let n = n.downcast_ref::<usize>()?;
                Some((
                    format!("job:{id}"),
                    format!("{n} device(s) not started cancelled"),
                ))
            },
        )
    }

    /// Remove a job none of whose devices is imaging now.
    pub fn remove_job(&self, by: &Actor, id: u64) -> Result<()> {
        by.require(Role::Operator, "removing jobs")?;
        self.audited(
            by,
            "job.remove",
            || Ok(self.store.remove_job(id)?),
            move |_| Some((format!("job:{id}"), String::new())),
        )
    }

    /// Seed 003's Retry: a new job over the devices that failed, were rejected or aborted,
    /// with the same options; `at` / `until` / `tz` of `window` set a new window (the old
    /// one is dropped).
    pub fn retry_job(&self, by: &Actor, id: u64, window: &JobRequest) -> Result<JobCreated> {
        by.require(Role::Operator, "retrying jobs")?;
        let (j, tasks) = self.job_rows(id)?;
        let devices: Vec<u64> = tasks
            .iter()
            .filter(|t| {
                matches!(
                    t.state,
                    TaskState::Failed | TaskState::Rejected | TaskState::Aborted
                )
            })
            .map(|t| t.device)
            .collect();
        if devices.is_empty() {
            return Err(AdminError::Conflict(format!(
                "job {id} has no failed, rejected or aborted device to retry"
            )));
        }
        let mut options = j.options.clone();
        self.new_window(&mut options, window)?;
        let new = NewJob {
            kind: j.kind.clone(),
            image: j.image,
            options,
            selector: "list".into(),
            devices,
            note: Some(format!("retry of job {id}")),
        };
        self.insert_job(by, "job.retry", &new, None)
    }

    fn new_window(&self, options: &mut JobOptions, req: &JobRequest) -> Result<()> {
        let now = now();
        let tz = window::zone(req.tz.as_deref())?;
        options.at = req
            .at
            .as_deref()
            .map(|s| window::parse_time(s, &tz, now))
            .transpose()?;
        options.until = req
            .until
            .as_deref()
            .map(|s| window::parse_time(s, &tz, now))
            .transpose()?;
        window::check(options.at, options.until, now)?;
        Ok(())
    }

    /// Seed 003's Rollback: on each device the job changed, deploy the image that was there
    /// before (recorded when the task was sent), as new jobs (one per previous image).
    /// Devices without a known previous image, or whose previous image is no longer
    /// registered, are named in the error of each skipped group.
    pub fn rollback_job(
        &self,
        by: &Actor,
        id: u64,
        window: &JobRequest,
    ) -> Result<(Vec<JobCreated>, Vec<String>)> {
        by.require(Role::Operator, "rolling jobs back")?;
        let (j, tasks) = self.job_rows(id)?;
        if j.kind != "deploy" {
            return Err(AdminError::Conflict(format!(
                "job {id} is a {} job: only deploy jobs roll back",
                j.kind
            )));
        }
        if j.options.after == crate::protocol::After::CopyOnly {
            return Err(AdminError::Conflict(format!(
                "job {id} only copied an image into backup locations: the devices still run what they ran, nothing to roll back"
            )));
        }
        // Seed 001 / issue 11: a device whose backup partition holds the previous image
        // (autogenic) is re-imaged from there (PI), without a download.
        let inventories: BTreeMap<u64, Option<CheckIn>> = self
            .store
            .devices()?
            .into_iter()
            .map(|d| (d.id, d.inventory))
            .collect();
        let mut skipped = Vec::new();
        let mut by_image: BTreeMap<(String, String, bool), Vec<u64>> = BTreeMap::new();
        for t in tasks.iter().filter(|t| t.state == TaskState::Succeeded) {
            let Some(p) = &t.prev_image else {
                skipped.push(format!("{}: no previous image recorded", t.mac));
                continue;
            };
            let local = match self.store.image(&p.name, Some(&p.version))? {
                Some(img) => crate::autogenic::rollback_from_backup(
                    inventories.get(&t.device).and_then(|i| i.as_ref()),
                    &img,
                ),
                None => false,
            };
            by_image
                .entry((p.name.clone(), p.version.clone(), local))
                .or_default()
                .push(t.device);
        }
        if by_image.is_empty() {
            return Err(AdminError::Conflict(format!(
                "job {id}: nothing to roll back (no device with a known previous image)"
            )));
        }
        let mut options = j.options.clone();
        options.backup_first = false;
        self.new_window(&mut options, window)?;
        let mut made = Vec::new();
        for ((name, version, local), devices) in by_image {
            let Some(img) = self.store.image(&name, Some(&version))? else {
                skipped.push(format!(
                    "image {name} {version} is no longer registered: register it again to roll {} device(s) back",
                    devices.len()
                ));
                continue;
            };
            let mut options = options.clone();
            options.from_backup = local;
            options.fetch_to_backup = false;
            options.backup_only = false;
            let new = NewJob {
                kind: "deploy".into(),
                image: Some(img.id),
                options,
                selector: "list".into(),
                devices,
                note: Some(if local {
                    format!("rollback of job {id} from the backup partition")
                } else {
                    format!("rollback of job {id}")
                }),
            };
            made.push(self.insert_job(by, "job.rollback", &new, None)?);
        }
        Ok((made, skipped))
    }
}

/// A repository error: a conflict or a missing thing keeps its kind (409 / 404 in the API);
/// anything else is the image's or the request's fault.
fn repo_error(e: anyhow::Error) -> AdminError {
    let msg = format!("{e:#}");
    match e.chain().find_map(|c| c.downcast_ref::<StoreError>()) {
        Some(StoreError::Conflict(_)) => AdminError::Conflict(msg),
        Some(StoreError::NotFound(_)) => AdminError::NotFound(msg),
        Some(StoreError::Db(_)) => AdminError::Other(e),
        _ if msg.contains("already registered") => AdminError::Conflict(msg),
        _ => AdminError::Invalid(msg),
    }
}

/// A device a job reaches now, with its last inventory (None: never checked in).
struct DeviceTarget {
    mac: String,
    inventory: Option<CheckIn>,
}

fn blocked(table: &[ValidationRow]) -> Vec<String> {
    table
        .iter()
        .filter(|r| r.status == "error")
        .map(|r| r.mac.clone())
        .collect()
}

/// The same validation the store applies when it creates the job's tasks
/// (`model::validate_deploy` / `validate_capture` against the last inventory).
fn validation_table(
    job: &NewJob,
    image: Option<&ImageRow>,
    targets: &[DeviceTarget],
) -> Vec<ValidationRow> {
    // The same validation the store runs when it makes the tasks (`model::validate_task`).
    let row = JobRow {
        id: 0,
        kind: job.kind.clone(),
        image: job.image,
        options: job.options.clone(),
        selector: job.selector.clone(),
        state: model::JobState::Active.as_str().into(),
        created: 0,
        note: None,
    };
    targets
        .iter()
        .map(|t| {
            let v = model::validate_task(&row, image, t.inventory.as_ref());
            ValidationRow::new(t.mac.clone(), &v)
        })
        .collect()
}

/// The validation table of a job's store answer.
fn rows(report: &[(String, Validation)]) -> Vec<ValidationRow> {
    report
        .iter()
        .map(|(mac, v)| ValidationRow::new(mac.clone(), v))
        .collect()
}

/// An audit record for `target` if the store write answered true (it found the thing).
fn found_then(found: &dyn std::any::Any, target: String) -> Option<(String, String)> {
    found
        .downcast_ref::<bool>()
        .copied()
        .unwrap_or(false)
        .then(|| (target, String::new()))
}

/// The audit record of an image registration, from the store's (id, name, version).
fn image_added(added: &dyn std::any::Any, from: &str) -> Option<(String, String)> {
    let (id, name, version) = added.downcast_ref::<(u64, String, String)>()?;
    Some((format!("image:{id}"), format!("{name} {version} ({from})")))
}

fn job_image(j: &JobRow, images: &BTreeMap<u64, ImageRow>) -> Option<String> {
    let how = crate::autogenic::short_words(&j.options)
        .map(|w| format!(" ({w})"))
        .unwrap_or_default();
    match j.image {
        Some(id) => Some(
            images
                .get(&id)
                .map(|i| format!("{} {}{how}", i.name, i.version))
                .unwrap_or_else(|| format!("#{id}{how}")),
        ),
        None => match (&j.options.capture_name, &j.options.capture_version) {
            (Some(n), Some(v)) => Some(format!("-> {n} {v}")),
            _ => None,
        },
    }
}

/// A job for fixed devices whose tasks all ended is shown as done (or done with errors);
/// jobs for all devices or a group stay active for devices that enrol later.
pub fn shown_state(j: &JobRow, tasks: &[TaskRow]) -> String {
    let fixed = j.selector.starts_with("mac:") || j.selector == "list";
    if j.state == "active" && fixed && !tasks.is_empty() && tasks.iter().all(|t| t.state.is_final())
    {
        if tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            "done".into()
        } else {
            "done with errors".into()
        }
    } else {
        j.state.clone()
    }
}

#[cfg(test)]
mod tests;
