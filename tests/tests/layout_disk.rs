//! Disk layouts against the tools that wrote the partition tables, and targets on them.
//!
//! GPT disks are made by sgdisk, MBR disks (with an extended partition holding logical
//! ones) by sfdisk; file systems go in with `mkfs.fat --offset` and mkntfs made in a
//! separate file and dd'ed to the partition offset (the kernel here has no partition
//! scanning for loop devices). `disk::read_layout` must report what `sfdisk --json` and
//! `sgdisk -p` say; `Target` must open partitions by number and label and write inside
//! them only. A loop device (losetup) exercises the block-device ioctls.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{require_tool, sample_bytes, sh, Scratch};
use imgengine::disk::{read_layout, DiskLayout, TableKind};
use imgengine::fs::{used_map, FsKind};
use imgengine::target::Target;
use imgengine::{ErrorKind, Extent};

fn layout_of(img: &Path) -> DiskLayout {
    let f = fs::File::open(img).unwrap();
    let size = f.metadata().unwrap().len();
    read_layout(&f, size).unwrap()
}

fn sfdisk_json(img: &Path) -> serde_json::Value {
    let out = sh(&format!("sfdisk --json {}", img.display()));
    serde_json::from_str(&out).unwrap()
}

/// 64 MiB GPT disk: 1 "EFI system" (FAT16 "ESP" with a file), 2 "Windows" (NTFS
/// "WINDOWS"), 3 "linux" (no file system).
fn gpt_disk(dir: &Scratch) -> PathBuf {
    for t in ["sgdisk", "sfdisk", "mkfs.fat", "mcopy", "mkntfs"] {
        require_tool(t);
    }
    let img = dir.join("gpt.img");
    fs::write(dir.join("boot.efi"), sample_bytes(3, 200_000)).unwrap();
    sh(&format!(
        "cd {d}; truncate -s 64M gpt.img
         sgdisk -n 1:2048:+8M -t 1:ef00 -c 1:'EFI system' -n 2:0:+30M -t 2:0700 -c 2:Windows -n 3:0:0 -t 3:8300 -c 3:linux gpt.img >/dev/null
         mkfs.fat --offset 2048 -F 16 -s 1 -n ESP gpt.img 8192 >/dev/null 2>&1
         mcopy -i gpt.img@@1048576 boot.efi ::BOOT.EFI
         truncate -s 30M ntfs.img; mkntfs -F -q -L WINDOWS ntfs.img >/dev/null 2>&1
         dd if=ntfs.img of=gpt.img bs=512 seek=18432 conv=notrunc status=none",
        d = dir.path().display()
    ));
    img
}

#[test]
fn gpt_layout_matches_sgdisk_and_sfdisk() {
    let dir = Scratch::new("layout-gpt");
    let img = gpt_disk(&dir);
    let l = layout_of(&img);
    assert_eq!(l.table, TableKind::Gpt);
    assert_eq!(l.sector_size, 512);
    assert_eq!(l.disk_size, 64 << 20);

    let json = sfdisk_json(&img);
    let parts = json["partitiontable"]["partitions"].as_array().unwrap();
    assert_eq!(l.partitions.len(), parts.len());
    for (p, j) in l.partitions.iter().zip(parts) {
        assert_eq!(
            p.start,
            j["start"].as_u64().unwrap() * 512,
            "partition {}",
            p.number
        );
        assert_eq!(
            p.len,
            j["size"].as_u64().unwrap() * 512,
            "partition {}",
            p.number
        );
        assert_eq!(p.type_id, j["type"].as_str().unwrap());
        assert_eq!(p.label.as_deref(), j["name"].as_str());
        assert!(j["node"].as_str().unwrap().ends_with(&p.number.to_string()));
    }
    // sgdisk -p prints "Number Start End Size Code Name"; the names must match ours.
    let listing = sh(&format!("sgdisk -p {}", img.display()));
    for p in &l.partitions {
        let line = listing
            .lines()
            .find(|x| x.trim_start().starts_with(&format!("{} ", p.number)))
            .unwrap();
        assert!(
            line.trim_end().ends_with(p.label.as_deref().unwrap()),
            "{line}"
        );
    }
    assert_eq!(l.partitions[0].type_name, "EFI system partition");
    assert_eq!(l.partitions[1].type_name, "Microsoft basic data");

    // File systems, labels and used bytes as the fs module reports them on the partition.
    let f = fs::File::open(&img).unwrap();
    let kinds: Vec<(FsKind, Option<&str>)> = l
        .partitions
        .iter()
        .map(|p| (p.fs, p.fs_label.as_deref()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (FsKind::Fat16, Some("ESP")),
            (FsKind::Ntfs, Some("WINDOWS")),
            (FsKind::Unknown, None)
        ]
    );
    for p in &l.partitions[..2] {
        assert_eq!(
            p.used_bytes,
            Some(used_map(&f, p.start, p.len).unwrap().used_bytes)
        );
    }
    assert_eq!(l.partitions[2].used_bytes, None);

    // Table: protective MBR + header + 32 sectors of entries; backup entries + header.
    let sectors = (64u64 << 20) / 512;
    assert_eq!(
        l.table_extents,
        vec![
            Extent::new(0, 34 * 512),
            Extent::new((sectors - 33) * 512, 33 * 512)
        ]
    );

    // Partition lookup by number, GPT name and file-system label.
    assert_eq!(l.find("2").unwrap().number, 2);
    assert_eq!(l.find("Windows").unwrap().number, 2);
    assert_eq!(l.find("ESP").unwrap().number, 1);
    let e = l.find("DATA").unwrap_err().to_string();
    assert!(
        e.contains("no partition \"DATA\"") && e.contains("name \"linux\""),
        "{e}"
    );
}

