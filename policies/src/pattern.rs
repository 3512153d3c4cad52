//! Operation patterns in rules: `POST /v1/payment_intents`, `GET /v1/customers/*`, `* /v1/**`.
//!
//! A pattern is matched twice: at load time against every template of the operation table (to
//! build each service's per-operation rule index), and at decision time against the real path
//! when the load-time answer depends on it (a literal in the pattern where the template has a
//! parameter, e.g. `GET /v1/accounts/acct_123`), or when the request matched no operation.
//!
//! Segments: a literal matches the same literal; `{name}` matches one template parameter (any
//! non-empty segment of an unknown path); `*` matches any one segment; `**`, last only, matches
//! zero or more segments.

use crate::operations::{Operation, TemplateSegment};

/// One segment of an operation pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PatternSegment {
    /// Matches exactly this text.
    Literal(String),
    /// `{name}`: a template parameter.
    Param,
    /// `*`: any one segment.
    Any,
    /// `**`: the rest of the path, zero or more segments.
    Rest,
}

/// A parsed `METHOD /path` pattern.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OperationPattern {
    /// `None` for `*` (any method).
    pub method: Option<String>,
    /// Path segments after the leading `/`.
    pub segments: Vec<PatternSegment>,
    /// The pattern as written.
    pub text: String,
}

/// Does a pattern match a template, and is that answer final?
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum TemplateMatch {
    No,
    Yes,
    /// Matches only if the request path has the pattern's literal where the template has a
    /// parameter.
    DependsOnPath,
}

impl OperationPattern {
    /// Parses `METHOD /path`; the error says what is wrong and how to write it.
    pub fn parse(text: &str) -> Result<OperationPattern, String> {
        let trimmed = text.trim();
        let Some((method, path)) = trimmed.split_once(' ') else {
            return Err(format!(
                "operation `{trimmed}` has no method (write it as `METHOD /path`, for example `POST /v1/payment_intents`, or `* /v1/**` for any method)"
            ));
        };
        let path = path.trim();
        let method = match method {
            "*" => None,
            m if !m.is_empty() && m.bytes().all(|b| b.is_ascii_uppercase()) => Some(m.to_owned()),
            m => {
                return Err(format!(
                    "operation `{trimmed}` has method `{m}` (use an upper-case HTTP method such as GET, POST or DELETE, or `*` for any method)"
                ));
            }
        };
        let Some(rest) = path.strip_prefix('/') else {
            return Err(format!(
                "operation `{trimmed}` has a path that does not start with `/` (write it as `METHOD /v1/...`)"
            ));
        };
        if rest.is_empty() {
            return Err(format!("operation `{trimmed}` has an empty path (write `/**` to match every path)"));
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let mut segments = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let segment = match *part {
                "" => {
                    return Err(format!(
                        "operation `{trimmed}` has an empty path segment (remove the doubled or trailing `/`)"
                    ));
                }
                "**" if i + 1 == parts.len() => PatternSegment::Rest,
                "**" => {
                    return Err(format!(
                        "operation `{trimmed}` uses `**` before the end (`**` matches the rest of the path and must be the last segment; use `*` for one segment)"
                    ));
                }
                "*" => PatternSegment::Any,
                p if p.starts_with('{') && p.ends_with('}') && p.len() > 2 => PatternSegment::Param,
                p if p.contains('*') || p.contains('{') || p.contains('}') => {
                    return Err(format!(
                        "operation `{trimmed}` has segment `{p}` mixing text with `*` or braces (a segment is literal text, `{{name}}`, `*` or `**`)"
                    ));
                }
                p => PatternSegment::Literal(p.to_owned()),
            };
            segments.push(segment);
        }
        Ok(OperationPattern { method, segments, text: trimmed.to_owned() })
    }

    /// The pattern that matches every method and path.
    pub(crate) fn everything() -> OperationPattern {
        OperationPattern { method: None, segments: vec![PatternSegment::Rest], text: "* /**".to_owned() }
    }

