//! The web console, served by `imgserver` itself on its HTTPS listener (`docs/console.md`).
//!
//! Server-rendered HTML and one small script (live job progress by polling, local times,
//! confirmation questions); the style sheet and the script are compiled into the binary, so
//! the console needs no web server, no CDN and nothing fetched at build time. Every page
//! needs a signed-in administrator ([`session`]); every change is a POST carrying the
//! session's CSRF token, checked with the role before the admin core ([`ops`]) is asked,
//! and the core checks the role again, so a viewer is refused even with a hand-made form.

pub mod manage;
pub mod multicast;
pub mod ops;
pub mod page;
pub mod session;
pub mod upload;
pub mod views;

use std::sync::Arc;

use axum::extract::{Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Extension, Form, Router};
use serde::Deserialize;

use crate::api::AppState;
use ops::Console;
use page::{esc, frame, notice, Nav};
use session::Signed;

const CSS: &str = include_str!("console.css");
const JS: &str = include_str!("console.js");

/// The console's routes, merged into the API router (`api::router`).
pub fn router() -> Router<Arc<AppState>> {
    Router::new()
        .route("/", get(views::fleet))
        .route("/login", get(login_form).post(login))
        .route("/logout", post(logout))
        .route("/assets/console.css", get(css))
        .route("/assets/console.js", get(js))
        .route("/devices/{mac}", get(views::device))
        .route(
            "/devices/{mac}/operational",
            post(views::device_operational),
        )
        .route("/images", get(views::images))
        .route("/images/add", post(manage::image_add))
        .route(
            "/images/upload",
            axum::routing::put(upload::image_upload)
                .layer(axum::extract::DefaultBodyLimit::disable()),
        )
        .route("/devices/{mac}/group", post(manage::device_group))
        .route("/devices/{mac}/{action}", post(manage::device_admin))
        .route("/tokens", get(manage::tokens))
        .route("/tokens/add", post(manage::token_add))
        .route("/tokens/{name}/revoke", post(manage::token_revoke))
        .route("/images/{id}/remove", post(views::image_remove))
        .route("/jobs", get(views::jobs))
        .route("/sessions", get(multicast::sessions))
        .route("/sessions/start", post(multicast::start))
        .route("/sessions/{name}/stop", post(multicast::stop))
        .route(
            "/jobs/new",
            get(views::new_job_form).post(views::new_job_post),
        )
        .route("/jobs/{id}", get(views::job))
        .route("/jobs/{id}/live.json", get(views::job_live))
        .route("/jobs/{id}/{action}", post(views::job_action))
        .layer(middleware::from_fn(security_headers))
        .layer(Extension(Arc::new(Console::default())))
}

/// The console's state (set by [`router`]'s layer).
pub(crate) fn console(parts: &axum::http::request::Parts) -> Arc<Console> {
    parts
        .extensions
        .get::<Arc<Console>>()
        .cloned()
        .expect("the console router installs its state")
}

/// Every console answer: no framing by other sites, only our own script and style, no
/// caching of pages that show the fleet, no referrer (with MACs in it) sent to other sites.
async fn security_headers(mut req: Request, next: Next) -> Response {
    let asset = req.uri().path().starts_with("/assets/");
    // HTTP/2 carries the host in the URI (`:authority`), HTTP/1.1 in `Host`: give the
    // same-origin check one place to look.
    if !req.headers().contains_key(header::HOST) {
        if let Some(a) = req
            .uri()
            .authority()
            .and_then(|a| HeaderValue::from_str(a.as_str()).ok())
        {
            req.headers_mut().insert(header::HOST, a);
        }
    }
    let mut r = next.run(req).await;
    let h = r.headers_mut();
    let set = |h: &mut HeaderMap, k: &'static str, v: &'static str| {
        h.insert(k, HeaderValue::from_static(v));
    };
    set(
        h,
        "content-security-policy",
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'",
    );
    set(h, "x-content-type-options", "nosniff");
    set(h, "x-frame-options", "DENY");
    // same-origin, not no-referrer: under no-referrer browsers send `Origin: null` with
    // form posts, which the same-origin check would refuse.
    set(h, "referrer-policy", "same-origin");
    set(h, "strict-transport-security", "max-age=31536000");
    if !asset && !h.contains_key(header::CACHE_CONTROL) {
        set(h, "cache-control", "no-store");
    }
    r
}

