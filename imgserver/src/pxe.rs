//! PXE asks before it loads (seed 004's preboot flow): a PXE-booted device's iPXE fetches
//! `GET /pxe/boot.ipxe?mac=<its MAC>` and this module answers with an iPXE script that either
//! loads the boot agent's kernel and initrd (the device has work, or it is unknown and the
//! administrator enrols new devices, or someone at the device chose the agent in the
//! hot-key menu) or `exit`s back to the firmware, which boots the next boot device: the
//! local disk. With no work nothing but this small script crosses the network.
//!
//! The kernel and initrd are served from `DATA/pxe/` at `/pxe/vmlinuz` and
//! `/pxe/initrd.img` (with HTTP Range), or from another HTTP server (`serve --pxe-files URL`).
//! Debian's iPXE has no HTTPS, so `serve --pxe-listen ADDR` opens a plain-HTTP listener that
//! serves only these paths; the check-in stays on the main (HTTPS) listener.
//!
//! Everything in the request is hostile: the query must be exactly `mac=` (six octets of a
//! unicast MAC) and optionally `want=agent|console`; the Host header is only used when it is
//! a plain host name or address. Nothing from the request reaches the script unchecked.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context;
use axum::extract::{RawQuery, State};
use axum::http::{header, HeaderMap, Request, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;

use crate::api::AppState;
use crate::store::BootWork;

/// The kernel and initrd names under `/pxe/` and in `--pxe-files URL`.
pub const KERNEL: &str = "vmlinuz";
pub const INITRD: &str = "initrd.img";

/// Kernel parameters when the administrator gives none: the screen and the first serial
/// port, and a reboot rather than a hang when the kernel panics.
pub const DEFAULT_ARGS: &str = "console=tty0 console=ttyS0,115200 panic=10 quiet";

/// The server's PXE settings (`imgserver serve --pxe-*`).
#[derive(Debug, Clone)]
pub struct PxeConfig {
    /// `--pxe-enrol`: a MAC the server does not know boots the agent, which enrols it. Off by
    /// default: any PC on the segment that PXE-boots would otherwise enrol itself and receive
    /// every `--all` job.
    pub enrol_unknown: bool,
    /// Folder with `vmlinuz` and `initrd.img` served at `/pxe/` (`DATA/pxe`).
    pub dir: PathBuf,
    /// `--pxe-files URL`: fetch `URL/vmlinuz` and `URL/initrd.img` from there instead.
    pub files_url: Option<String>,
    /// `--pxe-args TEXT`: kernel parameters for the agent besides `img.server=`.
    pub args: String,
    /// The URL the agent checks in at (`img.server=`): `--public-url`, else built from the
    /// host the device asked and the main listener's scheme and port.
    pub agent_url: Option<String>,
    pub main_scheme: &'static str,
    pub main_port: u16,
}

impl Default for PxeConfig {
    fn default() -> Self {
        PxeConfig {
            enrol_unknown: false,
            dir: PathBuf::from("pxe"),
            files_url: None,
            args: DEFAULT_ARGS.to_string(),
            agent_url: None,
            main_scheme: "https",
            main_port: 8443,
        }
    }
}

impl PxeConfig {
    /// Check the administrator's settings once at start-up: they end up inside an iPXE
    /// script, so they may not hold anything iPXE would expand or split.
    pub fn check(&self) -> anyhow::Result<()> {
        for (what, v) in [
            ("--pxe-files", self.files_url.as_deref()),
            ("--public-url", self.agent_url.as_deref()),
        ] {
            if let Some(u) = v {
                if !(u.starts_with("http://") || u.starts_with("https://")) || !url_safe(u) {
                    anyhow::bail!("{what} {u:?}: give an http:// or https:// URL without spaces, quotes, `$`, `#` or `\\`");
                }
            }
        }
        if !self.args.is_empty() && !self.args.split(' ').all(url_safe) {
            anyhow::bail!(
                "--pxe-args {:?}: kernel parameters separated by single spaces, without quotes, `$`, `#` or `\\`",
                self.args
            );
        }
        Ok(())
    }

    /// What is missing for serving the agent from this server (None when ready).
    pub fn missing_files(&self) -> Option<String> {
        if self.files_url.is_some() {
            return None;
        }
        let missing: Vec<&str> = [KERNEL, INITRD]
            .into_iter()
            .filter(|f| !self.dir.join(f).is_file())
            .collect();
        (!missing.is_empty()).then(|| {
            format!(
                "{} missing in {}: copy the agent's kernel and initrd there (or serve --pxe-files URL)",
                missing.join(" and "),
                self.dir.display()
            )
        })
    }
}

/// `true` for a non-empty string of printable ASCII without characters iPXE's script
/// parser treats specially or a kernel command line would split on.
fn url_safe(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 1024
        && s.bytes().all(|b| {
            b.is_ascii_graphic() && !matches!(b, b'$' | b'"' | b'\'' | b'\\' | b'#' | b'`')
        })
}

/// What someone at the device chose in the hot-key menu (`want=`), or nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Want {
    /// The server decides (no menu choice).
    Auto,
    /// "Imaging engine": boot the agent whatever the server has for the device.
    Agent,
    /// "img console": the agent's kernel with `img.console`.
    Console,
}