    pub(crate) fn method_matches(&self, method: &str) -> bool {
        self.method.as_deref().is_none_or(|m| m == method)
    }

    /// True when the pattern names one exact template, no wildcards.
    pub fn is_exact(&self) -> bool {
        self.method.is_some()
            && self.segments.iter().all(|s| matches!(s, PatternSegment::Literal(_) | PatternSegment::Param))
    }

    pub(crate) fn match_template(&self, op: &Operation) -> TemplateMatch {
        if !self.method_matches(op.method) {
            return TemplateMatch::No;
        }
        let mut result = TemplateMatch::Yes;
        let mut template = op.segments();
        for pattern_segment in &self.segments {
            if *pattern_segment == PatternSegment::Rest {
                return result;
            }
            let Some(template_segment) = template.next() else {
                return TemplateMatch::No;
            };
            match (pattern_segment, template_segment) {
                (PatternSegment::Any, _) => {}
                (PatternSegment::Param, TemplateSegment::Param(_)) => {}
                (PatternSegment::Param, TemplateSegment::Literal(_)) => return TemplateMatch::No,
                (PatternSegment::Literal(p), TemplateSegment::Literal(t)) if p == t => {}
                (PatternSegment::Literal(_), TemplateSegment::Literal(_)) => {
                    return TemplateMatch::No;
                }
                (PatternSegment::Literal(_), TemplateSegment::Param(_)) => {
                    result = TemplateMatch::DependsOnPath;
                }
                (PatternSegment::Rest, _) => return result,
            }
        }
        if template.next().is_some() { TemplateMatch::No } else { result }
    }

    /// Matches the request itself. `path` must be in normal form (see
    /// [`crate::operations::is_normal_path`]) for this to be meaningful.
    pub fn match_request(&self, method: &str, path: &str) -> bool {
        if !self.method_matches(method) {
            return false;
        }
        let Some(rest) = path.strip_prefix('/') else {
            return false;
        };
        let mut actual = rest.split('/');
        for pattern_segment in &self.segments {
            if *pattern_segment == PatternSegment::Rest {
                return true;
            }
            let Some(segment) = actual.next() else {
                return false;
            };
            match pattern_segment {
                PatternSegment::Literal(l) if l != segment => return false,
                _ if segment.is_empty() => return false,
                _ => {}
            }
        }
        actual.next().is_none()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::operations::operation_by_name;

    fn op(name: &str) -> &'static Operation {
        operation_by_name(name).unwrap_or_else(|| panic!("{name} not in table"))
    }

    fn pat(text: &str) -> OperationPattern {
        OperationPattern::parse(text).unwrap_or_else(|e| panic!("{e}"))
    }

    #[test]
    fn exact_and_wildcards() {
        let intents = op("POST /v1/payment_intents");
        assert_eq!(pat("POST /v1/payment_intents").match_template(intents), TemplateMatch::Yes);
        assert_eq!(pat("GET /v1/payment_intents").match_template(intents), TemplateMatch::No);
        assert_eq!(pat("* /v1/**").match_template(intents), TemplateMatch::Yes);
        assert_eq!(pat("POST /v1/*").match_template(intents), TemplateMatch::Yes);
        assert_eq!(pat("POST /v1/payment_intents/**").match_template(intents), TemplateMatch::Yes);
        let customer = op("GET /v1/customers/{customer}");
        assert_eq!(pat("GET /v1/customers/{id}").match_template(customer), TemplateMatch::Yes);
        assert_eq!(pat("GET /v1/customers/search").match_template(customer), TemplateMatch::DependsOnPath);
        assert_eq!(pat("GET /v1/customers/{id}").match_template(op("GET /v1/customers/search")), TemplateMatch::No);
    }

    #[test]
    fn bad_patterns_are_explained() {
        for bad in [
            "/v1/customers",
            "get /v1/customers",
            "GET v1/customers",
            "GET /v1//customers",
            "GET /v1/**/x",
            "GET /v1/cus*",
            "GET /",
        ] {
            assert!(OperationPattern::parse(bad).is_err(), "{bad}");
        }
    }
}
