//! cqrs-sidecar: moves events from the command log's replication slot to `cqrs.project_batch`
//! and changed read-model rows to Redis.

pub mod config;
