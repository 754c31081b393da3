//! The W3C trace context a command carries in its metadata (`traceparent`, `tracestate`):
//! `cqrs.append` refuses a malformed one (22023) so that the sidecar, which continues the trace
//! from it, never meets one it cannot read. The rules are `cqrs_projection::trace_context`'s,
//! shared with the sidecar; the portable edition applies the same in PL/pgSQL
//! (`cqrs_portable._check_trace_context`).

use cqrs_projection::trace_context::{
    check_tracestate, parse_traceparent, TraceContextError, TRACEPARENT_KEY, TRACESTATE_KEY,
};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::errors::error;

/// What a metadata key holds, as far as the trace context cares.
enum Member<'a> {
    Absent,
    String(&'a [u8]),
    Other,
}

/// The member `key` of the metadata object.
///
/// # Safety
/// `datum` must be a detoasted, non-null jsonb object Datum valid for `'a` (the current call).
unsafe fn member<'a>(datum: pg_sys::Datum, key: &str) -> Member<'a> {
    // SAFETY: per the contract the datum is a detoasted jsonb; the key is looked up in its root
    // object without copying the document, and a found string points into it (valid for 'a).
    unsafe {
        let jsonb = datum.cast_mut_ptr::<pg_sys::Jsonb>();
        let Some(value) = crate::payload_value::member(&mut (*jsonb).root, key) else {
            return Member::Absent;
        };
        if value.type_ != pg_sys::jbvType::jbvString {
            return Member::Other;
        }
        let string = value.val.string;
        let len = usize::try_from(string.len).unwrap_or(0);
        if len == 0 {
            return Member::String(&[]);
        }
        Member::String(std::slice::from_raw_parts(string.val.cast::<u8>(), len))
    }
}

/// Refuses a metadata object whose `traceparent` or `tracestate` breaks W3C Trace Context.
///
/// # Safety
/// As [`member`].
pub(crate) unsafe fn check(metadata: pg_sys::Datum) -> Result<(), ErrorReport> {
    // SAFETY: per the contract.
    let (traceparent, tracestate) = unsafe {
        (
            member(metadata, TRACEPARENT_KEY),
            member(metadata, TRACESTATE_KEY),
        )
    };
    let refused = |rule: TraceContextError| {
        error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, rule.to_string()).set_hint(
            "Pass the traceparent of the application's current span as OpenTelemetry's propagator writes it, or leave the key out (README, Observability).",
        )
    };
    match traceparent {
        Member::Absent => {}
        Member::Other => return Err(refused(TraceContextError::TraceparentNotString)),
        Member::String(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|_| refused(TraceContextError::Malformed))?;
            parse_traceparent(text).map_err(refused)?;
        }
    }
    match tracestate {
        Member::Absent => Ok(()),
        Member::Other => Err(refused(TraceContextError::BadTracestate)),
        Member::String(bytes) => {
            let text = std::str::from_utf8(bytes).map_err(|_| refused(TraceContextError::BadTracestate))?;
            check_tracestate(text).map_err(refused)
        }
    }
}
