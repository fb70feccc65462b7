//! The web console in a real browser: headless Chromium from Debian driven over WebDriver
//! (chromedriver) by fantoccini, against the real `imgserver` binary on loopback with TLS
//! from its own `init`, and devices that are the real agent (`img -checkin`) imaging
//! disk-image files.
//!
//! The browser trusts the server's CA the way an administrator's desktop would: the CA is
//! added to an NSS database (certutil) in the browser's own HOME. Certificate errors are
//! never ignored: if the CA were not trusted, the first page load would fail.
//!
//! Screenshots of the main pages go to target/tmp/web-console/ (kept after the test).
//!
//! The Sessions page: a viewer sees the multicast sessions but no form; an operator starts
//! one from the form (the server becomes its master on the loopback interface), a real
//! `img -session NAME -client` on loopback joins it, and the page shows the device's
//! progress and result; a bad MAC is refused with the reason; a live session is stopped
//! after a confirmation question.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use e2e::server::{capture_image, fat16_source_disk};
use e2e::{imgserver_admin as admin, require_tool, sample_bytes, sh, Scratch};
use fantoccini::{Client, ClientBuilder, Locator};

const MIB: u64 = 1 << 20;
const MAC_A: &str = "52:54:00:00:0c:0a";
const MAC_B: &str = "52:54:00:00:0c:0b";

/// `imgserver serve` on 127.0.0.1 with TLS (tests/src/server.rs); killed on drop.
struct Server(e2e::server::Server);

impl std::ops::Deref for Server {
    type Target = e2e::server::Server;
    fn deref(&self) -> &e2e::server::Server {
        &self.0
    }
}

impl Server {
    fn start(data: &Path) -> Server {
        admin(data, &["init"]);
        let mut server =
            e2e::server::Server::start(data, &["--listen", "127.0.0.1:0", "--interval", "5"]);
        // The name the server certificate carries (tls::default_names).
        server.url = format!("https://localhost:{}", server.port);
        Server(server)
    }

    /// A new admin token (printed once on stdout).
    fn token(&self, name: &str, role: &str) -> String {
        let out = self.admin(&["admin", "add", name, "--role", role]);
        out.lines()
            .find(|l| l.starts_with("imgadm_"))
            .unwrap_or_else(|| panic!("no token in {out:?}"))
            .to_string()
    }
}

/// A 48 MiB GPT disk with one FAT16 partition SYSTEM holding VERSION.TXT, captured whole
/// and registered as image `os` `version`.
fn register_image(srv: &Server, dir: &Scratch, version: &str) {
    let img = make_image(dir, version);
    let out = srv.admin(&["image", "add", img.to_str().unwrap()]);
    assert!(
        out.contains(&format!("registered image os {version}")),
        "{out}"
    );
}

/// The image file `os` `version` (see [`register_image`]), not registered.
fn make_image(dir: &Scratch, version: &str) -> PathBuf {
    let disk = dir.join(format!("src-{version}.img"));
    let blob = sample_bytes(7, 200_000);
    fat16_source_disk(dir.path(), &disk, 48, &format!("os {version}\n"), &blob);
    let img = dir.join(format!("os-{version}.img"));
    capture_image(&disk, None, "os", version, &img);
    img
}

/// A device: a blank disk-image file and the real agent's `img -checkin`.
struct Device {
    mac: &'static str,
    disk: PathBuf,
    state: PathBuf,
    config: PathBuf,
}

impl Device {
    fn new(dir: &Scratch, mac: &'static str, disk_mib: u64) -> Device {
        let tag = mac.replace(':', "");
        let disk = dir.join(format!("disk-{tag}.img"));
        sh(&format!(
            "truncate -s {} {}",
            disk_mib * MIB,
            disk.display()
        ));
        // The lab setting for unsigned images, as the boot partition's lab.conf says it.
        let config = dir.join(format!("config-{tag}"));
        fs::create_dir_all(&config).unwrap();
        fs::write(config.join("lab.conf"), "unsigned_images = yes\n").unwrap();
        Device {
            mac,
            disk,
            state: dir.join(format!("state-{tag}")),
            config,
        }
    }

    /// One `img -checkin` cycle: (exit code, output).
    fn checkin(&self, srv: &Server) -> (Option<i32>, String) {
        self.checkin_at(&srv.url, &srv.data.join("ca.pem"))
    }

    fn checkin_at(&self, url: &str, ca: &Path) -> (Option<i32>, String) {
        let out = Command::new(e2e::img_bin())
            .arg("-checkin")
            .arg(format!("-server={url}"))
            .arg(format!("-ca={}", ca.display()))
            .arg(format!("-state={}", self.state.display()))
            .arg(format!("-disk={}", self.disk.display()))
            .arg(format!("-config={}", self.config.display()))
            .arg(format!("-mac={}", self.mac))
            .arg("-model=TC-100")
            .arg(format!("-serial=SN-{}", self.mac.replace(':', "")))
            .output()
            .unwrap();
        (
            out.status.code(),
            String::from_utf8_lossy(&out.stdout).into_owned()
                + &String::from_utf8_lossy(&out.stderr),
        )
    }
}

