//! Sockets of a session: which interface carries it, the group sockets (a client listens on
//! the data port, the master on the control port), and the socket both sides send from.

use std::net::{Ipv4Addr, SocketAddrV4, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};

use crate::error::{Error, ErrorKind, Result};

/// Socket receive buffer asked for: a few hundred milliseconds of packets at gigabit rate,
/// so a busy moment on the receiver does not become loss.
const RCVBUF: usize = 8 << 20;

fn io(what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Network, format!("{what}: {e}"))
}

/// The IPv4 address of interface `name`, or of the interface of the default route, or of
/// the only non-loopback interface that is up with an address.
pub fn interface(name: Option<&str>) -> Result<(String, Ipv4Addr)> {
    let addrs: Vec<(String, Ipv4Addr, bool)> = nix::ifaddrs::getifaddrs()
        .map_err(|e| io("listing network interfaces", e.into()))?
        .filter_map(|i| {
            let a = i.address?.as_sockaddr_in()?.ip();
            let up = i.flags.contains(nix::net::if_::InterfaceFlags::IFF_UP);
            Some((i.interface_name, a, up))
        })
        .collect();
    if let Some(n) = name {
        return addrs
            .iter()
            .find(|(i, _, _)| i == n)
            .map(|(i, a, _)| (i.clone(), *a))
            .ok_or_else(|| {
                Error::invalid(format!(
                    "-iface={n}: no such interface with an IPv4 address (have: {})",
                    names(&addrs)
                ))
            });
    }
    if let Some(dev) = default_route_iface() {
        if let Some((i, a, _)) = addrs.iter().find(|(i, _, _)| *i == dev) {
            return Ok((i.clone(), *a));
        }
    }
    let up: Vec<_> = addrs
        .iter()
        .filter(|(_, a, up)| *up && !a.is_loopback())
        .collect();
    match up.as_slice() {
        [(i, a, _)] => Ok((i.clone(), *a)),
        [] => Err(Error::new(
            ErrorKind::Network,
            "no network interface is up with an IPv4 address: bring one up, or name it with -iface=",
        )),
        _ => Err(Error::invalid(format!(
            "several interfaces and no default route: choose one with -iface= (have: {})",
            names(&addrs)
        ))),
    }
}

fn names(addrs: &[(String, Ipv4Addr, bool)]) -> String {
    addrs
        .iter()
        .map(|(i, a, _)| format!("{i} {a}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn default_route_iface() -> Option<String> {
    let t = std::fs::read_to_string("/proc/net/route").ok()?;
    t.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        (f.len() > 2 && f[1] == "00000000").then(|| f[0].to_string())
    })
}

/// A socket that receives the group's packets to `port` (a client's on the data port, the
/// master's on the control port): bound to the group address and port (so other groups'
/// traffic is not delivered), joined on the interface.
pub fn group_socket(group: Ipv4Addr, port: u16, iface: Ipv4Addr) -> Result<UdpSocket> {
    let what = format!("joining multicast group {group}:{port} on {iface}");
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| io(&what, e))?;
    s.set_reuse_address(true).map_err(|e| io(&what, e))?;
    big_buffers(&s);
    s.bind(&SocketAddrV4::new(group, port).into())
        .map_err(|e| io(&what, e))?;
    s.join_multicast_v4(&group, &iface)
        .map_err(|e| io(&what, e))?;
    Ok(s.into())
}

/// The socket a device sends to the group from (ephemeral port on the interface's address),
/// out of the interface, with TTL `ttl`, looped back to receivers on the same host.
pub fn send_socket(iface: Ipv4Addr, ttl: u32) -> Result<UdpSocket> {
    let what = format!("opening a UDP socket on {iface}");
    let s =
        Socket::new(Domain::IPV4, Type::DGRAM, Some(Protocol::UDP)).map_err(|e| io(&what, e))?;
    big_buffers(&s);
    s.set_multicast_if_v4(&iface).map_err(|e| io(&what, e))?;
    s.set_multicast_ttl_v4(ttl).map_err(|e| io(&what, e))?;
    s.set_multicast_loop_v4(true).map_err(|e| io(&what, e))?;
    s.bind(&SocketAddrV4::new(Ipv4Addr::UNSPECIFIED, 0).into())
        .map_err(|e| io(&what, e))?;
    Ok(s.into())
}

/// Ask for [`RCVBUF`]-byte buffers; as root past `net.core.rmem_max` (SO_RCVBUFFORCE),
/// otherwise as much as the system allows.
fn big_buffers(s: &Socket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = s.set_recv_buffer_size(RCVBUF);
    let _ = s.set_send_buffer_size(RCVBUF);
    let _ = setsockopt(s, sockopt::RcvBufForce, &RCVBUF);
    let _ = setsockopt(s, sockopt::SndBufForce, &RCVBUF);
}

