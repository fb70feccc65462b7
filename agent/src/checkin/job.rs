//! Carrying out one task from the server: deploy (optionally backing up what is there
//! first, or only copying the image into the backup location), capture with upload into the
//! server's repository, reboot, boot the guest OS.
//!
//! While a task runs, a reporter thread posts progress (phase, bytes, percent, rate) every
//! few seconds; the lines of the task's transcript are collected as it goes and sent with
//! the final result. Progress is best effort (a lost server does not stop imaging); the
//! final result is kept in the outbox until the server has it.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex};
use std::time::Instant;

use anyhow::{anyhow, bail, Context};
use imgengine::capture::{self, CaptureOptions};
use imgengine::deploy::{self, DeployOptions, ResumeMode};
use imgengine::io::progress::Progress;
use imgengine::source::{HttpConfig, Location};
use imgengine::ErrorKind;
use protocol::{
    progress_path, After, CaptureSpec, DeploySpec, ImageStamp, Outcome, ProgressReply,
    ProgressReport, Task, TaskKind, TaskResult,
};

#[path = "session_task.rs"]
mod session_task;

use super::client::Client;
use super::state::{new_report_id, stamp_key, StateDir};
use super::AgentConfig;

/// What the agent does after the task.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskEnd {
    /// Check in again (more work may be waiting).
    Continue,
    Reboot,
    BootGuest,
    /// No result yet: a re-imaging from the backup partition failed and is tried again at
    /// the next start (the imaging status record carries it); reboot into the agent.
    Deferred,
}

pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn stamp_time(t: u64) -> String {
    let s = t % 86_400;
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

struct Phase {
    what: String,
    total: Option<u64>,
    done: u64,
    /// Bytes and time at the last progress post (for the rate).
    last_bytes: u64,
    last_at: Instant,
}

/// Progress sink and transcript of one task.
pub struct Reporter {
    phase: Mutex<Phase>,
    transcript: Mutex<Vec<String>>,
    quiet: bool,
}

impl Reporter {
    pub fn new(quiet: bool) -> Reporter {
        Reporter {
            phase: Mutex::new(Phase {
                what: String::new(),
                total: None,
                done: 0,
                last_bytes: 0,
                last_at: Instant::now(),
            }),
            transcript: Mutex::new(Vec::new()),
            quiet,
        }
    }

    /// Add a line to the transcript (and the console).
    pub fn log(&self, line: impl Into<String>) {
        let line = format!("{} {}", stamp_time(unix_now()), line.into());
        if !self.quiet {
            eprintln!("img: {line}");
        }
        self.transcript
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(line);
    }

    /// The current phase, its bytes done and its total (for a console progress line).
    pub fn position(&self) -> (String, u64, Option<u64>) {
        let p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        (p.what.clone(), p.done, p.total)
    }

    /// Whether nothing goes to the console.
    pub fn quiet(&self) -> bool {
        self.quiet
    }

    pub fn lines(&self) -> Vec<String> {
        self.transcript
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// A progress report of the current phase; `seq` orders reports across restarts.
    fn snapshot(&self) -> ProgressReport {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        let secs = p.last_at.elapsed().as_secs_f64().max(1e-3);
        let rate = (p.done.saturating_sub(p.last_bytes) as f64 / secs) as u64;
        p.last_bytes = p.done;
        p.last_at = Instant::now();
        let seq = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        ProgressReport {
            seq,
            phase: p.what.clone(),
            percent: p
                .total
                .filter(|t| *t > 0)
                .map(|t| (p.done as f64 * 100.0 / t as f64).min(100.0) as f32),
            bytes: p.done,
            total: p.total,
            rate,
        }
    }
}

impl Progress for Reporter {
    fn begin(&self, what: &str, total: Option<u64>) {
        {
            let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            *p = Phase {
                what: what.to_string(),
                total,
                done: 0,
                last_bytes: 0,
                last_at: Instant::now(),
            };
        }
        self.log(match total {
            Some(t) => format!("{what}: {t} bytes"),
            None => what.to_string(),
        });
    }

    fn advance(&self, bytes: u64) {
        let mut p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
        p.done = p.done.saturating_add(bytes);
    }

    fn end(&self) {
        let (what, done) = {
            let p = self.phase.lock().unwrap_or_else(|e| e.into_inner());
            (p.what.clone(), p.done)
        };
        self.log(format!("{what}: done, {done} bytes"));
    }
}

/// Run `task` and build its final result. Never fails: every failure becomes a Failed
/// result with the error in the message and the transcript.
pub fn run(
    client: &Client,
    token: &str,
    state: &StateDir,
    cfg: &AgentConfig,
    task: &Task,
    attempt: u32,
) -> (TaskResult, TaskEnd) {
    let rep = Reporter::new(cfg.quiet);
    rep.log(format!(
        "task {} of job {}: {}{}",
        task.id,
        task.job,
        task.kind.name(),
        if attempt > 1 {
            format!(" (attempt {attempt}, resuming)")
        } else {
            String::new()
        }
    ));
    let stop = AtomicBool::new(false);
    let (tx, rx) = mpsc::channel::<()>();
    let outcome = std::thread::scope(|s| {
        // The progress reporter: every `progress_interval` until the task ends.
        let (rep, stop) = (&rep, &stop);
        s.spawn(move || {
            let mut warned = false;
            // A message (or the sender gone) ends it; a timeout is the next tick.
            while let Err(mpsc::RecvTimeoutError::Timeout) = rx.recv_timeout(cfg.progress_interval) {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let snap = rep.snapshot();
                match client.post::<_, ProgressReply>(&progress_path(task.id), Some(token), &snap) {
                    Ok(r) if r.abort && !warned => {
                        rep.log("the administrator aborted the job; a started device finishes its task (seed 003)");
                        warned = true;
                    }
                    Ok(_) => {}
                    Err(e) if !warned => {
                        rep.log(format!("progress not delivered ({e}); imaging goes on"));
                        warned = true;
                    }
                    Err(_) => {}
                }
            }
        });
        let r = execute(client, state, cfg, task, rep);
        stop.store(true, Ordering::Relaxed);
        let _ = tx.send(());
        r
    });
    let (outcome, message, image, bytes, end) = match outcome {
        // The autogenic path queued its result itself (the imaging status record names it).
        Ok(Done {
            preset: Some(r),
            end,
            ..
        }) => return (r, end),
        Ok(done) => {
            rep.log(format!("task {} succeeded", task.id));
            (
                Outcome::Succeeded,
                done.message,
                done.image,
                done.bytes,
                done.end,
            )
        }
        Err(e) => {
            let msg = format!("{e:#}");
            rep.log(format!("task {} failed: {msg}", task.id));
            let rejected = e.chain().any(|c| c.downcast_ref::<Rejection>().is_some());
            (
                if rejected {
                    Outcome::Rejected
                } else {
                    Outcome::Failed
                },
                Some(msg),
                None,
                0,
                TaskEnd::Continue,
            )
        }
    };
    let result = TaskResult {
        task: task.id,
        report: new_report_id(),
        outcome,
        message,
        transcript: rep.lines(),
        image,
        bytes,
        finished: unix_now(),
    };
    (result, end)
}

/// The device refuses a task it cannot carry out as asked (nothing was changed).
#[derive(Debug)]
pub(crate) struct Rejection(pub(crate) String);

impl std::fmt::Display for Rejection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Rejection {}

pub(crate) struct Done {
    pub(crate) message: Option<String>,
    pub(crate) image: Option<ImageStamp>,
    pub(crate) bytes: u64,
    pub(crate) end: TaskEnd,
    /// A result already queued in the outbox (autogenic PI): sent as it is.
    pub(crate) preset: Option<TaskResult>,
}

fn execute(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
    task: &Task,
    rep: &Reporter,
) -> anyhow::Result<Done> {
    if let Some(done) = crate::autogenic::recorded_task(state, task, rep)? {
        return Ok(done);
    }
    match &task.kind {
        TaskKind::Deploy(spec) => deploy_task(client, state, cfg, task, spec, rep),
        TaskKind::Capture(spec) => capture_task(client, cfg, spec, rep),
        TaskKind::Reboot => {
            rep.log("rebooting as the server asks");
            Ok(Done {
                message: None,
                image: None,
                bytes: 0,
                end: TaskEnd::Reboot,
                preset: None,
            })
        }
        TaskKind::Convert(spec) => {
            crate::autogenic::convert::task(client, state, cfg, task, spec, rep)
        }
        TaskKind::Session(spec) => session_task::session_task(client, state, cfg, spec, rep),
        TaskKind::BootGuest => {
            rep.log("booting the guest OS as the server asks");
            Ok(Done {
                message: None,
                image: None,
                bytes: 0,
                end: TaskEnd::BootGuest,
                preset: None,
            })
        }
    }
}

/// The disk a task names, or the device's one system disk.
pub(crate) fn target_disk(cfg: &AgentConfig, named: Option<&str>) -> anyhow::Result<PathBuf> {
    if let Some(n) = named {
        let p = PathBuf::from(n);
        let known = super::inventory::disks(cfg)
            .into_iter()
            .any(|(d, _)| d == p);
        if !known {
            return Err(Rejection(format!("disk {n} is not one of this device's disks")).into());
        }
        return Ok(p);
    }
    let disks = super::inventory::disks(cfg);
    match disks.as_slice() {
        [(one, _)] => Ok(one.clone()),
        [] => Err(Rejection("this device has no disk to image".into()).into()),
        many => Ok(many[0].0.clone()),
    }
}

/// HTTP settings for a URL: the server's own CA for the server's URLs; the system's web PKI
/// for images on other servers (a CDN has a public certificate).
fn http_for(client: &Client, cfg: &AgentConfig, url: &str) -> HttpConfig {
    // Same origin, not a string prefix: `https://srv:8443` is no prefix-match for
    // `https://srv:84430/` or `https://srv:8443.example/`.
    let ours = super::trust::origin(url).is_some()
        && super::trust::origin(url) == super::trust::origin(client.base());
    HttpConfig {
        ca_file: if ours { cfg.ca_file.clone() } else { None },
        timeout: Some(cfg.timeout),
        retries: 5,
        authorization: None,
    }
}

/// Does `url` point at the same server (scheme, host and port) as `base`? Compared whole,
/// so `https://srv:8443.example.net/` is not `https://srv:8443`.
fn same_origin(base: &str, url: &str) -> bool {
    fn origin(u: &str) -> Option<String> {
        let (scheme, rest) = u.split_once("://")?;
        let host = rest.split(['/', '?', '#']).next()?;
        Some(format!(
            "{}://{}",
            scheme.to_ascii_lowercase(),
            host.to_ascii_lowercase()
        ))
    }
    origin(base).is_some_and(|b| origin(url) == Some(b))
}

fn trusted_keys(cfg: &AgentConfig) -> anyhow::Result<Vec<imgengine::sign::VerifyingKey>> {
    match &cfg.trusted_dir {
        Some(d) if d.is_dir() => imgengine::sign::load_trusted_dir(d)
            .with_context(|| format!("loading trusted keys from {}", d.display())),
        _ => Ok(Vec::new()),
    }
}

/// The signing keys a deploy checks against. Signatures are required: with no trusted key
/// nothing is deployed (unsigned, raw or signed by anyone), unless the lab setting
/// `unsigned_images = yes` says otherwise, which the transcript then shows.
pub(crate) fn signature_policy(
    cfg: &AgentConfig,
    rep: &Reporter,
) -> anyhow::Result<Vec<imgengine::sign::VerifyingKey>> {
    let keys = trusted_keys(cfg)?;
    if !keys.is_empty() {
        return Ok(keys);
    }
    let dir = cfg
        .trusted_dir
        .as_ref()
        .map(|d| d.display().to_string())
        .unwrap_or_else(|| "(none configured)".into());
    if !cfg.lab.unsigned_images {
        return Err(Rejection(format!(
            "no trusted image-signing key on this device (trusted key folder {dir}): nothing is deployed.              Install the publisher's public key (mkinitrd --trusted KEY.pub), or in a lab put `unsigned_images = yes` in {}",
            cfg.config_dir.join(discovery::bootconfig::LAB_FILE).display()
        ))
        .into());
    }
    rep.log(format!(
        "LAB SETTING unsigned_images=yes: no trusted signing key in {dir}; the image is deployed without a signature check"
    ));
    Ok(keys)
}

/// A task's image URL must be http(s): anything else (a local path, file://, a device)
/// would make the server choose what the device reads.
fn check_image_url(url: &str) -> anyhow::Result<()> {
    if super::trust::origin(url).is_none() {
        return Err(Rejection(format!(
            "image URL {url:?} is not an http(s) URL: refused (the server must name an HTTP(S) location)"
        ))
        .into());
    }
    Ok(())
}

/// Run `f` again after network failures (the server restarting, a cable pulled), with a
/// growing pause; the engine resumes from its journal, so nothing already written is
/// fetched again.
fn with_retries<T>(
    cfg: &AgentConfig,
    rep: &Reporter,
    what: &str,
    mut f: impl FnMut() -> imgengine::Result<T>,
) -> anyhow::Result<T> {
    let mut wait = cfg.retry_wait;
    let mut attempt = 1u32;
    loop {
        match f() {
            Ok(v) => return Ok(v),
            Err(e) if e.kind() == ErrorKind::Network && attempt <= cfg.job_retries => {
                rep.log(format!(
                    "{what} interrupted ({e:#}); retrying in {}s (attempt {}/{})",
                    wait.as_secs(),
                    attempt + 1,
                    cfg.job_retries + 1
                ));
                std::thread::sleep(wait);
                wait = (wait * 2).min(cfg.max_retry_wait);
                attempt += 1;
            }
            Err(e) => return Err(anyhow::Error::new(e).context(what.to_string())),
        }
    }
}

pub(crate) fn deploy_task(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
    task: &Task,
    spec: &DeploySpec,
    rep: &Reporter,
) -> anyhow::Result<Done> {
    let disk = target_disk(cfg, spec.disk.as_deref())?;
    let disk_name = disk.display().to_string();
    if !spec.preserve.is_empty() && spec.partition.is_none() {
        return Err(Rejection(format!(
            "preserving partitions {} while writing a whole-disk image is not supported: deploy partition images instead",
            spec.preserve.join(", ")
        ))
        .into());
    }
    check_image_url(&spec.image.url)?;
    let stamp = ImageStamp {
        name: spec.image.name.clone(),
        version: spec.image.version.clone(),
    };
    let mut http = http_for(client, cfg, &spec.image.url);
    // The server's repository answers only the device whose task this is: the credential
    // goes with the image requests, but only to the server that issued it (never to a CDN
    // or any other host a task names).
    if same_origin(client.base(), &spec.image.url) {
        let ident = super::trust::ServerIdentity::of(client.base(), cfg.ca_file.as_deref())?;
        http.authorization = super::bound_credential(state, &ident)?.map(|t| format!("Bearer {t}"));
    }
    let opts = DeployOptions {
        trusted_keys: signature_policy(cfg, rep)?,
        resume: ResumeMode::Auto,
        state_dir: state.journal_dir(),
        threads: 0,
        http: http.clone(),
        partition_onto_disk: false,
    };
    let src = Location::parse(&spec.image.url);
    if crate::autogenic::is_autogenic(spec) {
        return crate::autogenic::deploy_task(
            state,
            cfg,
            task,
            spec,
            &src,
            &http,
            &opts.trusted_keys,
            rep,
        );
    }
    if spec.backup_first {
        backup_current(state, cfg, &disk, spec.partition.as_deref(), rep)?;
    }
    rep.log(format!(
        "deploying {} {} from {} onto {}{}",
        stamp.name,
        stamp.version,
        spec.image.url,
        disk_name,
        spec.partition
            .as_ref()
            .map(|p| format!(" partition {p}"))
            .unwrap_or_default()
    ));
    if !spec.preserve.is_empty() {
        rep.log(format!(
            "partitions {} are preserved (a partition image touches no other partition)",
            spec.preserve.join(", ")
        ));
    }
    let summary = with_retries(cfg, rep, "deploy", || {
        deploy::deploy(&src, &disk, spec.partition.as_deref(), &opts, rep)
    })?;
    for n in &summary.notes {
        rep.log(n.clone());
    }
    rep.log(format!(
        "{} chunks written, {} already intact, {} bytes written, {} bytes fetched{}",
        summary.chunks_written,
        summary.chunks_skipped,
        summary.bytes_written,
        summary.bytes_fetched,
        if summary.resumed { " (resumed)" } else { "" }
    ));
    if spec.partition.is_none() {
        // A whole-disk image replaces every partition: their old stamps no longer hold.
        let prefix = format!("{disk_name}#");
        for k in state.stamps()?.keys().filter(|k| k.starts_with(&prefix)) {
            state.set_stamp(k, None)?;
        }
    }
    let key = match &spec.partition {
        Some(p) => stamp_key(
            &disk_name,
            Some(&partition_number(&disk, p).unwrap_or_else(|| p.clone())),
        ),
        None => stamp_key(&disk_name, None),
    };
    state.set_stamp(&key, Some(&stamp))?;
    let end = match spec.after {
        After::Reboot => TaskEnd::Reboot,
        After::NoReboot | After::CopyOnly => TaskEnd::Continue,
    };
    Ok(Done {
        message: None,
        image: Some(stamp),
        bytes: summary.bytes_written,
        end,
        preset: None,
    })
}

/// The partition number for a spec that may be a label (stamps are kept by number, as the
/// inventory reports partitions by number).
pub(crate) fn partition_number(disk: &Path, spec: &str) -> Option<String> {
    if spec.parse::<u32>().is_ok() {
        return Some(spec.to_string());
    }
    let t = imgengine::target::Target::open_disk_read_only(disk).ok()?;
    let layout = imgengine::disk::read_layout(&t, t.len()).ok()?;
    layout.find(spec).ok().map(|p| p.number.to_string())
}

/// Seed 003 "back up the current image first": capture the target into the backup
/// location. A device without one (no SupportImgBackup) skips it, as the server's
/// validation warned; a target with nothing to back up (never imaged) is skipped too.
fn backup_current(
    state: &StateDir,
    cfg: &AgentConfig,
    disk: &Path,
    part: Option<&str>,
    rep: &Reporter,
) -> anyhow::Result<()> {
    let name = disk.display().to_string();
    let key = stamp_key(&name, part);
    let current = state.stamps()?.get(&key).cloned();
    let Some(current) = current else {
        rep.log("the target holds no image written by this agent: nothing to back up");
        return Ok(());
    };
    if !crate::autogenic::capture_into(state, cfg, disk, part, &current, rep)? {
        rep.log("no backup partition or location on this device: backup skipped");
    }
    Ok(())
}

fn capture_task(
    client: &Client,
    cfg: &AgentConfig,
    spec: &CaptureSpec,
    rep: &Reporter,
) -> anyhow::Result<Done> {
    let disk = target_disk(cfg, spec.disk.as_deref())?;
    // The capture (the whole disk, with the boot partition's credential and user data) goes
    // only to the server this device checked in with, over the connection policy it passed.
    let server = super::trust::origin(client.base());
    if server.is_none() || super::trust::origin(&spec.upload_url) != server {
        return Err(Rejection(format!(
            "upload URL {} is not on the management server {}: a capture is only uploaded to the server itself",
            spec.upload_url,
            client.base()
        ))
        .into());
    }
    if !spec.upload_url.contains("key=") {
        bail!("the capture task has no upload key (fetched with GET?): check in again to get a fresh one");
    }
    let opts = CaptureOptions {
        comp: spec.comp.min(9),
        name: spec.name.clone(),
        version: spec.version.clone(),
        models: spec.models.clone(),
        description: spec.description.clone(),
        ..CaptureOptions::default()
    };
    rep.log(format!(
        "capturing {}{} as {} {}",
        disk.display(),
        spec.partition
            .as_ref()
            .map(|p| format!(" partition {p}"))
            .unwrap_or_default(),
        spec.name,
        spec.version
    ));
    let http = http_for(client, cfg, &spec.upload_url);
    let (reader, mut writer) = std::io::pipe().context("creating the upload pipe")?;
    let url = spec.upload_url.clone();
    let uploader = std::thread::spawn(move || imgengine::source::upload(&url, &http, reader));
    let captured = capture::capture(&disk, spec.partition.as_deref(), &mut writer, &opts, rep);
    drop(writer);
    let uploaded = uploader
        .join()
        .map_err(|_| anyhow!("the upload thread panicked"))?;
    let summary = captured.map_err(anyhow::Error::new).context("capturing")?;
    uploaded
        .map_err(anyhow::Error::new)
        .context("uploading the image to the server")?;
    rep.log(format!(
        "{} chunks, {} bytes of data, {} bytes uploaded",
        summary.chunks, summary.data_bytes, summary.image_bytes
    ));
    Ok(Done {
        message: None,
        image: Some(ImageStamp {
            name: spec.name.clone(),
            version: spec.version.clone(),
        }),
        bytes: summary.image_bytes,
        end: TaskEnd::Continue,
        preset: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn reporter_reports_percent_and_keeps_transcript() {
        let r = Reporter::new(true);
        r.begin("deploying", Some(200));
        r.advance(50);
        let s = r.snapshot();
        assert_eq!(s.phase, "deploying");
        assert_eq!(s.bytes, 50);
        assert_eq!(s.percent, Some(25.0));
        let later = r.snapshot();
        assert!(later.seq >= s.seq);
        r.end();
        let lines = r.lines();
        assert_eq!(lines.len(), 2);
        assert!(lines[1].ends_with("deploying: done, 50 bytes"), "{lines:?}");
    }

    fn policy_cfg(tag: &str) -> (AgentConfig, PathBuf, Vec<u8>) {
        let dir = std::env::temp_dir().join(format!("img-job-policy-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("trusted")).unwrap();
        let disk = dir.join("disk.img");
        let bytes: Vec<u8> = (0..1u32 << 20).map(|i| (i * 7 % 251) as u8).collect();
        std::fs::write(&disk, &bytes).unwrap();
        let cfg = AgentConfig {
            state_dir: dir.join("state"),
            disk: Some(disk.clone()),
            trusted_dir: Some(dir.join("trusted")),
            config_dir: dir.join("config"),
            timeout: Duration::from_millis(300),
            retry_wait: Duration::from_millis(1),
            job_retries: 0,
            quiet: true,
            ..AgentConfig::default()
        };
        (cfg, disk, bytes)
    }

    fn deploy(url: &str) -> Task {
        Task {
            id: 1,
            job: 1,
            kind: TaskKind::Deploy(DeploySpec {
                image: protocol::ImageRef {
                    name: "os".into(),
                    version: "1".into(),
                    url: url.into(),
                    size: None,
                    autogenic: false,
                },
                disk: None,
                partition: None,
                preserve: vec![],
                backup_first: true,
                after: After::NoReboot,
                from_backup: false,
                fetch_to_backup: false,
            }),
        }
    }

    fn rejected(r: anyhow::Result<Done>) -> String {
        let e = r.err().expect("the task must be refused");
        assert!(
            e.chain().any(|c| c.downcast_ref::<Rejection>().is_some()),
            "{e:#}"
        );
        format!("{e:#}")
    }

    /// No trusted key and no lab setting: the deploy is refused before the image is even
    /// fetched (the server here does not exist) and the disk is untouched.
    #[test]
    fn deploy_without_a_trusted_key_is_refused_before_anything_is_written() {
        let (cfg, disk, bytes) = policy_cfg("nokey");
        let client = Client::new("https://127.0.0.1:9", None, cfg.timeout).unwrap();
        let state = StateDir::open(&cfg.state_dir).unwrap();
        let rep = Reporter::new(true);
        let why = rejected(execute(
            &client,
            &state,
            &cfg,
            &deploy("https://127.0.0.1:9/repo/os-1.img"),
            &rep,
        ));
        assert!(
            why.contains("no trusted image-signing key") && why.contains("unsigned_images = yes"),
            "{why}"
        );
        assert_eq!(std::fs::read(&disk).unwrap(), bytes);
        // With the lab setting the policy lets it through (and says so); the fetch then
        // fails on the missing server, still before writing.
        let cfg = AgentConfig {
            lab: discovery::LabSettings {
                unsigned_images: true,
                ..Default::default()
            },
            ..cfg
        };
        let rep = Reporter::new(true);
        let r = execute(
            &client,
            &state,
            &cfg,
            &deploy("https://127.0.0.1:9/repo/os-1.img"),
            &rep,
        );
        assert!(r.is_err());
        assert!(rep
            .lines()
            .iter()
            .any(|l| l.contains("LAB SETTING unsigned_images=yes")));
        assert_eq!(std::fs::read(&disk).unwrap(), bytes);
    }

    #[test]
    fn image_urls_that_are_not_http_are_refused() {
        let (mut cfg, disk, bytes) = policy_cfg("url");
        cfg.lab.unsigned_images = true;
        let client = Client::new("https://127.0.0.1:9", None, cfg.timeout).unwrap();
        let state = StateDir::open(&cfg.state_dir).unwrap();
        let src = disk.with_file_name("other.img");
        std::fs::write(&src, vec![0u8; 4096]).unwrap();
        for url in [
            src.display().to_string(),
            format!("file://{}", src.display()),
            "-".to_string(),
            "ftp://127.0.0.1/os.img".to_string(),
        ] {
            let why = rejected(execute(
                &client,
                &state,
                &cfg,
                &deploy(&url),
                &Reporter::new(true),
            ));
            assert!(why.contains("not an http(s) URL"), "{why}");
        }
        assert_eq!(std::fs::read(&disk).unwrap(), bytes);
    }

    #[test]
    fn captures_are_uploaded_only_to_the_server_itself() {
        let (cfg, _disk, _) = policy_cfg("upload");
        let client = Client::new("https://127.0.0.1:8443", None, cfg.timeout).unwrap();
        let state = StateDir::open(&cfg.state_dir).unwrap();
        for url in [
            "https://127.0.0.1:84430/api/v1/tasks/1/upload?key=k",
            "https://127.0.0.1:8443.evil.example/api/v1/tasks/1/upload?key=k",
            "http://127.0.0.1:8443/api/v1/tasks/1/upload?key=k",
            "https://10.0.0.66:8443/api/v1/tasks/1/upload?key=k",
        ] {
            let task = Task {
                id: 2,
                job: 1,
                kind: TaskKind::Capture(CaptureSpec {
                    disk: None,
                    partition: None,
                    name: "c".into(),
                    version: "1".into(),
                    models: vec![],
                    description: None,
                    comp: 1,
                    upload_url: url.into(),
                }),
            };
            let why = rejected(execute(&client, &state, &cfg, &task, &Reporter::new(true)));
            assert!(why.contains("only uploaded to the server itself"), "{why}");
        }
    }

    #[test]
    fn credential_goes_only_to_the_same_origin() {
        assert!(same_origin(
            "https://srv:8443",
            "https://srv:8443/repo/os-1.img"
        ));
        assert!(same_origin("https://SRV:8443", "https://srv:8443/repo/x?y"));
        assert!(!same_origin(
            "https://srv:8443",
            "https://srv:8443.evil.example/repo/x"
        ));
        assert!(!same_origin("https://srv:8443", "http://srv:8443/repo/x"));
        assert!(!same_origin(
            "https://srv:8443",
            "https://cdn.example/os-1.img"
        ));
        assert!(!same_origin("https://srv", "https://srv@evil.example/x"));
    }

    #[test]
    fn retries_only_network_errors() {
        let cfg = AgentConfig {
            retry_wait: Duration::from_millis(1),
            job_retries: 2,
            quiet: true,
            ..AgentConfig::default()
        };
        let rep = Reporter::new(true);
        let mut calls = 0;
        let r: anyhow::Result<()> = with_retries(&cfg, &rep, "x", || {
            calls += 1;
            Err(imgengine::Error::new(ErrorKind::Network, "down"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 3);
        let mut calls = 0;
        let r: anyhow::Result<()> = with_retries(&cfg, &rep, "x", || {
            calls += 1;
            Err(imgengine::Error::new(ErrorKind::Corrupt, "bad"))
        });
        assert!(r.is_err());
        assert_eq!(calls, 1);
    }
}
