//! The handlers of a projection: what each command type does to the read model.
//!
//! ```json
//! {
//!   "CREATE_ORDER": {"action": "upsert", "key": {"field": "stream"},
//!                    "set": {"user_id": "$.user_id", "status": {"const": "open"}}},
//!   "ADD_ITEM":     {"action": "update", "add": {"item_count": "$.qty", "total": "$.amount"}},
//!   "CANCEL_ORDER": {"action": "delete"},
//!   "AUDIT":        {"function": "app.apply_audit"},
//!   "TRANSFER":     [{"action": "update", "key": "$.from", "add": {"balance": "$.debit"}},
//!                    {"action": "update", "key": "$.to",   "add": {"balance": "$.amount"}}]
//! }
//! ```
//!
//! A value source is a payload path (`"$.a.b"`), or one of `{"path": "$.a"}`,
//! `{"meta": "$.trace"}` (metadata), `{"field": "stream" | "seq" | "position" | "created_at" |
//! "command_id" | "command_type"}`, `{"const": <any JSON>}`. The key defaults to the stream.
//! This module checks the shape; the extension checks columns and types against the catalog.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::event::{json_type, Event};
use crate::path::JsonPath;

/// Longest command type, in bytes (as in cqrs.append).
const MAX_COMMAND_TYPE_BYTES: usize = 128;

/// A handled column, by its index in the projection's column list ([`Program`]).
pub type ColumnId = usize;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ActionKind {
    /// Insert the row, or update it when it exists.
    Upsert,
    /// Update the row when it exists; nothing otherwise.
    Update,
    /// Delete the row.
    Delete,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Field {
    Stream,
    Seq,
    Position,
    CreatedAt,
    CommandId,
    CommandType,
}

impl Field {
    /// The command-log column, as handlers name it (`{"field": "created_at"}`).
    pub fn name(self) -> &'static str {
        match self {
            Field::Stream => "stream",
            Field::Seq => "seq",
            Field::Position => "position",
            Field::CreatedAt => "created_at",
            Field::CommandId => "command_id",
            Field::CommandType => "command_type",
        }
    }

    fn parse(name: &str) -> Option<Self> {
        Some(match name {
            "stream" => Field::Stream,
            "seq" => Field::Seq,
            "position" => Field::Position,
            "created_at" => Field::CreatedAt,
            "command_id" => Field::CommandId,
            "command_type" => Field::CommandType,
            _ => return None,
        })
    }

    /// The SQL type of the command-log column.
    pub fn sql_type(self) -> &'static str {
        match self {
            Field::Stream | Field::CommandType => "text",
            Field::Seq | Field::Position => "bigint",
            Field::CreatedAt => "timestamptz",
            Field::CommandId => "uuid",
        }
    }

    fn value(self, event: &Event) -> Value {
        match self {
            Field::Stream => Value::from(event.stream.clone()),
            Field::Seq => Value::from(event.seq),
            Field::Position => Value::from(event.position),
            Field::CreatedAt => Value::from(event.created_at.clone()),
            Field::CommandId => Value::from(event.command_id.clone()),
            Field::CommandType => Value::from(event.command_type.clone()),
        }
    }
}

/// Where a value comes from.
#[derive(Clone, Debug, PartialEq)]
pub enum Source {
    Payload(JsonPath),
    Metadata(JsonPath),
    Field(Field),
    Const(Value),
}

impl Source {
    /// The value for `event`; `None` when a path leads nowhere (SQL NULL).
    pub fn value(&self, event: &Event) -> Option<Value> {
        match self {
            Source::Payload(path) => path.get(&event.payload).cloned(),
            Source::Metadata(path) => path.get(&event.metadata).cloned(),
            Source::Field(field) => Some(field.value(event)),
            Source::Const(value) => Some(value.clone()),
        }
    }
}

