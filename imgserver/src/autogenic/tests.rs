//! The autogenic rules, one table per decision.

use super::*;
use crate::model::ImageFacts;
use crate::protocol::{Autogenic, DeviceIdentity, PartitionReport};

const MAC: &str = "52:54:00:00:00:01";

fn stamp(name: &str, version: &str) -> ImageStamp {
    ImageStamp {
        name: name.into(),
        version: version.into(),
    }
}

fn img(version: &str, autogenic: bool, size: u64) -> ImageRow {
    ImageRow {
        id: 1,
        name: "os".into(),
        version: version.into(),
        file: Some(format!("os-{version}.img")),
        url: None,
        size: Some(size),
        facts: ImageFacts {
            name: "os".into(),
            version: version.into(),
            min_target_size: 200 * MIB,
            ..Default::default()
        },
        sealed: true,
        signed_by: None,
        description: None,
        added: 0,
        captured_from: None,
        autogenic,
    }
}

/// A device with `flash` bytes of flash; `backup`: (partition size, image in it,
/// verified bytes, size, complete).
fn dev(flash: u64, backup: Option<(u64, Option<ImageStamp>, u64, u64, bool)>) -> CheckIn {
    let mut a = Autogenic::default();
    if let Some((part, image, bytes, size, complete)) = backup {
        a.support_img_backup = true;
        a.backup_partition_size = part;
        a.backup_image_present = complete;
        a.back_image_ver = image
            .as_ref()
            .filter(|_| complete)
            .map(|s| s.version.clone());
        a.backup_image = image;
        a.backup_bytes = bytes;
        a.backup_size = size;
    }
    CheckIn {
        device: DeviceIdentity {
            mac: MAC.into(),
            ..Default::default()
        },
        disks: vec![DiskReport {
            name: "/dev/mmcblk0".into(),
            size: flash,
            boot_agent_partition: Some(1),
            partitions: vec![
                PartitionReport {
                    number: 1,
                    size: 16 * MIB,
                    ..Default::default()
                },
                PartitionReport {
                    number: 2,
                    size: flash / 2,
                    ..Default::default()
                },
            ],
            ..Default::default()
        }],
        autogenic: a,
        ..Default::default()
    }
}

/// As `schedule add` sets them: `--backup-only` alone is BI (copy only); with
/// `--from-backup` it is BI+PI (`fetch`).
fn opts(backup_only: bool, from_backup: bool, fetch: bool) -> JobOptions {
    let bi = backup_only && !from_backup;
    JobOptions {
        partition: Some("2".into()),
        backup_only: bi,
        after: if bi { After::CopyOnly } else { After::Reboot },
        from_backup,
        fetch_to_backup: fetch,
        ..Default::default()
    }
}

