//! The console's Sessions page: the multicast sessions the server runs as master, with the
//! devices registered, their progress and result, and the job's tasks (devices named that
//! never joined included); operators start a session from a form and stop a live one. The
//! calls go to the admin core ([`crate::admin::sessions`]), as `imgserver session` and the
//! admin API do: same checks, same audit trail.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::ops::{self, Console, OpError};
use super::page::{badge, button_form, csrf_field, esc, frame, notice, size, time, url_enc, Nav};
use super::session::Signed;
use super::views::{blocking, error_page, guard, CsrfOnly};
use crate::admin::sessions::{SessionRequest, SessionView};
use crate::api::AppState;
use crate::store::ImageRow;

type Ctx = Extension<Arc<Console>>;

#[derive(Deserialize, Default)]
pub struct NoteQuery {
    #[serde(default)]
    note: String,
}

/// `GET /sessions`.
pub async fn sessions(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Query(q): Query<NoteQuery>,
) -> Response {
    let w = who.clone();
    let got = blocking(move || {
        let core = c.core(&st)?;
        let me = ops::actor(&w);
        let sessions = core.sessions(&me)?;
        let images = if w.may_schedule() {
            core.images(&me)?
        } else {
            Vec::new()
        };
        Ok((sessions, images))
    })
    .await;
    let (sessions, images) = match got {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Multicast sessions</h1>");
    if !q.note.is_empty() {
        b.push_str(&notice("ok", &q.note));
    }
    let live = sessions.iter().any(|s| !is_over(s));
    if sessions.is_empty() {
        b.push_str("<p class=muted>No session yet.</p>");
    }
    for s in sessions.iter().rev().take(100) {
        session_html(&mut b, &who, s);
    }
    if who.may_schedule() {
        start_form(&mut b, &who, &images);
    }
    Html(frame(Some(&who), Nav::Sessions, "Sessions", &b, live)).into_response()
}

fn is_over(s: &SessionView) -> bool {
    ["done", "stopped", "failed"].contains(&s.state.as_str())
}

fn session_html(b: &mut String, who: &Signed, s: &SessionView) {
    let _ = write!(
        b,
        "<section class=session data-session=\"{0}\"><h2>{0} {1}</h2><p><span class=sessmsg>{2}</span></p>\
         <p class=muted>image {3} · <a href=\"/jobs/{4}\">job {4}</a> · started {5} · changed {6}</p>",
        esc(&s.name),
        badge(&s.state, &s.state),
        esc(&s.message),
        esc(&s.image),
        s.job,
        time(Some(s.created)),
        time(Some(s.updated)),
    );
    if !is_over(s) && who.may_schedule() {
        b.push_str(&button_form(
            who,
            &format!("/sessions/{}/stop", url_enc(&s.name)),
            "Stop the session",
            "danger",
            &format!(
                "Stop session {}? Devices in it fail; devices not yet in it are cancelled.",
                s.name
            ),
        ));
    }
    if !s.clients.is_empty() {
        b.push_str("<table class=clients><thead><tr><th>Device</th><th>Address</th><th>State</th><th>Progress</th><th>Written</th><th>Message</th></tr></thead><tbody>");
        for c in &s.clients {
            let pct = if c.state == "done" {
                100
            } else {
                (c.bytes_done * 100).checked_div(c.bytes_total).unwrap_or(0)
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}{}</td><td><progress max=100 value={pct}></progress> {pct} %</td><td>{}</td><td>{}</td></tr>",
                esc(&c.name),
                esc(&c.addr),
                badge(&c.state, &c.state),
                if c.late { " (late)" } else { "" },
                size(c.bytes_done),
                esc(&c.message)
            );
        }
        b.push_str("</tbody></table>");
    }
    if !s.tasks.is_empty() {
        b.push_str("<table class=tasks><thead><tr><th>Device (MAC)</th><th>Task</th><th>Result</th><th>Progress</th><th>Message</th></tr></thead><tbody>");
        for t in &s.tasks {
            let _ = write!(
                b,
                "<tr><td><a href=\"/devices/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td></tr>",
                esc(&t.mac),
                t.id,
                badge(&t.state, &t.state),
                t.percent
                    .map(|p| format!("{p:.0} %"))
                    .unwrap_or_else(|| "—".into()),
                esc(t.message.as_deref().unwrap_or(""))
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section>");
}

fn start_form(b: &mut String, who: &Signed, images: &[ImageRow]) {
    let _ = write!(
        b,
        "<form method=post action=\"/sessions/start\" class=grid id=start-session>{}<fieldset><legend>Start a session</legend>\
         <label>Name <input name=name required maxlength=64 pattern=\"[^\\s]+\" placeholder=room1></label>\
         <label>Image <select name=image required>",
        csrf_field(who)
    );
    for i in images.iter().filter(|i| i.file.is_some()) {
        let _ = write!(
            b,
            "<option value=\"{}\">{} {}</option>",
            i.id,
            esc(&i.name),
            esc(&i.version)
        );
    }
    b.push_str(
        "</select></label>\
         <label>Devices (MAC addresses, one per line or comma-separated) <textarea name=macs rows=3></textarea></label>\
         <label><input type=checkbox name=all value=1> all devices</label>\
         <label>Start when this many registered <input name=clients inputmode=numeric placeholder=\"the number of devices\"></label>\
         <label>or minutes after the last registration <input name=timeout inputmode=numeric placeholder=5></label>\
         <label>Throttle (ms between packets) <input name=throttle inputmode=numeric placeholder=0></label>\
         <label><input type=checkbox name=latejoin value=1> late devices join the running session</label>\
         <label>Server interface <input name=interface placeholder=\"the first one up\"></label>\
         <label>Disk on the devices <input name=disk placeholder=\"the device's disk\"></label>\
         <label>Partition <input name=part placeholder=\"whole disk\"></label>\
         <button type=submit id=start-session-button>Start the session</button></fieldset></form>",
    );
}

/// The start form as posted (every field text; empty is "not given").
#[derive(Deserialize, Default)]
pub struct StartForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    image: String,
    #[serde(default)]
    macs: String,
    #[serde(default)]
    all: String,
    #[serde(default)]
    clients: String,
    #[serde(default)]
    timeout: String,
    #[serde(default)]
    throttle: String,
    #[serde(default)]
    latejoin: String,
    #[serde(default)]
    interface: String,
    #[serde(default)]
    disk: String,
    #[serde(default)]
    part: String,
}

fn number<T: std::str::FromStr>(what: &str, v: &str) -> Result<Option<T>, OpError> {
    let v = v.trim();
    if v.is_empty() {
        return Ok(None);
    }
    v.parse()
        .map(Some)
        .map_err(|_| OpError::Invalid(format!("{what}: {v:?} is not a number")))
}

fn text(v: &str) -> Option<String> {
    let v = v.trim();
    (!v.is_empty()).then(|| v.to_string())
}

impl StartForm {
    fn request(&self) -> Result<SessionRequest, OpError> {
        Ok(SessionRequest {
            name: self.name.trim().to_string(),
            image: self.image.trim().to_string(),
            macs: self
                .macs
                .split(|c: char| c == ',' || c.is_whitespace())
                .filter(|m| !m.is_empty())
                .map(str::to_string)
                .collect(),
            all: !self.all.is_empty(),
            clients: number("Start when this many registered", &self.clients)?,
            timeout_min: number("Minutes after the last registration", &self.timeout)?,
            throttle_ms: number("Throttle", &self.throttle)?.unwrap_or(0),
            latejoin: !self.latejoin.is_empty(),
            addr: None,
            interface: text(&self.interface),
            disk: text(&self.disk),
            part: text(&self.part),
        })
    }
}

/// `POST /sessions/start`.
pub async fn start(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Form(f): Form<StartForm>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let res = blocking(move || {
        let req = f.request()?;
        Ok(c.core(&st)?.start_session(&ops::actor(&w), &req)?)
    })
    .await;
    match res {
        Ok(made) => {
            let mut note = format!(
                "Session {} started: {} for {}; job {}; the server sends {}.",
                made.name, made.image, made.devices, made.job, made.starts
            );
            if !made.blocked.is_empty() {
                let _ = write!(note, " Kept out by validation: {}", made.blocked.join("; "));
            }
            Redirect::to(&format!("/sessions?note={}", url_enc(&note))).into_response()
        }
        Err(e) => error_page(&who, e),
    }
}

/// `POST /sessions/{name}/stop`.
pub async fn stop(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let res = blocking(move || Ok(c.core(&st)?.stop_session(&ops::actor(&w), &name)?)).await;
    match res {
        Ok(s) => {
            let note = format!(
                "Session {} stopped: the master ends it within a second; {} pending task(s) of job {} cancelled.",
                s.name, s.cancelled, s.job
            );
            Redirect::to(&format!("/sessions?note={}", url_enc(&note))).into_response()
        }
        Err(e) => error_page(&who, e),
    }
}
