//! The wire format of a multicast session: one UDP datagram per packet. All integers are
//! big-endian; the byte tables are in `docs/multicast.md`.
//!
//! Control packets (announce, register, reply, status, ack, end) carry a fixed 72-byte
//! header naming the protocol, the session (SHA-256 of its lower-cased name) and the image
//! (SHA-256 of its manifest), then a body per kind. Data packets, nearly all the traffic,
//! carry a 32-byte header instead: the same magic, version and kind, a 16-bit sequence,
//! and a 16-byte *tag* that names session and image together (the first 16 bytes of
//! SHA-256 over the two 32-byte hashes, see [`data_tag`]), then object, block and symbol.
//! The 40 bytes saved go to the symbol (1440 bytes instead of 1384): the header costs
//! 2.2 % of the payload instead of 6.1 %.
//!
//! Everything here comes from the network and is hostile: [`Packet::parse`] checks every
//! length against the datagram before it reads, refuses unknown kinds, versions and
//! reserved bits, and never allocates more than the datagram's size.

use crate::error::{Error, Result};

/// First four bytes of every packet.
pub const MAGIC: [u8; 4] = *b"IMGM";
/// Protocol version; a receiver refuses any other.
pub const VERSION: u8 = 4;
/// Bytes of the control packets' common header.
pub const HEADER_LEN: usize = 72;
/// Kind byte of a data packet.
pub const KIND_DATA: u8 = 2;
/// Bytes of a data packet's header: magic, version, kind, sequence u16, tag, object u32,
/// block u8 + symbol id u24.
pub const DATA_HEADER_LEN: usize = 32;
/// Bytes of the tag naming session and image in a data packet.
pub const TAG_LEN: usize = 16;
/// Bytes of one FEC symbol: a data packet is 1472 bytes, exactly what a 1500-byte
/// Ethernet MTU leaves for UDP over IPv4. A multiple of 8 (RaptorQ's alignment here).
pub const SYMBOL_SIZE: usize = 1440;
/// Largest datagram this protocol sends or accepts.
pub const MAX_PACKET: usize = DATA_HEADER_LEN + SYMBOL_SIZE;
/// At most this many needed-object ranges and block NACKs in one status packet.
pub const MAX_NEEDS: usize = 64;
pub const MAX_NACKS: usize = 64;
/// Longest device name, refusal or failure message carried (bytes, UTF-8).
pub const MAX_TEXT: usize = 200;
/// Symbol ids are 24 bits on the wire (RFC 6330's payload id).
pub const MAX_ESI: u32 = (1 << 24) - 1;

/// What the master is doing, as announced.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterState {
    /// Taking registrations.
    Waiting = 0,
    /// Sending; registrations refused unless late join is on.
    Running = 1,
}

/// `Announce`: sent to the group twice a second by the master.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    pub state: MasterState,
    /// Late devices may join the running session.
    pub latejoin: bool,
    /// Chunk count of the image (objects are head, chunks, tail).
    pub chunks: u32,
    pub image_len: u64,
    /// Bytes before the first chunk record (object 0).
    pub head_len: u64,
    /// Bytes after the last chunk record (the last object; 0 for a sealed image).
    pub tail_len: u64,
}

/// A client's state in its status reports.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClientState {
    /// Registered, receiving (or waiting for the image's head).
    Receiving = 0,
    /// Every chunk it needed verified and written.
    Done = 1,
    /// Gave up; the message says why.
    Failed = 2,
}

