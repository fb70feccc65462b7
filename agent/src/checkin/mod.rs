//! Check-in and jobs, the device end (issue 4; protocol in `docs/protocol.md`).
//!
//! At boot, after discovery chose a server, [`agent_loop`] checks in with the device's
//! identity and state, runs each task the server hands out, reports, and returns what the
//! boot agent should do next: boot the guest OS, reboot, or (nothing to do) boot the guest
//! OS and check in again next boot. `img -checkin` runs the same cycle by hand.
//!
//! Seed 000's imaging process is the model: the device checks in, is told about scheduled
//! imaging, fetches the image from the repository, writes it, reboots into it, and the
//! status reaches the server. What makes it robust here:
//! - the device enrols at first contact and proves its credential afterwards;
//! - the server is verified against the CA stored on the device (a rogue server is refused);
//! - the task being run is kept in the state directory, so a power cut or a restarted agent
//!   resumes it (the engine's journal skips what is already written);
//! - final results go to an outbox first and leave it only when the server acknowledged
//!   them, so none is lost and none is applied twice (each carries a report id).

pub mod client;
pub mod inventory;
pub mod job;
pub mod state;
pub mod trust;

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use discovery::LabSettings;
use protocol::{
    result_path, Action, CheckIn, CheckInReply, Outcome, ResultReply, TaskResult, CHECKIN_PATH,
    PROTOCOL_VERSION,
};

use crate::args::{flag, value, Matches, Opt, UsageError};
use client::{Client, ClientError};
use job::TaskEnd;
use state::{CredentialRecord, CurrentTask, StateDir};
use trust::ServerIdentity;

/// Usage lines for `img -help`.
pub const USAGE: &str = "\
  -checkin -server=URL [-ca=PEM] [-state=DIR] [-disk=DISK] [-backup=DIR] [-loop]
        [-mac=MAC] [-serial=S] [-model=M] [-trust-dir=DIR] [-config=DIR] [-retries=N] [-q]
                                    check in with the management server once: enrol at first
                                    contact, send unsent results, run the task it hands out
                                    and report; -loop keeps going until there is nothing to do;
                                    -disk=DISK without -state keeps the credential and results
                                    in DISK's boot-agent partition, as the boot agent does.
                                    -backup=DIR is the backup area (autogenic BI downloads
                                    into it, chunk by chunk, resumable; PI re-images the OS
                                    partition from it). A PI in the imaging status record
                                    (state/imagestatus.json) runs first, before any network;
                                    after 3 failed tries the device reports maintenance.
                                    With -ca, plain HTTP is refused and images must be signed
                                    by a key in -trust-dir, unless DIR/lab.conf (-config, the
                                    boot partition's config folder) says plain_http = yes /
                                    unsigned_images = yes";

/// The agent's settings for check-in.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where the credential, outbox and resume journals live (the boot partition).
    pub state_dir: PathBuf,
    /// The server's CA certificate (PEM); None: the system's web PKI.
    pub ca_file: Option<PathBuf>,
    /// The disk to report and image (block device or disk-image file); None: the fixed disks.
    pub disk: Option<PathBuf>,
    /// The backup location (seed 001's backup partition, mounted); None: no backup support.
    pub backup_dir: Option<PathBuf>,
    /// Trusted image-signing keys (`*.pub`). Deploy tasks need a signature by one of them;
    /// without any key nothing is deployed unless `lab.unsigned_images` says so.
    pub trusted_dir: Option<PathBuf>,
    /// The boot partition's configuration folder (where `lab.conf` is; named in messages).
    pub config_dir: PathBuf,
    /// The lab settings read from `config_dir/lab.conf` (all off by default).
    pub lab: LabSettings,
    /// Identity overrides (tests, broken DMI tables).
    pub mac: Option<String>,
    pub serial: Option<String>,
    pub uuid: Option<String>,
    pub model: Option<String>,
    pub ram_bytes: Option<u64>,
    /// How often progress is posted while a task runs.
    pub progress_interval: Duration,
    /// First pause after a network failure; doubles up to `max_retry_wait`.
    pub retry_wait: Duration,
    pub max_retry_wait: Duration,
    /// Check-in attempts while the server is unreachable (0: forever).
    pub checkin_attempts: u32,
    /// Times a task is resumed after network failures before it is reported failed.
    pub job_retries: u32,
    /// Per-request network timeout.
    pub timeout: Duration,
    /// Stop after this many tasks (`img -checkin` runs one).
    pub max_tasks: Option<usize>,
    /// No console lines.
    pub quiet: bool,
}

