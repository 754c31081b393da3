//! Running a piece of work in an internal subtransaction and catching its ERROR, the way a
//! PL/pgSQL `begin … exception … end` block does: on failure everything the work wrote is rolled
//! back and the caller learns the SQLSTATE and message, while the surrounding transaction goes on.

use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::prelude::*;

/// An error caught from a subtransaction.
#[derive(Clone, Debug)]
pub(crate) struct Failure {
    pub(crate) sqlstate: String,
    pub(crate) message: String,
    pub(crate) detail: Option<String>,
    /// The summary it was recorded with, for a failure read back from where it was recorded.
    pub(crate) recorded_summary: Option<String>,
}

/// SQLSTATE classes whose PostgreSQL messages name objects — a constraint, a column, a table, a
/// role — and never values: integrity constraints (23), transaction rollback (40), syntax and
/// access rules (42), resources (53), program limits (54), object state (55), operator
/// intervention (57). A data exception's message (22: `invalid input syntax for type integer:
/// "4111…"`), a RAISE in the owner's code (P0) or an internal error may quote a command's value.
const CLASSES_NAMING_OBJECTS_ONLY: [&str; 7] = ["23", "40", "42", "53", "54", "55", "57"];

/// The error as it may be shown anywhere — a log, a warning, `cqrs.status()` to readers, a
/// dead letter's `error`: its SQLSTATE, with PostgreSQL's message only where that class's
/// messages never carry values (the portable edition's `cqrs_portable._summarize_error`).
pub(crate) fn summarize(sqlstate: &str, message: &str) -> String {
    if CLASSES_NAMING_OBJECTS_ONLY
        .iter()
        .any(|class| sqlstate.starts_with(class))
    {
        format!("SQLSTATE {sqlstate}: {message}")
    } else {
        format!("SQLSTATE {sqlstate}")
    }
}

impl Failure {
    /// The whole error as one line: message and detail, which may hold a command's values.
    /// Kept where readers and logs do not reach (`last_error_detail`, `error_detail`).
    pub(crate) fn describe(&self) -> String {
        match &self.detail {
            Some(detail) => format!("{} ({detail})", self.message),
            None => self.message.clone(),
        }
    }

    /// The error as it may be shown anywhere (see [`summarize`]).
    pub(crate) fn summary(&self) -> String {
        self.recorded_summary
            .clone()
            .unwrap_or_else(|| summarize(&self.sqlstate, &self.message))
    }
}

/// The five-character SQLSTATE of `code` (PostgreSQL packs it in six-bit groups).
pub(crate) fn sqlstate(code: PgSqlErrorCode) -> String {
    let packed = code as i32;
    (0..5)
        .map(|i| char::from((((packed >> (6 * i)) & 0x3F) as u8) + b'0'))
        .collect()
}

fn failure(caught: CaughtError) -> Failure {
    match caught {
        CaughtError::PostgresError(report) | CaughtError::ErrorReport(report) => Failure {
            sqlstate: sqlstate(report.sql_error_code()),
            message: report.message().to_owned(),
            detail: report.detail().map(str::to_owned),
            recorded_summary: None,
        },
        CaughtError::RustPanic { ereport, .. } => Failure {
            sqlstate: sqlstate(ereport.sql_error_code()),
            message: ereport.message().to_owned(),
            detail: None,
            recorded_summary: None,
        },
    }
}

/// Runs `work` in a subtransaction. `Ok` commits the subtransaction; an `Err` from `work` or an
/// ERROR raised inside it rolls the subtransaction back and is returned as a [`Failure`].
pub(crate) fn run<T>(work: impl FnOnce() -> Result<T, ErrorReport>) -> Result<T, Failure> {
    // SAFETY: the classic internal-subtransaction sequence (as in PL/pgSQL's exec_stmt_block):
    // remember the memory context and resource owner, start the subtransaction, and on the way
    // out (success or failure) release or roll it back and restore both.
    unsafe {
        let context = pg_sys::CurrentMemoryContext;
        let owner = pg_sys::CurrentResourceOwner;
        pg_sys::BeginInternalSubTransaction(std::ptr::null());
        pg_sys::MemoryContextSwitchTo(context);

        let result = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| match work() {
            Ok(value) => Ok(value),
            // raise it so that it is caught below like any other ERROR, with its SQLSTATE
            Err(report) => {
                report.report(PgLogLevel::ERROR);
                unreachable!("ERROR does not return")
            }
        }))
        .catch_others(|caught| Err(failure(caught)))
        .execute();

        match result {
            Ok(value) => {
                pg_sys::ReleaseCurrentSubTransaction();
                pg_sys::MemoryContextSwitchTo(context);
                pg_sys::CurrentResourceOwner = owner;
                Ok(value)
            }
            Err(failure) => {
                pg_sys::RollbackAndReleaseCurrentSubTransaction();
                pg_sys::MemoryContextSwitchTo(context);
                pg_sys::CurrentResourceOwner = owner;
                Err(failure)
            }
        }
    }
}
