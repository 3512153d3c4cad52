//! Reading the `audit` table back: every row of a period, in arrival order, with its recorded
//! request rebuilt from the encrypted payload when the key-encryption key is at hand.
//!
//! Uses only `keygate-auditlog`'s own file decoder ([`keygate_auditlog::parquet_io::decode`])
//! and payload opener, so the `keygate` binary that links this crate never links DataFusion.
//! Files are pruned by their `dt=…/hour=…` partition (the hour a file's first row was logged,
//! which is never before any of its rows arrived).

use std::borrow::Cow;
use std::collections::BTreeSet;
use std::sync::Arc;

use keygate_auditlog::crypto::{DataKey, KekRing};
use keygate_auditlog::lake::Lake;
use keygate_auditlog::parquet_io::FileMeta;
use keygate_auditlog::redact::{Action, MASK, RedactedMessage, SENSITIVE_FIELDS};
use keygate_auditlog::row::RowColumns;
use keygate_auditlog::{S3Config, keys, payload};
use keygate_secrets::{SecretStore, SecretsConfig};

use crate::OpsError;

/// An opened lake, with the keys to decrypt it (possibly none).
#[derive(Debug)]
pub struct LakeReader {
    lake: Lake,
    ring: KekRing,
}

/// One `audit` row as read back.
#[derive(Debug, Clone)]
pub struct RecordedRow {
    pub writer_id: String,
    pub seq: u64,
    /// The plaintext columns.
    pub columns: RowColumns,
    /// The recorded request, when the payload was decrypted.
    pub request: Option<RecordedRequest>,
    /// Why `request` is `None`: no key given, or the payload did not open.
    pub not_decrypted: Option<String>,
}

/// A recorded (redacted) request, rebuilt into what the policy engine reads.
#[derive(Clone)]
pub struct RecordedRequest {
    pub method: String,
    pub path: String,
    pub query: Option<String>,
    /// Header names in lower case, with their recorded values.
    pub headers: Vec<(String, String)>,
    /// The body rebuilt from the recorded form pairs or JSON (empty when it was not recorded).
    pub body: Vec<u8>,
    /// Why the body is not here, when it was not recorded at all (multipart, free text).
    pub body_omitted: Option<String>,
    /// Normalised names (`card[number]`, `items[][price]`) whose recorded value is masked.
    pub masked: BTreeSet<String>,
    /// The rebuilt body differs in size from the one received: redaction dropped something
    /// (a CVC, a PIN, track data) or changed a value's length.
    pub size_differs: bool,
}

impl std::fmt::Debug for RecordedRequest {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Values may be anything a client sent (redacted, but still customer data).
        f.debug_struct("RecordedRequest")
            .field("method", &self.method)
            .field("headers", &self.headers.len())
            .field("body_bytes", &self.body.len())
            .field("masked", &self.masked.len())
            .finish_non_exhaustive()
    }
}

impl RecordedRequest {
    /// A header's recorded value.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers.iter().find(|(n, _)| n.eq_ignore_ascii_case(name)).map(|(_, v)| v.as_str())
    }

    /// Redaction changed nothing in it: every part is recorded, no value is masked, the rebuilt
    /// body is as long as the one received. Only such a request may be sent again.
    pub fn is_complete(&self) -> bool {
        self.body_omitted.is_none()
            && self.masked.is_empty()
            && !self.size_differs
            && self.query.as_deref().is_none_or(|q| !q.contains(MASK))
            && self.headers.iter().filter(|(n, _)| DECISIVE_HEADERS.contains(&n.as_str())).all(|(_, v)| !is_masked(v))
    }

    /// Why the value of parameter `name` (normalised) is not known in clear, if it is not.
    pub fn field_unknown(&self, name: &str) -> Option<&'static str> {
        if self.body_omitted.is_some() {
            return Some("the body was not recorded");
        }
        if self.masked.iter().any(|m| same_subtree(m, name)) {
            return Some("recorded masked");
        }
        if self.size_differs && names_dropped_field(name) {
            return Some("dropped by redaction");
        }
        None
    }

    /// Rebuilds a request from its recorded form. `None` when the start line is unreadable.
    pub fn from_recorded(message: &RedactedMessage) -> Option<RecordedRequest> {
        let mut parts = message.start_line.splitn(3, ' ');
        let method = parts.next()?.to_owned();
        let target = parts.next()?;
        let (path, query) = match target.split_once('?') {
            Some((path, query)) => (path.to_owned(), Some(query.to_owned())),
            None => (target.to_owned(), None),
        };
        let headers: Vec<(String, String)> =
            message.headers.iter().map(|(n, v)| (n.to_ascii_lowercase(), v.clone())).collect();
        let mut masked = BTreeSet::new();
        let mut body = Vec::new();
        let mut body_omitted = message.body_omitted.clone();
        if body_omitted.is_none() && message.body_text.is_some() {
            body_omitted = Some("recorded as text by an older version".to_owned());
        }
        if let Some(json) = &message.body_json {
            match form_pairs(json) {
                Some(pairs) => {
                    for (k, v) in &pairs {
                        if is_masked(v) {
                            masked.insert(normalize(k));
                        }
                    }
                    body = keygate_wire::form::serialize(&pairs).into_bytes();
                }
                None => {
                    collect_masked_json(json, String::new(), &mut masked);
                    body = serde_json::to_vec(json).unwrap_or_default();
                }
            }
        }
        if let Some(query) = &query
            && !query.contains(MASK)
            && let Ok(pairs) = keygate_wire::form::parse_repeated(query.as_bytes())
        {
            for (k, v) in &pairs {
                if is_masked(v) {
                    masked.insert(normalize(k));
                }
            }
        }
        let size_differs = body_omitted.is_none() && body.len() as u64 != message.body_bytes;
        Some(RecordedRequest { method, path, query, headers, body, body_omitted, masked, size_differs })
    }
}

