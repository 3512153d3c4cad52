//! Signed checkpoints: a writer's Merkle tree head in the C2SP `tlog-checkpoint` format, signed
//! with the audit signing key as a C2SP `signed-note` (Ed25519, signature type 0x01).
//!
//! ```text
//! <origin>\n                     e.g. keygate.example/lake/audit/writer-1
//! <tree size>\n                  decimal, no leading zeros
//! <base64 root hash>\n
//! \n
//! — <key name> <base64(key id || signature)>\n
//! ```
//!
//! The key name is the origin; the key id is the first four bytes of
//! `SHA-256(key name || 0x0A || 0x01 || public key)`; the signature covers the note text (the
//! first three lines, with their newlines).
//!
//! Where they are kept (create-only, never overwritten): in the lake beside the manifests,
//! `checkpoints/<table>/<writer>/<size:020>`, and in the publish store (`audit.checkpoints`),
//! same layout, which the writers can create in but not rewrite.
//!
//! Invariant: [`SignedCheckpoint::parse`] accepts exactly the bytes [`SignedCheckpoint::to_text`]
//! writes (a re-encoding check), so one changed byte anywhere is a parse or signature failure.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use sha2::{Digest, Sha256};

use bytes::Bytes;

use crate::config::CheckpointsConfig;
use crate::crypto::{SigningKey, VerifyingKey};
use crate::error::AuditError;
use crate::lake::{Lake, Put};
use crate::merkle::Hash;
use crate::table::Table;

/// The em dash and space that start a signature line.
const SIG_PREFIX: &str = "\u{2014} ";

/// A tree head.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub origin: String,
    pub size: u64,
    pub root: Hash,
}

/// A checkpoint with its signature line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedCheckpoint {
    pub checkpoint: Checkpoint,
    /// Key id (4 bytes) and Ed25519 signature (64 bytes).
    key_id: [u8; 4],
    signature: [u8; 64],
}

/// The origin of a writer's tree in a table: `<log name>/<table>/<writer>`.
pub fn origin(log_name: &str, table: Table, writer_id: &str) -> String {
    format!("{}/{}/{writer_id}", log_name.trim_end_matches('/'), table.name())
}

/// The default log name of a lake: its location without scheme, e.g. `bucket/prefix` for
/// `s3://bucket/prefix` or `var/lib/keygate/lake` for a folder.
pub fn default_log_name(lake: &str) -> String {
    let rest = lake.split_once("://").map_or(lake, |(_, r)| r);
    let name = rest.trim_matches('/');
    if name.is_empty() { "keygate-audit".to_owned() } else { name.to_owned() }
}

/// The C2SP signed-note key id of an Ed25519 key named `name`.
pub fn key_id(name: &str, key: &VerifyingKey) -> [u8; 4] {
    let mut h = Sha256::new();
    h.update(name.as_bytes());
    h.update([b'\n', 0x01]);
    h.update(public_bytes(key));
    let d = h.finalize();
    [d[0], d[1], d[2], d[3]]
}

fn public_bytes(key: &VerifyingKey) -> [u8; 32] {
    let mut raw = [0u8; 32];
    // `to_hex` is always 64 hex characters.
    let _ = hex::decode_to_slice(key.to_hex(), &mut raw);
    raw
}

/// The key in the C2SP `vkey` form (`<name>+<hex key id>+<base64(0x01 || key)>`), as Go's
/// `note` package and other signed-note tools take it.
pub fn vkey(name: &str, key: &VerifyingKey) -> String {
    let mut raw = vec![0x01];
    raw.extend(public_bytes(key));
    format!("{name}+{}+{}", hex::encode(key_id(name, key)), B64.encode(raw))
}

fn bad(what: &str) -> AuditError {
    AuditError::corrupt("checkpoint", what.to_owned())
}

impl Checkpoint {
    /// The note text: three lines, each ending in a newline.
    pub fn note_text(&self) -> String {
        format!("{}\n{}\n{}\n", self.origin, self.size, B64.encode(self.root))
    }

    /// Signs the checkpoint; the key name is the origin.
    pub fn sign(self, key: &SigningKey) -> SignedCheckpoint {
        let signature = key.sign(self.note_text().as_bytes());
        let key_id = key_id(&self.origin, &key.verifying_key());
        SignedCheckpoint { checkpoint: self, key_id, signature }
    }
}

