//! The `img` verbs of server discovery (issue 3):
//!
//! * `img -discover` runs the whole chain (network bring-up, DHCP, the seed's five sources)
//!   and prints every candidate in the order tried, with its source and verdict, and the
//!   chosen server; `-json` prints the same for scripts.
//! * `img -serverurl "LIST"` stores the server URL list on the boot partition (seed 000,
//!   "Network Setup / Servers"); `img -serverurl` shows it, `img -serverurl clear` removes it.
//! * `img -netconfig ip=… mask=… gw=… server=… [proto=http] [port=80]` stores the Merlin
//!   static network configuration; `img -netconfig` shows it, `-netconfig clear` removes it.
//! * `img -findserver` runs the boot agent's start-up flow on this console (discovery, then
//!   the seed's "NO HSERVER CONFIGURED" fallback), as the agent personality does at boot.
//!
//! Options are written ZENworks style, `-name=value` (or `-name value`, `--name=value`), and
//! parsed by the one parser of every verb (`args.rs`) against the tables below.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context};
use discovery::bootconfig::{parse_kv, DiscoverySettings, StaticNetConfig};
use discovery::{Config, Discovery, Verdict};

use crate::args::{flag, many, value, Matches, Opt, UsageError};
use crate::bootflow::{self, BootOutcome, LoggingHandoff, TtyConsole};

