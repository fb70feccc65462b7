//! Shared harness for the end-to-end suites: where the built binaries are, running real
//! tools with their stderr in the error, scratch folders that clean up after themselves, and
//! a real HTTP server (nginx, with Range support) on loopback.
//!
//! The suites use real peers made by others (mkfs.fat, mtools, mkntfs, ntfs-3g tools,
//! sgdisk, sfdisk, nginx, dnsmasq, curl); a missing tool fails the test with a message that
//! says to run `scripts/install-deps.sh`, never a silent skip.

pub mod netlab;
pub use netlab::NetLab;
pub mod mcastlab;
pub mod server;

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

/// The workspace root (this crate lives in `<root>/tests`).
pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

/// The `img` binary under test: `$IMG_BIN`, else the debug build (built on demand).
/// scripts/test.sh sets `IMG_BIN` to the static release build it has just made (the binary
/// that ships, and several times faster than the debug build for the suites that run `img`
/// hundreds of times or move real data with it).
pub fn img_bin() -> PathBuf {
    if let Some(p) = std::env::var_os("IMG_BIN") {
        let p = PathBuf::from(p);
        assert!(p.is_file(), "IMG_BIN={} is not a file", p.display());
        return p;
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join("img");
    ensure_built(&bin, "agent");
    bin
}

/// A workspace binary by name, built on demand (e.g. `imgserver`).
pub fn workspace_bin(name: &str, package: &str) -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target"));
    let bin = target.join("debug").join(name);
    ensure_built(&bin, package);
    bin
}

/// Build the binary `bin` of `package` once per test binary (cargo is a no-op when up to
/// date, but not free: a suite calls this for every command it runs).
///
/// With `--workspace`, cargo resolves the dependencies' features for the whole workspace, as
/// `cargo test --workspace` does, so the binary reuses what the test build compiled; with
/// `-p PACKAGE` alone the features differ and cargo compiles the engine and its dependencies
/// once more for each package (minutes on a fresh CI machine).
fn ensure_built(bin: &Path, package: &str) {
    static BUILT: std::sync::Mutex<Vec<PathBuf>> = std::sync::Mutex::new(Vec::new());
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    if built.iter().any(|b| b == bin) {
        return;
    }
    let name = bin
        .file_name()
        .and_then(|n| n.to_str())
        .expect("a binary's file name");
    let st = Command::new(env!("CARGO"))
        .args(["build", "-q", "--workspace", "--bin", name])
        .current_dir(workspace_root())
        .status()
        .expect("running cargo build");
    assert!(
        st.success(),
        "cargo build --bin {name} (package {package}) failed"
    );
    assert!(bin.exists(), "{} missing after build", bin.display());
    built.push(bin.to_path_buf());
}

/// The reference server binary (built on demand).
pub fn imgserver_bin() -> PathBuf {
    workspace_bin("imgserver", "imgserver")
}

/// Run an `imgserver --data DATA ARGS...` admin command; returns stdout and stderr.
/// Exit code 3 (validation warnings) counts as success, as it does for an administrator.
pub fn imgserver_admin(data: &Path, args: &[&str]) -> String {
    let out = Command::new(imgserver_bin())
        .arg("--data")
        .arg(data)
        .args(args)
        .output()
        .expect("running imgserver");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() || out.status.code() == Some(3),
        "imgserver {args:?} failed:\n{text}"
    );
    text
}

/// Fail with a clear message when a peer tool is not installed.
pub fn require_tool(name: &str) {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(name).is_file()))
        .unwrap_or(false);
    assert!(
        found,
        "`{name}` is not installed: run `bash scripts/install-deps.sh` as root"
    );
}

/// Run a command to completion; panics with its stderr when it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    if !out.status.success() {
        panic!(
            "{cmd:?} failed with {}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            tail(&String::from_utf8_lossy(&out.stderr), 40)
        );
    }
    out
}