impl Default for AgentConfig {
    fn default() -> Self {
        AgentConfig {
            state_dir: std::env::var_os("IMG_AGENT_STATE")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from("/var/lib/img/agent")),
            ca_file: std::env::var_os("IMG_CA_FILE").map(PathBuf::from),
            disk: None,
            backup_dir: None,
            trusted_dir: Some(PathBuf::from(
                std::env::var_os("IMG_TRUSTED_DIR").unwrap_or_else(|| "/etc/img/trusted.d".into()),
            )),
            config_dir: std::env::var_os("IMG_CONFIG_DIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| PathBuf::from(discovery::DEFAULT_CONFIG_DIR)),
            lab: LabSettings::default(),
            mac: None,
            serial: None,
            uuid: None,
            model: None,
            ram_bytes: None,
            progress_interval: Duration::from_secs(3),
            retry_wait: Duration::from_secs(2),
            max_retry_wait: Duration::from_secs(60),
            checkin_attempts: 10,
            job_retries: 10,
            timeout: Duration::from_secs(30),
            max_tasks: None,
            quiet: false,
        }
    }
}

/// What the boot agent does after the loop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LoopOutcome {
    /// Nothing (more) to do: boot the guest OS; check in again in `next_checkin` seconds or
    /// at the next boot.
    Idle { next_checkin: u32 },
    /// A task asked for a reboot (install and reboot, or a reboot task).
    Reboot,
    /// The server asked to boot the guest OS now.
    BootGuest,
    /// `max_tasks` tasks were run (`img -checkin`); the last one's outcome.
    TaskLimit { last: Outcome },
}

fn log(cfg: &AgentConfig, line: impl AsRef<str>) {
    if !cfg.quiet {
        eprintln!("img: {}", line.as_ref());
    }
}

