//! NTFS: label and used map from `$Bitmap`, read through the `ntfs` crate (no kernel
//! driver needed, and the crate is `forbid(unsafe_code)` and bounds-checked).
//!
//! `$Bitmap` (MFT record 6) has one bit per cluster of the volume; every cluster NTFS
//! considers in use is set, including `$MFT`, `$MFTMirr`, `$LogFile` and the boot file.
//! What it does not cover is the backup boot sector: NTFS declares one sector fewer than
//! its partition and keeps the backup in the partition's last sector (and mkntfs also
//! writes it right after the declared volume end), so both are added explicitly; without
//! them ntfsfix and Windows' chkdsk complain about the copy.

use ntfs::{KnownNtfsFileRecordNumber, Ntfs, NtfsReadSeek};

use crate::error::Result;
use crate::extent::Extent;
use crate::fs::broken;
use crate::fs::window::Window;
use crate::io::ReadAt;

/// The OEM ID at offset 3 of every NTFS boot sector.
pub(crate) fn looks_like_ntfs(head: &[u8]) -> bool {
    head.len() >= 512 && &head[3..11] == b"NTFS    " && head[510..512] == [0x55, 0xAA]
}

/// The volume label (`$Volume`'s `$VOLUME_NAME`), if the volume parses and has one.
pub(crate) fn read_label(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Option<String> {
    if len < 512 {
        return None;
    }
    let mut win = Window::new(dev, offset, len).zero_padded();
    let ntfs = Ntfs::new(&mut win).ok()?;
    let name = ntfs.volume_name(&mut win)?.ok()?;
    let s = name.name().to_string_lossy();
    (!s.is_empty()).then_some(s)
}

/// How much of `$Bitmap` is read at a time (8 Mi clusters' worth).
const BITMAP_BLOCK: usize = 1 << 20;

/// Used extents (relative to the partition start) of the NTFS at `offset`.
pub fn used_extents(dev: &(impl ReadAt + ?Sized), offset: u64, len: u64) -> Result<Vec<Extent>> {
    if len < 512 {
        return Err(broken(
            "NTFS",
            offset,
            format!("a {len}-byte partition cannot hold a boot sector"),
        ));
    }
    let mut win = Window::new(dev, offset, len).zero_padded();
    let ntfs = Ntfs::new(&mut win).map_err(|e| broken("NTFS", offset, e))?;
    let csize = u64::from(ntfs.cluster_size());
    let ssize = u64::from(ntfs.sector_size());
    let vol = ntfs.size();
    if vol > len {
        return Err(broken(
            "NTFS",
            offset,
            format!("volume of {vol} bytes is larger than its {len}-byte partition"),
        ));
    }
    let clusters = vol / csize;

    let bitmap = ntfs
        .file(&mut win, KnownNtfsFileRecordNumber::Bitmap as u64)
        .map_err(|e| broken("NTFS", offset, format!("$Bitmap: {e}")))?;
    let item = bitmap
        .data(&mut win, "")
        .ok_or_else(|| broken("NTFS", offset, "$Bitmap has no data"))?
        .map_err(|e| broken("NTFS", offset, format!("$Bitmap: {e}")))?;
    let attr = item
        .to_attribute()
        .map_err(|e| broken("NTFS", offset, format!("$Bitmap: {e}")))?;
    let mut value = attr
        .value(&mut win)
        .map_err(|e| broken("NTFS", offset, format!("$Bitmap: {e}")))?;
    if value.len() < clusters.div_ceil(8) {
        return Err(broken(
            "NTFS",
            offset,
            format!("$Bitmap has {} bytes for {clusters} clusters", value.len()),
        ));
    }

    let mut out = Vec::new();
    let mut run: Option<u64> = None;
    let mut buf = vec![0u8; BITMAP_BLOCK];
    let mut cluster = 0u64;
    'read: while cluster < clusters {
        let want = ((clusters - cluster).div_ceil(8)).min(BITMAP_BLOCK as u64) as usize;
        let mut got = 0;
        while got < want {
            let n = value
                .read(&mut win, &mut buf[got..want])
                .map_err(|e| broken("NTFS", offset, format!("reading $Bitmap: {e}")))?;
            if n == 0 {
                break;
            }
            got += n;
        }
        if got == 0 {
            break 'read;
        }
        for &byte in &buf[..got] {
            for bit in 0..8 {
                if cluster >= clusters {
                    break 'read;
                }
                let used = byte & (1 << bit) != 0;
                match (used, run) {
                    (true, None) => run = Some(cluster),
                    (false, Some(s)) => {
                        out.push(Extent::new(s * csize, (cluster - s) * csize));
                        run = None;
                    }
                    _ => {}
                }
                cluster += 1;
            }
        }
    }
    if let Some(s) = run {
        out.push(Extent::new(s * csize, (cluster - s) * csize));
    }
    // Boot sector (cluster 0 is always allocated, but do not rely on a map we just read)
    // and the backup boot sector(s) described in the module docs.
    out.push(Extent::new(0, ssize.max(512)));
    if vol.checked_add(ssize).is_some_and(|end| end <= len) {
        out.push(Extent::new(vol, ssize));
    }
    if len >= ssize {
        out.push(Extent::new(len - len % ssize - ssize, ssize));
    }
    Ok(out)
}

