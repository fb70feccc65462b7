//! Shared harness for the end-to-end suites (being written).
