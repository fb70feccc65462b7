use super::*;
use crate::model::OnError;
use crate::protocol::Outcome;
use crate::protocol::{DeviceIdentity, DiskReport, PartitionReport, PROTOCOL_VERSION};

fn store() -> (SqliteStore, std::path::PathBuf) {
    let dir = std::env::temp_dir().join(format!(
        "imgserver-store-{}-{}",
        std::process::id(),
        rand_suffix()
    ));
    std::fs::create_dir_all(&dir).unwrap();
    (SqliteStore::open(&dir.join("db")).unwrap(), dir)
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

fn checkin(mac: &str) -> CheckIn {
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "disk0".into(),
            size: 1 << 30,
            partitions: vec![PartitionReport {
                number: 1,
                size: 1 << 29,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

fn secrets(presented: Option<&str>, new: &str) -> CheckInSecrets {
    CheckInSecrets {
        presented: presented.map(str::to_string),
        new_credential: new.into(),
        new_upload_key: format!("k{new}"),
        enrol_proof_ok: true,
        source: "192.0.2.1".into(),
    }
}

fn image(s: &SqliteStore) -> u64 {
    s.add_image(&ImageRow {
        id: 0,
        name: "os".into(),
        version: "2".into(),
        file: Some("os-2.img".into()),
        url: None,
        size: Some(10),
        facts: ImageFacts {
            name: "os".into(),
            version: "2".into(),
            min_target_size: 1 << 20,
            ..Default::default()
        },
        sealed: true,
        signed_by: None,
        description: None,
        added: 1,
        captured_from: None,
        autogenic: false,
    })
    .unwrap()
}

fn deploy_job(img: u64, selector: &str, batch: u32, on_error: OnError) -> NewJob {
    NewJob {
        kind: "deploy".into(),
        image: Some(img),
        options: JobOptions {
            partition: Some("1".into()),
            batch,
            on_error,
            ..Default::default()
        },
        selector: selector.into(),
        devices: vec![],
        note: None,
    }
}

fn result(task: u64, report: &str, outcome: Outcome) -> TaskResult {
    TaskResult {
        task,
        report: report.into(),
        outcome,
        message: None,
        transcript: vec!["line".into()],
        image: Some(ImageStamp {
            name: "os".into(),
            version: "2".into(),
        }),
        bytes: 0,
        finished: 0,
    }
}

#[test]
fn migrations_are_idempotent() {
    let (_s, dir) = store();
    drop(_s);
    let again = SqliteStore::open(&dir.join("db")).unwrap();
    assert_eq!(again.result_count().unwrap(), 0);
}

#[test]
fn enrol_once_then_credential_required() {
    let (s, _d) = store();
    let p = Policy::default();
    let d = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "h1"), 10, &p)
        .unwrap();
    assert!(d.enrolled);
    let e = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "h2"), 11, &p)
        .unwrap_err();
    assert!(matches!(e, StoreError::AlreadyEnrolled(_)), "{e}");
    let e = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("bogus"), "h3"),
            11,
            &p,
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::BadCredential));
    let d2 = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("h1"), "h4"),
            12,
            &p,
        )
        .unwrap();
    assert!(!d2.enrolled);
    assert_eq!(d2.device, d.device);
    // Another device's credential with this MAC is refused.
    s.checkin(&checkin("52:54:00:00:00:02"), &secrets(None, "h5"), 12, &p)
        .unwrap();
    let e = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("h5"), "h6"),
            13,
            &p,
        )
        .unwrap_err();
    assert!(matches!(e, StoreError::Conflict(_)));
    assert!(s.forget("52:54:00:00:00:01").unwrap());
    assert!(
        s.checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "h7"), 14, &p)
            .unwrap()
            .enrolled
    );
}

