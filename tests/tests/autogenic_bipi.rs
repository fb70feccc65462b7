//! Autogenic imaging (seed 001), the agent's side, against real peers: the real `imgserver`
//! (TLS, its own CA), nginx serving the image (with a rate limit, to interrupt it), and
//! disk-image files with a boot-agent partition made by sgdisk + `img -install`, driven by
//! `img -checkin -disk=DISK -backup=DIR` exactly as the boot agent runs (state in the
//! partition's store). The backup area here is a folder (`-backup=DIR`).
//!
//! - BI: the image lands in the area byte-identical to the published (signed) image, the
//!   task completes without a reboot, and `imgserver device MAC` shows
//!   `SupportImgBackup=1 BackupImagePresent=1 BackImageVer=2`;
//! - BI killed mid-download resumes with a Range request: the second run fetches only the
//!   rest (nginx's access log counts the bytes);
//! - PI: an imaging status record in the store (`pending`) runs at the next start, before
//!   any network, writes the OS partition byte-identical to a network deploy of the same
//!   image on another disk, fetches nothing (nginx counts 0 bytes), and its result is
//!   delivered exactly once;
//! - a chunk corrupted in the area makes PI refuse before writing (the OS partition is
//!   unchanged), three times, and the device reports maintenance.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::{img_bin, imgserver_admin as admin, require_tool, sh, Scratch};
use grub::bootpart::BootPartition;
use grub::store::{Item, Store};

const MIB: u64 = 1 << 20;

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn img(args: &[&str]) -> Output {
    Command::new(img_bin()).args(args).output().unwrap()
}

/// A running `imgserver serve` on 127.0.0.1 (tests/src/server.rs); killed on drop.
struct Server(e2e::server::Server);

impl std::ops::Deref for Server {
    type Target = e2e::server::Server;
    fn deref(&self) -> &e2e::server::Server {
        &self.0
    }
}

impl Server {
    fn start(data: &Path) -> Server {
        admin(data, &["init"]);
        Server(e2e::server::Server::start(
            data,
            &["--listen", "127.0.0.1:0"],
        ))
    }
}

/// The server, a signed autogenic image `os:2` (a 32 MiB FAT16 partition image with
/// VERSION.TXT and `bulk_mib` MiB of incompressible data) served by nginx at `rate`, and
/// the publisher's key.
struct Lab {
    dir: Scratch,
    data: PathBuf,
    server: Server,
    nginx: e2e::Nginx,
    image: PathBuf,
    key_pub: PathBuf,
}

