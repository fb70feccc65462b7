//! Device and server messages are untrusted: the decoders must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let _ = imgserver::protocol::decode_checkin(data);
    let _ = imgserver::protocol::decode_reply(data);
});
