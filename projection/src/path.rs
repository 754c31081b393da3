//! JSON paths in handler definitions: `$`, `$.a.b`, `$.items[0].sku`, `$["odd key"]`.

use std::fmt;

use serde_json::Value;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Segment {
    Key(String),
    Index(usize),
}

/// A parsed JSON path.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JsonPath {
    segments: Vec<Segment>,
    text: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("invalid JSON path {path:?}: {reason}")]
pub struct PathError {
    pub path: String,
    pub reason: String,
}

impl JsonPath {
    pub fn parse(text: &str) -> Result<Self, PathError> {
        let error = |reason: &str| PathError {
            path: text.to_owned(),
            reason: reason.to_owned(),
        };
        let mut rest = text.strip_prefix('$').ok_or_else(|| error("must start with $"))?;
        let mut segments = Vec::new();
        while !rest.is_empty() {
            if let Some(after) = rest.strip_prefix('.') {
                let end = after.find(['.', '[']).unwrap_or(after.len());
                let key = &after[..end];
                if key.is_empty() {
                    return Err(error("empty key after '.'"));
                }
                segments.push(Segment::Key(key.to_owned()));
                rest = &after[end..];
            } else if let Some(after) = rest.strip_prefix("[\"") {
                // a quoted key; \" and \\ are the only escapes
                let mut key = String::new();
                let mut chars = after.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => match chars.next() {
                            Some((_, escaped @ ('"' | '\\'))) => key.push(escaped),
                            _ => return Err(error("only \\\" and \\\\ may be escaped in a quoted key")),
                        },
                        '"' => {
                            end = Some(i);
                            break;
                        }
                        c => key.push(c),
                    }
                }
                let end = end.ok_or_else(|| error("unterminated quoted key"))?;
                let after_quote = &after[end + 1..];
                rest = after_quote
                    .strip_prefix(']')
                    .ok_or_else(|| error("expected ] after a quoted key"))?;
                segments.push(Segment::Key(key));
            } else if let Some(after) = rest.strip_prefix('[') {
                let end = after.find(']').ok_or_else(|| error("unterminated ["))?;
                let index: usize = after[..end]
                    .parse()
                    .map_err(|_| error("an array index must be a non-negative integer"))?;
                segments.push(Segment::Index(index));
                rest = &after[end + 1..];
            } else {
                return Err(error("expected '.', '[' or the end after a segment"));
            }
        }
        Ok(Self {
            segments,
            text: text.to_owned(),
        })
    }

    /// The value at this path, `None` when any step is missing.
    pub fn get<'v>(&self, value: &'v Value) -> Option<&'v Value> {
        self.segments
            .iter()
            .try_fold(value, |current, segment| match segment {
                Segment::Key(key) => current.as_object()?.get(key),
                Segment::Index(index) => current.as_array()?.get(*index),
            })
    }

    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl fmt::Display for JsonPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_and_evaluates() {
        let doc = json!({"a": {"b": [10, {"c": "x"}]}, "odd key": 1, "q\"k": 2});
        let get = |p: &str| JsonPath::parse(p).expect(p).get(&doc).cloned();
        assert_eq!(get("$"), Some(doc.clone()));
        assert_eq!(get("$.a.b[0]"), Some(json!(10)));
        assert_eq!(get("$.a.b[1].c"), Some(json!("x")));
        assert_eq!(get("$[\"odd key\"]"), Some(json!(1)));
        assert_eq!(get("$[\"q\\\"k\"]"), Some(json!(2)));
        assert_eq!(get("$.a.b[5]"), None);
        assert_eq!(get("$.a.x"), None);
        assert_eq!(get("$.a.b.c"), None);
    }

    #[test]
    fn rejects_malformed_paths() {
        for bad in [
            "a", "$.", "$..a", "$[x]", "$[-1]", "$[\"a\"", "$[\"a\"x", "$a", "$.a[1",
        ] {
            assert!(JsonPath::parse(bad).is_err(), "{bad} should be rejected");
        }
    }
}
