//! The statements that apply folded writes to a read-model table, set-based: one statement per
//! kind of write per batch, over `json_to_recordset($1)` / `unnest($1)`.
//!
//! Their access path is fixed by their shape, not left to statistics: the plans are kept for a
//! backend's life and the first ones are made when the read model is empty, so a plan that costs
//! a scan of the table as cheap would stay long after the table has grown. Keys are therefore
//! resolved one by one through `lateral (… offset 0)` subqueries (the fence keeps them per-key
//! index probes), and updates and deletes then find their rows by `ctid`.
//!
//! Every identifier is double-quoted and every name that appears inside a string literal is
//! escaped, so tables or columns called `"order"` or `drop table x` are just names.

use crate::spec::ColumnUse;

/// How a column holds JSON, which decides how a value is taken out of the ops document.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum JsonKind {
    /// Any type with a text input function: the value's text is cast.
    No,
    Json,
    Jsonb,
}

/// A column the handlers write.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Column {
    pub name: String,
    /// The type as `format_type()` prints it.
    pub sql_type: String,
    pub json: JsonKind,
    /// The column default as SQL (`pg_get_expr`), if any.
    pub default: Option<String>,
    pub uses: ColumnUse,
}

/// A read-model table as the statements need it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// Schema-qualified, quoted (`"app"."order_summary"`).
    pub table: String,
    pub key: String,
    pub key_type: String,
    pub rev: String,
    /// Columns the handlers write.
    pub columns: Vec<Column>,
    /// The other writable columns (reset to their defaults when a row is replaced).
    pub other_columns: Vec<String>,
}

/// `"name"`, with embedded quotes doubled.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// A string literal that means `text` whatever `standard_conforming_strings` says.
pub fn quote_literal(text: &str) -> String {
    let doubled = text.replace('\'', "''");
    if text.contains('\\') {
        format!("E'{}'", doubled.replace('\\', "\\\\"))
    } else {
        format!("'{doubled}'")
    }
}

/// Which base a column value starts from.
#[derive(Clone, Copy)]
enum Base {
    /// The row's current value (UPDATE).
    Current,
    /// The column default (INSERT).
    Default,
}

impl Target {
    fn key_ident(&self) -> String {
        quote_ident(&self.key)
    }

    /// `$1`: raw key texts. Returns, in input order, each raw key, its canonical text (the key
    /// column's own cast, so `'ABC'` and `'abc'` uuids are one key) and where the row is (its
    /// `ctid`, which [`Target::update_at_rows_sql`] updates it by; null: there is none).
    pub fn probe_sql(&self) -> String {
        let key = self.key_ident();
        format!(
            "select k.raw, (k.raw::{kt})::text, x.tid \
             from unnest($1::text[]) with ordinality as k(raw, n) \
             left join lateral (select t.ctid as tid from {table} as t where t.{key} = k.raw::{kt} offset 0) as x on true \
             order by k.n",
            kt = self.key_type,
            table = self.table,
        )
    }

    /// `rows` (an expression with a `k` column) joined to the ctid of the row with that key.
    fn located(&self, rows: &str) -> String {
        format!(
            "(select e.*, x.tid from {rows} cross join lateral \
             (select t.ctid as tid from {table} as t where t.{key} = e.k::{kt} offset 0) as x) as e",
            table = self.table,
            key = self.key_ident(),
            kt = self.key_type,
        )
    }

    /// The record columns `json_to_recordset` decodes each write into (see
    /// [`crate::fold::write_row_json`]); `at_row`: and the row's ctid, `r`.
    fn record(&self, at_row: bool) -> String {
        let mut columns = vec!["k text".to_owned()];
        if at_row {
            columns.push("r tid".to_owned());
        }
        for (i, column) in self.columns.iter().enumerate() {
            let value_type = match column.json {
                JsonKind::Jsonb => "jsonb",
                JsonKind::Json => "json",
                JsonKind::No => column.sql_type.as_str(),
            };
            if column.uses.set {
                columns.push(format!("s{i} boolean"));
                columns.push(format!("v{i} {value_type}"));
            }
            if column.uses.add {
                columns.push(format!("a{i} {}", column.sql_type));
                columns.push(format!("l{i} json"));
            }
        }
        format!("json_to_recordset($1::json) as e({})", columns.join(", "))
    }

