//! Multicast sessions (`img -session`): one master sends an image to a room of devices at
//! once, on a protocol that cannot mix sessions, images or chunks up, repairs losses with
//! a fountain code, and never lets one slow or late device hold the others back.
//!
//! The unit is the image format's own: an image is cut into *objects* — object 0 is the
//! head (every byte before the first chunk record: preamble, and for a sealed image the
//! manifest and the signature), objects 1..=N are the N chunk records in manifest order,
//! and object N+1 is the tail (a streaming image's manifest and footer; empty when sealed).
//! Each object is sent as RaptorQ symbols ([`fec`]) in packets that name the session, the
//! image's manifest digest, the object, the block and the symbol ([`packet`]).
//!
//! The master ([`master`]) runs a carousel over the objects some client still needs,
//! sends extra repair symbols for the blocks clients report short (the largest count any
//! client reported, so one repair serves all), and backs its rate off when many report
//! loss. A client ([`client`]) collects objects into a bounded window and hands them, in
//! image order, to the unchanged unicast deploy through a loopback HTTP range source: the
//! image is verified (CRC32, SHA-256, the signature when the device trusts keys) and
//! written exactly as `img -restore` does it, tables last, resumable by its journal.

pub mod chunks;
pub mod client;
pub mod fallback;
pub mod fec;
pub mod master;
pub mod net;
pub mod onthefly;
pub mod packet;

use std::net::Ipv4Addr;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// UDP port of every session (the group address tells sessions apart): the master's packets
/// go to the group on this port.
pub const PORT: u16 = 9730;

/// The port on the group that clients send their registrations and statuses to, and only
/// the master listens on: the data port plus one (minus one for 65535). Control goes by
/// multicast both ways, so no device needs an ARP exchange with another: on a lossy link a
/// lost ARP request or reply costs the kernel's 1 s retry, which once held one device of
/// eight back by a whole second; and devices whose addresses are in different subnets on
/// one segment still reach each other.
pub fn control_port(data: u16) -> u16 {
    if data == u16::MAX {
        data - 1
    } else {
        data + 1
    }
}
/// Longest session name (bytes).
pub const MAX_NAME: usize = 64;

/// Check a session name: 1..=64 bytes, no control characters or spaces.
/// `IMG_SESSION_DEBUG` is set: master and clients print their timelines to stderr.
fn debug() -> bool {
    // Read once: traces are made per status, NACK and repair.
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ON.get_or_init(|| std::env::var_os("IMG_SESSION_DEBUG").is_some())
}

/// One timeline line (with `IMG_SESSION_DEBUG`), stamped with the wall clock's seconds
/// within the minute, so the lines of a master and its clients can be read side by side.
pub(crate) fn trace(what: std::fmt::Arguments<'_>) {
    if debug() {
        let t = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!("[{:06.3}] {what}", (t.as_millis() % 60_000) as f64 / 1000.0);
    }
}

pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > MAX_NAME
        || name.chars().any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(Error::invalid(format!(
            "session name `{name}`: use 1 to {MAX_NAME} characters without spaces"
        )));
    }
    Ok(())
}

/// SHA-256 of the lower-cased name: carried whole in every packet.
pub fn name_hash(name: &str) -> [u8; 32] {
    Sha256::digest(name.to_lowercase().as_bytes()).into()
}

/// The session's group address: 231 followed by the first three bytes of the name hash;
/// when they would give 231.0.0.x or 231.128.0.x (whose Ethernet multicast MACs are those
/// of 224.0.0.x, which switches flood to every port), the next three bytes are taken, and
/// so on along the hash.
pub fn group_addr(name: &str) -> Ipv4Addr {
    let h = name_hash(name);
    for w in h.windows(3) {
        if (w[0] == 0 || w[0] == 128) && w[1] == 0 {
            continue;
        }
        return Ipv4Addr::new(231, w[0], w[1], w[2]);
    }
    // 30 windows that all start with (0|128, 0): impossible in practice; still a valid group.
    Ipv4Addr::new(231, 1, h[2], h[3])
}

/// One object of an image: a byte range of the image file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Object {
    pub offset: u64,
    pub len: u64,
}

