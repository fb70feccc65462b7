//! The reference server does not trust strangers (issue 9, the server's holes): each test
//! runs the real `imgserver` binary on loopback over HTTPS from its own `init` and attacks
//! it the way a device on the LAN could: enrolling someone else's MAC, uploading under a
//! spent key or with a name of its own, reading the repository without a credential,
//! holding half-sent requests open, flooding it, repeating results.
//!
//! Peers: openssl s_client (a TLS client that sends exactly what we type), mkfs.fat, sgdisk
//! and mtools for real images, a tmpfs for a full repository (root only; skipped with a
//! message otherwise).

use std::fs;
use std::io::{Read, Write};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use agent::checkin;
use checkin::client::{http_agent, Client, ClientError};
use checkin::state::StateDir;
use checkin::AgentConfig;
use e2e::server::{capture_image, fat16_source_disk};
use e2e::{imgserver_admin as admin, imgserver_bin, require_tool, sample_bytes, sh, Scratch};
use imgserver::protocol::{
    enrolment_proof, progress_path, result_path, task_path, Action, CheckIn, CheckInReply,
    DeviceIdentity, DiskReport, Outcome, ProgressReport, Task, TaskKind, TaskResult, CHECKIN_PATH,
    PROTOCOL_VERSION,
};

const MIB: u64 = 1 << 20;
const MAC_A: &str = "52:54:00:00:01:0a";
const MAC_B: &str = "52:54:00:00:01:0b";
const MAC_C: &str = "52:54:00:00:01:0c";
const MAC_D: &str = "52:54:00:00:01:0d";

/// A running `imgserver serve` with TLS on 127.0.0.1 (tests/src/server.rs); killed on drop.
struct Server(e2e::server::Server);

impl std::ops::Deref for Server {
    type Target = e2e::server::Server;
    fn deref(&self) -> &e2e::server::Server {
        &self.0
    }
}

impl Server {
    fn start(data: &Path, extra: &[&str]) -> Server {
        let mut args = vec!["--listen", "127.0.0.1:0", "--interval", "7"];
        args.extend_from_slice(extra);
        Server(e2e::server::Server::start(data, &args))
    }

    fn client(&self) -> Client {
        Client::new(&self.url, Some(&self.ca()), Duration::from_secs(20)).unwrap()
    }

    fn http(&self) -> ureq::Agent {
        http_agent(Some(&self.ca()), Duration::from_secs(20)).unwrap()
    }
}

/// A check-in as a device with one disk of `disk_size` bytes would send it.
fn checkin_req(mac: &str, disk_size: u64, proof: Option<String>) -> CheckIn {
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            serial: Some(format!("SN-{mac}")),
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "disk0".into(),
            size: disk_size,
            table: "gpt".into(),
            ..Default::default()
        }],
        enrol_proof: proof,
        ..Default::default()
    }
}

fn post_checkin(
    srv: &Server,
    req: &CheckIn,
    token: Option<&str>,
) -> Result<CheckInReply, ClientError> {
    srv.client().post(CHECKIN_PATH, token, req)
}

/// Enrol `mac` with the site secret; its credential.
fn enrol(srv: &Server, mac: &str, disk_size: u64) -> String {
    let proof = enrolment_proof(&srv.enrol_secret(), mac);
    let r = post_checkin(srv, &checkin_req(mac, disk_size, Some(proof)), None).unwrap();
    assert!(!r.pending_approval);
    r.credential.expect("a credential at enrolment")
}

fn status(e: &ClientError) -> u16 {
    match e {
        ClientError::Http { status, .. } => *status,
        other => panic!("expected an HTTP refusal, got {other}"),
    }
}

fn task_of(r: &CheckInReply) -> Task {
    match &r.action {
        Action::Run { task } => task.clone(),
        other => panic!("expected a task, got {other:?}"),
    }
}

/// The task row of `mac` in `imgserver job N`.
fn job_line(srv: &Server, job: u64, mac: &str) -> String {
    srv.admin(&["job", &job.to_string()])
        .lines()
        .find(|l| l.starts_with(|c: char| c.is_ascii_digit()) && l.contains(mac))
        .unwrap_or_default()
        .to_string()
}

fn tools() {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
}

/// A 40 MiB GPT disk with one FAT16 partition holding VERSION.TXT and some noise, captured
/// as image `name` `version` into `dir/<name>-<version>.img`.
fn make_image(dir: &Scratch, name: &str, version: &str) -> PathBuf {
    let disk = dir.join(format!("{name}-{version}-src.img"));
    let blob = sample_bytes(11, 200_000);
    fat16_source_disk(dir.path(), &disk, 40, &format!("{name} {version}\n"), &blob);
    let img = dir.join(format!("{name}-{version}.img"));
    capture_image(&disk, None, name, version, &img);
    img
}