impl SignedCheckpoint {
    /// The signed note as stored and served.
    pub fn to_text(&self) -> String {
        let mut sig = self.key_id.to_vec();
        sig.extend(self.signature);
        format!("{}\n{SIG_PREFIX}{} {}\n", self.checkpoint.note_text(), self.checkpoint.origin, B64.encode(sig))
    }

    /// Parses a signed checkpoint with exactly one signature line, by the origin's key name.
    pub fn parse(text: &str) -> Result<SignedCheckpoint, AuditError> {
        let (note, sigs) = text.split_once("\n\n").ok_or_else(|| bad("no blank line between note and signature"))?;
        let mut lines = note.split('\n');
        let (Some(origin), Some(size), Some(root), None) = (lines.next(), lines.next(), lines.next(), lines.next())
        else {
            return Err(bad("the note is not three lines (origin, size, root)"));
        };
        if origin.is_empty() {
            return Err(bad("empty origin"));
        }
        let size: u64 = size.parse().map_err(|_| bad("tree size is not a decimal number"))?;
        let root: Hash = B64
            .decode(root)
            .ok()
            .and_then(|r| r.try_into().ok())
            .ok_or_else(|| bad("root is not base64 of 32 bytes"))?;
        let line = sigs.strip_suffix('\n').ok_or_else(|| bad("signature line does not end in a newline"))?;
        let line = line.strip_prefix(SIG_PREFIX).ok_or_else(|| bad("signature line does not start with an em dash"))?;
        let (name, sig) = line.split_once(' ').ok_or_else(|| bad("signature line has no key name"))?;
        if name != origin {
            return Err(bad("the signature's key name is not the origin"));
        }
        let sig = B64.decode(sig).map_err(|_| bad("signature is not base64"))?;
        if sig.len() != 68 {
            return Err(bad("signature is not a 4-byte key id and a 64-byte Ed25519 signature"));
        }
        let mut key_id = [0u8; 4];
        key_id.copy_from_slice(&sig[..4]);
        let mut signature = [0u8; 64];
        signature.copy_from_slice(&sig[4..]);
        let parsed =
            SignedCheckpoint { checkpoint: Checkpoint { origin: origin.to_owned(), size, root }, key_id, signature };
        if parsed.to_text() != text {
            return Err(bad("not in canonical form"));
        }
        Ok(parsed)
    }

    /// True when the signature is `key`'s (key id and Ed25519 signature of the note text).
    pub fn verify(&self, key: &VerifyingKey) -> bool {
        self.key_id == key_id(&self.checkpoint.origin, key)
            && key.verify(self.checkpoint.note_text().as_bytes(), &self.signature)
    }

    /// True when some key of `keys` signed it.
    pub fn verify_any(&self, keys: &[VerifyingKey]) -> bool {
        keys.iter().any(|k| self.verify(k))
    }
}

/// Path of a checkpoint (in the lake and in the publish store):
/// `checkpoints/<table>/<writer>/<size:020>`.
pub fn checkpoint_path(table: Table, writer_id: &str, size: u64) -> object_store::path::Path {
    object_store::path::Path::from(format!("checkpoints/{}/{writer_id}/{size:020}", table.name()))
}

/// The newest checkpoint of each (table, writer) this process signed, shared with whoever serves
/// them (the proxy's admin listener).
pub type Latest = Arc<Mutex<BTreeMap<(Table, String), SignedCheckpoint>>>;

/// Signs and stores a writer's checkpoints: in the lake, in the publish store, and in memory.
#[derive(Debug, Clone)]
pub struct Publisher {
    /// Start of every origin.
    pub log_name: String,
    /// The second, create-only location (`audit.checkpoints.publish`).
    pub publish: Option<Lake>,
    /// Longest time between re-writes of the newest checkpoints while idle.
    pub interval: Duration,
    /// Longest one store operation may take (`audit.lake_timeout`): a hanging publish store must
    /// not hold up the shipper.
    pub timeout: Duration,
    /// The newest checkpoints.
    pub latest: Latest,
    /// Signed after a commit, not yet stored ([`Publisher::flush`]).
    pending: Arc<Mutex<Vec<(Table, String, SignedCheckpoint)>>>,
}

