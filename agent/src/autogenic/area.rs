//! The backup area the agent downloads into (BI) and re-images from (PI), behind one small
//! trait so the agent's logic does not depend on where the bytes live:
//!
//! - [`DirArea`]: a folder (`img -checkin -backup=DIR`, or a backup location mounted by
//!   the guest): `IMAGE.BIN`, preallocated to the image's size, and `STATUS.JSON`, the
//!   area's own status (image, manifest digest, size, verified bytes), written atomically
//!   after the image bytes it describes were synced;
//! - the IMGBACKUP partition itself (the `autogenic` crate's `BackupArea`, when the agent
//!   is built with it; see [`open`]).
//!
//! The contract every area keeps: `status().verified_bytes` never counts a byte that was
//! not written and synced before `commit` returned, so a power cut or a lost connection
//! resumes from there; `begin` with another image starts from 0.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use ::autogenic::BackupArea;
use anyhow::Context;
use imgengine::source::{HttpConfig, Location, Source};
use protocol::ImageStamp;
use serde::{Deserialize, Serialize};

/// What an area holds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AreaStatus {
    pub image: Option<ImageStamp>,
    /// SHA-256 of the image's manifest (its identity).
    #[serde(default)]
    pub digest: Option<String>,
    /// The image file's size.
    #[serde(default)]
    pub size: u64,
    /// Bytes from the start that are written, checked and synced.
    #[serde(default)]
    pub verified_bytes: u64,
    #[serde(default)]
    pub complete: bool,
}

impl AreaStatus {
    /// The area holds exactly `digest`, whole.
    pub fn holds(&self, digest: &str) -> bool {
        self.complete && self.digest.as_deref() == Some(digest)
    }

    /// "os 2.1 (complete)", "os 2.1 (12 of 40 MB)", "nothing".
    pub fn describe(&self) -> String {
        match &self.image {
            None => "nothing".into(),
            Some(s) if self.complete => format!("{} {} (complete)", s.name, s.version),
            Some(s) => format!(
                "{} {} (incomplete: {} of {} bytes)",
                s.name, s.version, self.verified_bytes, self.size
            ),
        }
    }
}

pub trait Area: Send {
    /// "the backup folder /x" / "backup partition 3 of /dev/sda".
    fn describe(&self) -> String;
    /// Bytes an image may have.
    fn capacity(&self) -> u64;
    /// Size of the partition (or folder quota) for the inventory.
    fn partition_size(&self) -> u64;
    fn status(&self) -> anyhow::Result<AreaStatus>;
    /// Start holding `stamp` (manifest `digest`, `size` bytes) from byte 0.
    fn begin(&mut self, stamp: &ImageStamp, digest: &str, size: u64) -> anyhow::Result<()>;
    fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()>;
    /// Sync, then record that the first `verified` bytes are good.
    fn commit(&mut self, verified: u64) -> anyhow::Result<()>;
    /// All `size` bytes are there and checked.
    fn finish(&mut self) -> anyhow::Result<()>;
    /// The complete image as the imaging engine's source (signature and chunks are checked
    /// again there, as for a network deploy).
    fn source(&self) -> anyhow::Result<Source>;
}

/// A folder as the backup area.
pub struct DirArea {
    dir: PathBuf,
    file: Option<File>,
}

const IMAGE: &str = "IMAGE.BIN";
const STATUS: &str = "STATUS.JSON";

impl DirArea {
    pub fn open(dir: &Path) -> anyhow::Result<DirArea> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        Ok(DirArea {
            dir: dir.to_path_buf(),
            file: None,
        })
    }

    fn image_path(&self) -> PathBuf {
        self.dir.join(IMAGE)
    }

    fn write_status(&self, s: &AreaStatus) -> anyhow::Result<()> {
        let p = self.dir.join(STATUS);
        let tmp = self.dir.join("STATUS.TMP");
        std::fs::write(&tmp, serde_json::to_vec_pretty(s)?)
            .with_context(|| format!("writing {}", tmp.display()))?;
        File::open(&tmp)
            .and_then(|f| f.sync_all())
            .with_context(|| format!("syncing {}", tmp.display()))?;
        std::fs::rename(&tmp, &p).with_context(|| format!("renaming {}", tmp.display()))?;
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }

    fn file(&mut self) -> anyhow::Result<&File> {
        if self.file.is_none() {
            let p = self.image_path();
            self.file = Some(
                std::fs::OpenOptions::new()
                    .read(true)
                    .write(true)
                    .create(true)
                    .truncate(false)
                    .open(&p)
                    .with_context(|| format!("opening {}", p.display()))?,
            );
        }
        Ok(self.file.as_ref().expect("opened above"))
    }
}

