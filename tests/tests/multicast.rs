//! `img -session`: one master and several clients on a bridge in network namespaces
//! (tests/src/mcastlab.rs), with real file systems made by mkfs.fat and mkntfs, checked
//! afterwards by fsck.fat and ntfsfix and compared byte for byte with the master's disk.
//!
//! What an operator imaging a room relies on:
//! - every client ends with the master's bytes (2 and 8 clients; with 2 % loss on every port;
//!   with no unicast possible between the devices);
//! - a client killed mid-session (a power cut) and started again ends correct;
//! - two sessions at once with different names, even forced onto one group address, never mix;
//! - a device that comes late is refused and queued for the next session, and with
//!   `-latejoin` joins the running one and finishes;
//! - a device that reboots mid-session into another partition or another session writes only
//!   what it was asked for, never the first session's or the first partition's data.
//!
//! Sessions are slowed with `-throttle` where a test must catch one half-way; no test asserts
//! a time. Each test has a lab of its own (its own namespaces, bridge and scratch folder), so
//! tests run side by side as the test harness schedules them (`--test-threads`); `img` is
//! `$IMG_BIN` when set (scripts/test.sh passes the release musl build: a session of the debug
//! build costs about six times the CPU), else the debug build.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use e2e::mcastlab::room::{
    allocated, assert_same_disk, assert_summary_names, client_args, expect_ok, fsck_part, img,
    master_args, read_range, room_disk, spawn, wait_until, Disk, Fs, Part, MIB, SESSION_TIMEOUT,
};
use e2e::mcastlab::{McastLab, Pid};
use e2e::{require_tool, run};

/// One master sending its own disk to `n` clients, `loss` % loss on every port.
fn room(n: usize, loss: u32) {
    let mut lab = McastLab::new(1, n);
    if loss > 0 {
        lab.set_loss_everywhere(loss);
    }
    run_room(&mut lab, n, "room101", 1);
    if loss > 0 {
        let dropped: u64 = lab.dropped_packets().iter().map(|(_, n)| n).sum();
        assert!(
            dropped > 0,
            "the loss rules dropped nothing: the test did not test loss"
        );
        eprintln!("packets dropped by the {loss}% loss rules: {dropped}");
    }
}

/// In `lab` (one master m0, clients c0..c{n-1}): the master sends its own disk (made from
/// `seed`) in session `name`; every client and the master end well, the master's summary
/// names every client, and every client's disk is the master's byte for byte.
fn run_room(lab: &mut McastLab, n: usize, name: &str, seed: u64) {
    let master = room_disk(lab.dir(), seed);
    let targets: Vec<PathBuf> = (0..n)
        .map(|i| master.blank_like(&lab.dir().join(format!("client{i}.img"))))
        .collect();
    let m = spawn(
        lab,
        "m0",
        &master_args(
            name,
            &[
                &format!("-clients={n}"),
                &format!("-disk={}", master.path.display()),
            ],
        ),
    );
    let clients: Vec<Pid> = (0..n)
        .map(|i| {
            let args = client_args(name, &targets[i], &[]);
            spawn(lab, &format!("c{i}"), &args)
        })
        .collect();
    for (i, c) in clients.iter().enumerate() {
        let f = lab.wait(*c, SESSION_TIMEOUT);
        expect_ok(&f, &format!("client c{i}"));
        eprintln!("client c{i}: {:?} wall, {:?} cpu", f.wall, f.cpu);
    }
    let fm = lab.wait(m, SESSION_TIMEOUT);
    expect_ok(&fm, "the master");
    let names: Vec<String> = (0..n).map(|i| format!("c{i}")).collect();
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    assert_summary_names(lab, &fm, &names);
    for (i, t) in targets.iter().enumerate() {
        assert_same_disk(&master, t, &format!("client c{i}"));
    }
}

#[test]
fn two_clients_get_the_masters_disk_byte_for_byte() {
    room(2, 0);
}

#[test]
fn eight_clients_get_the_masters_disk_byte_for_byte() {
    room(8, 0);
}

#[test]
fn four_clients_with_two_percent_loss_on_every_port_all_finish_correct() {
    room(4, 2);
}

#[test]
fn eight_clients_with_two_percent_loss_on_every_port_all_finish_correct() {
    room(8, 2);
}

