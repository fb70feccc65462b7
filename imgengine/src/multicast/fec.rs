//! Forward error correction per object (a chunk record, or the image's head or tail) with
//! RaptorQ (RFC 6330, the `raptorq` crate). An object is cut into source blocks of at most
//! [`MAX_BLOCK_SYMBOLS`] symbols of [`SYMBOL_SIZE`] bytes; each block is sent as its
//! source symbols and then as many repair symbols as the receivers ask for. Any K distinct
//! symbols of a K-symbol block decode it with high probability (K+2: almost surely), so one
//! repair symbol repairs a different loss at every receiver.
//!
//! The decoder is fed network bytes: only symbols of exactly [`SYMBOL_SIZE`] bytes reach
//! it, a block takes at most K + [`EXTRA_SYMBOLS`] symbols, and a panic inside the crate
//! is caught and turned into "block lost, fetch it again". What a decoder returns is never
//! trusted either: the receiver checks each chunk record's CRC32 (and deploy its
//! SHA-256) before a byte of it is written.

use std::collections::HashSet;
use std::panic::{catch_unwind, AssertUnwindSafe};

use raptorq::{
    EncodingPacket, ObjectTransmissionInformation, PayloadId, SourceBlockDecoder,
    SourceBlockEncoder, SourceBlockEncodingPlan,
};

/// The precomputed encoding of one block size K (the expensive part of encoding; every
/// full block of every object shares the plan of K = [`MAX_BLOCK_SYMBOLS`]).
pub struct Plan {
    k: u32,
    plan: SourceBlockEncodingPlan,
}

impl Plan {
    pub fn new(k: u32) -> Plan {
        Plan {
            k,
            plan: SourceBlockEncodingPlan::generate(k as u16),
        }
    }
    pub fn k(&self) -> u32 {
        self.k
    }
}

use super::packet::MAX_ESI;
pub use super::packet::SYMBOL_SIZE;

/// Symbols per source block: 512 symbols are 737 KB; a 4 MiB chunk is 6 blocks.
/// Decoding a block after 2 % loss, measured with raptorq 2.0.1 (`fec::timing`, release):
/// K = 64 0.54 ms, 128 0.86-1.1 ms, 256 1.7 ms, 512 3.6-3.8 ms: per byte about the same
/// from 128 up. Larger blocks make NACK repairs cheaper: a block's repairs are its worst
/// receiver's losses in it, and the worst of 8 receivers at 2 % loss loses 5.0 symbols of
/// 128 (3.9 %), 8.5 of 256 (3.3 %) and 14.9 of 512 (2.9 %). Measured with the bench (8
/// receivers, 2 % loss), UDP payload over the image: 1.063-1.067 with K = 128, 1.058-1.060
/// with 256, 1.052-1.056 with 512.
pub const MAX_BLOCK_SYMBOLS: u64 = 512;
/// Bytes of one full block.
pub const BLOCK_BYTES: u64 = MAX_BLOCK_SYMBOLS * SYMBOL_SIZE as u64;
/// Largest object a session carries: 47 MB (32,640 symbols; 64 blocks, where the block
/// number, one byte, would allow 255): enough for chunks of up to 32 MiB stored
/// uncompressed and for the head of an image with a 1 MiB description and a
/// half-million-chunk manifest, and no more, since a receiver holds a whole object.
pub const MAX_OBJECT: u64 = 32_640 * SYMBOL_SIZE as u64;
const _: () = assert!(MAX_OBJECT.div_ceil(BLOCK_BYTES) <= 255);
/// Symbols beyond K a decoder keeps before it stops listening to a block.
pub const EXTRA_SYMBOLS: u32 = 64;

/// Number of source blocks of an object of `len` bytes (at least 1).
pub fn block_count(len: u64) -> u32 {
    len.div_ceil(BLOCK_BYTES).max(1) as u32
}