#[test]
fn task_lifecycle_is_idempotent() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    let (job, v) = s
        .add_job(
            &deploy_job(img, "mac:52:54:00:00:00:01", 0, OnError::Stop),
            1,
        )
        .unwrap();
    assert_eq!(v.len(), 1);
    let d = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "c1"), 2, &p)
        .unwrap();
    let (task, j, _) = d.task.expect("a task");
    assert_eq!(j.id, job);
    // Re-sent while unfinished: the same task.
    let again = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("c1"), "x"),
            3,
            &p,
        )
        .unwrap();
    assert_eq!(again.task.unwrap().0.id, task.id);
    assert_eq!(
        s.device("52:54:00:00:00:01").unwrap().unwrap().state,
        DeviceState::UpgradeInProgress
    );
    let pr = ProgressReport {
        seq: 2,
        bytes: 5,
        ..Default::default()
    };
    assert_eq!(
        s.record_progress(d.device, task.id, &pr, 4).unwrap(),
        (true, false)
    );
    assert_eq!(
        s.record_progress(d.device, task.id, &pr, 4).unwrap(),
        (false, false)
    );
    assert!(s
        .record_result(d.device, &result(task.id, "r1", Outcome::Succeeded), 5)
        .unwrap());
    assert!(!s
        .record_result(d.device, &result(task.id, "r1", Outcome::Succeeded), 6)
        .unwrap());
    // The same result again through the check-in outbox: acknowledged, not applied.
    let mut c = checkin("52:54:00:00:00:01");
    c.results.push(result(task.id, "r1", Outcome::Succeeded));
    let d3 = s.checkin(&c, &secrets(Some("c1"), "y"), 7, &p).unwrap();
    assert_eq!(d3.acked, vec!["r1".to_string()]);
    assert!(d3.task.is_none());
    assert_eq!(s.result_count().unwrap(), 1);
    let dev = s.device("52:54:00:00:00:01").unwrap().unwrap();
    assert_eq!(dev.state, DeviceState::Operational);
    assert_eq!(
        dev.image,
        Some(ImageStamp {
            name: "os".into(),
            version: "2".into()
        })
    );
    let lines = s.transcript("52:54:00:00:00:01", Some(task.id)).unwrap();
    assert_eq!(
        lines.iter().filter(|l| l.2 == "device: line").count(),
        1,
        "{lines:?}"
    );
}

#[test]
fn devices_never_see_each_others_tasks() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    s.add_job(
        &deploy_job(img, "mac:52:54:00:00:00:01", 0, OnError::Stop),
        1,
    )
    .unwrap();
    let a = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "a"), 2, &p)
        .unwrap();
    let b = s
        .checkin(&checkin("52:54:00:00:00:02"), &secrets(None, "b"), 2, &p)
        .unwrap();
    let task = a.task.unwrap().0.id;
    assert!(b.task.is_none());
    assert!(s.task_of_device(b.device, task).unwrap().is_none());
    assert!(s.task_of_device(a.device, task).unwrap().is_some());
    assert!(matches!(
        s.record_progress(
            b.device,
            task,
            &ProgressReport {
                seq: 1,
                ..Default::default()
            },
            3
        ),
        Err(StoreError::NotFound(_))
    ));
    assert!(matches!(
        s.record_result(b.device, &result(task, "rb", Outcome::Failed), 3),
        Err(StoreError::NotFound(_))
    ));
}

