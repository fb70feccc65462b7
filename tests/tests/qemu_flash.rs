//! The flash install (issue 5 item 4): `img -install` prepares the boot-agent partition of a
//! disk-image file (FAT, kernel, initrd, grub.cfg, a standalone GRUB EFI image), the real
//! tools read it back (fsck.fat, mtools), and UEFI firmware (OVMF) under QEMU boots it: GRUB
//! from our FAT, then our kernel and initrd, up to PID 1 and the `img>` prompt. A URL list
//! set at the console in boot 1 is still there at boot 2 (QEMU started again on the same
//! disk file) and from the host (`img -serverurl -disk=`): the store on the boot-agent
//! partition.
//! It is `#[ignore]`d; scripts/test.sh runs it with `--ignored`
//! (`QUICK=1` skips it and says so).

mod qemu;

use std::process::Command;
use std::time::Duration;

use e2e::{img_bin, require_tool, run, sh, Scratch};
use qemu::{initrd, kernel, standalone_grub, Qemu, BOOT_TIMEOUT};

#[test]
#[ignore = "slow virtual-machine suite: scripts/test.sh runs it (QUICK=1 skips it), or cargo test -p e2e --test qemu_flash -- --ignored"]
fn installed_boot_partition_boots_under_uefi() {
    for t in ["sgdisk", "fsck.fat", "mtype", "mcopy", "grub-mkstandalone"] {
        require_tool(t);
    }
    let ovmf_code = std::path::Path::new("/usr/share/OVMF/OVMF_CODE_4M.fd");
    assert!(
        ovmf_code.exists(),
        "OVMF is not installed: run `bash scripts/install-deps.sh` as root"
    );
    let dir = Scratch::new("qemu-flash");
    let k = kernel();
    let initrd = initrd(dir.path(), &k);

    // A device disk: the boot-agent partition first (MISSION §3), the OS partition after it.
    // 40 MiB rather than the seed's 16 MB: Debian's cloud kernel alone is 14 MB.
    let disk = dir.join("flash.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(96 << 20)
        .unwrap();
    run(Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+40M",
            "-t1:ef00",
            "-c1:BOOTAGENT",
            "-n2:0:0",
            "-t2:0700",
        ])
        .arg(&disk));

    // A standalone GRUB whose built-in config finds our partition by its FAT label and reads
    // the grub.cfg that img -install wrote, with the modules that grub.cfg uses
    // (grub::MODULES: loadenv for grubenv among them; docs/boot.md).
    let efi = standalone_grub(dir.path());

    let out = run(Command::new(img_bin())
        .arg("-install")
        .arg(&disk)
        .arg(format!("-kernel={}", k.vmlinuz.display()))
        .arg(format!("-initrd={}", initrd.display()))
        .arg(format!("-efi={}", efi.display()))
        .arg("-cmdline=console=ttyS0 panic=-1 img.console"));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed the boot agent on partition 1")
    );

    // The real tools agree: a clean FAT with our files, the partition table untouched.
    let vol = dir.join("vol.img");
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=40 status=none; fsck.fat -n {} >/dev/null",
        disk.display(),
        vol.display(),
        vol.display()
    ));
    let cfg = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {} ::/boot/grub/grub.cfg",
        vol.display()
    ));
    assert!(
        cfg.contains("menuentry 'Boot agent' --id 'agent'")
            && cfg.contains("img.console")
            && cfg.contains("load_env --file"),
        "{cfg}"
    );
    let back = dir.join("initrd.back");
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {} ::/boot/initrd.img {}",
        vol.display(),
        back.display()
    ));
    assert_eq!(
        std::fs::read(&back).unwrap(),
        std::fs::read(&initrd).unwrap()
    );
    let table = sh(&format!("sgdisk -p {}", disk.display()));
    assert!(table.contains("BOOTAGENT"), "{table}");

    // UEFI boot: OVMF → our GRUB → our kernel + initrd → PID 1 → the img prompt.
    let vars = dir.join("vars.fd");
    std::fs::copy("/usr/share/OVMF/OVMF_VARS_4M.fd", &vars).unwrap();
    let boot = || {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
        ])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            ovmf_code.display()
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", vars.display()))
        .arg("-drive")
        .arg(format!("file={},format=raw,if=virtio", disk.display()));
        Qemu::start(cmd)
    };
    let mut q = boot();
    let t_pid1 = q.wait_for("starting as PID 1", BOOT_TIMEOUT);
    // Boot 1: the agent's directory comes from the (empty) store on the boot-agent
    // partition; a URL list typed at the console is a state change that must persist.
    q.wait_for(
        "agent state from the store on partition 1 of /dev/vda",
        BOOT_TIMEOUT,
    );
    q.wait_for("img> ", BOOT_TIMEOUT);
    q.send("img -serverurl https://persist.example:8443;10.9.9.9:80\r");
    q.wait_for(
        "server URL list: https://persist.example:8443;10.9.9.9:80",
        Duration::from_secs(120),
    );
    q.wait_for("img> ", Duration::from_secs(60));
    q.send("poweroff\r");
    q.wait_for("init: powering off", Duration::from_secs(30));
    q.wait_exit(Duration::from_secs(60));
    eprintln!(
        "flash boot figure (TCG, OVMF + GRUB): PID 1 started {:.1} s after QEMU start",
        t_pid1.as_secs_f64()
    );

    // Boot 2, same disk file: the URL list is back, read from the store.
    let mut q = boot();
    q.wait_for(
        "agent state from the store on partition 1 of /dev/vda",
        BOOT_TIMEOUT,
    );
    q.wait_for("img> ", BOOT_TIMEOUT);
    q.send("img -serverurl\r");
    q.wait_for(
        "https://persist.example:8443;10.9.9.9:80",
        Duration::from_secs(120),
    );
    q.wait_for("img> ", Duration::from_secs(60));
    q.send("poweroff\r");
    q.wait_for("init: powering off", Duration::from_secs(30));
    q.wait_exit(Duration::from_secs(60));

    // And from the host, with the product's own reader; the FAT is still clean.
    let out = run(Command::new(img_bin())
        .arg("-serverurl")
        .arg(format!("-disk={}", disk.display())));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("https://persist.example:8443;10.9.9.9:80"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=40 status=none; fsck.fat -n {} >/dev/null",
        disk.display(),
        vol.display(),
        vol.display()
    ));
}
