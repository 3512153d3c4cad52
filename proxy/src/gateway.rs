//! The shared state of a running proxy: configuration, the service directory derived from the
//! policies, the policy engine, the secret store, the upstream client, metrics and the audit log.
//!
//! Invariant: the service directory (token hashes, mTLS identities, parsed key references) is
//! always derived from the same policy snapshot the engine decides with; a reload replaces both
//! or neither.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use arc_swap::ArcSwap;
use keygate_auditlog::AuditLog;
use keygate_policies::{PolicyEngine, PolicySet};
use keygate_secrets::{SecretRef, SecretStore};
use prometheus_client::registry::Registry;

use crate::auth::TokenIndex;
use crate::config::Config;
use crate::limiting::Limits;
use crate::telemetry::ProxyMetrics;
use crate::upstream::Upstream;

/// Errors turning a policy set into a service directory.
#[derive(Debug, thiserror::Error)]
#[error("{}", .problems.join("\n"))]
pub struct DirectoryError {
    pub problems: Vec<String>,
}

/// Who is who, derived from one policy snapshot.
#[derive(Debug, Default)]
pub struct ServiceDirectory {
    pub tokens: TokenIndex,
    /// mTLS identity → service name.
    pub identities: HashMap<String, String>,
    /// service name → its Stripe key reference.
    pub keys: HashMap<String, SecretRef>,
}

impl ServiceDirectory {
    /// Builds the directory, refusing key references that do not parse (every one is listed).
    pub fn build(policies: &PolicySet) -> Result<ServiceDirectory, DirectoryError> {
        let mut problems = Vec::new();
        let mut keys = HashMap::new();
        let mut identities = HashMap::new();
        for service in policies.services() {
            match service.stripe_key.parse::<SecretRef>() {
                Ok(reference) => {
                    keys.insert(service.name.clone(), reference);
                }
                Err(error) => problems.push(format!("service `{}`: `stripe_key`: {error}", service.name)),
            }
            for identity in &service.mtls_identities {
                identities.insert(identity.clone(), service.name.clone());
            }
        }
        if problems.is_empty() {
            Ok(ServiceDirectory { tokens: TokenIndex::from_policies(policies), identities, keys })
        } else {
            Err(DirectoryError { problems })
        }
    }
}

/// Everything a request needs, shared by all connections.
#[derive(Debug)]
pub struct Gateway {
    pub config: Config,
    pub engine: PolicyEngine,
    pub directory: ArcSwap<ServiceDirectory>,
    pub secrets: SecretStore,
    pub upstream: Upstream,
    pub audit: AuditLog,
    /// Where rate limits and budgets are counted.
    pub limits: Arc<Limits>,
    /// The Stripe webhook ingress and its deliveries, when configured.
    pub webhooks: Option<Arc<keygate_webhooks::Webhooks>>,
    /// Live anomaly detection, when configured (`anomalies:`).
    pub anomalies: Option<Arc<crate::anomalies::Anomalies>>,
    pub metrics: Arc<ProxyMetrics>,
    /// The background reconcile job's metrics, when `reconcile.enabled`.
    pub reconcile: Option<Arc<crate::reconcile::ReconcileMetrics>>,
    pub registry: Registry,
    shutting_down: AtomicBool,
}

/// The parts a gateway is assembled from.
#[derive(Debug)]
pub struct GatewayParts {
    pub config: Config,
    pub policies: PolicySet,
    pub directory: ServiceDirectory,
    pub secrets: SecretStore,
    pub upstream: Upstream,
    pub audit: AuditLog,
    pub limits: Arc<Limits>,
    pub webhooks: Option<Arc<keygate_webhooks::Webhooks>>,
    pub anomalies: Option<Arc<crate::anomalies::Anomalies>>,
    pub metrics: Arc<ProxyMetrics>,
    /// The background reconcile job's metrics, when `reconcile.enabled`.
    pub reconcile: Option<Arc<crate::reconcile::ReconcileMetrics>>,
    pub registry: Registry,
}

impl Gateway {
    /// Assembles a gateway. `parts.registry` already holds the metrics of every component.
    pub fn new(parts: GatewayParts) -> Gateway {
        Gateway {
            config: parts.config,
            engine: PolicyEngine::new(parts.policies),
            directory: ArcSwap::from_pointee(parts.directory),
            secrets: parts.secrets,
            upstream: parts.upstream,
            audit: parts.audit,
            limits: parts.limits,
            webhooks: parts.webhooks,
            anomalies: parts.anomalies,
            metrics: parts.metrics,
            reconcile: parts.reconcile,
            registry: parts.registry,
            shutting_down: AtomicBool::new(false),
        }
    }

    /// Replaces the policies, or keeps the old ones when the new set's key references are bad.
    pub fn replace_policies(&self, policies: PolicySet) -> Result<(), DirectoryError> {
        let directory = ServiceDirectory::build(&policies)?;
        self.engine.replace(policies);
        self.directory.store(Arc::new(directory));
        Ok(())
    }

    /// Every key reference in use.
    pub fn key_refs(&self) -> Vec<SecretRef> {
        self.directory.load().keys.values().cloned().collect()
    }

    /// Marks the gateway as draining: new requests get 503 and `/readyz` fails.
    pub fn begin_shutdown(&self) {
        self.shutting_down.store(true, Ordering::SeqCst);
    }

    /// Whether shutdown has begun.
    pub fn is_shutting_down(&self) -> bool {
        self.shutting_down.load(Ordering::SeqCst)
    }

    /// Ready when not draining and every service's key has been fetched once. Returns the reasons
    /// when not ready (references only, never values).
    pub fn readiness(&self) -> Result<(), Vec<String>> {
        let mut reasons = Vec::new();
        if self.is_shutting_down() {
            reasons.push("shutting down".to_owned());
        }
        if let Err(reason) = self.audit.is_ready() {
            reasons.push(reason);
        }
        if let Err(reason) = self.audit.lake_lag() {
            reasons.push(reason);
        }
        reasons.extend(self.audit.set_aside());
        if let Err(reason) = self.limits.readiness() {
            reasons.push(reason);
        }
        if let Some(webhooks) = &self.webhooks {
            reasons.extend(webhooks.readiness());
        }
        for (service, reference) in &self.directory.load().keys {
            if !self.secrets.is_loaded(reference) {
                reasons.push(format!("the Stripe key of service `{service}` ({reference}) has not been fetched yet"));
            }
        }
        if reasons.is_empty() { Ok(()) } else { Err(reasons) }
    }
}