/// PUT `body` to `url` (with Content-Length); the status and the answer's text.
fn put(srv: &Server, url: &str, body: Vec<u8>) -> (u16, String) {
    let resp = srv.http().put(url).send(&body[..]).unwrap();
    let st = resp.status().as_u16();
    (st, resp.into_body().read_to_string().unwrap_or_default())
}

/// PUT a streamed body (chunked, no length up front), as the agent uploads a capture.
fn put_streamed(srv: &Server, url: &str, body: Vec<u8>) -> (u16, String) {
    match srv
        .http()
        .put(url)
        .send(ureq::SendBody::from_owned_reader(std::io::Cursor::new(
            body,
        ))) {
        Ok(resp) => {
            let st = resp.status().as_u16();
            (st, resp.into_body().read_to_string().unwrap_or_default())
        }
        // The server may answer and close before the whole body is sent.
        Err(e) => (0, e.to_string()),
    }
}

fn files_in(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn enrolment_needs_the_site_secret_or_the_administrators_approval() {
    let dir = Scratch::new("trust-enrol");
    let srv = Server::start(&dir.join("srv"), &[]);
    // A job waits for MAC A before the device was ever seen.
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--reboot"]);

    // Someone without the site secret enrols as A: it is held for approval, gets no task.
    let r = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), None).unwrap();
    assert!(r.pending_approval, "{r:?}");
    assert!(matches!(r.action, Action::Wait { .. }), "{r:?}");
    let pending_token = r.credential.clone().unwrap();
    let line = srv
        .admin(&["devices"])
        .lines()
        .find(|l| l.starts_with(MAC_A))
        .unwrap()
        .to_string();
    assert!(
        line.contains("Pending Approval") && line.contains("127.0.0.1"),
        "{line}"
    );
    let shown = srv.admin(&["device", MAC_A]);
    assert!(
        shown.contains("pending approval (requested from 127.0.0.1)"),
        "{shown}"
    );
    // Checking in again with that credential: still nothing; the task API refuses it.
    let again = post_checkin(
        &srv,
        &checkin_req(MAC_A, 1 << 30, None),
        Some(&pending_token),
    )
    .unwrap();
    assert!(again.pending_approval && matches!(again.action, Action::Wait { .. }));
    let e = srv
        .client()
        .get::<Task>(&task_path(1), Some(&pending_token))
        .unwrap_err();
    assert_eq!(status(&e), 403, "{e}");
    assert!(job_line(&srv, 1, MAC_A).contains("pending"));
    // A second stranger cannot take the MAC over either.
    let e = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), None).unwrap_err();
    assert_eq!(status(&e), 409, "{e}");
    assert!(e.to_string().contains("pending approval"), "{e}");

    // The real device proves the site secret: it replaces the pending request and gets
    // the job; the stranger's credential is dead.
    let real = enrol(&srv, MAC_A, 1 << 30);
    let r = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&real)).unwrap();
    assert_eq!(task_of(&r).job, 1);
    let e = post_checkin(
        &srv,
        &checkin_req(MAC_A, 1 << 30, None),
        Some(&pending_token),
    )
    .unwrap_err();
    assert_eq!(status(&e), 401, "{e}");
    let t = srv.admin(&["transcript", MAC_A]);
    assert!(t.contains("pending") && t.contains("is discarded"), "{t}");

    // A wrong secret is no secret: pending. The administrator approves; then the job comes.
    srv.admin(&["schedule", "add", "--mac", MAC_B, "--reboot"]);
    let wrong = enrolment_proof("not the site secret", MAC_B);
    let r = post_checkin(&srv, &checkin_req(MAC_B, 1 << 30, Some(wrong)), None).unwrap();
    assert!(r.pending_approval);
    let b_token = r.credential.unwrap();
    // A proof made for another MAC does not enrol this one either.
    let other = enrolment_proof(&srv.enrol_secret(), MAC_D);
    let r = post_checkin(&srv, &checkin_req(MAC_C, 1 << 30, Some(other)), None).unwrap();
    assert!(r.pending_approval);
    let out = srv.admin(&["approve", MAC_B]);
    assert!(out.contains("approved"), "{out}");
    let r = post_checkin(&srv, &checkin_req(MAC_B, 1 << 30, None), Some(&b_token)).unwrap();
    assert!(!r.pending_approval);
    assert_eq!(task_of(&r).job, 2);
    assert!(srv
        .admin(&["devices"])
        .lines()
        .any(|l| l.starts_with(MAC_B) && l.contains("Upgrade In Progress")));

    // The agent itself reads enrol.key next to its CA and enrols at once.
    let boot = dir.join("bootpart");
    fs::create_dir_all(&boot).unwrap();
    fs::copy(srv.ca(), boot.join("ca.pem")).unwrap();
    fs::copy(srv.data.join("enrol.key"), boot.join("enrol.key")).unwrap();
    let disk = dir.join("d.img");
    fs::write(&disk, vec![0u8; MIB as usize]).unwrap();
    let cfg = AgentConfig {
        state_dir: dir.join("state-d"),
        ca_file: Some(boot.join("ca.pem")),
        disk: Some(disk.clone()),
        trusted_dir: None,
        mac: Some(MAC_D.into()),
        quiet: true,
        ..AgentConfig::default()
    };
    let st = StateDir::open(&cfg.state_dir).unwrap();
    let r = checkin::checkin_once(&srv.client(), &st, &cfg).unwrap();
    assert!(!r.pending_approval && r.credential.is_some(), "{r:?}");
    // Without enrol.key beside the CA the agent's enrolment waits for approval.
    fs::remove_file(boot.join("enrol.key")).unwrap();
    let cfg_c = AgentConfig {
        state_dir: dir.join("state-c2"),
        mac: Some("52:54:00:00:01:1c".into()),
        ..cfg.clone()
    };
    let st = StateDir::open(&cfg_c.state_dir).unwrap();
    let r = checkin::checkin_once(&srv.client(), &st, &cfg_c).unwrap();
    assert!(r.pending_approval, "{r:?}");
    // The proof is not kept with the inventory.
    let proof_d = enrolment_proof(&srv.enrol_secret(), MAC_D);
    for f in ["imgserver.db", "imgserver.db-wal"] {
        let db = fs::read(srv.data.join(f)).unwrap_or_default();
        assert!(!String::from_utf8_lossy(&db).contains(&proof_d), "{f}");
    }
}

