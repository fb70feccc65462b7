//! Settings kept on the boot-agent partition: the server URL list (seed 000, "Network
//! Setup / Servers") and the Merlin static network configuration (seed 000, "PXE ベース以外
//! のイメージング (Merlin Boot Agent)").
//!
//! Both live in small text files in the configuration directory of the boot partition, one
//! `key = value` per line, `#` starting a comment, so an administrator can also write them
//! with any editor before flashing:
//!
//! * `discovery.conf`: `serverurl`, `srvname`, `hostname`, `vendorclass`;
//! * `netconfig.conf`: `ip`, `mask`, `gw`, `server`, `proto` (default http), `port`
//!   (default 80).
//!
//! The files are untrusted input (the partition is FAT and writable by anything): they are
//! read with a size limit, unknown keys are kept aside with a note, nothing panics.

use std::fs;
use std::io;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use serde::Serialize;

use crate::urllist::{check_url_list_len, parse_url_list, Scheme};

pub const DISCOVERY_FILE: &str = "discovery.conf";
pub const NETCONFIG_FILE: &str = "netconfig.conf";
/// Lab settings that weaken the device's trust policy (see [`LabSettings`]).
pub const LAB_FILE: &str = "lab.conf";
/// Far above any real file; a larger one is not ours.
const MAX_FILE_LEN: u64 = 16 * 1024;

/// Errors reading or writing the boot-partition configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: {source} (is the boot-agent partition mounted? use -config=DIR)")]
    Io { path: PathBuf, source: io::Error },
    #[error("{path}: file is {len} bytes, larger than the 16 KiB a configuration file may be")]
    TooLarge { path: PathBuf, len: u64 },
    #[error("{0}")]
    Invalid(String),
}

/// Parses `key = value` lines. Returns the pairs in order plus notes for lines it could not
/// read.
pub fn parse_kv(text: &str) -> (Vec<(String, String)>, Vec<String>) {
    let mut pairs = Vec::new();
    let mut notes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        match line.split_once('=') {
            Some((k, v)) => pairs.push((k.trim().to_ascii_lowercase(), v.trim().to_string())),
            None => notes.push(format!("line {}: no '=' in {line:?}, ignored", n + 1)),
        }
    }
    (pairs, notes)
}

fn read_limited(path: &Path) -> Result<Option<String>, ConfigError> {
    let meta = match fs::metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(ConfigError::Io {
                path: path.into(),
                source,
            })
        }
    };
    if meta.len() > MAX_FILE_LEN {
        return Err(ConfigError::TooLarge {
            path: path.into(),
            len: meta.len(),
        });
    }
    let bytes = fs::read(path).map_err(|source| ConfigError::Io {
        path: path.into(),
        source,
    })?;
    Ok(Some(String::from_utf8_lossy(&bytes).into_owned()))
}

fn write_atomic(path: &Path, text: &str) -> Result<(), ConfigError> {
    let io_err = |source| ConfigError::Io {
        path: path.into(),
        source,
    };
    if let Some(dir) = path.parent() {
        fs::create_dir_all(dir).map_err(io_err)?;
    }
    let tmp = path.with_extension("tmp");
    fs::write(&tmp, text).map_err(io_err)?;
    fs::rename(&tmp, path).map_err(io_err)
}

/// The discovery settings an administrator may keep on the boot partition.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct DiscoverySettings {
    pub server_url_list: Option<String>,
    pub srv_name: Option<String>,
    pub host_name: Option<String>,
    pub vendor_class: Option<String>,
}

impl DiscoverySettings {
    pub fn parse(text: &str, notes: &mut Vec<String>) -> DiscoverySettings {
        let (pairs, n) = parse_kv(text);
        notes.extend(n);
        let mut s = DiscoverySettings::default();
        for (k, v) in pairs {
            let v = if v.is_empty() { None } else { Some(v) };
            match k.as_str() {
                "serverurl" => s.server_url_list = v,
                "srvname" => s.srv_name = v,
                "hostname" => s.host_name = v,
                "vendorclass" => s.vendor_class = v,
                other => notes.push(format!("{DISCOVERY_FILE}: unknown key {other:?} ignored")),
            }
        }
        s
    }

