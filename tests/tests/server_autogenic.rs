//! Seed 001's autogenic imaging, the server's side, end to end: the real `imgserver` binary
//! (`init`, `serve` with TLS on loopback, the administrator's commands), real partition
//! images (a FAT16 partition made by sgdisk, mkfs.fat and mtools, captured by the engine),
//! curl for the admin API and the PXE question, and devices simulated with the protocol
//! types checking in over HTTPS (their backup partition, BI progress and Maintenance as the
//! agent reports them).
//!
//! What it proves (issue 11, the server): a package whose image.rsp has `<BackupImage>`
//! registers an autogenic image (and a broken script is refused); each `schedule add` flag
//! hands the device exactly the task fields of the contract; every validation error names
//! the device and the way out; `imgserver devices` / `device MAC` / the admin API show the
//! backup partition's image, version and BI progress, and a reported Maintenance until a
//! check-in without it; `job N --rollback` re-images from the backup partition (PI) where it
//! holds the previous version and downloads elsewhere; the PXE answer for a PI is the local
//! disk.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use e2e::server::{capture_image, fat16_source_disk};
use e2e::{imgserver_admin, require_tool, sample_bytes, Scratch};
use imgserver::protocol::{
    Autogenic, CheckIn, DeviceIdentity, DiskReport, ImageStamp, Outcome, PartitionReport,
    TaskResult, CHECKIN_PATH, PROTOCOL_VERSION,
};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const A: &str = "52:54:00:11:00:0a";
const B: &str = "52:54:00:11:00:0b";
const C: &str = "52:54:00:11:00:0c";
const D: &str = "52:54:00:11:00:0d";

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
        imgserver_admin(data, &["init"]);
        // The PXE answer needs the agent's kernel and initrd to offer the agent; the
        // question here is only which answer a device gets, so stand-ins do.
        fs::create_dir_all(data.join("pxe")).unwrap();
        fs::write(data.join("pxe/vmlinuz"), b"kernel").unwrap();
        fs::write(data.join("pxe/initrd.img"), b"initrd").unwrap();
        Server(e2e::server::Server::start(
            data,
            &[
                "--listen",
                "127.0.0.1:0",
                "--interval",
                "7",
                "--rate-per-address",
                "0",
            ],
        ))
    }

    /// A new admin API token with `role` (printed alone on stdout).
    fn token(&self, role: &str) -> String {
        self.0.token(&format!("t-{role}"), role)
    }

    /// One HTTPS request with curl: (status, JSON body or the text).
    fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, Value) {
        let (status, text) = self.call_text(method, path, token, body);
        (status, json_or_text(text))
    }

    /// A check-in: the task handed over (its JSON), if any.
    fn checkin(&self, dev: &CheckIn, cred: &str) -> Option<Value> {
        let (s, v) = self.call(
            "POST",
            CHECKIN_PATH,
            Some(cred),
            Some(&serde_json::to_value(dev).unwrap()),
        );
        assert_eq!(s, 200, "{v}");
        match v["action"]["action"].as_str() {
            Some("run") => Some(v["action"]["task"].clone()),
            Some("wait") => None,
            other => panic!("action {other:?} in {v}"),
        }
    }

    /// Report a task's end (delivered with a check-in, as the agent's outbox does).
    fn finish(&self, dev: &CheckIn, cred: &str, task: &Value, image: Option<(&str, &str)>) {
        let mut d = dev.clone();
        d.results = vec![TaskResult {
            task: task["id"].as_u64().unwrap(),
            report: format!("r-{}", task["id"]),
            outcome: Outcome::Succeeded,
            message: None,
            transcript: vec!["done".into()],
            image: image.map(|(n, v)| ImageStamp {
                name: n.into(),
                version: v.into(),
            }),
            bytes: 0,
            finished: 0,
        }];
        let (s, v) = self.call(
            "POST",
            CHECKIN_PATH,
            Some(cred),
            Some(&serde_json::to_value(&d).unwrap()),
        );
        assert_eq!(s, 200, "{v}");
        assert_eq!(v["acked"].as_array().map(Vec::len), Some(1), "{v}");
    }

    /// The plain-text PXE answer for `mac`.
    fn pxe(&self, mac: &str) -> String {
        let out = Command::new("curl")
            .args(["-sS", "--max-time", "30", "--cacert"])
            .arg(self.data.join("ca.pem"))
            .arg(format!("{}/pxe/boot.ipxe?mac={mac}", self.url))
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    }
}

