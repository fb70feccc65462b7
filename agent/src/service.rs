//! `img -service`: the agent inside the guest OS (seed 001's HAgent).
//!
//! A Linux guest runs `img -service -disk=DISK` (shipped as `dist/img.service`). It checks in
//! periodically with the device's own agent state, kept in the store on DISK's boot-agent
//! partition (credential, outbox, imaging status: the same flock-serialised store the boot
//! agent and `img -checkin -disk=` use), so the guest and the imaging engine are one device
//! to the server. What it does with a task:
//!
//! - BI (a deploy with `after: copy_only`): runs here, at idle I/O priority and nice 19, so
//!   the user does not notice it; progress and the result (the seed's V02) are reported
//!   without a reboot.
//! - PI (`from_backup`): checked against the backup partition (it must hold the image,
//!   whole), recorded in the imaging status record (`state/imagestatus.json`, phase
//!   `pending`, `crate::autogenic::status`), then the reboot into the imaging engine, which
//!   runs it at its start before it looks for the server. BI+PI (`fetch_to_backup`): the
//!   BI here first, then the same.
//! - A network deploy, convert, capture: never in the guest: the reboot into the imaging
//!   engine, which gets the task again at its check-in (the server resends a handed-out
//!   task until its result arrives). A reboot task: reported done, then the reboot.
//! - The reboot: the store committed, grubenv `next_entry` cleared (the next boot is the
//!   boot agent, the imaging engine), progress "rebooting into the imaging engine" posted,
//!   the store committed again, then `systemctl reboot` under systemd, else sync +
//!   reboot(2).
//! - BootGuest and Wait: nothing to do in a running guest.
//!
//! Results the engine left in the outbox (a PI done at boot) go with the next check-in.
//! A server that does not answer is retried with a growing pause, forever; SIGTERM ends
//! the service after the store is committed.
//!
//! Testing aids: `IMG_SERVICE_REBOOT=exit` makes the service exit 0 where it would reboot;
//! `IMG_SERVICE_REBOOT=hang` makes it log the hand-over, sync and wait there (until SIGTERM)
//! instead of rebooting, so a test can pull the plug at exactly that point.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use grub::bootpart::BootPartition;
use grub::store::Store;
use protocol::{
    progress_path, Action, After, CheckInReply, Outcome, ProgressReply, ProgressReport, Task,
    TaskKind, TaskResult,
};

use crate::args::{flag, value, Matches, Opt, UsageError};
use crate::bootstore::{self, Backing, TempRoot};
use crate::checkin::client::Client;
use crate::checkin::state::{new_report_id, StateDir};
use crate::checkin::trust::{self, ServerIdentity};
use crate::checkin::{self, job, AgentConfig};
use crate::handover::{self, NextBoot};

/// Usage lines for `img -help`.
pub const USAGE: &str = "\
  -service -disk=DISK [-server=URL] [-ca=PEM] [-interval=SECONDS] [-retry-wait=MS]
        [-backup=DIR] [-mac=MAC] [-serial=S] [-model=M] [-q]
                                    the agent inside the guest OS (systemd unit dist/img.service):
                                    checks in every -interval seconds (default: as the server
                                    says) with the state in DISK's boot-agent partition, at idle
                                    I/O priority and nice 19; downloads into the backup area
                                    (BI) itself; a PI goes into the imaging status record; for
                                    a PI, deploy, convert, capture or reboot it makes the next
                                    boot the imaging engine and reboots. No -server: the server
                                    that issued the device's credential, then the stored URL
                                    list (img -serverurl). A server that does not answer is
                                    retried after -retry-wait (default 2000) ms, doubling up to
                                    5 minutes; it never exits on its own; SIGTERM commits the
                                    store and ends it. -backup: the backup area as a folder
                                    (default: DISK's IMGBACKUP partition).
                                    IMG_SERVICE_REBOOT=exit (testing): exit 0 instead of
                                    rebooting; =hang: wait there instead (a power-cut test
                                    pulls the plug)";

/// The options of `img -service` (`cli::VERBS`).
pub const OPTS: &[Opt] = &[
    value(&["disk"]),
    value(&["server"]),
    value(&["ca"]),
    value(&["interval"]),
    value(&["retry-wait"]),
    value(&["backup"]),
    value(&["mac"]),
    value(&["serial"]),
    value(&["model"]),
    flag(&["q", "quiet"]),
];

/// The longest pause between attempts while no server answers.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// How long SIGTERM waits for a check-in or task in flight before the store is committed
/// and the process ends anyway (systemd's default stop timeout is 90 s).
const STOP_GRACE: Duration = Duration::from_secs(20);

/// What `img -service` was asked to do (stage two of the parser).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceRequest {
    pub disk: PathBuf,
    pub server: Option<String>,
    pub ca: Option<PathBuf>,
    /// None: the server's `Wait { seconds }`.
    pub interval: Option<Duration>,
    pub retry_wait: Duration,
    /// A backup folder for a device without an IMGBACKUP partition (as `-checkin -backup`).
    pub backup: Option<PathBuf>,
    pub mac: Option<String>,
    pub serial: Option<String>,
    pub model: Option<String>,
    pub quiet: bool,
}

