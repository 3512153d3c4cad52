//! The five scenarios and the processes each one runs: the fake upstream (on the generator's
//! core), and in front of it keygate (P0, P1, P2) or nginx (N), pinned to the proxy's core with
//! one worker. D has no proxy: the load generator calls the upstream directly.
//!
//! Every stack is started fresh in its own folder (new WAL, new lake, new nginx temp files) and
//! stopped after its runs, so no scenario inherits another's state.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use tempfile::TempDir;

use crate::error::BenchError;
use crate::procs::{Proc, log_tail, pinned};
use crate::procstat;

/// The path every request of the benchmark goes to.
pub const REQUEST_PATH: &str = "/v1/payment_intents";

/// One of the benchmark's configurations.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, PartialOrd, Ord)]
pub enum Scenario {
    /// The load generator straight to the fake upstream: the floor.
    D,
    /// keygate, audit lake off.
    P0,
    /// keygate, audit lake on, `durability: sync`.
    P1,
    /// keygate, audit lake on, `durability: async`.
    P2,
    /// nginx with `proxy_pass`, upstream keep-alive, injecting the Authorization header.
    N,
}

impl Scenario {
    /// All scenarios, in their reporting order.
    pub const ALL: [Scenario; 5] = [Scenario::D, Scenario::P0, Scenario::P1, Scenario::P2, Scenario::N];

    /// Its short name (`D`, `P0`, …).
    pub fn name(self) -> &'static str {
        match self {
            Scenario::D => "D",
            Scenario::P0 => "P0",
            Scenario::P1 => "P1",
            Scenario::P2 => "P2",
            Scenario::N => "N",
        }
    }

    /// One line saying what it is.
    pub fn description(self) -> &'static str {
        match self {
            Scenario::D => "direct to the fake upstream (the floor)",
            Scenario::P0 => "keygate, audit off",
            Scenario::P1 => "keygate, audit on, durability: sync",
            Scenario::P2 => "keygate, audit on, durability: async",
            Scenario::N => "nginx proxy_pass, upstream keepalive, Authorization injected",
        }
    }

    /// Whether a proxy process sits between the generator and the upstream.
    pub fn has_proxy(self) -> bool {
        self != Scenario::D
    }

    /// Parses a short name.
    pub fn parse(name: &str) -> Option<Scenario> {
        Scenario::ALL.into_iter().find(|s| s.name().eq_ignore_ascii_case(name))
    }
}

/// What every stack shares: binaries, cores, the service token and the Stripe key.
#[derive(Clone)]
pub struct Environment {
    /// Folder of `keygate`, `bench-upstream` and `bench-load`.
    pub bin_dir: PathBuf,
    /// The nginx binary.
    pub nginx: PathBuf,
    /// Folder under which every stack gets its own folder (and the WAL its files).
    pub work_dir: PathBuf,
    /// Core of keygate or nginx.
    pub proxy_core: Option<usize>,
    /// Core of the load generator and the upstream.
    pub generator_core: Option<usize>,
    /// Whether the upstream speaks TLS (proxies verify it against its CA).
    pub upstream_tls: bool,
    /// The upstream's fixed delay before answering.
    pub upstream_delay: Duration,
    /// The service token the clients present to the proxies.
    pub token: String,
    /// `sha256:<hex>` of the token, for keygate's policy.
    pub token_hash: String,
    /// The Stripe key the proxies inject and the upstream requires.
    pub stripe_key: String,
    /// A command the proxy runs under (`valgrind …` for instruction counts); empty: none.
    pub proxy_wrapper: Vec<String>,
    /// keygate runs live anomaly detection (`anomalies:` with every detector at its defaults),
    /// to measure what the detectors cost the request path (issue 18).
    pub anomalies: bool,
}

impl std::fmt::Debug for Environment {
    // Token and key are never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Environment")
            .field("bin_dir", &self.bin_dir)
            .field("nginx", &self.nginx)
            .field("work_dir", &self.work_dir)
            .field("proxy_core", &self.proxy_core)
            .field("generator_core", &self.generator_core)
            .field("upstream_tls", &self.upstream_tls)
            .field("upstream_delay", &self.upstream_delay)
            .field("proxy_wrapper", &self.proxy_wrapper)
            .field("anomalies", &self.anomalies)
            .finish_non_exhaustive()
    }
}

