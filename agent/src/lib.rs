//! The boot agent as a library: everything the `img` binary does, so that `main` only picks
//! the personality, parses and dispatches, and so that the end-to-end suites drive the same
//! check-in client the devices run (`agent::checkin`) instead of compiling its files again.
//!
//! The modules, by command family:
//! - [`cli`], [`args`]: the table of `img` verbs and the one two-stage parser they share;
//! - [`imaging`], [`progress`]: `-dump`, `-make`, `-restore`, `-info`, `-verify`, `-sign`,
//!   `-keygen` over the `imgengine` library;
//! - [`discover`], [`bootflow`]: finding the management server (`-discover`, `-serverurl`,
//!   `-netconfig`, `-findserver`) and the boot agent's start-up flow;
//! - [`checkin`]: check-in and jobs, the device end of the protocol (`-checkin`);
//! - [`bootstore`], [`install`], [`handover`]: the boot-agent partition, its power-cut-safe
//!   store, `-install` and `-bootnext`;
//! - [`init`], [`bootagent`], [`console`], [`personality`]: PID 1, the boot agent and its
//!   console;
//! - [`service`]: `-service`, the agent inside the guest OS;
//! - [`exit`]: exit codes from errors;
//! - [`alloc`]: the binary's allocator (musl's, with a bounded cache of large blocks).

pub mod alloc;
pub mod args;
pub mod autogenic;
pub mod bootagent;
pub mod bootflow;
pub mod bootstore;
pub mod checkin;
pub mod cli;
pub mod console;
pub mod discover;
pub mod exit;
pub mod handover;
pub mod imaging;
pub mod init;
pub mod install;
pub mod layout;
pub mod personality;
pub mod progress;
pub mod service;
pub mod session;