#[test]
fn enrolment_without_the_secret_is_rate_limited_per_address() {
    let dir = Scratch::new("trust-enrol-rate");
    let srv = Server::start(&dir.join("srv"), &["--enrol-rate", "3"]);
    let mut refused = 0;
    for n in 0..6 {
        let mac = format!("52:54:00:00:02:{n:02x}");
        match post_checkin(&srv, &checkin_req(&mac, 1 << 30, None), None) {
            Ok(r) => assert!(r.pending_approval),
            Err(e) => {
                assert_eq!(status(&e), 429, "{e}");
                assert!(e.to_string().contains("enrol.key"), "{e}");
                refused += 1;
            }
        }
    }
    assert_eq!(refused, 3, "3 per minute: the 4th to 6th are refused");
    let pending = srv
        .admin(&["devices"])
        .lines()
        .filter(|l| l.contains("Pending Approval"))
        .count();
    assert_eq!(pending, 3);
    // Devices with the site secret are not held back by strangers' attempts.
    enrol(&srv, MAC_A, 1 << 30);
}

#[test]
fn capture_uploads_take_the_jobs_name_spend_their_key_once_and_are_capped() {
    tools();
    let dir = Scratch::new("trust-upload");
    let srv = Server::start(&dir.join("srv"), &[]);
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--capture", "gold:1"]);
    // The device says its disk has 4 MiB: its capture cannot be larger than that plus the
    // format's overhead (4 MiB + 1/16 + 16 MiB).
    let disk_size = 4 * MIB;
    let token = enrol(&srv, MAC_A, disk_size);
    let next_key = || {
        let r = post_checkin(&srv, &checkin_req(MAC_A, disk_size, None), Some(&token)).unwrap();
        match task_of(&r).kind {
            TaskKind::Capture(c) => {
                assert_eq!((c.name.as_str(), c.version.as_str()), ("gold", "1"));
                c.upload_url
            }
            other => panic!("{other:?}"),
        }
    };
    let incoming = srv.data.join("incoming");
    assert!(
        !incoming.starts_with(srv.data.join("repo")),
        "uploads in flight are outside the served tree"
    );

    // Too large for what the task captures: refused while streaming, nothing kept.
    let url = next_key();
    let (st, text) = put_streamed(&srv, &url, vec![0x5a; 24 * MIB as usize]);
    assert!(st == 413 || st == 0, "{st} {text}");
    assert!(files_in(&incoming).is_empty(), "{:?}", files_in(&incoming));
    // With Content-Length the refusal comes before the body: only the headers are sent.
    let url2 = next_key();
    let answer = raw_head(
        &srv,
        &format!(
            "PUT {} HTTP/1.1\r\nHost: x\r\nContent-Length: {}\r\n\r\n",
            path_of(&url2),
            24 * MIB
        ),
    );
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    // That key is spent.
    let (st, text) = put(&srv, &url2, b"again".to_vec());
    assert_eq!(st, 403, "{text}");
    assert!(text.contains("works once"), "{text}");

    // An upload that names itself something else is refused: the job names the image.
    let os9 = fs::read(make_image(&dir, "os", "9")).unwrap();
    let (st, text) = put(&srv, &next_key(), os9);
    assert_eq!(st, 422, "{text}");
    assert!(text.contains("says it is os 9"), "{text}");
    // A signed upload is refused: captures arrive unsigned.
    let gold = make_image(&dir, "gold", "1");
    let key = dir.join("k.key");
    imgengine::sign::generate(&key).unwrap();
    let signed = dir.join("gold-signed.img");
    imgengine::sign::seal_and_sign(&gold, &signed, &imgengine::sign::load_secret(&key).unwrap())
        .unwrap();
    let (st, text) = put(&srv, &next_key(), fs::read(&signed).unwrap());
    assert_eq!(st, 422, "{text}");
    assert!(text.contains("must be unsigned"), "{text}");
    // Two uploads racing with one key: exactly one gets past the key.
    let url = next_key();
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let (u, ca, base) = (url.clone(), srv.ca(), srv.url.clone());
            std::thread::spawn(move || {
                let _ = base;
                let a = http_agent(Some(&ca), Duration::from_secs(20)).unwrap();
                let r = a.put(&u).send(&b"not an image"[..]).unwrap();
                r.status().as_u16()
            })
        })
        .collect();
    let mut codes: Vec<u16> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    codes.sort();
    assert!(
        codes == [403, 422] || codes == [409, 422],
        "one refused for the spent key, one refused as not an image: {codes:?}"
    );

    // The right image, unsigned: registered as a capture.
    let (st, text) = put(&srv, &next_key(), fs::read(&gold).unwrap());
    assert_eq!(st, 201, "{text}");
    let list = srv.admin(&["image", "list"]);
    assert!(
        list.contains(&format!("no (captured from {MAC_A} task")),
        "{list}"
    );
    assert!(files_in(&incoming).is_empty());
    // Never the implicit "latest", and not deployable until an administrator signs it.
    let out = Command::new(imgserver_bin())
        .arg("--data")
        .arg(&srv.data)
        .args(["schedule", "add", "--mac", MAC_B, "--image", "gold"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("no image gold"));
    let out = Command::new(imgserver_bin())
        .arg("--data")
        .arg(&srv.data)
        .args(["schedule", "add", "--mac", MAC_B, "--image", "gold:1"])
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && text.contains("imgserver image sign gold:1"),
        "{text}"
    );
    srv.admin(&["image", "sign", "gold:1", "--key", key.to_str().unwrap()]);
    let out = srv.admin(&["schedule", "add", "--mac", MAC_B, "--image", "gold:1"]);
    assert!(out.contains("scheduled"), "{out}");
    // Still not "latest" after signing: the administrator names captured versions.
    let out = Command::new(imgserver_bin())
        .arg("--data")
        .arg(&srv.data)
        .args(["schedule", "add", "--mac", MAC_C, "--image", "gold"])
        .output()
        .unwrap();
    assert!(!out.status.success());
}

