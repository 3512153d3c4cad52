//! The WAL's disk fails: full (a small tmpfs) or read-only. keygate must refuse records with
//! errors that are `is_unavailable()` (the proxy answers 503 and forwards nothing), say so in
//! readiness, and resume by itself when space returns, losing none of the records it accepted.
//! These tests mount tmpfs file systems, so they run as root (as CI does).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use common::*;

/// A tmpfs mounted for the test, unmounted on drop.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, options: &str) -> Tmpfs {
        std::fs::create_dir_all(at).unwrap();
        let out = Command::new("mount").args(["-t", "tmpfs", "-o", options, "tmpfs"]).arg(at).output().unwrap();
        assert!(
            out.status.success(),
            "these tests need to mount a tmpfs (run as root, as CI does): {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs(at.to_path_buf())
    }

    fn remount(&self, options: &str) {
        let out = Command::new("mount").args(["-o", &format!("remount,{options}")]).arg(&self.0).output().unwrap();
        assert!(out.status.success(), "remount failed: {}", String::from_utf8_lossy(&out.stderr));
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_wal_disk_fails_closed_and_recovers_when_space_returns() {
    let env = env();
    let mnt = Tmpfs::mount(&env.dir.path().join("walfs"), "size=96k");
    let mut cfg = env.cfg.clone();
    cfg.wal_dir = mnt.0.join("wal");
    let log = env.open_cfg(&cfg).await;
    let mut accepted = Vec::new();
    let mut refused = None;
    for i in 0..2000 {
        let ex = exchange(i);
        let id = ex.event_id;
        match log.record(ex, None).await {
            Ok(()) => accepted.push(id),
            Err(e) => {
                refused = Some(e);
                break;
            }
        }
    }
    let err = refused.expect("a full disk stops records");
    assert!(err.is_unavailable(), "{err}");
    assert!(!accepted.is_empty());
    let reason = log.is_ready().unwrap_err();
    assert!(reason.contains("not writable"), "{reason}");
    // Still refused while the disk is full.
    assert!(log.record(exchange(5000), None).await.unwrap_err().is_unavailable());

    mnt.remount("size=16m");
    let mut resumed = false;
    for i in 0..200 {
        let ex = exchange(6000 + i);
        let id = ex.event_id;
        if log.record(ex, None).await.is_ok() {
            accepted.push(id);
            resumed = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(resumed, "records are accepted again once space returns");
    assert!(log.is_ready().is_ok());
    log.shutdown().await.unwrap();

    let rows = read_lake(&open_lake(&env.lake_dir())).await;
    let got: Vec<_> = rows.iter().map(|r| r.row.columns.event_id).collect();
    assert_eq!(got, accepted, "every accepted record once, in order; no refused one");
    assert_chains(&rows);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_only_wal_folder_refuses_to_open_with_an_unavailable_error() {
    let env = env();
    let mnt = Tmpfs::mount(&env.dir.path().join("rofs"), "size=1m");
    std::fs::create_dir_all(mnt.0.join("wal")).unwrap();
    mnt.remount("ro");
    let mut cfg = env.cfg.clone();
    cfg.wal_dir = mnt.0.join("wal");
    let err = keygate_auditlog::AuditLog::open(&cfg, env.kek.clone(), env.signing.clone()).await.unwrap_err();
    assert!(err.is_unavailable(), "{err}");
    assert!(err.to_string().contains("wal"), "names the folder: {err}");
    // Writable again: it opens and records.
    mnt.remount("rw");
    let log = env.open_cfg(&cfg).await;
    log.record(exchange(1), None).await.unwrap();
    log.shutdown().await.unwrap();
    assert_eq!(read_lake(&open_lake(&env.lake_dir())).await.len(), 1);
}
