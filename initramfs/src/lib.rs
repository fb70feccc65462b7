//! Building the initrd the agent boots from.
//!
//! The result is a compressed newc cpio (see [`cpio`]) holding the static-musl agent as
//! `/init` with `/bin/img` pointing at it (the console command, STYLE habit 2), the kernel
//! modules the device needs with their dependencies and a trimmed `modules.dep` (see
//! [`modules`]; PID 1 loads them in that order), the CA bundle for HTTPS, trusted image keys
//! under `/etc/img/trusted.d/` and the default agent configuration.
//!
//! Identical inputs give byte-identical output: entries are sorted by path, inode numbers
//! are assigned in that order, owners are root, every mtime is one fixed value (0, or
//! `SOURCE_DATE_EPOCH` when the caller passes it), and the compressor runs single-threaded at
//! a fixed level. Nothing is taken from the build machine except the files named.

pub mod cpio;
pub mod modules;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use cpio::{Header, NewcWriter, S_IFCHR, S_IFDIR, S_IFLNK, S_IFREG};
pub use modules::{module_name, ModulesDep, ModulesError};

/// Modules for virtual machines and common thin-client hardware. Those the kernel does not
/// have as modules (built in, or not built) are skipped and reported.
pub const DEFAULT_MODULES: &[&str] = &[
    // virtio (QEMU/KVM, the end-to-end tests)
    "virtio_pci",
    "virtio_blk",
    "virtio_scsi",
    "virtio_net",
    // storage: SATA, NVMe, eMMC/SD, USB sticks
    "sd_mod",
    "ahci",
    "ata_piix",
    "nvme",
    "mmc_block",
    "sdhci_pci",
    "sdhci_acpi",
    "xhci_pci",
    "ehci_pci",
    "usb_storage",
    "uas",
    // NICs: Intel, Realtek, Broadcom and the common cloud/hypervisor ones
    "e1000",
    "e1000e",
    "igb",
    "igc",
    "r8169",
    "tg3",
    "vmxnet3",
    "ena",
    "hv_netvsc",
];

/// The zstd level used unless told otherwise: 19 is the highest level whose decompression
/// window (8 MiB) the kernel's initramfs unpacker accepts without `--long` support.
pub const DEFAULT_ZSTD_LEVEL: i32 = 19;

#[derive(Debug, thiserror::Error)]
pub enum InitrdError {
    /// An input file could not be read.
    #[error("reading {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The kernel's module list could not be used.
    #[error("kernel modules in {dir}: {source}")]
    Modules { dir: PathBuf, source: ModulesError },
    /// A path cannot go into the archive (empty, `..`, or not UTF-8).
    #[error("archive path {0:?} is not usable (empty, contains `..`, or not UTF-8)")]
    BadPath(String),
    /// A file is larger than newc's 32-bit size field (4 GiB).
    #[error("{0} is larger than the 4 GiB a newc cpio entry can hold")]
    TooLarge(String),
    /// Writing or compressing the archive failed.
    #[error("writing the archive: {0}")]
    Write(#[from] std::io::Error),
}

/// One member of the archive.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Member {
    Dir { mode: u32 },
    File { mode: u32, data: Vec<u8> },
    Symlink { target: String },
    CharDevice { mode: u32, major: u32, minor: u32 },
}

/// The initramfs tree being assembled, kept sorted by path.
#[derive(Debug, Clone, Default)]
pub struct Initrd {
    members: BTreeMap<String, Member>,
    mtime: u32,
}

fn clean(path: &str) -> Result<String, InitrdError> {
    let p = path.trim_matches('/');
    if p.is_empty() || p.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
        return Err(InitrdError::BadPath(path.to_owned()));
    }
    Ok(p.to_owned())
}

