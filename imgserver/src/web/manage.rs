//! The console's management forms: register an image from a URL, a device's group,
//! approving a pending enrolment, forgetting a device, and admin tokens (list, issue with
//! the token shown once, revoke). Every form carries the session's CSRF token and is shown
//! only to a role that may use it; the handler checks the role again ([`guard`]) and the
//! admin core checks it a third time and records the change with the administrator's name.

use std::fmt::Write;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::HeaderMap;
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use serde::Deserialize;

use super::ops::{actor, Console, OpError};
use super::page::{button_form, csrf_field, esc, frame, notice, time, url_enc, Nav};
use super::session::Signed;
use super::views::{blocking, error_page, guard, images_with, CsrfOnly};
use crate::admin::{DeviceSummary, Role};
use crate::api::AppState;

type Ctx = Extension<Arc<Console>>;

// ---------------------------------------------------------------------------------------
// Images

/// The "register from a URL" form on the image repository (admins only).
pub fn add_image_form(who: &Signed) -> String {
    format!(
        "<form method=post action=\"/images/add\" class=\"grid addimage\" id=add-image>{}<fieldset><legend>Register an image from a URL</legend>\
<label>URL <input type=url name=url id=image-url required size=60 placeholder=\"https://files.example/os-6.img\"></label>\
<label>RAM it needs (MiB, 0: none) <input type=number name=min_ram_mib min=0 value=0 class=short></label>\
<p class=hint>The server reads the image's header from the URL now and keeps only the URL; devices fetch the image from there.</p>\
<button type=submit class=primary id=add-image-submit>Register</button></fieldset></form>\
<form method=post action=\"/images/upload\" class=\"grid addimage\" id=upload-image>{}<fieldset><legend>Upload an image file</legend>\
<label>Image file <input type=file name=file id=upload-file required></label>\
<label>RAM it needs (MiB, 0: none) <input type=number name=min_ram_mib id=upload-ram min=0 value=0 class=short></label>\
<p class=hint>The file is sent as it is and stored in the server's repository. This needs the console's script; without it use <code>imgserver image add FILE</code> on the server or the admin API's upload.</p>\
<button type=submit class=primary id=upload-submit>Upload and register</button> <span id=upload-status class=muted role=status></span></fieldset></form>",
        csrf_field(who),
        csrf_field(who)
    )
}

#[derive(Deserialize)]
pub struct AddImage {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    url: String,
    #[serde(default)]
    min_ram_mib: String,
}

pub async fn image_add(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Form(f): Form<AddImage>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_manage()) {
        return r;
    }
    let (w, c2, st2) = (who.clone(), c.clone(), st.clone());
    let url = f.url.trim().to_string();
    let res = blocking(move || {
        let mib = match f.min_ram_mib.trim() {
            "" => 0,
            m => m.parse::<u64>().map_err(|_| {
                OpError::Invalid(format!("RAM it needs {m:?}: a whole number of MiB"))
            })?,
        };
        if url.is_empty() {
            return Err(OpError::Invalid("the image's URL is empty".into()));
        }
        Ok(c2
            .core(&st2)?
            .add_image_url(&actor(&w), &url, None, mib << 20)?)
    })
    .await;
    let note = match res {
        Ok(img) => notice(
            "ok",
            &format!(
                "Registered image {} {} (id {}).",
                img.name, img.version, img.id
            ),
        ),
        Err(OpError::Forbidden(e)) => return error_page(&who, OpError::Forbidden(e)),
        Err(e) => notice("error", &format!("The image was not registered: {e}")),
    };
    images_with(who, st, c, note).await
}

// ---------------------------------------------------------------------------------------
// Devices

/// The group form (operators), Approve (admins, for a pending enrolment) and Forget
/// (admins, after a confirmation) on a device's page.
pub fn device_forms(who: &Signed, s: &DeviceSummary) -> String {
    if !who.may_schedule() {
        return String::new();
    }
    let mac = url_enc(&s.mac);
    let mut b = String::from("<div class=actions id=device-manage>");
    let _ = write!(
        b,
        "<form method=post action=\"/devices/{mac}/group\" class=inline id=group-form>{}<label>Group <input name=group id=group value=\"{}\" size=18 maxlength=64 placeholder=\"(none)\"></label> <button type=submit id=set-group>Set group</button></form>",
        csrf_field(who),
        esc(s.group.as_deref().unwrap_or(""))
    );
    if who.may_manage() {
        if s.state == "pending_approval" {
            b.push_str(&button_form(
                who,
                &format!("/devices/{mac}/approve"),
                "Approve enrolment",
                "primary",
                "",
            ));
        }
        b.push_str(&button_form(
            who,
            &format!("/devices/{mac}/forget"),
            "Forget device",
            "danger",
            &format!(
                "Forget {}? Its records, inventory and credential are deleted; it enrols again at its next check-in.",
                s.mac
            ),
        ));
    }
    b.push_str("</div>");
    b
}

