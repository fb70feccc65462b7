//! `imgserver session start|list|stop`: multicast sessions the serving process runs as
//! master ([`crate::mcast`]). `start` and `stop` go through the admin core
//! ([`crate::admin::sessions`], as the admin API and the web console do): `start` creates the
//! devices' job (validated and audited as `schedule add`) and the session row the server
//! takes; `stop` raises the session's stop flag and aborts the job's pending tasks (audited
//! as `job N --abort`); `list` reads both.

use std::ffi::OsString;
use std::path::Path;

use anyhow::{anyhow, bail};

use super::*;
use crate::admin::sessions::SessionRequest;
use crate::mcast::{self, Settings};

/// The `session` lines of the usage text, written once: `imgserver` prints them in its whole
/// usage (`args::USAGE`) and `session` alone prints them when its words are wrong.
macro_rules! session_usage {
    () => {
        "  session start NAME --image NAME[:VERSION]|ID (--mac MAC ... | --all)
        [--clients N] [--timeout MIN] [--throttle MS] [--latejoin] [--addr A.B.C.D]
        [--interface IF] [--disk D] [--part P]
                                      the server (imgserver serve) sends the image to the
                                      devices at once; they join at their next check-in
  session list                        sessions: state, clients, each device's progress/result
  session stop NAME                   end it: master stopped, devices' pending tasks cancelled"
    };
}
pub(crate) use session_usage;

pub const USAGE: &str = session_usage!();

/// A parsed `session` command.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionCommand {
    Start {
        name: String,
        image: String,
        macs: Vec<String>,
        all: bool,
        settings: Settings,
        disk: Option<String>,
        part: Option<String>,
    },
    List,
    Stop {
        name: String,
    },
}

/// Is this command line a `session` command? (The first word after the global options.)
pub fn is_session(args: &[OsString]) -> bool {
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.to_str() {
            Some("--data" | "--tz") => {
                it.next();
            }
            Some(s) if s.starts_with("--data=") || s.starts_with("--tz=") => {}
            Some("session") => return true,
            _ => return false,
        }
    }
    false
}

fn num<T: std::str::FromStr>(what: &str, v: &str) -> anyhow::Result<T> {
    v.parse()
        .map_err(|_| anyhow!("{what}: {v:?} is not a number"))
}

