//! Image sources over real HTTP(S) servers on loopback.
//!
//! nginx serves with Range support; `python3 -m http.server` serves without it; a small
//! Python server (below) cuts its first responses mid-body and closes the connection, then
//! serves Range requests, to show that `Source::stream` resumes and yields the whole body;
//! the same server behind TLS with a certificate from a throw-away CA (openssl) shows that
//! verification is on and that `ca_file` makes the private CA trusted. It also accepts a
//! chunked PUT for `upload`.

use std::io::Read;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use e2e::{free_port, require_tool, sample_bytes, sh, wait_for_port, Nginx, Scratch};
use imgengine::source::{upload, HttpConfig, Location, Source};
use imgengine::ErrorKind;

const SERVER: &str = r#"
import http.server, socket, ssl, sys
port, path, mode, log_path, cut = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5])
data = open(path, 'rb').read()
log = open(log_path, 'a')
state = {'gets': 0}

class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def log_message(self, *a):
        pass
    def do_HEAD(self):
        self.reply(True)
    def do_GET(self):
        self.reply(False)
    def reply(self, head):
        rng = self.headers.get('Range')
        start, end = 0, len(data)
        ranges = 'norange' not in mode
        if rng and ranges:
            a, b = rng.split('=')[1].split('-')
            start, end = int(a), (int(b) + 1 if b else len(data))
            self.send_response(206)
            self.send_header('Content-Range', 'bytes %d-%d/%d' % (start, end - 1, len(data)))
        else:
            self.send_response(200)
        self.send_header('Content-Length', str(end - start))
        if ranges:
            self.send_header('Accept-Ranges', 'bytes')
        self.end_headers()
        log.write('%s %s\n' % (self.command, rng)); log.flush()
        if head:
            return
        body = data[start:end]
        state['gets'] += 1
        if 'drop' in mode and state['gets'] <= 2 and len(body) > cut:
            # Lose the connection mid-body.
            self.wfile.write(body[:cut]); self.wfile.flush()
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(body)
    def do_PUT(self):
        out = open(path + '.put', 'wb')
        if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
            while True:
                n = int(self.rfile.readline().strip().split(b';')[0], 16)
                if n == 0:
                    self.rfile.readline()
                    break
                out.write(self.rfile.read(n)); self.rfile.readline()
        else:
            out.write(self.rfile.read(int(self.headers['Content-Length'])))
        out.close()
        log.write('PUT %s\n' % self.headers.get('Transfer-Encoding')); log.flush()
        self.send_response(201); self.send_header('Content-Length', '0'); self.end_headers()

srv = http.server.ThreadingHTTPServer(('127.0.0.1', port), H)
if 'tls' in mode:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(sys.argv[6], sys.argv[7])
    srv.socket = ctx.wrap_socket(srv.socket, server_side=True)
srv.serve_forever()
"#;

/// A child process killed (by its own pid) when dropped.
struct Server {
    child: Child,
    port: u16,
    log: std::path::PathBuf,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    fn requests(&self) -> Vec<String> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .map(String::from)
            .collect()
    }
}

fn python_server(
    dir: &Scratch,
    file: &Path,
    mode: &str,
    cut: usize,
    tls: Option<(&Path, &Path)>,
) -> Server {
    require_tool("python3");
    let script = dir.join("server.py");
    std::fs::write(&script, SERVER).unwrap();
    let port = free_port();
    let log = dir.join(format!("{mode}.log"));
    let mut cmd = Command::new("python3");
    cmd.arg(&script)
        .arg(port.to_string())
        .arg(file)
        .arg(mode)
        .arg(&log)
        .arg(cut.to_string());
    if let Some((cert, key)) = tls {
        cmd.arg(cert).arg(key);
    }
    let child = cmd
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    Server { child, port, log }
}

fn read_all(mut r: Box<dyn Read + Send>) -> Vec<u8> {
    let mut v = Vec::new();
    r.read_to_end(&mut v).unwrap();
    v
}

