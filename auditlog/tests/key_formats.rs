//! Ed25519 key formats (issue 13, point 7): a signing key and a public key are told apart by
//! their encoding (PKCS#8 / SPKI PEM, `ed25519-seed:` / `ed25519-pub:`), never by trial decoding;
//! bare 64-hex values (older quick-start folders) are read as what the context expects. Lakes
//! are written with the real writer and verified in-process through the same key resolution the
//! `auditlog verify` command uses ([`keys::trusted_keys`]).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::path::Path;

use common::*;
use futures::StreamExt;
use keygate_auditlog::crypto::{KeyEncoding, PUBLIC_PREFIX, SEED_PREFIX};
use keygate_auditlog::verify::{FindingKind, VerifyOptions, VerifyReport, verify};
use keygate_auditlog::{AuditConfig, SigningKey, VerifyingKey, keys};
use keygate_secrets::{SecretStore, SecretsConfig};

async fn store() -> SecretStore {
    SecretStore::new(&SecretsConfig::default()).await.unwrap()
}

/// A lake with rows signed by `signing`, written by the real writer.
async fn signed_lake(signing: SigningKey, rows: usize) -> Env {
    let mut env = env();
    env.signing = signing;
    let log = env.open().await;
    for i in 0..rows {
        log.record(exchange(i), None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    env
}

async fn run_verify(env: &Env, trusted: Vec<VerifyingKey>) -> VerifyReport {
    let opts = VerifyOptions { trusted_keys: trusted, since_us: None, checkpoints: None };
    verify(&open_lake(&env.lake_dir()), &opts, |_, _| {}).await.unwrap()
}

fn write_ref(dir: &Path, name: &str, text: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("{text}\n")).unwrap();
    format!("file://{}", path.display())
}

/// The three texts of a signing key: a bare seed (older quick starts), the prefixed seed, PEM.
fn signing_texts(seed: &[u8; 32]) -> Vec<(&'static str, String)> {
    let key = SigningKey::from_text(&hex::encode(seed)).unwrap();
    vec![
        ("bare hex seed", hex::encode(seed)),
        ("ed25519-seed:", key.to_seed_text().to_string()),
        ("PKCS#8 PEM", key.to_pkcs8_pem().unwrap().to_string()),
    ]
}

/// The three texts of a public key.
fn public_texts(key: &VerifyingKey) -> Vec<(&'static str, String)> {
    vec![("bare hex", key.to_hex()), ("ed25519-pub:", key.to_text()), ("SPKI PEM", key.to_public_pem().unwrap())]
}

/// Every way `auditlog verify` may be told which key to trust, for the key with this seed:
/// `audit.signing_key` of the config, `--signing-key REF`, `--public-key` inline and by reference.
async fn trusted_in_every_form(store: &SecretStore, dir: &Path, seed: &[u8; 32]) -> Vec<(String, Vec<VerifyingKey>)> {
    let mut out = Vec::new();
    let public = SigningKey::from_text(&hex::encode(seed)).unwrap().verifying_key();
    for (i, (form, text)) in signing_texts(seed).into_iter().enumerate() {
        let r = write_ref(dir, &format!("signing-{i}"), &text);
        out.push((format!("audit.signing_key = {form}"), keys::trusted_keys(store, &[], &[], Some(&r)).await.unwrap()));
        out.push((format!("--signing-key {form}"), keys::trusted_keys(store, &[], &[r], None).await.unwrap()));
    }
    for (i, (form, text)) in public_texts(&public).into_iter().enumerate() {
        let r = write_ref(dir, &format!("public-{i}"), &text);
        out.push((format!("--public-key REF of {form}"), keys::trusted_keys(store, &[r], &[], None).await.unwrap()));
        if !text.contains('\n') {
            out.push((format!("--public-key {form}"), keys::trusted_keys(store, &[text], &[], None).await.unwrap()));
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn signing_keys_in_every_format_verify_as_signed_over_200_random_keys() {
    const KEYS: usize = 200;
    let store = store().await;
    let outcomes = futures::stream::iter(0..KEYS)
        .map(|_| {
            let store = store.clone();
            async move {
                let seed: [u8; 32] = rand::random();
                // About half of all random seeds also decode as a valid public key: the case that
                // trial decoding got wrong.
                let ambiguous = VerifyingKey::from_hex(&hex::encode(seed)).is_ok();
                let env = signed_lake(SigningKey::from_text(&hex::encode(seed)).unwrap(), 1).await;
                let keys_dir = env.dir.path().join("keys");
                std::fs::create_dir_all(&keys_dir).unwrap();
                let mut failures = Vec::new();
                for (form, trusted) in trusted_in_every_form(&store, &keys_dir, &seed).await {
                    assert_eq!(trusted, vec![env.signing.verifying_key()], "{form} gives the signer's public key");
                    let report = run_verify(&env, trusted).await;
                    assert!(report.trusted_keys && report.manifests >= 1);
                    if !report.findings.is_empty() {
                        failures.push(format!("{form}: {:?}", report.findings));
                    }
                }
                (ambiguous, failures)
            }
        })
        .buffer_unordered(4)
        .collect::<Vec<_>>()
        .await;
    let ambiguous = outcomes.iter().filter(|(a, _)| *a).count();
    let failures: Vec<&String> = outcomes.iter().flat_map(|(_, f)| f).collect();
    assert!(failures.is_empty(), "{} signed lakes not verified as signed: {failures:#?}", failures.len());
    assert!(ambiguous >= KEYS / 4, "the sample holds seeds that are also curve points ({ambiguous} of {KEYS})");
}

/// A seed whose 64 hex characters also decode as a valid public key (about every second one).
fn ambiguous_seed() -> [u8; 32] {
    loop {
        let seed: [u8; 32] = rand::random();
        if VerifyingKey::from_hex(&hex::encode(seed)).is_ok() {
            return seed;
        }
    }
}

#[tokio::test]
async fn an_old_quick_start_folder_with_bare_hex_keys_still_verifies() {
    // The folder as keygate's quick start wrote it before prefixes: two files of 64 hex characters.
    let data = tempfile::tempdir().unwrap();
    let seed = ambiguous_seed();
    std::fs::write(data.path().join("audit-kek"), format!("{}\n", hex::encode(rand::random::<[u8; 32]>()))).unwrap();
    std::fs::write(data.path().join("audit-signing-key"), format!("{}\n", hex::encode(seed))).unwrap();
    let cfg = AuditConfig {
        lake: data.path().join("lake").display().to_string(),
        wal_dir: data.path().join("wal"),
        kek: format!("file://{}", data.path().join("audit-kek").display()),
        signing_key: format!("file://{}", data.path().join("audit-signing-key").display()),
        ..AuditConfig::default()
    };
    let store = store().await;
    // keygate resolves the keys as the proxy does, and signs with the seed.
    let (kek, signing) = keys::resolve(&cfg, &store).await.unwrap();
    let expected = SigningKey::from_text(&hex::encode(seed)).unwrap().verifying_key();
    assert_eq!(signing.verifying_key(), expected);
    assert_ne!(
        VerifyingKey::from_hex(&hex::encode(seed)).unwrap(),
        expected,
        "read as a public key, this seed names another key: only the context may decide"
    );
    let log = keygate_auditlog::AuditLog::open(&cfg, kek, signing).await.unwrap();
    for i in 0..5 {
        log.record(exchange(i), None).await.unwrap();
    }
    log.shutdown().await.unwrap();
    let lake = open_lake(&data.path().join("lake"));
    let opts = |trusted| VerifyOptions { trusted_keys: trusted, since_us: None, checkpoints: None };
    // `auditlog --config keygate.yaml verify`: audit.signing_key is a signing key.
    let trusted = keys::trusted_keys(&store, &[], &[], Some(&cfg.signing_key)).await.unwrap();
    assert_eq!(trusted, vec![expected]);
    let report = verify(&lake, &opts(trusted), |_, _| {}).await.unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    assert_eq!(report.rows, 5);
    // `auditlog --lake … verify --signing-key file://…/audit-signing-key`.
    let trusted = keys::trusted_keys(&store, &[], std::slice::from_ref(&cfg.signing_key), None).await.unwrap();
    let report = verify(&lake, &opts(trusted), |_, _| {}).await.unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
    // A bare-hex *public* key file, as older tooling wrote beside the folder, is a public key.
    let public = write_ref(data.path(), "audit-signing.pub", &expected.to_hex());
    let trusted = keys::trusted_keys(&store, &[public], &[], None).await.unwrap();
    let report = verify(&lake, &opts(trusted), |_, _| {}).await.unwrap();
    assert!(report.findings.is_empty(), "{:#?}", report.findings);
}

#[tokio::test]
async fn a_wrong_key_is_a_bad_signature_never_unsigned() {
    let store = store().await;
    let env = signed_lake(SigningKey::generate(), 3).await;
    let keys_dir = env.dir.path().join("keys");
    std::fs::create_dir_all(&keys_dir).unwrap();
    let other: [u8; 32] = rand::random();
    for (form, trusted) in trusted_in_every_form(&store, &keys_dir, &other).await {
        let report = run_verify(&env, trusted).await;
        assert!(report.manifests >= 1);
        assert_eq!(report.findings.len(), report.manifests, "{form}: one finding per manifest: {:#?}", report.findings);
        for f in &report.findings {
            assert_eq!(f.kind, FindingKind::BadSignature, "{form}: {f}");
            assert!(f.detail.contains("not a trusted key"), "{form}: names the untrusted signer: {f}");
            assert!(f.to_string().starts_with("BAD_SIGNATURE"), "{f}");
        }
    }
    // With no trusted key, a manifest whose body was changed is a bad signature, not unsigned.
    let manifest = files_under(&env.lake_dir().join("manifests")).into_iter().next().unwrap().0;
    let mut doc: serde_json::Value = serde_json::from_slice(&std::fs::read(&manifest).unwrap()).unwrap();
    doc["kek_id"] = serde_json::Value::String("local:0000000000000000".into());
    std::fs::write(&manifest, serde_json::to_vec_pretty(&doc).unwrap()).unwrap();
    let report = run_verify(&env, vec![]).await;
    assert!(report.findings.iter().any(|f| f.kind == FindingKind::BadSignature), "{:#?}", report.findings);
    assert!(report.findings.iter().all(|f| f.kind != FindingKind::Unsigned), "{:#?}", report.findings);
}

#[tokio::test]
async fn each_context_refuses_the_other_kind_of_key() {
    let store = store().await;
    let dir = tempfile::tempdir().unwrap();
    let key = SigningKey::generate();
    let public = key.verifying_key();
    // A public key where a signing key is expected: audit.signing_key, --signing-key.
    for (form, text) in [("ed25519-pub:", public.to_text()), ("SPKI PEM", public.to_public_pem().unwrap())] {
        let r = write_ref(dir.path(), "pub", &text);
        let err = keys::signing_key_from_reference(&store, &r).await.unwrap_err().to_string();
        assert!(err.contains("public key"), "{form}: {err}");
        assert!(keys::trusted_keys(&store, &[], &[r], None).await.is_err(), "{form}");
    }
    // A signing key where a public key is expected: --public-key inline or behind a reference.
    let seed_text = key.to_seed_text().to_string();
    for (form, text) in [("ed25519-seed:", seed_text.clone()), ("PKCS#8 PEM", key.to_pkcs8_pem().unwrap().to_string())]
    {
        let r = write_ref(dir.path(), "private", &text);
        let err = keys::trusted_keys(&store, &[r], &[], None).await.unwrap_err().to_string();
        assert!(err.contains("--signing-key"), "{form}: {err}");
        let err = keys::verifying_key(&store, &text).await.unwrap_err().to_string();
        assert!(err.contains("--signing-key"), "{form} inline: {err}");
        assert!(!err.contains(&seed_text[SEED_PREFIX.len()..]), "no key material in errors: {err}");
    }
    // Malformed prefixed values are refused, not guessed at.
    for bad in [format!("{SEED_PREFIX}abcd"), format!("{PUBLIC_PREFIX}{}", "zz".repeat(32))] {
        assert!(SigningKey::from_text(&bad).is_err() && VerifyingKey::from_text(&bad).is_err(), "{bad}");
    }
}

#[test]
fn keygen_writes_self_describing_formats() {
    let k = keys::generate().unwrap();
    assert_eq!(KeyEncoding::of(&k.signing_key_pem), KeyEncoding::PrivatePem);
    assert_eq!(KeyEncoding::of(&k.public_key), KeyEncoding::PublicPrefix);
    assert_eq!(KeyEncoding::of(&k.public_key_pem), KeyEncoding::PublicPem);
    assert_eq!(KeyEncoding::of(&k.kek), KeyEncoding::BareHex, "the KEK stays 64 hex characters");
    let signing = SigningKey::from_text(&k.signing_key_pem).unwrap();
    assert_eq!(VerifyingKey::from_text(&k.public_key).unwrap(), signing.verifying_key());
    assert_eq!(VerifyingKey::from_text(&k.public_key_pem).unwrap(), signing.verifying_key());
    // Round trips of every text form.
    let seed = signing.to_seed_text();
    assert_eq!(KeyEncoding::of(&seed), KeyEncoding::SeedPrefix);
    assert_eq!(SigningKey::from_text(&seed).unwrap().public_key_hex(), signing.public_key_hex());
    assert!(keygate_auditlog::LocalKek::from_text(&k.kek).is_ok());
}

/// The `auditlog` command itself, when it is built (it needs the `cli` feature).
#[tokio::test]
async fn the_command_verifies_an_old_quick_start_folder_and_refuses_a_private_public_key() {
    let Some(bin) = option_env!("CARGO_BIN_EXE_auditlog") else { return };
    let data = tempfile::tempdir().unwrap();
    let seed = ambiguous_seed();
    let kek = data.path().join("audit-kek");
    let signing = data.path().join("audit-signing-key");
    std::fs::write(&kek, format!("{}\n", hex::encode(rand::random::<[u8; 32]>()))).unwrap();
    std::fs::write(&signing, format!("{}\n", hex::encode(seed))).unwrap();
    let lake_dir = data.path().join("lake");
    let cfg = AuditConfig {
        lake: lake_dir.display().to_string(),
        wal_dir: data.path().join("wal"),
        kek: format!("file://{}", kek.display()),
        signing_key: format!("file://{}", signing.display()),
        ..AuditConfig::default()
    };
    let (k, s) = keys::resolve(&cfg, &store().await).await.unwrap();
    let log = keygate_auditlog::AuditLog::open(&cfg, k, s).await.unwrap();
    log.record(exchange(0), None).await.unwrap();
    log.shutdown().await.unwrap();
    let config = data.path().join("keygate.yaml");
    std::fs::write(
        &config,
        format!("audit:\n  lake: {}\n  kek: {}\n  signing_key: {}\n", cfg.lake, cfg.kek, cfg.signing_key),
    )
    .unwrap();
    let run = |args: &[&str]| {
        let o = std::process::Command::new(bin).args(args).env_remove("KEYGATE_CONFIG").output().unwrap();
        (
            o.status.code(),
            String::from_utf8_lossy(&o.stdout).into_owned(),
            String::from_utf8_lossy(&o.stderr).into_owned(),
        )
    };
    let lake = lake_dir.display().to_string();
    let (code, out, err) = run(&["--config", &config.display().to_string(), "verify"]);
    assert_eq!(code, Some(0), "{out}{err}");
    assert!(out.contains("0 finding(s)") && !out.contains("no trusted key"), "{out}");
    let (code, out, err) = run(&["--lake", &lake, "verify", "--signing-key", &cfg.signing_key]);
    assert_eq!(code, Some(0), "{out}{err}");
    let seed_text = SigningKey::from_text(&hex::encode(seed)).unwrap().to_seed_text().to_string();
    let (code, _, err) = run(&["--lake", &lake, "verify", "--public-key", &seed_text]);
    assert_eq!(code, Some(2), "{err}");
    assert!(err.contains("--signing-key"), "{err}");
    let other = SigningKey::generate().verifying_key().to_text();
    let (code, out, _) = run(&["--lake", &lake, "verify", "--public-key", &other]);
    assert_eq!(code, Some(1), "{out}");
    assert!(out.lines().next().is_some_and(|l| l.starts_with("BAD_SIGNATURE")), "{out}");
}
