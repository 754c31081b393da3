//! Folding a run of events into one write per read-model row.
//!
//! Applying events one statement at a time costs a statement per event; a hand-rolled projector
//! instead writes each changed row once per batch. The fold gives pg_cqrs the same shape without
//! giving up sequential semantics: for every row it tracks, relative to the row as it was before
//! the run (`existed`), whether the row is present now, whether it is still the original row or a
//! fresh one (deleted and upserted again, or new), and per column the last value set plus what was
//! added since. `upsert` on a missing row starts a fresh row; `update` on a missing row does
//! nothing; `delete` removes the row and forgets its column operations.
//!
//! The result is one [`Write`] per changed row, which [`crate::sql`] executes set-based. Values
//! stay JSON here; PostgreSQL casts them to the column types when writing, with its own rules.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::spec::{ActionKind, ColumnId};

/// The operations a run applied to one column.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ColumnOps {
    /// `Some(v)`: the column was set; `v` is `None` when the source had no value (SQL NULL).
    pub set: Option<Option<Value>>,
    /// Values added after the last set (or to the row's value, when never set).
    pub add: Vec<Value>,
}

/// One declarative action evaluated for one event.
#[derive(Clone, Debug, PartialEq)]
pub struct Op {
    pub kind: ActionKind,
    pub set: Vec<(ColumnId, Option<Value>)>,
    pub add: Vec<(ColumnId, Option<Value>)>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Base {
    /// The row as it was before the run.
    Original,
    /// A row created in this run (defaults for every column not set).
    Fresh,
}

#[derive(Clone, Debug)]
struct RowFold {
    existed: bool,
    present: bool,
    base: Base,
    touched: bool,
    ops: BTreeMap<ColumnId, ColumnOps>,
}

/// The one write a row needs after a run.
#[derive(Clone, Debug, PartialEq)]
pub enum Write {
    /// Update the existing row: each column in `ops` becomes (set value, or its current value)
    /// plus the added values; others keep their value.
    Update {
        key: String,
        ops: BTreeMap<ColumnId, ColumnOps>,
    },
    /// Write a fresh row: columns in `ops` as above starting from their default (or 0 for adds),
    /// every other column its default. `replace` when a row with this key exists (it was
    /// deleted and re-created during the run) and must be replaced entirely.
    Insert {
        key: String,
        ops: BTreeMap<ColumnId, ColumnOps>,
        replace: bool,
    },
    /// Delete the row.
    Delete { key: String },
}

impl Write {
    pub fn key(&self) -> &str {
        match self {
            Write::Update { key, .. } | Write::Insert { key, .. } | Write::Delete { key } => key,
        }
    }
}

/// Accumulates a run of operations, keyed by the canonical key text.
#[derive(Debug, Default)]
pub struct Fold {
    rows: BTreeMap<String, RowFold>,
    /// keys in first-touch order, so writes come out in a stable order
    order: Vec<String>,
}

impl Fold {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn is_empty(&self) -> bool {
        self.rows.is_empty()
    }

    /// Applies `op` to the row with `key`; `existed` says whether that row existed before the
    /// run (only consulted the first time the key is seen).
    pub fn apply(&mut self, key: &str, existed: bool, op: &Op) {
        let row = match self.rows.get_mut(key) {
            Some(row) => row,
            None => {
                self.order.push(key.to_owned());
                self.rows.entry(key.to_owned()).or_insert(RowFold {
                    existed,
                    present: existed,
                    base: Base::Original,
                    touched: false,
                    ops: BTreeMap::new(),
                })
            }
        };
        match op.kind {
            ActionKind::Delete => {
                row.present = false;
                row.ops.clear();
                row.touched = true;
            }
            ActionKind::Update if !row.present => {}
            ActionKind::Upsert | ActionKind::Update => {
                if !row.present {
                    row.present = true;
                    row.base = Base::Fresh;
                    row.ops.clear();
                }
                row.touched = true;
                for (column, value) in &op.set {
                    let ops = row.ops.entry(*column).or_default();
                    ops.set = Some(value.clone());
                    ops.add.clear();
                }
                for (column, value) in &op.add {
                    let ops = row.ops.entry(*column).or_default();
                    // adding nothing (a missing path, or null) leaves the column as it is
                    if let Some(value) = value.as_ref().filter(|v| !v.is_null()) {
                        ops.add.push(value.clone());
                    }
                }
            }
        }
    }

