//! The fence of a batch: `cqrs._fence(fencing_token, commit_lsn, projection_group)`
//! (sql/core/projection.sql), the one SQL function both editions call before a batch is applied.
//! It raises pg_cqrs's own SQLSTATE QC001 for a caller that does not hold the group's lease, on
//! which alone the sidecar stops projecting.
//!
//! Why the call is made through raw SPI, not pgrx's: pgrx turns every ERROR that crosses Rust
//! into one of the SQLSTATEs PostgreSQL defines (QC001 would reach the caller as XX000). Called
//! first thing in a C function, through SPI functions declared here, an ERROR from the fence
//! returns to PostgreSQL's own handler unchanged, jumping over the calling frame; so the calling
//! frame must hold nothing that needs dropping when it calls [`check`].

use pgrx::pg_sys::{self, Datum, Oid};
use std::ffi::{c_char, c_int, c_long};

// The SPI entry points themselves, without pgrx's guard that would catch an ERROR.
unsafe extern "C-unwind" {
    fn SPI_connect() -> c_int;
    fn SPI_execute_with_args(
        src: *const c_char,
        nargs: c_int,
        argtypes: *mut Oid,
        values: *mut Datum,
        nulls: *const c_char,
        read_only: bool,
        tcount: c_long,
    ) -> c_int;
    fn SPI_finish() -> c_int;
}

/// Whether the installed SQL has `cqrs._fence` and projection groups (0.3.0 on); this library
/// also serves a database of an earlier release until it is upgraded.
///
/// # Safety
/// Must be called by a C function invoked by PostgreSQL, inside a transaction.
#[pgrx::pg_guard]
pub(crate) unsafe extern "C-unwind" fn installed() -> bool {
    pgrx::Spi::get_one::<bool>(
        "select pg_catalog.to_regprocedure('cqrs._fence(pg_catalog.int8, pg_catalog.pg_lsn, pg_catalog.text)') is not null",
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// The fence could not even be asked (an SPI failure, not a refusal).
#[derive(Debug)]
pub(crate) struct Unchecked;

/// Checks the fence of a batch; an ERROR it raises (QC001, 22023) goes to the caller as is.
///
/// # Safety
/// Must be called from a C function invoked by PostgreSQL, inside a transaction, while no Rust
/// value that needs dropping is alive in the calling frames up to PostgreSQL's: an ERROR does not
/// return from here.
/// `group` is the text Datum of the call's own argument, passed on as it is.
pub(crate) unsafe fn check(
    token: Option<i64>,
    commit_lsn: Option<u64>,
    group: Option<Datum>,
) -> Result<(), Unchecked> {
    let mut types = [pg_sys::INT8OID, pg_sys::PG_LSNOID, pg_sys::TEXTOID];
    // int8 and pg_lsn are passed by value (64-bit Datums); text by reference, a pointer into the
    // caller's arguments, which outlive this call
    let mut values = [
        Datum::from(token.unwrap_or(0)),
        Datum::from(commit_lsn.unwrap_or(0)),
        group.unwrap_or(Datum::from(0usize)),
    ];
    let null = |absent: bool| if absent { b'n' as c_char } else { b' ' as c_char };
    let nulls = [
        null(token.is_none()),
        null(commit_lsn.is_none()),
        null(group.is_none()),
    ];
    // SAFETY: the standard SPI sequence with arrays that outlive the call; per the contract an
    // ERROR may longjmp from SPI_execute_with_args over the caller, which holds nothing to drop.
    unsafe {
        if SPI_connect() < 0 {
            return Err(Unchecked);
        }
        let done = SPI_execute_with_args(
            c"select cqrs._fence($1, $2, $3)".as_ptr(),
            3,
            types.as_mut_ptr(),
            values.as_mut_ptr(),
            nulls.as_ptr(),
            false,
            0,
        );
        SPI_finish();
        if done < 0 {
            return Err(Unchecked);
        }
    }
    Ok(())
}
