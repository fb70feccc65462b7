//! `img -service`, the agent inside the guest OS (issue 11, seed 001's HAgent), against the
//! real `imgserver`, on a disk-image file whose boot-agent partition was made by
//! `img -install` (the device's disk as the guest sees it):
//!
//! - the service checks in again and again with the credential in the store (no 409), at
//!   idle I/O priority and nice 19 (read from /proc and `ionice -p`);
//! - the server is killed and started again: the service retries and carries on;
//! - SIGTERM ends it at once, exit 0, the store committed;
//! - a scheduled (network) deploy is not run in the guest: no imaging status record (it is
//!   PI's), grubenv's `next_entry` cleared (`grub-editenv list`),
//!   posts "rebooting into the imaging engine" (the admin API shows it) and, under
//!   `IMG_SERVICE_REBOOT=exit`, exits where it would reboot; the OS partition is untouched;
//! - the result the imaging engine left in the store's outbox is delivered by the next
//!   start of the service (with no `-server`: the server that issued the credential);
//! - `systemd-analyze verify` accepts dist/img.service.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use e2e::{img_bin, imgserver_admin as admin, require_tool, run, sh, Scratch};
use grub::bootpart::BootPartition;
use grub::store::Store;

const MIB: u64 = 1 << 20;
const MAC: &str = "52:54:00:00:11:01";

/// A disk: partition 1 (40 MiB, "BOOTAGENT") prepared by `img -install` with a stand-in
/// kernel and initrd, the server's CA, the site's enrolment key and a lab.conf (the suite's
/// image is unsigned) on it; partition 2 the rest.
fn device_disk(dir: &Scratch, data: &Path) -> PathBuf {
    device_disk_of(dir, data, 96)
}

fn device_disk_of(dir: &Scratch, data: &Path, mib: u64) -> PathBuf {
    for t in ["sgdisk", "mcopy", "grub-editenv", "ionice"] {
        require_tool(t);
    }
    let disk = e2e::server::installed_disk(dir.path(), &dir.join("disk.img"), mib, None);
    std::fs::write(dir.join("lab.conf"), "unsigned_images = yes\n").unwrap();
    sh(&format!(
        "export MTOOLS_SKIP_CHECK=1; d={d}
         mcopy -i $d@@1M {ca} ::ca.pem; mcopy -i $d@@1M {key} ::enrol.key
         mmd -i $d@@1M ::config 2>/dev/null; mcopy -o -i $d@@1M {lab} ::config/lab.conf",
        d = disk.display(),
        ca = data.join("ca.pem").display(),
        key = data.join("enrol.key").display(),
        lab = dir.join("lab.conf").display()
    ));
    disk
}

/// A running `imgserver serve` (TLS with its own CA; tests/src/server.rs); killed on drop.
struct Server {
    server: e2e::server::Server,
    url: String,
    listen: String,
}

impl Server {
    fn start(data: &Path, listen: &str) -> Server {
        let server = e2e::server::Server::start(data, &["--listen", listen]);
        Server {
            url: server.url.clone(),
            server,
            listen: listen.to_string(),
        }
    }

    fn stop(mut self) -> String {
        self.server.kill();
        self.listen.clone()
    }
}

/// `img -service` as a child, its stderr in a log file.
struct Service {
    child: Child,
    log: PathBuf,
}

