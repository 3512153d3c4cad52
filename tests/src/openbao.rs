//! OpenBao (the open-source Vault) in dev mode, started on a free port, plus helpers to seed it
//! through its own CLI: KV v2 secrets, policies, tokens, AppRole, Transit.
//!
//! Invariants: the server listens on loopback only and is killed when [`OpenBao`] drops; secret
//! values given to the helpers travel on the CLI's stdin, never in its arguments; a failing CLI
//! call panics with the command and its stderr (values are not in either).
//!
//! Dev mode keeps everything in memory: [`OpenBao::restart`] brings back an empty server on the
//! same address with the same root token (re-seed what the test needs).

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::{ChildGuard, free_port, tool, wait_for_tcp};

/// A running `bao server -dev`.
#[derive(Debug)]
pub struct OpenBao {
    child: Option<ChildGuard>,
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    /// The dev root token (all permissions).
    pub root_token: String,
    log: PathBuf,
    tls: bool,
    dir: tempfile::TempDir,
}

impl OpenBao {
    /// Starts OpenBao in dev mode (KV v2 at `secret/`) and waits until it is unsealed and answers.
    pub fn start() -> OpenBao {
        OpenBao::start_with(false)
    }

    /// Like [`OpenBao::start`], but serving HTTPS with a certificate from a dev CA whose PEM is
    /// at [`OpenBao::ca_cert`].
    pub fn start_tls() -> OpenBao {
        OpenBao::start_with(true)
    }

    fn start_with(tls: bool) -> OpenBao {
        let dir = tempfile::tempdir().expect("temp dir for OpenBao");
        let nanos = SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0);
        let root_token = format!("kg-root-{}-{nanos}", std::process::id());
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.path().join("bao.log");
        let mut bao = OpenBao { child: None, addr, root_token, log, tls, dir };
        bao.spawn();
        bao
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(&self.log).expect("create OpenBao log file");
        let log_err = log.try_clone().expect("clone log handle");
        let mut command = Command::new(tool("bao"));
        command
            .arg("server")
            .arg("-dev")
            .arg(format!("-dev-root-token-id={}", self.root_token))
            .arg(format!("-dev-listen-address={}", self.addr))
            .arg("-dev-no-store-token")
            .args(if self.tls {
                vec!["-dev-tls".to_owned(), format!("-dev-tls-cert-dir={}", self.dir.path().display())]
            } else {
                Vec::new()
            })
            .env_remove("BAO_ADDR")
            .env_remove("VAULT_ADDR")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = ChildGuard::spawn("bao server -dev", &mut command);
        wait_for_tcp(self.addr, Duration::from_secs(30), "OpenBao");
        child.assert_running_with_log(&self.log);
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until `bao status` says unsealed (dev mode unseals right after listening).
    fn wait_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let output = self.command(&["status", "-format=json"]).output().expect("run bao status");
            if output.status.success() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "OpenBao at {} did not become ready: {}",
                self.addr,
                String::from_utf8_lossy(&output.stderr)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// The base URL, for keygate's `secrets.vault.address`.
    pub fn url(&self) -> String {
        let scheme = if self.tls { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// The dev CA's certificate (PEM) when started with [`OpenBao::start_tls`].
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.path().join("vault-ca.pem")
    }

    /// Kills the server (an outage: connections are refused until [`OpenBao::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts a fresh, empty dev server on the same address with the same root token.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// What the server wrote to stdout/stderr so far (for leak scans and failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(tool("bao"));
        command
            .args(args)
            .env("BAO_ADDR", self.url())
            .env("BAO_TOKEN", &self.root_token)
            .env_remove("VAULT_ADDR")
            .env_remove("VAULT_TOKEN")
            .stdin(Stdio::null());
        if self.tls {
            command.env("BAO_CACERT", self.ca_cert());
        }
        command
    }

    /// Runs the `bao` CLI as root with `stdin`; returns stdout, panics with stderr on failure.
    pub fn bao_with_stdin(&self, args: &[&str], stdin: &str) -> String {
        self.run(args, stdin, false)
    }

    fn run(&self, args: &[&str], stdin: &str, json: bool) -> String {
        self.try_run(args, stdin, json).unwrap_or_else(|stderr| panic!("`bao {}` failed: {stderr}", args.join(" ")))
    }

    /// Runs the `bao` CLI as root; stdout on success, stderr on failure.
    pub fn try_bao(&self, args: &[&str]) -> Result<String, String> {
        self.try_run(args, "", false)
    }

    fn try_run(&self, args: &[&str], stdin: &str, json: bool) -> Result<String, String> {
        let mut command = self.command(args);
        if json {
            command.env("BAO_FORMAT", "json");
        }
        command.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().expect("run the bao CLI");
        child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write to bao's stdin");
        let output = child.wait_with_output().expect("wait for the bao CLI");
        if output.status.success() {
            Ok(String::from_utf8(output.stdout).expect("bao prints UTF-8"))
        } else {
            Err(String::from_utf8_lossy(&output.stderr).into_owned())
        }
    }

