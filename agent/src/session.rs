//! `img -session NAME`: multicast sessions as ZENworks operators know them (seed 002).
//!
//! ```text
//! img -session NAME -master [-clients=N] [-timeout=MIN] [-throttle=MS] [-comp=0..9]
//!     [-addr=A.B.C.D] [-iface=NAME] [-latejoin] (-image=FILE | [-disk=DISK] [-part=N|LABEL])
//! img -session NAME -client [-disk=DISK] [-part=N|LABEL] [-addr=..] [-iface=..] [-trust=KEY.pub]..
//!     [-server=URL [-ca=FILE]]
//! img -session NAME            (no role: press m to become the master, then s to start)
//! ```
//! `-s NAME` abbreviates `-session NAME` and `-m` abbreviates `-master` (seed 002). The protocol is in `imgengine::multicast` and `docs/multicast.md`; this
//! module is the operator's side: start rules, keys, console output, exit codes.

use std::collections::HashMap;
use std::io::{IsTerminal, Read, Write};
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::mpsc::{self, Receiver};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use imgengine::capture::CaptureOptions;
use imgengine::deploy::{DeployOptions, ResumeMode};
use imgengine::multicast::chunks::{ChunkSource, FileChunks};
use imgengine::multicast::fallback::{self, Fallback};
use imgengine::multicast::master::{Event, Master, MasterConfig, Outcome};
use imgengine::multicast::onthefly::OnTheFly;
use imgengine::multicast::packet::{Body, MasterState, Packet, MAX_PACKET};
use imgengine::multicast::{self, client, net};
use imgengine::source::Location;
use sha2::{Digest, Sha256};

use crate::args::{flag, many, value, DiskSel, Matches, Opt, UsageError};
use crate::exit::Exit;
use crate::imaging;
use crate::progress::{human, ConsoleProgress};

pub const USAGE: &str = "\
Multicast sessions (one master sends, every client receives at once):
  -session NAME -master [-clients=N] [-timeout=MIN] [-throttle=MS] [-comp=0..9] [-latejoin]
        [-addr=A.B.C.D] [-iface=NAME] (-image=FILE | [-disk=DISK] [-part=N|LABEL])
                                    send an image file, or this device's disk or partition
                                    with no image file anywhere: its manifest is captured
                                    first (used blocks only, at -comp; clients wait for the
                                    master meanwhile), then each chunk is read and compressed
                                    again as it is sent and checked against the manifest
                                    (memory under 64 MiB up to -comp=6; if the disk changes,
                                    the session stops naming the chunk: keep it unmounted);
                                    starts when -clients registered, when s is pressed, or
                                    -timeout minutes (default 5) after the last registration;
                                    later devices are told to wait for the next session unless
                                    -latejoin
  -session NAME -client [-disk=DISK] [-part=N|LABEL] [-addr=..] [-iface=..] [-trust=KEY.pub]..
        [-server=URL [-ca=FILE]]    receive and restore, verified as -restore does; exit 0 only
                                    when every chunk is verified and written; with -server, a
                                    copy of the same image, what the session does not deliver
                                    (it ended, or nothing of it came for 10 s) is fetched by
                                    HTTP Range and verified the same way
  -session NAME                     no role: press m to become the master (then s to start),
                                    or wait for a master
  -s NAME abbreviates -session NAME and -m abbreviates -master. NAME is hashed
  into a group address in 231.0.0.0/8 (see docs/multicast.md); -addr= overrides it.";

#[derive(Debug, Clone, PartialEq, Eq, Default)]
struct SessionArgs {
    name: String,
    master: bool,
    client: bool,
    clients: Option<usize>,
    timeout_min: Option<u64>,
    throttle_ms: u32,
    comp: u8,
    addr: Option<Ipv4Addr>,
    iface: Option<String>,
    latejoin: bool,
    image: Option<PathBuf>,
    sel: DiskSel,
    trust: Vec<PathBuf>,
    state: Option<PathBuf>,
    threads: Option<usize>,
    /// Client: a copy of the image for the HTTP Range fallback.
    server: Option<String>,
    ca: Option<PathBuf>,
}

