//! The resume journal: a small file under the state directory saying which image (by its
//! manifest digest) was being deployed onto which target. It is on stable storage before
//! the target's tables are invalidated, and removed after a finished deploy, so a journal
//! that matches says "this target holds part of this image": the next attempt then checks
//! every chunk on the target and fetches only the ones that differ.

use std::fs;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::error::{Error, IoContext, Result};
use crate::format::Manifest;

/// Which image was going where.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(super) struct Journal {
    manifest_digest: String,
    target: String,
    part: Option<String>,
    target_len: u64,
}

impl Journal {
    pub(super) fn new(manifest: &Manifest, target: &Path, part: Option<&str>, len: u64) -> Self {
        Journal {
            manifest_digest: manifest.digest(),
            target: target.display().to_string(),
            part: part.map(str::to_string),
            target_len: len,
        }
    }

    /// Where the journal of `target` (and `part`) lives: one file per target, named by a
    /// hash of its path, so two deploys onto different disks never share one.
    pub(super) fn path(state_dir: &Path, target: &Path, part: Option<&str>) -> PathBuf {
        let target = target.display().to_string();
        let key = Sha256::digest(format!("{target}\0{}", part.unwrap_or("")).as_bytes());
        state_dir.join(format!("deploy-{}.json", hex::encode(&key[..8])))
    }

    /// The journal at `path`; none when missing or unreadable (a damaged journal only
    /// costs a resume).
    pub(super) fn load(path: &Path) -> Option<Journal> {
        serde_json::from_slice(&fs::read(path).ok()?).ok()
    }

    pub(super) fn store(&self, path: &Path) -> Result<()> {
        let dir = path.parent().unwrap_or(Path::new("."));
        fs::create_dir_all(dir).ctx(|| format!("creating state directory {}", dir.display()))?;
        let tmp = path.with_extension("tmp");
        let body = serde_json::to_vec_pretty(self)
            .map_err(|e| Error::invalid("encoding the resume journal").with_source(e))?;
        // Written, synced, renamed, and the directory synced: after a power cut the journal
        // is either the old one or the new one, complete, and it is on disk before the
        // target's tables are invalidated.
        let mut f =
            fs::File::create(&tmp).ctx(|| format!("writing resume journal {}", tmp.display()))?;
        std::io::Write::write_all(&mut f, &body)
            .and_then(|()| f.sync_all())
            .ctx(|| format!("writing resume journal {}", tmp.display()))?;
        fs::rename(&tmp, path).ctx(|| format!("writing resume journal {}", path.display()))?;
        sync_dir(dir)
    }

    /// Remove the journal after a finished deploy (and make the removal durable).
    pub(super) fn remove(path: &Path) {
        if fs::remove_file(path).is_ok() {
            let _ = sync_dir(path.parent().unwrap_or(Path::new(".")));
        }
    }
}

/// fsync a directory, so that a rename or removal in it survives a power cut.
fn sync_dir(dir: &Path) -> Result<()> {
    fs::File::open(dir)
        .and_then(|d| d.sync_all())
        .ctx(|| format!("syncing directory {}", dir.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_journal_loads_back_and_is_removed() {
        let dir = std::env::temp_dir().join(format!("imgengine-journal-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let m = Manifest::default();
        let p = Journal::path(&dir, Path::new("/dev/vda"), Some("2"));
        assert_ne!(p, Journal::path(&dir, Path::new("/dev/vda"), None));
        assert_eq!(Journal::load(&p), None);
        let j = Journal::new(&m, Path::new("/dev/vda"), Some("2"), 1 << 30);
        j.store(&p).unwrap();
        assert_eq!(Journal::load(&p), Some(j));
        Journal::remove(&p);
        assert_eq!(Journal::load(&p), None);
        fs::write(&p, b"{ not json").unwrap();
        assert_eq!(Journal::load(&p), None, "a damaged journal is no journal");
        fs::remove_dir_all(&dir).unwrap();
    }
}
