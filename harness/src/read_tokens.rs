//! Credentials for the read API in tests, benchmarks and the demo: an HS256 secret file and
//! JWTs signed with it, as an identity provider would issue them.

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};

/// The audience the sidecars of tests, benchmarks and the demo require.
pub const AUDIENCE: &str = "cqrs-read";

/// Seconds since the Unix epoch.
pub fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A new random HS256 secret (64 hex digits) written to `dir/hs256.secret`; its path and bytes.
pub fn write_hs256_secret(dir: &Path) -> Result<(PathBuf, Vec<u8>)> {
    let secret = hex::encode(rand::random::<[u8; 32]>());
    let path = dir.join("hs256.secret");
    std::fs::write(&path, &secret).with_context(|| format!("writing {}", path.display()))?;
    Ok((path, secret.into_bytes()))
}

/// A JWT signed with `secret` (HS256) for subject `sub`, readable projections `projections`
/// (names, or `["*"]` for all), audience [`AUDIENCE`], valid for an hour.
pub fn hs256_token(secret: &[u8], sub: &str, projections: &[&str]) -> Result<String> {
    let projections: Value = if projections == ["*"] {
        json!("*")
    } else {
        json!(projections)
    };
    sign_hs256(
        secret,
        &json!({"sub": sub, "aud": AUDIENCE, "exp": now() + 3600, "cqrs_projections": projections}),
    )
}

/// `claims` signed with `secret` (HS256).
pub fn sign_hs256(secret: &[u8], claims: &Value) -> Result<String> {
    Ok(encode(
        &Header::new(Algorithm::HS256),
        claims,
        &EncodingKey::from_secret(secret),
    )?)
}
