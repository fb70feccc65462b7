//! Jobs and their tasks: scheduling, the next task of a device, PXE boot work, uploads.

use super::*;

pub(super) fn task_of_device(
    conn: &Connection,
    device: u64,
    task: u64,
) -> Result<Option<(TaskRow, JobRow, Option<ImageRow>)>> {
    let Some(t) = load_task(conn, task)?.filter(|t| t.device == device) else {
        return Ok(None);
    };
    let job = load_job(conn, t.job)?.ok_or_else(|| StoreError::NotFound("job gone".into()))?;
    let image = match job.image {
        Some(img) => load_image(conn, img)?,
        None => None,
    };
    Ok(Some((t, job, image)))
}

pub(super) fn take_upload_key(
    conn: &Connection,
    task: u64,
    key_hash: &str,
) -> Result<Option<(TaskRow, JobRow)>> {
    // One statement: the key is checked and spent atomically (SQLite serializes
    // writers), so two uploads racing with the same key cannot both pass.
    let ok: Option<i64> = conn
        .query_row(
            "UPDATE tasks SET upload_key = NULL WHERE id = ?1 AND upload_key = ?2 AND state IN ('sent', 'running')
             AND job_id IN (SELECT id FROM jobs WHERE kind = 'capture') RETURNING id",
            params![i(task), key_hash],
            |r| r.get(0),
        )
        .optional()?;
    if ok.is_none() {
        return Ok(None);
    }
    let t = load_task(conn, task)?.expect("task row");
    let job = load_job(conn, t.job)?.ok_or_else(|| StoreError::NotFound("job gone".into()))?;
    Ok(Some((t, job)))
}

