//! `imgserver schedule add|remove`, `jobs`, `job N [--abort|--retry|--rollback]`.

use std::path::Path;

use anyhow::{anyhow, bail};

use super::*;
use crate::model::{self, JobOptions, OnError, TaskState};
use crate::store::{NewJob, Store};

/// `imgserver schedule add`: schedule a job; exit code 3 when validation rejects a device.
pub(super) fn schedule_add(
    data: &Path,
    selector: String,
    kind: String,
    image: Option<String>,
    options: JobOptions,
    note: Option<String>,
) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let image_id = match (kind.as_str(), &image) {
        ("deploy", Some(spec)) => {
            let img = find_image(&store, spec)?;
            if let (Some(from), None) = (&img.captured_from, &img.signed_by) {
                bail!(
                        "image {} {} was captured from {from} and nobody signed it yet: look at it, then `imgserver image sign {}:{} --key KEYFILE`",
                        img.name, img.version, img.name, img.version
                    );
            }
            Some(img.id)
        }
        _ => None,
    };
    let job = NewJob {
        kind,
        image: image_id,
        options,
        selector,
        devices: Vec::new(),
        note,
    };
    let (id, report) = store.add_job(&job, now())?;
    println!("job {id} scheduled for {}", job.selector);
    if !report.is_empty() {
        print_validation(&report);
    }
    Ok(if report.iter().any(|(_, v)| !v.ok()) {
        3
    } else {
        0
    })
}

/// `imgserver schedule remove`: remove a job.
pub(super) fn schedule_remove(data: &Path, job: u64) -> anyhow::Result<i32> {
    open_store(data)?.remove_job(job)?;
    println!("job {job} removed");
    Ok(0)
}

/// `imgserver jobs`: jobs with their devices' progress.
pub(super) fn jobs(data: &Path) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let mut t = Table::new(&[
        "JOB", "KIND", "IMAGE", "TARGET", "STATE", "CREATED", "PENDING", "RUNNING", "OK", "FAILED",
        "NOTE",
    ]);
    for (j, tasks) in store.jobs()? {
        let count =
            |f: &dyn Fn(TaskState) -> bool| tasks.iter().filter(|t| f(t.state)).count().to_string();
        let image = match j.image {
            Some(id) => store
                .image_by_id(id)?
                .map(|i| format!("{} {}", i.name, i.version))
                .unwrap_or_else(|| format!("#{id}")),
            None => match (&j.options.capture_name, &j.options.capture_version) {
                (Some(n), Some(v)) => format!("-> {n} {v}"),
                _ => "-".into(),
            },
        };
        t.row(vec![
            j.id.to_string(),
            j.kind.clone(),
            image,
            j.selector.clone(),
            shown_state(&j, &tasks),
            utc(j.created),
            count(&|s| s == TaskState::Pending),
            count(&|s| matches!(s, TaskState::Sent | TaskState::Running)),
            count(&|s| s == TaskState::Succeeded),
            count(&|s| {
                matches!(
                    s,
                    TaskState::Failed | TaskState::Rejected | TaskState::Aborted
                )
            }),
            j.note.clone().unwrap_or_default(),
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// `imgserver job`: one job, or abort / retry / roll it back.
pub(super) fn job(data: &Path, id: u64, action: Option<String>) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    match action.as_deref() {
        Some("abort") => {
            let n = store.abort_job(id, now())?;
            println!("job {id} aborted: {n} device(s) not started are cancelled; devices already imaging finish (seed 003)");
            return Ok(0);
        }
        Some("retry") => return retry(&store, id),
        Some("rollback") => return rollback(&store, id),
        _ => {}
    }
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
    Ok(0)
}

fn print_validation(report: &[(String, model::Validation)]) {
    let mut t = Table::new(&["DEVICE", "VALIDATION", "NOTES"]);
    for (mac, v) in report {
        let status = if !v.ok() {
            "error"
        } else if !v.warnings.is_empty() {
            "warning"
        } else {
            "success"
        };
        let notes: Vec<String> = v.errors.iter().chain(v.warnings.iter()).cloned().collect();
        t.row(vec![mac.clone(), status.into(), notes.join("; ")]);
    }
    print!("{}", t.render());
}

/// A job for fixed devices whose tasks all ended is shown as done (or failed); jobs for
/// all devices or a group stay active for devices that enrol later.
fn shown_state(j: &crate::store::JobRow, tasks: &[crate::store::TaskRow]) -> String {
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

/// Seed 003: retry a failed job as a new job over the devices that did not succeed.
fn retry(store: &dyn Store, id: u64) -> anyhow::Result<i32> {
    let (j, tasks) = store
        .job(id)?
        .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
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
        bail!("job {id} has no failed, rejected or aborted device to retry");
    }
    let new = NewJob {
        kind: j.kind.clone(),
        image: j.image,
        options: j.options.clone(),
        selector: "list".into(),
        devices,
        note: Some(format!("retry of job {id}")),
    };
    let (nid, report) = store.add_job(&new, now())?;
    println!("job {nid} retries job {id} on {} device(s)", report.len());
    print_validation(&report);
    Ok(0)
}

/// Seed 003: roll a deployed job back by deploying, on each device it changed, the image
/// that was there before (recorded when the task was sent), as new jobs.
fn rollback(store: &dyn Store, id: u64) -> anyhow::Result<i32> {
    let (j, tasks) = store
        .job(id)?
        .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
    if j.kind != "deploy" {
        bail!("job {id} is a {} job: only deploy jobs roll back", j.kind);
    }
    let mut by_image: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for t in tasks.iter().filter(|t| t.state == TaskState::Succeeded) {
        match &t.prev_image {
            Some(p) => by_image
                .entry((p.name.clone(), p.version.clone()))
                .or_default()
                .push(t.device),
            None => println!("{}: no previous image recorded, not rolled back", t.mac),
        }
    }
    if by_image.is_empty() {
        bail!("job {id}: nothing to roll back (no device with a known previous image)");
    }
    for ((name, version), devices) in by_image {
        let Some(img) = store.image(&name, Some(&version))? else {
            println!("image {name} {version} is no longer registered: register it again to roll {} device(s) back", devices.len());
            continue;
        };
        let mut options = j.options.clone();
        options.backup_first = false;
        let new = NewJob {
            kind: "deploy".into(),
            image: Some(img.id),
            options,
            selector: "list".into(),
            devices,
            note: Some(format!("rollback of job {id}")),
        };
        let (nid, report) = store.add_job(&new, now())?;
        println!(
            "job {nid} rolls {} device(s) back to {name} {version}",
            report.len()
        );
        print_validation(&report);
    }
    Ok(0)
}
