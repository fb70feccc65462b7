//! Console sessions: an administrator signs in once with an admin token; the browser then
//! holds only a random session id in a `__Host-` cookie (Secure, HttpOnly, SameSite=Strict,
//! Path=/), never the token. The server keeps the session in memory (a restart signs
//! everyone out) keyed by the id's SHA-256, with the token's hash so that a revoked token
//! ends its sessions at the next request, and a per-session CSRF token that every form that
//! changes something must carry back.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Redirect, Response};

pub use crate::admin::Role;
use crate::api::AppState;

/// The session cookie. The `__Host-` prefix makes browsers insist on Secure, Path=/ and no
/// Domain, so no other host or plain-HTTP page can plant or read it.
pub const COOKIE: &str = "__Host-imgconsole";

/// A session lasts this long from sign-in, however busy.
pub const LIFETIME: Duration = Duration::from_secs(8 * 3600);

/// A session unused for this long ends.
pub const IDLE: Duration = Duration::from_secs(3600);

/// At most this many sessions are kept (the oldest go first).
const MAX_SESSIONS: usize = 10_000;

/// The administrator behind a token, as the admin core reports it.
#[derive(Debug, Clone)]
pub struct SignIn {
    pub name: String,
    pub role: Role,
    /// The token's hash: the key to ask whether it is still valid.
    pub token_hash: String,
}

struct Session {
    admin: SignIn,
    csrf: String,
    started: Instant,
    used: Instant,
}

/// The server's console sessions.
#[derive(Default)]
pub struct Sessions {
    map: Mutex<HashMap<String, Session>>,
}

/// A signed-in administrator, as a handler sees it.
#[derive(Debug, Clone)]
pub struct Signed {
    pub name: String,
    pub role: Role,
    pub token_hash: String,
    pub csrf: String,
    /// The hash of the session id (to end it on sign-out).
    pub key: String,
}

impl Signed {
    /// Operators and admins schedule, abort, retry, roll back and reset devices.
    pub fn may_schedule(&self) -> bool {
        self.role >= Role::Operator
    }

    /// Admins also manage the image repository.
    pub fn may_manage(&self) -> bool {
        self.role >= Role::Admin
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Sessions {
    /// Start a session for `admin`: returns the id for the cookie.
    pub fn start(&self, admin: SignIn) -> String {
        let id = crate::api::new_secret();
        let now = Instant::now();
        let mut m = lock(&self.map);
        m.retain(|_, s| live(s, now));
        if m.len() >= MAX_SESSIONS {
            if let Some(oldest) = m.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| k.clone()) {
                m.remove(&oldest);
            }
        }
        m.insert(
            crate::api::hash_secret(&id),
            Session {
                admin,
                csrf: crate::api::new_secret(),
                started: now,
                used: now,
            },
        );
        id
    }

    /// The session for a cookie value, if it is alive (and marks it used).
    fn find(&self, id: &str) -> Option<Signed> {
        let key = crate::api::hash_secret(id);
        let now = Instant::now();
        let mut m = lock(&self.map);
        let s = m.get_mut(&key)?;
        if !live(s, now) {
            m.remove(&key);
            return None;
        }
        s.used = now;
        Some(Signed {
            name: s.admin.name.clone(),
            role: s.admin.role,
            token_hash: s.admin.token_hash.clone(),
            csrf: s.csrf.clone(),
            key,
        })
    }

    /// End one session.
    pub fn end(&self, key: &str) {
        lock(&self.map).remove(key);
    }

    /// End every session of a token (it was revoked or no longer verifies).
    pub fn end_token(&self, token_hash: &str) {
        lock(&self.map).retain(|_, s| s.admin.token_hash != token_hash);
    }
}

fn live(s: &Session, now: Instant) -> bool {
    now.duration_since(s.started) < LIFETIME && now.duration_since(s.used) < IDLE
}

/// The `Set-Cookie` value that starts a session.
pub fn set_cookie(id: &str) -> String {
    format!(
        "{COOKIE}={id}; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age={}",
        LIFETIME.as_secs()
    )
}

/// The `Set-Cookie` value that removes it.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/; Secure; HttpOnly; SameSite=Strict; Max-Age=0")
}

/// The session cookie's value in a request, if any.
pub fn cookie_value(headers: &HeaderMap) -> Option<String> {
    for v in headers.get_all(header::COOKIE) {
        let Ok(v) = v.to_str() else { continue };
        for part in v.split(';') {
            if let Some((k, val)) = part.trim().split_once('=') {
                if k == COOKIE && !val.is_empty() && val.len() <= 128 {
                    return Some(val.to_string());
                }
            }
        }
    }
    None
}