impl Service {
    fn start(dir: &Scratch, name: &str, disk: &Path, extra: &[String]) -> Service {
        let log = dir.join(format!("{name}.log"));
        let f = std::fs::File::create(&log).unwrap();
        let child = Command::new(img_bin())
            .arg("-service")
            .arg(format!("-disk={}", disk.display()))
            .args([
                &format!("-mac={MAC}"),
                "-serial=SVC-1",
                "-interval=1",
                "-retry-wait=300",
            ])
            .args(extra)
            .env("IMG_SERVICE_REBOOT", "exit")
            .env_remove("IMG_AGENT_STATE")
            .env_remove("IMG_SERVER")
            .env_remove("IMG_CA_FILE")
            .stdout(Stdio::null())
            .stderr(f)
            .spawn()
            .unwrap();
        Service { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Wait until `cond(log)` holds; panics with the log after `secs`.
    fn wait_for(&mut self, what: &str, secs: u64, cond: impl Fn(&str) -> bool) {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            let l = self.log();
            if cond(&l) {
                return;
            }
            if let Ok(Some(st)) = self.child.try_wait() {
                panic!("the service ended ({st}) before {what}:\n{l}");
            }
            assert!(Instant::now() < end, "no {what} in {secs}s:\n{l}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn wait_exit(&mut self, secs: u64) -> ExitStatus {
        let end = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(st) = self.child.try_wait().unwrap() {
                return st;
            }
            assert!(
                Instant::now() < end,
                "the service did not end in {secs}s:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn terminate(&mut self) -> (ExitStatus, Duration) {
        let t = Instant::now();
        // SAFETY: a signal to our own child.
        #[allow(unsafe_code)]
        unsafe {
            libc::kill(self.child.id() as i32, libc::SIGTERM)
        };
        let st = self.wait_exit(60);
        (st, t.elapsed())
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn checkins(log: &str) -> usize {
    log.matches("nothing to do; next check-in").count()
}

fn store_tree(disk: &Path) -> grub::store::Tree {
    Store::open(BootPartition::open(disk, false).unwrap())
        .unwrap()
        .load()
        .unwrap()
        .tree
}

/// `grub-editenv FILE list` on the grubenv of the boot-agent partition.
fn grubenv_list(dir: &Scratch, disk: &Path) -> String {
    let env = dir.join("grubenv");
    let _ = std::fs::remove_file(&env);
    sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mcopy -i {}@@1M ::boot/grub/grubenv {}",
        disk.display(),
        env.display()
    ));
    sh(&format!("grub-editenv {} list", env.display()))
}

/// A viewer token for the admin API and a GET of `path` through curl with the server's CA.
fn admin_get(data: &Path, url: &str, token: &str, path: &str) -> serde_json::Value {
    let out = sh(&format!(
        "curl -sS --fail --cacert {} -H 'Authorization: Bearer {token}' {url}{path}",
        data.join("ca.pem").display()
    ));
    serde_json::from_str(&out).unwrap_or_else(|e| panic!("{path}: {e}: {out}"))
}

/// Bytes of the disk from `from` to the end (partition 2 and the backup GPT).
fn tail_bytes(disk: &Path, from: u64) -> Vec<u8> {
    std::fs::read(disk).unwrap()[from as usize..].to_vec()
}

#[test]
fn service_checks_in_survives_the_server_hands_a_deploy_to_the_engine_and_delivers_its_result() {
    let dir = Scratch::new("autogenic-service");
    let data = dir.join("server");
    std::fs::create_dir_all(&data).unwrap();
    admin(&data, &["init"]);
    let listen = format!("127.0.0.1:{}", e2e::free_port());
    let server = Server::start(&data, &listen);
    let disk = device_disk(&dir, &data);
    let d = disk.to_str().unwrap().to_string();
    let token = admin(&data, &["admin", "add", "watcher", "--role", "viewer"])
        .split_whitespace()
        .find(|w| w.starts_with("imgadm_"))
        .expect("a viewer token")
        .to_string();

    // 1. Repeated check-ins with the stored credential, at low priority.
    let mut svc = Service::start(&dir, "run1", &disk, &[format!("-server={}", server.url)]);
    svc.wait_for("three check-ins", 180, |l| checkins(l) >= 3);
    let log = svc.log();
    assert!(log.contains("enrolled as device"), "{log}");
    assert_eq!(log.matches("enrolled as device").count(), 1, "{log}");
    assert!(!log.contains("HTTP 409"), "{log}");
    assert!(
        log.contains("priority lowered") && log.contains("I/O class idle, nice 19"),
        "{log}"
    );
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", svc.child.id())).unwrap();
    let fields: Vec<&str> = stat[stat.rfind(')').unwrap() + 2..].split(' ').collect();
    // Field 19 of /proc/PID/stat is nice; after the ")" the fields start at 3.
    assert_eq!(fields[19 - 3], "19", "nice in {stat}");
    let io = sh(&format!("ionice -p {}", svc.child.id()));
    assert_eq!(io.trim(), "idle", "ionice -p");
    let tree = store_tree(&disk);
    assert!(tree["state/credential"].secret, "{:?}", tree.keys());
    let devices = admin(&data, &["devices"]);
    assert_eq!(
        devices.lines().filter(|l| l.starts_with(MAC)).count(),
        1,
        "{devices}"
    );

    // An administrator sets the URL list from the guest while the service runs: the
    // service reads the store again and its later commits keep the list.
    let o = sh(&format!(
        "{} -serverurl 'https://img.example:8443' -disk={d}",
        img_bin().display()
    ));
    assert!(o.contains("img.example"), "{o}");
    let n = checkins(&svc.log());
    svc.wait_for("the store read again", 60, |l| {
        l.contains("the store changed")
    });
    svc.wait_for("a check-in after it", 60, |l| checkins(l) >= n + 2);
    let list = sh(&format!("{} -serverurl -disk={d}", img_bin().display()));
    assert!(list.contains("https://img.example:8443"), "{list}");
    assert!(store_tree(&disk).contains_key("state/credential"));

    // 2. The server goes away and comes back on the same address.
    let listen = server.stop();
    let before = checkins(&svc.log());
    svc.wait_for("retries while the server is down", 120, |l| {
        l.matches("no server answered the check-in").count() >= 3
    });
    assert_eq!(checkins(&svc.log()), before);
    let server = Server::start(&data, &listen);
    svc.wait_for("a check-in after the restart", 180, |l| {
        checkins(l) >= before + 2
    });
    assert!(!svc.log().contains("HTTP 409"), "{}", svc.log());

    // 3. SIGTERM: exit 0 at once, store committed.
    let (st, took) = svc.terminate();
    assert!(st.success(), "{st}\n{}", svc.log());
    assert!(
        svc.log().contains("stopped; the store is committed"),
        "{}",
        svc.log()
    );
    eprintln!("SIGTERM to exit: {took:?}");

    // 4. A deploy is handed to the imaging engine, not run in the guest.
    let image = os_image(&dir, "");
    admin(&data, &["image", "add", image.to_str().unwrap()]);
    // The guest was booted with next_entry=guest (GRUB clears it; here it is left set so
    // that clearing it is seen).
    run(Command::new(img_bin()).args(["-bootnext", "guest", &format!("-disk={d}")]));
    assert!(grubenv_list(&dir, &disk).contains("next_entry=guest"));
    let os_before = tail_bytes(&disk, 41 * MIB);
    let out = admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            MAC,
            "--image",
            "os:2.1",
            "--partition",
            "2",
            "--then",
            "no-reboot",
        ],
    );
    assert!(out.contains("scheduled"), "{out}");
    let mut svc = Service::start(&dir, "run2", &disk, &[format!("-server={}", server.url)]);
    let st = svc.wait_exit(180);
    let log = svc.log();
    assert!(st.success(), "{st}\n{log}");
    assert!(
        log.contains("runs in the imaging engine: rebooting into it")
            && log.contains("IMG_SERVICE_REBOOT=exit"),
        "{log}"
    );
    // A network deploy is not a PI: no imaging status record (the engine gets the task
    // again from the server at its check-in).
    let tree = store_tree(&disk);
    assert!(
        !tree.contains_key("state/imagestatus.json"),
        "{:?}",
        tree.keys()
    );
    // The next boot is the imaging engine (GRUB's default: no next_entry).
    let env = grubenv_list(&dir, &disk);
    assert!(!env.contains("next_entry"), "grub-editenv list:\n{env}");
    // The server heard why the device went away.
    let job = admin_get(&data, &server.url, &token, "/api/v1/admin/jobs/1");
    let t = &job["tasks"][0];
    let task_id = t["task"].as_u64().expect("the job's task");
    assert_eq!(
        t["progress"]["phase"], "rebooting into the imaging engine",
        "{job}"
    );
    // Nothing was written outside the boot-agent partition.
    assert!(
        tail_bytes(&disk, 41 * MIB) == os_before,
        "the service wrote the OS partition"
    );

    // 5. The imaging engine's boot (simulated on the store, as it leaves it when the server
    //    did not answer once the image was written): the result in the outbox.
    {
        let t = agent::bootstore::TempRoot::new(&disk).unwrap();
        let report = "5e1f00d5e1f00d5e1f00d5e1f00d0001";
        let result = serde_json::json!({
            "task": task_id, "report": report, "outcome": "succeeded",
            "message": "deployed in the imaging engine",
            "transcript": ["deployed in the imaging engine"],
            "image": {"name": "os", "version": "2.1"}, "bytes": 1234, "finished": 1
        });
        let outbox = t.root().join("state/outbox");
        std::fs::create_dir_all(&outbox).unwrap();
        std::fs::write(outbox.join(format!("{report}.json")), result.to_string()).unwrap();
        agent::bootstore::commit(&t.backing).unwrap();
    }
    // 6. The guest again, the service without -server: the credential's server.
    let mut svc = Service::start(&dir, "run3", &disk, &[]);
    svc.wait_for("a check-in after the engine", 180, |l| checkins(l) >= 1);
    let job = admin_get(&data, &server.url, &token, "/api/v1/admin/jobs/1");
    assert_eq!(job["tasks"][0]["state"], "succeeded", "{job}");
    assert!(
        store_tree(&disk)
            .keys()
            .all(|k| !k.starts_with("state/outbox/")),
        "the delivered result left the outbox"
    );
    let devices = admin(&data, &["devices"]);
    let line = devices
        .lines()
        .find(|l| l.starts_with(MAC))
        .unwrap_or_default();
    assert!(line.contains("2.1"), "{devices}");
    let (st, _) = svc.terminate();
    assert!(st.success(), "{}", svc.log());
    drop(server);
}

/// `systemd-analyze verify` accepts the shipped unit (with ExecStart pointing at the built
/// binary, since it checks that the program exists), and the unit says what the docs say.
#[test]
fn the_shipped_systemd_unit_verifies() {
    require_tool("systemd-analyze");
    let unit = std::fs::read_to_string(e2e::workspace_root().join("dist/img.service")).unwrap();
    for line in [
        "After=network-online.target",
        "Nice=19",
        "IOSchedulingClass=idle",
        "Restart=always",
        "Environment=IMG_DISK=",
        "ExecStart=/usr/local/sbin/img -service -disk=${IMG_DISK}",
    ] {
        assert!(unit.lines().any(|l| l.starts_with(line)), "{line}:\n{unit}");
    }
    let dir = Scratch::new("autogenic-unit");
    let verify = |text: &str| {
        let p = dir.join("img.service");
        std::fs::write(&p, text).unwrap();
        let o = Command::new("systemd-analyze")
            .arg("verify")
            .arg(&p)
            .output()
            .unwrap();
        (
            o.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
        )
    };
    let ours = unit.replace("/usr/local/sbin/img", img_bin().to_str().unwrap());
    let (ok, said) = verify(&ours);
    assert!(
        ok && said.trim().is_empty(),
        "systemd-analyze verify:\n{said}"
    );
    // The check can fail: a broken setting is reported.
    let (_, said) = verify(&ours.replace("IOSchedulingClass=idle", "IOSchedulingClass=bogus"));
    assert!(said.contains("IO scheduling class"), "{said}");
}

/// An OS partition image "os 2.1" made by `img -make` from a 48 MiB GPT disk whose
/// partition 1 is FAT16 with VERSION.TXT and, when `bulk` is a shell command, BULK.BIN
/// holding its output ("" for none).
fn os_image(dir: &Scratch, bulk: &str) -> PathBuf {
    let src = dir.join("src.img");
    let (make, copy) = match bulk {
        "" => (String::new(), "::VERSION.TXT".to_string()),
        e => (format!("{e} > BULK.BIN\n"), "BULK.BIN ::".to_string()),
    };
    sh(&format!(
        "cd {dir}; export MTOOLS_SKIP_CHECK=1; echo 'os 2.1' > VERSION.TXT
         {make}truncate -s 48M {src}
         sgdisk -o -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {src} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {src} 32768 >/dev/null
         mcopy -i {src}@@1048576 VERSION.TXT {copy}",
        dir = dir.path().display(),
        src = src.display()
    ));
    let image = dir.join("os-2.1.img");
    run(Command::new(img_bin()).args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=1",
        "-name=os",
        "-version=2.1",
    ]));
    image
}

