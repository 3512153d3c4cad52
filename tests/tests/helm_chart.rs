//! The Helm chart (`helm/keygate`) checked with the real tools an installer and a reviewer use: the
//! Helm v4 SDK (lint in strict mode, render, values.schema.json), the Kubernetes schemas shipped by
//! kubernetes-validate, checkov's Kubernetes checks, and the real `keygate` binary, which must
//! accept the configuration the chart renders (so the chart and the binary cannot drift apart).
//!
//! Every value set is checked: the chart's defaults and every file in `helm/keygate/ci/`. The
//! Python side (`tests/python/helm_chart.py`) only drives the tools and prints JSON; the
//! assertions are here. A missing tool fails the test, it never skips.
#![allow(clippy::expect_used, clippy::unwrap_used, clippy::print_stdout)]

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use serde_json::{Value, json};

const NAMESPACE: &str = "payments";
const RELEASE: &str = "keygate";

/// The value sets the issue asks for, besides the defaults; each is a file in `ci/`.
const REQUIRED_SETS: [&str; 4] =
    ["vault-deployment-values.yaml", "aws-statefulset-values.yaml", "mtls-values.yaml", "monitoring-hpa-values.yaml"];

fn chart_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../helm/keygate").canonicalize().expect("helm/keygate exists")
}

/// A set of values: the chart's defaults (`file: None`) or a file of `ci/`.
#[derive(Debug, Clone)]
struct ValueSet {
    name: String,
    file: Option<PathBuf>,
}

fn value_sets() -> Vec<ValueSet> {
    let ci = chart_dir().join("ci");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&ci)
        .expect("helm/keygate/ci")
        .map(|entry| entry.expect("ci entry").path())
        .filter(|path| path.extension().is_some_and(|ext| ext == "yaml"))
        .collect();
    files.sort();
    for required in REQUIRED_SETS {
        assert!(files.iter().any(|f| f.ends_with(required)), "helm/keygate/ci/{required} is missing");
    }
    let mut sets = vec![ValueSet { name: "defaults".into(), file: None }];
    sets.extend(
        files
            .into_iter()
            .map(|file| ValueSet { name: file.file_name().unwrap().to_string_lossy().into_owned(), file: Some(file) }),
    );
    sets
}

fn value_set(name: &str) -> ValueSet {
    value_sets().into_iter().find(|set| set.name == name).unwrap_or_else(|| panic!("no value set {name}"))
}

/// Runs `helm_chart.py COMMAND --chart … ARGS` with the test environment's Python and returns its
/// JSON. Panics with the tool's stderr when it fails.
fn helper(command: &str, args: &[String], stdin: Option<&str>) -> Value {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("python/helm_chart.py");
    let mut cmd = Command::new(keygate_tests::tool("python"));
    cmd.arg(&script).arg(command);
    if command != "versions" {
        cmd.arg("--chart").arg(chart_dir()).arg("--namespace").arg(NAMESPACE);
    }
    cmd.args(args).stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() });
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap_or_else(|e| panic!("cannot run {}: {e}", script.display()));
    if let Some(text) = stdin {
        use std::io::Write;
        child.stdin.take().unwrap().write_all(text.as_bytes()).unwrap();
    }
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "helm_chart.py {command} {args:?} failed ({}):\n{stderr}", output.status);
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("helm_chart.py {command} printed no JSON ({e}):\n{stderr}"))
}

fn values_args(set: &ValueSet) -> Vec<String> {
    match &set.file {
        Some(file) => vec!["--values".into(), file.display().to_string()],
        None => vec![],
    }
}

/// The rendered objects of a value set (each with `_template`, ConfigMaps with `_parsed_data`).
fn render(set: &ValueSet) -> Rendered {
    let out = helper("render", &values_args(set), None);
    Rendered {
        objects: out["objects"].as_array().unwrap().clone(),
        notes: out["notes"].as_str().unwrap_or_default().to_owned(),
    }
}

/// Renders with values given inline (a JSON document written to a temporary values file).
fn render_with(values: &Value) -> Rendered {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("values.yaml");
    std::fs::write(&file, values.to_string()).unwrap();
    render(&ValueSet { name: "inline".into(), file: Some(file) })
}

#[derive(Debug)]
struct Rendered {
    objects: Vec<Value>,
    notes: String,
}

impl Rendered {
    fn all(&self, kind: &str) -> Vec<&Value> {
        self.objects.iter().filter(|o| o["kind"] == kind).collect()
    }

    fn one(&self, kind: &str, name: &str) -> &Value {
        self.objects
            .iter()
            .find(|o| o["kind"] == kind && o["metadata"]["name"] == name)
            .unwrap_or_else(|| panic!("no {kind} {name} in the render"))
    }

    fn workload(&self) -> &Value {
        let workloads: Vec<&Value> =
            self.objects.iter().filter(|o| o["kind"] == "Deployment" || o["kind"] == "StatefulSet").collect();
        assert_eq!(workloads.len(), 1, "exactly one Deployment or StatefulSet");
        workloads[0]
    }

    fn pod(&self) -> &Value {
        &self.workload()["spec"]["template"]["spec"]
    }

    fn container(&self) -> &Value {
        self.pod()["containers"].as_array().unwrap().iter().find(|c| c["name"] == "keygate").expect("keygate container")
    }

    /// keygate's configuration, as the chart renders it (parsed).
    fn config(&self) -> &Value {
        &self.one("ConfigMap", &format!("{RELEASE}-config"))["_parsed_data"]["keygate.yaml"]
    }

    fn volume(&self, name: &str) -> &Value {
        self.pod()["volumes"]
            .as_array()
            .unwrap()
            .iter()
            .find(|v| v["name"] == name)
            .unwrap_or_else(|| panic!("no volume {name}"))
    }

    fn mount_path(&self, name: &str) -> String {
        self.container()["volumeMounts"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no volume mount {name}"))["mountPath"]
            .as_str()
            .unwrap()
            .to_owned()
    }
}

/// The Kubernetes versions the checks run against: the oldest the chart claims to support
/// (Chart.yaml `kubeVersion: ">=X"`), and the newest kubernetes-validate ships.
fn kubernetes_versions() -> (String, String) {
    let chart_yaml = std::fs::read_to_string(chart_dir().join("Chart.yaml")).unwrap();
    let constraint = chart_yaml
        .lines()
        .find_map(|line| line.strip_prefix("kubeVersion:"))
        .expect("Chart.yaml declares kubeVersion")
        .trim()
        .trim_matches('"');
    let oldest = constraint
        .strip_prefix(">=")
        .and_then(|v| v.strip_suffix("-0"))
        .unwrap_or_else(|| panic!("kubeVersion `{constraint}` is not of the form \">=X.Y.Z-0\""))
        .to_owned();
    let shipped: Vec<String> = helper("versions", &[], None)["kubernetes_validate"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap().to_owned())
        .collect();
    assert!(
        shipped.contains(&oldest),
        "the chart claims Kubernetes {oldest}, which kubernetes-validate (schemas {shipped:?}) cannot check"
    );
    (oldest, shipped.last().unwrap().clone())
}

fn duration_seconds(text: &str) -> u64 {
    let (number, unit) = text.split_at(text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len()));
    let n: u64 = number.parse().unwrap_or_else(|_| panic!("duration `{text}`"));
    match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        other => panic!("duration unit `{other}` in `{text}`"),
    }
}

