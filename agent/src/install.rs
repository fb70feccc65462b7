//! `img -install`: prepare a device's boot-agent partition so it boots the agent.
//!
//! MISSION §3: the first partition of a managed device is a small FAT32 "boot agent"
//! partition holding GRUB, our kernel and initrd. This verb formats that partition (found in
//! the disk's GPT or MBR by number or label) and writes into it, through the `fatfs` crate,
//! without mounting anything, so it works the same on a block device (`/dev/mmcblk0`) and on
//! a disk-image file (a thin-client image being prepared on a build machine):
//!
//! - `/boot/vmlinuz`, `/boot/initrd.img`: the kernel and our initrd;
//! - `/boot/grub/grub.cfg` (and `/EFI/BOOT/grub.cfg` for a standalone EFI GRUB): the
//!   static configuration from the `grub` crate (agent by default, guest OS, console only);
//! - `/boot/grub/grubenv`: a standard 1024-byte GRUB environment block, preallocated so the
//!   one-shot next boot (`next_entry`) is later changed in place (`img -bootnext`, the
//!   agent's hand-over to the guest OS) without touching the file's size or directory entry;
//! - `/EFI/BOOT/BOOTX64.EFI` when `-efi=` names a GRUB EFI image (e.g. made by
//!   `grub-mkstandalone -O x86_64-efi`), so UEFI firmware boots the partition directly.
//!
//! The partition table itself is not changed: partitioning belongs to the image or to
//! `sgdisk`/`sfdisk`, and a wrong table written by a boot-loader installer is the kind of
//! mistake that bricks a room of devices.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::PathBuf;

use anyhow::{bail, Context};

use crate::args::{value, Matches, Opt, UsageError};

pub const USAGE: &str = "\
  -install DISK -kernel=VMLINUZ -initrd=INITRD [-part=N|LABEL] [-cmdline=TEXT] [-efi=GRUBX64.EFI]
        [-guest=chain|linux[:KERNEL[,INITRD[,CMDLINE]]]]
                                    format the boot-agent partition (default 1) as FAT32 and write
                                    the kernel, the initrd, grub.cfg and grubenv into it (no
                                    mounting), with the agent's preallocated store
                                    /AGENT/STATE.DAT (kept when installing again); -guest: how
                                    GRUB starts the OS on partition 2: chain (default; Windows
                                    bootmgfw.efi, else BOOTX64.EFI) or linux (default /vmlinuz,
                                    /initrd.img, root=PARTUUID=.. ro quiet)";

/// The options of `img -install` (`cli::VERBS`).
pub const OPTS: &[Opt] = &[
    value(&["kernel"]),
    value(&["initrd"]),
    value(&["part"]),
    value(&["cmdline"]),
    value(&["efi"]),
    value(&["guest"]),
];

/// `img -install`.
pub fn run(m: Matches) -> anyhow::Result<i32> {
    install(&parse_install(m)?)?;
    Ok(0)
}

/// What `-install` was asked to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstallRequest {
    pub disk: PathBuf,
    pub part: String,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    pub cmdline: String,
    pub efi: Option<PathBuf>,
    pub guest: grub::Guest,
}

/// Default kernel command line: both consoles, reboot 10 s after a kernel panic.
pub const DEFAULT_CMDLINE: &str = "console=tty0 console=ttyS0,115200 panic=10 quiet";

/// Stage two of `img -install`: the request from the matched options.
pub fn parse_install(mut m: Matches) -> Result<InstallRequest, UsageError> {
    let disk = m.operand("DISK, the disk (or disk-image file) to install on")?;
    m.finish()?;
    let needs = |name: &str| {
        m.value(name)
            .map(PathBuf::from)
            .ok_or_else(|| UsageError(format!("-install needs -{name}=FILE")))
    };
    Ok(InstallRequest {
        disk: PathBuf::from(disk),
        part: m.value("part").unwrap_or("1").to_string(),
        kernel: needs("kernel")?,
        initrd: needs("initrd")?,
        cmdline: m.value("cmdline").unwrap_or(DEFAULT_CMDLINE).to_string(),
        efi: m.value("efi").map(PathBuf::from),
        guest: match m.value("guest") {
            Some(v) => grub::Guest::parse(v).map_err(|e| UsageError(format!("-install: {e}")))?,
            None => grub::Guest::Chain,
        },
    })
}

