//! PI (seed 001): re-image the OS partition from the backup area, at an agent start,
//! before discovery (no network is needed), driven by the imaging status record.
//!
//! [`at_start`] is called first thing by the boot agent and by `img -checkin` (so a
//! disk-image file with a boot-agent partition store exercises the same path on a host):
//! a record in `pending`/`imaging` gets `attempts + 1` committed, then one try through
//! [`PiEngine`]: check the image in the area (signature and every chunk, nothing written),
//! then the unchanged deploy engine writes the OS partition from the area (tables last,
//! its resume journal makes a re-run after a power cut cheap). The result goes into the
//! outbox (delivered once at the next check-in) and the record to `done`; the record goes
//! once the server acknowledged the result. After [`status::MAX_ATTEMPTS`] failed tries
//! the record is in maintenance (see `status`).

use anyhow::Context;
use imgengine::deploy::{self, DeployOptions, ResumeMode};
use protocol::{DeploySpec, ImageStamp, Outcome, Task, TaskKind, TaskResult};

use super::status::{self, Step};
use crate::checkin::job::{unix_now, Reporter};
use crate::checkin::state::{new_report_id, stamp_key, StateDir};
use crate::checkin::AgentConfig;

/// What a successful write did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Written {
    pub stamp: Option<ImageStamp>,
    pub bytes: u64,
    /// The state key (disk#partition) the stamp belongs to.
    pub key: Option<String>,
}

/// The two halves of a try, a seam for tests of the counting logic.
pub trait PiEngine {
    /// Everything that can be checked without writing: the backup holds the task's image,
    /// its signature and every chunk are good, the OS partition is there.
    fn check(&self, task: &Task, rep: &Reporter) -> anyhow::Result<()>;
    /// Write the OS partition (called only after `check` passed).
    fn write(&self, task: &Task, rep: &Reporter) -> anyhow::Result<Written>;
}

/// What a start found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AtStart {
    /// No PI recorded (or done, waiting for the server's acknowledgement).
    Nothing,
    /// A try ran: its outcome (a failed try that is not the last leaves the record pending).
    Ran(Outcome),
    /// Maintenance: the reason.
    Maintenance(String),
}

/// The spec of a PI task, if `task` is one.
pub fn pi_spec(task: &Task) -> Option<&DeploySpec> {
    match &task.kind {
        TaskKind::Deploy(s) if s.from_backup => Some(s),
        _ => None,
    }
}

/// Run a recorded PI if there is one (the agent's start; see the module docs).
pub fn at_start(state: &StateDir, cfg: &AgentConfig) -> anyhow::Result<AtStart> {
    let engine = AreaEngine { cfg, state };
    let rep = Reporter::new(cfg.quiet);
    run_recorded(state, &engine, &rep)
}

/// One start with `engine`: count, try, record (see [`at_start`]).
pub fn run_recorded(
    state: &StateDir,
    engine: &dyn PiEngine,
    rep: &Reporter,
) -> anyhow::Result<AtStart> {
    let Some(mut st) = status::load(state)? else {
        return Ok(AtStart::Nothing);
    };
    // A power cut after the result was queued but before the record said so.
    if matches!(st.phase, status::Phase::Pending | status::Phase::Imaging) {
        if let Some(r) = state.finished_result(st.task.id)? {
            if r.outcome == Outcome::Succeeded {
                st.succeeded(&r.report);
                status::save(state, &st)?;
                return Ok(AtStart::Nothing);
            }
        }
    }
    match st.start_attempt() {
        Step::Nothing => Ok(st
            .maintenance
            .clone()
            .map(AtStart::Maintenance)
            .unwrap_or(AtStart::Nothing)),
        Step::GiveUp => {
            let why = st.maintenance.clone().unwrap_or_default();
            rep.log(format!("task {} failed: MAINTENANCE: {why}", st.task.id));
            let r = result(&st.task, Outcome::Failed, Some(why.clone()), None, 0, rep);
            state.queue_result(&r)?;
            st.reported(&r.report);
            status::save(state, &st)?;
            Ok(AtStart::Maintenance(why))
        }
        Step::Try { attempt } => {
            // Counted and committed before anything is tried: a power cut counts.
            status::save(state, &st)?;
            rep.log(format!(
                "task {}: re-imaging the OS partition from the backup partition (attempt {attempt} of {})",
                st.task.id,
                status::MAX_ATTEMPTS
            ));
            let tried = engine.check(&st.task, rep).and_then(|()| {
                st.writing();
                status::save(state, &st)?;
                with_console_progress(rep, || engine.write(&st.task, rep))
            });
            match tried {
                Ok(w) => {
                    if let (Some(k), Some(s)) = (&w.key, &w.stamp) {
                        state.set_stamp(k, Some(s))?;
                    }
                    rep.log(format!(
                        "task {} succeeded: the OS partition was re-imaged from the backup partition ({} bytes written, nothing downloaded)",
                        st.task.id, w.bytes
                    ));
                    let r = result(&st.task, Outcome::Succeeded, None, w.stamp, w.bytes, rep);
                    // The result first, then the record: a cut between leaves a queued
                    // result that the next start finds (above).
                    state.queue_result(&r)?;
                    st.succeeded(&r.report);
                    status::save(state, &st)?;
                    Ok(AtStart::Ran(Outcome::Succeeded))
                }
                Err(e) => {
                    let msg = format!("{e:#}");
                    rep.log(format!("re-imaging failed: {msg}"));
                    if st.failed(&msg) {
                        let why = st.maintenance.clone().unwrap_or_default();
                        rep.log(format!("task {} failed: MAINTENANCE: {why}", st.task.id));
                        let r = result(&st.task, Outcome::Failed, Some(why.clone()), None, 0, rep);
                        state.queue_result(&r)?;
                        st.reported(&r.report);
                        status::save(state, &st)?;
                        return Ok(AtStart::Maintenance(why));
                    }
                    status::save(state, &st)?;
                    Ok(AtStart::Ran(Outcome::Failed))
                }
            }
        }
    }
}

