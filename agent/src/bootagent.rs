//! The boot agent personality: what init starts after PID-1 set-up. It finds the management
//! server (or falls back as seed 000 says), checks in, runs what the server hands out, and
//! tells init through its exit code what should happen next.

use std::path::PathBuf;

use crate::bootflow::{self, BootOutcome, GuestOsHandoff, TtyConsole};
use crate::handover;

/// The agent's directory, filled at boot from the store on the boot-agent partition
/// (`crate::bootstore`; the same folder discovery reads its configuration from:
/// `discovery::DEFAULT_CONFIG_DIR` is `<this>/config`).
const BOOT_PARTITION: &str = crate::bootstore::ROOT;

/// Exit codes from the agent to init (init.rs acts on them).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
pub enum AgentExit {
    /// The work is done; init does what `img.after=` says (reboot by default).
    Done = 0,
    /// The agent failed; init shows the message and reboots after the delay.
    Failed = 1,
    /// The operator asked for the console (Esc/N at the no-server question).
    Console = 10,
    /// Boot the guest OS already on flash.
    GuestOs = 11,
}

/// The real hand-over: grubenv's next_entry=guest on the boot-agent partition, so the reboot
/// init does next lands in the guest OS once (agent/src/handover.rs). A failure is shown
/// and the reboot still happens: GRUB then boots the agent, which tries again.
pub struct GrubenvHandoff;

impl GuestOsHandoff for GrubenvHandoff {
    fn boot_guest_os(&self) -> anyhow::Result<()> {
        // Never into a half-written OS partition (autogenic PI), not even at the no-server
        // question: the agent runs again instead.
        if let Some(why) = crate::autogenic::guest_boot_refusal(&agent_config_base().state_dir) {
            anyhow::bail!("the guest OS is not booted: {why}");
        }
        if let Err(e) = handover::prepare_guest_boot() {
            eprintln!("agent: {e:#}; the next boot runs the agent again");
        }
        Ok(())
    }
}

/// Settings of the boot agent from its environment (init passes the kernel parameters as
/// `IMG_*` variables): `IMG_SERVER` is tried first, `IMG_CONFIG_DIR` is the boot
/// partition's configuration folder, `IMG_DISK` the disk to image.
pub fn run() -> i32 {
    match run_inner() {
        Ok(code) => code as i32,
        Err(e) => {
            eprintln!("agent: {e:#}");
            AgentExit::Failed as i32
        }
    }
}

fn run_inner() -> anyhow::Result<AgentExit> {
    // Every change of the state is written back to the boot-agent partition: right away for
    // the check-in state, every few seconds for the rest (the deploy's resume journal).
    let backing = crate::bootstore::recorded();
    if let Some(b) = &backing {
        crate::bootstore::commit_on_state_change(b.clone());
        crate::bootstore::spawn_sync(b.clone());
    }
    let r = run_agent();
    if let Some(b) = &backing {
        crate::bootstore::commit_or_say(b);
    }
    r
}

