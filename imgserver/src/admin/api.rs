//! The admin JSON API under `/api/v1/admin/` on the server's HTTPS listener
//! (`docs/admin-api.md`). Every request carries `Authorization: Bearer <admin token>`;
//! the handlers authenticate it, then call the [`Admin`] core on a blocking thread (SQLite
//! is synchronous), which checks the role and records the change.
//!
//! Errors are `{"error": "..."}` with 400 (bad input), 401 (no, unknown or revoked token,
//! or a device credential), 403 (role too low), 404, 409, 411/413/507 (uploads) or 422
//! (a job no device could take: `{"error", "validation"}`).

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{DefaultBodyLimit, Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use futures_util::StreamExt;
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;

use super::{window, Actor, Admin, AdminError, DeviceFilter, JobRequest, Role};
use crate::api::AppState;
use crate::store::StoreError;

/// What the admin handlers share: the core, and the server's state (repository, limits).
pub struct AdminState {
    pub admin: Admin,
    pub app: Arc<AppState>,
    /// Where uploads are written until registered (beside the repository, not served).
    pub incoming: PathBuf,
}

/// The admin routes, merged into the server's router (`crate::api::router`). The admin
/// core opens the database in the data directory (the repository's parent).
pub fn router<S: Clone + Send + Sync + 'static>(app: &Arc<AppState>) -> Router<S> {
    let st = match state(app) {
        Ok(st) => st,
        Err(e) => {
            let msg = format!("the admin API is unavailable: {e}");
            eprintln!("imgserver: {msg}");
            return Router::new().route(
                "/api/v1/admin/{*rest}",
                axum::routing::any(move || {
                    let msg = msg.clone();
                    async move { err(StatusCode::SERVICE_UNAVAILABLE, msg) }
                }),
            );
        }
    };
    let upload = Router::new().route(
        "/api/v1/admin/images/upload",
        put(upload_image).layer(DefaultBodyLimit::disable()),
    );
    Router::new()
        .route("/api/v1/admin/whoami", get(whoami))
        .route("/api/v1/admin/devices", get(devices))
        .route("/api/v1/admin/devices/{mac}", get(device).delete(forget))
        .route("/api/v1/admin/devices/{mac}/operational", post(operational))
        .route("/api/v1/admin/devices/{mac}/group", put(group))
        .route("/api/v1/admin/devices/{mac}/approve", post(approve))
        .route("/api/v1/admin/devices/{mac}/transcript", get(transcript))
        .route("/api/v1/admin/images", get(images).post(add_image_url))
        .route(
            "/api/v1/admin/images/{spec}",
            axum::routing::delete(remove_image),
        )
        .route("/api/v1/admin/jobs", get(jobs).post(create_job))
        .route("/api/v1/admin/jobs/validate", post(validate_job))
        .route("/api/v1/admin/jobs/{id}", get(job).delete(remove_job))
        .route("/api/v1/admin/jobs/{id}/abort", post(abort_job))
        .route("/api/v1/admin/jobs/{id}/retry", post(retry_job))
        .route("/api/v1/admin/jobs/{id}/rollback", post(rollback_job))
        .route("/api/v1/admin/sessions", get(sessions).post(start_session))
        .route("/api/v1/admin/sessions/{name}/stop", post(stop_session))
        .route("/api/v1/admin/audit", get(audit))
        .route("/api/v1/admin/tokens", get(tokens).post(add_token))
        .route(
            "/api/v1/admin/tokens/{name}",
            axum::routing::delete(revoke_token),
        )
        .route_layer(middleware::from_fn_with_state(st.clone(), body_in_time))
        .merge(upload)
        .with_state(st)
}

/// Admin request bodies are small JSON: each must arrive whole, at most [`BODY_MAX`]
/// bytes, within the server's body timeout (a client that sends half a body and stalls is
/// answered 408 and dropped; it is read before the token is checked).
const BODY_MAX: usize = 256 << 10;