/// `-session`'s options (stage one: anything else is refused before [`run_verb`]).
pub const OPTS: &[Opt] = &[
    flag(&["master", "m"]),
    flag(&["client"]),
    value(&["clients"]),
    value(&["timeout"]),
    value(&["throttle"]),
    value(&["comp"]),
    value(&["addr"]),
    value(&["iface"]),
    flag(&["latejoin"]),
    value(&["image"]),
    value(&["disk"]),
    value(&["part"]),
    many(&["trust"]),
    value(&["state"]),
    value(&["threads"]),
    value(&["server"]),
    value(&["ca"]),
];

/// `-session NAME ...` (alias `-s`): stage two, then the session.
pub fn run_verb(mut m: Matches) -> Result<i32> {
    let a = session_args(&mut m)?;
    run(&a)
}

fn usage(m: impl Into<String>) -> UsageError {
    UsageError(m.into())
}

fn session_args(m: &mut Matches) -> Result<SessionArgs, UsageError> {
    let name = m.operand("a name: img -session NAME -master|-client")?;
    m.finish()?;
    let a = SessionArgs {
        name,
        master: m.flag("master"),
        client: m.flag("client"),
        clients: m.number("clients")?,
        timeout_min: m.number("timeout")?,
        throttle_ms: m.number("throttle")?.unwrap_or(0),
        comp: m.number("comp")?.unwrap_or(1),
        addr: m.number("addr")?,
        iface: m.value("iface").map(str::to_string),
        latejoin: m.flag("latejoin"),
        image: m.value("image").map(PathBuf::from),
        sel: DiskSel {
            disk: m.value("disk").map(PathBuf::from),
            part: m.value("part").map(str::to_string),
        },
        trust: m.all("trust").into_iter().map(PathBuf::from).collect(),
        state: m.value("state").map(PathBuf::from),
        threads: m.number("threads")?,
        server: m.value("server").map(str::to_string),
        ca: m.value("ca").map(PathBuf::from),
    };
    multicast::check_name(&a.name).map_err(|e| usage(e.to_string()))?;
    if a.comp > 9 {
        return Err(usage(format!(
            "-comp={}: the level is 0 (none) to 9 (smallest)",
            a.comp
        )));
    }
    if let Some(v) = a.addr.filter(|v| !v.is_multicast()) {
        return Err(usage(format!(
            "-addr={v}: a multicast address (224.0.0.0 to 239.255.255.255) is needed"
        )));
    }
    if a.master && a.client {
        return Err(usage(
            "-session: a device is either -master or -client, not both",
        ));
    }
    if a.client && (a.image.is_some() || a.clients.is_some() || a.latejoin) {
        return Err(usage(
            "-session -client: -image, -clients and -latejoin are the master's options",
        ));
    }
    if a.master && (a.server.is_some() || a.ca.is_some()) {
        return Err(usage(
            "-session -master: -server and -ca are the client's options (where it fetches what it missed)",
        ));
    }
    if a.image.is_some() && (a.sel.disk.is_some() || a.sel.part.is_some()) {
        return Err(usage(
            "-session -master: send either -image=FILE or a -disk/-part, not both",
        ));
    }
    if a.clients == Some(0) {
        return Err(usage("-clients=0: at least one client is needed"));
    }
    Ok(a)
}

/// Single key presses from the console (non-canonical while the session runs). When
/// standard input is not a terminal (a serial console wired to a pipe, a remote console,
/// a script), every byte read from it is a key press; end of input means no more keys.
struct Keys {
    rx: Receiver<u8>,
    pending: std::cell::RefCell<Vec<u8>>,
    saved: Option<nix::sys::termios::Termios>,
}

impl Keys {
    fn open() -> Keys {
        let (tx, rx) = mpsc::channel();
        let stdin = std::io::stdin();
        let mut saved = None;
        if stdin.is_terminal() {
            use nix::sys::termios::{tcgetattr, tcsetattr, LocalFlags, SetArg};
            if let Ok(t) = tcgetattr(&stdin) {
                let mut raw = t.clone();
                raw.local_flags
                    .remove(LocalFlags::ICANON | LocalFlags::ECHO);
                if tcsetattr(&stdin, SetArg::TCSANOW, &raw).is_ok() {
                    saved = Some(t);
                }
            }
        }
        std::thread::spawn(move || {
            let mut b = [0u8; 1];
            let mut i = std::io::stdin();
            while let Ok(1) = i.read(&mut b) {
                if tx.send(b[0].to_ascii_lowercase()).is_err() {
                    break;
                }
            }
        });
        Keys {
            rx,
            pending: Default::default(),
            saved,
        }
    }

