//! Command-log rows as `cqrs.project_batch` receives them: a JSON array of objects with the
//! columns of `cqrs.command_log`.
//!
//! Decoding never lets one event fail a whole batch for everyone: the batch and each row are
//! split without parsing their payloads (`RawValue`, which serde_json scans without recursion),
//! and a payload or metadata that cannot be decoded — nested deeper than the parser's recursion
//! limit, or larger than [`Limits::max_document_bytes`] — leaves its event [`Event::unreadable`]:
//! a poison event for every projection that handles its type, kept whole (as received) for
//! parking and dead letters. The shape of a row itself (`seq`, `stream`, …) is the caller's to
//! get right, and an error names the element.

use std::collections::HashMap;

use serde_json::value::RawValue;
use serde_json::{Map, Value};

/// One command-log row.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Event {
    pub position: i64,
    pub command_id: String,
    pub stream: String,
    pub seq: i64,
    pub command_type: String,
    pub payload: Value,
    pub metadata: Value,
    pub created_at: String,
    /// Why the payload or metadata could not be decoded; `payload` and `metadata` are then
    /// empty and the row is kept as received.
    pub unreadable: Option<String>,
    /// The row as received, for an unreadable event.
    pub(crate) raw: Option<String>,
}

/// How much one event's documents may take in this process's memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest payload or metadata decoded, in bytes of JSON text; larger ones make the event
    /// unreadable instead of being decoded (memory outside PostgreSQL's accounting stays bounded).
    pub max_document_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_document_bytes: 64 * 1024 * 1024,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum EventError {
    #[error("events must be a JSON array of command-log rows, not {0}")]
    NotAnArray(&'static str),
    /// `field` is `.seq` etc., empty for the element itself.
    #[error("events[{index}]{field}: {reason}")]
    Element {
        index: usize,
        field: String,
        reason: String,
    },
}

fn error(index: usize, field: &str, reason: impl Into<String>) -> EventError {
    EventError::Element {
        index,
        field: if field.is_empty() {
            String::new()
        } else {
            format!(".{field}")
        },
        reason: reason.into(),
    }
}

/// The JSON type name of `value`, as `jsonb_typeof` says it.
pub fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// The JSON type of a JSON text, from its first character (no parsing).
fn text_type(text: &str) -> &'static str {
    match text.trim_start().as_bytes().first() {
        Some(b'{') => "object",
        Some(b'[') => "array",
        Some(b'"') => "string",
        Some(b't' | b'f') => "boolean",
        Some(b'n') | None => "null",
        Some(_) => "number",
    }
}

type Fields<'a> = HashMap<String, &'a RawValue>;

/// A small scalar field as a value (`None` when absent or null).
fn scalar(fields: &Fields<'_>, index: usize, field: &str) -> Result<Option<Value>, EventError> {
    let Some(raw) = fields.get(field) else {
        return Ok(None);
    };
    if matches!(text_type(raw.get()), "object" | "array") {
        return Err(error(
            index,
            field,
            format!("must not be a JSON {}", text_type(raw.get())),
        ));
    }
    let value: Value = serde_json::from_str(raw.get()).map_err(|e| error(index, field, e.to_string()))?;
    Ok((!value.is_null()).then_some(value))
}

fn integer(fields: &Fields<'_>, index: usize, field: &str) -> Result<i64, EventError> {
    if fields
        .get(field)
        .is_some_and(|raw| matches!(text_type(raw.get()), "object" | "array"))
    {
        return Err(error(index, field, "must be an integer"));
    }
    match scalar(fields, index, field)? {
        None => Err(error(index, field, "is missing")),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| error(index, field, "must be an integer")),
        // bigint columns may arrive as strings from JSON producers that fear 2^53
        Some(Value::String(s)) => s.parse().map_err(|_| error(index, field, "must be an integer")),
        Some(_) => Err(error(index, field, "must be an integer")),
    }
}

