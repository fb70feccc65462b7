//! The deploy's unit tests: whole deploys of small images onto files.

use std::fs;
use std::path::{Path, PathBuf};

use super::*;
use crate::error::ErrorKind;
use crate::format::{self, testimg, ChunkKind, ImageReader, ManifestEntry};
use crate::io::NoProgress;
use crate::sign::{self, SigningKey};
use crate::source::{HttpConfig, Location, Source};

struct Dir(PathBuf);
impl Dir {
    fn new(name: &str) -> Dir {
        let d =
            std::env::temp_dir().join(format!("imgengine-deploy-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        Dir(d)
    }
    fn p(&self, n: &str) -> PathBuf {
        self.0.join(n)
    }
    fn opts(&self) -> DeployOptions {
        DeployOptions {
            state_dir: self.p("state"),
            threads: 2,
            ..Default::default()
        }
    }
}
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

const LEN: usize = 1 << 20;
const CHUNK: usize = 64 << 10;

fn setup(d: &Dir, sealed_with: Option<&SigningKey>) -> (PathBuf, Vec<u8>) {
    let disk = testimg::disk(LEN);
    let img = d.p("a.img");
    fs::write(&img, testimg::image(&disk, CHUNK)).unwrap();
    if let Some(k) = sealed_with {
        sign::seal_and_sign(&img, &img, k).unwrap();
    }
    (img, disk)
}

fn entries(img: &Path) -> Vec<ManifestEntry> {
    let bytes = fs::read(img).unwrap();
    let mut r = ImageReader::open(&bytes[..]).unwrap();
    while r.next_chunk().unwrap().is_some() {}
    r.manifest().unwrap().0.entries.clone()
}

#[test]
fn deploys_streaming_and_sealed_onto_junk() {
    let d = Dir::new("basic");
    let key = SigningKey::generate();
    for sealed in [false, true] {
        let (img, disk) = setup(&d, sealed.then_some(&key));
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0xAAu8; LEN]).unwrap();
        let s = deploy(
            &Location::File(img.clone()),
            &tgt,
            None,
            &d.opts(),
            &NoProgress,
        )
        .unwrap();
        assert_eq!(fs::read(&tgt).unwrap(), disk, "sealed={sealed}");
        assert!(!s.raw && !s.resumed && s.chunks_written == 16, "{s:?}");
        let info = verify(&Location::File(img), &d.opts(), &NoProgress).unwrap();
        assert_eq!(info.sealed, sealed);
        assert_eq!(info.signed_by.is_some(), sealed);
    }
}

