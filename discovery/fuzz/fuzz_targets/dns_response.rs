//! A DNS response from the network: message decoding, A/CNAME/SRV extraction, RFC 2782 order.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discovery::dns::fuzz_decode_response(data));