    /// Whether `key` was pressed since it was last asked for (other keys stay for their
    /// own question: `m` then `s` typed at once both count).
    fn pressed(&self, key: u8) -> bool {
        let mut p = self.pending.borrow_mut();
        p.extend(self.rx.try_iter());
        let keep = p.len().saturating_sub(64);
        p.drain(..keep);
        match p.iter().position(|&k| k == key) {
            Some(i) => {
                p.remove(i);
                true
            }
            None => false,
        }
    }
}

impl Drop for Keys {
    fn drop(&mut self) {
        if let Some(t) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                t,
            );
        }
    }
}

fn run(a: &SessionArgs) -> Result<i32> {
    let (ifname, ifaddr) = net::interface(a.iface.as_deref())?;
    let group = a.addr.unwrap_or_else(|| multicast::group_addr(&a.name));
    let keys = Keys::open();
    if a.master {
        return run_master(a, &ifname, ifaddr, group, &keys);
    }
    if a.client {
        drop(keys);
        return run_client(a, ifaddr, group);
    }
    // No role: wait for a master to announce itself, or for m on this console.
    eprintln!(
        "session {}: waiting for a master on {group} ({ifname}); press m to make this device the master",
        a.name
    );
    let sock = net::group_socket(group, multicast::PORT, ifaddr)?;
    sock.set_read_timeout(Some(Duration::from_millis(200)))?;
    let session = multicast::name_hash(&a.name);
    let mut buf = vec![0u8; MAX_PACKET + 1];
    loop {
        if keys.pressed(b'm') {
            drop(sock);
            eprintln!(
                "session {}: this device is the master; press s to start",
                a.name
            );
            return run_master(a, &ifname, ifaddr, group, &keys);
        }
        if let Ok((n, _)) = sock.recv_from(&mut buf) {
            if let Ok(p) = Packet::parse(&buf[..n]) {
                if p.session == session
                    && matches!(p.body, Body::Announce(ref an) if an.state == MasterState::Waiting || an.latejoin)
                {
                    drop(sock);
                    drop(keys);
                    return run_client(a, ifaddr, group);
                }
            }
        }
    }
}

