//! The crate's one error type.

use std::path::PathBuf;

/// What can go wrong in keygate-detectors: a configuration that does not hold together, or the
/// state file.
#[derive(Debug, thiserror::Error)]
pub enum DetectorError {
    /// A configuration value is out of range; the message names the key and the accepted range.
    #[error("anomalies configuration: {0}")]
    Config(String),
    /// The state file could not be read or written.
    #[error("anomaly detector state file {path}: {source}")]
    StateIo {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The state file exists but is not a state this version can read.
    #[error("anomaly detector state file {path} is not readable ({detail}); move it aside to start learning afresh")]
    StateFormat { path: PathBuf, detail: String },
}
