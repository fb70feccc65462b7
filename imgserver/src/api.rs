//! The HTTP(S) API devices talk to (protocol v1, `docs/protocol.md`), and the image
//! repository under `/repo/`.
//!
//! Handlers are thin: they authenticate the device (its credential's SHA-256 is looked up;
//! the server never stores the credential itself), hand the request to the [`Store`] on a
//! blocking thread (SQLite is synchronous), and turn rows into protocol messages.
//!
//! Everything from the network is hostile (issue 9): enrolment needs the site enrolment
//! secret or the administrator's approval; `/repo/` answers only a device fetching the image
//! of its own running task, or a short-lived signed URL; capture uploads are spent keys with
//! a size cap; slow or half-sent requests are dropped on timers; each source address and
//! each device has a request budget ([`Limits`]).

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, SocketAddr};
use std::path::{Path as FsPath, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use axum::body::Body;
use axum::extract::{ConnectInfo, DefaultBodyLimit, Path, Query, Request, State};
use axum::http::{HeaderMap, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::protocol::{
    Action, CaptureSpec, CheckIn, CheckInReply, ConvertSpec, DeploySpec, ErrorReply, ImageRef,
    ProgressReply, ProgressReport, ResultReply, SessionSpec, Task, TaskKind, TaskResult,
    CHECKIN_PATH, PROTOCOL_VERSION,
};
use crate::store::{
    CheckInSecrets, DeviceRow, ImageRow, JobRow, Policy, Store, StoreError, TaskRow,
};

/// The budgets that keep one client (or a flood from one address) from taking the server.
/// Zero turns a budget off.
#[derive(Debug, Clone, PartialEq)]
pub struct Limits {
    /// A request's headers (and a TLS handshake) must arrive within this time.
    pub header_timeout: Duration,
    /// An API request's body must arrive whole within this time; an upload may not pause
    /// longer than this between two pieces.
    pub body_timeout: Duration,
    /// Open connections per source address.
    pub conns_per_address: usize,
    /// Requests per second per source address (bursts of up to 4 s worth).
    pub requests_per_address: u32,
    /// Requests per second per device (bursts of up to 4 s worth).
    pub requests_per_device: u32,
    /// Enrolments without the site enrolment secret, per minute per source address.
    pub enrolments_per_address: u32,
    /// Bytes an upload must leave free on the repository's file system.
    pub keep_free: u64,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_timeout: Duration::from_secs(10),
            body_timeout: Duration::from_secs(60),
            conns_per_address: 64,
            requests_per_address: 50,
            requests_per_device: 10,
            enrolments_per_address: 10,
            keep_free: 256 << 20,
        }
    }
}

/// Token buckets by key (an address, a device).
pub struct Buckets<K> {
    map: HashMap<K, (f64, Instant)>,
}

impl Default for Guards {
    fn default() -> Self {
        Guards {
            per_address: Mutex::new(Buckets::default()),
            per_device: Mutex::new(Buckets::default()),
            enrolments: Mutex::new(Buckets::default()),
            reserved: Mutex::new(0),
            uploading: Mutex::new(HashSet::new()),
        }
    }
}

impl<K> Default for Buckets<K> {
    fn default() -> Self {
        Buckets {
            map: HashMap::new(),
        }
    }
}

