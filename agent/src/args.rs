//! The `img` command line, one parser for every verb, in two stages (ripgrep's habit):
//!
//! 1. [`parse`] classifies the words ([`tokenize`]) and matches them against the verb's
//!    table of options ([`Opt`]): an option the verb does not have, a flag given a value, a
//!    value missing or a single option given twice is a [`UsageError`] naming the option;
//!    nothing has happened yet. The result is [`Matches`]: the options given and the plain
//!    words (operands), in order.
//! 2. The verb's own function turns [`Matches`] into its typed request (for the imaging
//!    verbs [`make_args`], [`restore_args`], ...; `checkin::parse_args`, ...) and runs it.
//!    What it finds wrong with the values (a level out of range, a missing operand) is a
//!    [`UsageError`] too.
//!
//! Every [`UsageError`] anywhere in an error's chain exits 2 (`exit.rs`) and prints the
//! message with the way out, `img -help`. The verbs themselves are listed in one table,
//! `cli::VERBS`.
//!
//! ZENworks Imaging users type single-dash long options (`img -dump`, `img -session mcast01
//! -m`, `-comp=6`); double-dash (`--comp=6`) is accepted too, and option names are not
//! case-sensitive. An option's value follows `=` (`-disk=/dev/sda`) or comes as the next word
//! (`-disk /dev/sda`); the verb's main operand is a plain word (`-make out.img`). After `--`
//! every word is an operand.

use std::ffi::OsString;
use std::fmt;
use std::path::PathBuf;

/// One command-line word, classified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Token {
    /// `-name` or `--name`, with the value after `=` if any.
    Opt { name: String, value: Option<String> },
    /// A word that does not start with `-` (or is exactly `-`, meaning stdin/stdout).
    Value(String),
}

/// A command line that cannot be carried out as written; the message says how to fix it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UsageError(pub String);

impl fmt::Display for UsageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} (see `img -help`)", self.0)
    }
}

impl std::error::Error for UsageError {}

fn usage(msg: impl Into<String>) -> UsageError {
    UsageError(msg.into())
}

/// Stage one: classify each word. Non-UTF-8 arguments are refused with their position.
pub fn tokenize(args: &[OsString]) -> Result<Vec<Token>, UsageError> {
    let mut out = Vec::with_capacity(args.len());
    let mut only_values = false;
    for (i, a) in args.iter().enumerate() {
        let s = a
            .to_str()
            .ok_or_else(|| usage(format!("argument {} is not valid UTF-8", i + 1)))?;
        if only_values || s == "-" || !s.starts_with('-') {
            out.push(Token::Value(s.to_string()));
            continue;
        }
        if s == "--" {
            only_values = true;
            continue;
        }
        let body = s.strip_prefix("--").unwrap_or(&s[1..]);
        let (name, value) = match body.split_once('=') {
            Some((n, v)) => (n, Some(v.to_string())),
            None => (body, None),
        };
        if name.is_empty() {
            return Err(usage(format!("empty option name in `{s}`")));
        }
        out.push(Token::Opt {
            name: name.to_ascii_lowercase(),
            value,
        });
    }
    Ok(out)
}

/// How an option is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `-name`, no value.
    Flag,
    /// `-name=VALUE` (or `-name VALUE`), at most once.
    Value,
    /// `-name=VALUE`, as often as needed (`-trust=a.pub -trust=b.pub`).
    Many,
}

/// One option of a verb: its names (the first is the one the verb's code asks for, the
/// others are aliases such as `-p` for `-part`) and how it is written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Opt {
    pub names: &'static [&'static str],
    pub kind: Kind,
}

/// `-name` (no value).
pub const fn flag(names: &'static [&'static str]) -> Opt {
    Opt {
        names,
        kind: Kind::Flag,
    }
}

/// `-name=VALUE`, at most once.
pub const fn value(names: &'static [&'static str]) -> Opt {
    Opt {
        names,
        kind: Kind::Value,
    }
}

/// `-name=VALUE`, repeatable.
pub const fn many(names: &'static [&'static str]) -> Opt {
    Opt {
        names,
        kind: Kind::Many,
    }
}

/// A command line matched against its verb's options (stage one's result).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Matches {
    /// The verb as the table names it (`make`), for messages.
    pub verb: &'static str,
    table: &'static [Opt],
    /// `(first name of the option, value)` in command-line order.
    opts: Vec<(&'static str, Option<String>)>,
    /// The plain words (operands), in order; the verb takes them with [`Matches::operand`].
    pub values: Vec<String>,
}

