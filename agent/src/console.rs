//! The operator console on the serial or VGA console of a booting device.
//!
//! PID 1 starts the agent with its output on a pipe; every line it writes (discovery,
//! check-in, the plain progress lines of a deployment) is shown here. Pressing Esc opens an
//! `img>` prompt: while it is open the agent keeps working and its lines are held back, and
//! they are shown when the prompt closes (Esc on an empty line, or `exit`). Each prompt line
//! is an `img` command line, run by re-executing this very binary (`/proc/self/exe`) with
//! `argv[0]` = `img`, so the console needs no shell and no second binary; the command gets
//! the console as its terminal (keys and all, for `img -session`'s `m` and `s`). `reboot`
//! and `poweroff` end the session the clean way (sync first), `help` lists the verbs.
//!
//! With `img.console` on the kernel command line there is no agent and the prompt never
//! closes: the device is a console imaging station, as ZENworks' maintenance mode was.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::init::{say, shutdown, Reaper, Shutdown};

/// Lines of agent output held while the prompt is open; older ones are dropped and counted
/// (a deployment prints a progress line every few seconds, so this is minutes of output).
const HELD_LINES: usize = 500;
const ESC: u8 = 0x1b;
const PROMPT: &str = "img> ";

#[derive(Default)]
struct State {
    prompt_open: bool,
    stay: bool,
    esc_seen: bool,
    held: VecDeque<String>,
    dropped: usize,
}

/// The console, shared by the agent supervisor, the output forwarder and the key reader.
pub struct Console {
    env: Vec<(&'static str, String)>,
    state: Mutex<State>,
    changed: Condvar,
}

/// Split a prompt line into arguments: whitespace separates, single and double quotes
/// group, a backslash escapes the next character (outside single quotes), as a shell would
/// for the simple lines an operator types. A leading `img` is dropped, so both
/// `img -dump` and `-dump` work.
pub fn split_command_line(line: &str) -> Result<Vec<String>, String> {
    let mut args = Vec::new();
    let mut cur = String::new();
    let mut in_arg = false;
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\'' => {
                in_arg = true;
                loop {
                    match chars.next() {
                        Some('\'') => break,
                        Some(c) => cur.push(c),
                        None => return Err("unterminated ' quote".into()),
                    }
                }
            }
            '"' => {
                in_arg = true;
                loop {
                    match chars.next() {
                        Some('"') => break,
                        Some('\\') => cur.push(chars.next().ok_or("unterminated \" quote")?),
                        Some(c) => cur.push(c),
                        None => return Err("unterminated \" quote".into()),
                    }
                }
            }
            '\\' => {
                in_arg = true;
                cur.push(chars.next().ok_or("a backslash at the end of the line")?);
            }
            c if c.is_whitespace() => {
                if in_arg {
                    args.push(std::mem::take(&mut cur));
                    in_arg = false;
                }
            }
            c => {
                in_arg = true;
                cur.push(c);
            }
        }
    }
    if in_arg {
        args.push(cur);
    }
    if args.first().map(String::as_str) == Some("img") {
        args.remove(0);
    }
    Ok(args)
}

/// The command that runs one `img` command line: this binary under the name `img`.
pub fn img_command(args: &[String], env: &[(&'static str, String)]) -> Command {
    let mut cmd = Command::new("/proc/self/exe");
    cmd.arg0("img")
        .args(args)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())));
    cmd
}

/// What the prompt does with one line.
#[derive(Debug, PartialEq, Eq)]
pub enum PromptAction {
    Nothing,
    Close,
    Help,
    Reboot,
    PowerOff,
    Run(Vec<String>),
    Error(String),
}

pub fn prompt_action(line: &str) -> PromptAction {
    match line.trim() {
        "" => PromptAction::Nothing,
        "exit" | "quit" | "logout" => PromptAction::Close,
        "help" | "?" => PromptAction::Help,
        "reboot" => PromptAction::Reboot,
        "poweroff" | "halt" => PromptAction::PowerOff,
        other => match split_command_line(other) {
            Ok(args) if args.is_empty() => PromptAction::Help,
            Ok(args) => PromptAction::Run(args),
            Err(e) => PromptAction::Error(e),
        },
    }
}

