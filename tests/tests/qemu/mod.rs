//! Shared by the QEMU suites (qemu_boot.rs, qemu_flash.rs, qemu_pxe.rs): the kernel cache, the static
//! agent, the initrd built with mkinitrd, QEMU driven through its serial console, and a
//! network namespace that removes itself.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{require_tool, run, sh, workspace_bin, workspace_root};

pub mod life;

/// A boot under TCG takes about 5 s; iPXE's TFTP of a 14 MiB kernel a little more.
pub const BOOT_TIMEOUT: Duration = Duration::from_secs(120);

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
        .args(extra)
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

/// The static busybox of the test guests' initrds (package busybox-static).
pub fn busybox() -> &'static str {
    ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static is not installed: run `bash scripts/install-deps.sh` as root")
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
    std::fs::copy(busybox(), root.join("bin/busybox")).unwrap();
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

// ---------------------------------------------------------------------------------------
// PXE pieces (qemu_pxe.rs; reusable by any suite that boots a device from the network).

/// OVMF's code image (read-only) and a fresh copy of its variable store in `dir`:
/// the `-drive if=pflash` arguments.
pub fn ovmf_args(dir: &Path) -> Vec<String> {
    let code = Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    assert!(
        code.exists(),
        "OVMF is not installed: run `bash scripts/install-deps.sh` as root"
    );
    let vars = dir.join("ovmf-vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    vec![
        "-drive".into(),
        format!("if=pflash,format=raw,readonly=on,file={}", code.display()),
        "-drive".into(),
        format!("if=pflash,format=raw,file={}", vars.display()),
    ]
}

/// A UEFI disk that boots on its own: GPT with one EFI system partition (FAT16, 32 MiB)
/// holding `/EFI/BOOT/BOOTX64.EFI`, a standalone GRUB whose built-in configuration prints
/// `marker` and powers off. `size` bytes in all.
pub fn uefi_marker_disk(path: &Path, size: u64, marker: &str) {
    for t in ["sgdisk", "mkfs.fat", "mmd", "mcopy", "grub-mkstandalone"] {
        require_tool(t);
    }
    let work = path.with_extension("parts");
    std::fs::create_dir_all(&work).unwrap();
    let cfg = work.join("marker.cfg");
    std::fs::write(&cfg, format!("echo {marker}\nhalt\n")).unwrap();
    let efi = work.join("BOOTX64.EFI");
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
        .args(["--modules=echo halt", "--install-modules=echo halt normal"])
        .arg("-o")
        .arg(&efi)
        .arg(format!("boot/grub/grub.cfg={}", cfg.display())));
    std::fs::File::create(path).unwrap().set_len(size).unwrap();
    e2e::sh(&format!(
        "export MTOOLS_SKIP_CHECK=1
         sgdisk -n 1:2048:+32M -t 1:ef00 -c 1:ESP {p} >/dev/null
         mkfs.fat -F 16 -n ESP --offset 2048 {p} 32768 >/dev/null
         mmd -i {p}@@1048576 ::EFI ::EFI/BOOT
         mcopy -i {p}@@1048576 {efi} ::EFI/BOOT/BOOTX64.EFI",
        p = path.display(),
        efi = efi.display()
    ));
    let _ = std::fs::remove_dir_all(&work);
}

/// A BIOS disk that boots on its own: an MBR boot sector (assembled here with binutils)
/// that writes `marker` to the first serial port and halts.
pub fn bios_marker_disk(path: &Path, size: u64, marker: &str) {
    require_tool("as");
    require_tool("ld");
    let work = path.with_extension("mbr");
    std::fs::create_dir_all(&work).unwrap();
    let src = work.join("mbr.S");
    std::fs::write(
        &src,
        format!(
            ".code16\n.globl _start\n_start:\n cli\n xor %ax, %ax\n mov %ax, %ds\n cld\n\
             mov $msg, %si\n mov $0x3f8, %dx\n1:\n lodsb\n test %al, %al\n jz 2f\n out %al, (%dx)\n jmp 1b\n\
             2:\n hlt\n jmp 2b\nmsg: .asciz \"{marker}\\r\\n\"\n.org 510\n.word 0xaa55\n"
        ),
    )
    .unwrap();
    let obj = work.join("mbr.o");
    let bin = work.join("mbr.bin");
    run(Command::new("as").arg("--32").arg("-o").arg(&obj).arg(&src));
    run(Command::new("ld")
        .args([
            "-m",
            "elf_i386",
            "-Ttext",
            "0x7c00",
            "--oformat",
            "binary",
            "-o",
        ])
        .arg(&bin)
        .arg(&obj));
    let sector = std::fs::read(&bin).unwrap();
    assert_eq!(sector.len(), 512, "boot sector is {} bytes", sector.len());
    let mut f = std::fs::File::create(path).unwrap();
    f.write_all(&sector).unwrap();
    f.set_len(size).unwrap();
    let _ = std::fs::remove_dir_all(&work);
}

