//! Showing long work to the operator: a progress bar with bytes, rate and ETA when stderr is
//! a terminal (the device console), plain periodic lines otherwise (serial logs, scripts,
//! the server's transcript), so the output is readable in both places.

use std::io::IsTerminal;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use imgengine::io::progress::Progress;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often plain mode prints a line.
const PLAIN_INTERVAL: Duration = Duration::from_secs(5);

pub struct ConsoleProgress {
    quiet: bool,
    tty: bool,
    state: Mutex<State>,
}

struct State {
    bar: Option<ProgressBar>,
    what: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
}

impl ConsoleProgress {
    pub fn new(quiet: bool) -> Self {
        let now = Instant::now();
        ConsoleProgress {
            quiet,
            tty: std::io::stderr().is_terminal(),
            state: Mutex::new(State {
                bar: None,
                what: String::new(),
                total: None,
                done: 0,
                started: now,
                last_line: now,
            }),
        }
    }

    fn plain_line(st: &State, finished: bool) -> String {
        let secs = st.started.elapsed().as_secs_f64().max(1e-3);
        let rate = st.done as f64 / secs;
        let mut line = format!("{}: {}", st.what, human(st.done));
        if let Some(t) = st.total {
            let pct = if t == 0 {
                100.0
            } else {
                st.done as f64 * 100.0 / t as f64
            };
            line.push_str(&format!(" / {} ({pct:.0}%)", human(t)));
        }
        line.push_str(&format!(", {}/s", human(rate as u64)));
        if finished {
            line.push_str(&format!(", done in {secs:.1}s"));
        } else if let (Some(t), true) = (st.total, rate > 0.0) {
            let eta = t.saturating_sub(st.done) as f64 / rate;
            line.push_str(&format!(", ETA {eta:.0}s"));
        }
        line
    }
}

/// Bytes in binary units, e.g. `512.0 MiB`.
pub fn human(n: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n as f64;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{n} B")
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

impl Progress for ConsoleProgress {
    fn begin(&self, what: &str, total: Option<u64>) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        st.what = what.to_string();
        st.total = total;
        st.done = 0;
        st.started = now;
        st.last_line = now;
        if self.quiet {
            return;
        }
        if self.tty {
            let bar = match total {
                Some(t) => ProgressBar::new(t),
                None => ProgressBar::new_spinner(),
            };
            bar.set_draw_target(ProgressDrawTarget::stderr());
            let tmpl = if total.is_some() {
                "{msg} [{bar:30}] {bytes}/{total_bytes} {binary_bytes_per_sec} ETA {eta}"
            } else {
                "{msg} {spinner} {bytes} {binary_bytes_per_sec}"
            };
            if let Ok(style) = ProgressStyle::with_template(tmpl) {
                bar.set_style(style.progress_chars("=> "));
            }
            bar.set_message(what.to_string());
            st.bar = Some(bar);
        } else {
            eprintln!(
                "{what}: started{}",
                total
                    .map(|t| format!(", {} to go", human(t)))
                    .unwrap_or_default()
            );
        }
    }

    fn advance(&self, bytes: u64) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        st.done = st.done.saturating_add(bytes);
        if self.quiet {
            return;
        }
        if let Some(bar) = &st.bar {
            bar.inc(bytes);
        } else if st.last_line.elapsed() >= PLAIN_INTERVAL {
            st.last_line = Instant::now();
            eprintln!("{}", Self::plain_line(&st, false));
        }
    }

    fn end(&self) {
        let mut st = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if self.quiet {
            return;
        }
        if let Some(bar) = st.bar.take() {
            bar.finish_and_clear();
        }
        eprintln!("{}", Self::plain_line(&st, true));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn human_units() {
        assert_eq!(human(512), "512 B");
        assert_eq!(human(1536), "1.5 KiB");
        assert_eq!(human(2 * 1024 * 1024 * 1024), "2.0 GiB");
    }

    #[test]
    fn plain_line_has_percent_rate_and_eta() {
        let now = Instant::now() - Duration::from_secs(2);
        let st = State {
            bar: None,
            what: "restore".into(),
            total: Some(4 << 20),
            done: 1 << 20,
            started: now,
            last_line: now,
        };
        let l = ConsoleProgress::plain_line(&st, false);
        assert!(l.starts_with("restore: 1.0 MiB / 4.0 MiB (25%), "), "{l}");
        assert!(l.contains("ETA"), "{l}");
        assert!(ConsoleProgress::plain_line(&st, true).contains("done in"));
    }
}
