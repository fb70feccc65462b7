//! The device's trust policy towards management servers (issue 9):
//!
//! - with the server's CA on the device, plain HTTP is never spoken to a management server,
//!   whatever named it (DHCP, URL list, DNS, static configuration, command line), unless the
//!   lab setting `plain_http = yes` in `lab.conf` on the boot partition allows it;
//! - the credential is bound to the identity of the server that issued it (its origin,
//!   `scheme://host:port`, and the SHA-256 fingerprint of the CA the device verified it
//!   with) and is only ever sent to that identity;
//! - only a verified server (HTTPS, checked against the device's CA or the web PKI) is
//!   believed when it says the credential is unknown.

use std::path::Path;

use anyhow::Context;
use discovery::LabSettings;
use sha2::{Digest, Sha256};
use ureq::tls::PemItem;

/// Who issued a credential: the server's origin and the CA the device verified it against.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerIdentity {
    /// `scheme://host:port`, host in lowercase, port always written.
    pub origin: String,
    /// SHA-256 (hex) over the DER of every certificate in the device's CA file; None when
    /// the server was verified with the web PKI, or not at all (plain HTTP).
    pub ca_sha256: Option<String>,
}

impl ServerIdentity {
    pub fn of(base: &str, ca: Option<&Path>) -> anyhow::Result<ServerIdentity> {
        let origin = origin(base)
            .ok_or_else(|| anyhow::anyhow!("server URL {base:?} is not an http(s) URL"))?;
        let ca_sha256 = match ca {
            Some(p) if origin.starts_with("https://") => Some(ca_fingerprint(p)?),
            _ => None,
        };
        Ok(ServerIdentity { origin, ca_sha256 })
    }

    /// HTTPS: the server proved a certificate (from the device's CA, or the web PKI).
    pub fn verified(&self) -> bool {
        self.origin.starts_with("https://")
    }

    pub fn describe(&self) -> String {
        match &self.ca_sha256 {
            // The stored fingerprint comes from a file on the FAT boot partition: no byte
            // slicing that could split a character.
            Some(f) => format!(
                "{} (CA sha256 {})",
                self.origin,
                f.chars().take(16).collect::<String>()
            ),
            None if self.verified() => format!("{} (web PKI)", self.origin),
            None => format!("{} (plain HTTP, unverified)", self.origin),
        }
    }
}

/// `scheme://host:port` of an http(s) URL (lowercase scheme and host, default port
/// written); None for anything else.
pub fn origin(url: &str) -> Option<String> {
    let (scheme, rest) = url.split_once("://")?;
    let scheme = scheme.to_ascii_lowercase();
    let default = match scheme.as_str() {
        "https" => 443,
        "http" => 80,
        _ => return None,
    };
    let authority = rest.split(['/', '?', '#']).next()?;
    if authority.is_empty() || authority.contains('@') {
        return None;
    }
    let parse_port = |p: &str| p.parse::<u16>().ok().filter(|p| *p != 0);
    let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
        let (h, after) = v6.split_once(']')?;
        let port = match after {
            "" => default,
            _ => parse_port(after.strip_prefix(':')?)?,
        };
        (format!("[{h}]"), port)
    } else {
        match authority.rsplit_once(':') {
            Some((h, p)) => (h.to_string(), parse_port(p)?),
            None => (authority.to_string(), default),
        }
    };
    if host.is_empty() {
        return None;
    }
    Some(format!("{scheme}://{}:{port}", host.to_ascii_lowercase()))
}

/// SHA-256 (hex) over the DER bytes of every certificate in a PEM file.
pub fn ca_fingerprint(ca: &Path) -> anyhow::Result<String> {
    let pem =
        std::fs::read(ca).with_context(|| format!("reading the server CA {}", ca.display()))?;
    let mut h = Sha256::new();
    let mut n = 0;
    for item in ureq::tls::parse_pem(&pem) {
        if let Ok(PemItem::Certificate(c)) = item {
            h.update(c.der());
            n += 1;
        }
    }
    if n == 0 {
        anyhow::bail!(
            "{} holds no PEM certificate: copy the ca.pem that `imgserver init` printed",
            ca.display()
        );
    }
    Ok(h.finalize().iter().map(|b| format!("{b:02x}")).collect())
}

/// Why plain HTTP to a management server is refused, with the way to allow it; None when it
/// is allowed (no server CA on the device, or the lab setting says so).
/// The server CA the device pins when none is named: `IMG_CA_FILE` (init sets it when the
/// initramfs carries the server's CA), else `ca.pem` in the boot agent's directory. The boot
/// agent, `img -discover` and `img -checkin` all take it from here.
pub fn pinned_ca() -> Option<std::path::PathBuf> {
    std::env::var_os("IMG_CA_FILE")
        .map(std::path::PathBuf::from)
        .or_else(|| {
            let p = Path::new("/bootagent/ca.pem");
            p.is_file().then(|| p.to_path_buf())
        })
}