/// A partition of a disk as a file of its own: reads, writes and seeks stay inside
/// `[start, start + len)`, so nothing fatfs does can touch the partition table or the
/// neighbouring OS partition.
pub struct PartitionWindow {
    file: File,
    start: u64,
    len: u64,
    pos: u64,
}

impl PartitionWindow {
    pub fn new(file: File, start: u64, len: u64) -> PartitionWindow {
        PartitionWindow {
            file,
            start,
            len,
            pos: 0,
        }
    }

    fn room(&self, want: usize) -> usize {
        want.min(
            self.len
                .saturating_sub(self.pos)
                .try_into()
                .unwrap_or(usize::MAX),
        )
    }

    fn absolute(&self) -> io::Result<u64> {
        self.start.checked_add(self.pos).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, "partition offset overflows")
        })
    }

    pub fn into_file(self) -> File {
        self.file
    }
}

impl Read for PartitionWindow {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 {
            return Ok(0);
        }
        let n = std::os::unix::fs::FileExt::read_at(&self.file, &mut buf[..n], self.absolute()?)?;
        self.pos += n as u64;
        Ok(n)
    }
}

impl Write for PartitionWindow {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        let n = self.room(buf.len());
        if n == 0 && !buf.is_empty() {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("write past the end of the {}-byte partition", self.len),
            ));
        }
        let n = std::os::unix::fs::FileExt::write_at(&self.file, &buf[..n], self.absolute()?)?;
        self.pos += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

impl Seek for PartitionWindow {
    fn seek(&mut self, to: SeekFrom) -> io::Result<u64> {
        let new = match to {
            SeekFrom::Start(o) => Some(o),
            SeekFrom::End(d) => self.len.checked_add_signed(d),
            SeekFrom::Current(d) => self.pos.checked_add_signed(d),
        };
        match new {
            Some(p) if p <= self.len => {
                self.pos = p;
                Ok(p)
            }
            _ => Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("seek outside the {}-byte partition", self.len),
            )),
        }
    }
}

/// Size of a disk-image file or block device (lseek to the end works for both).
fn disk_size(file: &mut File) -> io::Result<u64> {
    let size = file.seek(SeekFrom::End(0))?;
    file.seek(SeekFrom::Start(0))?;
    Ok(size)
}