/// An autogenic OS partition image "os 2.1" (FAT16 with VERSION.TXT and 3 MB of random
/// BULK.BIN), registered with `--autogenic`.
fn autogenic_image(dir: &Scratch, data: &Path) {
    let image = os_image(dir, "head -c 3000000 /dev/urandom");
    admin(
        data,
        &["image", "add", image.to_str().unwrap(), "--autogenic"],
    );
}

/// VERSION.TXT of the OS partition (partition 2), if it holds one.
fn os_version(dir: &Scratch, disk: &Path) -> String {
    let info = sh(&format!("sgdisk -i 2 {}", disk.display()));
    let first: u64 = info
        .lines()
        .find_map(|l| l.strip_prefix("First sector: "))
        .and_then(|r| r.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("sgdisk -i 2:\n{info}"));
    let vol = dir.join("p2.img");
    sh(&format!(
        "dd if={} of={} bs=512 skip={first} count={} status=none",
        disk.display(),
        vol.display(),
        32 * 2048
    ));
    let o = Command::new("mtype")
        .args(["-i", vol.to_str().unwrap(), "::VERSION.TXT"])
        .env("MTOOLS_SKIP_CHECK", "1")
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).trim().to_string()
}

/// Seed 001 through the guest's service with the real server, on a device converted to the
/// autogenic layout by `img -convert` (the backup area is its IMGBACKUP partition 3):
/// BI (`--backup-only`) runs in the service and is reported without a reboot; PI (`--from-backup`) is recorded in the
/// imaging status record, the next boot made the imaging engine, and the service exits where
/// it would reboot; the engine's start (the real code: `img -checkin -disk=`, here with no
/// server reachable) re-images the OS partition from the backup and leaves its result in the
/// outbox; the service's next check-in delivers it and the record is cleared.
#[test]
fn bi_runs_in_the_service_pi_goes_through_the_engine_and_its_result_comes_back() {
    bi_then_pi_through_the_service(false);
}

