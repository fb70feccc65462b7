//! What the console asks of the server: thin calls into the admin core
//! ([`crate::admin::Admin`]), so the console, the admin API and the CLI share one set of
//! rules: the same roles (checked again by the core whatever the page showed), the same
//! validation, the same audit trail with the signed-in administrator as "changed by".

use std::fmt;
use std::sync::{Arc, OnceLock};

use axum::http::StatusCode;

use super::session::{Sessions, Signed};
use crate::admin::db::AdminDb;
use crate::admin::{
    Actor, Admin, AdminError, DeviceDetail, DeviceFilter, DeviceSummary, JobCreated, JobDetail,
    JobRequest, JobSummary, Role, TranscriptLine, ValidationRow,
};
use crate::api::AppState;
use crate::model::{JobOptions, OnError};
use crate::protocol::After;
use crate::store::ImageRow;

/// The console's state beside the server's: its sessions and the admin core.
#[derive(Default)]
pub struct Console {
    pub sessions: Sessions,
    core: OnceLock<Arc<Admin>>,
    tokens: OnceLock<Arc<AdminDb>>,
}

impl Console {
    /// The admin core over the server's store (its tables are in the same database file,
    /// beside the repository directory).
    pub fn core(&self, st: &AppState) -> Result<Arc<Admin>, OpError> {
        if let Some(a) = self.core.get() {
            return Ok(a.clone());
        }
        let a = Arc::new(
            Admin::open(data_dir(st), st.store.clone(), st.policy.reload_wait)
                .map_err(OpError::from)?,
        );
        Ok(self.core.get_or_init(|| a).clone())
    }

    fn tokens(&self, st: &AppState) -> Result<Arc<AdminDb>, OpError> {
        if let Some(a) = self.tokens.get() {
            return Ok(a.clone());
        }
        let db =
            Arc::new(AdminDb::open(&data_dir(st).join("imgserver.db")).map_err(OpError::from)?);
        Ok(self.tokens.get_or_init(|| db).clone())
    }
}

/// The server's data directory: the repository is `DATA/repo`.
fn data_dir(st: &AppState) -> &std::path::Path {
    st.repo.parent().unwrap_or(std::path::Path::new("."))
}

/// Why an operation was refused, with the way out.
#[derive(Debug)]
pub enum OpError {
    Forbidden(String),
    NotFound(String),
    Invalid(String),
    Conflict(String),
    /// Every device has validation errors: nothing was created (the table says why).
    Blocked(String, Vec<ValidationRow>),
    Internal(String),
}

impl OpError {
    pub fn status(&self) -> StatusCode {
        match self {
            OpError::Forbidden(_) => StatusCode::FORBIDDEN,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Conflict(_) | OpError::Blocked(..) => StatusCode::CONFLICT,
            OpError::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }
}

impl fmt::Display for OpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpError::Forbidden(s)
            | OpError::NotFound(s)
            | OpError::Invalid(s)
            | OpError::Conflict(s)
            | OpError::Blocked(s, _)
            | OpError::Internal(s) => f.write_str(s),
        }
    }
}

impl From<AdminError> for OpError {
    fn from(e: AdminError) -> Self {
        match e {
            AdminError::Unauthorized(s) | AdminError::Forbidden(s) => OpError::Forbidden(s),
            AdminError::NotFound(s) => OpError::NotFound(s),
            AdminError::Conflict(s) => OpError::Conflict(s),
            AdminError::Invalid(s) => OpError::Invalid(s),
            AdminError::Blocked(s, t) => OpError::Blocked(s, t),
            AdminError::Store(crate::store::StoreError::NotFound(s)) => OpError::NotFound(s),
            AdminError::Store(crate::store::StoreError::Conflict(s)) => OpError::Conflict(s),
            AdminError::Store(crate::store::StoreError::Invalid(s)) => OpError::Invalid(s),
            AdminError::Other(e) => OpError::Invalid(format!("{e:#}")),
            e => OpError::Internal(e.to_string()),
        }
    }
}

/// The actor the core records: the token's name and its role as of this request.
pub(crate) fn actor(who: &Signed) -> Actor {
    Actor {
        name: who.name.clone(),
        role: who.role,
    }
}

