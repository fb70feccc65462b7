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
mod walk;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;

pub use bootconfig::{ConfigError, DiscoverySettings, LabSettings, StaticNetConfig};
pub use dhcp::{DhcpParams, Lease, LeaseKeeper};
pub use netif::{NetworkSetup, Nic, SystemNetwork};
pub use options::VxcmOptions;
pub use urllist::{Scheme, ServerUrl};
pub use walk::discover_with;

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
