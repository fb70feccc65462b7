//! PID 1 of the initramfs.
//!
//! The kernel starts this binary as `/init` (personality `Init`, STYLE habit 2). Its duties
//! are the ones every init has, and nothing of the imaging work:
//!
//! 1. mount `/proc`, `/sys`, `/dev` (devtmpfs) and `/run`, and make sure stdin/stdout/stderr
//!    are the console;
//! 2. load the kernel modules the initramfs carries (storage and NIC drivers) in dependency
//!    order from `/lib/modules/<version>/modules.dep`, with `finit_module(2)`;
//! 3. read the agent's parameters from the kernel command line ([`BootParams`]), and fill
//!    the agent's directory `/bootagent` from the store on the boot-agent partition
//!    ([`crate::bootstore`]);
//! 4. start the boot agent as a child (this binary again, `argv[0]` = `agent`) and hand the
//!    console to [`crate::console`], which shows what the agent does and opens the `img`
//!    prompt on Esc;
//! 5. reap every orphan (PID 1 inherits them), and never exit: when the agent is done it
//!    syncs and reboots (or powers off, or stays at the console, as the command line says).
//!
//! A panic or a fatal error prints a readable message on the console and reboots after a
//! delay: PID 1 exiting or aborting would be a kernel panic, and a panicking kernel with
//! `panic=0` hangs the device until someone pulls the plug, which for a room of thin clients
//! means nobody.
//!
//! Kernel command-line parameters (all optional; see docs/boot.md):
//!
//! | parameter              | meaning                                                        |
//! |------------------------|----------------------------------------------------------------|
//! | `img.server=URLS`      | server URL list (`;`-separated, MISSION §1 rules), exported as `IMG_SERVER` |
//! | `img.log=LEVEL`        | `error`, `warn`, `info` (default), `debug`, `trace`; `IMG_LOG`  |
//! | `img.console`          | stay at the console: no agent, the `img` prompt at once         |
//! | `img.after=ACTION`     | when the agent finishes: `reboot` (default), `poweroff`, `console` |
//! | `img.delay=SECONDS`    | pause before a reboot after a failure (default 10, max 3600)   |
//! | `img.modules=a,b`      | load only these modules (and their dependencies); `none` for none |
//! | `img.disk=DEVICE`      | the disk the agent images (`IMG_DISK`); default: the fixed disks |
//! | `img.handover=HOW`     | starting the guest OS: `reboot` (default, through GRUB) or `kexec` |

use std::collections::HashMap;
use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::console::Console;

/// Reboot delay after a failure unless `img.delay=` says otherwise: long enough to read the
/// message on the console, short enough that an unattended client retries soon.
pub const DEFAULT_REBOOT_DELAY: Duration = Duration::from_secs(10);
/// Longest delay `img.delay=` may ask for.
const MAX_REBOOT_DELAY: Duration = Duration::from_secs(3600);
/// How long to wait for the disks and NICs of freshly loaded drivers to show up in sysfs.
const DEVICE_SETTLE: Duration = Duration::from_secs(5);
/// Where the initramfs builder puts the kernel modules.
const MODULES_ROOT: &str = "/lib/modules";
/// Where the CA bundle lives in the initramfs (the builder's `--ca`).
const CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";
/// The management server's own CA, when the initramfs carries one (mkinitrd
/// `--file ca.pem:etc/img/server-ca.pem`): the agent then trusts only it (`IMG_CA_FILE`).
const SERVER_CA: &str = "/etc/img/server-ca.pem";
/// Present (with its text) in an initramfs built with `mkinitrd --lab`.
const LAB_BUILD: &str = "/etc/img/lab-build";

/// Exit codes of the agent personality that ask init for something (agent/src/bootagent.rs).
const AGENT_EXIT_CONSOLE: i32 = 10;
const AGENT_EXIT_GUEST_OS: i32 = 11;

/// How the guest OS is started after the agent chose it (`img.handover=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Handover {
    /// Reboot: firmware, GRUB (grubenv's next_entry=guest), the guest's entry.
    Reboot,
    /// kexec the guest's kernel + initrd from partition 2 (a Linux guest); reboot when that
    /// is not possible.
    Kexec,
}

/// What to do when the agent has finished.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAgent {
    Reboot,
    PowerOff,
    Console,
}

/// The agent's parameters from the kernel command line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootParams {
    pub server: Option<String>,
    pub log: String,
    pub stay_at_console: bool,
    pub after: AfterAgent,
    pub reboot_delay: Duration,
    /// `None`: every module the initramfs carries; `Some(list)`: only these (empty: none).
    pub modules: Option<Vec<String>>,
    /// The disk to image (`img.disk=`), for the agent.
    pub disk: Option<String>,
    /// How the guest OS is started (`img.handover=`).
    pub handover: Handover,
    /// Parameters we did not understand, for a warning on the console.
    pub unknown: Vec<String>,
}

