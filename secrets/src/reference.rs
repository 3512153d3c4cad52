//! Secret references: the one URI form used everywhere keygate names a secret.
//!
//! A reference says *where* a secret lives, never what it is. Its `Display` is the reference text
//! and is safe to log, to put in metrics labels and in audit rows (`key_ref`).
//!
//! Invariants: parsing is total (every input either parses or yields a [`RefError`] that quotes
//! the input and lists the accepted forms), `parse(display(r)) == r` for every reference, and an
//! input that looks like a literal credential (no scheme, `sk_…`, `rk_…`, long opaque text) is
//! never echoed back in the error.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use percent_encoding::{AsciiSet, CONTROLS, percent_decode_str, utf8_percent_encode};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The reference forms keygate accepts, quoted in every parse error.
pub const ACCEPTED_FORMS: &str = "env://VAR, file:///absolute/path, \
     vault://<mount>/<path>#<field>, \
     aws-sm://<secret-id-or-arn>[#<json-field>][?stage=<label>|?version=<id>], \
     vault-transit://<mount>/keys/<name>";

/// Where a secret lives.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum SecretRef {
    /// `env://VAR`: the value of an environment variable of the keygate process.
    Env {
        /// Variable name: `[A-Za-z_][A-Za-z0-9_]*`.
        var: String,
    },
    /// `file:///abs/path`: the contents of a file (one trailing newline is dropped).
    File {
        /// Absolute path.
        path: PathBuf,
    },
    /// `vault://<mount>/<path>#<field>`: a field of a KV version 2 secret in Vault or OpenBao.
    Vault {
        /// The KV v2 mount (one path segment, e.g. `secret`).
        mount: String,
        /// The secret's path under the mount (one or more segments, e.g. `stripe/payments`).
        path: String,
        /// The key inside the secret's data.
        field: String,
    },
    /// `aws-sm://<secret-id-or-arn>[#<json-field>][?stage=…|?version=…]`: an AWS Secrets
    /// Manager secret, the whole string or one field of a JSON object.
    AwsSm {
        /// Secret name or full ARN.
        id: String,
        /// Field of the JSON object the secret string holds; `None` takes the whole string.
        field: Option<String>,
        /// Version stage label (`AWSCURRENT` when neither stage nor version is given).
        stage: Option<String>,
        /// Version id (exclusive with `stage`).
        version: Option<String>,
    },
    /// `vault-transit://<mount>/keys/<name>`: a Vault Transit key. It has no value to fetch;
    /// it only wraps and unwraps data keys ([`crate::SecretStore::transit_encrypt`]).
    VaultTransit {
        /// The Transit mount (one path segment, e.g. `transit`).
        mount: String,
        /// The key name.
        key: String,
    },
}

/// A reference that could not be parsed.
///
/// Display: ``invalid secret reference `…`: <reason>; accepted forms: …``.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid secret reference {shown}: {reason}; accepted forms: {ACCEPTED_FORMS}")]
pub struct RefError {
    /// The input, quoted, or a placeholder when the input looks like a literal secret.
    shown: String,
    /// What is wrong with it.
    reason: String,
}

impl RefError {
    fn new(input: &str, reason: impl Into<String>) -> RefError {
        let shown = if looks_like_literal_secret(input) {
            format!(
                "[{} characters, not shown: this looks like a secret value, not a reference]",
                input.chars().count()
            )
        } else {
            format!("`{input}`")
        };
        RefError { shown, reason: reason.into() }
    }

    /// What is wrong with the reference (without the input).
    pub fn reason(&self) -> &str {
        &self.reason
    }
}

/// True for scheme-less text that may be a credential pasted where a reference belongs.
fn looks_like_literal_secret(input: &str) -> bool {
    if input.contains("://") {
        return false;
    }
    const KEY_PREFIXES: [&str; 6] = ["sk_", "rk_", "pk_", "whsec_", "hvs.", "s."];
    KEY_PREFIXES.iter().any(|p| input.starts_with(p)) || input.len() >= 16
}

/// Characters escaped when a path or id is written back into a reference.
const ESCAPED: &AsciiSet = &CONTROLS.add(b' ').add(b'%').add(b'#').add(b'?');