async fn body_in_time(
    State(st): State<Arc<AdminState>>,
    req: axum::extract::Request,
    next: middleware::Next,
) -> Response {
    let (parts, body) = req.into_parts();
    let read = axum::body::to_bytes(body, BODY_MAX);
    let bytes = match tokio::time::timeout(st.app.limits.body_timeout, read).await {
        Ok(Ok(b)) => b,
        Ok(Err(e)) => {
            return err(
                StatusCode::BAD_REQUEST,
                format!("reading the request body (at most {BODY_MAX} bytes): {e}"),
            )
        }
        Err(_) => {
            let mut r = err(
                StatusCode::REQUEST_TIMEOUT,
                format!(
                    "the request body did not arrive within {}s",
                    st.app.limits.body_timeout.as_secs()
                ),
            );
            r.headers_mut()
                .insert(header::CONNECTION, HeaderValue::from_static("close"));
            return r;
        }
    };
    next.run(axum::extract::Request::from_parts(parts, Body::from(bytes)))
        .await
}

/// The admin state for the server `app` (the web console builds its own router on it).
pub fn state(app: &Arc<AppState>) -> Result<Arc<AdminState>, AdminError> {
    let data = app
        .repo
        .parent()
        .map(std::path::Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."));
    let admin = Admin::open(&data, app.store.clone(), app.policy.reload_wait)?;
    Ok(Arc::new(AdminState {
        admin,
        app: app.clone(),
        incoming: app.incoming.clone(),
    }))
}

#[derive(Serialize)]
struct ErrorBody {
    error: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    validation: Option<Vec<super::ValidationRow>>,
}

fn err(status: StatusCode, error: String) -> Response {
    let mut r = (
        status,
        Json(ErrorBody {
            error,
            validation: None,
        }),
    )
        .into_response();
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"imgserver admin\""),
        );
    }
    r
}

/// An [`AdminError`] as the API answers it (status and `{"error"}`).
pub fn error_response(e: AdminError) -> Response {
    let status = match &e {
        AdminError::Unauthorized(_) => StatusCode::UNAUTHORIZED,
        AdminError::Forbidden(_) => StatusCode::FORBIDDEN,
        AdminError::NotFound(_) => StatusCode::NOT_FOUND,
        AdminError::Conflict(_) => StatusCode::CONFLICT,
        AdminError::Invalid(_) | AdminError::Other(_) => StatusCode::BAD_REQUEST,
        AdminError::Blocked(msg, table) => {
            return (
                StatusCode::UNPROCESSABLE_ENTITY,
                Json(ErrorBody {
                    error: msg.clone(),
                    validation: Some(table.clone()),
                }),
            )
                .into_response()
        }
        AdminError::Store(s) => match s {
            StoreError::NotFound(_) => StatusCode::NOT_FOUND,
            StoreError::Conflict(_) | StoreError::AlreadyEnrolled(_) => StatusCode::CONFLICT,
            StoreError::Invalid(_) => StatusCode::BAD_REQUEST,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        },
        AdminError::Db(_) => StatusCode::INTERNAL_SERVER_ERROR,
    };
    err(status, e.to_string())
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let v = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_string())
}

/// The actor whose `Authorization: Bearer` token the request carries (blocking: SQLite).
pub fn authenticate(st: &AdminState, headers: &HeaderMap) -> Result<Actor, AdminError> {
    let token = bearer(headers).ok_or_else(|| {
        AdminError::Unauthorized(
            "no admin token: send `Authorization: Bearer TOKEN` (issued by `imgserver admin add NAME --role ...` on the server)".into(),
        )
    })?;
    st.admin.authenticate(&token)
}

/// Authenticate and run `f` with the core on a blocking thread; answer its value as JSON.
pub async fn call<T: Serialize + Send + 'static>(
    st: Arc<AdminState>,
    headers: HeaderMap,
    f: impl FnOnce(&Admin, &Actor) -> Result<T, AdminError> + Send + 'static,
) -> Response {
    let r = tokio::task::spawn_blocking(move || {
        let me = authenticate(&st, &headers)?;
        f(&st.admin, &me)
    })
    .await;
    match r {
        Ok(Ok(v)) => Json(v).into_response(),
        Ok(Err(e)) => error_response(e),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("admin task: {e}"),
        ),
    }
}

/// `?tz=ZONE` on reads: times are added as text in that zone (else the server's `TZ`).
#[derive(Debug, Default, Deserialize)]
struct TzQuery {
    #[serde(default)]
    tz: Option<String>,
}

