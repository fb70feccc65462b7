//! A differential sweep of file-system geometries made by the real tools: every FAT12/16/32
//! shape `mkfs.fat` makes from 8 MiB to 2 GiB (cluster sizes from 512 bytes to 64 KiB,
//! `-S 512` and `-S 4096`), including FAT32 volumes with fewer than 65,525 clusters, and NTFS
//! cluster sizes from `mkntfs -c 512` to `-c 65536`.
//!
//! Each volume (a sparse file, as a disk without a partition table) gets files in low
//! clusters (written first), fragmented ones (small files written, every other one deleted,
//! then a big file across the holes) and high ones (written while every other free cluster
//! is marked bad, then unmarked); the placement is checked from the FAT itself. The volume
//! (NTFS: ntfs-3g places files by its own rules; their clusters are reported, not forced)
//! is captured with `img -make` (used blocks only), restored with `img -restore` into a fresh
//! file, and then every file is compared byte for byte, the directory listings compared, and
//! `fsck.fat -n` / `ntfsfix -n` run on the restored volume.
//!
//! Writers and readers: mtools (`mcopy`, `mdel`, `mtype`) for FAT, except FAT32 volumes with
//! fewer than 65,525 clusters, which mtools takes for FAT16 (it cannot even list them): those
//! go through the FAT FUSE driver `fusefat`, which decides by the FAT size field as Linux
//! does. NTFS through the ntfs-3g driver (FUSE) and `ntfsfallocate`; read back with `ntfscat`.

use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::{img_bin, random_bytes as sample_bytes, require_tool, run, sh, Scratch};

const MIB: u64 = 1 << 20;

/// One FAT geometry.
#[derive(Debug, Clone, Copy)]
struct FatCase {
    mib: u64,
    fat: u32,
    sector: u64,
    spc: u64,
}

const FAT_CASES: &[FatCase] = &[
    FatCase {
        mib: 8,
        fat: 12,
        sector: 512,
        spc: 4,
    },
    FatCase {
        mib: 8,
        fat: 12,
        sector: 4096,
        spc: 1,
    },
    FatCase {
        mib: 8,
        fat: 16,
        sector: 512,
        spc: 1,
    },
    FatCase {
        mib: 8,
        fat: 32,
        sector: 512,
        spc: 1,
    },
    FatCase {
        mib: 32,
        fat: 32,
        sector: 4096,
        spc: 1,
    },
    FatCase {
        mib: 64,
        fat: 16,
        sector: 512,
        spc: 4,
    },
    FatCase {
        mib: 128,
        fat: 16,
        sector: 4096,
        spc: 1,
    },
    FatCase {
        mib: 256,
        fat: 32,
        sector: 512,
        spc: 8,
    },
    FatCase {
        mib: 512,
        fat: 32,
        sector: 512,
        spc: 1,
    },
    FatCase {
        mib: 1024,
        fat: 16,
        sector: 4096,
        spc: 4,
    },
    FatCase {
        mib: 2048,
        fat: 16,
        sector: 512,
        spc: 128,
    },
    FatCase {
        mib: 2048,
        fat: 32,
        sector: 512,
        spc: 8,
    },
    FatCase {
        mib: 2048,
        fat: 32,
        sector: 4096,
        spc: 8,
    },
];

fn le16(b: &[u8], at: usize) -> u64 {
    u64::from(u16::from_le_bytes([b[at], b[at + 1]]))
}
fn le32(b: &[u8], at: usize) -> u64 {
    u64::from(u32::from_le_bytes(b[at..at + 4].try_into().unwrap()))
}

fn read_at(path: &Path, offset: u64, len: usize) -> Vec<u8> {
    let mut buf = vec![0u8; len];
    fs::File::open(path)
        .unwrap()
        .read_exact_at(&mut buf, offset)
        .unwrap();
    buf
}

fn write_at(path: &Path, offset: u64, data: &[u8]) {
    fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .write_all_at(data, offset)
        .unwrap();
}

