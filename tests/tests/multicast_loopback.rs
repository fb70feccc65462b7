//! `img -session` on loopback with real processes: one master and two clients exchanging a
//! GPT disk with two FAT file systems over 127.0.0.1 multicast (the `lo` interface). The
//! clients' disks must end byte-identical to the master's and fsck-clean; a device that
//! registers after the start is told to wait for the next session, and with `-latejoin`
//! joins and catches up. (Loss, 2..8 clients and slow clients run in network namespaces
//! in the multicast lab suite.)

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::{img_bin, require_tool, sh, Scratch};

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 48;
/// Sector where the second partition starts.
const P2: u64 = 2048 + 8 * 2048;

/// A GPT disk with FAT partitions BOOT and OS and ~20 MiB of incompressible files.
fn make_source(path: &Path) {
    for t in ["sgdisk", "mkfs.fat", "mcopy", "fsck.fat"] {
        require_tool(t);
    }
    let p = path.display();
    sh(&format!("truncate -s {DISK_MIB}M {p}"));
    sh(&format!(
        "sgdisk -n 1:2048:+8M -t 1:0700 -c 1:BOOT -n 2:0:+36M -t 2:0700 -c 2:OS {p} >/dev/null"
    ));
    sh(&format!(
        "mkfs.fat -n BOOT --offset=2048 {p} 8192 >/dev/null 2>&1"
    ));
    sh(&format!(
        "mkfs.fat -n OS --offset={P2} {p} 36864 >/dev/null 2>&1"
    ));
    let dir = path.with_extension("files");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, seed, len) in [("A.BIN", 31, 12 * MIB), ("B.BIN", 32, 8 * MIB + 999)] {
        let f = dir.join(name);
        std::fs::write(&f, e2e::random_bytes(seed, len as usize)).unwrap();
        sh(&format!("mcopy -i {p}@@{} {} ::/", P2 * 512, f.display()));
    }
    let cfg = dir.join("CONFIG.TXT");
    std::fs::write(&cfg, e2e::sample_bytes(33, 300_000)).unwrap();
    sh(&format!(
        "mcopy -i {p}@@{} {} ::/",
        2048 * 512,
        cfg.display()
    ));
}

fn fsck_clean(disk: &Path) {
    for (start, sectors) in [(2048u64, 8 * 2048u64), (P2, 36 * 2048)] {
        let part = disk.with_extension(format!("p{start}"));
        sh(&format!(
            "dd if={} of={} bs=512 skip={start} count={sectors} status=none",
            disk.display(),
            part.display()
        ));
        let out = Command::new("fsck.fat")
            .args(["-n", &part.display().to_string()])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "fsck.fat -n on {} at sector {start}: {}{}",
            disk.display(),
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_file(part);
    }
}

/// An `img` process whose stdout and stderr go to `<scratch>/<tag>.log` (a pipe nobody
/// reads could fill up and stall it).
fn img(scratch: &Scratch, tag: &str, args: &[String]) -> Command {
    let mut c = Command::new(img_bin());
    let log = std::fs::File::create(scratch.join(format!("{tag}.log"))).unwrap();
    c.args(args)
        .env("IMG_STATE_DIR", scratch.join(format!("state-{tag}")))
        .env("IMG_TRUSTED_DIR", scratch.join("no-keys"))
        .env("IMG_QUIET", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log);
    std::fs::create_dir_all(scratch.join(format!("state-{tag}"))).unwrap();
    c
}

