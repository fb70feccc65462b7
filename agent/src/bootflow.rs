//! The boot agent's start-up after PID-1 set-up: find the management server, or fall back.
//!
//! Seed 000 behaviour:
//! * Merlin static configuration: when one is stored, the agent offers a short window to press
//!   Esc, which clears it and asks for the values again on the console (client IP, netmask,
//!   gateway, server IP, protocol — default http — and port — default 80).
//! * Discovery runs the five sources in order ([`discovery::discover`]).
//! * When nothing answers, the console shows the seed's exact message and waits 5 s: no key
//!   boots the guest OS already on flash (through the [`GuestOsHandoff`] seam: the real one,
//!   `bootagent::GrubenvHandoff`, sets grubenv's next_entry=guest before init reboots); Esc or N returns to the operator console where `img`
//!   commands can be run; Y or Enter boots the guest OS at once.

use std::io::{BufRead, Write};
use std::os::fd::AsFd;
use std::time::{Duration, Instant};

use discovery::bootconfig::{parse_kv, StaticNetConfig};
use discovery::{Config, Discovery, DiscoveryError, ServerCandidate};

/// The seed's message, word for word (seed 000, WTOS Boot Agent).
pub const NO_SERVER_MESSAGE: &str = "NO HSERVER CONFIGURED OR UNABLE TO CONNECT TO SERVER. Boot to guest OS in flash? (Press ESC/No in 5 seconds to return to Boot Agent desktop)";
/// How long the fallback question waits (seed: 5 seconds).
pub const FALLBACK_WAIT: Duration = Duration::from_secs(5);
/// How long Esc may be pressed to clear a stored static configuration.
pub const STATIC_ESC_WINDOW: Duration = Duration::from_secs(2);

/// A key the boot flow reacts to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Key {
    Esc,
    No,
    Yes,
    Enter,
    Other(u8),
}

impl Key {
    pub fn from_byte(b: u8) -> Key {
        match b {
            0x1b => Key::Esc,
            b'n' | b'N' => Key::No,
            b'y' | b'Y' => Key::Yes,
            b'\r' | b'\n' => Key::Enter,
            other => Key::Other(other),
        }
    }
}

/// The device console as the boot flow uses it.
pub trait Console {
    /// Shows one line.
    fn show(&mut self, line: &str);
    /// Waits up to `timeout` for one key press; `None` when none came.
    fn wait_key(&mut self, timeout: Duration) -> Option<Key>;
    /// Asks for one line of input; `None` at end of input.
    fn read_line(&mut self, prompt: &str) -> Option<String>;
}

/// Preparing the boot of the guest OS already on flash (the agent then exits with
/// `AgentExit::GuestOs` and init reboots or kexecs).
pub trait GuestOsHandoff {
    fn boot_guest_os(&self) -> anyhow::Result<()>;
}

/// For `img -findserver` on the console: says how to act on the outcome, changes nothing.
pub struct LoggingHandoff;

impl GuestOsHandoff for LoggingHandoff {
    fn boot_guest_os(&self) -> anyhow::Result<()> {
        eprintln!(
            "img: the agent would boot the guest OS now; `img -bootnext guest` and `reboot` do it"
        );
        Ok(())
    }
}

/// How the start-up ended.
#[derive(Debug)]
pub enum BootOutcome {
    /// A management server answered: continue with the check-in.
    Server {
        chosen: ServerCandidate,
        discovery: Box<Discovery>,
    },
    /// Nobody answered and no key was pressed: the guest OS was handed off to.
    GuestOs,
    /// The operator pressed Esc/N: give them the `img` console.
    OperatorConsole,
}

/// The boot agent personality after PID-1 set-up: bring up network, discover the server;
/// on success return the chosen server; when nothing answers, show the seed's exact message
/// and wait 5 s for a key (no key → GuestOs hand-off via the seam; Esc/N → operator console).
pub fn find_server_or_fallback(
    cfg: &Config,
    console: &mut dyn Console,
    handoff: &dyn GuestOsHandoff,
) -> anyhow::Result<BootOutcome> {
    find_server_with(cfg, console, handoff, &discovery::discover)
}

type DiscoverFn<'a> = &'a dyn Fn(&Config) -> Result<Discovery, DiscoveryError>;

