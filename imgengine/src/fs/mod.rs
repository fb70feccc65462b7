//! File systems inside a partition: what kind they are, their label, and which bytes of the
//! partition they actually use.
//!
//! A capture only needs the blocks a file system has allocated. FAT keeps that knowledge in
//! the FAT itself (a cluster whose entry is non-zero is in use), NTFS in its `$Bitmap` file;
//! both maps are read here ([`fat`], [`ntfs`]) into a [`UsedMap`] of byte ranges relative
//! to the partition start. For anything else (ext, swap, unknown content) the map is `None`
//! and the capture reads every block, eliding zero runs.
//!
//! Everything read here comes from an untrusted disk: every value taken from a boot sector
//! or an allocation map is range-checked against the partition before use, and a file system
//! whose boot sector does not add up is reported as an error that names the partition offset
//! and the way out ("capture it raw with -raw"), never a panic.

pub mod fat;
pub mod hidden;
pub mod ntfs;
pub(crate) mod window;

use std::fmt;

use serde::{Deserialize, Serialize};

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::extent::{self, Extent};
use crate::io::ReadAt;

/// The kind of file system found in a partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FsKind {
    Fat12,
    Fat16,
    Fat32,
    Ntfs,
    /// ext2/3/4 (detected for display; captured block by block).
    Ext,
    /// Linux swap (detected for display; captured block by block).
    Swap,
    Unknown,
}

impl FsKind {
    /// The lower-case name used in `img -dump` and in image metadata.
    pub fn as_str(self) -> &'static str {
        match self {
            FsKind::Fat12 => "fat12",
            FsKind::Fat16 => "fat16",
            FsKind::Fat32 => "fat32",
            FsKind::Ntfs => "ntfs",
            FsKind::Ext => "ext",
            FsKind::Swap => "swap",
            FsKind::Unknown => "unknown",
        }
    }

    /// True for the kinds whose allocation map this module reads.
    pub fn has_used_map(self) -> bool {
        matches!(
            self,
            FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 | FsKind::Ntfs
        )
    }
}

impl fmt::Display for FsKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What [`probe`] found: the kind and, when the file system has one, its label.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FsProbe {
    pub kind: FsKind,
    pub label: Option<String>,
}

/// The bytes of a partition that its file system uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsedMap {
    pub kind: FsKind,
    pub label: Option<String>,
    /// Bytes a capture will read: the total of `extents`, or the partition length when the
    /// content is not understood.
    pub used_bytes: u64,
    /// Allocated byte ranges relative to the partition start, normalized; None = content
    /// not understood: capture reads every block and elides zero runs.
    pub extents: Option<Vec<Extent>>,
}

/// The first 4 KiB of a partition hold every signature `probe` looks at: FAT and NTFS boot
/// sectors (offset 0), the ext superblock (offset 1024) and the swap signature (end of the
/// first 4 KiB page).
const PROBE_LEN: usize = 4096;

