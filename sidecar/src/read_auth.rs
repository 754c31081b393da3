//! Who is asking the read API. Two kinds of credential, both sent as
//! `Authorization: Bearer <token>`:
//!
//! - **API keys**, for services: `cqrs_` and 64 hex digits of randomness. The keys file holds
//!   only their SHA-256 (a key is high-entropy, so a fast hash is enough; nothing to brute-force),
//!   each with a name and the projections it may read; lookups compare every stored hash in
//!   constant time. The file is read again when it changes or on SIGHUP: a removed line revokes
//!   that key at once.
//! - **JWTs**, for end users: HS256 with a shared secret, RS256 or ES256 with the public keys of a
//!   JWKS file. The algorithm decides which key is used (an HS256 token is never checked against
//!   a public key, so algorithm confusion cannot work; `alg: none` does not parse); `exp` is
//!   required, `nbf`, `iss` and `aud` are checked. A claim lists the projections the token may
//!   read. Verification is the `jsonwebtoken` crate's, not ours.
//!
//! Nothing here logs a token or a key.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::SystemTime;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

/// How an API key starts: it tells a key from a JWT, and secret scanners can find leaked keys.
pub const KEY_PREFIX: &str = "cqrs_";
/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 5;

/// The projections a caller may read.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projections {
    All,
    /// shared: a caller's list is cloned on every request
    Only(Arc<BTreeSet<String>>),
}

impl Projections {
    pub fn allows(&self, projection: &str) -> bool {
        match self {
            Projections::All => true,
            Projections::Only(names) => names.contains(projection),
        }
    }

    /// `*`, or names separated by commas.
    pub fn parse(list: &str) -> Self {
        if list.trim() == "*" {
            return Projections::All;
        }
        Projections::Only(
            list.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
                .into(),
        )
    }

    /// From a JWT claim: `"*"`, or an array of names (anything else allows nothing).
    fn from_claim(claim: Option<&Value>) -> Self {
        match claim {
            Some(Value::String(all)) if all == "*" => Projections::All,
            Some(Value::Array(names)) => Projections::Only(
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect::<BTreeSet<_>>()
                    .into(),
            ),
            _ => Projections::Only(Arc::default()),
        }
    }
}

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

#[derive(Debug, thiserror::Error)]
pub enum AuthConfigError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path} line {line}: {reason}")]
    KeyLine {
        path: String,
        line: usize,
        reason: String,
    },
    #[error("{path}: {reason}")]
    Keys { path: String, reason: String },
}

fn read(path: &Path) -> Result<String, AuthConfigError> {
    std::fs::read_to_string(path).map_err(|err| AuthConfigError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    })
}

fn sha256(text: &str) -> [u8; 32] {
    Sha256::digest(text.as_bytes()).into()
}

struct Key {
    name: String,
    hash: [u8; 32],
    projections: Projections,
}

/// The API keys file: `<name> sha256:<64 hex digits> <projections>` per line (`*` or names
/// separated by commas), `#` comments. Kept in memory, read again when the file changes.
pub struct KeyStore {
    path: PathBuf,
    keys: RwLock<Vec<Key>>,
    modified: Mutex<Option<SystemTime>>,
}

impl KeyStore {
    pub fn load(path: &Path) -> Result<Self, AuthConfigError> {
        let store = Self {
            path: path.to_owned(),
            keys: RwLock::new(Vec::new()),
            modified: Mutex::new(None),
        };
        store.reload()?;
        Ok(store)
    }

