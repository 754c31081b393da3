//! JWTs, for end users: HS256 with a shared secret, RS256 or ES256 with the public keys of a
//! JWKS file. The algorithm decides which key is used (an HS256 token is never checked against
//! a public key, so algorithm confusion cannot work; `alg: none` does not parse); `exp` is
//! required, and so are `iss` and `aud` when an issuer and an audience are configured; `nbf` is
//! checked when present. A claim lists the projections the token may read. Verification is the
//! `jsonwebtoken` crate's, not ours.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use jsonwebtoken::errors::ErrorKind;
use jsonwebtoken::jwk::{AlgorithmParameters, EllipticCurve, JwkSet};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use serde_json::{Map, Value};

use super::Denial;
use crate::read::access::Projections;

/// Clock skew allowed on `exp` and `nbf`.
const LEEWAY_SECONDS: u64 = 5;
/// The shortest HS256 secret accepted.
const MIN_SECRET_BYTES: usize = 32;

#[derive(Debug, thiserror::Error)]
pub enum JwtSetupError {
    #[error("cannot read {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("{path}: an HS256 secret needs at least {MIN_SECRET_BYTES} bytes")]
    ShortSecret { path: String },
    #[error("{path}: {reason}")]
    Jwks { path: String, reason: String },
}

fn read(path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    std::fs::read(path).map_err(|err| JwtSetupError::Read {
        path: path.display().to_string(),
        reason: err.to_string(),
    })
}

/// The HS256 secret in `path`, without the whitespace an editor leaves around it (a trailing
/// newline is not part of the secret).
pub fn read_hs256_secret(path: &Path) -> Result<Vec<u8>, JwtSetupError> {
    let secret = read(path)?.trim_ascii().to_vec();
    if secret.len() < MIN_SECRET_BYTES {
        return Err(JwtSetupError::ShortSecret {
            path: path.display().to_string(),
        });
    }
    Ok(secret)
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
    pub fn new(rules: JwtRules) -> Result<Self, JwtSetupError> {
        let mut public = Vec::new();
        if let Some(path) = &rules.jwks {
            let keys = |reason: String| JwtSetupError::Jwks {
                path: path.display().to_string(),
                reason,
            };
            let set: JwkSet = serde_json::from_slice(&read(path)?)
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
        // a configured issuer or audience must be in the token, not only right when present
        let mut required = vec!["exp"];
        if self.issuer.is_some() {
            required.push("iss");
        }
        if self.audience.is_some() {
            required.push("aud");
        }
        validation.set_required_spec_claims(&required);
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
                ErrorKind::MissingRequiredClaim(claim) if claim == "aud" => Denial::WrongAudience,
                ErrorKind::MissingRequiredClaim(claim) if claim == "iss" => Denial::WrongIssuer,
                ErrorKind::InvalidSignature => Denial::BadSignature,
                ErrorKind::InvalidAlgorithm | ErrorKind::InvalidAlgorithmName => Denial::UnsupportedAlgorithm,
                _ => Denial::InvalidToken,
            }
        })?;
        let projections = Projections::from_claim(data.claims.get(&self.projections_claim));
        Ok((data.claims, projections))
    }
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
        let without = |claim: &str| {
            let mut claims = good.clone();
            claims.as_object_mut().unwrap().remove(claim);
            claims
        };
        assert_eq!(denied(without("exp"), secret), Denial::InvalidToken);
        // a configured issuer and audience are required, not only checked when present
        assert_eq!(denied(without("iss"), secret), Denial::WrongIssuer);
        assert_eq!(denied(without("aud"), secret), Denial::WrongAudience);
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
}
