//! Where a master's image bytes come from. The carousel reads the image by byte range
//! (an object, then one FEC block of it at a time); a [`ChunkSource`] answers those reads.
//! [`FileChunks`] reads an image file (`-image=FILE`); `onthefly::OnTheFly` makes each chunk
//! record again from the master's own disk when it is needed, so no image file exists.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::error::{IoContext, Result};
use crate::format::{self, ImageHead};
use crate::source::{HttpConfig, Location, Source};

/// The bytes of one image, read at random offsets.
pub trait ChunkSource {
    /// The image's head: metadata, manifest (and so its digest), length.
    fn head(&self) -> &ImageHead;
    /// Fill `buf` with the image's bytes at `offset` (inside the image), or fail naming
    /// what could not be read. Never returns bytes that do not match the manifest when the
    /// source can check them (the on-the-fly source does; a file is checked by the clients).
    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()>;
    /// What the image is, for the console ("/srv/a.img", "disk /dev/sda").
    fn describe(&self) -> String;
}

/// An image file: today's `-image=FILE`.
pub struct FileChunks {
    path: PathBuf,
    file: File,
    head: ImageHead,
}

impl FileChunks {
    pub fn open(path: &Path) -> Result<FileChunks> {
        let src = Source::open(&Location::File(path.to_path_buf()), &HttpConfig::default())?;
        let head = format::fetch_head(&src)?;
        let file = File::open(path).ctx(|| format!("opening {}", path.display()))?;
        Ok(FileChunks {
            path: path.to_path_buf(),
            file,
            head,
        })
    }
}

impl ChunkSource for FileChunks {
    fn head(&self) -> &ImageHead {
        &self.head
    }

    fn read_at(&mut self, offset: u64, buf: &mut [u8]) -> Result<()> {
        self.file
            .read_exact_at(buf, offset)
            .ctx(|| format!("reading {}", self.path.display()))
    }

    fn describe(&self) -> String {
        self.path.display().to_string()
    }
}