/// A valid request: the normalised MAC (`aa:bb:cc:dd:ee:ff`) and the menu choice.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootRequest {
    pub mac: String,
    pub want: Want,
}

/// Longest query accepted (`mac=` with percent-encoded colons and `want=console` fit well).
const MAX_QUERY: usize = 128;

/// Parse the query string of `/pxe/boot.ipxe` strictly: `mac=` once, `want=` at most once,
/// nothing else. The error names what was wrong.
pub fn parse_query(q: Option<&str>) -> Result<BootRequest, String> {
    let q = q.unwrap_or("");
    if q.is_empty() {
        return Err("no mac= in the query: chain boot.ipxe?mac=${netX/mac}".into());
    }
    if q.len() > MAX_QUERY {
        return Err(format!("query of {} bytes (at most {MAX_QUERY})", q.len()));
    }
    let mut mac = None;
    let mut want = None;
    for pair in q.split('&') {
        let (k, v) = pair
            .split_once('=')
            .ok_or_else(|| format!("query part {:?} is not NAME=VALUE", clip(pair)))?;
        let v = percent_decode(v).ok_or_else(|| format!("{k}= is not valid percent-encoding"))?;
        match k {
            "mac" if mac.is_none() => mac = Some(parse_mac(&v)?),
            "want" if want.is_none() => {
                want = Some(match v.as_str() {
                    "agent" => Want::Agent,
                    "console" => Want::Console,
                    _ => return Err(format!("want={:?}: use agent or console", clip(&v))),
                })
            }
            "mac" | "want" => return Err(format!("{k}= given twice")),
            _ => return Err(format!("unknown query parameter {:?}", clip(k))),
        }
    }
    Ok(BootRequest {
        mac: mac.ok_or("no mac= in the query: chain boot.ipxe?mac=${netX/mac}")?,
        want: want.unwrap_or(Want::Auto),
    })
}

/// At most 40 characters of hostile text, for error messages and the log.
fn clip(s: &str) -> String {
    s.chars().take(40).collect()
}

/// `%XX` decoding; None for a broken escape or a result that is not UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