#[test]
fn trusted_keys_refuse_unsigned_and_wrong_key_before_writing() {
    let d = Dir::new("trust");
    let key = SigningKey::generate();
    let (img, _) = setup(&d, None);
    let tgt = d.p("t.raw");
    let junk = vec![0x55u8; LEN];
    fs::write(&tgt, &junk).unwrap();
    let mut opts = d.opts();
    opts.trusted_keys = vec![key.verifying_key()];
    let e = deploy(&Location::File(img.clone()), &tgt, None, &opts, &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
    sign::seal_and_sign(&img, &img, &SigningKey::generate()).unwrap();
    let e = deploy(&Location::File(img.clone()), &tgt, None, &opts, &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Signature, "{e}");
    assert!(e.to_string().contains("not trusted"), "{e}");
    assert_eq!(fs::read(&tgt).unwrap(), junk, "nothing written");
    sign::seal_and_sign(&img, &img, &key).unwrap();
    deploy(&Location::File(img), &tgt, None, &opts, &NoProgress).unwrap();
}

#[test]
fn corrupt_chunk_stops_before_it() {
    let d = Dir::new("corrupt");
    let (img, disk) = setup(&d, None);
    let es = entries(&img);
    let bad = es[5];
    let mut bytes = fs::read(&img).unwrap();
    bytes[(bad.image_offset + 76 + 3) as usize] ^= 0x20;
    fs::write(&img, &bytes).unwrap();
    let tgt = d.p("t.raw");
    let junk = vec![0x55u8; LEN];
    fs::write(&tgt, &junk).unwrap();
    let e = deploy(&Location::File(img), &tgt, None, &d.opts(), &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt);
    assert!(
        e.to_string().contains(&format!(
            "chunk 5 at disk offset {}",
            bad.header.disk_offset
        )),
        "{e}"
    );
    let got = fs::read(&tgt).unwrap();
    let cut = bad.header.disk_offset as usize;
    assert_eq!(
        &got[..cut],
        &disk[..cut],
        "chunks before the bad one are written"
    );
    assert_eq!(
        &got[cut..],
        &junk[cut..],
        "nothing at or after the bad chunk"
    );
}

#[test]
fn interrupted_deploy_resumes_fetching_only_the_rest() {
    let d = Dir::new("resume");
    let key = SigningKey::generate();
    let (img, disk) = setup(&d, Some(&key));
    let full = fs::read(&img).unwrap();
    let es = entries(&img);
    // The first attempt sees the image cut in chunk 9 (a dead connection).
    let cut = es[9].image_offset + 100;
    fs::write(&img, &full[..cut as usize]).unwrap();
    let tgt = d.p("t.raw");
    fs::write(&tgt, vec![0x55u8; LEN]).unwrap();
    let e = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &d.opts(),
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    assert!(e.to_string().contains("chunk 9"), "{e}");
    // Second attempt with the whole image: chunks 0..9 are on the target already.
    fs::write(&img, &full).unwrap();
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &d.opts(),
        &NoProgress,
    )
    .unwrap();
    assert!(s.resumed, "{s:?}");
    assert_eq!(fs::read(&tgt).unwrap(), disk);
    let zero_before = es[..9]
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Zero)
        .count() as u64;
    assert_eq!(s.chunks_skipped, 9 - zero_before, "{s:?}");
    let later: u64 = es[9..].iter().map(|e| e.record_len()).sum();
    assert!(
        s.bytes_fetched < later + 8192,
        "fetched {} for {} bytes of later chunks",
        s.bytes_fetched,
        later
    );
    // The journal is gone after success; a third run still finds every data chunk
    // intact (the default check) and fetches none of them.
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &d.opts(),
        &NoProgress,
    )
    .unwrap();
    let data = es
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .count() as u64;
    assert!(s.resumed && s.chunks_skipped == data, "{s:?}");
    assert_eq!(fs::read(&tgt).unwrap(), disk);
    // -resume=never writes everything again.
    let mut never = d.opts();
    never.resume = ResumeMode::Never;
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &never,
        &NoProgress,
    )
    .unwrap();
    assert!(!s.resumed && s.chunks_skipped == 0, "{s:?}");
}

#[test]
fn big_chunks_are_streamed_and_one_that_fails_its_check_is_zeroed() {
    let d = Dir::new("big");
    let len = 24 << 20;
    let chunk = 12 << 20; // above STREAM_OVER: streamed in pieces
    let disk = testimg::disk(len);
    let img = d.p("big.img");
    let good = testimg::image(&disk, chunk);
    fs::write(&img, &good).unwrap();
    let tgt = d.p("t.raw");
    fs::write(&tgt, vec![0x55u8; len]).unwrap();
    let mut never = d.opts();
    never.resume = ResumeMode::Never;
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &never,
        &NoProgress,
    )
    .unwrap();
    assert_eq!(s.chunks_written, 2, "{s:?}");
    assert!(fs::read(&tgt).unwrap() == disk);
    verify(&Location::File(img.clone()), &d.opts(), &NoProgress).unwrap();

    // Cut inside chunk 1: truncated, and none of chunk 1 stays.
    let es = entries(&img);
    let cut = es[1].image_offset + 76 + u64::from(es[1].header.comp_len) / 2;
    fs::write(&img, &good[..cut as usize]).unwrap();
    fs::write(&tgt, vec![0x55u8; len]).unwrap();
    let e = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &never,
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    let got = fs::read(&tgt).unwrap();
    assert!(
        got[chunk..].iter().all(|&b| b == 0) || got[chunk..].iter().all(|&b| b == 0x55),
        "no unverified bytes of chunk 1 stay"
    );

    // A flipped byte late in chunk 1's payload: chunk 0 stays, chunk 1's region is
    // zeroed (not left with unverified bytes), the error names the chunk.
    let mut bad = good.clone();
    let at = es[1].image_offset + 76 + u64::from(es[1].header.comp_len) - 10;
    bad[at as usize] ^= 0x01;
    fs::write(&img, &bad).unwrap();
    fs::write(&tgt, vec![0x55u8; len]).unwrap();
    let e = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &never,
        &NoProgress,
    )
    .unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");
    assert!(e.to_string().contains("chunk 1 at disk offset"), "{e}");
    let got = fs::read(&tgt).unwrap();
    assert!(got[..chunk] == disk[..chunk], "chunk 0 written");
    assert!(got[chunk..].iter().all(|&b| b == 0), "chunk 1 zeroed");
    let e = verify(&Location::File(img.clone()), &d.opts(), &NoProgress).unwrap_err();
    assert_eq!(e.kind(), ErrorKind::Corrupt, "{e}");

    // The good image again, with the resume path (range reads of big chunks): chunk 0
    // is found intact.
    fs::write(&img, &good).unwrap();
    let s = deploy(&Location::File(img), &tgt, None, &d.opts(), &NoProgress).unwrap();
    assert!(s.resumed && s.chunks_skipped == 1, "{s:?}");
    assert!(fs::read(&tgt).unwrap() == disk);
}

