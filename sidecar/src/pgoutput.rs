//! Decoding the pgoutput messages pgwire-replication hands over raw (protocol version 1):
//! Relation and Insert fully; Update, Delete and Truncate recognised (the command log is
//! append-only, so seeing them is worth a loud log line); Type and Origin skipped. Begin, Commit
//! and Message are decoded by pgwire-replication itself.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

/// A table as the Relation message describes it (sent before its first change, and again after
/// `ALTER TABLE`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relation {
    pub id: u32,
    pub namespace: String,
    pub name: String,
    pub columns: Vec<String>,
}

/// One column value of a tuple.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Value {
    Null,
    /// An unchanged TOASTed value (only in updates).
    Unchanged,
    Text(Bytes),
    Binary(Bytes),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    Relation(Arc<Relation>),
    Insert {
        relation: Arc<Relation>,
        values: Vec<Value>,
    },
    Update {
        relation: Arc<Relation>,
    },
    Delete {
        relation: Arc<Relation>,
    },
    Truncate {
        relations: Vec<u32>,
    },
    /// Type, Origin and anything this decoder has no use for.
    Ignored(u8),
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DecodeError {
    #[error("pgoutput message truncated while reading {0}")]
    Truncated(&'static str),
    #[error("pgoutput {message} refers to relation {id}, which no Relation message described")]
    UnknownRelation { message: &'static str, id: u32 },
    #[error("pgoutput tuple column of unknown kind {0:?}")]
    UnknownColumnKind(char),
    #[error("pgoutput message is empty")]
    Empty,
}

struct Reader<'a> {
    data: &'a Bytes,
    at: usize,
}

impl<'a> Reader<'a> {
    fn u8(&mut self, what: &'static str) -> Result<u8, DecodeError> {
        let byte = *self.data.get(self.at).ok_or(DecodeError::Truncated(what))?;
        self.at += 1;
        Ok(byte)
    }

    fn bytes(&mut self, n: usize, what: &'static str) -> Result<Bytes, DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .filter(|end| *end <= self.data.len())
            .ok_or(DecodeError::Truncated(what))?;
        let slice = self.data.slice(self.at..end);
        self.at = end;
        Ok(slice)
    }

    fn i16(&mut self, what: &'static str) -> Result<i16, DecodeError> {
        let b = self.bytes(2, what)?;
        Ok(i16::from_be_bytes([b[0], b[1]]))
    }

    fn i32(&mut self, what: &'static str) -> Result<i32, DecodeError> {
        let b = self.bytes(4, what)?;
        Ok(i32::from_be_bytes([b[0], b[1], b[2], b[3]]))
    }

    fn u32(&mut self, what: &'static str) -> Result<u32, DecodeError> {
        Ok(self.i32(what)? as u32)
    }

    fn string(&mut self, what: &'static str) -> Result<String, DecodeError> {
        let rest = &self.data[self.at..];
        let end = rest
            .iter()
            .position(|b| *b == 0)
            .ok_or(DecodeError::Truncated(what))?;
        let text = String::from_utf8_lossy(&rest[..end]).into_owned();
        self.at += end + 1;
        Ok(text)
    }

    fn tuple(&mut self) -> Result<Vec<Value>, DecodeError> {
        let count = self.i16("tuple column count")?.max(0) as usize;
        let mut values = Vec::with_capacity(count);
        for _ in 0..count {
            let kind = self.u8("tuple column kind")?;
            values.push(match kind {
                b'n' => Value::Null,
                b'u' => Value::Unchanged,
                b't' | b'b' => {
                    let len = self.i32("tuple value length")?.max(0) as usize;
                    let bytes = self.bytes(len, "tuple value")?;
                    if kind == b't' {
                        Value::Text(bytes)
                    } else {
                        Value::Binary(bytes)
                    }
                }
                other => return Err(DecodeError::UnknownColumnKind(char::from(other))),
            });
        }
        Ok(values)
    }
}

/// Keeps the relations described so far, to decode the changes that refer to them.
#[derive(Debug, Default)]
pub struct Decoder {
    relations: HashMap<u32, Arc<Relation>>,
}

impl Decoder {
    pub fn new() -> Self {
        Self::default()
    }

    fn relation(&self, id: u32, message: &'static str) -> Result<Arc<Relation>, DecodeError> {
        self.relations
            .get(&id)
            .cloned()
            .ok_or(DecodeError::UnknownRelation { message, id })
    }

    pub fn decode(&mut self, data: &Bytes) -> Result<Change, DecodeError> {
        let mut reader = Reader { data, at: 0 };
        let tag = reader.u8("message tag").map_err(|_| DecodeError::Empty)?;
        match tag {
            b'R' => {
                let id = reader.u32("relation id")?;
                let namespace = reader.string("relation namespace")?;
                let name = reader.string("relation name")?;
                let _replica_identity = reader.u8("replica identity")?;
                let count = reader.i16("relation column count")?.max(0) as usize;
                let mut columns = Vec::with_capacity(count);
                for _ in 0..count {
                    let _flags = reader.u8("column flags")?;
                    columns.push(reader.string("column name")?);
                    let _type = reader.u32("column type")?;
                    let _typmod = reader.i32("column type modifier")?;
                }
                let relation = Arc::new(Relation {
                    id,
                    namespace,
                    name,
                    columns,
                });
                self.relations.insert(id, Arc::clone(&relation));
                Ok(Change::Relation(relation))
            }
            b'I' => {
                let id = reader.u32("insert relation id")?;
                let relation = self.relation(id, "Insert")?;
                let _new = reader.u8("insert tuple marker")?;
                let values = reader.tuple()?;
                Ok(Change::Insert { relation, values })
            }
            b'U' => Ok(Change::Update {
                relation: self.relation(reader.u32("update relation id")?, "Update")?,
            }),
            b'D' => Ok(Change::Delete {
                relation: self.relation(reader.u32("delete relation id")?, "Delete")?,
            }),
            b'T' => {
                let count = reader.i32("truncate relation count")?.max(0) as usize;
                let _options = reader.u8("truncate options")?;
                let relations = (0..count)
                    .map(|_| reader.u32("truncated relation id"))
                    .collect::<Result<_, _>>()?;
                Ok(Change::Truncate { relations })
            }
            other => Ok(Change::Ignored(other)),
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A Relation message, as PostgreSQL sends it.
    pub(crate) fn relation_message(id: u32, namespace: &str, name: &str, columns: &[&str]) -> Bytes {
        let mut m = vec![b'R'];
        m.extend(id.to_be_bytes());
        m.extend(namespace.as_bytes());
        m.push(0);
        m.extend(name.as_bytes());
        m.push(0);
        m.push(b'd');
        m.extend((columns.len() as i16).to_be_bytes());
        for column in columns {
            m.push(0);
            m.extend(column.as_bytes());
            m.push(0);
            m.extend(25u32.to_be_bytes());
            m.extend((-1i32).to_be_bytes());
        }
        Bytes::from(m)
    }

    /// An Insert message with text values (`None` for NULL).
    pub(crate) fn insert_message(id: u32, values: &[Option<&str>]) -> Bytes {
        let mut m = vec![b'I'];
        m.extend(id.to_be_bytes());
        m.push(b'N');
        m.extend((values.len() as i16).to_be_bytes());
        for value in values {
            match value {
                None => m.push(b'n'),
                Some(text) => {
                    m.push(b't');
                    m.extend((text.len() as i32).to_be_bytes());
                    m.extend(text.as_bytes());
                }
            }
        }
        Bytes::from(m)
    }

    #[test]
    fn decodes_relations_and_inserts() {
        let mut decoder = Decoder::new();
        let relation = decoder
            .decode(&relation_message(
                16400,
                "cqrs",
                "command_log",
                &["position", "stream"],
            ))
            .expect("relation");
        let Change::Relation(relation) = relation else {
            panic!("{relation:?}")
        };
        assert_eq!(relation.columns, vec!["position", "stream"]);
        let insert = decoder
            .decode(&insert_message(16400, &[Some("7"), None]))
            .expect("insert");
        assert_eq!(
            insert,
            Change::Insert {
                relation,
                values: vec![Value::Text(Bytes::from_static(b"7")), Value::Null]
            }
        );
    }

    #[test]
    fn a_new_relation_message_replaces_the_old_one() {
        let mut decoder = Decoder::new();
        decoder
            .decode(&relation_message(1, "cqrs", "command_log", &["a"]))
            .expect("relation");
        decoder
            .decode(&relation_message(1, "cqrs", "command_log", &["a", "b"]))
            .expect("relation");
        let Change::Insert { relation, .. } = decoder
            .decode(&insert_message(1, &[Some("x"), Some("y")]))
            .expect("insert")
        else {
            panic!("insert")
        };
        assert_eq!(relation.columns.len(), 2);
    }

    #[test]
    fn errors_instead_of_panics() {
        let mut decoder = Decoder::new();
        assert_eq!(decoder.decode(&Bytes::new()), Err(DecodeError::Empty));
        assert_eq!(
            decoder.decode(&insert_message(9, &[Some("x")])),
            Err(DecodeError::UnknownRelation {
                message: "Insert",
                id: 9
            })
        );
        let full = relation_message(1, "cqrs", "command_log", &["a"]);
        for cut in 1..full.len() {
            assert!(Decoder::new().decode(&full.slice(..cut)).is_err(), "cut at {cut}");
        }
        decoder.decode(&full).expect("relation");
        let insert = insert_message(1, &[Some("hello")]);
        for cut in 1..insert.len() {
            assert!(decoder.decode(&insert.slice(..cut)).is_err(), "cut at {cut}");
        }
        let mut bad = insert.to_vec();
        bad[8] = b'x';
        assert_eq!(
            decoder.decode(&Bytes::from(bad)),
            Err(DecodeError::UnknownColumnKind('x'))
        );
        assert!(matches!(
            decoder.decode(&Bytes::from_static(b"Yxxxx")),
            Ok(Change::Ignored(b'Y'))
        ));
    }
}
