//! The whole-life harness (qemu_life.rs, qemu_autogenic.rs): a device booted by OVMF and a
//! standalone GRUB with real reboots (QEMU runs once per boot with `-no-reboot` on the same
//! disk and OVMF variable files, one serial log per boot), and its site network: a network
//! namespace with a bridge, the device's tap, dnsmasq, the reference server and nginx.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use e2e::{img_bin, imgserver_admin, imgserver_bin, require_tool, run, sh};

use super::{ovmf, Kernel, Qemu};

/// A boot under TCG with OVMF takes tens of seconds on a busy machine; these are limits for
/// a hung boot, never figures.
pub const BOOT_LIMIT: Duration = Duration::from_secs(300);
pub const DEPLOY_LIMIT: Duration = Duration::from_secs(600);

/// GRUB modules for the standalone image: the disk, FAT, Linux, the environment block.
pub const GRUB_MODULES: &str = "part_gpt part_msdos fat search search_fs_file configfile linux normal serial terminal test echo chain efi_gop all_video loadenv";

/// The guest kernel's command line: its console on the serial port, no panic loop.
pub const GUEST_CMDLINE: &str = "console=ttyS0 panic=-1";

/// The signing key pair of the site: `img -keygen`.
pub fn site_key(dir: &Path) -> (PathBuf, PathBuf) {
    let key = dir.join("site.key");
    run(Command::new(img_bin()).arg("-keygen").arg(&key));
    let public = PathBuf::from(format!("{}.pub", key.display()));
    assert!(public.is_file(), "img -keygen made no {}", public.display());
    (key, public)
}

/// A standalone GRUB EFI image whose built-in configuration is `embedded`.
pub fn grub_efi(dir: &Path, name: &str, embedded: &str) -> PathBuf {
    let embed = dir.join(format!("{name}.cfg"));
    std::fs::write(&embed, embedded).unwrap();
    let efi = dir.join(format!("{name}.efi"));
    run(Command::new("grub-mkstandalone")
        .args(["-O", "x86_64-efi", "--locales=", "--fonts=", "--themes="])
        .arg(format!("--modules={GRUB_MODULES}"))
        .arg(format!("--install-modules={GRUB_MODULES}"))
        .arg("-o")
        .arg(&efi)
        .arg(format!("boot/grub/grub.cfg={}", embed.display())));
    efi
}

/// A device: its disk file and OVMF variable store, both kept between boots.
pub struct Device {
    pub dir: PathBuf,
    pub disk: PathBuf,
    pub code: PathBuf,
    pub vars: PathBuf,
    pub mac: String,
    /// The network namespace and tap QEMU runs in; None: no network card plugged in.
    pub ns: Option<String>,
    /// Boot from the network first (the NIC's iPXE ROM), then the disk.
    pub pxe: bool,
    pub boots: u32,
}

/// One boot: QEMU from power-on to its exit (reboot or power-off under `-no-reboot`).
pub struct Boot {
    pub q: Qemu,
    pub n: u32,
    pub log: PathBuf,
}

impl Boot {
    pub fn wait_for(&mut self, needle: &str, limit: Duration) -> Duration {
        let t = self.q.wait_for(needle, limit);
        self.q.save_log(&self.log);
        t
    }

    /// Wait for the boot to end by itself (the agent rebooted, the guest powered off): its
    /// console and its length from power-on.
    pub fn end(mut self) -> (String, Duration) {
        self.q.wait_exit(BOOT_LIMIT);
        let took = self.q.elapsed();
        self.q.save_log(&self.log);
        let text = self.q.text();
        eprintln!(
            "boot {} ended after {:.1} s: {}",
            self.n,
            self.q.elapsed().as_secs_f64(),
            reached(&text)
        );
        assert!(
            !text.contains("Kernel panic"),
            "boot {} panicked:\n{}",
            self.n,
            e2e::tail(&text, 40)
        );
        (text, took)
    }

