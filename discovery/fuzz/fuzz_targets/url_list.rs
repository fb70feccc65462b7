//! The server URL list (first line) with a DHCP domain (second line).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discovery::urllist::fuzz_parse_url_list(data));