impl Lab {
    fn new(tag: &str, bulk_mib: usize, rate: &str) -> Lab {
        for t in ["sgdisk", "fsck.fat", "mtype", "mcopy", "mkfs.fat", "nginx"] {
            require_tool(t);
        }
        let dir = Scratch::new(tag);
        let data = dir.join("server");
        std::fs::create_dir_all(&data).unwrap();
        let server = Server::start(&data);
        let src = dir.join("src.img");
        std::fs::write(dir.join("BULK.BIN"), e2e::random_bytes(11, bulk_mib << 20)).unwrap();
        sh(&format!(
            "cd {dir}; export MTOOLS_SKIP_CHECK=1; echo 'os 2' > VERSION.TXT
             truncate -s 48M {src}
             sgdisk -o -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {src} >/dev/null
             mkfs.fat -F 16 -n SYSTEM --offset 2048 {src} 32768 >/dev/null
             mcopy -i {src}@@1048576 VERSION.TXT BULK.BIN ::",
            dir = dir.path().display(),
            src = src.display()
        ));
        let www = dir.join("www");
        std::fs::create_dir_all(&www).unwrap();
        let raw = dir.join("os-2.raw.img");
        let o = img(&[
            "-make",
            raw.to_str().unwrap(),
            &format!("-disk={}", src.display()),
            "-part=1",
            "-name=os",
            "-version=2",
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let key = dir.join("publisher");
        let o = img(&["-keygen", key.to_str().unwrap()]);
        assert!(o.status.success(), "{}", text(&o));
        let image = www.join("os-2.img");
        let o = img(&[
            "-sign",
            raw.to_str().unwrap(),
            &format!("-key={}", key.display()),
            &format!("-out={}", image.display()),
        ]);
        assert!(o.status.success(), "{}", text(&o));
        let nginx = e2e::Nginx::serve_with(&www, rate);
        admin(&data, &["image", "add", &nginx.url("os-2.img")]);
        Lab {
            key_pub: PathBuf::from(format!("{}.pub", key.display())),
            dir,
            data,
            server,
            nginx,
            image,
        }
    }

    /// A 96 MiB device disk: partition 1 the boot-agent partition (40 MiB, `img -install`,
    /// with the server's CA, the site's enrol.key and the publisher's key), partition 2 the
    /// OS partition (zeros).
    fn device(&self, name: &str) -> Device {
        self.device_of(name, 96)
    }

    /// A device converted to the autogenic layout by `img -convert` (boot-agent partition
    /// kept, OS partition 2, IMGBACKUP partition 3): the backup area is the partition.
    fn converted_device(&self, name: &str) -> Device {
        let mut dev = self.device_of(name, 256);
        let o = img(&[
            "-convert",
            &format!("-disk={}", dev.disk.display()),
            "-image=8MB",
        ]);
        assert!(o.status.success(), "img -convert:\n{}", text(&o));
        dev.backup = None;
        dev.os_start = sgdisk_first_sector(&dev.disk, 2) * 512;
        dev
    }

    fn device_of(&self, name: &str, mib: u64) -> Device {
        let disk = e2e::server::installed_disk(
            self.dir.path(),
            &self.dir.join(format!("{name}.img")),
            mib,
            Some("OS"),
        );
        let d = disk.display();
        sh(&format!(
            "export MTOOLS_SKIP_CHECK=1
             mcopy -i {d}@@1M {ca} ::ca.pem; mcopy -i {d}@@1M {key} ::enrol.key
             mmd -i {d}@@1M ::trusted; mcopy -i {d}@@1M {pubkey} ::trusted/publisher.pub",
            ca = self.data.join("ca.pem").display(),
            key = self.data.join("enrol.key").display(),
            pubkey = self.key_pub.display()
        ));
        let mac = format!(
            "52:54:00:00:0b:{:02x}",
            name.bytes().map(u32::from).sum::<u32>() % 250
        );
        Device {
            backup: Some(self.dir.join(format!("{name}-backup"))),
            disk,
            mac,
            url: self.server.url.clone(),
            os_start: 41 * MIB,
        }
    }

    fn schedule(&self, mac: &str, extra: &[&str]) -> String {
        let mut args = vec!["schedule", "add", "--mac", mac, "--image", "os:2"];
        args.extend_from_slice(extra);
        let out = admin(&self.data, &args);
        assert!(out.contains("scheduled"), "{out}");
        out
    }

    /// The id of the one task of job `job`, from `imgserver job N`.
    fn task_of(&self, job: u64) -> (u64, String) {
        let out = admin(&self.data, &["job", &job.to_string()]);
        let line = out
            .lines()
            .find(|l| l.starts_with(|c: char| c.is_ascii_digit()))
            .unwrap_or_else(|| panic!("no task line in:\n{out}"));
        let mut w = line.split_whitespace();
        let id = w.next().unwrap().parse().unwrap();
        (id, w.nth(1).unwrap_or_default().to_string())
    }
}

struct Device {
    disk: PathBuf,
    /// The backup folder (`-backup=DIR`); None: the disk's IMGBACKUP partition.
    backup: Option<PathBuf>,
    mac: String,
    url: String,
    /// Where the OS partition (2) starts.
    os_start: u64,
}

/// `sgdisk -i N`'s first sector.
fn sgdisk_first_sector(disk: &Path, n: u32) -> u64 {
    let out = sh(&format!("sgdisk -i {n} {}", disk.display()));
    out.lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("sgdisk -i {n}:\n{out}"))
}

impl Device {
    fn command(&self) -> Command {
        let mut c = Command::new(img_bin());
        c.args([
            "-checkin",
            &format!("-server={}", self.url),
            &format!("-disk={}", self.disk.display()),
            &format!("-mac={}", self.mac),
            "-serial=AUTOGENIC",
            "-retries=2",
            "-progress=200",
        ])
        .args(
            self.backup
                .iter()
                .map(|b| format!("-backup={}", b.display())),
        )
        .env_remove("IMG_AGENT_STATE")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        c
    }

    fn checkin(&self) -> String {
        let o = self.command().output().unwrap();
        let t = text(&o);
        assert!(o.status.success(), "img -checkin:\n{t}");
        t
    }

    /// The first 32 MiB of the OS partition (partition 2), the size of the image's
    /// partition.
    fn os_partition(&self) -> Vec<u8> {
        let d = std::fs::read(&self.disk).unwrap();
        d[self.os_start as usize..(self.os_start + 32 * MIB) as usize].to_vec()
    }

