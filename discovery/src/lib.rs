//! Finding the management server (MISSION.md §1, seed 000 "PXE ベース以外のイメージング
//! (WTOS Boot Agent)" and "(Merlin Boot Agent)").
//!
//! At boot, inside an initramfs with no dhclient, resolver or NSS, the agent brings up its
//! NICs ([`netif`]), gets a lease with its own DHCP client ([`dhcp`]), and then walks the
//! seed's sources in priority order, probing each candidate ([`probe`]) until one answers:
//!
//! 1. DHCP options 186/190/192 (187 legacy, or the same inside option 43) of the lease;
//! 2. the server URL list kept on the boot partition ([`urllist`], [`bootconfig`]);
//! 3. the same options answered to vendor class `RTIAgent` (DHCPINFORM, also to a
//!    proxyDHCP on port 4011);
//! 4. DNS SRV `_VXCMServer._tcp.<domain>` in RFC 2782 order ([`dns`]);
//! 5. DNS host name `vxcmserver.<domain>`, HTTP on port 80.
//!
//! When a Merlin static network configuration is stored on the boot partition it replaces
//! DHCP: the interface gets the stored address and the stored server is tried first.
//! [`discover`] returns every candidate with its source and verdict so `img -discover` can
//! show why each was rejected, and the chosen one for the check-in.

pub mod bootconfig;
pub mod dhcp;
pub mod dns;
pub mod netif;
pub mod options;
pub mod probe;
pub mod urllist;

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use serde::Serialize;

pub use bootconfig::{ConfigError, DiscoverySettings, LabSettings, StaticNetConfig};
pub use dhcp::{DhcpParams, Lease, LeaseKeeper};
pub use netif::{NetworkSetup, Nic, SystemNetwork};
pub use options::VxcmOptions;
pub use urllist::{Scheme, ServerUrl};

/// Seed 000 source 4: the SRV service and protocol labels.
pub const DEFAULT_SRV_NAME: &str = "_VXCMServer._tcp";
/// Seed 000 source 5: the well-known server host name. The seed's DNS step names the host
/// "VXCMServer" (its URL-list example uses `vxcmserver`); DNS names are case-insensitive.
pub const DEFAULT_HOST_NAME: &str = "vxcmserver";
/// Seed 000 source 3: the vendor class of the second DHCP exchange.
pub const RTI_VENDOR_CLASS: &str = "RTIAgent";
/// Option 60 of the ordinary exchange, so administrators can match the agent in their DHCP
/// server (e.g. dnsmasq `dhcp-vendorclass=set:agent,BootAgent`).
pub const DEFAULT_VENDOR_CLASS: &str = "BootAgent";
/// Where the boot-agent partition's configuration directory is mounted in the initramfs.
pub const DEFAULT_CONFIG_DIR: &str = "/bootagent/config";

/// What to look for and how long to wait.
#[derive(Debug, Clone)]
pub struct Config {
    /// Interfaces to use; empty means every Ethernet NIC found in sysfs.
    pub interfaces: Vec<String>,
    /// The boot partition's configuration directory (URL list, static configuration).
    pub config_dir: PathBuf,
    /// SRV name without the domain (source 4).
    pub srv_name: String,
    /// Host name without the domain (source 5).
    pub host_name: String,
    /// Option 60 of the first exchange.
    pub vendor_class: String,
    /// Wait this long for carrier after setting a NIC up.
    pub link_timeout: Duration,
    /// Give up the DHCP lease after this long.
    pub dhcp_timeout: Duration,
    /// First DHCP retransmission interval.
    pub dhcp_first_retry: Duration,
    /// How long to wait for answers to the `RTIAgent` exchange.
    pub rti_timeout: Duration,
    /// Per DNS query.
    pub dns_timeout: Duration,
    /// Per candidate (TCP connect, then the answer).
    pub probe_timeout: Duration,
    /// Keep going after the first reachable candidate (for `img -discover -all`).
    pub probe_all: bool,
    /// Apply the lease / static address to the interface (false only for dry runs).
    pub configure: bool,
    /// Write the lease's DNS servers and domain here (the boot agent uses
    /// `/etc/resolv.conf` so the check-in can resolve names; `None` leaves the system alone,
    /// which is the right thing for `img -discover` on a configured host).
    pub resolv_conf: Option<PathBuf>,
    /// A server URL list given on the kernel command line (`img.server=`, same syntax as the
    /// stored list): an administrator's explicit choice, tried before every other source.
    /// The network is brought up as usual, so the check-in can reach it.
    pub command_line_urls: Option<String>,
    /// Why plain-HTTP candidates must be skipped (the device holds its server's CA and no
    /// lab setting allows plain HTTP); `None`: plain HTTP may be tried. Every skipped
    /// candidate is rejected with this text, which names the way to allow it.
    pub refuse_plain_http: Option<String>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            interfaces: Vec::new(),
            config_dir: PathBuf::from(DEFAULT_CONFIG_DIR),
            srv_name: DEFAULT_SRV_NAME.into(),
            host_name: DEFAULT_HOST_NAME.into(),
            vendor_class: DEFAULT_VENDOR_CLASS.into(),
            link_timeout: Duration::from_secs(5),
            dhcp_timeout: Duration::from_secs(15),
            dhcp_first_retry: Duration::from_secs(1),
            rti_timeout: Duration::from_secs(1),
            dns_timeout: Duration::from_secs(2),
            probe_timeout: Duration::from_secs(2),
            probe_all: false,
            configure: true,
            resolv_conf: None,
            command_line_urls: None,
            refuse_plain_http: None,
        }
    }
}

