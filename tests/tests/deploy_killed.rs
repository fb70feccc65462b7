//! Power cuts during a whole-disk restore, as SIGKILL at 20+ points spread across it. The
//! image (a GPT disk made by sgdisk, mkfs.fat and mtools) is served by a real nginx slowed
//! down with `limit_rate`, and the `img -restore` process is killed when the target has
//! grown by the next step. After every kill the target must show no partition table to
//! sfdisk, sgdisk or our own reader (unless the kill came before anything was written, when
//! it must be untouched), and a plain re-run must finish byte-identical to an uninterrupted
//! restore, without fetching again the chunks the killed run had already written.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use e2e::{img_bin, require_tool, run, sh, Nginx, Scratch};
use imgengine::disk::{read_layout, TableKind};

const MIB: u64 = 1 << 20;
const DISK_MIB: u64 = 48;
const KILL_POINTS: u64 = 24;

/// Bytes the file takes on disk: a fresh target is sparse and only written chunks count.
fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

/// The target's partition table as sfdisk, sgdisk and our reader see it: `None` when none
/// of them finds one, else who found what.
fn visible_table(path: &Path) -> Option<String> {
    let p = path.display();
    let sfdisk = Command::new("sfdisk")
        .args(["-d", &p.to_string()])
        .output()
        .unwrap();
    if sfdisk.status.success() {
        return Some(format!(
            "sfdisk: {}",
            String::from_utf8_lossy(&sfdisk.stdout)
        ));
    }
    // sgdisk says this when it found neither the primary GPT nor the backup.
    let sgdisk = sh(&format!("sgdisk -p {p} 2>&1 || true"));
    if !sgdisk.contains("Creating new GPT entries") {
        return Some(format!("sgdisk: {sgdisk}"));
    }
    let f = std::fs::File::open(path).unwrap();
    match read_layout(&f, DISK_MIB * MIB) {
        Ok(l) if l.table == TableKind::None => None,
        Ok(l) => Some(format!("read_layout: {:?}", l.table)),
        // A table our reader cannot make sense of is still something that looks like one.
        Err(e) => Some(format!("read_layout: {e}")),
    }
}

/// A GPT disk with two FAT partitions and ~28 MiB of incompressible files: more than
/// KILL_POINTS chunks of 1 MiB, so that every kill point falls on a different chunk.
fn make_source(path: &Path) {
    for t in ["sgdisk", "sfdisk", "mkfs.fat", "mcopy", "nginx"] {
        require_tool(t);
    }
    sh(&format!("truncate -s {DISK_MIB}M {}", path.display()));
    sh(&format!(
        "sgdisk -n 1:2048:+8M -t 1:0700 -c 1:BOOT -n 2:0:+36M -t 2:0700 -c 2:OS {} >/dev/null",
        path.display()
    ));
    let p2 = 2048 + 8 * 2048;
    sh(&format!(
        "mkfs.fat -n BOOT --offset=2048 {} 8192 >/dev/null 2>&1",
        path.display()
    ));
    sh(&format!(
        "mkfs.fat -n OS --offset={p2} {} 36864 >/dev/null 2>&1",
        path.display()
    ));
    let dir = path.with_extension("files");
    std::fs::create_dir_all(&dir).unwrap();
    for (name, seed, len) in [("A.BIN", 21, 16 * MIB), ("B.BIN", 22, 12 * MIB + 4321)] {
        let f = dir.join(name);
        std::fs::write(&f, e2e::random_bytes(seed, len as usize)).unwrap();
        sh(&format!(
            "mcopy -i {}@@{} {} ::/",
            path.display(),
            p2 * 512,
            f.display()
        ));
    }
}

/// The target before each attempt: a sparse disk with another GPT (one big partition), so
/// that "no table visible" after a kill means the old one was invalidated too.
fn make_old_target(path: &Path) {
    let _ = std::fs::remove_file(path);
    sh(&format!("truncate -s {DISK_MIB}M {}", path.display()));
    sh(&format!(
        "sgdisk -n 1:2048:+40M -t 1:8300 -c 1:OLD {} >/dev/null",
        path.display()
    ));
}

