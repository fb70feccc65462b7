//! Finding the server, end to end (issue 3): the built `img` binary runs in a client network
//! namespace joined by a veth pair to a server namespace holding the real dnsmasq (DHCP and
//! DNS) and small real HTTP/HTTPS servers (python3 http.server) as the candidates. Every test
//! makes its own pair of namespaces (named after the pid and a counter), so the suites run in
//! parallel and all traffic stays inside them; a guard removes the namespaces and stops the
//! processes even when a test fails.
//!
//! Needs root (network namespaces), dnsmasq, python3, openssl, iproute2.

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use e2e::{require_tool, run, NetLab};
use serde_json::Value;

/// The server side of every lab: 10.77.0.1 runs dnsmasq; .10/.11/.12/.13 carry servers.
const DHCP_IP: &str = "10.77.0.1";

/// A tiny HTTP or HTTPS server (python3's http.server) that says "ready" once bound.
const PY_SERVER: &str = r#"
import http.server, ssl, sys
ip, port = sys.argv[1], int(sys.argv[2])
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200); self.end_headers(); self.wfile.write(b"ok")
    do_HEAD = do_GET
    def log_message(self, *a): pass
class S(http.server.ThreadingHTTPServer):
    def handle_error(self, *a): pass
s = S((ip, port), H)
if len(sys.argv) > 3:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER); ctx.load_cert_chain(sys.argv[3])
    s.socket = ctx.wrap_socket(s.socket, server_side=True)
print("ready", flush=True)
s.serve_forever()
"#;

/// A stand-in for the Cisco VXC Manager proxyDHCP service on port 4011: answers any DHCP
/// request whose option 60 is RTIAgent with a DHCPACK carrying options 186 and 192.
const PY_PROXY: &str = r#"
import socket, struct, sys
ip, server, port = sys.argv[1], sys.argv[2], int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
s.bind((ip, 4011))
print("ready", flush=True)
while True:
    data, peer = s.recvfrom(1500)
    if len(data) < 240 or b"RTIAgent" not in data[240:]:
        continue
    reply = bytearray(data[:240])
    reply[0] = 2
    opts = bytes([53, 1, 5, 54, 4]) + socket.inet_aton(ip)
    opts += bytes([186, 4]) + socket.inet_aton(server) + bytes([192, 2]) + struct.pack(">H", port)
    s.sendto(bytes(reply) + opts + bytes([255]), peer)
"#;

/// The `img` under test, located (and built) once per test binary rather than per call.
fn img_bin() -> &'static std::path::Path {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(e2e::img_bin)
}

/// The shared two-namespace lab (`e2e::NetLab`: veth `eth0` on both sides, torn down on
/// drop) with this suite's servers: dnsmasq for lab.example, Python HTTP(S) servers and a
/// proxy-DHCP responder.
struct Lab {
    net: NetLab,
}

impl std::ops::Deref for Lab {
    type Target = NetLab;
    fn deref(&self) -> &NetLab {
        &self.net
    }
}

impl std::ops::DerefMut for Lab {
    fn deref_mut(&mut self) -> &mut NetLab {
        &mut self.net
    }
}

impl Lab {
    fn new() -> Lab {
        for t in ["ip", "dnsmasq", "python3", "openssl"] {
            require_tool(t);
        }
        let ips = [
            "10.77.0.1",
            "10.77.0.10",
            "10.77.0.11",
            "10.77.0.12",
            "10.77.0.13",
        ];
        Lab {
            net: NetLab::new("dsc", &ips, None),
        }
    }

