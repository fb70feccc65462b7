//! Network interface bring-up without external tools.
//!
//! Inside the initramfs there is no `ip` or `ifconfig`: NICs are found in sysfs
//! (`/sys/class/net/*/type` = 1 for Ethernet, `address` for the MAC, `carrier` for the link)
//! and configured with the classic socket ioctls (`SIOCGIFFLAGS`/`SIOCSIFFLAGS`,
//! `SIOCSIFADDR`, `SIOCSIFNETMASK`, `SIOCADDRT`; netdevice(7), route(8)). These are older than
//! rtnetlink but need no message building, exist in every kernel we boot, and are enough for
//! one IPv4 address and a default route.
//!
//! Everything goes through the [`NetworkSetup`] trait so the DHCP and discovery logic can be
//! unit-tested unprivileged; the end-to-end tests use [`SystemNetwork`] in network namespaces.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::thread;
use std::time::{Duration, Instant};

use serde::Serialize;

/// One network interface card as the agent sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Nic {
    pub name: String,
    pub mac: [u8; 6],
}

impl Nic {
    pub fn mac_string(&self) -> String {
        let m = self.mac;
        format!(
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            m[0], m[1], m[2], m[3], m[4], m[5]
        )
    }
}

/// The operations discovery needs from the system's network stack.
pub trait NetworkSetup: Send + Sync {
    /// Ethernet interfaces, in name order.
    fn list_nics(&self) -> io::Result<Vec<Nic>>;
    /// Sets IFF_UP.
    fn set_up(&self, name: &str) -> io::Result<()>;
    /// True when the link has carrier.
    fn has_carrier(&self, name: &str) -> bool;
    /// Assigns the IPv4 address and netmask (replacing the primary address).
    fn set_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()>;
    /// Adds a default route through `gateway` on `name`; an existing one is fine.
    fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> io::Result<()>;
}

