//! The whole loop in network namespaces (issue 4): the real dnsmasq hands out DHCP options
//! 186 (server address) and 190 (secure port) → the agent's discovery finds `imgserver` →
//! the agent checks in over TLS verified against the CA on its "boot partition" → deploys
//! onto a disk-image file → reports → the server shows the device Operational with the new
//! image version. And the rogue case: DHCP points at another server (with a certificate from
//! another CA) and the device refuses to talk to it.
//!
//! Layout: a server namespace (10.78.0.1: dnsmasq, imgserver; 10.78.0.66: the rogue
//! imgserver) and a client namespace, joined by a veth pair. The agent runs as a child of
//! this test binary inside the client namespace (`dhcp_agent_child`), so it uses the real
//! DHCP client of the discovery crate on the namespace's `eth0`.
//!
//! Needs root (network namespaces), dnsmasq, iproute2, mkfs.fat, mtools, sgdisk.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use agent::checkin;
use checkin::AgentConfig;
use e2e::{imgserver_bin, require_tool, sample_bytes, sh, NetLab, Scratch};
use imgengine::capture::{capture, CaptureOptions};
use imgengine::io::NoProgress;

const MIB: u64 = 1 << 20;
const SERVER_IP: &str = "10.78.0.1";
const ROGUE_IP: &str = "10.78.0.66";
const MAC: &str = "52:54:00:78:00:02";