/// One block a client could not decode and how many more symbols it needs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Nack {
    pub object: u32,
    pub block: u8,
    pub missing: u16,
    /// One past the highest symbol id of the block the client has received (0: none; at
    /// most [`MAX_ESI`]): whether `missing` was counted before or after the master's
    /// latest repairs of the block arrived.
    pub seen: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Status {
    pub client: u64,
    pub state: ClientState,
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Data packets lost since the previous status, per mille.
    pub loss_permille: u16,
    /// The data sequence number the loss figure was measured from (its first packet): the
    /// master judges a rate cut only on loss measured from packets it sent after the cut.
    pub loss_from: u16,
    /// The first object this client could not keep now (its window's end; 0 while it
    /// does not know the image's objects yet). The master holds back objects past the
    /// window of the clients that keep pace, so they are not sent for nothing.
    pub window_end: u32,
    /// Objects still needed, as half-open ranges `[from, to)`, ascending.
    pub needs: Vec<(u32, u32)>,
    pub nacks: Vec<Nack>,
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReplyCode {
    Accepted = 0,
    /// The session already started: wait for the next one.
    Started = 1,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Body {
    Announce(Announce),
    /// A client asks to join; `client` is stable across its restarts.
    Register {
        client: u64,
        name: String,
    },
    Reply {
        client: u64,
        code: ReplyCode,
        message: String,
    },
    Status(Status),
    /// The master saw a client's final status.
    Ack {
        client: u64,
    },
    /// The session is over (`aborted`: before every client finished).
    End {
        aborted: bool,
    },
    /// The master has sent everything asked for so far: a block a client still lacks
    /// symbols of will get none unless it asks, so it asks at once.
    Idle,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Packet {
    /// SHA-256 of the lower-cased session name.
    pub session: [u8; 32],
    /// SHA-256 of the image's manifest (zero before a client knows it).
    pub digest: [u8; 32],
    pub body: Body,
}

impl Body {
    fn kind(&self) -> u8 {
        match self {
            Body::Announce(_) => 1,
            Body::Register { .. } => 3,
            Body::Reply { .. } => 4,
            Body::Status(_) => 5,
            Body::Ack { .. } => 6,
            Body::End { .. } => 7,
            Body::Idle => 8,
        }
    }
}

fn put_text(out: &mut Vec<u8>, s: &str) {
    let mut end = s.len().min(MAX_TEXT);
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    out.push(end as u8);
    out.extend_from_slice(&s.as_bytes()[..end]);
}

impl Packet {
    pub fn encode(&self) -> Vec<u8> {
        let mut o = Vec::with_capacity(MAX_PACKET);
        o.extend_from_slice(&MAGIC);
        o.push(VERSION);
        o.push(self.body.kind());
        o.extend_from_slice(&[0, 0]);
        o.extend_from_slice(&self.session);
        o.extend_from_slice(&self.digest);
        match &self.body {
            Body::Announce(a) => {
                o.push(a.state as u8);
                o.push(u8::from(a.latejoin));
                o.extend_from_slice(&a.chunks.to_be_bytes());
                o.extend_from_slice(&a.image_len.to_be_bytes());
                o.extend_from_slice(&a.head_len.to_be_bytes());
                o.extend_from_slice(&a.tail_len.to_be_bytes());
            }
            Body::Register { client, name } => {
                o.extend_from_slice(&client.to_be_bytes());
                put_text(&mut o, name);
            }
            Body::Reply {
                client,
                code,
                message,
            } => {
                o.extend_from_slice(&client.to_be_bytes());
                o.push(*code as u8);
                put_text(&mut o, message);
            }
            Body::Status(s) => {
                o.extend_from_slice(&s.client.to_be_bytes());
                o.push(s.state as u8);
                o.extend_from_slice(&s.bytes_done.to_be_bytes());
                o.extend_from_slice(&s.bytes_total.to_be_bytes());
                o.extend_from_slice(&s.loss_permille.to_be_bytes());
                o.extend_from_slice(&s.loss_from.to_be_bytes());
                o.extend_from_slice(&s.window_end.to_be_bytes());
                let needs = &s.needs[..s.needs.len().min(MAX_NEEDS)];
                let nacks = &s.nacks[..s.nacks.len().min(MAX_NACKS)];
                o.push(needs.len() as u8);
                o.push(nacks.len() as u8);
                for (a, b) in needs {
                    o.extend_from_slice(&a.to_be_bytes());
                    o.extend_from_slice(&b.to_be_bytes());
                }
                for n in nacks {
                    o.extend_from_slice(&n.object.to_be_bytes());
                    o.push(n.block);
                    o.extend_from_slice(&n.missing.to_be_bytes());
                    o.extend_from_slice(&n.seen.min(MAX_ESI).to_be_bytes()[1..]);
                }
                put_text(&mut o, &s.message);
            }
            Body::Ack { client } => o.extend_from_slice(&client.to_be_bytes()),
            Body::End { aborted } => o.push(u8::from(*aborted)),
            Body::Idle => {}
        }
        o
    }

    /// Parse one datagram. Any inconsistency is an error naming what is wrong; the caller
    /// drops the packet.
    pub fn parse(b: &[u8]) -> Result<Packet> {
        if b.len() > MAX_PACKET {
            return Err(Error::corrupt(format!(
                "multicast packet of {} bytes, over {MAX_PACKET}",
                b.len()
            )));
        }
        let mut c = Cursor { b, at: 0 };
        if c.take(4)? != MAGIC {
            return Err(Error::corrupt("multicast packet: bad magic"));
        }
        let version = c.u8()?;
        if version != VERSION {
            return Err(Error::corrupt(format!(
                "multicast packet version {version}: this img speaks {VERSION}; use the same img on every device"
            )));
        }
        let kind = c.u8()?;
        if c.take(2)? != [0, 0] {
            return Err(Error::corrupt("multicast packet: reserved bits set"));
        }
        let session: [u8; 32] = c.array()?;
        let digest: [u8; 32] = c.array()?;
        let body = match kind {
            1 => {
                let state = match c.u8()? {
                    0 => MasterState::Waiting,
                    1 => MasterState::Running,
                    s => return Err(Error::corrupt(format!("announce: unknown state {s}"))),
                };
                let latejoin = c.flag()?;
                let a = Announce {
                    state,
                    latejoin,
                    chunks: c.u32()?,
                    image_len: c.u64()?,
                    head_len: c.u64()?,
                    tail_len: c.u64()?,
                };
                if a.head_len
                    .checked_add(a.tail_len)
                    .is_none_or(|s| s > a.image_len)
                {
                    return Err(Error::corrupt(
                        "announce: head and tail longer than the image",
                    ));
                }
                Body::Announce(a)
            }
            KIND_DATA => {
                return Err(Error::corrupt(
                    "multicast packet: a data packet where a control packet was expected",
                ))
            }
            3 => Body::Register {
                client: c.u64()?,
                name: c.text()?,
            },
            4 => {
                let client = c.u64()?;
                let code = match c.u8()? {
                    0 => ReplyCode::Accepted,
                    1 => ReplyCode::Started,
                    x => return Err(Error::corrupt(format!("reply: unknown code {x}"))),
                };
                Body::Reply {
                    client,
                    code,
                    message: c.text()?,
                }
            }
            5 => {
                let client = c.u64()?;
                let state = match c.u8()? {
                    0 => ClientState::Receiving,
                    1 => ClientState::Done,
                    2 => ClientState::Failed,
                    x => return Err(Error::corrupt(format!("status: unknown state {x}"))),
                };
                let bytes_done = c.u64()?;
                let bytes_total = c.u64()?;
                let loss_permille = c.u16()?;
                if loss_permille > 1000 {
                    return Err(Error::corrupt("status: loss over 1000 per mille"));
                }
                let loss_from = c.u16()?;
                let window_end = c.u32()?;
                let n_needs = c.u8()? as usize;
                let n_nacks = c.u8()? as usize;
                if n_needs > MAX_NEEDS || n_nacks > MAX_NACKS {
                    return Err(Error::corrupt("status: too many ranges or NACKs"));
                }
                let mut needs = Vec::with_capacity(n_needs);
                for _ in 0..n_needs {
                    let (a, z) = (c.u32()?, c.u32()?);
                    if a >= z {
                        return Err(Error::corrupt("status: empty or reversed object range"));
                    }
                    needs.push((a, z));
                }
                let mut nacks = Vec::with_capacity(n_nacks);
                for _ in 0..n_nacks {
                    nacks.push(Nack {
                        object: c.u32()?,
                        block: c.u8()?,
                        missing: c.u16()?,
                        seen: u32::from_be_bytes([0, c.u8()?, c.u8()?, c.u8()?]),
                    });
                }
                Body::Status(Status {
                    client,
                    state,
                    bytes_done,
                    bytes_total,
                    loss_permille,
                    loss_from,
                    window_end,
                    needs,
                    nacks,
                    message: c.text()?,
                })
            }
            6 => Body::Ack { client: c.u64()? },
            7 => Body::End { aborted: c.flag()? },
            8 => Body::Idle,
            k => {
                return Err(Error::corrupt(format!(
                    "multicast packet: unknown kind {k}"
                )))
            }
        };
        if c.at != b.len() {
            return Err(Error::corrupt(format!(
                "multicast packet: {} bytes after its body",
                b.len() - c.at
            )));
        }
        Ok(Packet {
            session,
            digest,
            body,
        })
    }
}

struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let s = self
            .at
            .checked_add(n)
            .and_then(|end| self.b.get(self.at..end))
            .ok_or_else(|| {
                Error::corrupt(format!(
                    "multicast packet truncated: {} bytes, needed {} more at byte {}",
                    self.b.len(),
                    n,
                    self.at
                ))
            })?;
        self.at += n;
        Ok(s)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn u8(&mut self) -> Result<u8> {
        Ok(self.take(1)?[0])
    }
    fn flag(&mut self) -> Result<bool> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            x => Err(Error::corrupt(format!("multicast packet: flag byte {x}"))),
        }
    }
    fn u16(&mut self) -> Result<u16> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn text(&mut self) -> Result<String> {
        let n = self.u8()? as usize;
        if n > MAX_TEXT {
            return Err(Error::corrupt("multicast packet: text too long"));
        }
        let s = self.take(n)?;
        String::from_utf8(s.to_vec())
            .map_err(|_| Error::corrupt("multicast packet: text is not UTF-8"))
    }
}

