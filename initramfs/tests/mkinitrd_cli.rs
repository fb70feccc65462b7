//! `mkinitrd` refuses a production build without a CA (issue 9) and marks lab builds.

use std::process::Command;

fn mkinitrd(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_mkinitrd"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn a_build_without_a_ca_is_refused_unless_it_is_a_lab_build() {
    let dir = std::env::temp_dir().join(format!("mkinitrd-cli-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let agent = dir.join("agent");
    std::fs::write(&agent, b"\x7fELF not really").unwrap();
    let ca = dir.join("ca.pem");
    std::fs::write(&ca, b"-----BEGIN CERTIFICATE-----\n").unwrap();
    let out = dir.join("initrd.img");
    let (a, o) = (agent.to_str().unwrap(), out.to_str().unwrap());

    let r = mkinitrd(&["-o", o, "--agent", a, "--no-compress"]);
    assert!(!r.status.success());
    let err = String::from_utf8_lossy(&r.stderr);
    assert!(
        err.contains("no CA given") && err.contains("--lab"),
        "{err}"
    );
    assert!(!out.exists(), "nothing may be written");

    // A lab build: allowed, said on stderr, and carries the marker init prints at boot.
    let r = mkinitrd(&["-o", o, "--agent", a, "--no-compress", "--lab"]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    assert!(String::from_utf8_lossy(&r.stderr).contains("lab build"));
    let bytes = std::fs::read(&out).unwrap();
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    assert!(has(b"etc/img/lab-build"));
    assert!(has(initramfs::LAB_BUILD_TEXT.as_bytes()));

    // With the server's CA: a production build, the CA where the agent pins it, no marker.
    std::fs::remove_file(&out).unwrap();
    let r = mkinitrd(&[
        "-o",
        o,
        "--agent",
        a,
        "--no-compress",
        "--server-ca",
        ca.to_str().unwrap(),
    ]);
    assert!(r.status.success(), "{}", String::from_utf8_lossy(&r.stderr));
    let bytes = std::fs::read(&out).unwrap();
    let has = |s: &[u8]| bytes.windows(s.len()).any(|w| w == s);
    assert!(has(b"etc/img/server-ca.pem"));
    assert!(!has(b"etc/img/lab-build"));
    std::fs::remove_dir_all(&dir).unwrap();
}
