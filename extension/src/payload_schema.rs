//! JSON Schema validation of command payloads.
//!
//! `cqrs.register_command_type()` stores a schema with a version that is bumped on every
//! re-registration. `cqrs.append()` validates against the version the command registry reports,
//! so a backend's cached compiled schema is replaced as soon as any session re-registers the
//! type.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::JsonB;

use crate::payload_value;

/// Compiled schemas kept per backend. Command types are few; the bound only stops a pathological
/// workload that registers thousands of types from growing a backend without limit.
const CACHE_CAPACITY: usize = 1024;

/// How many schema violations are listed in the error's DETAIL.
const MAX_REPORTED_VIOLATIONS: usize = 5;

/// Largest compiled size of one `pattern`, in bytes.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

struct Compiled {
    version: i64,
    validator: Rc<jsonschema::Validator>,
}

thread_local! {
    // Postgres backends are single-threaded; a thread-local is a per-backend cache.
    static CACHE: RefCell<HashMap<String, Compiled>> = RefCell::new(HashMap::new());
}

/// The JSON types a `type` keyword may name.
const JSON_TYPES: [&str; 7] = [
    "null", "boolean", "object", "array", "number", "integer", "string",
];

/// A `type` that names no JSON type, anywhere a subschema sits, reported as the portable edition
/// reports it (the meta-schema's own message, "not valid under any of the schemas listed in the
/// 'anyOf' keyword", says nothing a user can act on).
fn type_error(schema: &serde_json::Value, at: &str) -> Option<String> {
    let object = schema.as_object()?;
    let pointer = |parent: &str, key: &str| format!("{parent}/{}", key.replace('~', "~0").replace('/', "~1"));
    if let Some(types) = object.get("type") {
        let names: Vec<&serde_json::Value> = match types {
            serde_json::Value::Array(items) => items.iter().collect(),
            other => vec![other],
        };
        for name in names {
            if !name.as_str().is_some_and(|n| JSON_TYPES.contains(&n)) {
                return Some(format!("{name} is not a type (at {})", pointer(at, "type")));
            }
        }
    }
    for (keyword, value) in object {
        let found = match (keyword.as_str(), value) {
            (
                "properties" | "patternProperties" | "$defs" | "definitions",
                serde_json::Value::Object(members),
            ) => members
                .iter()
                .find_map(|(name, sub)| type_error(sub, &pointer(&pointer(at, keyword), name))),
            ("prefixItems" | "allOf" | "anyOf" | "oneOf", serde_json::Value::Array(items)) => items
                .iter()
                .enumerate()
                .find_map(|(i, sub)| type_error(sub, &pointer(&pointer(at, keyword), &i.to_string()))),
            ("additionalProperties" | "items" | "not", sub) => type_error(sub, &pointer(at, keyword)),
            _ => None,
        };
        if found.is_some() {
            return found;
        }
    }
    None
}

fn compile(schema: &serde_json::Value) -> Result<jsonschema::Validator, String> {
    if let Some(reason) = type_error(schema, "") {
        return Err(reason);
    }
    jsonschema::options()
        // "format" is only an annotation by default in drafts 2019-09 and later; users who write
        // "format": "email" expect it to be enforced (idn-hostname and idn-email included: the
        // crate's idna feature is on, so no format is silently ignored).
        .should_validate_formats(true)
        // `pattern` and `patternProperties` on the linear-time regex engine: a backtracking one
        // can spend minutes on one payload, inside a backend where statement_timeout cannot
        // interrupt it. Patterns that need backtracking (look-around, back-references) are
        // refused at registration.
        .with_pattern_options(jsonschema::PatternOptions::regex().size_limit(REGEX_SIZE_LIMIT))
        .build(schema)
        // The schema is not row data, so the unmasked message (with the offending value) is fine.
        .map_err(|err| format!("{} (at {})", err, pointer_or_root(err.instance_path().as_str())))
}

fn invalid_schema(reason: &str) -> ErrorReport {
    ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("json_schema is not a valid JSON Schema: {reason}"),
        function_name!(),
    )
}

/// Whether `schema` has a `$ref` that points outside itself (another document, a file).
fn has_remote_ref(schema: &serde_json::Value) -> bool {
    match schema {
        serde_json::Value::Object(members) => members.iter().any(|(keyword, value)| {
            (keyword == "$ref" && value.as_str().is_some_and(|r| !r.starts_with('#')))
                || has_remote_ref(value)
        }),
        serde_json::Value::Array(items) => items.iter().any(has_remote_ref),
        _ => false,
    }
}

