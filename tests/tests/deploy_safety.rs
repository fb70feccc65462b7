//! `img -restore` refuses what would silently lose data, before it writes anything: a
//! partition image aimed at a whole disk, a target that is missing or too small, and images
//! whose chunk extents cannot be right (overlapping, past the target, a "table" chunk over
//! partition data, a chunk longer than the image's chunk size). A re-run of a finished
//! restore finds the chunks already on the target and skips them. The disks are made by
//! sgdisk, mkfs.fat and mtools; images are served by a real nginx; the `img` binary is run
//! as an operator would.

use std::path::Path;
use std::process::{Command, Output};

use e2e::{img_bin, require_tool, run, sh, Nginx, Scratch};
use imgengine::format::layout::{ChunkHeader, CHUNK_HEADER_LEN, FOOTER_LEN};
use imgengine::format::{ChunkKind, Manifest};

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

/// A 48 MiB GPT disk: partition 1 `BOOT` (FAT, 8 MiB), partition 2 `OS` (FAT, 32 MiB) with
/// a few files; the rest of the disk is `fill` (0 = sparse). Returns the OS partition's
/// byte offset.
fn make_disk(path: &Path, fill: u8, with_files: bool) -> u64 {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
    let _ = std::fs::remove_file(path);
    if fill == 0 {
        sh(&format!("truncate -s 48M {}", path.display()));
    } else {
        std::fs::write(path, vec![fill; (48 * MIB) as usize]).unwrap();
    }
    sh(&format!(
        "sgdisk -n 1:2048:+8M -t 1:0700 -c 1:BOOT -n 2:0:+32M -t 2:0700 -c 2:OS {} >/dev/null",
        path.display()
    ));
    let p2 = 2048 + 8 * 2048;
    if with_files {
        sh(&format!(
            "mkfs.fat -n BOOT --offset=2048 {} 8192 >/dev/null 2>&1",
            path.display()
        ));
        sh(&format!(
            "mkfs.fat -n OS --offset={p2} {} 32768 >/dev/null 2>&1",
            path.display()
        ));
        let dir = path.with_extension("files");
        std::fs::create_dir_all(&dir).unwrap();
        for (name, seed, len) in [("A.BIN", 1, 6 * MIB), ("B.BIN", 2, 3 * MIB + 77)] {
            let f = dir.join(name);
            std::fs::write(&f, e2e::random_bytes(seed, len as usize)).unwrap();
            sh(&format!(
                "mcopy -i {}@@{} {} ::/",
                path.display(),
                p2 * 512,
                f.display()
            ));
        }
    }
    p2 * 512
}

fn mtype(disk: &Path, offset: u64, name: &str) -> Vec<u8> {
    run(Command::new("mtype").args([
        "-i",
        &format!("{}@@{offset}", disk.display()),
        &format!("::/{name}"),
    ]))
    .stdout
}

#[test]
fn a_partition_image_onto_a_whole_disk_is_refused_with_the_way_out() {
    let s = Scratch::new("safe-part");
    let src = s.join("src.img");
    let os = make_disk(&src, 0, true);
    let image = s.join("os.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=OS",
    ]);
    let dst = s.join("dst.img");
    make_disk(&dst, 0x5A, false);
    let before = std::fs::read(&dst).unwrap();
    let state = format!("-state={}", s.join("state").display());
    let r = img(&[
        "-restore",
        image.to_str().unwrap(),
        "-unsigned",
        &format!("-disk={}", dst.display()),
        &state,
    ]);
    let t = text(&r);
    assert_eq!(r.status.code(), Some(5), "{t}");
    assert!(
        t.contains("partition table") && t.contains("-part=") && t.contains("-wholedisk"),
        "{t}"
    );
    assert!(
        std::fs::read(&dst).unwrap() == before,
        "the refused restore wrote to the disk"
    );
    assert!(sh(&format!("sgdisk -v {}", dst.display())).contains("No problems found"));

    // The way out, 1: name the partition.
    ok(&[
        "-restore",
        image.to_str().unwrap(),
        "-unsigned",
        &format!("-disk={}", dst.display()),
        "-part=OS",
        &state,
    ]);
    assert!(mtype(&dst, os, "A.BIN") == e2e::random_bytes(1, 6 * MIB as usize));
    // The way out, 2: a disk without a partition table (a "superfloppy"), on purpose.
    let floppy = s.join("floppy.img");
    sh(&format!("truncate -s 32M {}", floppy.display()));
    ok(&[
        "-restore",
        image.to_str().unwrap(),
        "-unsigned",
        &format!("-disk={}", floppy.display()),
        "-wholedisk",
        &state,
    ]);
    assert!(mtype(&floppy, 0, "B.BIN") == e2e::random_bytes(2, (3 * MIB + 77) as usize));
    run(Command::new("fsck.fat").args(["-n", floppy.to_str().unwrap()]));
}

