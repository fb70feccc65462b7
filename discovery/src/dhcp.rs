//! Our own DHCPv4 client (RFC 2131/2132), small enough for the initramfs.
//!
//! * Messages are built and their fixed header decoded with `dhcproto`; the option area is
//!   walked by [`crate::options::walk_options`] so a malformed option costs only that option.
//! * Transport: a UDP socket on port 68 bound to the interface (`SO_BINDTODEVICE`) with
//!   `SO_BROADCAST`; we set the BROADCAST flag (RFC 2131 §4.1) so servers broadcast their
//!   replies and an interface without an address still receives them — no packet socket
//!   needed.
//! * No random 1–10 s start delay (RFC 2131 §4.4.1 recommends one against boot storms; time
//!   to lease matters more to us and the retransmission back-off still spreads clients).
//!   Retransmission starts at 1 s and doubles up to 8 s until the overall timeout.
//! * Several NICs are tried in parallel; the first lease wins.
//! * The second exchange for seed source 3 is a DHCPINFORM (we already hold an address)
//!   carrying vendor class `RTIAgent`, broadcast to port 67 and sent to port 4011 of the
//!   DHCP server (where a proxyDHCP listens when it shares the DHCP server's host, as PXE
//!   does).
//! * [`LeaseKeeper`] renews the lease at T1 (unicast) and rebinds at T2 (broadcast) for
//!   jobs that outlive it.

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::io;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, UdpSocket};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use dhcproto::v4::{self, DhcpOption, MessageType, OptionCode};
use dhcproto::{Decodable, Encodable};
use serde::Serialize;
use socket2::{Domain, Protocol, Socket, Type};

use crate::netif::{NetworkSetup, Nic};
use crate::options::{walk_options, RawOption, VxcmOptions};

pub const SERVER_PORT: u16 = 67;
pub const CLIENT_PORT: u16 = 68;
pub const PROXY_PORT: u16 = 4011;
/// RFC 2131 §2: the fixed BOOTP header, then the 4-byte magic cookie.
const OPTIONS_OFFSET: usize = 240;
/// RFC 1542 §2.1: relays may drop BOOTP messages shorter than 300 bytes.
const MIN_MESSAGE_LEN: usize = 300;

/// The options we ask for (option 55): mask, router, DNS, domain, broadcast, lease times,
/// vendor-specific information and the management-server tags of seed 000.
const REQUESTED: [u8; 13] = [1, 3, 6, 15, 28, 51, 54, 58, 59, 43, 186, 187, 190];
const REQUESTED_TAIL: [u8; 1] = [192];

/// Errors of the DHCP client.
#[derive(Debug, thiserror::Error)]
pub enum DhcpError {
    /// The cause is the `source()`, not part of the message, so `{e:#}` and other chain
    /// printers show it once.
    #[error("{iface}: {op}")]
    Io {
        iface: String,
        op: &'static str,
        source: io::Error,
    },
    #[error("no DHCP lease on {ifaces} within {secs:.1} s (is a DHCP server on this network? a static configuration can be set with `img -netconfig`)")]
    NoLease { ifaces: String, secs: f64 },
    #[error("{0}: DHCPNAK from the server, restarting")]
    Nak(String),
    #[error("{iface}: renewing the lease of {ip}: no answer from the DHCP server (the lease stays valid until it expires; rebinding follows at T2)")]
    RenewFailed { iface: String, ip: Ipv4Addr },
}

/// Timing and identity of the client.
#[derive(Debug, Clone)]
pub struct DhcpParams {
    /// Option 60 of the ordinary exchange.
    pub vendor_class: String,
    /// Give up getting a lease after this long.
    pub timeout: Duration,
    /// First retransmission interval; doubled up to 8 s.
    pub first_retry: Duration,
}

impl Default for DhcpParams {
    fn default() -> Self {
        DhcpParams {
            vendor_class: crate::DEFAULT_VENDOR_CLASS.into(),
            timeout: Duration::from_secs(20),
            first_retry: Duration::from_secs(1),
        }
    }
}

/// A decoded DHCP reply (OFFER, ACK, NAK, or a proxy's answer).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DhcpReply {
    pub msg_type: Option<MessageType>,
    pub xid: u32,
    pub yiaddr: Ipv4Addr,
    pub siaddr: Ipv4Addr,
    pub chaddr: Vec<u8>,
    pub options: Vec<RawOption>,
    pub notes: Vec<String>,
}