    /// Starts `cmd` in the server namespace and waits for its first stdout line "ready".
    fn spawn_ready(&mut self, args: &[&str]) {
        let mut child = Command::new("ip")
            .args(["netns", "exec", &self.server_ns])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("starting {args:?}: {e}"));
        let out = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(out).read_line(&mut line);
            let _ = tx.send(line);
        });
        self.children.push(child);
        let line = rx.recv_timeout(Duration::from_secs(15)).unwrap_or_default();
        assert_eq!(line.trim(), "ready", "{args:?} did not start");
    }

    fn http(&mut self, ip: &str, port: u16) {
        let script = self.write("server.py", PY_SERVER);
        self.spawn_ready(&["python3", &script, ip, &port.to_string()]);
    }

    fn https(&mut self, ip: &str, port: u16) {
        let script = self.write("server.py", PY_SERVER);
        let pem = self.dir.join("cert.pem");
        if !pem.exists() {
            let (k, c) = (self.dir.join("k.pem"), self.dir.join("c.pem"));
            run(Command::new("openssl")
                .args([
                    "req",
                    "-x509",
                    "-nodes",
                    "-days",
                    "1",
                    "-subj",
                    "/CN=vxcmserver",
                    "-newkey",
                    "ec",
                    "-pkeyopt",
                    "ec_paramgen_curve:prime256v1",
                    "-keyout",
                ])
                .arg(&k)
                .arg("-out")
                .arg(&c)
                .stderr(Stdio::null()));
            let mut both = std::fs::read(&k).unwrap();
            both.extend(std::fs::read(&c).unwrap());
            std::fs::write(&pem, both).unwrap();
        }
        let pem = pem.display().to_string();
        self.spawn_ready(&["python3", &script, ip, &port.to_string(), &pem]);
    }

    fn proxy_dhcp(&mut self, server: &str, port: u16) {
        let script = self.write("proxy.py", PY_PROXY);
        self.spawn_ready(&["python3", &script, DHCP_IP, server, &port.to_string()]);
    }

    fn write(&self, name: &str, text: &str) -> String {
        let p = self.dir.join(name);
        std::fs::write(&p, text).unwrap();
        p.display().to_string()
    }

    /// The real dnsmasq as DHCP and DNS server for lab.example, plus `extra` lines.
    fn dnsmasq(&mut self, extra: &str) {
        self.net.dnsmasq(&format!(
            "interface=eth0\nbind-interfaces\nexcept-interface=lo\nlisten-address={DHCP_IP}\n\
             no-resolv\nno-hosts\nno-ping\nuser=root\nlog-dhcp\nlog-queries=extra\n\
             dhcp-range=10.77.0.100,10.77.0.200,255.255.255.0,1h\ndomain=lab.example\n{extra}\n",
        ));
    }

    fn log(&self) -> String {
        self.dnsmasq_log()
    }

    fn config_dir(&self) -> PathBuf {
        self.dir.join("bootpart")
    }

    /// Runs `img` in the client namespace with the lab's boot-partition config directory.
    fn img(&self, args: &[&str]) -> Output {
        Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .arg(img_bin())
            .args(args)
            .arg(format!("-config={}", self.config_dir().display()))
            .output()
            .expect("running img")
    }

    /// `img -discover -json ...`: the parsed report and the exit code.
    fn discover(&self, args: &[&str]) -> (Value, i32) {
        let mut a = vec!["-discover", "-json"];
        a.extend_from_slice(args);
        let out = self.img(&a);
        let text = String::from_utf8_lossy(&out.stdout);
        let v: Value = serde_json::from_str(&text).unwrap_or_else(|e| {
            panic!(
                "img -discover printed no JSON ({e}):\n{text}\nstderr:\n{}\ndnsmasq:\n{}",
                String::from_utf8_lossy(&out.stderr),
                self.log()
            )
        });
        (v, out.status.code().unwrap_or(-1))
    }
}

