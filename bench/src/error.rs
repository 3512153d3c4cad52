//! The harness's error type: every failure says what was being done and what to check.

use std::path::PathBuf;

/// Errors of the benchmark harness, its fake upstream and its load generator.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    /// A file or socket operation failed.
    #[error("{what} ({path}): {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A network operation failed.
    #[error("{what}: {source}")]
    Net {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// An HTTP exchange failed at the protocol level.
    #[error("{what}: {source}")]
    Http {
        what: String,
        #[source]
        source: hyper::Error,
    },
    /// TLS setup failed (certificate generation, PEM parsing, rustls configuration).
    #[error("TLS setup: {0}")]
    Tls(String),
    /// A process of the benchmark (keygate, nginx, the upstream, the load generator) could not be
    /// started, did not come up, or failed.
    #[error("{0}")]
    Process(String),
    /// A command-line value or an output could not be understood.
    #[error("{0}")]
    Invalid(String),
    /// JSON output of a benchmark process could not be parsed.
    #[error("{what}: {source}")]
    Json {
        what: String,
        #[source]
        source: serde_json::Error,
    },
}

impl BenchError {
    /// An I/O error on `path`.
    pub fn io(what: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> BenchError {
        BenchError::Io { what, path: path.into(), source }
    }
}