/// Format the partition and write the boot files.
pub fn install(req: &InstallRequest) -> anyhow::Result<()> {
    let kernel = std::fs::read(&req.kernel)
        .with_context(|| format!("reading the kernel {}", req.kernel.display()))?;
    let initrd = std::fs::read(&req.initrd)
        .with_context(|| format!("reading the initrd {}", req.initrd.display()))?;
    let efi = match &req.efi {
        Some(p) => Some(
            std::fs::read(p)
                .with_context(|| format!("reading the GRUB EFI image {}", p.display()))?,
        ),
        None => None,
    };
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .open(&req.disk)
        .with_context(|| format!("opening {}", req.disk.display()))?;
    let size = disk_size(&mut file)
        .with_context(|| format!("finding the size of {}", req.disk.display()))?;
    let layout = imgengine::disk::read_layout(&file, size)
        .with_context(|| format!("reading the partition table of {}", req.disk.display()))?;
    let part = layout
        .find(&req.part)
        .with_context(|| format!("finding the boot-agent partition on {}", req.disk.display()))?
        .clone();
    let needed = (kernel.len() + initrd.len() + efi.as_ref().map_or(0, Vec::len)) as u64;
    // FAT overhead and the slack of the last cluster of each file: 1 MiB is plenty.
    if needed.saturating_add(1 << 20) > part.len {
        bail!(
            "partition {} of {} is {} bytes; the kernel, initrd and GRUB need {} bytes plus 1 MiB: make the boot-agent partition larger",
            part.number,
            req.disk.display(),
            part.len,
            needed
        );
    }
    // A re-install keeps the device's state (credential, outbox, URL list, ...).
    let kept_state = read_store_before_format(&req.disk, part.number);
    let mut window = PartitionWindow::new(file, part.start, part.len);
    format_fat(&mut window, part.len).with_context(|| {
        format!(
            "formatting partition {} of {} as FAT",
            part.number,
            req.disk.display()
        )
    })?;
    window.seek(SeekFrom::Start(0))?;
    let cfg = grub::BootConfig::boot_agent(
        "/boot/vmlinuz",
        "/boot/initrd.img",
        &req.cmdline,
        req.guest.clone(),
    )
    .render();
    let grubenv = grub::env::EnvBlock::new(grub::env::STANDARD_SIZE)
        .render()
        .context("making the GRUB environment block")?;
    {
        let fs = fatfs::FileSystem::new(&mut window, fatfs::FsOptions::new())
            .context("opening the new FAT file system")?;
        {
            let root = fs.root_dir();
            let write = |path: &str, data: &[u8]| -> anyhow::Result<()> {
                let mut f = root
                    .create_file(path)
                    .with_context(|| format!("creating {path}"))?;
                f.truncate().with_context(|| format!("truncating {path}"))?;
                f.write_all(data)
                    .with_context(|| format!("writing {path}"))?;
                f.flush().with_context(|| format!("writing {path}"))?;
                Ok(())
            };
            for dir in ["boot", "boot/grub", "EFI", "EFI/BOOT"] {
                root.create_dir(dir)
                    .with_context(|| format!("creating /{dir}"))?;
            }
            write("boot/vmlinuz", &kernel)?;
            write("boot/initrd.img", &initrd)?;
            write("boot/grub/grub.cfg", cfg.as_bytes())?;
            // One grubenv, next to /boot/grub/grub.cfg: both grub.cfg copies name this path.
            write(&grub::ENV_PATH[1..], &grubenv)?;
            // A standalone GRUB EFI image looks for grub.cfg next to itself first.
            write("EFI/BOOT/grub.cfg", cfg.as_bytes())?;
            if let Some(efi) = &efi {
                write("EFI/BOOT/BOOTX64.EFI", efi)?;
            }
            preallocate_store(&root, kept_state.as_deref())?;
        }
        // Counting the free clusters fills in FAT32's FSInfo summary, which unmount writes
        // (a fresh fatfs volume leaves it "unknown", and fsck.fat reports that).
        fs.stats().context("counting free clusters")?;
        fs.unmount().context("closing the FAT file system")?;
    }
    fix_dot_entries(
        &mut window,
        &[
            &["BOOT"],
            &["BOOT", "GRUB"],
            &["EFI"],
            &["EFI", "BOOT"],
            &["AGENT"],
        ],
    )
    .with_context(|| {
        format!(
            "tidying the directories of partition {} of {}",
            part.number,
            req.disk.display()
        )
    })?;
    let file = window.into_file();
    file.sync_all()
        .with_context(|| format!("syncing {}", req.disk.display()))?;
    println!(
        "installed the boot agent on partition {} of {}: kernel {} bytes, initrd {} bytes{}",
        part.number,
        req.disk.display(),
        kernel.len(),
        initrd.len(),
        if efi.is_some() { ", GRUB EFI" } else { "" }
    );
    Ok(())
}

