//! The lake: an object store (local folder or S3) and its layout.
//!
//! ```text
//! <lake>/audit/dt=YYYY-MM-DD/hour=HH/<writer>-<first_seq:020>.parquet     one per WAL segment
//! <lake>/manifests/<writer>/<first_seq:020>.json                           its signed manifest
//! <lake>/webhooks/dt=YYYY-MM-DD/hour=HH/<writer>-<first_seq:020>.parquet  one per WAL segment with webhook rows
//! <lake>/webhook-manifests/<writer>/<first_seq:020>.json                   its signed manifest
//! ```
//!
//! Invariants: objects are only ever created, never overwritten (`PutMode::Create`; large files
//! are uploaded in parts under `_staging/` and then copied with create-only semantics); the
//! manifests live outside the table folders so that table readers (Athena, DuckDB globs) see only Parquet.

use std::sync::Arc;

use bytes::Bytes;
use futures::TryStreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectMeta, ObjectStore, ObjectStoreExt, PutMode, PutOptions, PutPayload, WriteMultipart};

use sha2::{Digest, Sha256};

use crate::config::S3Config;
use crate::error::AuditError;
use crate::table::Table;

/// Checks that a writer id can be used in object names.
pub fn check_writer_id(id: &str) -> Result<(), AuditError> {
    let ok = !id.is_empty()
        && id.len() <= 128
        && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-');
    if ok {
        Ok(())
    } else {
        Err(AuditError::Config(format!(
            "writer id `{id}` must be 1-128 characters of letters, digits, '.', '_' or '-'"
        )))
    }
}

/// A lake: where it is and a store for it.
#[derive(Clone)]
pub struct Lake {
    /// Store rooted at the lake (prefix already applied).
    store: Arc<dyn ObjectStore>,
    /// Store rooted at the bucket (S3) or the filesystem root, for query engines.
    pub root_store: Arc<dyn ObjectStore>,
    /// URL of the store root, e.g. `s3://bucket` or `file:///`.
    pub root_url: url::Url,
    /// The lake's prefix inside `root_store`.
    pub prefix: ObjPath,
    /// Human-readable location, for messages.
    pub display: String,
    multipart_threshold: u64,
}

impl std::fmt::Debug for Lake {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Lake({})", self.display)
    }
}

/// Result of a create-only put.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Put {
    Created,
    AlreadyExists,
}

