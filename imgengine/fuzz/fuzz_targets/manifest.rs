//! A manifest block, a footer and a signature block from untrusted bytes (what a resume
//! reads with range requests from the end or the front of an image).
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::format::fuzz_parse_manifest(data);
});