/// curl's answer (tests/src/server.rs): (status, JSON body or the text).
fn parse_curl(out: std::process::Output) -> (u16, Value) {
    let (status, text) = e2e::server::parse_curl(out);
    (status, json_or_text(text))
}

/// A response body as JSON, or the text when it is not JSON.
fn json_or_text(text: String) -> Value {
    serde_json::from_str(&text).unwrap_or(Value::String(text))
}

/// A backup partition: its size, the image there (name, version), verified bytes, size.
type Backup<'a> = (u64, Option<(&'a str, &'a str)>, u64, u64);

/// A device with `flash` bytes of flash laid out boot agent (1) / OS (2) with `os` stamped
/// on the OS partition; `backup`: (backup partition size, image there, verified bytes, its
/// size). A complete backup reports BackupImagePresent and BackImageVer as the agent does.
fn device(mac: &str, flash: u64, os: Option<(&str, &str)>, backup: Option<Backup>) -> CheckIn {
    let stamp = |(n, v): (&str, &str)| ImageStamp {
        name: n.into(),
        version: v.into(),
    };
    let mut a = Autogenic::default();
    let mut partitions = vec![
        PartitionReport {
            number: 1,
            size: 16 * MIB,
            fs: "fat32".into(),
            label: Some("IMGBOOT".into()),
            ..Default::default()
        },
        PartitionReport {
            number: 2,
            size: 512 * MIB,
            image: os.map(stamp),
            ..Default::default()
        },
    ];
    if let Some((part, image, bytes, size)) = backup {
        let complete = image.is_some() && bytes == size && size > 0;
        a = Autogenic {
            support_img_backup: true,
            backup_image_present: complete,
            back_image_ver: image.filter(|_| complete).map(|(_, v)| v.to_string()),
            backup_image: image.map(stamp),
            backup_bytes: bytes,
            backup_size: size,
            backup_partition_size: part,
        };
        partitions.push(PartitionReport {
            number: 3,
            size: part,
            fs: "fat32".into(),
            label: Some("IMGBACKUP".into()),
            ..Default::default()
        });
    }
    CheckIn {
        protocol: PROTOCOL_VERSION,
        device: DeviceIdentity {
            mac: mac.into(),
            model: Some("Z90".into()),
            ram_bytes: 2 << 30,
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "/dev/mmcblk0".into(),
            size: flash,
            table: "gpt".into(),
            partitions,
            boot_agent_partition: Some(1),
            ..Default::default()
        }],
        autogenic: a,
        // A current agent: it announces every task kind (convert included).
        task_kinds: Some(
            imgserver::protocol::ALL_TASK_KINDS
                .map(String::from)
                .to_vec(),
        ),
        ..Default::default()
    }
}

/// A real partition image: the FAT16 partition of a small GPT disk, captured.
fn partition_image(dir: &Scratch, name: &str, version: &str) -> PathBuf {
    for t in ["sgdisk", "mkfs.fat", "mcopy", "curl"] {
        require_tool(t);
    }
    let disk = dir.join(format!("{name}-{version}-source.img"));
    let blob = sample_bytes(version.len() as u64, 128 << 10);
    fat16_source_disk(dir.path(), &disk, 40, &format!("{name} {version}\n"), &blob);
    let img = dir.join(format!("{name}-{version}.img"));
    capture_image(&disk, Some("1"), name, version, &img);
    img
}

/// A package: a directory with the image file and its image.rsp.
fn package(dir: &Scratch, image: &Path, rsp: &[u8]) -> PathBuf {
    let p = dir.join(format!(
        "pkg-{}",
        image.file_stem().unwrap().to_string_lossy()
    ));
    fs::create_dir_all(&p).unwrap();
    fs::copy(image, p.join(image.file_name().unwrap())).unwrap();
    fs::write(p.join("image.rsp"), rsp).unwrap();
    p
}