impl SecretRef {
    /// The scheme, as in metrics labels: `env`, `file`, `vault`, `aws-sm`, `vault-transit`.
    pub fn scheme(&self) -> &'static str {
        match self {
            SecretRef::Env { .. } => "env",
            SecretRef::File { .. } => "file",
            SecretRef::Vault { .. } => "vault",
            SecretRef::AwsSm { .. } => "aws-sm",
            SecretRef::VaultTransit { .. } => "vault-transit",
        }
    }

    /// Whether [`crate::SecretStore::get`] can fetch a value for it (everything but Transit keys).
    pub fn is_fetchable(&self) -> bool {
        !matches!(self, SecretRef::VaultTransit { .. })
    }
}

impl FromStr for SecretRef {
    type Err = RefError;

    fn from_str(input: &str) -> Result<SecretRef, RefError> {
        let Some((scheme, rest)) = input.split_once("://") else {
            return Err(RefError::new(
                input,
                "it has no scheme (`env://`, `file://`, `vault://`, `aws-sm://` or `vault-transit://`)",
            ));
        };
        if input.trim() != input {
            return Err(RefError::new(input, "it has leading or trailing whitespace"));
        }
        match scheme {
            "env" => parse_env(input, rest),
            "file" => parse_file(input, rest),
            "vault" => parse_vault(input, rest),
            "aws-sm" => parse_aws_sm(input, rest),
            "vault-transit" => parse_transit(input, rest),
            other => Err(RefError::new(input, format!("unknown scheme `{other}`"))),
        }
    }
}

fn parse_env(input: &str, rest: &str) -> Result<SecretRef, RefError> {
    if rest.is_empty() {
        return Err(RefError::new(input, "the environment variable name is missing"));
    }
    let mut chars = rest.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if !first_ok || !chars.all(|c| c.is_ascii_alphanumeric() || c == '_') {
        return Err(RefError::new(
            input,
            "an environment variable name has only letters, digits and `_`, and does not start with a digit",
        ));
    }
    Ok(SecretRef::Env { var: rest.to_owned() })
}

fn parse_file(input: &str, rest: &str) -> Result<SecretRef, RefError> {
    if !rest.starts_with('/') {
        return Err(RefError::new(
            input,
            "a file reference needs an absolute path: `file:///etc/keygate/key` (three slashes)",
        ));
    }
    if rest.contains(['#', '?']) {
        return Err(RefError::new(input, "a file path cannot hold `#` or `?` (write them as %23 and %3F)"));
    }
    let decoded = percent_decode_str(rest)
        .decode_utf8()
        .map_err(|_| RefError::new(input, "the percent-encoded path is not valid UTF-8"))?;
    let path = PathBuf::from(decoded.as_ref());
    if path.components().any(|c| matches!(c, std::path::Component::ParentDir)) {
        return Err(RefError::new(input, "the path contains `..`; name the file by its real absolute path"));
    }
    if rest.len() == 1 {
        return Err(RefError::new(input, "the path names a folder, not a file"));
    }
    Ok(SecretRef::File { path })
}

/// Checks one path segment of a Vault mount, path or key name.
fn valid_segment(segment: &str) -> bool {
    !segment.is_empty()
        && segment != "."
        && segment != ".."
        && segment.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@+=:,".contains(c))
}

