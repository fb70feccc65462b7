//! The engine's one public error type: a small kind, a context naming what failed and where
//! (device, chunk, offset, operation), and the underlying cause.
//!
//! Every message a user can meet names the thing and, where there is one, the way out; the
//! context strings are written so that `"{context}: {kind}"` reads as a sentence, e.g.
//! `chunk 17 at disk offset 71303168: image is corrupt (SHA-256 mismatch); re-download it`.

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

    /// Attach the underlying cause.
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

    pub fn kind(&self) -> ErrorKind {
        self.kind
    }

    pub fn context(&self) -> &str {
        &self.context
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.kind, self.context)?;
        if let Some(src) = &self.source {
            write!(f, " ({src})")?;
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

    #[test]
    fn message_names_kind_context_and_cause() {
        let e = Error::io("opening /dev/vda2", std::io::Error::from_raw_os_error(2));
        let s = e.to_string();
        assert!(s.starts_with("I/O error: opening /dev/vda2 ("), "{s}");
        assert_eq!(e.kind(), ErrorKind::Io);
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
