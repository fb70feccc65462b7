//! One static binary, three personalities: PID 1 of the initramfs, the boot agent, and the
//! `img` console command. `main` only picks the personality, parses and dispatches; the work
//! lives in the agent library (`agent::cli` holds the verb table, one module per command
//! family) and in `imgengine` and `discovery`.

use std::ffi::OsString;

use agent::personality::{self, Personality};
use agent::{bootagent, cli, init};

/// musl's allocator with a bounded cache of large freed blocks (see `agent::alloc`).
#[global_allocator]
static ALLOCATOR: agent::alloc::BlockCache = agent::alloc::BlockCache::new();

fn main() {
    let mut argv = std::env::args_os();
    let argv0 = argv
        .next()
        .map(|a| a.to_string_lossy().into_owned())
        .unwrap_or_default();
    let rest: Vec<OsString> = argv.collect();
    let code = match personality::choose(&argv0, std::process::id()) {
        Personality::Init => init::run_init(),
        Personality::Agent if rest.is_empty() => bootagent::run(),
        // `agent -VERB ...` behaves like `img -VERB ...`.
        Personality::Agent | Personality::Img => cli::run_img(&rest),
    };
    std::process::exit(code);
}
