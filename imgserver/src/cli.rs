//! The administrator's command line: `imgserver init|serve|image|schedule|devices|device|
//! jobs|job|forget|transcript`. The admin commands open the same SQLite file as the running
//! server (WAL mode: they never block it), so they work whether the server runs or not.
//!
//! Arguments are parsed in two stages as elsewhere in the project: lexopt turns argv into a
//! [`Command`] with no side effects (unit-tested), then [`run`] carries it out.

use std::ffi::OsString;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{anyhow, bail, Context};

use crate::model::{self, DeviceState, JobOptions, OnError, TaskState};
use crate::protocol::{normalize_mac, After};
use crate::store::{NewJob, Policy, SqliteStore, Store};

pub const USAGE: &str = "\
usage: imgserver [--data DIR] COMMAND
  init [--name NAME]... [--renew]     create the device CA and the server certificate
  serve [--listen ADDR] [--public-url URL] [--plain] [--interval SECS] [--reload-wait SECS]
        [--pxe-listen ADDR] [--pxe-enrol] [--pxe-files URL] [--pxe-args TEXT]
                                      PXE: /pxe/boot.ipxe?mac= answers agent or local disk
        [--header-timeout SECS] [--body-timeout SECS] [--conns-per-address N]
        [--rate-per-address N] [--rate-per-device N] [--enrol-rate N] [--keep-free BYTES]
        [--open-enrolment]   (labs only: enrol every device without the site secret)
  image add FILE|URL [--min-ram BYTES] [--ca PEM]   register an image (reads its metadata)
  image list
  image remove NAME[:VERSION]|ID      unregister (and delete a repository file)
  image sign NAME:VERSION|ID --key KEYFILE    seal and sign a repository image (captures)
  image url NAME[:VERSION]|ID [--expires SECS] [--base URL]   a signed URL (e.g. for a CDN)
  schedule add (--mac MAC | --group NAME | --all) WHAT [OPTIONS]
      WHAT:    --image NAME[:VERSION] | --capture NAME:VERSION | --reboot | --boot-guest
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
TIME: YYYY-MM-DD HH:MM in ZONE (default $TZ), RFC 3339, @UNIX, now, +10m; see docs/admin-api.md
jobs, devices, transcript and admin list|audit show times in --tz ZONE (default $TZ).
DIR defaults to $IMGSERVER_DATA or /var/lib/imgserver.";

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
    },
    Forget {
        mac: String,
    },
    Transcript {
        mac: String,
        task: Option<u64>,
    },
    Help,
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
    pub command: Command,
}

fn mac(s: &str) -> anyhow::Result<String> {
    normalize_mac(s).ok_or_else(|| anyhow!("{s:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
}

fn num<T: std::str::FromStr>(what: &str, s: &str) -> anyhow::Result<T> {
    s.parse()
        .map_err(|_| anyhow!("{what}: {s:?} is not a number"))
}

/// Stage one: argv to [`Args`], no side effects.
pub fn parse(args: impl IntoIterator<Item = OsString>) -> anyhow::Result<Args> {
    use lexopt::prelude::*;
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
            Value(v) => words.push(v.string()?),
            _ => return Err(arg.unexpected().into()),
        }
    }
    let w: Vec<&str> = words.iter().map(String::as_str).collect();
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
            let (kind, image) = kind.ok_or_else(|| {
                anyhow!("schedule add needs --image, --capture, --reboot or --boot-guest")
            })?;
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
        },
        ["forget", m] => Command::Forget { mac: mac(m)? },
        ["transcript", m] => Command::Transcript { mac: mac(m)?, task },
        _ => bail!("unknown command {:?}\n{USAGE}", words.join(" ")),
    };
    Ok(Args { data, command })
}