/// Stage two of `img -service`.
pub fn parse(m: &Matches) -> Result<ServiceRequest, UsageError> {
    m.finish()?;
    let disk = m.value("disk").map(PathBuf::from).ok_or_else(|| {
        UsageError(
            "-service needs -disk=DISK (the disk whose boot-agent partition holds the agent's state, e.g. /dev/sda)"
                .into(),
        )
    })?;
    let interval = match m.number::<u64>("interval")? {
        Some(0) => {
            return Err(UsageError(
                "-interval=0: give at least 1 second (or leave it out: the server's pace)".into(),
            ))
        }
        Some(s) => Some(Duration::from_secs(s)),
        None => None,
    };
    let retry_wait = match m.number::<u64>("retry-wait")? {
        Some(0) => return Err(UsageError("-retry-wait=0: give at least 1 ms".into())),
        Some(ms) => Duration::from_millis(ms),
        None => Duration::from_secs(2),
    };
    Ok(ServiceRequest {
        disk,
        server: m.value("server").map(str::to_string),
        ca: m.value("ca").map(PathBuf::from),
        interval,
        retry_wait,
        backup: m.value("backup").map(PathBuf::from),
        mac: m.value("mac").map(str::to_string),
        serial: m.value("serial").map(str::to_string),
        model: m.value("model").map(str::to_string),
        quiet: m.flag("q"),
    })
}

/// `img -service`.
pub fn run(m: Matches) -> anyhow::Result<i32> {
    let req = parse(&m)?;
    Service::start(req)?.run()
}

// ---------------------------------------------------------------------------------------
// Priority and signals

/// `ioprio_set(2)` constants (linux/ioprio.h); libc has the syscall number only.
const IOPRIO_WHO_PROCESS: libc::c_int = 1;
const IOPRIO_CLASS_IDLE: libc::c_int = 3;
const IOPRIO_CLASS_SHIFT: libc::c_int = 13;

/// Idle I/O class and nice 19 for this process: called before any thread starts, so every
/// thread (the progress reporter, BI's download) inherits both. Returns the log line.
pub fn lower_priority() -> String {
    // SAFETY: plain syscalls on the calling thread with integer arguments.
    #[allow(unsafe_code)]
    let io = unsafe {
        libc::syscall(
            libc::SYS_ioprio_set,
            IOPRIO_WHO_PROCESS,
            0,
            IOPRIO_CLASS_IDLE << IOPRIO_CLASS_SHIFT,
        )
    };
    let io = if io == 0 {
        "I/O class idle".to_string()
    } else {
        format!(
            "I/O priority unchanged ({})",
            std::io::Error::last_os_error()
        )
    };
    // SAFETY: as above.
    #[allow(unsafe_code)]
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, 0, 19) };
    let cpu = if r == 0 {
        "nice 19".to_string()
    } else {
        format!("nice unchanged ({})", std::io::Error::last_os_error())
    };
    format!("priority lowered so imaging never disturbs the user: {io}, {cpu}")
}

static STOP: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    STOP.store(true, Ordering::SeqCst);
}

fn install_signal_handlers() {
    for sig in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP] {
        // SAFETY: the handler only stores into an atomic (async-signal-safe).
        #[allow(unsafe_code)]
        unsafe {
            libc::signal(sig, on_signal as *const () as libc::sighandler_t);
        }
    }
}

fn stopping() -> bool {
    STOP.load(Ordering::SeqCst)
}

