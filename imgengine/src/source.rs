//! Where an image comes from: a file, standard input, or an HTTP(S) URL.
//!
//! HTTP goes through `ureq` 3 with rustls (ring provider), certificate verification always
//! on; a private CA is trusted by giving its PEM file (`HttpConfig::ca_file`). There is no
//! switch to turn verification off: an imaging agent that writes whatever a man in the
//! middle sends is a remote-code-execution service.
//!
//! Deploys stream images of many GiB over networks that drop connections, so the body
//! reader resumes: when the connection is lost mid-body (or the server closes early), it
//! re-requests the rest with `Range: bytes=<pos>-` and carries on, up to `retries` times
//! with a doubling back-off; the caller sees one uninterrupted stream. `read_range` uses
//! the same reader for one byte range (deploy's resume reads exactly the chunks it lacks).

use std::fmt;
use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use ureq::tls::{Certificate, PemItem, RootCerts, TlsConfig, TlsProvider};
use ureq::Agent;

use crate::error::{Error, ErrorKind, IoContext, Result};

/// Where an image is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Location {
    File(PathBuf),
    Stdin,
    Url(String),
}

impl Location {
    /// "-" is standard input, `http://` and `https://` are URLs, anything else a file.
    pub fn parse(s: &str) -> Location {
        let lower = s.get(..8).unwrap_or(s).to_ascii_lowercase();
        if s == "-" {
            Location::Stdin
        } else if lower.starts_with("http://") || lower.starts_with("https://") {
            Location::Url(s.to_string())
        } else {
            Location::File(PathBuf::from(s))
        }
    }
}

impl fmt::Display for Location {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Location::File(p) => write!(f, "{}", p.display()),
            Location::Stdin => f.write_str("standard input"),
            Location::Url(u) => f.write_str(u),
        }
    }
}

/// HTTP(S) settings.
#[derive(Clone)]
pub struct HttpConfig {
    /// PEM file with the CA certificate(s) to trust instead of the public web roots.
    pub ca_file: Option<PathBuf>,
    /// Connect / response / per-read timeout; `None` = 30 s.
    pub timeout: Option<Duration>,
    /// How many times a lost connection is resumed with a Range request.
    pub retries: u32,
    /// An `Authorization` header value sent with every request for the image (e.g. a
    /// device credential for its own server's repository). ureq never forwards it across a
    /// redirect. Never shown by `Debug`.
    pub authorization: Option<String>,
}

impl fmt::Debug for HttpConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("HttpConfig")
            .field("ca_file", &self.ca_file)
            .field("timeout", &self.timeout)
            .field("retries", &self.retries)
            .field(
                "authorization",
                &self.authorization.as_ref().map(|_| "(set)"),
            )
            .finish()
    }
}

impl Default for HttpConfig {
    /// No private CA, 30 s timeouts, 5 retries: a deploy should survive a switch reboot.
    fn default() -> Self {
        HttpConfig {
            ca_file: None,
            timeout: None,
            retries: 5,
            authorization: None,
        }
    }
}

const DEFAULT_TIMEOUT: Duration = Duration::from_secs(30);

/// An opened image source.
pub struct Source {
    location: Location,
    kind: Kind,
    len: Option<u64>,
    ranges: bool,
    fetched: Arc<AtomicU64>,
}

enum Kind {
    File(Arc<File>),
    Stdin { taken: bool },
    Http(Http),
    Ranged(Arc<dyn RangeRead>),
}

/// An image held somewhere that reads at any offset (the autogenic backup partition's
/// segments): [`Source::from_ranged`] makes it a source a deploy reads exactly like a file,
/// with every check (signature, manifest, each chunk's CRC and SHA-256).
#[allow(clippy::len_without_is_empty)] // an image is never empty
pub trait RangeRead: Send + Sync {
    /// The image's length in bytes.
    fn len(&self) -> u64;
    /// Fill `buf` from `offset` (`offset + buf.len()` is at most [`RangeRead::len`]).
    fn read_exact_at(&self, buf: &mut [u8], offset: u64) -> io::Result<()>;
}

#[derive(Clone)]
struct Http {
    agent: Agent,
    url: String,
    retries: u32,
    authorization: Option<String>,
}