impl<K: std::hash::Hash + Eq + Clone> Buckets<K> {
    /// Take one token from `key`'s bucket (refilled at `per_sec`, holding at most `burst`).
    pub fn take(&mut self, key: &K, per_sec: f64, burst: f64, now: Instant) -> bool {
        if self.map.len() > 100_000 {
            // Forget the buckets that have refilled: they hold no information.
            self.map
                .retain(|_, (t, at)| *t + now.duration_since(*at).as_secs_f64() * per_sec < burst);
        }
        let (tokens, at) = self.map.entry(key.clone()).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * per_sec).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// The state of the limits shared by all requests.
pub struct Guards {
    per_address: Mutex<Buckets<IpAddr>>,
    per_device: Mutex<Buckets<u64>>,
    enrolments: Mutex<Buckets<IpAddr>>,
    /// Bytes promised to uploads in flight (free space is shared by all of them).
    reserved: Mutex<u64>,
    /// Capture tasks with an upload in flight (one at a time each).
    uploading: Mutex<HashSet<u64>>,
}

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub policy: Policy,
    /// The image repository directory (served at `/repo/`).
    pub repo: PathBuf,
    /// Where uploads are written until registered: outside the served tree.
    pub incoming: PathBuf,
    /// The base URL devices reach this server at (for image and upload URLs); None: taken
    /// from each request's Host header.
    pub public_url: Option<String>,
    /// `https` or `http`, for URLs built from the Host header.
    pub scheme: &'static str,
    /// The PXE boot decision's settings (`crate::pxe`).
    pub pxe: crate::pxe::PxeConfig,
    /// The site enrolment secret (`enrol.key`): devices prove it to enrol without approval.
    pub enrol_secret: String,
    /// The key of signed repository URLs (`url.key`).
    pub url_key: String,
    pub limits: Limits,
    /// Labs only (`serve --open-enrolment`): every enrolment counts as proven.
    pub open_enrolment: bool,
    pub guards: Guards,
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// An API error: a status and a message naming the way out, sent as [`ErrorReply`].
#[derive(Debug)]
pub struct ApiError(StatusCode, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(ErrorReply { error: self.1 })).into_response()
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> Self {
        let status = match &e {
            StoreError::AlreadyEnrolled(_) => StatusCode::CONFLICT,
            StoreError::BadCredential => StatusCode::UNAUTHORIZED,
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            StoreError::Db(_) | StoreError::Json(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        ApiError(status, e.to_string())
    }
}

impl From<anyhow::Error> for ApiError {
    fn from(e: anyhow::Error) -> Self {
        ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e:#}"))
    }
}

type ApiResult<T> = Result<T, ApiError>;

/// SHA-256 hex of a secret (credentials and upload keys are stored only hashed; a 256-bit
/// random secret needs no salt or slow hash).
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A fresh 256-bit secret from the OS, hex.
pub fn new_secret() -> String {
    let mut b = [0u8; 32];
    getrandom::getrandom(&mut b).expect("the OS random source is available");
    hex::encode(b)
}

pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers
        .get(axum::http::header::AUTHORIZATION)?
        .to_str()
        .ok()?;
    let token = v
        .strip_prefix("Bearer ")
        .or_else(|| v.strip_prefix("bearer "))?;
    Some(token.trim().to_string())
}

/// Storage calls queue in arrival order (tokio's semaphore is FIFO) with a few in flight:
/// the store has one writer anyway, and hundreds of blocking threads racing for its mutex
/// let unlucky check-ins wait for seconds under load. Four keeps the store busy while one
/// call's thread hand-off is under way (measured with bench/checkin_load: 1 permit halved
/// the throughput, unbounded doubled the p99).
static STORE_TURN: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(4);

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, StoreError> + Send + 'static,
) -> ApiResult<T> {
    let _turn = STORE_TURN.acquire().await.map_err(|e| {
        ApiError(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("storage queue: {e}"),
        )
    })?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| {
            ApiError(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("storage task: {e}"),
            )
        })?
        .map_err(ApiError::from)
}

/// The enrolled, approved device whose credential the request carries (within its request
/// budget).
async fn authenticate(st: &AppState, headers: &HeaderMap) -> ApiResult<DeviceRow> {
    let Some(token) = bearer(headers) else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "no device credential: check in first to enrol".into(),
        ));
    };
    let store = st.store.clone();
    let hash = hash_secret(&token);
    let dev = blocking(move || store.device_by_credential(&hash))
        .await?
        .ok_or_else(|| ApiError::from(StoreError::BadCredential))?;
    device_budget(st, dev.id)?;
    if dev.pending {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!(
                "device {} awaits the administrator's approval (`imgserver approve {}`)",
                dev.mac, dev.mac
            ),
        ));
    }
    Ok(dev)
}

fn too_many(what: String) -> ApiError {
    ApiError(StatusCode::TOO_MANY_REQUESTS, what)
}

/// One request from device `id` against its budget.
fn device_budget(st: &AppState, id: u64) -> ApiResult<()> {
    let r = st.limits.requests_per_device;
    if r > 0 && !lock(&st.guards.per_device).take(&id, r as f64, 4.0 * r as f64, Instant::now()) {
        return Err(too_many(format!(
            "device {id} sends more than {r} requests per second: slow down"
        )));
    }
    Ok(())
}

