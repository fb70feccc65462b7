//! The PXE boot request (`/pxe/boot.ipxe?QUERY` and its Host header) comes from any host on
//! the segment: the parsers must never panic, and what they accept is a clean MAC / host.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(s) = std::str::from_utf8(data) {
        if let Ok(r) = imgserver::pxe::parse_query(Some(s)) {
            assert_eq!(r.mac.len(), 17);
            assert!(r.mac.bytes().all(|c| c.is_ascii_hexdigit() || c == b':'));
        }
        if let Some(h) = imgserver::pxe::host_part(s) {
            assert!(h.bytes().all(|c| c.is_ascii_alphanumeric() || b".-:[]".contains(&c)));
        }
    }
});
