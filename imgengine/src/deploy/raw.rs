//! Raw disk images (`.img`, `.img.zst`, `.img.gz`, `.img.xz`): no checksums, no manifest,
//! no signature, so a device that trusts keys refuses them. Written as they are decoded,
//! in 4 MiB blocks, with holes for zero blocks; the target is never grown, so an image
//! larger than it stops with an error at its end (or before the first byte, when its size
//! is known up front: a plain file, or a zstd frame header that carries it).
//!
//! Two threads: one decodes the next block while the other writes this one (xz and gzip
//! decode slower than a disk writes, a network read waits). There is no parallel work to
//! share out, so this is a bounded channel, not the chunk pipeline.

use std::io::Read;
use std::path::Path;
use std::sync::mpsc::{sync_channel, SyncSender};

use crate::error::{Error, ErrorKind, Result};
use crate::io::{DecompressReader, Progress};
use crate::source::Source;
use crate::target::Target;

use super::head::Buffered;
use super::{DeployOptions, DeploySummary};

/// Raw images are written in blocks of this size.
const RAW_BLOCK: usize = 4 << 20;
/// Decoded blocks waiting for the writer.
const BLOCKS_AHEAD: usize = 1;

/// One decoded block and its offset in the image.
type Block = Result<(u64, Vec<u8>)>;

/// Deploy an ordinary raw image, decompressed as its first bytes said.
pub(super) fn deploy_raw(
    mut image: DecompressReader<Buffered>,
    source: &Source,
    target: &Path,
    part: Option<&str>,
    opts: &DeployOptions,
    progress: &dyn Progress,
) -> Result<DeploySummary> {
    if !opts.trusted_keys.is_empty() {
        return Err(Error::new(
            ErrorKind::Signature,
            format!("{} is a raw disk image, which cannot carry a signature, and this agent only deploys signed images", source.location()),
        ));
    }
    // The image's size, or at least a lower bound, before anything is written: a plain
    // file's length, or the content size a zstd frame header carries.
    let known_len = match image.compressor() {
        None => source.len(),
        Some(_) => image.content_len(),
    };
    // Never grown or created: an uncompressed image larger than the target is refused
    // here; a compressed one (its size is known only at its end) stops with the same error
    // at the target's end.
    let t = match part {
        Some(spec) => Target::open_partition(target, spec)?.0,
        None => Target::open_disk(target, None)?,
    };
    let too_large = |len: u64| {
        Error::new(
            ErrorKind::Target,
            format!(
                "the image is larger than {} ({len} bytes or more, the target has {}); use a larger disk or partition",
                target.display(),
                t.len()
            ),
        )
    };
    if let Some(len) = known_len.filter(|&l| l > t.len()) {
        return Err(too_large(len));
    }
    progress.begin("deploying raw image", known_len);
    let mut summary = DeploySummary {
        raw: true,
        ..Default::default()
    };
    let what = source.location().to_string();
    std::thread::scope(|s| {
        let (tx, rx) = sync_channel::<Block>(BLOCKS_AHEAD);
        s.spawn(move || read_blocks(&mut image, &what, tx));
        // Returning early drops `rx`: the reader's next send fails and it stops.
        for block in rx {
            let (off, buf) = block?;
            let n = buf.len() as u64;
            if off + n > t.len() {
                return Err(too_large(off + n));
            }
            t.write_sparse_at(&buf, off)?;
            summary.chunks_written += 1;
            summary.bytes_written += n;
            progress.advance(n);
        }
        Ok(())
    })?;
    // A raw GPT disk image on a larger disk: the backup header belongs in the last LBA.
    if part.is_none() {
        t.sync()?;
        summary
            .notes
            .extend(crate::disk::gpt::relocate_backup_of_raw_image(&t)?);
    }
    // A raw image of a partition (the -raw fallback) written into another partition.
    if part.is_some() {
        summary
            .notes
            .extend(super::target::fix_hidden_sectors(target, &t)?);
    }
    t.sync()?;
    progress.end();
    summary.bytes_fetched = source.bytes_fetched();
    Ok(summary)
}

/// Decode `image` into blocks of [`RAW_BLOCK`] bytes and send them, then stop; the first
/// read error is sent in place of a block. Stops when the writer has gone.
fn read_blocks(image: &mut DecompressReader<Buffered>, what: &str, tx: SyncSender<Block>) {
    let mut off = 0u64;
    loop {
        let mut buf = vec![0u8; RAW_BLOCK];
        let mut got = 0;
        while got < buf.len() {
            match image.read(&mut buf[got..]) {
                Ok(0) => break,
                Ok(n) => got += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    // A plain image's read error is the source's; a compressed one's is
                    // (mostly) bad data.
                    let kind = match image.compressor() {
                        None => ErrorKind::Io,
                        Some(_) => ErrorKind::Corrupt,
                    };
                    let at = off + got as u64;
                    let _ = tx.send(Err(Error::new(
                        kind,
                        format!("{what}: reading at uncompressed offset {at}"),
                    )
                    .with_source(e)));
                    return;
                }
            }
        }
        if got == 0 {
            return;
        }
        buf.truncate(got);
        if tx.send(Ok((off, buf))).is_err() {
            return;
        }
        off += got as u64;
    }
}