    fn area_status(&self) -> serde_json::Value {
        std::fs::read(self.backup.as_ref().unwrap().join("STATUS.JSON"))
            .ok()
            .and_then(|b| serde_json::from_slice(&b).ok())
            .unwrap_or(serde_json::Value::Null)
    }

    fn store(&self) -> grub::store::Tree {
        Store::open(BootPartition::open(&self.disk, false).unwrap())
            .unwrap()
            .load()
            .unwrap()
            .tree
    }

    /// What the agent in the guest (`img -service`) does for a PI task: the imaging status
    /// record, `pending`, in the store; the next start runs it.
    fn record_pi(&self, task: u64, job: u64) {
        let rec = serde_json::json!({
            "task": { "id": task, "job": job, "kind": "deploy",
                      "image": { "name": "os", "version": "2", "url": "https://unused.invalid/os-2.img" },
                      "partition": "2", "after": "reboot", "from_backup": true },
            "phase": "pending", "attempts": 0, "report": null, "message": null, "maintenance": null
        });
        let bp = BootPartition::open(&self.disk, true).unwrap();
        let mut store = Store::open(bp).unwrap();
        let mut tree = store.load().unwrap().tree;
        tree.insert(
            "state/imagestatus.json".into(),
            Item {
                data: serde_json::to_vec_pretty(&rec).unwrap(),
                secret: false,
            },
        );
        store.save(&tree).unwrap();
    }

    /// The OS partition holds a clean FAT with VERSION.TXT saying `expect`.
    fn check_os(&self, scratch: &Path, expect: &str) {
        let vol = scratch.join("os-vol.img");
        sh(&format!(
            "dd if={} of={} bs=1M skip={} count=32 status=none; fsck.fat -n {} >/dev/null",
            self.disk.display(),
            vol.display(),
            self.os_start / MIB,
            vol.display()
        ));
        let v = sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mtype -i {} ::VERSION.TXT",
            vol.display()
        ));
        assert_eq!(v.trim(), expect);
    }
}

/// BI completes as the task's result (no reboot), the area holds the published image
/// byte for byte, and the server shows the backup.
#[test]
fn bi_downloads_into_the_backup_and_the_server_shows_it() {
    let lab = Lab::new("autogenic-bi", 6, "");
    let dev = lab.device("bi");
    let t = dev.checkin();
    assert!(t.contains("nothing to do"), "enrolment:\n{t}");
    let before = admin(&lab.data, &["device", &dev.mac]);
    assert!(
        before.contains("SupportImgBackup=1 BackupImagePresent=0"),
        "{before}"
    );
    lab.schedule(&dev.mac, &["--then", "copy-only"]);
    lab.nginx.wait_idle();
    let sent0 = lab.nginx.bytes_sent();
    let t = dev.checkin();
    assert!(t.contains("task done"), "{t}");
    assert!(t.contains("stored in the backup folder"), "{t}");
    let size = std::fs::metadata(&lab.image).unwrap().len();
    assert_eq!(
        std::fs::read(dev.backup.as_ref().unwrap().join("IMAGE.BIN")).unwrap(),
        std::fs::read(&lab.image).unwrap(),
        "the backup must be the published image"
    );
    let st = dev.area_status();
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(st["verified_bytes"], size, "{st}");
    lab.nginx.wait_idle();
    let fetched = lab.nginx.bytes_sent() - sent0;
    eprintln!("BI: image {size} bytes, nginx sent {fetched} bytes");
    assert!(
        fetched >= size && fetched < size + 256 * 1024,
        "{fetched} for {size}"
    );
    let (_, state) = lab.task_of(1);
    assert_eq!(state, "succeeded");
    // The next check-in carries the backup facts; the server shows them.
    let t = dev.checkin();
    assert!(t.contains("nothing to do"), "{t}");
    let shown = admin(&lab.data, &["device", &dev.mac]);
    assert!(
        shown.contains("SupportImgBackup=1 BackupImagePresent=1 BackImageVer=2"),
        "{shown}"
    );
    // The OS partition was not touched by BI.
    assert!(dev.os_partition().iter().all(|b| *b == 0));
}

