//! Is a candidate server there? A TCP connect, then the cheapest request that proves an HTTP
//! or TLS server is listening:
//!
//! * HTTP: `HEAD / HTTP/1.0`; any reply starting with `HTTP/` counts (a 404 still proves the
//!   server is there).
//! * HTTPS: a TLS 1.2 ClientHello; any TLS record in reply (ServerHello or an alert) counts.
//!   We deliberately do not verify the certificate here: the management server usually
//!   has a private CA that only the check-in (a later step) knows how to verify. Keeping a
//!   TLS stack out of discovery also keeps the binary small.

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::time::Duration;

use crate::urllist::Scheme;

/// Outcome of a probe, with the reason logged for every candidate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ProbeResult {
    Answered(String),
    Failed(String),
}

/// Probes `addr` speaking `scheme`; `host` is used for `Host:` and SNI.
pub fn probe(addr: SocketAddr, scheme: Scheme, host: &str, timeout: Duration) -> ProbeResult {
    let mut s = match TcpStream::connect_timeout(&addr, timeout) {
        Ok(s) => s,
        Err(e) => return ProbeResult::Failed(format!("TCP connect to {addr}: {e}")),
    };
    let _ = s.set_read_timeout(Some(timeout));
    let _ = s.set_write_timeout(Some(timeout));
    let _ = s.set_nodelay(true);
    let request = match scheme {
        Scheme::Http => {
            format!("HEAD / HTTP/1.0\r\nHost: {host}\r\nUser-Agent: boot-agent-discovery\r\n\r\n")
                .into_bytes()
        }
        Scheme::Https => client_hello(host),
    };
    if let Err(e) = s.write_all(&request) {
        return ProbeResult::Failed(format!("{addr}: connected, sending failed: {e}"));
    }
    let mut buf = [0u8; 16];
    let mut got = 0;
    while got < 5 {
        match s.read(&mut buf[got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) => {
                return ProbeResult::Failed(format!(
                    "{addr}: connected, no {} answer: {e}",
                    scheme.as_str().to_uppercase()
                ))
            }
        }
    }
    let head = &buf[..got];
    match scheme {
        Scheme::Http if head.starts_with(b"HTTP/") => {
            let line = String::from_utf8_lossy(head);
            ProbeResult::Answered(format!("HTTP server answered ({}...)", line.trim_end()))
        }
        Scheme::Http => ProbeResult::Failed(format!(
            "{addr}: connected, but the reply is not HTTP ({got} bytes)"
        )),
        // TLS record header (RFC 5246 §6.2.1): type 22 handshake or 21 alert, version 3.x.
        Scheme::Https if got >= 2 && (head[0] == 22 || head[0] == 21) && head[1] == 3 => {
            ProbeResult::Answered(if head[0] == 22 {
                "TLS server answered (certificate verified later, at check-in)".into()
            } else {
                "TLS server answered with an alert (still a TLS server; certificate verified at check-in)".into()
            })
        }
        Scheme::Https => ProbeResult::Failed(format!(
            "{addr}: connected, but the reply is not TLS ({got} bytes)"
        )),
    }
}

