//! The admin API end to end: the real `imgserver serve` on loopback with TLS from its own
//! `init`, driven with curl (pinning the server's CA) as an administrator's script or the
//! web console would; devices are protocol clients checking in over the same listener; the
//! image is a real one (a GPT disk with FAT made by sgdisk, mkfs.fat and mtools, captured
//! by the engine) uploaded through the API.
//!
//! What it proves (issue 13): every admin route refuses a missing, wrong, revoked or
//! under-privileged token, and a device credential; an admin token never acts as a device;
//! jobs at a time reach only devices checking in inside their window; seed 003's validation
//! errors keep a device out of a job while warnings do not; validate-only creates nothing;
//! the audit trail records who did what; multicast sessions start, list and stop through the
//! API as through `imgserver session` (issue 12), refusing bad requests with a reason.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::server::{capture_image, fat16_source_disk, parse_curl};
use e2e::{require_tool, sample_bytes, Scratch};
use imgserver::protocol::{
    CheckIn, DeviceIdentity, DiskReport, ImageStamp, Outcome, PartitionReport, TaskResult,
    CHECKIN_PATH, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;

/// `imgserver serve` with TLS on 127.0.0.1 (tests/src/server.rs); killed on drop.
struct Server(e2e::server::Server);

impl std::ops::Deref for Server {
    type Target = e2e::server::Server;
    fn deref(&self) -> &e2e::server::Server {
        &self.0
    }
}

impl Server {
    fn start(data: &Path) -> Server {
        Server(e2e::server::Server::start(
            data,
            &[
                "--listen",
                "127.0.0.1:0",
                "--interval",
                "7",
                // The table-driven test sends a few hundred requests at once.
                "--rate-per-address",
                "0",
            ],
        ))
    }

    /// One HTTPS request with curl: (status, JSON body or Null).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (status, text) = self.call_text(method, path, token, body);
        (status, json_or_null(&text))
    }

    fn get(&self, path: &str, token: &str) -> Value {
        let (s, v) = self.call("GET", path, Some(token), None);
        assert_eq!(s, 200, "GET {path}: {v}");
        v
    }

    /// Upload an image file through the admin API.
    fn upload(&self, token: &str, file: &Path, query: &str) -> (u16, Value) {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "120", "--cacert"])
            .arg(self.data.join("ca.pem"))
            .arg("-H")
            .arg(format!("Authorization: Bearer {token}"))
            .arg("--upload-file")
            .arg(file)
            .args(["-w", "\n%{http_code}"])
            .arg(format!("{}/api/v1/admin/images/upload{query}", self.url))
            .output()
            .unwrap();
        let (status, text) = parse_curl(out);
        (status, json_or_null(&text))
    }

    /// A device check-in (protocol v1) with `cred` (None: enrol with the site secret).
    fn checkin(&self, req: &CheckIn, cred: Option<&str>) -> (u16, Value) {
        self.call(
            "POST",
            CHECKIN_PATH,
            cred,
            Some(&serde_json::to_value(req).unwrap()),
        )
    }

    /// Check in as an enrolled device: the task id handed over, if any.
    fn task_for(&self, dev: &CheckIn, cred: &str) -> Option<u64> {
        let (s, v) = self.checkin(dev, Some(cred));
        assert_eq!(s, 200, "{v}");
        match v["action"]["action"].as_str() {
            Some("run") => Some(v["action"]["task"]["id"].as_u64().unwrap()),
            Some("wait") => None,
            other => panic!("action {other:?} in {v}"),
        }
    }
}

/// A response body as JSON, or Null when it is not JSON.
fn json_or_null(text: &str) -> Value {
    serde_json::from_str(text).unwrap_or(Value::Null)
}