fn port_of(address: &str) -> u64 {
    address.rsplit(':').next().unwrap().parse().unwrap()
}

// --- lint, schemas, checkov -------------------------------------------------------------------

#[test]
fn helm_lint_is_clean_in_strict_mode_for_every_value_set() {
    let (oldest, newest) = kubernetes_versions();
    for set in value_sets() {
        let mut args = values_args(&set);
        for version in [&oldest, &newest] {
            args.extend(["--kube-version".into(), format!("v{version}")]);
        }
        let out = helper("lint", &args, None);
        for (version, report) in out["reports"].as_object().unwrap() {
            assert_eq!(report["total_charts_linted"], 1, "{}: nothing linted at {version}", set.name);
            let errors = report["errors"].as_array().unwrap();
            // Strict mode: warnings (severity 2) count as errors; info (1) is advice.
            let serious: Vec<&Value> =
                report["messages"].as_array().unwrap().iter().filter(|m| m["severity"].as_i64() >= Some(2)).collect();
            assert!(
                errors.is_empty() && serious.is_empty(),
                "helm lint --strict of {} at Kubernetes {version}: errors {errors:#?}, messages {serious:#?}",
                set.name
            );
        }
    }
}

#[test]
fn every_rendered_manifest_validates_against_the_oldest_and_newest_supported_kubernetes() {
    let (oldest, newest) = kubernetes_versions();
    let mut failures = Vec::new();
    let mut kinds_seen = std::collections::BTreeSet::new();
    for set in value_sets() {
        let mut args = values_args(&set);
        args.extend(["--kube-version".into(), oldest.clone(), "--kube-version".into(), newest.clone()]);
        let out = helper("validate", &args, None);
        let results = out["results"].as_array().unwrap();
        assert!(!results.is_empty(), "{}: nothing rendered", set.name);
        for result in results {
            kinds_seen.insert(result["kind"].as_str().unwrap().to_owned());
            if result["no_schema"] == true {
                // A custom resource: Kubernetes has no schema for it; it is checked below.
                assert_eq!(result["kind"], "ServiceMonitor", "{}: no Kubernetes schema for {result}", set.name);
                continue;
            }
            if !result["error"].is_null() {
                failures.push(format!(
                    "{} at {}: {} {} ({}): {}",
                    set.name, result["version"], result["kind"], result["name"], result["template"], result["error"]
                ));
            }
        }
    }
    assert!(failures.is_empty(), "manifests that do not validate:\n{}", failures.join("\n"));
    for kind in [
        "Deployment",
        "StatefulSet",
        "Service",
        "ConfigMap",
        "ServiceAccount",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
    ] {
        assert!(kinds_seen.contains(kind), "no value set renders a {kind}, so it was never validated");
    }
}

