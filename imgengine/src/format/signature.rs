//! What an image's signature covers, and the check of a signature block against the key
//! it names. This is part of the format (the bytes signed are as fixed as the byte tables
//! in `docs/image-format.md`); which keys a device trusts, key files and sealing are
//! [`crate::sign`]'s, which builds on this module (never the other way round).

use std::fmt;

use ed25519_dalek::Verifier;
use sha2::{Digest, Sha256};

use super::layout::SignatureBlock;
use crate::error::{Error, ErrorKind, Result};

/// Domain separation: a signature over an image can never be replayed as anything else.
const SIGNING_CONTEXT: &[u8] = b"imgengine image signature v1\0";

/// A key's short name: the first 8 bytes of the SHA-256 of the public key (16 hex digits).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct KeyId(pub [u8; 8]);

impl KeyId {
    /// The id of an ed25519 public key.
    pub fn of(public: &[u8; 32]) -> KeyId {
        let d = Sha256::digest(public);
        let mut id = [0u8; 8];
        id.copy_from_slice(&d[..8]);
        KeyId(id)
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

/// The message an image's signature is made over: context, preamble, manifest. The
/// manifest holds every chunk's SHA-256, so this covers every byte a deploy writes.
pub fn signed_message(preamble: &[u8], manifest: &[u8]) -> Vec<u8> {
    let mut m = Vec::with_capacity(SIGNING_CONTEXT.len() + preamble.len() + manifest.len());
    m.extend_from_slice(SIGNING_CONTEXT);
    m.extend_from_slice(preamble);
    m.extend_from_slice(manifest);
    m
}

/// The ed25519 key a signature block names, checked to be a valid point.
pub fn public_key(sig: &SignatureBlock) -> Result<ed25519_dalek::VerifyingKey> {
    ed25519_dalek::VerifyingKey::from_bytes(&sig.public_key).map_err(|e| {
        Error::new(ErrorKind::Signature, "not a valid ed25519 public key").with_source(e)
    })
}

impl SignatureBlock {
    /// The id of the key this block names.
    pub fn key_id(&self) -> KeyId {
        KeyId::of(&self.public_key)
    }

    /// Check that this block is a valid signature of `preamble` and `manifest` by the key
    /// it names (whether that key is trusted is the caller's question).
    pub fn check(&self, preamble: &[u8], manifest: &[u8]) -> Result<KeyId> {
        let id = self.key_id();
        let signature = ed25519_dalek::Signature::from_bytes(&self.signature);
        public_key(self)?
            .verify(&signed_message(preamble, manifest), &signature)
            .map_err(|e| {
                Error::new(
                    ErrorKind::Signature,
                    format!(
                        "bad signature by key {id}: image header or manifest altered after signing"
                    ),
                )
                .with_source(e)
            })?;
        Ok(id)
    }
}