/// The store file of a boot-agent partition that is about to be formatted again, when it
/// has one (`img -install` run a second time on a device keeps its state).
fn read_store_before_format(disk: &std::path::Path, number: u32) -> Option<Vec<u8>> {
    let bp = grub::bootpart::BootPartition::open_number(disk, false, number).ok()?;
    let data = bp.read_file(grub::store::FILE).ok()??;
    (data.len() == grub::store::FILE_LEN && grub::store::newest(&data).is_some()).then_some(data)
}

/// The agent's persistent store (docs/boot.md): `/AGENT/STATE.DAT` created at its full size
/// now, so the agent only ever rewrites its bytes in place (no allocation, no directory
/// update after installation). `kept` is the previous store's content on a re-install.
fn preallocate_store<IO: fatfs::ReadWriteSeek>(
    root: &fatfs::Dir<'_, IO>,
    kept: Option<&[u8]>,
) -> anyhow::Result<()> {
    let dir = grub::store::DIR.trim_start_matches('/');
    root.create_dir(dir)
        .with_context(|| format!("creating /{dir}"))?;
    let path = grub::store::FILE.trim_start_matches('/');
    let mut f = root
        .create_file(path)
        .with_context(|| format!("creating /{path}"))?;
    let zeros = vec![0u8; grub::store::FILE_LEN];
    f.write_all(kept.unwrap_or(&zeros))
        .with_context(|| format!("writing /{path}"))?;
    f.flush().with_context(|| format!("writing /{path}"))?;
    Ok(())
}

/// FAT32 as MISSION §3 asks; a partition too small for FAT32's minimum cluster count
/// (about 32 MiB with 512-byte clusters) gets FAT16, which GRUB, UEFI and Linux read alike.
fn format_fat(window: &mut PartitionWindow, len: u64) -> anyhow::Result<()> {
    let label = *b"BOOTAGENT  ";
    let fat32 = fatfs::FormatVolumeOptions::new()
        .fat_type(fatfs::FatType::Fat32)
        .volume_label(label);
    if len >= 64 << 20 {
        fatfs::format_volume(&mut *window, fat32)?;
        return Ok(());
    }
    window.seek(SeekFrom::Start(0))?;
    match fatfs::format_volume(&mut *window, fat32) {
        Ok(()) => Ok(()),
        Err(_) => {
            window.seek(SeekFrom::Start(0))?;
            fatfs::format_volume(
                &mut *window,
                fatfs::FormatVolumeOptions::new()
                    .fat_type(fatfs::FatType::Fat16)
                    .volume_label(label),
            )?;
            Ok(())
        }
    }
}

/// FAT geometry from the boot sector, as far as directory fixing needs it.
struct FatGeometry {
    cluster_bytes: u64,
    first_data: u64,
    /// FAT12/16: the fixed root directory (offset, bytes); FAT32: None.
    fixed_root: Option<(u64, u64)>,
    root_cluster: u32,
}

impl FatGeometry {
    fn read(w: &mut PartitionWindow) -> io::Result<FatGeometry> {
        let bad = |what: &str| {
            io::Error::new(
                io::ErrorKind::InvalidData,
                format!("FAT boot sector: {what}"),
            )
        };
        let mut bs = [0u8; 512];
        w.seek(SeekFrom::Start(0))?;
        w.read_exact(&mut bs)?;
        let u16_at = |o: usize| u64::from(u16::from_le_bytes([bs[o], bs[o + 1]]));
        let u32_at = |o: usize| u32::from_le_bytes([bs[o], bs[o + 1], bs[o + 2], bs[o + 3]]);
        let bps = u16_at(11);
        let spc = u64::from(bs[13]);
        if !(512..=4096).contains(&bps) || spc == 0 {
            return Err(bad("sector or cluster size"));
        }
        let reserved = u16_at(14);
        let nfats = u64::from(bs[16]);
        let root_entries = u16_at(17);
        let fat_size = if u16_at(22) != 0 {
            u16_at(22)
        } else {
            u64::from(u32_at(36))
        };
        let fats_end = reserved + nfats * fat_size;
        let root_sectors = (root_entries * 32).div_ceil(bps);
        Ok(FatGeometry {
            cluster_bytes: bps * spc,
            first_data: (fats_end + root_sectors) * bps,
            fixed_root: (root_entries != 0).then(|| (fats_end * bps, root_entries * 32)),
            root_cluster: u32_at(44),
        })
    }