/// One declarative action of a handler.
#[derive(Clone, Debug, PartialEq)]
pub struct Action {
    pub kind: ActionKind,
    pub key: Source,
    /// column ← value
    pub set: Vec<(String, Source)>,
    /// column ← column + value
    pub add: Vec<(String, Source)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Handler {
    Declarative(Action),
    /// A user function `(event jsonb) returns setof text` (the keys it changed).
    Function(String),
}

/// A projection's handlers by command type.
#[derive(Clone, Debug, PartialEq)]
pub struct Spec {
    pub handlers: BTreeMap<String, Vec<Handler>>,
}

/// How a column is written by the handlers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ColumnUse {
    pub set: bool,
    pub add: bool,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{at}: {reason}")]
pub struct SpecError {
    /// Where in the handlers document, e.g. `handlers.ADD_ITEM[0].add.qty`.
    pub at: String,
    pub reason: String,
}

fn spec_error(at: &str, reason: impl Into<String>) -> SpecError {
    SpecError {
        at: at.to_owned(),
        reason: reason.into(),
    }
}

fn parse_source(at: &str, value: &Value) -> Result<Source, SpecError> {
    match value {
        Value::String(text) if text.starts_with('$') => {
            JsonPath::parse(text).map(Source::Payload).map_err(|e| spec_error(at, e.to_string()))
        }
        Value::String(text) => Err(spec_error(
            at,
            format!("{text:?} is not a value source; use \"$.path\", {{\"const\": …}}, {{\"field\": …}} or {{\"meta\": …}}"),
        )),
        Value::Object(map) if map.len() == 1 => {
            let (kind, inner) = map.iter().next().ok_or_else(|| spec_error(at, "empty source"))?;
            let text = || inner.as_str().ok_or_else(|| spec_error(at, format!("\"{kind}\" takes a string")));
            match kind.as_str() {
                "path" => JsonPath::parse(text()?).map(Source::Payload).map_err(|e| spec_error(at, e.to_string())),
                "meta" => JsonPath::parse(text()?).map(Source::Metadata).map_err(|e| spec_error(at, e.to_string())),
                "field" => Field::parse(text()?).map(Source::Field).ok_or_else(|| {
                    spec_error(
                        at,
                        "\"field\" must be one of stream, seq, position, created_at, command_id, command_type",
                    )
                }),
                "const" => Ok(Source::Const(inner.clone())),
                other => Err(spec_error(at, format!("unknown source {other:?} (path, meta, field or const)"))),
            }
        }
        other => Err(spec_error(
            at,
            format!(
                "a value source is \"$.path\" or an object with one of path, meta, field, const; not {}",
                json_type(other)
            ),
        )),
    }
}

fn parse_columns(at: &str, value: Option<&Value>) -> Result<Vec<(String, Source)>, SpecError> {
    match value {
        None => Ok(Vec::new()),
        Some(Value::Object(map)) => map
            .iter()
            .map(|(column, source)| {
                let at = format!("{at}.{column}");
                if column.is_empty() {
                    return Err(spec_error(&at, "column names must not be empty"));
                }
                Ok((column.clone(), parse_source(&at, source)?))
            })
            .collect(),
        Some(other) => Err(spec_error(
            at,
            format!(
                "must be an object of column → value source, not {}",
                json_type(other)
            ),
        )),
    }
}

fn parse_handler(at: &str, value: &Value) -> Result<Handler, SpecError> {
    let Value::Object(map) = value else {
        return Err(spec_error(
            at,
            format!("a handler is an object, not {}", json_type(value)),
        ));
    };
    if let Some(function) = map.get("function") {
        if map.len() != 1 {
            return Err(spec_error(at, "a function handler has only the key \"function\""));
        }
        let name = function.as_str().filter(|name| !name.is_empty()).ok_or_else(|| {
            spec_error(
                &format!("{at}.function"),
                "must be a function name such as \"app.apply_note\"",
            )
        })?;
        return Ok(Handler::Function(name.to_owned()));
    }
    for key in map.keys() {
        if !matches!(key.as_str(), "action" | "key" | "set" | "add") {
            return Err(spec_error(
                at,
                format!("unknown key {key:?} (action, key, set, add; or function)"),
            ));
        }
    }
    let kind = match map.get("action").and_then(Value::as_str) {
        Some("upsert") => ActionKind::Upsert,
        Some("update") => ActionKind::Update,
        Some("delete") => ActionKind::Delete,
        _ => {
            return Err(spec_error(
                &format!("{at}.action"),
                "must be \"upsert\", \"update\" or \"delete\"",
            ))
        }
    };
    let key = match map.get("key") {
        None => Source::Field(Field::Stream),
        Some(value) => parse_source(&format!("{at}.key"), value)?,
    };
    let set = parse_columns(&format!("{at}.set"), map.get("set"))?;
    let add = parse_columns(&format!("{at}.add"), map.get("add"))?;
    if kind == ActionKind::Delete && !(set.is_empty() && add.is_empty()) {
        return Err(spec_error(at, "a delete takes no set or add"));
    }
    if let Some((column, _)) = set.iter().find(|(c, _)| add.iter().any(|(a, _)| a == c)) {
        return Err(spec_error(
            at,
            format!("column {column:?} is both in set and in add"),
        ));
    }
    Ok(Handler::Declarative(Action { kind, key, set, add }))
}

impl Spec {
    pub fn parse(handlers: &Value) -> Result<Self, SpecError> {
        let Value::Object(map) = handlers else {
            return Err(spec_error(
                "handlers",
                format!(
                    "must be an object mapping command types to handlers, not {}",
                    json_type(handlers)
                ),
            ));
        };
        if map.is_empty() {
            return Err(spec_error("handlers", "must map at least one command type"));
        }
        let mut parsed = BTreeMap::new();
        for (command_type, value) in map {
            let at = format!("handlers.{command_type}");
            if command_type.is_empty() || command_type.len() > MAX_COMMAND_TYPE_BYTES {
                return Err(spec_error(&at, "command types are 1 to 128 bytes"));
            }
            let handlers = match value {
                Value::Array(items) if items.is_empty() => {
                    return Err(spec_error(&at, "an empty list of handlers"))
                }
                Value::Array(items) => items
                    .iter()
                    .enumerate()
                    .map(|(i, item)| parse_handler(&format!("{at}[{i}]"), item))
                    .collect::<Result<Vec<_>, _>>()?,
                other => vec![parse_handler(&at, other)?],
            };
            parsed.insert(command_type.clone(), handlers);
        }
        Ok(Self { handlers: parsed })
    }