impl DhcpReply {
    /// Decodes a packet; `Err` names why it is not a usable BOOTREPLY.
    pub fn parse(bytes: &[u8]) -> Result<DhcpReply, String> {
        // dhcproto decodes the fixed header only: its option decoder has debug assertions
        // and unchecked `len - 1` on some options (found by our fuzz test), so untrusted
        // options never reach it; `walk_options` reads them instead.
        let Some(header) = bytes.get(..OPTIONS_OFFSET) else {
            return Err(format!(
                "{} bytes: shorter than a BOOTP header",
                bytes.len()
            ));
        };
        if header[236..240] != [99, 130, 83, 99] {
            return Err("no DHCP magic cookie".into());
        }
        let mut head = header.to_vec();
        head.push(255);
        let msg = v4::Message::from_bytes(&head).map_err(|e| format!("not a DHCP message: {e}"))?;
        if msg.opcode() != v4::Opcode::BootReply {
            return Err("not a BOOTREPLY".into());
        }
        let mut notes = Vec::new();
        let options = walk_options(&bytes[OPTIONS_OFFSET..], &mut notes);
        let msg_type = options
            .iter()
            .find(|o| o.code == 53)
            .and_then(|o| (o.value.len() == 1).then(|| MessageType::from(o.value[0])));
        Ok(DhcpReply {
            msg_type,
            xid: msg.xid(),
            yiaddr: msg.yiaddr(),
            siaddr: msg.siaddr(),
            // Not `msg.chaddr()`: it slices by the untrusted hlen and panics above 16 (found
            // by the dhcp_reply fuzz target). RFC 2131 §2: chaddr is bytes 28..44.
            chaddr: header[28..28 + usize::from(header[2]).min(16)].to_vec(),
            options,
            notes,
        })
    }

    pub fn option(&self, code: u8) -> Option<&[u8]> {
        self.options
            .iter()
            .find(|o| o.code == code)
            .map(|o| o.value.as_slice())
    }

    fn ip_option(&self, code: u8) -> Option<Ipv4Addr> {
        self.option(code)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(Ipv4Addr::from)
    }

    fn ip_list(&self, code: u8) -> Vec<Ipv4Addr> {
        match self.option(code) {
            Some(v) if v.len() % 4 == 0 => v
                .chunks_exact(4)
                .map(|c| Ipv4Addr::new(c[0], c[1], c[2], c[3]))
                .collect(),
            _ => Vec::new(),
        }
    }

    fn u32_option(&self, code: u8) -> Option<u32> {
        self.option(code)
            .and_then(|v| <[u8; 4]>::try_from(v).ok())
            .map(u32::from_be_bytes)
    }

    pub fn server_id(&self) -> Option<Ipv4Addr> {
        self.ip_option(54)
    }

    /// The management-server tags carried by this reply.
    pub fn vxcm(&self, notes: &mut Vec<String>) -> VxcmOptions {
        VxcmOptions::from_options(&self.options, notes)
    }
}

/// Fuzz entry point: decode a DHCP reply, its lease fields and its management-server tags.
pub fn fuzz_decode_reply(data: &[u8]) {
    if let Ok(r) = DhcpReply::parse(data) {
        let mut notes = Vec::new();
        let _ = r.vxcm(&mut notes);
        let _ = Lease::from_ack("fuzz0", [0; 6], &r);
    }
    let mut notes = Vec::new();
    let opts = walk_options(data, &mut notes);
    let _ = VxcmOptions::from_options(&opts, &mut notes);
}

/// What the DHCP server gave us.
#[derive(Debug, Clone, Serialize)]
pub struct Lease {
    pub iface: String,
    pub mac: String,
    pub ip: Ipv4Addr,
    pub prefix_len: u8,
    pub mask: Ipv4Addr,
    pub router: Option<Ipv4Addr>,
    pub dns_servers: Vec<Ipv4Addr>,
    /// Option 15, used for the URL list, SRV and host-name lookups.
    pub domain: Option<String>,
    pub server_id: Option<Ipv4Addr>,
    pub lease_secs: u32,
    pub renew_secs: u32,
    pub rebind_secs: u32,
    /// Options 186/190/192/187 (and the same in option 43) of this reply.
    pub vxcm: VxcmOptions,
    /// Every option as received, for the check-in and for diagnosis.
    pub raw_options: Vec<RawOption>,
    /// Malformed options that were ignored.
    pub notes: Vec<String>,
    /// proxyDHCP servers that answered the DISCOVER without an address.
    pub proxy_servers: Vec<Ipv4Addr>,
    #[serde(skip)]
    pub obtained: Instant,
    #[serde(skip)]
    pub(crate) mac_bytes: [u8; 6],
}

