//! keygate's configuration: one YAML file, every key overridable by `KEYGATE_…` environment
//! variables (`__` separates nesting levels: `KEYGATE_UPSTREAMS__API`), parsed and validated once
//! at start into typed structs.
//!
//! The structs here do not use `deny_unknown_fields`: unknown keys are collected by
//! `serde_ignored` so that all of them are reported at once, then refused.
//!
//! Invariants: unknown keys are refused; every problem found is reported at once (unknown keys,
//! then the first type error, then every semantic problem); the raw text of the file and the
//! values of variables never reach a log or an error message, only key paths do.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::Uri;
use serde::Deserialize;
use serde_json::Value;

use crate::routing::StripeHost;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "KEYGATE_";

/// The whole configuration.
#[derive(Debug, Clone, Deserialize)]
pub struct Config {
    #[serde(default)]
    pub listen: ListenConfig,
    #[serde(default)]
    pub admin: AdminConfig,
    #[serde(default)]
    pub upstreams: UpstreamsConfig,
    #[serde(default)]
    pub limits: LimitsConfig,
    #[serde(default)]
    pub policies: PoliciesConfig,
    #[serde(default)]
    pub log: LogConfig,
    /// Secret sources and their cache (see docs/secrets.md).
    #[serde(default)]
    pub secrets: keygate_secrets::SecretsConfig,
    /// The audit lake (see docs/audit-lake.md).
    #[serde(default)]
    pub audit: keygate_auditlog::AuditConfig,
    /// Where budgets and rate limits are counted (see docs/configuration.md, `limit_store`).
    #[serde(default)]
    pub limit_store: keygate_limits::LimitStoreConfig,
    /// The Stripe webhook ingress (see docs/webhooks.md); off when absent.
    #[serde(default)]
    pub webhooks: Option<keygate_webhooks::WebhooksConfig>,
    /// The background job that closes `outcome = unknown` rows (see docs/operations.md); off by
    /// default.
    #[serde(default)]
    pub reconcile: ReconcileConfig,
    /// Live anomaly detection (see docs/anomalies.md); off when absent.
    #[serde(default)]
    pub anomalies: Option<keygate_detectors::AnomaliesConfig>,
    /// Where anomaly alerts are delivered besides the log, the metrics and the lake (see
    /// docs/anomalies.md); nowhere when absent.
    #[serde(default)]
    pub alerts: AlertsConfig,
}

/// `alerts`: webhook-style destinations of the anomaly alerts (not of shadow records).
#[derive(Debug, Clone, Default, Deserialize)]
pub struct AlertsConfig {
    /// The `kind: http | kafka | sqs` destinations of docs/webhooks.md, with the same keys; each
    /// alert is one event of type `keygate.anomaly.<detector>`, filtered by a destination's
    /// `events` like a Stripe event.
    #[serde(default)]
    pub destinations: Vec<keygate_webhooks::DestinationConfig>,
}

/// `reconcile`: `keygate reconcile --apply` run by keygate itself, every `interval`, over the
/// lake's last `lookback`.
#[derive(Debug, Clone, Deserialize)]
pub struct ReconcileConfig {
    /// Off by default: run it on one replica only (each replica would otherwise re-send the same
    /// rows; Stripe's idempotency keeps that to one charge, but each would write its own row).
    #[serde(default)]
    pub enabled: bool,
    /// How often the lake is read and the unknown rows closed.
    #[serde(default = "default_reconcile_interval", with = "humantime_serde")]
    pub interval: Duration,
    /// How far back each pass reads; Stripe keeps an idempotency key's answer for 24 h, so older
    /// rows can only need review.
    #[serde(default = "default_reconcile_lookback", with = "humantime_serde")]
    pub lookback: Duration,
}

impl Default for ReconcileConfig {
    fn default() -> Self {
        ReconcileConfig {
            enabled: false,
            interval: default_reconcile_interval(),
            lookback: default_reconcile_lookback(),
        }
    }
}

fn default_reconcile_interval() -> Duration {
    Duration::from_secs(15 * 60)
}

fn default_reconcile_lookback() -> Duration {
    Duration::from_secs(24 * 3600)
}

/// The proxy listener.
#[derive(Debug, Clone, Deserialize)]
pub struct ListenConfig {
    /// Address and port the proxy listens on.
    #[serde(default = "default_listen_address")]
    pub address: SocketAddr,
    /// TLS on the proxy listener; plain HTTP when absent.
    #[serde(default)]
    pub tls: Option<TlsConfig>,
}

impl Default for ListenConfig {
    fn default() -> Self {
        ListenConfig { address: default_listen_address(), tls: None }
    }
}

/// TLS (and optionally mTLS) on the proxy listener.
#[derive(Debug, Clone, Deserialize)]
pub struct TlsConfig {
    /// PEM file with the server certificate chain.
    pub cert_file: PathBuf,
    /// PEM file with the server private key (PKCS#8, PKCS#1 or SEC1).
    pub key_file: PathBuf,
    /// PEM file with the CA certificates that sign client certificates. Setting it turns on
    /// mTLS: every client must present a certificate signed by one of these CAs.
    #[serde(default)]
    pub client_ca_file: Option<PathBuf>,
}