pub(super) fn boot_work(conn: &Connection, mac: &str) -> Result<BootWork> {
    let Some((device, group, pending)) = conn
        .query_row(
            "SELECT id, grp, approval IS 'pending' FROM devices WHERE mac = ?1",
            [mac],
            |r| {
                Ok((
                    u(r.get(0)?),
                    r.get::<_, Option<String>>(1)?,
                    r.get::<_, bool>(2)?,
                ))
            },
        )
        .optional()?
    else {
        return Ok(BootWork::Unknown);
    };
    // An enrolment waiting for the administrator's approval gets no task at check-in, so
    // there is nothing to boot the agent for until `imgserver approve`.
    if pending {
        return Ok(BootWork::Idle);
    }
    // A task handed out and not finished is resent at check-in (resume after a reboot).
    let unfinished: Option<(i64, i64)> = conn
        .query_row("SELECT id, job_id FROM tasks WHERE device_id = ?1 AND state IN ('sent', 'running') ORDER BY id LIMIT 1", [i(device)], |r| Ok((r.get(0)?, r.get(1)?)))
        .optional()?;
    if let Some((t, j)) = unfinished {
        return Ok(BootWork::Work(format!("task {t} of job {j} unfinished")));
    }
    let dev =
        load_device(conn, device)?.ok_or_else(|| StoreError::NotFound("device gone".into()))?;
    // Pending tasks, then all/group jobs that would reach it at check-in (next_task's
    // order), each under the batch rule as next_task applies it.
    let mut candidates: Vec<(u64, Option<u64>)> = conn
        .prepare_cached("SELECT t.job_id, t.id FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.device_id = ?1 AND t.state = 'pending' AND j.state = 'active' ORDER BY t.id")?
        .query_map([i(device)], |r| Ok((u(r.get(0)?), Some(u(r.get(1)?)))))?
        .collect::<rusqlite::Result<_>>()?;
    let reaching: Vec<(u64, Option<u64>)> = conn
        .prepare_cached("SELECT j.id FROM jobs j WHERE j.state = 'active' AND (j.selector = 'all' OR (?2 IS NOT NULL AND j.selector = 'group:' || ?2)) AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.device_id = ?1) ORDER BY j.id")?
        .query_map(params![i(device), group], |r| Ok((u(r.get(0)?), None)))?
        .collect::<rusqlite::Result<_>>()?;
    candidates.extend(reaching);
    for (job_id, task) in candidates {
        let Some(job) = load_job(conn, job_id)? else {
            continue;
        };
        let states: Vec<(i64, String)> = conn
            .prepare_cached("SELECT id, state FROM tasks WHERE job_id = ?1 ORDER BY id")?
            .query_map([i(job_id)], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        // A task not made yet would be the job's last.
        let pos = match task {
            Some(t) => states.iter().position(|(id, _)| u(*id) == t).unwrap_or(0),
            None => states.len(),
        };
        let start = model::batch_start(job.options.batch, pos);
        let unfinished = states[..start.min(states.len())]
            .iter()
            .filter(|(_, s)| !TaskState::parse(s).is_final())
            .count();
        if !model::batch_allows(job.options.batch, pos, unfinished) {
            continue;
        }
        let image = match job.image {
            Some(img) => load_image(conn, img)?,
            None => None,
        };
        let mut what = match &image {
            Some(img) => format!("job {} {} {} {}", job.id, job.kind, img.name, img.version),
            None => format!("job {} {}", job.id, job.kind),
        };
        // A task validation will reject still boots the agent: its check-in records the
        // rejection (Configuration Required) where the administrator sees it.
        if !validate(&job, image.as_ref(), dev.inventory.as_ref()).ok() {
            what.push_str(", to be rejected by validation");
        }
        return Ok(BootWork::Work(what));
    }
    Ok(BootWork::Idle)
}

pub(super) fn device_may_fetch(conn: &Connection, device: u64, file: &str) -> Result<bool> {
    let found = conn
        .prepare_cached(
            "SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id JOIN images m ON m.id = j.image_id
             WHERE t.device_id = ?1 AND t.state IN ('sent', 'running') AND j.kind = 'deploy' AND m.file = ?2 LIMIT 1",
        )?
        .query_row(params![i(device), file], |_| Ok(()))
        .optional()?
        .is_some();
    Ok(found)
}

pub(super) fn add_job(
    tx: &Transaction,
    job: &NewJob,
    now: u64,
) -> Result<(u64, Vec<(String, Validation)>)> {
    tx.execute(
        "INSERT INTO jobs (kind, image_id, options, selector, created, note) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
        params![job.kind, job.image.map(i), serde_json::to_string(&job.options)?, job.selector, i(now), job.note],
    )?;
    let id = u(tx.last_insert_rowid());
    // Materialise tasks for the devices known now; `all` and groups also reach devices
    // that enrol later (next_task).
    let devices: Vec<i64> = if let Some(mac) = job.selector.strip_prefix("mac:") {
        let existing: Option<i64> = tx
            .query_row("SELECT id FROM devices WHERE mac = ?1", [mac], |r| r.get(0))
            .optional()?;
        match existing {
            Some(d) => vec![d],
            None => {
                // Pre-staged: the device gets its task at first contact.
                tx.execute("INSERT INTO devices (mac) VALUES (?1)", [mac])?;
                vec![tx.last_insert_rowid()]
            }
        }
    } else if let Some(g) = job.selector.strip_prefix("group:") {
        tx.prepare("SELECT id FROM devices WHERE grp = ?1 ORDER BY id")?
            .query_map([g], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    } else if job.selector == "all" {
        tx.prepare("SELECT id FROM devices ORDER BY id")?
            .query_map([], |r| r.get(0))?
            .collect::<rusqlite::Result<_>>()?
    } else {
        job.devices.iter().map(|d| i(*d)).collect()
    };
    let job_row = load_job(tx, id)?.expect("job row just inserted");
    let image = match job.image {
        Some(img) => load_image(tx, img)?,
        None => None,
    };
    let mut report = Vec::new();
    for d in devices {
        let dev = load_device(tx, u(d))?.expect("device row");
        let v = validate(&job_row, image.as_ref(), dev.inventory.as_ref());
        let (state, msg) = if v.ok() {
            ("pending", None)
        } else {
            (
                "rejected",
                Some(format!("validation failed: {}", v.errors.join("; "))),
            )
        };
        tx.execute(
            "INSERT INTO tasks (job_id, device_id, state, validation, message, created, updated, finished) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            params![i(id), d, state, serde_json::to_string(&v)?, msg, i(now), (state == "rejected").then_some(i(now))],
        )?;
        report.push((dev.mac, v));
    }
    Ok((id, report))
}

pub(super) fn remove_job(tx: &Transaction, id: u64) -> Result<()> {
    let running: i64 = tx.query_row(
        "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND state IN ('sent', 'running')",
        [i(id)],
        |r| r.get(0),
    )?;
    if running > 0 {
        return Err(StoreError::Conflict(format!(
            "job {id} has {running} device(s) imaging now: `imgserver job {id} abort` stops the rest; remove it when they are done"
        )));
    }
    let n = tx.execute("UPDATE jobs SET state = 'removed' WHERE id = ?1", [i(id)])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no job {id}: see `imgserver jobs`"
        )));
    }
    tx.execute(
        "DELETE FROM tasks WHERE job_id = ?1 AND state = 'pending'",
        [i(id)],
    )?;
    Ok(())
}

