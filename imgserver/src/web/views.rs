//! The console's pages: the fleet, a device, the image repository, jobs, a job with live
//! progress, and the new-job form with its validation table. Each handler reads through
//! [`super::ops`] (the admin core) on a blocking thread and renders HTML with
//! [`super::page`]; each change checks the role and the CSRF token before it asks the core,
//! and the core checks the role again.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Form, Json};
use serde::Deserialize;

use super::ops::{self, JobForm, OpError};
use super::page::{
    ago, badge, button_form, csrf_field, esc, frame, notice, size, time, url_enc, Nav,
};
use super::session::{self, Signed};
use crate::api::{now, AppState};
use crate::model::{effective_state, DeviceState, TaskState};
use crate::store::{DeviceRow, JobRow, TaskRow};

/// Rows per page of the fleet.
pub const PAGE_ROWS: usize = 100;

/// Run a blocking closure (the store is synchronous SQLite).
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, OpError> + Send + 'static,
) -> Result<T, OpError> {
    tokio::task::spawn_blocking(f)
        .await
        .unwrap_or_else(|e| Err(OpError::Internal(format!("worker: {e}"))))
}

/// An error page (or redirect back with a message).
fn error_page(who: &Signed, e: OpError) -> Response {
    let status = e.status();
    let body = format!(
        "<h1>Refused</h1>{}<p><a href=\"javascript:history.back()\">Back</a> · <a href=\"/\">Fleet</a></p>",
        notice("error", &e.to_string())
    );
    (
        status,
        Html(frame(Some(who), Nav::None, "Refused", &body, false)),
    )
        .into_response()
}

