//! moto_server (a local AWS API: Secrets Manager, S3, …) started on a free port, plus helpers
//! that seed it with boto3 from the test venv's Python.
//!
//! Invariants: the server listens on loopback only and is killed when [`Moto`] drops; secret
//! values reach boto3 on stdin, never in arguments; a failing helper panics with boto3's error.
//! Credentials are fixed test keys (moto accepts any); they are given to keygate through a
//! shared-credentials file ([`Moto::credentials_file`]) or a child's environment ([`Moto::env`]),
//! so no test changes its own process environment.
//!
//! moto keeps everything in memory: [`Moto::restart`] brings back an empty server on the same
//! address.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use crate::{ChildGuard, free_port, tool, wait_for_tcp};

/// The region every helper and [`Moto::credentials_file`] use.
pub const REGION: &str = "us-east-1";
const ACCESS_KEY_ID: &str = "AKIAKEYGATETEST00000";
const SECRET_ACCESS_KEY: &str = "keygate-moto-test-secret-access-key";

/// A running `moto_server`.
#[derive(Debug)]
pub struct Moto {
    child: Option<ChildGuard>,
    /// Where it listens (127.0.0.1).
    pub addr: SocketAddr,
    dir: tempfile::TempDir,
}

/// Runs boto3 against the endpoint given on stdin; prints one JSON document.
const BOTO_RUNNER: &str = r#"
import base64, json, sys
import boto3
request = json.load(sys.stdin)
session = boto3.session.Session(
    aws_access_key_id=request["key_id"], aws_secret_access_key=request["secret"], region_name=request["region"])
client = session.client(request["service"], endpoint_url=request["endpoint"])
args = request["args"]
if "SecretBinaryBase64" in args:
    args["SecretBinary"] = base64.b64decode(args.pop("SecretBinaryBase64"))
result = getattr(client, request["operation"])(**args)
result.pop("ResponseMetadata", None)
print(json.dumps(result, default=str))
"#;

impl Moto {
    /// Starts moto_server and waits until it accepts connections.
    pub fn start() -> Moto {
        let dir = tempfile::tempdir().expect("temp dir for moto");
        let credentials =
            format!("[default]\naws_access_key_id = {ACCESS_KEY_ID}\naws_secret_access_key = {SECRET_ACCESS_KEY}\n");
        std::fs::write(dir.path().join("credentials"), credentials).expect("write the test credentials file");
        let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
        let mut moto = Moto { child: None, addr, dir };
        moto.spawn();
        moto
    }