impl Environment {
    /// Path of one of the workspace's binaries.
    pub fn binary(&self, name: &str) -> PathBuf {
        self.bin_dir.join(name)
    }
}

/// Mints a service token with `keygate token new`, returning (token, hash).
pub fn mint_token(keygate: &Path) -> Result<(String, String), BenchError> {
    let output = Command::new(keygate)
        .args(["token", "new", "--service", "bench"])
        .output()
        .map_err(|source| BenchError::Net { what: format!("run `{} token new`", keygate.display()), source })?;
    if !output.status.success() {
        return Err(BenchError::Process(format!(
            "`keygate token new` failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        )));
    }
    let text = String::from_utf8_lossy(&output.stdout);
    let field = |name: &str| {
        text.lines().find_map(|line| line.strip_prefix(name).map(|v| v.trim().to_owned())).filter(|v| !v.is_empty())
    };
    match (field("token:"), field("hash:")) {
        (Some(token), Some(hash)) => Ok((token, hash)),
        _ => Err(BenchError::Invalid("`keygate token new` printed no `token:` and `hash:` lines".to_owned())),
    }
}

/// The running processes of one scenario.
#[derive(Debug)]
pub struct Stack {
    pub scenario: Scenario,
    upstream: Proc,
    proxy: Option<Proc>,
    /// Where the load generator sends its requests.
    pub url: String,
    /// The CA to trust for `url`, when it is https.
    pub ca_file: Option<PathBuf>,
    authorization: String,
    /// The stack's folder; removed on drop.
    dir: TempDir,
}

impl Stack {
    /// Starts the upstream and the scenario's proxy, and waits until they answer.
    pub fn start(env: &Environment, scenario: Scenario) -> Result<Stack, BenchError> {
        let dir = tempfile::Builder::new()
            .prefix(&format!("stack-{}-", scenario.name()))
            .tempdir_in(&env.work_dir)
            .map_err(|e| BenchError::io("create the stack's folder", &env.work_dir, e))?;
        let (upstream, upstream_addr, ca_file) = start_upstream(env, dir.path())?;
        let scheme = if env.upstream_tls { "https" } else { "http" };
        let upstream_url = format!("{scheme}://{upstream_addr}");
        let (proxy, url, authorization, client_ca) = match scenario {
            Scenario::D => (None, format!("{upstream_url}{REQUEST_PATH}"), env.stripe_key.clone(), ca_file.clone()),
            Scenario::P0 | Scenario::P1 | Scenario::P2 => {
                let (proc, addr) = start_keygate(env, dir.path(), scenario, &upstream_url, ca_file.as_deref())?;
                (Some(proc), format!("http://{addr}{REQUEST_PATH}"), env.token.clone(), None)
            }
            Scenario::N => {
                let (proc, addr) = start_nginx(env, dir.path(), upstream_addr, ca_file.as_deref())?;
                (Some(proc), format!("http://{addr}{REQUEST_PATH}"), env.token.clone(), None)
            }
        };
        Ok(Stack {
            scenario,
            upstream,
            proxy,
            url,
            ca_file: client_ca,
            authorization: format!("Bearer {authorization}"),
            dir,
        })
    }

    /// The `Authorization` header value the client sends (token, or the Stripe key for D).
    pub fn authorization(&self) -> &str {
        &self.authorization
    }

    /// The stack's folder.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// The proxy's process and its children (nginx's worker); empty for D.
    pub fn proxy_pids(&self) -> Vec<u32> {
        self.proxy.as_ref().map(|p| procstat::process_tree(p.pid())).unwrap_or_default()
    }

    /// CPU seconds used so far by the proxy (all its processes), if there is one.
    pub fn proxy_cpu_seconds(&self) -> Result<Option<f64>, BenchError> {
        let Some(proxy) = &self.proxy else { return Ok(None) };
        let mut total = 0.0;
        for pid in procstat::process_tree(proxy.pid()) {
            total += procstat::cpu_seconds(pid)?;
        }
        Ok(Some(total))
    }

    /// Peak RSS of the proxy (summed over its processes), in KiB.
    pub fn proxy_peak_rss_kib(&self) -> Result<Option<u64>, BenchError> {
        let Some(proxy) = &self.proxy else { return Ok(None) };
        let mut total = 0;
        for pid in procstat::process_tree(proxy.pid()) {
            total += procstat::peak_rss_kib(pid)?;
        }
        Ok(Some(total))
    }

    /// CPU seconds used so far by the upstream.
    pub fn upstream_cpu_seconds(&self) -> Result<f64, BenchError> {
        procstat::cpu_seconds(self.upstream.pid())
    }

    /// An error if the upstream or the proxy has exited.
    pub fn ensure_running(&mut self) -> Result<(), BenchError> {
        self.upstream.ensure_running()?;
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.ensure_running()?;
        }
        Ok(())
    }

    /// Stops the proxy, then the upstream, and removes the folder.
    pub fn stop(mut self) {
        if let Some(proxy) = self.proxy.as_mut() {
            proxy.stop();
        }
        self.upstream.stop();
    }
}

fn start_upstream(env: &Environment, dir: &Path) -> Result<(Proc, SocketAddr, Option<PathBuf>), BenchError> {
    let log = dir.join("upstream.log");
    let ca_file = env.upstream_tls.then(|| dir.join("upstream-ca.pem"));
    let mut command = pinned(env.generator_core, &env.binary("bench-upstream"));
    command.args(["--listen", "127.0.0.1:0"]).env("BENCH_UPSTREAM_KEY", &env.stripe_key);
    if let Some(ca) = &ca_file {
        command.arg("--tls").arg("--ca-out").arg(ca);
    }
    if !env.upstream_delay.is_zero() {
        command.arg("--delay-ms").arg(env.upstream_delay.as_millis().to_string());
    }
    let log_file = std::fs::File::create(&log).map_err(|e| BenchError::io("create the upstream's log", &log, e))?;
    command.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(log_file);
    let mut proc = Proc::spawn("bench-upstream", &mut command, &log)?;
    // Its first stdout line is `listening <address>`.
    let mut line = String::new();
    if let Some(stdout) = proc.child_mut().and_then(|child| child.stdout.take()) {
        let _ = BufReader::new(stdout).read_line(&mut line);
    }
    let addr = line.trim().strip_prefix("listening ").and_then(|a| a.parse::<SocketAddr>().ok()).ok_or_else(|| {
        BenchError::Process(format!(
            "bench-upstream did not report its address (it said {line:?}); its log:\n{}",
            log_tail(&log, 20)
        ))
    })?;
    Ok((proc, addr, ca_file))
}

fn random_hex_key() -> Result<String, BenchError> {
    let mut bytes = [0_u8; 32];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| f.read_exact(&mut bytes))
        .map_err(|e| BenchError::io("read random bytes", "/dev/urandom", e))?;
    Ok(bytes.iter().map(|b| format!("{b:02x}")).collect())
}

fn write_file(path: &Path, text: &str) -> Result<(), BenchError> {
    std::fs::write(path, text).map_err(|e| BenchError::io("write a benchmark file", path, e))
}

/// keygate's configuration for a scenario (audit off for P0, sync for P1, async for P2), with
/// live anomaly detection at its defaults when `anomalies` is set.
pub fn keygate_config(
    dir: &Path,
    scenario: Scenario,
    upstream_url: &str,
    ca_file: Option<&Path>,
    anomalies: bool,
) -> Result<String, BenchError> {
    let policies = dir.join("policies");
    let mut config = format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: {u}\n  files: {u}\n  connect: {u}\n  meter_events: {u}\n",
        u = upstream_url
    );
    if let Some(ca) = ca_file {
        config.push_str(&format!("  ca_file: {}\n", ca.display()));
    }
    config.push_str(&format!("policies:\n  dir: {}\n", policies.display()));
    let durability = match scenario {
        Scenario::P1 => Some("sync"),
        Scenario::P2 => Some("async"),
        _ => None,
    };
    match durability {
        None => config.push_str("audit:\n  enabled: false\n"),
        Some(durability) => {
            let kek = dir.join("audit-kek");
            let signing = dir.join("audit-signing-key");
            write_file(&kek, &random_hex_key()?)?;
            write_file(&signing, &random_hex_key()?)?;
            config.push_str(&format!(
                "audit:\n  enabled: true\n  lake: {lake}\n  wal_dir: {wal}\n  kek: file://{kek}\n  signing_key: file://{signing}\n  writer_id: bench\n  durability: {durability}\n",
                lake = dir.join("lake").display(),
                wal = dir.join("wal").display(),
                kek = kek.display(),
                signing = signing.display(),
            ));
        }
    }
    if anomalies {
        // Every detector at its defaults; the state file in the stack's folder.
        config.push_str(&format!(
            "anomalies:\n  live:\n    state_file: {}\n",
            dir.join("anomalies-state.json").display()
        ));
    }
    Ok(config)
}