/// (url, source, verdict) of every candidate.
fn candidates(v: &Value) -> Vec<(String, String, String)> {
    v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| {
            (
                c["url"].as_str().unwrap().to_string(),
                c["source"].as_str().unwrap().to_string(),
                c["verdict"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn chosen(v: &Value) -> (String, String) {
    let c = &v["chosen"];
    assert!(!c.is_null(), "no server chosen: {v:#}");
    (
        c["url"].as_str().unwrap().into(),
        c["source"].as_str().unwrap().into(),
    )
}

fn s(x: &str) -> String {
    x.to_string()
}

// ---- source 1: DHCP options ---------------------------------------------------------------

#[test]
fn dhcp_options_186_190_192_secure_port_first() {
    let mut lab = Lab::new();
    lab.https("10.77.0.10", 443);
    lab.http("10.77.0.10", 80);
    lab.dnsmasq("dhcp-option=186,10.77.0.10\ndhcp-option=190,00:01:bb\ndhcp-option=192,80s");
    let resolv = lab.dir.join("resolv.conf");
    let (v, code) = lab.discover(&["-all", &format!("-resolvconf={}", resolv.display())]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v), (s("https://10.77.0.10:443"), s("dhcp-options")));
    let resolv = std::fs::read_to_string(resolv).unwrap();
    assert!(
        resolv.contains("search lab.example") && resolv.contains("nameserver 10.77.0.1"),
        "{resolv}"
    );
    assert_eq!(
        candidates(&v)[..2],
        [
            (
                s("https://10.77.0.10:443"),
                s("dhcp-options"),
                s("reachable")
            ),
            (s("http://10.77.0.10:80"), s("dhcp-options"), s("reachable")),
        ]
    );
    // The lease is configured and reported for the check-in.
    let lease = &v["lease"];
    assert_eq!(lease["domain"], "lab.example");
    assert_eq!(lease["dns_servers"][0], DHCP_IP);
    assert_eq!(lease["vxcm"]["secure_port"], 443);
    let addr = e2e::sh(&format!("ip -n {} -4 addr show eth0", lab.client_ns));
    assert!(addr.contains(lease["ip"].as_str().unwrap()), "{addr}");
}

#[test]
fn kernel_command_line_server_comes_first_and_the_lease_is_still_configured() {
    let mut lab = Lab::new();
    lab.https("10.77.0.10", 443);
    lab.http("10.77.0.10", 8088);
    lab.dnsmasq("dhcp-option=186,10.77.0.10\ndhcp-option=190,00:01:bb");
    // What the boot agent does with img.server= on the kernel command line.
    let (v, code) = lab.discover(&["-server=http://10.77.0.10:8088"]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v), (s("http://10.77.0.10:8088"), s("url-list")));
    assert_eq!(candidates(&v)[0].0, "http://10.77.0.10:8088");
    let addr = e2e::sh(&format!("ip -n {} -4 addr show eth0", lab.client_ns));
    assert!(addr.contains(v["lease"]["ip"].as_str().unwrap()), "{addr}");
}

#[test]
fn dhcp_option_legacy_187_only_without_192() {
    let mut lab = Lab::new();
    lab.http("10.77.0.10", 8080);
    lab.dnsmasq("dhcp-option-force=186,10.77.0.10\ndhcp-option-force=187,8080s");
    let (v, _) = lab.discover(&[]);
    assert_eq!(chosen(&v), (s("http://10.77.0.10:8080"), s("dhcp-options")));
    assert!(v["chosen"]["detail"].as_str().unwrap().contains("187"));

    // With 192 present, 187 is not used.
    let mut lab = Lab::new();
    lab.http("10.77.0.10", 80);
    lab.dnsmasq(
        "dhcp-option-force=186,10.77.0.10\ndhcp-option-force=187,8080s\ndhcp-option-force=192,80s",
    );
    let (v, _) = lab.discover(&["-all"]);
    let urls: Vec<String> = candidates(&v)
        .into_iter()
        .filter(|c| c.1 == "dhcp-options")
        .map(|c| c.0)
        .collect();
    assert_eq!(urls, [s("http://10.77.0.10:80")]);
}

#[test]
fn dhcp_options_encapsulated_in_option_43() {
    let mut lab = Lab::new();
    lab.https("10.77.0.11", 8443);
    // dnsmasq encapsulates vendor:<class> options in option 43 for clients sending that
    // vendor class; the agent's default option 60 is "BootAgent".
    lab.dnsmasq(
        "dhcp-option=vendor:BootAgent,186,10.77.0.11\ndhcp-option=vendor:BootAgent,190,8443s",
    );
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(
        chosen(&v),
        (s("https://10.77.0.11:8443"), s("dhcp-options"))
    );
    assert!(v["chosen"]["detail"]
        .as_str()
        .unwrap()
        .contains("option 43"));
    assert_eq!(v["lease"]["vxcm"]["from_option_43"], true);
}

#[test]
fn malformed_options_are_ignored_and_the_next_source_used() {
    let mut lab = Lab::new();
    lab.http("10.77.0.12", 80);
    // A 3-byte address and a 5-byte port: ignored with a note, never a crash.
    lab.dnsmasq("dhcp-option-force=186,0a:4d:00\ndhcp-option-force=192,00:00:00:00:50\nhost-record=vxcmserver.lab.example,10.77.0.12");
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v).1, "dns-host");
    let notes = v["lease"]["notes"].to_string();
    assert!(
        notes.contains("option 186 ignored") && notes.contains("option 192 ignored"),
        "{notes}"
    );
}

