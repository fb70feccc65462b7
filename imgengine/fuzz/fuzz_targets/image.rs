//! A whole image from untrusted bytes: preamble, metadata JSON, sealed manifest and
//! signature block, chunk headers, payload decoding (CRC, zstd, SHA-256), end records.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::format::fuzz_parse_image(data);
});