impl Lease {
    /// Builds a lease from an ACK; `None` when it carries no usable address.
    pub fn from_ack(iface: &str, mac: [u8; 6], ack: &DhcpReply) -> Option<Lease> {
        let ip = ack.yiaddr;
        if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
            return None;
        }
        let mut notes = ack.notes.clone();
        let prefix_len = match ack.ip_option(1) {
            Some(m) if u32::from(m).leading_ones() == u32::from(m).count_ones() => {
                u32::from(m).count_ones() as u8
            }
            other => {
                // RFC 2131 §4.3.1 obliges servers to send the mask; fall back to the class.
                if let Some(m) = other {
                    notes.push(format!("option 1 ignored: {m} is not a contiguous netmask"));
                }
                match ip.octets()[0] {
                    0..=127 => 8,
                    128..=191 => 16,
                    _ => 24,
                }
            }
        };
        let domain = ack.option(15).and_then(|v| {
            let s = String::from_utf8_lossy(v);
            let s = s.trim_matches(|c: char| c == '\0' || c.is_whitespace() || c == '.');
            let ok = !s.is_empty()
                && s.len() <= 253
                && s.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_');
            if !ok {
                notes.push(format!("option 15 ignored: {s:?} is not a domain name"));
            }
            ok.then(|| s.to_string())
        });
        let lease_secs = ack.u32_option(51).unwrap_or(3600);
        let vxcm = ack.vxcm(&mut notes);
        Some(Lease {
            iface: iface.to_string(),
            mac: crate::netif::Nic {
                name: String::new(),
                mac,
            }
            .mac_string(),
            ip,
            prefix_len,
            mask: crate::netif::prefix_to_mask(prefix_len),
            router: ack.ip_list(3).into_iter().next(),
            dns_servers: ack.ip_list(6),
            domain,
            server_id: ack.server_id(),
            lease_secs,
            renew_secs: ack.u32_option(58).unwrap_or(lease_secs / 2),
            rebind_secs: ack.u32_option(59).unwrap_or(lease_secs / 8 * 7),
            vxcm,
            raw_options: ack.options.clone(),
            notes,
            proxy_servers: Vec::new(),
            obtained: Instant::now(),
            mac_bytes: mac,
        })
    }

    /// The lease's DNS servers and domain in resolv.conf(5) form, for the libc resolver that
    /// later steps (the check-in's HTTP client) use.
    pub fn resolv_conf(&self) -> String {
        let mut out = String::from("# written by the boot agent from its DHCP lease\n");
        if let Some(d) = &self.domain {
            out.push_str(&format!("search {d}\n"));
        }
        for s in &self.dns_servers {
            out.push_str(&format!("nameserver {s}\n"));
        }
        out
    }

    /// Applies the lease to the interface: address, netmask, default route.
    pub fn configure(&self, net: &dyn NetworkSetup) -> io::Result<()> {
        net.set_address(&self.iface, self.ip, self.prefix_len)?;
        if let Some(gw) = self.router {
            net.add_default_route(&self.iface, gw)?;
        }
        Ok(())
    }
}

/// A transaction id: a fresh random value per exchange (RandomState is seeded from the
/// OS random source; no extra crate needed).
fn new_xid() -> u32 {
    let mut h = RandomState::new().build_hasher();
    h.write_u64(Instant::now().elapsed().as_nanos() as u64);
    h.finish() as u32
}

