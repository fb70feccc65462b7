//! Shared by the QEMU suites (qemu_boot.rs, qemu_flash.rs): the kernel cache, the static
//! agent, the initrd built with mkinitrd, QEMU driven through its serial console, and a
//! network namespace that removes itself.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{require_tool, run, workspace_bin, workspace_root};

/// A boot under TCG takes about 5 s; iPXE's TFTP of a 14 MiB kernel a little more.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

pub fn quick() -> bool {
    if std::env::var_os("QUICK").is_some() {
        eprintln!("QUICK is set: skipping the QEMU boot test");
        return true;
    }
    false
}

/// The kernel cache: vmlinuz and lib/modules/<version>.
pub struct Kernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
}

pub fn kernel() -> Kernel {
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    let cache = workspace_root().join("target/kernel");
    run(Command::new("bash")
        .arg(workspace_root().join("scripts/fetch-kernel.sh"))
        .arg(&cache));
    let version = std::fs::read_to_string(cache.join("version"))
        .expect("kernel version")
        .trim()
        .to_owned();
    Kernel {
        vmlinuz: cache.join("vmlinuz"),
        modules: cache.join("modules/lib/modules").join(version),
    }
}

/// The static agent: `$IMG_STATIC_BIN`, else the release musl build (what scripts/test.sh
/// builds first; a no-op here then).
pub fn static_agent() -> PathBuf {
    if let Some(p) = std::env::var_os("IMG_STATIC_BIN") {
        return PathBuf::from(p);
    }
    static LOCK: Mutex<()> = Mutex::new(());
    let _g = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    run(Command::new(env!("CARGO"))
        .args([
            "build",
            "-q",
            "--release",
            "--target",
            "x86_64-unknown-linux-musl",
            "-p",
            "agent",
        ])
        .current_dir(workspace_root()));
    workspace_root().join("target/x86_64-unknown-linux-musl/release/img")
}

/// Build the initrd with the real builder (mkinitrd), as an administrator would.
pub fn initrd(dir: &Path, k: &Kernel) -> PathBuf {
    let out = dir.join("initrd.img");
    let mkinitrd = workspace_bin("mkinitrd", "initramfs");
    let o = run(Command::new(mkinitrd)
        .arg("-o")
        .arg(&out)
        .arg("--agent")
        .arg(static_agent())
        .arg("--kernel-modules")
        .arg(&k.modules)
        .arg("--ca")
        .arg("/etc/ssl/certs/ca-certificates.crt"));
    eprint!("{}", String::from_utf8_lossy(&o.stdout));
    out
}

/// QEMU with its serial console on a pipe: a reader thread collects everything it prints.
pub struct Qemu {
    child: Child,
    stdin: Option<ChildStdin>,
    out: Arc<Mutex<String>>,
    started: Instant,
}

impl Qemu {
    pub fn start(mut cmd: Command) -> Qemu {
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let stdin = child.stdin.take();
        let mut stdout = child.stdout.take().expect("piped stdout");
        let out = Arc::new(Mutex::new(String::new()));
        let sink = out.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = stdout.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        Qemu {
            child,
            stdin,
            out,
            started: Instant::now(),
        }
    }

    pub fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    /// Wait for `needle` on the console; the time since QEMU started when it appeared.
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        loop {
            if self.text().contains(needle) {
                return self.started.elapsed();
            }
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                // One last look: QEMU may have printed it just before exiting.
                if self.text().contains(needle) {
                    return self.started.elapsed();
                }
                panic!(
                    "`{needle}` did not appear on the serial console; console so far:\n{}",
                    e2e::tail(&self.text(), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn send(&mut self, s: &str) {
        let stdin = self.stdin.as_mut().expect("stdin");
        stdin.write_all(s.as_bytes()).unwrap();
        stdin.flush().unwrap();
    }

    /// Wait for QEMU to exit by itself (the guest rebooted or powered off under `-no-reboot`).
    pub fn wait_exit(&mut self, limit: Duration) {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "QEMU did not stop; console:\n{}",
            e2e::tail(&self.text(), 40)
        );
    }
}

impl Drop for Qemu {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The common QEMU command line: q35, TCG, 512 MiB, serial console on stdio, no reboot.
pub fn qemu_base() -> Command {
    require_tool("qemu-system-x86_64");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
    ])
    .args(["-serial", "stdio", "-no-reboot"]);
    cmd
}

pub fn disk_file(dir: &Path) -> PathBuf {
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 << 20)
        .unwrap();
    disk
}