/// UTC `YYYY-MM-DD HH:MM:SS`.
pub fn utc(t: u64) -> String {
    let (y, m, d) = crate::tls::civil_from_days((t / 86_400) as i64);
    let s = t % 86_400;
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

/// A plain text table, columns as wide as their widest cell.
struct Table {
    head: Vec<&'static str>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(head: &[&'static str]) -> Table {
        Table {
            head: head.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let n = self.head.len();
        let mut w: Vec<usize> = self.head.iter().map(|h| h.chars().count()).collect();
        for r in &self.rows {
            for (i, c) in r.iter().enumerate().take(n) {
                w[i] = w[i].max(c.chars().count());
            }
        }
        let line = |cells: Vec<&str>| -> String {
            let mut s = String::new();
            for (i, c) in cells.iter().enumerate() {
                if i + 1 == cells.len() {
                    s.push_str(c);
                } else {
                    s.push_str(c);
                    s.push_str(&" ".repeat(w[i] - c.chars().count() + 2));
                }
            }
            s.trim_end().to_string() + "\n"
        };
        let mut out = line(self.head.clone());
        for r in &self.rows {
            out.push_str(&line(r.iter().map(String::as_str).collect()));
        }
        out
    }
}

/// The data directory, created or tightened to 0700: it holds the CA key, the site
/// secrets, the database and captured images (which hold devices' credentials).
fn private_dir(data: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(data)
        .with_context(|| format!("creating the data directory {}", data.display()))?;
    std::fs::set_permissions(data, std::fs::Permissions::from_mode(0o700))
        .with_context(|| format!("making {} private (0700)", data.display()))
}

/// Make `path` 0600 if it exists.
fn private_file(path: &std::path::Path) -> anyhow::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    match std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
            Err(e).with_context(|| format!("making {} private (0600)", path.display()))
        }
        _ => Ok(()),
    }
}

fn open_store(data: &std::path::Path) -> anyhow::Result<SqliteStore> {
    private_dir(data)?;
    let db = data.join("imgserver.db");
    {
        use std::os::unix::fs::OpenOptionsExt;
        // Created 0600 before SQLite opens it (its WAL and shared-memory files take the
        // database file's mode); an older, wider database is tightened.
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .mode(0o600)
            .open(&db)
            .with_context(|| format!("creating {}", db.display()))?;
    }
    for f in ["imgserver.db", "imgserver.db-wal", "imgserver.db-shm"] {
        private_file(&data.join(f))?;
    }
    SqliteStore::open(&db).with_context(|| format!("opening {}", db.display()))
}

