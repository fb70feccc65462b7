//! The image repository: a directory of image files served at `/repo/` (with HTTP Range, so
//! an interrupted deploy resumes where it stopped), and the registration of images kept
//! here or on any other HTTP(S) server (nginx, an object store, a CDN: how big fleets scale
//! out). Registering reads the image's own metadata through the engine (`format::read_info`)
//! so the server validates jobs against what the image says, not what the administrator typed.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use imgengine::format::{read_info, Content, ImageInfo};
use imgengine::source::{HttpConfig, Location, Source};

use crate::model::ImageFacts;
use crate::store::{ImageRow, Store};

/// Read an image's metadata from a file or URL.
pub fn inspect(loc: &Location, http: &HttpConfig) -> anyhow::Result<ImageInfo> {
    let mut src = Source::open(loc, http).with_context(|| format!("opening {loc}"))?;
    read_info(&mut src).with_context(|| format!("reading the image metadata of {loc}"))
}

/// The server-side facts of an image, from its metadata.
pub fn facts(info: &ImageInfo, min_ram: u64) -> ImageFacts {
    ImageFacts {
        name: info.meta.name.clone(),
        version: info.meta.version.clone(),
        whole_disk: matches!(info.meta.content, Content::Disk { .. }),
        min_target_size: info.meta.min_target_size,
        models: info.meta.models.clone(),
        min_ram,
    }
}

