//! What the device says about itself at check-in: the boot NIC's MAC, DMI serial / UUID /
//! model, RAM, its disks and partitions (read with the engine's partition-table parser) with
//! the image last written to each, and seed 000's autogenic flags.
//!
//! Everything comes from sysfs and procfs under a root that tests can point elsewhere, and
//! any value can be overridden by the agent configuration (tests simulate many devices on
//! one machine; a device with a broken DMI table can be given its serial by hand).

use std::path::{Path, PathBuf};

use imgengine::disk;
use imgengine::target::Target;
use protocol::{Autogenic, DeviceIdentity, DiskReport, PartitionReport};

use super::state::{stamp_key, StateDir};
use super::AgentConfig;

fn read_trim(p: &Path) -> Option<String> {
    let s = std::fs::read_to_string(p).ok()?;
    let s = s.trim();
    // Firmware fills unset DMI fields with placeholders; they identify nothing.
    let placeholder = [
        "",
        "To Be Filled By O.E.M.",
        "Default string",
        "Not Specified",
        "None",
        "0",
    ];
    if placeholder.iter().any(|x| x.eq_ignore_ascii_case(s)) {
        None
    } else {
        Some(s.to_string())
    }
}

/// The boot NIC: the first (by name) interface backed by a device that is not loopback and
/// has a non-zero MAC.
pub fn boot_mac(sys: &Path) -> Option<String> {
    let net = sys.join("class/net");
    let mut names: Vec<String> = std::fs::read_dir(&net)
        .ok()?
        .filter_map(|e| e.ok()?.file_name().into_string().ok())
        .collect();
    names.sort();
    let pick = |need_device: bool| {
        names.iter().find_map(|n| {
            if n == "lo" || (need_device && !net.join(n).join("device").exists()) {
                return None;
            }
            let mac = read_trim(&net.join(n).join("address"))?;
            protocol::normalize_mac(&mac).filter(|m| m != "00:00:00:00:00:00")
        })
    };
    pick(true).or_else(|| pick(false))
}

/// MemTotal from /proc/meminfo, in bytes.
pub fn ram_bytes(meminfo: &str) -> u64 {
    meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kib| kib.saturating_mul(1024))
        .unwrap_or(0)
}

pub fn identity(cfg: &AgentConfig) -> anyhow::Result<DeviceIdentity> {
    let sys = PathBuf::from("/sys");
    let dmi = sys.join("class/dmi/id");
    let mac = match &cfg.mac {
        Some(m) => m.clone(),
        None => boot_mac(&sys).ok_or_else(|| {
            anyhow::anyhow!(
                "no network interface with a MAC address found: give the agent -mac=MAC"
            )
        })?,
    };
    let mac = protocol::normalize_mac(&mac)
        .ok_or_else(|| anyhow::anyhow!("{mac:?} is not a MAC address"))?;
    Ok(DeviceIdentity {
        mac,
        serial: cfg
            .serial
            .clone()
            .or_else(|| read_trim(&dmi.join("product_serial"))),
        uuid: cfg
            .uuid
            .clone()
            .or_else(|| read_trim(&dmi.join("product_uuid"))),
        model: cfg
            .model
            .clone()
            .or_else(|| read_trim(&dmi.join("product_name"))),
        hostname: read_trim(Path::new("/proc/sys/kernel/hostname")),
        ram_bytes: cfg.ram_bytes.unwrap_or_else(|| {
            ram_bytes(&std::fs::read_to_string("/proc/meminfo").unwrap_or_default())
        }),
        agent_version: format!("img {}", env!("CARGO_PKG_VERSION")),
    })
}

/// The disks the agent reports and images: the configured one, or the fixed disks.
pub fn disks(cfg: &AgentConfig) -> Vec<(PathBuf, Option<String>)> {
    if let Some(d) = &cfg.disk {
        return vec![(d.clone(), None)];
    }
    disk::list_block_devices()
        .map(|v| {
            v.into_iter()
                .filter(|d| !d.removable && d.size > 0)
                .map(|d| (d.path, d.model))
                .collect()
        })
        .unwrap_or_default()
}

/// One disk as the server sees it; a disk the agent cannot read is reported with size 0
/// and no partitions (the server's validation then says "target missing").
pub fn disk_report(path: &Path, model: Option<String>, state: &StateDir) -> DiskReport {
    let name = path.display().to_string();
    let stamps = state.stamps().unwrap_or_default();
    let mut report = DiskReport {
        name: name.clone(),
        model,
        table: "none".into(),
        image: stamps.get(&name).cloned(),
        ..Default::default()
    };
    if !path.exists() {
        return report;
    }
    let Ok(t) = Target::open_disk_read_only(path) else {
        return report;
    };
    report.size = t.len();
    if let Ok(layout) = disk::read_layout(&t, t.len()) {
        report.boot_agent_partition = grub::bootpart::choose(&layout.partitions).map(|p| p.number);
        report.table = serde_json::to_value(layout.table)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        report.partitions = layout
            .partitions
            .iter()
            .map(|p| PartitionReport {
                number: p.number,
                start: p.start,
                size: p.len,
                fs: p.fs.to_string(),
                label: p
                    .label
                    .clone()
                    .filter(|l| !l.is_empty())
                    .or_else(|| p.fs_label.clone()),
                image: stamps
                    .get(&stamp_key(&name, Some(&p.number.to_string())))
                    .cloned(),
            })
            .collect();
    }
    report
}

/// Seed 000's autogenic flags: the device supports image backup when it has a backup
/// partition (or location); the backup image, its version and how much of it is verified
/// come from the area's own status (`crate::autogenic::inventory`).
pub fn autogenic(cfg: &AgentConfig) -> Autogenic {
    crate::autogenic::inventory(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_total() {
        assert_eq!(
            ram_bytes("MemTotal:        2048 kB\nMemFree: 1 kB\n"),
            2048 * 1024
        );
        assert_eq!(ram_bytes("garbage"), 0);
    }

    #[test]
    fn boot_mac_prefers_real_devices() {
        let root = std::env::temp_dir().join(format!("img-inv-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&root);
        for (n, mac, dev) in [
            ("lo", "00:00:00:00:00:00", false),
            ("br0", "02:00:00:00:00:09", false),
            ("eth1", "52:54:00:00:00:02", true),
        ] {
            let d = root.join("class/net").join(n);
            std::fs::create_dir_all(&d).unwrap();
            std::fs::write(d.join("address"), format!("{mac}\n")).unwrap();
            if dev {
                std::fs::create_dir_all(d.join("device")).unwrap();
            }
        }
        assert_eq!(boot_mac(&root).as_deref(), Some("52:54:00:00:00:02"));
        let _ = std::fs::remove_dir_all(&root);
    }
}
