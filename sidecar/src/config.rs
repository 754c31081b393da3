//! Command-line flags, each with a `CQRS_*` environment fallback.

use clap::Parser;

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cqrs-sidecar",
    version,
    about = "Streams the pg_cqrs command log into projections and Redis"
)]
pub struct Config {
    /// PostgreSQL connection URL of the database where `CREATE EXTENSION pg_cqrs` ran. The role
    /// needs the REPLICATION attribute and membership in cqrs_projector.
    #[arg(
        long,
        env = "CQRS_DATABASE_URL",
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: String,

    /// Logical replication slot (pgoutput) to stream from; created when missing.
    #[arg(long, env = "CQRS_SLOT", default_value = "cqrs_sidecar")]
    pub slot: String,

    /// Publication on cqrs.command_log; created when missing.
    #[arg(long, env = "CQRS_PUBLICATION", default_value = "cqrs_command_log")]
    pub publication: String,

    /// Log format: text or json.
    #[arg(long, env = "CQRS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,
}
