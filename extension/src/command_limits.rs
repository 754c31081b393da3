//! Size and nesting limits on what `cqrs.append` accepts: the command side refuses what the
//! projection side could not read (a payload nested deeper than a JSON parser's recursion
//! limit would otherwise be accepted and then fail every batch that holds it), and what would
//! make every reader of the log allocate without bound.
//!
//! Depth is counted as jsonpath counts levels (`$.**{n}`): the root is level 0, its members
//! level 1, and so on through objects and arrays alike; keys are not levels. The portable
//! edition checks the same with `jsonb_path_exists(doc, 'lax $.**{N to last}')`.

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::errors::error;
use crate::settings;

/// Which document of a command is checked.
#[derive(Clone, Copy)]
pub(crate) enum Document {
    Payload,
    Metadata,
}

impl Document {
    fn name(self) -> &'static str {
        match self {
            Document::Payload => "payload",
            Document::Metadata => "metadata",
        }
    }

    fn max_bytes(self) -> (&'static str, i32) {
        match self {
            Document::Payload => ("cqrs.max_payload_bytes", settings::MAX_PAYLOAD_BYTES.get()),
            Document::Metadata => ("cqrs.max_metadata_bytes", settings::MAX_METADATA_BYTES.get()),
        }
    }
}

/// Refuses `datum` (a detoasted jsonb) when it is larger or nests deeper than the settings allow
/// (SQLSTATE 54000, naming the setting).
///
/// # Safety
/// `datum` must be a detoasted, non-null jsonb Datum (4-byte header) valid for this call.
pub(crate) unsafe fn check(document: Document, datum: pg_sys::Datum) -> Result<(), ErrorReport> {
    let (setting, max_bytes) = document.max_bytes();
    // SAFETY: per the contract, datum points at a detoasted varlena.
    let bytes = unsafe { pgrx::varlena::varsize_any(datum.cast_mut_ptr::<pg_sys::varlena>()) };
    if bytes > usize::try_from(max_bytes).unwrap_or(usize::MAX) {
        return Err(error(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!("{} is larger than {setting} ({max_bytes} bytes)", document.name()),
        )
        .set_hint(format!(
            "Keep large documents elsewhere and put a reference in the command, or have pg_cqrs's installer raise {setting} (README, Settings)."
        )));
    }
    let max_depth = settings::MAX_JSON_DEPTH.get();
    let limit = usize::try_from(max_depth).unwrap_or(0);
    if !could_be_deeper_than(bytes, limit) {
        return Ok(());
    }
    // SAFETY: per the contract.
    if unsafe { deeper_than(datum, limit) } {
        return Err(error(
            PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
            format!(
                "{} nests deeper than cqrs.max_json_depth ({max_depth} levels)",
                document.name()
            ),
        )
        .set_hint("Flatten the document; projections read at most cqrs.max_json_depth levels."));
    }
    Ok(())
}

/// Whether a jsonb of `bytes` bytes (varlena header included) is big enough for a value below
/// level `limit`. That takes `limit + 1` containers one inside the other, and in jsonb's binary
/// form each container costs a 4-byte header, each but the root a 4-byte entry in its parent, and
/// the innermost a 4-byte entry for its value: at least `8 * (limit + 1)` bytes with the 4-byte
/// varlena header. Smaller documents — nearly every command at the default limit of 64, where the
/// bound is 520 bytes — skip the walk token by token, about 1 % of an append's time (perf).
fn could_be_deeper_than(bytes: usize, limit: usize) -> bool {
    bytes >= limit.saturating_add(1).saturating_mul(8)
}

/// Whether any value of the jsonb `datum` sits below level `limit` (the root is level 0).
///
/// # Safety
/// As [`check`].
unsafe fn deeper_than(datum: pg_sys::Datum, limit: usize) -> bool {
    use pg_sys::JsonbIteratorToken::*;
    // SAFETY: the iterator walks the detoasted jsonb's root container; it allocates in the
    // current memory context, which the call's end resets (also when we stop early).
    unsafe {
        let jsonb = datum.cast_mut_ptr::<pg_sys::Jsonb>();
        let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        // containers open around the next token: the level of a value read now
        let mut open = 0usize;
        loop {
            match pg_sys::JsonbIteratorNext(&mut iterator, &mut value, false) {
                WJB_DONE => return false,
                WJB_BEGIN_ARRAY | WJB_BEGIN_OBJECT => {
                    if open > limit {
                        return true;
                    }
                    open += 1;
                }
                WJB_END_ARRAY | WJB_END_OBJECT => open = open.saturating_sub(1),
                WJB_VALUE | WJB_ELEM if open > limit => return true,
                _ => {}
            }
        }
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    fn deepest_allowed(json: &str, limit: usize) -> bool {
        let datum = Spi::get_one::<pgrx::JsonB>(&format!("select '{json}'::jsonb"))
            .expect("spi")
            .expect("a document");
        let datum = datum.into_datum().expect("a datum");
        // SAFETY: a detoasted jsonb built just now in this context.
        let detoasted = unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) };
        // SAFETY: `detoasted` is the jsonb just detoasted above, valid for this memory context.
        let deeper = unsafe { super::deeper_than(pg_sys::Datum::from(detoasted), limit) };
        !deeper
    }

    #[pg_test]
    fn a_document_too_small_to_nest_too_deep_never_does() {
        // the smallest documents with a value below each level: arrays of arrays around a null
        for limit in 0..8usize {
            let doc = format!("{}null{}", "[".repeat(limit + 1), "]".repeat(limit + 1));
            assert!(!deepest_allowed(&doc, limit), "{doc} is too deep at {limit}");
            let bytes = Spi::get_one::<i32>(&format!("select pg_column_size('{doc}'::jsonb)"))
                .expect("spi")
                .expect("a size");
            let bytes = usize::try_from(bytes).expect("a size");
            assert!(
                super::could_be_deeper_than(bytes, limit),
                "{doc} ({bytes} bytes) is too deep at {limit} but the size bound says it cannot be"
            );
        }
    }

    #[pg_test]
    fn levels_are_counted_as_jsonpath_counts_them() {
        // agrees with jsonb_path_exists(doc, 'lax $.**{N to last}') for every N around the depth
        for doc in [
            r#"{}"#,
            r#"{"a": 1}"#,
            r#"{"a": {}}"#,
            r#"{"a": {"b": [1, [2]]}}"#,
            r#"{"a": [[[]]]}"#,
        ] {
            for limit in 0..6usize {
                let path_says = Spi::get_one::<bool>(&format!(
                    "select not jsonb_path_exists('{doc}'::jsonb, 'lax $.**{{{} to last}}')",
                    limit + 1
                ))
                .expect("spi")
                .expect("a boolean");
                assert_eq!(deepest_allowed(doc, limit), path_says, "{doc} at limit {limit}");
            }
        }
    }
}
