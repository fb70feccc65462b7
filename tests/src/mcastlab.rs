//! A multicast lab in network namespaces: one bridge, any number of nodes (masters and
//! clients) each in its own namespace on a veth, per-port packet loss with nftables and a
//! slow port with `tc tbf`, and the processes started in the nodes. Nothing touches the host's
//! network: the bridge lives in a hub namespace of its own, and every veth is created
//! directly inside the namespaces (no name ever appears in the host's).
//!
//! ```text
//!   [ns m0] eth0 ─┐                        ┌─ eth0 [ns c0]
//!                 pm0 ── br0 (hub ns) ── pc0
//!   [ns m1] eth0 ─ pm1                     pc1 ─ eth0 [ns c1] ...
//! ```
//!
//! Loss is injected on the way out of a bridge port (`oifname "pc3" numgen random mod 100 < N
//! drop`), so each node sees its own independent loss, in both directions when the master's
//! port has loss too. This kernel has no netem; nftables' `numgen` is the loss generator.
//! Everything (processes, namespaces, and with them the bridge, veths, rules and qdiscs) is
//! torn down when the lab is dropped, also when a test fails half-way.

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use crate::{require_tool, run, tail, Scratch};

pub mod room;

/// The lab's subnet: masters are .1, .2, ...; clients .101, .102, ...
const SUBNET: &str = "10.88.0";

/// One node: its namespace, the bridge port that leads to it, and its address.
#[derive(Clone, Debug)]
pub struct Node {
    pub name: String,
    pub ns: String,
    /// The veth end in the hub namespace, enslaved to the bridge.
    pub port: String,
    pub ip: String,
}

/// How a process started in the lab ended.
#[derive(Debug)]
pub struct Finished {
    /// Exit code, or `None` when a signal ended it.
    pub code: Option<i32>,
    pub wall: Duration,
    /// User + system CPU time of the process (from `wait4`).
    pub cpu: Duration,
    /// stdout and stderr, interleaved as written.
    pub output: String,
}

impl Finished {
    pub fn ok(&self) -> bool {
        self.code == Some(0)
    }
}

/// A process started in a node; [`McastLab::wait`] / [`McastLab::kill`] take its id.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Pid(usize);

struct Proc {
    label: String,
    child: Child,
    log: PathBuf,
    started: Instant,
    reaped: bool,
}

pub struct McastLab {
    id: String,
    hub: String,
    nodes: Vec<Node>,
    procs: Vec<Proc>,
    /// Loss in percent per bridge port.
    loss: Vec<(String, u32)>,
    dir: Scratch,
}

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

impl McastLab {
    /// A bridge with `masters` master nodes (`m0`, `m1`, ...) and `clients` client nodes
    /// (`c0`, `c1`, ...), all up, addressed and with a multicast route.
    pub fn new(masters: usize, clients: usize) -> McastLab {
        for t in ["ip", "nft", "tc"] {
            require_tool(t);
        }
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("mc{}x{n}", std::process::id());
        let mut lab = McastLab {
            hub: format!("{id}hub"),
            id,
            nodes: Vec::new(),
            procs: Vec::new(),
            loss: Vec::new(),
            dir: Scratch::new("mcastlab"),
        };
        ip(&["netns", "add", &lab.hub]);
        lab.hub_ip(&["link", "set", "lo", "up"]);
        // Snooping off: the bridge floods multicast to every port, as an unmanaged classroom
        // switch does; whether a receiver gets a group is then up to the receiver alone.
        lab.hub_ip(&[
            "link",
            "add",
            "br0",
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ]);
        lab.hub_ip(&["link", "set", "br0", "up"]);
        for i in 0..masters {
            lab.add_node(&format!("m{i}"), &format!("{SUBNET}.{}", i + 1));
        }
        for i in 0..clients {
            lab.add_node(&format!("c{i}"), &format!("{SUBNET}.{}", i + 101));
        }
        lab
    }

