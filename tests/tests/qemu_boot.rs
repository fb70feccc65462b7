//! Boots the agent for real: a Debian kernel (linux-image-cloud-amd64, fetched by
//! scripts/fetch-kernel.sh) with our initramfs under QEMU (TCG: no KVM on these machines),
//! driven by waiting for lines on the serial console, as u-root and rauc test boot code.
//!
//! - `pid1_mounts_loads_virtio_and_finds_disk_and_nic`: `-kernel`/`-initrd`, the agent as
//!   `/init`; PID 1 mounts, loads the virtio modules in modules.dep order, sees the virtio
//!   disk and NIC, starts the agent; Esc gives the `img>` prompt while the agent works and
//!   `reboot` there reboots cleanly (QEMU `-no-reboot` then exits).
//! - `console_prompt_runs_img_commands`: `img.console` on the kernel command line gives the
//!   `img>` prompt; typed command lines run `img` (this binary re-executed).
//! - PXE (dnsmasq, iPXE, the server's `/pxe/boot.ipxe?mac=` answer, work / no work) is
//!   tested in qemu_pxe.rs.
//! - `device_gets_lease_finds_server_checks_in_deploys_and_reboots`: the whole loop with
//!   dnsmasq (options 186/192) and the reference server in a network namespace.
//!
//! These take tens of seconds each: they are `#[ignore]`d, and
//! scripts/test.sh runs them with `--ignored` (`QUICK=1` skips them and says so).

mod qemu;

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use e2e::{require_tool, run, workspace_bin, Scratch};
use qemu::{disk_file, initrd, kernel, qemu_base, Netns, Qemu, BOOT_TIMEOUT};

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_boot -- --ignored"]
fn pid1_mounts_loads_virtio_and_finds_disk_and_nic() {
    let dir = Scratch::new("qemu-pid1");
    let k = kernel();
    let initrd = initrd(dir.path(), &k);
    let disk = disk_file(dir.path());
    let mut cmd = qemu_base();
    cmd.arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd);
    cmd.args([
        "-append",
        "console=ttyS0 panic=-1 img.delay=1 img.log=debug img.server=http://10.0.2.2:9",
    ]);
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()));
    cmd.args(["-nic", "user,model=virtio-net-pci,mac=52:54:00:12:34:56"]);
    let mut q = Qemu::start(cmd);
    let t_kernel = q.wait_for("Linux version", BOOT_TIMEOUT);
    let t_init = q.wait_for(
        "starting as PID 1; mounted /proc /sys /dev /run",
        BOOT_TIMEOUT,
    );
    q.wait_for("kernel modules in", BOOT_TIMEOUT);
    let console = q.text();
    let modules_line = console
        .lines()
        .find(|l| l.contains("kernel modules in"))
        .unwrap()
        .to_owned();
    for m in [
        "virtio_ring",
        "virtio",
        "virtio_pci_modern_dev",
        "virtio_pci",
        "virtio_blk",
        "failover",
        "net_failover",
        "virtio_net",
    ] {
        assert!(
            modules_line.split_whitespace().any(|w| w == m),
            "{m} not loaded: {modules_line}"
        );
    }
    let pos = |m: &str| {
        modules_line
            .split_whitespace()
            .position(|w| w == m)
            .unwrap()
    };
    assert!(
        pos("virtio_ring") < pos("virtio") && pos("virtio") < pos("virtio_blk"),
        "{modules_line}"
    );
    assert!(pos("net_failover") < pos("virtio_net"), "{modules_line}");
    q.wait_for("disks: vda (64 MiB)", BOOT_TIMEOUT);
    q.wait_for("eth0 (52:54:00:12:34:56)", BOOT_TIMEOUT);
    let t_agent = q.wait_for("agent started", BOOT_TIMEOUT);
    // The agent keeps trying its unreachable server; the operator presses Esc, gets the img
    // prompt while it works, and reboots the clean way from there.
    q.send("\x1b");
    q.wait_for("-- img console", Duration::from_secs(30));
    q.send("reboot\r");
    q.wait_for("init: rebooting", Duration::from_secs(30));
    q.wait_exit(Duration::from_secs(60));
    let console = q.text();
    assert!(
        !console.contains("Kernel panic"),
        "{}",
        e2e::tail(&console, 30)
    );
    eprintln!(
        "boot figures (TCG): kernel banner at {:.1} s, PID 1 at {:.1} s, agent started at {:.1} s after QEMU start",
        t_kernel.as_secs_f64(),
        t_init.as_secs_f64(),
        t_agent.as_secs_f64()
    );
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_boot -- --ignored"]
fn console_prompt_runs_img_commands() {
    let dir = Scratch::new("qemu-console");
    let k = kernel();
    let initrd = initrd(dir.path(), &k);
    let disk = disk_file(dir.path());
    let mut cmd = qemu_base();
    cmd.arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd);
    cmd.args(["-append", "console=ttyS0 panic=-1 quiet img.console"]);
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()));
    let mut q = Qemu::start(cmd);
    q.wait_for("staying at the console", BOOT_TIMEOUT);
    q.wait_for("img> ", BOOT_TIMEOUT);
    q.send("img -version\r");
    q.wait_for(
        &format!("img {}", env!("CARGO_PKG_VERSION")),
        Duration::from_secs(30),
    );
    // A quoted argument and a failing command: the exit code is shown, the prompt stays.
    q.send("img -info '/no such image'\r");
    q.wait_for("(exit code", Duration::from_secs(30));
    q.send("exit\r");
    q.wait_for("staying at the console", Duration::from_secs(10));
    q.send("poweroff\r");
    q.wait_for("init: powering off", Duration::from_secs(30));
    q.wait_exit(Duration::from_secs(60));
}

