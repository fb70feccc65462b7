//! The reference management server: devices check in over HTTPS, are told what to do, and
//! report back; administrators register images and schedule jobs from the command line.
//!
//! The pieces, in the order a check-in meets them:
//! - [`protocol`]: the versioned wire format (`docs/protocol.md`), its own crate shared with
//!   the agent and the load benchmark, re-exported here under its old path;
//! - [`api`]: the axum routes (check-in, progress, results, capture uploads) and the image
//!   repository served with Range support;
//! - [`store`]: the narrow storage interface and its SQLite implementation with migrations;
//! - [`model`]: seed 003's job model (validation, batches, device states), pure functions;
//! - [`pxe`]: the PXE boot decision (`/pxe/boot.ipxe?mac=`: the agent or the local disk);
//! - [`repo`]: registering images by reading their own metadata;
//! - [`tls`]: the device CA and server certificate made by `imgserver init`;
//! - [`cli`]: the administrator's commands and their tables;
//! - [`admin`]: the admin core (tokens, roles, audit, jobs at a time) behind the admin API
//!   `/api/v1/admin/`, the web console and the CLI;
//! - [`web`]: the web console at `/` (`docs/console.md`);
//! - [`autogenic`]: seed 001's autogenic imaging (image.rsp, BI / PI / convert validation,
//!   the layout rules, Maintenance reported by the device), pure functions.

pub use ::protocol;

pub mod admin;
pub mod api;
pub mod autogenic;
pub mod cli;
pub mod mcast;
pub mod model;
pub mod pxe;
pub mod repo;
pub mod store;
pub mod tls;
pub mod web;
