//! `imgserver devices|device|approve|forget|transcript`.

use std::path::Path;

use anyhow::anyhow;

use super::*;
use crate::admin::{window, DeviceFilter};

/// `imgserver devices`: devices with state, image, last check-in (in `--tz`).
pub(super) fn devices(data: &Path, reload_wait: u64, tz: Option<&str>) -> anyhow::Result<i32> {
    let tz = window::zone(tz)?;
    let mut admin = open_admin(data)?;
    admin.reload_wait = reload_wait;
    let mut t = Table::new(&[
        "MAC",
        "STATE",
        "IMAGE",
        "BACKUP",
        "MODEL",
        "SERIAL",
        "GROUP",
        "LAST CHECK-IN",
        "NOTE",
    ]);
    for d in admin.devices(&Actor::host(), &DeviceFilter::default())? {
        let note = if d.state == "pending_approval" {
            format!(
                "enrolment from {} without the site secret: `imgserver approve {}` or `imgserver forget {}`",
                d.enrol_addr.as_deref().unwrap_or("?"),
                d.mac,
                d.mac
            )
        } else {
            d.state_reason.clone().unwrap_or_default()
        };
        t.row(vec![
            d.mac.clone(),
            if d.state == "not_enrolled" {
                "(not enrolled)".into()
            } else {
                d.state_title.clone()
            },
            d.image
                .map(|i| format!("{} {}", i.name, i.version))
                .unwrap_or_else(|| "-".into()),
            // Seed 001 step 7: the backup partition's image, version and BI progress.
            d.backup
                .as_ref()
                .map(|b| b.text())
                .unwrap_or_else(|| "-".into()),
            d.model.unwrap_or_else(|| "-".into()),
            d.serial.unwrap_or_else(|| "-".into()),
            d.group.unwrap_or_else(|| "-".into()),
            d.last_seen
                .map(|x| window::show(x, &tz))
                .unwrap_or_else(|| "never".into()),
            note,
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
    if operational || group.is_some() {
        let admin = open_admin(data)?;
        let me = Actor::host();
        if let Some(g) = &group {
            admin.set_group(&me, &mac, g.as_deref())?;
            println!("{mac}: group {}", g.as_deref().unwrap_or("(none)"));
        }
        if operational {
            // Seed 003's "Make Device Operational".
            admin.make_operational(&me, &mac)?;
            println!("{mac}: Operational");
        }
    }
    // The view reads the store: it shows the device's id and its recorded state.
    let store = open_store(data)?;
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
        let b = crate::autogenic::BackupView::of(&inv);
        if b.supported {
            println!(
                "  backup:  {}{}",
                b.text(),
                if b.partition_size > 0 {
                    format!(" (backup partition {})", fmt_bytes(b.partition_size))
                } else {
                    String::new()
                }
            );
        }
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
    open_admin(data)?.approve(&Actor::host(), &mac)?;
    println!("{mac}: enrolment approved; the device gets its jobs at its next check-in");
    Ok(0)
}

/// `imgserver forget`: delete a device's records.
pub(super) fn forget(data: &Path, mac: String) -> anyhow::Result<i32> {
    open_admin(data)?.forget(&Actor::host(), &mac)?;
    println!("{mac}: records deleted; the device enrols again at its next check-in and can be imaged again");
    Ok(0)
}

/// `imgserver transcript`: a device's transcript (times in `--tz`).
pub(super) fn transcript(
    data: &Path,
    mac: String,
    task: Option<u64>,
    tz: Option<&str>,
) -> anyhow::Result<i32> {
    let tz = window::zone(tz)?;
    for l in open_admin(data)?.transcript(&Actor::host(), &mac, task)? {
        println!(
            "{} {} {}",
            window::show(l.at, &tz),
            l.task
                .map(|t| format!("[task {t}]"))
                .unwrap_or_else(|| "[device]".into()),
            l.line
        );
    }
    Ok(0)
}