/// Add `<field>_text` (the time in `tz`) next to every Unix-seconds field named in `fields`.
fn with_times(
    mut v: serde_json::Value,
    tz: &jiff::tz::TimeZone,
    fields: &[&str],
) -> serde_json::Value {
    fn walk(v: &mut serde_json::Value, tz: &jiff::tz::TimeZone, fields: &[&str]) {
        match v {
            serde_json::Value::Object(m) => {
                let mut add = Vec::new();
                for (k, x) in m.iter_mut() {
                    if fields.contains(&k.as_str()) {
                        if let Some(t) = x.as_u64() {
                            add.push((format!("{k}_text"), window::show(t, tz)));
                        }
                    } else {
                        walk(x, tz, fields);
                    }
                }
                for (k, s) in add {
                    m.insert(k, serde_json::Value::String(s));
                }
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(|x| walk(x, tz, fields)),
            _ => {}
        }
    }
    walk(&mut v, tz, fields);
    v
}

const TIME_FIELDS: &[&str] = &[
    "at",
    "until",
    "created",
    "last_action",
    "last_seen",
    "updated",
    "sent_at",
    "finished",
    "last_used",
    "revoked",
    "added",
];

fn zone(tz: &Option<String>) -> Result<jiff::tz::TimeZone, AdminError> {
    window::zone(tz.as_deref()).map_err(|e| AdminError::Invalid(format!("{e:#}")))
}

fn timed<T: Serialize>(v: T, tz: &jiff::tz::TimeZone) -> Result<serde_json::Value, AdminError> {
    let v = serde_json::to_value(v).map_err(|e| AdminError::Other(e.into()))?;
    Ok(with_times(v, tz, TIME_FIELDS))
}

async fn whoami(State(st): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    call(st, headers, |_, me| Ok(me.clone())).await
}

#[derive(Debug, Default, Deserialize)]
struct DeviceQuery {
    #[serde(flatten)]
    filter: DeviceFilter,
    #[serde(default)]
    tz: Option<String>,
}

async fn devices(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<DeviceQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.devices(me, &q.filter)?, &tz)
    })
    .await
}

async fn device(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    Query(q): Query<TzQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.device(me, &mac)?, &tz)
    })
    .await
}

#[derive(Serialize)]
struct Done {
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    detail: Option<String>,
}

fn done() -> Done {
    Done {
        ok: true,
        detail: None,
    }
}