const HELP: &str = "\
img commands run as typed, e.g. `img -dump`, `img -session room1 -client`, `-restore URL -disk=/dev/vda`
(`img -help` lists every verb). Also: `reboot`, `poweroff`, `exit` (or Esc on an empty line)
returns to the agent's output.";

impl Console {
    pub fn new(env: Vec<(&'static str, String)>) -> Console {
        Console {
            env,
            state: Mutex::new(State::default()),
            changed: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Show one line of agent output, or hold it while the prompt is open.
    pub fn show(&self, line: &str) {
        let mut st = self.lock();
        if st.prompt_open {
            if st.held.len() >= HELD_LINES {
                st.held.pop_front();
                st.dropped += 1;
            }
            st.held.push_back(line.to_owned());
        } else {
            let mut err = std::io::stderr().lock();
            let _ = writeln!(err, "{line}");
        }
    }

    /// Start the boot agent (`argv[0]` = `agent`) with its output forwarded here; its pid.
    pub fn start_agent(self: &Arc<Self>, args: Vec<OsString>) -> std::io::Result<u32> {
        let (reader, writer) = std::io::pipe()?;
        let child = Command::new("/proc/self/exe")
            .arg0("agent")
            .args(args)
            .env_clear()
            .envs(self.env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(writer.try_clone()?)
            .stderr(writer)
            .spawn()?;
        let pid = child.id();
        // Never wait on `child`: PID 1's reaper collects every exit status.
        drop(child);
        let me = self.clone();
        std::thread::Builder::new()
            .name("agent-output".into())
            .spawn(move || {
                for line in BufReader::new(reader).lines() {
                    match line {
                        Ok(l) => me.show(&l),
                        Err(_) => break,
                    }
                }
            })?;
        Ok(pid)
    }

    /// Start the key reader: Esc opens the prompt. Runs for the life of PID 1.
    pub fn watch_keys(self: &Arc<Self>, reaper: Arc<Reaper>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("console-keys".into())
            .spawn(move || me.key_loop(&reaper));
        if let Err(e) = spawned {
            say(&format!("no console keyboard: {e}"));
        }
    }

    /// Keep the prompt open for good (`img.console`, or Esc during a reboot countdown).
    pub fn stay(&self) {
        let mut st = self.lock();
        st.stay = true;
        self.changed.notify_all();
    }

    /// Block until the prompt is closed (the agent's end waits for the operator).
    pub fn wait_prompt_closed(&self) {
        let mut st = self.lock();
        while st.prompt_open {
            st = self.changed.wait(st).unwrap_or_else(|e| e.into_inner());
        }
    }

    /// Did the operator press Esc within `limit`? (the reboot countdown)
    pub fn esc_within(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        let mut st = self.lock();
        st.esc_seen = false;
        loop {
            if st.esc_seen || st.stay {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            st = self
                .changed
                .wait_timeout(st, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    fn key_loop(&self, reaper: &Reaper) {
        let raw = RawMode::enter();
        loop {
            let stay = self.lock().stay;
            if !stay {
                match read_key() {
                    Some(ESC) => {
                        drain_escape_sequence();
                        let mut st = self.lock();
                        st.esc_seen = true;
                        self.changed.notify_all();
                    }
                    Some(_) => continue,
                    None => {
                        // No console input (closed or absent): nothing to watch.
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                }
            }
            self.prompt_session(reaper, &raw);
        }
    }

    fn set_prompt(&self, open: bool) {
        let mut st = self.lock();
        st.prompt_open = open;
        if !open {
            let mut err = std::io::stderr().lock();
            if st.dropped > 0 {
                let _ = writeln!(err, "({} earlier agent lines not shown)", st.dropped);
            }
            for l in st.held.drain(..) {
                let _ = writeln!(err, "{l}");
            }
            st.dropped = 0;
        }
        self.changed.notify_all();
    }

    /// One prompt session: lines until `exit`/Esc (or forever with `stay`).
    fn prompt_session(&self, reaper: &Reaper, raw: &RawMode) {
        self.set_prompt(true);
        eprintln!("\n-- img console (type `help`; Esc or `exit` returns to the agent) --");
        loop {
            let line = match read_line() {
                LineInput::Line(l) => l,
                LineInput::Escape => String::from("exit"),
                LineInput::Closed => {
                    std::thread::sleep(Duration::from_secs(1));
                    continue;
                }
            };
            match prompt_action(&line) {
                PromptAction::Nothing => {}
                PromptAction::Close => {
                    if self.lock().stay {
                        eprintln!("(staying at the console: `reboot` or `poweroff` to leave)");
                    } else {
                        break;
                    }
                }
                PromptAction::Help => eprintln!("{HELP}"),
                PromptAction::Reboot => shutdown(Shutdown::Reboot),
                PromptAction::PowerOff => shutdown(Shutdown::PowerOff),
                PromptAction::Error(e) => eprintln!("img: {e}"),
                PromptAction::Run(args) => {
                    // The command owns the terminal while it runs: cooked mode, our keys off.
                    raw.leave();
                    match img_command(&args, &self.env).spawn() {
                        Ok(child) => {
                            let pid = child.id();
                            drop(child);
                            let code = reaper.wait_for(pid);
                            if code != 0 {
                                eprintln!("(exit code {code})");
                            }
                        }
                        Err(e) => eprintln!("img: cannot run: {e}"),
                    }
                    raw.reenter();
                }
            }
        }
        self.set_prompt(false);
        eprintln!("-- back to the agent --");
    }
}

/// The console without line buffering and echo, so Esc arrives at once; the previous
/// settings come back while a command runs.
struct RawMode {
    saved: Option<nix::sys::termios::Termios>,
}

impl RawMode {
    fn enter() -> RawMode {
        let saved = nix::sys::termios::tcgetattr(std::io::stdin()).ok();
        let m = RawMode { saved };
        m.reenter();
        m
    }

    fn reenter(&self) {
        use nix::sys::termios::{tcsetattr, LocalFlags, SetArg, SpecialCharacterIndices};
        if let Some(saved) = &self.saved {
            let mut t = saved.clone();
            t.local_flags
                .remove(LocalFlags::ICANON | LocalFlags::ECHO | LocalFlags::ISIG);
            t.control_chars[SpecialCharacterIndices::VMIN as usize] = 1;
            t.control_chars[SpecialCharacterIndices::VTIME as usize] = 0;
            let _ = tcsetattr(std::io::stdin(), SetArg::TCSANOW, &t);
        }
    }

    fn leave(&self) {
        if let Some(saved) = &self.saved {
            let _ = nix::sys::termios::tcsetattr(
                std::io::stdin(),
                nix::sys::termios::SetArg::TCSANOW,
                saved,
            );
        }
    }
}

/// One byte from the console, unbuffered (a buffered reader would keep bytes a command
/// run from the prompt should get); `None` when there is no input.
fn read_key() -> Option<u8> {
    let mut b = [0u8; 1];
    match nix::unistd::read(0, &mut b) {
        Ok(1) => Some(b[0]),
        _ => None,
    }
}

/// After an Esc: swallow the rest of a terminal escape sequence (arrow keys send
/// `ESC [ A`), which arrives within a few milliseconds on any real line.
fn drain_escape_sequence() {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    use std::os::fd::AsFd;
    let stdin = std::io::stdin();
    loop {
        let mut fds = [PollFd::new(stdin.as_fd(), PollFlags::POLLIN)];
        match poll(&mut fds, PollTimeout::from(30u16)) {
            Ok(n) if n > 0 => {
                if read_key().is_none() {
                    return;
                }
            }
            _ => return,
        }
    }
}

enum LineInput {
    Line(String),
    Escape,
    Closed,
}

/// Read one line with echo and Backspace; Esc on an empty line leaves the prompt.
fn read_line() -> LineInput {
    let mut line = String::new();
    let mut err = std::io::stderr();
    let _ = write!(err, "{PROMPT}");
    let _ = err.flush();
    loop {
        let Some(b) = read_key() else {
            return LineInput::Closed;
        };
        match b {
            b'\r' | b'\n' => {
                let _ = writeln!(err);
                return LineInput::Line(line);
            }
            ESC => {
                drain_escape_sequence();
                if line.is_empty() {
                    let _ = writeln!(err);
                    return LineInput::Escape;
                }
            }
            0x7f | 0x08 if line.pop().is_some() => {
                let _ = write!(err, "\x08 \x08");
            }
            // Ctrl-C and Ctrl-U: forget the line.
            0x03 | 0x15 => {
                line.clear();
                let _ = write!(err, "^C\n{PROMPT}");
            }
            b if (0x20..0x7f).contains(&b) => {
                line.push(b as char);
                let _ = err.write_all(&[b]);
            }
            _ => {}
        }
        let _ = err.flush();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn command_lines_split_like_a_shell() {
        assert_eq!(
            split_command_line("img -dump /dev/vda").unwrap(),
            ["-dump", "/dev/vda"]
        );
        assert_eq!(
            split_command_line("  -session 'room 1'  -client ").unwrap(),
            ["-session", "room 1", "-client"]
        );
        assert_eq!(
            split_command_line(r#"-make "a \"b\"" c\ d"#).unwrap(),
            ["-make", "a \"b\"", "c d"]
        );
        assert_eq!(split_command_line("-info ''").unwrap(), ["-info", ""]);
        assert!(split_command_line("-make 'open").is_err());
        assert!(split_command_line("trailing\\").is_err());
    }

    #[test]
    fn prompt_words_pick_the_action() {
        assert_eq!(prompt_action("   "), PromptAction::Nothing);
        assert_eq!(prompt_action("exit"), PromptAction::Close);
        assert_eq!(prompt_action("reboot"), PromptAction::Reboot);
        assert_eq!(prompt_action("poweroff"), PromptAction::PowerOff);
        assert_eq!(prompt_action("img"), PromptAction::Help);
        assert_eq!(
            prompt_action("img -version"),
            PromptAction::Run(vec!["-version".into()])
        );
        assert!(matches!(prompt_action("-s \"x"), PromptAction::Error(_)));
    }

    #[test]
    fn img_command_reexecutes_this_binary_as_img() {
        let cmd = img_command(&["-dump".into()], &[("IMG_LOG", "debug".into())]);
        assert_eq!(cmd.get_program(), "/proc/self/exe");
        assert_eq!(cmd.get_args().collect::<Vec<_>>(), ["-dump"]);
        assert!(cmd
            .get_envs()
            .any(|(k, v)| k == "IMG_LOG" && v == Some("debug".as_ref())));
    }

    #[test]
    fn lines_are_held_while_the_prompt_is_open() {
        let c = Console::new(vec![]);
        c.set_prompt(true);
        for i in 0..(HELD_LINES + 3) {
            c.show(&format!("line {i}"));
        }
        {
            let st = c.lock();
            assert_eq!(st.held.len(), HELD_LINES);
            assert_eq!(st.dropped, 3);
            assert_eq!(st.held.front().map(String::as_str), Some("line 3"));
        }
        c.set_prompt(false);
        assert!(c.lock().held.is_empty());
        c.wait_prompt_closed();
    }

    #[test]
    fn esc_countdown_times_out_or_sees_stay() {
        let c = Console::new(vec![]);
        assert!(!c.esc_within(Duration::from_millis(20)));
        c.stay();
        assert!(c.esc_within(Duration::from_secs(5)));
    }
}
