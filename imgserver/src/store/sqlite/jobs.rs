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
            "UPDATE tasks SET upload_key = NULL WHERE id = ?1 AND upload_key = ?2 AND state IN (?3, ?4)
             AND job_id IN (SELECT id FROM jobs WHERE kind = ?5) RETURNING id",
            params![i(task), key_hash, TaskState::Sent.as_str(), TaskState::Running.as_str(), JobKind::Capture.as_str()],
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

/// Whether the device would get work at a check-in now: the same loading and the same
/// [`model::plan_next_task`] as [`next_task`], read-only (jobs that would reach the device
/// for the first time are candidates without a task).
pub(super) fn boot_work(conn: &Connection, mac: &str) -> Result<BootWork> {
    let Some(dev) = conn
        .prepare_cached(&format!("SELECT {DEVICE_COLS} FROM devices WHERE mac = ?1"))?
        .query_row([mac], device_row)
        .optional()?
    else {
        return Ok(BootWork::Unknown);
    };
    // A pending enrolment gets nothing before `imgserver approve`: don't read further.
    if dev.pending {
        return Ok(BootWork::Idle);
    }
    let unfinished = unfinished_task(conn, dev.id)?;
    let mut found = pending_candidates(conn, dev.id)?;
    found.extend(reaching_jobs(conn, dev.id, dev.group.as_deref())?);
    in_window(&mut found, crate::api::now());
    let candidates = candidates(&found);
    let plan = model::plan_next_task(&dev, unfinished, &candidates);
    Ok(match plan.boot_work(&candidates) {
        Some(what) => BootWork::Work(what),
        None => BootWork::Idle,
    })
}

/// Jobs at a time: only candidates whose job's window is open now reach the plan; the
/// others wait for a later check-in ([`crate::admin::window`]).
fn in_window(found: &mut Vec<Found>, now: u64) {
    found.retain(|(job, ..)| crate::admin::window::open(&job.options, now));
}

pub(super) fn device_may_fetch(conn: &Connection, device: u64, file: &str) -> Result<bool> {
    let found = conn
        .prepare_cached(
            "SELECT 1 FROM tasks t JOIN jobs j ON j.id = t.job_id JOIN images m ON m.id = j.image_id
             WHERE t.device_id = ?1 AND t.state IN (?3, ?4) AND j.kind IN (?5, ?6, ?7) AND m.file = ?2 LIMIT 1",
        )?
        .query_row(params![i(device), file, TaskState::Sent.as_str(), TaskState::Running.as_str(), JobKind::Deploy.as_str(), JobKind::Convert.as_str(), JobKind::Session.as_str()], |_| Ok(()))
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
        let v = model::validate_task(&job_row, image.as_ref(), dev.inventory.as_ref());
        let (state, msg) = model::new_task_state(&v);
        tx.execute(
            "INSERT INTO tasks (job_id, device_id, state, validation, message, created, updated, finished) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?6, ?7)",
            params![i(id), d, state.as_str(), serde_json::to_string(&v)?, msg, i(now), state.is_final().then_some(i(now))],
        )?;
        report.push((dev.mac, v));
    }
    Ok((id, report))
}

pub(super) fn remove_job(tx: &Transaction, id: u64) -> Result<()> {
    let running: i64 = tx.query_row(
        "SELECT COUNT(*) FROM tasks WHERE job_id = ?1 AND state IN (?2, ?3)",
        params![i(id), TaskState::Sent.as_str(), TaskState::Running.as_str()],
        |r| r.get(0),
    )?;
    if running > 0 {
        return Err(StoreError::Conflict(format!(
            "job {id} has {running} device(s) imaging now: `imgserver job {id} abort` stops the rest; remove it when they are done"
        )));
    }
    let n = tx.execute(
        "UPDATE jobs SET state = ?2 WHERE id = ?1",
        params![i(id), JobState::Removed.as_str()],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no job {id}: see `imgserver jobs`"
        )));
    }
    tx.execute(
        "DELETE FROM tasks WHERE job_id = ?1 AND state = ?2",
        params![i(id), TaskState::Pending.as_str()],
    )?;
    Ok(())
}

pub(super) fn abort_job(tx: &Transaction, id: u64, now: u64) -> Result<usize> {
    let n = tx.execute(
        "UPDATE jobs SET state = ?2 WHERE id = ?1 AND state IN (?3, ?4)",
        params![
            i(id),
            JobState::Aborted.as_str(),
            JobState::Active.as_str(),
            JobState::Stopped.as_str()
        ],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no active job {id}: see `imgserver jobs`"
        )));
    }
    // Seed 003: devices already imaging run to the end; those not started are aborted.
    abort_pending(tx, id, model::ABORTED_BY_ADMIN, now)
}

