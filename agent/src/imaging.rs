//! The imaging verbs of `img`: `-dump`, `-make`, `-restore`, `-info`, `-verify`, `-sign`,
//! `-keygen`. Each turns resolved arguments into one call of the engine and prints what
//! happened in words an operator at the console can act on.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use imgengine::capture::{self, CaptureOptions};
use imgengine::deploy::{self, DeployOptions, OpenedImage, ResumeMode};
use imgengine::disk::{self, DiskLayout};
use imgengine::format;
use imgengine::sign;
use imgengine::source::{HttpConfig, Location, Source};
use imgengine::target::Target;

use crate::args::{DiskSel, MakeArgs, RestoreArgs, Resume, UsageError};
use crate::progress::{human, ConsoleProgress};

/// Where trusted image-signing keys live on a device (one `*.pub` file per key); the
/// initramfs builder puts the fleet's keys there. `IMG_TRUSTED_DIR` overrides it.
const TRUSTED_DIR: &str = "/etc/img/trusted.d";
/// Where resume journals are kept when `-state` is not given. `IMG_STATE_DIR` overrides it.
pub(crate) const STATE_DIR: &str = "/var/lib/img";

pub(crate) fn http_config(ca: Option<&Path>) -> HttpConfig {
    let ca_file = ca
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("IMG_CA_FILE").map(PathBuf::from));
    HttpConfig {
        ca_file,
        retries: 5,
        ..HttpConfig::default()
    }
}

pub(crate) fn threads(n: Option<usize>) -> usize {
    n.unwrap_or_else(|| {
        std::thread::available_parallelism()
            .map(|n| n.get())
            .unwrap_or(1)
    })
    .max(1)
}

/// The disk to work on: the one named, or the machine's only fixed disk.
pub(crate) fn resolve_disk(sel: &DiskSel) -> Result<PathBuf> {
    if let Some(d) = &sel.disk {
        return Ok(d.clone());
    }
    let disks: Vec<_> = disk::list_block_devices()
        .context("listing disks")?
        .into_iter()
        .filter(|d| !d.removable && d.size > 0)
        .collect();
    match disks.as_slice() {
        [one] => Ok(one.path.clone()),
        [] => Err(UsageError(
            "no disk found: name one with -disk=DEVICE or a disk-image file".into(),
        )
        .into()),
        many => {
            let names: Vec<String> = many.iter().map(|d| d.path.display().to_string()).collect();
            Err(UsageError(format!(
                "several disks ({}): choose one with -disk=DEVICE",
                names.join(", ")
            ))
            .into())
        }
    }
}