/// The shared two-namespace lab (`e2e::NetLab`): dnsmasq and servers on the server side.
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
        for t in [
            "ip", "dnsmasq", "sgdisk", "mkfs.fat", "fsck.fat", "mcopy", "mtype",
        ] {
            require_tool(t);
        }
        Lab {
            net: NetLab::new("srv", &[SERVER_IP, ROGUE_IP], Some(MAC)),
        }
    }

    fn admin(&self, data: &Path, args: &[&str]) -> String {
        e2e::imgserver_admin(data, args)
    }

    /// `imgserver init` for `addr` and `serve` on addr:8443 inside the server namespace.
    fn imgserver(&mut self, data: &Path, addr: &str) {
        self.admin(data, &["init", "--name", addr]);
        let (child, _) = e2e::spawn_imgserver(
            Command::new("ip")
                .args(["netns", "exec", &self.server_ns])
                .arg(imgserver_bin())
                .arg("--data")
                .arg(data)
                .args([
                    "serve",
                    "--listen",
                    &format!("{addr}:8443"),
                    "--interval",
                    "9",
                ]),
            "listening on https://",
        );
        self.children.push(child);
    }

    /// The real dnsmasq, handing out option 186 = `server` and 190 = 8443.
    fn dnsmasq(&mut self, server: &str) {
        self.net.dnsmasq(&format!(
            "interface=eth0\nbind-interfaces\nexcept-interface=lo\nlisten-address={SERVER_IP}\nport=0\n\
             no-resolv\nno-hosts\nno-ping\nuser=root\nlog-dhcp\n\
             dhcp-range=10.78.0.100,10.78.0.200,255.255.255.0,1h\ndomain=lab.example\n\
             dhcp-option=186,{server}\ndhcp-option=190,20:fb\n",
        ));
    }

    /// Run the agent (discovery, then the check-in loop) in the client namespace.
    fn agent(&self, ca: &Path, disk: &Path) -> (bool, String) {
        let spec = serde_json::json!({
            "ca": ca, "disk": disk, "state": self.dir.join("bootpart/img"), "config": self.dir.join("bootpart"),
        });
        let out = Command::new("ip")
            .args(["netns", "exec", &self.client_ns])
            .arg(std::env::current_exe().unwrap())
            .args([
                "--ignored",
                "--exact",
                "dhcp_agent_child",
                "--nocapture",
                "--test-threads",
                "1",
            ])
            .env("E2E_DHCP_AGENT", spec.to_string())
            .output()
            .unwrap();
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

/// Inside the client namespace: discovery on eth0, then the loop against the chosen server.
#[test]
#[ignore = "child process: Lab::agent starts it with --ignored --exact"]
fn dhcp_agent_child() {
    let Ok(spec) = std::env::var("E2E_DHCP_AGENT") else {
        return;
    };
    let v: serde_json::Value = serde_json::from_str(&spec).unwrap();
    let s = |k: &str| PathBuf::from(v[k].as_str().unwrap());
    fs::create_dir_all(s("config")).unwrap();
    let cfg = discovery::Config {
        interfaces: vec!["eth0".into()],
        config_dir: s("config"),
        dhcp_timeout: Duration::from_secs(20),
        ..discovery::Config::default()
    };
    let found = discovery::discover(&cfg).expect("discovery");
    let chosen = found
        .chosen
        .unwrap_or_else(|| panic!("no server found: {:#?}", found.log));
    println!("CHOSEN {}", chosen.url);
    let agent = AgentConfig {
        state_dir: s("state"),
        ca_file: Some(s("ca")),
        disk: Some(s("disk")),
        trusted_dir: None,
        mac: None, // the boot NIC's own MAC, read from sysfs in this namespace
        progress_interval: Duration::from_millis(200),
        retry_wait: Duration::from_millis(300),
        checkin_attempts: 3,
        quiet: true,
        // The suite's image is unsigned: the lab setting, explicitly.
        lab: discovery::LabSettings {
            unsigned_images: true,
            ..Default::default()
        },
        ..AgentConfig::default()
    };
    match checkin::agent_loop(&chosen.url, &agent) {
        Ok(o) => println!("AGENT-OUTCOME {o:?}"),
        Err(e) => {
            println!("AGENT-ERROR {e:#}");
            std::process::exit(7);
        }
    }
}

/// A 48 MiB GPT disk, FAT16 partition 1 (SYSTEM) with VERSION.TXT; captured whole.
fn make_image(dir: &Scratch, version: &str) -> PathBuf {
    let disk = dir.join("source.img");
    fs::write(dir.join("VERSION.TXT"), format!("fleet {version}\n")).unwrap();
    fs::write(dir.join("BLOB.BIN"), sample_bytes(78, 500_000)).unwrap();
    sh(&format!(
        "cd {d}; export MTOOLS_SKIP_CHECK=1; truncate -s {size} {disk}
         sgdisk -n 1:2048:+32M -t 1:0700 -c 1:SYSTEM {disk} >/dev/null
         mkfs.fat -F 16 -n SYSTEM --offset 2048 {disk} 32768 >/dev/null
         mcopy -i {disk}@@1048576 VERSION.TXT ::VERSION.TXT; mcopy -i {disk}@@1048576 BLOB.BIN ::BLOB.BIN",
        d = dir.path().display(),
        size = 48 * MIB,
        disk = disk.display()
    ));
    let img = dir.join(format!("fleet-{version}.img"));
    let o = CaptureOptions {
        name: "fleet".into(),
        version: version.into(),
        threads: 2,
        ..Default::default()
    };
    capture(
        &disk,
        None,
        &mut fs::File::create(&img).unwrap(),
        &o,
        &NoProgress,
    )
    .unwrap();
    img
}

fn blank_disk(dir: &Scratch) -> PathBuf {
    let p = dir.join("device.img");
    sh(&format!("truncate -s {} {}", 48 * MIB, p.display()));
    p
}

#[test]
fn dhcp_options_lead_the_agent_to_imgserver_and_the_deploy_is_recorded() {
    let mut lab = Lab::new();
    let data = lab.dir.join("srv");
    lab.imgserver(&data, SERVER_IP);
    let img = make_image(&lab.dir, "9.0");
    lab.admin(&data, &["image", "add", img.to_str().unwrap()]);
    lab.admin(
        &data,
        &[
            "schedule",
            "add",
            "--mac",
            MAC,
            "--image",
            "fleet:9.0",
            "--then",
            "no-reboot",
        ],
    );
    lab.dnsmasq(SERVER_IP);
    let disk = blank_disk(&lab.dir);
    let (ok, text) = lab.agent(&data.join("ca.pem"), &disk);
    assert!(ok, "{text}");
    assert!(text.contains("CHOSEN https://10.78.0.1:8443"), "{text}");
    assert!(text.contains("AGENT-OUTCOME Idle"), "{text}");
    // The disk holds the image, and the server says so.
    e2e::check_deployed(lab.dir.path(), &disk, "fleet 9.0");
    let devices = lab.admin(&data, &["devices"]);
    let line = devices
        .lines()
        .find(|l| l.starts_with(MAC))
        .unwrap_or_else(|| panic!("{devices}"));
    assert!(
        line.contains("Operational") && line.contains("fleet 9.0"),
        "{line}"
    );
}

#[test]
fn rogue_dhcp_answer_pointing_at_another_server_is_refused() {
    let mut lab = Lab::new();
    let (ours, rogue) = (lab.dir.join("srv"), lab.dir.join("rogue"));
    lab.admin(&ours, &["init", "--name", SERVER_IP]);
    // The rogue server is a perfectly working imgserver with a job for this device, but its
    // certificate comes from another CA.
    lab.imgserver(&rogue, ROGUE_IP);
    let img = make_image(&lab.dir, "6.6");
    lab.admin(&rogue, &["image", "add", img.to_str().unwrap()]);
    lab.admin(
        &rogue,
        &[
            "schedule",
            "add",
            "--mac",
            MAC,
            "--image",
            "fleet:6.6",
            "--then",
            "no-reboot",
        ],
    );
    lab.dnsmasq(ROGUE_IP);
    let disk = blank_disk(&lab.dir);
    let (ok, text) = lab.agent(&ours.join("ca.pem"), &disk);
    assert!(!ok, "{text}");
    assert!(text.contains("CHOSEN https://10.78.0.66:8443"), "{text}");
    assert!(
        text.contains("AGENT-ERROR") && text.contains("not trusted"),
        "{text}"
    );
    assert!(
        fs::read(&disk).unwrap().iter().all(|b| *b == 0),
        "nothing may be written"
    );
    let devices = lab.admin(&rogue, &["devices"]);
    assert!(
        !devices.contains("Operational") && !devices.contains("fleet"),
        "{devices}"
    );
}