impl Publisher {
    /// From `audit.checkpoints` (already validated) for the lake at `lake`.
    pub fn open(
        config: &CheckpointsConfig,
        lake: &str,
        multipart_threshold: u64,
        timeout: Duration,
    ) -> Result<Publisher, AuditError> {
        let publish = match &config.publish {
            Some(p) => Some(Lake::open(p, &config.publish_s3, multipart_threshold)?),
            None => None,
        };
        Ok(Publisher {
            log_name: config.log_name_for(lake),
            publish,
            interval: config.interval,
            timeout,
            latest: Latest::default(),
            pending: Arc::default(),
        })
    }

    /// Signs the checkpoint of `writer_id`'s tree in `table` at `size` with `root`, remembers it
    /// as the newest and queues it for [`Publisher::flush`] (which the shipper calls once the
    /// file's commit is done, outside the commit's own time limit).
    pub fn committed(&self, key: &SigningKey, table: Table, writer_id: &str, size: u64, root: Hash) {
        let cp = Checkpoint { origin: origin(&self.log_name, table, writer_id), size, root }.sign(key);
        self.remember(table, writer_id, cp.clone());
        if let Ok(mut p) = self.pending.lock() {
            p.push((table, writer_id.to_owned(), cp));
        }
    }

    /// Stores every queued checkpoint in the lake and the publish store (see
    /// [`Publisher::store`]). One that fails is not queued again: the idle
    /// [`Publisher::republish`] retries the newest of each writer.
    pub async fn flush(&self, lake: &Lake) {
        let queued = self.pending.lock().map(|mut p| std::mem::take(&mut *p)).unwrap_or_default();
        for (table, writer, cp) in queued {
            self.store(lake, table, &writer, &cp).await;
        }
    }

    /// Remembers `cp` as the newest of its writer unless a larger one is known.
    pub fn remember(&self, table: Table, writer_id: &str, cp: SignedCheckpoint) {
        if let Ok(mut m) = self.latest.lock() {
            let slot = m.entry((table, writer_id.to_owned())).or_insert_with(|| cp.clone());
            if slot.checkpoint.size <= cp.checkpoint.size {
                *slot = cp;
            }
        }
    }

    /// Writes every newest checkpoint again (create-only: a no-op where it is already stored;
    /// retries a write that failed).
    pub async fn republish(&self, lake: &Lake) {
        let all: Vec<((Table, String), SignedCheckpoint)> =
            self.latest.lock().map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect()).unwrap_or_default();
        for ((table, writer), cp) in all {
            self.store(lake, table, &writer, &cp).await;
        }
    }

    /// Creates the checkpoint's object in the lake and in the publish store. Failures are logged
    /// and retried by the next [`Publisher::republish`]; they never hold up the WAL. An object
    /// already there with other bytes (a forked history) is logged as an error and left alone.
    pub async fn store(&self, lake: &Lake, table: Table, writer_id: &str, cp: &SignedCheckpoint) {
        let path = checkpoint_path(table, writer_id, cp.checkpoint.size);
        let text = Bytes::from(cp.to_text());
        for (place, store) in std::iter::once(("lake", lake)).chain(self.publish.iter().map(|p| ("publish store", p))) {
            let put = tokio::time::timeout(self.timeout, store.put_create(&path, text.clone())).await;
            match put {
                Ok(Ok(Put::Created)) => {}
                Ok(Ok(Put::AlreadyExists)) => match tokio::time::timeout(self.timeout, store.get(&path)).await {
                    Ok(Ok(Some(existing))) if existing == text => {}
                    Ok(Ok(_)) => {
                        tracing::error!(%path, %place, "a different checkpoint of this size is already stored: the writer's history was rewritten (fork); left as it is for auditlog verify --checkpoints")
                    }
                    Ok(Err(e)) => tracing::warn!(%path, %place, error = %e, "cannot read back an existing checkpoint"),
                    Err(_) => {
                        tracing::warn!(%path, %place, "no answer within audit.lake_timeout reading back a checkpoint")
                    }
                },
                Ok(Err(e)) => {
                    tracing::warn!(%path, %place, error = %e, "could not store the checkpoint; retried every audit.checkpoints.interval")
                }
                Err(_) => {
                    tracing::warn!(%path, %place, "no answer within audit.lake_timeout storing the checkpoint; retried every audit.checkpoints.interval")
                }
            }
        }
    }

    /// The newest checkpoints as served on the admin listener: `(table, writer, signed note)`.
    pub fn newest(&self) -> Vec<(Table, String, String)> {
        self.latest
            .lock()
            .map(|m| m.iter().map(|((t, w), cp)| (*t, w.clone(), cp.to_text())).collect())
            .unwrap_or_default()
    }
}