/// The tag a data packet carries: the first [`TAG_LEN`] bytes of
/// SHA-256(session hash ‖ manifest digest). A receiver compares it with the tag it computed
/// from the session it joined and the digest it checked the manifest against, so data of
/// another session or another image (2^-128 chance of a collision) is never taken.
pub fn data_tag(session: &[u8; 32], digest: &[u8; 32]) -> [u8; TAG_LEN] {
    use sha2::{Digest, Sha256};
    let h = Sha256::new()
        .chain_update(session)
        .chain_update(digest)
        .finalize();
    let mut t = [0u8; TAG_LEN];
    t.copy_from_slice(&h[..TAG_LEN]);
    t
}

/// One FEC symbol of block `block` of object `object`, borrowed from the datagram it came
/// in (no copy on the receive path).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    pub tag: [u8; TAG_LEN],
    /// Counts data packets (wrapping): the receivers' loss figure.
    pub seq: u16,
    pub object: u32,
    pub block: u8,
    pub esi: u32,
    pub symbol: &'a [u8],
}

/// Is this datagram a data packet (magic, version and kind; the rest is for [`Data::parse`])?
pub fn is_data(b: &[u8]) -> bool {
    b.len() >= 6 && b[..4] == MAGIC && b[4] == VERSION && b[5] == KIND_DATA
}