/// The command of a proxy: pinned to the proxy's core, under `env.proxy_wrapper` if any.
fn proxy_command(env: &Environment, program: &Path) -> Command {
    let Some((wrapper, args)) = env.proxy_wrapper.split_first() else { return pinned(env.proxy_core, program) };
    let mut command = pinned(env.proxy_core, Path::new(wrapper));
    command.args(args).arg(program);
    command
}

fn start_keygate(
    env: &Environment,
    dir: &Path,
    scenario: Scenario,
    upstream_url: &str,
    ca_file: Option<&Path>,
) -> Result<(Proc, SocketAddr), BenchError> {
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).map_err(|e| BenchError::io("create the policy folder", &policies, e))?;
    write_file(
        &policies.join("bench.yaml"),
        &format!(
            "service: bench\ntoken_hashes:\n  - \"{}\"\nstripe_key: env://BENCH_STRIPE_KEY\nrules:\n  - id: all\n    effect: allow\n    operation: \"* /**\"\n",
            env.token_hash
        ),
    )?;
    let config_path = dir.join("keygate.yaml");
    write_file(&config_path, &keygate_config(dir, scenario, upstream_url, ca_file, env.anomalies)?)?;
    let log = dir.join("keygate.log");
    let log_file = std::fs::File::create(&log).map_err(|e| BenchError::io("create keygate's log", &log, e))?;
    let mut command = proxy_command(env, &env.binary("keygate"));
    command.arg("serve").arg("--config").arg(&config_path).current_dir(dir);
    // Settings come from the file only: a KEYGATE_… variable in the caller's environment would
    // silently change what is measured.
    for (name, _) in std::env::vars_os() {
        if name.to_string_lossy().starts_with("KEYGATE_") {
            command.env_remove(name);
        }
    }
    // One worker thread: keygate has no worker-count setting, and tokio's multi-thread runtime
    // honours this variable. taskset keeps it, and every other thread, on the proxy's core.
    command
        .env("TOKIO_WORKER_THREADS", "1")
        .env("BENCH_STRIPE_KEY", &env.stripe_key)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(log_file);
    let mut proc = Proc::spawn("keygate", &mut command, &log)?;
    let (proxy, admin) = wait_for_keygate_listening(&mut proc, &log)?;
    wait_ready(&mut proc, admin, &log)?;
    Ok((proc, proxy))
}

