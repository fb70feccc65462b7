//! The imaging engine end to end, through its library API, against the real tools that
//! make and check the file systems and partition tables.
//!
//! Each test builds a small disk (tens of MiB) with mkfs.fat / mkntfs / sgdisk / sfdisk,
//! fills it with mtools / ntfscp, captures it with `imgengine::capture`, deploys the image
//! onto a file full of junk with `imgengine::deploy`, and asks the same tools whether the
//! result is intact (fsck.fat -n, ntfsfix -n, sgdisk -v) and whether every file reads back
//! byte for byte. The failure cases (flipped byte, truncation, swapped chunks, bad
//! signature, wrong key) check the target's bytes: nothing past the bad chunk is written.
//! A missing tool fails the test with a pointer to `scripts/install-deps.sh`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use e2e::{require_tool, sample_bytes, sh, Nginx, Scratch};
use imgengine::capture::{capture, CaptureOptions, CaptureSummary};
use imgengine::deploy::{deploy, verify, DeployOptions, DeploySummary, ResumeMode};
use imgengine::disk::{read_layout, TableKind};
use imgengine::format::read_info;
use imgengine::format::{ChunkKind, ImageReader, ManifestEntry};
use imgengine::io::NoProgress;
use imgengine::sign::{seal_and_sign, SigningKey};
use imgengine::source::{HttpConfig, Location, Source};
use imgengine::ErrorKind;

const MIB: u64 = 1 << 20;

fn tools(names: &[&str]) {
    for n in names {
        require_tool(n);
    }
}

fn opts(dir: &Scratch) -> DeployOptions {
    DeployOptions {
        state_dir: dir.join("state"),
        threads: 2,
        resume: ResumeMode::Auto,
        ..Default::default()
    }
}

fn capture_to(disk: &Path, part: Option<&str>, out: &Path, raw: bool) -> CaptureSummary {
    capture_chunked(disk, part, out, raw, 1 << 20)
}

fn capture_chunked(
    disk: &Path,
    part: Option<&str>,
    out: &Path,
    raw: bool,
    chunk_size: u32,
) -> CaptureSummary {
    let mut f = fs::File::create(out).unwrap();
    let o = CaptureOptions {
        name: "e2e".into(),
        version: "1".into(),
        comp: 3,
        raw,
        threads: 2,
        chunk_size,
        ..Default::default()
    };
    capture(disk, part, &mut f, &o, &NoProgress).unwrap()
}

fn deploy_file(
    img: &Path,
    target: &Path,
    part: Option<&str>,
    o: &DeployOptions,
) -> imgengine::Result<DeploySummary> {
    deploy(
        &Location::File(img.to_path_buf()),
        target,
        part,
        o,
        &NoProgress,
    )
}

/// An empty (sparse) disk-image file of `len` bytes: a deploy never creates its target.
fn fresh_file(path: &Path, len: u64) {
    fs::File::create(path).unwrap().set_len(len).unwrap();
}

/// A file of `len` bytes of junk (what an old disk looks like).
fn junk_file(path: &Path, len: u64) -> Vec<u8> {
    let junk = sample_bytes(0xdead, len as usize);
    fs::write(path, &junk).unwrap();
    junk
}

fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    let mut buf = vec![0u8; len as usize];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

/// Extract `[offset, offset+len)` of `disk` into its own file (for fsck.fat / ntfsfix).
fn extract(disk: &Path, offset: u64, len: u64, out: &Path) {
    fs::write(out, read_range(disk, offset, len)).unwrap();
}

fn entries(img: &Path) -> Vec<ManifestEntry> {
    let bytes = fs::read(img).unwrap();
    let mut r = ImageReader::open(&bytes[..]).unwrap();
    while r.next_chunk().unwrap().is_some() {}
    r.manifest().unwrap().0.entries.clone()
}

// ---------------------------------------------------------------------------------------
// File systems made by the real tools.

type Files = Vec<(String, Vec<u8>)>;

