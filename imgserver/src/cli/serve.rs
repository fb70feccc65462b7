//! `imgserver init` and `imgserver serve`.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};

use super::*;
use crate::store::Policy;

/// `serve`'s settings, as parsed.
pub(super) struct Settings {
    pub listen: String,
    pub public_url: Option<String>,
    pub plain: bool,
    pub interval: u32,
    pub reload_wait: u64,
    pub pxe: PxeOptions,
    pub limits: crate::api::Limits,
    pub open_enrolment: bool,
}

/// `imgserver init`: create the device CA, the server certificate, the database and the site secrets.
pub(super) fn init(data: &Path, names: Vec<String>, renew: bool) -> anyhow::Result<i32> {
    std::fs::create_dir_all(data).with_context(|| format!("creating {}", data.display()))?;
    let names = if names.is_empty() {
        crate::tls::default_names()
    } else {
        names
    };
    private_dir(data)?;
    let pki = crate::tls::Pki::in_dir(data);
    crate::tls::init(&pki, &names, renew)?;
    open_store(data)?;
    site_secret(data, "enrol.key")?;
    site_secret(data, "url.key")?;
    std::fs::create_dir_all(data.join("repo"))?;
    println!(
        "server certificate for {} written to {}",
        names.join(", "),
        pki.server_cert.display()
    );
    println!("device CA: {}", pki.ca_cert.display());
    println!("put the CA on every device's boot partition and pass it to the agent (img -checkin -ca=PATH)");
    println!(
            "site enrolment secret: {} (copy it next to ca.pem as enrol.key, or approve each new device with `imgserver approve MAC`)",
            data.join("enrol.key").display()
        );
    Ok(0)
}

/// `imgserver serve`: run the server until stopped.
pub(super) fn serve(data: &Path, s: Settings) -> anyhow::Result<i32> {
    let Settings {
        listen,
        public_url,
        plain,
        interval,
        reload_wait,
        pxe,
        limits,
        open_enrolment,
    } = s;
    let store = open_store(data)?;
    if open_enrolment {
        eprintln!("imgserver: WARNING: --open-enrolment: every device that checks in is enrolled without the site enrolment secret (a lab setting; anyone on the network can take a MAC that is not enrolled yet)");
    }
    let enrol_secret = site_secret(data, "enrol.key")?;
    let url_key = site_secret(data, "url.key")?;
    let addr: std::net::SocketAddr = listen
        .parse()
        .with_context(|| format!("--listen {listen}: give ADDRESS:PORT"))?;
    let pki = crate::tls::Pki::in_dir(data);
    let tls = if plain {
        None
    } else {
        if !pki.exists() {
            bail!("no server certificate in {}: run `imgserver --data {} init` first (or serve --plain)", data.display(), data.display());
        }
        Some((pki.server_cert.clone(), pki.server_key.clone()))
    };
    let repo = data.join("repo");
    std::fs::create_dir_all(&repo)?;
    let pxe_listen: Option<std::net::SocketAddr> = pxe
        .listen
        .as_deref()
        .map(|l| {
            l.parse()
                .with_context(|| format!("--pxe-listen {l}: give ADDRESS:PORT"))
        })
        .transpose()?;
    let pxe_cfg = crate::pxe::PxeConfig {
        enrol_unknown: pxe.enrol,
        dir: data.join("pxe"),
        files_url: pxe.files,
        args: pxe
            .args
            .unwrap_or_else(|| crate::pxe::DEFAULT_ARGS.to_string()),
        agent_url: public_url.clone(),
        main_scheme: if plain { "http" } else { "https" },
        main_port: addr.port(),
    };
    pxe_cfg.check()?;
    if let Some(m) = pxe_cfg.missing_files() {
        eprintln!("imgserver: pxe: {m}; until then PXE devices boot their local disk");
    }
    // In-flight uploads live beside the repository, never inside the served tree;
    // the one a crash left behind is gone at the next start.
    let incoming = data.join("incoming");
    let _ = std::fs::remove_dir_all(repo.join(".incoming"));
    let _ = std::fs::remove_dir_all(&incoming);
    std::fs::create_dir_all(&incoming)?;
    let st = Arc::new(crate::api::AppState {
        store: Arc::new(store),
        policy: Policy {
            checkin_interval: interval,
            reload_wait,
        },
        repo,
        incoming,
        public_url,
        scheme: if plain { "http" } else { "https" },
        pxe: pxe_cfg,
        enrol_secret,
        url_key,
        limits,
        open_enrolment,
        guards: Default::default(),
    });
    // Multicast sessions (`imgserver session start`): this process is their master.
    {
        let (data, store) = (data.to_path_buf(), st.store.clone());
        std::thread::spawn(move || crate::mcast::supervise(data, store));
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    if let Some(l) = pxe_listen {
        let st = st.clone();
        rt.spawn(async move {
            if let Err(e) = crate::pxe::serve_plain(st, l).await {
                eprintln!("imgserver: pxe: {e:#}");
            }
        });
    }
    rt.block_on(crate::api::serve(st, addr, tls))?;
    Ok(0)
}
