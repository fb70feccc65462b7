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

/// Chunk objects a master orders among themselves at a time (image order between spans):
/// a client's window, what every client can hold at once.
pub const SPAN_BYTES: u64 = client::WINDOW_BYTES;

/// The order a master sends `objects` in (as from [`objects`]): the head and the tail, the
/// chunks that start in the image's first 4 KiB (read with the head), then the others
/// span by span ([`SPAN_BYTES`] of objects in image order), each span with its
/// work spread over its wire time. `work[i]` is what chunk `i` costs a receiver: the disk
/// bytes it decompresses, hashes and writes (0 for a zero chunk, which is never sent).
///
/// A receiver deploys each chunk as it arrives. A chunk that decodes to far more disk bytes
/// than it takes on the wire (text: 4 MiB from 60 KB) is a burst of work in a moment of
/// wire time; sent in image order, a run of such chunks at the end of an image was a pile
/// of work after the last byte, and with many receivers on few CPUs that pile was the
/// room's last tenths of a second. So inside a span the dense chunks (more work per wire
/// byte than the span's average) are placed before the others, in image order, in shares
/// proportional to the wire time of the chunk that follows each share, and the span ends
/// with a chunk that is not dense: its wire time covers the work of the share before it.
pub fn send_order(objects: &[Object], work: &[u64]) -> Vec<u32> {
    let n = objects.len() as u32;
    let mut order: Vec<u32> = vec![0];
    if n > 1 {
        order.push(n - 1);
    }
    let work_of = |o: u32| work.get(o as usize - 1).copied().unwrap_or(0);
    // The chunks that start in the image's first bytes come with the head: a deploy reads
    // the head with those bytes ([`crate::format::FIRST_BYTES`]) before anything else.
    let chunks = 1..n.saturating_sub(1);
    let first = chunks
        .clone()
        .take_while(|&o| objects[o as usize].offset < crate::format::FIRST_BYTES)
        .count() as u32;
    order.extend(1..1 + first);
    let mut span: Vec<u32> = Vec::new();
    let mut bytes = 0u64;
    for o in chunks.skip(first as usize) {
        let len = objects[o as usize].len;
        if !span.is_empty() && bytes + len > SPAN_BYTES {
            spread(&span, objects, &work_of, &mut order);
            span.clear();
            bytes = 0;
        }
        span.push(o);
        bytes += len;
    }
    spread(&span, objects, &work_of, &mut order);
    order
}

/// One span of [`send_order`], appended to `order`.
fn spread(span: &[u32], objects: &[Object], work_of: &dyn Fn(u32) -> u64, order: &mut Vec<u32>) {
    let len = |o: u32| objects[o as usize].len.max(1);
    let (total_work, total_len) = span.iter().fold((0u128, 0u128), |(w, l), &o| {
        (w + u128::from(work_of(o)), l + u128::from(len(o)))
    });
    // Dense: work / len above the span's average (compared without division).
    let dense = |o: u32| u128::from(work_of(o)) * total_len > total_work * u128::from(len(o));
    let (heavy, light): (Vec<u32>, Vec<u32>) = span
        .iter()
        .filter(|&&o| work_of(o) > 0)
        .partition(|&&o| dense(o));
    let heavy_work: u128 = heavy.iter().map(|&o| u128::from(work_of(o))).sum();
    let light_len: u128 = light.iter().map(|&o| u128::from(len(o))).sum();
    let mut heavy = heavy.into_iter().peekable();
    let (mut placed, mut wire) = (0u128, 0u128);
    for (i, &o) in light.iter().enumerate() {
        wire += u128::from(len(o));
        // The dense work due by the end of this chunk's wire time; the last share takes
        // whatever is left.
        let due = heavy_work * wire / light_len.max(1);
        while let Some(&h) = heavy.peek() {
            let w = u128::from(work_of(h));
            if i + 1 < light.len() && placed + w / 2 > due {
                break;
            }
            order.push(h);
            placed += w;
            heavy.next();
        }
        order.push(o);
    }
    // No chunk that is not dense (all alike, or all dense): image order.
    order.extend(heavy);
    // Zero chunks: never asked for (a deploy writes them without bytes).
    order.extend(span.iter().filter(|&&o| work_of(o) == 0));
}

