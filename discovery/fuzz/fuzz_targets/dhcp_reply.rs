//! A DHCP reply from the network: header, option walk, lease fields, options 186/190/192/187
//! and the option-43 encapsulation.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discovery::dhcp::fuzz_decode_reply(data));