/// The admin listener (`/healthz`, `/readyz`, `/metrics`).
#[derive(Debug, Clone, Deserialize)]
pub struct AdminConfig {
    #[serde(default = "default_admin_address")]
    pub address: SocketAddr,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig { address: default_admin_address() }
    }
}

/// Where each Stripe host is, and how keygate talks to it.
#[derive(Debug, Clone, Deserialize)]
pub struct UpstreamsConfig {
    #[serde(default = "default_api")]
    pub api: String,
    #[serde(default = "default_files")]
    pub files: String,
    #[serde(default = "default_connect")]
    pub connect: String,
    #[serde(default = "default_meter_events")]
    pub meter_events: String,
    /// How long keygate waits for Stripe's whole response (Stripe's SDKs wait 80 s).
    #[serde(default = "default_upstream_timeout", with = "humantime_serde")]
    pub timeout: Duration,
    /// How long keygate waits for a TCP + TLS connection to Stripe.
    #[serde(default = "default_connect_timeout", with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// Idle pooled connections are closed after this long.
    #[serde(default = "default_pool_idle_timeout", with = "humantime_serde")]
    pub pool_idle_timeout: Duration,
    /// At most this many idle connections are kept per Stripe host.
    #[serde(default = "default_pool_max_idle")]
    pub pool_max_idle_per_host: usize,
    /// Extra PEM CA certificates trusted for upstream TLS, besides the Mozilla roots (for a
    /// TLS-intercepting egress gateway, or tests).
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
}

impl Default for UpstreamsConfig {
    fn default() -> Self {
        UpstreamsConfig {
            api: default_api(),
            files: default_files(),
            connect: default_connect(),
            meter_events: default_meter_events(),
            timeout: default_upstream_timeout(),
            connect_timeout: default_connect_timeout(),
            pool_idle_timeout: default_pool_idle_timeout(),
            pool_max_idle_per_host: default_pool_max_idle(),
            ca_file: None,
        }
    }
}

impl UpstreamsConfig {
    /// The configured base URL for a host.
    pub fn base_url(&self, host: StripeHost) -> &str {
        match host {
            StripeHost::Api => &self.api,
            StripeHost::Files => &self.files,
            StripeHost::Connect => &self.connect,
            StripeHost::MeterEvents => &self.meter_events,
        }
    }
}

/// Limits that protect keygate from clients.
#[derive(Debug, Clone, Deserialize)]
pub struct LimitsConfig {
    /// Largest total size of request headers (names + values), answered 431 beyond.
    #[serde(default = "default_max_header_bytes")]
    pub max_header_bytes: usize,
    /// Most request headers, answered 431 beyond.
    #[serde(default = "default_max_headers")]
    pub max_headers: usize,
    /// Largest request body for the api, connect and meter-events hosts, answered 413 beyond.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// Largest request body for the files host (uploads go up to 16 MB, plus multipart framing).
    #[serde(default = "default_max_file_body_bytes")]
    pub max_file_body_bytes: u64,
    /// Largest response body keygate accepts from Stripe (it is buffered for the audit record).
    #[serde(default = "default_max_response_bytes")]
    pub max_response_bytes: u64,
    /// From accept, a client must finish its TLS handshake and send its first whole request head
    /// within this time (slow-client protection); over HTTP/1.1 every later head too.
    #[serde(default = "default_header_read_timeout", with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A client must send its whole request body within this time.
    #[serde(default = "default_body_read_timeout", with = "humantime_serde")]
    pub body_read_timeout: Duration,
    /// A connection with no request in flight for this long is closed (HTTP/2: GOAWAY first).
    #[serde(default = "default_idle_timeout", with = "humantime_serde")]
    pub idle_timeout: Duration,
    /// Most client connections open at once; more wait in the kernel's accept queue.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Most HTTP/2 streams (requests) open at once on one connection.
    #[serde(default = "default_http2_max_concurrent_streams")]
    pub http2_max_concurrent_streams: u32,
    /// keygate pings an HTTP/2 client this often when the connection is otherwise silent…
    #[serde(default = "default_http2_keep_alive_interval", with = "humantime_serde")]
    pub http2_keep_alive_interval: Duration,
    /// …and closes the connection when the ping is not answered within this time (a dead peer).
    #[serde(default = "default_http2_keep_alive_timeout", with = "humantime_serde")]
    pub http2_keep_alive_timeout: Duration,
    /// Most request-body bytes buffered at once across every request (see `crate::budget`);
    /// a request that cannot get its share in `buffer_wait` is answered 503 `keygate_overloaded`.
    #[serde(default = "default_max_buffered_bytes")]
    pub max_buffered_bytes: u64,
    /// What a request reserves of `max_buffered_bytes` for its response before it is sent to
    /// Stripe (a larger response grows its reservation while it arrives).
    #[serde(default = "default_response_buffer_reserve")]
    pub response_buffer_reserve: u64,
    /// How long a request waits for its share of `max_buffered_bytes` before it is refused.
    #[serde(default = "default_buffer_wait", with = "humantime_serde")]
    pub buffer_wait: Duration,
    /// The fraction of `max_buffered_bytes` that one connection may hold at once.
    #[serde(default = "default_buffered_share_per_connection")]
    pub buffered_share_per_connection: f64,
    /// The fraction of `max_buffered_bytes` that one service (all its connections) may hold.
    #[serde(default = "default_buffered_share_per_service")]
    pub buffered_share_per_service: f64,
    /// On SIGTERM/SIGINT, in-flight requests get this long to finish.
    #[serde(default = "default_shutdown_grace", with = "humantime_serde")]
    pub shutdown_grace: Duration,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            max_header_bytes: default_max_header_bytes(),
            max_headers: default_max_headers(),
            max_body_bytes: default_max_body_bytes(),
            max_file_body_bytes: default_max_file_body_bytes(),
            max_response_bytes: default_max_response_bytes(),
            header_read_timeout: default_header_read_timeout(),
            body_read_timeout: default_body_read_timeout(),
            idle_timeout: default_idle_timeout(),
            max_connections: default_max_connections(),
            http2_max_concurrent_streams: default_http2_max_concurrent_streams(),
            http2_keep_alive_interval: default_http2_keep_alive_interval(),
            http2_keep_alive_timeout: default_http2_keep_alive_timeout(),
            max_buffered_bytes: default_max_buffered_bytes(),
            response_buffer_reserve: default_response_buffer_reserve(),
            buffer_wait: default_buffer_wait(),
            buffered_share_per_connection: default_buffered_share_per_connection(),
            buffered_share_per_service: default_buffered_share_per_service(),
            shutdown_grace: default_shutdown_grace(),
        }
    }
}

