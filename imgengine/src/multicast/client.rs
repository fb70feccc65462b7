//! A client of a session: finds the master, registers, receives the objects it needs into
//! a bounded window, and deploys the image with the unicast deploy's steps, unchanged but
//! for the order of the chunks.
//!
//! The deploy reads the image's head from a loopback-only HTTP source (`127.0.0.1`, a
//! random path) that this module serves from the objects received, and takes the chunks
//! from a [`ChunkFeed`] as they arrive, in any order (a chunk is written at its own disk
//! offset). Everything deploy does for `img -restore` therefore happens here too, in the
//! same order: trust check of the signature before the target is opened, extent checks,
//! tables invalidated, CRC32 and SHA-256 of every chunk before it is written, partition
//! tables last, and the resume journal, so a restarted client asks only for the chunks its
//! disk does not hold yet. An object leaves memory as soon as the deploy has taken it.
//!
//! Memory: objects held or being decoded are bounded by [`WINDOW_BYTES`]; the window is
//! the start of what the deploy still needs, in image order, so whatever is received is
//! written soon. Objects beyond it are ignored and asked for again on the
//! next pass, which is what makes a slow client never slow the master down.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::{BufRead, BufReader, ErrorKind as IoKind, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream, UdpSocket};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use super::fallback::{Fallback, RangeFetcher};
use super::fec::{self, BlockDecoder};
use super::packet::{
    data_tag, is_data, Announce, Body, ClientState, Data, MasterState, Nack, Packet, ReplyCode,
    Status, MAX_NACKS, MAX_NEEDS, MAX_PACKET, TAG_LEN,
};
use super::{net, Object};
use crate::deploy::{ChunkFeed, DeployOptions, DeploySummary, OpenedImage};
use crate::error::{Error, ErrorKind, Result};
use crate::format::layout::{ChunkHeader, CHUNK_HEADER_LEN, FOOTER_LEN};
use crate::format::{ChunkRecord, ImageReader, Manifest};
use crate::io::Progress;
use crate::source::Location;

/// Received objects held, plus objects being decoded: with the deploy's own 32 MiB
/// pipeline the client stays within 64 MiB for the default 4 MiB chunks.
pub const WINDOW_BYTES: u64 = 24 << 20;
/// The master is given up when nothing at all was heard from it for this long.
pub const MASTER_SILENCE: Duration = Duration::from_secs(60);
const STATUS_EVERY: Duration = Duration::from_millis(200);
/// A block that got no symbol for this long while incomplete is NACKed.
const NACK_AFTER: Duration = Duration::from_millis(60);
/// A block NACKed this long ago and still short is NACKed again: the repair was lost too.
/// The master's send queue is bounded (tens of ms) and it answers between blocks, so a
/// repair normally arrives well within this; the master ignores a repeat that comes before
/// its hold-off (100 ms) is over.
const NACK_REPEAT: Duration = Duration::from_millis(150);
/// Datagrams taken per system call (and per lock of the receiver's state).
const RECV_BATCH: usize = 32;
/// When the last batch was small, the receiver waits this long before the next one, so the
/// next wake-up takes several datagrams: one wake-up per datagram cost a receiver about a
/// fifth of its CPU. Only with a receive queue of [`COALESCE_MIN_QUEUE`] or more, which
/// holds far more than this long's worth of datagrams at any rate the master sends.
const COALESCE: Duration = Duration::from_millis(1);
const COALESCE_MIN_QUEUE: usize = 2 << 20;
/// How often the receiver looks for NACKs that are due: they go out at once in a status
/// of their own (not at the next 200 ms report), so the NACKs of every client for a block
/// reach the master together and one repair answers them all.
const NACK_CHECK: Duration = Duration::from_millis(20);
/// An urgent status (a NACK, the objects just learnt, the result) is sent again this much
/// later, in case the first was lost.
const REPEAT_URGENT: Duration = Duration::from_millis(25);
/// A registration not answered this long ago is sent again (a lost registration or reply
/// costs this, not the wait for the master's next announcement). The master answers within
/// 10 ms; with 8 devices at 2 % loss one registration in about six is lost, and the room
/// starts only when the last device is in, so this is the room's time, not the device's.
const REGISTER_AGAIN: Duration = Duration::from_millis(50);
/// Data packets a loss figure is measured over, at least.
const LOSS_SAMPLE: u64 = 64;
/// How long a due status waits for the receive queue to empty.
const BACKLOG_WAIT: Duration = Duration::from_millis(800);
/// An object with no symbol for this long: its unheard blocks are asked for by NACK.
const OBJECT_QUIET: Duration = Duration::from_millis(300);
/// An object being decoded with no symbol for this long is listed as needed again.
const REPAIR_GIVE_UP: Duration = Duration::from_secs(3);

/// How a client runs.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    pub name: String,
    pub group: Ipv4Addr,
    pub port: u16,
    pub iface: Ipv4Addr,
    /// Stable across restarts of this device (same device, same target).
    pub client_id: u64,
    /// Shown on the master's console.
    pub device_name: String,
    pub target: PathBuf,
    pub part: Option<String>,
    pub deploy: DeployOptions,
    /// A copy of the image to fetch by HTTP Range what the carousel does not deliver.
    pub fallback: Option<Fallback>,
}

/// What the client tells its caller while it waits.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Notice {
    Waiting {
        group: Ipv4Addr,
    },
    /// Refused: the session started without us; we wait for the next one.
    Queued {
        message: String,
    },
    Registered {
        master: SocketAddr,
    },
    Receiving {
        image_len: u64,
    },
}

#[derive(Default)]
struct ObjDec {
    blocks: Vec<Option<BlockDecoder>>,
    done: Vec<Option<Vec<u8>>>,
    remaining: u32,
    last_rx: HashMap<u8, Instant>,
    last_nack: HashMap<u8, Instant>,
    /// Per block: one past the highest symbol id received (the NACK's `seen`).
    seen: HashMap<u8, u32>,
}

struct Rx {
    announce: Announce,
    /// Object table once the manifest is known; before, only head and tail.
    objects: Option<Vec<Object>>,
    manifest: Option<Manifest>,
    head: Option<Arc<Vec<u8>>>,
    tail: Option<Arc<Vec<u8>>>,
    store: BTreeMap<u32, Arc<Vec<u8>>>,
    wanted: BTreeSet<u32>,
    decoding: HashMap<u32, ObjDec>,
    abort: Option<String>,
    faults: u64,
    /// The manifest digest every packet names (checks what the fallback fetches).
    digest: [u8; 32],
    /// The HTTP Range fallback, when a copy of the image is known.
    range: Option<Arc<RangeFetcher>>,
    /// Why the fallback failed (reported instead of the deploy's truncated read).
    range_error: Option<String>,
    /// When the last data packet of the session arrived.
    last_data: Instant,
    /// Something the master must hear at once (the image's objects became known).
    status_now: bool,
    /// When the master last said it had sent everything asked for ([`Body::Idle`]): a block
    /// whose last symbol came before that will get nothing more unless asked for.
    idle_at: Option<Instant>,
}