#[test]
fn a_missing_or_smaller_target_is_refused_never_created_or_grown() {
    let s = Scratch::new("safe-size");
    let src = s.join("src.img");
    make_disk(&src, 0, true);
    let image = s.join("disk.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
    ]);
    let raw_zst = s.join("disk.img.zst");
    sh(&format!(
        "zstd -q -3 {} -o {}",
        src.display(),
        raw_zst.display()
    ));
    let state = format!("-state={}", s.join("state").display());

    let raw_gz = s.join("disk.img.gz");
    sh(&format!(
        "gzip -1 -c {} > {}",
        src.display(),
        raw_gz.display()
    ));
    for source in [&image, &src, &raw_zst, &raw_gz] {
        // A mistyped path: an error naming the path, nothing created.
        let missing = s.join("no-such-disk.img");
        let r = img(&[
            "-restore",
            source.to_str().unwrap(),
            "-unsigned",
            &format!("-disk={}", missing.display()),
            &state,
        ]);
        let t = text(&r);
        assert_eq!(r.status.code(), Some(5), "{}: {t}", source.display());
        assert!(t.contains("does not exist"), "{t}");
        assert!(!missing.exists(), "{} created the target", source.display());

        // A disk-image file 1 MiB smaller than the image's disk: refused, not grown.
        let small = s.join("small.img");
        std::fs::write(&small, vec![0x5Au8; (47 * MIB) as usize]).unwrap();
        let r = img(&[
            "-restore",
            source.to_str().unwrap(),
            "-unsigned",
            &format!("-disk={}", small.display()),
            &state,
        ]);
        let t = text(&r);
        assert_eq!(r.status.code(), Some(5), "{}: {t}", source.display());
        assert!(t.contains("larger"), "{t}");
        let after = std::fs::read(&small).unwrap();
        assert_eq!(
            after.len() as u64,
            47 * MIB,
            "{} grew the target",
            source.display()
        );
        // Refused before a byte is written: our image (its metadata), a plain raw image (its
        // length) and a zstd one (the frame header carries the content size). A gzip
        // image's size is known only at its end: it stops there, the file not grown.
        if source != &raw_gz {
            assert!(
                after.iter().all(|&b| b == 0x5A),
                "{}: written before refusing",
                source.display()
            );
        }
    }
}

#[test]
fn a_rerun_of_a_finished_restore_skips_the_chunks_already_on_the_target() {
    let s = Scratch::new("safe-rerun");
    let src = s.join("src.img");
    make_disk(&src, 0, true);
    let www = s.join("www");
    std::fs::create_dir_all(&www).unwrap();
    ok(&[
        "-make",
        www.join("d.fimg").to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=1",
    ]);
    let image_len = std::fs::metadata(www.join("d.fimg")).unwrap().len();
    let nginx = Nginx::serve(&www);
    let dst = s.join("dst.img");
    std::fs::write(&dst, vec![0x33u8; (48 * MIB) as usize]).unwrap();
    let args = |extra: &str| {
        let mut v = vec![
            "-restore".to_string(),
            nginx.url("d.fimg"),
            "-unsigned".to_string(),
            format!("-disk={}", dst.display()),
            format!("-state={}", s.join("state").display()),
        ];
        if !extra.is_empty() {
            v.push(extra.to_string());
        }
        v
    };
    let run_img = |extra: &str| {
        let before = nginx.bytes_sent_when_idle();
        let a = args(extra);
        let r = ok(&a.iter().map(String::as_str).collect::<Vec<_>>());
        (text(&r), nginx.bytes_sent_when_idle() - before)
    };
    let intact = |t: &str| -> u64 {
        t.split(" already intact")
            .next()
            .and_then(|a| a.rsplit(' ').next())
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("no intact count in: {t}"))
    };
    let (t, _) = run_img("");
    assert_eq!(intact(&t), 0, "{t}");
    let first = std::fs::read(&dst).unwrap();

    // The same restore again, with no options: every data chunk is found intact, none is
    // fetched, and the result is the same.
    let (t, sent) = run_img("");
    let data_chunks = {
        let m = manifest_of(&www.join("d.fimg")).0;
        m.entries
            .iter()
            .filter(|e| e.header.kind == ChunkKind::Data)
            .count() as u64
    };
    eprintln!("re-run: {t}; fetched {sent} of {image_len} bytes");
    assert_eq!(intact(&t), data_chunks, "{t}");
    assert!(
        sent < image_len / 10,
        "the re-run fetched {sent} of {image_len} bytes"
    );
    assert!(std::fs::read(&dst).unwrap() == first);
    assert!(sh(&format!("sgdisk -v {}", dst.display())).contains("No problems found"));

    // -resume=never still writes everything.
    let (t, sent) = run_img("-resume=never");
    assert_eq!(intact(&t), 0, "{t}");
    assert!(sent >= image_len * 9 / 10, "{sent} of {image_len}");
    assert!(std::fs::read(&dst).unwrap() == first);
}

