//! The hand-over to the guest OS with the real GRUB (issue 8 item 2): OVMF + a standalone
//! GRUB, a disk whose partition 1 is the boot-agent partition (`img -install`) and whose
//! partition 2 is a small FAT guest (the Debian kernel and a busybox initrd that prints
//! `GUEST OS v1 reached` and powers off). The disk and OVMF's variables are kept between
//! boots, as on a device. It is `#[ignore]`d; scripts/test.sh runs it
//! with `--ignored` (`QUICK=1` skips it and says so).
//!
//! - `img -bootnext guest -disk=` from the host: the next boot reaches the guest, GRUB has
//!   cleared next_entry (grub-editenv list), and the boot after it is the agent's again;
//! - the agent with no server and no key at the 5-second question hands over by itself;
//! - a damaged grubenv (garbage) boots the agent, which repairs it when it hands over;
//! - with `img.handover=kexec` the agent jumps to the guest's kernel directly; both
//!   hand-overs are timed from the agent's decision to the guest marker.

mod qemu;

use std::time::Duration;

use e2e::{img_bin, require_tool, run, sh, Scratch};
use qemu::{
    agent_and_guest_disk, grubenv_list, initrd, kernel, ovmf_qemu, partition, Qemu, BOOT_TIMEOUT,
};

const MARKER: &str = "GUEST OS v1 reached";
const DECISION: &str = "agent: handing over to the guest OS";
/// The agent's kernel command line: serial console, no waiting after failures.
const AGENT_CMDLINE: &str = "console=ttyS0 panic=-1 img.delay=1";

fn bootnext(disk: &std::path::Path, args: &[&str]) -> String {
    let out = run(std::process::Command::new(img_bin())
        .arg("-bootnext")
        .args(args)
        .arg(format!("-disk={}", disk.display())));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The boot-agent partition stays a clean FAT after every in-place write.
fn fsck_clean(disk: &std::path::Path, dir: &std::path::Path) {
    let (start, len) = partition(disk, 1);
    let vol = dir.join("p1.img");
    sh(&format!(
        "dd if={} of={} bs=512 skip={} count={} status=none && fsck.fat -n {} >/dev/null",
        disk.display(),
        vol.display(),
        start / 512,
        len / 512,
        vol.display()
    ));
}

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_guest -- --ignored"]
fn grubenv_hands_the_device_to_its_guest_os_once() {
    for t in ["sgdisk", "fsck.fat", "mcopy", "grub-editenv", "cpio"] {
        require_tool(t);
    }
    let dir = Scratch::new("qemu-guest");
    let k = kernel();
    let agent_initrd = initrd(dir.path(), &k);
    let disk = agent_and_guest_disk(
        dir.path(),
        "device.img",
        &k,
        &agent_initrd,
        AGENT_CMDLINE,
        "v1",
    );
    let vars = dir.join("vars.fd");
    assert_eq!(grubenv_list(&disk, dir.path()), "");

    // Boot 1: the administrator chose the guest from the host.
    let set = bootnext(&disk, &["guest"]);
    assert!(set.contains("next boot: guest, once"), "{set}");
    assert_eq!(grubenv_list(&disk, dir.path()), "next_entry=guest\n");
    fsck_clean(&disk, dir.path());
    let mut q = Qemu::start(ovmf_qemu(&disk, &vars));
    q.wait_for(MARKER, BOOT_TIMEOUT);
    q.wait_exit(Duration::from_secs(60));
    assert!(
        !q.text().contains("starting as PID 1"),
        "the agent ran:\n{}",
        q.text()
    );
    // GRUB cleared it with save_env before booting the guest (00_header's way).
    assert_eq!(grubenv_list(&disk, dir.path()), "next_entry=\n");
    assert!(bootnext(&disk, &[]).contains("next boot: agent (default)"));
    fsck_clean(&disk, dir.path());

    // Boot 2: the agent again. No network, no key at the 5-second question: it sets
    // next_entry=guest itself and reboots into the guest, the host touching nothing.
    let mut q = Qemu::start(ovmf_qemu(&disk, &vars));
    q.wait_for("starting as PID 1", BOOT_TIMEOUT);
    q.wait_for("NO HSERVER CONFIGURED", BOOT_TIMEOUT);
    let decided = q.wait_for(DECISION, BOOT_TIMEOUT);
    let mark = q.mark();
    let reached = q.wait_for_from(MARKER, mark, BOOT_TIMEOUT * 2);
    q.wait_exit(Duration::from_secs(60));
    let reboot_secs = (reached - decided).as_secs_f64();
    // Through the firmware and GRUB again: OVMF started a boot option twice.
    assert_eq!(
        q.text().matches("BdsDxe: starting").count(),
        2,
        "{}",
        q.text()
    );
    eprintln!("hand-over by reboot: agent's decision -> guest marker {reboot_secs:.1} s");
    assert_eq!(grubenv_list(&disk, dir.path()), "next_entry=\n");
    fsck_clean(&disk, dir.path());

    // Boot 3: garbage in grubenv. GRUB's load_env refuses it and the agent boots; its
    // hand-over writes a fresh block and the guest follows.
    let (p1, _) = partition(&disk, 1);
    let garbage = dir.join("garbage");
    std::fs::write(&garbage, e2e::random_bytes(8, 1024)).unwrap();
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -o -i {}@@{} {} ::/boot/grub/grubenv",
        disk.display(),
        p1,
        garbage.display()
    ));
    let shown = bootnext(&disk, &[]);
    assert!(
        shown.contains("next boot: agent (grubenv is unreadable"),
        "{shown}"
    );
    let mut q = Qemu::start(ovmf_qemu(&disk, &vars));
    q.wait_for("starting as PID 1", BOOT_TIMEOUT);
    q.wait_for("it was damaged", BOOT_TIMEOUT);
    let mark = q.mark();
    q.wait_for_from(MARKER, mark, BOOT_TIMEOUT * 2);
    q.wait_exit(Duration::from_secs(60));
    assert_eq!(grubenv_list(&disk, dir.path()), "next_entry=\n");
    fsck_clean(&disk, dir.path());

    // kexec: the same device with img.handover=kexec.
    let kdisk = agent_and_guest_disk(
        dir.path(),
        "kexec.img",
        &k,
        &agent_initrd,
        &format!("{AGENT_CMDLINE} img.handover=kexec"),
        "v1",
    );
    let kvars = dir.join("kvars.fd");
    let mut q = Qemu::start(ovmf_qemu(&kdisk, &kvars));
    q.wait_for("starting as PID 1", BOOT_TIMEOUT);
    let decided = q.wait_for(DECISION, BOOT_TIMEOUT);
    q.wait_for(
        "kexec: loaded the guest's /vmlinuz from partition 2",
        BOOT_TIMEOUT,
    );
    let mark = q.mark();
    let reached = q.wait_for_from(MARKER, mark, BOOT_TIMEOUT);
    q.wait_exit(Duration::from_secs(60));
    let kexec_secs = (reached - decided).as_secs_f64();
    eprintln!("hand-over by kexec: agent's decision -> guest marker {kexec_secs:.1} s");
    // Not through the firmware: OVMF started a boot option once (the first boot) only, and
    // grubenv holds no next_entry, so the guest's own reboot comes back to the agent.
    assert_eq!(
        q.text().matches("BdsDxe: starting").count(),
        1,
        "{}",
        q.text()
    );
    assert!(q.text().contains("kexec_core: Starting new kernel"));
    let listed = grubenv_list(&kdisk, dir.path());
    assert!(!listed.contains("next_entry=guest"), "{listed}");
    fsck_clean(&kdisk, dir.path());
    eprintln!(
        "hand-over figures (TCG, OVMF + GRUB): agent's decision -> guest marker: reboot {reboot_secs:.1} s, kexec {kexec_secs:.1} s"
    );
}