/// Register autogenic `os` 1 and 2 (through packages) and an ordinary `plain` 1.
fn images(srv: &Server, dir: &Scratch) {
    for v in ["1", "2"] {
        let img = partition_image(dir, "os", v);
        let pkg = package(dir, &img, b"<Package>\r\n<BackupImage>\r\n</Package>\r\n");
        let out = srv.admin(&["image", "add", pkg.to_str().unwrap()]);
        assert!(
            out.contains("autogenic: <BackupImage> in image.rsp"),
            "{out}"
        );
    }
    let plain = partition_image(dir, "plain", "1");
    srv.admin(&["image", "add", plain.to_str().unwrap()]);
}

fn field<'a>(v: &'a Value, k: &str) -> &'a Value {
    &v[k]
}

#[test]
fn image_rsp_marks_an_image_autogenic() {
    let dir = Scratch::new("autogenic-rsp");
    let srv = Server::start(&dir.join("srv"));
    // A package whose script has the seed's tag.
    let os1 = partition_image(&dir, "os", "1");
    let pkg = package(
        &dir,
        &os1,
        b"\xef\xbb\xbf<Package>\n<Name>os</Name>\n<BackupImage>\n</Package>\n",
    );
    let out = srv.admin(&["image", "add", pkg.to_str().unwrap()]);
    assert!(
        out.contains("registered image os 1")
            && out.contains("autogenic: <BackupImage> in image.rsp"),
        "{out}"
    );
    // A script beside the image without the tag: an ordinary image, and said so.
    let os2 = partition_image(&dir, "os", "2");
    let rsp = dir.join("plain.rsp");
    fs::write(&rsp, "<Package><Name>os</Name></Package>").unwrap();
    let out = srv.admin(&[
        "image",
        "add",
        os2.to_str().unwrap(),
        "--rsp",
        rsp.to_str().unwrap(),
    ]);
    assert!(
        out.contains("has no <BackupImage> tag: registered as an ordinary image"),
        "{out}"
    );
    // The flag alone.
    let os3 = partition_image(&dir, "os", "3");
    let out = srv.admin(&["image", "add", os3.to_str().unwrap(), "--autogenic"]);
    assert!(
        out.contains("registered image os 3") && out.contains(", autogenic"),
        "{out}"
    );
    // A broken script is refused and nothing is registered.
    let os4 = partition_image(&dir, "os", "4");
    let bad = package(&dir, &os4, b"<BackupImage>\0\0\0binary");
    let (code, out) = srv.try_admin(&["image", "add", bad.to_str().unwrap()]);
    assert_ne!(code, 0, "{out}");
    assert!(
        out.contains("image.rsp contains NUL bytes: not a package script"),
        "{out}"
    );
    // A package with two candidate image files is refused, naming them.
    let two = package(&dir, &os4, b"<BackupImage>");
    fs::write(two.join("notes.txt"), "x").unwrap();
    let (code, out) = srv.try_admin(&["image", "add", two.to_str().unwrap()]);
    assert_ne!(code, 0);
    assert!(
        out.contains("several files that could be the image (notes.txt, os-4.img)"),
        "{out}"
    );
    let list = srv.admin(&["image", "list"]);
    let col = list
        .lines()
        .next()
        .unwrap()
        .find("AUTOGENIC")
        .expect("the AUTOGENIC column");
    let autogenic = |v: &str| {
        let line = list
            .lines()
            .find(|l| {
                l.split_whitespace().nth(2) == Some(v) && l.split_whitespace().nth(1) == Some("os")
            })
            .unwrap_or_else(|| panic!("os {v} in {list}"));
        line[col..].split_whitespace().next().unwrap().to_string()
    };
    assert_eq!(autogenic("1"), "yes", "{list}");
    assert_eq!(autogenic("2"), "no", "{list}");
    assert_eq!(autogenic("3"), "yes", "{list}");
    assert!(
        !list.contains(" 4 "),
        "nothing registered for the refused package: {list}"
    );
    // The admin API lists the flag; an upload may carry it.
    let admin = srv.token("admin");
    let (s, v) = srv.call("GET", "/api/v1/admin/images", Some(&admin), None);
    assert_eq!(s, 200);
    let flags: Vec<(String, bool)> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            (
                i["version"].as_str().unwrap().to_string(),
                i["autogenic"].as_bool().unwrap(),
            )
        })
        .collect();
    assert_eq!(
        flags,
        [("1".into(), true), ("2".into(), false), ("3".into(), true)]
    );
    let out = Command::new("curl")
        .args(["-sS", "--max-time", "60", "--cacert"])
        .arg(srv.data.join("ca.pem"))
        .arg("-H")
        .arg(format!("Authorization: Bearer {admin}"))
        .arg("--upload-file")
        .arg(&os4)
        .args(["-w", "\n%{http_code}"])
        .arg(format!(
            "{}/api/v1/admin/images/upload?autogenic=true",
            srv.url
        ))
        .output()
        .unwrap();
    let (s, v) = parse_curl(out);
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["autogenic"], json!(true), "{v}");
}