/// Raises 22023 unless `json_schema` compiles.
#[pg_extern(sql = false)]
fn check_json_schema(json_schema: JsonB) -> Result<(), ErrorReport> {
    compile(&json_schema.0).map(|_| ()).map_err(|reason| {
        let report = invalid_schema(&reason);
        if has_remote_ref(&json_schema.0) {
            report.set_hint(
                "Schemas must be self-contained: remote and file $refs are not resolved inside the database.",
            )
        } else {
            report
        }
    })
}

fn load(command_type: &str) -> Result<Option<(i64, serde_json::Value)>, ErrorReport> {
    let row = Spi::get_two_with_args::<i64, JsonB>(
        "select t.version, t.json_schema from cqrs.command_type t where t.command_type = $1",
        &[command_type.into()],
    );
    match row {
        Ok((Some(version), Some(schema))) => Ok(Some((version, schema.0))),
        Ok(_) => Ok(None),
        Err(pgrx::spi::Error::InvalidPosition) => Ok(None),
        Err(err) => Err(crate::errors::spi_error(
            &format!("reading the schema of command type {command_type:?}"),
            err,
        )),
    }
}

/// The compiled validator for `command_type`, compiling and caching it when this backend has not
/// seen `version` yet. `None` when the type is no longer registered.
fn validator(command_type: &str, version: i64) -> Result<Option<Rc<jsonschema::Validator>>, ErrorReport> {
    let cached = CACHE.with_borrow(|cache| {
        cache
            .get(command_type)
            .filter(|c| c.version >= version)
            .map(|c| Rc::clone(&c.validator))
    });
    if let Some(validator) = cached {
        return Ok(Some(validator));
    }
    let Some((current_version, schema)) = load(command_type)? else {
        return Ok(None);
    };
    let validator = Rc::new(compile(&schema).map_err(|reason| invalid_schema(&reason))?);
    CACHE.with_borrow_mut(|cache| {
        if cache.len() >= CACHE_CAPACITY && !cache.contains_key(command_type) {
            cache.clear();
        }
        cache.insert(
            command_type.to_owned(),
            Compiled {
                version: current_version,
                validator: Rc::clone(&validator),
            },
        );
    });
    Ok(Some(validator))
}

/// Raises 22023 with the JSON pointer of the first offending field unless the jsonb `payload`
/// satisfies the schema registered for `command_type` at `version` (or a newer one).
pub(crate) fn validate_datum(
    command_type: &str,
    version: i64,
    payload: pg_sys::Datum,
) -> Result<(), ErrorReport> {
    // SAFETY: payload is a non-null jsonb Datum of the current call; detoasting returns it (or a
    // copy in the call's context) with a 4-byte header.
    let detoasted = pg_sys::Datum::from(unsafe { pg_sys::pg_detoast_datum(payload.cast_mut_ptr()) });
    // SAFETY: as above.
    if let Some(value) = unsafe { payload_value::from_jsonb(detoasted, payload_value::Budget::UNBOUNDED) } {
        return validate(command_type, version, &value);
    }
    // SAFETY: as above.
    let Some(payload) = (unsafe { JsonB::from_datum(detoasted, false) }) else {
        return Ok(());
    };
    validate(command_type, version, &payload.0)
}

fn validate(command_type: &str, version: i64, payload: &serde_json::Value) -> Result<(), ErrorReport> {
    let Some(validator) = validator(command_type, version)? else {
        return Ok(());
    };
    // the happy path stops at the first failing keyword and builds no error; only an invalid
    // payload pays for collecting its violations
    if validator.is_valid(payload) {
        return Ok(());
    }
    let violations: Vec<(String, String)> = validator
        .iter_errors(payload)
        .take(MAX_REPORTED_VIOLATIONS + 1)
        .map(|err| {
            (
                pointer_or_root(err.instance_path().as_str()),
                err.masked().to_string(),
            )
        })
        .collect();
    let Some((pointer, reason)) = violations.first() else {
        return Ok(());
    };
    let mut detail = violations
        .iter()
        .take(MAX_REPORTED_VIOLATIONS)
        .map(|(p, r)| format!("{p}: {r}"))
        .collect::<Vec<_>>()
        .join("; ");
    if violations.len() > MAX_REPORTED_VIOLATIONS {
        detail.push_str("; …");
    }
    Err(ErrorReport::new(
        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
        format!("payload of {command_type} does not match its schema at {pointer}: {reason}"),
        function_name!(),
    )
    .set_detail(format!("Violations: {detail}."))
    .set_hint(format!(
        "See the schema with: select json_schema from cqrs.command_type where command_type = '{}';",
        command_type.replace('\'', "''")
    )))
}

