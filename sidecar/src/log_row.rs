//! A `cqrs.command_log` row from the replication stream, as the JSON object
//! `cqrs.project_batch` takes. The object is written straight from the column texts: payload and
//! metadata are jsonb output, already valid JSON, and are spliced in as they are.

use crate::pgoutput::{Relation, Value};
use crate::traces::{remote_context, CommandTrace};

/// Where each needed column is in the relation (columns are matched by name, so a column added
/// to the table later does not disturb decoding).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogColumns {
    position: usize,
    command_id: usize,
    stream: usize,
    seq: usize,
    command_type: usize,
    payload: usize,
    metadata: usize,
    created_at: usize,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RowError {
    #[error("{relation} has no column {column:?}; is it pg_cqrs's command log?")]
    MissingColumn { relation: String, column: &'static str },
    #[error("command-log column {column} is {problem}")]
    BadValue {
        column: &'static str,
        problem: &'static str,
    },
}

impl LogColumns {
    pub fn resolve(relation: &Relation) -> Result<Self, RowError> {
        let find = |column: &'static str| {
            relation
                .columns
                .iter()
                .position(|c| c == column)
                .ok_or_else(|| RowError::MissingColumn {
                    relation: format!("{}.{}", relation.namespace, relation.name),
                    column,
                })
        };
        Ok(Self {
            position: find("position")?,
            command_id: find("command_id")?,
            stream: find("stream")?,
            seq: find("seq")?,
            command_type: find("command_type")?,
            payload: find("payload")?,
            metadata: find("metadata")?,
            created_at: find("created_at")?,
        })
    }

    /// Appends the row as a JSON object to `out` (nothing is appended when a value is bad).
    pub fn append_json(&self, values: &[Value], out: &mut String) -> Result<(), RowError> {
        let start = out.len();
        let result = (|| {
            out.push_str("{\"position\":");
            out.push_str(integer(values, self.position, "position")?);
            out.push_str(",\"command_id\":");
            push_string(out, text(values, self.command_id, "command_id")?);
            out.push_str(",\"stream\":");
            push_string(out, text(values, self.stream, "stream")?);
            out.push_str(",\"seq\":");
            out.push_str(integer(values, self.seq, "seq")?);
            out.push_str(",\"command_type\":");
            push_string(out, text(values, self.command_type, "command_type")?);
            out.push_str(",\"payload\":");
            out.push_str(text(values, self.payload, "payload")?);
            out.push_str(",\"metadata\":");
            out.push_str(text(values, self.metadata, "metadata")?);
            out.push_str(",\"created_at\":");
            push_string(out, text(values, self.created_at, "created_at")?);
            out.push('}');
            Ok(())
        })();
        if result.is_err() {
            out.truncate(start);
        }
        result
    }
}

fn text<'v>(values: &'v [Value], at: usize, column: &'static str) -> Result<&'v str, RowError> {
    match values.get(at) {
        Some(Value::Text(bytes)) => std::str::from_utf8(bytes).map_err(|_| RowError::BadValue {
            column,
            problem: "not UTF-8",
        }),
        Some(Value::Null) => Err(RowError::BadValue {
            column,
            problem: "null",
        }),
        Some(Value::Binary(_)) => Err(RowError::BadValue {
            column,
            problem: "in binary format",
        }),
        Some(Value::Unchanged) => Err(RowError::BadValue {
            column,
            problem: "an unchanged TOAST value",
        }),
        None => Err(RowError::BadValue {
            column,
            problem: "missing from the tuple",
        }),
    }
}
fn integer<'v>(values: &'v [Value], at: usize, column: &'static str) -> Result<&'v str, RowError> {
    let digits = text(values, at, column)?;
    let body = digits.strip_prefix('-').unwrap_or(digits);
    if body.is_empty() || !body.bytes().all(|b| b.is_ascii_digit()) {
        return Err(RowError::BadValue {
            column,
            problem: "not an integer",
        });
    }
    Ok(digits)
}