impl Lake {
    /// Opens `file:///abs`, a plain path (created if missing), or `s3://bucket/prefix`.
    pub fn open(location: &str, s3: &S3Config, multipart_threshold: u64) -> Result<Lake, AuditError> {
        if let Some(rest) = location.strip_prefix("s3://") {
            let (bucket, prefix) = rest.split_once('/').unwrap_or((rest, ""));
            if bucket.is_empty() {
                return Err(AuditError::Config(format!("lake `{location}` names no bucket")));
            }
            let mut b = object_store::aws::AmazonS3Builder::from_env()
                .with_bucket_name(bucket)
                .with_conditional_put(object_store::aws::S3ConditionalPut::ETagMatch)
                .with_copy_if_not_exists(object_store::aws::S3CopyIfNotExists::Multipart)
                .with_allow_http(s3.allow_http)
                .with_virtual_hosted_style_request(s3.virtual_hosted_style)
                // The shipper retries failed commits itself, with the configured back-off and a
                // metric and a log line per failure; the client's own retries are kept short so
                // that an outage shows there within seconds instead of after its default three
                // minutes of silent retrying.
                .with_retry(object_store::RetryConfig {
                    max_retries: 2,
                    retry_timeout: std::time::Duration::from_secs(10),
                    ..object_store::RetryConfig::default()
                });
            if let Some(e) = &s3.endpoint {
                b = b.with_endpoint(e);
            }
            if let Some(r) = &s3.region {
                b = b.with_region(r);
            }
            if let Some(k) = &s3.access_key_id {
                b = b.with_access_key_id(k);
            }
            if let Some(k) = &s3.secret_access_key {
                b = b.with_secret_access_key(k);
            }
            let root: Arc<dyn ObjectStore> =
                Arc::new(b.build().map_err(|e| AuditError::Config(format!("lake `{location}`: {e}")))?);
            let prefix = ObjPath::from(prefix.trim_matches('/'));
            let store: Arc<dyn ObjectStore> =
                Arc::new(object_store::prefix::PrefixStore::new(root.clone(), prefix.clone()));
            let root_url = url::Url::parse(&format!("s3://{bucket}"))
                .map_err(|e| AuditError::Config(format!("lake `{location}`: {e}")))?;
            return Ok(Lake {
                store,
                root_store: root,
                root_url,
                prefix,
                display: location.to_owned(),
                multipart_threshold,
            });
        }
        let path = match location.strip_prefix("file://") {
            Some(p) => std::path::PathBuf::from(p),
            None if location.contains("://") => {
                return Err(AuditError::Config(format!(
                    "lake `{location}`: use file:///absolute/path, a plain path, or s3://bucket/prefix"
                )));
            }
            None => std::path::PathBuf::from(location),
        };
        std::fs::create_dir_all(&path).map_err(|e| AuditError::io("create lake folder", &path, e))?;
        let abs = std::fs::canonicalize(&path).map_err(|e| AuditError::io("resolve lake folder", &path, e))?;
        let store: Arc<dyn ObjectStore> = Arc::new(
            object_store::local::LocalFileSystem::new_with_prefix(&abs)
                .map_err(|e| AuditError::Config(format!("lake {}: {e}", abs.display())))?,
        );
        let root_store: Arc<dyn ObjectStore> = Arc::new(object_store::local::LocalFileSystem::new());
        let prefix = ObjPath::from_filesystem_path(&abs)
            .map_err(|e| AuditError::Config(format!("lake {}: {e}", abs.display())))?;
        let root_url = url::Url::parse("file:///").map_err(|e| AuditError::Config(e.to_string()))?;
        Ok(Lake { store, root_store, root_url, prefix, display: abs.display().to_string(), multipart_threshold })
    }

    /// The store rooted at the lake.
    pub fn store(&self) -> &Arc<dyn ObjectStore> {
        &self.store
    }

    /// The same lake with every call of the shipper going through `faults` first (tests of
    /// store failures; see [`crate::lake_faults`]).
    pub fn with_faults(mut self, faults: Arc<crate::lake_faults::LakeFaults>) -> Lake {
        self.store = Arc::new(crate::lake_faults::FaultyStore::new(self.store, faults));
        self
    }

    /// URL of the `audit/` table folder, for query engines: `s3://bucket/prefix/audit/` or
    /// `file:///abs/lake/audit/`.
    pub fn table_url(&self) -> String {
        self.table_url_of(Table::Audit)
    }

    /// URL of a table's folder, for query engines.
    pub fn table_url_of(&self, table: Table) -> String {
        let p = self.prefix.as_ref();
        let t = table.name();
        match self.root_url.scheme() {
            "file" if p.is_empty() => format!("file:///{t}/"),
            "file" => format!("file:///{p}/{t}/"),
            _ if p.is_empty() => format!("{}/{t}/", self.root_url.as_str().trim_end_matches('/')),
            _ => format!("{}/{p}/{t}/", self.root_url.as_str().trim_end_matches('/')),
        }
    }

    /// Creates `path` with `bytes`; never overwrites.
    pub async fn put_create(&self, path: &ObjPath, bytes: Bytes) -> Result<Put, AuditError> {
        let mut file = self.create_file(path);
        file.write(bytes).await?;
        Ok(file.finish().await?.put)
    }