#[test]
fn schedule_flags_make_exactly_the_task_fields_and_errors_name_the_way_out() {
    let dir = Scratch::new("autogenic-schedule");
    let srv = Server::start(&dir.join("srv"));
    images(&srv, &dir);
    let flash = 4096 * MIB;
    // A: backup partition, empty. B: no backup partition. C: backup holds os 2.
    // D: no backup partition, twice the flash.
    let a = device(A, flash, Some(("os", "1")), Some((512 * MIB, None, 0, 0)));
    let b = device(B, flash, Some(("os", "1")), None);
    let size2 = fs::metadata(srv.data.join("repo/os-2.img")).unwrap().len();
    let c = device(
        C,
        flash,
        Some(("os", "1")),
        Some((512 * MIB, Some(("os", "2")), size2, size2)),
    );
    let d = device(D, 2 * flash, None, None);
    let creds: Vec<String> = [&a, &b, &c, &d].iter().map(|x| srv.enrol(x)).collect();
    let (ca, cb, cc) = (&creds[0], &creds[1], &creds[2]);

    // The refusals first: each names the device and the way out, and makes no job.
    let refusals: [(&[&str], &str, &[&str]); 5] = [
        (
            &[
                "--mac",
                B,
                "--image",
                "os:2",
                "--partition",
                "2",
                "--backup-only",
            ],
            B,
            &[
                "has no backup partition (SupportImgBackup=0)",
                &format!("schedule add --mac {B} --image os:2 --convert"),
            ],
        ),
        (
            &[
                "--mac",
                A,
                "--image",
                "os:2",
                "--partition",
                "2",
                "--from-backup",
            ],
            A,
            &[
                "holds no image, not os 2",
                "schedule `--backup-only` first (BI), or `--backup-only --from-backup`",
            ],
        ),
        (
            &[
                "--mac",
                C,
                "--image",
                "os:1",
                "--partition",
                "2",
                "--from-backup",
            ],
            C,
            &["holds os 2, not os 1"],
        ),
        (
            &[
                "--mac",
                A,
                "--image",
                "plain:1",
                "--partition",
                "2",
                "--backup-only",
            ],
            A,
            &[
                "image plain 1 is not autogenic",
                "imgserver image add FILE --autogenic",
            ],
        ),
        (
            &[
                "--mac",
                B,
                "--image",
                "os:2",
                "--convert",
                "--backup-size",
                "8G",
            ],
            B,
            &[
                "cannot hold the boot agent (16 MiB), the backup partition (8192 MiB)",
                "or a smaller --backup-size",
            ],
        ),
    ];
    for (args, mac, parts) in refusals {
        let mut cmd = vec!["schedule", "add"];
        cmd.extend_from_slice(args);
        let (code, out) = srv.try_admin(&cmd);
        assert_ne!(code, 0, "{cmd:?}: {out}");
        assert!(out.contains("no job created"), "{cmd:?}: {out}");
        assert!(out.contains(mac), "{cmd:?} names the device: {out}");
        for p in parts {
            assert!(out.contains(p), "{cmd:?} lacks {p:?}: {out}");
        }
    }
    // One flash size per conversion job (the seed refuses the mixed selection).
    let op = srv.token("operator");
    let (s, v) = srv.call(
        "POST",
        "/api/v1/admin/jobs",
        Some(&op),
        Some(&json!({
            "target": format!("macs:{B},{D}"), "kind": "convert", "image": "os:2"
        })),
    );
    assert_eq!(s, 400, "{v}");
    let e = v["error"].as_str().unwrap_or_default();
    assert!(
        e.contains(&format!("{D} has 8192 MiB")) && e.contains("one conversion job per flash size"),
        "{v}"
    );
    assert!(!srv.admin(&["jobs"]).contains("deploy"), "no job was made");

    // BI on A: copy only into the backup partition.
    srv.admin(&[
        "schedule",
        "add",
        "--mac",
        A,
        "--image",
        "os:2",
        "--partition",
        "2",
        "--backup-only",
    ]);
    let t = srv.checkin(&a, ca).expect("BI task");
    assert_eq!(t["kind"], "deploy", "{t}");
    assert_eq!(t["after"], "copy_only", "{t}");
    assert_eq!(t.get("from_backup"), None, "{t}");
    assert_eq!(t.get("fetch_to_backup"), None, "{t}");
    assert_eq!(t["image"]["autogenic"], true, "{t}");
    assert_eq!(t["image"]["name"], "os");
    assert_eq!(t["image"]["version"], "2");
    assert_eq!(t["image"]["size"], json!(size2), "{t}");
    srv.finish(&a, ca, &t, Some(("os", "2")));
    // BI then PI on A in one job (the seed's case 2).
    srv.admin(&[
        "schedule",
        "add",
        "--mac",
        A,
        "--image",
        "os:2",
        "--partition",
        "2",
        "--backup-only",
        "--from-backup",
    ]);
    let t = srv.checkin(&a, ca).expect("BI+PI task");
    assert_eq!(
        (
            field(&t, "from_backup"),
            field(&t, "fetch_to_backup"),
            field(&t, "after"),
            field(&t, "partition")
        ),
        (&json!(true), &json!(true), &json!("reboot"), &json!("2")),
        "{t}"
    );
    srv.finish(&a, ca, &t, Some(("os", "2")));
    // PI on C, whose backup holds os 2, through the admin API.
    let (s, v) = srv.call(
        "POST",
        "/api/v1/admin/jobs",
        Some(&op),
        Some(&json!({
            "target": format!("mac:{C}"), "kind": "deploy", "image": "os:2",
            "options": {"partition": "2", "from_backup": true}
        })),
    );
    assert_eq!(s, 201, "{v}");
    assert_eq!(v["validation"][0]["status"], "success", "{v}");
    let t = srv.checkin(&c, cc).expect("PI task");
    assert_eq!(
        (field(&t, "from_backup"), field(&t, "fetch_to_backup")),
        (&json!(true), &Value::Null),
        "{t}"
    );
    assert_eq!(t["after"], "reboot");
    srv.finish(&c, cc, &t, Some(("os", "2")));
    // Convert B: the flash size from its inventory, the image the job's.
    let out = srv.admin(&[
        "schedule",
        "add",
        "--mac",
        B,
        "--image",
        "os:2",
        "--convert",
    ]);
    assert!(out.contains("success"), "{out}");
    let t = srv.checkin(&b, cb).expect("convert task");
    assert_eq!(t["kind"], "convert", "{t}");
    assert_eq!(t["flash_size"], json!(flash), "{t}");
    assert_eq!(t["image"]["autogenic"], true, "{t}");
    assert_eq!(t["image"]["version"], "2");
    assert_eq!(t.get("backup_size"), None, "{t}");
    let job = t["job"].as_u64().unwrap().to_string();
    let shown = srv.admin(&["job", &job]);
    assert!(
        shown.contains("convert: flash 4.0 GiB, backup partition image + 100 MiB"),
        "{shown}"
    );
    srv.finish(&b, cb, &t, Some(("os", "2")));
    // A conversion with an enlarged backup partition on 4096 MB flash.
    srv.admin(&[
        "schedule",
        "add",
        "--mac",
        B,
        "--image",
        "os:2",
        "--convert",
        "--backup-size",
        "1G",
    ]);
    let t = srv.checkin(&b, cb).expect("convert task");
    assert_eq!(t["backup_size"], json!(1u64 << 30), "{t}");
    let jobs = srv.admin(&["jobs"]);
    for words in ["os 2 (BI)", "os 2 (BI+PI)", "os 2 (PI)", "convert"] {
        assert!(jobs.contains(words), "{words} in {jobs}");
    }
}