fn args(s: &str) -> Vec<String> {
    s.split_whitespace().map(String::from).collect()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn log(s: &Scratch, tag: &str) -> String {
    std::fs::read_to_string(s.join(format!("{tag}.log"))).unwrap_or_default()
}

/// Wait for a child at most `limit`; kill it (and fail) past that. Returns its success and
/// its log.
fn wait(s: &Scratch, mut c: Child, tag: &str, limit: Duration) -> (bool, String) {
    let until = Instant::now() + limit;
    loop {
        if let Some(st) = c.try_wait().unwrap() {
            return (st.success(), log(s, tag));
        }
        if Instant::now() > until {
            let _ = c.kill();
            let _ = c.wait();
            panic!("{tag} still running after {limit:?}:\n{}", log(s, tag));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Bytes of a file actually allocated (a blank disk is sparse and grows as a client writes).
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

fn blank(scratch: &Scratch, name: &str) -> PathBuf {
    let p = scratch.join(name);
    let _ = std::fs::remove_file(&p);
    sh(&format!("truncate -s {DISK_MIB}M {}", p.display()));
    p
}

#[test]
fn a_master_capturing_its_disk_and_two_clients_end_byte_identical_and_fsck_clean() {
    let s = Scratch::new("mcast-two");
    let src = s.join("master.img");
    make_source(&src);
    let (c1, c2) = (blank(&s, "c1.img"), blank(&s, "c2.img"));
    let session = format!("lo-two-{}", std::process::id());
    let client = |tag: &str, disk: &Path| {
        img(
            &s,
            tag,
            &args(&format!(
                "-session {session} -client -iface=lo -disk={}",
                disk.display()
            )),
        )
        .spawn()
        .unwrap()
    };
    let k1 = client("c1", &c1);
    // `-s` abbreviates `-session` (seed 002).
    let k2 = img(
        &s,
        "c2",
        &args(&format!(
            "-s {session} -client -iface=lo -disk={}",
            c2.display()
        )),
    )
    .spawn()
    .unwrap();
    // The master captures its own disk (img -make's path) at -comp=3, on the fly: its temp
    // folder stays empty.
    let master_tmp = s.path().join("master-tmp");
    std::fs::create_dir(&master_tmp).unwrap();
    let m = img(
        &s,
        "m",
        &args(&format!(
            "-session {session} -m -clients=2 -timeout=1 -comp=3 -iface=lo -disk={}",
            src.display()
        )),
    )
    .env("TMPDIR", &master_tmp)
    .spawn()
    .unwrap();
    let (mok, mt) = wait(&s, m, "m", Duration::from_secs(300));
    let (ok1, t1) = wait(&s, k1, "c1", Duration::from_secs(60));
    let (ok2, t2) = wait(&s, k2, "c2", Duration::from_secs(60));
    assert!(mok, "master:\n{mt}\nclient 1:\n{t1}\nclient 2:\n{t2}");
    assert!(ok1, "client 1:\n{t1}\nmaster:\n{mt}");
    assert!(ok2, "client 2:\n{t2}\nmaster:\n{mt}");
    // The console: registrations, the start rule, per-client results and the summary.
    assert!(
        mt.contains("starting with 2 client(s) (2 clients registered)"),
        "{mt}"
    );
    assert_eq!(mt.matches("registered ").count(), 2, "{mt}");
    assert!(mt.contains("2 of 2 client(s) done"), "{mt}");
    assert!(mt.contains("c1.img") && mt.contains("c2.img"), "{mt}");
    assert!(t1.contains("image verified and written"), "{t1}");
    // Nothing was written to the master's temp folder (no temporary capture).
    let leftovers: Vec<_> = std::fs::read_dir(&master_tmp)
        .unwrap()
        .filter_map(|e| e.ok())
        .map(|e| e.file_name())
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");
    for c in [&c1, &c2] {
        let same = Command::new("cmp").arg(&src).arg(c).status().unwrap();
        assert!(
            same.success(),
            "{} differs from the master's disk",
            c.display()
        );
        fsck_clean(c);
    }
}

/// A device that registers after the start: refused and queued for the next session, or with
/// `-latejoin` on the master taken into the running one, where it catches up. Each case is a
/// test of its own, so that the two sessions (about half a minute each at `-throttle=2`) run
/// side by side.
fn late_device(latejoin: bool) {
    let s = Scratch::new(if latejoin {
        "mcast-latejoin"
    } else {
        "mcast-late"
    });
    let src = s.join("master.img");
    make_source(&src);
    let image = s.join("master.mcimg");
    let mk = Command::new(img_bin())
        .args([
            "-make".to_string(),
            image.display().to_string(),
            format!("-disk={}", src.display()),
            "-chunk=1".into(),
        ])
        .env("IMG_QUIET", "1")
        .output()
        .unwrap();
    assert!(mk.status.success(), "{}", text(&mk));

    let session = format!("lo-late-{}-{latejoin}", std::process::id());
    let (early, late) = (blank(&s, "early.img"), blank(&s, "late.img"));
    let k1 = img(
        &s,
        &format!("early-{latejoin}"),
        &args(&format!(
            "-session {session} -client -iface=lo -disk={}",
            early.display()
        )),
    )
    .spawn()
    .unwrap();
    // 2 ms between packets: the ~21 MiB image takes about half a minute, time for the
    // late device to arrive.
    let m = img(
        &s,
        &format!("m-{latejoin}"),
        &args(&format!(
            "-session {session} -master -clients=1 -throttle=2 -iface=lo -image={}{}",
            image.display(),
            if latejoin { " -latejoin" } else { "" }
        )),
    )
    .spawn()
    .unwrap();
    // The late device comes once the session runs: the early device has written data.
    let until = Instant::now() + Duration::from_secs(120);
    while allocated(&early) == 0 {
        assert!(
            Instant::now() < until,
            "the session did not start:\n{}",
            log(&s, &format!("m-{latejoin}"))
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let k2 = img(
        &s,
        &format!("late-{latejoin}"),
        &args(&format!(
            "-session {session} -client -iface=lo -disk={}",
            late.display()
        )),
    )
    .spawn()
    .unwrap();
    let (mok, mt) = wait(&s, m, &format!("m-{latejoin}"), Duration::from_secs(300));
    let (ok1, t1) = wait(
        &s,
        k1,
        &format!("early-{latejoin}"),
        Duration::from_secs(60),
    );
    assert!(mok, "master:\n{mt}\nearly:\n{t1}");
    assert!(ok1, "early:\n{t1}");
    assert!(Command::new("cmp")
        .arg(&src)
        .arg(&early)
        .status()
        .unwrap()
        .success());
    if latejoin {
        let (ok2, t2) = wait(&s, k2, &format!("late-{latejoin}"), Duration::from_secs(60));
        assert!(ok2, "late:\n{t2}\nmaster:\n{mt}");
        assert!(mt.contains("late: it catches up"), "{mt}");
        assert!(mt.contains("2 of 2 client(s) done"), "{mt}");
        assert!(Command::new("cmp")
            .arg(&src)
            .arg(&late)
            .status()
            .unwrap()
            .success());
        fsck_clean(&late);
    } else {
        // Refused and queued: still waiting for the next session; nothing written.
        assert!(
            mt.contains("refused") && mt.contains("waits for the next session"),
            "{mt}"
        );
        assert!(mt.contains("1 of 1 client(s) done"), "{mt}");
        let mut k2 = k2;
        assert!(
            k2.try_wait().unwrap().is_none(),
            "the queued device gave up"
        );
        let _ = k2.kill();
        let _ = k2.wait();
        let t2 = log(&s, &format!("late-{latejoin}"));
        assert!(
            t2.contains("has already started: waiting for the next session"),
            "{t2}"
        );
        let zeros = sh(&format!("cmp {} /dev/zero 2>&1 || true", late.display()));
        assert!(
            zeros.contains("EOF on"),
            "the queued device's disk was written: {zeros}"
        );
    }
}

#[test]
fn a_late_device_is_told_to_wait_for_the_next_session() {
    late_device(false);
}

#[test]
fn with_latejoin_a_late_device_catches_up() {
    late_device(true);
}

#[test]
fn a_client_killed_mid_session_and_restarted_resumes_and_ends_byte_identical() {
    let s = Scratch::new("mcast-resume");
    let src = s.join("master.img");
    make_source(&src);
    let image = s.join("master.mcimg");
    let mk = Command::new(img_bin())
        .args([
            "-make".to_string(),
            image.display().to_string(),
            format!("-disk={}", src.display()),
            "-chunk=1".into(),
        ])
        .env("IMG_QUIET", "1")
        .output()
        .unwrap();
    assert!(mk.status.success(), "{}", text(&mk));
    let session = format!("lo-resume-{}", std::process::id());
    let target = blank(&s, "c.img");
    let client = |tag: &str| {
        img(
            &s,
            tag,
            &args(&format!(
                "-session {session} -client -iface=lo -disk={}",
                target.display()
            )),
        )
        // The same journal folder for both runs: the device's state survives.
        .env("IMG_STATE_DIR", s.join("state-device"))
        .spawn()
        .unwrap()
    };
    std::fs::create_dir_all(s.join("state-device")).unwrap();
    let mut k1 = client("first");
    let m = img(
        &s,
        "m",
        &args(&format!(
            "-session {session} -master -clients=1 -throttle=2 -iface=lo -image={}",
            image.display()
        )),
    )
    .spawn()
    .unwrap();
    // Kill the client once it has written 6 MiB of the ~21 MiB (the target is sparse).
    let until = Instant::now() + Duration::from_secs(120);
    while allocated(&target) < 6 * MIB {
        assert!(Instant::now() < until, "no progress:\n{}", log(&s, "m"));
        assert!(k1.try_wait().unwrap().is_none(), "{}", log(&s, "first"));
        std::thread::sleep(Duration::from_millis(100));
    }
    k1.kill().unwrap();
    let _ = k1.wait();
    let k2 = client("second");
    let (mok, mt) = wait(&s, m, "m", Duration::from_secs(300));
    let (ok2, t2) = wait(&s, k2, "second", Duration::from_secs(60));
    assert!(mok, "master:\n{mt}\nsecond run:\n{t2}");
    assert!(ok2, "second run:\n{t2}\nmaster:\n{mt}");
    assert!(
        mt.contains("again"),
        "the master did not take the device back:\n{mt}"
    );
    assert!(mt.contains("1 of 1 client(s) done"), "{mt}");
    // The second run skipped what the first had written.
    let intact: u64 = t2
        .split(" already intact")
        .next()
        .and_then(|a| a.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no intact count in: {t2}"));
    assert!(intact > 0, "{t2}");
    assert!(Command::new("cmp")
        .arg(&src)
        .arg(&target)
        .status()
        .unwrap()
        .success());
    fsck_clean(&target);
}
