//! The boot agent's directory (`/bootagent`: `config/`, `state/`, `ca.pem`, `trusted/`)
//! backed by the persistent store on the device's boot-agent partition (`grub::store`).
//!
//! The agent, discovery and the `img` console commands keep working on plain files in a
//! directory in RAM. This module fills that directory from the boot-agent partition at boot
//! ([`materialise`]) and writes the whole tree back into the store after every change
//! ([`commit`]): right after each write of the check-in state, after `img -serverurl` and
//! `img -netconfig`, and every few seconds while the agent runs (the engine's deploy resume
//! journal). What backs the directory is recorded in [`RECORD`] so that `img` commands typed
//! at the console commit too.
//!
//! Plain files an administrator put on the partition (`/ca.pem`, `/config/*`, `/trusted/*`)
//! are loaded first; the store's copies override them (they are newer: the agent wrote them).

use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use anyhow::Context;
use grub::bootpart::BootPartition;
use grub::store::{Item, Store, Tree};

/// Where the boot agent keeps its directory in the initramfs.
pub const ROOT: &str = "/bootagent";
/// Which disk and partition back [`ROOT`] (written at boot).
pub const RECORD: &str = "/run/img/bootpart";
/// What of the directory is kept: the names directly under the root.
/// `enrol.key` is the site enrolment secret the administrator puts next to the CA.
pub const KEPT: [&str; 5] = ["config", "state", "ca.pem", "enrol.key", "trusted"];
/// How often the running agent's directory is compared with the store.
pub const SYNC_EVERY: Duration = Duration::from_secs(3);
/// Largest file kept (the store holds 256 KiB in all).
const MAX_FILE: u64 = 256 << 10;

/// A directory backed by the store of a boot-agent partition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Backing {
    pub disk: PathBuf,
    pub partition: u32,
    /// Where the partition is on the disk (bytes), as found when the directory was filled.
    pub start: u64,
    pub len: u64,
    pub root: PathBuf,
}

impl Backing {
    fn render(&self) -> String {
        format!(
            "disk={}\npartition={}\nstart={}\nlen={}\nroot={}\n",
            self.disk.display(),
            self.partition,
            self.start,
            self.len,
            self.root.display()
        )
    }

    fn parse(text: &str) -> Option<Backing> {
        let mut disk = None;
        let mut partition = None;
        let mut start = None;
        let mut len = None;
        let mut root = None;
        for line in text.lines() {
            match line.split_once('=') {
                Some(("disk", v)) => disk = Some(PathBuf::from(v)),
                Some(("partition", v)) => partition = v.parse().ok(),
                Some(("start", v)) => start = v.parse().ok(),
                Some(("len", v)) => len = v.parse().ok(),
                Some(("root", v)) => root = Some(PathBuf::from(v)),
                _ => {}
            }
        }
        Some(Backing {
            disk: disk?,
            partition: partition?,
            start: start?,
            len: len?,
            root: root?,
        })
    }

    /// Record this backing in [`RECORD`] for the `img` commands typed at the console.
    pub fn record(&self) -> anyhow::Result<()> {
        let p = Path::new(RECORD);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        std::fs::write(p, self.render()).with_context(|| format!("writing {RECORD}"))
    }

    /// "partition 1 of /dev/vda".
    pub fn describe(&self) -> String {
        format!("partition {} of {}", self.partition, self.disk.display())
    }
}

/// The backing recorded at boot, if any.
pub fn recorded() -> Option<Backing> {
    Backing::parse(&std::fs::read_to_string(RECORD).ok()?)
}

/// The recorded backing when `dir` lies inside its root (a console command working on the
/// agent's own directory).
pub fn recorded_for(dir: &Path) -> Option<Backing> {
    recorded().filter(|b| dir.starts_with(&b.root))
}

/// Plain files an administrator put on the partition: `/ca.pem`, `/enrol.key`, `/config/*`,
/// `/trusted/*`.
fn admin_files(bp: &BootPartition) -> Tree {
    let mut t = Tree::new();
    let mut add = |path: &str, rel: String| {
        if let Ok(Some(data)) = bp.read_file(path) {
            if (data.len() as u64) <= MAX_FILE && grub::store::valid_path(&rel) {
                let secret = rel == "enrol.key";
                t.insert(rel, Item { data, secret });
            }
        }
    };
    add("/ca.pem", "ca.pem".into());
    add("/enrol.key", "enrol.key".into());
    for dir in ["config", "trusted"] {
        if let Ok(list) = bp.list_dir(dir) {
            for e in list.into_iter().filter(|e| !e.is_dir).take(64) {
                add(&format!("/{dir}/{}", e.name), format!("{dir}/{}", e.name));
            }
        }
    }
    t
}

