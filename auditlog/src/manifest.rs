//! Per-file manifests, in the spirit of CloudTrail digest files: what a lake file must contain,
//! where it sits in its writer's chain, and the previous manifest's hash, signed with Ed25519.
//!
//! Invariant: the signature covers a fixed domain tag and the JSON of every field but the
//! signature, in declaration order; re-serialising a parsed manifest yields the signed bytes.

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::crypto::{SigningKey, VerifyingKey};
use crate::error::AuditError;

const DOMAIN: &[u8] = b"keygate-audit-manifest-v1\0";

/// The signed part of a manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ManifestBody {
    pub version: u32,
    /// The table of the file: absent for `audit` (as in manifests written before there were
    /// other tables, whose signed bytes must not change), `webhooks` for that table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    pub writer_id: String,
    /// The data file's path inside the lake.
    pub file: String,
    pub file_sha256: String,
    pub file_bytes: u64,
    pub row_count: u64,
    pub first_seq: u64,
    pub last_seq: u64,
    pub chain_head_in: String,
    pub chain_head_out: String,
    /// SHA-256 of the writer's previous manifest file; `None` for its first.
    pub prev_manifest_sha256: Option<String>,
    pub received_at_min_us: i64,
    pub received_at_max_us: i64,
    pub kek_id: String,
    /// Hex of the Ed25519 public key that signed this manifest.
    pub signing_key: String,
    /// The writer's Merkle tree in this table after this file ([`crate::merkle`]): absent in
    /// manifests written before there were trees (whose signed bytes must not change).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tree: Option<TreeState>,
}

/// A writer's Merkle tree after a file: size, root and the frontier to continue it from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeState {
    /// Leaves: the writer's rows of this table up to and including this file.
    pub size: u64,
    /// Hex RFC 6962 root.
    pub root: String,
    /// Hex roots of the perfect subtrees covering the tree, largest first.
    pub frontier: Vec<String>,
}

impl TreeState {
    /// The state of a frontier.
    pub fn of(f: &crate::merkle::Frontier) -> TreeState {
        TreeState { size: f.size(), root: hex::encode(f.root()), frontier: f.nodes().iter().map(hex::encode).collect() }
    }

    /// The frontier it describes, checked against its size and root.
    pub fn frontier(&self) -> Option<crate::merkle::Frontier> {
        let nodes = self
            .frontier
            .iter()
            .map(|h| {
                let mut out = [0u8; 32];
                hex::decode_to_slice(h, &mut out).ok().map(|()| out)
            })
            .collect::<Option<Vec<_>>>()?;
        let f = crate::merkle::Frontier::from_parts(self.size, nodes)?;
        (hex::encode(f.root()) == self.root).then_some(f)
    }
}

/// A manifest file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    #[serde(flatten)]
    pub body: ManifestBody,
    /// Hex Ed25519 signature.
    pub signature: String,
}

fn signed_bytes(body: &ManifestBody) -> Result<Vec<u8>, AuditError> {
    let mut out = DOMAIN.to_vec();
    out.extend(serde_json::to_vec(body).map_err(|e| AuditError::corrupt("manifest", e.to_string()))?);
    Ok(out)
}

impl Manifest {
    /// Signs `body`.
    pub fn sign(body: ManifestBody, key: &SigningKey) -> Result<Manifest, AuditError> {
        let sig = key.sign(&signed_bytes(&body)?);
        Ok(Manifest { body, signature: hex::encode(sig) })
    }

    /// The file's bytes.
    pub fn to_bytes(&self) -> Result<Vec<u8>, AuditError> {
        let mut v = serde_json::to_vec_pretty(self).map_err(|e| AuditError::corrupt("manifest", e.to_string()))?;
        v.push(b'\n');
        Ok(v)
    }

    /// Parses a manifest file.
    pub fn parse(bytes: &[u8]) -> Result<Manifest, AuditError> {
        serde_json::from_slice(bytes).map_err(|e| AuditError::corrupt("manifest", e.to_string()))
    }

    /// True when the signature is `key`'s.
    pub fn signature_valid(&self, key: &VerifyingKey) -> bool {
        let Ok(sig) = hex::decode(&self.signature) else { return false };
        signed_bytes(&self.body).map(|m| key.verify(&m, &sig)).unwrap_or(false)
    }
}

/// Hex SHA-256.
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn body() -> ManifestBody {
        ManifestBody {
            version: 1,
            table: None,
            writer_id: "w".into(),
            file: "audit/dt=2026-01-01/hour=00/w-1.parquet".into(),
            file_sha256: "00".repeat(32),
            file_bytes: 10,
            row_count: 2,
            first_seq: 1,
            last_seq: 2,
            chain_head_in: "00".repeat(32),
            chain_head_out: "11".repeat(32),
            prev_manifest_sha256: None,
            received_at_min_us: 0,
            received_at_max_us: 1,
            kek_id: "local:x".into(),
            signing_key: String::new(),
            tree: None,
        }
    }

    #[test]
    fn signature_survives_a_round_trip_and_breaks_on_any_change() {
        let key = SigningKey::generate();
        let m = Manifest::sign(body(), &key).unwrap();
        let parsed = Manifest::parse(&m.to_bytes().unwrap()).unwrap();
        assert!(parsed.signature_valid(&key.verifying_key()));
        let mut changed = parsed.clone();
        changed.body.row_count = 3;
        assert!(!changed.signature_valid(&key.verifying_key()));
        assert!(!parsed.signature_valid(&SigningKey::generate().verifying_key()));
    }

    #[test]
    fn a_manifest_without_tree_keeps_its_bytes_and_one_with_a_tree_round_trips() {
        let key = SigningKey::generate();
        let old = Manifest::sign(body(), &key).unwrap();
        assert!(!String::from_utf8(old.to_bytes().unwrap()).unwrap().contains("tree"));
        let mut f = crate::merkle::Frontier::new();
        for i in 0..5u8 {
            f.push_row(&[i; 32]);
        }
        let with = Manifest::sign(ManifestBody { tree: Some(TreeState::of(&f)), ..body() }, &key).unwrap();
        let parsed = Manifest::parse(&with.to_bytes().unwrap()).unwrap();
        assert!(parsed.signature_valid(&key.verifying_key()));
        assert_eq!(parsed.body.tree.as_ref().unwrap().frontier(), Some(f));
    }
}
