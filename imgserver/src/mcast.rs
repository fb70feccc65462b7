//! Multicast sessions the server runs (`imgserver session start|list|stop`): the serving
//! process is the session's master (imgengine's [`Master`], the same code as
//! `img -session NAME -master`), sending an image from its repository; the devices named
//! get a `session` task (a job of kind `session`) at their next check-in, join as clients
//! and fetch by HTTP Range from the server what the session does not deliver. Their results
//! come back as ordinary task results.
//!
//! The command line and the serving process share the database: `session start` creates
//! the job (through the admin core, audited) and a row in `mcast_sessions`; the serving
//! process ([`supervise`]) takes rows no server owns, runs their master on a thread, and
//! writes the state, the registered clients and their progress back every half second;
//! `session stop` sets the row's stop flag, which the master's thread sees within half a
//! second (it tells the group the session is over, so devices in it fail with that reason),
//! and aborts the job's pending tasks.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use imgengine::multicast::master::{Event, Master, MasterConfig, Outcome};
use imgengine::multicast::{self, net};
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use crate::store::Store;

/// Session states (the `state` column).
pub const WAITING: &str = "waiting";
pub const RUNNING: &str = "running";
pub const DONE: &str = "done";
pub const STOPPED: &str = "stopped";
pub const FAILED: &str = "failed";

/// How often the master's thread writes its state and reads the stop flag.
const WRITE_EVERY: Duration = Duration::from_millis(500);
/// How often the serving process looks for new sessions.
const LOOK_EVERY: Duration = Duration::from_millis(500);

/// What `session start` asked for, beyond the image and the devices.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Settings {
    /// Start when this many devices registered (default: the number of `--mac`s).
    pub clients: Option<usize>,
    /// Start this many minutes after the last registration (default 5).
    pub timeout_min: Option<u64>,
    pub throttle_ms: u32,
    pub latejoin: bool,
    /// Group address override (`--addr`).
    pub addr: Option<String>,
    /// Interface the master sends on (`--interface`; default: the first one up).
    pub interface: Option<String>,
}

/// One client as the master sees it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClientRow {
    /// What the device calls itself (`host:disk`).
    pub name: String,
    pub addr: String,
    /// `receiving`, `done`, `failed` or `lost`.
    pub state: String,
    pub bytes_done: u64,
    pub bytes_total: u64,
    #[serde(default)]
    pub message: String,
    #[serde(default)]
    pub late: bool,
}

/// A session as stored.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRow {
    pub name: String,
    pub job: u64,
    pub image: u64,
    pub settings: Settings,
    pub state: String,
    pub message: String,
    pub clients: Vec<ClientRow>,
    pub stop: bool,
    pub owner: Option<String>,
    pub created: u64,
    pub updated: u64,
}

impl SessionRow {
    pub fn is_over(&self) -> bool {
        [DONE, STOPPED, FAILED].contains(&self.state.as_str())
    }
}

/// Check a group address override: a multicast IPv4 address.
pub fn check_addr(a: &str) -> anyhow::Result<Ipv4Addr> {
    a.parse::<Ipv4Addr>()
        .ok()
        .filter(Ipv4Addr::is_multicast)
        .ok_or_else(|| {
            anyhow!("--addr {a:?}: give a multicast address (224.0.0.0/4), e.g. 231.1.2.3")
        })
}

/// The sessions table in the server's database (made on first use).
pub fn open_db(data: &Path) -> anyhow::Result<Connection> {
    let db = data.join("imgserver.db");
    let conn = Connection::open(&db).with_context(|| format!("opening {}", db.display()))?;
    conn.busy_timeout(Duration::from_secs(10))?;
    conn.execute_batch(
        "CREATE TABLE IF NOT EXISTS mcast_sessions (
            name TEXT PRIMARY KEY COLLATE NOCASE,
            job_id INTEGER NOT NULL,
            image_id INTEGER NOT NULL,
            settings TEXT NOT NULL,
            state TEXT NOT NULL,
            message TEXT NOT NULL DEFAULT '',
            clients TEXT NOT NULL DEFAULT '[]',
            stop INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            created INTEGER NOT NULL,
            updated INTEGER NOT NULL
        );",
    )?;
    Ok(conn)
}

