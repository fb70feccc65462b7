//! A device's whole life, boot after boot (issue 8 item 4): a flashed disk with the boot-agent
//! partition (`img -install`) and a guest OS on partition 2, booted by UEFI firmware (OVMF)
//! and a standalone GRUB, with real reboots: QEMU runs once per boot with `-no-reboot` and is
//! started again on the SAME disk and OVMF variable files, so each boot has its own serial
//! log (kept in the scratch folder as `boot-N.log`) and what it reached is read from it.
//!
//! The guest OS is Debian's kernel with a tiny busybox initramfs that prints
//! `GUEST OS v<version>` and powers off; v1 and v2 are FAT partitions holding that kernel,
//! initramfs and a VERSION.TXT, captured with `img -make -part=2`, signed with `img -sign`
//! (the device's initramfs trusts the key) and registered in the reference server.
//!
//! - `guest_boots_straight_from_grub`: the reference figure, a GRUB entry straight to the
//!   guest (no agent at all): power-on → guest marker.
//! - `whole_life_boots_deploys_reboots_and_stays_managed`: boot 1 agent → no work → guest v1
//!   through grubenv; the administrator schedules v2; boot 2 agent deploys v2 → reboot →
//!   boot 3 guest v2; boot 4 the agent checks in with its stored credential, the server shows
//!   the device Operational with v2, guest v2 again. Prints the agent-pass figure.
//! - `power_cut_mid_deploy_resumes_and_ends_in_v2`: QEMU killed while v2 is being written;
//!   the next boot is the agent (never the half-written guest), which resumes without
//!   fetching the intact chunks again (nginx's byte count) and ends in guest v2.
//! - `no_server_question_then_guest`: no DHCP server at all: the seed's 5-second question,
//!   no key, guest marker.
//! - `pxe_no_work_boots_the_local_disk_without_fetching_the_agent` and
//!   `pxe_with_work_runs_the_agent`: iPXE asks the server first (`/pxe/boot.ipxe?mac=`).
//!
//! Figures are printed (never asserted). These take minutes under TCG: they are `#[ignore]`d,
//! and scripts/test.sh runs them with `--ignored` (`QUICK=1` skips them and says so).

mod qemu;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::{img_bin, imgserver_bin, require_tool, run, sh, Scratch};
use qemu::life::*;
use qemu::{guest_initrd, kernel, Kernel};

/// The device's disk: partition 1 the boot agent (40 MiB: Debian's cloud kernel is 14 MB),
/// partition 2 the guest OS, in the same places on the capture source and on the device.
const DISK_MIB: u64 = 80;
const PART1: &str = "-n1:1M:+40M";
const PART2: &str = "-n2:41M:+32M";
const PART2_OFFSET: u64 = 41 << 20;
const PART2_MIB: u64 = 32;

/// A blank device disk in this suite's layout (partition table only).
fn new_device(dir: &Path, mac: &str) -> Device {
    Device::new(
        dir,
        mac,
        DISK_MIB,
        &format!("{PART1} -t1:ef00 -c1:BOOTAGENT {PART2} -t2:8300 -c2:GUEST"),
    )
}

fn tools() {
    for t in [
        "sgdisk",
        "mkfs.fat",
        "fsck.fat",
        "mcopy",
        "mtype",
        "grub-mkstandalone",
        "qemu-system-x86_64",
    ] {
        require_tool(t);
    }
}

/// The guest OS partition v`version` as a FAT file system image of PART2_MIB: the kernel, the
/// busybox initramfs and VERSION.TXT at its root.
fn guest_partition(dir: &Path, k: &Kernel, version: &str) -> PathBuf {
    let initrd = guest_initrd(dir, &format!("v{version}"));
    let part = dir.join(format!("guest-v{version}.fat"));
    let ver = dir.join(format!("VERSION-v{version}.TXT"));
    std::fs::write(&ver, format!("guest {version}\n")).unwrap();
    // What an OS update really changes: 10 MiB of the version's own data (incompressible),
    // so most of v2 is new to a disk holding v1 and a deploy has something to fetch (a
    // re-run skips the chunks already intact on the target, like the shared kernel).
    let data = dir.join(format!("APPDATA-v{version}.BIN"));
    let seed = version.bytes().fold(7u64, |a, b| a * 31 + u64::from(b));
    std::fs::write(&data, e2e::random_bytes(seed, 10 << 20)).unwrap();
    guest_fat(
        &part,
        PART2_MIB,
        &[
            (&k.vmlinuz, "vmlinuz"),
            (&initrd, "initrd.img"),
            (&ver, "VERSION.TXT"),
            (&data, "APPDATA.BIN"),
        ],
    );
    part
}

