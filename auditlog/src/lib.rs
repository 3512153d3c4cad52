//! keygate's audit log: every request-response pair that crosses keygate becomes one row of an
//! append-only, encrypted Parquet lake, and no response reaches a client before its row is
//! durable.
//!
//! Pipeline: [`Exchange`] → [`redact`] (one list of what is never recorded) → zstd → AES-256-GCM
//! under a per-segment data key wrapped by a [`KeyEncryptionKey`] → write-ahead log ([`wal`]:
//! CRC-framed segments, group commit, recovery) → lake shipper (one Parquet file per segment via
//! `object_store`, create-only, Hive layout) → signed [`manifest`] per file, which also carries the
//! writer's RFC 6962 Merkle tree ([`merkle`]) → a signed C2SP checkpoint ([`checkpoint`]) in the
//! lake and in a second, create-only place. [`verify`] checks the hash chain, the files, the
//! manifests and the checkpoints; [`proof`] proves one row against a checkpoint; [`query`] runs
//! SQL over the lake.
//!
//! Three tables share that path: `audit` (egress exchanges), `webhooks` (Stripe webhook events
//! received and delivered, [`webhook`]) and `anomalies` (the anomaly detectors' alerts and
//! shadow records, [`anomaly`]); see [`table`].
//!
//! Invariants held across modules: nothing unredacted touches disk; nothing is acknowledged
//! before it is durable; a WAL segment is deleted only after its file and manifest are committed;
//! lake objects are never overwritten.

pub mod anomaly;
pub mod checkpoint;
pub mod config;
pub mod crypto;
pub mod dict;
pub mod error;
pub mod exchange;
pub mod keys;
pub mod lake;
pub mod lake_faults;
mod log;
pub mod manifest;
pub mod merkle;
pub mod metrics;
pub mod parquet_io;
pub mod payload;
pub mod prep;
pub mod proof;
#[cfg(feature = "query")]
pub mod query;
pub mod redact;
pub mod row;
pub mod shipper;
pub mod table;
pub mod verify;
pub mod wal;
pub mod webhook;

pub use config::{AuditConfig, CheckpointsConfig, Durability, RollConfig, S3Config};
pub use crypto::{KekRing, KeyEncryptionKey, LocalKek, SigningKey, VerifyingKey};
pub use error::AuditError;
pub use exchange::{Exchange, HttpMessage, IntentId, Outcome};
pub use keys::TransitKek;
pub use log::AuditLog;
pub use table::Table;
pub use wal::frame::{MAX_AUDITED_EXCHANGE_BYTES, MAX_FRAME_BODY};
pub use webhook::{WebhookKind, WebhookRecord};
