//! Envelope encryption and manifest signing keys.
//!
//! * A fresh 256-bit **data key** per WAL segment, which is also the data key of the lake file
//!   that segment becomes (one segment, one file), so ciphertext moves from WAL to lake unchanged.
//! * The data key is **wrapped** by a [`KeyEncryptionKey`]: a local 256-bit key behind any secret
//!   reference ([`LocalKek`]) or Vault Transit ([`crate::transit::TransitKek`]). The wrapped key
//!   and the KEK's id travel in the segment header and the Parquet file's metadata; rotating the
//!   KEK never rewrites old files (old ids stay unwrappable while the old key is kept).
//! * Payloads are sealed with AES-256-GCM: nonces are a per-key counter, never reused because a
//!   data key is never used for more than one segment; the associated data binds each ciphertext
//!   to its writer, its file (first seq) and its `event_id`.
//!
//! Invariant: key material lives in `Zeroizing` buffers and is never formatted.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};
use base64::Engine as _;
use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use crate::error::AuditError;

/// A boxed future, so that [`KeyEncryptionKey`] can be used as `dyn`.
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Wraps and unwraps data keys.
pub trait KeyEncryptionKey: Send + Sync {
    /// Stable id of this key, stored beside each wrapped key (never the key itself).
    fn key_id(&self) -> String;
    /// Encrypts a data key.
    fn wrap<'a>(&'a self, data_key: &'a [u8; 32]) -> BoxFuture<'a, Result<Vec<u8>, AuditError>>;
    /// Decrypts a data key wrapped by [`KeyEncryptionKey::wrap`].
    fn unwrap<'a>(&'a self, wrapped: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<[u8; 32]>, AuditError>>;
}

impl std::fmt::Debug for dyn KeyEncryptionKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "KeyEncryptionKey({})", self.key_id())
    }
}

const DEK_WRAP_AAD: &[u8] = b"keygate-audit-dek-v1";

/// A 256-bit key-encryption key held in memory (from `env://`, `file://`, `vault://`, `aws-sm://`).
pub struct LocalKek {
    key: Zeroizing<[u8; 32]>,
    id: String,
}

impl std::fmt::Debug for LocalKek {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "LocalKek({})", self.id)
    }
}

impl LocalKek {
    /// Parses a key given as 64 hex characters or as base64 (standard or URL-safe) of 32 bytes.
    pub fn from_text(text: &str) -> Result<LocalKek, AuditError> {
        let key = parse_key_32(text).ok_or_else(|| AuditError::Kek {
            key_id: "local".into(),
            reason: "the key-encryption key must be 32 bytes given as 64 hex characters or base64; generate one with `openssl rand -hex 32`".into(),
        })?;
        Ok(LocalKek::from_bytes(key))
    }

    /// Uses raw key bytes.
    pub fn from_bytes(key: Zeroizing<[u8; 32]>) -> LocalKek {
        // The id is a fingerprint: 64 bits of SHA-256 of a domain tag and the key, which tells
        // keys apart without helping anyone guess one.
        let mut h = Sha256::new();
        h.update(b"keygate-kek-id");
        h.update(&key[..]);
        let id = format!("local:{}", hex::encode(&h.finalize()[..8]));
        LocalKek { key, id }
    }
}

fn parse_key_32(text: &str) -> Option<Zeroizing<[u8; 32]>> {
    let t = text.trim();
    let mut out = Zeroizing::new([0u8; 32]);
    if t.len() == 64 && hex::decode_to_slice(t, &mut out[..]).is_ok() {
        return Some(out);
    }
    for engine in [
        &base64::engine::general_purpose::STANDARD,
        &base64::engine::general_purpose::URL_SAFE,
        &base64::engine::general_purpose::STANDARD_NO_PAD,
        &base64::engine::general_purpose::URL_SAFE_NO_PAD,
    ] {
        if let Ok(bytes) = engine.decode(t) {
            let bytes = Zeroizing::new(bytes);
            if bytes.len() == 32 {
                out.copy_from_slice(&bytes);
                return Some(out);
            }
        }
    }
    None
}

impl KeyEncryptionKey for LocalKek {
    fn key_id(&self) -> String {
        self.id.clone()
    }