#[test]
fn nginx_serves_stream_and_ranges_and_404_is_clear() {
    let dir = Scratch::new("source-nginx");
    let data = sample_bytes(11, 3 << 20);
    std::fs::write(dir.join("disk.img"), &data).unwrap();
    let nginx = Nginx::serve(dir.path());
    let http = HttpConfig::default();

    let mut s = Source::open(&Location::parse(&nginx.url("disk.img")), &http).unwrap();
    assert_eq!(s.len(), Some(data.len() as u64));
    assert!(s.supports_ranges());
    assert!(read_all(s.stream().unwrap()) == data);
    let r = read_all(s.read_range(1_000_000, 70_000).unwrap());
    assert!(r == data[1_000_000..1_070_000]);
    assert_eq!(s.bytes_fetched(), data.len() as u64 + 70_000);
    // nginx's access log agrees on the bytes sent.
    assert_eq!(nginx.bytes_sent_when_idle(), data.len() as u64 + 70_000);

    let url = nginx.url("missing.img");
    let e = Source::open(&Location::parse(&url), &http).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network);
    assert_eq!(
        e.to_string(),
        format!("network error: HTTP 404 for {url}: check the image URL")
    );
}

#[test]
fn python_http_server_without_ranges_streams_but_cannot_seek() {
    require_tool("python3");
    let dir = Scratch::new("source-pyhttp");
    let data = sample_bytes(12, 500_000);
    std::fs::write(dir.join("disk.img"), &data).unwrap();
    let port = free_port();
    let child = Command::new("python3")
        .args([
            "-m",
            "http.server",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(dir.path())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let _guard = Server {
        child,
        port,
        log: dir.join("none"),
    };
    wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));

    let url = format!("http://127.0.0.1:{port}/disk.img");
    let mut s = Source::open(&Location::parse(&url), &HttpConfig::default()).unwrap();
    assert_eq!(s.len(), Some(500_000));
    assert!(!s.supports_ranges());
    assert!(read_all(s.stream().unwrap()) == data);
    let e = s.read_range(10, 10).err().unwrap();
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    assert!(e.to_string().contains("does not support Range"), "{e}");
}

#[test]
fn stream_survives_connections_lost_mid_body() {
    let dir = Scratch::new("source-drop");
    let data = sample_bytes(13, 1_500_000);
    let file = dir.join("disk.img");
    std::fs::write(&file, &data).unwrap();
    let srv = python_server(&dir, &file, "drop", 400_000, None);
    let url = format!("http://127.0.0.1:{}/disk.img", srv.port);

    let mut s = Source::open(&Location::parse(&url), &HttpConfig::default()).unwrap();
    assert!(s.supports_ranges());
    let got = read_all(s.stream().unwrap());
    assert_eq!(got.len(), data.len());
    assert!(got == data);
    assert_eq!(s.bytes_fetched(), data.len() as u64);
    // First GET cut at 400000, the resume from there cut again, then the rest.
    let reqs = srv.requests();
    assert_eq!(
        reqs,
        vec![
            "HEAD None",
            "GET None",
            "GET bytes=400000-1499999",
            "GET bytes=800000-1499999"
        ],
        "{reqs:?}"
    );

    // read_range resumes the same way.
    let srv2 = python_server(&dir, &file, "drop", 100_000, None);
    let url2 = format!("http://127.0.0.1:{}/disk.img", srv2.port);
    let s2 = Source::open(&Location::parse(&url2), &HttpConfig::default()).unwrap();
    assert!(read_all(s2.read_range(50_000, 600_000).unwrap()) == data[50_000..650_000]);

    // With no retries allowed the loss is an error naming the URL and position.
    let srv3 = python_server(&dir, &file, "drop", 100_000, None);
    let url3 = format!("http://127.0.0.1:{}/disk.img", srv3.port);
    let mut s3 = Source::open(
        &Location::parse(&url3),
        &HttpConfig {
            retries: 0,
            ..Default::default()
        },
    )
    .unwrap();
    let mut v = Vec::new();
    let e = s3.stream().unwrap().read_to_end(&mut v).unwrap_err();
    assert!(
        e.to_string().contains(&url3) && e.to_string().contains("at byte 100000"),
        "{e}"
    );
}

