//! The console's pages: the fleet, a device, the image repository, jobs, a job with live
//! progress, and the new-job form with its validation table. Each handler asks the admin
//! core through [`super::ops`] on a blocking thread and renders HTML with [`super::page`];
//! each change checks the CSRF token and the role before it asks the core, and the core
//! checks the role again.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form, Json};
use serde::Deserialize;

use super::ops::{self, Console, JobForm, OpError};
use super::page::{
    ago, badge, button_form, csrf_field, esc, frame, iso, notice, size, time, url_enc, Nav,
};
use super::session::{self, Signed};
use crate::admin::window::Window;
use crate::admin::{DeviceFilter, DeviceSummary, JobDetail, TaskView, ValidationRow};
use crate::api::{now, AppState};
use crate::model::TaskState;

/// Rows per page of the fleet.
pub const PAGE_ROWS: usize = 100;

type Ctx = Extension<Arc<Console>>;

/// Run a blocking closure (the store is synchronous SQLite).
pub(crate) async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(OpError::Internal(format!("worker: {e}"))))
}

/// An error page.
pub(crate) fn error_page(who: &Signed, e: OpError) -> Response {
    let status = e.status();
    let body = format!(
        "<h1>Refused</h1>{}<p><a href=\"/\">Fleet</a> · <a href=\"/jobs\">Jobs</a></p>",
        notice("error", &e.to_string())
    );
    (
        status,
        Html(frame(Some(who), Nav::None, "Refused", &body, false)),
    )
        .into_response()
}

/// Refuse a change that did not come from our own form, or from a role that may not make
/// it (the core refuses it again).
pub(crate) fn guard(who: &Signed, headers: &HeaderMap, csrf: &str, may: bool) -> Option<Response> {
    if !session::same_origin(headers) || !session::csrf_ok(who, csrf) {
        return Some(error_page(
            who,
            OpError::Forbidden(
                "this form is stale or did not come from this console: reload the page and try again"
                    .into(),
            ),
        ));
    }
    if !may {
        return Some(error_page(
            who,
            OpError::Forbidden(format!(
                "your role ({}) may not do this: ask an administrator",
                who.role.as_str()
            )),
        ));
    }
    None
}

fn stamp(s: Option<&crate::protocol::ImageStamp>) -> String {
    match s {
        Some(s) => format!("{} {}", esc(&s.name), esc(&s.version)),
        None => "<span class=muted>—</span>".into(),
    }
}

fn opt(s: Option<&str>) -> String {
    match s {
        Some(s) if !s.is_empty() => esc(s),
        _ => "<span class=muted>—</span>".into(),
    }
}

// ---------------------------------------------------------------------------------------
// The fleet

#[derive(Deserialize, Default)]
pub struct FleetQuery {
    #[serde(default)]
    q: String,
    #[serde(default)]
    state: String,
    #[serde(default)]
    group: String,
    #[serde(default)]
    page: usize,
}

impl FleetQuery {
    fn link(&self, page: usize) -> String {
        format!(
            "/?q={}&state={}&group={}&page={page}",
            url_enc(&self.q),
            url_enc(&self.state),
            url_enc(&self.group)
        )
    }
}

const STATES: [(&str, &str); 6] = [
    ("operational", "Operational"),
    ("upgrade_in_progress", "Upgrade In Progress"),
    ("maintenance", "Maintenance"),
    ("configuration_required", "Configuration Required"),
    ("pending_approval", "Pending Approval"),
    ("not_enrolled", "Not Enrolled"),
];

