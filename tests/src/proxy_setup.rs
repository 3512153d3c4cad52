//! A keygate in front of an upstream, with one service, a canary Stripe key and a fresh token:
//! the setup most proxy tests share.

use std::path::Path;

use tempfile::TempDir;

use crate::keygate::{Keygate, KeygateOptions};

/// The Stripe key the tests inject: a canary that must never appear in any output.
pub const CANARY_KEY: &str = "sk_test_51CANARYkeygateSecretKey0000000000000000000000000000";

/// The default `stripe_key` reference: the canary key in keygate's environment.
pub const DEFAULT_KEY_REF: &str = "env://KG_E2E_STRIPE_KEY";

/// A started keygate with its folder, token and key.
#[derive(Debug)]
pub struct ProxySetup {
    pub dir: TempDir,
    pub keygate: Keygate,
    pub token: String,
    pub token_hash: String,
}

/// Options for [`ProxySetup::start`].
#[derive(Debug, Clone)]
pub struct SetupOptions {
    /// The api upstream (and every other host, unless `hosts_yaml` says otherwise).
    pub upstream: String,
    /// Extra YAML appended under the top level of the configuration.
    pub extra_config: String,
    /// Replaces the `upstreams:` host lines.
    pub hosts_yaml: Option<String>,
    /// The policy rules (YAML list items indented by two spaces); default allows everything.
    pub rules_yaml: Option<String>,
    /// Extra top-level keys of the policy file.
    pub policy_extra: String,
    pub wait_ready: bool,
    pub env: Vec<(String, String)>,
    /// Lines added under `listen:` (e.g. `  tls: …`).
    pub listen_tls_yaml: String,
    /// The service's `stripe_key` reference.
    pub stripe_key: String,
    /// Whether the audit lake is on (a local lake under the setup's folder, keys generated there).
    pub audit: bool,
    /// Extra lines under `audit:` (indented by two spaces), e.g. `  durability: async`.
    pub audit_extra: String,
}

impl SetupOptions {
    /// Defaults for an upstream URL.
    pub fn new(upstream: &str) -> SetupOptions {
        SetupOptions {
            upstream: upstream.to_owned(),
            extra_config: String::new(),
            hosts_yaml: None,
            rules_yaml: None,
            policy_extra: String::new(),
            wait_ready: true,
            env: Vec::new(),
            listen_tls_yaml: String::new(),
            stripe_key: DEFAULT_KEY_REF.to_owned(),
            audit: false,
            audit_extra: String::new(),
        }
    }
}

const ALLOW_ALL: &str = "  - id: allow-everything\n    effect: allow\n    operation: \"* /**\"\n    unknown_operations: true\n    stripe_account: any\n    stripe_context: any\n";

impl ProxySetup {
    /// Writes a configuration and a policy folder with one service `checkout`, then starts keygate.
    pub fn start(options: SetupOptions) -> ProxySetup {
        let dir = tempfile::tempdir().expect("temp dir");
        let minted = keygate::auth::mint_token();
        let policies = dir.path().join("policies");
        std::fs::create_dir(&policies).expect("policies dir");
        write_policy(
            &policies,
            "checkout",
            &minted.hash,
            &options.stripe_key,
            options.rules_yaml.as_deref().unwrap_or(ALLOW_ALL),
            &options.policy_extra,
        );
        let hosts = options.hosts_yaml.clone().unwrap_or_else(|| {
            let u = &options.upstream;
            format!("  api: {u}\n  files: {u}\n  connect: {u}\n  meter_events: {u}\n")
        });
        let audit = if options.audit {
            audit_yaml(dir.path(), &options.audit_extra)
        } else {
            "audit:\n  enabled: false\n".to_owned()
        };
        let config = format!(
            "listen:\n  address: 127.0.0.1:0\n{}admin:\n  address: 127.0.0.1:0\nupstreams:\n{hosts}policies:\n  dir: {}\n{audit}{}",
            options.listen_tls_yaml,
            policies.display(),
            options.extra_config
        );
        let mut env = vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())];
        env.extend(options.env.iter().cloned());
        let keygate = Keygate::start(
            dir.path(),
            KeygateOptions { config: Some(&config), env, args: Vec::new(), wait_ready: options.wait_ready },
        );
        ProxySetup { dir, keygate, token: minted.token.expose().to_owned(), token_hash: minted.hash }
    }

    /// Kills keygate with SIGKILL (no drain, no shutdown code) and starts it again from the same
    /// folder, configuration and environment, as a crashed pod's restart would.
    pub fn kill_and_restart(&mut self, env: &[(String, String)]) {
        self.keygate.kill_and_reap();
        let config = std::fs::read_to_string(self.dir.path().join("keygate.yaml")).expect("read keygate.yaml");
        let mut all = vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())];
        all.extend(env.iter().cloned());
        self.keygate = Keygate::start(
            self.dir.path(),
            KeygateOptions { config: Some(&config), env: all, args: Vec::new(), wait_ready: true },
        );
    }

    /// Asserts that neither the canary key nor the token appears in keygate's stdout, stderr or
    /// metrics.
    pub fn assert_no_secret_leaked(&self) {
        let outputs = [
            ("stdout", self.keygate.stdout_text()),
            ("stderr", self.keygate.stderr_text()),
            ("metrics", self.keygate.metrics()),
        ];
        for (name, text) in outputs {
            assert!(!text.contains(CANARY_KEY), "the Stripe key leaked into keygate's {name}");
            assert!(!text.contains("CANARYkeygate"), "part of the Stripe key leaked into keygate's {name}");
            assert!(!text.contains(&self.token), "the service token leaked into keygate's {name}");
        }
    }
}

