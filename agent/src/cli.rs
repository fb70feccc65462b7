//! The verbs of `img`, in one table ([`VERBS`]), and the one way a command line reaches
//! them: [`run_img`] finds the verb, matches its options ([`args::parse`], stage one), and
//! calls the verb's `run`, which builds its typed request (stage two) and does the work.
//! A [`UsageError`] from either stage exits 2 with a message that names the option and
//! says `img -help`; `tests/tests/img_cli.rs` runs every verb of the table with a bogus option
//! and with a missing value to keep it so.

use std::ffi::OsString;

use crate::args::{self, Matches, Opt, Token, UsageError};
use crate::exit::Exit;
use crate::{bootstore, checkin, discover, handover, imaging, install, layout, service, session};

/// One verb of `img`.
pub struct Verb {
    /// Its names without the dash; the first is the one messages use (`-dump`, alias `-d`).
    pub names: &'static [&'static str],
    /// Its options: anything else is refused before `run` is called.
    pub opts: &'static [Opt],
    /// Builds the typed request from the matched options (errors: [`UsageError`]) and does
    /// the work; returns the exit code.
    pub run: fn(Matches) -> anyhow::Result<i32>,
}

/// Every verb `img` answers.
///
/// Adding a verb is one entry here, next to its family. For example a `-session NAME
/// [-master|-m] [-clients=N] [-timeout=S] [-latejoin] [-disk=DISK] ...` verb in session.rs:
///
/// ```text
/// // session.rs, next to its USAGE lines:
/// use crate::args::{flag, value, Matches, Opt, UsageError};
/// pub const OPTS: &[Opt] = &[
///     flag(&["master", "m"]),   // first name is the one the code asks for; then aliases
///     flag(&["latejoin"]),      // -latejoin
///     value(&["clients"]),      // -clients=N or -clients N, at most once
///     value(&["timeout"]),
///     value(&["disk"]),
///     // many(&["..."]) for an option that may be repeated
/// ];
/// pub fn run(mut m: Matches) -> anyhow::Result<i32> {
///     let name = m.operand("a session name")?;   // "-session needs a session name"
///     m.finish()?;                               // no operand left over
///     let clients: Option<u32> = m.number("clients")?;
///     let master = m.flag("master");
///     // ... values out of range: Err(UsageError("...".into()).into()), which exits 2
/// }
///
/// // here:
/// Verb { names: &["session"], opts: session::OPTS, run: session::run },
/// ```
///
/// plus `pub mod session;` in lib.rs, its usage lines in [`help`] and docs/img.md. Options
/// not in `OPTS`, flags given a value, values missing or given twice never reach `run`; the
/// usage test in img_cli.rs covers the new verb without a change.
pub const VERBS: &[Verb] = &[
    // Help and version.
    Verb {
        names: &["help", "h", "?"],
        opts: args::NONE,
        run: help,
    },
    Verb {
        names: &["version"],
        opts: args::NONE,
        run: version,
    },
    // Imaging (imaging.rs).
    Verb {
        names: &["dump", "d"],
        opts: args::DUMP,
        run: dump,
    },
    Verb {
        names: &["make"],
        opts: args::MAKE,
        run: make,
    },
    Verb {
        names: &["restore"],
        opts: args::RESTORE,
        run: restore,
    },
    Verb {
        names: &["info"],
        opts: args::INFO,
        run: info,
    },
    Verb {
        names: &["verify"],
        opts: args::VERIFY,
        run: verify,
    },
    Verb {
        names: &["sign"],
        opts: args::SIGN,
        run: sign,
    },
    Verb {
        names: &["keygen"],
        opts: args::KEYGEN,
        run: keygen,
    },
    // Finding the server (discover.rs).
    Verb {
        names: &["discover"],
        opts: discover::DISCOVER_OPTS,
        run: discover::run_discover,
    },
    Verb {
        names: &["serverurl"],
        opts: discover::CONFIG_OPTS,
        run: discover::run_serverurl,
    },
    Verb {
        names: &["netconfig"],
        opts: discover::CONFIG_OPTS,
        run: discover::run_netconfig,
    },
    Verb {
        names: &["findserver"],
        opts: discover::DISCOVER_OPTS,
        run: discover::run_findserver,
    },
    // Check-in (checkin/; with -disk=DISK the state in DISK's boot-agent partition).
    Verb {
        names: &["checkin"],
        opts: checkin::OPTS,
        run: bootstore::run_checkin,
    },
    // The agent inside the guest OS (service.rs).
    Verb {
        names: &["service"],
        opts: service::OPTS,
        run: service::run,
    },
    // The boot-agent partition (install.rs, handover.rs).
    Verb {
        names: &["install"],
        opts: install::OPTS,
        run: install::run,
    },
    Verb {
        names: &["bootnext"],
        opts: handover::OPTS,
        run: handover::run,
    },
    // Autogenic layout (layout.rs).
    Verb {
        names: &["layout"],
        opts: layout::OPTS,
        run: layout::run_layout,
    },
    Verb {
        names: &["convert"],
        opts: layout::OPTS,
        run: layout::run_convert,
    },
    // Multicast sessions (session.rs).
    Verb {
        names: &["session", "s"],
        opts: session::OPTS,
        run: session::run_verb,
    },
];

