//! Decoding the DHCP option area, and the management-server tags of seed 000.
//!
//! dhcproto decodes the options it knows, but it stops at the first malformed option and it
//! has no notion of the site-specific tags 186/187/190/192. We therefore walk the raw option
//! area ourselves (RFC 2132 §2: code, length, value; 0 is padding, 255 ends), concatenating
//! repeated codes as RFC 3396 asks, and interpret the tags exactly as the seed describes:
//!
//! * 186: the server's IPv4 address, 4 bytes;
//! * 190: secure (HTTPS) port, a 16-bit word, big endian (`0x01bb` = 443), or the same two
//!   bytes as a "2-byte array" — on the wire both forms are the same two octets;
//! * 192: plain (HTTP) port, same form;
//! * 187: legacy plain port, used only when 192 is absent;
//! * 43 (vendor-specific information) may carry the same tags encapsulated (RFC 2132 §8.4
//!   sub-options); they are read the same way. Top-level tags win over encapsulated ones.
//!
//! Anything malformed (wrong length, truncated, port 0, address 0.0.0.0 or broadcast) is
//! ignored and a note is kept for the log, never a panic.

use std::net::Ipv4Addr;

use serde::Serialize;

pub const OPT_VENDOR_SPECIFIC: u8 = 43;
pub const OPT_SERVER_ADDRESS: u8 = 186;
pub const OPT_LEGACY_PLAIN_PORT: u8 = 187;
pub const OPT_SECURE_PORT: u8 = 190;
pub const OPT_PLAIN_PORT: u8 = 192;

/// One option as received: its code and (concatenated) value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct RawOption {
    pub code: u8,
    #[serde(serialize_with = "hex_bytes")]
    pub value: Vec<u8>,
}

fn hex_bytes<S: serde::Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
    let mut out = String::with_capacity(v.len() * 2);
    for b in v {
        out.push_str(&format!("{b:02x}"));
    }
    s.serialize_str(&out)
}

/// Walks an option area (the bytes after the magic cookie, or the inside of option 43).
/// Returns the options in first-seen order with repeated codes concatenated, and notes about
/// anything malformed. Never reads past `data`.
pub fn walk_options(data: &[u8], notes: &mut Vec<String>) -> Vec<RawOption> {
    let mut out: Vec<RawOption> = Vec::new();
    let mut i = 0usize;
    while i < data.len() {
        let code = data[i];
        match code {
            0 => {
                i += 1;
                continue;
            }
            255 => break,
            _ => {}
        }
        let Some(&len) = data.get(i + 1) else {
            notes.push(format!("option {code}: length byte missing at offset {i}"));
            break;
        };
        let start = i + 2;
        let Some(end) = start.checked_add(len as usize).filter(|&e| e <= data.len()) else {
            notes.push(format!(
                "option {code}: length {len} runs past the end of the packet (offset {i})"
            ));
            break;
        };
        let value = &data[start..end];
        match out.iter_mut().find(|o| o.code == code) {
            Some(existing) => existing.value.extend_from_slice(value),
            None => out.push(RawOption {
                code,
                value: value.to_vec(),
            }),
        }
        i = end;
    }
    out
}

/// The management-server information found in one DHCP reply.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct VxcmOptions {
    /// Option 186.
    pub server: Option<Ipv4Addr>,
    /// Option 190.
    pub secure_port: Option<u16>,
    /// Option 192, or 187 when 192 is absent.
    pub plain_port: Option<u16>,
    /// True when `plain_port` came from the legacy tag 187.
    pub plain_port_is_legacy: bool,
    /// True when at least one value came from option 43.
    pub from_option_43: bool,
}

