//! The imaging status record (seed 001's `Imagestatus.log`): `state/imagestatus.json` in the
//! agent's state directory, which on a device is the store on the boot-agent partition, so
//! it is written back power-cut safe like every other state file.
//!
//! ```json
//! { "task": <Task JSON>, "phase": "pending"|"imaging"|"done"|"failed",
//!   "attempts": 2, "report": "<report id of the result once written>",
//!   "message": "...", "maintenance": "<reason>" | null, "os_dirty": true }
//! ```
//!
//! The life of one PI (re-imaging the OS partition from the backup partition):
//! `pending` (written when the task arrives, by the agent in the guest or at boot) →
//! `imaging` (at an agent start: `attempts + 1` is committed BEFORE the try, so a power cut
//! in the middle counts as a failed attempt) → `done` (the result is in the outbox, its
//! report id here) → the record is removed once the server acknowledged that report.
//! A failed try goes back to `pending` for the next start; after [`MAX_ATTEMPTS`] failed
//! tries the record is `failed` with `maintenance` set: no more PI, the agent reports
//! maintenance at every check-in and never hands over to the guest while `os_dirty` says
//! the OS partition may be half-written. A successful network deploy onto the OS partition
//! (the administrator's way out) ends the maintenance.
//!
//! The transitions are pure functions of the record ([`ImagingStatus::start_attempt`],
//! [`ImagingStatus::succeeded`], [`ImagingStatus::failed`], [`ImagingStatus::acked`]), so
//! they are tested on their own; [`load`] / [`save`] / [`clear`] keep it in the state.

use anyhow::Context;
use protocol::Task;
use serde::{Deserialize, Serialize};

use crate::checkin::state::StateDir;

/// The file in the agent's state directory.
pub const FILE: &str = "imagestatus.json";

/// Failed PI tries (agent starts) before the device goes into maintenance.
pub const MAX_ATTEMPTS: u32 = 3;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    /// Recorded, not tried yet at this start (or a failed try waits for the next one).
    Pending,
    /// A try has begun (attempts already counts it); found at a start: it was cut short.
    Imaging,
    /// Imaged; the result (report) waits in the outbox for the server's acknowledgement.
    Done,
    /// Given up: maintenance.
    Failed,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ImagingStatus {
    pub task: Task,
    pub phase: Phase,
    #[serde(default)]
    pub attempts: u32,
    /// Report id of the result queued in the outbox (done, or failed for good).
    #[serde(default)]
    pub report: Option<String>,
    #[serde(default)]
    pub message: Option<String>,
    /// Set when PI was given up: why (sent as `CheckIn.maintenance`).
    #[serde(default)]
    pub maintenance: Option<String>,
    /// The OS partition may be half-written (a try got past its checks and began writing,
    /// and did not finish): the guest must not be booted.
    #[serde(default)]
    pub os_dirty: bool,
}

/// What a start should do with the record.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Run try number `attempt` (already counted in the record: commit it before trying).
    Try { attempt: u32 },
    /// Tries exhausted: enter maintenance (the record now says so).
    GiveUp,
    /// Nothing to run: done and waiting for the ack, or already in maintenance.
    Nothing,
}

impl ImagingStatus {
    pub fn new(task: Task) -> ImagingStatus {
        ImagingStatus {
            task,
            phase: Phase::Pending,
            attempts: 0,
            report: None,
            message: None,
            maintenance: None,
            os_dirty: false,
        }
    }

    /// At an agent start: count the try about to be made, or give up after
    /// [`MAX_ATTEMPTS`] (a record found in `imaging` is a try that was cut short: it has
    /// been counted already).
    pub fn start_attempt(&mut self) -> Step {
        match self.phase {
            Phase::Done | Phase::Failed => Step::Nothing,
            Phase::Pending | Phase::Imaging => {
                if self.attempts >= MAX_ATTEMPTS {
                    self.give_up(format!(
                        "re-imaging from the backup partition failed {} times{}",
                        self.attempts,
                        self.message
                            .as_deref()
                            .map(|m| format!(" (last: {m})"))
                            .unwrap_or_default()
                    ));
                    return Step::GiveUp;
                }
                self.attempts += 1;
                self.phase = Phase::Imaging;
                Step::Try {
                    attempt: self.attempts,
                }
            }
        }
    }

