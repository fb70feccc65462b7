//! Check-in load benchmark: N simulated devices (default 1000) check in concurrently against
//! a real `imgserver serve` on loopback over TLS for a while (default 60 s), and every device
//! also works through a few scheduled tasks, posting progress and a final result for each.
//!
//! Printed: check-ins per second, check-in latency p50/p99/max, and the status-report
//! ledger: results sent by the devices, acknowledged by the server, and counted in the
//! server's database afterwards. "lost: 0" means every acknowledged result is recorded
//! exactly once, including the ones deliberately sent twice (a retry) and the ones carried
//! in the next check-in instead of their own request (the outbox path).
//!
//! `cargo run --release -p imgserver --bin checkin_load -- [--seconds 60] [--devices 1000] [--jobs 3]`

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use imgserver::store::Store;
use protocol::{
    progress_path, result_path, Action, CheckIn, CheckInReply, DeviceIdentity, DiskReport, Outcome,
    PartitionReport, ProgressReport, ResultReply, TaskResult, CHECKIN_PATH, PROTOCOL_VERSION,
};

struct Opts {
    seconds: u64,
    devices: usize,
    jobs: usize,
}

fn parse() -> anyhow::Result<Opts> {
    let mut o = Opts {
        seconds: 60,
        devices: 1000,
        jobs: 3,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = |name: &str| -> anyhow::Result<u64> {
            args.next()
                .and_then(|v| v.parse().ok())
                .with_context(|| format!("{name} needs a number"))
        };
        match a.as_str() {
            "--seconds" => o.seconds = val("--seconds")?,
            "--devices" => o.devices = val("--devices")? as usize,
            "--jobs" => o.jobs = val("--jobs")? as usize,
            "-h" | "--help" => {
                println!("usage: checkin_load [--seconds 60] [--devices 1000] [--jobs 3]");
                std::process::exit(0);
            }
            _ => bail!("unknown argument {a}"),
        }
    }
    Ok(o)
}

#[derive(Default)]
struct Ledger {
    checkins: AtomicU64,
    errors: AtomicU64,
    results_sent: AtomicU64,
    results_acked: AtomicU64,
    retries_sent: AtomicU64,
    progress_sent: AtomicU64,
    latencies: Mutex<Vec<u32>>,
}

fn agent(ca: &Path) -> anyhow::Result<ureq::Agent> {
    use ureq::tls::{PemItem, RootCerts, TlsConfig};
    let pem = std::fs::read(ca)?;
    let certs: Vec<_> = ureq::tls::parse_pem(&pem)
        .filter_map(|i| match i {
            Ok(PemItem::Certificate(c)) => Some(c),
            _ => None,
        })
        .collect();
    let tls = TlsConfig::builder()
        .root_certs(RootCerts::new_with_certs(&certs))
        .build();
    let cfg = ureq::Agent::config_builder()
        .tls_config(tls)
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(60)))
        .build();
    Ok(ureq::Agent::new_with_config(cfg))
}

fn post<B: serde::Serialize, R: serde::de::DeserializeOwned>(
    a: &ureq::Agent,
    url: &str,
    token: Option<&str>,
    body: &B,
) -> anyhow::Result<R> {
    let mut req = a.post(url).header("Content-Type", "application/json");
    if let Some(t) = token {
        req = req.header("Authorization", &format!("Bearer {t}"));
    }
    let resp = req.send(serde_json::to_string(body)?)?;
    let status = resp.status().as_u16();
    let text = resp.into_body().read_to_string()?;
    if status != 200 {
        bail!("HTTP {status}: {text}");
    }
    Ok(serde_json::from_str(&text)?)
}

fn report_id(dev: usize, n: u64) -> String {
    format!("{dev:08x}{n:08x}{:016x}", dev as u64 ^ 0x5eed)
}