/// A FAT file system at byte `offset` of `disk` (created if needed), `kib` KiB long,
/// with a few files, a sub-directory and a deleted file (fragmented allocation).
fn make_fat(dir: &Scratch, disk: &Path, offset: u64, kib: u64, fat: u32) -> Files {
    let mut files = Vec::new();
    for (i, size) in [(1u64, 5000usize), (2, 700_000), (3, 1_500_000), (4, 60_000)] {
        let data = sample_bytes(i * 31 + u64::from(fat), size);
        fs::write(dir.join(format!("fat-f{i}")), &data).unwrap();
        files.push((format!("F{i}"), data));
    }
    let sectors = if fat == 32 { "-s 1" } else { "" };
    sh(&format!(
        "cd {d}; export MTOOLS_SKIP_CHECK=1; i={disk}@@{offset}
         mkfs.fat -F {fat} {sectors} -n E2EFAT{fat} --offset {sec} {disk} {kib} >/dev/null
         mcopy -i $i fat-f1 ::F1; mcopy -i $i fat-f2 ::GONE; mmd -i $i ::SUB; mcopy -i $i fat-f3 ::SUB/F3
         mcopy -i $i fat-f2 ::F2; mdel -i $i ::GONE; mcopy -i $i fat-f4 ::F4",
        d = dir.path().display(),
        disk = disk.display(),
        sec = offset / 512,
    ));
    files
        .into_iter()
        .map(|(n, d)| {
            if n == "F3" {
                ("SUB/F3".to_string(), d)
            } else {
                (n, d)
            }
        })
        .collect()
}

/// fsck.fat passes on the FAT volume at `offset` of `disk` and every file reads back.
fn check_fat(dir: &Scratch, disk: &Path, offset: u64, len: u64, files: &Files) {
    let vol = dir.join("check-fat.img");
    extract(disk, offset, len, &vol);
    sh(&format!("fsck.fat -n {} >/dev/null", vol.display()));
    for (name, data) in files {
        let out = dir.join("readback");
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -n -i {} ::{name} {}",
            vol.display(),
            out.display()
        ));
        assert!(
            fs::read(&out).unwrap() == *data,
            "FAT file {name} differs after deploy"
        );
    }
}

/// An NTFS volume of `len` bytes made by mkntfs in its own file, with files from ntfscp.
fn make_ntfs(dir: &Scratch, vol: &Path, len: u64) -> Files {
    let mut files = Vec::new();
    for (i, size) in [(1u64, 3000usize), (2, 900_000), (3, 2_000_000)] {
        let data = sample_bytes(i * 101, size);
        fs::write(dir.join(format!("ntfs-f{i}")), &data).unwrap();
        files.push((format!("N{i}"), data));
    }
    sh(&format!(
        "cd {d}; truncate -s {len} {v}; mkntfs -F -Q -q -L E2ENTFS {v}
         ntfscp {v} ntfs-f1 N1 >/dev/null; ntfscp {v} ntfs-f2 N2 >/dev/null; ntfscp {v} ntfs-f3 N3 >/dev/null",
        d = dir.path().display(),
        v = vol.display(),
    ));
    files
}