fn find_server_with(
    cfg: &Config,
    console: &mut dyn Console,
    handoff: &dyn GuestOsHandoff,
    discover: DiscoverFn<'_>,
) -> anyhow::Result<BootOutcome> {
    show_lab_settings(cfg, console);
    offer_static_reset(cfg, console)?;
    console.show("Looking for the management server...");
    match discover(cfg) {
        Ok(d) => {
            if let Some(chosen) = d.chosen.clone() {
                console.show(&format!("Management server: {}", chosen.url));
                return Ok(BootOutcome::Server {
                    chosen,
                    discovery: Box::new(d),
                });
            }
            for c in &d.candidates {
                if let discovery::Verdict::Rejected(why) = &c.verdict {
                    console.show(&format!("  {}: {why}", c.url));
                }
            }
        }
        Err(e) => console.show(&format!("discovery failed: {}", discovery::error_chain(&e))),
    }
    console.show(NO_SERVER_MESSAGE);
    let deadline = Instant::now() + FALLBACK_WAIT;
    let mut left = FALLBACK_WAIT;
    loop {
        match console.wait_key(left) {
            Some(Key::Esc) | Some(Key::No) => {
                console.show(
                    "Boot Agent console: run img commands (img -help), img -findserver to retry.",
                );
                return Ok(BootOutcome::OperatorConsole);
            }
            Some(Key::Yes) | Some(Key::Enter) | None => break,
            // Any other key: keep waiting out the 5 seconds.
            Some(Key::Other(_)) => {
                left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
            }
        }
    }
    console.show("Booting the guest OS in flash...");
    handoff.boot_guest_os()?;
    Ok(BootOutcome::GuestOs)
}

/// Every lab setting that weakens the device's trust (lab.conf on the boot partition) is
/// shown at every start, before anything else happens.
fn show_lab_settings(cfg: &Config, console: &mut dyn Console) {
    let mut notes = Vec::new();
    match discovery::LabSettings::load(&cfg.config_dir, &mut notes) {
        Ok(lab) => {
            for line in lab.banner(&cfg.config_dir) {
                console.show(&line);
            }
        }
        Err(e) => console.show(&format!("{e}: no lab setting applies")),
    }
    for n in notes {
        console.show(&n);
    }
    if cfg.refuse_plain_http.is_some() {
        console.show("Server CA present: plain-HTTP management servers are skipped.");
    }
}

/// Merlin: with a stored static configuration, Esc during start-up clears it and the values
/// are asked again.
fn offer_static_reset(cfg: &Config, console: &mut dyn Console) -> anyhow::Result<()> {
    let Ok(Some(current)) = StaticNetConfig::load(&cfg.config_dir) else {
        return Ok(());
    };
    console.show(&format!(
        "Static network configuration: {} mask {} server {}://{}:{}. Press Esc to clear it.",
        current.ip, current.mask, current.scheme, current.server, current.port
    ));
    if console.wait_key(STATIC_ESC_WINDOW) != Some(Key::Esc) {
        return Ok(());
    }
    StaticNetConfig::clear(&cfg.config_dir)?;
    console.show("Static configuration cleared. Enter the new one (empty client IP: use DHCP).");
    for _attempt in 0..3 {
        let mut pairs = Vec::new();
        for (key, prompt) in [
            ("ip", "Client IP address: "),
            ("mask", "Subnet mask: "),
            ("gw", "Default gateway (empty: none): "),
            ("server", "Management server IP address: "),
            ("proto", "Protocol http/https [http]: "),
            ("port", "Port [80]: "),
        ] {
            let Some(v) = console.read_line(prompt) else {
                console.show("No input: using DHCP.");
                return Ok(());
            };
            let v = v.trim().to_string();
            if key == "ip" && v.is_empty() {
                console.show("Using DHCP.");
                return Ok(());
            }
            pairs.push((key.to_string(), v));
        }
        // proto=https without a port means 443 (StaticNetConfig's default); the prompt's
        // [80] is the seed's default for the default protocol.
        let text: String = pairs.iter().map(|(k, v)| format!("{k}={v}\n")).collect();
        match StaticNetConfig::from_pairs(&parse_kv(&text).0) {
            Ok(c) => {
                c.store(&cfg.config_dir)?;
                console.show("Static configuration saved.");
                return Ok(());
            }
            Err(e) => console.show(&format!("{e}; please enter it again.")),
        }
    }
    console.show("Giving up on the static configuration: using DHCP.");
    Ok(())
}

/// The real console: standard input and output. On a terminal, keys are read in raw mode
/// (no Enter needed); from a pipe (tests, serial scripts) bytes are read as they come.
pub struct TtyConsole {
    stdin: std::io::Stdin,
}