// ---- source 2: the URL list ---------------------------------------------------------------

#[test]
fn url_list_alone_with_domain_appending_and_unreachable_first_entry() {
    let mut lab = Lab::new();
    lab.http("10.77.0.12", 80);
    lab.dnsmasq("host-record=srv2.lab.example,10.77.0.12");
    // Set through the img command, as an operator would.
    let out = lab.img(&["-serverurl", "10.77.0.13:81; srv2:80"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    let c = candidates(&v);
    assert_eq!(
        c[0],
        (s("https://10.77.0.13:81"), s("url-list"), s("rejected"))
    );
    assert_eq!(
        c[1],
        (
            s("http://srv2.lab.example:80"),
            s("url-list"),
            s("reachable")
        )
    );
    assert_eq!(v["chosen"]["address"], "10.77.0.12");
}

// ---- source 3: RTIAgent -------------------------------------------------------------------

#[test]
fn rtiagent_vendor_class_options_from_the_dhcp_server() {
    let mut lab = Lab::new();
    lab.http("10.77.0.11", 80);
    lab.dnsmasq("dhcp-vendorclass=set:rti,RTIAgent\ndhcp-option-force=tag:rti,186,10.77.0.11\ndhcp-option-force=tag:rti,192,80s");
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v), (s("http://10.77.0.11:80"), s("rti-agent")));
    // The ordinary lease did not carry them.
    assert!(v["lease"]["vxcm"]["server"].is_null());
}

#[test]
fn rtiagent_options_from_a_proxy_dhcp_on_port_4011() {
    let mut lab = Lab::new();
    lab.http("10.77.0.13", 8000);
    lab.proxy_dhcp("10.77.0.13", 8000);
    lab.dnsmasq("");
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v), (s("http://10.77.0.13:8000"), s("rti-agent")));
}

// ---- sources 4 and 5: DNS -----------------------------------------------------------------

#[test]
fn dns_srv_priority_then_weight_order() {
    let mut lab = Lab::new();
    lab.http("10.77.0.11", 80);
    lab.https("10.77.0.12", 443);
    lab.dnsmasq(
        "srv-host=_VXCMServer._tcp.lab.example,dead.lab.example,80,10,0\n\
         srv-host=_VXCMServer._tcp.lab.example,light.lab.example,80,20,0\n\
         srv-host=_VXCMServer._tcp.lab.example,heavy.lab.example,443,20,100\n\
         srv-host=_VXCMServer._tcp.lab.example,last.lab.example,80,30,5\n\
         host-record=dead.lab.example,10.77.0.13\nhost-record=light.lab.example,10.77.0.11\n\
         host-record=heavy.lab.example,10.77.0.12\nhost-record=last.lab.example,10.77.0.11",
    );
    let (v, code) = lab.discover(&["-all"]);
    assert_eq!(code, 0);
    let srv: Vec<String> = v["candidates"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["source"] == "dns-srv")
        .map(|c| {
            c["detail"]
                .as_str()
                .unwrap()
                .split(" -> ")
                .nth(1)
                .unwrap()
                .split(' ')
                .next()
                .unwrap()
                .to_string()
        })
        .collect();
    assert_eq!(
        srv,
        [
            "dead.lab.example",
            "heavy.lab.example",
            "light.lab.example",
            "last.lab.example"
        ]
    );
    // The lowest priority's only target has no server: the weighted one of the next wins.
    assert_eq!(chosen(&v), (s("https://10.77.0.12:443"), s("dns-srv")));
}