#[test]
fn service_monitor_scrapes_the_admin_port_of_the_client_facing_service_only() {
    let rendered = render(&value_set("monitoring-hpa-values.yaml"));
    let monitor = rendered.one("ServiceMonitor", RELEASE);
    assert_eq!(monitor["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(monitor["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selected: Vec<&Value> = rendered
        .all("Service")
        .into_iter()
        .filter(|svc| selector.iter().all(|(k, v)| &svc["metadata"]["labels"][k] == v))
        .collect();
    assert_eq!(selected.len(), 1, "the ServiceMonitor must select exactly one Service");
    let endpoint = &monitor["spec"]["endpoints"][0];
    assert_eq!(endpoint["path"], "/metrics");
    let port = selected[0]["spec"]["ports"].as_array().unwrap().iter().find(|p| p["name"] == endpoint["port"]);
    let port = port.unwrap_or_else(|| panic!("the Service has no port named {}", endpoint["port"]));
    let container_port = rendered.container()["ports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["name"] == port["targetPort"])
        .expect("targetPort names a container port")["containerPort"]
        .as_u64()
        .unwrap();
    assert_eq!(container_port, port_of(rendered.config()["admin"]["address"].as_str().unwrap()));
    // The StatefulSet's headless Service has the same pods: it must not be selected as well.
    let both =
        render_with(&json!({"workload": {"kind": "StatefulSet"}, "metrics": {"serviceMonitor": {"enabled": true}}}));
    let monitor = both.one("ServiceMonitor", RELEASE);
    let selector = monitor["spec"]["selector"]["matchLabels"].as_object().unwrap();
    let selected = both
        .all("Service")
        .into_iter()
        .filter(|svc| selector.iter().all(|(k, v)| &svc["metadata"]["labels"][k] == v))
        .count();
    assert_eq!(both.all("Service").len(), 2, "a StatefulSet has its headless Service");
    assert_eq!(selected, 1, "only the client-facing Service is scraped");
}

#[test]
fn checkov_kubernetes_checks_pass_and_every_skip_is_written_in_the_chart_with_its_reason() {
    let mut args = Vec::new();
    for set in value_sets() {
        args.push("--values".to_owned());
        args.push(set.file.as_ref().map(|f| f.display().to_string()).unwrap_or_default());
    }
    let out = helper("checkov", &args, None);
    let failed = out["failed"].as_array().unwrap();
    assert!(failed.is_empty(), "checkov's Kubernetes checks failed:\n{failed:#?}");
    assert!(out["passed"].as_u64().unwrap() > 0, "checkov ran no check: {out}");
    let templates: String = std::fs::read_dir(chart_dir().join("templates"))
        .unwrap()
        .map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap())
        .collect();
    for skip in out["skipped"].as_array().unwrap() {
        let reason = skip["reason"].as_str().unwrap();
        assert!(reason.len() > 20, "checkov skip without a reason: {skip}");
        let id = skip["id"].as_str().unwrap();
        assert!(
            templates.contains(&format!("{id}={reason}")),
            "the skip of {id} is not written in the chart's templates with its reason: {skip}"
        );
    }
}

#[test]
fn an_image_pinned_by_digest_needs_no_checkov_skip() {
    let digest = "sha256:3b5f1c0e9d8a7b6c5d4e3f2a1b0c9d8e7f6a5b4c3d2e1f0a9b8c7d6e5f4a3b2c";
    let pinned = render_with(&json!({"image": {"repository": "registry.example/keygate", "digest": digest}}));
    assert_eq!(pinned.container()["image"], format!("registry.example/keygate@{digest}"));
    let annotations = &pinned.workload()["metadata"]["annotations"];
    assert!(
        annotations.as_object().is_none_or(|a| !a.keys().any(|k| k.starts_with("checkov.io/skip"))),
        "{annotations}"
    );
    let tagged = render(&value_set("defaults"));
    assert_eq!(tagged.container()["image"], "keygate:0.1.0", "the default tag is the chart's appVersion");
}

// --- the chart and the binary agree ----------------------------------------------------------

/// Files standing in for what the installer provides (Secrets, a CA bundle), by key name.
fn write_fixtures(dir: &Path) {
    let ca = keygate_tests::pki::TestCa::new("keygate chart test CA");
    ca.server(dir, "tls");
    std::fs::write(dir.join("ca.crt"), &ca.cert_pem).unwrap();
    std::fs::write(dir.join("kek"), "000102030405060708090a0b0c0d0e0f101112131415161718191a1b1c1d1e1f").unwrap();
    let signing = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(dir.join("signing-key"), signing.serialize_pem()).unwrap();
    std::fs::write(dir.join("secret-id"), "test-approle-secret-id").unwrap();
    std::fs::write(dir.join("auth-token"), "test-redis-auth-token").unwrap();
}

#[test]
fn the_configuration_the_chart_renders_is_accepted_by_keygate_config_check() {
    let keygate = keygate_tests::keygate::keygate_bin();
    let mut failures = Vec::new();
    for set in value_sets() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("pod");
        let fixtures = dir.path().join("fixtures");
        std::fs::create_dir_all(&fixtures).unwrap();
        write_fixtures(&fixtures);
        let mut args = values_args(&set);
        args.extend(["--root".into(), root.display().to_string(), "--fixtures".into(), fixtures.display().to_string()]);
        let pod = helper("materialize", &args, None);

        // The policy files the chart ships are in the folder the configuration names.
        let rendered = render(&set);
        let policies_dir = root.join(rendered.config()["policies"]["dir"].as_str().unwrap().trim_start_matches('/'));
        let policy_files =
            rendered.one("ConfigMap", &format!("{RELEASE}-policies"))["data"].as_object().unwrap().clone();
        assert!(!policy_files.is_empty(), "{}: no policy file shipped", set.name);
        for (name, text) in &policy_files {
            assert_eq!(&std::fs::read_to_string(policies_dir.join(name)).unwrap(), text.as_str().unwrap());
        }

        let mut command = Command::new(&keygate);
        command.arg("config").arg("check").arg(pod["config"].as_str().unwrap());
        // Only the pod's environment: none of this process's KEYGATE_… variables.
        for (name, _) in std::env::vars().filter(|(name, _)| name.starts_with("KEYGATE_")) {
            command.env_remove(name);
        }
        for (name, value) in pod["env"].as_object().unwrap() {
            command.env(name, value.as_str().unwrap());
        }
        let output = command.output().unwrap();
        let stdout = String::from_utf8_lossy(&output.stdout);
        if !output.status.success() || !stdout.contains("configuration OK") {
            failures.push(format!(
                "{}: keygate config check refused the chart's configuration ({}):\n{}\n--- keygate.yaml as rendered:\n{}",
                set.name,
                output.status,
                String::from_utf8_lossy(&output.stderr).trim(),
                pod["rendered_config"].as_str().unwrap()
            ));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

// --- values.schema.json ------------------------------------------------------------------------

fn schema_check(values: &Value) -> (bool, String) {
    let out = helper("schema", &[], Some(&values.to_string()));
    (out["accepted"].as_bool().unwrap(), out["message"].as_str().unwrap().to_owned())
}

#[test]
fn bad_values_are_refused_by_the_schema_with_a_message_that_names_the_value() {
    let cases: Vec<(&str, Value, &[&str])> = vec![
        ("unknown top-level key", json!({"replicaCout": 3}), &["additional properties", "replicaCout"]),
        ("unknown nested key", json!({"config": {"limits": {"max_hedaers": 5}}}), &["/config/limits", "max_hedaers"]),
        (
            "unknown key in a policy",
            json!({"policies": {"files": {"checkout": {"service": "checkout", "stripe_key": "env://K", "rule": []}}}}),
            &["/policies/files/checkout", "rule"],
        ),
        ("negative replica count", json!({"replicaCount": -1}), &["/replicaCount", "minimum"]),
        ("zero autoscaling floor", json!({"autoscaling": {"minReplicas": 0}}), &["/autoscaling/minReplicas"]),
        (
            "Vault reference without a field",
            json!({"policies": {"files": {"checkout": {"service": "checkout", "stripe_key": "vault://secret/stripe/checkout"}}}}),
            &["/policies/files/checkout/stripe_key"],
        ),
        (
            "a key pasted instead of a reference",
            json!({"policies": {"files": {"checkout": {"service": "checkout", "stripe_key": "rk_test_51abc"}}}}),
            &["/policies/files/checkout/stripe_key"],
        ),
        (
            "relative file reference",
            json!({"config": {"audit": {"signing_key": "file://keys/signing"}}}),
            &["/config/audit/signing_key"],
        ),
        (
            "malformed Transit key",
            json!({"config": {"audit": {"kek": "vault-transit://transit/keygate-audit"}}}),
            &["/config/audit/kek"],
        ),
        (
            "Vault token written literally",
            json!({"config": {"secrets": {"vault": {"address": "https://vault:8200", "auth": {"method": "token", "token": "hvs.CAESIJ"}}}}}),
            &["/config/secrets/vault/auth/token"],
        ),
        (
            "AppRole without its secret id",
            json!({"config": {"secrets": {"vault": {"address": "https://vault:8200", "auth": {"method": "approle", "role_id": "r"}}}}}),
            &["/config/secrets/vault/auth", "secret_id"],
        ),
        (
            "a key the chart owns",
            json!({"config": {"limits": {"shutdown_grace": "10s"}}}),
            &["/config/limits", "shutdown_grace"],
        ),
        (
            "one writer id for every replica",
            json!({"config": {"audit": {"writer_id": "keygate"}}}),
            &["/config/audit", "writer_id"],
        ),
        (
            "S3 credentials in the ConfigMap",
            json!({"config": {"audit": {"s3": {"secret_access_key": "x"}}}}),
            &["/config/audit/s3", "secret_access_key"],
        ),
        (
            "audit without its key-encryption key",
            json!({"config": {"audit": {"kek": null}}}),
            &["/config/audit", "kek"],
        ),
        ("unknown workload kind", json!({"workload": {"kind": "DaemonSet"}}), &["/workload/kind"]),
        ("TLS without its Secret", json!({"tls": {"enabled": true}}), &["/tls/secretName"]),
        ("image digest that is a tag", json!({"image": {"digest": "latest"}}), &["/image/digest"]),
        (
            "token hash that is a token",
            json!({"policies": {"files": {"c": {"service": "c", "stripe_key": "env://K", "token_hashes": ["sk_kg_abc"]}}}}),
            &["/policies/files/c/token_hashes/0"],
        ),
        ("duration without a unit", json!({"config": {"upstreams": {"timeout": 80}}}), &["/config/upstreams/timeout"]),
        (
            "upstream with a path",
            json!({"config": {"upstreams": {"api": "https://api.stripe.com/v1"}}}),
            &["/config/upstreams/api"],
        ),
    ];
    let mut problems = Vec::new();
    for (what, values, expected) in &cases {
        let (accepted, message) = schema_check(values);
        if accepted {
            problems.push(format!("{what}: accepted {values}"));
        } else if let Some(missing) = expected.iter().find(|e| !message.contains(*e)) {
            problems.push(format!("{what}: the message does not name `{missing}`:\n{message}"));
        }
    }
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_schema_accepts_every_form_of_secret_reference_keygate_accepts() {
    for reference in [
        "env://STRIPE_SECRET_KEY",
        "file:///etc/keygate/stripe-keys/checkout",
        "vault://secret/stripe/checkout#api_key",
        "vault://kv/teams/payments/stripe#restricted_key",
        "aws-sm://stripe/checkout",
        "aws-sm://stripe/checkout#api_key",
        "aws-sm://arn:aws:secretsmanager:eu-west-1:123456789012:secret:stripe-AbCdEf#api_key?stage=AWSPREVIOUS",
        "aws-sm://stripe/checkout?version=3f1c2d4e#api_key",
    ] {
        let values = json!({"policies": {"files": {"checkout": {"service": "checkout", "stripe_key": reference}}}});
        let (accepted, message) = schema_check(&values);
        assert!(accepted, "{reference} refused:\n{message}");
    }
    let (accepted, message) =
        schema_check(&json!({"config": {"audit": {"kek": "vault-transit://transit/keys/keygate-audit"}}}));
    assert!(accepted, "{message}");
    let (accepted, message) =
        schema_check(&json!({"replicaCount": 0, "podDisruptionBudget": {"maxUnavailable": "25%"}}));
    assert!(accepted, "{message}");
}

// --- what an operator relies on -----------------------------------------------------------------

fn checksum(rendered: &Rendered) -> String {
    rendered.workload()["spec"]["template"]["metadata"]["annotations"]["checksum/config"].as_str().unwrap().to_owned()
}

#[test]
fn configuration_changes_roll_the_pods_and_policy_changes_reload_in_place() {
    let policy = |max: u64| {
        json!({"checkout": {"service": "checkout", "stripe_key": "env://STRIPE_KEY_CHECKOUT",
            "rules": [{"id": "intents", "effect": "allow", "operation": "POST /v1/payment_intents",
                       "params": {"amount": {"max": max}}}]}})
    };
    let base = render_with(&json!({"policies": {"files": policy(5000)}}));
    let new_policy = render_with(&json!({"policies": {"files": policy(9000)}}));
    let new_config = render_with(&json!({"policies": {"files": policy(5000)}, "config": {"log": {"level": "debug"}}}));

    let policies = |r: &Rendered| r.one("ConfigMap", &format!("{RELEASE}-policies"))["data"].clone();
    assert_ne!(policies(&base), policies(&new_policy));
    assert_eq!(checksum(&base), checksum(&new_policy), "a policy change must not restart pods");
    assert_ne!(checksum(&base), checksum(&new_config), "a configuration change must roll the pods");
    assert_eq!(new_config.config()["log"]["level"], "debug");

    // Policies are mounted as a folder (a subPath mount would never see updates).
    let mounts = base.container()["volumeMounts"].as_array().unwrap();
    let policy_mount = mounts.iter().find(|m| m["name"] == "policies").unwrap();
    assert!(policy_mount.get("subPath").is_none());
    assert_eq!(policy_mount["mountPath"], base.config()["policies"]["dir"]);
    assert_eq!(base.volume("policies")["configMap"]["name"], format!("{RELEASE}-policies"));
}

#[test]
fn the_pod_is_hardened_in_every_value_set() {
    for set in value_sets() {
        let rendered = render(&set);
        let pod = rendered.pod();
        let name = &set.name;
        assert_eq!(pod["securityContext"]["runAsNonRoot"], true, "{name}");
        assert_eq!(pod["securityContext"]["seccompProfile"]["type"], "RuntimeDefault", "{name}");
        assert_eq!(pod["automountServiceAccountToken"], false, "{name}");
        assert!(pod["securityContext"]["runAsUser"].as_u64().unwrap() >= 10000, "{name}: a high, non-root uid");
        for container in pod["containers"].as_array().unwrap() {
            let sc = &container["securityContext"];
            assert_eq!(sc["runAsNonRoot"], true, "{name}");
            assert_eq!(sc["readOnlyRootFilesystem"], true, "{name}");
            assert_eq!(sc["allowPrivilegeEscalation"], false, "{name}");
            assert_eq!(sc["capabilities"]["drop"], json!(["ALL"]), "{name}");
            assert!(sc["capabilities"].get("add").is_none(), "{name}");
            assert!(container["resources"]["limits"]["memory"].is_string(), "{name}: a memory limit");
        }
        // Service-account tokens: none at all, except a projected one for Vault Kubernetes auth.
        let vault_kubernetes = rendered.config()["secrets"]["vault"]["auth"]["method"] == "kubernetes";
        let projected: Vec<&Value> =
            pod["volumes"].as_array().unwrap().iter().filter(|v| v.get("projected").is_some()).collect();
        if vault_kubernetes {
            assert_eq!(projected.len(), 1, "{name}");
            let token = &projected[0]["projected"]["sources"][0]["serviceAccountToken"];
            let mount = rendered.mount_path(projected[0]["name"].as_str().unwrap());
            assert_eq!(
                rendered.config()["secrets"]["vault"]["auth"]["jwt_file"],
                format!("{mount}/{}", token["path"].as_str().unwrap()),
                "{name}: keygate reads the token the pod mounts"
            );
            assert!(token["expirationSeconds"].as_u64().unwrap() <= 86400, "{name}: a short-lived token");
        } else {
            assert!(projected.is_empty(), "{name}: no service-account token without Vault Kubernetes auth");
        }
        for account in rendered.all("ServiceAccount") {
            assert_eq!(account["automountServiceAccountToken"], false, "{name}");
        }
    }
    assert!(
        value_sets().iter().any(|s| render(s).config()["secrets"]["vault"]["auth"]["method"] == "kubernetes"),
        "some value set uses Vault Kubernetes auth"
    );
}

#[test]
fn irsa_and_vault_annotations_are_on_the_service_account() {
    let aws = render(&value_set("aws-statefulset-values.yaml"));
    let account = aws.one("ServiceAccount", RELEASE);
    assert_eq!(
        account["metadata"]["annotations"]["eks.amazonaws.com/role-arn"],
        "arn:aws:iam::123456789012:role/keygate"
    );
    assert_eq!(aws.pod()["serviceAccountName"], RELEASE);
    let vault = render(&value_set("vault-deployment-values.yaml"));
    let account = vault.one("ServiceAccount", RELEASE);
    assert_eq!(account["metadata"]["annotations"]["keygate.io/vault-auth-role"], "keygate");
    assert_eq!(vault.volume("vault-token")["projected"]["sources"][0]["serviceAccountToken"]["audience"], "vault");
}

#[test]
fn a_statefulset_keeps_each_replicas_wal_on_its_own_claim_and_a_deployment_on_an_empty_dir() {
    let sts = render(&value_set("aws-statefulset-values.yaml"));
    let workload = sts.workload();
    assert_eq!(workload["kind"], "StatefulSet");
    let claim = &workload["spec"]["volumeClaimTemplates"][0];
    assert_eq!(claim["metadata"]["name"], "wal");
    assert_eq!(claim["spec"]["resources"]["requests"]["storage"], "10Gi");
    assert_eq!(claim["spec"]["storageClassName"], "gp3");
    let headless = sts.one("Service", &format!("{RELEASE}-headless"));
    assert_eq!(workload["spec"]["serviceName"], headless["metadata"]["name"]);
    assert_eq!(headless["spec"]["clusterIP"], "None");
    let wal_dir = sts.config()["audit"]["wal_dir"].as_str().unwrap().to_owned();
    assert!(wal_dir.starts_with(&format!("{}/", sts.mount_path("wal"))), "the WAL folder is on the claim");
    assert!(
        sts.pod()["volumes"].as_array().unwrap().iter().all(|v| v["name"] != "wal"),
        "the claim, not a pod volume, backs the WAL"
    );

    // Each replica is its own audit writer with a stable id: its pod name (unique per namespace).
    let env = sts.container()["env"].as_array().unwrap();
    let var = |name: &str| env.iter().find(|e| e["name"] == name).unwrap_or_else(|| panic!("no env {name}"));
    assert_eq!(var("POD_NAME")["valueFrom"]["fieldRef"]["fieldPath"], "metadata.name");
    assert_eq!(var("KEYGATE_AUDIT__WRITER_ID")["value"], "payments.$(POD_NAME)");

    let deploy = render(&value_set("vault-deployment-values.yaml"));
    let deploy_env = deploy.container().get("env").and_then(Value::as_array).cloned().unwrap_or_default();
    assert!(
        deploy_env.iter().all(|e| e["name"] != "KEYGATE_AUDIT__WRITER_ID"),
        "a Deployment's pods keep the writer id generated in their WAL folder"
    );
    assert_eq!(deploy.workload()["kind"], "Deployment");
    assert!(deploy.volume("wal")["emptyDir"]["sizeLimit"].is_string());
    let wal_dir = deploy.config()["audit"]["wal_dir"].as_str().unwrap().to_owned();
    assert!(wal_dir.starts_with(&format!("{}/", deploy.mount_path("wal"))));
}

#[test]
fn termination_grace_covers_the_pre_stop_wait_the_drain_and_the_audit_flush() {
    for set in value_sets() {
        let rendered = render(&set);
        let grace = rendered.pod()["terminationGracePeriodSeconds"].as_u64().unwrap();
        let pre_stop = rendered.container()["lifecycle"]["preStop"]["sleep"]["seconds"].as_u64().unwrap();
        let drain = duration_seconds(rendered.config()["limits"]["shutdown_grace"].as_str().unwrap());
        let flush = duration_seconds(rendered.config()["audit"]["shutdown_timeout"].as_str().unwrap());
        assert!(pre_stop > 0, "{}: a preStop wait so endpoints are updated first", set.name);
        assert!(
            grace > pre_stop + drain + flush,
            "{}: terminationGracePeriodSeconds {grace} does not cover preStop {pre_stop} + drain {drain} + flush {flush}",
            set.name
        );
    }
}

#[test]
fn probes_ports_and_service_agree_with_the_listeners_keygate_is_configured_with() {
    for set in value_sets() {
        let rendered = render(&set);
        let config = rendered.config();
        let container = rendered.container();
        let port = |name: &str| {
            container["ports"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap()["containerPort"]
                .as_u64()
                .unwrap()
        };
        assert_eq!(port("proxy"), port_of(config["listen"]["address"].as_str().unwrap()), "{}", set.name);
        assert_eq!(port("admin"), port_of(config["admin"]["address"].as_str().unwrap()), "{}", set.name);
        assert_eq!(container["livenessProbe"]["httpGet"]["path"], "/healthz");
        assert_eq!(container["livenessProbe"]["httpGet"]["port"], "admin");
        assert_eq!(container["readinessProbe"]["httpGet"]["path"], "/readyz");
        assert_eq!(container["readinessProbe"]["httpGet"]["port"], "admin");
        let args: Vec<&str> = container["args"].as_array().unwrap().iter().map(|a| a.as_str().unwrap()).collect();
        assert_eq!(args[..2], ["serve", "--config"]);
        assert!(args[2].starts_with(&format!("{}/", rendered.mount_path("config"))));
        let service = rendered.one("Service", RELEASE);
        let targets: Vec<&Value> =
            service["spec"]["ports"].as_array().unwrap().iter().map(|p| &p["targetPort"]).collect();
        assert_eq!(targets, [&json!("proxy"), &json!("admin")]);
        let tls = &config["listen"]["tls"];
        assert_eq!(tls.is_object(), set.name == "mtls-values.yaml", "{}", set.name);
    }
}

#[test]
fn mtls_values_turn_on_client_certificates_from_the_mounted_ca() {
    let rendered = render(&value_set("mtls-values.yaml"));
    let tls = &rendered.config()["listen"]["tls"];
    let client_ca = tls["client_ca_file"].as_str().unwrap();
    assert!(client_ca.starts_with(&format!("{}/", rendered.mount_path("client-ca"))));
    assert_eq!(rendered.volume("client-ca")["secret"]["secretName"], "keygate-client-ca");
    assert!(tls["cert_file"].as_str().unwrap().starts_with(&format!("{}/", rendered.mount_path("tls"))));
    assert_eq!(rendered.volume("tls")["secret"]["secretName"], "keygate-tls");
    assert!(rendered.notes.contains("https://keygate.payments.svc.cluster.local:8080"), "{}", rendered.notes);
}

#[test]
fn autoscaling_owns_the_replica_count_and_the_disruption_budget_limits_drains() {
    let rendered = render(&value_set("monitoring-hpa-values.yaml"));
    let hpa = rendered.one("HorizontalPodAutoscaler", RELEASE);
    let workload = rendered.workload();
    assert_eq!(hpa["spec"]["scaleTargetRef"]["kind"], workload["kind"]);
    assert_eq!(hpa["spec"]["scaleTargetRef"]["name"], workload["metadata"]["name"]);
    assert_eq!(hpa["spec"]["minReplicas"], 3);
    assert!(workload["spec"].get("replicas").is_none(), "with an HPA the workload leaves replicas alone");
    let pdb = rendered.one("PodDisruptionBudget", RELEASE);
    assert_eq!(pdb["spec"]["maxUnavailable"], "25%");
    assert_eq!(pdb["spec"]["selector"]["matchLabels"], workload["spec"]["selector"]["matchLabels"]);
    let fixed = render(&value_set("vault-deployment-values.yaml"));
    assert_eq!(fixed.workload()["spec"]["replicas"], 3);
    assert!(fixed.all("HorizontalPodAutoscaler").is_empty());
}

#[test]
fn the_network_policy_admits_labelled_clients_and_lets_out_only_dns_https_and_vault() {
    let rendered = render(&value_set("vault-deployment-values.yaml"));
    let policy = rendered.one("NetworkPolicy", RELEASE);
    let spec = &policy["spec"];
    assert_eq!(spec["podSelector"]["matchLabels"], rendered.workload()["spec"]["selector"]["matchLabels"]);
    assert_eq!(spec["policyTypes"], json!(["Ingress", "Egress"]));
    let ingress_ports: Vec<&Value> =
        spec["ingress"].as_array().unwrap().iter().map(|rule| &rule["ports"][0]["port"]).collect();
    assert_eq!(ingress_ports, [&json!("proxy"), &json!("admin")]);
    assert_eq!(spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"]["keygate.io/client"], "true");
    let egress_ports: Vec<u64> = spec["egress"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|rule| rule["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()))
        .collect();
    assert_eq!(egress_ports, [53, 53, 443, 8200]);
    let https = &spec["egress"][1]["to"][0]["ipBlock"];
    assert_eq!(https["cidr"], "0.0.0.0/0");
    for private in ["10.0.0.0/8", "169.254.0.0/16"] {
        assert!(https["except"].as_array().unwrap().contains(&json!(private)), "{private} is not excluded");
    }
}

#[test]
fn notes_tell_a_service_how_to_reach_keygate_and_mint_its_token() {
    let rendered = render(&value_set("vault-deployment-values.yaml"));
    let notes = &rendered.notes;
    let url = "http://keygate.payments.svc.cluster.local:8080";
    assert!(notes.contains(&format!("\"api\": \"{url}\"")), "{notes}");
    assert!(notes.contains("host: \"keygate.payments.svc.cluster.local\", port: 8080, protocol: \"http\""), "{notes}");
    assert!(notes.contains("kubectl -n payments exec deployment/keygate -- keygate token new --service"), "{notes}");
    assert!(!notes.contains("WARNING"), "a production value set has nothing to warn about:\n{notes}");

    let defaults = render(&value_set("defaults"));
    assert!(defaults.notes.contains("inert example policy"), "{}", defaults.notes);
    assert!(defaults.notes.contains("not\n         durable"), "{}", defaults.notes);
    let sts = render(&value_set("aws-statefulset-values.yaml"));
    assert!(sts.notes.contains("exec statefulset/keygate -- keygate token new"), "{}", sts.notes);
}

/// The limit store (issue 15): Redis address, TLS and credentials by secret reference (or from
/// Kubernetes Secrets the chart mounts) reach keygate's configuration, the network policy lets
/// keygate reach Redis, and no Redis is bundled.
#[test]
fn the_limit_store_values_reach_the_keygate_config_with_secrets_mounted_not_bundled() {
    let values = json!({
        "config": {"limit_store": {
            "kind": "redis",
            "timeout": "200ms",
            "rate_limits_on_unavailable": "open",
            "redis": {"sentinel": {"addresses": ["sentinel-0.redis:26379", "sentinel-1.redis:26379"], "master_name": "keygate"}, "username": "keygate"}
        }},
        "limitStore": {"passwordSecret": {"name": "redis-auth", "key": "password"}, "caSecret": {"name": "redis-tls", "key": "ca.crt"}},
        "networkPolicy": {"egress": {"redis": {"peers": [{"podSelector": {"matchLabels": {"app": "redis"}}}], "ports": [6379, 26379]}}}
    });
    let (accepted, message) = schema_check(&values);
    assert!(accepted, "the schema refuses the limit store values:\n{message}");
    let rendered = render_with(&values);
    let store = &rendered.config()["limit_store"];
    assert_eq!(store["kind"], "redis");
    assert_eq!(store["rate_limits_on_unavailable"], "open");
    assert_eq!(store["redis"]["sentinel"]["master_name"], "keygate");
    assert_eq!(store["redis"]["password"], "file:///etc/keygate/redis/password");
    assert_eq!(store["redis"]["tls"]["ca_file"], "/etc/keygate/redis-ca/ca.crt");
    assert_eq!(rendered.mount_path("redis-password"), "/etc/keygate/redis");
    assert_eq!(rendered.mount_path("redis-ca"), "/etc/keygate/redis-ca");
    assert_eq!(rendered.volume("redis-password")["secret"]["secretName"], "redis-auth");
    assert_eq!(rendered.volume("redis-ca")["secret"]["secretName"], "redis-tls");
    let policy = rendered.all("NetworkPolicy")[0];
    let egress = policy["spec"]["egress"].as_array().unwrap();
    let redis_rule = egress
        .iter()
        .find(|rule| rule["to"][0]["podSelector"]["matchLabels"]["app"] == "redis")
        .unwrap_or_else(|| panic!("no egress rule to Redis: {egress:?}"));
    let ports: Vec<u64> = redis_rule["ports"].as_array().unwrap().iter().map(|p| p["port"].as_u64().unwrap()).collect();
    assert_eq!(ports, [6379, 26379]);
    // A password set in the configuration (a Vault reference) wins over the mounted Secret.
    let mut vault = values.clone();
    vault["config"]["limit_store"]["redis"]["password"] = json!("vault://secret/keygate/redis#password");
    assert_eq!(
        render_with(&vault).config()["limit_store"]["redis"]["password"],
        "vault://secret/keygate/redis#password"
    );
    // No Redis is bundled: nothing in any value set deploys one.
    for set in value_sets() {
        let rendered = render(&set);
        for kind in ["Deployment", "StatefulSet"] {
            for workload in rendered.all(kind) {
                let text = workload.to_string();
                assert!(
                    !text.contains("redis-server") && !text.contains("image\":\"redis"),
                    "{}: bundles Redis",
                    set.name
                );
            }
        }
    }
    // The defaults render no limit_store section: keygate's default, the local store.
    assert!(render(&value_set("defaults")).config().get("limit_store").is_none());
    // Refused: a password written in the values (not a reference), an unknown kind, a bad address.
    for bad in [
        json!({"config": {"limit_store": {"redis": {"address": "redis:6379", "password": "hunter2"}}}}),
        json!({"config": {"limit_store": {"kind": "memcached"}}}),
        json!({"config": {"limit_store": {"redis": {"address": "redis"}}}}),
        json!({"config": {"limit_store": {"redis": {"adress": "redis:6379"}}}}),
    ] {
        assert!(!schema_check(&bad).0, "accepted {bad}");
    }
}

/// The limits and audit keys of issue 14 pass the schema and reach keygate's configuration.
#[test]
fn the_connection_buffer_and_audit_queue_limits_reach_the_keygate_config() {
    let limits = json!({
        "idle_timeout": "2m",
        "http2_max_concurrent_streams": 64,
        "http2_keep_alive_interval": "20s",
        "http2_keep_alive_timeout": "10s",
        "max_buffered_bytes": 268435456,
        "buffer_wait": "2s",
        "buffered_share_per_connection": 0.25,
        "buffered_share_per_service": 0.5
    });
    let audit = json!({"lake_timeout": "20s", "max_lake_lag": "10m", "queue_capacity": 4096});
    let values = json!({"config": {"limits": limits.clone(), "audit": audit.clone()}});
    let (accepted, message) = schema_check(&values);
    assert!(accepted, "the schema refuses the new keys:\n{message}");
    let rendered = render_with(&values);
    let config = rendered.config();
    for (key, value) in limits.as_object().unwrap() {
        assert_eq!(&config["limits"][key], value, "limits.{key} in the rendered config");
    }
    for (key, value) in audit.as_object().unwrap() {
        assert_eq!(&config["audit"][key], value, "audit.{key} in the rendered config");
    }
    // Out of range: refused by the schema.
    for bad in [
        json!({"config": {"limits": {"buffered_share_per_service": 0}}}),
        json!({"config": {"limits": {"http2_max_concurrent_streams": 0}}}),
        json!({"config": {"audit": {"queue_capacity": 0}}}),
    ] {
        assert!(!schema_check(&bad).0, "accepted {bad}");
    }
}

/// The webhook ingress gets its own Service (and an optional Ingress routing only its paths), its
/// container port, TLS mount, state folder on the data volume, and NetworkPolicy rules; with
/// webhooks off nothing of it renders.
#[test]
fn the_webhook_ingress_has_its_own_service_ingress_and_network_policy_rules() {
    let values = json!({
        "webhooks": {
            "enabled": true,
            "tls": {"enabled": true, "secretName": "webhook-tls"},
            "service": {"type": "LoadBalancer", "loadBalancerSourceRanges": ["3.18.12.63/32"]},
            "ingress": {"enabled": true, "className": "nginx", "host": "hooks.example.com", "tlsSecretName": "hooks-tls"}
        },
        "config": {"webhooks": {
            "admin_tokens": ["vault://secret/keygate/webhooks#admin"],
            "endpoints": [{
                "name": "payments",
                "secrets": ["vault://secret/stripe/webhooks#current", "vault://secret/stripe/webhooks#previous"],
                "tolerance": "300s",
                "destinations": [{"name": "billing", "url": "https://billing.internal/hooks", "secret": "vault://secret/keygate/dest#billing", "events": ["invoice.*"], "retry_for": "3d"}]
            }]
        }},
        "networkPolicy": {"egress": {"webhookDestinations": {"peers": [{"namespaceSelector": {"matchLabels": {"name": "billing"}}}], "ports": [443]}}}
    });
    let (accepted, message) = schema_check(&values);
    assert!(accepted, "the schema refuses the webhook values:\n{message}");
    let rendered = render_with(&values);
    let webhooks = &rendered.config()["webhooks"];
    assert_eq!(port_of(webhooks["listen"]["address"].as_str().unwrap()), 8443);
    assert_eq!(webhooks["listen"]["tls"]["cert_file"], "/etc/keygate/webhook-tls/tls.crt");
    assert_eq!(webhooks["state_dir"], "/var/lib/keygate/webhooks");
    assert!(
        webhooks["state_dir"].as_str().unwrap().starts_with(&rendered.mount_path("wal")),
        "the state folder is on the data volume"
    );
    assert_eq!(webhooks["endpoints"][0]["secrets"][1], "vault://secret/stripe/webhooks#previous");
    assert_eq!(rendered.mount_path("webhook-tls"), "/etc/keygate/webhook-tls");
    assert_eq!(rendered.volume("webhook-tls")["secret"]["secretName"], "webhook-tls");
    let ports = rendered.container()["ports"].as_array().unwrap();
    assert!(ports.iter().any(|p| p["name"] == "webhooks" && p["containerPort"] == 8443), "{ports:?}");

    // Its own Service; the proxy's Service does not carry the webhook port.
    let service = rendered.one("Service", &format!("{RELEASE}-webhooks"));
    assert_eq!(service["spec"]["type"], "LoadBalancer");
    assert_eq!(service["spec"]["loadBalancerSourceRanges"][0], "3.18.12.63/32");
    assert_eq!(service["spec"]["ports"][0]["targetPort"], "webhooks");
    assert_eq!(service["spec"]["ports"][0]["port"], 443);
    let proxy = rendered.one("Service", RELEASE);
    assert!(proxy["spec"]["ports"].as_array().unwrap().iter().all(|p| p["targetPort"] != "webhooks"));
    let ingress = rendered.one("Ingress", &format!("{RELEASE}-webhooks"));
    let path = &ingress["spec"]["rules"][0]["http"]["paths"][0];
    assert_eq!(path["path"], "/webhooks/stripe/");
    assert_eq!(path["backend"]["service"]["name"], format!("{RELEASE}-webhooks"));
    assert_eq!(ingress["spec"]["tls"][0]["secretName"], "hooks-tls");
    assert_eq!(ingress["spec"]["ingressClassName"], "nginx");

    // NetworkPolicy: the webhook port is open to its own peers only, destinations reachable.
    let policy = rendered.all("NetworkPolicy")[0];
    let ingress_rules = policy["spec"]["ingress"].as_array().unwrap();
    let webhook_rule = ingress_rules
        .iter()
        .find(|rule| rule["ports"][0]["port"] == "webhooks")
        .unwrap_or_else(|| panic!("no ingress rule for the webhook port: {ingress_rules:?}"));
    assert_eq!(webhook_rule["ports"].as_array().map(Vec::len), Some(1));
    let egress = policy["spec"]["egress"].as_array().unwrap();
    assert!(
        egress.iter().any(|rule| rule["to"][0]["namespaceSelector"]["matchLabels"]["name"] == "billing"
            && rule["ports"][0]["port"] == 443),
        "no egress rule to the destinations: {egress:?}"
    );

    // Off by default: no Service, no Ingress, no port, no config section.
    let defaults = render(&value_set("defaults"));
    assert!(defaults.all("Ingress").is_empty());
    assert!(defaults.all("Service").iter().all(|s| !s["metadata"]["name"].as_str().unwrap().ends_with("-webhooks")));
    assert!(defaults.config().get("webhooks").is_none());
    assert!(defaults.container()["ports"].as_array().unwrap().iter().all(|p| p["name"] != "webhooks"));

    // Refused: a literal secret instead of a reference, an unknown key, a bad destination URL.
    for bad in [
        json!({"config": {"webhooks": {"endpoints": [{"name": "p", "secrets": ["whsec_literal"], "destinations": [{"name": "b", "url": "https://b/h", "secret": "env://B"}]}]}}}),
        json!({"config": {"webhooks": {"endpoints": [{"name": "p", "secrets": ["env://W"], "destinations": [{"name": "b", "url": "ftp://b/h", "secret": "env://B"}]}]}}}),
        json!({"config": {"webhooks": {"dedup_windw": "3d"}}}),
        json!({"webhooks": {"servic": {}}}),
    ] {
        assert!(!schema_check(&bad).0, "accepted {bad}");
    }
}

/// Kafka and SQS webhook destinations (docs/webhooks.md#kafka-and-sqs-destinations): the schema
/// takes them with their credentials as secret references (a SASL password from a Kubernetes
/// Secret mounted with extraVolumes, read through `file://`; SQS through the pod's IRSA role),
/// they reach the rendered configuration as written, and misplaced or literal settings are refused;
/// anomaly alert destinations (`config.alerts.destinations`) follow the same schema.
#[test]
fn broker_destinations_take_credentials_by_reference_and_reach_the_config() {
    let kafka = json!({
        "name": "ledger", "kind": "kafka", "concurrency": 1,
        "kafka": {
            "brokers": ["kafka-1.kafka.svc:9093"], "topic": "stripe.events",
            "routes": [{"events": ["invoice.*"], "topic": "stripe.invoices"}],
            "security_protocol": "sasl_ssl",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "keygate", "password": "file:///etc/keygate/kafka/password"}
        },
        "ca_file": "/etc/keygate/kafka/ca.crt"
    });
    let sqs = json!({
        "name": "fulfilment", "kind": "sqs",
        "sqs": {"queue_url": "https://sqs.eu-west-1.amazonaws.com/123456789012/stripe.fifo", "aws": {"region": "eu-west-1"}}
    });
    let with = |destinations: Value| {
        json!({
            "webhooks": {"enabled": true},
            "serviceAccount": {"awsRoleArn": "arn:aws:iam::123456789012:role/keygate-webhooks"},
            "extraVolumes": [{"name": "kafka-client", "secret": {"secretName": "kafka-keygate"}}],
            "extraVolumeMounts": [{"name": "kafka-client", "mountPath": "/etc/keygate/kafka", "readOnly": true}],
            "config": {"webhooks": {"endpoints": [{"name": "payments", "secrets": ["env://WHSEC"], "destinations": destinations}]}}
        })
    };
    let values = with(json!([kafka, sqs]));
    let (accepted, message) = schema_check(&values);
    assert!(accepted, "the schema refuses broker destinations:\n{message}");
    let rendered = render_with(&values);
    let destinations = &rendered.config()["webhooks"]["endpoints"][0]["destinations"];
    assert_eq!(destinations[0], kafka);
    assert_eq!(destinations[1], sqs);
    assert_eq!(rendered.mount_path("kafka-client"), "/etc/keygate/kafka");

    let mut literal = kafka.clone();
    literal["kafka"]["sasl"]["password"] = json!("hunter2-literal-password");
    let mut kafka_with_url = kafka.clone();
    kafka_with_url["url"] = json!("https://b/h");
    let mut sqs_typo = sqs.clone();
    sqs_typo["sqs"]["queue_ur"] = json!("x");
    // Anomaly alert destinations (`config.alerts.destinations`) are the same schema.
    let alerts = |destination: &Value| json!({"config": {"anomalies": {}, "alerts": {"destinations": [destination]}}});
    let (accepted, message) = schema_check(&alerts(&kafka));
    assert!(accepted, "the schema refuses a Kafka alert destination:\n{message}");
    let rendered = render_with(&alerts(&sqs));
    assert_eq!(rendered.config()["alerts"]["destinations"][0], sqs);
    assert_eq!(
        rendered.config()["anomalies"],
        json!({"live": {"state_file": "/var/lib/keygate/anomalies-state.json"}}),
        "an empty anomalies section turns detection on, its learned state on the data volume"
    );
    assert!(!schema_check(&alerts(&literal)).0, "accepted a literal SASL password in an alert destination");
    for bad in [
        json!([literal]),
        json!([kafka_with_url]),
        json!([{"name": "k", "kind": "kafka"}]),
        json!([{"name": "n", "kind": "nats", "url": "https://b/h", "secret": "env://B"}]),
        json!([sqs_typo]),
        json!([{"name": "h", "url": "https://b/h"}]),
    ] {
        assert!(!schema_check(&with(bad.clone())).0, "accepted {bad}");
    }
}

/// The PrometheusRule (issue 18; off by default): alerts for keygate's anomaly detectors and for
/// its own health, each on a metric keygate really exports (the name is looked up where it is
/// registered), scoped to keygate's job, with the thresholds taken from the values.
#[test]
fn the_prometheus_rule_is_off_by_default_and_alerts_on_metrics_keygate_exports() {
    assert!(render(&value_set("defaults")).all("PrometheusRule").is_empty(), "a PrometheusRule by default");
    let rendered = render_with(&json!({"metrics": {"prometheusRule": {
        "enabled": true, "labels": {"release": "kube-prometheus-stack"}, "auditBacklogSegments": 7
    }}}));
    let rule = rendered.one("PrometheusRule", RELEASE);
    assert_eq!(rule["apiVersion"], "monitoring.coreos.com/v1");
    assert_eq!(rule["metadata"]["labels"]["release"], "kube-prometheus-stack");
    let rules: Vec<&Value> =
        rule["spec"]["groups"].as_array().unwrap().iter().flat_map(|g| g["rules"].as_array().unwrap().iter()).collect();
    let alert = |name: &str| -> &Value {
        rules.iter().find(|r| r["alert"] == name).unwrap_or_else(|| panic!("no alert {name}: {rules:?}"))
    };
    for name in [
        "KeygateAnomaly",
        "KeygateAnomalyInputsDropped",
        "KeygateAuditBacklog",
        "KeygateAuditLakeLag",
        "KeygateAuditWalFailures",
        "KeygateAuditSegmentsSetAside",
        "KeygateSecretStale",
        "KeygatePolicyReloadRejected",
    ] {
        let expr = alert(name)["expr"].as_str().unwrap();
        assert!(expr.contains(&format!("job=\"{RELEASE}\"")), "{name} is not scoped to keygate's job: {expr}");
        assert!(!alert(name)["annotations"]["description"].as_str().unwrap_or("").is_empty(), "{name}");
    }
    let anomaly = alert("KeygateAnomaly");
    assert!(anomaly["expr"].as_str().unwrap().contains("by (namespace, service, detector, severity)"), "{anomaly}");
    assert_eq!(anomaly["labels"]["severity"], "{{ $labels.severity }}");
    assert!(alert("KeygateAuditBacklog")["expr"].as_str().unwrap().ends_with("> 7"));
    assert!(alert("KeygatePolicyReloadRejected")["expr"].as_str().unwrap().contains("reason=\"rejected\""));

    // Every metric named is registered by keygate under that name (counters gain `_total`; the
    // audit log's are registered under the `keygate_audit` prefix).
    let root = chart_dir().join("../..");
    let source = |path: &str| std::fs::read_to_string(root.join(path)).unwrap();
    let proxy = ["proxy/src/telemetry.rs", "proxy/src/anomalies.rs", "secrets/src/metrics.rs"].map(source).join("\n");
    let audit = source("auditlog/src/metrics.rs");
    let exprs: Vec<&str> = rules.iter().map(|r| r["expr"].as_str().unwrap()).collect();
    let names: std::collections::BTreeSet<&str> = exprs
        .iter()
        .flat_map(|e| e.split(|c: char| !(c.is_ascii_alphanumeric() || c == '_')))
        .filter(|w| w.starts_with("keygate_"))
        .collect();
    assert!(names.len() >= 8, "{names:?}");
    for name in names {
        let base = name.strip_suffix("_total").unwrap_or(name);
        let found = match base.strip_prefix("keygate_audit_") {
            Some(short) => audit.contains(&format!("\"{short}\"")),
            None => proxy.contains(&format!("\"{base}\"")),
        };
        assert!(found, "{name} is not a metric keygate registers");
    }
    // A custom selector replaces the job matcher; a malformed one is refused by the schema.
    let custom = render_with(&json!({"metrics": {"prometheusRule": {"enabled": true, "selector": "app=\"keygate\""}}}));
    let custom = custom.one("PrometheusRule", RELEASE);
    assert!(custom.to_string().contains("keygate_anomalies_total{app=\\\"keygate\\\"}"), "{custom}");
    assert!(!schema_check(&json!({"metrics": {"prometheusRule": {"selector": "job=keygate}"}}})).0);
    assert!(!schema_check(&json!({"metrics": {"prometheusRule": {"bogus": 1}}})).0);
}
