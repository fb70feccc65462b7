//! Autogenic layout (seed 001) end to end on sparse disk-image files, against sgdisk,
//! fsck.fat and mtools:
//!
//! - `img -convert` on flash of 1 GB, 2 GB, 4096 MB, 8 GB and 16 GB (512-byte sectors, GPT
//!   made by sgdisk, boot-agent partition made by `img -install` or `mkfs.fat --offset`):
//!   `sgdisk -v` clean, `sgdisk -p` shows boot agent / OS / IMGBACKUP with the seed's
//!   sizes, the boot-agent partition's entry (`sgdisk -i 1`) and bytes unchanged,
//!   `fsck.fat -n` clean on the backup partition, `mdir` lists /IMGBACK;
//! - bytes written through `BackupArea::write_at` read back byte for byte with `mcopy`,
//!   also across the boundary of two segments of a backup partition over 4 GiB;
//! - a torn status write (cut at every 512-byte boundary) on the disk file reads back the
//!   old or the new status;
//! - an unchanged deploy reads a signed image from the area (every chunk checked: a flipped
//!   byte in the area is refused before partition 2 is written);
//! - a flash too small, or an enlarged backup on flash over 4096 MB, is refused with the
//!   sizes named and nothing written.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use autogenic::ImageStamp;
use autogenic::{backupfs, AreaStatus, BackupArea};
use e2e::{img_bin, require_tool, run, sample_bytes, sh, Scratch};

const MB: u64 = 1 << 20;

fn img(args: &[&str]) -> Output {
    Command::new(img_bin()).args(args).output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn tools() {
    for t in ["sgdisk", "mkfs.fat", "fsck.fat", "mdir", "mcopy"] {
        require_tool(t);
    }
}

/// How the boot-agent partition is made.
#[derive(Clone, Copy, Debug)]
enum Made {
    Install,
    Mkfs,
}

/// A sparse disk of `flash` MB: GPT by sgdisk, partition 1 BOOTAGENT (16 MB) made `how`,
/// partition 2 "Windows" the rest.
fn device(dir: &Scratch, flash: u64, how: Made) -> PathBuf {
    let disk = dir.join(format!("flash-{flash}.img"));
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(flash * MB)
        .unwrap();
    run(Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+16M",
            "-t1:ef00",
            "-c1:BOOTAGENT",
            "-n2:0:0",
            "-t2:0700",
            "-c2:Windows",
        ])
        .arg(&disk));
    match how {
        Made::Install => {
            std::fs::write(dir.join("vmlinuz"), e2e::random_bytes(1, 300_000)).unwrap();
            std::fs::write(dir.join("initrd.img"), e2e::random_bytes(2, 500_000)).unwrap();
            run(Command::new(img_bin())
                .arg("-install")
                .arg(&disk)
                .arg(format!("-kernel={}", dir.join("vmlinuz").display()))
                .arg(format!("-initrd={}", dir.join("initrd.img").display())));
        }
        Made::Mkfs => {
            std::fs::write(dir.join("NOTE.TXT"), sample_bytes(3, 100_000)).unwrap();
            sh(&format!(
                "export MTOOLS_SKIP_CHECK=1
                 mkfs.fat -F 16 -n BOOTAGENT --offset 2048 {d} 16384 >/dev/null
                 mcopy -i {d}@@1048576 {n} ::NOTE.TXT",
                d = disk.display(),
                n = dir.join("NOTE.TXT").display()
            ));
        }
    }
    disk
}

fn read_range(path: &Path, at: u64, len: u64) -> Vec<u8> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::File::open(path).unwrap();
    let mut b = vec![0u8; len as usize];
    f.read_exact_at(&mut b, at).unwrap();
    b
}

/// `sgdisk -p`'s partition rows: (number, first sector, last sector, code, name).
fn sgdisk_rows(disk: &Path) -> Vec<(u32, u64, u64, String, String)> {
    let out = run(Command::new("sgdisk").arg("-p").arg(disk));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let n = w.first()?.parse().ok()?;
            // number start end size unit code name...
            Some((
                n,
                w.get(1)?.parse().ok()?,
                w.get(2)?.parse().ok()?,
                w.get(5)?.to_string(),
                w.get(6..)?.join(" "),
            ))
        })
        .collect()
}

