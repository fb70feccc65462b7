//! modules.dep is read by PID 1 from the initramfs and by mkinitrd from a kernel package.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    initramfs::modules::fuzz_modules_dep(data);
});