impl TtyConsole {
    pub fn stdio() -> TtyConsole {
        TtyConsole {
            stdin: std::io::stdin(),
        }
    }
}

impl Console for TtyConsole {
    fn show(&mut self, line: &str) {
        println!("{line}");
        let _ = std::io::stdout().flush();
    }

    fn wait_key(&mut self, timeout: Duration) -> Option<Key> {
        use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
        use nix::sys::termios;
        let fd = self.stdin.as_fd();
        let saved = termios::tcgetattr(fd).ok();
        if let Some(t) = &saved {
            let mut raw = t.clone();
            termios::cfmakeraw(&mut raw);
            let _ = termios::tcsetattr(fd, termios::SetArg::TCSANOW, &raw);
        }
        let deadline = Instant::now() + timeout;
        let mut key = None;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            let ms = PollTimeout::try_from(left).unwrap_or(PollTimeout::MAX);
            let mut fds = [PollFd::new(fd, PollFlags::POLLIN)];
            match poll(&mut fds, ms) {
                Ok(0) => break,
                Ok(_) => {
                    let mut b = [0u8; 1];
                    match nix::unistd::read(libc::STDIN_FILENO, &mut b) {
                        Ok(1) => {
                            key = Some(Key::from_byte(b[0]));
                            break;
                        }
                        // End of input (e.g. </dev/null): nobody will press a key; let the
                        // time run out as on a real console.
                        _ => {
                            std::thread::sleep(left);
                            break;
                        }
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(_) => {
                    std::thread::sleep(left);
                    break;
                }
            }
        }
        if let Some(t) = &saved {
            let _ = termios::tcsetattr(fd, termios::SetArg::TCSANOW, t);
        }
        key
    }

    fn read_line(&mut self, prompt: &str) -> Option<String> {
        print!("{prompt}");
        let _ = std::io::stdout().flush();
        let mut line = String::new();
        match self.stdin.lock().read_line(&mut line) {
            Ok(0) | Err(_) => None,
            Ok(_) => Some(line.trim_end_matches(['\r', '\n']).to_string()),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::cell::Cell;
    use std::collections::VecDeque;
    use std::path::PathBuf;

    /// A scripted console: keys and lines to hand out, and everything shown.
    #[derive(Default)]
    pub struct ScriptedConsole {
        pub keys: VecDeque<Option<Key>>,
        pub lines: VecDeque<String>,
        pub shown: Vec<String>,
        pub waited: Vec<Duration>,
    }

    impl Console for ScriptedConsole {
        fn show(&mut self, line: &str) {
            self.shown.push(line.to_string());
        }
        fn wait_key(&mut self, timeout: Duration) -> Option<Key> {
            self.waited.push(timeout);
            self.keys.pop_front().flatten()
        }
        fn read_line(&mut self, prompt: &str) -> Option<String> {
            self.shown.push(prompt.to_string());
            self.lines.pop_front()
        }
    }

    /// Records whether the guest OS was booted.
    #[derive(Default)]
    pub struct RecordingHandoff {
        pub booted: Cell<u32>,
    }

    impl GuestOsHandoff for RecordingHandoff {
        fn boot_guest_os(&self) -> anyhow::Result<()> {
            self.booted.set(self.booted.get() + 1);
            Ok(())
        }
    }

    fn cfg(tag: &str) -> Config {
        let dir = std::env::temp_dir().join(format!("img-bootflow-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        Config {
            config_dir: dir,
            // An interface that does not exist: discovery fails without touching the system.
            interfaces: vec!["nonexistent0".into()],
            ..Config::default()
        }
    }

    fn nothing(_: &Config) -> Result<Discovery, DiscoveryError> {
        Err(DiscoveryError::NoInterface(" named nonexistent0".into()))
    }

    #[test]
    fn no_key_boots_the_guest_os_after_the_seed_message() {
        let mut con = ScriptedConsole::default();
        let h = RecordingHandoff::default();
        let out = find_server_or_fallback(&cfg("nokey"), &mut con, &h).unwrap();
        assert!(matches!(out, BootOutcome::GuestOs));
        assert_eq!(h.booted.get(), 1);
        assert!(con.shown.iter().any(|l| l == NO_SERVER_MESSAGE));
        assert_eq!(con.waited, [FALLBACK_WAIT]);
    }

    #[test]
    fn esc_or_n_returns_to_the_operator_console() {
        for k in [Key::Esc, Key::No] {
            let mut con = ScriptedConsole {
                keys: [Some(Key::Other(b'x')), Some(k)].into(),
                ..Default::default()
            };
            let h = RecordingHandoff::default();
            let out = find_server_with(&cfg("esc"), &mut con, &h, &nothing).unwrap();
            assert!(matches!(out, BootOutcome::OperatorConsole));
            assert_eq!(h.booted.get(), 0);
        }
    }

    #[test]
    fn a_found_server_is_returned_without_the_fallback() {
        let found = |_: &Config| -> Result<Discovery, DiscoveryError> {
            let c = ServerCandidate {
                url: "http://10.0.0.1:80".into(),
                scheme: discovery::Scheme::Http,
                host: "10.0.0.1".into(),
                port: 80,
                address: None,
                source: discovery::CandidateSource::DhcpOptions,
                detail: String::new(),
                verdict: discovery::Verdict::Reachable("HTTP".into()),
            };
            Ok(Discovery {
                interface: None,
                lease: None,
                static_config: None,
                candidates: vec![c.clone()],
                chosen: Some(c),
                log: vec![],
                elapsed_ms: 0,
            })
        };
        let mut con = ScriptedConsole::default();
        let h = RecordingHandoff::default();
        let out = find_server_with(&cfg("found"), &mut con, &h, &found).unwrap();
        assert!(
            matches!(out, BootOutcome::Server { ref chosen, .. } if chosen.url == "http://10.0.0.1:80")
        );
        assert!(!con.shown.iter().any(|l| l == NO_SERVER_MESSAGE));
    }

    #[test]
    fn lab_settings_are_shown_at_every_start() {
        let c = cfg("lab");
        for _boot in 0..2 {
            let mut con = ScriptedConsole::default();
            find_server_with(&c, &mut con, &RecordingHandoff::default(), &nothing).unwrap();
            assert!(!con.shown.iter().any(|l| l.contains("LAB SETTING")));
        }
        std::fs::create_dir_all(&c.config_dir).unwrap();
        std::fs::write(
            c.config_dir.join("lab.conf"),
            "plain_http = yes\nunsigned_images = yes\n",
        )
        .unwrap();
        for _boot in 0..2 {
            let mut con = ScriptedConsole::default();
            find_server_with(&c, &mut con, &RecordingHandoff::default(), &nothing).unwrap();
            let lab: Vec<_> = con
                .shown
                .iter()
                .filter(|l| l.starts_with("LAB SETTING"))
                .collect();
            assert_eq!(lab.len(), 2, "{:?}", con.shown);
            assert!(lab[0].contains("plain_http=yes") && lab[1].contains("unsigned_images=yes"));
        }
        let _ = std::fs::remove_dir_all(&c.config_dir);
    }

    #[test]
    fn esc_clears_the_static_configuration_and_asks_again() {
        let c = cfg("static");
        let old = StaticNetConfig::from_pairs(
            &parse_kv("ip=10.1.0.5\nmask=255.255.255.0\nserver=10.1.0.1").0,
        )
        .unwrap();
        old.store(&c.config_dir).unwrap();
        let mut con = ScriptedConsole {
            keys: [Some(Key::Esc), None].into(),
            // First attempt has a bad mask, the second is good.
            lines: [
                "10.2.0.5",
                "255.0.255.0",
                "",
                "10.2.0.1",
                "",
                "",
                "10.2.0.5",
                "255.255.0.0",
                "10.2.0.254",
                "10.2.0.1",
                "https",
                "",
            ]
            .into_iter()
            .map(String::from)
            .collect(),
            ..Default::default()
        };
        let h = RecordingHandoff::default();
        find_server_with(&c, &mut con, &h, &nothing).unwrap();
        let new = StaticNetConfig::load(&c.config_dir).unwrap().unwrap();
        assert_eq!(new.ip.to_string(), "10.2.0.5");
        assert_eq!(
            new.gateway.map(|g| g.to_string()).as_deref(),
            Some("10.2.0.254")
        );
        assert_eq!((new.scheme, new.port), (discovery::Scheme::Https, 443));
        assert_eq!(con.waited[0], STATIC_ESC_WINDOW);

        // Esc, then an empty client IP: cleared, DHCP from now on.
        let mut con = ScriptedConsole {
            keys: [Some(Key::Esc), None].into(),
            lines: [String::new()].into(),
            ..Default::default()
        };
        find_server_with(&c, &mut con, &h, &nothing).unwrap();
        assert!(StaticNetConfig::load(&c.config_dir).unwrap().is_none());
        let _ = std::fs::remove_dir_all(PathBuf::from(&c.config_dir));
    }
}
