//! Multicast session packets and RaptorQ symbols from untrusted bytes (what a session
//! client or master receives from the network).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::multicast::fuzz_receive(data);
});