/// The PXE question gives the answer a check-in would: unknown, pre-staged, resent,
/// done, held back by the batch rule, reached by an `all` job after enrolling.
#[test]
fn boot_work_answers_as_a_checkin_would() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    let a = "52:54:00:00:00:01";
    assert_eq!(s.boot_work(a).unwrap(), BootWork::Unknown);
    let (job, _) = s
        .add_job(&deploy_job(img, &format!("mac:{a}"), 0, OnError::Stop), 1)
        .unwrap();
    assert!(
        matches!(s.boot_work(a).unwrap(), BootWork::Work(w) if w == format!("job {job} deploy os 2")),
        "a pre-staged device has work"
    );
    let d = s.checkin(&checkin(a), &secrets(None, "a1"), 2, &p).unwrap();
    let t = d.task.expect("task").0.id;
    assert!(
        matches!(s.boot_work(a).unwrap(), BootWork::Work(w) if w.contains("unfinished")),
        "a task handed out and not finished is resent"
    );
    s.record_result(d.device, &result(t, "a-r1", Outcome::Succeeded), 3)
        .unwrap();
    assert_eq!(s.boot_work(a).unwrap(), BootWork::Idle);

    // Sequential job over two enrolled devices: the second waits for the first.
    let b = "52:54:00:00:00:02";
    let db = s.checkin(&checkin(b), &secrets(None, "b1"), 4, &p).unwrap();
    let (seq, _) = s
        .add_job(&deploy_job(img, "all", 1, OnError::Continue), 5)
        .unwrap();
    assert!(
        matches!(s.boot_work(a).unwrap(), BootWork::Work(w) if w.starts_with(&format!("job {seq} ")))
    );
    assert_eq!(
        s.boot_work(b).unwrap(),
        BootWork::Idle,
        "held back by the batch rule"
    );
    let da = s
        .checkin(&checkin(a), &secrets(Some("a1"), "x"), 6, &p)
        .unwrap();
    let ta = da.task.expect("task").0.id;
    assert_eq!(s.boot_work(b).unwrap(), BootWork::Idle);
    s.record_result(da.device, &result(ta, "a-r2", Outcome::Succeeded), 7)
        .unwrap();
    assert!(matches!(s.boot_work(b).unwrap(), BootWork::Work(_)));
    let tb = s
        .checkin(&checkin(b), &secrets(Some("b1"), "y"), 8, &p)
        .unwrap()
        .task
        .expect("task")
        .0
        .id;
    s.record_result(db.device, &result(tb, "b-r1", Outcome::Succeeded), 9)
        .unwrap();
    assert_eq!(s.boot_work(b).unwrap(), BootWork::Idle);

    // A device enrolling after `all` jobs were scheduled: the PXE answer is "work"
    // exactly as long as its check-ins hand it tasks (both `all` jobs reach it).
    s.add_job(&deploy_job(img, "all", 0, OnError::Continue), 10)
        .unwrap();
    let c = "52:54:00:00:00:03";
    assert_eq!(s.boot_work(c).unwrap(), BootWork::Unknown);
    let mut cred = None;
    let mut handed = 0;
    for n in 0..4 {
        let before = s.boot_work(c).unwrap();
        let d = s
            .checkin(
                &checkin(c),
                &secrets(cred.as_deref(), &format!("c{n}")),
                11 + n,
                &p,
            )
            .unwrap();
        cred.get_or_insert_with(|| format!("c{n}"));
        match d.task {
            Some((t, _, _)) => {
                assert!(n == 0 || matches!(before, BootWork::Work(_)), "{before:?}");
                handed += 1;
                s.record_result(
                    d.device,
                    &result(t.id, &format!("c-r{n}"), Outcome::Succeeded),
                    11 + n,
                )
                .unwrap();
            }
            None => assert_eq!(before, BootWork::Idle),
        }
    }
    assert_eq!(handed, 2);
    assert_eq!(s.boot_work(c).unwrap(), BootWork::Idle);
    // An aborted job is no work.
    let (gone, _) = s
        .add_job(
            &deploy_job(img, &format!("mac:{c}"), 0, OnError::Continue),
            12,
        )
        .unwrap();
    assert!(matches!(s.boot_work(c).unwrap(), BootWork::Work(_)));
    s.abort_job(gone, 13).unwrap();
    assert_eq!(
        s.boot_work(c).unwrap(),
        BootWork::Idle,
        "an aborted job is no work"
    );
    // A group job reaches a device put into the group later (materialised at check-in).
    let (_all2, _) = s
        .add_job(&deploy_job(img, "group:lab", 0, OnError::Continue), 13)
        .unwrap();
    assert_eq!(s.boot_work(c).unwrap(), BootWork::Idle, "not in the group");
    s.set_group(c, Some("lab")).unwrap();
    assert!(
        matches!(s.boot_work(c).unwrap(), BootWork::Work(_)),
        "a group job reaches it at its next check-in"
    );
}

