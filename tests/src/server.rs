//! A real `imgserver` for the suites that talk to one (server_*, admin_api, autogenic_*,
//! bootstore, web_console): started on a scratch data folder, its address read from the
//! `listening on https://` line it prints, administered with its own CLI, spoken to with curl,
//! and killed when dropped. Also the device disk the boot-agent suites start from: a GPT disk
//! whose first partition `img -install` has made the boot-agent partition.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};

use imgserver::protocol::{enrolment_proof, CheckIn, CHECKIN_PATH};
use serde_json::Value;

use crate::{img_bin, imgserver_admin, imgserver_bin, run, spawn_imgserver};

/// One mebibyte.
const MIB: u64 = 1 << 20;

/// A running `imgserver serve` (TLS with its own CA); killed on drop.
pub struct Server {
    /// The data folder.
    pub data: PathBuf,
    child: Option<Child>,
    /// `https://` and the address from the server's `listening on` line.
    pub url: String,
    /// The port it listens on.
    pub port: u16,
}

impl Server {
    /// `imgserver init` in `data` (unless it holds a CA already: a restart keeps its data),
    /// then `imgserver --data DATA serve ARGS` (e.g. `--listen 127.0.0.1:0`); returns once it
    /// listens.
    pub fn start(data: &Path, args: &[&str]) -> Server {
        if !data.join("ca.pem").exists() {
            imgserver_admin(data, &["init"]);
        }
        let (child, addr) = spawn_imgserver(
            Command::new(imgserver_bin())
                .arg("--data")
                .arg(data)
                .arg("serve")
                .args(args),
            "listening on https://",
        );
        let port = addr
            .rsplit(':')
            .next()
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in imgserver's address {addr:?}"));
        Server {
            data: data.to_path_buf(),
            child: Some(child),
            url: format!("https://{addr}"),
            port,
        }
    }

    /// Kill the server (a power cut of the server's host); the data folder stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// The server's CA certificate (what a device trusts).
    pub fn ca(&self) -> PathBuf {
        self.data.join("ca.pem")
    }

    /// The site's enrolment secret.
    pub fn enrol_secret(&self) -> String {
        std::fs::read_to_string(self.data.join("enrol.key")).unwrap()
    }

    /// An administrator's command that must succeed.
    pub fn admin(&self, args: &[&str]) -> String {
        imgserver_admin(&self.data, args)
    }

