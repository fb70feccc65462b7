//! `imgserver admin add|list|revoke|audit`: admin API tokens and the audit trail, through
//! the admin core on the server host.

use std::path::Path;

use anyhow::anyhow;

use super::*;
use crate::admin::{window, Role};

/// `imgserver admin add NAME --role ROLE`: print a new token once (it is stored hashed).
pub(super) fn add(data: &Path, name: String, role: Option<String>) -> anyhow::Result<i32> {
    let role =
        role.ok_or_else(|| anyhow!("admin add {name} needs --role admin|operator|viewer"))?;
    let role = Role::parse(&role)
        .ok_or_else(|| anyhow!("--role {role:?}: use admin, operator or viewer"))?;
    let token = open_admin(data)?.add_token(&Actor::host(), &name, role)?;
    println!("{token}");
    eprintln!(
        "admin token {name:?} ({}) issued: it is shown this once and stored only hashed; send it as `Authorization: Bearer TOKEN`",
        role.as_str()
    );
    Ok(0)
}

/// `imgserver admin list`: the tokens (never the tokens themselves).
pub(super) fn list(data: &Path, tz: Option<&str>) -> anyhow::Result<i32> {
    let tz = window::zone(tz)?;
    let mut t = Table::new(&["NAME", "ROLE", "CREATED", "BY", "LAST USED", "REVOKED"]);
    for k in open_admin(data)?.tokens(&Actor::host())? {
        t.row(vec![
            k.name,
            k.role.as_str().into(),
            window::show(k.created, &tz),
            k.created_by,
            k.last_used
                .map(|x| window::show(x, &tz))
                .unwrap_or_else(|| "never".into()),
            k.revoked
                .map(|x| window::show(x, &tz))
                .unwrap_or_else(|| "-".into()),
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}

/// `imgserver admin revoke NAME`.
pub(super) fn revoke(data: &Path, name: String) -> anyhow::Result<i32> {
    open_admin(data)?.revoke_token(&Actor::host(), &name)?;
    println!("admin token {name:?} revoked");
    Ok(0)
}

/// `imgserver admin audit [--target T] [--limit N]`: the audit trail, newest first.
pub(super) fn audit(
    data: &Path,
    target: Option<String>,
    limit: Option<String>,
    tz: Option<&str>,
) -> anyhow::Result<i32> {
    let tz = window::zone(tz)?;
    let limit = match limit {
        Some(l) => l
            .parse()
            .map_err(|_| anyhow!("--limit {l:?} is not a number"))?,
        None => 100,
    };
    let mut t = Table::new(&["WHEN", "WHO", "ROLE", "ACTION", "TARGET", "DETAIL"]);
    for a in open_admin(data)?.audit(&Actor::host(), target.as_deref(), limit)? {
        t.row(vec![
            window::show(a.at, &tz),
            a.actor,
            a.role.as_str().into(),
            a.action,
            a.target,
            a.detail,
        ]);
    }
    print!("{}", t.render());
    Ok(0)
}
