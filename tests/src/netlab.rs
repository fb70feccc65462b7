//! A network lab for the discovery and check-in suites: two network namespaces (a server
//! side and a client side) joined by a veth pair named `eth0` on both sides, the processes
//! started in them, and the real dnsmasq; everything is torn down when the lab is dropped.
//! Nothing is ever created in the host's namespace. Needs root and iproute2.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{require_tool, run, Scratch};

/// Runs `ip ARGS`, panicking with its stderr when it fails.
pub fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// Two namespaces joined by a veth pair, with the processes started in them.
pub struct NetLab {
    /// The server side: dnsmasq, servers, relays.
    pub server_ns: String,
    /// The client side: the device under test.
    pub client_ns: String,
    /// More namespaces (other networks a second client NIC leads to).
    pub extra_ns: Vec<String>,
    pub dir: Scratch,
    /// Killed (and reaped) on drop.
    pub children: Vec<Child>,
    /// /etc/netns/<client_ns>, when [`NetLab::client_resolv_conf`] made it.
    etc_netns: Option<PathBuf>,
}

impl NetLab {
    /// A lab whose namespaces are named `<prefix>S<id>` and `<prefix>C<id>` (unique per test
    /// process and lab), with `server_ips` (each a /24) on the server's `eth0`, and
    /// `client_mac` as the client's `eth0` address when the test needs a fixed one.
    pub fn new(prefix: &str, server_ips: &[&str], client_mac: Option<&str>) -> NetLab {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        require_tool("ip");
        let id = format!(
            "{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let lab = NetLab {
            server_ns: format!("{prefix}S{id}"),
            client_ns: format!("{prefix}C{id}"),
            extra_ns: Vec::new(),
            dir: Scratch::new(&format!("netlab-{prefix}")),
            children: Vec::new(),
            etc_netns: None,
        };
        ip(&["netns", "add", &lab.server_ns]);
        ip(&["netns", "add", &lab.client_ns]);
        // Created directly inside the namespaces: no name ever appears in the host's.
        let mut link = vec![
            "link",
            "add",
            "eth0",
            "netns",
            &lab.server_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
        ];
        if let Some(mac) = client_mac {
            link.extend(["address", mac]);
        }
        link.extend(["netns", &lab.client_ns]);
        ip(&link);
        for a in server_ips {
            lab.sip(&["addr", "add", &format!("{a}/24"), "dev", "eth0"]);
        }
        lab.sip(&["link", "set", "eth0", "up"]);
        lab.sip(&["link", "set", "lo", "up"]);
        lab.cip(&["link", "set", "lo", "up"]);
        lab
    }

    /// `ip ARGS` inside the server namespace.
    pub fn sip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.server_ns.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// `ip ARGS` inside the client namespace.
    pub fn cip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.client_ns.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// A command that runs `program` inside the server namespace.
    pub fn in_server(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.server_ns]).arg(program);
        c
    }

    /// A command that runs `program` inside the client namespace.
    pub fn in_client(&self, program: impl AsRef<OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.client_ns]).arg(program);
        c
    }

    /// An empty /etc/netns/<client>/resolv.conf: a device that writes its lease's DNS
    /// servers to /etc/resolv.conf writes this file (ip netns exec bind-mounts it), never
    /// the host's. Removed on drop.
    pub fn client_resolv_conf(&mut self) {
        let etc = PathBuf::from("/etc/netns").join(&self.client_ns);
        std::fs::create_dir_all(&etc).expect("creating /etc/netns/<client>");
        std::fs::write(etc.join("resolv.conf"), "").expect("writing resolv.conf");
        self.etc_netns = Some(etc);
    }

    /// The real dnsmasq in the server namespace with `conf` (its log goes to
    /// [`NetLab::dnsmasq_log`]); returns once it has bound its sockets.
    pub fn dnsmasq(&mut self, conf: &str) {
        require_tool("dnsmasq");
        let path = self.dir.join("dnsmasq.conf");
        std::fs::write(
            &path,
            format!(
                "{conf}\nlog-facility={}\n",
                self.dir.join("dnsmasq.log").display()
            ),
        )
        .expect("writing dnsmasq.conf");
        let stderr = std::fs::File::create(self.dir.join("dnsmasq.stderr")).unwrap();
        let child = self
            .in_server("dnsmasq")
            .arg("--no-daemon")
            .arg(format!("--conf-file={}", path.display()))
            .arg(format!(
                "--pid-file={}",
                self.dir.join("dnsmasq.pid").display()
            ))
            .arg(format!(
                "--dhcp-leasefile={}",
                self.dir.join("leases").display()
            ))
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("starting dnsmasq");
        self.children.push(child);
        // dnsmasq writes no pid file with --no-daemon; it logs "started" once its DHCP and
        // DNS sockets are bound, so that line is the readiness signal.
        let end = Instant::now() + Duration::from_secs(10);
        while !self.dnsmasq_log().contains("started, version") {
            if let Some(st) = self.children.last_mut().unwrap().try_wait().unwrap() {
                let err =
                    std::fs::read_to_string(self.dir.join("dnsmasq.stderr")).unwrap_or_default();
                panic!("dnsmasq exited with {st}: {err}");
            }
            assert!(
                Instant::now() < end,
                "dnsmasq did not start: {}",
                self.dnsmasq_log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// What dnsmasq has logged so far.
    pub fn dnsmasq_log(&self) -> String {
        std::fs::read_to_string(self.dir.join("dnsmasq.log")).unwrap_or_default()
    }

    /// A second client NIC `name`, linked to a new empty namespace (a network without any
    /// DHCP server); with `carrier` false the far end stays down (an unplugged cable).
    pub fn add_dead_nic(&mut self, name: &str, carrier: bool) {
        let ns = format!("{}d{}", self.client_ns, self.extra_ns.len());
        ip(&["netns", "add", &ns]);
        self.extra_ns.push(ns.clone());
        ip(&[
            "link",
            "add",
            name,
            "netns",
            &self.client_ns,
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            &ns,
        ]);
        if carrier {
            ip(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
    }
}

impl Drop for NetLab {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for ns in self
            .extra_ns
            .iter()
            .chain([&self.server_ns, &self.client_ns])
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        if let Some(etc) = &self.etc_netns {
            let _ = std::fs::remove_dir_all(etc);
        }
        if std::thread::panicking() && self.dir.join("dnsmasq.log").exists() {
            eprintln!("dnsmasq log:\n{}", self.dnsmasq_log());
        }
    }
}
