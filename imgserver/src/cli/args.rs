//! Stage one: the command line to a [`Command`], no side effects (unit-tested).

use std::ffi::OsString;
use std::path::PathBuf;

use anyhow::{anyhow, bail};

use crate::model::{self, JobOptions, OnError};
use crate::protocol::{normalize_mac, After};

pub const USAGE: &str = concat!(
    "\
usage: imgserver [--data DIR] COMMAND
  init [--name NAME]... [--renew]     create the device CA and the server certificate
  serve [--listen ADDR] [--public-url URL] [--plain] [--interval SECS] [--reload-wait SECS]
        [--pxe-listen ADDR] [--pxe-enrol] [--pxe-files URL] [--pxe-args TEXT]
                                      PXE: /pxe/boot.ipxe?mac= answers agent or local disk
        [--header-timeout SECS] [--body-timeout SECS] [--conns-per-address N]
        [--rate-per-address N] [--rate-per-device N] [--enrol-rate N] [--keep-free BYTES]
        [--open-enrolment]   (labs only: enrol every device without the site secret)
  image add FILE|URL|DIR [--min-ram BYTES] [--ca PEM] [--autogenic] [--rsp FILE]
                                      register an image (reads its metadata); autogenic
                                      (seed 001) with --autogenic, or when its package script
                                      (--rsp FILE, or image.rsp in the package DIR) has <BackupImage>
  image list
  image remove NAME[:VERSION]|ID      unregister (and delete a repository file)
  image sign NAME:VERSION|ID --key KEYFILE    seal and sign a repository image (captures)
  image url NAME[:VERSION]|ID [--expires SECS] [--base URL]   a signed URL (e.g. for a CDN)
  schedule add (--mac MAC | --group NAME | --all) WHAT [OPTIONS]
      WHAT:    --image NAME[:VERSION] | --capture NAME:VERSION | --reboot | --boot-guest
      AUTOGENIC (seed 001; an autogenic image, a device with a backup partition):
               --backup-only         BI: download into the backup partition, no install
               --from-backup         PI: image from the backup partition (it must hold the image)
               --backup-only --from-backup   BI then PI in one job
               --convert [--backup-size SIZE]   lay the device out for autogenic imaging
                                     (boot agent, OS, backup = image + 100 MB), then image it
      OPTIONS: --partition P  --disk D  --preserve P (repeatable)  --no-backup
               --then reboot|no-reboot|copy-only  --on-error stop|continue
               --batch N | --sequential  --comp 0..9  --note TEXT
               --at TIME [--until TIME] [--tz ZONE]   devices get it only in that window
               --validate-only        print seed 003's validation table, create nothing
  schedule remove JOB
  devices [--reload-wait SECS]        devices with state, image, last check-in
  device MAC [--operational | --group NAME | --no-group]
  jobs                                jobs with their devices' progress
  job N [--abort | --retry | --rollback]
  approve MAC                         approve an enrolment made without the site secret
  forget MAC                          delete the device's records: it enrols and images anew
  transcript MAC [--task N]
  admin add NAME --role admin|operator|viewer    print a new admin API token (once)
  admin list | admin revoke NAME | admin audit [--target job:N|device:MAC] [--limit N]
",
    super::session::session_usage!(),
    "
TIME: YYYY-MM-DD HH:MM in ZONE (default $TZ), RFC 3339, @UNIX, now, +10m; see docs/admin-api.md
jobs, devices, transcript and admin list|audit show times in --tz ZONE (default $TZ).
DIR defaults to $IMGSERVER_DATA or /var/lib/imgserver."
);