/// Where a candidate came from, in the seed's priority order.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum CandidateSource {
    /// The Merlin static configuration on the boot partition.
    Static,
    /// 1: options 186/190/192/187 (or option 43) of the ordinary lease.
    DhcpOptions,
    /// 2: the URL list on the boot partition.
    UrlList,
    /// 3: options answered to vendor class RTIAgent.
    RtiAgent,
    /// 4: DNS SRV.
    DnsSrv,
    /// 5: DNS host name.
    DnsHost,
}

/// What happened when the candidate was tried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "verdict", content = "reason", rename_all = "kebab-case")]
pub enum Verdict {
    Reachable(String),
    Rejected(String),
    /// An earlier candidate already answered.
    NotTried,
}

/// One management-server candidate.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ServerCandidate {
    /// e.g. `https://10.0.0.1:443`.
    pub url: String,
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    /// The address that answered (or was tried).
    pub address: Option<Ipv4Addr>,
    pub source: CandidateSource,
    /// Which option / record / list entry gave it.
    pub detail: String,
    #[serde(flatten)]
    pub verdict: Verdict,
}

/// The result of a discovery run.
#[derive(Debug, Clone, Serialize)]
pub struct Discovery {
    pub interface: Option<String>,
    pub lease: Option<Lease>,
    pub static_config: Option<StaticNetConfig>,
    /// Every candidate, in the order tried.
    pub candidates: Vec<ServerCandidate>,
    /// The first reachable candidate.
    pub chosen: Option<ServerCandidate>,
    /// Human-readable account of each step and each rejection.
    pub log: Vec<String>,
    pub elapsed_ms: u64,
}

/// Failures that stop discovery before any source can be tried.
#[derive(Debug, thiserror::Error)]
pub enum DiscoveryError {
    #[error("no Ethernet interface found{0} (check the NIC driver is in the initramfs)")]
    NoInterface(String),
    #[error("reading the network interfaces in sysfs: {0}")]
    Sysfs(std::io::Error),
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The cause is the `source()`, not part of the message, so `{e:#}` and other chain
    /// printers show it once.
    #[error("configuring {iface} (are we root / CAP_NET_ADMIN?)")]
    Configure {
        iface: String,
        source: std::io::Error,
    },
}

/// An error and its causes on one line, outermost first ("a: b: c"), as `anyhow` prints
/// `{:#}`. The errors of this crate keep their cause out of their own message and return it
/// from `source()`, so each cause appears once.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut out = e.to_string();
    let mut next = e.source();
    while let Some(cause) = next {
        out.push_str(": ");
        out.push_str(&cause.to_string());
        next = cause.source();
    }
    out
}

/// Runs the whole chain on the real system.
pub fn discover(cfg: &Config) -> Result<Discovery, DiscoveryError> {
    discover_with(cfg, &SystemNetwork::default())
}

struct Run<'a> {
    cfg: &'a Config,
    log: Vec<String>,
    candidates: Vec<ServerCandidate>,
    chosen: Option<usize>,
    resolver: Option<dns::Resolver>,
}

