//! Jobs at a time: the window rule (a pure function the check-in calls for every pending
//! task) and the administrator's times (parsed and shown in their time zone).
//!
//! A job's options may carry `at` (start, Unix seconds) and `until` (end of the window).
//! A device that checks in before `at` or after `until` is told "nothing to do" and keeps
//! its pending task; a task already handed out runs to the end whatever the clock says.

use anyhow::{anyhow, bail, Context};
use jiff::tz::TimeZone;
use jiff::{civil, Timestamp};
use serde::{Deserialize, Serialize};

use crate::model::JobOptions;

/// Where `now` falls in a job's window.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "window", content = "time")]
pub enum Window {
    /// No time given: the work is handed out at once.
    Always,
    /// Before the start: devices wait until this time.
    NotYet(u64),
    /// Inside the window.
    Open,
    /// The window ended at this time: devices that did not check in inside it wait (retry
    /// the job or schedule it again).
    Closed(u64),
}

/// Where `now` falls in the window of a job with `opts`.
pub fn window(opts: &JobOptions, now: u64) -> Window {
    match (opts.at, opts.until) {
        (None, None) => Window::Always,
        (Some(at), _) if now < at => Window::NotYet(at),
        (_, Some(until)) if now >= until => Window::Closed(until),
        _ => Window::Open,
    }
}

/// May a pending task of a job with `opts` be handed to a device checking in at `now`?
pub fn open(opts: &JobOptions, now: u64) -> bool {
    matches!(window(opts, now), Window::Always | Window::Open)
}

/// [`open`] at the current time (for the PXE boot decision, which has no clock argument).
pub fn open_now(opts: &JobOptions) -> bool {
    open(opts, crate::api::now())
}

/// The administrator's time zone: `--tz NAME` (an IANA name such as `Asia/Tokyo`, or
/// `UTC`), else `$TZ`, else the system's.
pub fn zone(name: Option<&str>) -> anyhow::Result<TimeZone> {
    match name {
        // Names come from the network too: only what an IANA name is made of.
        Some(n)
            if n.len() > 64
                || n.contains("..")
                || !n
                    .bytes()
                    .all(|c| c.is_ascii_alphanumeric() || b"_+-/ ".contains(&c)) =>
        {
            bail!("time zone {n:?}: give an IANA name such as Asia/Tokyo or UTC")
        }
        Some(n) if !n.trim().is_empty() => TimeZone::get(n.trim()).with_context(|| {
            format!("time zone {n:?}: give an IANA name such as Asia/Tokyo or UTC")
        }),
        _ => Ok(TimeZone::system()),
    }
}

/// Parse a time the administrator typed, in `tz` unless it carries its own offset:
/// `2026-11-29 07:30`, `2026-11-29T07:30:00`, `2026-11-29T07:30:00+09:00`, `...Z`,
/// `@UNIXSECONDS`, `now`, or `now+90s` / `+10m` / `+2h` / `+1d` (from `now`).
pub fn parse_time(s: &str, tz: &TimeZone, now: u64) -> anyhow::Result<u64> {
    let t = s.trim();
    let bad = || {
        anyhow!(
            "time {s:?}: write YYYY-MM-DD HH:MM[:SS] (in {}), an RFC 3339 time with offset, @UNIXSECONDS, now or +N[s|m|h|d]",
            tz.iana_name().unwrap_or("the local zone")
        )
    };
    if t.is_empty() {
        return Err(bad());
    }
    if let Some(unix) = t.strip_prefix('@') {
        return unix.parse().map_err(|_| bad());
    }
    let rel = t.strip_prefix("now").unwrap_or(t);
    if rel.is_empty() {
        return Ok(now);
    }
    if let Some(r) = rel.strip_prefix('+') {
        let (num, unit) = r.split_at(r.find(|c: char| !c.is_ascii_digit()).unwrap_or(r.len()));
        let n: u64 = num.parse().map_err(|_| bad())?;
        let mult = match unit {
            "" | "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            _ => return Err(bad()),
        };
        return n
            .checked_mul(mult)
            .and_then(|d| now.checked_add(d))
            .ok_or_else(bad);
    }
    if let Ok(ts) = t.parse::<Timestamp>() {
        return u64::try_from(ts.as_second()).map_err(|_| bad());
    }
    let civil_text = t.replacen(' ', "T", 1);
    let dt: civil::DateTime = civil_text.parse().map_err(|_| bad())?;
    let z = dt
        .to_zoned_datetime(tz.clone())
        .map_err(|e| anyhow!("time {s:?}: {e}"))?;
    u64::try_from(z.timestamp().as_second()).map_err(|_| bad())
}

/// `YYYY-MM-DD HH:MM:SS ZONE` in `tz` (the zone's abbreviation, e.g. JST, CET, UTC).
pub fn show(t: u64, tz: &TimeZone) -> String {
    match Timestamp::from_second(t as i64) {
        Ok(ts) => ts
            .to_zoned_datetime(tz.clone())
            .strftime("%Y-%m-%d %H:%M:%S %Z")
            .to_string(),
        Err(_) => format!("@{t}"),
    }
}