#[test]
fn rsp_backup_image_tag_marks_autogenic() {
    // (what, bytes, Ok(backup_image) or Err(part of the message))
    let utf16 = |s: &str| {
        let mut v = vec![0xff, 0xfe];
        for u in s.encode_utf16() {
            v.extend_from_slice(&u.to_le_bytes());
        }
        v
    };
    let big = vec![b' '; RSP_MAX_BYTES + 1];
    let many = "<a>".repeat(RSP_MAX_TAGS + 1);
    let rows: Vec<(&str, Vec<u8>, Result<bool, &str>)> = vec![
        (
            "the seed's tag",
            b"<Package>\n<BackupImage>\n</Package>".to_vec(),
            Ok(true),
        ),
        ("an empty element", b"<BackupImage/>".to_vec(), Ok(true)),
        (
            "any case",
            b"<backupimage >yes</backupimage>".to_vec(),
            Ok(true),
        ),
        (
            "with a BOM",
            b"\xef\xbb\xbf<BackupImage>".to_vec(),
            Ok(true),
        ),
        (
            "UTF-16 as Windows writes it",
            utf16("<Img>\r\n<BackupImage>"),
            Ok(true),
        ),
        (
            "no tag",
            b"<Package><Name>os</Name></Package>".to_vec(),
            Ok(false),
        ),
        (
            "only the closing tag",
            b"</BackupImage>".to_vec(),
            Ok(false),
        ),
        ("a longer name", b"<BackupImageOld>".to_vec(), Ok(false)),
        (
            "in a comment word",
            b"BackupImage <!BackupImage>".to_vec(),
            Ok(false),
        ),
        ("an unclosed tag", b"<BackupImage".to_vec(), Ok(false)),
        ("empty", Vec::new(), Ok(false)),
        (
            "Latin-1 text",
            b"<Desc>caf\xe9</Desc><BackupImage>".to_vec(),
            Ok(true),
        ),
        ("NUL bytes", b"<BackupImage>\0\0".to_vec(), Err("NUL")),
        ("odd UTF-16", vec![0xff, 0xfe, b'<'], Err("odd")),
        (
            "broken UTF-16",
            vec![0xff, 0xfe, 0x00, 0xd8, 0x41, 0x00],
            Err("broken"),
        ),
        ("too big", big, Err("more than")),
        (
            "too many tags",
            many.into_bytes(),
            Err("more than 4096 tags"),
        ),
    ];
    for (what, bytes, want) in rows {
        match (parse_rsp(&bytes), want) {
            (Ok(r), Ok(b)) => assert_eq!(r.backup_image, b, "{what}"),
            (Err(e), Err(part)) => assert!(e.contains(part), "{what}: {e}"),
            (got, want) => panic!("{what}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn rsp_mutated_inputs_never_panic_and_stay_bounded() {
    // The deterministic companion of the fuzz target `rsp`: every prefix of a real script,
    // and byte mutations of it, parse or are refused, never panic, and never yield more
    // tags than the limit or a tag longer than 64.
    let seed = "\u{feff}<Package>\r\n<Name>os</Name>\r\n<Version>8.0</Version>\r\n<BackupImage>\r\n<Cmd a=\"b\">x</Cmd></Package>\r\n";
    let base = seed.as_bytes().to_vec();
    let mut inputs: Vec<Vec<u8>> = (0..=base.len()).map(|n| base[..n].to_vec()).collect();
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for _ in 0..4000 {
        let mut m = base.clone();
        for _ in 0..(x % 5 + 1) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let at = (x as usize) % m.len();
            match x % 3 {
                0 => m[at] = (x >> 24) as u8,
                1 => {
                    m.insert(at, b'<');
                }
                _ => {
                    m.remove(at);
                }
            }
            if m.is_empty() {
                m.push(b'<');
            }
        }
        inputs.push(m);
    }
    let mut utf16 = vec![0xff, 0xfe];
    for u in seed.encode_utf16() {
        utf16.extend_from_slice(&u.to_le_bytes());
    }
    inputs.extend((0..utf16.len()).map(|n| utf16[..n].to_vec()));
    for i in inputs {
        if let Ok(r) = parse_rsp(&i) {
            assert!(r.tags.len() <= RSP_MAX_TAGS);
            assert!(r.tags.iter().all(|t| !t.is_empty() && t.len() <= 64));
            assert_eq!(
                r.backup_image,
                r.tags.iter().any(|t| t.eq_ignore_ascii_case("BackupImage"))
            );
        }
    }
}

#[test]
fn backup_deploys_need_an_autogenic_image_and_a_backup_partition() {
    let os2 = Some(stamp("os", "2"));
    let none = dev(8192 * MIB, None);
    let empty = dev(8192 * MIB, Some((1024 * MIB, None, 0, 0, false)));
    let holds2 = dev(
        8192 * MIB,
        Some((1024 * MIB, os2.clone(), 300 * MIB, 300 * MIB, true)),
    );
    let half2 = dev(
        8192 * MIB,
        Some((1024 * MIB, os2.clone(), 100 * MIB, 300 * MIB, false)),
    );
    let holds1 = dev(
        8192 * MIB,
        Some((1024 * MIB, Some(stamp("os", "1")), 1, 1, true)),
    );
    let small = dev(8192 * MIB, Some((200 * MIB, None, 0, 0, false)));
    let (bi, pi, both, plain) = (
        opts(true, false, false),
        opts(false, true, false),
        opts(true, true, true),
        opts(false, false, false),
    );
    let auto = img("2", true, 300 * MIB);
    let ordinary = img("2", false, 300 * MIB);
    // (what, image, options, device, errors: parts each error must contain, in order)
    let rows: Vec<(&str, &ImageRow, &JobOptions, &CheckIn, Vec<&str>)> = vec![
        ("plain deploy: not our business", &ordinary, &plain, &none, vec![]),
        ("BI onto an empty backup", &auto, &bi, &empty, vec![]),
        ("BI+PI onto an empty backup", &auto, &both, &empty, vec![]),
        ("PI with the image there", &auto, &pi, &holds2, vec![]),
        ("BI again over the same image", &auto, &bi, &holds2, vec![]),
        (
            "BI of an ordinary image",
            &ordinary,
            &bi,
            &empty,
            vec!["is not autogenic, so it cannot download to the backup partition (BI): register it with `imgserver image add FILE --autogenic`"],
        ),
        (
            "PI of an ordinary image",
            &ordinary,
            &pi,
            &holds2,
            vec!["is not autogenic"],
        ),
        (
            "BI without a backup partition",
            &auto,
            &bi,
            &none,
            vec!["device 52:54:00:00:00:01 has no backup partition"],
        ),
        (
            "PI without a backup partition",
            &auto,
            &pi,
            &none,
            vec!["--convert"],
        ),
        (
            "PI with an empty backup",
            &auto,
            &pi,
            &empty,
            vec!["holds no image, not os 2: schedule `--backup-only` first"],
        ),
        (
            "PI with half of the image",
            &auto,
            &pi,
            &half2,
            vec!["holds os 2 incomplete (104857600 of 314572800 bytes)"],
        ),
        (
            "PI with another version there",
            &auto,
            &pi,
            &holds1,
            vec!["the backup partition of device 52:54:00:00:00:01 holds os 1, not os 2"],
        ),
        (
            "BI into a backup partition too small",
            &auto,
            &bi,
            &small,
            vec!["larger --backup-size"],
        ),
    ];
    for (what, image, o, d, want) in rows {
        let v = validate_backup_deploy(image, o, d);
        assert_eq!(v.errors.len(), want.len(), "{what}: {v:?}");
        for (e, part) in v.errors.iter().zip(&want) {
            assert!(e.contains(part), "{what}: {e:?} lacks {part:?}");
        }
    }
    // The model runs these rules for deploys: the plain --then copy-only of seed 003 keeps
    // its warning, BI turns the missing backup partition into an error.
    let job = |o: JobOptions| crate::store::JobRow {
        id: 1,
        kind: "deploy".into(),
        image: Some(1),
        options: JobOptions {
            backup_first: false,
            ..o
        },
        selector: "all".into(),
        state: "active".into(),
        created: 0,
        note: None,
    };
    let copy_only = JobOptions {
        after: After::CopyOnly,
        ..opts(false, false, false)
    };
    let v = crate::model::validate_task(&job(copy_only), Some(&ordinary), Some(&none));
    assert!(v.ok(), "{v:?}");
    assert!(v.warnings[0].contains("the backup is skipped"), "{v:?}");
    let v = crate::model::validate_task(&job(bi.clone()), Some(&auto), Some(&none));
    assert!(!v.ok() && v.warnings.is_empty(), "{v:?}");
}

#[test]
fn the_seed_layout() {
    let m = MIB;
    // (flash, boot agent now, image, backup asked, OS needs, Ok((boot, os, backup, free)) or Err(part))
    type Row = (
        u64,
        Option<u64>,
        u64,
        Option<u64>,
        u64,
        Result<(u64, u64, u64, u64), &'static str>,
    );
    let rows: Vec<Row> = vec![
        // 4 GB flash, 1 GB image: 16 + (4096-16-1124) + 1124.
        (4096 * m, None, 1024 * m, None, 0, Ok((16 * m, 2956 * m, 1124 * m, 0))),
        // A larger boot-agent partition is kept.
        (4096 * m, Some(64 * m), 1024 * m, None, 0, Ok((64 * m, 2908 * m, 1124 * m, 0))),
        // A smaller one grows to 16 MB.
        (4096 * m, Some(8 * m), 1024 * m, None, 0, Ok((16 * m, 2956 * m, 1124 * m, 0))),
        // Enlarged backup on small flash.
        (2048 * m, None, 512 * m, Some(1024 * m), 0, Ok((16 * m, 1008 * m, 1024 * m, 0))),
        // 16 GB flash: the OS is laid out within 4096 MB, the rest left free.
        (16384 * m, None, 1024 * m, None, 0, Ok((16 * m, 2956 * m, 1124 * m, 12288 * m))),
        // Refusals.
        (16384 * m, None, 1024 * m, Some(2048 * m), 0, Err("only on flash of 4096 MiB or less")),
        (2048 * m, None, 512 * m, Some(100 * m), 0, Err("cannot hold the image")),
        (1024 * m, None, 1024 * m, None, 0, Err("1024 MiB of flash cannot hold the boot agent (16 MiB), the backup partition (1124 MiB)")),
        (2048 * m, None, 512 * m, Some(1900 * m), 200 * m, Err("or a smaller --backup-size")),
        (2048 * m, None, 512 * m, None, 2000 * m, Err("an OS partition of at least 2000 MiB")),
        (16384 * m, None, 4000 * m, None, 0, Err("within 4096 MiB")),
    ];
    for (n, (flash, ba, image, backup, needs, want)) in rows.into_iter().enumerate() {
        match (layout(flash, ba, image, backup, needs), want) {
            (Ok(l), Ok((b, os, bk, free))) => {
                assert_eq!(
                    (l.boot_agent, l.os, l.backup, l.free),
                    (b, os, bk, free),
                    "row {n}"
                );
                assert_eq!(l.boot_agent + l.os + l.backup + l.free, flash, "row {n}");
            }
            (Err(e), Err(part)) => assert!(e.contains(part), "row {n}: {e}"),
            (got, want) => panic!("row {n}: got {got:?}, want {want:?}"),
        }
    }
}

#[test]
fn one_flash_size_per_conversion_job() {
    let d = |m: &str, s: Option<u64>| (m.to_string(), s);
    assert_eq!(
        same_flash(&[d("a", Some(4 << 30)), d("b", Some(4 << 30))]),
        Ok(4 << 30)
    );
    assert_eq!(
        same_flash(&[d("a", None), d("b", Some(4 << 30))]),
        Ok(4 << 30)
    );
    let e = same_flash(&[d("a", Some(4 << 30)), d("b", Some(8 << 30))]).unwrap_err();
    assert!(
        e.contains("b has 8192 MiB") && e.contains("one conversion job per flash size"),
        "{e}"
    );
    let e = same_flash(&[d("a", None)]).unwrap_err();
    assert!(
        e.contains("no device of the job has checked in yet (a)"),
        "{e}"
    );
    assert!(same_flash(&[]).is_err());
}

#[test]
fn conversions_validate_per_device() {
    let flash = 4096 * MIB;
    let plain = dev(flash, None);
    let converted = dev(flash, Some((1124 * MIB, None, 0, 0, false)));
    let auto = img("2", true, 1024 * MIB);
    let huge = img("2", true, 4000 * MIB);
    let ordinary = img("2", false, 1024 * MIB);
    let mut whole = auto.clone();
    whole.facts.whole_disk = true;
    let mut unsized_ = auto.clone();
    unsized_.size = None;
    let planned = |f: u64| JobOptions {
        flash_size: Some(f),
        ..Default::default()
    };
    // (what, image, options, device, error parts, warnings)
    type Row<'a> = (
        &'a str,
        &'a ImageRow,
        JobOptions,
        &'a CheckIn,
        Vec<&'a str>,
        usize,
    );
    let rows: Vec<Row> = vec![
        ("fits", &auto, planned(flash), &plain, vec![], 0),
        ("again: a warning", &auto, planned(flash), &converted, vec![], 1),
        ("ordinary image", &ordinary, planned(flash), &plain, vec!["is not autogenic"], 0),
        ("whole-disk image", &whole, planned(flash), &plain, vec!["use a partition image"], 0),
        (
            "another flash size",
            &auto,
            planned(2 * flash),
            &plain,
            vec!["device 52:54:00:00:00:01 has 4096 MiB of flash, the conversion job was planned for 8192 MiB"],
            0,
        ),
        ("image too big", &huge, planned(flash), &plain, vec!["device 52:54:00:00:00:01: 4096 MiB of flash cannot hold"], 0),
        ("size unknown", &unsized_, planned(flash), &plain, vec!["size of image os 2 is unknown"], 0),
        (
            "no such disk",
            &auto,
            JobOptions {
                disk: Some("/dev/sdz".into()),
                ..planned(flash)
            },
            &plain,
            vec!["reports no disk /dev/sdz"],
            0,
        ),
    ];
    for (what, image, o, d, want, warnings) in rows {
        let v = validate_convert(image, &o, d);
        assert_eq!(v.errors.len(), want.len(), "{what}: {v:?}");
        for (e, part) in v.errors.iter().zip(&want) {
            assert!(e.contains(part), "{what}: {e:?} lacks {part:?}");
        }
        assert_eq!(v.warnings.len(), warnings, "{what}: {v:?}");
    }
}

#[test]
fn requests_combine_only_meaningful_flags() {
    let ok: Vec<(&str, JobOptions)> = vec![
        ("deploy", opts(false, false, false)),
        ("deploy", opts(true, false, false)),
        ("deploy", opts(false, true, false)),
        ("deploy", opts(true, true, true)),
        (
            "convert",
            JobOptions {
                backup_size: Some(2 << 30),
                ..Default::default()
            },
        ),
    ];
    for (kind, o) in ok {
        assert_eq!(check_request(kind, &o), Ok(()), "{kind} {o:?}");
    }
    let bad: Vec<(&str, JobOptions, &str)> = vec![
        ("capture", opts(false, true, false), "go with a deploy"),
        ("convert", opts(true, false, false), "go with a deploy"),
        ("deploy", opts(false, false, true), "goes with from_backup"),
        (
            "deploy",
            JobOptions {
                after: After::NoReboot,
                ..opts(true, false, false)
            },
            "copy_only",
        ),
        (
            "deploy",
            JobOptions {
                after: After::CopyOnly,
                ..opts(false, true, false)
            },
            "cannot be copy-only",
        ),
        (
            "deploy",
            JobOptions {
                backup_size: Some(1),
                ..Default::default()
            },
            "goes with --convert",
        ),
        (
            "convert",
            JobOptions {
                backup_size: Some(0),
                ..Default::default()
            },
            "--backup-size 0",
        ),
    ];
    for (kind, o, part) in bad {
        let e = check_request(kind, &o).unwrap_err();
        assert!(e.contains(part), "{kind}: {e}");
    }
    assert_eq!(short_words(&opts(true, false, false)), Some("BI"));
    assert_eq!(short_words(&opts(false, true, false)), Some("PI"));
    assert_eq!(short_words(&opts(true, true, true)), Some("BI+PI"));
    assert_eq!(short_words(&opts(false, false, false)), None);
}

#[test]
fn maintenance_reported_and_cleared() {
    use DeviceState::*;
    let reported = format!("{REPORTED_MAINTENANCE}PI failed 4 times");
    // (stored, stored reason, reported, change)
    type Change = Option<(DeviceState, Option<String>)>;
    let rows: Vec<(DeviceState, Option<&str>, Option<&str>, Change)> = vec![
        (Operational, None, None, None),
        (
            Operational,
            None,
            Some("PI failed 4 times"),
            Some((Maintenance, Some(reported.clone()))),
        ),
        (
            UpgradeInProgress,
            Some("job 3"),
            Some("PI failed 4 times"),
            Some((Maintenance, Some(reported.clone()))),
        ),
        (
            Maintenance,
            Some(&reported),
            None,
            Some((Operational, None)),
        ),
        // Maintenance set by the reload wait or the administrator stays.
        (Maintenance, Some("task 9 failed"), None, None),
        (Maintenance, None, None, None),
        (
            Operational,
            None,
            Some("  \n"),
            Some((
                Maintenance,
                Some(format!("{REPORTED_MAINTENANCE}(no reason given)")),
            )),
        ),
    ];
    for (n, (stored, reason, rep, want)) in rows.into_iter().enumerate() {
        assert_eq!(maintenance_at_checkin(stored, reason, rep), want, "row {n}");
    }
    let long = "x\u{7}".repeat(1000);
    let (_, r) = maintenance_at_checkin(Operational, None, Some(&long)).unwrap();
    let r = r.unwrap();
    assert!(
        r.len() <= REPORTED_MAINTENANCE.len() + 300 && !r.contains('\u{7}'),
        "{r}"
    );
}

#[test]
fn rollback_reimages_from_flash_only_when_the_backup_holds_it() {
    let os1 = img("1", true, 10);
    let holds1 = dev(
        4096 * MIB,
        Some((1024 * MIB, Some(stamp("os", "1")), 10, 10, true)),
    );
    let half1 = dev(
        4096 * MIB,
        Some((1024 * MIB, Some(stamp("os", "1")), 5, 10, false)),
    );
    let holds2 = dev(
        4096 * MIB,
        Some((1024 * MIB, Some(stamp("os", "2")), 10, 10, true)),
    );
    let mut legacy = holds1.clone();
    legacy.autogenic.backup_image = None;
    assert!(rollback_from_backup(Some(&holds1), &os1));
    assert!(
        rollback_from_backup(Some(&legacy), &os1),
        "BackImageVer alone"
    );
    assert!(!rollback_from_backup(Some(&half1), &os1));
    assert!(!rollback_from_backup(Some(&holds2), &os1));
    assert!(!rollback_from_backup(None, &os1));
    assert!(!rollback_from_backup(Some(&holds1), &img("1", false, 10)));
}

#[test]
fn the_backup_as_the_administrator_sees_it() {
    let rows = [
        (dev(4096 * MIB, None), "-"),
        (
            dev(4096 * MIB, Some((1024 * MIB, None, 0, 0, false))),
            "empty",
        ),
        (
            dev(
                4096 * MIB,
                Some((
                    1024 * MIB,
                    Some(stamp("os", "2")),
                    300 * MIB,
                    300 * MIB,
                    true,
                )),
            ),
            "os 2 (complete)",
        ),
        (
            dev(
                4096 * MIB,
                Some((
                    1024 * MIB,
                    Some(stamp("os", "2")),
                    120 * MIB,
                    300 * MIB,
                    false,
                )),
            ),
            "os 2: 40% (BI 120 MiB of 300 MiB)",
        ),
    ];
    for (d, want) in rows {
        assert_eq!(BackupView::of(&d).text(), want);
    }
}
