//! File-system used maps against the tools that made the file systems.
//!
//! FAT12/16/32 volumes are made by mkfs.fat and filled by mtools (including a deleted file,
//! so allocation is fragmented); NTFS by mkntfs and ntfscp. For each, `fs::used_map` must
//! agree with the tools' own accounting (`fsck.fat -n -v` used clusters; `ntfsinfo -m` /
//! `ntfscluster` free clusters), every file's clusters (`mshowfat`, `ntfsinfo -F -v`
//! runlists) must lie inside the extents, and a copy of the volume that holds ONLY the
//! extents (everything else zero) must pass `fsck.fat -n` / `ntfsfix -n` and give back every
//! file byte for byte: that is what a used-blocks capture relies on.

use std::fs;
use std::path::Path;

use e2e::{require_tool, sample_bytes, sh, Scratch};
use imgengine::fs::{used_map, FsKind, UsedMap};
use imgengine::Extent;

/// A number after `key` in tool output like "   512 bytes per cluster" or "key: 123".
fn number_before(text: &str, suffix: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.contains(suffix))
        .unwrap_or_else(|| panic!("no `{suffix}` in:\n{text}"));
    line.split_whitespace().next().unwrap().parse().unwrap()
}

fn number_after(text: &str, key: &str) -> u64 {
    let line = text
        .lines()
        .find(|l| l.trim_start().starts_with(key))
        .unwrap_or_else(|| panic!("no `{key}` in:\n{text}"));
    line.rsplit(|c: char| c == ':' || c.is_whitespace())
        .find(|s| !s.is_empty())
        .unwrap()
        .parse()
        .unwrap()
}

fn map_of(img: &Path) -> UsedMap {
    let f = fs::File::open(img).unwrap();
    let len = f.metadata().unwrap().len();
    used_map(&f, 0, len).unwrap()
}

fn covered(extents: &[Extent], start: u64, len: u64) -> bool {
    extents
        .iter()
        .any(|e| e.offset <= start && start + len <= e.offset + e.len)
}

/// Copy only `extents` of `src` into a new all-zero file `dst` of the same size.
fn copy_extents(src: &Path, dst: &Path, extents: &[Extent]) {
    use std::os::unix::fs::FileExt;
    let s = fs::File::open(src).unwrap();
    let d = fs::File::create(dst).unwrap();
    d.set_len(s.metadata().unwrap().len()).unwrap();
    for e in extents {
        let mut buf = vec![0u8; e.len as usize];
        s.read_exact_at(&mut buf, e.offset).unwrap();
        d.write_all_at(&buf, e.offset).unwrap();
    }
}

/// Make a FAT volume with a fragmented file layout and return (image, files in it).
fn fat_volume(
    dir: &Scratch,
    fat: u32,
    kb: u32,
    extra: &str,
) -> (std::path::PathBuf, Vec<(String, Vec<u8>)>) {
    let img = dir.join(format!("fat{fat}.img"));
    let mut files = Vec::new();
    for (i, size) in [(1, 5000usize), (2, 150_000), (3, 40_000), (4, 300_000)] {
        let data = sample_bytes(i as u64 * 7 + u64::from(fat), size);
        fs::write(dir.join(format!("f{i}")), &data).unwrap();
        files.push((format!("F{i}"), data));
    }
    sh(&format!(
        "cd {d}; mkfs.fat -C -F {fat} {extra} -n DATA{fat} {img} {kb} >/dev/null
         mcopy -i {img} f1 ::F1; mcopy -i {img} f2 ::F2; mmd -i {img} ::SUB; mcopy -i {img} f3 ::SUB/F3
         mdel -i {img} ::F2; mcopy -i {img} f4 ::F4
         mcopy -i {img} f4 ::F5; mcopy -i {img} f3 ::F6; mdel -i {img} ::F5",
        d = dir.path().display(),
        img = img.display()
    ));
    files.retain(|(n, _)| n != "F2");
    // F5 was deleted after F6 was written behind it: a hole in the allocation map.
    let f3 = files.iter().find(|(n, _)| n == "F3").unwrap().1.clone();
    files.push(("F6".to_string(), f3));
    let files = files
        .into_iter()
        .map(|(n, d)| {
            if n == "F3" {
                ("SUB/F3".to_string(), d)
            } else {
                (n, d)
            }
        })
        .collect();
    (img, files)
}

