//! Fault injection for the lake store: an [`ObjectStore`] wrapper that fails, delays or hangs
//! chosen calls, for the tests of what the shipper does when the store misbehaves (issue 13).
//!
//! Rules match an operation ([`Op`]) and a substring of the object path; the first matching
//! armed rule applies. Nothing is armed unless a test arms it; unarmed, each call costs one lock
//! of an empty list. Wrap a lake with [`crate::lake::Lake::with_faults`].

use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use futures::stream::BoxStream;
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore, PutMultipartOptions,
    PutOptions, PutPayload, PutResult, Result,
};

/// The store operations a rule can match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    Put,
    Get,
    List,
    Delete,
    Copy,
    Any,
}

/// What a matching call does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Fails as a transient error would (a generic store error).
    Fail,
    /// Fails with an error that retrying cannot fix (`NotImplemented`).
    FailPermanently,
    /// Waits this long, then proceeds.
    Delay(Duration),
    /// Never returns (until the caller gives up).
    Hang,
}

#[derive(Debug, Clone)]
struct Rule {
    op: Op,
    path_contains: String,
    action: Action,
    remaining: u32,
}

/// The armed rules, shared between a test and its [`FaultyStore`].
#[derive(Debug, Default)]
pub struct LakeFaults {
    rules: Mutex<Vec<Rule>>,
}

impl LakeFaults {
    /// Arms a rule for the next `times` matching calls (`u32::MAX`: until cleared).
    pub fn arm(&self, op: Op, path_contains: &str, action: Action, times: u32) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.push(Rule { op, path_contains: path_contains.to_owned(), action, remaining: times });
        }
    }

    /// Disarms every rule.
    pub fn clear(&self) {
        if let Ok(mut rules) = self.rules.lock() {
            rules.clear();
        }
    }

    fn take(&self, op: Op, path: &str) -> Option<Action> {
        let mut rules = self.rules.lock().ok()?;
        let rule = rules
            .iter_mut()
            .find(|r| r.remaining > 0 && (r.op == op || r.op == Op::Any) && path.contains(r.path_contains.as_str()))?;
        if rule.remaining != u32::MAX {
            rule.remaining -= 1;
        }
        Some(rule.action)
    }

    async fn apply(&self, op: Op, path: &str) -> Result<()> {
        match self.take(op, path) {
            None => Ok(()),
            Some(Action::Delay(d)) => {
                tokio::time::sleep(d).await;
                Ok(())
            }
            Some(Action::Hang) => std::future::pending().await,
            Some(Action::Fail) => Err(object_store::Error::Generic {
                store: "faulty",
                source: format!("injected transient failure of {op:?} {path}").into(),
            }),
            Some(Action::FailPermanently) => Err(object_store::Error::NotImplemented {
                operation: format!("{op:?} {path} (injected)"),
                implementer: "FaultyStore".into(),
            }),
        }
    }
}

/// A store whose calls go through [`LakeFaults`] first.
#[derive(Debug)]
pub struct FaultyStore {
    inner: Arc<dyn ObjectStore>,
    faults: Arc<LakeFaults>,
}

impl FaultyStore {
    pub fn new(inner: Arc<dyn ObjectStore>, faults: Arc<LakeFaults>) -> FaultyStore {
        FaultyStore { inner, faults }
    }
}

impl fmt::Display for FaultyStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "FaultyStore({})", self.inner)
    }
}

#[async_trait]
impl ObjectStore for FaultyStore {
    async fn put_opts(&self, location: &Path, payload: PutPayload, opts: PutOptions) -> Result<PutResult> {
        self.faults.apply(Op::Put, location.as_ref()).await?;
        self.inner.put_opts(location, payload, opts).await
    }

    async fn put_multipart_opts(&self, location: &Path, opts: PutMultipartOptions) -> Result<Box<dyn MultipartUpload>> {
        self.faults.apply(Op::Put, location.as_ref()).await?;
        self.inner.put_multipart_opts(location, opts).await
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        self.faults.apply(Op::Get, location.as_ref()).await?;
        self.inner.get_opts(location, options).await
    }

    fn delete_stream(&self, locations: BoxStream<'static, Result<Path>>) -> BoxStream<'static, Result<Path>> {
        // Deletes are not faulted one by one (the shipper never deletes lake objects).
        self.inner.delete_stream(locations)
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        let path = prefix.map(|p| p.to_string()).unwrap_or_default();
        match self.faults.take(Op::List, &path) {
            Some(Action::Fail | Action::FailPermanently) => Box::pin(futures::stream::once(async move {
                Err(object_store::Error::Generic {
                    store: "faulty",
                    source: format!("injected failure of list {path}").into(),
                })
            })),
            Some(Action::Hang) => Box::pin(futures::stream::pending()),
            _ => self.inner.list(prefix),
        }
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        self.faults.apply(Op::List, prefix.map(|p| p.as_ref()).unwrap_or("")).await?;
        self.inner.list_with_delimiter(prefix).await
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        self.faults.apply(Op::Copy, to.as_ref()).await?;
        self.inner.copy_opts(from, to, options).await
    }
}