/// One check-in: identity, inventory, unsent results; stores a credential handed out at
/// enrolment and drops acknowledged results from the outbox.
pub fn checkin_once(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
) -> Result<CheckInReply, anyhow::Error> {
    let device = inventory::identity(cfg)?;
    let disks = inventory::disks(cfg)
        .into_iter()
        .map(|(p, m)| inventory::disk_report(&p, m, state))
        .collect();
    let ident = ServerIdentity::of(client.base(), cfg.ca_file.as_deref())?;
    let token = bound_credential(state, &ident)?;
    let mut req = CheckIn {
        protocol: PROTOCOL_VERSION,
        enrol_proof: token
            .is_none()
            .then(|| enrol_proof(cfg, &device.mac))
            .flatten(),
        device,
        disks,
        autogenic: inventory::autogenic(cfg),
        current_task: state.current()?.map(|c| c.task.id),
        results: state.outbox()?,
        maintenance: crate::autogenic::status::maintenance(state),
        task_kinds: Some(task_kinds()),
    };
    if let Some(m) = &req.maintenance {
        log(cfg, format!("reporting maintenance: {m}"));
    }
    let reply: CheckInReply = match client.post(CHECKIN_PATH, token.as_deref(), &req) {
        Ok(r) => r,
        Err(ClientError::Http {
            status: 401,
            message,
        }) if token.is_some() => {
            if !ident.verified() {
                // Anyone can answer 401 over plain HTTP: that proves nothing, so the
                // credential stays and nothing else is tried.
                bail!(
                    "{} refused the device credential ({message}), but the server is not verified: the credential is kept (only the issuing server, verified over HTTPS, can make the device drop it)",
                    ident.describe()
                );
            }
            // The issuing server, verified, does not know our credential any more (its
            // administrator ran `forget`): set it aside and enrol again; the server refuses
            // this for a device it still knows.
            log(
                cfg,
                format!(
                    "the issuing server {} refused the stored credential ({message}); it is set aside (credential.refused) and the device enrols again",
                    ident.describe()
                ),
            );
            state.set_aside_credential()?;
            req.results.clear();
            req.enrol_proof = enrol_proof(cfg, &req.device.mac);
            client
                .post(CHECKIN_PATH, None, &req)
                .map_err(anyhow::Error::new)?
        }
        Err(e) => return Err(anyhow::Error::new(e)),
    };
    if reply.protocol != PROTOCOL_VERSION {
        bail!(
            "server speaks protocol {} and this agent {PROTOCOL_VERSION}: update one of them",
            reply.protocol
        );
    }
    if let Some(c) = &reply.credential {
        state
            .set_credential_record(Some(&CredentialRecord {
                token: c.clone(),
                server: Some(ident.origin.clone()),
                ca_sha256: ident.ca_sha256.clone(),
            }))
            .context("storing the device credential")?;
        log(
            cfg,
            format!(
                "enrolled as device {} with {}",
                reply.device,
                ident.describe()
            ),
        );
    }
    if reply.pending_approval {
        log(
            cfg,
            format!("the server waits for its administrator to approve this device (`imgserver approve {}`), or for the site's enrol.key next to the CA", req.device.mac),
        );
    }
    for a in &reply.acked {
        state.acknowledge(a)?;
    }
    crate::autogenic::status::after_acks(state, &reply.acked)?;
    Ok(reply)
}

/// The stored credential, if it may be sent to `ident`: only to the server that issued it
/// (same origin, same CA). A credential bound to another server stops the check-in (the
/// device neither sends it nor enrols elsewhere); a bare credential from an older agent is
/// bound to the first verified (HTTPS) server it is sent to.
pub fn bound_credential(
    state: &StateDir,
    ident: &ServerIdentity,
) -> anyhow::Result<Option<String>> {
    let Some(rec) = state.credential_record()? else {
        return Ok(None);
    };
    match &rec.server {
        Some(s) if *s == ident.origin && rec.ca_sha256 == ident.ca_sha256 => Ok(Some(rec.token)),
        Some(s) => {
            let issuer = ServerIdentity {
                origin: s.clone(),
                ca_sha256: rec.ca_sha256.clone(),
            };
            bail!(
                "this device's credential was issued by {} and is never sent to another server; {} is not that server, so the device does not check in with it.                  If the device really moves to it, delete the credential file in the agent's state folder (and run `imgserver forget MAC` on the old server)",
                issuer.describe(),
                ident.describe()
            )
        }
        None if ident.verified() => {
            state.set_credential_record(Some(&CredentialRecord {
                server: Some(ident.origin.clone()),
                ca_sha256: ident.ca_sha256.clone(),
                ..rec.clone()
            }))?;
            Ok(Some(rec.token))
        }
        None => bail!(
            "this device's credential is not bound to a server yet and {} is not verified: it is only sent over HTTPS",
            ident.describe()
        ),
    }
}

/// The site enrolment secret lives on the boot partition next to the server's CA
/// (`enrol.key` beside `ca.pem`, put there by the administrator; also looked for in the
/// boot partition's folder, the parent of the config folder, when the pinned CA comes from
/// the initramfs); with it the device proves it belongs to the site when it first enrols
/// (`protocol::enrolment_proof`; the secret itself is never sent). Without it
/// the server holds the enrolment for approval.
/// The task kinds this agent carries out (`job::execute` handles every [`TaskKind`] of the
/// protocol crate it is built with), announced at every check-in so the server hands it
/// nothing it does not know.
pub fn task_kinds() -> Vec<String> {
    protocol::ALL_TASK_KINDS
        .iter()
        .map(|k| k.to_string())
        .collect()
}

