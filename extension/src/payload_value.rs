//! A jsonb document (a command's payload or metadata) as the `serde_json` value the validator and
//! the projector read, built from jsonb's binary form.
//!
//! Printing the jsonb as text and parsing that text again cost more than the validation itself
//! for a typical payload (perf: `jsonb_out` and serde's parser, about half of the schema check), and
//! a third of a rebuild's time. Walking the jsonb's tokens builds the same value directly:
//! strings are copied as they are, numbers go through `numeric_out` and serde's number parser
//! exactly as they would inside the printed document, keys come in jsonb's order, so the value is
//! the one the text round trip gave (a pg_test holds them equal).

use std::ffi::CStr;

use pgrx::prelude::*;
use serde_json::{Map, Number, Value};

/// A container being filled while the tokens are read.
enum Open {
    Array(Vec<Value>),
    Object(Map<String, Value>, Option<String>),
}

impl Open {
    fn push(&mut self, value: Value) {
        match self {
            Open::Array(items) => items.push(value),
            Open::Object(members, key) => {
                if let Some(key) = key.take() {
                    members.insert(key, value);
                }
            }
        }
    }

    fn close(self) -> Value {
        match self {
            Open::Array(items) => Value::Array(items),
            Open::Object(members, _) => Value::Object(members),
        }
    }
}

/// How far [`from_jsonb`] goes before it gives the document back to the text round trip, whose
/// rules (and error messages) then apply unchanged.
#[derive(Clone, Copy)]
pub(crate) struct Budget {
    /// The most bytes the document's JSON text may take: past an upper bound of that length
    /// (every string character counted as an escape), the caller prints it and measures.
    pub(crate) max_text_bytes: usize,
    /// The deepest nesting: serde's parser refuses more than 128 levels.
    pub(crate) max_depth: usize,
}

impl Budget {
    /// No bound but serde's own nesting limit (what the validator's text round trip had).
    pub(crate) const UNBOUNDED: Budget = Budget {
        max_text_bytes: usize::MAX,
        max_depth: 120,
    };
}

/// The value of the jsonb `datum`; `None` when a string is not UTF-8 (a database in another
/// encoding), a number does not fit what serde parses, or the document may be past `budget`:
/// the caller then takes the text round trip.
///
/// # Safety
/// `datum` must be a detoasted, non-null jsonb Datum valid for this call.
pub(crate) unsafe fn from_jsonb(datum: pg_sys::Datum, budget: Budget) -> Option<Value> {
    use pg_sys::JsonbIteratorToken::*;
    // SAFETY: per the contract datum is a detoasted jsonb; the iterator reads only its root
    // container, and each JsonbValue it fills is read as the type its type_ tag says.
    unsafe {
        let jsonb = datum.cast_mut_ptr::<pg_sys::Jsonb>();
        // the empty object most metadata is: its root header alone says so
        let header = (*jsonb).root.header;
        if header & pg_sys::JB_FOBJECT != 0 && header & pg_sys::JB_CMASK == 0 {
            return Some(Value::Object(Map::new()));
        }
        let mut iterator = pg_sys::JsonbIteratorInit(&mut (*jsonb).root);
        let mut token_value: pg_sys::JsonbValue = std::mem::zeroed();
        let mut open: Vec<Open> = Vec::new();
        // a scalar document is stored as a one-element "raw scalar" array
        let mut raw_scalar = false;
        let mut root = None;
        // an upper bound of the JSON text's length so far: brackets, ", " and ": " between items
        let mut text_bytes = 0usize;
        loop {
            let token = pg_sys::JsonbIteratorNext(&mut iterator, &mut token_value, false);
            text_bytes = text_bytes.saturating_add(4);
            if text_bytes > budget.max_text_bytes || open.len() > budget.max_depth {
                return None;
            }
            match token {
                WJB_DONE => break,
                WJB_BEGIN_ARRAY => {
                    if open.is_empty() && token_value.val.array.rawScalar {
                        raw_scalar = true;
                    }
                    let len = usize::try_from(token_value.val.array.nElems).unwrap_or(0);
                    open.push(Open::Array(Vec::with_capacity(len)));
                }
                WJB_BEGIN_OBJECT => open.push(Open::Object(Map::new(), None)),
                WJB_KEY => {
                    let key = string(&token_value)?;
                    text_bytes = text_bytes.saturating_add(escaped_len(&key));
                    if let Some(Open::Object(_, pending)) = open.last_mut() {
                        *pending = Some(key);
                    }
                }
                WJB_VALUE | WJB_ELEM => {
                    let (value, printed) = scalar(&token_value)?;
                    text_bytes = text_bytes.saturating_add(printed);
                    open.last_mut()?.push(value);
                }
                WJB_END_ARRAY | WJB_END_OBJECT => {
                    let closed = open.pop()?.close();
                    match open.last_mut() {
                        Some(parent) => parent.push(closed),
                        None => root = Some(closed),
                    }
                }
                _ => return None,
            }
        }
        match root? {
            Value::Array(mut items) if raw_scalar && items.len() == 1 => items.pop(),
            value => Some(value),
        }
    }
}