/// Control goes by multicast both ways (registrations and statuses to the group's control
/// port, replies and acknowledgements to the group): with ARP off on every device, so that
/// none can reach another by unicast, a room still finishes. (With a unicast control path
/// this room never got past registration; on a lossy link each lost ARP exchange used to
/// hold a device back by the kernel's 1 s retry.)
#[test]
fn a_room_whose_devices_cannot_reach_each_other_by_unicast_still_finishes() {
    require_tool("curl");
    let mut lab = McastLab::new(1, 2);
    let unicast = lab.arp_off();
    eprintln!("curl from c0 to the master with ARP off: {unicast}");
    // A refused connection (exit 7) would mean the frame reached the master: unicast works.
    assert!(
        unicast.starts_with("exit Some(28)"),
        "with ARP off, c0 should not reach the master by unicast at all; curl said {unicast}"
    );
    run_room(&mut lab, 2, "noarp", 17);
}

#[test]
fn a_client_killed_mid_session_and_started_again_ends_correct() {
    let mut lab = McastLab::new(1, 2);
    let master = room_disk(lab.dir(), 11);
    let t0 = master.blank_like(&lab.dir().join("client0.img"));
    let t1 = master.blank_like(&lab.dir().join("client1.img"));
    let m = spawn(
        &mut lab,
        "m0",
        &master_args(
            "killroom",
            &[
                "-clients=2",
                "-throttle=1",
                &format!("-disk={}", master.path.display()),
            ],
        ),
    );
    let c0 = spawn(&mut lab, "c0", &client_args("killroom", &t0, &[]));
    let c1 = spawn(&mut lab, "c1", &client_args("killroom", &t1, &[]));
    // Mid-session: the client has written some data and has not finished.
    wait_until(SESSION_TIMEOUT, "client c0 has written data", || {
        allocated(&t0) > 2 * MIB
    });
    assert!(
        lab.running(c0),
        "c0 finished before it could be killed: throttle more"
    );
    lab.kill(c0);
    let written = allocated(&t0);
    eprintln!("c0 killed after writing {written} bytes");
    let c0b = spawn(&mut lab, "c0", &client_args("killroom", &t0, &[]));
    let f = lab.wait(c0b, SESSION_TIMEOUT);
    expect_ok(&f, "client c0 after its restart");
    expect_ok(&lab.wait(c1, SESSION_TIMEOUT), "client c1");
    let fm = lab.wait(m, SESSION_TIMEOUT);
    assert_summary_names(&lab, &fm, &["c0", "c1"]);
    assert_same_disk(&master, &t0, "client c0 (killed and restarted)");
    assert_same_disk(&master, &t1, "client c1");
}

/// Two rooms at once on one bridge: room A's master sends an image file, room B's master its
/// own disk; with `same_group` both are forced onto one multicast group and port, so only
/// the session's name hash in every packet keeps them apart.
fn two_sessions(same_group: bool) {
    let mut lab = McastLab::new(2, 4);
    let disk_a = room_disk(lab.dir(), 21);
    let disk_b = room_disk(lab.dir(), 31);
    let image_a = lab.dir().join("room-a.fimg");
    run(Command::new(img()).args([
        "-make".as_ref(),
        image_a.as_os_str(),
        format!("-disk={}", disk_a.path.display()).as_ref(),
    ]));
    let targets: Vec<PathBuf> = (0..4)
        .map(|i| disk_a.blank_like(&lab.dir().join(format!("client{i}.img"))))
        .collect();
    let addr: Vec<&str> = if same_group {
        vec!["-addr=231.77.7.7"]
    } else {
        vec![]
    };
    let mut ma = vec![
        "-clients=2".to_string(),
        format!("-image={}", image_a.display()),
    ];
    let mut mb = vec![
        "-clients=2".to_string(),
        format!("-disk={}", disk_b.path.display()),
    ];
    ma.extend(addr.iter().map(|s| s.to_string()));
    mb.extend(addr.iter().map(|s| s.to_string()));
    let ma: Vec<&str> = ma.iter().map(String::as_str).collect();
    let mb: Vec<&str> = mb.iter().map(String::as_str).collect();
    let m0 = spawn(&mut lab, "m0", &master_args("room-a", &ma));
    let m1 = spawn(&mut lab, "m1", &master_args("room-b", &mb));
    let mut clients = Vec::new();
    for (i, target) in targets.iter().enumerate() {
        let name = if i % 2 == 0 { "room-a" } else { "room-b" };
        let args = client_args(name, target, &addr);
        clients.push(spawn(&mut lab, &format!("c{i}"), &args));
    }
    for (i, c) in clients.iter().enumerate() {
        let f = lab.wait(*c, SESSION_TIMEOUT);
        expect_ok(&f, &format!("client c{i}"));
    }
    let fa = lab.wait(m0, SESSION_TIMEOUT);
    let fb = lab.wait(m1, SESSION_TIMEOUT);
    expect_ok(&fa, "room A's master");
    expect_ok(&fb, "room B's master");
    assert_summary_names(&lab, &fa, &["c0", "c2"]);
    assert_summary_names(&lab, &fb, &["c1", "c3"]);
    for (i, t) in targets.iter().enumerate() {
        let (disk, room) = if i % 2 == 0 {
            (&disk_a, "A")
        } else {
            (&disk_b, "B")
        };
        assert_same_disk(disk, t, &format!("client c{i} of room {room}"));
    }
}