#[test]
fn raw_images_plain_and_compressed() {
    let d = Dir::new("raw");
    let disk = testimg::disk(LEN);
    let plain = d.p("r.img");
    fs::write(&plain, &disk).unwrap();
    let zst = d.p("r.img.zst");
    fs::write(&zst, zstd::bulk::compress(&disk, 3).unwrap()).unwrap();
    let gz = d.p("r.img.gz");
    let mut enc = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut enc, &disk).unwrap();
    fs::write(&gz, enc.finish().unwrap()).unwrap();
    let xz = d.p("r.img.xz");
    let mut enc = xz2::write::XzEncoder::new(Vec::new(), 1);
    std::io::Write::write_all(&mut enc, &disk).unwrap();
    fs::write(&xz, enc.finish().unwrap()).unwrap();
    for src in [plain, zst, gz, xz] {
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0x55u8; LEN]).unwrap();
        let s = deploy(
            &Location::File(src.clone()),
            &tgt,
            None,
            &d.opts(),
            &NoProgress,
        )
        .unwrap();
        assert!(s.raw);
        assert_eq!(fs::read(&tgt).unwrap(), disk, "{}", src.display());
    }
}

#[test]
fn opened_image_shows_its_meta_then_deploys_without_reopening() {
    let d = Dir::new("opened");
    let (img, disk) = setup(&d, None);
    let loc = Location::File(img.clone());
    let http = HttpConfig::default();
    // Read front to back (as from a pipe): the head comes from the stream, which goes on.
    let seq = OpenedImage::from_source(Source::open(&loc, &http).unwrap(), false).unwrap();
    // With ranges: the head (and the streaming image's manifest, from its end) by ranges.
    let ranged = OpenedImage::open(&loc, &http).unwrap();
    let fetched = ranged.source.bytes_fetched();
    assert!(fetched < 8192, "only the head was read: {fetched} bytes");
    assert_eq!(seq.meta().unwrap().name, "test");
    assert_eq!(seq.meta(), ranged.meta());
    assert_eq!(ranged.location(), &loc);
    for opened in [seq, ranged] {
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0xAAu8; LEN]).unwrap();
        let mut never = d.opts();
        never.resume = ResumeMode::Never;
        let s = opened.deploy(&tgt, None, &never, &NoProgress).unwrap();
        assert_eq!(fs::read(&tgt).unwrap(), disk);
        assert_eq!(s.chunks_written, 16, "{s:?}");
    }
    // A raw image says nothing of itself.
    let raw = d.p("r.img");
    fs::write(&raw, &disk).unwrap();
    let opened = OpenedImage::open(&Location::File(raw), &http).unwrap();
    assert!(opened.meta().is_none());
}

