//! Command-log rows as `cqrs.project_batch` receives them: a JSON array of objects with the
//! columns of `cqrs.command_log`.

use serde_json::{Map, Value};

/// One command-log row.
#[derive(Clone, Debug, PartialEq)]
pub struct Event {
    pub position: i64,
    pub command_id: String,
    pub stream: String,
    pub seq: i64,
    pub command_type: String,
    pub payload: Value,
    pub metadata: Value,
    pub created_at: String,
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

fn integer(object: &Map<String, Value>, index: usize, field: &str) -> Result<i64, EventError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(error(index, field, "is missing")),
        Some(Value::Number(n)) => n
            .as_i64()
            .ok_or_else(|| error(index, field, "must be an integer")),
        // bigint columns may arrive as strings from JSON producers that fear 2^53
        Some(Value::String(s)) => s.parse().map_err(|_| error(index, field, "must be an integer")),
        Some(_) => Err(error(index, field, "must be an integer")),
    }
}

fn string(object: &Map<String, Value>, index: usize, field: &str) -> Result<String, EventError> {
    match object.get(field) {
        None | Some(Value::Null) => Err(error(index, field, "is missing")),
        Some(Value::String(s)) if s.is_empty() => Err(error(index, field, "must not be empty")),
        Some(Value::String(s)) => Ok(s.clone()),
        Some(_) => Err(error(index, field, "must be a string")),
    }
}

fn object(
    object: &Map<String, Value>,
    index: usize,
    field: &str,
    default_empty: bool,
) -> Result<Value, EventError> {
    match object.get(field) {
        None | Some(Value::Null) if default_empty => Ok(Value::Object(Map::new())),
        None | Some(Value::Null) => Err(error(index, field, "is missing")),
        Some(value @ Value::Object(_)) => Ok(value.clone()),
        Some(_) => Err(error(index, field, "must be a JSON object")),
    }
}

impl Event {
    /// Parses element `index` of a batch.
    pub fn from_json(index: usize, value: &Value) -> Result<Self, EventError> {
        let Value::Object(map) = value else {
            return Err(error(
                index,
                "",
                "must be a JSON object (a row of cqrs.command_log)",
            ));
        };
        let seq = integer(map, index, "seq")?;
        if seq < 1 {
            return Err(error(index, "seq", "must be positive"));
        }
        Ok(Self {
            position: integer(map, index, "position")?,
            command_id: string(map, index, "command_id")?,
            stream: string(map, index, "stream")?,
            seq,
            command_type: string(map, index, "command_type")?,
            payload: object(map, index, "payload", false)?,
            metadata: object(map, index, "metadata", true)?,
            created_at: string(map, index, "created_at")?,
        })
    }

    /// Parses a whole batch (a JSON array).
    pub fn parse_batch(batch: &Value) -> Result<Vec<Self>, EventError> {
        let Value::Array(items) = batch else {
            return Err(EventError::NotAnArray(json_type(batch)));
        };
        items
            .iter()
            .enumerate()
            .map(|(i, item)| Self::from_json(i, item))
            .collect()
    }

    /// The event as a JSON object (what function handlers and `cqrs.parked` receive).
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
        assert!(Event::from_json(0, &json!(5)).is_err());
        assert_eq!(
            Event::parse_batch(&json!({"a": 1})).unwrap_err().to_string(),
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
}