#[test]
fn sequential_jobs_wait_and_stop_on_error() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    for n in 1..=3 {
        s.checkin(
            &checkin(&format!("52:54:00:00:00:0{n}")),
            &secrets(None, &format!("s{n}")),
            1,
            &p,
        )
        .unwrap();
    }
    let (job, _) = s
        .add_job(&deploy_job(img, "all", 1, OnError::Stop), 2)
        .unwrap();
    let second = s
        .checkin(
            &checkin("52:54:00:00:00:02"),
            &secrets(Some("s2"), "z"),
            3,
            &p,
        )
        .unwrap();
    assert!(
        second.task.is_none(),
        "sequential: device 2 waits for device 1"
    );
    let first = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("s1"), "z"),
            4,
            &p,
        )
        .unwrap();
    let t1 = first.task.unwrap().0.id;
    s.record_result(first.device, &result(t1, "f1", Outcome::Failed), 5)
        .unwrap();
    let second = s
        .checkin(
            &checkin("52:54:00:00:00:02"),
            &secrets(Some("s2"), "z"),
            6,
            &p,
        )
        .unwrap();
    assert!(second.task.is_none(), "on error stop: the rest is aborted");
    let (j, tasks) = s.job(job).unwrap().unwrap();
    assert_eq!(j.state, "stopped");
    assert_eq!(
        tasks
            .iter()
            .filter(|t| t.state == TaskState::Aborted)
            .count(),
        2
    );
}

#[test]
fn validation_errors_reject_and_mark_configuration_required() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    s.checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "v"), 1, &p)
        .unwrap();
    let mut job = deploy_job(img, "mac:52:54:00:00:00:01", 0, OnError::Continue);
    job.options.partition = Some("4".into());
    let (_, report) = s.add_job(&job, 2).unwrap();
    assert!(!report[0].1.ok());
    // A pre-staged device: validated when it first checks in.
    let mut job = deploy_job(img, "mac:52:54:00:00:00:09", 0, OnError::Continue);
    job.options.partition = Some("4".into());
    s.add_job(&job, 2).unwrap();
    let d = s
        .checkin(&checkin("52:54:00:00:00:09"), &secrets(None, "w"), 3, &p)
        .unwrap();
    assert!(d.task.is_none());
    assert_eq!(
        s.device("52:54:00:00:00:09").unwrap().unwrap().state,
        DeviceState::ConfigurationRequired
    );
}
#[test]
fn enrolment_without_proof_waits_for_approval() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    s.add_job(
        &deploy_job(img, "mac:52:54:00:00:00:01", 0, OnError::Stop),
        1,
    )
    .unwrap();
    let mut anon = secrets(None, "p1");
    anon.enrol_proof_ok = false;
    let d = s
        .checkin(&checkin("52:54:00:00:00:01"), &anon, 2, &p)
        .unwrap();
    assert!(d.enrolled && d.pending && d.task.is_none());
    let dev = s.device("52:54:00:00:00:01").unwrap().unwrap();
    assert!(dev.pending);
    assert_eq!(dev.enrol_addr.as_deref(), Some("192.0.2.1"));
    // With its credential: still nothing until approved.
    let d = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("p1"), "x"),
            3,
            &p,
        )
        .unwrap();
    assert!(d.pending && d.task.is_none());
    // Another anonymous request for the MAC is refused, naming the pending one.
    let mut anon2 = secrets(None, "p2");
    anon2.enrol_proof_ok = false;
    let e = s
        .checkin(&checkin("52:54:00:00:00:01"), &anon2, 4, &p)
        .unwrap_err();
    assert!(e.to_string().contains("192.0.2.1"), "{e}");
    assert!(s.approve("52:54:00:00:00:01", 5).unwrap());
    assert!(!s.approve("52:54:00:00:00:01", 5).unwrap());
    let d = s
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(Some("p1"), "x"),
            6,
            &p,
        )
        .unwrap();
    assert!(!d.pending && d.task.is_some());
}

#[test]
fn a_proof_replaces_a_pending_request() {
    let (s, _d) = store();
    let p = Policy::default();
    let mut anon = secrets(None, "stranger");
    anon.enrol_proof_ok = false;
    s.checkin(&checkin("52:54:00:00:00:02"), &anon, 1, &p)
        .unwrap();
    let d = s
        .checkin(&checkin("52:54:00:00:00:02"), &secrets(None, "real"), 2, &p)
        .unwrap();
    assert!(d.enrolled && !d.pending);
    assert!(s.device_by_credential("stranger").unwrap().is_none());
    assert!(s.device_by_credential("real").unwrap().is_some());
}