const COLS: &str =
    "name, job_id, image_id, settings, state, message, clients, stop, owner, created, updated";

fn row(r: &rusqlite::Row) -> rusqlite::Result<SessionRow> {
    Ok(SessionRow {
        name: r.get(0)?,
        job: r.get::<_, i64>(1)? as u64,
        image: r.get::<_, i64>(2)? as u64,
        settings: serde_json::from_str(&r.get::<_, String>(3)?).unwrap_or_default(),
        state: r.get(4)?,
        message: r.get(5)?,
        clients: serde_json::from_str(&r.get::<_, String>(6)?).unwrap_or_default(),
        stop: r.get::<_, i64>(7)? != 0,
        owner: r.get(8)?,
        created: r.get::<_, i64>(9)? as u64,
        updated: r.get::<_, i64>(10)? as u64,
    })
}

pub fn get(conn: &Connection, name: &str) -> anyhow::Result<Option<SessionRow>> {
    Ok(conn
        .query_row(
            &format!("SELECT {COLS} FROM mcast_sessions WHERE name = ?1"),
            [name],
            row,
        )
        .optional()?)
}

pub fn list(conn: &Connection) -> anyhow::Result<Vec<SessionRow>> {
    let mut st = conn.prepare(&format!(
        "SELECT {COLS} FROM mcast_sessions ORDER BY created, name"
    ))?;
    let v = st.query_map([], row)?.collect::<rusqlite::Result<_>>()?;
    Ok(v)
}

/// Refuse a name an unfinished session holds.
pub fn check_free(conn: &Connection, name: &str) -> anyhow::Result<()> {
    if let Some(s) = get(conn, name)? {
        if !s.is_over() {
            bail!(
                "session {} is {} (job {}): stop it first with `imgserver session stop {}`",
                s.name,
                s.state,
                s.job,
                s.name
            );
        }
    }
    Ok(())
}

/// Record a new session for the serving process to take (a finished one of the same
/// name is replaced).
pub fn insert(
    conn: &Connection,
    name: &str,
    job: u64,
    image: u64,
    settings: &Settings,
    now: u64,
) -> anyhow::Result<()> {
    check_free(conn, name)?;
    conn.execute(
        "INSERT OR REPLACE INTO mcast_sessions (name, job_id, image_id, settings, state, message, clients, stop, owner, created, updated)
         VALUES (?1, ?2, ?3, ?4, ?5, 'waiting for the serving process (`imgserver serve`) to take it', '[]', 0, NULL, ?6, ?6)",
        params![name, job as i64, image as i64, serde_json::to_string(settings)?, WAITING, now as i64],
    )?;
    Ok(())
}

/// Ask the serving process to end the session; returns it as it was.
pub fn request_stop(conn: &Connection, name: &str, now: u64) -> anyhow::Result<SessionRow> {
    let s = get(conn, name)?
        .ok_or_else(|| anyhow!("no session {name}: see `imgserver session list`"))?;
    if s.is_over() {
        bail!("session {} is already {}: {}", s.name, s.state, s.message);
    }
    if s.owner.is_none() {
        // No server took it yet: nothing runs; it ends here.
        conn.execute(
            "UPDATE mcast_sessions SET stop = 1, state = ?2, message = ?3, updated = ?4 WHERE name = ?1",
            params![s.name, STOPPED, "stopped by the administrator before the server started it", now as i64],
        )?;
    } else {
        conn.execute(
            "UPDATE mcast_sessions SET stop = 1, updated = ?2 WHERE name = ?1",
            params![s.name, now as i64],
        )?;
    }
    Ok(s)
}

fn write(
    conn: &Connection,
    name: &str,
    state: &str,
    message: &str,
    clients: &[ClientRow],
) -> anyhow::Result<bool> {
    conn.execute(
        "UPDATE mcast_sessions SET state = ?2, message = ?3, clients = ?4, updated = ?5 WHERE name = ?1",
        params![name, state, message, serde_json::to_string(clients)?, crate::api::now() as i64],
    )?;
    let stop: i64 = conn.query_row(
        "SELECT stop FROM mcast_sessions WHERE name = ?1",
        [name],
        |r| r.get(0),
    )?;
    Ok(stop != 0)
}

