//! The image register.

use super::*;

pub(super) fn add_image(conn: &Connection, img: &ImageRow) -> Result<u64> {
    let exists: Option<i64> = conn
        .query_row(
            "SELECT id FROM images WHERE name = ?1 AND version = ?2",
            params![img.name, img.version],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(id) = exists {
        return Err(StoreError::Conflict(format!(
            "image {} {} is already registered (id {id}): remove it first or give the new one another version",
            img.name, img.version
        )));
    }
    conn.execute(
        "INSERT INTO images (name, version, file, url, size, facts, sealed, signed_by, description, added, captured_from, autogenic) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12)",
        params![
            img.name,
            img.version,
            img.file,
            img.url,
            img.size.map(i),
            serde_json::to_string(&img.facts)?,
            img.sealed,
            img.signed_by,
            img.description,
            i(img.added),
            img.captured_from,
            img.autogenic
        ],
    )?;
    Ok(u(conn.last_insert_rowid()))
}

pub(super) fn images(conn: &Connection) -> Result<Vec<ImageRow>> {
    let rows = conn
        .prepare(&format!(
            "SELECT {IMAGE_COLS} FROM images ORDER BY name, id"
        ))?
        .query_map([], image_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub(super) fn image(
    conn: &Connection,
    name: &str,
    version: Option<&str>,
) -> Result<Option<ImageRow>> {
    let mut rows: Vec<ImageRow> = conn
        .prepare(&format!("SELECT {IMAGE_COLS} FROM images WHERE name = ?1"))?
        .query_map([name], image_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(match version {
        Some(v) => rows.into_iter().find(|r| r.version == v),
        None => {
            // The newest version by the model's ordering. Captured images are never
            // picked implicitly: an upload must not become what "latest" deploys.
            rows.retain(|r| r.captured_from.is_none());
            rows.sort_by(|a, b| model::compare_versions(&a.version, &b.version));
            rows.pop()
        }
    })
}

pub(super) fn image_by_id(conn: &Connection, id: u64) -> Result<Option<ImageRow>> {
    load_image(conn, id)
}

pub(super) fn remove_image(conn: &Connection, id: u64) -> Result<()> {
    let busy: Option<i64> = conn
        .query_row(
            "SELECT j.id FROM jobs j JOIN tasks t ON t.job_id = j.id WHERE j.image_id = ?1 AND j.state = ?2 AND t.state IN (?3, ?4, ?5) LIMIT 1",
            params![i(id), JobState::Active.as_str(), TaskState::Pending.as_str(), TaskState::Sent.as_str(), TaskState::Running.as_str()],
            |r| r.get(0),
        )
        .optional()?;
    if let Some(job) = busy {
        return Err(StoreError::Conflict(format!(
            "image {id} is used by unfinished job {job}: `imgserver schedule remove {job}` first"
        )));
    }
    conn.execute(
        "UPDATE jobs SET image_id = NULL WHERE image_id = ?1",
        [i(id)],
    )?;
    let n = conn.execute("DELETE FROM images WHERE id = ?1", [i(id)])?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no image {id}: see `imgserver image list`"
        )));
    }
    Ok(())
}

pub(super) fn set_image_signature(
    conn: &Connection,
    id: u64,
    signed_by: Option<&str>,
    sealed: bool,
    size: Option<u64>,
) -> Result<()> {
    let n = conn.execute(
        "UPDATE images SET signed_by = ?2, sealed = ?3, size = ?4 WHERE id = ?1",
        params![i(id), signed_by, sealed, size.map(i)],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no image {id}: see `imgserver image list`"
        )));
    }
    Ok(())
}