    /// The try is about to write the OS partition (its checks passed).
    pub fn writing(&mut self) {
        self.os_dirty = true;
    }

    /// The try succeeded; its result is queued under `report`.
    pub fn succeeded(&mut self, report: &str) {
        self.phase = Phase::Done;
        self.report = Some(report.to_string());
        self.message = None;
        self.os_dirty = false;
    }

    /// The try failed with `why`. Returns true when that was the last try (the record is
    /// then in maintenance).
    pub fn failed(&mut self, why: &str) -> bool {
        self.message = Some(why.to_string());
        if self.attempts >= MAX_ATTEMPTS {
            self.give_up(format!(
                "re-imaging from the backup partition failed {} times (last: {why})",
                self.attempts
            ));
            true
        } else {
            self.phase = Phase::Pending;
            false
        }
    }

    fn give_up(&mut self, why: String) {
        self.phase = Phase::Failed;
        self.maintenance = Some(format!(
            "{why}; {}: schedule a network deploy of the OS partition",
            if self.os_dirty {
                "the OS partition is half-written and is not booted"
            } else {
                "the OS partition was not touched"
            }
        ));
    }

    /// The result with `report` was queued (the failed-for-good result in maintenance).
    pub fn reported(&mut self, report: &str) {
        self.report = Some(report.to_string());
    }

    /// The server acknowledged `acked`: true when the record is finished with and can go
    /// (done and its report acknowledged). A record in maintenance stays until a network
    /// deploy repairs the OS partition.
    pub fn acked(&self, acked: &str) -> bool {
        self.phase == Phase::Done && self.report.as_deref() == Some(acked)
    }

    /// May the guest OS be booted with this record in place?
    pub fn guest_bootable(&self) -> bool {
        match self.phase {
            Phase::Done => true,
            Phase::Failed => !self.os_dirty,
            // A PI still to run: the next start runs it; never boot around it.
            Phase::Pending | Phase::Imaging => false,
        }
    }
}

/// The record, if any. A damaged record is an error that names the file and the way out.
pub fn load(state: &StateDir) -> anyhow::Result<Option<ImagingStatus>> {
    match state.read_file(FILE)? {
        None => Ok(None),
        Some(b) => serde_json::from_slice(&b).map(Some).with_context(|| {
            format!(
                "the imaging status record {} is damaged: delete it and schedule the re-imaging again",
                state.file_path(FILE).display()
            )
        }),
    }
}

/// Write the record (atomic, then the state hook commits it to the store).
pub fn save(state: &StateDir, st: &ImagingStatus) -> anyhow::Result<()> {
    state.write_file(FILE, &serde_json::to_vec_pretty(st)?)
}

pub fn clear(state: &StateDir) -> anyhow::Result<()> {
    state.remove_file(FILE)
}

/// After a check-in's acknowledgements: drop a done record whose result the server has.
pub fn after_acks(state: &StateDir, acked: &[String]) -> anyhow::Result<()> {
    if let Some(st) = load(state)? {
        if acked.iter().any(|a| st.acked(a)) {
            clear(state)?;
        }
    }
    Ok(())
}

