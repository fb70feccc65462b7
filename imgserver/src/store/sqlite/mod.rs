//! The SQLite backend: [`SqliteStore`] and its queries, one file per concern.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension, Transaction};

use super::*;
use crate::model::{self, JobKind, JobState};

mod devices;
mod enrolment;
mod images;
mod jobs;
mod results;
mod schema;

/// The SQLite store: one connection behind a mutex (SQLite has one writer anyway; every
/// method is a short transaction).
pub struct SqliteStore {
    conn: Mutex<Connection>,
}

impl SqliteStore {
    pub fn open(path: &Path) -> Result<SqliteStore> {
        let conn = Connection::open(path)?;
        // First: the pragmas below take locks too, and another process (the server, an
        // admin command, a session's master thread) may hold one for a moment.
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        // WAL: readers (the admin command) never block the server; NORMAL sync is durable
        // across application crashes, which is what idempotent retries rely on.
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let store = SqliteStore {
            conn: Mutex::new(conn),
        };
        schema::migrate(&mut store.lock())?;
        Ok(store)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        // A panic while holding the lock leaves SQLite consistent (the transaction rolls
        // back on drop), so a poisoned mutex is safe to reuse.
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run `f` in one transaction, committed when it returns Ok (rolled back otherwise),
    /// with the audit record of [`with_audit`] if the caller set one.
    fn write<T: 'static>(&self, f: impl FnOnce(&Transaction) -> Result<T>) -> Result<T> {
        let hook = take_audit_hook();
        let mut conn = self.lock();
        // Immediate: the write lock is taken (waiting up to the busy timeout) before the
        // first read, so a write another process (the admin commands, a session's master
        // thread) committed meanwhile cannot fail the upgrade with "database is locked".
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let out = f(&tx)?;
        if let Some(entry) = hook.and_then(|h| h(&out)) {
            insert_audit(&tx, &entry)?;
        }
        tx.commit()?;
        Ok(out)
    }
}