    /// Starts a file at `path` written as it is produced (see [`LakeFile`]); never overwrites.
    pub fn create_file(&self, path: &ObjPath) -> LakeFile<'_> {
        LakeFile {
            lake: self,
            path: path.clone(),
            sha256: Sha256::new(),
            len: 0,
            state: FileState::Buffered(Vec::new()),
        }
    }
    /// The object's bytes, or `None` when it does not exist.
    pub async fn get(&self, path: &ObjPath) -> Result<Option<Bytes>, AuditError> {
        match self.store.get(path).await {
            Ok(r) => r.bytes().await.map(Some).map_err(|e| AuditError::lake("read", path, e)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(AuditError::lake("read", path, e)),
        }
    }

    /// Every object under `prefix`, sorted by path.
    pub async fn list(&self, prefix: &str) -> Result<Vec<ObjectMeta>, AuditError> {
        let p = ObjPath::from(prefix);
        let mut out: Vec<ObjectMeta> =
            self.store.list(Some(&p)).try_collect().await.map_err(|e| AuditError::lake("list", prefix, e))?;
        out.sort_by(|a, b| a.location.cmp(&b.location));
        Ok(out)
    }

    /// Deletes an object (tests and tooling only; keygate never deletes lake objects).
    pub async fn delete(&self, path: &ObjPath) -> Result<(), AuditError> {
        self.store.delete(path).await.map_err(|e| AuditError::lake("delete", path, e))
    }
}

/// How many parts of a large file are in flight at once (each holds [`PART_BYTES`]).
pub const PARTS_IN_FLIGHT: usize = 2;

/// The size of a large file's parts (S3 takes at least 5 MiB but for the last).
pub const PART_BYTES: usize = 5 * 1024 * 1024;

/// A lake file being written (issue 21: the shipper streams a segment's row groups into it).
/// A file up to the lake's `multipart_threshold_bytes` is held in memory and created in one
/// create-only put when it is finished; once it grows past that, what it holds goes out as the
/// first parts of a multipart upload to a staging object under `_staging/`, every later write
/// as more parts ([`PARTS_IN_FLIGHT`] of [`PART_BYTES`] at most in flight: a write waits for
/// room), and [`LakeFile::finish`] copies the staging object into place create-only. So the
/// memory a file takes is at most the threshold, or [`PARTS_IN_FLIGHT`] + 1 parts.
///
/// Dropped unfinished, nothing appears at `path`; an unfinished upload to `_staging/` may
/// remain, as when the process dies there (docs/audit-lake.md: a lifecycle rule on the prefix).
pub struct LakeFile<'a> {
    lake: &'a Lake,
    path: ObjPath,
    sha256: Sha256,
    len: u64,
    state: FileState,
}

enum FileState {
    Buffered(Vec<Bytes>),
    Uploading { staging: ObjPath, upload: WriteMultipart },
}

impl std::fmt::Debug for LakeFile<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LakeFile").field("path", &self.path).field("len", &self.len).finish_non_exhaustive()
    }
}

/// A finished [`LakeFile`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Written {
    /// Whether the file was created, or one already existed at its path (left as it was).
    pub put: Put,
    /// Hex SHA-256 and length of what was written (not of an existing file).
    pub sha256: String,
    pub len: u64,
}