#[test]
fn dns_host_name_alone_uses_http_80() {
    let mut lab = Lab::new();
    lab.http("10.77.0.10", 80);
    lab.dnsmasq("host-record=vxcmserver.lab.example,10.77.0.10");
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(
        chosen(&v),
        (s("http://vxcmserver.lab.example:80"), s("dns-host"))
    );
    // The names are configurable.
    let mut lab = Lab::new();
    lab.http("10.77.0.11", 80);
    lab.dnsmasq("host-record=mgmt.lab.example,10.77.0.11\nsrv-host=_Mgmt._tcp.lab.example,mgmt.lab.example,80");
    let (v, _) = lab.discover(&["-host=mgmt", "-srv=_Mgmt._tcp"]);
    assert_eq!(chosen(&v).1, "dns-srv");
}

// ---- the order of the sources, unreachable candidates -------------------------------------

#[test]
fn all_sources_present_are_tried_in_the_seeds_order() {
    let mut lab = Lab::new();
    for host in 10..=13 {
        lab.http(&format!("10.77.0.{host}"), 80);
    }
    lab.dnsmasq(
        "dhcp-option-force=186,10.77.0.10\ndhcp-option-force=192,80s\n\
         dhcp-vendorclass=set:rti,RTIAgent\ndhcp-option-force=tag:rti,186,10.77.0.12\ndhcp-option-force=tag:rti,192,80s\n\
         srv-host=_VXCMServer._tcp.lab.example,srv.lab.example,80\nhost-record=srv.lab.example,10.77.0.13\n\
         host-record=vxcmserver.lab.example,10.77.0.13",
    );
    assert!(lab
        .img(&["-serverurl", "http://10.77.0.11"])
        .status
        .success());
    let (v, _) = lab.discover(&[]);
    assert_eq!(chosen(&v), (s("http://10.77.0.10:80"), s("dhcp-options")));
    assert_eq!(
        v["candidates"].as_array().unwrap().len(),
        1,
        "stops at the first that answers"
    );
    let (v, _) = lab.discover(&["-all"]);
    let order: Vec<String> = candidates(&v).into_iter().map(|c| c.1).collect();
    assert_eq!(
        order,
        [
            "dhcp-options",
            "url-list",
            "rti-agent",
            "dns-srv",
            "dns-host"
        ]
    );
}