/// The new-job form as posted (text as typed; [`JobForm::from_fields`]).
#[derive(Debug, Clone, Default)]
pub struct JobForm {
    pub kind: String,
    /// The image's id.
    pub image: String,
    /// `macs`, `group` or `all`.
    pub target: String,
    pub macs: String,
    pub group: String,
    pub partition: String,
    pub disk: String,
    pub preserve: String,
    pub backup_first: bool,
    pub after: String,
    pub on_error: String,
    pub batch: String,
    pub capture_name: String,
    pub capture_version: String,
    /// `datetime-local` values (`2026-11-29T22:00`) in `tz`.
    pub at: String,
    pub until: String,
    /// The browser's IANA time zone (set by the console's script); empty: the server's.
    pub tz: String,
    pub note: String,
    /// Seed 001: BI (download to the backup partition) and PI (image from it); both: BI
    /// then PI. `backup_size` for a conversion (`kind` convert), as `--backup-size`.
    pub backup_only: bool,
    pub from_backup: bool,
    pub backup_size: String,
}

impl JobForm {
    pub fn from_fields(fields: &[(String, String)]) -> JobForm {
        let get = |k: &str| {
            fields
                .iter()
                .find(|(n, _)| n == k)
                .map(|(_, v)| v.trim().to_string())
                .unwrap_or_default()
        };
        JobForm {
            kind: get("kind"),
            image: get("image"),
            target: get("target"),
            macs: get("macs"),
            group: get("group"),
            partition: get("partition"),
            disk: get("disk"),
            preserve: get("preserve"),
            backup_first: fields.iter().any(|(n, _)| n == "backup_first"),
            after: get("after"),
            on_error: get("on_error"),
            batch: get("batch"),
            capture_name: get("capture_name"),
            capture_version: get("capture_version"),
            at: get("at"),
            until: get("until"),
            tz: get("tz"),
            note: get("note"),
            backup_only: fields.iter().any(|(n, _)| n == "backup_only"),
            from_backup: fields.iter().any(|(n, _)| n == "from_backup"),
            backup_size: get("backup_size"),
        }
    }

    /// The MACs typed into the form, normalized; a bad one is named.
    pub fn mac_list(&self) -> Result<Vec<String>, OpError> {
        let mut out = Vec::new();
        for m in self
            .macs
            .split(|c: char| c.is_whitespace() || c == ',' || c == ';')
            .filter(|s| !s.is_empty())
        {
            match crate::protocol::normalize_mac(m) {
                Some(n) => {
                    if !out.contains(&n) {
                        out.push(n)
                    }
                }
                None => {
                    return Err(OpError::Invalid(format!(
                        "{m:?} is not a MAC address (write aa:bb:cc:dd:ee:ff)"
                    )))
                }
            }
        }
        Ok(out)
    }

    /// The admin core's job request for this form.
    pub fn request(&self) -> Result<JobRequest, OpError> {
        let target =
            match self.target.as_str() {
                "group" if !self.group.is_empty() => format!("group:{}", self.group),
                "group" => return Err(OpError::Invalid("choose a group".into())),
                "all" => "all".into(),
                _ => {
                    let macs = self.mac_list()?;
                    match macs.len() {
                        0 => return Err(OpError::Invalid(
                            "name at least one device (its MAC), or choose a group or all devices"
                                .into(),
                        )),
                        1 => format!("mac:{}", macs[0]),
                        _ => format!("macs:{}", macs.join(",")),
                    }
                }
            };
        let after = match self.after.as_str() {
            "" => After::Reboot,
            a => After::parse(a).ok_or_else(|| {
                OpError::Invalid(format!("afterwards {a:?}: reboot, no-reboot or copy-only"))
            })?,
        };
        let on_error = match self.on_error.as_str() {
            "" | "stop" => OnError::Stop,
            "continue" => OnError::Continue,
            o => {
                return Err(OpError::Invalid(format!(
                    "on error {o:?}: stop or continue"
                )))
            }
        };
        let batch = if self.batch.is_empty() {
            0
        } else {
            self.batch.parse::<u32>().map_err(|_| {
                OpError::Invalid(format!(
                    "devices at a time {:?}: a whole number (0: all at once)",
                    self.batch
                ))
            })?
        };
        let none_if_empty = |s: &str| (!s.is_empty()).then(|| s.to_string());
        let mut options = JobOptions {
            partition: none_if_empty(&self.partition),
            disk: none_if_empty(&self.disk),
            preserve: self
                .preserve
                .split([',', ' '])
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect(),
            backup_first: self.backup_first,
            after,
            on_error,
            batch,
            ..JobOptions::default()
        };
        // Seed 001, as `schedule add --backup-only / --from-backup / --backup-size`; the
        // core refuses the combinations that make no sense.
        match (self.backup_only, self.from_backup) {
            (true, true) => {
                options.from_backup = true;
                options.fetch_to_backup = true;
            }
            (true, false) => {
                options.backup_only = true;
                options.after = After::CopyOnly;
            }
            (false, true) => options.from_backup = true,
            (false, false) => {}
        }
        if !self.backup_size.is_empty() {
            options.backup_size = Some(
                crate::cli::size("backup partition size", &self.backup_size)
                    .map_err(|e| OpError::Invalid(e.to_string()))?,
            );
        }
        let capture = (self.kind == "capture").then(|| {
            format!(
                "{}:{}",
                self.capture_name.trim(),
                self.capture_version.trim()
            )
        });
        // datetime-local writes `2026-11-29T22:00`; the core reads `2026-11-29 22:00` in tz.
        let when = |s: &str| none_if_empty(&s.replace('T', " "));
        Ok(JobRequest {
            target,
            kind: self.kind.clone(),
            image: (self.kind == "deploy" || self.kind == "convert")
                .then(|| none_if_empty(&self.image))
                .flatten(),
            capture,
            options,
            at: when(&self.at),
            until: when(&self.until),
            tz: none_if_empty(&self.tz),
            note: none_if_empty(&self.note),
            validate_only: false,
        })
    }
}