#[test]
fn capture_uploads_are_capped_at_the_free_space() {
    if is_root() {
        run_free_space_test();
    } else {
        println!(
            "SKIPPED capture_uploads_are_capped_at_the_free_space: mounting a tmpfs needs root"
        );
    }
}

fn is_root() -> bool {
    sh("id -u").trim() == "0"
}

/// A tmpfs mount removed on drop.
struct Tmpfs(PathBuf);

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

fn run_free_space_test() {
    let dir = Scratch::new("trust-full");
    let data = dir.join("srv");
    fs::create_dir_all(&data).unwrap();
    sh(&format!(
        "mount -t tmpfs -o size=24m tmpfs {}",
        data.display()
    ));
    let _mount = Tmpfs(data.clone());
    let srv = Server::start(&data, &["--keep-free", "1048576"]);
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--capture", "big:1"]);
    // The device claims a 1 GiB disk: the task's cap is far above what the tmpfs holds.
    let token = enrol(&srv, MAC_A, 1 << 30);
    let r = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&token)).unwrap();
    let TaskKind::Capture(c) = task_of(&r).kind else {
        panic!()
    };
    let (st, text) = put_streamed(&srv, &c.upload_url, vec![0xa5; 40 * MIB as usize]);
    assert!(st == 413 || st == 0, "{st} {text}");
    assert!(files_in(&data.join("incoming")).is_empty());
    let free = sh(&format!(
        "df --output=avail -B1 {} | tail -1",
        data.display()
    ));
    let free: u64 = free.trim().parse().unwrap();
    assert!(
        free > 20 * MIB,
        "the partial upload was removed: {free} bytes free"
    );
    // The server still answers.
    let ok = srv
        .http()
        .get(&format!("{}/api/v1/health", srv.url))
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

