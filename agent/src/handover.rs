//! The hand-over to the guest OS, and `img -bootnext`.
//!
//! GRUB's configuration on the boot-agent partition is static (grub crate): every boot runs
//! the agent unless grubenv's `next_entry` names another entry for one boot. So "boot the
//! guest OS" (no work, after a deploy, no server and no key at the 5-second question) is:
//! write `next_entry=guest` into grubenv, then reboot; GRUB clears it and boots the guest,
//! and the guest's next reboot comes back to the agent.
//!
//! grubenv is changed in place only: the same 1024 bytes, through
//! [`grub::bootpart::BootPartition::overwrite_in_place`], which writes the file's clusters
//! and never its directory entry, the FAT or the volume's dirty flag. The variables sit in
//! the block's first sector, so a power cut during the write leaves the old or the new
//! block (a torn block fails GRUB's signature check or its `save_env` and boots the agent:
//! the safe side).
//!
//! With `img.handover=kexec` and a Linux guest (`img -install -guest=linux:...`), init loads
//! the guest's kernel and initrd from partition 2 with `kexec_file_load` and jumps to it
//! without going through the firmware and GRUB again; any failure falls back to the reboot.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use grub::bootpart::BootPartition;
use grub::env::EnvBlock;

use crate::args::{value, Matches, Opt, UsageError};

pub const USAGE: &str = "\
  -bootnext [guest|agent|console] [-disk=DISK]
                                    the device's next boot, once (GRUB's grubenv next_entry on the
                                    boot-agent partition, rewritten in place); without a value:
                                    show it and grubenv's contents. DISK: IMG_DISK, else the disk
                                    holding the boot-agent partition";

/// The options of `img -bootnext` (`cli::VERBS`).
pub const OPTS: &[Opt] = &[value(&["disk"])];

/// `img -bootnext`.
pub fn run(m: Matches) -> anyhow::Result<i32> {
    bootnext(&parse_bootnext(m)?)?;
    Ok(0)
}

/// Where the next boot goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NextBoot {
    Agent,
    Guest,
    Console,
}

impl NextBoot {
    pub fn parse(s: &str) -> Option<NextBoot> {
        match s {
            "agent" => Some(NextBoot::Agent),
            "guest" => Some(NextBoot::Guest),
            "console" => Some(NextBoot::Console),
            _ => None,
        }
    }

    /// The grub.cfg entry id.
    pub fn id(self) -> &'static str {
        match self {
            NextBoot::Agent => grub::AGENT_ID,
            NextBoot::Guest => grub::GUEST_ID,
            NextBoot::Console => grub::CONSOLE_ID,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootNextRequest {
    /// `None`: show.
    pub next: Option<NextBoot>,
    pub disk: Option<PathBuf>,
}

/// Stage two of `img -bootnext`: at most one of guest, agent, console.
pub fn parse_bootnext(mut m: Matches) -> Result<BootNextRequest, UsageError> {
    let next = match m.optional_operand() {
        None => None,
        Some(s) => Some(NextBoot::parse(&s).ok_or_else(|| {
            UsageError(format!("-bootnext: {s:?} is not guest, agent or console"))
        })?),
    };
    if let Some(s) = m.values.first() {
        return Err(UsageError(format!(
            "-bootnext: one of guest, agent, console (got {s} too)"
        )));
    }
    Ok(BootNextRequest {
        next,
        disk: m.value("disk").map(PathBuf::from),
    })
}

/// The disk whose boot-agent partition holds grubenv: `IMG_DISK`, else the first disk of
/// this machine with a boot-agent partition that has grubenv. `None`: there is none (a
/// PXE-booted device).
pub fn boot_disk() -> Option<PathBuf> {
    if let Some(d) = std::env::var_os("IMG_DISK").filter(|d| !d.is_empty()) {
        return Some(PathBuf::from(d));
    }
    let mut names: Vec<String> = std::fs::read_dir("/sys/block")
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| {
            !["loop", "ram", "zram", "sr", "fd", "dm-", "md"]
                .iter()
                .any(|p| n.starts_with(p))
        })
        .collect();
    names.sort();
    names
        .into_iter()
        .map(|n| PathBuf::from("/dev").join(n))
        .find(|d| {
            BootPartition::open(d, false)
                .and_then(|bp| bp.file_len(grub::ENV_PATH))
                .is_ok_and(|len| len.is_some())
        })
}

/// What grubenv holds, for `img -bootnext`, `img -dump` and the agent's messages.
pub struct EnvState {
    pub partition: String,
    pub bytes: Vec<u8>,
}

impl EnvState {
    pub fn read(disk: &Path) -> anyhow::Result<EnvState> {
        let bp = BootPartition::open(disk, false)?;
        let bytes = bp.read_file(grub::ENV_PATH)?.with_context(|| {
            format!(
                "{} has no {}: run img -install again (it preallocates one)",
                bp.describe(),
                grub::ENV_PATH
            )
        })?;
        Ok(EnvState {
            partition: bp.describe(),
            bytes,
        })
    }