/// Write `tree` into `root` (directories created; secret files mode 0600).
fn write_tree(root: &Path, tree: &Tree) -> anyhow::Result<()> {
    for (rel, item) in tree {
        let p = root.join(rel);
        if let Some(d) = p.parent() {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
        }
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(if item.secret { 0o600 } else { 0o644 })
            .open(&p)
            .with_context(|| format!("writing {}", p.display()))?;
        f.set_permissions(std::fs::Permissions::from_mode(if item.secret {
            0o600
        } else {
            0o644
        }))?;
        f.write_all(&item.data)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(())
}

/// What [`materialise`] did, for the console.
pub struct Materialised {
    pub backing: Backing,
    pub files: usize,
    pub seq: u64,
    pub from: String,
}

/// Fill `root` from the boot-agent partition of `disk`: administrator files, then the
/// store's tree over them.
pub fn materialise(disk: &Path, root: &Path) -> anyhow::Result<Materialised> {
    let bp = BootPartition::open(disk, false)?;
    let from = bp.describe();
    let (partition, start, len) = (
        bp.partition_number(),
        bp.partition_start(),
        bp.partition_len(),
    );
    let mut tree = admin_files(&bp);
    let store = Store::open(bp)?;
    let loaded = store.load()?;
    tree.extend(loaded.tree);
    std::fs::create_dir_all(root.join("state"))
        .with_context(|| format!("creating {}", root.display()))?;
    std::fs::create_dir_all(root.join("config"))
        .with_context(|| format!("creating {}", root.display()))?;
    write_tree(root, &tree)?;
    Ok(Materialised {
        backing: Backing {
            disk: disk.to_path_buf(),
            partition,
            start,
            len,
            root: root.to_path_buf(),
        },
        files: tree.len(),
        seq: loaded.seq,
        from,
    })
}

/// The kept part of `root` as a tree (temporary files of atomic writes left out).
pub fn collect(root: &Path) -> anyhow::Result<Tree> {
    fn walk(root: &Path, rel: &str, tree: &mut Tree, depth: usize) -> anyhow::Result<()> {
        let p = root.join(rel);
        let md = match std::fs::symlink_metadata(&p) {
            Ok(m) => m,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
        };
        if md.is_dir() && depth < 8 {
            let mut names: Vec<String> = std::fs::read_dir(&p)
                .with_context(|| format!("reading {}", p.display()))?
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            names.sort();
            for n in names {
                walk(root, &format!("{rel}/{n}"), tree, depth + 1)?;
            }
        } else if md.is_file() && !rel.ends_with(".tmp") && grub::store::valid_path(rel) {
            let data = match std::fs::read(&p) {
                Ok(d) => d,
                // Removed since it was listed (an acknowledged result): not part of the tree.
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(e).with_context(|| format!("reading {}", p.display())),
            };
            let secret = md.permissions().mode() & 0o077 == 0;
            tree.insert(rel.to_string(), Item { data, secret });
        }
        Ok(())
    }
    let mut tree = Tree::new();
    for k in KEPT {
        walk(root, k, &mut tree, 0)?;
    }
    Ok(tree)
}

/// One commit at a time in this process; across processes the disk itself is locked. The
/// value lists the roots being removed ([`TempRoot`]'s drop): a commit of a directory that
/// is going away would save a partial tree over the real state.
static COMMIT: Mutex<Vec<PathBuf>> = Mutex::new(Vec::new());

/// Write `b.root`'s tree into the store when it differs from the newest record. Returns
/// the new record's sequence number, None when nothing changed.
pub fn commit(b: &Backing) -> anyhow::Result<Option<u64>> {
    let closing = COMMIT.lock().unwrap_or_else(|e| e.into_inner());
    if closing.contains(&b.root) || !b.root.is_dir() {
        anyhow::bail!(
            "{} is gone; its last state was saved before",
            b.root.display()
        );
    }
    // An exclusive lock on the disk serializes the agent, its sync thread and console
    // commands (flock is per open file, so it works between processes).
    let lock =
        std::fs::File::open(&b.disk).with_context(|| format!("opening {}", b.disk.display()))?;
    nix::fcntl::Flock::lock(lock, nix::fcntl::FlockArg::LockExclusive)
        .map_err(|(_, e)| e)
        .with_context(|| format!("locking {}", b.disk.display()))
        .map(|held| {
            let r = commit_locked(b);
            drop(held);
            r
        })?
}

fn commit_locked(b: &Backing) -> anyhow::Result<Option<u64>> {
    let tree = collect(&b.root)?;
    let bp = BootPartition::open_range(&b.disk, true, b.partition, b.start, b.len)?;
    let mut store = Store::open(bp)?;
    if store.load().ok().is_some_and(|l| l.tree == tree) {
        return Ok(None);
    }
    store.save(&tree).map(Some)
}

/// Commit, saying on stderr what went wrong (a state change is never lost silently; the
/// next commit tries again).
pub fn commit_or_say(b: &Backing) {
    if let Err(e) = commit(b) {
        eprintln!(
            "img: the agent's state could not be saved on {}: {e:#}",
            b.describe()
        );
    }
}

/// Commit every [`SYNC_EVERY`] in a background thread, for as long as the process runs.
pub fn spawn_sync(b: Backing) {
    let _ = std::thread::Builder::new()
        .name("bootstore-sync".into())
        .spawn(move || {
            let mut said = false;
            loop {
                std::thread::sleep(SYNC_EVERY);
                match commit(&b) {
                    Ok(_) => said = false,
                    Err(e) if !said => {
                        eprintln!(
                            "img: the agent's state could not be saved on {}: {e:#}",
                            b.describe()
                        );
                        said = true;
                    }
                    Err(_) => {}
                }
            }
        });
}

/// Commit after every change of the check-in state (StateDir writes) in this process.
pub fn commit_on_state_change(b: Backing) {
    crate::checkin::state::on_change(Box::new(move || commit_or_say(&b)));
}

/// A temporary directory filled from `disk`'s boot-agent partition, for `img` commands
/// given `-disk=DISK` on a host or at the console: removed when dropped.
pub struct TempRoot {
    pub backing: Backing,
}

impl TempRoot {
    pub fn new(disk: &Path) -> anyhow::Result<TempRoot> {
        let root = std::env::temp_dir().join(format!(
            "img-bootagent-{}-{}",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&root).with_context(|| format!("creating {}", root.display()))?;
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o700))?;
        match materialise(disk, &root) {
            Ok(m) => Ok(TempRoot { backing: m.backing }),
            Err(e) => {
                let _ = std::fs::remove_dir_all(&root);
                Err(e)
            }
        }
    }

    pub fn root(&self) -> &Path {
        &self.backing.root
    }
}