    /// Every column the declarative handlers write, and how.
    pub fn columns(&self) -> BTreeMap<String, ColumnUse> {
        let mut columns: BTreeMap<String, ColumnUse> = BTreeMap::new();
        for action in self.actions() {
            for (column, _) in &action.1.set {
                columns.entry(column.clone()).or_default().set = true;
            }
            for (column, _) in &action.1.add {
                columns.entry(column.clone()).or_default().add = true;
            }
        }
        columns
    }

    /// Every declarative action with where it is in the document.
    pub fn actions(&self) -> Vec<(String, &Action)> {
        let mut actions = Vec::new();
        for (command_type, handlers) in &self.handlers {
            for (i, handler) in handlers.iter().enumerate() {
                if let Handler::Declarative(action) = handler {
                    let at = if handlers.len() == 1 {
                        format!("handlers.{command_type}")
                    } else {
                        format!("handlers.{command_type}[{i}]")
                    };
                    actions.push((at, action));
                }
            }
        }
        actions
    }

    /// Every function handler (deduplicated), for signature checks.
    pub fn functions(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self
            .handlers
            .values()
            .flatten()
            .filter_map(|h| match h {
                Handler::Function(name) => Some(name.as_str()),
                Handler::Declarative(_) => None,
            })
            .collect();
        names.sort_unstable();
        names.dedup();
        names
    }

    /// The handlers of `command_type` (none: the projection ignores it).
    pub fn handlers_for(&self, command_type: &str) -> &[Handler] {
        self.handlers.get(command_type).map(Vec::as_slice).unwrap_or(&[])
    }

