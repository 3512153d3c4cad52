//! Row proofs from a lake written by real traffic: two keygate instances (two writers) proxy
//! requests to a fake Stripe into one lake with small files and checkpoints published to a
//! second folder; every row then proves with `auditlog prove` and checks with `auditlog
//! check-proof`, changed bytes fail, the admin listener serves the newest checkpoints, and an
//! independent Python implementation of RFC 6962 + C2SP signed-note (the `cryptography` package
//! of the test venv) accepts keygate's checkpoints and proofs.
#![allow(clippy::expect_used, clippy::unwrap_used)]

use std::path::Path;
use std::time::Duration;

use keygate_tests::audit::{auditlog, query_lake};
use keygate_tests::fake_stripe::{Behavior, FakeStripe};
use keygate_tests::http::{get, request};
use keygate_tests::keygate::{Keygate, KeygateOptions};
use keygate_tests::proxy_setup::{CANARY_KEY, allow_all_checkout_policy, audit_yaml};
use keygate_tests::tool;

/// RFC 9162 inclusion checking and C2SP signed-note Ed25519 verification, written from the
/// specifications (no keygate code): `check.py PUBLIC_KEY_HEX FILE...`, each a `.tlog-proof` or a
/// checkpoint note; prints `ok` per file or exits 1 naming what failed.
const PYTHON_CHECKER: &str = r#"
import base64, hashlib, json, sys
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

pub = bytes.fromhex(sys.argv[1])
H = lambda b: hashlib.sha256(b).digest()

def check_note(text):
    note, sigs = text.split("\n\n", 1)
    note += "\n"
    origin = note.split("\n")[0]
    for line in sigs.splitlines():
        assert line.startswith("\u2014 "), "signature line"
        name, sig = line[2:].split(" ")
        sig = base64.b64decode(sig, validate=True)
        if name == origin and sig[:4] == H(name.encode() + b"\n\x01" + pub)[:4]:
            Ed25519PublicKey.from_public_bytes(pub).verify(sig[4:], note.encode())
            lines = note.split("\n")
            return origin, int(lines[1]), base64.b64decode(lines[2], validate=True)
    raise AssertionError("no signature by the key")

def check_proof(text):
    head, checkpoint = text.split("\n\n", 1)
    lines = head.split("\n")
    assert lines[0] == "c2sp.org/tlog-proof@v1"
    row = json.loads(base64.b64decode(lines[1][len("extra "):], validate=True))
    index = int(lines[2][len("index "):])
    path = [base64.b64decode(l, validate=True) for l in lines[3:]]
    origin, size, root = check_note(checkpoint)
    assert origin.endswith("/%s/%s" % (row["table"], row["writer_id"])), origin
    # RFC 9162 2.1.3.2
    fn, sn, r = index, size - 1, H(b"\x00" + bytes.fromhex(row["hash"]))
    assert index < size
    for p in path:
        assert sn != 0
        if fn & 1 or fn == sn:
            r = H(b"\x01" + p + r)
            while fn & 1 == 0 and fn != 0:
                fn >>= 1; sn >>= 1
        else:
            r = H(b"\x01" + r + p)
        fn >>= 1; sn >>= 1
    assert sn == 0 and r == root, "inclusion path does not reach the root"

for f in sys.argv[2:]:
    text = open(f).read()
    try:
        check_proof(text) if text.startswith("c2sp.org/tlog-proof@v1") else check_note(text)
    except Exception as e:
        print("FAIL %s: %r" % (f, e)); sys.exit(1)
    print("ok")
"#;

fn writer_config(dir: &Path, upstream: &str, policies: &Path, writer: &str) -> String {
    // audit_yaml creates the shared keys; each instance gets its own WAL and writer id.
    let _ = audit_yaml(dir, "");
    format!(
        "listen:\n  address: 127.0.0.1:0\nadmin:\n  address: 127.0.0.1:0\nupstreams:\n  api: {upstream}\npolicies:\n  dir: {}\nlog:\n  level: warn,keygate=info\n\
         audit:\n  lake: {}\n  wal_dir: {}\n  kek: file://{}\n  signing_key: file://{}\n  writer_id: {writer}\n  roll:\n    max_bytes: 4096\n  checkpoints:\n    log_name: keygate.test/e2e\n    publish: {}\n    interval: 1s\n",
        policies.display(),
        dir.join("lake").display(),
        dir.join(format!("wal-{writer}")).display(),
        dir.join("audit-kek").display(),
        dir.join("audit-signing-key").display(),
        dir.join("published").display(),
    )
}

