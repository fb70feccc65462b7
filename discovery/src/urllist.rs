//! The locally configured server URL list (seed 000, "WTOS Boot Agent デスクトップからの VXC
//! Manager URL の設定", step 3).
//!
//! The operator types a `;`-separated list of at most 63 characters. Each entry has the form
//! `<protocol>://<host>:<port>` where protocol and port may be left out:
//!
//! * protocol missing, port 80 given: HTTP; protocol missing, another port: HTTPS;
//! * port missing: HTTPS on 443, HTTP on 80;
//! * both missing: HTTPS on 443, and a bare (single-label) host name gets the DHCP domain
//!   appended.
//!
//! The seed writes its own example as `https:://192.168.1.100:443` (a doubled colon); we
//! accept that spelling too, because operators copy it from the manual.

use std::fmt;
use std::net::Ipv4Addr;

use serde::Serialize;

/// The seed's limit on the whole list, in characters.
pub const MAX_URL_LIST_LEN: usize = 63;

/// HTTP or HTTPS: the two protocols the agent speaks to the management server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }

    pub fn default_port(self) -> u16 {
        match self {
            Scheme::Http => 80,
            Scheme::Https => 443,
        }
    }

    pub fn parse(s: &str) -> Option<Scheme> {
        match s.to_ascii_lowercase().as_str() {
            "http" => Some(Scheme::Http),
            "https" => Some(Scheme::Https),
            _ => None,
        }
    }
}

impl fmt::Display for Scheme {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One server address as the agent will try it: protocol, host (IPv4 literal or DNS name)
/// and port, all resolved from the defaults.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerUrl {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
}

impl ServerUrl {
    pub fn new(scheme: Scheme, host: impl Into<String>, port: u16) -> Self {
        ServerUrl {
            scheme,
            host: host.into(),
            port,
        }
    }

    /// The host as an IPv4 literal, when it is one.
    pub fn ipv4(&self) -> Option<Ipv4Addr> {
        self.host.parse().ok()
    }
}

impl fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}:{}", self.scheme, self.host, self.port)
    }
}

/// Why a URL list or one of its entries was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum UrlListError {
    /// The seed limits the whole list to 63 characters.
    #[error("the server URL list is {0} characters long; the limit is 63 (shorten the names, use IP addresses, or rely on DHCP/DNS for the rest)")]
    TooLong(usize),
    /// An entry could not be understood.
    #[error("server URL entry {index} {entry:?}: {reason}")]
    BadEntry {
        index: usize,
        entry: String,
        reason: &'static str,
    },
}

/// A hard bound on what we read back from the boot partition, so a corrupt file costs
/// nothing.
pub const MAX_STORED_LIST_LEN: usize = 1024;

/// Checks the seed's 63-character limit; `img -serverurl` refuses longer lists so they stay
/// usable by the original agents' Network Setup dialog.
pub fn check_url_list_len(list: &str) -> Result<(), UrlListError> {
    let len = list.chars().count();
    if len > MAX_URL_LIST_LEN {
        return Err(UrlListError::TooLong(len));
    }
    Ok(())
}

/// Parses a URL list into the addresses to try, in order. `domain` is the DHCP domain
/// (option 15) appended to bare host names. Empty entries (`a;;b`, a trailing `;`) are
/// skipped; an unparsable entry fails the whole list so that `img -serverurl` can refuse it.
///
/// The 63-character limit is *not* enforced here: the seed's own worked example is 69
/// characters long, so a list written by hand on the partition is read anyway (the caller
/// logs [`check_url_list_len`]'s complaint); only lists over 1024 characters are refused.
pub fn parse_url_list(list: &str, domain: Option<&str>) -> Result<Vec<ServerUrl>, UrlListError> {
    let len = list.chars().count();
    if len > MAX_STORED_LIST_LEN {
        return Err(UrlListError::TooLong(len));
    }
    let mut out = Vec::new();
    for (index, entry) in list.split(';').enumerate() {
        let entry = entry.trim();
        if entry.is_empty() {
            continue;
        }
        let url = parse_entry(entry, domain).map_err(|reason| UrlListError::BadEntry {
            index,
            entry: entry.to_string(),
            reason,
        })?;
        out.push(url);
    }
    Ok(out)
}

