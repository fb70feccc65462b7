//! Multicast sessions through the admin core: the command line (`imgserver session`), the
//! admin API (`/api/v1/admin/sessions`) and the web console start, list and stop them here,
//! with the same checks. Starting one creates the devices' job (validated and audited as a
//! job) and the session row the serving process takes ([`crate::mcast`]); stopping one
//! raises the row's stop flag and aborts the job's pending tasks (audited as the job's
//! abort).

use serde::{Deserialize, Serialize};

use super::{now, Actor, Admin, AdminError, JobRequest, Result, Role};
use crate::mcast::{self, ClientRow, Settings};
use crate::model::JobOptions;
use crate::protocol::After;

/// A session to start (the body of `POST /api/v1/admin/sessions`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionRequest {
    /// The session's name (1..=64 bytes, no spaces or control characters).
    pub name: String,
    /// The image: `NAME[:VERSION]` or id; it must be in the server's repository.
    pub image: String,
    /// The devices (MAC addresses), or `all`.
    #[serde(default)]
    pub macs: Vec<String>,
    #[serde(default)]
    pub all: bool,
    /// Start when this many devices registered (default: the number of `macs`).
    #[serde(default)]
    pub clients: Option<usize>,
    /// Start this many minutes after the last registration (default 5).
    #[serde(default)]
    pub timeout_min: Option<u64>,
    #[serde(default)]
    pub throttle_ms: u32,
    #[serde(default)]
    pub latejoin: bool,
    /// Group address override (multicast IPv4).
    #[serde(default)]
    pub addr: Option<String>,
    /// The interface the server sends on (default: the first one up).
    #[serde(default)]
    pub interface: Option<String>,
    /// Where the devices write (as for a deploy job).
    #[serde(default)]
    pub disk: Option<String>,
    #[serde(default)]
    pub part: Option<String>,
}

/// What starting a session made.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStarted {
    pub name: String,
    pub job: u64,
    /// `NAME VERSION` of the image sent.
    pub image: String,
    /// The devices (MACs, or `all devices`).
    pub devices: String,
    /// When the master starts sending, in words.
    pub starts: String,
    /// Devices kept out by the job's validation (each with its reason).
    pub blocked: Vec<String>,
}

/// One task of a session's job, as a session shows it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionTask {
    pub mac: String,
    pub id: u64,
    pub state: String,
    pub percent: Option<f32>,
    pub message: Option<String>,
}

/// A session as the API and the console show it.
#[derive(Debug, Clone, Serialize)]
pub struct SessionView {
    pub name: String,
    /// `waiting`, `running`, `done`, `stopped` or `failed`.
    pub state: String,
    pub message: String,
    pub job: u64,
    pub image_id: u64,
    /// `NAME VERSION` of the image, or `image ID` once it is gone.
    pub image: String,
    pub settings: Settings,
    /// The devices registered with the master, with their progress and result.
    pub clients: Vec<ClientRow>,
    /// The job's tasks: the devices named, including those that never joined.
    pub tasks: Vec<SessionTask>,
    pub stop_requested: bool,
    pub created: u64,
    pub updated: u64,
}

/// What stopping a session did.
#[derive(Debug, Clone, Serialize)]
pub struct SessionStopped {
    pub name: String,
    pub job: u64,
    /// Pending tasks of the job cancelled.
    pub cancelled: usize,
}

fn invalid(m: String) -> AdminError {
    AdminError::Invalid(m)
}

impl SessionRequest {
    /// Check everything that needs no database: the name, the devices, the numbers, the
    /// address. Normalises the MACs (sorted, deduplicated).
    pub fn check(&mut self) -> Result<()> {
        imgengine::multicast::check_name(&self.name)
            .map_err(|e| invalid(format!("session name: {e}")))?;
        if self.image.trim().is_empty() {
            return Err(invalid(format!(
                "session {} needs an image (NAME[:VERSION] or id)",
                self.name
            )));
        }
        if self.macs.is_empty() != self.all {
            return Err(invalid(format!(
                "session {}: name the devices (MAC addresses) or all devices, not both or neither",
                self.name
            )));
        }
        let mut macs = Vec::with_capacity(self.macs.len());
        for m in &self.macs {
            macs.push(crate::protocol::normalize_mac(m).ok_or_else(|| {
                invalid(format!("{m:?} is not a MAC address (aa:bb:cc:dd:ee:ff)"))
            })?);
        }
        macs.sort();
        macs.dedup();
        self.macs = macs;
        if self.clients == Some(0) {
            return Err(invalid("clients 0: give at least 1".into()));
        }
        if let Some(a) = &self.addr {
            mcast::check_addr(a).map_err(|e| invalid(format!("{e}")))?;
        }
        Ok(())
    }