/// Brings `nic` up and waits (polling every 20 ms) until it has carrier or `timeout` passes.
/// Returns whether the link came up: a NIC without cable is skipped, not an error.
pub fn bring_up(net: &dyn NetworkSetup, nic: &str, timeout: Duration) -> io::Result<bool> {
    net.set_up(nic)?;
    let deadline = Instant::now() + timeout;
    loop {
        if net.has_carrier(nic) {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// Converts a prefix length to a dotted netmask.
pub fn prefix_to_mask(prefix: u8) -> Ipv4Addr {
    let p = u32::from(prefix.min(32));
    Ipv4Addr::from(if p == 0 { 0 } else { u32::MAX << (32 - p) })
}

/// The real system: sysfs and ioctls.
pub struct SystemNetwork {
    pub sysfs_net: PathBuf,
}

impl Default for SystemNetwork {
    fn default() -> Self {
        SystemNetwork {
            sysfs_net: PathBuf::from("/sys/class/net"),
        }
    }
}

/// Parses `aa:bb:cc:dd:ee:ff`.
pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.trim().split(':');
    for b in mac.iter_mut() {
        *b = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

impl NetworkSetup for SystemNetwork {
    fn list_nics(&self) -> io::Result<Vec<Nic>> {
        let mut out = Vec::new();
        for entry in fs::read_dir(&self.sysfs_net)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            let dir = entry.path();
            // ARPHRD_ETHER = 1 (include/uapi/linux/if_arp.h); skips lo, tunnels, ...
            let ty = fs::read_to_string(dir.join("type")).unwrap_or_default();
            if ty.trim() != "1" {
                continue;
            }
            let Some(mac) = fs::read_to_string(dir.join("address"))
                .ok()
                .and_then(|a| parse_mac(&a))
            else {
                continue;
            };
            out.push(Nic { name, mac });
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }

    fn set_up(&self, name: &str) -> io::Result<()> {
        sys::set_flags_up(name)
    }

    fn has_carrier(&self, name: &str) -> bool {
        // Reading `carrier` of a down interface fails with EINVAL: treat as no carrier.
        fs::read_to_string(self.sysfs_net.join(name).join("carrier"))
            .map(|s| s.trim() == "1")
            .unwrap_or(false)
    }

    fn set_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
        sys::set_addr(name, sys::SIOCSIFADDR, ip)?;
        sys::set_addr(name, sys::SIOCSIFNETMASK, prefix_to_mask(prefix))
    }

    fn add_default_route(&self, name: &str, gateway: Ipv4Addr) -> io::Result<()> {
        match sys::add_default_route(name, gateway) {
            Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
            r => r,
        }
    }
}

/// The ioctls, all in one place (STYLE habit 6).
#[allow(unsafe_code)]
mod sys {
    use std::ffi::CString;
    use std::io;
    use std::net::{Ipv4Addr, UdpSocket};
    use std::os::fd::AsRawFd;

    pub const SIOCSIFADDR: libc::c_ulong = 0x8916;
    pub const SIOCSIFNETMASK: libc::c_ulong = 0x891c;
    const SIOCGIFFLAGS: libc::c_ulong = 0x8913;
    const SIOCSIFFLAGS: libc::c_ulong = 0x8914;
    const SIOCADDRT: libc::c_ulong = 0x890b;

    /// `struct ifreq` (netdevice(7)): the name and a 24-byte union; we only use the flags
    /// (a short) and a `struct sockaddr_in`.
    #[repr(C)]
    struct IfReq {
        name: [u8; libc::IFNAMSIZ],
        data: [u8; 24],
    }

    /// `struct rtentry` from <net/route.h> (glibc does not export it through the libc crate).
    #[repr(C)]
    struct RtEntry {
        rt_pad1: libc::c_ulong,
        rt_dst: libc::sockaddr,
        rt_gateway: libc::sockaddr,
        rt_genmask: libc::sockaddr,
        rt_flags: libc::c_ushort,
        rt_pad2: libc::c_short,
        rt_pad3: libc::c_ulong,
        rt_pad4: *mut libc::c_void,
        rt_metric: libc::c_short,
        rt_dev: *mut libc::c_char,
        rt_mtu: libc::c_ulong,
        rt_window: libc::c_ulong,
        rt_irtt: libc::c_ushort,
    }

    fn ifreq(name: &str) -> io::Result<IfReq> {
        let b = name.as_bytes();
        if b.is_empty() || b.len() >= libc::IFNAMSIZ || b.contains(&0) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} is not a valid interface name"),
            ));
        }
        let mut r = IfReq {
            name: [0; libc::IFNAMSIZ],
            data: [0; 24],
        };
        r.name[..b.len()].copy_from_slice(b);
        Ok(r)
    }

    fn sockaddr_in(ip: Ipv4Addr) -> libc::sockaddr {
        let mut sa = libc::sockaddr {
            sa_family: libc::AF_INET as libc::sa_family_t,
            sa_data: [0; 14],
        };
        // sockaddr_in: sin_port (2 bytes) then sin_addr (4 bytes, network order).
        for (d, s) in sa.sa_data[2..6].iter_mut().zip(ip.octets()) {
            *d = s as libc::c_char;
        }
        sa
    }

    fn ioctl_sock() -> io::Result<UdpSocket> {
        UdpSocket::bind("0.0.0.0:0")
    }

    fn ioctl(sock: &UdpSocket, req: libc::c_ulong, arg: *mut libc::c_void) -> io::Result<()> {
        // SAFETY: `arg` points to a live, correctly sized struct for `req` (ifreq or rtentry)
        // owned by the caller for the duration of the call; the fd is a valid socket.
        let rc = unsafe { libc::ioctl(sock.as_raw_fd(), req as _, arg) };
        if rc < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }

    pub fn set_flags_up(name: &str) -> io::Result<()> {
        let sock = ioctl_sock()?;
        let mut r = ifreq(name)?;
        ioctl(&sock, SIOCGIFFLAGS, (&mut r as *mut IfReq).cast())?;
        let flags = i16::from_ne_bytes([r.data[0], r.data[1]]) | libc::IFF_UP as i16;
        r.data[..2].copy_from_slice(&flags.to_ne_bytes());
        ioctl(&sock, SIOCSIFFLAGS, (&mut r as *mut IfReq).cast())
    }

    pub fn set_addr(name: &str, req: libc::c_ulong, ip: Ipv4Addr) -> io::Result<()> {
        let sock = ioctl_sock()?;
        let mut r = ifreq(name)?;
        let sa = sockaddr_in(ip);
        r.data[..2].copy_from_slice(&sa.sa_family.to_ne_bytes());
        for (d, s) in r.data[2..16].iter_mut().zip(sa.sa_data) {
            *d = s as u8;
        }
        ioctl(&sock, req, (&mut r as *mut IfReq).cast())
    }

    pub fn add_default_route(name: &str, gw: Ipv4Addr) -> io::Result<()> {
        let sock = ioctl_sock()?;
        let dev = CString::new(name)
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "interface name"))?;
        let mut rt = RtEntry {
            rt_pad1: 0,
            rt_dst: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_gateway: sockaddr_in(gw),
            rt_genmask: sockaddr_in(Ipv4Addr::UNSPECIFIED),
            rt_flags: (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort,
            rt_pad2: 0,
            rt_pad3: 0,
            rt_pad4: std::ptr::null_mut(),
            rt_metric: 0,
            rt_dev: dev.as_ptr() as *mut libc::c_char,
            rt_mtu: 0,
            rt_window: 0,
            rt_irtt: 0,
        };
        ioctl(&sock, SIOCADDRT, (&mut rt as *mut RtEntry).cast())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    /// A recording fake of the system network, for unit tests.
    #[derive(Default)]
    pub struct FakeNetwork {
        pub nics: Vec<Nic>,
        pub no_carrier: Vec<String>,
        pub calls: Mutex<Vec<String>>,
    }

    impl NetworkSetup for FakeNetwork {
        fn list_nics(&self) -> io::Result<Vec<Nic>> {
            Ok(self.nics.clone())
        }
        fn set_up(&self, name: &str) -> io::Result<()> {
            self.calls.lock().unwrap().push(format!("up {name}"));
            Ok(())
        }
        fn has_carrier(&self, name: &str) -> bool {
            !self.no_carrier.iter().any(|n| n == name)
        }
        fn set_address(&self, name: &str, ip: Ipv4Addr, prefix: u8) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("addr {name} {ip}/{prefix}"));
            Ok(())
        }
        fn add_default_route(&self, name: &str, gw: Ipv4Addr) -> io::Result<()> {
            self.calls
                .lock()
                .unwrap()
                .push(format!("route {name} {gw}"));
            Ok(())
        }
    }

    #[test]
    fn masks_and_macs() {
        assert_eq!(prefix_to_mask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(prefix_to_mask(0), Ipv4Addr::UNSPECIFIED);
        assert_eq!(prefix_to_mask(32), Ipv4Addr::BROADCAST);
        assert_eq!(
            parse_mac("02:00:0a:ff:00:01\n"),
            Some([2, 0, 10, 255, 0, 1])
        );
        assert_eq!(parse_mac("02:00:0a:ff:00"), None);
        assert_eq!(parse_mac("02:00:0a:ff:00:01:02"), None);
    }

    #[test]
    fn bring_up_skips_links_without_carrier() {
        let net = FakeNetwork {
            no_carrier: vec!["eth1".into()],
            ..Default::default()
        };
        assert!(bring_up(&net, "eth0", Duration::from_millis(50)).unwrap());
        assert!(!bring_up(&net, "eth1", Duration::from_millis(50)).unwrap());
        assert_eq!(*net.calls.lock().unwrap(), ["up eth0", "up eth1"]);
    }

    #[test]
    fn sysfs_listing_reads_type_and_address() {
        let root = std::env::temp_dir().join(format!("discovery-sysfs-{}", std::process::id()));
        for (n, ty, mac) in [
            ("eth0", "1", "02:00:00:00:00:01"),
            ("lo", "772", "00:00:00:00:00:00"),
        ] {
            fs::create_dir_all(root.join(n)).unwrap();
            fs::write(root.join(n).join("type"), ty).unwrap();
            fs::write(root.join(n).join("address"), mac).unwrap();
        }
        fs::write(root.join("eth0").join("carrier"), "1\n").unwrap();
        let net = SystemNetwork {
            sysfs_net: root.clone(),
        };
        let nics = net.list_nics().unwrap();
        assert_eq!(nics.len(), 1);
        assert_eq!(nics[0].mac_string(), "02:00:00:00:00:01");
        assert!(net.has_carrier("eth0"));
        assert!(!net.has_carrier("lo"));
        fs::remove_dir_all(root).unwrap();
    }
}
