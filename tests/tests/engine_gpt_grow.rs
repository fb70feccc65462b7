//! A whole GPT disk deployed onto a larger disk: the backup header and entry array must
//! end up in the target's last sectors (UEFI §5.3.2), not where the source disk ended.
//!
//! A 64 MiB disk with a FAT32 partition (sgdisk, mkfs.fat --offset, mcopy) is captured with
//! `imgengine::capture` and deployed with `imgengine::deploy` onto a 128 MiB file full of
//! junk; then `sgdisk -v` must find no problems, `sgdisk -p` must list the same partitions
//! with a last usable sector near the new end, and every file must read back with mtools.

use std::fs;
use std::path::Path;

use e2e::{require_tool, sample_bytes, sh, Scratch};
use imgengine::capture::{capture, CaptureOptions};
use imgengine::deploy::{deploy, DeployOptions, ResumeMode};
use imgengine::io::NoProgress;
use imgengine::source::Location;

const MIB: u64 = 1 << 20;
const SOURCE: u64 = 64 * MIB;
const TARGET: u64 = 128 * MIB;
const FAT_START: u64 = MIB;
const FAT_LEN: u64 = 40 * MIB;

/// The partition lines of `sgdisk -p` (number, start, end, size, code, name).
fn partition_lines(p: &str) -> Vec<String> {
    p.lines()
        .skip_while(|l| !l.starts_with("Number"))
        .skip(1)
        .map(str::to_string)
        .collect()
}

fn last_usable(p: &str) -> u64 {
    let l = p
        .lines()
        .find(|l| l.contains("last usable sector is"))
        .unwrap_or_else(|| panic!("no usable range in sgdisk -p:\n{p}"));
    l.rsplit(' ').next().unwrap().parse().unwrap()
}

fn sgdisk(arg: &str, disk: &Path) -> String {
    sh(&format!("sgdisk {arg} {}", disk.display()))
}

#[test]
fn gpt_disk_deployed_onto_larger_disk_has_its_backup_at_the_end() {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
    let dir = Scratch::new("engine-gpt-grow");
    let src = dir.join("source.raw");
    sh(&format!(
        "truncate -s {SOURCE} {d}
         sgdisk -n 1:{s}:+{l} -t 1:0700 -c 1:DATA -n 2:0:+16M -t 2:8300 -c 2:OTHER {d} >/dev/null
         mkfs.fat -F 32 -s 1 -n GROWFAT --offset {s} {d} {kib} >/dev/null",
        d = src.display(),
        s = FAT_START / 512,
        l = FAT_LEN / 512,
        kib = FAT_LEN / 1024,
    ));
    let mut files = Vec::new();
    for (i, size) in [(1u64, 3000usize), (2, 900_000), (3, 2_500_000)] {
        let data = sample_bytes(0x6770 + i, size);
        let local = dir.join(format!("f{i}"));
        fs::write(&local, &data).unwrap();
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -i {}@@{FAT_START} {} ::F{i}",
            src.display(),
            local.display()
        ));
        files.push((format!("F{i}"), data));
    }
    let before = sgdisk("-p", &src);
    assert_eq!(partition_lines(&before).len(), 2, "{before}");

    let img = dir.join("disk.img");
    let o = CaptureOptions {
        name: "gpt-grow".into(),
        version: "1".into(),
        comp: 3,
        threads: 2,
        ..Default::default()
    };
    capture(
        &src,
        None,
        &mut fs::File::create(&img).unwrap(),
        &o,
        &NoProgress,
    )
    .unwrap();

    let target = dir.join("target.raw");
    fs::write(&target, sample_bytes(0xdead, TARGET as usize)).unwrap();
    let opts = DeployOptions {
        state_dir: dir.join("state"),
        threads: 2,
        resume: ResumeMode::Never,
        ..Default::default()
    };
    let d = deploy(
        &Location::File(img.clone()),
        &target,
        None,
        &opts,
        &NoProgress,
    )
    .unwrap();
    assert!(
        d.notes.iter().any(|n| n.contains("GPT backup")),
        "{:?}",
        d.notes
    );
    assert_eq!(fs::metadata(&target).unwrap().len(), TARGET);

    let v = sgdisk("-v", &target);
    assert!(v.contains("No problems found"), "{v}");
    let after = sgdisk("-p", &target);
    assert_eq!(partition_lines(&after), partition_lines(&before));
    // 33 sectors of backup (32 of entries, the header) after the last usable sector.
    assert_eq!(last_usable(&before), SOURCE / 512 - 34);
    assert_eq!(last_usable(&after), TARGET / 512 - 34);

    for (name, data) in &files {
        let out = dir.join("readback");
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -n -i {}@@{FAT_START} ::{name} {}",
            target.display(),
            out.display()
        ));
        assert!(fs::read(&out).unwrap() == *data, "{name} differs");
    }
}
