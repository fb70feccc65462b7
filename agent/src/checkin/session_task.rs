//! A `session` task: the server runs a multicast session's master (`imgserver session
//! start`) and tells the devices that check in to join it. The device joins as
//! `img -session NAME -client` does (the same client code: verified and written as a
//! deploy, resumable), and the image's URL in the task is where it fetches by HTTP Range
//! what the session does not deliver (with its credential when the URL is the server's).

use std::net::Ipv4Addr;
use std::time::Duration;

use imgengine::multicast::{self, client, fallback, net};
use protocol::SessionSpec;

use super::*;

pub(super) fn session_task(
    client_: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
    spec: &SessionSpec,
    rep: &Reporter,
) -> anyhow::Result<Done> {
    multicast::check_name(&spec.name).map_err(|e| Rejection(e.to_string()))?;
    let group = match &spec.addr {
        Some(a) => a
            .parse::<Ipv4Addr>()
            .ok()
            .filter(Ipv4Addr::is_multicast)
            .ok_or_else(|| {
                Rejection(format!("session address {a:?} is not a multicast address"))
            })?,
        None => multicast::group_addr(&spec.name),
    };
    let disk = target_disk(cfg, spec.disk.as_deref())?;
    let disk_name = disk.display().to_string();
    check_image_url(&spec.image.url)?;
    let mut http = http_for(client_, cfg, &spec.image.url);
    if same_origin(client_.base(), &spec.image.url) {
        let ident =
            super::super::trust::ServerIdentity::of(client_.base(), cfg.ca_file.as_deref())?;
        http.authorization =
            super::super::bound_credential(state, &ident)?.map(|t| format!("Bearer {t}"));
    }
    let opts = DeployOptions {
        trusted_keys: signature_policy(cfg, rep)?,
        resume: ResumeMode::Auto,
        state_dir: state.journal_dir(),
        threads: 0,
        http: http.clone(),
        partition_onto_disk: false,
    };
    let (ifname, ifaddr) = net::interface(None)?;
    rep.log(format!(
        "joining multicast session {} on {group} ({ifname}) for {} {}, onto {disk_name}{}; missing chunks from {}",
        spec.name,
        spec.image.name,
        spec.image.version,
        spec.partition
            .as_ref()
            .map(|p| format!(" partition {p}"))
            .unwrap_or_default(),
        spec.image.url
    ));
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string();
    let ccfg = client::ClientConfig {
        name: spec.name.clone(),
        group,
        port: multicast::PORT,
        iface: ifaddr,
        client_id: crate::session::client_id(&disk, spec.partition.as_deref()),
        device_name: format!("{host}:{disk_name}"),
        target: disk.clone(),
        part: spec.partition.clone(),
        deploy: opts,
        fallback: Some(fallback::Fallback {
            location: Location::parse(&spec.image.url),
            http,
            after: std::env::var("IMG_SESSION_FALLBACK")
                .ok()
                .and_then(|v| v.parse::<u64>().ok())
                .map(Duration::from_secs)
                .unwrap_or(fallback::DEFAULT_AFTER),
        }),
    };
    let name = spec.name.clone();
    let summary = client::run(&ccfg, rep, &mut |n| {
        rep.log(match n {
            client::Notice::Waiting { group } => {
                format!("session {name}: waiting for the master on {group}")
            }
            client::Notice::Queued { message } => format!("session {name}: {message}"),
            client::Notice::Registered { master } => {
                format!("session {name}: registered with the master {master}")
            }
            client::Notice::Receiving { image_len } => {
                format!("session {name}: receiving a {image_len}-byte image")
            }
        })
    })?;
    for n in &summary.notes {
        rep.log(n.clone());
    }
    rep.log(format!(
        "session {}: {} chunks written, {} already intact, {} bytes written",
        spec.name, summary.chunks_written, summary.chunks_skipped, summary.bytes_written
    ));
    let stamp = ImageStamp {
        name: spec.image.name.clone(),
        version: spec.image.version.clone(),
    };
    if spec.partition.is_none() {
        let prefix = format!("{disk_name}#");
        for k in state.stamps()?.keys().filter(|k| k.starts_with(&prefix)) {
            state.set_stamp(k, None)?;
        }
    }
    let key = match &spec.partition {
        Some(p) => stamp_key(
            &disk_name,
            Some(&partition_number(&disk, p).unwrap_or_else(|| p.clone())),
        ),
        None => stamp_key(&disk_name, None),
    };
    state.set_stamp(&key, Some(&stamp))?;
    Ok(Done {
        message: None,
        image: Some(stamp),
        bytes: summary.bytes_written,
        end: TaskEnd::Continue,
        preset: None,
    })
}