/// ntfsfix -n passes on the NTFS volume at `offset` of `disk` and every file reads back.
fn check_ntfs(dir: &Scratch, disk: &Path, offset: u64, len: u64, files: &Files) {
    let vol = dir.join("check-ntfs.img");
    extract(disk, offset, len, &vol);
    sh(&format!("ntfsfix -n {} >/dev/null", vol.display()));
    for (name, data) in files {
        let out = dir.join("readback");
        sh(&format!(
            "ntfscat {} {name} > {}",
            vol.display(),
            out.display()
        ));
        assert!(
            fs::read(&out).unwrap() == *data,
            "NTFS file {name} differs after deploy"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Partition images.

fn fat_partition_roundtrip(fat: u32, kib: u64) {
    tools(&["mkfs.fat", "fsck.fat", "mcopy", "mmd", "mdel"]);
    let dir = Scratch::new(&format!("engine-fat{fat}"));
    let disk = dir.join("disk.raw");
    // The volume sits 1 MiB into a plain file, as in a partition.
    junk_file(&disk, MIB + kib * 1024);
    let files = make_fat(&dir, &disk, MIB, kib, fat);
    // Capture only the volume: a bare file with no table, so point a window at it.
    let vol = dir.join("vol.raw");
    extract(&disk, MIB, kib * 1024, &vol);
    let img = dir.join("fat.img");
    let s = capture_to(&vol, None, &img, false);
    let part_len = kib * 1024;
    assert!(
        s.image_bytes < part_len / 4,
        "image {} bytes for a {part_len}-byte partition",
        s.image_bytes
    );
    assert!(s.data_bytes < part_len / 2, "{s:?}");

    let target = dir.join("fresh.raw");
    fresh_file(&target, part_len);
    let d = deploy_file(&img, &target, None, &opts(&dir)).unwrap();
    assert!(!d.raw && d.chunks_written == s.chunks, "{d:?} vs {s:?}");
    assert_eq!(fs::metadata(&target).unwrap().len(), part_len);
    check_fat(&dir, &target, 0, part_len, &files);
    // The deployed file is sparse: unused space was never written.
    let used_blocks = sh(&format!("stat -c %b {}", target.display()))
        .trim()
        .parse::<u64>()
        .unwrap()
        * 512;
    assert!(
        used_blocks < part_len / 2,
        "target has {used_blocks} allocated bytes"
    );
    let info = verify(&Location::File(img), &opts(&dir), &NoProgress).unwrap();
    assert_eq!(info.chunks, s.chunks);
}

#[test]
fn fat32_partition_captures_used_blocks_and_deploys_intact() {
    fat_partition_roundtrip(32, 40 * 1024);
}

#[test]
fn fat16_partition_captures_used_blocks_and_deploys_intact() {
    fat_partition_roundtrip(16, 16 * 1024);
}

#[test]
fn ntfs_partition_captures_used_blocks_and_deploys_intact() {
    tools(&["mkntfs", "ntfscp", "ntfscat", "ntfsfix"]);
    let dir = Scratch::new("engine-ntfs");
    let vol = dir.join("ntfs.raw");
    let len = 32 * MIB;
    let files = make_ntfs(&dir, &vol, len);
    let img = dir.join("ntfs.img");
    let s = capture_to(&vol, None, &img, false);
    assert!(
        s.image_bytes < len / 4,
        "image {} bytes for a {len}-byte volume",
        s.image_bytes
    );
    let target = dir.join("target.raw");
    junk_file(&target, len);
    deploy_file(&img, &target, None, &opts(&dir)).unwrap();
    check_ntfs(&dir, &target, 0, len, &files);
}

// ---------------------------------------------------------------------------------------
// Whole disks.

const DISK: u64 = 64 * MIB;
const P1: (u64, u64) = (MIB, 20 * MIB); // FAT16
const P2: (u64, u64) = (21 * MIB, 20 * MIB); // NTFS
const P3: (u64, u64) = (41 * MIB, 8 * MIB); // unknown content
const GAP: u64 = 64 << 10; // boot-loader bytes between the table and partition 1

struct TestDisk {
    path: PathBuf,
    fat: Files,
    ntfs: Files,
}

fn make_disk(dir: &Scratch, gpt: bool) -> TestDisk {
    let path = dir.join("source.raw");
    fs::write(&path, []).unwrap();
    sh(&format!("truncate -s {DISK} {}", path.display()));
    let s = |x: u64| x / 512;
    if gpt {
        sh(&format!(
            "sgdisk -n 1:{}:+{} -t 1:0700 -c 1:DATA -n 2:{}:+{} -t 2:0700 -c 2:WIN -n 3:{}:+{} -t 3:8300 -c 3:OTHER {} >/dev/null",
            s(P1.0),
            s(P1.1),
            s(P2.0),
            s(P2.1),
            s(P3.0),
            s(P3.1),
            path.display()
        ));
    } else {
        sh(&format!(
            "printf 'label: dos\\nstart={}, size={}, type=6\\nstart={}, size={}, type=7\\nstart={}, size={}, type=83\\n' | sfdisk -q {}",
            s(P1.0),
            s(P1.1),
            s(P2.0),
            s(P2.1),
            s(P3.0),
            s(P3.1),
            path.display()
        ));
    }
    let fat = make_fat(dir, &path, P1.0, P1.1 / 1024, 16);
    let ntfs_vol = dir.join("ntfs-part.raw");
    let ntfs = make_ntfs(dir, &ntfs_vol, P2.1);
    let f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(&path)
        .unwrap();
    f.write_all_at(&fs::read(&ntfs_vol).unwrap(), P2.0).unwrap();
    // Unknown content: data at the start and in the middle, zeros elsewhere.
    f.write_all_at(&sample_bytes(7, 1 << 20), P3.0).unwrap();
    f.write_all_at(&sample_bytes(8, 100_000), P3.0 + 5 * MIB)
        .unwrap();
    // A boot loader in the gap.
    f.write_all_at(&sample_bytes(9, 8192), GAP).unwrap();
    let layout = read_layout(&f, DISK).unwrap();
    assert_eq!(layout.partitions.len(), 3, "{layout:?}");
    assert_eq!(
        (layout.partitions[0].start, layout.partitions[1].start),
        (P1.0, P2.0)
    );
    TestDisk { path, fat, ntfs }
}

fn whole_disk_roundtrip(gpt: bool) {
    tools(&[
        "sgdisk", "sfdisk", "mkfs.fat", "fsck.fat", "mcopy", "mkntfs", "ntfscp", "ntfscat",
        "ntfsfix",
    ]);
    let dir = Scratch::new(if gpt { "engine-gpt" } else { "engine-mbr" });
    let src = make_disk(&dir, gpt);
    let img = dir.join("disk.img");
    let s = capture_to(&src.path, None, &img, false);
    assert!(s.image_bytes < DISK / 4, "{s:?}");
    let es = entries(&img);
    assert!(es.iter().any(|e| e.header.kind == ChunkKind::Table));
    assert!(
        es.iter().any(|e| e.header.kind == ChunkKind::Zero),
        "unknown content has zero runs"
    );
    let first_table = es
        .iter()
        .position(|e| e.header.kind == ChunkKind::Table)
        .unwrap();
    assert!(
        es[first_table..]
            .iter()
            .all(|e| e.header.kind == ChunkKind::Table),
        "table chunks come last"
    );

    let target = dir.join("target.raw");
    junk_file(&target, DISK);
    let d = deploy_file(&img, &target, None, &opts(&dir)).unwrap();
    assert_eq!(d.chunks_written, s.chunks);
    // The table is restored: same layout, and the tools accept it.
    let tf = fs::File::open(&target).unwrap();
    let (a, b) = (
        read_layout(&fs::File::open(&src.path).unwrap(), DISK).unwrap(),
        read_layout(&tf, DISK).unwrap(),
    );
    assert_eq!(a.table, if gpt { TableKind::Gpt } else { TableKind::Mbr });
    assert_eq!(
        a.partitions
            .iter()
            .map(|p| (p.start, p.len, p.type_id.clone()))
            .collect::<Vec<_>>(),
        b.partitions
            .iter()
            .map(|p| (p.start, p.len, p.type_id.clone()))
            .collect::<Vec<_>>()
    );
    for e in &a.table_extents {
        assert!(
            read_range(&src.path, e.offset, e.len) == read_range(&target, e.offset, e.len),
            "table bytes at {}",
            e.offset
        );
    }
    if gpt {
        sh(&format!(
            "sgdisk -v {} | grep -q 'No problems found'",
            target.display()
        ));
    } else {
        assert_eq!(
            sh(&format!(
                "sfdisk -d {} | grep -v '^device\\|^label-id' | sed 's|^[^:]*:||'",
                src.path.display()
            )),
            sh(&format!(
                "sfdisk -d {} | grep -v '^device\\|^label-id' | sed 's|^[^:]*:||'",
                target.display()
            ))
        );
    }
    check_fat(&dir, &target, P1.0, P1.1, &src.fat);
    check_ntfs(&dir, &target, P2.0, P2.1, &src.ntfs);
    // Unknown content and the boot-loader gap: every byte, zeros included.
    assert!(
        read_range(&src.path, P3.0, P3.1) == read_range(&target, P3.0, P3.1),
        "unknown partition differs"
    );
    assert!(
        read_range(&src.path, 0, P1.0) == read_range(&target, 0, P1.0),
        "boot-loader gap differs"
    );

    // One partition of the disk image onto the same partition of another disk.
    let p1img = dir.join("p1.img");
    capture_to(&src.path, Some("1"), &p1img, false);
    let other = dir.join("other.raw");
    fs::copy(&target, &other).unwrap();
    let f = fs::OpenOptions::new().write(true).open(&other).unwrap();
    f.write_all_at(&vec![0x5a; P1.1 as usize], P1.0).unwrap();
    deploy_file(&p1img, &other, Some("1"), &opts(&dir)).unwrap();
    check_fat(&dir, &other, P1.0, P1.1, &src.fat);

    // A whole-disk deploy that fails part-way leaves no valid-looking table.
    let bad = dir.join("bad.img");
    let mut bytes = fs::read(&img).unwrap();
    let victim = es
        .iter()
        .find(|e| e.header.kind == ChunkKind::Data && e.header.disk_offset >= P2.0)
        .unwrap();
    bytes[(victim.image_offset + 76 + 20) as usize] ^= 0xff;
    fs::write(&bad, &bytes).unwrap();
    // Writing everything (the target already holds the good image, whose chunks a default
    // deploy would find intact and not fetch, the bad one included).
    let mut never = opts(&dir);
    never.resume = ResumeMode::Never;
    let e = deploy_file(&bad, &target, None, &never).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains(&format!(
            "chunk {} at disk offset {}",
            victim.header.index, victim.header.disk_offset
        )),
        "{e}"
    );
    let after = read_layout(&fs::File::open(&target).unwrap(), DISK).unwrap();
    assert_eq!(
        after.table,
        TableKind::None,
        "the old table must be gone after a failed deploy"
    );
}

#[test]
fn whole_gpt_disk_deploys_onto_junk_with_table_restored() {
    whole_disk_roundtrip(true);
}

#[test]
fn whole_mbr_disk_deploys_onto_junk_with_table_restored() {
    whole_disk_roundtrip(false);
}

// ---------------------------------------------------------------------------------------
// Damaged and untrusted images: clear error, target unchanged past the bad point.

struct Fixture {
    dir: Scratch,
    img: PathBuf,
    vol_len: u64,
    entries: Vec<ManifestEntry>,
}

fn fixture(tag: &str) -> Fixture {
    tools(&["mkfs.fat", "mcopy", "mmd", "mdel"]);
    let dir = Scratch::new(tag);
    let vol = dir.join("vol.raw");
    let kib = 24 * 1024;
    fs::write(&vol, []).unwrap();
    sh(&format!("truncate -s {}K {}", kib, vol.display()));
    make_fat(&dir, &vol, 0, kib, 16);
    // Unknown content keeps every byte, so chunks are many and in disk order.
    let img = dir.join("img.img");
    capture_chunked(&vol, None, &img, true, 256 << 10);
    let entries = entries(&img);
    assert!(entries.len() >= 6, "{}", entries.len());
    Fixture {
        dir,
        img,
        vol_len: kib * 1024,
        entries,
    }
}

/// Deploy `img` onto junk; return the error and check no chunk from `first_bad` on was
/// written (the junk is still there), while the data chunks before it were.
fn expect_refused(
    f: &Fixture,
    img: &Path,
    o: &DeployOptions,
    first_bad: Option<u64>,
) -> imgengine::Error {
    let target = f.dir.join("target.raw");
    let junk = junk_file(&target, f.vol_len);
    let e = deploy_file(img, &target, None, o).unwrap_err();
    let got = fs::read(&target).unwrap();
    for en in &f.entries {
        let (off, len) = (en.header.disk_offset as usize, en.header.raw_len as usize);
        let untouched = got[off..off + len] == junk[off..off + len];
        match first_bad {
            Some(b) if en.header.index < b => {}
            _ => assert!(
                untouched,
                "chunk {} at {off} was written past the bad point ({e})",
                en.header.index
            ),
        }
    }
    e
}

#[test]
fn flipped_byte_is_caught_before_the_chunk_is_written() {
    let f = fixture("engine-flip");
    let victim = f
        .entries
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .nth(3)
        .unwrap();
    let mut bytes = fs::read(&f.img).unwrap();
    bytes[(victim.image_offset + 76 + victim.header.comp_len as u64 / 2) as usize] ^= 0x01;
    let bad = f.dir.join("flipped.img");
    fs::write(&bad, &bytes).unwrap();
    let e = expect_refused(&f, &bad, &opts(&f.dir), Some(victim.header.index));
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    let want = format!(
        "chunk {} at disk offset {}",
        victim.header.index, victim.header.disk_offset
    );
    assert!(e.to_string().contains(&want), "{e}");
    let e = verify(&Location::File(bad), &opts(&f.dir), &NoProgress).unwrap_err();
    assert!(e.to_string().contains(&want), "{e}");
}

#[test]
fn truncated_image_is_refused() {
    let f = fixture("engine-trunc");
    let bytes = fs::read(&f.img).unwrap();
    // Streaming layout on a file: the missing footer is seen before anything is written.
    let cut = f.dir.join("cut.img");
    fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let e = expect_refused(&f, &cut, &opts(&f.dir), Some(0));
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    // Sealed: the manifest is in front, so the deploy starts and stops at the cut chunk.
    let sealed = f.dir.join("sealed.img");
    seal_and_sign(&f.img, &sealed, &SigningKey::generate()).unwrap();
    let es = entries(&sealed);
    let victim = es[es.len() / 2];
    let sb = fs::read(&sealed).unwrap();
    fs::write(&cut, &sb[..(victim.image_offset + 30) as usize]).unwrap();
    let mut o = opts(&f.dir);
    o.resume = ResumeMode::Never;
    let e = expect_refused(&f, &cut, &o, Some(victim.header.index));
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    assert!(
        e.to_string()
            .contains(&format!("chunk {}", victim.header.index)),
        "{e}"
    );
}

#[test]
fn swapped_chunks_are_refused() {
    let f = fixture("engine-swap");
    let data: Vec<&ManifestEntry> = f
        .entries
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .collect();
    let (a, b) = (data[1], data[2]);
    assert_eq!(a.header.index + 1, b.header.index, "neighbours");
    let bytes = fs::read(&f.img).unwrap();
    let (ar, br) = (
        a.image_offset as usize..(a.image_offset + a.record_len()) as usize,
        b.image_offset as usize..(b.image_offset + b.record_len()) as usize,
    );
    let mut out = bytes[..ar.start].to_vec();
    out.extend_from_slice(&bytes[br.clone()]);
    out.extend_from_slice(&bytes[ar]);
    out.extend_from_slice(&bytes[br.end..]);
    let bad = f.dir.join("swapped.img");
    fs::write(&bad, &out).unwrap();
    let e = expect_refused(&f, &bad, &opts(&f.dir), Some(a.header.index));
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(
        e.to_string().contains(&format!("chunk {}", b.header.index)),
        "{e}"
    );
}

#[test]
fn bad_signature_and_wrong_key_write_nothing() {
    let f = fixture("engine-sig");
    let key = SigningKey::generate();
    let sealed = f.dir.join("sealed.img");
    seal_and_sign(&f.img, &sealed, &key).unwrap();
    let mut o = opts(&f.dir);
    o.trusted_keys = vec![key.verifying_key()];
    // Unsigned (streaming) image.
    let e = expect_refused(&f, &f.img, &o, None);
    assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
    // Wrong key.
    let other = f.dir.join("other.img");
    seal_and_sign(&f.img, &other, &SigningKey::generate()).unwrap();
    let e = expect_refused(&f, &other, &o, None);
    assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    // Signature bytes damaged: the signature block is right before chunk 0.
    let es = entries(&sealed);
    let mut bytes = fs::read(&sealed).unwrap();
    bytes[(es[0].image_offset - 10) as usize] ^= 0x80;
    let bad = f.dir.join("badsig.img");
    fs::write(&bad, &bytes).unwrap();
    let e = expect_refused(&f, &bad, &o, None);
    assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
    // The good one goes through, and verify names the key.
    let target = f.dir.join("good.raw");
    fresh_file(&target, f.vol_len);
    deploy_file(&sealed, &target, None, &o).unwrap();
    let info = verify(&Location::File(sealed), &o, &NoProgress).unwrap();
    assert_eq!(info.signed_by, Some(key.key_id().to_string()));
}

// ---------------------------------------------------------------------------------------
// Resume.

#[test]
fn interrupted_deploy_resumes_without_refetching_written_chunks() {
    let f = fixture("engine-resume");
    let sealed = f.dir.join("sealed.img");
    seal_and_sign(&f.img, &sealed, &SigningKey::generate()).unwrap();
    let full = fs::read(&sealed).unwrap();
    let es = entries(&sealed);
    let cut_at = es.len() * 2 / 3;
    let target = f.dir.join("target.raw");
    junk_file(&target, f.vol_len);
    // The first attempt loses its source in the middle of a chunk (a dead download).
    fs::write(&sealed, &full[..(es[cut_at].image_offset + 50) as usize]).unwrap();
    let e = deploy_file(&sealed, &target, None, &opts(&f.dir)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    // The second attempt has the whole image: only chunks from the cut on are fetched.
    fs::write(&sealed, &full).unwrap();
    let s = deploy_file(&sealed, &target, None, &opts(&f.dir)).unwrap();
    assert!(s.resumed, "{s:?}");
    let before_cut = es[..cut_at]
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .count() as u64;
    assert_eq!(s.chunks_skipped, before_cut, "{s:?}");
    let rest: u64 = es[cut_at..].iter().map(|e| e.record_len()).sum();
    let head = es[0].image_offset;
    // Besides the chunks: the first 4 KiB (preamble), the manifest and the signature.
    assert!(
        s.bytes_fetched <= rest + head + 4096,
        "fetched {} bytes; the rest is {rest}, the head {head}",
        s.bytes_fetched
    );
    // Byte-identical to a fresh deploy.
    let fresh = f.dir.join("fresh.raw");
    fresh_file(&fresh, f.vol_len);
    let mut o = opts(&f.dir);
    o.resume = ResumeMode::Never;
    deploy_file(&sealed, &fresh, None, &o).unwrap();
    assert!(fs::read(&fresh).unwrap() == fs::read(&target).unwrap());
}

#[test]
fn resume_over_http_uses_range_requests() {
    tools(&["zstd", "nginx"]);
    let f = fixture("engine-http");
    let www = f.dir.join("www");
    fs::create_dir_all(&www).unwrap();
    // A streaming (unsealed) image: over HTTP with ranges its manifest is read from the end.
    let full = fs::read(&f.img).unwrap();
    fs::write(www.join("a.img"), &full).unwrap();
    let nginx = Nginx::serve(&www);
    let url = Location::Url(nginx.url("a.img"));
    let target = f.dir.join("target.raw");
    junk_file(&target, f.vol_len);
    let first = deploy(&url, &target, None, &opts(&f.dir), &NoProgress).unwrap();
    assert!(!first.resumed);
    // Damage two chunks' regions on the target, then force a resume: only those come again.
    let data: Vec<&ManifestEntry> = f
        .entries
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .collect();
    let t = fs::OpenOptions::new().write(true).open(&target).unwrap();
    for e in [data[1], data[3]] {
        t.write_all_at(&[0xee; 512], e.header.disk_offset).unwrap();
    }
    let mut o = opts(&f.dir);
    o.resume = ResumeMode::Always;
    let sent_before = nginx.bytes_sent();
    let s = deploy(&url, &target, None, &o, &NoProgress).unwrap();
    assert!(s.resumed, "{s:?}");
    assert_eq!(s.chunks_skipped as usize, data.len() - 2, "{s:?}");
    let two = data[1].record_len() + data[3].record_len();
    let manifest_and_head = 4096 + 76 * f.entries.len() as u64 + 1024;
    assert!(
        s.bytes_fetched <= two + manifest_and_head,
        "fetched {} for two chunks of {two}",
        s.bytes_fetched
    );
    // nginx's log agrees that the body bytes were far fewer than the image.
    let sent = nginx.bytes_sent() - sent_before;
    assert!(
        sent < full.len() as u64 / 2,
        "nginx sent {sent} of {}",
        full.len()
    );
    let fresh = f.dir.join("fresh.raw");
    fresh_file(&fresh, f.vol_len);
    deploy_file(&f.img, &fresh, None, &opts(&f.dir)).unwrap();
    assert!(fs::read(&fresh).unwrap() == fs::read(&target).unwrap());

    // read_info over HTTP reads the head and the manifest only.
    let sent_before = nginx.bytes_sent();
    let mut src = Source::open(&url, &HttpConfig::default()).unwrap();
    let info = read_info(&mut src).unwrap();
    assert_eq!(info.chunks as usize, f.entries.len());
    assert!(!info.sealed && info.signed_by.is_none());
    assert_eq!(info.image_bytes, Some(full.len() as u64));
    assert_eq!(info.meta.name, "e2e");
    assert!(
        nginx.bytes_sent() - sent_before < 64 << 10,
        "read_info fetched the whole image"
    );

    // An ordinary .img.zst over HTTP is recognised and deployed raw.
    sh(&format!(
        "zstd -q -3 {} -o {}",
        fresh.display(),
        www.join("plain.img.zst").display()
    ));
    let raw_target = f.dir.join("raw-target.raw");
    fresh_file(&raw_target, f.vol_len);
    let s = deploy(
        &Location::Url(nginx.url("plain.img.zst")),
        &raw_target,
        None,
        &opts(&f.dir),
        &NoProgress,
    )
    .unwrap();
    assert!(s.raw, "{s:?}");
    assert!(fs::read(&raw_target).unwrap() == fs::read(&fresh).unwrap());
}

// ---------------------------------------------------------------------------------------
// Standard input: a real pipe into a child process (this test binary, re-run in child mode).

const CHILD_ENV: &str = "ENGINE_STDIN_CHILD_TARGET";

/// Child mode: deploy from standard input onto `$ENGINE_STDIN_CHILD_TARGET` and print one
/// `RESULT` line. Parent mode: drive the child through a pipe.
#[test]
fn stdin_pipe_deploys_and_an_interrupted_pipe_resumes_from_the_file() {
    if let Some(target) = std::env::var_os(CHILD_ENV) {
        let o = DeployOptions {
            state_dir: PathBuf::from(std::env::var_os("ENGINE_STDIN_CHILD_STATE").unwrap()),
            threads: 2,
            ..Default::default()
        };
        match deploy(&Location::Stdin, Path::new(&target), None, &o, &NoProgress) {
            Ok(s) => println!("RESULT ok written={} notes={:?}", s.chunks_written, s.notes),
            Err(e) => println!("RESULT err kind={:?} {e}", e.kind()),
        }
        return;
    }
    let f = fixture("engine-stdin");
    let sealed = f.dir.join("sealed.img");
    seal_and_sign(&f.img, &sealed, &SigningKey::generate()).unwrap();
    let target = f.dir.join("target.raw");
    let state = f.dir.join("state");
    let pipe = |image: &Path, bytes: Option<usize>| -> String {
        use std::io::Write;
        use std::process::{Command, Stdio};
        let mut child = Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "stdin_pipe_deploys_and_an_interrupted_pipe_resumes_from_the_file",
                "--nocapture",
            ])
            .env(CHILD_ENV, &target)
            .env("ENGINE_STDIN_CHILD_STATE", &state)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let data = fs::read(image).unwrap();
        let n = bytes.unwrap_or(data.len());
        let mut stdin = child.stdin.take().unwrap();
        // The child may stop reading early (an error): a broken pipe is fine then.
        let _ = stdin.write_all(&data[..n]);
        drop(stdin);
        let out = child.wait_with_output().unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        text.lines()
            .find(|l| l.starts_with("RESULT"))
            .unwrap_or_else(|| panic!("child said:\n{text}"))
            .to_string()
    };

    // A streaming image through a pipe deploys like from a file.
    junk_file(&target, f.vol_len);
    let r = pipe(&f.img, None);
    assert!(r.starts_with("RESULT ok"), "{r}");
    let fresh = f.dir.join("fresh.raw");
    fresh_file(&fresh, f.vol_len);
    deploy_file(&f.img, &fresh, None, &opts(&f.dir)).unwrap();
    assert!(fs::read(&fresh).unwrap() == fs::read(&target).unwrap());

    // A sealed image through a pipe that dies half-way: Truncated, journal left behind.
    junk_file(&target, f.vol_len);
    let len = fs::metadata(&sealed).unwrap().len() as usize;
    let r = pipe(&sealed, Some(len / 2));
    assert!(r.contains("kind=Truncated"), "{r}");
    // The rerun from standard input cannot resume and says so, then deploys everything.
    let r = pipe(&sealed, None);
    assert!(
        r.starts_with("RESULT ok") && r.contains("cannot resume"),
        "{r}"
    );
    assert!(fs::read(&fresh).unwrap() == fs::read(&target).unwrap());

    // Interrupted again; this time the rerun reads the file, and resumes.
    junk_file(&target, f.vol_len);
    let r = pipe(&sealed, Some(len * 2 / 3));
    assert!(r.contains("kind=Truncated"), "{r}");
    let s = deploy_file(&sealed, &target, None, &opts(&f.dir)).unwrap();
    assert!(s.resumed && s.chunks_skipped > 0, "{s:?}");
    assert!(s.bytes_fetched < len as u64 / 2 + 8192, "{s:?}");
    assert!(fs::read(&fresh).unwrap() == fs::read(&target).unwrap());
}
