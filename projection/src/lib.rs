//! The logic of pg_cqrs projections that needs no database, so that it can be tested with
//! `cargo test` and property tests; the extension is a thin SPI layer over it.
//!
//! - [`event`]: command-log rows as delivered to `cqrs.project_batch`;
//! - [`path`]: the `$.a.b[0]` JSON paths handlers use;
//! - [`spec`]: the handlers of a projection, parsed and checked;
//! - [`sequencing`]: per-(projection, stream) sequence validation (apply, skip, park, release);
//! - [`fold`]: turning a run of events into one write per read-model row;
//! - [`lsn`]: checkpoint positions in the WAL;
//! - [`sql`]: the set-based statements those writes are executed with.

pub mod event;
pub mod fold;
pub mod lsn;
pub mod path;
pub mod sequencing;
pub mod spec;
pub mod sql;