impl Default for BootParams {
    fn default() -> Self {
        BootParams {
            server: None,
            log: "info".into(),
            stay_at_console: false,
            after: AfterAgent::Reboot,
            reboot_delay: DEFAULT_REBOOT_DELAY,
            modules: None,
            disk: None,
            handover: Handover::Reboot,
            unknown: Vec::new(),
        }
    }
}

/// Split a kernel command line into words the way the kernel does (lib/cmdline.c,
/// `next_arg`): whitespace separates, double quotes group and are removed, and everything
/// after a lone `--` belongs to init's argv, not to us.
fn cmdline_words(cmdline: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut cur = String::new();
    let mut in_word = false;
    let mut quoted = false;
    for c in cmdline.chars() {
        match c {
            '"' => {
                quoted = !quoted;
                in_word = true;
            }
            c if c.is_whitespace() && !quoted => {
                if in_word {
                    words.push(std::mem::take(&mut cur));
                    in_word = false;
                }
            }
            c => {
                cur.push(c);
                in_word = true;
            }
        }
    }
    if in_word {
        words.push(cur);
    }
    if let Some(i) = words.iter().position(|w| w == "--") {
        words.truncate(i);
    }
    words
}

/// Parse the agent's parameters (`img.*`) from a kernel command line; other parameters are
/// the kernel's and are ignored. Bad values fall back to the defaults and are listed in
/// `unknown`, so a typo never stops a device from booting.
pub fn parse_cmdline(cmdline: &str) -> BootParams {
    let mut p = BootParams::default();
    for word in cmdline_words(cmdline) {
        let Some(param) = word.strip_prefix("img.") else {
            continue;
        };
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (param, None),
        };
        let ok = match (key, value) {
            ("server", Some(v)) if !v.is_empty() => {
                p.server = Some(v.to_owned());
                true
            }
            ("log", Some(v)) if ["error", "warn", "info", "debug", "trace"].contains(&v) => {
                p.log = v.to_owned();
                true
            }
            ("console" | "stay", None | Some("1" | "yes" | "on" | "true")) => {
                p.stay_at_console = true;
                true
            }
            ("console" | "stay", Some("0" | "no" | "off" | "false")) => {
                p.stay_at_console = false;
                true
            }
            ("after", Some(v)) => match v {
                "reboot" => Some(AfterAgent::Reboot),
                "poweroff" => Some(AfterAgent::PowerOff),
                "console" => Some(AfterAgent::Console),
                _ => None,
            }
            .map(|a| p.after = a)
            .is_some(),
            ("delay", Some(v)) => match v.parse::<u64>() {
                Ok(s) if Duration::from_secs(s) <= MAX_REBOOT_DELAY => {
                    p.reboot_delay = Duration::from_secs(s);
                    true
                }
                _ => false,
            },
            ("handover", Some("reboot")) => {
                p.handover = Handover::Reboot;
                true
            }
            ("handover", Some("kexec")) => {
                p.handover = Handover::Kexec;
                true
            }
            ("disk", Some(v)) if v.starts_with('/') => {
                p.disk = Some(v.to_owned());
                true
            }
            ("modules", Some(v)) => {
                p.modules = Some(if v == "none" {
                    Vec::new()
                } else {
                    v.split(',')
                        .filter(|s| !s.is_empty())
                        .map(str::to_owned)
                        .collect()
                });
                true
            }
            _ => false,
        };
        if !ok {
            p.unknown.push(word.clone());
        }
    }
    p
}

impl BootParams {
    /// After the agent chose the guest OS (its next boot is already set): reboot, unless
    /// `img.after=` says to power off or to stay at the console (a technician's setting:
    /// a `reboot` typed there then boots the guest).
    fn after_guest(&self) -> AfterAgent {
        match self.after {
            AfterAgent::PowerOff => AfterAgent::PowerOff,
            AfterAgent::Console => AfterAgent::Console,
            _ => AfterAgent::Reboot,
        }
    }

    /// The environment the agent and the console commands get.
    pub fn agent_env(&self) -> Vec<(&'static str, String)> {
        let mut env = vec![
            ("PATH", "/bin:/sbin".to_owned()),
            ("HOME", "/".to_owned()),
            ("TERM", "linux".to_owned()),
            ("IMG_LOG", self.log.clone()),
        ];
        if let Some(s) = &self.server {
            env.push(("IMG_SERVER", s.clone()));
        }
        if let Some(d) = &self.disk {
            env.push(("IMG_DISK", d.clone()));
        }
        if Path::new(SERVER_CA).exists() {
            env.push(("IMG_CA_FILE", SERVER_CA.to_owned()));
        }
        if Path::new(CA_BUNDLE).exists() {
            env.push(("SSL_CERT_FILE", CA_BUNDLE.to_owned()));
        }
        env
    }
}

