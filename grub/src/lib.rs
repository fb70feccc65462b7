//! Boot configuration and the boot-agent partition: the `grub.cfg` of the device's
//! boot-agent partition ([`BootConfig`]), the GRUB environment block ([`env`]) that chooses
//! its next boot, reading and in-place rewriting of files on that partition without
//! mounting it ([`bootpart`]), and the agent's persistent store kept there.
//!
//! The boot-agent partition (MISSION §3: FAT32, first on the disk) holds GRUB, our kernel
//! and initrd, this configuration and `grubenv`. The configuration is static: every boot
//! runs the agent (entry `agent`) unless grubenv's `next_entry` names another entry for one
//! boot. GRUB clears `next_entry` with `save_env` before it boots that entry (as GRUB's own
//! `00_header` does), so the one after is the agent's again; a missing or damaged grubenv,
//! an unknown `next_entry`, or a `save_env` that fails all boot the agent: the safe side,
//! from which the server (or an administrator) can still reach the device. The agent writes
//! `next_entry=guest` when it hands the device to its OS (docs/boot.md).

pub mod bootpart;
pub mod store;

use std::fmt::Write;

pub mod env;

/// Where grubenv lives, next to grub.cfg on the boot-agent partition.
pub const ENV_PATH: &str = "/boot/grub/grubenv";
/// Entry ids, the values of `next_entry` (`img -bootnext`).
pub const AGENT_ID: &str = "agent";
pub const GUEST_ID: &str = "guest";
pub const CONSOLE_ID: &str = "console";
/// The GRUB modules the configuration uses (for `grub-mkstandalone --modules=`).
pub const MODULES: &str = "part_gpt part_msdos fat ext2 ntfs search search_fs_file search_label configfile linux normal serial terminal test echo chain efi_gop all_video loadenv regexp probe";

/// How the guest OS on partition 2 is started.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Guest {
    /// Chain-load its boot loader: under UEFI `\EFI\Microsoft\Boot\bootmgfw.efi` (Windows)
    /// when present, else `\EFI\BOOT\BOOTX64.EFI`; under BIOS its boot sector.
    Chain,
    /// Boot its kernel and initrd with GRUB's `linux`/`initrd`.
    Linux {
        kernel: String,
        initrd: Option<String>,
        /// `None`: `root=PARTUUID=<partition 2> ro quiet`.
        cmdline: Option<String>,
    },
}

impl Guest {
    /// `chain`, `linux`, or `linux:KERNEL[,INITRD[,CMDLINE]]` (`img -install -guest=`); an
    /// empty INITRD means none. The defaults are Debian's `/vmlinuz` and `/initrd.img`.
    pub fn parse(spec: &str) -> Result<Guest, String> {
        let linux_default = || Guest::Linux {
            kernel: "/vmlinuz".into(),
            initrd: Some("/initrd.img".into()),
            cmdline: None,
        };
        match spec.split_once(':') {
            None if spec == "chain" => Ok(Guest::Chain),
            None if spec == "linux" => Ok(linux_default()),
            Some(("linux", rest)) => {
                let mut it = rest.splitn(3, ',');
                let kernel = it.next().unwrap_or_default().trim();
                let initrd = it.next().map(str::trim);
                let cmdline = it.next().map(|c| c.trim().to_owned());
                let path_ok = |p: &str| {
                    p.starts_with('/')
                        && !p.contains(char::is_whitespace)
                        && !p.contains(['\'', '"', '$', ';', '\\'])
                };
                if !path_ok(kernel) {
                    return Err(format!(
                        "-guest=linux:KERNEL: {kernel:?} is not an absolute path on partition 2"
                    ));
                }
                if let Some(i) = initrd.filter(|i| !i.is_empty()) {
                    if !path_ok(i) {
                        return Err(format!("-guest=linux:KERNEL,INITRD: {i:?} is not an absolute path on partition 2"));
                    }
                }
                if cmdline.as_deref().is_some_and(|c| c.contains('\n')) {
                    return Err("-guest=linux:...,CMDLINE: one line only".into());
                }
                Ok(Guest::Linux {
                    kernel: kernel.into(),
                    initrd: match initrd {
                        None => Some("/initrd.img".into()),
                        Some("") => None,
                        Some(i) => Some(i.into()),
                    },
                    cmdline,
                })
            }
            _ => Err(format!(
                "-guest={spec}: use chain, linux or linux:KERNEL[,INITRD[,CMDLINE]]"
            )),
        }
    }
}