pub(super) fn abort_job(tx: &Transaction, id: u64, now: u64) -> Result<usize> {
    let n = tx.execute(
        "UPDATE jobs SET state = 'aborted' WHERE id = ?1 AND state IN ('active', 'stopped')",
        [i(id)],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no active job {id}: see `imgserver jobs`"
        )));
    }
    // Seed 003: devices already imaging run to the end; those not started are aborted.
    let aborted = tx.execute(
        "UPDATE tasks SET state = 'aborted', message = 'aborted by the administrator', updated = ?2, finished = ?2 WHERE job_id = ?1 AND state = 'pending'",
        params![i(id), i(now)],
    )?;
    Ok(aborted)
}

pub(super) fn jobs(conn: &Connection) -> Result<Vec<(JobRow, Vec<TaskRow>)>> {
    let jobs: Vec<JobRow> = conn
        .prepare(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE state != 'removed' ORDER BY id"
        ))?
        .query_map([], job_row)?
        .collect::<rusqlite::Result<_>>()?;
    jobs.into_iter()
        .map(|j| Ok((j.clone(), job_tasks(conn, j.id)?)))
        .collect()
}

pub(super) fn job(conn: &Connection, id: u64) -> Result<Option<(JobRow, Vec<TaskRow>)>> {
    let Some(j) = load_job(conn, id)? else {
        return Ok(None);
    };
    let tasks = job_tasks(conn, id)?;
    Ok(Some((j, tasks)))
}

