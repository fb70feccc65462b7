//! The boot-agent partition as the device's persistent store (issue 8 item 1), end to end
//! on disk-image files partitioned with sgdisk and prepared by `img -install`:
//!
//! - in-place writes of the store leave `fsck.fat -n` clean, mtools reads the same bytes,
//!   and everything but the store file's own bytes (boot sector, FSInfo, FATs, every
//!   directory entry) is byte-identical before and after;
//! - `img -serverurl X -disk=disk.img` in one process, read back by a new one;
//! - `img -checkin -server=URL -disk=disk.img` twice against the real `imgserver`: the second
//!   run authenticates with the stored credential (no 409), while a run with an empty state
//!   directory is refused as "already enrolled" (what happened before the store existed);
//! - a result the server never acknowledged (it went away during the deploy) stays in the
//!   store's outbox and is delivered once by the next check-in, a new process.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

use e2e::{img_bin, imgserver_admin as admin, require_tool, sh, Scratch};
use grub::bootpart::BootPartition;
use grub::store::{self, Store};

const MIB: u64 = 1 << 20;

/// A 64 MiB disk: partition 1 (40 MiB, "BOOTAGENT") prepared by `img -install` with a
/// stand-in kernel and initrd, partition 2 the rest.
fn installed_disk(dir: &Scratch) -> PathBuf {
    installed_disk_of(dir, 64)
}

fn installed_disk_of(dir: &Scratch, mib: u64) -> PathBuf {
    for t in ["sgdisk", "fsck.fat", "mtype", "mcopy"] {
        require_tool(t);
    }
    e2e::server::installed_disk(dir.path(), &dir.join("disk.img"), mib, None)
}

/// The boot-agent partition's bytes (1 MiB into the disk, 40 MiB long).
fn volume(disk: &Path) -> Vec<u8> {
    let d = std::fs::read(disk).unwrap();
    d[MIB as usize..(41 * MIB) as usize].to_vec()
}

/// `fsck.fat -n` on the partition: clean, nothing to fix.
fn fsck_clean(dir: &Scratch, disk: &Path) {
    let vol = dir.join("vol.img");
    std::fs::write(&vol, volume(disk)).unwrap();
    let out = Command::new("fsck.fat")
        .arg("-n")
        .arg(&vol)
        .output()
        .unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "fsck.fat -n:\n{text}");
    assert!(
        !text.to_lowercase().contains("dirty"),
        "fsck.fat -n:\n{text}"
    );
}

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