pub const USAGE: &str = "\
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

/// Stage one for a whole command line: the verb (the first word) and its matched options.
/// No words at all is `-help`. `-make=out.img` is read as `-make out.img`.
pub fn lookup(args: &[OsString]) -> Result<(&'static Verb, Matches), UsageError> {
    let Some(first) = args.first() else {
        return Ok((
            &VERBS[0],
            args::parse(VERBS[0].names[0], VERBS[0].opts, &[])?,
        ));
    };
    let (name, mut rest) = match args::tokenize(std::slice::from_ref(first))?.pop() {
        Some(Token::Opt { name, value: None }) => (name, Vec::new()),
        Some(Token::Opt {
            name,
            value: Some(v),
        }) => (name, vec![OsString::from(v)]),
        _ => {
            return Err(UsageError(format!(
                "expected a verb such as -dump, got `{}`",
                first.to_string_lossy()
            )))
        }
    };
    rest.extend(args[1..].iter().cloned());
    let verb = VERBS
        .iter()
        .find(|v| v.names.contains(&name.as_str()))
        .ok_or_else(|| UsageError(format!("unknown verb -{name}")))?;
    let m = args::parse(verb.names[0], verb.opts, &rest)?;
    Ok((verb, m))
}

/// Parse one command line and run it (errors as `Err`, for callers that want the error).
pub fn dispatch(args: &[OsString]) -> anyhow::Result<i32> {
    let (verb, m) = lookup(args)?;
    (verb.run)(m)
}

/// Run one `img` command line and return its exit code, printing errors as
/// `img: <what failed>: <why>` with the whole cause chain.
pub fn run_img(args: &[OsString]) -> i32 {
    match dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("img: {e:#}");
            Exit::from_error(&e).code()
        }
    }
}

/// `IMG_QUIET`: no progress bars or lines.
fn quiet() -> bool {
    std::env::var_os("IMG_QUIET").is_some()
}

/// `-help`: every family's usage lines.
pub fn help(m: Matches) -> anyhow::Result<i32> {
    m.finish()?;
    println!("{USAGE}");
    println!("\nFinding the server:\n{}", discover::USAGE);
    println!("\nCheck-in:\n{}", checkin::USAGE);
    println!("{}", service::USAGE);
    println!("\nBoot-agent partition:\n{}", install::USAGE);
    println!("{}", handover::USAGE);
    println!("\n{}", layout::USAGE);
    println!("\n{}", session::USAGE);
    Ok(0)
}

fn version(m: Matches) -> anyhow::Result<i32> {
    m.finish()?;
    println!("img {}", env!("CARGO_PKG_VERSION"));
    Ok(0)
}

fn dump(mut m: Matches) -> anyhow::Result<i32> {
    let (disk, json) = args::dump_args(&mut m)?;
    imaging::dump(disk.as_deref(), json)?;
    Ok(Exit::Success.code())
}

fn make(mut m: Matches) -> anyhow::Result<i32> {
    imaging::make(&args::make_args(&mut m)?, quiet())?;
    Ok(Exit::Success.code())
}

fn restore(mut m: Matches) -> anyhow::Result<i32> {
    imaging::restore(&args::restore_args(&mut m)?, quiet())?;
    Ok(Exit::Success.code())
}

fn info(mut m: Matches) -> anyhow::Result<i32> {
    let (image, json, ca) = args::info_args(&mut m)?;
    imaging::info(&image, json, ca.as_deref())?;
    Ok(Exit::Success.code())
}

fn verify(mut m: Matches) -> anyhow::Result<i32> {
    let v = args::verify_args(&mut m)?;
    imaging::verify(&v.image, &v.trust, v.ca.as_deref(), v.threads, quiet())?;
    Ok(Exit::Success.code())
}

fn sign(mut m: Matches) -> anyhow::Result<i32> {
    let (image, key, out) = args::sign_args(&mut m)?;
    imaging::sign_image(&image, &key, out.as_deref())?;
    Ok(Exit::Success.code())
}

fn keygen(mut m: Matches) -> anyhow::Result<i32> {
    imaging::keygen(&args::keygen_args(&mut m)?)?;
    Ok(Exit::Success.code())
}
