//! This machine's fsync latency where the WAL lives: the floor under `durability: sync`.
//!
//! The loop mimics the WAL's writer: append a block to a file, then `fdatasync` (Rust's
//! `sync_data`), one sample per append. Appends grow the file, so every sync also commits the new
//! size, as the WAL's do.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use crate::error::BenchError;

/// fsync latency on one filesystem.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FsyncStats {
    /// The folder measured (the WAL's folder in the benchmark).
    pub dir: String,
    /// Its filesystem, from /proc/mounts.
    pub filesystem: String,
    pub samples: u64,
    pub block_bytes: usize,
    pub p50_us: f64,
    pub p99_us: f64,
    pub p999_us: f64,
    pub max_us: f64,
}

/// Appends `samples` blocks of `block_bytes` to a scratch file in `dir`, each followed by
/// `fdatasync`, and reports the sync latencies. The file is removed afterwards.
pub fn measure(dir: &Path, samples: u64, block_bytes: usize) -> Result<FsyncStats, BenchError> {
    std::fs::create_dir_all(dir).map_err(|e| BenchError::io("create the fsync folder", dir, e))?;
    let path = dir.join(format!("fsync-probe-{}.bin", std::process::id()));
    let mut file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(&path)
        .map_err(|e| BenchError::io("create the fsync probe file", &path, e))?;
    let block = vec![0x5a_u8; block_bytes];
    let mut histogram: Histogram<u64> =
        Histogram::new_with_bounds(1, 60_000_000, 3).map_err(|e| BenchError::Invalid(format!("histogram: {e}")))?;
    let result = (|| {
        for _ in 0..samples {
            file.write_all(&block).map_err(|e| BenchError::io("write the fsync probe file", &path, e))?;
            let started = Instant::now();
            file.sync_data().map_err(|e| BenchError::io("fdatasync the probe file", &path, e))?;
            let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX).clamp(1, 60_000_000);
            let _ = histogram.record(micros);
        }
        Ok::<(), BenchError>(())
    })();
    let _ = std::fs::remove_file(&path);
    result?;
    Ok(FsyncStats {
        dir: dir.display().to_string(),
        filesystem: crate::procstat::filesystem_of(dir),
        samples: histogram.len(),
        block_bytes,
        p50_us: histogram.value_at_quantile(0.5) as f64,
        p99_us: histogram.value_at_quantile(0.99) as f64,
        p999_us: histogram.value_at_quantile(0.999) as f64,
        max_us: histogram.max() as f64,
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn measures_every_sample_and_cleans_up() {
        let dir = tempfile::tempdir().expect("temp dir");
        let stats = super::measure(dir.path(), 20, 4096).expect("measure");
        assert_eq!(stats.samples, 20);
        assert!(stats.p50_us <= stats.p99_us && stats.p99_us <= stats.max_us);
        assert_ne!(stats.filesystem, "unknown");
        assert_eq!(std::fs::read_dir(dir.path()).expect("read dir").count(), 0, "probe file left behind");
    }
}