impl Source {
    /// Open `loc`. Files are opened and sized; URLs are probed with HEAD (or, for servers
    /// that refuse HEAD, a GET whose body is not read) for size and `Accept-Ranges`.
    pub fn open(loc: &Location, http: &HttpConfig) -> Result<Source> {
        let fetched = Arc::new(AtomicU64::new(0));
        let (kind, len, ranges) = match loc {
            Location::File(p) => {
                let f = File::open(p).ctx(|| format!("opening image {}", p.display()))?;
                let len = f
                    .metadata()
                    .ctx(|| format!("examining image {}", p.display()))?
                    .len();
                (Kind::File(Arc::new(f)), Some(len), true)
            }
            Location::Stdin => (Kind::Stdin { taken: false }, None, false),
            Location::Url(url) => {
                let h = Http {
                    agent: agent(http)?,
                    url: url.clone(),
                    retries: http.retries,
                    authorization: http.authorization.clone(),
                };
                let (len, ranges) = h.probe()?;
                (Kind::Http(h), len, ranges)
            }
        };
        Ok(Source {
            location: loc.clone(),
            kind,
            len,
            ranges,
            fetched,
        })
    }

    /// A source over `reader`, named `name` in messages ("backup partition 3 of /dev/sda");
    /// ranged like a file. The name is never opened.
    pub fn from_ranged(name: &str, reader: Arc<dyn RangeRead>) -> Source {
        Source {
            location: Location::File(PathBuf::from(name)),
            len: Some(reader.len()),
            kind: Kind::Ranged(reader),
            ranges: true,
            fetched: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Total size when known (files; HTTP with Content-Length).
    #[allow(clippy::len_without_is_empty)] // an unknown length is not "empty"
    pub fn len(&self) -> Option<u64> {
        self.len
    }

    /// file: true; HTTP: the server said `Accept-Ranges: bytes`; stdin: false.
    pub fn supports_ranges(&self) -> bool {
        self.ranges
    }

    /// Where this source reads from (addition).
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Sequential read of the whole source from byte 0 (stdin: can be called once). HTTP:
    /// a lost connection mid-body is retried with a Range request from the current
    /// position (up to `retries` times, back-off) when ranges are supported.
    pub fn stream(&mut self) -> Result<Box<dyn Read + Send>> {
        let fetched = self.fetched.clone();
        match &mut self.kind {
            Kind::File(f) => Ok(Box::new(FileRange {
                file: f.clone(),
                pos: 0,
                end: self.len.unwrap_or(0),
                fetched,
            })),
            Kind::Ranged(r) => Ok(Box::new(RangedReader {
                inner: r.clone(),
                pos: 0,
                end: r.len(),
                fetched,
            })),
            Kind::Stdin { taken } => {
                if *taken {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        "standard input can be read only once; save the image to a file first",
                    ));
                }
                *taken = true;
                Ok(Box::new(Counted {
                    inner: io::stdin(),
                    fetched,
                }))
            }
            Kind::Http(h) => Ok(Box::new(HttpBody::new(
                h.clone(),
                0,
                self.len,
                self.ranges,
                false,
                fetched,
            ))),
        }
    }

    /// `len` bytes at `offset` (file: positioned read; HTTP: Range request; stdin:
    /// Unsupported).
    pub fn read_range(&self, offset: u64, len: u64) -> Result<Box<dyn Read + Send>> {
        let end = offset
            .checked_add(len)
            .ok_or_else(|| Error::invalid(format!("range at {offset} of {len} bytes overflows")))?;
        if let Some(total) = self.len {
            if end > total {
                return Err(Error::new(
                    ErrorKind::Truncated,
                    format!(
                        "{}: bytes {offset}..{end} requested but the image has {total}",
                        self.location
                    ),
                ));
            }
        }
        let fetched = self.fetched.clone();
        match &self.kind {
            Kind::File(f) => Ok(Box::new(FileRange {
                file: f.clone(),
                pos: offset,
                end,
                fetched,
            })),
            Kind::Ranged(r) => Ok(Box::new(RangedReader {
                inner: r.clone(),
                pos: offset,
                end,
                fetched,
            })),
            Kind::Stdin { .. } => Err(Error::new(
                ErrorKind::Unsupported,
                "standard input cannot be read at an offset; save the image to a file first",
            )),
            Kind::Http(h) => {
                if !self.ranges {
                    return Err(Error::new(
                        ErrorKind::Unsupported,
                        format!("{}: the server does not support Range requests, so the image cannot be read at an offset (resume needs them)", h.url),
                    ));
                }
                Ok(Box::new(HttpBody::new(
                    h.clone(),
                    offset,
                    Some(end),
                    true,
                    true,
                    fetched,
                )))
            }
        }
    }