fn stop_requested(conn: &Connection, name: &str) -> bool {
    conn.query_row(
        "SELECT stop FROM mcast_sessions WHERE name = ?1",
        [name],
        |r| r.get::<_, i64>(0),
    )
    .is_ok_and(|s| s != 0)
}

/// The job's tasks that never reached a device end with the session.
fn end_pending(conn: &Connection, s: &SessionRow, why: &str) -> anyhow::Result<usize> {
    let now = crate::api::now() as i64;
    let n = conn.execute(
        "UPDATE tasks SET state = 'aborted', message = ?2, updated = ?3, finished = ?3 WHERE job_id = ?1 AND state = 'pending'",
        params![s.job as i64, why, now],
    )?;
    // A job for all devices or a group would reach devices that enrol later: it ends too.
    // A job for fixed devices keeps its state (its tasks have all ended now).
    conn.execute(
        "UPDATE jobs SET state = 'aborted' WHERE id = ?1 AND state = 'active' AND (selector = 'all' OR selector LIKE 'group:%')",
        [s.job as i64],
    )?;
    Ok(n)
}

fn client_rows(m: &Master) -> Vec<ClientRow> {
    m.clients
        .iter()
        .map(|c| ClientRow {
            name: c.name.clone(),
            addr: c.addr.to_string(),
            state: match c.outcome {
                Outcome::Receiving => "receiving",
                Outcome::Done => "done",
                Outcome::Failed => "failed",
                Outcome::Lost => "lost",
            }
            .into(),
            bytes_done: c.bytes_done,
            bytes_total: c.bytes_total,
            message: c.message.clone(),
            late: c.late,
        })
        .collect()
}

/// The serving process's side: take sessions and run their masters, until the process
/// ends. Sessions another run of the server owned and left unfinished are failed first.
pub fn supervise(data: PathBuf, store: Arc<dyn Store>) {
    let owner = crate::api::new_secret()[..16].to_string();
    let conn = match open_db(&data) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("imgserver: multicast sessions are off: {e:#}");
            return;
        }
    };
    if let Err(e) = conn.execute(
        "UPDATE mcast_sessions SET state = ?1, message = 'the server stopped while the session ran: start it again with `imgserver session start`', updated = ?2
         WHERE owner IS NOT NULL AND state IN (?3, ?4)",
        params![FAILED, crate::api::now() as i64, WAITING, RUNNING],
    ) {
        eprintln!("imgserver: sessions: {e:#}");
    }
    loop {
        let waiting: Vec<String> = conn
            .prepare("SELECT name FROM mcast_sessions WHERE owner IS NULL AND state = ?1")
            .and_then(|mut st| {
                st.query_map([WAITING], |r| r.get(0))?
                    .collect::<rusqlite::Result<_>>()
            })
            .unwrap_or_default();
        for name in waiting {
            let took = conn
                .execute(
                    "UPDATE mcast_sessions SET owner = ?2 WHERE name = ?1 AND owner IS NULL AND state = ?3",
                    params![name, owner, WAITING],
                )
                .unwrap_or(0);
            if took == 1 {
                let (data, store) = (data.clone(), store.clone());
                std::thread::spawn(move || {
                    if let Err(e) = run(&data, store.as_ref(), &name) {
                        eprintln!("imgserver: session {name}: {e:#}");
                        if let Ok(c) = open_db(&data) {
                            let _ = write(&c, &name, FAILED, &format!("{e:#}"), &[]);
                            if let Ok(Some(s)) = get(&c, &name) {
                                let _ = end_pending(
                                    &c,
                                    &s,
                                    &format!("session {name} failed on the server: {e:#}"),
                                );
                            }
                        }
                    }
                });
            }
        }
        std::thread::sleep(LOOK_EVERY);
    }
}