/// The geometry of a FAT volume from its BPB, computed here as the spec says (with the FAT
/// width the test asked mkfs.fat for), independently of the engine.
struct Geo {
    bits: u32,
    csize: u64,
    fat_at: u64,
    fat_bytes: u64,
    nfats: u64,
    root_at: u64,
    root_bytes: u64,
    data_at: u64,
    clusters: u64,
    fsinfo_at: Option<u64>,
    root_cluster: u64,
}

impl Geo {
    fn read(vol: &Path, bits: u32) -> Geo {
        let b = read_at(vol, 0, 512);
        let bps = le16(&b, 11);
        let spc = u64::from(b[13]);
        let reserved = le16(&b, 14);
        let nfats = u64::from(b[16]);
        let root_entries = le16(&b, 17);
        let total = match le16(&b, 19) {
            0 => le32(&b, 32),
            n => n,
        };
        let fatsz = match le16(&b, 22) {
            0 => le32(&b, 36),
            n => n,
        };
        let root_sectors = (root_entries * 32).div_ceil(bps);
        let first_data = reserved + nfats * fatsz + root_sectors;
        Geo {
            bits,
            csize: bps * spc,
            fat_at: reserved * bps,
            fat_bytes: fatsz * bps,
            nfats,
            root_at: (reserved + nfats * fatsz) * bps,
            root_bytes: root_sectors * bps,
            data_at: first_data * bps,
            clusters: (total - first_data) / spc,
            fsinfo_at: (bits == 32).then(|| le16(&b, 48) * bps),
            root_cluster: if bits == 32 { le32(&b, 44) } else { 0 },
        }
    }

    fn fat(&self, vol: &Path) -> Vec<u8> {
        read_at(vol, self.fat_at, self.fat_bytes as usize)
    }

    fn put_fat(&self, vol: &Path, fat: &[u8]) {
        for i in 0..self.nfats {
            write_at(vol, self.fat_at + i * self.fat_bytes, fat);
        }
    }

    fn get(&self, fat: &[u8], c: u64) -> u64 {
        match self.bits {
            12 => {
                let i = (c + c / 2) as usize;
                let pair = le16(fat, i);
                if c.is_multiple_of(2) {
                    pair & 0xFFF
                } else {
                    pair >> 4
                }
            }
            16 => le16(fat, 2 * c as usize),
            _ => le32(fat, 4 * c as usize) & 0x0FFF_FFFF,
        }
    }

    fn set(&self, fat: &mut [u8], c: u64, v: u64) {
        match self.bits {
            12 => {
                let i = (c + c / 2) as usize;
                let mut pair = le16(fat, i);
                pair = if c.is_multiple_of(2) {
                    (pair & 0xF000) | (v & 0xFFF)
                } else {
                    (pair & 0x000F) | ((v & 0xFFF) << 4)
                };
                fat[i..i + 2].copy_from_slice(&(pair as u16).to_le_bytes());
            }
            16 => {
                fat[2 * c as usize..2 * c as usize + 2].copy_from_slice(&(v as u16).to_le_bytes())
            }
            _ => {
                let i = 4 * c as usize;
                let keep = le32(fat, i) & 0xF000_0000;
                fat[i..i + 4].copy_from_slice(&((keep | v) as u32).to_le_bytes());
            }
        }
    }

    fn bad(&self) -> u64 {
        match self.bits {
            12 => 0xFF7,
            16 => 0xFFF7,
            _ => 0x0FFF_FFF7,
        }
    }

    fn eoc(&self, v: u64) -> bool {
        v > self.bad() || v < 2
    }

    /// The clusters of the chain starting at `first`.
    fn chain(&self, fat: &[u8], first: u64) -> Vec<u64> {
        let mut out = Vec::new();
        let mut c = first;
        while c >= 2 && c < self.clusters + 2 && out.len() as u64 <= self.clusters {
            out.push(c);
            let v = self.get(fat, c);
            if self.eoc(v) || v == self.bad() {
                break;
            }
            c = v;
        }
        out
    }

