//! The agent's persistent store on the boot-agent partition: one preallocated file of two
//! fixed-size slots, rewritten in place, that survives a power cut at any instant.
//!
//! FAT has no atomic rename, and rewriting a file through a FAT driver rewrites its
//! directory entry (a directory sector that tears can lose every entry in it). So the store
//! is a file that `img -install` creates once at its full size ([`FILE`], [`FILE_LEN`]) and
//! that is afterwards only overwritten inside its own clusters
//! ([`BootPartition::overwrite_in_place`]): the FAT and the directories are never written.
//!
//! The file holds two slots of [`SLOT_LEN`] bytes. Each slot is one record:
//!
//! ```text
//! offset  size  field
//!      0     8  magic "IMGSTORE"
//!      8     4  format version (1), little endian
//!     12     8  sequence number (one more than the record it replaces)
//!     20     4  payload length in bytes
//!     24     4  CRC32 (IEEE) of bytes 0..24 followed by the payload
//!     28     4  zero (a record with anything else there is invalid)
//!     32     …  payload: the state tree (below)
//! ```
//!
//! A write goes into the slot that does NOT hold the newest valid record, then the disk is
//! synced; a read takes the valid record with the highest sequence number. A power cut while
//! a slot is written leaves that slot with a bad CRC (whatever subset of its sectors
//! reached the disk), and the other slot still holds the previous state; a cut before or
//! after leaves one of the two complete records. So a read always gets the old or the new
//! state, never a mixture, never garbage.
//!
//! The payload is the state tree, every entry bounded and checked when read back:
//!
//! ```text
//! u32 entry count (at most MAX_ENTRIES)
//! per entry: u16 path length (1..=MAX_PATH), path (UTF-8, relative, no "..", no empty or
//!            "." components), u8 flags (bit 0: secret, materialised mode 0600), u32 data
//!            length, data
//! ```
//!
//! When the tree outgrows a slot, [`Store::save`] refuses with a message naming the biggest
//! files instead of writing a truncated record.

use std::collections::BTreeMap;

use anyhow::{bail, Context};

use crate::bootpart::BootPartition;

/// The store file on the boot-agent partition.
pub const FILE: &str = "/AGENT/STATE.DAT";
/// The directory it lives in.
pub const DIR: &str = "/AGENT";
/// One slot.
pub const SLOT_LEN: usize = 256 << 10;
/// The whole file: two slots.
pub const FILE_LEN: usize = 2 * SLOT_LEN;
/// The record header.
pub const HEADER_LEN: usize = 32;
/// The largest payload a slot holds.
pub const MAX_PAYLOAD: usize = SLOT_LEN - HEADER_LEN;
const MAGIC: &[u8; 8] = b"IMGSTORE";
const VERSION: u32 = 1;
/// Bounds of the tree format.
pub const MAX_ENTRIES: usize = 4096;
pub const MAX_PATH: usize = 255;

/// One file of the state tree.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Item {
    pub data: Vec<u8>,
    /// Readable by its owner only (the credential, private keys).
    pub secret: bool,
}

/// The state tree: relative path ("state/credential") → contents.
pub type Tree = BTreeMap<String, Item>;

/// A path the tree may hold: relative, UTF-8, no empty, "." or ".." components, bounded.
pub fn valid_path(p: &str) -> bool {
    !p.is_empty()
        && p.len() <= MAX_PATH
        && !p.starts_with('/')
        && p.split('/').all(|c| !c.is_empty() && c != "." && c != "..")
        && !p.contains('\0')
}

/// Encode the tree as a payload (no size limit here; [`encode_slot`] enforces it).
pub fn encode_tree(tree: &Tree) -> anyhow::Result<Vec<u8>> {
    if tree.len() > MAX_ENTRIES {
        bail!(
            "the agent's state has {} files, the store holds at most {MAX_ENTRIES}",
            tree.len()
        );
    }
    let mut out = Vec::new();
    out.extend_from_slice(&(tree.len() as u32).to_le_bytes());
    for (path, item) in tree {
        if !valid_path(path) {
            bail!("{path:?} cannot be kept in the store (paths are relative, at most {MAX_PATH} bytes)");
        }
        let len = u32::try_from(item.data.len())
            .with_context(|| format!("{path} is too large for the store"))?;
        out.extend_from_slice(&(path.len() as u16).to_le_bytes());
        out.extend_from_slice(path.as_bytes());
        out.push(u8::from(item.secret));
        out.extend_from_slice(&len.to_le_bytes());
        out.extend_from_slice(&item.data);
    }
    Ok(out)
}

