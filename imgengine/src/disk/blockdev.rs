//! The block devices of this machine, from sysfs (`/sys/block`), for `img -dump`.
//!
//! `/sys/block/<name>/size` is always in 512-byte units whatever the logical sector size
//! (Documentation/ABI/stable/sysfs-block); `removable` is "1" for media the kernel
//! considers removable; `device/model` exists for SCSI/ATA/virtio-scsi disks.

use std::fs;
use std::path::Path;

use crate::disk::BlockDeviceInfo;
use crate::error::{Error, Result};

/// Every block device in `/sys/block` except empty ones (loop, ram, zram and card readers
/// with no medium report size 0).
pub fn list_block_devices() -> Result<Vec<BlockDeviceInfo>> {
    list_in(Path::new("/sys/block"), Path::new("/dev"))
}

fn list_in(sys_block: &Path, dev: &Path) -> Result<Vec<BlockDeviceInfo>> {
    let rd = fs::read_dir(sys_block)
        .map_err(|e| Error::io(format!("listing {}", sys_block.display()), e))?;
    let mut out = Vec::new();
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let dir = entry.path();
        let read = |f: &str| {
            fs::read_to_string(dir.join(f))
                .ok()
                .map(|s| s.trim().to_string())
        };
        let sectors: u64 = read("size").and_then(|s| s.parse().ok()).unwrap_or(0);
        let size = sectors.saturating_mul(512);
        if size == 0 {
            continue;
        }
        out.push(BlockDeviceInfo {
            path: dev.join(&name),
            size,
            model: read("device/model").filter(|m| !m.is_empty()),
            removable: read("removable").as_deref() == Some("1"),
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_sysfs_like_tree() {
        let t = std::env::temp_dir().join(format!("imgengine-sysblock-{}", std::process::id()));
        let _ = fs::remove_dir_all(&t);
        for (name, size, removable, model) in [
            ("sda", "2048", "0", Some("QEMU HARDDISK  ")),
            ("loop0", "0", "0", None),
            ("sdb", "100", "1", None),
        ] {
            let d = t.join(name);
            fs::create_dir_all(d.join("device")).unwrap();
            fs::write(d.join("size"), size).unwrap();
            fs::write(d.join("removable"), removable).unwrap();
            if let Some(m) = model {
                fs::write(d.join("device/model"), m).unwrap();
            }
        }
        let l = list_in(&t, Path::new("/dev")).unwrap();
        fs::remove_dir_all(&t).unwrap();
        assert_eq!(l.len(), 2);
        assert_eq!(
            l[0],
            BlockDeviceInfo {
                path: "/dev/sda".into(),
                size: 1 << 20,
                model: Some("QEMU HARDDISK".into()),
                removable: false
            }
        );
        assert!(l[1].removable && l[1].model.is_none());
    }

    #[test]
    fn real_sysfs_lists_without_error() {
        // Whatever this machine has; every listed device has a size.
        if Path::new("/sys/block").exists() {
            assert!(list_block_devices().unwrap().iter().all(|d| d.size > 0));
        }
    }
}