/// Byte range `(offset, len)` of block `b` of an object of `len` bytes.
pub fn block_range(len: u64, b: u32) -> (u64, u64) {
    let off = u64::from(b) * BLOCK_BYTES;
    (off, len.saturating_sub(off).min(BLOCK_BYTES))
}

/// Source symbols (K) of a block of `len` bytes.
pub fn source_symbols(len: u64) -> u32 {
    len.div_ceil(SYMBOL_SIZE as u64).max(1) as u32
}

fn oti(len: u64) -> ObjectTransmissionInformation {
    ObjectTransmissionInformation::new(len.max(1), SYMBOL_SIZE as u16, 1, 1, 8)
}

/// The encoder of one block.
pub struct BlockEncoder {
    enc: SourceBlockEncoder,
    k: u32,
}

impl BlockEncoder {
    /// `data`: the block's bytes (0 ..= [`BLOCK_BYTES`]); `plan` must be for its K.
    pub fn with_plan(block: u8, data: &[u8], plan: &Plan) -> BlockEncoder {
        let k = source_symbols(data.len() as u64);
        assert_eq!(k, plan.k, "encoding plan for another block size");
        let mut padded = data.to_vec();
        padded.resize(k as usize * SYMBOL_SIZE, 0);
        BlockEncoder {
            enc: SourceBlockEncoder::with_encoding_plan(
                block,
                &oti(padded.len() as u64),
                &padded,
                &plan.plan,
            ),
            k,
        }
    }

    /// `data`: the block's bytes (0 ..= [`BLOCK_BYTES`]).
    pub fn new(block: u8, data: &[u8]) -> BlockEncoder {
        // Whole symbols only (an empty object is one zero symbol); the receiver cuts the
        // decoded block to its length.
        let k = source_symbols(data.len() as u64);
        let mut padded = data.to_vec();
        padded.resize(k as usize * SYMBOL_SIZE, 0);
        BlockEncoder {
            enc: SourceBlockEncoder::new(block, &oti(padded.len() as u64), &padded),
            k,
        }
    }

    pub fn k(&self) -> u32 {
        self.k
    }

    /// Source symbols `0..K` (cheaper than one [`Self::symbol`] call each).
    pub fn source(&self) -> Vec<Vec<u8>> {
        self.enc
            .source_packets()
            .iter()
            .map(|p| pad(p.data()))
            .collect()
    }

    /// `count` repair symbols starting at symbol id `first` (>= K).
    pub fn repair(&self, first: u32, count: u32) -> Vec<(u32, Vec<u8>)> {
        let start = first.max(self.k);
        let count = count.min(MAX_ESI.saturating_sub(start));
        self.enc
            .repair_packets(start - self.k, count)
            .iter()
            .zip(start..)
            .map(|(p, esi)| (esi, pad(p.data())))
            .collect()
    }
}

fn pad(d: &[u8]) -> Vec<u8> {
    let mut v = d.to_vec();
    v.resize(SYMBOL_SIZE, 0);
    v
}

/// The decoder of one block: collects distinct symbols and decodes once it has K.
///
/// Source symbols are copied straight into the block's buffer (a reused one, see
/// `io::pool`): a block whose K source symbols all came — every block on a clean link — is
/// complete without the RaptorQ decoder, which is built only when a repair symbol is needed,
/// and then fed everything held so far.
pub struct BlockDecoder {
    dec: Option<SourceBlockDecoder>,
    block: u8,
    len: u64,
    k: u32,
    seen: HashSet<u32>,
    /// The source symbols received, in place (K x SYMBOL_SIZE bytes once the first came).
    src: Vec<u8>,
    src_count: u32,
    /// Repair symbols held until the decoder is needed.
    repairs: Vec<(u32, Vec<u8>)>,
    result: Option<Vec<u8>>,
    /// Decoded (whether or not the result was taken): later symbols are ignored.
    finished: bool,
    /// The crate panicked or returned the wrong length: this block must be fetched anew.
    pub faulted: bool,
}