impl<'a> Data<'a> {
    /// Encode into `out` (cleared first): exactly [`MAX_PACKET`] bytes.
    pub fn encode_into(&self, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&MAGIC);
        out.push(VERSION);
        out.push(KIND_DATA);
        out.extend_from_slice(&self.seq.to_be_bytes());
        out.extend_from_slice(&self.tag);
        out.extend_from_slice(&self.object.to_be_bytes());
        out.extend_from_slice(
            &((u32::from(self.block) << 24) | (self.esi & MAX_ESI)).to_be_bytes(),
        );
        out.extend_from_slice(self.symbol);
    }

    pub fn encode(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(MAX_PACKET);
        self.encode_into(&mut v);
        v
    }

    /// Parse one data packet: exactly [`MAX_PACKET`] bytes, our magic, version and kind.
    pub fn parse(b: &'a [u8]) -> Result<Data<'a>> {
        if b.len() != MAX_PACKET {
            return Err(Error::corrupt(format!(
                "multicast data packet of {} bytes, not {MAX_PACKET}",
                b.len()
            )));
        }
        if b[..4] != MAGIC {
            return Err(Error::corrupt("multicast packet: bad magic"));
        }
        if b[4] != VERSION {
            return Err(Error::corrupt(format!(
                "multicast packet version {}: this img speaks {VERSION}; use the same img on every device",
                b[4]
            )));
        }
        if b[5] != KIND_DATA {
            return Err(Error::corrupt("multicast packet: not a data packet"));
        }
        let mut tag = [0u8; TAG_LEN];
        tag.copy_from_slice(&b[8..8 + TAG_LEN]);
        let u32at = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let id = u32at(28);
        Ok(Data {
            tag,
            seq: u16::from_be_bytes([b[6], b[7]]),
            object: u32at(24),
            block: (id >> 24) as u8,
            esi: id & MAX_ESI,
            symbol: &b[DATA_HEADER_LEN..],
        })
    }
}

