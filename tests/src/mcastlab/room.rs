//! The room the `img -session` suites image (tests/tests/multicast*.rs): GPT disks with real
//! FAT32 and NTFS file systems, the byte-for-byte and fsck checks of a client's copy, and the
//! `img -session` command lines and processes started in a [`McastLab`].

use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use super::{Finished, McastLab, Pid};
use crate::{img_bin, require_tool, sh, Scratch};

/// One mebibyte.
pub const MIB: u64 = 1 << 20;
/// Long enough for a debug build under a busy machine; a hung session fails, never hangs.
pub const SESSION_TIMEOUT: Duration = Duration::from_secs(600);

/// The `img` under test ([`img_bin`]), looked up once per test binary.
pub fn img() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(img_bin).clone()
}

/// The file system of a test partition.
#[derive(Clone, Copy, PartialEq)]
pub enum Fs {
    Fat32,
    Ntfs,
}

/// One partition of a test disk: label, file system, size, and the seed of its files.
pub struct Part {
    pub label: &'static str,
    pub fs: Fs,
    pub mib: u64,
    pub seed: u64,
}

/// A GPT disk made as an administrator makes one: sgdisk, then mkfs.fat / mkntfs with real
/// files (half text, half random) copied in with mtools / ntfscp. Free space is zero, so
/// a correct copy is byte-identical to it as a whole.
pub struct Disk {
    pub path: PathBuf,
    pub parts: Vec<(u64, u64, Fs)>,
}

impl Disk {
    /// Makes the disk at `path` with `parts` in that order from 1 MiB on, and checks every
    /// partition with fsck.
    pub fn build(path: &Path, parts: &[Part]) -> Disk {
        for t in [
            "sgdisk", "mkfs.fat", "mcopy", "mkntfs", "ntfscp", "fsck.fat", "ntfsfix",
        ] {
            require_tool(t);
        }
        let total: u64 = 2 + parts.iter().map(|p| p.mib).sum::<u64>();
        let _ = std::fs::remove_file(path);
        sh(&format!("truncate -s {total}M {}", path.display()));
        let mut args = String::new();
        for (i, p) in parts.iter().enumerate() {
            let n = i + 1;
            // 0700: Microsoft basic data, for FAT32 and NTFS alike.
            args.push_str(&format!(
                " -n {n}:0:+{}M -t {n}:0700 -c {n}:{}",
                p.mib, p.label
            ));
        }
        sh(&format!("sgdisk{args} {} >/dev/null", path.display()));
        let dir = path.with_extension("parts");
        std::fs::create_dir_all(&dir).unwrap();
        let mut offset = MIB;
        let mut out = Vec::new();
        for (i, p) in parts.iter().enumerate() {
            let fsimg = dir.join(format!("p{i}.img"));
            let _ = std::fs::remove_file(&fsimg);
            let sector = offset / 512;
            let files = part_files(p.seed);
            match p.fs {
                Fs::Fat32 => {
                    sh(&format!(
                        "mkfs.fat -F 32 -n {} -h {sector} -C {} {} >/dev/null",
                        p.label,
                        fsimg.display(),
                        p.mib * 1024
                    ));
                    sh(&format!("mmd -i {} ::/DATA", fsimg.display()));
                    for (name, data) in &files {
                        let f = dir.join(name);
                        std::fs::write(&f, data).unwrap();
                        sh(&format!(
                            "mcopy -i {} {} ::/DATA/",
                            fsimg.display(),
                            f.display()
                        ));
                    }
                }
                Fs::Ntfs => {
                    sh(&format!("truncate -s {}M {}", p.mib, fsimg.display()));
                    sh(&format!(
                        "mkntfs -F -q -Q -L {} -p {sector} {} >/dev/null 2>&1",
                        p.label,
                        fsimg.display()
                    ));
                    for (name, data) in &files {
                        let f = dir.join(name);
                        std::fs::write(&f, data).unwrap();
                        sh(&format!(
                            "ntfscp -f {} {} /{name} >/dev/null 2>&1",
                            fsimg.display(),
                            f.display()
                        ));
                    }
                }
            }
            sh(&format!(
                "dd if={} of={} bs=1M seek={} conv=notrunc,sparse status=none",
                fsimg.display(),
                path.display(),
                offset / MIB
            ));
            out.push((offset, p.mib * MIB, p.fs));
            offset += p.mib * MIB;
        }
        std::fs::remove_dir_all(&dir).unwrap();
        let disk = Disk {
            path: path.to_path_buf(),
            parts: out,
        };
        for i in 0..disk.parts.len() {
            disk.fsck(i);
        }
        disk
    }

    /// A disk of the same size, all zeros (a new device).
    pub fn blank_like(&self, path: &Path) -> PathBuf {
        let len = std::fs::metadata(&self.path).unwrap().len();
        let _ = std::fs::remove_file(path);
        std::fs::File::create(path).unwrap().set_len(len).unwrap();
        path.to_path_buf()
    }

    /// The bytes of partition `i` (0-based) as they are on this disk.
    pub fn part_bytes(&self, i: usize) -> Vec<u8> {
        read_range(&self.path, self.parts[i].0, self.parts[i].1)
    }

    /// fsck.fat -n / ntfsfix -n on partition `i` (a copy of it: the tools take a file).
    pub fn fsck(&self, i: usize) {
        fsck_part(&self.path, self.parts[i]);
    }
}