impl BlockDecoder {
    /// Block `block` of `len` bytes (1 ..= [`BLOCK_BYTES`]; 0 is decoded as 1 and cut).
    pub fn new(block: u8, len: u64) -> BlockDecoder {
        BlockDecoder {
            dec: None,
            block,
            len,
            k: source_symbols(len),
            seen: HashSet::new(),
            src: Vec::new(),
            src_count: 0,
            repairs: Vec::new(),
            result: None,
            finished: false,
            faulted: false,
        }
    }

    pub fn k(&self) -> u32 {
        self.k
    }

    /// Distinct symbols received.
    pub fn received(&self) -> u32 {
        self.seen.len() as u32
    }

    /// Symbols still needed before a decode can succeed (0 once decoded): K less those
    /// received (K distinct symbols decode a block about 99 % of the time, so no margin is
    /// asked for in advance; the NACK answers the whole room and every symbol of margin
    /// would go to every block). After K symbols that did not decode, two more are asked for.
    pub fn missing(&self) -> u32 {
        if self.finished {
            0
        } else if self.received() < self.k {
            self.k - self.received()
        } else {
            2
        }
    }

    pub fn is_done(&self) -> bool {
        self.finished
    }

    /// Feed one symbol; `true` when this symbol completed the block.
    pub fn add(&mut self, esi: u32, symbol: &[u8]) -> bool {
        if self.finished
            || self.faulted
            || symbol.len() != SYMBOL_SIZE
            || esi > MAX_ESI
            || self.seen.len() as u32 >= self.k + EXTRA_SYMBOLS
            || !self.seen.insert(esi)
        {
            return false;
        }
        if esi < self.k {
            if self.src.is_empty() {
                let n = self.k as usize * SYMBOL_SIZE;
                self.src = crate::io::pool::take(n);
                self.src.resize(n, 0);
            }
            let at = esi as usize * SYMBOL_SIZE;
            self.src[at..at + SYMBOL_SIZE].copy_from_slice(symbol);
            self.src_count += 1;
            if self.src_count == self.k {
                // Every source symbol: the block is its source symbols (RaptorQ is
                // systematic), whatever repairs came too.
                let mut data = std::mem::take(&mut self.src);
                data.truncate(self.len as usize);
                self.finish(data);
                return true;
            }
        } else if self.dec.is_none() {
            self.repairs.push((esi, symbol.to_vec()));
        }
        if self.dec.is_some() {
            let pkt = EncodingPacket::new(PayloadId::new(self.block, esi), symbol.to_vec());
            return self.feed(vec![pkt]);
        }
        if self.received() < self.k {
            return false;
        }
        // K symbols, some of them repairs: decode, with everything held so far.
        let l = u64::from(self.k) * SYMBOL_SIZE as u64;
        self.dec = Some(SourceBlockDecoder::new(self.block, &oti(l), l));
        let mut pkts: Vec<EncodingPacket> = self
            .seen
            .iter()
            .filter(|&&e| e < self.k)
            .map(|&e| {
                let at = e as usize * SYMBOL_SIZE;
                EncodingPacket::new(
                    PayloadId::new(self.block, e),
                    self.src[at..at + SYMBOL_SIZE].to_vec(),
                )
            })
            .collect();
        pkts.extend(
            std::mem::take(&mut self.repairs)
                .into_iter()
                .map(|(e, s)| EncodingPacket::new(PayloadId::new(self.block, e), s)),
        );
        self.feed(pkts)
    }

    /// Feed the decoder; `true` when the block decoded. A panic inside the crate, or a
    /// block of the wrong length, marks the block faulted.
    fn feed(&mut self, pkts: Vec<EncodingPacket>) -> bool {
        let Some(dec) = self.dec.as_mut() else {
            return false;
        };
        match catch_unwind(AssertUnwindSafe(|| dec.decode(pkts))) {
            Ok(Some(mut data)) => {
                if (data.len() as u64) < self.len {
                    self.fault();
                    return false;
                }
                data.truncate(self.len as usize);
                self.finish(data);
                true
            }
            Ok(None) => false,
            Err(_) => {
                self.fault();
                false
            }
        }
    }