/// The manifest of a streaming image file, and where it starts.
fn manifest_of(image: &Path) -> (Manifest, usize) {
    let b = std::fs::read(image).unwrap();
    let f = &b[b.len() - FOOTER_LEN..];
    let off = u64::from_le_bytes(f[8..16].try_into().unwrap()) as usize;
    let len = u64::from_le_bytes(f[16..24].try_into().unwrap()) as usize;
    (Manifest::decode(&b[off..off + len]).unwrap(), off)
}

/// Rewrite chunk `index` of a streaming image, consistently in its record header and in
/// the manifest (both with valid CRCs): what a forger can do to an unsigned image.
fn forge(image: &Path, out: &Path, index: usize, edit: impl Fn(&mut ChunkHeader)) {
    let (mut m, moff) = manifest_of(image);
    let mut b = std::fs::read(image).unwrap();
    let e = &mut m.entries[index];
    edit(&mut e.header);
    let at = e.image_offset as usize;
    b[at..at + CHUNK_HEADER_LEN].copy_from_slice(&e.header.encode());
    let enc = m.encode();
    b[moff..moff + enc.len()].copy_from_slice(&enc);
    std::fs::write(out, b).unwrap();
}

/// A change to one chunk header.
type Edit = Box<dyn Fn(&mut ChunkHeader)>;

#[test]
fn hostile_chunk_extents_are_refused_before_the_target_is_touched() {
    let s = Scratch::new("safe-forge");
    let src = s.join("src.img");
    let os = make_disk(&src, 0, true);
    let image = s.join("disk.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=1",
    ]);
    let (m, _) = manifest_of(&image);
    let data: Vec<usize> = (0..m.entries.len())
        .filter(|&i| m.entries[i].header.kind == ChunkKind::Data)
        .collect();
    let table = (0..m.entries.len())
        .find(|&i| m.entries[i].header.kind == ChunkKind::Table)
        .expect("a GPT disk image has table chunks");
    let (d1, d2) = (data[1], data[2]);
    let prev_off = m.entries[d1].header.disk_offset + m.entries[d1].header.raw_len / 2;
    let last_data = *data.last().unwrap();
    let cases: Vec<(&str, usize, Edit, &str)> = vec![
        (
            "overlap",
            d2,
            Box::new(move |h| h.disk_offset = prev_off),
            "overlaps",
        ),
        (
            "table-over-data",
            table,
            Box::new(move |h| h.disk_offset = os + 64 * 1024),
            "outside the image's table regions",
        ),
        (
            "past-the-end",
            last_data,
            Box::new(|h| h.disk_offset = 48 * MIB - 4096),
            "past the",
        ),
        (
            "longer-than-chunk-size",
            d1,
            Box::new(|h| h.raw_len = 2 * MIB),
            "chunk size",
        ),
    ];
    let dst = s.join("dst.img");
    let state = format!("-state={}", s.join("state").display());
    for (name, index, edit, want) in cases {
        let forged = s.join(format!("{name}.fimg"));
        forge(&image, &forged, index, edit);
        make_disk(&dst, 0x5A, false);
        let before = std::fs::read(&dst).unwrap();
        let r = img(&[
            "-restore",
            forged.to_str().unwrap(),
            "-unsigned",
            &format!("-disk={}", dst.display()),
            &state,
        ]);
        let t = text(&r);
        assert!(!r.status.success(), "{name}: accepted\n{t}");
        assert!(t.contains(want), "{name}: {t}");
        assert!(
            std::fs::read(&dst).unwrap() == before,
            "{name}: the target was changed (tables invalidated or chunks written) before the image was refused"
        );
    }
    // From a pipe the manifest comes last, so each chunk is checked as it arrives: the
    // overlapping chunk is refused before it is written (the chunks before it are).
    let forged = s.join("overlap.fimg");
    make_disk(&dst, 0x5A, false);
    let r = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "{} -restore - -unsigned -disk={} {state} < {}",
            img_bin().display(),
            dst.display(),
            forged.display()
        ))
        .output()
        .unwrap();
    let t = text(&r);
    assert_eq!(r.status.code(), Some(3), "{t}");
    assert!(t.contains("overlaps"), "{t}");
    let d1h = m.entries[d1].header;
    let (a, b) = (
        d1h.disk_offset as usize,
        (d1h.disk_offset + d1h.raw_len) as usize,
    );
    assert!(
        std::fs::read(&dst).unwrap()[a..b] == std::fs::read(&src).unwrap()[a..b],
        "the chunk the forged one overlaps was overwritten"
    );

    // The untouched image deploys.
    ok(&[
        "-restore",
        image.to_str().unwrap(),
        "-unsigned",
        &format!("-disk={}", dst.display()),
        &state,
    ]);
    assert!(mtype(&dst, os, "A.BIN") == e2e::random_bytes(1, 6 * MIB as usize));
}