    /// Bytes of image data fetched so far from the network or file.
    pub fn bytes_fetched(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }
}

impl fmt::Debug for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Source")
            .field("location", &self.location)
            .field("len", &self.len)
            .field("ranges", &self.ranges)
            .finish()
    }
}

/// HTTP(S) PUT of a streamed body (chunked), for capture to a URL.
pub fn upload(url: &str, http: &HttpConfig, body: impl Read + Send + 'static) -> Result<()> {
    let agent = agent(http)?;
    let resp = agent
        .put(url)
        .send(ureq::SendBody::from_owned_reader(body))
        .map_err(|e| net_error(url, "uploading to", e))?;
    let status = resp.status().as_u16();
    if !(200..300).contains(&status) {
        return Err(Error::new(
            ErrorKind::Network,
            format!("HTTP {status} for PUT {url}: check that the server accepts uploads (WebDAV/PUT) at that path"),
        ));
    }
    Ok(())
}

fn agent(http: &HttpConfig) -> Result<Agent> {
    let mut tls = TlsConfig::builder().provider(TlsProvider::Rustls);
    if let Some(ca) = &http.ca_file {
        let pem = std::fs::read(ca).ctx(|| format!("reading CA file {}", ca.display()))?;
        let certs: Vec<Certificate<'static>> = ureq::tls::parse_pem(&pem)
            .filter_map(|item| match item {
                Ok(PemItem::Certificate(c)) => Some(c),
                _ => None,
            })
            .collect();
        if certs.is_empty() {
            return Err(Error::invalid(format!("CA file {} holds no PEM certificate; give the CA's certificate (BEGIN CERTIFICATE)", ca.display())));
        }
        tls = tls.root_certs(RootCerts::new_with_certs(&certs));
    }
    let t = Some(http.timeout.unwrap_or(DEFAULT_TIMEOUT));
    let config = Agent::config_builder()
        .tls_config(tls.build())
        .http_status_as_error(false)
        // Byte offsets must be offsets of the image, not of a gzip transfer encoding.
        .accept_encoding("identity")
        .timeout_connect(t)
        .timeout_recv_response(t)
        .timeout_per_read(t)
        .build();
    Ok(Agent::new_with_config(config))
}

fn net_error(url: &str, doing: &str, e: ureq::Error) -> Error {
    // rustls reports certificate failures through the I/O error of the TLS stream, so
    // the variant alone does not tell; the message does ("invalid peer certificate").
    let tls = matches!(e, ureq::Error::Tls(_) | ureq::Error::Rustls(_))
        || e.to_string().contains("certificate");
    let hint = if tls {
        ": the server's certificate is not trusted; if it comes from a private CA, give the CA's certificate with the CA file option"
    } else {
        ": check the URL and the network"
    };
    Error::new(ErrorKind::Network, format!("{doing} {url}{hint}")).with_source(e)
}

fn status_error(url: &str, status: u16) -> Error {
    let hint = match status {
        404 | 410 => "check the image URL",
        401 | 403 => "the server refused access; check its permissions",
        416 => "the server says the requested range is outside the image; the image changed on the server?",
        500..=599 => "the server failed; try again or check its logs",
        _ => "check the image URL and the server",
    };
    Error::new(
        ErrorKind::Network,
        format!("HTTP {status} for {url}: {hint}"),
    )
}