/// The signature of a repository URL: HMAC-SHA256 over `GET /repo/<file>` and the expiry
/// (Unix seconds) under the server's URL key, hex.
pub fn repo_url_signature(url_key: &str, file: &str, expires: u64) -> String {
    use hmac::Mac;
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(url_key.trim().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(format!("/repo/{file}\n{expires}").as_bytes());
    hex::encode(m.finalize().into_bytes())
}

/// The path and query of a signed repository URL valid until `expires`.
pub fn signed_repo_path(url_key: &str, file: &str, expires: u64) -> String {
    format!(
        "/repo/{file}?expires={expires}&sig={}",
        repo_url_signature(url_key, file, expires)
    )
}

fn check_repo_signature(url_key: &str, file: &str, expires: u64, sig: &str) -> bool {
    use hmac::Mac;
    let Ok(sig) = hex::decode(sig) else {
        return false;
    };
    let mut m = hmac::Hmac::<Sha256>::new_from_slice(url_key.trim().as_bytes())
        .expect("HMAC takes keys of any length");
    m.update(format!("/repo/{file}\n{expires}").as_bytes());
    m.verify_slice(&sig).is_ok()
}

fn base_url(st: &AppState, headers: &HeaderMap) -> String {
    if let Some(u) = &st.public_url {
        return u.trim_end_matches('/').to_string();
    }
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|h| h.to_str().ok())
        .unwrap_or("localhost");
    format!("{}://{host}", st.scheme)
}

/// The protocol message for a task row.
fn wire_task(
    task: &TaskRow,
    job: &JobRow,
    image: Option<&ImageRow>,
    base: &str,
    upload_key: Option<&str>,
) -> Option<Task> {
    let o = &job.options;
    let image_ref = || -> Option<ImageRef> {
        let img = image?;
        let url = match (&img.url, &img.file) {
            (Some(u), _) => u.clone(),
            (None, Some(f)) => format!("{base}/repo/{f}"),
            (None, None) => return None,
        };
        Some(ImageRef {
            name: img.name.clone(),
            version: img.version.clone(),
            url,
            size: img.size,
            autogenic: img.autogenic,
        })
    };
    let kind = match job.kind.as_str() {
        "deploy" => TaskKind::Deploy(DeploySpec {
            image: image_ref()?,
            disk: o.disk.clone(),
            partition: o.partition.clone(),
            preserve: o.preserve.clone(),
            backup_first: o.backup_first,
            after: o.after,
            from_backup: o.from_backup,
            fetch_to_backup: o.from_backup && o.fetch_to_backup,
        }),
        // Seed 001 step 4 (`crate::autogenic`): the flash size the job was planned for.
        "convert" => TaskKind::Convert(ConvertSpec {
            image: image_ref()?,
            disk: o.disk.clone(),
            backup_size: o.backup_size,
            flash_size: o.flash_size?,
        }),
        "capture" => TaskKind::Capture(CaptureSpec {
            disk: o.disk.clone(),
            partition: o.partition.clone(),
            name: capture_target(task, job).0,
            version: capture_target(task, job).1,
            models: Vec::new(),
            description: Some(format!("captured from {} by job {}", task.mac, job.id)),
            comp: o.comp.unwrap_or(1),
            upload_url: match upload_key {
                Some(k) => format!("{base}/api/v1/tasks/{}/upload?key={k}", task.id),
                None => format!("{base}/api/v1/tasks/{}/upload", task.id),
            },
        }),
        // `crate::mcast`: the server's master sends the image; its URL is the fallback.
        "session" => TaskKind::Session(Box::new(SessionSpec {
            name: o.session.clone()?,
            addr: o.session_addr.clone(),
            image: image_ref()?,
            disk: o.disk.clone(),
            partition: o.partition.clone(),
        })),
        "reboot" => TaskKind::Reboot,
        "boot_guest" => TaskKind::BootGuest,
        _ => return None,
    };
    Some(Task {
        id: task.id,
        job: job.id,
        kind,
    })
}

