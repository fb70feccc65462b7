//! An admin API job request (JSON body, with times and a zone name typed by whoever holds a
//! token) and a multicast session request: decoding, the time parser and the session's
//! checks (name, MACs, numbers, group address) must never panic.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = serde_json::from_slice::<imgserver::admin::JobRequest>(data) {
        if let Ok(tz) = imgserver::admin::window::zone(req.tz.as_deref()) {
            for t in [req.at.as_deref(), req.until.as_deref()]
                .into_iter()
                .flatten()
            {
                if let Ok(secs) = imgserver::admin::window::parse_time(t, &tz, 1_795_930_200) {
                    let _ = imgserver::admin::window::show(secs, &tz);
                }
            }
        }
    }
    if let Ok(mut req) = serde_json::from_slice::<imgserver::admin::sessions::SessionRequest>(data)
    {
        let _ = req.check();
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let utc = jiff::tz::TimeZone::UTC;
        let _ = imgserver::admin::window::parse_time(s, &utc, 0);
    }
});
