//! The `img` command line, parsed in two stages (ripgrep's habit): [`tokenize`] turns the raw
//! arguments into options and values with no side effects, then [`parse_img`] resolves them
//! into one [`ImgCommand`] or a [`UsageError`] that says what is wrong.
//!
//! ZENworks Imaging users type single-dash long options (`img -dump`, `img -session mcast01
//! -m`, `-comp=6`); double-dash (`--comp=6`) is accepted too. A value is given after `=`
//! (`-disk=/dev/sda`) or, for the verb's main operand, as the next word (`-make out.img`).

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

/// What the operator asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ImgCommand {
    Help,
    Version,
    Dump {
        disk: Option<PathBuf>,
        json: bool,
    },
    Make(MakeArgs),
    Restore(RestoreArgs),
    Info {
        image: String,
        json: bool,
        ca: Option<PathBuf>,
    },
    Verify {
        image: String,
        trust: Vec<PathBuf>,
        ca: Option<PathBuf>,
        threads: Option<usize>,
    },
    Sign {
        image: String,
        key: PathBuf,
        out: Option<PathBuf>,
    },
    Keygen {
        key: PathBuf,
    },
    /// A verb this module does not know: handed to the other command families (discovery,
    /// check-in), which report it as unknown if none takes it.
    Other {
        verb: String,
        rest: Vec<OsString>,
    },
}

/// Options common to every verb, collected while resolving.
struct Opts {
    values: Vec<String>,
    opts: Vec<(String, Option<String>)>,
}

impl Opts {
    fn take_flag(&mut self, names: &[&str]) -> Result<bool, UsageError> {
        let mut found = false;
        let mut i = 0;
        while i < self.opts.len() {
            if names.contains(&self.opts[i].0.as_str()) {
                if let Some(v) = &self.opts[i].1 {
                    return Err(usage(format!(
                        "-{} takes no value (got `{v}`)",
                        self.opts[i].0
                    )));
                }
                self.opts.remove(i);
                found = true;
            } else {
                i += 1;
            }
        }
        Ok(found)
    }

    /// All values of a repeatable `-name=value` option.
    fn take_all(&mut self, names: &[&str]) -> Result<Vec<String>, UsageError> {
        let mut out = Vec::new();
        let mut i = 0;
        while i < self.opts.len() {
            if names.contains(&self.opts[i].0.as_str()) {
                let (n, v) = self.opts.remove(i);
                out.push(v.ok_or_else(|| usage(format!("-{n} needs a value: -{n}=VALUE")))?);
            } else {
                i += 1;
            }
        }
        Ok(out)
    }

    fn take_one(&mut self, names: &[&str]) -> Result<Option<String>, UsageError> {
        let mut all = self.take_all(names)?;
        if all.len() > 1 {
            return Err(usage(format!("-{} given more than once", names[0])));
        }
        Ok(all.pop())
    }

    fn operand(&mut self, what: &str, verb: &str) -> Result<String, UsageError> {
        if self.values.is_empty() {
            return Err(usage(format!("-{verb} needs {what}")));
        }
        Ok(self.values.remove(0))
    }

    fn finish(self, verb: &str) -> Result<(), UsageError> {
        if let Some((n, _)) = self.opts.first() {
            return Err(usage(format!("-{verb} does not take -{n}")));
        }
        if let Some(v) = self.values.first() {
            return Err(usage(format!("unexpected argument `{v}` for -{verb}")));
        }
        Ok(())
    }
}

fn parse_num<T: std::str::FromStr>(opt: &str, v: &str) -> Result<T, UsageError> {
    v.parse()
        .map_err(|_| usage(format!("-{opt}={v}: not a number")))
}

/// Stage two: resolve the words after the program name into one command.
pub fn parse_img(args: &[OsString]) -> Result<ImgCommand, UsageError> {
    let Some(first) = args.first() else {
        return Ok(ImgCommand::Help);
    };
    let first_tok = tokenize(std::slice::from_ref(first))?;
    let verb = match first_tok.first() {
        Some(Token::Opt { name, value: None }) => name.clone(),
        Some(Token::Opt {
            name,
            value: Some(v),
        }) => {
            // `-make=out.img` is accepted as `-make out.img`.
            let mut rest = vec![OsString::from(v)];
            rest.extend(args[1..].iter().cloned());
            return resolve(name, &rest, args);
        }
        _ => {
            return Err(usage(format!(
                "expected a verb such as -dump, got `{}`",
                first.to_string_lossy()
            )))
        }
    };
    resolve(&verb, &args[1..], args)
}