    /// The first cluster of the 8.3 entry `name` ("L1.BIN") in the root directory.
    fn first_cluster(&self, vol: &Path, name: &str) -> u64 {
        let (base, ext) = name.split_once('.').unwrap_or((name, ""));
        let want = format!("{base:<8}{ext:<3}");
        let fat = self.fat(vol);
        let regions: Vec<(u64, u64)> = if self.bits == 32 {
            self.chain(&fat, self.root_cluster)
                .into_iter()
                .map(|c| (self.data_at + (c - 2) * self.csize, self.csize))
                .collect()
        } else {
            vec![(self.root_at, self.root_bytes)]
        };
        // The short (8.3) name, or the long name of the VFAT entries before it (fusefat
        // writes a placeholder short name).
        let mut long = String::new();
        for (at, len) in regions {
            let dir = read_at(vol, at, len as usize);
            for e in dir.chunks_exact(32) {
                if e[0] == 0xE5 || e[0] == 0 {
                    long.clear();
                    continue;
                }
                if e[11] & 0x3F == 0x0F {
                    let units: Vec<u16> = [1..11, 14..26, 28..32]
                        .into_iter()
                        .flat_map(|r| {
                            e[r].chunks_exact(2)
                                .map(|u| u16::from_le_bytes([u[0], u[1]]))
                        })
                        .take_while(|&u| u != 0 && u != 0xFFFF)
                        .collect();
                    long = String::from_utf16_lossy(&units) + &long;
                    continue;
                }
                if &e[..11] == want.as_bytes() || long.eq_ignore_ascii_case(name) {
                    return (le16(e, 20) << 16) | le16(e, 26);
                }
                long.clear();
            }
        }
        panic!("{name} not in the root directory of {}", vol.display());
    }

    /// Runs of consecutive clusters in the chain of `name`.
    fn runs(&self, vol: &Path, name: &str) -> Vec<(u64, u64)> {
        let fat = self.fat(vol);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for c in self.chain(&fat, self.first_cluster(vol, name)) {
            match runs.last_mut() {
                Some((s, n)) if *s + *n == c => *n += 1,
                _ => runs.push((c, 1)),
            }
        }
        runs
    }

    /// FSInfo: the free count (recounted from the FAT) and the next-free hint.
    fn set_fsinfo(&self, vol: &Path, next_free: u32) {
        let Some(at) = self.fsinfo_at else { return };
        let fat = self.fat(vol);
        let free = (2..self.clusters + 2)
            .filter(|&c| self.get(&fat, c) == 0)
            .count() as u32;
        let mut s = read_at(vol, at, 512);
        assert_eq!(&s[..4], b"RRaA", "FSInfo signature");
        s[488..492].copy_from_slice(&free.to_le_bytes());
        s[492..496].copy_from_slice(&next_free.to_le_bytes());
        write_at(vol, at, &s);
    }
}

/// File operations on a FAT volume, through mtools or (for small FAT32) fusefat.
struct FatVol<'a> {
    dir: &'a Scratch,
    vol: PathBuf,
    fuse: bool,
}

