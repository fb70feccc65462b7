//! `img -session` on a link slower than the master's automatic rate: a master whose own
//! interface is limited (a `tbf` qdisc on its `eth0`, as a 20 Mbit/s port would be) must let
//! the link set the pace, not lose the overflow in its own queue and repair it by NACK
//! rounds. No loss is injected, so every repair packet the master sends is a packet it lost
//! itself; the test asserts they stay a small share and that both clients end byte-identical.
//! `img` is `$IMG_BIN` when set, else the debug build.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use e2e::mcastlab::McastLab;
use e2e::{img_bin, require_tool, run, sh};

const SESSION_TIMEOUT: Duration = Duration::from_secs(600);

/// The number written just before `label` in the master's summary ("12194 packets, ...").
fn figure(summary: &str, label: &str) -> u64 {
    let at = summary
        .find(label)
        .unwrap_or_else(|| panic!("no '{label}' in the master's summary:\n{summary}"));
    summary[..at]
        .trim_end()
        .rsplit(|c: char| !c.is_ascii_digit())
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no number before '{label}' in:\n{summary}"))
}

#[test]
fn a_master_faster_than_its_link_loses_nothing_in_its_own_queue() {
    for t in ["mkfs.fat", "mcopy", "tc"] {
        require_tool(t);
    }
    let img: PathBuf = img_bin();
    let mut lab = McastLab::new(1, 2);
    let dir = lab.dir().join("disks");
    std::fs::create_dir_all(&dir).unwrap();
    // A 64 MiB FAT32 disk (FAT32 needs over 32 MiB) holding 10 MiB of random bytes (they do not compress: about
    // 10 MB on the wire, 4 s at 20 Mbit/s, where the master's ceiling is 110 MB/s).
    let disk = dir.join("master.img");
    sh(&format!(
        "mkfs.fat -F 32 -n LINK -C {} 65536 >/dev/null",
        disk.display()
    ));
    sh(&format!(
        "head -c 10M /dev/urandom > {d}/blob.bin && mcopy -i {m} {d}/blob.bin ::/ && rm {d}/blob.bin",
        d = dir.display(),
        m = disk.display()
    ));
    let m0 = lab.node("m0").ns.clone();
    run(Command::new("ip").args([
        "netns", "exec", &m0, "tc", "qdisc", "replace", "dev", "eth0", "root", "tbf", "rate",
        "20mbit", "burst", "15140", "limit", "1514000",
    ]));
    let targets: Vec<PathBuf> = (0..2)
        .map(|i| {
            let t = dir.join(format!("client{i}.img"));
            sh(&format!("truncate -s 64M {}", t.display()));
            t
        })
        .collect();
    let disk_arg = format!("-disk={}", disk.display());
    let m = lab.spawn(
        "m0",
        &img,
        &["-session", "link20", "-master", "-clients=2", &disk_arg],
    );
    let clients: Vec<_> = targets
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let a = format!("-disk={}", t.display());
            lab.spawn(
                &format!("c{i}"),
                &img,
                &["-session", "link20", "-client", &a],
            )
        })
        .collect();
    for (i, c) in clients.into_iter().enumerate() {
        let f = lab.wait(c, SESSION_TIMEOUT);
        assert!(
            f.ok(),
            "client c{i} exited with {:?}:\n{}",
            f.code,
            e2e::tail(&f.output, 40)
        );
    }
    let fm = lab.wait(m, SESSION_TIMEOUT);
    assert!(
        fm.ok(),
        "the master exited with {:?}:\n{}",
        fm.code,
        e2e::tail(&fm.output, 40)
    );
    let source = std::fs::read(&disk).unwrap();
    for (i, t) in targets.iter().enumerate() {
        assert!(
            std::fs::read(t).unwrap() == source,
            "client c{i}'s disk differs from the master's"
        );
    }
    let line = fm
        .output
        .lines()
        .find(|l| l.contains(" repair packets"))
        .unwrap_or_else(|| panic!("no summary from the master:\n{}", fm.output))
        .to_string();
    let packets = figure(&line, " packets, ");
    let repairs = figure(&line, " repair packets");
    eprintln!("master at 20 Mbit/s: {packets} packets, {repairs} repair packets");
    assert!(
        packets > 7000,
        "too few packets for 10 MB of random data: {line}"
    );
    // Without back-pressure from its own queue the master, at up to 110 MB/s, would lose
    // most packets before the wire and send about as many repairs as packets.
    assert!(
        repairs * 50 < packets,
        "the master repaired more than 2 % of its packets with no loss on the wire: it lost them in its own queue\n{line}"
    );
}