impl Http {
    /// (Content-Length, Accept-Ranges: bytes)
    fn probe(&self) -> Result<(Option<u64>, bool)> {
        let mut head = self.agent.head(&self.url);
        if let Some(a) = &self.authorization {
            head = head.header("Authorization", a);
        }
        let resp = head
            .call()
            .map_err(|e| net_error(&self.url, "probing", e))?;
        let mut status = resp.status().as_u16();
        let mut headers = resp.headers().clone();
        if status == 405 || status == 501 {
            // HEAD not allowed: a GET tells the same; the body is dropped unread.
            let mut get = self.agent.get(&self.url);
            if let Some(a) = &self.authorization {
                get = get.header("Authorization", a);
            }
            let resp = get.call().map_err(|e| net_error(&self.url, "probing", e))?;
            status = resp.status().as_u16();
            headers = resp.headers().clone();
        }
        if !(200..300).contains(&status) {
            return Err(status_error(&self.url, status));
        }
        let len = headers
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse().ok());
        let ranges = headers
            .get("accept-ranges")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("bytes")));
        Ok((len, ranges))
    }

    /// GET from `pos` (to `end`, exclusive, if known). `ranged`: always send a Range header
    /// (else only when pos > 0).
    fn get(&self, pos: u64, end: Option<u64>, ranged: bool) -> Result<ureq::BodyReader<'static>> {
        let mut req = self.agent.get(&self.url);
        if let Some(a) = &self.authorization {
            req = req.header("Authorization", a);
        }
        let want_range = ranged || pos > 0;
        if want_range {
            let r = match end {
                Some(e) => format!("bytes={pos}-{}", e - 1),
                None => format!("bytes={pos}-"),
            };
            req = req.header("Range", r);
        }
        let resp = req
            .call()
            .map_err(|e| net_error(&self.url, "downloading", e))?;
        let status = resp.status().as_u16();
        match status {
            206 if want_range => {
                // The server must answer the range we asked for, not another one.
                let cr = resp.headers().get("content-range").and_then(|v| v.to_str().ok()).unwrap_or("");
                let start = cr.trim().strip_prefix("bytes ").and_then(|s| s.split('-').next()).and_then(|s| s.trim().parse::<u64>().ok());
                if start != Some(pos) {
                    return Err(Error::new(
                        ErrorKind::Network,
                        format!("{}: asked for bytes from {pos}, the server sent \"Content-Range: {cr}\"", self.url),
                    ));
                }
            }
            200 if pos == 0 => {}
            200 => {
                return Err(Error::new(
                    ErrorKind::Network,
                    format!("{}: the server ignored a Range request (sent the whole file); resume is not possible with this server", self.url),
                ))
            }
            s if (200..300).contains(&s) => return Err(status_error(&self.url, s)),
            s => return Err(status_error(&self.url, s)),
        }
        Ok(resp.into_body().into_reader())
    }
}

/// The body of `[pos, end)` of a URL, resumed with Range requests when the connection
/// breaks (see the module docs).
struct HttpBody {
    http: Http,
    pos: u64,
    end: Option<u64>,
    can_resume: bool,
    ranged: bool,
    body: Option<ureq::BodyReader<'static>>,
    retries_left: u32,
    fetched: Arc<AtomicU64>,
}

impl HttpBody {
    fn new(
        http: Http,
        pos: u64,
        end: Option<u64>,
        can_resume: bool,
        ranged: bool,
        fetched: Arc<AtomicU64>,
    ) -> Self {
        let retries_left = http.retries;
        HttpBody {
            http,
            pos,
            end,
            can_resume,
            ranged,
            body: None,
            retries_left,
            fetched,
        }
    }

    /// After a failure: wait, then try again from `pos`, or give up with `why`.
    fn retry(&mut self, why: io::Error) -> io::Result<()> {
        self.body = None;
        if !self.can_resume || self.retries_left == 0 {
            let msg = if self.can_resume {
                format!(
                    "{}: connection lost at byte {} after {} retries",
                    self.http.url, self.pos, self.http.retries
                )
            } else {
                format!("{}: connection lost at byte {} and the server does not support Range requests to resume", self.http.url, self.pos)
            };
            return Err(io::Error::new(why.kind(), format!("{msg}: {why}")));
        }
        let attempt = self.http.retries - self.retries_left;
        self.retries_left -= 1;
        // 250 ms, 500 ms, 1 s ... capped at 8 s.
        std::thread::sleep(Duration::from_millis(250u64 << attempt.min(5)));
        Ok(())
    }
}

impl Read for HttpBody {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        if buf.is_empty() || self.end.is_some_and(|e| self.pos >= e) {
            return Ok(0);
        }
        let want = match self.end {
            Some(e) => buf
                .len()
                .min((e - self.pos).min(usize::MAX as u64) as usize),
            None => buf.len(),
        };
        loop {
            if self.body.is_none() {
                match self.http.get(self.pos, self.end, self.ranged) {
                    Ok(b) => self.body = Some(b),
                    Err(e)
                        if e.kind() == ErrorKind::Network
                            && e.context().starts_with("downloading") =>
                    {
                        self.retry(io::Error::other(e))?;
                        continue;
                    }
                    Err(e) => return Err(io::Error::other(e)),
                }
            }
            let body = self.body.as_mut().expect("opened above");
            match body.read(&mut buf[..want]) {
                Ok(0) => {
                    if self.end.is_some_and(|e| self.pos < e) {
                        // The server closed before the promised end.
                        self.retry(io::Error::new(
                            io::ErrorKind::UnexpectedEof,
                            "body ended early",
                        ))?;
                        continue;
                    }
                    return Ok(0);
                }
                Ok(n) => {
                    self.pos += n as u64;
                    self.fetched.fetch_add(n as u64, Ordering::Relaxed);
                    return Ok(n);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    self.retry(e)?;
                    continue;
                }
            }
        }
    }
}