fn string(fields: &Fields<'_>, index: usize, field: &str) -> Result<String, EventError> {
    match scalar(fields, index, field) {
        Err(EventError::Element { .. }) if fields.get(field).is_some() => {
            Err(error(index, field, "must be a string"))
        }
        Err(err) => Err(err),
        Ok(None) => Err(error(index, field, "is missing")),
        Ok(Some(Value::String(s))) if s.is_empty() => Err(error(index, field, "must not be empty")),
        Ok(Some(Value::String(s))) => Ok(s),
        Ok(Some(_)) => Err(error(index, field, "must be a string")),
    }
}

/// A payload or metadata document: `Ok(Ok(object))`, `Ok(Err(why))` when it cannot be decoded
/// here (the event becomes unreadable), `Err` when it is not an object at all.
fn document(
    fields: &Fields<'_>,
    index: usize,
    field: &str,
    default_empty: bool,
    limits: Limits,
) -> Result<Result<Value, String>, EventError> {
    let raw = fields
        .get(field)
        .map(|r| r.get())
        .filter(|text| text_type(text) != "null");
    let Some(text) = raw else {
        return if default_empty {
            Ok(Ok(Value::Object(Map::new())))
        } else {
            Err(error(index, field, "is missing"))
        };
    };
    if text_type(text) != "object" {
        return Err(error(index, field, "must be a JSON object"));
    }
    if text.len() > limits.max_document_bytes {
        return Ok(Err(format!(
            "its {field} is {} bytes of JSON, more than the {} a projection reads",
            text.len(),
            limits.max_document_bytes
        )));
    }
    Ok(serde_json::from_str::<Value>(text).map_err(|e| format!("its {field} cannot be read: {e}")))
}

impl Event {
    /// Parses element `index` of a batch from its JSON text.
    pub fn parse(index: usize, text: &str, limits: Limits) -> Result<Self, EventError> {
        let fields: Fields<'_> = serde_json::from_str(text)
            .map_err(|_| error(index, "", "must be a JSON object (a row of cqrs.command_log)"))?;
        let seq = integer(&fields, index, "seq")?;
        if seq < 1 {
            return Err(error(index, "seq", "must be positive"));
        }
        let mut event = Self {
            position: integer(&fields, index, "position")?,
            command_id: string(&fields, index, "command_id")?,
            stream: string(&fields, index, "stream")?,
            seq,
            command_type: string(&fields, index, "command_type")?,
            created_at: string(&fields, index, "created_at")?,
            ..Self::default()
        };
        let payload = document(&fields, index, "payload", false, limits)?;
        let metadata = document(&fields, index, "metadata", true, limits)?;
        match (payload, metadata) {
            (Ok(payload), Ok(metadata)) => {
                event.payload = payload;
                event.metadata = metadata;
            }
            (Err(why), _) | (_, Err(why)) => {
                event.payload = Value::Object(Map::new());
                event.metadata = Value::Object(Map::new());
                event.unreadable = Some(why);
                event.raw = Some(text.to_owned());
            }
        }
        Ok(event)
    }

    /// Parses element `index` of a batch given as a value.
    pub fn from_json(index: usize, value: &Value) -> Result<Self, EventError> {
        Self::parse(index, &value.to_string(), Limits::default())
    }