/// A device with one disk `disk_size` bytes big; its disk carries `stamp` if given.
fn device(mac: &str, disk_size: u64, stamp: Option<(&str, &str)>) -> CheckIn {
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            serial: Some(format!("SN-{mac}")),
            model: Some("Z90".into()),
            ram_bytes: 2 << 30,
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "disk0".into(),
            size: disk_size,
            table: "gpt".into(),
            image: stamp.map(|(n, v)| ImageStamp {
                name: n.into(),
                version: v.into(),
            }),
            partitions: vec![PartitionReport {
                number: 1,
                size: disk_size / 2,
                ..Default::default()
            }],
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// A real whole-disk image: a 48 MiB GPT disk with one FAT16 partition, captured.
fn make_image(dir: &Scratch, name: &str, version: &str) -> PathBuf {
    for t in ["sgdisk", "mkfs.fat", "mcopy", "curl"] {
        require_tool(t);
    }
    let disk = dir.join(format!("{name}-{version}-source.img"));
    let blob = sample_bytes(7, 256 << 10);
    fat16_source_disk(dir.path(), &disk, 48, &format!("{name} {version}\n"), &blob);
    let img = dir.join(format!("{name}-{version}.img"));
    capture_image(&disk, None, name, version, &img);
    img
}

/// Every admin route with the least role that may use it. The targets do not exist where
/// the call would change something, so the allowed calls answer 404 / 400 / 409, never
/// 401 / 403.
fn routes() -> Vec<(&'static str, &'static str, &'static str, Option<Value>)> {
    let mac = "52:54:00:00:0f:ff";
    let job = json!({"target": format!("mac:{mac}"), "kind": "reboot", "validate_only": true});
    vec![
        ("GET", "/api/v1/admin/whoami", "viewer", None),
        ("GET", "/api/v1/admin/devices", "viewer", None),
        (
            "GET",
            "/api/v1/admin/devices?state=operational&q=52",
            "viewer",
            None,
        ),
        (
            "GET",
            "/api/v1/admin/devices/52:54:00:00:0f:ff",
            "viewer",
            None,
        ),
        (
            "GET",
            "/api/v1/admin/devices/52:54:00:00:0f:ff/transcript",
            "viewer",
            None,
        ),
        (
            "POST",
            "/api/v1/admin/devices/52:54:00:00:0f:ff/operational",
            "operator",
            None,
        ),
        (
            "PUT",
            "/api/v1/admin/devices/52:54:00:00:0f:fe/group",
            "operator",
            Some(json!({"group": "probe"})),
        ),
        (
            "POST",
            "/api/v1/admin/devices/52:54:00:00:0f:ff/approve",
            "admin",
            None,
        ),
        (
            "DELETE",
            "/api/v1/admin/devices/52:54:00:00:0f:ff",
            "admin",
            None,
        ),
        ("GET", "/api/v1/admin/images", "viewer", None),
        (
            "POST",
            "/api/v1/admin/images",
            "admin",
            Some(json!({"url": "ftp://nowhere/x.img"})),
        ),
        ("PUT", "/api/v1/admin/images/upload", "admin", None),
        (
            "DELETE",
            "/api/v1/admin/images/nosuchimage:0",
            "admin",
            None,
        ),
        ("GET", "/api/v1/admin/jobs", "viewer", None),
        ("POST", "/api/v1/admin/jobs", "viewer", Some(job.clone())),
        (
            "POST",
            "/api/v1/admin/jobs",
            "operator",
            Some(json!({"target": "macs:52:54:00:00:0f:ff", "kind": "reboot"})),
        ),
        ("POST", "/api/v1/admin/jobs/validate", "viewer", Some(job)),
        ("GET", "/api/v1/admin/jobs/999999", "viewer", None),
        ("DELETE", "/api/v1/admin/jobs/999999", "operator", None),
        ("POST", "/api/v1/admin/jobs/999999/abort", "operator", None),
        ("POST", "/api/v1/admin/jobs/999999/retry", "operator", None),
        (
            "POST",
            "/api/v1/admin/jobs/999999/rollback",
            "operator",
            None,
        ),
        ("GET", "/api/v1/admin/sessions", "viewer", None),
        (
            "POST",
            "/api/v1/admin/sessions",
            "operator",
            Some(json!({"name": "probe", "image": "nosuchimage:0", "all": true})),
        ),
        (
            "POST",
            "/api/v1/admin/sessions/nosuchsession/stop",
            "operator",
            None,
        ),
        ("GET", "/api/v1/admin/audit", "viewer", None),
        ("GET", "/api/v1/admin/tokens", "admin", None),
        (
            "POST",
            "/api/v1/admin/tokens",
            "admin",
            Some(json!({"name": "", "role": "viewer"})),
        ),
        ("DELETE", "/api/v1/admin/tokens/nosuchtoken", "admin", None),
    ]
}

#[test]
fn every_route_refuses_missing_wrong_revoked_underprivileged_tokens_and_device_credentials() {
    let dir = Scratch::new("admin-api-auth");
    let srv = Server::start(&dir.join("data"));
    let viewer = srv.token("v", "viewer");
    let operator = srv.token("o", "operator");
    let root = srv.token("root", "admin");
    let revoked = srv.token("gone", "admin");
    srv.admin(&["admin", "revoke", "gone"]);
    let dev = device("52:54:00:00:0f:01", 1 << 30, None);
    let device_cred = srv.enrol(&dev);
    let wrong = format!("imgadm_{}", "ab".repeat(32));
    let rank = |r: &str| {
        ["viewer", "operator", "admin"]
            .iter()
            .position(|x| *x == r)
            .unwrap()
    };
    let tokens = [
        ("viewer", &viewer),
        ("operator", &operator),
        ("admin", &root),
    ];
    let mut checked = 0;
    for (method, path, need, body) in routes() {
        for (what, tok) in [
            ("no token", None),
            ("a wrong token", Some(wrong.as_str())),
            ("a revoked token", Some(revoked.as_str())),
            ("a device credential", Some(device_cred.as_str())),
            ("a non-bearer header", Some("")),
        ] {
            let (s, v) = srv.call(method, path, tok, body.as_ref());
            assert_eq!(s, 401, "{method} {path} with {what}: {v}");
            assert!(v["error"].as_str().is_some_and(|e| !e.is_empty()), "{v}");
            checked += 1;
        }
        for (role, tok) in tokens {
            let (s, v) = srv.call(method, path, Some(tok), body.as_ref());
            if rank(role) < rank(need) {
                assert_eq!(s, 403, "{method} {path} as {role} (needs {need}): {v}");
                assert!(v["error"].as_str().unwrap().contains(need), "{v}");
            } else {
                assert!(
                    s != 401 && s != 403,
                    "{method} {path} as {role} (needs {need}) was refused: {s} {v}"
                );
            }
            checked += 1;
        }
    }
    println!(
        "{checked} admin requests checked over {} routes",
        routes().len()
    );
    // The role filter on `POST /jobs`: validate-only is a read, creating is not.
    let probe = json!({"target": "mac:52:54:00:00:0f:01", "kind": "reboot"});
    let (s, _) = srv.call("POST", "/api/v1/admin/jobs", Some(&viewer), Some(&probe));
    assert_eq!(s, 403);
    // Admin tokens never act as a device: not at check-in, not on a task.
    let (s, v) = srv.checkin(&dev, Some(&root));
    assert_eq!(s, 401, "{v}");
    let (s, v) = srv.call("GET", "/api/v1/tasks/1", Some(&root), None);
    assert_eq!(s, 401, "{v}");
    // The device is still itself.
    assert_eq!(srv.task_for(&dev, &device_cred), None);
    // whoami names the token.
    assert_eq!(
        srv.get("/api/v1/admin/whoami", &operator),
        json!({"name": "o", "role": "operator"})
    );
}

#[test]
fn jobs_at_a_time_reach_only_devices_checking_in_inside_the_window() {
    let dir = Scratch::new("admin-api-window");
    let srv = Server::start(&dir.join("data"));
    let op = srv.token("planner", "operator");
    let dev = device("52:54:00:00:0e:01", 1 << 30, None);
    let cred = srv.enrol(&dev);
    let mac = &dev.device.mac;
    let job = |at: &str, until: Option<&str>| {
        let mut b =
            json!({"target": format!("mac:{mac}"), "kind": "reboot", "at": at, "tz": "Asia/Tokyo"});
        if let Some(u) = until {
            b["until"] = json!(u);
        }
        let (s, v) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&b));
        assert_eq!(s, 201, "{v}");
        v["job"].as_u64().unwrap()
    };
    // Tomorrow's window: the device checking in now waits.
    let later = job("+1d", Some("+2d"));
    let closing = job("now", Some("+3s"));
    let j = srv.get(&format!("/api/v1/admin/jobs/{later}?tz=Asia/Tokyo"), &op);
    assert_eq!(j["window"]["window"], "not_yet", "{j}");
    assert!(j["at_text"].as_str().unwrap().ends_with(" JST"), "{j}");
    assert!(
        j["tasks"][0]["waiting"]
            .as_str()
            .unwrap()
            .contains("window"),
        "{j}"
    );
    // Past the end of the closing window before the device checks in: it gets nothing.
    std::thread::sleep(std::time::Duration::from_secs(4));
    assert_eq!(srv.task_for(&dev, &cred), None, "outside every window");
    let j = srv.get(&format!("/api/v1/admin/jobs/{closing}"), &op);
    assert_eq!(j["window"]["window"], "closed", "{j}");
    assert_eq!(j["tasks"][0]["state"], "pending", "{j}");
    assert!(
        j["tasks"][0]["waiting"]
            .as_str()
            .unwrap()
            .contains("closed"),
        "{j}"
    );
    // An open window (started long ago, ends in an hour): the device checking in gets it.
    let open = {
        let b = json!({"target": format!("mac:{mac}"), "kind": "reboot", "at": "2000-01-01T00:00:00Z", "until": "+1h"});
        let (s, v) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&b));
        assert_eq!(s, 201, "{v}");
        v["job"].as_u64().unwrap()
    };
    let t = srv.task_for(&dev, &cred).expect("a task inside the window");
    let j = srv.get(&format!("/api/v1/admin/jobs/{open}"), &op);
    assert_eq!(
        j["tasks"][0]["task"], t,
        "the task came from the open window: {j}"
    );
    assert_eq!(j["tasks"][0]["state"], "sent", "{j}");
    for waiting in [later, closing] {
        let j = srv.get(&format!("/api/v1/admin/jobs/{waiting}"), &op);
        assert_eq!(j["tasks"][0]["state"], "pending", "{j}");
    }
    // A window that ends before it starts, or is over, is refused with the way out.
    let bad =
        json!({"target": format!("mac:{mac}"), "kind": "reboot", "at": "+2h", "until": "+1h"});
    let (s, v) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&bad));
    assert_eq!(s, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("--until"), "{v}");
    let bad = json!({"target": format!("mac:{mac}"), "kind": "reboot", "at": "2026-02-30 07:00"});
    let (s, v) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&bad));
    assert_eq!(s, 400, "{v}");
    // The command line: --at and --until in the administrator's zone, shown back in it.
    let out = srv.admin(&[
        "schedule",
        "add",
        "--mac",
        mac,
        "--reboot",
        "--at",
        "2099-01-01 09:00",
        "--until",
        "2099-01-01 10:00",
        "--tz",
        "Asia/Tokyo",
    ]);
    assert!(
        out.contains("from 2099-01-01 09:00:00 JST until 2099-01-01 10:00:00 JST"),
        "{out}"
    );
    let out = srv.admin(&["jobs", "--tz", "UTC"]);
    assert!(
        out.contains("from 2099-01-01 00:00:00 UTC until 2099-01-01 01:00:00 UTC"),
        "{out}"
    );
    assert_eq!(
        srv.task_for(&dev, &cred),
        Some(t),
        "the unfinished task is resent; the 2099 one waits"
    );
}

