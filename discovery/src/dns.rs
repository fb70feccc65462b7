//! A small stub resolver: queries the DHCP-given DNS servers over UDP, repeats over TCP when
//! the answer is truncated (RFC 1035 §4.2, RFC 7766), and orders SRV targets as RFC 2782
//! says. There is no libc resolver or NSS in the initramfs, so the agent does this itself;
//! the messages are encoded and parsed by `hickory-proto`.

use std::io::{Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::str::FromStr;
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use serde::Serialize;

/// Errors of a lookup; each names the query and the servers asked.
#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("DNS {qtype} {name}: no DNS server known (DHCP option 6 was empty)")]
    NoServers { name: String, qtype: &'static str },
    #[error("DNS {qtype} {name}: {what}")]
    Failed {
        name: String,
        qtype: &'static str,
        what: String,
    },
    #[error("{0:?} is not a valid DNS name")]
    BadName(String),
}

/// One SRV target (RFC 2782).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct SrvTarget {
    pub priority: u16,
    pub weight: u16,
    pub port: u16,
    pub target: String,
    /// Addresses given in the additional section, if any.
    pub addrs: Vec<Ipv4Addr>,
}

/// The answer to one query, decoded.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct DnsAnswer {
    pub truncated: bool,
    /// The answer came over TCP after a truncated UDP answer.
    pub via_tcp: bool,
    pub rcode_ok: bool,
    pub a: Vec<(String, Ipv4Addr)>,
    pub cnames: Vec<(String, String)>,
    pub srv: Vec<SrvTarget>,
}

/// Decodes a DNS response; never panics on arbitrary bytes.
pub fn decode_response(bytes: &[u8], id: Option<u16>) -> Result<DnsAnswer, String> {
    let msg = Message::from_vec(bytes).map_err(|e| format!("undecodable DNS response: {e}"))?;
    if msg.metadata.message_type != MessageType::Response {
        return Err("not a response".into());
    }
    if let Some(id) = id {
        if msg.metadata.id != id {
            return Err("response id does not match the query".into());
        }
    }
    let mut ans = DnsAnswer {
        truncated: msg.metadata.truncation,
        rcode_ok: msg.metadata.response_code == ResponseCode::NoError,
        ..Default::default()
    };
    let key = |n: &Name| n.to_ascii().trim_end_matches('.').to_ascii_lowercase();
    for r in msg.answers.iter().chain(msg.additionals.iter()) {
        match &r.data {
            RData::A(a) => ans.a.push((key(&r.name), a.0)),
            RData::CNAME(c) => ans.cnames.push((key(&r.name), key(&c.0))),
            _ => {}
        }
    }
    for r in &msg.answers {
        if let RData::SRV(s) = &r.data {
            let target = key(&s.target);
            // RFC 2782: a target of "." means the service is decidedly not available.
            if target.is_empty() {
                continue;
            }
            ans.srv.push(SrvTarget {
                priority: s.priority,
                weight: s.weight,
                port: s.port,
                addrs: Vec::new(),
                target,
            });
        }
    }
    for s in &mut ans.srv {
        s.addrs = ans
            .a
            .iter()
            .filter(|(n, _)| *n == s.target)
            .map(|(_, ip)| *ip)
            .collect();
    }
    Ok(ans)
}

/// Fuzz entry point for the DNS decoder.
pub fn fuzz_decode_response(data: &[u8]) {
    if let Ok(a) = decode_response(data, None) {
        let mut srv = a.srv;
        order_srv(&mut srv, &mut SplitMix(data.len() as u64));
    }
}

/// The random source for RFC 2782 weighted selection (a seedable SplitMix64: the order
/// only needs to spread load, and tests need to repeat it).
pub struct SplitMix(pub u64);

impl SplitMix {
    pub fn from_clock() -> SplitMix {
        use std::hash::{BuildHasher, Hasher};
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u8(0);
        SplitMix(h.finish())
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d4_9d4b_d6e6_d7b4);
        z ^ (z >> 31)
    }
}

/// Orders SRV targets per RFC 2782: ascending priority; within one priority, repeatedly pick
/// a target with probability proportional to its weight. Like Go's net package we draw from
/// `[0, sum)`, so a weight-0 target comes after every positive-weight target of its priority
/// (RFC 2782 only asks that it have "a very small chance"); all-zero weights keep their order.
pub fn order_srv(targets: &mut Vec<SrvTarget>, rng: &mut SplitMix) {
    targets.sort_by_key(|t| t.priority);
    let mut out = Vec::with_capacity(targets.len());
    let mut rest = std::mem::take(targets);
    while !rest.is_empty() {
        let prio = rest[0].priority;
        let n = rest.iter().take_while(|t| t.priority == prio).count();
        let mut group: Vec<SrvTarget> = rest.drain(..n).collect();
        while !group.is_empty() {
            let sum: u64 = group.iter().map(|t| u64::from(t.weight)).sum();
            if sum == 0 {
                out.append(&mut group);
                break;
            }
            let mut pick = rng.next_u64() % sum;
            let idx = group
                .iter()
                .position(|t| {
                    let w = u64::from(t.weight);
                    if pick < w {
                        true
                    } else {
                        pick -= w;
                        false
                    }
                })
                .unwrap_or(0);
            out.push(group.remove(idx));
        }
    }
    *targets = out;
}