impl Area for DirArea {
    fn describe(&self) -> String {
        format!("the backup folder {}", self.dir.display())
    }

    fn capacity(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| {
                let free = s.blocks_available() as u64 * s.fragment_size() as u64;
                free + std::fs::metadata(self.image_path())
                    .map(|m| m.len())
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    }

    fn partition_size(&self) -> u64 {
        nix::sys::statvfs::statvfs(&self.dir)
            .map(|s| s.blocks() as u64 * s.fragment_size() as u64)
            .unwrap_or(0)
    }

    fn status(&self) -> anyhow::Result<AreaStatus> {
        let p = self.dir.join(STATUS);
        match std::fs::read(&p) {
            Ok(b) => {
                let s: AreaStatus = serde_json::from_slice(&b).with_context(|| {
                    format!("{} is damaged: the backup is fetched again", p.display())
                })?;
                // The status never claims more than the file holds.
                let len = std::fs::metadata(self.image_path())
                    .map(|m| m.len())
                    .unwrap_or(0);
                if s.verified_bytes > s.size || s.size > len {
                    return Ok(AreaStatus::default());
                }
                Ok(s)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(AreaStatus::default()),
            Err(e) => Err(e).with_context(|| format!("reading {}", p.display())),
        }
    }

    fn begin(&mut self, stamp: &ImageStamp, digest: &str, size: u64) -> anyhow::Result<()> {
        // The status first says "nothing verified", then the file is sized.
        let s = AreaStatus {
            image: Some(stamp.clone()),
            digest: Some(digest.to_string()),
            size,
            verified_bytes: 0,
            complete: false,
        };
        self.write_status(&s)?;
        let p = self.image_path();
        let f = self.file()?;
        f.set_len(size)
            .with_context(|| format!("sizing {} to {size} bytes", p.display()))?;
        Ok(())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        let p = self.image_path();
        self.file()?
            .write_all_at(data, offset)
            .with_context(|| format!("writing {} at {offset}", p.display()))
    }

    fn commit(&mut self, verified: u64) -> anyhow::Result<()> {
        let p = self.image_path();
        self.file()?
            .sync_data()
            .with_context(|| format!("syncing {}", p.display()))?;
        let mut s = self.status()?;
        s.verified_bytes = verified.min(s.size);
        self.write_status(&s)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        let mut s = self.status()?;
        s.verified_bytes = s.size;
        s.complete = true;
        self.write_status(&s)
    }

    fn source(&self) -> anyhow::Result<Source> {
        Source::open(&Location::File(self.image_path()), &HttpConfig::default())
            .map_err(anyhow::Error::new)
    }
}

/// The IMGBACKUP partition (the `autogenic` crate's [`BackupArea`]) as an [`Area`]; the
/// path is the disk's (the read-back before the area is complete opens it again).
pub struct PartitionArea(pub BackupArea, pub PathBuf);

/// The area's first `len` bytes, complete or not, as a ranged source (BI's read-back
/// before `finish`; the `autogenic` crate's own source serves complete images only).
struct AreaRange {
    area: std::sync::Mutex<BackupArea>,
    len: u64,
}

impl imgengine::source::RangeRead for AreaRange {
    fn len(&self) -> u64 {
        self.len
    }

    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        if offset.saturating_add(buf.len() as u64) > self.len {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "read past the image in the backup partition",
            ));
        }
        self.area
            .lock()
            .map_err(|_| std::io::Error::other("backup area lock poisoned"))?
            .read_at(offset, buf)
            .map_err(|e| std::io::Error::other(format!("{e:#}")))
    }
}

impl Area for PartitionArea {
    fn describe(&self) -> String {
        self.0.describe()
    }

    fn capacity(&self) -> u64 {
        self.0.capacity()
    }