/// Check a job's window before it is created: the end after the start and not past.
pub fn check(at: Option<u64>, until: Option<u64>, now: u64) -> anyhow::Result<()> {
    if let (Some(a), Some(u)) = (at, until) {
        if u <= a {
            bail!("the window ends (--until) before it starts (--at): give an end after the start");
        }
    }
    if let Some(u) = until {
        if u <= now {
            bail!("the window's end (--until) is already past: no device could get the work");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(at: Option<u64>, until: Option<u64>) -> JobOptions {
        JobOptions {
            at,
            until,
            ..Default::default()
        }
    }

    #[test]
    fn window_opens_and_closes() {
        assert_eq!(window(&opts(None, None), 5), Window::Always);
        assert_eq!(window(&opts(Some(10), None), 5), Window::NotYet(10));
        assert_eq!(window(&opts(Some(10), None), 10), Window::Open);
        assert_eq!(window(&opts(Some(10), Some(20)), 19), Window::Open);
        assert_eq!(window(&opts(Some(10), Some(20)), 20), Window::Closed(20));
        assert_eq!(window(&opts(None, Some(20)), 3), Window::Open);
        assert!(!open(&opts(Some(10), Some(20)), 9));
        assert!(open(&opts(None, None), 0));
    }

    #[test]
    fn times_parse_in_the_administrators_zone() {
        let tokyo = zone(Some("Asia/Tokyo")).unwrap();
        let utc = zone(Some("UTC")).unwrap();
        // 2026-11-29 09:00 JST = 00:00 UTC = 1795910400.
        let t = parse_time("2026-11-29 09:00", &tokyo, 0).unwrap();
        assert_eq!(t, parse_time("2026-11-29T00:00:00Z", &utc, 0).unwrap());
        assert_eq!(t, parse_time("2026-11-29T00:00", &utc, 0).unwrap());
        assert_eq!(t, parse_time("2026-11-29T09:00:00+09:00", &utc, 0).unwrap());
        assert_eq!(show(t, &tokyo), "2026-11-29 09:00:00 JST");
        assert_eq!(show(t, &utc), "2026-11-29 00:00:00 UTC");
        assert_eq!(parse_time("@42", &utc, 0).unwrap(), 42);
        assert_eq!(parse_time("now", &utc, 7).unwrap(), 7);
        assert_eq!(parse_time("+10m", &utc, 7).unwrap(), 607);
        assert_eq!(parse_time("now+2h", &utc, 0).unwrap(), 7200);
        for bad in ["", "tomorrow", "+5y", "2026-13-01 00:00", "@x"] {
            assert!(parse_time(bad, &utc, 0).is_err(), "{bad:?}");
        }
        assert!(zone(Some("Mars/Olympus")).is_err());
    }

    /// Deterministic mutations of valid times and zone names (they arrive from the network
    /// in API requests): never a panic; whatever parses is a time, whatever zone opens is one.
    #[test]
    fn mutated_times_and_zones_never_panic() {
        let utc = zone(Some("UTC")).unwrap();
        let bases: [&[u8]; 5] = [
            b"2026-11-29 07:30",
            b"2026-11-29T07:30:00+09:00",
            b"now+10m",
            b"@1795930200",
            b"Asia/Tokyo",
        ];
        let mut x: u64 = 0x2545f4914f6cdd1d;
        let mut next = || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        for n in 0..20_000 {
            let mut q = bases[n % bases.len()].to_vec();
            for _ in 0..(next() % 4 + 1) {
                let pos = (next() % (q.len() as u64 + 1)) as usize;
                match next() % 4 {
                    0 if pos < q.len() => q[pos] = next() as u8,
                    1 => q.insert(pos.min(q.len()), next() as u8),
                    2 => q.insert(pos.min(q.len()), b"9+:-/."[(next() % 6) as usize]),
                    _ if pos < q.len() => {
                        q.remove(pos);
                    }
                    _ => {}
                }
            }
            let Ok(s) = std::str::from_utf8(&q) else {
                continue;
            };
            if let Ok(t) = parse_time(s, &utc, 1_795_930_200) {
                let _ = show(t, &utc);
            }
            let _ = zone(Some(s));
        }
        assert!(zone(Some("../../../etc/passwd")).is_err());
        assert!(parse_time("+99999999999999999999d", &utc, 0).is_err());
        assert!(parse_time(&format!("+{}d", u64::MAX / 2), &utc, 5).is_err());
    }

    #[test]
    fn windows_are_checked() {
        assert!(check(Some(10), Some(10), 0).is_err());
        assert!(check(None, Some(5), 6).is_err());
        assert!(check(Some(10), Some(20), 5).is_ok());
        assert!(check(None, None, 5).is_ok());
    }
}