/// How often re-imaging prints its progress on the console.
const CONSOLE_TICK: std::time::Duration = std::time::Duration::from_millis(250);

/// Run `f` (the write) while a line `img: PI progress: N of T bytes (P%) PHASE` goes to the
/// console every [`CONSOLE_TICK`] the count moved: the operator at the device sees the
/// re-imaging advance (the boot agent has no server to show it to), and a power-cut test
/// knows the OS partition is half-written. Console only, not the transcript.
fn with_console_progress<T>(rep: &Reporter, f: impl FnOnce() -> T) -> T {
    if rep.quiet() {
        return f();
    }
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|s| {
        s.spawn(move || {
            let mut last = None;
            while let Err(std::sync::mpsc::RecvTimeoutError::Timeout) =
                rx.recv_timeout(CONSOLE_TICK)
            {
                let (what, done, total) = rep.position();
                if last == Some(done) {
                    continue;
                }
                last = Some(done);
                match total.filter(|t| *t > 0) {
                    Some(t) => eprintln!(
                        "img: PI progress: {done} of {t} bytes ({}%) {what}",
                        (done.min(t) * 100) / t
                    ),
                    None => eprintln!("img: PI progress: {done} bytes {what}"),
                }
            }
        });
        let r = f();
        drop(tx);
        r
    })
}

fn result(
    task: &Task,
    outcome: Outcome,
    message: Option<String>,
    image: Option<ImageStamp>,
    bytes: u64,
    rep: &Reporter,
) -> TaskResult {
    TaskResult {
        task: task.id,
        report: new_report_id(),
        outcome,
        message,
        transcript: rep.lines(),
        image,
        bytes,
        finished: unix_now(),
    }
}

/// The real engine: the device's backup area and the imaging engine.
pub struct AreaEngine<'a> {
    pub cfg: &'a AgentConfig,
    pub state: &'a StateDir,
}

impl AreaEngine<'_> {
    fn spec<'t>(&self, task: &'t Task) -> anyhow::Result<&'t DeploySpec> {
        pi_spec(task).ok_or_else(|| {
            anyhow::anyhow!(
                "the imaging status record holds task {} ({}), which is no re-imaging from the backup partition",
                task.id,
                task.kind.name()
            )
        })
    }

    /// The deploy options; `own`: the area holds this device's own capture (seed 003's
    /// backup), whose digest the agent recorded: it carries no publisher signature, and its
    /// every chunk is still checked against its manifest, whose digest must be the recorded
    /// one.
    fn options(&self, rep: &Reporter, own: bool) -> anyhow::Result<DeployOptions> {
        let trusted_keys = if own {
            rep.log("the backup is this device's own capture (its digest was recorded when it was taken): no publisher signature, every chunk checked");
            Vec::new()
        } else {
            crate::checkin::job::signature_policy(self.cfg, rep)?
        };
        Ok(DeployOptions {
            trusted_keys,
            resume: ResumeMode::Auto,
            state_dir: self.state.journal_dir(),
            threads: 0,
            http: Default::default(),
            partition_onto_disk: false,
        })
    }

    /// The OS partition: the task's, else number 2 (the autogenic layout's).
    fn target(&self, spec: &DeploySpec) -> anyhow::Result<(std::path::PathBuf, String)> {
        let disk = crate::checkin::job::target_disk(self.cfg, spec.disk.as_deref())?;
        Ok((disk, spec.partition.clone().unwrap_or_else(|| "2".into())))
    }
}