/// Sleep `d`, waking early when asked to stop. Returns false when stopping.
fn nap(d: Duration) -> bool {
    let end = Instant::now() + d;
    while !stopping() {
        let left = end.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
    false
}

// ---------------------------------------------------------------------------------------
// Where a task runs

/// Where a task runs when it reaches the guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    /// BI: here, at low priority, without a reboot.
    Here,
    /// PI (re-image the OS partition from the backup partition): recorded in the imaging
    /// status record, then the reboot into the imaging engine, which runs it at its start.
    Pi,
    /// The seed's case 2: BI here, then PI as above.
    BiThenPi,
    /// It writes the OS disk or needs the engine (network deploy, convert, capture, a multicast session): the
    /// reboot into the imaging engine, which gets the task again at its check-in.
    Engine,
    /// A reboot: reported done, then the reboot (through the boot agent, as every boot).
    Reboot,
    /// Nothing to do in a running guest (boot the guest OS).
    Nothing,
}

/// Where `task` runs (see the module docs).
pub fn placement(task: &Task) -> Placement {
    match &task.kind {
        TaskKind::Deploy(d) if d.from_backup && d.fetch_to_backup => Placement::BiThenPi,
        TaskKind::Deploy(d) if d.from_backup => Placement::Pi,
        TaskKind::Deploy(d) if d.after == After::CopyOnly => Placement::Here,
        TaskKind::Deploy(_)
        | TaskKind::Convert(_)
        | TaskKind::Capture(_)
        | TaskKind::Session(_) => Placement::Engine,
        TaskKind::Reboot => Placement::Reboot,
        TaskKind::BootGuest => Placement::Nothing,
    }
}

/// The BI half of a BI-then-PI task: the same task (id, image) as a download into the
/// backup partition only.
fn bi_half(task: &Task) -> Task {
    let mut t = task.clone();
    if let TaskKind::Deploy(d) = &mut t.kind {
        d.after = After::CopyOnly;
        d.from_backup = false;
        d.fetch_to_backup = false;
    }
    t
}

/// Record `task` as the PI the imaging engine runs at its next start (the imaging status
/// record, phase `pending`); a record of the same task is kept as it is (its attempts
/// count).
pub fn record_pi(state: &StateDir, task: &Task) -> anyhow::Result<()> {
    use crate::autogenic::status::{self, ImagingStatus};
    match status::load(state)? {
        Some(st) if st.task.id == task.id => Ok(()),
        _ => status::save(state, &ImagingStatus::new(task.clone())),
    }
}

/// Why a PI cannot run on this device: the backup partition must hold exactly the task's
/// image, whole (checked here so a wrong schedule costs no reboot).
fn pi_refusal(cfg: &AgentConfig, task: &Task) -> anyhow::Result<Option<String>> {
    let TaskKind::Deploy(d) = &task.kind else {
        return Ok(None);
    };
    let Some(area) = crate::autogenic::area::open(cfg)? else {
        return Ok(Some("this device has no backup partition: convert it to the autogenic layout first (imgserver schedule add ... --convert)".into()));
    };
    let st = area.status()?;
    let want = protocol::ImageStamp {
        name: d.image.name.clone(),
        version: d.image.version.clone(),
    };
    if st.complete && st.image.as_ref() == Some(&want) {
        return Ok(None);
    }
    Ok(Some(format!(
        "re-imaging from the backup partition needs it to hold {} {}, and {} holds {}: schedule the download into the backup partition first (--backup-only), or both at once",
        want.name,
        want.version,
        area.describe(),
        st.describe()
    )))
}

fn simple_result(task: &Task, outcome: Outcome, message: String) -> TaskResult {
    TaskResult {
        task: task.id,
        report: new_report_id(),
        outcome,
        transcript: vec![format!(
            "task {} of job {}: {}: {message}",
            task.id,
            task.job,
            task.kind.name()
        )],
        message: Some(message),
        image: None,
        bytes: 0,
        finished: job::unix_now(),
    }
}

// ---------------------------------------------------------------------------------------
// The service

struct Service {
    req: ServiceRequest,
    root: TempRoot,
    /// The store record our directory corresponds to (to notice another writer, e.g.
    /// `img -serverurl -disk=` typed in the guest).
    seq: u64,
    said_banner: bool,
}

/// What one round ended with.
enum Next {
    /// Check in again after this long.
    Sleep(Duration),
    /// Check in again now (a task ended, results to deliver).
    Again,
    /// No server answered: back off.
    Unreachable(String),
}

fn log(req: &ServiceRequest, line: impl AsRef<str>) {
    if !req.quiet {
        eprintln!("img: service: {}", line.as_ref());
    }
}

fn store_seq(disk: &Path) -> anyhow::Result<u64> {
    Ok(Store::open(BootPartition::open(disk, false)?)?.load()?.seq)
}

