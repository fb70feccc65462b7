//! The harness itself against the real nginx: Range requests are honoured and the access log
//! counts the bytes sent, which the resume tests rely on.

use e2e::{sh, Nginx, Scratch};

#[test]
fn nginx_serves_ranges_and_counts_bytes() {
    e2e::require_tool("curl");
    let dir = Scratch::new("harness");
    std::fs::write(dir.join("f.img"), e2e::sample_bytes(1, 100_000)).unwrap();
    let n = Nginx::serve(dir.path());
    let part = sh(&format!("curl -sf -r 10-19 {} | wc -c", n.url("f.img")));
    assert_eq!(part.trim(), "10");
    let whole = sh(&format!("curl -sf {} | wc -c", n.url("f.img")));
    assert_eq!(whole.trim(), "100000");
    // nginx writes its log line when it finishes a request: wait until none is in progress.
    assert_eq!(n.bytes_sent_when_idle(), 100_010);
}
