//! A package's image.rsp comes with an image from anywhere: the parser must never panic,
//! and what it accepts stays within its bounds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(r) = imgserver::autogenic::parse_rsp(data) {
        assert!(r.tags.len() <= imgserver::autogenic::RSP_MAX_TAGS);
        assert!(r.tags.iter().all(|t| !t.is_empty() && t.len() <= 64));
    }
});