/// Trusted keys: those named with `-trust=` plus every `*.pub` in the trusted-key folder.
pub(crate) fn trusted_keys(extra: &[PathBuf]) -> Result<Vec<sign::VerifyingKey>> {
    let mut keys = Vec::new();
    for p in extra {
        keys.push(
            sign::load_public(p).with_context(|| format!("loading trusted key {}", p.display()))?,
        );
    }
    let dir = std::env::var_os("IMG_TRUSTED_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(TRUSTED_DIR));
    if dir.is_dir() {
        keys.extend(
            sign::load_trusted_dir(&dir)
                .with_context(|| format!("loading trusted keys from {}", dir.display()))?,
        );
    }
    Ok(keys)
}

pub fn dump(disk_arg: Option<&Path>, json: bool) -> Result<()> {
    let paths: Vec<PathBuf> = match disk_arg {
        Some(p) => vec![p.to_path_buf()],
        None => disk::list_block_devices()
            .context("listing disks")?
            .into_iter()
            .map(|d| d.path)
            .collect(),
    };
    let mut layouts = Vec::new();
    for p in &paths {
        if !p.exists() {
            bail!("{}: no such disk or disk-image file", p.display());
        }
        let t =
            Target::open_disk_read_only(p).with_context(|| format!("opening {}", p.display()))?;
        let layout = disk::read_layout(&t, t.len())
            .with_context(|| format!("reading the partition table of {}", p.display()))?;
        layouts.push((p.clone(), layout));
    }
    let mut out = std::io::stdout().lock();
    if json {
        let v: Vec<_> = layouts
            .iter()
            .map(|(p, l)| {
                let mut v = serde_json::json!({ "disk": p, "layout": l });
                if let Some(b) = crate::bootstore::dump_info(p) {
                    v["boot_agent"] = b;
                }
                v
            })
            .collect();
        writeln!(out, "{}", serde_json::to_string_pretty(&v)?)?;
        return Ok(());
    }
    if layouts.is_empty() {
        writeln!(out, "no disks found")?;
    }
    for (p, l) in &layouts {
        print_layout(&mut out, p, l)?;
        if let Some(b) = crate::bootstore::dump_info(p) {
            write!(out, "{}", crate::bootstore::dump_text(&b))?;
        }
    }
    Ok(())
}

fn print_layout(out: &mut impl Write, path: &Path, l: &DiskLayout) -> Result<()> {
    writeln!(
        out,
        "Disk {}: {} ({} bytes), {:?} partition table, {}-byte sectors",
        path.display(),
        human(l.disk_size),
        l.disk_size,
        l.table,
        l.sector_size
    )?;
    if l.partitions.is_empty() {
        writeln!(out, "  no partitions")?;
        return Ok(());
    }
    writeln!(
        out,
        "  {:>3}  {:>12}  {:>10}  {:<22} {:<16} {:<7} {:>10}",
        "#", "start", "size", "type", "label", "fs", "used"
    )?;
    for p in &l.partitions {
        let label = p
            .label
            .clone()
            .filter(|s| !s.is_empty())
            .or_else(|| p.fs_label.clone())
            .unwrap_or_default();
        let used = p.used_bytes.map(human).unwrap_or_else(|| "-".into());
        writeln!(
            out,
            "  {:>3}  {:>12}  {:>10}  {:<22} {:<16} {:<7} {:>10}",
            p.number,
            p.start,
            human(p.len),
            truncate(&p.type_name, 22),
            truncate(&label, 16),
            p.fs.to_string(),
            used
        )?;
    }
    Ok(())
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).chain(std::iter::once('~')).collect()
    }
}

pub fn make(a: &MakeArgs, quiet: bool) -> Result<()> {
    let disk = resolve_disk(&a.sel)?;
    let default_name = Path::new(&a.dest)
        .file_name()
        .and_then(|n| n.to_str())
        .map(|n| n.split('.').next().unwrap_or(n).to_string())
        .filter(|n| !n.is_empty() && n != "-")
        .unwrap_or_else(|| "image".into());
    let opts = CaptureOptions {
        comp: a.comp,
        name: a.name.clone().unwrap_or(default_name),
        version: a.version.clone().unwrap_or_else(|| "1".into()),
        models: a.models.clone(),
        description: a.description.clone(),
        chunk_size: a
            .chunk_mib
            .map(|m| m << 20)
            .unwrap_or(CaptureOptions::default().chunk_size),
        threads: threads(a.threads),
        raw: a.raw,
    };
    let progress = ConsoleProgress::new(quiet);
    let what = match &a.sel.part {
        Some(p) => format!("partition {p} of {}", disk.display()),
        None => format!("disk {}", disk.display()),
    };
    let summary = match Location::parse(&a.dest) {
        Location::Stdin => {
            let mut out = std::io::stdout();
            let s = capture::capture(&disk, a.sel.part.as_deref(), &mut out, &opts, &progress)
                .with_context(|| format!("capturing {what}"))?;
            out.flush().context("flushing stdout")?;
            s
        }
        Location::Url(url) => {
            let (reader, mut writer) = std::io::pipe().context("making a pipe for the upload")?;
            let http = http_config(a.ca.as_deref());
            let url2 = url.clone();
            let uploader =
                std::thread::spawn(move || imgengine::source::upload(&url2, &http, reader));
            let res = capture::capture(&disk, a.sel.part.as_deref(), &mut writer, &opts, &progress);
            drop(writer);
            let up = uploader
                .join()
                .map_err(|_| anyhow::anyhow!("the upload thread failed"))?;
            up.with_context(|| format!("uploading to {url}"))?;
            res.with_context(|| format!("capturing {what}"))?
        }
        Location::File(path) => {
            // Write beside the destination and rename at the end, so a failed capture never
            // leaves a file that looks like a complete image.
            let tmp = path.with_extension("partial");
            let mut f =
                File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
            let res = capture::capture(&disk, a.sel.part.as_deref(), &mut f, &opts, &progress);
            let s = match res {
                Ok(s) => s,
                Err(e) => {
                    let _ = std::fs::remove_file(&tmp);
                    return Err(anyhow::Error::new(e).context(format!("capturing {what}")));
                }
            };
            f.sync_all()
                .with_context(|| format!("syncing {}", tmp.display()))?;
            std::fs::rename(&tmp, &path)
                .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
            s
        }
    };
    eprintln!(
        "captured {what}: {} used, {} chunks, {} of data in a {} image",
        human(summary.used_bytes),
        summary.chunks,
        human(summary.data_bytes),
        human(summary.image_bytes)
    );
    Ok(())
}

