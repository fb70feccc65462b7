//! What the agent keeps between check-ins, in its state directory (the boot partition in
//! production, so it survives reboots and re-imaging of the OS partition):
//!
//! - `credential`: the per-device secret the server issued at enrolment, with the identity of
//!   the server that issued it (origin and CA fingerprint), as JSON (mode 0600); a file from
//!   an older agent holds the bare secret and is treated as bound to no server yet;
//! - `credential.refused`: a credential the verified issuing server said it no longer knows
//!   (kept for the administrator, never sent again);
//! - `current.json`: the task being run, so a power cut or agent restart resumes it;
//! - `outbox/<report>.json`: final results not yet acknowledged by the server;
//! - `done.json`: the last results delivered, so a task the server sends again is answered
//!   with its result instead of being run twice;
//! - `images.json`: which image name and version the agent last wrote to each disk/partition;
//! - `journal/`: the engine's deploy resume journals.
//!
//! Every file is written to a temporary name, synced, and renamed, so a power cut leaves the
//! old or the new version, never half of one.
//!
//! On a device the directory is in RAM and backed by the persistent store on the boot-agent
//! partition (`crate::bootstore`): after every change the hook set with [`on_change`]
//! writes the whole tree into the store.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::Context;
use protocol::{ImageStamp, Task, TaskResult};
use serde::{Deserialize, Serialize};

/// How many delivered results `done.json` remembers.
const DONE_KEEP: usize = 32;

/// The device credential and the server it is bound to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CredentialRecord {
    pub token: String,
    /// `scheme://host:port` of the issuing server; None: a bare credential from an older
    /// agent, bound at its first use over verified HTTPS.
    #[serde(default)]
    pub server: Option<String>,
    /// SHA-256 of the CA the issuing server was verified with (None: web PKI or plain HTTP).
    #[serde(default)]
    pub ca_sha256: Option<String>,
}

/// The task in progress.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CurrentTask {
    pub task: Task,
    /// Unix seconds when it first started.
    pub started: u64,
    /// How many times it was started (resumes count).
    pub attempts: u32,
}

/// Called after every change written by a [`StateDir`] (the store commit).
static ON_CHANGE: std::sync::OnceLock<Box<dyn Fn() + Send + Sync>> = std::sync::OnceLock::new();

/// Set the hook called after every change of the state (once per process).
pub fn on_change(f: Box<dyn Fn() + Send + Sync>) {
    let _ = ON_CHANGE.set(f);
}

fn changed() {
    if let Some(f) = ON_CHANGE.get() {
        f();
    }
}

pub struct StateDir {
    dir: PathBuf,
}

fn write_atomic(path: &Path, data: &[u8], secret: bool) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if secret { 0o600 } else { 0o644 })
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(data)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.sync_all()
        .with_context(|| format!("syncing {}", tmp.display()))?;
    std::fs::rename(&tmp, path)
        .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
    if let Some(parent) = path.parent() {
        // The rename itself must reach the disk (a directory fsync) before we rely on it.
        if let Ok(d) = std::fs::File::open(parent) {
            let _ = d.sync_all();
        }
    }
    changed();
    Ok(())
}

/// Remove `p` (absent is fine), then run the change hook.
fn remove(p: &Path) -> anyhow::Result<()> {
    match std::fs::remove_file(p) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("deleting {}", p.display()))
        }
        _ => {
            changed();
            Ok(())
        }
    }
}