    fn wrap<'a>(&'a self, data_key: &'a [u8; 32]) -> BoxFuture<'a, Result<Vec<u8>, AuditError>> {
        Box::pin(async move {
            let cipher = Aes256Gcm::new_from_slice(&self.key[..])
                .map_err(|_| AuditError::Crypto("invalid KEK length".into()))?;
            let nonce: [u8; 12] = rand::random();
            let ct = cipher
                .encrypt(Nonce::from_slice(&nonce), Payload { msg: data_key, aad: DEK_WRAP_AAD })
                .map_err(|_| AuditError::Kek { key_id: self.id.clone(), reason: "wrap failed".into() })?;
            let mut out = Vec::with_capacity(12 + ct.len());
            out.extend_from_slice(&nonce);
            out.extend_from_slice(&ct);
            Ok(out)
        })
    }

    fn unwrap<'a>(&'a self, wrapped: &'a [u8]) -> BoxFuture<'a, Result<Zeroizing<[u8; 32]>, AuditError>> {
        Box::pin(async move {
            let fail = |reason: &str| AuditError::Kek { key_id: self.id.clone(), reason: reason.into() };
            if wrapped.len() != 12 + 32 + 16 {
                return Err(fail("wrapped data key has the wrong length"));
            }
            let cipher = Aes256Gcm::new_from_slice(&self.key[..])
                .map_err(|_| AuditError::Crypto("invalid KEK length".into()))?;
            let plain = Zeroizing::new(
                cipher
                    .decrypt(Nonce::from_slice(&wrapped[..12]), Payload { msg: &wrapped[12..], aad: DEK_WRAP_AAD })
                    .map_err(|_| fail("cannot unwrap the data key: this is not the key that wrapped it"))?,
            );
            let mut key = Zeroizing::new([0u8; 32]);
            key.copy_from_slice(&plain);
            Ok(key)
        })
    }
}

/// Several KEKs by id, for readers of a lake whose files were written under rotated keys.
#[derive(Default, Clone)]
pub struct KekRing {
    keys: Vec<Arc<dyn KeyEncryptionKey>>,
}

impl std::fmt::Debug for KekRing {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.keys.iter().map(|k| k.key_id())).finish()
    }
}

impl KekRing {
    pub fn new(keys: Vec<Arc<dyn KeyEncryptionKey>>) -> KekRing {
        KekRing { keys }
    }

    /// The key whose id is `key_id`.
    pub fn get(&self, key_id: &str) -> Result<&Arc<dyn KeyEncryptionKey>, AuditError> {
        self.keys.iter().find(|k| k.key_id() == key_id).ok_or_else(|| AuditError::Kek {
            key_id: key_id.to_owned(),
            reason: format!(
                "no key-encryption key with this id was given (have: {}); pass the key that wrote the file",
                self.keys.iter().map(|k| k.key_id()).collect::<Vec<_>>().join(", ")
            ),
        })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// Sealed payload format version, the first byte of every ciphertext.
const PAYLOAD_V1: u8 = 1;

/// A data key with its AES-GCM instance and nonce counter.
pub struct DataKey {
    cipher: Aes256Gcm,
    next_nonce: u64,
}

impl std::fmt::Debug for DataKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("DataKey(..)")
    }
}

impl DataKey {
    /// A fresh random data key, returned with its raw bytes for wrapping.
    pub fn generate() -> Result<(DataKey, Zeroizing<[u8; 32]>), AuditError> {
        let raw = Zeroizing::new(rand::random::<[u8; 32]>());
        Ok((DataKey::from_raw(&raw)?, raw))
    }

    /// A data key from its raw bytes (after unwrapping).
    pub fn from_raw(raw: &[u8; 32]) -> Result<DataKey, AuditError> {
        let cipher =
            Aes256Gcm::new_from_slice(raw).map_err(|_| AuditError::Crypto("invalid data key length".into()))?;
        Ok(DataKey { cipher, next_nonce: 0 })
    }

