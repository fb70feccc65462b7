//! HTTP Range fallback of a session client: the objects the carousel did not deliver —
//! the device was cut off from the session half-way, or the master ended the session (or
//! fell silent) before this device had everything — are fetched from a copy of the same
//! image on a server (`-server=URL`; for a session started from the server, the image's
//! own URL) by one Range request per object, only those the deploy still needs. A device
//! that still hears the session waits for the next pass instead, as the others do.
//!
//! Nothing fetched this way is trusted more than a multicast symbol: the bytes go through
//! the same checks as the received objects ([`super::client`]: the head and tail must give
//! the manifest whose digest every packet names; a chunk record's header must equal the
//! manifest's and its CRC32 must match) and then through the unchanged deploy (SHA-256 of
//! every chunk, the signature when the device trusts keys), exactly as `img -restore` from
//! that URL would check them. A copy of another size is refused before any chunk is read.

use std::io::Read as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use super::{fec, Object};
use crate::error::{Error, ErrorKind, Result};
use crate::source::{HttpConfig, Location, Source};

/// Default silence of the session (no data packet) while the deploy waits for an object,
/// after which the object is fetched by Range.
pub const DEFAULT_AFTER: Duration = Duration::from_secs(10);

/// Where a client may fetch what the carousel does not deliver.
#[derive(Debug, Clone)]
pub struct Fallback {
    /// The same image (URL, or a file path).
    pub location: Location,
    /// CA file, timeout, device credential: as for `img -restore` from that URL.
    pub http: HttpConfig,
    /// How long the deploy waits for an object, with no data packet of the session
    /// arriving meanwhile, before the object is fetched by Range.
    pub after: Duration,
}

/// The fallback of one running client: the source, opened on first use.
pub(super) struct RangeFetcher {
    cfg: Fallback,
    image_len: u64,
    source: Mutex<Option<Arc<Source>>>,
    pub objects: AtomicU64,
    pub bytes: AtomicU64,
}

impl RangeFetcher {
    pub fn new(cfg: Fallback, image_len: u64) -> RangeFetcher {
        RangeFetcher {
            cfg,
            image_len,
            source: Mutex::new(None),
            objects: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
        }
    }

    pub fn after(&self) -> Duration {
        self.cfg.after
    }

    pub fn location(&self) -> &Location {
        &self.cfg.location
    }

    fn source(&self) -> Result<Arc<Source>> {
        let mut s = self.source.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = &*s {
            return Ok(s.clone());
        }
        let src = Source::open(&self.cfg.location, &self.cfg.http)?;
        check_source(
            &self.cfg.location,
            src.len(),
            src.supports_ranges(),
            self.image_len,
        )?;
        let src = Arc::new(src);
        *s = Some(src.clone());
        Ok(src)
    }

    /// The bytes of `obj` (one Range request), not yet checked: the caller checks them as
    /// it checks a decoded object.
    pub fn fetch(&self, index: u32, obj: Object) -> Result<Vec<u8>> {
        if obj.len > fec::MAX_OBJECT || obj.offset.saturating_add(obj.len) > self.image_len {
            return Err(Error::corrupt(format!(
                "session image: object {index} ({} bytes at {}) is outside the image",
                obj.len, obj.offset
            )));
        }
        let src = self.source()?;
        let mut r = src.read_range(obj.offset, obj.len)?;
        let mut data = Vec::with_capacity(obj.len as usize);
        std::io::Read::by_ref(&mut r)
            .take(obj.len)
            .read_to_end(&mut data)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Network,
                    format!("{}: reading object {index}: {e}", self.cfg.location),
                )
            })?;
        if data.len() as u64 != obj.len {
            return Err(Error::new(
                ErrorKind::Truncated,
                format!(
                    "{}: object {index}: {} of its {} bytes arrived",
                    self.cfg.location,
                    data.len(),
                    obj.len
                ),
            ));
        }
        self.objects.fetch_add(1, Ordering::Relaxed);
        self.bytes.fetch_add(obj.len, Ordering::Relaxed);
        Ok(data)
    }
}

/// The copy must be the session's size and readable by ranges.
fn check_source(loc: &Location, len: Option<u64>, ranges: bool, image_len: u64) -> Result<()> {
    match len {
        Some(n) if n == image_len => {}
        Some(n) => {
            return Err(Error::corrupt(format!(
                "{loc}: {n} bytes, but the session's image has {image_len}: not the same image (check -server=)"
            )))
        }
        None => {
            return Err(Error::new(
                ErrorKind::Unsupported,
                format!("{loc}: the server does not say the image's size, so missing chunks cannot be fetched from it"),
            ))
        }
    }
    if !ranges {
        return Err(Error::new(
            ErrorKind::Unsupported,
            format!("{loc}: the server does not support Range requests, so missing chunks cannot be fetched from it"),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_copy_of_another_size_or_without_ranges_is_refused() {
        let l = Location::Url("http://s/i.img".into());
        assert!(check_source(&l, Some(100), true, 100).is_ok());
        let e = check_source(&l, Some(99), true, 100).unwrap_err();
        assert!(e.to_string().contains("not the same image"), "{e}");
        assert!(check_source(&l, None, true, 100).is_err());
        assert!(check_source(&l, Some(100), false, 100)
            .unwrap_err()
            .to_string()
            .contains("Range"));
    }

    #[test]
    fn objects_are_read_exactly_and_bounded() {
        let dir = std::env::temp_dir().join(format!("fallback-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("i.img");
        let bytes: Vec<u8> = (0..1000u32).map(|i| (i * 7) as u8).collect();
        std::fs::write(&p, &bytes).unwrap();
        let f = RangeFetcher::new(
            Fallback {
                location: Location::File(p.clone()),
                http: HttpConfig::default(),
                after: DEFAULT_AFTER,
            },
            1000,
        );
        let got = f
            .fetch(
                3,
                Object {
                    offset: 100,
                    len: 50,
                },
            )
            .unwrap();
        assert_eq!(got, &bytes[100..150]);
        assert!(f
            .fetch(
                4,
                Object {
                    offset: 990,
                    len: 50
                }
            )
            .is_err());
        assert_eq!(f.objects.load(Ordering::Relaxed), 1);
        // A copy of another size is refused before any chunk is read.
        let g = RangeFetcher::new(
            Fallback {
                location: Location::File(p),
                http: HttpConfig::default(),
                after: DEFAULT_AFTER,
            },
            999,
        );
        assert!(g.fetch(0, Object { offset: 0, len: 10 }).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
