//! NTFS boot sector, $MFT, $Volume and $Bitmap through the ntfs crate.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    imgengine::fs::hidden::fuzz_hidden(data);
    imgengine::fs::ntfs::fuzz_ntfs(data);
});