/// The member `key` of the jsonb object container `object`, if there is one (looked up in
/// place: jsonb keeps an object's keys sorted).
///
/// # Safety
/// `object` must point to a jsonb object container valid for this call.
pub(crate) unsafe fn member(object: *mut pg_sys::JsonbContainer, key: &str) -> Option<pg_sys::JsonbValue> {
    // SAFETY: per the contract; the key is looked up without copying the container.
    unsafe {
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        let found =
            pg_sys::getKeyJsonValueFromContainer(object, key.as_ptr().cast(), key.len() as i32, &mut value);
        (!found.is_null()).then_some(value)
    }
}

/// The most bytes `text` takes as a JSON string: quotes, and every byte escaped as `\u00XX`.
fn escaped_len(text: &str) -> usize {
    text.len().saturating_mul(6).saturating_add(2)
}

/// The scalar `value` and an upper bound of its length as JSON text.
///
/// # Safety
/// `value` must be a JsonbValue the iterator filled.
unsafe fn scalar(value: &pg_sys::JsonbValue) -> Option<(Value, usize)> {
    // SAFETY: each union member is read under the tag that says it is the one set.
    unsafe {
        match value.type_ {
            pg_sys::jbvType::jbvNull => Some((Value::Null, 4)),
            pg_sys::jbvType::jbvBool => Some((Value::Bool(value.val.boolean), 5)),
            pg_sys::jbvType::jbvString => {
                let text = string(value)?;
                let printed = escaped_len(&text);
                Some((Value::String(text), printed))
            }
            pg_sys::jbvType::jbvNumeric => {
                let text = pgrx::direct_function_call_as_datum(
                    pg_sys::numeric_out,
                    &[Some(pg_sys::Datum::from(value.val.numeric))],
                )?;
                let text = CStr::from_ptr(text.cast_mut_ptr::<std::ffi::c_char>())
                    .to_str()
                    .ok()?;
                let number = serde_json::from_str::<Number>(text).ok()?;
                Some((Value::Number(number), text.len()))
            }
            _ => None,
        }
    }
}

/// # Safety
/// `value` must be a jbvString JsonbValue the iterator filled.
unsafe fn string(value: &pg_sys::JsonbValue) -> Option<String> {
    // SAFETY: a jbvString's val/len point into the jsonb, which outlives this call.
    unsafe {
        let len = usize::try_from(value.val.string.len).ok()?;
        let bytes = if len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(value.val.string.val as *const u8, len)
        };
        std::str::from_utf8(bytes).ok().map(str::to_owned)
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn the_value_is_the_one_the_text_round_trip_gives() {
        for doc in [
            r#"{}"#,
            r#"[]"#,
            r#"{"a": 1, "b": [true, false, null], "c": {"d": "e"}}"#,
            r#"{"n": [0, -0, 1.0, 1.50, -2.5e-7, 1e21, 12345678901234567890, 123456789012345678901234567890, 0.1]}"#,
            r#"{"s": "tab\tquote\" backslash\\ é ☃ 😀 \u0001", "": "", "nested": [[[]], {}, [{}]]}"#,
            r#"{"z": 1, "a": 2, "aa": 3, "b": {"y": [1, "2", {"x": null}]}}"#,
            r#"[1, 2, 3]"#,
            r#""scalar""#,
            r#"42"#,
            r#"null"#,
        ] {
            let jsonb = Spi::get_one::<pgrx::JsonB>(&format!("select '{}'::jsonb", doc.replace('\'', "''")))
                .expect("spi")
                .expect("a document");
            let datum = jsonb.into_datum().expect("a datum");
            // SAFETY: a jsonb made just now in this context, detoasted here.
            let detoasted = unsafe { pg_sys::pg_detoast_datum(datum.cast_mut_ptr()) };
            // SAFETY: as above.
            let direct =
                unsafe { super::from_jsonb(pg_sys::Datum::from(detoasted), super::Budget::UNBOUNDED) };
            // SAFETY: as above.
            let round_trip = unsafe { pgrx::JsonB::from_datum(pg_sys::Datum::from(detoasted), false) }
                .expect("a value")
                .0;
            assert_eq!(direct.as_ref(), Some(&round_trip), "{doc}");
            // the same text too: serde_json's Number keeps i64/u64/f64 apart
            assert_eq!(
                direct.map(|v| v.to_string()),
                Some(round_trip.to_string()),
                "{doc}"
            );
        }
    }
}