enum Op<'a> {
    Put(&'a str, &'a [u8]),
    Mkdir(&'a str),
    Del(&'a str),
}

impl FatVol<'_> {
    fn apply(&self, ops: &[Op]) {
        let mut script = String::from("set -euo pipefail; export MTOOLS_SKIP_CHECK=1\n");
        let v = self.vol.display();
        let mnt = self.dir.join("mnt");
        if self.fuse {
            fs::create_dir_all(&mnt).unwrap();
            script += &format!(
                "fusefat -f -o rw+ {v} {m} & pid=$!
                 for _ in $(seq 200); do mountpoint -q {m} && break; sleep 0.05; done
                 mountpoint -q {m}\n",
                m = mnt.display()
            );
        }
        for (i, op) in ops.iter().enumerate() {
            match op {
                Op::Put(name, data) => {
                    let local = self.dir.join(format!("put{i}"));
                    fs::write(&local, data).unwrap();
                    script += &if self.fuse {
                        format!("cp {} {}/{name}\n", local.display(), mnt.display())
                    } else {
                        format!("mcopy -i {v} {} ::{name}\n", local.display())
                    };
                }
                Op::Mkdir(name) => {
                    script += &if self.fuse {
                        format!("mkdir {}/{name}\n", mnt.display())
                    } else {
                        format!("mmd -i {v} ::{name}\n")
                    };
                }
                Op::Del(name) => {
                    script += &if self.fuse {
                        format!("rm {}/{name}\n", mnt.display())
                    } else {
                        format!("mdel -i {v} ::{name}\n")
                    };
                }
            }
        }
        if self.fuse {
            script += &format!("fusermount -u {}; wait $pid\n", mnt.display());
        }
        sh(&script);
        for i in 0..ops.len() {
            let _ = fs::remove_file(self.dir.join(format!("put{i}")));
        }
    }

    /// Every file's bytes, by path; and the listing (names and sizes, recursively).
    fn read(&self, vol: &Path, names: &[String]) -> (Vec<Vec<u8>>, String) {
        if self.fuse {
            let mnt = self.dir.join("mnt");
            fs::create_dir_all(&mnt).unwrap();
            let out = self.dir.join("readout");
            fs::create_dir_all(&out).unwrap();
            let mut script = format!(
                "fusefat -f -o ro {v} {m} & pid=$!
                 for _ in $(seq 200); do mountpoint -q {m} && break; sleep 0.05; done
                 mountpoint -q {m}
                 (cd {m} && find . -printf '%p %s\\n' | LC_ALL=C sort) > {o}/listing\n",
                v = vol.display(),
                m = mnt.display(),
                o = out.display()
            );
            for (i, n) in names.iter().enumerate() {
                script += &format!("cp {}/{n} {}/f{i}\n", mnt.display(), out.display());
            }
            // In read-only mode fusefat exits with 255 after an unmount; what was read is
            // compared byte for byte below.
            script += &format!("fusermount -u {}; wait $pid || true\n", mnt.display());
            sh(&script);
            let files = (0..names.len())
                .map(|i| fs::read(out.join(format!("f{i}"))).unwrap())
                .collect();
            let listing = fs::read_to_string(out.join("listing")).unwrap();
            fs::remove_dir_all(&out).unwrap();
            (files, listing)
        } else {
            let files = names
                .iter()
                .map(|n| {
                    run(Command::new("mtype")
                        .env("MTOOLS_SKIP_CHECK", "1")
                        .arg("-i")
                        .arg(vol)
                        .arg(format!("::{n}")))
                    .stdout
                })
                .collect();
            let listing = sh(&format!(
                "MTOOLS_SKIP_CHECK=1 mdir -/ -a -i {} :: | grep -v -i 'free\\|serial\\|^ *volume'",
                vol.display()
            ));
            (files, listing)
        }
    }
}

/// Capture `vol` with `img -make` and restore it into a fresh sparse file of the same size.
/// Returns the restored file and the image's size.
fn round_trip(dir: &Scratch, vol: &Path, len: u64) -> (PathBuf, u64) {
    let image = dir.join("vol.fimg");
    let out = dir.join("restored.vol");
    let _ = fs::remove_file(&image);
    let _ = fs::remove_file(&out);
    let t0 = std::time::Instant::now();
    let bin = img_bin();
    eprintln!("  img binary ready at {:.1}s", t0.elapsed().as_secs_f64());
    run(Command::new(&bin).args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", vol.display()),
        "-threads=2",
    ]));
    eprintln!("  captured at {:.1}s", t0.elapsed().as_secs_f64());
    sh(&format!("truncate -s {len} {}", out.display()));
    run(Command::new(&bin).args([
        "-restore",
        image.to_str().unwrap(),
        // Unsigned test image: the explicit lab option.
        "-unsigned",
        &format!("-disk={}", out.display()),
        &format!("-state={}", dir.join("state").display()),
        "-threads=2",
    ]));
    (out, fs::metadata(&image).unwrap().len())
}

fn fat_tag(c: FatCase) -> String {
    format!("fat{}-{}M-S{}-s{}", c.fat, c.mib, c.sector, c.spc)
}

