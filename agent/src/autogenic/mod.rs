//! Autogenic imaging (seed 001), the agent's side: BI downloads an image into the backup
//! area ([`bi`]), PI re-images the OS partition from it at an agent start ([`pi`]), the
//! imaging status record carries a PI across reboots ([`status`]), and `backup_first`
//! captures the OS partition into the area so a rollback can be a PI ([`capture_into`]).
//!
//! [`deploy_task`] is the check-in's hook: a deploy task with `after: copy_only` (BI),
//! `from_backup` (PI) or both (`fetch_to_backup`, the seed's case 2) is carried out here.

pub mod area;
pub mod bi;
pub mod convert;
pub mod pi;
pub mod status;

use anyhow::Context;
use imgengine::capture::{self, CaptureOptions};
use imgengine::sign::VerifyingKey;
use imgengine::source::{HttpConfig, Location};
use imgengine::ErrorKind;
use protocol::{After, Autogenic, DeploySpec, ImageStamp, Outcome, Task};

use crate::checkin::job::{Done, Rejection, Reporter, TaskEnd};
use crate::checkin::state::StateDir;
use crate::checkin::AgentConfig;
use area::Area;

/// Is this deploy autogenic work (BI, PI or both)?
pub fn is_autogenic(spec: &DeploySpec) -> bool {
    spec.after == After::CopyOnly || spec.from_backup
}

fn network_error(e: &anyhow::Error) -> bool {
    e.chain().any(|c| {
        c.downcast_ref::<imgengine::Error>()
            .is_some_and(|e| e.kind() == ErrorKind::Network)
    })
}

/// BI with retries after network failures (each try resumes from the committed bytes).
#[allow(clippy::too_many_arguments)]
pub fn fetch_with_retries(
    cfg: &AgentConfig,
    area: &mut dyn Area,
    src: &Location,
    http: &HttpConfig,
    keys: &[VerifyingKey],
    stamp: &ImageStamp,
    rep: &Reporter,
) -> anyhow::Result<bi::BiSummary> {
    let mut wait = cfg.retry_wait;
    let mut attempt = 1u32;
    loop {
        match bi::fetch(area, src, http, keys, stamp, rep, &|l| rep.log(l)) {
            Ok(s) => return Ok(s),
            Err(e) if network_error(&e) && attempt <= cfg.job_retries => {
                rep.log(format!(
                    "download into the backup partition interrupted ({e:#}); resuming in {}s (attempt {}/{})",
                    wait.as_secs(),
                    attempt + 1,
                    cfg.job_retries + 1
                ));
                std::thread::sleep(wait);
                wait = (wait * 2).min(cfg.max_retry_wait);
                attempt += 1;
            }
            Err(e) => return Err(e.context("downloading into the backup partition")),
        }
    }
}

/// The check-in's hook for a BI / PI deploy (see the module docs). `keys` are the
/// signature policy's keys (empty: the lab allows unsigned images).
#[allow(clippy::too_many_arguments)]
pub(crate) fn deploy_task(
    state: &StateDir,
    cfg: &AgentConfig,
    task: &Task,
    spec: &DeploySpec,
    src: &Location,
    http: &HttpConfig,
    keys: &[VerifyingKey],
    rep: &Reporter,
) -> anyhow::Result<Done> {
    let stamp = ImageStamp {
        name: spec.image.name.clone(),
        version: spec.image.version.clone(),
    };
    let mut area = area::open(cfg)?.ok_or_else(|| {
        Rejection(
            "this device has no backup partition: convert it to the autogenic layout first (imgserver schedule add ... --convert)".into(),
        )
    })?;
    let mut fetched = 0;
    if spec.after == After::CopyOnly || spec.fetch_to_backup {
        let s = fetch_with_retries(cfg, area.as_mut(), src, http, keys, &stamp, rep)?;
        fetched = s.fetched;
        if !spec.from_backup {
            // BI alone: the seed's V02 right away, no reboot.
            return Ok(Done {
                message: Some(if s.already {
                    format!(
                        "the backup partition already held {} {}",
                        stamp.name, stamp.version
                    )
                } else {
                    format!(
                        "downloaded into the backup partition: {} bytes ({} fetched{})",
                        s.size,
                        s.fetched,
                        if s.resumed_from > 0 {
                            format!(", resumed at byte {}", s.resumed_from)
                        } else {
                            String::new()
                        }
                    )
                }),
                image: Some(stamp),
                bytes: s.fetched,
                end: TaskEnd::Continue,
                preset: None,
            });
        }
    } else {
        let st = area.status()?;
        let holds = st.complete && st.image.as_ref() == Some(&stamp);
        if !holds {
            return Err(Rejection(format!(
                "re-imaging from the backup partition needs it to hold {} {}, and {} holds {}: schedule the download into the backup partition first (imgserver schedule add ... --backup-only), or both at once (--backup-only --from-backup)",
                stamp.name,
                stamp.version,
                area.describe(),
                st.describe()
            ))
            .into());
        }
    }
    drop(area);
    // PI: record it, then run it as every start would.
    let existing = status::load(state)?;
    if existing.as_ref().is_none_or(|s| s.task.id != task.id) {
        if let Some(m) = existing.as_ref().and_then(|s| s.maintenance.clone()) {
            rep.log(format!(
                "the previous re-imaging left maintenance ({m}); this task replaces it"
            ));
        }
        status::save(state, &status::ImagingStatus::new(task.clone()))?;
    }
    rep.log("imaging status record: pending");
    let engine = pi::AreaEngine { cfg, state };
    match pi::run_recorded(state, &engine, rep)? {
        pi::AtStart::Ran(Outcome::Failed) => Ok(Done {
            message: Some("re-imaging failed; it is tried again at the next start".into()),
            image: None,
            bytes: fetched,
            end: TaskEnd::Deferred,
            preset: None,
        }),
        _ => {
            // Succeeded or given up: the result is in the outbox under the record's report.
            let st = status::load(state)?.context("the imaging status record vanished")?;
            let r = st.report.as_deref().and_then(|rep_id| {
                state
                    .outbox()
                    .ok()?
                    .into_iter()
                    .find(|r| r.report == rep_id)
            });
            Ok(Done {
                message: None,
                image: None,
                bytes: fetched,
                end: TaskEnd::Continue,
                preset: r,
            })
        }
    }
}