/// The name and version a capture task's image gets: the job's, never the upload's.
pub fn capture_target(task: &TaskRow, job: &JobRow) -> (String, String) {
    let o = &job.options;
    (
        o.capture_name
            .clone()
            .unwrap_or_else(|| format!("capture-{}", task.mac.replace(':', ""))),
        o.capture_version
            .clone()
            .unwrap_or_else(|| task.id.to_string()),
    )
}

async fn checkin(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> ApiResult<Json<CheckInReply>> {
    let req: CheckIn = crate::protocol::decode_checkin(&body)
        .map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.0))?;
    if req.protocol != PROTOCOL_VERSION {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!(
                "protocol version {} is not spoken here (this server speaks {PROTOCOL_VERSION})",
                req.protocol
            ),
        ));
    }
    let presented = bearer(&headers).map(|t| hash_secret(&t));
    // Without a credential: an enrolment. With a valid proof of the site secret it is
    // enrolled at once; otherwise it waits for approval and counts against the address's
    // enrolment budget (so nobody fills the pending list).
    let enrol_proof_ok = presented.is_none()
        && (st.open_enrolment
            || req.enrol_proof.as_deref().is_some_and(|p| {
                crate::protocol::check_enrolment_proof(&st.enrol_secret, &req.device.mac, p)
            }));
    if presented.is_none() && !enrol_proof_ok {
        let r = st.limits.enrolments_per_address;
        if r > 0
            && !lock(&st.guards.enrolments).take(
                &peer.ip(),
                r as f64 / 60.0,
                r as f64,
                Instant::now(),
            )
        {
            return Err(too_many(format!(
                "more than {r} enrolments without the site enrolment secret per minute from {}: wait, or put enrol.key on the devices' boot partition",
                peer.ip()
            )));
        }
    }
    if let Some(mac) = crate::protocol::normalize_mac(&req.device.mac) {
        // A device's budget by its MAC (cheap: no database look-up before the limit).
        let key = u64::from_str_radix(&mac.replace(':', ""), 16).unwrap_or(0);
        device_budget(&st, key | 1 << 63)?;
    }
    let credential = new_secret();
    let upload_key = new_secret();
    let secrets = CheckInSecrets {
        presented,
        new_credential: hash_secret(&credential),
        new_upload_key: hash_secret(&upload_key),
        enrol_proof_ok,
        source: peer.ip().to_string(),
    };
    let base = base_url(&st, &headers);
    let (store, policy) = (st.store.clone(), st.policy.clone());
    let d = blocking(move || store.checkin(&req, &secrets, now(), &policy)).await?;
    let action = match d
        .task
        .as_ref()
        .and_then(|(t, j, img)| wire_task(t, j, img.as_ref(), &base, Some(&upload_key)))
    {
        Some(task) => Action::Run { task },
        None => Action::Wait {
            seconds: st.policy.checkin_interval,
        },
    };
    Ok(Json(CheckInReply {
        protocol: PROTOCOL_VERSION,
        device: d.device,
        credential: d.enrolled.then_some(credential),
        acked: d.acked,
        pending_approval: d.pending,
        action,
    }))
}

async fn get_task(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult<Json<Task>> {
    let dev = authenticate(&st, &headers).await?;
    let store = st.store.clone();
    let found = blocking(move || store.task_of_device(dev.id, id)).await?;
    let not_found = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("task {id} is not a task of this device"),
        )
    };
    let (t, j, img) = found.ok_or_else(not_found)?;
    // A capture's upload key is handed out only in check-in replies.
    wire_task(&t, &j, img.as_ref(), &base_url(&st, &headers), None)
        .map(Json)
        .ok_or_else(not_found)
}

async fn progress(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(p): Json<ProgressReport>,
) -> ApiResult<Json<ProgressReply>> {
    let dev = authenticate(&st, &headers).await?;
    let store = st.store.clone();
    let (recorded, abort) = blocking(move || store.record_progress(dev.id, id, &p, now())).await?;
    Ok(Json(ProgressReply { recorded, abort }))
}

async fn result(
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Json(r): Json<TaskResult>,
) -> ApiResult<Json<ResultReply>> {
    if r.task != id {
        return Err(ApiError(
            StatusCode::BAD_REQUEST,
            format!("result for task {} posted to task {id}", r.task),
        ));
    }
    crate::protocol::check_result(&r).map_err(|e| ApiError(StatusCode::BAD_REQUEST, e.0))?;
    let dev = authenticate(&st, &headers).await?;
    let store = st.store.clone();
    let recorded = blocking(move || store.record_result(dev.id, &r, now())).await?;
    Ok(Json(ResultReply { recorded }))
}

