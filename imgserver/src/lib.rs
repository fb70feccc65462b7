//! The reference management server (being written).