    /// Pull the plug.
    pub fn power_cut(mut self) -> String {
        self.q.power_cut();
        self.q.save_log(&self.log);
        eprintln!(
            "boot {}: power cut after {:.1} s: {}",
            self.n,
            self.q.elapsed().as_secs_f64(),
            reached(&self.q.text())
        );
        self.q.text()
    }
}

/// What a boot reached, read from its console.
pub fn reached(text: &str) -> String {
    let mut r = Vec::new();
    if text.contains("Linux version") {
        r.push("kernel".to_string());
    }
    if text.contains("agent started") {
        r.push("agent".into());
    }
    if text.contains("img: enrolled as device") {
        r.push("enrolled".into());
    }
    if text.contains("succeeded") {
        r.push("task succeeded".into());
    }
    if let Some(v) = guest_version(text) {
        r.push(format!("guest v{v}"));
    }
    if r.is_empty() {
        "nothing (firmware or GRUB only)".into()
    } else {
        r.join(" → ")
    }
}

/// The guest version whose marker is on the console, if any.
pub fn guest_version(text: &str) -> Option<String> {
    let at = text.find("GUEST OS v")?;
    Some(
        text[at + "GUEST OS v".len()..]
            .chars()
            .take_while(|c| !c.is_whitespace())
            .collect(),
    )
}

impl Device {
    /// A blank (sparse) disk of `disk_mib` with the partition table `table` (sgdisk
    /// arguments) only.
    pub fn new(dir: &Path, mac: &str, disk_mib: u64, table: &str) -> Device {
        let disk = dir.join("device.img");
        sh(&format!(
            "rm -f {d}; truncate -s {disk_mib}M {d}
             sgdisk -o {table} {d} >/dev/null",
            d = disk.display()
        ));
        let (code, vars) = ovmf(dir);
        Device {
            dir: dir.to_path_buf(),
            disk,
            code,
            vars,
            mac: mac.to_string(),
            ns: None,
            pxe: false,
            boots: 0,
        }
    }

    /// Power on: a new QEMU on the same disk and variable store.
    pub fn power_on(&mut self) -> Boot {
        self.boots += 1;
        let mut cmd = match &self.ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "qemu-system-x86_64"]);
                c
            }
            None => Command::new("qemu-system-x86_64"),
        };
        cmd.args([
            "-machine", "q35", "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
        ])
        .args(["-serial", "stdio", "-no-reboot"])
        .arg("-drive")
        .arg(format!(
            "if=pflash,format=raw,readonly=on,file={}",
            self.code.display()
        ))
        .arg("-drive")
        .arg(format!("if=pflash,format=raw,file={}", self.vars.display()))
        // bootindex: the disk after the network when the device PXE-boots.
        .arg("-drive")
        .arg(format!(
            "file={},format=raw,if=none,id=d0,cache=writethrough",
            self.disk.display()
        ))
        .arg("-device")
        .arg(format!(
            "virtio-blk-pci,drive=d0,bootindex={}",
            if self.pxe { 2 } else { 1 }
        ));
        match &self.ns {
            Some(_) => {
                cmd.args(["-netdev", "tap,id=n0,ifname=tap0,script=no,downscript=no"]);
                let mut dev = format!("virtio-net-pci,netdev=n0,mac={}", self.mac);
                if self.pxe {
                    dev.push_str(",bootindex=1");
                    // The NIC's iPXE ROM is the one network boot entry, as on a thin client:
                    // OVMF's own PXE and HTTP boot (IPv4 and IPv6) would wait out their
                    // timeouts before the disk after iPXE exits.
                    for knob in [
                        "IPv4PXESupport",
                        "IPv6PXESupport",
                        "IPv4Support",
                        "IPv6Support",
                    ] {
                        cmd.arg("-fw_cfg")
                            .arg(format!("name=opt/org.tianocore/{knob},string=no"));
                    }
                } else {
                    // Only the disk boots: the NIC's option ROM stays out of the way.
                    dev.push_str(",romfile=");
                }
                cmd.arg("-device").arg(dev);
            }
            None => {
                cmd.args(["-nic", "none"]);
            }
        }
        let log = self.dir.join(format!("boot-{}.log", self.boots));
        eprintln!("boot {}: power on", self.boots);
        Boot {
            q: Qemu::start(cmd),
            n: self.boots,
            log,
        }
    }

    /// Partition 2 of the disk as it is now (where its GPT says), copied out for mtools.
    pub fn guest_part(&self) -> PathBuf {
        let out = self.dir.join("guest-now.fat");
        let (start, len) = super::partition(&self.disk, 2);
        sh(&format!(
            "dd if={d} of={o} bs=1M iflag=skip_bytes,count_bytes skip={start} count={len} status=none",
            d = self.disk.display(),
            o = out.display(),
        ));
        out
    }

    /// VERSION.TXT of the guest partition on the disk (after fsck.fat -n passed).
    pub fn guest_on_disk(&self) -> String {
        let p = self.guest_part();
        sh(&format!("fsck.fat -n {} >/dev/null", p.display()));
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mtype -i {} ::/VERSION.TXT",
            p.display()
        ))
        .trim()
        .to_string()
    }
}

