//! `env://` and `file://` sources: the keygate process's environment and file system.
//!
//! Invariants: a file is read whole but never more than [`MAX_FILE_BYTES`]; one trailing newline
//! (as `echo` and most editors write) is dropped; the read buffer is zeroed if rejected.

use std::path::Path;

use tokio::io::AsyncReadExt;
use zeroize::Zeroize;

use super::text_value;
use crate::error::SecretError;
use crate::reference::SecretRef;
use crate::value::SecretValue;

/// Files larger than this are refused: a key is small, and `/dev/zero` is not a key.
pub(crate) const MAX_FILE_BYTES: u64 = 1 << 20;

/// Reads an environment variable of this process.
pub(crate) fn read_env(reference: &SecretRef, var: &str) -> Result<SecretValue, SecretError> {
    match std::env::var_os(var) {
        None => Err(SecretError::NotFound {
            reference: reference.to_string(),
            detail: format!("the environment variable `{var}` is not set in keygate's environment"),
        }),
        Some(os) => match os.into_string() {
            Ok(text) => super::non_empty(reference, text),
            Err(_) => Err(SecretError::NotUtf8 { reference: reference.to_string() }),
        },
    }
}

/// Reads a whole file.
pub(crate) async fn read_file(reference: &SecretRef, path: &Path) -> Result<SecretValue, SecretError> {
    let io_error = |e: std::io::Error| match e.kind() {
        std::io::ErrorKind::NotFound => {
            SecretError::NotFound { reference: reference.to_string(), detail: format!("no file at {}", path.display()) }
        }
        std::io::ErrorKind::PermissionDenied => SecretError::PermissionDenied {
            reference: reference.to_string(),
            detail: format!("keygate's user may not read {}", path.display()),
        },
        _ => SecretError::Unreachable {
            reference: reference.to_string(),
            source_name: "file system",
            detail: format!("reading {}: {e}", path.display()),
        },
    };
    let file = tokio::fs::File::open(path).await.map_err(io_error)?;
    let metadata = file.metadata().await.map_err(io_error)?;
    if !metadata.is_file() {
        return Err(SecretError::BadValue {
            reference: reference.to_string(),
            detail: format!("{} is not a regular file", path.display()),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(metadata.len().min(MAX_FILE_BYTES)).unwrap_or(0));
    let read = file.take(MAX_FILE_BYTES + 1).read_to_end(&mut bytes).await;
    if let Err(e) = read {
        bytes.zeroize();
        return Err(io_error(e));
    }
    if bytes.len() as u64 > MAX_FILE_BYTES {
        bytes.zeroize();
        return Err(SecretError::BadValue {
            reference: reference.to_string(),
            detail: format!("{} is larger than {MAX_FILE_BYTES} bytes; it cannot be a key", path.display()),
        });
    }
    if bytes.ends_with(b"\r\n") {
        bytes.truncate(bytes.len() - 2);
    } else if bytes.ends_with(b"\n") {
        bytes.truncate(bytes.len() - 1);
    }
    text_value(reference, bytes)
}