/// Where the per-service policy files are.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct PoliciesConfig {
    /// Folder with one YAML policy file per service. Required outside the quick start.
    #[serde(default)]
    pub dir: Option<PathBuf>,
}

/// Log output.
#[derive(Debug, Clone, Deserialize)]
pub struct LogConfig {
    /// `json` (one JSON object per line) or `text`.
    #[serde(default)]
    pub format: LogFormat,
    /// A `tracing` filter such as `info` or `keygate=debug`.
    #[serde(default = "default_log_level")]
    pub level: String,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { format: LogFormat::default(), level: default_log_level() }
    }
}

/// Log line format.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Json,
    Text,
}

fn default_listen_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 8080))
}
fn default_admin_address() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 9090))
}
fn default_api() -> String {
    "https://api.stripe.com".into()
}
fn default_files() -> String {
    "https://files.stripe.com".into()
}
fn default_connect() -> String {
    "https://connect.stripe.com".into()
}
fn default_meter_events() -> String {
    "https://meter-events.stripe.com".into()
}
fn default_upstream_timeout() -> Duration {
    Duration::from_secs(80)
}
fn default_connect_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_pool_idle_timeout() -> Duration {
    Duration::from_secs(90)
}
fn default_pool_max_idle() -> usize {
    64
}
fn default_max_header_bytes() -> usize {
    32 * 1024
}
fn default_max_headers() -> usize {
    100
}
fn default_max_body_bytes() -> u64 {
    1024 * 1024
}
fn default_max_file_body_bytes() -> u64 {
    17 * 1024 * 1024
}
fn default_max_response_bytes() -> u64 {
    64 * 1024 * 1024
}
fn default_header_read_timeout() -> Duration {
    Duration::from_secs(10)
}
fn default_body_read_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_max_connections() -> usize {
    10_000
}
fn default_idle_timeout() -> Duration {
    Duration::from_secs(60)
}
fn default_http2_max_concurrent_streams() -> u32 {
    100
}
fn default_http2_keep_alive_interval() -> Duration {
    Duration::from_secs(20)
}
fn default_http2_keep_alive_timeout() -> Duration {
    Duration::from_secs(20)
}
fn default_max_buffered_bytes() -> u64 {
    256 * 1024 * 1024
}
fn default_response_buffer_reserve() -> u64 {
    64 * 1024
}
fn default_buffer_wait() -> Duration {
    Duration::from_secs(1)
}
fn default_buffered_share_per_connection() -> f64 {
    0.125
}
fn default_buffered_share_per_service() -> f64 {
    0.5
}
fn default_shutdown_grace() -> Duration {
    Duration::from_secs(30)
}
fn default_log_level() -> String {
    "info".into()
}

/// Every problem found in a configuration, reported together.
#[derive(Debug, thiserror::Error)]
#[error("{}", render_problems(.source_name, .problems))]
pub struct ConfigError {
    /// Where the configuration came from (file path, or "the built-in defaults").
    pub source_name: String,
    /// One line per problem, each naming the key and what to do.
    pub problems: Vec<String>,
}

fn render_problems(source: &str, problems: &[String]) -> String {
    let mut text = format!("invalid keygate configuration ({source}): {} problem(s)", problems.len());
    for problem in problems {
        text.push_str("\n  - ");
        text.push_str(problem);
    }
    text
}

/// The top-level sections; a `KEYGATE_…` variable whose first segment is not one of these is
/// not configuration (tools use the prefix too) and is left alone.
const SECTIONS: [&str; 13] = [
    "listen",
    "admin",
    "upstreams",
    "limits",
    "policies",
    "log",
    "secrets",
    "audit",
    "limit_store",
    "webhooks",
    "reconcile",
    "anomalies",
    "alerts",
];