/// Why an image is not for a device of `model`, or `None` when it is (an image that lists
/// no models fits every device; models compare without regard to case, as DMI tables and
/// administrators spell them differently).
pub fn model_mismatch(image_models: &[String], model: &str) -> Option<String> {
    if image_models.is_empty()
        || image_models
            .iter()
            .any(|m| m.trim().eq_ignore_ascii_case(model.trim()))
    {
        return None;
    }
    Some(format!(
        "the image is made for {} and this device is a {model}: restore it on a compatible device, or add -force",
        image_models.join(", ")
    ))
}

/// This machine's model from its DMI table (absent on many embedded boards and VMs).
fn dmi_model() -> Option<String> {
    std::fs::read_to_string("/sys/class/dmi/id/product_name")
        .ok()
        .map(|s| s.trim().to_string())
        .filter(|s| !s.is_empty())
}

/// Seed 003's compatibility check before anything is written: the image's models against
/// the device's, from the head the restore has already read (on every source, stdin
/// included, and without reading the image again). Skipped for raw images (no metadata).
fn check_model(a: &RestoreArgs, disk: &Path, image: &OpenedImage) -> Result<()> {
    if a.force {
        return Ok(());
    }
    let is_blockdev = std::fs::metadata(disk)
        .map(|m| std::os::unix::fs::FileTypeExt::is_block_device(&m.file_type()))
        .unwrap_or(false);
    let model = match (&a.model, is_blockdev) {
        (Some(m), _) => m.clone(),
        (None, true) => match dmi_model() {
            Some(m) => m,
            None => return Ok(()),
        },
        (None, false) => return Ok(()),
    };
    let Some(meta) = image.meta() else {
        return Ok(());
    };
    match model_mismatch(&meta.models, &model) {
        Some(why) => Err(imgengine::Error::new(imgengine::ErrorKind::Target, why).into()),
        None => Ok(()),
    }
}

/// Signatures are required: with no trusted key, nothing is restored unless the operator
/// says `-unsigned` (a lab setting, printed as a warning every time).
fn restore_keys(a: &RestoreArgs) -> Result<Vec<sign::VerifyingKey>> {
    let keys = trusted_keys(&a.trust)?;
    if keys.is_empty() {
        if !a.unsigned {
            return Err(imgengine::Error::new(
                imgengine::ErrorKind::Signature,
                format!(
                    "no trusted signing key (-trust=KEY.pub or {}/*.pub): nothing is restored.                      Give the publisher's key, or for a lab image add -unsigned",
                    std::env::var("IMG_TRUSTED_DIR").unwrap_or_else(|_| TRUSTED_DIR.into())
                ),
            )
            .into());
        }
        eprintln!("img: WARNING: -unsigned: no trusted signing key; the image is restored without a signature check (lab use only)");
    }
    Ok(keys)
}