#[test]
fn two_concurrent_sessions_with_different_names_do_not_interfere() {
    two_sessions(false);
}

#[test]
fn two_sessions_forced_onto_one_group_address_still_never_mix() {
    two_sessions(true);
}

#[test]
fn a_late_device_is_queued_for_the_next_session() {
    let mut lab = McastLab::new(1, 2);
    let master = room_disk(lab.dir(), 41);
    let t0 = master.blank_like(&lab.dir().join("client0.img"));
    let t1 = master.blank_like(&lab.dir().join("client1.img"));
    let disk = format!("-disk={}", master.path.display());
    let m = spawn(
        &mut lab,
        "m0",
        &master_args("lateroom", &["-clients=1", "-throttle=1", &disk]),
    );
    let c0 = spawn(&mut lab, "c0", &client_args("lateroom", &t0, &[]));
    wait_until(
        SESSION_TIMEOUT,
        "the session has started (c0 writes)",
        || allocated(&t0) > MIB,
    );
    let c1 = spawn(&mut lab, "c1", &client_args("lateroom", &t1, &[]));
    expect_ok(&lab.wait(c0, SESSION_TIMEOUT), "client c0");
    let fm = lab.wait(m, SESSION_TIMEOUT);
    expect_ok(&fm, "the master");
    // The late device was refused: it wrote nothing, and it is still waiting (queued).
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        lab.running(c1),
        "the late client c1 did not stay queued for the next session:\n{}",
        lab.output(c1)
    );
    assert_eq!(
        allocated(&t1),
        0,
        "the late client c1 wrote to its disk during a session it was refused from:\n{}",
        lab.output(c1)
    );
    assert!(
        !lab.output(c1).trim().is_empty(),
        "the late client c1 says nothing about being refused and queued"
    );
    // The next session with the same name picks it up.
    let m2 = spawn(
        &mut lab,
        "m0",
        &master_args("lateroom", &["-clients=1", &disk]),
    );
    expect_ok(
        &lab.wait(c1, SESSION_TIMEOUT),
        "queued client c1 in the next session",
    );
    expect_ok(
        &lab.wait(m2, SESSION_TIMEOUT),
        "the second session's master",
    );
    assert_same_disk(&master, &t0, "client c0");
    assert_same_disk(&master, &t1, "client c1 (queued, then served)");
}

#[test]
fn with_latejoin_a_late_device_joins_the_running_session_and_finishes() {
    let mut lab = McastLab::new(1, 2);
    let master = room_disk(lab.dir(), 51);
    let t0 = master.blank_like(&lab.dir().join("client0.img"));
    let t1 = master.blank_like(&lab.dir().join("client1.img"));
    let disk = format!("-disk={}", master.path.display());
    let m = spawn(
        &mut lab,
        "m0",
        &master_args(
            "lateroom",
            // A long enough session for the late device to start and join under load (at
            // -throttle=1 the session was over in 9 s and a late device that came after
            // the end rightly waited for the next session).
            &["-clients=1", "-latejoin", "-throttle=4", &disk],
        ),
    );
    let c0 = spawn(&mut lab, "c0", &client_args("lateroom", &t0, &[]));
    // The late device comes as soon as the session runs (the master says it starts and c0
    // writes), so that it misses as little as possible and the session has the most time
    // left for it to join.
    wait_until(
        SESSION_TIMEOUT,
        "the session has started (the master says so, c0 writes)",
        || lab.output(m).contains("starting with") && allocated(&t0) > 0,
    );
    assert!(
        lab.running(c0),
        "c0 finished before the late device came: throttle more"
    );
    let c1 = spawn(&mut lab, "c1", &client_args("lateroom", &t1, &[]));
    expect_ok(&lab.wait(c0, SESSION_TIMEOUT), "client c0");
    expect_ok(&lab.wait(c1, SESSION_TIMEOUT), "late client c1");
    let fm = lab.wait(m, SESSION_TIMEOUT);
    expect_ok(&fm, "the master");
    assert_summary_names(&lab, &fm, &["c0", "c1"]);
    assert_same_disk(&master, &t0, "client c0");
    assert_same_disk(&master, &t1, "late client c1");
}