/// Headers whose value changes what Stripe does with a request: a re-sent request needs them
/// in clear. (Others, such as the SDK's telemetry headers, may be recorded masked and are then
/// not sent again.)
pub const DECISIVE_HEADERS: &[&str] =
    &["content-type", "idempotency-key", "stripe-account", "stripe-context", "stripe-version"];

/// The recorded form body: `[[key, value], …]`.
fn form_pairs(json: &serde_json::Value) -> Option<Vec<(String, String)>> {
    let items = json.as_array()?;
    items
        .iter()
        .map(|item| match item.as_array().map(Vec::as_slice) {
            Some([serde_json::Value::String(k), serde_json::Value::String(v)]) => Some((k.clone(), v.clone())),
            _ => None,
        })
        .collect()
}

fn is_masked(value: &str) -> bool {
    value.contains(MASK) || value.contains("****") || value.contains("_[redacted]")
}

fn normalize(name: &str) -> String {
    keygate_policies::params::normalize_name(Cow::Borrowed(name)).into_owned()
}

fn collect_masked_json(value: &serde_json::Value, prefix: String, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::Object(map) => {
            for (k, v) in map {
                let name = if prefix.is_empty() { k.clone() } else { format!("{prefix}[{k}]") };
                collect_masked_json(v, name, out);
            }
        }
        serde_json::Value::Array(items) => {
            for v in items {
                collect_masked_json(v, format!("{prefix}[]"), out);
            }
        }
        serde_json::Value::String(s) if is_masked(s) => {
            out.insert(normalize(&prefix));
        }
        _ => {}
    }
}

/// `card` and `card[number]` are the same subtree; `card` and `cardholder` are not.
fn same_subtree(a: &str, b: &str) -> bool {
    let (short, long) = if a.len() <= b.len() { (a, b) } else { (b, a) };
    long == short || (long.starts_with(short) && long.as_bytes().get(short.len()) == Some(&b'['))
}

/// Whether a parameter name has a segment that redaction drops whole (`card[cvc]`, `pin`).
fn names_dropped_field(name: &str) -> bool {
    name.split(['[', ']']).filter(|s| !s.is_empty()).any(|segment| {
        SENSITIVE_FIELDS.iter().any(|f| f.action == Action::Drop && f.name.eq_ignore_ascii_case(segment.trim()))
    })
}

impl LakeReader {
    /// Opens `file:///path`, a path or `s3://bucket/prefix` (S3 credentials and endpoint from the
    /// usual `AWS_*` variables), with the key-encryption keys named by `kek_refs` (secret
    /// references: `file://`, `env://`, `vault-transit://` with `VAULT_ADDR`/`VAULT_TOKEN`;
    /// several for files written under rotated keys).
    pub async fn open(location: &str, kek_refs: &[String]) -> Result<LakeReader, OpsError> {
        let mut secrets = SecretsConfig::default();
        if kek_refs.iter().any(|r| r.trim_start().starts_with("vault-transit://"))
            && let Ok(address) = std::env::var("VAULT_ADDR")
        {
            secrets.vault = serde_json::from_value(serde_json::json!({ "address": address })).ok();
        }
        let store = SecretStore::new(&secrets).await?;
        LakeReader::open_with(location, &S3Config::default(), &store, kek_refs).await
    }

    /// [`open`](Self::open) with a configuration's S3 settings and secret store (`keygate
    /// reconcile --config`).
    pub async fn open_with(
        location: &str,
        s3: &S3Config,
        store: &SecretStore,
        kek_refs: &[String],
    ) -> Result<LakeReader, OpsError> {
        if !location.starts_with("s3://") {
            let path = location.strip_prefix("file://").unwrap_or(location);
            if !std::path::Path::new(path).is_dir() {
                return Err(OpsError::Usage(format!("lake folder {path} does not exist")));
            }
        }
        let lake = Lake::open(location, s3, u64::MAX)?;
        let mut kek = Vec::new();
        for reference in kek_refs {
            kek.push(keys::kek_from_reference(store, reference).await?);
        }
        Ok(LakeReader { lake, ring: KekRing::new(kek) })
    }

    /// The lake as opened.
    pub fn lake(&self) -> &Lake {
        &self.lake
    }