/// Identify the file system in `[offset, offset + len)` of `dev`. Unknown or unreadable
/// content is `FsKind::Unknown`, not an error; only an I/O error on a partition that is big
/// enough to hold a boot sector is returned.
pub fn probe(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Result<FsProbe> {
    let unknown = FsProbe {
        kind: FsKind::Unknown,
        label: None,
    };
    let n = len.min(PROBE_LEN as u64) as usize;
    if n < 512 {
        return Ok(unknown);
    }
    let mut head = vec![0u8; n];
    dev.read_exact_at(&mut head, offset)
        .ctx(|| format!("reading the first {n} bytes of the partition at offset {offset}"))?;

    if ntfs::looks_like_ntfs(&head) {
        let label = ntfs::read_label(dev, offset, len);
        return Ok(FsProbe {
            kind: FsKind::Ntfs,
            label,
        });
    }
    if let Some(claimed) = fat::claimed_kind(&head) {
        // A broken BPB still reports the claimed kind, so that used_map() says what is
        // wrong instead of silently capturing the partition raw.
        return Ok(match fat::BootSector::parse(&head, len) {
            Ok(bs) => FsProbe {
                kind: bs.kind(),
                label: bs.label(),
            },
            Err(_) => FsProbe {
                kind: claimed,
                label: None,
            },
        });
    }
    // ext2/3/4: superblock at 1024, s_magic (0xEF53, little endian) at superblock + 56,
    // s_volume_name (16 bytes) at superblock + 120.
    if head.len() >= 1024 + 136 && head[1024 + 56..1024 + 58] == [0x53, 0xEF] {
        return Ok(FsProbe {
            kind: FsKind::Ext,
            label: c_label(&head[1024 + 120..1024 + 136]),
        });
    }
    // Linux swap (mkswap): "SWAPSPACE2" in the last 10 bytes of the first 4 KiB page; the
    // label (16 bytes) follows bootbits[1024], version, last_page, nr_badpages, uuid[16].
    if head.len() == PROBE_LEN && &head[PROBE_LEN - 10..] == b"SWAPSPACE2" {
        return Ok(FsProbe {
            kind: FsKind::Swap,
            label: c_label(&head[1052..1068]),
        });
    }
    Ok(unknown)
}

/// The allocation map of the file system in `[offset, offset + len)` of `dev`.
///
/// FAT12/16/32 and NTFS give exact extents; anything else gives `extents: None`. A FAT or
/// NTFS whose boot sector is inconsistent is an error (`ErrorKind::Corrupt`) naming the
/// partition offset and suggesting a raw capture.
pub fn used_map(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Result<UsedMap> {
    let p = probe(dev, offset, len)?;
    let extents = match p.kind {
        FsKind::Fat12 | FsKind::Fat16 | FsKind::Fat32 => fat::used_extents(dev, offset, len)?,
        FsKind::Ntfs => ntfs::used_extents(dev, offset, len)?,
        FsKind::Ext | FsKind::Swap | FsKind::Unknown => {
            return Ok(UsedMap {
                kind: p.kind,
                label: p.label,
                used_bytes: len,
                extents: None,
            });
        }
    };
    let extents: Vec<Extent> = extent::normalize(extents, 0)
        .into_iter()
        .filter_map(|e| e.clip(len))
        .collect();
    let used_bytes = extent::total_len(&extents);
    Ok(UsedMap {
        kind: p.kind,
        label: p.label,
        used_bytes,
        extents: Some(extents),
    })
}

/// The error for a file system whose own structures do not add up.
pub(crate) fn broken(kind: &str, offset: u64, what: impl fmt::Display) -> Error {
    Error::new(
        ErrorKind::Corrupt,
        format!("{kind} file system in the partition at offset {offset} is inconsistent ({what}); capture it raw with -raw"),
    )
}

/// A NUL/space padded label; `None` when empty.
fn c_label(raw: &[u8]) -> Option<String> {
    let end = raw.iter().position(|&b| b == 0).unwrap_or(raw.len());
    let s = String::from_utf8_lossy(&raw[..end]).trim().to_string();
    (!s.is_empty()).then_some(s)
}

/// Fuzz entry point: probe and map `data` as one partition. Must never panic.
pub fn fuzz_used_map(data: &[u8]) {
    let len = data.len() as u64;
    let _ = probe(data, 0, len);
    if let Ok(m) = used_map(data, 0, len) {
        if let Some(ext) = &m.extents {
            for e in ext {
                assert!(
                    e.end().is_some_and(|end| end <= len),
                    "extent {e:?} outside the partition"
                );
            }
            assert_eq!(extent::total_len(ext), m.used_bytes);
        }
    }
}

/// Deterministic pseudo-random bytes for the fuzz-style unit tests (xorshift64*).
#[cfg(test)]
pub(crate) struct TestRng(pub u64);

#[cfg(test)]
impl TestRng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    /// Flip, overwrite or extreme-value a few bytes of `data`, preferring the first sectors
    /// where the parsers look.
    pub(crate) fn mutate(&mut self, data: &mut [u8], hot: usize) {
        self.mutate_in(data, &[(0, hot)]);
    }

    /// Mutate a few bytes, mostly inside the `hot` (offset, len) regions; returns what to
    /// restore, so big images need not be cloned per iteration.
    pub(crate) fn mutate_in(
        &mut self,
        data: &mut [u8],
        hot: &[(usize, usize)],
    ) -> Vec<(usize, u8)> {
        let mut undo = Vec::new();
        if data.is_empty() {
            return undo;
        }
        let edits = 1 + self.below(8);
        for _ in 0..edits {
            let i = if hot.is_empty() || self.below(4) == 0 {
                self.below(data.len() as u64) as usize
            } else {
                let (at, n) = hot[self.below(hot.len() as u64) as usize];
                (at + self.below(n.max(1) as u64) as usize).min(data.len() - 1)
            };
            undo.push((i, data[i]));
            match self.below(5) {
                0 => data[i] ^= 1 << self.below(8),
                1 => data[i] = self.next() as u8,
                2 => data[i] = 0xff,
                3 => data[i] = data[i].wrapping_add(1),
                _ => data[i] = 0,
            }
        }
        undo
    }
}

/// Undo a `mutate_in`, newest edit first.
#[cfg(test)]
pub(crate) fn restore(data: &mut [u8], undo: Vec<(usize, u8)>) {
    for (i, b) in undo.into_iter().rev() {
        data[i] = b;
    }
}

/// An image made by real tools: runs `script` (bash) in a fresh temp dir and returns the
/// bytes of `file` there. The tools (dosfstools, mtools, ntfs-3g, gdisk, fdisk) come from
/// scripts/install-deps.sh.
#[cfg(test)]
pub(crate) fn made_by(script: &str, file: &str) -> Vec<u8> {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("imgengine-made-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let out = std::process::Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(&dir)
        .output()
        .expect("running bash");
    assert!(
        out.status.success(),
        "{script}\nfailed: {}\nrun scripts/install-deps.sh if a tool is missing",
        String::from_utf8_lossy(&out.stderr)
    );
    let data = std::fs::read(dir.join(file)).unwrap();
    std::fs::remove_dir_all(&dir).unwrap();
    data
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_content_is_not_an_error() {
        let zeros = vec![0u8; 8192];
        assert_eq!(
            probe(zeros.as_slice(), 0, 8192).unwrap().kind,
            FsKind::Unknown
        );
        let m = used_map(zeros.as_slice(), 0, 8192).unwrap();
        assert_eq!(m.extents, None);
        assert_eq!(m.used_bytes, 8192);
        // Too small for a boot sector.
        assert_eq!(
            probe(zeros.as_slice(), 0, 100).unwrap().kind,
            FsKind::Unknown
        );
    }

    #[test]
    fn ext_and_swap_signatures() {
        let mut ext = vec![0u8; 8192];
        ext[1024 + 56] = 0x53;
        ext[1024 + 57] = 0xEF;
        ext[1024 + 120..1024 + 124].copy_from_slice(b"root");
        assert_eq!(
            probe(ext.as_slice(), 0, 8192).unwrap(),
            FsProbe {
                kind: FsKind::Ext,
                label: Some("root".into())
            }
        );
        let mut swap = vec![0u8; 8192];
        swap[4086..4096].copy_from_slice(b"SWAPSPACE2");
        assert_eq!(probe(swap.as_slice(), 0, 8192).unwrap().kind, FsKind::Swap);
    }

    #[test]
    fn kind_names_round_trip_through_serde() {
        assert_eq!(FsKind::Fat32.to_string(), "fat32");
        assert_eq!(serde_json::to_string(&FsKind::Ntfs).unwrap(), "\"ntfs\"");
        assert_eq!(
            serde_json::from_str::<FsKind>("\"fat12\"").unwrap(),
            FsKind::Fat12
        );
    }

    #[test]
    fn random_bytes_never_panic() {
        let mut rng = TestRng(0x1234_5678_9abc_def1);
        for _ in 0..2000 {
            let n = rng.below(6000) as usize;
            let data: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
            fuzz_used_map(&data);
        }
    }
}