fn parse_vault(input: &str, rest: &str) -> Result<SecretRef, RefError> {
    if rest.contains('?') {
        return Err(RefError::new(input, "a vault:// reference takes no query (`?…`)"));
    }
    let Some((location, field)) = rest.split_once('#') else {
        return Err(RefError::new(input, "the field is missing: add `#<field>`, the key inside the KV secret"));
    };
    if field.is_empty() {
        return Err(RefError::new(input, "the field after `#` is empty"));
    }
    if field.contains('#') || field.chars().any(char::is_control) {
        return Err(RefError::new(input, "the field contains `#` or a control character"));
    }
    let Some((mount, path)) = location.split_once('/') else {
        return Err(RefError::new(
            input,
            "the secret path is missing: write `vault://<mount>/<path>#<field>`, e.g. `vault://secret/stripe#api_key`",
        ));
    };
    if !valid_segment(mount) {
        return Err(RefError::new(
            input,
            "the mount is empty or has characters other than letters, digits and `-_.@+=:,`",
        ));
    }
    if path.is_empty() || !path.split('/').all(valid_segment) {
        return Err(RefError::new(
            input,
            "the secret path is empty, has an empty segment (`//` or a trailing `/`), `.`/`..`, or characters other than letters, digits and `-_.@+=:,`",
        ));
    }
    if path.starts_with("data/") || path.starts_with("metadata/") {
        return Err(RefError::new(
            input,
            "write the KV path without the API's `data/` prefix: `vault://secret/stripe#api_key`, not `vault://secret/data/stripe#api_key`",
        ));
    }
    Ok(SecretRef::Vault { mount: mount.to_owned(), path: path.to_owned(), field: field.to_owned() })
}

fn parse_transit(input: &str, rest: &str) -> Result<SecretRef, RefError> {
    let segments: Vec<&str> = rest.split('/').collect();
    match segments.as_slice() {
        [mount, "keys", key] if valid_segment(mount) && valid_segment(key) => {
            Ok(SecretRef::VaultTransit { mount: (*mount).to_owned(), key: (*key).to_owned() })
        }
        _ => Err(RefError::new(
            input,
            "write `vault-transit://<mount>/keys/<name>`, e.g. `vault-transit://transit/keys/keygate-audit`",
        )),
    }
}

fn parse_aws_sm(input: &str, rest: &str) -> Result<SecretRef, RefError> {
    // Both `id#field?stage=X` (as the docs show it) and URI order `id?stage=X#field` are accepted.
    let (id_and_query, field) = match rest.split_once('#') {
        Some((before, after)) => match after.split_once('?') {
            Some((field, query)) => (format!("{before}?{query}"), Some(field)),
            None => (before.to_owned(), Some(after)),
        },
        None => (rest.to_owned(), None),
    };
    let (id, query) = match id_and_query.split_once('?') {
        Some((id, query)) => (id, Some(query)),
        None => (id_and_query.as_str(), None),
    };
    if id.is_empty() {
        return Err(RefError::new(input, "the secret name or ARN is missing"));
    }
    if id.chars().any(|c| c.is_whitespace() || c.is_control() || c == '#' || c == '?') {
        return Err(RefError::new(
            input,
            "the secret name or ARN contains whitespace, `#`, `?` or a control character",
        ));
    }
    if id.starts_with("arn:") && id.split(':').count() < 7 {
        return Err(RefError::new(
            input,
            "the ARN is incomplete: arn:aws:secretsmanager:<region>:<account>:secret:<name>",
        ));
    }
    let field = match field {
        Some("") => return Err(RefError::new(input, "the JSON field after `#` is empty")),
        Some(f) if f.contains(['#', '?']) || f.chars().any(char::is_control) => {
            return Err(RefError::new(input, "the JSON field contains `#`, `?` or a control character"));
        }
        Some(f) => Some(f.to_owned()),
        None => None,
    };
    let (mut stage, mut version) = (None, None);
    if let Some(query) = query {
        if query.is_empty() {
            return Err(RefError::new(input, "the query after `?` is empty"));
        }
        for pair in query.split('&') {
            let Some((key, value)) = pair.split_once('=') else {
                return Err(RefError::new(input, format!("query item `{pair}` is not `key=value`")));
            };
            if value.is_empty() || !value.chars().all(|c| c.is_ascii_alphanumeric() || "-_+=,.@".contains(c)) {
                return Err(RefError::new(
                    input,
                    format!("the `{key}` value is empty or has characters other than letters, digits and `-_+=,.@`"),
                ));
            }
            let slot = match key {
                "stage" => &mut stage,
                "version" => &mut version,
                other => {
                    return Err(RefError::new(
                        input,
                        format!("unknown query key `{other}`: only `stage` or `version`"),
                    ));
                }
            };
            if slot.replace(value.to_owned()).is_some() {
                return Err(RefError::new(input, format!("`{key}` is given twice")));
            }
        }
        if stage.is_some() && version.is_some() {
            return Err(RefError::new(input, "give either `?stage=` or `?version=`, not both"));
        }
    }
    Ok(SecretRef::AwsSm { id: id.to_owned(), field, stage, version })
}

