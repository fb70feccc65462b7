//! Boot configuration and the boot-agent partition: the `grub.cfg` of the device's
//! boot-agent partition ([`BootConfig`]), reading and in-place rewriting of files on that
//! partition without mounting it ([`bootpart`]), and the agent's persistent store kept
//! there ([`store`]).
//!
//! The boot-agent partition (MISSION §3: FAT32, 16 MB, first on the disk) holds GRUB, our
//! kernel and initrd, and this configuration. Its default entry boots the agent; a second
//! entry chain-loads the guest OS on flash (what the agent's no-server fallback and an
//! operator at the GRUB menu choose); a third starts the agent with the `img` console only.
//! Autogenic imaging (seed 001) will rewrite this file later: switching the next boot into
//! the imaging engine and recording the imaging status, which is why the agent's entries are
//! generated from data here rather than copied from a template.

pub mod bootpart;
pub mod store;

use std::fmt::Write;

/// One `menuentry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEntry {
    /// Boot a Linux kernel + initrd from the boot partition.
    Linux {
        title: String,
        kernel: String,
        initrd: String,
        cmdline: String,
    },
    /// Chain-load the boot loader of another partition (the guest OS on flash):
    /// `(hd0,gptN)` / `(hd0,msdosN)` chosen by GRUB's `search` on a file system UUID or label
    /// when given, else partition `partition` of the first disk.
    Chainload {
        title: String,
        partition: u32,
        efi_path: Option<String>,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub timeout_secs: u32,
    /// Index of the default entry.
    pub default: usize,
    /// Serial console as well as the screen (thin clients are often managed over serial).
    pub serial: bool,
    pub entries: Vec<BootEntry>,
}

/// Quote a string for grub.cfg: single quotes protect everything but a single quote
/// itself, which is written `'\''` as in the shell (GRUB manual, "Shell-like scripting").
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl BootConfig {
    /// The layout the `img -install` verb writes: the agent (default), the guest OS on
    /// partition 2 (MISSION §3 layout), and the agent with the console only.
    pub fn boot_agent(kernel: &str, initrd: &str, cmdline: &str) -> BootConfig {
        let console_cmdline = if cmdline.is_empty() {
            "img.console".to_owned()
        } else {
            format!("{cmdline} img.console")
        };
        BootConfig {
            timeout_secs: 3,
            default: 0,
            serial: true,
            entries: vec![
                BootEntry::Linux {
                    title: "Boot agent".into(),
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: cmdline.into(),
                },
                BootEntry::Chainload {
                    title: "Guest OS on flash".into(),
                    partition: 2,
                    efi_path: None,
                },
                BootEntry::Linux {
                    title: "Boot agent: img console".into(),
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: console_cmdline,
                },
            ],
        }
    }

    /// The grub.cfg text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Written by `img -install`; autogenic imaging rewrites it. Edit with care.\n");
        if self.serial {
            s.push_str("serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n");
        }
        let _ = writeln!(
            s,
            "set default={}",
            self.default.min(self.entries.len().saturating_sub(1))
        );
        let _ = writeln!(s, "set timeout={}", self.timeout_secs);
        for e in &self.entries {
            s.push('\n');
            match e {
                BootEntry::Linux {
                    title,
                    kernel,
                    initrd,
                    cmdline,
                } => {
                    let _ = writeln!(s, "menuentry {} {{", quote(title));
                    let _ = writeln!(s, "\tlinux {kernel} {cmdline}");
                    let _ = writeln!(s, "\tinitrd {initrd}");
                    s.push_str("}\n");
                }
                BootEntry::Chainload {
                    title,
                    partition,
                    efi_path,
                } => {
                    let _ = writeln!(s, "menuentry {} {{", quote(title));
                    // GRUB names partitions from 1 within (hd0,...); the table type is found
                    // by GRUB itself with the bare (hd0,N) form.
                    let _ = writeln!(s, "\tset root=(hd0,{partition})");
                    match efi_path {
                        Some(p) => {
                            let _ = writeln!(s, "\tchainloader {p}");
                        }
                        None => s.push_str("\tif [ \"$grub_platform\" = efi ]; then chainloader /EFI/BOOT/BOOTX64.EFI; else chainloader +1; fi\n"),
                    }
                    s.push_str("}\n");
                }
            }
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn boot_agent_config_has_agent_guest_and_console_entries() {
        let c = BootConfig::boot_agent("/boot/vmlinuz", "/boot/initrd.img", "console=ttyS0 quiet");
        let text = c.render();
        assert!(text.contains("set default=0\nset timeout=3\n"));
        assert!(text.contains("menuentry 'Boot agent' {\n\tlinux /boot/vmlinuz console=ttyS0 quiet\n\tinitrd /boot/initrd.img\n}"));
        assert!(text.contains("set root=(hd0,2)"));
        assert!(text.contains("linux /boot/vmlinuz console=ttyS0 quiet img.console"));
        assert!(text.contains("terminal_output console serial"));
    }

    #[test]
    fn titles_are_quoted_and_default_is_clamped() {
        assert_eq!(quote("it's"), "'it'\\''s'");
        let c = BootConfig {
            timeout_secs: 0,
            default: 9,
            serial: false,
            entries: vec![],
        };
        assert!(c.render().contains("set default=0"));
        let c = BootConfig {
            timeout_secs: 1,
            default: 5,
            serial: false,
            entries: BootConfig::boot_agent("/k", "/i", "").entries,
        };
        assert!(c.render().contains("set default=2"));
    }
}