fn sgdisk_verify(disk: &Path) {
    let out = run(Command::new("sgdisk").arg("-v").arg(disk));
    let t = String::from_utf8_lossy(&out.stdout);
    assert!(t.contains("No problems found"), "sgdisk -v:\n{t}");
}

/// `fsck.fat -n` on the partition at `at`, `len` bytes (copied out sparsely: fsck.fat has
/// no offset option).
fn fsck_clean(dir: &Scratch, disk: &Path, at: u64, len: u64) {
    let vol = dir.join("backup.vol");
    sh(&format!(
        "dd if={} of={} bs=1M skip={} count={} conv=sparse status=none",
        disk.display(),
        vol.display(),
        at / MB,
        len / MB
    ));
    let out = Command::new("fsck.fat")
        .arg("-n")
        .arg(&vol)
        .output()
        .unwrap();
    let t = text(&out);
    assert!(out.status.success(), "fsck.fat -n:\n{t}");
    assert!(!t.to_lowercase().contains("dirty"), "fsck.fat -n:\n{t}");
    let _ = std::fs::remove_file(&vol);
}

/// `mdir` of /IMGBACK on the partition at `at`.
fn mdir(disk: &Path, at: u64) -> String {
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mdir -i {}@@{at} ::IMGBACK",
        disk.display()
    ))
}

/// Stream a file out of the FAT at `at` with `mcopy ... -` and return its length and the
/// bytes of each of `ranges` (offset, length) in it.
fn mcopy_ranges(disk: &Path, at: u64, file: &str, ranges: &[(u64, usize)]) -> (u64, Vec<Vec<u8>>) {
    let mut child = Command::new("mcopy")
        .env("MTOOLS_SKIP_CHECK", "1")
        .arg("-i")
        .arg(format!("{}@@{at}", disk.display()))
        .arg(format!("::{file}"))
        .arg("-")
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut out = child.stdout.take().unwrap();
    let mut got: Vec<Vec<u8>> = ranges.iter().map(|_| Vec::new()).collect();
    let mut pos = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = out.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        for (i, &(o, l)) in ranges.iter().enumerate() {
            let (from, to) = (o.max(pos), (o + l as u64).min(pos + n as u64));
            if from < to {
                got[i].extend_from_slice(&buf[(from - pos) as usize..(to - pos) as usize]);
            }
        }
        pos += n as u64;
    }
    assert!(child.wait().unwrap().success(), "mcopy ::{file} failed");
    (pos, got)
}

/// The seed's OS partition size in MB for this flash, image and backup (1 MB table before
/// the boot agent, 1 MB at the end for the GPT's backup, rounded down).
fn seed_os_mb(flash: u64, backup: u64) -> u64 {
    if flash <= 4096 {
        flash - 1 - 16 - backup - 1
    } else {
        4096 - 1 - 16 - backup
    }
}