impl VxcmOptions {
    /// Reads the tags from a decoded option list, top level first, then option 43.
    pub fn from_options(opts: &[RawOption], notes: &mut Vec<String>) -> VxcmOptions {
        let mut top = TagSet::read(opts, "", notes);
        if let Some(o43) = opts.iter().find(|o| o.code == OPT_VENDOR_SPECIFIC) {
            let inner = walk_options(&o43.value, notes);
            let enc = TagSet::read(&inner, "option 43 / ", notes);
            let mut used_43 = false;
            if top.server.is_none() && enc.server.is_some() {
                top.server = enc.server;
                used_43 = true;
            }
            if top.secure.is_none() && enc.secure.is_some() {
                top.secure = enc.secure;
                used_43 = true;
            }
            if top.plain.is_none() && top.legacy.is_none() && (enc.plain.or(enc.legacy)).is_some() {
                top.plain = enc.plain;
                top.legacy = enc.legacy;
                used_43 = true;
            }
            top.from_43 = used_43;
        }
        VxcmOptions {
            server: top.server,
            secure_port: top.secure,
            plain_port: top.plain.or(top.legacy),
            plain_port_is_legacy: top.plain.is_none() && top.legacy.is_some(),
            from_option_43: top.from_43,
        }
    }

    pub fn is_empty(&self) -> bool {
        self.server.is_none() && self.secure_port.is_none() && self.plain_port.is_none()
    }
}

#[derive(Default)]
struct TagSet {
    server: Option<Ipv4Addr>,
    secure: Option<u16>,
    plain: Option<u16>,
    legacy: Option<u16>,
    from_43: bool,
}

impl TagSet {
    fn read(opts: &[RawOption], where_: &str, notes: &mut Vec<String>) -> TagSet {
        let mut t = TagSet::default();
        for o in opts {
            match o.code {
                OPT_SERVER_ADDRESS => t.server = decode_server_address(&o.value, where_, notes),
                OPT_SECURE_PORT => t.secure = decode_port(o.code, &o.value, where_, notes),
                OPT_PLAIN_PORT => t.plain = decode_port(o.code, &o.value, where_, notes),
                OPT_LEGACY_PLAIN_PORT => t.legacy = decode_port(o.code, &o.value, where_, notes),
                _ => {}
            }
        }
        t
    }
}

/// Option 186: exactly four bytes, a usable unicast address.
pub fn decode_server_address(v: &[u8], where_: &str, notes: &mut Vec<String>) -> Option<Ipv4Addr> {
    let Ok(b) = <[u8; 4]>::try_from(v) else {
        notes.push(format!(
            "{where_}option 186 ignored: {} bytes, an IPv4 address needs 4",
            v.len()
        ));
        return None;
    };
    let ip = Ipv4Addr::from(b);
    if ip.is_unspecified() || ip.is_broadcast() || ip.is_multicast() {
        notes.push(format!(
            "{where_}option 186 ignored: {ip} is not a server address"
        ));
        return None;
    }
    Some(ip)
}