fn pointer_or_root(pointer: &str) -> String {
    if pointer.is_empty() {
        "/".to_owned()
    } else {
        pointer.to_owned()
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;
    use pgrx::JsonB;
    use serde_json::json;

    fn register(command_type: &str, schema: serde_json::Value) -> i64 {
        Spi::get_one_with_args::<i64>(
            "select cqrs.register_command_type($1, $2)",
            &[command_type.into(), JsonB(schema).into()],
        )
        .expect("spi")
        .expect("version")
    }

    #[pg_test]
    fn compiled_schema_is_cached_by_version_and_replaced_on_reregistration() {
        let v1 = register("T", json!({"type": "object", "required": ["a"]}));
        assert!(super::validate("T", v1, &json!({"a": 1})).is_ok());
        assert!(super::validate("T", v1, &json!({})).is_err());

        // a newer registration must be picked up even though v1 is cached
        let v2 = register("T", json!({"type": "object", "required": ["b"]}));
        assert!(v2 > v1);
        assert!(super::validate("T", v2, &json!({"b": 1})).is_ok());
        assert!(super::validate("T", v2, &json!({"a": 1})).is_err());
        let cached = super::CACHE.with_borrow(|c| c.get("T").map(|c| c.version));
        assert_eq!(cached, Some(v2));
    }

    #[pg_test]
    fn violation_names_the_json_pointer() {
        let v = register(
            "ORDER",
            json!({"type": "object", "properties": {"items": {"type": "array",
                "items": {"type": "object", "properties": {"qty": {"type": "integer", "minimum": 1}}}}}}),
        );
        let err = super::validate("ORDER", v, &json!({"items": [{"qty": 1}, {"qty": 0}]}))
            .expect_err("qty 0 is below the minimum");
        assert!(err.message().contains("/items/1/qty"), "{}", err.message());
    }

    #[pg_test]
    fn unregistered_type_is_not_validated() {
        assert!(super::validate("NOPE", 1, &json!({"anything": true})).is_ok());
    }

    #[pg_test]
    fn patterns_run_in_linear_time_and_backtracking_ones_are_refused() {
        // catastrophic for a backtracking engine: minutes; linear here
        let v = register(
            "P",
            json!({"properties": {"s": {"type": "string", "pattern": "^(a+)+$"}}}),
        );
        let evil = format!("{}b", "a".repeat(10_000));
        let started = std::time::Instant::now();
        assert!(super::validate("P", v, &json!({"s": evil})).is_err());
        assert!(
            started.elapsed() < std::time::Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        // look-around needs backtracking: refused when the schema is registered
        let err = super::check_json_schema(JsonB(json!({"properties": {"s": {"pattern": "a(?=b)"}}})))
            .expect_err("look-ahead is refused");
        assert!(
            err.message()
                .starts_with("json_schema is not a valid JSON Schema"),
            "{}",
            err.message()
        );
    }

    #[pg_test]
    fn every_format_is_enforced_idn_included() {
        let v = register(
            "F",
            json!({"properties": {"e": {"format": "idn-email"}, "h": {"format": "idn-hostname"}}}),
        );
        assert!(super::validate(
            "F",
            v,
            &json!({"e": "user@bücher.example", "h": "bücher.example"})
        )
        .is_ok());
        assert!(super::validate("F", v, &json!({"e": "not an email"})).is_err());
        assert!(super::validate("F", v, &json!({"h": "-bad-.example"})).is_err());
    }

    #[pg_test]
    fn invalid_schema_is_refused() {
        let err = super::check_json_schema(JsonB(json!({"type": "no-such-type"}))).expect_err("invalid");
        assert!(
            err.message()
                .starts_with("json_schema is not a valid JSON Schema"),
            "{}",
            err.message()
        );
    }
}