/// The agent's initramfs (mkinitrd), trusting the site's image-signing key.
pub fn agent_initrd(dir: &Path, k: &Kernel, key_pub: &Path) -> PathBuf {
    let out = dir.join("agent-initrd.img");
    run(Command::new(e2e::workspace_bin("mkinitrd", "initramfs"))
        .arg("-o")
        .arg(&out)
        .arg("--agent")
        .arg(super::static_agent())
        .arg("--kernel-modules")
        .arg(&k.modules)
        .arg("--ca")
        .arg("/etc/ssl/certs/ca-certificates.crt")
        .arg("--trusted")
        .arg(key_pub));
    out
}

/// A guest OS partition: a FAT file system image `part` of `mib` MiB labelled GUEST with
/// `files` (host file, name at its root) copied in that order (the order places them).
pub fn guest_fat(part: &Path, mib: u64, files: &[(&Path, &str)]) {
    let mut script = format!(
        "export MTOOLS_SKIP_CHECK=1; rm -f {p}; truncate -s {mib}M {p}\n mkfs.fat -n GUEST {p} >/dev/null",
        p = part.display()
    );
    for (file, name) in files {
        script.push_str(&format!(
            "\n mcopy -i {p} {f} ::/{name}",
            p = part.display(),
            f = file.display()
        ));
    }
    sh(&script);
}

/// Guest v`version` captured as the server deploys it from the source disk `src` (the
/// device's layout, the guest in partition 2): `img -make -part=2`, then `img -sign` with the
/// site key `key`. The image is `dir/guest-<version>.img`.
pub fn signed_guest_image(dir: &Path, src: &Path, version: &str, key: &Path) -> PathBuf {
    let image = dir.join(format!("guest-{version}.img"));
    run(Command::new(img_bin()).env("IMG_QUIET", "1").args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=2",
        // 1 MiB chunks: a resumed deploy shows its granularity on a 15 MB image.
        "-chunk=1",
        "-name=guest",
        &format!("-version={version}"),
    ]));
    run(Command::new(img_bin())
        .arg("-sign")
        .arg(&image)
        .arg(format!("-key={}", key.display())));
    image
}