impl Run<'_> {
    fn done(&self) -> bool {
        self.chosen.is_some() && !self.cfg.probe_all
    }

    /// Probes one candidate and records it.
    fn try_candidate(&mut self, url: ServerUrl, source: CandidateSource, detail: String) {
        if self.done() {
            return;
        }
        let mut cand = ServerCandidate {
            url: url.to_string(),
            scheme: url.scheme,
            host: url.host.clone(),
            port: url.port,
            address: None,
            source,
            detail,
            verdict: Verdict::NotTried,
        };
        if let (Scheme::Http, Some(why)) = (url.scheme, &self.cfg.refuse_plain_http) {
            // Not even probed: a rogue DHCP answer must not learn that we are here.
            cand.verdict = Verdict::Rejected(format!("plain HTTP skipped: {why}"));
        } else if let Some(prev) = self.candidates.iter().find(|c| c.url == cand.url) {
            cand.address = prev.address;
            cand.verdict = match &prev.verdict {
                Verdict::Rejected(r) => {
                    Verdict::Rejected(format!("same URL as an earlier candidate: {r}"))
                }
                // Already chosen (probe_all) or not tried: do not choose twice.
                _ => Verdict::Rejected("same URL as an earlier candidate".into()),
            };
        } else {
            let addrs = match url.ipv4() {
                Some(ip) => Ok(vec![ip]),
                None => match &self.resolver {
                    Some(r) => r.lookup_a(&url.host).map_err(|e| e.to_string()),
                    None => Err(format!("{}: no DNS server to resolve the name", url.host)),
                },
            };
            cand.verdict = match addrs {
                Err(e) => Verdict::Rejected(e),
                Ok(addrs) => {
                    let mut v = Verdict::Rejected("no address".into());
                    for ip in addrs {
                        cand.address = Some(ip);
                        let sa = SocketAddr::from((ip, url.port));
                        match probe::probe(sa, url.scheme, &url.host, self.cfg.probe_timeout) {
                            probe::ProbeResult::Answered(why) => {
                                v = Verdict::Reachable(why);
                                break;
                            }
                            probe::ProbeResult::Failed(why) => v = Verdict::Rejected(why),
                        }
                    }
                    v
                }
            };
        }
        let line = match &cand.verdict {
            Verdict::Reachable(w) => format!(
                "candidate {} ({:?}, {}): reachable: {w}",
                cand.url, source, cand.detail
            ),
            Verdict::Rejected(w) => format!(
                "candidate {} ({:?}, {}): rejected: {w}",
                cand.url, source, cand.detail
            ),
            Verdict::NotTried => format!("candidate {}: not tried", cand.url),
        };
        self.log.push(line);
        if matches!(cand.verdict, Verdict::Reachable(_)) && self.chosen.is_none() {
            self.chosen = Some(self.candidates.len());
        }
        self.candidates.push(cand);
    }

    /// Candidates from options 186/190/192/187: HTTPS on the secure port first, then HTTP on
    /// the plain port; with an address but no port, HTTPS 443 then HTTP 80.
    fn try_vxcm(&mut self, v: &VxcmOptions, source: CandidateSource, via: &str) {
        let Some(ip) = v.server else {
            if !v.is_empty() {
                self.log.push(format!(
                    "{via}: port options without option 186 (server address), ignored"
                ));
            }
            return;
        };
        let enc = if v.from_option_43 {
            " via option 43"
        } else {
            ""
        };
        let host = ip.to_string();
        let mut any = false;
        if let Some(p) = v.secure_port {
            any = true;
            self.try_candidate(
                ServerUrl::new(Scheme::Https, &host, p),
                source,
                format!("{via}: options 186+190{enc}"),
            );
        }
        if let Some(p) = v.plain_port {
            any = true;
            let tag = if v.plain_port_is_legacy {
                "187 (legacy)"
            } else {
                "192"
            };
            self.try_candidate(
                ServerUrl::new(Scheme::Http, &host, p),
                source,
                format!("{via}: options 186+{tag}{enc}"),
            );
        }
        if !any {
            self.try_candidate(
                ServerUrl::new(Scheme::Https, &host, 443),
                source,
                format!("{via}: option 186{enc}, no port: HTTPS default"),
            );
            self.try_candidate(
                ServerUrl::new(Scheme::Http, &host, 80),
                source,
                format!("{via}: option 186{enc}, no port: HTTP default"),
            );
        }
    }
}

fn shared_log(log: &Mutex<Vec<String>>) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()))
}

