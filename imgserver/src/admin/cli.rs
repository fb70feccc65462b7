//! The command line's way into the admin core, on the server host (it opens the database
//! file directly and acts as [`Actor::host`]):
//!
//! - `imgserver admin add NAME --role admin|operator|viewer` prints a new token once;
//!   `admin list`, `admin revoke NAME`, `admin audit [--target T] [--limit N]`;
//! - every command that changes something (`schedule add|remove`, `job N --abort|--retry|
//!   --rollback`, `device MAC --operational|--group|--no-group`, `approve`, `forget`,
//!   `image add|remove`) runs through the core, so it is validated and audited exactly as
//!   the API does it; `schedule add` also takes `--at TIME`, `--until TIME`, `--tz ZONE`
//!   and `--validate-only`;
//! - `jobs`, `devices` and `transcript` show times in the administrator's zone (`--tz`,
//!   else `$TZ`), and `jobs` each job's window and who made it.
//!
//! The rest of the command line (`init`, `serve`, the listings) stays in [`crate::cli`].

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use super::{window, Actor, Admin, AdminError, JobCreated, JobRequest, Role, ValidationRow};
use crate::cli::{Args, Command};
use crate::store::SqliteStore;

/// `--` options this module adds to the command line (each takes a value unless listed in
/// [`FLAGS`]).
const VALUED: &[&str] = &["at", "until", "tz", "role", "limit", "target"];
const FLAGS: &[&str] = &["validate-only"];

/// Ours: the admin options found in argv, and argv without them.
#[derive(Debug, Default, PartialEq)]
struct Extra {
    at: Option<String>,
    until: Option<String>,
    tz: Option<String>,
    role: Option<String>,
    limit: Option<String>,
    target: Option<String>,
    validate_only: bool,
}

fn split(args: &[OsString]) -> anyhow::Result<(Extra, Vec<OsString>)> {
    let mut e = Extra::default();
    let mut rest = Vec::new();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        let Some(long) = s.strip_prefix("--") else {
            rest.push(a.clone());
            continue;
        };
        let (name, inline) = match long.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (long, None),
        };
        if FLAGS.contains(&name) {
            e.validate_only = true;
            continue;
        }
        if !VALUED.contains(&name) {
            rest.push(a.clone());
            continue;
        }
        let v = match inline {
            Some(v) => v,
            None => it
                .next()
                .ok_or_else(|| anyhow!("--{name} needs a value"))?
                .to_string_lossy()
                .into_owned(),
        };
        let slot = match name {
            "at" => &mut e.at,
            "until" => &mut e.until,
            "tz" => &mut e.tz,
            "role" => &mut e.role,
            "limit" => &mut e.limit,
            _ => &mut e.target,
        };
        *slot = Some(v);
    }
    Ok((e, rest))
}

fn data_dir(rest: &[OsString]) -> PathBuf {
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--data" {
            if let Some(v) = it.next() {
                return PathBuf::from(v);
            }
        } else if let Some(v) = s.strip_prefix("--data=") {
            return PathBuf::from(v);
        }
    }
    std::env::var_os("IMGSERVER_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/imgserver"))
}

fn words(rest: &[OsString]) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = rest.iter();
    while let Some(a) = it.next() {
        let s = a.to_string_lossy();
        if s == "--data" {
            it.next();
        } else if !s.starts_with('-') {
            out.push(s.into_owned());
        }
    }
    out
}

fn open(data: &Path) -> anyhow::Result<Admin> {
    let db = data.join("imgserver.db");
    if !db.exists() {
        bail!(
            "no database at {}: run `imgserver --data {} init` first",
            db.display(),
            data.display()
        );
    }
    // As `crate::cli` opens it: the data directory 0700, the database files 0600 (an older
    // installation's wider modes are tightened).
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
            .with_context(|| format!("making {} private (0700)", data.display()))?;
        for f in ["imgserver.db", "imgserver.db-wal", "imgserver.db-shm"] {
            let p = data.join(f);
            match std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o600)) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                    return Err(e).with_context(|| format!("making {} private (0600)", p.display()))
                }
                _ => {}
            }
        }
    }
    let store = SqliteStore::open(&db).with_context(|| format!("opening {}", db.display()))?;
    Ok(Admin::open(
        data,
        Arc::new(store),
        crate::model::DEFAULT_RELOAD_WAIT_SECS,
    )?)
}