/// `img -install` of the boot agent onto partition 1 of `disk`: kernel `k`, the agent's
/// initramfs `initrd`, the shipped GRUB `grub`, the agent's command line `cmdline`, booting
/// the guest from partition 2 when told to. Fails unless it says it installed the agent.
pub fn install_agent(disk: &Path, k: &Kernel, initrd: &Path, grub: &Path, cmdline: &str) {
    let out = run(Command::new(img_bin())
        .arg("-install")
        .arg(disk)
        .arg(format!("-kernel={}", k.vmlinuz.display()))
        .arg(format!("-initrd={}", initrd.display()))
        .arg(format!("-efi={}", grub.display()))
        .arg(format!("-cmdline={cmdline}"))
        .arg(format!("-guest=linux:/vmlinuz,/initrd.img,{GUEST_CMDLINE}")));
    assert!(
        String::from_utf8_lossy(&out.stdout).contains("installed the boot agent"),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// `img -restore` of the signed guest `image` onto partition 2 of `disk`, trusting `key_pub`
/// (the factory's flashing of the guest).
pub fn restore_guest(disk: &Path, image: &Path, key_pub: &Path) {
    run(Command::new(img_bin())
        .env("IMG_QUIET", "1")
        .arg("-restore")
        .arg(image)
        .arg(format!("-disk={}", disk.display()))
        .arg("-part=2")
        .arg(format!("-trust={}", key_pub.display())));
}

// ---- The network: a namespace with a bridge, the device's tap, dnsmasq and the server. ----

/// The address plan of the whole-life namespace.
pub const SERVER_IP: &str = "10.79.0.1";

/// A child process whose output is collected (dnsmasq's and the server's logs).
pub struct Logged {
    pub child: Child,
    pub out: Arc<Mutex<String>>,
}

impl Logged {
    pub fn spawn(mut cmd: Command) -> Logged {
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {cmd:?}: {e}"));
        let out = Arc::new(Mutex::new(String::new()));
        for mut pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let sink = out.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = pipe.read(&mut buf) {
                    if n == 0 {
                        break;
                    }
                    sink.lock()
                        .unwrap()
                        .push_str(&String::from_utf8_lossy(&buf[..n]));
                }
            });
        }
        Logged { child, out }
    }

    pub fn text(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    pub fn wait_for(&self, needle: &str, limit: Duration) {
        let end = Instant::now() + limit;
        while Instant::now() < end {
            if self.text().contains(needle) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!(
            "`{needle}` not in the log:\n{}",
            e2e::tail(&self.text(), 30)
        );
    }
}

impl Drop for Logged {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The site network: namespace, bridge with the device's tap, the reference server (plain
/// HTTP on SERVER_IP:8080) and dnsmasq (DHCP with options 186/192, TFTP when `tftp` is given).
pub struct Site {
    pub ns: super::Netns,
    pub data: PathBuf,
    pub server: Option<Logged>,
    pub dnsmasq: Option<Logged>,
}

impl Site {
    pub fn new(dir: &Path, tag: &str) -> Site {
        require_tool("ip");
        require_tool("dnsmasq");
        let ns = super::Netns(format!("imglife{tag}{}", std::process::id()));
        run(Command::new("ip").args(["netns", "add", &ns.0]));
        for c in [
            "ip link set lo up".to_string(),
            "ip link add br0 type bridge".into(),
            format!("ip addr add {SERVER_IP}/24 dev br0"),
            "ip link set br0 up".into(),
            "ip tuntap add dev tap0 mode tap".into(),
            "ip link set tap0 master br0".into(),
            "ip link set tap0 up".into(),
        ] {
            run(Command::new("ip")
                .args(["netns", "exec", &ns.0])
                .args(c.split_whitespace()));
        }
        let data = dir.join("srv");
        imgserver_admin(&data, &["init", "--name", SERVER_IP]);
        Site {
            ns,
            data,
            server: None,
            dnsmasq: None,
        }
    }

    pub fn admin(&self, args: &[&str]) -> String {
        imgserver_admin(&self.data, args)
    }

    pub fn start_server(&mut self) {
        self.start_server_with(&[]);
    }

    pub fn start_server_with(&mut self, extra: &[&str]) {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns.0])
            .arg(imgserver_bin())
            .arg("--data")
            .arg(&self.data)
            .args([
                "serve",
                // The lab server of this suite: plain HTTP, and every enrolment taken without
                // the site secret (qemu_pxe and bootstore show the production way).
                "--plain",
                "--open-enrolment",
                "--interval",
                "5",
                "--listen",
                &format!("{SERVER_IP}:8080"),
                "--public-url",
                &format!("http://{SERVER_IP}:8080"),
            ])
            .args(extra)
            .env("RUST_LOG", "info");
        let s = Logged::spawn(cmd);
        s.wait_for("listening on", Duration::from_secs(30));
        self.server = Some(s);
    }

    /// dnsmasq: a lease with options 186 (server address) and 192 (HTTP port 8080); with
    /// `pxe`, also TFTP from that root and the shipped chain to iPXE.
    pub fn start_dnsmasq(&mut self, dir: &Path, extra: &[String]) {
        let mut cmd = Command::new("ip");
        cmd.args([
            "netns",
            "exec",
            &self.ns.0,
            "dnsmasq",
            "--keep-in-foreground",
            "--log-dhcp",
            "--log-facility=-",
            "--port=0",
            "--conf-file=/dev/null",
            "--interface=br0",
            "--bind-interfaces",
            "--dhcp-range=10.79.0.50,10.79.0.99,1h",
            "--dhcp-authoritative",
        ])
        .arg(format!("--dhcp-option-force=186,{SERVER_IP}"))
        .arg("--dhcp-option-force=192,1f:90")
        .arg(format!("--dhcp-leasefile={}", dir.join("leases").display()))
        .arg(format!("--pid-file={}", dir.join("dnsmasq.pid").display()))
        .args(extra);
        let d = Logged::spawn(cmd);
        // dnsmasq logs "started" once its sockets are bound.
        d.wait_for("started, version", Duration::from_secs(30));
        self.dnsmasq = Some(d);
    }

    pub fn server_log(&self) -> String {
        self.server.as_ref().map(|s| s.text()).unwrap_or_default()
    }

    pub fn dnsmasq_log(&self) -> String {
        self.dnsmasq.as_ref().map(|s| s.text()).unwrap_or_default()
    }

    /// The server's line for the device (`imgserver devices`).
    pub fn device_line(&self, mac: &str) -> String {
        let devices = self.admin(&["devices"]);
        devices
            .lines()
            .find(|l| l.to_lowercase().contains(mac))
            .unwrap_or_else(|| panic!("device {mac} not listed:\n{devices}"))
            .to_string()
    }
}

