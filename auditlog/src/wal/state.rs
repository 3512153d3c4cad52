//! Small files beside the segments: the lock that keeps one process per WAL folder, this
//! writer's id, and the chain position left by the last shipped segment.
//!
//! Invariant: `chain-head.json` is replaced atomically (write, fsync, rename, fsync folder) before
//! the segment it describes is deleted, so the chain position is never lost when the WAL is
//! empty.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::AuditError;
use crate::wal::segment::{ChainPos, hex_32};

/// Where the next segment continues the chains (`audit`'s at the top level, for files written
/// before the `webhooks` table existed; each later table under its own key, absent from older
/// files).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ChainHead {
    pub writer_id: String,
    pub next_seq: u64,
    #[serde(with = "hex_32")]
    pub head: [u8; 32],
    pub next_segno: u64,
    /// Where the `webhooks` chain continues (absent in older files: it starts at seq 1).
    #[serde(default)]
    pub webhooks: crate::wal::segment::ChainPos,
    /// Where the `anomalies` chain continues (absent in older files: it starts at seq 1).
    #[serde(default)]
    pub anomalies: crate::wal::segment::ChainPos,
}

impl ChainHead {
    /// The head of `writer_id` whose next segment is `next_segno`, with every table's chain
    /// position (by [`crate::Table::index`]).
    pub fn new(writer_id: String, next_segno: u64, chains: [ChainPos; crate::Table::COUNT]) -> ChainHead {
        let [audit, webhooks, anomalies] = chains;
        ChainHead { writer_id, next_seq: audit.next_seq, head: audit.head, next_segno, webhooks, anomalies }
    }

    /// Every table's chain position, by [`crate::Table::index`].
    pub fn chains(&self) -> [ChainPos; crate::Table::COUNT] {
        [ChainPos { next_seq: self.next_seq, head: self.head }, self.webhooks, self.anomalies]
    }
}

const LOCK: &str = "LOCK";
const WRITER_ID: &str = "writer-id";
const CHAIN_HEAD: &str = "chain-head.json";

/// Holds the folder's lock for as long as it lives.
#[derive(Debug)]
pub struct DirLock {
    _file: File,
}

/// Creates the folder if needed and takes its lock.
pub fn lock_dir(dir: &Path) -> Result<DirLock, AuditError> {
    std::fs::create_dir_all(dir).map_err(|e| AuditError::io("create WAL folder", dir, e))?;
    let path = dir.join(LOCK);
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| AuditError::io("open WAL lock", &path, e))?;
    match file.try_lock() {
        Ok(()) => Ok(DirLock { _file: file }),
        Err(std::fs::TryLockError::WouldBlock) => Err(AuditError::Config(format!(
            "WAL folder {} is in use by another keygate process; give each instance its own audit.wal_dir",
            dir.display()
        ))),
        Err(std::fs::TryLockError::Error(e)) => Err(AuditError::io("lock WAL folder", &path, e)),
    }
}

/// The writer id: the configured one, else the one kept in the folder, else a new one
/// (hostname and a random suffix), which is then kept.
pub fn writer_id(dir: &Path, configured: Option<&str>) -> Result<(String, bool), AuditError> {
    let path = dir.join(WRITER_ID);
    let stored = match std::fs::read_to_string(&path) {
        Ok(s) => Some(s.trim().to_owned()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => return Err(AuditError::io("read writer id", &path, e)),
    };
    if let Some(id) = configured {
        if let Some(stored) = &stored
            && stored != id
        {
            return Err(AuditError::Config(format!(
                "WAL folder {} belongs to writer `{stored}` but audit.writer_id is `{id}`: ship or move that WAL before changing the id",
                dir.display()
            )));
        }
        if stored.is_none() {
            write_atomic(dir, WRITER_ID, id.as_bytes())?;
        }
        return Ok((id.to_owned(), true));
    }
    if let Some(id) = stored {
        return Ok((id, false));
    }
    let id = format!("{}-{}", sanitized_hostname(), hex::encode(rand::random::<[u8; 4]>()));
    write_atomic(dir, WRITER_ID, id.as_bytes())?;
    Ok((id, false))
}

fn sanitized_hostname() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .or_else(|_| std::fs::read_to_string("/etc/hostname"))
        .unwrap_or_default();
    let cleaned: String = raw
        .trim()
        .chars()
        .map(|c| if c.is_ascii_alphanumeric() || c == '.' { c.to_ascii_lowercase() } else { '.' })
        .collect();
    if cleaned.is_empty() { "keygate".to_owned() } else { cleaned }
}

/// The chain head left by the last shipped segment, if any.
pub fn read_chain_head(dir: &Path) -> Result<Option<ChainHead>, AuditError> {
    let path = dir.join(CHAIN_HEAD);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| AuditError::corrupt(path.display().to_string(), e.to_string())),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(AuditError::io("read chain head", path, e)),
    }
}

/// Replaces the chain head file atomically.
pub fn write_chain_head(dir: &Path, head: &ChainHead) -> Result<(), AuditError> {
    let json = serde_json::to_vec_pretty(head).map_err(|e| AuditError::corrupt("chain head", e.to_string()))?;
    write_atomic(dir, CHAIN_HEAD, &json)
}

fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> Result<(), AuditError> {
    let tmp: PathBuf = dir.join(format!("{name}.tmp"));
    let dest = dir.join(name);
    (|| {
        let mut f = File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        std::fs::rename(&tmp, &dest)?;
        File::open(dir)?.sync_all()
    })()
    .map_err(|e| AuditError::io("write", &dest, e))
}

/// fsyncs a folder (after creating or deleting files in it).
pub fn sync_dir(dir: &Path) -> Result<(), AuditError> {
    File::open(dir).and_then(|f| f.sync_all()).map_err(|e| AuditError::io("fsync folder", dir, e))
}