#[test]
fn convert_on_five_flash_sizes_keeps_the_boot_agent_and_makes_a_clean_backup() {
    tools();
    let dir = Scratch::new("autogenic-sizes");
    // (flash MB, image MB, how the boot agent was made)
    let cases = [
        (1024u64, 300u64, Made::Install),
        (2048, 700, Made::Mkfs),
        (4096, 1500, Made::Install),
        (8192, 1500, Made::Mkfs),
        (16384, 1900, Made::Install),
    ];
    for (flash, image, how) in cases {
        let disk = device(&dir, flash, how);
        let d = disk.to_str().unwrap();
        let ba_before = read_range(&disk, MB, 16 * MB);
        let entry1 = sh(&format!("sgdisk -i 1 {d}"));
        let o = img(&[
            "-layout",
            &format!("-disk={d}"),
            &format!("-image={image}MB"),
        ]);
        let t = text(&o);
        assert!(o.status.success(), "{t}");
        let backup = image + 100;
        let os = seed_os_mb(flash, backup);
        assert!(
            t.contains(&format!("flash {flash} MB"))
                && t.contains(&format!("{os} MB"))
                && t.contains(&format!("{backup} MB"))
                && t.contains("kept as it is"),
            "{flash} MB:\n{t}"
        );
        assert_eq!(flash > 4096, t.contains("stay free"), "{t}");
        let o = img(&[
            "-convert",
            &format!("-disk={d}"),
            &format!("-image={image}MB"),
        ]);
        assert!(o.status.success(), "{flash} MB: {}", text(&o));

        sgdisk_verify(&disk);
        let rows = sgdisk_rows(&disk);
        let sec = MB / 512;
        assert_eq!(rows.len(), 3, "{rows:?}");
        assert_eq!(
            rows[0],
            (1, 2048, 17 * sec - 1, "EF00".into(), "BOOTAGENT".into())
        );
        assert_eq!(
            rows[1],
            (
                2,
                17 * sec,
                (17 + os) * sec - 1,
                "0700".into(),
                "Windows".into()
            ),
            "{flash} MB"
        );
        let b_start = (17 + os) * sec;
        assert_eq!(
            rows[2],
            (
                3,
                b_start,
                b_start + backup * sec - 1,
                "0700".into(),
                "IMGBACKUP".into()
            ),
            "{flash} MB"
        );
        // The boot agent's entry (GUIDs, attributes, name) and bytes are unchanged.
        assert_eq!(sh(&format!("sgdisk -i 1 {d}")), entry1);
        assert!(
            read_range(&disk, MB, 16 * MB) == ba_before,
            "{flash} MB: boot agent bytes changed"
        );

        let at = b_start * 512;
        fsck_clean(&dir, &disk, at, backup * MB);
        let listing = mdir(&disk, at);
        assert!(
            listing.contains("IMGBACKUP")
                && listing.contains("STATUS   DAT")
                && listing.contains("IMAGE    000")
                && !listing.contains("IMAGE    001"),
            "{listing}"
        );
        let area = BackupArea::open(&disk, false).unwrap();
        assert_eq!(area.partition_number(), 3);
        assert!(area.capacity() >= image * MB && area.capacity() < backup * MB);
        assert_eq!(area.status(), &AreaStatus::default());
        // `img -layout` without a size shows the area.
        let t = text(&img(&["-layout", &format!("-disk={d}")]));
        assert!(
            t.contains("backup partition 3 of") && t.contains("no image"),
            "{t}"
        );
        // Converting again: the table is already right, only the backup is formatted.
        let o = img(&[
            "-convert",
            &format!("-disk={d}"),
            &format!("-image={image}MB"),
        ]);
        assert!(
            text(&o).contains("partition table already right"),
            "{}",
            text(&o)
        );
        assert!(read_range(&disk, MB, 16 * MB) == ba_before);
        println!("{flash} MB flash, {image} MB image: OS {os} MB, backup {backup} MB: converted, checked");
        std::fs::remove_file(&disk).unwrap();
    }
}

#[test]
fn bytes_written_through_the_area_read_back_with_mtools_byte_for_byte() {
    tools();
    let dir = Scratch::new("autogenic-mtools");
    let disk = device(&dir, 1024, Made::Install);
    let d = disk.to_str().unwrap();
    let o = img(&["-convert", &format!("-disk={d}"), "-image=300MB"]);
    assert!(o.status.success(), "{}", text(&o));
    let mut a = BackupArea::open(&disk, true).unwrap();
    let cap = a.capacity();
    let stamp = ImageStamp {
        name: "thin".into(),
        version: "7".into(),
    };
    assert_eq!(a.begin(stamp.clone(), "digest-1", cap).unwrap(), 0);
    let pieces: Vec<(u64, Vec<u8>)> = [0, cap / 2 + 3, cap - 700_001]
        .iter()
        .enumerate()
        .map(|(i, &o)| (o, sample_bytes(10 + i as u64, 700_001)))
        .collect();
    for (o, b) in &pieces {
        a.write_at(*o, b).unwrap();
    }
    a.commit(cap).unwrap();
    a.finish().unwrap();
    let at = a.partition_start();
    drop(a);
    let ranges: Vec<(u64, usize)> = pieces.iter().map(|(o, b)| (*o, b.len())).collect();
    let (len, got) = mcopy_ranges(&disk, at, "IMGBACK/IMAGE.000", &ranges);
    assert_eq!(len, cap);
    for ((o, want), got) in pieces.iter().zip(&got) {
        assert!(got == want, "mcopy read other bytes at {o}");
    }
    fsck_clean(&dir, &disk, at, 400 * MB);
    // The status as another process sees it.
    let t = text(&img(&["-layout", &format!("-disk={d}")]));
    assert!(t.contains("image thin 7") && t.contains("complete"), "{t}");
    let s = BackupArea::open(&disk, false).unwrap().status().clone();
    assert_eq!(
        s,
        AreaStatus {
            image: Some(stamp),
            manifest_digest: "digest-1".into(),
            size: cap,
            verified_bytes: cap,
            complete: true
        }
    );
}