    /// "guest" / "agent (default)" and so on: what GRUB will boot next.
    pub fn next_boot(&self) -> String {
        match EnvBlock::parse_lenient(&self.bytes) {
            Err(e) => format!("agent (grubenv is unreadable to GRUB: {e})"),
            Ok((b, _)) => match b.get("next_entry") {
                Some(v) if !v.is_empty() => {
                    let v = String::from_utf8_lossy(v);
                    if NextBoot::parse(&v).is_some() {
                        format!("{v} (once)")
                    } else {
                        format!("agent (next_entry={v:?} is no entry of grub.cfg)")
                    }
                }
                _ => "agent (default)".into(),
            },
        }
    }

    /// A human summary: the next boot and the variables (or why the block is damaged).
    pub fn describe(&self) -> String {
        let mut s = format!(
            "grubenv {} on {}: {} bytes\nnext boot: {}\n",
            grub::ENV_PATH,
            self.partition,
            self.bytes.len(),
            self.next_boot()
        );
        match EnvBlock::parse_lenient(&self.bytes) {
            Ok((b, broken)) => {
                for line in b.list().lines() {
                    s.push_str(&format!("  {line}\n"));
                }
                if let Some(e) = broken {
                    s.push_str(&format!("  ({e})\n"));
                }
            }
            Err(e) => s.push_str(&format!("  ({e})\n")),
        }
        s
    }
}

/// Set (or, for the agent, clear) grubenv's `next_entry` on `disk`, in place. A damaged
/// block is replaced by a fresh one of the same size (it would boot the agent anyway).
/// Returns what was done, for the console.
pub fn set_next_boot(disk: &Path, next: NextBoot) -> anyhow::Result<String> {
    let mut bp = BootPartition::open(disk, true)?;
    let old = bp.read_file(grub::ENV_PATH)?.with_context(|| {
        format!(
            "{} has no {}: run img -install again (it preallocates one)",
            bp.describe(),
            grub::ENV_PATH
        )
    })?;
    let mut note = String::new();
    let mut block = match EnvBlock::parse(&old) {
        Ok(b) => b,
        Err(e) => {
            note = format!(" (it was damaged: {e}; rewritten as a fresh block)");
            EnvBlock::new(old.len())
        }
    };
    match next {
        NextBoot::Agent => {
            block.unset("next_entry");
        }
        other => block
            .set("next_entry", other.id().as_bytes())
            .context("setting next_entry in grubenv")?,
    }
    let new = block.render().context("writing grubenv")?;
    if new.len() != old.len() {
        bail!(
            "{} on {} is {} bytes, too small for a GRUB environment block: run img -install again",
            grub::ENV_PATH,
            bp.describe(),
            old.len()
        );
    }
    if new != old {
        bp.overwrite_in_place(grub::ENV_PATH, 0, &new)
            .context("rewriting grubenv in place")?;
        let back = BootPartition::open(disk, false)?.read_file(grub::ENV_PATH)?;
        if back.as_deref() != Some(new.as_slice()) {
            bail!(
                "grubenv on {} reads back differently after the write",
                bp.describe()
            );
        }
    }
    Ok(format!(
        "next boot: {} ({} on {}){note}",
        match next {
            NextBoot::Agent => "agent (default)",
            NextBoot::Guest => "guest, once",
            NextBoot::Console => "console, once",
        },
        grub::ENV_PATH,
        bp.describe()
    ))
}

fn bootnext(r: &BootNextRequest) -> anyhow::Result<()> {
    let disk = match &r.disk {
        Some(d) => d.clone(),
        None => boot_disk().context(
            "no disk with a boot-agent partition and grubenv found: name it with -disk=DISK",
        )?,
    };
    match r.next {
        None => print!("{}", EnvState::read(&disk)?.describe()),
        Some(n) => println!("{}", set_next_boot(&disk, n)?),
    }
    Ok(())
}

/// The agent's hand-over: the next boot goes to the guest OS. `Ok(false)` when this device
/// has no boot-agent partition (PXE): the reboot then goes wherever the firmware's boot
/// order says, as before.
pub fn prepare_guest_boot() -> anyhow::Result<bool> {
    let has_env = |d: &Path| {
        BootPartition::open(d, false)
            .and_then(|bp| bp.file_len(grub::ENV_PATH))
            .is_ok_and(|len| len.is_some())
    };
    let Some(disk) = boot_disk().filter(|d| has_env(d)) else {
        eprintln!("agent: no boot-agent partition with grubenv on this device (a PXE boot?): rebooting; the firmware's boot order decides what starts");
        return Ok(false);
    };
    let msg = set_next_boot(&disk, NextBoot::Guest)
        .with_context(|| format!("handing over to the guest OS on {}", disk.display()))?;
    eprintln!("agent: handing over to the guest OS: {msg}");
    Ok(true)
}

/// The guest's `linux`/`initrd` lines from the `guest` entry of grub.cfg, for kexec.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GuestKernel {
    pub kernel: String,
    pub initrd: Option<String>,
    pub cmdline: String,
}

