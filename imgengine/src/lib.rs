//! The imaging engine: everything that moves a disk or partition image.
//!
//! A capture reads a partition's own allocation map (FAT, NTFS) or, for unknown content,
//! every block with zero runs elided, cuts what is used into chunks of a few MiB, compresses
//! each chunk into its own zstd frame and streams them out with their checksums
//! ([`format`]). A deploy reads that stream from a file, a pipe or an HTTP(S) URL, verifies
//! every chunk before a byte of it reaches the target, and writes only what the image holds
//! ([`deploy`]). The on-disk format is documented in `docs/image-format.md`.
//!
//! Module map:
//! - [`disk`]: partition tables (GPT, MBR) and the layout of a disk or disk-image file;
//! - [`fs`]: file-system detection and used-block maps (FAT12/16/32, NTFS);
//! - [`format`]: the image format (header, chunks, manifest, sealing and signatures);
//! - [`sign`]: ed25519 keys and trust;
//! - [`source`]: where an image comes from (file, stdin, HTTP(S) with Range);
//! - [`target`]: where it goes (block device or disk-image file, whole or one partition);
//! - [`io`]: the small readers and writers the pipelines are made of;
//! - [`capture`] and [`deploy`]: the two pipelines.

pub mod capture;
pub mod deploy;
pub mod disk;
pub mod error;
pub mod extent;
pub mod format;
pub mod fs;
pub mod io;
pub mod multicast;
pub mod sign;
pub mod source;
pub mod target;

pub use error::{Error, ErrorKind, Result};
pub use extent::Extent;
