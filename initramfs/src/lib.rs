//! Building the initrd.
//!
//! This crate will produce a reproducible compressed newc cpio with the static-musl agent as
//! `/init` (and `img` for the console), the kernel modules the device needs with their
//! dependencies, CA certificates, trusted image keys and the default configuration. Nothing
//! lives here yet.
