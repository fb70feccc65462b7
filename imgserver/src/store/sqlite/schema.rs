//! The SQLite schema: versioned migrations, applied in order at open.

use rusqlite::Connection;

use super::super::{Result, StoreError};

/// Schema migrations, applied in order; `PRAGMA user_version` holds how many have run.
const MIGRATIONS: &[&str] = &[
    // 1: the first schema.
    "CREATE TABLE devices (
        id INTEGER PRIMARY KEY,
        mac TEXT NOT NULL UNIQUE,
        credential TEXT UNIQUE,
        grp TEXT,
        serial TEXT, uuid TEXT, model TEXT, hostname TEXT,
        ram_bytes INTEGER NOT NULL DEFAULT 0,
        agent_version TEXT,
        inventory TEXT,
        state TEXT NOT NULL DEFAULT 'operational',
        state_reason TEXT,
        trouble_since INTEGER,
        image_name TEXT, image_version TEXT,
        enrolled INTEGER, last_seen INTEGER
     );
     CREATE TABLE images (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL, version TEXT NOT NULL,
        file TEXT, url TEXT, size INTEGER,
        facts TEXT NOT NULL,
        sealed INTEGER NOT NULL DEFAULT 0, signed_by TEXT, description TEXT,
        added INTEGER NOT NULL,
        UNIQUE(name, version)
     );
     CREATE TABLE jobs (
        id INTEGER PRIMARY KEY,
        kind TEXT NOT NULL,
        image_id INTEGER REFERENCES images(id),
        options TEXT NOT NULL,
        selector TEXT NOT NULL,
        state TEXT NOT NULL DEFAULT 'active',
        created INTEGER NOT NULL,
        note TEXT
     );
     CREATE TABLE tasks (
        id INTEGER PRIMARY KEY,
        job_id INTEGER NOT NULL REFERENCES jobs(id),
        device_id INTEGER NOT NULL REFERENCES devices(id),
        state TEXT NOT NULL DEFAULT 'pending',
        validation TEXT NOT NULL DEFAULT '{}',
        progress TEXT, progress_seq INTEGER NOT NULL DEFAULT 0,
        upload_key TEXT,
        message TEXT,
        prev_image TEXT,
        created INTEGER NOT NULL, sent_at INTEGER, updated INTEGER NOT NULL, finished INTEGER,
        UNIQUE(job_id, device_id)
     );
     CREATE INDEX tasks_by_device ON tasks(device_id, state);
     CREATE TABLE results (
        report TEXT PRIMARY KEY,
        task_id INTEGER NOT NULL,
        device_id INTEGER NOT NULL,
        received INTEGER NOT NULL,
        body TEXT NOT NULL
     );
     CREATE TABLE transcript (
        id INTEGER PRIMARY KEY,
        device_id INTEGER NOT NULL,
        task_id INTEGER,
        at INTEGER NOT NULL,
        line TEXT NOT NULL
     );
     CREATE INDEX transcript_by_device ON transcript(device_id, id);",
    // 2: enrolment approval, captured images, ignored results counted instead of stored.
    "ALTER TABLE devices ADD COLUMN approval TEXT;
     ALTER TABLE devices ADD COLUMN enrol_addr TEXT;
     ALTER TABLE images ADD COLUMN captured_from TEXT;
     ALTER TABLE tasks ADD COLUMN ignored_results INTEGER NOT NULL DEFAULT 0;",
    // 3: admin tokens and the audit trail (`crate::admin::db`).
    crate::admin::db::MIGRATION,
    // 4: seed 001's autogenic images (`crate::autogenic`).
    "ALTER TABLE images ADD COLUMN autogenic INTEGER NOT NULL DEFAULT 0;",
];

/// Bring the database up to the newest schema; refuse one newer than this program knows.
pub(super) fn migrate(conn: &mut Connection) -> Result<()> {
    let have: usize =
        conn.pragma_query_value(None, "user_version", |r| r.get::<_, i64>(0))? as usize;
    if have > MIGRATIONS.len() {
        return Err(StoreError::Invalid(format!(
            "the database has schema version {have}, this imgserver knows {}: use a newer imgserver",
            MIGRATIONS.len()
        )));
    }
    for (i, sql) in MIGRATIONS.iter().enumerate().skip(have) {
        let tx = conn.transaction()?;
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", (i + 1) as i64)?;
        tx.commit()?;
    }
    Ok(())
}
