//! The layout of an autogenic device (seed 001, "Autogenic Capable Device"): pure
//! arithmetic, no I/O.
//!
//! ```text
//! | 1 MiB: partition table | boot-agent (1) | OS (2) | backup IMGBACKUP (3) | free | GPT backup |
//! ```
//!
//! The seed's rules, with MB = 2^20 bytes as the seed counts flash:
//! - boot-agent partition: 16 MB when the kernel and initrd fit, else the size they need;
//!   a device that already has one keeps it, its size and every byte of it;
//! - backup partition: the image's size + 100 MB by default; larger only on flash of 4096 MB
//!   or less, and only as long as the OS partition still fits (never smaller);
//! - OS partition: flash ≤ 4096 MB: what the boot-agent and backup partitions leave;
//!   flash > 4096 MB: 4096 MB − boot-agent − backup (the seed's rule): the rest of the flash
//!   stays free, and the layout says how much;
//! - refused, naming the sizes and the way out, when the OS partition would be smaller
//!   than the image, or the backup cannot hold it.
//!
//! Partitions start and end on 1 MiB boundaries; the first MiB holds the partition table
//! (and the alignment before the boot-agent partition), the last sectors the GPT's backup.
//! All devices of one conversion job must have the same flash size ([`same_flash_size`]).

use anyhow::bail;

/// The seed's unit: 2^20 bytes.
pub const MB: u64 = 1 << 20;
/// The seed's boot-agent partition.
pub const BOOT_AGENT_DEFAULT: u64 = 16 * MB;
/// Backup partition = image + this, by default.
pub const BACKUP_EXTRA: u64 = 100 * MB;
/// Flash above this keeps the seed's 4096 MB layout and leaves the rest free.
pub const SEED_LIMIT: u64 = 4096 * MB;

/// The boot-agent partition, as it is or as it would be made.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BootAgent {
    /// The device has one: kept as it is (number, byte offset, length).
    Existing { number: u32, start: u64, len: u64 },
    /// None yet: made with the seed's 16 MB, or `needed` bytes when the kernel, initrd
    /// and GRUB need more.
    New { needed: Option<u64> },
}

/// What a layout is computed from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayoutRequest {
    /// The flash (disk) size in bytes.
    pub flash: u64,
    /// Its logical sector size (512 or 4096).
    pub sector_size: u64,
    pub boot_agent: BootAgent,
    /// The image's size in bytes (the file kept in the backup partition).
    pub image: u64,
    /// The administrator's backup partition size; None: image + 100 MB.
    pub backup: Option<u64>,
}

/// One partition of a layout.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Part {
    pub number: u32,
    /// Byte offset.
    pub start: u64,
    /// Bytes.
    pub len: u64,
}

impl Part {
    pub fn end(&self) -> u64 {
        self.start + self.len
    }
}

/// A computed layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    pub flash: u64,
    pub sector_size: u64,
    pub boot_agent: Part,
    /// The boot-agent partition exists and is kept.
    pub boot_agent_kept: bool,
    pub os: Part,
    pub backup: Part,
    /// Bytes between the backup partition's end and the GPT backup at the flash's end.
    pub free: u64,
    /// Image bytes the backup partition's file system holds.
    pub backup_capacity: u64,
    /// Things the administrator should know (free space, a larger boot-agent partition).
    pub notes: Vec<String>,
}

fn mb(b: u64) -> String {
    let m = b as f64 / MB as f64;
    if b.is_multiple_of(MB) {
        format!("{} MB", b / MB)
    } else {
        format!("{m:.1} MB")
    }
}

/// Where the GPT's backup (header + 128 entries) starts: the bytes after it are not usable.
fn gpt_tail(ss: u64) -> u64 {
    ss + (128 * 128u64).div_ceil(ss) * ss
}

