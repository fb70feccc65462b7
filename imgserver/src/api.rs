//! The HTTP(S) API devices talk to (protocol v1, `docs/protocol.md`), and the image
//! repository under `/repo/`.
//!
//! Handlers are thin: they authenticate the device (its credential's SHA-256 is looked up;
//! the server never stores the credential itself), hand the request to the [`Store`] on a
//! blocking thread (SQLite is synchronous), and turn rows into protocol messages.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;

use crate::protocol::{
    Action, CaptureSpec, CheckIn, CheckInReply, DeploySpec, ErrorReply, ImageRef, ProgressReply,
    ProgressReport, ResultReply, Task, TaskKind, TaskResult, CHECKIN_PATH, PROTOCOL_VERSION,
};
use crate::store::{
    CheckInSecrets, DeviceRow, ImageRow, JobRow, Policy, Store, StoreError, TaskRow,
};

/// What every handler shares.
pub struct AppState {
    pub store: Arc<dyn Store>,
    pub policy: Policy,
    /// The image repository directory.
    pub repo: PathBuf,
    /// The base URL devices reach this server at (for image and upload URLs); None: taken
    /// from each request's Host header.
    pub public_url: Option<String>,
    /// `https` or `http`, for URLs built from the Host header.
    pub scheme: &'static str,
    /// The PXE boot decision's settings (`crate::pxe`).
    pub pxe: crate::pxe::PxeConfig,
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

async fn authenticate(st: &AppState, headers: &HeaderMap) -> ApiResult<DeviceRow> {
    let Some(token) = bearer(headers) else {
        return Err(ApiError(
            StatusCode::UNAUTHORIZED,
            "no device credential: check in first to enrol".into(),
        ));
    };
    let store = st.store.clone();
    let hash = hash_secret(&token);
    blocking(move || store.device_by_credential(&hash))
        .await?
        .ok_or_else(|| ApiError::from(StoreError::BadCredential))
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
    let kind = match job.kind.as_str() {
        "deploy" => {
            let img = image?;
            let url = match (&img.url, &img.file) {
                (Some(u), _) => u.clone(),
                (None, Some(f)) => format!("{base}/repo/{f}"),
                (None, None) => return None,
            };
            TaskKind::Deploy(DeploySpec {
                image: ImageRef {
                    name: img.name.clone(),
                    version: img.version.clone(),
                    url,
                    size: img.size,
                },
                disk: o.disk.clone(),
                partition: o.partition.clone(),
                preserve: o.preserve.clone(),
                backup_first: o.backup_first,
                after: o.after,
            })
        }
        "capture" => TaskKind::Capture(CaptureSpec {
            disk: o.disk.clone(),
            partition: o.partition.clone(),
            name: o
                .capture_name
                .clone()
                .unwrap_or_else(|| format!("capture-{}", task.mac.replace(':', ""))),
            version: o
                .capture_version
                .clone()
                .unwrap_or_else(|| task.id.to_string()),
            models: Vec::new(),
            description: Some(format!("captured from {} by job {}", task.mac, job.id)),
            comp: o.comp.unwrap_or(1),
            upload_url: match upload_key {
                Some(k) => format!("{base}/api/v1/tasks/{}/upload?key={k}", task.id),
                None => format!("{base}/api/v1/tasks/{}/upload", task.id),
            },
        }),
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

async fn checkin(
    State(st): State<Arc<AppState>>,
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
    let credential = new_secret();
    let upload_key = new_secret();
    let secrets = CheckInSecrets {
        presented: bearer(&headers).map(|t| hash_secret(&t)),
        new_credential: hash_secret(&credential),
        new_upload_key: hash_secret(&upload_key),
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

/// A capture's image arrives here (chunked PUT from `imgengine::source::upload`), is
/// written to a hidden file, checked by reading its metadata, and registered.
async fn upload(
    State(st): State<Arc<AppState>>,
    Path(id): Path<u64>,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> ApiResult<Response> {
    let key = q.key.ok_or_else(|| {
        ApiError(
            StatusCode::FORBIDDEN,
            "upload without key: use the URL from the capture task".into(),
        )
    })?;
    let store = st.store.clone();
    let hash = hash_secret(&key);
    let found = blocking(move || store.upload_task(id, &hash)).await?;
    if found.is_none() {
        return Err(ApiError(
            StatusCode::FORBIDDEN,
            format!("no running capture task {id} with this upload key"),
        ));
    }
    let incoming = st.repo.join(".incoming");
    tokio::fs::create_dir_all(&incoming)
        .await
        .with_context(|| format!("creating {}", incoming.display()))?;
    let part = incoming.join(format!("task-{id}.part"));
    let mut f = tokio::fs::File::create(&part)
        .await
        .with_context(|| format!("creating {}", part.display()))?;
    let mut stream = body.into_data_stream();
    let mut total = 0u64;
    while let Some(chunk) = stream.next().await {
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => {
                let _ = tokio::fs::remove_file(&part).await;
                return Err(ApiError(
                    StatusCode::BAD_REQUEST,
                    format!("upload of task {id} broke off after {total} bytes: {e}"),
                ));
            }
        };
        total += chunk.len() as u64;
        f.write_all(&chunk)
            .await
            .with_context(|| format!("writing {}", part.display()))?;
    }
    f.sync_all()
        .await
        .with_context(|| format!("syncing {}", part.display()))?;
    drop(f);
    let (store, repo, p) = (st.store.clone(), st.repo.clone(), part.clone());
    let added =
        tokio::task::spawn_blocking(move || crate::repo::add_file(&*store, &repo, &p, true, 0))
            .await
            .map_err(|e| {
                ApiError(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("registering the upload: {e}"),
                )
            })?;
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

/// The router: API plus repository.
pub fn router(st: Arc<AppState>) -> Router {
    let repo = tower_http::services::ServeDir::new(&st.repo);
    Router::new()
        .route(CHECKIN_PATH, post(checkin))
        .route("/api/v1/tasks/{id}", get(get_task))
        .route("/api/v1/tasks/{id}/progress", post(progress))
        .route("/api/v1/tasks/{id}/result", post(result))
        .route(
            "/api/v1/tasks/{id}/upload",
            put(upload).layer(DefaultBodyLimit::disable()),
        )
        .route("/api/v1/health", get(|| async { "ok\n" }))
        .nest_service("/repo", repo)
        .merge(crate::pxe::router())
        .with_state(st)
}

/// Serve until SIGINT/SIGTERM. Prints `listening on <addr>` once bound (tests read it when
/// they ask for port 0).
pub async fn serve(
    st: Arc<AppState>,
    listen: SocketAddr,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<()> {
    let app = router(st).into_make_service();
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
            axum_server::bind_rustls(listen, cfg)
                .handle(handle)
                .serve(app)
                .await
                .with_context(|| format!("serving on {listen}"))?;
        }
        None => {
            axum_server::bind(listen)
                .handle(handle)
                .serve(app)
                .await
                .with_context(|| format!("serving on {listen}"))?;
        }
    }
    Ok(())
}