/// A one-file HTTP/1.1 server on loopback that does not do Range requests (no
/// `Accept-Ranges`), like a plain web server or a proxy that strips it.
fn serve_without_ranges(body: Vec<u8>) -> Location {
    use std::io::{Read, Write};
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/a.img", l.local_addr().unwrap());
    let body = std::sync::Arc::new(body);
    std::thread::spawn(move || {
        for conn in l.incoming() {
            let Ok(mut c) = conn else { return };
            let body = body.clone();
            std::thread::spawn(move || {
                let mut req = Vec::new();
                let mut b = [0u8; 1];
                while !req.ends_with(b"\r\n\r\n") {
                    match c.read(&mut b) {
                        Ok(1) => req.push(b[0]),
                        _ => return,
                    }
                }
                let head = format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                let _ = c.write_all(head.as_bytes());
                if req.starts_with(b"GET") {
                    let _ = c.write_all(&body);
                }
            });
        }
    });
    Location::Url(url)
}

/// The model check of `img -restore` used to learn the image's models with `read_info`,
/// which on a server without Range reads the whole image, and the deploy then read it
/// again. Opened once, the head costs at most one buffer, and the deploy reads the image
/// exactly once in all.
#[test]
fn a_server_without_range_is_read_once_head_included() {
    let d = Dir::new("norange");
    let len = 4 << 20;
    let disk = testimg::disk(len);
    let image = testimg::image(&disk, CHUNK);
    let image_len = image.len() as u64;
    assert!(image_len > 2 * crate::io::BUFFER_SIZE as u64, "{image_len}");
    let loc = serve_without_ranges(image);
    let http = HttpConfig::default();

    // What the old model check cost: the whole image, before the deploy read it again.
    let mut src = Source::open(&loc, &http).unwrap();
    assert!(!src.supports_ranges());
    crate::format::read_info(&mut src).unwrap();
    assert_eq!(src.bytes_fetched(), image_len);

    let opened = OpenedImage::open(&loc, &http).unwrap();
    let head_cost = opened.source.bytes_fetched();
    assert!(
        head_cost <= crate::io::BUFFER_SIZE as u64,
        "the head cost {head_cost} bytes"
    );
    assert_eq!(opened.meta().unwrap().min_target_size, len as u64);
    let tgt = d.p("t.raw");
    fs::write(&tgt, vec![0x55u8; len]).unwrap();
    let s = opened.deploy(&tgt, None, &d.opts(), &NoProgress).unwrap();
    assert_eq!(fs::read(&tgt).unwrap(), disk);
    assert_eq!(s.bytes_fetched, image_len, "read exactly once: {s:?}");
}

/// Progress that keeps the total of every "checking target" phase.
#[derive(Default)]
struct Checks(std::sync::Mutex<Vec<u64>>);
impl crate::io::Progress for Checks {
    fn begin(&self, what: &str, total: Option<u64>) {
        if what == "checking target" {
            self.0.lock().unwrap().push(total.unwrap_or(0));
        }
    }
    fn advance(&self, _bytes: u64) {}
    fn end(&self) {}
}

#[test]
fn with_no_journal_only_the_first_16_mib_of_the_target_are_probed() {
    // About 50 MiB of data in 2 MiB chunks (a 16 MiB zero hole in a 64 MiB disk): the byte
    // bound decides (8 chunks, not 16). Then 256 KiB chunks, where the chunk count decides
    // (16 chunks, 4 MiB).
    let d = Dir::new("probe");
    let len = 64 << 20;
    let disk = testimg::disk(len);
    for (chunk, bound) in [(2usize << 20, 16u64 << 20), (256 << 10, 4 << 20)] {
        let img = d.p("p.img");
        fs::write(&img, testimg::image(&disk, chunk)).unwrap();
        let tgt = d.p("t.raw");
        fs::write(&tgt, vec![0x55u8; len]).unwrap();
        let checks = Checks::default();
        let s = deploy(&Location::File(img.clone()), &tgt, None, &d.opts(), &checks).unwrap();
        assert!(!s.resumed && s.chunks_skipped == 0, "{s:?}");
        assert_eq!(
            *checks.0.lock().unwrap(),
            vec![bound],
            "one probe of {bound} bytes"
        );
        assert!(fs::read(&tgt).unwrap() == disk);
        // The same image again (the journal is gone after success): the probe finds the
        // first chunks intact, every chunk is checked, none is written.
        let checks = Checks::default();
        let s = deploy(&Location::File(img.clone()), &tgt, None, &d.opts(), &checks).unwrap();
        let es = entries(&img);
        let data_es = es.iter().filter(|e| e.header.kind == ChunkKind::Data);
        let data = data_es.clone().count() as u64;
        let data_bytes: u64 = data_es.map(|e| e.header.raw_len).sum();
        assert!(
            s.resumed && s.chunks_skipped == data && s.bytes_written == 0,
            "{s:?}"
        );
        let probed = checks.0.lock().unwrap().clone();
        assert_eq!(probed.len(), 2, "{probed:?}");
        assert_eq!(probed[0], bound);
        assert_eq!(probed[0] + probed[1], data_bytes, "{probed:?}");
    }
}