    fn spawn(&mut self) {
        let log_path = self.log_path();
        let log = std::fs::File::create(&log_path).expect("create moto log file");
        let log_err = log.try_clone().expect("clone log handle");
        let mut command = Command::new(tool("moto_server"));
        command
            .arg("-H")
            .arg("127.0.0.1")
            .arg("-p")
            .arg(self.addr.port().to_string())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err);
        let mut child = ChildGuard::spawn("moto_server", &mut command);
        wait_for_tcp(self.addr, Duration::from_secs(60), "moto_server");
        child.assert_running_with_log(&log_path);
        self.child = Some(child);
    }

    fn log_path(&self) -> PathBuf {
        self.dir.path().join("moto.log")
    }

    /// What the server wrote so far (for leak scans and failure messages).
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// The endpoint URL, for keygate's `secrets.aws.endpoint_url` (and S3 clients).
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// A shared-credentials file with a `[default]` profile moto accepts, for keygate's
    /// `secrets.aws.credentials_file`.
    pub fn credentials_file(&self) -> PathBuf {
        self.dir.path().join("credentials")
    }

    /// Environment for a child process (the keygate binary) that talks to this moto with the
    /// default credential chain.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ACCESS_KEY_ID", ACCESS_KEY_ID.to_owned()),
            ("AWS_SECRET_ACCESS_KEY", SECRET_ACCESS_KEY.to_owned()),
            ("AWS_REGION", REGION.to_owned()),
            ("AWS_ENDPOINT_URL", self.url()),
            ("AWS_EC2_METADATA_DISABLED", "true".to_owned()),
        ]
    }

    /// The audit lake's S3 settings for this server (path-style, plain HTTP, the test
    /// credentials).
    pub fn s3_config(&self) -> keygate_auditlog::S3Config {
        keygate_auditlog::S3Config {
            endpoint: Some(self.url()),
            region: Some(REGION.into()),
            allow_http: true,
            virtual_hosted_style: false,
            access_key_id: Some(ACCESS_KEY_ID.into()),
            secret_access_key: Some(SECRET_ACCESS_KEY.into()),
        }
    }

    /// Sends a signal to the server: `STOP` freezes it (connections hang, as a store that stops
    /// answering), `CONT` thaws it.
    pub fn signal(&self, name: &str) {
        let pid = self.child.as_ref().map(ChildGuard::id).expect("moto is running");
        let status = std::process::Command::new("kill").arg(format!("-{name}")).arg(pid.to_string()).status();
        assert!(status.is_ok_and(|s| s.success()), "kill -{name} moto");
    }

    /// Kills the server (an outage: connections are refused until [`Moto::restart`]).
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }

    /// Starts a fresh, empty moto_server on the same address.
    pub fn restart(&mut self) {
        self.stop();
        self.spawn();
    }

    /// Calls `operation` (boto3's snake_case name) of `service` with `args`; returns the
    /// response as JSON. Panics with boto3's error when the call fails.
    pub fn call(&self, service: &str, operation: &str, args: serde_json::Value) -> serde_json::Value {
        let request = serde_json::json!({
            "key_id": ACCESS_KEY_ID,
            "secret": SECRET_ACCESS_KEY,
            "region": REGION,
            "endpoint": self.url(),
            "service": service,
            "operation": operation,
            "args": args,
        });
        let mut child = Command::new(tool("python"))
            .arg("-c")
            .arg(BOTO_RUNNER)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("run the venv's python with boto3");
        child.stdin.take().expect("stdin").write_all(request.to_string().as_bytes()).expect("write to python's stdin");
        let output = child.wait_with_output().expect("wait for python");
        assert!(
            output.status.success(),
            "boto3 {service}.{operation} failed: {}",
            String::from_utf8_lossy(&output.stderr).lines().last().unwrap_or_default()
        );
        serde_json::from_slice(&output.stdout).expect("the boto3 runner prints JSON")
    }

    /// Creates a Secrets Manager secret holding `value` as its string; returns its version id.
    pub fn create_secret(&self, name: &str, value: &str) -> String {
        let out =
            self.call("secretsmanager", "create_secret", serde_json::json!({"Name": name, "SecretString": value}));
        version_id(&out)
    }

    /// Creates a secret holding raw bytes (`SecretBinary`); returns its version id.
    pub fn create_secret_binary(&self, name: &str, value: &[u8]) -> String {
        use base64::Engine as _;
        let encoded = base64::engine::general_purpose::STANDARD.encode(value);
        let out = self.call(
            "secretsmanager",
            "create_secret",
            serde_json::json!({"Name": name, "SecretBinaryBase64": encoded}),
        );
        version_id(&out)
    }

    /// Writes a new version of `name`; it becomes `AWSCURRENT` and the old one `AWSPREVIOUS`.
    /// Returns the new version id.
    pub fn put_secret_value(&self, name: &str, value: &str) -> String {
        let out = self.call(
            "secretsmanager",
            "put_secret_value",
            serde_json::json!({"SecretId": name, "SecretString": value}),
        );
        version_id(&out)
    }

    /// The ARN of secret `name`.
    pub fn secret_arn(&self, name: &str) -> String {
        let out = self.call("secretsmanager", "describe_secret", serde_json::json!({"SecretId": name}));
        out["ARN"].as_str().expect("describe_secret returns an ARN").to_owned()
    }

    /// Creates an S3 bucket.
    pub fn create_bucket(&self, name: &str) {
        self.call("s3", "create_bucket", serde_json::json!({"Bucket": name}));
    }
}

fn version_id(response: &serde_json::Value) -> String {
    response["VersionId"].as_str().expect("the response has a VersionId").to_owned()
}
