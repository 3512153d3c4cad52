//! A real `redis-server` (Debian's package, installed by scripts/install-redis.sh) on a free
//! loopback port, in its own temporary folder, with a password and the append-only file fsynced
//! on every write (as docs/deploy.md recommends for money counts), so that a stop and a start
//! keep every count. Killed when dropped.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use tempfile::TempDir;

use crate::ChildGuard;

/// Path of `redis-server`: `$KEYGATE_REDIS_SERVER` (printed by scripts/setup-test-env.sh), else
/// `PATH`. Panics naming the installer when it is missing: these tests are never skipped.
pub fn redis_server_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("KEYGATE_REDIS_SERVER").map(PathBuf::from)
        && path.is_file()
    {
        return path;
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join("redis-server");
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "redis-server not found ($KEYGATE_REDIS_SERVER or PATH). Run the README's test command (scripts/test.sh), \
         whose setup installs it from Debian's packages (scripts/install-redis.sh)."
    );
}

/// A running (or stopped) redis-server.
#[derive(Debug)]
pub struct Redis {
    dir: TempDir,
    pub port: u16,
    child: Option<ChildGuard>,
}

/// The password every test Redis requires (AUTH); keygate reads it through a `file://` reference.
pub const PASSWORD: &str = "redis-test-password-canary-0000";

impl Redis {
    /// Starts a redis-server on a free port.
    pub fn start() -> Redis {
        let dir = tempfile::tempdir().expect("temp dir for redis");
        std::fs::write(dir.path().join("password"), PASSWORD).expect("write the redis password file");
        let mut redis = Redis { dir, port: crate::free_port(), child: None };
        redis.resume();
        redis
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// Kills the server (SIGKILL: what the counts survive is what the AOF holds).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts the server again on the same port and folder (the AOF brings the counts back).
    pub fn resume(&mut self) {
        assert!(self.child.is_none(), "redis-server is already running");
        let mut command = Command::new(redis_server_bin());
        command
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", ""])
            .args(["--appendonly", "yes", "--appendfsync", "always", "--requirepass", PASSWORD])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let mut child = ChildGuard::spawn("redis-server", &mut command);
        let addr: SocketAddr = self.address().parse().expect("redis address");
        crate::wait_for_tcp(addr, Duration::from_secs(10), "redis-server");
        child.assert_running();
        self.child = Some(child);
    }

    /// A `limit_store:` section for keygate's configuration: this Redis, AUTH with the password
    /// from a `file://` reference, every store call bounded by `timeout`, probed every
    /// `probe_interval`; `extra` lines (indented by two spaces) are added to the section.
    pub fn limit_store_yaml(&self, timeout: &str, probe_interval: &str, extra: &str) -> String {
        format!(
            "limit_store:\n  kind: redis\n  timeout: {timeout}\n  probe_interval: {probe_interval}\n{extra}  redis:\n    address: {}\n    password: \"file://{}\"\n",
            self.address(),
            self.dir.path().join("password").display()
        )
    }
}