    /// Whether payloads can be decrypted.
    pub fn can_decrypt(&self) -> bool {
        !self.ring.is_empty()
    }

    /// Every `audit` row received at or after `since_us` (of `services`, when not empty), in
    /// arrival order (ties by writer and sequence number). `progress(done, total)` is called
    /// after each file.
    pub async fn read(
        &self,
        since_us: i64,
        services: &[String],
        mut progress: impl FnMut(usize, usize),
    ) -> Result<Vec<RecordedRow>, OpsError> {
        let mut files: Vec<_> = self
            .lake
            .list("audit/")
            .await?
            .into_iter()
            .filter(|o| o.location.as_ref().ends_with(".parquet"))
            .filter(|o| partition_end_us(o.location.as_ref()).is_none_or(|end| end > since_us))
            .map(|o| o.location)
            .collect();
        files.sort();
        let total = files.len();
        let mut rows = Vec::new();
        for (done, path) in files.iter().enumerate() {
            let Some(bytes) = self.lake.get(path).await? else { continue };
            let (meta, chained) = keygate_auditlog::parquet_io::decode(bytes)?;
            let mut key: Option<Result<Arc<DataKey>, String>> = None;
            for row in chained {
                if row.columns.received_at_us < since_us {
                    continue;
                }
                if !services.is_empty() && !row.columns.service.as_ref().is_some_and(|s| services.contains(s)) {
                    continue;
                }
                let (request, not_decrypted) = if self.ring.is_empty() {
                    (None, Some("no key-encryption key given (--kek)".to_owned()))
                } else {
                    let key = match &key {
                        Some(k) => k.clone(),
                        None => {
                            let k = self.file_key(&meta).await;
                            key = Some(k.clone());
                            k
                        }
                    };
                    match key.and_then(|k| {
                        payload::open_payload(&k, &meta, &row.columns.event_id, &row.payload).map_err(|e| e.to_string())
                    }) {
                        Ok(doc) => match RecordedRequest::from_recorded(&doc.request) {
                            Some(request) => (Some(request), None),
                            None => (None, Some("the recorded request line is unreadable".to_owned())),
                        },
                        Err(reason) => (None, Some(format!("payload not decrypted: {reason}"))),
                    }
                };
                rows.push(RecordedRow {
                    writer_id: row.writer_id,
                    seq: row.seq,
                    columns: row.columns,
                    request,
                    not_decrypted,
                });
            }
            progress(done + 1, total);
        }
        rows.sort_by(|a, b| {
            (a.columns.received_at_us, &a.writer_id, a.seq).cmp(&(b.columns.received_at_us, &b.writer_id, b.seq))
        });
        Ok(rows)
    }

    async fn file_key(&self, meta: &FileMeta) -> Result<Arc<DataKey>, String> {
        payload::file_key(meta, &self.ring).await.map(Arc::new).map_err(|e| e.to_string())
    }
}

/// End (exclusive, µs since the epoch) of the hour a `…/dt=YYYY-MM-DD/hour=HH/…` path names.
fn partition_end_us(path: &str) -> Option<i64> {
    let dt = path.split('/').find_map(|s| s.strip_prefix("dt="))?;
    let hour: u8 = path.split('/').find_map(|s| s.strip_prefix("hour="))?.parse().ok()?;
    let mut parts = dt.split('-');
    let year: i32 = parts.next()?.parse().ok()?;
    let month: u8 = parts.next()?.parse().ok()?;
    let day: u8 = parts.next()?.parse().ok()?;
    let date = time::Date::from_calendar_date(year, time::Month::try_from(month).ok()?, day).ok()?;
    let start = date.with_hms(hour, 0, 0).ok()?.assume_utc().unix_timestamp();
    Some((start + 3600) * 1_000_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subtrees_and_dropped_names() {
        assert!(same_subtree("card", "card[number]"));
        assert!(same_subtree("metadata[order]", "metadata[order]"));
        assert!(!same_subtree("card", "cardholder"));
        assert!(names_dropped_field("payment_method_data[card][cvc]"));
        assert!(!names_dropped_field("metadata[order]"));
    }

    #[test]
    fn a_partition_ends_an_hour_after_it_starts() {
        assert_eq!(partition_end_us("audit/dt=1970-01-01/hour=00/w-1.parquet"), Some(3_600_000_000));
        assert_eq!(partition_end_us("audit/w-1.parquet"), None);
    }

    #[test]
    fn a_masked_form_value_makes_the_request_incomplete() {
        let message = RedactedMessage {
            start_line: "POST /v1/payment_methods HTTP/1.1".into(),
            headers: vec![("content-type".into(), "application/x-www-form-urlencoded".into())],
            body_json: Some(serde_json::json!([["type", "card"], ["card[number]", "****4242"]])),
            body_text: None,
            body_omitted: None,
            body_bytes: 44,
        };
        let request = RecordedRequest::from_recorded(&message).unwrap_or_else(|| unreachable!());
        assert!(!request.is_complete());
        assert_eq!(request.field_unknown("card[number]"), Some("recorded masked"));
        assert_eq!(request.field_unknown("type"), None);
    }
}