/// Run one session's master to its end, writing its state as it goes.
fn run(data: &Path, store: &dyn Store, name: &str) -> anyhow::Result<()> {
    let conn = open_db(data)?;
    let s = get(&conn, name)?.ok_or_else(|| anyhow!("session row gone"))?;
    let img = store
        .image_by_id(s.image)?
        .ok_or_else(|| anyhow!("image {} was unregistered", s.image))?;
    let file = img.file.as_ref().ok_or_else(|| {
        anyhow!(
            "image {} {} is a URL, not a repository file: the server sends only images it holds",
            img.name,
            img.version
        )
    })?;
    let path = data.join("repo").join(file);
    let (ifname, ifaddr) = net::interface(s.settings.interface.as_deref())?;
    let group = match &s.settings.addr {
        Some(a) => check_addr(a)?,
        None => multicast::group_addr(name),
    };
    let mut cfg = MasterConfig::new(name, path.clone(), ifaddr);
    cfg.group = group;
    cfg.throttle_ms = s.settings.throttle_ms;
    cfg.latejoin = s.settings.latejoin;
    if let Some(mb) = std::env::var("IMG_SESSION_MAXRATE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg.max_rate = mb.max(1) * 1_000_000;
    }
    let mut m = Master::open(cfg).with_context(|| format!("opening {}", path.display()))?;
    let stop = Arc::new(AtomicBool::new(false));
    m.set_stop(stop.clone());
    eprintln!(
        "imgserver: session {name}: master on {ifname} ({ifaddr}), group {group}:{} for {} {} (job {})",
        multicast::PORT,
        img.name,
        img.version,
        s.job
    );
    let timeout = Duration::from_secs(60 * s.settings.timeout_min.unwrap_or(5));
    let want = s.settings.clients;
    let mut last_reg: Option<Instant> = None;
    let mut last_write = Instant::now() - WRITE_EVERY;
    let mut last_waiting: Option<(String, Vec<ClientRow>)> = None;
    // Registration.
    loop {
        for e in m.poll(Duration::from_millis(50))? {
            if matches!(e, Event::Registered { .. }) {
                last_reg = Some(Instant::now());
            }
        }
        let n = m.clients.len();
        let why = if want.is_some_and(|c| n >= c) {
            Some(format!("{n} device(s) registered"))
        } else if last_reg.is_some_and(|t| t.elapsed() >= timeout) {
            Some(format!(
                "{} min since the last registration",
                timeout.as_secs() / 60
            ))
        } else {
            None
        };
        if let Some(why) = why {
            eprintln!("imgserver: session {name}: starting ({why})");
            write(
                &conn,
                name,
                RUNNING,
                &format!("sending to {n} device(s) ({why})"),
                &client_rows(&m),
            )?;
            break;
        }
        if last_write.elapsed() >= WRITE_EVERY {
            last_write = Instant::now();
            let msg = format!(
                "master on {ifname} ({ifaddr}), group {group}; {n}{} device(s) registered",
                want.map(|w| format!(" of {w}")).unwrap_or_default()
            );
            let rows = client_rows(&m);
            let now = (msg.clone(), rows.clone());
            let stopping = if last_waiting.as_ref() != Some(&now) {
                last_waiting = Some(now);
                write(&conn, name, WAITING, &msg, &rows)?
            } else {
                stop_requested(&conn, name)
            };
            if stopping {
                m.abort();
                let msg = format!(
                    "stopped by the administrator before it started ({n} device(s) had registered)"
                );
                write(&conn, name, STOPPED, &msg, &client_rows(&m))?;
                return Ok(());
            }
        }
    }
    // Sending: the master's thread publishes its clients; this scope's writer persists
    // them and turns the stop flag into `stop`.
    let shared: Mutex<Vec<ClientRow>> = Mutex::new(client_rows(&m));
    let finished = AtomicBool::new(false);
    let started = Instant::now();
    let result = std::thread::scope(|sc| {
        let (shared, finished, stop) = (&shared, &finished, &stop);
        sc.spawn(move || {
            let Ok(c) = open_db(data) else { return };
            let mut last = None;
            while !finished.load(Ordering::Relaxed) {
                let rows = shared.lock().unwrap_or_else(|e| e.into_inner()).clone();
                let done = rows.iter().filter(|r| r.state == "done").count();
                let msg = format!("sending: {done} of {} device(s) done", rows.len());
                // Written when something changed; the stop flag is read every time.
                let now = (msg.clone(), rows.clone());
                let stopping = if last.as_ref() != Some(&now) {
                    last = Some(now);
                    write(&c, name, RUNNING, &msg, &rows).unwrap_or(false)
                } else {
                    stop_requested(&c, name)
                };
                if stopping {
                    stop.store(true, Ordering::Relaxed);
                }
                std::thread::sleep(WRITE_EVERY);
            }
        });
        let r = m.run(&mut |_, m| {
            *shared.lock().unwrap_or_else(|e| e.into_inner()) = client_rows(m);
        });
        finished.store(true, Ordering::Relaxed);
        r
    });
    result?;
    let rows = client_rows(&m);
    let done = rows.iter().filter(|r| r.state == "done").count();
    let secs = started.elapsed().as_secs_f64();
    let s = get(&conn, name)?.ok_or_else(|| anyhow!("session row gone"))?;
    let (state, msg) = if stop.load(Ordering::Relaxed) {
        (
            STOPPED,
            format!(
                "stopped by the administrator after {secs:.0} s: {done} of {} device(s) had finished; the others were told the session is over",
                rows.len()
            ),
        )
    } else if done == rows.len() {
        (
            DONE,
            format!(
                "{done} device(s) finished in {secs:.1} s; {} on the wire for a {}-byte image",
                m.stats.wire_bytes, m.stats.image_bytes
            ),
        )
    } else {
        let bad: Vec<String> = rows
            .iter()
            .filter(|r| r.state != "done")
            .map(|r| format!("{} {}: {}", r.name, r.state, r.message))
            .collect();
        (
            FAILED,
            format!(
                "{done} of {} device(s) finished in {secs:.1} s; {}",
                rows.len(),
                bad.join("; ")
            ),
        )
    };
    eprintln!("imgserver: session {name}: {state}: {msg}");
    write(&conn, name, state, &msg, &rows)?;
    if state != STOPPED {
        end_pending(
            &conn,
            &s,
            &format!("session {name} ended before this device joined it: start another session, or schedule a deploy"),
        )?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("mcast-db-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn sessions_are_stored_named_once_and_stopped() {
        let d = dir("rows");
        let c = open_db(&d).unwrap();
        let set = Settings {
            clients: Some(2),
            latejoin: true,
            ..Default::default()
        };
        insert(&c, "room1", 3, 1, &set, 100).unwrap();
        let s = get(&c, "ROOM1").unwrap().unwrap();
        assert_eq!((s.job, s.image, s.state.as_str()), (3, 1, WAITING));
        assert_eq!(s.settings, set);
        assert!(s.owner.is_none());
        // The name is taken while the session is unfinished (names are case-blind, as the
        // group address is).
        let e = insert(&c, "Room1", 4, 1, &set, 101)
            .unwrap_err()
            .to_string();
        assert!(e.contains("session stop room1"), "{e}");
        // Not taken by a server yet: stop ends it at once.
        let before = request_stop(&c, "room1", 102).unwrap();
        assert_eq!(before.state, WAITING);
        let s = get(&c, "room1").unwrap().unwrap();
        assert_eq!(s.state, STOPPED);
        assert!(s.stop);
        let e = request_stop(&c, "room1", 103).unwrap_err().to_string();
        assert!(e.contains("already stopped"), "{e}");
        // A finished session's name can be used again.
        insert(&c, "room1", 5, 1, &set, 104).unwrap();
        assert_eq!(get(&c, "room1").unwrap().unwrap().job, 5);
        // Owned by a server: stop only raises the flag, the master's thread ends it.
        c.execute(
            "UPDATE mcast_sessions SET owner = 'x' WHERE name = 'room1'",
            [],
        )
        .unwrap();
        request_stop(&c, "room1", 105).unwrap();
        let s = get(&c, "room1").unwrap().unwrap();
        assert_eq!((s.state.as_str(), s.stop), (WAITING, true));
        assert!(write(&c, "room1", RUNNING, "m", &[]).unwrap());
        assert!(request_stop(&c, "nosuch", 1).is_err());
        assert_eq!(list(&c).unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn group_overrides_must_be_multicast() {
        assert!(check_addr("231.1.2.3").is_ok());
        assert!(check_addr("10.0.0.1").is_err());
        assert!(check_addr("nonsense").is_err());
    }
}