fn check_fat(fat: u32, kb: u32, extra: &str, kind: FsKind) {
    for t in ["mkfs.fat", "fsck.fat", "mcopy", "mshowfat"] {
        require_tool(t);
    }
    let dir = Scratch::new(&format!("layout-fat{fat}"));
    let (img, files) = fat_volume(&dir, fat, kb, extra);
    let m = map_of(&img);
    assert_eq!(m.kind, kind);
    assert_eq!(m.label.as_deref(), Some(format!("DATA{fat}").as_str()));
    let extents = m.extents.clone().expect("FAT has a map");

    // fsck.fat: "<img>: 4 files, 295/9971 clusters" (used/total), data area and cluster size.
    let fsck = sh(&format!("fsck.fat -n -v {}", img.display()));
    let data_line = fsck
        .lines()
        .find(|l| l.contains("Data area starts at byte"))
        .expect("fsck.fat -v data area line");
    let data_start: u64 = data_line
        .split_whitespace()
        .nth(5)
        .unwrap()
        .parse()
        .unwrap();
    let cluster = number_before(&fsck, "bytes per cluster");
    let summary = fsck.lines().last().unwrap();
    let used_clusters: u64 = summary
        .rsplit(", ")
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(
        m.used_bytes,
        data_start + used_clusters * cluster,
        "fsck.fat says {summary}"
    );
    println!(
        "FAT{fat}: {} used bytes in {} extents, fsck.fat: {summary}",
        m.used_bytes,
        extents.len()
    );

    // Every file's clusters (mshowfat "<2-148> <150-296>") lie inside the extents.
    for (name, _) in &files {
        let out = sh(&format!("mshowfat -i {} ::{name}", img.display()));
        for run in out.split('<').skip(1) {
            let run = run.split('>').next().unwrap();
            let (a, b) = run.split_once('-').unwrap_or((run, run));
            let (a, b): (u64, u64) = (a.trim().parse().unwrap(), b.trim().parse().unwrap());
            let start = data_start + (a - 2) * cluster;
            assert!(
                covered(&extents, start, (b - a + 1) * cluster),
                "{name} clusters {a}-{b} not in the map"
            );
        }
    }

    // Only the extents, the rest zeroed: still a clean file system with the same files.
    let copy = dir.join("copy.img");
    copy_extents(&img, &copy, &extents);
    sh(&format!("fsck.fat -n {}", copy.display()));
    for (name, data) in &files {
        let out = dir.join("out");
        sh(&format!(
            "mcopy -o -i {} ::{name} {}",
            copy.display(),
            out.display()
        ));
        assert!(
            fs::read(&out).unwrap() == *data,
            "{name} differs after the extents-only copy"
        );
    }
}

#[test]
fn fat12_used_map_matches_fsck() {
    check_fat(12, 2048, "", FsKind::Fat12);
}

#[test]
fn fat16_used_map_matches_fsck() {
    check_fat(16, 20000, "", FsKind::Fat16);
}

#[test]
fn fat32_used_map_matches_fsck() {
    check_fat(32, 70000, "-s 1", FsKind::Fat32);
}