/// Builds a client message. The arguments are the BOOTP/DHCP fields a client sets, one each.
#[allow(clippy::too_many_arguments)]
pub fn build_message(
    kind: MessageType,
    xid: u32,
    mac: [u8; 6],
    ciaddr: Ipv4Addr,
    vendor_class: &str,
    requested_ip: Option<Ipv4Addr>,
    server_id: Option<Ipv4Addr>,
    secs: u16,
) -> Vec<u8> {
    let mut msg = v4::Message::new_with_id(
        xid,
        ciaddr,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        Ipv4Addr::UNSPECIFIED,
        &mac,
    );
    msg.set_secs(secs);
    // Ask for broadcast replies while we have no address (see module docs); a renewing
    // client with an address gets unicast (RFC 2131 §4.1).
    if ciaddr.is_unspecified() {
        msg.set_flags(v4::Flags::default().set_broadcast());
    }
    let opts = msg.opts_mut();
    opts.insert(DhcpOption::MessageType(kind));
    let mut client_id = vec![1u8];
    client_id.extend_from_slice(&mac);
    opts.insert(DhcpOption::ClientIdentifier(client_id));
    opts.insert(DhcpOption::MaxMessageSize(1500));
    let prl = REQUESTED
        .iter()
        .chain(REQUESTED_TAIL.iter())
        .map(|&c| OptionCode::from(c))
        .collect();
    opts.insert(DhcpOption::ParameterRequestList(prl));
    if !vendor_class.is_empty() {
        opts.insert(DhcpOption::ClassIdentifier(
            vendor_class.as_bytes().to_vec(),
        ));
    }
    if let Some(ip) = requested_ip {
        opts.insert(DhcpOption::RequestedIpAddress(ip));
    }
    if let Some(sid) = server_id {
        opts.insert(DhcpOption::ServerIdentifier(sid));
    }
    // Encoding our own well-formed message cannot fail; an empty vector would simply not
    // be answered.
    let mut bytes = msg.to_vec().unwrap_or_default();
    if bytes.len() < MIN_MESSAGE_LEN {
        bytes.resize(MIN_MESSAGE_LEN, 0);
    }
    bytes
}

/// A DHCP client socket on one interface.
pub struct DhcpSocket {
    pub nic: Nic,
    sock: UdpSocket,
}

