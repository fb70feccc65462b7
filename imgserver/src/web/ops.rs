//! What the console asks of the server: reads and the administrator's operations, as
//! thin calls into the admin core, so the console and the admin API share one set of rules
//! (roles, validation, audit).

use std::fmt;

use axum::http::StatusCode;

use super::session::{Admin, Role, Signed};
use crate::api::AppState;
use crate::model::Validation;
use crate::store::{DeviceRow, ImageRow, JobRow, StoreError, TaskRow};

/// Why an operation was refused, with the way out.
#[derive(Debug)]
pub enum OpError {
    Forbidden(String),
    NotFound(String),
    Invalid(String),
    Conflict(String),
    Internal(String),
}

impl OpError {
    pub fn status(&self) -> StatusCode {
        match self {
            OpError::Forbidden(_) => StatusCode::FORBIDDEN,
            OpError::NotFound(_) => StatusCode::NOT_FOUND,
            OpError::Invalid(_) => StatusCode::BAD_REQUEST,
            OpError::Conflict(_) => StatusCode::CONFLICT,
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
            | OpError::Internal(s) => f.write_str(s),
        }
    }
}

impl From<StoreError> for OpError {
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::NotFound(s) => OpError::NotFound(s),
            StoreError::Conflict(s) => OpError::Conflict(s),
            StoreError::Invalid(s) => OpError::Invalid(s),
            e => OpError::Internal(e.to_string()),
        }
    }
}

/// The new-job form as posted (text as typed; [`JobForm::from_fields`]).
#[derive(Debug, Clone, Default)]
pub struct JobForm {
    pub kind: String,
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
    /// `datetime-local` values (`2026-11-29T22:00`) in the browser's zone.
    pub at: String,
    pub until: String,
    /// The browser's offset from UTC in minutes, as `Date.getTimezoneOffset()` gives it
    /// (UTC minus local); empty without the script: the times are UTC.
    pub tz_offset: String,
    pub note: String,
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
            tz_offset: get("tz_offset"),
            note: get("note"),
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

    /// A `datetime-local` value in the browser's zone as Unix seconds (None: empty).
    pub fn time(&self, v: &str, what: &str) -> Result<Option<u64>, OpError> {
        if v.is_empty() {
            return Ok(None);
        }
        let bad = || {
            OpError::Invalid(format!(
                "{what} {v:?} is not a date and time (YYYY-MM-DDTHH:MM)"
            ))
        };
        let (date, clock) = v.split_once('T').ok_or_else(bad)?;
        let d: Vec<&str> = date.split('-').collect();
        let c: Vec<&str> = clock.split(':').collect();
        if d.len() != 3 || !(2..=3).contains(&c.len()) {
            return Err(bad());
        }
        let num = |s: &str| s.parse::<i64>().map_err(|_| bad());
        let (y, mo, da) = (num(d[0])?, num(d[1])?, num(d[2])?);
        let (h, mi) = (num(c[0])?, num(c[1])?);
        let s = if c.len() == 3 {
            num(c[2].split('.').next().unwrap_or("0"))?
        } else {
            0
        };
        if !(1970..=9999).contains(&y)
            || !(1..=12).contains(&mo)
            || !(1..=31).contains(&da)
            || !(0..24).contains(&h)
            || !(0..60).contains(&mi)
            || !(0..60).contains(&s)
        {
            return Err(bad());
        }
        let days = days_from_civil(y, mo as u32, da as u32);
        let offset_min: i64 = if self.tz_offset.is_empty() {
            0
        } else {
            self.tz_offset
                .parse::<i64>()
                .ok()
                .filter(|o| o.abs() <= 14 * 60)
                .ok_or_else(|| {
                    OpError::Invalid(
                        "the browser's time zone offset is not a number of minutes".into(),
                    )
                })?
        };
        let t = days * 86_400 + h * 3600 + mi * 60 + s + offset_min * 60;
        u64::try_from(t).map(Some).map_err(|_| bad())
    }
}

/// Days since 1970-01-01 of a proleptic Gregorian date (the inverse of
/// `tls::civil_from_days`).
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

// ---------------------------------------------------------------------------------------
// Authentication

/// The administrator behind an admin token (None: unknown, revoked, or not an admin token).
pub fn authenticate(_st: &AppState, _token: &str) -> Option<Admin> {
    None
}

/// Is the token with this hash still valid, and with which role now?
pub fn token_still_valid(_st: &AppState, _hash: &str) -> Option<Role> {
    None
}