/// One `menuentry`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BootEntry {
    /// Boot a Linux kernel + initrd from the boot-agent partition.
    Linux {
        id: String,
        title: String,
        kernel: String,
        initrd: String,
        cmdline: String,
    },
    /// The guest OS on partition `partition` of the boot-agent partition's disk.
    Guest {
        id: String,
        title: String,
        partition: u32,
        how: Guest,
    },
}

/// The whole configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    pub timeout_secs: u32,
    /// Id of the default entry (the agent).
    pub default: String,
    /// Serial console as well as the screen (thin clients are often managed over serial).
    pub serial: bool,
    /// grubenv's path on the boot-agent partition; `None`: no one-shot next boot.
    pub env_path: Option<String>,
    pub entries: Vec<BootEntry>,
}

/// Quote a string for grub.cfg: single quotes protect everything but a single quote
/// itself, which is written `'\''` as in the shell (GRUB manual, "Shell-like scripting").
pub fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', "'\\''"))
}

impl BootConfig {
    /// The layout `img -install` writes: the agent (default), the guest OS on partition 2
    /// (MISSION §3 layout) started as `guest` says, and the agent with the console only;
    /// grubenv's `next_entry` picks another entry for one boot.
    pub fn boot_agent(kernel: &str, initrd: &str, cmdline: &str, guest: Guest) -> BootConfig {
        let console_cmdline = if cmdline.is_empty() {
            "img.console".to_owned()
        } else {
            format!("{cmdline} img.console")
        };
        BootConfig {
            timeout_secs: 3,
            default: AGENT_ID.into(),
            serial: true,
            env_path: Some(ENV_PATH.into()),
            entries: vec![
                BootEntry::Linux {
                    id: AGENT_ID.into(),
                    title: "Boot agent".into(),
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: cmdline.into(),
                },
                BootEntry::Guest {
                    id: GUEST_ID.into(),
                    title: "Guest OS on flash".into(),
                    partition: 2,
                    how: guest,
                },
                BootEntry::Linux {
                    id: CONSOLE_ID.into(),
                    title: "Boot agent: img console".into(),
                    kernel: kernel.into(),
                    initrd: initrd.into(),
                    cmdline: console_cmdline,
                },
            ],
        }
    }

    fn ids(&self) -> impl Iterator<Item = &str> {
        self.entries.iter().map(|e| match e {
            BootEntry::Linux { id, .. } | BootEntry::Guest { id, .. } => id.as_str(),
        })
    }