#[test]
fn later_results_are_counted_not_stored() {
    let (s, _d) = store();
    let p = Policy::default();
    let img = image(&s);
    s.add_job(
        &deploy_job(img, "mac:52:54:00:00:00:01", 0, OnError::Stop),
        1,
    )
    .unwrap();
    let d = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "c"), 2, &p)
        .unwrap();
    let t = d.task.unwrap().0.id;
    assert!(s
        .record_result(d.device, &result(t, "first", Outcome::Succeeded), 3)
        .unwrap());
    for n in 0..5 {
        assert!(!s
            .record_result(
                d.device,
                &result(t, &format!("more{n}"), Outcome::Failed),
                4
            )
            .unwrap());
    }
    assert_eq!(s.result_count().unwrap(), 1);
    let (_, tasks) = s.job(1).unwrap().unwrap();
    assert_eq!(tasks[0].ignored_results, 5);
    assert_eq!(tasks[0].state, TaskState::Succeeded);
    let lines = s.transcript("52:54:00:00:00:01", Some(t)).unwrap();
    assert_eq!(lines.iter().filter(|l| l.2.contains("ignored")).count(), 1);
}

#[test]
fn upload_keys_work_once_and_captures_are_not_latest() {
    let (s, _d) = store();
    let p = Policy::default();
    let mut job = deploy_job(0, "mac:52:54:00:00:00:01", 0, OnError::Stop);
    job.kind = "capture".into();
    job.image = None;
    job.options.capture_name = Some("os".into());
    job.options.capture_version = Some("9".into());
    s.add_job(&job, 1).unwrap();
    let d = s
        .checkin(&checkin("52:54:00:00:00:01"), &secrets(None, "c"), 2, &p)
        .unwrap();
    let t = d.task.unwrap().0.id;
    assert!(s.take_upload_key(t, "kc").unwrap().is_some());
    assert!(s.take_upload_key(t, "kc").unwrap().is_none(), "spent");
    // An admin image os 2 and a captured os 9: "latest" is still os 2.
    image(&s);
    let mut cap = s.image("os", Some("2")).unwrap().unwrap();
    cap.version = "9".into();
    cap.captured_from = Some("52:54:00:00:00:01 task 1".into());
    s.add_image(&cap).unwrap();
    assert_eq!(s.image("os", None).unwrap().unwrap().version, "2");
    assert!(s.image("os", Some("9")).unwrap().is_some());
}

#[test]
fn a_failed_device_back_after_the_reload_wait_is_stored_in_maintenance() {
    let (s, _d) = store();
    let p = Policy {
        reload_wait: 100,
        ..Policy::default()
    };
    let img = image(&s);
    // Two devices fail at time 10; one checks in again within the wait, one after it.
    for (mac, back_at, expect) in [
        ("52:54:00:00:00:01", 110, DeviceState::Operational),
        ("52:54:00:00:00:02", 111, DeviceState::Maintenance),
    ] {
        s.add_job(
            &deploy_job(img, &format!("mac:{mac}"), 0, OnError::Continue),
            1,
        )
        .unwrap();
        let d = s
            .checkin(&checkin(mac), &secrets(None, mac), 2, &p)
            .unwrap();
        let t = d.task.unwrap().0.id;
        s.record_result(d.device, &result(t, mac, Outcome::Failed), 10)
            .unwrap();
        assert_eq!(
            s.device(mac).unwrap().unwrap().state,
            DeviceState::Operational
        );
        s.checkin(&checkin(mac), &secrets(Some(mac), "x"), back_at, &p)
            .unwrap();
        let dev = s.device(mac).unwrap().unwrap();
        assert_eq!(dev.state, expect, "{mac} back at {back_at}");
        if expect == DeviceState::Operational {
            assert_eq!(
                dev.trouble_since, None,
                "back in time: no longer in trouble"
            );
        }
    }
}
