//! The small readers and writers the deploy and capture pipelines are made of, one per
//! file (coreos-installer's `src/io/` habit).

pub mod count;
pub mod decompress;
pub mod ordered;
pub mod peek;
pub mod pool;
pub mod progress;
pub mod read_at;
pub mod write_at;

pub use count::{CountingReader, CountingWriter};
pub use decompress::{Compressor, DecompressReader};
pub use peek::PeekReader;
pub use progress::{NoProgress, Progress};
pub use read_at::ReadAt;
pub use write_at::WriteAt;

/// The buffer between a pipeline and its file, pipe or HTTP body: 256 KiB.
///
/// `BufReader`'s default 8 KiB is too small to amortise the cost of a read: an image is a
/// run of 76-byte chunk headers each followed by its payload, and with a small buffer
/// every header costs a system call (or an HTTP body read, with its TLS record). 256 KiB
/// is where larger buffers stop paying (coreutils measured the same for `cat` and `cp`,
/// `src/ioblksize.h`), and it stays small beside the 32 MiB the deploy pipeline holds.
/// Payloads larger than the buffer bypass it.
pub const BUFFER_SIZE: usize = 256 << 10;