/// Two FAT32 partitions of one size, so that either can take the other's image.
fn twin_disk(path: &Path, seed: u64) -> Disk {
    Disk::build(
        path,
        &[
            Part {
                label: "BOOT",
                fs: Fs::Fat32,
                mib: 40,
                seed,
            },
            Part {
                label: "OS",
                fs: Fs::Fat32,
                mib: 40,
                seed: seed + 1,
            },
        ],
    )
}

/// A partition restored over old content: a used-blocks image writes the blocks the source
/// uses, and free space keeps the device's old bytes. So every byte that differs from the
/// source must be the device's own old byte (never a third party's, e.g. another session's),
/// the file system must be clean, and its files (listing and content, read with mtools)
/// must be exactly the source's.
fn assert_restored_over(disk: &Path, part: (u64, u64, Fs), want: &[u8], old: &[u8], what: &str) {
    let got = read_range(disk, part.0, part.1);
    // Block by block (memcmp) first, byte by byte only in a block that is neither wholly the
    // source's nor wholly the old bytes: the same set of bytes, without a per-byte loop over
    // the whole partition in a debug build.
    const BLOCK: usize = 4096;
    let foreign: Vec<usize> = (0..got.len())
        .step_by(BLOCK)
        .filter(|&at| {
            let end = (at + BLOCK).min(got.len());
            got[at..end] != want[at..end] && got[at..end] != old[at..end]
        })
        .flat_map(|at| at..(at + BLOCK).min(got.len()))
        .filter(|&i| got[i] != want[i] && got[i] != old[i])
        .collect();
    assert!(
        foreign.is_empty(),
        "{what}: {} bytes from byte {} on are neither the source's nor the device's old bytes \
         (data from elsewhere was written there)",
        foreign.len(),
        foreign[0]
    );
    fsck_part(disk, part);
    let src = disk.with_extension("want-part");
    std::fs::write(&src, want).unwrap();
    let list = |img: String| {
        let out = run(Command::new("mdir").args(["-i", &img, "-/", "-b", "::/"]));
        let mut v: Vec<String> = String::from_utf8_lossy(&out.stdout)
            .lines()
            .map(str::to_string)
            .collect();
        v.sort();
        v
    };
    let here = format!("{}@@{}", disk.display(), part.0);
    let there = src.display().to_string();
    let files = list(there.clone());
    assert_eq!(
        list(here.clone()),
        files,
        "{what}: the files differ from the source's"
    );
    for f in files.iter().filter(|f| !f.ends_with('/')) {
        let read = |img: &str| run(Command::new("mtype").args(["-i", img, f])).stdout;
        assert!(
            read(&here) == read(&there),
            "{what}: {f} differs from the source's"
        );
    }
    let _ = std::fs::remove_file(&src);
}

/// FAT32 partition bytes as `-restore` leaves them at partition start `lba`: the boot
/// sector's hidden-sectors field (0x1C) and that of its backup (`BPB_BkBootSec`, when it was
/// an identical copy) hold the new start.
fn with_hidden_sectors(mut part: Vec<u8>, lba: u64) -> Vec<u8> {
    let head = part[..512].to_vec();
    let backup = u16::from_le_bytes([head[50], head[51]]) as usize * 512;
    let lba = u32::try_from(lba).unwrap().to_le_bytes();
    for off in [backup, 0] {
        if off + 512 <= part.len() && part[off..off + 512] == head[..] {
            part[off + 0x1C..off + 0x20].copy_from_slice(&lba);
        }
    }
    part
}