/// The kernel interfaces init uses, behind a seam so the boot sequence is tested
/// unprivileged (STYLE habit 7); [`Kernel`] is the real one.
pub trait System {
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        data: Option<&str>,
    ) -> std::io::Result<()>;
    fn load_module(&mut self, path: &Path) -> std::io::Result<()>;
}

/// The real kernel.
pub struct Kernel;

impl System for Kernel {
    fn mount(
        &mut self,
        source: &str,
        target: &str,
        fstype: &str,
        data: Option<&str>,
    ) -> std::io::Result<()> {
        use nix::mount::{mount, MsFlags};
        let _ = std::fs::create_dir_all(target);
        let flags = MsFlags::MS_NOSUID
            | if fstype == "devtmpfs" {
                MsFlags::empty()
            } else {
                MsFlags::MS_NODEV
            };
        match mount(Some(source), target, Some(fstype), flags, data) {
            // Already mounted (the kernel mounts devtmpfs itself with CONFIG_DEVTMPFS_MOUNT
            // on some set-ups): fine.
            Ok(()) | Err(nix::errno::Errno::EBUSY) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    fn load_module(&mut self, path: &Path) -> std::io::Result<()> {
        finit_module(path)
    }
}

/// `finit_module(2)` on a module file. Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`)
/// are handed to the kernel with `MODULE_INIT_COMPRESSED_FILE` (Linux 5.17+) so it
/// decompresses them itself; a module that is already loaded is not an error.
#[allow(unsafe_code)]
fn finit_module(path: &Path) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    /// include/uapi/linux/module.h
    const MODULE_INIT_COMPRESSED_FILE: libc::c_uint = 4;
    let file = std::fs::File::open(path)?;
    let name = path.to_string_lossy();
    let flags = if name.ends_with(".xz") || name.ends_with(".zst") || name.ends_with(".gz") {
        MODULE_INIT_COMPRESSED_FILE
    } else {
        0
    };
    let params = c"";
    // SAFETY: finit_module(fd, param_values, flags) reads the open descriptor and a
    // NUL-terminated parameter string that outlives the call; it touches no memory of ours.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            file.as_raw_fd(),
            params.as_ptr(),
            flags,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = std::io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EEXIST) {
        return Ok(());
    }
    Err(err)
}

/// Step 1: the pseudo file systems, in the order later steps need them.
pub fn mount_pseudo_filesystems(sys: &mut dyn System) -> Result<(), String> {
    let table: [(&str, &str, &str, Option<&str>); 4] = [
        ("proc", "/proc", "proc", None),
        ("sysfs", "/sys", "sysfs", None),
        ("devtmpfs", "/dev", "devtmpfs", Some("mode=0755")),
        ("tmpfs", "/run", "tmpfs", Some("mode=0755")),
    ];
    for (src, target, fstype, data) in table {
        sys.mount(src, target, fstype, data)
            .map_err(|e| format!("mounting {fstype} on {target}: {e}"))?;
    }
    Ok(())
}

/// Step 2: find `modules.dep` under `root` (`/lib/modules/<version>`; the first version
/// found, the initramfs carries one) and the module files in load order.
pub fn module_load_order(root: &Path, only: Option<&[String]>) -> Result<Vec<PathBuf>, String> {
    let Ok(rd) = std::fs::read_dir(root) else {
        return Ok(Vec::new());
    };
    let mut versions: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.join("modules.dep").is_file())
        .collect();
    versions.sort();
    let Some(dir) = versions.into_iter().next() else {
        return Ok(Vec::new());
    };
    let dep_path = dir.join("modules.dep");
    let meta =
        std::fs::metadata(&dep_path).map_err(|e| format!("reading {}: {e}", dep_path.display()))?;
    if meta.len() > initramfs::modules::MAX_MODULES_DEP as u64 {
        return Err(format!(
            "{} is {} bytes, too large to be real",
            dep_path.display(),
            meta.len()
        ));
    }
    let text = std::fs::read_to_string(&dep_path)
        .map_err(|e| format!("reading {}: {e}", dep_path.display()))?;
    let dep =
        initramfs::ModulesDep::parse(&text).map_err(|e| format!("{}: {e}", dep_path.display()))?;
    let order = match only {
        None => dep.full_order(),
        Some(names) => {
            let present: Vec<&String> = names.iter().filter(|n| dep.find(n).is_some()).collect();
            dep.load_order(&present)
        }
    }
    .map_err(|e| format!("{}: {e}", dep_path.display()))?;
    Ok(order.into_iter().map(|p| dir.join(p)).collect())
}

