//! The administrator's tables: admin tokens (stored as SHA-256 only) and the audit trail
//! (who changed what, when). They live in the server's database file (the schema step
//! [`MIGRATION`] runs with the store's migrations) and are read through a connection of
//! their own, so the device-side [`crate::store::Store`] stays as narrow as it was. An audit
//! record is written in the transaction of the change it records: by the store for fleet
//! changes (`store::with_audit`), here for token changes.

use std::path::Path;
use std::sync::Mutex;

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{AdminError, Role};
use crate::store::AuditEntry;

/// The store's schema step for the admin tables (one entry of `store::MIGRATIONS`).
pub const MIGRATION: &str = "CREATE TABLE admin_tokens (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        role TEXT NOT NULL,
        hash TEXT NOT NULL UNIQUE,
        created INTEGER NOT NULL,
        created_by TEXT NOT NULL,
        last_used INTEGER,
        revoked INTEGER
     );
     CREATE UNIQUE INDEX admin_tokens_live_name ON admin_tokens(name) WHERE revoked IS NULL;
     CREATE TABLE admin_audit (
        id INTEGER PRIMARY KEY,
        at INTEGER NOT NULL,
        actor TEXT NOT NULL,
        role TEXT NOT NULL,
        action TEXT NOT NULL,
        target TEXT NOT NULL,
        detail TEXT NOT NULL DEFAULT ''
     );
     CREATE INDEX admin_audit_by_target ON admin_audit(target, id);";

/// One admin token as listed (never the token itself).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TokenInfo {
    pub name: String,
    pub role: Role,
    pub created: u64,
    pub created_by: String,
    pub last_used: Option<u64>,
    pub revoked: Option<u64>,
}

/// One audit record: seed 003's "changed by" and "last action".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRow {
    pub id: u64,
    pub at: u64,
    /// The token name (API) or `host:USER` (the command line on the server host).
    pub actor: String,
    pub role: Role,
    /// e.g. `job.create`, `job.abort`, `device.operational`, `image.remove`, `token.add`.
    pub action: String,
    /// What it acted on: `job:7`, `device:52:54:00:00:00:01`, `image:3`, `token:alice`.
    pub target: String,
    pub detail: String,
}

pub struct AdminDb {
    conn: Mutex<Connection>,
}

fn u(v: i64) -> u64 {
    v.max(0) as u64
}

