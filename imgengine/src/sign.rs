//! Keys and signatures. An image is signed with ed25519 over its preamble and manifest
//! (which holds every chunk's SHA-256), so one signature check up front covers every byte
//! a deploy will write: chunks are then checked against the signed manifest as they arrive.
//!
//! Key files are one line of text, `img-ed25519-secret <hex seed>` or `img-ed25519-public
//! <hex key>`, so they survive copy-paste into a config management system. A key is named
//! by its id: the first 8 bytes of the SHA-256 of the public key, in hex.

use std::fmt;
use std::fs;
use std::io::{BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::Signer;

use crate::error::{Error, ErrorKind, IoContext, Result};
use crate::format::signature::{self, signed_message};
use crate::format::{self, ImageReader, ImageWriter, Layout, Manifest, SignatureBlock};

const SECRET_TAG: &str = "img-ed25519-secret";
const PUBLIC_TAG: &str = "img-ed25519-public";

pub use crate::format::KeyId;

/// A secret signing key.
pub struct SigningKey(ed25519_dalek::SigningKey);

/// A public key an agent trusts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifyingKey(ed25519_dalek::VerifyingKey);

impl SigningKey {
    /// A fresh key from the OS random source.
    pub fn generate() -> SigningKey {
        SigningKey(ed25519_dalek::SigningKey::generate(&mut rand_core::OsRng))
    }

    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey(self.0.verifying_key())
    }

    pub fn key_id(&self) -> KeyId {
        self.verifying_key().key_id()
    }

    fn sign_image(&self, preamble: &[u8], manifest: &[u8]) -> SignatureBlock {
        let sig = self.0.sign(&signed_message(preamble, manifest));
        SignatureBlock {
            public_key: self.0.verifying_key().to_bytes(),
            signature: sig.to_bytes(),
        }
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "SigningKey({})", self.key_id())
    }
}

impl VerifyingKey {
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.0.to_bytes())
    }

    pub fn to_bytes(&self) -> [u8; 32] {
        self.0.to_bytes()
    }

    pub fn from_bytes(b: &[u8; 32]) -> Result<VerifyingKey> {
        ed25519_dalek::VerifyingKey::from_bytes(b)
            .map(VerifyingKey)
            .map_err(|e| {
                Error::new(ErrorKind::Signature, "not a valid ed25519 public key").with_source(e)
            })
    }
}

/// Check an image's signature. With `trusted` empty, only that the signature matches the
/// key it names (for `img info`); otherwise that key must also be one of `trusted`.
pub fn verify_image(
    preamble: &[u8],
    manifest: &[u8],
    sig: &SignatureBlock,
    trusted: &[VerifyingKey],
) -> Result<KeyId> {
    let id = sig.key_id();
    let key = VerifyingKey(signature::public_key(sig)?);
    if !trusted.is_empty() && !trusted.contains(&key) {
        let known: Vec<String> = trusted.iter().map(|k| k.key_id().to_string()).collect();
        return Err(Error::new(
            ErrorKind::Signature,
            format!("image is signed by key {id}, which is not trusted here (trusted: {}); install its .pub in the trusted key directory", known.join(", ")),
        ));
    }
    sig.check(preamble, manifest)
}

fn parse_key_file(path: &Path, tag: &str) -> Result<[u8; 32]> {
    let text = fs::read_to_string(path).ctx(|| format!("reading key file {}", path.display()))?;
    let bad = || {
        Error::invalid(format!(
            "{}: not an img key file (expected one line \"{tag} <64 hex digits>\")",
            path.display()
        ))
    };
    let mut it = text.split_whitespace();
    if it.next() != Some(tag) {
        return Err(bad());
    }
    let bytes = hex::decode(it.next().ok_or_else(bad)?).map_err(|_| bad())?;
    bytes.try_into().map_err(|_| bad())
}