    /// Encrypts `plaintext`: `[version][nonce 12][ciphertext+tag]`.
    pub fn seal(&mut self, aad: &[u8], plaintext: &[u8]) -> Result<Vec<u8>, AuditError> {
        let counter = self.next_nonce;
        self.next_nonce =
            counter.checked_add(1).ok_or_else(|| AuditError::Crypto("nonce space of a data key exhausted".into()))?;
        let mut nonce = [0u8; 12];
        nonce[4..].copy_from_slice(&counter.to_be_bytes());
        let ct = self
            .cipher
            .encrypt(Nonce::from_slice(&nonce), Payload { msg: plaintext, aad })
            .map_err(|_| AuditError::Crypto("encryption failed".into()))?;
        let mut out = Vec::with_capacity(1 + 12 + ct.len());
        out.push(PAYLOAD_V1);
        out.extend_from_slice(&nonce);
        out.extend_from_slice(&ct);
        Ok(out)
    }

    /// Decrypts a payload sealed by [`DataKey::seal`] under the same associated data.
    pub fn open(&self, aad: &[u8], sealed: &[u8]) -> Result<Vec<u8>, AuditError> {
        if sealed.len() < 1 + 12 + 16 || sealed[0] != PAYLOAD_V1 {
            return Err(AuditError::Crypto("payload is not a keygate v1 ciphertext".into()));
        }
        self.cipher.decrypt(Nonce::from_slice(&sealed[1..13]), Payload { msg: &sealed[13..], aad }).map_err(|_| {
            AuditError::Crypto(
                "payload does not decrypt: wrong key, altered bytes, or moved to another row or file".into(),
            )
        })
    }
}

/// Associated data of a row's payload: binds it to the writer, the file and the event.
pub fn row_aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + writer_id.len());
    aad.extend_from_slice(b"keygate-audit-row-v1\0");
    aad.extend_from_slice(writer_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&file_first_seq.to_be_bytes());
    aad.extend_from_slice(event_id.as_bytes());
    aad
}

/// Associated data of a `webhooks` row's payload: binds it to the writer, the file, the event
/// and the table (an `audit` payload does not open as a webhook's, nor the other way round).
pub fn webhook_row_aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + writer_id.len());
    aad.extend_from_slice(b"keygate-webhooks-row-v1\0");
    aad.extend_from_slice(writer_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&file_first_seq.to_be_bytes());
    aad.extend_from_slice(event_id.as_bytes());
    aad
}

/// Associated data of an `anomalies` row's payload: binds it to the writer, the file, the event
/// and the table (it opens as no other table's payload, and theirs not as its).
pub fn anomaly_row_aad(writer_id: &str, file_first_seq: u64, event_id: &uuid::Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + writer_id.len());
    aad.extend_from_slice(b"keygate-anomalies-row-v1\0");
    aad.extend_from_slice(writer_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&file_first_seq.to_be_bytes());
    aad.extend_from_slice(event_id.as_bytes());
    aad
}

/// Associated data of an intent's payload inside a WAL segment (never copied to the lake).
pub fn intent_aad(writer_id: &str, segno: u64, event_id: &uuid::Uuid) -> Vec<u8> {
    let mut aad = Vec::with_capacity(64 + writer_id.len());
    aad.extend_from_slice(b"keygate-audit-intent-v1\0");
    aad.extend_from_slice(writer_id.as_bytes());
    aad.push(0);
    aad.extend_from_slice(&segno.to_be_bytes());
    aad.extend_from_slice(event_id.as_bytes());
    aad
}

/// Text prefix of a signing key given as its 32-byte Ed25519 seed: `ed25519-seed:<64 hex>`.
pub const SEED_PREFIX: &str = "ed25519-seed:";
/// Text prefix of an Ed25519 public key: `ed25519-pub:<64 hex>`.
pub const PUBLIC_PREFIX: &str = "ed25519-pub:";

/// What a key's text says it is, decided by its encoding alone (never by trying to decode it as
/// one kind and then the other: about half of all random seeds are also valid public keys).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyEncoding {
    /// `-----BEGIN PRIVATE KEY-----` (PKCS#8): a signing key.
    PrivatePem,
    /// `-----BEGIN PUBLIC KEY-----` (SPKI): a public key.
    PublicPem,
    /// `ed25519-seed:<64 hex>`: a signing key.
    SeedPrefix,
    /// `ed25519-pub:<64 hex>`: a public key.
    PublicPrefix,
    /// 64 hex characters without a prefix (old quick-start folders, manifests): only the context
    /// (a signing-key setting, a public-key argument) says which it is.
    BareHex,
    /// Anything else (another PEM label, other text, a secret reference).
    Other,
}

