//! The engine's one public error type: a small kind, a context naming what failed and where
//! (device, chunk, offset, operation), and the underlying cause (the shape of
//! cloud-hypervisor's `block/src/error.rs`).
//!
//! Every message a user can meet names the thing and, where there is one, the way out; the
//! context strings are written so that `"{kind}: {context}"` reads as a sentence, e.g.
//! `image is corrupt: chunk 17 at disk offset 71303168: SHA-256 mismatch; re-download it`.
//!
//! Each cause is printed once: `Display` shows the kind and the context only, and the cause
//! is reached through [`std::error::Error::source`], which is what a reporter walking the
//! chain (anyhow's `{:#}`, or this type's own `{:#}`) prints after it. A `Display` that
//! also showed its cause would have every such reporter print the OS message twice.
//!
//! Hand-written rather than derived with `thiserror`: the type is one struct with a
//! boxed, optional cause, which the derive would save a dozen lines of.

use std::fmt;

/// What went wrong, coarsely: callers (the `img` command) map this to an exit code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum ErrorKind {
    /// Reading or writing a file or device failed.
    Io,
    /// The image's bytes do not match their checksums or structure.
    Corrupt,
    /// The image ended before its end record.
    Truncated,
    /// The signature is missing, wrong, or from a key that is not trusted.
    Signature,
    /// The input is valid but uses something this version does not handle.
    Unsupported,
    /// The target is too small, missing, or not what the image needs.
    Target,
    /// A network transfer failed.
    Network,
    /// The caller asked for something that cannot be done (bad argument, bad name).
    InvalidInput,
}

impl ErrorKind {
    fn describe(self) -> &'static str {
        match self {
            ErrorKind::Io => "I/O error",
            ErrorKind::Corrupt => "image is corrupt",
            ErrorKind::Truncated => "image is truncated",
            ErrorKind::Signature => "signature check failed",
            ErrorKind::Unsupported => "not supported",
            ErrorKind::Target => "unsuitable target",
            ErrorKind::Network => "network error",
            ErrorKind::InvalidInput => "invalid input",
        }
    }
}

impl fmt::Display for ErrorKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.describe())
    }
}

/// An engine error: kind + context (+ optional cause).
#[derive(Debug)]
pub struct Error {
    kind: ErrorKind,
    context: String,
    source: Option<Box<dyn std::error::Error + Send + Sync + 'static>>,
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// A new error of `kind`; `context` says what failed, where, and the way out.
    pub fn new(kind: ErrorKind, context: impl Into<String>) -> Self {
        Error {
            kind,
            context: context.into(),
            source: None,
        }
    }

    /// Attach the underlying cause (reached through `source()`, never shown by `{}`).
    pub fn with_source(
        mut self,
        source: impl Into<Box<dyn std::error::Error + Send + Sync>>,
    ) -> Self {
        self.source = Some(source.into());
        self
    }

    /// An I/O error with context.
    pub fn io(context: impl Into<String>, err: std::io::Error) -> Self {
        Error::new(ErrorKind::Io, context).with_source(err)
    }

    pub fn corrupt(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::Corrupt, context)
    }

    pub fn invalid(context: impl Into<String>) -> Self {
        Error::new(ErrorKind::InvalidInput, context)
    }

    /// The same error with `outer` before its context ("`outer`: context"), keeping its
    /// kind and its cause: for a caller that knows which file or device it was about.
    pub fn in_context(mut self, outer: impl fmt::Display) -> Self {
        self.context = format!("{outer}: {}", self.context);
        self
    }

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }
}

/// `{}`: the kind and the context, never the cause. `{:#}`: the same followed by every
/// cause in the chain (as anyhow's `{:#}` prints it), each once.
impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.context)?;
        if f.alternate() {
            let mut cause = std::error::Error::source(self);
            while let Some(c) = cause {
                write!(f, ": {c}")?;
                cause = c.source();
            }
        }
        Ok(())
    }
}

impl std::error::Error for Error {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.source
            .as_deref()
            .map(|e| e as &(dyn std::error::Error + 'static))
    }
}

/// `io_result.ctx("reading chunk 3")` turns an `io::Error` into an engine [`Error`].
pub trait IoContext<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T>;
}

impl<T> IoContext<T> for std::io::Result<T> {
    fn ctx(self, context: impl FnOnce() -> String) -> Result<T> {
        self.map_err(|e| {
            let kind = if e.kind() == std::io::ErrorKind::UnexpectedEof {
                ErrorKind::Truncated
            } else {
                ErrorKind::Io
            };
            Error::new(kind, context()).with_source(e)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// What a reporter walking the chain prints: each error's `Display`, joined by ": "
    /// (anyhow's `{:#}`).
    fn chain(e: &(dyn std::error::Error + 'static)) -> String {
        let mut parts = vec![e.to_string()];
        let mut cause = e.source();
        while let Some(c) = cause {
            parts.push(c.to_string());
            cause = c.source();
        }
        parts.join(": ")
    }

    #[test]
    fn message_names_kind_context_and_cause() {
        let e = Error::io("opening /dev/vda2", std::io::Error::from_raw_os_error(2));
        assert_eq!(e.to_string(), "I/O error: opening /dev/vda2");
        assert_eq!(e.kind(), ErrorKind::Io);
        let os = std::io::Error::from_raw_os_error(2).to_string();
        assert_eq!(
            format!("{e:#}"),
            format!("I/O error: opening /dev/vda2: {os}")
        );
    }

    #[test]
    fn each_cause_is_printed_once() {
        let os = std::io::Error::from_raw_os_error(2).to_string();
        let inner = Error::io("opening image /x.img", std::io::Error::from_raw_os_error(2));
        // An engine error whose cause is an I/O error that carries another engine error
        // (as the HTTP body reader hands one through `io::Read`).
        let outer = Error::new(ErrorKind::Network, "reading the image")
            .with_source(std::io::Error::other(inner));
        for shown in [chain(&outer), format!("{outer:#}")] {
            assert_eq!(shown.matches(&os).count(), 1, "{shown}");
            assert_eq!(shown.matches("opening image /x.img").count(), 1, "{shown}");
        }
        assert_eq!(
            format!("{outer:#}"),
            format!("network error: reading the image: I/O error: opening image /x.img: {os}")
        );
        let e = Error::io("opening /x.img", std::io::Error::from_raw_os_error(2))
            .in_context("restoring /x.img");
        assert_eq!(e.kind(), ErrorKind::Io);
        assert_eq!(
            chain(&e),
            format!("I/O error: restoring /x.img: opening /x.img: {os}")
        );
    }

    #[test]
    fn eof_maps_to_truncated() {
        let r: std::io::Result<()> = Err(std::io::ErrorKind::UnexpectedEof.into());
        assert_eq!(
            r.ctx(|| "reading chunk 1".into()).unwrap_err().kind(),
            ErrorKind::Truncated
        );
    }
}
