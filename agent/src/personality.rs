//! Which program this binary is: one static binary serves as the initramfs's `/init`, as the
//! boot agent, and as the `img` console command (STYLE habit 2). The choice is made here,
//! from `argv[0]` and the process id, before any argument is parsed.

use std::path::Path;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Personality {
    /// PID 1 of the initramfs (`/init`), or started by the kernel as init.
    Init,
    /// The boot agent run by init (or by hand as `agent`).
    Agent,
    /// The operator's console command.
    Img,
}

/// Pick the personality from the name the binary was started under and its PID.
///
/// PID 1 is always `Init`, whatever the name: the kernel may start us as `/init`,
/// `/sbin/init` or through `rdinit=`. `agent`/`bootagent` is the agent; anything else
/// (`img`, a versioned file name, a test harness's copy) is the console command.
pub fn choose(argv0: &str, pid: u32) -> Personality {
    if pid == 1 {
        return Personality::Init;
    }
    let name = Path::new(argv0)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("");
    match name {
        "init" | "linuxrc" => Personality::Init,
        "agent" | "bootagent" => Personality::Agent,
        _ => Personality::Img,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pid1_is_init_whatever_the_name() {
        assert_eq!(choose("/bin/img", 1), Personality::Init);
        assert_eq!(choose("", 1), Personality::Init);
    }

    #[test]
    fn names_pick_the_rest() {
        assert_eq!(choose("/init", 300), Personality::Init);
        assert_eq!(choose("/usr/sbin/agent", 300), Personality::Agent);
        assert_eq!(choose("img", 300), Personality::Img);
        assert_eq!(choose("./target/debug/img", 300), Personality::Img);
        assert_eq!(choose("img-0.1", 300), Personality::Img);
    }
}