impl Initrd {
    /// An empty tree with the skeleton PID 1 needs: mount points, `/dev/console` (the kernel
    /// opens it for init's stdin/stdout before devtmpfs is mounted), `/tmp`.
    pub fn skeleton(mtime: u32) -> Initrd {
        let mut t = Initrd {
            members: BTreeMap::new(),
            mtime,
        };
        for d in [
            "dev",
            "proc",
            "sys",
            "run",
            "etc",
            "bin",
            "lib/modules",
            "var/lib/img",
            "mnt",
        ] {
            t.add_dir(d, 0o755).expect("fixed path");
        }
        t.add_dir("tmp", 0o1777).expect("fixed path");
        t.add_char_device("dev/console", 0o600, 5, 1)
            .expect("fixed path");
        t.add_char_device("dev/null", 0o666, 1, 3)
            .expect("fixed path");
        t
    }

    fn parents(&mut self, path: &str) {
        let mut at = 0;
        while let Some(i) = path[at..].find('/') {
            let dir = &path[..at + i];
            self.members
                .entry(dir.to_owned())
                .or_insert(Member::Dir { mode: 0o755 });
            at += i + 1;
        }
    }

    fn put(&mut self, path: &str, m: Member) -> Result<(), InitrdError> {
        let p = clean(path)?;
        self.parents(&p);
        self.members.insert(p, m);
        Ok(())
    }

    pub fn add_dir(&mut self, path: &str, mode: u32) -> Result<(), InitrdError> {
        self.put(
            path,
            Member::Dir {
                mode: mode & 0o7777,
            },
        )
    }

    pub fn add_file(&mut self, path: &str, mode: u32, data: Vec<u8>) -> Result<(), InitrdError> {
        if u32::try_from(data.len()).is_err() {
            return Err(InitrdError::TooLarge(path.to_owned()));
        }
        self.put(
            path,
            Member::File {
                mode: mode & 0o7777,
                data,
            },
        )
    }

    /// Add the file at `src` under `path`, keeping only its executable bit.
    pub fn add_host_file(&mut self, path: &str, src: &Path) -> Result<u64, InitrdError> {
        use std::os::unix::fs::PermissionsExt;
        let read = |e| InitrdError::Read {
            path: src.to_owned(),
            source: e,
        };
        let data = std::fs::read(src).map_err(read)?;
        let exec = std::fs::metadata(src).map_err(read)?.permissions().mode() & 0o111 != 0;
        let len = data.len() as u64;
        self.add_file(path, if exec { 0o755 } else { 0o644 }, data)?;
        Ok(len)
    }

    pub fn add_symlink(&mut self, path: &str, target: &str) -> Result<(), InitrdError> {
        self.put(
            path,
            Member::Symlink {
                target: target.to_owned(),
            },
        )
    }

    pub fn add_char_device(
        &mut self,
        path: &str,
        mode: u32,
        major: u32,
        minor: u32,
    ) -> Result<(), InitrdError> {
        self.put(
            path,
            Member::CharDevice {
                mode: mode & 0o7777,
                major,
                minor,
            },
        )
    }

    pub fn members(&self) -> impl Iterator<Item = (&str, &Member)> {
        self.members.iter().map(|(k, v)| (k.as_str(), v))
    }

    /// The uncompressed newc archive.
    pub fn cpio(&self) -> Result<Vec<u8>, InitrdError> {
        let mut w = NewcWriter::new(Vec::new());
        for (i, (path, m)) in self.members.iter().enumerate() {
            let ino = u32::try_from(i + 1)
                .map_err(|_| InitrdError::TooLarge("the member count".into()))?;
            let (mode, nlink, data, rdev): (u32, u32, &[u8], (u32, u32)) = match m {
                Member::Dir { mode } => (S_IFDIR | mode, 2, &[], (0, 0)),
                Member::File { mode, data } => (S_IFREG | mode, 1, data, (0, 0)),
                Member::Symlink { target } => (S_IFLNK | 0o777, 1, target.as_bytes(), (0, 0)),
                Member::CharDevice { mode, major, minor } => {
                    (S_IFCHR | mode, 1, &[], (*major, *minor))
                }
            };
            let filesize =
                u32::try_from(data.len()).map_err(|_| InitrdError::TooLarge(path.clone()))?;
            let h = Header {
                ino,
                mode,
                uid: 0,
                gid: 0,
                nlink,
                mtime: self.mtime,
                filesize,
                rdev_major: rdev.0,
                rdev_minor: rdev.1,
            };
            w.entry(path, &h, data)?;
        }
        Ok(w.finish()?)
    }
}