impl Service {
    fn start(req: ServiceRequest) -> anyhow::Result<Service> {
        // First of all, before any thread exists: every later thread inherits it.
        log(&req, lower_priority());
        install_signal_handlers();
        let root = TempRoot::new(&req.disk).with_context(|| {
            format!(
                "reading the agent's state from the boot-agent partition of {}",
                req.disk.display()
            )
        })?;
        let seq = store_seq(&req.disk)?;
        log(
            &req,
            format!(
                "agent state from the store on the boot-agent {} (record {seq})",
                root.backing.describe()
            ),
        );
        bootstore::commit_on_state_change(root.backing.clone());
        Ok(Service {
            req,
            root,
            seq,
            said_banner: false,
        })
    }

    fn backing(&self) -> &Backing {
        &self.root.backing
    }

    /// Commit the directory into the store; remember the record it is now (the commits
    /// made after each state change, by the check-in code, are ours too).
    fn commit(&mut self) -> anyhow::Result<()> {
        match bootstore::commit(self.backing())? {
            Some(s) => self.seq = s,
            None => self.seq = store_seq(&self.req.disk)?,
        }
        Ok(())
    }

    /// Another process committed to the store since we read it (an administrator's
    /// `img -serverurl -disk=` in the guest): read it again, so our next commit does not
    /// undo theirs. Our own changes are committed at the end of every round.
    fn refresh(&mut self) -> anyhow::Result<()> {
        let now = store_seq(&self.req.disk)?;
        if now == self.seq {
            return Ok(());
        }
        let stored = Store::open(BootPartition::open(&self.req.disk, false)?)?.load()?;
        if stored.tree == bootstore::collect(self.root.root())? {
            self.seq = stored.seq;
            return Ok(());
        }
        let root = self.root.root().to_path_buf();
        for k in bootstore::KEPT {
            let p = root.join(k);
            if p.is_dir() {
                std::fs::remove_dir_all(&p)
            } else {
                std::fs::remove_file(&p)
            }
            .or_else(|e| {
                if e.kind() == std::io::ErrorKind::NotFound {
                    Ok(())
                } else {
                    Err(e)
                }
            })
            .with_context(|| format!("clearing {}", p.display()))?;
        }
        let m = bootstore::materialise(&self.req.disk, &root)?;
        log(
            &self.req,
            format!(
                "the store changed (record {} -> {}): agent state read again",
                self.seq, m.seq
            ),
        );
        self.seq = m.seq;
        Ok(())
    }

    /// The check-in settings for this round, from the agent directory (as `img -checkin
    /// -disk=` builds them).
    fn agent_config(&mut self) -> anyhow::Result<AgentConfig> {
        let root = self.root.root();
        let mut cfg = AgentConfig {
            state_dir: root.join("state"),
            disk: Some(self.req.disk.clone()),
            backup_dir: self.req.backup.clone(),
            config_dir: root.join("config"),
            mac: self.req.mac.clone(),
            serial: self.req.serial.clone(),
            model: self.req.model.clone(),
            quiet: self.req.quiet,
            max_tasks: Some(1),
            ..AgentConfig::default()
        };
        cfg.ca_file = self
            .req
            .ca
            .clone()
            .or_else(|| {
                let p = root.join("ca.pem");
                p.is_file().then_some(p)
            })
            .or_else(trust::pinned_ca);
        let trusted = root.join("trusted");
        if trusted.is_dir() {
            cfg.trusted_dir = Some(trusted);
        }
        let mut notes = Vec::new();
        cfg.lab = discovery::LabSettings::load(&cfg.config_dir, &mut notes)?;
        if !self.said_banner {
            for n in notes {
                log(&self.req, n);
            }
            for line in cfg.lab.banner(&cfg.config_dir) {
                log(&self.req, line);
            }
            self.said_banner = true;
        }
        Ok(cfg)
    }