    /// The new value of column `i` for a write decoded into `e`.
    fn value(&self, i: usize, column: &Column, base: Base) -> String {
        let base_value = match base {
            Base::Current => format!("t.{}", quote_ident(&column.name)),
            Base::Default => column
                .default
                .clone()
                .map(|d| format!("({d})"))
                .unwrap_or_else(|| "null".to_owned()),
        };
        let start = if column.uses.set {
            format!("case when e.s{i} then e.v{i} else {base_value} end")
        } else {
            base_value
        };
        if column.uses.add {
            // a{i}: the exact sum; l{i}: values that are not plain numbers, summed here (a
            // subquery per row: the rare path)
            format!(
                "case when e.a{i} is not null or e.l{i} is not null then coalesce({start}, 0) + \
                 coalesce(e.a{i}, (select sum(x::{ty}) from json_array_elements_text(e.l{i}) as x), 0) \
                 else {start} end",
                ty = column.sql_type
            )
        } else {
            start
        }
    }

    /// `$1`: a JSON array of writes (text), each with the ctid the probe found its row at (`r`),
    /// `$2`: the revision. The rows of those writes that [`Target::update_at_rows_sql`] did not
    /// update because they are no longer where the probe found them: found by key, and updated
    /// only if they have moved (a row still at `r` that was not updated was left alone by its
    /// own `BEFORE` trigger, which must not run twice). Returns key text and the new row.
    pub fn update_sql(&self) -> String {
        self.update_returning(&self.returning(true))
    }

    /// [`Target::update_sql`] returning the key text alone: a write whose rows nobody reads
    /// (a rebuild) does not turn each into JSON.
    pub fn update_keys_sql(&self) -> String {
        self.update_returning(&self.returning(false))
    }

    /// What a write returns: the key text, and the new row as JSON when `docs`.
    fn returning(&self, docs: bool) -> String {
        let key = format!("t.{}::text", self.key_ident());
        if docs {
            format!("{key}, pg_catalog.row_to_json(t.*)")
        } else {
            key
        }
    }

    /// [`Target::update_sql`] for writes that name their row (`r`, from the probe): each row is
    /// found by its ctid, not by its key again, and only if it still holds that key. A row that
    /// has moved since the probe (owner code run by an earlier write of the batch can move one)
    /// is not updated, and its key is missing from what the statement returns.
    pub fn update_at_rows_sql(&self) -> String {
        self.update_at_rows_returning(&self.returning(true))
    }

    /// [`Target::update_at_rows_sql`] returning the key text alone.
    pub fn update_at_rows_keys_sql(&self) -> String {
        self.update_at_rows_returning(&self.returning(false))
    }

    fn update_at_rows_returning(&self, returning: &str) -> String {
        // The key is checked on the row the TID names, never used to find it (`is true` is not
        // a condition an index serves): given the key, the planner probed its index again and
        // filtered on the TID (≈ 3 µs a row under auto_explain; the TID scan ≈ 1 µs).
        let found = format!(
            "t.ctid = e.r and (t.{} = e.k::{}) is true",
            self.key_ident(),
            self.key_type
        );
        self.update_from(&self.record(true), &found, returning)
    }

    /// `update … from {rows} where {found}`, every written column set from `e`.
    fn update_from(&self, rows: &str, found: &str, returning: &str) -> String {
        format!(
            "update {table} as t set {sets} from {rows} where {found} returning {returning}",
            table = self.table,
            sets = self.update_sets(),
        )
    }