    pub fn render(&self) -> String {
        let mut out =
            String::from("# Boot agent server discovery (written by img; see docs/discovery.md)\n");
        for (k, v) in [
            ("serverurl", &self.server_url_list),
            ("srvname", &self.srv_name),
            ("hostname", &self.host_name),
            ("vendorclass", &self.vendor_class),
        ] {
            if let Some(v) = v {
                out.push_str(&format!("{k} = {v}\n"));
            }
        }
        out
    }

    pub fn load(dir: &Path, notes: &mut Vec<String>) -> Result<DiscoverySettings, ConfigError> {
        Ok(match read_limited(&dir.join(DISCOVERY_FILE))? {
            Some(t) => DiscoverySettings::parse(&t, notes),
            None => DiscoverySettings::default(),
        })
    }

    pub fn store(&self, dir: &Path) -> Result<(), ConfigError> {
        write_atomic(&dir.join(DISCOVERY_FILE), &self.render())
    }

    /// Sets the URL list after checking it the way it will be used (63 characters, every
    /// entry parsable). An empty list removes it.
    pub fn set_server_url_list(&mut self, list: &str) -> Result<(), ConfigError> {
        let list = list.trim();
        if list.is_empty() {
            self.server_url_list = None;
            return Ok(());
        }
        if list.contains('\n') {
            return Err(ConfigError::Invalid("the URL list is one line".into()));
        }
        check_url_list_len(list).map_err(|e| ConfigError::Invalid(e.to_string()))?;
        parse_url_list(list, Some("example.invalid"))
            .map_err(|e| ConfigError::Invalid(e.to_string()))?;
        self.server_url_list = Some(list.to_string());
        Ok(())
    }
}

/// Lab settings on the boot-agent partition (`lab.conf`): each one weakens the device's trust
/// policy, so none is on unless the file says `yes`, and the agent shows every one that is
/// on at every boot.
///
/// * `plain_http = yes`: the agent may talk plain HTTP to a management server even though it
///   holds the server's CA (without it, plain-HTTP candidates are skipped);
/// * `unsigned_images = yes`: the agent may deploy unsigned and raw images when it has no
///   trusted signing key (without it, nothing is deployed until a key is installed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct LabSettings {
    pub plain_http: bool,
    pub unsigned_images: bool,
}

impl LabSettings {
    /// Parses `lab.conf`. Anything but an explicit yes (`yes`, `true`, `1`, `on`) is off.
    pub fn parse(text: &str, notes: &mut Vec<String>) -> LabSettings {
        let (pairs, n) = parse_kv(text);
        notes.extend(n.into_iter().map(|n| format!("{LAB_FILE}: {n}")));
        let mut s = LabSettings::default();
        for (k, v) in pairs {
            let on = matches!(v.to_ascii_lowercase().as_str(), "yes" | "true" | "1" | "on");
            match k.as_str() {
                "plain_http" => s.plain_http = on,
                "unsigned_images" => s.unsigned_images = on,
                other => notes.push(format!("{LAB_FILE}: unknown key {other:?} ignored")),
            }
        }
        s
    }

    /// Reads `dir/lab.conf`; a missing file (or folder) means no lab setting.
    pub fn load(dir: &Path, notes: &mut Vec<String>) -> Result<LabSettings, ConfigError> {
        Ok(match read_limited(&dir.join(LAB_FILE))? {
            Some(t) => LabSettings::parse(&t, notes),
            None => LabSettings::default(),
        })
    }

    /// One console line per setting that is on (empty when none is).
    pub fn banner(&self, dir: &Path) -> Vec<String> {
        let file = dir.join(LAB_FILE);
        let mut out = Vec::new();
        if self.plain_http {
            out.push(format!(
                "LAB SETTING plain_http=yes ({}): plain HTTP to the management server is allowed; credentials and images travel unprotected",
                file.display()
            ));
        }
        if self.unsigned_images {
            out.push(format!(
                "LAB SETTING unsigned_images=yes ({}): unsigned and raw images are deployed when no signing key is trusted",
                file.display()
            ));
        }
        out
    }
}

/// The Merlin static network configuration: used instead of DHCP when present.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct StaticNetConfig {
    pub ip: Ipv4Addr,
    pub mask: Ipv4Addr,
    pub gateway: Option<Ipv4Addr>,
    pub server: Ipv4Addr,
    pub scheme: Scheme,
    pub port: u16,
}