    /// The writes for the run, in first-touch order; rows that end as they started are omitted.
    pub fn into_writes(mut self) -> Vec<Write> {
        let mut writes = Vec::new();
        for key in self.order {
            let Some(row) = self.rows.remove(&key) else {
                continue;
            };
            match (row.present, row.base) {
                (false, _) if row.existed => writes.push(Write::Delete { key }),
                (false, _) => {}
                (true, Base::Original) if row.touched => writes.push(Write::Update { key, ops: row.ops }),
                (true, Base::Original) => {}
                (true, Base::Fresh) => writes.push(Write::Insert {
                    key,
                    ops: row.ops,
                    replace: row.existed,
                }),
            }
        }
        writes
    }
}

/// Appends the JSON object the generated SQL reads for one write (see [`crate::sql`]):
/// `{"k": key, "s0": true, "v0": value, "a1": "12.50", "l2": [v, w]}` — for column `i`, `s{i}`
/// says it was set and `v{i}` holds the value (absent: SQL NULL); `a{i}` is the exact sum of the
/// values added, or, when they are not all plain numbers, `l{i}` lists them for PostgreSQL to
/// cast and sum. `row`, where the write names the row it updates, is its ctid (`"r": "(0,1)"`).
pub fn write_row_json(out: &mut String, key: &str, row: Option<&str>, ops: &BTreeMap<ColumnId, ColumnOps>) {
    out.push_str("{\"k\":");
    push_json_string(out, key);
    if let Some(row) = row {
        out.push_str(",\"r\":");
        push_json_string(out, row);
    }
    for (column, op) in ops {
        if let Some(set) = &op.set {
            out.push_str(&format!(",\"s{column}\":true"));
            if let Some(value) = set {
                out.push_str(&format!(",\"v{column}\":"));
                out.push_str(&value.to_string());
            }
        }
        if !op.add.is_empty() {
            match exact_sum(&op.add) {
                Some(sum) => {
                    out.push_str(&format!(",\"a{column}\":"));
                    push_json_string(out, &sum);
                }
                None => {
                    out.push_str(&format!(",\"l{column}\":"));
                    out.push_str(&Value::Array(op.add.clone()).to_string());
                }
            }
        }
    }
    out.push('}');
}

fn push_json_string(out: &mut String, text: &str) {
    // serde_json's string escaping; a String serialises infallibly
    out.push_str(&Value::String(text.to_owned()).to_string());
}

/// A decimal number: `mantissa × 10^-scale`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Decimal {
    mantissa: i128,
    scale: u32,
}

/// Largest scale (digits after the point) or exponent handled exactly; beyond, PostgreSQL sums.
const MAX_SCALE: u32 = 30;

impl Decimal {
    /// Parses a plain number as JSON or PostgreSQL prints it: `-12`, `3.50`, `1e3`, `2.5E-2`.
    fn parse(text: &str) -> Option<Self> {
        let (negative, rest) = match text.strip_prefix('-') {
            Some(rest) => (true, rest),
            None => (false, text),
        };
        let (number, exponent) = match rest.find(['e', 'E']) {
            Some(at) => (&rest[..at], rest[at + 1..].parse::<i32>().ok()?),
            None => (rest, 0),
        };
        let (whole, fraction) = number.split_once('.').unwrap_or((number, ""));
        if whole.is_empty()
            || !whole.bytes().all(|b| b.is_ascii_digit())
            || !fraction.bytes().all(|b| b.is_ascii_digit())
        {
            return None;
        }
        let digits = format!("{whole}{fraction}");
        if digits.len() > 36 {
            return None;
        }
        let mut mantissa: i128 = digits.parse().ok()?;
        let mut scale = i64::try_from(fraction.len()).ok()? - i64::from(exponent);
        if scale < 0 {
            if scale < -i64::from(MAX_SCALE) {
                return None;
            }
            mantissa = mantissa.checked_mul(10i128.checked_pow(u32::try_from(-scale).ok()?)?)?;
            scale = 0;
        }
        let scale = u32::try_from(scale).ok().filter(|s| *s <= MAX_SCALE)?;
        Some(Self {
            mantissa: if negative { -mantissa } else { mantissa },
            scale,
        })
    }

    fn rescale(self, scale: u32) -> Option<i128> {
        self.mantissa.checked_mul(10i128.checked_pow(scale - self.scale)?)
    }

    fn render(self) -> String {
        let digits = self.mantissa.unsigned_abs().to_string();
        let sign = if self.mantissa < 0 { "-" } else { "" };
        let scale = self.scale as usize;
        if scale == 0 {
            return format!("{sign}{digits}");
        }
        let padded = format!("{digits:0>width$}", width = scale + 1);
        let (whole, fraction) = padded.split_at(padded.len() - scale);
        format!("{sign}{whole}.{fraction}")
    }
}

