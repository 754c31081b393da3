//! Who is asking the read API. Two kinds of credential, both sent as
//! `Authorization: Bearer <token>`:
//!
//! - **API keys** ([`keys`]), for services: `cqrs_` and 64 hex digits of randomness, stored as
//!   SHA-256 hashes in a file that is read again when it changes.
//! - **JWTs** ([`jwt`]), for end users: HS256, RS256 or ES256, verified by the `jsonwebtoken`
//!   crate, with a claim listing the projections the token may read.
//!
//! Nothing here logs a token or a key.

pub mod jwt;
pub mod keys;

use std::sync::Arc;

use serde_json::{Map, Value};

use super::access::Projections;
use crate::config::Config;
use jwt::{JwtRules, JwtVerifier};
use keys::{KeyStore, KEY_PREFIX};

/// Who a request comes from.
#[derive(Clone, Debug)]
pub enum Caller {
    /// The read API runs without authentication (`--read-auth none`).
    Anyone,
    /// An API key: a service, which reads every row of its projections.
    Service { name: String, projections: Projections },
    /// A JWT: an end user, whose rows may be restricted to their own (row ownership).
    User {
        claims: Arc<Map<String, Value>>,
        projections: Projections,
    },
}

impl Caller {
    pub fn projections(&self) -> Projections {
        match self {
            Caller::Anyone => Projections::All,
            Caller::Service { projections, .. } | Caller::User { projections, .. } => projections.clone(),
        }
    }

    /// Who it is, for bounding what one caller may hold at once (its read-your-writes waits):
    /// the key's name, or the token's subject.
    pub fn identity(&self) -> String {
        match self {
            Caller::Anyone => String::new(),
            Caller::Service { name, .. } => format!("key:{name}"),
            Caller::User { claims, .. } => format!(
                "sub:{}",
                claims.get("sub").map(Value::to_string).unwrap_or_default()
            ),
        }
    }
}

/// Why credentials were refused (a metric label each; the 401's `WWW-Authenticate` says
/// `invalid_request` or `invalid_token`, and never which check failed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    Missing,
    Malformed,
    UnknownKey,
    BadSignature,
    Expired,
    NotYetValid,
    WrongAudience,
    WrongIssuer,
    UnsupportedAlgorithm,
    InvalidToken,
}

impl Denial {
    pub const LABELS: [&'static str; 10] = [
        "missing_credentials",
        "malformed_credentials",
        "unknown_key",
        "bad_signature",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "unsupported_algorithm",
        "invalid_token",
    ];

    pub fn label(self) -> &'static str {
        Self::LABELS[self as usize]
    }

    /// The `error` of the `WWW-Authenticate: Bearer` challenge (RFC 6750).
    pub fn challenge(self) -> &'static str {
        match self {
            Denial::Missing => "",
            Denial::Malformed => "invalid_request",
            _ => "invalid_token",
        }
    }
}

/// Why the read API's authentication cannot be set up from the settings.
#[derive(Debug, thiserror::Error)]
pub enum AuthSetupError {
    #[error("--read-auth: unknown method {0:?} (keys, jwt, none)")]
    UnknownMethod(String),
    #[error("--read-auth none cannot be combined with keys or jwt")]
    NoneCombined,
    #[error("--read-auth keys needs --read-keys-file")]
    NoKeysFile,
    #[error("--read-auth jwt needs --jwt-hs256-secret-file or --jwt-jwks-file")]
    NoJwtKey,
    #[error(transparent)]
    Keys(#[from] keys::KeysError),
    #[error(transparent)]
    Jwt(#[from] jwt::JwtSetupError),
}

/// How callers authenticate, from `--read-auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Methods {
    /// not set: nothing may be exposed
    Unset,
    /// `none`: anyone reads what is exposed
    Open,
    Some {
        keys: bool,
        jwt: bool,
    },
}

impl Methods {
    pub fn parse(setting: Option<&str>) -> Result<Self, AuthSetupError> {
        let methods: Vec<&str> = setting
            .map(|list| list.split(',').map(str::trim).filter(|m| !m.is_empty()).collect())
            .unwrap_or_default();
        if methods.is_empty() {
            return Ok(Methods::Unset);
        }
        if methods == ["none"] {
            return Ok(Methods::Open);
        }
        let (mut keys, mut jwt) = (false, false);
        for method in methods {
            match method {
                "keys" => keys = true,
                "jwt" => jwt = true,
                "none" => return Err(AuthSetupError::NoneCombined),
                other => return Err(AuthSetupError::UnknownMethod(other.to_owned())),
            }
        }
        Ok(Methods::Some { keys, jwt })
    }
}

/// Checks the credentials of a request.
pub struct Authenticator {
    pub keys: Option<KeyStore>,
    pub jwt: Option<JwtVerifier>,
}

impl Authenticator {
    /// The authenticator `methods` ask for, from the files the settings name.
    pub fn from_config(config: &Config, keys: bool, jwt: bool) -> Result<Self, AuthSetupError> {
        let keys = if keys {
            let path = config
                .read_keys_file
                .as_deref()
                .ok_or(AuthSetupError::NoKeysFile)?;
            Some(KeyStore::load(path)?)
        } else {
            None
        };
        let jwt = if jwt {
            if config.jwt_hs256_secret_file.is_none() && config.jwt_jwks_file.is_none() {
                return Err(AuthSetupError::NoJwtKey);
            }
            Some(JwtVerifier::new(JwtRules {
                hs256_secret: config
                    .jwt_hs256_secret_file
                    .as_deref()
                    .map(jwt::read_hs256_secret)
                    .transpose()?,
                jwks: config.jwt_jwks_file.clone(),
                issuer: config.jwt_issuer.clone(),
                audience: config.jwt_audience.clone(),
                projections_claim: config.jwt_projections_claim.clone(),
            })?)
        } else {
            None
        };
        Ok(Self { keys, jwt })
    }