/// Find the guest entry's kernel in grub.cfg's text; refused when the entry chain-loads or
/// its command line needs GRUB to expand variables.
pub fn guest_kernel(cfg: &str) -> anyhow::Result<GuestKernel> {
    let start = cfg
        .find(&format!("--id '{}' {{", grub::GUEST_ID))
        .context("grub.cfg has no guest entry")?;
    let body = &cfg[start..];
    let body = &body[..body.find("\n}").unwrap_or(body.len())];
    let mut kernel = None;
    let mut initrd = None;
    for line in body.lines().map(str::trim) {
        if let Some(rest) = line.strip_prefix("linux ") {
            let (k, c) = rest.split_once(' ').unwrap_or((rest, ""));
            kernel = Some((k.to_owned(), c.trim().to_owned()));
        } else if let Some(i) = line.strip_prefix("initrd ") {
            initrd = Some(i.trim().to_owned());
        }
    }
    let (kernel, cmdline) = kernel.context(
        "the guest entry of grub.cfg chain-loads: kexec needs a Linux guest (img -install -guest=linux:...)",
    )?;
    if cmdline.contains('$') {
        bail!("the guest's command line uses GRUB variables ({cmdline}): kexec needs -guest=linux:KERNEL,INITRD,CMDLINE");
    }
    Ok(GuestKernel {
        kernel,
        initrd,
        cmdline,
    })
}