async fn css() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/css; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        CSS,
    )
        .into_response()
}

async fn js() -> Response {
    (
        [
            (header::CONTENT_TYPE, "text/javascript; charset=utf-8"),
            (header::CACHE_CONTROL, "max-age=300"),
        ],
        JS,
    )
        .into_response()
}

#[derive(Deserialize, Default)]
struct LoginQuery {
    #[serde(default)]
    next: String,
}

/// Only a path on this server may follow a sign-in (never `//other.host` or a URL).
fn safe_next(next: &str) -> String {
    if next.starts_with('/')
        && !next.starts_with("//")
        && !next.contains('\\')
        && !next.starts_with("/login")
        && next.len() < 2048
    {
        next.to_string()
    } else {
        "/".into()
    }
}

fn login_page(next: &str, err: Option<&str>, https: bool) -> String {
    let mut b = String::from("<div class=login><h1>Sign in</h1>");
    if !https {
        b.push_str(&notice(
            "error",
            "This server runs without TLS: the console signs in only over HTTPS (serve without --plain).",
        ));
    }
    if let Some(e) = err {
        b.push_str(&notice("error", e));
    }
    b.push_str(&format!(
        "<form method=post action=\"/login\"><input type=hidden name=next value=\"{}\"><label>Admin token <input type=password name=token id=token autocomplete=off required autofocus size=48></label><button type=submit id=signin class=primary>Sign in</button></form>",
        esc(next)
    ));
    b.push_str("<p class=hint>An administrator issues tokens on the server with <code>imgserver admin add NAME --role viewer|operator|admin</code>.</p></div>");
    frame(None, Nav::None, "Sign in", &b, false)
}

async fn login_form(State(st): State<Arc<AppState>>, Query(q): Query<LoginQuery>) -> Response {
    Html(login_page(&safe_next(&q.next), None, st.scheme == "https")).into_response()
}

#[derive(Deserialize)]
struct LoginForm {
    #[serde(default)]
    token: String,
    #[serde(default)]
    next: String,
}

async fn login(
    State(st): State<Arc<AppState>>,
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LoginForm>,
) -> Response {
    let next = safe_next(&f.next);
    let https = st.scheme == "https";
    let refuse = |status: StatusCode, msg: &str| {
        (status, Html(login_page(&next, Some(msg), https))).into_response()
    };
    if !session::same_origin(&headers) {
        return refuse(
            StatusCode::FORBIDDEN,
            "sign in from this console's own page",
        );
    }
    if !https {
        return refuse(
            StatusCode::FORBIDDEN,
            "the console signs in only over HTTPS",
        );
    }
    let token = f.token.trim().to_string();
    if token.is_empty() || token.len() > 512 {
        return refuse(StatusCode::UNAUTHORIZED, "enter an admin token");
    }
    let st2 = st.clone();
    let c = console.clone();
    let who = tokio::task::spawn_blocking(move || ops::authenticate(&c, &st2, &token))
        .await
        .unwrap_or(None);
    let Some(admin) = who else {
        // One answer for unknown, revoked and device tokens alike.
        return refuse(
            StatusCode::UNAUTHORIZED,
            "this token is not a valid admin token (a device credential never is)",
        );
    };
    let id = console.sessions.start(admin);
    let mut r = Redirect::to(&next).into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::set_cookie(&id).parse().expect("cookie is ASCII"),
    );
    r
}

#[derive(Deserialize)]
struct LogoutForm {
    #[serde(default)]
    csrf: String,
}

async fn logout(
    who: Signed,
    Extension(console): Extension<Arc<Console>>,
    headers: HeaderMap,
    Form(f): Form<LogoutForm>,
) -> Response {
    if !session::same_origin(&headers) || !session::csrf_ok(&who, &f.csrf) {
        return (StatusCode::FORBIDDEN, "stale form: reload the page\n").into_response();
    }
    console.sessions.end(&who.key);
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        session::clear_cookie().parse().expect("static cookie"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_local_paths_follow_a_sign_in() {
        assert_eq!(safe_next("/jobs/3"), "/jobs/3");
        for bad in [
            "//evil.example/",
            "https://evil.example/",
            "/\\evil",
            "",
            "jobs",
            "/login?next=/",
        ] {
            assert_eq!(safe_next(bad), "/", "{bad:?}");
        }
    }
}