/// Decode a payload (untrusted bytes: every length is checked before it is used).
pub fn decode_tree(b: &[u8]) -> anyhow::Result<Tree> {
    struct Cur<'a>(&'a [u8], usize);
    impl<'a> Cur<'a> {
        fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
            let end = self
                .1
                .checked_add(n)
                .filter(|&e| e <= self.0.len())
                .with_context(|| format!("the state record ends early (at byte {})", self.1))?;
            let s = &self.0[self.1..end];
            self.1 = end;
            Ok(s)
        }
        fn u16(&mut self) -> anyhow::Result<u16> {
            let s = self.take(2)?;
            Ok(u16::from_le_bytes([s[0], s[1]]))
        }
        fn u32(&mut self) -> anyhow::Result<u32> {
            let s = self.take(4)?;
            Ok(u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
        }
    }
    let mut c = Cur(b, 0);
    let n = c.u32()? as usize;
    if n > MAX_ENTRIES {
        bail!("the state record claims {n} files (at most {MAX_ENTRIES})");
    }
    let mut tree = Tree::new();
    for _ in 0..n {
        let plen = usize::from(c.u16()?);
        let path = std::str::from_utf8(c.take(plen)?)
            .context("a path in the state record is not UTF-8")?
            .to_string();
        if !valid_path(&path) {
            bail!("the state record holds an unsafe path {path:?}");
        }
        let flags = c.take(1)?[0];
        if flags & !1 != 0 {
            bail!("the state record has unknown flags {flags:#x} on {path}");
        }
        let dlen = c.u32()? as usize;
        let data = c.take(dlen)?.to_vec();
        if tree
            .insert(
                path.clone(),
                Item {
                    data,
                    secret: flags & 1 != 0,
                },
            )
            .is_some()
        {
            bail!("the state record holds {path} twice");
        }
    }
    if c.1 != b.len() {
        bail!("{} stray bytes after the state record", b.len() - c.1);
    }
    Ok(tree)
}

/// The record (header + payload) for slot content; errors name the biggest files when the
/// payload does not fit.
pub fn encode_slot(seq: u64, payload: &[u8], tree: Option<&Tree>) -> anyhow::Result<Vec<u8>> {
    if payload.len() > MAX_PAYLOAD {
        let biggest = tree.map(|t| {
            let mut v: Vec<(&String, usize)> = t.iter().map(|(p, i)| (p, i.data.len())).collect();
            v.sort_by_key(|e| std::cmp::Reverse(e.1));
            v.iter()
                .take(5)
                .map(|(p, n)| format!("{p} ({n} bytes)"))
                .collect::<Vec<_>>()
                .join(", ")
        });
        bail!(
            "the agent's state is {} bytes and the store on the boot-agent partition holds {MAX_PAYLOAD}: nothing was written (the previous state is kept){}",
            payload.len(),
            biggest
                .map(|b| format!("; the biggest files: {b}"))
                .unwrap_or_default()
        );
    }
    let mut rec = Vec::with_capacity(HEADER_LEN + payload.len());
    rec.extend_from_slice(MAGIC);
    rec.extend_from_slice(&VERSION.to_le_bytes());
    rec.extend_from_slice(&seq.to_le_bytes());
    rec.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut h = crc32fast::Hasher::new();
    h.update(&rec[..24]);
    h.update(payload);
    rec.extend_from_slice(&h.finalize().to_le_bytes());
    rec.extend_from_slice(&[0u8; 4]);
    rec.extend_from_slice(payload);
    Ok(rec)
}

/// The (sequence, payload) of a slot when it holds a valid record.
pub fn decode_slot(slot: &[u8]) -> Option<(u64, &[u8])> {
    let head = slot.get(..HEADER_LEN)?;
    if &head[..8] != MAGIC || u32::from_le_bytes(head[8..12].try_into().ok()?) != VERSION {
        return None;
    }
    let seq = u64::from_le_bytes(head[12..20].try_into().ok()?);
    let len = u32::from_le_bytes(head[20..24].try_into().ok()?) as usize;
    if len > MAX_PAYLOAD || head[28..32] != [0; 4] {
        return None;
    }
    let payload = slot.get(HEADER_LEN..HEADER_LEN + len)?;
    let mut h = crc32fast::Hasher::new();
    h.update(&head[..24]);
    h.update(payload);
    (h.finalize() == u32::from_le_bytes(head[24..28].try_into().ok()?)).then_some((seq, payload))
}