/// Reads the YAML file (if any), applies `KEYGATE_…` overrides from `env`, and validates.
pub fn load(path: Option<&Path>, env: &[(String, String)]) -> Result<Config, ConfigError> {
    let source_name = path.map_or_else(|| "the built-in defaults".to_owned(), |p| p.display().to_string());
    let fail = |problems: Vec<String>| ConfigError { source_name: source_name.clone(), problems };

    let mut tree = match path {
        None => Value::Object(Default::default()),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| fail(vec![format!("cannot read the file: {e}; check the path given to --config")]))?;
            if text.trim().is_empty() {
                Value::Object(Default::default())
            } else {
                serde_saphyr::from_str::<Value>(&text)
                    .map_err(|e| fail(vec![format!("the file is not valid YAML: {}", yaml_error_summary(&e))]))?
            }
        }
    };
    if tree.is_null() {
        tree = Value::Object(Default::default());
    }
    if !tree.is_object() {
        return Err(fail(vec!["the top level must be a mapping of sections (listen, admin, …)".into()]));
    }

    let mut problems = apply_env_overrides(&mut tree, env);

    let mut unknown = Vec::new();
    let mut track = serde_path_to_error::Track::new();
    let parsed: Result<Config, serde_json::Error> =
        serde_ignored::deserialize(serde_path_to_error::Deserializer::new(&tree, &mut track), |ignored| {
            // serde_ignored writes an `Option`'s inside as `?` (`webhooks.?.bogus`).
            unknown.push(ignored.to_string().replace(".?", ""))
        });
    for key in &unknown {
        problems.push(format!("unknown key `{key}`: remove it or check its spelling in docs/configuration.md"));
    }
    let config = match parsed {
        Ok(config) => Some(config),
        Err(error) => {
            problems.push(describe_type_error(&track.path().to_string(), &error));
            None
        }
    };
    if let Some(config) = &config {
        problems.extend(validate(config, path.is_some()));
    }
    match config {
        Some(config) if problems.is_empty() => Ok(config),
        _ => Err(fail(problems)),
    }
}

/// The YAML parser's message, which quotes positions but may quote text: keep the first line only.
fn yaml_error_summary(error: &serde_saphyr::Error) -> String {
    error.to_string().lines().next().unwrap_or("syntax error").to_owned()
}

fn describe_type_error(path: &str, error: &serde_json::Error) -> String {
    let inner = error.to_string();
    if inner.starts_with("unknown field") {
        // Names the field and the accepted ones; no value in it.
        return format!("`{path}`: {}", inner.split(" at line").next().unwrap_or(&inner));
    }
    // serde_json's messages quote the offending value ("invalid type: string \"…\""); keep only
    // the kind of problem so a mistyped secret never lands in an error.
    let kind = inner.split(':').next().unwrap_or("invalid value");
    let expected = inner.rsplit_once("expected ").map(|(_, e)| e.to_owned());
    match expected {
        Some(expected) => format!("`{path}`: {kind}; expected {expected}"),
        None => format!("`{path}`: {kind}"),
    }
}

/// Applies `KEYGATE_SECTION__KEY…=value` overrides. Values are read as YAML scalars (so `8080`
/// is a number and `true` a boolean; quote a value to force a string).
fn apply_env_overrides(tree: &mut Value, env: &[(String, String)]) -> Vec<String> {
    let mut problems = Vec::new();
    let overrides: BTreeMap<&str, &str> =
        env.iter().filter_map(|(name, value)| Some((name.strip_prefix(ENV_PREFIX)?, value.as_str()))).collect();
    for (suffix, raw) in overrides {
        let path: Vec<String> = suffix.split("__").map(str::to_ascii_lowercase).collect();
        let Some(section) = path.first() else { continue };
        if !SECTIONS.contains(&section.as_str()) {
            continue;
        }
        if path.iter().any(String::is_empty) {
            problems.push(format!("environment variable {ENV_PREFIX}{suffix}: empty key segment"));
            continue;
        }
        let value = match serde_saphyr::from_str::<Value>(raw) {
            Ok(Value::Null) if raw.trim().is_empty() => Value::String(String::new()),
            Ok(value) => value,
            Err(_) => Value::String(raw.to_owned()),
        };
        if let Err(problem) = set_path(tree, &path, value) {
            problems.push(format!("environment variable {ENV_PREFIX}{suffix}: {problem}"));
        }
    }
    problems
}

fn set_path(tree: &mut Value, path: &[String], value: Value) -> Result<(), String> {
    let mut node = tree;
    for (depth, key) in path.iter().enumerate() {
        if !node.is_object() {
            if node.is_null() {
                *node = Value::Object(Default::default());
            } else {
                return Err(format!("`{}` is not a section", path[..depth].join(".")));
            }
        }
        let Value::Object(map) = node else { return Err("unreachable".into()) };
        if depth + 1 == path.len() {
            map.insert(key.clone(), value);
            return Ok(());
        }
        node = map.entry(key.clone()).or_insert(Value::Null);
    }
    Ok(())
}

