//! `img -layout` and `img -convert`: the autogenic layout (seed 001) of a device, shown and
//! applied. Thin: the rules, the table rewrite and the backup partition's format are the
//! `autogenic` crate's.

use std::path::PathBuf;

use anyhow::Context;
use autogenic::layout::parse_size;
use imgengine::ErrorKind;

use crate::args::{value, Matches, Opt, UsageError};

pub const USAGE: &str = "\
Autogenic layout (seed 001: a backup partition holding an image to re-image from):
  -layout [-disk=DISK] [-image=SIZE|IMAGE] [-backup=SIZE] [-ca=PEM]
                                    show the layout for an image of SIZE (or of the image file or
                                    http(s) URL IMAGE: its length): flash size, boot-agent
                                    partition (kept as it is), OS partition 2, backup partition 3
                                    (FAT32, IMGBACKUP; image + 100 MB unless -backup, which only
                                    flash of 4096 MB or less allows), what stays free (flash over
                                    4096 MB keeps the seed's 4096 MB layout), and what the new
                                    table replaces; nothing is written. Without -image: the disk's
                                    partitions and its backup area's content
  -convert [-disk=DISK] -image=SIZE|IMAGE [-backup=SIZE] [-ca=PEM]
                                    apply it: the GPT is rewritten around the boot-agent partition
                                    (its entry and bytes unchanged), the backup partition formatted;
                                    the OS partition is imaged afterwards (its old content is lost)
                                    SIZE: 600MB, 2.5GB, 700MiB (MB when no unit; MB = 2^20 bytes).
                                    DISK: IMG_DISK, else the disk holding the boot-agent partition";

/// The options of `-layout` and `-convert` (`cli::VERBS`).
pub const OPTS: &[Opt] = &[
    value(&["disk"]),
    value(&["image"]),
    value(&["backup"]),
    value(&["ca"]),
];

/// `-image=`: a size, or an image whose length is the size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImageSize {
    Bytes(u64),
    /// A file or an http(s) URL.
    Image(String),
}

/// Stage two of both verbs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutArgs {
    pub disk: Option<PathBuf>,
    pub image: Option<ImageSize>,
    pub backup: Option<u64>,
    pub ca: Option<PathBuf>,
}

/// A URL, a path with a slash, or an existing file is an image; anything else a size.
fn image_arg(v: &str, verb: &str) -> Result<ImageSize, UsageError> {
    let lower = v.to_ascii_lowercase();
    if lower.starts_with("http://")
        || lower.starts_with("https://")
        || v.contains('/')
        || std::path::Path::new(v).is_file()
    {
        return Ok(ImageSize::Image(v.to_string()));
    }
    parse_size(v)
        .map(ImageSize::Bytes)
        .map_err(|e| UsageError(format!("-{verb} -image: {e}, or an image file or URL")))
}

impl LayoutArgs {
    /// The image size in bytes: given, or the image's length (files; URLs whose server
    /// sends Content-Length).
    pub fn image_bytes(&self) -> anyhow::Result<Option<u64>> {
        match &self.image {
            None => Ok(None),
            Some(ImageSize::Bytes(b)) => Ok(Some(*b)),
            Some(ImageSize::Image(s)) => {
                let loc = imgengine::source::Location::parse(s);
                let http = imgengine::source::HttpConfig {
                    ca_file: self.ca.clone(),
                    ..Default::default()
                };
                let src = imgengine::source::Source::open(&loc, &http)
                    .with_context(|| format!("finding the size of the image {s}"))?;
                let len = src.len().with_context(|| {
                    format!("{s}: the server does not say the image's length; give -image=SIZE")
                })?;
                Ok(Some(len))
            }
        }
    }
}

fn size(m: &Matches, verb: &str, name: &str) -> Result<Option<u64>, UsageError> {
    m.value(name)
        .map(|v| parse_size(v).map_err(|e| UsageError(format!("-{verb} -{name}: {e}"))))
        .transpose()
}

pub fn parse(m: Matches, verb: &str) -> Result<LayoutArgs, UsageError> {
    m.finish()?;
    let a = LayoutArgs {
        disk: m.value("disk").map(PathBuf::from),
        image: m.value("image").map(|v| image_arg(v, verb)).transpose()?,
        backup: size(&m, verb, "backup")?,
        ca: m.value("ca").map(PathBuf::from),
    };
    if verb == "convert" && a.image.is_none() {
        return Err(UsageError(
            "-convert needs -image=SIZE (the image's size sets the backup partition's)".into(),
        ));
    }
    if a.image.is_none() && a.backup.is_some() {
        return Err(UsageError(format!("-{verb} -backup needs -image=SIZE too")));
    }
    Ok(a)
}

fn disk(a: &LayoutArgs) -> anyhow::Result<PathBuf> {
    a.disk
        .clone()
        .or_else(crate::handover::boot_disk)
        .context("no disk with a boot-agent partition was found: give -disk=DISK (IMG_DISK)")
}

