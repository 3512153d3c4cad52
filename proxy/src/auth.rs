//! Service authentication: keygate service tokens and mTLS identities.
//!
//! A token is `sk_kg_` followed by 43 base64url characters (256 random bits); the `sk_` prefix is
//! there because some SDKs check that a key looks like a Stripe key. Only its hash
//! (`sha256:<hex>`) is ever stored. A presented token is hashed and compared against every known
//! hash with a constant-time comparison and no early exit, so timing reveals nothing about which
//! hash, or which part of one, matched.
//!
//! Invariant: the presented token never leaves this module except as its hash; errors say what
//! kind of credential was wrong, never its value.

use base64::Engine;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use http::HeaderMap;
use http::header::AUTHORIZATION;
use keygate_policies::PolicySet;
use rand::RngCore;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

use crate::error::ProxyError;

/// Prefix of every keygate service token.
pub const TOKEN_PREFIX: &str = "sk_kg_";

/// A freshly minted token and the hash that goes into the service's policy file.
#[derive(Debug)]
pub struct MintedToken {
    /// The token: shown once, never stored by keygate.
    pub token: RedactedToken,
    /// `sha256:<64 hex>`.
    pub hash: String,
}

/// A token held in memory that zeroes itself on drop and does not print itself.
pub struct RedactedToken(Zeroizing<String>);

impl RedactedToken {
    /// Wraps a token read back from where its owner keeps it.
    pub fn from_existing(token: &str) -> RedactedToken {
        RedactedToken(Zeroizing::new(token.to_owned()))
    }

    /// The token text, for the one place that prints it to its owner.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for RedactedToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("RedactedToken([redacted])")
    }
}

/// Mints a new service token from the operating system's random generator.
pub fn mint_token() -> MintedToken {
    let mut random = Zeroizing::new([0u8; 32]);
    rand::rng().fill_bytes(random.as_mut());
    let token = Zeroizing::new(format!("{TOKEN_PREFIX}{}", URL_SAFE_NO_PAD.encode(random.as_ref())));
    let hash = token_hash(&token);
    MintedToken { token: RedactedToken(token), hash }
}

/// The `sha256:<hex>` form of a token, as stored in policy files.
pub fn token_hash(token: &str) -> String {
    format!("sha256:{}", hex::encode(Sha256::digest(token.as_bytes())))
}

/// Parses `sha256:<64 hex>` into its 32 bytes.
pub fn parse_token_hash(text: &str) -> Option<[u8; 32]> {
    let hex_part = text.strip_prefix("sha256:")?;
    let mut out = [0u8; 32];
    hex::decode_to_slice(hex_part, &mut out).ok()?;
    Some(out)
}

/// What the client presented in `Authorization`.
#[derive(Debug, PartialEq, Eq)]
pub enum Credential {
    /// Nothing presented.
    None,
    /// A token (from Bearer, or Basic with the token as user name).
    Token(Zeroizing<String>),
}

/// Reads the credential from the `Authorization` header, the way Stripe's SDKs and `curl -u TOKEN:`
/// send it.
pub fn extract_credential(headers: &HeaderMap) -> Result<Credential, ProxyError> {
    let mut values = headers.get_all(AUTHORIZATION).iter();
    let Some(value) = values.next() else {
        return Ok(Credential::None);
    };
    if values.next().is_some() {
        return Err(ProxyError::InvalidCredentials { detail: "more than one Authorization header" });
    }
    let text = value
        .to_str()
        .map_err(|_| ProxyError::InvalidCredentials { detail: "the Authorization header is not ASCII" })?;
    let (scheme, rest) = text.split_once(' ').unwrap_or((text, ""));
    let rest = rest.trim();
    let token = if scheme.eq_ignore_ascii_case("bearer") {
        Zeroizing::new(rest.to_owned())
    } else if scheme.eq_ignore_ascii_case("basic") {
        let decoded = Zeroizing::new(
            STANDARD
                .decode(rest)
                .map_err(|_| ProxyError::InvalidCredentials { detail: "the Basic credential is not valid base64" })?,
        );
        let decoded = std::str::from_utf8(&decoded)
            .map_err(|_| ProxyError::InvalidCredentials { detail: "the Basic credential is not UTF-8" })?;
        let user = decoded.split_once(':').map_or(decoded, |(user, _)| user);
        Zeroizing::new(user.to_owned())
    } else {
        return Err(ProxyError::InvalidCredentials { detail: "the Authorization scheme is neither Bearer nor Basic" });
    };
    if token.is_empty() {
        return Err(ProxyError::InvalidCredentials { detail: "the token is empty" });
    }
    Ok(Credential::Token(token))
}