/// chromedriver on a free loopback port, with a HOME whose NSS database trusts the server's
/// CA; killed on drop.
struct Driver {
    child: Child,
    url: String,
}

impl Driver {
    fn start(home: &Path, ca: &Path) -> Driver {
        let nss = home.join(".pki/nssdb");
        fs::create_dir_all(&nss).unwrap();
        let db = format!("sql:{}", nss.display());
        sh(&format!("certutil -N -d {db} --empty-password"));
        sh(&format!(
            "certutil -A -d {db} -n imgserver-test-ca -t C,, -i {}",
            ca.display()
        ));
        let listed = sh(&format!("certutil -L -d {db}"));
        assert!(listed.contains("imgserver-test-ca"), "{listed}");
        let port = e2e::free_port();
        let child = Command::new("chromedriver")
            .arg(format!("--port={port}"))
            .env("HOME", home)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("starting chromedriver");
        e2e::wait_for_port(&format!("127.0.0.1:{port}"), Duration::from_secs(20));
        Driver {
            child,
            url: format!("http://127.0.0.1:{port}"),
        }
    }
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Chromium session, driven synchronously.
struct Browser {
    rt: tokio::runtime::Runtime,
    c: Option<Client>,
    shots: PathBuf,
    base: String,
}

impl Browser {
    fn open(driver: &Driver, home: &Path, base: &str, shots: &Path) -> Browser {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        let profile = home.join("profile");
        let caps: serde_json::Map<String, serde_json::Value> =
            serde_json::from_value(serde_json::json!({
                "browserName": "chrome",
                // Certificate errors are failures, never clicked away.
                "acceptInsecureCerts": false,
                "goog:chromeOptions": {
                    "binary": "/usr/bin/chromium",
                    "args": [
                        "--headless=new",
                        // The test runs as root in a container: Chromium's sandbox needs user
                        // namespaces it may not have.
                        "--no-sandbox",
                        "--disable-gpu",
                        "--disable-dev-shm-usage",
                        "--window-size=1360,1000",
                        "--lang=en-US",
                        format!("--user-data-dir={}", profile.display()),
                    ]
                }
            }))
            .unwrap();
        let c = rt
            .block_on(
                ClientBuilder::new(hyper_util::client::legacy::connect::HttpConnector::new())
                    .capabilities(caps)
                    .connect(&driver.url),
            )
            .expect("a Chromium session from chromedriver");
        fs::create_dir_all(shots).unwrap();
        Browser {
            rt,
            c: Some(c),
            shots: shots.to_path_buf(),
            base: base.to_string(),
        }
    }

    fn c(&self) -> &Client {
        self.c.as_ref().unwrap()
    }

    fn go(&self, path: &str) {
        self.rt
            .block_on(self.c().goto(&format!("{}{path}", self.base)))
            .unwrap_or_else(|e| panic!("loading {path}: {e}"));
    }

    fn path(&self) -> String {
        let u = self.rt.block_on(self.c().current_url()).unwrap();
        match u.query() {
            Some(q) => format!("{}?{q}", u.path()),
            None => u.path().to_string(),
        }
    }

