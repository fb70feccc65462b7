//! Progress, results and the device transcript.

use super::*;

pub(super) fn record_progress(
    tx: &Transaction,
    device: u64,
    task: u64,
    p: &ProgressReport,
    now: u64,
) -> Result<(bool, bool)> {
    let row: Option<(i64, i64, String, String)> = tx
        .prepare_cached("SELECT t.device_id, t.progress_seq, t.state, j.state FROM tasks t JOIN jobs j ON j.id = t.job_id WHERE t.id = ?1")?
        .query_row([i(task)], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let Some((owner, seq, state, job_state)) = row.filter(|r| u(r.0) == device) else {
        return Err(StoreError::NotFound(format!(
            "task {task} is not a task of this device"
        )));
    };
    let _ = owner;
    let abort = job_state == JobState::Aborted.as_str();
    let state = TaskState::parse(&state);
    if state.is_final() || i(p.seq) <= seq {
        return Ok((false, abort));
    }
    tx.prepare_cached(
        "UPDATE tasks SET progress = ?2, progress_seq = ?3, state = ?5, updated = ?4 WHERE id = ?1",
    )?
    .execute(params![
        i(task),
        serde_json::to_string(p)?,
        i(p.seq),
        i(now),
        TaskState::Running.as_str()
    ])?;
    tx.prepare_cached("UPDATE devices SET last_seen = ?2 WHERE id = ?1")?
        .execute(params![i(device), i(now)])?;
    Ok((true, abort))
}

pub(super) fn record_result(
    tx: &Transaction,
    device: u64,
    r: &TaskResult,
    now: u64,
) -> Result<bool> {
    let recorded = apply_result(tx, device, r, now)?;
    tx.execute(
        "UPDATE devices SET last_seen = ?2 WHERE id = ?1",
        params![i(device), i(now)],
    )?;
    Ok(recorded)
}

pub(super) fn transcript_lines(
    conn: &Connection,
    mac: &str,
    task: Option<u64>,
) -> Result<Vec<(u64, Option<u64>, String)>> {
    let rows = conn
        .prepare(
            "SELECT t.at, t.task_id, t.line FROM transcript t JOIN devices d ON d.id = t.device_id
             WHERE d.mac = ?1 AND (?2 IS NULL OR t.task_id = ?2) ORDER BY t.id",
        )?
        .query_map(params![mac, task.map(i)], |r| {
            Ok((u(r.get(0)?), r.get::<_, Option<i64>>(1)?.map(u), r.get(2)?))
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub(super) fn result_count(conn: &Connection) -> Result<u64> {
    Ok(u(conn.query_row(
        "SELECT COUNT(*) FROM results",
        [],
        |r| r.get(0),
    )?))
}

pub(super) fn apply_result(
    tx: &Transaction,
    device: u64,
    r: &TaskResult,
    now: u64,
) -> Result<bool> {
    let seen: bool = tx
        .prepare_cached("SELECT 1 FROM results WHERE report = ?1")?
        .query_row([&r.report], |_| Ok(true))
        .optional()?
        .unwrap_or(false);
    if seen {
        return Ok(false);
    }
    let task = load_task(tx, r.task)?;
    let Some(task) = task.filter(|t| t.device == device) else {
        return Err(StoreError::NotFound(format!(
            "task {} is not a task of this device",
            r.task
        )));
    };
    if task.state.is_final() {
        // A second, different result for a finished task (the device lost its outbox
        // ack and re-ran nothing): the first one stands. Nothing of it is stored, only
        // counted, so a device cannot fill the database by repeating itself; the
        // transcript says so once per task. A retry of it is again ignored the same way.
        let n: i64 = tx
            .prepare_cached("UPDATE tasks SET ignored_results = ignored_results + 1 WHERE id = ?1 RETURNING ignored_results")?
            .query_row([i(r.task)], |row| row.get(0))?;
        if n == 1 {
            transcript(
                tx,
                device,
                Some(r.task),
                now,
                &format!(
                    "ignored a further result for task {} (already {}); later ones are only counted (`imgserver job {}`)",
                    r.task,
                    task.state.as_str(),
                    task.job
                ),
            )?;
        }
        return Ok(false);
    }
    tx.execute(
        "INSERT INTO results (report, task_id, device_id, received, body) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![r.report, i(r.task), i(device), i(now), serde_json::to_string(r)?],
    )?;
    for line in &r.transcript {
        transcript(tx, device, Some(r.task), now, &format!("device: {line}"))?;
    }
    let job = load_job(tx, task.job)?
        .ok_or_else(|| StoreError::NotFound(format!("job {} is gone", task.job)))?;
    let plan = model::plan_result(&job, r);
    tx.execute(
        "UPDATE tasks SET state = ?2, message = ?3, updated = ?4, finished = ?4, upload_key = NULL WHERE id = ?1",
        params![i(r.task), plan.task.as_str(), r.message, i(now)],
    )?;
    transcript(tx, device, Some(r.task), now, &plan.summary)?;
    if plan.device_done {
        tx.execute(
            "UPDATE devices SET state = ?2, state_reason = NULL, trouble_since = NULL WHERE id = ?1 AND state = ?3",
            params![
                i(device),
                DeviceState::Operational.as_str(),
                DeviceState::UpgradeInProgress.as_str()
            ],
        )?;
    }
    if let Some(img) = &plan.device_image {
        tx.execute(
            "UPDATE devices SET image_name = ?2, image_version = ?3 WHERE id = ?1",
            params![i(device), img.name, img.version],
        )?;
    }
    if plan.trouble {
        // The device stays "in progress" until it checks in again; if it does not within
        // the reload wait it shows as Maintenance (model::effective_state).
        tx.execute(
            "UPDATE devices SET state = CASE WHEN state = ?4 THEN state ELSE ?5 END,
                    state_reason = ?2, trouble_since = ?3 WHERE id = ?1",
            params![
                i(device),
                plan.summary,
                i(now),
                DeviceState::Maintenance.as_str(),
                DeviceState::Operational.as_str()
            ],
        )?;
    }
    if plan.stop_job {
        stop_job(tx, job.id, now)?;
    }
    Ok(true)
}