#[derive(Deserialize)]
pub struct GroupForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    group: String,
}

pub async fn device_group(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path(mac): Path<String>,
    Form(f): Form<GroupForm>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_schedule()) {
        return r;
    }
    let (w, m) = (who.clone(), mac.clone());
    let g = f.group.trim().to_string();
    match blocking(move || {
        Ok(c.core(&st)?
            .set_group(&actor(&w), &m, (!g.is_empty()).then_some(g.as_str()))?)
    })
    .await
    {
        Ok(()) => Redirect::to(&format!("/devices/{}", url_enc(&mac))).into_response(),
        Err(e) => error_page(&who, e),
    }
}

/// `approve` or `forget` (admins).
pub async fn device_admin(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path((mac, action)): Path<(String, String)>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_manage()) {
        return r;
    }
    let (w, m, a) = (who.clone(), mac.clone(), action.clone());
    let res = blocking(move || {
        let core = c.core(&st)?;
        match a.as_str() {
            "approve" => Ok(core.approve(&actor(&w), &m)?),
            "forget" => Ok(core.forget(&actor(&w), &m)?),
            other => Err(OpError::NotFound(format!(
                "no device action {other:?}: approve or forget"
            ))),
        }
    })
    .await;
    match res {
        Ok(()) if action == "forget" => Redirect::to("/").into_response(),
        Ok(()) => Redirect::to(&format!("/devices/{}", url_enc(&mac))).into_response(),
        Err(e) => error_page(&who, e),
    }
}

// ---------------------------------------------------------------------------------------
// Admin tokens

/// The token list with `note` above it (admins only; the core refuses anyone else).
async fn tokens_page(who: Signed, st: Arc<AppState>, c: Arc<Console>, note: String) -> Response {
    let w = who.clone();
    let list = match blocking(move || Ok(c.core(&st)?.tokens(&actor(&w))?)).await {
        Ok(l) => l,
        Err(e) => return error_page(&who, e),
    };
    let mut b = String::from("<h1>Admin tokens</h1>");
    b.push_str(&note);
    let _ = write!(
        b,
        "<form method=post action=\"/tokens/add\" class=grid id=add-token>{}<fieldset><legend>Issue a token</legend>\
<label>Name <input name=name id=token-name required maxlength=64 pattern=\"[A-Za-z0-9._@-]+\" placeholder=\"alice\"></label>\
<label>Role <select name=role id=token-role><option value=viewer>viewer: sees everything, changes nothing</option><option value=operator selected>operator: schedules, aborts, retries, rolls back</option><option value=admin>admin: also images, devices and tokens</option></select></label>\
<p class=hint>The token is shown once, on the next page; the server keeps only its hash.</p>\
<button type=submit class=primary id=add-token-submit>Issue token</button></fieldset></form>",
        csrf_field(&who)
    );
    b.push_str("<table id=tokens><thead><tr><th>Name</th><th>Role</th><th>Issued</th><th>By</th><th>Last used</th><th>State</th><th></th></tr></thead><tbody>");
    for t in &list {
        let action = if t.revoked.is_none() {
            button_form(
                &who,
                &format!("/tokens/{}/revoke", url_enc(&t.name)),
                "Revoke",
                "danger",
                &format!(
                    "Revoke the token {}? Its sessions end at their next click.",
                    t.name
                ),
            )
        } else {
            String::new()
        };
        let _ = write!(
            b,
            "<tr><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            esc(&t.name),
            t.role.as_str(),
            time(Some(t.created)),
            esc(&t.created_by),
            time(t.last_used),
            match t.revoked {
                Some(r) => format!("<span class=\"badge s-removed\">revoked</span> {}", time(Some(r))),
                None => "<span class=\"badge s-ok\">live</span>".into(),
            },
            action
        );
    }
    b.push_str("</tbody></table>");
    Html(frame(Some(&who), Nav::Tokens, "Admin tokens", &b, false)).into_response()
}