/// Fuzz entry point for everything a receiver parses: packets and FEC symbols.
pub fn fuzz_receive(data: &[u8]) {
    packet::fuzz_parse(data);
    fec::fuzz_decode(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn objs(lens: &[u64]) -> Vec<Object> {
        let mut at = 0;
        lens.iter()
            .map(|&len| {
                let o = Object { offset: at, len };
                at += len;
                o
            })
            .collect()
    }

    #[test]
    fn send_order_spreads_the_dense_chunks_of_a_span_over_the_others() {
        const M: u64 = 1 << 20;
        const K: u64 = 60_000;
        // Head, four incompressible chunks, eight of text (60 KB -> 4 MiB each), tail:
        // the text's work goes two chunks before each incompressible one, and the span
        // ends with one of those (its wire time covers the work of the two before it).
        let o = objs(&[
            4096,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            K,
            K,
            K,
            K,
            K,
            K,
            K,
            K,
            500,
        ]);
        let work = [4 * M; 12];
        assert_eq!(
            send_order(&o, &work),
            vec![0, 13, 5, 6, 1, 7, 8, 2, 9, 10, 3, 11, 12, 4]
        );
        // Shares follow the wire time of the chunk after them; a zero chunk (no work) goes
        // last; text at the end of the image still comes before the last chunk.
        let o = objs(&[4096, 4 * M, 60_000, 4 * M, 60_000, 2 * M, 30_000, 500]);
        let work = [4 * M, 4 * M, 4 * M, 0, 2 * M, 4 * M];
        assert_eq!(send_order(&o, &work), vec![0, 7, 2, 1, 6, 3, 5, 4]);
        // All alike, or all dense: image order.
        let o = objs(&[4096, 4 * M, 4 * M, 4 * M, 10]);
        assert_eq!(send_order(&o, &[4 * M; 3]), vec![0, 4, 1, 2, 3]);
        let o = objs(&[4096, K, K, 10]);
        assert_eq!(send_order(&o, &[4 * M; 2]), vec![0, 3, 1, 2]);
    }

    #[test]
    fn send_order_keeps_image_order_between_spans() {
        const M: u64 = 1 << 20;
        // Head, eight 4 MiB chunks (a span is six: 24 MiB), tail.
        let o = objs(&[
            4096,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            4 * M,
            100,
        ]);
        let work = [4 * M, 4 * M, 8 * M, 4 * M, 4 * M, 8 * M, 4 * M, 8 * M];
        assert_eq!(SPAN_BYTES, 24 * M);
        assert_eq!(send_order(&o, &work), vec![0, 9, 3, 1, 2, 6, 4, 5, 8, 7]);
        // Every object exactly once, whatever the mix.
        let mut v = send_order(&o, &[0, 8 * M, 1, 4 * M, 0, 9 * M, 2 * M, 3]);
        v.sort_unstable();
        assert_eq!(v, (0..10).collect::<Vec<u32>>());
        // The chunks that start in the first 4 KiB (a zero chunk's record, a small chunk)
        // come right after the head and tail, in image order, dense or not.
        let o = objs(&[100, 76, 3000, 4 * M, 60_000, 500]);
        assert_eq!(
            send_order(&o, &[0, 3000, 4 * M, 4 * M]),
            vec![0, 5, 1, 2, 3, 4]
        );
        // An image with no chunks, and one with no tail object beyond the head.
        assert_eq!(send_order(&objs(&[10, 0]), &[]), vec![0, 1]);
        assert_eq!(send_order(&objs(&[10]), &[]), vec![0]);
    }

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