#[test]
fn ntfs_used_map_matches_ntfs3g_tools() {
    for t in [
        "mkntfs",
        "ntfscp",
        "ntfsinfo",
        "ntfscluster",
        "ntfsfix",
        "ntfscat",
    ] {
        require_tool(t);
    }
    let dir = Scratch::new("layout-ntfs");
    let img = dir.join("ntfs.img");
    let mut files = Vec::new();
    for (i, size) in [(1u64, 9000usize), (2, 700_000), (3, 123_456)] {
        let data = sample_bytes(i * 13, size);
        fs::write(dir.join(format!("f{i}")), &data).unwrap();
        files.push((format!("file{i}.bin"), data));
    }
    sh(&format!(
        "cd {d}; truncate -s 64M {img}; mkntfs -F -q -L WINDATA {img} >/dev/null 2>&1
         for i in 1 2 3; do ntfscp -f {img} f$i file$i.bin >/dev/null 2>&1; done",
        d = dir.path().display(),
        img = img.display()
    ));
    let m = map_of(&img);
    assert_eq!(m.kind, FsKind::Ntfs);
    assert_eq!(m.label.as_deref(), Some("WINDATA"));
    let extents = m.extents.clone().unwrap();

    // ntfsinfo -m: "Volume Size in Clusters: 16383", "Cluster Size: 4096";
    // ntfscluster: "clusters of free space : 15672".
    let info = sh(&format!("ntfsinfo -m -f {} 2>/dev/null", img.display()));
    let clusters = number_after(&info, "Volume Size in Clusters");
    let csize = number_after(&info, "Cluster Size");
    let free = number_after(
        &sh(&format!("ntfscluster -f {} 2>/dev/null", img.display())),
        "clusters of free space",
    );
    // The map is the bitmap's clusters plus the backup boot sector in the partition's last
    // sector, which lies after the last whole cluster.
    assert_eq!(
        m.used_bytes,
        (clusters - free) * csize + 512,
        "ntfs-3g: {clusters} clusters, {free} free, {csize} bytes each"
    );
    println!(
        "NTFS: {} used bytes in {} extents; ntfs-3g: {} clusters used",
        m.used_bytes,
        extents.len(),
        clusters - free
    );

    // Every non-resident file's runlist (ntfsinfo -F -v: "VCN LCN Length" in hex) is covered.
    for (name, _) in &files {
        let out = sh(&format!(
            "ntfsinfo -F {name} -v -f {} 2>/dev/null",
            img.display()
        ));
        let mut in_runlist = false;
        let mut runs = 0;
        for line in out.lines() {
            if line.contains("Runlist:") {
                in_runlist = true;
                continue;
            }
            if in_runlist {
                let cols: Vec<&str> = line.split_whitespace().collect();
                if cols.len() != 3 || !cols[0].starts_with("0x") {
                    in_runlist = false;
                    continue;
                }
                let lcn = u64::from_str_radix(cols[1].trim_start_matches("0x"), 16);
                let n = u64::from_str_radix(cols[2].trim_start_matches("0x"), 16).unwrap();
                if let Ok(lcn) = lcn {
                    assert!(
                        covered(&extents, lcn * csize, n * csize),
                        "{name} run at LCN {lcn} (+{n}) not in the map"
                    );
                    runs += 1;
                }
            }
        }
        assert!(runs > 0, "no runlist for {name} in:\n{out}");
    }

    let copy = dir.join("copy.img");
    copy_extents(&img, &copy, &extents);
    sh(&format!("ntfsfix -n {} >/dev/null", copy.display()));
    for (name, data) in &files {
        let out = std::process::Command::new("ntfscat")
            .args(["-f".as_ref(), copy.as_os_str(), name.as_ref()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "ntfscat {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(
            out.stdout == *data,
            "{name} differs after the extents-only copy"
        );
    }
}

#[test]
fn broken_fat_is_an_error_with_the_way_out() {
    require_tool("mkfs.fat");
    let dir = Scratch::new("layout-fatbroken");
    let img = dir.join("v.img");
    sh(&format!(
        "mkfs.fat -C -F 16 {} 20000 >/dev/null",
        img.display()
    ));
    // Claim more sectors than the file holds (total sectors, 32-bit field, small field 0).
    let mut data = fs::read(&img).unwrap();
    data[19..21].copy_from_slice(&[0, 0]);
    data[32..36].copy_from_slice(&200_000u32.to_le_bytes());
    fs::write(&img, &data).unwrap();
    let f = fs::File::open(&img).unwrap();
    let e = used_map(&f, 0, data.len() as u64).unwrap_err();
    let s = e.to_string();
    assert!(
        s.contains("offset 0") && s.contains("-raw") && s.contains("larger than"),
        "{s}"
    );
}

/// Large (sparse) volumes: the maps stay correct and the time to read them is printed as
/// a figure for the report (not asserted: machines differ).
#[test]
fn large_volumes_map_in_one_pass() {
    for t in ["mkfs.fat", "fsck.fat", "mkntfs", "ntfscluster", "ntfsinfo"] {
        require_tool(t);
    }
    let dir = Scratch::new("layout-large");
    let fat = dir.join("fat32.img");
    let ntfs = dir.join("ntfs.img");
    fs::write(dir.join("f"), sample_bytes(99, 3 << 20)).unwrap();
    sh(&format!(
        "cd {d}; mkfs.fat -C -F 32 -s 8 {fat} 4194304 >/dev/null; mcopy -i {fat} f ::F
         truncate -s 4G {ntfs}; mkntfs -F -Q -q {ntfs} >/dev/null 2>&1; ntfscp -f {ntfs} f f >/dev/null 2>&1",
        d = dir.path().display(),
        fat = fat.display(),
        ntfs = ntfs.display()
    ));
    let t0 = std::time::Instant::now();
    let m = map_of(&fat);
    let fat_time = t0.elapsed();
    let fsck = sh(&format!("fsck.fat -n -v {}", fat.display()));
    let used: u64 = fsck
        .lines()
        .last()
        .unwrap()
        .rsplit(", ")
        .next()
        .unwrap()
        .split('/')
        .next()
        .unwrap()
        .parse()
        .unwrap();
    let data_line = fsck
        .lines()
        .find(|l| l.contains("Data area starts at byte"))
        .unwrap();
    let data_start: u64 = data_line
        .split_whitespace()
        .nth(5)
        .unwrap()
        .parse()
        .unwrap();
    assert_eq!(m.used_bytes, data_start + used * 4096);

    let t0 = std::time::Instant::now();
    let n = map_of(&ntfs);
    let ntfs_time = t0.elapsed();
    let info = sh(&format!("ntfsinfo -m -f {} 2>/dev/null", ntfs.display()));
    let clusters = number_after(&info, "Volume Size in Clusters");
    let csize = number_after(&info, "Cluster Size");
    let free = number_after(
        &sh(&format!("ntfscluster -f {} 2>/dev/null", ntfs.display())),
        "clusters of free space",
    );
    assert_eq!(n.used_bytes, (clusters - free) * csize + 512);
    println!(
        "4 GiB FAT32 (1 Mi clusters): used map in {fat_time:?}, {} bytes used; 4 GiB NTFS ({clusters} clusters): used map in {ntfs_time:?}, {} bytes used",
        m.used_bytes,
        n.used_bytes
    );
}