impl DhcpSocket {
    pub fn open(nic: &Nic) -> Result<DhcpSocket, DhcpError> {
        let io = |op| {
            move |source| DhcpError::Io {
                iface: nic.name.clone(),
                op,
                source,
            }
        };
        let sock = Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP))
            .map_err(io("creating the DHCP socket"))?;
        sock.set_reuse_address(true).map_err(io("SO_REUSEADDR"))?;
        sock.set_broadcast(true).map_err(io("SO_BROADCAST"))?;
        sock.bind_device(Some(nic.name.as_bytes()))
            .map_err(io("SO_BINDTODEVICE"))?;
        let addr = SocketAddr::from((Ipv4Addr::UNSPECIFIED, CLIENT_PORT));
        sock.bind(&addr.into()).map_err(io("binding UDP port 68"))?;
        // socket2 for the set-up, std for the safe send/recv afterwards.
        Ok(DhcpSocket {
            nic: nic.clone(),
            sock: sock.into(),
        })
    }

    fn send(&self, bytes: &[u8], to: SocketAddrV4) -> Result<(), DhcpError> {
        self.sock
            .send_to(bytes, to)
            .map(|_| ())
            .map_err(|source| DhcpError::Io {
                iface: self.nic.name.clone(),
                op: "sending a DHCP message",
                source,
            })
    }

    /// Waits until `deadline` for a reply with our xid and MAC accepted by `want`.
    fn receive(
        &self,
        xid: u32,
        deadline: Instant,
        stop: &AtomicBool,
        mut want: impl FnMut(&DhcpReply) -> bool,
    ) -> Option<DhcpReply> {
        let mut buf = [0u8; 1500];
        loop {
            let now = Instant::now();
            if now >= deadline || stop.load(Ordering::Relaxed) {
                return None;
            }
            // Wake at least every 100 ms to notice `stop` (another NIC won).
            let wait = (deadline - now).min(Duration::from_millis(100));
            let _ = self
                .sock
                .set_read_timeout(Some(wait.max(Duration::from_millis(1))));
            let n = match self.sock.recv(&mut buf) {
                Ok(n) => n,
                Err(_) => continue,
            };
            let Ok(reply) = DhcpReply::parse(&buf[..n]) else {
                continue;
            };
            if reply.xid != xid || reply.chaddr.get(..6) != Some(&self.nic.mac[..]) {
                continue;
            }
            if want(&reply) {
                return Some(reply);
            }
        }
    }

    /// DISCOVER → OFFER → REQUEST → ACK, with retransmission, until `params.timeout`.
    pub fn obtain_lease(&self, params: &DhcpParams, stop: &AtomicBool) -> Result<Lease, DhcpError> {
        let start = Instant::now();
        let give_up = start + params.timeout;
        let mac = self.nic.mac;
        let bcast = SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT);
        let secs = || start.elapsed().as_secs().min(u16::MAX as u64) as u16;
        let mut retry = params.first_retry;
        let mut proxies = Vec::new();
        while Instant::now() < give_up && !stop.load(Ordering::Relaxed) {
            let xid = new_xid();
            let discover = build_message(
                MessageType::Discover,
                xid,
                mac,
                Ipv4Addr::UNSPECIFIED,
                &params.vendor_class,
                None,
                None,
                secs(),
            );
            self.send(&discover, bcast)?;
            let wait_until = (Instant::now() + retry).min(give_up);
            // An offer without an address is a proxyDHCP announcing itself (PXE style):
            // remember it for the RTIAgent exchange on port 4011.
            let offer = self.receive(xid, wait_until, stop, |r| {
                if r.msg_type == Some(MessageType::Offer) && r.yiaddr.is_unspecified() {
                    if let Some(sid) = r.server_id() {
                        if !proxies.contains(&sid) {
                            proxies.push(sid);
                        }
                    }
                }
                r.msg_type == Some(MessageType::Offer) && !r.yiaddr.is_unspecified()
            });
            let Some(offer) = offer else {
                retry = (retry * 2).min(Duration::from_secs(8));
                continue;
            };
            // REQUEST, retransmitted with the same back-off a few times.
            let mut req_retry = params.first_retry;
            for _ in 0..4 {
                let request = build_message(
                    MessageType::Request,
                    xid,
                    mac,
                    Ipv4Addr::UNSPECIFIED,
                    &params.vendor_class,
                    Some(offer.yiaddr),
                    offer.server_id(),
                    secs(),
                );
                self.send(&request, bcast)?;
                let until = (Instant::now() + req_retry).min(give_up);
                let answer = self.receive(xid, until, stop, |r| {
                    matches!(r.msg_type, Some(MessageType::Ack) | Some(MessageType::Nak))
                });
                match answer {
                    Some(r) if r.msg_type == Some(MessageType::Ack) => {
                        if let Some(mut lease) = Lease::from_ack(&self.nic.name, mac, &r) {
                            lease.proxy_servers = proxies;
                            return Ok(lease);
                        }
                        break;
                    }
                    Some(_) => break, // NAK: start over with DISCOVER
                    None => req_retry = (req_retry * 2).min(Duration::from_secs(8)),
                }
                if Instant::now() >= give_up {
                    break;
                }
            }
        }
        Err(DhcpError::NoLease {
            ifaces: self.nic.name.clone(),
            secs: start.elapsed().as_secs_f64(),
        })
    }

    /// Seed source 3: DHCPINFORM with option 60 = `vendor_class` (normally `RTIAgent`),
    /// broadcast to port 67 and unicast to port 4011 of the DHCP server and of `proxies`.
    /// Returns the replies that arrived within `timeout` (stops early once one carries the
    /// management-server tags, or 300 ms after the first plain answer).
    pub fn inform(
        &self,
        lease: &Lease,
        vendor_class: &str,
        proxies: &[Ipv4Addr],
        timeout: Duration,
    ) -> Vec<DhcpReply> {
        let xid = new_xid();
        let msg = build_message(
            MessageType::Inform,
            xid,
            self.nic.mac,
            lease.ip,
            vendor_class,
            None,
            None,
            0,
        );
        let mut targets = vec![SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT)];
        for ip in lease.server_id.iter().chain(proxies) {
            let t = SocketAddrV4::new(*ip, PROXY_PORT);
            if !targets.contains(&t) {
                targets.push(t);
            }
        }
        for t in &targets {
            let _ = self.send(&msg, *t);
        }
        let stop = AtomicBool::new(false);
        let mut replies = Vec::new();
        let mut deadline = Instant::now() + timeout;
        while let Some(r) = self.receive(xid, deadline, &stop, |r| {
            r.msg_type == Some(MessageType::Ack)
        }) {
            let mut notes = Vec::new();
            let has_tags = !r.vxcm(&mut notes).is_empty();
            replies.push(r);
            if has_tags {
                break;
            }
            deadline = deadline.min(Instant::now() + Duration::from_millis(300));
        }
        replies
    }

    /// Renews (unicast to the server, RFC 2131 §4.3.2 RENEWING) or rebinds (broadcast).
    pub fn renew(
        &self,
        lease: &Lease,
        params: &DhcpParams,
        rebind: bool,
    ) -> Result<Lease, DhcpError> {
        let xid = new_xid();
        let msg = build_message(
            MessageType::Request,
            xid,
            lease.mac_bytes,
            lease.ip,
            &params.vendor_class,
            None,
            None,
            0,
        );
        let to = match (rebind, lease.server_id) {
            (false, Some(sid)) => SocketAddrV4::new(sid, SERVER_PORT),
            _ => SocketAddrV4::new(Ipv4Addr::BROADCAST, SERVER_PORT),
        };
        let stop = AtomicBool::new(false);
        let mut wait = params.first_retry;
        for _ in 0..4 {
            self.send(&msg, to)?;
            let until = Instant::now() + wait;
            match self.receive(xid, until, &stop, |r| {
                matches!(r.msg_type, Some(MessageType::Ack) | Some(MessageType::Nak))
            }) {
                Some(r) if r.msg_type == Some(MessageType::Ack) => {
                    if let Some(l) = Lease::from_ack(&self.nic.name, lease.mac_bytes, &r) {
                        return Ok(l);
                    }
                }
                Some(_) => return Err(DhcpError::Nak(self.nic.name.clone())),
                None => wait = (wait * 2).min(Duration::from_secs(8)),
            }
        }
        Err(DhcpError::RenewFailed {
            iface: self.nic.name.clone(),
            ip: lease.ip,
        })
    }
}