/// A GPT disk file in the device's layout with `guest` (a FAT image) in partition 2.
fn source_disk(dir: &Path, guest: &Path, name: &str) -> PathBuf {
    let disk = dir.join(name);
    sh(&format!(
        "rm -f {d}; truncate -s {DISK_MIB}M {d}
         sgdisk -o {PART1} -t1:ef00 -c1:BOOTAGENT {PART2} -t2:8300 -c2:GUEST {d} >/dev/null
         dd if={g} of={d} bs=1M seek={off} conv=notrunc status=none",
        d = disk.display(),
        g = guest.display(),
        off = PART2_OFFSET >> 20,
    ));
    disk
}

/// Guest v`version` captured as the server deploys it: `img -make -part=2` of a source disk,
/// then `img -sign` with the site key.
fn guest_image(dir: &Path, k: &Kernel, version: &str, key: &Path) -> PathBuf {
    let part = guest_partition(dir, k, version);
    let src = source_disk(dir, &part, &format!("source-v{version}.img"));
    let image = signed_guest_image(dir, &src, version, key);
    std::fs::remove_file(&src).unwrap();
    image
}

/// Everything the tests share: the kernel, the site key, guest images v1 and v2, the agent's
/// initramfs (trusting the site key) and the shipped GRUB.
struct Lab {
    dir: Scratch,
    k: Kernel,
    key_pub: PathBuf,
    v1: PathBuf,
    v2: PathBuf,
    agent_initrd: PathBuf,
    grub: PathBuf,
}

impl Lab {
    fn new(tag: &str) -> Lab {
        tools();
        let dir = Scratch::new(tag);
        let k = kernel();
        let (key, key_pub) = site_key(dir.path());
        let v1 = guest_image(dir.path(), &k, "1", &key);
        let v2 = guest_image(dir.path(), &k, "2", &key);
        let agent_initrd = agent_initrd(dir.path(), &k, &key_pub);
        // The GRUB the product ships (docs/boot.md): finds the boot-agent partition by label.
        let grub = qemu::standalone_grub(dir.path());
        Lab {
            dir,
            k,
            key_pub,
            v1,
            v2,
            agent_initrd,
            grub,
        }
    }

    /// The factory state of a device: the boot agent installed on partition 1 by
    /// `img -install` (booting the guest from partition 2 when told to), guest v1 restored
    /// onto partition 2 by `img -restore` with the site key.
    fn flashed_device(&self, mac: &str, cmdline: &str) -> Device {
        let dev = new_device(self.dir.path(), mac);
        install_agent(&dev.disk, &self.k, &self.agent_initrd, &self.grub, cmdline);
        restore_guest(&dev.disk, &self.v1, &self.key_pub);
        assert_eq!(dev.guest_on_disk(), "guest 1");
        dev
    }
}

/// The agent's kernel command line on the flashed device.
const AGENT_CMDLINE: &str = "console=ttyS0 panic=-1 img.disk=/dev/vda img.delay=3";

// ---- The tests ----

/// The reference: a GRUB whose only entry boots the guest on partition 2 straight away, no
/// agent. Also proves the guest OS build (kernel + busybox initramfs on FAT) boots.
#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn guest_boots_straight_from_grub() {
    tools();
    let dir = Scratch::new("life-direct");
    let k = kernel();
    let part = guest_partition(dir.path(), &k, "1");
    let efi = grub_efi(
        dir.path(),
        "direct",
        &format!(
            "set timeout=0\nset root=(hd0,gpt2)\nlinux /vmlinuz {GUEST_CMDLINE}\ninitrd /initrd.img\nboot\n"
        ),
    );
    // Partition 1 holds only this GRUB as the removable-media boot file.
    let mut dev = new_device(dir.path(), "52:54:00:00:79:10");
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1; p={d}/esp.fat; truncate -s 40M $p; mkfs.fat -F 32 $p >/dev/null
         mmd -i $p ::/EFI ::/EFI/BOOT; mcopy -i $p {efi} ::/EFI/BOOT/BOOTX64.EFI
         dd if=$p of={disk} bs=1M seek=1 conv=notrunc status=none
         dd if={part} of={disk} bs=1M seek={off} conv=notrunc status=none",
        d = dir.path().display(),
        efi = efi.display(),
        disk = dev.disk.display(),
        part = part.display(),
        off = PART2_OFFSET >> 20
    ));
    let mut b = dev.power_on();
    let t = b.wait_for("GUEST OS v1", BOOT_LIMIT);
    b.end();
    eprintln!(
        "life figure (TCG, OVMF + GRUB): power-on → guest marker, GRUB entry straight to the guest: {:.1} s",
        t.as_secs_f64()
    );
}