/// The maintenance reason to send at check-in, if the device is in maintenance.
pub fn maintenance(state: &StateDir) -> Option<String> {
    match load(state) {
        Ok(Some(st)) => st.maintenance,
        Ok(None) => None,
        Err(e) => Some(format!("{e:#}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::TaskKind;

    fn st() -> ImagingStatus {
        ImagingStatus::new(Task {
            id: 7,
            job: 3,
            kind: TaskKind::Reboot,
        })
    }

    /// The table of the machine: (events, phase, attempts, maintenance?, guest bootable?).
    #[test]
    fn transitions_table() {
        enum E {
            Start,
            Write,
            Ok,
            Fail,
        }
        use E::*;
        let table: &[(&[E], Phase, u32, bool, bool)] = &[
            (&[], Phase::Pending, 0, false, false),
            (&[Start], Phase::Imaging, 1, false, false),
            (&[Start, Ok], Phase::Done, 1, false, true),
            (&[Start, Fail], Phase::Pending, 1, false, false),
            // A power cut in the middle: the next start finds `imaging` and counts again.
            (&[Start, Start], Phase::Imaging, 2, false, false),
            (&[Start, Fail, Start, Fail], Phase::Pending, 2, false, false),
            (
                &[Start, Fail, Start, Fail, Start, Ok],
                Phase::Done,
                3,
                false,
                true,
            ),
            // The third failure gives up at once.
            (
                &[Start, Fail, Start, Fail, Start, Fail],
                Phase::Failed,
                3,
                true,
                true,
            ),
            (
                &[Start, Write, Fail, Start, Write, Fail, Start, Write, Fail],
                Phase::Failed,
                3,
                true,
                false,
            ),
            // Three cut tries: the fourth start gives up without trying.
            (
                &[Start, Write, Start, Start, Start],
                Phase::Failed,
                3,
                true,
                false,
            ),
            // Maintenance is final for PI: further starts do nothing.
            (
                &[Start, Fail, Start, Fail, Start, Fail, Start, Start],
                Phase::Failed,
                3,
                true,
                true,
            ),
        ];
        for (i, (events, phase, attempts, maint, bootable)) in table.iter().enumerate() {
            let mut s = st();
            for e in events.iter() {
                match e {
                    Start => {
                        s.start_attempt();
                    }
                    Write => s.writing(),
                    Ok => s.succeeded("r1"),
                    Fail => {
                        s.failed("bad chunk");
                    }
                }
            }
            assert_eq!(s.phase, *phase, "row {i}: {s:?}");
            assert_eq!(s.attempts, *attempts, "row {i}: {s:?}");
            assert_eq!(s.maintenance.is_some(), *maint, "row {i}: {s:?}");
            assert_eq!(s.guest_bootable(), *bootable, "row {i}: {s:?}");
        }
    }

    #[test]
    fn steps_say_what_to_do() {
        let mut s = st();
        assert_eq!(s.start_attempt(), Step::Try { attempt: 1 });
        assert_eq!(s.start_attempt(), Step::Try { attempt: 2 });
        assert_eq!(s.start_attempt(), Step::Try { attempt: 3 });
        assert_eq!(s.start_attempt(), Step::GiveUp);
        assert!(s.maintenance.as_deref().unwrap().contains("failed 3 times"));
        assert_eq!(s.start_attempt(), Step::Nothing);
        let mut d = st();
        d.start_attempt();
        d.succeeded("abc");
        assert_eq!(d.start_attempt(), Step::Nothing);
        assert!(d.acked("abc") && !d.acked("other"));
        // A record in maintenance is not dropped by an ack of its failure report.
        s.reported("f1");
        assert!(!s.acked("f1"));
    }

    #[test]
    fn maintenance_names_the_way_out_and_the_partition_state() {
        let mut s = st();
        for _ in 0..3 {
            s.start_attempt();
            s.writing();
            s.failed("chunk 4: SHA-256 mismatch");
        }
        let m = s.maintenance.unwrap();
        assert!(
            m.contains("half-written") && m.contains("network deploy"),
            "{m}"
        );
        assert!(m.contains("chunk 4"), "{m}");
    }

    #[test]
    fn record_round_trips_in_the_state_and_damage_is_named() {
        let d = std::env::temp_dir().join(format!("img-imgstatus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let state = StateDir::open(&d).unwrap();
        assert!(load(&state).unwrap().is_none());
        let mut s = st();
        s.start_attempt();
        save(&state, &s).unwrap();
        assert_eq!(load(&state).unwrap(), Some(s.clone()));
        let text = std::fs::read_to_string(d.join(FILE)).unwrap();
        assert!(text.contains("\"phase\": \"imaging\"") && text.contains("\"attempts\": 1"));
        s.succeeded("r9");
        save(&state, &s).unwrap();
        after_acks(&state, &["zz".into()]).unwrap();
        assert!(load(&state).unwrap().is_some());
        after_acks(&state, &["r9".into()]).unwrap();
        assert!(load(&state).unwrap().is_none());
        std::fs::write(d.join(FILE), b"{not json").unwrap();
        let e = format!("{:#}", load(&state).unwrap_err());
        assert!(
            e.contains("imagestatus.json") && e.contains("delete it"),
            "{e}"
        );
        assert!(maintenance(&state).is_some());
        let _ = std::fs::remove_dir_all(&d);
    }
}