    fn update_sets(&self) -> String {
        let mut sets = vec![format!("{} = $2", quote_ident(&self.rev))];
        for (i, column) in self.columns.iter().enumerate() {
            sets.push(format!(
                "{} = {}",
                quote_ident(&column.name),
                self.value(i, column, Base::Current)
            ));
        }
        sets.join(", ")
    }

    fn update_returning(&self, returning: &str) -> String {
        self.update_from(
            &self.located(&self.record(true)),
            "t.ctid = e.tid and e.tid is distinct from e.r",
            returning,
        )
    }

    /// `$1`: a JSON array of writes (text), `$2`: the revision. New rows, or rows replaced
    /// entirely (deleted and re-created within the batch). Returns key text and the new row.
    pub fn insert_sql(&self) -> String {
        self.insert_returning(&self.returning(true))
    }

    /// [`Target::insert_sql`] returning the key text alone (see [`Target::update_keys_sql`]).
    pub fn insert_keys_sql(&self) -> String {
        self.insert_returning(&self.returning(false))
    }

    fn insert_returning(&self, returning: &str) -> String {
        let mut names = vec![self.key_ident(), quote_ident(&self.rev)];
        let mut values = vec![format!("e.k::{}", self.key_type), "$2".to_owned()];
        let mut replace = vec![format!("{0} = excluded.{0}", quote_ident(&self.rev))];
        for (i, column) in self.columns.iter().enumerate() {
            let name = quote_ident(&column.name);
            values.push(self.value(i, column, Base::Default));
            replace.push(format!("{name} = excluded.{name}"));
            names.push(name);
        }
        for other in &self.other_columns {
            replace.push(format!("{} = default", quote_ident(other)));
        }
        format!(
            "insert into {table} as t ({names}) \
             select {values} from {record} \
             on conflict ({key}) do update set {replace} \
             returning {returning}",
            table = self.table,
            names = names.join(", "),
            values = values.join(", "),
            record = self.record(false),
            key = self.key_ident(),
            replace = replace.join(", "),
        )
    }

    /// `$1`: key texts. Returns the deleted keys.
    pub fn delete_sql(&self) -> String {
        format!(
            "delete from {table} as t using {located} where t.ctid = e.tid returning t.{key}::text",
            table = self.table,
            located = self.located("unnest($1::text[]) as e(k)"),
            key = self.key_ident(),
        )
    }

    /// `$1`: key texts, `$2`: the revision. Stamps rows a function handler changed.
    pub fn touch_sql(&self) -> String {
        format!(
            "update {table} as t set {rev} = $2 from {located} where t.ctid = e.tid \
             returning t.{key}::text, pg_catalog.row_to_json(t.*)",
            table = self.table,
            rev = quote_ident(&self.rev),
            located = self.located("unnest($1::text[]) as e(k)"),
            key = self.key_ident(),
        )
    }

    /// `$1`: key texts. For every key, in input order: the key as given, its canonical text,
    /// and the row's revision and document (null when there is no row).
    pub fn read_sql(&self) -> String {
        format!(
            "select k.raw, (k.raw::{kt})::text, x.rev, x.doc from unnest($1::text[]) with ordinality as k(raw, n) \
             left join lateral (select t.{rev} as rev, pg_catalog.row_to_json(t.*) as doc from {table} as t \
                                 where t.{key} = k.raw::{kt} offset 0) as x on true \
             order by k.n",
            table = self.table,
            rev = quote_ident(&self.rev),
            key = self.key_ident(),
            kt = self.key_type,
        )
    }

    /// `cqrs.changed_since`: `(key, rev, doc)` of every row whose revision is above `$1` (every
    /// row for -1) — what a cache holding everything up to `$1` is missing. It scans the table.
    pub fn changed_since_sql(&self) -> String {
        format!(
            "select t.{key}::text, t.{rev}::bigint, pg_catalog.row_to_json(t.*) from {table} as t where t.{rev} > $1",
            table = self.table,
            rev = quote_ident(&self.rev),
            key = self.key_ident(),
        )
    }