/// The hex text of 32 random bytes (a key-encryption key, or an Ed25519 seed).
pub fn random_key_hex() -> String {
    let mut bytes = [0u8; 32];
    let mut file = std::fs::File::open("/dev/urandom").expect("/dev/urandom");
    std::io::Read::read_exact(&mut file, &mut bytes).expect("random bytes");
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// An `audit:` section for a local lake in `dir` (`dir/lake`, `dir/wal`), with a key-encryption
/// key and a signing key written to `dir/audit-kek` and `dir/audit-signing-key` (kept if present).
pub fn audit_yaml(dir: &Path, extra: &str) -> String {
    audit_yaml_with_wal(dir, &dir.join("wal"), extra)
}

/// [`audit_yaml`] with the write-ahead log in `wal` (a file system of the test's choosing).
pub fn audit_yaml_with_wal(dir: &Path, wal: &Path, extra: &str) -> String {
    for name in ["audit-kek", "audit-signing-key"] {
        let path = dir.join(name);
        if !path.exists() {
            std::fs::write(&path, random_key_hex()).expect("write audit key");
        }
    }
    format!(
        "audit:\n  lake: {lake}\n  wal_dir: {wal}\n  kek: file://{kek}\n  signing_key: file://{signing}\n  writer_id: e2e-writer\n{extra}",
        lake = dir.join("lake").display(),
        wal = wal.display(),
        kek = dir.join("audit-kek").display(),
        signing = dir.join("audit-signing-key").display(),
    )
}

/// Creates `dir` with one policy, service `checkout` allowed every operation with the default
/// key reference, and returns the service's fresh token.
pub fn allow_all_checkout_policy(dir: &Path) -> String {
    std::fs::create_dir_all(dir).expect("create the policy folder");
    let minted = keygate::auth::mint_token();
    write_policy(
        dir,
        "checkout",
        &minted.hash,
        DEFAULT_KEY_REF,
        "  - id: all\n    effect: allow\n    operation: \"* /**\"\n",
        "",
    );
    minted.token.expose().to_owned()
}

/// Writes `<dir>/<service>.yaml` (written to a temporary name, then renamed, so that a reload
/// never reads half a file).
pub fn write_policy(dir: &Path, service: &str, token_hash: &str, stripe_key: &str, rules_yaml: &str, extra: &str) {
    let text = format!(
        "service: {service}\ntoken_hashes:\n  - \"{token_hash}\"\nstripe_key: {stripe_key}\n{extra}rules:\n{rules_yaml}"
    );
    let temporary = dir.join(format!(".{service}.yaml.tmp"));
    std::fs::write(&temporary, text).expect("write policy");
    std::fs::rename(&temporary, dir.join(format!("{service}.yaml"))).expect("rename policy");
}