pub(super) fn jobs(conn: &Connection) -> Result<Vec<(JobRow, Vec<TaskRow>)>> {
    let jobs: Vec<JobRow> = conn
        .prepare(&format!(
            "SELECT {JOB_COLS} FROM jobs WHERE state != ?1 ORDER BY id"
        ))?
        .query_map([JobState::Removed.as_str()], job_row)?
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

/// Pick the task to hand to `device` now and apply [`model::plan_next_task`]'s plan: tasks
/// for jobs that newly reach the device are made first, then the plan is carried out
/// (rejections, the handover and the device's state), all in the caller's transaction.
pub(super) fn next_task(
    tx: &Transaction,
    device: u64,
    secrets: &CheckInSecrets,
    now: u64,
) -> Result<Option<(TaskRow, JobRow, Option<ImageRow>)>> {
    let dev = load_device(tx, device)?.ok_or_else(|| StoreError::NotFound("device gone".into()))?;
    let unfinished = unfinished_task(tx, device)?;
    if unfinished.is_none() {
        // Jobs for all devices or a group reach devices that enrolled after scheduling.
        for (job, _, _, _) in reaching_jobs(tx, device, dev.group.as_deref())? {
            tx.prepare_cached(
                "INSERT INTO tasks (job_id, device_id, state, created, updated) VALUES (?1, ?2, ?3, ?4, ?4)",
            )?
            .execute(params![i(job.id), i(device), TaskState::Pending.as_str(), i(now)])?;
        }
    }
    let mut found = if unfinished.is_some() {
        Vec::new()
    } else {
        pending_candidates(tx, device)?
    };
    in_window(&mut found, now);
    let candidates = candidates(&found);
    let plan = model::plan_next_task(&dev, unfinished, &candidates);
    if let Some(u) = plan.resend {
        if u.kind == Some(JobKind::Capture) {
            tx.execute(
                "UPDATE tasks SET upload_key = ?2 WHERE id = ?1",
                params![i(u.task), secrets.new_upload_key],
            )?;
        }
        return task_of_device(tx, device, u.task);
    }
    for (c, why) in &plan.held {
        // It stays pending; the reason is where `imgserver job N` and `devices` show it.
        if let Some(task) = found[*c].2 {
            tx.execute(
                "UPDATE tasks SET message = ?2, updated = ?3 WHERE id = ?1 AND state = ?4 AND message IS NOT ?2",
                params![i(task), why, i(now), TaskState::Pending.as_str()],
            )?;
            // The device list's note says it too (while nothing else is to be said).
            tx.execute(
                "UPDATE devices SET state_reason = ?2 WHERE id = ?1 AND state = ?3 AND state_reason IS NULL",
                params![i(device), format!("job {}: {why}", found[*c].0.id), DeviceState::Operational.as_str()],
            )?;
        }
    }
    for r in &plan.rejected {
        let (job, _, task, _) = &found[r.candidate];
        let task = task.expect("a pending candidate has its task");
        tx.execute(
            "UPDATE tasks SET state = ?5, validation = ?2, message = ?3, updated = ?4, finished = ?4 WHERE id = ?1",
            params![
                i(task),
                serde_json::to_string(&r.validation)?,
                r.message,
                i(now),
                TaskState::Rejected.as_str()
            ],
        )?;
        if let Some(change) = &r.device {
            set_state_unless_maintenance(tx, device, change, false)?;
        }
        transcript(tx, device, Some(task), now, &r.transcript)?;
        if r.stop_job {
            stop_job(tx, job.id, now)?;
        }
    }
    let Some(s) = &plan.send else {
        return Ok(None);
    };
    let (job, image, task, _) = &found[s.candidate];
    let task = task.expect("a pending candidate has its task");
    tx.execute(
        "UPDATE tasks SET state = ?6, validation = ?2, sent_at = ?3, updated = ?3, prev_image = ?4, upload_key = ?5 WHERE id = ?1",
        params![
            i(task),
            serde_json::to_string(&s.validation)?,
            i(now),
            s.prev_image.as_ref().map(serde_json::to_string).transpose()?,
            s.upload_key.then_some(&secrets.new_upload_key),
            TaskState::Sent.as_str()
        ],
    )?;
    if let Some(change) = &s.device {
        set_state_unless_maintenance(tx, device, change, true)?;
    }
    for line in &s.transcript {
        transcript(tx, device, Some(task), now, line)?;
    }
    let row = load_task(tx, task)?.expect("task row just updated");
    Ok(Some((row, job.clone(), image.clone())))
}

/// A job that may give a device work, as loaded: the job, its image, the device's task of
/// it (None: not made yet) and the job's task states in id order.
type Found = (JobRow, Option<ImageRow>, Option<u64>, Vec<(u64, TaskState)>);

fn candidates(found: &[Found]) -> Vec<model::Candidate<'_>> {
    found
        .iter()
        .map(|(job, image, task, states)| model::Candidate {
            job,
            image: image.as_ref(),
            task: *task,
            job_tasks: states,
        })
        .collect()
}