/// Tries every NIC with carrier in parallel; the first lease wins and the others stop.
/// The winning lease is *not* applied to the interface: the caller decides.
pub fn obtain_first_lease(
    nics: &[Nic],
    params: &DhcpParams,
    log: &Mutex<Vec<String>>,
) -> Result<(Lease, DhcpSocket), DhcpError> {
    let stop = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel();
    let mut last_err = None;
    let mut started = 0;
    for nic in nics {
        let sock = match DhcpSocket::open(nic) {
            Ok(s) => s,
            Err(e) => {
                log.lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .push(crate::error_chain(&e));
                last_err = Some(e);
                continue;
            }
        };
        started += 1;
        let (tx, stop, params) = (tx.clone(), stop.clone(), params.clone());
        thread::spawn(move || {
            let r = sock.obtain_lease(&params, &stop);
            let _ = tx.send((r, sock));
        });
    }
    drop(tx);
    let mut errors = Vec::new();
    for _ in 0..started {
        let Ok((r, sock)) = rx.recv() else { break };
        match r {
            Ok(lease) => {
                stop.store(true, Ordering::Relaxed);
                return Ok((lease, sock));
            }
            Err(e) => errors.push(e),
        }
    }
    Err(errors.pop().or(last_err).unwrap_or(DhcpError::NoLease {
        ifaces: nics
            .iter()
            .map(|n| n.name.as_str())
            .collect::<Vec<_>>()
            .join(", "),
        secs: params.timeout.as_secs_f64(),
    }))
}

/// Keeps a lease alive during long jobs: sleeps until T1, renews (unicast), falls back to
/// rebinding (broadcast) after T2, and re-applies the renewed lease. Dropping the keeper (or
/// calling [`LeaseKeeper::stop`]) ends the thread.
pub struct LeaseKeeper {
    stop: Arc<AtomicBool>,
    current: Arc<Mutex<Lease>>,
    handle: Option<thread::JoinHandle<()>>,
}