#[test]
fn mbr_with_logical_partitions_matches_sfdisk() {
    for t in ["sfdisk", "mkfs.fat", "mkntfs"] {
        require_tool(t);
    }
    let dir = Scratch::new("layout-mbr");
    let img = dir.join("mbr.img");
    sh(&format!(
        "cd {d}; truncate -s 100M mbr.img
         printf 'label: dos\\nstart=2048, size=40M, type=c\\nstart=83968, type=5\\nsize=20M, type=83\\nsize=30M, type=7\\n' | sfdisk -q mbr.img
         mkfs.fat --offset 2048 -F 32 -s 1 -n MBRFAT mbr.img 40960 >/dev/null 2>&1
         truncate -s 30M ntfs.img; mkntfs -F -q -L LOGICAL ntfs.img >/dev/null 2>&1
         dd if=ntfs.img of=mbr.img bs=512 seek=129024 conv=notrunc status=none",
        d = dir.path().display()
    ));
    let l = layout_of(&img);
    assert_eq!(l.table, TableKind::Mbr);
    let json = sfdisk_json(&img);
    // sfdisk lists the extended container too; it is table, not a partition, for us.
    let parts: Vec<&serde_json::Value> = json["partitiontable"]["partitions"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|j| !matches!(j["type"].as_str(), Some("5" | "f" | "85")))
        .collect();
    assert_eq!(l.partitions.len(), parts.len());
    for (p, j) in l.partitions.iter().zip(&parts) {
        let node = j["node"].as_str().unwrap();
        assert_eq!(
            node.strip_prefix(&img.display().to_string()).unwrap(),
            p.number.to_string()
        );
        assert_eq!(p.start, j["start"].as_u64().unwrap() * 512);
        assert_eq!(p.len, j["size"].as_u64().unwrap() * 512);
        assert_eq!(p.type_id, format!("0x{:0>2}", j["type"].as_str().unwrap()));
    }
    let numbers: Vec<u32> = l.partitions.iter().map(|p| p.number).collect();
    assert_eq!(numbers, vec![1, 5, 6]);
    assert_eq!(
        (l.partitions[0].fs, l.partitions[0].fs_label.as_deref()),
        (FsKind::Fat32, Some("MBRFAT"))
    );
    assert_eq!(
        (l.partitions[2].fs, l.partitions[2].fs_label.as_deref()),
        (FsKind::Ntfs, Some("LOGICAL"))
    );
    assert_eq!(l.partitions[0].type_name, "W95 FAT32 (LBA)");
    // Table: the MBR and one EBR per logical partition (at the start of the extended
    // partition and at the sector before each later logical one, where sfdisk puts them).
    let ebr2 = (129024 - 2048) * 512;
    assert_eq!(
        l.table_extents,
        vec![
            Extent::new(0, 512),
            Extent::new(83968 * 512, 512),
            Extent::new(ebr2, 512)
        ]
    );
    assert_eq!(l.find("LOGICAL").unwrap().number, 6);
}

#[test]
fn table_pointing_past_the_disk_end_names_the_partition() {
    require_tool("sgdisk");
    let dir = Scratch::new("layout-short");
    let img = dir.join("short.img");
    sh(&format!(
        "cd {d}; truncate -s 32M short.img; sgdisk -n 1:2048:+8M -n 2:0:0 short.img >/dev/null; truncate -s 20M short.img",
        d = dir.path().display()
    ));
    let f = fs::File::open(&img).unwrap();
    let e = read_layout(&f, 20 << 20).unwrap_err();
    let s = e.to_string();
    assert!(s.contains("partition 2") && s.contains("-raw"), "{s}");
}