fn i(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl AdminDb {
    /// Open the server's database (the store has run the migrations already).
    pub fn open(db: &Path) -> Result<AdminDb, AdminError> {
        let conn = Connection::open(db)?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        let has: Option<i64> = conn
            .query_row(
                "SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'admin_tokens'",
                [],
                |r| r.get(0),
            )
            .optional()?;
        if has.is_none() {
            return Err(AdminError::Invalid(format!(
                "{} has no admin tables: open it with this imgserver's store first (it migrates the schema)",
                db.display()
            )));
        }
        Ok(AdminDb {
            conn: Mutex::new(conn),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Connection> {
        self.conn.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn add_token(
        &self,
        name: &str,
        role: Role,
        hash: &str,
        audit: &AuditEntry,
    ) -> Result<(), AdminError> {
        let (by, now) = (audit.actor.as_str(), audit.at);
        let mut conn = self.lock();
        // The token and its audit record: one transaction.
        let conn = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let taken: Option<i64> = conn
            .query_row(
                "SELECT id FROM admin_tokens WHERE name = ?1 AND revoked IS NULL",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        if taken.is_some() {
            return Err(AdminError::Conflict(format!(
                "an admin token named {name:?} exists: revoke it first (`imgserver admin revoke {name}`) or choose another name"
            )));
        }
        conn.execute(
            "INSERT INTO admin_tokens (name, role, hash, created, created_by) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![name, role.as_str(), hash, i(now), by],
        )?;
        crate::store::insert_audit(&conn, audit)?;
        conn.commit()?;
        Ok(())
    }

    /// The live token with this hash: (name, role). Marks it used (at most once a minute).
    pub fn token_by_hash(
        &self,
        hash: &str,
        now: u64,
    ) -> Result<Option<(String, Role)>, AdminError> {
        let conn = self.lock();
        let row: Option<(i64, String, String)> = conn
            .prepare_cached(
                "SELECT id, name, role FROM admin_tokens WHERE hash = ?1 AND revoked IS NULL",
            )?
            .query_row([hash], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)))
            .optional()?;
        let Some((id, name, role)) = row else {
            return Ok(None);
        };
        conn.prepare_cached(
            "UPDATE admin_tokens SET last_used = ?2 WHERE id = ?1 AND (last_used IS NULL OR last_used < ?2 - 60)",
        )?
        .execute(params![id, i(now)])?;
        Ok(Role::parse(&role).map(|r| (name, r)))
    }

    pub fn tokens(&self) -> Result<Vec<TokenInfo>, AdminError> {
        let conn = self.lock();
        let rows = conn
            .prepare("SELECT name, role, created, created_by, last_used, revoked FROM admin_tokens ORDER BY revoked IS NOT NULL, name, id")?
            .query_map([], |r| {
                Ok(TokenInfo {
                    name: r.get(0)?,
                    role: Role::parse(&r.get::<_, String>(1)?).unwrap_or(Role::Viewer),
                    created: u(r.get(2)?),
                    created_by: r.get(3)?,
                    last_used: r.get::<_, Option<i64>>(4)?.map(u),
                    revoked: r.get::<_, Option<i64>>(5)?.map(u),
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Revoke the live token `name` and record it, in one transaction; false (and no
    /// record) if there is none.
    pub fn revoke(&self, name: &str, audit: &AuditEntry) -> Result<bool, AdminError> {
        let mut conn = self.lock();
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let n = tx.execute(
            "UPDATE admin_tokens SET revoked = ?2 WHERE name = ?1 AND revoked IS NULL",
            params![name, i(audit.at)],
        )?;
        if n > 0 {
            crate::store::insert_audit(&tx, audit)?;
        }
        tx.commit()?;
        Ok(n > 0)
    }

    /// The newest `limit` records, newest first; only those on `target` if given.
    pub fn audit(&self, target: Option<&str>, limit: u32) -> Result<Vec<AuditRow>, AdminError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT id, at, actor, role, action, target, detail FROM admin_audit
             WHERE ?1 IS NULL OR target = ?1 ORDER BY id DESC LIMIT ?2",
        )?;
        let rows = stmt
            .query_map(params![target, limit], |r| {
                Ok(AuditRow {
                    id: u(r.get(0)?),
                    at: u(r.get(1)?),
                    actor: r.get(2)?,
                    role: Role::parse(&r.get::<_, String>(3)?).unwrap_or(Role::Viewer),
                    action: r.get(4)?,
                    target: r.get(5)?,
                    detail: r.get(6)?,
                })
            })?
            .collect::<rusqlite::Result<_>>()?;
        Ok(rows)
    }

    /// Who created each job (`job:N` targets of `job.create`), for the jobs list.
    pub fn job_creators(&self) -> Result<std::collections::HashMap<u64, String>, AdminError> {
        let conn = self.lock();
        let mut stmt = conn.prepare_cached(
            "SELECT target, actor FROM admin_audit WHERE action IN ('job.create', 'job.retry', 'job.rollback') AND target LIKE 'job:%'",
        )?;
        let rows = stmt
            .query_map([], |r| Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        Ok(rows
            .into_iter()
            .filter_map(|(t, a)| Some((t.strip_prefix("job:")?.parse().ok()?, a)))
            .collect())
    }

    /// The last action on `target`: (when, who).
    pub fn last_action(&self, target: &str) -> Result<Option<(u64, String)>, AdminError> {
        let conn = self.lock();
        let row = conn
            .prepare_cached(
                "SELECT at, actor FROM admin_audit WHERE target = ?1 ORDER BY id DESC LIMIT 1",
            )?
            .query_row([target], |r| Ok((u(r.get(0)?), r.get(1)?)))
            .optional()?;
        Ok(row)
    }
}
