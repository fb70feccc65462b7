//! `imgserver`: the reference management server and its administrator commands
//! (see `imgserver::cli::USAGE`).
fn main() {
    std::process::exit(imgserver::cli::main_with_args(std::env::args_os().skip(1)));
}