/// Stage one for `session ...`: the global options, then the session's.
pub fn parse(
    args: Vec<OsString>,
) -> anyhow::Result<(std::path::PathBuf, Option<String>, SessionCommand)> {
    use lexopt::prelude::*;
    let mut p = lexopt::Parser::from_iter(std::iter::once(OsString::from("imgserver")).chain(args));
    let mut data = std::env::var_os("IMGSERVER_DATA")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("/var/lib/imgserver"));
    let mut tz = None;
    let mut words = Vec::new();
    let mut image = None;
    let mut macs = Vec::new();
    let mut all = false;
    let mut s = Settings::default();
    let mut disk = None;
    let mut part = None;
    while let Some(arg) = p.next()? {
        match arg {
            Long("data") => data = p.value()?.into(),
            Long("tz") => tz = Some(p.value()?.string()?),
            Long("image") => image = Some(p.value()?.string()?),
            Long("mac") => {
                let v = p.value()?.string()?;
                macs.push(
                    crate::protocol::normalize_mac(&v)
                        .ok_or_else(|| anyhow!("{v:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))?,
                )
            }
            Long("all") => all = true,
            Long("clients") => {
                let n: usize = num("--clients", &p.value()?.string()?)?;
                if n == 0 {
                    bail!("--clients 0: give at least 1");
                }
                s.clients = Some(n)
            }
            Long("timeout") => s.timeout_min = Some(num("--timeout", &p.value()?.string()?)?),
            Long("throttle") => s.throttle_ms = num("--throttle", &p.value()?.string()?)?,
            Long("latejoin") => s.latejoin = true,
            Long("addr") => {
                let a = p.value()?.string()?;
                mcast::check_addr(&a)?;
                s.addr = Some(a)
            }
            Long("interface") => s.interface = Some(p.value()?.string()?),
            Long("disk") => disk = Some(p.value()?.string()?),
            Long("part") | Long("partition") => part = Some(p.value()?.string()?),
            Value(v) => words.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    let start_only = image.is_some()
        || !macs.is_empty()
        || all
        || s != Settings::default()
        || disk.is_some()
        || part.is_some();
    let cmd = match w.as_slice() {
        ["session", "start", name] => {
            imgengine::multicast::check_name(name).map_err(|e| anyhow!("{e}"))?;
            let image = image
                .ok_or_else(|| anyhow!("session start {name} needs --image NAME[:VERSION]|ID"))?;
            if macs.is_empty() != all {
                bail!("session start {name}: give --mac MAC (repeatable) or --all");
            }
            macs.sort();
            macs.dedup();
            SessionCommand::Start {
                name: name.to_string(),
                image,
                macs,
                all,
                settings: s,
                disk,
                part,
            }
        }
        ["session", "list"] if !start_only => SessionCommand::List,
        ["session", "stop", name] if !start_only => SessionCommand::Stop {
            name: name.to_string(),
        },
        _ => bail!("usage:\n{USAGE}"),
    };
    Ok((data, tz, cmd))
}

/// Stage two.
pub fn run(data: &Path, tz: Option<&str>, cmd: SessionCommand) -> anyhow::Result<i32> {
    match cmd {
        SessionCommand::Start {
            name,
            image,
            macs,
            all,
            settings,
            disk,
            part,
        } => {
            let admin = open_admin(data)?;
            let req = SessionRequest {
                name,
                image,
                macs,
                all,
                clients: settings.clients,
                timeout_min: settings.timeout_min,
                throttle_ms: settings.throttle_ms,
                latejoin: settings.latejoin,
                addr: settings.addr,
                interface: settings.interface,
                disk,
                part,
            };
            let made = admin.start_session(&Actor::host(), &req)?;
            for b in &made.blocked {
                eprintln!(
                    "imgserver: session {}: {b} is kept out by validation (see `imgserver job {}`)",
                    made.name, made.job
                );
            }
            println!(
                "session {}: {} for {}; job {}; the server (imgserver serve) runs the master, starting {}; the devices join at their next check-in; `imgserver session list` shows it",
                made.name, made.image, made.devices, made.job, made.starts
            );
            Ok(if made.blocked.is_empty() { 0 } else { 3 })
        }
        SessionCommand::List => list(data, tz),
        SessionCommand::Stop { name } => {
            let admin = open_admin(data)?;
            let s = admin.stop_session(&Actor::host(), &name)?;
            println!(
                "session {}: stopped by the administrator; the master ends it within a second (devices in the session fail: the master ended it); {} pending task(s) of job {} cancelled",
                s.name, s.cancelled, s.job
            );
            Ok(0)
        }
    }
}

fn pct(done: u64, total: u64) -> String {
    match (done * 100).checked_div(total) {
        Some(p) => format!("{p}%"),
        None => "-".into(),
    }
}

/// `imgserver session list`.
fn list(data: &Path, tz: Option<&str>) -> anyhow::Result<i32> {
    let tz = crate::admin::window::zone(tz)?;
    let conn = mcast::open_db(data)?;
    let store = open_store(data)?;
    let sessions = mcast::list(&conn)?;
    if sessions.is_empty() {
        println!("no sessions: `imgserver session start NAME --image ... --mac ...` makes one");
        return Ok(0);
    }
    for s in sessions {
        let image = store
            .image_by_id(s.image)?
            .map(|i| format!("{} {}", i.name, i.version))
            .unwrap_or_else(|| format!("image {}", s.image));
        println!(
            "session {}: {} (job {}, {image}, changed {}): {}",
            s.name,
            s.state,
            s.job,
            crate::admin::window::show(s.updated, &tz),
            s.message
        );
        let mut t = Table::new(&["CLIENT", "ADDRESS", "STATE", "PROGRESS", "BYTES", "MESSAGE"]);
        for c in &s.clients {
            t.row(vec![
                c.name.clone(),
                c.addr.clone(),
                if c.late {
                    format!("{} (late)", c.state)
                } else {
                    c.state.clone()
                },
                if c.state == "done" {
                    "100%".into()
                } else {
                    pct(c.bytes_done, c.bytes_total)
                },
                fmt_bytes(c.bytes_done),
                c.message.clone(),
            ]);
        }
        if !s.clients.is_empty() {
            print!("{}", t.render());
        }
        if let Some((_, tasks)) = store.job(s.job)? {
            let mut t = Table::new(&["DEVICE", "TASK", "RESULT", "PROGRESS", "MESSAGE"]);
            for k in tasks {
                t.row(vec![
                    k.mac.clone(),
                    k.id.to_string(),
                    k.state.as_str().into(),
                    if k.state == crate::model::TaskState::Succeeded {
                        "100%".into()
                    } else {
                        k.progress
                            .as_ref()
                            .and_then(|p| p.percent)
                            .map(|p| format!("{p:.0}%"))
                            .unwrap_or_else(|| "-".into())
                    },
                    k.message.unwrap_or_default(),
                ]);
            }
            print!("{}", t.render());
        }
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> anyhow::Result<SessionCommand> {
        let v: Vec<OsString> = s.split_whitespace().map(OsString::from).collect();
        assert!(is_session(&v), "{s}");
        parse(v).map(|(_, _, c)| c)
    }

    #[test]
    fn session_commands_parse() {
        assert_eq!(
            p("--data /d session start room1 --image os:2 --mac 52-54-00-00-00-02 --mac 52:54:00:00:00:01 --throttle 3 --latejoin --addr 231.1.2.3 --part 2").unwrap(),
            SessionCommand::Start {
                name: "room1".into(),
                image: "os:2".into(),
                macs: vec!["52:54:00:00:00:01".into(), "52:54:00:00:00:02".into()],
                all: false,
                settings: Settings {
                    throttle_ms: 3,
                    latejoin: true,
                    addr: Some("231.1.2.3".into()),
                    ..Default::default()
                },
                disk: None,
                part: Some("2".into()),
            }
        );
        assert!(matches!(
            p("session start r --image 4 --all --clients 30 --timeout 2").unwrap(),
            SessionCommand::Start {
                all: true,
                settings: Settings {
                    clients: Some(30),
                    timeout_min: Some(2),
                    ..
                },
                ..
            }
        ));
        assert_eq!(p("session list").unwrap(), SessionCommand::List);
        assert_eq!(
            p("session stop r").unwrap(),
            SessionCommand::Stop { name: "r".into() }
        );
        // Errors name the thing and the way out.
        for (bad, says) in [
            ("session start r --all", "--image"),
            ("session start r --image i", "--mac MAC"),
            (
                "session start r --image i --all --mac 52:54:00:00:00:01",
                "--mac MAC",
            ),
            (
                "session start r --image i --all --addr 10.0.0.1",
                "multicast",
            ),
            ("session start r --image i --all --clients 0", "at least 1"),
            ("session start r --image i --mac nope", "not a MAC"),
            (
                "session start two%20words --image i --all --clients x",
                "not a number",
            ),
            ("session list --latejoin", "usage"),
            ("session frob", "usage"),
        ] {
            let e = p(bad).unwrap_err().to_string();
            assert!(e.contains(says), "{bad}: {e}");
        }
        assert!(!is_session(&["image".into(), "list".into()]));
        assert!(is_session(&["--data=/x".into(), "session".into()]));
    }
}