// ---------------------------------------------------------------------------------------
// Authentication

/// The administrator behind an admin token (None: unknown, revoked, or not an admin token,
/// such as a device credential).
pub fn authenticate(c: &Console, st: &AppState, token: &str) -> Option<super::session::SignIn> {
    let a = c.core(st).ok()?.authenticate(token).ok()?;
    Some(super::session::SignIn {
        name: a.name,
        role: a.role,
        token_hash: crate::api::hash_secret(token.trim()),
    })
}

/// Is the token with this hash still valid, and with which role now?
pub fn token_still_valid(c: &Console, st: &AppState, hash: &str) -> Option<Role> {
    c.tokens(st)
        .ok()?
        .token_by_hash(hash, crate::api::now())
        .ok()
        .flatten()
        .map(|(_, role)| role)
}

// ---------------------------------------------------------------------------------------
// Reads

pub fn devices(
    c: &Console,
    st: &AppState,
    who: &Signed,
    f: &DeviceFilter,
) -> Result<Vec<DeviceSummary>, OpError> {
    Ok(c.core(st)?.devices(&actor(who), f)?)
}

pub fn device(
    c: &Console,
    st: &AppState,
    who: &Signed,
    mac: &str,
) -> Result<(DeviceDetail, Vec<TranscriptLine>), OpError> {
    let core = c.core(st)?;
    let d = core.device(&actor(who), mac)?;
    let t = core.transcript(&actor(who), &d.summary.mac, None)?;
    Ok((d, t))
}

pub fn images(c: &Console, st: &AppState, who: &Signed) -> Result<Vec<ImageRow>, OpError> {
    Ok(c.core(st)?.images(&actor(who))?)
}

pub fn jobs(c: &Console, st: &AppState, who: &Signed) -> Result<Vec<JobSummary>, OpError> {
    Ok(c.core(st)?.jobs(&actor(who))?)
}

pub fn job(c: &Console, st: &AppState, who: &Signed, id: u64) -> Result<JobDetail, OpError> {
    Ok(c.core(st)?.job(&actor(who), id)?)
}

// ---------------------------------------------------------------------------------------
// Changes (each recorded by the core with the signed-in administrator)

pub fn set_operational(c: &Console, st: &AppState, who: &Signed, mac: &str) -> Result<(), OpError> {
    Ok(c.core(st)?.make_operational(&actor(who), mac)?)
}

pub fn remove_image(c: &Console, st: &AppState, who: &Signed, id: u64) -> Result<(), OpError> {
    c.core(st)?.remove_image(&actor(who), &id.to_string())?;
    Ok(())
}

/// Seed 003's validation table for the form's job; nothing is created.
pub fn validate(
    c: &Console,
    st: &AppState,
    who: &Signed,
    f: &JobForm,
) -> Result<Vec<ValidationRow>, OpError> {
    Ok(c.core(st)?.validate(&actor(who), &f.request()?)?)
}

pub fn create_job(
    c: &Console,
    st: &AppState,
    who: &Signed,
    f: &JobForm,
) -> Result<JobCreated, OpError> {
    Ok(c.core(st)?.create_job(&actor(who), &f.request()?)?)
}

pub fn abort(c: &Console, st: &AppState, who: &Signed, id: u64) -> Result<u64, OpError> {
    c.core(st)?.abort_job(&actor(who), id)?;
    Ok(id)
}

