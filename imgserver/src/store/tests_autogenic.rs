//! The store's part of seed 001's autogenic imaging: the image flag is stored, a device's
//! reported Maintenance is recorded and cleared, a PI is handed out at check-in but is never
//! PXE work (before or after it was handed out).

use super::*;
use crate::model::OnError;
use crate::protocol::{Autogenic, DeviceIdentity, DiskReport, ImageStamp, PROTOCOL_VERSION};

fn store() -> SqliteStore {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    let dir = std::env::temp_dir().join(format!(
        "imgserver-store-autogenic-{}-{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).unwrap();
    SqliteStore::open(&dir.join("db")).unwrap()
}

/// A device whose backup partition holds os 2, complete.
fn checkin(mac: &str, maintenance: Option<&str>) -> CheckIn {
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "disk0".into(),
            size: 4 << 30,
            ..Default::default()
        }],
        autogenic: Autogenic {
            support_img_backup: true,
            backup_image_present: true,
            back_image_ver: Some("2".into()),
            backup_image: Some(ImageStamp {
                name: "os".into(),
                version: "2".into(),
            }),
            backup_bytes: 10 << 20,
            backup_size: 10 << 20,
            backup_partition_size: 1 << 30,
        },
        maintenance: maintenance.map(str::to_string),
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

fn image(s: &SqliteStore, autogenic: bool) -> u64 {
    s.add_image(&ImageRow {
        id: 0,
        name: "os".into(),
        version: "2".into(),
        file: Some("os-2.img".into()),
        url: None,
        size: Some(10 << 20),
        facts: ImageFacts {
            name: "os".into(),
            version: "2".into(),
            whole_disk: true,
            min_target_size: 1 << 20,
            ..Default::default()
        },
        sealed: true,
        signed_by: None,
        description: None,
        added: 1,
        captured_from: None,
        autogenic,
    })
    .unwrap()
}

#[test]
fn the_autogenic_flag_is_stored() {
    let s = store();
    let id = image(&s, true);
    assert!(s.image_by_id(id).unwrap().unwrap().autogenic);
    assert!(s.images().unwrap()[0].autogenic);
    let s = store();
    let id = image(&s, false);
    assert!(!s.image_by_id(id).unwrap().unwrap().autogenic);
}

#[test]
fn reported_maintenance_is_shown_until_a_checkin_without_it() {
    let s = store();
    let p = Policy::default();
    let a = "52:54:00:00:00:01";
    s.checkin(&checkin(a, None), &secrets(None, "a1"), 1, &p)
        .unwrap();
    s.checkin(
        &checkin(a, Some("PI failed on 4 boots")),
        &secrets(Some("a1"), "x"),
        2,
        &p,
    )
    .unwrap();
    let d = s.device(a).unwrap().unwrap();
    assert_eq!(d.state, DeviceState::Maintenance);
    assert_eq!(
        d.state_reason.as_deref(),
        Some("the device reports maintenance: PI failed on 4 boots")
    );
    let lines = s.transcript(a, None).unwrap();
    assert!(
        lines
            .iter()
            .any(|l| l.2.contains("Maintenance: the device reports")),
        "{lines:?}"
    );
    // Reported again: recorded once.
    s.checkin(
        &checkin(a, Some("PI failed on 4 boots")),
        &secrets(Some("a1"), "x"),
        3,
        &p,
    )
    .unwrap();
    assert_eq!(s.transcript(a, None).unwrap().len(), lines.len());
    s.checkin(&checkin(a, None), &secrets(Some("a1"), "x"), 4, &p)
        .unwrap();
    let d = s.device(a).unwrap().unwrap();
    assert_eq!(d.state, DeviceState::Operational);
    assert_eq!(d.state_reason, None);
    // A Maintenance the administrator's side set is not cleared by a check-in.
    s.set_device_state(a, DeviceState::Maintenance, Some("task 9 failed"))
        .unwrap();
    s.checkin(&checkin(a, None), &secrets(Some("a1"), "x"), 5, &p)
        .unwrap();
    assert_eq!(
        s.device(a).unwrap().unwrap().state,
        DeviceState::Maintenance
    );
}

#[test]
fn a_pi_is_handed_out_at_checkin_but_never_pxe_work() {
    let s = store();
    let p = Policy::default();
    let img = image(&s, true);
    let a = "52:54:00:00:00:01";
    s.checkin(&checkin(a, None), &secrets(None, "a1"), 1, &p)
        .unwrap();
    let job = |from_backup: bool| NewJob {
        kind: "deploy".into(),
        image: Some(img),
        options: JobOptions {
            from_backup,
            on_error: OnError::Continue,
            ..Default::default()
        },
        selector: format!("mac:{a}"),
        devices: vec![],
        note: None,
    };
    let (pi, report) = s.add_job(&job(true), 2).unwrap();
    assert!(report[0].1.ok(), "{report:?}");
    assert_eq!(s.boot_work(a).unwrap(), BootWork::Idle, "before it is sent");
    let d = s
        .checkin(&checkin(a, None), &secrets(Some("a1"), "x"), 3, &p)
        .unwrap();
    let (t, j, _) = d.task.expect("the PI is handed to the disk's agent");
    assert_eq!(j.id, pi);
    assert!(j.options.from_backup);
    assert_eq!(s.boot_work(a).unwrap(), BootWork::Idle, "while it runs");
    s.record_result(
        d.device,
        &crate::protocol::TaskResult {
            task: t.id,
            report: "r1".into(),
            outcome: crate::protocol::Outcome::Succeeded,
            message: None,
            transcript: vec![],
            image: None,
            bytes: 0,
            finished: 3,
        },
        4,
    )
    .unwrap();
    // A network deploy of the same image is PXE work as before.
    s.add_job(&job(false), 5).unwrap();
    assert!(matches!(s.boot_work(a).unwrap(), BootWork::Work(_)));
}