fn run_master(
    a: &SessionArgs,
    ifname: &str,
    ifaddr: Ipv4Addr,
    group: Ipv4Addr,
    keys: &Keys,
) -> Result<i32> {
    let quiet = std::env::var_os("IMG_QUIET").is_some();
    let source: Box<dyn ChunkSource> = match &a.image {
        Some(p) => {
            Box::new(FileChunks::open(p).with_context(|| format!("opening {}", p.display()))?)
        }
        None => {
            // The master's own disk, with no image file anywhere: pass 1 is img -make's
            // capture (used blocks only, at -comp) keeping only the manifest; the carousel
            // then makes each chunk again from the disk, checked against that manifest.
            let disk = imaging::resolve_disk(&a.sel)?;
            let what = match &a.sel.part {
                Some(p) => format!("partition {p} of {}", disk.display()),
                None => format!("disk {}", disk.display()),
            };
            eprintln!(
                "session {}: capturing {what} at -comp={} (manifest only, no image file); clients wait for the master's announcement",
                a.name, a.comp
            );
            let opts = CaptureOptions {
                comp: a.comp,
                name: a.name.clone(),
                version: "1".into(),
                models: Vec::new(),
                description: Some(format!("multicast session {}", a.name)),
                chunk_size: CaptureOptions::default().chunk_size,
                // Two compressors unless -threads says otherwise: pass 1 keeps the
                // capture's pipeline (two chunks per thread in flight) well inside the
                // master's memory bound whatever the CPU count. From -comp=7 (zstd 12 and
                // up) one compressor's own tables are 50 MiB or more: one only.
                threads: imaging::threads(a.threads.or(Some(if a.comp >= 7 { 1 } else { 2 }))),
                raw: false,
            };
            let progress = ConsoleProgress::new(quiet);
            let otf = OnTheFly::capture(&disk, a.sel.part.as_deref(), &opts, &progress)
                .with_context(|| format!("capturing {what} for the session"))?;
            let s = otf.summary();
            eprintln!(
                "session {}: captured {what}: {} used, {} chunks, {} of data in a {} image, made again chunk by chunk as it is sent",
                a.name,
                human(s.used_bytes),
                s.chunks,
                human(s.data_bytes),
                human(s.image_bytes)
            );
            Box::new(otf)
        }
    };
    let mut cfg = MasterConfig::new(&a.name, PathBuf::from(source.describe()), ifaddr);
    cfg.group = group;
    cfg.throttle_ms = a.throttle_ms;
    cfg.latejoin = a.latejoin;
    if let Some(mb) = std::env::var("IMG_SESSION_MAXRATE")
        .ok()
        .and_then(|v| v.parse::<u64>().ok())
    {
        cfg.max_rate = mb.max(1) * 1_000_000;
    }
    let mut m = Master::with_source(cfg, source)?;
    let timeout = Duration::from_secs(60 * a.timeout_min.unwrap_or(5));
    println!(
        "session {}: master on {ifname} ({ifaddr}), group {group}:{}; image {} ({}, manifest {})",
        a.name,
        multicast::PORT,
        m.source_name(),
        human(m.image_len()),
        &m.digest_hex()[..16]
    );
    println!(
        "session {}: waiting for clients{} (press s to start)",
        a.name,
        a.clients
            .map(|n| format!(": starts at {n}"))
            .unwrap_or_default()
    );
    let _ = std::io::stdout().flush();
    let mut last_reg: Option<Instant> = None;
    loop {
        for e in m.poll(Duration::from_millis(50))? {
            print_event(&e, &m, a.clients, &mut HashMap::new());
            if matches!(e, Event::Registered { .. }) {
                last_reg = Some(Instant::now());
            }
        }
        let n = m.clients.len();
        let why = if keys.pressed(b's') {
            Some("s pressed".to_string())
        } else if a.clients.is_some_and(|c| n >= c) {
            Some(format!("{n} clients registered"))
        } else if (a.clients.is_some() || a.timeout_min.is_some())
            && last_reg.is_some_and(|t| t.elapsed() >= timeout)
        {
            Some(format!(
                "{} min since the last registration",
                timeout.as_secs() / 60
            ))
        } else {
            None
        };
        if let Some(why) = why {
            if n == 0 {
                m.abort();
                println!("session {}: no client registered; nothing sent", a.name);
                return Ok(Exit::Failure.code());
            }
            println!("session {}: starting with {n} client(s) ({why})", a.name);
            break;
        }
    }
    let started = Instant::now();
    let mut deciles: HashMap<u64, u64> = HashMap::new();
    if let Err(e) = m.run(&mut |e, m| print_event(e, m, None, &mut deciles)) {
        // Tell the clients at once (they fail, or fetch the rest from a server they know)
        // rather than leaving them to time out.
        m.abort();
        return Err(anyhow::Error::new(e).context(format!("session {}: stopped", a.name)));
    }
    let secs = started.elapsed().as_secs_f64();
    println!("session {}: summary after {secs:.1} s", a.name);
    let mut ok = 0;
    for c in &m.clients {
        let took = c
            .finished
            .map(|f| format!("{:.1} s", f.duration_since(started).as_secs_f64()))
            .unwrap_or_else(|| "-".into());
        let result = match c.outcome {
            Outcome::Done => {
                ok += 1;
                "done".to_string()
            }
            Outcome::Failed => format!("FAILED: {}", c.message),
            Outcome::Lost => format!("LOST: {}", c.message),
            Outcome::Receiving => "unfinished".to_string(),
        };
        println!(
            "  {:<32} {:<21} {:>10} {:>9}  {result}",
            c.name,
            c.addr.to_string(),
            human(c.bytes_done),
            took
        );
    }
    let s = &m.stats;
    println!(
        "session {}: {ok} of {} client(s) done; {} packets, {} on the wire for a {} image ({:.3}x), {} repair packets ({} asked for by NACKs), {} extra pass(es), {} block(s) encoded, held back {:.1} s for the room, {} client(s) caught up alone, rate cut {} time(s) (lowest {:.1} MB/s)",
        a.name,
        m.clients.len(),
        s.packets,
        human(s.wire_bytes),
        human(s.image_bytes),
        s.wire_bytes as f64 / s.image_bytes.max(1) as f64,
        s.repair_packets,
        s.nack_repairs,
        s.passes,
        s.blocks_encoded,
        s.held_back.as_secs_f64(),
        m.clients.iter().filter(|c| c.lagging).count(),
        s.rate_cuts,
        s.min_rate / 1e6
    );
    Ok(if ok == m.clients.len() {
        Exit::Success.code()
    } else {
        Exit::Failure.code()
    })
}