/// How the archive is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    None,
    Zstd(i32),
}

/// Compress a cpio archive the way the kernel can unpack it.
pub fn compress(cpio: &[u8], c: Compression) -> Result<Vec<u8>, InitrdError> {
    match c {
        Compression::None => Ok(cpio.to_vec()),
        Compression::Zstd(level) => {
            let mut enc = zstd::stream::Encoder::new(Vec::new(), level)?;
            // The checksum lets the kernel notice a truncated TFTP transfer.
            enc.include_checksum(true)?;
            std::io::Write::write_all(&mut enc, cpio)?;
            Ok(enc.finish()?)
        }
    }
}

/// Kernel modules to carry: `dir` is `lib/modules/<version>` of the kernel (with
/// `modules.dep`), `names` the modules wanted; their dependencies come along.
#[derive(Debug, Clone)]
pub struct ModuleSelection {
    pub dir: PathBuf,
    pub names: Vec<String>,
}

/// What a lab initramfs says about itself at every boot.
pub const LAB_BUILD_TEXT: &str =
    "this initramfs was built with mkinitrd --lab (no CA required); not for production devices\n";

/// What goes into the initrd.
#[derive(Debug, Clone)]
pub struct InitrdSpec {
    /// The static agent binary, installed as `/init` (and `/bin/img`).
    pub agent: PathBuf,
    pub modules: Option<ModuleSelection>,
    /// PEM bundle installed as `/etc/ssl/certs/ca-certificates.crt`.
    pub ca_bundle: Option<PathBuf>,
    /// The management server's own CA, installed as `/etc/img/server-ca.pem`: the agent
    /// trusts only it for the server (and refuses plain HTTP).
    pub server_ca: Option<PathBuf>,
    /// A lab build: carries `/etc/img/lab-build`, which init prints at every boot.
    pub lab: bool,
    /// Public keys installed under `/etc/img/trusted.d/` (file names kept).
    pub trusted_keys: Vec<PathBuf>,
    /// Default agent configuration, installed as `/etc/img/agent.conf`.
    pub config: Option<PathBuf>,
    /// Extra files: (host source, archive path).
    pub extra: Vec<(PathBuf, String)>,
    pub mtime: u32,
    pub compression: Compression,
}

impl InitrdSpec {
    pub fn new(agent: impl Into<PathBuf>) -> InitrdSpec {
        InitrdSpec {
            agent: agent.into(),
            modules: None,
            ca_bundle: None,
            server_ca: None,
            lab: false,
            trusted_keys: Vec::new(),
            config: None,
            extra: Vec::new(),
            mtime: 0,
            compression: Compression::Zstd(DEFAULT_ZSTD_LEVEL),
        }
    }
}

/// What was built, for the size report.
#[derive(Debug, Clone, Default)]
pub struct InitrdReport {
    pub agent_bytes: u64,
    /// Module paths carried, in load order.
    pub modules: Vec<String>,
    pub module_bytes: u64,
    /// Requested modules the kernel does not have as modules.
    pub skipped_modules: Vec<String>,
    pub cpio_bytes: u64,
    pub compressed_bytes: u64,
}

