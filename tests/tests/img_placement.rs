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
         mkfs.fat -F 32 -s 1 -n DATA -h 2048 --offset 2048 {d} 40960 >/dev/null",
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

/// Extract `[offset, offset + len)` of `disk` into its own file (for fsck.fat/ntfsfix).
fn extract(disk: &Path, offset: u64, len: u64, out: &Path) {
    sh(&format!(
        "dd if={} of={} bs=1M iflag=skip_bytes,count_bytes skip={offset} count={len} conv=sparse status=none",
        disk.display(),
        out.display()
    ));
}

/// The target: a 96 MiB GPT disk whose partition 2 (48 MiB) starts at sector 34816, not at
/// the source's 2048.
const NEW_START: u64 = 2048 + 16 * 2048;

fn target_disk(path: &Path) {
    let _ = fs::remove_file(path);
    sh(&format!(
        "truncate -s 96M {d}
         sgdisk -n 1:2048:+16M -t 1:8300 -c 1:OTHER -n 2:{NEW_START}:+48M -t 2:0700 -c 2:DEST {d} >/dev/null",
        d = path.display()
    ));
}

/// The boot sector (and its backups) at the new place say NEW_START, the file system is
/// clean and every file reads back.
fn check_moved(
    s: &Scratch,
    disk: &Path,
    ntfs: bool,
    files: &[(String, Vec<u8>)],
    backups: &[u64],
    how: &str,
) {
    let start = NEW_START * 512;
    // The volume as it was (40 MiB): ntfsfix looks for NTFS's backup boot sector in the
    // last sector of what it is given, where the source partition had it.
    let len = 40 * MIB;
    let boot = read_at(disk, start, 512);
    assert_eq!(le32(&boot, 0x1C) as u64, NEW_START, "{how}: hidden sectors");
    for b in backups {
        assert_eq!(
            read_at(disk, start + b, 512),
            boot,
            "{how}: the boot sector copy at {b} differs from the boot sector"
        );
    }
    let vol = s.join("moved.vol");
    extract(disk, start, len, &vol);
    if ntfs {
        sh(&format!("ntfsfix -n {} >/dev/null", vol.display()));
    } else {
        sh(&format!("fsck.fat -n {} >/dev/null", vol.display()));
    }
    for (name, data) in files {
        let got = if ntfs {
            run(Command::new("ntfscat").arg(&vol).arg(name)).stdout
        } else {
            run(Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(&vol)
                .arg(format!("::{name}")))
            .stdout
        };
        assert!(got == *data, "{how}: {name} differs");
    }
}

#[test]
fn fat_partition_restored_at_another_offset_gets_its_hidden_sectors_fixed() {
    for t in ["sgdisk", "mkfs.fat", "fsck.fat", "mcopy", "mtype"] {
        require_tool(t);
    }
    let s = Scratch::new("placement-fat");
    let src = s.join("source.raw");
    let files = sample_files();
    fat_disk(&s, &src, &files);
    assert_eq!(
        le32(&read_at(&src, MIB, 512), 0x1C),
        2048,
        "mkfs.fat --offset"
    );
    let image = s.join("data.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=1",
    ]);
    let dst = s.join("target.raw");
    target_disk(&dst);
    let o = ok(&[
        "-restore",
        image.to_str().unwrap(),
        // Unsigned test image: the explicit lab option.
        "-unsigned",
        &format!("-disk={}", dst.display()),
        "-part=2",
        &format!("-state={}", s.join("state").display()),
    ]);
    assert!(text(&o).contains("hidden sectors"), "{}", text(&o));
    check_moved(&s, &dst, false, &files, &[6 * 512], "our image");

    // The raw fallback: the partition's bytes as a plain image.
    let raw = s.join("part.img");
    extract(&src, MIB, 40 * MIB, &raw);
    target_disk(&dst);
    ok(&[
        "-restore",
        raw.to_str().unwrap(),
        // Unsigned test image: the explicit lab option.
        "-unsigned",
        &format!("-disk={}", dst.display()),
        "-part=2",
        &format!("-state={}", s.join("state").display()),
    ]);
    check_moved(&s, &dst, false, &files, &[6 * 512], "raw image");
}