/// The objects of an image: head, chunk records, tail. `entries` are the manifest's chunk
/// positions `(image_offset, record_len)`. Checked: contiguous, inside the image, each at
/// most [`fec::MAX_OBJECT`].
pub fn objects(
    image_len: u64,
    head_len: u64,
    tail_len: u64,
    entries: impl IntoIterator<Item = (u64, u64)>,
) -> Result<Vec<Object>> {
    let mut v = vec![Object {
        offset: 0,
        len: head_len,
    }];
    let mut at = head_len;
    for (off, len) in entries {
        if off != at || len > fec::MAX_OBJECT || len == 0 {
            return Err(Error::corrupt(format!(
                "image: chunk record at {off} of {len} bytes where {at} was expected"
            )));
        }
        v.push(Object { offset: off, len });
        at = off
            .checked_add(len)
            .ok_or_else(|| Error::corrupt("image: chunk records overflow"))?;
    }
    if at.checked_add(tail_len) != Some(image_len)
        || head_len > fec::MAX_OBJECT
        || tail_len > fec::MAX_OBJECT
    {
        return Err(Error::corrupt(format!(
            "image: head {head_len}, chunks up to {at} and tail {tail_len} do not make its {image_len} bytes"
        )));
    }
    v.push(Object {
        offset: at,
        len: tail_len,
    });
    Ok(v)
}

/// Fuzz entry point for everything a receiver parses: packets and FEC symbols.
pub fn fuzz_receive(data: &[u8]) {
    packet::fuzz_parse(data);
    fec::fuzz_decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn group_addresses_are_stable_documented_and_skip_flooded_ranges() {
        // docs/multicast.md lists these; a change here is a protocol change.
        // The examples in docs/multicast.md.
        assert_eq!(group_addr("mcast01"), Ipv4Addr::new(231, 250, 148, 242));
        assert_eq!(group_addr("room1"), Ipv4Addr::new(231, 181, 237, 194));
        assert_eq!(group_addr("mcast01"), group_addr("MCAST01"));
        let a = group_addr("mcast01");
        assert_eq!(a.octets()[0], 231);
        let h = name_hash("mcast01");
        assert_eq!(a, Ipv4Addr::new(231, h[0], h[1], h[2]));
        assert_ne!(group_addr("mcast01"), group_addr("mcast02"));
        // Every name lands in 231/8 and never in 231.0.0.x or 231.128.0.x.
        for i in 0..20_000 {
            let o = group_addr(&format!("room-{i}")).octets();
            assert_eq!(o[0], 231);
            assert!(!((o[1] == 0 || o[1] == 128) && o[2] == 0), "{o:?}");
        }
        // A name whose hash starts with (0|128, 0) moves along the hash.
        let n = (0..200_000)
            .map(|i| format!("s{i}"))
            .find(|n| {
                let h = name_hash(n);
                (h[0] == 0 || h[0] == 128) && h[1] == 0
            })
            .expect("some name among 200000 hashes to 0x00 0x00 or 0x80 0x00");
        let h = name_hash(&n);
        let o = group_addr(&n).octets();
        assert!(!((o[1] == 0 || o[1] == 128) && o[2] == 0), "{n}: {o:?}");
        if !((h[1] == 0 || h[1] == 128) && h[2] == 0) {
            assert_eq!(o, [231, h[1], h[2], h[3]], "{n}");
        }
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("mcast01").is_ok());
        assert!(check_name("").is_err());
        assert!(check_name("two words").is_err());
        assert!(check_name(&"x".repeat(65)).is_err());
    }

    #[test]
    fn objects_must_tile_the_image() {
        let o = objects(1000, 100, 50, [(100, 400), (500, 450)]).unwrap();
        assert_eq!(o.len(), 4);
        assert_eq!(
            o[3],
            Object {
                offset: 950,
                len: 50
            }
        );
        assert!(objects(1000, 100, 50, [(100, 400), (501, 449)]).is_err());
        assert!(objects(1000, 100, 50, [(100, 400)]).is_err());
        assert!(objects(1000, 100, 50, [(100, 0), (100, 850)]).is_err());
        assert!(objects(u64::MAX, 100, 0, [(100, u64::MAX)]).is_err());
    }
}