    fn cluster_offset(&self, cluster: u32) -> io::Result<u64> {
        u64::from(cluster)
            .checked_sub(2)
            .and_then(|c| c.checked_mul(self.cluster_bytes))
            .and_then(|o| o.checked_add(self.first_data))
            .ok_or_else(|| {
                io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!("FAT cluster {cluster} is out of range"),
                )
            })
    }
}

/// 8.3 directory-entry name of `name` (upper case, space padded).
fn short_name(name: &str) -> [u8; 11] {
    let mut out = [b' '; 11];
    let (base, ext) = name.split_once('.').unwrap_or((name, ""));
    for (i, b) in base.bytes().take(8).enumerate() {
        out[i] = b.to_ascii_uppercase();
    }
    for (i, b) in ext.bytes().take(3).enumerate() {
        out[8 + i] = b.to_ascii_uppercase();
    }
    out
}

/// fatfs 0.3 writes long-name entries in front of a new directory's `.` and `..`, and
/// points a top-level `..` at the FAT32 root cluster instead of 0. Linux, GRUB and UEFI read
/// such a directory, but fsck.fat (rightly, per the FAT specification: `.` and `..` are the
/// first two entries, `..` is 0 for the root) calls it damaged. Rewrite the first four
/// slots of each directory we created as `.`, `..` and two deleted entries.
fn fix_dot_entries(w: &mut PartitionWindow, dirs: &[&[&str]]) -> io::Result<()> {
    let geo = FatGeometry::read(w)?;
    for path in dirs {
        // Walk from the root to the directory, reading the first cluster of each level.
        let (mut off, mut len) = match geo.fixed_root {
            Some(root) => root,
            None => (geo.cluster_offset(geo.root_cluster)?, geo.cluster_bytes),
        };
        let mut cluster = 0u32;
        let mut parent = 0u32;
        for (depth, part) in path.iter().enumerate() {
            let want = short_name(part);
            let mut buf = vec![
                0u8;
                usize::try_from(len)
                    .map_err(|_| io::Error::other("directory too large"))?
            ];
            w.seek(SeekFrom::Start(off))?;
            w.read_exact(&mut buf)?;
            let found = buf
                .chunks_exact(32)
                .find(|e| e[..11] == want && e[11] & 0x10 != 0 && e[11] != 0x0f);
            let Some(e) = found else {
                return Err(io::Error::new(
                    io::ErrorKind::NotFound,
                    format!(
                        "directory {} not found in the new file system",
                        path[..=depth].join("/")
                    ),
                ));
            };
            parent = if depth == 0 { 0 } else { cluster };
            cluster = u32::from(u16::from_le_bytes([e[20], e[21]])) << 16
                | u32::from(u16::from_le_bytes([e[26], e[27]]));
            off = geo.cluster_offset(cluster)?;
            len = geo.cluster_bytes;
        }
        let mut head = [0u8; 128];
        w.seek(SeekFrom::Start(off))?;
        w.read_exact(&mut head)?;
        let (lfn_dot, dot, lfn_dotdot, dotdot) =
            (&head[0..32], &head[32..64], &head[64..96], &head[96..128]);
        let is_lfn = |e: &[u8]| e[11] == 0x0f;
        if !(is_lfn(lfn_dot)
            && dot[..11] == *b".          "
            && is_lfn(lfn_dotdot)
            && dotdot[..11] == *b"..         ")
        {
            continue; // already in the standard form
        }
        let mut fixed = [0u8; 128];
        fixed[0..32].copy_from_slice(dot);
        fixed[32..64].copy_from_slice(dotdot);
        // `..` of a top-level directory is cluster 0, whatever the root's cluster.
        fixed[32 + 20..32 + 22].copy_from_slice(&((parent >> 16) as u16).to_le_bytes());
        fixed[32 + 26..32 + 28].copy_from_slice(&(parent as u16).to_le_bytes());
        fixed[64..96].copy_from_slice(lfn_dot);
        fixed[96..128].copy_from_slice(lfn_dotdot);
        // Deleted entries: first byte 0xE5.
        fixed[64] = 0xe5;
        fixed[96] = 0xe5;
        w.seek(SeekFrom::Start(off))?;
        w.write_all(&fixed)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both stages, as `img -install ...` runs them.
    fn req(v: &[&str]) -> Result<InstallRequest, UsageError> {
        let words: Vec<std::ffi::OsString> = v.iter().map(Into::into).collect();
        parse_install(crate::args::parse("install", OPTS, &words)?)
    }

    #[test]
    fn install_arguments_parse() {
        let r = req(&[
            "/dev/vda",
            "-kernel=/k",
            "--initrd=/i",
            "-part=BOOT",
            "-efi=/g.efi",
        ])
        .unwrap();
        assert_eq!(r.disk, PathBuf::from("/dev/vda"));
        assert_eq!(r.part, "BOOT");
        assert_eq!(r.cmdline, DEFAULT_CMDLINE);
        assert_eq!(r.efi, Some(PathBuf::from("/g.efi")));
        assert_eq!(r.guest, grub::Guest::Chain);
        let r = req(&[
            "d",
            "-kernel=/k",
            "-initrd=/i",
            "-guest=linux:/vmlinuz,/initrd.gz,console=ttyS0 quiet",
        ])
        .unwrap();
        assert_eq!(
            r.guest,
            grub::Guest::Linux {
                kernel: "/vmlinuz".into(),
                initrd: Some("/initrd.gz".into()),
                cmdline: Some("console=ttyS0 quiet".into())
            }
        );
        assert!(req(&["d", "-kernel=/k", "-initrd=/i", "-guest=dos"]).is_err());
        assert!(req(&["/dev/vda", "-kernel=/k"]).is_err());
        assert!(req(&["/dev/vda", "-kernel=/k", "-initrd=/i", "-colour=red"]).is_err());
        assert!(req(&["/dev/vda", "/dev/vdb", "-kernel=/k", "-initrd=/i"]).is_err());
        assert!(
            req(&["-kernel=/k", "-initrd=/i"]).is_err(),
            "DISK is missing"
        );
        assert_eq!(&short_name("grub.cfg"), b"GRUB    CFG");
        assert_eq!(&short_name("EFI"), b"EFI        ");
    }

    #[test]
    fn window_keeps_io_inside_the_partition() {
        let path = std::env::temp_dir().join(format!("install-window-{}", std::process::id()));
        std::fs::write(&path, vec![0xaa; 4096]).unwrap();
        let f = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .unwrap();
        let mut w = PartitionWindow::new(f, 1024, 1024);
        w.write_all(&[1; 1024]).unwrap();
        assert!(w.write_all(&[2]).is_err(), "writing past the end fails");
        assert!(w.seek(SeekFrom::Start(1025)).is_err());
        w.seek(SeekFrom::End(-4)).unwrap();
        let mut b = [0; 8];
        assert_eq!(w.read(&mut b).unwrap(), 4);
        let disk = std::fs::read(&path).unwrap();
        assert!(disk[..1024].iter().all(|&b| b == 0xaa) && disk[2048..].iter().all(|&b| b == 0xaa));
        assert!(disk[1024..2048].iter().all(|&b| b == 1));
        let _ = std::fs::remove_file(&path);
    }
}
