//! The configuration files on the boot partition (discovery.conf, netconfig.conf).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| discovery::bootconfig::fuzz_parse_config(data));