fn need(who: &Signed, role: Role) -> Result<(), OpError> {
    if who.role >= role {
        Ok(())
    } else {
        Err(OpError::Forbidden(format!(
            "your role ({}) may not do this: it needs {}",
            who.role.as_str(),
            role.as_str()
        )))
    }
}

// ---------------------------------------------------------------------------------------
// Reads

pub fn devices(st: &AppState) -> Result<Vec<DeviceRow>, OpError> {
    Ok(st.store.devices()?)
}

pub fn device(st: &AppState, mac: &str) -> Result<DeviceRow, OpError> {
    let m = crate::protocol::normalize_mac(mac)
        .ok_or_else(|| OpError::NotFound(format!("{mac:?} is not a MAC address")))?;
    st.store
        .device(&m)?
        .ok_or_else(|| OpError::NotFound(format!("no device {m}: it has not checked in")))
}

pub fn transcript(st: &AppState, mac: &str) -> Result<Vec<(u64, Option<u64>, String)>, OpError> {
    Ok(st.store.transcript(mac, None)?)
}

/// The tasks of one device, with their jobs, oldest first.
pub fn device_tasks(st: &AppState, device: u64) -> Result<Vec<(JobRow, TaskRow)>, OpError> {
    let mut out = Vec::new();
    for (j, tasks) in st.store.jobs()? {
        for t in tasks {
            if t.device == device {
                out.push((j.clone(), t));
            }
        }
    }
    out.sort_by_key(|(_, t)| t.id);
    Ok(out)
}

pub fn images(st: &AppState) -> Result<Vec<ImageRow>, OpError> {
    Ok(st.store.images()?)
}

pub fn jobs(st: &AppState) -> Result<Vec<(JobRow, Vec<TaskRow>)>, OpError> {
    Ok(st.store.jobs()?)
}

pub fn job(st: &AppState, id: u64) -> Result<(JobRow, Vec<TaskRow>), OpError> {
    st.store
        .job(id)?
        .ok_or_else(|| OpError::NotFound(format!("no job {id}")))
}

// ---------------------------------------------------------------------------------------
// Changes

pub fn set_operational(_st: &AppState, who: &Signed, _mac: &str) -> Result<(), OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn remove_image(_st: &AppState, who: &Signed, _id: u64) -> Result<(), OpError> {
    need(who, Role::Admin)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn validate(
    _st: &AppState,
    who: &Signed,
    _f: &JobForm,
) -> Result<Vec<(String, Validation)>, OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn create_job(_st: &AppState, who: &Signed, _f: &JobForm) -> Result<u64, OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn abort(_st: &AppState, who: &Signed, _id: u64) -> Result<(), OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn retry(_st: &AppState, who: &Signed, _id: u64) -> Result<u64, OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

pub fn rollback(_st: &AppState, who: &Signed, _id: u64) -> Result<u64, OpError> {
    need(who, Role::Operator)?;
    Err(OpError::Internal("not wired to the admin core yet".into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browser_times_become_utc_seconds() {
        let mut f = JobForm::default();
        assert_eq!(f.time("", "start").unwrap(), None);
        assert_eq!(f.time("1970-01-02T00:00", "start").unwrap(), Some(86_400));
        // Tokyo: getTimezoneOffset() is -540; 09:00 there is 00:00 UTC.
        f.tz_offset = "-540".into();
        assert_eq!(f.time("1970-01-02T09:00", "start").unwrap(), Some(86_400));
        for bad in [
            "tomorrow",
            "2026-13-01T00:00",
            "2026-01-01T25:00",
            "2026-01-01",
        ] {
            assert!(f.time(bad, "start").is_err(), "{bad}");
        }
        f.tz_offset = "x".into();
        assert!(f.time("2026-01-01T00:00", "start").is_err());
        assert_eq!(days_from_civil(2026, 11, 29), 20_786);
    }

    #[test]
    fn mac_lists_are_normalized_and_bad_ones_named() {
        let f = JobForm {
            macs: "52:54:00:00:00:0A, 52-54-00-00-00-0b\n52:54:00:00:00:0a".into(),
            ..JobForm::default()
        };
        assert_eq!(
            f.mac_list().unwrap(),
            vec!["52:54:00:00:00:0a", "52:54:00:00:00:0b"]
        );
        let f = JobForm {
            macs: "52:54:00:00:00:0a nonsense".into(),
            ..JobForm::default()
        };
        assert!(f.mac_list().unwrap_err().to_string().contains("nonsense"));
    }
}