#[test]
fn a_backup_over_4_gib_has_two_segments_and_writes_cross_them() {
    tools();
    let dir = Scratch::new("autogenic-segments");
    let disk = dir.join("big.img");
    // 4.5 GiB backup partition behind a 16 MiB boot agent and a 20 MiB OS partition.
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(4700 * MB)
        .unwrap();
    run(Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+16M",
            "-c1:BOOTAGENT",
            "-n2:0:+20M",
            "-n3:0:+4600M",
            "-c3:IMGBACKUP",
        ])
        .arg(&disk));
    let g = backupfs::format_path(&disk, 37 * MB, 4600 * MB, 512).unwrap();
    assert_eq!(g.segments.len(), 2);
    let cs = g.cluster_size();
    assert_eq!(
        g.segments[0].1,
        (4 << 30) - cs,
        "a segment is 4 GiB - 1 cluster"
    );
    let listing = mdir(&disk, 37 * MB);
    assert!(
        listing.contains("IMAGE    000") && listing.contains("IMAGE    001"),
        "{listing}"
    );
    fsck_clean(&dir, &disk, 37 * MB, 4600 * MB);

    let mut a = BackupArea::open(&disk, true).unwrap();
    let seg0 = a.segments()[0].1;
    a.begin(ImageStamp::default(), "d", seg0 + 1_000_000)
        .unwrap();
    let data = sample_bytes(5, 3_000_000);
    a.write_at(seg0 - 2_000_000, &data).unwrap();
    a.commit(seg0 + 1_000_000).unwrap();
    drop(a);
    let (_, end0) = mcopy_ranges(
        &disk,
        37 * MB,
        "IMGBACK/IMAGE.000",
        &[(seg0 - 2_000_000, 2_000_000)],
    );
    let (_, start1) = mcopy_ranges(&disk, 37 * MB, "IMGBACK/IMAGE.001", &[(0, 1_000_000)]);
    assert!(end0[0] == data[..2_000_000], "the end of IMAGE.000");
    assert!(start1[0] == data[2_000_000..], "the start of IMAGE.001");
    fsck_clean(&dir, &disk, 37 * MB, 4600 * MB);
}

#[test]
fn a_torn_status_write_on_disk_reads_back_old_or_new() {
    tools();
    let dir = Scratch::new("autogenic-torn");
    let disk = device(&dir, 1024, Made::Mkfs);
    let d = disk.to_str().unwrap();
    assert!(img(&["-convert", &format!("-disk={d}"), "-image=300MB"])
        .status
        .success());
    let mut a = BackupArea::open(&disk, true).unwrap();
    // A long name: the record spans several sectors.
    let stamp = ImageStamp {
        name: "x".repeat(2000),
        version: "1".into(),
    };
    a.begin(stamp, "d1", 10 * MB).unwrap();
    a.commit(MB).unwrap();
    let old = a.status().clone();
    let status_at = a.status_offset();
    // The record the next commit writes, captured from a copy of the disk.
    let copy = dir.join("copy.img");
    sh(&format!("cp --sparse=always {d} {}", copy.display()));
    let slots_before = read_range(&disk, status_at, backupfs::STATUS_LEN);
    let mut b = BackupArea::open(&copy, true).unwrap();
    b.commit(2 * MB).unwrap();
    let new = b.status().clone();
    drop(b);
    let slots_after = read_range(&copy, status_at, backupfs::STATUS_LEN);
    let changed: Vec<usize> = (0..slots_before.len())
        .filter(|&i| slots_before[i] != slots_after[i])
        .collect();
    let (first, last) = (*changed.first().unwrap(), *changed.last().unwrap());
    assert!(last - first > 3 * 512, "the record spans several sectors");
    let first_sector = first / 512 * 512;
    let mut cuts = 0;
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    for cut in (first_sector..=last + 1).step_by(512) {
        // Sectors before the cut are new, after it old.
        let mut torn = slots_before.clone();
        torn[..cut].copy_from_slice(&slots_after[..cut]);
        f.write_all_at(&torn, status_at).unwrap();
        let s = BackupArea::open(&disk, false).unwrap().status().clone();
        assert_eq!(s, old, "cut at byte {cut} of the status file");
        cuts += 1;
    }
    f.write_all_at(&slots_after, status_at).unwrap();
    assert_eq!(BackupArea::open(&disk, false).unwrap().status(), &new);
    assert!(cuts >= 4, "{cuts}");
    println!("{cuts} torn writes read back the old status, the whole write the new one");
}