/// A parsed command line.
#[derive(Debug, Clone, PartialEq)]
pub enum Command {
    Init {
        names: Vec<String>,
        renew: bool,
    },
    Serve {
        listen: String,
        public_url: Option<String>,
        plain: bool,
        interval: u32,
        reload_wait: u64,
        pxe: PxeOptions,
        limits: crate::api::Limits,
        open_enrolment: bool,
    },
    ImageAdd {
        what: String,
        min_ram: u64,
        ca: Option<PathBuf>,
        /// Seed 001: mark it autogenic (`--autogenic`).
        autogenic: bool,
        /// The package script `image.rsp` that comes with it (`--rsp FILE`).
        rsp: Option<PathBuf>,
    },
    ImageList,
    ImageRemove {
        spec: String,
    },
    ImageSign {
        spec: String,
        key: PathBuf,
    },
    ImageUrl {
        spec: String,
        expires: u64,
        base: Option<String>,
    },
    Approve {
        mac: String,
    },
    ScheduleAdd {
        selector: String,
        kind: String,
        image: Option<String>,
        options: JobOptions,
        note: Option<String>,
        window: Window,
        validate_only: bool,
    },
    ScheduleRemove {
        job: u64,
    },
    /// `reload_wait`: seed 003's reload wait for showing Maintenance (as `serve` was given).
    Devices {
        reload_wait: u64,
    },
    Device {
        mac: String,
        operational: bool,
        group: Option<Option<String>>,
    },
    Jobs,
    Job {
        id: u64,
        action: Option<String>,
        window: Window,
    },
    Forget {
        mac: String,
    },
    Transcript {
        mac: String,
        task: Option<u64>,
    },
    /// `admin add NAME --role ROLE` (the role is checked when it runs: exit code 1).
    AdminAdd {
        name: String,
        role: Option<String>,
    },
    AdminList,
    AdminRevoke {
        name: String,
    },
    AdminAudit {
        target: Option<String>,
        limit: Option<String>,
    },
    /// `admin` with words it does not know: its usage, exit code 1.
    AdminUsage,
    /// `session start|list|stop` (`super::session`).
    Session(super::session::SessionCommand),
    Help,
}

/// `--at TIME --until TIME` of `schedule add` and `job N --retry|--rollback`: the window in
/// which devices get the job (the admin core reads TIME in `--tz`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Window {
    pub at: Option<String>,
    pub until: Option<String>,
}

/// `serve --pxe-*` (see `crate::pxe`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct PxeOptions {
    /// Plain-HTTP listener with only `/pxe/` (iPXE without HTTPS).
    pub listen: Option<String>,
    /// Unknown MACs boot the agent (which enrols them).
    pub enrol: bool,
    /// Base URL of vmlinuz and initrd.img elsewhere.
    pub files: Option<String>,
    /// Kernel parameters for the agent.
    pub args: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Args {
    pub data: PathBuf,
    /// `--tz ZONE`: the zone times are read and shown in (default `$TZ`).
    pub tz: Option<String>,
    pub command: Command,
}