/// The files put on a partition made with `seed`: a text-like system file, a random one and
/// a small configuration file.
pub fn part_files(seed: u64) -> Vec<(String, Vec<u8>)> {
    vec![
        (
            format!("SYS{seed}.BIN"),
            crate::sample_bytes(seed, 5 * MIB as usize + seed as usize),
        ),
        (
            format!("RND{seed}.BIN"),
            crate::random_bytes(seed + 1000, 3 * MIB as usize + 17),
        ),
        (
            format!("CFG{seed}.TXT"),
            format!("server=https://imgserver seed {seed}\n")
                .repeat(500)
                .into_bytes(),
        ),
    ]
}

/// `len` bytes of the file at `path` from `offset` on.
pub fn read_range(path: &Path, offset: u64, len: u64) -> Vec<u8> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(path).unwrap();
    f.seek(SeekFrom::Start(offset)).unwrap();
    let mut buf = vec![0u8; len as usize];
    f.read_exact(&mut buf).unwrap();
    buf
}

/// fsck.fat -n / ntfsfix -n on the partition at `offset` (`len` bytes) of `disk`, through a
/// copy of it (the tools take a file); fails the test with their output when it is not clean.
pub fn fsck_part(disk: &Path, (offset, len, fs): (u64, u64, Fs)) {
    let copy = disk.with_extension(format!("fsck-{offset}"));
    std::fs::write(&copy, read_range(disk, offset, len)).unwrap();
    let out = match fs {
        Fs::Fat32 => Command::new("fsck.fat").arg("-n").arg(&copy).output(),
        Fs::Ntfs => Command::new("ntfsfix").arg("-n").arg(&copy).output(),
    }
    .expect("running fsck");
    let _ = std::fs::remove_file(&copy);
    assert!(
        out.status.success(),
        "{} at offset {offset} of {} is not clean:\n{}{}",
        if fs == Fs::Fat32 {
            "fsck.fat -n"
        } else {
            "ntfsfix -n"
        },
        disk.display(),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Every byte of `client` equals `master`'s, and each partition is fsck-clean.
pub fn assert_same_disk(master: &Disk, client: &Path, who: &str) {
    let a = std::fs::read(&master.path).unwrap();
    let b = std::fs::read(client).unwrap();
    assert_eq!(a.len(), b.len(), "{who}: disk size changed");
    // Slices compare with memcmp; the byte-by-byte search for the first difference (slow in
    // a debug build of this suite) runs only when they differ.
    if a != b {
        let at = a.iter().zip(&b).position(|(x, y)| x != y).unwrap();
        let part = master
            .parts
            .iter()
            .position(|(o, l, _)| (*o..o + l).contains(&(at as u64)))
            .map(|i| format!("partition {}", i + 1))
            .unwrap_or_else(|| "outside the partitions (partition table)".into());
        let differing = a.iter().zip(&b).filter(|(x, y)| x != y).count();
        panic!("{who}: disk differs from the master's from byte {at} ({part}); {differing} bytes differ");
    }
    for p in &master.parts {
        fsck_part(client, *p);
    }
}

/// Bytes of a file actually allocated (a sparse new disk grows as the client writes).
pub fn allocated(path: &Path) -> u64 {
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// Wait until `cond` holds; fails after `timeout` with `what`.
pub fn wait_until(timeout: Duration, what: &str, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + timeout;
    while !cond() {
        assert!(Instant::now() < end, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `img` arguments of the master of session `name`, then `extra`.
pub fn master_args<'a>(name: &'a str, extra: &[&'a str]) -> Vec<String> {
    let mut v = vec!["-session".to_string(), name.to_string(), "-master".into()];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// `img` arguments of a client of session `name` writing to `disk`, then `extra`.
pub fn client_args(name: &str, disk: &Path, extra: &[&str]) -> Vec<String> {
    let mut v = vec![
        "-session".to_string(),
        name.to_string(),
        "-client".into(),
        format!("-disk={}", disk.display()),
    ];
    v.extend(extra.iter().map(|s| s.to_string()));
    v
}

/// Starts `img` with `args` on `node` of the lab.
pub fn spawn(lab: &mut McastLab, node: &str, args: &[String]) -> Pid {
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    lab.spawn(node, &img(), &a)
}

/// `f` exited 0; else fails with the end of its output.
pub fn expect_ok(f: &Finished, who: &str) {
    assert!(
        f.ok(),
        "{who} exited with {:?} (a client exits 0 only when every chunk is verified and written):\n{}",
        f.code,
        crate::tail(&f.output, 60)
    );
}

/// The master's per-client summary names every client (by address or MAC).
pub fn assert_summary_names(lab: &McastLab, master: &Finished, clients: &[&str]) {
    for c in clients {
        let node = lab.node(c);
        let mac = sh(&format!(
            "ip -n {} -br link show eth0 | awk '{{print $3}}'",
            node.ns
        ));
        let mac = mac.trim();
        assert!(
            master.output.contains(&node.ip) || master.output.to_lowercase().contains(mac),
            "the master's summary does not name client {c} ({} / {mac}):\n{}",
            node.ip,
            crate::tail(&master.output, 40)
        );
    }
}

/// The room most tests use: a FAT32 boot partition and an NTFS system partition.
pub fn room_disk(s: &Scratch, seed: u64) -> Disk {
    Disk::build(
        &s.join(format!("master-{seed}.img")),
        &[
            Part {
                label: "BOOT",
                fs: Fs::Fat32,
                mib: 40,
                seed,
            },
            Part {
                label: "OS",
                fs: Fs::Ntfs,
                mib: 48,
                seed: seed + 1,
            },
        ],
    )
}