/// Load the modules in order; a module that fails is reported and skipped (a missing NIC
/// driver must not keep the disk driver from loading). Returns (loaded, failures).
pub fn load_modules(sys: &mut dyn System, order: &[PathBuf]) -> (Vec<String>, Vec<String>) {
    let mut loaded = Vec::new();
    let mut failed = Vec::new();
    for path in order {
        let name = initramfs::module_name(&path.to_string_lossy());
        match sys.load_module(path) {
            Ok(()) => loaded.push(name),
            // The two ordinary failures, said plainly: a driver for hardware this machine
            // lacks (hv_vmbus outside Hyper-V), and its dependants' unresolved symbols.
            Err(e) if e.raw_os_error() == Some(libc::ENODEV) => {
                failed.push(format!("{name} (no such hardware)"))
            }
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                failed.push(format!("{name} (needs a module that did not load)"))
            }
            Err(e) => failed.push(format!("{name} ({e})")),
        }
    }
    (loaded, failed)
}

/// What drivers found: block devices and network interfaces, as sysfs lists them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DeviceInventory {
    /// (name, size in bytes)
    pub disks: Vec<(String, u64)>,
    /// (name, MAC address)
    pub nics: Vec<(String, String)>,
}

impl DeviceInventory {
    /// Read `sys` (normally `/sys`): whole disks from `block/` (not loop, ram, zram),
    /// interfaces from `class/net/` except `lo`.
    pub fn read(sys: &Path) -> DeviceInventory {
        let mut inv = DeviceInventory::default();
        let names = |dir: PathBuf| -> Vec<String> {
            let mut v: Vec<String> = std::fs::read_dir(dir)
                .map(|rd| {
                    rd.filter_map(|e| e.ok())
                        .map(|e| e.file_name().to_string_lossy().into_owned())
                        .collect()
                })
                .unwrap_or_default();
            v.sort();
            v
        };
        for name in names(sys.join("block")) {
            if ["loop", "ram", "zram"].iter().any(|p| name.starts_with(p)) {
                continue;
            }
            let sectors: u64 = std::fs::read_to_string(sys.join("block").join(&name).join("size"))
                .ok()
                .and_then(|s| s.trim().parse().ok())
                .unwrap_or(0);
            inv.disks.push((name, sectors.saturating_mul(512)));
        }
        for name in names(sys.join("class/net")) {
            if name == "lo" {
                continue;
            }
            let mac = std::fs::read_to_string(sys.join("class/net").join(&name).join("address"))
                .unwrap_or_default();
            inv.nics.push((name, mac.trim().to_owned()));
        }
        inv
    }

    pub fn describe(&self) -> String {
        let disks: Vec<String> = self
            .disks
            .iter()
            .map(|(n, b)| format!("{n} ({} MiB)", b >> 20))
            .collect();
        let nics: Vec<String> = self
            .nics
            .iter()
            .map(|(n, m)| format!("{n} ({m})"))
            .collect();
        format!(
            "disks: {}; network interfaces: {}",
            if disks.is_empty() {
                "none".into()
            } else {
                disks.join(", ")
            },
            if nics.is_empty() {
                "none".into()
            } else {
                nics.join(", ")
            }
        )
    }
}

/// Exit statuses of reaped children, published by the reaper (PID 1's main thread, which
/// calls `waitpid(-1)` for every child and orphan) to whoever waits for one of its own.
#[derive(Default)]
pub struct Reaper {
    exited: Mutex<HashMap<i32, i32>>,
    changed: Condvar,
}