/// Runs the whole chain with the given network seam.
pub fn discover_with(cfg: &Config, net: &dyn NetworkSetup) -> Result<Discovery, DiscoveryError> {
    let start = Instant::now();
    let mut log = Vec::new();

    // Boot-partition settings: they replace the defaults, never an explicit value.
    let mut notes = Vec::new();
    let settings = DiscoverySettings::load(&cfg.config_dir, &mut notes)?;
    let static_cfg = StaticNetConfig::load(&cfg.config_dir)?;
    log.extend(notes);
    let mut cfg = cfg.clone();
    let pick = |cur: &mut String, default: &str, file: &Option<String>| {
        if cur == default {
            if let Some(v) = file {
                *cur = v.clone();
            }
        }
    };
    pick(&mut cfg.srv_name, DEFAULT_SRV_NAME, &settings.srv_name);
    pick(&mut cfg.host_name, DEFAULT_HOST_NAME, &settings.host_name);
    pick(
        &mut cfg.vendor_class,
        DEFAULT_VENDOR_CLASS,
        &settings.vendor_class,
    );

    // Interfaces.
    let all = net.list_nics().map_err(DiscoveryError::Sysfs)?;
    let nics: Vec<Nic> = all
        .into_iter()
        .filter(|n| cfg.interfaces.is_empty() || cfg.interfaces.contains(&n.name))
        .collect();
    if nics.is_empty() {
        let which = if cfg.interfaces.is_empty() {
            String::new()
        } else {
            format!(" named {}", cfg.interfaces.join(", "))
        };
        return Err(DiscoveryError::NoInterface(which));
    }
    for n in &nics {
        if let Err(e) = net.set_up(&n.name) {
            log.push(format!("{}: setting the link up: {e}", n.name));
        }
    }
    let link_deadline = start + cfg.link_timeout;
    let up: Vec<Nic> = loop {
        let up: Vec<Nic> = nics
            .iter()
            .filter(|n| net.has_carrier(&n.name))
            .cloned()
            .collect();
        // Wait for every NIC up to the link timeout, but once one has carrier give the
        // others only half a second: one working NIC is enough to start DHCP.
        let now = Instant::now();
        if up.len() == nics.len()
            || now >= link_deadline
            || (!up.is_empty() && now >= start + Duration::from_millis(500))
        {
            break up;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    for n in &nics {
        if !up.contains(n) {
            log.push(format!(
                "{} ({}): no link (cable unplugged?), skipped",
                n.name,
                n.mac_string()
            ));
        }
    }

    let mut run = Run {
        cfg: &cfg,
        log,
        candidates: Vec::new(),
        chosen: None,
        resolver: None,
    };
    let mut lease = None;
    let mut dhcp_sock = None;
    let mut interface = None;

    if let Some(st) = &static_cfg {
        // Merlin: the stored configuration replaces DHCP (the seed disables DHCP there).
        let nic = up.first().or(nics.first()).cloned();
        if let Some(nic) = nic {
            run.log.push(format!(
                "static configuration on the boot partition: {} {}/{} gw {} server {}://{}:{}",
                nic.name,
                st.ip,
                st.mask,
                st.gateway
                    .map(|g| g.to_string())
                    .unwrap_or_else(|| "-".into()),
                st.scheme,
                st.server,
                st.port
            ));
            if cfg.configure {
                net.set_address(&nic.name, st.ip, st.prefix_len())
                    .and_then(|_| match st.gateway {
                        Some(gw) => net.add_default_route(&nic.name, gw),
                        None => Ok(()),
                    })
                    .map_err(|source| DiscoveryError::Configure {
                        iface: nic.name.clone(),
                        source,
                    })?;
            }
            interface = Some(nic.name);
        }
        run.try_candidate(
            ServerUrl::new(st.scheme, st.server.to_string(), st.port),
            CandidateSource::Static,
            "static configuration (netconfig.conf)".into(),
        );
    } else if !up.is_empty() {
        let params = DhcpParams {
            vendor_class: cfg.vendor_class.clone(),
            timeout: cfg.dhcp_timeout,
            first_retry: cfg.dhcp_first_retry,
        };
        let dlog = Mutex::new(Vec::new());
        let t = Instant::now();
        match dhcp::obtain_first_lease(&up, &params, &dlog) {
            Ok((l, sock)) => {
                run.log.extend(shared_log(&dlog));
                run.log.push(format!(
                    "DHCP lease on {} in {} ms: {}/{} router {} dns {:?} domain {} from {}",
                    l.iface,
                    t.elapsed().as_millis(),
                    l.ip,
                    l.prefix_len,
                    l.router
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "-".into()),
                    l.dns_servers,
                    l.domain.as_deref().unwrap_or("-"),
                    l.server_id
                        .map(|r| r.to_string())
                        .unwrap_or_else(|| "-".into()),
                ));
                for n in &l.notes {
                    run.log.push(format!("DHCP: {n}"));
                }
                if cfg.configure {
                    l.configure(net)
                        .map_err(|source| DiscoveryError::Configure {
                            iface: l.iface.clone(),
                            source,
                        })?;
                }
                if let (true, Some(path)) = (cfg.configure, &cfg.resolv_conf) {
                    match std::fs::write(path, l.resolv_conf()) {
                        Ok(()) => run
                            .log
                            .push(format!("DNS settings written to {}", path.display())),
                        Err(e) => run.log.push(format!("writing {}: {e}", path.display())),
                    }
                }
                interface = Some(l.iface.clone());
                run.resolver = (!l.dns_servers.is_empty())
                    .then(|| dns::Resolver::new(l.dns_servers.clone(), cfg.dns_timeout));
                lease = Some(l);
                dhcp_sock = Some(sock);
            }
            Err(e) => {
                run.log.extend(shared_log(&dlog));
                run.log.push(format!("DHCP: {}", error_chain(&e)));
            }
        }
    } else {
        run.log.push("no interface has a link: no DHCP".into());
    }
    let domain = lease.as_ref().and_then(|l| l.domain.clone());

    // 0. The kernel command line's list, when the administrator gave one.
    if let Some(list) = &cfg.command_line_urls {
        match urllist::parse_url_list(list, domain.as_deref()) {
            Err(e) => run.log.push(format!("kernel command line img.server: {e}")),
            Ok(urls) => {
                for (i, u) in urls.into_iter().enumerate() {
                    run.try_candidate(
                        u,
                        CandidateSource::UrlList,
                        format!("kernel command line entry {}", i + 1),
                    );
                }
            }
        }
    }

    // 1. DHCP options of the ordinary lease.
    if let (Some(l), false) = (&lease, run.done()) {
        let v = l.vxcm.clone();
        if v.is_empty() {
            run.log
                .push("source 1 (DHCP options 186/190/192): none in the lease".into());
        }
        run.try_vxcm(&v, CandidateSource::DhcpOptions, "DHCP");
    }

    // 2. The URL list.
    if !run.done() {
        match &settings.server_url_list {
            None => run
                .log
                .push("source 2 (server URL list): none configured".into()),
            Some(list) => {
                if let Err(e) = urllist::check_url_list_len(list) {
                    run.log.push(format!(
                        "source 2 (server URL list): {e}; reading it anyway"
                    ));
                }
                match urllist::parse_url_list(list, domain.as_deref()) {
                    Err(e) => run.log.push(format!("source 2 (server URL list): {e}")),
                    Ok(urls) => {
                        for (i, u) in urls.into_iter().enumerate() {
                            run.try_candidate(
                                u,
                                CandidateSource::UrlList,
                                format!("URL list entry {}", i + 1),
                            );
                        }
                    }
                }
            }
        }
    }

    // 3. RTIAgent options (ordinary or proxy DHCP).
    if !run.done() {
        if let (Some(l), Some(sock)) = (&lease, &dhcp_sock) {
            let replies = sock.inform(l, RTI_VENDOR_CLASS, &l.proxy_servers, cfg.rti_timeout);
            let mut found = false;
            for r in &replies {
                let mut notes = Vec::new();
                let v = r.vxcm(&mut notes);
                for n in notes {
                    run.log.push(format!("RTIAgent reply: {n}"));
                }
                if !v.is_empty() {
                    found = true;
                    let from = r
                        .server_id()
                        .map(|s| s.to_string())
                        .unwrap_or_else(|| "?".into());
                    run.try_vxcm(
                        &v,
                        CandidateSource::RtiAgent,
                        &format!("RTIAgent reply from {from}"),
                    );
                }
            }
            if !found {
                run.log.push(format!(
                    "source 3 (vendor class RTIAgent): {} replies, none with options 186/190/192",
                    replies.len()
                ));
            }
        }
    }

    // 4. DNS SRV.
    if !run.done() {
        match (&run.resolver, &domain) {
            (Some(r), Some(d)) => {
                let name = format!("{}.{d}", cfg.srv_name.trim_matches('.'));
                match r.lookup_srv(&name, &mut dns::SplitMix::from_clock()) {
                    Ok((targets, via_tcp)) => {
                        if via_tcp {
                            run.log.push(format!(
                                "DNS SRV {name}: UDP answer truncated, {} targets read over TCP",
                                targets.len()
                            ));
                        }
                        for t in targets {
                            let scheme = if t.port == 80 {
                                Scheme::Http
                            } else {
                                Scheme::Https
                            };
                            // The SRV record names the port; like the URL list, 80 means HTTP and
                            // anything else HTTPS (the seed: "80, or 443 for HTTPS").
                            let host = match t.addrs.first() {
                                Some(ip) => ip.to_string(),
                                None => t.target.clone(),
                            };
                            run.try_candidate(
                                ServerUrl::new(scheme, host, t.port),
                                CandidateSource::DnsSrv,
                                format!(
                                    "SRV {name} -> {} prio {} weight {}",
                                    t.target, t.priority, t.weight
                                ),
                            );
                        }
                    }
                    Err(e) => run.log.push(format!("source 4 (DNS SRV): {e}")),
                }
            }
            _ => run
                .log
                .push("source 4 (DNS SRV): needs DNS servers and a domain from DHCP".into()),
        }
    }

    // 5. DNS host name, HTTP on port 80.
    if !run.done() {
        match (&run.resolver, &domain) {
            (Some(_), Some(d)) => {
                let name = format!("{}.{d}", cfg.host_name.trim_matches('.'));
                run.try_candidate(
                    ServerUrl::new(Scheme::Http, name.clone(), 80),
                    CandidateSource::DnsHost,
                    format!("host name {name}"),
                );
            }
            _ => run
                .log
                .push("source 5 (DNS host name): needs DNS servers and a domain from DHCP".into()),
        }
    }

    let chosen = run.chosen.map(|i| run.candidates[i].clone());
    match &chosen {
        Some(c) => run
            .log
            .push(format!("chosen server: {} ({:?})", c.url, c.source)),
        None => run.log.push("no management server answered".into()),
    }
    Ok(Discovery {
        interface,
        lease,
        static_config: static_cfg,
        candidates: run.candidates,
        chosen,
        log: run.log,
        elapsed_ms: start.elapsed().as_millis() as u64,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::TcpListener;

    fn http_server() -> (TcpListener, u16) {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        (l, port)
    }

    fn serve(l: TcpListener) {
        std::thread::spawn(move || {
            for s in l.incoming().flatten() {
                let mut s = s;
                let mut b = [0u8; 256];
                let _ = s.read(&mut b);
                let _ = s.write_all(b"HTTP/1.0 200 OK\r\n\r\n");
            }
        });
    }

    /// Without a link there is no DHCP; the URL list is still tried, and with a static
    /// configuration the stored server comes first and is applied to the NIC.
    #[test]
    fn static_config_and_url_list_without_dhcp() {
        let dir = std::env::temp_dir().join(format!("discovery-lib-{}", std::process::id()));
        let (dead, dead_port) = http_server();
        drop(dead);
        let (live, live_port) = http_server();
        serve(live);
        let mut s = DiscoverySettings::default();
        s.set_server_url_list(&format!(
            "127.0.0.1:{dead_port};http://127.0.0.1:{live_port}"
        ))
        .unwrap();
        s.store(&dir).unwrap();
        let net = netif::tests::FakeNetwork {
            nics: vec![Nic {
                name: "eth0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            }],
            no_carrier: vec!["eth0".into()],
            ..Default::default()
        };
        let cfg = Config {
            config_dir: dir.clone(),
            link_timeout: Duration::from_millis(50),
            ..Default::default()
        };
        let d = discover_with(&cfg, &net).unwrap();
        let urls: Vec<&str> = d.candidates.iter().map(|c| c.url.as_str()).collect();
        assert_eq!(
            urls,
            [
                format!("https://127.0.0.1:{dead_port}"),
                format!("http://127.0.0.1:{live_port}")
            ]
        );
        assert!(matches!(d.candidates[0].verdict, Verdict::Rejected(_)));
        assert_eq!(d.chosen.as_ref().unwrap().source, CandidateSource::UrlList);

        let st = StaticNetConfig::from_pairs(
            &bootconfig::parse_kv(&format!(
                "ip=10.9.0.2\nmask=255.255.255.0\ngw=10.9.0.1\nserver=127.0.0.1\nport={live_port}"
            ))
            .0,
        )
        .unwrap();
        st.store(&dir).unwrap();
        let d = discover_with(&cfg, &net).unwrap();
        assert_eq!(d.chosen.as_ref().unwrap().source, CandidateSource::Static);
        assert_eq!(d.candidates.len(), 1);
        assert_eq!(
            *net.calls.lock().unwrap().last().unwrap(),
            "route eth0 10.9.0.1"
        );
        let json = serde_json::to_value(&d).unwrap();
        assert_eq!(json["chosen"]["source"], "static");
        assert_eq!(json["chosen"]["verdict"], "reachable");
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// With the device's CA and no lab setting, plain-HTTP candidates from the URL list and
    /// the static configuration are skipped without a connection, with the reason.
    #[test]
    fn plain_http_candidates_are_skipped_unprobed_when_refused() {
        let dir = std::env::temp_dir().join(format!("discovery-plain-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        l.set_nonblocking(true).unwrap();
        let mut s = DiscoverySettings::default();
        s.set_server_url_list(&format!("http://127.0.0.1:{port}"))
            .unwrap();
        s.store(&dir).unwrap();
        let net = netif::tests::FakeNetwork {
            nics: vec![Nic {
                name: "eth0".into(),
                mac: [2, 0, 0, 0, 0, 1],
            }],
            no_carrier: vec!["eth0".into()],
            ..Default::default()
        };
        let cfg = Config {
            config_dir: dir.clone(),
            link_timeout: Duration::from_millis(50),
            refuse_plain_http: Some("allow it with plain_http = yes in lab.conf".into()),
            command_line_urls: Some(format!("http://127.0.0.1:{port}")),
            ..Default::default()
        };
        let d = discover_with(&cfg, &net).unwrap();
        assert!(d.chosen.is_none(), "{:?}", d.candidates);
        assert!(!d.candidates.is_empty());
        for c in &d.candidates {
            assert!(
                matches!(&c.verdict, Verdict::Rejected(r) if r.contains("plain HTTP skipped") && r.contains("lab.conf")),
                "{c:?}"
            );
        }
        assert!(d.log.iter().any(|l| l.contains("plain HTTP skipped")));
        // Nobody connected to the listener.
        assert!(l.accept().is_err());
        // The static configuration (proto http by default) is skipped the same way.
        let st = StaticNetConfig::from_pairs(
            &bootconfig::parse_kv(&format!(
                "ip=10.9.0.2\nmask=255.255.255.0\nserver=127.0.0.1\nport={port}"
            ))
            .0,
        )
        .unwrap();
        st.store(&dir).unwrap();
        let d = discover_with(&cfg, &net).unwrap();
        assert!(d.chosen.is_none());
        assert_eq!(d.candidates[0].source, CandidateSource::Static);
        assert!(l.accept().is_err());
        // Without the refusal the same listener is chosen.
        let cfg = Config {
            refuse_plain_http: None,
            ..cfg
        };
        l.set_nonblocking(false).unwrap();
        serve(l);
        let d = discover_with(&cfg, &net).unwrap();
        assert!(d.chosen.is_some(), "{:?}", d.candidates);
        std::fs::remove_dir_all(dir).unwrap();
    }

    /// `{e:#}`-style printing (the error, then each `source()`) names the OS error once.
    #[test]
    fn configure_error_chain_names_its_cause_once() {
        let e = DiscoveryError::Configure {
            iface: "eth0".into(),
            source: std::io::Error::from_raw_os_error(libc::EPERM),
        };
        let cause = std::io::Error::from_raw_os_error(libc::EPERM).to_string();
        let chain = error_chain(&e);
        assert_eq!(chain.matches(&cause).count(), 1, "{chain}");
        assert_eq!(
            chain,
            format!("configuring eth0 (are we root / CAP_NET_ADMIN?): {cause}")
        );
        assert!(std::error::Error::source(&e).is_some());
    }

    #[test]
    fn no_interface_is_an_error_naming_the_filter() {
        let net = netif::tests::FakeNetwork::default();
        let cfg = Config {
            interfaces: vec!["eth7".into()],
            config_dir: "/nonexistent-discovery-test".into(),
            ..Default::default()
        };
        let e = discover_with(&cfg, &net).unwrap_err();
        assert!(e.to_string().contains("eth7"), "{e}");
    }
}