    fn parse(&self, text: &str) -> Result<Vec<Key>, AuthConfigError> {
        let path = self.path.display().to_string();
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let bad = |reason: &str| AuthConfigError::KeyLine {
                path: path.clone(),
                line: n + 1,
                reason: reason.to_owned(),
            };
            let [name, hash, projections] = fields[..] else {
                return Err(bad("expected: <name> sha256:<64 hex digits> <projections>"));
            };
            let hex = hash
                .strip_prefix("sha256:")
                .ok_or_else(|| bad("the hash must be sha256:<64 hex digits>"))?;
            let mut hash = [0u8; 32];
            hex::decode_to_slice(hex, &mut hash).map_err(|_| bad("the hash must be 64 hex digits"))?;
            keys.push(Key {
                name: name.to_owned(),
                hash,
                projections: Projections::parse(projections),
            });
        }
        Ok(keys)
    }

    /// Reads the file again; returns how many keys it holds. On an error the keys stay as they
    /// were.
    pub fn reload(&self) -> Result<usize, AuthConfigError> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let keys = self.parse(&read(&self.path)?)?;
        let count = keys.len();
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
        if let Ok(mut seen) = self.modified.lock() {
            *seen = modified;
        }
        Ok(count)
    }

    /// Reloads when the file's modification time changed; `None` when it did not.
    pub fn reload_if_changed(&self) -> Option<Result<usize, AuthConfigError>> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let changed = self.modified.lock().map(|seen| *seen != modified).unwrap_or(true);
        changed.then(|| self.reload())
    }

    /// The key's name and projections. Every stored hash is compared, in constant time, so the
    /// time taken says nothing about which (if any) matched.
    fn find(&self, token: &str) -> Option<(String, Projections)> {
        let hash = sha256(token);
        let keys = self.keys.read().ok()?;
        let mut found = None;
        for key in keys.iter() {
            if bool::from(key.hash.ct_eq(&hash)) {
                found = Some((key.name.clone(), key.projections.clone()));
            }
        }
        found
    }
}

/// A verification key of the JWKS file, with the algorithm it verifies.
struct PublicKey {
    kid: Option<String>,
    algorithm: Algorithm,
    key: DecodingKey,
}

/// What JWTs must be to be accepted.
pub struct JwtRules {
    pub hs256_secret: Option<Vec<u8>>,
    pub jwks: Option<PathBuf>,
    pub issuer: Option<String>,
    pub audience: Option<String>,
    /// The claim listing the projections a token may read.
    pub projections_claim: String,
}

pub struct JwtVerifier {
    hs256: Option<DecodingKey>,
    public: Vec<PublicKey>,
    issuer: Option<String>,
    audience: Option<String>,
    projections_claim: String,
    /// Tokens verified already, until they expire: a client sends the same token on every
    /// request, and checking its signature and claims again each time cost more than the read.
    verified: Mutex<HashMap<String, Verified>>,
}

#[derive(Clone)]
struct Verified {
    claims: Arc<Map<String, Value>>,
    projections: Projections,
    /// `exp`, seconds since the epoch
    expires: u64,
}

/// Verified tokens kept at most (the cache is emptied when full: it refills from live traffic).
const MAX_VERIFIED: usize = 10_000;

fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

impl JwtVerifier {
    pub fn new(rules: JwtRules) -> Result<Self, AuthConfigError> {
        let mut public = Vec::new();
        if let Some(path) = &rules.jwks {
            let keys = |reason: String| AuthConfigError::Keys {
                path: path.display().to_string(),
                reason,
            };
            let set: JwkSet = serde_json::from_str(&read(path)?)
                .map_err(|err| keys(format!("not a JWKS document: {err}")))?;
            for jwk in &set.keys {
                let algorithm = match &jwk.algorithm {
                    AlgorithmParameters::RSA(_) => Algorithm::RS256,
                    AlgorithmParameters::EllipticCurve(ec) if ec.curve == EllipticCurve::P256 => {
                        Algorithm::ES256
                    }
                    _ => {
                        return Err(keys(
                            "only RSA (RS256) and P-256 (ES256) keys are supported".to_owned(),
                        ))
                    }
                };
                let key = DecodingKey::from_jwk(jwk).map_err(|err| keys(err.to_string()))?;
                public.push(PublicKey {
                    kid: jwk.common.key_id.clone(),
                    algorithm,
                    key,
                });
            }
        }
        Ok(Self {
            hs256: rules.hs256_secret.as_deref().map(DecodingKey::from_secret),
            public,
            issuer: rules.issuer,
            audience: rules.audience,
            projections_claim: rules.projections_claim,
            verified: Mutex::new(HashMap::new()),
        })
    }