pub fn restore(a: &RestoreArgs, quiet: bool) -> Result<()> {
    let disk = resolve_disk(&a.sel)?;
    let opts = DeployOptions {
        trusted_keys: restore_keys(a)?,
        resume: match a.resume {
            Resume::Auto => ResumeMode::Auto,
            Resume::Always => ResumeMode::Always,
            Resume::Never => ResumeMode::Never,
        },
        state_dir: a
            .state
            .clone()
            .or_else(|| std::env::var_os("IMG_STATE_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(STATE_DIR)),
        threads: threads(a.threads),
        http: http_config(a.ca.as_deref()),
        partition_onto_disk: a.wholedisk,
    };
    let loc = Location::parse(&a.src);
    let what = match &a.sel.part {
        Some(p) => format!("partition {p} of {}", disk.display()),
        None => format!("disk {}", disk.display()),
    };
    // Opened once: the head read here serves the model check and the deploy.
    let image = OpenedImage::open(&loc, &opts.http)
        .with_context(|| format!("restoring {loc} onto {what}"))?;
    check_model(a, &disk, &image).with_context(|| format!("checking {loc} against this device"))?;
    let progress = ConsoleProgress::new(quiet);
    let s = image
        .deploy(&disk, a.sel.part.as_deref(), &opts, &progress)
        .with_context(|| format!("restoring {loc} onto {what}"))?;
    for n in &s.notes {
        eprintln!("img: {n}");
    }
    if s.raw {
        eprintln!(
            "restored raw image {loc} onto {what}: {} written",
            human(s.bytes_written)
        );
    } else {
        eprintln!(
            "restored {loc} onto {what}: {} chunks written, {} already intact, {} written, {} fetched",
            s.chunks_written,
            s.chunks_skipped,
            human(s.bytes_written),
            human(s.bytes_fetched)
        );
    }
    Ok(())
}

fn print_info(info: &format::ImageInfo, json: bool) -> Result<()> {
    let mut out = std::io::stdout().lock();
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(&info_json(info))?)?;
        return Ok(());
    }
    let m = &info.meta;
    writeln!(out, "Image:        {} version {}", m.name, m.version)?;
    if let Some(d) = &m.description {
        writeln!(out, "Description:  {d}")?;
    }
    writeln!(
        out,
        "Format:       v{}, {} layout",
        m.format_version,
        if info.sealed { "sealed" } else { "streaming" }
    )?;
    writeln!(
        out,
        "Signed by:    {}",
        info.signed_by.as_deref().unwrap_or("(unsigned)")
    )?;
    writeln!(out, "Created:      {} (unix time)", m.created)?;
    writeln!(
        out,
        "Models:       {}",
        if m.models.is_empty() {
            "(any)".to_string()
        } else {
            m.models.join(", ")
        }
    )?;
    writeln!(
        out,
        "Compression:  -comp={} (zstd level {})",
        m.comp_level, m.zstd_level
    )?;
    writeln!(
        out,
        "Min. target:  {} ({} bytes)",
        human(m.min_target_size),
        m.min_target_size
    )?;
    writeln!(
        out,
        "Chunks:       {} of up to {}, {} of data",
        info.chunks,
        human(m.chunk_size as u64),
        human(info.data_bytes)
    )?;
    if let Some(b) = info.image_bytes {
        writeln!(out, "Image size:   {} ({b} bytes)", human(b))?;
    }
    writeln!(out, "Manifest:     sha256:{}", info.manifest_digest)?;
    match &m.content {
        format::Content::Disk { layout } => {
            writeln!(out, "Content:      whole disk")?;
            print_layout(&mut out, Path::new("(image)"), layout)?;
        }
        format::Content::Partition { partition: p } => {
            let label = p
                .label
                .clone()
                .or_else(|| p.fs_label.clone())
                .unwrap_or_default();
            writeln!(
                out,
                "Content:      one partition: {} {}, {} of {} used, label `{label}`, type {}",
                p.fs,
                human(p.len),
                p.used_bytes.map(human).unwrap_or_else(|| "?".into()),
                human(p.len),
                p.type_name
            )?;
        }
    }
    Ok(())
}

