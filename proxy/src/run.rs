//! Assembling a gateway from configuration and running it until a signal stops it.
//!
//! Start-up order: configuration → logging → policies (or the quick start) → secret store →
//! upstream client → listeners; keys are fetched in the background and `/readyz` reports when
//! they all are. SIGTERM/SIGINT drain; SIGHUP reloads the policy folder.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use keygate_policies::PolicySet;
use keygate_secrets::SecretStore;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::Config;
use crate::gateway::{DirectoryError, Gateway, GatewayParts, ServiceDirectory};
use crate::telemetry::ProxyMetrics;
use crate::upstream::{Upstream, UpstreamSetupError};
use keygate_auditlog::AuditLog;

/// Why keygate could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    #[error(transparent)]
    Quickstart(#[from] crate::quickstart::QuickstartError),
    #[error("invalid policies in {dir}:\n{detail}")]
    Policies { dir: String, detail: String },
    #[error("invalid policies: {0}")]
    Directory(#[from] DirectoryError),
    #[error("secret store: {0}")]
    Secrets(#[from] keygate_secrets::SecretError),
    #[error("audit log: {0}")]
    Audit(#[from] keygate_auditlog::AuditError),
    #[error("{0}")]
    Limits(#[from] keygate_limits::LimitError),
    #[error("{0}")]
    Anomalies(#[from] keygate_detectors::DetectorError),
    #[error("webhooks: {0}")]
    Webhooks(#[from] keygate_webhooks::WebhookError),
    #[error("{0}")]
    WebhookTls(String),
    #[error(transparent)]
    Upstream(#[from] UpstreamSetupError),
    #[error(transparent)]
    Tls(#[from] crate::tls::TlsSetupError),
    #[error("cannot listen on {address} (`{key}`): {source}")]
    Bind { key: &'static str, address: String, source: std::io::Error },
    #[error("cannot install the {signal} handler: {source}")]
    Signal { signal: &'static str, source: std::io::Error },
}

/// Loads the policy folder.
pub fn load_policies(dir: &Path) -> Result<PolicySet, StartError> {
    PolicySet::load_dir(dir)
        .map_err(|error| StartError::Policies { dir: dir.display().to_string(), detail: error.to_string() })
}

/// Builds a gateway: secret store, upstream client, metrics. Keys are not fetched yet.
pub async fn build_gateway(config: Config, policies: PolicySet) -> Result<Arc<Gateway>, StartError> {
    let directory = ServiceDirectory::build(&policies)?;
    let mut registry = Registry::default();
    let metrics = ProxyMetrics::register(&mut registry);
    let secrets = SecretStore::new(&config.secrets).await?;
    secrets.register_metrics(&mut registry);
    let upstream = Upstream::new(&config.upstreams, config.limits.max_response_bytes)?;
    let audit = if config.audit.enabled {
        let (kek, signing_key) = keygate_auditlog::keys::resolve(&config.audit, &secrets).await?;
        AuditLog::open(&config.audit, kek, signing_key).await?
    } else {
        tracing::warn!("audit lake disabled (`audit.enabled: false`): exchanges are not recorded");
        AuditLog::disabled()
    };
    audit.register_metrics(&mut registry);
    let limits = Arc::new(crate::limiting::Limits::open(&config.limit_store, &secrets, &mut registry).await?);
    let alert_destinations = config
        .alerts
        .destinations
        .iter()
        .map(|d| crate::anomalies::AlertDestination::build(d, secrets.clone()))
        .collect::<Result<Vec<_>, _>>()?;
    let anomalies = config
        .anomalies
        .clone()
        .map(|c| crate::anomalies::Anomalies::start(c, &mut registry, audit.clone(), alert_destinations))
        .transpose()?;
    let webhooks = match &config.webhooks {
        Some(section) => {
            let mut journal = crate::webhook_journal::for_audit(&audit);
            if let Some(anomalies) = &anomalies {
                journal = crate::anomalies::feeding_journal(journal, anomalies.clone());
            }
            Some(keygate_webhooks::Webhooks::start(section.clone(), secrets.clone(), journal, &mut registry).await?)
        }
        None => None,
    };
    let reconcile = config.reconcile.enabled.then(|| crate::reconcile::ReconcileMetrics::register(&mut registry));
    Ok(Arc::new(Gateway::new(GatewayParts {
        config,
        policies,
        directory,
        secrets,
        upstream,
        audit,
        limits,
        webhooks,
        anomalies,
        metrics,
        reconcile,
        registry,
    })))
}

/// Fetches every service's key once, logging (by reference) those that fail; the cache retries.
pub async fn preload_keys(gateway: &Gateway) {
    let refs = gateway.key_refs();
    if let Err(error) = gateway.secrets.preload(&refs).await {
        tracing::warn!(error = %error, "could not fetch every Stripe key at start; /readyz stays not ready until they are");
    } else {
        tracing::info!(keys = refs.len(), "every Stripe key fetched");
    }
}

/// What `keygate serve` was asked to do.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub config_file: Option<PathBuf>,
    pub data_dir: PathBuf,
    pub allow_live_key: bool,
}

/// Runs `keygate serve` until SIGTERM or SIGINT.
pub async fn serve(options: ServeOptions) -> Result<(), StartError> {
    let mut config = crate::config::load(options.config_file.as_deref(), &crate::config::process_env())?;
    crate::telemetry::init_logging(&config.log);
    // The local limit store lives in the data folder unless configured elsewhere.
    config.limit_store.local.path.get_or_insert_with(|| options.data_dir.join("limits.redb"));
    // So does the anomaly detectors' learned state.
    if let Some(anomalies) = &mut config.anomalies {
        anomalies.live.state_file.get_or_insert_with(|| options.data_dir.join("anomalies-state.json"));
    }

    let mut banner = None;
    let policies = match &config.policies.dir {
        Some(dir) => load_policies(dir)?,
        None => {
            let key = std::env::var(crate::quickstart::KEY_VARIABLE).ok();
            let quickstart = crate::quickstart::prepare(key.as_deref(), &options.data_dir, options.allow_live_key)?;
            crate::quickstart::prepare_audit(&mut config.audit, &options.data_dir)?;
            tracing::warn!(
                service = crate::quickstart::SERVICE,
                "quick start: no configuration file; the built-in policy allows every Stripe operation"
            );
            let policies = quickstart.policies.clone();
            banner = Some(quickstart);
            policies
        }
    };

    let tls = config.listen.tls.as_ref().map(crate::tls::server_config).transpose()?;
    let proxy_listener = TcpListener::bind(config.listen.address).await.map_err(|source| StartError::Bind {
        key: "listen.address",
        address: config.listen.address.to_string(),
        source,
    })?;
    let admin_listener = TcpListener::bind(config.admin.address).await.map_err(|source| StartError::Bind {
        key: "admin.address",
        address: config.admin.address.to_string(),
        source,
    })?;
    let proxy_address = proxy_listener.local_addr().map_err(|source| StartError::Bind {
        key: "listen.address",
        address: config.listen.address.to_string(),
        source,
    })?;
    let admin_address = admin_listener.local_addr().map_err(|source| StartError::Bind {
        key: "admin.address",
        address: config.admin.address.to_string(),
        source,
    })?;

    let webhook_ingress = match &config.webhooks {
        None => None,
        Some(section) => {
            let tls = section
                .listen
                .tls
                .as_ref()
                .map(|tls| {
                    crate::tls::server_config(&crate::config::TlsConfig {
                        cert_file: tls.cert_file.clone(),
                        key_file: tls.key_file.clone(),
                        client_ca_file: None,
                    })
                })
                .transpose()
                // The proxy's TLS loader names its own keys; these are the ingress's.
                .map_err(|e| StartError::WebhookTls(e.to_string().replace("`listen.tls.", "`webhooks.listen.tls.")))?;
            let bind_error = |source| StartError::Bind {
                key: "webhooks.listen.address",
                address: section.listen.address.to_string(),
                source,
            };
            let listener = TcpListener::bind(section.listen.address).await.map_err(bind_error)?;
            let address = listener.local_addr().map_err(bind_error)?;
            Some((listener, tls, address))
        }
    };

    let lake =
        if config.audit.enabled { config.audit.lake.clone() } else { "nowhere (audit.enabled: false)".to_owned() };
    let gateway = build_gateway(config, policies).await?;
    let scheme = if tls.is_some() { "https" } else { "http" };
    if let Some((_, webhook_tls, address)) = &webhook_ingress {
        tracing::info!(address = %address, tls = webhook_tls.is_some(), "webhook ingress listening");
    }
    tracing::info!(proxy = %proxy_address, admin = %admin_address, tls = tls.is_some(), "keygate listening");
    if let Some(quickstart) = &banner {
        #[allow(clippy::print_stdout)]
        {
            println!(
                "{}",
                crate::quickstart::banner(
                    quickstart,
                    &format!("{scheme}://{proxy_address}"),
                    &format!("http://{admin_address}"),
                    &lake,
                )
            );
        }
    }

    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|stop| *stop).await;
    };
    let admin = tokio::spawn(crate::admin::serve_admin(admin_listener, gateway.clone(), stopped(stop_rx.clone())));
    let ingress = match (gateway.webhooks.clone(), webhook_ingress) {
        (Some(webhooks), Some((listener, webhook_tls, _))) => {
            let stop = stopped(stop_rx.clone());
            #[cfg(debug_assertions)]
            crate::webhook_journal::install_test_hook(&webhooks, &gateway.audit);
            let preloading = webhooks.clone();
            tokio::spawn(async move { preloading.preload_secrets().await });
            Some(tokio::spawn(async move { webhooks.serve(listener, webhook_tls, stop).await }))
        }
        _ => None,
    };
    let preload = tokio::spawn({
        let gateway = gateway.clone();
        async move { preload_keys(&gateway).await }
    });
    let reload = tokio::spawn(crate::run::watch_reload_signal(gateway.clone(), stopped(stop_rx.clone())));
    let limits_probe = tokio::spawn(gateway.limits.clone().probe(stopped(stop_rx.clone())));
    let reconcile = gateway.reconcile.clone().map(|metrics| {
        tracing::info!(interval = ?gateway.config.reconcile.interval, "background reconcile job on");
        tokio::spawn(crate::reconcile::background(gateway.clone(), metrics, stopped(stop_rx.clone())))
    });
    let signals = wait_for_stop_signal()?;
    tokio::spawn(async move {
        signals.await;
        tracing::info!("stop signal received: draining");
        let _ = stop_tx.send(true);
    });
    crate::server::serve(proxy_listener, gateway.clone(), tls, stopped(stop_rx.clone())).await;
    preload.abort();
    reload.abort();
    limits_probe.abort();
    if let Some(mut job) = reconcile {
        // A pass in progress finishes (its re-sends are recorded) within the shutdown grace.
        if tokio::time::timeout(gateway.config.limits.shutdown_grace, &mut job).await.is_err() {
            tracing::warn!("the reconcile pass did not finish within limits.shutdown_grace; stopped");
            job.abort();
        }
    }
    if let Some(ingress) = ingress {
        let _ = ingress.await;
    }
    if let Some(webhooks) = &gateway.webhooks {
        webhooks.shutdown().await;
    }
    if let Some(anomalies) = &gateway.anomalies {
        anomalies.shutdown().await;
    }
    let audit = gateway.audit.clone();
    if audit.is_enabled() {
        tracing::info!("committing the audit WAL into the lake");
        match audit.shutdown().await {
            Ok(()) => tracing::info!("audit lake complete"),
            Err(error) => {
                tracing::error!(error = %error, "the audit WAL could not be fully committed; the rest is committed on the next start")
            }
        }
    }
    let _ = admin.await;
    tracing::info!("keygate stopped");
    Ok(())
}

/// Resolves on SIGTERM or SIGINT.
fn wait_for_stop_signal() -> Result<impl std::future::Future<Output = ()>, StartError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term =
        signal(SignalKind::terminate()).map_err(|source| StartError::Signal { signal: "SIGTERM", source })?;
    let mut int = signal(SignalKind::interrupt()).map_err(|source| StartError::Signal { signal: "SIGINT", source })?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

/// How often the policy folder is checked for changes.
const POLICY_POLL_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Reloads the policy folder on SIGHUP and when its contents change; a folder that fails
/// validation is refused whole and the policies in force stay.
///
/// Changes are found by polling a digest of the folder rather than with inotify: Kubernetes
/// updates a mounted ConfigMap by swapping a `..data` symlink, which file-event watchers report
/// unreliably, while reading a handful of small files once a second costs nothing.
pub async fn watch_reload_signal(gateway: Arc<Gateway>, stop: impl std::future::Future<Output = ()>) {
    use tokio::signal::unix::{SignalKind, signal};
    let Some(dir) = gateway.config.policies.dir.clone() else { return };
    let mut hup = match signal(SignalKind::hangup()) {
        Ok(hup) => Some(hup),
        Err(_) => {
            tracing::warn!("cannot install the SIGHUP handler; policies reload when the folder changes");
            None
        }
    };
    let mut last_digest = folder_digest(&dir);
    let mut ticker = tokio::time::interval(POLICY_POLL_INTERVAL);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tokio::pin!(stop);
    loop {
        let hangup = async {
            match hup.as_mut() {
                Some(hup) => hup.recv().await,
                None => std::future::pending().await,
            }
        };
        tokio::select! {
            _ = hangup => {
                last_digest = folder_digest(&dir);
                reload_policies(&gateway, &dir);
            }
            _ = ticker.tick() => {
                let digest = folder_digest(&dir);
                if digest != last_digest {
                    last_digest = digest;
                    reload_policies(&gateway, &dir);
                }
            }
            () = &mut stop => return,
        }
    }
}

/// A digest of every file's name and contents in the folder (following symlinks), or `None` if
/// it cannot be read.
fn folder_digest(dir: &Path) -> Option<[u8; 32]> {
    use sha2::{Digest, Sha256};
    let mut names: Vec<PathBuf> = std::fs::read_dir(dir).ok()?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    names.sort();
    let mut hasher = Sha256::new();
    for path in names {
        if path.file_name().is_some_and(|n| n.to_string_lossy().starts_with('.')) || !path.is_file() {
            continue;
        }
        hasher.update(path.to_string_lossy().as_bytes());
        hasher.update(std::fs::read(&path).ok()?);
    }
    Some(hasher.finalize().into())
}

/// Reloads the policies from `dir`, keeping the old ones if the new folder is invalid.
pub fn reload_policies(gateway: &Gateway, dir: &Path) {
    use crate::telemetry::ReasonLabels;
    let result = load_policies(dir).and_then(|set| gateway.replace_policies(set).map_err(StartError::from));
    match result {
        Ok(()) => {
            gateway.metrics.policy_reloads.get_or_create(&ReasonLabels { reason: "ok".into() }).inc();
            tracing::info!(dir = %dir.display(), "policies reloaded");
        }
        Err(error) => {
            gateway.metrics.policy_reloads.get_or_create(&ReasonLabels { reason: "rejected".into() }).inc();
            tracing::error!(dir = %dir.display(), error = %error, "policy reload refused; the previous policies stay in force");
        }
    }
}