#[test]
fn repository_needs_the_devices_credential_or_a_signed_url() {
    tools();
    let dir = Scratch::new("trust-repo");
    let srv = Server::start(&dir.join("srv"), &[]);
    let img = make_image(&dir, "os", "1");
    srv.admin(&["image", "add", img.to_str().unwrap()]);
    let bytes = fs::read(&img).unwrap();
    let http = srv.http();
    let file_url = format!("{}/repo/os-1.img", srv.url);
    let get = |url: &str, token: Option<&str>| -> (u16, Vec<u8>) {
        let mut r = http.get(url);
        if let Some(t) = token {
            r = r.header("Authorization", &format!("Bearer {t}"));
        }
        let resp = r.call().unwrap();
        let st = resp.status().as_u16();
        (st, resp.into_body().read_to_vec().unwrap_or_default())
    };
    // Nobody without a credential.
    assert_eq!(get(&file_url, None).0, 401);
    // An enrolled device without a task for this image: refused.
    let a = enrol(&srv, MAC_A, 1 << 30);
    let b = enrol(&srv, MAC_B, 1 << 30);
    assert_eq!(get(&file_url, Some(&a)).0, 403);
    // With its deploy task running, device A may read it (Range too); B still may not.
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--image", "os:1"]);
    post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&a)).unwrap();
    let (st, body) = get(&file_url, Some(&a));
    assert_eq!(st, 200);
    assert_eq!(body, bytes);
    let resp = http
        .get(&file_url)
        .header("Authorization", &format!("Bearer {a}"))
        .header("Range", "bytes=100-199")
        .call()
        .unwrap();
    assert_eq!(resp.status().as_u16(), 206);
    assert_eq!(resp.into_body().read_to_vec().unwrap(), bytes[100..200]);
    assert_eq!(get(&file_url, Some(&b)).0, 403);
    // A signed URL (for a CDN) works without a credential until it expires.
    let signed = srv.admin(&["image", "url", "os:1", "--base", &srv.url]);
    let signed = signed.trim();
    let (st, body) = get(signed, None);
    assert_eq!(st, 200);
    assert_eq!(body, bytes);
    let tampered = signed.replace("os-1.img", "os-2.img");
    assert_eq!(get(&tampered, None).0, 403);
    let later = signed.replace("expires=", "expires=9");
    assert_eq!(get(&later, None).0, 403, "the expiry is signed too");
    let short = srv.admin(&["image", "url", "os:1", "--expires", "0", "--base", &srv.url]);
    // It expires when the server's clock passes it: ask until it does.
    let (mut st, mut body) = get(short.trim(), None);
    let asked = Instant::now();
    while st == 200 && asked.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(100));
        (st, body) = get(short.trim(), None);
    }
    assert_eq!(st, 403);
    assert!(String::from_utf8_lossy(&body).contains("expired"));
    // Dotfiles, temporary files and anything outside the repository: not there.
    fs::write(srv.data.join("repo/.os-2.img.part"), b"in flight").unwrap();
    fs::write(srv.data.join("repo/.hidden"), b"secret").unwrap();
    for path in [
        "/repo/.os-2.img.part",
        "/repo/.hidden",
        "/repo/%2e%2e%2fimgserver.db",
        "/repo/..%2fenrol.key",
        "/repo/incoming/task-1.part",
        "/repo/",
    ] {
        let (st, _) = get(&format!("{}{path}", srv.url), Some(&a));
        assert!(st == 404, "{path}: {st}");
    }
    // The agent sends its credential with its image requests (its own server only): a
    // whole deploy through the repository.
    let target = dir.join("target.img");
    fs::write(&target, b"").unwrap();
    sh(&format!("truncate -s {} {}", 48 * MIB, target.display()));
    let st_dir = dir.join("state-c");
    let cfg = AgentConfig {
        state_dir: st_dir,
        ca_file: Some(srv.ca()),
        disk: Some(target.clone()),
        trusted_dir: None,
        mac: Some(MAC_C.into()),
        progress_interval: Duration::from_millis(200),
        retry_wait: Duration::from_millis(300),
        job_retries: 0,
        quiet: true,
        // The test image is unsigned: the explicit lab setting.
        lab: discovery::LabSettings {
            unsigned_images: true,
            ..Default::default()
        },
        ..AgentConfig::default()
    };
    srv.admin(&[
        "schedule",
        "add",
        "--mac",
        MAC_C,
        "--image",
        "os:1",
        "--then",
        "no-reboot",
    ]);
    let outcome = checkin::agent_loop(&srv.url, &cfg).unwrap();
    assert!(
        matches!(outcome, checkin::LoopOutcome::Idle { .. }),
        "{outcome:?}"
    );
    let job = srv.admin(&["jobs"]);
    assert!(
        job_line(&srv, 2, MAC_C).contains("succeeded"),
        "{job}\n{}",
        srv.admin(&["transcript", MAC_C])
    );
}