impl Matches {
    /// The table entry for `name`, which must be the first name of one of the verb's
    /// options: asking for an option the table lacks is a bug, caught by every test that
    /// runs the verb.
    fn spec(&self, name: &str, kind: Kind) -> &'static Opt {
        let o = self
            .table
            .iter()
            .find(|o| o.names[0] == name)
            .unwrap_or_else(|| panic!("-{} has no option -{name} in its table", self.verb));
        assert_eq!(o.kind, kind, "-{}: -{name} is not a {kind:?}", self.verb);
        o
    }

    /// Was the option given (any kind)?
    pub fn has(&self, name: &str) -> bool {
        assert!(
            self.table.iter().any(|o| o.names[0] == name),
            "-{} has no option -{name} in its table",
            self.verb
        );
        self.opts.iter().any(|(n, _)| *n == name)
    }

    /// A flag: was it given?
    pub fn flag(&self, name: &str) -> bool {
        self.spec(name, Kind::Flag);
        self.opts.iter().any(|(n, _)| *n == name)
    }

    /// A single-valued option's value, if given.
    pub fn value(&self, name: &str) -> Option<&str> {
        self.spec(name, Kind::Value);
        self.opts
            .iter()
            .find(|(n, _)| *n == name)
            .and_then(|(_, v)| v.as_deref())
    }

    /// Every value of a repeatable option, in order.
    pub fn all(&self, name: &str) -> Vec<&str> {
        self.spec(name, Kind::Many);
        self.opts
            .iter()
            .filter(|(n, _)| *n == name)
            .filter_map(|(_, v)| v.as_deref())
            .collect()
    }

    /// A number-valued option.
    pub fn number<T: std::str::FromStr>(&self, name: &str) -> Result<Option<T>, UsageError> {
        self.value(name)
            .map(|v| {
                v.parse()
                    .map_err(|_| usage(format!("-{name}={v}: not a number")))
            })
            .transpose()
    }

    /// The next operand; `what` says what the verb needs when there is none.
    pub fn operand(&mut self, what: &str) -> Result<String, UsageError> {
        if self.values.is_empty() {
            return Err(usage(format!("-{} needs {what}", self.verb)));
        }
        Ok(self.values.remove(0))
    }

    /// The next operand, if any.
    pub fn optional_operand(&mut self) -> Option<String> {
        (!self.values.is_empty()).then(|| self.values.remove(0))
    }

    /// No operand may be left over.
    pub fn finish(&self) -> Result<(), UsageError> {
        match self.values.first() {
            Some(v) => Err(usage(format!(
                "unexpected argument `{v}` for -{}",
                self.verb
            ))),
            None => Ok(()),
        }
    }
}

/// Stage one: match the words after the verb against the verb's options.
pub fn parse(
    verb: &'static str,
    table: &'static [Opt],
    args: &[OsString],
) -> Result<Matches, UsageError> {
    let mut m = Matches {
        verb,
        table,
        opts: Vec::new(),
        values: Vec::new(),
    };
    let mut tokens = tokenize(args)?.into_iter().peekable();
    while let Some(t) = tokens.next() {
        let (name, value) = match t {
            Token::Value(v) => {
                m.values.push(v);
                continue;
            }
            Token::Opt { name, value } => (name, value),
        };
        let Some(opt) = table.iter().find(|o| o.names.contains(&name.as_str())) else {
            return Err(usage(format!("-{verb} does not take -{name}")));
        };
        let value = match (opt.kind, value) {
            (Kind::Flag, Some(v)) => {
                return Err(usage(format!("-{name} takes no value (got `{v}`)")))
            }
            (Kind::Flag, None) => None,
            (_, Some(v)) => Some(v),
            // `-name VALUE`: the next word, when it is not an option itself.
            (_, None) => match tokens.next_if(|t| matches!(t, Token::Value(_))) {
                Some(Token::Value(v)) => Some(v),
                _ => return Err(usage(format!("-{name} needs a value: -{name}=VALUE"))),
            },
        };
        let first = opt.names[0];
        if opt.kind == Kind::Value && m.opts.iter().any(|(n, _)| *n == first) {
            return Err(usage(format!("-{name} given more than once")));
        }
        m.opts.push((first, value));
    }
    Ok(m)
}