#[test]
fn target_opens_partitions_by_number_and_label() {
    let dir = Scratch::new("layout-target");
    let img = gpt_disk(&dir);
    let (t, p) = Target::open_partition(&img, "ESP").unwrap();
    assert_eq!((p.number, t.len()), (1, 8 << 20));
    assert!(!t.is_block_device());
    let (t2, p2) = Target::open_partition(&img, "2").unwrap();
    assert_eq!(
        (p2.fs_label.as_deref(), t2.len()),
        (Some("WINDOWS"), 30 << 20)
    );

    // Writes land inside the partition only; past its end is a Target error.
    t2.write_at(b"marker", 0).unwrap();
    t2.sync().unwrap();
    let disk = fs::read(&img).unwrap();
    assert_eq!(&disk[18432 * 512..18432 * 512 + 6], b"marker");
    assert_eq!(
        t2.write_at(b"x", 30 << 20).unwrap_err().kind(),
        ErrorKind::Target
    );

    let e = Target::open_partition(&img, "nope")
        .unwrap_err()
        .to_string();
    assert!(
        e.contains(&img.display().to_string()) && e.contains("label \"ESP\""),
        "{e}"
    );

    // A missing image file is an error naming the way out, never created (a mistyped path
    // must not become a new file), and a smaller one is refused, never grown.
    let fresh = dir.join("new.img");
    let e = Target::open_disk(&fresh, Some(3 << 20)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Target);
    assert!(e.to_string().contains("truncate -s"), "{e}");
    assert!(!fresh.exists());
    fs::File::create(&fresh).unwrap().set_len(1 << 20).unwrap();
    let e = Target::open_disk(&fresh, Some(3 << 20)).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Target, "{e}");
    assert_eq!(fs::metadata(&fresh).unwrap().len(), 1 << 20);
    let t = Target::open_disk(&fresh, Some(1 << 20)).unwrap();
    assert_eq!(t.len(), 1 << 20);
}

/// A loop device over a file, detached on drop.
struct Loop(String);

impl Loop {
    fn attach(file: &Path) -> Loop {
        let out = Command::new("losetup")
            .args(["-f", "--show"])
            .arg(file)
            .output()
            .expect("losetup");
        assert!(
            out.status.success(),
            "losetup -f --show: {} (needs root and loop support)",
            String::from_utf8_lossy(&out.stderr)
        );
        Loop(String::from_utf8_lossy(&out.stdout).trim().to_string())
    }
}

impl Drop for Loop {
    fn drop(&mut self) {
        let _ = Command::new("losetup").args(["-d", &self.0]).status();
    }
}

#[test]
fn block_device_size_zeroout_and_layout_through_a_loop_device() {
    require_tool("losetup");
    let dir = Scratch::new("layout-loop");
    let img = gpt_disk(&dir);
    let lo = Loop::attach(&img);
    let dev = Path::new(&lo.0);

    // BLKGETSIZE64 and BLKSSZGET.
    let t = Target::open_disk(dev, None).unwrap();
    assert!(t.is_block_device());
    assert_eq!(t.len(), 64 << 20);
    assert_eq!(t.sector_size(), 512);
    let e = Target::open_disk(dev, Some(65 << 20)).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Target);

    // The ioctls themselves (Target falls back to plain writes when they fail, so check
    // them directly): BLKGETSIZE64 and BLKZEROOUT on a real block device.
    let raw = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(dev)
        .unwrap();
    assert_eq!(
        imgengine::target::ioctl::blkgetsize64(&raw).unwrap(),
        64 << 20
    );
    assert_eq!(imgengine::target::ioctl::blksszget(&raw).unwrap(), 512);
    imgengine::target::ioctl::blkzeroout(&raw, 63 << 20, 4096).unwrap();
    drop(raw);

    // The layout reads the same through the block device.
    let l = read_layout(&t, t.len()).unwrap();
    assert_eq!(l, layout_of(&img));

    // A sparse write of zeros over partition 3 goes through BLKZEROOUT and reads back.
    let (p3t, p3) = Target::open_partition(dev, "linux").unwrap();
    assert!(p3t.is_block_device());
    p3t.write_at(&vec![0x5A; 1 << 20], 0).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    buf[100] = 1;
    p3t.write_sparse_at(&buf, 4096).unwrap();
    p3t.zero_range(0, 4096).unwrap();
    p3t.sync().unwrap();
    let mut back = vec![0xFFu8; (1 << 20) + 4096];
    p3t.read_at(&mut back, 0).unwrap();
    assert!(back[..4096].iter().all(|&b| b == 0));
    assert!(back[4096..] == buf[..]);
    drop((t, p3t));
    drop(lo);
    // Through the loop device, the file holds the same bytes.
    let disk = fs::read(&img).unwrap();
    let at = p3.start as usize;
    assert_eq!(disk[at + 4096 + 100], 1);
    assert!(disk[at..at + 4096].iter().all(|&b| b == 0));
}
