//! PXE asks before it loads (seed 004's preboot flow), with the real peers: QEMU with its
//! NIC's iPXE ROM under OVMF (UEFI) and SeaBIOS, dnsmasq as DHCP + TFTP with the shipped
//! `pxe/dnsmasq-dhcp.conf` and the generic `pxe/boot.ipxe`, the real imgserver answering
//! `/pxe/boot.ipxe?mac=` (TLS check-in listener plus the plain `--pxe-listen` one).
//!
//! - `pxe_no_work_boots_local_disk_under_uefi`: an enrolled device with no work PXE-boots,
//!   is told `exit`, and OVMF boots its local disk (a standalone GRUB printing a marker);
//!   dnsmasq's TFTP log and the server's log show that no kernel or initrd was fetched. The
//!   time to the marker is measured against the same disk booted directly (printed, never
//!   asserted).
//! - `pxe_no_work_boots_local_disk_under_bios`: the same under SeaBIOS (an MBR that prints
//!   a marker).
//! - `pxe_hotkey_menu_gives_img_console_under_uefi`: Space at the 2-second prompt, `c` in the
//!   menu: the agent's kernel with `img.console`, up to the `img>` prompt.
//! - `pxe_with_work_loads_agent_which_deploys_then_boots_local_disk`: a deploy scheduled for
//!   the MAC: the agent's kernel + initrd come from the server, the agent checks in over
//!   HTTPS, deploys a bootable image and reboots; the next PXE boot has no work and boots
//!   the freshly deployed disk.
//!
//! Each takes tens of seconds to minutes under TCG: they are `#[ignore]`d, and
//! scripts/test.sh runs them with `--ignored` (`QUICK=1` skips them and says so).

mod qemu;

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use e2e::{img_bin, imgserver_admin, require_tool, run, Scratch};
use qemu::{
    bios_marker_disk, disk_args, initrd_with, kernel, ovmf_args, pxe_tftp_root, qemu_base,
    uefi_marker_disk, LanServer, PxeLan, Qemu, BOOT_TIMEOUT,
};

const MARKER: &str = "LOCAL DISK BOOTED";

/// `imgserver init` for the server address, and the agent's kernel and initrd in
/// `DATA/pxe/` (the initrd carries the server's CA, so the agent trusts only it, and the
/// site enrolment secret beside it).
fn server_data(dir: &Scratch, ip: &str, with_agent: bool) -> std::path::PathBuf {
    server_data_trusting(dir, ip, with_agent, None)
}

/// [`server_data`] whose agent initrd also trusts the image-signing key `trusted` (.pub).
fn server_data_trusting(
    dir: &Scratch,
    ip: &str,
    with_agent: bool,
    trusted: Option<&Path>,
) -> std::path::PathBuf {
    let data = dir.join("srv");
    imgserver_admin(&data, &["init", "--name", ip]);
    if with_agent {
        let k = kernel();
        let pxe = data.join("pxe");
        std::fs::create_dir_all(&pxe).unwrap();
        let ca = format!("{}:etc/img/server-ca.pem", data.join("ca.pem").display());
        // The site enrolment secret beside the CA: the device enrols without approval.
        let key = format!("{}:etc/img/enrol.key", data.join("enrol.key").display());
        let mut extra: Vec<&std::ffi::OsStr> = vec![
            "--file".as_ref(),
            ca.as_ref(),
            "--file".as_ref(),
            key.as_ref(),
        ];
        if let Some(t) = trusted {
            extra.extend(["--trusted".as_ref(), t.as_os_str()]);
        }
        let initrd = initrd_with(dir.path(), &k, &extra);
        std::fs::copy(&k.vmlinuz, pxe.join("vmlinuz")).unwrap();
        std::fs::rename(&initrd, pxe.join("initrd.img")).unwrap();
    }
    data
}

/// The serve arguments of a production-like set-up: check-in over HTTPS on 8443, PXE over
/// plain HTTP on 8080, the given kernel parameters.
fn serve_args(ip: &str, args: &str) -> Vec<String> {
    vec![
        "--listen".into(),
        format!("{ip}:8443"),
        "--pxe-listen".into(),
        format!("{ip}:8080"),
        "--pxe-args".into(),
        args.to_string(),
    ]
}