/// Generate a key pair: writes `path_secret` (mode 0600) and `path_secret.pub`.
pub fn generate(path_secret: &Path) -> Result<KeyId> {
    use std::os::unix::fs::OpenOptionsExt;
    let key = SigningKey::generate();
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path_secret)
        .ctx(|| {
            format!(
                "creating secret key {} (it must not exist yet)",
                path_secret.display()
            )
        })?;
    writeln!(f, "{SECRET_TAG} {}", hex::encode(key.0.to_bytes()))
        .ctx(|| format!("writing {}", path_secret.display()))?;
    let pubp = public_path(path_secret);
    fs::write(
        &pubp,
        format!(
            "{PUBLIC_TAG} {}\n",
            hex::encode(key.verifying_key().to_bytes())
        ),
    )
    .ctx(|| format!("writing {}", pubp.display()))?;
    Ok(key.key_id())
}

fn public_path(secret: &Path) -> PathBuf {
    let mut s = secret.as_os_str().to_owned();
    s.push(".pub");
    PathBuf::from(s)
}

pub fn load_secret(path: &Path) -> Result<SigningKey> {
    Ok(SigningKey(ed25519_dalek::SigningKey::from_bytes(
        &parse_key_file(path, SECRET_TAG)?,
    )))
}

pub fn load_public(path: &Path) -> Result<VerifyingKey> {
    VerifyingKey::from_bytes(&parse_key_file(path, PUBLIC_TAG)?)
        .map_err(|e| Error::invalid(format!("{}: {e:#}", path.display())))
}

/// Every `*.pub` file in `dir`, sorted by name. A missing directory is an empty trust set.
pub fn load_trusted_dir(dir: &Path) -> Result<Vec<VerifyingKey>> {
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(Error::io(
                format!("reading trusted key directory {}", dir.display()),
                e,
            ))
        }
    };
    let mut paths: Vec<PathBuf> = rd
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "pub"))
        .collect();
    paths.sort();
    paths.iter().map(|p| load_public(p)).collect()
}

