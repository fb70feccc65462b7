//! FAT12/16/32 boot sector and used map.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::fs::hidden::fuzz_hidden(data);
    imgengine::fs::fat::fuzz_fat(data);
    imgengine::fs::fuzz_used_map(data);
});