/// The image every loop test deploys: a GPT disk with a FAT16 partition holding
/// VERSION.TXT = `os 2.1` and some noise, captured by `img -make` as os 2.1.
fn capture_test_image(dir: &Scratch) -> std::path::PathBuf {
    let src = dir.join("source.img");
    e2e::sh(&format!(
        "cd {d}; export MTOOLS_SKIP_CHECK=1; echo 'os 2.1' > VERSION.TXT; head -c 300000 /dev/urandom > BLOB.BIN
         truncate -s 48M {src}
         sgdisk -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {src} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {src} 32768 >/dev/null
         mcopy -i {src}@@1048576 VERSION.TXT ::VERSION.TXT
         mcopy -i {src}@@1048576 BLOB.BIN ::BLOB.BIN",
        d = dir.path().display(),
        src = src.display()
    ));
    let image = dir.join("os-2.1.img");
    run(Command::new(e2e::img_bin()).env("IMG_QUIET", "1").args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-name=os",
        "-version=2.1",
    ]));
    // Signed: the agent deploys nothing unsigned (its initrd trusts `fleet.key.pub`).
    let key = dir.join("fleet.key");
    run(Command::new(e2e::img_bin()).args(["-keygen", key.to_str().unwrap()]));
    run(Command::new(e2e::img_bin()).args([
        "-sign",
        image.to_str().unwrap(),
        &format!("-key={}", key.display()),
    ]));
    image
}

fn data_dir(dir: &Scratch) -> std::path::PathBuf {
    dir.join("srv")
}

/// The reference server in the namespace, plain HTTP on `ip`:8080 (option 192), with `image`
/// registered and scheduled for `mac`; killed on drop.
struct RefServer(std::process::Child);

impl RefServer {
    fn start(ns: &Netns, dir: &Scratch, image: &Path, ip: &str, mac: &str) -> RefServer {
        let data = data_dir(dir);
        imgserver_admin(&data, &["init"]);
        let out = imgserver_admin(&data, &["image", "add", image.to_str().unwrap()]);
        assert!(out.contains("registered image os 2.1"), "{out}");
        let out = imgserver_admin(
            &data,
            &["schedule", "add", "--mac", mac, "--image", "os:2.1"],
        );
        assert!(out.contains("scheduled"), "{out}");
        let (server, _) = e2e::spawn_imgserver(
            Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .arg(workspace_bin("imgserver", "imgserver"))
                .arg("--data")
                .arg(&data)
                .args([
                    "serve",
                    "--plain",
                    // A lab: the device carries no enrol.key.
                    "--open-enrolment",
                    "--listen",
                    &format!("{ip}:8080"),
                    "--public-url",
                    &format!("http://{ip}:8080"),
                ]),
            "listening on http://",
        );
        RefServer(server)
    }
}