/// Run `openssl s_client` to the server; the child with stdin piped.
fn tls_client(srv: &Server) -> Child {
    require_tool("openssl");
    Command::new("openssl")
        .args(["s_client", "-quiet", "-connect"])
        .arg(format!("127.0.0.1:{}", srv.port))
        .arg("-CAfile")
        .arg(srv.ca())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

/// The path and query of a URL.
fn path_of(url: &str) -> &str {
    let rest = url.split_once("://").unwrap().1;
    &rest[rest.find('/').unwrap()..]
}

/// Send `head` over TLS and return what the server answers (until it closes, or 30 s).
fn raw_head(srv: &Server, head: &str) -> String {
    let mut c = tls_client(srv);
    let mut stdin = c.stdin.take().unwrap();
    stdin.write_all(head.as_bytes()).unwrap();
    stdin.flush().unwrap();
    let mut out = c.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut got = Vec::new();
        let mut buf = [0u8; 4096];
        while let Ok(n) = out.read(&mut buf) {
            if n == 0 {
                break;
            }
            got.extend_from_slice(&buf[..n]);
            if got.windows(4).any(|w| w == b"\r\n\r\n") {
                break;
            }
        }
        String::from_utf8_lossy(&got).into_owned()
    });
    let start = Instant::now();
    while !reader.is_finished() && start.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = c.kill();
    let _ = c.wait();
    drop(stdin);
    reader.join().unwrap()
}

/// Wait for the child to end (the server closed the connection); how long that took.
fn ends_within(child: &mut Child, limit: Duration) -> Option<Duration> {
    let start = Instant::now();
    while start.elapsed() < limit {
        if child.try_wait().unwrap().is_some() {
            return Some(start.elapsed());
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let _ = child.kill();
    let _ = child.wait();
    None
}

#[test]
fn half_sent_requests_are_dropped_after_the_timeouts() {
    let dir = Scratch::new("trust-slow");
    let srv = Server::start(
        &dir.join("srv"),
        &["--header-timeout", "2", "--body-timeout", "2"],
    );
    // Well above the 2 s timeouts (a loaded machine), well below hyper's own defaults.
    let limit = Duration::from_secs(15);
    // A TCP connection that never starts TLS.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
    raw.set_read_timeout(Some(limit)).unwrap();
    let start = Instant::now();
    let mut buf = [0u8; 16];
    let n = raw.read(&mut buf).unwrap_or(0);
    assert_eq!(n, 0, "closed without an answer");
    assert!(start.elapsed() < limit);
    // Half a request line and headers, then nothing.
    let mut c = tls_client(&srv);
    let mut stdin = c.stdin.take().unwrap();
    stdin
        .write_all(b"GET /api/v1/health HTTP/1.1\r\nHost: x\r\nX-Slow: ")
        .unwrap();
    stdin.flush().unwrap();
    let took = ends_within(&mut c, limit).expect("the server dropped the half-sent headers");
    assert!(took >= Duration::from_millis(1500), "{took:?}");
    drop(stdin);
    // Whole headers, half a body: 408 and closed.
    let mut c = tls_client(&srv);
    let mut stdin = c.stdin.take().unwrap();
    stdin
        .write_all(b"POST /api/v1/checkin HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"protocol\": 1,")
        .unwrap();
    stdin.flush().unwrap();
    let mut out = c.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    ends_within(&mut c, limit).expect("the server dropped the half-sent body");
    let answer = reader.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    drop(stdin);
    // A stalled upload is dropped the same way and leaves nothing behind.
    let token = enrol(&srv, MAC_A, 1 << 30);
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--capture", "gold:1"]);
    let r = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&token)).unwrap();
    let TaskKind::Capture(cap) = task_of(&r).kind else {
        panic!()
    };
    let path = path_of(&cap.upload_url);
    let mut c = tls_client(&srv);
    let mut stdin = c.stdin.take().unwrap();
    write!(
        stdin,
        "PUT {path} HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n400\r\n"
    )
    .unwrap();
    stdin.write_all(&[7u8; 512]).unwrap();
    stdin.flush().unwrap();
    let mut out = c.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = out.read_to_string(&mut s);
        s
    });
    ends_within(&mut c, limit).expect("the server dropped the stalled upload");
    let answer = reader.join().unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(files_in(&srv.data.join("incoming")).is_empty());
    drop(stdin);
    // The server serves others all along.
    let ok = srv
        .http()
        .get(&format!("{}/api/v1/health", srv.url))
        .call()
        .unwrap();
    assert_eq!(ok.status().as_u16(), 200);
}