impl Drop for TempRoot {
    fn drop(&mut self) {
        // Waits for a commit in progress; none starts afterwards.
        COMMIT
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(self.backing.root.clone());
        let _ = std::fs::remove_dir_all(&self.backing.root);
    }
}

/// `img -checkin`: when `-disk=DISK` is given without `-state` (and `IMG_AGENT_STATE` is
/// unset), the state comes from DISK's boot-agent partition exactly as the boot agent's
/// does: filled into a temporary directory, committed after every change, every few
/// seconds and at the end. Its CA, trusted keys and lab settings are used unless
/// `-ca`/`-trust-dir`/`-config` are given. Otherwise the check-in module's own loop runs.
pub fn run_checkin(m: crate::args::Matches) -> anyhow::Result<i32> {
    let (has_state, has_ca, has_trust, has_config) = (
        m.has("state"),
        m.has("ca"),
        m.has("trust-dir"),
        m.has("config"),
    );
    crate::checkin::parse_args(&m).and_then(|(server, mut cfg)| {
        let Some(disk) = cfg
            .disk
            .clone()
            .filter(|_| !has_state && std::env::var_os("IMG_AGENT_STATE").is_none())
        else {
            return crate::checkin::run_verb(&server, &cfg);
        };
        let t = TempRoot::new(&disk).with_context(|| {
            format!(
                "reading the agent's state from {} (or give -state=DIR)",
                disk.display()
            )
        })?;
        if !cfg.quiet {
            eprintln!(
                "img: agent state from the boot-agent {}",
                t.backing.describe()
            );
        }
        cfg.state_dir = t.root().join("state");
        if !has_ca && cfg.ca_file.is_none() && t.root().join("ca.pem").is_file() {
            cfg.ca_file = Some(t.root().join("ca.pem"));
        }
        if !has_trust && t.root().join("trusted").is_dir() {
            cfg.trusted_dir = Some(t.root().join("trusted"));
        }
        // The lab settings are the partition's own (config/lab.conf), as at boot.
        if !has_config {
            cfg.config_dir = t.root().join("config");
            let mut notes = Vec::new();
            cfg.lab = discovery::LabSettings::load(&cfg.config_dir, &mut notes)?;
            if !cfg.quiet {
                for n in notes {
                    eprintln!("img: {n}");
                }
            }
        }
        commit_on_state_change(t.backing.clone());
        spawn_sync(t.backing.clone());
        let r = crate::checkin::run_verb(&server, &cfg);
        // The final state (credential, results) is in the store before we return.
        commit(&t.backing)?;
        r
    })
}

