//! Test support (feature `test-support`): a real `redis-server` (Debian's package, installed by
//! scripts/install-deb.sh redis-server) on a free loopback port in its own temporary folder, optionally
//! with TLS, the append-only file, or a Sentinel watching it. Used by this crate's conformance
//! suite and by the end-to-end harness (`keygate-tests`), so that there is one way to start one.
//!
//! Invariants: no fixed port; a missing `redis-server` panics with the installer's name (tests
//! that need Redis are never skipped); every process is killed when its guard drops.
#![allow(clippy::expect_used, clippy::panic)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Path of `redis-server`: `$KEYGATE_REDIS_SERVER` (printed by scripts/setup-test-env.sh), else
/// `PATH`, else `/usr/bin`.
pub fn redis_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYGATE_REDIS_SERVER").map(PathBuf::from)
        && path.is_file()
    {
        return path;
    }
    let mut dirs: Vec<PathBuf> =
        std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
    dirs.push(PathBuf::from("/usr/bin"));
    for dir in dirs {
        let candidate = dir.join("redis-server");
        if candidate.is_file() {
            return candidate;
        }
    }
    panic!(
        "redis-server not found ($KEYGATE_REDIS_SERVER, PATH, /usr/bin). Run the README's test command \
         (scripts/test.sh), whose setup installs it from Debian's packages (scripts/install-deb.sh redis-server)."
    );
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").and_then(|l| l.local_addr()).map(|a| a.port()).expect("a free loopback port")
}

fn wait_listening(port: u16, what: &str, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited early with {status}");
        }
        assert!(Instant::now() < deadline, "{what} did not listen on 127.0.0.1:{port} within 10 s");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// How to run the server.
#[derive(Debug, Clone, Default)]
pub struct RedisOptions {
    /// `requirepass`.
    pub password: Option<String>,
    /// `appendonly yes` with `appendfsync always`: counts survive a kill and a restart.
    pub append_only: bool,
    /// TLS only (no plain port), with this certificate, key and CA (PEM files).
    pub tls: Option<(PathBuf, PathBuf, PathBuf)>,
}

/// A redis-server that can be stopped and started again on the same port and folder.
#[derive(Debug)]
pub struct RedisServer {
    dir: tempfile::TempDir,
    options: RedisOptions,
    /// The port it listens on (TLS when configured so).
    pub port: u16,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts one.
    pub fn start(options: RedisOptions) -> RedisServer {
        let dir = tempfile::tempdir().expect("a temporary folder for redis-server");
        let mut server = RedisServer { dir, options, port: free_port(), child: None };
        server.resume();
        server
    }

    /// Its folder (AOF, and room for the caller's files).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// `127.0.0.1:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills it (SIGKILL: what survives is what the AOF holds).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port and folder.
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let port = self.port.to_string();
        let mut command = Command::new(redis_server_bin());
        command.args(["--bind", "127.0.0.1", "--save", ""]).arg("--dir").arg(self.dir.path());
        match &self.options.tls {
            Some((cert, key, ca)) => {
                command.args(["--port", "0", "--tls-port", &port, "--tls-auth-clients", "no"]);
                command
                    .arg("--tls-cert-file")
                    .arg(cert)
                    .arg("--tls-key-file")
                    .arg(key)
                    .arg("--tls-ca-cert-file")
                    .arg(ca);
            }
            None => {
                command.args(["--port", &port]);
            }
        }
        if self.options.append_only {
            command.args(["--appendonly", "yes", "--appendfsync", "always"]);
        } else {
            command.args(["--appendonly", "no"]);
        }
        if let Some(password) = &self.options.password {
            command.args(["--requirepass", password]);
        }
        let mut child = command
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start redis-server: {e}"));
        wait_listening(self.port, "redis-server", &mut child);
        self.child = Some(child);
    }

    /// Starts a Sentinel (`redis-server --sentinel`) that monitors this server as primary
    /// `master_name`.
    pub fn sentinel(&self, master_name: &str) -> Sentinel {
        let dir = tempfile::tempdir().expect("a temporary folder for the sentinel");
        let port = free_port();
        let mut config = format!(
            "port {port}\nbind 127.0.0.1\ndir {}\nsentinel monitor {master_name} 127.0.0.1 {} 1\nsentinel down-after-milliseconds {master_name} 60000\n",
            dir.path().display(),
            self.port
        );
        if let Some(password) = &self.options.password {
            config.push_str(&format!("sentinel auth-pass {master_name} {password}\n"));
        }
        let file = dir.path().join("sentinel.conf");
        std::fs::write(&file, config).expect("write sentinel.conf");
        let mut child = Command::new(redis_server_bin())
            .arg(&file)
            .arg("--sentinel")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("could not start redis-server --sentinel: {e}"));
        wait_listening(port, "redis sentinel", &mut child);
        Sentinel { _dir: dir, port, child }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
    }
}

/// A running Sentinel, killed on drop.
#[derive(Debug)]
pub struct Sentinel {
    _dir: tempfile::TempDir,
    /// Its port.
    pub port: u16,
    child: Child,
}

impl Drop for Sentinel {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