/// One-line usage lines for `img -help`.
pub const USAGE: &str = "\
  -discover [-json] [-all] [-v] [-iface=NAME].. [-config=DIR] [-srv=NAME] [-host=NAME]
        [-vendorclass=ID] [-dhcp-timeout=S] [-link-timeout=S] [-probe-timeout=S] [-noconfigure]
        [-resolvconf=PATH] [-server=\"URL;URL..\"] [-ca=PEM]
                                    find the management server: DHCP options 186/190/192, the
                                    URL list, RTIAgent options, DNS SRV, DNS host name
                                    (-server: tried first, as img.server= on the kernel line).
                                    With the server CA (-ca, IMG_CA_FILE, /bootagent/ca.pem)
                                    plain-HTTP candidates are skipped unless lab.conf in the
                                    config folder says plain_http = yes
  -serverurl [\"URL;URL..\"|clear] [-config=DIR|-disk=DISK]
                                    show / set / clear the server URL list (max 63 characters)
  -netconfig [ip=A mask=M gw=G server=S proto=http|https port=N | clear] [-config=DIR|-disk=DISK]
                                    show / set / clear the static network configuration
                                    (-disk: in DISK's boot-agent partition, as the agent keeps it)
  -findserver [discover options]    the boot agent start-up: discover, else offer the guest OS";

/// Exit code when no management server answered (docs/img.md).
const EXIT_NO_SERVER: i32 = crate::exit::Exit::NoServer as i32;

/// The options of `-discover` and `-findserver` (`cli::VERBS`).
pub const DISCOVER_OPTS: &[Opt] = &[
    value(&["ca"]),
    value(&["server"]),
    value(&["resolvconf"]),
    flag(&["json"]),
    flag(&["all"]),
    flag(&["v", "verbose"]),
    many(&["iface"]),
    value(&["config"]),
    value(&["srv"]),
    value(&["host"]),
    value(&["vendorclass"]),
    value(&["dhcp-timeout"]),
    value(&["link-timeout"]),
    value(&["probe-timeout"]),
    value(&["rti-timeout"]),
    flag(&["noconfigure"]),
];

/// The options of `-serverurl` and `-netconfig`.
pub const CONFIG_OPTS: &[Opt] = &[value(&["config"]), value(&["disk"])];

/// A number of seconds (`-dhcp-timeout=1.5`).
fn secs(a: &Matches, name: &str) -> anyhow::Result<Option<Duration>> {
    a.value(name)
        .map(|v| {
            v.parse::<f64>()
                .ok()
                .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
                .map(Duration::from_secs_f64)
                .ok_or_else(|| UsageError(format!("-{name}={v}: give a number of seconds")).into())
        })
        .transpose()
}

fn config_dir(a: &Matches) -> PathBuf {
    a.value("config")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("IMG_CONFIG_DIR").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from(discovery::DEFAULT_CONFIG_DIR))
}

/// The discovery configuration from the command line.
fn discovery_config(a: &Matches) -> anyhow::Result<Config> {
    let mut cfg = Config {
        config_dir: config_dir(a),
        probe_all: a.flag("all"),
        configure: !a.flag("noconfigure"),
        ..Config::default()
    };
    cfg.interfaces = a
        .all("iface")
        .iter()
        .flat_map(|v| v.split(','))
        .map(str::to_string)
        .collect();
    if let Some(v) = a.value("srv") {
        cfg.srv_name = v.into();
    }
    if let Some(v) = a.value("host") {
        cfg.host_name = v.into();
    }
    if let Some(v) = a.value("vendorclass") {
        cfg.vendor_class = v.into();
    }
    if let Some(d) = secs(a, "dhcp-timeout")? {
        cfg.dhcp_timeout = d;
    }
    if let Some(d) = secs(a, "link-timeout")? {
        cfg.link_timeout = d;
    }
    if let Some(d) = secs(a, "probe-timeout")? {
        cfg.probe_timeout = d;
    }
    if let Some(d) = secs(a, "rti-timeout")? {
        cfg.rti_timeout = d;
    }
    cfg.resolv_conf = a.value("resolvconf").map(PathBuf::from);
    // `-server=LIST`: what `img.server=` on the kernel command line does for the boot agent.
    cfg.command_line_urls = a.value("server").map(str::to_string);
    // The trust policy: with the server's CA, plain HTTP only when lab.conf allows it.
    let ca = a
        .value("ca")
        .map(PathBuf::from)
        .or_else(crate::checkin::trust::pinned_ca);
    let mut notes = Vec::new();
    let lab = discovery::LabSettings::load(&cfg.config_dir, &mut notes)?;
    for n in notes {
        eprintln!("img: {n}");
    }
    for line in lab.banner(&cfg.config_dir) {
        eprintln!("img: {line}");
    }
    cfg.refuse_plain_http =
        crate::checkin::trust::plain_http_refusal(ca.as_deref(), &lab, &cfg.config_dir);
    Ok(cfg)
}

/// `img -discover`.
pub fn run_discover(a: Matches) -> anyhow::Result<i32> {
    if let Some(v) = a.values.first() {
        return Err(UsageError(format!("-discover takes no value ({v:?})")).into());
    }
    let cfg = discovery_config(&a)?;
    let d = discovery::discover(&cfg).context("discovering the management server")?;
    if a.flag("json") {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render(&d, a.flag("v")));
    }
    Ok(if d.chosen.is_some() {
        0
    } else {
        EXIT_NO_SERVER
    })
}

/// The human-readable report of a discovery run.
fn render(d: &Discovery, verbose: bool) -> String {
    let mut out = String::new();
    if verbose {
        for l in &d.log {
            out.push_str(&format!("  . {l}\n"));
        }
    }
    match (&d.lease, &d.static_config) {
        (Some(l), _) => out.push_str(&format!(
            "interface {}: DHCP lease {}/{} router {} dns {} domain {} (server {})\n",
            l.iface,
            l.ip,
            l.prefix_len,
            l.router
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
            if l.dns_servers.is_empty() {
                "-".to_string()
            } else {
                l.dns_servers
                    .iter()
                    .map(|s| s.to_string())
                    .collect::<Vec<_>>()
                    .join(",")
            },
            l.domain.as_deref().unwrap_or("-"),
            l.server_id
                .map(|r| r.to_string())
                .unwrap_or_else(|| "-".into()),
        )),
        (None, Some(s)) => out.push_str(&format!(
            "interface {}: static {}/{} gw {}\n",
            d.interface.as_deref().unwrap_or("-"),
            s.ip,
            s.mask,
            s.gateway
                .map(|g| g.to_string())
                .unwrap_or_else(|| "-".into())
        )),
        (None, None) => out.push_str("no DHCP lease and no static configuration\n"),
    }
    out.push_str("candidates, in the order tried:\n");
    if d.candidates.is_empty() {
        out.push_str("  (none)\n");
    }
    for (i, c) in d.candidates.iter().enumerate() {
        let source = serde_json::to_value(c.source)
            .ok()
            .and_then(|v| v.as_str().map(str::to_string))
            .unwrap_or_default();
        let verdict = match &c.verdict {
            Verdict::Reachable(r) => format!("REACHABLE: {r}"),
            Verdict::Rejected(r) => format!("rejected: {r}"),
            Verdict::NotTried => "not tried".into(),
        };
        out.push_str(&format!(
            "  {}. {:<28} {:<12} {}  [{}]\n",
            i + 1,
            c.url,
            source,
            verdict,
            c.detail
        ));
    }
    match &d.chosen {
        Some(c) => out.push_str(&format!("chosen server: {}\n", c.url)),
        None => out.push_str("chosen server: none (no candidate answered)\n"),
    }
    out
}

/// Run `f` on the configuration folder of `-serverurl`/`-netconfig`: DISK's boot-agent
/// partition with `-disk=DISK` (filled into a temporary folder and committed back, as the
/// boot agent does), else `-config=DIR`, `IMG_CONFIG_DIR` or the agent's own folder, which
/// on a device is backed by the boot-agent partition and committed after the change.
fn with_config_dir(
    a: &Matches,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    if let Some(disk) = a.value("disk") {
        if a.value("config").is_some() {
            bail!(UsageError(
                "give -disk=DISK (its boot-agent partition) or -config=DIR, not both".into()
            ));
        }
        let t = crate::bootstore::TempRoot::new(std::path::Path::new(disk))?;
        let code = f(&t.root().join("config"))?;
        crate::bootstore::commit(&t.backing)?;
        return Ok(code);
    }
    let dir = config_dir(a);
    let code = f(&dir)?;
    if let Some(b) = crate::bootstore::recorded_for(&dir) {
        crate::bootstore::commit(&b)?;
    }
    Ok(code)
}

/// `img -serverurl`.
pub fn run_serverurl(a: Matches) -> anyhow::Result<i32> {
    with_config_dir(&a, |dir| serverurl_in(&a, dir))
}

fn serverurl_in(a: &Matches, dir: &std::path::Path) -> anyhow::Result<i32> {
    let mut notes = Vec::new();
    let mut s = DiscoverySettings::load(dir, &mut notes)?;
    for n in notes {
        eprintln!("img: {n}");
    }
    match a.values.as_slice() {
        [] => {
            println!(
                "{}",
                s.server_url_list
                    .as_deref()
                    .unwrap_or("(no server URL list)")
            );
            return Ok(0);
        }
        [v] if v.eq_ignore_ascii_case("clear") => s.server_url_list = None,
        [v] => s
            .set_server_url_list(v)
            .map_err(|e| UsageError(e.to_string()))?,
        _ => {
            return Err(UsageError("quote the URL list: img -serverurl \"URL;URL\"".into()).into())
        }
    }
    s.store(dir)?;
    println!(
        "server URL list: {}",
        s.server_url_list.as_deref().unwrap_or("(cleared)")
    );
    Ok(0)
}

/// `img -netconfig`.
pub fn run_netconfig(a: Matches) -> anyhow::Result<i32> {
    with_config_dir(&a, |dir| netconfig_in(&a, dir))
}

fn netconfig_in(a: &Matches, dir: &std::path::Path) -> anyhow::Result<i32> {
    match a.values.as_slice() {
        [] => {
            match StaticNetConfig::load(dir)? {
                Some(c) => print!("{}", c.render()),
                None => println!("(no static network configuration: DHCP is used)"),
            }
            Ok(0)
        }
        [v] if v.eq_ignore_ascii_case("clear") => {
            let removed = StaticNetConfig::clear(dir)?;
            println!(
                "{}",
                if removed {
                    "static network configuration cleared: DHCP is used at the next start"
                } else {
                    "no static network configuration was set"
                }
            );
            Ok(0)
        }
        values => {
            let text = values.join("\n");
            let (pairs, bad) = parse_kv(&text);
            if let Some(b) = bad.first() {
                bail!(UsageError(format!("-netconfig takes key=value pairs: {b}")));
            }
            for (k, _) in &pairs {
                if !["ip", "mask", "gw", "server", "proto", "port"].contains(&k.as_str()) {
                    bail!(UsageError(format!(
                        "-netconfig: unknown key {k:?} (ip, mask, gw, server, proto, port)"
                    )));
                }
            }
            let c = StaticNetConfig::from_pairs(&pairs).map_err(|e| UsageError(e.to_string()))?;
            c.store(dir)?;
            print!("{}", c.render());
            Ok(0)
        }
    }
}

/// `img -findserver`.
pub fn run_findserver(a: Matches) -> anyhow::Result<i32> {
    a.finish()?;
    let cfg = discovery_config(&a)?;
    let mut console = TtyConsole::stdio();
    let outcome = bootflow::find_server_or_fallback(&cfg, &mut console, &LoggingHandoff)?;
    Ok(match outcome {
        BootOutcome::Server { chosen, discovery } => {
            println!(
                "outcome: server {} ({} candidate(s) tried)",
                chosen.url,
                discovery.candidates.len()
            );
            0
        }
        BootOutcome::GuestOs => {
            println!("outcome: guest-os");
            EXIT_NO_SERVER
        }
        BootOutcome::OperatorConsole => {
            println!("outcome: operator-console");
            EXIT_NO_SERVER
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    use std::ffi::OsString;

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    fn parse(words: Vec<OsString>) -> Result<Matches, UsageError> {
        crate::args::parse("discover", DISCOVER_OPTS, &words)
    }

    fn tmpdir(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("img-discover-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        d
    }

    #[test]
    fn parses_zenworks_style_options() {
        let a = parse(args("-json --iface=eth0 -iface eth1 -config /x -all")).unwrap();
        assert!(a.flag("json") && a.flag("all"));
        let cfg = discovery_config(&a).unwrap();
        assert_eq!(cfg.interfaces, ["eth0", "eth1"]);
        assert_eq!(cfg.config_dir, PathBuf::from("/x"));
        assert!(cfg.probe_all);
        assert!(parse(args("-iface")).is_err());
        let a = parse(args("-dhcp-timeout=abc")).unwrap();
        assert!(discovery_config(&a).is_err());
        assert!(parse(args("-json=yes")).is_err(), "a flag takes no value");
        assert!(parse(args("-bogus")).is_err());
    }

    #[test]
    fn a_server_ca_refuses_plain_http_unless_lab_conf_allows_it() {
        let dir = tmpdir("lab");
        let a = parse(args(&format!("-config={} -ca /x/ca.pem", dir.display()))).unwrap();
        let why = discovery_config(&a).unwrap().refuse_plain_http.unwrap();
        assert!(
            why.contains("/x/ca.pem") && why.contains("lab.conf"),
            "{why}"
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lab.conf"), "plain_http = yes\n").unwrap();
        assert_eq!(discovery_config(&a).unwrap().refuse_plain_http, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn serverurl_and_netconfig_round_trip() {
        let dir = tmpdir("cfg");
        let c = format!("-config={}", dir.display());
        let run = |v: &str, more: &[&str]| {
            let mut a = vec![OsString::from(format!("-{v}")), OsString::from(&c)];
            a.extend(more.iter().map(OsString::from));
            crate::cli::dispatch(&a)
        };
        assert_eq!(
            run("serverurl", &["https://a.example; 10.0.0.1:80"]).unwrap(),
            0
        );
        let mut notes = Vec::new();
        let s = DiscoverySettings::load(&dir, &mut notes).unwrap();
        assert_eq!(
            s.server_url_list.as_deref(),
            Some("https://a.example; 10.0.0.1:80")
        );
        assert!(run("serverurl", &[&"x".repeat(64)]).is_err());
        assert_eq!(run("serverurl", &["clear"]).unwrap(), 0);
        assert_eq!(
            DiscoverySettings::load(&dir, &mut notes)
                .unwrap()
                .server_url_list,
            None
        );

        assert_eq!(
            run(
                "netconfig",
                &[
                    "ip=10.1.0.5",
                    "mask=255.255.255.0",
                    "gw=10.1.0.1",
                    "server=10.1.0.2"
                ]
            )
            .unwrap(),
            0
        );
        let st = StaticNetConfig::load(&dir).unwrap().unwrap();
        assert_eq!((st.port, st.scheme), (80, discovery::Scheme::Http));
        assert!(run("netconfig", &["ip=10.1.0.5", "bogus=1"]).is_err());
        assert!(run("netconfig", &["ip=10.1.0.5"]).is_err());
        assert_eq!(run("netconfig", &["clear"]).unwrap(), 0);
        assert!(StaticNetConfig::load(&dir).unwrap().is_none());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
