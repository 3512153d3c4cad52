//! Fuzz target for the operation matcher (issue 12): any method and path, never a panic, and a
//! match only for a path in normal form whose literal segments are the template's.
//!
//! Under `cargo test`: the seed corpus, then random inputs for a bounded time
//! (`KEYGATE_FUZZ_SECONDS`, default 3). With nightly: `cargo bolero test -p keygate-policies
//! --test fuzz_match match_target`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::time::Duration;

use keygate_policies::match_operation;

const SEEDS: &[(&str, &str)] = &[
    ("POST", "/v1/refunds"),
    ("POST", "/v1/%72efunds"),
    ("GET", "/v1/customers/search"),
    ("GET", "/v1/customers/%73earch"),
    ("GET", "/v1/customers/cus_1"),
    ("POST", "/v1/customers/cus_1/../refunds"),
    ("post", "/v1/refunds"),
    ("GET", "/v1/customers//"),
    ("GET", ""),
    ("GET", "/"),
    ("DELETE", "/v1/customers/cus_1/sources/card_1"),
    ("GET", "/v1/quotes/qt_1/pdf"),
];

fn fuzz_time() -> Duration {
    std::env::var("KEYGATE_FUZZ_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(3), Duration::from_secs)
}

fn check(method: &str, path: &str) {
    if let Some(op) = match_operation(method, path) {
        assert_eq!(op.method, method);
        let segments: Vec<&str> = path[1..].split('/').collect();
        let template: Vec<&str> = op.template[1..].split('/').collect();
        assert_eq!(segments.len(), template.len(), "{path} matched {}", op.name);
        for (segment, part) in segments.iter().zip(&template) {
            assert!(!segment.is_empty() && *segment != "." && *segment != "..", "{path}");
            if !part.starts_with('{') {
                assert_eq!(segment, part, "{path} matched {}", op.name);
            }
        }
    }
}

#[test]
fn match_target() {
    SEEDS.iter().for_each(|(m, p)| check(m, p));
    bolero::check!().with_test_time(fuzz_time()).for_each(|input: &[u8]| {
        let text = String::from_utf8_lossy(input);
        let (method, path) = text.split_once(' ').unwrap_or(("GET", &text));
        check(method, path);
        for method in ["GET", "POST", "DELETE"] {
            check(method, path);
        }
    });
}