impl KeyEncoding {
    /// The encoding of `text` (surrounding whitespace ignored).
    pub fn of(text: &str) -> KeyEncoding {
        let t = text.trim();
        if t.starts_with("-----BEGIN PRIVATE KEY-----") {
            KeyEncoding::PrivatePem
        } else if t.starts_with("-----BEGIN PUBLIC KEY-----") {
            KeyEncoding::PublicPem
        } else if t.starts_with(SEED_PREFIX) {
            KeyEncoding::SeedPrefix
        } else if t.starts_with(PUBLIC_PREFIX) {
            KeyEncoding::PublicPrefix
        } else if t.len() == 64 && t.bytes().all(|b| b.is_ascii_hexdigit()) {
            KeyEncoding::BareHex
        } else {
            KeyEncoding::Other
        }
    }

    /// True for the encodings that say "signing key" by themselves.
    pub fn is_signing(self) -> bool {
        matches!(self, KeyEncoding::PrivatePem | KeyEncoding::SeedPrefix)
    }

    /// True for the encodings that say "public key" by themselves.
    pub fn is_public(self) -> bool {
        matches!(self, KeyEncoding::PublicPem | KeyEncoding::PublicPrefix)
    }
}

fn hex32(text: &str, what: &str) -> Result<Zeroizing<[u8; 32]>, AuditError> {
    let mut raw = Zeroizing::new([0u8; 32]);
    let t = text.trim();
    if t.len() != 64 || hex::decode_to_slice(t, &mut raw[..]).is_err() {
        return Err(AuditError::Signing(format!("{what} must be followed by 64 hex characters (32 bytes)")));
    }
    Ok(raw)
}

/// The Ed25519 key that signs manifests.
#[derive(Clone)]
pub struct SigningKey {
    key: ed25519_dalek::SigningKey,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SigningKey(public {})", self.public_key_hex())
    }
}

impl SigningKey {
    /// Parses a signing key where one is expected: a PKCS#8 PEM private key (`-----BEGIN PRIVATE
    /// KEY-----`, as `openssl genpkey -algorithm ed25519` and `auditlog keygen` write), a seed as
    /// `ed25519-seed:<64 hex>`, or 64 bare hex characters, read as a seed because a signing key
    /// is what the context asks for (the format of older quick-start folders). A public key
    /// (PEM or `ed25519-pub:`) is refused.
    pub fn from_text(text: &str) -> Result<SigningKey, AuditError> {
        use ed25519_dalek::pkcs8::DecodePrivateKey;
        let t = text.trim();
        match KeyEncoding::of(t) {
            KeyEncoding::PrivatePem => {
                let key = ed25519_dalek::SigningKey::from_pkcs8_pem(t)
                    .map_err(|_| AuditError::Signing("the PEM is not a PKCS#8 Ed25519 private key".into()))?;
                Ok(SigningKey { key })
            }
            KeyEncoding::SeedPrefix => {
                let seed = hex32(&t[SEED_PREFIX.len()..], SEED_PREFIX)?;
                Ok(SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&seed) })
            }
            KeyEncoding::BareHex => {
                let seed = hex32(t, "a bare signing seed")?;
                Ok(SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&seed) })
            }
            KeyEncoding::PublicPem | KeyEncoding::PublicPrefix => Err(AuditError::Signing(
                "this is a public key, but a signing (private) key is needed here: a PKCS#8 PEM private key or ed25519-seed:<64 hex>".into(),
            )),
            KeyEncoding::Other => Err(AuditError::Signing(
                "the signing key must be a PKCS#8 PEM Ed25519 private key (`-----BEGIN PRIVATE KEY-----`) or ed25519-seed:<64 hex>; generate one with `auditlog keygen` or `openssl genpkey -algorithm ed25519`".into(),
            )),
        }
    }

    /// A fresh random key (tests, first-run tooling).
    pub fn generate() -> SigningKey {
        let seed = Zeroizing::new(rand::random::<[u8; 32]>());
        SigningKey { key: ed25519_dalek::SigningKey::from_bytes(&seed) }
    }

    /// The public half.
    pub fn verifying_key(&self) -> VerifyingKey {
        VerifyingKey { key: self.key.verifying_key() }
    }

    /// Hex of the public key, the `signing_key_id` written into manifests.
    pub fn public_key_hex(&self) -> String {
        hex::encode(self.key.verifying_key().as_bytes())
    }

    /// The key as `ed25519-seed:<64 hex>` (secret: store it in a secret store only).
    pub fn to_seed_text(&self) -> Zeroizing<String> {
        let seed = Zeroizing::new(self.key.to_bytes());
        Zeroizing::new(format!("{SEED_PREFIX}{}", hex::encode(seed.as_ref())))
    }

    /// The key as a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----`; secret).
    pub fn to_pkcs8_pem(&self) -> Result<Zeroizing<String>, AuditError> {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        self.key
            .to_pkcs8_pem(Default::default())
            .map(|pem| Zeroizing::new(pem.to_string()))
            .map_err(|e| AuditError::Signing(format!("cannot encode the signing key as PEM: {e}")))
    }

    /// Signs `message`.
    pub fn sign(&self, message: &[u8]) -> [u8; 64] {
        use ed25519_dalek::Signer;
        self.key.sign(message).to_bytes()
    }
}