/// Semantic checks that types cannot express. Returns every problem. Without a file (the quick
/// start) the policy folder is optional: keygate then runs its built-in allow-all policy.
fn validate(config: &Config, from_file: bool) -> Vec<String> {
    let mut problems = Vec::new();
    for host in StripeHost::ALL {
        if let Err(problem) = parse_base_url(config.upstreams.base_url(host)) {
            problems.push(format!("`upstreams.{}`: {problem}", host.as_str()));
        }
    }
    for (key, value) in [
        ("upstreams.timeout", config.upstreams.timeout),
        ("upstreams.connect_timeout", config.upstreams.connect_timeout),
        ("limits.header_read_timeout", config.limits.header_read_timeout),
        ("limits.body_read_timeout", config.limits.body_read_timeout),
        ("limits.idle_timeout", config.limits.idle_timeout),
        ("limits.http2_keep_alive_interval", config.limits.http2_keep_alive_interval),
        ("limits.http2_keep_alive_timeout", config.limits.http2_keep_alive_timeout),
        ("limits.buffer_wait", config.limits.buffer_wait),
    ] {
        if value.is_zero() {
            problems.push(format!("`{key}` must be longer than 0s"));
        }
    }
    for (key, value) in [
        ("limits.max_header_bytes", config.limits.max_header_bytes as u64),
        ("limits.max_headers", config.limits.max_headers as u64),
        ("limits.max_body_bytes", config.limits.max_body_bytes),
        ("limits.max_file_body_bytes", config.limits.max_file_body_bytes),
        ("limits.max_response_bytes", config.limits.max_response_bytes),
        ("limits.max_connections", config.limits.max_connections as u64),
        ("limits.http2_max_concurrent_streams", u64::from(config.limits.http2_max_concurrent_streams)),
        ("limits.max_buffered_bytes", config.limits.max_buffered_bytes),
    ] {
        if value == 0 {
            problems.push(format!("`{key}` must be at least 1"));
        }
    }
    problems.extend(validate_buffer_shares(&config.limits));
    if config.limits.max_header_bytes < 1024 {
        problems.push("`limits.max_header_bytes` must be at least 1024: Stripe SDKs send about 1 KiB".into());
    }
    if config.limits.max_file_body_bytes < config.limits.max_body_bytes {
        problems.push("`limits.max_file_body_bytes` must be at least `limits.max_body_bytes`".into());
    }
    // One exchange is one audit WAL record, which the WAL refuses beyond its largest frame.
    let limits = &config.limits;
    let largest_body = limits.max_body_bytes.max(limits.max_file_body_bytes);
    let exchange =
        largest_body.saturating_add(limits.max_response_bytes).saturating_add(limits.max_header_bytes as u64);
    if config.audit.enabled && exchange > keygate_auditlog::MAX_AUDITED_EXCHANGE_BYTES {
        problems.push(format!(
            "`limits.max_response_bytes` ({}) + the largest request body (`limits.max_file_body_bytes` / \
             `limits.max_body_bytes`, {largest_body}) + `limits.max_header_bytes` ({}) must be at most {} bytes, \
             the largest exchange one audit record can hold (the audit WAL's largest frame is {} bytes, with room \
             for redaction and encoding): lower `limits.max_response_bytes` or the body limits",
            limits.max_response_bytes,
            limits.max_header_bytes,
            keygate_auditlog::MAX_AUDITED_EXCHANGE_BYTES,
            keygate_auditlog::MAX_FRAME_BODY,
        ));
    }
    if config.listen.address == config.admin.address && config.listen.address.port() != 0 {
        problems.push("`listen.address` and `admin.address` must differ".into());
    }
    if let Some(tls) = &config.listen.tls {
        for (key, path) in [
            ("cert_file", Some(&tls.cert_file)),
            ("key_file", Some(&tls.key_file)),
            ("client_ca_file", tls.client_ca_file.as_ref()),
        ] {
            if let Some(path) = path
                && !path.is_file()
            {
                problems.push(format!("`listen.tls.{key}`: {} is not a readable file", path.display()));
            }
        }
    }
    if let Some(path) = &config.upstreams.ca_file
        && !path.is_file()
    {
        problems.push(format!("`upstreams.ca_file`: {} is not a readable file", path.display()));
    }
    match &config.policies.dir {
        Some(dir) if !dir.is_dir() => {
            problems.push(format!("`policies.dir`: {} is not a folder", dir.display()));
        }
        Some(_) => {}
        None if !from_file => {}
        None => problems.push(
            "`policies.dir` is required: the folder with one policy file per service (see docs/policies.md)".into(),
        ),
    }
    if let Err(error) = tracing_subscriber::EnvFilter::try_new(&config.log.level) {
        problems.push(format!("`log.level`: {error}"));
    }
    if let Err(error) = config.secrets.validate() {
        problems.push(format!("`secrets`: {error}"));
    }
    problems.extend(config.limit_store.validate());
    if let Some(webhooks) = &config.webhooks {
        problems.extend(webhooks.validate());
        let ingress = webhooks.listen.address;
        for (key, address) in [("listen.address", config.listen.address), ("admin.address", config.admin.address)] {
            if ingress == address && ingress.port() != 0 {
                problems
                    .push(format!("`webhooks.listen.address` and `{key}` must differ: the ingress faces the internet"));
            }
        }
    }
    if config.reconcile.enabled {
        for (key, value) in
            [("reconcile.interval", config.reconcile.interval), ("reconcile.lookback", config.reconcile.lookback)]
        {
            if value.is_zero() {
                problems.push(format!("`{key}` must be longer than 0s"));
            }
        }
        if !config.audit.enabled || config.audit.lake.is_empty() {
            problems.push(
                "`reconcile.enabled` needs the audit lake (`audit.enabled: true` and `audit.lake`): it closes the lake's unknown rows"
                    .into(),
            );
        }
    }
    if let Some(Err(error)) = config.anomalies.as_ref().map(keygate_detectors::AnomaliesConfig::validate) {
        problems.push(error.to_string());
    }
    let mut alert_destinations = std::collections::BTreeSet::new();
    for (index, destination) in config.alerts.destinations.iter().enumerate() {
        let key = format!("alerts.destinations[{index}]");
        problems.extend(destination.validate(&key));
        if !alert_destinations.insert(destination.name.as_str()) {
            problems.push(format!("`{key}.name`: destination `{}` is configured twice", destination.name));
        }
    }
    if !config.alerts.destinations.is_empty() && config.anomalies.is_none() {
        problems.push(
            "`alerts.destinations` delivers anomaly alerts, but anomaly detection is off: add an `anomalies` section \
             (see docs/anomalies.md) or remove `alerts`"
                .into(),
        );
    }
    // Without a file (the quick start) keygate generates the audit keys itself.
    if from_file && let Err(error) = config.audit.validate() {
        problems.push(format!("`audit`: {error}"));
    }
    problems
}

