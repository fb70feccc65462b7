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
//! Options are written ZENworks style, `-name=value` (or `-name value`, `--name=value`).

use std::ffi::OsString;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use discovery::bootconfig::{parse_kv, DiscoverySettings, StaticNetConfig};
use discovery::{Config, Discovery, Verdict};

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

/// Handles the img verbs that belong to discovery; returns None when `verb` is not one of
/// them. `args` are the remaining command-line arguments after the verb. Returns the process
/// exit code.
pub fn dispatch(verb: &str, args: Vec<OsString>) -> Option<anyhow::Result<i32>> {
    let verb = verb.trim_start_matches('-');
    Some(match verb {
        "discover" => parse(args).and_then(|a| run_discover(&a)),
        "serverurl" => parse(args).and_then(|a| run_serverurl(&a)),
        "netconfig" => parse(args).and_then(|a| run_netconfig(&a)),
        "findserver" => parse(args).and_then(|a| run_findserver(&a)),
        _ => return None,
    })
}

/// Exit code when no management server answered (docs/img.md).
const EXIT_NO_SERVER: i32 = crate::exit::Exit::NoServer as i32;

/// Parsed arguments: `-name[=value]` options and plain values.
#[derive(Debug, Default, PartialEq)]
struct Args {
    opts: Vec<(String, Option<String>)>,
    values: Vec<String>,
}

/// Options that take a value even when written `-name value`.
const VALUED: [&str; 12] = [
    "disk",
    "ca",
    "resolvconf",
    "iface",
    "config",
    "srv",
    "host",
    "vendorclass",
    "dhcp-timeout",
    "link-timeout",
    "probe-timeout",
    "rti-timeout",
];

fn parse(args: Vec<OsString>) -> anyhow::Result<Args> {
    let mut out = Args::default();
    let mut it = args.into_iter().map(|a| {
        a.into_string()
            .map_err(|a| anyhow!("argument {a:?} is not valid UTF-8"))
    });
    while let Some(a) = it.next() {
        let a = a?;
        if a.len() > 1 && a.starts_with('-') && !a.starts_with("-=") {
            let name = a.trim_start_matches('-');
            let (name, value) = match name.split_once('=') {
                Some((n, v)) => (n.to_ascii_lowercase(), Some(v.to_string())),
                None => (name.to_ascii_lowercase(), None),
            };
            let value = match value {
                None if VALUED.contains(&name.as_str()) => Some(
                    it.next()
                        .transpose()?
                        .ok_or_else(|| crate::args::UsageError(format!("-{name} needs a value")))?,
                ),
                v => v,
            };
            out.opts.push((name, value));
        } else {
            out.values.push(a);
        }
    }
    Ok(out)
}

impl Args {
    fn flag(&self, name: &str) -> bool {
        self.opts.iter().any(|(n, _)| n == name)
    }