/// Bytes the kernel lets this socket queue for reading (what [`big_buffers`] obtained).
pub fn recv_queue_bytes(s: &UdpSocket) -> usize {
    socket2::SockRef::from(s).recv_buffer_size().unwrap_or(0)
}

/// Make a send that its own interface's queue drops fail with ENOBUFS instead of passing in
/// silence (IP_RECVERR): a master faster than its link then waits and sends again, as it
/// does for a full socket buffer, where otherwise every packet over the link's rate would be
/// lost before the wire and repaired later at the price of a NACK round.
pub fn report_local_drops(s: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    let _ = setsockopt(s, sockopt::Ipv4RecvErr, &true);
}

/// Packets a master may have between its socket and the wire: the kernel charges a datagram
/// to its socket's send buffer until the interface has sent it, so this bounds the
/// interface's queue too. About 220 full datagrams: 26 ms at 100 Mbit/s, 3 ms at 1 Gbit/s.
/// With the 8 MiB asked for by the other sockets, a master faster than its link filled a
/// 1000-frame interface queue (120 ms at 100 Mbit/s), and every repair waited behind it.
pub const SEND_QUEUE: usize = 256 << 10;

/// Bound `s`'s send buffer to [`SEND_QUEUE`] (the kernel doubles the figure for its own
/// bookkeeping); a send beyond it waits (`WouldBlock` on a non-blocking socket).
pub fn bound_send_queue(s: &UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if setsockopt(s, sockopt::SndBufForce, &SEND_QUEUE).is_err() {
        let _ = setsockopt(s, sockopt::SndBuf, &SEND_QUEUE);
    }
}

/// An ICMP error for an earlier packet (port or host unreachable; the master sends no
/// unicast, so a stray or forged one), which IP_RECVERR reports on the socket's next call,
/// whatever that call is, even a multicast send. That call did nothing: take the errors (see [`clear_errors`]) and
/// make it again.
pub fn is_icmp_error(e: &std::io::Error) -> bool {
    e.kind() == std::io::ErrorKind::ConnectionRefused
        || matches!(
            e.raw_os_error(),
            Some(libc::EHOSTUNREACH | libc::ENETUNREACH)
        )
}

/// Take the errors IP_RECVERR queued on `s`: they hold receive-buffer memory until read.
pub fn clear_errors(s: &UdpSocket) {
    use nix::sys::socket::{recv, MsgFlags};
    use std::os::fd::AsRawFd;
    let mut b = [0u8; 64];
    for _ in 0..64 {
        if recv(
            s.as_raw_fd(),
            &mut b,
            MsgFlags::MSG_ERRQUEUE | MsgFlags::MSG_DONTWAIT,
        )
        .is_err()
        {
            break;
        }
    }
}

/// Are packets waiting in `s`'s receive queue? (A peek that never blocks.)
pub fn backlogged(s: &UdpSocket) -> bool {
    let mut b = [std::mem::MaybeUninit::<u8>::uninit(); 1];
    socket2::SockRef::from(s)
        .recv_with_flags(&mut b, libc::MSG_PEEK | libc::MSG_DONTWAIT)
        .is_ok()
}

/// Datagrams received with one `recvmmsg` call: a receiver busy with a whole room's
/// traffic pays one system call (and one lock of its state) per batch, not per packet.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    lens: Vec<usize>,
    hdrs: nix::sys::socket::MultiHeaders<nix::sys::socket::SockaddrIn>,
}

impl RecvBatch {
    /// Room for `n` datagrams of up to `size` bytes each.
    pub fn new(n: usize, size: usize) -> RecvBatch {
        RecvBatch {
            bufs: vec![vec![0u8; size]; n],
            lens: Vec::with_capacity(n),
            hdrs: nix::sys::socket::MultiHeaders::preallocate(n, None),
        }
    }

    /// Wait for at least one datagram (up to the socket's read timeout: then 0), and take
    /// those already queued behind it.
    pub fn recv(&mut self, s: &UdpSocket) -> std::io::Result<usize> {
        use nix::sys::socket::{recvmmsg, MsgFlags};
        use std::io::IoSliceMut;
        use std::os::fd::AsRawFd;
        self.lens.clear();
        let mut iovs: Vec<[IoSliceMut<'_>; 1]> = self
            .bufs
            .iter_mut()
            .map(|b| [IoSliceMut::new(&mut b[..])])
            .collect();
        match recvmmsg(
            s.as_raw_fd(),
            &mut self.hdrs,
            iovs.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        ) {
            Ok(res) => {
                for m in res {
                    self.lens.push(m.bytes);
                }
            }
            Err(nix::errno::Errno::EAGAIN | nix::errno::Errno::EINTR) => {}
            Err(e) => return Err(e.into()),
        }
        Ok(self.lens.len())
    }

    /// Datagram `i` of the last [`Self::recv`].
    pub fn get(&self, i: usize) -> &[u8] {
        &self.bufs[i][..self.lens[i].min(self.bufs[i].len())]
    }
}
