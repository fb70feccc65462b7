//! The discovery walk itself: network up, then each source in the seed's priority order.
//!
//! [`discover_with`] reads top to bottom as the steps of the boot: settings from the boot
//! partition, links, the static configuration or a DHCP lease, and then sources 0 (kernel
//! command line) to 5 (DNS host name). Each step is one method of [`Run`], which keeps the
//! log and the candidates and stops probing once one answered (unless `probe_all`).

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::dhcp::{self, DhcpParams, Lease};
use crate::netif::{NetworkSetup, Nic};
use crate::options::VxcmOptions;
use crate::urllist::{self, Scheme, ServerUrl};
use crate::{
    dns, probe, CandidateSource, Config, Discovery, DiscoveryError, DiscoverySettings,
    ServerCandidate, StaticNetConfig, Verdict, DEFAULT_HOST_NAME, DEFAULT_SRV_NAME,
    DEFAULT_VENDOR_CLASS, RTI_VENDOR_CLASS,
};

/// Runs the whole chain with the given network seam.
pub fn discover_with(cfg: &Config, net: &dyn NetworkSetup) -> Result<Discovery, DiscoveryError> {
    let start = Instant::now();
    let mut log = Vec::new();
    let (cfg, settings, static_cfg) = effective_config(cfg, &mut log)?;
    let (nics, up) = bring_up_links(&cfg, net, start, &mut log)?;

    let mut run = Run {
        cfg: &cfg,
        log,
        candidates: Vec::new(),
        chosen: None,
        resolver: None,
    };
    let mut net_state = NetState::default();
    if let Some(st) = &static_cfg {
        run.static_network(st, net, &nics, &up, &mut net_state)?;
    } else if !up.is_empty() {
        run.dhcp_lease(net, &up, &mut net_state)?;
    } else {
        run.log.push("no interface has a link: no DHCP".into());
    }
    let NetState {
        interface,
        lease,
        dhcp_sock,
    } = net_state;
    let domain = lease.as_ref().and_then(|l| l.domain.clone());

    run.source_command_line(domain.as_deref());
    if let Some(l) = &lease {
        run.source_dhcp_options(l);
    }
    run.source_url_list(&settings, domain.as_deref());
    if let (Some(l), Some(sock)) = (&lease, &dhcp_sock) {
        run.source_rti_agent(l, sock);
    }
    run.source_dns_srv(domain.as_deref());
    run.source_dns_host(domain.as_deref());

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

/// Boot-partition settings replace the defaults, never an explicit value.
fn effective_config(
    cfg: &Config,
    log: &mut Vec<String>,
) -> Result<(Config, DiscoverySettings, Option<StaticNetConfig>), DiscoveryError> {
    let settings = DiscoverySettings::load(&cfg.config_dir, log)?;
    let static_cfg = StaticNetConfig::load(&cfg.config_dir)?;
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
    Ok((cfg, settings, static_cfg))
}

/// Sets the chosen NICs up and waits for carrier. Returns every chosen NIC and those with a
/// link: all of them up to the link timeout, but once one has carrier the others get only
/// half a second, since one working NIC is enough to start DHCP.
fn bring_up_links(
    cfg: &Config,
    net: &dyn NetworkSetup,
    start: Instant,
    log: &mut Vec<String>,
) -> Result<(Vec<Nic>, Vec<Nic>), DiscoveryError> {
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
    Ok((nics, up))
}

/// What the network step left behind for the sources.
#[derive(Default)]
struct NetState {
    interface: Option<String>,
    lease: Option<Lease>,
    dhcp_sock: Option<dhcp::DhcpSocket>,
}

fn shared_log(log: &Mutex<Vec<String>>) -> Vec<String> {
    std::mem::take(&mut *log.lock().unwrap_or_else(|p| p.into_inner()))
}

fn or_dash<T: ToString>(v: Option<T>) -> String {
    v.map(|v| v.to_string()).unwrap_or_else(|| "-".into())
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

    /// Merlin: the stored configuration replaces DHCP (the seed disables DHCP there), and
    /// its server is the first candidate.
    fn static_network(
        &mut self,
        st: &StaticNetConfig,
        net: &dyn NetworkSetup,
        nics: &[Nic],
        up: &[Nic],
        out: &mut NetState,
    ) -> Result<(), DiscoveryError> {
        let nic = up.first().or(nics.first()).cloned();
        if let Some(nic) = nic {
            self.log.push(format!(
                "static configuration on the boot partition: {} {}/{} gw {} server {}://{}:{}",
                nic.name,
                st.ip,
                st.mask,
                or_dash(st.gateway),
                st.scheme,
                st.server,
                st.port
            ));
            if self.cfg.configure {
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
            out.interface = Some(nic.name);
        }
        self.try_candidate(
            ServerUrl::new(st.scheme, st.server.to_string(), st.port),
            CandidateSource::Static,
            "static configuration (netconfig.conf)".into(),
        );
        Ok(())
    }

    /// The ordinary DHCP exchange on every NIC with a link; the first lease wins and, when
    /// configuring, is applied with its DNS settings.
    fn dhcp_lease(
        &mut self,
        net: &dyn NetworkSetup,
        up: &[Nic],
        out: &mut NetState,
    ) -> Result<(), DiscoveryError> {
        let cfg = self.cfg;
        let params = DhcpParams {
            vendor_class: cfg.vendor_class.clone(),
            timeout: cfg.dhcp_timeout,
            first_retry: cfg.dhcp_first_retry,
        };
        let dlog = Mutex::new(Vec::new());
        let t = Instant::now();
        let (l, sock) = match dhcp::obtain_first_lease(up, &params, &dlog) {
            Ok(got) => got,
            Err(e) => {
                self.log.extend(shared_log(&dlog));
                self.log.push(format!("DHCP: {e}"));
                return Ok(());
            }
        };
        self.log.extend(shared_log(&dlog));
        self.log.push(format!(
            "DHCP lease on {} in {} ms: {}/{} router {} dns {:?} domain {} from {}",
            l.iface,
            t.elapsed().as_millis(),
            l.ip,
            l.prefix_len,
            or_dash(l.router),
            l.dns_servers,
            l.domain.as_deref().unwrap_or("-"),
            or_dash(l.server_id),
        ));
        for n in &l.notes {
            self.log.push(format!("DHCP: {n}"));
        }
        if cfg.configure {
            l.configure(net)
                .map_err(|source| DiscoveryError::Configure {
                    iface: l.iface.clone(),
                    source,
                })?;
            if let Some(path) = &cfg.resolv_conf {
                match std::fs::write(path, l.resolv_conf()) {
                    Ok(()) => self
                        .log
                        .push(format!("DNS settings written to {}", path.display())),
                    Err(e) => self.log.push(format!("writing {}: {e}", path.display())),
                }
            }
        }
        out.interface = Some(l.iface.clone());
        self.resolver = (!l.dns_servers.is_empty())
            .then(|| dns::Resolver::new(l.dns_servers.clone(), cfg.dns_timeout));
        out.lease = Some(l);
        out.dhcp_sock = Some(sock);
        Ok(())
    }

    /// 0. The kernel command line's list, when the administrator gave one.
    fn source_command_line(&mut self, domain: Option<&str>) {
        let Some(list) = &self.cfg.command_line_urls else {
            return;
        };
        match urllist::parse_url_list(list, domain) {
            Err(e) => self
                .log
                .push(format!("kernel command line img.server: {e}")),
            Ok(urls) => self.try_list(urls, "kernel command line entry"),
        }
    }

    /// 1. DHCP options of the ordinary lease.
    fn source_dhcp_options(&mut self, lease: &Lease) {
        if self.done() {
            return;
        }
        let v = lease.vxcm.clone();
        if v.is_empty() {
            self.log
                .push("source 1 (DHCP options 186/190/192): none in the lease".into());
        }
        self.try_vxcm(&v, CandidateSource::DhcpOptions, "DHCP");
    }

    /// 2. The URL list on the boot partition.
    fn source_url_list(&mut self, settings: &DiscoverySettings, domain: Option<&str>) {
        if self.done() {
            return;
        }
        let Some(list) = &settings.server_url_list else {
            self.log
                .push("source 2 (server URL list): none configured".into());
            return;
        };
        if let Err(e) = urllist::check_url_list_len(list) {
            self.log.push(format!(
                "source 2 (server URL list): {e}; reading it anyway"
            ));
        }
        match urllist::parse_url_list(list, domain) {
            Err(e) => self.log.push(format!("source 2 (server URL list): {e}")),
            Ok(urls) => self.try_list(urls, "URL list entry"),
        }
    }

    /// 3. Options answered to vendor class RTIAgent (ordinary or proxy DHCP).
    fn source_rti_agent(&mut self, lease: &Lease, sock: &dhcp::DhcpSocket) {
        if self.done() {
            return;
        }
        let replies = sock.inform(
            lease,
            RTI_VENDOR_CLASS,
            &lease.proxy_servers,
            self.cfg.rti_timeout,
        );
        let mut found = false;
        for r in &replies {
            let mut notes = Vec::new();
            let v = r.vxcm(&mut notes);
            for n in notes {
                self.log.push(format!("RTIAgent reply: {n}"));
            }
            if !v.is_empty() {
                found = true;
                let from = r
                    .server_id()
                    .map(|s| s.to_string())
                    .unwrap_or_else(|| "?".into());
                self.try_vxcm(
                    &v,
                    CandidateSource::RtiAgent,
                    &format!("RTIAgent reply from {from}"),
                );
            }
        }
        if !found {
            self.log.push(format!(
                "source 3 (vendor class RTIAgent): {} replies, none with options 186/190/192",
                replies.len()
            ));
        }
    }

    /// 4. DNS SRV `<srv_name>.<domain>`, in RFC 2782 order.
    fn source_dns_srv(&mut self, domain: Option<&str>) {
        if self.done() {
            return;
        }
        let (Some(r), Some(d)) = (&self.resolver, domain) else {
            self.log
                .push("source 4 (DNS SRV): needs DNS servers and a domain from DHCP".into());
            return;
        };
        let name = format!("{}.{d}", self.cfg.srv_name.trim_matches('.'));
        let (targets, via_tcp) = match r.lookup_srv(&name, &mut dns::SplitMix::from_clock()) {
            Ok(found) => found,
            Err(e) => {
                self.log.push(format!("source 4 (DNS SRV): {e}"));
                return;
            }
        };
        if via_tcp {
            self.log.push(format!(
                "DNS SRV {name}: UDP answer truncated, {} targets read over TCP",
                targets.len()
            ));
        }
        for t in targets {
            // The SRV record names the port; like the URL list, 80 means HTTP and anything
            // else HTTPS (the seed: "80, or 443 for HTTPS").
            let scheme = if t.port == 80 {
                Scheme::Http
            } else {
                Scheme::Https
            };
            let host = match t.addrs.first() {
                Some(ip) => ip.to_string(),
                None => t.target.clone(),
            };
            self.try_candidate(
                ServerUrl::new(scheme, host, t.port),
                CandidateSource::DnsSrv,
                format!(
                    "SRV {name} -> {} prio {} weight {}",
                    t.target, t.priority, t.weight
                ),
            );
        }
    }

    /// 5. DNS host name `<host_name>.<domain>`, HTTP on port 80.
    fn source_dns_host(&mut self, domain: Option<&str>) {
        if self.done() {
            return;
        }
        let (Some(_), Some(d)) = (&self.resolver, domain) else {
            self.log
                .push("source 5 (DNS host name): needs DNS servers and a domain from DHCP".into());
            return;
        };
        let name = format!("{}.{d}", self.cfg.host_name.trim_matches('.'));
        self.try_candidate(
            ServerUrl::new(Scheme::Http, name.clone(), 80),
            CandidateSource::DnsHost,
            format!("host name {name}"),
        );
    }

    /// Tries each URL of a list, numbered from 1 in the candidate's detail.
    fn try_list(&mut self, urls: Vec<ServerUrl>, what: &str) {
        for (i, u) in urls.into_iter().enumerate() {
            self.try_candidate(u, CandidateSource::UrlList, format!("{what} {}", i + 1));
        }
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