/// A NIC's MAC as iPXE prints it: six two-digit hex octets separated by `:` (or all by `-`,
/// iPXE's `:hexhyp`), unicast and not all zero. Returned lower-case with colons.
pub fn parse_mac(s: &str) -> Result<String, String> {
    let bad = || format!("mac={:?} is not a MAC address (aa:bb:cc:dd:ee:ff)", clip(s));
    if s.len() != 17 {
        return Err(bad());
    }
    let sep = s.as_bytes()[2];
    if sep != b':' && sep != b'-' {
        return Err(bad());
    }
    let mut octets = [0u8; 6];
    for (n, part) in s.split(sep as char).enumerate() {
        if n >= 6 || part.len() != 2 || !part.bytes().all(|c| c.is_ascii_hexdigit()) {
            return Err(bad());
        }
        octets[n] = u8::from_str_radix(part, 16).map_err(|_| bad())?;
    }
    if octets[0] & 1 == 1 {
        return Err(format!("mac={s:?} is a multicast address, not a NIC's"));
    }
    if octets == [0; 6] {
        return Err(format!("mac={s:?} is all zero, not a NIC's"));
    }
    Ok(octets
        .iter()
        .map(|o| format!("{o:02x}"))
        .collect::<Vec<_>>()
        .join(":"))
}

/// The answer for one device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Load the agent; `console`: with `img.console`.
    Agent { console: bool, reason: String },
    /// Back to the firmware: the next boot device (the local disk).
    Local { reason: String },
}

/// The decision from what the store says about the MAC, the menu choice and the setting.
pub fn decide(work: &BootWork, want: Want, enrol_unknown: bool) -> Answer {
    match (want, work) {
        (Want::Console, _) => Answer::Agent {
            console: true,
            reason: "img console chosen at the device".into(),
        },
        (Want::Agent, _) => Answer::Agent {
            console: false,
            reason: "imaging engine chosen at the device".into(),
        },
        (Want::Auto, BootWork::Work(what)) => Answer::Agent {
            console: false,
            reason: format!("work: {what}"),
        },
        (Want::Auto, BootWork::Unknown) if enrol_unknown => Answer::Agent {
            console: false,
            reason: "unknown device, enrolling new devices (--pxe-enrol)".into(),
        },
        (Want::Auto, BootWork::Unknown) => Answer::Local {
            reason: "unknown device, not enrolling new devices (serve --pxe-enrol to enrol them)"
                .into(),
        },
        (Want::Auto, BootWork::Idle) => Answer::Local {
            reason: "no work".into(),
        },
    }
}

/// The host part of a Host header when it is a plain name or address (`[v6]` kept in
/// brackets); None for anything else.
pub fn host_part(host: &str) -> Option<&str> {
    let h = if let Some(rest) = host.strip_prefix('[') {
        let end = rest.find(']')?;
        let inner = &rest[..end];
        let after = &rest[end + 1..];
        if inner.is_empty()
            || !inner
                .bytes()
                .all(|c| c.is_ascii_hexdigit() || c == b':' || c == b'.')
        {
            return None;
        }
        if !(after.is_empty() || after.strip_prefix(':').is_some_and(is_port)) {
            return None;
        }
        &host[..end + 2]
    } else {
        let (name, port) = match host.split_once(':') {
            Some((n, p)) => (n, Some(p)),
            None => (host, None),
        };
        if port.is_some_and(|p| !is_port(p)) {
            return None;
        }
        if name.is_empty()
            || name.len() > 253
            || !name
                .bytes()
                .all(|c| c.is_ascii_alphanumeric() || c == b'.' || c == b'-')
        {
            return None;
        }
        name
    };
    Some(h)
}

fn is_port(p: &str) -> bool {
    !p.is_empty() && p.len() <= 5 && p.bytes().all(|c| c.is_ascii_digit())
}

/// Where the script fetches the kernel and initrd from: `--pxe-files`, else this server as
/// the device reached it (`scheme://host[:port]`).
fn files_base(cfg: &PxeConfig, scheme: &str, here: Option<&str>) -> Option<String> {
    match &cfg.files_url {
        Some(u) => Some(u.trim_end_matches('/').to_string()),
        None => here.map(|h| format!("{scheme}://{h}/pxe")),
    }
}

/// Which listener a request came in on (the plain `--pxe-listen` one sets it).
#[derive(Debug, Clone, Copy)]
struct PlainListener;

