//! The check-in: enrolment and credentials, approval, and what a check-in decides.

use super::*;

pub(super) fn checkin(
    tx: &Transaction,
    req: &CheckIn,
    secrets: &CheckInSecrets,
    now: u64,
    policy: &Policy,
) -> Result<CheckInDecision> {
    let (device, enrolled, pending) = enrol_or_authenticate(tx, req, secrets, now)?;
    // The proof is not inventory: never stored.
    let inv = serde_json::to_string(&CheckIn {
        enrol_proof: None,
        results: Vec::new(),
        ..req.clone()
    })?;
    let known = load_device(tx, device)?
        .ok_or_else(|| StoreError::NotFound(format!("device {device} is gone")))?;
    let state = model::state_at_checkin(known.state, known.trouble_since, now, policy.reload_wait);
    tx.prepare_cached(
        "UPDATE devices SET serial = ?2, uuid = ?3, model = ?4, hostname = ?5, ram_bytes = ?6, agent_version = ?7,
            inventory = ?8, last_seen = ?9,
            state = ?10
         WHERE id = ?1",
    )?
    .execute(params![
        i(device),
        req.device.serial,
        req.device.uuid,
        req.device.model,
        req.device.hostname,
        i(req.device.ram_bytes),
        req.device.agent_version,
        inv,
        i(now),
        state.as_str(),
    ])?;
    // Seed 001: a device whose re-imaging from its backup partition failed too often
    // reports Maintenance (with why) until a check-in without it.
    if let Some((state, reason)) = crate::autogenic::maintenance_at_checkin(
        state,
        known.state_reason.as_deref(),
        req.maintenance.as_deref(),
    ) {
        let changed = tx
            .prepare_cached(
                "UPDATE devices SET state = ?2, state_reason = ?3 WHERE id = ?1 AND (state != ?2 OR state_reason IS NOT ?3)",
            )?
            .execute(params![i(device), state.as_str(), reason])?;
        if changed > 0 {
            let line = match &reason {
                Some(r) => format!("Maintenance: {r}"),
                None => "the device no longer reports maintenance: Operational".into(),
            };
            transcript(tx, device, None, now, &line)?;
        }
    }
    if pending {
        // Until approved: the inventory is shown to the administrator, nothing else.
        return Ok(CheckInDecision {
            device,
            enrolled,
            pending,
            acked: Vec::new(),
            task: None,
        });
    }
    let mut acked = Vec::new();
    for r in &req.results {
        match super::results::apply_result(tx, device, r, now) {
            Ok(_) => acked.push(r.report.clone()),
            // Another device's task: never applied; acknowledged so the device stops
            // re-sending something that can never be accepted.
            Err(StoreError::NotFound(msg)) => {
                transcript(tx, device, None, now, &format!("refused a result: {msg}"))?;
                acked.push(r.report.clone());
            }
            Err(e) => return Err(e),
        }
    }
    // The device is back: a failure it reported no longer means "unreachable".
    tx.execute(
        "UPDATE devices SET trouble_since = NULL WHERE id = ?1 AND state != ?3 AND trouble_since IS NOT NULL AND trouble_since < ?2",
        params![i(device), i(now), DeviceState::Maintenance.as_str()],
    )?;
    let task = super::jobs::next_task(tx, device, secrets, now)?;
    Ok(CheckInDecision {
        device,
        enrolled,
        pending,
        acked,
        task,
    })
}

pub(super) fn device_by_credential(conn: &Connection, hash: &str) -> Result<Option<DeviceRow>> {
    let row = conn
        .prepare_cached(&format!(
            "SELECT {DEVICE_COLS} FROM devices WHERE credential = ?1"
        ))?
        .query_row([hash], device_row)
        .optional()?;
    Ok(row)
}