impl StaticNetConfig {
    /// Builds the configuration from `key=value` pairs (file lines or `img -netconfig`
    /// arguments), applying the seed's defaults: protocol http, port 80 (443 when the
    /// protocol is https and no port is given).
    pub fn from_pairs(pairs: &[(String, String)]) -> Result<StaticNetConfig, ConfigError> {
        let get = |k: &str| {
            pairs
                .iter()
                .rev()
                .find(|(kk, _)| kk == k)
                .map(|(_, v)| v.as_str())
        };
        let ip_of = |k: &str, what: &str| -> Result<Option<Ipv4Addr>, ConfigError> {
            match get(k) {
                None | Some("") => Ok(None),
                Some(v) => v.parse().map(Some).map_err(|_| {
                    ConfigError::Invalid(format!("{k}={v}: the {what} must be an IPv4 address"))
                }),
            }
        };
        let need = |v: Option<Ipv4Addr>, k: &str, what: &str| {
            v.ok_or_else(|| ConfigError::Invalid(format!("{k}= is missing: give the {what}")))
        };
        let ip = need(ip_of("ip", "client address")?, "ip", "client address")?;
        let mask = need(ip_of("mask", "subnet mask")?, "mask", "subnet mask")?;
        if u32::from(mask).leading_ones() != u32::from(mask).count_ones() {
            return Err(ConfigError::Invalid(format!(
                "mask={mask}: not a contiguous subnet mask"
            )));
        }
        let gateway = ip_of("gw", "default gateway")?;
        let server = need(
            ip_of("server", "server address")?,
            "server",
            "server address",
        )?;
        let scheme = match get("proto") {
            None | Some("") => Scheme::Http,
            Some(p) => Scheme::parse(p)
                .ok_or_else(|| ConfigError::Invalid(format!("proto={p}: use http or https")))?,
        };
        let port = match get("port") {
            None | Some("") => scheme.default_port(),
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| ConfigError::Invalid(format!("port={p}: use a port 1-65535")))?,
        };
        Ok(StaticNetConfig {
            ip,
            mask,
            gateway,
            server,
            scheme,
            port,
        })
    }

    pub fn prefix_len(&self) -> u8 {
        u32::from(self.mask).count_ones() as u8
    }

    pub fn render(&self) -> String {
        let mut out = String::from("# Static network configuration (Merlin boot agent); remove this file or run `img -netconfig clear` to use DHCP\n");
        out.push_str(&format!("ip = {}\nmask = {}\n", self.ip, self.mask));
        if let Some(gw) = self.gateway {
            out.push_str(&format!("gw = {gw}\n"));
        }
        out.push_str(&format!(
            "server = {}\nproto = {}\nport = {}\n",
            self.server, self.scheme, self.port
        ));
        out
    }

    pub fn load(dir: &Path) -> Result<Option<StaticNetConfig>, ConfigError> {
        let path = dir.join(NETCONFIG_FILE);
        match read_limited(&path)? {
            None => Ok(None),
            Some(t) => {
                let (pairs, _) = parse_kv(&t);
                StaticNetConfig::from_pairs(&pairs)
                    .map(Some)
                    .map_err(|e| ConfigError::Invalid(format!("{}: {e}", path.display())))
            }
        }
    }

    pub fn store(&self, dir: &Path) -> Result<(), ConfigError> {
        write_atomic(&dir.join(NETCONFIG_FILE), &self.render())
    }

    /// Removes the static configuration (Esc at start-up, `img -netconfig clear`).
    pub fn clear(dir: &Path) -> Result<bool, ConfigError> {
        let path = dir.join(NETCONFIG_FILE);
        match fs::remove_file(&path) {
            Ok(()) => Ok(true),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
            Err(source) => Err(ConfigError::Io { path, source }),
        }
    }
}