/// A layout the flash cannot take is a target problem (exit 5).
fn unsuitable(e: anyhow::Error) -> anyhow::Error {
    anyhow::Error::new(imgengine::Error::new(ErrorKind::Target, format!("{e:#}")))
}

/// `img -layout`.
pub fn run_layout(m: Matches) -> anyhow::Result<i32> {
    let a = parse(m, "layout")?;
    let disk = disk(&a)?;
    let Some(image) = a.image_bytes()? else {
        return show_disk(&disk);
    };
    let plan = autogenic::convert::plan_for_disk(&disk, image, a.backup).map_err(unsuitable)?;
    print!("{}", plan.describe());
    Ok(0)
}

/// `img -layout` without an image size: the partitions and the backup area.
fn show_disk(disk: &std::path::Path) -> anyhow::Result<i32> {
    let t = imgengine::target::Target::open_disk_read_only(disk)?;
    let l = imgengine::disk::read_layout(&t, t.len())
        .with_context(|| format!("reading the partition table of {}", disk.display()))?;
    println!(
        "{}: flash {} MB ({} bytes), partitions: {}",
        disk.display(),
        l.disk_size >> 20,
        l.disk_size,
        l.describe_partitions()
    );
    match autogenic::area::locate(&l)? {
        None => println!("no backup partition: `img -layout -image=SIZE` shows the layout `img -convert` would make"),
        Some(_) => match autogenic::BackupArea::open(disk, false) {
            Ok(a) => {
                let s = a.status();
                println!(
                    "{}: holds up to {} bytes; {}",
                    a.describe(),
                    a.capacity(),
                    match &s.image {
                        None => "no image".to_string(),
                        Some(i) => format!(
                            "image {} {} ({} of {} bytes verified{})",
                            i.name,
                            i.version,
                            s.verified_bytes,
                            s.size,
                            if s.complete { ", complete" } else { "" }
                        ),
                    }
                );
                if let Some(n) = a.status_note() {
                    println!("note: {n}");
                }
            }
            Err(e) => println!("backup partition: {e:#}"),
        },
    }
    Ok(0)
}

/// `img -convert`.
pub fn run_convert(m: Matches) -> anyhow::Result<i32> {
    let a = parse(m, "convert")?;
    let disk = disk(&a)?;
    let image = a.image_bytes()?.expect("checked by parse");
    let plan = autogenic::convert::plan_for_disk(&disk, image, a.backup).map_err(unsuitable)?;
    print!("{}", plan.describe());
    let done = autogenic::convert::apply(&plan)
        .map_err(|e| {
            if plan.layout.boot_agent_kept {
                e
            } else {
                unsuitable(e)
            }
        })
        .with_context(|| format!("converting {}", disk.display()))?;
    for n in &done.notes {
        println!("note: {n}");
    }
    println!(
        "converted {}: {}; backup partition {} formatted (FAT32 IMGBACKUP, {} segment(s), {} bytes for the image); image partition 2 next",
        disk.display(),
        if done.table_written {
            "partition table rewritten"
        } else {
            "partition table already right"
        },
        plan.layout.backup.number,
        done.geometry.segments.len(),
        done.geometry.capacity()
    );
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::args;
    use std::ffi::OsString;

    fn m(args: &[&str]) -> Matches {
        let v: Vec<OsString> = args.iter().map(OsString::from).collect();
        args::parse("layout", OPTS, &v).unwrap()
    }

    #[test]
    fn sizes_and_required_options() {
        let a = parse(m(&["-disk=d.img", "-image=600MB", "-backup=1GB"]), "layout").unwrap();
        assert_eq!(
            a,
            LayoutArgs {
                disk: Some("d.img".into()),
                image: Some(ImageSize::Bytes(600 << 20)),
                backup: Some(1 << 30),
                ca: None,
            }
        );
        let e = parse(m(&["-disk=d.img"]), "convert").unwrap_err();
        assert!(e.0.contains("-convert needs -image"), "{}", e.0);
        let e = parse(m(&["-image=12XB"]), "layout").unwrap_err();
        assert!(
            e.0.contains("-image") && e.0.contains("unknown unit"),
            "{}",
            e.0
        );
        assert!(parse(m(&["-backup=1GB"]), "layout").is_err());
        assert!(parse(m(&["-image=1GB", "x"]), "layout").is_err());
        let a = parse(m(&["-image=https://srv/img/w7.img"]), "convert").unwrap();
        assert_eq!(
            a.image,
            Some(ImageSize::Image("https://srv/img/w7.img".into()))
        );
        let a = parse(m(&["-image=./w7.img"]), "convert").unwrap();
        assert_eq!(a.image, Some(ImageSize::Image("./w7.img".into())));
    }
}