/// Called first by `imgserver`'s entry point: Some(exit code) when this module handled
/// the command line, None to let [`crate::cli`] run it.
pub fn intercept(args: &[OsString]) -> Option<i32> {
    let (extra, rest) = match split(args) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            return Some(2);
        }
    };
    let w = words(&rest);
    let res = if w.first().map(String::as_str) == Some("admin") {
        admin_command(&data_dir(&rest), &w[1..], &extra)
    } else {
        let touched = extra != Extra::default();
        // Everything else parses as before (so its options mean the same), then the
        // changing commands run through the core.
        let parsed = match crate::cli::parse(rest.clone()) {
            Ok(a) => a,
            Err(e) if touched => {
                eprintln!("imgserver: {e:#}");
                return Some(2);
            }
            Err(_) => return None,
        };
        match core_command(parsed, &extra) {
            Ok(None) if touched => {
                eprintln!("imgserver: --at, --until, --tz and --validate-only go with `schedule add`, `job N --retry|--rollback`, `jobs` or `admin audit`");
                return Some(2);
            }
            Ok(None) => return None,
            Ok(Some(code)) => Ok(code),
            Err(e) => Err(e),
        }
    };
    Some(match res {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            match e.downcast_ref::<AdminError>() {
                Some(AdminError::Blocked(..)) => 3,
                _ => 1,
            }
        }
    })
}