#[test]
fn lost_connection_without_range_support_is_a_clear_error() {
    let dir = Scratch::new("source-drop-norange");
    let data = sample_bytes(14, 600_000);
    let file = dir.join("disk.img");
    std::fs::write(&file, &data).unwrap();
    let srv = python_server(&dir, &file, "drop-norange", 200_000, None);
    let url = format!("http://127.0.0.1:{}/disk.img", srv.port);
    let mut s = Source::open(&Location::parse(&url), &HttpConfig::default()).unwrap();
    assert!(!s.supports_ranges());
    let mut v = Vec::new();
    let e = s.stream().unwrap().read_to_end(&mut v).unwrap_err();
    assert!(
        e.to_string()
            .contains("does not support Range requests to resume"),
        "{e}"
    );
}

#[test]
fn https_with_private_ca_needs_ca_file() {
    require_tool("openssl");
    let dir = Scratch::new("source-tls");
    let data = sample_bytes(15, 300_000);
    let file = dir.join("disk.img");
    std::fs::write(&file, &data).unwrap();
    sh(&format!(
        "cd {d}
         openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 2 -subj '/CN=imgengine test CA' 2>/dev/null
         openssl req -newkey rsa:2048 -nodes -keyout srv.key -out srv.csr -subj '/CN=127.0.0.1' 2>/dev/null
         printf 'subjectAltName=IP:127.0.0.1\\nbasicConstraints=CA:FALSE\\nextendedKeyUsage=serverAuth\\n' > ext.cnf
         openssl x509 -req -in srv.csr -CA ca.pem -CAkey ca.key -CAcreateserial -out srv.pem -days 2 -extfile ext.cnf 2>/dev/null",
        d = dir.path().display()
    ));
    let srv = python_server(
        &dir,
        &file,
        "tls",
        0,
        Some((&dir.join("srv.pem"), &dir.join("srv.key"))),
    );
    let url = format!("https://127.0.0.1:{}/disk.img", srv.port);

    // Verification is on: the public roots do not know this CA.
    let e = Source::open(&Location::parse(&url), &HttpConfig::default()).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Network);
    let msg = format!("{e}");
    assert!(msg.contains(&url) && msg.contains("CA file"), "{msg}");

    let http = HttpConfig {
        ca_file: Some(dir.join("ca.pem")),
        ..Default::default()
    };
    let mut s = Source::open(&Location::parse(&url), &http).unwrap();
    assert!(read_all(s.stream().unwrap()) == data);
    assert!(read_all(s.read_range(1000, 5000).unwrap()) == data[1000..6000]);

    // A CA file that is not the server's CA is still rejected.
    let other = HttpConfig {
        ca_file: Some(dir.join("srv.pem")),
        ..Default::default()
    };
    assert!(Source::open(&Location::parse(&url), &other).is_err());
}

#[test]
fn upload_puts_a_chunked_body() {
    let dir = Scratch::new("source-put");
    let file = dir.join("disk.img");
    std::fs::write(&file, b"x").unwrap();
    let srv = python_server(&dir, &file, "plain", 0, None);
    let data = sample_bytes(16, 2_000_000);
    let url = format!("http://127.0.0.1:{}/upload.img", srv.port);
    upload(
        &url,
        &HttpConfig::default(),
        std::io::Cursor::new(data.clone()),
    )
    .unwrap();
    assert!(std::fs::read(dir.join("disk.img.put")).unwrap() == data);
    assert_eq!(srv.requests(), vec!["PUT chunked"]);
}
