//! Multicast sessions started from the server (`imgserver session start|list|stop`), end to
//! end: the real `imgserver serve` in one network namespace is the session's master, and
//! devices running the real `img -checkin` in namespaces of their own on the same bridge
//! (tests/src/mcastlab.rs) get the session task at their check-in, join and write the image.
//!
//! - two devices finish with disks byte-identical to the captured source disk; `session
//!   list` shows both done and the job's tasks succeeded;
//! - a device whose check-in does not announce task kinds (an agent older than the field,
//!   posted as raw JSON with curl) is not given the session task: it stays pending with the
//!   reason in `imgserver job N` and `imgserver devices`, and is cancelled when the session
//!   ends;
//! - `session stop` mid-session ends it: the session shows `stopped`, the devices in it fail
//!   with the master's reason, and the pending task of a device that never joined is
//!   cancelled.
//!
//! `img` is `$IMG_BIN` when set (the static build scripts/test.sh makes), else the debug
//! build. No test asserts a time; every wait has a generous limit and fails with the logs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use e2e::mcastlab::{McastLab, Pid};
use e2e::{img_bin, imgserver_admin as admin, imgserver_bin, require_tool, sample_bytes, sh};
use imgengine::capture::{capture, CaptureOptions};
use imgengine::io::NoProgress;

const MIB: u64 = 1 << 20;
const SERVER_IP: &str = "10.88.0.1";
const WAIT: Duration = Duration::from_secs(300);
const MAC: [&str; 3] = [
    "52:54:00:5e:00:01",
    "52:54:00:5e:00:02",
    "52:54:00:5e:00:03",
];

/// A 24 MiB GPT disk with one FAT16 partition holding VERSION.TXT and `payload` bytes of
/// noise; free space is zero, so a correct copy onto a zeroed disk is byte-identical.
fn source_disk(dir: &Path, payload: usize) -> PathBuf {
    for t in ["sgdisk", "mkfs.fat", "mcopy", "curl"] {
        require_tool(t);
    }
    let disk = dir.join("source.img");
    fs::write(dir.join("VERSION.TXT"), "room 1\n").unwrap();
    fs::write(dir.join("BLOB.BIN"), sample_bytes(77, payload)).unwrap();
    sh(&format!(
        "cd {d}; export MTOOLS_SKIP_CHECK=1; truncate -s {size} {disk}
         sgdisk -n 1:2048:+20M -t 1:0700 -c 1:SYSTEM {disk} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {disk} 20480 >/dev/null
         mcopy -i {disk}@@1048576 VERSION.TXT ::VERSION.TXT
         mcopy -i {disk}@@1048576 BLOB.BIN ::BLOB.BIN",
        d = dir.display(),
        size = 24 * MIB,
        disk = disk.display()
    ));
    disk
}

/// The serving side: data folder, `init` for the server's address, the image registered,
/// and `imgserver serve` running in node m0.
struct Site {
    data: PathBuf,
    source: PathBuf,
    serve: Pid,
    url: String,
}

impl Site {
    fn new(lab: &mut McastLab, payload: usize) -> Site {
        let t0 = Instant::now();
        let dir = lab.dir().path().to_path_buf();
        let data = dir.join("data");
        admin(&data, &["init", "--name", SERVER_IP]);
        let source = source_disk(&dir, payload);
        eprintln!("{:.1} s: source disk made", t0.elapsed().as_secs_f64());
        let img = dir.join("room-1.img");
        let mut f = fs::File::create(&img).unwrap();
        let o = CaptureOptions {
            name: "room".into(),
            version: "1".into(),
            comp: 1,
            threads: 2,
            ..Default::default()
        };
        capture(&source, None, &mut f, &o, &NoProgress).unwrap();
        eprintln!("{:.1} s: captured", t0.elapsed().as_secs_f64());
        let out = admin(&data, &["image", "add", img.to_str().unwrap()]);
        eprintln!("{:.1} s: registered", t0.elapsed().as_secs_f64());
        assert!(out.contains("registered image room 1"), "{out}");
        let listen = format!("{SERVER_IP}:8443");
        let serve = lab.spawn(
            "m0",
            &imgserver_bin(),
            &[
                "--data",
                data.to_str().unwrap(),
                "serve",
                "--listen",
                &listen,
                "--interval",
                "2",
                "--open-enrolment",
            ],
        );
        let site = Site {
            data,
            source,
            serve,
            url: format!("https://{listen}"),
        };
        wait_until(
            lab,
            &site,
            Duration::from_secs(60),
            "the server listening",
            |l, s| l.output(s.serve).contains("listening on https://"),
        );
        site
    }