#[test]
fn the_probe_finds_chunks_that_start_with_zeros_intact_and_a_changed_one_not() {
    // 2 MiB chunks over 8 MiB: chunk 0 is 1.5 MiB of zeros then data (leading zeros past
    // the 1 MiB read piece), chunk 1 data throughout, chunk 2 all zero (a zero chunk),
    // chunk 3 1 MiB of zeros (exactly one read piece) then data.
    let d = Dir::new("probe-zeros");
    let len = 8 << 20;
    let mut disk = testimg::disk(len);
    disk[..3 << 19].fill(0);
    disk[4 << 20..7 << 20].fill(0);
    let img = d.p("z.img");
    fs::write(&img, testimg::image(&disk, 2 << 20)).unwrap();
    let es = entries(&img);
    let data = es
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Data)
        .count() as u64;
    assert_eq!(data, 3, "chunks 0, 1 and 3 are data");
    // A blank target holds nothing intact: every data chunk is written.
    let tgt = d.p("t.raw");
    fs::write(&tgt, vec![0u8; len]).unwrap();
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &d.opts(),
        &NoProgress,
    )
    .unwrap();
    assert!(!s.resumed && s.chunks_skipped == 0, "{s:?}");
    assert!(fs::read(&tgt).unwrap() == disk);
    // Again: the chunks that start with zeros are found intact.
    let s = deploy(
        &Location::File(img.clone()),
        &tgt,
        None,
        &d.opts(),
        &NoProgress,
    )
    .unwrap();
    assert!(
        s.resumed && s.chunks_skipped == data && s.bytes_written == 0,
        "{s:?}"
    );
    // One byte changed after the leading zeros of chunk 3: that chunk alone is written.
    let mut t = fs::read(&tgt).unwrap();
    t[(6 << 20) + (1 << 20) + 5] ^= 0xff;
    fs::write(&tgt, &t).unwrap();
    let s = deploy(&Location::File(img), &tgt, None, &d.opts(), &NoProgress).unwrap();
    assert_eq!(s.chunks_skipped, data - 1, "{s:?}");
    assert!(fs::read(&tgt).unwrap() == disk);
}

/// A feed of records in the order given; records the deploy's `wanted`.
struct TestFeed {
    recs: Vec<format::ChunkRecord>,
    wanted: Option<Vec<bool>>,
    /// Hand every record over, wanted or not.
    all: bool,
}

impl ChunkFeed for TestFeed {
    fn start(&mut self, wanted: &[bool]) -> Result<()> {
        self.wanted = Some(wanted.to_vec());
        Ok(())
    }
    fn next(&mut self) -> Result<Option<format::ChunkRecord>> {
        let w = self.wanted.as_ref().expect("start before next");
        while !self.recs.is_empty() {
            let r = self.recs.remove(0);
            if self.all || w[r.header.index as usize] {
                return Ok(Some(r));
            }
        }
        Ok(None)
    }
}

fn records(img: &Path) -> Vec<format::ChunkRecord> {
    let bytes = fs::read(img).unwrap();
    let mut r = ImageReader::open(&bytes[..]).unwrap();
    let mut v = Vec::new();
    while let Some(rec) = r.next_chunk().unwrap() {
        v.push(rec);
    }
    v
}

fn fed(d: &Dir, img: &Path, tgt: &Path, feed: &mut TestFeed) -> Result<DeploySummary> {
    OpenedImage::open(&Location::File(img.to_path_buf()), &HttpConfig::default())?.deploy_fed(
        tgt,
        None,
        &d.opts(),
        &NoProgress,
        feed,
    )
}