#[test]
fn unreachable_first_candidates_are_logged_and_skipped() {
    let mut lab = Lab::new();
    lab.http("10.77.0.10", 80);
    // 10.77.0.10:8443 refuses; 10.77.0.99 does not exist (connect times out).
    lab.dnsmasq("dhcp-option=186,10.77.0.10\ndhcp-option=190,8443s\nhost-record=vxcmserver.lab.example,10.77.0.10");
    assert!(lab
        .img(&["-serverurl", "http://10.77.0.99"])
        .status
        .success());
    let (v, code) = lab.discover(&["-probe-timeout=0.5"]);
    assert_eq!(code, 0);
    let c = candidates(&v);
    assert_eq!(
        c[0],
        (
            s("https://10.77.0.10:8443"),
            s("dhcp-options"),
            s("rejected")
        )
    );
    assert_eq!(
        c[1],
        (s("http://10.77.0.99:80"), s("url-list"), s("rejected"))
    );
    assert_eq!(chosen(&v).1, "dns-host");
    let reasons = v["candidates"][0]["reason"].as_str().unwrap();
    assert!(reasons.contains("refused"), "{reasons}");
    // The human-readable report lists the same, with the reasons.
    let out = lab.img(&["-discover", "-probe-timeout=0.5"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("rejected")
            && text.contains("chosen server: http://vxcmserver.lab.example:80"),
        "{text}"
    );
}

#[test]
fn several_nics_the_one_with_a_dhcp_server_wins() {
    let mut lab = Lab::new();
    lab.add_dead_nic("eth1", true);
    lab.add_dead_nic("eth2", false);
    lab.http("10.77.0.10", 80);
    lab.dnsmasq("dhcp-option=186,10.77.0.10\ndhcp-option=192,80s");
    let (v, code) = lab.discover(&["-dhcp-timeout=5"]);
    assert_eq!(code, 0);
    assert_eq!(v["lease"]["iface"], "eth0");
    assert_eq!(chosen(&v).0, "http://10.77.0.10:80");
    // The unplugged NIC is skipped and said so.
    let log = v["log"].to_string();
    assert!(log.contains("eth2") && log.contains("no link"), "{log}");
}

// ---- no DHCP: static configuration, and nothing at all ------------------------------------

#[test]
fn static_configuration_without_any_dhcp_server() {
    let mut lab = Lab::new();
    lab.http("10.77.0.10", 8080);
    let out = lab.img(&[
        "-netconfig",
        "ip=10.77.0.50",
        "mask=255.255.255.0",
        "gw=10.77.0.1",
        "server=10.77.0.10",
        "port=8080",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (v, code) = lab.discover(&[]);
    assert_eq!(code, 0);
    assert_eq!(chosen(&v), (s("http://10.77.0.10:8080"), s("static")));
    assert!(v["lease"].is_null());
    let addr = e2e::sh(&format!(
        "ip -n {} -4 addr show eth0; ip -n {} route",
        lab.client_ns, lab.client_ns
    ));
    assert!(
        addr.contains("10.77.0.50/24") && addr.contains("default via 10.77.0.1"),
        "{addr}"
    );
    // Cleared: back to DHCP, and with none there is no server.
    assert!(lab.img(&["-netconfig", "clear"]).status.success());
    let (v, code) = lab.discover(&["-dhcp-timeout=1.5"]);
    assert_eq!(code, 9);
    assert!(v["chosen"].is_null());
}

/// Runs `img -findserver` (the boot flow) with `keys` typed at its console. They are written
/// at once: the pipe holds them until the flow reads a key, as a terminal's input queue does
/// (no timing guess).
fn findserver(lab: &Lab, keys: &[u8]) -> (String, i32) {
    let mut child = Command::new("ip")
        .args(["netns", "exec", &lab.client_ns])
        .arg(img_bin())
        .args(["-findserver", "-dhcp-timeout=1.5"])
        .arg(format!("-config={}", lab.config_dir().display()))
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(keys).unwrap();
    // Keep the console open (no end of input) until the flow is over.
    let out = child.wait_with_output().unwrap();
    drop(stdin);
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        out.status.code().unwrap_or(-1),
    )
}

const SEED_MESSAGE: &str = "NO HSERVER CONFIGURED OR UNABLE TO CONNECT TO SERVER. Boot to guest OS in flash? (Press ESC/No in 5 seconds to return to Boot Agent desktop)";

#[test]
fn nothing_anywhere_no_key_boots_the_guest_os() {
    let lab = Lab::new();
    let (out, code) = findserver(&lab, b"");
    assert!(out.lines().any(|l| l == SEED_MESSAGE), "{out}");
    assert!(out.contains("outcome: guest-os"), "{out}");
    assert_eq!(code, 9);
}

#[test]
fn nothing_anywhere_esc_returns_to_the_operator_console() {
    let lab = Lab::new();
    let (out, code) = findserver(&lab, b"\x1b");
    assert!(out.lines().any(|l| l == SEED_MESSAGE), "{out}");
    assert!(out.contains("outcome: operator-console"), "{out}");
    assert_eq!(code, 9);
}

// ---- lease renewal for long jobs ------------------------------------------------------------

/// Runs `f` on a thread that has entered the network namespace `ns` (threads it spawns stay
/// in it too), so the library's DHCP client can be driven in-process.
fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> T {
    let file = std::fs::File::open(format!("/run/netns/{ns}")).expect("opening the netns");
    std::thread::spawn(move || {
        use std::os::fd::AsRawFd;
        #[allow(unsafe_code)]
        // SAFETY: setns(2) on a valid namespace fd we hold open; it only changes this thread.
        let rc = unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) };
        assert_eq!(rc, 0, "setns: {}", std::io::Error::last_os_error());
        f()
    })
    .join()
    .expect("netns thread panicked")
}