#[test]
fn a_device_rebooted_into_another_partition_writes_only_that_partition() {
    let mut lab = McastLab::new(1, 1);
    let master = twin_disk(&lab.dir().join("master.img"), 61);
    let device = twin_disk(&lab.dir().join("device.img"), 71);
    let p1_before = device.part_bytes(0);
    let p2_before = device.part_bytes(1);
    let m = spawn(
        &mut lab,
        "m0",
        &master_args(
            "partroom",
            &[
                "-clients=1",
                "-latejoin",
                "-throttle=1",
                &format!("-disk={}", master.path.display()),
                "-part=2",
            ],
        ),
    );
    let c = spawn(
        &mut lab,
        "c0",
        &client_args("partroom", &device.path, &["-part=2"]),
    );
    wait_until(SESSION_TIMEOUT, "the device writes partition 2", || {
        device.part_bytes(1) != p2_before
    });
    assert!(
        lab.running(c),
        "the device finished before its reboot: throttle more"
    );
    lab.kill(c);
    assert_eq!(
        device.part_bytes(0),
        p1_before,
        "partition 1 changed while the session was writing partition 2"
    );
    let p2_at_reboot = device.part_bytes(1);
    // The device comes back and is now told to write partition 1.
    let c = spawn(
        &mut lab,
        "c0",
        &client_args("partroom", &device.path, &["-part=1"]),
    );
    expect_ok(
        &lab.wait(c, SESSION_TIMEOUT),
        "the rebooted device (-part=1)",
    );
    assert!(
        device.part_bytes(1) == p2_at_reboot,
        "the rebooted device wrote partition 2 although it was told -part=1 \
         (its journal from before the reboot was applied to the wrong partition)"
    );
    // A partition's content written at another start gets its boot sector's hidden-sectors
    // field (and the FAT32 backup's) set to the new start, as every -restore does.
    let expected = with_hidden_sectors(master.part_bytes(1), device.parts[0].0 / 512);
    assert_restored_over(
        &device.path,
        device.parts[0],
        &expected,
        &p1_before,
        "partition 1 after the reboot (the master's partition 2 over the old content)",
    );
    lab.kill(m);
}

#[test]
fn a_device_rebooted_into_another_session_never_writes_the_first_sessions_data() {
    let mut lab = McastLab::new(2, 1);
    let disk_a = twin_disk(&lab.dir().join("room-a.img"), 81);
    let disk_b = twin_disk(&lab.dir().join("room-b.img"), 91);
    let device = twin_disk(&lab.dir().join("device.img"), 101);
    let p1_before = device.part_bytes(0);
    let p2_before = device.part_bytes(1);
    // Both rooms on one group: after the reboot, room A's packets keep arriving at the device.
    let addr = "-addr=231.77.8.8";
    let ma = spawn(
        &mut lab,
        "m0",
        &master_args(
            "room-a",
            &[
                "-clients=1",
                "-latejoin",
                "-throttle=1",
                addr,
                &format!("-disk={}", disk_a.path.display()),
                "-part=2",
            ],
        ),
    );
    let c = spawn(
        &mut lab,
        "c0",
        &client_args("room-a", &device.path, &["-part=2", addr]),
    );
    wait_until(SESSION_TIMEOUT, "the device writes room A's data", || {
        device.part_bytes(1) != p2_before
    });
    assert!(
        lab.running(c),
        "the device finished room A before its reboot: throttle more"
    );
    lab.kill(c);
    // Room A's bytes written before the reboot may stay where room B's image has free space;
    // what must never happen is room A's data written (or taken as written) after it.
    let p2_at_reboot = device.part_bytes(1);
    let mb = spawn(
        &mut lab,
        "m1",
        &master_args(
            "room-b",
            &[
                "-clients=1",
                "-throttle=1",
                addr,
                &format!("-disk={}", disk_b.path.display()),
                "-part=2",
            ],
        ),
    );
    let c = spawn(
        &mut lab,
        "c0",
        &client_args("room-b", &device.path, &["-part=2", addr]),
    );
    expect_ok(
        &lab.wait(c, SESSION_TIMEOUT),
        "the device rebooted into room B",
    );
    assert_restored_over(
        &device.path,
        device.parts[1],
        &disk_b.part_bytes(1),
        &p2_at_reboot,
        "partition 2 after the reboot into room B",
    );
    assert_eq!(
        device.part_bytes(0),
        p1_before,
        "partition 1 was written, but no session was for it"
    );
    expect_ok(&lab.wait(mb, SESSION_TIMEOUT), "room B's master");
    lab.kill(ma);
}