fn enrol_proof(cfg: &AgentConfig, mac: &str) -> Option<String> {
    let beside_ca = cfg
        .ca_file
        .as_deref()
        .and_then(|c| c.parent())
        .map(|d| d.join("enrol.key"));
    let on_boot_partition = cfg.config_dir.parent().map(|d| d.join("enrol.key"));
    let secret = [beside_ca, on_boot_partition]
        .into_iter()
        .flatten()
        .find_map(|p| std::fs::read_to_string(p).ok())?;
    (!secret.trim().is_empty()).then(|| protocol::enrolment_proof(&secret, mac))
}

fn retryable(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<ClientError>()
            .is_some_and(ClientError::is_retryable)
    })
}

/// Check in, retrying network failures with a growing pause.
fn checkin_retrying(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
) -> anyhow::Result<CheckInReply> {
    let mut wait = cfg.retry_wait;
    let mut attempt = 1u32;
    loop {
        match checkin_once(client, state, cfg) {
            Ok(r) => return Ok(r),
            Err(e)
                if retryable(&e)
                    && (cfg.checkin_attempts == 0 || attempt < cfg.checkin_attempts) =>
            {
                log(
                    cfg,
                    format!("check-in failed ({e:#}); retrying in {}s", wait.as_secs()),
                );
                std::thread::sleep(wait);
                wait = (wait * 2).min(cfg.max_retry_wait);
                attempt += 1;
            }
            Err(e) => return Err(e.context(format!("checking in with {}", client.base()))),
        }
    }
}

/// Post a final result; on success it leaves the outbox. A failure leaves it queued for the
/// next check-in (which carries the outbox), so it is not an error here.
fn deliver(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
    token: &str,
    r: &TaskResult,
) -> anyhow::Result<bool> {
    match client.post::<_, ResultReply>(&result_path(r.task), Some(token), r) {
        Ok(_) => {
            state.acknowledge(&r.report)?;
            crate::autogenic::status::after_acks(state, std::slice::from_ref(&r.report))?;
            Ok(true)
        }
        // The server refuses it for good (not our task any more): keep it out of the way.
        Err(ClientError::Http {
            status: 404,
            message,
        }) => {
            log(
                cfg,
                format!("server refused the result of task {}: {message}", r.task),
            );
            state.acknowledge(&r.report)?;
            Ok(false)
        }
        Err(e) => {
            log(
                cfg,
                format!(
                    "result of task {} not delivered yet ({e}); it is sent at the next check-in",
                    r.task
                ),
            );
            Ok(false)
        }
    }
}