/// The resolver: the DNS servers from DHCP option 6 and a per-query timeout.
#[derive(Debug, Clone)]
pub struct Resolver {
    pub servers: Vec<Ipv4Addr>,
    pub timeout: Duration,
    pub port: u16,
}

impl Resolver {
    pub fn new(servers: Vec<Ipv4Addr>, timeout: Duration) -> Resolver {
        Resolver {
            servers,
            timeout,
            port: 53,
        }
    }

    /// Sends one query to each server in turn until one answers (UDP, then TCP when the
    /// answer is truncated).
    pub fn query(&self, name: &str, qtype: RecordType) -> Result<DnsAnswer, DnsError> {
        let qname: &'static str = match qtype {
            RecordType::SRV => "SRV",
            RecordType::A => "A",
            _ => "query",
        };
        if self.servers.is_empty() {
            return Err(DnsError::NoServers {
                name: name.into(),
                qtype: qname,
            });
        }
        let fqdn = format!("{}.", name.trim_end_matches('.'));
        let n = Name::from_str(&fqdn).map_err(|_| DnsError::BadName(name.into()))?;
        let mut last = String::new();
        for server in &self.servers {
            let id = (SplitMix::from_clock().next_u64() & 0xffff) as u16;
            let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
            msg.metadata.recursion_desired = true;
            msg.add_query(Query::query(n.clone(), qtype));
            let bytes = msg.to_vec().map_err(|e| DnsError::Failed {
                name: name.into(),
                qtype: qname,
                what: format!("encoding the query: {e}"),
            })?;
            let addr = SocketAddr::from((*server, self.port));
            match self.udp(addr, &bytes, id) {
                Ok(a) if a.truncated => match self.tcp(addr, &bytes, id) {
                    Ok(a) => return Ok(a),
                    Err(e) => last = format!("{server}: TCP after truncation: {e}"),
                },
                Ok(a) => return Ok(a),
                Err(e) => last = format!("{server}: {e}"),
            }
        }
        Err(DnsError::Failed {
            name: name.into(),
            qtype: qname,
            what: last,
        })
    }

    fn udp(&self, addr: SocketAddr, q: &[u8], id: u16) -> Result<DnsAnswer, String> {
        let sock = UdpSocket::bind("0.0.0.0:0").map_err(|e| e.to_string())?;
        sock.connect(addr).map_err(|e| e.to_string())?;
        let deadline = Instant::now() + self.timeout;
        // One retransmission halfway through the timeout (lost first packet on a fresh link).
        let mut sent = 0;
        let mut buf = [0u8; 4096];
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err("no answer (timeout)".into());
            }
            let half = self.timeout / 2;
            if sent == 0 || (sent == 1 && now + half >= deadline) {
                sock.send(q).map_err(|e| e.to_string())?;
                sent += 1;
            }
            let wait = (deadline - now).min(half.max(Duration::from_millis(10)));
            let _ = sock.set_read_timeout(Some(wait));
            match sock.recv(&mut buf) {
                Ok(n) => match decode_response(&buf[..n], Some(id)) {
                    Ok(a) => return Ok(a),
                    Err(_) => continue,
                },
                Err(e) if e.kind() == std::io::ErrorKind::ConnectionRefused => {
                    return Err("port 53 refused".into())
                }
                Err(_) => continue,
            }
        }
    }

    fn tcp(&self, addr: SocketAddr, q: &[u8], id: u16) -> Result<DnsAnswer, String> {
        let mut s = TcpStream::connect_timeout(&addr, self.timeout).map_err(|e| e.to_string())?;
        s.set_read_timeout(Some(self.timeout))
            .map_err(|e| e.to_string())?;
        let len = u16::try_from(q.len()).map_err(|_| "query too long".to_string())?;
        let mut framed = len.to_be_bytes().to_vec();
        framed.extend_from_slice(q);
        s.write_all(&framed).map_err(|e| e.to_string())?;
        let mut lb = [0u8; 2];
        s.read_exact(&mut lb).map_err(|e| e.to_string())?;
        let mut resp = vec![0u8; u16::from_be_bytes(lb) as usize];
        s.read_exact(&mut resp).map_err(|e| e.to_string())?;
        decode_response(&resp, Some(id)).map(|mut a| {
            a.via_tcp = true;
            a
        })
    }

    /// IPv4 addresses of `name`, following CNAMEs given in the same answer.
    pub fn lookup_a(&self, name: &str) -> Result<Vec<Ipv4Addr>, DnsError> {
        let a = self.query(name, RecordType::A)?;
        let mut want = name.trim_end_matches('.').to_ascii_lowercase();
        for _ in 0..8 {
            let ips: Vec<Ipv4Addr> =
                a.a.iter()
                    .filter(|(n, _)| *n == want)
                    .map(|(_, ip)| *ip)
                    .collect();
            if !ips.is_empty() {
                return Ok(ips);
            }
            match a.cnames.iter().find(|(n, _)| *n == want) {
                Some((_, t)) => want = t.clone(),
                None => break,
            }
        }
        Err(DnsError::Failed {
            name: name.into(),
            qtype: "A",
            what: if a.rcode_ok {
                "no address in the answer".into()
            } else {
                "name not found".into()
            },
        })
    }

    /// SRV targets of `name` in RFC 2782 order, and whether TCP was needed.
    pub fn lookup_srv(
        &self,
        name: &str,
        rng: &mut SplitMix,
    ) -> Result<(Vec<SrvTarget>, bool), DnsError> {
        let mut a = self.query(name, RecordType::SRV)?;
        if a.srv.is_empty() {
            return Err(DnsError::Failed {
                name: name.into(),
                qtype: "SRV",
                what: if a.rcode_ok {
                    "no SRV records".into()
                } else {
                    "name not found".into()
                },
            });
        }
        order_srv(&mut a.srv, rng);
        Ok((a.srv, a.via_tcp))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::rr::rdata::{A, SRV};
    use hickory_proto::rr::Record;

    fn srv(p: u16, w: u16, t: &str) -> SrvTarget {
        SrvTarget {
            priority: p,
            weight: w,
            port: 80,
            target: t.into(),
            addrs: vec![],
        }
    }

    fn response(id: u16, truncated: bool) -> Vec<u8> {
        let mut m = Message::new(id, MessageType::Response, OpCode::Query);
        m.metadata.truncation = truncated;
        let n = Name::from_str("_VXCMServer._tcp.lab.example.").unwrap();
        m.add_query(Query::query(n.clone(), RecordType::SRV));
        let t = Name::from_str("srv1.lab.example.").unwrap();
        m.add_answer(Record::from_rdata(
            n.clone(),
            60,
            RData::SRV(SRV::new(10, 5, 8443, t.clone())),
        ));
        m.add_answer(Record::from_rdata(
            n,
            60,
            RData::SRV(SRV::new(0, 0, 80, Name::root())),
        ));
        m.add_additional(Record::from_rdata(t, 60, RData::A(A::new(10, 0, 0, 9))));
        m.to_vec().unwrap()
    }

    #[test]
    fn decodes_srv_with_additional_addresses() {
        let a = decode_response(&response(42, false), Some(42)).unwrap();
        assert_eq!(a.srv.len(), 1, "the '.' target is dropped");
        assert_eq!(a.srv[0].target, "srv1.lab.example");
        assert_eq!(a.srv[0].port, 8443);
        assert_eq!(a.srv[0].addrs, vec![Ipv4Addr::new(10, 0, 0, 9)]);
        assert!(decode_response(&response(42, false), Some(43)).is_err());
        assert!(decode_response(&response(1, true), None).unwrap().truncated);
    }

    #[test]
    fn srv_order_priority_then_weight() {
        let mut rng = SplitMix(1);
        let mut v = vec![
            srv(20, 0, "c"),
            srv(10, 0, "b0"),
            srv(10, 100, "a"),
            srv(5, 0, "first"),
        ];
        order_srv(&mut v, &mut rng);
        let names: Vec<&str> = v.iter().map(|t| t.target.as_str()).collect();
        assert_eq!(names, ["first", "a", "b0", "c"]);
        // Weighted: 90/10 split → the heavy one comes first about 90% of the time.
        let mut heavy_first = 0;
        for _ in 0..1000 {
            let mut v = vec![srv(1, 10, "light"), srv(1, 90, "heavy")];
            order_srv(&mut v, &mut rng);
            heavy_first += usize::from(v[0].target == "heavy");
        }
        assert!((850..950).contains(&heavy_first), "{heavy_first}");
    }

    #[test]
    fn fuzz_inputs_never_panic() {
        let valid = response(7, false);
        let mut rng = SplitMix(99);
        for i in 0..3000 {
            let mut b = valid.clone();
            let r = rng.next_u64();
            if i % 7 == 0 {
                b.truncate((r % valid.len() as u64) as usize);
            }
            for k in 0..(r % 5) {
                let x = rng.next_u64();
                if !b.is_empty() {
                    let pos = (x as usize) % b.len();
                    b[pos] = (x >> (8 + k)) as u8;
                }
            }
            fuzz_decode_response(&b);
        }
    }
}