    /// Runs the `bao` CLI as root; returns stdout, panics with stderr on failure.
    pub fn bao(&self, args: &[&str]) -> String {
        self.bao_with_stdin(args, "")
    }

    /// Runs the `bao` CLI as root with JSON output and parses it.
    pub fn bao_json(&self, args: &[&str]) -> serde_json::Value {
        self.bao_json_with_stdin(args, "")
    }

    /// Runs the `bao` CLI as root with `stdin` and JSON output, and parses it.
    pub fn bao_json_with_stdin(&self, args: &[&str], stdin: &str) -> serde_json::Value {
        let text = self.run(args, stdin, true);
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("`bao {}` printed no JSON ({e})", args.join(" ")))
    }

    /// Writes a new version of the KV v2 secret `mount/path` with `data` (a JSON object, given
    /// on stdin); returns the new version number.
    pub fn kv_put(&self, mount: &str, path: &str, data: &serde_json::Value) -> u64 {
        let mount_arg = format!("-mount={mount}");
        let parsed = self.bao_json_with_stdin(&["kv", "put", &mount_arg, path, "-"], &data.to_string());
        parsed["data"]["version"].as_u64().expect("kv put reports the new version")
    }

    /// Writes a KV v2 secret with string fields.
    pub fn kv_put_fields(&self, mount: &str, path: &str, fields: &[(&str, &str)]) -> u64 {
        let data: serde_json::Map<String, serde_json::Value> =
            fields.iter().map(|(k, v)| ((*k).to_owned(), serde_json::Value::String((*v).to_owned()))).collect();
        self.kv_put(mount, path, &serde_json::Value::Object(data))
    }

    /// Enables a KV version 2 engine at `mount` (dev mode already has one at `secret/`).
    pub fn enable_kv2(&self, mount: &str) {
        self.bao(&["secrets", "enable", &format!("-path={mount}"), "kv-v2"]);
    }

    /// Creates or replaces the ACL policy `name`.
    pub fn write_policy(&self, name: &str, hcl: &str) {
        self.bao_with_stdin(&["policy", "write", name, "-"], hcl);
    }

    /// Makes a token with `policies` (no default policy) and the given TTL, e.g. `"30s"`.
    /// `renewable` tokens can be renewed up to `explicit_max_ttl` (e.g. `"1h"`).
    pub fn create_token(&self, policies: &[&str], ttl: &str, renewable: bool) -> String {
        let mut args = vec!["token", "create", "-no-default-policy", "-orphan"];
        let policy_args: Vec<String> = policies.iter().map(|p| format!("-policy={p}")).collect();
        args.extend(policy_args.iter().map(String::as_str));
        let ttl_arg = format!("-ttl={ttl}");
        args.push(&ttl_arg);
        let renewable_arg = format!("-renewable={renewable}");
        args.push(&renewable_arg);
        let out = self.bao_json(&args);
        out["auth"]["client_token"].as_str().expect("token create returns a token").to_owned()
    }

    /// Looks a token up (as root): its remaining TTL in seconds.
    pub fn token_ttl(&self, token: &str) -> u64 {
        let parsed = self.bao_json_with_stdin(&["write", "auth/token/lookup", "token=-"], token);
        parsed["data"]["ttl"].as_u64().expect("token lookup reports a ttl")
    }

    /// Enables AppRole at `mount` (once) and creates `role` with `policies` and the token TTL;
    /// returns `(role_id, secret_id)`.
    pub fn approle(&self, mount: &str, role: &str, policies: &[&str], token_ttl: &str) -> (String, String) {
        let enabled = self.bao_json(&["auth", "list"]);
        if enabled.get(format!("{mount}/")).is_none() {
            self.bao(&["auth", "enable", &format!("-path={mount}"), "approle"]);
        }
        let role_path = format!("auth/{mount}/role/{role}");
        self.bao(&[
            "write",
            &role_path,
            &format!("token_policies={}", policies.join(",")),
            &format!("token_ttl={token_ttl}"),
            "token_max_ttl=24h",
        ]);
        let role_id = self.bao_json(&["read", &format!("{role_path}/role-id")])["data"]["role_id"]
            .as_str()
            .expect("role id")
            .to_owned();
        let secret_id = self.bao_json(&["write", "-f", &format!("{role_path}/secret-id")])["data"]["secret_id"]
            .as_str()
            .expect("secret id")
            .to_owned();
        (role_id, secret_id)
    }

    /// Enables the Transit engine at `mount` (once) and creates the AES-256-GCM key `key`.
    pub fn transit_key(&self, mount: &str, key: &str) {
        let enabled = self.bao_json(&["secrets", "list"]);
        if enabled.get(format!("{mount}/")).is_none() {
            self.bao(&["secrets", "enable", &format!("-path={mount}"), "transit"]);
        }
        self.bao(&["write", "-f", &format!("{mount}/keys/{key}"), "type=aes256-gcm96"]);
    }

    /// Rotates the Transit key (new ciphertexts use the next version; old ones still decrypt).
    pub fn transit_rotate(&self, mount: &str, key: &str) {
        self.bao(&["write", "-f", &format!("{mount}/keys/{key}/rotate")]);
    }
}
