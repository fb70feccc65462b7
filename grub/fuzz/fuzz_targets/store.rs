//! The persistent store's records and state tree.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    grub::store::fuzz_store(data);
});