/// `[pos, end)` of a file with positioned reads (no shared cursor: several readers of one
/// source may run at once).
struct FileRange {
    file: Arc<File>,
    pos: u64,
    end: u64,
    fetched: Arc<AtomicU64>,
}

impl Read for FileRange {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min((self.end.saturating_sub(self.pos)).min(usize::MAX as u64) as usize);
        if n == 0 {
            return Ok(0);
        }
        let got = self.file.read_at(&mut buf[..n], self.pos)?;
        self.pos += got as u64;
        self.fetched.fetch_add(got as u64, Ordering::Relaxed);
        Ok(got)
    }
}

/// `[pos, end)` of a [`RangeRead`].
struct RangedReader {
    inner: Arc<dyn RangeRead>,
    pos: u64,
    end: u64,
    fetched: Arc<AtomicU64>,
}

impl Read for RangedReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = buf
            .len()
            .min(1 << 20)
            .min((self.end.saturating_sub(self.pos)).min(usize::MAX as u64) as usize);
        if n == 0 {
            return Ok(0);
        }
        self.inner.read_exact_at(&mut buf[..n], self.pos)?;
        self.pos += n as u64;
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

struct Counted<R> {
    inner: R,
    fetched: Arc<AtomicU64>,
}

impl<R: Read> Read for Counted<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.fetched.fetch_add(n as u64, Ordering::Relaxed);
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn location_parsing() {
        assert_eq!(Location::parse("-"), Location::Stdin);
        assert_eq!(
            Location::parse("http://h/x.img"),
            Location::Url("http://h/x.img".into())
        );
        assert_eq!(
            Location::parse("HTTPS://h/x.img"),
            Location::Url("HTTPS://h/x.img".into())
        );
        assert_eq!(Location::parse("./http:"), Location::File("./http:".into()));
        assert_eq!(Location::parse("/tmp/a.img").to_string(), "/tmp/a.img");
        assert_eq!(Location::Stdin.to_string(), "standard input");
    }

    #[test]
    fn file_stream_and_ranges_count_bytes() {
        let p = std::env::temp_dir().join(format!("imgengine-source-{}", std::process::id()));
        let data: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        std::fs::write(&p, &data).unwrap();
        let mut s = Source::open(&Location::File(p.clone()), &HttpConfig::default()).unwrap();
        assert_eq!(s.len(), Some(100_000));
        assert!(s.supports_ranges());
        let mut all = Vec::new();
        s.stream().unwrap().read_to_end(&mut all).unwrap();
        assert!(all == data);
        let mut part = Vec::new();
        s.read_range(99_990, 10)
            .unwrap()
            .read_to_end(&mut part)
            .unwrap();
        assert_eq!(part, &data[99_990..]);
        assert_eq!(s.bytes_fetched(), 100_010);
        assert_eq!(
            s.read_range(99_990, 11).err().map(|e| e.kind()),
            Some(ErrorKind::Truncated)
        );
        std::fs::remove_file(&p).unwrap();
    }

    #[test]
    fn missing_file_and_bad_ca_file() {
        let e = Source::open(
            &Location::File("/nonexistent/x.img".into()),
            &HttpConfig::default(),
        )
        .unwrap_err();
        assert!(e.to_string().contains("/nonexistent/x.img"), "{e}");
        let http = HttpConfig {
            ca_file: Some("/etc/hostname".into()),
            ..Default::default()
        };
        let e = Source::open(&Location::Url("https://127.0.0.1:1/x".into()), &http).unwrap_err();
        assert!(e.to_string().contains("no PEM certificate"), "{e}");
    }

    #[test]
    fn connection_refused_is_a_network_error() {
        // Port 1 on loopback: nothing listens there.
        let e = Source::open(
            &Location::Url("http://127.0.0.1:1/x.img".into()),
            &HttpConfig::default(),
        )
        .unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Network);
        assert!(e.to_string().contains("http://127.0.0.1:1/x.img"), "{e}");
    }

    #[test]
    fn source_is_send() {
        fn assert_send<T: Send>() {}
        assert_send::<Source>();
    }
}