/// An Ed25519 public key that manifests are checked against.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct VerifyingKey {
    key: ed25519_dalek::VerifyingKey,
}

impl std::fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "VerifyingKey({})", self.to_hex())
    }
}

impl VerifyingKey {
    /// Parses a public key where one is expected: a `-----BEGIN PUBLIC KEY-----` PEM (SPKI),
    /// `ed25519-pub:<64 hex>`, or 64 bare hex characters, read as a public key because that is
    /// what the context asks for. A signing key (PKCS#8 PEM or `ed25519-seed:`) is refused: its
    /// public half is derived only where a signing key is explicitly expected.
    pub fn from_text(text: &str) -> Result<VerifyingKey, AuditError> {
        use ed25519_dalek::pkcs8::DecodePublicKey;
        let t = text.trim();
        match KeyEncoding::of(t) {
            KeyEncoding::PublicPem => {
                let key = ed25519_dalek::VerifyingKey::from_public_key_pem(t)
                    .map_err(|_| AuditError::Signing("the PEM is not an Ed25519 public key".into()))?;
                Ok(VerifyingKey { key })
            }
            KeyEncoding::PublicPrefix => VerifyingKey::from_hex(&t[PUBLIC_PREFIX.len()..]),
            KeyEncoding::BareHex => VerifyingKey::from_hex(t),
            KeyEncoding::PrivatePem | KeyEncoding::SeedPrefix => Err(AuditError::Signing(
                "this is a signing (private) key, but a public key is expected here: give its public key (ed25519-pub:<64 hex> or a PUBLIC KEY PEM), or name the signing key where one is expected (auditlog verify --signing-key)".into(),
            )),
            KeyEncoding::Other => Err(AuditError::Signing(
                "a public key is ed25519-pub:<64 hex>, a `-----BEGIN PUBLIC KEY-----` PEM, or 64 hex characters".into(),
            )),
        }
    }

    /// Parses 64 hex characters as a public key (the `signing_key` field of manifests).
    pub fn from_hex(text: &str) -> Result<VerifyingKey, AuditError> {
        let mut raw = [0u8; 32];
        let t = text.trim();
        if t.len() != 64 || hex::decode_to_slice(t, &mut raw).is_err() {
            return Err(AuditError::Signing("a public key is 64 hex characters (32 bytes)".into()));
        }
        let key = ed25519_dalek::VerifyingKey::from_bytes(&raw)
            .map_err(|_| AuditError::Signing("not a valid Ed25519 public key".into()))?;
        Ok(VerifyingKey { key })
    }

    pub fn to_hex(&self) -> String {
        hex::encode(self.key.as_bytes())
    }