/// Options 190/192/187: a 16-bit word in network order ("word form" or "2-byte array form",
/// the same two octets on the wire). Administrators also produce other widths with common
/// DHCP servers — dnsmasq sends `dhcp-option=192,80` as one byte and `190,00:01:bb` as three,
/// Windows' "Long" type is four — so any 1–4 byte big-endian integer whose value is a valid
/// port (1–65535) is read, with a note when it is not the standard two bytes. Empty or longer
/// values, port 0 and values above 65535 are ignored.
pub fn decode_port(code: u8, v: &[u8], where_: &str, notes: &mut Vec<String>) -> Option<u16> {
    if v.is_empty() || v.len() > 4 {
        notes.push(format!(
            "{where_}option {code} ignored: {} bytes, a port needs 2",
            v.len()
        ));
        return None;
    }
    let value = v.iter().fold(0u32, |acc, &b| (acc << 8) | u32::from(b));
    let port = match u16::try_from(value) {
        Ok(0) | Err(_) => {
            notes.push(format!(
                "{where_}option {code} ignored: {value} is not a port (1-65535)"
            ));
            return None;
        }
        Ok(p) => p,
    };
    if v.len() != 2 {
        notes.push(format!(
            "{where_}option {code}: {} bytes instead of 2, read as port {port}",
            v.len()
        ));
    }
    Some(port)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(bytes: &[u8]) -> (Vec<RawOption>, Vec<String>) {
        let mut notes = Vec::new();
        (walk_options(bytes, &mut notes), notes)
    }

    #[test]
    fn top_level_tags() {
        let (o, _) = opts(&[186, 4, 10, 0, 0, 5, 190, 2, 0x01, 0xbb, 192, 2, 0, 80, 255]);
        let mut notes = Vec::new();
        let v = VxcmOptions::from_options(&o, &mut notes);
        assert_eq!(v.server, Some(Ipv4Addr::new(10, 0, 0, 5)));
        assert_eq!(v.secure_port, Some(443));
        assert_eq!(v.plain_port, Some(80));
        assert!(!v.plain_port_is_legacy && !v.from_option_43);
        assert!(notes.is_empty());
    }

    #[test]
    fn legacy_187_only_without_192() {
        let mut n = Vec::new();
        let (o, _) = opts(&[186, 4, 10, 0, 0, 5, 187, 2, 0x1f, 0x90]);
        let v = VxcmOptions::from_options(&o, &mut n);
        assert_eq!(v.plain_port, Some(8080));
        assert!(v.plain_port_is_legacy);
        let (o, _) = opts(&[186, 4, 10, 0, 0, 5, 187, 2, 0x1f, 0x90, 192, 2, 0, 81]);
        let v = VxcmOptions::from_options(&o, &mut n);
        assert_eq!(v.plain_port, Some(81));
        assert!(!v.plain_port_is_legacy);
    }

    #[test]
    fn option_43_encapsulation_fills_gaps() {
        let (o, _) = opts(&[43, 8, 186, 4, 10, 9, 9, 9, 192, 0, 190, 2, 0x20, 0xfb]);
        let mut n = Vec::new();
        let v = VxcmOptions::from_options(&o, &mut n);
        assert_eq!(v.server, Some(Ipv4Addr::new(10, 9, 9, 9)));
        assert_eq!(v.secure_port, Some(8443));
        assert!(v.from_option_43);
        // Top level wins.
        let (o, _) = opts(&[186, 4, 1, 2, 3, 4, 43, 6, 186, 4, 10, 9, 9, 9]);
        let v = VxcmOptions::from_options(&o, &mut n);
        assert_eq!(v.server, Some(Ipv4Addr::new(1, 2, 3, 4)));
    }

    #[test]
    fn malformed_values_are_ignored_with_a_note() {
        let (o, _) = opts(&[
            186, 3, 10, 0, 0, 190, 5, 0, 0, 0, 1, 187, 192, 2, 0, 0, 187, 4, 0, 1, 0, 0,
        ]);
        let mut n = Vec::new();
        let v = VxcmOptions::from_options(&o, &mut n);
        assert!(v.is_empty());
        assert_eq!(n.len(), 4, "{n:?}");
        let (o, notes) = opts(&[186, 10, 1, 2]);
        assert!(o.is_empty());
        assert_eq!(notes.len(), 1);
        let (_, notes) = opts(&[186]);
        assert_eq!(notes.len(), 1);
    }

    #[test]
    fn other_port_widths_are_read_with_a_note() {
        let mut n = Vec::new();
        assert_eq!(decode_port(192, &[80], "", &mut n), Some(80));
        assert_eq!(decode_port(190, &[0, 1, 0xbb], "", &mut n), Some(443));
        assert_eq!(decode_port(190, &[0, 0, 1, 0xbb], "", &mut n), Some(443));
        assert_eq!(n.len(), 3);
        assert_eq!(decode_port(190, &[1, 0xbb], "", &mut n), Some(443));
        assert_eq!(n.len(), 3, "the standard form adds no note");
        assert_eq!(decode_port(190, &[], "", &mut n), None);
    }

    #[test]
    fn repeated_codes_are_concatenated() {
        let (o, _) = opts(&[186, 2, 10, 0, 0, 186, 2, 0, 7, 255, 186]);
        assert_eq!(o[0].value, vec![10, 0, 0, 7]);
    }
}