#[test]
fn devices_show_the_backup_partition_and_a_reported_maintenance() {
    let dir = Scratch::new("autogenic-devices");
    let srv = Server::start(&dir.join("srv"));
    let viewer = srv.token("viewer");
    let mut a = device(
        A,
        4096 * MIB,
        Some(("os", "1")),
        Some((600 * MIB, Some(("os", "2")), 120 * MIB, 300 * MIB)),
    );
    let ca = srv.enrol(&a);
    let b = device(B, 4096 * MIB, Some(("os", "1")), None);
    srv.enrol(&b);
    let list = srv.admin(&["devices"]);
    assert!(list.lines().next().unwrap().contains("BACKUP"), "{list}");
    let line = |list: &str, mac: &str| {
        list.lines()
            .find(|l| l.starts_with(mac))
            .unwrap()
            .to_string()
    };
    assert!(
        line(&list, A).contains("os 2: 40% (BI 120 MiB of 300 MiB)"),
        "{list}"
    );
    assert!(
        line(&list, B).contains("Operational") && !line(&list, B).contains("BI"),
        "{list}"
    );
    let one = srv.admin(&["device", A]);
    assert!(
        one.contains("backup:  os 2: 40% (BI 120 MiB of 300 MiB) (backup partition 600.0 MiB)"),
        "{one}"
    );
    // BI completes: the seed's flags and the image.
    a.autogenic.backup_bytes = 300 * MIB;
    a.autogenic.backup_image_present = true;
    a.autogenic.back_image_ver = Some("2".into());
    assert!(srv.checkin(&a, &ca).is_none());
    let list = srv.admin(&["devices"]);
    assert!(line(&list, A).contains("os 2 (complete)"), "{list}");
    let one = srv.admin(&["device", A]);
    assert!(
        one.contains("SupportImgBackup=1 BackupImagePresent=1 BackImageVer=2"),
        "{one}"
    );
    let v = srv
        .call(
            "GET",
            &format!("/api/v1/admin/devices/{A}"),
            Some(&viewer),
            None,
        )
        .1;
    let bk = &v["backup_image"];
    assert_eq!(
        (
            bk["present"].clone(),
            bk["version"].clone(),
            bk["bytes"].clone(),
            bk["size"].clone(),
            bk["partition_size"].clone()
        ),
        (
            json!(true),
            json!("2"),
            json!(300 * MIB),
            json!(300 * MIB),
            json!(600 * MIB)
        ),
        "{v}"
    );
    assert_eq!(bk["image"], json!({"name": "os", "version": "2"}), "{v}");
    let v = srv
        .call("GET", "/api/v1/admin/devices", Some(&viewer), None)
        .1;
    let row = v
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["mac"] == A)
        .unwrap()
        .clone();
    assert_eq!(row["backup"]["present"], true, "{row}");
    // Maintenance reported by the device, shown with the reason, cleared by a check-in
    // without it.
    let mut m = a.clone();
    m.maintenance = Some("re-imaging from the backup partition failed on 4 boots".into());
    assert!(srv.checkin(&m, &ca).is_none());
    let list = srv.admin(&["devices"]);
    let l = line(&list, A);
    assert!(l.contains("Maintenance") && l.contains("the device reports maintenance: re-imaging from the backup partition failed on 4 boots"), "{list}");
    let v = srv
        .call(
            "GET",
            &format!("/api/v1/admin/devices/{A}"),
            Some(&viewer),
            None,
        )
        .1;
    assert_eq!(v["state"], "maintenance", "{v}");
    let tr = srv.admin(&["transcript", A]);
    assert!(
        tr.contains("Maintenance: the device reports maintenance"),
        "{tr}"
    );
    assert!(srv.checkin(&a, &ca).is_none());
    let list = srv.admin(&["devices"]);
    assert!(line(&list, A).contains("Operational"), "{list}");
    assert!(!line(&list, A).contains("reports maintenance"), "{list}");
}