fn fat_case(c: FatCase) {
    let tag = fat_tag(c);
    let t0 = std::time::Instant::now();
    let step = |what: &str| eprintln!("{tag}: {what} at {:.1}s", t0.elapsed().as_secs_f64());
    let dir = Scratch::new(&format!("sweep-{tag}"));
    let vol = dir.join("source.vol");
    let len = c.mib * MIB;
    sh(&format!(
        "truncate -s {len} {v}; mkfs.fat -F {f} -S {s} -s {spc} -n SWEEP {v} >/dev/null 2>&1",
        v = vol.display(),
        f = c.fat,
        s = c.sector,
        spc = c.spc
    ));
    let g = Geo::read(&vol, c.fat);
    let small32 = c.fat == 32 && g.clusters < 65525;
    let fv = FatVol {
        dir: &dir,
        vol: vol.clone(),
        fuse: small32,
    };
    let cs = g.csize as usize;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let seed = c.mib * 131 + u64::from(c.fat) * 7 + c.sector + c.spc;

    // Low clusters: the first files on an empty volume, one in a sub-directory.
    let low = [
        ("L1.BIN", sample_bytes(seed, 1)),
        ("L2.BIN", sample_bytes(seed + 1, 5000)),
        ("L3.BIN", sample_bytes(seed + 2, 3 * cs + 17)),
        ("SUB/L4.BIN", sample_bytes(seed + 3, cs + 1)),
    ];
    let mut ops = vec![Op::Put(low[0].0, &low[0].1), Op::Put(low[1].0, &low[1].1)];
    ops.push(Op::Put(low[2].0, &low[2].1));
    ops.push(Op::Mkdir("SUB"));
    ops.push(Op::Put(low[3].0, &low[3].1));
    // Fragmented: 12 files of 2 clusters, every other one deleted.
    let smalls: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            (
                format!("S{i:02}.BIN"),
                sample_bytes(seed + 10 + i, 2 * cs - 5),
            )
        })
        .collect();
    for (n, d) in &smalls {
        ops.push(Op::Put(n, d));
    }
    for (n, _) in smalls.iter().skip(1).step_by(2) {
        ops.push(Op::Del(n));
    }
    fv.apply(&ops);
    step("low and small files written");
    files.extend(low.iter().map(|(n, d)| (n.to_string(), d.clone())));
    files.extend(smalls.iter().step_by(2).cloned());
    // The next-free hint points past the last file: unknown makes the allocator start from
    // the beginning, into the holes.
    g.set_fsinfo(&vol, u32::MAX);
    let big = ("BIG.BIN".to_string(), sample_bytes(seed + 30, 13 * cs + 3));
    fv.apply(&[Op::Put(&big.0, &big.1)]);
    let runs = g.runs(&vol, "BIG.BIN");
    assert!(
        runs.len() >= 3,
        "{tag}: BIG.BIN is not fragmented: {runs:?}"
    );
    files.push(big);

    // High clusters: every free cluster but the last 16 marked bad while H1/H2 are written.
    let mut fat = g.fat(&vol);
    let last = g.clusters + 2;
    let marked: Vec<u64> = (2..last - 16).filter(|&k| g.get(&fat, k) == 0).collect();
    for &k in &marked {
        g.set(&mut fat, k, g.bad());
    }
    g.put_fat(&vol, &fat);
    g.set_fsinfo(&vol, u32::MAX);
    let high = [
        ("H1.BIN".to_string(), sample_bytes(seed + 40, 3 * cs + 100)),
        ("H2.BIN".to_string(), sample_bytes(seed + 41, 1)),
    ];
    fv.apply(&[
        Op::Put(&high[0].0, &high[0].1),
        Op::Put(&high[1].0, &high[1].1),
    ]);
    let mut fat = g.fat(&vol);
    for &k in &marked {
        if g.get(&fat, k) == g.bad() {
            g.set(&mut fat, k, 0);
        }
    }
    g.put_fat(&vol, &fat);
    g.set_fsinfo(&vol, u32::MAX);
    for (n, _) in &high {
        let first = g.first_cluster(&vol, n);
        assert!(
            first >= last - 16,
            "{tag}: {n} starts at cluster {first} of {last}"
        );
    }
    files.extend(high.iter().cloned());
    sh(&format!("fsck.fat -n {} >/dev/null", vol.display()));

    step("high files written");
    let names: Vec<String> = files.iter().map(|(n, _)| n.clone()).collect();
    let (_, src_listing) = fv.read(&vol, &names);
    step("source listed");
    let (out, image_len) = round_trip(&dir, &vol, len);
    step("captured and restored");
    sh(&format!("fsck.fat -n {} >/dev/null", out.display()));
    let (got, listing) = fv.read(&out, &names);
    for ((name, want), got) in files.iter().zip(&got) {
        assert!(
            got == want,
            "{tag}: {name} differs after capture and restore"
        );
    }
    assert_eq!(listing, src_listing, "{tag}: directory listing");
    // Used blocks only: the image holds the metadata and the files, not the free space.
    let meta = g.data_at;
    let data: u64 = files.iter().map(|(_, d)| d.len() as u64 + g.csize).sum();
    assert!(
        image_len < meta + data + 16 * g.csize + 2 * MIB,
        "{tag}: the image has {image_len} bytes for {meta} bytes of metadata and {data} of files"
    );
    eprintln!(
        "{tag}: {} clusters of {} bytes{}, {} files, image {image_len} bytes: ok",
        g.clusters,
        g.csize,
        if small32 {
            " (FAT32 below 65,525 clusters)"
        } else {
            ""
        },
        files.len()
    );
}

