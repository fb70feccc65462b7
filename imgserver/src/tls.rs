//! The server's private PKI: `imgserver init` makes a CA and a server certificate signed by
//! it; devices carry the CA certificate and accept only a server that proves a certificate
//! from it. A rogue DHCP answer pointing a device elsewhere therefore gets a refused TLS
//! handshake, not a job.
//!
//! Files in the data directory: `ca.pem` (give this to devices), `ca.key` (keep secret; used
//! again when `init --renew` issues a new server certificate), `server.pem`, `server.key`.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, KeyPair,
    KeyUsagePurpose,
};

pub struct Pki {
    pub ca_cert: PathBuf,
    pub ca_key: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
}

impl Pki {
    pub fn in_dir(dir: &Path) -> Pki {
        Pki {
            ca_cert: dir.join("ca.pem"),
            ca_key: dir.join("ca.key"),
            server_cert: dir.join("server.pem"),
            server_key: dir.join("server.key"),
        }
    }

    pub fn exists(&self) -> bool {
        self.ca_cert.exists() && self.server_cert.exists() && self.server_key.exists()
    }
}

/// Names the server certificate is valid for when the administrator gives none: the
/// loopback names and this host's name.
pub fn default_names() -> Vec<String> {
    let mut names = vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ];
    if let Ok(h) = std::fs::read_to_string("/proc/sys/kernel/hostname") {
        let h = h.trim();
        if !h.is_empty() && !names.iter().any(|n| n == h) {
            names.push(h.to_string());
        }
    }
    names
}

pub(crate) fn write_secret(path: &Path, text: &str) -> anyhow::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .with_context(|| format!("writing {}", path.display()))?;
    f.write_all(text.as_bytes())
        .with_context(|| format!("writing {}", path.display()))
}

/// Create the CA (unless it exists and `renew` only asks for a new server certificate) and
/// a server certificate for `names` (DNS names or IP addresses).
pub fn init(pki: &Pki, names: &[String], renew: bool) -> anyhow::Result<()> {
    if pki.ca_cert.exists() && !renew {
        bail!(
            "{} already exists: this server has a CA. Use `imgserver init --renew` to issue a new server certificate from it",
            pki.ca_cert.display()
        );
    }
    let (ca, ca_key) = if pki.ca_cert.exists() {
        let key_pem = std::fs::read_to_string(&pki.ca_key)
            .with_context(|| format!("reading {}", pki.ca_key.display()))?;
        let cert_pem = std::fs::read_to_string(&pki.ca_cert)
            .with_context(|| format!("reading {}", pki.ca_cert.display()))?;
        let key = KeyPair::from_pem(&key_pem).context("parsing the CA key")?;
        let _ = cert_pem;
        // The same subject and key as the certificate on the devices: what we sign with it
        // verifies against their copy, whatever the dates of this re-made one.
        let cert = ca_params()?.self_signed(&key).context("loading the CA")?;
        (cert, key)
    } else {
        let key = KeyPair::generate().context("generating the CA key")?;
        let cert = ca_params()?
            .self_signed(&key)
            .context("signing the CA certificate")?;
        write_secret(&pki.ca_key, &key.serialize_pem())?;
        std::fs::write(&pki.ca_cert, cert.pem())
            .with_context(|| format!("writing {}", pki.ca_cert.display()))?;
        (cert, key)
    };
    let mut params = CertificateParams::new(names.to_vec()).context("server certificate names")?;
    params.distinguished_name.push(
        DnType::CommonName,
        names.first().cloned().unwrap_or_else(|| "imgserver".into()),
    );
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    set_validity(&mut params, 5);
    let key = KeyPair::generate().context("generating the server key")?;
    let cert = params
        .signed_by(&key, &ca, &ca_key)
        .context("signing the server certificate")?;
    write_secret(&pki.server_key, &key.serialize_pem())?;
    // The chain the server presents: its certificate, then the CA's.
    std::fs::write(&pki.server_cert, format!("{}{}", cert.pem(), ca.pem()))
        .with_context(|| format!("writing {}", pki.server_cert.display()))?;
    Ok(())
}

fn ca_params() -> anyhow::Result<CertificateParams> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params
        .distinguished_name
        .push(DnType::CommonName, "imgserver device CA");
    params
        .distinguished_name
        .push(DnType::OrganizationName, "imgserver");
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    set_validity(&mut params, 20);
    Ok(params)
}

/// From a day ago (clock skew on devices without an RTC battery) for `years`.
fn set_validity(params: &mut CertificateParams, years: i64) {
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0);
    let (y, m, d) = civil_from_days(now / 86_400 - 1);
    params.not_before = rcgen::date_time_ymd(y as i32, m as u8, d as u8);
    params.not_after = rcgen::date_time_ymd((y + years) as i32, m as u8, d.min(28) as u8);
}

/// Days since 1970-01-01 to (year, month, day) (H. Hinnant's civil_from_days).
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = if z >= 0 { z } else { z - 146_096 } / 146_097;
    let doe = (z - era * 146_097) as u64;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let y = yoe as i64 + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (if m <= 2 { y + 1 } else { y }, m, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(20_454), (2026, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
    }

    #[test]
    fn init_writes_a_chain_and_refuses_to_overwrite() {
        let dir = std::env::temp_dir().join(format!("imgserver-pki-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let pki = Pki::in_dir(&dir);
        init(&pki, &default_names(), false).unwrap();
        assert!(pki.exists());
        let chain = std::fs::read_to_string(&pki.server_cert).unwrap();
        assert_eq!(chain.matches("BEGIN CERTIFICATE").count(), 2);
        assert!(init(&pki, &default_names(), false).is_err());
        let ca_before = std::fs::read(&pki.ca_cert).unwrap();
        init(&pki, &["imgserver.example".to_string()], true).unwrap();
        assert_eq!(
            std::fs::read(&pki.ca_cert).unwrap(),
            ca_before,
            "renew keeps the CA devices trust"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