#[test]
fn in_place_store_writes_keep_the_fat_clean_and_its_metadata_identical() {
    let dir = Scratch::new("bootstore-fat");
    let disk = installed_disk(&dir);
    let d = disk.to_str().unwrap();
    fsck_clean(&dir, &disk);

    // Where the store file's bytes are (the only bytes a commit may change).
    let ext = BootPartition::open(&disk, false)
        .unwrap()
        .file_extents(store::FILE)
        .unwrap();
    assert_eq!(ext.iter().map(|e| e.1).sum::<u64>(), store::FILE_LEN as u64);
    let before = std::fs::read(&disk).unwrap();

    let o = img(&[
        "-serverurl",
        "https://a.example:8443;10.0.0.1:80",
        &format!("-disk={d}"),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let o = img(&[
        "-netconfig",
        "ip=10.0.0.9",
        "mask=255.255.255.0",
        "gw=10.0.0.1",
        "server=10.0.0.1",
        "-disk",
        d,
    ]);
    assert!(o.status.success(), "{}", text(&o));

    let after = std::fs::read(&disk).unwrap();
    let mut changed = 0usize;
    // Compare 4 KiB at a time; only a block that differs is looked at byte by byte.
    for (n, (a, b)) in before.chunks(4096).zip(after.chunks(4096)).enumerate() {
        if a == b {
            continue;
        }
        for (k, (x, y)) in a.iter().zip(b).enumerate() {
            if x != y {
                let i = (n * 4096 + k) as u64;
                assert!(
                    ext.iter().any(|(at, l)| i >= *at && i < at + l),
                    "byte {i} outside {} changed (FAT, directory or boot sector)",
                    store::FILE
                );
                changed += 1;
            }
        }
    }
    assert!(changed > 0, "nothing was written");
    fsck_clean(&dir, &disk);

    // mtools reads the same bytes the store wrote, and the record is the second one.
    let vol = dir.join("vol.img");
    let via_mtools = dir.join("state.dat");
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -n -i {} ::AGENT/STATE.DAT {}",
        vol.display(),
        via_mtools.display()
    ));
    let bp = BootPartition::open(&disk, false).unwrap();
    let ours = bp.read_file(store::FILE).unwrap().unwrap();
    assert_eq!(std::fs::read(&via_mtools).unwrap(), ours);
    let loaded = Store::open(bp).unwrap().load().unwrap();
    assert_eq!(loaded.seq, 2);
    for f in ["config/discovery.conf", "config/netconfig.conf"] {
        assert!(loaded.tree.contains_key(f), "{f}: {:?}", loaded.tree.keys());
    }

    // A new process reads both settings back from the disk.
    let o = img(&["-serverurl", &format!("-disk={d}")]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(
        text(&o).contains("https://a.example:8443;10.0.0.1:80"),
        "{}",
        text(&o)
    );
    let o = img(&["-netconfig", &format!("-disk={d}")]);
    assert!(text(&o).contains("10.0.0.9"), "{}", text(&o));

    // Clearing is a change like any other; showing is not (no write).
    let o = img(&["-serverurl", "clear", &format!("-disk={d}")]);
    assert!(o.status.success(), "{}", text(&o));
    let o = img(&["-serverurl", &format!("-disk={d}")]);
    assert!(text(&o).contains("(no server URL list)"), "{}", text(&o));
    let seq = Store::open(BootPartition::open(&disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap()
        .seq;
    assert_eq!(seq, 3, "showing the list must not write a record");
    fsck_clean(&dir, &disk);

    // img -dump names the boot-agent partition and the store's record.
    let o = img(&["-dump", d]);
    let t = text(&o);
    assert!(
        t.contains("boot-agent partition: partition 1 of")
            && t.contains("record 3")
            && t.contains("config/netconfig.conf"),
        "{t}"
    );
    let o = img(&["-dump", "-json", d]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v[0]["boot_agent"]["partition"], 1, "{v}");
    assert_eq!(v[0]["boot_agent"]["store"]["record"], 3, "{v}");

    // A disk without a boot-agent partition is named, with the way out.
    let blank = dir.join("blank.img");
    std::fs::File::create(&blank)
        .unwrap()
        .set_len(8 * MIB)
        .unwrap();
    let o = img(&["-serverurl", &format!("-disk={}", blank.display())]);
    assert!(!o.status.success());
    assert!(text(&o).contains("no boot-agent partition"), "{}", text(&o));
}

/// A running `imgserver serve` on 127.0.0.1 (TLS with its own CA; tests/src/server.rs);
/// killed on drop.
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
        Server::start_on(data, "127.0.0.1:0")
    }

    /// `serve` on `listen` with the data folder as it is (a restart keeps its port).
    fn start_on(data: &Path, listen: &str) -> Server {
        Server(e2e::server::Server::start(data, &["--listen", listen]))
    }
}

#[test]
fn checkin_twice_on_a_disk_image_uses_the_stored_credential() {
    let dir = Scratch::new("bootstore-checkin");
    let disk = installed_disk(&dir);
    let d = disk.to_str().unwrap();
    let data = dir.join("server");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data);
    // The administrator puts the server's CA on the boot-agent partition as a plain file.
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1M {} ::ca.pem; MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1M {} ::enrol.key",
        data.join("ca.pem").display(),
        data.join("enrol.key").display()
    ));
    let checkin = |extra: &[&str]| {
        let mut args = vec![
            "-checkin".to_string(),
            format!("-server={}", server.url),
            format!("-disk={d}"),
            "-mac=52:54:00:00:08:01".into(),
            "-serial=STORE-1".into(),
            "-retries=1".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        Command::new(img_bin())
            .args(&args)
            .env_remove("IMG_AGENT_STATE")
            .output()
            .unwrap()
    };
    let first = checkin(&[]);
    assert!(first.status.success(), "first check-in:\n{}", text(&first));
    assert!(
        text(&first).contains("boot-agent partition 1"),
        "{}",
        text(&first)
    );

    // The credential is in the store, marked secret.
    let loaded = Store::open(BootPartition::open(&disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap();
    let cred = loaded
        .tree
        .get("state/credential")
        .unwrap_or_else(|| panic!("no credential in the store: {:?}", loaded.tree.keys()));
    assert!(cred.secret && !cred.data.is_empty());
    fsck_clean(&dir, &disk);

    let second = checkin(&[]);
    assert!(
        second.status.success(),
        "second check-in (stored credential):\n{}",
        text(&second)
    );
    assert!(!text(&second).contains("HTTP 409"), "{}", text(&second));

    // The control: the same device without its state is refused, as every second boot was
    // before the store existed.
    let empty = dir.join("empty-state");
    let third = checkin(&[
        &format!("-state={}", empty.display()),
        &format!("-ca={}", data.join("ca.pem").display()),
    ]);
    assert!(
        !third.status.success(),
        "a device without its credential must be refused:\n{}",
        text(&third)
    );
    let t = text(&third).to_lowercase();
    assert!(
        t.contains("http 409") || t.contains("already enrolled"),
        "{t}"
    );
    // The inventory names the boot-agent partition; the server shows it.
    let device = admin(&data, &["device", "52:54:00:00:08:01"]);
    assert!(device.contains("(boot agent)"), "{device}");
}

/// A deploy run by `img -checkin -disk=disk.img` into partition 2 of the device's own disk:
/// its result, the image stamp and the delivered-results list end up in the store, and the
/// next check-in from a new process (the next boot) still authenticates.
#[test]
fn a_deploy_through_checkin_disk_keeps_its_results_in_the_store() {
    let dir = Scratch::new("bootstore-deploy");
    let disk = installed_disk_of(&dir, 96);
    let d = disk.to_str().unwrap();
    let data = dir.join("server");
    std::fs::create_dir_all(&data).unwrap();
    let server = Server::start(&data);
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1M {} ::ca.pem; MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1M {} ::enrol.key",
        data.join("ca.pem").display(),
        data.join("enrol.key").display()
    ));
    // The suite's image is unsigned: the lab setting, explicitly, where the agent keeps it.
    std::fs::write(dir.join("lab.conf"), "unsigned_images = yes\n").unwrap();
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1; mmd -i {d}@@1M ::config 2>/dev/null; mcopy -o -i {d}@@1M {} ::config/lab.conf",
        dir.join("lab.conf").display()
    ));
    // An OS partition image: FAT16 with VERSION.TXT, captured with img -make.
    let src = dir.join("src.img");
    sh(&format!(
        "cd {dir}; export MTOOLS_SKIP_CHECK=1; echo 'os 2.1' > VERSION.TXT
         truncate -s 48M {src}
         sgdisk -o -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {src} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {src} 32768 >/dev/null
         mcopy -i {src}@@1048576 VERSION.TXT ::VERSION.TXT",
        dir = dir.path().display(),
        src = src.display()
    ));
    let image = dir.join("os-2.1.img");
    let o = img(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=1",
        "-name=os",
        "-version=2.1",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    admin(&data, &["image", "add", image.to_str().unwrap()]);

    let mac = "52:54:00:00:08:02";
    let checkin = || {
        Command::new(img_bin())
            .args([
                "-checkin",
                &format!("-server={}", server.url),
                &format!("-disk={d}"),
                &format!("-mac={mac}"),
                "-serial=STORE-2",
                "-retries=2",
            ])
            .env_remove("IMG_AGENT_STATE")
            .output()
            .unwrap()
    };
    let o = checkin();
    assert!(o.status.success(), "enrolment:\n{}", text(&o));
    let out = admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            mac,
            "--image",
            "os:2.1",
            "--partition",
            "2",
            "--then",
            "no-reboot",
        ],
    );
    assert!(out.contains("scheduled"), "{out}");
    let o = checkin();
    assert!(o.status.success(), "deploy:\n{}", text(&o));
    assert!(
        text(&o).contains("task done"),
        "{}\nschedule: {out}\njob: {}",
        text(&o),
        admin(&data, &["job", "1"])
    );

    // Partition 2 holds the OS; the boot-agent partition is still a clean FAT.
    let vol = dir.join("p2.img");
    sh(&format!(
        "dd if={d} of={} bs=1M skip=41 count=32 status=none; fsck.fat -n {} >/dev/null",
        vol.display(),
        vol.display()
    ));
    let v = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {} ::VERSION.TXT",
        vol.display()
    ));
    assert_eq!(v.trim(), "os 2.1");
    fsck_clean(&dir, &disk);

    // The store: the stamp for partition 2, the delivered result, no task in progress.
    let tree = Store::open(BootPartition::open(&disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap()
        .tree;
    let images = String::from_utf8_lossy(&tree["state/images.json"].data).to_string();
    assert!(
        images.contains(&format!("{d}#2")) && images.contains("2.1"),
        "{images}"
    );
    assert!(tree.contains_key("state/done.json"), "{:?}", tree.keys());
    assert!(
        !tree.contains_key("state/current.json"),
        "{:?}",
        tree.keys()
    );

    // The next "boot": a new process, the stored credential, nothing left to do.
    let o = checkin();
    assert!(o.status.success(), "after the deploy:\n{}", text(&o));
    assert!(text(&o).contains("nothing to do"), "{}", text(&o));
    let dev = admin(&data, &["devices"]);
    let line = dev.lines().find(|l| l.starts_with(mac)).unwrap_or_default();
    assert!(
        line.contains("Operational") && line.contains("2.1"),
        "{dev}"
    );
}

/// The task state of job `job`'s one task, from `imgserver job N`.
fn task_state(data: &Path, job: u64, mac: &str) -> String {
    let out = admin(data, &["job", &job.to_string()]);
    out.lines()
        .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(mac))
        .and_then(|l| l.split_whitespace().nth(2))
        .unwrap_or_default()
        .to_string()
}