impl LeaseKeeper {
    pub fn spawn(lease: Lease, params: DhcpParams, net: Arc<dyn NetworkSetup>) -> LeaseKeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let current = Arc::new(Mutex::new(lease));
        let (s, c) = (stop.clone(), current.clone());
        let handle = thread::spawn(move || {
            while !s.load(Ordering::Relaxed) {
                let lease = c.lock().unwrap_or_else(|p| p.into_inner()).clone();
                // A floor of 2 s keeps a server sending T1 = 0 from making us spin.
                let t1 = lease.obtained + Duration::from_secs(u64::from(lease.renew_secs.max(2)));
                let t2 = lease.obtained + Duration::from_secs(u64::from(lease.rebind_secs.max(2)));
                while Instant::now() < t1 && !s.load(Ordering::Relaxed) {
                    thread::sleep(Duration::from_millis(200));
                }
                if s.load(Ordering::Relaxed) {
                    break;
                }
                let nic = Nic {
                    name: lease.iface.clone(),
                    mac: lease.mac_bytes,
                };
                let renewed = DhcpSocket::open(&nic)
                    .and_then(|sock| sock.renew(&lease, &params, Instant::now() >= t2));
                match renewed {
                    Ok(new) => {
                        let _ = new.configure(net.as_ref());
                        *c.lock().unwrap_or_else(|p| p.into_inner()) = new;
                    }
                    Err(_) => thread::sleep(Duration::from_secs(5)),
                }
            }
        });
        LeaseKeeper {
            stop,
            current,
            handle: Some(handle),
        }
    }

    /// The lease as last renewed.
    pub fn lease(&self) -> Lease {
        self.current
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAC: [u8; 6] = [2, 0, 0, 0, 0, 9];

    /// `{e:#}`-style printing (the error, then each `source()`) names the OS error once.
    #[test]
    fn io_error_chain_names_its_cause_once() {
        let e = DhcpError::Io {
            iface: "eth0".into(),
            op: "SO_BINDTODEVICE",
            source: io::Error::from_raw_os_error(libc::ENODEV),
        };
        let cause = io::Error::from_raw_os_error(libc::ENODEV).to_string();
        let chain = crate::error_chain(&e);
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        assert!(chain.starts_with("eth0: SO_BINDTODEVICE: "), "{chain}");
        assert!(std::error::Error::source(&e).is_some());

        // The same through the real socket set-up: an interface that does not exist.
        let nic = Nic {
            name: "nonexistent9".into(),
            mac: MAC,
        };
        let Err(e) = DhcpSocket::open(&nic) else {
            panic!("opening a DHCP socket on a missing interface succeeded");
        };
        let chain = crate::error_chain(&e);
        let cause = std::error::Error::source(&e)
            .expect("an I/O cause")
            .to_string();
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        assert!(chain.starts_with("nonexistent9: "), "{chain}");
    }

    /// A server reply built with dhcproto, with extra raw option bytes appended.
    fn reply(kind: MessageType, xid: u32, extra: &[u8]) -> Vec<u8> {
        let mut m = v4::Message::new_with_id(
            xid,
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::new(10, 0, 0, 50),
            Ipv4Addr::UNSPECIFIED,
            Ipv4Addr::UNSPECIFIED,
            &MAC,
        );
        m.set_opcode(v4::Opcode::BootReply);
        m.opts_mut().insert(DhcpOption::MessageType(kind));
        m.opts_mut()
            .insert(DhcpOption::ServerIdentifier(Ipv4Addr::new(10, 0, 0, 1)));
        m.opts_mut()
            .insert(DhcpOption::SubnetMask(Ipv4Addr::new(255, 255, 255, 0)));
        m.opts_mut()
            .insert(DhcpOption::Router(vec![Ipv4Addr::new(10, 0, 0, 254)]));
        m.opts_mut()
            .insert(DhcpOption::DomainNameServer(vec![Ipv4Addr::new(
                10, 0, 0, 1,
            )]));
        m.opts_mut()
            .insert(DhcpOption::DomainName("lab.example".into()));
        m.opts_mut().insert(DhcpOption::AddressLeaseTime(600));
        let mut b = m.to_vec().unwrap();
        // Replace the End option with our extra options + End.
        assert_eq!(b.pop(), Some(255));
        b.extend_from_slice(extra);
        b.push(255);
        b
    }

    #[test]
    fn discover_carries_vendor_class_and_request_list() {
        let b = build_message(
            MessageType::Discover,
            7,
            MAC,
            Ipv4Addr::UNSPECIFIED,
            "OpenBootAgent",
            None,
            None,
            0,
        );
        assert!(b.len() >= MIN_MESSAGE_LEN);
        let m = v4::Message::from_bytes(&b).unwrap();
        assert!(m.flags().broadcast());
        assert_eq!(m.xid(), 7);
        let Some(DhcpOption::ParameterRequestList(prl)) =
            m.opts().get(OptionCode::ParameterRequestList)
        else {
            panic!("no PRL")
        };
        let codes: Vec<u8> = prl.iter().map(|c| u8::from(*c)).collect();
        for c in [43, 186, 187, 190, 192, 15, 6] {
            assert!(codes.contains(&c), "{c} missing in {codes:?}");
        }
        assert_eq!(
            m.opts().get(OptionCode::ClassIdentifier),
            Some(&DhcpOption::ClassIdentifier(b"OpenBootAgent".to_vec()))
        );
    }

    #[test]
    fn ack_becomes_a_lease_with_vendor_tags() {
        let b = reply(
            MessageType::Ack,
            9,
            &[186, 4, 10, 0, 0, 7, 190, 2, 1, 0xbb, 192, 2, 0, 80],
        );
        let r = DhcpReply::parse(&b).unwrap();
        assert_eq!(r.msg_type, Some(MessageType::Ack));
        let l = Lease::from_ack("eth0", MAC, &r).unwrap();
        assert_eq!(l.ip, Ipv4Addr::new(10, 0, 0, 50));
        assert_eq!(l.prefix_len, 24);
        assert_eq!(l.router, Some(Ipv4Addr::new(10, 0, 0, 254)));
        assert_eq!(l.dns_servers, vec![Ipv4Addr::new(10, 0, 0, 1)]);
        assert_eq!(l.domain.as_deref(), Some("lab.example"));
        assert_eq!((l.lease_secs, l.renew_secs), (600, 300));
        assert_eq!(l.vxcm.server, Some(Ipv4Addr::new(10, 0, 0, 7)));
        assert_eq!(l.vxcm.secure_port, Some(443));
        assert_eq!(l.mac, "02:00:00:00:00:09");
        let net = crate::netif::tests::FakeNetwork::default();
        l.configure(&net).unwrap();
        assert_eq!(
            *net.calls.lock().unwrap(),
            ["addr eth0 10.0.0.50/24", "route eth0 10.0.0.254"]
        );
    }

    #[test]
    fn malformed_options_do_not_lose_the_reply() {
        // A truncated 186 at the end: the lease stays usable, a note says why.
        let b = reply(MessageType::Ack, 9, &[192, 2, 0, 80, 186, 9, 1]);
        let r = DhcpReply::parse(&b[..b.len() - 1]).unwrap();
        let l = Lease::from_ack("eth0", MAC, &r).unwrap();
        assert_eq!(l.vxcm.plain_port, Some(80));
        assert!(!l.notes.is_empty());
        assert!(DhcpReply::parse(&b[..100]).is_err());
    }

    #[test]
    fn hardware_address_length_above_16_is_not_trusted() {
        let mut b = reply(MessageType::Ack, 9, &[]);
        b[2] = 200;
        let r = DhcpReply::parse(&b).unwrap();
        assert_eq!(r.chaddr.len(), 16);
        fuzz_decode_reply(&b);
    }

    #[test]
    fn fuzz_inputs_never_panic() {
        let valid = reply(
            MessageType::Ack,
            1,
            &[43, 6, 186, 4, 1, 2, 3, 4, 187, 2, 0, 80],
        );
        let mut state = 0x2545_f491_4f6c_dd1du64;
        for i in 0..3000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut b = valid.clone();
            if i % 10 == 0 {
                b.truncate((state % valid.len() as u64) as usize);
            }
            for k in 0..(state % 6) {
                let r = state.rotate_left(k as u32 * 11);
                // Mostly the options, sometimes the fixed header (hlen, op, cookie).
                let pos = if k % 3 == 2 {
                    r as usize % b.len().max(1)
                } else {
                    OPTIONS_OFFSET + (r as usize % (b.len().saturating_sub(OPTIONS_OFFSET).max(1)))
                };
                if pos < b.len() {
                    b[pos] = (r >> 32) as u8;
                }
            }
            fuzz_decode_reply(&b);
            let random: Vec<u8> = (0..(state % 400))
                .map(|j| (state >> (j % 56)) as u8)
                .collect();
            fuzz_decode_reply(&random);
        }
    }
}