/// Parses one entry according to the seed's defaulting rules.
pub fn parse_entry(entry: &str, domain: Option<&str>) -> Result<ServerUrl, &'static str> {
    let (scheme, rest) = match entry.find("://") {
        Some(pos) => {
            // Accept the seed's own `https:://` spelling: strip one trailing ':' from the
            // protocol part.
            let proto = entry[..pos].trim_end_matches(':');
            let scheme = Scheme::parse(proto).ok_or("unknown protocol (use http or https)")?;
            (Some(scheme), &entry[pos + 3..])
        }
        None => (None, entry),
    };
    // Anything after the authority (a path) is ignored: the agent talks to fixed paths.
    let authority = rest.split('/').next().unwrap_or("");
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) => {
            let port: u16 = p.parse().map_err(|_| "port is not a number 1-65535")?;
            if port == 0 {
                return Err("port 0 is not a valid port");
            }
            (h, Some(port))
        }
        None => (authority, None),
    };
    if host.is_empty() {
        return Err("no host name or address");
    }
    if !host
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.' || b == b'_')
    {
        return Err("host contains characters not allowed in a host name");
    }
    let (scheme, port) = match (scheme, port) {
        (Some(s), Some(p)) => (s, p),
        (Some(s), None) => (s, s.default_port()),
        (None, Some(80)) => (Scheme::Http, 80),
        (None, Some(p)) => (Scheme::Https, p),
        (None, None) => (Scheme::Https, 443),
    };
    let is_ip = host.parse::<Ipv4Addr>().is_ok();
    let host = match domain {
        Some(d) if !is_ip && !host.contains('.') && !d.trim_matches('.').is_empty() => {
            format!("{host}.{}", d.trim_matches('.'))
        }
        _ => host.to_string(),
    };
    Ok(ServerUrl { scheme, host, port })
}

/// Fuzz entry point: the URL-list parser must never panic on arbitrary bytes.
pub fn fuzz_parse_url_list(data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let (list, domain) = match text.split_once('\n') {
        Some((l, d)) => (l, Some(d)),
        None => (text.as_ref(), None),
    };
    if let Ok(urls) = parse_url_list(list, domain) {
        for u in urls {
            let _ = u.to_string();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seed_worked_example() {
        let urls = parse_url_list(
            "https://vxcmserver.vxcm.cisco.com; http://192.168.1.100:88;vxcmserver",
            Some("example.org"),
        )
        .unwrap();
        let shown: Vec<String> = urls.iter().map(|u| u.to_string()).collect();
        assert_eq!(
            shown,
            [
                "https://vxcmserver.vxcm.cisco.com:443",
                "http://192.168.1.100:88",
                "https://vxcmserver.example.org:443",
            ]
        );
    }

    #[test]
    fn defaulting_rules() {
        let p = |s| parse_entry(s, None).unwrap().to_string();
        assert_eq!(p("10.0.0.1:80"), "http://10.0.0.1:80");
        assert_eq!(p("10.0.0.1:8443"), "https://10.0.0.1:8443");
        assert_eq!(p("http://10.0.0.1"), "http://10.0.0.1:80");
        assert_eq!(p("https://10.0.0.1"), "https://10.0.0.1:443");
        assert_eq!(p("10.0.0.1"), "https://10.0.0.1:443");
        assert_eq!(p("https:://192.168.1.100:443"), "https://192.168.1.100:443");
        assert_eq!(p("HTTP://Srv.example:8080/path"), "http://Srv.example:8080");
        // No domain known: the bare name stays as it is.
        assert_eq!(p("vxcmserver"), "https://vxcmserver:443");
    }

    #[test]
    fn rejects_bad_entries_and_long_lists() {
        assert!(matches!(
            check_url_list_len(&"a".repeat(64)),
            Err(UrlListError::TooLong(64))
        ));
        assert!(check_url_list_len(&"a".repeat(63)).is_ok());
        // The seed's example itself is over the limit (69 characters).
        assert!(check_url_list_len(
            "https://vxcmserver.vxcm.cisco.com; http://192.168.1.100:88;vxcmserver"
        )
        .is_err());
        assert!(parse_url_list(&"a".repeat(1025), None).is_err());
        assert!(parse_entry("ftp://x", None).is_err());
        assert!(parse_entry("x:99999", None).is_err());
        assert!(parse_entry("x:0", None).is_err());
        assert!(parse_entry("http://:80", None).is_err());
        assert!(parse_entry("bad host", None).is_err());
        assert_eq!(parse_url_list(" ; ;", None).unwrap(), vec![]);
    }

    #[test]
    fn fuzz_inputs_never_panic() {
        let seeds: [&[u8]; 4] = [
            b"https://vxcmserver.vxcm.cisco.com; http://192.168.1.100:88;vxcmserver\nd.org",
            b"a:80;b:443;c",
            b"https:://1.2.3.4:1",
            b"\xff\xfe:://:;",
        ];
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..4000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let mut input = seeds[i % seeds.len()].to_vec();
            let n = (state % 8) as usize;
            for k in 0..n {
                let r = state.rotate_left(k as u32 * 8);
                if input.is_empty() {
                    input.push(r as u8);
                    continue;
                }
                let pos = (r as usize >> 8) % input.len();
                match r % 3 {
                    0 => input[pos] = r as u8,
                    1 => input.insert(pos, b":/;."[(r >> 20) as usize % 4]),
                    _ => {
                        input.remove(pos);
                    }
                }
            }
            fuzz_parse_url_list(&input);
        }
    }
}