pub async fn fleet(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Query(fq): Query<FleetQuery>,
) -> Response {
    let q = fq.q.trim().to_string();
    let filter = DeviceFilter {
        state: (!fq.state.is_empty()).then(|| fq.state.clone()),
        group: (!fq.group.is_empty()).then(|| fq.group.clone()),
        q: (!q.is_empty()).then(|| q.clone()),
        ..DeviceFilter::default()
    };
    let w = who.clone();
    let filtered = filter != DeviceFilter::default();
    let got = blocking(move || {
        let all = ops::devices(&c, &st, &w, &DeviceFilter::default())?;
        let shown = if filtered {
            ops::devices(&c, &st, &w, &filter)?
        } else {
            all.clone()
        };
        Ok((all, shown))
    })
    .await;
    let (all, shown) = match got {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let t = now();
    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    for d in &all {
        *counts.entry(d.state.as_str()).or_default() += 1;
    }
    let mut groups: Vec<&str> = all.iter().filter_map(|d| d.group.as_deref()).collect();
    groups.sort();
    groups.dedup();
    let pages = shown.len().div_ceil(PAGE_ROWS).max(1);
    let page = fq.page.min(pages - 1);
    let mut b = String::new();
    b.push_str("<h1>Fleet</h1><p class=summary>");
    let _ = write!(b, "{} devices", all.len());
    for (s, title) in STATES {
        if let Some(n) = counts.get(s) {
            let _ = write!(b, " · <a href=\"/?state={s}\">{n} {title}</a>");
        }
    }
    b.push_str("</p>");
    // Filters: a plain GET form, so a filtered view is a link that can be shared.
    b.push_str("<form method=get action=\"/\" class=filters>");
    let _ = write!(
        b,
        "<input type=search name=q id=q value=\"{}\" placeholder=\"MAC, serial, model, host, group, image\" aria-label=Search>",
        esc(&q)
    );
    b.push_str("<select name=state aria-label=State><option value=\"\">any state</option>");
    for (v, l) in STATES {
        let _ = write!(
            b,
            "<option value={v}{}>{l}</option>",
            if fq.state == v { " selected" } else { "" }
        );
    }
    b.push_str(
        "</select><select name=group aria-label=Group><option value=\"\">any group</option>",
    );
    for g in &groups {
        let _ = write!(
            b,
            "<option value=\"{0}\"{1}>{0}</option>",
            esc(g),
            if fq.group == *g { " selected" } else { "" }
        );
    }
    b.push_str("</select><button type=submit id=filter>Filter</button>");
    if filtered {
        b.push_str(" <a href=\"/\">clear</a>");
    }
    b.push_str("</form>");
    if shown.is_empty() {
        b.push_str("<p class=muted>No device matches.</p>");
    } else {
        let from = page * PAGE_ROWS;
        let to = (from + PAGE_ROWS).min(shown.len());
        b.push_str("<table id=fleet><thead><tr><th>MAC</th><th>State</th><th>Image</th><th>Group</th><th>Model</th><th>Serial</th><th>Host</th><th>Last check-in</th></tr></thead><tbody>");
        for d in &shown[from..to] {
            fleet_row(&mut b, d, t);
        }
        b.push_str("</tbody></table>");
        let _ = write!(
            b,
            "<p class=pager>Showing {}–{} of {}",
            from + 1,
            to,
            shown.len()
        );
        if page > 0 {
            let _ = write!(
                b,
                " · <a href=\"{}\" rel=prev>previous</a>",
                esc(&fq.link(page - 1))
            );
        }
        if page + 1 < pages {
            let _ = write!(
                b,
                " · <a href=\"{}\" rel=next id=next>next</a>",
                esc(&fq.link(page + 1))
            );
        }
        let _ = write!(b, " · page {} of {pages}</p>", page + 1);
    }
    Html(frame(Some(&who), Nav::Fleet, "Fleet", &b, false)).into_response()
}

fn fleet_row(b: &mut String, d: &DeviceSummary, t: u64) {
    let _ = write!(
        b,
        "<tr data-mac=\"{m}\"><td><a href=\"/devices/{mu}\" class=mono>{m}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td></tr>",
        badge(&d.state, &d.state_title),
        stamp(d.image.as_ref()),
        opt(d.group.as_deref()),
        opt(d.model.as_deref()),
        opt(d.serial.as_deref()),
        opt(d.hostname.as_deref()),
        d.last_seen.map(iso).unwrap_or_default(),
        esc(&ago(d.last_seen, t)),
        m = esc(&d.mac),
        mu = url_enc(&d.mac),
    );
}

// ---------------------------------------------------------------------------------------
// One device

pub async fn device(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Path(mac): Path<String>,
) -> Response {
    let w = who.clone();
    let (d, transcript) = match blocking(move || ops::device(&c, &st, &w, &mac)).await {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let t = now();
    let s = &d.summary;
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Device <span class=mono>{}</span> {}</h1>",
        esc(&s.mac),
        badge(&s.state, &s.state_title)
    );
    if let Some(r) = &s.state_reason {
        b.push_str(&notice("warn", r));
    }
    if who.may_schedule() {
        b.push_str("<div class=actions>");
        if matches!(
            s.state.as_str(),
            "maintenance" | "configuration_required" | "upgrade_in_progress"
        ) {
            b.push_str(&button_form(
                &who,
                &format!("/devices/{}/operational", url_enc(&s.mac)),
                "Make Operational",
                "",
                "Set this device back to Operational? Do it once the device is fixed.",
            ));
        }
        let _ = write!(
            b,
            "<a class=button href=\"/jobs/new?mac={}\">New job for this device</a>",
            url_enc(&s.mac)
        );
        b.push_str("</div>");
    }
    b.push_str(&super::manage::device_forms(&who, s));
    let inv = d.inventory.as_ref();
    b.push_str("<section><h2>Inventory</h2><table class=kv>");
    let ram = if s.ram_bytes > 0 {
        size(s.ram_bytes)
    } else {
        "<span class=muted>—</span>".into()
    };
    // Seed 001 step 7: the backup partition's image, version and BI progress.
    let backup = if !d.backup_image.supported {
        "<span class=muted>no backup partition</span>".to_string()
    } else {
        format!(
            "<span id=backup>{}</span>{}",
            esc(&d.backup_image.text()),
            if d.backup_image.partition_size > 0 {
                format!(
                    " <small>(backup partition {})</small>",
                    size(d.backup_image.partition_size)
                )
            } else {
                String::new()
            }
        )
    };
    for (k, v) in [
        ("Serial", opt(s.serial.as_deref())),
        ("Model", opt(s.model.as_deref())),
        ("Host name", opt(s.hostname.as_deref())),
        ("UUID", opt(inv.and_then(|i| i.device.uuid.as_deref()))),
        ("RAM", ram),
        ("Agent version", opt(s.agent_version.as_deref())),
        ("Group", opt(s.group.as_deref())),
        ("Image", stamp(s.image.as_ref())),
        ("Backup image", backup),
        (
            "Last check-in",
            format!("{} ({})", time(s.last_seen), esc(&ago(s.last_seen, t))),
        ),
        ("Enrolled from", opt(s.enrol_addr.as_deref())),
    ] {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    b.push_str("</table></section>");
    b.push_str("<section><h2>Disks and partitions</h2>");
    match inv {
        None => b.push_str("<p class=muted>The device has not reported an inventory yet.</p>"),
        Some(i) if i.disks.is_empty() => {
            b.push_str("<p class=muted>The device reports no disk.</p>")
        }
        Some(i) => {
            for disk in &i.disks {
                let _ = write!(
                    b,
                    "<h3><span class=mono>{}</span> <small>{} · {} · {}{}</small></h3>",
                    esc(&disk.name),
                    size(disk.size),
                    esc(if disk.table.is_empty() {
                        "no partition table"
                    } else {
                        &disk.table
                    }),
                    opt(disk.model.as_deref()),
                    disk.image
                        .as_ref()
                        .map(|s| format!(" · image {}", stamp(Some(s))))
                        .unwrap_or_default()
                );
                if disk.partitions.is_empty() {
                    b.push_str("<p class=muted>No partitions.</p>");
                    continue;
                }
                b.push_str("<table class=parts><thead><tr><th>#</th><th>Label</th><th>File system</th><th>Start (bytes)</th><th>Size</th><th>Image</th><th></th></tr></thead><tbody>");
                for p in &disk.partitions {
                    let _ = write!(
                        b,
                        "<tr><td>{}</td><td>{}</td><td>{}</td><td class=num>{}</td><td class=num>{}</td><td>{}</td><td>{}</td></tr>",
                        p.number,
                        opt(p.label.as_deref()),
                        esc(&p.fs),
                        p.start,
                        size(p.size),
                        stamp(p.image.as_ref()),
                        if disk.boot_agent_partition == Some(p.number) {
                            "<small>boot agent</small>"
                        } else {
                            ""
                        }
                    );
                }
                b.push_str("</tbody></table>");
            }
        }
    }
    b.push_str("</section><section><h2>History</h2>");
    if d.history.is_empty() {
        b.push_str("<p class=muted>No job has included this device.</p>");
    } else {
        b.push_str("<table id=history><thead><tr><th>Job</th><th>Kind</th><th>Image</th><th>State</th><th>Message</th><th>Changed by</th><th>Last action</th></tr></thead><tbody>");
        for h in d.history.iter().take(100) {
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td><td>{6}</td></tr>",
                h.job,
                esc(&h.kind),
                opt(h.image.as_deref()),
                badge(h.state.as_str(), h.state.as_str()),
                opt(h.message.as_deref()),
                opt(h.changed_by.as_deref()),
                time(Some(h.last_action))
            );
        }
        b.push_str("</tbody></table>");
    }
    b.push_str("</section><section><h2>Transcript</h2>");
    if transcript.is_empty() {
        b.push_str("<p class=muted>Nothing recorded yet.</p>");
    } else {
        b.push_str("<pre class=transcript id=transcript>");
        let skip = transcript.len().saturating_sub(500);
        if skip > 0 {
            let _ = writeln!(
                b,
                "… {skip} earlier lines: imgserver transcript {}",
                esc(&s.mac)
            );
        }
        for l in &transcript[skip..] {
            let _ = writeln!(
                b,
                "{} {}{}",
                iso(l.at),
                l.task.map(|t| format!("[task {t}] ")).unwrap_or_default(),
                esc(&l.line)
            );
        }
        b.push_str("</pre>");
    }
    b.push_str("</section>");
    let title = s.mac.clone();
    Html(frame(Some(&who), Nav::Fleet, &title, &b, false)).into_response()
}

/// A form that carries nothing but the CSRF field (one-button changes).
#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    pub(crate) csrf: String,
}