#[test]
fn an_unchanged_deploy_reads_the_image_from_the_area_and_checks_every_chunk() {
    use imgengine::capture::{capture, CaptureOptions};
    use imgengine::deploy::{DeployOptions, OpenedImage};
    use imgengine::io::NoProgress;
    use imgengine::sign::{seal_and_sign, SigningKey};
    tools();
    let dir = Scratch::new("autogenic-deploy");
    // The OS image: a 32 MiB FAT16 partition with a marker, captured, sealed and signed.
    let src = dir.join("src.img");
    std::fs::write(dir.join("VERSION.TXT"), "guest v2\n").unwrap();
    std::fs::write(dir.join("BLOB.BIN"), sample_bytes(7, 3_000_000)).unwrap();
    sh(&format!(
        "cd {p}; export MTOOLS_SKIP_CHECK=1; truncate -s 40M {s}
         sgdisk -n 1:2048:+32M -t 1:0700 {s} >/dev/null
         mkfs.fat -F 16 -n GUEST --offset 2048 {s} 32768 >/dev/null
         mcopy -i {s}@@1048576 VERSION.TXT ::VERSION.TXT
         mcopy -i {s}@@1048576 BLOB.BIN ::BLOB.BIN",
        p = dir.path().display(),
        s = src.display()
    ));
    let plain = dir.join("guest.img");
    let o = CaptureOptions {
        name: "guest".into(),
        version: "2".into(),
        comp: 1,
        threads: 2,
        ..Default::default()
    };
    capture(
        &src,
        Some("1"),
        &mut std::fs::File::create(&plain).unwrap(),
        &o,
        &NoProgress,
    )
    .unwrap();
    let key = SigningKey::generate();
    let sealed = dir.join("guest-sealed.img");
    seal_and_sign(&plain, &sealed, &key).unwrap();
    let bytes = std::fs::read(&sealed).unwrap();
    let mut source = imgengine::source::Source::open(
        &imgengine::source::Location::File(sealed.clone()),
        &Default::default(),
    )
    .unwrap();
    let info = imgengine::format::read_info(&mut source).unwrap();

    let disk = device(&dir, 1024, Made::Install);
    let d = disk.to_str().unwrap();
    assert!(img(&["-convert", &format!("-disk={d}"), "-image=50MB"])
        .status
        .success());
    let mut a = BackupArea::open(&disk, true).unwrap();
    a.begin(
        ImageStamp {
            name: "guest".into(),
            version: "2".into(),
        },
        &info.manifest_digest,
        bytes.len() as u64,
    )
    .unwrap();
    for (i, c) in bytes.chunks(1 << 20).enumerate() {
        a.write_at((i << 20) as u64, c).unwrap();
    }
    a.commit(bytes.len() as u64).unwrap();
    a.finish().unwrap();
    drop(a);

    let opts = DeployOptions {
        trusted_keys: vec![key.verifying_key()],
        state_dir: dir.join("state"),
        threads: 2,
        ..Default::default()
    };
    // A flipped byte in the middle of the area's copy: refused.
    let a = BackupArea::open(&disk, true).unwrap();
    let flip_at = a.segments()[0].0 + bytes.len() as u64 / 2;
    drop(a);
    let orig = read_range(&disk, flip_at, 1);
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(&disk).unwrap();
    f.write_all_at(&[orig[0] ^ 0x40], flip_at).unwrap();
    let a = BackupArea::open(&disk, false).unwrap();
    let e = OpenedImage::open_source(a.image_source().unwrap())
        .and_then(|o| o.deploy(&disk, Some("2"), &opts, &NoProgress))
        .unwrap_err();
    assert!(
        matches!(
            e.kind(),
            imgengine::ErrorKind::Corrupt | imgengine::ErrorKind::Signature
        ),
        "{e}"
    );
    drop(a);
    f.write_all_at(&orig, flip_at).unwrap();
    // Intact: deployed into partition 2 from the area, the marker reads back.
    let a = BackupArea::open(&disk, false).unwrap();
    let opened = OpenedImage::open_source(a.image_source().unwrap()).unwrap();
    assert!(opened
        .location()
        .to_string()
        .contains("backup partition 3 of"));
    let sum = opened.deploy(&disk, Some("2"), &opts, &NoProgress).unwrap();
    assert!(sum.chunks_written > 0);
    let os_at = 17 * MB;
    let marker = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {d}@@{os_at} ::VERSION.TXT"
    ));
    assert_eq!(marker, "guest v2\n");
    let (_, blob) = mcopy_ranges(&disk, os_at, "BLOB.BIN", &[(0, 3_000_000)]);
    assert!(blob[0] == sample_bytes(7, 3_000_000));
    sgdisk_verify(&disk);
}