/// Enrol `mac` with one check-in from the host side of the namespace (the device is known
/// and idle, as after its first boot).
fn enrol(lan: &PxeLan, data: &Path, dir: &Scratch, mac: &str) {
    let out = run(lan
        .cmd(img_bin())
        .env("IMG_QUIET", "1")
        .arg("-checkin")
        .arg(format!("-server=https://{}:8443", lan.server_ip))
        .arg(format!("-ca={}", data.join("ca.pem").display()))
        .arg(format!("-state={}", dir.join("state").display()))
        .arg(format!("-mac={mac}")));
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let devices = imgserver_admin(data, &["devices"]);
    assert!(
        devices.contains(mac),
        "{mac} not enrolled: {text}\n{devices}"
    );
}

fn assert_no_agent_download(lan: &PxeLan, server: &LanServer, mac: &str) {
    let sent = lan.tftp_sent();
    assert!(
        sent.iter().any(|f| f == "boot.ipxe"),
        "dnsmasq did not send boot.ipxe: {sent:?}\n{}",
        e2e::tail(&lan.dnsmasq_log.text(), 40)
    );
    assert!(
        !sent.iter().any(|f| f == "vmlinuz" || f == "initrd.img"),
        "TFTP sent the agent: {sent:?}"
    );
    let answers = server.pxe_answers(mac);
    assert_eq!(answers.len(), 1, "{answers:?}\n{}", server.log.text());
    assert!(answers[0].ends_with("no work -> local disk"), "{answers:?}");
    assert_eq!(
        server.agent_files_sent(),
        0,
        "the server sent the kernel or initrd:\n{}",
        server.log.text()
    );
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_pxe -- --ignored"]
fn pxe_no_work_boots_local_disk_under_uefi() {
    let dir = Scratch::new("pxe-uefi");
    let disk = dir.join("local.img");
    uefi_marker_disk(&disk, 48 << 20, MARKER);
    let ip = "10.79.0.1";
    let mac = "52:54:00:00:79:01";
    // The shipped menu wait (2 s) stays in: the figure is what a fleet would see.
    let tftp = pxe_tftp_root(dir.path(), &format!("http://{ip}:8080/pxe"), 2000);
    let lan = PxeLan::start("imgpxeu", "10.79.0", dir.path(), &tftp);
    let data = server_data(&dir, ip, true);
    let args = serve_args(ip, "console=ttyS0 panic=-1");
    let server = LanServer::start(
        &lan,
        &data,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    enrol(&lan, &data, &dir, mac);

    let mut cmd = lan.qemu(mac);
    cmd.args(ovmf_args(dir.path())).args(disk_args(&disk, 2));
    let mut q = Qemu::start(cmd);
    q.wait_for("no work: booting the local disk", BOOT_TIMEOUT);
    let t_pxe = q.wait_for(MARKER, BOOT_TIMEOUT);
    q.wait_exit(Duration::from_secs(60));
    drop(q);
    assert_no_agent_download(&lan, &server, mac);
    assert!(lan.dnsmasq_log.text().contains("DHCPACK"));

    // The same disk booted directly: same firmware, no network boot.
    let direct = dir.join("direct");
    std::fs::create_dir_all(&direct).unwrap();
    let mut cmd = qemu_base();
    cmd.args(ovmf_args(&direct))
        .args(disk_args(&disk, 1))
        .args(["-nic", "none"]);
    let mut q = Qemu::start(cmd);
    let t_direct = q.wait_for(MARKER, BOOT_TIMEOUT);
    q.wait_exit(Duration::from_secs(60));
    eprintln!(
        "PXE figure (TCG, OVMF): QEMU start -> local-disk marker {:.1} s through PXE with no work (2 s menu wait included), {:.1} s booted directly",
        t_pxe.as_secs_f64(),
        t_direct.as_secs_f64()
    );
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_pxe -- --ignored"]
fn pxe_no_work_boots_local_disk_under_bios() {
    let dir = Scratch::new("pxe-bios");
    let disk = dir.join("local.img");
    bios_marker_disk(&disk, 8 << 20, MARKER);
    let ip = "10.80.0.1";
    let mac = "52:54:00:00:80:01";
    let tftp = pxe_tftp_root(dir.path(), &format!("http://{ip}:8080/pxe"), 2000);
    let lan = PxeLan::start("imgpxeb", "10.80.0", dir.path(), &tftp);
    let data = server_data(&dir, ip, false);
    let args = serve_args(ip, "console=ttyS0 panic=-1");
    let server = LanServer::start(
        &lan,
        &data,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    enrol(&lan, &data, &dir, mac);

    // SeaBIOS and its iPXE ROM print on the VGA console only (no serial redirection in
    // QEMU 10): the logs of dnsmasq and the server show the way, the disk's MBR the end.
    let mut cmd = lan.qemu(mac);
    cmd.args(disk_args(&disk, 2));
    let mut q = Qemu::start(cmd);
    let t_pxe = q.wait_for(MARKER, BOOT_TIMEOUT);
    drop(q);
    assert_no_agent_download(&lan, &server, mac);

    // The same disk booted directly under SeaBIOS.
    let mut cmd = qemu_base();
    cmd.args(disk_args(&disk, 1)).args(["-nic", "none"]);
    let mut q = Qemu::start(cmd);
    let t_direct = q.wait_for(MARKER, BOOT_TIMEOUT);
    eprintln!(
        "PXE figure (TCG, SeaBIOS): QEMU start -> local-disk marker {:.1} s through PXE with no work (2 s menu wait included), {:.1} s booted directly",
        t_pxe.as_secs_f64(),
        t_direct.as_secs_f64()
    );
}

/// Seed 004's hot-key menu: Space at the prompt, `c`: the agent's kernel with `img.console`
/// for a device the server has no work for (iPXE's EFI console is on the serial port).
#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_pxe -- --ignored"]
fn pxe_hotkey_menu_gives_img_console_under_uefi() {
    let dir = Scratch::new("pxe-menu");
    let disk = dir.join("local.img");
    uefi_marker_disk(&disk, 48 << 20, MARKER);
    let ip = "10.82.0.1";
    let mac = "52:54:00:00:82:01";
    let tftp = pxe_tftp_root(dir.path(), &format!("http://{ip}:8080/pxe"), 2000);
    let lan = PxeLan::start("imgpxem", "10.82.0", dir.path(), &tftp);
    let data = server_data(&dir, ip, true);
    let args = serve_args(ip, "console=ttyS0 panic=-1");
    let server = LanServer::start(
        &lan,
        &data,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );
    let mut cmd = lan.qemu(mac);
    cmd.args(ovmf_args(dir.path())).args(disk_args(&disk, 2));
    let mut q = Qemu::start(cmd);
    q.wait_for("Press Space for the boot menu", BOOT_TIMEOUT);
    q.send(" ");
    q.wait_for("img console", Duration::from_secs(30));
    q.send("c");
    q.wait_for(
        "img console chosen at the device: loading the imaging agent",
        BOOT_TIMEOUT,
    );
    q.wait_for("starting as PID 1", Duration::from_secs(240));
    q.wait_for("img> ", BOOT_TIMEOUT);
    q.send("poweroff\r");
    q.wait_exit(Duration::from_secs(60));
    let answers = server.pxe_answers(mac);
    assert!(
        answers.len() == 1 && answers[0].ends_with("-> agent with img console"),
        "{answers:?}"
    );
    assert_eq!(server.agent_files_sent(), 2, "{}", server.log.text());
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_pxe -- --ignored"]
fn pxe_with_work_loads_agent_which_deploys_then_boots_local_disk() {
    require_tool("sgdisk");
    let dir = Scratch::new("pxe-work");
    let ip = "10.81.0.1";
    let mac = "52:54:00:00:81:01";
    // The image: a UEFI disk that prints its own marker, captured as os 2.1.
    let src = dir.join("source.img");
    let marker = format!("{MARKER} os 2.1");
    uefi_marker_disk(&src, 48 << 20, &marker);
    let image = dir.join("os-2.1.img");
    run(Command::new(img_bin()).env("IMG_QUIET", "1").args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-name=os",
        "-version=2.1",
    ]));
    // Signed, and the agent's initrd trusts the key: a device deploys nothing unsigned.
    let key = dir.join("fleet.key");
    run(Command::new(img_bin())
        .env("IMG_QUIET", "1")
        .args(["-keygen", key.to_str().unwrap()]));
    run(Command::new(img_bin()).env("IMG_QUIET", "1").args([
        "-sign",
        image.to_str().unwrap(),
        &format!("-key={}", key.display()),
    ]));
    let tftp = pxe_tftp_root(dir.path(), &format!("http://{ip}:8080/pxe"), 2000);
    let lan = PxeLan::start("imgpxew", "10.81.0", dir.path(), &tftp);
    let data = server_data_trusting(&dir, ip, true, Some(&dir.join("fleet.key.pub")));
    let out = imgserver_admin(&data, &["image", "add", image.to_str().unwrap()]);
    assert!(out.contains("registered image os 2.1"), "{out}");
    let out = imgserver_admin(
        &data,
        &["schedule", "add", "--mac", mac, "--image", "os:2.1"],
    );
    assert!(out.contains("scheduled"), "{out}");
    let args = serve_args(ip, "console=ttyS0 panic=-1 img.disk=/dev/vda img.delay=3");
    let server = LanServer::start(
        &lan,
        &data,
        &args.iter().map(String::as_str).collect::<Vec<_>>(),
    );

    // A blank disk: the device has never been imaged.
    let disk = dir.join("device.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();

    // Boot 1: work: the agent is fetched over HTTP, checks in over HTTPS, deploys, reboots.
    let mut cmd = lan.qemu(mac);
    cmd.args(ovmf_args(dir.path())).args(disk_args(&disk, 2));
    let mut q = Qemu::start(cmd);
    q.wait_for("loading the imaging agent", BOOT_TIMEOUT);
    let t_pid1 = q.wait_for("starting as PID 1", Duration::from_secs(240));
    q.wait_for("img: enrolled as device", Duration::from_secs(240));
    q.wait_for("succeeded", Duration::from_secs(300));
    q.wait_for("init: rebooting", Duration::from_secs(120));
    q.wait_exit(Duration::from_secs(60));
    drop(q);
    let answers = server.pxe_answers(mac);
    assert!(
        answers.len() == 1 && answers[0].contains("deploy os 2.1 -> imaging agent"),
        "{answers:?}"
    );
    assert_eq!(server.agent_files_sent(), 2, "{}", server.log.text());
    let devices = imgserver_admin(&data, &["devices"]);
    let line = devices
        .lines()
        .find(|l| l.starts_with(mac))
        .unwrap_or_else(|| panic!("{devices}"));
    assert!(line.contains("2.1"), "{line}");
    assert!(imgserver_admin(&data, &["transcript", mac]).contains("succeeded"));

    // Boot 2: no work left: the firmware boots the freshly deployed disk, nothing fetched.
    let mut cmd = lan.qemu(mac);
    cmd.args(ovmf_args(dir.path())).args(disk_args(&disk, 2));
    let mut q = Qemu::start(cmd);
    q.wait_for("no work: booting the local disk", BOOT_TIMEOUT);
    let t_local = q.wait_for(&marker, BOOT_TIMEOUT);
    q.wait_exit(Duration::from_secs(60));
    let answers = server.pxe_answers(mac);
    assert!(
        answers.len() == 2 && answers[1].ends_with("no work -> local disk"),
        "{answers:?}"
    );
    assert_eq!(
        server.agent_files_sent(),
        2,
        "the second boot fetched the agent again"
    );
    let sent = lan.tftp_sent();
    assert!(
        !sent.iter().any(|f| f == "vmlinuz" || f == "initrd.img"),
        "{sent:?}"
    );
    eprintln!(
        "PXE figure (TCG, OVMF): with work, PID 1 of the agent {:.1} s after QEMU start (kernel + initrd over HTTP); next boot with no work reaches the deployed disk's marker in {:.1} s",
        t_pid1.as_secs_f64(),
        t_local.as_secs_f64()
    );
}