#[test]
fn validation_errors_block_a_device_warnings_do_not_and_validate_only_creates_nothing() {
    let dir = Scratch::new("admin-api-validation");
    let srv = Server::start(&dir.join("data"));
    let root = srv.token("root", "admin");
    let op = srv.token("alice", "operator");
    // A real image, uploaded through the API; it wants more RAM than the devices have.
    let img = make_image(&dir, "os", "5");
    let (s, v) = srv.upload(&root, &img, &format!("?min_ram={}", 4u64 << 30));
    assert_eq!(s, 201, "{v}");
    assert_eq!(
        (v["name"].as_str(), v["version"].as_str()),
        (Some("os"), Some("5"))
    );
    // The role is checked before the body is read; a small body keeps curl from still
    // sending when the refusal arrives (an HTTP/2 stream reset, curl error 92, under load).
    let tiny = dir.join("tiny.img");
    std::fs::write(&tiny, b"not read").unwrap();
    let (s, v) = srv.upload(&op, &tiny, "");
    assert_eq!(s, 403, "an operator does not manage images: {v}");
    // big: 1 GiB disk already holding os 5 (warnings: RAM, same version);
    // small: an 8 MiB disk (error: not enough space at the install location).
    let big = device("52:54:00:00:0d:01", 1 << 30, Some(("os", "5")));
    let small = device("52:54:00:00:0d:02", 8 * MIB, None);
    let (cb, cs) = (srv.enrol(&big), srv.enrol(&small));
    for d in [&big, &small] {
        let (s, v) = srv.call(
            "PUT",
            &format!("/api/v1/admin/devices/{}/group", d.device.mac),
            Some(&op),
            Some(&json!({"group": "floor3"})),
        );
        assert_eq!(s, 200, "{v}");
    }
    let req = json!({"target": "group:floor3", "kind": "deploy", "image": "os:5",
                     "options": {"on_error": "continue"}, "note": "quarterly"});
    // Validate only, both ways: the table, and nothing created.
    let jobs_before = srv.get("/api/v1/admin/jobs", &op).as_array().unwrap().len();
    let audit_before = srv
        .get("/api/v1/admin/audit", &op)
        .as_array()
        .unwrap()
        .len();
    let (s, table) = srv.call("POST", "/api/v1/admin/jobs/validate", Some(&op), Some(&req));
    assert_eq!(s, 200, "{table}");
    let mut vo = req.clone();
    vo["validate_only"] = json!(true);
    let (s, table2) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&vo));
    assert_eq!(s, 200, "{table2}");
    assert_eq!(table, table2);
    assert!(table["job"].is_null(), "{table}");
    let rows = table["validation"].as_array().unwrap();
    let row = |mac: &str| rows.iter().find(|r| r["mac"] == mac).unwrap().clone();
    let b = row(&big.device.mac);
    assert_eq!(b["status"], "warning", "{b}");
    let warn = b["warnings"].to_string();
    assert!(
        warn.contains("RAM") && warn.contains("same as or older"),
        "{warn}"
    );
    let sm = row(&small.device.mac);
    assert_eq!(sm["status"], "error", "{sm}");
    assert!(
        sm["errors"].to_string().contains("not enough space"),
        "{sm}"
    );
    assert_eq!(table["blocked"], json!([small.device.mac]));
    assert_eq!(
        srv.get("/api/v1/admin/jobs", &op).as_array().unwrap().len(),
        jobs_before
    );
    assert_eq!(
        srv.get("/api/v1/admin/audit", &op)
            .as_array()
            .unwrap()
            .len(),
        audit_before
    );
    let out = srv.admin(&[
        "schedule",
        "add",
        "--group",
        "floor3",
        "--image",
        "os:5",
        "--validate-only",
    ]);
    assert!(
        out.contains("nothing was created") && out.contains("not enough space"),
        "{out}"
    );
    assert_eq!(
        srv.get("/api/v1/admin/jobs", &op).as_array().unwrap().len(),
        jobs_before
    );

    // Created: the small device is kept out, the big one (warnings only) gets the work.
    let (s, made) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&req));
    assert_eq!(s, 201, "{made}");
    assert_eq!(made["blocked"], json!([small.device.mac]));
    let id = made["job"].as_u64().unwrap();
    let job = srv.get(&format!("/api/v1/admin/jobs/{id}"), &op);
    let task_of = |mac: &str| {
        job["tasks"]
            .as_array()
            .unwrap()
            .iter()
            .find(|t| t["mac"] == mac)
            .unwrap()
            .clone()
    };
    assert_eq!(task_of(&small.device.mac)["state"], "rejected", "{job}");
    assert_eq!(task_of(&big.device.mac)["state"], "pending", "{job}");
    assert_eq!(
        srv.task_for(&small, &cs),
        None,
        "blocked by its validation error"
    );
    let t = srv
        .task_for(&big, &cb)
        .expect("warnings do not stop the job");
    assert_eq!(task_of(&big.device.mac)["task"], t);

    // Install location missing on the only device of a fixed target: 422, nothing created.
    let n = srv.get("/api/v1/admin/jobs", &op).as_array().unwrap().len();
    let missing = json!({"target": format!("mac:{}", big.device.mac), "kind": "deploy",
                         "image": "os:5", "options": {"disk": "disk9"}});
    let (s, v) = srv.call("POST", "/api/v1/admin/jobs", Some(&op), Some(&missing));
    assert_eq!(s, 422, "{v}");
    assert!(
        v["error"]
            .as_str()
            .unwrap()
            .contains("disk disk9 does not exist"),
        "{v}"
    );
    assert_eq!(v["validation"][0]["status"], "error", "{v}");
    assert_eq!(
        srv.get("/api/v1/admin/jobs", &op).as_array().unwrap().len(),
        n
    );
}