/// The boot agent's loop against the server at `server_url` (see the module docs).
pub fn agent_loop(server_url: &str, cfg: &AgentConfig) -> anyhow::Result<LoopOutcome> {
    for line in cfg.lab.banner(&cfg.config_dir) {
        log(cfg, line);
    }
    let plain = trust::origin(server_url).is_some_and(|o| o.starts_with("http://"));
    if plain {
        if let Some(why) =
            trust::plain_http_refusal(cfg.ca_file.as_deref(), &cfg.lab, &cfg.config_dir)
        {
            bail!("refusing to check in with {server_url} over plain HTTP: {why}");
        }
        log(
            cfg,
            format!("talking plain HTTP to {server_url}: the credential travels unprotected"),
        );
    }
    let client = Client::new(server_url, cfg.ca_file.as_deref(), cfg.timeout)?;
    let state = StateDir::open(&cfg.state_dir)?;
    let ident = ServerIdentity::of(client.base(), cfg.ca_file.as_deref())?;
    let mut tasks_run = 0usize;
    let mut last_resent: Option<u64> = None;
    loop {
        let reply = checkin_retrying(&client, &state, cfg)?;
        let task = match reply.action {
            Action::Wait { seconds } => {
                log(cfg, format!("nothing to do; next check-in in {seconds}s"));
                return Ok(LoopOutcome::Idle {
                    next_checkin: seconds,
                });
            }
            Action::Run { task } => task,
        };
        let token = bound_credential(&state, &ident)?
            .ok_or_else(|| anyhow!("the server handed out a task before this device enrolled"))?;
        // A task the device already finished (the result's acknowledgement was lost): answer
        // with the result instead of running it twice.
        if let Some(r) = state.finished_result(task.id)? {
            if last_resent == Some(task.id) {
                bail!("the server keeps sending task {} although its result was delivered: check the server's log", task.id);
            }
            log(
                cfg,
                format!(
                    "task {} was already carried out; sending its result again",
                    task.id
                ),
            );
            state.queue_result(&r)?;
            deliver(&client, &state, cfg, &token, &r)?;
            last_resent = Some(task.id);
            continue;
        }
        last_resent = None;
        let attempts = match state.current()? {
            Some(c) if c.task.id == task.id => c.attempts + 1,
            _ => 1,
        };
        let started = job::unix_now();
        state.set_current(Some(&CurrentTask {
            task: task.clone(),
            started,
            attempts,
        }))?;
        let (result, end) = job::run(&client, &token, &state, cfg, &task, attempts);
        if end == TaskEnd::Deferred {
            // A re-imaging from the backup partition failed and is tried again at the next
            // start (the imaging status record holds it): no result yet, reboot.
            state.set_current(None)?;
            return Ok(LoopOutcome::Reboot);
        }
        // Queue first, then forget the current task: a power cut in between leaves both, and
        // the next start finds the result instead of running the task again.
        state.queue_result(&result)?;
        state.set_current(None)?;
        let outcome = result.outcome;
        deliver(&client, &state, cfg, &token, &result)?;
        tasks_run += 1;
        match end {
            TaskEnd::Reboot => return Ok(LoopOutcome::Reboot),
            TaskEnd::BootGuest => return Ok(LoopOutcome::BootGuest),
            TaskEnd::Continue | TaskEnd::Deferred => {}
        }
        if cfg.max_tasks.is_some_and(|m| tasks_run >= m) {
            return Ok(LoopOutcome::TaskLimit { last: outcome });
        }
    }
}

/// The options of `img -checkin` (`cli::VERBS`).
pub const OPTS: &[Opt] = &[
    value(&["server"]),
    value(&["ca"]),
    value(&["state"]),
    value(&["disk"]),
    value(&["backup"]),
    value(&["trust-dir"]),
    value(&["config"]),
    value(&["mac"]),
    value(&["serial"]),
    value(&["model"]),
    value(&["retries"]),
    value(&["retry-wait"]),
    value(&["progress"]),
    flag(&["loop"]),
    flag(&["q", "quiet"]),
];

/// Stage two of `img -checkin`: the server and the agent's settings from the matched
/// options (`IMG_SERVER` when there is no `-server`), with the lab settings loaded.
pub fn parse_args(m: &Matches) -> anyhow::Result<(String, AgentConfig)> {
    m.finish()?;
    let mut cfg = AgentConfig {
        max_tasks: Some(1),
        ..AgentConfig::default()
    };
    let text = |name: &str| m.value(name).map(str::to_string);
    let path = |name: &str| m.value(name).map(PathBuf::from);
    let millis = |name: &str| -> Result<Option<Duration>, UsageError> {
        Ok(m.number::<u64>(name)?.map(Duration::from_millis))
    };
    if let Some(v) = path("ca") {
        cfg.ca_file = Some(v);
    }
    if let Some(v) = path("state") {
        cfg.state_dir = v;
    }
    cfg.disk = path("disk");
    cfg.backup_dir = path("backup");
    if let Some(v) = path("trust-dir") {
        cfg.trusted_dir = Some(v);
    }
    if let Some(v) = path("config") {
        cfg.config_dir = v;
    }
    cfg.mac = text("mac");
    cfg.serial = text("serial");
    cfg.model = text("model");
    if let Some(n) = m.number::<u32>("retries")? {
        cfg.job_retries = n;
        cfg.checkin_attempts = n.max(1);
    }
    if let Some(d) = millis("retry-wait")? {
        cfg.retry_wait = d;
    }
    if let Some(d) = millis("progress")? {
        cfg.progress_interval = d;
    }
    if m.flag("loop") {
        cfg.max_tasks = None;
    }
    cfg.quiet = m.flag("q");
    let server = text("server")
        .or_else(|| std::env::var("IMG_SERVER").ok())
        .ok_or_else(|| {
            UsageError("-checkin needs -server=URL (`img -discover` finds it)".into())
        })?;
    if cfg.ca_file.is_none() {
        // The CA the boot agent pins.
        cfg.ca_file = trust::pinned_ca();
    }
    let mut notes = Vec::new();
    cfg.lab = LabSettings::load(&cfg.config_dir, &mut notes)?;
    for n in notes {
        log(&cfg, n);
    }
    Ok((server, cfg))
}

