//! Properties: the loader and the parameter parsers never panic on any input, and the operation
//! matcher agrees with a naive reference matcher.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::Path;
use std::sync::LazyLock;

use keygate_policies::params::RequestParams;
use keygate_policies::{
    Operation, OperationPattern, PolicyEngine, PolicySet, RequestFacts, match_operation, operations, parse_policy_text,
};
use proptest::prelude::*;

static GOOD_TEXTS: LazyLock<Vec<String>> = LazyLock::new(|| {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good");
    let mut texts: Vec<String> =
        std::fs::read_dir(dir).unwrap().map(|e| std::fs::read_to_string(e.unwrap().path()).unwrap()).collect();
    texts.sort();
    texts
});

/// Policy-ish YAML: a good fixture with random edits (bytes replaced, lines dropped or
/// duplicated, cut short), so the fuzzing reaches validation, not only the YAML parser.
fn mutated_policy() -> impl Strategy<Value = String> {
    let edits = prop::collection::vec((any::<prop::sample::Index>(), 0u8..4, any::<char>()), 0..6);
    (any::<prop::sample::Index>(), edits, any::<prop::sample::Index>()).prop_map(|(which, edits, cut)| {
        let mut text = which.get(&GOOD_TEXTS).clone();
        for (at, kind, c) in edits {
            let lines: Vec<&str> = text.lines().collect();
            if lines.is_empty() {
                break;
            }
            let i = at.index(lines.len());
            let mut out: Vec<String> = lines.iter().map(|l| l.to_string()).collect();
            match kind {
                0 => {
                    out.remove(i);
                }
                1 => out.insert(i, lines[i].to_owned()),
                2 => {
                    let line = &mut out[i];
                    let pos =
                        line.char_indices().map(|(p, _)| p).nth(at.index(line.chars().count().max(1))).unwrap_or(0);
                    line.insert(pos, c);
                }
                _ => out[i] = out[i].replace(':', " "),
            }
            text = out.join("\n");
        }
        let keep = cut.index(text.len() + 1);
        let mut end = keep;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        if end * 4 < text.len() { text } else { text[..end].to_owned() }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    #[test]
    fn loader_never_panics_on_arbitrary_text(text in any::<String>()) {
        let _ = parse_policy_text("fuzz.yaml", &text);
    }

    #[test]
    fn loader_never_panics_on_yaml_like_text(text in "[a-z_:\\[\\]{}*&!|>#'\" \n,-]{0,200}") {
        let _ = parse_policy_text("fuzz.yaml", &text);
    }

    #[test]
    fn loader_never_panics_on_mutated_policies(text in mutated_policy()) {
        match parse_policy_text("fuzz.yaml", &text) {
            Ok(policy) => prop_assert!(!policy.name.is_empty()),
            Err(e) => {
                // Every problem names the file and says what to do.
                for p in &e.problems {
                    prop_assert_eq!(&p.file, "fuzz.yaml");
                    prop_assert!(p.message.ends_with(')'), "{}", p.message);
                }
            }
        }
    }

    #[test]
    fn form_parser_never_panics(bytes in any::<Vec<u8>>()) {
        let params = RequestParams::parse_form(&bytes);
        let _ = (params.amount(), params.currency(), params.iter().count());
    }

    #[test]
    fn form_parser_never_panics_on_form_like_bytes(body in "[a-z0-9\\[\\]%=&+.]{0,120}") {
        let params = RequestParams::parse_form(body.as_bytes());
        let _ = (params.amount(), params.currency(), params.has_under("a"));
    }

    #[test]
    fn body_parser_never_panics(
        bytes in any::<Vec<u8>>(),
        content_type in prop::option::of("(application/json|application/x-www-form-urlencoded|text/plain|application/[a-z+]{0,10})(; charset=utf-8)?"),
        v2 in any::<bool>(),
        query in prop::option::of(".{0,40}"),
    ) {
        let path = if v2 { "/v2/core/accounts" } else { "/v1/customers" };
        let params = RequestParams::parse(path, query.as_deref(), content_type.as_deref(), &bytes);
        let _ = (params.amount(), params.currency(), params.is_unreadable());
    }

    #[test]
    fn form_values_round_trip(pairs in prop::collection::vec(("[a-z_]{1,8}(\\[[a-z_]{1,6}\\]){0,2}", ".{0,20}"), 0..8)) {
        use percent_encoding::{NON_ALPHANUMERIC, utf8_percent_encode};
        let body = pairs
            .iter()
            .map(|(k, v)| format!("{}={}", utf8_percent_encode(k, NON_ALPHANUMERIC), utf8_percent_encode(v, NON_ALPHANUMERIC)))
            .collect::<Vec<_>>()
            .join("&");
        let params = RequestParams::parse_form(body.as_bytes());
        prop_assert!(!params.is_unreadable());
        let parsed: Vec<(String, String)> = params.iter().map(|(k, v)| (k.to_owned(), v.to_owned())).collect();
        prop_assert_eq!(parsed, pairs);
    }

    #[test]
    fn decide_never_panics_on_arbitrary_requests(
        method in "(GET|POST|DELETE|PUT|[A-Za-z]{0,6})",
        path in "(/v[12]/[a-z_/{}.%0-9]{0,40}|[a-z/.]{0,10})",
        query in prop::option::of(".{0,30}"),
        body in any::<Vec<u8>>(),
        account in prop::option::of("acct_[A-Za-z0-9]{0,5}"),
    ) {
        let facts = RequestFacts {
            method: &method,
            path: &path,
            query: query.as_deref(),
            content_type: None,
            body: &body,
            stripe_account: account.as_deref(),
            stripe_context: None,
            idempotency_key: None,
            livemode: false,
        };
        for service in ["checkout", "support-tool", "marketplace", "analytics"] {
            let d = ENGINE.decide(service, &facts);
            prop_assert!(!d.rule.is_empty());
        }
    }

    #[test]
    fn pattern_parser_never_panics(text in ".{0,60}") {
        let _ = OperationPattern::parse(&text);
    }

    #[test]
    fn matcher_agrees_with_reference(path in request_path(), method in "(GET|POST|DELETE)") {
        let fast = match_operation(&method, &path).map(|op| op.name);
        let slow = reference_match(&method, &path).map(|op| op.name);
        prop_assert_eq!(fast, slow, "{} {}", method, path);
    }
}

static ENGINE: LazyLock<PolicyEngine> = LazyLock::new(|| {
    PolicyEngine::new(PolicySet::load_dir(&Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/good")).unwrap())
});

/// Words that appear as literal segments in the table, so generated ids collide with them.
static LITERALS: LazyLock<Vec<&'static str>> = LazyLock::new(|| {
    let mut words: Vec<&'static str> =
        operations().iter().flat_map(|op| op.template[1..].split('/')).filter(|s| !s.starts_with('{')).collect();
    words.sort();
    words.dedup();
    words
});

/// Paths built from table templates: parameters replaced by ids or by literal words, then
/// sometimes a segment dropped, added or changed.
fn request_path() -> impl Strategy<Value = String> {
    let segment_choice = prop::collection::vec((any::<prop::sample::Index>(), 0u8..4), 0..8);
    (any::<prop::sample::Index>(), segment_choice, 0u8..6, any::<prop::sample::Index>()).prop_map(
        |(op, choices, tweak, extra)| {
            let template = op.get(operations()).template;
            let mut choices = choices.into_iter();
            let mut segments: Vec<String> = template[1..]
                .split('/')
                .map(|s| {
                    if s.starts_with('{') {
                        match choices.next() {
                            Some((i, 0)) => i.get(&LITERALS).to_string(),
                            Some((i, _)) => format!("id_{}", i.index(1000)),
                            None => "cus_123".to_owned(),
                        }
                    } else {
                        s.to_owned()
                    }
                })
                .collect();
            match tweak {
                0 => {
                    segments.pop();
                }
                1 => segments.push(extra.get(&LITERALS).to_string()),
                2 => segments.push("x_1".to_owned()),
                3 => {
                    let i = extra.index(segments.len());
                    segments[i] = extra.get(&LITERALS).to_string();
                }
                _ => {}
            }
            format!("/{}", segments.join("/"))
        },
    )
}

/// Naive: every operation of the method whose template matches segment by segment; the most
/// specific wins, comparing segment by segment with literal beating parameter.
fn reference_match(method: &str, path: &str) -> Option<&'static Operation> {
    let segments: Vec<&str> = path.strip_prefix('/')?.split('/').collect();
    if segments.iter().any(|s| s.is_empty() || *s == "." || *s == "..") {
        return None;
    }
    let matching = operations().iter().filter(|op| {
        let template: Vec<&str> = op.template[1..].split('/').collect();
        op.method == method
            && template.len() == segments.len()
            && template.iter().zip(&segments).all(|(t, s)| t.starts_with('{') || t == s)
    });
    // Sort key: for each segment, 0 for literal, 1 for parameter; smallest wins.
    matching.min_by_key(|op| op.template[1..].split('/').map(|t| u8::from(t.starts_with('{'))).collect::<Vec<_>>())
}
