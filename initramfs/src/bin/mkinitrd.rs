//! `mkinitrd`: build the agent's initrd and report its size.
//!
//! ```text
//! mkinitrd -o initrd.img --agent target/x86_64-unknown-linux-musl/release/img \
//!     --kernel-modules target/kernel/modules/lib/modules/6.1.0-26-cloud-amd64 \
//!     [--module NAME].. [--no-default-modules] [--ca FILE] [--server-ca FILE] [--lab] \
//!     [--trusted KEY.pub].. [--config FILE] [--file SRC:DEST].. [--level 1..19] [--no-compress]
//! ```
//! A production initramfs carries a CA: without `--ca` or `--server-ca` the build is refused
//! unless `--lab` says it is a lab build (which the agent then announces at every boot).
//! The output is byte-identical for identical inputs; `SOURCE_DATE_EPOCH` sets the mtime
//! of every member (default 0).

use std::path::PathBuf;
use std::process::ExitCode;

use initramfs::{
    build, Compression, InitrdSpec, ModuleSelection, DEFAULT_MODULES, DEFAULT_ZSTD_LEVEL,
};

const USAGE: &str = "usage: mkinitrd -o OUT --agent BIN [--kernel-modules DIR] [--module NAME].. \
[--no-default-modules] [--ca FILE] [--server-ca FILE] [--lab] [--trusted KEY.pub].. [--config FILE] \
[--file SRC:DEST].. [--level N] [--no-compress]
  --ca FILE         PEM bundle for HTTPS (/etc/ssl/certs/ca-certificates.crt)
  --server-ca FILE  the management server's CA (imgserver's ca.pem): the agent trusts only it
  --lab             build without any CA (lab use; printed at every boot)";

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mkinitrd: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Result<(), String> {
    use lexopt::prelude::*;
    let mut out: Option<PathBuf> = None;
    let mut agent: Option<PathBuf> = None;
    let mut kmod_dir: Option<PathBuf> = None;
    let mut names: Vec<String> = Vec::new();
    let mut defaults = true;
    let mut ca = None;
    let mut server_ca: Option<PathBuf> = None;
    let mut lab = false;
    let mut trusted = Vec::new();
    let mut config = None;
    let mut extra = Vec::new();
    let mut level = DEFAULT_ZSTD_LEVEL;
    let mut compress = true;
    let mut p = lexopt::Parser::from_env();
    let err = |e: lexopt::Error| format!("{e}\n{USAGE}");
    while let Some(arg) = p.next().map_err(err)? {
        match arg {
            Short('o') | Long("output") => out = Some(p.value().map_err(err)?.into()),
            Long("agent") => agent = Some(p.value().map_err(err)?.into()),
            Long("kernel-modules") => kmod_dir = Some(p.value().map_err(err)?.into()),
            Long("module") => names.push(p.value().map_err(err)?.string().map_err(err)?),
            Long("no-default-modules") => defaults = false,
            Long("ca") => ca = Some(p.value().map_err(err)?.into()),
            Long("server-ca") => server_ca = Some(p.value().map_err(err)?.into()),
            Long("lab") => lab = true,
            Long("trusted") => trusted.push(p.value().map_err(err)?.into()),
            Long("config") => config = Some(p.value().map_err(err)?.into()),
            Long("file") => {
                let v = p.value().map_err(err)?.string().map_err(err)?;
                let (src, dest) = v
                    .split_once(':')
                    .ok_or(format!("--file {v}: expected SRC:DEST"))?;
                extra.push((PathBuf::from(src), dest.to_owned()));
            }
            Long("level") => level = p.value().map_err(err)?.parse().map_err(err)?,
            Long("no-compress") => compress = false,
            Short('h') | Long("help") => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(err(arg.unexpected())),
        }
    }
    let out = out.ok_or(format!("-o OUT is required\n{USAGE}"))?;
    let carries_ca = ca.is_some()
        || server_ca.is_some()
        || extra
            .iter()
            .any(|(_, d)| d.trim_start_matches('/') == "etc/img/server-ca.pem");
    if !carries_ca && !lab {
        return Err(format!(
            "no CA given: a production initramfs must carry the CA its devices verify the server with \
             (--server-ca ca.pem from `imgserver init`, or --ca BUNDLE); for a lab build say --lab\n{USAGE}"
        ));
    }
    if lab {
        eprintln!("mkinitrd: --lab: this is a lab build; it says so at every boot");
    }
    let agent = agent.ok_or(format!("--agent BIN is required\n{USAGE}"))?;
    let mut spec = InitrdSpec::new(agent);
    if let Some(dir) = kmod_dir {
        let mut all: Vec<String> = if defaults {
            DEFAULT_MODULES.iter().map(|s| s.to_string()).collect()
        } else {
            Vec::new()
        };
        all.extend(names);
        spec.modules = Some(ModuleSelection { dir, names: all });
    }
    spec.ca_bundle = ca;
    spec.server_ca = server_ca;
    spec.lab = lab;
    spec.trusted_keys = trusted;
    spec.config = config;
    spec.extra = extra;
    spec.compression = if compress {
        Compression::Zstd(level)
    } else {
        Compression::None
    };
    if let Some(epoch) = std::env::var_os("SOURCE_DATE_EPOCH") {
        spec.mtime = epoch
            .to_string_lossy()
            .parse()
            .map_err(|_| "SOURCE_DATE_EPOCH is not a number".to_string())?;
    }
    let (bytes, report) = build(&spec).map_err(|e| e.to_string())?;
    std::fs::write(&out, &bytes).map_err(|e| format!("writing {}: {e}", out.display()))?;
    // The report goes to stdout; a closed pipe (`| head`) is not an error of the build.
    use std::io::Write;
    let _ = writeln!(std::io::stdout(), "{report}written to {}", out.display());
    Ok(())
}
