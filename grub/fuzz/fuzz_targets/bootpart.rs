//! The boot-agent partition: partition table, FAT boot sector, FAT chains, directories
//! (long names included) and in-place writes staying inside the file.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    grub::bootpart::fuzz_bootpart(data);
});