/// A BI killed in the middle resumes where the area's committed bytes end: the second run
/// fetches only the rest.
#[test]
fn bi_killed_mid_download_resumes_fetching_only_the_rest() {
    let lab = Lab::new("autogenic-resume", 12, "limit_rate 2m;");
    let dev = lab.device("resume");
    dev.checkin();
    lab.schedule(&dev.mac, &["--then", "copy-only"]);
    let size = std::fs::metadata(&lab.image).unwrap().len();
    let mut child = dev.command().spawn().unwrap();
    let t0 = Instant::now();
    loop {
        let v = dev.area_status()["verified_bytes"].as_u64().unwrap_or(0);
        if v > 4 * MIB {
            break;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(180),
            "the download never got going"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    let _ = child.wait();
    let kept = dev.area_status()["verified_bytes"].as_u64().unwrap();
    assert!(kept < size, "killed too late: {kept} of {size}");
    lab.nginx.wait_idle();
    let sent_first = lab.nginx.bytes_sent();
    // The next start (a new process): the server sends the running task again.
    let t = dev.checkin();
    assert!(t.contains("task done"), "{t}");
    assert!(t.contains("resuming the download into"), "{t}");
    lab.nginx.wait_idle();
    let sent_second = lab.nginx.bytes_sent() - sent_first;
    eprintln!(
        "BI resume: image {size} bytes, {kept} kept at the kill, first run sent {sent_first}, second run sent {sent_second}"
    );
    assert!(
        sent_second <= size - kept + 256 * 1024,
        "the second run fetched {sent_second} bytes, more than the missing {}",
        size - kept
    );
    assert_eq!(
        std::fs::read(dev.backup.as_ref().unwrap().join("IMAGE.BIN")).unwrap(),
        std::fs::read(&lab.image).unwrap()
    );
}

/// PI from the area writes the OS partition byte-identical to a network deploy of the same
/// image, fetches nothing, and its result is delivered exactly once.
#[test]
fn pi_writes_what_a_network_deploy_writes_and_reports_once() {
    let lab = Lab::new("autogenic-pi", 4, "");
    // Device A: a plain network deploy into partition 2.
    let a = lab.device("neta");
    a.checkin();
    lab.schedule(&a.mac, &["--partition", "2", "--then", "no-reboot"]);
    let t = a.checkin();
    assert!(t.contains("task done"), "{t}");
    a.check_os(lab.dir.path(), "os 2");
    // Device B, converted to the autogenic layout: BI into its IMGBACKUP partition, then a
    // PI recorded for its next start.
    let b = lab.converted_device("pib");
    b.checkin();
    lab.schedule(&b.mac, &["--then", "copy-only"]);
    let t = b.checkin();
    assert!(t.contains("task done"), "{t}");
    let area = autogenic::BackupArea::open(&b.disk, false).unwrap();
    assert!(area.status().complete, "{:?}", area.status());
    let mut stored = vec![0u8; area.status().size as usize];
    area.read_at(0, &mut stored).unwrap();
    assert!(
        stored == std::fs::read(&lab.image).unwrap(),
        "the backup partition must hold the published image"
    );
    drop(area);
    let t = b.checkin();
    assert!(t.contains("nothing to do"), "{t}");
    let shown = admin(&lab.data, &["device", &b.mac]);
    assert!(
        shown.contains("SupportImgBackup=1 BackupImagePresent=1 BackImageVer=2"),
        "{shown}"
    );
    lab.schedule(&b.mac, &["--partition", "2", "--then", "no-reboot"]);
    let (task, _) = lab.task_of(3);
    b.record_pi(task, 3);
    lab.nginx.wait_idle();
    let sent0 = lab.nginx.bytes_sent();
    let t = b.checkin();
    assert!(
        t.contains("re-imaging from the backup partition at start: Succeeded"),
        "{t}"
    );
    assert!(t.contains("nothing downloaded"), "{t}");
    lab.nginx.wait_idle();
    assert_eq!(
        lab.nginx.bytes_sent(),
        sent0,
        "PI must not download the image"
    );
    b.check_os(lab.dir.path(), "os 2");
    assert!(
        a.os_partition() == b.os_partition(),
        "the OS partition written from the backup differs from the network deploy's"
    );
    let (_, state) = lab.task_of(3);
    assert_eq!(state, "succeeded", "{}", admin(&lab.data, &["job", "3"]));
    let tree = b.store();
    assert!(
        !tree.contains_key("state/imagestatus.json"),
        "{:?}",
        tree.keys()
    );
    assert!(!tree.keys().any(|k| k.starts_with("state/outbox/")));
    // Once more: nothing is sent again, nothing imaged again.
    let t = b.checkin();
    assert!(!t.contains("re-imaging"), "{t}");
    let transcript = admin(&lab.data, &["transcript", &b.mac]);
    let n = transcript
        .lines()
        .filter(|l| l.contains(&format!("] task {task} succeeded")))
        .count();
    assert_eq!(n, 1, "{transcript}");
}

/// A chunk damaged in the area: PI refuses before writing a byte, three starts in a row,
/// then the device is in maintenance and says so at check-in; the failure is delivered once.
#[test]
fn a_corrupt_backup_is_refused_before_writing_and_three_failures_mean_maintenance() {
    let lab = Lab::new("autogenic-corrupt", 4, "");
    let dev = lab.device("bad");
    dev.checkin();
    lab.schedule(&dev.mac, &["--then", "copy-only"]);
    let t = dev.checkin();
    assert!(t.contains("task done"), "{t}");
    // One byte in the middle of the image (inside a chunk's payload) flipped.
    let p = dev.backup.as_ref().unwrap().join("IMAGE.BIN");
    let mut bytes = std::fs::read(&p).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x55;
    std::fs::write(&p, &bytes).unwrap();
    lab.schedule(&dev.mac, &["--partition", "2", "--then", "no-reboot"]);
    let (task, _) = lab.task_of(2);
    dev.record_pi(task, 2);
    let before = dev.os_partition();
    for n in 1..=3 {
        let t = dev.checkin();
        assert!(t.contains("failed its check"), "start {n}:\n{t}");
        assert!(
            dev.os_partition() == before,
            "start {n}: the OS partition was written"
        );
        let rec: serde_json::Value =
            serde_json::from_slice(&dev.store()["state/imagestatus.json"].data).unwrap();
        assert_eq!(rec["attempts"], n, "{rec}");
        if n == 3 {
            assert!(t.contains("MAINTENANCE"), "{t}");
            assert!(t.contains("reporting maintenance"), "{t}");
            assert!(
                rec["maintenance"].as_str().unwrap().contains("not touched"),
                "{rec}"
            );
        }
    }
    // The failure reached the server once; later starts neither try nor report again.
    let (_, state) = lab.task_of(2);
    assert_eq!(state, "failed", "{}", admin(&lab.data, &["job", "2"]));
    let t = dev.checkin();
    assert!(t.contains("reporting maintenance"), "{t}");
    assert!(
        !t.contains("re-imaging failed:") && !t.contains("attempt 4"),
        "{t}"
    );
    let transcript = admin(&lab.data, &["transcript", &dev.mac]);
    let n = transcript
        .lines()
        .filter(|l| l.contains(&format!("] task {task} failed")))
        .count();
    assert_eq!(n, 1, "{transcript}");
}

/// Seed 003's "back up the current image first" on a device with a backup area: the OS
/// partition is captured into the area, so a rollback is a PI from local flash (the
/// device's own, unsigned capture, trusted by the digest the agent recorded).
#[test]
fn backup_first_captures_the_os_partition_so_a_rollback_is_a_pi() {
    let lab = Lab::new("autogenic-rollback", 2, "");
    let dev = lab.device("rollback");
    dev.checkin();
    lab.schedule(&dev.mac, &["--partition", "2", "--then", "no-reboot"]);
    let t = dev.checkin();
    assert!(
        t.contains("task done") && t.contains("nothing to back up"),
        "{t}"
    );
    // The second deploy backs up what the first one wrote.
    lab.schedule(&dev.mac, &["--partition", "2", "--then", "no-reboot"]);
    let t = dev.checkin();
    assert!(
        t.contains("task done") && t.contains("backed up into the backup folder"),
        "{t}"
    );
    let st = dev.area_status();
    assert_eq!(st["complete"], true, "{st}");
    assert_eq!(st["image"]["version"], "2", "{st}");
    // The OS partition is wiped (a broken OS); the rollback re-images it from the capture.
    let f = std::fs::OpenOptions::new()
        .write(true)
        .open(&dev.disk)
        .unwrap();
    std::os::unix::fs::FileExt::write_all_at(&f, &vec![0u8; (32 * MIB) as usize], dev.os_start)
        .unwrap();
    drop(f);
    lab.schedule(
        &dev.mac,
        &["--partition", "2", "--then", "no-reboot", "--no-backup"],
    );
    let (task, _) = lab.task_of(3);
    dev.record_pi(task, 3);
    lab.nginx.wait_idle();
    let sent0 = lab.nginx.bytes_sent();
    let t = dev.checkin();
    assert!(
        t.contains("re-imaging from the backup partition at start: Succeeded"),
        "{t}"
    );
    assert!(t.contains("this device's own capture"), "{t}");
    lab.nginx.wait_idle();
    assert_eq!(
        lab.nginx.bytes_sent(),
        sent0,
        "the rollback must not download"
    );
    dev.check_os(lab.dir.path(), "os 2");
    let (_, state) = lab.task_of(3);
    assert_eq!(state, "succeeded", "{}", admin(&lab.data, &["job", "3"]));
}