/// A file name for an image in the repository: `<name>-<version>.img`, with anything
/// outside `[A-Za-z0-9._-]` replaced so a name can never walk out of the directory.
pub fn file_name(name: &str, version: &str) -> String {
    let clean = |s: &str| -> String {
        s.chars()
            .map(|c| {
                if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                    c
                } else {
                    '_'
                }
            })
            .collect()
    };
    let f = format!("{}-{}.img", clean(name), clean(version));
    if f.starts_with('.') {
        format!("_{f}")
    } else {
        f
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Register an image file: copied (or moved, for uploads) into the repository directory.
pub fn add_file(
    store: &dyn Store,
    repo: &Path,
    file: &Path,
    move_it: bool,
    min_ram: u64,
) -> anyhow::Result<ImageRow> {
    register(store, repo, file, move_it, min_ram, None, false)
}

/// [`add_file`], marked autogenic (seed 001) when `autogenic`.
pub fn add_file_as(
    store: &dyn Store,
    repo: &Path,
    file: &Path,
    move_it: bool,
    min_ram: u64,
    autogenic: bool,
) -> anyhow::Result<ImageRow> {
    register(store, repo, file, move_it, min_ram, None, autogenic)
}

/// What a capture task expects of its upload: the name and version its job gave, and who
/// sent it (recorded with the image).
pub struct CaptureOrigin {
    pub name: String,
    pub version: String,
    pub from: String,
}

/// Why an upload was refused (the uploader's fault, not the server's).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct UploadRefused(pub String);

/// Register a capture upload: its metadata must name what the job asked for (the upload
/// never chooses its own name or version) and it must be unsigned (an administrator signs
/// a captured image after looking at it: `imgserver image sign`).
pub fn add_capture(
    store: &dyn Store,
    repo: &Path,
    file: &Path,
    origin: CaptureOrigin,
) -> anyhow::Result<ImageRow> {
    register(store, repo, file, true, 0, Some(origin), false)
}

fn register(
    store: &dyn Store,
    repo: &Path,
    file: &Path,
    move_it: bool,
    min_ram: u64,
    capture: Option<CaptureOrigin>,
    autogenic: bool,
) -> anyhow::Result<ImageRow> {
    let info =
        inspect(&Location::File(file.to_path_buf()), &HttpConfig::default()).map_err(|e| {
            match &capture {
                Some(_) => anyhow::Error::new(UploadRefused(format!(
                    "the upload is not a readable image: {e:#}"
                ))),
                None => e,
            }
        })?;
    if let Some(c) = &capture {
        if info.meta.name != c.name || info.meta.version != c.version {
            return Err(UploadRefused(format!(
                "the upload says it is {} {}, but this capture task makes {} {}",
                info.meta.name, info.meta.version, c.name, c.version
            ))
            .into());
        }
        if info.signed_by.is_some() {
            return Err(UploadRefused(
                "a capture upload must be unsigned: the administrator signs captured images (`imgserver image sign`)".into(),
            )
            .into());
        }
    }
    if store
        .image(&info.meta.name, Some(&info.meta.version))?
        .is_some()
    {
        bail!(
            "image {} {} is already registered: `imgserver image remove {}:{}` first, or capture with another version",
            info.meta.name,
            info.meta.version,
            info.meta.name,
            info.meta.version
        );
    }
    std::fs::create_dir_all(repo).with_context(|| format!("creating {}", repo.display()))?;
    let name = file_name(&info.meta.name, &info.meta.version);
    let dest: PathBuf = repo.join(&name);
    if dest.exists() {
        bail!(
            "{} exists but is not registered: move it away first",
            dest.display()
        );
    }
    let tmp = repo.join(format!(".{name}.part"));
    if move_it {
        std::fs::rename(file, &dest)
            .with_context(|| format!("moving {} to {}", file.display(), dest.display()))?;
    } else {
        std::fs::copy(file, &tmp)
            .with_context(|| format!("copying {} to {}", file.display(), tmp.display()))?;
        // fs::copy takes the source's mode; repository files are private like the rest.
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
            .with_context(|| format!("making {} private", tmp.display()))?;
        std::fs::rename(&tmp, &dest).with_context(|| format!("renaming {}", tmp.display()))?;
    }
    let size = std::fs::metadata(&dest).map(|m| m.len()).ok();
    let mut row = ImageRow {
        id: 0,
        name: info.meta.name.clone(),
        version: info.meta.version.clone(),
        file: Some(name),
        url: None,
        size,
        facts: facts(&info, min_ram),
        sealed: info.sealed,
        signed_by: info.signed_by.clone(),
        description: info.meta.description.clone(),
        added: now(),
        captured_from: capture.map(|c| c.from),
        autogenic,
    };
    match store.add_image(&row) {
        Ok(id) => row.id = id,
        Err(e) => {
            let _ = std::fs::remove_file(&dest);
            return Err(e.into());
        }
    }
    Ok(row)
}

/// Register an image that stays on another HTTP(S) server.
pub fn add_url(
    store: &dyn Store,
    url: &str,
    http: &HttpConfig,
    min_ram: u64,
) -> anyhow::Result<ImageRow> {
    add_url_as(store, url, http, min_ram, false)
}

/// [`add_url`], marked autogenic (seed 001) when `autogenic`.
pub fn add_url_as(
    store: &dyn Store,
    url: &str,
    http: &HttpConfig,
    min_ram: u64,
    autogenic: bool,
) -> anyhow::Result<ImageRow> {
    let loc = Location::parse(url);
    let info = inspect(&loc, http)?;
    let src = Source::open(&loc, http).with_context(|| format!("opening {url}"))?;
    if !src.supports_ranges() {
        eprintln!(
            "warning: {url} does not answer Range requests: an interrupted deploy starts over"
        );
    }
    let mut row = ImageRow {
        id: 0,
        name: info.meta.name.clone(),
        version: info.meta.version.clone(),
        file: None,
        url: Some(url.to_string()),
        size: src.len(),
        facts: facts(&info, min_ram),
        sealed: info.sealed,
        signed_by: info.signed_by.clone(),
        description: info.meta.description.clone(),
        added: now(),
        captured_from: None,
        autogenic,
    };
    row.id = store.add_image(&row)?;
    Ok(row)
}

/// Seal and sign a repository image in place with the administrator's key (how a captured
/// image becomes deployable under a signature policy), and record the new signature.
pub fn sign(
    store: &dyn Store,
    repo: &Path,
    img: &ImageRow,
    key_file: &Path,
) -> anyhow::Result<ImageRow> {
    let Some(f) = &img.file else {
        bail!(
            "image {} {} stays on another server ({}): sign the file there with `img -sign`",
            img.name,
            img.version,
            img.url.as_deref().unwrap_or("?")
        );
    };
    let key = imgengine::sign::load_secret(key_file)
        .with_context(|| format!("loading the signing key {}", key_file.display()))?;
    let path = repo.join(f);
    imgengine::sign::seal_and_sign(&path, &path, &key)
        .with_context(|| format!("signing {}", path.display()))?;
    let info = inspect(&Location::File(path.clone()), &HttpConfig::default())?;
    let size = std::fs::metadata(&path).map(|m| m.len()).ok();
    store.set_image_signature(img.id, info.signed_by.as_deref(), info.sealed, size)?;
    Ok(ImageRow {
        signed_by: info.signed_by,
        sealed: info.sealed,
        size,
        ..img.clone()
    })
}

/// Unregister an image and delete its file from the repository (not remote ones).
pub fn remove(store: &dyn Store, repo: &Path, img: &ImageRow) -> anyhow::Result<()> {
    store.remove_image(img.id)?;
    if let Some(f) = &img.file {
        let p = repo.join(f);
        if let Err(e) = std::fs::remove_file(&p) {
            if e.kind() != std::io::ErrorKind::NotFound {
                return Err(e).with_context(|| format!("deleting {}", p.display()));
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn file_names_stay_in_the_repository() {
        assert_eq!(file_name("os", "7.2"), "os-7.2.img");
        assert_eq!(
            file_name("../../etc/passwd", "1"),
            "_.._.._etc_passwd-1.img"
        );
        assert!(!file_name("a/b", "c/d").contains('/'));
        assert!(!file_name(".hidden", "1").starts_with('.'));
    }
}
