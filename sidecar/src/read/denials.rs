//! Refused read requests, counted by reason (`cqrs_read_denied_total{reason}`) and logged at
//! most once per reason every [`LOG_EVERY`] with how many went unlogged since: an operator sees
//! why clients get 401 or 404 without a flood a client could cause, and never a credential.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::metrics::{label, Metrics};

use super::auth::Denial;

/// The longest gap between two log lines of one reason while refusals go on.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// A projection name longer than this is cut in the log (it comes from the request's path).
const LOGGED_NAME_CHARS: usize = 64;

pub struct Denials {
    metrics: Arc<Metrics>,
    seen: Mutex<HashMap<&'static str, Seen>>,
}

struct Seen {
    logged_at: Instant,
    unlogged: u64,
}

impl Denials {
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self {
            metrics,
            seen: Mutex::new(HashMap::new()),
        }
    }

    /// Credentials refused (401).
    pub fn unauthorized(&self, denial: Denial, projection: &str) {
        self.record(denial.label(), projection, why(denial), true);
    }

    /// A projection not exposed, or not listed for the caller (404, as if it did not exist).
    pub fn projection_not_allowed(&self, projection: &str) {
        self.record(
            label::DENIED_PROJECTION,
            projection,
            "the projection is not in --expose, or not listed for this key or in this token's projections claim",
            true,
        );
    }

    /// A row another subject owns (404, like no row).
    pub fn row_not_owned(&self, projection: &str) {
        // what a row rule is for: logged, but not as a warning
        self.record(
            label::DENIED_ROW,
            projection,
            "the row belongs to another subject (the --expose row rule)",
            false,
        );
    }

    fn record(&self, reason: &'static str, projection: &str, why: &'static str, warn: bool) {
        self.metrics.read_denied.with_label_values(&[reason]).inc();
        let now = Instant::now();
        let unlogged = match self.seen.lock() {
            Ok(mut seen) => match seen.get_mut(reason) {
                Some(s) if now.duration_since(s.logged_at) < LOG_EVERY => {
                    s.unlogged += 1;
                    return;
                }
                Some(s) => {
                    let unlogged = s.unlogged;
                    *s = Seen {
                        logged_at: now,
                        unlogged: 0,
                    };
                    unlogged
                }
                None => {
                    seen.insert(
                        reason,
                        Seen {
                            logged_at: now,
                            unlogged: 0,
                        },
                    );
                    0
                }
            },
            // a poisoned lock only loses the rate limit's memory; the line is still worth having
            Err(_) => 0,
        };
        let projection: String = projection.chars().take(LOGGED_NAME_CHARS).collect();
        if warn {
            tracing::warn!(reason, projection = %projection, unlogged_since_last = unlogged, "read request refused: {why}");
        } else {
            tracing::info!(reason, projection = %projection, unlogged_since_last = unlogged, "read request refused: {why}");
        }
    }
}

fn why(denial: Denial) -> &'static str {
    match denial {
        Denial::Missing => "no Authorization header",
        Denial::Malformed => "the Authorization header is not `Bearer <token>` (or holds a JWT while only --read-auth keys is on)",
        Denial::UnknownKey => "no such API key (in --read-keys-file, or that file is not configured)",
        Denial::BadSignature => "the key's secret or the token's signature does not match",
        Denial::Expired => "the token expired (exp)",
        Denial::NotYetValid => "the token is not valid yet (nbf)",
        Denial::WrongAudience => "the token's aud is missing or not --jwt-audience",
        Denial::WrongIssuer => "the token's iss is missing or not --jwt-issuer",
        Denial::UnsupportedAlgorithm => "the token's alg is not the one its key is for",
        Denial::InvalidToken => "the token cannot be decoded or lacks a claim it needs",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_refusal_is_counted_and_one_line_per_reason_is_logged_per_period() {
        let metrics = Arc::new(Metrics::new().unwrap());
        let denials = Denials::new(Arc::clone(&metrics));
        for _ in 0..5 {
            denials.unauthorized(Denial::Expired, "loans");
        }
        denials.projection_not_allowed("loanz");
        let count = |reason: &str| metrics.read_denied.with_label_values(&[reason]).get();
        assert_eq!(count(Denial::Expired.label()), 5);
        assert_eq!(count(label::DENIED_PROJECTION), 1);
        let seen = denials.seen.lock().unwrap();
        // the first of each reason was logged; the other four of "expired" wait for the period
        assert_eq!(seen[Denial::Expired.label()].unlogged, 4);
        assert_eq!(seen[label::DENIED_PROJECTION].unlogged, 0);
    }

    #[test]
    fn a_reason_is_logged_again_once_the_period_is_over() {
        let denials = Denials::new(Arc::new(Metrics::new().unwrap()));
        denials.unauthorized(Denial::Missing, "loans");
        denials.unauthorized(Denial::Missing, "loans");
        if let Some(s) = denials.seen.lock().unwrap().get_mut(Denial::Missing.label()) {
            s.logged_at -= LOG_EVERY;
        }
        denials.unauthorized(Denial::Missing, "loans");
        assert_eq!(denials.seen.lock().unwrap()[Denial::Missing.label()].unlogged, 0);
    }
}