fn print_event(e: &Event, m: &Master, want: Option<usize>, deciles: &mut HashMap<u64, u64>) {
    let name = |id: u64| {
        m.client(id)
            .map(|c| format!("{} ({})", c.name, c.addr))
            .unwrap_or_else(|| format!("client {id:016x}"))
    };
    match e {
        Event::Registered { id, again } => {
            let late = m.client(*id).is_some_and(|c| c.late);
            println!(
                "registered {}{}{}",
                name(*id),
                if *again {
                    " again"
                } else if late {
                    " late: it catches up"
                } else {
                    ""
                },
                want.map(|w| format!(" [{}/{w}]", m.clients.len()))
                    .unwrap_or_else(|| format!(" [{}]", m.clients.len()))
            );
        }
        Event::Refused { name, addr } => println!(
            "refused {name} ({addr}): the session has started; it waits for the next session"
        ),
        Event::Progress { id } => {
            if let Some(c) = m.client(*id) {
                if let Some(d) = (c.bytes_done * 10).checked_div(c.bytes_total) {
                    if deciles.get(id) != Some(&d) {
                        deciles.insert(*id, d);
                        println!(
                            "  {}: {}% ({} of {})",
                            name(*id),
                            d * 10,
                            human(c.bytes_done),
                            human(c.bytes_total)
                        );
                    }
                }
            }
        }
        Event::Finished { id } => {
            if let Some(c) = m.client(*id) {
                match c.outcome {
                    Outcome::Done => println!("  {}: done", name(*id)),
                    _ => println!("  {}: FAILED: {}", name(*id), c.message),
                }
            }
        }
        Event::Lost { id } => println!("  {}: lost (no answer)", name(*id)),
    }
    let _ = std::io::stdout().flush();
}

/// Stable across restarts of this device: host name, machine id, target and partition.
pub(crate) fn client_id(disk: &std::path::Path, part: Option<&str>) -> u64 {
    let read = |p: &str| std::fs::read_to_string(p).unwrap_or_default();
    let disk = std::fs::canonicalize(disk).unwrap_or_else(|_| disk.to_path_buf());
    let mut h = Sha256::new();
    for s in [
        read("/proc/sys/kernel/hostname"),
        read("/etc/machine-id"),
        disk.display().to_string(),
        part.unwrap_or("").to_string(),
    ] {
        h.update(s.trim().as_bytes());
        h.update([0]);
    }
    u64::from_be_bytes(h.finalize()[..8].try_into().expect("8 bytes"))
}