/// The buffer budget's shares: fractions in (0, 1], large enough for the largest body one request
/// may send (else such a request could never be served), a service's at least a connection's.
fn validate_buffer_shares(limits: &LimitsConfig) -> Vec<String> {
    let mut problems = Vec::new();
    let shares = [
        ("limits.buffered_share_per_connection", limits.buffered_share_per_connection),
        ("limits.buffered_share_per_service", limits.buffered_share_per_service),
    ];
    for (key, share) in shares {
        if !(share > 0.0 && share <= 1.0) {
            problems.push(format!("`{key}` must be a fraction above 0 and at most 1 (0.125 is one eighth)"));
        }
    }
    if !problems.is_empty() {
        return problems;
    }
    let largest_body = limits.max_file_body_bytes.max(limits.max_body_bytes);
    if limits.connection_buffer_bytes() < largest_body {
        problems.push(format!(
            "`limits.max_buffered_bytes` × `limits.buffered_share_per_connection` ({} bytes) must be at least the \
             largest body a request may send (`limits.max_file_body_bytes`, {largest_body}): raise either, or lower \
             `max_file_body_bytes`",
            limits.connection_buffer_bytes()
        ));
    }
    if limits.max_response_bytes > limits.max_buffered_bytes {
        problems.push(format!(
            "`limits.max_response_bytes` ({}) must be at most `limits.max_buffered_bytes` ({}): responses are \
             buffered inside that budget, so a larger one could never be read; raise `max_buffered_bytes` or \
             lower `max_response_bytes`",
            limits.max_response_bytes, limits.max_buffered_bytes
        ));
    }
    if limits.response_buffer_reserve == 0 || limits.response_buffer_reserve > limits.connection_buffer_bytes() {
        problems.push(format!(
            "`limits.response_buffer_reserve` ({}) must be above 0 and at most one connection's share of the \
             buffer (`limits.max_buffered_bytes` × `limits.buffered_share_per_connection` = {} bytes)",
            limits.response_buffer_reserve,
            limits.connection_buffer_bytes()
        ));
    }
    if limits.buffered_share_per_service < limits.buffered_share_per_connection {
        problems
            .push("`limits.buffered_share_per_service` must be at least `limits.buffered_share_per_connection`".into());
    }
    problems
}

impl LimitsConfig {
    /// The bytes of the buffer budget one connection may hold (`max_buffered_bytes` × its share).
    pub fn connection_buffer_bytes(&self) -> u64 {
        share_of(self.max_buffered_bytes, self.buffered_share_per_connection)
    }

    /// The bytes of the buffer budget one service may hold (`max_buffered_bytes` × its share).
    pub fn service_buffer_bytes(&self) -> u64 {
        share_of(self.max_buffered_bytes, self.buffered_share_per_service)
    }
}

/// `total × share`, rounded down, never above `total`.
fn share_of(total: u64, share: f64) -> u64 {
    // Budgets are far below 2^53 bytes, so the f64 product is exact enough; `as` saturates.
    let bytes = (total as f64 * share.clamp(0.0, 1.0)).floor() as u64;
    bytes.min(total)
}

/// Checks an upstream base URL: `http` or `https`, a host, no query, no path beyond `/`.
pub fn parse_base_url(text: &str) -> Result<Uri, String> {
    let uri: Uri = text.parse().map_err(|_| "not a URL; expected e.g. https://api.stripe.com".to_owned())?;
    match uri.scheme_str() {
        Some("http" | "https") => {}
        _ => return Err("the scheme must be http or https".into()),
    }
    if uri.authority().is_none() {
        return Err("the URL has no host".into());
    }
    if uri.path() != "/" && !uri.path().is_empty() {
        return Err("the URL must not have a path: keygate appends the request's own path".into());
    }
    if uri.query().is_some() {
        return Err("the URL must not have a query".into());
    }
    Ok(uri)
}