fn wait_for_keygate_listening(proc: &mut Proc, log: &Path) -> Result<(SocketAddr, SocketAddr), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        for line in text.lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            let fields = if value["fields"].is_object() { &value["fields"] } else { &value };
            let message = fields["message"].as_str().or_else(|| value["message"].as_str());
            if message == Some("keygate listening") {
                let proxy = fields["proxy"].as_str().and_then(|s| s.parse().ok());
                let admin = fields["admin"].as_str().and_then(|s| s.parse().ok());
                if let (Some(proxy), Some(admin)) = (proxy, admin) {
                    return Ok((proxy, admin));
                }
            }
        }
        proc.ensure_running()?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BenchError::Process(format!(
        "keygate did not log \"keygate listening\" within 30 s; its log:\n{}",
        log_tail(log, 30)
    )))
}

/// Status code of `GET path` on `addr` (HTTP/1.1, `Connection: close`).
fn http_get_status(addr: SocketAddr, path: &str) -> std::io::Result<u16> {
    let mut stream = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    stream.set_read_timeout(Some(Duration::from_secs(5)))?;
    write!(stream, "GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n")?;
    let mut head = String::new();
    BufReader::new(stream).read_line(&mut head)?;
    head.split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| std::io::Error::other(format!("bad status line {head:?}")))
}