/// A minimal TLS 1.2 ClientHello (RFC 5246 §7.4.1.2) offering common ECDHE/RSA suites, with
/// SNI for names (RFC 6066 §3), supported groups, point formats and signature algorithms so
/// that OpenSSL-, Go- and Java-based servers answer with a ServerHello.
pub fn client_hello(host: &str) -> Vec<u8> {
    fn ext(out: &mut Vec<u8>, ty: u16, body: &[u8]) {
        out.extend_from_slice(&ty.to_be_bytes());
        out.extend_from_slice(&(body.len() as u16).to_be_bytes());
        out.extend_from_slice(body);
    }
    let mut exts = Vec::new();
    if host.parse::<IpAddr>().is_err() && !host.is_empty() && host.len() < 256 {
        let h = host.as_bytes();
        let mut sni = Vec::new();
        sni.extend_from_slice(&((h.len() + 3) as u16).to_be_bytes());
        sni.push(0);
        sni.extend_from_slice(&(h.len() as u16).to_be_bytes());
        sni.extend_from_slice(h);
        ext(&mut exts, 0x0000, &sni);
    }
    ext(
        &mut exts,
        0x000a,
        &[0, 6, 0x00, 0x1d, 0x00, 0x17, 0x00, 0x18],
    );
    ext(&mut exts, 0x000b, &[1, 0]);
    let sigs: [u16; 9] = [
        0x0403, 0x0804, 0x0401, 0x0503, 0x0805, 0x0501, 0x0806, 0x0601, 0x0201,
    ];
    let mut s = ((sigs.len() * 2) as u16).to_be_bytes().to_vec();
    for x in sigs {
        s.extend_from_slice(&x.to_be_bytes());
    }
    ext(&mut exts, 0x000d, &s);
    ext(&mut exts, 0xff01, &[0]); // renegotiation_info, empty (RFC 5746)

    let suites: [u16; 10] = [
        0xc02f, 0xc030, 0xc02b, 0xc02c, 0xcca8, 0xcca9, 0x009c, 0x009d, 0x002f, 0x0035,
    ];
    let mut body = vec![3, 3];
    // The client random: not secret here (no key is ever derived), but vary it anyway.
    let mut rng = crate::dns::SplitMix::from_clock();
    for _ in 0..4 {
        body.extend_from_slice(&rng.next_u64().to_be_bytes());
    }
    body.push(0); // session id
    body.extend_from_slice(&((suites.len() * 2) as u16).to_be_bytes());
    for c in suites {
        body.extend_from_slice(&c.to_be_bytes());
    }
    body.extend_from_slice(&[1, 0]); // compression: null
    body.extend_from_slice(&(exts.len() as u16).to_be_bytes());
    body.extend_from_slice(&exts);

    let mut hs = vec![1];
    hs.extend_from_slice(&(body.len() as u32).to_be_bytes()[1..]);
    hs.extend_from_slice(&body);
    let mut rec = vec![22, 3, 1];
    rec.extend_from_slice(&(hs.len() as u16).to_be_bytes());
    rec.extend_from_slice(&hs);
    rec
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::TcpListener;
    use std::thread;

    fn one_shot(reply: &'static [u8]) -> SocketAddr {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        thread::spawn(move || {
            if let Ok((mut s, _)) = l.accept() {
                let mut b = [0u8; 512];
                let _ = s.read(&mut b);
                let _ = s.write_all(reply);
            }
        });
        addr
    }

    #[test]
    fn http_and_tls_answers() {
        let t = Duration::from_secs(2);
        let a = one_shot(b"HTTP/1.0 404 Not Found\r\n\r\n");
        assert!(matches!(
            probe(a, Scheme::Http, "x", t),
            ProbeResult::Answered(_)
        ));
        let a = one_shot(&[21, 3, 3, 0, 2, 2, 40]);
        assert!(matches!(
            probe(a, Scheme::Https, "x", t),
            ProbeResult::Answered(_)
        ));
        let a = one_shot(b"SSH-2.0-OpenSSH\r\n");
        assert!(matches!(
            probe(a, Scheme::Http, "x", t),
            ProbeResult::Failed(_)
        ));
        let a = one_shot(b"HTTP/1.1 400 Bad Request\r\n");
        assert!(matches!(
            probe(a, Scheme::Https, "x", t),
            ProbeResult::Failed(_)
        ));
        // Nothing listening.
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let a = l.local_addr().unwrap();
        drop(l);
        assert!(matches!(
            probe(a, Scheme::Http, "x", t),
            ProbeResult::Failed(_)
        ));
    }

    #[test]
    fn client_hello_lengths_are_consistent() {
        let h = client_hello("vxcmserver.lab.example");
        assert_eq!(h[0], 22);
        assert_eq!(u16::from_be_bytes([h[3], h[4]]) as usize, h.len() - 5);
        assert_eq!(h[5], 1);
        let hs_len = u32::from_be_bytes([0, h[6], h[7], h[8]]) as usize;
        assert_eq!(hs_len, h.len() - 9);
        assert!(h.windows(22).any(|w| w == b"vxcmserver.lab.example"));
        assert!(!client_hello("10.0.0.1")
            .windows(8)
            .any(|w| w == b"10.0.0.1"));
    }
}