fn admin_command(data: &Path, w: &[String], e: &Extra) -> anyhow::Result<i32> {
    let w: Vec<&str> = w.iter().map(String::as_str).collect();
    let me = Actor::host();
    match w.as_slice() {
        ["add", name] => {
            let role = e.role.as_deref().ok_or_else(|| {
                anyhow!("admin add {name} needs --role admin|operator|viewer")
            })?;
            let role = Role::parse(role)
                .ok_or_else(|| anyhow!("--role {role:?}: use admin, operator or viewer"))?;
            let token = open(data)?.add_token(&me, name, role)?;
            println!("{token}");
            eprintln!(
                "admin token {name:?} ({}) issued: it is shown this once and stored only hashed; send it as `Authorization: Bearer TOKEN`",
                role.as_str()
            );
            Ok(0)
        }
        ["list"] => {
            let tz = window::zone(e.tz.as_deref())?;
            let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY", "LAST USED", "REVOKED"]);
            for k in open(data)?.tokens(&me)? {
                t.row(vec![
                    k.name,
                    k.role.as_str().into(),
                    window::show(k.created, &tz),
                    k.created_by,
                    k.last_used
                        .map(|x| window::show(x, &tz))
                        .unwrap_or_else(|| "never".into()),
                    k.revoked
                        .map(|x| window::show(x, &tz))
                        .unwrap_or_else(|| "-".into()),
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        ["revoke", name] => {
            open(data)?.revoke_token(&me, name)?;
            println!("admin token {name:?} revoked");
            Ok(0)
        }
        ["audit"] => {
            let tz = window::zone(e.tz.as_deref())?;
            let limit = match &e.limit {
                Some(l) => l
                    .parse()
                    .map_err(|_| anyhow!("--limit {l:?} is not a number"))?,
                None => 100,
            };
            let mut t = Table::new(&["WHEN", "WHO", "ROLE", "ACTION", "TARGET", "DETAIL"]);
            for a in open(data)?.audit(&me, e.target.as_deref(), limit)? {
                t.row(vec![
                    window::show(a.at, &tz),
                    a.actor,
                    a.role.as_str().into(),
                    a.action,
                    a.target,
                    a.detail,
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        _ => bail!(
            "usage: imgserver admin add NAME --role admin|operator|viewer | admin list | admin revoke NAME | admin audit [--target job:N|device:MAC|image:N|token:NAME] [--limit N]"
        ),
    }
}

fn print_table(rows: &[ValidationRow]) {
    let mut t = Table::new(&["DEVICE", "VALIDATION", "NOTES"]);
    for r in rows {
        t.row(vec![
            r.mac.clone(),
            r.status.clone(),
            r.errors
                .iter()
                .chain(r.warnings.iter())
                .cloned()
                .collect::<Vec<_>>()
                .join("; "),
        ]);
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
        print_table(&made.validation);
    }
    if !made.blocked.is_empty() {
        println!(
            "not created for {} (validation errors): fix them and schedule those devices again",
            made.blocked.join(", ")
        );
    }
    Ok(())
}

fn with_window(e: &Extra) -> JobRequest {
    JobRequest {
        at: e.at.clone(),
        until: e.until.clone(),
        tz: e.tz.clone(),
        ..Default::default()
    }
}

/// The changing commands through the core; None for the ones [`crate::cli`] runs.
fn core_command(args: Args, e: &Extra) -> anyhow::Result<Option<i32>> {
    let data = args.data.clone();
    let me = Actor::host();
    let tz = window::zone(e.tz.as_deref())?;
    match args.command {
        Command::ScheduleAdd {
            selector,
            kind,
            image,
            options,
            note,
        } => {
            let admin = open(&data)?;
            let req = JobRequest {
                target: selector,
                capture: (kind == "capture")
                    .then(|| {
                        Some(format!(
                            "{}:{}",
                            options.capture_name.clone()?,
                            options.capture_version.clone()?
                        ))
                    })
                    .flatten(),
                image: (kind == "deploy").then_some(image).flatten(),
                kind,
                options,
                note,
                validate_only: e.validate_only,
                ..with_window(e)
            };
            let made = match admin.create_job(&me, &req) {
                Err(AdminError::Blocked(msg, table)) => {
                    print_table(&table);
                    return Err(AdminError::Blocked(msg, table).into());
                }
                r => r?,
            };
            if made.job.is_none() {
                println!("validation only: nothing was created");
            }
            print_created(&made, &tz, &admin)?;
            Ok(Some(if made.blocked.is_empty() { 0 } else { 3 }))
        }
        Command::ScheduleRemove { job } => {
            open(&data)?.remove_job(&me, job)?;
            println!("job {job} removed");
            Ok(Some(0))
        }
        Command::Job {
            id,
            action: Some(action),
        } => {
            let admin = open(&data)?;
            match action.as_str() {
                "abort" => {
                    let n = admin.abort_job(&me, id)?;
                    println!("job {id} aborted: {n} device(s) not started are cancelled; devices already imaging finish (seed 003)");
                }
                "retry" => {
                    let made = admin.retry_job(&me, id, &with_window(e))?;
                    println!(
                        "job {} retries job {id} on {} device(s)",
                        made.job.unwrap_or_default(),
                        made.validation.len()
                    );
                    print_created(&made, &tz, &admin)?;
                }
                _ => {
                    let (made, skipped) = admin.rollback_job(&me, id, &with_window(e))?;
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
                        print_created(&m, &tz, &admin)?;
                    }
                }
            }
            Ok(Some(0))
        }
        Command::Job { id, action: None } => {
            // The job as `imgserver job N` shows it, then its window and who made it.
            let code = crate::cli::run(Args {
                data: data.clone(),
                command: Command::Job { id, action: None },
            })?;
            // A removed job has no window to show.
            let Ok(j) = open(&data)?.job(&me, id) else {
                return Ok(Some(code));
            };
            println!(
                "  window: {} ({}); changed by {}; last action {}",
                window_text(j.summary.at, j.summary.until, &tz),
                match j.summary.window {
                    window::Window::Always => "at once",
                    window::Window::NotYet(_) => "not open yet",
                    window::Window::Open => "open",
                    window::Window::Closed(_) => "closed",
                },
                j.summary.changed_by.as_deref().unwrap_or("-"),
                window::show(j.summary.last_action, &tz)
            );
            Ok(Some(code))
        }
        Command::Jobs => {
            let admin = open(&data)?;
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
            let mut jobs = admin.jobs(&me)?;
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
            Ok(Some(0))
        }
        Command::Devices { reload_wait } => {
            let mut admin = open(&data)?;
            admin.reload_wait = reload_wait;
            let mut t = Table::new(&[
                "MAC",
                "STATE",
                "IMAGE",
                "MODEL",
                "SERIAL",
                "GROUP",
                "LAST CHECK-IN",
                "NOTE",
            ]);
            for d in admin.devices(&me, &super::DeviceFilter::default())? {
                let note = if d.state == "pending_approval" {
                    format!(
                        "enrolment from {} without the site secret: `imgserver approve {}` or `imgserver forget {}`",
                        d.enrol_addr.as_deref().unwrap_or("?"),
                        d.mac,
                        d.mac
                    )
                } else {
                    d.state_reason.clone().unwrap_or_default()
                };
                t.row(vec![
                    d.mac.clone(),
                    if d.state == "not_enrolled" {
                        "(not enrolled)".into()
                    } else {
                        d.state_title.clone()
                    },
                    d.image
                        .map(|i| format!("{} {}", i.name, i.version))
                        .unwrap_or_else(|| "-".into()),
                    d.model.unwrap_or_else(|| "-".into()),
                    d.serial.unwrap_or_else(|| "-".into()),
                    d.group.unwrap_or_else(|| "-".into()),
                    d.last_seen
                        .map(|x| window::show(x, &tz))
                        .unwrap_or_else(|| "never".into()),
                    note,
                ]);
            }
            print!("{}", t.render());
            Ok(Some(0))
        }
        Command::Transcript { mac, task } => {
            for l in open(&data)?.transcript(&me, &mac, task)? {
                println!(
                    "{} {} {}",
                    window::show(l.at, &tz),
                    l.task
                        .map(|t| format!("[task {t}]"))
                        .unwrap_or_else(|| "[device]".into()),
                    l.line
                );
            }
            Ok(Some(0))
        }
        Command::Device {
            mac,
            operational,
            group,
        } if operational || group.is_some() => {
            let admin = open(&data)?;
            if let Some(g) = &group {
                admin.set_group(&me, &mac, g.as_deref())?;
                println!("{mac}: group {}", g.as_deref().unwrap_or("(none)"));
            }
            if operational {
                admin.make_operational(&me, &mac)?;
                println!("{mac}: Operational");
            }
            drop(admin);
            // Then show the device as `imgserver device MAC` does.
            crate::cli::run(Args {
                data,
                command: Command::Device {
                    mac,
                    operational: false,
                    group: None,
                },
            })
            .map(Some)
        }
        Command::Approve { mac } => {
            open(&data)?.approve(&me, &mac)?;
            println!("{mac}: enrolment approved; the device gets its jobs at its next check-in");
            Ok(Some(0))
        }
        Command::Forget { mac } => {
            open(&data)?.forget(&me, &mac)?;
            println!("{mac}: records deleted; the device enrols again at its next check-in and can be imaged again");
            Ok(Some(0))
        }
        Command::ImageAdd { what, min_ram, ca } => {
            let admin = open(&data)?;
            let img = if what.starts_with("http://") || what.starts_with("https://") {
                admin.add_image_url(&me, &what, ca, min_ram)?
            } else {
                admin.add_image_file(&me, Path::new(&what), false, min_ram)?
            };
            println!(
                "registered image {} {} (id {}, {}{})",
                img.name,
                img.version,
                img.id,
                if img.facts.whole_disk {
                    "whole disk"
                } else {
                    "partition"
                },
                if img.sealed { ", sealed" } else { "" }
            );
            Ok(Some(0))
        }
        Command::ImageRemove { spec } => {
            let img = open(&data)?.remove_image(&me, &spec)?;
            println!("unregistered image {} {}", img.name, img.version);
            Ok(Some(0))
        }
        _ => Ok(None),
    }
}

/// A plain text table, columns as wide as their widest cell.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Table {
        Table {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let mut s = String::new();
            let last = cells.len().saturating_sub(1);
            for (i, c) in cells.iter().enumerate() {
                s.push_str(c);
                if i < last {
                    s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(self.head.clone());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn os(v: &[&str]) -> Vec<OsString> {
        v.iter().map(OsString::from).collect()
    }

    #[test]
    fn admin_options_are_taken_out_and_the_rest_parses_as_before() {
        let (e, rest) = split(&os(&[
            "--data",
            "/d",
            "schedule",
            "add",
            "--all",
            "--image",
            "os:2",
            "--at",
            "2026-11-29 07:00",
            "--until=+2h",
            "--tz",
            "Asia/Tokyo",
            "--validate-only",
            "--partition",
            "2",
        ]))
        .unwrap();
        assert_eq!(e.at.as_deref(), Some("2026-11-29 07:00"));
        assert_eq!(e.until.as_deref(), Some("+2h"));
        assert_eq!(e.tz.as_deref(), Some("Asia/Tokyo"));
        assert!(e.validate_only);
        let a = crate::cli::parse(rest.clone()).unwrap();
        assert_eq!(a.data, PathBuf::from("/d"));
        assert!(matches!(a.command, Command::ScheduleAdd { .. }));
        assert_eq!(data_dir(&rest), PathBuf::from("/d"));
        assert!(split(&os(&["schedule", "add", "--at"])).is_err());
        let (e, rest) = split(&os(&["admin", "add", "ops", "--role", "operator"])).unwrap();
        assert_eq!(e.role.as_deref(), Some("operator"));
        assert_eq!(words(&rest), vec!["admin", "add", "ops"]);
    }
}
