//! Building the `ErrorReport`s the extension raises: every error has a real SQLSTATE.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// An error with `code` and `message`.
#[track_caller]
pub(crate) fn error(code: PgSqlErrorCode, message: impl Into<String>) -> ErrorReport {
    ErrorReport::new(code, message.into(), "pg_cqrs")
}

/// Something that should not happen (XX000), with what was being done.
#[track_caller]
pub(crate) fn internal(message: impl Into<String>) -> ErrorReport {
    error(PgSqlErrorCode::ERRCODE_INTERNAL_ERROR, message)
}

/// An SPI failure while `context` (never discarded: it becomes the error).
#[track_caller]
pub(crate) fn spi_error(context: &str, err: pgrx::spi::Error) -> ErrorReport {
    internal(format!("{context}: {err}"))
}
