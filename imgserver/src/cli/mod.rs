//! The administrator's command line: `imgserver init|serve|image|schedule|devices|device|
//! jobs|job|forget|transcript`. The admin commands open the same SQLite file as the running
//! server (WAL mode: they never block it), so they work whether the server runs or not.
//!
//! Arguments are parsed in two stages as elsewhere in the project: lexopt turns argv into a
//! [`Command`] with no side effects (unit-tested), then [`run`] hands it to the file of its command family.
//!
//! Every change and every reading the admin core ([`crate::admin`]) offers goes through it,
//! as [`Actor::host`], so the command line is validated and audited exactly as the API is.
//!
//! Files: `args.rs` (USAGE, [`Command`], [`parse`]), `serve.rs` (init, serve), `images.rs`
//! (image add/list/remove/sign/url), `devices.rs` (devices, device, approve, forget,
//! transcript), `jobs.rs` (schedule, jobs, job), `admin.rs` (admin tokens and the audit
//! trail), `session.rs` (multicast sessions the server runs), `table.rs` (the table every
//! listing prints).

use std::ffi::OsString;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use crate::admin::{Actor, Admin, AdminError};
use crate::store::{SqliteStore, Store};

mod admin;
mod args;
mod devices;
mod images;
mod jobs;
mod serve;
mod session;
mod table;

pub use args::{parse, size, Args, Command, PxeOptions, Window, USAGE};
use table::Table;

/// UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(t: u64) -> String {
    let (y, m, d) = crate::tls::civil_from_days((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// The data directory, created or tightened to 0700: it holds the CA key, the site
/// secrets, the database and captured images (which hold devices' credentials).
fn private_dir(data: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", data.display()))
}

/// Make `path` 0600 if it exists.
fn private_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("making {} private (0600)", path.display()))
        }
        _ => Ok(()),
    }
}

fn open_store(data: &std::path::Path) -> anyhow::Result<SqliteStore> {
    private_dir(data)?;
    let db = data.join("imgserver.db");
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 before SQLite opens it (its WAL and shared-memory files take the
        // database file's mode); an older, wider database is tightened.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .with_context(|| format!("creating {}", db.display()))?;
    }
    for f in ["imgserver.db", "imgserver.db-wal", "imgserver.db-shm"] {
        private_file(&data.join(f))?;
    }
    SqliteStore::open(&db).with_context(|| format!("opening {}", db.display()))
}

/// A server secret in the data directory (`enrol.key`, `url.key`): read, or made (256 bits
/// from the OS, hex, 0600) the first time.
pub fn site_secret(data: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let path = data.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            private_file(&path)?;
            Ok(s.trim().to_string())
        }
        Ok(_) => bail!(
            "{} is empty: delete it to have a new secret made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = crate::api::new_secret();
            crate::tls::write_secret(&path, &format!("{s}\n"))?;
            Ok(s)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// The admin core over the server's database, which must exist already (`init` makes it).
fn open_admin(data: &std::path::Path) -> anyhow::Result<Admin> {
    let db = data.join("imgserver.db");
    if !db.exists() {
        bail!(
            "no database at {}: run `imgserver --data {} init` first",
            db.display(),
            data.display()
        );
    }
    let store = open_store(data)?;
    Ok(Admin::open(
        data,
        Arc::new(store),
        crate::model::DEFAULT_RELOAD_WAIT_SECS,
    )?)
}

fn now() -> u64 {
    crate::api::now()
}

fn find_image(store: &dyn Store, spec: &str) -> anyhow::Result<crate::store::ImageRow> {
    if let Ok(id) = spec.parse::<u64>() {
        if let Some(img) = store.image_by_id(id)? {
            return Ok(img);
        }
    }
    let (name, version) = match spec.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    store
        .image(name, version)?
        .ok_or_else(|| anyhow!("no image {spec}: see `imgserver image list`"))
}

fn fmt_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Stage two: carry the command out. Returns the exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let data = args.data.as_path();
    let tz = args.tz.as_deref();
    match args.command {
        Command::Help => {
            println!("{USAGE}");
            Ok(0)
        }
        Command::Init { names, renew } => serve::init(data, names, renew),
        Command::Serve {
            listen,
            public_url,
            plain,
            interval,
            reload_wait,
            pxe,
            limits,
            open_enrolment,
        } => serve::serve(
            data,
            serve::Settings {
                listen,
                public_url,
                plain,
                interval,
                reload_wait,
                pxe,
                limits,
                open_enrolment,
            },
        ),
        Command::ImageAdd {
            what,
            min_ram,
            ca,
            autogenic,
            rsp,
        } => images::image_add(data, what, min_ram, ca, autogenic, rsp),
        Command::ImageList => images::image_list(data),
        Command::ImageRemove { spec } => images::image_remove(data, spec),
        Command::ImageSign { spec, key } => images::image_sign(data, spec, key),
        Command::ImageUrl {
            spec,
            expires,
            base,
        } => images::image_url(data, spec, expires, base),
        Command::ScheduleAdd {
            selector,
            kind,
            image,
            options,
            note,
            window,
            validate_only,
        } => {
            let req = jobs::request(selector, kind, image, options, note, window, tz);
            jobs::schedule_add(data, req, validate_only)
        }
        Command::ScheduleRemove { job } => jobs::schedule_remove(data, job),
        Command::Jobs => jobs::jobs(data, tz),
        Command::Job { id, action, window } => jobs::job(data, id, action, window, tz),
        Command::Devices { reload_wait } => devices::devices(data, reload_wait, tz),
        Command::Device {
            mac,
            operational,
            group,
        } => devices::device(data, mac, operational, group),
        Command::Approve { mac } => devices::approve(data, mac),
        Command::Forget { mac } => devices::forget(data, mac),
        Command::Transcript { mac, task } => devices::transcript(data, mac, task, tz),
        Command::AdminAdd { name, role } => admin::add(data, name, role),
        Command::AdminList => admin::list(data, tz),
        Command::AdminRevoke { name } => admin::revoke(data, name),
        Command::AdminAudit { target, limit } => admin::audit(data, target, limit, tz),
        Command::Session(c) => session::run(data, tz, c),
        Command::AdminUsage => bail!(
            "usage: imgserver admin add NAME --role admin|operator|viewer | admin list | admin revoke NAME | admin audit [--target job:N|device:MAC|image:N|token:NAME] [--limit N]"
        ),
    }
}

/// `imgserver` entry point: parse, run, map errors to exit codes (1 error, 2 usage, 3 a
/// job that validation kept from some or all of its devices).
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    // Everything imgserver creates (database, keys, uploads, repository files) is private
    // to its user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    let parsed = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            return 2;
        }
    };
    match run(parsed) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            match e.downcast_ref::<AdminError>() {
                Some(AdminError::Blocked(..)) => 3,
                _ => 1,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn utc_formats() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_767_225_600 + 3661), "2026-01-01 01:01:01");
    }
}