/// A task the server hands out again while the imaging status record holds it (the server
/// still sees it running): the record wins. A PI still to be tried is left for the next
/// start (one try per start: that is what the attempts count); a finished one answers with
/// its queued result. None: the record is not about this task.
pub(crate) fn recorded_task(
    state: &StateDir,
    task: &Task,
    rep: &Reporter,
) -> anyhow::Result<Option<Done>> {
    let Some(st) = status::load(state)? else {
        return Ok(None);
    };
    if st.task.id != task.id {
        return Ok(None);
    }
    let queued = st.report.as_deref().and_then(|id| {
        let mut all = state.outbox().ok()?;
        all.extend(state.done().ok()?);
        all.into_iter().find(|r| r.report == id)
    });
    if let Some(r) = queued {
        return Ok(Some(Done {
            message: None,
            image: None,
            bytes: 0,
            end: TaskEnd::Continue,
            preset: Some(r),
        }));
    }
    if st.maintenance.is_some() {
        return Ok(None);
    }
    rep.log(format!(
        "task {} is recorded for re-imaging from the backup partition ({} of {} tries made): the next start tries again",
        task.id,
        st.attempts,
        status::MAX_ATTEMPTS
    ));
    Ok(Some(Done {
        message: None,
        image: None,
        bytes: 0,
        end: TaskEnd::Deferred,
        preset: None,
    }))
}

/// The inventory's autogenic facts from the device's backup area.
pub fn inventory(cfg: &AgentConfig) -> Autogenic {
    let Ok(Some(area)) = area::open(cfg) else {
        return Autogenic::default();
    };
    let st = area.status().unwrap_or_default();
    Autogenic {
        support_img_backup: true,
        backup_image_present: st.complete,
        back_image_ver: st
            .image
            .as_ref()
            .filter(|_| st.complete)
            .map(|s| s.version.clone()),
        backup_image: st.image.clone(),
        backup_bytes: st.verified_bytes,
        backup_size: st.size,
        backup_partition_size: area.partition_size(),
    }
}

/// The state file naming the digest of the backup this device captured itself.
pub const CAPTURE_FILE: &str = "backupcapture.json";

/// Is `digest` the image this device captured into its backup area itself?
pub fn own_capture(state: &StateDir, digest: &str) -> bool {
    state
        .read_file(CAPTURE_FILE)
        .ok()
        .flatten()
        .and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .is_some_and(|v| v["digest"].as_str() == Some(digest))
}

/// Seed 003's "back up the current image first" on a device with a backup area: capture
/// the target (the OS partition) into the area, so a rollback is a PI from local flash.
/// Returns false when the device has no area (the caller falls back or skips).
pub fn capture_into(
    state: &StateDir,
    cfg: &AgentConfig,
    disk: &std::path::Path,
    part: Option<&str>,
    current: &ImageStamp,
    rep: &Reporter,
) -> anyhow::Result<bool> {
    let Some(mut area) = area::open(cfg)? else {
        return Ok(false);
    };
    let cap = area.capacity();
    area.begin(current, "capture", cap)?;
    let opts = CaptureOptions {
        comp: 1,
        name: current.name.clone(),
        version: current.version.clone(),
        description: Some("backup taken before a deploy".into()),
        ..CaptureOptions::default()
    };
    rep.log(format!(
        "backing up {} {} from {}{} into {} first",
        current.name,
        current.version,
        disk.display(),
        part.map(|p| format!(" partition {p}")).unwrap_or_default(),
        area.describe()
    ));
    let mut w = AreaWriter {
        area: area.as_mut(),
        pos: 0,
        cap,
    };
    capture::capture(disk, part, &mut w, &opts, rep)
        .map_err(anyhow::Error::new)
        .context("backing up the current image (schedule with --no-backup to skip it)")?;
    let size = w.pos;
    // The area sized to what was captured, so it can be read back as an image.
    area.begin(current, "captured", size)?;
    area.commit(size)?;
    area.finish()?;
    // Its identity as the engine reads it back, then the area's status says so.
    let digest = bi::verify_source(&area.source()?, &[], &imgengine::io::progress::NoProgress)
        .context("reading the backup back")?;
    area.begin(current, &digest, size)?;
    area.commit(size)?;
    area.finish()?;
    // The capture is this device's own, unsigned: its digest is kept in the agent's state
    // (the boot-agent partition), so a PI trusts exactly this image and nothing swapped in.
    state.write_file(
        CAPTURE_FILE,
        &serde_json::to_vec_pretty(&serde_json::json!({
            "digest": digest,
            "image": current,
        }))?,
    )?;
    rep.log(format!(
        "{} {} backed up into {} ({size} bytes): a rollback re-images from it",
        current.name,
        current.version,
        area.describe()
    ));
    Ok(true)
}