fn run_agent() -> anyhow::Result<AgentExit> {
    let config_dir = std::env::var_os("IMG_CONFIG_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(discovery::DEFAULT_CONFIG_DIR));
    let mut notes = Vec::new();
    let lab = discovery::LabSettings::load(&config_dir, &mut notes).unwrap_or_else(|e| {
        // An unreadable lab.conf weakens nothing.
        notes.push(format!("{e}: no lab setting applies"));
        discovery::LabSettings::default()
    });
    for n in notes {
        eprintln!("agent: {n}");
    }
    let ca = crate::checkin::trust::pinned_ca();
    let cfg = discovery::Config {
        // In the initramfs the agent owns /etc: the lease's DNS servers go to resolv.conf so
        // the check-in can resolve the server's name. (`img -discover` on a host never
        // writes it.)
        resolv_conf: Some(PathBuf::from("/etc/resolv.conf")),
        refuse_plain_http: crate::checkin::trust::plain_http_refusal(
            ca.as_deref(),
            &lab,
            &config_dir,
        ),
        config_dir: config_dir.clone(),
        // `img.server=` on the kernel command line is tried before every other source, but
        // the network still comes up through discovery (lease, routes, resolver).
        command_line_urls: std::env::var("IMG_SERVER")
            .ok()
            .filter(|s| !s.trim().is_empty()),
        ..discovery::Config::default()
    };
    // A re-imaging from the backup partition recorded before this boot runs now, before
    // discovery: it needs no network.
    {
        let acfg = crate::checkin::AgentConfig {
            lab,
            ..agent_config_base()
        };
        match crate::checkin::state::StateDir::open(&acfg.state_dir)
            .and_then(|s| crate::autogenic::pi::at_start(&s, &acfg))
        {
            Ok(crate::autogenic::pi::AtStart::Nothing) => {}
            Ok(r) => eprintln!("agent: re-imaging from the backup partition: {r:?}"),
            Err(e) => eprintln!("agent: re-imaging from the backup partition: {e:#}"),
        }
    }
    let mut console = TtyConsole::stdio();
    let server = match bootflow::find_server_or_fallback(&cfg, &mut console, &GrubenvHandoff)? {
        BootOutcome::Server { chosen, .. } => chosen.url,
        BootOutcome::GuestOs => return Ok(AgentExit::GuestOs),
        BootOutcome::OperatorConsole => return Ok(AgentExit::Console),
    };
    eprintln!("agent: management server {server}");
    checkin_and_work(&server, ca, config_dir, lab)
}

fn checkin_and_work(
    server: &str,
    ca: Option<PathBuf>,
    config_dir: PathBuf,
    lab: discovery::LabSettings,
) -> anyhow::Result<AgentExit> {
    use crate::checkin::{self, AgentConfig, LoopOutcome};
    let acfg = AgentConfig {
        ca_file: ca,
        config_dir,
        lab,
        ..agent_config_base()
    };
    loop {
        let outcome = checkin::agent_loop(server, &acfg)?;
        // Maintenance (autogenic PI given up on a half-written OS partition): the device
        // stays with the agent and keeps checking in, so the administrator can schedule a
        // network deploy of the OS partition; it is never handed to the guest.
        if let Some(why) = crate::autogenic::guest_boot_refusal(&acfg.state_dir) {
            match outcome {
                LoopOutcome::Idle { next_checkin } => {
                    let wait = next_checkin.clamp(5, 60);
                    eprintln!("agent: {why}; checking in again in {wait}s");
                    std::thread::sleep(std::time::Duration::from_secs(u64::from(wait)));
                    continue;
                }
                // A PI to try again at the next start: reboot into the agent.
                _ => return Ok(AgentExit::Done),
            }
        }
        return Ok(match outcome {
            // No work, the server says boot the guest, or a task (a deploy) wants the
            // reboot into the new OS: the next boot is the guest's, once.
            LoopOutcome::Idle { .. } | LoopOutcome::BootGuest | LoopOutcome::Reboot => {
                eprintln!("agent: the work is done; the guest OS boots next");
                GrubenvHandoff.boot_guest_os()?;
                AgentExit::GuestOs
            }
            LoopOutcome::TaskLimit { .. } => AgentExit::Done,
        });
    }
}

/// The agent's settings at boot before the server is known: the disk (`IMG_DISK`), the
/// state, CA-independent parts. The credential, the outbox of unsent results, the resume
/// journal and the imaging status record must survive a reboot: they live in the directory
/// backed by the boot-agent partition, and the signing keys kept there (put there by the
/// administrator) are trusted.
fn agent_config_base() -> crate::checkin::AgentConfig {
    let mut acfg = crate::checkin::AgentConfig::default();
    if let Some(d) = std::env::var_os("IMG_DISK") {
        acfg.disk = Some(PathBuf::from(d));
    }
    let boot = std::path::Path::new(BOOT_PARTITION);
    if std::env::var_os("IMG_AGENT_STATE").is_none() && boot.is_dir() {
        acfg.state_dir = boot.join("state");
    }
    if std::env::var_os("IMG_TRUSTED_DIR").is_none() && boot.join("trusted").is_dir() {
        acfg.trusted_dir = Some(boot.join("trusted"));
    }
    acfg
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_codes_are_distinct_and_stable() {
        let codes = [
            AgentExit::Done,
            AgentExit::Failed,
            AgentExit::Console,
            AgentExit::GuestOs,
        ]
        .map(|c| c as i32);
        assert_eq!(codes, [0, 1, 10, 11]);
    }
}