#[derive(Deserialize)]
struct UploadQuery {
    key: Option<String>,
}

/// How large a capture of `source` bytes can be: the data uncompressed plus the format's
/// headers and manifest (a generous 1/16 and 16 MiB).
pub fn capture_cap(source: u64) -> u64 {
    source.saturating_add(source / 16).saturating_add(16 << 20)
}

/// Free bytes for unprivileged writers on the file system holding `dir`.
fn free_space(dir: &FsPath) -> std::io::Result<u64> {
    let v = nix::sys::statvfs::statvfs(dir).map_err(std::io::Error::from)?;
    Ok((v.blocks_available() as u64).saturating_mul(v.fragment_size() as u64))
}

/// Space promised to one upload; given back when it ends, however it ends.
struct Reservation<'a> {
    st: &'a AppState,
    bytes: u64,
    task: u64,
}

impl Drop for Reservation<'_> {
    fn drop(&mut self) {
        let mut r = lock(&self.st.guards.reserved);
        *r = r.saturating_sub(self.bytes);
        lock(&self.st.guards.uploading).remove(&self.task);
    }
}

fn refused(status: StatusCode, what: String) -> ApiError {
    ApiError(status, what)
}

/// A capture's image arrives here (chunked PUT from `imgengine::source::upload`). The key
/// is spent before a byte is read; the body goes to `incoming/` (never served) up to the
/// task's cap and the free space, is checked by reading its metadata (the name and version
/// the job gave, unsigned) and registered as a captured image.
async fn upload(
    State(st): State<Arc<AppState>>,
    Path(id): Path<u64>,
    Query(q): Query<UploadQuery>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult<Response> {
    let key = q.key.ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "upload without key: use the URL from the capture task".into(),
        )
    })?;
    if lock(&st.guards.uploading).contains(&id) {
        return Err(refused(
            StatusCode::CONFLICT,
            format!("task {id} already has an upload in progress"),
        ));
    }
    let store = st.store.clone();
    let hash = hash_secret(&key);
    let Some((task, job)) = blocking(move || store.take_upload_key(id, &hash)).await? else {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("no running capture task {id} with this upload key (a key works once: check in again for a new one)"),
        ));
    };
    let (name, version) = capture_target(&task, &job);
    let store = st.store.clone();
    let mac = task.mac.clone();
    let device = blocking(move || store.device(&mac)).await?;
    let Some(source) = crate::model::capture_source_size(
        &job.options,
        device.as_ref().and_then(|d| d.inventory.as_ref()),
    ) else {
        return Err(refused(
            StatusCode::CONFLICT,
            format!("task {id}: the device's inventory does not show what it captures; check in again first"),
        ));
    };
    let cap = capture_cap(source);
    tokio::fs::create_dir_all(&st.incoming)
        .await
        .with_context(|| format!("creating {}", st.incoming.display()))?;
    // Reserve the space before reading: uploads in flight share what is free.
    let reservation = {
        let free = free_space(&st.incoming)
            .with_context(|| format!("free space of {}", st.incoming.display()))?;
        let mut reserved = lock(&st.guards.reserved);
        let mut uploading = lock(&st.guards.uploading);
        if !uploading.insert(id) {
            return Err(refused(
                StatusCode::CONFLICT,
                format!("task {id} already has an upload in progress"),
            ));
        }
        let room = free
            .saturating_sub(st.limits.keep_free)
            .saturating_sub(*reserved);
        let bytes = cap.min(room);
        *reserved += bytes;
        Reservation {
            st: &st,
            bytes,
            task: id,
        }
    };
    let limit = reservation.bytes;
    let why = |total: u64| {
        if limit < cap {
            format!("the repository has room for {limit} more bytes (keeping {} free): free some space, then schedule the capture again", st.limits.keep_free)
        } else {
            format!("task {id} captures {source} bytes, so its image cannot exceed {cap} bytes (got at least {total})")
        }
    };
    if let Some(len) = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    {
        if len > limit {
            return Err(refused(StatusCode::PAYLOAD_TOO_LARGE, why(len)));
        }
    }
    let part = st.incoming.join(format!("task-{id}.part"));
    let _ = tokio::fs::remove_file(&part).await;
    let mut f = tokio::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    let idle = st.limits.body_timeout;
    let failed: Option<ApiError> = loop {
        let next = match tokio::time::timeout(idle, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                break Some(refused(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "upload of task {id} stalled for {}s after {total} bytes",
                        idle.as_secs()
                    ),
                ))
            }
        };
        let chunk = match next {
            None => break None,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                break Some(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("upload of task {id} broke off after {total} bytes: {e}"),
                ))
            }
        };
        total += chunk.len() as u64;
        if total > limit {
            break Some(refused(StatusCode::PAYLOAD_TOO_LARGE, why(total)));
        }
        if let Err(e) = f.write_all(&chunk).await {
            break Some(
                anyhow::Error::new(e)
                    .context(format!("writing {}", part.display()))
                    .into(),
            );
        }
    };
    if let Some(e) = failed {
        drop(f);
        let _ = tokio::fs::remove_file(&part).await;
        eprintln!("imgserver: upload of task {id} refused: {}", e.1);
        return Err(e);
    }
    f.sync_all()
        .await
        .with_context(|| format!("syncing {}", part.display()))?;
    drop(f);
    let origin = crate::repo::CaptureOrigin {
        name,
        version,
        from: format!("{} task {id}", task.mac),
    };
    let (store, repo, p) = (st.store.clone(), st.repo.clone(), part.clone());
    let added =
        tokio::task::spawn_blocking(move || crate::repo::add_capture(&*store, &repo, &p, origin))
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("registering the upload: {e}"),
                )
            })?;
    drop(reservation);
    match added {
        Ok(img) => {
            eprintln!(
                "imgserver: task {id} uploaded image {} {} ({total} bytes)",
                img.name, img.version
            );
            Ok((
                StatusCode::CREATED,
                Json(
                    serde_json::json!({"image": img.name, "version": img.version, "bytes": total}),
                ),
            )
                .into_response())
        }
        Err(e) => {
            let _ = tokio::fs::remove_file(&part).await;
            Err(ApiError(
                StatusCode::UNPROCESSABLE_ENTITY,
                format!("uploaded image of task {id} was not registered: {e:#}"),
            ))
        }
    }
}