fn resolve(verb: &str, rest: &[OsString], all: &[OsString]) -> Result<ImgCommand, UsageError> {
    let known = [
        "help", "h", "?", "version", "dump", "d", "make", "restore", "info", "verify", "sign",
        "keygen",
    ];
    if !known.contains(&verb) {
        return Ok(ImgCommand::Other {
            verb: verb.to_string(),
            rest: all[all.len() - rest.len()..].to_vec(),
        });
    }
    let mut o = Opts {
        values: Vec::new(),
        opts: Vec::new(),
    };
    for t in tokenize(rest)? {
        match t {
            Token::Value(v) => o.values.push(v),
            Token::Opt { name, value } => o.opts.push((name, value)),
        }
    }
    let threads = |o: &mut Opts| -> Result<Option<usize>, UsageError> {
        o.take_one(&["threads"])?
            .map(|v| parse_num("threads", &v))
            .transpose()
    };
    let cmd = match verb {
        "help" | "h" | "?" => ImgCommand::Help,
        "version" => ImgCommand::Version,
        "dump" | "d" => {
            let json = o.take_flag(&["json"])?;
            let disk = o
                .take_one(&["disk"])?
                .or_else(|| (!o.values.is_empty()).then(|| o.values.remove(0)));
            ImgCommand::Dump {
                disk: disk.map(PathBuf::from),
                json,
            }
        }
        "make" => {
            let dest = o.operand(
                "a destination: a file, `-` for stdout, or an http(s) URL",
                verb,
            )?;
            let comp = match o.take_one(&["comp"])? {
                Some(v) => {
                    let c: u8 = parse_num("comp", &v)?;
                    if c > 9 {
                        return Err(usage(format!(
                            "-comp={c}: the level is 0 (none) to 9 (smallest)"
                        )));
                    }
                    c
                }
                None => 1,
            };
            let chunk_mib = o
                .take_one(&["chunk"])?
                .map(|v| parse_num::<u32>("chunk", &v))
                .transpose()?;
            if let Some(c) = chunk_mib {
                if !(1..=64).contains(&c) {
                    return Err(usage(format!("-chunk={c}: chunk size is 1 to 64 MiB")));
                }
            }
            ImgCommand::Make(MakeArgs {
                dest,
                sel: DiskSel {
                    disk: o.take_one(&["disk"])?.map(PathBuf::from),
                    part: o.take_one(&["part", "p"])?,
                },
                comp,
                name: o.take_one(&["name"])?,
                version: o.take_one(&["version", "imgversion", "ver"])?,
                models: o
                    .take_all(&["model", "models"])?
                    .iter()
                    .flat_map(|m| m.split(','))
                    .map(|m| m.trim().to_string())
                    .filter(|m| !m.is_empty())
                    .collect(),
                description: o.take_one(&["desc", "description"])?,
                raw: o.take_flag(&["raw"])?,
                chunk_mib,
                ca: o.take_one(&["ca"])?.map(PathBuf::from),
                threads: threads(&mut o)?,
            })
        }
        "restore" => {
            let src = o.operand(
                "a source: an image file, `-` for stdin, or an http(s) URL",
                verb,
            )?;
            let resume = match o.take_one(&["resume"])?.as_deref() {
                None | Some("auto") => Resume::Auto,
                Some("always" | "yes") => Resume::Always,
                Some("never" | "no") => Resume::Never,
                Some(v) => return Err(usage(format!("-resume={v}: use auto, always or never"))),
            };
            ImgCommand::Restore(RestoreArgs {
                src,
                sel: DiskSel {
                    disk: o.take_one(&["disk"])?.map(PathBuf::from),
                    part: o.take_one(&["part", "p"])?,
                },
                model: o.take_one(&["model"])?,
                force: o.take_flag(&["force"])?,
                wholedisk: o.take_flag(&["wholedisk"])?,
                trust: o
                    .take_all(&["trust"])?
                    .into_iter()
                    .map(PathBuf::from)
                    .collect(),
                unsigned: o.take_flag(&["unsigned"])?,
                resume,
                state: o.take_one(&["state"])?.map(PathBuf::from),
                ca: o.take_one(&["ca"])?.map(PathBuf::from),
                threads: threads(&mut o)?,
            })
        }
        "info" => ImgCommand::Info {
            image: o.operand("an image (file, `-` or URL)", verb)?,
            json: o.take_flag(&["json"])?,
            ca: o.take_one(&["ca"])?.map(PathBuf::from),
        },
        "verify" => ImgCommand::Verify {
            image: o.operand("an image (file, `-` or URL)", verb)?,
            trust: o
                .take_all(&["trust"])?
                .into_iter()
                .map(PathBuf::from)
                .collect(),
            ca: o.take_one(&["ca"])?.map(PathBuf::from),
            threads: threads(&mut o)?,
        },
        "sign" => {
            let image = o.operand("an image file", verb)?;
            let key = o
                .take_one(&["key"])?
                .ok_or_else(|| usage("-sign needs -key=SECRETKEYFILE (make one with -keygen)"))?;
            ImgCommand::Sign {
                image,
                key: key.into(),
                out: o.take_one(&["out"])?.map(PathBuf::from),
            }
        }
        "keygen" => {
            let key = match o.take_one(&["key"])? {
                Some(k) => k,
                None => o.operand(
                    "a file name for the secret key (the public key goes to FILE.pub)",
                    verb,
                )?,
            };
            ImgCommand::Keygen { key: key.into() }
        }
        _ => unreachable!("verb list above is exhaustive"),
    };
    o.finish(verb)?;
    Ok(cmd)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<ImgCommand, UsageError> {
        let v: Vec<OsString> = s.split_whitespace().map(OsString::from).collect();
        parse_img(&v)
    }

    #[test]
    fn single_and_double_dash_are_the_same() {
        assert_eq!(
            p("-dump /dev/sda").unwrap(),
            p("--dump --disk=/dev/sda").unwrap()
        );
        assert_eq!(
            p("-dump").unwrap(),
            ImgCommand::Dump {
                disk: None,
                json: false
            }
        );
    }

    #[test]
    fn make_with_options() {
        let ImgCommand::Make(m) =
            p("-make out.img -disk=disk.img -part=2 -comp=6 -model=Z90,R90").unwrap()
        else {
            panic!()
        };
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
        let ImgCommand::Make(m) = p("-make -").unwrap() else {
            panic!()
        };
        assert_eq!(
            (m.dest.as_str(), m.comp),
            ("-", 1),
            "stdout, default comp 1 as in the seed"
        );
    }

    #[test]
    fn errors_say_what_is_wrong() {
        assert!(p("-make out.img -comp=10")
            .unwrap_err()
            .0
            .contains("0 (none) to 9"));
        assert!(p("-make").unwrap_err().0.contains("needs a destination"));
        assert!(p("-restore x.img -bogus")
            .unwrap_err()
            .0
            .contains("does not take -bogus"));
        assert!(p("-sign x.img").unwrap_err().0.contains("-key="));
        assert!(p("-restore x.img -resume=maybe")
            .unwrap_err()
            .0
            .contains("auto, always or never"));
        assert!(p("-dump -json=yes")
            .unwrap_err()
            .0
            .contains("takes no value"));
        assert!(p("restore").unwrap_err().0.contains("expected a verb"));
    }

    #[test]
    fn restore_resume_and_trust() {
        let ImgCommand::Restore(r) =
            p("-restore http://h/x.img -disk=d -trust=a.pub -trust=b.pub -resume=never").unwrap()
        else {
            panic!()
        };
        assert_eq!(r.trust.len(), 2);
        assert_eq!(r.resume, Resume::Never);
        assert!(!r.unsigned);
        let ImgCommand::Restore(r) = p("-restore x.img -disk=d -unsigned").unwrap() else {
            panic!()
        };
        assert!(r.unsigned);
        assert!(!r.wholedisk);
        let ImgCommand::Restore(r) = p("-restore p.img -disk=usb.img -wholedisk").unwrap() else {
            panic!()
        };
        assert!(r.wholedisk);
    }

    #[test]
    fn unknown_verbs_go_to_other_families_with_their_arguments() {
        assert_eq!(
            p("-discover -json").unwrap(),
            ImgCommand::Other {
                verb: "discover".into(),
                rest: vec![OsString::from("-json")]
            }
        );
        assert_eq!(p("-make=o.img").unwrap(), p("-make o.img").unwrap());
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
}
