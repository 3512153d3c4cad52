//! The embedded quick-start default: `keygate serve` with no configuration file.
//!
//! One service, `default`, whose token is generated once and kept in
//! `<data dir>/service-token` (mode 0600) so that a restart does not break a developer's pasted
//! configuration; the Stripe key comes from `STRIPE_SECRET_KEY`; the policy allows every Stripe
//! operation and says so. A live key is refused unless the operator acknowledges live mode.

use std::io::Write;
use std::path::{Path, PathBuf};

use keygate_policies::PolicySet;

use crate::auth::{TOKEN_PREFIX, mint_token, token_hash};
use crate::pipeline::is_live_key;

/// The environment variable holding the Stripe key in the quick start.
pub const KEY_VARIABLE: &str = "STRIPE_SECRET_KEY";
/// The quick start's only service.
pub const SERVICE: &str = "default";

/// Why the quick start cannot run.
#[derive(Debug, thiserror::Error)]
pub enum QuickstartError {
    #[error(
        "{KEY_VARIABLE} is not set. The quick start injects this Stripe key into every request: \
         export {KEY_VARIABLE}=sk_test_… (a test-mode secret or restricted key from \
         https://dashboard.stripe.com/test/apikeys), or run with --config FILE."
    )]
    MissingKey,
    #[error(
        "{KEY_VARIABLE} holds a live-mode key: requests through this quick start would move real \
         money with an allow-all policy. Use a test key (sk_test_…/rk_test_…), or pass \
         --allow-live-key if that is really what you want."
    )]
    LiveKey,
    #[error("{KEY_VARIABLE} does not look like a Stripe secret or restricted key (sk_… or rk_…)")]
    NotAKey,
    #[error("cannot use the data folder {path}: {source}")]
    DataDir { path: String, source: std::io::Error },
}

/// What the quick start set up.
#[derive(Debug)]
pub struct Quickstart {
    pub policies: PolicySet,
    pub token_file: PathBuf,
    /// The token, to print once for the developer who started keygate.
    pub token: crate::auth::RedactedToken,
    pub livemode: bool,
}

/// Prepares the quick start from `STRIPE_SECRET_KEY` and the data folder.
pub fn prepare(key: Option<&str>, data_dir: &Path, allow_live_key: bool) -> Result<Quickstart, QuickstartError> {
    let key = key.map(str::trim).filter(|k| !k.is_empty()).ok_or(QuickstartError::MissingKey)?;
    let livemode = is_live_key(key);
    if livemode && !allow_live_key {
        return Err(QuickstartError::LiveKey);
    }
    if !(key.starts_with("sk_") || key.starts_with("rk_")) || key.starts_with(TOKEN_PREFIX) {
        return Err(QuickstartError::NotAKey);
    }
    let data_error = |source| QuickstartError::DataDir { path: data_dir.display().to_string(), source };
    std::fs::create_dir_all(data_dir).map_err(data_error)?;
    let token_file = data_dir.join("service-token");
    let token = match std::fs::read_to_string(&token_file) {
        Ok(text) if text.trim().starts_with(TOKEN_PREFIX) => crate::auth::RedactedToken::from_existing(text.trim()),
        _ => {
            let minted = mint_token();
            write_private(&token_file, minted.token.expose()).map_err(data_error)?;
            minted.token
        }
    };
    let policies =
        PolicySet::quickstart_allow_all(SERVICE, &token_hash(token.expose()), &format!("env://{KEY_VARIABLE}"));
    Ok(Quickstart { policies, token_file, token, livemode })
}

/// Points the audit lake at the data folder, with a key-encryption key and a signing key
/// generated once there (mode 0600), unless the operator configured the audit section already.
pub fn prepare_audit(audit: &mut keygate_auditlog::AuditConfig, data_dir: &Path) -> Result<(), QuickstartError> {
    if !audit.enabled || !audit.kek.trim().is_empty() {
        return Ok(());
    }
    let data_error = |source| QuickstartError::DataDir { path: data_dir.display().to_string(), source };
    let data_dir = std::fs::canonicalize(data_dir).map_err(data_error)?;
    // The KEK as 64 hex characters; the signing key as `ed25519-seed:<64 hex>`, which says what
    // it is (folders of older versions hold a bare 64-hex seed, still read as a seed there).
    for (name, prefix) in [("audit-kek", ""), ("audit-signing-key", keygate_auditlog::crypto::SEED_PREFIX)] {
        let path = data_dir.join(name);
        if !path.exists() {
            let mut random = zeroize::Zeroizing::new([0u8; 32]);
            rand::RngCore::fill_bytes(&mut rand::rng(), random.as_mut());
            let text = zeroize::Zeroizing::new(format!("{prefix}{}", hex::encode(random.as_ref())));
            write_private(&path, &text).map_err(data_error)?;
        }
    }
    audit.lake = data_dir.join("lake").display().to_string();
    audit.wal_dir = data_dir.join("wal");
    audit.kek = format!("file://{}", data_dir.join("audit-kek").display());
    audit.signing_key = format!("file://{}", data_dir.join("audit-signing-key").display());
    Ok(())
}

fn write_private(path: &Path, text: &str) -> std::io::Result<()> {
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let mut file = options.open(path)?;
    file.write_all(text.as_bytes())?;
    file.write_all(b"\n")?;
    file.sync_all()
}

/// The banner printed on stdout at start: where keygate listens, the token, and the lines a
/// developer pastes into the Python and Node SDKs.
pub fn banner(quickstart: &Quickstart, proxy_url: &str, admin_url: &str, lake: &str) -> String {
    let token = quickstart.token.expose();
    let (host, port) = proxy_url.trim_start_matches("http://").rsplit_once(':').unwrap_or(("127.0.0.1", "8080"));
    format!(
        "keygate quick start\n\
         \x20 proxy     {proxy_url}   (admin: {admin_url}/healthz /readyz /metrics)\n\
         \x20 service   {SERVICE}: quick-start policy ALLOWS EVERY STRIPE OPERATION (write policies for production: docs/policies.md)\n\
         \x20 Stripe    key from ${KEY_VARIABLE} ({mode} mode), never given to the service\n\
         \x20 audit     every exchange, encrypted, in {lake} (query it: auditlog query --lake {lake} \"SELECT …\")\n\
         \x20 token     {token}\n\
         \x20           (also in {token_file}; the service holds only this token)\n\
         \n\
         Python:  client = stripe.StripeClient(\"{token}\", base_addresses={{\"api\": \"{proxy_url}\", \"files\": \"{proxy_url}\", \"connect\": \"{proxy_url}\", \"meter_events\": \"{proxy_url}\"}})\n\
         Node:    const stripe = new Stripe(\"{token}\", {{ host: \"{host}\", port: {port}, protocol: \"http\" }});\n",
        mode = if quickstart.livemode { "LIVE" } else { "test" },
        token_file = quickstart.token_file.display(),
    )
}