/// Register a signed guest image and schedule it onto partition 2 of the device.
pub fn schedule_guest(site: &Site, image: &Path, version: &str, mac: &str) {
    let out = site.admin(&["image", "add", image.to_str().unwrap()]);
    assert!(
        out.contains(&format!("registered image guest {version}")),
        "{out}"
    );
    let out = site.admin(&[
        "schedule",
        "add",
        "--mac",
        mac,
        "--image",
        &format!("guest:{version}"),
        "--partition",
        "2",
        "--no-backup",
    ]);
    assert!(out.contains("scheduled"), "{out}");
}

impl Device {
    /// Partition 1 (the boot-agent partition) as it is now, copied out for mtools.
    pub fn agent_part(&self) -> PathBuf {
        let out = self.dir.join("agent-now.fat");
        let (start, len) = super::partition(&self.disk, 1);
        sh(&format!(
            "dd if={d} of={o} bs=1M iflag=skip_bytes,count_bytes skip={start} count={len} status=none",
            d = self.disk.display(),
            o = out.display(),
        ));
        out
    }

    /// GRUB's environment block on the boot-agent partition, as Debian's `grub-editenv
    /// FILE list` reads it.
    pub fn grubenv(&self) -> String {
        let p = self.agent_part();
        let env = self.dir.join("grubenv-now");
        let _ = std::fs::remove_file(&env);
        sh(&format!(
            "MTOOLS_SKIP_CHECK=1 mcopy -i {} ::/boot/grub/grubenv {}",
            p.display(),
            env.display()
        ));
        assert_eq!(
            std::fs::metadata(&env).unwrap().len(),
            1024,
            "grubenv is no longer 1024 bytes"
        );
        sh(&format!("grub-editenv {} list", env.display()))
    }