impl Rx {
    /// What a client knows once registered: the announcement, nothing received yet (an
    /// empty tail is had already).
    fn new(announce: Announce, digest: [u8; 32], range: Option<Arc<RangeFetcher>>) -> Rx {
        Rx {
            tail: (announce.tail_len == 0).then(|| Arc::new(Vec::new())),
            announce,
            objects: None,
            manifest: None,
            head: None,
            store: BTreeMap::new(),
            wanted: BTreeSet::new(),
            decoding: HashMap::new(),
            abort: None,
            faults: 0,
            digest,
            range,
            range_error: None,
            last_data: Instant::now(),
            status_now: false,
            idle_at: None,
        }
    }

    fn tail_index(&self) -> u32 {
        self.announce.chunks + 1
    }

    fn object(&self, o: u32) -> Option<Object> {
        if let Some(v) = &self.objects {
            return v.get(o as usize).copied();
        }
        if o == 0 {
            Some(Object {
                offset: 0,
                len: self.announce.head_len,
            })
        } else if o == self.tail_index() {
            Some(Object {
                offset: self.announce.image_len - self.announce.tail_len,
                len: self.announce.tail_len,
            })
        } else {
            None
        }
    }

    fn have(&self, o: u32) -> bool {
        if o == 0 {
            self.head.is_some()
        } else if o == self.tail_index() {
            self.tail.is_some()
        } else {
            self.store.contains_key(&o)
        }
    }

    /// Is object `o` inside the window (head and tail always are)?
    fn in_window(&self, o: u32) -> bool {
        if o == 0 || o == self.tail_index() {
            return true;
        }
        if !self.wanted.contains(&o) {
            return false;
        }
        let mut bytes = 0u64;
        for &w in &self.wanted {
            let len = self.object(w).map_or(0, |x| x.len);
            if w == o {
                // The first wanted object always fits, whatever its size.
                return bytes == 0 || bytes + len <= WINDOW_BYTES;
            }
            bytes += len;
            if bytes > WINDOW_BYTES {
                return false;
            }
        }
        false
    }

    /// The first object beyond the window (what the master may not send for this client
    /// now); 0 while the objects are not known.
    fn window_end(&self) -> u32 {
        let Some(objs) = &self.objects else { return 0 };
        let mut bytes = 0u64;
        for &w in &self.wanted {
            let len = objs.get(w as usize).map_or(0, |x| x.len);
            if bytes > 0 && bytes + len > WINDOW_BYTES {
                return w;
            }
            bytes += len;
        }
        objs.len() as u32
    }

    /// What to ask the master for: head and tail until known, then wanted objects not
    /// held and not being repaired.
    fn needs(&self, now: Instant) -> Vec<(u32, u32)> {
        let mut v: Vec<u32> = Vec::new();
        if self.head.is_none() {
            v.push(0);
        }
        // Only what fits in the window: the master sends an object when some client asks
        // for it, so asking for objects this client would drop (beyond its window) costs a
        // send of the whole object for nothing and a second pass later. Asking within the
        // window makes the master's pace follow what the clients can take.
        let mut bytes = 0u64;
        for &w in &self.wanted {
            let len = self.object(w).map_or(0, |x| x.len);
            if bytes > 0 && bytes + len > WINDOW_BYTES {
                break;
            }
            bytes += len;
            if self.store.contains_key(&w) {
                continue;
            }
            // An object being decoded is repaired block by block by the NACKs (see
            // `nacks`): listing it as needed would make the master send the whole object
            // again, every block the client already has included. Only an object that has
            // heard nothing for [`REPAIR_GIVE_UP`] (the master lost track) is asked again.
            let busy = self.decoding.get(&w).is_some_and(|d| {
                d.last_rx
                    .values()
                    .any(|t| now.duration_since(*t) < REPAIR_GIVE_UP)
            });
            if !busy {
                v.push(w);
            }
        }
        if self.tail.is_none() && self.announce.tail_len > 0 {
            v.push(self.tail_index());
        }
        v.sort_unstable();
        v.dedup();
        let mut r: Vec<(u32, u32)> = Vec::new();
        for o in v {
            match r.last_mut() {
                Some((_, z)) if *z == o => *z = o + 1,
                _ => {
                    if r.len() == MAX_NEEDS {
                        break;
                    }
                    r.push((o, o + 1));
                }
            }
        }
        r
    }

    /// `dry`: only say whether some NACK is due (at most one returned, nothing recorded).
    fn nacks(&mut self, now: Instant, dry: bool) -> Vec<Nack> {
        let mut out = Vec::new();
        let idle_at = self.idle_at;
        let lens: HashMap<u32, u64> = self
            .decoding
            .keys()
            .map(|&o| (o, self.object(o).map_or(0, |x| x.len)))
            .collect();
        for (&o, d) in self.decoding.iter_mut() {
            // The master sends an object's blocks in order: once nothing of the object has
            // come for OBJECT_QUIET, a block with no symbol at all (all lost, or its decoder
            // reset after a fault) will not come by itself: ask for all of it.
            let object_quiet = d
                .last_rx
                .values()
                .all(|t| now.duration_since(*t) >= OBJECT_QUIET);
            for (b, dec) in d.blocks.iter().enumerate() {
                if d.done[b].is_some() {
                    continue;
                }
                let b8 = b as u8;
                let missing = match dec {
                    Some(dec) if dec.is_done() => continue,
                    Some(dec) => dec.missing(),
                    None if object_quiet => {
                        let len = lens.get(&o).copied().unwrap_or(0);
                        fec::source_symbols(fec::block_range(len, b as u32).1) + 1
                    }
                    None => continue,
                };
                let b = b8;
                let quiet = d.last_rx.get(&b).is_none_or(|t| {
                    now.duration_since(*t) >= NACK_AFTER || idle_at.is_some_and(|i| *t <= i)
                });
                let last_rx = d.last_rx.get(&b).copied();
                let repeat = d.last_nack.get(&b).is_none_or(|t| {
                    now.duration_since(*t) >= NACK_REPEAT
                        // Symbols of the repair round came after this NACK, then the master
                        // said it had sent everything asked for, and the block is still
                        // short: part of the round was lost. Ask again now, not after
                        // NACK_REPEAT (at the end of a session that wait was the room's).
                        || (idle_at.is_some_and(|i| i > *t) && last_rx.is_some_and(|r| r > *t))
                });
                if quiet && repeat && out.len() < MAX_NACKS {
                    if dry {
                        out.push(Nack {
                            object: o,
                            block: b,
                            missing: 0,
                            seen: 0,
                        });
                        return out;
                    }
                    out.push(Nack {
                        object: o,
                        block: b,
                        missing: missing.min(u32::from(u16::MAX)) as u16,
                        seen: d.seen.get(&b).copied().unwrap_or(0),
                    });
                    super::trace(format_args!(
                        "client: NACK object {o} block {b}: {missing} symbol(s) missing"
                    ));
                    d.last_nack.insert(b, now);
                }
            }
        }
        out
    }
}

