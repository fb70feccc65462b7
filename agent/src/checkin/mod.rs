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

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use imgserver::protocol::{
    result_path, Action, CheckIn, CheckInReply, Outcome, ResultReply, TaskResult, CHECKIN_PATH,
    PROTOCOL_VERSION,
};

use client::{Client, ClientError};
use job::TaskEnd;
use state::{CurrentTask, StateDir};

/// Usage lines for `img -help`.
pub const USAGE: &str = "\
  -checkin -server=URL [-ca=PEM] [-state=DIR] [-disk=DISK] [-backup=DIR] [-loop]
        [-mac=MAC] [-serial=S] [-model=M] [-trust-dir=DIR] [-retries=N] [-q]
                                    check in with the management server once: enrol at first
                                    contact, send unsent results, run the task it hands out
                                    and report; -loop keeps going until there is nothing to do;
                                    -disk=DISK without -state keeps the credential and results
                                    in DISK's boot-agent partition, as the boot agent does";

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
    /// Trusted image-signing keys (`*.pub`); when it holds any, unsigned images are refused.
    pub trusted_dir: Option<PathBuf>,
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
    let mut req = CheckIn {
        protocol: PROTOCOL_VERSION,
        device,
        disks,
        autogenic: inventory::autogenic(cfg),
        current_task: state.current()?.map(|c| c.task.id),
        results: state.outbox()?,
    };
    let token = state.credential()?;
    let reply: CheckInReply = match client.post(CHECKIN_PATH, token.as_deref(), &req) {
        Ok(r) => r,
        Err(ClientError::Http {
            status: 401,
            message,
        }) if token.is_some() => {
            // The server does not know our credential (its administrator ran `forget`):
            // enrol again; the server refuses this for a device it still knows.
            log(
                cfg,
                format!("server refused the stored credential ({message}); enrolling again"),
            );
            state.set_credential(None)?;
            req.results.clear();
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
            .set_credential(Some(c))
            .context("storing the device credential")?;
        log(cfg, format!("enrolled as device {}", reply.device));
    }
    for a in &reply.acked {
        state.acknowledge(a)?;
    }
    Ok(reply)
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
    let client = Client::new(server_url, cfg.ca_file.as_deref(), cfg.timeout)?;
    let state = StateDir::open(&cfg.state_dir)?;
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
        let token = state
            .credential()?
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
            TaskEnd::Continue => {}
        }
        if cfg.max_tasks.is_some_and(|m| tasks_run >= m) {
            return Ok(LoopOutcome::TaskLimit { last: outcome });
        }
    }
}

pub fn parse_args(args: Vec<OsString>) -> anyhow::Result<(String, AgentConfig)> {
    let mut cfg = AgentConfig {
        max_tasks: Some(1),
        ..AgentConfig::default()
    };
    let mut server = std::env::var("IMG_SERVER").ok();
    let mut it = args.into_iter();
    while let Some(a) = it.next() {
        let s = a
            .into_string()
            .map_err(|_| anyhow!("-checkin: arguments must be UTF-8"))?;
        let body = s
            .strip_prefix("--")
            .or_else(|| s.strip_prefix('-'))
            .ok_or_else(|| anyhow!("-checkin: unexpected {s:?} (options are -name=value)"))?;
        let (name, inline) = match body.split_once('=') {
            Some((n, v)) => (n.to_ascii_lowercase(), Some(v.to_string())),
            None => (body.to_ascii_lowercase(), None),
        };
        let mut value = || -> anyhow::Result<String> {
            match &inline {
                Some(v) => Ok(v.clone()),
                None => it
                    .next()
                    .and_then(|v| v.into_string().ok())
                    .ok_or_else(|| anyhow!("-checkin: -{name} needs a value (-{name}=VALUE)")),
            }
        };
        match name.as_str() {
            "server" => server = Some(value()?),
            "ca" => cfg.ca_file = Some(value()?.into()),
            "state" => cfg.state_dir = value()?.into(),
            "disk" => cfg.disk = Some(value()?.into()),
            "backup" => cfg.backup_dir = Some(value()?.into()),
            "trust-dir" => cfg.trusted_dir = Some(value()?.into()),
            "mac" => cfg.mac = Some(value()?),
            "serial" => cfg.serial = Some(value()?),
            "model" => cfg.model = Some(value()?),
            "retries" => {
                let n: u32 = value()?
                    .parse()
                    .map_err(|_| anyhow!("-checkin: -retries needs a number"))?;
                cfg.job_retries = n;
                cfg.checkin_attempts = n.max(1);
            }
            "retry-wait" => {
                cfg.retry_wait = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|_| anyhow!("-retry-wait: milliseconds"))?,
                )
            }
            "progress" => {
                cfg.progress_interval = Duration::from_millis(
                    value()?
                        .parse()
                        .map_err(|_| anyhow!("-progress: milliseconds"))?,
                )
            }
            "loop" => cfg.max_tasks = None,
            "q" | "quiet" => cfg.quiet = true,
            _ => bail!("-checkin: unknown option -{name}\n{USAGE}"),
        }
    }
    let server =
        server.ok_or_else(|| anyhow!("-checkin needs -server=URL (`img -discover` finds it)"))?;
    Ok((server, cfg))
}

/// Routes the `img` verbs of this module; None for verbs that are not ours.
pub fn dispatch(verb: &str, args: Vec<OsString>) -> Option<anyhow::Result<i32>> {
    match verb.trim_start_matches('-') {
        "checkin" => Some(parse_args(args).and_then(|(server, cfg)| run_verb(&server, &cfg))),
        _ => None,
    }
}

/// `img -checkin` once the options are parsed: the loop, then its outcome as a line and an
/// exit code.
pub fn run_verb(server: &str, cfg: &AgentConfig) -> anyhow::Result<i32> {
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
    use super::*;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    #[test]
    fn parses_checkin_options() {
        let (server, cfg) = parse_args(args("-server=https://s:8443 -ca /x/ca.pem -state=/st -disk=/d.img -mac=52-54-00-00-00-01 -loop -retries=3")).unwrap();
        assert_eq!(server, "https://s:8443");
        assert_eq!(cfg.ca_file, Some(PathBuf::from("/x/ca.pem")));
        assert_eq!(cfg.state_dir, PathBuf::from("/st"));
        assert_eq!(cfg.disk, Some(PathBuf::from("/d.img")));
        assert_eq!(cfg.max_tasks, None);
        assert_eq!(cfg.job_retries, 3);
        assert!(parse_args(args("-server=x -bogus")).is_err());
        assert!(dispatch("restore", vec![]).is_none());
    }
}