fn intact_count(out: &str) -> u64 {
    out.split(" already intact")
        .next()
        .and_then(|a| a.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no intact count in: {out}"))
}

#[test]
fn a_whole_disk_restore_killed_at_24_points_leaves_no_table_and_a_rerun_is_byte_identical() {
    let s = Scratch::new("killed");
    let src = s.join("src.img");
    make_source(&src);
    let www = s.join("www");
    std::fs::create_dir_all(&www).unwrap();
    run(Command::new(img_bin()).args([
        "-make",
        www.join("d.fimg").to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=1",
    ]));
    let image_len = std::fs::metadata(www.join("d.fimg")).unwrap().len();
    // 12 MiB/s: a 1 MiB chunk every ~80 ms, slow enough to stop the restore between any
    // two chunks, fast enough for 24 restores. Only the runs that are killed need it: the
    // reference and the re-runs fetch the same file from a second nginx at full speed (the
    // resume journal names the image by its manifest, not by its URL, as after a reboot
    // that finds the server at another address).
    let nginx = Nginx::serve_with(&www, "limit_rate 12m;");
    let fast = Nginx::serve(&www);
    let restore_from = |url: String, target: &Path, state: &Path| {
        let mut c = Command::new(img_bin());
        c.args([
            "-restore",
            &url,
            "-unsigned",
            &format!("-disk={}", target.display()),
            &format!("-state={}", state.display()),
        ]);
        c
    };
    let restore = |target: &Path, state: &Path| restore_from(nginx.url("d.fimg"), target, state);
    let rerun = |target: &Path, state: &Path| restore_from(fast.url("d.fimg"), target, state);

    // The reference: one uninterrupted restore onto the same old disk.
    let reference = s.join("reference.img");
    make_old_target(&reference);
    let base = allocated(&reference);
    run(&mut rerun(&reference, &s.join("state-ref")));
    let want = std::fs::read(&reference).unwrap();
    let written_total = allocated(&reference).saturating_sub(base);
    assert!(written_total > 26 * MIB, "{written_total}");

    let target = s.join("target.img");
    let mut killed = 0;
    let mut untouched = 0;
    let mut points = std::collections::BTreeSet::new();
    for k in 1..=KILL_POINTS {
        make_old_target(&target);
        let old = std::fs::read(&target).unwrap();
        let state = s.join(format!("state-{k}"));
        // Kill when the target has grown by k/(KILL_POINTS+1) of what a restore writes;
        // the first point kills as soon as the process runs.
        let at = if k == 1 {
            0
        } else {
            written_total * (k - 1) / KILL_POINTS
        };
        let sent_before = nginx.bytes_sent_when_idle();
        let mut child = restore(&target, &state)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let start = Instant::now();
        let mut finished = false;
        while allocated(&target).saturating_sub(base) < at {
            if child.try_wait().unwrap().is_some() {
                finished = true;
                break;
            }
            assert!(
                start.elapsed() < Duration::from_secs(120),
                "point {k}: the restore made no progress"
            );
            std::thread::sleep(Duration::from_millis(5));
        }
        if !finished {
            child.kill().unwrap(); // SIGKILL
        }
        child.wait().unwrap();
        let written_at_kill = allocated(&target).saturating_sub(base);
        if finished {
            eprintln!("point {k}: the restore finished before the kill");
        } else {
            killed += 1;
            points.insert(written_at_kill);
            let now = std::fs::read(&target).unwrap();
            if now == old {
                untouched += 1;
            } else if let Some(t) = visible_table(&target) {
                panic!("point {k} (killed after {written_at_kill} bytes written): a partition table is visible: {t}");
            }
        }

        // A plain re-run finishes the job, byte-identical, fetching only what is missing.
        let sent_killed = nginx.bytes_sent_when_idle() - sent_before;
        let fast_before = fast.bytes_sent_when_idle();
        let r = run(&mut rerun(&target, &state));
        let sent_rerun = fast.bytes_sent_when_idle() - fast_before;
        let out = format!(
            "{}{}",
            String::from_utf8_lossy(&r.stdout),
            String::from_utf8_lossy(&r.stderr)
        );
        let intact = intact_count(&out);
        eprintln!(
            "point {k}: killed after {written_at_kill} bytes written ({sent_killed} sent); re-run: {intact} chunks intact, fetched {sent_rerun} of {image_len}"
        );
        assert!(
            std::fs::read(&target).unwrap() == want,
            "point {k}: the re-run differs from an uninterrupted restore"
        );
        // What the killed run wrote (less the chunk it was writing, and the table and
        // metadata slack) is not fetched again.
        assert!(
            sent_rerun + written_at_kill <= image_len + 3 * MIB,
            "point {k}: the re-run fetched {sent_rerun} bytes of {image_len} though {written_at_kill} were already written\n{out}"
        );
        if written_at_kill > 3 * MIB {
            assert!(
                intact >= written_at_kill / MIB - 2,
                "point {k}: {intact} chunks intact after {written_at_kill} bytes written\n{out}"
            );
        }
        assert!(
            visible_table(&target).is_some(),
            "point {k}: no table after the re-run"
        );
    }
    eprintln!(
        "{killed} kills at {} different points, {untouched} before anything was written",
        points.len()
    );
    assert!(
        points.len() >= 20,
        "the kills fell on only {} different amounts written",
        points.len()
    );
    assert!(
        killed >= 20,
        "only {killed} of {KILL_POINTS} points were reached before the restore finished"
    );
}

/// What a kill cannot show, a power cut's lost write cache: the order of the system calls.
/// Before the first byte of data reaches the target, the resume journal must be fsynced
/// (file, then its directory after the rename) and the invalidated table regions flushed
/// (fdatasync: a cache flush on a block device). Traced with strace.
#[test]
fn the_journal_and_the_invalidated_tables_are_flushed_before_the_first_data_write() {
    require_tool("strace");
    let s = Scratch::new("killed-order");
    let src = s.join("src.img");
    make_source(&src);
    let image = s.join("d.fimg");
    run(Command::new(img_bin()).args([
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=1",
    ]));
    let target = s.join("target.img");
    make_old_target(&target);
    let log = s.join("strace.log");
    run(Command::new("strace").args([
        "-f",
        "-qq",
        "-e",
        "trace=pwrite64,fallocate,fdatasync,fsync,rename,renameat,renameat2",
        "-o",
        log.to_str().unwrap(),
        img_bin().to_str().unwrap(),
        "-restore",
        image.to_str().unwrap(),
        "-unsigned",
        &format!("-disk={}", target.display()),
        &format!("-state={}", s.join("state").display()),
    ]));
    assert!(
        visible_table(&target).is_some(),
        "the traced restore did not finish"
    );
    let log = std::fs::read_to_string(&log).unwrap();
    // The GPT regions of a 48 MiB disk: protective MBR, header and entries at the start,
    // entries and header at the end (the old table and the image's are both there).
    let disk = DISK_MIB * MIB;
    let in_tables = |off: u64, len: u64| off + len <= 34 * 512 || off >= disk - 33 * 512;
    let mut journal_renamed = false;
    let mut fsyncs_after_rename = 0;
    let mut fsyncs_before_rename = 0;
    let mut table_writes = 0;
    for line in log.lines() {
        // "PID call(args) = result"; the arguments we need are numbers.
        let Some(call) = line.split_whitespace().nth(1) else {
            continue;
        };
        let name = call.split('(').next().unwrap_or("");
        let args: Vec<&str> = line
            .split_once('(')
            .map(|(_, a)| a.rsplit_once(')').map_or(a, |(a, _)| a))
            .unwrap_or("")
            .split(", ")
            .collect();
        let num = |s: &str| s.trim().parse::<u64>().ok();
        match name {
            "fsync" if journal_renamed => fsyncs_after_rename += 1,
            "fsync" => fsyncs_before_rename += 1,
            "rename" | "renameat" | "renameat2" if line.contains("deploy-") => {
                journal_renamed = true
            }
            "fdatasync" => {
                assert!(
                    journal_renamed && fsyncs_before_rename >= 1 && fsyncs_after_rename >= 1,
                    "the target was flushed before the journal was durable (file fsync, rename, directory fsync):\n{log}"
                );
                assert!(
                    table_writes > 0,
                    "no table invalidation before the first flush:\n{log}"
                );
                eprintln!(
                    "journal fsynced, renamed, directory fsynced; {table_writes} table writes, then fdatasync, before any data"
                );
                return;
            }
            "pwrite64" | "fallocate" => {
                // pwrite64(fd, buf, len, off) / fallocate(fd, mode, off, len)
                let (off, len) = if name == "pwrite64" {
                    (
                        args.last().and_then(|a| num(a)),
                        args.get(args.len().wrapping_sub(2)).and_then(|a| num(a)),
                    )
                } else {
                    (
                        args.get(2).and_then(|a| num(a)),
                        args.get(3).and_then(|a| num(a)),
                    )
                };
                let (Some(off), Some(len)) = (off, len) else {
                    panic!("cannot read the offset of: {line}");
                };
                assert!(
                    in_tables(off, len),
                    "data written at offset {off} before the invalidated tables were flushed:\n{line}\n{log}"
                );
                assert!(
                    journal_renamed && fsyncs_after_rename >= 1,
                    "the target was written before the journal was durable:\n{line}"
                );
                table_writes += 1;
            }
            _ => {}
        }
    }
    panic!("no fdatasync of the target at all:\n{log}");
}