    fn finish(&mut self, data: Vec<u8>) {
        self.result = Some(data);
        self.finished = true;
        self.dec = None;
        self.repairs = Vec::new();
        crate::io::pool::give(std::mem::take(&mut self.src));
    }

    fn fault(&mut self) {
        self.faulted = true;
        self.dec = None;
        self.repairs = Vec::new();
        crate::io::pool::give(std::mem::take(&mut self.src));
    }

    pub fn take(&mut self) -> Option<Vec<u8>> {
        self.result.take()
    }
}

/// Fuzz entry point: a decoder fed hostile symbols and ids must not panic (panics inside
/// the crate are caught) and must only ever return a block of the declared length.
pub fn fuzz_decode(data: &[u8]) {
    let Some((&[a, b, c], rest)) = data.split_first_chunk::<3>() else {
        return;
    };
    let len = 1 + (u64::from(u16::from_be_bytes([a, b])) % (8 * SYMBOL_SIZE as u64));
    let mut d = BlockDecoder::new(c, len);
    for piece in rest.chunks(3) {
        let esi = piece.iter().fold(0u32, |x, &y| (x << 8) | u32::from(y));
        let fill = piece.first().copied().unwrap_or(0);
        if d.add(esi, &vec![fill; SYMBOL_SIZE]) {
            let out = d.take().expect("decoded block");
            assert_eq!(out.len() as u64, len);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize) -> Vec<u8> {
        let mut x = 0x1234_5678u32;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect()
    }

    #[test]
    fn blocks_cover_objects() {
        assert_eq!(block_count(0), 1);
        assert_eq!(block_count(BLOCK_BYTES), 1);
        assert_eq!(block_count(BLOCK_BYTES + 1), 2);
        let len = 3 * BLOCK_BYTES + 17;
        let total: u64 = (0..block_count(len)).map(|b| block_range(len, b).1).sum();
        assert_eq!(total, len);
        assert_eq!(block_range(len, 3), (3 * BLOCK_BYTES, 17));
    }

    /// Two receivers lose different 10% of the source symbols; the same repair symbols
    /// (as many as the worse one lost) complete both.
    #[test]
    fn round_trip_with_different_losses_and_shared_repair() {
        let d = data(300_000);
        let enc = BlockEncoder::new(0, &d);
        let k = enc.k();
        let src = enc.source();
        let mut r1 = BlockDecoder::new(0, d.len() as u64);
        let mut r2 = BlockDecoder::new(0, d.len() as u64);
        for (i, s) in src.iter().enumerate() {
            if i % 10 != 3 {
                r1.add(i as u32, s);
            }
            if i % 10 != 7 && i % 13 != 0 {
                r2.add(i as u32, s);
            }
        }
        assert!(!r1.is_done() && !r2.is_done());
        let want = r1.missing().max(r2.missing());
        assert!(want > k / 10, "{want} of {k}");
        for (esi, s) in enc.repair(k, want) {
            r1.add(esi, &s);
            r2.add(esi, &s);
        }
        assert_eq!(r1.take().unwrap(), d);
        assert_eq!(r2.take().unwrap(), d);
    }

    /// A block whose source symbols all come is complete without building the RaptorQ
    /// decoder (repair symbols that came first are held, not decoded); with one source
    /// symbol missing, the first repair symbol builds it and the block decodes.
    #[test]
    fn source_symbols_alone_need_no_decoder_and_a_repair_builds_it() {
        let d = data(150_000);
        let enc = BlockEncoder::new(3, &d);
        let k = enc.k();
        let src = enc.source();
        let repairs = enc.repair(k, 4);
        let mut r = BlockDecoder::new(3, d.len() as u64);
        for (i, s) in src.iter().enumerate().rev() {
            assert!(r.dec.is_none(), "decoder built at symbol {i}");
            assert_eq!(r.add(i as u32, s), i == 0);
        }
        assert!(r.dec.is_none());
        assert_eq!(r.take().unwrap(), d);
        // Symbols after the block is complete (and taken) are ignored: a repair symbol
        // then once made the decoder read source symbols from a buffer already handed on
        // (found by the fuzz target).
        assert!(!r.add(repairs[1].0, &repairs[1].1));
        assert!(r.dec.is_none() && r.take().is_none());
        // A repair symbol first is held: no decoder until K symbols are in, then one
        // decode of the K - 1 source symbols and the repair.
        let mut r = BlockDecoder::new(3, d.len() as u64);
        assert!(!r.add(repairs[0].0, &repairs[0].1));
        for (i, s) in src.iter().enumerate().rev() {
            assert!(r.dec.is_none(), "decoder built before symbol {i}");
            assert_eq!(r.repairs.len(), 1);
            if r.add(i as u32, s) {
                assert_eq!(i, 1, "decoded at source symbol {i}");
                break;
            }
        }
        assert!(r.repairs.is_empty());
        assert_eq!(r.take().unwrap(), d);

        let mut r = BlockDecoder::new(3, d.len() as u64);
        for (i, s) in src.iter().enumerate() {
            if i != 5 {
                assert!(!r.add(i as u32, s));
            }
        }
        assert!(r.dec.is_none());
        assert_eq!(r.missing(), 1);
        assert!(r.add(repairs[1].0, &repairs[1].1));
        assert_eq!(r.take().unwrap(), d);
    }

    #[test]
    fn short_and_empty_blocks() {
        for n in [0usize, 1, 100, SYMBOL_SIZE, SYMBOL_SIZE + 1] {
            let d = data(n);
            let enc = BlockEncoder::new(5, &d);
            let mut r = BlockDecoder::new(5, n as u64);
            // Only repair symbols: decoding does not depend on the source symbols.
            for (esi, s) in enc.repair(enc.k(), enc.k() + 2) {
                r.add(esi, &s);
            }
            assert_eq!(r.take().unwrap(), d, "{n}");
        }
    }

    #[test]
    fn hostile_symbols_never_panic() {
        let mut x = 77u64;
        for i in 0..300 {
            let mut v = vec![(i % 256) as u8, (i / 3) as u8, (i % 7) as u8];
            for _ in 0..(i % 40) * 3 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                v.push(x as u8);
            }
            fuzz_decode(&v);
        }
        // Wrong-size symbols are refused before the crate sees them.
        let mut r = BlockDecoder::new(0, 10);
        assert!(!r.add(0, &[1, 2, 3]));
        assert_eq!(r.received(), 0);
    }
}
#[cfg(test)]
mod timing {
    /// `cargo test -p imgengine --lib multicast::fec::timing -- --ignored --nocapture`:
    /// encode and decode (2% loss) times of one block per K.
    #[test]
    #[ignore]
    fn time_encode_decode() {
        use super::*;
        const KS: [usize; 4] = [64, 128, 256, 512];
        let d: Vec<u8> = (0..KS[3] * SYMBOL_SIZE)
            .map(|i| (i * 7 / 3) as u8)
            .collect();
        for k in KS {
            let t = std::time::Instant::now();
            let plan = Plan::new(k as u32);
            let tp = t.elapsed();
            let t = std::time::Instant::now();
            let e = BlockEncoder::with_plan(0, &d[..k * SYMBOL_SIZE], &plan);
            let te = t.elapsed();
            let t = std::time::Instant::now();
            let mut dec = BlockDecoder::new(0, (k * SYMBOL_SIZE) as u64);
            for (i, s) in e.source().iter().enumerate() {
                if i % 50 != 7 {
                    dec.add(i as u32, s);
                }
            }
            for (esi, s) in e.repair(k as u32, (k / 20 + 2) as u32) {
                dec.add(esi, &s);
            }
            eprintln!(
                "K={k}: plan {tp:?}, encode {te:?}, decode at 2% loss {:?}, decoded {}",
                t.elapsed(),
                dec.is_done()
            );
        }
    }
}