async fn operational(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> Response {
    call(st, headers, move |a, me| {
        a.make_operational(me, &mac).map(|_| done())
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct GroupBody {
    #[serde(default)]
    group: Option<String>,
}

async fn group(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    body: Option<Json<GroupBody>>,
) -> Response {
    let g = body.map(|Json(b)| b.group).unwrap_or_default();
    call(st, headers, move |a, me| {
        a.set_group(me, &mac, g.as_deref()).map(|_| done())
    })
    .await
}

async fn approve(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> Response {
    call(st, headers, move |a, me| {
        a.approve(me, &mac).map(|_| done())
    })
    .await
}

async fn forget(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
) -> Response {
    call(st, headers, move |a, me| a.forget(me, &mac).map(|_| done())).await
}

#[derive(Debug, Default, Deserialize)]
struct TranscriptQuery {
    #[serde(default)]
    task: Option<u64>,
    #[serde(default)]
    tz: Option<String>,
}

async fn transcript(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    Query(q): Query<TranscriptQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        let lines = a.transcript(me, &mac, q.task)?;
        let v = serde_json::to_value(lines).map_err(|e| AdminError::Other(e.into()))?;
        Ok(with_times(v, &tz, &["at"]))
    })
    .await
}

async fn images(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<TzQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.images(me)?, &tz)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct ImageUrlBody {
    url: String,
    #[serde(default)]
    min_ram: u64,
    /// Seed 001: mark it autogenic.
    #[serde(default)]
    autogenic: bool,
    /// The text of the package's image.rsp: a <BackupImage> tag marks it autogenic.
    #[serde(default)]
    rsp: Option<String>,
}

async fn add_image_url(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(b): Json<ImageUrlBody>,
) -> Response {
    call(st, headers, move |a, me| {
        let tagged = match &b.rsp {
            Some(text) => {
                crate::autogenic::parse_rsp(text.as_bytes())
                    .map_err(AdminError::Invalid)?
                    .backup_image
            }
            None => false,
        };
        a.add_image_url_as(me, &b.url, None, b.min_ram, b.autogenic || tagged)
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct UploadQuery {
    #[serde(default)]
    min_ram: u64,
    /// Seed 001: mark it autogenic.
    #[serde(default)]
    autogenic: bool,
}

/// Deletes a half-written upload unless it was handed on.
struct TempFile(Option<PathBuf>);

impl Drop for TempFile {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `PUT /api/v1/admin/images/upload`: the image file as the body (admin role, checked
/// before a byte is read; a Content-Length is required and must fit the free space).
async fn upload_image(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Response {
    let who = {
        let st = st.clone();
        let headers = headers.clone();
        tokio::task::spawn_blocking(move || {
            let me = authenticate(&st, &headers)?;
            me.require(Role::Admin, "uploading images")?;
            Ok::<_, AdminError>(me)
        })
        .await
    };
    let me = match who {
        Ok(Ok(me)) => me,
        Ok(Err(e)) => return error_response(e),
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("admin task: {e}"),
            )
        }
    };
    let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return err(
            StatusCode::LENGTH_REQUIRED,
            "send the image with a Content-Length (curl --upload-file does)".into(),
        );
    };
    if let Err(e) = std::fs::create_dir_all(&st.incoming) {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("creating {}: {e}", st.incoming.display()),
        );
    }
    let keep = st.app.limits.keep_free;
    match nix::sys::statvfs::statvfs(&st.incoming) {
        Ok(s) => {
            let free = s.blocks_available().saturating_mul(s.fragment_size());
            if len.saturating_add(keep) > free {
                return err(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "the repository has {free} bytes free; this image ({len}) would leave less than {keep}: remove old images first"
                    ),
                );
            }
        }
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("free space of {}: {e}", st.incoming.display()),
            )
        }
    }
    let path = st
        .incoming
        .join(format!("admin-upload-{}.img", crate::api::new_secret()));
    let mut guard = TempFile(Some(path.clone()));
    let mut file = match tokio::fs::File::create(&path).await {
        Ok(f) => f,
        Err(e) => {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating {}: {e}", path.display()),
            )
        }
    };
    let mut got = 0u64;
    let mut stream = body.into_data_stream();
    let idle = st
        .app
        .limits
        .body_timeout
        .max(std::time::Duration::from_secs(1));
    loop {
        let next = match tokio::time::timeout(idle, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                return err(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload paused longer than {}s", idle.as_secs()),
                )
            }
        };
        let Some(chunk) = next else { break };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return err(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")),
        };
        got += chunk.len() as u64;
        if got > len {
            return err(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the upload is longer than its Content-Length {len}"),
            );
        }
        if let Err(e) = file.write_all(&chunk).await {
            return err(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing {}: {e}", path.display()),
            );
        }
    }
    if got != len {
        return err(
            StatusCode::BAD_REQUEST,
            format!("the upload ended after {got} of {len} bytes"),
        );
    }
    if let Err(e) = file.sync_all().await {
        return err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writing {}: {e}", path.display()),
        );
    }
    drop(file);
    let (min_ram, autogenic) = (q.min_ram, q.autogenic);
    let r = tokio::task::spawn_blocking(move || {
        let r = st
            .admin
            .add_image_file_as(&me, &path, true, min_ram, autogenic);
        // Moved into the repository on success; removed by the guard otherwise.
        if r.is_ok() {
            guard.0 = None;
        }
        drop(guard);
        r
    })
    .await;
    match r {
        Ok(Ok(img)) => (StatusCode::CREATED, Json(img)).into_response(),
        Ok(Err(e)) => error_response(e),
        Err(e) => err(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("admin task: {e}"),
        ),
    }
}

async fn remove_image(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(spec): Path<String>,
) -> Response {
    call(st, headers, move |a, me| a.remove_image(me, &spec)).await
}

async fn jobs(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<TzQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.jobs(me)?, &tz)
    })
    .await
}

async fn create_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(req): Json<JobRequest>,
) -> Response {
    let validate_only = req.validate_only;
    let mut r = call(st, headers, move |a, me| a.create_job(me, &req)).await;
    if r.status() == StatusCode::OK && !validate_only {
        *r.status_mut() = StatusCode::CREATED;
    }
    r
}

async fn validate_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(mut req): Json<JobRequest>,
) -> Response {
    req.validate_only = true;
    call(st, headers, move |a, me| a.create_job(me, &req)).await
}

