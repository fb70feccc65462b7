//! The small readers and writers the deploy and capture pipelines are made of, one per
//! file (coreos-installer's `src/io/` habit).

pub mod read_at;

pub use read_at::ReadAt;
