//! `auditlog`: SQL over keygate's audit lake, one exchange decrypted, and integrity verification.
//!
//! Reads only the `secrets` and `audit` sections of a keygate config (`--config`), or takes the
//! lake and keys from flags. Keys are always secret references (never literal keys on the command
//! line, where `ps` would show them). Exit codes: 0 success (verify: no finding), 1 verify found
//! something, 2 error.

mod anomalies;

use std::io::{IsTerminal, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use arrow::array::{Array, ArrayRef, BinaryArray, RecordBatch, StringArray};
use arrow::datatypes::{DataType, Field, Schema};
use base64::Engine as _;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use keygate_auditlog::Table;
use keygate_auditlog::crypto::KekRing;
use keygate_auditlog::lake::Lake;
use keygate_auditlog::query::{Decryptor, event_sql_anywhere, event_sql_in, run_sql};
use keygate_auditlog::verify::{VerifyOptions, verify};
use keygate_auditlog::{AuditConfig, AuditError, keys};
use keygate_secrets::{SecretStore, SecretsConfig};
use serde::Deserialize;

#[derive(Parser, Debug)]
#[command(name = "auditlog", version, about = "Query, show and verify keygate's audit lake")]
struct Cli {
    /// keygate config file; only its `secrets` and `audit` sections are read.
    #[arg(long, global = true, env = "KEYGATE_CONFIG")]
    config: Option<PathBuf>,
    /// The lake: file:///path, a path, or s3://bucket/prefix. Default: audit.lake of --config.
    #[arg(long, global = true)]
    lake: Option<String>,
    /// S3 endpoint override (MinIO, moto, …).
    #[arg(long, global = true)]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, global = true)]
    s3_region: Option<String>,
    /// Allow http:// S3 endpoints.
    #[arg(long, global = true)]
    s3_allow_http: bool,
    /// Key-encryption key as a secret reference (env://, file://, vault://, aws-sm://,
    /// vault-transit://); repeat for files written under rotated keys. Default: audit.kek.
    #[arg(long = "kek", global = true)]
    kek: Vec<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Runs SQL over tables `audit`, `webhooks` and `anomalies` (partition columns `dt` = 'YYYY-MM-DD' and `hour` = 'HH' prune files).
    Query {
        /// The SQL, e.g. "SELECT service, count(*) FROM audit WHERE dt = '2026-11-29' GROUP BY 1".
        sql: String,
        #[arg(long, value_enum, default_value_t = Format::Table)]
        format: Format,
        /// Adds a `payload_json` column with the decrypted, redacted exchange (needs the KEK, and
        /// writer_id, seq, event_id and payload in the result).
        #[arg(long)]
        decrypt: bool,
    },
    /// Shows one exchange, decrypted when the KEK is available.
    Show {
        /// The event_id (UUID).
        event_id: String,
    },
    /// Checks signatures, manifests, files and the hash chain; exit code 1 on any finding.
    Verify {
        /// Only files with rows received at or after this time: RFC 3339 (2026-11-29T10:00:00Z),
        /// a date (2026-11-29), or a duration before now (24h, 7days).
        #[arg(long)]
        since: Option<String>,
        /// Trusted Ed25519 public key: ed25519-pub:<64 hex>, a PUBLIC KEY PEM, 64 hex characters,
        /// or a secret reference whose value is one of those; repeatable. Default: the public
        /// half of audit.signing_key.
        #[arg(long = "public-key")]
        public_keys: Vec<String>,
        /// Secret reference to a signing key (PKCS#8 PEM, ed25519-seed:<64 hex>, or 64 hex
        /// characters read as a seed) whose public half is trusted; repeatable.
        #[arg(long = "signing-key")]
        signing_keys: Vec<String>,
        #[arg(long, value_enum, default_value_t = VerifyFormat::Text)]
        format: VerifyFormat,
        /// Where the published checkpoints are (s3://bucket/prefix or a folder; S3 settings from
        /// audit.checkpoints.publish_s3, else the --s3-* flags). Default:
        /// audit.checkpoints.publish, else the lake's own checkpoints/.
        #[arg(long)]
        checkpoints: Option<String>,
    },
    /// Writes a proof (C2SP tlog-proof) that the row of EVENT_ID is in its writer's log,
    /// unchanged, against the newest signed checkpoint covering it; check it with check-proof.
    Prove {
        /// The event_id (UUID).
        event_id: String,
        /// Only rows of this table (`audit`, `webhooks` or `anomalies`).
        #[arg(long)]
        table: Option<String>,
        /// Only the row with this seq (a webhook event's rows share its event_id).
        #[arg(long)]
        seq: Option<u64>,
        /// Take the checkpoint from this store (as verify --checkpoints). Default:
        /// audit.checkpoints.publish, else the lake's own checkpoints/.
        #[arg(long)]
        checkpoints: Option<String>,
    },
    /// Checks a proof file offline: the row hashes to its hash, its leaf is in the signed
    /// checkpoint's tree, and the checkpoint's signature is the given key's. Exit 1 if not.
    CheckProof {
        /// The proof file (as `auditlog prove` writes it).
        file: PathBuf,
        /// Trusted Ed25519 public key: ed25519-pub:<64 hex>, a PUBLIC KEY PEM, or a file holding
        /// one; repeatable. Required.
        #[arg(long = "public-key", required = true)]
        public_keys: Vec<String>,
    },
    /// Runs keygate's anomaly detectors over the lake's plaintext columns (needs no key) and
    /// prints their alerts, each citing its event ids; see docs/anomalies.md.
    Anomalies {
        /// Rows completed at or after this time: RFC 3339, a date, or a duration before now.
        #[arg(long, default_value = "30d")]
        since: String,
        /// Rows completed before this time (same forms as --since; default now): the detectors
        /// judge the hours up to it, so a report of a past window ends where the window does.
        #[arg(long)]
        until: Option<String>,
        /// Only these services (repeatable; webhook events by endpoint name).
        #[arg(long = "service")]
        services: Vec<String>,
        #[arg(long, value_enum, default_value_t = anomalies::AnomalyFormat::Table)]
        format: anomalies::AnomalyFormat,
        /// Also print what detectors in shadow mode would have raised.
        #[arg(long)]
        include_shadow: bool,
        /// Save the learned baselines to this file (to start a keygate instance with them).
        #[arg(long)]
        save_state: Option<PathBuf>,
    },
    /// Prints a new key-encryption key (hex), a new Ed25519 signing key (PKCS#8 PEM) and its
    /// public key (ed25519-pub:<hex> and PEM).
    Keygen,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Format {
    Table,
    Csv,
    Jsonl,
}

#[derive(ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum VerifyFormat {
    Text,
    Json,
}

#[derive(Deserialize, Default)]
struct ConfigFile {
    #[serde(default)]
    secrets: SecretsConfig,
    #[serde(default)]
    audit: Option<AuditConfig>,
}

#[derive(Debug, thiserror::Error)]
enum CliError {
    #[error(transparent)]
    Audit(#[from] AuditError),
    #[error("{0}")]
    Usage(String),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("AUDITLOG_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let rt = match tokio::runtime::Builder::new_multi_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("auditlog: error: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(run(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("auditlog: error: {e}");
            ExitCode::from(2)
        }
    }
}

struct Ctx {
    audit: AuditConfig,
    store: SecretStore,
    kek_refs: Vec<String>,
}

async fn context(cli: &Cli) -> Result<Ctx, CliError> {
    let file = match &cli.config {
        None => ConfigFile::default(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| CliError::Usage(format!("cannot read --config {}: {e}", path.display())))?;
            let value: serde_json::Value = if text.trim().is_empty() {
                serde_json::Value::Object(Default::default())
            } else {
                serde_saphyr::from_str(&text)
                    .map_err(|e| CliError::Usage(format!("--config {} is not valid YAML: {e}", path.display())))?
            };
            serde_json::from_value(value)
                .map_err(|e| CliError::Usage(format!("--config {}: secrets/audit section: {e}", path.display())))?
        }
    };
    let mut audit = file.audit.unwrap_or_default();
    match (&cli.lake, &cli.config) {
        (Some(lake), _) => audit.lake = lake.clone(),
        (None, None) => {
            return Err(CliError::Usage("say which lake: --lake URL, or --config keygate.yaml with audit.lake".into()));
        }
        (None, Some(_)) => {}
    }
    if cli.s3_endpoint.is_some() {
        audit.s3.endpoint = cli.s3_endpoint.clone();
    }
    if cli.s3_region.is_some() {
        audit.s3.region = cli.s3_region.clone();
    }
    if cli.s3_allow_http {
        audit.s3.allow_http = true;
    }
    let store = SecretStore::new(&file.secrets).await.map_err(|e| CliError::Usage(format!("secrets section: {e}")))?;
    let kek_refs = if cli.kek.is_empty() {
        Some(audit.kek.clone()).filter(|k| !k.trim().is_empty()).into_iter().collect()
    } else {
        cli.kek.clone()
    };
    Ok(Ctx { audit, store, kek_refs })
}

impl Ctx {
    fn lake(&self) -> Result<Lake, CliError> {
        if !self.audit.lake.starts_with("s3://") {
            let path = self.audit.lake.strip_prefix("file://").unwrap_or(&self.audit.lake);
            if !std::path::Path::new(path).is_dir() {
                return Err(CliError::Usage(format!("lake folder {path} does not exist")));
            }
        }
        Ok(Lake::open(&self.audit.lake, &self.audit.s3, self.audit.multipart_threshold_bytes)?)
    }

    /// The store of published checkpoints: `--checkpoints`, else audit.checkpoints.publish.
    fn checkpoint_store(&self, flag: Option<&str>) -> Result<Option<Lake>, CliError> {
        let Some(url) = flag.map(str::to_owned).or_else(|| self.audit.checkpoints.publish.clone()) else {
            return Ok(None);
        };
        let mut s3 = self.audit.checkpoints.publish_s3.clone();
        if s3.endpoint.is_none() {
            s3.endpoint = self.audit.s3.endpoint.clone();
            s3.allow_http |= self.audit.s3.allow_http;
        }
        if s3.region.is_none() {
            s3.region = self.audit.s3.region.clone();
        }
        if !url.starts_with("s3://") {
            let path = url.strip_prefix("file://").unwrap_or(&url);
            if !std::path::Path::new(path).is_dir() {
                return Err(CliError::Usage(format!("checkpoint folder {path} does not exist")));
            }
        }
        Ok(Some(Lake::open(&url, &s3, self.audit.multipart_threshold_bytes)?))
    }

    async fn ring(&self) -> Result<KekRing, CliError> {
        let mut keys = Vec::new();
        for r in &self.kek_refs {
            keys.push(keys::kek_from_reference(&self.store, r).await?);
        }
        Ok(KekRing::new(keys))
    }
}

async fn run(cli: Cli) -> Result<ExitCode, CliError> {
    if matches!(cli.cmd, Cmd::Keygen) {
        return keygen();
    }
    if let Cmd::CheckProof { file, public_keys } = &cli.cmd {
        return check_proof(file, public_keys);
    }
    let ctx = context(&cli).await?;
    let lake = ctx.lake()?;
    match &cli.cmd {
        Cmd::Query { sql, format, decrypt } => {
            let spinner = spinner("running query");
            let mut batches = run_sql(&lake, sql).await?;
            if *decrypt {
                let mut d = Decryptor::new(&lake, ctx.ring().await?).await?;
                batches = d.add_payload_json(batches).await?;
            }
            spinner.finish_and_clear();
            print_batches(&batches, *format)?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Anomalies { since, until, services, format, include_shadow, save_state } => {
            let config = anomalies::config_from(cli.config.as_deref())?;
            let since_us = parse_time("--since", since)?;
            let until_us = until.as_deref().map(|u| parse_time("--until", u)).transpose()?;
            if until_us.is_some_and(|u| u <= since_us) {
                return Err(CliError::Usage(format!(
                    "--until {} is not after --since {since}",
                    until.as_deref().unwrap_or_default()
                )));
            }
            let opts = anomalies::Options {
                since_us,
                until_us,
                services: services.clone(),
                format: *format,
                save_state: save_state.clone(),
                include_shadow: *include_shadow,
            };
            anomalies::run(&lake, &config, &opts).await?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Show { event_id } => {
            let id = uuid::Uuid::parse_str(event_id)
                .map_err(|_| CliError::Usage(format!("{event_id} is not an event_id (a UUID)")))?;
            let mut batches = Vec::new();
            for table in Table::ALL {
                for b in run_sql(&lake, &event_sql_in(table, &id)).await? {
                    batches.push((table, b));
                }
            }
            // Not in the partitions its id's time points at (a row logged long after it was
            // received, e.g. recovered or imported): look in every partition.
            if batches.iter().all(|(_, b)| b.num_rows() == 0) {
                batches.clear();
                for table in Table::ALL {
                    for b in run_sql(&lake, &event_sql_anywhere(table, &id)).await? {
                        batches.push((table, b));
                    }
                }
            }
            let ring = ctx.ring().await?;
            let mut decryptor = if ring.is_empty() { None } else { Some(Decryptor::new(&lake, ring).await?) };
            let mut shown = 0;
            for (table, b) in &batches {
                for row in 0..b.num_rows() {
                    let mut obj = row_json(b, row)?;
                    let payload = match &mut decryptor {
                        Some(d) => {
                            let s = |n: &str| {
                                b.column_by_name(n).and_then(|c| {
                                    c.as_any().downcast_ref::<StringArray>().map(|a| a.value(row).to_owned())
                                })
                            };
                            let seq = b.column_by_name("seq").and_then(|c| {
                                c.as_any().downcast_ref::<arrow::array::UInt64Array>().map(|a| a.value(row))
                            });
                            let bytes = b.column_by_name("payload").and_then(|c| {
                                c.as_any()
                                    .downcast_ref::<BinaryArray>()
                                    .filter(|a| !a.is_null(row))
                                    .map(|a| a.value(row).to_vec())
                            });
                            match (s("writer_id"), seq, bytes) {
                                (Some(w), Some(seq), Some(p)) => d.decrypt_in(*table, &w, seq, event_id, &p).await?,
                                _ => serde_json::Value::Null,
                            }
                        }
                        None => serde_json::Value::String(
                            "not decrypted: pass --kek <secret reference> (or a config with audit.kek)".into(),
                        ),
                    };
                    if let serde_json::Value::Object(m) = &mut obj {
                        m.insert("payload".into(), payload);
                    }
                    let text = serde_json::to_string_pretty(&obj).map_err(|e| CliError::Usage(e.to_string()))?;
                    out_line(&text)?;
                    shown += 1;
                }
            }
            if shown == 0 {
                return Err(CliError::Usage(format!("no row with event_id {event_id} in {}", lake.display)));
            }
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Prove { event_id, table, seq, checkpoints } => {
            let id = uuid::Uuid::parse_str(event_id)
                .map_err(|_| CliError::Usage(format!("{event_id} is not an event_id (a UUID)")))?;
            let table = match table.as_deref() {
                None => None,
                Some(t) => Some(
                    Table::ALL
                        .into_iter()
                        .find(|x| x.name() == t)
                        .ok_or_else(|| CliError::Usage(format!("--table {t}: use audit, webhooks or anomalies")))?,
                ),
            };
            let store = ctx.checkpoint_store(checkpoints.as_deref())?;
            let req = keygate_auditlog::proof::ProveRequest { event_id: id, table, seq: *seq };
            let text = keygate_auditlog::proof::prove(&lake, store.as_ref(), &req).await?;
            let mut out = std::io::stdout().lock();
            out.write_all(text.as_bytes()).map_err(|e| CliError::Usage(format!("cannot write the proof: {e}")))?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::CheckProof { .. } => Err(CliError::Usage("check-proof needs no lake".into())),
        Cmd::Verify { since, public_keys, signing_keys, format, checkpoints } => {
            let checkpoints = ctx.checkpoint_store(checkpoints.as_deref())?;
            let trusted =
                keys::trusted_keys(&ctx.store, public_keys, signing_keys, Some(ctx.audit.signing_key.as_str())).await?;
            if trusted.is_empty() {
                eprintln!(
                    "auditlog: warning: no trusted public key given (--public-key, --signing-key or audit.signing_key): signatures are checked against the keys the manifests name, which proves integrity against accidents but not against someone able to re-sign"
                );
            }
            let since_us = since.as_deref().map(parse_since).transpose()?;
            let bar = ProgressBar::new(0);
            if !std::io::stderr().is_terminal() {
                bar.set_draw_target(ProgressDrawTarget::hidden());
            }
            if let Ok(style) = ProgressStyle::with_template("{bar:40} {pos}/{len} files {elapsed}") {
                bar.set_style(style);
            }
            let opts = VerifyOptions { trusted_keys: trusted, since_us, checkpoints };
            let report = verify(&lake, &opts, |done, total| {
                bar.set_length(total);
                bar.set_position(done);
            })
            .await?;
            bar.finish_and_clear();
            match format {
                VerifyFormat::Json => {
                    out_line(&serde_json::to_string_pretty(&report).map_err(|e| CliError::Usage(e.to_string()))?)?;
                }
                VerifyFormat::Text => {
                    for f in &report.findings {
                        out_line(&f.to_string())?;
                    }
                    for n in &report.no_merkle_data {
                        out_line(&format!("note: {n}"))?;
                    }
                    out_line(&format!(
                        "{} finding(s); {} writer(s), {} manifest(s), {} file(s), {} row(s), {} checkpoint(s) checked{}",
                        report.findings.len(),
                        report.writers,
                        report.manifests,
                        report.files,
                        report.rows,
                        report.checkpoints,
                        if report.trusted_keys { "" } else { " (no trusted key)" }
                    ))?;
                }
            }
            Ok(if report.findings.is_empty() { ExitCode::SUCCESS } else { ExitCode::from(1) })
        }
        Cmd::Keygen => keygen(),
    }
}

/// `auditlog check-proof`: offline, no lake, no secret store.
fn check_proof(file: &std::path::Path, public_keys: &[String]) -> Result<ExitCode, CliError> {
    let mut keys = Vec::new();
    for k in public_keys {
        let text = if std::path::Path::new(k).is_file() {
            std::fs::read_to_string(k).map_err(|e| CliError::Usage(format!("cannot read --public-key {k}: {e}")))?
        } else {
            k.clone()
        };
        keys.push(keygate_auditlog::VerifyingKey::from_text(&text)?);
    }
    let bytes =
        std::fs::read(file).map_err(|e| CliError::Usage(format!("cannot read the proof {}: {e}", file.display())))?;
    let checked = std::str::from_utf8(&bytes)
        .map_err(|_| AuditError::Corrupt { what: "proof".into(), reason: "not UTF-8 text".into() })
        .and_then(|text| keygate_auditlog::proof::check(text, &keys));
    match checked {
        Ok(c) => {
            out_line(&serde_json::to_string_pretty(&c).map_err(|e| CliError::Usage(e.to_string()))?)?;
            eprintln!(
                "auditlog: proof OK: {} row seq {} of writer {} is leaf {} of the signed checkpoint {} at size {}",
                c.table, c.seq, c.writer_id, c.index, c.origin, c.tree_size
            );
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            eprintln!("auditlog: proof does NOT verify: {e}");
            Ok(ExitCode::from(1))
        }
    }
}

fn keygen() -> Result<ExitCode, CliError> {
    let k = keys::generate()?;
    // Secret text is built in buffers that are wiped when dropped.
    let indent = |text: &str| zeroize::Zeroizing::new(text.lines().map(|l| format!("  {l}\n")).collect::<String>());
    let text = zeroize::Zeroizing::new(format!(
        "# Store each secret value in your secret store and point audit.kek / audit.signing_key at it.\n\
         # The public key is not secret: give it to auditors (auditlog verify --public-key).\n\
         kek: {}\nsigning_key: |\n{}public_key: {}\npublic_key_pem: |\n{}",
        k.kek.as_str(),
        indent(&k.signing_key_pem).as_str(),
        k.public_key,
        indent(&k.public_key_pem).trim_end_matches('\n'),
    ));
    out_line(&text)?;
    Ok(ExitCode::SUCCESS)
}

fn spinner(msg: &'static str) -> ProgressBar {
    let s = ProgressBar::new_spinner();
    if std::io::stderr().is_terminal() {
        s.set_message(msg);
        s.enable_steady_tick(Duration::from_millis(120));
    } else {
        s.set_draw_target(ProgressDrawTarget::hidden());
    }
    s
}

fn parse_since(text: &str) -> Result<i64, CliError> {
    parse_time("--since", text)
}

/// A time given to `flag`: RFC 3339, a date (its midnight UTC), or a duration before now.
fn parse_time(flag: &str, text: &str) -> Result<i64, CliError> {
    let t = text.trim();
    let at = if let Ok(ts) = humantime::parse_rfc3339_weak(t) {
        ts
    } else if let Ok(ts) = humantime::parse_rfc3339_weak(&format!("{t}T00:00:00Z")) {
        ts
    } else if let Ok(d) = humantime::parse_duration(t) {
        SystemTime::now() - d
    } else {
        return Err(CliError::Usage(format!(
            "{flag} {t}: give an RFC 3339 time (2026-11-29T10:00:00Z), a date (2026-11-29) or a duration (24h)"
        )));
    };
    Ok(keygate_auditlog::row::micros(at))
}

fn out_line(s: &str) -> Result<(), CliError> {
    let mut out = std::io::stdout().lock();
    match writeln!(out, "{s}") {
        Ok(()) => Ok(()),
        // `auditlog … | head` closes the pipe early: not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(CliError::Usage(format!("cannot write output: {e}"))),
    }
}

/// The batches with the columns `text` turns into strings replaced by them (`text` returns
/// `None` for a column it keeps as it is).
fn with_text_columns(
    batches: &[RecordBatch],
    text: impl Fn(&Field, &ArrayRef) -> Result<Option<StringArray>, CliError>,
) -> Result<Vec<RecordBatch>, CliError> {
    batches
        .iter()
        .map(|b| {
            let mut fields = Vec::new();
            let mut cols: Vec<ArrayRef> = Vec::new();
            for (f, c) in b.schema().fields().iter().zip(b.columns()) {
                match text(f, c)? {
                    Some(strings) => {
                        fields.push(Arc::new(Field::new(f.name(), DataType::Utf8, true)));
                        cols.push(Arc::new(strings));
                    }
                    None => {
                        fields.push(f.clone());
                        cols.push(c.clone());
                    }
                }
            }
            RecordBatch::try_new(Arc::new(Schema::new(fields)), cols).map_err(|e| CliError::Usage(e.to_string()))
        })
        .collect()
}

/// Binary columns as text: hashes in hex; the payload as `<N bytes>` in tables and base64 otherwise.
fn printable(batches: &[RecordBatch], table: bool) -> Result<Vec<RecordBatch>, CliError> {
    with_text_columns(batches, |f, c| {
        Ok(c.as_any().downcast_ref::<BinaryArray>().map(|bin| {
            (0..bin.len())
                .map(|i| {
                    (!bin.is_null(i)).then(|| {
                        let v = bin.value(i);
                        if f.name() == "payload" {
                            if table {
                                format!("<{} bytes>", v.len())
                            } else {
                                base64::engine::general_purpose::STANDARD.encode(v)
                            }
                        } else {
                            hex::encode(v)
                        }
                    })
                })
                .collect()
        }))
    })
}

fn print_batches(batches: &[RecordBatch], format: Format) -> Result<(), CliError> {
    let batches = printable(batches, format == Format::Table)?;
    let err = |e: arrow::error::ArrowError| CliError::Usage(format!("cannot format the result: {e}"));
    match format {
        Format::Table => {
            let table = arrow::util::pretty::pretty_format_batches(&batches).map_err(err)?;
            out_line(&table.to_string())
        }
        Format::Csv => {
            let batches = lists_as_text(&batches)?;
            let mut buf = Vec::new();
            {
                let mut w = arrow::csv::WriterBuilder::new().with_header(true).build(&mut buf);
                for b in &batches {
                    w.write(b).map_err(err)?;
                }
            }
            out_line(String::from_utf8_lossy(&buf).trim_end())
        }
        Format::Jsonl => {
            let mut buf = Vec::new();
            {
                let mut w = arrow::json::LineDelimitedWriter::new(&mut buf);
                let refs: Vec<&RecordBatch> = batches.iter().collect();
                w.write_batches(&refs).map_err(err)?;
                w.finish().map_err(err)?;
            }
            let text = String::from_utf8_lossy(&buf);
            if text.trim().is_empty() { Ok(()) } else { out_line(text.trim_end()) }
        }
    }
}

/// CSV has no lists: a list column (`anomalies.cited_event_ids`) is written as its text,
/// `[id1, id2]`, in one cell.
fn lists_as_text(batches: &[RecordBatch]) -> Result<Vec<RecordBatch>, CliError> {
    with_text_columns(batches, |f, c| {
        if !matches!(f.data_type(), DataType::List(_) | DataType::LargeList(_)) {
            return Ok(None);
        }
        (0..c.len())
            .map(
                |row| {
                    if c.is_null(row) {
                        Ok(None)
                    } else {
                        arrow::util::display::array_value_to_string(c, row).map(Some)
                    }
                },
            )
            .collect::<Result<StringArray, _>>()
            .map(Some)
            .map_err(|e| CliError::Usage(format!("cannot format the result: {e}")))
    })
}

/// One row as a JSON object (binary columns in hex).
fn row_json(b: &RecordBatch, row: usize) -> Result<serde_json::Value, CliError> {
    let slice = b.slice(row, 1);
    let printable = printable(&[slice], false)?;
    let mut buf = Vec::new();
    {
        let mut w = arrow::json::ArrayWriter::new(&mut buf);
        let refs: Vec<&RecordBatch> = printable.iter().collect();
        w.write_batches(&refs).map_err(|e| CliError::Usage(e.to_string()))?;
        w.finish().map_err(|e| CliError::Usage(e.to_string()))?;
    }
    let mut v: serde_json::Value = serde_json::from_slice(&buf).map_err(|e| CliError::Usage(e.to_string()))?;
    let mut obj = v.get_mut(0).map(serde_json::Value::take).unwrap_or_default();
    if let serde_json::Value::Object(m) = &mut obj {
        m.remove("payload");
    }
    Ok(obj)
}