/// Run a shell snippet (`bash -euo pipefail -c`), panicking with its stderr on failure.
pub fn sh(script: &str) -> String {
    let out = run(Command::new("bash").args(["-euo", "pipefail", "-c", script]));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The last `n` lines of `s`.
pub fn tail(s: &str, n: usize) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// A scratch folder under the system temp dir, removed when dropped (kept when
/// `KEEP_SCRATCH` is set, for looking at a failure).
pub struct Scratch {
    path: PathBuf,
}

impl Scratch {
    pub fn new(tag: &str) -> Scratch {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let path = std::env::temp_dir().join(format!("e2e-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("creating scratch dir");
        Scratch { path }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, p: impl AsRef<Path>) -> PathBuf {
        self.path.join(p)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_SCRATCH").is_none() {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }
}

/// A free TCP port on 127.0.0.1 (the listener is closed before returning).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("binding a free port")
}

/// Wait until something accepts TCP connections on `addr`.
pub fn wait_for_port(addr: &str, timeout: Duration) {
    let end = Instant::now() + timeout;
    while Instant::now() < end {
        if std::net::TcpStream::connect(addr).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("nothing listening on {addr} after {timeout:?}");
}

/// The path of nginx's status page in [`Nginx`] (a name no test file uses).
const STATUS_PATH: &str = "/.e2e-nginx-status";

/// A real nginx serving `root` on 127.0.0.1 (Range requests included), with an access log
/// that records the bytes sent per request; stopped when dropped.
pub struct Nginx {
    child: Child,
    pub port: u16,
    pub access_log: PathBuf,
    _dir: Scratch,
}

impl Nginx {
    pub fn serve(root: &Path) -> Nginx {
        Nginx::serve_with(root, "")
    }

    /// Like [`Nginx::serve`], with extra directives for the `server` block, e.g.
    /// `limit_rate 2m;` to make a transfer slow enough to interrupt.
    pub fn serve_with(root: &Path, server_directives: &str) -> Nginx {
        require_tool("nginx");
        let dir = Scratch::new("nginx");
        let port = free_port();
        let access_log = dir.join("access.log");
        let conf = dir.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {pid};\nerror_log {err} warn;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  log_format bytes '$request $status $body_bytes_sent';\n  access_log {log} bytes;\n\
                 client_body_temp_path {tmp};\n  proxy_temp_path {tmp};\n  fastcgi_temp_path {tmp};\n  uwsgi_temp_path {tmp};\n  scgi_temp_path {tmp};\n\
                 types {{ application/octet-stream img; }}\n\
                 server {{ listen 127.0.0.1:{port}; root {root}; {server_directives}\n\
                   location = {STATUS_PATH} {{ stub_status; access_log off; }} }}\n}}\n",
                pid = dir.join("nginx.pid").display(),
                err = dir.join("error.log").display(),
                log = access_log.display(),
                tmp = dir.path().display(),
                root = root.display(),
            ),
        )
        .expect("writing nginx.conf");
        let child = Command::new("nginx")
            .args([
                "-c".as_ref(),
                conf.as_os_str(),
                "-p".as_ref(),
                dir.path().as_os_str(),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
        Nginx {
            child,
            port,
            access_log,
            _dir: dir,
        }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://127.0.0.1:{}/{file}", self.port)
    }

    /// Waits until nginx has no request in progress (its `stub_status` shows no connection
    /// reading or writing but the status request itself). nginx writes a request's access-log
    /// line when it finishes the request, in the same worker, so after this the log holds
    /// every request made so far. Panics after 30 s.
    pub fn wait_idle(&self) {
        let end = Instant::now() + Duration::from_secs(30);
        let mut last = String::new();
        while Instant::now() < end {
            last = self.status();
            let field = |name: &str| -> Option<u64> {
                let rest = last.split(name).nth(1)?;
                rest.split_whitespace().next()?.parse().ok()
            };
            if field("Reading:") == Some(0) && field("Writing:") == Some(1) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("nginx still has requests in progress after 30 s:\n{last}");
    }

    /// nginx's `stub_status` page (not logged, so it never counts in [`Nginx::bytes_sent`]).
    fn status(&self) -> String {
        use std::io::{Read, Write};
        let Ok(mut c) = std::net::TcpStream::connect(("127.0.0.1", self.port)) else {
            return String::new();
        };
        let _ = write!(c, "GET {STATUS_PATH} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n");
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    }

    /// Total body bytes nginx has sent for requests finished so far, once no request is in
    /// progress ([`Nginx::wait_idle`]).
    pub fn bytes_sent_when_idle(&self) -> u64 {
        self.wait_idle();
        self.bytes_sent()
    }

    /// Total body bytes nginx has sent so far (from its access log).
    pub fn bytes_sent(&self) -> u64 {
        std::fs::read_to_string(&self.access_log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.rsplit(' ').next()?.parse::<u64>().ok())
            .sum()
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Deterministic pseudo-random bytes (xorshift64), incompressible like encrypted or
/// already-compressed files.
pub fn random_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift(
        seed.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1,
    );
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Files with the given content, made deterministically from a seed: half compressible
/// text, half pseudo-random bytes (in 64 KiB stretches), like a real OS partition.
pub fn sample_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut rng = XorShift(
        seed.wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407)
            | 1,
    );
    let mut out = Vec::with_capacity(len + 80);
    let text = b"thin client image line: the quick brown fox jumps over the lazy dog 0123456789\n";
    while out.len() < len {
        if (out.len() / 65536) % 2 == 0 {
            out.extend_from_slice(text);
        } else {
            out.extend_from_slice(&rng.next().to_le_bytes());
        }
    }
    out.truncate(len);
    out
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Starts `imgserver ... serve ...` (`cmd`, possibly under `ip netns exec`) and waits for the
/// line it prints once it listens, which must start with `expect` (e.g.
/// `"listening on https://"`). Returns the child (its stderr goes to the test's) and the rest
/// of that line (the address it listens on).
pub fn spawn_imgserver(cmd: &mut Command, expect: &str) -> (Child, String) {
    use std::io::{BufRead, BufReader};
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
    let mut line = String::new();
    let _ = BufReader::new(child.stdout.take().expect("piped stdout")).read_line(&mut line);
    let Some(rest) = line.trim().strip_prefix(expect).map(str::to_string) else {
        let _ = child.kill();
        let _ = child.wait();
        panic!("imgserver said {line:?}, not {expect:?}...");
    };
    (child, rest)
}

/// The deploy's result on a device's disk in the suites' shape (GPT, a 32 MiB FAT volume at
/// 1 MiB): the volume passes `fsck.fat -n` and its VERSION.TXT says `expect`. `scratch` is a
/// folder for the copy of the volume.
pub fn check_deployed(scratch: &Path, disk: &Path, expect: &str) {
    let vol = scratch.join("check-vol.img");
    sh(&format!(
        "dd if={} of={} bs=1M skip=1 count=32 status=none; fsck.fat -n {} >/dev/null",
        disk.display(),
        vol.display(),
        vol.display()
    ));
    let text = sh(&format!(
        "MTOOLS_SKIP_CHECK=1 mtype -i {} ::VERSION.TXT",
        vol.display()
    ));
    assert_eq!(text.trim(), expect, "VERSION.TXT on {}", disk.display());
}