    /// The servers to try, in order: `-server` (or `IMG_SERVER`); else the server that
    /// issued the device's credential, then the stored URL list.
    fn servers(&self, cfg: &AgentConfig) -> Vec<String> {
        if let Some(s) = self
            .req
            .server
            .clone()
            .or_else(|| std::env::var("IMG_SERVER").ok().filter(|s| !s.is_empty()))
        {
            return s
                .split(';')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect();
        }
        let mut out = Vec::new();
        if let Ok(Some(rec)) = StateDir::open(&cfg.state_dir).and_then(|s| s.credential_record()) {
            if let Some(s) = rec.server {
                out.push(s);
            }
        }
        let mut notes = Vec::new();
        if let Ok(d) = discovery::DiscoverySettings::load(&cfg.config_dir, &mut notes) {
            if let Some(list) = d.server_url_list {
                match discovery::urllist::parse_url_list(&list, None) {
                    Ok(urls) => out.extend(urls.iter().map(|u| u.to_string())),
                    Err(e) => log(&self.req, format!("the stored server URL list: {e}")),
                }
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        out.retain(|u| seen.insert(trust::origin(u).unwrap_or_else(|| u.clone())));
        out
    }

    fn run(mut self) -> anyhow::Result<i32> {
        // SIGTERM during a check-in or a task: give it STOP_GRACE, then commit and go.
        let backing = self.backing().clone();
        let quiet = self.req.quiet;
        std::thread::spawn(move || {
            while !stopping() {
                std::thread::sleep(Duration::from_millis(200));
            }
            std::thread::sleep(STOP_GRACE);
            bootstore::commit_or_say(&backing);
            if !quiet {
                eprintln!("img: service: stopped (the work in progress resumes at the next start; the store is committed)");
            }
            std::process::exit(0);
        });
        let mut backoff = self.req.retry_wait;
        let cap = self
            .req
            .interval
            .map_or(MAX_BACKOFF, |i| i.max(self.req.retry_wait).min(MAX_BACKOFF));
        while !stopping() {
            let next = self.round();
            if let Err(e) = self.commit() {
                log(
                    &self.req,
                    format!("the agent's state could not be saved: {e:#}"),
                );
            }
            let wait = match next {
                Ok(Next::Again) => {
                    backoff = self.req.retry_wait;
                    continue;
                }
                Ok(Next::Sleep(d)) => {
                    backoff = self.req.retry_wait;
                    d
                }
                Ok(Next::Unreachable(why)) => {
                    log(
                        &self.req,
                        format!("{why}; trying again in {:.1}s", backoff.as_secs_f64()),
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(cap);
                    w
                }
                Err(e) => {
                    log(
                        &self.req,
                        format!("{e:#}; trying again in {:.1}s", backoff.as_secs_f64()),
                    );
                    let w = backoff;
                    backoff = (backoff * 2).min(cap);
                    w
                }
            };
            nap(wait);
        }
        self.commit()?;
        log(&self.req, "stopped; the store is committed");
        Ok(0)
    }

    /// One check-in and what follows it.
    fn round(&mut self) -> anyhow::Result<Next> {
        self.refresh()?;
        let cfg = self.agent_config()?;
        let servers = self.servers(&cfg);
        if servers.is_empty() {
            bail!(
                "no server to check in with: give -server=URL, or store a URL list on the boot-agent partition (img -serverurl LIST -disk={})",
                self.req.disk.display()
            );
        }
        let state = StateDir::open(&cfg.state_dir)?;
        let mut why = Vec::new();
        for url in &servers {
            if trust::origin(url).is_some_and(|o| o.starts_with("http://")) {
                if let Some(r) =
                    trust::plain_http_refusal(cfg.ca_file.as_deref(), &cfg.lab, &cfg.config_dir)
                {
                    why.push(format!("{url}: {r}"));
                    continue;
                }
            }
            let client = Client::new(url, cfg.ca_file.as_deref(), cfg.timeout)?;
            match checkin::checkin_once(&client, &state, &cfg) {
                Ok(reply) => return self.act(&client, &state, &cfg, reply),
                Err(e) => why.push(format!("{url}: {e:#}")),
            }
        }
        Ok(Next::Unreachable(format!(
            "no server answered the check-in ({})",
            why.join("; ")
        )))
    }

    fn act(
        &mut self,
        client: &Client,
        state: &StateDir,
        cfg: &AgentConfig,
        reply: CheckInReply,
    ) -> anyhow::Result<Next> {
        let task = match reply.action {
            Action::Wait { seconds } => {
                let d = self
                    .req
                    .interval
                    .unwrap_or(Duration::from_secs(u64::from(seconds.max(1))));
                log(
                    &self.req,
                    format!(
                        "checked in with {}: nothing to do; next check-in in {}s",
                        client.base(),
                        d.as_secs()
                    ),
                );
                return Ok(Next::Sleep(d));
            }
            Action::Run { task } => task,
        };
        let ident = ServerIdentity::of(client.base(), cfg.ca_file.as_deref())?;
        let token = checkin::bound_credential(state, &ident)?
            .context("the server handed out a task before this device enrolled")?;
        // A task already carried out (its acknowledgement was lost): its result again.
        if let Some(r) = state.finished_result(task.id)? {
            log(
                &self.req,
                format!(
                    "task {} was already carried out; its result goes with the next check-in",
                    task.id
                ),
            );
            state.queue_result(&r)?;
            return Ok(Next::Again);
        }
        match placement(&task) {
            Placement::Nothing => {
                log(
                    &self.req,
                    format!("task {}: boot the guest OS: it is running", task.id),
                );
                state.queue_result(&simple_result(
                    &task,
                    Outcome::Succeeded,
                    "the guest OS is running (img -service)".into(),
                ))?;
                Ok(Next::Again)
            }
            Placement::Here => {
                self.bi(client, &token, state, cfg, &task, true)?;
                Ok(Next::Again)
            }
            Placement::BiThenPi => {
                if !self.bi(client, &token, state, cfg, &bi_half(&task), false)? {
                    return Ok(Next::Again);
                }
                self.pi(client, &token, state, cfg, &task)
            }
            Placement::Pi => self.pi(client, &token, state, cfg, &task),
            Placement::Engine => {
                self.hand_to_engine(client, &token, &task)?;
                Ok(Next::Sleep(Duration::from_secs(3600)))
            }
            Placement::Reboot => {
                // Reported before the reboot: the server asked for nothing more.
                let r = simple_result(
                    &task,
                    Outcome::Succeeded,
                    "rebooted by the guest OS's service".into(),
                );
                state.queue_result(&r)?;
                match client.post::<_, protocol::ResultReply>(
                    &protocol::result_path(task.id),
                    Some(&token),
                    &r,
                ) {
                    Ok(_) => state.acknowledge(&r.report)?,
                    Err(e) => log(
                        &self.req,
                        format!("result not delivered yet ({e}); it goes with the next check-in"),
                    ),
                }
                self.hand_to_engine(client, &token, &task)?;
                Ok(Next::Sleep(Duration::from_secs(3600)))
            }
        }
    }

    /// BI (or the BI half of BI+PI) here, at this process's low priority. Returns whether
    /// it succeeded; a failure's result is queued (the task ends with it), a success's only
    /// when the BI is the whole task (`whole`).
    fn bi(
        &mut self,
        client: &Client,
        token: &str,
        state: &StateDir,
        cfg: &AgentConfig,
        task: &Task,
        whole: bool,
    ) -> anyhow::Result<bool> {
        log(
            &self.req,
            format!(
                "task {} of job {}: {} runs here, in the background",
                task.id,
                task.job,
                describe(task)
            ),
        );
        let (result, _end) = job::run(client, token, state, cfg, task, 1);
        log(
            &self.req,
            format!(
                "task {} ended: {:?}{}",
                task.id,
                result.outcome,
                result
                    .message
                    .as_deref()
                    .map(|m| format!(" ({m})"))
                    .unwrap_or_default()
            ),
        );
        let ok = result.outcome == Outcome::Succeeded;
        if !ok || whole {
            state.queue_result(&result)?;
        }
        Ok(ok)
    }

    /// PI: checked against the backup partition, recorded, then the reboot.
    fn pi(
        &mut self,
        client: &Client,
        token: &str,
        state: &StateDir,
        cfg: &AgentConfig,
        task: &Task,
    ) -> anyhow::Result<Next> {
        if let Some(why) = pi_refusal(cfg, task)? {
            log(&self.req, format!("task {} rejected: {why}", task.id));
            state.queue_result(&simple_result(task, Outcome::Rejected, why))?;
            return Ok(Next::Again);
        }
        record_pi(state, task)?;
        log(
            &self.req,
            format!("task {}: imaging status record written (pending)", task.id),
        );
        self.hand_to_engine(client, token, task)?;
        Ok(Next::Sleep(Duration::from_secs(3600)))
    }

    /// Hand `task` to the imaging engine: commit, next boot, progress, commit,
    /// reboot. Returns only under `IMG_SERVICE_REBOOT=exit` (then the process exits) or
    /// when the reboot could not be started.
    fn hand_to_engine(&mut self, client: &Client, token: &str, task: &Task) -> anyhow::Result<()> {
        let what = describe(task);
        log(
            &self.req,
            format!(
                "task {} of job {}: {what} runs in the imaging engine: rebooting into it",
                task.id, task.job
            ),
        );
        // The state (a PI's record, a reboot's result) must be on the disk before the next
        // boot is changed: the engine acts on it.
        self.commit()
            .context("saving the agent's state (the next boot was not changed)")?;
        let msg = handover::set_next_boot(&self.req.disk, NextBoot::Agent)
            .context("making the imaging engine the next boot")?;
        log(&self.req, msg);
        let report = ProgressReport {
            seq: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_millis() as u64)
                .unwrap_or(0),
            phase: "rebooting into the imaging engine".into(),
            ..ProgressReport::default()
        };
        if let Err(e) =
            client.post::<_, ProgressReply>(&progress_path(task.id), Some(token), &report)
        {
            log(
                &self.req,
                format!("progress not delivered ({e}); rebooting anyway"),
            );
        }
        self.commit()?;
        reboot(&self.req)
    }
}

/// "deploy os 2 (PI, from the backup partition)" and the like, for the log.
fn describe(task: &Task) -> String {
    match &task.kind {
        TaskKind::Deploy(d) => {
            let how = match (d.after, d.from_backup, d.fetch_to_backup) {
                (After::CopyOnly, false, _) => " (BI: into the backup partition)",
                (_, true, true) => " (BI then PI)",
                (_, true, false) => " (PI: from the backup partition)",
                _ => "",
            };
            format!("deploy {} {}{how}", d.image.name, d.image.version)
        }
        TaskKind::Convert(c) => format!("convert (with {} {})", c.image.name, c.image.version),
        TaskKind::Capture(c) => format!("capture {} {}", c.name, c.version),
        other => other.name().to_string(),
    }
}

/// Reboot the machine: `systemctl reboot` under systemd (the guest's services stop in
/// order, ours commits on SIGTERM), else sync + reboot(2). `IMG_SERVICE_REBOOT=exit`: exit
/// 0 instead (a testing aid); `IMG_SERVICE_REBOOT=hang`: sync and wait until SIGTERM
/// (a testing aid: the state and the next boot are on the disk, the plug can be pulled).
fn reboot(req: &ServiceRequest) -> anyhow::Result<()> {
    if std::env::var("IMG_SERVICE_REBOOT").as_deref() == Ok("hang") {
        // SAFETY: a plain syscall.
        #[allow(unsafe_code)]
        unsafe {
            libc::sync();
        }
        log(
            req,
            "IMG_SERVICE_REBOOT=hang: waiting instead of rebooting (testing aid; the state and the next boot are on the disk)",
        );
        while nap(Duration::from_secs(60)) {}
        std::process::exit(0);
    }
    if std::env::var("IMG_SERVICE_REBOOT").as_deref() == Ok("exit") {
        log(
            req,
            "IMG_SERVICE_REBOOT=exit: exiting instead of rebooting (testing aid)",
        );
        std::process::exit(0);
    }
    if Path::new("/run/systemd/system").is_dir() {
        log(req, "rebooting: systemctl reboot");
        let st = std::process::Command::new("systemctl")
            .arg("reboot")
            .status()
            .context("running systemctl reboot")?;
        if !st.success() {
            bail!("systemctl reboot failed ({st})");
        }
        // systemd stops us with SIGTERM on the way down.
        while nap(Duration::from_secs(60)) {}
        return Ok(());
    }
    log(req, "rebooting: sync, reboot(2)");
    // SAFETY: plain syscalls; reboot(2) does not return on success.
    #[allow(unsafe_code)]
    unsafe {
        libc::sync();
        if libc::reboot(libc::RB_AUTOBOOT) != 0 {
            return Err(std::io::Error::last_os_error())
                .context("reboot(2) (the service needs CAP_SYS_BOOT: run it as root)");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{CaptureSpec, DeploySpec, ImageRef};

    fn parse_line(s: &str) -> Result<ServiceRequest, UsageError> {
        let words: Vec<std::ffi::OsString> = s.split_whitespace().map(Into::into).collect();
        parse(&crate::args::parse("service", OPTS, &words)?)
    }

    #[test]
    fn options_parse_and_bad_ones_are_usage_errors() {
        let r = parse_line("-disk=/dev/vda -server=https://s:8443 -interval=60 -q").unwrap();
        assert_eq!(r.disk, PathBuf::from("/dev/vda"));
        assert_eq!(r.server.as_deref(), Some("https://s:8443"));
        assert_eq!(r.interval, Some(Duration::from_secs(60)));
        assert_eq!(r.retry_wait, Duration::from_secs(2));
        assert!(r.quiet);
        assert_eq!(parse_line("-disk d.img").unwrap().interval, None);
        for bad in [
            "",
            "-server=x",
            "-disk=d -interval=0",
            "-disk=d -interval=soon",
            "-disk=d -retry-wait=0",
            "-disk=d stray",
            "-disk=d -bogus",
        ] {
            assert!(parse_line(bad).is_err(), "{bad:?}");
        }
    }

    fn deploy(after: After, from_backup: bool, fetch: bool) -> Task {
        Task {
            id: 7,
            job: 3,
            kind: TaskKind::Deploy(DeploySpec {
                image: ImageRef {
                    name: "os".into(),
                    version: "2".into(),
                    url: "https://s/repo/os".into(),
                    size: None,
                    autogenic: true,
                },
                disk: None,
                partition: Some("2".into()),
                preserve: vec![],
                backup_first: false,
                after,
                from_backup,
                fetch_to_backup: fetch,
            }),
        }
    }

    #[test]
    fn only_bi_runs_in_the_guest() {
        let cases = [
            (deploy(After::CopyOnly, false, false), Placement::Here),
            (deploy(After::Reboot, true, false), Placement::Pi),
            (deploy(After::NoReboot, true, false), Placement::Pi),
            (deploy(After::Reboot, true, true), Placement::BiThenPi),
            (deploy(After::CopyOnly, true, true), Placement::BiThenPi),
            (deploy(After::Reboot, false, false), Placement::Engine),
            (deploy(After::NoReboot, false, false), Placement::Engine),
            (
                Task {
                    id: 1,
                    job: 1,
                    kind: TaskKind::Capture(CaptureSpec {
                        disk: None,
                        partition: None,
                        name: "n".into(),
                        version: "1".into(),
                        models: vec![],
                        description: None,
                        comp: 1,
                        upload_url: "https://s/up".into(),
                    }),
                },
                Placement::Engine,
            ),
            (
                Task {
                    id: 1,
                    job: 1,
                    kind: TaskKind::Reboot,
                },
                Placement::Reboot,
            ),
            (
                Task {
                    id: 1,
                    job: 1,
                    kind: TaskKind::BootGuest,
                },
                Placement::Nothing,
            ),
        ];
        for (t, want) in cases {
            assert_eq!(placement(&t), want, "{t:?}");
        }
        // The BI half of BI+PI is a BI of the same task.
        let half = bi_half(&deploy(After::Reboot, true, true));
        assert_eq!(half.id, 7);
        assert_eq!(placement(&half), Placement::Here);
    }

    #[test]
    fn the_pi_record_is_written_once_per_task() {
        use crate::autogenic::status;
        let dir = std::env::temp_dir().join(format!("svc-status-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let state = StateDir::open(&dir).unwrap();
        let t = deploy(After::Reboot, true, false);
        record_pi(&state, &t).unwrap();
        let v: serde_json::Value =
            serde_json::from_slice(&std::fs::read(dir.join(status::FILE)).unwrap()).unwrap();
        assert_eq!(v["phase"], "pending");
        assert_eq!(v["attempts"], 0);
        assert_eq!(v["task"]["id"], 7);
        assert_eq!(v["task"]["from_backup"], true);
        // A record of the same task keeps its count (a power cut in the engine counted).
        let mut st = status::load(&state).unwrap().unwrap();
        st.start_attempt();
        status::save(&state, &st).unwrap();
        record_pi(&state, &t).unwrap();
        assert_eq!(status::load(&state).unwrap().unwrap().attempts, 1);
        // Another task replaces it.
        let mut other = t.clone();
        other.id = 8;
        record_pi(&state, &other).unwrap();
        let st = status::load(&state).unwrap().unwrap();
        assert_eq!((st.task.id, st.attempts), (8, 0));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn priority_is_lowered_for_real() {
        // In a child so the test runner's other threads keep their priority.
        // SAFETY: fork in a test; the child only makes syscalls and exits.
        #[allow(unsafe_code)]
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            let line = lower_priority();
            // SAFETY: errno is this thread's; plain syscalls with integer arguments.
            #[allow(unsafe_code)]
            let (nice, io) = unsafe {
                *libc::__errno_location() = 0;
                (
                    libc::getpriority(libc::PRIO_PROCESS, 0),
                    libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, 0),
                )
            };
            let ok = line.contains("nice 19")
                && line.contains("I/O class idle")
                && nice == 19
                && (io >> IOPRIO_CLASS_SHIFT) == IOPRIO_CLASS_IDLE as libc::c_long;
            // SAFETY: the forked child ends here without running the parent's destructors.
            #[allow(unsafe_code)]
            unsafe {
                libc::_exit(if ok { 0 } else { 1 })
            };
        }
        let mut status = 0;
        // SAFETY: waits for our own child; `status` outlives the call.
        #[allow(unsafe_code)]
        unsafe {
            libc::waitpid(pid, &mut status, 0)
        };
        assert!(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0);
    }
}