fn run_client(a: &SessionArgs, ifaddr: Ipv4Addr, group: Ipv4Addr) -> Result<i32> {
    let quiet = std::env::var_os("IMG_QUIET").is_some();
    let disk = imaging::resolve_disk(&a.sel)?;
    let keys = imaging::trusted_keys(&a.trust)?;
    if keys.is_empty() {
        eprintln!("img: this device trusts no signing key: the session's image is checked by its CRC32 and SHA-256 only, not by a signature");
    }
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let target = match &a.sel.part {
        Some(p) => format!("{} part {p}", disk.display()),
        None => disk.display().to_string(),
    };
    let cfg = client::ClientConfig {
        name: a.name.clone(),
        group,
        port: multicast::PORT,
        iface: ifaddr,
        client_id: client_id(&disk, a.sel.part.as_deref()),
        device_name: format!("{host}:{target}"),
        target: disk.clone(),
        part: a.sel.part.clone(),
        deploy: DeployOptions {
            trusted_keys: keys,
            resume: ResumeMode::Auto,
            state_dir: a
                .state
                .clone()
                .or_else(|| std::env::var_os("IMG_STATE_DIR").map(PathBuf::from))
                .unwrap_or_else(|| PathBuf::from(imaging::STATE_DIR)),
            threads: imaging::threads(a.threads),
            ..DeployOptions::default()
        },
        fallback: a.server.as_deref().map(|url| Fallback {
            location: Location::parse(url),
            http: imaging::http_config(a.ca.as_deref()),
            after: std::env::var("IMG_SESSION_FALLBACK")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(fallback::DEFAULT_AFTER),
        }),
    };
    let progress = ConsoleProgress::new(quiet);
    let name = a.name.clone();
    let s = client::run(&cfg, &progress, &mut |n| match n {
        client::Notice::Waiting { group } => {
            eprintln!("session {name}: client; waiting for the master on {group}")
        }
        client::Notice::Queued { message } => eprintln!("session {name}: {message}"),
        client::Notice::Registered { master } => {
            eprintln!("session {name}: registered with the master {master}")
        }
        client::Notice::Receiving { image_len } => eprintln!(
            "session {name}: receiving a {} image onto {target}",
            human(image_len)
        ),
    })
    .with_context(|| format!("session {}: receiving onto {}", a.name, disk.display()))?;
    for n in &s.notes {
        eprintln!("img: {n}");
    }
    eprintln!(
        "session {}: image verified and written to {}: {} chunks written, {} already intact, {} written",
        a.name,
        disk.display(),
        s.chunks_written,
        s.chunks_skipped,
        human(s.bytes_written)
    );
    if s.chunks_written == 0 && s.chunks_skipped == 0 {
        bail!("session {}: the image held no chunk", a.name);
    }
    Ok(Exit::Success.code())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<SessionArgs, UsageError> {
        let v: Vec<std::ffi::OsString> =
            s.split_whitespace().map(std::ffi::OsString::from).collect();
        let (verb, mut m) = crate::cli::lookup(&v)?;
        assert_eq!(verb.names[0], "session");
        session_args(&mut m)
    }

    #[test]
    fn seed_forms_parse() {
        let a = p("-session mcast01 -master -clients=5 -timeout=20 -throttle=2 -comp=6").unwrap();
        assert!(a.master && !a.client);
        assert_eq!(
            (a.clients, a.timeout_min, a.throttle_ms, a.comp),
            (Some(5), Some(20), 2, 6)
        );
        // Seed 002: -session may be written -s and -master -m.
        assert!(p("-s mcast01 -m").unwrap().master);
        assert!(p("-session mcast01 -client").unwrap().client);
        assert_eq!(
            p("-session mcast01 -client -disk=d.img -part=2")
                .unwrap()
                .sel
                .part
                .as_deref(),
            Some("2")
        );
        let a = p("-session mcast01").unwrap();
        assert!(!a.master && !a.client && a.comp == 1);
        assert_eq!(p("-session=room -m").unwrap().name, "room");
        assert_eq!(
            p("-s=room -client").unwrap(),
            p("-session room -client").unwrap()
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(p("-session -m").unwrap_err().0.contains("needs a name"));
        assert!(p("-session x -m -client")
            .unwrap_err()
            .0
            .contains("not both"));
        assert!(p("-session x -m -comp=10")
            .unwrap_err()
            .0
            .contains("0 (none) to 9"));
        assert!(p("-session x -m -addr=10.0.0.1")
            .unwrap_err()
            .0
            .contains("multicast"));
        assert!(p("-session x -m -image=a.img -disk=d")
            .unwrap_err()
            .0
            .contains("not both"));
        assert!(p("-session x -client -clients=3")
            .unwrap_err()
            .0
            .contains("master's options"));
        assert!(p("-session x -m -bogus").unwrap_err().0.contains("-bogus"));
        assert!(p("-session two words -m").is_err());
    }
}