/// The iPXE script for an answer. "Local disk" is `exit 1`: iPXE ends and the firmware
/// boots its next boot device. The status must be an error: edk2 (OVMF and most UEFI
/// firmware) stops at its boot menu when a boot option returns success, and tries the next
/// option after a failure; BIOS firmware goes on either way. `img-answer` tells the generic
/// `boot.ipxe` that the server did answer (so it does not report the server unreachable).
/// `files` is the base URL of `vmlinuz` and `initrd.img`,
/// `server` the URL for `img.server=` (None: the agent finds its server by DHCP etc.).
pub fn render(
    mac: &str,
    answer: &Answer,
    cfg: &PxeConfig,
    files: &str,
    server: Option<&str>,
) -> String {
    match answer {
        Answer::Local { reason } => format!(
            "#!ipxe\n\
             # imgserver: {mac}: {reason}\n\
             echo imgserver: {reason}: booting the local disk\n\
             set img-answer local\n\
             exit 1\n"
        ),
        Answer::Agent { console, reason } => {
            let mut args = format!("initrd={INITRD}");
            if let Some(s) = server {
                if !cfg.args.contains("img.server=") {
                    args.push_str(&format!(" img.server={s}"));
                }
            }
            if !cfg.args.is_empty() {
                args.push(' ');
                args.push_str(&cfg.args);
            }
            if *console {
                args.push_str(" img.console");
            }
            format!(
                "#!ipxe\n\
                 # imgserver: {mac}: {reason}\n\
                 echo imgserver: {reason}: loading the imaging agent\n\
                 kernel --name {KERNEL} {files}/{KERNEL} {args} || goto failed\n\
                 initrd --name {INITRD} {files}/{INITRD} || goto failed\n\
                 boot || goto failed\n\
                 :failed\n\
                 echo imgserver: the imaging agent did not load: booting the local disk\n\
                 set img-answer local\n\
                 exit 1\n"
            )
        }
    }
}

fn script(status: StatusCode, body: String) -> Response {
    (
        status,
        [
            (header::CONTENT_TYPE, "text/plain; charset=utf-8"),
            (header::CACHE_CONTROL, "no-store"),
        ],
        body,
    )
        .into_response()
}

/// `GET /pxe/boot.ipxe?mac=...`
async fn boot_ipxe(
    State(st): State<Arc<AppState>>,
    plain: Option<axum::Extension<PlainListener>>,
    headers: HeaderMap,
    uri: Uri,
    RawQuery(q): RawQuery,
) -> Response {
    let req = match parse_query(q.as_deref()) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("imgserver: pxe: refused a boot request: {e}");
            return script(StatusCode::BAD_REQUEST, format!("{e}\n"));
        }
    };
    let cfg = &st.pxe;
    let store = st.store.clone();
    let mac = req.mac.clone();
    let work = match tokio::task::spawn_blocking(move || store.boot_work(&mac)).await {
        Ok(Ok(w)) => w,
        Ok(Err(e)) => {
            eprintln!("imgserver: pxe {}: storage error: {e}", req.mac);
            return script(StatusCode::INTERNAL_SERVER_ERROR, format!("storage: {e}\n"));
        }
        Err(e) => {
            eprintln!("imgserver: pxe {}: storage task: {e}", req.mac);
            return script(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storage task: {e}\n"),
            );
        }
    };
    // HTTP/1.1 sends Host; HTTP/2 the request's authority.
    let host = headers
        .get(header::HOST)
        .and_then(|h| h.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .and_then(|h| {
            let name = host_part(h)?;
            Some((name, h))
        });
    let mut answer = decide(&work, req.want, cfg.enrol_unknown);
    if let Answer::Agent { .. } = answer {
        if let Some(m) = cfg.missing_files() {
            answer = Answer::Local {
                reason: format!("the agent cannot be served: {m}"),
            };
        }
    }
    let scheme = if plain.is_some() { "http" } else { st.scheme };
    let files = files_base(cfg, scheme, host.map(|(_, full)| full));
    let server = cfg.agent_url.clone().or_else(|| {
        host.map(|(name, _)| format!("{}://{name}:{}", cfg.main_scheme, cfg.main_port))
    });
    let files = match (&answer, files) {
        (Answer::Agent { .. }, None) => {
            answer = Answer::Local {
                reason:
                    "no usable Host header to build the kernel's URL from (serve --pxe-files URL)"
                        .into(),
            };
            String::new()
        }
        (_, f) => f.unwrap_or_default(),
    };
    let shown = match &answer {
        Answer::Agent { console: true, .. } => "agent with img console",
        Answer::Agent { .. } => "imaging agent",
        Answer::Local { .. } => "local disk",
    };
    let reason = match &answer {
        Answer::Agent { reason, .. } | Answer::Local { reason } => reason,
    };
    eprintln!("imgserver: pxe {}: {reason} -> {shown}", req.mac);
    script(
        StatusCode::OK,
        render(&req.mac, &answer, cfg, &files, server.as_deref()),
    )
}