pub async fn tokens(who: Signed, State(st): State<Arc<AppState>>, Extension(c): Ctx) -> Response {
    tokens_page(who, st, c, String::new()).await
}

#[derive(Deserialize)]
pub struct AddToken {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    role: String,
}

pub async fn token_add(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Form(f): Form<AddToken>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_manage()) {
        return r;
    }
    let (w, c2, st2) = (who.clone(), c.clone(), st.clone());
    let name = f.name.trim().to_string();
    let n2 = name.clone();
    let res = blocking(move || {
        let role = Role::parse(f.role.trim()).ok_or_else(|| {
            OpError::Invalid(format!("role {:?}: viewer, operator or admin", f.role))
        })?;
        Ok((c2.core(&st2)?.add_token(&actor(&w), &n2, role)?, role))
    })
    .await;
    let note = match res {
        Ok((token, role)) => format!(
            "<div class=\"notice ok\" role=status id=new-token-box>Token for <b>{}</b> ({}), shown only this once: copy it now.<br><code id=new-token>{}</code></div>",
            esc(&name),
            role.as_str(),
            esc(&token)
        ),
        Err(OpError::Forbidden(e)) => return error_page(&who, OpError::Forbidden(e)),
        Err(e) => notice("error", &format!("No token was issued: {e}")),
    };
    tokens_page(who, st, c, note).await
}

pub async fn token_revoke(
    who: Signed,
    State(st): State<Arc<AppState>>,
    Extension(c): Ctx,
    headers: HeaderMap,
    Path(name): Path<String>,
    Form(f): Form<CsrfOnly>,
) -> Response {
    if let Some(r) = guard(&who, &headers, &f.csrf, who.may_manage()) {
        return r;
    }
    let (w, c2, st2, n2) = (who.clone(), c.clone(), st.clone(), name.clone());
    let res = blocking(move || Ok(c2.core(&st2)?.revoke_token(&actor(&w), &n2)?)).await;
    let note = match res {
        Ok(()) => notice("ok", &format!("Revoked the token {name}.")),
        Err(OpError::Forbidden(e)) => return error_page(&who, OpError::Forbidden(e)),
        Err(e) => notice("error", &format!("Not revoked: {e}")),
    };
    tokens_page(who, st, c, note).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn signed(role: Role) -> Signed {
        Signed {
            name: "t".into(),
            role,
            token_hash: "h".into(),
            csrf: "c\"sr<f".into(),
            key: "k".into(),
        }
    }

    fn device(state: &str) -> DeviceSummary {
        serde_json::from_value(serde_json::json!({
            "mac": "52:54:00:00:00:0a", "state": state, "state_title": state,
            "group": "<lab>", "ram_bytes": 0
        }))
        .unwrap_or_else(|e| panic!("a device summary from JSON: {e}"))
    }

    #[test]
    fn device_forms_follow_the_role() {
        let d = device("pending_approval");
        assert_eq!(device_forms(&signed(Role::Viewer), &d), "");
        let op = device_forms(&signed(Role::Operator), &d);
        assert!(op.contains("/group\""), "{op}");
        assert!(!op.contains("forget") && !op.contains("approve"), "{op}");
        assert!(
            op.contains("value=\"&lt;lab&gt;\""),
            "the group is escaped: {op}"
        );
        assert!(
            op.contains("value=\"c&quot;sr&lt;f\""),
            "the CSRF field: {op}"
        );
        let ad = device_forms(&signed(Role::Admin), &d);
        assert!(
            ad.contains("/approve\"") && ad.contains("/forget\""),
            "{ad}"
        );
        assert!(ad.contains("data-confirm="), "forgetting asks first: {ad}");
        let ad = device_forms(&signed(Role::Admin), &device("operational"));
        assert!(!ad.contains("/approve\""), "nothing to approve: {ad}");
    }

    #[test]
    fn the_image_form_carries_the_csrf_token() {
        let f = add_image_form(&signed(Role::Admin));
        assert!(f.contains("name=csrf value=\"c&quot;sr&lt;f\""), "{f}");
        assert!(f.contains("action=\"/images/add\""), "{f}");
    }
}
