//! `imgserver schedule add|remove`, `jobs`, `job N [--abort|--retry|--rollback]`: the
//! changes and the jobs list through the admin core.

use std::path::Path;

use anyhow::anyhow;

use super::*;
use crate::admin::{shown_state, window, JobCreated, JobRequest, ValidationRow};
use crate::model::{JobOptions, OnError, TaskState};

/// What `schedule add` asks the admin core for.
pub(super) fn request(
    target: String,
    kind: String,
    image: Option<String>,
    options: JobOptions,
    note: Option<String>,
    w: Window,
    tz: Option<&str>,
) -> JobRequest {
    let capture = match (&options.capture_name, &options.capture_version) {
        (Some(n), Some(v)) if kind == "capture" => Some(format!("{n}:{v}")),
        _ => None,
    };
    JobRequest {
        target,
        image: image.filter(|_| kind == "deploy" || kind == "convert"),
        capture,
        kind,
        options,
        note,
        ..with_window(w, tz)
    }
}

fn with_window(w: Window, tz: Option<&str>) -> JobRequest {
    JobRequest {
        at: w.at,
        until: w.until,
        tz: tz.map(str::to_string),
        ..Default::default()
    }
}

/// `imgserver schedule add`: validate and create a job; exit code 3 when validation keeps
/// a device out of it (or every device: then nothing is created).
pub(super) fn schedule_add(
    data: &Path,
    mut req: JobRequest,
    validate_only: bool,
) -> anyhow::Result<i32> {
    let tz = window::zone(req.tz.as_deref())?;
    let admin = open_admin(data)?;
    req.validate_only = validate_only;
    let made = match admin.create_job(&Actor::host(), &req) {
        Err(AdminError::Blocked(msg, table)) => {
            print_validation(&table);
            return Err(AdminError::Blocked(msg, table).into());
        }
        r => r?,
    };
    if made.job.is_none() {
        println!("validation only: nothing was created");
    }
    print_created(&made, &tz, &admin)?;
    Ok(if made.blocked.is_empty() { 0 } else { 3 })
}

/// `imgserver schedule remove`: remove a job.
pub(super) fn schedule_remove(data: &Path, job: u64) -> anyhow::Result<i32> {
    open_admin(data)?.remove_job(&Actor::host(), job)?;
    println!("job {job} removed");
    Ok(0)
}