    fn admin(&self, args: &[&str]) -> String {
        admin(&self.data, args)
    }

    fn session_list(&self) -> String {
        self.admin(&["session", "list"])
    }
}

fn wait_until(
    lab: &mut McastLab,
    site: &Site,
    timeout: Duration,
    what: &str,
    mut cond: impl FnMut(&mut McastLab, &Site) -> bool,
) {
    let end = Instant::now() + timeout;
    while !cond(lab, site) {
        if Instant::now() > end {
            panic!(
                "timed out waiting for {what}\nsession list:\n{}\nserver log:\n{}",
                admin(&site.data, &["session", "list"]),
                lab.output(site.serve)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// A device: a zeroed disk the size of the source, its lab.conf allowing unsigned images,
/// and `img -checkin` in its node.
struct Device {
    node: &'static str,
    mac: &'static str,
    disk: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Device {
    fn new(lab: &McastLab, node: &'static str, mac: &'static str) -> Device {
        let dir = lab.dir().path();
        let disk = dir.join(format!("disk-{node}.img"));
        sh(&format!("truncate -s {} {}", 24 * MIB, disk.display()));
        let config = dir.join(format!("config-{node}"));
        fs::create_dir_all(&config).unwrap();
        fs::write(config.join("lab.conf"), "unsigned_images = yes\n").unwrap();
        Device {
            node,
            mac,
            disk,
            state: dir.join(format!("agent-{node}")),
            config,
        }
    }

    fn checkin(&self, lab: &mut McastLab, site: &Site) -> Pid {
        let args = [
            "-checkin".to_string(),
            format!("-server={}", site.url),
            format!("-ca={}", site.data.join("ca.pem").display()),
            format!("-state={}", self.state.display()),
            format!("-disk={}", self.disk.display()),
            format!("-config={}", self.config.display()),
            format!("-mac={}", self.mac),
            "-model=TC-100".into(),
            format!("-serial=SN-{}", self.node),
            "-progress=300".into(),
        ];
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        lab.spawn(self.node, &img_bin(), &a)
    }

    /// Enrol with a first check-in (nothing to do yet).
    fn enrol(&self, lab: &mut McastLab, site: &Site) {
        let p = self.checkin(lab, site);
        let f = lab.wait(p, Duration::from_secs(120));
        assert!(
            f.ok(),
            "{}: first check-in failed:\n{}",
            self.node,
            f.output
        );
        assert!(f.output.contains("nothing to do"), "{}", f.output);
    }
}

/// A device whose agent is older than the task-kinds field: its check-ins are posted as
/// raw protocol JSON (no `task_kinds`) with curl from its own node.
struct OldDevice {
    ns: String,
    mac: &'static str,
    credential: Option<String>,
}

impl OldDevice {
    fn checkin(&mut self, site: &Site) -> serde_json::Value {
        let body = format!(
            r#"{{"protocol":1,"device":{{"mac":"{}","agent_version":"0.9"}},"disks":[{{"name":"/dev/sda","size":{},"table":"gpt"}}]}}"#,
            self.mac,
            24 * MIB
        );
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.ns, "curl", "-sS", "--fail-with-body"])
            .arg("--cacert")
            .arg(site.data.join("ca.pem"))
            .args(["-H", "content-type: application/json", "--data", &body]);
        if let Some(t) = &self.credential {
            c.args(["-H", &format!("authorization: Bearer {t}")]);
        }
        let out = c
            .arg(format!("{}/api/v1/checkin", site.url))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "old-style check-in: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let v: serde_json::Value = serde_json::from_str(&text).unwrap();
        if let Some(t) = v["credential"].as_str() {
            self.credential = Some(t.to_string());
        }
        v
    }
}

fn job_of(start_output: &str) -> String {
    start_output
        .split("; job ")
        .nth(1)
        .and_then(|r| r.split(';').next())
        .unwrap_or_else(|| panic!("no job number in {start_output:?}"))
        .to_string()
}

/// The session's heading line in `session list`.
fn session_line(list: &str, name: &str) -> String {
    list.lines()
        .find(|l| l.starts_with(&format!("session {name}:")))
        .unwrap_or_default()
        .to_string()
}

/// The row of `mac` in a listing.
fn row<'a>(text: &'a str, mac: &str) -> &'a str {
    text.lines().find(|l| l.contains(mac)).unwrap_or_default()
}

#[test]
fn two_devices_image_from_the_server_session_and_an_old_agent_is_not_given_it() {
    let t0 = Instant::now();
    let mut lab = McastLab::new(1, 3);
    let site = Site::new(&mut lab, 6 * MIB as usize);
    eprintln!("{:.1} s: server up", t0.elapsed().as_secs_f64());
    let a = Device::new(&lab, "c0", MAC[0]);
    let b = Device::new(&lab, "c1", MAC[1]);
    a.enrol(&mut lab, &site);
    b.enrol(&mut lab, &site);
    eprintln!("{:.1} s: devices enrolled", t0.elapsed().as_secs_f64());
    let mut old = OldDevice {
        ns: lab.node("c2").ns.clone(),
        mac: MAC[2],
        credential: None,
    };
    let first = old.checkin(&site);
    assert_eq!(first["action"]["action"], "wait", "{first}");

    let out = site.admin(&[
        "session",
        "start",
        "room1",
        "--image",
        "room:1",
        "--mac",
        MAC[0],
        "--mac",
        MAC[1],
        "--mac",
        MAC[2],
        "--clients",
        "2",
    ]);
    assert!(out.contains("session room1:"), "{out}");
    let job = job_of(&out);
    wait_until(
        &mut lab,
        &site,
        Duration::from_secs(30),
        "the server taking the session",
        |_, s| s.session_list().contains("master on "),
    );

    // The old agent checks in while the session waits: no task, and the reason shown.
    let r = old.checkin(&site);
    assert_eq!(r["action"]["action"], "wait", "an old agent was given {r}");
    let shown = site.admin(&["job", &job]);
    assert!(
        row(&shown, MAC[2])
            .contains("the device's agent does not know session tasks: update the agent"),
        "{shown}"
    );
    assert!(row(&shown, MAC[2]).contains("pending"), "{shown}");
    let devices = site.admin(&["devices"]);
    assert!(
        row(&devices, MAC[2]).contains("does not know session tasks"),
        "{devices}"
    );

    // The two current agents get the task, join and write.
    let pa = a.checkin(&mut lab, &site);
    let pb = b.checkin(&mut lab, &site);
    let fa = lab.wait(pa, WAIT);
    let fb = lab.wait(pb, WAIT);
    for (f, d) in [(&fa, &a), (&fb, &b)] {
        assert!(
            f.ok(),
            "{}:\n{}\nserver:\n{}",
            d.node,
            f.output,
            lab.output(site.serve)
        );
        assert!(
            f.output.contains("joining multicast session room1"),
            "{}",
            f.output
        );
        assert!(f.output.contains("task done"), "{}", f.output);
    }
    let src = fs::read(&site.source).unwrap();
    for d in [&a, &b] {
        let got = fs::read(&d.disk).unwrap();
        assert_eq!(got.len(), src.len());
        assert!(
            got == src,
            "{}: the disk differs from the source disk",
            d.node
        );
    }

    wait_until(
        &mut lab,
        &site,
        Duration::from_secs(60),
        "the session done",
        |_, s| session_line(&s.session_list(), "room1").contains(": done ("),
    );
    let list = site.session_list();
    // Both clients finished at 100 %, both tasks succeeded; the old device's task was
    // cancelled with the session's end.
    let clients: Vec<&str> = list
        .lines()
        .filter(|l| l.contains("10.88.0.10") && l.contains(" done "))
        .collect();
    assert_eq!(clients.len(), 2, "{list}");
    assert!(clients.iter().all(|l| l.contains("100%")), "{list}");
    for m in &MAC[..2] {
        assert!(row(&list, m).contains("succeeded"), "{list}");
    }
    assert!(row(&list, MAC[2]).contains("aborted"), "{list}");
    assert!(
        row(&list, MAC[2]).contains("ended before this device joined"),
        "{list}"
    );
    // Results recorded as ordinary task results, with the image now on the devices.
    let shown = site.admin(&["job", &job]);
    for m in &MAC[..2] {
        assert!(row(&shown, m).contains("succeeded"), "{shown}");
        let t = site.admin(&["transcript", m]);
        assert!(t.contains("succeeded"), "{t}");
    }
    let devices = site.admin(&["devices"]);
    for m in &MAC[..2] {
        assert!(row(&devices, m).contains("room 1"), "{devices}");
    }
    // The old device is still not given anything.
    let r = old.checkin(&site);
    assert_eq!(r["action"]["action"], "wait", "{r}");
}

#[test]
fn session_stop_ends_it_with_a_clear_state_and_the_devices_tasks_end() {
    let mut lab = McastLab::new(1, 3);
    // A larger image, sent slowly, so the stop lands mid-session.
    let site = Site::new(&mut lab, 12 * MIB as usize);
    let a = Device::new(&lab, "c0", MAC[0]);
    let b = Device::new(&lab, "c1", MAC[1]);
    a.enrol(&mut lab, &site);
    b.enrol(&mut lab, &site);
    // A third, current agent that never checks in during the session.
    let c = Device::new(&lab, "c2", MAC[2]);
    c.enrol(&mut lab, &site);
    let out = site.admin(&[
        "session",
        "start",
        "late1",
        "--image",
        "1",
        "--mac",
        MAC[0],
        "--mac",
        MAC[1],
        "--mac",
        MAC[2],
        "--clients",
        "2",
        "--throttle",
        "4",
    ]);
    let job = job_of(&out);
    wait_until(
        &mut lab,
        &site,
        Duration::from_secs(30),
        "the server taking the session",
        |_, s| s.session_list().contains("master on "),
    );
    let pa = a.checkin(&mut lab, &site);
    let pb = b.checkin(&mut lab, &site);
    wait_until(&mut lab, &site, WAIT, "the session sending", |_, s| {
        let l = s.session_list();
        session_line(&l, "late1").contains(": running (")
            && l.lines()
                .any(|x| x.contains("10.88.0.10") && x.contains("receiving"))
    });
    let out = site.admin(&["session", "stop", "late1"]);
    assert!(
        out.contains("session late1: stopped by the administrator"),
        "{out}"
    );
    assert!(out.contains("1 pending task(s)"), "{out}");
    let fa = lab.wait(pa, WAIT);
    let fb = lab.wait(pb, WAIT);
    for (f, d) in [(&fa, &a), (&fb, &b)] {
        assert!(
            !f.ok(),
            "{} finished a stopped session:\n{}",
            d.node,
            f.output
        );
        assert!(f.output.contains("task ended: Failed"), "{}", f.output);
    }
    wait_until(
        &mut lab,
        &site,
        Duration::from_secs(30),
        "the session stopped",
        |_, s| session_line(&s.session_list(), "late1").contains(": stopped ("),
    );
    let list = site.session_list();
    assert!(
        session_line(&list, "late1").contains("stopped by the administrator after"),
        "{list}"
    );
    let shown = site.admin(&["job", &job]);
    for m in &MAC[..2] {
        assert!(row(&shown, m).contains("failed"), "{shown}");
        assert!(
            row(&shown, m).contains("the master ended the session"),
            "{shown}"
        );
    }
    assert!(row(&shown, MAC[2]).contains("aborted"), "{shown}");
    // The device that never joined gets nothing afterwards.
    let pc = c.checkin(&mut lab, &site);
    let fc = lab.wait(pc, Duration::from_secs(120));
    assert!(fc.output.contains("nothing to do"), "{}", fc.output);
    // The name is free again.
    let again = site.admin(&[
        "session",
        "start",
        "late1",
        "--image",
        "room",
        "--all",
        "--timeout",
        "1",
    ]);
    assert!(again.contains("session late1:"), "{again}");
    let out = site.admin(&["session", "stop", "late1"]);
    assert!(out.contains("stopped by the administrator"), "{out}");
}
