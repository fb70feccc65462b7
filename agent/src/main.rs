//! One static binary, three personalities: PID 1 of the initramfs, the boot agent, and the
//! `img` console command. `main` only picks the personality, parses and dispatches; the work
//! lives in the libraries (`imgengine`, `discovery`) and in one module per command family.

mod args;
mod bootagent;
mod bootflow;
mod bootstore;
mod checkin;
mod console;
mod discover;
mod exit;
mod handover;
mod imaging;
mod init;
mod install;
mod personality;
mod progress;
mod session;

use std::ffi::OsString;

use args::ImgCommand;
use exit::Exit;
use personality::Personality;

const USAGE: &str = "\
img: disk and partition imaging for thin clients and PCs

usage: img -VERB [options]          (options may also be written with --)

  -dump [DISK] [-json]              disks and partitions: size, type, label, file system, used bytes;
                                    the boot-agent partition, its store and grubenv
  -make DEST [-disk=DISK] [-part=N|LABEL] [-comp=0..9] [-name=] [-version=] [-model=M,..]
        [-desc=TEXT] [-raw] [-chunk=MiB] [-threads=N] [-ca=PEM]
                                    capture a disk or one partition (used blocks only) to a file,
                                    `-` (stdout) or an http(s) URL (HTTP PUT)
                                    -comp: 0 none, 1 fastest (default), 6 balanced, 9 smallest
  -restore SRC [-disk=DISK] [-part=N|LABEL] [-trust=KEY.pub].. [-resume=auto|always|never]
        [-state=DIR] [-threads=N] [-ca=PEM] [-model=M] [-force] [-wholedisk] [-unsigned]
                                    deploy an image (ours, or raw .img/.img.zst/.img.gz/.img.xz)
                                    from a file, `-` (stdin) or an http(s) URL; chunks already
                                    intact on the target are skipped (re-run to resume);
                                    refused when the image is not for this model (-force);
                                    the target must exist and be large enough (never grown);
                                    a partition image needs -part (or -wholedisk: over the
                                    whole disk, no partition table)
  -info IMAGE [-json] [-ca=PEM]     show an image's metadata
  -verify IMAGE [-trust=KEY.pub].. [-ca=PEM]
                                    check every chunk (and the signature) without writing
  -keygen KEYFILE                   make an ed25519 key pair: KEYFILE (secret), KEYFILE.pub
  -sign IMAGE -key=KEYFILE [-out=FILE]
                                    seal and sign an image
  -help, -version

DISK is a block device (/dev/sda, /dev/mmcblk0) or a disk-image file. Trusted keys are also
read from /etc/img/trusted.d/*.pub (IMG_TRUSTED_DIR). -restore needs one: unsigned, raw or
wrongly signed images are refused before anything is written; with no trusted key at all
nothing is restored unless -unsigned (lab only, printed as a warning) is given.
Exit codes: 0 ok, 1 failure, 2 usage, 3 corrupt/truncated image, 4 signature refused,
5 unsuitable target, 6 network, 7 I/O, 8 unsupported, 9 no server found.";

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
        Personality::Agent | Personality::Img => run_img(&rest),
    };
    std::process::exit(code);
}

/// Run one `img` command line and return its exit code, printing errors as
/// `img: <what failed>: <why>` with the whole cause chain.
fn run_img(args: &[OsString]) -> i32 {
    let quiet = std::env::var_os("IMG_QUIET").is_some();
    let cmd = match args::parse_img(args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("img: {e}");
            return Exit::Usage.code();
        }
    };
    let result: anyhow::Result<i32> = match &cmd {
        ImgCommand::Help => {
            println!("{USAGE}");
            println!("\nFinding the server:\n{}", discover::USAGE);
            println!("\nCheck-in:\n{}", checkin::USAGE);
            println!("\nBoot-agent partition:\n{}", install::USAGE);
            println!("{}", handover::USAGE);
            println!("\n{}", session::USAGE);
            Ok(0)
        }
        ImgCommand::Version => {
            println!("img {}", env!("CARGO_PKG_VERSION"));
            Ok(0)
        }
        ImgCommand::Dump { disk, json } => {
            imaging::dump(disk.as_deref(), *json).map(|_| Exit::Success.code())
        }
        ImgCommand::Make(m) => imaging::make(m, quiet).map(|_| Exit::Success.code()),
        ImgCommand::Restore(r) => imaging::restore(r, quiet).map(|_| Exit::Success.code()),
        ImgCommand::Info { image, json, ca } => {
            imaging::info(image, *json, ca.as_deref()).map(|_| Exit::Success.code())
        }
        ImgCommand::Verify {
            image,
            trust,
            ca,
            threads,
        } => imaging::verify(image, trust, ca.as_deref(), *threads, quiet)
            .map(|_| Exit::Success.code()),
        ImgCommand::Sign { image, key, out } => {
            imaging::sign_image(image, key, out.as_deref()).map(|_| Exit::Success.code())
        }
        ImgCommand::Keygen { key } => imaging::keygen(key).map(|_| Exit::Success.code()),
        ImgCommand::Other { verb, rest } => other_family(verb, rest.clone()),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("img: {e:#}");
            Exit::from_error(&e).code()
        }
    }
}

/// Verbs that belong to the other command families (discovery, check-in, install).
fn other_family(verb: &str, rest: Vec<OsString>) -> anyhow::Result<i32> {
    if let Some(r) = discover::dispatch(verb, rest.clone()) {
        return r;
    }
    // -checkin -disk=DISK keeps its state in DISK's boot-agent partition (bootstore.rs).
    if let Some(r) = bootstore::dispatch_checkin(verb, rest.clone()) {
        return r;
    }
    if let Some(r) = checkin::dispatch(verb, rest.clone()) {
        return r;
    }
    if let Some(r) = install::dispatch(verb, rest.clone()) {
        return r;
    }
    if let Some(r) = session::dispatch(verb, rest.clone()) {
        return r;
    }
    if let Some(r) = handover::dispatch(verb, rest) {
        return r;
    }
    Err(args::UsageError(format!("unknown verb -{verb}")).into())
}
