//! `pg_cqrs`: CQRS inside PostgreSQL — the extension edition.
//!
//! Where a function is declared: every SQL function of the extension is declared once, in SQL —
//! the ones written in SQL and PL/pgSQL in `sql/core/` (shared with the portable edition), the
//! ones implemented here in `sql/extension/functions.sql` (`language c` with their symbols),
//! whose comments and grants, shared with their portable twins, are in `sql/core/api.sql`
//! (`sql/README.md` states the rule). This crate implements:
//!
//! - the command side: [`append`] (`cqrs.append`, one kept statement), [`command_limits`]
//!   (size and depth limits), [`payload_schema`] (JSON Schema validation, compiled schemas cached
//!   per backend), [`command_registry`] (registered types in backend memory), [`uuid_v7`];
//! - the projection side: [`projection_api`] (the SQL functions: `_project_batch`, `catch_up`,
//!   `resume`, `retry_dead_letters`, `read_many`, `create_projection`, `rebuild`),
//!   [`projector`] (sequencing, folding and writing one batch), [`projection_catalog`]
//!   (definitions checked against the catalog and cached), [`events`] (command-log rows in),
//!   [`owner_rights`] (writes as the read model's owner), [`waiters`] (`wait_for`);
//! - the plumbing: [`fmgr`] (the C calling convention of the hand-written entry points),
//!   [`prepared`] (kept statements), [`subtransaction`], [`errors`], [`settings`].

// Errors are pgrx `ErrorReport`s (SQLSTATE, message, detail, hint), which are large; they are
// raised once and end the statement, so boxing them would only add noise.
#![allow(clippy::result_large_err)]

use pgrx::prelude::*;

mod append;
mod append_stats;
mod command_limits;
mod command_registry;
mod command_trace;
mod errors;
mod events;
mod fence;
mod fmgr;
mod installed_schema;
mod log_shape;
mod owner_rights;
mod payload_schema;
mod payload_value;
mod prepared;
mod projection_api;
mod projection_catalog;
mod projector;
mod read_models;
mod settings;
mod subtransaction;
mod uuid_v7;
mod waiters;

::pgrx::pg_module_magic!(name, version);

// The SQL surface, in this order: what both editions share (tables, SQL functions), the
// functions this edition implements in Rust (declared only there), and what both editions say
// about those (comments, privileges). See sql/README.md.
extension_sql_file!("../../sql/core/command.sql", name = "command_side", bootstrap);
extension_sql_file!(
    "../../sql/core/projection.sql",
    name = "projection_side",
    requires = ["command_side"]
);
extension_sql_file!(
    "../../sql/core/outbox.sql",
    name = "outbox",
    requires = ["projection_side"]
);
extension_sql_file!(
    "../../sql/core/retention.sql",
    name = "retention",
    requires = ["outbox"]
);
extension_sql_file!(
    "../../sql/extension/functions.sql",
    name = "rust_functions",
    requires = ["retention"]
);
extension_sql_file!(
    "../../sql/core/api.sql",
    name = "api",
    requires = ["rust_functions"],
    finalize
);

#[pg_guard]
pub extern "C-unwind" fn _PG_init() {
    settings::register();
    command_registry::register_invalidation_callback();
    waiters::register_commit_hook();
    append_stats::init();
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    // The #[pg_test]s live next to the code they test; this module only has to exist for the
    // pgrx test framework.
}

/// Required by `cargo pgrx test`.
#[cfg(test)]
pub mod pg_test {
    pub fn setup(_options: Vec<&str>) {}

    #[must_use]
    pub fn postgresql_conf_options() -> Vec<&'static str> {
        vec!["wal_level = logical", "fsync = off"]
    }
}
