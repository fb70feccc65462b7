//! Devices: listing, state, groups, forgetting.

use super::*;

pub(super) fn devices(conn: &Connection) -> Result<Vec<DeviceRow>> {
    let rows = conn
        .prepare(&format!("SELECT {DEVICE_COLS} FROM devices ORDER BY mac"))?
        .query_map([], device_row)?
        .collect::<rusqlite::Result<_>>()?;
    Ok(rows)
}

pub(super) fn device(conn: &Connection, mac: &str) -> Result<Option<DeviceRow>> {
    let row = conn
        .prepare(&format!("SELECT {DEVICE_COLS} FROM devices WHERE mac = ?1"))?
        .query_row([mac], device_row)
        .optional()?;
    Ok(row)
}

pub(super) fn set_device_state(
    conn: &Connection,
    mac: &str,
    state: DeviceState,
    reason: Option<&str>,
) -> Result<()> {
    let n = conn.execute(
        "UPDATE devices SET state = ?2, state_reason = ?3, trouble_since = NULL WHERE mac = ?1",
        params![mac, state.as_str(), reason],
    )?;
    if n == 0 {
        return Err(StoreError::NotFound(format!(
            "no device {mac}: see `imgserver devices`"
        )));
    }
    Ok(())
}

pub(super) fn set_group(conn: &Connection, mac: &str, group: Option<&str>) -> Result<()> {
    let n = conn.execute(
        "UPDATE devices SET grp = ?2 WHERE mac = ?1",
        params![mac, group],
    )?;
    if n == 0 {
        conn.execute(
            "INSERT INTO devices (mac, grp) VALUES (?1, ?2)",
            params![mac, group],
        )?;
    }
    Ok(())
}

pub(super) fn forget(tx: &Transaction, mac: &str) -> Result<bool> {
    let id: Option<i64> = tx
        .query_row("SELECT id FROM devices WHERE mac = ?1", [mac], |r| r.get(0))
        .optional()?;
    let Some(id) = id else { return Ok(false) };
    tx.execute("DELETE FROM transcript WHERE device_id = ?1", [id])?;
    tx.execute("DELETE FROM results WHERE device_id = ?1", [id])?;
    tx.execute("DELETE FROM tasks WHERE device_id = ?1", [id])?;
    tx.execute("DELETE FROM devices WHERE id = ?1", [id])?;
    Ok(true)
}