/// Fuzz entry point: parse arbitrary bytes as a control and as a data packet; a packet
/// that parses must encode back to the same bytes. Must never panic.
pub fn fuzz_parse(data: &[u8]) {
    if let Ok(p) = Packet::parse(data) {
        assert_eq!(p.encode(), data, "a parsed packet re-encodes to its bytes");
    }
    if let Ok(d) = Data::parse(data) {
        assert_eq!(
            d.encode(),
            data,
            "a parsed data packet re-encodes to its bytes"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples() -> Vec<Packet> {
        let p = |body| Packet {
            session: [7; 32],
            digest: [9; 32],
            body,
        };
        vec![
            p(Body::Announce(Announce {
                state: MasterState::Running,
                latejoin: true,
                chunks: 12,
                image_len: 1 << 30,
                head_len: 2000,
                tail_len: 1000,
            })),
            p(Body::Register {
                client: 42,
                name: "pc-07 (10.0.0.7)".into(),
            }),
            p(Body::Reply {
                client: 42,
                code: ReplyCode::Started,
                message: "already started".into(),
            }),
            p(Body::Status(Status {
                client: 42,
                state: ClientState::Failed,
                bytes_done: 5,
                bytes_total: 10,
                loss_permille: 20,
                loss_from: 65_000,
                window_end: 17,
                needs: vec![(0, 1), (5, 9)],
                nacks: vec![Nack {
                    object: 5,
                    block: 1,
                    missing: 3,
                    seen: 70_000,
                }],
                message: "disk too small".into(),
            })),
            p(Body::Ack { client: 42 }),
            p(Body::End { aborted: true }),
            p(Body::Idle),
        ]
    }

    #[test]
    fn the_largest_status_fits_one_datagram() {
        let full = Packet {
            session: [1; 32],
            digest: [2; 32],
            body: Body::Status(Status {
                client: u64::MAX,
                state: ClientState::Receiving,
                bytes_done: u64::MAX,
                bytes_total: u64::MAX,
                loss_permille: 1000,
                loss_from: u16::MAX,
                window_end: u32::MAX,
                needs: (0..MAX_NEEDS as u32).map(|i| (2 * i, 2 * i + 1)).collect(),
                nacks: (0..MAX_NACKS as u32)
                    .map(|i| Nack {
                        object: i,
                        block: 255,
                        missing: u16::MAX,
                        seen: MAX_ESI,
                    })
                    .collect(),
                message: "x".repeat(MAX_TEXT),
            }),
        };
        let b = full.encode();
        assert!(b.len() <= MAX_PACKET, "{} bytes", b.len());
        assert_eq!(Packet::parse(&b).unwrap(), full);
    }

    #[test]
    fn every_kind_round_trips() {
        for p in samples() {
            let b = p.encode();
            assert!(b.len() <= MAX_PACKET, "{}", b.len());
            assert_eq!(Packet::parse(&b).unwrap(), p);
        }
        // The data packet fills the budget exactly as documented.
        let sym: Vec<u8> = (0..SYMBOL_SIZE).map(|i| i as u8).collect();
        let d = data_sample(&sym);
        let b = d.encode();
        assert_eq!(b.len(), 1472);
        assert!(is_data(&b));
        assert_eq!(Data::parse(&b).unwrap(), d);
        // A data packet is not a control packet, and the other way round.
        assert!(Packet::parse(&b).is_err());
        for p in samples() {
            assert!(!is_data(&p.encode()));
            assert!(Data::parse(&p.encode()).is_err());
        }
    }

    fn data_sample(sym: &[u8]) -> Data<'_> {
        Data {
            tag: data_tag(&[7; 32], &[9; 32]),
            seq: 99,
            object: 3,
            block: 2,
            esi: 70000,
            symbol: sym,
        }
    }

    /// The tag depends on both the session and the image.
    #[test]
    fn the_data_tag_names_session_and_image() {
        let t = data_tag(&[7; 32], &[9; 32]);
        assert_ne!(t, data_tag(&[8; 32], &[9; 32]));
        assert_ne!(t, data_tag(&[7; 32], &[8; 32]));
        assert_ne!(t, data_tag(&[9; 32], &[7; 32]));
    }

    #[test]
    fn data_truncations_and_bad_fields_are_refused() {
        let sym = vec![5u8; SYMBOL_SIZE];
        let b = data_sample(&sym).encode();
        for cut in 0..b.len() {
            assert!(Data::parse(&b[..cut]).is_err(), "cut {cut}");
        }
        let mut long = b.clone();
        long.push(0);
        assert!(Data::parse(&long).is_err());
        let mut v1 = b.clone();
        v1[4] = 1;
        assert!(Data::parse(&v1)
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        let mut k = b.clone();
        k[5] = 1;
        assert!(Data::parse(&k).is_err());
    }

    #[test]
    fn truncations_and_extra_bytes_are_refused() {
        for p in samples() {
            let b = p.encode();
            for cut in 0..b.len() {
                assert!(Packet::parse(&b[..cut]).is_err(), "{:?} cut {cut}", p.body);
            }
            let mut long = b.clone();
            long.push(0);
            assert!(Packet::parse(&long).is_err());
        }
    }

    #[test]
    fn bad_fields_are_named() {
        let mut b = samples()[0].encode();
        b[4] = 1;
        assert!(Packet::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("version 1"));
        let mut b = samples()[0].encode();
        b[5] = 77;
        assert!(Packet::parse(&b)
            .unwrap_err()
            .to_string()
            .contains("unknown kind"));
        // A reversed need range.
        let mut s = samples()[3].clone();
        if let Body::Status(st) = &mut s.body {
            st.needs = vec![(9, 5)];
        }
        assert!(Packet::parse(&s.encode()).is_err());
        // Head and tail longer than the image.
        let mut a = samples()[0].clone();
        if let Body::Announce(an) = &mut a.body {
            an.head_len = u64::MAX;
        }
        assert!(Packet::parse(&a.encode()).is_err());
    }

    /// Deterministic random and mutated-valid datagrams through the fuzz entry point, so
    /// the plain test suite exercises the parser without cargo-fuzz.
    #[test]
    fn fuzz_entry_point_survives_random_and_mutated_input() {
        let mut x = 0x2545_f491_4f6c_dd1du64;
        let mut rnd = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let valid: Vec<Vec<u8>> = samples().iter().map(Packet::encode).collect();
        for i in 0..20_000 {
            let n = (rnd() % 1600) as usize;
            let random: Vec<u8> = (0..n).map(|_| rnd() as u8).collect();
            fuzz_parse(&random);
            let mut m = valid[i % valid.len()].clone();
            if i % 5 == 0 {
                m = data_sample(&[3u8; SYMBOL_SIZE]).encode();
            }
            for _ in 0..1 + i % 3 {
                let p = (rnd() as usize) % m.len();
                m[p] ^= 1 << (rnd() % 8);
            }
            if i % 7 == 0 {
                m.truncate((rnd() as usize) % m.len());
            }
            fuzz_parse(&m);
        }
    }
}