fn info_json(info: &format::ImageInfo) -> serde_json::Value {
    serde_json::json!({
        "meta": info.meta,
        "sealed": info.sealed,
        "signed_by": info.signed_by,
        "chunks": info.chunks,
        "data_bytes": info.data_bytes,
        "image_bytes": info.image_bytes,
        "manifest_digest": info.manifest_digest,
    })
}

pub fn info(image: &str, json: bool, ca: Option<&Path>) -> Result<()> {
    let loc = Location::parse(image);
    let mut src = Source::open(&loc, &http_config(ca)).with_context(|| format!("opening {loc}"))?;
    let info = format::read_info(&mut src).with_context(|| format!("reading {loc}"))?;
    print_info(&info, json)
}

pub fn verify(
    image: &str,
    trust: &[PathBuf],
    ca: Option<&Path>,
    nthreads: Option<usize>,
    quiet: bool,
) -> Result<()> {
    let loc = Location::parse(image);
    let opts = DeployOptions {
        trusted_keys: trusted_keys(trust)?,
        resume: ResumeMode::Never,
        state_dir: std::env::temp_dir(),
        threads: threads(nthreads),
        http: http_config(ca),
        partition_onto_disk: false,
    };
    let progress = ConsoleProgress::new(quiet);
    let info =
        deploy::verify(&loc, &opts, &progress).with_context(|| format!("verifying {loc}"))?;
    println!(
        "{loc}: OK: {} version {}, {} chunks, {} of data, {}",
        info.meta.name,
        info.meta.version,
        info.chunks,
        human(info.data_bytes),
        match &info.signed_by {
            Some(k) if !opts.trusted_keys.is_empty() => format!("signature by trusted key {k} verified"),
            Some(k) => format!("signed by key {k} (no trusted keys given: signature not checked against a trust list)"),
            None => "unsigned".to_string(),
        }
    );
    Ok(())
}

pub fn sign_image(image: &str, key: &Path, out: Option<&Path>) -> Result<()> {
    let secret =
        sign::load_secret(key).with_context(|| format!("loading secret key {}", key.display()))?;
    let image = Path::new(image);
    let out = out.unwrap_or(image);
    sign::seal_and_sign(image, out, &secret)
        .with_context(|| format!("signing {}", image.display()))?;
    println!("signed {} with key {}", out.display(), secret.key_id());
    Ok(())
}

pub fn keygen(key: &Path) -> Result<()> {
    let id = sign::generate(key)
        .with_context(|| format!("writing a new key pair to {}", key.display()))?;
    println!("secret key: {} (keep it off the devices)", key.display());
    println!(
        "public key: {}.pub (key id {id}); copy it into {TRUSTED_DIR}/ on devices",
        key.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_check_is_case_blind_and_open_when_the_image_lists_none() {
        let models = vec!["Z90".to_string(), "R90L".to_string()];
        assert_eq!(model_mismatch(&models, "z90"), None);
        assert_eq!(model_mismatch(&[], "anything"), None);
        let why = model_mismatch(&models, "C50").unwrap();
        assert!(
            why.contains("Z90, R90L") && why.contains("C50") && why.contains("-force"),
            "{why}"
        );
    }
}
