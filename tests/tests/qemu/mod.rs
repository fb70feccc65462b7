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
    initrd_with(dir, k, &[])
}

/// The same with more mkinitrd options (e.g. `--trusted KEY.pub`).
pub fn initrd_with(dir: &Path, k: &Kernel, extra: &[&std::ffi::OsStr]) -> PathBuf {
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
        .arg("/etc/ssl/certs/ca-certificates.crt")
        .args(extra));
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