/// Remove the network namespace even when the test fails.
pub struct Netns(pub String);

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "delete", &self.0])
            .status();
    }
}

// ---- The device's whole life (qemu_life.rs): reboots that keep the disk, a guest OS. ----

impl Qemu {
    /// Everything the console printed so far, saved to `path` (one file per boot).
    pub fn save_log(&self, path: &Path) {
        let _ = std::fs::write(path, self.text());
    }

    /// Power cut: QEMU is killed at once, as when the plug is pulled (nothing is flushed by
    /// the guest; QEMU writes the disk image without a host cache of its own).
    pub fn power_cut(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The time since QEMU started.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Whether QEMU has exited (the guest powered off or rebooted under `-no-reboot`).
    pub fn exited(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(Some(_)))
    }
}

/// OVMF's code (read-only) and a fresh copy of its variable store for one device; the
/// variable store is kept between the boots of that device like its disk.
pub fn ovmf(dir: &Path) -> (PathBuf, PathBuf) {
    let code = PathBuf::from("/usr/share/OVMF/OVMF_CODE_4M.fd");
    assert!(
        code.exists(),
        "OVMF is not installed: run `bash scripts/install-deps.sh` as root"
    );
    let vars = dir.join("ovmf-vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    (code, vars)
}

/// A newc cpio archive (what the kernel unpacks as an initramfs) from `(path, mode, data)`
/// entries; character devices are `(path, 0o020600, major << 8 | minor as bytes "")` with
/// the device number in `rdev`. Written here so a test needs neither root nor mknod.
pub struct Cpio(Vec<u8>, u32);

impl Cpio {
    pub fn new() -> Cpio {
        Cpio(Vec::new(), 1)
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) {
        let ino = self.1;
        self.1 += 1;
        let hdr = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0,
            0,
            1,
            0,
            data.len(),
            0,
            0,
            rdev.0,
            rdev.1,
            name.len() + 1,
            0
        );
        self.0.extend_from_slice(hdr.as_bytes());
        self.0.extend_from_slice(name.as_bytes());
        self.0.push(0);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
        self.0.extend_from_slice(data);
        while self.0.len() % 4 != 0 {
            self.0.push(0);
        }
    }

    pub fn dir(&mut self, name: &str) -> &mut Cpio {
        self.entry(name, 0o040755, (0, 0), &[]);
        self
    }

    pub fn file(&mut self, name: &str, mode: u32, data: &[u8]) -> &mut Cpio {
        self.entry(name, 0o100000 | mode, (0, 0), data);
        self
    }

    pub fn char_dev(&mut self, name: &str, major: u32, minor: u32) -> &mut Cpio {
        self.entry(name, 0o020600, (major, minor), &[]);
        self
    }

    pub fn finish(mut self) -> Vec<u8> {
        self.entry("TRAILER!!!", 0, (0, 0), &[]);
        while self.0.len() % 512 != 0 {
            self.0.push(0);
        }
        self.0
    }
}

/// The guest OS of the whole-life tests: Debian's kernel and a tiny initramfs whose `/init`
/// (static busybox) prints `GUEST OS v<version>` and powers the machine off. The marker is
/// only in the initramfs, so seeing it on the console proves this guest was booted.
pub fn guest_initrd(dir: &Path, version: &str) -> PathBuf {
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.is_file())
        .expect("busybox missing: run `bash scripts/install-deps.sh` as root (busybox-static)");
    let script = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         echo \"GUEST OS v{version} up (uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime) s)\"\n\
         /bin/busybox sync\n\
         /bin/busybox poweroff -f\n"
    );
    let mut c = Cpio::new();
    c.dir("bin")
        .dir("dev")
        .dir("proc")
        .char_dev("dev/console", 5, 1)
        .file("bin/busybox", 0o755, &std::fs::read(busybox).unwrap())
        .file("init", 0o755, script.as_bytes())
        .file(
            "VERSION.TXT",
            0o644,
            format!("guest {version}\n").as_bytes(),
        );
    let out = dir.join(format!("guest-initrd-v{version}.img"));
    std::fs::write(&out, c.finish()).unwrap();
    out
}