/// Issue 8's "any unacknowledged result is delivered once", with the state only on the disk:
/// the server goes away while the device deploys (the image comes from another web server,
/// nginx, so the deploy finishes), the result cannot be sent and stays in the store's outbox
/// when the process ends; the next check-in, a new process reading the disk, delivers it,
/// and the server records it exactly once.
#[test]
fn a_result_the_server_never_acknowledged_is_delivered_once_from_the_store() {
    let dir = Scratch::new("bootstore-outbox");
    let disk = installed_disk_of(&dir, 96);
    let d = disk.to_str().unwrap();
    let data = dir.join("server");
    std::fs::create_dir_all(&data).unwrap();
    admin(&data, &["init"]);
    let listen = format!("127.0.0.1:{}", e2e::free_port());
    let server = Server::start_on(&data, &listen);
    std::fs::write(dir.join("lab.conf"), "unsigned_images = yes\n").unwrap();
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1
         mcopy -i {d}@@1M {ca} ::ca.pem; mcopy -i {d}@@1M {key} ::enrol.key
         mmd -i {d}@@1M ::config 2>/dev/null; mcopy -o -i {d}@@1M {lab} ::config/lab.conf",
        ca = data.join("ca.pem").display(),
        key = data.join("enrol.key").display(),
        lab = dir.join("lab.conf").display()
    ));
    // A 24 MiB partition image of mostly incompressible data, served slowly by nginx.
    let www = dir.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let src = dir.join("src.img");
    std::fs::write(dir.join("BULK.BIN"), e2e::random_bytes(7, 20 << 20)).unwrap();
    sh(&format!(
        "cd {dir}; export MTOOLS_SKIP_CHECK=1; echo 'os 3' > VERSION.TXT
         truncate -s 48M {src}
         sgdisk -o -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {src} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {src} 32768 >/dev/null
         mcopy -i {src}@@1048576 VERSION.TXT BULK.BIN ::",
        dir = dir.path().display(),
        src = src.display()
    ));
    let image = www.join("os-3.img");
    let o = img(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=1",
        "-name=os",
        "-version=3",
    ]);
    assert!(o.status.success(), "{}", text(&o));
    let nginx = e2e::Nginx::serve_with(&www, "limit_rate 4m;");
    admin(&data, &["image", "add", &nginx.url("os-3.img")]);

    let mac = "52:54:00:00:08:03";
    let checkin = |server_url: &str| {
        Command::new(img_bin())
            .args([
                "-checkin",
                &format!("-server={server_url}"),
                &format!("-disk={d}"),
                &format!("-mac={mac}"),
                "-serial=STORE-3",
                "-retries=1",
                "-progress=200",
            ])
            .env_remove("IMG_AGENT_STATE")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let url = server.url.clone();
    let o = checkin(&url).wait_with_output().unwrap();
    assert!(o.status.success(), "enrolment:\n{}", text(&o));
    admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            mac,
            "--image",
            "os:3",
            "--partition",
            "2",
            "--then",
            "no-reboot",
        ],
    );
    let device = checkin(&url);
    // The server goes away once the device reports progress, mid-download.
    let t0 = std::time::Instant::now();
    while task_state(&data, 1, mac) != "running" {
        assert!(
            t0.elapsed() < std::time::Duration::from_secs(120),
            "the task never ran:\n{}",
            admin(&data, &["job", "1"])
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    drop(server);
    let o = device.wait_with_output().unwrap();
    let t = text(&o);
    assert!(t.contains("task done") || t.contains("succeeded"), "{t}");
    // The result is in the store's outbox, on the disk, and nowhere else.
    let tree = Store::open(BootPartition::open(&disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap()
        .tree;
    let unsent: Vec<&String> = tree
        .keys()
        .filter(|k| k.starts_with("state/outbox/"))
        .collect();
    assert_eq!(unsent.len(), 1, "{:?}\n{t}", tree.keys());
    assert_eq!(task_state(&data, 1, mac), "running");

    // Next "boot": the server is back; a new process with nothing but the disk.
    let server = Server::start_on(&data, &listen);
    let o = checkin(&server.url).wait_with_output().unwrap();
    assert!(o.status.success(), "delivery:\n{}", text(&o));
    assert_eq!(task_state(&data, 1, mac), "succeeded");
    let transcript = admin(&data, &["transcript", mac]);
    let recorded = transcript
        .lines()
        .filter(|l| l.contains("] task 1 succeeded") || l.contains("] task 1 failed"))
        .count();
    assert_eq!(recorded, 1, "{transcript}");
    // And once more: nothing is sent twice.
    let o = checkin(&server.url).wait_with_output().unwrap();
    assert!(o.status.success(), "{}", text(&o));
    let transcript = admin(&data, &["transcript", mac]);
    assert_eq!(
        transcript
            .lines()
            .filter(|l| l.contains("] task 1 succeeded") || l.contains("] task 1 failed"))
            .count(),
        1,
        "{transcript}"
    );
    let tree = Store::open(BootPartition::open(&disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap()
        .tree;
    assert!(
        !tree.keys().any(|k| k.starts_with("state/outbox/")),
        "{:?}",
        tree.keys()
    );
}