pub(super) fn approve(tx: &Transaction, mac: &str, now: u64) -> Result<bool> {
    let id: Option<i64> = tx
        .query_row(
            "UPDATE devices SET approval = NULL WHERE mac = ?1 AND approval IS ?2 RETURNING id",
            params![mac, model::APPROVAL_PENDING],
            |r| r.get(0),
        )
        .optional()?;
    let Some(id) = id else { return Ok(false) };
    transcript(
        tx,
        u(id),
        None,
        now,
        "enrolment approved by the administrator",
    )?;
    Ok(true)
}

/// Who is checking in: (device id, enrolled now, pending approval).
pub(super) fn enrol_or_authenticate(
    tx: &Transaction,
    req: &CheckIn,
    secrets: &CheckInSecrets,
    now: u64,
) -> Result<(u64, bool, bool)> {
    let mac = crate::protocol::normalize_mac(&req.device.mac).ok_or_else(|| {
        StoreError::Invalid(format!(
            "device MAC {:?} is not six hex octets",
            req.device.mac
        ))
    })?;
    if let Some(hash) = &secrets.presented {
        let row: Option<(i64, String, bool)> = tx
            .prepare_cached("SELECT id, mac, approval IS ?2 FROM devices WHERE credential = ?1")?
            .query_row(params![hash, model::APPROVAL_PENDING], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })
            .optional()?;
        let (id, known_mac, pending) = row.ok_or(StoreError::BadCredential)?;
        if known_mac != mac {
            return Err(StoreError::Conflict(format!(
                "this credential belongs to device {known_mac}, not {mac}"
            )));
        }
        return Ok((u(id), false, pending));
    }
    let row: Option<(i64, bool, bool, Option<String>)> = tx
        .prepare_cached("SELECT id, credential IS NOT NULL, approval IS ?2, enrol_addr FROM devices WHERE mac = ?1")?
        .query_row(params![mac, model::APPROVAL_PENDING], |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?)))
        .optional()?;
    let approval = (!secrets.enrol_proof_ok).then_some(model::APPROVAL_PENDING);
    let line = if secrets.enrol_proof_ok {
        format!(
            "enrolled (first contact from {}, site enrolment secret proven)",
            secrets.source
        )
    } else {
        format!("enrolment from {} pending the administrator's approval (no valid site enrolment proof): `imgserver approve {mac}`", secrets.source)
    };
    match row {
        // A pending request is replaced by one that proves the site secret: the real
        // device wins over whoever asked first.
        Some((id, true, true, addr)) if secrets.enrol_proof_ok => {
            tx.execute(
                "UPDATE devices SET credential = ?2, enrolled = ?3, approval = NULL, enrol_addr = ?4 WHERE id = ?1",
                params![id, secrets.new_credential, i(now), secrets.source],
            )?;
            transcript(
                tx,
                u(id),
                None,
                now,
                &format!(
                    "{line}; the pending request from {} is discarded",
                    addr.unwrap_or_default()
                ),
            )?;
            Ok((u(id), true, false))
        }
        Some((_, true, true, addr)) => Err(StoreError::Conflict(format!(
            "device {mac} has an enrolment pending approval (requested from {}): if that was not this device, `imgserver forget {mac}` on the server, or give the device the site enrolment secret",
            addr.unwrap_or_default()
        ))),
        Some((_, true, false, _)) => Err(StoreError::AlreadyEnrolled(mac)),
        Some((id, false, _, _)) => {
            tx.execute(
                "UPDATE devices SET credential = ?2, enrolled = ?3, approval = ?4, enrol_addr = ?5 WHERE id = ?1",
                params![id, secrets.new_credential, i(now), approval, secrets.source],
            )?;
            transcript(tx, u(id), None, now, &line)?;
            Ok((u(id), true, approval.is_some()))
        }
        None => {
            tx.execute(
                "INSERT INTO devices (mac, credential, enrolled, approval, enrol_addr) VALUES (?1, ?2, ?3, ?4, ?5)",
                params![mac, secrets.new_credential, i(now), approval, secrets.source],
            )?;
            let id = u(tx.last_insert_rowid());
            transcript(tx, id, None, now, &line)?;
            Ok((id, true, approval.is_some()))
        }
    }
}