    /// Parses a whole batch (the JSON text of an array), splitting it without decoding payloads.
    pub fn parse_batch(text: &str, limits: Limits) -> Result<Vec<Self>, EventError> {
        let items: Vec<&RawValue> =
            serde_json::from_str(text).map_err(|_| EventError::NotAnArray(text_type(text)))?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Self::parse(i, item.get(), limits))
            .collect()
    }

    /// The event as a JSON object (what function handlers receive). An unreadable event has
    /// empty documents here; see [`Event::to_json_text`].
    pub fn to_json(&self) -> Value {
        let mut map = Map::new();
        map.insert("position".into(), Value::from(self.position));
        map.insert("command_id".into(), Value::from(self.command_id.clone()));
        map.insert("stream".into(), Value::from(self.stream.clone()));
        map.insert("seq".into(), Value::from(self.seq));
        map.insert("command_type".into(), Value::from(self.command_type.clone()));
        map.insert("payload".into(), self.payload.clone());
        map.insert("metadata".into(), self.metadata.clone());
        map.insert("created_at".into(), Value::from(self.created_at.clone()));
        Value::Object(map)
    }

    /// The event as JSON text, whole: what `cqrs.parked`, `cqrs.dead_letter` and a halted
    /// projection's `last_error_event` keep (an unreadable event as it was received).
    pub fn to_json_text(&self) -> String {
        match &self.raw {
            Some(raw) => raw.clone(),
            None => self.to_json().to_string(),
        }
    }

    /// A JSON array of events, as text.
    pub fn array_text<'a>(events: impl IntoIterator<Item = &'a Event>) -> String {
        let mut out = String::from("[");
        for (i, event) in events.into_iter().enumerate() {
            if i > 0 {
                out.push(',');
            }
            out.push_str(&event.to_json_text());
        }
        out.push(']');
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn row() -> Value {
        json!({"position": 7, "command_id": "0190a5c8-0000-7000-8000-000000000001", "stream": "s",
               "seq": 2, "command_type": "T", "payload": {"a": 1}, "metadata": {},
               "created_at": "2026-01-01 00:00:00+00"})
    }

    #[test]
    fn parses_a_row() {
        let event = Event::from_json(0, &row()).expect("valid");
        assert_eq!((event.position, event.seq, event.stream.as_str()), (7, 2, "s"));
        assert_eq!(event.unreadable, None);
        assert_eq!(Event::from_json(0, &event.to_json()).expect("round trip"), event);
    }

    #[test]
    fn names_the_bad_field() {
        let mut bad = row();
        bad["seq"] = json!(0);
        assert_eq!(
            Event::from_json(3, &bad).unwrap_err().to_string(),
            "events[3].seq: must be positive"
        );
        let mut bad = row();
        bad["payload"] = json!([1]);
        assert_eq!(
            Event::from_json(0, &bad).unwrap_err().to_string(),
            "events[0].payload: must be a JSON object"
        );
        let mut bad = row();
        bad.as_object_mut().map(|o| o.remove("stream"));
        assert_eq!(
            Event::from_json(1, &bad).unwrap_err().to_string(),
            "events[1].stream: is missing"
        );
        let mut bad = row();
        bad["stream"] = json!({"x": 1});
        assert_eq!(
            Event::from_json(1, &bad).unwrap_err().to_string(),
            "events[1].stream: must be a string"
        );
        assert!(Event::from_json(0, &json!(5)).is_err());
        assert_eq!(
            Event::parse_batch(r#"{"a": 1}"#, Limits::default())
                .unwrap_err()
                .to_string(),
            "events must be a JSON array of command-log rows, not object"
        );
    }

    #[test]
    fn metadata_defaults_to_empty_and_big_positions_survive() {
        let mut r = row();
        r.as_object_mut().map(|o| o.remove("metadata"));
        r["position"] = json!("9007199254740993");
        let event = Event::from_json(0, &r).expect("valid");
        assert_eq!(event.metadata, json!({}));
        assert_eq!(event.position, 9_007_199_254_740_993);
    }

    #[test]
    fn a_deep_or_huge_document_makes_only_its_event_unreadable() {
        let deep = format!("{}1{}", r#"{"a":"#.repeat(200), "}".repeat(200));
        let good = row().to_string();
        let poison = good.replace(r#""metadata":{}"#, &format!(r#""metadata":{deep}"#));
        let batch = format!("[{good},{poison},{good}]");
        let events = Event::parse_batch(&batch, Limits::default()).expect("the batch parses");
        assert_eq!(events.len(), 3);
        assert_eq!(events[0].unreadable, None);
        let why = events[1].unreadable.as_deref().expect("unreadable");
        assert!(
            why.starts_with("its metadata cannot be read: recursion limit exceeded"),
            "{why}"
        );
        // kept whole for the operator, and it reads back the same
        assert_eq!(events[1].to_json_text(), poison);
        assert_eq!((events[1].stream.as_str(), events[1].seq), ("s", 2));
        assert_eq!(Event::array_text(&events[1..2]), format!("[{poison}]"));

        let small = Limits {
            max_document_bytes: 5,
        };
        let event = Event::parse(0, &good, small).expect("the row parses");
        assert_eq!(
            event.unreadable.as_deref(),
            Some("its payload is 7 bytes of JSON, more than the 5 a projection reads")
        );
    }
}