/// The newest valid record of a whole store file: (slot index, sequence, payload).
pub fn newest(file: &[u8]) -> Option<(usize, u64, &[u8])> {
    let mut best: Option<(usize, u64, &[u8])> = None;
    for i in 0..2 {
        let Some(slot) = file.get(i * SLOT_LEN..(i + 1) * SLOT_LEN) else {
            continue;
        };
        if let Some((seq, p)) = decode_slot(slot) {
            if best.is_none_or(|(_, s, _)| seq > s) {
                best = Some((i, seq, p));
            }
        }
    }
    best
}

/// What a load found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    pub tree: Tree,
    /// The sequence number of the record read (0: none yet).
    pub seq: u64,
}

/// The store on an opened boot-agent partition.
pub struct Store {
    bp: BootPartition,
}

impl Store {
    /// The store of `bp`; the file must exist at its full size (`img -install` makes it).
    pub fn open(bp: BootPartition) -> anyhow::Result<Store> {
        match bp.file_len(FILE)? {
            Some(n) if n == FILE_LEN as u64 => Ok(Store { bp }),
            Some(n) => bail!(
                "{FILE} on {} is {n} bytes, not {FILE_LEN}: it is not the agent's store; run `img -install` again",
                bp.describe()
            ),
            None => bail!(
                "{} has no {FILE} (the agent's persistent store): run `img -install` again, or the state stays in memory",
                bp.describe()
            ),
        }
    }

    pub fn partition(&self) -> &BootPartition {
        &self.bp
    }

    fn file(&self) -> anyhow::Result<Vec<u8>> {
        self.bp
            .read_file(FILE)?
            .with_context(|| format!("{FILE} disappeared from {}", self.bp.describe()))
    }

    /// The newest state; an empty tree with sequence 0 when no record was ever written.
    /// A valid record whose tree does not parse is an error (its CRC matched, so this is a
    /// newer format or a bug, and overwriting it blindly could lose the credential).
    pub fn load(&self) -> anyhow::Result<Loaded> {
        let f = self.file()?;
        match newest(&f) {
            None => Ok(Loaded {
                tree: Tree::new(),
                seq: 0,
            }),
            Some((slot, seq, payload)) => Ok(Loaded {
                tree: decode_tree(payload).with_context(|| {
                    format!(
                        "the store's record {seq} (slot {slot}) on {} cannot be read",
                        self.bp.describe()
                    )
                })?,
                seq,
            }),
        }
    }

    /// Write `tree` as the new state (into the slot not holding the newest record), synced.
    /// Returns the new sequence number.
    pub fn save(&mut self, tree: &Tree) -> anyhow::Result<u64> {
        let payload = encode_tree(tree)?;
        let f = self.file()?;
        let (slot, seq) = match newest(&f) {
            Some((i, seq, _)) => (1 - i, seq + 1),
            None => (0, 1),
        };
        let rec = encode_slot(seq, &payload, Some(tree))?;
        self.bp
            .overwrite_in_place(FILE, (slot * SLOT_LEN) as u64, &rec)
            .with_context(|| format!("saving the agent's state on {}", self.bp.describe()))?;
        Ok(seq)
    }
}