fn flip(text: &str, at: usize) -> Vec<u8> {
    let mut b = text.as_bytes().to_vec();
    b[at] ^= 0x01;
    b
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_row_of_two_writers_proves_offline_and_python_agrees() {
    let fake = FakeStripe::start(Behavior::Ok).await;
    let dir = tempfile::tempdir().unwrap();
    let policies = dir.path().join("policies");
    let token = allow_all_checkout_policy(&policies);
    let env = vec![("KG_E2E_STRIPE_KEY".to_owned(), CANARY_KEY.to_owned())];
    let mut instances = Vec::new();
    for writer in ["writer-a", "writer-b"] {
        let config = writer_config(dir.path(), &fake.url(), &policies, writer);
        let home = dir.path().join(writer);
        std::fs::create_dir_all(&home).unwrap();
        let kg = Keygate::start(
            &home,
            KeygateOptions { config: Some(&config), env: env.clone(), args: vec![], wait_ready: true },
        );
        instances.push(kg);
    }
    for i in 0..24 {
        let kg = &instances[i % 2];
        let body = format!("amount={}&currency=usd&metadata[order]=order-{i}", 1000 + i);
        let key = format!("proof-{i}");
        let r = request(kg.proxy, "POST", "/v1/payment_intents", &token, &[("Idempotency-Key", &key)], &body).unwrap();
        assert_eq!(r.status, 200, "{}", r.body);
    }
    // The admin listener serves each instance's newest checkpoint once a file is committed
    // (files roll at 4 KiB; a graceful stop commits the rest).
    let mut served = Vec::new();
    for (kg, writer) in instances.iter().zip(["writer-a", "writer-b"]) {
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let (status, body) = get(kg.admin, "/audit/checkpoints").unwrap();
            assert_eq!(status, 200, "{body}");
            let v: serde_json::Value = serde_json::from_str(&body).unwrap();
            if let Some(cp) = v["checkpoints"].as_array().and_then(|a| a.first()) {
                assert_eq!(cp["writer"], writer);
                assert_eq!(cp["table"], "audit");
                let note = cp["checkpoint"].as_str().unwrap().to_owned();
                assert!(note.starts_with(&format!("keygate.test/e2e/audit/{writer}\n")), "{note}");
                served.push(note);
                break;
            }
            assert!(std::time::Instant::now() < deadline, "no checkpoint served by {writer}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    for kg in instances {
        kg.signal("TERM");
        assert_eq!(kg.wait_exit(Duration::from_secs(60)), Some(0));
    }

    let lake = dir.path().join("lake").display().to_string();
    let published = dir.path().join("published").display().to_string();
    let seed = std::fs::read_to_string(dir.path().join("audit-signing-key")).unwrap();
    let public = keygate_auditlog::SigningKey::from_text(&seed).unwrap().verifying_key();
    let public_text = public.to_text();
    let (code, out, err) =
        auditlog(&["verify", "--lake", &lake, "--public-key", &public_text, "--checkpoints", &published], &[]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(!out.contains(" 0 checkpoint(s)"), "{out}");

    let rows = query_lake(Path::new(&lake), "SELECT event_id, writer_id, seq FROM audit ORDER BY writer_id, seq");
    assert_eq!(rows.len(), 24);
    let mut files = Vec::new();
    for (i, row) in rows.iter().enumerate() {
        let id = row["event_id"].as_str().unwrap();
        let (code, proof, err) = auditlog(&["prove", id, "--lake", &lake, "--checkpoints", &published], &[]);
        assert_eq!(code, 0, "prove {id}: {err}");
        let file = dir.path().join(format!("row-{i}.tlog-proof"));
        std::fs::write(&file, &proof).unwrap();
        let f = file.display().to_string();
        let (code, out, err) = auditlog(&["check-proof", &f, "--public-key", &public_text], &[]);
        assert_eq!(code, 0, "check-proof {id}: {err}");
        let checked: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(
            (&checked["event_id"], &checked["writer_id"], &checked["seq"]),
            (&row["event_id"], &row["writer_id"], &row["seq"])
        );
        files.push((file, proof));
    }
    // A changed byte in the header, the row, the path, the checkpoint's root or its signature.
    let (_, proof) = &files[3];
    let root_at = proof.find("\n\n").unwrap() + 2 + proof[proof.find("\n\n").unwrap() + 2..].find('\n').unwrap() + 4;
    let positions = [2, 40, proof.find("index").unwrap() + 20, root_at + 3, proof.len() - 10];
    let bad = dir.path().join("bad.tlog-proof").display().to_string();
    let other = keygate_auditlog::SigningKey::generate().verifying_key().to_text();
    for at in positions {
        std::fs::write(&bad, flip(proof, at)).unwrap();
        let (code, _, err) = auditlog(&["check-proof", &bad, "--public-key", &public_text], &[]);
        assert_eq!(code, 1, "byte {at} flipped still checks: {err}");
    }
    let (code, _, _) = auditlog(&["check-proof", &files[3].0.display().to_string(), "--public-key", &other], &[]);
    assert_eq!(code, 1, "another key does not check");

    // The independent implementation accepts every proof and the served checkpoints…
    let script = dir.path().join("check.py");
    std::fs::write(&script, PYTHON_CHECKER).unwrap();
    let mut args: Vec<String> = vec![script.display().to_string(), public.to_hex()];
    args.extend(files.iter().map(|(f, _)| f.display().to_string()));
    for (i, note) in served.iter().enumerate() {
        let f = dir.path().join(format!("served-{i}.checkpoint"));
        std::fs::write(&f, note).unwrap();
        args.push(f.display().to_string());
    }
    let py = std::process::Command::new(tool("python")).args(&args).output().expect("run the venv's python");
    let out = String::from_utf8_lossy(&py.stdout);
    assert!(py.status.success(), "python: {out}{}", String::from_utf8_lossy(&py.stderr));
    assert_eq!(out.lines().filter(|l| *l == "ok").count(), files.len() + served.len());
    // …and refuses a changed one.
    std::fs::write(&bad, flip(proof, root_at + 3)).unwrap();
    let py = std::process::Command::new(tool("python"))
        .args([script.display().to_string(), public.to_hex(), bad.clone()])
        .output()
        .unwrap();
    assert!(!py.status.success(), "python accepted a changed proof");

    // An insider deletes writer-b's newest file with its manifest and the lake's own checkpoint
    // of it: the lake alone verifies clean, the published checkpoints name what is gone.
    let lake_dir = dir.path().join("lake");
    let mut manifests: Vec<_> =
        std::fs::read_dir(lake_dir.join("manifests/writer-b")).unwrap().map(|e| e.unwrap().path()).collect();
    manifests.sort();
    assert!(manifests.len() >= 2, "several files per writer: {manifests:?}");
    let newest = manifests.last().unwrap();
    let m = keygate_auditlog::manifest::Manifest::parse(&std::fs::read(newest).unwrap()).unwrap();
    let size = m.body.tree.as_ref().unwrap().size;
    let checkpoint = format!("checkpoints/audit/writer-b/{size:020}");
    std::fs::remove_file(lake_dir.join(&m.body.file)).unwrap();
    std::fs::remove_file(newest).unwrap();
    std::fs::remove_file(lake_dir.join(&checkpoint)).unwrap();
    let (code, out, err) = auditlog(&["verify", "--lake", &lake, "--public-key", &public_text], &[]);
    assert_eq!(code, 0, "the lake alone shows no trace: {out}{err}");
    let (code, out, err) =
        auditlog(&["verify", "--lake", &lake, "--public-key", &public_text, "--checkpoints", &published], &[]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        out.lines().any(|l| l.starts_with("MISSING")
            && l.contains(&checkpoint)
            && l.contains(&format!("(seq {})", m.body.first_seq))),
        "names the published checkpoint that proves the rows existed: {out}"
    );
}