/// Load the guest's kernel for kexec: grub.cfg from the boot-agent partition, the kernel
/// and initrd from partition 2 (FAT, read with fatfs). After this, `reboot(RB_KEXEC)`
/// starts it.
pub fn load_guest_kexec(disk: &Path) -> anyhow::Result<GuestKernel> {
    use std::io::Read;
    let bp = BootPartition::open(disk, false)?;
    let cfg = bp
        .read_file("/boot/grub/grub.cfg")?
        .context("the boot-agent partition has no /boot/grub/grub.cfg")?;
    let g = guest_kernel(&String::from_utf8_lossy(&cfg))?;
    let mut file =
        std::fs::File::open(disk).with_context(|| format!("opening {}", disk.display()))?;
    let size = std::io::Seek::seek(&mut file, std::io::SeekFrom::End(0))?;
    let layout = imgengine::disk::read_layout(&file, size)
        .with_context(|| format!("reading the partition table of {}", disk.display()))?;
    let p2 = layout
        .find("2")
        .context("no partition 2 (the guest OS)")?
        .clone();
    let mut window = crate::install::PartitionWindow::new(file, p2.start, p2.len);
    let fs = fatfs::FileSystem::new(&mut window, fatfs::FsOptions::new()).context(
        "partition 2 is not FAT: kexec reads the guest's kernel from a FAT partition only",
    )?;
    let read = |path: &str| -> anyhow::Result<std::fs::File> {
        let mut data = Vec::new();
        fs.root_dir()
            .open_file(path.trim_start_matches('/'))
            .with_context(|| format!("opening {path} on partition 2"))?
            .read_to_end(&mut data)
            .with_context(|| format!("reading {path} on partition 2"))?;
        // kexec_file_load takes file descriptors: an unlinked file in /run (tmpfs).
        let dir = if Path::new("/run").is_dir() {
            PathBuf::from("/run")
        } else {
            std::env::temp_dir()
        };
        let tmp = dir.join(format!("kexec-{}", std::process::id()));
        std::fs::write(&tmp, &data)?;
        let f = std::fs::File::open(&tmp)?;
        let _ = std::fs::remove_file(&tmp);
        Ok(f)
    };
    let kernel = read(&g.kernel)?;
    let initrd = g.initrd.as_deref().map(read).transpose()?;
    let cmdline = std::ffi::CString::new(g.cmdline.clone()).context("command line has a NUL")?;
    kexec_file_load(&kernel, initrd.as_ref(), &cmdline)?;
    Ok(g)
}

#[allow(unsafe_code)]
fn kexec_file_load(
    kernel: &std::fs::File,
    initrd: Option<&std::fs::File>,
    cmdline: &std::ffi::CStr,
) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd;
    const KEXEC_FILE_NO_INITRAMFS: libc::c_ulong = 4;
    let (initrd_fd, flags) = match initrd {
        Some(f) => (f.as_raw_fd(), 0),
        None => (-1, KEXEC_FILE_NO_INITRAMFS),
    };
    let bytes = cmdline.to_bytes_with_nul();
    // SAFETY: the fds are open for the call's duration; the command line is a valid
    // NUL-terminated buffer of the length given.
    let r = unsafe {
        libc::syscall(
            libc::SYS_kexec_file_load,
            kernel.as_raw_fd(),
            initrd_fd,
            bytes.len() as libc::c_ulong,
            bytes.as_ptr(),
            flags,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error())
            .context("kexec_file_load (the kernel needs CONFIG_KEXEC_FILE)");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Both stages, as `img -bootnext ...` runs them.
    fn parse(v: &[&str]) -> Result<BootNextRequest, UsageError> {
        let words: Vec<std::ffi::OsString> = v.iter().map(Into::into).collect();
        parse_bootnext(crate::args::parse("bootnext", OPTS, &words)?)
    }

    #[test]
    fn bootnext_arguments_parse() {
        let r = parse(&["guest", "-disk=/dev/vda"]).unwrap();
        assert_eq!(r.next, Some(NextBoot::Guest));
        assert_eq!(r.disk, Some(PathBuf::from("/dev/vda")));
        assert_eq!(parse(&[]).unwrap().next, None);
        assert_eq!(
            parse(&["--disk=d.img", "console"]).unwrap().next,
            Some(NextBoot::Console)
        );
        for bad in [
            &["windows"][..],
            &["guest", "agent"],
            &["-disk"],
            &["-part=1"],
        ] {
            assert!(parse(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn guest_kernel_comes_from_the_guest_entry_only() {
        let g = grub::Guest::parse("linux:/vmlinuz,/initrd.img,console=ttyS0 quiet").unwrap();
        let cfg =
            grub::BootConfig::boot_agent("/boot/vmlinuz", "/boot/initrd.img", "img.x", g).render();
        assert_eq!(
            guest_kernel(&cfg).unwrap(),
            GuestKernel {
                kernel: "/vmlinuz".into(),
                initrd: Some("/initrd.img".into()),
                cmdline: "console=ttyS0 quiet".into()
            }
        );
        let chain = grub::BootConfig::boot_agent("/k", "/i", "", grub::Guest::Chain).render();
        assert!(guest_kernel(&chain)
            .unwrap_err()
            .to_string()
            .contains("chain-loads"));
        let probe =
            grub::BootConfig::boot_agent("/k", "/i", "", grub::Guest::parse("linux").unwrap())
                .render();
        assert!(guest_kernel(&probe).is_err());
    }
}