/// Where the engine should read or write: a disk (device or disk-image file), optionally
/// narrowed to one partition by number or label.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DiskSel {
    pub disk: Option<PathBuf>,
    pub part: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MakeArgs {
    pub dest: String,
    pub sel: DiskSel,
    pub comp: u8,
    pub name: Option<String>,
    pub version: Option<String>,
    pub models: Vec<String>,
    pub description: Option<String>,
    pub raw: bool,
    pub chunk_mib: Option<u32>,
    pub ca: Option<PathBuf>,
    pub threads: Option<usize>,
}

/// `-resume=auto|always|never`: resume from a journal when one matches (auto), re-check the
/// target even without one (always, e.g. after a power cut lost the journal), or never.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resume {
    Auto,
    Always,
    Never,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreArgs {
    pub src: String,
    pub sel: DiskSel,
    /// This device's model, checked against the image's compatible models (default: the
    /// DMI product name when the target is a block device).
    pub model: Option<String>,
    /// Restore even when the image is not made for this model.
    pub force: bool,
    /// Write a partition image over the whole disk (no partition table left).
    pub wholedisk: bool,
    pub trust: Vec<PathBuf>,
    /// Lab only: deploy although no signing key is trusted (unsigned and raw images).
    pub unsigned: bool,
    pub resume: Resume,
    pub state: Option<PathBuf>,
    pub ca: Option<PathBuf>,
    pub threads: Option<usize>,
}

/// `-verify IMAGE ...`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyArgs {
    pub image: String,
    pub trust: Vec<PathBuf>,
    pub ca: Option<PathBuf>,
    pub threads: Option<usize>,
}

/// `-dump [DISK] [-json]`.
pub const DUMP: &[Opt] = &[flag(&["json"]), value(&["disk"])];
/// `-make DEST ...`.
pub const MAKE: &[Opt] = &[
    value(&["disk"]),
    value(&["part", "p"]),
    value(&["comp"]),
    value(&["name"]),
    value(&["version", "imgversion", "ver"]),
    many(&["model", "models"]),
    value(&["desc", "description"]),
    flag(&["raw"]),
    value(&["chunk"]),
    value(&["ca"]),
    value(&["threads"]),
];
/// `-restore SRC ...`.
pub const RESTORE: &[Opt] = &[
    value(&["disk"]),
    value(&["part", "p"]),
    value(&["model"]),
    flag(&["force"]),
    flag(&["wholedisk"]),
    many(&["trust"]),
    flag(&["unsigned"]),
    value(&["resume"]),
    value(&["state"]),
    value(&["ca"]),
    value(&["threads"]),
];
/// `-info IMAGE [-json] [-ca=PEM]`.
pub const INFO: &[Opt] = &[flag(&["json"]), value(&["ca"])];
/// `-verify IMAGE [-trust=KEY.pub].. [-ca=PEM] [-threads=N]`.
pub const VERIFY: &[Opt] = &[many(&["trust"]), value(&["ca"]), value(&["threads"])];
/// `-sign IMAGE -key=KEYFILE [-out=FILE]`.
pub const SIGN: &[Opt] = &[value(&["key"]), value(&["out"])];
/// `-keygen KEYFILE` (or `-key=KEYFILE`).
pub const KEYGEN: &[Opt] = &[value(&["key"])];
/// `-help`, `-version`: no options.
pub const NONE: &[Opt] = &[];

/// `-dump`: the disk (operand or `-disk=`) and `-json`.
pub fn dump_args(m: &mut Matches) -> Result<(Option<PathBuf>, bool), UsageError> {
    let disk = match m.value("disk") {
        Some(d) => Some(d.to_string()),
        None => m.optional_operand(),
    };
    m.finish()?;
    Ok((disk.map(PathBuf::from), m.flag("json")))
}

pub fn make_args(m: &mut Matches) -> Result<MakeArgs, UsageError> {
    let dest = m.operand("a destination: a file, `-` for stdout, or an http(s) URL")?;
    let comp = match m.number::<u8>("comp")? {
        Some(c) if c > 9 => {
            return Err(usage(format!(
                "-comp={c}: the level is 0 (none) to 9 (smallest)"
            )))
        }
        Some(c) => c,
        None => 1,
    };
    let chunk_mib = m.number::<u32>("chunk")?;
    if let Some(c) = chunk_mib {
        if !(1..=64).contains(&c) {
            return Err(usage(format!("-chunk={c}: chunk size is 1 to 64 MiB")));
        }
    }
    m.finish()?;
    Ok(MakeArgs {
        dest,
        sel: disk_sel(m),
        comp,
        name: m.value("name").map(str::to_string),
        version: m.value("version").map(str::to_string),
        models: m
            .all("model")
            .iter()
            .flat_map(|m| m.split(','))
            .map(|m| m.trim().to_string())
            .filter(|m| !m.is_empty())
            .collect(),
        description: m.value("desc").map(str::to_string),
        raw: m.flag("raw"),
        chunk_mib,
        ca: m.value("ca").map(PathBuf::from),
        threads: m.number("threads")?,
    })
}