#[test]
fn fat_geometries_made_by_mkfs_fat_round_trip_file_for_file() {
    for t in [
        "mkfs.fat",
        "fsck.fat",
        "mcopy",
        "mtype",
        "mdel",
        "mmd",
        "mdir",
        "fusefat",
        "fusermount",
    ] {
        require_tool(t);
    }
    // SWEEP_ONLY=fat32-8M runs the cases whose name contains it (when looking at one).
    let only = std::env::var("SWEEP_ONLY").unwrap_or_default();
    for &c in FAT_CASES {
        if !fat_tag(c).contains(&only) {
            eprintln!("{}: skipped (SWEEP_ONLY={only})", fat_tag(c));
            continue;
        }
        fat_case(c);
    }
}

/// One NTFS geometry: volume size and cluster size.
const NTFS_CASES: &[(u64, u64)] = &[
    (16, 512),
    (24, 1024),
    (32, 2048),
    (48, 4096),
    (64, 8192),
    (256, 65536),
    (2048, 4096),
];

/// The runs (LCN, length in clusters) of the unnamed data of `name`, from `ntfsinfo -v`.
fn ntfs_runs(vol: &Path, name: &str) -> Vec<(u64, u64)> {
    let out = sh(&format!(
        "ntfsinfo -F {name} -v {} 2>/dev/null",
        vol.display()
    ));
    let hex = |w: &str| u64::from_str_radix(w.trim_start_matches("0x"), 16).ok();
    out.lines()
        .skip_while(|l| !l.contains("Runlist:"))
        .skip(1)
        .map_while(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            match w[..] {
                [_, lcn, len] => Some((hex(lcn)?, hex(len)?)),
                _ => None,
            }
        })
        .collect()
}

