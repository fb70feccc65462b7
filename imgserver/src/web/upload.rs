//! Uploading an image file from the browser: the console's script sends the chosen file as
//! the body of `PUT /images/upload` (the file's bytes as they are, no multipart encoding,
//! so the server parses nothing but the image itself), with the session's CSRF token in a
//! header. The session, the origin, the token and the admin role are checked before a byte
//! is read; a Content-Length is required and must fit the repository's free space; the
//! file is written beside the repository and moved into it only when the admin core has
//! read and registered it (a half-written or refused upload is deleted).

use std::path::PathBuf;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Extension;
use futures_util::StreamExt;
use serde::Deserialize;
use tokio::io::AsyncWriteExt;

use super::ops::{actor, Console, OpError};
use super::session::{self, Signed};
use super::views::blocking;
use crate::api::AppState;

/// The header that carries the session's CSRF token (a form field cannot: the body is the
/// file).
pub const CSRF_HEADER: &str = "x-console-csrf";

#[derive(Deserialize, Default)]
pub struct UploadQuery {
    #[serde(default)]
    min_ram_mib: u64,
}

fn text(status: StatusCode, msg: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
        msg,
    )
        .into_response()
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

pub async fn image_upload(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Extension<Arc<Console>>,
    headers: HeaderMap,
    Query(q): Query<UploadQuery>,
    body: Body,
) -> Response {
    let csrf = headers
        .get(CSRF_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    if !session::same_origin(&headers) || !session::csrf_ok(&who, csrf) {
        return text(
            StatusCode::FORBIDDEN,
            "this upload did not come from this console's page: reload the page and try again"
                .into(),
        );
    }
    if !who.may_manage() {
        return text(
            StatusCode::FORBIDDEN,
            format!(
                "your role ({}) may not register images: ask an administrator",
                who.role.as_str()
            ),
        );
    }
    let Some(len) = headers
        .get(header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok())
    else {
        return text(
            StatusCode::LENGTH_REQUIRED,
            "the upload has no Content-Length: choose the file again".into(),
        );
    };
    if len == 0 {
        return text(StatusCode::BAD_REQUEST, "the chosen file is empty".into());
    }
    let incoming = st.incoming.clone();
    if let Err(e) = std::fs::create_dir_all(&incoming) {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("creating {}: {e}", incoming.display()),
        );
    }
    let keep = st.limits.keep_free;
    match nix::sys::statvfs::statvfs(&incoming) {
        Ok(s) => {
            let free = s.blocks_available().saturating_mul(s.fragment_size());
            if len.saturating_add(keep) > free {
                return text(
                    StatusCode::INSUFFICIENT_STORAGE,
                    format!(
                        "the repository has {free} bytes free; this image ({len} bytes) would leave less than {keep}: remove old images first"
                    ),
                );
            }
        }
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("free space of {}: {e}", incoming.display()),
            )
        }
    }
    let path = incoming.join(format!("console-upload-{}.img", crate::api::new_secret()));
    let mut guard = TempFile(Some(path.clone()));
    let mut file = match tokio::fs::File::create(&path).await {
        Ok(f) => f,
        Err(e) => {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("creating {}: {e}", path.display()),
            )
        }
    };
    let idle = st
        .limits
        .body_timeout
        .max(std::time::Duration::from_secs(1));
    let mut stream = body.into_data_stream();
    let mut got = 0u64;
    loop {
        let next = match tokio::time::timeout(idle, stream.next()).await {
            Ok(n) => n,
            Err(_) => {
                return text(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("the upload paused longer than {}s", idle.as_secs()),
                )
            }
        };
        let Some(chunk) = next else { break };
        let chunk = match chunk {
            Ok(c) => c,
            Err(e) => return text(StatusCode::BAD_REQUEST, format!("reading the upload: {e}")),
        };
        got += chunk.len() as u64;
        if got > len {
            return text(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!("the upload is longer than its Content-Length {len}"),
            );
        }
        if let Err(e) = file.write_all(&chunk).await {
            return text(
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("writing {}: {e}", path.display()),
            );
        }
    }
    if got != len {
        return text(
            StatusCode::BAD_REQUEST,
            format!("the upload ended after {got} of {len} bytes"),
        );
    }
    if let Err(e) = file.sync_all().await {
        return text(
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("writing {}: {e}", path.display()),
        );
    }
    drop(file);
    let min_ram = q.min_ram_mib.saturating_mul(1 << 20);
    // The administrator knows the file by its own name, not by the server's temporary one.
    let tmp_name = path.display().to_string();
    let w = who.clone();
    let r = blocking(move || {
        let r = c
            .core(&st)?
            .add_image_file(&actor(&w), &path, true, min_ram);
        // Moved into the repository on success; removed by the guard otherwise.
        if r.is_ok() {
            guard.0 = None;
        }
        drop(guard);
        Ok(r?)
    })
    .await;
    match r {
        Ok(img) => text(
            StatusCode::CREATED,
            format!(
                "Registered image {} {} (id {}).",
                img.name, img.version, img.id
            ),
        ),
        Err(e @ OpError::Forbidden(_)) => text(StatusCode::FORBIDDEN, e.to_string()),
        Err(e) => text(
            e.status(),
            format!(
                "The image was not registered: {}",
                e.to_string().replace(&tmp_name, "the uploaded file")
            ),
        ),
    }
}