#[test]
fn a_flash_too_small_is_refused_with_the_sizes_and_nothing_written() {
    tools();
    let dir = Scratch::new("autogenic-small");
    let disk = device(&dir, 1024, Made::Mkfs);
    let d = disk.to_str().unwrap();
    let before = std::fs::read(&disk).unwrap();
    let o = img(&["-convert", &format!("-disk={d}"), "-image=600MB"]);
    let t = text(&o);
    assert_eq!(o.status.code(), Some(5), "{t}");
    assert!(
        t.contains("flash of 1024 MB cannot hold the OS partition and the backup")
            && t.contains("700 MB")
            && t.contains("a device with more flash"),
        "{t}"
    );
    let o = img(&[
        "-layout",
        &format!("-disk={d}"),
        "-image=300MB",
        "-backup=900MB",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("a smaller -backup"), "{}", text(&o));
    assert!(
        std::fs::read(&disk).unwrap() == before,
        "a refused conversion wrote"
    );
    // Enlarging the backup on flash over 4096 MB.
    let big = device(&dir, 8192, Made::Mkfs);
    let o = img(&[
        "-convert",
        &format!("-disk={}", big.display()),
        "-image=1GB",
        "-backup=2GB",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(
        text(&o).contains("only on flash of 4096 MB or less"),
        "{}",
        text(&o)
    );
    // Usage errors exit 2.
    let o = img(&["-convert", &format!("-disk={d}")]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("-convert needs -image"), "{}", text(&o));
    let o = img(&["-layout", &format!("-disk={d}"), "-image=lots"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    // No boot-agent partition: the layout is shown, the conversion refused.
    let bare = dir.join("bare.img");
    std::fs::File::create(&bare)
        .unwrap()
        .set_len(2048 * MB)
        .unwrap();
    run(Command::new("sgdisk").args(["-o", "-n1:1M:0"]).arg(&bare));
    let o = img(&[
        "-layout",
        &format!("-disk={}", bare.display()),
        "-image=500MB",
    ]);
    assert!(
        o.status.success() && text(&o).contains("img -install"),
        "{}",
        text(&o)
    );
    let o = img(&[
        "-convert",
        &format!("-disk={}", bare.display()),
        "-image=500MB",
    ]);
    assert_eq!(o.status.code(), Some(5), "{}", text(&o));
    assert!(text(&o).contains("no boot-agent partition"), "{}", text(&o));
}