/// `img -checkin` once the options are parsed: the loop, then its outcome as a line and an
/// exit code.
pub fn run_verb(server: &str, cfg: &AgentConfig) -> anyhow::Result<i32> {
    // A re-imaging from the backup partition recorded before this start runs first, with
    // no network, as at boot.
    let state = StateDir::open(&cfg.state_dir)?;
    match crate::autogenic::pi::at_start(&state, cfg)? {
        crate::autogenic::pi::AtStart::Nothing => {}
        crate::autogenic::pi::AtStart::Ran(o) => log(
            cfg,
            format!("re-imaging from the backup partition at start: {o:?}"),
        ),
        crate::autogenic::pi::AtStart::Maintenance(why) => log(cfg, format!("MAINTENANCE: {why}")),
    }
    let outcome = agent_loop(server, cfg)?;
    let (line, code) = match &outcome {
        LoopOutcome::Idle { next_checkin } => (
            format!("nothing to do; check in again in {next_checkin}s"),
            0,
        ),
        LoopOutcome::Reboot => (
            "done; the task asks for a reboot (the boot agent reboots; by hand: `reboot`)"
                .to_string(),
            0,
        ),
        LoopOutcome::BootGuest => ("done; the server asks to boot the guest OS".to_string(), 0),
        LoopOutcome::TaskLimit {
            last: Outcome::Succeeded,
        } => ("task done".to_string(), 0),
        LoopOutcome::TaskLimit { last } => (format!("task ended: {last:?}"), 1),
    };
    println!("{line}");
    Ok(code)
}

#[cfg(test)]
mod tests {

    #[test]
    fn the_agent_announces_every_task_kind_it_runs() {
        use protocol::{ConvertSpec, ImageRef, SessionSpec, TaskKind};
        let image = ImageRef {
            name: "i".into(),
            version: "1".into(),
            url: "http://s/repo/i".into(),
            size: None,
            autogenic: false,
        };
        let kinds = task_kinds();
        // Every kind `job::execute` matches on, by the protocol's own names.
        for k in [
            TaskKind::Reboot,
            TaskKind::BootGuest,
            TaskKind::Convert(ConvertSpec {
                image: image.clone(),
                disk: None,
                backup_size: None,
                flash_size: 0,
            }),
            TaskKind::Session(Box::new(SessionSpec {
                name: "room1".into(),
                addr: None,
                image,
                disk: None,
                partition: None,
            })),
        ] {
            assert!(kinds.iter().any(|n| n == k.name()), "{}", k.name());
        }
        for k in ["deploy", "capture"] {
            assert!(kinds.iter().any(|n| n == k), "{k}");
        }
        // On the wire, so a server sees them.
        let req = protocol::CheckIn {
            task_kinds: Some(kinds),
            ..Default::default()
        };
        let j = serde_json::to_value(&req).unwrap();
        assert!(j["task_kinds"]
            .as_array()
            .unwrap()
            .iter()
            .any(|v| v == "session"));
    }
    use super::*;