pub fn restore_args(m: &mut Matches) -> Result<RestoreArgs, UsageError> {
    let src = m.operand("a source: an image file, `-` for stdin, or an http(s) URL")?;
    let resume = match m.value("resume") {
        None | Some("auto") => Resume::Auto,
        Some("always" | "yes") => Resume::Always,
        Some("never" | "no") => Resume::Never,
        Some(v) => return Err(usage(format!("-resume={v}: use auto, always or never"))),
    };
    m.finish()?;
    Ok(RestoreArgs {
        src,
        sel: disk_sel(m),
        model: m.value("model").map(str::to_string),
        force: m.flag("force"),
        wholedisk: m.flag("wholedisk"),
        trust: m.all("trust").into_iter().map(PathBuf::from).collect(),
        unsigned: m.flag("unsigned"),
        resume,
        state: m.value("state").map(PathBuf::from),
        ca: m.value("ca").map(PathBuf::from),
        threads: m.number("threads")?,
    })
}

/// `-info`: the image, `-json`, `-ca`.
pub fn info_args(m: &mut Matches) -> Result<(String, bool, Option<PathBuf>), UsageError> {
    let image = m.operand("an image (file, `-` or URL)")?;
    m.finish()?;
    Ok((image, m.flag("json"), m.value("ca").map(PathBuf::from)))
}

/// `-verify`: the image, the trusted keys, `-ca`, `-threads`.
pub fn verify_args(m: &mut Matches) -> Result<VerifyArgs, UsageError> {
    let image = m.operand("an image (file, `-` or URL)")?;
    m.finish()?;
    Ok(VerifyArgs {
        image,
        trust: m.all("trust").into_iter().map(PathBuf::from).collect(),
        ca: m.value("ca").map(PathBuf::from),
        threads: m.number("threads")?,
    })
}

/// `-sign`: the image, the secret key, where to write.
pub fn sign_args(m: &mut Matches) -> Result<(String, PathBuf, Option<PathBuf>), UsageError> {
    let image = m.operand("an image file")?;
    let key = m
        .value("key")
        .ok_or_else(|| usage("-sign needs -key=SECRETKEYFILE (make one with -keygen)"))?;
    m.finish()?;
    Ok((image, key.into(), m.value("out").map(PathBuf::from)))
}

/// `-keygen`: the secret key's file (operand or `-key=`).
pub fn keygen_args(m: &mut Matches) -> Result<PathBuf, UsageError> {
    let key = match m.value("key") {
        Some(k) => k.to_string(),
        None => m.operand("a file name for the secret key (the public key goes to FILE.pub)")?,
    };
    m.finish()?;
    Ok(key.into())
}

