//! Starting the real `keygate` binary for a test, on ports it picks itself (port 0), with its
//! stdout and stderr captured to files so that tests can scan them for canaries.

use std::io::Read;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::ChildGuard;

/// Path of the `keygate` binary built by `cargo build` (scripts/test.sh builds it first).
pub fn keygate_bin() -> PathBuf {
    binary("keygate")
}

/// Path of a binary of this workspace next to the test executable (`target/<profile>/NAME`).
pub fn binary(name: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(format!("KEYGATE_BIN_{}", name.to_ascii_uppercase())) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current test executable");
    // target/debug/deps/test-xxxx → target/debug/NAME
    let profile_dir = exe.parent().and_then(Path::parent).expect("target profile folder");
    let candidate = profile_dir.join(name);
    assert!(
        candidate.is_file(),
        "{} not found: build it first (`cargo build --workspace --bins`, which scripts/test.sh does)",
        candidate.display()
    );
    candidate
}

/// A running keygate.
#[derive(Debug)]
pub struct Keygate {
    child: ChildGuard,
    pub proxy: SocketAddr,
    pub admin: SocketAddr,
    pub stdout: PathBuf,
    pub stderr: PathBuf,
}

/// What to start keygate with.
#[derive(Debug, Default)]
pub struct KeygateOptions<'a> {
    /// Configuration file contents (written to `dir/keygate.yaml`); `None` runs the quick start.
    pub config: Option<&'a str>,
    /// Extra environment variables.
    pub env: Vec<(String, String)>,
    /// Extra arguments after `serve`.
    pub args: Vec<String>,
    /// Whether to wait for `/readyz` (otherwise only for the listeners).
    pub wait_ready: bool,
}

impl Keygate {
    /// Starts keygate in `dir` (its working directory) and waits until it listens.
    pub fn start(dir: &Path, options: KeygateOptions<'_>) -> Keygate {
        let stdout = dir.join("keygate.stdout");
        let stderr = dir.join("keygate.stderr");
        let mut command = Command::new(keygate_bin());
        command.current_dir(dir).arg("serve");
        if let Some(config) = options.config {
            let path = dir.join("keygate.yaml");
            std::fs::write(&path, config).expect("write keygate.yaml");
            command.arg("--config").arg(&path);
        }
        command.args(&options.args);
        command
            .env_remove("STRIPE_SECRET_KEY")
            .envs(options.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&stdout).expect("stdout file"))
            .stderr(std::fs::File::create(&stderr).expect("stderr file"));
        let mut child = ChildGuard::spawn("keygate", &mut command);
        let (proxy, admin) = wait_for_listening(&mut child, &stderr);
        let keygate = Keygate { child, proxy, admin, stdout, stderr };
        if options.wait_ready {
            keygate.wait_ready(Duration::from_secs(20));
        }
        keygate
    }

    /// Polls `/readyz` until it answers 200.
    pub fn wait_ready(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = String::new();
        while Instant::now() < deadline {
            if let Ok((status, body)) = crate::http::get(self.admin, "/readyz") {
                if status == 200 {
                    return;
                }
                last = body;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("keygate not ready within {timeout:?}: {last}\nstderr:\n{}", self.stderr_text());
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `kill -9`, then reaps the process. Only then is every thread gone, and with them its file
    /// locks (the WAL folder's): a thread-group leader shows as a zombie while its other threads
    /// may still be exiting, so a zombie is not yet free of its locks (a restart right after
    /// failed once in CI with "WAL folder … is in use by another keygate process").
    pub fn kill_and_reap(&mut self) {
        self.child.kill();
    }

    /// Sends a signal (`TERM`, `INT`, `HUP`, `KILL`) to keygate.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.pid().to_string()).status().expect("kill");
        assert!(status.success(), "kill -{name} failed");
    }

    /// Waits for the process to exit and returns its exit code.
    pub fn wait_exit(self, timeout: Duration) -> Option<i32> {
        let mut child = self.child.into_child();
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = child.try_wait() {
                return status.code();
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!("keygate did not exit within {timeout:?}");
    }

    /// Everything keygate wrote on stdout so far.
    pub fn stdout_text(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Everything keygate wrote on stderr (its logs) so far.
    pub fn stderr_text(&self) -> String {
        read_lossy(&self.stderr)
    }

    /// The `/metrics` text.
    pub fn metrics(&self) -> String {
        crate::http::get(self.admin, "/metrics").expect("GET /metrics").1
    }

    /// The base URL of the proxy listener.
    pub fn url(&self) -> String {
        format!("http://{}", self.proxy)
    }
}

fn read_lossy(path: &Path) -> String {
    let mut bytes = Vec::new();
    if let Ok(mut file) = std::fs::File::open(path) {
        let _ = file.read_to_end(&mut bytes);
    }
    String::from_utf8_lossy(&bytes).into_owned()
}

/// Reads keygate's JSON log until the "keygate listening" line gives both addresses.
fn wait_for_listening(child: &mut ChildGuard, stderr: &Path) -> (SocketAddr, SocketAddr) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while Instant::now() < deadline {
        for line in read_lossy(stderr).lines() {
            let Ok(value) = serde_json::from_str::<serde_json::Value>(line) else { continue };
            if value["message"] == "keygate listening" {
                let proxy = value["proxy"].as_str().and_then(|s| s.parse().ok());
                let admin = value["admin"].as_str().and_then(|s| s.parse().ok());
                if let (Some(proxy), Some(admin)) = (proxy, admin) {
                    return (proxy, admin);
                }
            }
        }
        child.assert_running_with_log(stderr);
        std::thread::sleep(Duration::from_millis(25));
    }
    panic!("keygate did not start listening within 30 s; stderr:\n{}", read_lossy(stderr));
}