    /// The key as `ed25519-pub:<64 hex>`.
    pub fn to_text(&self) -> String {
        format!("{PUBLIC_PREFIX}{}", self.to_hex())
    }

    /// The key as a `-----BEGIN PUBLIC KEY-----` PEM (SPKI).
    pub fn to_public_pem(&self) -> Result<String, AuditError> {
        use ed25519_dalek::pkcs8::EncodePublicKey;
        self.key
            .to_public_key_pem(Default::default())
            .map_err(|e| AuditError::Signing(format!("cannot encode the public key as PEM: {e}")))
    }

    /// True when `signature` is this key's signature of `message`.
    pub fn verify(&self, message: &[u8], signature: &[u8]) -> bool {
        let Ok(sig) = ed25519_dalek::Signature::from_slice(signature) else {
            return false;
        };
        self.key.verify_strict(message, &sig).is_ok()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    const KEK_HEX: &str = "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f";

    #[tokio::test]
    async fn local_kek_wraps_and_unwraps_and_rejects_other_keys() {
        let kek = LocalKek::from_text(KEK_HEX).unwrap();
        let other = LocalKek::from_text(&"11".repeat(32)).unwrap();
        assert_ne!(kek.key_id(), other.key_id());
        let dek = [7u8; 32];
        let wrapped = kek.wrap(&dek).await.unwrap();
        assert_eq!(*kek.unwrap(&wrapped).await.unwrap(), dek);
        assert!(other.unwrap(&wrapped).await.is_err());
        assert!(!wrapped.windows(32).any(|w| w == dek));
    }

    #[test]
    fn local_kek_accepts_hex_and_base64_only_of_32_bytes() {
        let b64 = base64::engine::general_purpose::STANDARD.encode([1u8; 32]);
        assert!(LocalKek::from_text(&b64).is_ok());
        assert_eq!(
            LocalKek::from_text(&"01".repeat(32)).unwrap().key_id(),
            LocalKek::from_text(&b64).unwrap().key_id()
        );
        assert!(LocalKek::from_text("abcd").is_err());
        let err = LocalKek::from_text(&"zz".repeat(32)).unwrap_err().to_string();
        assert!(!err.contains("zzzz"), "error must not echo key material: {err}");
    }

    #[test]
    fn sealed_payloads_are_bound_to_their_row_and_never_reuse_a_nonce() {
        let (mut dk, _) = DataKey::generate().unwrap();
        let e1 = uuid::Uuid::now_v7();
        let e2 = uuid::Uuid::now_v7();
        let a = dk.seal(&row_aad("w", 1, &e1), b"hello").unwrap();
        let b = dk.seal(&row_aad("w", 1, &e1), b"hello").unwrap();
        assert_ne!(a[1..13], b[1..13], "nonces differ");
        assert_eq!(dk.open(&row_aad("w", 1, &e1), &a).unwrap(), b"hello");
        assert!(dk.open(&row_aad("w", 1, &e2), &a).is_err(), "moved to another row");
        assert!(dk.open(&row_aad("w", 2, &e1), &a).is_err(), "moved to another file");
        let mut flipped = a.clone();
        flipped[20] ^= 1;
        assert!(dk.open(&row_aad("w", 1, &e1), &flipped).is_err());
    }

    #[test]
    fn signing_key_from_seed_and_pem_and_verify() {
        use ed25519_dalek::pkcs8::EncodePrivateKey;
        let seed = "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60";
        let k = SigningKey::from_text(seed).unwrap();
        // RFC 8032 test vector 1.
        assert_eq!(k.public_key_hex(), "d75a980182b10ab7d54bfed3c964073a0ee172f3daa62325af021a68f707511a");
        let pem = k.key.to_pkcs8_pem(Default::default()).unwrap();
        let k2 = SigningKey::from_text(&pem).unwrap();
        assert_eq!(k2.public_key_hex(), k.public_key_hex());
        let sig = k.sign(b"manifest");
        let vk = VerifyingKey::from_text(&k.public_key_hex()).unwrap();
        assert!(vk.verify(b"manifest", &sig));
        assert!(!vk.verify(b"manifest2", &sig));
        assert!(!format!("{k:?}").contains(seed));
    }
}
