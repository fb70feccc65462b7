//! The backup area's status file: two slots of records, JSON inside.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    autogenic::area::fuzz_status(data);
});