/// Maps token hashes to service names, compared in constant time.
#[derive(Debug, Default)]
pub struct TokenIndex {
    entries: Vec<([u8; 32], String)>,
}

impl TokenIndex {
    /// Builds the index from every service's token hashes. Hashes that do not parse are skipped
    /// here because the policy loader has already refused them.
    pub fn from_policies(policies: &PolicySet) -> TokenIndex {
        let entries = policies
            .services()
            .flat_map(|service| {
                service
                    .token_hashes
                    .iter()
                    .filter_map(|hash| parse_token_hash(hash))
                    .map(|hash| (hash, service.name.clone()))
            })
            .collect();
        TokenIndex { entries }
    }

    /// The service a token belongs to. Hashes the token, then compares against every entry.
    pub fn lookup(&self, token: &str) -> Option<&str> {
        let presented: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found: Option<&str> = None;
        for (hash, service) in &self.entries {
            // No early exit: every entry is compared whatever matched before.
            if bool::from(hash.ct_eq(&presented)) {
                found = Some(service.as_str());
            }
        }
        found
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    fn headers_with(value: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap_or(HeaderValue::from_static("x")));
        headers
    }

    #[test]
    fn minted_tokens_look_like_stripe_keys_and_hash_to_their_hash() {
        let minted = mint_token();
        assert!(minted.token.expose().starts_with("sk_kg_"));
        assert_eq!(minted.token.expose().len(), 6 + 43);
        assert_eq!(token_hash(minted.token.expose()), minted.hash);
        assert!(parse_token_hash(&minted.hash).is_some());
        assert!(!format!("{minted:?}").contains(minted.token.expose()));
        assert_ne!(mint_token().hash, minted.hash);
    }

    #[test]
    fn reads_bearer_and_basic_like_the_sdks_and_curl() {
        let bearer = extract_credential(&headers_with("Bearer sk_kg_abc")).ok();
        assert_eq!(bearer, Some(Credential::Token(Zeroizing::new("sk_kg_abc".into()))));
        // curl -u sk_kg_abc:  →  base64("sk_kg_abc:")
        let basic = extract_credential(&headers_with(&format!("Basic {}", STANDARD.encode("sk_kg_abc:")))).ok();
        assert_eq!(basic, Some(Credential::Token(Zeroizing::new("sk_kg_abc".into()))));
        assert_eq!(extract_credential(&HeaderMap::new()).ok(), Some(Credential::None));
    }

    #[test]
    fn malformed_credentials_are_refused_without_echoing_them() {
        for value in ["Bearer ", "Basic !!!notbase64", "Digest abc", "Basic "] {
            let error = extract_credential(&headers_with(value)).err();
            let Some(error) = error else { panic!("{value:?} was accepted") };
            assert_eq!(error.code(), "keygate_invalid_credentials", "{value:?}");
            assert!(!error.to_string().contains("notbase64"));
        }
    }

    #[test]
    fn token_index_finds_the_service_and_nothing_else() {
        let a = mint_token();
        let b = mint_token();
        let index = TokenIndex {
            entries: vec![
                (parse_token_hash(&a.hash).unwrap_or_default(), "checkout".into()),
                (parse_token_hash(&b.hash).unwrap_or_default(), "support".into()),
            ],
        };
        assert_eq!(index.lookup(a.token.expose()), Some("checkout"));
        assert_eq!(index.lookup(b.token.expose()), Some("support"));
        assert_eq!(index.lookup("sk_kg_unknown"), None);
    }
}