    fn settings(&self) -> Settings {
        Settings {
            clients: self.clients.or((!self.all).then_some(self.macs.len())),
            timeout_min: self.timeout_min,
            throttle_ms: self.throttle_ms,
            latejoin: self.latejoin,
            addr: self.addr.clone(),
            interface: self.interface.clone(),
        }
    }
}

impl Admin {
    /// Start a multicast session the serving process runs as master.
    pub fn start_session(&self, by: &Actor, req: &SessionRequest) -> Result<SessionStarted> {
        by.require(Role::Operator, "starting multicast sessions")?;
        let mut req = req.clone();
        req.check()?;
        let conn = mcast::open_db(&self.data)?;
        mcast::check_free(&conn, &req.name).map_err(|e| AdminError::Conflict(format!("{e}")))?;
        let img = self.find_image(&req.image)?;
        if img.file.is_none() {
            return Err(invalid(format!(
                "image {} {} is registered by URL: the server sends only images in its repository (add the file to the repository)",
                img.name, img.version
            )));
        }
        let settings = req.settings();
        let target = match (req.all, req.macs.as_slice()) {
            (true, _) => "all".to_string(),
            (false, [one]) => format!("mac:{one}"),
            (false, many) => format!("macs:{}", many.join(",")),
        };
        let job = JobRequest {
            target,
            kind: "session".into(),
            image: Some(img.id.to_string()),
            options: JobOptions {
                disk: req.disk.clone(),
                partition: req.part.clone(),
                backup_first: false,
                after: After::NoReboot,
                on_error: crate::model::OnError::Continue,
                session: Some(req.name.clone()),
                session_addr: settings.addr.clone(),
                ..Default::default()
            },
            note: Some(format!("multicast session {}", req.name)),
            ..Default::default()
        };
        let made = self.create_job(by, &job)?;
        let id = made.job.ok_or_else(|| {
            AdminError::Other(anyhow::anyhow!(
                "no job was created for session {}",
                req.name
            ))
        })?;
        mcast::insert(&conn, &req.name, id, img.id, &settings, now())?;
        let wait = settings.timeout_min.unwrap_or(5);
        Ok(SessionStarted {
            name: req.name.clone(),
            job: id,
            image: format!("{} {}", img.name, img.version),
            devices: if req.all {
                "all devices".into()
            } else {
                req.macs.join(", ")
            },
            starts: match settings.clients {
                Some(n) => format!(
                    "when {n} device(s) registered or {wait} min after the last registration"
                ),
                None => format!("{wait} min after the last registration"),
            },
            blocked: made.blocked.iter().map(|b| b.to_string()).collect(),
        })
    }

    /// Every session, oldest first, with its job's tasks.
    pub fn sessions(&self, by: &Actor) -> Result<Vec<SessionView>> {
        by.require(Role::Viewer, "listing multicast sessions")?;
        let conn = mcast::open_db(&self.data)?;
        let mut out = Vec::new();
        for s in mcast::list(&conn)? {
            let image = self
                .store
                .image_by_id(s.image)?
                .map(|i| format!("{} {}", i.name, i.version))
                .unwrap_or_else(|| format!("image {}", s.image));
            let tasks = match self.store.job(s.job)? {
                Some((_, tasks)) => tasks
                    .into_iter()
                    .map(|k| SessionTask {
                        percent: if k.state == crate::model::TaskState::Succeeded {
                            Some(100.0)
                        } else {
                            k.progress.as_ref().and_then(|p| p.percent)
                        },
                        mac: k.mac,
                        id: k.id,
                        state: k.state.as_str().into(),
                        message: k.message,
                    })
                    .collect(),
                None => Vec::new(),
            };
            out.push(SessionView {
                name: s.name,
                state: s.state,
                message: s.message,
                job: s.job,
                image_id: s.image,
                image,
                settings: s.settings,
                clients: s.clients,
                tasks,
                stop_requested: s.stop,
                created: s.created,
                updated: s.updated,
            });
        }
        Ok(out)
    }

    /// End a session: the master tells the group it is over (devices in it fail with that
    /// reason) and the job's pending tasks are cancelled.
    pub fn stop_session(&self, by: &Actor, name: &str) -> Result<SessionStopped> {
        by.require(Role::Operator, "stopping multicast sessions")?;
        let conn = mcast::open_db(&self.data)?;
        match mcast::get(&conn, name)? {
            None => {
                return Err(AdminError::NotFound(format!(
                    "no session {name}: see the session list"
                )))
            }
            Some(s) if s.is_over() => {
                return Err(AdminError::Conflict(format!(
                    "session {} is already {}: {}",
                    s.name, s.state, s.message
                )))
            }
            Some(_) => {}
        }
        let s = mcast::request_stop(&conn, name, now())?;
        let cancelled = match self.abort_job(by, s.job) {
            Ok(n) => n,
            Err(AdminError::NotFound(_)) => 0,
            Err(e) => return Err(e),
        };
        Ok(SessionStopped {
            name: s.name,
            job: s.job,
            cancelled,
        })
    }
}