    /// The token's claims and the projections it may read.
    pub fn verify(&self, token: &str) -> Result<(Arc<Map<String, Value>>, Projections), Denial> {
        let now = unix_now();
        if let Some(known) = self.verified.lock().ok().and_then(|v| v.get(token).cloned()) {
            if now > known.expires + LEEWAY_SECONDS {
                if let Ok(mut verified) = self.verified.lock() {
                    verified.remove(token);
                }
                return Err(Denial::Expired);
            }
            return Ok((known.claims, known.projections));
        }
        let (claims, projections) = self.check(token)?;
        let claims = Arc::new(claims);
        if let (Some(expires), Ok(mut verified)) =
            (claims.get("exp").and_then(Value::as_u64), self.verified.lock())
        {
            if verified.len() >= MAX_VERIFIED {
                verified.clear();
            }
            verified.insert(
                token.to_owned(),
                Verified {
                    claims: Arc::clone(&claims),
                    projections: projections.clone(),
                    expires,
                },
            );
        }
        Ok((claims, projections))
    }

    /// Verification proper: signature, algorithm, `exp`, `nbf`, `iss`, `aud`.
    fn check(&self, token: &str) -> Result<(Map<String, Value>, Projections), Denial> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| Denial::InvalidToken)?;
        let key = match header.alg {
            Algorithm::HS256 => self.hs256.as_ref().ok_or(Denial::UnsupportedAlgorithm)?,
            Algorithm::RS256 | Algorithm::ES256 => {
                let mut candidates = self.public.iter().filter(|k| k.algorithm == header.alg);
                let chosen = match &header.kid {
                    Some(kid) => candidates.find(|k| k.kid.as_deref() == Some(kid.as_str())),
                    None => candidates.next(),
                };
                &chosen.ok_or(Denial::BadSignature)?.key
            }
            _ => return Err(Denial::UnsupportedAlgorithm),
        };
        let mut validation = Validation::new(header.alg);
        validation.algorithms = vec![header.alg];
        validation.leeway = LEEWAY_SECONDS;
        validation.validate_nbf = true;
        validation.set_required_spec_claims(&["exp"]);
        match &self.issuer {
            Some(issuer) => validation.set_issuer(&[issuer]),
            None => validation.iss = None,
        }
        match &self.audience {
            Some(audience) => validation.set_audience(&[audience]),
            None => validation.validate_aud = false,
        }
        let data = jsonwebtoken::decode::<Map<String, Value>>(token, key, &validation).map_err(|err| {
            match err.kind() {
                ErrorKind::ExpiredSignature => Denial::Expired,
                ErrorKind::ImmatureSignature => Denial::NotYetValid,
                ErrorKind::InvalidAudience => Denial::WrongAudience,
                ErrorKind::InvalidIssuer => Denial::WrongIssuer,
                ErrorKind::InvalidSignature => Denial::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Denial::UnsupportedAlgorithm,
                _ => Denial::InvalidToken,
            }
        })?;
        let projections = Projections::from_claim(data.claims.get(&self.projections_claim));
        Ok((data.claims, projections))
    }
}

/// Checks the credentials of a request.
pub struct Authenticator {
    pub keys: Option<KeyStore>,
    pub jwt: Option<JwtVerifier>,
}