    pub fn next_entry(&self) -> Option<String> {
        self.grubenv()
            .lines()
            .find_map(|l| l.strip_prefix("next_entry="))
            .map(str::to_string)
            .filter(|v| !v.is_empty())
    }
}

/// A boot that should be the agent with nothing to do: it checks in and hands the device to
/// its guest OS (next_entry=guest, reboot). Returns the console and the boot's duration.
pub fn agent_pass(dev: &mut Device) -> (String, Duration) {
    let mut b = dev.power_on();
    b.wait_for("agent started", BOOT_LIMIT);
    let (text, took) = b.end();
    assert!(
        guest_version(&text).is_none(),
        "the guest ran inside the agent's boot?\n{}",
        e2e::tail(&text, 30)
    );
    (text, took)
}

/// A boot that should end in the guest OS: the marker's version and the time from power-on.
pub fn guest_boot(dev: &mut Device) -> (String, Duration) {
    let mut b = dev.power_on();
    let t = b.wait_for("GUEST OS v", BOOT_LIMIT);
    let (text, _) = b.end();
    assert!(
        !text.contains("agent started"),
        "the agent ran in a boot meant for the guest:\n{}",
        e2e::tail(&text, 30)
    );
    (guest_version(&text).unwrap(), t)
}

/// nginx inside the site namespace on SERVER_IP:8081, serving `root` at `rate` so a deploy
/// takes long enough to pull the plug in the middle; its access log has the body bytes sent
/// per request. `send_timeout` is short so a request cut by the power loss is logged soon.
pub struct SiteNginx {
    pub child: Child,
    pub log: PathBuf,
}

impl SiteNginx {
    pub fn start(site: &Site, dir: &Path, root: &Path, rate: &str) -> SiteNginx {
        require_tool("nginx");
        let ngx = dir.join("nginx");
        std::fs::create_dir_all(&ngx).unwrap();
        let log = ngx.join("access.log");
        let conf = ngx.join("nginx.conf");
        std::fs::write(
            &conf,
            format!(
                "daemon off;\nworker_processes 1;\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
                 events {{ worker_connections 64; }}\n\
                 http {{\n  log_format bytes '$request $status $body_bytes_sent';\n  access_log {log} bytes;\n\
                 client_body_temp_path {d};\n  proxy_temp_path {d};\n  fastcgi_temp_path {d};\n  uwsgi_temp_path {d};\n  scgi_temp_path {d};\n\
                 types {{ application/octet-stream img; }}\n\
                 server {{ listen {SERVER_IP}:8081; root {root}; limit_rate {rate}; send_timeout 3s; }}\n}}\n",
                d = ngx.display(),
                log = log.display(),
                root = root.display(),
            ),
        )
        .unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", &site.ns.0, "nginx", "-c"])
            .arg(&conf)
            .arg("-p")
            .arg(&ngx)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting nginx");
        let end = Instant::now() + Duration::from_secs(10);
        while !ngx.join("nginx.pid").exists() {
            assert!(Instant::now() < end, "nginx did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        SiteNginx { child, log }
    }

    pub fn url(&self, file: &str) -> String {
        format!("http://{SERVER_IP}:8081/{file}")
    }

    /// Body bytes sent for `file`, request by request.
    pub fn sent(&self, file: &str) -> Vec<u64> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.contains(file))
            .filter_map(|l| l.rsplit(' ').next()?.parse().ok())
            .collect()
    }
}

impl Drop for SiteNginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Bytes the device's tap has been sent (what the device received so far).
pub fn tap_tx_bytes(site: &Site) -> u64 {
    let out = run(Command::new("ip").args([
        "netns",
        "exec",
        &site.ns.0,
        "cat",
        "/sys/class/net/tap0/statistics/tx_bytes",
    ]));
    String::from_utf8_lossy(&out.stdout).trim().parse().unwrap()
}