pub async fn device_operational(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path(mac): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let m = mac.clone();
    match blocking(move || ops::set_operational(&c, &st, &w, &m)).await {
        Ok(()) => Redirect::to(&format!("/devices/{}", url_enc(&mac))).into_response(),
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// Images

pub async fn images(who: Signed, State(st): State<Arc<AppState>>, Extension(c): Ctx) -> Response {
    images_with(who, st, c, String::new()).await
}

/// The image repository with `note` (a notice from a change) above it, and for an admin
/// the form that registers an image from a URL (`super::manage`).
pub(crate) async fn images_with(
    who: Signed,
    st: Arc<AppState>,
    c: Arc<Console>,
    note: String,
) -> Response {
    let w = who.clone();
    let imgs = match blocking(move || ops::images(&c, &st, &w)).await {
        Ok(i) => i,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Image repository</h1>");
    b.push_str(&note);
    if imgs.is_empty() {
        b.push_str("<p class=muted>No image registered yet. Register one from a URL here (admins), on the server with <code>imgserver image add FILE</code>, or through the admin API.</p>");
    } else {
        b.push_str("<table id=images><thead><tr><th>Name</th><th>Version</th><th>Kind</th><th>Size</th><th>Needs</th><th>Models</th><th>Signed by</th><th>Stored as</th><th>Added</th><th></th></tr></thead><tbody>");
        for i in &imgs {
            let mut needs = format!("{} target", size(i.facts.min_target_size));
            if i.facts.min_ram > 0 {
                let _ = write!(needs, ", {} RAM", size(i.facts.min_ram));
            }
            let actions = if who.may_manage() {
                button_form(
                    &who,
                    &format!("/images/{}/remove", i.id),
                    "Remove",
                    "danger",
                    &format!(
                        "Remove image {} {} from the repository (its file is deleted)?",
                        i.name, i.version
                    ),
                )
            } else {
                String::new()
            };
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{}</td><td>{}</td><td class=num>{}</td><td>{}</td><td>{}</td><td>{}</td><td class=mono>{}</td><td>{}</td><td>{}</td></tr>",
                esc(&i.name),
                esc(&i.version),
                if i.facts.whole_disk { "whole disk" } else { "partition" },
                i.size.map(size).unwrap_or_else(|| "—".into()),
                needs,
                if i.facts.models.is_empty() {
                    "<span class=muted>any</span>".into()
                } else {
                    esc(&i.facts.models.join(", "))
                },
                opt(i.signed_by.as_deref()),
                esc(i.file.as_deref().or(i.url.as_deref()).unwrap_or("")),
                time(Some(i.added)),
                actions
            );
            let mut sub = Vec::new();
            if let Some(d) = &i.description {
                sub.push(esc(d));
            }
            if let Some(f) = &i.captured_from {
                sub.push(format!("captured from {}", esc(f)));
            }
            if i.autogenic {
                sub.push("<span class=autogenic>autogenic</span>: may be kept in devices' backup partitions (BI, PI, convert)".into());
            }
            if !sub.is_empty() {
                let _ = write!(
                    b,
                    "<tr class=sub><td></td><td colspan=9>{}</td></tr>",
                    sub.join(" · ")
                );
            }
        }
        b.push_str("</tbody></table>");
    }
    if who.may_manage() {
        b.push_str(&super::manage::add_image_form(&who));
    }
    Html(frame(Some(&who), Nav::Images, "Images", &b, false)).into_response()
}

pub async fn image_remove(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_manage()) {
        return r;
    }
    let w = who.clone();
    match blocking(move || ops::remove_image(&c, &st, &w, id)).await {
        Ok(()) => Redirect::to("/images").into_response(),
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// Jobs

fn target_html(target: &str) -> String {
    if let Some(m) = target.strip_prefix("mac:") {
        format!(
            "<a class=mono href=\"/devices/{}\">{}</a>",
            url_enc(m),
            esc(m)
        )
    } else if let Some(g) = target.strip_prefix("group:") {
        format!("group {}", esc(g))
    } else if target == "all" {
        "all devices".into()
    } else if target == "list" {
        "listed devices".into()
    } else {
        esc(target)
    }
}

fn window_html(w: &Window, at: Option<u64>, until: Option<u64>) -> String {
    match w {
        Window::Always => "at once".into(),
        Window::NotYet(t) => format!(
            "waits until {}{}",
            time(Some(*t)),
            until
                .map(|u| format!(", until {}", time(Some(u))))
                .unwrap_or_default()
        ),
        Window::Open => format!(
            "open{}{}",
            at.map(|a| format!(" since {}", time(Some(a))))
                .unwrap_or_default(),
            until
                .map(|u| format!(", until {}", time(Some(u))))
                .unwrap_or_default()
        ),
        Window::Closed(t) => format!("closed at {}", time(Some(*t))),
    }
}

fn state_class(s: &str) -> String {
    s.replace(' ', "_")
}

pub async fn jobs(who: Signed, State(st): State<Arc<AppState>>, Extension(c): Ctx) -> Response {
    let w = who.clone();
    let jobs = match blocking(move || ops::jobs(&c, &st, &w)).await {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Jobs</h1>");
    if who.may_schedule() {
        b.push_str(
            "<div class=actions><a class=button href=\"/jobs/new\" id=newjob-link>New job</a></div>",
        );
    }
    if jobs.is_empty() {
        b.push_str("<p class=muted>No job yet.</p>");
    } else {
        b.push_str("<table id=jobs><thead><tr><th>Job</th><th>Kind</th><th>Image</th><th>Target</th><th>State</th><th>Devices</th><th>When</th><th>Changed by</th><th>Last action</th><th>Note</th></tr></thead><tbody>");
        for j in jobs.iter().take(500) {
            let n = &j.counts;
            let _ = write!(
                b,
                "<tr data-job=\"{0}\"><td><a href=\"/jobs/{0}\">{0}</a></td><td>{1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5} of {6} done{7}{8}</td><td>{9}</td><td>{10}</td><td>{11}</td><td>{12}</td></tr>",
                j.id,
                esc(&j.kind),
                opt(j.image.as_deref()),
                target_html(&j.target),
                badge(&state_class(&j.state), &j.state),
                n.succeeded,
                n.total,
                if n.running > 0 { format!(", {} running", n.running) } else { String::new() },
                if n.failed > 0 { format!(", <span class=verr>{} failed or aborted</span>", n.failed) } else { String::new() },
                window_html(&j.window, j.at, j.until),
                opt(j.changed_by.as_deref()),
                time(Some(j.last_action)),
                opt(j.note.as_deref())
            );
        }
        b.push_str("</tbody></table>");
    }
    Html(frame(Some(&who), Nav::Jobs, "Jobs", &b, false)).into_response()
}

/// Progress of one task as text (`deploy 42 % · 12.0 MiB of 30.0 MiB · 5.1 MiB/s`).
fn progress_text(t: &TaskView) -> String {
    let Some(p) = &t.progress else {
        return t.waiting.clone().unwrap_or_default();
    };
    let mut s = p.phase.clone();
    if let Some(pc) = p.percent {
        let _ = write!(s, " {pc:.0} %");
    }
    let _ = write!(s, " · {}", size(p.bytes));
    if let Some(total) = p.total {
        let _ = write!(s, " of {}", size(total));
    }
    if p.rate > 0 && !t.state.is_final() {
        let _ = write!(s, " · {}/s", size(p.rate));
    }
    s
}

fn percent(t: &TaskView) -> f32 {
    match t.state {
        TaskState::Succeeded => 100.0,
        _ => t
            .progress
            .as_ref()
            .and_then(|p| p.percent)
            .unwrap_or(0.0)
            .clamp(0.0, 100.0),
    }
}

fn findings(errors: &[String], warnings: &[String]) -> String {
    let mut s = String::new();
    for e in errors {
        let _ = write!(s, "<div class=verr>error: {}</div>", esc(e));
    }
    for w in warnings {
        let _ = write!(s, "<div class=vwarn>warning: {}</div>", esc(w));
    }
    s
}

/// Is anything of this job still moving (the page keeps polling)?
fn is_live(j: &JobDetail) -> bool {
    j.summary.state == "active" && j.tasks.iter().any(|t| !t.state.is_final())
}

fn tally(j: &JobDetail) -> String {
    let mut m: BTreeMap<&str, usize> = BTreeMap::new();
    for t in &j.tasks {
        *m.entry(t.state.as_str()).or_default() += 1;
    }
    m.iter()
        .map(|(s, n)| badge(s, &format!("{n} {s}")))
        .collect::<Vec<_>>()
        .join(" ")
}

#[derive(Deserialize, Default)]
pub struct JobQuery {
    #[serde(default)]
    note: String,
}

pub async fn job(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Path(id): Path<u64>,
    Query(q): Query<JobQuery>,
) -> Response {
    let w = who.clone();
    let j = match blocking(move || ops::job(&c, &st, &w, id)).await {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let s = &j.summary;
    let live = is_live(&j);
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Job {} <small>{}</small> <span id=job-state>{}</span></h1>",
        s.id,
        esc(&s.kind),
        badge(&state_class(&s.state), &s.state)
    );
    if !q.note.is_empty() {
        b.push_str(&notice("ok", &q.note));
    }
    let o = &j.options;
    let mut opts = vec![
        format!(
            "afterwards: {}",
            match o.after {
                crate::protocol::After::Reboot => "install and reboot",
                crate::protocol::After::NoReboot => "install, no reboot",
                crate::protocol::After::CopyOnly => "copy only",
            }
        ),
        format!(
            "if a device fails: {}",
            match o.on_error {
                crate::model::OnError::Stop => "stop",
                crate::model::OnError::Continue => "continue",
            }
        ),
        match o.batch {
            0 => "all devices at once".to_string(),
            1 => "one device at a time".to_string(),
            n => format!("{n} devices at a time"),
        },
        format!(
            "backup first: {}",
            if o.backup_first { "yes" } else { "no" }
        ),
    ];
    if let Some(p) = &o.partition {
        opts.push(format!("partition {}", esc(p)));
    }
    if let Some(d) = &o.disk {
        opts.push(format!("disk {}", esc(d)));
    }
    if !o.preserve.is_empty() {
        opts.push(format!("preserve {}", esc(&o.preserve.join(", "))));
    }
    b.push_str("<table class=kv>");
    for (k, v) in [
        ("Image", opt(s.image.as_deref())),
        ("Target", target_html(&s.target)),
        ("When", window_html(&s.window, s.at, s.until)),
        ("Options", opts.join(" · ")),
        ("Created", time(Some(s.created))),
        ("Changed by", opt(s.changed_by.as_deref())),
        ("Note", opt(s.note.as_deref())),
    ] {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    b.push_str("</table>");
    if who.may_schedule() {
        b.push_str("<div class=actions id=job-actions>");
        if s.state == "active" && j.tasks.iter().any(|t| !t.state.is_final()) {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/abort", s.id),
                "Abort",
                "danger",
                "Abort this job? Devices that have not started are cancelled; a device already imaging finishes.",
            ));
        }
        if j.tasks.iter().any(|t| {
            matches!(
                t.state,
                TaskState::Failed | TaskState::Rejected | TaskState::Aborted
            )
        }) {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/retry", s.id),
                "Retry",
                "",
                "",
            ));
        }
        if s.kind == "deploy"
            && j.tasks
                .iter()
                .any(|t| t.state == TaskState::Succeeded && t.previous_image.is_some())
        {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/rollback", s.id),
                "Roll back",
                "",
                "Deploy again, on the devices this job changed, the image they had before?",
            ));
        }
        b.push_str("</div>");
    }
    let _ = write!(b, "<p class=summary id=tally>{}</p>", tally(&j));
    let _ = write!(
        b,
        "<table id=tasks data-live=\"{}\" data-src=\"/jobs/{}/live.json\"><thead><tr><th>Device</th><th>State</th><th>Progress</th><th>Message</th><th>Validation</th><th>Before</th><th>Updated</th></tr></thead><tbody>",
        if live { "1" } else { "0" },
        s.id
    );
    for t in &j.tasks {
        let _ = write!(
            b,
            "<tr data-task=\"{}\" data-mac=\"{}\"><td><a class=mono href=\"/devices/{}\">{}</a></td><td class=state>{}</td><td class=progress><progress max=100 value=\"{:.0}\"></progress> <span class=ptext>{}</span></td><td class=message>{}</td><td>{}</td><td>{}</td><td class=updated>{}</td></tr>",
            t.task,
            esc(&t.mac),
            url_enc(&t.mac),
            esc(&t.mac),
            badge(t.state.as_str(), t.state.as_str()),
            percent(t),
            esc(&progress_text(t)),
            opt(t.message.as_deref()),
            findings(&t.errors, &t.warnings),
            stamp(t.previous_image.as_ref()),
            time(Some(t.updated))
        );
    }
    b.push_str("</tbody></table>");
    if j.tasks.is_empty() {
        b.push_str("<p class=muted>No device in this job yet: devices of a group or of all join as they check in.</p>");
    }
    if !j.history.is_empty() {
        b.push_str("<section><h2>Changes</h2><table id=audit><thead><tr><th>When</th><th>Who</th><th>What</th><th>Detail</th></tr></thead><tbody>");
        for a in &j.history {
            let _ = write!(
                b,
                "<tr><td>{}</td><td>{} <small>({})</small></td><td>{}</td><td>{}</td></tr>",
                time(Some(a.at)),
                esc(&a.actor),
                a.role.as_str(),
                esc(&a.action),
                esc(&a.detail)
            );
        }
        b.push_str("</tbody></table></section>");
    }
    let title = format!("Job {}", s.id);
    Html(frame(Some(&who), Nav::Jobs, &title, &b, live)).into_response()
}

