//! The admin core against a real SQLite store: roles, tokens, the audit trail, seed 003's
//! validation at job creation, validate-only, and jobs at a time at check-in.

use super::*;
use crate::model::{ImageFacts, OnError};
use crate::protocol::{DeviceIdentity, DiskReport, ImageStamp, PartitionReport, PROTOCOL_VERSION};
use crate::store::{CheckInSecrets, Policy, SqliteStore};

struct Fixture {
    store: Arc<SqliteStore>,
    admin: Admin,
    dir: PathBuf,
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn fixture() -> Fixture {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "imgserver-admin-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    let store = Arc::new(SqliteStore::open(&dir.join("imgserver.db")).unwrap());
    let admin = Admin::open(&dir, store.clone(), model::DEFAULT_RELOAD_WAIT_SECS).unwrap();
    Fixture { store, admin, dir }
}

fn root() -> Actor {
    Actor {
        name: "root".into(),
        role: Role::Admin,
    }
}

fn actor(f: &Fixture, name: &str, role: Role) -> Actor {
    let token = f.admin.add_token(&root(), name, role).unwrap();
    f.admin.authenticate(&token).unwrap()
}

/// A device with one 1 GiB disk: partition 1 (16 MiB), partition 2 (512 MiB) holding os 7.
fn checkin(mac: &str) -> CheckIn {
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            model: Some("Z90".into()),
            ram_bytes: 1 << 30,
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "disk0".into(),
            size: 1 << 30,
            partitions: vec![
                PartitionReport {
                    number: 1,
                    size: 16 << 20,
                    ..Default::default()
                },
                PartitionReport {
                    number: 2,
                    size: 512 << 20,
                    image: Some(ImageStamp {
                        name: "os".into(),
                        version: "7".into(),
                    }),
                    ..Default::default()
                },
            ],
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

fn image(s: &SqliteStore, version: &str, min: u64) -> u64 {
    s.add_image(&ImageRow {
        id: 0,
        name: "os".into(),
        version: version.into(),
        file: Some(format!("os-{version}.img")),
        url: None,
        size: Some(10),
        facts: ImageFacts {
            name: "os".into(),
            version: version.into(),
            min_target_size: min,
            models: vec!["Z90".into()],
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

fn deploy(target: &str, image: &str, partition: &str) -> JobRequest {
    JobRequest {
        target: target.into(),
        kind: "deploy".into(),
        image: Some(image.into()),
        options: JobOptions {
            partition: Some(partition.into()),
            on_error: OnError::Continue,
            ..Default::default()
        },
        ..Default::default()
    }
}

#[test]
fn roles_gate_every_change() {
    let f = fixture();
    image(&f.store, "8", 1 << 20);
    let viewer = actor(&f, "v", Role::Viewer);
    let operator = actor(&f, "o", Role::Operator);
    let req = deploy("mac:52:54:00:00:00:01", "os:8", "2");
    assert!(f.admin.jobs(&viewer).unwrap().is_empty());
    assert!(matches!(
        f.admin.create_job(&viewer, &req),
        Err(AdminError::Forbidden(m)) if m.contains("operator")
    ));
    // A viewer may still validate: it creates nothing.
    let v = JobRequest {
        validate_only: true,
        ..req.clone()
    };
    assert!(f.admin.create_job(&viewer, &v).unwrap().job.is_none());
    let made = f.admin.create_job(&operator, &req).unwrap();
    let id = made.job.unwrap();
    assert!(matches!(
        f.admin.abort_job(&viewer, id),
        Err(AdminError::Forbidden(_))
    ));
    assert!(matches!(
        f.admin.remove_image(&operator, "os:8"),
        Err(AdminError::Forbidden(m)) if m.contains("admin")
    ));
    assert!(matches!(
        f.admin.add_token(&operator, "x", Role::Admin),
        Err(AdminError::Forbidden(_))
    ));
    assert!(matches!(
        f.admin.forget(&operator, "52:54:00:00:00:01"),
        Err(AdminError::Forbidden(_))
    ));
    f.admin.abort_job(&operator, id).unwrap();
    let audit = f
        .admin
        .audit(&viewer, Some(&format!("job:{id}")), 10)
        .unwrap();
    let actions: Vec<(&str, &str)> = audit
        .iter()
        .map(|a| (a.action.as_str(), a.actor.as_str()))
        .collect();
    assert_eq!(actions, vec![("job.abort", "o"), ("job.create", "o")]);
    assert_eq!(
        f.admin.jobs(&viewer).unwrap()[0].changed_by.as_deref(),
        Some("o")
    );
}

#[test]
fn tokens_are_hashed_revocable_and_never_device_credentials() {
    let f = fixture();
    let token = f.admin.add_token(&root(), "alice", Role::Operator).unwrap();
    assert!(token.starts_with(TOKEN_PREFIX) && token.len() == TOKEN_PREFIX.len() + 64);
    let a = f.admin.authenticate(&token).unwrap();
    assert_eq!((a.name.as_str(), a.role), ("alice", Role::Operator));
    // Only the hash is stored.
    let raw = std::fs::read(f.dir.join("imgserver.db")).unwrap();
    let wal = std::fs::read(f.dir.join("imgserver.db-wal")).unwrap_or_default();
    let secret = &token[TOKEN_PREFIX.len()..];
    for bytes in [&raw, &wal] {
        assert!(!bytes.windows(secret.len()).any(|w| w == secret.as_bytes()));
    }
    assert!(matches!(
        f.admin.add_token(&root(), "alice", Role::Viewer),
        Err(AdminError::Conflict(_))
    ));
    assert!(matches!(
        f.admin.add_token(&root(), "bad name", Role::Viewer),
        Err(AdminError::Invalid(_))
    ));
    // A device credential (a plain 64-hex secret, enrolled in the devices table) is no
    // admin token.
    f.store
        .checkin(
            &checkin("52:54:00:00:00:01"),
            &secrets(None, &crate::api::hash_secret(secret)),
            1,
            &Policy::default(),
        )
        .unwrap();
    assert!(matches!(
        f.admin.authenticate(secret),
        Err(AdminError::Unauthorized(_))
    ));
    assert!(matches!(
        f.admin
            .authenticate(&format!("{TOKEN_PREFIX}{}", "0".repeat(64))),
        Err(AdminError::Unauthorized(_))
    ));
    f.admin.revoke_token(&root(), "alice").unwrap();
    assert!(matches!(
        f.admin.authenticate(&token),
        Err(AdminError::Unauthorized(_))
    ));
    let list = f.admin.tokens(&root()).unwrap();
    assert_eq!(list.len(), 1);
    assert!(list[0].revoked.is_some());
    // The name is free again.
    f.admin.add_token(&root(), "alice", Role::Viewer).unwrap();
}

#[test]
fn validation_errors_block_a_device_and_warnings_do_not() {
    let f = fixture();
    let p = Policy::default();
    for (n, mac) in ["52:54:00:00:00:01", "52:54:00:00:00:02"]
        .iter()
        .enumerate()
    {
        f.store
            .checkin(&checkin(mac), &secrets(None, &format!("c{n}")), 1, &p)
            .unwrap();
        f.store.set_group(mac, Some("lab")).unwrap();
    }
    // os 7 is on partition 2 already: deploying os 7 again is a warning only.
    image(&f.store, "7", 1 << 20);
    // os 9 needs 600 MiB: partition 2 (512 MiB) is too small, an error.
    image(&f.store, "9", 600 << 20);
    let op = actor(&f, "op", Role::Operator);

    let same = f
        .admin
        .create_job(&op, &deploy("group:lab", "os:7", "2"))
        .unwrap();
    assert!(same.job.is_some() && same.blocked.is_empty());
    assert!(same.validation.iter().all(|r| r.status == "warning"));
    assert!(same.validation[0]
        .warnings
        .iter()
        .any(|w| w.contains("same as or older")));

    // Install location missing on one device only: it is blocked, the other is not.
    let mut odd = checkin("52:54:00:00:00:02");
    odd.disks[0].partitions.pop();
    f.store
        .checkin(&odd, &secrets(Some("c1"), "z"), 2, &p)
        .unwrap();
    image(&f.store, "8", 1 << 20);
    let mixed = f
        .admin
        .create_job(&op, &deploy("group:lab", "os:8", "2"))
        .unwrap();
    assert_eq!(mixed.blocked, vec!["52:54:00:00:00:02".to_string()]);
    let job = f.admin.job(&op, mixed.job.unwrap()).unwrap();
    let states: Vec<(String, TaskState)> =
        job.tasks.iter().map(|t| (t.mac.clone(), t.state)).collect();
    assert_eq!(
        states,
        vec![
            ("52:54:00:00:00:01".into(), TaskState::Pending),
            ("52:54:00:00:00:02".into(), TaskState::Rejected)
        ]
    );
    assert!(job.tasks[1].errors[0].contains("partition 2 does not exist"));

    // Not enough space on the only device of a fixed target: nothing is created.
    let before = f.admin.jobs(&op).unwrap().len();
    match f
        .admin
        .create_job(&op, &deploy("mac:52:54:00:00:00:01", "os:9", "2"))
    {
        Err(AdminError::Blocked(msg, table)) => {
            assert!(msg.contains("not enough space"), "{msg}");
            assert_eq!(table[0].status, "error");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(f.admin.jobs(&op).unwrap().len(), before);

    // Validate-only: the table, nothing created, nothing audited.
    let audit_before = f.admin.audit(&op, None, 100).unwrap().len();
    let v = f
        .admin
        .create_job(
            &op,
            &JobRequest {
                validate_only: true,
                ..deploy("all", "os:9", "2")
            },
        )
        .unwrap();
    assert!(v.job.is_none());
    assert_eq!(v.validation.len(), 2);
    assert!(v.validation.iter().all(|r| r.status == "error"));
    assert_eq!(f.admin.jobs(&op).unwrap().len(), before);
    assert_eq!(f.admin.audit(&op, None, 100).unwrap().len(), audit_before);
}

#[test]
fn jobs_at_a_time_wait_for_their_window() {
    let f = fixture();
    let p = Policy::default();
    let mac = "52:54:00:00:00:01";
    f.store
        .checkin(&checkin(mac), &secrets(None, "c"), 1, &p)
        .unwrap();
    image(&f.store, "8", 1 << 20);
    let op = actor(&f, "op", Role::Operator);
    let now = crate::api::now();
    let mut req = deploy(&format!("mac:{mac}"), "os:8", "2");
    req.at = Some(format!("@{}", now + 3600));
    req.until = Some(format!("@{}", now + 7200));
    let id = f.admin.create_job(&op, &req).unwrap().job.unwrap();
    let d = f
        .store
        .checkin(&checkin(mac), &secrets(Some("c"), "x"), now, &p)
        .unwrap();
    assert!(d.task.is_none(), "before the window: the device waits");
    let j = f.admin.job(&op, id).unwrap();
    assert_eq!(j.summary.window, window::Window::NotYet(now + 3600));
    assert!(j.tasks[0].waiting.as_deref().unwrap().contains("window"));
    let d = f
        .store
        .checkin(&checkin(mac), &secrets(Some("c"), "x"), now + 7200, &p)
        .unwrap();
    assert!(d.task.is_none(), "after the window: the device waits");
    let d = f
        .store
        .checkin(&checkin(mac), &secrets(Some("c"), "x"), now + 3601, &p)
        .unwrap();
    assert_eq!(d.task.expect("inside the window").1.id, id);
    // A window that ends before it starts, or has ended, is refused.
    req.until = Some(format!("@{}", now + 10));
    assert!(f.admin.create_job(&op, &req).is_err());
    req.at = None;
    req.until = Some("@5".into());
    assert!(f.admin.create_job(&op, &req).is_err());
}

#[test]
fn devices_filter_and_show_history() {
    let f = fixture();
    let p = Policy::default();
    for (n, mac) in ["52:54:00:00:00:01", "52:54:00:00:00:02"]
        .iter()
        .enumerate()
    {
        f.store
            .checkin(&checkin(mac), &secrets(None, &format!("c{n}")), 1, &p)
            .unwrap();
    }
    let op = actor(&f, "op", Role::Operator);
    f.admin
        .set_group(&op, "52:54:00:00:00:02", Some("north"))
        .unwrap();
    let g = f
        .admin
        .devices(
            &op,
            &DeviceFilter {
                group: Some("north".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(g.len(), 1);
    assert_eq!(g[0].mac, "52:54:00:00:00:02");
    let q = f
        .admin
        .devices(
            &op,
            &DeviceFilter {
                q: Some(":01".into()),
                state: Some("operational".into()),
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(q.len(), 1);
    image(&f.store, "8", 1 << 20);
    let id = f
        .admin
        .create_job(&op, &deploy("mac:52:54:00:00:00:01", "os:8", "2"))
        .unwrap()
        .job
        .unwrap();
    let d = f.admin.device(&op, "52-54-00-00-00-01").unwrap();
    assert_eq!(d.history.len(), 1);
    assert_eq!(d.history[0].job, id);
    assert_eq!(d.history[0].changed_by.as_deref(), Some("op"));
    assert!(d.inventory.is_some());
    assert!(f.admin.device(&op, "52:54:00:00:00:09").is_err());
}

#[test]
fn the_pxe_decision_respects_the_window() {
    use crate::store::BootWork;
    let f = fixture();
    let p = Policy::default();
    let mac = "52:54:00:00:00:01";
    f.store
        .checkin(&checkin(mac), &secrets(None, "c"), 1, &p)
        .unwrap();
    let op = actor(&f, "op", Role::Operator);
    let mut req = JobRequest {
        target: format!("mac:{mac}"),
        kind: "reboot".into(),
        at: Some("+1h".into()),
        ..Default::default()
    };
    let later = f.admin.create_job(&op, &req).unwrap().job.unwrap();
    assert_eq!(
        f.store.boot_work(mac).unwrap(),
        BootWork::Idle,
        "before its window a job is no reason to boot the agent"
    );
    req.at = Some("2000-01-01T00:00:00Z".into());
    let open = f.admin.create_job(&op, &req).unwrap().job.unwrap();
    assert!(
        matches!(f.store.boot_work(mac).unwrap(), BootWork::Work(w) if w.starts_with(&format!("job {open} "))),
        "inside its window it is"
    );
    assert_ne!(later, open);
}

/// The change and its audit record are one transaction: when the audit write fails, the
/// change is rolled back (so a crash between the two cannot leave a change unrecorded).
#[test]
fn a_failed_audit_write_rolls_the_change_back() {
    let f = fixture();
    let me = root();
    let mac = "52:54:00:00:00:61";
    f.admin.set_group(&me, mac, Some("lab")).unwrap();
    let before = f.admin.audit(&me, None, 100).unwrap();
    // Every audit insert now fails, as a full disk or a crash at that point would.
    let raw = rusqlite::Connection::open(f.dir.join("imgserver.db")).unwrap();
    raw.execute_batch(
        "CREATE TRIGGER no_audit BEFORE INSERT ON admin_audit BEGIN SELECT RAISE(ABORT, 'audit write refused'); END;",
    )
    .unwrap();
    let err = f.admin.set_group(&me, mac, Some("other")).unwrap_err();
    assert!(err.to_string().contains("audit write refused"), "{err}");
    let d = f.store.device(mac).unwrap().unwrap();
    assert_eq!(
        d.group.as_deref(),
        Some("lab"),
        "the group change was undone"
    );
    assert!(f.admin.make_operational(&me, mac).is_err());
    assert!(f.admin.forget(&me, mac).is_err());
    assert!(f.store.device(mac).unwrap().is_some(), "forget was undone");
    assert!(f.admin.add_token(&me, "ops", Role::Operator).is_err());
    assert!(
        f.admin.tokens(&me).unwrap().iter().all(|t| t.name != "ops"),
        "the token was not issued"
    );
    assert_eq!(f.admin.audit(&me, None, 100).unwrap(), before);
    // With the audit trail writable again, the same change goes through, recorded.
    raw.execute_batch("DROP TRIGGER no_audit;").unwrap();
    f.admin.set_group(&me, mac, Some("other")).unwrap();
    let after = f
        .admin
        .audit(&me, Some(&format!("device:{mac}")), 1)
        .unwrap();
    assert_eq!(after[0].detail, "other");
    assert_eq!(
        f.store.device(mac).unwrap().unwrap().group.as_deref(),
        Some("other")
    );
}