/// Append a record to the audit trail (the admin core's `admin_audit` table).
pub fn insert_audit(conn: &Connection, e: &AuditEntry) -> rusqlite::Result<()> {
    conn.prepare_cached(
        "INSERT INTO admin_audit (at, actor, role, action, target, detail) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
    )?
    .execute(params![i(e.at), e.actor, e.role, e.action, e.target, e.detail])?;
    Ok(())
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

const DEVICE_COLS: &str = "id, mac, credential IS NOT NULL, grp, serial, model, ram_bytes, agent_version, state, state_reason, last_seen, trouble_since, image_name, image_version, inventory, approval, enrol_addr";

fn device_row(r: &rusqlite::Row) -> rusqlite::Result<DeviceRow> {
    let inv: Option<String> = r.get(14)?;
    let (name, version): (Option<String>, Option<String>) = (r.get(12)?, r.get(13)?);
    Ok(DeviceRow {
        id: u(r.get(0)?),
        mac: r.get(1)?,
        enrolled: r.get(2)?,
        group: r.get(3)?,
        serial: r.get(4)?,
        model: r.get(5)?,
        ram_bytes: u(r.get(6)?),
        agent_version: r.get(7)?,
        state: DeviceState::parse(&r.get::<_, String>(8)?),
        state_reason: r.get(9)?,
        last_seen: r.get::<_, Option<i64>>(10)?.map(u),
        trouble_since: r.get::<_, Option<i64>>(11)?.map(u),
        image: match (name, version) {
            (Some(name), Some(version)) => Some(ImageStamp { name, version }),
            _ => None,
        },
        inventory: inv.and_then(|s| serde_json::from_str(&s).ok()),
        pending: r.get::<_, Option<String>>(15)?.as_deref() == Some(model::APPROVAL_PENDING),
        enrol_addr: r.get(16)?,
    })
}

const IMAGE_COLS: &str =
    "id, name, version, file, url, size, facts, sealed, signed_by, description, added, captured_from, autogenic";

fn image_row(r: &rusqlite::Row) -> rusqlite::Result<ImageRow> {
    let facts: String = r.get(6)?;
    Ok(ImageRow {
        id: u(r.get(0)?),
        name: r.get(1)?,
        version: r.get(2)?,
        file: r.get(3)?,
        url: r.get(4)?,
        size: r.get::<_, Option<i64>>(5)?.map(u),
        facts: serde_json::from_str(&facts).unwrap_or_default(),
        sealed: r.get(7)?,
        signed_by: r.get(8)?,
        description: r.get(9)?,
        added: u(r.get(10)?),
        captured_from: r.get(11)?,
        autogenic: r.get(12)?,
    })
}

const JOB_COLS: &str = "id, kind, image_id, options, selector, state, created, note";

fn job_row(r: &rusqlite::Row) -> rusqlite::Result<JobRow> {
    let opts: String = r.get(3)?;
    Ok(JobRow {
        id: u(r.get(0)?),
        kind: r.get(1)?,
        image: r.get::<_, Option<i64>>(2)?.map(u),
        options: serde_json::from_str(&opts).unwrap_or_default(),
        selector: r.get(4)?,
        state: r.get(5)?,
        created: u(r.get(6)?),
        note: r.get(7)?,
    })
}

const TASK_COLS: &str = "t.id, t.job_id, t.device_id, d.mac, t.state, t.validation, t.progress, t.message, t.prev_image, t.created, t.sent_at, t.updated, t.finished, t.ignored_results";

fn task_row(r: &rusqlite::Row) -> rusqlite::Result<TaskRow> {
    let validation: String = r.get(5)?;
    let progress: Option<String> = r.get(6)?;
    let prev: Option<String> = r.get(8)?;
    Ok(TaskRow {
        id: u(r.get(0)?),
        job: u(r.get(1)?),
        device: u(r.get(2)?),
        mac: r.get(3)?,
        state: TaskState::parse(&r.get::<_, String>(4)?),
        validation: serde_json::from_str(&validation).unwrap_or_default(),
        progress: progress.and_then(|s| serde_json::from_str(&s).ok()),
        message: r.get(7)?,
        prev_image: prev.and_then(|s| serde_json::from_str(&s).ok()),
        created: u(r.get(9)?),
        sent_at: r.get::<_, Option<i64>>(10)?.map(u),
        updated: u(r.get(11)?),
        finished: r.get::<_, Option<i64>>(12)?.map(u),
        ignored_results: u(r.get(13)?),
    })
}

fn transcript(
    tx: &Transaction,
    device: u64,
    task: Option<u64>,
    now: u64,
    line: &str,
) -> Result<()> {
    tx.prepare_cached(
        "INSERT INTO transcript (device_id, task_id, at, line) VALUES (?1, ?2, ?3, ?4)",
    )?
    .execute(params![i(device), task.map(i), i(now), line])?;
    Ok(())
}

fn load_task(tx: &Connection, id: u64) -> Result<Option<TaskRow>> {
    Ok(tx
        .prepare_cached(&format!(
            "SELECT {TASK_COLS} FROM tasks t JOIN devices d ON d.id = t.device_id WHERE t.id = ?1"
        ))?
        .query_row([i(id)], task_row)
        .optional()?)
}

fn load_job(tx: &Connection, id: u64) -> Result<Option<JobRow>> {
    Ok(tx
        .prepare_cached(&format!("SELECT {JOB_COLS} FROM jobs WHERE id = ?1"))?
        .query_row([i(id)], job_row)
        .optional()?)
}

fn load_image(tx: &Connection, id: u64) -> Result<Option<ImageRow>> {
    Ok(tx
        .prepare_cached(&format!("SELECT {IMAGE_COLS} FROM images WHERE id = ?1"))?
        .query_row([i(id)], image_row)
        .optional()?)
}

fn load_device(tx: &Connection, id: u64) -> Result<Option<DeviceRow>> {
    Ok(tx
        .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE id = ?1"))?
        .query_row([i(id)], device_row)
        .optional()?)
}

/// Stop a job (on error: stop) and abort its tasks not started.
fn stop_job(tx: &Transaction, job: u64, now: u64) -> Result<()> {
    tx.execute(
        "UPDATE jobs SET state = ?2 WHERE id = ?1",
        params![i(job), JobState::Stopped.as_str()],
    )?;
    abort_pending(tx, job, model::STOPPED_BY_ERROR, now)?;
    Ok(())
}

/// Abort the job's tasks not started; how many.
fn abort_pending(tx: &Transaction, job: u64, message: &str, now: u64) -> Result<usize> {
    Ok(tx.execute(
        "UPDATE tasks SET state = ?3, message = ?4, updated = ?2, finished = ?2
         WHERE job_id = ?1 AND state = ?5",
        params![
            i(job),
            i(now),
            TaskState::Aborted.as_str(),
            message,
            TaskState::Pending.as_str()
        ],
    )?)
}

/// Set a device's state and reason unless it is in Maintenance (only the administrator
/// takes a device out of Maintenance).
fn set_state_unless_maintenance(
    tx: &Transaction,
    device: u64,
    (state, reason): &(DeviceState, String),
    clear_trouble: bool,
) -> Result<()> {
    tx.execute(
        "UPDATE devices SET state = ?2, state_reason = ?3,
            trouble_since = CASE WHEN ?4 THEN NULL ELSE trouble_since END
         WHERE id = ?1 AND state != ?5",
        params![
            i(device),
            state.as_str(),
            reason,
            clear_trouble,
            DeviceState::Maintenance.as_str()
        ],
    )?;
    Ok(())
}

impl Store for SqliteStore {
    fn checkin(
        &self,
        req: &CheckIn,
        secrets: &CheckInSecrets,
        now: u64,
        policy: &Policy,
    ) -> Result<CheckInDecision> {
        self.write(|tx| enrolment::checkin(tx, req, secrets, now, policy))
    }

    fn device_by_credential(&self, hash: &str) -> Result<Option<DeviceRow>> {
        enrolment::device_by_credential(&self.lock(), hash)
    }

    fn task_of_device(
        &self,
        device: u64,
        task: u64,
    ) -> Result<Option<(TaskRow, JobRow, Option<ImageRow>)>> {
        jobs::task_of_device(&self.lock(), device, task)
    }

    fn record_progress(
        &self,
        device: u64,
        task: u64,
        p: &ProgressReport,
        now: u64,
    ) -> Result<(bool, bool)> {
        self.write(|tx| results::record_progress(tx, device, task, p, now))
    }

    fn record_result(&self, device: u64, r: &TaskResult, now: u64) -> Result<bool> {
        self.write(|tx| results::record_result(tx, device, r, now))
    }

    fn take_upload_key(&self, task: u64, key_hash: &str) -> Result<Option<(TaskRow, JobRow)>> {
        jobs::take_upload_key(&self.lock(), task, key_hash)
    }

    fn boot_work(&self, mac: &str) -> Result<BootWork> {
        jobs::boot_work(&self.lock(), mac)
    }

    fn device_may_fetch(&self, device: u64, file: &str) -> Result<bool> {
        jobs::device_may_fetch(&self.lock(), device, file)
    }

    fn add_image(&self, img: &ImageRow) -> Result<u64> {
        // The audit hook sees the new id with the image's name and version.
        self.write(|tx| {
            let id = images::add_image(tx, img)?;
            Ok((id, img.name.clone(), img.version.clone()))
        })
        .map(|(id, ..)| id)
    }

    fn images(&self) -> Result<Vec<ImageRow>> {
        images::images(&self.lock())
    }

    fn image(&self, name: &str, version: Option<&str>) -> Result<Option<ImageRow>> {
        images::image(&self.lock(), name, version)
    }

    fn image_by_id(&self, id: u64) -> Result<Option<ImageRow>> {
        images::image_by_id(&self.lock(), id)
    }

    fn remove_image(&self, id: u64) -> Result<()> {
        self.write(|tx| images::remove_image(tx, id))
    }

    fn set_image_signature(
        &self,
        id: u64,
        signed_by: Option<&str>,
        sealed: bool,
        size: Option<u64>,
    ) -> Result<()> {
        images::set_image_signature(&self.lock(), id, signed_by, sealed, size)
    }

    fn add_job(&self, job: &NewJob, now: u64) -> Result<(u64, Vec<(String, Validation)>)> {
        self.write(|tx| jobs::add_job(tx, job, now))
    }

    fn remove_job(&self, id: u64) -> Result<()> {
        self.write(|tx| jobs::remove_job(tx, id))
    }

    fn abort_job(&self, id: u64, now: u64) -> Result<usize> {
        self.write(|tx| jobs::abort_job(tx, id, now))
    }

    fn jobs(&self) -> Result<Vec<(JobRow, Vec<TaskRow>)>> {
        jobs::jobs(&self.lock())
    }

    fn job(&self, id: u64) -> Result<Option<(JobRow, Vec<TaskRow>)>> {
        jobs::job(&self.lock(), id)
    }

    fn devices(&self) -> Result<Vec<DeviceRow>> {
        devices::devices(&self.lock())
    }

    fn device(&self, mac: &str) -> Result<Option<DeviceRow>> {
        devices::device(&self.lock(), mac)
    }

    fn set_device_state(&self, mac: &str, state: DeviceState, reason: Option<&str>) -> Result<()> {
        self.write(|tx| devices::set_device_state(tx, mac, state, reason))
    }

    fn set_group(&self, mac: &str, group: Option<&str>) -> Result<()> {
        self.write(|tx| devices::set_group(tx, mac, group))
    }

    fn forget(&self, mac: &str) -> Result<bool> {
        self.write(|tx| devices::forget(tx, mac))
    }

    fn approve(&self, mac: &str, now: u64) -> Result<bool> {
        self.write(|tx| enrolment::approve(tx, mac, now))
    }

    fn transcript(&self, mac: &str, task: Option<u64>) -> Result<Vec<(u64, Option<u64>, String)>> {
        results::transcript_lines(&self.lock(), mac, task)
    }

    fn result_count(&self) -> Result<u64> {
        results::result_count(&self.lock())
    }
}