#[test]
fn rollback_reimages_from_the_backup_partition_and_pxe_leaves_a_pi_to_the_disk() {
    let dir = Scratch::new("autogenic-rollback");
    let srv = Server::start(&dir.join("srv"));
    images(&srv, &dir);
    let size1 = fs::metadata(srv.data.join("repo/os-1.img")).unwrap().len();
    // A keeps os 1 in its backup partition; B has a backup partition that is empty.
    let a = device(
        A,
        4096 * MIB,
        Some(("os", "1")),
        Some((512 * MIB, Some(("os", "1")), size1, size1)),
    );
    let b = device(
        B,
        4096 * MIB,
        Some(("os", "1")),
        Some((512 * MIB, None, 0, 0)),
    );
    let (ca, cb) = (srv.enrol(&a), srv.enrol(&b));
    srv.admin(&["device", A, "--group", "lab"]);
    srv.admin(&["device", B, "--group", "lab"]);
    srv.admin(&[
        "schedule",
        "add",
        "--group",
        "lab",
        "--image",
        "os:2",
        "--partition",
        "2",
    ]);
    // A network deploy is PXE work.
    assert!(
        srv.pxe(A).contains("loading the imaging agent"),
        "{}",
        srv.pxe(A)
    );
    for (d, c) in [(&a, &ca), (&b, &cb)] {
        let t = srv.checkin(d, c).expect("deploy");
        assert_eq!(t.get("from_backup"), None, "{t}");
        srv.finish(d, c, &t, Some(("os", "2")));
    }
    let (a2, b2) = (
        device(
            A,
            4096 * MIB,
            Some(("os", "2")),
            Some((512 * MIB, Some(("os", "1")), size1, size1)),
        ),
        device(
            B,
            4096 * MIB,
            Some(("os", "2")),
            Some((512 * MIB, None, 0, 0)),
        ),
    );
    // Roll job 1 back: A from its backup partition (PI), B by download.
    let out = srv.admin(&["job", "1", "--rollback"]);
    assert!(out.contains("rolls 1 device(s) back to os 1 (PI)"), "{out}");
    assert!(out.contains("rolls 1 device(s) back to os 1\n"), "{out}");
    // The PI is not PXE work: the device boots its disk, whose agent checks in for it.
    let pxe = srv.pxe(A);
    assert!(
        !pxe.contains("loading the imaging agent") && pxe.contains("booting the local disk"),
        "{pxe}"
    );
    assert!(
        srv.pxe(B).contains("loading the imaging agent"),
        "B downloads: PXE work"
    );
    let t = srv.checkin(&a2, &ca).expect("PI");
    assert_eq!(
        (t["from_backup"].clone(), t.get("fetch_to_backup")),
        (json!(true), None),
        "{t}"
    );
    assert_eq!(t["image"]["version"], "1");
    assert_eq!(t["image"]["autogenic"], true);
    assert!(
        !srv.pxe(A).contains("loading the imaging agent"),
        "an unfinished PI resumes from the disk"
    );
    let t = srv.checkin(&b2, &cb).expect("download");
    assert_eq!(t.get("from_backup"), None, "{t}");
    assert_eq!(t["image"]["version"], "1");
    let jobs = srv.admin(&["jobs"]);
    assert!(
        jobs.contains("rollback of job 1 from the backup partition"),
        "{jobs}"
    );
}