#[test]
fn lease_renewal_and_rebinding_keep_the_address() {
    use discovery::dhcp::{DhcpParams, DhcpSocket};
    use discovery::{LeaseKeeper, NetworkSetup, Nic, SystemNetwork};
    use std::sync::atomic::AtomicBool;
    use std::sync::Arc;

    let mut lab = Lab::new();
    lab.dnsmasq("");
    let link = e2e::sh(&format!("ip -n {} -br link show eth0", lab.client_ns));
    let mac = discovery::netif::parse_mac(link.split_whitespace().nth(2).unwrap()).unwrap();
    let (first, renewed, rebound, kept_ip, renewals) = in_netns(&lab.client_ns, move || {
        let net = SystemNetwork::default();
        net.set_up("eth0").unwrap();
        let nic = Nic {
            name: "eth0".into(),
            mac,
        };
        let params = DhcpParams::default();
        let sock = DhcpSocket::open(&nic).unwrap();
        let lease = sock.obtain_lease(&params, &AtomicBool::new(false)).unwrap();
        lease.configure(&net).unwrap();
        let renewed = sock.renew(&lease, &params, false).unwrap();
        let rebound = sock.renew(&lease, &params, true).unwrap();
        drop(sock);
        // The keeper renews at T1; pretend the server asked for T1 = 2 s.
        let mut short = rebound.clone();
        short.renew_secs = 2;
        short.rebind_secs = 3;
        let start = short.obtained;
        let keeper = LeaseKeeper::spawn(short, params, Arc::new(SystemNetwork::default()));
        let end = Instant::now() + Duration::from_secs(20);
        while keeper.lease().obtained == start && Instant::now() < end {
            std::thread::sleep(Duration::from_millis(100));
        }
        let after = keeper.lease();
        keeper.stop();
        (
            lease.ip,
            renewed.ip,
            rebound.ip,
            after.ip,
            after.obtained != start,
        )
    });
    assert_eq!(renewed, first);
    assert_eq!(rebound, first);
    assert_eq!(kept_ip, first);
    assert!(renewals, "the lease keeper did not renew");
    // dnsmasq saw the unicast renewals and the broadcast rebinding as DHCPREQUESTs.
    let requests = lab.log().matches("DHCPREQUEST").count();
    assert!(requests >= 4, "{}", lab.log());
}

#[test]
fn dns_answers_too_big_for_udp_are_fetched_over_tcp() {
    let mut lab = Lab::new();
    lab.http("10.77.0.11", 80);
    // 24 SRV targets with long names: far over the 512 bytes of a plain UDP answer, so
    // dnsmasq sets TC and the resolver must repeat the query over TCP.
    let mut conf = String::new();
    for i in 0..24 {
        let name =
            format!("a-rather-long-target-name-for-the-management-server-{i:02}.lab.example");
        conf.push_str(&format!(
            "srv-host=_VXCMServer._tcp.lab.example,{name},80,{},0\n",
            10 + i
        ));
        let host = if i == 23 { "10.77.0.11" } else { "10.77.0.13" };
        conf.push_str(&format!("host-record={name},{host}\n"));
    }
    lab.dnsmasq(&conf);
    let (v, code) = lab.discover(&["-probe-timeout=0.3", "-all"]);
    assert_eq!(code, 0, "{v:#}");
    assert_eq!(chosen(&v).1, "dns-srv");
    let srv = candidates(&v)
        .into_iter()
        .filter(|c| c.1 == "dns-srv")
        .count();
    assert_eq!(srv, 24);
    let log = v["log"].to_string();
    assert!(log.contains("read over TCP"), "{log}");
    // dnsmasq saw the query twice: over UDP, then over TCP.
    assert!(lab.log().matches("query[SRV]").count() >= 2);
}

#[test]
fn esc_at_start_up_clears_the_static_configuration() {
    let lab = Lab::new();
    let out = lab.img(&[
        "-netconfig",
        "ip=10.77.0.50",
        "mask=255.255.255.0",
        "server=10.77.0.10",
    ]);
    assert!(out.status.success());
    // Esc in the start-up window, then an empty client address: "use DHCP from now on".
    let (out, code) = findserver(&lab, b"\x1b\n");
    assert!(out.contains("Static configuration cleared"), "{out}");
    assert!(!lab.config_dir().join("netconfig.conf").exists());
    // No DHCP server either: the fallback, and with no more keys the guest OS.
    assert!(out.contains("outcome: guest-os"), "{out}");
    assert_eq!(code, 9);
}
