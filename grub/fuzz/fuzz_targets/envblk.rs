//! grubenv is read from the device's disk by the agent and by `img -bootnext`.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    grub::env::fuzz_check(data);
});