    fn value(&self, name: &str) -> Option<&str> {
        self.opts
            .iter()
            .rev()
            .find(|(n, _)| n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    fn secs(&self, name: &str) -> anyhow::Result<Option<Duration>> {
        self.value(name)
            .map(|v| {
                v.parse::<f64>()
                    .ok()
                    .filter(|s| s.is_finite() && *s >= 0.0 && *s < 86_400.0)
                    .map(Duration::from_secs_f64)
                    .ok_or_else(|| {
                        crate::args::UsageError(format!("-{name}={v}: give a number of seconds"))
                            .into()
                    })
            })
            .transpose()
    }

    fn only(&self, allowed: &[&str]) -> anyhow::Result<()> {
        for (n, _) in &self.opts {
            if !allowed.contains(&n.as_str()) {
                return Err(crate::args::UsageError(format!("unknown option -{n}")).into());
            }
        }
        Ok(())
    }

    fn config_dir(&self) -> PathBuf {
        self.value("config")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("IMG_CONFIG_DIR").map(PathBuf::from))
            .unwrap_or_else(|| PathBuf::from(discovery::DEFAULT_CONFIG_DIR))
    }

    /// The discovery configuration from the command line.
    fn discovery_config(&self) -> anyhow::Result<Config> {
        let mut cfg = Config {
            config_dir: self.config_dir(),
            probe_all: self.flag("all"),
            configure: !self.flag("noconfigure"),
            ..Config::default()
        };
        cfg.interfaces = self
            .opts
            .iter()
            .filter(|(n, _)| n == "iface")
            .filter_map(|(_, v)| v.clone())
            .flat_map(|v| v.split(',').map(str::to_string).collect::<Vec<_>>())
            .collect();
        if let Some(v) = self.value("srv") {
            cfg.srv_name = v.into();
        }
        if let Some(v) = self.value("host") {
            cfg.host_name = v.into();
        }
        if let Some(v) = self.value("vendorclass") {
            cfg.vendor_class = v.into();
        }
        if let Some(d) = self.secs("dhcp-timeout")? {
            cfg.dhcp_timeout = d;
        }
        if let Some(d) = self.secs("link-timeout")? {
            cfg.link_timeout = d;
        }
        if let Some(d) = self.secs("probe-timeout")? {
            cfg.probe_timeout = d;
        }
        if let Some(d) = self.secs("rti-timeout")? {
            cfg.rti_timeout = d;
        }
        cfg.resolv_conf = self.value("resolvconf").map(PathBuf::from);
        // `-server=LIST`: what `img.server=` on the kernel command line does for the boot agent.
        cfg.command_line_urls = self.value("server").map(str::to_string);
        // The trust policy: with the server's CA, plain HTTP only when lab.conf allows it.
        let ca = self
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
}

const DISCOVER_OPTS: [&str; 17] = [
    "ca",
    "server",
    "resolvconf",
    "json",
    "all",
    "v",
    "iface",
    "config",
    "srv",
    "host",
    "vendorclass",
    "dhcp-timeout",
    "link-timeout",
    "probe-timeout",
    "rti-timeout",
    "noconfigure",
    "verbose",
];

fn run_discover(a: &Args) -> anyhow::Result<i32> {
    a.only(&DISCOVER_OPTS)?;
    if let Some(v) = a.values.first() {
        return Err(crate::args::UsageError(format!("-discover takes no value ({v:?})")).into());
    }
    let cfg = a.discovery_config()?;
    let d = discovery::discover(&cfg).context("discovering the management server")?;
    if a.flag("json") {
        println!("{}", serde_json::to_string_pretty(&d)?);
    } else {
        print!("{}", render(&d, a.flag("v") || a.flag("verbose")));
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
    a: &Args,
    f: impl FnOnce(&std::path::Path) -> anyhow::Result<i32>,
) -> anyhow::Result<i32> {
    if let Some(disk) = a.value("disk") {
        if a.value("config").is_some() {
            bail!(crate::args::UsageError(
                "give -disk=DISK (its boot-agent partition) or -config=DIR, not both".into()
            ));
        }
        let t = crate::bootstore::TempRoot::new(std::path::Path::new(disk))?;
        let code = f(&t.root().join("config"))?;
        crate::bootstore::commit(&t.backing)?;
        return Ok(code);
    }
    let dir = a.config_dir();
    let code = f(&dir)?;
    if let Some(b) = crate::bootstore::recorded_for(&dir) {
        crate::bootstore::commit(&b)?;
    }
    Ok(code)
}

fn run_serverurl(a: &Args) -> anyhow::Result<i32> {
    a.only(&["config", "disk"])?;
    with_config_dir(a, |dir| serverurl_in(a, dir))
}

fn serverurl_in(a: &Args, dir: &std::path::Path) -> anyhow::Result<i32> {
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
            .map_err(|e| crate::args::UsageError(e.to_string()))?,
        _ => {
            return Err(crate::args::UsageError(
                "quote the URL list: img -serverurl \"URL;URL\"".into(),
            )
            .into())
        }
    }
    s.store(dir)?;
    println!(
        "server URL list: {}",
        s.server_url_list.as_deref().unwrap_or("(cleared)")
    );
    Ok(0)
}

fn run_netconfig(a: &Args) -> anyhow::Result<i32> {
    a.only(&["config", "disk"])?;
    with_config_dir(a, |dir| netconfig_in(a, dir))
}

fn netconfig_in(a: &Args, dir: &std::path::Path) -> anyhow::Result<i32> {
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
                bail!(crate::args::UsageError(format!(
                    "-netconfig takes key=value pairs: {b}"
                )));
            }
            for (k, _) in &pairs {
                if !["ip", "mask", "gw", "server", "proto", "port"].contains(&k.as_str()) {
                    bail!(crate::args::UsageError(format!(
                        "-netconfig: unknown key {k:?} (ip, mask, gw, server, proto, port)"
                    )));
                }
            }
            let c = StaticNetConfig::from_pairs(&pairs)
                .map_err(|e| crate::args::UsageError(e.to_string()))?;
            c.store(dir)?;
            print!("{}", c.render());
            Ok(0)
        }
    }
}

fn run_findserver(a: &Args) -> anyhow::Result<i32> {
    a.only(&DISCOVER_OPTS)?;
    let cfg = a.discovery_config()?;
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

    fn args(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
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
        let cfg = a.discovery_config().unwrap();
        assert_eq!(cfg.interfaces, ["eth0", "eth1"]);
        assert_eq!(cfg.config_dir, PathBuf::from("/x"));
        assert!(cfg.probe_all);
        assert!(parse(args("-iface")).is_err());
        let a = parse(args("-dhcp-timeout=abc")).unwrap();
        assert!(a.discovery_config().is_err());
        assert!(dispatch("bogus", vec![]).is_none());
    }

    #[test]
    fn a_server_ca_refuses_plain_http_unless_lab_conf_allows_it() {
        let dir = tmpdir("lab");
        let a = parse(args(&format!("-config={} -ca /x/ca.pem", dir.display()))).unwrap();
        let why = a.discovery_config().unwrap().refuse_plain_http.unwrap();
        assert!(
            why.contains("/x/ca.pem") && why.contains("lab.conf"),
            "{why}"
        );
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("lab.conf"), "plain_http = yes\n").unwrap();
        assert_eq!(a.discovery_config().unwrap().refuse_plain_http, None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn serverurl_and_netconfig_round_trip() {
        let dir = tmpdir("cfg");
        let c = format!("-config={}", dir.display());
        let run = |v: &str, more: &[&str]| {
            let mut a = vec![OsString::from(&c)];
            a.extend(more.iter().map(OsString::from));
            dispatch(v, a).unwrap()
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