async fn job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Query(q): Query<TzQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.job(me, id)?, &tz)
    })
    .await
}

async fn remove_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    call(st, headers, move |a, me| {
        a.remove_job(me, id).map(|_| done())
    })
    .await
}

#[derive(Serialize)]
struct Aborted {
    ok: bool,
    cancelled: usize,
}

async fn abort_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    call(st, headers, move |a, me| {
        a.abort_job(me, id).map(|cancelled| Aborted {
            ok: true,
            cancelled,
        })
    })
    .await
}

async fn sessions(State(st): State<Arc<AdminState>>, headers: HeaderMap) -> Response {
    call(st, headers, move |a, me| a.sessions(me)).await
}

async fn start_session(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(req): Json<super::sessions::SessionRequest>,
) -> Response {
    let mut r = call(st, headers, move |a, me| a.start_session(me, &req)).await;
    if r.status() == StatusCode::OK {
        *r.status_mut() = StatusCode::CREATED;
    }
    r
}

async fn stop_session(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    call(st, headers, move |a, me| a.stop_session(me, &name)).await
}

async fn retry_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: Option<Json<JobRequest>>,
) -> Response {
    let w = body.map(|Json(b)| b).unwrap_or_default();
    call(st, headers, move |a, me| a.retry_job(me, id, &w)).await
}

#[derive(Serialize)]
struct RolledBack {
    jobs: Vec<super::JobCreated>,
    skipped: Vec<String>,
}

async fn rollback_job(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    body: Option<Json<JobRequest>>,
) -> Response {
    let w = body.map(|Json(b)| b).unwrap_or_default();
    call(st, headers, move |a, me| {
        a.rollback_job(me, id, &w)
            .map(|(jobs, skipped)| RolledBack { jobs, skipped })
    })
    .await
}

#[derive(Debug, Default, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    target: Option<String>,
    #[serde(default)]
    limit: Option<u32>,
    #[serde(default)]
    tz: Option<String>,
}

async fn audit(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<AuditQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        let rows = a.audit(me, q.target.as_deref(), q.limit.unwrap_or(100))?;
        let v = serde_json::to_value(rows).map_err(|e| AdminError::Other(e.into()))?;
        Ok(with_times(v, &tz, &["at"]))
    })
    .await
}

async fn tokens(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Query(q): Query<TzQuery>,
) -> Response {
    call(st, headers, move |a, me| {
        let tz = zone(&q.tz)?;
        timed(a.tokens(me)?, &tz)
    })
    .await
}

#[derive(Debug, Deserialize)]
struct TokenBody {
    name: String,
    role: Role,
}

#[derive(Serialize)]
struct NewToken {
    name: String,
    role: Role,
    /// Shown this once; the server keeps only its hash.
    token: String,
}

async fn add_token(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Json(b): Json<TokenBody>,
) -> Response {
    let mut r = call(st, headers, move |a, me| {
        a.add_token(me, &b.name, b.role).map(|token| NewToken {
            name: b.name.clone(),
            role: b.role,
            token,
        })
    })
    .await;
    if r.status() == StatusCode::OK {
        *r.status_mut() = StatusCode::CREATED;
    }
    r
}

async fn revoke_token(
    State(st): State<Arc<AdminState>>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> Response {
    call(st, headers, move |a, me| {
        a.revoke_token(me, &name).map(|_| done())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_scheme_is_case_insensitive_and_required() {
        let mut h = HeaderMap::new();
        assert_eq!(bearer(&h), None);
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("BEARER  imgadm_x "),
        );
        assert_eq!(bearer(&h).as_deref(), Some("imgadm_x"));
        h.insert(header::AUTHORIZATION, HeaderValue::from_static("Basic abc"));
        assert_eq!(bearer(&h), None);
    }

    #[test]
    fn times_get_text_beside_them() {
        let utc = window::zone(Some("UTC")).unwrap();
        let v = with_times(
            serde_json::json!({"at": 0, "tasks": [{"updated": 86400, "x": 1}], "until": null}),
            &utc,
            TIME_FIELDS,
        );
        assert_eq!(v["at_text"], "1970-01-01 00:00:00 UTC");
        assert_eq!(v["tasks"][0]["updated_text"], "1970-01-02 00:00:00 UTC");
        assert!(v.get("until_text").is_none());
    }
}