impl std::fmt::Display for InitrdReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let mib = |b: u64| b as f64 / 1048576.0;
        writeln!(
            f,
            "initrd: {} bytes ({:.2} MiB) compressed, {} bytes cpio",
            self.compressed_bytes,
            mib(self.compressed_bytes),
            self.cpio_bytes
        )?;
        writeln!(
            f,
            "agent (/init): {} bytes ({:.2} MiB)",
            self.agent_bytes,
            mib(self.agent_bytes)
        )?;
        let names: Vec<String> = self.modules.iter().map(|p| module_name(p)).collect();
        writeln!(
            f,
            "modules: {} ({} bytes): {}",
            names.len(),
            self.module_bytes,
            names.join(" ")
        )?;
        if !self.skipped_modules.is_empty() {
            writeln!(
                f,
                "not modules in this kernel (built in or absent): {}",
                self.skipped_modules.join(" ")
            )?;
        }
        Ok(())
    }
}

/// Assemble the tree described by `spec`.
pub fn assemble(spec: &InitrdSpec) -> Result<(Initrd, InitrdReport), InitrdError> {
    let mut t = Initrd::skeleton(spec.mtime);
    let mut report = InitrdReport {
        agent_bytes: t.add_host_file("init", &spec.agent)?,
        ..Default::default()
    };
    t.add_symlink("bin/img", "/init")?;
    if let Some(sel) = &spec.modules {
        add_modules(&mut t, sel, &mut report)?;
    }
    if let Some(ca) = &spec.ca_bundle {
        t.add_host_file("etc/ssl/certs/ca-certificates.crt", ca)?;
    }
    if let Some(ca) = &spec.server_ca {
        t.add_host_file("etc/img/server-ca.pem", ca)?;
    }
    if spec.lab {
        t.add_file(
            "etc/img/lab-build",
            0o644,
            LAB_BUILD_TEXT.as_bytes().to_vec(),
        )?;
    }
    t.add_dir("etc/img/trusted.d", 0o755)?;
    for key in &spec.trusted_keys {
        let name = key
            .file_name()
            .and_then(|n| n.to_str())
            .ok_or_else(|| InitrdError::BadPath(key.display().to_string()))?;
        t.add_host_file(&format!("etc/img/trusted.d/{name}"), key)?;
    }
    if let Some(cfg) = &spec.config {
        t.add_host_file("etc/img/agent.conf", cfg)?;
    }
    for (src, dest) in &spec.extra {
        t.add_host_file(dest, src)?;
    }
    Ok((t, report))
}

fn add_modules(
    t: &mut Initrd,
    sel: &ModuleSelection,
    report: &mut InitrdReport,
) -> Result<(), InitrdError> {
    let dep_path = sel.dir.join("modules.dep");
    let text = std::fs::read_to_string(&dep_path).map_err(|e| InitrdError::Read {
        path: dep_path.clone(),
        source: e,
    })?;
    let dep = ModulesDep::parse(&text).map_err(|e| InitrdError::Modules {
        dir: sel.dir.clone(),
        source: e,
    })?;
    let (present, skipped): (Vec<&String>, Vec<&String>) =
        sel.names.iter().partition(|n| dep.find(n).is_some());
    report.skipped_modules = skipped.into_iter().cloned().collect();
    let order = dep.load_order(&present).map_err(|e| InitrdError::Modules {
        dir: sel.dir.clone(),
        source: e,
    })?;
    let version = sel
        .dir
        .file_name()
        .and_then(|n| n.to_str())
        .ok_or_else(|| InitrdError::BadPath(sel.dir.display().to_string()))?
        .to_owned();
    for path in &order {
        report.module_bytes += t.add_host_file(
            &format!("lib/modules/{version}/{path}"),
            &sel.dir.join(path),
        )?;
    }
    t.add_file(
        &format!("lib/modules/{version}/modules.dep"),
        0o644,
        dep.subset(&order).into_bytes(),
    )?;
    report.modules = order;
    Ok(())
}