/// Run `img ARGS` to the end; returns its output and its peak RSS in KiB. The RSS is
/// getrusage(RUSAGE_CHILDREN) in a small python3 parent: a child of this (large) test
/// process would inherit the test's own high-water mark through vfork/exec.
fn img_peak_rss(args: &[&str]) -> (Output, u64) {
    require_tool("python3");
    const MEASURE: &str = "import resource, subprocess, sys\n\
r = subprocess.run(sys.argv[2:])\n\
open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss))\n\
sys.exit(r.returncode)\n";
    let rss_file = std::env::temp_dir().join(format!("e2e-rss-{}", std::process::id()));
    let o = Command::new("python3")
        .arg("-c")
        .arg(MEASURE)
        .arg(&rss_file)
        .arg(img_bin())
        .args(args)
        .env("IMG_QUIET", "1")
        .output()
        .expect("running python3");
    assert!(o.status.success(), "img {args:?}: {}", text(&o));
    let rss = std::fs::read_to_string(&rss_file)
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let _ = std::fs::remove_file(&rss_file);
    (o, rss)
}

#[test]
fn peak_memory_stays_within_64_mib_with_64_mib_chunks() {
    require_tool("nginx");
    let s = Scratch::new("safe-rss");
    // Seven 64 MiB chunks: three of compressible text (zstd frames) and four of random
    // bytes (stored: 64 MiB payloads), on a disk without a partition table.
    let src = s.join("src.img");
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&src).unwrap();
        for i in 0..7u64 {
            let piece = if i < 3 {
                e2e::sample_bytes(i, (64 * MIB) as usize)
            } else {
                e2e::random_bytes(i, (64 * MIB) as usize)
            };
            f.write_all(&piece).unwrap();
        }
    }
    let www = s.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let image = www.join("big.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=64",
    ]);
    let (m, _) = manifest_of(&image);
    assert!(
        m.entries
            .iter()
            .filter(|e| e.header.raw_len == 64 * MIB)
            .count()
            >= 7,
        "the image has seven 64 MiB chunks"
    );
    let nginx = Nginx::serve(&www);
    let dst = s.join("dst.img");
    sh(&format!("truncate -s 448M {}", dst.display()));
    let state = format!("-state={}", s.join("state").display());
    let limit = 64 * 1024;
    let mut seen = Vec::new();
    for (what, args) in [
        (
            "restore over HTTP",
            vec![
                "-restore".to_string(),
                nginx.url("big.fimg"),
                "-unsigned".to_string(),
                format!("-disk={}", dst.display()),
                state.clone(),
            ],
        ),
        (
            "restore from a file, -resume=never",
            vec![
                "-restore".to_string(),
                image.display().to_string(),
                "-unsigned".to_string(),
                format!("-disk={}", dst.display()),
                state.clone(),
                "-resume=never".to_string(),
            ],
        ),
        (
            "verify",
            vec!["-verify".to_string(), image.display().to_string()],
        ),
    ] {
        let (_, rss) = img_peak_rss(&args.iter().map(String::as_str).collect::<Vec<_>>());
        eprintln!("{what}: peak RSS {} KiB", rss);
        seen.push((what, rss));
    }
    assert!(
        run(Command::new("cmp").args([src.as_os_str(), dst.as_os_str()]))
            .status
            .success(),
        "the restored disk differs from the source"
    );
    for (what, rss) in seen {
        assert!(
            rss <= limit,
            "{what}: peak RSS {rss} KiB is over the {limit} KiB (64 MiB) bound"
        );
    }
}