impl Authenticator {
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

/// The keys-file line of an API key: `<name> sha256:<hex> <projections>` (what an operator
/// appends after generating a key; the tests use it too).
pub fn key_line(name: &str, token: &str, projections: &str) -> String {
    format!("{name} sha256:{} {projections}", hex::encode(sha256(token)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use serde_json::json;

    fn now() -> u64 {
        SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0)
    }

    fn hs(claims: Value, secret: &[u8]) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret),
        )
        .unwrap()
    }

    fn verifier() -> JwtVerifier {
        JwtVerifier::new(JwtRules {
            hs256_secret: Some(b"a secret of enough length for hs256".to_vec()),
            jwks: None,
            issuer: Some("https://issuer.example".into()),
            audience: Some("cqrs-read".into()),
            projections_claim: "cqrs_projections".into(),
        })
        .unwrap()
    }

    #[test]
    fn jwt_claims_are_checked() {
        let secret = b"a secret of enough length for hs256";
        let good = json!({"sub": "user-7", "exp": now() + 60, "iss": "https://issuer.example",
                          "aud": "cqrs-read", "cqrs_projections": ["user_order_stats"]});
        let (claims, projections) = verifier().verify(&hs(good.clone(), secret)).unwrap();
        assert_eq!(claims["sub"], "user-7");
        assert!(projections.allows("user_order_stats") && !projections.allows("order_summary"));
        let with = |patch: Value| {
            let mut claims = good.clone();
            for (k, v) in patch.as_object().unwrap() {
                claims[k] = v.clone();
            }
            claims
        };
        let denied = |claims: Value, secret: &[u8]| verifier().verify(&hs(claims, secret)).unwrap_err();
        assert_eq!(denied(with(json!({"exp": now() - 60})), secret), Denial::Expired);
        assert_eq!(
            denied(with(json!({"nbf": now() + 600})), secret),
            Denial::NotYetValid
        );
        assert_eq!(
            denied(with(json!({"aud": "someone-else"})), secret),
            Denial::WrongAudience
        );
        assert_eq!(
            denied(with(json!({"iss": "https://evil.example"})), secret),
            Denial::WrongIssuer
        );
        assert_eq!(
            denied(good.clone(), b"another secret of enough length"),
            Denial::BadSignature
        );
        let mut no_exp = good.clone();
        no_exp.as_object_mut().unwrap().remove("exp");
        assert_eq!(denied(no_exp, secret), Denial::InvalidToken);
        // alg none: header {"alg":"none"} with no signature
        let none = format!(
            "{}.{}.",
            base64_url(br#"{"alg":"none","typ":"JWT"}"#),
            base64_url(good.to_string().as_bytes())
        );
        assert_eq!(verifier().verify(&none).unwrap_err(), Denial::InvalidToken);
        // a tampered payload keeps its signature but no longer matches it
        let token = hs(good.clone(), secret);
        let mut parts: Vec<String> = token.split('.').map(str::to_owned).collect();
        parts[1] = base64_url(with(json!({"sub": "user-8"})).to_string().as_bytes());
        assert_eq!(
            verifier().verify(&parts.join(".")).unwrap_err(),
            Denial::BadSignature
        );
    }

    #[test]
    fn a_remembered_token_still_expires_and_only_its_exact_bytes_hit() {
        let secret = b"a secret of enough length for hs256";
        let verifier = verifier();
        let claims = json!({"sub": "user-7", "exp": now() + 60, "iss": "https://issuer.example",
                            "aud": "cqrs-read", "cqrs_projections": ["user_order_stats"]});
        let token = hs(claims, secret);
        assert!(verifier.verify(&token).is_ok());
        assert!(verifier.verify(&token).is_ok(), "served from the cache");
        let mut tampered = token.clone();
        tampered.push('A');
        assert_eq!(
            verifier.verify(&tampered).unwrap_err(),
            Denial::BadSignature,
            "a different token is checked, not looked up"
        );
        // Time passes past exp + leeway while the token sits in the cache.
        if let Ok(mut remembered) = verifier.verified.lock() {
            if let Some(entry) = remembered.get_mut(&token) {
                entry.expires = now() - LEEWAY_SECONDS - 1;
            }
        }
        assert_eq!(verifier.verify(&token).unwrap_err(), Denial::Expired);
    }

    fn base64_url(bytes: &[u8]) -> String {
        use base64::Engine;
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    }

    #[test]
    fn keys_are_found_by_hash_and_reloaded() {
        let dir = std::env::temp_dir().join(format!("cqrs-keys-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        let token = format!("{KEY_PREFIX}{}", "ab".repeat(32));
        std::fs::write(
            &path,
            format!("# services\n{}\n", key_line("billing", &token, "order_summary")),
        )
        .unwrap();
        let store = KeyStore::load(&path).unwrap();
        let auth = Authenticator {
            keys: Some(store),
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
        // revoked: the line is gone after a reload
        std::fs::write(&path, "# nobody\n").unwrap();
        auth.keys.as_ref().unwrap().reload().unwrap();
        assert_eq!(
            auth.authenticate(Some(&format!("Bearer {token}"))).unwrap_err(),
            Denial::UnknownKey
        );
        std::fs::write(&path, "billing sha256:xyz order_summary\n").unwrap();
        assert!(auth.keys.as_ref().unwrap().reload().is_err());
        let _ = std::fs::remove_dir_all(dir);
    }
}