#[test]
fn a_fed_deploy_takes_the_chunks_in_any_order_and_only_those_the_target_lacks() {
    let d = Dir::new("fed");
    let key = SigningKey::generate();
    let (img, disk) = setup(&d, Some(&key));
    let zero = entries(&img)
        .iter()
        .filter(|e| e.header.kind == ChunkKind::Zero)
        .count();
    assert!(zero > 0, "the test image has zero chunks");
    let tgt = d.p("t.raw");
    // Reversed, and interleaved from both ends: neither is image order.
    let n = records(&img).len();
    let reversed: Vec<usize> = (0..n).rev().collect();
    let mixed: Vec<usize> = (0..n)
        .map(|i| if i % 2 == 0 { i / 2 } else { n - 1 - i / 2 })
        .collect();
    let ordered = |idx: &[usize]| {
        let mut all: Vec<_> = records(&img).into_iter().map(Some).collect();
        idx.iter()
            .map(|&i| all[i].take().unwrap())
            .collect::<Vec<_>>()
    };
    for order in [reversed, mixed] {
        fs::write(&tgt, vec![0xAAu8; LEN]).unwrap();
        let mut feed = TestFeed {
            recs: ordered(&order),
            wanted: None,
            all: false,
        };
        let s = fed(&d, &img, &tgt, &mut feed).unwrap();
        assert_eq!(fs::read(&tgt).unwrap(), disk);
        assert_eq!((s.chunks_written, s.chunks_skipped), (16, 0), "{s:?}");
        let w = feed.wanted.unwrap();
        assert_eq!(
            w.iter().filter(|&&x| !x).count(),
            zero,
            "zero chunks need no bytes"
        );
    }
    // The target holds the image but for one chunk: only that one is asked for.
    let mut t = disk.clone();
    t[5 * CHUNK + 10] ^= 0xFF;
    fs::write(&tgt, &t).unwrap();
    let mut feed = TestFeed {
        recs: records(&img),
        wanted: None,
        all: false,
    };
    let s = fed(&d, &img, &tgt, &mut feed).unwrap();
    assert_eq!(fs::read(&tgt).unwrap(), disk);
    let w = feed.wanted.unwrap();
    assert_eq!(
        w.iter()
            .enumerate()
            .filter(|x| *x.1)
            .map(|x| x.0)
            .collect::<Vec<_>>(),
        vec![5]
    );
    assert!(
        s.resumed && s.chunks_skipped == 16 - 1 - zero as u64,
        "{s:?}"
    );
}

#[test]
fn a_fed_deploy_refuses_a_bad_a_repeated_or_a_missing_chunk() {
    let d = Dir::new("fedbad");
    let (img, _) = setup(&d, Some(&SigningKey::generate()));
    let tgt = d.p("t.raw");
    let run = |recs: Vec<format::ChunkRecord>, all: bool| {
        fs::write(&tgt, vec![0xAAu8; LEN]).unwrap();
        fed(
            &d,
            &img,
            &tgt,
            &mut TestFeed {
                recs,
                wanted: None,
                all,
            },
        )
        .unwrap_err()
    };
    // A flipped payload byte: the CRC32, and nothing of it written.
    let mut recs = records(&img);
    recs[3].payload[7] ^= 1;
    let e = run(recs, false);
    assert!(e.to_string().contains("CRC32"), "{e}");
    let t = fs::read(&tgt).unwrap();
    assert!(t[3 * CHUNK..4 * CHUNK].iter().all(|&b| b == 0xAA));
    // A chunk at another place in the image.
    let mut recs = records(&img);
    recs[2].image_offset += 1;
    let e = run(recs, false);
    assert!(e.to_string().contains("does not match the manifest"), "{e}");
    // The same chunk twice.
    let mut recs = records(&img);
    recs.insert(1, records(&img).remove(0));
    let e = run(recs, false);
    assert!(e.to_string().contains("given twice"), "{e}");
    // A zero chunk the deploy did not ask for.
    let e = run(records(&img), true);
    assert!(e.to_string().contains("not asked for"), "{e}");
    // The feed ends early.
    let mut recs = records(&img);
    recs.truncate(4);
    let e = run(recs, false);
    assert_eq!(e.kind(), ErrorKind::Truncated, "{e}");
    assert!(e.to_string().contains("still missing"), "{e}");
}