struct AreaWriter<'a> {
    area: &'a mut dyn Area,
    pos: u64,
    cap: u64,
}

impl std::io::Write for AreaWriter<'_> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.pos + buf.len() as u64 > self.cap {
            return Err(std::io::Error::other(format!(
                "the backup does not fit in the backup partition ({} bytes)",
                self.cap
            )));
        }
        self.area
            .write_at(self.pos, buf)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))?;
        self.pos += buf.len() as u64;
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// May the guest OS be booted now? No while a PI is recorded and not done, or while
/// maintenance says the OS partition is half-written: the reason, naming the way out.
pub fn guest_boot_refusal(state_dir: &std::path::Path) -> Option<String> {
    let state = StateDir::open(state_dir).ok()?;
    match status::load(&state) {
        Ok(Some(st)) if !st.guest_bootable() => Some(match &st.maintenance {
            Some(m) => format!("maintenance: {m}"),
            None => format!(
                "re-imaging from the backup partition (task {}) is not finished; the next start runs it",
                st.task.id
            ),
        }),
        Ok(_) => None,
        Err(e) => Some(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{ImageRef, TaskKind};

    fn pi_task(fetch: bool) -> (Task, DeploySpec) {
        let spec = DeploySpec {
            image: ImageRef {
                name: "os".into(),
                version: "3".into(),
                url: "https://127.0.0.1:9/repo/os-3.img".into(),
                size: None,
                autogenic: true,
            },
            disk: None,
            partition: Some("2".into()),
            preserve: vec![],
            backup_first: false,
            after: After::Reboot,
            from_backup: true,
            fetch_to_backup: fetch,
        };
        (
            Task {
                id: 5,
                job: 2,
                kind: TaskKind::Deploy(spec.clone()),
            },
            spec,
        )
    }

    /// PI alone on a backup that holds another image: rejected, saying what the backup
    /// holds and how to schedule the download; nothing recorded, nothing fetched.
    #[test]
    fn pi_alone_needs_the_backup_to_hold_exactly_that_image() {
        let d = std::env::temp_dir().join(format!("img-autogenic-pi-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let cfg = AgentConfig {
            state_dir: d.join("state"),
            backup_dir: Some(d.join("backup")),
            quiet: true,
            ..AgentConfig::default()
        };
        let state = StateDir::open(&cfg.state_dir).unwrap();
        let mut area = area::DirArea::open(&d.join("backup")).unwrap();
        let old = ImageStamp {
            name: "os".into(),
            version: "2".into(),
        };
        area.begin(&old, "aa", 4).unwrap();
        area.write_at(0, b"abcd").unwrap();
        area.finish().unwrap();
        let (task, spec) = pi_task(false);
        let rep = Reporter::new(true);
        let e = deploy_task(
            &state,
            &cfg,
            &task,
            &spec,
            &Location::parse(&spec.image.url),
            &HttpConfig::default(),
            &[],
            &rep,
        )
        .err()
        .expect("must be rejected");
        assert!(e.chain().any(|c| c.downcast_ref::<Rejection>().is_some()));
        let msg = format!("{e:#}");
        assert!(
            msg.contains("holds os 2 (complete)") && msg.contains("--backup-only"),
            "{msg}"
        );
        assert!(status::load(&state).unwrap().is_none());
        // A device without any backup area rejects BI and PI alike.
        let none = AgentConfig {
            backup_dir: None,
            ..cfg.clone()
        };
        let (task, spec) = pi_task(true);
        let e = deploy_task(
            &state,
            &none,
            &task,
            &spec,
            &Location::parse(&spec.image.url),
            &HttpConfig::default(),
            &[],
            &rep,
        )
        .err()
        .unwrap();
        assert!(format!("{e:#}").contains("no backup partition"), "{e:#}");
        assert_eq!(inventory(&none), Autogenic::default());
        let inv = inventory(&cfg);
        assert!(inv.support_img_backup && inv.backup_image_present);
        assert_eq!(inv.back_image_ver.as_deref(), Some("2"));
        assert_eq!((inv.backup_bytes, inv.backup_size), (4, 4));
        let _ = std::fs::remove_dir_all(&d);
    }
}