/// Connects to 127.0.0.1:`port` without sending anything: true when the server closes the
/// connection (a read ends or fails before the 3 s read timeout), false when it holds it open
/// for those 3 s.
fn probe_is_closed_at_once(port: u16) -> bool {
    let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut buf = [0u8; 8];
    match c.read(&mut buf) {
        Ok(0) => true,
        Ok(_) => false,
        Err(e) => !matches!(
            e.kind(),
            std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
        ),
    }
}

#[test]
fn connections_and_requests_are_limited_per_address_and_per_device() {
    let dir = Scratch::new("trust-limits");
    let srv = Server::start(
        &dir.join("srv"),
        // The header timeout is far longer than the test, so the three held connections stay
        // open until the test closes them (with the default 10 s a loaded machine could see
        // them timed out by the server before the fourth is asked for).
        &[
            "--conns-per-address",
            "3",
            "--rate-per-address",
            "5",
            "--header-timeout",
            "600",
        ],
    );
    // Four connections at once: the server turns exactly one of them away (closes it), whichever
    // it counted fourth (it counts each in its own task, so not always the last one opened),
    // and holds the other three open.
    let conns: Vec<_> = (0..4)
        .map(|_| {
            let c = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
            c.set_nonblocking(true).unwrap();
            c
        })
        .collect();
    let closed = |conns: &[std::net::TcpStream]| -> Vec<usize> {
        let mut buf = [0u8; 8];
        (0..conns.len())
            .filter(|i| match conns[*i].peek(&mut buf) {
                Ok(n) => n == 0,
                Err(e) => e.kind() != std::io::ErrorKind::WouldBlock,
            })
            .collect()
    };
    let asked = Instant::now();
    while closed(&conns).is_empty() {
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "none of four connections from one address was turned away"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // A moment more for a wrongly closed second one to show.
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        closed(&conns).len(),
        1,
        "exactly one of four connections is turned away when three are allowed"
    );
    drop(conns);
    // And counts them off when it sees them closed: ask until a connection is held again.
    let asked = Instant::now();
    while probe_is_closed_at_once(srv.port) {
        assert!(
            asked.elapsed() < Duration::from_secs(60),
            "connections are still refused after the held ones closed"
        );
    }
    // Requests: 5 per second with bursts of 20; a flood is answered 429.
    let http = srv.http();
    let url = format!("{}/api/v1/health", srv.url);
    let codes: Vec<u16> = (0..60)
        .map(|_| http.get(&url).call().unwrap().status().as_u16())
        .collect();
    assert!(codes.iter().take(10).all(|c| *c == 200), "{codes:?}");
    assert!(codes.contains(&429), "{codes:?}");
    drop(srv);

    // Per device: one device's flood of progress reports is cut off, others carry on.
    let srv = Server::start(
        &dir.join("srv2"),
        &["--rate-per-device", "2", "--rate-per-address", "0"],
    );
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--reboot"]);
    let a = enrol(&srv, MAC_A, 1 << 30);
    let b = enrol(&srv, MAC_B, 1 << 30);
    let task = task_of(&post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&a)).unwrap());
    let mut limited = 0;
    for seq in 1..40u64 {
        let p = ProgressReport {
            seq,
            bytes: seq,
            ..Default::default()
        };
        match srv
            .client()
            .post::<_, serde_json::Value>(&progress_path(task.id), Some(&a), &p)
        {
            Ok(_) => {}
            Err(e) => {
                assert_eq!(status(&e), 429, "{e}");
                limited += 1;
            }
        }
    }
    assert!(limited > 0);
    post_checkin(&srv, &checkin_req(MAC_B, 1 << 30, None), Some(&b)).unwrap();
}