/// One simulated device until `stop`.
fn device(
    n: usize,
    base: &str,
    ca: &Path,
    stop: &AtomicBool,
    ledger: &Ledger,
) -> anyhow::Result<()> {
    let a = agent(ca)?;
    let mac = format!(
        "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
        (n >> 24) & 0xff,
        (n >> 16) & 0xff,
        (n >> 8) & 0xff,
        n & 0xff
    );
    // Enrol with the site secret (`enrol.key` beside the CA), as a device prepared by the
    // administrator does; without it every device would wait for approval.
    let secret = std::fs::read_to_string(ca.with_file_name("enrol.key"))?;
    let mut req = CheckIn {
        protocol: PROTOCOL_VERSION,
        enrol_proof: Some(protocol::enrolment_proof(&secret, &mac)),
        device: DeviceIdentity {
            mac,
            serial: Some(format!("LOAD{n:06}")),
            model: Some("LoadTest".into()),
            ram_bytes: 2 << 30,
            agent_version: "checkin_load".into(),
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "/dev/mmcblk0".into(),
            size: 8 << 30,
            table: "gpt".into(),
            partitions: vec![
                PartitionReport {
                    number: 1,
                    start: 1 << 20,
                    size: 16 << 20,
                    fs: "fat32".into(),
                    label: Some("AGENT".into()),
                    image: None,
                },
                PartitionReport {
                    number: 2,
                    start: 17 << 20,
                    size: 4 << 30,
                    fs: "ntfs".into(),
                    label: None,
                    image: None,
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    };
    let url = format!("{base}{CHECKIN_PATH}");
    let mut token: Option<String> = None;
    let mut outbox: Vec<TaskResult> = Vec::new();
    let mut reports = 0u64;
    while !stop.load(Ordering::Relaxed) {
        req.results = outbox.clone();
        let t0 = Instant::now();
        let reply: CheckInReply = match post(&a, &url, token.as_deref(), &req) {
            Ok(r) => r,
            Err(_) => {
                ledger.errors.fetch_add(1, Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
        };
        let us = t0.elapsed().as_micros().min(u128::from(u32::MAX)) as u32;
        ledger.latencies.lock().unwrap().push(us);
        ledger.checkins.fetch_add(1, Ordering::Relaxed);
        if let Some(c) = reply.credential {
            token = Some(c);
            req.enrol_proof = None;
        }
        for acked in &reply.acked {
            if outbox.iter().any(|r| &r.report == acked) {
                ledger.results_acked.fetch_add(1, Ordering::Relaxed);
            }
        }
        outbox.retain(|r| !reply.acked.contains(&r.report));
        if let Action::Run { task } = reply.action {
            let tok = token.as_deref();
            // Two progress reports, then the final result.
            for seq in 1..=2u64 {
                let p = ProgressReport {
                    seq,
                    phase: "deploying".into(),
                    percent: Some(seq as f32 * 50.0),
                    bytes: seq << 20,
                    total: Some(2 << 20),
                    rate: 1 << 20,
                };
                if post::<_, serde_json::Value>(
                    &a,
                    &format!("{base}{}", progress_path(task.id)),
                    tok,
                    &p,
                )
                .is_ok()
                {
                    ledger.progress_sent.fetch_add(1, Ordering::Relaxed);
                }
            }
            reports += 1;
            let r = TaskResult {
                task: task.id,
                report: report_id(n, reports),
                outcome: Outcome::Succeeded,
                message: None,
                transcript: vec!["simulated".into()],
                image: None,
                bytes: 2 << 20,
                finished: 0,
            };
            ledger.results_sent.fetch_add(1, Ordering::Relaxed);
            match reports % 3 {
                // The outbox path: carried by the next check-in.
                0 => outbox.push(r),
                // Posted, and posted again as a lost-acknowledgement retry would.
                1 => {
                    let u = format!("{base}{}", result_path(task.id));
                    match post::<_, ResultReply>(&a, &u, tok, &r) {
                        Ok(_) => {
                            ledger.results_acked.fetch_add(1, Ordering::Relaxed);
                            ledger.retries_sent.fetch_add(1, Ordering::Relaxed);
                            let again: anyhow::Result<ResultReply> = post(&a, &u, tok, &r);
                            if again.map(|x| x.recorded).unwrap_or(true) {
                                ledger.errors.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(_) => outbox.push(r),
                    }
                }
                _ => {
                    let u = format!("{base}{}", result_path(task.id));
                    match post::<_, ResultReply>(&a, &u, tok, &r) {
                        Ok(_) => {
                            ledger.results_acked.fetch_add(1, Ordering::Relaxed);
                        }
                        Err(_) => outbox.push(r),
                    }
                }
            }
        }
    }
    // Flush what is still in the outbox, as the next boot would.
    if !outbox.is_empty() {
        req.results = outbox.clone();
        if let Ok(reply) = post::<_, CheckInReply>(&a, &url, token.as_deref(), &req) {
            ledger.results_acked.fetch_add(
                outbox
                    .iter()
                    .filter(|r| reply.acked.contains(&r.report))
                    .count() as u64,
                Ordering::Relaxed,
            );
        }
    }
    Ok(())
}

fn pct(sorted: &[u32], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    f64::from(sorted[i]) / 1000.0
}

fn main() -> anyhow::Result<()> {
    let o = parse()?;
    let exe = std::env::current_exe()?;
    let server_bin = exe.with_file_name("imgserver");
    if !server_bin.exists() {
        bail!(
            "{} not found: build it first (cargo build --release -p imgserver)",
            server_bin.display()
        );
    }
    let data: PathBuf = std::env::temp_dir().join(format!("checkin-load-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&data);
    let admin = |args: &[&str]| -> anyhow::Result<String> {
        let out = Command::new(&server_bin)
            .arg("--data")
            .arg(&data)
            .args(args)
            .output()?;
        if !out.status.success() && out.status.code() != Some(3) {
            bail!(
                "imgserver {args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    admin(&["init", "--name", "127.0.0.1", "--name", "localhost"])?;
    for _ in 0..o.jobs {
        admin(&["schedule", "add", "--all", "--reboot"])?;
    }
    let mut child = Command::new(&server_bin)
        .arg("--data")
        .arg(&data)
        .args(["serve", "--listen", "127.0.0.1:0", "--interval", "60"])
        // Every simulated device comes from 127.0.0.1 and checks in back to back: the
        // per-address and per-device budgets (meant for a real LAN) are off here.
        .args(["--conns-per-address", "0", "--rate-per-address", "0"])
        .args(["--rate-per-device", "0", "--enrol-rate", "0"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let mut line = String::new();
    BufReader::new(child.stdout.take().context("server stdout")?).read_line(&mut line)?;
    let addr = line
        .trim()
        .strip_prefix("listening on https://")
        .with_context(|| format!("server said {line:?}"))?
        .to_string();
    let base = format!("https://{addr}");
    let ca = data.join("ca.pem");
    println!(
        "checkin_load: {} devices, {} s, {} reboot job(s) for all devices, server {base} (TLS, SQLite {})",
        o.devices,
        o.seconds,
        o.jobs,
        data.join("imgserver.db").display()
    );

    let ledger = Arc::new(Ledger::default());
    let stop = Arc::new(AtomicBool::new(false));
    let start = Instant::now();
    let mut handles = Vec::new();
    for n in 0..o.devices {
        let (base, ca, stop, ledger) = (base.clone(), ca.clone(), stop.clone(), ledger.clone());
        handles.push(
            std::thread::Builder::new()
                .stack_size(256 << 10)
                .spawn(move || device(n, &base, &ca, &stop, &ledger))?,
        );
    }
    std::thread::sleep(Duration::from_secs(o.seconds));
    stop.store(true, Ordering::Relaxed);
    let ran = start.elapsed();
    let mut failed = 0;
    for h in handles {
        if !matches!(h.join(), Ok(Ok(()))) {
            failed += 1;
        }
    }
    let _ = Command::new("kill").arg(child.id().to_string()).status();
    let _ = child.wait();

    let store = imgserver::store::SqliteStore::open(&data.join("imgserver.db"))?;
    let recorded = store.result_count()?;
    let mut lat = std::mem::take(&mut *ledger.latencies.lock().unwrap());
    lat.sort_unstable();
    let checkins = ledger.checkins.load(Ordering::Relaxed);
    let sent = ledger.results_sent.load(Ordering::Relaxed);
    let acked = ledger.results_acked.load(Ordering::Relaxed);
    println!(
        "check-ins:     {checkins} in {:.1} s = {:.0} check-ins/s",
        ran.as_secs_f64(),
        checkins as f64 / ran.as_secs_f64()
    );
    println!(
        "latency:       p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        pct(&lat, 0.5),
        pct(&lat, 0.99),
        pct(&lat, 1.0)
    );
    println!(
        "reports:       {} progress, {sent} results sent ({} also re-sent as retries), {acked} acknowledged, {recorded} recorded by the server",
        ledger.progress_sent.load(Ordering::Relaxed),
        ledger.retries_sent.load(Ordering::Relaxed)
    );
    let lost = acked.saturating_sub(recorded);
    let duplicated = recorded.saturating_sub(acked);
    println!(
        "lost: {lost}, applied twice: {duplicated}, request errors: {}, device threads failed: {failed}",
        ledger.errors.load(Ordering::Relaxed)
    );
    let _ = std::fs::remove_dir_all(&data);
    if lost > 0 || duplicated > 0 {
        bail!("status reports were lost or duplicated");
    }
    Ok(())
}
