//! cqrs-sidecar: moves events from the command log's replication slot to `cqrs.project_batch`
//! and changed read-model rows to Redis; serves read-model rows over HTTP from Redis or
//! PostgreSQL.

pub mod admin;
pub mod append_stats;
mod assembly;
pub mod batching;
pub mod cache;
mod cache_sync;
pub mod config;
mod flusher;
pub mod health;
pub mod leader;
pub mod leading;
pub mod log_row;
mod maintenance;
pub mod metrics;
pub mod outbox;
pub mod pgoutput;
pub mod postgres;
pub mod probe;
pub mod read;
pub mod repair;
pub mod server;
pub mod status;
pub mod stream;
pub mod tls;
pub mod traces;