/// The job page's live data, polled by the console's script.
pub async fn job_live(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Path(id): Path<u64>,
) -> Response {
    let j = match blocking(move || ops::job(&c, &st, &who, id)).await {
        Ok(x) => x,
        Err(e) => return (e.status(), e.to_string()).into_response(),
    };
    let rows: Vec<serde_json::Value> = j
        .tasks
        .iter()
        .map(|t| {
            serde_json::json!({
                "task": t.task,
                "mac": t.mac,
                "state": t.state.as_str(),
                "percent": percent(t),
                "progress": progress_text(t),
                "message": t.message,
                "updated": iso(t.updated),
            })
        })
        .collect();
    let mut r = Json(serde_json::json!({
        "job": j.summary.id,
        "state": j.summary.state,
        "state_class": state_class(&j.summary.state),
        "live": is_live(&j),
        "tasks": rows,
    }))
    .into_response();
    r.headers_mut()
        .insert(header::CACHE_CONTROL, "no-store".parse().expect("static"));
    r
}

pub async fn job_action(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path((id, action)): Path<(u64, String)>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let res = blocking(move || match action.as_str() {
        "abort" => ops::abort(&c, &st, &w, id).map(|j| {
            (
                j,
                format!("Job {id} aborted: devices not started are cancelled."),
            )
        }),
        "retry" => ops::retry(&c, &st, &w, id).map(|j| (j, format!("Retry of job {id}."))),
        "rollback" => ops::rollback(&c, &st, &w, id).map(|(j, skipped)| {
            let mut n = format!("Rollback of job {id}.");
            if !skipped.is_empty() {
                n.push_str(&format!(" Not rolled back: {}", skipped.join("; ")));
            }
            (j, n)
        }),
        other => Err(OpError::NotFound(format!("no job action {other:?}"))),
    })
    .await;
    match res {
        Ok((job, note)) => {
            Redirect::to(&format!("/jobs/{job}?note={}", url_enc(&note))).into_response()
        }
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// New job

#[derive(Deserialize, Default)]
pub struct NewJobQuery {
    #[serde(default)]
    mac: String,
    #[serde(default)]
    group: String,
}

pub async fn new_job_form(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    Query(q): Query<NewJobQuery>,
) -> Response {
    if !who.may_schedule() {
        return error_page(
            &who,
            OpError::Forbidden(format!(
                "your role ({}) may not schedule jobs: ask an administrator",
                who.role.as_str()
            )),
        );
    }
    let mut f = JobForm {
        kind: "deploy".into(),
        backup_first: true,
        after: "reboot".into(),
        on_error: "stop".into(),
        target: "macs".into(),
        ..JobForm::default()
    };
    if !q.mac.is_empty() {
        f.macs = q.mac;
    } else if !q.group.is_empty() {
        f.target = "group".into();
        f.group = q.group;
    }
    render_new_job(who, st, c, f, None, None).await
}

/// The form posted: `step=validate` shows the validation table, `step=create` creates.
pub async fn new_job_post(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Form(fields): Form<Vec<(String, String)>>,
) -> Response {
    let get = |k: &str| {
        fields
            .iter()
            .find(|(n, _)| n == k)
            .map(|(_, v)| v.clone())
            .unwrap_or_default()
    };
    if let Some(r) = guard(&who, &headers, &get("csrf"), who.may_schedule()) {
        return r;
    }
    let f = JobForm::from_fields(&fields);
    let (w, st2, c2, f2) = (who.clone(), st.clone(), c.clone(), f.clone());
    if get("step") == "create" {
        return match blocking(move || ops::create_job(&c2, &st2, &w, &f2)).await {
            Ok(made) => {
                let id = made.job.unwrap_or_default();
                let note = if made.blocked.is_empty() {
                    format!("Job {id} created.")
                } else {
                    format!(
                        "Job {id} created. Blocked by validation errors (no task): {}.",
                        made.blocked.join(", ")
                    )
                };
                Redirect::to(&format!("/jobs/{id}?note={}", url_enc(&note))).into_response()
            }
            Err(OpError::Blocked(msg, table)) => {
                render_new_job(
                    who,
                    st,
                    c,
                    f,
                    Some(table),
                    Some(OpError::Blocked(msg, vec![])),
                )
                .await
            }
            Err(e) => render_new_job(who, st, c, f, None, Some(e)).await,
        };
    }
    match blocking(move || ops::validate(&c2, &st2, &w, &f2)).await {
        Ok(table) => render_new_job(who, st, c, f, Some(table), None).await,
        Err(e) => render_new_job(who, st, c, f, None, Some(e)).await,
    }
}

async fn render_new_job(
    who: Signed,
    st: Arc<AppState>,
    c: Arc<Console>,
    f: JobForm,
    table: Option<Vec<ValidationRow>>,
    err: Option<OpError>,
) -> Response {
    let w = who.clone();
    let got = blocking(move || {
        Ok((
            ops::images(&c, &st, &w)?,
            ops::devices(&c, &st, &w, &DeviceFilter::default())?,
        ))
    })
    .await;
    let (images, devices) = match got {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let mut groups: Vec<&str> = devices.iter().filter_map(|d| d.group.as_deref()).collect();
    groups.sort();
    groups.dedup();
    let sel = |v: &str, cur: &str| if v == cur { " selected" } else { "" };
    let chk = |on: bool| if on { " checked" } else { "" };
    let mut b = String::from("<h1>New job</h1>");
    if let Some(e) = &err {
        b.push_str(&notice("error", &e.to_string()));
    }
    b.push_str("<form method=post action=\"/jobs/new\" id=newjob class=grid>");
    b.push_str(&csrf_field(&who));
    if let Some(rows) = &table {
        b.push_str("<section><h2>Validation</h2>");
        if rows.is_empty() {
            b.push_str("<p class=muted>No device matches now: devices of a group or of all are validated as they check in.</p>");
        } else {
            let blocked = rows.iter().filter(|r| r.status == "error").count();
            if blocked == rows.len() {
                b.push_str(&notice(
                    "error",
                    "Every device has errors: no job can be created. Fix the devices or change the options, then validate again.",
                ));
            } else if blocked > 0 {
                b.push_str(&notice(
                    "warn",
                    &format!(
                        "{blocked} of {} devices are blocked by errors and get no task. Warnings do not block.",
                        rows.len()
                    ),
                ));
            } else {
                b.push_str(&notice(
                    "ok",
                    "No errors: every device listed gets a task. Warnings do not block.",
                ));
            }
            b.push_str("<table id=validation><thead><tr><th>Device</th><th>Result</th><th>Errors and warnings</th></tr></thead><tbody>");
            for r in rows {
                let verdict = match r.status.as_str() {
                    "error" => badge("blocked", "error: blocked"),
                    "warning" => badge("warned", "warning"),
                    _ => badge("ok", "success"),
                };
                let _ = write!(
                    b,
                    "<tr data-mac=\"{0}\" data-status=\"{1}\"><td class=mono>{0}</td><td>{verdict}</td><td>{2}</td></tr>",
                    esc(&r.mac),
                    esc(&r.status),
                    findings(&r.errors, &r.warnings)
                );
            }
            b.push_str("</tbody></table>");
        }
        b.push_str("</section>");
    }
    if let Some(rows) = &table {
        // The first submit button of the form is a Validate, so Enter in a field never
        // creates a job.
        b.push_str("<div class=actions><button type=submit name=step value=validate>Validate again</button>");
        let runnable = rows.iter().filter(|r| r.status != "error").count();
        let group_or_all = f.target == "group" || f.target == "all";
        if runnable > 0 || (rows.is_empty() && group_or_all) {
            let _ = write!(
                b,
                "<button type=submit name=step value=create id=create class=primary>Create job{}</button>",
                if rows.is_empty() {
                    String::new()
                } else {
                    format!(
                        " for {runnable} device{}",
                        if runnable == 1 { "" } else { "s" }
                    )
                }
            );
        }
        b.push_str("</div>");
    }
    b.push_str("<div class=cols>");
    // What
    b.push_str("<fieldset><legend>What</legend><label>Kind <select name=kind id=kind>");
    for (v, l) in [
        ("deploy", "Deploy an image"),
        ("capture", "Capture an image"),
        ("reboot", "Reboot"),
        (
            "convert",
            "Convert for autogenic imaging (boot agent, OS, backup partition), then deploy",
        ),
    ] {
        let _ = write!(b, "<option value={v}{}>{l}</option>", sel(v, &f.kind));
    }
    b.push_str("</select></label><label>Image <select name=image id=image>");
    if images.is_empty() {
        b.push_str("<option value=\"\">no image registered</option>");
    }
    for i in images.iter().rev() {
        let _ = write!(
            b,
            "<option value={}{}>{} {} ({}, {}{})</option>",
            i.id,
            sel(&i.id.to_string(), &f.image),
            esc(&i.name),
            esc(&i.version),
            if i.facts.whole_disk {
                "whole disk"
            } else {
                "partition"
            },
            i.size.map(size).unwrap_or_default(),
            if i.autogenic { ", autogenic" } else { "" }
        );
    }
    b.push_str("</select></label>");
    let _ = write!(
        b,
        "<label>Capture as <input name=capture_name value=\"{}\" placeholder=name size=14> version <input name=capture_version value=\"{}\" placeholder=version size=8></label>",
        esc(&f.capture_name),
        esc(&f.capture_version)
    );
    b.push_str("</fieldset>");
    // Which devices
    b.push_str("<fieldset><legend>Devices</legend>");
    let _ = write!(
        b,
        "<label class=radio><input type=radio name=target value=macs{}> These devices: MACs, one per line or separated by spaces</label><textarea name=macs id=macs rows=3 cols=42 spellcheck=false>{}</textarea>",
        chk(f.target == "macs" || f.target.is_empty()),
        esc(&f.macs)
    );
    let _ = write!(
        b,
        "<label class=radio><input type=radio name=target value=group{}{}> Group <select name=group>",
        chk(f.target == "group"),
        if groups.is_empty() { " disabled" } else { "" }
    );
    for g in &groups {
        let _ = write!(
            b,
            "<option value=\"{0}\"{1}>{0}</option>",
            esc(g),
            sel(g, &f.group)
        );
    }
    let _ = write!(
        b,
        "</select></label><label class=radio><input type=radio name=target value=all{}> All devices ({} now; devices that enrol later join)</label></fieldset>",
        chk(f.target == "all"),
        devices.len()
    );
    // How
    b.push_str("<fieldset><legend>Options</legend>");
    let _ = write!(
        b,
        "<label>Partition <input name=partition id=partition value=\"{}\" placeholder=\"number or label\" size=16> <small>empty: the whole disk</small></label>",
        esc(&f.partition)
    );
    let _ = write!(
        b,
        "<label>Disk <input name=disk value=\"{}\" size=16> <small>empty: the device's first disk</small></label>",
        esc(&f.disk)
    );
    let _ = write!(
        b,
        "<label>Preserve partitions <input name=preserve value=\"{}\" placeholder=\"e.g. 3, DATA\" size=16></label>",
        esc(&f.preserve)
    );
    let _ = write!(
        b,
        "<label class=check><input type=checkbox name=backup_first value=1{}> Back up the current image first (for rollback)</label>",
        chk(f.backup_first)
    );
    b.push_str("<label>Afterwards <select name=after>");
    for (v, l) in [
        ("reboot", "install and reboot"),
        ("no-reboot", "install, do not reboot"),
        ("copy-only", "copy only (to the backup location)"),
    ] {
        let _ = write!(b, "<option value={v}{}>{l}</option>", sel(v, &f.after));
    }
    b.push_str("</select></label><label>If a device fails <select name=on_error>");
    for (v, l) in [
        ("stop", "stop the job"),
        ("continue", "continue with the others"),
    ] {
        let _ = write!(b, "<option value={v}{}>{l}</option>", sel(v, &f.on_error));
    }
    let _ = write!(
        b,
        "</select></label><label>Devices at a time <input type=number name=batch min=0 value=\"{}\" class=short> <small>0 or empty: all at once; 1: one after the other</small></label>",
        esc(&f.batch)
    );
    b.push_str("</fieldset>");
    // Seed 001: autogenic imaging (an autogenic image, devices with a backup partition).
    let _ = write!(
        b,
        "<fieldset><legend>Autogenic</legend><label class=check><input type=checkbox name=backup_only id=backup_only value=1{}> Download to the backup partition (BI)</label><label class=check><input type=checkbox name=from_backup id=from_backup value=1{}> Image from the backup partition (PI)</label><p class=hint>Both: download, then image from it. Convert: backup partition size <input name=backup_size id=backup_size value=\"{}\" placeholder=\"image + 100 MB\" size=12> (flash of 4096 MB or less)</p></fieldset>",
        chk(f.backup_only),
        chk(f.from_backup),
        esc(&f.backup_size)
    );
    // When
    b.push_str("<fieldset><legend>When</legend>");
    let _ = write!(
        b,
        "<label>Start at <input type=datetime-local name=at value=\"{}\"></label><label>Window ends <input type=datetime-local name=until value=\"{}\"></label><input type=hidden name=tz id=tz value=\"{}\"><p class=hint id=tz_hint>Empty: at once, no end. Times are in the server's time zone.</p>",
        esc(&f.at),
        esc(&f.until),
        esc(&f.tz)
    );
    let _ = write!(
        b,
        "<label>Note <input name=note value=\"{}\" size=40></label></fieldset>",
        esc(&f.note)
    );
    b.push_str("</div><div class=actions><button type=submit name=step value=validate id=validate>Validate</button>");
    if table.is_none() {
        b.push_str(" <span class=hint>Validate first: the table shows what each device would do, and only then can the job be created.</span>");
    }
    b.push_str("</div></form>");
    let status = match &err {
        Some(e) => e.status(),
        None => StatusCode::OK,
    };
    (
        status,
        Html(frame(Some(&who), Nav::NewJob, "New job", &b, false)),
    )
        .into_response()
}