/// Did this request come from one of our own pages? Browsers send `Sec-Fetch-Site` and
/// `Origin` with form posts; a cross-site value is refused (the CSRF token and the
/// SameSite cookie already refuse it: this is a third wall, and it also covers sign-in,
/// which has no session yet).
pub fn same_origin(headers: &HeaderMap) -> bool {
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok()) {
        if !matches!(site, "same-origin" | "none") {
            return false;
        }
    }
    if let Some(origin) = headers.get(header::ORIGIN).and_then(|v| v.to_str().ok()) {
        let host = headers
            .get(header::HOST)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let o = origin
            .strip_prefix("https://")
            .or_else(|| origin.strip_prefix("http://"));
        if o != Some(host) {
            return false;
        }
    }
    true
}

/// Constant-time comparison of the CSRF token a form carried with the session's.
pub fn csrf_ok(who: &Signed, presented: &str) -> bool {
    let (a, b) = (who.csrf.as_bytes(), presented.as_bytes());
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Not signed in: pages send the browser to the sign-in form, the live JSON answers 401.
pub struct NotSignedIn {
    json: bool,
    back_to: String,
}

impl IntoResponse for NotSignedIn {
    fn into_response(self) -> Response {
        if self.json {
            return (StatusCode::UNAUTHORIZED, "not signed in\n").into_response();
        }
        let to = if self.back_to.starts_with('/') && !self.back_to.starts_with("//") {
            format!("/login?next={}", super::page::url_enc(&self.back_to))
        } else {
            "/login".into()
        };
        let mut r = Redirect::to(&to).into_response();
        r.headers_mut().insert(
            header::SET_COOKIE,
            clear_cookie().parse().expect("static cookie"),
        );
        r
    }
}

impl FromRequestParts<Arc<AppState>> for Signed {
    type Rejection = NotSignedIn;

    async fn from_request_parts(
        parts: &mut Parts,
        st: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        let console = super::console(parts);
        let back_to = parts
            .uri
            .path_and_query()
            .map(|p| p.as_str().to_string())
            .unwrap_or_default();
        let reject = NotSignedIn {
            json: parts.uri.path().ends_with(".json"),
            back_to: if parts.method == axum::http::Method::GET {
                back_to
            } else {
                String::new()
            },
        };
        let Some(id) = cookie_value(&parts.headers) else {
            return Err(reject);
        };
        let Some(who) = console.sessions.find(&id) else {
            return Err(reject);
        };
        // The token behind the session must still be valid (revoked: signed out everywhere).
        let st2 = st.clone();
        let hash = who.token_hash.clone();
        let c = console.clone();
        let still =
            tokio::task::spawn_blocking(move || super::ops::token_still_valid(&c, &st2, &hash))
                .await
                .unwrap_or(None);
        match still {
            Some(role) => Ok(Signed { role, ..who }),
            None => {
                console.sessions.end_token(&who.token_hash);
                Err(reject)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn admin() -> SignIn {
        SignIn {
            name: "ann".into(),
            role: Role::Operator,
            token_hash: "h".into(),
        }
    }

    #[test]
    fn a_session_is_found_by_its_id_only() {
        let s = Sessions::default();
        let id = s.start(admin());
        let who = s.find(&id).expect("live session");
        assert_eq!(who.name, "ann");
        assert!(s.find("not-the-id").is_none());
        assert!(csrf_ok(&who, &who.csrf.clone()));
        assert!(!csrf_ok(&who, ""));
        assert!(!csrf_ok(&who, &"0".repeat(who.csrf.len())));
        s.end(&who.key);
        assert!(s.find(&id).is_none(), "signed out");
    }

    #[test]
    fn revoking_a_token_ends_its_sessions() {
        let s = Sessions::default();
        let a = s.start(admin());
        let b = s.start(SignIn {
            token_hash: "other".into(),
            ..admin()
        });
        s.end_token("h");
        assert!(s.find(&a).is_none());
        assert!(s.find(&b).is_some());
    }

    #[test]
    fn cookie_is_host_only_secure_and_strict() {
        let c = set_cookie("abc");
        for part in [
            "__Host-imgconsole=abc",
            "Path=/",
            "Secure",
            "HttpOnly",
            "SameSite=Strict",
        ] {
            assert!(c.contains(part), "{c}");
        }
        assert!(!c.contains("Domain"));
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            "a=b; __Host-imgconsole=xyz; c=d".parse().unwrap(),
        );
        assert_eq!(cookie_value(&h).as_deref(), Some("xyz"));
        h.insert(header::COOKIE, "imgconsole=xyz".parse().unwrap());
        assert_eq!(cookie_value(&h), None);
    }

    #[test]
    fn cross_site_posts_are_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, "srv:8443".parse().unwrap());
        assert!(
            same_origin(&h),
            "no browser headers: the CSRF token decides"
        );
        h.insert(header::ORIGIN, "https://srv:8443".parse().unwrap());
        h.insert("sec-fetch-site", "same-origin".parse().unwrap());
        assert!(same_origin(&h));
        h.insert(header::ORIGIN, "https://evil.example".parse().unwrap());
        assert!(!same_origin(&h));
        h.insert(header::ORIGIN, "https://srv:8443".parse().unwrap());
        h.insert("sec-fetch-site", "cross-site".parse().unwrap());
        assert!(!same_origin(&h));
    }
}
