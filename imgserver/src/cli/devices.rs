//! `imgserver devices|device|approve|forget|transcript`.

use std::path::Path;

use anyhow::{anyhow, bail};

use super::*;
use crate::model::{self, DeviceState};
use crate::store::Policy;

/// `imgserver devices`: devices with state, image, last check-in.
pub(super) fn devices(data: &Path, reload_wait: u64) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let policy = Policy {
        reload_wait,
        ..Policy::default()
    };
    let mut t = Table::new(&[
        "MAC",
        "STATE",
        "IMAGE",
        "MODEL",
        "SERIAL",
        "GROUP",
        "LAST CHECK-IN",
        "NOTE",
    ]);
    let now = now();
    for d in store.devices()? {
        let state = model::effective_state(
            d.state,
            d.last_seen.unwrap_or(0),
            d.trouble_since,
            now,
            policy.reload_wait,
        );
        t.row(vec![
                d.mac.clone(),
                if d.pending {
                    "Pending Approval".into()
                } else if d.enrolled || d.last_seen.is_some() {
                    state.title().into()
                } else {
                    "(not enrolled)".into()
                },
                d.image
                    .map(|i| format!("{} {}", i.name, i.version))
                    .unwrap_or_else(|| "-".into()),
                d.model.unwrap_or_else(|| "-".into()),
                d.serial.unwrap_or_else(|| "-".into()),
                d.group.unwrap_or_else(|| "-".into()),
                d.last_seen.map(utc).unwrap_or_else(|| "never".into()),
                if d.pending {
                    format!(
                        "enrolment from {} without the site secret: `imgserver approve {}` or `imgserver forget {}`",
                        d.enrol_addr.as_deref().unwrap_or("?"),
                        d.mac,
                        d.mac
                    )
                } else {
                    d.state_reason.unwrap_or_default()
                },
            ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// `imgserver device`: one device: change its group or state, then show it.
pub(super) fn device(
    data: &Path,
    mac: String,
    operational: bool,
    group: Option<Option<String>>,
) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    if let Some(g) = &group {
        store.set_group(&mac, g.as_deref())?;
        println!("{mac}: group {}", g.as_deref().unwrap_or("(none)"));
    }
    if operational {
        // Seed 003's "Make Device Operational".
        store.set_device_state(&mac, DeviceState::Operational, None)?;
        println!("{mac}: Operational");
    }
    let d = store
        .device(&mac)?
        .ok_or_else(|| anyhow!("no device {mac}: see `imgserver devices`"))?;
    println!("device {} (#{})", d.mac, d.id);
    if d.pending {
        println!(
            "  enrolment: pending approval (requested from {}): `imgserver approve {}`",
            d.enrol_addr.as_deref().unwrap_or("?"),
            d.mac
        );
    }
    println!(
        "  state:   {}{}",
        d.state.title(),
        d.state_reason
            .map(|r| format!(" ({r})"))
            .unwrap_or_default()
    );
    println!(
        "  image:   {}",
        d.image
            .map(|i| format!("{} {}", i.name, i.version))
            .unwrap_or_else(|| "-".into())
    );
    println!(
        "  model:   {}  serial: {}  RAM: {}",
        d.model.unwrap_or_default(),
        d.serial.unwrap_or_default(),
        fmt_bytes(d.ram_bytes)
    );
    println!("  agent:   {}", d.agent_version.unwrap_or_default());
    println!(
        "  seen:    {}",
        d.last_seen.map(utc).unwrap_or_else(|| "never".into())
    );
    if let Some(inv) = d.inventory {
        let a = &inv.autogenic;
        println!(
            "  autogenic: SupportImgBackup={} BackupImagePresent={} BackImageVer={}",
            a.support_img_backup as u8,
            a.backup_image_present as u8,
            a.back_image_ver.as_deref().unwrap_or("-")
        );
        let mut t = Table::new(&["DISK", "PART", "START", "SIZE", "FS", "LABEL", "IMAGE"]);
        for disk in &inv.disks {
            t.row(vec![
                disk.name.clone(),
                "-".into(),
                "-".into(),
                fmt_bytes(disk.size),
                disk.table.clone(),
                disk.model.clone().unwrap_or_default(),
                disk.image
                    .as_ref()
                    .map(|i| format!("{} {}", i.name, i.version))
                    .unwrap_or_default(),
            ]);
            for p in &disk.partitions {
                t.row(vec![
                    String::new(),
                    p.number.to_string(),
                    p.start.to_string(),
                    fmt_bytes(p.size),
                    p.fs.clone(),
                    p.label.clone().unwrap_or_default(),
                    p.image
                        .as_ref()
                        .map(|i| format!("{} {}", i.name, i.version))
                        .or_else(|| {
                            (disk.boot_agent_partition == Some(p.number))
                                .then(|| "(boot agent)".to_string())
                        })
                        .unwrap_or_default(),
                ]);
            }
        }
        print!("{}", t.render());
    }
    Ok(0)
}

/// `imgserver approve`: approve an enrolment made without the site secret.
pub(super) fn approve(data: &Path, mac: String) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    if store.approve(&mac, now())? {
        println!("{mac}: enrolment approved; the device gets its jobs at its next check-in");
        Ok(0)
    } else {
        bail!("{mac} has no enrolment waiting for approval: see `imgserver devices`")
    }
}

/// `imgserver forget`: delete a device's records.
pub(super) fn forget(data: &Path, mac: String) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    if store.forget(&mac)? {
        println!("{mac}: records deleted; the device enrols again at its next check-in and can be imaged again");
        Ok(0)
    } else {
        bail!("no device {mac}: see `imgserver devices`")
    }
}

/// `imgserver transcript`: a device's transcript.
pub(super) fn transcript(data: &Path, mac: String, task: Option<u64>) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    for (at, t, line) in store.transcript(&mac, task)? {
        println!(
            "{} {} {line}",
            utc(at),
            t.map(|t| format!("[task {t}]"))
                .unwrap_or_else(|| "[device]".into())
        );
    }
    Ok(0)
}