#[test]
fn ntfs_partition_restored_at_another_offset_gets_its_hidden_sectors_fixed() {
    for t in ["sgdisk", "mkntfs", "ntfscp", "ntfscat", "ntfsfix"] {
        require_tool(t);
    }
    let s = Scratch::new("placement-ntfs");
    let files = sample_files();
    let vol = s.join("ntfs.vol");
    let mut script = format!(
        "truncate -s 40M {v}; mkntfs -F -Q -q -p 2048 -L WIN {v} >/dev/null 2>&1",
        v = vol.display()
    );
    for (i, (name, data)) in files.iter().enumerate() {
        let local = s.join(format!("n{i}"));
        fs::write(&local, data).unwrap();
        script += &format!(
            "\nntfscp {} {} {name} >/dev/null",
            vol.display(),
            local.display()
        );
    }
    sh(&script);
    let src = s.join("source.raw");
    sh(&format!(
        "truncate -s 64M {d}
         sgdisk -n 1:2048:+40M -t 1:0700 -c 1:WIN {d} >/dev/null
         dd if={v} of={d} bs=1M seek=1 conv=notrunc,sparse status=none",
        d = src.display(),
        v = vol.display()
    ));
    assert_eq!(le32(&read_at(&src, MIB, 512), 0x1C), 2048, "mkntfs -p");
    let image = s.join("win.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=WIN",
    ]);
    let dst = s.join("target.raw");
    target_disk(&dst);
    ok(&[
        "-restore",
        image.to_str().unwrap(),
        // Unsigned test image: the explicit lab option.
        "-unsigned",
        &format!("-disk={}", dst.display()),
        "-part=2",
        &format!("-state={}", s.join("state").display()),
    ]);
    // NTFS keeps its backup boot sector in the partition's last sector; the volume (and so
    // the copy mkntfs writes after it) ends at the source partition's 40 MiB.
    let backups = [40 * MIB - 512];
    check_moved(&s, &dst, true, &files, &backups, "our image");

    let raw = s.join("part.img");
    extract(&src, MIB, 40 * MIB, &raw);
    target_disk(&dst);
    ok(&[
        "-restore",
        raw.to_str().unwrap(),
        // Unsigned test image: the explicit lab option.
        "-unsigned",
        &format!("-disk={}", dst.display()),
        "-part=2",
        &format!("-state={}", s.join("state").display()),
    ]);
    check_moved(&s, &dst, true, &files, &backups, "raw image");
}

/// The partition lines of `sgdisk -p` (number, start, end, size, code, name).
fn partition_lines(p: &str) -> Vec<String> {
    p.lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .map(str::to_string)
        .collect()
}

#[test]
fn raw_gpt_image_on_a_larger_disk_gets_its_backup_header_moved_to_the_end() {
    for t in ["sgdisk", "mkfs.fat", "mcopy", "mtype", "zstd"] {
        require_tool(t);
    }
    let s = Scratch::new("placement-rawgpt");
    let src = s.join("disk.img");
    let files = sample_files();
    fat_disk(&s, &src, &files);
    let before = sh(&format!("sgdisk -p {}", src.display()));
    sh(&format!("zstd -q -1 -k {}", src.display()));
    let zst = s.join("disk.img.zst");
    for raw in [&src, &zst] {
        let dst = s.join("big.raw");
        let _ = fs::remove_file(&dst);
        sh(&format!("truncate -s 128M {}", dst.display()));
        let o = ok(&[
            "-restore",
            raw.to_str().unwrap(),
            // Unsigned test image: the explicit lab option.
            "-unsigned",
            &format!("-disk={}", dst.display()),
            &format!("-state={}", s.join("state").display()),
        ]);
        let how = raw.display();
        assert!(text(&o).contains("GPT backup"), "{how}: {}", text(&o));
        assert_eq!(fs::metadata(&dst).unwrap().len(), 128 * MIB);
        let v = sh(&format!("sgdisk -v {}", dst.display()));
        assert!(v.contains("No problems found"), "{how}: {v}");
        let after = sh(&format!("sgdisk -p {}", dst.display()));
        assert_eq!(partition_lines(&after), partition_lines(&before), "{how}");
        assert!(
            after.contains(&format!("last usable sector is {}", 128 * 2048 - 34)),
            "{how}: {after}"
        );
        for (name, data) in &files {
            let got = run(Command::new("mtype")
                .env("MTOOLS_SKIP_CHECK", "1")
                .arg("-i")
                .arg(format!("{}@@{MIB}", dst.display()))
                .arg(format!("::{name}")))
            .stdout;
            assert!(got == *data, "{how}: {name} differs");
        }
    }
}