    /// An administrator's command: (exit code, stdout + stderr).
    pub fn try_admin(&self, args: &[&str]) -> (i32, String) {
        let out = Command::new(imgserver_bin())
            .arg("--data")
            .arg(&self.data)
            .args(args)
            .output()
            .unwrap();
        (
            out.status.code().unwrap_or(-1),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    /// A new admin API token `name` with `role`, issued on the host (printed alone on stdout).
    pub fn token(&self, name: &str, role: &str) -> String {
        let out = Command::new(imgserver_bin())
            .arg("--data")
            .arg(&self.data)
            .args(["admin", "add", name, "--role", role])
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        let t = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(t.starts_with("imgadm_"), "{t}");
        t
    }

    /// One HTTPS request with curl: (status, body as text).
    pub fn call_text(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: Option<&Value>,
    ) -> (u16, String) {
        let mut c = Command::new("curl");
        c.args(["-sS", "--max-time", "60", "--cacert"])
            .arg(self.ca())
            .args(["-X", method, "-w", "\n%{http_code}"]);
        if let Some(t) = token {
            c.arg("-H").arg(format!("Authorization: Bearer {t}"));
        }
        if let Some(b) = body {
            c.args(["-H", "Content-Type: application/json", "--data-binary"])
                .arg(b.to_string());
        }
        c.arg(format!("{}{path}", self.url));
        parse_curl(c.output().expect("running curl"))
    }

    /// A device's check-in (protocol v1) with credential `cred` (None: none, as at
    /// enrolment): (status, JSON body, or the text when it is not JSON).
    pub fn post_checkin(&self, dev: &CheckIn, cred: Option<&str>) -> (u16, Value) {
        let (s, body) = self.call_text(
            "POST",
            CHECKIN_PATH,
            cred,
            Some(&serde_json::to_value(dev).unwrap()),
        );
        (
            s,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
        )
    }

    /// Enrol `dev` with the site secret: its credential.
    pub fn enrol(&self, dev: &CheckIn) -> String {
        let mut first = dev.clone();
        first.enrol_proof = Some(enrolment_proof(&self.enrol_secret(), &dev.device.mac));
        let (s, v) = self.post_checkin(&first, None);
        assert_eq!(s, 200, "{v}");
        v["credential"].as_str().expect("credential").to_string()
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

/// curl's output with `-w "\n%{http_code}"`: (status, body). curl itself must have succeeded.
pub fn parse_curl(out: std::process::Output) -> (u16, String) {
    assert!(
        out.status.success(),
        "curl failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let (body, code) = text
        .trim_end()
        .rsplit_once('\n')
        .unwrap_or(("", text.trim()));
    let status: u16 = code
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("curl said {text:?}"));
    (status, body.to_string())
}

/// A device disk of `mib` MiB at `disk`: partition 1 (40 MiB, "BOOTAGENT") prepared by
/// `img -install` with a stand-in kernel and initrd (written into `dir`), partition 2 the
/// rest (named `os_name` when given). The caller checks for the tools it needs.
pub fn installed_disk(dir: &Path, disk: &Path, mib: u64, os_name: Option<&str>) -> PathBuf {
    std::fs::File::create(disk)
        .unwrap()
        .set_len(mib * MIB)
        .unwrap();
    let mut sgdisk = Command::new("sgdisk");
    sgdisk.args([
        "-o",
        "-n1:1M:+40M",
        "-t1:ef00",
        "-c1:BOOTAGENT",
        "-n2:0:0",
        "-t2:0700",
    ]);
    if let Some(name) = os_name {
        sgdisk.arg(format!("-c2:{name}"));
    }
    run(sgdisk.arg(disk));
    std::fs::write(dir.join("vmlinuz"), crate::random_bytes(1, 300_000)).unwrap();
    std::fs::write(dir.join("initrd.img"), crate::random_bytes(2, 500_000)).unwrap();
    run(Command::new(img_bin())
        .arg("-install")
        .arg(disk)
        .arg(format!("-kernel={}", dir.join("vmlinuz").display()))
        .arg(format!("-initrd={}", dir.join("initrd.img").display())));
    disk.to_path_buf()
}

/// An administrator's source disk at `disk`: `mib` MiB of GPT with one FAT16 partition
/// SYSTEM (1 MiB .. 33 MiB, made by sgdisk, mkfs.fat and mtools) holding VERSION.TXT =
/// `version_txt` and BLOB.BIN = `blob` (both written into `dir` first).
pub fn fat16_source_disk(dir: &Path, disk: &Path, mib: u64, version_txt: &str, blob: &[u8]) {
    std::fs::write(dir.join("VERSION.TXT"), version_txt).unwrap();
    std::fs::write(dir.join("BLOB.BIN"), blob).unwrap();
    crate::sh(&format!(
        "cd {d}; export MTOOLS_SKIP_CHECK=1; truncate -s {size} {disk}
         sgdisk -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {disk} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {disk} 32768 >/dev/null
         mcopy -i {disk}@@1048576 VERSION.TXT ::VERSION.TXT
         mcopy -i {disk}@@1048576 BLOB.BIN ::BLOB.BIN",
        d = dir.display(),
        size = mib * MIB,
        disk = disk.display()
    ));
}

/// `disk` (partition `part`, or whole when None) captured by the engine as image `name`
/// `version` into the file `img`.
pub fn capture_image(disk: &Path, part: Option<&str>, name: &str, version: &str, img: &Path) {
    use imgengine::capture::{capture, CaptureOptions};
    let mut f = std::fs::File::create(img).unwrap();
    let o = CaptureOptions {
        name: name.into(),
        version: version.into(),
        comp: 1,
        threads: 2,
        ..Default::default()
    };
    capture(disk, part, &mut f, &o, &imgengine::io::NoProgress).unwrap();
}