fn read_json<T: for<'de> Deserialize<'de>>(path: &Path) -> anyhow::Result<Option<T>> {
    match std::fs::read(path) {
        Ok(b) => Ok(Some(serde_json::from_slice(&b).with_context(|| {
            format!(
                "{} is damaged: delete it (the agent rebuilds it at the next check-in)",
                path.display()
            )
        })?)),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// `disk` or `disk#partition`: the key of `images.json`.
pub fn stamp_key(disk: &str, partition: Option<&str>) -> String {
    match partition {
        Some(p) => format!("{disk}#{p}"),
        None => disk.to_string(),
    }
}

impl StateDir {
    pub fn open(dir: &Path) -> anyhow::Result<StateDir> {
        std::fs::create_dir_all(dir.join("outbox"))
            .with_context(|| format!("creating the agent state directory {}", dir.display()))?;
        Ok(StateDir {
            dir: dir.to_path_buf(),
        })
    }

    /// A file of the state directory by name (the autogenic status record).
    pub fn file_path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// Read a state file by name; None when it does not exist.
    pub fn read_file(&self, name: &str) -> anyhow::Result<Option<Vec<u8>>> {
        let p = self.file_path(name);
        match std::fs::read(&p) {
            Ok(b) => Ok(Some(b)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    /// Write a state file by name (atomic, then the change hook commits it).
    pub fn write_file(&self, name: &str, data: &[u8]) -> anyhow::Result<()> {
        write_atomic(&self.file_path(name), data, false)
    }

    pub fn remove_file(&self, name: &str) -> anyhow::Result<()> {
        remove(&self.file_path(name))
    }

    pub fn journal_dir(&self) -> PathBuf {
        self.dir.join("journal")
    }

    /// The stored credential's secret (whatever server it is bound to; the end-to-end suites
    /// read it; the agent itself goes through `bound_credential`).
    #[allow(dead_code)]
    pub fn credential(&self) -> anyhow::Result<Option<String>> {
        Ok(self.credential_record()?.map(|r| r.token))
    }

    /// The stored credential with the server it is bound to.
    pub fn credential_record(&self) -> anyhow::Result<Option<CredentialRecord>> {
        let p = self.dir.join("credential");
        let text = match std::fs::read_to_string(&p) {
            Ok(s) => s,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        let t = text.trim();
        if t.is_empty() {
            return Ok(None);
        }
        if t.starts_with('{') {
            let r: CredentialRecord = serde_json::from_str(t).with_context(|| {
                format!(
                    "{} is damaged: the device cannot prove who it is; ask the administrator to run `imgserver forget MAC`, then delete the file",
                    p.display()
                )
            })?;
            return Ok(Some(r).filter(|r| !r.token.is_empty()));
        }
        Ok(Some(CredentialRecord {
            token: t.to_string(),
            server: None,
            ca_sha256: None,
        }))
    }

    pub fn set_credential_record(&self, rec: Option<&CredentialRecord>) -> anyhow::Result<()> {
        let p = self.dir.join("credential");
        match rec {
            Some(r) => write_atomic(&p, &serde_json::to_vec_pretty(r)?, true),
            None => remove(&p),
        }
    }

    /// The issuing server (verified) no longer knows the credential: move it to
    /// `credential.refused`, so it is never sent again but is still there to look at.
    pub fn set_aside_credential(&self) -> anyhow::Result<()> {
        let p = self.dir.join("credential");
        let to = self.dir.join("credential.refused");
        match std::fs::rename(&p, &to) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                Err(e).with_context(|| format!("renaming {} to {}", p.display(), to.display()))
            }
            _ => {
                changed();
                Ok(())
            }
        }
    }

    pub fn current(&self) -> anyhow::Result<Option<CurrentTask>> {
        read_json(&self.dir.join("current.json"))
    }

    pub fn set_current(&self, cur: Option<&CurrentTask>) -> anyhow::Result<()> {
        let p = self.dir.join("current.json");
        match cur {
            Some(c) => write_atomic(&p, &serde_json::to_vec_pretty(c)?, false),
            None => remove(&p),
        }
    }

    fn outbox_path(&self, report: &str) -> PathBuf {
        // Report ids are our own hex; anything else cannot name a file outside the outbox.
        let clean: String = report
            .chars()
            .filter(|c| c.is_ascii_alphanumeric())
            .collect();
        self.dir.join("outbox").join(format!("{clean}.json"))
    }

    /// Queue a final result; it stays until the server acknowledges it.
    pub fn queue_result(&self, r: &TaskResult) -> anyhow::Result<()> {
        write_atomic(
            &self.outbox_path(&r.report),
            &serde_json::to_vec_pretty(r)?,
            false,
        )
    }

    /// Unsent results, oldest first.
    pub fn outbox(&self) -> anyhow::Result<Vec<TaskResult>> {
        let dir = self.dir.join("outbox");
        let mut out: Vec<TaskResult> = Vec::new();
        for e in std::fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
            let p = e?.path();
            if p.extension().and_then(|x| x.to_str()) != Some("json") {
                continue;
            }
            if let Some(r) = read_json::<TaskResult>(&p)? {
                out.push(r);
            }
        }
        out.sort_by_key(|r| (r.finished, r.task));
        Ok(out)
    }

    /// The server recorded `report`: move it from the outbox to the delivered list.
    pub fn acknowledge(&self, report: &str) -> anyhow::Result<()> {
        let p = self.outbox_path(report);
        if let Some(r) = read_json::<TaskResult>(&p)? {
            let mut done = self.done()?;
            done.retain(|d| d.report != r.report);
            done.push(r);
            let skip = done.len().saturating_sub(DONE_KEEP);
            write_atomic(
                &self.dir.join("done.json"),
                &serde_json::to_vec_pretty(&done[skip..])?,
                false,
            )?;
        }
        remove(&p)
    }

    /// Results delivered recently.
    pub fn done(&self) -> anyhow::Result<Vec<TaskResult>> {
        Ok(read_json(&self.dir.join("done.json"))?.unwrap_or_default())
    }

    /// A result for `task`, queued or delivered, if the agent already finished it.
    pub fn finished_result(&self, task: u64) -> anyhow::Result<Option<TaskResult>> {
        if let Some(r) = self.outbox()?.into_iter().find(|r| r.task == task) {
            return Ok(Some(r));
        }
        Ok(self.done()?.into_iter().find(|r| r.task == task))
    }

    pub fn stamps(&self) -> anyhow::Result<BTreeMap<String, ImageStamp>> {
        Ok(read_json(&self.dir.join("images.json"))?.unwrap_or_default())
    }

    pub fn set_stamp(&self, key: &str, stamp: Option<&ImageStamp>) -> anyhow::Result<()> {
        let mut all = self.stamps()?;
        match stamp {
            Some(s) => {
                all.insert(key.to_string(), s.clone());
            }
            None => {
                all.remove(key);
            }
        }
        write_atomic(
            &self.dir.join("images.json"),
            &serde_json::to_vec_pretty(&all)?,
            false,
        )
    }
}

/// A fresh random id (128 bits, hex) for a result.
pub fn new_report_id() -> String {
    let mut b = [0u8; 16];
    if std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut b))
        .is_err()
    {
        // No /dev/urandom (a broken initramfs): time and pid still make ids unique per device.
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        b[..16].copy_from_slice(&(t ^ (u128::from(std::process::id()) << 64)).to_le_bytes());
    }
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::{Outcome, TaskKind};

    fn tmp(name: &str) -> PathBuf {
        let d =
            std::env::temp_dir().join(format!("img-checkin-state-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    fn result(task: u64) -> TaskResult {
        TaskResult {
            task,
            report: new_report_id(),
            outcome: Outcome::Succeeded,
            message: None,
            transcript: vec![],
            image: None,
            bytes: 0,
            finished: task,
        }
    }

    #[test]
    fn outbox_survives_reopen_and_acks_move_to_done() {
        let d = tmp("outbox");
        let s = StateDir::open(&d).unwrap();
        let (a, b) = (result(1), result(2));
        s.queue_result(&a).unwrap();
        s.queue_result(&b).unwrap();
        let s = StateDir::open(&d).unwrap();
        assert_eq!(
            s.outbox()
                .unwrap()
                .iter()
                .map(|r| r.task)
                .collect::<Vec<_>>(),
            vec![1, 2]
        );
        s.acknowledge(&a.report).unwrap();
        s.acknowledge(&a.report).unwrap();
        assert_eq!(s.outbox().unwrap().len(), 1);
        assert_eq!(s.done().unwrap().len(), 1);
        assert_eq!(s.finished_result(1).unwrap().unwrap().report, a.report);
        assert_eq!(s.finished_result(2).unwrap().unwrap().report, b.report);
        assert!(s.finished_result(3).unwrap().is_none());
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn credential_current_and_stamps() {
        let d = tmp("cred");
        let s = StateDir::open(&d).unwrap();
        assert_eq!(s.credential().unwrap(), None);
        // A bare secret from an older agent reads as bound to no server.
        std::fs::write(d.join("credential"), "old\n").unwrap();
        assert_eq!(
            s.credential_record().unwrap(),
            Some(CredentialRecord {
                token: "old".into(),
                server: None,
                ca_sha256: None
            })
        );
        let rec = CredentialRecord {
            token: "abc".into(),
            server: Some("https://srv:8443".into()),
            ca_sha256: Some("00ff".into()),
        };
        s.set_credential_record(Some(&rec)).unwrap();
        assert_eq!(s.credential_record().unwrap(), Some(rec));
        assert_eq!(s.credential().unwrap().as_deref(), Some("abc"));
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            std::fs::metadata(d.join("credential"))
                .unwrap()
                .permissions()
                .mode()
                & 0o777,
            0o600
        );
        s.set_aside_credential().unwrap();
        assert_eq!(s.credential().unwrap(), None);
        assert!(std::fs::read_to_string(d.join("credential.refused"))
            .unwrap()
            .contains("abc"));
        std::fs::write(d.join("credential"), "{broken").unwrap();
        assert!(s.credential_record().is_err());
        s.set_credential_record(None).unwrap();
        assert_eq!(s.credential().unwrap(), None);
        let cur = CurrentTask {
            task: Task {
                id: 4,
                job: 1,
                kind: TaskKind::Reboot,
            },
            started: 1,
            attempts: 1,
        };
        s.set_current(Some(&cur)).unwrap();
        assert_eq!(s.current().unwrap().unwrap().task.id, 4);
        s.set_current(None).unwrap();
        assert!(s.current().unwrap().is_none());
        let st = ImageStamp {
            name: "os".into(),
            version: "3".into(),
        };
        s.set_stamp(&stamp_key("/dev/sda", Some("2")), Some(&st))
            .unwrap();
        assert_eq!(s.stamps().unwrap()["/dev/sda#2"], st);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn report_ids_are_unique_hex() {
        let (a, b) = (new_report_id(), new_report_id());
        assert_ne!(a, b);
        assert_eq!(a.len(), 32);
        assert!(a.chars().all(|c| c.is_ascii_hexdigit()));
    }
}