fn mac(s: &str) -> anyhow::Result<String> {
    normalize_mac(s).ok_or_else(|| anyhow!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
}

/// A size: bytes, or a number with K, M, G or T (KiB ... TiB; `MB` and `MiB` mean the same,
/// as in seed 001's sizes).
pub fn size(what: &str, s: &str) -> anyhow::Result<u64> {
    let t = s.trim();
    let digits = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (n, unit) = t.split_at(digits);
    let shift = match unit.trim().to_ascii_uppercase().as_str() {
        "" | "B" => 0,
        "K" | "KB" | "KIB" => 10,
        "M" | "MB" | "MIB" => 20,
        "G" | "GB" | "GIB" => 30,
        "T" | "TB" | "TIB" => 40,
        _ => bail!("{what}: {s:?} is not a size (bytes, or a number with K, M, G or T)"),
    };
    let n: u64 = n.parse().map_err(|_| {
        anyhow!("{what}: {s:?} is not a size (bytes, or a number with K, M, G or T)")
    })?;
    n.checked_mul(1u64 << shift)
        .ok_or_else(|| anyhow!("{what}: {s:?} is too large"))
}

fn num<T: std::str::FromStr>(what: &str, s: &str) -> anyhow::Result<T> {
    s.parse()
        .map_err(|_| anyhow!("{what}: {s:?} is not a number"))
}

/// Stage one: argv to [`Args`], no side effects.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<Args> {
    use lexopt::prelude::*;
    let args: Vec<OsString> = args.into_iter().collect();
    if super::session::is_session(&args) {
        let (data, tz, cmd) = super::session::parse(args)?;
        return Ok(Args {
            data,
            tz,
            command: Command::Session(cmd),
        });
    }
    let mut p = lexopt::Parser::from_iter(std::iter::once(OsString::from("imgserver")).chain(args));
    let mut data = std::env::var_os("IMGSERVER_DATA")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/lib/imgserver"));
    let mut words: Vec<String> = Vec::new();
    // Options of every command, collected flat; each command takes the ones it knows.
    let mut names = Vec::new();
    let mut renew = false;
    let mut listen = "0.0.0.0:8443".to_string();
    let mut public_url = None;
    let mut plain = false;
    let mut interval = 300u32;
    let mut reload_wait = model::DEFAULT_RELOAD_WAIT_SECS;
    let mut min_ram = 0u64;
    let mut ca = None;
    let mut selector: Option<String> = None;
    let mut kind: Option<(String, Option<String>)> = None;
    let mut o = JobOptions::default();
    let mut note = None;
    let mut operational = false;
    let mut group: Option<Option<String>> = None;
    let mut action = None;
    let mut task = None;
    let mut pxe = PxeOptions::default();
    let mut limits = crate::api::Limits::default();
    let mut open_enrolment = false;
    let mut key = None;
    let mut expires = 3600u64;
    let mut base = None;
    let mut window = Window::default();
    let mut tz = None;
    let mut validate_only = false;
    let mut role = None;
    let mut limit = None;
    let mut target = None;
    let mut autogenic = false;
    let mut rsp = None;
    let mut backup_only = false;
    let mut from_backup = false;
    let mut convert = false;
    let mut backup_size = None;
    let secs = |what: &str, v: String| -> anyhow::Result<std::time::Duration> {
        Ok(std::time::Duration::from_secs(num(what, &v)?))
    };
    let set_sel = |s: &mut Option<String>, v: String| -> anyhow::Result<()> {
        if s.replace(v).is_some() {
            bail!("give one of --mac, --group, --all");
        }
        Ok(())
    };
    let set_kind = |k: &mut Option<(String, Option<String>)>,
                    v: (String, Option<String>)|
     -> anyhow::Result<()> {
        if k.replace(v).is_some() {
            bail!("give one of --image, --capture, --reboot, --boot-guest");
        }
        Ok(())
    };
    while let Some(arg) = p.next()? {
        match arg {
            Long("data") => data = p.value()?.into(),
            Long("help") | Short('h') => {
                return Ok(Args {
                    data,
                    tz,
                    command: Command::Help,
                })
            }
            Long("name") => names.push(p.value()?.string()?),
            Long("renew") => renew = true,
            Long("listen") => listen = p.value()?.string()?,
            Long("public-url") => public_url = Some(p.value()?.string()?),
            Long("plain") => plain = true,
            Long("pxe-listen") => pxe.listen = Some(p.value()?.string()?),
            Long("pxe-enrol") => pxe.enrol = true,
            Long("pxe-files") => pxe.files = Some(p.value()?.string()?),
            Long("pxe-args") => pxe.args = Some(p.value()?.string()?),
            Long("interval") => interval = num("--interval", &p.value()?.string()?)?,
            Long("reload-wait") => reload_wait = num("--reload-wait", &p.value()?.string()?)?,
            Long("min-ram") => min_ram = num("--min-ram", &p.value()?.string()?)?,
            Long("ca") => ca = Some(PathBuf::from(p.value()?)),
            Long("mac") => set_sel(
                &mut selector,
                format!("mac:{}", mac(&p.value()?.string()?)?),
            )?,
            Long("group") if words.first().map(String::as_str) == Some("device") => {
                group = Some(Some(p.value()?.string()?))
            }
            Long("no-group") => group = Some(None),
            Long("group") => set_sel(&mut selector, format!("group:{}", p.value()?.string()?))?,
            Long("all") => set_sel(&mut selector, "all".into())?,
            Long("image") => set_kind(&mut kind, ("deploy".into(), Some(p.value()?.string()?)))?,
            Long("capture") => set_kind(&mut kind, ("capture".into(), Some(p.value()?.string()?)))?,
            Long("reboot") => set_kind(&mut kind, ("reboot".into(), None))?,
            Long("boot-guest") => set_kind(&mut kind, ("boot_guest".into(), None))?,
            Long("partition") => o.partition = Some(p.value()?.string()?),
            Long("disk") => o.disk = Some(p.value()?.string()?),
            Long("preserve") => o.preserve.push(p.value()?.string()?),
            Long("no-backup") => o.backup_first = false,
            Long("then") => {
                let v = p.value()?.string()?;
                o.after = After::parse(&v)
                    .ok_or_else(|| anyhow!("--then {v:?}: use reboot, no-reboot or copy-only"))?;
            }
            Long("on-error") => {
                o.on_error = match p.value()?.string()?.as_str() {
                    "stop" => OnError::Stop,
                    "continue" => OnError::Continue,
                    v => bail!("--on-error {v:?}: use stop or continue"),
                }
            }
            Long("batch") => o.batch = num("--batch", &p.value()?.string()?)?,
            Long("sequential") => o.batch = 1,
            Long("comp") => {
                let c: u8 = num("--comp", &p.value()?.string()?)?;
                if c > 9 {
                    bail!("--comp {c}: use 0..9");
                }
                o.comp = Some(c);
            }
            Long("note") => note = Some(p.value()?.string()?),
            Long("operational") => operational = true,
            Long("abort") => action = Some("abort".to_string()),
            Long("retry") => action = Some("retry".to_string()),
            Long("rollback") => action = Some("rollback".to_string()),
            Long("task") => task = Some(num("--task", &p.value()?.string()?)?),
            Long("header-timeout") => {
                limits.header_timeout = secs("--header-timeout", p.value()?.string()?)?
            }
            Long("body-timeout") => {
                limits.body_timeout = secs("--body-timeout", p.value()?.string()?)?
            }
            Long("conns-per-address") => {
                limits.conns_per_address = num("--conns-per-address", &p.value()?.string()?)?
            }
            Long("rate-per-address") => {
                limits.requests_per_address = num("--rate-per-address", &p.value()?.string()?)?
            }
            Long("rate-per-device") => {
                limits.requests_per_device = num("--rate-per-device", &p.value()?.string()?)?
            }
            Long("enrol-rate") => {
                limits.enrolments_per_address = num("--enrol-rate", &p.value()?.string()?)?
            }
            Long("keep-free") => limits.keep_free = num("--keep-free", &p.value()?.string()?)?,
            Long("key") => key = Some(PathBuf::from(p.value()?)),
            Long("open-enrolment") => open_enrolment = true,
            Long("expires") => expires = num("--expires", &p.value()?.string()?)?,
            Long("base") => base = Some(p.value()?.string()?),
            Long("at") => window.at = Some(p.value()?.string()?),
            Long("until") => window.until = Some(p.value()?.string()?),
            Long("tz") => tz = Some(p.value()?.string()?),
            Long("validate-only") => validate_only = true,
            Long("role") => role = Some(p.value()?.string()?),
            Long("limit") => limit = Some(p.value()?.string()?),
            Long("target") => target = Some(p.value()?.string()?),
            Long("autogenic") => autogenic = true,
            Long("rsp") => rsp = Some(PathBuf::from(p.value()?)),
            Long("backup-only") => backup_only = true,
            Long("from-backup") => from_backup = true,
            Long("convert") => convert = true,
            Long("backup-size") => {
                backup_size = Some(size("--backup-size", &p.value()?.string()?)?)
            }
            Value(v) => words.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
    // The job window goes with `schedule add` and `job N`; --tz with what reads or shows
    // times.
    let windowed = matches!(w.as_slice(), ["schedule", "add"] | ["job", _]);
    let timed = windowed
        || matches!(
            w.as_slice(),
            ["jobs" | "devices", ..] | ["transcript", _] | ["admin", ..]
        );
    if (!windowed && window != Window::default())
        || (validate_only && w.as_slice() != ["schedule", "add"])
        || (!timed && tz.is_some())
    {
        bail!("--at, --until, --tz and --validate-only go with `schedule add`, `job N --retry|--rollback`, `jobs` or `admin audit`");
    }
    let image_add = matches!(w.as_slice(), ["image", "add", _]);
    if !image_add && (autogenic || rsp.is_some()) {
        bail!("--autogenic and --rsp go with `image add`");
    }
    let scheduling = w.as_slice() == ["schedule", "add"];
    if !scheduling && (backup_only || from_backup || convert || backup_size.is_some()) {
        bail!("--backup-only, --from-backup, --convert and --backup-size go with `schedule add`");
    }
    let command = match w.as_slice() {
        [] | ["help"] => Command::Help,
        ["init"] => Command::Init { names, renew },
        ["serve"] => Command::Serve {
            listen,
            public_url,
            plain,
            interval,
            reload_wait,
            pxe,
            limits,
            open_enrolment,
        },
        ["image", "add", what] => Command::ImageAdd {
            what: what.to_string(),
            min_ram,
            ca,
            autogenic,
            rsp,
        },
        ["image", "list"] | ["images"] => Command::ImageList,
        ["image", "remove", spec] => Command::ImageRemove {
            spec: spec.to_string(),
        },
        ["image", "sign", spec] => Command::ImageSign {
            spec: spec.to_string(),
            key: key.ok_or_else(|| {
                anyhow!("image sign needs --key KEYFILE (a secret key made by `img -keygen`)")
            })?,
        },
        ["image", "url", spec] => Command::ImageUrl {
            spec: spec.to_string(),
            expires,
            base,
        },
        ["approve", m] => Command::Approve { mac: mac(m)? },
        ["schedule", "add"] => {
            let selector = selector
                .ok_or_else(|| anyhow!("schedule add needs --mac MAC, --group NAME or --all"))?;
            let (mut kind, image) = kind.ok_or_else(|| {
                anyhow!("schedule add needs --image, --capture, --reboot or --boot-guest")
            })?;
            // Seed 001's autogenic jobs: flags on a deploy of an autogenic image.
            if (backup_only || from_backup || convert) && kind != "deploy" {
                bail!("--backup-only, --from-backup and --convert go with --image NAME[:VERSION]");
            }
            if convert {
                if backup_only || from_backup {
                    bail!("--convert lays the device out and images it: schedule --backup-only / --from-backup as a later job");
                }
                kind = "convert".into();
            } else if backup_size.is_some() {
                bail!("--backup-size goes with --convert");
            }
            o.backup_size = backup_size;
            match (backup_only, from_backup) {
                (true, true) => {
                    o.from_backup = true;
                    o.fetch_to_backup = true;
                }
                (true, false) => {
                    if o.after != After::Reboot && o.after != After::CopyOnly {
                        bail!(
                            "--backup-only only copies into the backup partition: leave out --then"
                        );
                    }
                    o.backup_only = true;
                    o.after = After::CopyOnly;
                }
                (false, true) => o.from_backup = true,
                (false, false) => {}
            }
            if kind == "capture" {
                let spec = image.clone().unwrap_or_default();
                let (n, v) = spec.split_once(':').ok_or_else(|| {
                    anyhow!("--capture {spec:?}: give NAME:VERSION for the new image")
                })?;
                o.capture_name = Some(n.to_string());
                o.capture_version = Some(v.to_string());
            }
            Command::ScheduleAdd {
                selector,
                kind,
                image,
                options: o,
                note,
                window,
                validate_only,
            }
        }
        ["schedule", "remove", n] => Command::ScheduleRemove {
            job: num("job", n)?,
        },
        ["devices"] => Command::Devices { reload_wait },
        ["device", m] => Command::Device {
            mac: mac(m)?,
            operational,
            group,
        },
        ["jobs"] => Command::Jobs,
        ["job", n] => Command::Job {
            id: num("job", n)?,
            action,
            window,
        },
        ["forget", m] => Command::Forget { mac: mac(m)? },
        ["transcript", m] => Command::Transcript { mac: mac(m)?, task },
        ["admin", "add", name] => Command::AdminAdd {
            name: name.to_string(),
            role,
        },
        ["admin", "list"] => Command::AdminList,
        ["admin", "revoke", name] => Command::AdminRevoke {
            name: name.to_string(),
        },
        ["admin", "audit"] => Command::AdminAudit { target, limit },
        ["admin", ..] => Command::AdminUsage,
        _ => bail!("unknown command {:?}\n{USAGE}", words.join(" ")),
    };
    Ok(Args { data, tz, command })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> anyhow::Result<Command> {
        parse(s.split_whitespace().map(OsString::from)).map(|a| a.command)
    }

    #[test]
    fn schedule_add_parses_seed_options() {
        let c = p("schedule add --mac 52-54-00-AA-BB-CC --image os:7.2 --partition 2 --no-backup --then no-reboot --on-error continue --batch 5").unwrap();
        let Command::ScheduleAdd {
            selector,
            kind,
            image,
            options,
            ..
        } = c
        else {
            panic!("{c:?}")
        };
        assert_eq!(selector, "mac:52:54:00:aa:bb:cc");
        assert_eq!(kind, "deploy");
        assert_eq!(image.as_deref(), Some("os:7.2"));
        assert_eq!(options.partition.as_deref(), Some("2"));
        assert!(!options.backup_first);
        assert_eq!(options.after, After::NoReboot);
        assert_eq!(options.on_error, OnError::Continue);
        assert_eq!(options.batch, 5);
    }

    #[test]
    fn schedule_add_needs_target_and_kind() {
        assert!(p("schedule add --image os").is_err());
        assert!(p("schedule add --all").is_err());
        assert!(p("schedule add --all --mac 52:54:00:00:00:01 --reboot").is_err());
        assert!(p("schedule add --all --capture noversion").is_err());
        let Command::ScheduleAdd { options, .. } =
            p("schedule add --group lab --capture gold:3 --sequential").unwrap()
        else {
            panic!()
        };
        assert_eq!(options.capture_name.as_deref(), Some("gold"));
        assert_eq!(options.batch, 1);
    }

    #[test]
    fn other_commands() {
        assert_eq!(
            p("job 4 --rollback").unwrap(),
            Command::Job {
                id: 4,
                action: Some("rollback".into()),
                window: Window::default(),
            }
        );
        assert_eq!(
            p("device 525400000001 --group lab").unwrap(),
            Command::Device {
                mac: "52:54:00:00:00:01".into(),
                operational: false,
                group: Some(Some("lab".into()))
            }
        );
        assert!(p("forget nonsense").is_err());
        assert!(p("frobnicate").is_err());
        assert_eq!(
            parse(["--data", "/x", "devices"].map(OsString::from))
                .unwrap()
                .data,
            PathBuf::from("/x")
        );
    }

    #[test]
    fn job_window_and_admin_options_parse_with_the_rest() {
        let a = parse(
            [
                "--data",
                "/d",
                "schedule",
                "add",
                "--all",
                "--image",
                "os:2",
                "--at",
                "2026-11-29 07:00",
                "--until=+2h",
                "--tz",
                "Asia/Tokyo",
                "--validate-only",
                "--partition",
                "2",
            ]
            .map(OsString::from),
        )
        .unwrap();
        assert_eq!(a.data, PathBuf::from("/d"));
        assert_eq!(a.tz.as_deref(), Some("Asia/Tokyo"));
        let Command::ScheduleAdd {
            window,
            validate_only,
            options,
            ..
        } = a.command
        else {
            panic!("{a:?}")
        };
        assert_eq!(window.at.as_deref(), Some("2026-11-29 07:00"));
        assert_eq!(window.until.as_deref(), Some("+2h"));
        assert!(validate_only);
        assert_eq!(options.partition.as_deref(), Some("2"));
        assert!(
            p("schedule add --all --reboot --at").is_err(),
            "--at needs a value"
        );
        assert!(p("image list --at now").is_err(), "no window on image list");
        assert!(p("devices --validate-only").is_err());
        assert!(p("jobs --tz UTC").is_ok());
        assert_eq!(
            p("admin add ops --role operator").unwrap(),
            Command::AdminAdd {
                name: "ops".into(),
                role: Some("operator".into())
            }
        );
        assert_eq!(
            p("admin audit --target job:3 --limit 5").unwrap(),
            Command::AdminAudit {
                target: Some("job:3".into()),
                limit: Some("5".into())
            }
        );
        assert_eq!(p("admin frobnicate").unwrap(), Command::AdminUsage);
    }

    #[test]
    fn trust_commands_and_limits() {
        assert_eq!(
            p("approve 52-54-00-00-00-01").unwrap(),
            Command::Approve {
                mac: "52:54:00:00:00:01".into()
            }
        );
        assert!(p("image sign gold:1").is_err(), "needs --key");
        assert_eq!(
            p("image sign gold:1 --key /k").unwrap(),
            Command::ImageSign {
                spec: "gold:1".into(),
                key: "/k".into()
            }
        );
        assert_eq!(
            p("image url os --expires 60").unwrap(),
            Command::ImageUrl {
                spec: "os".into(),
                expires: 60,
                base: None
            }
        );
        let Command::Serve { limits, .. } =
            p("serve --header-timeout 3 --conns-per-address 0 --keep-free 5").unwrap()
        else {
            panic!()
        };
        assert_eq!(limits.header_timeout, std::time::Duration::from_secs(3));
        assert_eq!(limits.conns_per_address, 0);
        assert_eq!(limits.keep_free, 5);
        assert_eq!(limits.requests_per_device, 10, "defaults stay");
    }

    #[test]
    fn autogenic_flags_parse_into_the_job() {
        // (command line, kind, from_backup, fetch_to_backup, backup_only, after, backup size)
        let m = "schedule add --mac 52:54:00:00:00:01 --image os:2";
        let rows = [
            ("", "deploy", false, false, false, After::Reboot, None),
            (
                " --backup-only",
                "deploy",
                false,
                false,
                true,
                After::CopyOnly,
                None,
            ),
            (
                " --from-backup",
                "deploy",
                true,
                false,
                false,
                After::Reboot,
                None,
            ),
            (
                " --backup-only --from-backup",
                "deploy",
                true,
                true,
                false,
                After::Reboot,
                None,
            ),
            (
                " --from-backup --backup-only --then no-reboot",
                "deploy",
                true,
                true,
                false,
                After::NoReboot,
                None,
            ),
            (
                " --convert",
                "convert",
                false,
                false,
                false,
                After::Reboot,
                None,
            ),
            (
                " --convert --backup-size 1500M",
                "convert",
                false,
                false,
                false,
                After::Reboot,
                Some(1500u64 << 20),
            ),
            (
                " --convert --backup-size 2G",
                "convert",
                false,
                false,
                false,
                After::Reboot,
                Some(2u64 << 30),
            ),
        ];
        for (extra, want_kind, fb, fetch, bo, after, size) in rows {
            let line = format!("{m}{extra}");
            let Command::ScheduleAdd {
                kind,
                image,
                options: o,
                ..
            } = p(&line).unwrap()
            else {
                panic!("{line}")
            };
            assert_eq!(kind, want_kind, "{line}");
            assert_eq!(image.as_deref(), Some("os:2"), "{line}");
            assert_eq!(
                (
                    o.from_backup,
                    o.fetch_to_backup,
                    o.backup_only,
                    o.after,
                    o.backup_size
                ),
                (fb, fetch, bo, after, size),
                "{line}"
            );
        }
        for bad in [
            " --backup-only --then no-reboot",
            " --convert --from-backup",
            " --backup-size 1G",
            " --convert --backup-size lots",
        ] {
            assert!(p(&format!("{m}{bad}")).is_err(), "{bad}");
        }
        assert!(p("schedule add --all --reboot --from-backup").is_err());
        assert!(p("devices --autogenic").is_err());
        assert!(p("jobs --backup-only").is_err());
        assert_eq!(
            p("image add /pkg --autogenic --rsp /pkg/image.rsp").unwrap(),
            Command::ImageAdd {
                what: "/pkg".into(),
                min_ram: 0,
                ca: None,
                autogenic: true,
                rsp: Some("/pkg/image.rsp".into()),
            }
        );
        assert_eq!(size("x", "4096").unwrap(), 4096);
        assert_eq!(size("x", "100MiB").unwrap(), 100 << 20);
        assert!(size("x", "99999999999T").is_err());
        assert!(size("x", "-1").is_err());
    }
}
