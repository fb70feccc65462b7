//! The convert task (seed 001 step 4): check the job's flash size against the device's
//! disk, apply the autogenic layout (the `autogenic` crate: boot-agent partition kept, OS
//! partition 2, IMGBACKUP partition 3 formatted), then deploy the image into the new OS
//! partition through the ordinary deploy path (signature, every chunk, tables last).

use protocol::{After, ConvertSpec, DeploySpec, Task};

use crate::checkin::client::Client;
use crate::checkin::job::{target_disk, Done, Rejection, Reporter};
use crate::checkin::state::StateDir;
use crate::checkin::AgentConfig;

/// The device's flash (the disk's size) must be the one the job was planned for: the
/// layout was computed for that size (seed 001: one flash size per conversion job).
pub(crate) fn check_flash_size(disk_len: u64, spec: &ConvertSpec) -> Result<(), Rejection> {
    ::autogenic::layout::same_flash_size(spec.flash_size, disk_len)
        .map_err(|e| Rejection(format!("{e:#}")))
}

pub(crate) fn task(
    client: &Client,
    state: &StateDir,
    cfg: &AgentConfig,
    task: &Task,
    spec: &ConvertSpec,
    rep: &Reporter,
) -> anyhow::Result<Done> {
    let disk = target_disk(cfg, spec.disk.as_deref())?;
    let len = imgengine::target::Target::open_disk_read_only(&disk)
        .map_err(anyhow::Error::new)?
        .len();
    check_flash_size(len, spec)?;
    let image = spec.image.size.ok_or_else(|| {
        Rejection(format!(
            "the conversion task does not say how large {} {} is (the backup partition is sized from it): the server must send the image's size",
            spec.image.name, spec.image.version
        ))
    })?;
    let plan = ::autogenic::convert::plan_for_disk(&disk, image, spec.backup_size)
        .map_err(|e| Rejection(format!("{e:#}: nothing was changed")))?;
    rep.log(plan.describe());
    let done = ::autogenic::convert::apply(&plan)?;
    for n in &done.notes {
        rep.log(n.clone());
    }
    rep.log(format!(
        "{}: converted to the autogenic layout{}; now the OS partition is imaged",
        disk.display(),
        if done.table_written {
            ""
        } else {
            " (the partition table already was; the backup partition was formatted)"
        }
    ));
    let deploy = DeploySpec {
        image: spec.image.clone(),
        disk: spec.disk.clone(),
        partition: Some("2".into()),
        preserve: vec![],
        backup_first: false,
        after: After::Reboot,
        from_backup: false,
        fetch_to_backup: false,
    };
    crate::checkin::job::deploy_task(client, state, cfg, task, &deploy, rep)
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
