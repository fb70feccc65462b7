//! Finding the management server (being written).