    fn args(s: &str) -> Result<Matches, UsageError> {
        let words: Vec<std::ffi::OsString> = s.split_whitespace().map(Into::into).collect();
        crate::args::parse("checkin", OPTS, &words)
    }

    /// A 401 from an unverified (plain HTTP, lab) server proves nothing: the credential it
    /// issued stays, and nothing is sent again.
    #[test]
    fn an_unverified_401_keeps_the_credential() {
        use std::io::{Read, Write};
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        let server = std::thread::spawn(move || {
            let mut n = 0;
            l.set_nonblocking(false).unwrap();
            for s in l.incoming().flatten().take(1) {
                let mut s = s;
                let mut b = vec![0u8; 65536];
                let _ = s.read(&mut b);
                let body = br#"{"error":"unknown credential"}"#;
                let _ = write!(
                    s,
                    "HTTP/1.1 401 Unauthorized\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = s.write_all(body);
                n += 1;
            }
            n
        });
        let dir = std::env::temp_dir().join(format!("img-checkin-401-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let cfg = AgentConfig {
            state_dir: dir.join("state"),
            disk: Some(dir.join("none.img")),
            mac: Some("52:54:00:00:00:09".into()),
            serial: Some("S".into()),
            model: Some("M".into()),
            ram_bytes: Some(1),
            quiet: true,
            ..AgentConfig::default()
        };
        let state = StateDir::open(&cfg.state_dir).unwrap();
        let rec = CredentialRecord {
            token: "aa".repeat(32),
            server: trust::origin(&url),
            ca_sha256: None,
        };
        state.set_credential_record(Some(&rec)).unwrap();
        let client = Client::new(&url, None, Duration::from_secs(5)).unwrap();
        let err = format!("{:#}", checkin_once(&client, &state, &cfg).unwrap_err());
        assert!(err.contains("the credential is kept"), "{err}");
        assert_eq!(state.credential_record().unwrap(), Some(rec));
        assert!(!dir.join("state/credential.refused").exists());
        assert_eq!(
            server.join().unwrap(),
            1,
            "exactly one request, no enrolment"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    /// The check-in client follows no redirect: the credential stays with the server.
    #[test]
    fn redirects_are_not_followed_with_the_credential() {
        use std::io::{Read, Write};
        let target = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        target.set_nonblocking(true).unwrap();
        let tport = target.local_addr().unwrap().port();
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://127.0.0.1:{}", l.local_addr().unwrap().port());
        std::thread::spawn(move || {
            if let Some(Ok(mut s)) = l.incoming().next() {
                let mut b = vec![0u8; 65536];
                let _ = s.read(&mut b);
                let _ = write!(
                    s,
                    "HTTP/1.1 307 Temporary Redirect\r\nLocation: http://127.0.0.1:{tport}/api/v1/checkin\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                );
            }
        });
        let client = Client::new(&url, None, Duration::from_secs(5)).unwrap();
        let e = client
            .post::<_, serde_json::Value>(CHECKIN_PATH, Some("secret"), &serde_json::json!({}))
            .unwrap_err();
        assert!(matches!(e, ClientError::Http { status: 307, .. }), "{e}");
        assert!(target.accept().is_err(), "the redirect was followed");
    }

    #[test]
    fn parses_checkin_options() {
        let (server, cfg) = parse_args(&args("-server=https://s:8443 -ca /x/ca.pem -state=/st -disk=/d.img -mac=52-54-00-00-00-01 -loop -retries=3").unwrap()).unwrap();
        assert_eq!(server, "https://s:8443");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/x/ca.pem")));
        assert_eq!(cfg.state_dir, PathBuf::from("/st"));
        assert_eq!(cfg.disk, Some(PathBuf::from("/d.img")));
        assert_eq!(cfg.max_tasks, None);
        assert_eq!(cfg.job_retries, 3);
        assert!(args("-server=x -bogus").is_err());
        assert!(parse_args(&args("-server=x stray").unwrap()).is_err());
        assert!(parse_args(&args("-server=x -retries=many").unwrap()).is_err());
    }
}