    fn partition_size(&self) -> u64 {
        self.0.partition_len()
    }

    fn status(&self) -> anyhow::Result<AreaStatus> {
        let s = self.0.status();
        Ok(AreaStatus {
            image: s.image.clone(),
            digest: Some(s.manifest_digest.clone()).filter(|d| !d.is_empty()),
            size: s.size,
            verified_bytes: s.verified_bytes,
            complete: s.complete,
        })
    }

    fn begin(&mut self, stamp: &ImageStamp, digest: &str, size: u64) -> anyhow::Result<()> {
        // A fresh start: the partition's begin keeps a matching status (resume), so a
        // restart from 0 clears it first.
        self.0.clear()?;
        self.0.begin(stamp.clone(), digest, size).map(|_| ())
    }

    fn write_at(&mut self, offset: u64, data: &[u8]) -> anyhow::Result<()> {
        self.0.write_at(offset, data)
    }

    fn commit(&mut self, verified: u64) -> anyhow::Result<()> {
        self.0.commit(verified)
    }

    fn finish(&mut self) -> anyhow::Result<()> {
        self.0.finish()
    }

    fn source(&self) -> anyhow::Result<Source> {
        let s = self.0.status();
        if s.complete {
            return self.0.image_source();
        }
        if s.image.is_none() || s.verified_bytes != s.size {
            anyhow::bail!(
                "{} holds no whole image ({} of {} bytes verified)",
                self.0.describe(),
                s.verified_bytes,
                s.size
            );
        }
        let reader = AreaRange {
            area: std::sync::Mutex::new(BackupArea::open(&self.1, false)?),
            len: s.size,
        };
        Ok(Source::from_ranged(
            &self.0.describe(),
            std::sync::Arc::new(reader),
        ))
    }
}

/// The device's backup area: the configured backup folder (`-backup=DIR`) when one is
/// given, else the IMGBACKUP partition of the device's disk (found by its name or label);
/// None when the device has neither (no `SupportImgBackup`).
pub fn open(cfg: &crate::checkin::AgentConfig) -> anyhow::Result<Option<Box<dyn Area>>> {
    if let Some(dir) = &cfg.backup_dir {
        return Ok(Some(Box::new(DirArea::open(dir)?)));
    }
    for (disk, _) in crate::checkin::inventory::disks(cfg) {
        let Ok(t) = imgengine::target::Target::open_disk_read_only(&disk) else {
            continue;
        };
        let Ok(layout) = imgengine::disk::read_layout(&t, t.len()) else {
            continue;
        };
        drop(t);
        if ::autogenic::area::locate(&layout)?.is_some() {
            let area = BackupArea::open(&disk, true)?;
            return Ok(Some(Box::new(PartitionArea(area, disk))));
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dir_area_commits_and_restarts_for_another_image() {
        let d = std::env::temp_dir().join(format!("img-dirarea-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mut a = DirArea::open(&d).unwrap();
        assert_eq!(a.status().unwrap(), AreaStatus::default());
        let st = ImageStamp {
            name: "os".into(),
            version: "1".into(),
        };
        a.begin(&st, "aa", 10).unwrap();
        a.write_at(0, b"01234").unwrap();
        a.commit(5).unwrap();
        let s = DirArea::open(&d).unwrap().status().unwrap();
        assert_eq!((s.verified_bytes, s.complete), (5, false));
        assert!(!s.holds("aa"));
        a.write_at(5, b"56789").unwrap();
        a.finish().unwrap();
        let s = a.status().unwrap();
        assert!(s.holds("aa") && !s.holds("bb"));
        assert_eq!(std::fs::read(d.join(IMAGE)).unwrap(), b"0123456789");
        assert_eq!(s.describe(), "os 1 (complete)");
        a.begin(&st, "bb", 4).unwrap();
        assert_eq!(a.status().unwrap().verified_bytes, 0);
        // A status claiming more than the file holds is not believed.
        std::fs::write(
            d.join(STATUS),
            br#"{"image":null,"size":99,"verified_bytes":99,"complete":true}"#,
        )
        .unwrap();
        assert_eq!(a.status().unwrap(), AreaStatus::default());
        let _ = std::fs::remove_dir_all(&d);
    }
}