#[test]
fn ignored_duplicate_results_are_counted_not_stored() {
    let dir = Scratch::new("trust-results");
    let srv = Server::start(&dir.join("srv"), &["--rate-per-device", "0"]);
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--reboot"]);
    let a = enrol(&srv, MAC_A, 1 << 30);
    let task = task_of(&post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), Some(&a)).unwrap());
    let result = |report: String| TaskResult {
        task: task.id,
        report,
        outcome: Outcome::Succeeded,
        message: None,
        transcript: vec!["x".repeat(4000); 200],
        image: None,
        bytes: 0,
        finished: 0,
    };
    let client = srv.client();
    let first: serde_json::Value = client
        .post(&result_path(task.id), Some(&a), &result("r-first".into()))
        .unwrap();
    assert_eq!(first["recorded"], true);
    let db = srv.data.join("imgserver.db");
    let size_after_first = fs::metadata(&db).unwrap().len()
        + fs::metadata(srv.data.join("imgserver.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    for n in 0..50 {
        let r: serde_json::Value = client
            .post(&result_path(task.id), Some(&a), &result(format!("r-{n}")))
            .unwrap();
        assert_eq!(r["recorded"], false);
    }
    let store = imgserver::store::SqliteStore::open(&db).unwrap();
    use imgserver::store::Store;
    assert_eq!(
        store.result_count().unwrap(),
        1,
        "only the first result is kept"
    );
    let lines = store.transcript(MAC_A, Some(task.id)).unwrap();
    assert_eq!(
        lines.iter().filter(|l| l.2.contains("ignored")).count(),
        1,
        "{lines:?}"
    );
    // 50 results of 800 KB each did not grow the database by anything like 40 MB.
    let size_now = fs::metadata(&db).unwrap().len()
        + fs::metadata(srv.data.join("imgserver.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    assert!(
        size_now < size_after_first + 4 * MIB,
        "{size_after_first} -> {size_now}"
    );
    let job = srv.admin(&["job", "1"]);
    assert!(job.contains("50 later result(s) ignored"), "{job}");
}

#[test]
fn data_files_are_private() {
    let dir = Scratch::new("trust-modes");
    let data = dir.join("srv");
    fs::create_dir_all(&data).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    let srv = Server::start(&data, &[]);
    enrol(&srv, MAC_A, 1 << 30);
    let mode = |p: &Path| fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(&data), 0o700);
    for f in [
        "imgserver.db",
        "imgserver.db-wal",
        "imgserver.db-shm",
        "ca.key",
        "server.key",
        "enrol.key",
        "url.key",
    ] {
        assert_eq!(mode(&data.join(f)), 0o600, "{f}");
    }
    assert_eq!(mode(&data.join("repo")), 0o700);
    assert_eq!(mode(&data.join("incoming")), 0o700);
    // A registered image is private in the repository whatever the source file's mode.
    tools();
    let img = make_image(&dir, "os", "1");
    fs::set_permissions(&img, fs::Permissions::from_mode(0o644)).unwrap();
    srv.admin(&["image", "add", img.to_str().unwrap()]);
    assert_eq!(mode(&data.join("repo/os-1.img")), 0o600);
    // An older installation's wider database is tightened when it is opened.
    drop(srv);
    fs::set_permissions(data.join("imgserver.db"), fs::Permissions::from_mode(0o644)).unwrap();
    fs::set_permissions(&data, fs::Permissions::from_mode(0o755)).unwrap();
    admin(&data, &["devices"]);
    assert_eq!(mode(&data.join("imgserver.db")), 0o600);
    assert_eq!(mode(&data), 0o700);
}

#[test]
fn open_enrolment_is_a_lab_setting_that_must_be_asked_for() {
    let dir = Scratch::new("trust-open");
    let srv = Server::start(&dir.join("srv"), &["--open-enrolment"]);
    let r = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), None).unwrap();
    assert!(!r.pending_approval && r.credential.is_some(), "{r:?}");
    // It still never hands a second credential for an enrolled MAC.
    let e = post_checkin(&srv, &checkin_req(MAC_A, 1 << 30, None), None).unwrap_err();
    assert_eq!(status(&e), 409, "{e}");
}
