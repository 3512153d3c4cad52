//! Harness for keygate's end-to-end tests: finds the real tools the tests talk to, starts them on
//! free ports, waits for them, and stops them when the guard drops.
//!
//! Invariants: a missing tool fails the test with a message naming the setup script; no fixed
//! port is ever used; every child process is killed when its guard drops, even on panic.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

pub mod audit;
pub mod brokers;
pub mod fake_stripe;
pub mod http;
pub mod keygate;
pub mod localstripe;
pub mod moto;
pub mod openbao;
pub mod pki;
pub mod proxy_setup;
pub mod redis;
pub mod webhooks;

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command};
use std::time::{Duration, Instant};

/// Path of a test tool (`bao`, `moto_server`, `localstripe`, `python`, …).
///
/// Looks in `$KEYGATE_TOOLS_BIN` (set by `scripts/setup-test-env.sh`), then on `PATH`. Panics with
/// a message that says how to install it: these tests are never skipped.
pub fn tool(name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os("KEYGATE_TOOLS_BIN") {
        let candidate = PathBuf::from(dir).join(name);
        if candidate.is_file() {
            return candidate;
        }
    }
    if let Some(paths) = std::env::var_os("PATH") {
        for dir in std::env::split_paths(&paths) {
            let candidate = dir.join(name);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    panic!(
        "test tool `{name}` not found in $KEYGATE_TOOLS_BIN or PATH. Run the README's test command \
         (scripts/test.sh), or `eval \"$(scripts/setup-test-env.sh)\"` before `cargo test`."
    );
}

/// Folder holding the `stripe` npm package for the Node SDK tests.
pub fn node_modules() -> PathBuf {
    let dir = std::env::var_os("KEYGATE_NODE_MODULES").map(PathBuf::from).unwrap_or_default();
    assert!(
        dir.join("stripe").is_dir(),
        "the `stripe` npm package was not found in $KEYGATE_NODE_MODULES ({}). Run scripts/test.sh, \
         or `eval \"$(scripts/setup-test-env.sh)\"` before `cargo test`.",
        dir.display()
    );
    dir
}

/// A free TCP port on loopback. The listener is closed before returning, so a racing process
/// could take it; callers that can bind port 0 themselves should do that instead.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port on loopback");
    listener.local_addr().expect("local addr").port()
}

/// Waits until something accepts TCP connections on `addr`, or panics after `timeout`.
pub fn wait_for_tcp(addr: SocketAddr, timeout: Duration, what: &str) {
    let deadline = Instant::now() + timeout;
    while Instant::now() < deadline {
        if TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what} did not accept connections on {addr} within {timeout:?}");
}

/// A child process that is killed (and reaped) when this guard drops.
#[derive(Debug)]
pub struct ChildGuard {
    name: String,
    child: Option<Child>,
}

impl ChildGuard {
    /// Spawns `command`, naming it `name` in messages.
    pub fn spawn(name: &str, command: &mut Command) -> ChildGuard {
        let child = command.spawn().unwrap_or_else(|e| panic!("could not start {name}: {e}"));
        ChildGuard { name: name.to_owned(), child: Some(child) }
    }

    /// Guards a child started by the caller (for example with a piped stderr).
    pub fn from_child(name: &str, child: Child) -> ChildGuard {
        ChildGuard { name: name.to_owned(), child: Some(child) }
    }

    /// The process id.
    pub fn id(&self) -> u32 {
        self.child.as_ref().map(Child::id).unwrap_or(0)
    }

    /// Panics if the process has already exited (say, because its port was taken).
    pub fn assert_running(&mut self) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            panic!("{} exited early with {status}", self.name);
        }
    }

    /// Panics with the log file's contents if the process has already exited.
    pub fn assert_running_with_log(&mut self, log: &std::path::Path) {
        if let Some(child) = self.child.as_mut()
            && let Ok(Some(status)) = child.try_wait()
        {
            let text = std::fs::read_to_string(log).unwrap_or_default();
            panic!("{} exited early with {status}; its output:\n{text}", self.name);
        }
    }

    /// Kills the process now (SIGKILL) and waits for it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Gives back the child, which the caller now owns.
    pub fn into_child(mut self) -> Child {
        self.child.take().expect("child already taken")
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        self.kill();
    }
}