fn disk_sel(m: &Matches) -> DiskSel {
    DiskSel {
        disk: m.value("disk").map(PathBuf::from),
        part: m.value("part").map(str::to_string),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn words(s: &str) -> Vec<OsString> {
        s.split_whitespace().map(OsString::from).collect()
    }

    /// Stage one through the verb table, as `img` runs it.
    fn p(s: &str) -> Result<Matches, UsageError> {
        crate::cli::lookup(&words(s)).map(|(_, m)| m)
    }

    fn dump(s: &str) -> (Option<PathBuf>, bool) {
        dump_args(&mut p(s).unwrap()).unwrap()
    }

    fn make(s: &str) -> Result<MakeArgs, UsageError> {
        make_args(&mut p(s)?)
    }

    fn restore(s: &str) -> Result<RestoreArgs, UsageError> {
        restore_args(&mut p(s)?)
    }

    #[test]
    fn single_and_double_dash_are_the_same() {
        assert_eq!(dump("-dump /dev/sda"), dump("--dump --disk=/dev/sda"));
        assert_eq!(dump("-dump"), (None, false));
        assert_eq!(dump("-d -JSON"), (None, true), "alias, any case");
    }

    #[test]
    fn make_with_options() {
        let m = make("-make out.img -disk=disk.img -part=2 -comp=6 -model=Z90,R90").unwrap();
        assert_eq!(m.dest, "out.img");
        assert_eq!(
            m.sel,
            DiskSel {
                disk: Some("disk.img".into()),
                part: Some("2".into())
            }
        );
        assert_eq!(m.comp, 6);
        assert_eq!(m.models, vec!["Z90", "R90"]);
        let m = make("-make -").unwrap();
        assert_eq!(
            (m.dest.as_str(), m.comp),
            ("-", 1),
            "stdout, default comp 1 as in the seed"
        );
        // A value as the next word, and the aliases.
        let m = make("-make -disk d.img -p 3 -ver 2.0 out.img").unwrap();
        assert_eq!(
            (
                m.dest.as_str(),
                m.sel.disk.unwrap(),
                m.sel.part.unwrap(),
                m.version.unwrap()
            ),
            ("out.img", PathBuf::from("d.img"), "3".into(), "2.0".into())
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        let err = |r: Result<MakeArgs, UsageError>| r.unwrap_err().0;
        assert!(err(make("-make out.img -comp=10")).contains("0 (none) to 9"));
        assert!(err(make("-make")).contains("needs a destination"));
        assert!(restore("-restore x.img -bogus")
            .unwrap_err()
            .0
            .contains("does not take -bogus"));
        assert!(sign_args(&mut p("-sign x.img").unwrap())
            .unwrap_err()
            .0
            .contains("-key="));
        assert!(restore("-restore x.img -resume=maybe")
            .unwrap_err()
            .0
            .contains("auto, always or never"));
        assert!(p("-dump -json=yes")
            .unwrap_err()
            .0
            .contains("takes no value"));
        assert!(p("restore").unwrap_err().0.contains("expected a verb"));
        assert!(err(make("-make out.img -disk")).contains("-disk needs a value: -disk=VALUE"));
        assert!(err(make("-make out.img -disk=a -disk=b")).contains("-disk given more than once"));
        assert!(err(make("-make out.img extra")).contains("unexpected argument `extra`"));
        assert!(err(make("-make out.img -threads=many")).contains("-threads=many: not a number"));
        assert_eq!(
            p("-frobnicate").unwrap_err().to_string(),
            "unknown verb -frobnicate (see `img -help`)"
        );
    }

    #[test]
    fn restore_resume_and_trust() {
        let r = restore("-restore http://h/x.img -disk=d -trust=a.pub -trust=b.pub -resume=never")
            .unwrap();
        assert_eq!(r.trust.len(), 2);
        assert_eq!(r.resume, Resume::Never);
        assert!(!r.unsigned);
        let r = restore("-restore x.img -disk=d -unsigned").unwrap();
        assert!(r.unsigned);
        assert!(!r.wholedisk);
        let r = restore("-restore p.img -disk=usb.img -wholedisk").unwrap();
        assert!(r.wholedisk);
    }

    #[test]
    fn every_verb_has_its_own_options_and_a_verb_may_carry_its_operand() {
        assert_eq!(p("-discover -json").unwrap().verb, "discover");
        assert!(p("-discover -comp=1")
            .unwrap_err()
            .0
            .contains("-discover does not take -comp"));
        assert_eq!(p("-make=o.img").unwrap(), p("-make o.img").unwrap());
        assert_eq!(p("").unwrap().verb, "help", "no words: the help");
    }

    #[test]
    fn tokenizer_handles_dash_and_double_dash() {
        let t = tokenize(&["-".into(), "--".into(), "-x".into(), "-a=b=c".into()]).unwrap();
        assert_eq!(t[0], Token::Value("-".into()));
        assert_eq!(t[1], Token::Value("-x".into()));
        assert_eq!(
            t[2],
            Token::Value("-a=b=c".into()),
            "after `--` everything is a value"
        );
        assert_eq!(t.len(), 3);
        let t = tokenize(&["-A=b=c".into()]).unwrap();
        assert_eq!(
            t[0],
            Token::Opt {
                name: "a".into(),
                value: Some("b=c".into())
            }
        );
    }

    /// Every option table: names are lowercase (the tokenizer lowercases what it reads) and
    /// no name is given to two options of one verb.
    #[test]
    fn option_tables_are_well_formed() {
        for v in crate::cli::VERBS {
            let mut seen = std::collections::HashSet::new();
            for o in v.opts {
                for n in o.names {
                    assert_eq!(*n, n.to_ascii_lowercase(), "-{}: -{n}", v.names[0]);
                    assert!(seen.insert(*n), "-{}: -{n} twice", v.names[0]);
                }
            }
        }
    }
}