/// Fuzz entry point: a store file's bytes. Must never panic; whatever it accepts must
/// re-encode to a record that reads back the same.
pub fn fuzz_store(data: &[u8]) {
    if let Ok(t) = decode_tree(data) {
        let again = encode_tree(&t).expect("a decoded tree encodes");
        assert_eq!(decode_tree(&again).expect("re-decodes"), t);
    }
    if let Some((_, seq, p)) = newest(data) {
        let _ = decode_tree(p);
        let rec = encode_slot(seq, p, None).expect("a valid payload fits");
        assert_eq!(
            decode_slot(&rec).map(|(s, q)| (s, q.to_vec())),
            Some((seq, p.to_vec()))
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bootpart::{Disk, MemDisk};
    use std::io;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    fn tree(n: u8, extra: usize) -> Tree {
        let mut t = Tree::new();
        t.insert(
            "state/credential".into(),
            Item {
                data: format!("token-{n}").into_bytes(),
                secret: true,
            },
        );
        t.insert(
            "config/serverurl".into(),
            Item {
                data: format!("https://server{n}.example:8443").into_bytes(),
                secret: false,
            },
        );
        t.insert(
            "state/journal/deploy.json".into(),
            Item {
                data: vec![n; extra],
                secret: false,
            },
        );
        t
    }

    #[test]
    fn tree_round_trips_and_rejects_unsafe_paths() {
        let t = tree(3, 1000);
        assert_eq!(decode_tree(&encode_tree(&t).unwrap()).unwrap(), t);
        for bad in ["", "/etc/passwd", "a/../b", "a//b", "./a"] {
            assert!(!valid_path(bad), "{bad}");
            let mut t = Tree::new();
            t.insert(
                bad.into(),
                Item {
                    data: vec![],
                    secret: false,
                },
            );
            assert!(encode_tree(&t).is_err());
        }
        // A hand-made record with "../x" is refused by the reader too.
        let mut b = 1u32.to_le_bytes().to_vec();
        b.extend_from_slice(&4u16.to_le_bytes());
        b.extend_from_slice(b"../x");
        b.push(0);
        b.extend_from_slice(&0u32.to_le_bytes());
        assert!(format!("{:#}", decode_tree(&b).unwrap_err()).contains("unsafe path"));
    }

    #[test]
    fn newest_valid_slot_wins_and_a_bad_crc_is_ignored() {
        let mut f = vec![0u8; FILE_LEN];
        assert!(newest(&f).is_none());
        let a = encode_slot(7, b"seven", None).unwrap();
        let b = encode_slot(8, b"eight", None).unwrap();
        f[..a.len()].copy_from_slice(&a);
        f[SLOT_LEN..SLOT_LEN + b.len()].copy_from_slice(&b);
        assert_eq!(newest(&f).unwrap(), (1, 8, &b"eight"[..]));
        f[SLOT_LEN + HEADER_LEN] ^= 1;
        assert_eq!(newest(&f).unwrap(), (0, 7, &b"seven"[..]));
        f[3] ^= 1;
        assert!(newest(&f).is_none());
    }

    #[test]
    fn an_oversized_state_is_refused_naming_the_biggest_files() {
        let t = tree(1, MAX_PAYLOAD);
        let p = encode_tree(&t).unwrap();
        let e = encode_slot(1, &p, Some(&t)).unwrap_err().to_string();
        assert!(
            e.contains("nothing was written")
                && e.contains("state/journal/deploy.json (262112 bytes)"),
            "{e}"
        );
    }

    /// A disk whose writes stop after `budget` bytes, rounded down to whole `sector`s, as a
    /// power cut during a write leaves it (the sectors before the cut written, the rest old).
    struct Tearing {
        bytes: Arc<Mutex<Vec<u8>>>,
        budget: usize,
        sector: usize,
    }

    impl Disk for Tearing {
        fn read_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()> {
            let b = self.bytes.lock().unwrap();
            let o = offset as usize;
            buf.copy_from_slice(
                b.get(o..o + buf.len())
                    .ok_or(io::ErrorKind::UnexpectedEof)?,
            );
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> io::Result<()> {
            let o = offset as usize;
            let mut n = buf.len().min(self.budget);
            if n < buf.len() {
                // Writes start sector-aligned (clusters are); a cut keeps whole sectors only.
                n = n / self.sector * self.sector;
            }
            self.bytes.lock().unwrap()[o..o + n].copy_from_slice(&buf[..n]);
            self.budget -= n;
            if n < buf.len() {
                return Err(io::Error::other("power cut"));
            }
            Ok(())
        }
        fn sync(&mut self) -> io::Result<()> {
            Ok(())
        }
        fn size(&self) -> u64 {
            self.bytes.lock().unwrap().len() as u64
        }
    }

    /// The bootpart test disk with a preallocated store file, as `img -install` leaves it.
    fn store_disk() -> Vec<u8> {
        let script = format!(
            "truncate -s 3M d.img
             sgdisk -o -n 1:2048:+1536K -c 1:boot -t 1:0700 -n 2:0:0 d.img >/dev/null
             mkfs.fat -C -F 12 -s 1 -n BOOTAGENT p.img 1536 >/dev/null
             head -c {FILE_LEN} /dev/zero > s.dat
             mmd -i p.img ::AGENT ::boot
             mcopy -i p.img s.dat ::AGENT/STATE.DAT
             dd if=p.img of=d.img bs=512 seek=2048 conv=notrunc status=none"
        );
        crate::bootpart::tests::made_by(&script, "d.img").expect("sgdisk, mkfs.fat, mtools")
    }

    fn store_on(bytes: Arc<Mutex<Vec<u8>>>, budget: usize, sector: usize) -> Store {
        let bp = BootPartition::from_disk(
            Box::new(Tearing {
                bytes,
                budget,
                sector,
            }),
            Path::new("d.img"),
            true,
            None,
        )
        .unwrap();
        Store::open(bp).unwrap()
    }

    /// A power cut at every sector boundary of an update (512- and 4096-byte sectors), with
    /// the store holding two records already: the old or the new state is read back.
    #[test]
    fn torn_writes_at_every_sector_boundary_read_back_old_or_new() {
        let base = store_disk();
        let (t1, t2, t3) = (tree(1, 5000), tree(2, 7000), tree(3, 20000));
        let disk = Arc::new(Mutex::new(base));
        let mut s = store_on(disk.clone(), usize::MAX, 512);
        assert_eq!(s.load().unwrap().seq, 0);
        assert_eq!(s.save(&t1).unwrap(), 1);
        assert_eq!(s.save(&t2).unwrap(), 2);
        assert_eq!(s.load().unwrap().tree, t2);
        let before = disk.lock().unwrap().clone();
        let rec_len = HEADER_LEN + encode_tree(&t3).unwrap().len();
        for sector in [512usize, 4096] {
            let mut seen_old = 0;
            for k in 0..=rec_len.div_ceil(sector) {
                let bytes = Arc::new(Mutex::new(before.clone()));
                let mut s = store_on(bytes.clone(), k * sector, sector);
                let r = s.save(&t3);
                let complete = k * sector >= rec_len;
                assert_eq!(r.is_ok(), complete, "k={k} sector={sector}");
                let after = store_on(bytes, usize::MAX, sector).load().unwrap();
                if complete {
                    assert_eq!((after.seq, &after.tree), (3, &t3));
                } else {
                    assert_eq!((after.seq, &after.tree), (2, &t2), "k={k} sector={sector}");
                    seen_old += 1;
                }
            }
            assert!(seen_old > 3);
        }
    }

    /// Sectors of a write may reach the disk in any order: any subset of the new record's
    /// sectors over the old slot still reads back the previous state.
    #[test]
    fn any_subset_of_a_records_sectors_reads_back_the_old_state() {
        let mut f = vec![0u8; FILE_LEN];
        let old = encode_slot(4, &encode_tree(&tree(4, 3000)).unwrap(), None).unwrap();
        let older = encode_slot(3, &encode_tree(&tree(3, 9000)).unwrap(), None).unwrap();
        f[..older.len()].copy_from_slice(&older);
        f[SLOT_LEN..SLOT_LEN + old.len()].copy_from_slice(&old);
        let new = encode_slot(5, &encode_tree(&tree(5, 11000)).unwrap(), None).unwrap();
        let sectors = new.len().div_ceil(512);
        let mut rng = 0x1234_5678u64;
        for _ in 0..500 {
            let mut g = f.clone();
            let mut all = true;
            for s in 0..sectors {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let end = ((s + 1) * 512).min(new.len());
                if rng & 1 == 0 {
                    g[s * 512..end].copy_from_slice(&new[s * 512..end]);
                } else if g[s * 512..end] != new[s * 512..end] {
                    all = false;
                }
            }
            let (_, seq, _) = newest(&g).unwrap();
            assert_eq!(seq, if all { 5 } else { 4 });
        }
    }

    /// Deterministic stand-in for the fuzz target: mutated records never panic the reader,
    /// and what is accepted re-encodes identically.
    #[test]
    fn mutated_records_never_panic() {
        let payload = encode_tree(&tree(9, 300)).unwrap();
        let rec = encode_slot(1, &payload, None).unwrap();
        let mut rng = 0xC0FFEEu64;
        for i in 0..20000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let mut p = payload.clone();
            for _ in 0..1 + rng % 4 {
                let at = (rng >> 8) as usize % p.len();
                p[at] = (rng >> 32) as u8;
                rng = rng.rotate_left(7);
            }
            if i % 3 == 0 {
                p.truncate((rng as usize) % p.len());
            }
            fuzz_store(&p);
            let mut r = rec.clone();
            let at = (rng >> 16) as usize % r.len();
            r[at] ^= 1 << (rng % 8);
            assert!(decode_slot(&r).is_none(), "a flipped bit went unnoticed");
            if i % 500 == 0 {
                let mut f = r;
                f.resize(FILE_LEN, 0);
                fuzz_store(&f);
            }
        }
    }

    #[test]
    fn missing_or_wrong_sized_store_file_says_how_to_fix_it() {
        let (d, ..) = crate::bootpart::tests::split(crate::bootpart::tests::disk(16));
        let bp =
            BootPartition::from_disk(Box::new(MemDisk(d)), Path::new("d.img"), true, None).unwrap();
        let e = Store::open(bp).err().unwrap().to_string();
        assert!(e.contains("img -install"), "{e}");
    }
}
