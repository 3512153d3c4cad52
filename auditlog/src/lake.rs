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
        if (bytes.len() as u64) <= self.multipart_threshold {
            let opts = PutOptions { mode: PutMode::Create, ..Default::default() };
            return match self.store.put_opts(path, PutPayload::from(bytes), opts).await {
                Ok(_) => Ok(Put::Created),
                Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::AlreadyExists),
                Err(e) => Err(AuditError::lake("put", path, e)),
            };
        }
        // Large file: parts go to a staging object, then a create-only copy puts it in place.
        let staging = ObjPath::from(format!(
            "_staging/{}.{}",
            path.filename().unwrap_or("file"),
            hex::encode(rand::random::<[u8; 8]>())
        ));
        let upload =
            self.store.put_multipart(&staging).await.map_err(|e| AuditError::lake("start upload", &staging, e))?;
        let mut w = WriteMultipart::new_with_chunk_size(upload, 8 * 1024 * 1024);
        w.put(bytes);
        w.finish().await.map_err(|e| AuditError::lake("upload", &staging, e))?;
        let result = self.store.copy_if_not_exists(&staging, path).await;
        let _ = self.store.delete(&staging).await;
        match result {
            Ok(()) => Ok(Put::Created),
            Err(object_store::Error::AlreadyExists { .. }) => Ok(Put::AlreadyExists),
            Err(e) => Err(AuditError::lake("copy into place", path, e)),
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
