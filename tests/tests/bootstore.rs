//! The boot-agent partition as the device's persistent store (issue 8 item 1), end to end
//! on disk-image files partitioned with sgdisk and prepared by `img -install`:
//!
//! - in-place writes of the store leave `fsck.fat -n` clean, mtools reads the same bytes,
//!   and everything but the store file's own bytes (boot sector, FSInfo, FATs, every
//!   directory entry) is byte-identical before and after;
//! - `img -serverurl X -disk=disk.img` in one process, read back by a new one;
//! - `img -checkin -server=URL -disk=disk.img` twice against the real `imgserver`: the second
//!   run authenticates with the stored credential (no 409), while a run with an empty state
//!   directory is refused as "already enrolled" (what happened before the store existed).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

use e2e::{img_bin, imgserver_admin as admin, imgserver_bin, require_tool, run, sh, Scratch};
use grub::bootpart::BootPartition;
use grub::store::{self, Store};

const MIB: u64 = 1 << 20;

/// A 64 MiB disk: partition 1 (40 MiB, "BOOTAGENT") prepared by `img -install` with a
/// stand-in kernel and initrd, partition 2 the rest.
fn installed_disk(dir: &Scratch) -> PathBuf {
    for t in ["sgdisk", "fsck.fat", "mtype", "mcopy"] {
        require_tool(t);
    }
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .unwrap()
        .set_len(64 * MIB)
        .unwrap();
    run(Command::new("sgdisk")
        .args([
            "-o",
            "-n1:1M:+40M",
            "-t1:ef00",
            "-c1:BOOTAGENT",
            "-n2:0:0",
            "-t2:0700",
        ])
        .arg(&disk));
    std::fs::write(dir.join("vmlinuz"), e2e::random_bytes(1, 300_000)).unwrap();
    std::fs::write(dir.join("initrd.img"), e2e::random_bytes(2, 500_000)).unwrap();
    run(Command::new(img_bin())
        .arg("-install")
        .arg(&disk)
        .arg(format!("-kernel={}", dir.join("vmlinuz").display()))
        .arg(format!("-initrd={}", dir.join("initrd.img").display())));
    disk
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

/// A running `imgserver serve` on 127.0.0.1 (TLS with its own CA); killed on drop.
struct Server {
    child: Child,
    url: String,
}

impl Server {
    fn start(data: &Path) -> Server {
        admin(data, &["init"]);
        let mut child = Command::new(imgserver_bin())
            .args([
                "--data",
                data.to_str().unwrap(),
                "serve",
                "--listen",
                "127.0.0.1:0",
            ])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("starting imgserver");
        let mut line = String::new();
        std::io::BufRead::read_line(
            &mut std::io::BufReader::new(child.stdout.take().unwrap()),
            &mut line,
        )
        .unwrap();
        let addr = line
            .trim()
            .strip_prefix("listening on https://")
            .unwrap_or_else(|| panic!("imgserver said {line:?}"))
            .to_string();
        Server {
            child,
            url: format!("https://{addr}"),
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
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
        "MTOOLS_SKIP_CHECK=1 mcopy -i {d}@@1M {} ::ca.pem",
        data.join("ca.pem").display()
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
    assert!(!text(&second).contains("409"), "{}", text(&second));

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
    assert!(t.contains("409") || t.contains("already enrolled"), "{t}");
    // The inventory names the boot-agent partition; the server shows it.
    let device = admin(&data, &["device", "52:54:00:00:08:01"]);
    assert!(device.contains("(boot agent)"), "{device}");
}