/// The device's task handed out and not finished, if any.
fn unfinished_task(conn: &Connection, device: u64) -> Result<Option<model::Unfinished>> {
    Ok(conn
        .prepare_cached(
            "SELECT t.id, t.job_id, j.kind, j.options FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.device_id = ?1 AND t.state IN (?2, ?3) ORDER BY t.id LIMIT 1",
        )?
        .query_row(
            params![
                i(device),
                TaskState::Sent.as_str(),
                TaskState::Running.as_str()
            ],
            |r| {
                Ok(model::Unfinished {
                    task: u(r.get(0)?),
                    job: u(r.get(1)?),
                    kind: r.get::<_, String>(2)?.parse().ok(),
                    from_backup: serde_json::from_str::<model::JobOptions>(&r.get::<_, String>(3)?)
                        .is_ok_and(|o| o.from_backup),
                })
            },
        )
        .optional()?)
}

/// The device's pending tasks of active jobs, in id order.
fn pending_candidates(conn: &Connection, device: u64) -> Result<Vec<Found>> {
    let tasks: Vec<(u64, u64)> = conn
        .prepare_cached(
            "SELECT t.id, t.job_id FROM tasks t JOIN jobs j ON j.id = t.job_id
             WHERE t.device_id = ?1 AND t.state = ?2 AND j.state = ?3 ORDER BY t.id",
        )?
        .query_map(
            params![
                i(device),
                TaskState::Pending.as_str(),
                JobState::Active.as_str()
            ],
            |r| Ok((u(r.get(0)?), u(r.get(1)?))),
        )?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for (task, job) in tasks {
        if let Some(f) = found(conn, job, Some(task))? {
            out.push(f);
        }
    }
    Ok(out)
}

/// Active jobs for all devices or the device's group that have no task for it yet, in id
/// order.
fn reaching_jobs(conn: &Connection, device: u64, group: Option<&str>) -> Result<Vec<Found>> {
    let jobs: Vec<u64> = conn
        .prepare_cached(
            "SELECT j.id FROM jobs j WHERE j.state = ?3
               AND (j.selector = 'all' OR (?2 IS NOT NULL AND j.selector = 'group:' || ?2))
               AND NOT EXISTS (SELECT 1 FROM tasks t WHERE t.job_id = j.id AND t.device_id = ?1)
             ORDER BY j.id",
        )?
        .query_map(params![i(device), group, JobState::Active.as_str()], |r| {
            Ok(u(r.get(0)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    let mut out = Vec::new();
    for job in jobs {
        if let Some(f) = found(conn, job, None)? {
            out.push(f);
        }
    }
    Ok(out)
}

fn found(conn: &Connection, job: u64, task: Option<u64>) -> Result<Option<Found>> {
    let Some(job) = load_job(conn, job)? else {
        return Ok(None);
    };
    let image = match job.image {
        Some(img) => load_image(conn, img)?,
        None => None,
    };
    let states = conn
        .prepare_cached("SELECT id, state FROM tasks WHERE job_id = ?1 ORDER BY id")?
        .query_map([i(job.id)], |r| {
            Ok((u(r.get(0)?), TaskState::parse(&r.get::<_, String>(1)?)))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(Some((job, image, task, states)))
}

pub(super) fn job_tasks(conn: &Connection, job: u64) -> Result<Vec<TaskRow>> {
    Ok(conn
        .prepare_cached(&format!("SELECT {TASK_COLS} FROM tasks t JOIN devices d ON d.id = t.device_id WHERE t.job_id = ?1 ORDER BY t.id"))?
        .query_map([i(job)], task_row)?
        .collect::<rusqlite::Result<_>>()?)
}
