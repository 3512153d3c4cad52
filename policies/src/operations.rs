//! The Stripe operation table and the request → operation matcher.
//!
//! The table is `data/operations.txt` (facts from Stripe's public API description), embedded in
//! the binary and parsed once. Every `Operation` borrows from that embedded text, so a match
//! returns `&'static` data and the hot path allocates nothing.
//!
//! Invariants:
//! - Matching is per method and segment by segment; a literal segment beats a parameter
//!   (`GET /v1/customers/search` is not `GET /v1/customers/{customer}`), with backtracking when
//!   the literal branch leads nowhere.
//! - A path that is not in normal form (no leading `/`, empty segments, `.`/`..` segments, or
//!   percent-encoded `/` or `.`) matches no operation: upstream servers may normalise such paths
//!   into something else than what was checked.

use std::sync::LazyLock;

/// The embedded operation list, one `METHOD /path/{param}` per line; `#` starts a comment.
const OPERATIONS_TXT: &str = include_str!("../data/operations.txt");

/// One Stripe API operation from the table.
#[derive(Debug, PartialEq, Eq, Hash)]
pub struct Operation {
    /// HTTP method, upper case: `POST`.
    pub method: &'static str,
    /// Path template with `{param}` segments: `/v1/customers/{customer}`.
    pub template: &'static str,
    /// `METHOD template`, the `operation` in logs, metrics and audit rows:
    /// `GET /v1/customers/{customer}`.
    pub name: &'static str,
    /// Position in [`operations()`]; used to index per-operation rule lists.
    pub(crate) id: usize,
}

impl Operation {
    /// Position of this operation in [`operations()`] (stable for one build of keygate).
    pub fn index(&self) -> usize {
        self.id
    }

    /// The template's segments, without the leading empty one.
    pub(crate) fn segments(&self) -> impl Iterator<Item = TemplateSegment<'static>> + '_ {
        self.template[1..].split('/').map(TemplateSegment::parse)
    }
}

/// One segment of a template: a literal or a `{parameter}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TemplateSegment<'a> {
    Literal(&'a str),
    Param(&'a str),
}

impl<'a> TemplateSegment<'a> {
    pub(crate) fn parse(segment: &'a str) -> Self {
        match segment.strip_prefix('{').and_then(|s| s.strip_suffix('}')) {
            Some(name) => TemplateSegment::Param(name),
            None => TemplateSegment::Literal(segment),
        }
    }
}

/// All operations of the table, in file order.
pub fn operations() -> &'static [Operation] {
    &TABLE.operations
}

/// The operation a request is for, or `None` when the table has no such operation (or the path
/// is not in normal form, see the module documentation).
///
/// `path` excludes the query string. Allocation-free.
pub fn match_operation(method: &str, path: &str) -> Option<&'static Operation> {
    let table = &*TABLE;
    let rest = path.strip_prefix('/')?;
    if !is_normal_path(rest) {
        return None;
    }
    table.root.find(method, rest).map(|id| &table.operations[id])
}

/// The operation with exactly this `METHOD template` name, if the table has it.
pub fn operation_by_name(name: &str) -> Option<&'static Operation> {
    operations().iter().find(|op| op.name == name)
}

/// `rest` is the path after its leading `/`. Normal form: non-empty segments, none of them `.`
/// or `..`, and no percent-encoded `/`, `\` or `.` that a server could decode into structure.
pub(crate) fn is_normal_path(rest: &str) -> bool {
    let bytes = rest.as_bytes();
    let mut segment_start = 0;
    for i in 0..=bytes.len() {
        match bytes.get(i) {
            None | Some(b'/') => {
                if matches!(&bytes[segment_start..i], b"" | b"." | b"..") {
                    return false;
                }
                segment_start = i + 1;
            }
            Some(b'\\') => return false,
            Some(b'%') if is_encoded_separator(bytes.get(i + 1..i + 3)) => return false,
            Some(_) => {}
        }
    }
    true
}