/// `GET /pxe/vmlinuz`, `GET /pxe/initrd.img`: the agent's kernel and initrd with HTTP Range.
async fn file(name: &'static str, st: Arc<AppState>, req: Request<axum::body::Body>) -> Response {
    let path = st.pxe.dir.join(name);
    let r = serve_file(&path, req).await;
    if r.status().is_success() {
        eprintln!("imgserver: pxe: sending {name}");
    } else {
        eprintln!(
            "imgserver: pxe: {name} not sent ({}): is it in {}?",
            r.status(),
            st.pxe.dir.display()
        );
    }
    r
}

async fn serve_file(path: &Path, req: Request<axum::body::Body>) -> Response {
    match tower_http::services::ServeFile::new(path)
        .try_call(req)
        .await
    {
        Ok(r) => r.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")).into_response(),
    }
}

/// The `/pxe/` routes (merged into the API router, and alone on `--pxe-listen`).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/pxe/boot.ipxe", get(boot_ipxe))
        .route(
            "/pxe/vmlinuz",
            get(|State(st): State<Arc<AppState>>, req| file(KERNEL, st, req)),
        )
        .route(
            "/pxe/initrd.img",
            get(|State(st): State<Arc<AppState>>, req| file(INITRD, st, req)),
        )
}

/// `serve --pxe-listen ADDR`: plain HTTP with only the `/pxe/` routes, for iPXE builds
/// without HTTPS (Debian's). Runs until the runtime stops.
pub async fn serve_plain(st: Arc<AppState>, listen: SocketAddr) -> anyhow::Result<()> {
    let app = router()
        .layer(axum::Extension(PlainListener))
        .with_state(st)
        .into_make_service();
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        if let Some(addr) = h.listening().await {
            println!("pxe listening on http://{addr}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
    });
    axum_server::bind(listen)
        .handle(handle)
        .serve(app)
        .await
        .with_context(|| format!("serving PXE on {listen}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> PxeConfig {
        PxeConfig {
            args: "console=ttyS0 panic=-1".into(),
            ..PxeConfig::default()
        }
    }

    #[test]
    fn macs_are_checked_strictly() {
        assert_eq!(parse_mac("52:54:00:AB:cd:01").unwrap(), "52:54:00:ab:cd:01");
        assert_eq!(parse_mac("52-54-00-ab-cd-01").unwrap(), "52:54:00:ab:cd:01");
        for bad in [
            "",
            "52:54:00:ab:cd",
            "52:54:00:ab:cd:01:02",
            "52:54:00-ab:cd:01",
            "52:54:00:ab:cd:0g",
            "5254.00ab.cd01...",
            "52:54:00:ab:cd:1 ",
            "01:00:5e:00:00:01",
            "ff:ff:ff:ff:ff:ff",
            "00:00:00:00:00:00",
            "52:54:00:ab:cd:01\n",
            "52::54:00:ab:cd:1",
            "５２:54:00:ab:cd:01",
        ] {
            assert!(parse_mac(bad).is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn query_is_mac_and_optional_choice_only() {
        let r = parse_query(Some("mac=52:54:00:00:77:01")).unwrap();
        assert_eq!(r.mac, "52:54:00:00:77:01");
        assert_eq!(r.want, Want::Auto);
        let r = parse_query(Some("mac=52%3A54%3a00%3A00%3A77%3A01&want=console")).unwrap();
        assert_eq!(
            (r.mac.as_str(), r.want),
            ("52:54:00:00:77:01", Want::Console)
        );
        assert_eq!(
            parse_query(Some("want=agent&mac=52:54:00:00:77:01"))
                .unwrap()
                .want,
            Want::Agent
        );
        for bad in [
            None,
            Some(""),
            Some("mac="),
            Some("mac"),
            Some("want=agent"),
            Some("mac=52:54:00:00:77:01&mac=52:54:00:00:77:02"),
            Some("mac=52:54:00:00:77:01&want=shell"),
            Some("mac=52:54:00:00:77:01&want=agent&want=agent"),
            Some("mac=52:54:00:00:77:01&x=1"),
            Some("mac=52:54:00:00:77:01%"),
            Some("mac=52:54:00:00:77:01%zz"),
            Some("mac=%ff%fe"),
            Some("mac=${net0/mac}"),
            Some("mac=52:54:00:00:77:01%0Akernel%20http://evil/x"),
        ] {
            assert!(parse_query(bad).is_err(), "{bad:?} accepted");
        }
        let long = format!("mac=52:54:00:00:77:01&want=agent{}", "&".repeat(200));
        assert!(parse_query(Some(&long)).unwrap_err().contains("bytes"));
    }

    /// Deterministic mutations of a valid query: whatever comes out is refused or a clean
    /// lower-case MAC (never a panic, never text that could leave the script's line).
    #[test]
    fn mutated_queries_never_panic_or_leak() {
        let base = b"mac=52:54:00:00:77:01&want=console".to_vec();
        let mut x: u64 = 0x9e3779b97f4a7c15;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for _ in 0..20_000 {
            let mut q = base.clone();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() % (q.len() as u64 + 1)) as usize;
                match next() % 3 {
                    0 if pos < q.len() => q[pos] = next() as u8,
                    1 => q.insert(pos.min(q.len()), next() as u8),
                    _ if pos < q.len() => {
                        q.remove(pos);
                    }
                    _ => {}
                }
            }
            let Ok(s) = std::str::from_utf8(&q) else {
                continue;
            };
            if let Ok(r) = parse_query(Some(s)) {
                assert_eq!(r.mac.len(), 17);
                assert!(r.mac.bytes().all(|c| c.is_ascii_hexdigit() || c == b':'));
                assert!(!r.mac.bytes().any(|c| c.is_ascii_uppercase()));
            }
        }
    }

    #[test]
    fn decisions() {
        let work = BootWork::Work("job 3 deploy os 2.1".into());
        assert!(matches!(
            decide(&work, Want::Auto, false),
            Answer::Agent { console: false, .. }
        ));
        assert!(matches!(
            decide(&BootWork::Idle, Want::Auto, true),
            Answer::Local { .. }
        ));
        assert!(matches!(
            decide(&BootWork::Unknown, Want::Auto, false),
            Answer::Local { .. }
        ));
        assert!(matches!(
            decide(&BootWork::Unknown, Want::Auto, true),
            Answer::Agent { console: false, .. }
        ));
        // A choice made at the device wins over "no work".
        assert!(matches!(
            decide(&BootWork::Idle, Want::Agent, false),
            Answer::Agent { console: false, .. }
        ));
        assert!(matches!(
            decide(&BootWork::Unknown, Want::Console, false),
            Answer::Agent { console: true, .. }
        ));
    }

    #[test]
    fn scripts_for_work_and_no_work() {
        let c = cfg();
        let agent = render(
            "52:54:00:00:77:01",
            &decide(
                &BootWork::Work("job 3 deploy os 2.1".into()),
                Want::Auto,
                false,
            ),
            &c,
            "http://10.77.0.1:8081/pxe",
            Some("https://10.77.0.1:8443"),
        );
        assert!(agent.starts_with("#!ipxe\n"), "{agent}");
        assert!(agent.contains("kernel --name vmlinuz http://10.77.0.1:8081/pxe/vmlinuz initrd=initrd.img img.server=https://10.77.0.1:8443 console=ttyS0 panic=-1 || goto failed\n"), "{agent}");
        assert!(
            agent.contains(
                "initrd --name initrd.img http://10.77.0.1:8081/pxe/initrd.img || goto failed\n"
            ),
            "{agent}"
        );
        assert!(
            agent.contains("\nboot || goto failed\n:failed\n"),
            "{agent}"
        );
        assert!(agent.trim_end().ends_with("\nexit 1"), "{agent}");
        assert!(agent.contains("job 3 deploy os 2.1"), "{agent}");

        let local = render(
            "52:54:00:00:77:01",
            &decide(&BootWork::Idle, Want::Auto, false),
            &c,
            "http://10.77.0.1:8081/pxe",
            Some("https://10.77.0.1:8443"),
        );
        assert!(local.starts_with("#!ipxe\n"), "{local}");
        assert!(local.contains("no work"), "{local}");
        assert!(
            !local.contains("kernel") && !local.contains("initrd"),
            "{local}"
        );
        assert!(
            local.trim_end().ends_with("\nset img-answer local\nexit 1"),
            "{local}"
        );

        let console = render(
            "52:54:00:00:77:01",
            &decide(&BootWork::Idle, Want::Console, false),
            &c,
            "http://x/pxe",
            None,
        );
        assert!(
            console.contains("panic=-1 img.console || goto failed"),
            "{console}"
        );
        assert!(!console.contains("img.server="), "{console}");

        // The administrator's img.server= wins over the derived one.
        let own = PxeConfig {
            args: "img.server=https://imaging.example:443".into(),
            ..cfg()
        };
        let s = render(
            "52:54:00:00:77:01",
            &decide(&BootWork::Unknown, Want::Auto, true),
            &own,
            "http://x/pxe",
            Some("https://10.77.0.1:8443"),
        );
        assert_eq!(s.matches("img.server=").count(), 1, "{s}");
        assert!(s.contains("img.server=https://imaging.example:443"), "{s}");
        assert!(s.contains("enrolling new devices"), "{s}");

        let unknown = render(
            "52:54:00:00:77:01",
            &decide(&BootWork::Unknown, Want::Auto, false),
            &c,
            "http://x/pxe",
            None,
        );
        assert!(
            unknown.contains("--pxe-enrol") && unknown.contains("\nexit 1\n"),
            "{unknown}"
        );
        assert!(!unknown.contains("kernel"), "{unknown}");
    }

    #[test]
    fn host_headers() {
        assert_eq!(host_part("10.77.0.1:8081"), Some("10.77.0.1"));
        assert_eq!(host_part("imaging.example"), Some("imaging.example"));
        assert_eq!(host_part("[fd00::1]:8081"), Some("[fd00::1]"));
        for bad in [
            "",
            "a b",
            "x:80:80",
            "x:port",
            "x:123456",
            "evil/x",
            "${net0/mac}",
            "[fd00::1",
            "[]",
            "[fd00::1]x",
            "[fd00::g]",
            "a\nkernel",
        ] {
            assert_eq!(host_part(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn settings_that_would_break_the_script_are_refused() {
        assert!(cfg().check().is_ok());
        for bad in [
            PxeConfig {
                args: "console=ttyS0 ${evil}".into(),
                ..cfg()
            },
            PxeConfig {
                args: "a  b".into(),
                ..cfg()
            },
            PxeConfig {
                files_url: Some("ftp://x".into()),
                ..cfg()
            },
            PxeConfig {
                files_url: Some("http://x/a b".into()),
                ..cfg()
            },
            PxeConfig {
                agent_url: Some("https://x/\"".into()),
                ..cfg()
            },
        ] {
            assert!(bad.check().is_err(), "{bad:?}");
        }
    }
}