/// The largest valid checkpoint of `writer_id`'s tree in `table` in `store` whose size is in
/// `above..=at_most`: `(path, checkpoint)`. Reads from the largest down, so the cost does not
/// grow with the number of checkpoints kept.
pub async fn newest_in_range(
    store: &Lake,
    table: Table,
    writer_id: &str,
    above: u64,
    at_most: u64,
) -> Result<Option<(String, SignedCheckpoint)>, AuditError> {
    let mut sized: Vec<(u64, object_store::path::Path)> = store
        .list(&format!("checkpoints/{}/{writer_id}/", table.name()))
        .await?
        .into_iter()
        .filter_map(|o| Some((o.location.filename()?.parse::<u64>().ok()?, o.location)))
        .filter(|(size, _)| *size > above && *size <= at_most)
        .collect();
    sized.sort_by_key(|(size, _)| std::cmp::Reverse(*size));
    for (size, path) in sized {
        let Some(bytes) = store.get(&path).await? else { continue };
        if let Some(cp) = std::str::from_utf8(&bytes).ok().and_then(|t| SignedCheckpoint::parse(t).ok())
            && cp.checkpoint.size == size
        {
            return Ok(Some((path.to_string(), cp)));
        }
    }
    Ok(None)
}

/// A store's checkpoints by (table, writer), each list in size order: `(path, parsed or why not)`.
pub type CheckpointList = BTreeMap<(Table, String), Vec<(String, Result<SignedCheckpoint, String>)>>;

/// Every checkpoint of `store` (a lake or a publish store) by table and writer, in size order.
pub async fn list_checkpoints(store: &Lake) -> Result<CheckpointList, AuditError> {
    let mut out = CheckpointList::new();
    for o in store.list("checkpoints/").await? {
        let p = o.location.to_string();
        let parts: Vec<&str> = p.split('/').collect();
        let [_, table, writer, size] = parts.as_slice() else { continue };
        let Some(table) = Table::ALL.into_iter().find(|t| t.name() == *table) else { continue };
        if size.parse::<u64>().is_err() {
            continue;
        }
        let parsed = match store.get(&o.location).await? {
            Some(b) => std::str::from_utf8(&b)
                .map_err(|_| "not UTF-8".to_owned())
                .and_then(|t| SignedCheckpoint::parse(t).map_err(|e| e.to_string())),
            None => Err("listed but not readable".to_owned()),
        };
        out.entry((table, (*writer).to_owned())).or_default().push((p, parsed));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn a_signed_checkpoint_round_trips_and_any_flipped_byte_fails() {
        let key = SigningKey::generate();
        let cp = Checkpoint { origin: origin("bucket/lake", Table::Audit, "w-1"), size: 42, root: [7; 32] }.sign(&key);
        let text = cp.to_text();
        assert!(text.starts_with("bucket/lake/audit/w-1\n42\n"));
        let parsed = SignedCheckpoint::parse(&text).unwrap();
        assert!(parsed.verify(&key.verifying_key()));
        assert!(!parsed.verify(&SigningKey::generate().verifying_key()));
        let bytes = text.as_bytes();
        for i in 0..bytes.len() {
            let mut b = bytes.to_vec();
            b[i] ^= 1;
            let ok = std::str::from_utf8(&b)
                .ok()
                .and_then(|t| SignedCheckpoint::parse(t).ok())
                .is_some_and(|c| c.verify(&key.verifying_key()));
            assert!(!ok, "byte {i} flipped still verifies");
        }
    }

    #[test]
    fn key_id_and_vkey_follow_the_signed_note_spec() {
        let key = SigningKey::from_text(&format!("ed25519-seed:{}", "01".repeat(32))).unwrap();
        let v = vkey("example.com/log", &key.verifying_key());
        let parts: Vec<&str> = v.split('+').collect();
        assert_eq!(parts[0], "example.com/log");
        assert_eq!(parts[1].len(), 8);
        assert_eq!(B64.decode(parts[2]).unwrap()[0], 1);
        assert_eq!(default_log_name("s3://b/p/"), "b/p");
        assert_eq!(default_log_name("/var/lake"), "var/lake");
    }
}