/// Text a child process writes to a pipe, collected by a thread.
#[derive(Clone, Default)]
pub struct Log(Arc<Mutex<String>>);

impl Log {
    pub fn collect(mut r: impl Read + Send + 'static) -> Log {
        let log = Log::default();
        let sink = log.0.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = r.read(&mut buf) {
                if n == 0 {
                    break;
                }
                sink.lock()
                    .unwrap()
                    .push_str(&String::from_utf8_lossy(&buf[..n]));
            }
        });
        log
    }

    pub fn text(&self) -> String {
        self.0.lock().unwrap().clone()
    }

    /// Wait until `needle` shows up; panics with the log after `limit`.
    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while !self.text().contains(needle) {
            assert!(
                Instant::now() < end,
                "`{needle}` not logged; log:\n{}",
                e2e::tail(&self.text(), 40)
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// A PXE network: a network namespace with a bridge (`server_ip`/24) and a tap for QEMU,
/// dnsmasq as DHCP + TFTP with the shipped `pxe/dnsmasq-dhcp.conf` (addresses replaced),
/// serving `tftp_root`. Its log (leases, options, TFTP transfers) is kept.
pub struct PxeLan {
    pub ns: Netns,
    pub server_ip: String,
    dnsmasq: Option<Child>,
    pub dnsmasq_log: Log,
}

impl PxeLan {
    /// `net` is the first three octets, e.g. `10.77.0`; the server is `.1`.
    pub fn start(name: &str, net: &str, dir: &Path, tftp_root: &Path) -> PxeLan {
        require_tool("dnsmasq");
        require_tool("ip");
        let ns = Netns(format!("{name}{}", std::process::id()));
        let server_ip = format!("{net}.1");
        run(Command::new("ip").args(["netns", "add", &ns.0]));
        for cmd in [
            "link set lo up".to_string(),
            "link add br0 type bridge".into(),
            format!("addr add {server_ip}/24 dev br0"),
            "link set br0 up".into(),
            "tuntap add dev tap0 mode tap".into(),
            "link set tap0 master br0".into(),
            "link set tap0 up".into(),
        ] {
            run(Command::new("ip")
                .args(["netns", "exec", &ns.0, "ip"])
                .args(cmd.split_whitespace()));
        }
        let conf = std::fs::read_to_string(workspace_root().join("pxe/dnsmasq-dhcp.conf"))
            .unwrap()
            .replace("interface=eth0", "interface=br0")
            .replace("192.168.1.100,192.168.1.200", &format!("{net}.50,{net}.99"))
            .replace("192.168.1.10", &server_ip)
            .replace("/srv/tftp", &tftp_root.display().to_string());
        let conf_path = dir.join("dnsmasq.conf");
        std::fs::write(&conf_path, conf).unwrap();
        let mut child = Command::new("ip")
            .args(["netns", "exec", &ns.0, "dnsmasq"])
            .args([
                "--keep-in-foreground",
                "--log-dhcp",
                "--log-facility=-",
                "--port=0",
            ])
            .arg(format!("--conf-file={}", conf_path.display()))
            .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
            .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting dnsmasq");
        let log = Log::collect(child.stderr.take().unwrap());
        let lan = PxeLan {
            ns,
            server_ip,
            dnsmasq: Some(child),
            dnsmasq_log: log,
        };
        lan.dnsmasq_log
            .wait_for("TFTP root is", Duration::from_secs(20));
        lan
    }

    /// A command run inside the namespace.
    pub fn cmd(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns.0]).arg(program);
        c
    }

    /// The TFTP transfers dnsmasq logged ("sent /path/file to ADDR"), file names only.
    pub fn tftp_sent(&self) -> Vec<String> {
        self.dnsmasq_log
            .text()
            .lines()
            .filter(|l| l.contains("dnsmasq-tftp") && l.contains(" sent "))
            .filter_map(|l| {
                let path = l.split(" sent ").nth(1)?.split(" to ").next()?;
                Some(path.rsplit('/').next()?.to_string())
            })
            .collect()
    }

    /// QEMU in the namespace: q35, TCG, 512 MiB, serial on stdio, `-no-reboot`, the NIC on
    /// the tap with `mac` and boot index 1 (network first, as a PXE fleet is set up). The
    /// NIC's option ROM is iPXE (QEMU's default) under SeaBIOS and OVMF alike; OVMF's own
    /// network stack (its PXE and HTTP boot over IPv4 and IPv6) is switched off, as on a thin
    /// client with one network boot entry, so the next boot option after the network is the
    /// disk (OVMF's PXEv6 and HTTPv6 entries would otherwise wait out their timeouts first).
    pub fn qemu(&self, mac: &str) -> Command {
        let mut cmd = self.cmd("qemu-system-x86_64");
        cmd.args([
            "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
        ])
        .args(["-serial", "stdio", "-no-reboot"]);
        cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
        cmd.args([
            "-device",
            &format!("virtio-net-pci,netdev=n0,mac={mac},bootindex=1"),
        ]);
        for knob in [
            "IPv4PXESupport",
            "IPv6PXESupport",
            "IPv4Support",
            "IPv6Support",
        ] {
            cmd.arg("-fw_cfg")
                .arg(format!("name=opt/org.tianocore/{knob},string=no"));
        }
        cmd
    }
}