    /// The spec back as JSON, with defaults made explicit (stored in cqrs.projection).
    pub fn to_json(&self) -> Value {
        fn source(source: &Source) -> Value {
            let mut map = Map::new();
            match source {
                Source::Payload(path) => map.insert("path".into(), Value::from(path.as_str())),
                Source::Metadata(path) => map.insert("meta".into(), Value::from(path.as_str())),
                Source::Field(field) => map.insert("field".into(), Value::from(field.name())),
                Source::Const(value) => map.insert("const".into(), value.clone()),
            };
            Value::Object(map)
        }
        let mut out = Map::new();
        for (command_type, handlers) in &self.handlers {
            let list: Vec<Value> = handlers
                .iter()
                .map(|handler| match handler {
                    Handler::Function(name) => serde_json::json!({"function": name}),
                    Handler::Declarative(action) => {
                        let mut map = Map::new();
                        let kind = match action.kind {
                            ActionKind::Upsert => "upsert",
                            ActionKind::Update => "update",
                            ActionKind::Delete => "delete",
                        };
                        map.insert("action".into(), Value::from(kind));
                        map.insert("key".into(), source(&action.key));
                        if !action.set.is_empty() {
                            map.insert(
                                "set".into(),
                                Value::Object(
                                    action.set.iter().map(|(c, s)| (c.clone(), source(s))).collect(),
                                ),
                            );
                        }
                        if !action.add.is_empty() {
                            map.insert(
                                "add".into(),
                                Value::Object(
                                    action.add.iter().map(|(c, s)| (c.clone(), source(s))).collect(),
                                ),
                            );
                        }
                        Value::Object(map)
                    }
                })
                .collect();
            out.insert(command_type.clone(), Value::Array(list));
        }
        Value::Object(out)
    }
}

/// A declarative action with its columns resolved to [`ColumnId`]s.
#[derive(Clone, Debug, PartialEq)]
pub struct CompiledAction {
    pub kind: ActionKind,
    pub key: Source,
    pub set: Vec<(ColumnId, Source)>,
    pub add: Vec<(ColumnId, Source)>,
}

#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    Declarative(CompiledAction),
    Function(String),
}

/// A spec ready to run: columns numbered (in [`Spec::columns`] order, which is also the order
/// of [`crate::sql::Target::columns`]), handlers by command type.
#[derive(Clone, Debug, PartialEq)]
pub struct Program {
    pub columns: Vec<(String, ColumnUse)>,
    handlers: BTreeMap<String, Vec<Step>>,
}

impl Program {
    /// The steps for `command_type` (none: the projection ignores it).
    pub fn steps_for(&self, command_type: &str) -> &[Step] {
        self.handlers.get(command_type).map(Vec::as_slice).unwrap_or(&[])
    }
}

impl Spec {
    pub fn compile(&self) -> Program {
        let columns: Vec<(String, ColumnUse)> = self.columns().into_iter().collect();
        let id = |name: &str| columns.iter().position(|(c, _)| c == name).unwrap_or(usize::MAX);
        let resolve = |list: &[(String, Source)]| -> Vec<(ColumnId, Source)> {
            list.iter().map(|(c, s)| (id(c), s.clone())).collect()
        };
        let handlers = self
            .handlers
            .iter()
            .map(|(command_type, handlers)| {
                let steps = handlers
                    .iter()
                    .map(|handler| match handler {
                        Handler::Function(name) => Step::Function(name.clone()),
                        Handler::Declarative(action) => Step::Declarative(CompiledAction {
                            kind: action.kind,
                            key: action.key.clone(),
                            set: resolve(&action.set),
                            add: resolve(&action.add),
                        }),
                    })
                    .collect();
                (command_type.clone(), steps)
            })
            .collect();
        Program { columns, handlers }
    }
}