/// The lab itself, independent of `img`: multicast reaches every client through the bridge,
/// the loss rules drop about the share asked for on the port they are set on, the slow port
/// is slow, and every namespace is gone after the lab is dropped, also when a test panics.
#[test]
fn the_lab_floods_multicast_drops_what_it_is_told_and_cleans_up() {
    require_tool("python3");
    let names: Vec<String>;
    {
        let mut lab = McastLab::new(1, 2);
        names = lab
            .nodes()
            .iter()
            .map(|n| n.ns.clone())
            .chain([format!("{}hub", lab.node("m0").ns.trim_end_matches("m0"))])
            .collect();
        lab.set_loss("c1", 20);
        let recv = "import socket,struct,sys\n\
            s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
            s.setsockopt(socket.SOL_SOCKET,socket.SO_REUSEADDR,1)\n\
            s.setsockopt(socket.SOL_SOCKET,33,8<<20)  # SO_RCVBUFFORCE: no drops in the socket\n\
            s.bind(('',4999))\n\
            s.setsockopt(socket.IPPROTO_IP,socket.IP_ADD_MEMBERSHIP,struct.pack('4s4s',socket.inet_aton('231.9.9.9'),socket.inet_aton('0.0.0.0')))\n\
            s.settimeout(5)\n\
            n=0\n\
            try:\n\
            \x20while True:\n\
            \x20\x20d=s.recv(2000)\n\
            \x20\x20if d==b'end': break\n\
            \x20\x20n+=1\n\
            except socket.timeout: pass\n\
            print(n)\n";
        let py = Path::new("/usr/bin/python3");
        let r0 = lab.spawn("c0", py, &["-c", recv]);
        let r1 = lab.spawn("c1", py, &["-c", recv]);
        std::thread::sleep(Duration::from_secs(1));
        let tx_before = lab.tx_bytes("m0");
        let send = "import socket,time\n\
            s=socket.socket(socket.AF_INET,socket.SOCK_DGRAM)\n\
            s.setsockopt(socket.IPPROTO_IP,socket.IP_MULTICAST_TTL,1)\n\
            for i in range(3000):\n\
            \x20s.sendto(b'x'*1000,('231.9.9.9',4999))\n\
            \x20if i%100==0: time.sleep(0.01)\n\
            time.sleep(0.5)\n\
            for i in range(50): s.sendto(b'end',('231.9.9.9',4999)); time.sleep(0.01)\n";
        let tx = lab.spawn("m0", py, &["-c", send]);
        assert!(lab.wait(tx, Duration::from_secs(60)).ok());
        let n0: u32 = lab
            .wait(r0, Duration::from_secs(60))
            .output
            .trim()
            .parse()
            .unwrap();
        let n1: u32 = lab
            .wait(r1, Duration::from_secs(60))
            .output
            .trim()
            .parse()
            .unwrap();
        eprintln!("received without loss {n0}/3000, with 20% loss {n1}/3000");
        assert_eq!(n0, 3000, "a port without loss lost packets");
        assert!(
            (2100..=2700).contains(&n1),
            "20% loss let {n1} of 3000 through"
        );
        let dropped = lab.dropped_packets();
        assert!(
            dropped.iter().any(|(p, n)| p == "pc1" && *n > 300),
            "{dropped:?}"
        );
        let sent = lab.tx_bytes("m0") - tx_before;
        assert!(
            sent >= 3000 * 1000,
            "the master's tx counter saw only {sent} bytes"
        );

        // The slow port: 8 Mbit/s lets about 1 MB through in a second, not 3 MB.
        lab.set_loss("c1", 0);
        lab.set_slow("c1", 8000);
        let r1 = lab.spawn("c1", py, &["-c", recv]);
        std::thread::sleep(Duration::from_secs(1));
        let tx = lab.spawn("m0", py, &["-c", send]);
        assert!(lab.wait(tx, Duration::from_secs(60)).ok());
        let slow: u32 = lab
            .wait(r1, Duration::from_secs(60))
            .output
            .trim()
            .parse()
            .unwrap();
        eprintln!("through the 8 Mbit/s port: {slow}/3000");
        assert!(
            slow < 2500,
            "the tbf port let {slow} of 3000 through at full speed"
        );
    }
    for ns in &names {
        assert!(
            !Path::new("/run/netns").join(ns).exists(),
            "namespace {ns} left behind"
        );
    }
    // Torn down when a test fails half-way, too.
    let left = std::panic::catch_unwind(|| {
        let lab = McastLab::new(1, 1);
        let ns = lab.node("c0").ns.clone();
        std::panic::panic_any(ns);
    })
    .unwrap_err();
    let ns = left.downcast_ref::<String>().unwrap();
    assert!(
        !Path::new("/run/netns").join(ns).exists(),
        "{ns} left behind after a panic"
    );
}