#[test]
fn audit_records_who_changed_what_through_abort_retry_and_the_cli() {
    let dir = Scratch::new("admin-api-audit");
    let srv = Server::start(&dir.join("data"));
    let alice = srv.token("alice", "operator");
    let bob = srv.token("bob", "viewer");
    let a = device("52:54:00:00:0c:01", 1 << 30, None);
    let b = device("52:54:00:00:0c:02", 1 << 30, None);
    let (ca, cb) = (srv.enrol(&a), srv.enrol(&b));
    // Sequential reboot job over both: a gets it first and fails; b waits its turn.
    let req = json!({"target": format!("macs:{},{}", a.device.mac, b.device.mac), "kind": "reboot",
                     "options": {"batch": 1, "on_error": "continue"}});
    let (s, made) = srv.call("POST", "/api/v1/admin/jobs", Some(&alice), Some(&req));
    assert_eq!(s, 201, "{made}");
    let id = made["job"].as_u64().unwrap();
    let ta = srv.task_for(&a, &ca).expect("a's task");
    assert_eq!(srv.task_for(&b, &cb), None, "sequential: b waits for a");
    let result = TaskResult {
        task: ta,
        report: "r-a-1".into(),
        outcome: Outcome::Failed,
        message: Some("power cut".into()),
        transcript: vec!["rebooting".into()],
        image: None,
        bytes: 0,
        finished: 0,
    };
    let (s, v) = srv.call(
        "POST",
        &format!("/api/v1/tasks/{ta}/result"),
        Some(&ca),
        Some(&serde_json::to_value(&result).unwrap()),
    );
    assert_eq!(s, 200, "{v}");
    // Abort: b has not started, so it is cancelled.
    let (s, v) = srv.call(
        "POST",
        &format!("/api/v1/admin/jobs/{id}/abort"),
        Some(&alice),
        None,
    );
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["cancelled"], 1, "{v}");
    assert_eq!(srv.task_for(&b, &cb), None, "aborted");
    let (s, _) = srv.call(
        "POST",
        &format!("/api/v1/admin/jobs/{id}/retry"),
        Some(&bob),
        None,
    );
    assert_eq!(s, 403, "a viewer does not retry");
    // Retry: a new job over the failed and the aborted device.
    let (s, retry) = srv.call(
        "POST",
        &format!("/api/v1/admin/jobs/{id}/retry"),
        Some(&alice),
        None,
    );
    assert_eq!(s, 200, "{retry}");
    let rid = retry["job"].as_u64().unwrap();
    assert_eq!(retry["validation"].as_array().unwrap().len(), 2, "{retry}");
    let jobs = srv.get("/api/v1/admin/jobs", &bob);
    let by_id = |j: u64| {
        jobs.as_array()
            .unwrap()
            .iter()
            .find(|x| x["id"] == j)
            .unwrap()
            .clone()
    };
    assert_eq!(by_id(id)["changed_by"], "alice");
    assert_eq!(by_id(id)["state"], "aborted");
    assert_eq!(by_id(rid)["changed_by"], "alice");
    assert_eq!(by_id(rid)["note"], format!("retry of job {id}"));
    // The device's page: history with who, and the transcript.
    let dev = srv.get(&format!("/api/v1/admin/devices/{}", a.device.mac), &bob);
    assert_eq!(dev["history"][0]["job"], rid, "{dev}");
    assert_eq!(dev["history"][1]["changed_by"], "alice", "{dev}");
    assert_eq!(dev["history"][1]["state"], "failed", "{dev}");
    let tr = srv.get(
        &format!("/api/v1/admin/devices/{}/transcript", a.device.mac),
        &bob,
    );
    assert!(tr.to_string().contains("device: rebooting"), "{tr}");
    // Set Operational from the host: recorded as the host's user.
    srv.admin(&["device", &a.device.mac, "--operational"]);
    let audit = srv.get(&format!("/api/v1/admin/audit?target=job:{id}"), &bob);
    let seen: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["action"].as_str().unwrap().into(),
                r["actor"].as_str().unwrap().into(),
            )
        })
        .collect();
    assert_eq!(
        seen,
        vec![
            ("job.abort".to_string(), "alice".to_string()),
            ("job.create".to_string(), "alice".to_string())
        ]
    );
    let all = srv.get("/api/v1/admin/audit?tz=UTC", &bob);
    let op = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "device.operational")
        .expect("the CLI's change is audited")
        .clone();
    assert!(op["actor"].as_str().unwrap().starts_with("host:"), "{op}");
    assert_eq!(op["target"], format!("device:{}", a.device.mac));
    assert!(op["at_text"].as_str().unwrap().ends_with(" UTC"), "{op}");
    let retry_rec = all
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["action"] == "job.retry")
        .unwrap();
    assert_eq!(retry_rec["actor"], "alice");
    assert_eq!(retry_rec["target"], format!("job:{rid}"));
    let cli = srv.admin(&["admin", "audit", "--target", &format!("job:{id}")]);
    assert!(cli.contains("job.abort") && cli.contains("alice"), "{cli}");
    // Revoked: alice can no longer act, and the trail keeps her name.
    srv.admin(&["admin", "revoke", "alice"]);
    let (s, _) = srv.call("GET", "/api/v1/admin/jobs", Some(&alice), None);
    assert_eq!(s, 401);
}

