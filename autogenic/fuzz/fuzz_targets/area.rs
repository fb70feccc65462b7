//! Opening a damaged backup partition (mutations of a formatted one) and writing through it.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    autogenic::area::fuzz_area_mutations(data);
});
