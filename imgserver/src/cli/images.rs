//! `imgserver image add|list|remove|sign|url`.

use std::path::{Path, PathBuf};

use anyhow::bail;

use super::*;

/// `imgserver image add`: register an image file or URL (its metadata read from the image),
/// through the admin core (validated and audited as the API does it).
pub(super) fn image_add(
    data: &Path,
    what: String,
    min_ram: u64,
    ca: Option<PathBuf>,
    autogenic: bool,
    rsp: Option<PathBuf>,
) -> anyhow::Result<i32> {
    let url = what.starts_with("http://") || what.starts_with("https://");
    // Seed 001: a package is the image file and its script image.rsp; a <BackupImage> tag
    // in the script makes the image autogenic.
    let (file, rsp) = if !url && Path::new(&what).is_dir() {
        let (image, found) =
            crate::autogenic::package_dir(Path::new(&what)).map_err(|e| anyhow::anyhow!(e))?;
        (image, rsp.or(found))
    } else {
        (PathBuf::from(&what), rsp)
    };
    let script = rsp
        .as_deref()
        .map(crate::autogenic::read_rsp)
        .transpose()
        .map_err(|e| anyhow::anyhow!(e))?;
    let tagged = script.as_ref().is_some_and(|s| s.backup_image);
    let admin = open_admin(data)?;
    let me = Actor::host();
    let img = if url {
        admin.add_image_url_as(&me, &what, ca, min_ram, autogenic || tagged)?
    } else {
        admin.add_image_file_as(&me, &file, false, min_ram, autogenic || tagged)?
    };
    println!(
        "registered image {} {} (id {}, {}{}{})",
        img.name,
        img.version,
        img.id,
        if img.facts.whole_disk {
            "whole disk"
        } else {
            "partition"
        },
        if img.sealed { ", sealed" } else { "" },
        match (img.autogenic, tagged) {
            (true, true) => ", autogenic: <BackupImage> in image.rsp",
            (true, false) => ", autogenic",
            (false, _) => "",
        }
    );
    if let (Some(path), false) = (&rsp, img.autogenic) {
        println!(
            "{} has no <BackupImage> tag: registered as an ordinary image (add --autogenic to mark it)",
            path.display()
        );
    }
    Ok(0)
}

/// `imgserver image list`: the image register.
pub(super) fn image_list(data: &Path) -> anyhow::Result<i32> {
    let images = open_admin(data)?.images(&Actor::host())?;
    let mut t = Table::new(&[
        "ID",
        "NAME",
        "VERSION",
        "KIND",
        "SIZE",
        "MIN TARGET",
        "MODELS",
        "SIGNED",
        "AUTOGENIC",
        "WHERE",
    ]);
    for i in images {
        t.row(vec![
            i.id.to_string(),
            i.name,
            i.version,
            if i.facts.whole_disk {
                "disk".into()
            } else {
                "partition".into()
            },
            i.size.map(fmt_bytes).unwrap_or_else(|| "-".into()),
            fmt_bytes(i.facts.min_target_size),
            if i.facts.models.is_empty() {
                "any".into()
            } else {
                i.facts.models.join(",")
            },
            match (i.signed_by, &i.captured_from) {
                (Some(k), _) => k,
                (None, Some(from)) => format!("no (captured from {from})"),
                (None, None) if i.sealed => "sealed".into(),
                (None, None) => "no".into(),
            },
            if i.autogenic { "yes" } else { "no" }.into(),
            i.url
                .or(i.file.map(|f| format!("repo/{f}")))
                .unwrap_or_default(),
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// `imgserver image remove`: unregister an image (and delete its repository file).
pub(super) fn image_remove(data: &Path, spec: String) -> anyhow::Result<i32> {
    let img = open_admin(data)?.remove_image(&Actor::host(), &spec)?;
    println!("unregistered image {} {}", img.name, img.version);
    Ok(0)
}

/// `imgserver image sign`: seal and sign a repository image (a capture).
pub(super) fn image_sign(data: &Path, spec: String, key: PathBuf) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let img = find_image(&store, &spec)?;
    let img = crate::repo::sign(&store, &data.join("repo"), &img, &key)?;
    println!(
        "image {} {} sealed and signed by key {}",
        img.name,
        img.version,
        img.signed_by.as_deref().unwrap_or("?")
    );
    Ok(0)
}

/// `imgserver image url`: a signed repository URL (e.g. for a CDN).
pub(super) fn image_url(
    data: &Path,
    spec: String,
    expires: u64,
    base: Option<String>,
) -> anyhow::Result<i32> {
    let store = open_store(data)?;
    let img = find_image(&store, &spec)?;
    let Some(file) = &img.file else {
        bail!(
            "image {} {} is not in this repository: its URL is {}",
            img.name,
            img.version,
            img.url.unwrap_or_default()
        );
    };
    let key = site_secret(data, "url.key")?;
    let path = crate::api::signed_repo_path(&key, file, now() + expires);
    match base {
        Some(b) => println!("{}{path}", b.trim_end_matches('/')),
        None => println!("{path}"),
    }
    Ok(0)
}
