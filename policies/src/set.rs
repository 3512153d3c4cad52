//! `PolicySet`: an immutable snapshot of every service's policy, with lookups by name, token
//! hash and mTLS identity. Cheap to clone (one `Arc`).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::loader::{self, PolicyLoadError, Problem};
use crate::model::{Effect, HeaderCondition, IdempotencyMode, KeyMode, Mode, Rule, ServicePolicy};
use crate::pattern::OperationPattern;

/// Rule id of the single rule of [`PolicySet::quickstart_allow_all`].
pub const QUICKSTART_RULE_ID: &str = "quickstart-allow-all";

/// An immutable, validated set of service policies.
#[derive(Debug, Clone)]
pub struct PolicySet {
    inner: Arc<SetInner>,
}

#[derive(Debug)]
struct SetInner {
    services: Vec<ServicePolicy>,
    by_name: HashMap<String, usize>,
    by_token_hash: HashMap<String, usize>,
    by_identity: HashMap<String, usize>,
}

impl PolicySet {
    /// Loads every policy file of `dir`. On failure, the error lists every problem of the
    /// folder, one per line.
    pub fn load_dir(dir: &Path) -> Result<PolicySet, PolicyLoadError> {
        loader::load_dir(dir)
    }

    /// One service allowed to do everything, known and unknown operations, with or without
    /// connected accounts, in enforce mode with idempotency off: the quick-start default.
    pub fn quickstart_allow_all(service: &str, token_hash: &str, stripe_key_ref: &str) -> PolicySet {
        let rule = Rule {
            id: QUICKSTART_RULE_ID.to_owned(),
            effect: Effect::Allow,
            operations: vec![OperationPattern::everything()],
            params: Vec::new(),
            stripe_account: HeaderCondition::Any,
            stripe_context: HeaderCondition::Any,
            key_mode: KeyMode::Any,
            unknown_operations: true,
            reason: Some("quick-start default: everything is allowed".to_owned()),
            line: 0,
        };
        let policy = ServicePolicy {
            name: service.to_owned(),
            file: PathBuf::new(),
            token_hashes: vec![token_hash.to_owned()],
            mtls_identities: Vec::new(),
            stripe_key: stripe_key_ref.to_owned(),
            mode: Mode::Enforce,
            idempotency: IdempotencyMode::Off,
            rate_limit: None,
            budgets: Vec::new(),
            rules: vec![rule],
            index: Default::default(),
            names: Default::default(),
        }
        .with_index();
        PolicySet::build(vec![policy])
    }

    /// A set from already-validated services; fails on duplicate names or shared identities.
    pub(crate) fn from_services(services: Vec<ServicePolicy>) -> Result<PolicySet, Vec<Problem>> {
        let problems = loader::cross_service_problems(&services);
        if problems.is_empty() { Ok(PolicySet::build(services)) } else { Err(problems) }
    }

    fn build(services: Vec<ServicePolicy>) -> PolicySet {
        let mut by_name = HashMap::new();
        let mut by_token_hash = HashMap::new();
        let mut by_identity = HashMap::new();
        for (i, service) in services.iter().enumerate() {
            by_name.insert(service.name.clone(), i);
            for hash in &service.token_hashes {
                by_token_hash.insert(hash.clone(), i);
            }
            for identity in &service.mtls_identities {
                by_identity.insert(identity.clone(), i);
            }
        }
        PolicySet { inner: Arc::new(SetInner { services, by_name, by_token_hash, by_identity }) }
    }

    /// Every service, in file-name order.
    pub fn services(&self) -> impl Iterator<Item = &ServicePolicy> {
        self.inner.services.iter()
    }

    /// The service with this name.
    pub fn service(&self, name: &str) -> Option<&ServicePolicy> {
        self.inner.by_name.get(name).map(|&i| &self.inner.services[i])
    }

    /// The service a token hash (`sha256:<hex>`) belongs to.
    pub fn service_by_token_hash(&self, hash: &str) -> Option<&ServicePolicy> {
        self.inner.by_token_hash.get(hash).map(|&i| &self.inner.services[i])
    }

    /// The service an mTLS identity (`spiffe://…` or `dns:name`) belongs to.
    pub fn service_by_identity(&self, identity: &str) -> Option<&ServicePolicy> {
        self.inner.by_identity.get(identity).map(|&i| &self.inner.services[i])
    }

    /// Number of services.
    pub fn len(&self) -> usize {
        self.inner.services.len()
    }

    /// True when the set has no service.
    pub fn is_empty(&self) -> bool {
        self.inner.services.is_empty()
    }

    /// True when both handles point at the same snapshot.
    pub fn ptr_eq(&self, other: &PolicySet) -> bool {
        Arc::ptr_eq(&self.inner, &other.inner)
    }
}
