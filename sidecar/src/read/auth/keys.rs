//! API keys, for services: `cqrs_` and 64 hex digits of randomness. The keys file holds only
//! their SHA-256 (a key is high-entropy, so a fast hash is enough; nothing to brute-force), each
//! with a name and the projections it may read; a lookup compares every stored hash in constant
//! time. The file is read again when it changes or on SIGHUP: a removed line revokes that key at
//! once, and a removed file revokes every key (a file that no longer parses keeps the keys as
//! they were: a half-saved edit must not lock every service out).

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::sync::watch;

use super::Authenticator;
use crate::read::access::Projections;

/// How an API key starts: it tells a key from a JWT, and secret scanners can find leaked keys.
pub const KEY_PREFIX: &str = "cqrs_";

#[derive(Debug, thiserror::Error)]
pub enum KeysError {
    #[error("cannot read the keys file {path}: {reason}")]
    Read { path: String, reason: String },
    #[error("the keys file {path} is gone: every API key is revoked until it is back")]
    Gone { path: String },
    #[error("{path} line {line}: {reason}")]
    Line {
        path: String,
        line: usize,
        reason: String,
    },
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
    pub fn load(path: &Path) -> Result<Self, KeysError> {
        let store = Self {
            path: path.to_owned(),
            keys: RwLock::new(Vec::new()),
            modified: Mutex::new(None),
        };
        store.reload()?;
        Ok(store)
    }

    fn parse(&self, text: &str) -> Result<Vec<Key>, KeysError> {
        let path = self.path.display().to_string();
        let mut keys = Vec::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let fields: Vec<&str> = line.split_whitespace().collect();
            let bad = |reason: &str| KeysError::Line {
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

    fn replace(&self, keys: Vec<Key>, modified: Option<SystemTime>) {
        if let Ok(mut current) = self.keys.write() {
            *current = keys;
        }
        if let Ok(mut seen) = self.modified.lock() {
            *seen = modified;
        }
    }

    /// Reads the file again; returns how many keys it holds. A file that is gone revokes every
    /// key ([`KeysError::Gone`]); one that does not read or parse keeps the keys as they were.
    pub fn reload(&self) -> Result<usize, KeysError> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let text = match std::fs::read_to_string(&self.path) {
            Ok(text) => text,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                self.replace(Vec::new(), None);
                return Err(KeysError::Gone {
                    path: self.path.display().to_string(),
                });
            }
            Err(err) => {
                return Err(KeysError::Read {
                    path: self.path.display().to_string(),
                    reason: err.to_string(),
                })
            }
        };
        let keys = self.parse(&text)?;
        let count = keys.len();
        self.replace(keys, modified);
        Ok(count)
    }

    /// Reloads when the file's modification time changed (or it is gone); `None` when not.
    pub fn reload_if_changed(&self) -> Option<Result<usize, KeysError>> {
        let modified = std::fs::metadata(&self.path).and_then(|m| m.modified()).ok();
        let changed = self.modified.lock().map(|seen| *seen != modified).unwrap_or(true);
        let empty = self.keys.read().map(|keys| keys.is_empty()).unwrap_or(false);
        // once gone and revoked, say so once, not every second
        (changed && !(modified.is_none() && empty)).then(|| self.reload())
    }

    /// The key's name and projections. Every stored hash is compared, in constant time, so the
    /// time taken says nothing about which (if any) matched.
    pub(super) fn find(&self, token: &str) -> Option<(String, Projections)> {
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

/// The keys-file line of an API key: `<name> sha256:<hex> <projections>` (what an operator
/// appends after generating a key; the tests use it too).
pub fn key_line(name: &str, token: &str, projections: &str) -> String {
    format!("{name} sha256:{} {projections}", hex::encode(sha256(token)))
}

/// Reads the API keys file again when it changes (checked every second) or on SIGHUP, until
/// shutdown.
pub async fn reload_on_change(auth: Arc<Authenticator>, mut shutdown: watch::Receiver<bool>) {
    let Some(keys) = &auth.keys else { return };
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    loop {
        let forced = tokio::select! {
            _ = tokio::time::sleep(Duration::from_secs(1)) => false,
            Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            _ = shutdown.wait_for(|stop| *stop) => return,
        };
        let result = if forced {
            Some(keys.reload())
        } else {
            keys.reload_if_changed()
        };
        match result {
            Some(Ok(count)) => tracing::info!(keys = count, "reloaded the read API keys"),
            Some(Err(err @ KeysError::Gone { .. })) => {
                tracing::error!(error = %err, "the read API keys file is gone")
            }
            Some(Err(err)) => {
                tracing::error!(error = %err, "the read API keys file does not load; keeping the keys as they were")
            }
            None => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_reloaded_revoked_and_a_bad_file_keeps_them() {
        let dir = std::env::temp_dir().join(format!("cqrs-keys-{}", rand::random::<u32>()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("keys");
        let token = format!("{KEY_PREFIX}{}", "ab".repeat(32));
        let line = key_line("billing", &token, "order_summary");
        std::fs::write(&path, format!("# services\n{line}\n")).unwrap();
        let store = KeyStore::load(&path).unwrap();
        assert_eq!(
            store.find(&token).map(|(name, _)| name).as_deref(),
            Some("billing")
        );
        // a file that does not parse: refused, the keys stay
        std::fs::write(&path, "billing sha256:xyz order_summary\n").unwrap();
        assert!(matches!(store.reload(), Err(KeysError::Line { line: 1, .. })));
        assert!(store.find(&token).is_some());
        // a removed line revokes its key
        std::fs::write(&path, "# nobody\n").unwrap();
        assert_eq!(store.reload().unwrap(), 0);
        assert!(store.find(&token).is_none());
        // a removed file revokes every key, and says so once
        std::fs::write(&path, format!("{line}\n")).unwrap();
        store.reload().unwrap();
        std::fs::remove_file(&path).unwrap();
        assert!(matches!(
            store.reload_if_changed(),
            Some(Err(KeysError::Gone { .. }))
        ));
        assert!(store.find(&token).is_none());
        assert!(store.reload_if_changed().is_none());
        // and it comes back with the file
        std::fs::write(&path, format!("{line}\n")).unwrap();
        assert!(matches!(store.reload_if_changed(), Some(Ok(1))));
        assert!(store.find(&token).is_some());
        std::fs::remove_dir_all(&dir).ok();
    }
}
