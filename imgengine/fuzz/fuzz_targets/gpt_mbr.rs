//! Partition tables (GPT through the gpt crate, MBR + EBR chain) of a whole disk, plus the
//! file-system probes read_layout runs on every partition it finds.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::disk::fuzz_read_layout(data);
});