/// `imgserver jobs`: jobs with their window, who made them and their devices' progress.
pub(super) fn jobs(data: &Path, tz: Option<&str>) -> anyhow::Result<i32> {
    let tz = window::zone(tz)?;
    let mut t = Table::new(&[
        "JOB",
        "KIND",
        "IMAGE",
        "TARGET",
        "STATE",
        "WINDOW",
        "CHANGED BY",
        "PENDING",
        "RUNNING",
        "OK",
        "FAILED",
        "NOTE",
    ]);
    let mut jobs = open_admin(data)?.jobs(&Actor::host())?;
    jobs.reverse();
    for j in jobs {
        t.row(vec![
            j.id.to_string(),
            j.kind,
            j.image.unwrap_or_else(|| "-".into()),
            j.target,
            j.state,
            window_text(j.at, j.until, &tz),
            j.changed_by.unwrap_or_else(|| "-".into()),
            j.counts.pending.to_string(),
            j.counts.running.to_string(),
            j.counts.succeeded.to_string(),
            j.counts.failed.to_string(),
            j.note.unwrap_or_default(),
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// `imgserver job`: one job, or abort / retry / roll it back (seed 003) through the core.
pub(super) fn job(
    data: &Path,
    id: u64,
    action: Option<String>,
    w: Window,
    tz: Option<&str>,
) -> anyhow::Result<i32> {
    let zone = window::zone(tz)?;
    let me = Actor::host();
    let Some(action) = action else {
        return show_job(data, id, &zone);
    };
    let admin = open_admin(data)?;
    match action.as_str() {
        "abort" => {
            let n = admin.abort_job(&me, id)?;
            println!("job {id} aborted: {n} device(s) not started are cancelled; devices already imaging finish (seed 003)");
        }
        "retry" => {
            let made = admin.retry_job(&me, id, &with_window(w, tz))?;
            println!(
                "job {} retries job {id} on {} device(s)",
                made.job.unwrap_or_default(),
                made.validation.len()
            );
            print_created(&made, &zone, &admin)?;
        }
        _ => {
            let (made, skipped) = admin.rollback_job(&me, id, &with_window(w, tz))?;
            for s in skipped {
                println!("{s}");
            }
            for m in made {
                let nid = m.job.unwrap_or_default();
                let image = admin.job(&me, nid)?.summary.image.unwrap_or_default();
                println!(
                    "job {nid} rolls {} device(s) back to {image}",
                    m.validation.len()
                );
                print_created(&m, &zone, &admin)?;
            }
        }
    }
    Ok(0)
}

/// `imgserver job N`: the job with its options and per-device progress (removed jobs too),
/// then its window and who made it.
fn show_job(data: &Path, id: u64, tz: &jiff::tz::TimeZone) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let (j, tasks) = store
        .job(id)?
        .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
    let image = match j.image {
        Some(i) => store
            .image_by_id(i)?
            .map(|i| format!("{} {}", i.name, i.version))
            .unwrap_or_default(),
        None => "-".into(),
    };
    let o = &j.options;
    println!(
        "job {} ({}), {} for {}, state {}",
        j.id,
        j.kind,
        image,
        j.selector,
        shown_state(&j, &tasks)
    );
    println!(
        "  options: partition {}, backup first {}, then {}, on error {}, {}",
        o.partition.as_deref().unwrap_or("(whole disk)"),
        if o.backup_first { "yes" } else { "no" },
        o.after.name(),
        if o.on_error == OnError::Stop {
            "stop"
        } else {
            "continue"
        },
        match o.batch {
            0 => "all in parallel".to_string(),
            1 => "sequential".to_string(),
            n => format!("parallel in batches of {n}"),
        }
    );
    if let Some(w) = crate::autogenic::job_words(o) {
        println!("  autogenic: {w}");
    }
    if j.kind == "convert" {
        println!(
            "  convert: flash {}, backup partition {}",
            o.flash_size.map(fmt_bytes).unwrap_or_else(|| "-".into()),
            o.backup_size
                .map(fmt_bytes)
                .unwrap_or_else(|| "image + 100 MiB".into())
        );
    }
    let ok = tasks
        .iter()
        .filter(|t| t.state == TaskState::Succeeded)
        .count();
    let bad = tasks
        .iter()
        .filter(|t| matches!(t.state, TaskState::Failed | TaskState::Rejected))
        .count();
    println!(
        "  devices to be deployed: {}, deployed successfully: {ok}, with errors: {bad}",
        tasks.len()
    );
    let mut t = Table::new(&[
        "TASK", "DEVICE", "STATE", "PROGRESS", "PREVIOUS", "UPDATED", "MESSAGE",
    ]);
    for task in &tasks {
        let prog = match &task.progress {
            Some(p) => format!(
                "{}{} {}/s",
                p.percent.map(|x| format!("{x:.0}% ")).unwrap_or_default(),
                fmt_bytes(p.bytes),
                fmt_bytes(p.rate)
            ),
            None => "-".into(),
        };
        let mut msg = task.message.clone().unwrap_or_default();
        if task.ignored_results > 0 {
            msg = format!(
                "{msg}{}{} later result(s) ignored",
                if msg.is_empty() { "" } else { "; " },
                task.ignored_results
            );
        }
        if !task.validation.warnings.is_empty() {
            msg = format!(
                "{msg}{}warnings: {}",
                if msg.is_empty() { "" } else { "; " },
                task.validation.warnings.join("; ")
            );
        }
        t.row(vec![
            task.id.to_string(),
            task.mac.clone(),
            task.state.as_str().into(),
            prog,
            task.prev_image
                .as_ref()
                .map(|i| format!("{} {}", i.name, i.version))
                .unwrap_or_else(|| "-".into()),
            utc(task.updated),
            msg,
        ]);
    }
    print!("{}", t.render());
    // A removed job has no window to show.
    let Ok(j) = open_admin(data)?.job(&Actor::host(), id) else {
        return Ok(0);
    };
    println!(
        "  window: {} ({}); changed by {}; last action {}",
        window_text(j.summary.at, j.summary.until, tz),
        match j.summary.window {
            window::Window::Always => "at once",
            window::Window::NotYet(_) => "not open yet",
            window::Window::Open => "open",
            window::Window::Closed(_) => "closed",
        },
        j.summary.changed_by.as_deref().unwrap_or("-"),
        window::show(j.summary.last_action, tz)
    );
    Ok(0)
}

/// Seed 003's validation table: one line per device.
fn print_validation(rows: &[ValidationRow]) {
    let mut t = Table::new(&["DEVICE", "VALIDATION", "NOTES"]);
    for r in rows {
        let notes: Vec<String> = r.errors.iter().chain(r.warnings.iter()).cloned().collect();
        t.row(vec![r.mac.clone(), r.status.clone(), notes.join("; ")]);
    }
    print!("{}", t.render());
}

fn window_text(at: Option<u64>, until: Option<u64>, tz: &jiff::tz::TimeZone) -> String {
    match (at, until) {
        (None, None) => "at once".into(),
        (Some(a), None) => format!("from {}", window::show(a, tz)),
        (None, Some(u)) => format!("until {}", window::show(u, tz)),
        (Some(a), Some(u)) => format!("from {} until {}", window::show(a, tz), window::show(u, tz)),
    }
}

/// The job made (with its window), its validation table, and the devices it left out.
fn print_created(made: &JobCreated, tz: &jiff::tz::TimeZone, admin: &Admin) -> anyhow::Result<()> {
    if let Some(id) = made.job {
        let j = admin.job(&Actor::host(), id)?;
        println!(
            "job {id} scheduled for {} ({})",
            j.summary.target,
            window_text(j.summary.at, j.summary.until, tz)
        );
    }
    if !made.validation.is_empty() {
        print_validation(&made.validation);
    }
    if !made.blocked.is_empty() {
        println!(
            "not created for {} (validation errors): fix them and schedule those devices again",
            made.blocked.join(", ")
        );
    }
    Ok(())
}
