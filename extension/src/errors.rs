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

/// A column of an SPI row; a failure to read it names the column.
#[track_caller]
pub(crate) fn column<T>(
    value: pgrx::spi::SpiResult<Option<T>>,
    name: &str,
) -> Result<Option<T>, ErrorReport> {
    value.map_err(|err| spi_error(&format!("reading {name}"), err))
}

/// A required argument that was NULL (22004).
#[track_caller]
pub(crate) fn null_argument(what: &str) -> ErrorReport {
    error(
        PgSqlErrorCode::ERRCODE_NULL_VALUE_NOT_ALLOWED,
        format!("{what} must not be null"),
    )
}

/// A projection name that names none (42704).
#[track_caller]
pub(crate) fn unknown_projection(name: &str) -> ErrorReport {
    error(
        PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
        format!("projection {name:?} does not exist"),
    )
}