/// Fuzz entry point for the configuration-file parsers.
pub fn fuzz_parse_config(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut notes = Vec::new();
    let s = DiscoverySettings::parse(&text, &mut notes);
    let _ = s.render();
    let (pairs, _) = parse_kv(&text);
    if let Ok(c) = StaticNetConfig::from_pairs(&pairs) {
        let _ = c.render();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lab_settings_are_off_unless_explicitly_yes() {
        let mut notes = Vec::new();
        let s = LabSettings::parse(
            "plain_http = yes\nunsigned_images = maybe\nbogus=1\n",
            &mut notes,
        );
        assert_eq!(
            s,
            LabSettings {
                plain_http: true,
                unsigned_images: false
            }
        );
        assert_eq!(notes.len(), 1, "{notes:?}");
        assert_eq!(LabSettings::parse("", &mut notes), LabSettings::default());
        let dir = std::env::temp_dir().join(format!("disc-lab-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        assert_eq!(
            LabSettings::load(&dir, &mut notes).unwrap(),
            LabSettings::default()
        );
        fs::create_dir_all(&dir).unwrap();
        fs::write(dir.join(LAB_FILE), "unsigned_images=1\n").unwrap();
        let s = LabSettings::load(&dir, &mut notes).unwrap();
        assert!(s.unsigned_images && !s.plain_http);
        assert_eq!(s.banner(&dir).len(), 1);
        assert!(s.banner(&dir)[0].starts_with("LAB SETTING unsigned_images=yes"));
        fs::remove_dir_all(&dir).unwrap();
    }

    fn pairs(s: &str) -> Vec<(String, String)> {
        parse_kv(s).0
    }

    #[test]
    fn static_config_defaults_and_round_trip() {
        let c =
            StaticNetConfig::from_pairs(&pairs("ip=10.1.0.5\nmask=255.255.255.0\nserver=10.1.0.1"))
                .unwrap();
        assert_eq!(c.scheme, Scheme::Http);
        assert_eq!(c.port, 80);
        assert_eq!(c.gateway, None);
        assert_eq!(c.prefix_len(), 24);
        let again = StaticNetConfig::from_pairs(&pairs(&c.render())).unwrap();
        assert_eq!(c, again);
        let c = StaticNetConfig::from_pairs(&pairs(
            "ip=10.1.0.5\nmask=255.255.0.0\ngw=10.1.0.254\nserver=10.1.0.1\nproto=https",
        ))
        .unwrap();
        assert_eq!((c.scheme, c.port), (Scheme::Https, 443));
    }

    #[test]
    fn static_config_errors_name_the_key() {
        let e = StaticNetConfig::from_pairs(&pairs("ip=10.1.0.5\nserver=1.2.3.4")).unwrap_err();
        assert!(e.to_string().contains("mask"), "{e}");
        let e =
            StaticNetConfig::from_pairs(&pairs("ip=10.1.0.5\nmask=255.0.255.0\nserver=1.2.3.4"))
                .unwrap_err();
        assert!(e.to_string().contains("contiguous"), "{e}");
        let e = StaticNetConfig::from_pairs(&pairs("ip=x\nmask=255.0.0.0\nserver=1.2.3.4"))
            .unwrap_err();
        assert!(e.to_string().contains("ip=x"), "{e}");
    }

    #[test]
    fn files_round_trip_on_disk() {
        let dir = std::env::temp_dir().join(format!("discovery-conf-{}", std::process::id()));
        let mut s = DiscoverySettings::default();
        s.set_server_url_list("https://a.example; 10.0.0.1:80")
            .unwrap();
        assert!(s.set_server_url_list(&"x".repeat(70)).is_err());
        s.store(&dir).unwrap();
        let mut notes = Vec::new();
        assert_eq!(DiscoverySettings::load(&dir, &mut notes).unwrap(), s);
        assert!(StaticNetConfig::load(&dir).unwrap().is_none());
        let c =
            StaticNetConfig::from_pairs(&pairs("ip=10.1.0.5\nmask=255.255.255.0\nserver=10.1.0.1"))
                .unwrap();
        c.store(&dir).unwrap();
        assert_eq!(StaticNetConfig::load(&dir).unwrap(), Some(c));
        assert!(StaticNetConfig::clear(&dir).unwrap());
        assert!(!StaticNetConfig::clear(&dir).unwrap());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn unknown_keys_and_bad_lines_are_noted() {
        let mut notes = Vec::new();
        let s = DiscoverySettings::parse("# c\nserverurl = a\nfoo=1\njunk\n", &mut notes);
        assert_eq!(s.server_url_list.as_deref(), Some("a"));
        assert_eq!(notes.len(), 2);
        for i in 0..2000u32 {
            let mut b =
                b"serverurl=a;b\nip=1.2.3.4\nmask=255.0.0.0\nserver=1.1.1.1\nport=8".to_vec();
            let pos = (i.wrapping_mul(2654435761) as usize) % b.len();
            b[pos] = (i % 256) as u8;
            fuzz_parse_config(&b);
        }
    }
}