impl Drop for PxeLan {
    fn drop(&mut self) {
        if let Some(mut c) = self.dnsmasq.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// A disk as the second boot device (`bootindex=2`, after the network).
pub fn disk_args(disk: &Path, bootindex: u32) -> Vec<String> {
    vec![
        "-drive".into(),
        format!("file={},format=raw,if=none,id=d0", disk.display()),
        "-device".into(),
        format!("virtio-blk-pci,drive=d0,bootindex={bootindex}"),
    ]
}

/// The TFTP root of docs/boot.md: Debian's iPXE for PXE ROMs that are not iPXE, and the
/// shipped generic `pxe/boot.ipxe` with the server's PXE URL and the menu wait set.
pub fn pxe_tftp_root(dir: &Path, pxe_url: &str, menu_ms: u32) -> PathBuf {
    let tftp = dir.join("tftp");
    std::fs::create_dir_all(&tftp).unwrap();
    for rom in ["undionly.kpxe", "ipxe.efi"] {
        let src = Path::new("/usr/lib/ipxe").join(rom);
        assert!(
            src.exists(),
            "{} missing: run `bash scripts/install-deps.sh` as root",
            src.display()
        );
        std::fs::copy(&src, tftp.join(rom)).unwrap();
    }
    let script = std::fs::read_to_string(workspace_root().join("pxe/boot.ipxe")).unwrap();
    for line in [
        "set img-pxe http://192.168.1.10:8080/pxe",
        "set img-menu-ms 2000",
    ] {
        assert!(
            script.contains(line),
            "pxe/boot.ipxe no longer has `{line}`, which this harness sets"
        );
    }
    let script = script
        .replace(
            "set img-pxe http://192.168.1.10:8080/pxe",
            &format!("set img-pxe {pxe_url}"),
        )
        .replace(
            "set img-menu-ms 2000",
            &format!("set img-menu-ms {menu_ms}"),
        );
    std::fs::write(tftp.join("boot.ipxe"), script).unwrap();
    tftp
}

/// The reference server inside a [`PxeLan`]: `imgserver --data DATA serve ARGS`, its log
/// (stderr: one line per PXE answer and per kernel/initrd sent) kept; killed on drop.
pub struct LanServer {
    child: Child,
    pub log: Log,
}

impl LanServer {
    pub fn start(lan: &PxeLan, data: &Path, args: &[&str]) -> LanServer {
        let mut child = lan
            .cmd(e2e::imgserver_bin())
            .arg("--data")
            .arg(data)
            .arg("serve")
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("starting imgserver");
        let log = Log::collect(child.stderr.take().unwrap());
        let out = Log::collect(child.stdout.take().unwrap());
        out.wait_for("listening on", Duration::from_secs(30));
        if args.contains(&"--pxe-listen") {
            out.wait_for("pxe listening on", Duration::from_secs(30));
        }
        LanServer { child, log }
    }

    /// The PXE answers logged for `mac`, in order (`... -> imaging agent` / `-> local disk`).
    pub fn pxe_answers(&self, mac: &str) -> Vec<String> {
        self.log
            .text()
            .lines()
            .filter(|l| l.starts_with(&format!("imgserver: pxe {mac}:")))
            .map(str::to_string)
            .collect()
    }

    /// How many times the server sent the agent's kernel or initrd.
    pub fn agent_files_sent(&self) -> usize {
        self.log
            .text()
            .lines()
            .filter(|l| l.starts_with("imgserver: pxe: sending "))
            .count()
    }
}

impl Drop for LanServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