/// Rewrite `image` (streaming or sealed) into the sealed layout signed by `key`. Every
/// chunk is checked on the way (nobody should sign a corrupt image). `out` may equal
/// `image`: the result is written next to `out` and renamed over it.
pub fn seal_and_sign(image: &Path, out: &Path, key: &SigningKey) -> Result<()> {
    // Pass 1: read and check everything, collect the manifest.
    let open = || fs::File::open(image).ctx(|| format!("opening image {}", image.display()));
    let mut r = ImageReader::open(BufReader::with_capacity(1 << 20, open()?))?;
    while let Some(rec) = r.next_chunk()? {
        let h = rec.header;
        format::decode_chunk(&h, rec.payload).map_err(|e| e.in_context(image.display()))?;
    }
    let old: Manifest = r.manifest().map(|(m, _)| m.clone()).unwrap_or_default();
    let meta = r.meta.clone();
    let preamble = format::layout::Preamble::new(Layout::Sealed, meta.to_json()?).encode();
    let manifest = format::sealed_manifest(&old, preamble.len() as u64)?;
    let manifest_bytes = manifest.encode();
    let sig = key.sign_image(&preamble, &manifest_bytes);

    // Pass 2: copy the chunk records behind the new head.
    let dir = out
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let tmp = dir.join(format!(
        ".{}.sealing",
        out.file_name().and_then(|n| n.to_str()).unwrap_or("image")
    ));
    let result = (|| {
        let f = fs::File::create(&tmp).ctx(|| format!("creating {}", tmp.display()))?;
        let mut w = ImageWriter::sealed(
            BufWriter::with_capacity(1 << 20, f),
            &preamble,
            &manifest_bytes,
            &sig,
        )?;
        let mut r = ImageReader::open(BufReader::with_capacity(1 << 20, open()?))?;
        while let Some(rec) = r.next_chunk()? {
            w.write_chunk(&rec.header, &rec.payload)?;
        }
        let (_, _, bw) = w.finish()?;
        let f = bw
            .into_inner()
            .map_err(|e| Error::io(format!("writing {}", tmp.display()), e.into_error()))?;
        f.sync_all().ctx(|| format!("syncing {}", tmp.display()))?;
        fs::rename(&tmp, out).ctx(|| format!("renaming {} to {}", tmp.display(), out.display()))
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::format::testimg;

    fn tmpdir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("imgengine-sign-{name}-{}", std::process::id()));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn key_files_round_trip() {
        let d = tmpdir("keys");
        let sk = d.join("site");
        let id = generate(&sk).unwrap();
        let secret = load_secret(&sk).unwrap();
        assert_eq!(secret.key_id(), id);
        let public = load_public(&d.join("site.pub")).unwrap();
        assert_eq!(public, secret.verifying_key());
        assert_eq!(load_trusted_dir(&d).unwrap(), vec![public]);
        assert!(generate(&sk).is_err(), "never overwrite a secret key");
        assert!(
            load_public(&sk).is_err(),
            "a secret file is not a public key"
        );
        assert!(load_trusted_dir(&d.join("missing")).unwrap().is_empty());
        fs::remove_dir_all(&d).unwrap();
    }

    fn sealed_image(d: &Path, key: &SigningKey) -> (PathBuf, Vec<u8>) {
        let disk = testimg::disk(200_000);
        let p = d.join("a.img");
        fs::write(&p, testimg::image(&disk, 32 << 10)).unwrap();
        seal_and_sign(&p, &p, key).unwrap();
        (p, disk)
    }

    fn head(img: &[u8]) -> (Vec<u8>, Vec<u8>, SignatureBlock) {
        let r = ImageReader::open(img).unwrap();
        let s = r.sealed.clone().unwrap();
        (r.preamble_bytes.clone(), s.manifest_bytes, s.signature)
    }

    #[test]
    fn sealed_image_verifies_and_replays() {
        let d = tmpdir("seal");
        let key = SigningKey::generate();
        let (p, disk) = sealed_image(&d, &key);
        let img = fs::read(&p).unwrap();
        assert_eq!(testimg::replay(&img, disk.len()).unwrap(), disk);
        let (pre, man, sig) = head(&img);
        assert_eq!(
            verify_image(&pre, &man, &sig, &[key.verifying_key()]).unwrap(),
            key.key_id()
        );
        assert_eq!(verify_image(&pre, &man, &sig, &[]).unwrap(), key.key_id());
        // Re-sealing a sealed image with another key works too.
        let key2 = SigningKey::generate();
        seal_and_sign(&p, &p, &key2).unwrap();
        let (pre, man, sig) = head(&fs::read(&p).unwrap());
        assert_eq!(
            verify_image(&pre, &man, &sig, &[key2.verifying_key()]).unwrap(),
            key2.key_id()
        );
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn bad_signature_and_wrong_key_are_refused() {
        let d = tmpdir("bad");
        let key = SigningKey::generate();
        let (p, _) = sealed_image(&d, &key);
        let img = fs::read(&p).unwrap();
        let (pre, man, sig) = head(&img);
        let other = SigningKey::generate();
        let e = verify_image(&pre, &man, &sig, &[other.verifying_key()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Signature);
        assert!(
            e.to_string().contains(&key.key_id().to_string())
                && e.to_string().contains("not trusted"),
            "{e}"
        );
        let mut bad = sig;
        bad.signature[3] ^= 1;
        let e = verify_image(&pre, &man, &bad, &[key.verifying_key()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Signature);
        // A manifest altered after signing (with its CRC fixed up) fails the signature.
        let mut m = Manifest::decode(&man).unwrap();
        m.entries[1].header.sha256[0] ^= 1;
        let e = verify_image(&pre, &m.encode(), &sig, &[key.verifying_key()]).unwrap_err();
        assert_eq!(e.kind(), ErrorKind::Signature);
        fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn sealing_refuses_a_corrupt_image() {
        let d = tmpdir("corrupt");
        let p = d.join("c.img");
        let mut img = testimg::image(&testimg::disk(100_000), 32 << 10);
        let n = img.len();
        img[n / 2] ^= 0xff;
        fs::write(&p, &img).unwrap();
        assert!(seal_and_sign(&p, &d.join("out.img"), &SigningKey::generate()).is_err());
        assert!(!d.join("out.img").exists());
        fs::remove_dir_all(&d).unwrap();
    }
}
