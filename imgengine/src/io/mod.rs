//! The small readers and writers the deploy and capture pipelines are made of, one per
//! file (coreos-installer's `src/io/` habit).

pub mod count;
pub mod ordered;
pub mod peek;
pub mod progress;
pub mod read_at;

pub use count::{CountingReader, CountingWriter};
pub use peek::PeekReader;
pub use progress::{NoProgress, Progress};
pub use read_at::ReadAt;
