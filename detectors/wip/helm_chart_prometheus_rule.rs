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
    let rules: Vec<&Value> = rule["spec"]["groups"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|g| g["rules"].as_array().unwrap().iter())
        .collect();
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
    let custom =
        render_with(&json!({"metrics": {"prometheusRule": {"enabled": true, "selector": "app=\"keygate\""}}}));
    let custom = custom.one("PrometheusRule", RELEASE);
    assert!(custom.to_string().contains("keygate_anomalies_total{app=\\\"keygate\\\"}"), "{custom}");
    assert!(!schema_check(&json!({"metrics": {"prometheusRule": {"selector": "job=keygate}"}}})).0);
    assert!(!schema_check(&json!({"metrics": {"prometheusRule": {"bogus": 1}}})).0);
}
