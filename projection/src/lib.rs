//! The logic of pg_cqrs projections that needs no database, so that it can be tested with
//! `cargo test` and property tests; the extension is a thin SPI layer over it.
//!
//! - [`command_time`]: the time in a command id, which places it in the log's partitions;
//! - [`event`]: command-log rows as delivered to `cqrs.project_batch`;
//! - [`path`]: the `$.a.b[0]` JSON paths handlers use;
//! - [`spec`]: the handlers of a projection, parsed and checked;
//! - [`sequencing`]: per-(projection, stream) sequence validation (apply, skip, park, release);
//! - [`fold`]: turning a run of events into one write per read-model row;
//! - [`lsn`]: checkpoint positions in the WAL;
//! - [`name`]: what a projection may be called;
//! - [`sql`]: the set-based statements those writes are executed with;
//! - [`trace_context`]: the W3C trace context a command carries in its metadata.

pub mod command_time;
pub mod event;

/// The SQLSTATE `cqrs.project_batch` refuses a fencing token older than the projector lease
/// with: the caller is a deposed leader and must stop projecting. Class QC is pg_cqrs's own;
/// sql/core/projection.sql raises it (in SQL: a C function can only raise the codes PostgreSQL
/// defines), and the sidecar stops on it.
pub const FENCED_SQLSTATE: &str = "QC001";

pub mod fold;
pub mod lsn;
pub mod name;
pub mod path;
pub mod sequencing;
pub mod spec;
pub mod sql;
pub mod trace_context;

#[cfg(test)]
mod tests {
    /// The SQL that raises the fencing SQLSTATE and this constant are one definition.
    #[test]
    fn the_fencing_sqlstate_is_the_one_the_sql_raises() {
        let sql = include_str!("../../sql/core/projection.sql");
        assert!(
            sql.contains(&format!("errcode = '{}'", super::FENCED_SQLSTATE)),
            "sql/core/projection.sql does not raise {}",
            super::FENCED_SQLSTATE
        );
    }
}