/// The text of a key value, as the key column will be cast from (`->>` semantics).
pub fn key_text(value: Option<&Value>) -> Result<String, String> {
    match value {
        Some(Value::String(s)) => Ok(s.clone()),
        Some(Value::Number(n)) => Ok(n.to_string()),
        Some(Value::Bool(b)) => Ok(b.to_string()),
        Some(other @ (Value::Array(_) | Value::Object(_))) => {
            Err(format!("the key must be a scalar, not {}", json_type(other)))
        }
        Some(Value::Null) | None => Err("the key is missing (null)".to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_every_form() {
        let spec = Spec::parse(&json!({
            "CREATE": {"action": "upsert", "set": {"user_id": "$.user", "status": {"const": "open"},
                       "opened_at": {"field": "created_at"}, "trace": {"meta": "$.trace"}}},
            "ADD": {"action": "update", "add": {"n": {"path": "$.qty"}}},
            "GONE": {"action": "delete", "key": "$.id"},
            "F": {"function": "app.f"},
            "T": [{"action": "update", "key": "$.a", "add": {"n": "$.x"}}, {"function": "app.f"}]
        }))
        .expect("valid");
        assert_eq!(spec.handlers.len(), 5);
        assert_eq!(spec.functions(), vec!["app.f"]);
        let columns = spec.columns();
        assert_eq!(
            columns["n"],
            ColumnUse {
                set: false,
                add: true
            }
        );
        assert_eq!(
            columns["status"],
            ColumnUse {
                set: true,
                add: false
            }
        );
        // the stored form parses back to the same spec
        assert_eq!(Spec::parse(&spec.to_json()).expect("round trip"), spec);
        let Handler::Declarative(create) = &spec.handlers["CREATE"][0] else {
            panic!("declarative")
        };
        assert_eq!(create.key, Source::Field(Field::Stream));
        // compiled: columns numbered in name order, every reference resolved
        let program = spec.compile();
        let names: Vec<&str> = program.columns.iter().map(|(c, _)| c.as_str()).collect();
        assert_eq!(names, vec!["n", "opened_at", "status", "trace", "user_id"]);
        let Step::Declarative(add) = &program.steps_for("ADD")[0] else {
            panic!("declarative")
        };
        assert_eq!(add.add[0].0, 0);
        assert!(program.steps_for("NONE").is_empty());
    }

    #[test]
    fn errors_say_where() {
        let cases = [
            (json!([]), "handlers: must be an object mapping command types to handlers, not array"),
            (json!({}), "handlers: must map at least one command type"),
            (json!({"A": {"action": "merge"}}), "handlers.A.action: must be \"upsert\", \"update\" or \"delete\""),
            (json!({"A": {"action": "upsert", "sett": {}}}), "handlers.A: unknown key \"sett\" (action, key, set, add; or function)"),
            (json!({"A": {"action": "delete", "set": {"x": "$.x"}}}), "handlers.A: a delete takes no set or add"),
            (json!({"A": {"action": "upsert", "set": {"x": "x"}}}), "handlers.A.set.x: \"x\" is not a value source; use \"$.path\", {\"const\": …}, {\"field\": …} or {\"meta\": …}"),
            (json!({"A": {"action": "upsert", "set": {"x": {"field": "nope"}}}}), "handlers.A.set.x: \"field\" must be one of stream, seq, position, created_at, command_id, command_type"),
            (json!({"A": [{"action": "upsert"}, {"action": "upsert", "add": {"x": "$.a..b"}}]}), "handlers.A[1].add.x: invalid JSON path \"$.a..b\": empty key after '.'"),
            (json!({"A": {"action": "upsert", "set": {"x": "$.a"}, "add": {"x": "$.b"}}}), "handlers.A: column \"x\" is both in set and in add"),
            (json!({"A": {"function": "f", "action": "upsert"}}), "handlers.A: a function handler has only the key \"function\""),
            (json!({"A": []}), "handlers.A: an empty list of handlers"),
            (json!({"A": 5}), "handlers.A: a handler is an object, not number"),
        ];
        for (input, expected) in cases {
            assert_eq!(Spec::parse(&input).unwrap_err().to_string(), expected, "{input}");
        }
    }

    #[test]
    fn key_text_follows_the_text_operator() {
        assert_eq!(key_text(Some(&json!("a"))), Ok("a".into()));
        assert_eq!(key_text(Some(&json!(42))), Ok("42".into()));
        assert_eq!(key_text(Some(&json!(true))), Ok("true".into()));
        assert!(key_text(Some(&json!([1]))).is_err());
        assert!(key_text(Some(&Value::Null)).is_err());
        assert!(key_text(None).is_err());
    }
}
