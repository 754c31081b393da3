//! What the leader's two tasks (the streamer in `stream.rs`, the flusher in `flusher.rs`) share:
//! the sidecar's parts they use, and how they pace retries.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};

use crate::cache::Cache;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use crate::postgres::Database;
use crate::repair::Repairs;

/// What the leader needs.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub pg: Database,
    pub cache: Arc<Cache>,
    pub repairs: Arc<Mutex<Repairs>>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Retry delays: exponential from 100 ms, doubling, at most 5 s, with jitter.
pub(crate) fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}