#[derive(Deserialize)]
struct RepoQuery {
    expires: Option<u64>,
    sig: Option<String>,
}

/// A repository file name we serve: one path segment of `[A-Za-z0-9._-]` that does not
/// start with a dot (no dotfiles, no temporary files, no way out of the directory).
pub fn servable_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 255
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

/// `GET/HEAD /repo/<file>`: for the device whose running deploy task uses this image (its
/// credential as a bearer token), or with a valid signed URL (`imgserver image url`).
/// Then tower-http's ServeDir answers (Range, HEAD, conditional requests).
async fn repo_file(
    State(st): State<Arc<AppState>>,
    Path(file): Path<String>,
    Query(q): Query<RepoQuery>,
    headers: HeaderMap,
    req: Request,
) -> ApiResult<Response> {
    let not_found = || {
        ApiError(
            StatusCode::NOT_FOUND,
            format!("no image file {file:?} in the repository"),
        )
    };
    if !servable_name(&file) {
        return Err(not_found());
    }
    match (q.expires, q.sig.as_deref()) {
        (Some(expires), Some(sig)) => {
            if !check_repo_signature(&st.url_key, &file, expires, sig) {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("the signature of this URL for /repo/{file} is not valid"),
                ));
            }
            if expires < now() {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!("this signed URL for /repo/{file} expired: ask for a new one (`imgserver image url`)"),
                ));
            }
        }
        _ => {
            let dev = authenticate(&st, &headers).await?;
            let (store, f) = (st.store.clone(), file.clone());
            if !blocking(move || store.device_may_fetch(dev.id, &f)).await? {
                return Err(ApiError(
                    StatusCode::FORBIDDEN,
                    format!(
                        "device {} has no running task that deploys /repo/{file}",
                        dev.mac
                    ),
                ));
            }
        }
    }
    use tower::ServiceExt;
    let (mut parts, body) = req.into_parts();
    parts.uri = format!("/{file}").parse().map_err(|_| not_found())?;
    let resp = tower_http::services::ServeDir::new(&st.repo)
        .oneshot(Request::from_parts(parts, body))
        .await
        .map_err(|e| ApiError(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}")))?;
    Ok(resp.map(Body::new))
}