/// The exact sum of `values` (JSON numbers, or strings holding plain numbers) as a decimal
/// string, `None` when a value is not a plain number or the sum leaves i128 — then PostgreSQL
/// sums them with the column's type. Summing first is exact for integer and numeric columns;
/// a float column may differ from one-by-one addition in the last bit.
pub fn exact_sum(values: &[Value]) -> Option<String> {
    let decimals: Vec<Decimal> = values
        .iter()
        .map(|v| match v {
            Value::Number(n) => Decimal::parse(&n.to_string()),
            Value::String(s) => Decimal::parse(s),
            _ => None,
        })
        .collect::<Option<_>>()?;
    let scale = decimals.iter().map(|d| d.scale).max()?;
    let mut total: i128 = 0;
    for decimal in &decimals {
        total = total.checked_add(decimal.rescale(scale)?)?;
    }
    Some(
        Decimal {
            mantissa: total,
            scale,
        }
        .render(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;
    use std::collections::HashMap;

    fn op(kind: ActionKind, set: &[(usize, i64)], add: &[(usize, i64)]) -> Op {
        Op {
            kind,
            set: set.iter().map(|(c, v)| (*c, Some(json!(v)))).collect(),
            add: add.iter().map(|(c, v)| (*c, Some(json!(v)))).collect(),
        }
    }

    const STATUS: usize = 0;
    const ITEMS: usize = 1;

    #[test]
    fn collapses_a_lifecycle_into_one_insert() {
        let mut fold = Fold::new();
        fold.apply("o1", false, &op(ActionKind::Upsert, &[(STATUS, 1)], &[]));
        fold.apply("o1", false, &op(ActionKind::Update, &[], &[(ITEMS, 2)]));
        fold.apply("o1", false, &op(ActionKind::Update, &[], &[(ITEMS, 3)]));
        fold.apply("o1", false, &op(ActionKind::Update, &[(STATUS, 2)], &[]));
        let writes = fold.into_writes();
        assert_eq!(writes.len(), 1);
        let Write::Insert { key, ops, replace } = &writes[0] else {
            panic!("{writes:?}")
        };
        assert_eq!((key.as_str(), *replace), ("o1", false));
        assert_eq!(ops[&STATUS].set, Some(Some(json!(2))));
        assert_eq!(ops[&ITEMS].add, vec![json!(2), json!(3)]);
    }

    #[test]
    fn update_of_a_missing_row_does_nothing_and_delete_then_upsert_replaces() {
        let mut fold = Fold::new();
        fold.apply("gone", false, &op(ActionKind::Update, &[(STATUS, 1)], &[]));
        fold.apply("again", true, &op(ActionKind::Delete, &[], &[]));
        fold.apply("again", true, &op(ActionKind::Upsert, &[(STATUS, 5)], &[]));
        fold.apply("dropped", true, &op(ActionKind::Update, &[(STATUS, 1)], &[]));
        fold.apply("dropped", true, &op(ActionKind::Delete, &[], &[]));
        let writes = fold.into_writes();
        assert_eq!(writes.len(), 2, "{writes:?}");
        assert!(matches!(&writes[0], Write::Insert { key, replace: true, .. } if key == "again"));
        assert!(matches!(&writes[1], Write::Delete { key } if key == "dropped"));
    }

    #[test]
    fn row_json_has_the_documented_shape() {
        let mut ops = BTreeMap::new();
        ops.insert(
            0,
            ColumnOps {
                set: Some(None),
                add: vec![json!(1)],
            },
        );
        ops.insert(
            1,
            ColumnOps {
                set: Some(Some(json!("x\"y"))),
                add: vec![],
            },
        );
        ops.insert(
            2,
            ColumnOps {
                set: None,
                add: vec![json!(2), json!(3.25)],
            },
        );
        ops.insert(
            3,
            ColumnOps {
                set: None,
                add: vec![json!(2), json!("x")],
            },
        );
        let mut out = String::new();
        write_row_json(&mut out, "k\"1", None, &ops);
        let parsed: Value = serde_json::from_str(&out).expect("valid JSON");
        assert_eq!(
            parsed,
            json!({"k": "k\"1", "s0": true, "a0": "1", "s1": true, "v1": "x\"y", "a2": "5.25", "l3": [2, "x"]})
        );
        let mut at_row = String::new();
        write_row_json(&mut at_row, "k", Some("(3,7)"), &BTreeMap::new());
        assert_eq!(at_row, r#"{"k":"k","r":"(3,7)"}"#);
    }

    #[test]
    fn exact_sums() {
        let sum = |values: Value| exact_sum(values.as_array().expect("array"));
        assert_eq!(sum(json!([1, 2, 3])), Some("6".into()));
        assert_eq!(sum(json!([0.1, 0.2])), Some("0.3".into()));
        assert_eq!(sum(json!([19.99, 0.01, -5])), Some("15.00".into()));
        assert_eq!(sum(json!(["2.50", "1e2", 2.5e-2])), Some("102.525".into()));
        assert_eq!(sum(json!([-0.5, 0.25])), Some("-0.25".into()));
        assert_eq!(
            sum(json!([12345678901234567890u64, 12345678901234567890u64])),
            Some("24691357802469135780".into())
        );
        assert_eq!(sum(json!([1, "abc"])), None);
        assert_eq!(sum(json!([1, true])), None);
        assert_eq!(sum(json!([1, "1e99"])), None);
        assert_eq!(sum(json!([1, " 1"])), None);
    }

    // ---- equivalence with applying the operations one at a time ----

    type Row = HashMap<usize, i64>;

    const S: usize = 0;
    const N: usize = 1;
    const M: usize = 2;

    /// Columns S (set only), N (add only), M (set and add). Defaults: S = -1, N = 0, M = 7.
    fn default_row() -> Row {
        Row::from([(S, -1), (N, 0), (M, 7)])
    }

    fn sequential(table: &mut HashMap<String, Row>, key: &str, op: &Op) {
        match op.kind {
            ActionKind::Delete => {
                table.remove(key);
            }
            ActionKind::Update if !table.contains_key(key) => {}
            ActionKind::Upsert | ActionKind::Update => {
                let row = table.entry(key.to_owned()).or_insert_with(default_row);
                for (c, v) in &op.set {
                    row.insert(*c, v.as_ref().and_then(Value::as_i64).unwrap_or(0));
                }
                for (c, v) in &op.add {
                    *row.entry(*c).or_insert(0) += v.as_ref().and_then(Value::as_i64).unwrap_or(0);
                }
            }
        }
    }

    /// What the generated SQL does with a write, on the same model.
    fn execute(table: &mut HashMap<String, Row>, write: &Write) {
        let column = |base: i64, ops: &ColumnOps| -> i64 {
            let start = match &ops.set {
                Some(v) => v.as_ref().and_then(Value::as_i64).unwrap_or(0),
                None => base,
            };
            start + ops.add.iter().filter_map(Value::as_i64).sum::<i64>()
        };
        match write {
            Write::Delete { key } => {
                table.remove(key);
            }
            Write::Update { key, ops } => {
                let row = table.get_mut(key).expect("update of an existing row");
                for (c, o) in ops {
                    let base = row[c];
                    row.insert(*c, column(base, o));
                }
            }
            Write::Insert { key, ops, replace } => {
                assert_eq!(
                    table.contains_key(key),
                    *replace,
                    "replace must say whether the row exists"
                );
                let mut row = default_row();
                for (c, o) in ops {
                    let base = row[c];
                    row.insert(*c, column(base, o));
                }
                table.insert(key.clone(), row);
            }
        }
    }

    fn arb_op() -> impl Strategy<Value = (usize, Op)> {
        let kind = prop_oneof![
            Just(ActionKind::Upsert),
            Just(ActionKind::Update),
            Just(ActionKind::Delete)
        ];
        (0usize..4, kind, any::<bool>(), any::<bool>(), -5i64..5, -5i64..5).prop_map(
            |(key, kind, set, add, a, b)| {
                let mut op = Op {
                    kind,
                    set: vec![],
                    add: vec![],
                };
                if kind != ActionKind::Delete {
                    if set {
                        op.set.push((S, Some(json!(a))));
                        op.set.push((M, Some(json!(b))));
                    }
                    if add {
                        op.add.push((N, Some(json!(a))));
                        if !set {
                            op.add.push((M, Some(json!(b))));
                        }
                    }
                }
                (key, op)
            },
        )
    }

    proptest! {
        #[test]
        fn folding_equals_applying_one_by_one(
            initial in proptest::collection::vec(any::<bool>(), 4),
            ops in proptest::collection::vec(arb_op(), 0..40),
        ) {
            let mut start: HashMap<String, Row> = HashMap::new();
            for (i, exists) in initial.iter().enumerate() {
                if *exists {
                    start.insert(format!("k{i}"), Row::from([(S, 100 + i as i64), (N, 10), (M, 20)]));
                }
            }
            let mut expected = start.clone();
            let mut fold = Fold::new();
            for (key, op) in &ops {
                let key = format!("k{key}");
                sequential(&mut expected, &key, op);
                fold.apply(&key, start.contains_key(&key), op);
            }
            let mut actual = start.clone();
            let writes = fold.into_writes();
            let keys: Vec<&str> = writes.iter().map(Write::key).collect();
            let mut unique = keys.clone();
            unique.sort_unstable();
            unique.dedup();
            prop_assert_eq!(unique.len(), keys.len(), "one write per row");
            for write in &writes {
                execute(&mut actual, write);
            }
            prop_assert_eq!(actual, expected);
        }
    }
}