/// Pick the task to hand to `device` now (see the trait docs): resend an unfinished one,
/// else the oldest pending one its job's batch rule lets start and validation accepts.
pub(super) fn next_task(
    tx: &Transaction,
    device: u64,
    secrets: &CheckInSecrets,
    now: u64,
) -> Result<Option<(TaskRow, JobRow, Option<ImageRow>)>> {
    let running: Option<i64> = tx
        .prepare_cached("SELECT id FROM tasks WHERE device_id = ?1 AND state IN ('sent', 'running') ORDER BY id LIMIT 1")?
        .query_row([i(device)], |r| r.get(0))
        .optional()?;
    if let Some(id) = running {
        let task = load_task(tx, u(id))?.expect("task row just seen");
        let job = load_job(tx, task.job)?.ok_or_else(|| StoreError::NotFound("job gone".into()))?;
        let image = match job.image {
            Some(img) => load_image(tx, img)?,
            None => None,
        };
        if job.kind == "capture" {
            tx.execute(
                "UPDATE tasks SET upload_key = ?2 WHERE id = ?1",
                params![id, secrets.new_upload_key],
            )?;
        }
        return Ok(Some((task, job, image)));
    }
    // Jobs for all devices or a group reach devices that enrolled after scheduling.
    let group: Option<String> =
        tx.query_row("SELECT grp FROM devices WHERE id = ?1", [i(device)], |r| {
            r.get(0)
        })?;
    tx.prepare_cached(
        "INSERT INTO tasks (job_id, device_id, created, updated)
         SELECT j.id, ?1, ?3, ?3 FROM jobs j
         WHERE j.state = 'active' AND (j.selector = 'all' OR (?2 IS NOT NULL AND j.selector = 'group:' || ?2))
           AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.device_id = ?1)",
    )?
    .execute(params![i(device), group, i(now)])?;
    let pending: Vec<i64> = tx
        .prepare_cached("SELECT t.id FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.device_id = ?1 AND t.state = 'pending' AND j.state = 'active' ORDER BY t.id")?
        .query_map([i(device)], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let device_row =
        load_device(tx, device)?.ok_or_else(|| StoreError::NotFound("device gone".into()))?;
    for id in pending {
        let task = load_task(tx, u(id))?.expect("pending task row");
        let job = load_job(tx, task.job)?.ok_or_else(|| StoreError::NotFound("job gone".into()))?;
        // The batch rule over the job's tasks in id order.
        let states: Vec<(i64, String)> = tx
            .prepare_cached("SELECT id, state FROM tasks WHERE job_id = ?1 ORDER BY id")?
            .query_map([i(job.id)], |r| Ok((r.get(0)?, r.get(1)?)))?
            .collect::<rusqlite::Result<_>>()?;
        let pos = states.iter().position(|(t, _)| *t == id).unwrap_or(0);
        let start = model::batch_start(job.options.batch, pos);
        let unfinished = states[..start]
            .iter()
            .filter(|(_, s)| !TaskState::parse(s).is_final())
            .count();
        if !model::batch_allows(job.options.batch, pos, unfinished) {
            continue;
        }
        let image = match job.image {
            Some(img) => load_image(tx, img)?,
            None => None,
        };
        let v = validate(&job, image.as_ref(), device_row.inventory.as_ref());
        let vjson = serde_json::to_string(&v)?;
        if !v.ok() {
            let msg = format!("validation failed: {}", v.errors.join("; "));
            tx.execute(
                "UPDATE tasks SET state = 'rejected', validation = ?2, message = ?3, updated = ?4, finished = ?4 WHERE id = ?1",
                params![id, vjson, msg, i(now)],
            )?;
            tx.execute(
                "UPDATE devices SET state = 'configuration_required', state_reason = ?2 WHERE id = ?1 AND state != 'maintenance'",
                params![i(device), format!("job {}: {msg}", job.id)],
            )?;
            transcript(
                tx,
                device,
                Some(u(id)),
                now,
                &format!("task {id} of job {} rejected: {msg}", job.id),
            )?;
            on_task_error(tx, &job, now)?;
            continue;
        }
        let prev = current_stamp(device_row.inventory.as_ref(), &job.options);
        tx.execute(
            "UPDATE tasks SET state = 'sent', validation = ?2, sent_at = ?3, updated = ?3, prev_image = ?4, upload_key = ?5 WHERE id = ?1",
            params![
                id,
                vjson,
                i(now),
                prev.as_ref().map(serde_json::to_string).transpose()?,
                (job.kind == "capture").then_some(&secrets.new_upload_key)
            ],
        )?;
        tx.execute(
            "UPDATE devices SET state = 'upgrade_in_progress', state_reason = ?2, trouble_since = NULL WHERE id = ?1 AND state != 'maintenance'",
            params![i(device), format!("job {} ({})", job.id, job.kind)],
        )?;
        let what = match &image {
            Some(img) => format!("{} {} {}", job.kind, img.name, img.version),
            None => job.kind.clone(),
        };
        transcript(
            tx,
            device,
            Some(u(id)),
            now,
            &format!("task {id} of job {} sent: {what}", job.id),
        )?;
        for w in &v.warnings {
            transcript(
                tx,
                device,
                Some(u(id)),
                now,
                &format!("validation warning: {w}"),
            )?;
        }
        let task = load_task(tx, u(id))?.expect("task row just updated");
        return Ok(Some((task, job, image)));
    }
    Ok(None)
}

pub(super) fn job_tasks(conn: &Connection, job: u64) -> Result<Vec<TaskRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks t JOIN devices d ON d.id = t.device_id WHERE t.job_id = ?1 ORDER BY t.id"))?
        .query_map([i(job)], task_row)?
        .collect::<rusqlite::Result<_>>()?)
}