type Shared = Arc<(Mutex<Rx>, Condvar)>;

/// Progress of the deploy, for the status reports.
struct Tracked<'a> {
    inner: &'a dyn Progress,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    deploying: AtomicBool,
}

impl Progress for Tracked<'_> {
    fn begin(&self, what: &str, total: Option<u64>) {
        let d = what == "deploying";
        self.deploying.store(d, Ordering::Relaxed);
        if d {
            self.done.store(0, Ordering::Relaxed);
            self.total.store(total.unwrap_or(0), Ordering::Relaxed);
        }
        self.inner.begin(what, total);
    }
    fn advance(&self, bytes: u64) {
        if self.deploying.load(Ordering::Relaxed) {
            self.done.fetch_add(bytes, Ordering::Relaxed);
        }
        self.inner.advance(bytes);
    }
    fn end(&self) {
        self.inner.end();
    }
}

fn net_err(what: &str, e: std::io::Error) -> Error {
    Error::new(ErrorKind::Network, format!("{what}: {e}"))
}

/// Join the session `cfg.name`, receive and deploy its image. Returns the deploy's
/// summary once the master acknowledged our result; any error means the target is not
/// (completely) written.
pub fn run(
    cfg: &ClientConfig,
    progress: &dyn Progress,
    notice: &mut dyn FnMut(Notice),
) -> Result<DeploySummary> {
    let session = super::name_hash(&cfg.name);
    let group = net::group_socket(cfg.group, cfg.port, cfg.iface)?;
    let ctrl = net::send_socket(cfg.iface, 1)?;
    // Registrations and statuses go to the master on the group's control port.
    let control = SocketAddr::V4(SocketAddrV4::new(cfg.group, super::control_port(cfg.port)));
    group
        .set_read_timeout(Some(Duration::from_millis(100)))
        .map_err(|e| net_err("session socket", e))?;
    ctrl.set_nonblocking(true)
        .map_err(|e| net_err("session socket", e))?;
    notice(Notice::Waiting { group: cfg.group });

    // Registration: answer the first master of this session that lets us in.
    let mut refused: Option<[u8; 32]> = None;
    let mut accepted: Option<[u8; 32]> = None;
    let mut last_register = None::<Instant>;
    let mut buf = vec![0u8; MAX_PACKET + 1];
    // The latest announcement heard: once the master accepts us, no need to wait for the next.
    let mut last_ann: Option<(SocketAddr, [u8; 32], Announce)> = None;
    let register = |digest: [u8; 32]| {
        let b = Packet {
            session,
            digest,
            body: Body::Register {
                client: cfg.client_id,
                name: cfg.device_name.clone(),
            },
        }
        .encode();
        let _ = ctrl.send_to(&b, control);
    };
    group
        .set_read_timeout(Some(Duration::from_millis(20)))
        .map_err(|e| net_err("session socket", e))?;
    let (master, digest, announce) = loop {
        if let (Some(d), Some((from, ad, a))) = (accepted, &last_ann) {
            if *ad == d {
                break (*from, d, a.clone());
            }
        }
        // A registration or its reply can be lost: register again on our own timer, not only
        // when an announcement comes (a running master announces only every 0.5 s).
        if let Some((_, d, a)) = &last_ann {
            if accepted != Some(*d) {
                let may = a.state == MasterState::Waiting || a.latejoin || refused != Some(*d);
                if may && last_register.is_none_or(|t: Instant| t.elapsed() >= REGISTER_AGAIN) {
                    last_register = Some(Instant::now());
                    register(*d);
                }
            }
        }
        // Announcements and the master's replies (to every client: ours names our id).
        let Some((pkt, from)) = recv(&group, &mut buf, &session)? else {
            continue;
        };
        match pkt.body {
            Body::Announce(a) => last_ann = Some((from, pkt.digest, a)),
            Body::Reply {
                client,
                code,
                message,
            } if client == cfg.client_id => match code {
                ReplyCode::Accepted => accepted = Some(pkt.digest),
                ReplyCode::Started => {
                    if refused != Some(pkt.digest) {
                        notice(Notice::Queued { message });
                    }
                    refused = Some(pkt.digest);
                }
            },
            _ => {}
        }
    };
    notice(Notice::Registered { master });
    notice(Notice::Receiving {
        image_len: announce.image_len,
    });

    let range = cfg
        .fallback
        .clone()
        .map(|f| Arc::new(RangeFetcher::new(f, announce.image_len)));
    let shared: Shared = Arc::new((
        Mutex::new(Rx::new(announce, digest, range.clone())),
        Condvar::new(),
    ));
    let done = Arc::new(AtomicU64::new(0));
    let total = Arc::new(AtomicU64::new(0));
    let finished: Arc<Mutex<Option<(ClientState, String)>>> = Arc::new(Mutex::new(None));
    let acked = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));

    let rx_thread = {
        let ctx = RxCtx {
            shared: shared.clone(),
            group,
            ctrl,
            session,
            digest,
            control,
            client: cfg.client_id,
            done: done.clone(),
            total: total.clone(),
            finished: finished.clone(),
            acked: acked.clone(),
            stop: stop.clone(),
        };
        std::thread::Builder::new()
            .name("mcast-rx".into())
            .spawn(move || ctx.run())
            .map_err(|e| Error::io("starting the receiver", e))?
    };

    let result = (|| -> Result<DeploySummary> {
        // The head (and tail) first: the image's identity and its manifest.
        {
            let (m, cv) = &*shared;
            let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
            while rx.objects.is_none() {
                if let Some(why) = rx.abort.clone() {
                    // The carousel is over before the manifest came: the head and tail
                    // from the copy, checked against the digest the packets named.
                    if rx.range.is_some() {
                        drop(rx);
                        let (tail, missing) = {
                            let rx = m.lock().unwrap_or_else(|e| e.into_inner());
                            let t = rx.tail_index();
                            (t, [0, t].map(|o| !rx.have(o)))
                        };
                        for (o, _) in [0, tail].into_iter().zip(missing).filter(|x| x.1) {
                            range_fetch(&shared, o)
                                .map_err(|e| Error::new(ErrorKind::Network, e.to_string()))?;
                        }
                        rx = m.lock().unwrap_or_else(|e| e.into_inner());
                        if rx.objects.is_none() {
                            return Err(Error::corrupt(
                                "session image: the copy's manifest is not the one the packets name",
                            ));
                        }
                        break;
                    }
                    return Err(Error::new(ErrorKind::Network, why));
                }
                rx = cv
                    .wait_timeout(rx, Duration::from_millis(200))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        }
        let server = LocalSource::start(shared.clone())?;
        let mut opts = cfg.deploy.clone();
        // Waiting for the next pass is not a stalled server; a silent master is caught
        // by the receiver, which then fails every open request.
        opts.http.timeout = Some(Duration::from_secs(3600));
        let tracked = Tracked {
            inner: progress,
            done: done.clone(),
            total: total.clone(),
            deploying: AtomicBool::new(false),
        };
        // The head through the loopback source, the chunks from the feed as they arrive.
        let mut feed = SessionFeed {
            shared: shared.clone(),
        };
        let r = OpenedImage::open(&Location::Url(server.url.clone()), &opts.http).and_then(|o| {
            o.deploy_fed(&cfg.target, cfg.part.as_deref(), &opts, &tracked, &mut feed)
        });
        server.stop();
        super::trace(format_args!(
            "client: deploy returned ({})",
            if r.is_ok() { "ok" } else { "error" }
        ));
        // When the receiver gave up (silent master, session ended), that is the reason,
        // not the truncated read the deploy saw.
        let (aborted, range_error) = {
            let rx = shared.0.lock().unwrap_or_else(|e| e.into_inner());
            (rx.abort.clone(), rx.range_error.clone())
        };
        match (r, aborted, range_error) {
            (Err(e), _, Some(why)) => Err(Error::new(
                ErrorKind::Network,
                format!("fetching the missing chunks by HTTP Range: {why} ({e})"),
            )),
            (Err(e), Some(why), None) => {
                if e.to_string().contains(&why) {
                    Err(e)
                } else {
                    Err(Error::new(ErrorKind::Network, format!("{why} ({e})")))
                }
            }
            (Ok(mut s), _, _) => {
                if let Some(f) = &range {
                    let n = f.objects.load(Ordering::Relaxed);
                    if n > 0 {
                        s.notes.push(format!(
                            "{n} object(s) the session did not deliver in time ({} bytes) fetched by HTTP Range from {}",
                            f.bytes.load(Ordering::Relaxed),
                            f.location()
                        ));
                    }
                }
                Ok(s)
            }
            (r, _, _) => r,
        }
    })();

    // Report the result until the master acknowledges it (a few seconds at most).
    *finished.lock().unwrap_or_else(|e| e.into_inner()) = Some(match &result {
        Ok(_) => (ClientState::Done, String::new()),
        Err(e) => (ClientState::Failed, e.to_string()),
    });
    let until = Instant::now() + Duration::from_secs(5);
    while !acked.load(Ordering::Relaxed) && Instant::now() < until {
        let aborted = shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .abort
            .is_some();
        if aborted {
            break;
        }
        // Short: this is the device's last wait, and the whole room ends with its
        // slowest device.
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    let _ = rx_thread.join();
    result
}

/// One packet of our session from the group, or `None` after the read timeout.
fn recv(
    sock: &UdpSocket,
    buf: &mut [u8],
    session: &[u8; 32],
) -> Result<Option<(Packet, SocketAddr)>> {
    match sock.recv_from(buf) {
        Ok((n, from)) => Ok(Packet::parse(&buf[..n])
            .ok()
            .filter(|p| &p.session == session)
            .map(|p| (p, from))),
        Err(e)
            if matches!(
                e.kind(),
                IoKind::WouldBlock | IoKind::TimedOut | IoKind::Interrupted
            ) =>
        {
            Ok(None)
        }
        Err(e) => Err(net_err("receiving the session", e)),
    }
}

struct RxCtx {
    shared: Shared,
    group: UdpSocket,
    ctrl: UdpSocket,
    session: [u8; 32],
    digest: [u8; 32],
    /// The group's control port: where the master listens.
    control: SocketAddr,
    client: u64,
    done: Arc<AtomicU64>,
    total: Arc<AtomicU64>,
    finished: Arc<Mutex<Option<(ClientState, String)>>>,
    acked: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl RxCtx {
    fn run(self) {
        let mut heard = Instant::now();
        let mut last_status = Instant::now() - STATUS_EVERY;
        let mut last_nack_check = Instant::now();
        let mut final_sent = false;
        let tag: [u8; TAG_LEN] = data_tag(&self.session, &self.digest);
        // Loss: data packets the master's sequence says were sent, against those that came.
        let (mut prev_seq, mut expected, mut got) = (None::<u16>, 0u64, 0u64);
        let mut loss = 0u16;
        // The sequence number the current loss window starts at, and the one the reported
        // figure was measured from (the master steers its rate only on figures measured
        // from packets it sent after its last rate change).
        let (mut window_from, mut loss_from) = (None::<u16>, 0u16);
        let _ = self.group.set_read_timeout(Some(Duration::from_millis(20)));
        let mut batch = net::RecvBatch::new(RECV_BATCH, MAX_PACKET + 1);
        let coalesce = net::recv_queue_bytes(&self.group) >= COALESCE_MIN_QUEUE;
        let mut count = 0;
        let mut idle_heard = false;
        let mut urgent_send = false;
        let mut repeat: Option<(Instant, Vec<u8>)> = None;
        while !self.stop.load(Ordering::Relaxed) {
            if coalesce && count > 0 && count < RECV_BATCH / 2 {
                std::thread::sleep(COALESCE);
            }
            count = match batch.recv(&self.group) {
                Ok(n) => n,
                Err(e) => {
                    self.fail(net_err("receiving the session", e).to_string());
                    return;
                }
            };
            let mut symbols: Vec<Data<'_>> = Vec::with_capacity(count);
            for i in 0..count {
                let b = batch.get(i);
                if is_data(b) {
                    // Data of this session and image only: the tag names both.
                    let Ok(d) = Data::parse(b) else { continue };
                    if d.tag != tag {
                        continue;
                    }
                    match prev_seq.map(|p| d.seq.wrapping_sub(p)) {
                        None => {
                            expected += 1;
                            window_from.get_or_insert(d.seq);
                            prev_seq = Some(d.seq);
                        }
                        Some(gap) if gap > 0 && gap < 0x8000 => {
                            expected += u64::from(gap);
                            let first = prev_seq.map_or(d.seq, |p| p.wrapping_add(1));
                            window_from.get_or_insert(first);
                            prev_seq = Some(d.seq);
                        }
                        // A duplicate or a reordered packet: nothing more expected.
                        Some(_) => {}
                    }
                    got += 1;
                    symbols.push(d);
                } else if let Ok(p) = Packet::parse(b) {
                    if p.session == self.session && p.digest == self.digest {
                        heard = Instant::now();
                        if let Body::End { aborted } = p.body {
                            let unfinished = self
                                .finished
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .is_none();
                            if aborted || unfinished {
                                self.fail("the master ended the session before this device had the whole image".into());
                            } else {
                                // The master ends a session only when it holds every
                                // client's result, ours included: an acknowledgement too
                                // (the Ack itself may have been lost).
                                self.acked.store(true, Ordering::Relaxed);
                            }
                        } else if let Body::Ack { client } = p.body {
                            if client == self.client {
                                self.acked.store(true, Ordering::Relaxed);
                            }
                        } else if p.body == Body::Idle {
                            self.shared
                                .0
                                .lock()
                                .unwrap_or_else(|e| e.into_inner())
                                .idle_at = Some(Instant::now());
                            idle_heard = true;
                        }
                    }
                }
            }
            if !symbols.is_empty() {
                heard = Instant::now();
                self.symbols(&symbols);
            }
            if heard.elapsed() > MASTER_SILENCE {
                self.fail(format!(
                    "nothing heard from the master for {} s",
                    MASTER_SILENCE.as_secs()
                ));
            }
            // With packets still queued (a busy device falls behind the master), what this
            // device lacks may be in the queue: asking for it then would make the master
            // send it again. So a status waits until the queue is empty (a device keeping
            // up empties it within a few packets); after BACKLOG_WAIT it goes anyway, with
            // progress and loss only, and no needs or NACKs.
            // Behind: the last batch was full and more is queued. A few datagrams that came
            // while the batch was handled are no backlog: with the wait between small
            // batches (COALESCE) there nearly always are some, and a slow-link device whose
            // statuses waited for an empty queue was recognised as slow 0.8 s late.
            let behind = || count == RECV_BATCH && net::backlogged(&self.group);
            let mut due = last_status.elapsed();
            if due < STATUS_EVERY
                && (last_nack_check.elapsed() >= NACK_CHECK || std::mem::take(&mut idle_heard))
            {
                last_nack_check = Instant::now();
                let now = Instant::now();
                let (nack_due, urgent) = {
                    let mut rx = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
                    let u = std::mem::take(&mut rx.status_now);
                    (!rx.nacks(now, true).is_empty(), u)
                };
                // The result goes out as soon as the deploy has it.
                let result = !final_sent
                    && self
                        .finished
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .is_some();
                final_sent |= result;
                if urgent || result || (nack_due && !behind()) {
                    due = STATUS_EVERY;
                    urgent_send = true;
                }
            }
            if due >= STATUS_EVERY {
                let backlog = behind();
                if backlog && due < STATUS_EVERY + BACKLOG_WAIT {
                    continue;
                }
                last_status = Instant::now();
                // Loss is measured over at least LOSS_SAMPLE packets: one lost packet of
                // the first four is not 25 % loss (the master would take this device for
                // one on a bad link and serve it apart). Until then the last figure stands.
                if expected >= LOSS_SAMPLE {
                    loss = (expected.saturating_sub(got) * 1000 / expected).min(1000) as u16;
                    loss_from = window_from.take().unwrap_or(0);
                    (expected, got) = (0, 0);
                }
                let sent = self.status(loss, loss_from, backlog);
                if std::mem::take(&mut urgent_send) {
                    repeat = Some((Instant::now() + REPEAT_URGENT, sent));
                }
            }
            // An urgent status goes twice: the room waits on it (the warm-up on every
            // device's "I have the head and tail", a repair round on its NACK), and a lost
            // one cost the next status or NACK repeat, 0.15-0.2 s. The copy is the same
            // packet: a NACK in it that a repair round has answered meanwhile is known by
            // its `seen` and not answered twice.
            if repeat.as_ref().is_some_and(|(at, _)| Instant::now() >= *at) {
                if let Some((_, b)) = repeat.take() {
                    let _ = self.ctrl.send_to(&b, self.control);
                }
            }
        }
    }

    fn fail(&self, why: String) {
        let (m, cv) = &*self.shared;
        let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
        if rx.abort.is_none() {
            rx.abort = Some(why);
        }
        cv.notify_all();
    }

    /// Send a status; returns the packet sent.
    fn status(&self, loss_permille: u16, loss_from: u16, backlog: bool) -> Vec<u8> {
        let now = Instant::now();
        let (needs, nacks) = if backlog {
            (Vec::new(), Vec::new())
        } else {
            let mut rx = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
            (rx.needs(now), rx.nacks(now, false))
        };
        let fin = self
            .finished
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let (state, message) = fin.unwrap_or((ClientState::Receiving, String::new()));
        super::trace(format_args!(
            "client: status, loss {loss_permille} per mille{}, {} needed range(s), {} NACK(s)",
            if backlog { ", behind" } else { "" },
            needs.len(),
            nacks.len()
        ));
        let window_end = self
            .shared
            .0
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .window_end();
        let b = Packet {
            session: self.session,
            digest: self.digest,
            body: Body::Status(Status {
                client: self.client,
                state,
                bytes_done: self.done.load(Ordering::Relaxed),
                bytes_total: self.total.load(Ordering::Relaxed),
                loss_permille,
                loss_from,
                window_end,
                needs: if state == ClientState::Receiving {
                    needs
                } else {
                    Vec::new()
                },
                nacks: if state == ClientState::Receiving {
                    nacks
                } else {
                    Vec::new()
                },
                message,
            }),
        }
        .encode();
        let _ = self.ctrl.send_to(&b, self.control);
        b
    }

    /// Take a batch of symbols under one lock.
    fn symbols(&self, batch: &[Data<'_>]) {
        let (m, cv) = &*self.shared;
        let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
        rx.last_data = Instant::now();
        let mut completed = false;
        for d in batch {
            completed |= symbol(&mut rx, d.object, d.block, d.esi, d.symbol, &self.digest);
        }
        if completed {
            cv.notify_all();
        }
    }
}

/// Feed one symbol; `true` when it completed an object.
fn symbol(rx: &mut Rx, object: u32, block: u8, esi: u32, symbol: &[u8], digest: &[u8; 32]) -> bool {
    {
        if rx.have(object) {
            return false;
        }
        let Some(obj) = rx.object(object) else {
            return false;
        };
        let blocks = fec::block_count(obj.len);
        if u32::from(block) >= blocks {
            return false;
        }
        if !rx.decoding.contains_key(&object) {
            if !rx.in_window(object) {
                return false;
            }
            rx.decoding.insert(
                object,
                ObjDec {
                    blocks: (0..blocks).map(|_| None).collect(),
                    done: (0..blocks).map(|_| None).collect(),
                    remaining: blocks,

                    ..ObjDec::default()
                },
            );
        }
        let now = Instant::now();
        let d = rx.decoding.get_mut(&object).expect("inserted above");
        let b = block as usize;
        if d.done[b].is_some() {
            return false;
        }
        d.last_rx.insert(block, now);
        let seen = d.seen.entry(block).or_insert(0);
        *seen = (*seen).max(esi.saturating_add(1));
        let dec = d.blocks[b].get_or_insert_with(|| {
            BlockDecoder::new(block, fec::block_range(obj.len, u32::from(block)).1)
        });
        if dec.add(esi, symbol) {
            d.done[b] = dec.take();
            d.blocks[b] = None;
            d.remaining -= 1;
        } else if dec.faulted {
            // Start this block afresh; the symbols so far are lost.
            d.blocks[b] = None;
        }
        if d.remaining > 0 {
            return false;
        }
        let d = rx.decoding.remove(&object).expect("present");
        // Into a reused buffer (see io::pool): a chunk's object is a few MiB.
        let mut data = crate::io::pool::take(obj.len as usize);
        data.reserve_exact(obj.len as usize);
        for part in d.done.into_iter().flatten() {
            data.extend_from_slice(&part);
            crate::io::pool::give(part);
        }
        accept(rx, object, data, digest);
        true
    }
}

/// A decoded object: check it and keep it, or drop it (it stays needed).
fn accept(rx: &mut Rx, object: u32, data: Vec<u8>, digest: &[u8; 32]) {
    super::trace(format_args!(
        "client: object {object} decoded ({} bytes)",
        data.len()
    ));
    let tail = rx.tail_index();
    if object == 0 || object == tail {
        if object == 0 {
            rx.head = Some(Arc::new(data));
        } else {
            rx.tail = Some(Arc::new(data));
        }
        if let (Some(h), Some(t)) = (rx.head.clone(), rx.tail.clone()) {
            if rx.objects.is_none() {
                match table(&rx.announce, &h, &t, digest) {
                    Ok((m, objs)) => {
                        // The deploy will read the chunks in image order: ask for all of
                        // them now, so every client of the room wants the same objects from
                        // the first pass on. Chunks a resumed deploy skips are dropped when
                        // its first request shows it (see `serve`).
                        rx.wanted.extend(1..=m.entries.len() as u32);
                        rx.manifest = Some(m);
                        rx.objects = Some(objs);
                        rx.status_now = true;
                    }
                    Err(_) => {
                        // Not the image the packets name: fetch both again.
                        rx.faults += 1;
                        rx.head = None;
                        if rx.announce.tail_len > 0 {
                            rx.tail = None;
                        }
                    }
                }
            }
        }
        return;
    }
    let ok = (|| {
        let m = rx.manifest.as_ref()?;
        let e = m.entries.get(object as usize - 1)?;
        let hb: &[u8; CHUNK_HEADER_LEN] = data.get(..CHUNK_HEADER_LEN)?.try_into().ok()?;
        let h = ChunkHeader::decode(hb, "").ok()?;
        let payload = &data[CHUNK_HEADER_LEN..];
        (h == e.header
            && payload.len() as u64 == u64::from(h.comp_len)
            && crc32fast::hash(payload) == h.crc32)
            .then_some(())
    })();
    if ok.is_some() && rx.wanted.contains(&object) {
        rx.store.insert(object, Arc::new(data));
    } else {
        if ok.is_none() {
            rx.faults += 1;
        }
        crate::io::pool::give(data);
    }
}

/// An object's buffer back to the pool once nothing else holds it.
fn recycle(data: Option<Arc<Vec<u8>>>) {
    if let Some(v) = data.and_then(|a| Arc::try_unwrap(a).ok()) {
        crate::io::pool::give(v);
    }
}

/// The manifest and the object table from the head and tail, checked against the digest
/// every packet carries.
fn table(
    a: &Announce,
    head: &[u8],
    tail: &[u8],
    digest: &[u8; 32],
) -> Result<(Manifest, Vec<Object>)> {
    let r = ImageReader::open(head)?;
    let manifest = match r.sealed {
        Some(s) => s.manifest,
        None => {
            let mlen = tail
                .len()
                .checked_sub(FOOTER_LEN)
                .ok_or_else(|| Error::corrupt("session image: tail shorter than a footer"))?;
            Manifest::decode(&tail[..mlen])?
        }
    };
    if manifest.digest() != hex::encode(digest) {
        return Err(Error::corrupt(
            "session image: the manifest received is not the one the packets name",
        ));
    }
    if manifest.entries.len() as u64 != u64::from(a.chunks) {
        return Err(Error::corrupt(
            "session image: chunk count differs from the announcement",
        ));
    }
    let objs = super::objects(
        a.image_len,
        a.head_len,
        a.tail_len,
        manifest
            .entries
            .iter()
            .map(|e| (e.image_offset, e.record_len())),
    )?;
    Ok((manifest, objs))
}

/// The loopback HTTP range source the deploy reads.
struct LocalSource {
    url: String,
    stop: Arc<AtomicBool>,
    addr: SocketAddr,
}

impl LocalSource {
    fn start(shared: Shared) -> Result<LocalSource> {
        let l = TcpListener::bind("127.0.0.1:0").map_err(|e| net_err("local image source", e))?;
        let addr = l
            .local_addr()
            .map_err(|e| net_err("local image source", e))?;
        let token = hex::encode(rand_token());
        let path = format!("/{token}/session.img");
        let stop = Arc::new(AtomicBool::new(false));
        let (p2, s2) = (path.clone(), stop.clone());
        std::thread::Builder::new()
            .name("mcast-src".into())
            .spawn(move || {
                for conn in l.incoming() {
                    if s2.load(Ordering::Relaxed) {
                        break;
                    }
                    let Ok(c) = conn else { continue };
                    let (sh, p) = (shared.clone(), p2.clone());
                    let _ = std::thread::Builder::new()
                        .name("mcast-req".into())
                        .spawn(move || {
                            if let Err(e) = serve(c, &sh, &p) {
                                super::trace(format_args!("session: local source: {e}"));
                            }
                        });
                }
            })
            .map_err(|e| Error::io("starting the local image source", e))?;
        Ok(LocalSource {
            url: format!("http://{addr}{path}"),
            stop,
            addr,
        })
    }

    fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
        // Wake the accept loop.
        let _ = TcpStream::connect(self.addr);
    }
}

fn rand_token() -> [u8; 16] {
    let mut t = [0u8; 16];
    // getrandom through rand_core (already used for key generation).
    use rand_core::RngCore;
    rand_core::OsRng.fill_bytes(&mut t);
    t
}

fn serve(c: TcpStream, shared: &Shared, path: &str) -> std::io::Result<()> {
    let mut r = BufReader::new(c.try_clone()?);
    let mut w = c;
    let mut line = String::new();
    let mut head = Vec::new();
    loop {
        line.clear();
        if r.by_ref().take(8192).read_line(&mut line)? == 0 {
            return Ok(());
        }
        if line == "\r\n" || line == "\n" {
            break;
        }
        head.push(line.trim_end().to_string());
        if head.len() > 64 {
            return Ok(());
        }
    }
    let req: Vec<&str> = head
        .first()
        .map(|l| l.split(' ').collect())
        .unwrap_or_default();
    let (method, p) = (
        req.first().copied().unwrap_or(""),
        req.get(1).copied().unwrap_or(""),
    );
    let len = shared
        .0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .announce
        .image_len;
    if p != path || !(method == "GET" || method == "HEAD") {
        write!(
            w,
            "HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
        )?;
        return Ok(());
    }
    let range = head.iter().find_map(|h| {
        let (k, v) = h.split_once(':')?;
        k.eq_ignore_ascii_case("range")
            .then(|| v.trim().to_string())
    });
    let (from, to) = match range.as_deref().and_then(|v| v.strip_prefix("bytes=")) {
        Some(spec) => {
            let (a, b) = spec.split_once('-').unwrap_or((spec, ""));
            let a: u64 = a.parse().unwrap_or(u64::MAX);
            let b: u64 = if b.is_empty() {
                len.saturating_sub(1)
            } else {
                b.parse().unwrap_or(0)
            };
            if a > b || b >= len {
                write!(w, "HTTP/1.1 416 Range Not Satisfiable\r\nContent-Range: bytes */{len}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")?;
                return Ok(());
            }
            (a, b + 1)
        }
        None => (0, len),
    };
    if range.is_some() {
        write!(
            w,
            "HTTP/1.1 206 Partial Content\r\nContent-Range: bytes {from}-{}/{len}\r\n",
            to - 1
        )?;
    } else {
        write!(w, "HTTP/1.1 200 OK\r\n")?;
    }
    write!(
        w,
        "Content-Length: {}\r\nAccept-Ranges: bytes\r\nContent-Type: application/octet-stream\r\nConnection: close\r\n\r\n",
        to - from
    )?;
    if method == "HEAD" || from == to {
        return w.flush();
    }
    // The objects this request covers (the deploy reads the head, and with it the chunks
    // that start in the image's first bytes; the chunks themselves come through the feed).
    let objs: Vec<(u32, Object)> = {
        let rx = shared.0.lock().unwrap_or_else(|e| e.into_inner());
        let Some(table) = rx.objects.as_ref() else {
            return Ok(());
        };
        table
            .iter()
            .enumerate()
            .filter(|(_, o)| o.offset < to && o.offset + o.len > from)
            .map(|(i, o)| (i as u32, *o))
            .collect()
    };
    send_objects(&mut w, shared, objs, from, to)
}

/// The deploy's chunks: the objects the session delivers, each handed over as soon as it
/// is received and checked (CRC32, and its header against the manifest), whatever its place
/// in the image. The deploy checks each again, then decompresses it and checks its SHA-256
/// before writing it.
struct SessionFeed {
    shared: Shared,
}

impl ChunkFeed for SessionFeed {
    fn start(&mut self, wanted: &[bool]) -> Result<()> {
        let mut rx = self.shared.0.lock().unwrap_or_else(|e| e.into_inner());
        for (i, &w) in wanted.iter().enumerate() {
            let o = i as u32 + 1;
            if w {
                rx.wanted.insert(o);
            } else {
                // On the target already (a resumed deploy), or a zero chunk.
                rx.wanted.remove(&o);
                rx.decoding.remove(&o);
                recycle(rx.store.remove(&o));
            }
        }
        rx.status_now = true;
        super::trace(format_args!(
            "client: the deploy wants {} of {} chunks",
            rx.wanted.len(),
            wanted.len()
        ));
        Ok(())
    }

    fn next(&mut self) -> Result<Option<ChunkRecord>> {
        let (m, cv) = (&self.shared.0, &self.shared.1);
        let since = Instant::now();
        let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            let tail = rx.tail_index();
            let held = rx
                .store
                .keys()
                .copied()
                .find(|o| *o != tail && rx.wanted.contains(o));
            if let Some(o) = held {
                let obj = rx.object(o).expect("a held object is in the table");
                let data = rx.store.remove(&o).expect("held");
                rx.wanted.remove(&o);
                drop(rx);
                super::trace(format_args!(
                    "client: object {o} handed to the deploy (waited {} ms)",
                    since.elapsed().as_millis()
                ));
                let mut data = Arc::try_unwrap(data).unwrap_or_else(|a| a.to_vec());
                let hb: [u8; CHUNK_HEADER_LEN] = data
                    .get(..CHUNK_HEADER_LEN)
                    .and_then(|b| b.try_into().ok())
                    .ok_or_else(|| Error::corrupt(format!("session object {o}: too short")))?;
                let header = ChunkHeader::decode(&hb, "")?;
                data.drain(..CHUNK_HEADER_LEN);
                return Ok(Some(ChunkRecord {
                    header,
                    image_offset: obj.offset,
                    payload: data,
                }));
            }
            if rx.wanted.is_empty() {
                return Ok(None);
            }
            // The carousel is over, or nothing of it has reached this device for a while
            // (cut off, or its master gone silent): the next missing object from the copy.
            // A device that still receives waits for the next pass, as the others do.
            if let Some(f) = rx.range.clone() {
                let silent = since.elapsed() >= f.after() && rx.last_data.elapsed() >= f.after();
                if rx.abort.is_some() || silent {
                    let o = *rx.wanted.iter().next().expect("not empty");
                    drop(rx);
                    range_fetch(&self.shared, o)
                        .map_err(|e| Error::new(ErrorKind::Network, e.to_string()))?;
                    rx = m.lock().unwrap_or_else(|e| e.into_inner());
                    continue;
                }
            }
            if let Some(why) = &rx.abort {
                return Err(Error::new(ErrorKind::Network, why.clone()));
            }
            rx = cv
                .wait_timeout(rx, Duration::from_millis(500))
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

/// Write the bytes `from..to` of `objs` to the deploy, each object once it has arrived (or,
/// when the session is over or silent, fetched from the copy). They stay held: a chunk read
/// with the head goes to the deploy again through the feed.
fn send_objects(
    w: &mut TcpStream,
    shared: &Shared,
    objs: Vec<(u32, Object)>,
    from: u64,
    to: u64,
) -> std::io::Result<()> {
    let (m, cv) = (&shared.0, &shared.1);
    for (i, o) in objs {
        let since = Instant::now();
        let data = {
            let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let have = rx.have(i);
                // The carousel is over, or nothing of it has reached this device for a
                // while (cut off, or its master gone silent): from the copy. A device that
                // still receives waits for the next pass, as the others do.
                if let (false, Some(f)) = (have, rx.range.clone()) {
                    let silent =
                        since.elapsed() >= f.after() && rx.last_data.elapsed() >= f.after();
                    if rx.abort.is_some() || silent {
                        rx.wanted.insert(i);
                        drop(rx);
                        range_fetch(shared, i)?;
                        rx = m.lock().unwrap_or_else(|e| e.into_inner());
                        continue;
                    }
                }
                if let Some(why) = &rx.abort {
                    return Err(std::io::Error::other(why.clone()));
                }
                let d = if i == 0 {
                    rx.head.clone()
                } else if i == rx.tail_index() {
                    rx.tail.clone()
                } else {
                    rx.store.get(&i).cloned()
                };
                if let Some(d) = d {
                    break d;
                }
                rx = cv
                    .wait_timeout(rx, Duration::from_millis(500))
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
        };
        let s = from.max(o.offset) - o.offset;
        let e = to.min(o.offset + o.len) - o.offset;
        w.write_all(&data[s as usize..e as usize])?;
    }
    w.flush()
}

/// Fetch object `i` from the fallback copy and hand it to [`accept`], which checks it as it
/// checks a decoded object. An object that fails the check is an error: the copy is not
/// the session's image.
fn range_fetch(shared: &Shared, i: u32) -> std::io::Result<()> {
    let m = &shared.0;
    let (f, obj, digest) = {
        let rx = m.lock().unwrap_or_else(|e| e.into_inner());
        let Some(f) = rx.range.clone() else {
            return Err(std::io::Error::other("no copy of the image to fetch from"));
        };
        let Some(obj) = rx.object(i) else {
            return Err(std::io::Error::other(format!(
                "object {i} is not in the image"
            )));
        };
        (f, obj, rx.digest)
    };
    super::trace(format_args!(
        "client: object {i} by HTTP Range from {}",
        f.location()
    ));
    let fail = |why: String| {
        let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
        rx.range_error.get_or_insert_with(|| why.clone());
        shared.1.notify_all();
        std::io::Error::other(why)
    };
    let data = f.fetch(i, obj).map_err(|e| fail(e.to_string()))?;
    let mut rx = m.lock().unwrap_or_else(|e| e.into_inner());
    let faults = rx.faults;
    accept(&mut rx, i, data, &digest);
    let tail = rx.tail_index();
    let bad = rx.faults != faults
        || ((i == 0 || i == tail) && !rx.have(i))
        || (i != 0 && i != tail && rx.wanted.contains(&i) && !rx.store.contains_key(&i));
    drop(rx);
    shared.1.notify_all();
    if bad {
        return Err(fail(format!(
            "{}: object {i} does not match the session's manifest (not the same image)",
            f.location()
        )));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::multicast::packet::SYMBOL_SIZE;

    /// A receiver that knows only the announcement: a 10-symbol head, no chunks, no tail.
    fn rx() -> Rx {
        let head = 10 * SYMBOL_SIZE as u64;
        let announce = Announce {
            state: MasterState::Running,
            latejoin: false,
            chunks: 0,
            image_len: head,
            head_len: head,
            tail_len: 0,
        };
        Rx::new(announce, [0; 32], None)
    }

    /// A routine status goes once, every STATUS_EVERY; an urgent one (here: the image's
    /// objects just became known) goes twice, REPEAT_URGENT apart, byte for byte: the
    /// receive loop on real sockets, a master's control socket on loopback.
    #[test]
    fn an_urgent_status_goes_twice_and_a_routine_one_once() {
        let lo = Ipv4Addr::LOCALHOST;
        let group = Ipv4Addr::new(231, 77, 12, 34);
        let port = 20_000 + (std::process::id() % 20_000) as u16 * 2;
        let control = super::super::control_port(port);
        let master = net::group_socket(group, control, lo).unwrap();
        master
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        let shared: Shared = Arc::new((Mutex::new(rx()), Condvar::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let ctx = RxCtx {
            shared: shared.clone(),
            group: net::group_socket(group, port, lo).unwrap(),
            ctrl: net::send_socket(lo, 1).unwrap(),
            session: [1; 32],
            digest: [0; 32],
            control: SocketAddr::V4(SocketAddrV4::new(group, control)),
            client: 7,
            done: Arc::new(AtomicU64::new(0)),
            total: Arc::new(AtomicU64::new(0)),
            finished: Arc::new(Mutex::new(None)),
            acked: Arc::new(AtomicBool::new(false)),
            stop: stop.clone(),
        };
        let t = std::thread::spawn(move || ctx.run());
        let next = || {
            let mut b = vec![0u8; MAX_PACKET + 1];
            let (n, _) = master.recv_from(&mut b).expect("a status");
            b.truncate(n);
            let p = Packet::parse(&b).expect("a packet of ours");
            assert!(
                matches!(p.body, Body::Status(ref s) if s.client == 7),
                "{p:?}"
            );
            (Instant::now(), b)
        };
        // Routine: the first at once, the next STATUS_EVERY later, not a copy 25 ms later.
        let (t0, _) = next();
        let (t1, _) = next();
        assert!(
            t1 - t0 >= STATUS_EVERY - Duration::from_millis(10),
            "{:?}",
            t1 - t0
        );
        // Urgent: the status and its copy, then nothing until the next routine one.
        shared.0.lock().unwrap().status_now = true;
        let (u0, a) = next();
        let (u1, b) = next();
        assert_eq!(a, b, "the copy is the same packet");
        let gap = u1 - u0;
        assert!(
            gap >= REPEAT_URGENT - Duration::from_millis(5) && gap < STATUS_EVERY / 2,
            "{gap:?}"
        );
        let (u2, _) = next();
        assert!(
            u2 - u0 >= STATUS_EVERY - Duration::from_millis(10),
            "{:?}",
            u2 - u0
        );
        stop.store(true, Ordering::Relaxed);
        t.join().unwrap();
    }

    /// A block whose symbols stopped coming is asked for after NACK_AFTER; once the master
    /// said it has sent everything (Idle, heard after the block's last symbol), at once.
    #[test]
    fn after_the_masters_idle_a_block_that_lacks_symbols_is_asked_for_at_once() {
        let mut r = rx();
        let sym = [0u8; SYMBOL_SIZE];
        assert!(!symbol(&mut r, 0, 0, 0, &sym, &[0; 32]));
        assert!(!symbol(&mut r, 0, 0, 1, &sym, &[0; 32]));
        let t0 = Instant::now();
        assert!(
            r.nacks(t0, false).is_empty(),
            "the block may still be coming"
        );
        // Idle heard before the block's last symbol: nothing changes.
        r.idle_at = Some(t0 - Duration::from_millis(1));
        assert!(r.nacks(Instant::now(), false).is_empty());
        // Idle heard after it: the NACK goes at once, with the count and what was seen.
        r.idle_at = Some(Instant::now());
        let n = r.nacks(Instant::now(), false);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!(
            (n[0].object, n[0].block, n[0].missing, n[0].seen),
            (0, 0, 8, 2)
        );
        // And not again before the NACK's repeat time,
        let pause = || std::thread::sleep(Duration::from_millis(2));
        pause();
        assert!(r.nacks(Instant::now(), false).is_empty());
        // not even after another Idle, while nothing of the block came since the NACK (the
        // Idle may have crossed it: the repair is on its way),
        r.idle_at = Some(Instant::now());
        pause();
        assert!(r.nacks(Instant::now(), false).is_empty());
        // but once part of the repair came and then the master was idle again: the rest
        // of the round was lost, asked for at once.
        assert!(!symbol(&mut r, 0, 0, 9, &sym, &[0; 32]));
        pause();
        assert!(r.nacks(Instant::now(), false).is_empty(), "before Idle");
        r.idle_at = Some(Instant::now());
        let n = r.nacks(Instant::now(), false);
        assert_eq!(n.len(), 1, "{n:?}");
        assert_eq!((n[0].missing, n[0].seen), (7, 10));
        // Without Idle, the same block is asked for once it has been quiet for NACK_AFTER.
        let mut r = rx();
        assert!(!symbol(&mut r, 0, 0, 3, &sym, &[0; 32]));
        assert_eq!(r.nacks(Instant::now() + NACK_AFTER, false).len(), 1);
    }
}