/// Fuzz entry point for the NTFS parser alone.
pub fn fuzz_ntfs(data: &[u8]) {
    let len = data.len() as u64;
    let _ = read_label(data, 0, len);
    if let Ok(ext) = used_extents(data, 0, len) {
        for e in ext {
            assert!(
                e.end().is_some_and(|end| end <= len),
                "extent {e:?} outside the partition"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fs::TestRng;

    /// A small NTFS made by mkntfs with a file from ntfscp, then mutated in the boot
    /// sector and the first MFT records ($MFT, $Volume, $Bitmap).
    #[test]
    fn mutated_mkntfs_volumes_never_panic() {
        let mut img = crate::fs::made_by(
            "truncate -s 2M n.img; mkntfs -F -q -L SMALL n.img >/dev/null 2>&1
             head -c 20000 /dev/zero | tr '\\0' y > f; ntfscp -f n.img f f >/dev/null 2>&1",
            "n.img",
        );
        let len = img.len() as u64;
        let m = crate::fs::used_map(img.as_slice(), 0, len).unwrap();
        assert_eq!(m.kind, crate::fs::FsKind::Ntfs);
        assert_eq!(m.label.as_deref(), Some("SMALL"));
        // MFT position: LCN at 0x30 times the cluster size (sectors/cluster at 0x0D).
        let lcn = u64::from_le_bytes(img[0x30..0x38].try_into().unwrap());
        let mft = (lcn * 512 * u64::from(img[0x0D])) as usize;
        let hot = [(0, 512), (mft, 8 * 1024)];
        // Truncated volumes: the ntfs crate panicked (unreachable!) on end-of-file inside a
        // structure until Window::zero_padded (found by cargo fuzz on the empty input).
        for cut in [
            0,
            1,
            100,
            511,
            512,
            513,
            4096,
            mft,
            mft + 100,
            mft + 1024,
            mft + 6 * 1024 + 7,
            img.len() / 2,
        ] {
            fuzz_ntfs(&img[..cut.min(img.len())]);
            let _ = crate::fs::used_map(&img[..cut.min(img.len())], 0, len);
        }
        let mut rng = TestRng(0x17F5);
        for _ in 0..1500 {
            let undo = rng.mutate_in(&mut img, &hot);
            fuzz_ntfs(&img);
            crate::fs::restore(&mut img, undo);
        }
    }

    #[test]
    fn ntfs_signature_without_a_volume_is_an_error_not_a_panic() {
        let mut img = vec![0u8; 1 << 20];
        img[3..11].copy_from_slice(b"NTFS    ");
        img[510] = 0x55;
        img[511] = 0xAA;
        assert!(looks_like_ntfs(&img));
        let e = crate::fs::used_map(img.as_slice(), 0, img.len() as u64).unwrap_err();
        assert!(e.to_string().contains("-raw"), "{e}");
        let mut rng = TestRng(7);
        for _ in 0..500 {
            let mut m = img.clone();
            rng.mutate(&mut m, 512);
            fuzz_ntfs(&m);
        }
    }
}