    /// The grub.cfg text.
    pub fn render(&self) -> String {
        let mut s = String::new();
        s.push_str("# Written by `img -install`. Static: the next boot is chosen in grubenv (next_entry,\n# `img -bootnext`), never by editing this file.\n");
        if self.serial {
            s.push_str("serial --unit=0 --speed=115200\nterminal_input console serial\nterminal_output console serial\n");
        }
        let default = if self.ids().any(|i| i == self.default) {
            self.default.clone()
        } else {
            self.ids().next().unwrap_or("0").to_owned()
        };
        let _ = writeln!(s, "set default={}", quote(&default));
        let _ = writeln!(s, "set timeout={}", self.timeout_secs);
        // $root is the boot-agent partition while this file is read (the standalone GRUB's
        // search, or grub-install's prefix); the guest is on the same disk.
        s.push_str("set agentpart=\"$root\"\nset agentdisk=hd0\nregexp --set=1:agentdisk '^([^,]+),' \"$root\"\nexport agentpart agentdisk\n");
        if let Some(env) = &self.env_path {
            let _ = writeln!(s, "set envfile=\"(${{agentpart}}){env}\"");
            s.push_str(
                "# One boot of next_entry, cleared first (GRUB's 00_header does the same). A missing or\n\
                 # damaged grubenv, an unknown entry or a failed save_env: the default entry.\n\
                 if [ -s \"$envfile\" ]; then\n\
                 \tif load_env --file \"$envfile\" next_entry; then\n\
                 \t\tif [ -n \"${next_entry}\" ]; then\n\
                 \t\t\tset wanted=\"${next_entry}\"\n\
                 \t\t\tset next_entry=\n\
                 \t\t\tif save_env --file \"$envfile\" next_entry; then\n",
            );
            for id in self.ids().filter(|i| *i != default) {
                let _ = writeln!(
                    s,
                    "\t\t\t\tif [ \"$wanted\" = {id} ]; then set default={id}; fi"
                );
            }
            s.push_str("\t\t\tfi\n\t\tfi\n\tfi\nfi\n");
        }
        for e in &self.entries {
            s.push('\n');
            match e {
                BootEntry::Linux {
                    id,
                    title,
                    kernel,
                    initrd,
                    cmdline,
                } => {
                    let _ = writeln!(s, "menuentry {} --id {} {{", quote(title), quote(id));
                    let _ = writeln!(s, "\tlinux {kernel} {cmdline}");
                    let _ = writeln!(s, "\tinitrd {initrd}");
                    s.push_str("}\n");
                }
                BootEntry::Guest {
                    id,
                    title,
                    partition,
                    how,
                } => {
                    let _ = writeln!(s, "menuentry {} --id {} {{", quote(title), quote(id));
                    // GRUB names partitions from 1; the bare (hdN,P) form matches GPT and MBR.
                    let _ = writeln!(s, "\tset root=\"${{agentdisk}},{partition}\"");
                    match how {
                        Guest::Chain => s.push_str(
                            "\tif [ \"$grub_platform\" = efi ]; then\n\
                             \t\tif [ -f /EFI/Microsoft/Boot/bootmgfw.efi ]; then\n\
                             \t\t\tchainloader /EFI/Microsoft/Boot/bootmgfw.efi\n\
                             \t\telse\n\
                             \t\t\tchainloader /EFI/BOOT/BOOTX64.EFI\n\
                             \t\tfi\n\
                             \telse\n\
                             \t\tchainloader +1\n\
                             \tfi\n",
                        ),
                        Guest::Linux {
                            kernel,
                            initrd,
                            cmdline,
                        } => {
                            let cmdline = match cmdline {
                                Some(c) => c.clone(),
                                None => {
                                    s.push_str("\tprobe --set=guestuuid --part-uuid \"($root)\"\n");
                                    "root=PARTUUID=${guestuuid} ro quiet".to_owned()
                                }
                            };
                            let _ = writeln!(s, "\tlinux {kernel} {cmdline}");
                            if let Some(i) = initrd {
                                let _ = writeln!(s, "\tinitrd {i}");
                            }
                        }
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
        let c = BootConfig::boot_agent(
            "/boot/vmlinuz",
            "/boot/initrd.img",
            "console=ttyS0 quiet",
            Guest::Chain,
        );
        let text = c.render();
        assert!(
            text.contains("set default='agent'\nset timeout=3\n"),
            "{text}"
        );
        assert!(text.contains("menuentry 'Boot agent' --id 'agent' {\n\tlinux /boot/vmlinuz console=ttyS0 quiet\n\tinitrd /boot/initrd.img\n}"));
        assert!(text.contains(
            "menuentry 'Guest OS on flash' --id 'guest' {\n\tset root=\"${agentdisk},2\"\n"
        ));
        assert!(text.contains("chainloader /EFI/Microsoft/Boot/bootmgfw.efi\n\t\telse\n\t\t\tchainloader /EFI/BOOT/BOOTX64.EFI"));
        assert!(text.contains("chainloader +1"));
        assert!(text
            .contains("--id 'console' {\n\tlinux /boot/vmlinuz console=ttyS0 quiet img.console"));
        assert!(text.contains("terminal_output console serial"));
    }

    #[test]
    fn next_entry_is_one_shot_and_cleared_before_it_boots() {
        let text = BootConfig::boot_agent("/k", "/i", "", Guest::Chain).render();
        let at = |needle: &str| {
            text.find(needle)
                .unwrap_or_else(|| panic!("{needle} missing:\n{text}"))
        };
        // Only next_entry is taken from grubenv, never other variables (root, prefix...).
        assert!(text.contains("set envfile=\"(${agentpart})/boot/grub/grubenv\"\n"));
        assert!(text.contains("if load_env --file \"$envfile\" next_entry; then"));
        // Cleared and saved before the entry is chosen; chosen only when saving worked.
        assert!(at("set next_entry=\n") < at("if save_env --file \"$envfile\" next_entry; then"));
        assert!(at("if save_env") < at("if [ \"$wanted\" = guest ]; then set default=guest; fi"));
        assert!(text.contains("if [ \"$wanted\" = console ]; then set default=console; fi"));
        // The default (agent) needs no switch: anything else stays on it.
        assert!(!text.contains("\"$wanted\" = agent"));
        // Every fi closes an if.
        let count = |w: &str| {
            text.split_whitespace()
                .filter(|t| t.trim_end_matches(';') == w)
                .count()
        };
        assert_eq!(count("if"), count("fi"), "{text}");
        let braces = text.matches('{').count() - text.matches("${").count();
        assert_eq!(
            braces,
            text.matches('}').count() - text.matches("${").count()
        );
    }

    #[test]
    fn linux_guest_entries() {
        let g = Guest::parse(
            "linux:/boot/vmlinuz-6.1,/boot/initrd.img-6.1,console=ttyS0 root=/dev/sda2",
        )
        .unwrap();
        let text = BootConfig::boot_agent("/k", "/i", "", g).render();
        assert!(text.contains("\tset root=\"${agentdisk},2\"\n\tlinux /boot/vmlinuz-6.1 console=ttyS0 root=/dev/sda2\n\tinitrd /boot/initrd.img-6.1\n}"), "{text}");
        let text = BootConfig::boot_agent("/k", "/i", "", Guest::parse("linux").unwrap()).render();
        assert!(text.contains("\tprobe --set=guestuuid --part-uuid \"($root)\"\n\tlinux /vmlinuz root=PARTUUID=${guestuuid} ro quiet\n\tinitrd /initrd.img\n"), "{text}");
        assert_eq!(
            Guest::parse("linux:/bzImage,").unwrap(),
            Guest::Linux {
                kernel: "/bzImage".into(),
                initrd: None,
                cmdline: None
            }
        );
        assert_eq!(Guest::parse("chain").unwrap(), Guest::Chain);
        for bad in [
            "",
            "windows",
            "linux:vmlinuz",
            "linux:/a b",
            "linux:/k,rel",
            "linux:/k;reboot",
            "chain:x",
        ] {
            assert!(Guest::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn titles_are_quoted_and_default_falls_back_to_the_first_entry() {
        assert_eq!(quote("it's"), "'it'\\''s'");
        let c = BootConfig {
            timeout_secs: 0,
            default: "nope".into(),
            serial: false,
            env_path: None,
            entries: vec![],
        };
        assert!(c.render().contains("set default='0'"));
        let mut c = BootConfig::boot_agent("/k", "/i", "", Guest::Chain);
        c.default = "missing".into();
        assert!(c.render().contains("set default='agent'"));
        c.env_path = None;
        assert!(!c.render().contains("load_env"));
    }

    #[test]
    fn grub_modules_cover_the_commands_the_configuration_uses() {
        let text = BootConfig::boot_agent("/k", "/i", "", Guest::parse("linux").unwrap()).render();
        for (cmd, module) in [
            ("load_env", "loadenv"),
            ("save_env", "loadenv"),
            ("regexp", "regexp"),
            ("probe", "probe"),
            ("[ ", "test"),
            ("chainloader", "chain"),
            ("linux ", "linux"),
            ("serial", "serial"),
        ] {
            assert!(text.contains(cmd) || cmd == "chainloader");
            assert!(
                MODULES.split(' ').any(|m| m == module),
                "{module} missing from MODULES"
            );
        }
    }
}