impl fmt::Display for SecretRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SecretRef::Env { var } => write!(f, "env://{var}"),
            SecretRef::File { path } => write!(f, "file://{}", encode_path(path)),
            SecretRef::Vault { mount, path, field } => write!(f, "vault://{mount}/{path}#{field}"),
            SecretRef::AwsSm { id, field, stage, version } => {
                write!(f, "aws-sm://{id}")?;
                if let Some(field) = field {
                    write!(f, "#{field}")?;
                }
                if let Some(stage) = stage {
                    write!(f, "?stage={stage}")?;
                }
                if let Some(version) = version {
                    write!(f, "?version={version}")?;
                }
                Ok(())
            }
            SecretRef::VaultTransit { mount, key } => write!(f, "vault-transit://{mount}/keys/{key}"),
        }
    }
}

fn encode_path(path: &Path) -> String {
    utf8_percent_encode(&path.to_string_lossy(), ESCAPED).to_string()
}

impl Serialize for SecretRef {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for SecretRef {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<SecretRef, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]
    use super::*;

    fn ok(text: &str) -> SecretRef {
        text.parse().unwrap_or_else(|e| panic!("{text} should parse: {e}"))
    }

    fn err(text: &str) -> String {
        match text.parse::<SecretRef>() {
            Ok(r) => panic!("{text} should be rejected, parsed as {r:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn parses_every_form() {
        assert_eq!(ok("env://STRIPE_SECRET_KEY"), SecretRef::Env { var: "STRIPE_SECRET_KEY".into() });
        assert_eq!(ok("file:///run/secrets/stripe"), SecretRef::File { path: "/run/secrets/stripe".into() });
        assert_eq!(ok("file:///run/my%20secrets/key"), SecretRef::File { path: "/run/my secrets/key".into() });
        assert_eq!(
            ok("vault://secret/stripe/payments#api_key"),
            SecretRef::Vault { mount: "secret".into(), path: "stripe/payments".into(), field: "api_key".into() }
        );
        assert_eq!(
            ok("aws-sm://prod/stripe"),
            SecretRef::AwsSm { id: "prod/stripe".into(), field: None, stage: None, version: None }
        );
        assert_eq!(
            ok("aws-sm://prod/stripe#api_key?stage=AWSPREVIOUS"),
            SecretRef::AwsSm {
                id: "prod/stripe".into(),
                field: Some("api_key".into()),
                stage: Some("AWSPREVIOUS".into()),
                version: None
            }
        );
        assert_eq!(
            ok("aws-sm://prod/stripe?stage=AWSPREVIOUS#api_key"),
            ok("aws-sm://prod/stripe#api_key?stage=AWSPREVIOUS")
        );
        assert_eq!(
            ok(
                "aws-sm://arn:aws:secretsmanager:eu-west-1:123456789012:secret:stripe-AbCdEf?version=3f1c2d4e-0000-4000-8000-000000000001"
            ),
            SecretRef::AwsSm {
                id: "arn:aws:secretsmanager:eu-west-1:123456789012:secret:stripe-AbCdEf".into(),
                field: None,
                stage: None,
                version: Some("3f1c2d4e-0000-4000-8000-000000000001".into()),
            }
        );
        assert_eq!(
            ok("vault-transit://transit/keys/keygate-audit"),
            SecretRef::VaultTransit { mount: "transit".into(), key: "keygate-audit".into() }
        );
    }

    #[test]
    fn display_round_trips() {
        for text in [
            "env://A_1",
            "file:///etc/keygate/stripe.key",
            "file:///run/my%20secrets/k%23ey",
            "vault://kv/team/stripe#rk",
            "aws-sm://stripe",
            "aws-sm://stripe#key",
            "aws-sm://stripe#key?stage=AWSCURRENT",
            "aws-sm://stripe?version=abc-123",
            "vault-transit://transit/keys/audit",
        ] {
            let parsed = ok(text);
            assert_eq!(parsed.to_string(), text);
            assert_eq!(ok(&parsed.to_string()), parsed);
        }
    }

    #[test]
    fn rejects_every_malformed_form_naming_the_input_and_the_forms() {
        let cases: &[(&str, &str)] = &[
            ("STRIPE_KEY", "no scheme"),
            ("http://vault/secret#x", "unknown scheme `http`"),
            (" env://A", "whitespace"),
            ("env://", "name is missing"),
            ("env://1ABC", "does not start with a digit"),
            ("env://A-B", "only letters"),
            ("file://relative/key", "absolute path"),
            ("file:///", "folder"),
            ("file:///etc/../key", "`..`"),
            ("file:///etc/key#x", "`#`"),
            ("file:///etc/%FF", "UTF-8"),
            ("vault://secret/stripe", "field is missing"),
            ("vault://secret/stripe#", "field after `#` is empty"),
            ("vault://secret#api_key", "secret path is missing"),
            ("vault:///stripe#api_key", "mount is empty"),
            ("vault://secret/#api_key", "secret path is empty"),
            ("vault://secret/a//b#k", "empty segment"),
            ("vault://secret/a/#k", "empty segment"),
            ("vault://secret/../x#k", "`..`"),
            ("vault://secret/data/stripe#k", "without the API's `data/` prefix"),
            ("vault://secret/stripe#k?version=2", "no query"),
            ("vault://secret/stripe#a#b", "field contains `#`"),
            ("aws-sm://", "name or ARN is missing"),
            ("aws-sm://#field", "name or ARN is missing"),
            ("aws-sm://stripe#", "JSON field after `#` is empty"),
            ("aws-sm://stripe?", "query after `?` is empty"),
            ("aws-sm://stripe?stage", "not `key=value`"),
            ("aws-sm://stripe?stage=", "value is empty"),
            ("aws-sm://stripe?label=AWSCURRENT", "unknown query key `label`"),
            ("aws-sm://stripe?stage=A&stage=B", "given twice"),
            ("aws-sm://stripe?stage=AWSCURRENT&version=1", "not both"),
            ("aws-sm://arn:aws:secretsmanager:x", "ARN is incomplete"),
            ("aws-sm://my secret", "whitespace"),
            ("vault-transit://transit/audit", "vault-transit://<mount>/keys/<name>"),
            ("vault-transit://transit/keys/", "vault-transit://<mount>/keys/<name>"),
            ("vault-transit://transit/keys/a/b", "vault-transit://<mount>/keys/<name>"),
        ];
        for (input, reason) in cases {
            let message = err(input);
            assert!(message.contains(reason), "error for {input:?} should say {reason:?}: {message}");
            assert!(message.contains("accepted forms: env://VAR"), "error for {input:?} lists the forms: {message}");
            if input.contains("://") {
                assert!(message.contains(&format!("`{input}`")), "error quotes {input:?}: {message}");
            }
        }
    }

    #[test]
    fn a_literal_key_pasted_as_a_reference_is_not_echoed() {
        let canary = "sk_live_51CanaryDoNotLeak0000000000";
        let message = err(canary);
        assert!(!message.contains(canary), "{message}");
        assert!(!message.contains("CanaryDoNotLeak"), "{message}");
        assert!(message.contains("looks like a secret value"), "{message}");
        // Short scheme-less names are quoted: they are typos, not keys.
        assert!(err("STRIPE").contains("`STRIPE`"));
    }

    #[test]
    fn deserializes_from_a_string_and_reports_the_reference() {
        #[derive(Deserialize)]
        struct Holder {
            key: SecretRef,
        }
        let holder: Holder = serde_json::from_str(r#"{"key":"vault://secret/stripe#api_key"}"#).unwrap();
        assert_eq!(holder.key.scheme(), "vault");
        let bad = serde_json::from_str::<Holder>(r#"{"key":"vault://secret/stripe"}"#).err().unwrap();
        assert!(bad.to_string().contains("`vault://secret/stripe`"), "{bad}");
    }
}