/// Per source address: a request budget (429 past it).
async fn address_budget(
    State(st): State<Arc<AppState>>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    req: Request,
    next: Next,
) -> Response {
    let r = st.limits.requests_per_address;
    if r > 0
        && !lock(&st.guards.per_address).take(&peer.ip(), r as f64, 4.0 * r as f64, Instant::now())
    {
        return too_many(format!(
            "more than {r} requests per second from {}: slow down",
            peer.ip()
        ))
        .into_response();
    }
    next.run(req).await
}

/// API bodies are small: read each whole within the body timeout (a client that sends
/// half a body and stalls is answered 408 and dropped) before the handler sees it.
async fn body_in_time(State(st): State<Arc<AppState>>, req: Request, next: Next) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, 4 << 20);
    let bytes = match tokio::time::timeout(st.limits.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return ApiError(
                StatusCode::BAD_REQUEST,
                format!("reading the request body: {e}"),
            )
            .into_response()
        }
        Err(_) => {
            let mut r = ApiError(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s",
                    st.limits.body_timeout.as_secs()
                ),
            )
            .into_response();
            r.headers_mut().insert(
                axum::http::header::CONNECTION,
                axum::http::HeaderValue::from_static("close"),
            );
            return r;
        }
    };
    next.run(Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The router: API plus repository.
pub fn router(st: Arc<AppState>) -> Router {
    let api = Router::new()
        .route(CHECKIN_PATH, post(checkin))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/progress", post(progress))
        .route("/api/v1/tasks/{id}/result", post(result))
        .route_layer(middleware::from_fn_with_state(st.clone(), body_in_time));
    Router::new()
        .merge(api)
        .route(
            "/api/v1/tasks/{id}/upload",
            put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/health", get(|| async { "ok\n" }))
        .route("/repo/{file}", get(repo_file))
        .merge(crate::pxe::router())
        .merge(crate::admin::api::router(&st))
        .merge(crate::web::router())
        .layer(middleware::from_fn_with_state(st.clone(), address_budget))
        .with_state(st)
}

/// Open connections per source address.
type OpenCounts = Arc<Mutex<HashMap<IpAddr, usize>>>;

/// Counts a source address's open connections; the count drops with the connection.
struct Counted<S> {
    inner: S,
    slot: Option<(OpenCounts, IpAddr)>,
}

impl<S> Drop for Counted<S> {
    fn drop(&mut self) {
        if let Some((map, ip)) = self.slot.take() {
            let mut m = lock(&map);
            if let Some(n) = m.get_mut(&ip) {
                *n -= 1;
                if *n == 0 {
                    m.remove(&ip);
                }
            }
        }
    }
}

impl<S: tokio::io::AsyncRead + Unpin> tokio::io::AsyncRead for Counted<S> {
    fn poll_read(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: tokio::io::AsyncWrite + Unpin> tokio::io::AsyncWrite for Counted<S> {
    fn poll_write(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write(cx, buf)
    }
    fn poll_flush(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_shutdown(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        std::pin::Pin::new(&mut self.inner).poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> std::task::Poll<std::io::Result<usize>> {
        std::pin::Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The first acceptor of every connection: refuses an address's connection past its
/// budget (closed at once, before TLS).
#[derive(Clone)]
struct LimitAcceptor {
    max: usize,
    open: OpenCounts,
}

impl<S: Send + 'static> axum_server::accept::Accept<tokio::net::TcpStream, S> for LimitAcceptor {
    type Stream = Counted<tokio::net::TcpStream>;
    type Service = S;
    type Future = std::future::Ready<std::io::Result<(Self::Stream, S)>>;

    fn accept(&self, stream: tokio::net::TcpStream, service: S) -> Self::Future {
        let ip = match stream.peer_addr() {
            Ok(a) => a.ip(),
            Err(e) => return std::future::ready(Err(e)),
        };
        if self.max > 0 {
            let mut m = lock(&self.open);
            let n = m.entry(ip).or_insert(0);
            if *n >= self.max {
                return std::future::ready(Err(std::io::Error::other(format!(
                    "{ip} has {n} connections open already"
                ))));
            }
            *n += 1;
        }
        let slot = (self.max > 0).then(|| (self.open.clone(), ip));
        std::future::ready(Ok((
            Counted {
                inner: stream,
                slot,
            },
            service,
        )))
    }
}

/// Serve until SIGINT/SIGTERM. Prints `listening on <addr>` once bound (tests read it when
/// they ask for port 0).
pub async fn serve(
    st: Arc<AppState>,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    let limits = st.limits.clone();
    let app = router(st).into_make_service_with_connect_info::<SocketAddr>();
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        h.graceful_shutdown(Some(std::time::Duration::from_secs(5)));
    });
    let h = handle.clone();
    let scheme = if tls.is_some() { "https" } else { "http" };
    tokio::spawn(async move {
        if let Some(addr) = h.listening().await {
            println!("listening on {scheme}://{addr}");
            use std::io::Write;
            let _ = std::io::stdout().flush();
        }
    });
    let limit = LimitAcceptor {
        max: limits.conns_per_address,
        open: Default::default(),
    };
    // A request's headers must arrive within the header timeout (hyper closes the
    // connection otherwise: a half-sent request is not held open).
    fn http<A>(b: &mut axum_server::Server<A>, header_timeout: Duration) {
        b.http_builder()
            .http1()
            .timer(hyper_util::rt::TokioTimer::new())
            .header_read_timeout(header_timeout);
    }
    match tls {
        Some((cert, key)) => {
            let _ = rustls::crypto::ring::default_provider().install_default();
            let cfg = axum_server::tls_rustls::RustlsConfig::from_pem_file(&cert, &key)
                .await
                .with_context(|| {
                    format!(
                        "loading {} and {}: run `imgserver init` first",
                        cert.display(),
                        key.display()
                    )
                })?;
            let acceptor = axum_server::tls_rustls::RustlsAcceptor::new(cfg)
                .handshake_timeout(limits.header_timeout)
                .acceptor(limit);
            let mut server = axum_server::bind(listen).acceptor(acceptor);
            http(&mut server, limits.header_timeout);
            server
                .handle(handle)
                .serve(app)
                .await
                .with_context(|| format!("serving on {listen}"))?;
        }
        None => {
            let mut server = axum_server::bind(listen).acceptor(limit);
            http(&mut server, limits.header_timeout);
            server
                .handle(handle)
                .serve(app)
                .await
                .with_context(|| format!("serving on {listen}"))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_plain_file_names_are_served() {
        assert!(servable_name("os-7.2.img"));
        for bad in [
            "",
            ".hidden",
            ".os-1.img.part",
            "../imgserver.db",
            "a/b",
            "a\\b",
            "%2e%2e",
            "x y",
        ] {
            assert!(!servable_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn signed_urls_bind_file_and_expiry() {
        let p = signed_repo_path("k", "os-1.img", 100);
        let sig = p.rsplit("sig=").next().unwrap();
        assert!(check_repo_signature("k", "os-1.img", 100, sig));
        assert!(!check_repo_signature("k", "os-2.img", 100, sig));
        assert!(!check_repo_signature("k", "os-1.img", 101, sig));
        assert!(!check_repo_signature("other", "os-1.img", 100, sig));
        assert!(!check_repo_signature("k", "os-1.img", 100, "zz"));
    }

    #[test]
    fn buckets_refill_over_time() {
        let mut b = Buckets::default();
        let t = Instant::now();
        assert!(b.take(&1u8, 1.0, 2.0, t));
        assert!(b.take(&1u8, 1.0, 2.0, t));
        assert!(!b.take(&1u8, 1.0, 2.0, t));
        assert!(b.take(&2u8, 1.0, 2.0, t), "another key has its own bucket");
        assert!(b.take(&1u8, 1.0, 2.0, t + Duration::from_millis(1100)));
    }

    #[test]
    fn capture_cap_is_bounded_and_does_not_overflow() {
        assert_eq!(capture_cap(16 << 20), (16 << 20) + (1 << 20) + (16 << 20));
        assert_eq!(capture_cap(u64::MAX), u64::MAX);
    }
}
