//! The C calling convention of the functions written by hand (instead of `#[pg_extern]`, to
//! read arguments and return rows without converting them): their `pg_finfo_*` records, reading
//! arguments, raising an error, and returning a materialised set. Every C entry point of the
//! extension uses these; their SQL declarations are in `sql/extension/functions.sql`.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

/// Declares `pg_finfo_<symbol>`, which tells PostgreSQL the function uses the version-1
/// calling convention.
macro_rules! v1_function {
    ($finfo:ident) => {
        #[unsafe(no_mangle)]
        #[doc(hidden)]
        pub extern "C" fn $finfo() -> &'static pg_sys::Pg_finfo_record {
            const V1_API: pg_sys::Pg_finfo_record = pg_sys::Pg_finfo_record { api_version: 1 };
            &V1_API
        }
    };
}
pub(crate) use v1_function;

/// Raises `report` as an ERROR (which unwinds to PostgreSQL and does not return).
pub(crate) fn raise(report: ErrorReport) -> ! {
    report.report(PgLogLevel::ERROR);
    unreachable!("ERROR does not return")
}

/// The value of a call, or its error raised.
pub(crate) fn or_raise<T>(result: Result<T, ErrorReport>) -> T {
    result.unwrap_or_else(|report| raise(report))
}

/// Argument `n`, `None` when SQL NULL.
///
/// # Safety
/// `fcinfo` must be a valid call info with at least `n + 1` arguments.
pub(crate) unsafe fn arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<pg_sys::Datum> {
    // SAFETY: per the contract.
    unsafe {
        if pgrx::fcinfo::pg_arg_is_null(fcinfo, n) {
            None
        } else {
            Some(pgrx::fcinfo::pg_getarg_datum_raw(fcinfo, n))
        }
    }
}

/// A text argument as a Rust string.
///
/// # Safety
/// As [`arg`], and argument `n` must be of type text.
pub(crate) unsafe fn text_arg(fcinfo: pg_sys::FunctionCallInfo, n: usize) -> Option<String> {
    // SAFETY: per the contract.
    unsafe { arg(fcinfo, n).and_then(|d| String::from_datum(d, false)) }
}

/// Returns `rows` as the function's materialised result set, each row as Datums and nulls in
/// the order of the function's result columns.
///
/// # Safety
/// `fcinfo` must be the call info of a set-returning function whose result columns have the
/// types of the Datums `row` gives.
pub(crate) unsafe fn return_set<R, const N: usize>(
    fcinfo: pg_sys::FunctionCallInfo,
    rows: impl IntoIterator<Item = R>,
    row: impl Fn(R) -> ([pg_sys::Datum; N], [bool; N]),
) -> pg_sys::Datum {
    // SAFETY: InitMaterializedSRF checks that the caller accepts a materialised set and sets up
    // the tuplestore and descriptor; every value put is a valid Datum of its column's type (the
    // caller's contract).
    unsafe {
        pg_sys::InitMaterializedSRF(fcinfo, 0);
        let rsinfo = (*fcinfo).resultinfo as *mut pg_sys::ReturnSetInfo;
        for r in rows {
            let (mut values, mut nulls) = row(r);
            pg_sys::tuplestore_putvalues(
                (*rsinfo).setResult,
                (*rsinfo).setDesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
        pg_sys::Datum::from(0)
    }
}

/// Returns one row of a function declared with OUT parameters (a composite).
///
/// # Safety
/// `fcinfo` must be the call info of a function returning a composite whose columns have the
/// types of `values`.
pub(crate) unsafe fn return_record<const N: usize>(
    fcinfo: pg_sys::FunctionCallInfo,
    function: &str,
    mut values: [pg_sys::Datum; N],
    mut nulls: [bool; N],
) -> pg_sys::Datum {
    // SAFETY: the standard composite-return sequence; memory is allocated in the caller's
    // context (SPI has been finished by now).
    unsafe {
        let mut tupdesc: pg_sys::TupleDesc = std::ptr::null_mut();
        let class = pg_sys::get_call_result_type(fcinfo, std::ptr::null_mut(), &mut tupdesc);
        if class != pg_sys::TypeFuncClass::TYPEFUNC_COMPOSITE || tupdesc.is_null() {
            raise(crate::errors::error(
                PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
                format!("{function} must be called in a context that accepts a record"),
            ));
        }
        let tupdesc = pg_sys::BlessTupleDesc(tupdesc);
        let tuple = pg_sys::heap_form_tuple(tupdesc, values.as_mut_ptr(), nulls.as_mut_ptr());
        pgrx::htup::heap_tuple_get_datum(tuple)
    }
}