/// `img -bootnext` on a disk-image file, no QEMU: only grubenv's bytes change (the rest of
/// the disk is byte-identical), the FAT stays `fsck.fat -n` clean, `grub-editenv list`
/// reads every state, and the shown state follows.
#[test]
fn bootnext_rewrites_only_grubenv_on_a_disk_image() {
    for t in ["sgdisk", "fsck.fat", "mcopy", "grub-editenv"] {
        require_tool(t);
    }
    let dir = Scratch::new("bootnext");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(48 << 20)
        .unwrap();
    run(std::process::Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+40M",
            "-t1:ef00",
            "-c1:BOOTAGENT",
            "-n2:0:0",
            "-t2:0700",
        ])
        .arg(&disk));
    let (k, i) = (dir.join("vmlinuz"), dir.join("initrd.img"));
    std::fs::write(&k, e2e::random_bytes(1, 300_000)).unwrap();
    std::fs::write(&i, e2e::random_bytes(2, 100_000)).unwrap();
    run(std::process::Command::new(img_bin())
        .arg("-install")
        .arg(&disk)
        .arg(format!("-kernel={}", k.display()))
        .arg(format!("-initrd={}", i.display()))
        .arg("-guest=linux"));
    let cfg = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {}@@{} ::/boot/grub/grub.cfg",
        disk.display(),
        partition(&disk, 1).0
    ));
    assert!(
        cfg.contains("load_env --file \"$envfile\" next_entry"),
        "{cfg}"
    );
    assert!(
        cfg.contains("--id 'guest'") && cfg.contains("root=PARTUUID=${guestuuid}"),
        "{cfg}"
    );
    assert_eq!(grubenv_list(&disk, dir.path()), "");
    assert!(bootnext(&disk, &[]).contains("next boot: agent (default)"));
    fsck_clean(&disk, dir.path());

    let mut before = std::fs::read(&disk).unwrap();
    for (arg, listed, shown) in [
        ("guest", "next_entry=guest\n", "next boot: guest (once)"),
        (
            "console",
            "next_entry=console\n",
            "next boot: console (once)",
        ),
        ("agent", "", "next boot: agent (default)"),
    ] {
        bootnext(&disk, &[arg]);
        let after = std::fs::read(&disk).unwrap();
        assert_eq!(before.len(), after.len());
        let changed: Vec<usize> = (0..after.len())
            .filter(|&o| before[o] != after[o])
            .collect();
        assert!(!changed.is_empty(), "{arg}: nothing written");
        assert!(
            changed.last().unwrap() - changed.first().unwrap() < 1024,
            "{arg}: bytes outside one 1024-byte block changed: {}..{}",
            changed.first().unwrap(),
            changed.last().unwrap()
        );
        assert_eq!(grubenv_list(&disk, dir.path()), listed, "{arg}");
        assert!(bootnext(&disk, &[]).contains(shown), "{arg}");
        fsck_clean(&disk, dir.path());
        before = after;
    }
    // The same value again writes nothing.
    bootnext(&disk, &["agent"]);
    assert_eq!(std::fs::read(&disk).unwrap(), before);
    // A bad value is refused with the ways out.
    let out = std::process::Command::new(img_bin())
        .args(["-bootnext", "windows"])
        .arg(format!("-disk={}", disk.display()))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("not guest, agent or console"));
}