impl PiEngine for AreaEngine<'_> {
    fn check(&self, task: &Task, rep: &Reporter) -> anyhow::Result<()> {
        let spec = self.spec(task)?;
        let area = super::area::open(self.cfg)?.ok_or_else(|| {
            anyhow::anyhow!("this device has no backup partition to re-image from")
        })?;
        let st = area.status()?;
        let want = ImageStamp {
            name: spec.image.name.clone(),
            version: spec.image.version.clone(),
        };
        if !st.complete || st.image.as_ref() != Some(&want) {
            anyhow::bail!(
                "{} holds {}, not {} {}: schedule the download into the backup partition (BI) first",
                area.describe(),
                st.describe(),
                want.name,
                want.version
            );
        }
        let own = st
            .digest
            .as_deref()
            .is_some_and(|d| super::own_capture(self.state, d));
        let opts = self.options(rep, own)?;
        rep.log(format!(
            "checking {} {} in {} (signature and every chunk) before writing",
            want.name,
            want.version,
            area.describe()
        ));
        let source = area.source()?;
        let digest = super::bi::verify_source(&source, &opts.trusted_keys, rep).context(
            "the image in the backup partition failed its check; the OS partition was not touched",
        )?;
        if st.digest.as_deref().is_some_and(|d| d != digest) {
            anyhow::bail!("the backup partition's image is not the one that was downloaded; the OS partition was not touched");
        }
        let head = imgengine::format::fetch_head(&source).map_err(anyhow::Error::new)?;
        if matches!(head.meta.content, imgengine::format::Content::Disk { .. }) {
            anyhow::bail!(
                "{} {} is a whole-disk image: re-imaging from the backup partition writes the OS partition only",
                want.name,
                want.version
            );
        }
        let (disk, part) = self.target(spec)?;
        let t =
            imgengine::target::Target::open_disk_read_only(&disk).map_err(anyhow::Error::new)?;
        let layout = imgengine::disk::read_layout(&t, t.len()).map_err(anyhow::Error::new)?;
        layout
            .find(&part)
            .map_err(anyhow::Error::new)
            .with_context(|| format!("the OS partition {part} on {}", disk.display()))?;
        Ok(())
    }

    fn write(&self, task: &Task, rep: &Reporter) -> anyhow::Result<Written> {
        let spec = self.spec(task)?;
        let area = super::area::open(self.cfg)?
            .ok_or_else(|| anyhow::anyhow!("this device has no backup partition"))?;
        let (disk, part) = self.target(spec)?;
        let st = area.status()?;
        let own = st
            .digest
            .as_deref()
            .is_some_and(|d| super::own_capture(self.state, d));
        let opts = self.options(rep, own)?;
        let summary = deploy::OpenedImage::open_source(area.source()?)
            .and_then(|o| o.deploy(&disk, Some(&part), &opts, rep))
            .map_err(anyhow::Error::new)
            .context("writing the OS partition from the backup partition")?;
        for n in &summary.notes {
            rep.log(n.clone());
        }
        let disk_name = disk.display().to_string();
        let number = crate::checkin::job::partition_number(&disk, &part).unwrap_or(part);
        Ok(Written {
            stamp: Some(ImageStamp {
                name: spec.image.name.clone(),
                version: spec.image.version.clone(),
            }),
            bytes: summary.bytes_written,
            key: Some(stamp_key(&disk_name, Some(&number))),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    struct Fake {
        check_ok: bool,
        write_ok: bool,
        writes: Cell<u32>,
    }

    impl PiEngine for Fake {
        fn check(&self, _: &Task, _: &Reporter) -> anyhow::Result<()> {
            if self.check_ok {
                Ok(())
            } else {
                anyhow::bail!("chunk 3: SHA-256 mismatch")
            }
        }
        fn write(&self, _: &Task, _: &Reporter) -> anyhow::Result<Written> {
            self.writes.set(self.writes.get() + 1);
            if self.write_ok {
                Ok(Written {
                    stamp: Some(ImageStamp {
                        name: "os".into(),
                        version: "2".into(),
                    }),
                    bytes: 10,
                    key: Some("d#2".into()),
                })
            } else {
                anyhow::bail!("I/O error writing the OS partition")
            }
        }
    }

    fn setup(tag: &str) -> (std::path::PathBuf, StateDir) {
        let d = std::env::temp_dir().join(format!("img-pi-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let s = StateDir::open(&d).unwrap();
        let task = Task {
            id: 11,
            job: 4,
            kind: TaskKind::Reboot,
        };
        status::save(&s, &status::ImagingStatus::new(task)).unwrap();
        (d, s)
    }

    #[test]
    fn success_queues_one_result_and_the_ack_clears_the_record() {
        let (d, s) = setup("ok");
        let e = Fake {
            check_ok: true,
            write_ok: true,
            writes: Cell::new(0),
        };
        let rep = Reporter::new(true);
        assert_eq!(
            run_recorded(&s, &e, &rep).unwrap(),
            AtStart::Ran(Outcome::Succeeded)
        );
        let out = s.outbox().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].task, 11);
        assert_eq!(s.stamps().unwrap()["d#2"].version, "2");
        // A second start does nothing more.
        assert_eq!(run_recorded(&s, &e, &rep).unwrap(), AtStart::Nothing);
        assert_eq!(e.writes.get(), 1);
        assert_eq!(s.outbox().unwrap().len(), 1);
        s.acknowledge(&out[0].report).unwrap();
        status::after_acks(&s, std::slice::from_ref(&out[0].report)).unwrap();
        assert!(status::load(&s).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_bad_backup_is_refused_before_writing_and_three_failures_mean_maintenance() {
        let (d, s) = setup("bad");
        let e = Fake {
            check_ok: false,
            write_ok: true,
            writes: Cell::new(0),
        };
        let rep = Reporter::new(true);
        for n in 1..=2 {
            assert_eq!(
                run_recorded(&s, &e, &rep).unwrap(),
                AtStart::Ran(Outcome::Failed),
                "try {n}"
            );
            assert!(s.outbox().unwrap().is_empty());
            assert_eq!(status::load(&s).unwrap().unwrap().attempts, n);
        }
        let AtStart::Maintenance(why) = run_recorded(&s, &e, &rep).unwrap() else {
            panic!("the third failure must mean maintenance")
        };
        assert!(
            why.contains("not touched") && why.contains("SHA-256"),
            "{why}"
        );
        assert_eq!(
            e.writes.get(),
            0,
            "nothing may be written after a failed check"
        );
        let out = s.outbox().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].outcome, Outcome::Failed);
        assert_eq!(status::maintenance(&s), Some(why.clone()));
        // Later starts stay in maintenance and queue nothing more.
        assert_eq!(
            run_recorded(&s, &e, &rep).unwrap(),
            AtStart::Maintenance(why)
        );
        assert_eq!(s.outbox().unwrap().len(), 1);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_failed_write_leaves_the_os_partition_marked_unbootable() {
        let (d, s) = setup("dirty");
        let e = Fake {
            check_ok: true,
            write_ok: false,
            writes: Cell::new(0),
        };
        let rep = Reporter::new(true);
        for _ in 0..3 {
            run_recorded(&s, &e, &rep).unwrap();
        }
        let st = status::load(&s).unwrap().unwrap();
        assert!(st.os_dirty && !st.guest_bootable() && st.maintenance.is_some());
        assert_eq!(e.writes.get(), 3);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn a_result_queued_before_a_power_cut_is_not_imaged_again() {
        let (d, s) = setup("cut");
        let mut st = status::load(&s).unwrap().unwrap();
        st.start_attempt();
        status::save(&s, &st).unwrap();
        let r = TaskResult {
            task: 11,
            report: "feed".into(),
            outcome: Outcome::Succeeded,
            message: None,
            transcript: vec![],
            image: None,
            bytes: 0,
            finished: 1,
        };
        s.queue_result(&r).unwrap();
        let e = Fake {
            check_ok: true,
            write_ok: true,
            writes: Cell::new(0),
        };
        assert_eq!(
            run_recorded(&s, &e, &Reporter::new(true)).unwrap(),
            AtStart::Nothing
        );
        assert_eq!(e.writes.get(), 0);
        let st = status::load(&s).unwrap().unwrap();
        assert_eq!(st.report.as_deref(), Some("feed"));
        let _ = std::fs::remove_dir_all(&d);
    }
}