fn ntfs_case(mib: u64, cluster: u64) {
    let tag = format!("ntfs-{mib}M-c{cluster}");
    let dir = Scratch::new(&format!("sweep-{tag}"));
    let vol = dir.join("source.vol");
    let mnt = dir.join("mnt");
    fs::create_dir_all(&mnt).unwrap();
    let len = mib * MIB;
    sh(&format!(
        "truncate -s {len} {v}; mkntfs -F -Q -q -c {cluster} -L SWEEP {v} >/dev/null 2>&1",
        v = vol.display()
    ));
    let seed = mib * 17 + cluster;
    let cs = cluster as usize;
    let mut files: Vec<(String, Vec<u8>)> = vec![
        ("L1.bin".into(), sample_bytes(seed, 1)),
        ("L2.bin".into(), sample_bytes(seed + 1, 5000)),
        (
            "L3.bin".into(),
            sample_bytes(seed + 2, 3 * cs.max(4096) + 17),
        ),
    ];
    let smalls: Vec<(String, Vec<u8>)> = (0..12)
        .map(|i| {
            (
                format!("S{i:02}.bin"),
                sample_bytes(seed + 10 + i, 2 * cs.max(4096) - 5),
            )
        })
        .collect();
    // Fits the six holes of two units the deleted small files leave, but no fewer.
    let big = (
        "BIG.bin".to_string(),
        sample_bytes(seed + 30, 10 * cs.max(4096) + 3),
    );
    let high = [
        (
            "H1.bin".to_string(),
            sample_bytes(seed + 40, 3 * cs.max(4096) + 100),
        ),
        ("H2.bin".to_string(), sample_bytes(seed + 41, 7000)),
    ];
    let stage = |list: &[(String, Vec<u8>)]| -> String {
        let mut s = String::new();
        for (n, d) in list {
            let local = dir.join(format!("put-{n}"));
            fs::write(&local, d).unwrap();
            s += &format!("cp {} {}/{n}\n", local.display(), mnt.display());
        }
        s
    };
    let mount = format!(
        "ntfs-3g {v} {m}; mountpoint -q {m}\n",
        v = vol.display(),
        m = mnt.display()
    );
    let umount = format!("umount {m} || fusermount -u {m}\n", m = mnt.display());
    // Low files, the small files, every other small file deleted, the big file, the high
    // files. ntfs-3g spreads new files over the volume by its own rules (and ntfsfallocate
    // cannot take the MFT zone), so on NTFS the placement is not forced: where the files
    // start and how many runs BIG.bin has are reported with each case.
    let mut script = mount + &stage(&files) + &stage(&smalls);
    for (n, _) in smalls.iter().skip(1).step_by(2) {
        script += &format!("rm {}/{n}\n", mnt.display());
    }
    script += &stage(std::slice::from_ref(&big));
    script += &stage(&high);
    script += &umount;
    sh(&script);
    let clusters = len / cluster;
    let starts: Vec<u64> = files
        .iter()
        .chain(smalls.iter().step_by(2))
        .chain(std::iter::once(&big))
        .chain(high.iter())
        .filter_map(|(n, _)| ntfs_runs(&vol, n).first().map(|r| r.0))
        .collect();
    let big_runs = ntfs_runs(&vol, &big.0);
    files.extend(smalls.iter().step_by(2).cloned());
    files.push(big);
    files.extend(high.iter().cloned());
    sh(&format!("ntfsfix -n {} >/dev/null", vol.display()));

    let listing = |v: &Path| sh(&format!("ntfsls -l -a {} | sort", v.display()));
    let src_listing = listing(&vol);
    let (out, image_len) = round_trip(&dir, &vol, len);
    sh(&format!("ntfsfix -n {} >/dev/null", out.display()));
    for (name, want) in &files {
        let got = run(Command::new("ntfscat").arg(&out).arg(name)).stdout;
        assert!(
            got == *want,
            "{tag}: {name} differs after capture and restore"
        );
    }
    assert_eq!(listing(&out), src_listing, "{tag}: directory listing");
    let data: u64 = files.iter().map(|(_, d)| d.len() as u64 + cluster).sum();
    assert!(
        image_len < data + 24 * MIB,
        "{tag}: the image has {image_len} bytes for {data} of files"
    );
    eprintln!(
        "{tag}: {} files starting at clusters {starts:?} of {clusters}, BIG.bin in {} runs, image {image_len} bytes: ok",
        files.len(),
        big_runs.len()
    );
}

#[test]
fn ntfs_cluster_sizes_made_by_mkntfs_round_trip_file_for_file() {
    for t in [
        "mkntfs",
        "ntfs-3g",
        "ntfsfallocate",
        "ntfsinfo",
        "ntfsls",
        "ntfscat",
        "ntfsfix",
    ] {
        require_tool(t);
    }
    for &(mib, cluster) in NTFS_CASES {
        ntfs_case(mib, cluster);
    }
}