/// A server secret in the data directory (`enrol.key`, `url.key`): read, or made (256 bits
/// from the OS, hex, 0600) the first time.
pub fn site_secret(data: &std::path::Path, name: &str) -> anyhow::Result<String> {
    let path = data.join(name);
    match std::fs::read_to_string(&path) {
        Ok(s) if !s.trim().is_empty() => {
            private_file(&path)?;
            Ok(s.trim().to_string())
        }
        Ok(_) => bail!(
            "{} is empty: delete it to have a new secret made",
            path.display()
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let s = crate::api::new_secret();
            crate::tls::write_secret(&path, &format!("{s}\n"))?;
            Ok(s)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

fn now() -> u64 {
    crate::api::now()
}

fn find_image(store: &dyn Store, spec: &str) -> anyhow::Result<crate::store::ImageRow> {
    if let Ok(id) = spec.parse::<u64>() {
        if let Some(img) = store.image_by_id(id)? {
            return Ok(img);
        }
    }
    let (name, version) = match spec.split_once(':') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    store
        .image(name, version)?
        .ok_or_else(|| anyhow!("no image {spec}: see `imgserver image list`"))
}

fn print_validation(report: &[(String, model::Validation)]) {
    let mut t = Table::new(&["DEVICE", "VALIDATION", "NOTES"]);
    for (mac, v) in report {
        let status = if !v.ok() {
            "error"
        } else if !v.warnings.is_empty() {
            "warning"
        } else {
            "success"
        };
        let notes: Vec<String> = v.errors.iter().chain(v.warnings.iter()).cloned().collect();
        t.row(vec![mac.clone(), status.into(), notes.join("; ")]);
    }
    print!("{}", t.render());
}

fn fmt_bytes(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut i = 0;
    while v >= 1024.0 && i + 1 < U.len() {
        v /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", U[i])
    }
}

/// Stage two: carry the command out. Returns the exit code.
pub fn run(args: Args) -> anyhow::Result<i32> {
    let data = args.data;
    match args.command {
        Command::Help => {
            println!("{USAGE}");
            Ok(0)
        }
        Command::Init { names, renew } => {
            std::fs::create_dir_all(&data)
                .with_context(|| format!("creating {}", data.display()))?;
            let names = if names.is_empty() {
                crate::tls::default_names()
            } else {
                names
            };
            private_dir(&data)?;
            let pki = crate::tls::Pki::in_dir(&data);
            crate::tls::init(&pki, &names, renew)?;
            open_store(&data)?;
            site_secret(&data, "enrol.key")?;
            site_secret(&data, "url.key")?;
            std::fs::create_dir_all(data.join("repo"))?;
            println!(
                "server certificate for {} written to {}",
                names.join(", "),
                pki.server_cert.display()
            );
            println!("device CA: {}", pki.ca_cert.display());
            println!("put the CA on every device's boot partition and pass it to the agent (img -checkin -ca=PATH)");
            println!(
                "site enrolment secret: {} (copy it next to ca.pem as enrol.key, or approve each new device with `imgserver approve MAC`)",
                data.join("enrol.key").display()
            );
            Ok(0)
        }
        Command::Serve {
            listen,
            public_url,
            plain,
            interval,
            reload_wait,
            pxe,
            limits,
            open_enrolment,
        } => {
            let store = open_store(&data)?;
            if open_enrolment {
                eprintln!("imgserver: WARNING: --open-enrolment: every device that checks in is enrolled without the site enrolment secret (a lab setting; anyone on the network can take a MAC that is not enrolled yet)");
            }
            let enrol_secret = site_secret(&data, "enrol.key")?;
            let url_key = site_secret(&data, "url.key")?;
            let addr: std::net::SocketAddr = listen
                .parse()
                .with_context(|| format!("--listen {listen}: give ADDRESS:PORT"))?;
            let pki = crate::tls::Pki::in_dir(&data);
            let tls = if plain {
                None
            } else {
                if !pki.exists() {
                    bail!("no server certificate in {}: run `imgserver --data {} init` first (or serve --plain)", data.display(), data.display());
                }
                Some((pki.server_cert.clone(), pki.server_key.clone()))
            };
            let repo = data.join("repo");
            std::fs::create_dir_all(&repo)?;
            let pxe_listen: Option<std::net::SocketAddr> = pxe
                .listen
                .as_deref()
                .map(|l| {
                    l.parse()
                        .with_context(|| format!("--pxe-listen {l}: give ADDRESS:PORT"))
                })
                .transpose()?;
            let pxe_cfg = crate::pxe::PxeConfig {
                enrol_unknown: pxe.enrol,
                dir: data.join("pxe"),
                files_url: pxe.files,
                args: pxe
                    .args
                    .unwrap_or_else(|| crate::pxe::DEFAULT_ARGS.to_string()),
                agent_url: public_url.clone(),
                main_scheme: if plain { "http" } else { "https" },
                main_port: addr.port(),
            };
            pxe_cfg.check()?;
            if let Some(m) = pxe_cfg.missing_files() {
                eprintln!("imgserver: pxe: {m}; until then PXE devices boot their local disk");
            }
            // In-flight uploads live beside the repository, never inside the served tree;
            // the one a crash left behind is gone at the next start.
            let incoming = data.join("incoming");
            let _ = std::fs::remove_dir_all(repo.join(".incoming"));
            let _ = std::fs::remove_dir_all(&incoming);
            std::fs::create_dir_all(&incoming)?;
            let st = Arc::new(crate::api::AppState {
                store: Arc::new(store),
                policy: Policy {
                    checkin_interval: interval,
                    reload_wait,
                },
                repo,
                incoming,
                public_url,
                scheme: if plain { "http" } else { "https" },
                pxe: pxe_cfg,
                enrol_secret,
                url_key,
                limits,
                open_enrolment,
                guards: Default::default(),
            });
            let rt = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            if let Some(l) = pxe_listen {
                let st = st.clone();
                rt.spawn(async move {
                    if let Err(e) = crate::pxe::serve_plain(st, l).await {
                        eprintln!("imgserver: pxe: {e:#}");
                    }
                });
            }
            rt.block_on(crate::api::serve(st, addr, tls))?;
            Ok(0)
        }
        Command::ImageAdd { what, min_ram, ca } => {
            let store = open_store(&data)?;
            let img = if what.starts_with("http://") || what.starts_with("https://") {
                let http = imgengine::source::HttpConfig {
                    ca_file: ca,
                    timeout: None,
                    retries: 2,
                    authorization: None,
                };
                crate::repo::add_url(&store, &what, &http, min_ram)?
            } else {
                crate::repo::add_file(
                    &store,
                    &data.join("repo"),
                    std::path::Path::new(&what),
                    false,
                    min_ram,
                )?
            };
            println!(
                "registered image {} {} (id {}, {}{})",
                img.name,
                img.version,
                img.id,
                if img.facts.whole_disk {
                    "whole disk"
                } else {
                    "partition"
                },
                if img.sealed { ", sealed" } else { "" }
            );
            Ok(0)
        }
        Command::ImageList => {
            let store = open_store(&data)?;
            let mut t = Table::new(&[
                "ID",
                "NAME",
                "VERSION",
                "KIND",
                "SIZE",
                "MIN TARGET",
                "MODELS",
                "SIGNED",
                "WHERE",
            ]);
            for i in store.images()? {
                t.row(vec![
                    i.id.to_string(),
                    i.name,
                    i.version,
                    if i.facts.whole_disk {
                        "disk".into()
                    } else {
                        "partition".into()
                    },
                    i.size.map(fmt_bytes).unwrap_or_else(|| "-".into()),
                    fmt_bytes(i.facts.min_target_size),
                    if i.facts.models.is_empty() {
                        "any".into()
                    } else {
                        i.facts.models.join(",")
                    },
                    match (i.signed_by, &i.captured_from) {
                        (Some(k), _) => k,
                        (None, Some(from)) => format!("no (captured from {from})"),
                        (None, None) if i.sealed => "sealed".into(),
                        (None, None) => "no".into(),
                    },
                    i.url
                        .or(i.file.map(|f| format!("repo/{f}")))
                        .unwrap_or_default(),
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        Command::ImageRemove { spec } => {
            let store = open_store(&data)?;
            let img = find_image(&store, &spec)?;
            crate::repo::remove(&store, &data.join("repo"), &img)?;
            println!("unregistered image {} {}", img.name, img.version);
            Ok(0)
        }
        Command::ImageSign { spec, key } => {
            let store = open_store(&data)?;
            let img = find_image(&store, &spec)?;
            let img = crate::repo::sign(&store, &data.join("repo"), &img, &key)?;
            println!(
                "image {} {} sealed and signed by key {}",
                img.name,
                img.version,
                img.signed_by.as_deref().unwrap_or("?")
            );
            Ok(0)
        }
        Command::ImageUrl {
            spec,
            expires,
            base,
        } => {
            let store = open_store(&data)?;
            let img = find_image(&store, &spec)?;
            let Some(file) = &img.file else {
                bail!(
                    "image {} {} is not in this repository: its URL is {}",
                    img.name,
                    img.version,
                    img.url.unwrap_or_default()
                );
            };
            let key = site_secret(&data, "url.key")?;
            let path = crate::api::signed_repo_path(&key, file, now() + expires);
            match base {
                Some(b) => println!("{}{path}", b.trim_end_matches('/')),
                None => println!("{path}"),
            }
            Ok(0)
        }
        Command::Approve { mac } => {
            let store = open_store(&data)?;
            if store.approve(&mac, now())? {
                println!(
                    "{mac}: enrolment approved; the device gets its jobs at its next check-in"
                );
                Ok(0)
            } else {
                bail!("{mac} has no enrolment waiting for approval: see `imgserver devices`")
            }
        }
        Command::ScheduleAdd {
            selector,
            kind,
            image,
            options,
            note,
        } => {
            let store = open_store(&data)?;
            let image_id = match (kind.as_str(), &image) {
                ("deploy", Some(spec)) => {
                    let img = find_image(&store, spec)?;
                    if let (Some(from), None) = (&img.captured_from, &img.signed_by) {
                        bail!(
                            "image {} {} was captured from {from} and nobody signed it yet: look at it, then `imgserver image sign {}:{} --key KEYFILE`",
                            img.name, img.version, img.name, img.version
                        );
                    }
                    Some(img.id)
                }
                _ => None,
            };
            let job = NewJob {
                kind,
                image: image_id,
                options,
                selector,
                devices: Vec::new(),
                note,
            };
            let (id, report) = store.add_job(&job, now())?;
            println!("job {id} scheduled for {}", job.selector);
            if !report.is_empty() {
                print_validation(&report);
            }
            Ok(if report.iter().any(|(_, v)| !v.ok()) {
                3
            } else {
                0
            })
        }
        Command::ScheduleRemove { job } => {
            open_store(&data)?.remove_job(job)?;
            println!("job {job} removed");
            Ok(0)
        }
        Command::Devices { reload_wait } => {
            let store = open_store(&data)?;
            let policy = Policy {
                reload_wait,
                ..Policy::default()
            };
            let mut t = Table::new(&[
                "MAC",
                "STATE",
                "IMAGE",
                "MODEL",
                "SERIAL",
                "GROUP",
                "LAST CHECK-IN",
                "NOTE",
            ]);
            let now = now();
            for d in store.devices()? {
                let state = model::effective_state(
                    d.state,
                    d.last_seen.unwrap_or(0),
                    d.trouble_since,
                    now,
                    policy.reload_wait,
                );
                t.row(vec![
                    d.mac.clone(),
                    if d.pending {
                        "Pending Approval".into()
                    } else if d.enrolled || d.last_seen.is_some() {
                        state.title().into()
                    } else {
                        "(not enrolled)".into()
                    },
                    d.image
                        .map(|i| format!("{} {}", i.name, i.version))
                        .unwrap_or_else(|| "-".into()),
                    d.model.unwrap_or_else(|| "-".into()),
                    d.serial.unwrap_or_else(|| "-".into()),
                    d.group.unwrap_or_else(|| "-".into()),
                    d.last_seen.map(utc).unwrap_or_else(|| "never".into()),
                    if d.pending {
                        format!(
                            "enrolment from {} without the site secret: `imgserver approve {}` or `imgserver forget {}`",
                            d.enrol_addr.as_deref().unwrap_or("?"),
                            d.mac,
                            d.mac
                        )
                    } else {
                        d.state_reason.unwrap_or_default()
                    },
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        Command::Device {
            mac,
            operational,
            group,
        } => {
            let store = open_store(&data)?;
            if let Some(g) = &group {
                store.set_group(&mac, g.as_deref())?;
                println!("{mac}: group {}", g.as_deref().unwrap_or("(none)"));
            }
            if operational {
                // Seed 003's "Make Device Operational".
                store.set_device_state(&mac, DeviceState::Operational, None)?;
                println!("{mac}: Operational");
            }
            let d = store
                .device(&mac)?
                .ok_or_else(|| anyhow!("no device {mac}: see `imgserver devices`"))?;
            println!("device {} (#{})", d.mac, d.id);
            if d.pending {
                println!(
                    "  enrolment: pending approval (requested from {}): `imgserver approve {}`",
                    d.enrol_addr.as_deref().unwrap_or("?"),
                    d.mac
                );
            }
            println!(
                "  state:   {}{}",
                d.state.title(),
                d.state_reason
                    .map(|r| format!(" ({r})"))
                    .unwrap_or_default()
            );
            println!(
                "  image:   {}",
                d.image
                    .map(|i| format!("{} {}", i.name, i.version))
                    .unwrap_or_else(|| "-".into())
            );
            println!(
                "  model:   {}  serial: {}  RAM: {}",
                d.model.unwrap_or_default(),
                d.serial.unwrap_or_default(),
                fmt_bytes(d.ram_bytes)
            );
            println!("  agent:   {}", d.agent_version.unwrap_or_default());
            println!(
                "  seen:    {}",
                d.last_seen.map(utc).unwrap_or_else(|| "never".into())
            );
            if let Some(inv) = d.inventory {
                let a = &inv.autogenic;
                println!(
                    "  autogenic: SupportImgBackup={} BackupImagePresent={} BackImageVer={}",
                    a.support_img_backup as u8,
                    a.backup_image_present as u8,
                    a.back_image_ver.as_deref().unwrap_or("-")
                );
                let mut t = Table::new(&["DISK", "PART", "START", "SIZE", "FS", "LABEL", "IMAGE"]);
                for disk in &inv.disks {
                    t.row(vec![
                        disk.name.clone(),
                        "-".into(),
                        "-".into(),
                        fmt_bytes(disk.size),
                        disk.table.clone(),
                        disk.model.clone().unwrap_or_default(),
                        disk.image
                            .as_ref()
                            .map(|i| format!("{} {}", i.name, i.version))
                            .unwrap_or_default(),
                    ]);
                    for p in &disk.partitions {
                        t.row(vec![
                            String::new(),
                            p.number.to_string(),
                            p.start.to_string(),
                            fmt_bytes(p.size),
                            p.fs.clone(),
                            p.label.clone().unwrap_or_default(),
                            p.image
                                .as_ref()
                                .map(|i| format!("{} {}", i.name, i.version))
                                .or_else(|| {
                                    (disk.boot_agent_partition == Some(p.number))
                                        .then(|| "(boot agent)".to_string())
                                })
                                .unwrap_or_default(),
                        ]);
                    }
                }
                print!("{}", t.render());
            }
            Ok(0)
        }
        Command::Jobs => {
            let store = open_store(&data)?;
            let mut t = Table::new(&[
                "JOB", "KIND", "IMAGE", "TARGET", "STATE", "CREATED", "PENDING", "RUNNING", "OK",
                "FAILED", "NOTE",
            ]);
            for (j, tasks) in store.jobs()? {
                let count = |f: &dyn Fn(TaskState) -> bool| {
                    tasks.iter().filter(|t| f(t.state)).count().to_string()
                };
                let image = match j.image {
                    Some(id) => store
                        .image_by_id(id)?
                        .map(|i| format!("{} {}", i.name, i.version))
                        .unwrap_or_else(|| format!("#{id}")),
                    None => match (&j.options.capture_name, &j.options.capture_version) {
                        (Some(n), Some(v)) => format!("-> {n} {v}"),
                        _ => "-".into(),
                    },
                };
                t.row(vec![
                    j.id.to_string(),
                    j.kind.clone(),
                    image,
                    j.selector.clone(),
                    shown_state(&j, &tasks),
                    utc(j.created),
                    count(&|s| s == TaskState::Pending),
                    count(&|s| matches!(s, TaskState::Sent | TaskState::Running)),
                    count(&|s| s == TaskState::Succeeded),
                    count(&|s| {
                        matches!(
                            s,
                            TaskState::Failed | TaskState::Rejected | TaskState::Aborted
                        )
                    }),
                    j.note.clone().unwrap_or_default(),
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        Command::Job { id, action } => {
            let store = open_store(&data)?;
            match action.as_deref() {
                Some("abort") => {
                    let n = store.abort_job(id, now())?;
                    println!("job {id} aborted: {n} device(s) not started are cancelled; devices already imaging finish (seed 003)");
                    return Ok(0);
                }
                Some("retry") => return retry(&store, id),
                Some("rollback") => return rollback(&store, id),
                _ => {}
            }
            let (j, tasks) = store
                .job(id)?
                .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
            let image = match j.image {
                Some(i) => store
                    .image_by_id(i)?
                    .map(|i| format!("{} {}", i.name, i.version))
                    .unwrap_or_default(),
                None => "-".into(),
            };
            let o = &j.options;
            println!(
                "job {} ({}), {} for {}, state {}",
                j.id,
                j.kind,
                image,
                j.selector,
                shown_state(&j, &tasks)
            );
            println!(
                "  options: partition {}, backup first {}, then {}, on error {}, {}",
                o.partition.as_deref().unwrap_or("(whole disk)"),
                if o.backup_first { "yes" } else { "no" },
                o.after.name(),
                if o.on_error == OnError::Stop {
                    "stop"
                } else {
                    "continue"
                },
                match o.batch {
                    0 => "all in parallel".to_string(),
                    1 => "sequential".to_string(),
                    n => format!("parallel in batches of {n}"),
                }
            );
            let ok = tasks
                .iter()
                .filter(|t| t.state == TaskState::Succeeded)
                .count();
            let bad = tasks
                .iter()
                .filter(|t| matches!(t.state, TaskState::Failed | TaskState::Rejected))
                .count();
            println!(
                "  devices to be deployed: {}, deployed successfully: {ok}, with errors: {bad}",
                tasks.len()
            );
            let mut t = Table::new(&[
                "TASK", "DEVICE", "STATE", "PROGRESS", "PREVIOUS", "UPDATED", "MESSAGE",
            ]);
            for task in &tasks {
                let prog = match &task.progress {
                    Some(p) => format!(
                        "{}{} {}/s",
                        p.percent.map(|x| format!("{x:.0}% ")).unwrap_or_default(),
                        fmt_bytes(p.bytes),
                        fmt_bytes(p.rate)
                    ),
                    None => "-".into(),
                };
                let mut msg = task.message.clone().unwrap_or_default();
                if task.ignored_results > 0 {
                    msg = format!(
                        "{msg}{}{} later result(s) ignored",
                        if msg.is_empty() { "" } else { "; " },
                        task.ignored_results
                    );
                }
                if !task.validation.warnings.is_empty() {
                    msg = format!(
                        "{msg}{}warnings: {}",
                        if msg.is_empty() { "" } else { "; " },
                        task.validation.warnings.join("; ")
                    );
                }
                t.row(vec![
                    task.id.to_string(),
                    task.mac.clone(),
                    task.state.as_str().into(),
                    prog,
                    task.prev_image
                        .as_ref()
                        .map(|i| format!("{} {}", i.name, i.version))
                        .unwrap_or_else(|| "-".into()),
                    utc(task.updated),
                    msg,
                ]);
            }
            print!("{}", t.render());
            Ok(0)
        }
        Command::Forget { mac } => {
            let store = open_store(&data)?;
            if store.forget(&mac)? {
                println!("{mac}: records deleted; the device enrols again at its next check-in and can be imaged again");
                Ok(0)
            } else {
                bail!("no device {mac}: see `imgserver devices`")
            }
        }
        Command::Transcript { mac, task } => {
            let store = open_store(&data)?;
            for (at, t, line) in store.transcript(&mac, task)? {
                println!(
                    "{} {} {line}",
                    utc(at),
                    t.map(|t| format!("[task {t}]"))
                        .unwrap_or_else(|| "[device]".into())
                );
            }
            Ok(0)
        }
    }
}

/// A job for fixed devices whose tasks all ended is shown as done (or failed); jobs for
/// all devices or a group stay active for devices that enrol later.
fn shown_state(j: &crate::store::JobRow, tasks: &[crate::store::TaskRow]) -> String {
    let fixed = j.selector.starts_with("mac:") || j.selector == "list";
    if j.state == "active" && fixed && !tasks.is_empty() && tasks.iter().all(|t| t.state.is_final())
    {
        if tasks.iter().all(|t| t.state == TaskState::Succeeded) {
            "done".into()
        } else {
            "done with errors".into()
        }
    } else {
        j.state.clone()
    }
}

/// Seed 003: retry a failed job as a new job over the devices that did not succeed.
fn retry(store: &dyn Store, id: u64) -> anyhow::Result<i32> {
    let (j, tasks) = store
        .job(id)?
        .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
    let devices: Vec<u64> = tasks
        .iter()
        .filter(|t| {
            matches!(
                t.state,
                TaskState::Failed | TaskState::Rejected | TaskState::Aborted
            )
        })
        .map(|t| t.device)
        .collect();
    if devices.is_empty() {
        bail!("job {id} has no failed, rejected or aborted device to retry");
    }
    let new = NewJob {
        kind: j.kind.clone(),
        image: j.image,
        options: j.options.clone(),
        selector: "list".into(),
        devices,
        note: Some(format!("retry of job {id}")),
    };
    let (nid, report) = store.add_job(&new, now())?;
    println!("job {nid} retries job {id} on {} device(s)", report.len());
    print_validation(&report);
    Ok(0)
}

/// Seed 003: roll a deployed job back by deploying, on each device it changed, the image
/// that was there before (recorded when the task was sent), as new jobs.
fn rollback(store: &dyn Store, id: u64) -> anyhow::Result<i32> {
    let (j, tasks) = store
        .job(id)?
        .ok_or_else(|| anyhow!("no job {id}: see `imgserver jobs`"))?;
    if j.kind != "deploy" {
        bail!("job {id} is a {} job: only deploy jobs roll back", j.kind);
    }
    let mut by_image: std::collections::BTreeMap<(String, String), Vec<u64>> = Default::default();
    for t in tasks.iter().filter(|t| t.state == TaskState::Succeeded) {
        match &t.prev_image {
            Some(p) => by_image
                .entry((p.name.clone(), p.version.clone()))
                .or_default()
                .push(t.device),
            None => println!("{}: no previous image recorded, not rolled back", t.mac),
        }
    }
    if by_image.is_empty() {
        bail!("job {id}: nothing to roll back (no device with a known previous image)");
    }
    for ((name, version), devices) in by_image {
        let Some(img) = store.image(&name, Some(&version))? else {
            println!("image {name} {version} is no longer registered: register it again to roll {} device(s) back", devices.len());
            continue;
        };
        let mut options = j.options.clone();
        options.backup_first = false;
        let new = NewJob {
            kind: "deploy".into(),
            image: Some(img.id),
            options,
            selector: "list".into(),
            devices,
            note: Some(format!("rollback of job {id}")),
        };
        let (nid, report) = store.add_job(&new, now())?;
        println!(
            "job {nid} rolls {} device(s) back to {name} {version}",
            report.len()
        );
        print_validation(&report);
    }
    Ok(0)
}

/// `imgserver` entry point: parse, run, map errors to exit codes (1 error, 2 usage).
pub fn main_with_args(args: impl IntoIterator<Item = OsString>) -> i32 {
    // Everything imgserver creates (database, keys, uploads, repository files) is private
    // to its user.
    nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
    // `admin ...`, the changing commands and the job window options: the admin core.
    let args: Vec<OsString> = args.into_iter().collect();
    if let Some(code) = crate::admin::cli::intercept(&args) {
        return code;
    }
    let parsed = match parse(args) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            return 2;
        }
    };
    match run(parsed) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("imgserver: {e:#}");
            1
        }
    }
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
                action: Some("rollback".into())
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
    fn tables_align() {
        let mut t = Table::new(&["A", "LONGER"]);
        t.row(vec!["wide cell".into(), "x".into()]);
        assert_eq!(t.render(), "A          LONGER\nwide cell  x\n");
    }

    #[test]
    fn utc_formats() {
        assert_eq!(utc(0), "1970-01-01 00:00:00");
        assert_eq!(utc(1_767_225_600 + 3661), "2026-01-01 01:01:01");
    }
}
