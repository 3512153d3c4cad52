//! The brokers of the webhook destination tests: the `tansu` Kafka-protocol broker started on a
//! free port (installed by scripts/install-tansu.sh, found through `$KEYGATE_TANSU`), and readers
//! of what keygate wrote, through the clients a consumer uses: confluent-kafka for Kafka, boto3
//! for SQS (tests/python/broker_read.py, run by the test venv's Python).
//!
//! Invariants: tansu listens on loopback only, keeps everything in memory, and is killed when
//! [`Tansu`] drops; a missing tansu fails the test with the setup command to run.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use serde_json::Value;

use crate::moto::Moto;
use crate::{ChildGuard, free_port, tool, wait_for_tcp};

/// The tansu binary: `$KEYGATE_TANSU` (printed by scripts/setup-test-env.sh).
pub fn tansu_bin() -> PathBuf {
    let path = std::env::var_os("KEYGATE_TANSU").map(PathBuf::from).unwrap_or_default();
    assert!(
        path.is_file(),
        "the tansu broker was not found at $KEYGATE_TANSU ({}). Run scripts/test.sh, or \
         `scripts/setup-test-env.sh > env && source env` (it runs scripts/install-tansu.sh) before `cargo test`.",
        path.display()
    );
    path
}

/// A running tansu broker (one node, memory storage).
#[derive(Debug)]
pub struct Tansu {
    child: ChildGuard,
    /// Where it listens and what it advertises (127.0.0.1).
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

impl Tansu {
    /// Starts tansu and waits until it accepts connections.
    pub fn start() -> Tansu {
        let dir = tempfile::tempdir().expect("temp dir for tansu");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log_path = dir.path().join("tansu.log");
        let log = std::fs::File::create(&log_path).expect("create the tansu log");
        let log_err = log.try_clone().expect("clone the log handle");
        let url = format!("tcp://{addr}");
        let mut command = Command::new(tansu_bin());
        command
            .args(["broker", "--listener-url", &url, "--advertised-listener-url", &url])
            .args(["--storage-engine", "memory://tansu/"])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = ChildGuard::spawn("tansu", &mut command);
        wait_for_tcp(addr, Duration::from_secs(30), "tansu");
        child.assert_running_with_log(&log_path);
        Tansu { child, addr, dir }
    }

    /// `host:port` for `bootstrap.servers`.
    pub fn bootstrap(&self) -> String {
        self.addr.to_string()
    }

    /// What the broker logged.
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("tansu.log")).unwrap_or_default()
    }

    /// `STOP` pauses the broker (connections hang, acknowledgements stop), `CONT` resumes it. The
    /// broker keeps its (in-memory) topics, so a pause is the outage the tests use.
    pub fn signal(&self, name: &str) {
        let status = Command::new("kill").arg(format!("-{name}")).arg(self.child.id().to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} tansu");
    }

    /// Creates `topic` with `partitions` partitions (confluent-kafka's AdminClient).
    pub fn create_topic(&self, topic: &str, partitions: u32) {
        reader(&["kafka-create", &self.bootstrap(), topic, &partitions.to_string()], &[]);
    }

    /// Every message of `topic` from the beginning (confluent-kafka's Consumer): a list of
    /// `{partition, offset, key, value, headers}` in partition, then offset order.
    pub fn read(&self, topic: &str) -> Vec<Value> {
        reader(&["kafka-read", &self.bootstrap(), topic], &[]).as_array().cloned().unwrap_or_default()
    }
}

/// Receives and deletes what an SQS queue on `moto` holds until it has been empty for
/// `quiet` (boto3): a list of `{body, attributes, group_id, dedup_id}`.
pub fn sqs_read(moto: &Moto, queue_url: &str, quiet: Duration) -> Vec<Value> {
    let wait = format!("{:.1}", quiet.as_secs_f64());
    let env = moto.env();
    reader(&["sqs-read", &moto.url(), queue_url, &wait], &env).as_array().cloned().unwrap_or_default()
}

/// Creates an SQS queue on `moto` (FIFO when `name` ends in `.fifo`); returns its URL.
pub fn sqs_create_queue(moto: &Moto, name: &str) -> String {
    let mut args = serde_json::json!({"QueueName": name});
    if name.ends_with(".fifo") {
        args["Attributes"] = serde_json::json!({"FifoQueue": "true"});
    }
    let out = moto.call("sqs", "create_queue", args);
    out["QueueUrl"].as_str().expect("create_queue returns a QueueUrl").to_owned()
}

fn reader(args: &[&str], env: &[(&'static str, String)]) -> Value {
    let script = format!("{}/python/broker_read.py", env!("CARGO_MANIFEST_DIR"));
    let output = Command::new(tool("python"))
        .arg(script)
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .stdin(Stdio::null())
        .output()
        .expect("run tests/python/broker_read.py");
    assert!(
        output.status.success(),
        "broker_read.py {}: {}",
        args.first().copied().unwrap_or_default(),
        String::from_utf8_lossy(&output.stderr)
    );
    serde_json::from_slice(&output.stdout).unwrap_or_else(|e| panic!("broker_read.py printed no JSON: {e}"))
}
