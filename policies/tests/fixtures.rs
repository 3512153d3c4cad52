//! The fixture policies: the good ones (quoted by docs/policies.md) load cleanly, lint cleanly
//! and pass their own test cases; every broken one is refused with exactly the expected text.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use keygate_policies::{PolicySet, check, run_tests};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

#[test]
fn good_policies_load_and_have_no_warnings() {
    let dir = fixtures().join("good");
    let set = PolicySet::load_dir(&dir).unwrap_or_else(|e| panic!("good fixtures must load:\n{e}"));
    let mut names: Vec<&str> = set.services().map(|s| s.name.as_str()).collect();
    names.sort();
    assert_eq!(names, ["analytics", "checkout", "marketplace", "support-tool"]);

    let report = check(&dir);
    assert!(!report.has_errors(), "{report}");
    assert!(report.warnings.is_empty(), "{report}");
    assert!(report.to_string().starts_with("policies valid: 4 service(s)"), "{report}");
}

#[test]
fn good_policies_pass_their_own_test_cases() {
    let dir = fixtures().join("good");
    let report = run_tests(&dir);
    assert!(!report.failed(), "{report}");
    // Every case written in the test files ran.
    let written: usize = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().ends_with(".tests.yaml"))
        .map(|p| std::fs::read_to_string(p).unwrap().matches("\n  - name:").count())
        .sum();
    assert!(written >= 30, "only {written} cases found");
    assert_eq!(report.cases.len(), written);
    assert!(report.to_string().ends_with(&format!("{written} case(s): {written} passed, 0 failed")));
}

#[test]
fn broken_policies_are_refused_with_the_expected_errors() {
    let broken = fixtures().join("broken");
    let mut cases: Vec<PathBuf> =
        std::fs::read_dir(&broken).unwrap().map(|e| e.unwrap().path()).filter(|p| p.is_dir()).collect();
    cases.sort();
    assert!(cases.len() >= 20, "expected the whole table of broken fixtures, found {}", cases.len());
    for dir in cases {
        let expected = std::fs::read_to_string(dir.join("expected.txt"))
            .unwrap_or_else(|e| panic!("{}: expected.txt missing: {e}", dir.display()))
            .replace("{dir}", &dir.display().to_string());
        let err = match PolicySet::load_dir(&dir) {
            Ok(_) => panic!("{} loaded but must be refused", dir.display()),
            Err(err) => err,
        };
        assert_eq!(err.to_string(), expected.trim_end(), "{}", dir.display());
        // `check` reports the same problems as errors.
        let report = check(&dir);
        assert!(report.has_errors(), "{}", dir.display());
        assert_eq!(report.errors, err.problems, "{}", dir.display());
        // Every problem says where and what to do.
        for problem in &err.problems {
            let text = problem.to_string();
            assert!(text.ends_with(')'), "no advice in: {text}");
        }
    }
}

#[test]
fn invalid_utf8_and_hidden_and_test_files() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("bad.yaml"), b"service: \xff\xfe\n").unwrap();
    // Hidden files (editor swap files, ConfigMap links) and test files are not policies.
    std::fs::write(dir.path().join(".checkout.yaml"), b"not: [valid").unwrap();
    std::fs::write(dir.path().join("checkout.tests.yaml"), b"cases: []").unwrap();
    let err = PolicySet::load_dir(dir.path()).unwrap_err();
    assert_eq!(err.to_string(), "bad.yaml: file is not UTF-8 text (invalid byte at offset 9; save it as UTF-8)");
}

#[test]
fn a_missing_folder_is_one_clear_problem() {
    let dir = fixtures().join("does-not-exist");
    let err = PolicySet::load_dir(&dir).unwrap_err();
    assert_eq!(err.problems.len(), 1);
    let text = err.to_string();
    assert!(text.starts_with(&format!("{}: cannot read the policy folder:", dir.display())), "{text}");
    assert!(text.ends_with("(check the path and its permissions)"), "{text}");
}
