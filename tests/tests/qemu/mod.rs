//! Shared by the QEMU suites (qemu_boot.rs, qemu_flash.rs): the kernel cache, the static
//! agent, the initrd built with mkinitrd, QEMU driven through its serial console, and a
//! network namespace that removes itself.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{require_tool, run, sh, workspace_bin, workspace_root};

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

impl Qemu {
    /// How much the console has printed so far (for [`Qemu::wait_for_from`]).
    pub fn mark(&self) -> usize {
        self.out.lock().unwrap().len()
    }

    /// Wait for `needle` printed after `from` (a [`Qemu::mark`]): the same text appears
    /// once per boot when QEMU runs several boots.
    pub fn wait_for_from(&mut self, needle: &str, from: usize, limit: Duration) -> Duration {
        let deadline = Instant::now() + limit;
        let seen = |q: &Qemu| {
            q.out
                .lock()
                .unwrap()
                .get(from..)
                .is_some_and(|t| t.contains(needle))
        };
        loop {
            if seen(self) {
                return self.started.elapsed();
            }
            if Instant::now() > deadline || matches!(self.child.try_wait(), Ok(Some(_))) {
                if seen(self) {
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
}

/// OVMF's firmware files (Debian's `ovmf`).
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";

/// A standalone GRUB EFI image as docs/boot.md builds it: its built-in configuration finds
/// the boot-agent partition by its FAT label and reads the grub.cfg `img -install` wrote;
/// the modules are the ones that configuration uses (`grub::MODULES`).
pub fn standalone_grub(dir: &Path) -> PathBuf {
    require_tool("grub-mkstandalone");
    let embed = dir.join("embed.cfg");
    std::fs::write(
        &embed,
        "search --no-floppy --label --set=root BOOTAGENT\nset prefix=($root)/boot/grub\nconfigfile ($root)/boot/grub/grub.cfg\n",
    )
    .unwrap();
    let efi = dir.join("grubx64.efi");
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
        .arg(format!("--modules={}", grub::MODULES))
        .arg(format!("--install-modules={}", grub::MODULES))
        .arg("-o")
        .arg(&efi)
        .arg(format!("boot/grub/grub.cfg={}", embed.display())));
    efi
}

/// The test guest OS's initrd: a static busybox whose /init prints `GUEST OS <version>
/// reached` on the serial console and powers off.
pub fn guest_initrd(dir: &Path, version: &str) -> PathBuf {
    require_tool("cpio");
    let root = dir.join(format!("guest-root-{version}"));
    let _ = std::fs::remove_dir_all(&root);
    for d in ["bin", "dev", "proc"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is not installed: run `bash scripts/install-deps.sh` as root");
    std::fs::copy(busybox, root.join("bin/busybox")).unwrap();
    let init = root.join("init");
    std::fs::write(
        &init,
        format!(
            "#!/bin/busybox sh\n/bin/busybox mount -t devtmpfs dev /dev\nexec </dev/console >/dev/console 2>&1\n/bin/busybox mount -t proc proc /proc\necho \"GUEST OS {version} reached (uptime $(/bin/busybox cut -d' ' -f1 /proc/uptime) s)\"\n/bin/busybox sync\n/bin/busybox poweroff -f\n"
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&init, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = dir.join(format!("guest-initrd-{version}.cpio"));
    sh(&format!(
        "cd {} && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 > {}",
        root.display(),
        out.display()
    ));
    out
}

/// A device disk: partition 1 the boot-agent partition (40 MiB, `img -install` with a
/// standalone GRUB and `-guest=`), partition 2 a small FAT holding the test guest (the same
/// kernel, [`guest_initrd`]) at /vmlinuz and /initrd.img. Returns the disk's path.
pub fn agent_and_guest_disk(
    dir: &Path,
    name: &str,
    k: &Kernel,
    agent_initrd: &Path,
    agent_cmdline: &str,
    guest_version: &str,
) -> PathBuf {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
    let disk = dir.join(name);
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(72 << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+40M",
            "-t1:ef00",
            "-c1:BOOTAGENT",
            "-n2:0:0",
            "-t2:0700",
            "-c2:GUEST",
        ])
        .arg(&disk));
    let efi = standalone_grub(dir);
    let out = run(Command::new(e2e::img_bin())
        .arg("-install")
        .arg(&disk)
        .arg(format!("-kernel={}", k.vmlinuz.display()))
        .arg(format!("-initrd={}", agent_initrd.display()))
        .arg(format!("-efi={}", efi.display()))
        .arg(format!("-cmdline={agent_cmdline}"))
        .arg("-guest=linux:/vmlinuz,/initrd.img,console=ttyS0 panic=-1 quiet"));
    assert!(String::from_utf8_lossy(&out.stdout).contains("installed the boot agent"));
    write_guest(&disk, dir, k, guest_version);
    disk
}

/// Partition 2 of `disk` (from its GPT): (offset, length) in bytes.
pub fn partition(disk: &Path, n: u32) -> (u64, u64) {
    let info = sh(&format!("sgdisk -i {n} {}", disk.display()));
    let sector = |key: &str| -> u64 {
        let line = info
            .lines()
            .find(|l| l.starts_with(key))
            .unwrap_or_else(|| panic!("{key} missing in {info}"));
        line.split(':')
            .nth(1)
            .unwrap()
            .trim()
            .split(' ')
            .next()
            .unwrap()
            .parse()
            .unwrap()
    };
    let (first, last) = (sector("First sector"), sector("Last sector"));
    (first * 512, (last - first + 1) * 512)
}

/// (Re)write the test guest of version `version` onto partition 2 of `disk`.
pub fn write_guest(disk: &Path, dir: &Path, k: &Kernel, version: &str) {
    let (start, len) = partition(disk, 2);
    let vol = dir.join("guest-vol.img");
    let _ = std::fs::remove_file(&vol);
    std::fs::File::create(&vol).unwrap().set_len(len).unwrap();
    let initrd = guest_initrd(dir, version);
    sh(&format!(
        "mkfs.fat -n GUEST {v} >/dev/null && MTOOLS_SKIP_CHECK=1 mcopy -i {v} {k} ::/vmlinuz && MTOOLS_SKIP_CHECK=1 mcopy -i {v} {i} ::/initrd.img && dd if={v} of={d} bs=512 seek={s} conv=notrunc status=none",
        v = vol.display(),
        k = k.vmlinuz.display(),
        i = initrd.display(),
        d = disk.display(),
        s = start / 512
    ));
}

/// QEMU under OVMF booting `disk` (virtio), no network, serial console on stdio; `vars` is
/// this device's copy of OVMF_VARS (kept between boots like the disk). It reboots as a real
/// device does: QEMU exits only on power-off.
pub fn ovmf_qemu(disk: &Path, vars: &Path) -> Command {
    assert!(
        Path::new(OVMF_CODE).exists(),
        "OVMF is not installed: run `bash scripts/install-deps.sh` as root"
    );
    if !vars.exists() {
        std::fs::copy(OVMF_VARS, vars).unwrap();
    }
    require_tool("qemu-system-x86_64");
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
    ])
    .args(["-serial", "stdio", "-nic", "none"])
    .arg("-drive")
    .arg(format!("if=pflash,format=raw,readonly=on,file={OVMF_CODE}"))
    .arg("-drive")
    .arg(format!("if=pflash,format=raw,file={}", vars.display()))
    .arg("-drive")
    .arg(format!("file={},format=raw,if=virtio", disk.display()));
    cmd
}

/// The boot-agent partition's grubenv as `grub-editenv FILE list` shows it (copied out
/// with mtools first).
pub fn grubenv_list(disk: &Path, dir: &Path) -> String {
    let (start, _) = partition(disk, 1);
    let out = dir.join("grubenv.out");
    let _ = std::fs::remove_file(&out);
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {}@@{} ::/boot/grub/grubenv {} && grub-editenv {} list",
        disk.display(),
        start,
        out.display(),
        out.display()
    ))
}