/// Retry: the new job's id.
pub fn retry(c: &Console, st: &AppState, who: &Signed, id: u64) -> Result<u64, OpError> {
    let made = c
        .core(st)?
        .retry_job(&actor(who), id, &JobRequest::default())?;
    made.job
        .ok_or_else(|| OpError::Internal("the retry created no job".into()))
}

/// Rollback: the first new job's id (one job per previous image), and what was skipped.
pub fn rollback(
    c: &Console,
    st: &AppState,
    who: &Signed,
    id: u64,
) -> Result<(u64, Vec<String>), OpError> {
    let (made, skipped) = c
        .core(st)?
        .rollback_job(&actor(who), id, &JobRequest::default())?;
    let first = made
        .iter()
        .find_map(|m| m.job)
        .ok_or_else(|| OpError::Conflict(format!("nothing rolled back: {}", skipped.join("; "))))?;
    Ok((first, skipped))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn form(pairs: &[(&str, &str)]) -> JobForm {
        JobForm::from_fields(
            &pairs
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>(),
        )
    }

    #[test]
    fn mac_lists_are_normalized_and_bad_ones_named() {
        let f = form(&[(
            "macs",
            "52:54:00:00:00:0A, 52-54-00-00-00-0b\n52:54:00:00:00:0a",
        )]);
        assert_eq!(
            f.mac_list().unwrap(),
            vec!["52:54:00:00:00:0a", "52:54:00:00:00:0b"]
        );
        let f = form(&[("macs", "52:54:00:00:00:0a nonsense")]);
        assert!(f.mac_list().unwrap_err().to_string().contains("nonsense"));
    }

    #[test]
    fn the_form_becomes_the_cores_request() {
        let r = form(&[
            ("kind", "deploy"),
            ("image", "3"),
            ("target", "macs"),
            ("macs", "52:54:00:00:00:0a 52:54:00:00:00:0b"),
            ("partition", "2"),
            ("preserve", "3, DATA"),
            ("after", "no-reboot"),
            ("on_error", "continue"),
            ("batch", "1"),
            ("at", "2026-11-29T22:00"),
            ("tz", "Asia/Tokyo"),
        ])
        .request()
        .unwrap();
        assert_eq!(r.target, "macs:52:54:00:00:00:0a,52:54:00:00:00:0b");
        assert_eq!(r.image.as_deref(), Some("3"));
        assert_eq!(r.options.partition.as_deref(), Some("2"));
        assert_eq!(r.options.preserve, vec!["3", "DATA"]);
        assert!(!r.options.backup_first, "an unticked box is off");
        assert_eq!(r.options.after, After::NoReboot);
        assert_eq!(r.options.on_error, OnError::Continue);
        assert_eq!(r.options.batch, 1);
        assert_eq!(r.at.as_deref(), Some("2026-11-29 22:00"));
        assert_eq!(r.until, None);
        assert_eq!(r.tz.as_deref(), Some("Asia/Tokyo"));
        let one = form(&[
            ("kind", "reboot"),
            ("target", "macs"),
            ("macs", "52:54:00:00:00:0a"),
        ]);
        assert_eq!(one.request().unwrap().target, "mac:52:54:00:00:00:0a");
        let g = form(&[("kind", "reboot"), ("target", "group"), ("group", "lab")]);
        assert_eq!(g.request().unwrap().target, "group:lab");
        // Seed 001's flags, as the CLI sets them.
        let f = |pairs: &[(&str, &str)]| {
            let mut all = vec![("kind", "deploy"), ("image", "3"), ("target", "all")];
            all.extend_from_slice(pairs);
            form(&all).request().unwrap()
        };
        let bi = f(&[("backup_only", "1")]).options;
        assert!(bi.backup_only && bi.after == After::CopyOnly && !bi.from_backup);
        let pi = f(&[("from_backup", "1")]).options;
        assert!(pi.from_backup && !pi.fetch_to_backup && pi.after == After::Reboot);
        let both = f(&[("backup_only", "1"), ("from_backup", "1")]).options;
        assert!(both.from_backup && both.fetch_to_backup && !both.backup_only);
        let conv = f(&[("kind", "convert"), ("backup_size", "1500M")]);
        assert_eq!(conv.image.as_deref(), Some("3"));
        assert_eq!(conv.options.backup_size, Some(1500 << 20));
        for bad in [
            form(&[("target", "all"), ("backup_size", "big")]),
            form(&[("kind", "reboot"), ("target", "macs")]),
            form(&[("kind", "reboot"), ("target", "group")]),
            form(&[("target", "all"), ("batch", "-1")]),
            form(&[("target", "all"), ("after", "explode")]),
        ] {
            assert!(bad.request().is_err(), "{bad:?}");
        }
    }
}