impl LakeFile<'_> {
    /// Appends `bytes` to the file.
    pub async fn write(&mut self, bytes: impl Into<Bytes>) -> Result<(), AuditError> {
        let bytes: Bytes = bytes.into();
        if bytes.is_empty() {
            return Ok(());
        }
        self.sha256.update(&bytes);
        self.len += bytes.len() as u64;
        match &mut self.state {
            FileState::Buffered(chunks) => {
                chunks.push(bytes);
                if self.len > self.lake.multipart_threshold {
                    let chunks = std::mem::take(chunks);
                    let staging = ObjPath::from(format!(
                        "_staging/{}.{}",
                        self.path.filename().unwrap_or("file"),
                        hex::encode(rand::random::<[u8; 8]>())
                    ));
                    let upload = self
                        .lake
                        .store
                        .put_multipart(&staging)
                        .await
                        .map_err(|e| AuditError::lake("start upload", &staging, e))?;
                    let mut upload = WriteMultipart::new_with_chunk_size(upload, PART_BYTES);
                    for chunk in chunks {
                        upload.put(chunk);
                        upload
                            .wait_for_capacity(PARTS_IN_FLIGHT)
                            .await
                            .map_err(|e| AuditError::lake("upload", &staging, e))?;
                    }
                    self.state = FileState::Uploading { staging, upload };
                }
            }
            FileState::Uploading { staging, upload } => {
                upload.put(bytes);
                upload.wait_for_capacity(PARTS_IN_FLIGHT).await.map_err(|e| AuditError::lake("upload", staging, e))?;
            }
        }
        Ok(())
    }

    /// Creates the file (create-only: an existing object at its path is left as it was and
    /// reported).
    pub async fn finish(self) -> Result<Written, AuditError> {
        let path = &self.path;
        let put = match self.state {
            FileState::Buffered(chunks) => {
                let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
                match self.lake.store.put_opts(path, chunks.into_iter().collect::<PutPayload>(), opts).await {
                    Ok(_) => Put::Created,
                    Err(object_store::Error::AlreadyExists { .. }) => Put::AlreadyExists,
                    Err(e) => return Err(AuditError::lake("put", path, e)),
                }
            }
            FileState::Uploading { staging, upload } => {
                upload.finish().await.map_err(|e| AuditError::lake("upload", &staging, e))?;
                let result = self.lake.store.copy_if_not_exists(&staging, path).await;
                let _ = self.lake.store.delete(&staging).await;
                match result {
                    Ok(()) => Put::Created,
                    Err(object_store::Error::AlreadyExists { .. }) => Put::AlreadyExists,
                    Err(e) => return Err(AuditError::lake("copy into place", path, e)),
                }
            }
        };
        Ok(Written { put, sha256: hex::encode(self.sha256.finalize()), len: self.len })
    }
}

/// `audit/dt=YYYY-MM-DD/hour=HH/<writer>-<first_seq>.parquet` for a file whose first row was
/// logged at `logged_at_us`.
pub fn data_path(writer_id: &str, first_seq: u64, logged_at_us: i64) -> Result<ObjPath, AuditError> {
    data_path_of(Table::Audit, writer_id, first_seq, logged_at_us)
}

/// `<table>/dt=YYYY-MM-DD/hour=HH/<writer>-<first_seq>.parquet`.
pub fn data_path_of(table: Table, writer_id: &str, first_seq: u64, logged_at_us: i64) -> Result<ObjPath, AuditError> {
    let t = time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(logged_at_us) * 1000)
        .map_err(|e| AuditError::corrupt("row timestamp", e.to_string()))?;
    Ok(ObjPath::from(format!(
        "{}/dt={:04}-{:02}-{:02}/hour={:02}/{writer_id}-{first_seq:020}.parquet",
        table.name(),
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour()
    )))
}

/// `manifests/<writer>/<first_seq>.json`.
pub fn manifest_path(writer_id: &str, first_seq: u64) -> ObjPath {
    manifest_path_of(Table::Audit, writer_id, first_seq)
}

/// `<manifest prefix of table>/<writer>/<first_seq>.json`.
pub fn manifest_path_of(table: Table, writer_id: &str, first_seq: u64) -> ObjPath {
    ObjPath::from(format!("{}/{writer_id}/{first_seq:020}.json", table.manifest_prefix()))
}

/// Writer id and first seq from a data file name `<writer>-<first_seq>.parquet`.
pub fn parse_data_name(name: &str) -> Option<(String, u64)> {
    let stem = name.strip_suffix(".parquet")?;
    let (writer, seq) = stem.rsplit_once('-')?;
    Some((writer.to_owned(), seq.parse().ok()?))
}