    fn text(&self, css: &str) -> String {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.text().await })
            .unwrap_or_else(|e| panic!("text of {css}: {e}\non {}", self.path()))
    }

    fn count(&self, css: &str) -> usize {
        self.rt
            .block_on(self.c().find_all(Locator::Css(css)))
            .unwrap()
            .len()
    }

    fn click(&self, css: &str) {
        self.rt
            .block_on(async { self.c().find(Locator::Css(css)).await?.click().await })
            .unwrap_or_else(|e| panic!("clicking {css}: {e}\non {}", self.path()));
    }

    /// Click something that loads a new page, and wait until the new page is there.
    fn click_nav(&self, css: &str) {
        self.js("window.__before_click = true; return 0;");
        self.click(css);
        self.wait_loaded();
    }

    /// Wait until the page that was marked is gone and the new one is loaded.
    fn wait_loaded(&self) {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            let fresh = self.rt.block_on(self.c().execute(
                "return window.__before_click === undefined && document.readyState === 'complete';",
                vec![],
            ));
            if matches!(fresh, Ok(serde_json::Value::Bool(true))) {
                return;
            }
            assert!(Instant::now() < end, "no new page after a click");
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    fn fill(&self, css: &str, text: &str) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.clear().await?;
                e.send_keys(text).await
            })
            .unwrap_or_else(|e| panic!("typing into {css}: {e}"));
    }

    fn accept_confirm(&self) -> String {
        let text = self.rt.block_on(self.c().get_alert_text()).unwrap();
        self.rt.block_on(self.c().accept_alert()).unwrap();
        text
    }

    fn js(&self, script: &str) -> serde_json::Value {
        self.rt
            .block_on(self.c().execute(script, vec![]))
            .unwrap_or_else(|e| panic!("script: {e}"))
    }

    /// Wait until the text of `css` contains `want` (the page is not reloaded by the test).
    fn wait_text(&self, css: &str, want: &str, timeout: Duration) -> String {
        let end = Instant::now() + timeout;
        loop {
            let got = self.rt.block_on(async {
                match self.c().find(Locator::Css(css)).await {
                    Ok(e) => e.text().await.unwrap_or_default(),
                    Err(_) => String::new(),
                }
            });
            if got.contains(want) {
                return got;
            }
            assert!(
                Instant::now() < end,
                "{css} never said {want:?} (last: {got:?}) on {}",
                self.path()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Wait until `css` matches `n` elements.
    fn wait_count(&self, css: &str, n: usize, timeout: Duration) {
        let end = Instant::now() + timeout;
        while self.count(css) != n {
            assert!(
                Instant::now() < end,
                "{css} never matched {n} on {}",
                self.path()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    /// Save a screenshot as NAME.png.
    fn shot(&self, name: &str) {
        let png = self.rt.block_on(self.c().screenshot()).unwrap();
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        fs::write(self.shots.join(format!("{name}.png")), png).unwrap();
    }

    /// Choose a file in a file input (WebDriver types its path).
    fn choose_file(&self, css: &str, file: &Path) {
        self.rt
            .block_on(async {
                let e = self.c().find(Locator::Css(css)).await?;
                e.send_keys(file.to_str().unwrap()).await
            })
            .unwrap_or_else(|e| panic!("choosing {} in {css}: {e}", file.display()));
    }

    fn sign_in(&self, token: &str) {
        self.go("/login");
        self.fill("#token", token);
        self.click_nav("#signin");
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        if let Some(c) = self.c.take() {
            let _ = self.rt.block_on(c.close());
        }
    }
}

fn tools() {
    for t in [
        "chromium",
        "chromedriver",
        "certutil",
        "sgdisk",
        "mkfs.fat",
        "mcopy",
    ] {
        require_tool(t);
    }
}

#[test]
fn console_in_chromium_signs_in_schedules_watches_aborts_and_blocks() {
    tools();
    let dir = Scratch::new("web-console");
    let shots = e2e::workspace_root().join("target/tmp/web-console");
    let srv = Server::start(&dir.join("srv"));
    let operator = srv.token("olga", "operator");
    let viewer = srv.token("vic", "viewer");
    register_image(&srv, &dir, "1.0");
    // Device A has room for the image; device B's 16 MiB disk does not (an error).
    let a = Device::new(&dir, MAC_A, 64);
    let b = Device::new(&dir, MAC_B, 16);
    for d in [&a, &b] {
        let (code, out) = d.checkin(&srv);
        assert_eq!(code, Some(0), "{out}");
        assert!(out.contains("enrolled"), "{out}");
    }
    let home = dir.join("browser-home");
    let driver = Driver::start(&home, &srv.data.join("ca.pem"));
    let br = Browser::open(&driver, &home, &srv.url, &shots);

    // Not signed in: every page sends the browser to the sign-in form.
    br.go("/jobs");
    assert!(
        br.path().starts_with("/login?next=%2Fjobs"),
        "{}",
        br.path()
    );
    br.shot("01-sign-in");
    // A wrong token and a device's own credential are refused alike.
    br.sign_in("imgadm_0000000000000000000000000000000000000000000000000000000000000000");
    let said = br.text("main");
    assert!(said.contains("not a valid admin token"), "{said}");
    let record: serde_json::Value =
        serde_json::from_str(&fs::read_to_string(a.state.join("credential")).unwrap()).unwrap();
    let device_credential = record["token"].as_str().expect("the device's credential");
    br.sign_in(device_credential);
    let said = br.text("main");
    assert!(said.contains("not a valid admin token"), "{said}");

    // The operator signs in and lands on the fleet, where both devices are.
    br.go("/login?next=/");
    br.fill("#token", &operator);
    br.click_nav("#signin");
    assert_eq!(br.path(), "/");
    let fleet = br.text("#fleet");
    assert!(fleet.contains(MAC_A) && fleet.contains(MAC_B), "{fleet}");
    assert!(br
        .text(&format!("tr[data-mac='{MAC_A}']"))
        .contains("Operational"));
    assert!(br.text("header").contains("olga"));
    br.shot("02-fleet");
    // Search narrows the list.
    br.fill("#q", "0c:0b");
    br.click_nav("#filter");
    assert_eq!(br.count("#fleet tbody tr"), 1);
    assert!(br.text("#fleet").contains(MAC_B));

    // A device's page: inventory and its disk, and the transcript of its check-ins.
    br.go(&format!("/devices/{MAC_A}"));
    let page = br.text("main");
    assert!(
        page.contains("TC-100") && page.contains("64.0 MiB"),
        "{page}"
    );
    assert!(
        br.text("#transcript").contains("enrol"),
        "{}",
        br.text("#transcript")
    );

    // The image repository.
    br.go("/images");
    assert!(br.text("#images").contains("os"));
    br.shot("04-images");

    // New job for both devices: the validation table comes first; B's error blocks B only.
    br.go("/jobs/new");
    assert_eq!(br.count("#create"), 0, "no create button before validation");
    br.fill("#macs", &format!("{MAC_A}\n{MAC_B}"));
    br.click_nav("#validate");
    let row_b = br.text(&format!("#validation tr[data-mac='{MAC_B}']"));
    assert!(
        row_b.contains("error") && row_b.contains("not enough space"),
        "{row_b}"
    );
    let row_a = br.text(&format!("#validation tr[data-mac='{MAC_A}']"));
    assert!(!row_a.contains("error"), "{row_a}");
    assert!(br.text("#create").contains("for 1 device"));
    br.shot("05-new-job-validation");
    // B alone: every device blocked, nothing can be created.
    br.fill("#macs", MAC_B);
    br.click_nav("#validate");
    assert_eq!(br.count("#create"), 0);
    assert!(br.text(".notice.error").contains("no job can be created"));
    // A alone: create, then watch the job reach done while the real agent images the disk.
    br.fill("#macs", MAC_A);
    br.click_nav("#validate");
    br.click_nav("#create");
    assert!(br.path().starts_with("/jobs/1"), "{}", br.path());
    assert!(br
        .text(&format!("#tasks tr[data-mac='{MAC_A}'] .state"))
        .contains("pending"));
    br.shot("06-job-pending");
    let agent = {
        let (url, ca) = (srv.url.clone(), srv.data.join("ca.pem"));
        let d = Device {
            mac: a.mac,
            disk: a.disk.clone(),
            state: a.state.clone(),
            config: a.config.clone(),
        };
        std::thread::spawn(move || d.checkin_at(&url, &ca))
    };
    // The page is not reloaded by the test: its script polls and, once the job is over,
    // has the server render it afresh (data-live=0, no Abort button).
    br.wait_text("#job-state", "done", Duration::from_secs(300));
    br.wait_count("#tasks[data-live='0']", 1, Duration::from_secs(20));
    assert_eq!(br.count("#job-actions form[action$='/abort']"), 0);
    let (code, out) = agent.join().unwrap();
    assert_eq!(code, Some(0), "{out}");
    assert!(br
        .text(&format!("#tasks tr[data-mac='{MAC_A}'] .state"))
        .contains("succeeded"));
    assert!(!br.text("#job-state").contains("errors"));
    br.shot("07-job-done");
    // The device checks in again: its page shows the partition the image brought.
    let (code, out) = a.checkin(&srv);
    assert_eq!(code, Some(0), "{out}");
    br.go(&format!("/devices/{MAC_A}"));
    let disk = br.text("main section h3");
    assert!(
        disk.contains("64.0 MiB") && disk.contains("image os 1.0"),
        "{disk}"
    );
    let parts = br.text("table.parts");
    assert!(
        parts.contains("SYSTEM") && parts.contains("fat16"),
        "{parts}"
    );
    br.shot("03-device");

    // Another job for A, never picked up: abort it (after the confirmation question).
    br.go(&format!("/jobs/new?mac={MAC_A}"));
    br.click_nav("#validate");
    let warn = br.text(&format!("#validation tr[data-mac='{MAC_A}']"));
    assert!(
        warn.contains("same as or older"),
        "a warning, not a block: {warn}"
    );
    br.click_nav("#create");
    assert!(br.path().starts_with("/jobs/2"), "{}", br.path());
    br.js("window.__before_click = true; return 0;");
    br.click("#job-actions form[action$='/abort'] button");
    assert!(br.accept_confirm().contains("Abort this job"));
    br.wait_loaded();
    br.wait_text("#job-state", "aborted", Duration::from_secs(20));
    assert!(br
        .text(&format!("#tasks tr[data-mac='{MAC_A}'] .state"))
        .contains("aborted"));
    assert!(br.text(".notice.ok").contains("aborted"));
    br.shot("08-job-aborted");
    // Retry the aborted job: a new job for the aborted device, which is aborted in turn.
    br.click_nav("#job-actions form[action$='/retry'] button");
    assert!(br.path().starts_with("/jobs/3"), "{}", br.path());
    assert!(br.text(".notice.ok").contains("Retry of job 2"));
    assert!(br
        .text(&format!("#tasks tr[data-mac='{MAC_A}'] .state"))
        .contains("pending"));
    br.shot("11-job-retried");
    br.click("#job-actions form[action$='/abort'] button");
    assert!(br.accept_confirm().contains("Abort this job"));
    br.wait_loaded();
    br.wait_text("#job-state", "aborted", Duration::from_secs(20));

    // A second image, deployed by the real agent; then roll the device back to the first.
    register_image(&srv, &dir, "2.0");
    br.go(&format!("/jobs/new?mac={MAC_A}"));
    assert!(br.text("#image").contains("os 2.0"));
    br.click_nav("#validate");
    br.click_nav("#create");
    assert!(br.path().starts_with("/jobs/4"), "{}", br.path());
    let (code, out) = run_agent(&a, &srv, &br);
    assert_eq!(code, Some(0), "{out}");
    let before = br.text(&format!("#tasks tr[data-mac='{MAC_A}']"));
    assert!(
        before.contains("os 1.0"),
        "the image it had before: {before}"
    );
    br.click("#job-actions form[action$='/rollback'] button");
    assert!(br.accept_confirm().contains("the image they had before"));
    br.wait_loaded();
    assert!(br.path().starts_with("/jobs/5"), "{}", br.path());
    assert!(br.text(".notice.ok").contains("Rollback of job 4"));
    assert!(br.text("main").contains("os 1.0"), "{}", br.text("main"));
    br.shot("12-job-rollback");
    let (code, out) = run_agent(&a, &srv, &br);
    assert_eq!(code, Some(0), "{out}");
    let (code, out) = a.checkin(&srv);
    assert_eq!(code, Some(0), "{out}");
    br.go(&format!("/devices/{MAC_A}"));
    let disk = br.text("main section h3");
    assert!(disk.contains("image os 1.0"), "rolled back: {disk}");
    br.go("/jobs");
    br.shot("09-jobs");

    // Sign out: the session is gone, the cookie too.
    br.click_nav("#signout");
    assert!(br.path().starts_with("/login"), "{}", br.path());
    br.go("/");
    assert!(br.path().starts_with("/login"), "{}", br.path());

    // An admin: images from a URL, a device's group, forgetting a device, tokens.
    let admin = srv.token("ada", "admin");
    br.sign_in(&admin);
    let web = dir.join("web");
    fs::create_dir_all(&web).unwrap();
    fs::rename(make_image(&dir, "3.0"), web.join("os-3.0.img")).unwrap();
    let nginx = e2e::Nginx::serve(&web);
    br.go("/images");
    br.fill("#image-url", &nginx.url("missing.img"));
    br.click_nav("#add-image-submit");
    let said = br.text(".notice.error");
    assert!(
        said.contains("not registered") && said.contains("missing.img"),
        "the error names what was wrong: {said}"
    );
    br.shot("13-image-url-error");
    br.fill("#image-url", &nginx.url("os-3.0.img"));
    br.click_nav("#add-image-submit");
    assert!(br.text(".notice.ok").contains("Registered image os 3.0"));
    assert!(br.text("#images").contains(&nginx.url("os-3.0.img")));
    br.shot("14-images-admin");
    let remove = br.js(
        "var f = [...document.querySelectorAll('#images form[action$=\"/remove\"]')]
           .find(f => f.closest('tr').textContent.includes('3.0'));
         f.querySelector('button').id = 'remove-3'; return 0;",
    );
    assert_eq!(remove, serde_json::json!(0));
    br.click("#remove-3");
    assert!(br.accept_confirm().contains("Remove image os 3.0"));
    br.wait_loaded();
    assert!(
        !br.text("#images").contains("os-3.0.img"),
        "{}",
        br.text("#images")
    );

    // Upload an image file from the browser: a file that is not an image is refused,
    // named; a real one is registered.
    fs::write(dir.join("junk.img"), b"not an image at all").unwrap();
    br.choose_file("#upload-file", &dir.join("junk.img"));
    br.click("#upload-submit");
    let said = br.wait_text("#upload-status", "not registered", Duration::from_secs(60));
    assert!(
        said.contains("junk.img") && said.contains("the uploaded file"),
        "the error names the file, not the server's temporary name: {said}"
    );
    br.shot("15-image-upload-error");
    br.js("window.__before_click = true; return 0;");
    br.choose_file("#upload-file", &make_image(&dir, "4.0"));
    br.click("#upload-submit");
    br.wait_loaded();
    let list = br.text("#images");
    assert!(list.contains("4.0"), "{list}");
    let incoming = fs::read_dir(srv.data.join("incoming"))
        .map(|d| d.count())
        .unwrap_or(0);
    assert_eq!(incoming, 0, "no half-registered upload is left behind");

    br.go(&format!("/devices/{MAC_B}"));
    br.fill("#group", "lab, 2");
    br.click_nav("#set-group");
    assert!(br.text(".notice.error").contains("no commas"));
    br.go(&format!("/devices/{MAC_B}"));
    br.fill("#group", "lab-2");
    br.click_nav("#set-group");
    assert!(br.path().starts_with("/devices/"), "{}", br.path());
    assert!(br.text("h1").contains(MAC_B));
    let group = br.js("return document.querySelector('#group').value");
    assert_eq!(group, serde_json::json!("lab-2"));
    br.shot("16-device-admin");
    br.go("/?group=lab-2");
    assert!(br.text("#fleet").contains(MAC_B));
    br.go(&format!("/devices/{MAC_B}"));
    br.click("#device-manage form[action$='/forget'] button");
    assert!(br.accept_confirm().contains("Forget"));
    br.wait_loaded();
    assert_eq!(br.path(), "/");
    assert!(!br.text("#fleet").contains(MAC_B));

    br.go("/tokens");
    assert!(br.text("#tokens").contains("olga"));
    br.fill("#token-name", "bad name");
    br.js("document.querySelector('#add-token').noValidate = true; return 0;");
    br.click_nav("#add-token-submit");
    assert!(br.text(".notice.error").contains("token name"));
    br.fill("#token-name", "otto");
    br.click_nav("#add-token-submit");
    let made = br.text("#new-token");
    assert!(made.starts_with("imgadm_"), "{made}");
    assert!(br.text("#tokens").contains("otto"));
    br.shot("17-tokens");
    br.click_nav("#signout");
    br.sign_in(&made);
    assert_eq!(br.path(), "/");
    assert!(br.text("header").contains("otto"));
    assert!(
        !br.text("header nav").contains("Tokens"),
        "an operator has no token page"
    );
    br.click_nav("#signout");
    br.sign_in(&admin);
    br.go("/tokens");
    let revoke = br.js(
        "var f = [...document.querySelectorAll('#tokens form[action$=\"/revoke\"]')]
           .find(f => f.closest('tr').textContent.includes('otto'));
         f.querySelector('button').id = 'revoke-otto'; return 0;",
    );
    assert_eq!(revoke, serde_json::json!(0));
    br.click("#revoke-otto");
    assert!(br.accept_confirm().contains("Revoke the token otto"));
    br.wait_loaded();
    assert!(br.text(".notice.ok").contains("Revoked the token otto"));
    br.click_nav("#signout");
    br.sign_in(&made);
    assert!(br.text("main").contains("not a valid admin token"));

    // A viewer sees everything and no button; the server refuses a hand-made post anyway.
    br.sign_in(&viewer);
    assert_eq!(br.path(), "/");
    assert!(!br.text("header nav").contains("New job"));
    for page in [
        "/",
        "/jobs/1",
        "/jobs/2",
        "/images",
        "/jobs/4",
        &format!("/devices/{MAC_A}"),
    ] {
        br.go(page);
        let buttons = br.count("main button, main .button");
        // The fleet's Filter button is a search, not a change.
        let filter = br.count("main #filter");
        assert_eq!(buttons, filter, "a viewer sees change buttons on {page}");
    }
    br.go("/jobs/1");
    br.shot("10-viewer-job");
    let csrf = br.js("return document.querySelector('input[name=csrf]').value");
    let csrf = csrf.as_str().unwrap().to_string();
    let status = br.js(&format!(
        "var x = new XMLHttpRequest(); x.open('POST', '/jobs/1/retry', false);
         x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');
         x.send('csrf={csrf}'); return x.status + ' ' + x.responseText;"
    ));
    let status = status.as_str().unwrap();
    assert!(
        status.starts_with("403") && status.contains("may not"),
        "{status}"
    );
    br.go("/jobs/new");
    assert!(br.text(".notice.error").contains("may not schedule"));
    assert!(!br.text("header nav").contains("Tokens"));
    br.go("/tokens");
    assert!(
        br.text(".notice.error").contains("tokens"),
        "{}",
        br.text("main")
    );
    for (path, body) in [
        (format!("/devices/{MAC_A}/forget"), format!("csrf={csrf}")),
        (
            format!("/devices/{MAC_A}/group"),
            format!("csrf={csrf}&group=x"),
        ),
        (
            "/tokens/add".to_string(),
            format!("csrf={csrf}&name=evil&role=admin"),
        ),
        (
            "/images/add".to_string(),
            format!("csrf={csrf}&url=http%3A%2F%2Fx%2Fy"),
        ),
    ] {
        let status = br.js(&format!(
            "var x = new XMLHttpRequest(); x.open('POST', '{path}', false);
             x.setRequestHeader('Content-Type', 'application/x-www-form-urlencoded');
             x.send('{body}'); return x.status + ' ' + x.responseText;"
        ));
        let status = status.as_str().unwrap();
        assert!(status.starts_with("403"), "{path}: {status}");
    }
    let status = br.js(&format!(
        "var x = new XMLHttpRequest(); x.open('PUT', '/images/upload', false);
         x.setRequestHeader('x-console-csrf', '{csrf}');
         x.send('not an image'); return x.status + ' ' + x.responseText;"
    ));
    let status = status.as_str().unwrap();
    assert!(
        status.starts_with("403") && status.contains("may not"),
        "{status}"
    );
    assert!(
        srv.admin(&["devices"]).contains(MAC_A),
        "the viewer forgot nothing"
    );
    // Nothing the viewer tried was made.
    assert!(!srv.admin(&["jobs"]).lines().any(|l| l.starts_with('6')));
    assert!(!srv.admin(&["admin", "list"]).contains("evil"));
    // The audit trail names the operator for each change.
    let audit = srv.admin(&["admin", "audit"]);
    assert!(
        audit.contains("olga") && audit.contains("job.abort"),
        "{audit}"
    );
    println!("screenshots in {}", shots.display());
}

/// Let the real agent do its pending work (one check-in) while the job's page, open in
/// the browser, follows it by itself to done.
fn run_agent(a: &Device, srv: &Server, br: &Browser) -> (Option<i32>, String) {
    let agent = {
        let (url, ca) = (srv.url.clone(), srv.data.join("ca.pem"));
        let d = Device {
            mac: a.mac,
            disk: a.disk.clone(),
            state: a.state.clone(),
            config: a.config.clone(),
        };
        std::thread::spawn(move || d.checkin_at(&url, &ca))
    };
    br.wait_text("#job-state", "done", Duration::from_secs(300));
    br.wait_count("#tasks[data-live='0']", 1, Duration::from_secs(20));
    agent.join().unwrap()
}

/// curl's answer: status line and headers, then the body.
fn curl(srv: &Server, jar: &Path, args: &[&str]) -> String {
    let out = Command::new("curl")
        .args(["-s", "-i", "--cacert"])
        .arg(srv.data.join("ca.pem"))
        .arg("-b")
        .arg(jar)
        .arg("-c")
        .arg(jar)
        .args(args)
        .output()
        .expect("running curl");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn console_refuses_forged_posts_and_other_origins() {
    require_tool("curl");
    let dir = Scratch::new("web-console-csrf");
    let srv = Server::start(&dir.join("srv"));
    let operator = srv.token("olga", "operator");
    srv.admin(&["schedule", "add", "--mac", MAC_A, "--reboot"]);
    let jar = dir.join("jar");
    let url = |p: &str| format!("{}{p}", srv.url);
    let origin = format!("Origin: {}", srv.url);
    // Not signed in: pages redirect to the sign-in form, the live data answers 401.
    let r = curl(&srv, &jar, &[&url("/jobs/1")]);
    assert!(
        r.starts_with("HTTP/2 303") || r.starts_with("HTTP/1.1 303"),
        "{r}"
    );
    assert!(r.contains("location: /login?next=%2Fjobs%2F1"), "{r}");
    let r = curl(&srv, &jar, &[&url("/jobs/1/live.json")]);
    assert!(r.contains(" 401"), "{r}");
    // Sign-in from another site is refused, even with a good token.
    let tok = format!("token={operator}");
    let r = curl(
        &srv,
        &jar,
        &[
            "-H",
            "Origin: https://evil.example",
            "--data",
            &tok,
            &url("/login"),
        ],
    );
    assert!(
        r.contains(" 403") && !r.contains("set-cookie: __Host"),
        "{r}"
    );
    // From the console's own origin: a session cookie with every protection, never the token.
    let r = curl(&srv, &jar, &["-H", &origin, "--data", &tok, &url("/login")]);
    let cookie = r
        .lines()
        .find(|l| {
            l.to_ascii_lowercase()
                .starts_with("set-cookie: __host-imgconsole=")
        })
        .unwrap_or_else(|| panic!("no session cookie: {r}"));
    for part in ["Path=/", "Secure", "HttpOnly", "SameSite=Strict"] {
        assert!(cookie.contains(part), "{cookie}");
    }
    assert!(
        !cookie.contains(&operator[8..]),
        "the token is not in the cookie"
    );
    let page = curl(&srv, &jar, &[&url("/jobs/1")]);
    assert!(page.contains(" 200") && page.contains("Abort"), "{page}");
    for h in [
        "content-security-policy: default-src 'none'; script-src 'self'",
        "x-frame-options: DENY",
        "cache-control: no-store",
    ] {
        assert!(page.contains(h), "{h} missing: {page}");
    }
    let csrf = page
        .split("name=csrf value=\"")
        .nth(1)
        .and_then(|s| s.split('"').next())
        .expect("a CSRF field")
        .to_string();
    // A post without the CSRF token, with a wrong one, or from another site: refused, and the
    // job stays active.
    for (hdr, body) in [
        (origin.as_str(), String::new()),
        (origin.as_str(), "csrf=0000".to_string()),
        ("Origin: https://evil.example", format!("csrf={csrf}")),
    ] {
        let r = curl(
            &srv,
            &jar,
            &["-H", hdr, "--data", &body, &url("/jobs/1/abort")],
        );
        assert!(r.contains(" 403") && r.contains("stale"), "{r}");
    }
    assert!(
        srv.admin(&["jobs"]).contains("active"),
        "{}",
        srv.admin(&["jobs"])
    );
    // The real form's post works.
    let r = curl(
        &srv,
        &jar,
        &[
            "-H",
            &origin,
            "--data",
            &format!("csrf={csrf}"),
            &url("/jobs/1/abort"),
        ],
    );
    assert!(r.contains(" 303") && r.contains("location: /jobs/1"), "{r}");
    assert!(srv.admin(&["admin", "audit"]).contains("job.abort"));
    // Revoking the token ends the session at the next request.
    srv.admin(&["admin", "revoke", "olga"]);
    let r = curl(&srv, &jar, &[&url("/")]);
    assert!(r.contains(" 303") && r.contains("location: /login"), "{r}");
}

#[test]
fn console_sessions_page_starts_shows_and_stops_multicast_sessions() {
    tools();
    let dir = Scratch::new("web-console-sessions");
    let shots = e2e::workspace_root().join("target/tmp/web-console");
    let srv = Server::start(&dir.join("srv"));
    let operator = srv.token("olga", "operator");
    let viewer = srv.token("vic", "viewer");
    register_image(&srv, &dir, "1.0");
    let a = Device::new(&dir, MAC_A, 64);
    let (code, out) = a.checkin(&srv);
    assert_eq!(code, Some(0), "{out}");
    let home = dir.join("browser-home");
    let driver = Driver::start(&home, &srv.data.join("ca.pem"));
    let br = Browser::open(&driver, &home, &srv.url, &shots);

    // A viewer sees the page, and no form to start or stop anything.
    br.sign_in(&viewer);
    br.go("/sessions");
    assert!(
        br.text("main").contains("No session yet"),
        "{}",
        br.text("main")
    );
    assert_eq!(br.count("#start-session"), 0);
    br.click_nav("#signout");

    // The operator: a bad MAC is refused with the reason, and nothing is made.
    br.sign_in(&operator);
    br.go("/sessions");
    br.fill("#start-session input[name=name]", "room7");
    br.fill("#start-session textarea[name=macs]", "nope");
    br.click_nav("#start-session-button");
    let said = br.text("main");
    assert!(said.contains("\"nope\" is not a MAC address"), "{said}");
    br.go("/sessions");
    assert!(br.text("main").contains("No session yet"));

    // Started for device A, on the loopback interface, 30 minutes' registration.
    br.fill("#start-session input[name=name]", "room7");
    br.fill("#start-session textarea[name=macs]", MAC_A);
    br.fill("#start-session input[name=timeout]", "30");
    br.fill("#start-session input[name=interface]", "lo");
    br.click_nav("#start-session-button");
    assert!(br.path().starts_with("/sessions?note="), "{}", br.path());
    let note = br.text(".notice.ok");
    assert!(
        note.contains("Session room7 started: os 1.0 for 52:54:00:00:0c:0a")
            && note.contains("when 1 device(s) registered"),
        "{note}"
    );
    let sec = "section[data-session='room7']";
    assert!(br.text(&format!("{sec} .tasks")).contains(MAC_A));
    // The serving process takes it: its master on lo waits for registrations.
    reload_until(&br, &format!("{sec} .sessmsg"), "master on lo (127.0.0.1)");
    br.shot("20-session-waiting");

    // A device on loopback joins it by hand, as `img -session room7 -client` on a console.
    let target = dir.join("client.img");
    sh(&format!("truncate -s {} {}", 64 * MIB, target.display()));
    let log = fs::File::create(dir.join("client.log")).unwrap();
    let mut client = Command::new(e2e::img_bin())
        .args(["-session", "room7", "-client", "-iface=lo"])
        .arg(format!("-disk={}", target.display()))
        .env("IMG_STATE_DIR", dir.join("client-state"))
        .env("IMG_TRUSTED_DIR", dir.join("no-keys"))
        .env("IMG_QUIET", "1")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let status = wait_child(&mut client, Duration::from_secs(300));
    let client_log = fs::read_to_string(dir.join("client.log")).unwrap_or_default();
    assert_eq!(status, Some(0), "the device in the session: {client_log}");
    // The page shows the device, done at 100 %, and the session done.
    reload_until(&br, &format!("{sec} h2"), "done");
    let clients = br.text(&format!("{sec} .clients"));
    assert!(
        clients.contains("done") && clients.contains("100 %"),
        "{clients}"
    );
    assert!(clients.contains("127.0.0.1"), "{clients}");
    assert_eq!(
        br.count(&format!("{sec} form[action$='/stop']")),
        0,
        "a finished session has no stop button"
    );
    br.shot("21-session-done");

    // Another session, stopped by the operator after the question.
    br.fill("#start-session input[name=name]", "room8");
    br.fill("#start-session textarea[name=macs]", MAC_A);
    br.fill("#start-session input[name=interface]", "lo");
    br.click_nav("#start-session-button");
    let sec8 = "section[data-session='room8']";
    br.click(&format!("{sec8} form[action$='/stop'] button"));
    assert!(br.accept_confirm().contains("Stop session room8?"));
    br.wait_loaded();
    let note = br.text(".notice.ok");
    assert!(note.contains("Session room8 stopped"), "{note}");
    reload_until(&br, &format!("{sec8} h2"), "stopped");
    assert!(br.text(&format!("{sec8} .tasks")).contains("aborted"));
    br.shot("22-session-stopped");
    // The audit trail names the operator.
    let audit = srv.admin(&["admin", "audit"]);
    assert!(audit.contains("olga"), "{audit}");
}

/// Reload the page until the text of `css` contains `want` (60 s at most).
fn reload_until(br: &Browser, css: &str, want: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    loop {
        br.go("/sessions");
        let got = if br.count(css) > 0 {
            br.text(css)
        } else {
            String::new()
        };
        if got.contains(want) {
            return;
        }
        assert!(
            Instant::now() < end,
            "{css} never said {want:?} (last: {got:?})"
        );
        std::thread::sleep(Duration::from_millis(300));
    }
}

/// Wait for a child process, at most `limit` (killed after): its exit code.
fn wait_child(c: &mut Child, limit: Duration) -> Option<i32> {
    let end = Instant::now() + limit;
    loop {
        if let Some(s) = c.try_wait().unwrap() {
            return s.code();
        }
        if Instant::now() >= end {
            let _ = c.kill();
            let _ = c.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}