/// Variables of the current process, for [`load`].
pub fn process_env() -> Vec<(String, String)> {
    std::env::vars().filter(|(name, _)| name.starts_with(ENV_PREFIX)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_text(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("{e}"));
        let path = dir.path().join("keygate.yaml");
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).unwrap_or_else(|e| panic!("{e}"));
        let mut text = text.replace("POLICIES", &policies.display().to_string());
        // These tests are about the proxy's own sections; the audit section has its own tests.
        if !text.contains("audit:") {
            text.push_str("audit:\n  enabled: false\n");
        }
        std::fs::write(&path, text).unwrap_or_else(|e| panic!("{e}"));
        let env: Vec<(String, String)> = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        load(Some(&path), &env)
    }

    #[test]
    fn defaults_fill_everything_but_the_policy_folder() {
        let config = load_text("policies:\n  dir: POLICIES\n", &[]).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.listen.address.to_string(), "127.0.0.1:8080");
        assert_eq!(config.upstreams.api, "https://api.stripe.com");
        assert_eq!(config.upstreams.timeout, Duration::from_secs(80));
        assert_eq!(config.limits.max_file_body_bytes, 17 * 1024 * 1024);
    }

    #[test]
    fn environment_overrides_nested_keys_with_typed_values() {
        let config = load_text(
            "policies:\n  dir: POLICIES\nupstreams:\n  api: https://api.stripe.com\n",
            &[
                ("KEYGATE_UPSTREAMS__API", "http://127.0.0.1:12111"),
                ("KEYGATE_LIMITS__MAX_HEADERS", "50"),
                ("KEYGATE_UPSTREAMS__TIMEOUT", "2s"),
                ("KEYGATE_TOOLS_BIN", "/not/config"),
            ],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.upstreams.api, "http://127.0.0.1:12111");
        assert_eq!(config.limits.max_headers, 50);
        assert_eq!(config.upstreams.timeout, Duration::from_secs(2));
    }

    #[test]
    fn every_problem_is_listed_at_once() {
        let error = load_text(
            "listen:\n  adress: 1.2.3.4:1\nupstreams:\n  api: ftp://x\n  files: https://files.stripe.com/v1\nlimits:\n  max_headers: 0\nbogus: 1\n",
            &[("KEYGATE_LIMITS__MAX_BODY_BYTS", "5")],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        for expected in [
            "unknown key `listen.adress`",
            "unknown key `bogus`",
            "unknown key `limits.max_body_byts`",
            "`upstreams.api`: the scheme must be http or https",
            "`upstreams.files`: the URL must not have a path",
            "`limits.max_headers` must be at least 1",
            "`policies.dir` is required",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
    }

    #[test]
    fn alert_destinations_are_checked_like_webhook_destinations_and_need_anomalies() {
        let error = load_text(
            "policies:\n  dir: POLICIES\nalerts:\n  destinations:\n    - name: pager\n      url: ftp://alerts\n      secret: env://ALERTS\n    - name: pager\n      kind: kafka\n      url: https://x\n",
            &[],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        for expected in [
            "`alerts.destinations[0].url`",
            "`alerts.destinations[1].name`: destination `pager` is configured twice",
            "`alerts.destinations[1].url` is a setting of `kind: http` destinations",
            "`alerts.destinations` delivers anomaly alerts, but anomaly detection is off",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let config = load_text(
            "policies:\n  dir: POLICIES\nanomalies: {}\nalerts:\n  destinations:\n    - name: pager\n      url: https://alerts.example/keygate\n      secret: env://ALERTS\n      events: [keygate.anomaly.amount]\n",
            &[],
        )
        .unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(config.alerts.destinations[0].name, "pager");
        assert!(config.alerts.destinations[0].filters()[0].matches("keygate.anomaly.amount"));
    }

    #[test]
    fn the_limits_default_to_bounds_a_production_proxy_would_pick() {
        let limits = load_text("policies:\n  dir: POLICIES\n", &[]).unwrap_or_else(|e| panic!("{e}")).limits;
        assert_eq!(limits.header_read_timeout, Duration::from_secs(10));
        assert_eq!(limits.idle_timeout, Duration::from_secs(60));
        assert_eq!(limits.http2_max_concurrent_streams, 100);
        assert_eq!(limits.http2_keep_alive_interval, Duration::from_secs(20));
        assert_eq!(limits.http2_keep_alive_timeout, Duration::from_secs(20));
        assert_eq!(limits.max_buffered_bytes, 256 * 1024 * 1024);
        assert_eq!(limits.buffer_wait, Duration::from_secs(1));
        assert_eq!(limits.connection_buffer_bytes(), 32 * 1024 * 1024);
        assert_eq!(limits.service_buffer_bytes(), 128 * 1024 * 1024);
    }

    #[test]
    fn buffer_shares_must_be_fractions_that_fit_the_largest_body() {
        let error = load_text(
            "policies:\n  dir: POLICIES\nlimits:\n  buffered_share_per_connection: 1.5\n  buffered_share_per_service: 0\n  idle_timeout: 0s\n  http2_max_concurrent_streams: 0\n",
            &[],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        for expected in [
            "`limits.buffered_share_per_connection` must be a fraction",
            "`limits.buffered_share_per_service` must be a fraction",
            "`limits.idle_timeout` must be longer than 0s",
            "`limits.http2_max_concurrent_streams` must be at least 1",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        // 64 MiB × 1/8 = 8 MiB cannot hold a 17 MiB upload.
        let error = load_text("policies:\n  dir: POLICIES\nlimits:\n  max_buffered_bytes: 67108864\n", &[])
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert!(error.to_string().contains("must be at least the largest body"), "{error}");
        let error = load_text(
            "policies:\n  dir: POLICIES\nlimits:\n  buffered_share_per_connection: 0.5\n  buffered_share_per_service: 0.25\n",
            &[],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted"));
        assert!(error.to_string().contains("`limits.buffered_share_per_service` must be at least"), "{error}");
        // Responses are buffered inside the budget: the largest one must fit it.
        let error = load_text(
            "policies:\n  dir: POLICIES\nlimits:\n  max_buffered_bytes: 16777216\n  max_file_body_bytes: 2097152\n",
            &[],
        )
        .err()
        .unwrap_or_else(|| panic!("accepted"));
        assert!(error.to_string().contains("`limits.max_response_bytes` (67108864) must be at most"), "{error}");
        let error = load_text("policies:\n  dir: POLICIES\nlimits:\n  response_buffer_reserve: 0\n", &[])
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        assert!(error.to_string().contains("`limits.response_buffer_reserve` (0) must be above 0"), "{error}");
        let fits = load_text(
            "policies:\n  dir: POLICIES\nlimits:\n  max_buffered_bytes: 16777216\n  max_file_body_bytes: 2097152\n  \
             max_response_bytes: 8388608\n",
            &[],
        );
        assert!(fits.is_ok(), "{:?}", fits.err().map(|e| e.to_string()));
    }

    #[test]
    fn limits_the_audit_wal_cannot_frame_are_refused() {
        let audit = "audit:\n  kek: env://KEK\n  signing_key: env://SIGNING\n";
        let bound = keygate_auditlog::MAX_AUDITED_EXCHANGE_BYTES;
        let defaults = load_text(&format!("policies:\n  dir: POLICIES\n{audit}"), &[]);
        assert!(defaults.is_ok(), "the default limits fit: {:?}", defaults.err().map(|e| e.to_string()));
        let too_large = format!("policies:\n  dir: POLICIES\nlimits:\n  max_response_bytes: {bound}\n{audit}");
        let error = load_text(&too_large, &[]).err().unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        assert!(text.contains("`limits.max_response_bytes`"), "{text}");
        assert!(text.contains(&format!("at most {bound} bytes")), "names the bound: {text}");
        // The response limit is raised as far as the bound allows, given the other limits.
        let limits = LimitsConfig::default();
        let largest = bound - limits.max_file_body_bytes - limits.max_header_bytes as u64;
        let fits = format!("policies:\n  dir: POLICIES\nlimits:\n  max_response_bytes: {largest}\n{audit}");
        assert!(load_text(&fits, &[]).is_ok());
        let over = format!("policies:\n  dir: POLICIES\nlimits:\n  max_response_bytes: {}\n{audit}", largest + 1);
        assert!(load_text(&over, &[]).is_err());
        // Without an audit log nothing is framed.
        assert!(load_text(&too_large.replace(audit, "audit:\n  enabled: false\n"), &[]).is_ok());
    }

    #[test]
    fn the_webhooks_section_is_validated_with_the_rest() {
        let text = "policies:\n  dir: POLICIES\nwebhooks:\n  listen:\n    address: 127.0.0.1:8080\n  bogus: 1\n  endpoints:\n    - name: main\n      secrets: [\"env://WHSEC\"]\n      tolerance: 0s\n      destinations:\n        - name: billing\n          url: http://127.0.0.1:1/hook\n          secret: env://DEST\n";
        let error = load_text(text, &[]).err().unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        for expected in [
            "unknown key `webhooks.bogus`",
            "`webhooks.endpoints[0].tolerance` must be longer than 0s",
            "`webhooks.listen.address` and `listen.address` must differ",
        ] {
            assert!(text.contains(expected), "missing {expected:?} in:\n{text}");
        }
        let fine = "policies:\n  dir: POLICIES\nwebhooks:\n  endpoints:\n    - name: main\n      secrets: [\"env://WHSEC\"]\n      destinations:\n        - name: billing\n          url: http://127.0.0.1:1/hook\n          secret: env://DEST\n";
        let config = load_text(fine, &[("KEYGATE_WEBHOOKS__DEDUP_WINDOW", "3d")]).unwrap_or_else(|e| panic!("{e}"));
        let webhooks = config.webhooks.unwrap_or_else(|| panic!("no webhooks section"));
        assert_eq!(webhooks.dedup_window, Duration::from_secs(3 * 24 * 3600));
        assert!(load_text("policies:\n  dir: POLICIES\n", &[]).is_ok_and(|c| c.webhooks.is_none()));
    }

    #[test]
    fn type_errors_name_the_key_but_not_the_value() {
        let error = load_text("policies:\n  dir: POLICIES\nlimits:\n  max_headers: sk_live_canary\n", &[])
            .err()
            .unwrap_or_else(|| panic!("accepted"));
        let text = error.to_string();
        assert!(text.contains("`limits.max_headers`"), "{text}");
        assert!(!text.contains("sk_live_canary"), "{text}");
    }
}
