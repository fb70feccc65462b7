//! The `img` command end to end, as an operator or a script uses it: the built binary against
//! disks made by sgdisk/mkfs.fat/mtools, images served by a real nginx, and the real
//! compressors for raw images. Covers what the library suites cannot: argument handling,
//! exit codes, messages, and a restore killed with SIGKILL half-way and run again.

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use e2e::{img_bin, require_tool, run, sh, Nginx, Scratch};

const MIB: u64 = 1 << 20;

fn img(args: &[&str]) -> Output {
    Command::new(img_bin())
        .args(args)
        .output()
        .expect("running img")
}

fn ok(args: &[&str]) -> Output {
    run(Command::new(img_bin()).args(args))
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// A GPT disk: partition 1 `BOOT` (FAT, 16 MiB), partition 2 `OS` (FAT32, 64 MiB) holding
/// `files` under /OS. Returns the OS partition's byte offset.
fn make_disk(path: &Path, files: &[(&str, Vec<u8>)], fill_junk: bool) -> u64 {
    for t in ["sgdisk", "mkfs.fat", "mcopy"] {
        require_tool(t);
    }
    let _ = std::fs::remove_file(path);
    if fill_junk {
        std::fs::write(path, vec![0x5Au8; (96 * MIB) as usize]).unwrap();
    } else {
        sh(&format!("truncate -s 96M {}", path.display()));
    }
    sh(&format!(
        "sgdisk -n 1:2048:+16M -t 1:0700 -c 1:BOOT -n 2:0:+64M -t 2:0700 -c 2:OS {} >/dev/null",
        path.display()
    ));
    let p2 = 2048 + 16 * 2048;
    if !files.is_empty() {
        sh(&format!(
            "mkfs.fat -n BOOT --offset=2048 {} 16384 >/dev/null 2>&1",
            path.display()
        ));
        sh(&format!(
            "mkfs.fat -F 32 -n OS --offset={p2} {} 65536 >/dev/null 2>&1",
            path.display()
        ));
        let dir = path.parent().unwrap().join("src-files");
        std::fs::create_dir_all(&dir).unwrap();
        sh(&format!("mmd -i {}@@{} ::/OS", path.display(), p2 * 512));
        for (name, data) in files {
            let f = dir.join(name);
            std::fs::write(&f, data).unwrap();
            sh(&format!(
                "mcopy -i {}@@{} {} ::/OS/",
                path.display(),
                p2 * 512,
                f.display()
            ));
        }
    }
    p2 * 512
}

fn read_back(disk: &Path, offset: u64, name: &str) -> Vec<u8> {
    let out = run(Command::new("mtype").args([
        "-i",
        &format!("{}@@{offset}", disk.display()),
        &format!("::/OS/{name}"),
    ]));
    out.stdout
}

fn fsck_partition(disk: &Path, offset: u64, len: u64, scratch: &Scratch) {
    let part = scratch.join("fsck-part.img");
    sh(&format!(
        "dd if={} of={} bs=1M iflag=skip_bytes,count_bytes skip={offset} count={len} status=none && fsck.fat -n {}",
        disk.display(),
        part.display(),
        part.display()
    ));
}

fn sample_files() -> Vec<(&'static str, Vec<u8>)> {
    vec![
        ("SYSTEM.BIN", e2e::sample_bytes(7, 9 * MIB as usize + 123)),
        ("CONFIG.TXT", b"server=https://vxcmserver\n".repeat(2000)),
        ("EMPTY.DAT", Vec::new()),
    ]
}

#[test]
fn partition_by_label_over_http_leaves_the_rest_of_the_disk_alone() {
    let s = Scratch::new("cli-part");
    let src = s.join("device.img");
    let files = sample_files();
    let os = make_disk(&src, &files, false);

    let www = s.join("www");
    std::fs::create_dir_all(&www).unwrap();
    let made = ok(&[
        "-make",
        www.join("os.fimg").to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=OS",
        "-comp=6",
        "-version=2.0",
        "-model=Z90,R90",
    ]);
    assert!(
        text(&made).contains("captured partition OS"),
        "{}",
        text(&made)
    );

    let info: serde_json::Value = serde_json::from_slice(
        &ok(&["-info", www.join("os.fimg").to_str().unwrap(), "-json"]).stdout,
    )
    .unwrap();
    assert_eq!(info["meta"]["name"], "os");
    assert_eq!(info["meta"]["version"], "2.0");
    assert_eq!(info["meta"]["models"], serde_json::json!(["Z90", "R90"]));
    assert_eq!(info["meta"]["comp_level"], 6);
    assert_eq!(info["meta"]["content"]["partition"]["fs"], "fat32");
    let image_len = std::fs::metadata(www.join("os.fimg")).unwrap().len();
    assert!(
        image_len < 16 * MIB,
        "used blocks only: a 64 MiB partition with ~10 MiB of files made a {image_len}-byte image"
    );

    let dump: serde_json::Value =
        serde_json::from_slice(&ok(&["-dump", src.to_str().unwrap(), "-json"]).stdout).unwrap();
    let parts = &dump[0]["layout"]["partitions"];
    assert_eq!(parts.as_array().unwrap().len(), 2);
    assert_eq!(parts[1]["label"], "OS");
    assert!(parts[1]["used_bytes"].as_u64().unwrap() > 9 * MIB);

    // The target: same table, junk everywhere else.
    let dst = s.join("target.img");
    make_disk(&dst, &[], true);
    let boot_before = std::fs::read(&dst).unwrap()[MIB as usize..(17 * MIB) as usize].to_vec();
    let nginx = Nginx::serve(&www);
    // The image is made for Z90 and R90: a C50 is refused before anything is written.
    let r = img(&[
        "-restore",
        "-unsigned",
        &nginx.url("os.fimg"),
        &format!("-disk={}", dst.display()),
        "-part=2",
        "-model=C50",
    ]);
    assert_eq!(r.status.code(), Some(5), "{}", text(&r));
    assert!(
        text(&r).contains("made for Z90, R90") && text(&r).contains("-force"),
        "{}",
        text(&r)
    );
    assert!(std::fs::read(&dst)
        .unwrap()
        .iter()
        .skip((17 * MIB) as usize)
        .take(MIB as usize)
        .all(|&b| b == 0x5A));
    let r = ok(&[
        "-restore",
        "-unsigned",
        "-model=r90",
        &nginx.url("os.fimg"),
        &format!("-disk={}", dst.display()),
        "-part=2",
        &format!("-state={}", s.join("state").display()),
    ]);
    // Not a terminal: plain progress lines, then the summary.
    let t = text(&r);
    assert!(t.contains("deploying:") && t.contains("done in"), "{t}");
    assert!(t.contains("0 already intact"), "{t}");

    fsck_partition(&dst, os, 64 * MIB, &s);
    for (name, data) in &files {
        assert!(
            read_back(&dst, os, name) == *data,
            "{name} differs after restore"
        );
    }
    let boot_after = std::fs::read(&dst).unwrap()[MIB as usize..(17 * MIB) as usize].to_vec();
    assert!(
        boot_before == boot_after,
        "restoring partition 2 touched partition 1"
    );
    assert!(ok(&["-verify", www.join("os.fimg").to_str().unwrap()])
        .status
        .success());
}

#[test]
fn signed_images_are_required_and_no_trusted_key_restores_nothing() {
    let s = Scratch::new("cli-sign");
    let src = s.join("device.img");
    make_disk(&src, &sample_files(), false);
    let image = s.join("disk.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
    ]);
    ok(&["-keygen", s.join("fleet.key").to_str().unwrap()]);
    ok(&["-keygen", s.join("other.key").to_str().unwrap()]);
    let signed = s.join("disk-signed.fimg");
    let o = ok(&[
        "-sign",
        image.to_str().unwrap(),
        &format!("-key={}", s.join("fleet.key").display()),
        &format!("-out={}", signed.display()),
    ]);
    assert!(text(&o).contains("signed"), "{}", text(&o));

    let target = s.join("target.img");
    std::fs::write(&target, vec![0xC3u8; (96 * MIB) as usize]).unwrap();
    let before = std::fs::read(&target).unwrap();
    let trust = format!("-trust={}", s.join("fleet.key.pub").display());
    let disk = format!("-disk={}", target.display());
    let state = format!("-state={}", s.join("state").display());

    // Unsigned image with a trusted key configured: refused, exit 4, not a byte written.
    let r = img(&["-restore", image.to_str().unwrap(), &disk, &trust, &state]);
    assert_eq!(r.status.code(), Some(4), "{}", text(&r));
    assert!(
        std::fs::read(&target).unwrap() == before,
        "an unsigned image wrote to the target"
    );

    // No trusted key at all (the default): nothing is restored, signed, unsigned or raw,
    // before anything is written; the message names the way out.
    let empty = s.join("no-keys.d");
    std::fs::create_dir_all(&empty).unwrap();
    let raw = s.join("raw.img");
    std::fs::write(&raw, vec![0x11u8; MIB as usize]).unwrap();
    for src in [&image, &signed, &raw] {
        let r = Command::new(img_bin())
            .env("IMG_TRUSTED_DIR", &empty)
            .args(["-restore", src.to_str().unwrap(), &disk, &state])
            .output()
            .unwrap();
        assert_eq!(r.status.code(), Some(4), "{}", text(&r));
        assert!(
            text(&r).contains("no trusted signing key") && text(&r).contains("-unsigned"),
            "{}",
            text(&r)
        );
        assert!(
            std::fs::read(&target).unwrap() == before,
            "{} wrote to the target without a trusted key",
            src.display()
        );
    }
    // -unsigned (lab): restored, with a warning.
    let r = run(Command::new(img_bin())
        .env("IMG_TRUSTED_DIR", &empty)
        .args([
            "-restore",
            raw.to_str().unwrap(),
            &disk,
            &state,
            "-unsigned",
        ]));
    assert!(text(&r).contains("WARNING: -unsigned"), "{}", text(&r));
    assert_eq!(
        std::fs::read(&target).unwrap()[..MIB as usize],
        vec![0x11u8; MIB as usize][..]
    );
    std::fs::write(&target, &before).unwrap();

    // Signed by a key that is not trusted: refused the same way.
    let r = img(&[
        "-restore",
        signed.to_str().unwrap(),
        &disk,
        &format!("-trust={}", s.join("other.key.pub").display()),
        &state,
    ]);
    assert_eq!(r.status.code(), Some(4), "{}", text(&r));
    assert!(std::fs::read(&target).unwrap() == before);

    // Trusted through the folder, as on a device: accepted.
    let tdir = s.join("trusted.d");
    std::fs::create_dir_all(&tdir).unwrap();
    std::fs::copy(s.join("fleet.key.pub"), tdir.join("fleet.pub")).unwrap();
    let r = run(Command::new(img_bin()).env("IMG_TRUSTED_DIR", &tdir).args([
        "-restore",
        signed.to_str().unwrap(),
        &disk,
        &state,
    ]));
    assert!(text(&r).contains("restored"), "{}", text(&r));
    let v = run(Command::new(img_bin())
        .env("IMG_TRUSTED_DIR", &tdir)
        .args(["-verify", signed.to_str().unwrap()]));
    assert!(text(&v).contains("verified"), "{}", text(&v));
    assert!(sh(&format!("sgdisk -v {}", target.display())).contains("No problems found"));
}

