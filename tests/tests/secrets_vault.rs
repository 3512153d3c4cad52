//! keygate-secrets against a real OpenBao: KV v2 reads with token, AppRole and TLS, token
//! renewal and re-login, rotation, outage and recovery, Transit, and errors for bad input.
//! Every test stores canary values and checks they never reach logs, metrics or errors.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod secrets_common;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use keygate_secrets::{SecretRef, SecretStore, SecretsConfig, VaultAuth, VaultConfig};
use keygate_tests::openbao::OpenBao;
use secrets_common::*;

/// The Vault policy from docs/secrets.md, verbatim (the tests use exactly what users copy).
fn documented_policy() -> String {
    let docs = std::fs::read_to_string(PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../docs/secrets.md")).unwrap();
    let start = docs.find("```hcl\n").expect("docs/secrets.md has an ```hcl block") + "```hcl\n".len();
    let end = start + docs[start..].find("```").unwrap();
    docs[start..end].to_owned()
}

fn vault_config(bao: &OpenBao, auth: VaultAuth) -> SecretsConfig {
    SecretsConfig {
        vault: Some(VaultConfig {
            address: bao.url(),
            namespace: None,
            ca_cert: None,
            auth,
            request_timeout: Duration::from_secs(5),
        }),
        ..SecretsConfig::default()
    }
}

fn token_auth(dir: &std::path::Path, token: &str) -> VaultAuth {
    VaultAuth::Token { token: file_ref(dir, "vault-token", token) }
}

#[tokio::test]
async fn token_auth_with_the_documented_policy_reads_a_field_and_its_version() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryVaultToken0001";
    let bao = OpenBao::start();
    bao.write_policy("keygate", &documented_policy());
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", canary), ("note", "not a key")]);
    let token = bao.create_token(&["keygate"], "1h", true);
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_config(&bao, token_auth(dir.path(), &token))).await.unwrap();

    let r = reference("vault://secret/keygate/payments#api_key");
    let secret = store.get(&r).await.unwrap();
    assert_eq!(secret.value.expose(), canary);
    assert_eq!(secret.version.as_deref(), Some("1"));
    assert!(store.is_loaded(&r));

    let rotated = "sk_live_canaryVaultToken0002";
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", rotated)]);
    let refreshed = store.refresh(&r).await.unwrap();
    assert_eq!(refreshed.value.expose(), rotated);
    assert_eq!(refreshed.version.as_deref(), Some("2"));

    // The policy grants nothing outside secret/data/keygate/.
    bao.kv_put_fields("secret", "other/team", &[("api_key", "sk_test_other")]);
    let denied = store.get(&reference("vault://secret/other/team#api_key")).await.unwrap_err();
    assert_eq!(denied.kind(), "permission_denied", "{denied}");
    assert!(denied.to_string().contains("vault://secret/other/team#api_key"), "{denied}");
    assert!(denied.to_string().contains("secret/data/other/team"), "{denied}");
    assert!(!denied.is_unavailable());

    let metrics = metrics_text(&store);
    assert!(
        metrics.contains(r#"keygate_secret_age_seconds{reference="vault://secret/keygate/payments#api_key"}"#),
        "{metrics}"
    );
    assert!(metrics.contains(r#"keygate_secret_refreshes_total{source="vault",result="success"} 2"#), "{metrics}");
    assert_no_canary(
        &[canary, rotated, &token],
        &[
            ("logs", &logs.text()),
            ("metrics", &metrics),
            ("error", &error_texts(&denied)),
            ("debug", &format!("{secret:?} {store:?}")),
        ],
    );
}

#[tokio::test]
async fn approle_logs_in_and_logs_in_again_when_the_token_reaches_its_max_ttl() {
    let logs = LogCapture::start();
    let canary = "rk_live_canaryAppRole0001";
    let bao = OpenBao::start();
    bao.write_policy("keygate", &documented_policy());
    bao.kv_put_fields("secret", "keygate/restricted", &[("key", canary)]);
    let (role_id, secret_id) = bao.approle("approle", "keygate", &["keygate"], "3s");
    bao.bao(&["write", "auth/approle/role/keygate", "token_max_ttl=5s"]);
    let dir = tempfile::tempdir().unwrap();
    let auth = VaultAuth::Approle {
        mount: "approle".into(),
        role_id,
        secret_id: file_ref(dir.path(), "secret-id", &secret_id),
    };
    let store = SecretStore::new(&vault_config(&bao, auth)).await.unwrap();
    let r = reference("vault://secret/keygate/restricted#key");
    assert_eq!(store.get(&r).await.unwrap().value.expose(), canary);

    // Tokens live at most 5 s; for 12 s every forced read must still succeed, which needs the
    // keeper to renew and then log in again.
    let until = Instant::now() + Duration::from_secs(12);
    while Instant::now() < until {
        let outcome = store.refresh(&r).await;
        assert_eq!(value_of(&outcome).as_deref(), Some(canary), "{outcome:?}");
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let text = logs.text();
    let logins = text.matches("logged in to Vault").count();
    assert!(logins >= 2, "expected a fresh AppRole login after the max TTL, saw {logins}");
    assert!(text.contains("method=\"approle\"") || text.contains("method=approle"), "login logs name the method");
    assert_no_canary(&[canary, &secret_id], &[("logs", &text), ("metrics", &metrics_text(&store))]);
}

#[tokio::test]
async fn a_short_renewable_token_is_renewed_before_it_expires() {
    let _logs = LogCapture::start();
    let bao = OpenBao::start();
    bao.write_policy("keygate", &documented_policy());
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_test_renewal")]);
    let token = bao.create_token(&["keygate"], "4s", true);
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_config(&bao, token_auth(dir.path(), &token))).await.unwrap();
    let r = reference("vault://secret/keygate/payments#api_key");
    store.get(&r).await.unwrap();

    // Three lifetimes of the original lease later the token is still alive, and still works.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let ttl = bao.token_ttl(&token);
    assert!(ttl > 0, "the token should have been renewed, ttl {ttl}");
    assert_eq!(store.refresh(&r).await.unwrap().value.expose(), "sk_test_renewal");
}

#[tokio::test]
async fn a_new_version_is_picked_up_within_the_ttl_without_a_forced_refresh() {
    let logs = LogCapture::start();
    let bao = OpenBao::start();
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_test_rotation_1")]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = vault_config(&bao, token_auth(dir.path(), &bao.root_token));
    cache_config(&mut config, 1_000, 60_000);
    let store = SecretStore::new(&config).await.unwrap();
    let r = reference("vault://secret/keygate/payments#api_key");
    assert_eq!(store.get(&r).await.unwrap().value.expose(), "sk_test_rotation_1");

    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_test_rotation_2")]);
    let written = Instant::now();
    let rotated =
        eventually(&store, &r, "rotation", |o| value_of(o).as_deref() == Some("sk_test_rotation_2")).await.unwrap();
    assert_eq!(rotated.version.as_deref(), Some("2"));
    // Picked up by the background refresher: at most one TTL after the write (plus one fetch).
    assert!(written.elapsed() < Duration::from_millis(1_000) + config.cache.fetch_timeout);
    assert!(logs.text().contains("secret rotated"));
}

#[tokio::test]
async fn an_outage_serves_from_cache_until_max_stale_then_fails_closed_and_recovers_by_itself() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryOutage0001";
    let mut bao = OpenBao::start();
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", canary)]);
    let dir = tempfile::tempdir().unwrap();
    let mut config = vault_config(&bao, token_auth(dir.path(), &bao.root_token));
    cache_config(&mut config, 500, 4_000);
    let store = SecretStore::new(&config).await.unwrap();
    let r = reference("vault://secret/keygate/payments#api_key");
    store.preload(std::slice::from_ref(&r)).await.unwrap();

    bao.stop();
    let stopped = Instant::now();
    // Past the TTL, the cached key is still served while Vault is down.
    tokio::time::sleep(Duration::from_millis(700)).await;
    let stale = store.get(&r).await;
    assert_eq!(value_of(&stale).as_deref(), Some(canary), "{stale:?}");
    let metrics = metrics_text(&store);
    assert!(
        metrics.contains(r#"keygate_secret_stale{reference="vault://secret/keygate/payments#api_key"} 1"#),
        "{metrics}"
    );
    let error = eventually(&store, &r, "fail closed", Result::is_err).await.unwrap_err();
    assert!(stopped.elapsed() >= Duration::from_secs(4), "failed closed before max_stale had passed");
    assert!(error.is_unavailable(), "{error}");
    let message = error.to_string();
    eprintln!("fail-closed error: {message}");
    assert!(message.contains("vault://secret/keygate/payments#api_key"), "{message}");
    assert!(message.contains("past ttl + max_stale"), "{message}");
    assert!(message.contains("Vault is unavailable"), "{message}");
    assert!(!store.is_loaded(&r));

    bao.restart();
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_live_canaryOutage0002")]);
    let back = eventually(&store, &r, "recovery", Result::is_ok).await.unwrap();
    assert_eq!(back.value.expose(), "sk_live_canaryOutage0002");
    assert!(store.is_loaded(&r));
    let metrics = metrics_text(&store);
    assert!(metrics.contains(r#"keygate_secret_refreshes_total{source="vault",result="failure"}"#), "{metrics}");
    assert_no_canary(
        &[canary, "sk_live_canaryOutage0002"],
        &[("logs", &logs.text()), ("metrics", &metrics), ("error", &error_texts(&error))],
    );
}

#[tokio::test]
async fn bad_input_fails_with_an_error_naming_what_is_wrong() {
    let logs = LogCapture::start();
    let canary = "sk_live_canaryBadInput0001";
    let bao = OpenBao::start();
    bao.kv_put("secret", "keygate/shapes", &serde_json::json!({"api_key": canary, "number": 42, "blank": "  "}));
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_config(&bao, token_auth(dir.path(), &bao.root_token))).await.unwrap();
    let mut errors = Vec::new();
    let mut expect = |text: &str, kind: &str, says: &[&str], error: keygate_secrets::SecretError| {
        assert_eq!(error.kind(), kind, "{text}: {error}");
        let message = error.to_string();
        eprintln!("{text}: {message}");
        for part in says {
            assert!(message.contains(part), "{text}: `{message}` should say {part:?}");
        }
        assert!(!error.is_unavailable(), "{text}: misconfiguration is not an outage");
        errors.push(error_texts(&error));
    };

    let missing_field = store.get(&reference("vault://secret/keygate/shapes#apikey")).await.unwrap_err();
    expect(
        "missing field",
        "missing_field",
        &["vault://secret/keygate/shapes#apikey", "no field `apikey`", "api_key, blank, number"],
        missing_field,
    );
    let not_string = store.get(&reference("vault://secret/keygate/shapes#number")).await.unwrap_err();
    expect("number field", "bad_value", &["field `number` holds a JSON number"], not_string);
    let blank = store.get(&reference("vault://secret/keygate/shapes#blank")).await.unwrap_err();
    expect("blank field", "empty", &["vault://secret/keygate/shapes#blank", "is empty"], blank);
    let no_path = store.get(&reference("vault://secret/keygate/absent#api_key")).await.unwrap_err();
    expect(
        "missing path",
        "not_found",
        &["vault://secret/keygate/absent#api_key", "no KV v2 secret at secret/keygate/absent"],
        no_path,
    );
    let no_mount = store.get(&reference("vault://kv/keygate/shapes#api_key")).await.unwrap_err();
    assert!(matches!(no_mount.kind(), "not_found" | "permission_denied"), "{no_mount}");
    let no_mount_text = error_texts(&no_mount);

    let wrong_token =
        SecretStore::new(&vault_config(&bao, token_auth(dir.path(), "s.not-a-real-token"))).await.unwrap();
    let refused = wrong_token.get(&reference("vault://secret/keygate/shapes#api_key")).await.unwrap_err();
    expect("wrong token", "auth", &["Vault login failed", "token was refused"], refused);

    let (role_id, _) = bao.approle("approle", "keygate", &["default"], "1m");
    let wrong_secret_id = VaultAuth::Approle {
        mount: "approle".into(),
        role_id,
        secret_id: file_ref(dir.path(), "wrong-secret-id", "00000000-0000-0000-0000-000000000000"),
    };
    let approle_store = SecretStore::new(&vault_config(&bao, wrong_secret_id)).await.unwrap();
    let refused = approle_store.get(&reference("vault://secret/keygate/shapes#api_key")).await.unwrap_err();
    expect("wrong secret id", "auth", &["AppRole login at auth/approle was refused"], refused);

    let unset = VaultAuth::Token { token: reference("env://KEYGATE_TEST_SURELY_UNSET_VAULT_TOKEN") };
    let unset_store = SecretStore::new(&vault_config(&bao, unset)).await.unwrap();
    let unset_error = unset_store.get(&reference("vault://secret/keygate/shapes#api_key")).await.unwrap_err();
    expect("unset token variable", "auth", &["KEYGATE_TEST_SURELY_UNSET_VAULT_TOKEN", "is not set"], unset_error);

    let unfetchable = store.get(&reference("vault-transit://transit/keys/audit")).await.unwrap_err();
    expect("transit as value", "not_fetchable", &["Vault Transit key"], unfetchable);

    let mut texts: Vec<(&str, &str)> = errors.iter().map(|e| ("error", e.as_str())).collect();
    texts.push(("error", &no_mount_text));
    let log_text = logs.text();
    texts.push(("logs", &log_text));
    assert_no_canary(&[canary], &texts);
}

#[tokio::test]
async fn transit_wraps_and_unwraps_a_data_key_across_key_rotation() {
    let logs = LogCapture::start();
    let bao = OpenBao::start();
    bao.transit_key("transit", "keygate-audit");
    bao.write_policy("keygate", &documented_policy());
    let token = bao.create_token(&["keygate"], "1h", true);
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_config(&bao, token_auth(dir.path(), &token))).await.unwrap();
    let key = reference("vault-transit://transit/keys/keygate-audit");
    let data_key: Vec<u8> = (0u8..32).map(|i| i.wrapping_mul(37).wrapping_add(11)).collect();

    let wrapped = store.transit_encrypt(&key, &data_key).await.unwrap();
    assert!(wrapped.starts_with("vault:v1:"), "{wrapped}");
    bao.transit_rotate("transit", "keygate-audit");
    let wrapped_v2 = store.transit_encrypt(&key, &data_key).await.unwrap();
    assert!(wrapped_v2.starts_with("vault:v2:"), "{wrapped_v2}");
    assert_eq!(store.transit_decrypt(&key, &wrapped).await.unwrap().as_slice(), data_key.as_slice());
    assert_eq!(store.transit_decrypt(&key, &wrapped_v2).await.unwrap().as_slice(), data_key.as_slice());

    let tampered = format!("{}A", &wrapped[..wrapped.len() - 1]);
    let error = store.transit_decrypt(&key, &tampered).await.unwrap_err();
    assert!(error.to_string().contains("vault-transit://transit/keys/keygate-audit"), "{error}");
    assert!(!error.is_unavailable());
    bao.transit_key("transit", "other-key");
    let denied =
        store.transit_encrypt(&reference("vault-transit://transit/keys/other-key"), &data_key).await.unwrap_err();
    assert!(denied.to_string().contains("refused to encrypt"), "{denied}");
    let hex_key: String = data_key.iter().map(|b| format!("{b:02x}")).collect();
    use base64::Engine as _;
    let b64_key = base64::engine::general_purpose::STANDARD.encode(&data_key);
    assert_no_canary(&[&hex_key, &b64_key, &token], &[("logs", &logs.text()), ("error", &error_texts(&error))]);
}

#[tokio::test]
async fn tls_with_a_custom_ca_and_a_namespace() {
    let bao = OpenBao::start_tls();
    bao.bao(&["namespace", "create", "payments"]);
    let in_namespace = |args: &[&str]| {
        let mut full = vec![args[0], args[1], "-namespace=payments"];
        full.extend_from_slice(&args[2..]);
        bao.bao(&full);
    };
    in_namespace(&["secrets", "enable", "-path=kv", "kv-v2"]);
    bao.bao_with_stdin(
        &["kv", "put", "-namespace=payments", "-mount=kv", "stripe", "-"],
        r#"{"api_key":"sk_test_namespaced"}"#,
    );
    let dir = tempfile::tempdir().unwrap();
    let make = |ca: Option<PathBuf>, namespace: Option<&str>| SecretsConfig {
        vault: Some(VaultConfig {
            address: bao.url(),
            namespace: namespace.map(str::to_owned),
            ca_cert: ca,
            auth: token_auth(dir.path(), &bao.root_token),
            request_timeout: Duration::from_secs(5),
        }),
        ..SecretsConfig::default()
    };
    let r = reference("vault://kv/stripe#api_key");
    let store = SecretStore::new(&make(Some(bao.ca_cert()), Some("payments"))).await.unwrap();
    assert_eq!(store.get(&r).await.unwrap().value.expose(), "sk_test_namespaced");

    // Without the namespace the path does not exist at the root.
    let root = SecretStore::new(&make(Some(bao.ca_cert()), None)).await.unwrap();
    assert!(root.get(&r).await.is_err());
    // Without the CA, the dev certificate is not trusted: the TLS failure is reported.
    let untrusted = SecretStore::new(&make(None, Some("payments"))).await.unwrap();
    let error = untrusted.get(&r).await.unwrap_err();
    assert!(error.to_string().to_lowercase().contains("certificate"), "{error}");
    // A CA path that does not exist is a configuration error at start.
    let missing = SecretStore::new(&make(Some(dir.path().join("missing.pem")), None)).await.unwrap_err();
    assert!(missing.to_string().contains("missing.pem"), "{missing}");
}

#[tokio::test]
async fn concurrent_requests_for_a_cold_key_make_one_fetch() {
    let bao = OpenBao::start();
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_test_single_flight")]);
    let dir = tempfile::tempdir().unwrap();
    let store = SecretStore::new(&vault_config(&bao, token_auth(dir.path(), &bao.root_token))).await.unwrap();
    let r: SecretRef = reference("vault://secret/keygate/payments#api_key");
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..100 {
        let (store, r) = (store.clone(), r.clone());
        tasks.spawn(async move { store.get(&r).await.map(|s| s.value.expose().to_owned()) });
    }
    while let Some(joined) = tasks.join_next().await {
        assert_eq!(joined.unwrap().unwrap(), "sk_test_single_flight");
    }
    let metrics = metrics_text(&store);
    assert!(metrics.contains(r#"keygate_secret_refreshes_total{source="vault",result="success"} 1"#), "{metrics}");
}

/// Makes an RSA key pair, a service-account JWT signed with it, and a CA certificate (OpenBao
/// insists on one), with the venv's `cryptography`; writes them to `dir`.
fn service_account_jwt(dir: &std::path::Path) {
    const SCRIPT: &str = r#"
import base64, datetime, json, sys
from cryptography import x509
from cryptography.x509.oid import NameOID
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
out = sys.argv[1]
key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
open(out + "/sa.pub", "wb").write(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
b64 = lambda b: base64.urlsafe_b64encode(b).rstrip(b"=").decode()
claims = {"iss": "kubernetes/serviceaccount", "sub": "system:serviceaccount:keygate:keygate",
          "kubernetes.io/serviceaccount/namespace": "keygate",
          "kubernetes.io/serviceaccount/service-account.name": "keygate",
          "kubernetes.io/serviceaccount/service-account.uid": "0b7c3b4e-1111-2222-3333-444455556666"}
signing = b64(json.dumps({"alg": "RS256", "typ": "JWT"}).encode()) + "." + b64(json.dumps(claims).encode())
signature = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
open(out + "/sa.jwt", "w").write(signing + "." + b64(signature) + "\n")
name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test-cluster-ca")])
now = datetime.datetime.now(datetime.timezone.utc)
cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
        .serial_number(1).not_valid_before(now).not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True).sign(key, hashes.SHA256()))
open(out + "/ca.pem", "wb").write(cert.public_bytes(serialization.Encoding.PEM))
"#;
    let status =
        std::process::Command::new(keygate_tests::tool("python")).arg("-c").arg(SCRIPT).arg(dir).status().unwrap();
    assert!(status.success(), "could not make the test service-account token");
}

/// The one Kubernetes API call OpenBao's Kubernetes auth makes: TokenReview, answering
/// "authenticated" only for the token in `expected_file`.
fn token_review_endpoint(expected_file: &std::path::Path) -> (keygate_tests::ChildGuard, u16) {
    const SCRIPT: &str = r#"
import http.server, json, sys
expected = open(sys.argv[2]).read().strip()
class TokenReview(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        review = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ok = review["spec"]["token"] == expected
        body = json.dumps({"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "status": {
            "authenticated": ok, "user": {"username": "system:serviceaccount:keygate:keygate",
            "uid": "0b7c3b4e-1111-2222-3333-444455556666", "groups": ["system:serviceaccounts"]}}}).encode()
        self.send_response(201)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        pass
http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), TokenReview).serve_forever()
"#;
    let port = keygate_tests::free_port();
    let mut command = std::process::Command::new(keygate_tests::tool("python"));
    command.arg("-c").arg(SCRIPT).arg(port.to_string()).arg(expected_file);
    let child = keygate_tests::ChildGuard::spawn("TokenReview endpoint", &mut command);
    keygate_tests::wait_for_tcp(([127, 0, 0, 1], port).into(), Duration::from_secs(30), "TokenReview endpoint");
    (child, port)
}

#[tokio::test]
async fn kubernetes_auth_exchanges_the_service_account_token() {
    let logs = LogCapture::start();
    let bao = OpenBao::start();
    bao.write_policy("keygate", &documented_policy());
    bao.kv_put_fields("secret", "keygate/payments", &[("api_key", "sk_test_kubernetes")]);
    let dir = tempfile::tempdir().unwrap();
    service_account_jwt(dir.path());
    let jwt_file = dir.path().join("sa.jwt");
    let (_review, port) = token_review_endpoint(&jwt_file);
    bao.bao(&["auth", "enable", "kubernetes"]);
    bao.bao(&[
        "write",
        "auth/kubernetes/config",
        &format!("kubernetes_host=http://127.0.0.1:{port}"),
        &format!("kubernetes_ca_cert=@{}", dir.path().join("ca.pem").display()),
        &format!("pem_keys=@{}", dir.path().join("sa.pub").display()),
        "disable_local_ca_jwt=true",
    ]);
    bao.bao(&[
        "write",
        "auth/kubernetes/role/keygate",
        "bound_service_account_names=keygate",
        "bound_service_account_namespaces=keygate",
        "token_policies=keygate",
        "token_ttl=1h",
    ]);
    let auth = VaultAuth::Kubernetes { mount: "kubernetes".into(), role: "keygate".into(), jwt_file: jwt_file.clone() };
    let store = SecretStore::new(&vault_config(&bao, auth)).await.unwrap();
    let r = reference("vault://secret/keygate/payments#api_key");
    assert_eq!(store.get(&r).await.unwrap().value.expose(), "sk_test_kubernetes");

    // A role the service account is not bound to is refused, with the method and mount named.
    bao.bao(&[
        "write",
        "auth/kubernetes/role/other",
        "bound_service_account_names=other",
        "bound_service_account_namespaces=other",
        "token_policies=keygate",
    ]);
    let other = VaultAuth::Kubernetes { mount: "kubernetes".into(), role: "other".into(), jwt_file: jwt_file.clone() };
    let refused = SecretStore::new(&vault_config(&bao, other)).await.unwrap().get(&r).await.unwrap_err();
    assert_eq!(refused.kind(), "auth", "{refused}");
    assert!(refused.to_string().contains("Kubernetes login at auth/kubernetes was refused"), "{refused}");
    let jwt = std::fs::read_to_string(&jwt_file).unwrap();
    assert_no_canary(&[jwt.trim()], &[("logs", &logs.text()), ("error", &error_texts(&refused))]);
}
