//! A real `redis-server` for the end-to-end tests: the limit store crate's test server
//! (`keygate_limits::testing`, the one way to start one), with a password and the append-only
//! file fsynced on every write (as docs/deploy.md recommends for money counts), so that a stop and
//! a start keep every count; and the `limit_store:` section that points keygate at it.

use keygate_limits::testing::{RedisOptions, RedisServer};

/// The password every test Redis requires (AUTH); keygate reads it through a `file://` reference.
pub const PASSWORD: &str = "redis-test-password-canary-0000";

/// A running (or stopped) redis-server.
#[derive(Debug)]
pub struct Redis {
    server: RedisServer,
}

impl Redis {
    /// Starts a redis-server on a free port, with AUTH and AOF.
    pub fn start() -> Redis {
        let server =
            RedisServer::start(RedisOptions { password: Some(PASSWORD.to_owned()), append_only: true, tls: None });
        std::fs::write(server.dir().join("password"), PASSWORD).expect("write the redis password file");
        Redis { server }
    }

    /// `host:port`.
    pub fn address(&self) -> String {
        self.server.address()
    }

    /// Kills the server (SIGKILL: what the counts survive is what the AOF holds).
    pub fn stop(&mut self) {
        self.server.stop();
    }

    /// Starts the server again on the same port and folder (the AOF brings the counts back).
    pub fn resume(&mut self) {
        self.server.resume();
    }

    /// A `limit_store:` section for keygate's configuration: this Redis, AUTH with the password
    /// from a `file://` reference, every store call bounded by `timeout`, probed every
    /// `probe_interval`; `extra` lines (indented by two spaces) are added to the section.
    pub fn limit_store_yaml(&self, timeout: &str, probe_interval: &str, extra: &str) -> String {
        format!(
            "limit_store:\n  kind: redis\n  timeout: {timeout}\n  probe_interval: {probe_interval}\n{extra}  redis:\n    address: {}\n    password: \"file://{}\"\n",
            self.address(),
            self.server.dir().join("password").display()
        )
    }
}