/// The same on a disk converted by `img -convert`, the backup area its IMGBACKUP partition.
#[test]
fn bi_and_pi_through_the_service_on_the_imgbackup_partition() {
    bi_then_pi_through_the_service(true);
}

fn bi_then_pi_through_the_service(converted: bool) {
    let dir = Scratch::new(if converted {
        "autogenic-service-part"
    } else {
        "autogenic-service-bipi"
    });
    let data = dir.join("server");
    std::fs::create_dir_all(&data).unwrap();
    admin(&data, &["init"]);
    let listen = format!("127.0.0.1:{}", e2e::free_port());
    let server = Server::start(&data, &listen);
    let disk = device_disk_of(&dir, &data, if converted { 256 } else { 96 });
    let d = disk.to_str().unwrap().to_string();
    // The backup area: the IMGBACKUP partition `img -convert` makes, or a folder.
    let mut area_args = Vec::new();
    if converted {
        let o = Command::new(img_bin())
            .args(["-convert", &format!("-disk={d}"), "-image=8MB"])
            .output()
            .unwrap();
        assert!(o.status.success(), "img -convert: {o:?}");
    } else {
        area_args.push(format!("-backup={}", dir.join("backup").display()));
    }
    autogenic_image(&dir, &data);
    let token = admin(&data, &["admin", "add", "watcher", "--role", "viewer"])
        .split_whitespace()
        .find(|w| w.starts_with("imgadm_"))
        .expect("a viewer token")
        .to_string();
    let server_arg = format!("-server={}", server.url);
    let mut args = vec![server_arg.clone()];
    args.extend(area_args.iter().cloned());
    let mut svc = Service::start(&dir, "bi", &disk, &args);
    svc.wait_for("the first check-in", 180, |l| checkins(l) >= 1);

    // BI: in the service, no reboot, the result (V02) reported.
    let out = admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            MAC,
            "--image",
            "os:2.1",
            "--partition",
            "2",
            "--backup-only",
        ],
    );
    assert!(out.contains("scheduled"), "{out}");
    svc.wait_for("BI's end", 300, |l| l.contains("ended: Succeeded"));
    let n = checkins(&svc.log());
    svc.wait_for("a check-in after BI", 120, |l| checkins(l) > n);
    let log = svc.log();
    assert!(
        log.contains("runs here, in the background") && !log.contains("rebooting into it"),
        "{log}"
    );
    assert!(svc.child.try_wait().unwrap().is_none(), "the service ended");
    let job = admin_get(&data, &server.url, &token, "/api/v1/admin/jobs/1");
    assert_eq!(job["tasks"][0]["state"], "succeeded", "{job}");
    let dev = admin(&data, &["device", MAC]);
    assert!(
        dev.contains("os 2.1"),
        "the server does not show the backup image:\n{dev}"
    );
    assert_eq!(
        os_version(&dir, &disk),
        "",
        "BI must not touch the OS partition"
    );

    // PI: recorded, next boot = engine, "rebooting", exit (IMG_SERVICE_REBOOT=exit).
    run(Command::new(img_bin()).args(["-bootnext", "guest", &format!("-disk={d}")]));
    let out = admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            MAC,
            "--image",
            "os:2.1",
            "--partition",
            "2",
            "--from-backup",
        ],
    );
    assert!(out.contains("scheduled"), "{out}");
    let st = svc.wait_exit(180);
    let log = svc.log();
    assert!(st.success(), "{st}\n{log}");
    assert!(
        log.contains("imaging status record written (pending)")
            && log.contains("IMG_SERVICE_REBOOT=exit"),
        "{log}"
    );
    let tree = store_tree(&disk);
    let rec: serde_json::Value = serde_json::from_slice(
        &tree
            .get("state/imagestatus.json")
            .unwrap_or_else(|| panic!("no status record: {:?}", tree.keys()))
            .data,
    )
    .unwrap();
    assert_eq!(rec["phase"], "pending", "{rec}");
    assert_eq!(rec["attempts"], 0, "{rec}");
    assert_eq!(rec["task"]["from_backup"], true, "{rec}");
    let env = grubenv_list(&dir, &disk);
    assert!(!env.contains("next_entry"), "grub-editenv list:\n{env}");
    let job = admin_get(&data, &server.url, &token, "/api/v1/admin/jobs/2");
    let task = &job["tasks"][0];
    assert_eq!(task["task"], rec["task"]["id"], "{job}");
    assert_eq!(
        task["progress"]["phase"], "rebooting into the imaging engine",
        "{job}"
    );
    assert_eq!(
        os_version(&dir, &disk),
        "",
        "the service must not write the OS partition"
    );

    // The imaging engine's start: PI from the backup before any network (no server
    // answers at this address), the result into the outbox.
    let o = Command::new(img_bin())
        .args([
            "-checkin",
            "-server=https://127.0.0.1:1",
            &format!("-disk={d}"),
            &format!("-mac={MAC}"),
            "-serial=SVC-1",
            "-retries=1",
        ])
        .args(&area_args)
        .env_remove("IMG_AGENT_STATE")
        .output()
        .unwrap();
    let engine = format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    assert!(
        engine.contains("re-imaging from the backup partition at start: Succeeded"),
        "{engine}"
    );
    assert_eq!(os_version(&dir, &disk), "os 2.1", "{engine}");
    let tree = store_tree(&disk);
    assert!(
        tree.keys().any(|k| k.starts_with("state/outbox/")),
        "no result in the outbox: {:?}",
        tree.keys()
    );

    // The guest again: the service's first check-in delivers it, the record is cleared.
    let mut svc = Service::start(&dir, "after", &disk, &args);
    svc.wait_for("a check-in after the engine", 180, |l| checkins(l) >= 1);
    let job = admin_get(&data, &server.url, &token, "/api/v1/admin/jobs/2");
    assert_eq!(job["tasks"][0]["state"], "succeeded", "{job}");
    let tree = store_tree(&disk);
    assert!(
        !tree.keys().any(|k| k.starts_with("state/outbox/"))
            && !tree.contains_key("state/imagestatus.json"),
        "{:?}",
        tree.keys()
    );
    let (st, _) = svc.terminate();
    assert!(st.success(), "{}", svc.log());
    drop(server);
}