impl Reaper {
    /// Block until child `pid` has been reaped; its exit code (128 + signal if killed).
    pub fn wait_for(&self, pid: u32) -> i32 {
        let pid = pid as i32;
        let mut map = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(code) = map.remove(&pid) {
                return code;
            }
            map = self.changed.wait(map).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn record(&self, pid: i32, code: i32) {
        let mut map = self.exited.lock().unwrap_or_else(|e| e.into_inner());
        // Orphans nobody waits for would pile up; keep the map small.
        if map.len() > 1024 {
            map.clear();
        }
        map.insert(pid, code);
        self.changed.notify_all();
    }

    /// Reap children forever (the main thread of PID 1).
    fn run(&self) -> ! {
        use nix::sys::wait::{waitpid, WaitStatus};
        loop {
            match waitpid(None, None) {
                Ok(WaitStatus::Exited(pid, code)) => self.record(pid.as_raw(), code),
                Ok(WaitStatus::Signaled(pid, sig, _)) => {
                    self.record(pid.as_raw(), 128 + sig as i32)
                }
                Ok(_) => {}
                // No children at the moment: the console may start one soon.
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }
}

/// How the machine goes down.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    Reboot,
    PowerOff,
}

/// Stop everything, sync, and reboot or power off. Never returns: if the kernel refuses,
/// PID 1 sleeps rather than exit (an exiting init is a kernel panic).
pub fn shutdown(how: Shutdown) -> ! {
    use nix::sys::reboot::{reboot, RebootMode};
    say(match how {
        Shutdown::Reboot => "rebooting",
        Shutdown::PowerOff => "powering off",
    });
    stop_everything();
    let mode = match how {
        Shutdown::Reboot => RebootMode::RB_AUTOBOOT,
        Shutdown::PowerOff => RebootMode::RB_POWER_OFF,
    };
    let Err(e) = reboot(mode);
    say(&format!("the kernel refused to {how:?}: {e}; halting here"));
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// `img.handover=kexec`: load the guest's kernel, clear grubenv's next_entry (the guest's
/// own reboot must come back to the agent) and jump. Returns only when that failed; the
/// caller then reboots through GRUB (next_entry=guest is set again first).
fn kexec_guest(params: &BootParams, console: &Arc<Console>) {
    let disk = params
        .disk
        .as_ref()
        .map(std::path::PathBuf::from)
        .or_else(crate::handover::boot_disk);
    let Some(disk) = disk else {
        say("img.handover=kexec: no boot-agent partition on this device; rebooting instead");
        return;
    };
    match crate::handover::load_guest_kexec(&disk) {
        Ok(g) => say(&format!(
            "kexec: loaded the guest's {} from partition 2",
            g.kernel
        )),
        Err(e) => {
            say(&format!("kexec: {e:#}; rebooting through GRUB instead"));
            return;
        }
    }
    if let Err(e) = crate::handover::set_next_boot(&disk, crate::handover::NextBoot::Agent) {
        say(&format!(
            "kexec: clearing next_entry: {e:#}; rebooting through GRUB instead"
        ));
        return;
    }
    say("kexec: starting the guest OS; press Esc within 1 s for the img prompt instead");
    if console.esc_within(Duration::from_secs(1)) {
        let _ = crate::handover::set_next_boot(&disk, crate::handover::NextBoot::Guest);
        console.stay();
        park_forever();
    }
    stop_everything();
    let Err(e) = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_KEXEC);
    say(&format!(
        "kexec: the kernel refused: {e}; rebooting through GRUB instead"
    ));
    if let Err(e) = crate::handover::set_next_boot(&disk, crate::handover::NextBoot::Guest) {
        say(&format!("kexec: {e:#}"));
    }
}

/// Every process but us: give them a moment to finish writing, stop them, sync.
fn stop_everything() {
    use nix::sys::signal::{kill, Signal};
    use nix::unistd::Pid;
    let _ = kill(Pid::from_raw(-1), Signal::SIGTERM);
    std::thread::sleep(Duration::from_millis(500));
    let _ = kill(Pid::from_raw(-1), Signal::SIGKILL);
    nix::unistd::sync();
}

/// A fatal error: say what happened, wait so it can be read, reboot.
pub fn fatal(msg: &str, delay: Duration) -> ! {
    say(&format!("fatal: {msg}"));
    say(&format!("rebooting in {} s", delay.as_secs()));
    std::thread::sleep(delay);
    shutdown(Shutdown::Reboot)
}

/// One line from init on the console, always shown (the agent's lines go through the
/// console's filter; init's are few and matter when something is wrong).
pub fn say(msg: &str) {
    use std::io::Write;
    let mut err = std::io::stderr().lock();
    let _ = writeln!(err, "init: {msg}");
}

/// Make fds 0, 1, 2 the console. The kernel opens `/dev/console` for us when the
/// initramfs has it; if it did not (no node), open it now that devtmpfs is mounted.
fn console_stdio() {
    use std::os::fd::AsRawFd;
    if nix::fcntl::fcntl(2, nix::fcntl::FcntlArg::F_GETFD).is_ok() {
        return;
    }
    if let Ok(f) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        for fd in 0..3 {
            let _ = nix::unistd::dup2(f.as_raw_fd(), fd);
        }
    }
}

/// PID 1: never returns.
pub fn run_init() -> ! {
    if std::process::id() != 1 {
        eprintln!("init: not process 1; this personality only runs as /init of the initramfs (use `img` instead)");
        std::process::exit(2);
    }
    let mut sys = Kernel;
    // /proc first: the command line (and so the reboot delay) lives there.
    if let Err(e) = mount_pseudo_filesystems(&mut sys) {
        console_stdio();
        fatal(&e, DEFAULT_REBOOT_DELAY);
    }
    console_stdio();
    let params = parse_cmdline(&std::fs::read_to_string("/proc/cmdline").unwrap_or_default());
    let delay = params.reboot_delay;
    std::panic::set_hook(Box::new(move |info| {
        // With panic = "abort" the process would die after this hook and take the kernel
        // with it; reboot from inside the hook instead.
        fatal(&format!("internal error: {info}"), delay);
    }));
    say(&format!(
        "img {} starting as PID 1; mounted /proc /sys /dev /run",
        env!("CARGO_PKG_VERSION")
    ));
    for u in &params.unknown {
        say(&format!("ignoring kernel parameter {u} (see docs/boot.md)"));
    }
    if let Some(line) = lab_build_line(Path::new(LAB_BUILD)) {
        say(&line);
    }

    let order = module_load_order(Path::new(MODULES_ROOT), params.modules.as_deref())
        .unwrap_or_else(|e| {
            say(&format!("not loading modules: {e}"));
            Vec::new()
        });
    let started = Instant::now();
    let (loaded, failed) = load_modules(&mut sys, &order);
    say(&format!(
        "loaded {} kernel modules in {} ms: {}",
        loaded.len(),
        started.elapsed().as_millis(),
        loaded.join(" ")
    ));
    if !failed.is_empty() {
        say(&format!("modules not loaded: {}", failed.join(", ")));
    }
    let inv = settle_devices();
    say(&inv.describe());
    // The agent's directory comes from the store on the boot-agent partition (or stays in
    // RAM when the device has none, e.g. booted over PXE without one).
    let disk_names: Vec<String> = inv.disks.iter().map(|(n, _)| n.clone()).collect();
    say(&crate::bootstore::materialise_at_boot(
        params.disk.as_deref(),
        &disk_names,
    ));

    let reaper = Arc::new(Reaper::default());
    let console = Arc::new(Console::new(params.agent_env()));
    if params.stay_at_console {
        console.stay();
    }
    console.watch_keys(reaper.clone());
    {
        let reaper = reaper.clone();
        let params = params.clone();
        std::thread::Builder::new()
            .name("agent".into())
            .spawn(move || supervise(&params, &console, &reaper))
            .unwrap_or_else(|e| fatal(&format!("starting the agent thread: {e}"), delay));
    }
    reaper.run()
}

/// The line a lab initramfs (`mkinitrd --lab`) prints at every boot; None for a
/// production one.
fn lab_build_line(marker: &Path) -> Option<String> {
    let t = std::fs::read_to_string(marker).ok()?;
    Some(format!("LAB BUILD: {}", t.trim()))
}

/// Wait (up to [`DEVICE_SETTLE`]) until the freshly loaded drivers have registered at least
/// one disk and one NIC, or nothing changes any more.
fn settle_devices() -> DeviceInventory {
    let start = Instant::now();
    let mut last = DeviceInventory::read(Path::new("/sys"));
    while start.elapsed() < DEVICE_SETTLE && (last.disks.is_empty() || last.nics.is_empty()) {
        std::thread::sleep(Duration::from_millis(100));
        last = DeviceInventory::read(Path::new("/sys"));
    }
    last
}

/// Nothing left for this thread to do; the console and the reaper carry on.
fn park_forever() -> ! {
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

/// The agent's life: start it, show its output, act on its end.
fn supervise(params: &BootParams, console: &Arc<Console>, reaper: &Reaper) {
    if params.stay_at_console {
        say("img.console: staying at the console; type img commands, `reboot` or `poweroff`");
        park_forever();
    }
    let code = match console.start_agent(Vec::<OsString>::new()) {
        Ok(pid) => {
            say(&format!(
                "agent started (pid {pid}); press Esc for the img prompt"
            ));
            reaper.wait_for(pid)
        }
        Err(e) => {
            say(&format!("cannot start the agent: {e}"));
            1
        }
    };
    console.wait_prompt_closed();
    let action = match code {
        0 => {
            say("agent finished");
            params.after
        }
        AGENT_EXIT_CONSOLE => {
            say("the agent hands over to the console");
            AfterAgent::Console
        }
        AGENT_EXIT_GUEST_OS => {
            // The agent has set grubenv's next_entry=guest (or found no boot-agent
            // partition): a reboot takes the device to its OS; img.handover=kexec goes there
            // directly when the guest is Linux.
            if params.handover == Handover::Kexec && params.after_guest() == AfterAgent::Reboot {
                kexec_guest(params, console);
            }
            say("booting the guest OS on flash (through a reboot)");
            params.after_guest()
        }
        _ => {
            say(&format!("agent stopped with exit code {code}"));
            AfterAgent::Reboot
        }
    };
    if action == AfterAgent::Console {
        say("staying at the console: press any key for the img prompt");
        console.stay();
        park_forever();
    }
    let delay = if code == 0 || code == AGENT_EXIT_GUEST_OS {
        Duration::from_secs(1)
    } else {
        params.reboot_delay
    };
    let (how, verb) = match action {
        AfterAgent::PowerOff => (Shutdown::PowerOff, "powering off"),
        _ => (Shutdown::Reboot, "rebooting"),
    };
    say(&format!(
        "{verb} in {} s; press Esc for the img prompt instead",
        delay.as_secs()
    ));
    if console.esc_within(delay) {
        console.stay();
        park_forever();
    }
    shutdown(how)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_lab_initramfs_says_so_at_boot() {
        let d = std::env::temp_dir().join(format!("img-init-lab-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let marker = d.join("lab-build");
        assert_eq!(lab_build_line(&marker), None);
        std::fs::write(&marker, initramfs::LAB_BUILD_TEXT).unwrap();
        let line = lab_build_line(&marker).unwrap();
        assert!(
            line.starts_with("LAB BUILD: ") && line.contains("mkinitrd --lab"),
            "{line}"
        );
        std::fs::remove_dir_all(d).unwrap();
    }

    #[test]
    fn after_the_guest_is_chosen_img_after_still_holds_poweroff_and_console() {
        let after = |c: &str| parse_cmdline(c).after_guest();
        assert_eq!(after("quiet"), AfterAgent::Reboot);
        assert_eq!(after("img.after=reboot"), AfterAgent::Reboot);
        assert_eq!(after("img.after=poweroff"), AfterAgent::PowerOff);
        assert_eq!(after("img.after=console"), AfterAgent::Console);
    }

    #[test]
    fn cmdline_defaults_when_nothing_is_ours() {
        let p = parse_cmdline("BOOT_IMAGE=/vmlinuz root=/dev/vda1 console=ttyS0 quiet\n");
        assert_eq!(p, BootParams::default());
    }

    #[test]
    fn cmdline_reads_every_parameter() {
        let p = parse_cmdline(
            "console=ttyS0 img.server=\"https://srv.example:8443; http://10.0.0.1:80\" img.log=debug \
             img.console img.after=poweroff img.delay=30 img.modules=virtio_blk,virtio_net img.disk=/dev/vda img.handover=kexec",
        );
        assert_eq!(
            p.server.as_deref(),
            Some("https://srv.example:8443; http://10.0.0.1:80")
        );
        assert_eq!(p.log, "debug");
        assert!(p.stay_at_console);
        assert_eq!(p.after, AfterAgent::PowerOff);
        assert_eq!(p.handover, Handover::Kexec);
        assert_eq!(
            parse_cmdline("img.handover=teleport").handover,
            Handover::Reboot
        );
        assert_eq!(
            parse_cmdline("img.handover=teleport").unknown,
            ["img.handover=teleport"]
        );
        assert_eq!(p.reboot_delay, Duration::from_secs(30));
        assert_eq!(
            p.modules,
            Some(vec!["virtio_blk".to_string(), "virtio_net".to_string()])
        );
        assert_eq!(p.disk.as_deref(), Some("/dev/vda"));
        assert!(p
            .agent_env()
            .contains(&("IMG_DISK", "/dev/vda".to_string())));
        assert!(p.unknown.is_empty());
    }

    #[test]
    fn cmdline_bad_values_fall_back_and_are_listed() {
        let p = parse_cmdline("img.log=loud img.delay=99999 img.after=dance img.frobnicate=1 img.console=0 img.modules=none");
        assert_eq!(p.log, "info");
        assert_eq!(p.reboot_delay, DEFAULT_REBOOT_DELAY);
        assert_eq!(p.after, AfterAgent::Reboot);
        assert!(!p.stay_at_console);
        assert_eq!(p.modules, Some(vec![]));
        assert_eq!(
            p.unknown,
            [
                "img.log=loud",
                "img.delay=99999",
                "img.after=dance",
                "img.frobnicate=1"
            ]
        );
    }

    #[test]
    fn cmdline_after_double_dash_is_not_ours() {
        let p = parse_cmdline("quiet -- img.console");
        assert!(!p.stay_at_console);
        assert_eq!(cmdline_words("a \"b c\" d"), ["a", "b c", "d"]);
    }

    #[test]
    fn agent_env_carries_server_and_log() {
        let p = parse_cmdline("img.server=http://10.0.2.2:8080 img.log=warn");
        let env = p.agent_env();
        assert!(env.contains(&("IMG_SERVER", "http://10.0.2.2:8080".to_string())));
        assert!(env.contains(&("IMG_LOG", "warn".to_string())));
    }

    /// Records what init asks of the kernel.
    #[derive(Default)]
    struct FakeKernel {
        calls: Vec<String>,
        refuse: Option<&'static str>,
    }

    impl System for FakeKernel {
        fn mount(
            &mut self,
            source: &str,
            target: &str,
            fstype: &str,
            _data: Option<&str>,
        ) -> std::io::Result<()> {
            self.calls.push(format!("mount {source} {target} {fstype}"));
            Ok(())
        }
        fn load_module(&mut self, path: &Path) -> std::io::Result<()> {
            let name = initramfs::module_name(&path.to_string_lossy());
            self.calls.push(format!("insmod {name}"));
            if self.refuse == Some(name.as_str()) {
                return Err(std::io::Error::from_raw_os_error(libc::ENODEV));
            }
            Ok(())
        }
    }

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("agent-init-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn pseudo_filesystems_are_mounted_in_order() {
        let mut k = FakeKernel::default();
        mount_pseudo_filesystems(&mut k).unwrap();
        assert_eq!(
            k.calls,
            [
                "mount proc /proc proc",
                "mount sysfs /sys sysfs",
                "mount devtmpfs /dev devtmpfs",
                "mount tmpfs /run tmpfs"
            ]
        );
    }

    #[test]
    fn modules_load_in_dependency_order_and_failures_do_not_stop_the_rest() {
        let root = scratch("modules");
        let dir = root.join("6.1.0-test");
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(
            dir.join("modules.dep"),
            "kernel/virtio_net.ko: kernel/net_failover.ko kernel/failover.ko kernel/virtio.ko kernel/virtio_ring.ko\n\
             kernel/net_failover.ko: kernel/failover.ko\nkernel/failover.ko:\nkernel/virtio.ko: kernel/virtio_ring.ko\n\
             kernel/virtio_ring.ko:\nkernel/virtio_blk.ko: kernel/virtio.ko kernel/virtio_ring.ko\n",
        )
        .unwrap();
        let order = module_load_order(&root, None).unwrap();
        let mut k = FakeKernel {
            refuse: Some("net_failover"),
            ..Default::default()
        };
        let (loaded, failed) = load_modules(&mut k, &order);
        let pos = |m: &str| {
            k.calls
                .iter()
                .position(|c| c == &format!("insmod {m}"))
                .unwrap()
        };
        assert!(pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_blk"));
        assert!(pos("failover") < pos("net_failover") && pos("net_failover") < pos("virtio_net"));
        assert_eq!(loaded.len(), 5);
        assert_eq!(failed.len(), 1);
        assert_eq!(failed, ["net_failover (no such hardware)"]);

        let only = module_load_order(
            &root,
            Some(&["virtio_blk".to_string(), "e1000e".to_string()]),
        )
        .unwrap();
        assert_eq!(
            only.len(),
            3,
            "virtio_blk with its two dependencies; e1000e absent"
        );
        assert!(module_load_order(&root.join("missing"), None)
            .unwrap()
            .is_empty());
        let _ = std::fs::remove_dir_all(&root);
    }

    #[test]
    fn inventory_lists_disks_and_nics_from_sysfs() {
        let sys = scratch("sysfs");
        for (dev, size) in [("vda", "2097152"), ("loop0", "0"), ("sr0", "0")] {
            std::fs::create_dir_all(sys.join("block").join(dev)).unwrap();
            std::fs::write(sys.join("block").join(dev).join("size"), size).unwrap();
        }
        for (nic, mac) in [("lo", "00:00:00:00:00:00"), ("eth0", "52:54:00:12:34:56")] {
            std::fs::create_dir_all(sys.join("class/net").join(nic)).unwrap();
            std::fs::write(
                sys.join("class/net").join(nic).join("address"),
                format!("{mac}\n"),
            )
            .unwrap();
        }
        let inv = DeviceInventory::read(&sys);
        assert_eq!(
            inv.disks,
            [("sr0".to_string(), 0), ("vda".to_string(), 1 << 30)]
        );
        assert_eq!(
            inv.nics,
            [("eth0".to_string(), "52:54:00:12:34:56".to_string())]
        );
        assert!(inv.describe().contains("vda (1024 MiB)"));
        let _ = std::fs::remove_dir_all(&sys);
    }

    #[test]
    fn reaper_hands_exit_codes_to_waiters() {
        let r = Arc::new(Reaper::default());
        let r2 = r.clone();
        let t = std::thread::spawn(move || r2.wait_for(42));
        std::thread::sleep(Duration::from_millis(20));
        r.record(42, 3);
        assert_eq!(t.join().unwrap(), 3);
        assert!(
            r.exited.lock().unwrap().is_empty(),
            "a status is handed out once"
        );
    }
}