/// The device MAC of each scenario (each runs in its own namespace).
const MAC: &str = "52:54:00:00:79:01";

/// A whole-life scenario's common start: the lab, the site network with the server and
/// dnsmasq, a device flashed with the agent and guest v1, plugged into the site.
fn plugged_device(lab: &Lab, site: &Site) -> Device {
    let mut dev = lab.flashed_device(MAC, AGENT_CMDLINE);
    dev.ns = Some(site.ns.0.clone());
    dev
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn whole_life_boots_deploys_reboots_and_stays_managed() {
    let lab = Lab::new("life-whole");
    let dir = lab.dir.path();
    let mut site = Site::new(dir, "w");
    site.start_server();
    site.start_dnsmasq(dir, &[]);
    let mut dev = plugged_device(&lab, &site);
    assert_eq!(dev.next_entry(), None, "a fresh install boots the agent");

    // Boot 1: agent, lease, check-in (enrolment), no work → next_entry=guest, reboot.
    let (b1, t1) = agent_pass(&mut dev);
    assert!(
        b1.contains("img: enrolled as device"),
        "{}",
        e2e::tail(&b1, 40)
    );
    assert_eq!(
        dev.next_entry().as_deref(),
        Some("guest"),
        "{}",
        dev.grubenv()
    );
    // Boot 2: GRUB boots the one-shot entry: guest v1; GRUB cleared it on the way.
    let (v, t2) = guest_boot(&mut dev);
    assert_eq!(v, "1");
    assert_eq!(dev.next_entry(), None, "GRUB did not clear next_entry");
    eprintln!(
        "life figure (TCG, OVMF + GRUB): power-on → guest marker through the agent pass with no work: {:.1} s (agent boot {:.1} s + guest boot {:.1} s)",
        (t1 + t2).as_secs_f64(),
        t1.as_secs_f64(),
        t2.as_secs_f64()
    );

    // The administrator schedules v2. Boot 3: the agent deploys it and hands over.
    schedule_guest(&site, &lab.v2, "2", MAC);
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    b.wait_for("succeeded", DEPLOY_LIMIT);
    let (b3, _) = b.end();
    assert!(
        !b3.contains("enrolled as device") && !b3.contains("HTTP 409"),
        "boot 3 enrolled again instead of using its stored credential:\n{}",
        e2e::tail(&b3, 40)
    );
    assert_eq!(dev.guest_on_disk(), "guest 2");
    assert_eq!(
        dev.next_entry().as_deref(),
        Some("guest"),
        "{}",
        dev.grubenv()
    );
    // Boot 4: guest v2.
    assert_eq!(guest_boot(&mut dev).0, "2");

    // Boot 5: the agent checks in with its stored credential (no 409, no new enrolment),
    // nothing left to send twice; the server shows the device Operational with v2 and a
    // newer check-in. Boot 6: guest v2.
    let before = site.device_line(MAC);
    std::thread::sleep(Duration::from_secs(1));
    let (b5, _) = agent_pass(&mut dev);
    assert!(
        !b5.contains("enrolled as device") && !b5.contains("HTTP 409"),
        "boot 5 enrolled again:\n{}",
        e2e::tail(&b5, 40)
    );
    assert!(b5.contains("nothing to do"), "{}", e2e::tail(&b5, 40));
    let line = site.device_line(MAC);
    assert!(
        line.contains("Operational") && line.contains("guest 2"),
        "{line}"
    );
    assert_ne!(before, line, "the server saw no check-in from boot 5");
    let transcript = site.admin(&["transcript", MAC]);
    eprintln!("server transcript:\n{transcript}");
    let jobs = site.admin(&["jobs"]);
    eprintln!("server jobs:\n{jobs}");
    let results = transcript
        .lines()
        .filter(|l| l.contains("[task 1] task 1 succeeded"))
        .count();
    assert_eq!(
        results, 1,
        "the result was not delivered exactly once:\n{transcript}"
    );
    assert_eq!(guest_boot(&mut dev).0, "2");

    // The reference figure on the same device: the next boot set to the guest from the host
    // (`img -bootnext guest -disk=`), so GRUB goes straight to it without the agent.
    run(Command::new(img_bin())
        .args(["-bootnext", "guest"])
        .arg(format!("-disk={}", dev.disk.display())));
    assert_eq!(dev.next_entry().as_deref(), Some("guest"));
    let (v, t_direct) = guest_boot(&mut dev);
    assert_eq!(v, "2");
    eprintln!(
        "life figure (TCG, OVMF + GRUB): power-on → guest marker with next_entry=guest set from the host (no agent): {:.1} s; through the agent pass with no work: {:.1} s",
        t_direct.as_secs_f64(),
        (t1 + t2).as_secs_f64()
    );
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn power_cut_mid_deploy_resumes_and_ends_in_v2() {
    let lab = Lab::new("life-cut");
    let dir = lab.dir.path();
    let mut site = Site::new(dir, "c");
    site.start_server();
    site.start_dnsmasq(dir, &[]);
    // v2 served by nginx at 1 MiB/s: a 15 MB deploy takes about 15 s.
    let repo = dir.join("www");
    std::fs::create_dir_all(&repo).unwrap();
    std::fs::copy(&lab.v2, repo.join("guest-2.img")).unwrap();
    let size = std::fs::metadata(&lab.v2).unwrap().len();
    let ngx = SiteNginx::start(&site, dir, &repo, "1m");
    // Registered by URL: the admin command reads the image's metadata from nginx.
    let out = run(Command::new("ip")
        .args(["netns", "exec", &site.ns.0])
        .arg(imgserver_bin())
        .arg("--data")
        .arg(&site.data)
        .args(["image", "add", &ngx.url("guest-2.img")]));
    let out = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(out.contains("registered image guest 2"), "{out}");
    let out = site.admin(&[
        "schedule",
        "add",
        "--mac",
        MAC,
        "--image",
        "guest:2",
        "--partition",
        "2",
        "--no-backup",
    ]);
    assert!(out.contains("scheduled"), "{out}");
    let mut dev = plugged_device(&lab, &site);

    // Boot 1: the agent starts the deploy; the plug is pulled when about 40 % of the image
    // has reached the device (the tap's byte counter).
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    b.wait_for("deploying guest 2", BOOT_LIMIT);
    let base = tap_tx_bytes(&site);
    let end = Instant::now() + DEPLOY_LIMIT;
    while tap_tx_bytes(&site) < base + size * 2 / 5 {
        assert!(
            Instant::now() < end && !b.q.exited(),
            "the deploy did not get going:\n{}",
            e2e::tail(&b.q.text(), 40)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let cut = b.power_cut();
    assert!(!cut.contains("succeeded"), "{}", e2e::tail(&cut, 30));
    // nginx logs the cut request once its send times out.
    std::thread::sleep(Duration::from_secs(5));
    let before: u64 = ngx.sent("guest-2.img").iter().sum();
    let requests_before = ngx.sent("guest-2.img").len();
    assert_ne!(
        dev.next_entry().as_deref(),
        Some("guest"),
        "the half-written guest would boot"
    );

    // Boot 2: the agent again (never the half-written guest), resuming from its journal on
    // the boot-agent partition; then the guest v2.
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    b.wait_for("succeeded", DEPLOY_LIMIT);
    let (b2, _) = b.end();
    assert!(guest_version(&b2).is_none());
    let resumed_line = b2
        .lines()
        .find(|l| l.contains("already intact"))
        .unwrap_or_default()
        .to_string();
    std::thread::sleep(Duration::from_secs(1));
    let sent = ngx.sent("guest-2.img");
    let after: u64 = sent[requests_before..].iter().sum();
    eprintln!(
        "power cut: image {size} bytes; nginx sent {before} bytes before the cut and {after} after it ({} requests); agent: {resumed_line}",
        sent.len()
    );
    assert!(
        resumed_line.contains("(resumed)"),
        "the deploy started over:\n{}",
        e2e::tail(&b2, 40)
    );
    assert!(
        after < size - size / 5,
        "the resumed deploy fetched {after} of {size} bytes again"
    );
    assert_eq!(dev.guest_on_disk(), "guest 2");
    assert_eq!(guest_boot(&mut dev).0, "2");
    let line = site.device_line(MAC);
    assert!(line.contains("guest 2"), "{line}");
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn no_server_question_then_guest() {
    let lab = Lab::new("life-noserver");
    let dir = lab.dir.path();
    // The cable is plugged in, but nobody answers DHCP: no server, no configuration.
    let site = Site::new(dir, "n");
    let mut dev = plugged_device(&lab, &site);
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    let t_q = b.wait_for("NO HSERVER CONFIGURED", BOOT_LIMIT);
    let (text, took) = b.end();
    assert!(
        text.contains("Booting the guest OS in flash"),
        "{}",
        e2e::tail(&text, 30)
    );
    // The question waited its 5 seconds for a key; nobody pressed one.
    assert!(took > t_q + Duration::from_secs(5), "{took:?} {t_q:?}");
    assert_eq!(dev.next_entry().as_deref(), Some("guest"));
    let (v, t) = guest_boot(&mut dev);
    assert_eq!(v, "1");
    eprintln!(
        "life figure (TCG): no server → question at {:.1} s, agent boot {:.1} s, guest marker {:.1} s after the second power-on",
        t_q.as_secs_f64(),
        took.as_secs_f64(),
        t.as_secs_f64()
    );
}

// ---- PXE: the device asks the server before it loads anything. ----

/// The site for PXE: the server with the agent's kernel and initrd in DATA/pxe (answering
/// `/pxe/boot.ipxe?mac=` on its plain listener), a TFTP root with iPXE and the shipped
/// pxe/boot.ipxe pointed at the server, and dnsmasq with the shipped pxe/dnsmasq-dhcp.conf.
fn pxe_site(lab: &Lab, tag: &str) -> Site {
    let dir = lab.dir.path();
    let mut site = Site::new(dir, tag);
    let pxe = site.data.join("pxe");
    std::fs::create_dir_all(&pxe).unwrap();
    std::fs::copy(&lab.k.vmlinuz, pxe.join("vmlinuz")).unwrap();
    std::fs::copy(&lab.agent_initrd, pxe.join("initrd.img")).unwrap();
    site.start_server_with(&["--pxe-args", AGENT_CMDLINE]);

    // The TFTP root: iPXE and the shipped boot.ipxe pointed at the server, with its hot-key
    // window as shipped (2 s).
    let tftp = qemu::pxe_tftp_root(dir, &format!("http://{SERVER_IP}:8080/pxe"), 2000);
    let conf = std::fs::read_to_string(e2e::workspace_root().join("pxe/dnsmasq-dhcp.conf"))
        .unwrap()
        .replace("interface=eth0", "interface=br0")
        .replace("bind-dynamic", "bind-interfaces")
        .replace("192.168.1.100,192.168.1.200", "10.79.0.50,10.79.0.99")
        .replace("192.168.1.10", SERVER_IP)
        .replace("/srv/tftp", &tftp.display().to_string());
    let conf_path = dir.join("dnsmasq-pxe.conf");
    std::fs::write(&conf_path, conf).unwrap();
    let mut cmd = Command::new("ip");
    cmd.args([
        "netns",
        "exec",
        &site.ns.0,
        "dnsmasq",
        "--keep-in-foreground",
        "--log-dhcp",
        "--log-facility=-",
        "--port=0",
    ])
    .arg(format!("--conf-file={}", conf_path.display()))
    .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
    .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()));
    let d = Logged::spawn(cmd);
    // dnsmasq logs "started" once its sockets are bound.
    d.wait_for("started, version", Duration::from_secs(30));
    site.dnsmasq = Some(d);
    site
}

/// A PXE-managed device: no boot agent on flash, its disk is the guest OS alone (an EFI
/// system partition whose GRUB boots partition 2 straight away, guest v1 there); the
/// firmware tries the network first, then the disk.
fn pxe_device(lab: &Lab, site: &Site) -> Device {
    let dir = lab.dir.path();
    let mut dev = new_device(dir, MAC);
    let efi = grub_efi(
        dir,
        "direct",
        &format!(
            "set timeout=0\nset root=(hd0,gpt2)\nlinux /vmlinuz {GUEST_CMDLINE}\ninitrd /initrd.img\nboot\n"
        ),
    );
    let part = guest_partition(dir, &lab.k, "1");
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1; p={d}/esp.fat; rm -f $p; truncate -s 40M $p; mkfs.fat -F 32 -n ESP $p >/dev/null
         mmd -i $p ::/EFI ::/EFI/BOOT; mcopy -i $p {efi} ::/EFI/BOOT/BOOTX64.EFI
         dd if=$p of={disk} bs=1M seek=1 conv=notrunc status=none
         dd if={part} of={disk} bs=1M seek={off} conv=notrunc status=none",
        d = dir.display(),
        efi = efi.display(),
        disk = dev.disk.display(),
        part = part.display(),
        off = PART2_OFFSET >> 20
    ));
    // The partition's GPT name is not BOOTAGENT here: this device has no agent on flash.
    sh(&format!("sgdisk -c1:ESP {} >/dev/null", dev.disk.display()));
    dev.ns = Some(site.ns.0.clone());
    dev.pxe = true;
    dev
}

/// How many times the server sent the agent's kernel (its log) and what TFTP sent.
fn agent_fetches(site: &Site) -> (usize, Vec<String>) {
    let kernels = site
        .server_log()
        .lines()
        .filter(|l| l.contains("pxe: sending vmlinuz"))
        .count();
    let tftp = site
        .dnsmasq_log()
        .lines()
        .filter(|l| l.contains("sent ") && l.contains("tftp"))
        .map(str::to_string)
        .collect();
    (kernels, tftp)
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn pxe_asks_first_agent_with_work_local_disk_without() {
    let lab = Lab::new("life-pxe");
    let site = pxe_site(&lab, "p");
    let mut dev = pxe_device(&lab, &site);

    // Reference: the same disk booted with the network card's ROM out of the way.
    dev.pxe = false;
    let (v, t_direct) = guest_boot(&mut dev);
    assert_eq!(v, "1");
    dev.pxe = true;

    // Work: v2 scheduled. Boot: iPXE asks, the server answers the agent, which deploys v2.
    schedule_guest(&site, &lab.v2, "2", MAC);
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    b.wait_for("succeeded", DEPLOY_LIMIT);
    let _ = b.end();
    let (kernels_work, _) = agent_fetches(&site);
    assert!(
        kernels_work >= 1,
        "the agent's kernel was not fetched from the server:\n{}",
        e2e::tail(&site.server_log(), 30)
    );
    assert_eq!(dev.guest_on_disk(), "guest 2");

    // No work: iPXE asks, the server answers the local disk, nothing else is fetched.
    let (v, t_pxe) = guest_boot(&mut dev);
    assert_eq!(v, "2");
    let (kernels, tftp) = agent_fetches(&site);
    eprintln!(
        "server log:\n{}\nTFTP:\n{}",
        e2e::tail(&site.server_log(), 20),
        tftp.join("\n")
    );
    assert_eq!(
        kernels, kernels_work,
        "the kernel was fetched again with no work"
    );
    assert!(
        !tftp
            .iter()
            .any(|l| l.contains("vmlinuz") || l.contains("initrd")),
        "TFTP sent the agent:\n{}",
        tftp.join("\n")
    );
    assert!(
        site.server_log().contains("-> local disk"),
        "{}",
        e2e::tail(&site.server_log(), 20)
    );
    eprintln!(
        "life figure (TCG, OVMF): power-on → guest marker, PXE asking first with no work: {:.1} s; the same disk without the network boot: {:.1} s",
        t_pxe.as_secs_f64(),
        t_direct.as_secs_f64()
    );
}

/// The agent pass with no work, handing over with kexec (`img.handover=kexec`) instead of a
/// reboot through the firmware and GRUB: one power-on, agent, check-in, guest marker.
#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_life -- --ignored"]
fn agent_pass_with_kexec_handover() {
    let lab = Lab::new("life-kexec");
    let dir = lab.dir.path();
    let mut site = Site::new(dir, "k");
    site.start_server();
    site.start_dnsmasq(dir, &[]);
    let mut dev = lab.flashed_device(MAC, &format!("{AGENT_CMDLINE} img.handover=kexec"));
    dev.ns = Some(site.ns.0.clone());
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    b.wait_for("img: enrolled as device", BOOT_LIMIT);
    let t = b.wait_for("GUEST OS v1", BOOT_LIMIT);
    let (text, _) = b.end();
    assert_eq!(guest_version(&text).as_deref(), Some("1"));
    // One firmware pass only: OVMF started the disk once.
    assert_eq!(
        text.matches("BdsDxe: starting").count(),
        1,
        "{}",
        e2e::tail(&text, 40)
    );
    // The guest's own reboot comes back to the agent: kexec cleared next_entry again.
    assert_eq!(dev.next_entry(), None, "{}", dev.grubenv());
    eprintln!(
        "life figure (TCG, OVMF + GRUB): power-on → guest marker through the agent pass with no work, kexec hand-over: {:.1} s",
        t.as_secs_f64()
    );
}