    /// Empties the table (rebuild). `delete`, not `truncate`: readers keep seeing the old rows
    /// until the rebuild commits, and no ACCESS EXCLUSIVE lock is taken.
    pub fn clear_sql(&self) -> String {
        format!("delete from {}", self.table)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn target() -> Target {
        Target {
            table: "\"app\".\"order\"".to_owned(),
            key: "id".to_owned(),
            key_type: "text".to_owned(),
            rev: "rev".to_owned(),
            columns: vec![
                Column {
                    name: "status".to_owned(),
                    sql_type: "text".to_owned(),
                    json: JsonKind::No,
                    default: Some("'new'::text".to_owned()),
                    uses: ColumnUse {
                        set: true,
                        add: false,
                    },
                },
                Column {
                    name: "n".to_owned(),
                    sql_type: "integer".to_owned(),
                    json: JsonKind::No,
                    default: None,
                    uses: ColumnUse {
                        set: false,
                        add: true,
                    },
                },
                Column {
                    name: "drop table x; --".to_owned(),
                    sql_type: "jsonb".to_owned(),
                    json: JsonKind::Jsonb,
                    default: None,
                    uses: ColumnUse {
                        set: true,
                        add: false,
                    },
                },
            ],
            other_columns: vec!["note".to_owned()],
        }
    }

    #[test]
    fn quoting() {
        assert_eq!(quote_ident("a\"b"), "\"a\"\"b\"");
        assert_eq!(quote_literal("it's"), "'it''s'");
        assert_eq!(quote_literal("a\\b'"), "E'a\\\\b'''");
    }

    #[test]
    fn statements_quote_every_name() {
        let t = target();
        let update = t.update_sql();
        assert!(update.starts_with("update \"app\".\"order\" as t set \"rev\" = $2, \"status\" = case when e.s0 then e.v0 else t.\"status\" end"), "{update}");
        assert!(
            update
                .contains("\"drop table x; --\" = case when e.s2 then e.v2 else t.\"drop table x; --\" end"),
            "{update}"
        );
        assert!(update.contains("coalesce(t.\"n\", 0) + coalesce(e.a1, (select sum(x::integer) from json_array_elements_text(e.l1) as x), 0)"), "{update}");
        assert!(update.contains("json_to_recordset($1::json) as e(k text, r tid, s0 boolean, v0 text, a1 integer, l1 json, s2 boolean, v2 jsonb)"), "{update}");
        let insert = t.insert_sql();
        assert!(insert.contains("on conflict (\"id\") do update set \"rev\" = excluded.\"rev\", \"status\" = excluded.\"status\""), "{insert}");
        assert!(insert.contains("\"note\" = default"), "{insert}");
        assert!(
            insert.contains("case when e.s0 then e.v0 else ('new'::text) end"),
            "{insert}"
        );
        assert!(
            update.contains("cross join lateral (select t.ctid as tid from \"app\".\"order\" as t where t.\"id\" = e.k::text offset 0) as x) as e where t.ctid = e.tid and e.tid is distinct from e.r"),
            "{update}"
        );
        assert!(t
            .delete_sql()
            .contains("where t.ctid = e.tid returning t.\"id\"::text"));
        assert!(t.probe_sql().contains(
            "left join lateral (select t.ctid as tid from \"app\".\"order\" as t where t.\"id\" = k.raw::text offset 0)"
        ));
        let at_rows = t.update_at_rows_sql();
        assert!(
            at_rows.contains("json_to_recordset($1::json) as e(k text, r tid, s0 boolean"),
            "{at_rows}"
        );
        assert!(
            at_rows.contains("where t.ctid = e.r and (t.\"id\" = e.k::text) is true returning"),
            "{at_rows}"
        );
    }
}
