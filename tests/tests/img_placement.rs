//! Where an image lands and what it leaves alone, with the built `img` binary against disks
//! made by sgdisk, mkfs.fat, mkntfs, mtools and ntfs-3g tools:
//!
//! - `-dump`, `-info` and `-verify` (and `-make`'s source) work on a read-only disk or image
//!   (a read-only bind mount in a private mount namespace: root ignores mode 0444);
//! - a partition image restored into a partition at another offset gets its boot sector's
//!   hidden-sectors field (BPB offset 0x1C) set to the new start, for FAT and NTFS, with our
//!   format and with a raw image of the partition (`-raw` fallback);
//! - a raw GPT disk image deployed onto a larger disk gets its backup header moved to the
//!   end, as our format does (`sgdisk -v` clean).

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

use e2e::{img_bin, require_tool, run, sample_bytes, sh, Scratch};

const MIB: u64 = 1 << 20;

fn img(args: &[&str]) -> Output {
    Command::new(img_bin())
        .args(args)
        .output()
        .expect("running img")
}

fn ok(args: &[&str]) -> Output {
    run(Command::new(img_bin()).args(args))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn le32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().unwrap())
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// A 64 MiB GPT disk with partition 1 `DATA` (FAT32, 40 MiB at 1 MiB) holding `files`.
fn fat_disk(dir: &Scratch, path: &Path, files: &[(String, Vec<u8>)]) {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
    sh(&format!(
        "truncate -s 64M {d}
         sgdisk -n 1:2048:+40M -t 1:0700 -c 1:DATA {d} >/dev/null
         mkfs.fat -F 32 -s 1 -n DATA --offset 2048 {d} 40960 >/dev/null",
        d = path.display()
    ));
    for (name, data) in files {
        let local = dir.join("put");
        fs::write(&local, data).unwrap();
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -o -i {}@@{} {} ::{name}",
            path.display(),
            MIB,
            local.display()
        ));
    }
}

fn sample_files() -> Vec<(String, Vec<u8>)> {
    vec![
        ("A.BIN".to_string(), sample_bytes(0x1C, 700_000)),
        ("B.TXT".to_string(), b"hidden sectors\n".repeat(300)),
    ]
}

/// Run `script` (bash) in a private mount namespace where `dir` is a read-only bind mount.
fn in_read_only(dir: &Path, script: &str) -> Output {
    require_tool("unshare");
    Command::new("unshare")
        .args(["-m", "bash", "-euo", "pipefail", "-c"])
        .arg(format!(
            "mount --bind {d} {d}; mount -o remount,ro,bind {d} {d}; {script}",
            d = dir.display()
        ))
        .output()
        .expect("running unshare")
}

#[test]
fn dump_info_verify_and_make_open_a_read_only_disk_read_only() {
    let s = Scratch::new("placement-ro");
    let ro = s.join("ro");
    fs::create_dir_all(&ro).unwrap();
    let disk = ro.join("disk.raw");
    fat_disk(&s, &disk, &sample_files());
    let image = ro.join("data.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", disk.display()),
        "-part=1",
    ]);
    let out = s.join("again.fimg");
    let bin = img_bin();
    let o = in_read_only(
        &ro,
        &format!(
            "! touch {d}/probe 2>/dev/null || {{ echo 'the bind mount is writable'; exit 9; }}
             {b} -dump {disk}; {b} -dump -json {disk}; {b} -info {image}; {b} -verify {image}
             {b} -make {out} -disk={disk} -part=DATA",
            d = ro.display(),
            b = bin.display(),
            disk = disk.display(),
            image = image.display(),
            out = out.display(),
        ),
    );
    let t = text(&o);
    assert!(o.status.success(), "{t}");
    assert!(t.contains("DATA") && t.contains("fat32"), "{t}");
    assert!(t.contains(": OK:"), "{t}");
    assert!(out.exists());
}