fn wait_ready(proc: &mut Proc, admin: SocketAddr, log: &Path) -> Result<(), BenchError> {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        if let Ok(200) = http_get_status(admin, "/readyz") {
            return Ok(());
        }
        proc.ensure_running()?;
        std::thread::sleep(Duration::from_millis(50));
    }
    Err(BenchError::Process(format!(
        "keygate's /readyz did not answer 200 within 30 s; its log:\n{}",
        log_tail(log, 30)
    )))
}

fn free_port() -> Result<u16, BenchError> {
    let listener = TcpListener::bind("127.0.0.1:0")
        .map_err(|source| BenchError::Net { what: "find a free port on loopback".to_owned(), source })?;
    listener
        .local_addr()
        .map(|a| a.port())
        .map_err(|source| BenchError::Net { what: "find a free port on loopback".to_owned(), source })
}

fn running_as_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| s.lines().find_map(|l| l.strip_prefix("Uid:").map(|v| v.split_whitespace().next() == Some("0"))))
        .unwrap_or(false)
}

/// nginx's configuration for scenario N: one worker, proxy_pass with upstream keep-alive, the
/// token checked and the Stripe key injected, an access log line per request (keygate writes one
/// too), nothing else.
pub fn nginx_config(
    env: &Environment,
    dir: &Path,
    listen: SocketAddr,
    upstream: SocketAddr,
    ca_file: Option<&Path>,
) -> String {
    let d = dir.display();
    let user = if running_as_root() { "user root;\n" } else { "" };
    let (scheme, tls) = match ca_file {
        Some(ca) => (
            "https",
            format!(
                "            proxy_ssl_trusted_certificate {};\n            proxy_ssl_verify on;\n            proxy_ssl_name localhost;\n            proxy_ssl_session_reuse on;\n",
                ca.display()
            ),
        ),
        None => ("http", String::new()),
    };
    format!(
        "{user}daemon off;
master_process on;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log {d}/access.log;
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    client_max_body_size 1m;
    keepalive_requests 1000000;
    keepalive_timeout 300s;
    upstream stripe {{
        server {upstream};
        keepalive 64;
        keepalive_requests 1000000;
        keepalive_timeout 300s;
    }}
    server {{
        listen {listen} backlog=4096;
        location / {{
            if ($http_authorization != \"Bearer {token}\") {{
                return 401;
            }}
            proxy_pass {scheme}://stripe;
            proxy_http_version 1.1;
            proxy_set_header Connection \"\";
            proxy_set_header Authorization \"Bearer {key}\";
{tls}        }}
    }}
}}
",
        token = env.token,
        key = env.stripe_key,
    )
}

fn start_nginx(
    env: &Environment,
    dir: &Path,
    upstream: SocketAddr,
    ca_file: Option<&Path>,
) -> Result<(Proc, SocketAddr), BenchError> {
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    std::fs::create_dir_all(dir.join("tmp")).map_err(|e| BenchError::io("create nginx's temp folder", dir, e))?;
    let config_path = dir.join("nginx.conf");
    write_file(&config_path, &nginx_config(env, dir, listen, upstream, ca_file))?;
    let log = dir.join("error.log");
    let stderr = dir.join("nginx.stderr");
    let stderr_file =
        std::fs::File::create(&stderr).map_err(|e| BenchError::io("create nginx's stderr", &stderr, e))?;
    let mut command = proxy_command(env, &env.nginx);
    command
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&config_path)
        .arg("-e")
        .arg(&log)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(stderr_file);
    let mut proc = Proc::spawn("nginx", &mut command, &log)?;
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&listen, Duration::from_millis(200)).is_ok() {
            return Ok((proc, listen));
        }
        proc.ensure_running()
            .map_err(|e| BenchError::Process(format!("{e}\nnginx's stderr:\n{}", log_tail(&stderr, 20))))?;
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(BenchError::Process(format!(
        "nginx did not accept connections on {listen} within 20 s; {}",
        log_tail(&log, 20)
    )))
}