#[test]
fn images_register_from_a_url_and_an_upload_and_are_removed_by_an_admin() {
    let dir = Scratch::new("admin-api-images");
    let srv = Server::start(&dir.join("data"));
    let root = srv.token("root", "admin");
    let op = srv.token("op", "operator");
    let web = dir.join("web");
    fs::create_dir_all(&web).unwrap();
    let img = make_image(&dir, "os", "6");
    fs::copy(&img, web.join("os-6.img")).unwrap();
    let nginx = e2e::Nginx::serve(&web);
    let body = json!({"url": nginx.url("os-6.img")});
    let (s, v) = srv.call("POST", "/api/v1/admin/images", Some(&op), Some(&body));
    assert_eq!(s, 403, "{v}");
    let (s, v) = srv.call("POST", "/api/v1/admin/images", Some(&root), Some(&body));
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["url"], nginx.url("os-6.img"), "{v}");
    // The same image uploaded under the same name and version is a conflict.
    let (s, v) = srv.upload(&root, &img, "");
    assert_eq!(s, 409, "{v}");
    // A file that is not an image is refused and leaves nothing behind.
    fs::write(dir.join("junk.img"), b"not an image at all").unwrap();
    let (s, v) = srv.upload(&root, &dir.join("junk.img"), "");
    assert_eq!(s, 400, "{v}");
    let incoming = fs::read_dir(srv.data.join("incoming"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(incoming, 0, "half-registered uploads are removed");
    let list = srv.get("/api/v1/admin/images?tz=UTC", &op);
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert!(
        list[0]["added_text"].as_str().unwrap().ends_with(" UTC"),
        "{list}"
    );
    let (s, v) = srv.call("DELETE", "/api/v1/admin/images/os:6", Some(&op), None);
    assert_eq!(s, 403, "{v}");
    let (s, v) = srv.call("DELETE", "/api/v1/admin/images/os:6", Some(&root), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(srv.get("/api/v1/admin/images", &op), json!([]));
    let audit = srv.get("/api/v1/admin/audit", &op);
    let actions: Vec<&str> = audit
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["actor"] == "root")
        .map(|r| r["action"].as_str().unwrap())
        .collect();
    assert_eq!(actions, vec!["image.remove", "image.add"]);
}

/// Multicast sessions through the API: an operator starts one for a device (the serving
/// process becomes its master, here on the loopback interface), a viewer lists it with the
/// device's pending task, bad requests are refused with a reason and make nothing, and a stop
/// ends it and cancels the task; every change is audited under the operator's name.
#[test]
fn multicast_sessions_start_list_and_stop_through_the_api() {
    let dir = Scratch::new("admin-api-sessions");
    let srv = Server::start(&dir.join("data"));
    let op = srv.token("olga", "operator");
    let viewer = srv.token("vic", "viewer");
    let root = srv.token("root", "admin");
    let img = make_image(&dir, "room", "1");
    let (s, v) = srv.upload(&root, &img, "");
    assert_eq!(s, 201, "{v}");
    let dev = device("52:54:00:00:5e:01", 1 << 30, None);
    let cred = srv.enrol(&dev);
    let post =
        |body: &Value, tok: &str| srv.call("POST", "/api/v1/admin/sessions", Some(tok), Some(body));
    // Refused with a reason, and nothing made.
    for (body, status, says) in [
        (
            json!({"name": "two words", "image": "room:1", "all": true}),
            400,
            "session name",
        ),
        (
            json!({"name": "r", "image": "", "all": true}),
            400,
            "needs an image",
        ),
        (
            json!({"name": "r", "image": "room:1"}),
            400,
            "MAC addresses",
        ),
        (
            json!({"name": "r", "image": "room:1", "all": true, "macs": ["52:54:00:00:5e:01"]}),
            400,
            "not both",
        ),
        (
            json!({"name": "r", "image": "room:1", "macs": ["nope"]}),
            400,
            "not a MAC",
        ),
        (
            json!({"name": "r", "image": "room:1", "all": true, "clients": 0}),
            400,
            "at least 1",
        ),
        (
            json!({"name": "r", "image": "room:1", "all": true, "addr": "10.0.0.1"}),
            400,
            "multicast",
        ),
        (
            json!({"name": "r", "image": "room:9", "all": true}),
            404,
            "no image room:9",
        ),
    ] {
        let (s, v) = post(&body, &op);
        assert_eq!(s, status, "{body}: {v}");
        let e = v["error"].as_str().unwrap_or_default();
        assert!(e.contains(says), "{body}: {e}");
    }
    // An unknown field is not silently ignored.
    let (s, v) = post(
        &json!({"name": "r", "image": "room:1", "all": true, "clinets": 2}),
        &op,
    );
    assert!(s == 400 || s == 422, "{s} {v}");
    assert!(srv
        .get("/api/v1/admin/sessions", &viewer)
        .as_array()
        .unwrap()
        .is_empty());
    assert!(srv
        .get("/api/v1/admin/jobs", &viewer)
        .as_array()
        .unwrap()
        .is_empty());
    // Started by the operator for one device (MAC in another spelling), on loopback.
    let req = json!({"name": "room1", "image": "room:1", "macs": ["52-54-00-00-5E-01"],
                     "interface": "lo", "timeout_min": 30});
    let (s, made) = post(&req, &viewer);
    assert_eq!(s, 403, "{made}");
    let (s, made) = post(&req, &op);
    assert_eq!(s, 201, "{made}");
    let job = made["job"].as_u64().unwrap();
    assert_eq!(made["devices"], "52:54:00:00:5e:01");
    assert_eq!(made["image"], "room 1");
    assert!(
        made["starts"]
            .as_str()
            .unwrap()
            .contains("when 1 device(s) registered"),
        "{made}"
    );
    // The name is held while the session is not over.
    let (s, v) = post(&req, &op);
    assert_eq!(s, 409, "{v}");
    assert!(
        v["error"].as_str().unwrap().contains("stop it first"),
        "{v}"
    );
    // Listed for a viewer: the session, its image, its settings and the device's task.
    let list = srv.get("/api/v1/admin/sessions", &viewer);
    let one = &list[0];
    assert_eq!(list.as_array().unwrap().len(), 1, "{list}");
    assert_eq!(one["name"], "room1");
    assert_eq!(one["job"].as_u64(), Some(job));
    assert_eq!(one["image"], "room 1");
    assert_eq!(one["settings"]["clients"], 1);
    assert_eq!(one["settings"]["interface"], "lo");
    assert!(
        ["waiting", "running"].contains(&one["state"].as_str().unwrap()),
        "{one}"
    );
    assert_eq!(one["tasks"][0]["mac"], "52:54:00:00:5e:01");
    assert_eq!(one["tasks"][0]["state"], "pending");
    // The serving process takes it: its master waits for registrations.
    let taken = wait_for(&srv, &viewer, |s| {
        s["message"]
            .as_str()
            .unwrap_or("")
            .contains("master on lo (127.0.0.1)")
    });
    assert_eq!(taken["state"], "waiting", "{taken}");
    assert!(
        taken["message"]
            .as_str()
            .unwrap()
            .contains("0 of 1 device(s) registered"),
        "{taken}"
    );
    // Stopped by the operator: the pending task is cancelled, the session ends.
    let stop = "/api/v1/admin/sessions/room1/stop";
    let (s, v) = srv.call("POST", stop, Some(&viewer), None);
    assert_eq!(s, 403, "{v}");
    let (s, v) = srv.call("POST", stop, Some(&op), None);
    assert_eq!(s, 200, "{v}");
    assert_eq!(v["job"].as_u64(), Some(job));
    assert_eq!(v["cancelled"], 1, "{v}");
    let ended = wait_for(&srv, &viewer, |s| s["state"] == "stopped");
    assert_eq!(ended["tasks"][0]["state"], "aborted", "{ended}");
    assert!(
        ended["message"].as_str().unwrap().contains("administrator"),
        "{ended}"
    );
    assert_eq!(
        srv.task_for(&dev, &cred),
        None,
        "a stopped session hands out no task"
    );
    let (s, v) = srv.call("POST", stop, Some(&op), None);
    assert_eq!(s, 409, "{v}");
    let (s, v) = srv.call("POST", "/api/v1/admin/sessions/other/stop", Some(&op), None);
    assert_eq!(s, 404, "{v}");
    // Audited under the operator's name: the job made and its abort.
    let audit = srv.get(&format!("/api/v1/admin/audit?target=job:{job}"), &viewer);
    let seen: Vec<(String, String)> = audit
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["actor"].as_str().unwrap_or("").to_string(),
                e["action"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    for action in ["job.create", "job.abort"] {
        assert!(
            seen.iter().any(|(a, w)| a == "olga" && w == action),
            "{action} by olga: {seen:?}"
        );
    }
    // A finished session's name may be used again.
    let (s, v) = post(
        &json!({"name": "room1", "image": "room:1", "all": true, "interface": "lo"}),
        &op,
    );
    assert_eq!(s, 201, "{v}");
    let (s, v) = srv.call("POST", stop, Some(&op), None);
    assert_eq!(s, 200, "{v}");
}

/// The one session in the list once `ok` holds for it (30 s at most).
fn wait_for(srv: &Server, token: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let until = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let list = srv.get("/api/v1/admin/sessions", token);
        let s = list[0].clone();
        if ok(&s) {
            return s;
        }
        assert!(
            std::time::Instant::now() < until,
            "the session never got there: {s}"
        );
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