/// Apply the seed's rules. Errors name the sizes and the way out.
pub fn compute(r: &LayoutRequest) -> anyhow::Result<Layout> {
    let ss = r.sector_size;
    if !matches!(ss, 512 | 4096) {
        bail!("sector size {ss}: only 512 and 4096 bytes are supported");
    }
    if r.image == 0 {
        bail!("the image size is 0: give the image's size (e.g. -image=2500MB)");
    }
    let mut notes = Vec::new();
    let (ba, kept) = match r.boot_agent {
        BootAgent::Existing { number, start, len } => {
            if start % ss != 0 || len == 0 {
                bail!(
                    "the boot-agent partition (number {number}, offset {start}, {len} bytes) is not a partition the layout can keep"
                );
            }
            if number == 2 || number == 3 {
                bail!(
                    "the boot-agent partition is partition {number}, but the layout puts the OS at 2 and the backup at 3: install the boot agent on partition 1 (`img -install`)"
                );
            }
            (Part { number, start, len }, true)
        }
        BootAgent::New { needed } => {
            let len = match needed {
                Some(n) if n > BOOT_AGENT_DEFAULT => {
                    let len = n.div_ceil(MB) * MB;
                    notes.push(format!(
                        "the kernel and initrd need {}: the boot-agent partition is {} instead of the seed's 16 MB",
                        mb(n),
                        mb(len)
                    ));
                    len
                }
                _ => BOOT_AGENT_DEFAULT,
            };
            (
                Part {
                    number: 1,
                    start: MB,
                    len,
                },
                false,
            )
        }
    };
    let os_start = ba.end().div_ceil(MB) * MB;
    let default_backup = (r.image + BACKUP_EXTRA).div_ceil(MB) * MB;
    let backup_len = match r.backup {
        None => default_backup,
        Some(b) if b < default_backup => bail!(
            "a backup partition of {} cannot hold the image of {} and its margin: it is at least {} (image + 100 MB); leave -backup out for that",
            mb(b),
            mb(r.image),
            mb(default_backup)
        ),
        Some(b) if r.flash > SEED_LIMIT && b.div_ceil(MB) * MB != default_backup => bail!(
            "the backup partition can be enlarged only on flash of 4096 MB or less; this flash is {}, so it is the image + 100 MB = {}: leave -backup out",
            mb(r.flash),
            mb(default_backup)
        ),
        Some(b) => b.div_ceil(MB) * MB,
    };
    let tail = gpt_tail(ss);
    let usable_end = (r.flash.saturating_sub(tail) / MB) * MB;
    let region_end = if r.flash > SEED_LIMIT {
        SEED_LIMIT.min(usable_end)
    } else {
        usable_end
    };
    let why_region = if r.flash > SEED_LIMIT {
        " (the seed's layout uses the first 4096 MB of larger flash)".to_string()
    } else {
        String::new()
    };
    let os_len = region_end
        .checked_sub(os_start)
        .and_then(|l| l.checked_sub(backup_len))
        .unwrap_or(0);
    if os_len < r.image {
        let enlarged = r
            .backup
            .is_some_and(|b| b.div_ceil(MB) * MB > default_backup);
        let way_out = if enlarged {
            "a smaller -backup, or a device with more flash"
        } else {
            "a device with more flash, or a smaller image"
        };
        bail!(
            "flash of {} cannot hold the OS partition and the backup: the partition table and boot-agent partition ({}) and the backup partition ({}, image {} + 100 MB{}) leave {} for the OS partition{why_region}, which must hold at least the image's {}; use {way_out}",
            mb(r.flash),
            mb(os_start),
            mb(backup_len),
            mb(r.image),
            if enlarged { ", enlarged" } else { "" },
            mb(os_len),
            mb(r.image)
        );
    }
    let backup = Part {
        number: 3,
        start: os_start + os_len,
        len: backup_len,
    };
    let backup_capacity = crate::backupfs::capacity_for(backup_len, ss as u32)?;
    if backup_capacity < r.image {
        bail!(
            "a backup partition of {} holds {} of image after its file system, less than the image's {}: give a larger -backup",
            mb(backup_len),
            mb(backup_capacity),
            mb(r.image)
        );
    }
    let free = r.flash.saturating_sub(tail).saturating_sub(backup.end());
    if r.flash > SEED_LIMIT {
        notes.push(format!(
            "{} of the {} flash stay free after the backup partition (the seed's layout uses the first 4096 MB)",
            mb(free),
            mb(r.flash)
        ));
    }
    Ok(Layout {
        flash: r.flash,
        sector_size: ss,
        boot_agent: ba,
        boot_agent_kept: kept,
        os: Part {
            number: 2,
            start: os_start,
            len: os_len,
        },
        backup,
        free,
        backup_capacity,
        notes,
    })
}

impl Layout {
    /// The layout as `img -layout` prints it.
    pub fn describe(&self) -> String {
        let row = |what: &str, p: &Part, extra: &str| {
            format!(
                "  {:<26} partition {}  {:>10}  (offset {}, {} bytes){extra}\n",
                what,
                p.number,
                mb(p.len),
                p.start,
                p.len
            )
        };
        let mut s = format!(
            "flash {} ({} bytes, {}-byte sectors)\n",
            mb(self.flash),
            self.flash,
            self.sector_size
        );
        s += &row(
            "boot agent",
            &self.boot_agent,
            if self.boot_agent_kept {
                ", kept as it is"
            } else {
                ""
            },
        );
        s += &row("OS", &self.os, "");
        s += &row(
            "backup (IMGBACKUP, FAT32)",
            &self.backup,
            &format!(", holds an image of up to {}", mb(self.backup_capacity)),
        );
        s += &format!("  free at the end: {}\n", mb(self.free));
        for n in &self.notes {
            s += &format!("note: {n}\n");
        }
        s
    }
}