    /// The caller of a request with this `Authorization` header value (`None`: no header).
    pub fn authenticate(&self, authorization: Option<&str>) -> Result<Caller, Denial> {
        let value = authorization.ok_or(Denial::Missing)?;
        let (scheme, token) = value.trim().split_once(' ').ok_or(Denial::Malformed)?;
        if !scheme.eq_ignore_ascii_case("bearer") {
            return Err(Denial::Malformed);
        }
        let token = token.trim();
        if token.starts_with(KEY_PREFIX) {
            let keys = self.keys.as_ref().ok_or(Denial::UnknownKey)?;
            let (name, projections) = keys.find(token).ok_or(Denial::UnknownKey)?;
            return Ok(Caller::Service { name, projections });
        }
        let jwt = self.jwt.as_ref().ok_or(Denial::Malformed)?;
        let (claims, projections) = jwt.verify(token)?;
        Ok(Caller::User { claims, projections })
    }
}

#[cfg(test)]
mod tests {
    use super::keys::key_line;
    use super::*;

    #[test]
    fn methods_parse() {
        assert_eq!(Methods::parse(None).unwrap(), Methods::Unset);
        assert_eq!(Methods::parse(Some(" ")).unwrap(), Methods::Unset);
        assert_eq!(Methods::parse(Some("none")).unwrap(), Methods::Open);
        assert_eq!(
            Methods::parse(Some("keys, jwt")).unwrap(),
            Methods::Some {
                keys: true,
                jwt: true
            }
        );
        assert!(matches!(
            Methods::parse(Some("none,keys")),
            Err(AuthSetupError::NoneCombined)
        ));
        assert!(matches!(
            Methods::parse(Some("basic")),
            Err(AuthSetupError::UnknownMethod(_))
        ));
    }

    #[test]
    fn a_key_is_found_by_its_hash_and_a_token_by_its_scheme() {
        let dir = std::env::temp_dir().join(format!("cqrs-auth-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        let token = format!("{KEY_PREFIX}{}", "ab".repeat(32));
        std::fs::write(
            &path,
            format!("{}\n", key_line("billing", &token, "order_summary")),
        )
        .unwrap();
        let auth = Authenticator {
            keys: Some(KeyStore::load(&path).unwrap()),
            jwt: None,
        };
        match auth.authenticate(Some(&format!("Bearer {token}"))) {
            Ok(Caller::Service { name, projections }) => {
                assert_eq!(name, "billing");
                assert!(projections.allows("order_summary"));
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {KEY_PREFIX}{}", "cd".repeat(32))))
                .unwrap_err(),
            Denial::UnknownKey
        );
        assert_eq!(auth.authenticate(None).unwrap_err(), Denial::Missing);
        assert_eq!(
            auth.authenticate(Some("Basic abc")).unwrap_err(),
            Denial::Malformed
        );
        // a JWT without a JWT verifier configured is malformed for this API
        assert_eq!(
            auth.authenticate(Some("Bearer eyJ.x.y")).unwrap_err(),
            Denial::Malformed
        );
        std::fs::remove_dir_all(&dir).ok();
    }
}