impl Drop for RefServer {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The device's disk carries the image (table, file system, content) and the server
/// recorded the device with the new version and a successful task.
fn check_deployed(dir: &Scratch, disk: &Path, data: &Path, mac: &str) {
    // The device's disk now carries the image: table, file system, content.
    let table = e2e::sh(&format!("sgdisk -p {}", disk.display()));
    assert!(
        table.contains("SYSTEM"),
        "partition table after the deploy:\n{table}"
    );
    e2e::check_deployed(dir.path(), disk, "os 2.1");
    // The server recorded the device and its result.
    let devices = imgserver_admin(data, &["devices"]);
    let line = devices
        .lines()
        .find(|l| l.to_lowercase().starts_with(mac))
        .unwrap_or_else(|| panic!("device not listed:\n{devices}"));
    assert!(line.contains("2.1"), "{line}");
    let transcript = imgserver_admin(data, &["transcript", mac]);
    assert!(transcript.contains("succeeded"), "{transcript}");
}

/// The address plan of the end-to-end network namespace.
const E2E_SERVER_IP: &str = "10.78.0.1";
const E2E_MAC: &str = "52:54:00:00:78:02";

/// Run `imgserver --data DATA ARGS` (inside the namespace when given) and return its output.
fn imgserver_admin(data: &Path, args: &[&str]) -> String {
    let out = run(Command::new(workspace_bin("imgserver", "imgserver"))
        .arg("--data")
        .arg(data)
        .args(args));
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The whole loop of issue 5: a device with a blank virtio disk boots our kernel + initrd, gets
/// a lease from dnsmasq with options 186/192, finds the reference server from them, checks in,
/// deploys the scheduled image onto its disk, reports, and reboots. The disk-image file is
/// then checked with sgdisk, fsck.fat and mtools, and the server's record of the device.
#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_boot -- --ignored"]
fn device_gets_lease_finds_server_checks_in_deploys_and_reboots() {
    for t in [
        "dnsmasq", "ip", "sgdisk", "mkfs.fat", "fsck.fat", "mcopy", "mtype",
    ] {
        require_tool(t);
    }
    let dir = Scratch::new("qemu-e2e");
    let k = kernel();
    let image = capture_test_image(&dir);
    // The production way: the initrd trusts the publisher's key (signatures are required).
    let pubkey = dir.join("fleet.key.pub");
    let initrd = qemu::initrd_with(dir.path(), &k, &["--trusted".as_ref(), pubkey.as_os_str()]);

    let ns = Netns(format!("imge2e{}", std::process::id()));
    let netns = |args: &str| {
        run(Command::new("ip")
            .args(["netns", "exec", &ns.0])
            .args(args.split_whitespace()));
    };
    run(Command::new("ip").args(["netns", "add", &ns.0]));
    netns("ip link set lo up");
    netns("ip link add br0 type bridge");
    netns(&format!("ip addr add {E2E_SERVER_IP}/24 dev br0"));
    netns("ip link set br0 up");
    netns("ip tuntap add dev tap0 mode tap");
    netns("ip link set tap0 master br0");
    netns("ip link set tap0 up");

    let server = RefServer::start(&ns, &dir, &image, E2E_SERVER_IP, E2E_MAC);

    // dnsmasq: a lease with options 186 (server address) and 192 (HTTP port 8080).
    let mut dnsmasq = Command::new("ip")
        .args([
            "netns",
            "exec",
            &ns.0,
            "dnsmasq",
            "--keep-in-foreground",
            "--log-dhcp",
            "--log-facility=-",
            "--port=0",
            "--conf-file=/dev/null",
        ])
        .args([
            "--interface=br0",
            "--bind-interfaces",
            "--dhcp-range=10.78.0.50,10.78.0.99,1h",
            "--dhcp-authoritative",
        ])
        .arg(format!("--dhcp-option-force=186,{E2E_SERVER_IP}"))
        .arg("--dhcp-option-force=192,1f:90")
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .stderr(Stdio::null())
        .spawn()
        .expect("starting dnsmasq");

    let disk = dir.join("device.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    let mut cmd = Command::new("ip");
    cmd.args(["netns", "exec", &ns.0, "qemu-system-x86_64"]);
    cmd.args([
        "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
    ])
    .args(["-serial", "stdio", "-no-reboot"]);
    cmd.arg("-kernel")
        .arg(&k.vmlinuz)
        .arg("-initrd")
        .arg(&initrd);
    cmd.args([
        "-append",
        "console=ttyS0 panic=-1 img.disk=/dev/vda img.delay=3",
    ]);
    cmd.arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()));
    cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
    cmd.args([
        "-device",
        &format!("virtio-net-pci,netdev=n0,mac={E2E_MAC}"),
    ]);
    let mut q = Qemu::start(cmd);
    let t_kernel = q.wait_for("Linux version", BOOT_TIMEOUT);
    q.wait_for("agent started", BOOT_TIMEOUT);
    let t_checkin = q.wait_for("img: enrolled as device", Duration::from_secs(180));
    let t_written = q.wait_for("succeeded", Duration::from_secs(300));
    q.wait_for("init: rebooting", Duration::from_secs(120));
    q.wait_exit(Duration::from_secs(60));
    let console = q.text();
    drop(q);
    let _ = dnsmasq.kill();
    let _ = dnsmasq.wait();
    drop(server);
    assert!(
        !console.contains("Kernel panic"),
        "{}",
        e2e::tail(&console, 30)
    );

    check_deployed(&dir, &disk, &data_dir(&dir), E2E_MAC);
    eprintln!(
        "end-to-end figures (TCG): kernel start → check-in {:.1} s, check-in → image written {:.1} s",
        (t_checkin - t_kernel).as_secs_f64(),
        (t_written - t_checkin).as_secs_f64()
    );
}