/// A conversion job is planned for one flash size: a device with another size refuses it.
/// Sizes are compared in whole MB (the seed's unit).
pub fn same_flash_size(planned: u64, actual: u64) -> anyhow::Result<()> {
    if planned / MB != actual / MB {
        bail!(
            "this device's flash is {} and the conversion was planned for {}: all devices of a conversion job must have the same flash size; schedule this device in a job of its own",
            mb(actual),
            mb(planned)
        );
    }
    Ok(())
}

/// "600MB", "600 MiB", "2.5GB", "4096" (MB when no unit), "1048576B". MB and MiB alike are
/// 2^20 bytes, GB and GiB 2^30, as the seed counts flash.
pub fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let split = t
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(t.len());
    let (num, unit) = t.split_at(split);
    let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "m" | "mb" | "mib" => MB,
        "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        u => {
            return Err(format!(
                "{s:?}: unknown unit {u:?} (use B, KB, MB, GB or TB; MB when none)"
            ))
        }
    };
    let bad = || format!("{s:?} is not a size (e.g. 600MB, 2.5GB)");
    if num.is_empty() {
        return Err(bad());
    }
    let v = if num.contains('.') {
        let f: f64 = num.parse().map_err(|_| bad())?;
        let b = f * mult as f64;
        if !(0.0..1.8e19).contains(&b) {
            return Err(bad());
        }
        b.round() as u64
    } else {
        num.parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(mult))
            .ok_or_else(bad)?
    };
    Ok(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GB: u64 = 1 << 30;

    fn req(flash: u64, image: u64, backup: Option<u64>) -> LayoutRequest {
        LayoutRequest {
            flash,
            sector_size: 512,
            boot_agent: BootAgent::New { needed: None },
            image,
            backup,
        }
    }

    /// (flash, image, backup) → (OS MB, backup MB, free MB), the seed's rules as a table.
    #[test]
    fn the_seeds_rules_as_a_table() {
        type Row = (u64, u64, Option<u64>, u64, u64, u64);
        let rows: &[Row] = &[
            // flash ≤ 4096 MB: OS = flash − 1 MiB table − 16 − backup − 1 MiB GPT tail.
            (GB, 300 * MB, None, 1024 - 1 - 16 - 400 - 1, 400, 0),
            (2 * GB, 700 * MB, None, 2048 - 1 - 16 - 800 - 1, 800, 0),
            (
                4096 * MB,
                1500 * MB,
                None,
                4096 - 1 - 16 - 1600 - 1,
                1600,
                0,
            ),
            // enlarged backup on ≤ 4096 MB
            (
                4096 * MB,
                1500 * MB,
                Some(2000 * MB),
                4096 - 1 - 16 - 2000 - 1,
                2000,
                0,
            ),
            // > 4096 MB: OS = 4096 − boot agent − backup, the rest free.
            (
                8 * GB,
                1500 * MB,
                None,
                4096 - 1 - 16 - 1600,
                1600,
                8192 - 4096 - 1,
            ),
            (
                16 * GB,
                1900 * MB,
                None,
                4096 - 1 - 16 - 2000,
                2000,
                16384 - 4096 - 1,
            ),
            // an image size that is not whole MB rounds the backup up
            (2 * GB, 700 * MB + 1, None, 2048 - 1 - 16 - 801 - 1, 801, 0),
        ];
        for &(flash, image, backup, os, bk, free) in rows {
            let l = compute(&req(flash, image, backup)).unwrap();
            assert_eq!(
                (l.os.len / MB, l.backup.len / MB, l.free / MB),
                (os, bk, free),
                "flash {flash} image {image} backup {backup:?}"
            );
            assert_eq!(
                l.boot_agent,
                Part {
                    number: 1,
                    start: MB,
                    len: 16 * MB
                }
            );
            assert_eq!((l.os.number, l.backup.number), (2, 3));
            assert_eq!(l.os.start, l.boot_agent.end());
            assert_eq!(l.backup.start, l.os.end());
            assert!(l.backup.end() + gpt_tail(512) <= flash);
            assert!(l.backup_capacity >= image);
            for p in [l.os, l.backup] {
                assert_eq!((p.start % MB, p.len % MB), (0, 0));
            }
            assert_eq!(flash > SEED_LIMIT, !l.notes.is_empty(), "{:?}", l.notes);
        }
    }

    #[test]
    fn refusals_name_the_sizes_and_the_way_out() {
        let cases: &[(LayoutRequest, &[&str])] = &[
            // 1 GB cannot hold a 600 MB image twice.
            (
                req(GB, 600 * MB, None),
                &[
                    "flash of 1024 MB cannot hold",
                    "700 MB",
                    "a device with more flash",
                ],
            ),
            // enlarging past the OS partition's room
            (
                req(2 * GB, 700 * MB, Some(1400 * MB)),
                &["cannot hold", "enlarged", "a smaller -backup"],
            ),
            // enlarging on > 4096 MB
            (
                req(8 * GB, 700 * MB, Some(1000 * MB)),
                &["only on flash of 4096 MB or less", "800 MB"],
            ),
            // smaller than image + 100 MB
            (req(2 * GB, 700 * MB, Some(750 * MB)), &["at least 800 MB"]),
            // > 4096 MB flash and an image that does not fit the first 4096 MB twice
            (
                req(16 * GB, 2500 * MB, None),
                &["first 4096 MB", "cannot hold"],
            ),
            (req(GB, 0, None), &["image size is 0"]),
        ];
        for (r, want) in cases {
            let e = compute(r).unwrap_err().to_string();
            for w in *want {
                assert!(e.contains(w), "{r:?}: {e:?} lacks {w:?}");
            }
        }
    }

    #[test]
    fn an_existing_boot_agent_partition_is_kept_whatever_its_size() {
        let mut r = req(4096 * MB, 1000 * MB, None);
        r.boot_agent = BootAgent::Existing {
            number: 1,
            start: MB,
            len: 64 * MB,
        };
        let l = compute(&r).unwrap();
        assert!(l.boot_agent_kept);
        assert_eq!(l.boot_agent.len, 64 * MB);
        assert_eq!(l.os.start, 65 * MB);
        assert_eq!(l.os.len, (4096 - 65 - 1100 - 1) * MB);
        // An odd end is rounded up to the next MiB for the OS partition.
        r.boot_agent = BootAgent::Existing {
            number: 1,
            start: 34 * 512,
            len: 40 * MB,
        };
        assert_eq!(compute(&r).unwrap().os.start, 41 * MB);
        r.boot_agent = BootAgent::Existing {
            number: 1,
            start: 2048 * 512,
            len: 40 * MB + 512,
        };
        assert_eq!(compute(&r).unwrap().os.start, 42 * MB);
        r.boot_agent = BootAgent::Existing {
            number: 2,
            start: MB,
            len: 16 * MB,
        };
        assert!(compute(&r).unwrap_err().to_string().contains("partition 1"));
        // A kernel that needs more than 16 MB.
        let mut r = req(4096 * MB, 1000 * MB, None);
        r.boot_agent = BootAgent::New {
            needed: Some(30 * MB + 5),
        };
        let l = compute(&r).unwrap();
        assert_eq!(l.boot_agent.len, 31 * MB);
        assert!(
            l.notes[0].contains("instead of the seed's 16 MB"),
            "{:?}",
            l.notes
        );
        // 4096-byte sectors leave a larger GPT tail, still 1 MiB.
        let mut r = req(4096 * MB, 1000 * MB, None);
        r.sector_size = 4096;
        assert_eq!(compute(&r).unwrap().os.len, (4096 - 17 - 1100 - 1) * MB);
    }

    #[test]
    fn flash_sizes_compare_in_whole_mb() {
        assert!(same_flash_size(4096 * MB, 4096 * MB + 4096).is_ok());
        let e = same_flash_size(4096 * MB, 8192 * MB)
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("8192 MB") && e.contains("planned for 4096 MB"),
            "{e}"
        );
    }

    #[test]
    fn sizes_parse_with_units() {
        for (s, v) in [
            ("600MB", 600 * MB),
            ("600 MiB", 600 * MB),
            ("600", 600 * MB),
            ("2GB", 2 * GB),
            ("2.5GiB", 5 * GB / 2),
            ("1048576B", MB),
            ("64k", 65536),
        ] {
            assert_eq!(parse_size(s), Ok(v), "{s}");
        }
        for bad in [
            "",
            "MB",
            "12XB",
            "1.2.3GB",
            "99999999999999999999TB",
            "-5MB",
        ] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }
}
