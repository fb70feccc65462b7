//! The convert task (seed 001 step 4): check the job's flash size against the device's
//! disk, apply the autogenic layout, then deploy the image into the new OS partition.

use protocol::ConvertSpec;

use crate::checkin::job::{target_disk, Done, Rejection, Reporter};
use crate::checkin::AgentConfig;

/// The device's flash (the disk's size) must be the one the job was planned for: the
/// layout was computed for that size (seed 001: one flash size per conversion job).
pub(crate) fn check_flash_size(disk_len: u64, spec: &ConvertSpec) -> Result<(), Rejection> {
    if disk_len != spec.flash_size {
        return Err(Rejection(format!(
            "this device's flash is {disk_len} bytes ({} MB) and the conversion job was planned for {} bytes ({} MB): schedule the conversion for devices of this flash size in a job of their own",
            disk_len >> 20,
            spec.flash_size,
            spec.flash_size >> 20
        )));
    }
    Ok(())
}

pub(crate) fn task(cfg: &AgentConfig, spec: &ConvertSpec, rep: &Reporter) -> anyhow::Result<Done> {
    let disk = target_disk(cfg, spec.disk.as_deref())?;
    let t = imgengine::target::Target::open_disk_read_only(&disk).map_err(anyhow::Error::new)?;
    check_flash_size(t.len(), spec)?;
    rep.log(format!(
        "{}: {} bytes of flash, as the job expects",
        disk.display(),
        t.len()
    ));
    Err(Rejection(
        "converting to the autogenic layout needs the layout engine, which this agent build does not include yet: nothing was changed".into(),
    )
    .into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn another_flash_size_is_rejected_with_both_sizes() {
        let spec = ConvertSpec {
            image: protocol::ImageRef {
                name: "os".into(),
                version: "1".into(),
                url: "https://s/x".into(),
                size: Some(1),
                autogenic: true,
            },
            disk: None,
            backup_size: None,
            flash_size: 4096 << 20,
        };
        assert!(check_flash_size(4096 << 20, &spec).is_ok());
        let e = check_flash_size(8192 << 20, &spec).unwrap_err().0;
        assert!(e.contains("8192 MB") && e.contains("4096 MB"), "{e}");
    }
}