#[test]
fn a_restore_killed_half_way_resumes_without_fetching_intact_chunks_again() {
    let s = Scratch::new("cli-kill");
    let src = s.join("device.img");
    // Random data that does not compress: the image is about as large as the files.
    let files = vec![
        ("A.BIN", e2e::random_bytes(11, 20 * MIB as usize)),
        ("B.BIN", vec![0xEEu8; 3 * MIB as usize]),
    ];
    let os = make_disk(&src, &files, false);
    let www = s.join("www");
    std::fs::create_dir_all(&www).unwrap();
    ok(&[
        "-make",
        www.join("d.fimg").to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-chunk=1",
    ]);
    let image_len = std::fs::metadata(www.join("d.fimg")).unwrap().len();

    // 4 MiB/s: the transfer takes seconds, long enough to kill it in the middle.
    let nginx = Nginx::serve_with(&www, "limit_rate 4m;");
    let target = s.join("target.img");
    sh(&format!("truncate -s 96M {}", target.display()));
    let state = s.join("state");
    let args = |t: &PathBuf| {
        vec![
            "-restore".to_string(),
            "-unsigned".to_string(),
            nginx.url("d.fimg"),
            format!("-disk={}", t.display()),
            format!("-state={}", state.display()),
        ]
    };
    let mut child = Command::new(img_bin())
        .args(args(&target))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Wait until a good part of the image has crossed the wire, then pull the plug.
    let start = Instant::now();
    while allocated(&target) < image_len / 2 {
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "restore made no progress"
        );
        assert!(
            child.try_wait().unwrap().is_none(),
            "restore finished before it could be interrupted"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().unwrap();
    child.wait().unwrap();
    let sent_first = nginx.bytes_sent_when_idle();

    let r = ok(&args(&target).iter().map(String::as_str).collect::<Vec<_>>());
    let sent_second = nginx.bytes_sent_when_idle() - sent_first;
    let t = text(&r);
    let intact: u64 = t
        .split(" already intact")
        .next()
        .and_then(|a| a.rsplit(' ').next())
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    eprintln!("killed after {sent_first} bytes; rerun: {intact} chunks intact, fetched {sent_second} of {image_len} bytes");
    assert!(intact > 0, "the rerun found no intact chunks: {t}");
    assert!(
        sent_second < image_len * 3 / 4,
        "the rerun fetched {sent_second} of {image_len} bytes: chunks already on the target were fetched again\n{t}"
    );
    // Same result as an uninterrupted restore.
    for (name, data) in &files {
        assert!(
            read_back(&target, os, name) == *data,
            "{name} differs after the resumed restore"
        );
    }
    fsck_partition(&target, os, 64 * MIB, &s);
}

/// Bytes written to the target so far (its allocated size: a fresh target is sparse and
/// only written chunks take space).
fn allocated(target: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(target)
        .map(|m| m.blocks() * 512)
        .unwrap_or(0)
}

#[test]
fn exit_codes_and_messages_name_the_problem() {
    let s = Scratch::new("cli-exit");
    let src = s.join("device.img");
    make_disk(&src, &sample_files(), false);
    let image = s.join("d.fimg");
    ok(&[
        "-make",
        image.to_str().unwrap(),
        &format!("-disk={}", src.display()),
    ]);

    // Usage.
    let r = img(&["-make", "x.fimg", "-comp=12"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).contains("0 (none) to 9"), "{}", text(&r));
    let r = img(&["-frobnicate"]);
    assert_eq!(r.status.code(), Some(2));
    assert!(text(&r).contains("unknown verb -frobnicate"));

    // A partition that does not exist: the message lists what does.
    let r = img(&[
        "-make",
        s.join("p.fimg").to_str().unwrap(),
        &format!("-disk={}", src.display()),
        "-part=NOPE",
    ]);
    assert_eq!(r.status.code(), Some(5), "{}", text(&r));
    assert!(
        text(&r).contains("NOPE") && text(&r).contains("OS"),
        "{}",
        text(&r)
    );
    assert!(
        !s.join("p.fimg").exists() && !s.join("p.partial").exists(),
        "a failed capture left a file behind"
    );

    // A corrupt image: exit 3, the chunk is named, nothing past it written.
    let mut bytes = std::fs::read(&image).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xFF;
    let bad = s.join("bad.fimg");
    std::fs::write(&bad, &bytes).unwrap();
    let r = img(&["-verify", bad.to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(3), "{}", text(&r));
    assert!(text(&r).contains("chunk"), "{}", text(&r));
    sh(&format!("truncate -s 96M {}", s.join("t.img").display()));
    let r = img(&[
        "-restore",
        "-unsigned",
        bad.to_str().unwrap(),
        &format!("-disk={}", s.join("t.img").display()),
        &format!("-state={}", s.join("st").display()),
    ]);
    assert_eq!(r.status.code(), Some(3), "{}", text(&r));

    // A missing image file: I/O, and the path is in the message.
    let r = img(&["-info", s.join("missing.fimg").to_str().unwrap()]);
    assert_eq!(r.status.code(), Some(7), "{}", text(&r));
    assert!(text(&r).contains("missing.fimg"));

    // An image URL that is not there.
    let nginx = Nginx::serve(s.path());
    let r = img(&[
        "-restore",
        "-unsigned",
        &nginx.url("nothere.fimg"),
        &format!("-disk={}", s.join("t2.img").display()),
        &format!("-state={}", s.join("st").display()),
    ]);
    assert_eq!(r.status.code(), Some(6), "{}", text(&r));
    assert!(text(&r).contains("404"), "{}", text(&r));
}

#[test]
fn raw_images_deploy_from_stdin_and_url_in_every_compression() {
    for t in ["gzip", "xz", "zstd"] {
        require_tool(t);
    }
    let s = Scratch::new("cli-raw");
    let src = s.join("device.img");
    make_disk(&src, &sample_files(), false);
    let want = std::fs::read(&src).unwrap();
    sh(&format!(
        "cd {} && gzip -1 -k device.img && xz -0 -T2 -k device.img && zstd -q -1 -k device.img",
        s.path().display()
    ));
    let nginx = Nginx::serve(s.path());
    for (i, name) in [
        "device.img",
        "device.img.gz",
        "device.img.xz",
        "device.img.zst",
    ]
    .iter()
    .enumerate()
    {
        let t1 = s.join(format!("via-stdin-{i}.img"));
        let t2 = s.join(format!("via-url-{i}.img"));
        // Restores never create their target: these are the new disks.
        sh(&format!(
            "truncate -s 96M {} {}",
            t1.display(),
            t2.display()
        ));
        let out = run(Command::new("bash").arg("-c").arg(format!(
            "{} -restore - -unsigned -disk={} -state={} < {}",
            img_bin().display(),
            t1.display(),
            s.join("st").display(),
            s.join(name).display()
        )));
        assert!(text(&out).contains("raw image"), "{name}: {}", text(&out));
        assert!(
            std::fs::read(&t1).unwrap() == want,
            "{name} via stdin differs"
        );
        ok(&[
            "-restore",
            "-unsigned",
            &nginx.url(name),
            &format!("-disk={}", t2.display()),
            &format!("-state={}", s.join("st").display()),
        ]);
        assert!(
            std::fs::read(&t2).unwrap() == want,
            "{name} via URL differs"
        );
    }
}

/// A minimal HTTP server that stores PUT bodies (chunked or not) under `dir`.
const PUT_SERVER: &str = r#"
import http.server, sys
class H(http.server.BaseHTTPRequestHandler):
    protocol_version = 'HTTP/1.1'
    def do_PUT(self):
        with open(sys.argv[2] + self.path, 'wb') as out:
            if self.headers.get('Transfer-Encoding', '').lower() == 'chunked':
                while True:
                    n = int(self.rfile.readline().split(b';')[0], 16)
                    if n == 0:
                        self.rfile.readline()
                        break
                    out.write(self.rfile.read(n))
                    self.rfile.readline()
            else:
                out.write(self.rfile.read(int(self.headers['Content-Length'])))
        self.send_response(201)
        self.send_header('Content-Length', '0')
        self.end_headers()
    def log_message(self, *a):
        pass
http.server.HTTPServer(('127.0.0.1', int(sys.argv[1])), H).serve_forever()
"#;

#[test]
fn capture_streams_to_an_http_upload() {
    require_tool("python3");
    let s = Scratch::new("cli-put");
    let src = s.join("device.img");
    let files = sample_files();
    let os = make_disk(&src, &files, false);
    let up = s.join("uploads");
    std::fs::create_dir_all(&up).unwrap();
    let port = e2e::free_port();
    let mut server = Command::new("python3")
        .args(["-c", PUT_SERVER, &port.to_string(), up.to_str().unwrap()])
        .spawn()
        .unwrap();
    e2e::wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(10));
    let url = format!("http://127.0.0.1:{port}/os.fimg");
    let r = img(&[
        "-make",
        &url,
        &format!("-disk={}", src.display()),
        "-part=OS",
    ]);
    let _ = server.kill();
    let _ = server.wait();
    assert!(r.status.success(), "{}", text(&r));
    // What arrived is a complete, valid image that deploys.
    let got = up.join("os.fimg");
    ok(&["-verify", got.to_str().unwrap()]);
    let dst = s.join("target.img");
    make_disk(&dst, &[], true);
    ok(&[
        "-restore",
        "-unsigned",
        got.to_str().unwrap(),
        &format!("-disk={}", dst.display()),
        "-part=OS",
        &format!("-state={}", s.join("st").display()),
    ]);
    for (name, data) in &files {
        assert!(read_back(&dst, os, name) == *data, "{name} differs");
    }
}

/// Every verb of `img`'s verb table (`agent::cli::VERBS`, so a verb added there is covered
/// without touching this test), run as the real binary with an option it does not have, with
/// each of its options' values missing and with each flag given a value: exit 2 (usage),
/// before anything is done, and a message that names the option and the way out
/// (`img -help`), which itself lists the verb.
#[test]
fn every_usage_error_of_every_verb_exits_2_naming_the_option_and_img_help() {
    use agent::args::Kind;
    use agent::cli::VERBS;

    // The table holds at least the verbs the documentation lists.
    let names: Vec<&str> = VERBS.iter().map(|v| v.names[0]).collect();
    for documented in [
        "help",
        "version",
        "dump",
        "make",
        "restore",
        "info",
        "verify",
        "sign",
        "keygen",
        "discover",
        "serverurl",
        "netconfig",
        "findserver",
        "checkin",
        "install",
        "bootnext",
    ] {
        assert!(
            names.contains(&documented),
            "-{documented} is not in the verb table"
        );
    }
    let help = text(&ok(&["-help"]));

    // (command line, what the message names, what it says), run four at a time.
    let mut cases: Vec<(Vec<String>, String, &str)> = Vec::new();
    for verb in VERBS {
        let v = format!("-{}", verb.names[0]);
        assert!(help.contains(&v), "img -help does not mention {v}");
        // An option the verb does not have: under every name of the verb, and after an
        // operand with a value.
        for alias in verb.names {
            let a = format!("-{alias}");
            cases.push((
                vec![a, "-bogus-option".into()],
                "-bogus-option".into(),
                "does not take",
            ));
        }
        cases.push((
            vec![v.clone(), "operand".into(), "--bogus-option=1".into()],
            "-bogus-option".into(),
            "does not take",
        ));
        // Each option's value missing at the end of the line (the first one's also before
        // another option), each flag given a value. Aliases resolve to the same entry (unit
        // tests in args.rs).
        let mut first = true;
        for opt in verb.opts {
            let o = format!("-{}", opt.names[0]);
            if opt.kind == Kind::Flag {
                cases.push((vec![v.clone(), format!("{o}=yes")], o, "takes no value"));
                continue;
            }
            if first {
                cases.push((
                    vec![v.clone(), o.clone(), "-bogus-option".into()],
                    o.clone(),
                    "needs a value",
                ));
                first = false;
            }
            cases.push((vec![v.clone(), o.clone()], o, "needs a value"));
        }
    }
    // `img -checkin -bogus` used to exit 1.
    cases.push((
        vec!["-checkin".into(), "-bogus".into()],
        "-bogus".into(),
        "does not take",
    ));
    // And one not from the table: a verb that does not exist.
    cases.push((
        vec!["-frobnicate".into()],
        "-frobnicate".into(),
        "unknown verb",
    ));

    let failures: Vec<String> = std::thread::scope(|scope| {
        let workers: Vec<_> = cases
            .chunks(cases.len().div_ceil(4))
            .map(|chunk| {
                scope.spawn(move || {
                    let mut bad = Vec::new();
                    for (args, names_this, says) in chunk {
                        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
                        let r = img(&refs);
                        let t = text(&r);
                        if r.status.code() != Some(2)
                            || !(t.contains(names_this.as_str())
                                && t.contains(says)
                                && t.contains("`img -help`"))
                        {
                            bad.push(format!(
                                "img {}: exit {:?}, expected 2 and a message naming {names_this}, saying {says:?}, pointing to `img -help`: {t}",
                                refs.join(" "),
                                r.status.code()
                            ));
                        }
                    }
                    bad
                })
            })
            .collect();
        workers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect()
    });
    eprintln!(
        "{} usage errors over {} verbs run, {} wrong",
        cases.len(),
        VERBS.len(),
        failures.len()
    );
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}