/// Assemble, archive and compress: the initrd bytes and the report.
pub fn build(spec: &InitrdSpec) -> Result<(Vec<u8>, InitrdReport), InitrdError> {
    let (tree, mut report) = assemble(spec)?;
    let cpio = tree.cpio()?;
    let out = compress(&cpio, spec.compression)?;
    report.cpio_bytes = cpio.len() as u64;
    report.compressed_bytes = out.len() as u64;
    Ok((out, report))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn scratch(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("initramfs-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    fn fake_kernel(dir: &Path) -> PathBuf {
        let k = dir.join("lib/modules/6.1.0-test");
        std::fs::create_dir_all(k.join("kernel/drivers/virtio")).unwrap();
        std::fs::create_dir_all(k.join("kernel/drivers/block")).unwrap();
        for m in [
            "virtio/virtio.ko",
            "virtio/virtio_ring.ko",
            "block/virtio_blk.ko",
        ] {
            std::fs::write(k.join("kernel/drivers").join(m), format!("module {m}")).unwrap();
        }
        std::fs::write(
            k.join("modules.dep"),
            "kernel/drivers/block/virtio_blk.ko: kernel/drivers/virtio/virtio.ko kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n\
             kernel/drivers/virtio/virtio_ring.ko:\n",
        )
        .unwrap();
        k
    }

    fn spec(dir: &Path) -> InitrdSpec {
        let agent = dir.join("agent");
        std::fs::write(&agent, b"\x7fELF fake agent").unwrap();
        let mut s = InitrdSpec::new(&agent);
        s.modules = Some(ModuleSelection {
            dir: fake_kernel(dir),
            names: vec!["virtio_blk".into(), "e1000e".into()],
        });
        let key = dir.join("site.pub");
        std::fs::write(&key, b"key").unwrap();
        s.trusted_keys.push(key);
        s
    }

    #[test]
    fn identical_inputs_give_identical_bytes() {
        let d = scratch("repro");
        let s = spec(&d);
        let (a, ra) = build(&s).unwrap();
        // Touch the inputs: new mtimes on the host must not change the output.
        std::fs::write(&s.agent, b"\x7fELF fake agent").unwrap();
        let (b, _) = build(&s).unwrap();
        assert_eq!(a, b);
        assert_eq!(ra.compressed_bytes, a.len() as u64);
        assert_eq!(ra.skipped_modules, vec!["e1000e".to_string()]);
        let names: Vec<String> = ra.modules.iter().map(|p| module_name(p)).collect();
        assert_eq!(names, ["virtio_ring", "virtio", "virtio_blk"]);
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn tree_has_init_console_and_modules() {
        let d = scratch("tree");
        let (t, _) = assemble(&spec(&d)).unwrap();
        let m: BTreeMap<&str, &Member> = t.members().collect();
        assert!(matches!(
            m["init"],
            Member::File {
                mode: 0o644 | 0o755,
                ..
            }
        ));
        assert_eq!(
            m["bin/img"],
            &Member::Symlink {
                target: "/init".into()
            }
        );
        assert_eq!(
            m["dev/console"],
            &Member::CharDevice {
                mode: 0o600,
                major: 5,
                minor: 1
            }
        );
        assert!(m.contains_key("lib/modules/6.1.0-test/kernel/drivers/block/virtio_blk.ko"));
        assert!(
            m.contains_key("lib/modules/6.1.0-test/kernel/drivers/virtio"),
            "parents are created"
        );
        assert!(m.contains_key("etc/img/trusted.d/site.pub"));
        let _ = std::fs::remove_dir_all(&d);
    }

    #[test]
    fn bad_paths_are_refused() {
        let mut t = Initrd::default();
        assert!(t.add_file("../etc/passwd", 0o644, vec![]).is_err());
        assert!(t.add_file("/", 0o644, vec![]).is_err());
        assert!(t.add_file("a//b", 0o644, vec![]).is_err());
    }
}
