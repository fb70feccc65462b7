//! Exit codes of the `img` command, one per class of failure so scripts and the server can
//! tell a bad image from a bad target or a network fault. Documented in docs/img.md.

use imgengine::ErrorKind;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Exit {
    /// Everything asked for was done.
    Success = 0,
    /// A failure that fits no class below.
    Failure = 1,
    /// The command line is wrong: unknown verb or option, missing value.
    Usage = 2,
    /// The image is corrupt or truncated.
    BadImage = 3,
    /// The image is unsigned or its signature is not from a trusted key.
    Signature = 4,
    /// The target disk or partition is missing, too small, or unsuitable.
    Target = 5,
    /// A network transfer or server failed.
    Network = 6,
    /// Reading or writing a device or file failed.
    Io = 7,
    /// The input uses something this version does not support.
    Unsupported = 8,
    /// No management server could be found (discovery).
    NoServer = 9,
}

impl Exit {
    pub fn code(self) -> i32 {
        self as i32
    }

    /// The exit code for an engine error found anywhere in an error chain.
    pub fn from_error(err: &anyhow::Error) -> Exit {
        for cause in err.chain() {
            if let Some(e) = cause.downcast_ref::<imgengine::Error>() {
                return Exit::from_kind(e.kind());
            }
            if cause.downcast_ref::<crate::args::UsageError>().is_some() {
                return Exit::Usage;
            }
        }
        Exit::Failure
    }

    pub fn from_kind(kind: ErrorKind) -> Exit {
        match kind {
            ErrorKind::Corrupt | ErrorKind::Truncated => Exit::BadImage,
            ErrorKind::Signature => Exit::Signature,
            ErrorKind::Target => Exit::Target,
            ErrorKind::Network => Exit::Network,
            ErrorKind::Io => Exit::Io,
            ErrorKind::Unsupported => Exit::Unsupported,
            ErrorKind::InvalidInput => Exit::Usage,
            _ => Exit::Failure,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_kinds_map_to_distinct_codes() {
        let e = anyhow::Error::new(imgengine::Error::corrupt("chunk 3")).context("restoring x");
        assert_eq!(Exit::from_error(&e), Exit::BadImage);
        let e = anyhow::Error::new(imgengine::Error::new(ErrorKind::Signature, "k"));
        assert_eq!(Exit::from_error(&e).code(), 4);
        assert_eq!(Exit::from_error(&anyhow::anyhow!("other")), Exit::Failure);
    }
}