/// Refuse a change that did not come from our own form, or from a role that may not make it.
fn guard(who: &Signed, headers: &HeaderMap, csrf: Option<&str>, may: bool) -> Option<Response> {
    if !session::same_origin(headers) || !csrf.is_some_and(|c| session::csrf_ok(who, c)) {
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

fn effective(d: &DeviceRow, st: &AppState, now: u64) -> DeviceState {
    effective_state(
        d.state,
        d.last_seen.unwrap_or(0),
        d.trouble_since,
        now,
        st.policy.reload_wait,
    )
}

fn device_state_cell(d: &DeviceRow, st: &AppState, now: u64) -> String {
    if d.pending {
        return badge("pending", "Awaiting approval");
    }
    let s = effective(d, st, now);
    badge(s.as_str(), s.title())
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

/// Does a device match the search text (MAC, serial, model, group, hostname, image)?
fn matches(d: &DeviceRow, q: &str) -> bool {
    if q.is_empty() {
        return true;
    }
    let q = q.to_ascii_lowercase();
    let hay = [
        Some(d.mac.as_str()),
        d.serial.as_deref(),
        d.model.as_deref(),
        d.group.as_deref(),
        d.agent_version.as_deref(),
        d.inventory
            .as_ref()
            .and_then(|i| i.device.hostname.as_deref()),
    ];
    hay.iter()
        .flatten()
        .any(|s| s.to_ascii_lowercase().contains(&q))
        || d.image.as_ref().is_some_and(|i| {
            format!("{} {}", i.name, i.version)
                .to_ascii_lowercase()
                .contains(&q)
        })
}

pub async fn fleet(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Query(fq): Query<FleetQuery>,
) -> Response {
    let st2 = st.clone();
    let devices = match blocking(move || ops::devices(&st2)).await {
        Ok(d) => d,
        Err(e) => return error_page(&who, e),
    };
    let t = now();
    let q = fq.q.trim().to_string();
    let mut counts: BTreeMap<&'static str, usize> = BTreeMap::new();
    let mut groups: Vec<String> = devices.iter().filter_map(|d| d.group.clone()).collect();
    groups.sort();
    groups.dedup();
    let mut shown: Vec<&DeviceRow> = Vec::new();
    for d in &devices {
        let s = if d.pending {
            "pending"
        } else {
            effective(d, &st, t).as_str()
        };
        *counts.entry(s).or_default() += 1;
        if (fq.state.is_empty() || fq.state == s)
            && (fq.group.is_empty() || d.group.as_deref() == Some(fq.group.as_str()))
            && matches(d, &q)
        {
            shown.push(d);
        }
    }
    let pages = shown.len().div_ceil(PAGE_ROWS).max(1);
    let page = fq.page.min(pages - 1);
    let mut b = String::new();
    b.push_str("<h1>Fleet</h1><p class=summary>");
    let _ = write!(b, "{} devices", devices.len());
    for (s, n) in &counts {
        let title = if *s == "pending" {
            "Awaiting approval"
        } else {
            DeviceState::parse(s).title()
        };
        let _ = write!(b, " · <a href=\"/?state={s}\">{} {}</a>", n, esc(title));
    }
    b.push_str("</p>");
    // Filters: a plain GET form, so a filtered view is a link that can be shared.
    b.push_str("<form method=get action=\"/\" class=filters>");
    let _ = write!(
        b,
        "<input type=search name=q value=\"{}\" placeholder=\"MAC, serial, model, group, image\" aria-label=Search autofocus>",
        esc(&q)
    );
    b.push_str("<select name=state aria-label=State><option value=\"\">any state</option>");
    for (v, l) in [
        ("operational", "Operational"),
        ("upgrade_in_progress", "Upgrade In Progress"),
        ("maintenance", "Maintenance"),
        ("configuration_required", "Configuration Required"),
        ("pending", "Awaiting approval"),
    ] {
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
            if &fq.group == g { " selected" } else { "" }
        );
    }
    b.push_str("</select><button type=submit>Filter</button>");
    if !q.is_empty() || !fq.state.is_empty() || !fq.group.is_empty() {
        b.push_str(" <a href=\"/\">clear</a>");
    }
    b.push_str("</form>");
    if shown.is_empty() {
        b.push_str("<p class=muted>No device matches.</p>");
    } else {
        let from = page * PAGE_ROWS;
        let to = (from + PAGE_ROWS).min(shown.len());
        b.push_str("<table id=fleet><thead><tr><th>MAC</th><th>State</th><th>Image</th><th>Group</th><th>Model</th><th>Serial</th><th>Last check-in</th><th>Agent</th></tr></thead><tbody>");
        for d in &shown[from..to] {
            let _ = write!(
                b,
                "<tr data-mac=\"{m}\"><td><a href=\"/devices/{mu}\" class=mono>{m}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td title=\"{}\">{}</td><td>{}</td></tr>",
                device_state_cell(d, &st, t),
                stamp(d.image.as_ref()),
                opt(d.group.as_deref()),
                opt(d.model.as_deref()),
                opt(d.serial.as_deref()),
                d.last_seen.map(super::page::iso).unwrap_or_default(),
                esc(&ago(d.last_seen, t)),
                opt(d.agent_version.as_deref()),
                m = esc(&d.mac),
                mu = url_enc(&d.mac),
            );
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
                " · <a href=\"{}\" rel=next>next</a>",
                esc(&fq.link(page + 1))
            );
        }
        let _ = write!(b, " · page {} of {pages}</p>", page + 1);
    }
    Html(frame(Some(&who), Nav::Fleet, "Fleet", &b, false)).into_response()
}

// ---------------------------------------------------------------------------------------
// One device

pub async fn device(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Path(mac): Path<String>,
) -> Response {
    let st2 = st.clone();
    let m = mac.clone();
    let found = blocking(move || {
        let d = ops::device(&st2, &m)?;
        let tr = ops::transcript(&st2, &m)?;
        let tasks = ops::device_tasks(&st2, d.id)?;
        Ok((d, tr, tasks))
    })
    .await;
    let (d, transcript, tasks) = match found {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let t = now();
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Device <span class=mono>{}</span> {}</h1>",
        esc(&d.mac),
        device_state_cell(&d, &st, t)
    );
    if let Some(r) = &d.state_reason {
        b.push_str(&notice("warn", r));
    }
    if who.role.may_schedule() {
        b.push_str("<div class=actions>");
        if effective(&d, &st, t) != DeviceState::Operational && !d.pending {
            b.push_str(&button_form(
                &who,
                &format!("/devices/{}/operational", url_enc(&d.mac)),
                "Set Operational",
                "",
                "Set this device back to Operational? Do it once the device is fixed.",
            ));
        }
        let _ = write!(
            b,
            "<a class=button href=\"/jobs/new?mac={}\">New job for this device</a>",
            url_enc(&d.mac)
        );
        b.push_str("</div>");
    }
    let inv = d.inventory.as_ref();
    b.push_str("<section><h2>Inventory</h2><table class=kv>");
    let ram = if d.ram_bytes > 0 {
        size(d.ram_bytes)
    } else {
        "<span class=muted>—</span>".into()
    };
    for (k, v) in [
        ("Serial", opt(d.serial.as_deref())),
        ("Model", opt(d.model.as_deref())),
        (
            "Host name",
            opt(inv.and_then(|i| i.device.hostname.as_deref())),
        ),
        ("UUID", opt(inv.and_then(|i| i.device.uuid.as_deref()))),
        ("RAM", ram),
        ("Agent version", opt(d.agent_version.as_deref())),
        ("Group", opt(d.group.as_deref())),
        ("Image (last deployed)", stamp(d.image.as_ref())),
        (
            "Last check-in",
            format!("{} ({})", time(d.last_seen), esc(&ago(d.last_seen, t))),
        ),
        ("Enrolled from", opt(d.enrol_addr.as_deref())),
    ] {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    if let Some(i) = inv {
        let a = &i.autogenic;
        let _ = write!(
            b,
            "<tr><th>Autogenic flags</th><td class=mono>{}</td></tr>",
            esc(&serde_json::to_string(a).unwrap_or_default())
        );
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
                    "<h3 class=mono>{} <small>{} · {} · {}{}</small></h3>",
                    esc(&disk.name),
                    size(disk.size),
                    esc(if disk.table.is_empty() {
                        "no table"
                    } else {
                        &disk.table
                    }),
                    opt(disk.model.as_deref()),
                    disk.image
                        .as_ref()
                        .map(|s| format!(" · image {}", stamp(Some(s))))
                        .unwrap_or_default()
                );
                b.push_str("<table class=parts><thead><tr><th>#</th><th>Label</th><th>File system</th><th>Start</th><th>Size</th><th>Image</th><th></th></tr></thead><tbody>");
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
    b.push_str("</section>");
    b.push_str("<section><h2>Tasks</h2>");
    if tasks.is_empty() {
        b.push_str("<p class=muted>No job has included this device.</p>");
    } else {
        b.push_str("<table><thead><tr><th>Job</th><th>Task</th><th>State</th><th>Message</th><th>Updated</th></tr></thead><tbody>");
        for (job, task) in tasks.iter().rev().take(50) {
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{0}\">{0}</a> {1}</td><td>{2}</td><td>{3}</td><td>{4}</td><td>{5}</td></tr>",
                job.id,
                esc(&job.kind),
                task.id,
                badge(task.state.as_str(), task.state.as_str()),
                opt(task.message.as_deref()),
                time(Some(task.updated))
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
                "… {skip} earlier lines (imgserver transcript {})",
                esc(&d.mac)
            );
        }
        for (at, task, line) in &transcript[skip..] {
            let _ = writeln!(
                b,
                "{} {}{}",
                super::page::iso(*at),
                task.map(|t| format!("[task {t}] ")).unwrap_or_default(),
                esc(line)
            );
        }
        b.push_str("</pre>");
    }
    b.push_str("</section>");
    Html(frame(Some(&who), Nav::Fleet, &d.mac, &b, false)).into_response()
}

#[derive(Deserialize)]
pub struct CsrfOnly {
    #[serde(default)]
    csrf: String,
}

pub async fn device_operational(
    who: Signed,
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(mac): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, Some(&f.csrf), who.role.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let m = mac.clone();
    match blocking(move || ops::set_operational(&st, &w, &m)).await {
        Ok(()) => Redirect::to(&format!("/devices/{}", url_enc(&mac))).into_response(),
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// Images

pub async fn images(who: Signed, State(st): State<Arc<AppState>>) -> Response {
    let st2 = st.clone();
    let imgs = match blocking(move || ops::images(&st2)).await {
        Ok(i) => i,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Image repository</h1>");
    if imgs.is_empty() {
        b.push_str("<p class=muted>No image registered yet. Register one with <code>imgserver image add FILE</code>.</p>");
    } else {
        b.push_str("<table id=images><thead><tr><th>Name</th><th>Version</th><th>Kind</th><th>Size</th><th>Needs</th><th>Models</th><th>Signed</th><th>Where</th><th>Added</th><th></th></tr></thead><tbody>");
        for i in &imgs {
            let needs = if i.facts.min_ram > 0 {
                format!(
                    "{} target, {} RAM",
                    size(i.facts.min_target_size),
                    size(i.facts.min_ram)
                )
            } else {
                format!("{} target", size(i.facts.min_target_size))
            };
            let actions = if who.role.may_manage() {
                button_form(
                    &who,
                    &format!("/images/{}/remove", i.id),
                    "Remove",
                    "danger",
                    &format!("Remove image {} {} from the repository?", i.name, i.version),
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
                match &i.signed_by {
                    Some(s) => esc(s),
                    None => "<span class=muted>no</span>".into(),
                },
                esc(i.file.as_deref().or(i.url.as_deref()).unwrap_or("")),
                time(Some(i.added)),
                actions
            );
            if let Some(d) = i.description.as_deref().or(i.captured_from.as_deref()) {
                let _ = write!(
                    b,
                    "<tr class=sub><td></td><td colspan=9>{}</td></tr>",
                    esc(d)
                );
            }
        }
        b.push_str("</tbody></table>");
    }
    Html(frame(Some(&who), Nav::Images, "Images", &b, false)).into_response()
}

pub async fn image_remove(
    who: Signed,
    State(st): State<Arc<AppState>>,
    headers: HeaderMap,
    Path(id): Path<u64>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, Some(&f.csrf), who.role.may_manage()) {
        return r;
    }
    let w = who.clone();
    match blocking(move || ops::remove_image(&st, &w, id)).await {
        Ok(()) => Redirect::to("/images").into_response(),
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// Jobs

/// Counts of a job's tasks by state.
fn tally(tasks: &[TaskRow]) -> BTreeMap<&'static str, usize> {
    let mut m = BTreeMap::new();
    for t in tasks {
        *m.entry(t.state.as_str()).or_default() += 1;
    }
    m
}

fn job_target(j: &JobRow) -> String {
    if let Some(m) = j.selector.strip_prefix("mac:") {
        format!(
            "device <a class=mono href=\"/devices/{}\">{}</a>",
            url_enc(m),
            esc(m)
        )
    } else if let Some(g) = j.selector.strip_prefix("group:") {
        format!("group {}", esc(g))
    } else if j.selector == "all" {
        "all devices".into()
    } else {
        esc(&j.selector)
    }
}

pub async fn jobs(who: Signed, State(st): State<Arc<AppState>>) -> Response {
    let st2 = st.clone();
    let (jobs, images) = match blocking(move || Ok((ops::jobs(&st2)?, ops::images(&st2)?))).await {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Jobs</h1>");
    if who.role.may_schedule() {
        b.push_str("<div class=actions><a class=button href=\"/jobs/new\">New job</a></div>");
    }
    if jobs.is_empty() {
        b.push_str("<p class=muted>No job yet.</p>");
    } else {
        b.push_str("<table id=jobs><thead><tr><th>Job</th><th>Kind</th><th>Image</th><th>Target</th><th>State</th><th>Devices</th><th>Created</th><th>Note</th></tr></thead><tbody>");
        for (j, tasks) in jobs.iter().rev().take(500) {
            let img = j
                .image
                .and_then(|id| images.iter().find(|i| i.id == id))
                .map(|i| format!("{} {}", esc(&i.name), esc(&i.version)))
                .unwrap_or_else(|| "<span class=muted>—</span>".into());
            let mut devs = String::new();
            for (s, n) in tally(tasks) {
                let _ = write!(devs, "{} ", badge(s, &format!("{n} {s}")));
            }
            let _ = write!(
                b,
                "<tr><td><a href=\"/jobs/{0}\">{0}</a></td><td>{1}</td><td>{img}</td><td>{2}</td><td>{3}</td><td>{devs}</td><td>{4}</td><td>{5}</td></tr>",
                j.id,
                esc(&j.kind),
                job_target(j),
                badge(&j.state, &j.state),
                time(Some(j.created)),
                opt(j.note.as_deref())
            );
        }
        b.push_str("</tbody></table>");
    }
    Html(frame(Some(&who), Nav::Jobs, "Jobs", &b, false)).into_response()
}

/// Progress of one task as text (`deploy 42 % · 12.0 MiB of 30.0 MiB · 5.1 MiB/s`).
fn progress_text(t: &TaskRow) -> String {
    let Some(p) = &t.progress else {
        return String::new();
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

fn percent(t: &TaskRow) -> f32 {
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

fn validation_html(v: &crate::model::Validation) -> String {
    let mut s = String::new();
    for e in &v.errors {
        let _ = write!(s, "<div class=verr>error: {}</div>", esc(e));
    }
    for w in &v.warnings {
        let _ = write!(s, "<div class=vwarn>warning: {}</div>", esc(w));
    }
    s
}

pub async fn job(who: Signed, State(st): State<Arc<AppState>>, Path(id): Path<u64>) -> Response {
    let st2 = st.clone();
    let (j, tasks, images) = match blocking(move || {
        let (j, t) = ops::job(&st2, id)?;
        Ok((j, t, ops::images(&st2)?))
    })
    .await
    {
        Ok(x) => x,
        Err(e) => return error_page(&who, e),
    };
    let img = j
        .image
        .and_then(|iid| images.iter().find(|i| i.id == iid))
        .map(|i| format!("{} {}", esc(&i.name), esc(&i.version)))
        .unwrap_or_else(|| "<span class=muted>—</span>".into());
    let live = j.state == "active" && tasks.iter().any(|t| !t.state.is_final());
    let mut b = String::new();
    let _ = write!(
        b,
        "<h1>Job {} <small>{}</small> <span id=job-state>{}</span></h1>",
        j.id,
        esc(&j.kind),
        badge(&j.state, &j.state)
    );
    b.push_str("<table class=kv>");
    let o = &j.options;
    let mut opts = vec![
        format!("after: {}", esc(&format!("{:?}", o.after).to_lowercase())),
        format!(
            "on error: {}",
            esc(&format!("{:?}", o.on_error).to_lowercase())
        ),
        format!(
            "batch: {}",
            if o.batch == 0 {
                "all at once".to_string()
            } else if o.batch == 1 {
                "one device at a time".to_string()
            } else {
                format!("{} devices at a time", o.batch)
            }
        ),
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
    for (k, v) in [
        ("Image", img),
        ("Target", job_target(&j)),
        ("Options", opts.join(" · ")),
        ("Created", time(Some(j.created))),
        ("Note", opt(j.note.as_deref())),
    ] {
        let _ = write!(b, "<tr><th>{k}</th><td>{v}</td></tr>");
    }
    b.push_str("</table>");
    if who.role.may_schedule() {
        b.push_str("<div class=actions id=job-actions>");
        if j.state == "active" {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/abort", j.id),
                "Abort",
                "danger",
                "Abort this job? Devices that have not started will not; a device already writing finishes (seed rule).",
            ));
        }
        if tasks.iter().any(|t| {
            matches!(
                t.state,
                TaskState::Failed | TaskState::Rejected | TaskState::Aborted
            )
        }) {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/retry", j.id),
                "Retry failed devices",
                "",
                "",
            ));
        }
        if j.kind == "deploy"
            && tasks
                .iter()
                .any(|t| t.state == TaskState::Succeeded && t.prev_image.is_some())
        {
            b.push_str(&button_form(
                &who,
                &format!("/jobs/{}/rollback", j.id),
                "Roll back",
                "",
                "Roll the devices of this job back to the image they had before?",
            ));
        }
        b.push_str("</div>");
    }
    b.push_str("<p class=summary id=tally>");
    for (s, n) in tally(&tasks) {
        let _ = write!(b, "{} ", badge(s, &format!("{n} {s}")));
    }
    b.push_str("</p>");
    let _ = write!(
        b,
        "<table id=tasks data-live=\"{}\" data-src=\"/jobs/{}/live.json\"><thead><tr><th>Device</th><th>State</th><th>Progress</th><th>Message</th><th>Validation</th><th>Updated</th></tr></thead><tbody>",
        if live { "1" } else { "0" },
        j.id
    );
    for t in &tasks {
        let _ = write!(
            b,
            "<tr data-task=\"{}\"><td><a class=mono href=\"/devices/{}\">{}</a></td><td class=state>{}</td><td class=progress><progress max=100 value=\"{:.0}\"></progress> <span class=ptext>{}</span></td><td class=message>{}</td><td>{}</td><td class=updated>{}</td></tr>",
            t.id,
            url_enc(&t.mac),
            esc(&t.mac),
            badge(t.state.as_str(), t.state.as_str()),
            percent(t),
            esc(&progress_text(t)),
            opt(t.message.as_deref()),
            validation_html(&t.validation),
            time(Some(t.updated))
        );
    }
    b.push_str("</tbody></table>");
    if tasks.is_empty() {
        b.push_str("<p class=muted>No device in this job yet: devices of a group or of all join as they check in.</p>");
    }
    Html(frame(
        Some(&who),
        Nav::Jobs,
        &format!("Job {}", j.id),
        &b,
        live,
    ))
    .into_response()
}

/// The job page's live data, polled by the console's script.
pub async fn job_live(
    _who: Signed,
    State(st): State<Arc<AppState>>,
    Path(id): Path<u64>,
) -> Response {
    let found = blocking(move || ops::job(&st, id)).await;
    let (j, tasks) = match found {
        Ok(x) => x,
        Err(e) => return (e.status(), e.to_string()).into_response(),
    };
    let rows: Vec<serde_json::Value> = tasks
        .iter()
        .map(|t| {
            serde_json::json!({
                "task": t.id,
                "mac": t.mac,
                "state": t.state.as_str(),
                "final": t.state.is_final(),
                "percent": percent(t),
                "progress": progress_text(t),
                "message": t.message,
                "updated": super::page::iso(t.updated),
            })
        })
        .collect();
    let live = j.state == "active" && tasks.iter().any(|t| !t.state.is_final());
    let mut r = Json(serde_json::json!({
        "job": j.id,
        "state": j.state,
        "live": live,
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
    headers: HeaderMap,
    Path((id, action)): Path<(u64, String)>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, Some(&f.csrf), who.role.may_schedule()) {
        return r;
    }
    let w = who.clone();
    let res = blocking(move || match action.as_str() {
        "abort" => ops::abort(&st, &w, id).map(|_| id),
        "retry" => ops::retry(&st, &w, id),
        "rollback" => ops::rollback(&st, &w, id),
        other => Err(OpError::NotFound(format!("no job action {other:?}"))),
    })
    .await;
    match res {
        Ok(job) => Redirect::to(&format!("/jobs/{job}")).into_response(),
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
    Query(q): Query<NewJobQuery>,
) -> Response {
    if !who.role.may_schedule() {
        return error_page(
            &who,
            OpError::Forbidden(format!(
                "your role ({}) may not schedule jobs",
                who.role.as_str()
            )),
        );
    }
    let mut f = JobForm {
        kind: "deploy".into(),
        backup_first: true,
        after: "reboot".into(),
        on_error: "stop".into(),
        ..JobForm::default()
    };
    if !q.mac.is_empty() {
        f.target = "macs".into();
        f.macs = q.mac;
    } else if !q.group.is_empty() {
        f.target = "group".into();
        f.group = q.group;
    } else {
        f.target = "macs".into();
    }
    render_new_job(who, st, f, None, None).await
}

/// The form's fields as posted (repeated names kept).
pub async fn new_job_post(
    who: Signed,
    State(st): State<Arc<AppState>>,
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
    if let Some(r) = guard(&who, &headers, Some(&get("csrf")), who.role.may_schedule()) {
        return r;
    }
    let f = JobForm::from_fields(&fields);
    let step = get("step");
    let w = who.clone();
    let st2 = st.clone();
    let f2 = f.clone();
    if step == "create" {
        match blocking(move || ops::create_job(&st2, &w, &f2)).await {
            Ok(id) => return Redirect::to(&format!("/jobs/{id}")).into_response(),
            Err(e) => return render_new_job(who, st, f, None, Some(e)).await,
        }
    }
    match blocking(move || ops::validate(&st2, &w, &f2)).await {
        Ok(table) => render_new_job(who, st, f, Some(table), None).await,
        Err(e) => render_new_job(who, st, f, None, Some(e)).await,
    }
}

async fn render_new_job(
    who: Signed,
    st: Arc<AppState>,
    f: JobForm,
    table: Option<Vec<(String, crate::model::Validation)>>,
    err: Option<OpError>,
) -> Response {
    let st2 = st.clone();
    let (images, devices) =
        match blocking(move || Ok((ops::images(&st2)?, ops::devices(&st2)?))).await {
            Ok(x) => x,
            Err(e) => return error_page(&who, e),
        };
    let mut groups: Vec<String> = devices.iter().filter_map(|d| d.group.clone()).collect();
    groups.sort();
    groups.dedup();
    let mut b = String::from("<h1>New job</h1>");
    if let Some(e) = &err {
        b.push_str(&notice("error", &e.to_string()));
    }
    b.push_str("<form method=post action=\"/jobs/new\" id=newjob class=grid>");
    b.push_str(&csrf_field(&who));
    let sel = |v: &str, cur: &str| if v == cur { " selected" } else { "" };
    let chk = |on: bool| if on { " checked" } else { "" };
    // What
    b.push_str("<fieldset><legend>What</legend><label>Kind <select name=kind id=kind>");
    for (v, l) in [
        ("deploy", "Deploy an image"),
        ("capture", "Capture an image"),
        ("reboot", "Reboot"),
    ] {
        let _ = write!(b, "<option value={v}{}>{l}</option>", sel(v, &f.kind));
    }
    b.push_str(
        "</select></label><label>Image <select name=image id=image><option value=\"\">—</option>",
    );
    for i in images.iter().rev() {
        let _ = write!(
            b,
            "<option value={}{}>{} {} ({}, {})</option>",
            i.id,
            sel(&i.id.to_string(), &f.image),
            esc(&i.name),
            esc(&i.version),
            if i.facts.whole_disk {
                "whole disk"
            } else {
                "partition"
            },
            i.size.map(size).unwrap_or_default()
        );
    }
    b.push_str("</select></label>");
    let _ = write!(
        b,
        "<label>Capture as <input name=capture_name value=\"{}\" placeholder=name size=12> <input name=capture_version value=\"{}\" placeholder=version size=8></label>",
        esc(&f.capture_name),
        esc(&f.capture_version)
    );
    b.push_str("</fieldset>");
    // Which devices
    b.push_str("<fieldset><legend>Devices</legend>");
    let _ = write!(
        b,
        "<label class=radio><input type=radio name=target value=macs{}> These devices (MACs, one per line or separated by spaces or commas)</label><textarea name=macs id=macs rows=3 cols=40 spellcheck=false>{}</textarea>",
        chk(f.target == "macs"),
        esc(&f.macs)
    );
    let _ = write!(
        b,
        "<label class=radio><input type=radio name=target value=group{}> Group <select name=group>",
        chk(f.target == "group")
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
        "</select></label><label class=radio><input type=radio name=target value=all{}> All devices ({})</label></fieldset>",
        chk(f.target == "all"),
        devices.len()
    );
    // How
    b.push_str("<fieldset><legend>Options</legend>");
    let _ = write!(
        b,
        "<label>Partition <input name=partition value=\"{}\" placeholder=\"number or label; empty: whole disk\" size=18></label>",
        esc(&f.partition)
    );
    let _ = write!(
        b,
        "<label>Disk <input name=disk value=\"{}\" placeholder=\"empty: the first disk\" size=18></label>",
        esc(&f.disk)
    );
    let _ = write!(
        b,
        "<label>Preserve partitions <input name=preserve value=\"{}\" placeholder=\"e.g. 3, DATA\" size=18></label>",
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
        "</select></label><label>Devices at a time <input type=number name=batch min=0 value=\"{}\" size=4> <small>0: all at once, 1: one after the other</small></label>",
        esc(&f.batch)
    );
    b.push_str("</fieldset>");
    // When
    b.push_str("<fieldset><legend>When</legend>");
    let _ = write!(
        b,
        "<label>Start at <input type=datetime-local name=at value=\"{}\"></label><label>Window ends <input type=datetime-local name=until value=\"{}\"></label><input type=hidden name=tz_offset id=tz_offset value=\"{}\"><p class=hint id=tz_hint>Empty: now. Times are UTC unless your browser runs the console's script (then: your own time zone).</p>",
        esc(&f.at),
        esc(&f.until),
        esc(&f.tz_offset)
    );
    let _ = write!(
        b,
        "<label>Note <input name=note value=\"{}\" size=40></label></fieldset>",
        esc(&f.note)
    );
    b.push_str("<div class=actions><button type=submit name=step value=validate id=validate>Validate</button>");
    if let Some(rows) = &table {
        let runnable = rows.iter().filter(|(_, v)| v.ok()).count();
        if runnable > 0 {
            let _ = write!(
                b,
                " <button type=submit name=step value=create id=create class=primary>Create job for {runnable} device{}</button>",
                if runnable == 1 { "" } else { "s" }
            );
        }
    }
    b.push_str("</div>");
    if let Some(rows) = &table {
        b.push_str("<section><h2>Validation</h2>");
        if rows.is_empty() {
            b.push_str("<p class=muted>No device matches yet: devices of a group or of all are validated as they check in.</p>");
        } else {
            let blocked = rows.iter().filter(|(_, v)| !v.ok()).count();
            if blocked > 0 {
                b.push_str(&notice(
                    "warn",
                    &format!(
                        "{blocked} device{} blocked by errors: no task will be created for {}. Warnings do not block.",
                        if blocked == 1 { " is" } else { "s are" },
                        if blocked == 1 { "it" } else { "them" }
                    ),
                ));
            } else {
                b.push_str(&notice("ok", "No errors: every device listed gets a task."));
            }
            b.push_str("<table id=validation><thead><tr><th>Device</th><th>Verdict</th><th>Errors and warnings</th></tr></thead><tbody>");
            for (mac, v) in rows {
                let verdict = if !v.ok() {
                    badge("blocked", "blocked")
                } else if !v.warnings.is_empty() {
                    badge("warned", "runs, with warnings")
                } else {
                    badge("ok", "ok")
                };
                let _ = write!(
                    b,
                    "<tr data-mac=\"{}\"><td class=mono>{}</td><td>{verdict}</td><td>{}</td></tr>",
                    esc(mac),
                    esc(mac),
                    validation_html(v)
                );
            }
            b.push_str("</tbody></table>");
        }
        b.push_str("</section>");
    }
    b.push_str("</form>");
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