/// At boot (init): find the disk with a boot-agent partition (`img.disk=` first, else the
/// disks in `/sys/block` in order), fill [`ROOT`] from it and record it. Returns the line
/// to show on the console.
pub fn materialise_at_boot(disk: Option<&str>, disks: &[String]) -> String {
    let candidates: Vec<PathBuf> = match disk {
        Some(d) => vec![PathBuf::from(d)],
        None => disks.iter().map(|d| Path::new("/dev").join(d)).collect(),
    };
    let mut why = Vec::new();
    for d in &candidates {
        match materialise(d, Path::new(ROOT)) {
            Ok(m) => {
                if let Err(e) = m.backing.record() {
                    return format!("boot-agent partition found but not recorded: {e:#}");
                }
                return format!(
                    "agent state from the store on {} (record {}, {} files) in {ROOT}",
                    m.from, m.seq, m.files
                );
            }
            Err(e) => why.push(format!("{}: {e:#}", d.display())),
        }
    }
    let _ = std::fs::create_dir_all(Path::new(ROOT).join("state"));
    format!(
        "no boot-agent partition with a store: the agent's state stays in memory until power-off ({})",
        if why.is_empty() {
            "no disks".to_string()
        } else {
            why.join("; ")
        }
    )
}

/// What `img -dump` says about the boot-agent partition of `disk`: which one it is, the
/// store's newest record (sequence, files; the credential's bytes are never shown) and
/// GRUB's environment block as it is on disk. None when the disk has none.
pub fn dump_info(disk: &Path) -> Option<serde_json::Value> {
    let bp = BootPartition::open(disk, false).ok()?;
    let grubenv = bp.read_file("/boot/grub/grubenv").ok().flatten().map(|b| {
        String::from_utf8_lossy(&b)
            .lines()
            .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
            .map(str::to_string)
            .collect::<Vec<_>>()
    });
    let mut v = serde_json::json!({
        "partition": bp.partition_number(),
        "describe": bp.describe(),
    });
    match Store::open(bp).and_then(|s| s.load()) {
        Ok(l) => {
            let files: Vec<serde_json::Value> = l
                .tree
                .iter()
                .map(|(p, i)| serde_json::json!({ "path": p, "bytes": i.data.len(), "secret": i.secret }))
                .collect();
            v["store"] =
                serde_json::json!({ "file": grub::store::FILE, "record": l.seq, "files": files });
        }
        Err(e) => v["store_error"] = serde_json::json!(format!("{e:#}")),
    }
    if let Some(g) = grubenv {
        v["grubenv"] = serde_json::json!(g);
    }
    Some(v)
}