/// `%2F` (`/`), `%2E` (`.`) or `%5C` (`\`), any case.
fn is_encoded_separator(hex: Option<&[u8]>) -> bool {
    match hex {
        Some([hi, lo]) => matches!((hi, lo.to_ascii_uppercase()), (b'2', b'F') | (b'2', b'E') | (b'5', b'C')),
        _ => false,
    }
}

struct Table {
    operations: Vec<Operation>,
    root: Node,
}

/// A segment trie. Literal children are sorted for binary search; `ops` holds, per method, the
/// operation whose template ends at this node.
#[derive(Default)]
struct Node {
    literals: Vec<(&'static str, Node)>,
    param: Option<Box<Node>>,
    ops: Vec<(&'static str, usize)>,
}

impl Node {
    fn insert(&mut self, op: &Operation) {
        let mut node = self;
        for segment in op.segments() {
            node = match segment {
                TemplateSegment::Param(_) => node.param.get_or_insert_with(Box::default),
                TemplateSegment::Literal(lit) => {
                    let at = match node.literals.binary_search_by(|(l, _)| l.cmp(&lit)) {
                        Ok(at) => at,
                        Err(at) => {
                            node.literals.insert(at, (lit, Node::default()));
                            at
                        }
                    };
                    &mut node.literals[at].1
                }
            };
        }
        node.ops.push((op.method, op.id));
    }

    /// `rest` is what remains of the path after the segments already matched, without its
    /// leading `/`; empty when every segment has been consumed.
    fn find(&self, method: &str, rest: &str) -> Option<usize> {
        if rest.is_empty() {
            return self.ops.iter().find(|(m, _)| *m == method).map(|(_, id)| *id);
        }
        let (segment, tail) = match rest.bytes().position(|b| b == b'/') {
            Some(at) => (&rest[..at], &rest[at + 1..]),
            None => (rest, ""),
        };
        if let Ok(at) = self.literals.binary_search_by(|(l, _)| (*l).cmp(segment))
            && let Some(id) = self.literals[at].1.find(method, tail)
        {
            return Some(id);
        }
        self.param.as_ref()?.find(method, tail)
    }
}

static TABLE: LazyLock<Table> = LazyLock::new(|| {
    let operations: Vec<Operation> = OPERATIONS_TXT
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty() && !line.starts_with('#'))
        .filter_map(|line| {
            let (method, template) = line.split_once(' ')?;
            template.starts_with('/').then_some((line, method, template))
        })
        .enumerate()
        .map(|(id, (name, method, template))| Operation { method, template, name, id })
        .collect();
    let mut root = Node::default();
    for op in &operations {
        root.insert(op);
    }
    Table { operations, root }
});

#[cfg(test)]
mod tests {
    use super::*;

    fn name(method: &str, path: &str) -> Option<&'static str> {
        match_operation(method, path).map(|op| op.name)
    }

    #[test]
    fn table_is_parsed_completely() {
        let lines = OPERATIONS_TXT.lines().filter(|l| !l.trim().is_empty() && !l.starts_with('#')).count();
        assert_eq!(operations().len(), lines);
        assert!(operations().len() > 500);
    }

    #[test]
    fn literal_beats_parameter() {
        assert_eq!(name("GET", "/v1/customers/search"), Some("GET /v1/customers/search"));
        assert_eq!(name("GET", "/v1/customers/cus_123"), Some("GET /v1/customers/{customer}"));
        assert_eq!(name("POST", "/v1/payment_intents"), Some("POST /v1/payment_intents"));
    }

    #[test]
    fn method_matters() {
        assert_eq!(name("PUT", "/v1/payment_intents"), None);
        assert_eq!(name("post", "/v1/payment_intents"), None);
    }

    #[test]
    fn abnormal_paths_match_nothing() {
        for path in [
            "",
            "v1/customers",
            "/v1/customers/",
            "//v1/customers",
            "/v1/customers/./x",
            "/v1/customers/..",
            "/v1/customers/a%2Fb",
            "/v1/customers/%2e%2e",
        ] {
            assert_eq!(name("GET", path), None, "{path}");
        }
    }
}