pub fn plain_http_refusal(
    ca: Option<&Path>,
    lab: &LabSettings,
    config_dir: &Path,
) -> Option<String> {
    let ca = ca?;
    if lab.plain_http {
        return None;
    }
    Some(format!(
        "this device holds its management server's CA ({}) and talks to it only over verified HTTPS; \
         to allow plain HTTP in a lab, put `plain_http = yes` in {}",
        ca.display(),
        config_dir.join(discovery::bootconfig::LAB_FILE).display()
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn origins_are_normalised_and_only_http_s() {
        assert_eq!(
            origin("https://Srv.Example:8443/api/v1/checkin").as_deref(),
            Some("https://srv.example:8443")
        );
        assert_eq!(
            origin("http://10.0.0.1").as_deref(),
            Some("http://10.0.0.1:80")
        );
        assert_eq!(origin("HTTPS://h/repo?x").as_deref(), Some("https://h:443"));
        for bad in [
            "ftp://h/x",
            "file:///etc/passwd",
            "/repo/x.img",
            "https://",
            "https://u@h/",
            "https://h:0/",
            "https://h:99999/",
        ] {
            assert_eq!(origin(bad), None, "{bad}");
        }
    }

    /// Server-supplied URLs are untrusted: mutated inputs never panic, and whatever is
    /// accepted is a well-formed http(s) origin.
    #[test]
    fn origin_survives_mutated_urls() {
        let seeds = [
            "https://srv.example:8443/api/v1/tasks/1/upload?key=k",
            "http://[fe80::1]:80/x",
            "https://h",
        ];
        let alphabet = b":/[]@?#%.0123456789hHtTpPsS\xff";
        let mut x: u64 = 0x9E37_79B9_7F4A_7C15;
        for seed in seeds {
            for _ in 0..3000 {
                let mut b = seed.as_bytes().to_vec();
                for _ in 0..3 {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    let pos = (x as usize) % (b.len() + 1);
                    match x % 3 {
                        0 if pos < b.len() => {
                            b.remove(pos);
                        }
                        1 => b.insert(pos, alphabet[(x >> 8) as usize % alphabet.len()]),
                        _ if pos < b.len() => {
                            b[pos] = alphabet[(x >> 16) as usize % alphabet.len()]
                        }
                        _ => {}
                    }
                }
                let s = String::from_utf8_lossy(&b);
                if let Some(o) = origin(&s) {
                    assert!(
                        o.starts_with("http://") || o.starts_with("https://"),
                        "{s} -> {o}"
                    );
                    assert!(
                        o.rsplit(':').next().unwrap().parse::<u16>().is_ok(),
                        "{s} -> {o}"
                    );
                }
            }
        }
        let id = ServerIdentity {
            origin: "https://h:1".into(),
            ca_sha256: Some("ééééééééééééééééé".into()),
        };
        assert!(id.describe().contains("CA sha256"));
    }

    #[test]
    fn plain_http_is_refused_only_with_a_ca_and_without_the_lab_setting() {
        let ca = Path::new("/bootagent/ca.pem");
        let dir = Path::new("/bootagent/config");
        let why = plain_http_refusal(Some(ca), &LabSettings::default(), dir).unwrap();
        assert!(why.contains("plain_http = yes") && why.contains("/bootagent/config/lab.conf"));
        let lab = LabSettings {
            plain_http: true,
            ..LabSettings::default()
        };
        assert_eq!(plain_http_refusal(Some(ca), &lab, dir), None);
        assert_eq!(plain_http_refusal(None, &LabSettings::default(), dir), None);
    }

    #[test]
    fn identity_carries_the_ca_fingerprint_only_for_https() {
        let d = std::env::temp_dir().join(format!("img-trust-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        let bad = d.join("bad.pem");
        std::fs::write(&bad, "not a certificate").unwrap();
        assert!(ServerIdentity::of("https://h", Some(&bad)).is_err());
        let plain = ServerIdentity::of("http://h:8080/", Some(&bad)).unwrap();
        assert_eq!(plain.ca_sha256, None);
        assert!(!plain.verified());
        let web = ServerIdentity::of("https://h", None).unwrap();
        assert!(web.verified());
        assert!(ServerIdentity::of("ftp://h", None).is_err());
        std::fs::remove_dir_all(d).unwrap();
    }
}