/// The text form of [`dump_info`].
pub fn dump_text(v: &serde_json::Value) -> String {
    let mut s = format!(
        "  boot-agent partition: {}\n",
        v["describe"].as_str().unwrap_or("?")
    );
    if let Some(st) = v.get("store") {
        let files: Vec<String> = st["files"]
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|f| {
                        format!(
                            "{} ({} bytes)",
                            f["path"].as_str().unwrap_or("?"),
                            f["bytes"]
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        s += &format!(
            "  agent store {}: record {}, {} files{}{}\n",
            st["file"].as_str().unwrap_or("?"),
            st["record"],
            files.len(),
            if files.is_empty() { "" } else { ": " },
            files.join(", ")
        );
    }
    if let Some(e) = v.get("store_error").and_then(|e| e.as_str()) {
        s += &format!("  agent store: {e}\n");
    }
    if let Some(g) = v.get("grubenv").and_then(|g| g.as_array()) {
        let vars: Vec<&str> = g.iter().filter_map(|x| x.as_str()).collect();
        s += &format!(
            "  grubenv: {}\n",
            if vars.is_empty() {
                "(no variables)".to_string()
            } else {
                vars.join(" ")
            }
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A disk-image file with a boot-agent partition as `img -install` leaves it (FAT16,
    /// preallocated store) and an administrator's ca.pem on it.
    fn disk(tag: &str) -> (PathBuf, PathBuf) {
        let dir = std::env::temp_dir().join(format!("bootstore-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let script = format!(
            "truncate -s 8M d.img
             sgdisk -o -n 1:2048:+6144K -c 1:BOOTAGENT -n 2:0:0 d.img >/dev/null
             mkfs.fat -C -F 16 -s 1 -n BOOTAGENT p.img 6144 >/dev/null
             head -c {} /dev/zero > s.dat
             echo admin-ca > ca.pem
             mmd -i p.img ::AGENT
             mcopy -i p.img s.dat ::AGENT/STATE.DAT
             mcopy -i p.img ca.pem ::ca.pem
             dd if=p.img of=d.img bs=512 seek=2048 conv=notrunc status=none",
            grub::store::FILE_LEN
        );
        let st = std::process::Command::new("sh")
            .args(["-ec", &script])
            .current_dir(&dir)
            .status()
            .unwrap();
        assert!(
            st.success(),
            "making the test disk failed (needs sgdisk, mkfs.fat, mtools)"
        );
        (dir.join("d.img"), dir)
    }

    #[test]
    fn materialise_commit_and_materialise_again() {
        let (img, dir) = disk("cycle");
        let a = dir.join("a");
        let m = materialise(&img, &a).unwrap();
        assert_eq!((m.seq, m.backing.partition), (0, 1));
        assert_eq!(std::fs::read(a.join("ca.pem")).unwrap(), b"admin-ca\n");
        // The agent's changes: a credential (0600), a URL list, and its own CA copy.
        let mut t = Tree::new();
        t.insert(
            "state/credential".into(),
            Item {
                data: b"secret-token".to_vec(),
                secret: true,
            },
        );
        t.insert(
            "state/outbox/r1.json".into(),
            Item {
                data: b"{}".to_vec(),
                secret: false,
            },
        );
        t.insert(
            "ca.pem".into(),
            Item {
                data: b"agent-ca".to_vec(),
                secret: false,
            },
        );
        write_tree(&a, &t).unwrap();
        assert_eq!(commit(&m.backing).unwrap(), Some(1));
        assert_eq!(commit(&m.backing).unwrap(), None, "no change, no write");
        // Next boot: a fresh directory gets the same tree, the store overriding the
        // administrator's file, the credential readable by its owner only.
        let b = dir.join("b");
        let m2 = materialise(&img, &b).unwrap();
        assert_eq!(m2.seq, 1);
        assert_eq!(collect(&b).unwrap(), collect(&a).unwrap());
        assert_eq!(std::fs::read(b.join("ca.pem")).unwrap(), b"agent-ca");
        let mode = std::fs::metadata(b.join("state/credential"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        // A deleted outbox entry is deleted in the store too.
        std::fs::remove_file(a.join("state/outbox/r1.json")).unwrap();
        assert_eq!(commit(&m.backing).unwrap(), Some(2));
        let c = dir.join("c");
        materialise(&img, &c).unwrap();
        assert!(!c.join("state/outbox/r1.json").exists());
        // A temporary root that was removed is never committed (it would save an empty
        // tree over the credential).
        let t = TempRoot::new(&img).unwrap();
        let gone = t.backing.clone();
        drop(t);
        assert!(commit(&gone).is_err());
        let again = materialise(&img, &dir.join("d")).unwrap();
        assert_eq!(again.seq, 2);
        assert!(dir.join("d/state/credential").exists());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn record_round_trips() {
        let b = Backing {
            disk: "/dev/vda".into(),
            partition: 1,
            start: 1 << 20,
            len: 40 << 20,
            root: "/bootagent".into(),
        };
        assert_eq!(Backing::parse(&b.render()), Some(b));
        assert_eq!(Backing::parse("disk=/x\n"), None);
    }

    #[test]
    fn collect_keeps_the_agent_files_and_marks_secrets() {
        let d = std::env::temp_dir().join(format!("bootstore-collect-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        let mut t = Tree::new();
        t.insert(
            "state/credential".into(),
            Item {
                data: b"tok".to_vec(),
                secret: true,
            },
        );
        t.insert(
            "config/serverurl".into(),
            Item {
                data: b"https://s".to_vec(),
                secret: false,
            },
        );
        write_tree(&d, &t).unwrap();
        std::fs::write(d.join("state/x.tmp"), b"half").unwrap();
        std::fs::write(d.join("other"), b"not kept").unwrap();
        assert_eq!(collect(&d).unwrap(), t);
        let mode = std::fs::metadata(d.join("state/credential"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
        let _ = std::fs::remove_dir_all(&d);
    }
}