impl LogColumns {
    /// The row's command type (`None` when the value is bad: append_json says why).
    pub fn command_type<'v>(&self, values: &'v [Value]) -> Option<&'v str> {
        text(values, self.command_type, "command_type").ok()
    }

    /// The command's trace, when its metadata carries a `traceparent` (which `cqrs.append`
    /// checked). Only asked when traces are exported: it reads the metadata a second time.
    pub fn command_trace(&self, values: &[Value]) -> Option<CommandTrace> {
        /// The trace context keys of a command's metadata (the rest is skipped unread).
        #[derive(serde::Deserialize)]
        struct Carried {
            traceparent: Option<String>,
            tracestate: Option<String>,
        }
        let metadata = text(values, self.metadata, "metadata").ok()?;
        if !metadata.contains("\"traceparent\"") {
            return None;
        }
        let carried: Carried = serde_json::from_str(metadata).ok()?;
        let context = remote_context(carried.traceparent.as_deref()?, carried.tracestate.as_deref())?;
        Some(CommandTrace {
            context,
            command_id: text(values, self.command_id, "command_id").ok()?.to_owned(),
            stream: text(values, self.stream, "stream").ok()?.to_owned(),
            seq: integer(values, self.seq, "seq").ok()?.parse().ok()?,
            command_type: text(values, self.command_type, "command_type").ok()?.to_owned(),
        })
    }
}

fn push_string(out: &mut String, text: &str) {
    out.push_str(&serde_json::Value::String(text.to_owned()).to_string());
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use bytes::Bytes;

    fn relation(columns: &[&str]) -> Relation {
        Relation {
            id: 1,
            namespace: "cqrs".into(),
            name: "command_log".into(),
            columns: columns.iter().map(|c| c.to_string()).collect(),
        }
    }

    /// The command log's columns, as its Relation message names them.
    pub(crate) const COLUMNS: &[&str] = &[
        "position",
        "command_id",
        "stream",
        "seq",
        "command_type",
        "payload",
        "metadata",
        "created_at",
    ];

    fn text(s: &str) -> Value {
        Value::Text(Bytes::copy_from_slice(s.as_bytes()))
    }

    #[test]
    fn writes_the_event_object() {
        let columns = LogColumns::resolve(&relation(COLUMNS)).expect("resolves");
        let values = vec![
            text("42"),
            text("0190a5c8-0000-7000-8000-000000000001"),
            text("order-\"1\""),
            text("3"),
            text("ADD_ITEM"),
            text("{\"qty\": 2, \"note\": \"a\\tb\"}"),
            text("{}"),
            text("2026-11-22 20:29:53.41955+00"),
        ];
        let mut out = String::new();
        columns.append_json(&values, &mut out).expect("appends");
        let parsed: serde_json::Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(parsed["position"], 42);
        assert_eq!(parsed["stream"], "order-\"1\"");
        assert_eq!(parsed["payload"]["note"], "a\tb");
        assert_eq!(parsed["created_at"], "2026-11-22 20:29:53.41955+00");
    }

    #[test]
    fn columns_are_found_by_name() {
        let mut reordered: Vec<&str> = COLUMNS.to_vec();
        reordered.reverse();
        reordered.push("added_later");
        assert!(LogColumns::resolve(&relation(&reordered)).is_ok());
        assert_eq!(
            LogColumns::resolve(&relation(&COLUMNS[1..])),
            Err(RowError::MissingColumn {
                relation: "cqrs.command_log".into(),
                column: "position"
            })
        );
    }

    #[test]
    fn bad_values_leave_the_buffer_untouched() {
        let columns = LogColumns::resolve(&relation(COLUMNS)).expect("resolves");
        let mut values: Vec<Value> = COLUMNS.iter().map(|_| text("1")).collect();
        values[3] = text("1; drop");
        let mut out = String::from("[");
        assert_eq!(
            columns.append_json(&values, &mut out),
            Err(RowError::BadValue {
                column: "seq",
                problem: "not an integer"
            })
        );
        assert_eq!(out, "[");
        values[3] = Value::Null;
        assert!(columns.append_json(&values, &mut out).is_err());
    }
}