    fn add_node(&mut self, name: &str, addr: &str) {
        let ns = format!("{}{name}", self.id);
        let port = format!("p{name}");
        ip(&["netns", "add", &ns]);
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port, "netns",
            &self.hub,
        ]);
        self.hub_ip(&["link", "set", &port, "master", "br0"]);
        self.hub_ip(&["link", "set", &port, "up"]);
        let node_ip = |args: &[&str]| {
            let mut a = vec!["-n", ns.as_str()];
            a.extend_from_slice(args);
            ip(&a);
        };
        node_ip(&["link", "set", "lo", "up"]);
        node_ip(&[
            "addr",
            "add",
            &format!("{addr}/24"),
            "brd",
            "+",
            "dev",
            "eth0",
        ]);
        node_ip(&["link", "set", "eth0", "up"]);
        node_ip(&["route", "add", "224.0.0.0/4", "dev", "eth0"]);
        self.nodes.push(Node {
            name: name.to_string(),
            ns,
            port,
            ip: addr.to_string(),
        });
    }

    fn hub_ip(&self, args: &[&str]) {
        let mut a = vec!["-n", self.hub.as_str()];
        a.extend_from_slice(args);
        ip(&a);
    }

    /// The node called `name` (`m0`, `c3`, ...).
    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("the lab has no node {name}"))
    }

    pub fn nodes(&self) -> &[Node] {
        &self.nodes
    }

    /// The lab's scratch folder (logs of the processes, and room for disks).
    pub fn dir(&self) -> &Scratch {
        &self.dir
    }

    /// Drop `percent` % of the packets leaving the bridge towards `node` (0 removes it).
    pub fn set_loss(&mut self, node: &str, percent: u32) {
        let port = self.node(node).port.clone();
        self.loss.retain(|(p, _)| *p != port);
        if percent > 0 {
            self.loss.push((port, percent));
        }
        self.apply_loss();
    }

    /// The same loss on every port, masters included.
    pub fn set_loss_everywhere(&mut self, percent: u32) {
        self.loss = if percent == 0 {
            Vec::new()
        } else {
            self.nodes
                .iter()
                .map(|n| (n.port.clone(), percent))
                .collect()
        };
        self.apply_loss();
    }

    fn apply_loss(&self) {
        let mut rules = String::from(
            "flush ruleset\ntable bridge lab {\n  chain ports {\n    type filter hook forward priority 0; policy accept;\n",
        );
        for (port, pct) in &self.loss {
            rules.push_str(&format!(
                "    oifname \"{port}\" numgen random mod 100 < {pct} counter drop\n"
            ));
        }
        rules.push_str("  }\n}\n");
        let file = self.dir.join("loss.nft");
        std::fs::write(&file, rules).expect("writing the nft rules");
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.hub,
            "nft",
            "-f",
            file.to_str().unwrap(),
        ]));
    }

    /// Packets dropped so far by the loss rules, per port (from the nft counters).
    pub fn dropped_packets(&self) -> Vec<(String, u64)> {
        let out =
            run(Command::new("ip").args(["netns", "exec", &self.hub, "nft", "list", "ruleset"]));
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| {
                let port = l.split('"').nth(1)?.to_string();
                let mut words = l.split_whitespace();
                words.find(|w| *w == "packets")?;
                Some((port, words.next()?.parse().ok()?))
            })
            .collect()
    }

    /// Limit the bridge's output towards `node` to `kbit` kbit/s with a token bucket (a slow
    /// device or a slow link: what exceeds the bucket's queue is dropped, as on a real switch).
    pub fn set_slow(&self, node: &str, kbit: u32) {
        let port = self.node(node).port.clone();
        run(Command::new("ip").args([
            "netns",
            "exec",
            &self.hub,
            "tc",
            "qdisc",
            "replace",
            "dev",
            &port,
            "root",
            "tbf",
            "rate",
            &format!("{kbit}kbit"),
            "burst",
            "32kbit",
            "latency",
            "400ms",
        ]));
    }

    /// Turn ARP off on every node's `eth0`: no node can then reach another by unicast (a
    /// unicast frame goes out to the sender's own hardware address, which the bridge drops),
    /// while the group's traffic, whose hardware address comes from the group address,
    /// still flows. Returns what `curl` in the first client says trying the first master's
    /// address, so a test can show that unicast between them is really gone.
    pub fn arp_off(&self) -> String {
        for n in &self.nodes {
            ip(&["-n", &n.ns, "link", "set", "eth0", "arp", "off"]);
            ip(&["-n", &n.ns, "neigh", "flush", "dev", "eth0"]);
        }
        let (Some(c), Some(m)) = (
            self.nodes.iter().find(|n| n.name.starts_with('c')),
            self.nodes.iter().find(|n| n.name.starts_with('m')),
        ) else {
            return String::new();
        };
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &c.ns,
                "curl",
                "-sS",
                "--connect-timeout",
                "2",
            ])
            .arg(format!("http://{}:9/", m.ip))
            .output()
            .expect("running curl");
        format!(
            "exit {:?}: {}",
            out.status.code(),
            String::from_utf8_lossy(&out.stderr).trim()
        )
    }

    /// Bytes a node has sent on its `eth0` so far (all protocols, link-layer headers
    /// included), from the kernel's interface statistics.
    pub fn tx_bytes(&self, node: &str) -> u64 {
        self.stat(node, "tx_bytes")
    }

    pub fn rx_bytes(&self, node: &str) -> u64 {
        self.stat(node, "rx_bytes")
    }

    fn stat(&self, node: &str, what: &str) -> u64 {
        let ns = self.node(node).ns.clone();
        let out = run(Command::new("ip").args([
            "netns",
            "exec",
            &ns,
            "cat",
            &format!("/sys/class/net/eth0/statistics/{what}"),
        ]));
        String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("interface statistic is a number")
    }

    /// Start `program args...` in `node`'s namespace, its output going to a log file.
    pub fn spawn(&mut self, node: &str, program: &std::path::Path, args: &[&str]) -> Pid {
        let ns = self.node(node).ns.clone();
        let n = self.procs.len();
        let label = format!("{node}#{n} {} {}", program.display(), args.join(" "));
        let log = self.dir.join(format!("proc{n}-{node}.log"));
        let file = std::fs::File::create(&log).expect("creating a process log");
        // `ip netns exec` enters the namespace and execs the program: the child's pid is the
        // program's own, so kill and wait4 reach it directly.
        // Each node is a device of its own: its own resume journals and its own (empty) set
        // of trusted signing keys, never the host's.
        let state = self.dir.join(format!("state-{node}"));
        let trusted = self.dir.join(format!("trusted-{node}"));
        std::fs::create_dir_all(&state).expect("creating a node's state folder");
        std::fs::create_dir_all(&trusted).expect("creating a node's key folder");
        let child = Command::new("ip")
            .args(["netns", "exec", &ns])
            .arg(program)
            .args(args)
            .env("IMG_STATE_DIR", &state)
            .env("IMG_TRUSTED_DIR", &trusted)
            .stdin(Stdio::null())
            .stdout(file.try_clone().expect("duplicating the log handle"))
            .stderr(file)
            .spawn()
            .unwrap_or_else(|e| panic!("starting {label}: {e}"));
        self.procs.push(Proc {
            label,
            child,
            log,
            started: Instant::now(),
            reaped: false,
        });
        Pid(n)
    }

    /// The output a process has written so far.
    pub fn output(&self, pid: Pid) -> String {
        std::fs::read_to_string(&self.procs[pid.0].log).unwrap_or_default()
    }

    /// Reap `pid` if it has ended (without blocking).
    pub fn try_wait(&mut self, pid: Pid) -> Option<Finished> {
        let p = &mut self.procs[pid.0];
        if p.reaped {
            panic!("{} was already reaped", p.label);
        }
        let (status, cpu) = wait4(p.child.id() as i32, false)?;
        p.reaped = true;
        let wall = p.started.elapsed();
        Some(Finished {
            code: status,
            wall,
            cpu,
            output: self.output(pid),
        })
    }

    /// Wait for `pid` to end; after `timeout` it is killed and the test fails with its output.
    pub fn wait(&mut self, pid: Pid, timeout: Duration) -> Finished {
        let end = Instant::now() + timeout;
        loop {
            if let Some(f) = self.try_wait(pid) {
                return f;
            }
            if Instant::now() > end {
                let label = self.procs[pid.0].label.clone();
                self.kill(pid);
                panic!(
                    "{label} still running after {timeout:?}; its output:\n{}",
                    tail(&self.output(pid), 60)
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Whether `pid` is still running (it is reaped when it is not).
    pub fn running(&mut self, pid: Pid) -> bool {
        if self.procs[pid.0].reaped {
            return false;
        }
        self.try_wait(pid).is_none()
    }

    /// SIGKILL (a power cut, as far as the process is concerned) and reap.
    pub fn kill(&mut self, pid: Pid) {
        let p = &mut self.procs[pid.0];
        if p.reaped {
            return;
        }
        let _ = p.child.kill();
        let _ = wait4(p.child.id() as i32, true);
        p.reaped = true;
    }
}

impl Drop for McastLab {
    fn drop(&mut self) {
        for i in 0..self.procs.len() {
            self.kill(Pid(i));
        }
        if std::thread::panicking() {
            for (i, p) in self.procs.iter().enumerate() {
                eprintln!(
                    "--- lab process {}: {}\n{}",
                    i,
                    p.label,
                    tail(&std::fs::read_to_string(&p.log).unwrap_or_default(), 40)
                );
            }
        }
        for n in &self.nodes {
            let _ = Command::new("ip").args(["netns", "del", &n.ns]).status();
        }
        let _ = Command::new("ip")
            .args(["netns", "del", &self.hub])
            .status();
    }
}

fn ip(args: &[&str]) {
    run(Command::new("ip").args(args));
}

/// `wait4` on one child: its exit code (None for a signal) and its user + system CPU time;
/// `None` when it is still running and `block` is false.
#[allow(unsafe_code)]
fn wait4(pid: i32, block: bool) -> Option<(Option<i32>, Duration)> {
    let mut status = 0i32;
    // SAFETY: rusage is plain old data that wait4 fills in; all-zero is a valid value.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let flags = if block { 0 } else { libc::WNOHANG };
    // SAFETY: pid is a child of this process that has not been reaped yet (the lab reaps each
    // child exactly once); status and usage are valid, exclusive pointers for the call.
    let r = unsafe { libc::wait4(pid, &mut status, flags, &mut usage) };
    if r == 0 {
        return None;
    }
    assert!(
        r == pid,
        "wait4({pid}) failed: {}",
        std::io::Error::last_os_error()
    );
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    let cpu = tv(usage.ru_utime) + tv(usage.ru_stime);
    let code = if libc::WIFEXITED(status) {
        Some(libc::WEXITSTATUS(status))
    } else {
        None
    };
    Some((code, cpu))
}
