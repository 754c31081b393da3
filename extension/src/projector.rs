//! The projection engine: applies an ordered batch of command-log rows to projections.
//!
//! For each projection (in name order, its state row locked — which serialises projectors and
//! makes the checkpoint a fence):
//! 1. skip the batch when its commit LSN is at or below the checkpoint (a redelivery, or a
//!    deposed projector);
//! 2. plan it against the projection's per-stream progress and parked events
//!    ([`cqrs_projection::sequencing`]);
//! 3. fold the applicable events into one write per read-model row and execute the writes
//!    set-based ([`cqrs_projection::fold`], [`cqrs_projection::sql`]), with the progress, parked
//!    events and checkpoint, in a subtransaction;
//! 4. if anything fails, apply the events one at a time to find the poison event, and either halt
//!    the projection (nothing of the batch applied to it; other projections go on) or move the
//!    event to `cqrs.dead_letter` and go on.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::rc::Rc;

use cqrs_projection::event::Event;
use cqrs_projection::fold::{write_row_json, Fold, Op, Write};
use cqrs_projection::lsn;
use cqrs_projection::sequencing::{self, Plan};
use cqrs_projection::spec::{key_text, CompiledAction, Step as ProgramStep};
use cqrs_projection::sql::Target;
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::errors::{column, error, internal, spi_error, unknown_projection};
use crate::events;
use crate::owner_rights;
use crate::prepared;
use crate::projection_catalog::{self, Definition, OnError};
use crate::subtransaction::{self, Failure};
use crate::waiters;

/// A read-model row a batch changed.
#[derive(Debug)]
pub(crate) struct ChangedRow {
    pub(crate) projection: Rc<str>,
    pub(crate) key: String,
    pub(crate) rev: i64,
    /// The row as json (a Datum copied out of SPI), `None` when deleted or not collected.
    pub(crate) doc: Option<pg_sys::Datum>,
    pub(crate) deleted: bool,
}

/// The changed rows of a call, one per (projection, key): the last change wins.
#[derive(Default)]
pub(crate) struct Changes {
    rows: Vec<ChangedRow>,
    index: HashMap<(Rc<str>, String), usize>,
}

impl Changes {
    fn record(&mut self, row: ChangedRow) {
        let id = (Rc::clone(&row.projection), row.key.clone());
        match self.index.get(&id) {
            Some(&at) => self.rows[at] = row,
            None => {
                self.index.insert(id, self.rows.len());
                self.rows.push(row);
            }
        }
    }

    fn extend(&mut self, rows: Vec<ChangedRow>) {
        for row in rows {
            self.record(row);
        }
    }

    pub(crate) fn into_rows(self) -> Vec<ChangedRow> {
        self.rows
    }
}

/// An event to set aside instead of applying: the one a halted projection failed on, skipped
/// by `cqrs.resume(name, skip => true)`.
pub(crate) struct Skip {
    pub(crate) stream: String,
    pub(crate) seq: i64,
    pub(crate) failure: Failure,
}

/// Takes the skipped event, if this plan would apply it, out of the plan.
fn take_skipped(plan: &mut Plan<'_>, skip: Option<&Skip>) -> Vec<(Event, Failure)> {
    let Some(skip) = skip else {
        return Vec::new();
    };
    let Some(at) = plan
        .apply
        .iter()
        .position(|e| e.stream == skip.stream && e.seq == skip.seq)
    else {
        return Vec::new();
    };
    let event = plan.apply.remove(at);
    vec![(event.clone(), skip.failure.clone())]
}

/// How a call projects.
pub(crate) struct Options<'a> {
    /// The batch's commit LSN: projections whose checkpoint is at or past it skip the batch.
    pub(crate) commit_lsn: Option<u64>,
    /// Which projections the batch is for.
    pub(crate) which: Which<'a>,
    /// Collect the changed rows as jsonb (rebuild does not need them).
    pub(crate) with_docs: bool,
    /// An event to set aside rather than apply.
    pub(crate) skip: Option<&'a Skip>,
}

/// The projections a batch is applied to (those halted are skipped).
#[derive(Clone, Copy)]
pub(crate) enum Which<'a> {
    /// One projection (catch-up, rebuild, resume); an unknown name is an error.
    One(&'a str),
    /// The projections of one group (project_batch).
    Group(&'a str),
    /// Every projection (project_batch on a database of a release before projection groups).
    All,
}

/// What happened to one projection.
#[derive(Debug, Default)]
pub(crate) struct Report {
    pub(crate) applied: u64,
    pub(crate) duplicates: u64,
    pub(crate) dead_lettered: u64,
    /// The error and event that halted it.
    pub(crate) halted: Option<(Failure, Option<Event>)>,
}

struct State {
    name: String,
    halted: bool,
    checkpoint_lsn: Option<u64>,
    revision: i64,
    definition_version: i64,
    relation_version: String,
    parked: i64,
}

/// The state rows a batch locks (what [`State`] holds), before the clause choosing them.
macro_rules! lock_states_of {
    ($choice:literal) => {
        concat!(
            "select s.name, s.halted, s.checkpoint_lsn::text, s.revision, p.definition_version, c.xmin::text, s.parked
  from cqrs.projection_state s
  join cqrs.projection p on p.name = s.name
  join pg_catalog.pg_class c on c.oid = p.target
",
            $choice,
            "
   for update of s"
        )
    };
}

const LOCK_ALL: &str = lock_states_of!(" order by s.name");

const LOCK_GROUP: &str = lock_states_of!(" where p.projection_group = $1\n order by s.name");

const LOCK_ONE: &str = lock_states_of!(" where s.name = $1");

// Per-key lookups through `lateral (… offset 0)`: plans are kept for the backend's life and the
// first ones are made while these tables are empty; the fence keeps each key an index probe
// however large the tables grow (see cqrs_projection::sql).
const PROGRESS: &str = "\
select u.stream, ps.last_seq, ps.ctid
  from unnest($2::text[]) as u(stream)
  cross join lateral (select p.last_seq, p.ctid from cqrs.projection_stream p
                       where p.projection = $1 and p.stream = u.stream offset 0) as ps";

const PARKED: &str = "\
select p.event::text
  from unnest($2::text[]) as u(stream)
  cross join lateral (select k.event from cqrs.parked k
                       where k.projection = $1 and k.stream = u.stream offset 0) as p";

// Progress of streams the projection has seen before is updated in place (cheaper than an
// upsert's speculative insertion), found by where [`PROGRESS`] read it (a third of the update's
// time was finding the rows again by key); new streams are inserted. A row found no longer there
// (the projection's state row is locked, so only an operator's hand can have moved it) leaves
// its stream to ADVANCE_PROGRESS, which finds it by key.
//
// The key is checked on the row the TID names, never used to find rows (`is true` is not a
// condition an index can serve): the plan is kept, and one made while the table held a handful
// of rows reached them through the key's index — every row of the projection, each compared
// with every stream of the batch (29 ms for one update at 5,070 streams, auto_explain) — until an
// ANALYZE happened to plan it again. With sequential scans off (index_plans) the TID probe is
// then the only way to the rows.
const ADVANCE_READ_PROGRESS: &str = "\
update cqrs.projection_stream ps set last_seq = u.last_seq
  from unnest($2::tid[], $3::text[], $4::bigint[]) as u(tid, stream, last_seq)
 where ps.ctid = u.tid and (ps.projection = $1 and ps.stream = u.stream and ps.last_seq < u.last_seq) is true";

const ADVANCE_PROGRESS: &str = "\
update cqrs.projection_stream ps set last_seq = u.last_seq
  from (select u.last_seq, x.tid
          from unnest($2::text[], $3::bigint[]) as u(stream, last_seq)
          cross join lateral (select p.ctid as tid from cqrs.projection_stream p
                               where p.projection = $1 and p.stream = u.stream and p.last_seq < u.last_seq
                              offset 0) as x) as u
 where ps.ctid = u.tid";

const START_PROGRESS: &str = "\
insert into cqrs.projection_stream as ps (projection, stream, last_seq)
select $1, u.stream, u.last_seq from unnest($2::text[], $3::bigint[]) as u(stream, last_seq)
on conflict (projection, stream) do update set last_seq = excluded.last_seq
 where ps.last_seq < excluded.last_seq";

const PARK: &str = "\
insert into cqrs.parked (projection, stream, seq, event)
select $1, e ->> 'stream', (e ->> 'seq')::bigint, e from jsonb_array_elements($2::jsonb) as e
on conflict (projection, stream, seq) do nothing";

const UNPARK: &str = "\
delete from cqrs.parked p
 using (select x.tid from unnest($2::text[], $3::bigint[]) as u(stream, seq)
          cross join lateral (select k.ctid as tid from cqrs.parked k
                               where k.projection = $1 and k.stream = u.stream and k.seq = u.seq offset 0) as x) as u
 where p.ctid = u.tid";

const RECOUNT_PARKED: &str = "\
update cqrs.projection_state s set parked = (select count(*) from cqrs.parked p where p.projection = $1)
 where s.name = $1";

const DEAD_LETTER: &str = "\
insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate, error_detail)
select $1, e ->> 'stream', (e ->> 'seq')::bigint, (e ->> 'command_id')::uuid, e ->> 'command_type', e,
       $2[o::int], $3[o::int], $5[o::int]
  from jsonb_array_elements($4::jsonb) with ordinality as x(e, o)";

/// [`DEAD_LETTER`] for an install of a release before 0.3.0 (the summary only, see
/// [`crate::installed_schema`]).
const DEAD_LETTER_SUMMARY_ONLY: &str = "\
insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate)
select $1, e ->> 'stream', (e ->> 'seq')::bigint, (e ->> 'command_id')::uuid, e ->> 'command_type', e,
       $2[o::int], $3[o::int]
  from jsonb_array_elements($4::jsonb) with ordinality as x(e, o)";

const SAVE_CHECKPOINT: &str = "\
update cqrs.projection_state set
       checkpoint_lsn = greatest(checkpoint_lsn, $2::pg_lsn),
       checkpoint_position = greatest(checkpoint_position, $3),
       checkpoint_at = now(),
       revision = greatest(revision, $4),
       applied = applied + $5,
       duplicates = duplicates + $6,
       dead_lettered = dead_lettered + $7
 where name = $1";

const HALT: &str = "\
update cqrs.projection_state set
       halted = true, last_error = $2, last_error_sqlstate = $3, last_error_at = now(), last_error_event = $4::jsonb,
       last_error_detail = $5
 where name = $1";

/// [`HALT`] for an install of a release before 0.3.0 (the summary only).
const HALT_SUMMARY_ONLY: &str = "\
update cqrs.projection_state set
       halted = true, last_error = $2, last_error_sqlstate = $3, last_error_at = now(), last_error_event = $4::jsonb
 where name = $1";

fn text_array() -> PgOid {
    PgBuiltInOids::TEXTARRAYOID.into()
}

fn lock_states(client: &mut SpiClient<'_>, which: Which<'_>) -> Result<Vec<State>, ErrorReport> {
    let rows = match which {
        Which::One(name) => {
            let plan = prepared::statement(client, LOCK_ONE, &[PgBuiltInOids::TEXTOID.into()])?;
            prepared::index_plans(|| client.update(&*plan, None, &[name.into()]))
        }
        Which::Group(group) => {
            let plan = prepared::statement(client, LOCK_GROUP, &[PgBuiltInOids::TEXTOID.into()])?;
            prepared::index_plans(|| client.update(&*plan, None, &[group.into()]))
        }
        Which::All => {
            let plan = prepared::statement(client, LOCK_ALL, &[])?;
            prepared::index_plans(|| client.update(&*plan, None, &[]))
        }
    }
    .map_err(|err| spi_error("locking the projection states", err))?;
    let mut states = Vec::new();
    for row in rows {
        states.push(State {
            name: column(row.get::<String>(1), "name")?.unwrap_or_default(),
            halted: column(row.get::<bool>(2), "halted")?.unwrap_or(false),
            checkpoint_lsn: column(row.get::<String>(3), "checkpoint_lsn")?
                .and_then(|text| lsn::parse(&text)),
            revision: column(row.get::<i64>(4), "revision")?.unwrap_or(0),
            definition_version: column(row.get::<i64>(5), "definition_version")?.unwrap_or(0),
            relation_version: column(row.get::<String>(6), "the table version")?.unwrap_or_default(),
            parked: column(row.get::<i64>(7), "parked")?.unwrap_or(0),
        });
    }
    if let (Which::One(name), true) = (which, states.is_empty()) {
        return Err(unknown_projection(name));
    }
    Ok(states)
}

/// A projection's progress on the batch's streams: each stream's last applied seq, and where
/// its row is (for [`ADVANCE_READ_PROGRESS`]).
struct Progress {
    last_seq: HashMap<String, i64>,
    rows: HashMap<String, pg_sys::ItemPointerData>,
}

fn read_progress(
    client: &mut SpiClient<'_>,
    name: &str,
    streams: &[String],
) -> Result<Progress, ErrorReport> {
    let plan = prepared::statement(client, PROGRESS, &[PgBuiltInOids::TEXTOID.into(), text_array()])?;
    let rows = prepared::index_plans(|| client.update(&*plan, None, &[name.into(), streams.to_vec().into()]))
        .map_err(|err| spi_error("reading stream progress", err))?;
    let mut progress = Progress {
        last_seq: HashMap::with_capacity(rows.len()),
        rows: HashMap::with_capacity(rows.len()),
    };
    for row in rows {
        let stream = column(row.get::<String>(1), "stream")?.unwrap_or_default();
        let last = column(row.get::<i64>(2), "last_seq")?.unwrap_or(0);
        if let Some(tid) = column(row.get::<pg_sys::ItemPointerData>(3), "ctid")? {
            progress.rows.insert(stream.clone(), tid);
        }
        progress.last_seq.insert(stream, last);
    }
    Ok(progress)
}

fn read_parked(
    client: &mut SpiClient<'_>,
    name: &str,
    streams: &[String],
) -> Result<Vec<Event>, ErrorReport> {
    let plan = prepared::statement(client, PARKED, &[PgBuiltInOids::TEXTOID.into(), text_array()])?;
    let rows = prepared::index_plans(|| client.update(&*plan, None, &[name.into(), streams.to_vec().into()]))
        .map_err(|err| spi_error("reading parked events", err))?;
    events::from_rows(rows, "a parked event")
}

/// A declarative action evaluated for one event.
struct Pending {
    raw_key: String,
    op: Op,
}

fn describe(event: &Event) -> String {
    format!(
        "event {}#{} ({}, position {})",
        event.stream, event.seq, event.command_type, event.position
    )
}

fn evaluate(def: &Definition, event: &Event, action: &CompiledAction) -> Result<Pending, ErrorReport> {
    let raw_key = key_text(action.key.value(event).as_ref()).map_err(|reason| {
        error(
            PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION,
            format!("projection {}: {}: {reason}", def.name, describe(event)),
        )
    })?;
    Ok(Pending {
        raw_key,
        op: Op {
            kind: action.kind,
            set: action.set.iter().map(|(c, s)| (*c, s.value(event))).collect(),
            add: action.add.iter().map(|(c, s)| (*c, s.value(event))).collect(),
        },
    })
}

/// Copies a Datum returned by SPI into the caller's memory context, so it outlives SPI_finish.
fn keep_doc(datum: Option<pg_sys::Datum>) -> Option<pg_sys::Datum> {
    // SAFETY: datum is a non-null json (varlena, not by value) from the current SPI result.
    datum.map(|d| unsafe { pg_sys::SPI_datumTransfer(d, false, -1) })
}

/// The writes of one projection's read model for one batch: its definition, the revision the
/// rows it changes get, and whether to return their documents.
/// A statement of a read model's writes, made from its target.
type WriteSql = fn(&Target) -> String;

struct ReadModelWrite<'a> {
    def: &'a Definition,
    projection: Rc<str>,
    rev: i64,
    with_docs: bool,
}

impl ReadModelWrite<'_> {
    fn rows_changed(
        &self,
        client: &mut SpiClient<'_>,
        which: &str,
        sql: fn(&Target) -> String,
        args: (&[PgOid], Vec<pgrx::datum::DatumWithOid<'static>>),
        out: &mut Vec<ChangedRow>,
    ) -> Result<(), ErrorReport> {
        let plan = self.def.statement(client, which, sql, args.0)?;
        let mut rows = prepared::index_plans(|| client.update(&*plan, None, &args.1))
            .map_err(|err| spi_error(&format!("{which} of projection {}", self.def.name), err))?;
        // iterate the table itself: only it hands out a column as the raw Datum
        while rows.next().is_some() {
            let key = column(rows.get::<String>(1), "a key")?.unwrap_or_default();
            let doc = if self.with_docs {
                keep_doc(
                    rows.get_datum_by_ordinal(2)
                        .map_err(|e| spi_error("reading a row", e))?,
                )
            } else {
                None
            };
            out.push(ChangedRow {
                projection: Rc::clone(&self.projection),
                key,
                rev: self.rev,
                doc,
                deleted: false,
            });
        }
        Ok(())
    }

    /// Applies the pending steps: probe the keys, fold, write.
    // One piece: the probe's answer, the fold and the three writes share the keys' state.
    fn write_pending(
        &self,
        client: &mut SpiClient<'_>,
        pending: &mut Vec<Pending>,
        out: &mut Vec<ChangedRow>,
    ) -> Result<(), ErrorReport> {
        if pending.is_empty() {
            return Ok(());
        }
        let mut seen = HashSet::new();
        let raw: Vec<String> = pending
            .iter()
            .filter(|s| seen.insert(s.raw_key.as_str()))
            .map(|s| s.raw_key.clone())
            .collect();
        let plan = self
            .def
            .statement(client, "probe", Target::probe_sql, &[text_array()])?;
        let rows = prepared::index_plans(|| client.update(&*plan, None, &[raw.into()]))
            .map_err(|err| spi_error(&format!("probing keys of projection {}", self.def.name), err))?;
        let mut keys: HashMap<String, (String, bool)> = HashMap::new();
        // where each existing row is, by canonical key, as `tid`'s text
        let mut at: HashMap<String, String> = HashMap::new();
        for row in rows {
            let raw = column(row.get::<String>(1), "a key")?.unwrap_or_default();
            let canonical = column(row.get::<String>(2), "a key")?.unwrap_or_default();
            // a row where the probe found one exists
            let tid = column(row.get::<pg_sys::ItemPointerData>(3), "ctid")?;
            if let Some(tid) = tid {
                let (block, offset) = pgrx::itemptr::item_pointer_get_both(tid);
                at.insert(canonical.clone(), format!("({block},{offset})"));
            }
            keys.insert(raw, (canonical, tid.is_some()));
        }
        let mut fold = Fold::new();
        for step in pending.drain(..) {
            let (canonical, exists) = keys
                .get(&step.raw_key)
                .ok_or_else(|| internal("a probed key is missing from the probe's answer"))?;
            fold.apply(canonical, *exists, &step.op);
        }
        // the writes as JSON text arrays, decoded by json_to_recordset in the statements; updates
        // name the row the probe found
        let (mut updates, mut inserts, mut deletes) = (String::from("["), String::from("["), Vec::new());
        let mut updated = Vec::new();
        for write in fold.into_writes() {
            match write {
                Write::Update { key, ops } => {
                    if updates.len() > 1 {
                        updates.push(',');
                    }
                    write_row_json(&mut updates, &key, at.get(&key).map(String::as_str), &ops);
                    updated.push((key, ops));
                }
                Write::Insert { key, ops, .. } => {
                    if inserts.len() > 1 {
                        inserts.push(',');
                    }
                    write_row_json(&mut inserts, &key, None, &ops);
                }
                Write::Delete { key } => deletes.push(key),
            }
        }
        updates.push(']');
        inserts.push(']');
        let text_rev: &[PgOid] = &[PgBuiltInOids::TEXTOID.into(), PgBuiltInOids::INT8OID.into()];
        if !deletes.is_empty() {
            let plan = self
                .def
                .statement(client, "delete", Target::delete_sql, &[text_array()])?;
            let rows = prepared::index_plans(|| client.update(&*plan, None, &[deletes.into()]))
                .map_err(|err| spi_error(&format!("deleting rows of projection {}", self.def.name), err))?;
            for row in rows {
                let key = column(row.get::<String>(1), "a key")?.unwrap_or_default();
                out.push(ChangedRow {
                    projection: Rc::clone(&self.projection),
                    key,
                    rev: self.rev,
                    doc: None,
                    deleted: true,
                });
            }
        }
        // without docs, statements that return the keys alone (kept under their own names)
        let [(at_rows, at_rows_sql), (update, update_sql), (insert, insert_sql)]: [(&str, WriteSql); 3] =
            if self.with_docs {
                [
                    ("update at rows", Target::update_at_rows_sql),
                    ("update", Target::update_sql),
                    ("insert", Target::insert_sql),
                ]
            } else {
                [
                    ("update keys at rows", Target::update_at_rows_keys_sql),
                    ("update keys", Target::update_keys_sql),
                    ("insert keys", Target::insert_keys_sql),
                ]
            };
        if !updated.is_empty() {
            let before = out.len();
            self.rows_changed(
                client,
                at_rows,
                at_rows_sql,
                (text_rev, vec![updates.into(), self.rev.into()]),
                out,
            )?;
            if out.len() - before < updated.len() {
                // rows that moved since the probe: by key (one a BEFORE trigger left alone stays so)
                let done: HashSet<&str> = out[before..].iter().map(|row| row.key.as_str()).collect();
                let mut rest = String::from("[");
                for (key, ops) in updated.iter().filter(|(key, _)| !done.contains(key.as_str())) {
                    if rest.len() > 1 {
                        rest.push(',');
                    }
                    write_row_json(&mut rest, key, at.get(key).map(String::as_str), ops);
                }
                rest.push(']');
                self.rows_changed(
                    client,
                    update,
                    update_sql,
                    (text_rev, vec![rest.into(), self.rev.into()]),
                    out,
                )?;
            }
        }
        if inserts.len() > 2 {
            self.rows_changed(
                client,
                insert,
                insert_sql,
                (text_rev, vec![inserts.into(), self.rev.into()]),
                out,
            )?;
        }
        Ok(())
    }

    /// Reads `rows` again (as the owner, after every statement of the batch ended), so that the
    /// documents returned for the cache are the rows as the batch left them; a row gone by then is
    /// returned as deleted.
    fn read_again(&self, client: &mut SpiClient<'_>, rows: &mut [ChangedRow]) -> Result<(), ErrorReport> {
        if rows.is_empty() {
            return Ok(());
        }
        let keys: Vec<String> = rows.iter().map(|row| row.key.clone()).collect();
        let plan = self
            .def
            .statement(client, "read again", Target::read_sql, &[text_array()])?;
        let mut read =
            prepared::index_plans(|| client.select(&*plan, None, &[keys.into()])).map_err(|err| {
                spi_error(
                    &format!("reading rows of projection {} again", self.def.name),
                    err,
                )
            })?;
        // one answer per key, in input order (Target::read_sql); iterate the table itself: only
        // it hands out a column as the raw Datum
        for row in rows.iter_mut() {
            if read.next().is_none() {
                return Err(internal("a key is missing from the rows read again"));
            }
            let doc = keep_doc(
                read.get_datum_by_ordinal(4)
                    .map_err(|e| spi_error("reading a row again", e))?,
            );
            row.deleted = doc.is_none();
            row.doc = doc;
        }
        Ok(())
    }

    /// Calls a function handler with the event, then stamps the rows it reports as changed.
    fn call(
        &self,
        client: &mut SpiClient<'_>,
        function: &str,
        event: &Event,
        out: &mut Vec<ChangedRow>,
    ) -> Result<(), ErrorReport> {
        let which = format!("function {function}");
        let plan = self.def.statement(
            client,
            &which,
            |_| format!("select f.k from {function}($1) as f(k)"),
            &[PgBuiltInOids::JSONBOID.into()],
        )?;
        let rows = client
            .update(&*plan, None, &[JsonB(event.to_json()).into()])
            .map_err(|err| {
                spi_error(
                    &format!("calling {function} for projection {}", self.def.name),
                    err,
                )
            })?;
        let mut keys = Vec::new();
        for row in rows {
            if let Some(key) = column(row.get::<String>(1), "a key")? {
                keys.push(key);
            }
        }
        if keys.is_empty() {
            return Ok(());
        }
        let mut touched = Vec::new();
        self.rows_changed(
            client,
            "touch",
            Target::touch_sql,
            (
                &[text_array(), PgBuiltInOids::INT8OID.into()],
                vec![keys.clone().into(), self.rev.into()],
            ),
            &mut touched,
        )?;
        let present: HashSet<&str> = touched.iter().map(|r| r.key.as_str()).collect();
        let gone: Vec<String> = keys
            .into_iter()
            .filter(|k| !present.contains(k.as_str()))
            .collect();
        out.append(&mut touched);
        for key in gone {
            out.push(ChangedRow {
                projection: Rc::clone(&self.projection),
                key,
                rev: self.rev,
                doc: None,
                deleted: true,
            });
        }
        Ok(())
    }
}

/// Applies `events` in order to the read model of `def`, as the table's owner (see
/// [`owner_rights`]); callers run it in a subtransaction.
fn apply_events(
    client: &mut SpiClient<'_>,
    write: &ReadModelWrite<'_>,
    events: &[&Event],
    out: &mut Vec<ChangedRow>,
) -> Result<(), ErrorReport> {
    owner_rights::as_owner(write.def.owner, || apply_in_order(client, write, events, out))
}

fn apply_in_order(
    client: &mut SpiClient<'_>,
    write: &ReadModelWrite<'_>,
    events: &[&Event],
    out: &mut Vec<ChangedRow>,
) -> Result<(), ErrorReport> {
    let first = out.len();
    apply_steps(client, write, events, out)?;
    if write.with_docs && out.len() > first && owner_code_may_rewrite(write.def.relid) {
        write.read_again(client, &mut out[first..])?;
    }
    Ok(())
}

/// Whether owner code may change the read model's rows after a statement of the batch returned
/// them: an AFTER trigger fires when its statement ends (an insert's trigger may change a row the
/// update before it returned, an update's trigger a row of the same update), and a rule may
/// write other rows. Function handlers are not counted: the rows each one reports are returned
/// after it ran. Read from the relcache (no statement per batch): most read models have neither.
fn owner_code_may_rewrite(relid: pg_sys::Oid) -> bool {
    // SAFETY: the relcache entry of the read model, which this batch's writes hold locked (ROW
    // EXCLUSIVE, to the end of the transaction), is only read and then closed; `triggers`
    // points to `numtriggers` triggers.
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(relid);
        if rel.is_null() {
            return true;
        }
        let rules = !(*rel).rd_rules.is_null();
        let desc = (*rel).trigdesc;
        let user_trigger = !desc.is_null() && {
            let count = usize::try_from((*desc).numtriggers).unwrap_or(0);
            (0..count).any(|i| {
                let trigger = &*(*desc).triggers.add(i);
                !trigger.tgisinternal && trigger.tgenabled != TRIGGER_DISABLED
            })
        };
        pg_sys::RelationClose(rel);
        rules || user_trigger
    }
}

/// `pg_trigger.tgenabled` of a disabled trigger.
const TRIGGER_DISABLED: std::ffi::c_char = b'D' as std::ffi::c_char;

fn apply_steps(
    client: &mut SpiClient<'_>,
    write: &ReadModelWrite<'_>,
    events: &[&Event],
    out: &mut Vec<ChangedRow>,
) -> Result<(), ErrorReport> {
    let mut pending = Vec::new();
    for event in events {
        let steps = write.def.program.steps_for(&event.command_type);
        if let (Some(why), false) = (&event.unreadable, steps.is_empty()) {
            return Err(error(
                PgSqlErrorCode::ERRCODE_PROGRAM_LIMIT_EXCEEDED,
                format!("projection {}: {}: {why}", write.def.name, describe(event)),
            ));
        }
        for step in steps {
            match step {
                ProgramStep::Declarative(action) => pending.push(evaluate(write.def, event, action)?),
                ProgramStep::Function(function) => {
                    // a function sees the read model as every earlier event left it
                    write.write_pending(client, &mut pending, out)?;
                    write.call(client, function, event, out)?;
                }
            }
        }
    }
    write.write_pending(client, &mut pending, out)
}

/// Saves the planned progress: in place where the row was read, by key where it has moved
/// since, inserted for streams new to the projection.
fn advance_progress(
    client: &mut SpiClient<'_>,
    name: &str,
    known: &Progress,
    plan: &Plan<'_>,
) -> Result<(), ErrorReport> {
    let by_key = [
        PgBuiltInOids::TEXTOID.into(),
        text_array(),
        PgBuiltInOids::INT8ARRAYOID.into(),
    ];
    // streams whose row was read: saved at that row; the others are new to the projection
    let (mut tids, mut read_seqs, mut read_streams) = (Vec::new(), Vec::new(), Vec::new());
    let (mut new_streams, mut new_seqs) = (Vec::new(), Vec::new());
    for (stream, seq) in &plan.progress {
        match known.rows.get(stream.as_str()) {
            Some(tid) => {
                tids.push(*tid);
                read_streams.push(stream.clone());
                read_seqs.push(*seq);
            }
            None => {
                new_streams.push(stream.clone());
                new_seqs.push(*seq);
            }
        }
    }
    if !tids.is_empty() {
        let expected = tids.len();
        let statement = prepared::statement(
            client,
            ADVANCE_READ_PROGRESS,
            &[
                PgBuiltInOids::TEXTOID.into(),
                PgBuiltInOids::TIDARRAYOID.into(),
                text_array(),
                PgBuiltInOids::INT8ARRAYOID.into(),
            ],
        )?;
        let updated = prepared::index_plans(|| {
            client.update(
                &*statement,
                None,
                &[name.into(), tids.into(), read_streams.into(), read_seqs.into()],
            )
        })
        .map_err(|err| spi_error("saving stream progress", err))?
        .len();
        if updated < expected {
            // the rest by key (the ones just saved are past its guard); rare, so the arrays are
            // made again here rather than kept for it
            let (streams, seqs): (Vec<String>, Vec<i64>) = plan
                .progress
                .iter()
                .filter(|(stream, _)| known.rows.contains_key(stream.as_str()))
                .map(|(stream, seq)| (stream.clone(), *seq))
                .unzip();
            let statement = prepared::statement(client, ADVANCE_PROGRESS, &by_key)?;
            prepared::index_plans(|| {
                client.update(&*statement, None, &[name.into(), streams.into(), seqs.into()])
            })
            .map_err(|err| spi_error("saving stream progress", err))?;
        }
    }
    if !new_streams.is_empty() {
        let statement = prepared::statement(client, START_PROGRESS, &by_key)?;
        prepared::index_plans(|| {
            client.update(
                &*statement,
                None,
                &[name.into(), new_streams.into(), new_seqs.into()],
            )
        })
        .map_err(|err| spi_error("saving stream progress", err))?;
    }
    Ok(())
}

/// Progress, parked events and dead letters of a planned batch.
// Long but flat: four kept statements, each with its arguments.
fn write_bookkeeping(
    client: &mut SpiClient<'_>,
    name: &str,
    known: &Progress,
    plan: &Plan<'_>,
    dead: &[(Event, Failure)],
) -> Result<(), ErrorReport> {
    advance_progress(client, name, known, plan)?;
    if !plan.park.is_empty() {
        let events = Event::array_text(plan.park.iter().copied());
        let sql = prepared::statement(
            client,
            PARK,
            &[PgBuiltInOids::TEXTOID.into(), PgBuiltInOids::TEXTOID.into()],
        )?;
        prepared::index_plans(|| client.update(&*sql, None, &[name.into(), events.into()]))
            .map_err(|err| spi_error("parking events", err))?;
    }
    if !plan.unpark.is_empty() {
        let (streams, seqs): (Vec<String>, Vec<i64>) = plan.unpark.iter().cloned().unzip();
        let sql = prepared::statement(
            client,
            UNPARK,
            &[
                PgBuiltInOids::TEXTOID.into(),
                text_array(),
                PgBuiltInOids::INT8ARRAYOID.into(),
            ],
        )?;
        prepared::index_plans(|| client.update(&*sql, None, &[name.into(), streams.into(), seqs.into()]))
            .map_err(|err| spi_error("releasing parked events", err))?;
    }
    if !plan.park.is_empty() || !plan.unpark.is_empty() {
        let sql = prepared::statement(client, RECOUNT_PARKED, &[PgBuiltInOids::TEXTOID.into()])?;
        prepared::index_plans(|| client.update(&*sql, None, &[name.into()]))
            .map_err(|err| spi_error("counting parked events", err))?;
    }
    if !dead.is_empty() {
        let events = Event::array_text(dead.iter().map(|(e, _)| e));
        let errors: Vec<String> = dead.iter().map(|(_, f)| f.summary()).collect();
        let codes: Vec<String> = dead.iter().map(|(_, f)| f.sqlstate.clone()).collect();
        let details: Vec<String> = dead.iter().map(|(_, f)| f.describe()).collect();
        let insert = if crate::installed_schema::keeps_error_details(client)? {
            DEAD_LETTER
        } else {
            DEAD_LETTER_SUMMARY_ONLY
        };
        let sql = prepared::statement(
            client,
            insert,
            &[
                PgBuiltInOids::TEXTOID.into(),
                text_array(),
                text_array(),
                PgBuiltInOids::TEXTOID.into(),
                text_array(),
            ],
        )?;
        prepared::index_plans(|| {
            client.update(
                &*sql,
                None,
                &[
                    name.into(),
                    errors.into(),
                    codes.into(),
                    events.into(),
                    details.into(),
                ],
            )
        })
        .map_err(|err| spi_error("writing dead letters", err))?;
    }
    Ok(())
}

enum Outcome {
    Done {
        rows: Vec<ChangedRow>,
        dead: Vec<(Event, Failure)>,
    },
    Halted {
        failure: Failure,
        event: Option<Box<Event>>,
    },
}

/// Applies a planned batch; `skipped` events (an operator's `resume(skip => true)`) are not
/// applied but set aside with their recorded error, like dead letters.
fn run_plan(
    client: &mut SpiClient<'_>,
    write: &ReadModelWrite<'_>,
    known: &Progress,
    plan: &Plan<'_>,
    skipped: Vec<(Event, Failure)>,
) -> Outcome {
    let fast = subtransaction::run(|| {
        let mut rows = Vec::new();
        apply_events(client, write, &plan.apply, &mut rows)?;
        write_bookkeeping(client, &write.def.name, known, plan, &skipped)?;
        Ok(rows)
    });
    let first_failure = match fast {
        Ok(rows) => return Outcome::Done { rows, dead: skipped },
        Err(failure) => failure,
    };
    match write.def.on_error {
        OnError::Halt => {
            // Find the event that fails, then roll everything back: a halted projection keeps
            // what it had before this batch.
            let mut poison: Option<(Event, Failure)> = None;
            let _ = subtransaction::run(|| {
                for event in &plan.apply {
                    let mut scratch = Vec::new();
                    if let Err(failure) =
                        subtransaction::run(|| apply_events(client, write, &[event], &mut scratch))
                    {
                        poison = Some(((*event).clone(), failure));
                        break;
                    }
                }
                Err::<(), _>(internal("rolling back the search for the failing event"))
            });
            match poison {
                Some((event, failure)) => Outcome::Halted {
                    failure,
                    event: Some(Box::new(event)),
                },
                None => Outcome::Halted {
                    failure: first_failure,
                    event: None,
                },
            }
        }
        OnError::DeadLetter => {
            let careful = subtransaction::run(|| {
                let mut rows = Vec::new();
                let mut dead = skipped.clone();
                for event in &plan.apply {
                    let mut applied = Vec::new();
                    match subtransaction::run(|| apply_events(client, write, &[event], &mut applied)) {
                        Ok(()) => rows.append(&mut applied),
                        Err(failure) => dead.push(((*event).clone(), failure)),
                    }
                }
                write_bookkeeping(client, &write.def.name, known, plan, &dead)?;
                Ok((rows, dead))
            });
            match careful {
                Ok((rows, dead)) => Outcome::Done { rows, dead },
                Err(failure) => Outcome::Halted { failure, event: None },
            }
        }
    }
}

/// Applies one event to `def` in a subtransaction, outside sequencing (dead-letter retries).
pub(crate) fn apply_one(
    client: &mut SpiClient<'_>,
    def: &Definition,
    event: &Event,
    rev: i64,
    changes: &mut Changes,
) -> Result<(), Failure> {
    let write = ReadModelWrite {
        def,
        projection: Rc::from(def.name.as_str()),
        rev,
        with_docs: true,
    };
    let mut rows = Vec::new();
    subtransaction::run(|| apply_events(client, &write, &[event], &mut rows))?;
    changes.extend(rows);
    Ok(())
}

/// Applies `events` (in commit order) to the projections; changed rows go to `changes`.
pub(crate) fn project(
    client: &mut SpiClient<'_>,
    events: &[Event],
    options: &Options<'_>,
    changes: &mut Changes,
) -> Result<BTreeMap<String, Report>, ErrorReport> {
    let states = lock_states(client, options.which)?;
    let mut streams: Vec<String> = events.iter().map(|e| e.stream.clone()).collect();
    streams.sort_unstable();
    streams.dedup();
    let batch = BatchFacts {
        events,
        streams: &streams,
        max_position: events.iter().map(|e| e.position).max(),
        lsn_text: options.commit_lsn.map(lsn::format),
    };
    let mut reports = BTreeMap::new();
    for state in states {
        if state.halted {
            continue;
        }
        if let (Some(lsn), Some(checkpoint)) = (options.commit_lsn, state.checkpoint_lsn) {
            if lsn <= checkpoint {
                // already applied (a redelivery after a restart), or a deposed projector
                continue;
            }
        }
        let report = project_one(client, &state, &batch, options, changes)?;
        reports.insert(state.name, report);
    }
    Ok(reports)
}

/// What every projection of one batch shares.
struct BatchFacts<'a> {
    events: &'a [Event],
    /// the batch's streams, sorted, once each
    streams: &'a [String],
    max_position: Option<i64>,
    lsn_text: Option<String>,
}

/// One projection's part of a batch: sequence it, apply it (halting or dead-lettering on a
/// failure), then record the checkpoint or the halt.
fn project_one(
    client: &mut SpiClient<'_>,
    state: &State,
    batch: &BatchFacts<'_>,
    options: &Options<'_>,
    changes: &mut Changes,
) -> Result<Report, ErrorReport> {
    let def = projection_catalog::load(
        client,
        &state.name,
        Some((state.definition_version, &state.relation_version)),
    )?;
    let progress = read_progress(client, &state.name, batch.streams)?;
    let parked = if state.parked > 0 {
        read_parked(client, &state.name, batch.streams)?
    } else {
        Vec::new()
    };
    let mut plan = sequencing::plan(&progress.last_seq, batch.events, &parked);
    let skipped = take_skipped(&mut plan, options.skip);
    let write = ReadModelWrite {
        def: &def,
        projection: Rc::from(state.name.as_str()),
        rev: state.revision + 1,
        with_docs: options.with_docs,
    };
    let mut report = Report {
        duplicates: plan.duplicates,
        ..Report::default()
    };
    let applicable = plan.apply.len() + skipped.len();
    match run_plan(client, &write, &progress, &plan, skipped) {
        Outcome::Done { rows, dead } => {
            report.applied = (applicable - dead.len()) as u64;
            report.dead_lettered = dead.len() as u64;
            let revision = if rows.is_empty() {
                state.revision
            } else {
                write.rev
            };
            changes.extend(rows);
            save_checkpoint(client, &state.name, batch, revision, &report)?;
            if !plan.progress.is_empty() {
                waiters::wake_at_commit();
            }
        }
        Outcome::Halted { failure, event } => {
            halt(client, &state.name, &failure, event.as_deref())?;
            report.halted = Some((failure, event.map(|e| *e)));
        }
    }
    Ok(report)
}

fn save_checkpoint(
    client: &mut SpiClient<'_>,
    name: &str,
    batch: &BatchFacts<'_>,
    revision: i64,
    report: &Report,
) -> Result<(), ErrorReport> {
    prepared::execute(
        client,
        SAVE_CHECKPOINT,
        &[
            name.into(),
            batch.lsn_text.clone().into(),
            batch.max_position.into(),
            revision.into(),
            (report.applied as i64).into(),
            (report.duplicates as i64).into(),
            (report.dead_lettered as i64).into(),
        ],
        "saving the checkpoint",
    )
}

/// Records that projection `name` halted on `failure` (at `event`, when it is known): the
/// summary where readers and logs see it, the whole error (which may hold the command's values)
/// in `last_error_detail`.
fn halt(
    client: &mut SpiClient<'_>,
    name: &str,
    failure: &Failure,
    event: Option<&Event>,
) -> Result<(), ErrorReport> {
    let update = if crate::installed_schema::keeps_error_details(client)? {
        HALT
    } else {
        HALT_SUMMARY_ONLY
    };
    prepared::execute(
        client,
        update,
        &[
            name.into(),
            failure.summary().into(),
            failure.sqlstate.clone().into(),
            event.map(|e| e.to_json_text()).into(),
            failure.describe().into(),
        ],
        "halting the projection",
    )?;
    pgrx::warning!(
        "projection {} halted{}: {}",
        name,
        event.map(|e| format!(" at {}", locate(e))).unwrap_or_default(),
        failure.summary()
    );
    Ok(())
}

/// "s#3 (position 9)": where an event is, without its contents (for logs and warnings).
pub(crate) fn locate(event: &Event) -> String {
    format!("{}#{} (position {})", event.stream, event.seq, event.position)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use std::collections::BTreeMap;

    use cqrs_projection::sequencing::Plan;
    use pgrx::prelude::*;

    /// Progress is saved where it was read; a row moved since (an operator's update) is found by
    /// key instead, and a stream new to the projection gets its row.
    #[pg_test]
    fn progress_is_saved_where_it_was_read_or_else_by_key() {
        Spi::run(
            "insert into cqrs.projection_stream (projection, stream, last_seq)
             values ('p', 'still', 1), ('p', 'moved', 1), ('q', 'still', 1)",
        )
        .expect("spi");
        let saved = Spi::connect_mut(|client| {
            let streams = ["still", "moved", "new"].map(String::from);
            let known = super::read_progress(client, "p", &streams).expect("read");
            assert_eq!(known.rows.len(), 2);
            // moves the row (a new version elsewhere) after it was read
            client.update(
                "update cqrs.projection_stream set last_seq = 2 where projection = 'p' and stream = 'moved'",
                None,
                &[],
            )?;
            let plan = Plan {
                apply: Vec::new(),
                duplicates: 0,
                park: Vec::new(),
                unpark: Vec::new(),
                progress: BTreeMap::from([
                    ("still".to_owned(), 5),
                    ("moved".to_owned(), 6),
                    ("new".to_owned(), 7),
                ]),
            };
            super::advance_progress(client, "p", &known, &plan).expect("saved");
            client
                .select(
                    "select string_agg(projection || ':' || stream || '=' || last_seq, ' ' order by projection, stream)
                       from cqrs.projection_stream",
                    None,
                    &[],
                )?
                .first()
                .get_one::<String>()
        })
        .expect("spi");
        assert_eq!(saved.as_deref(), Some("p:moved=6 p:new=7 p:still=5 q:still=1"));
    }

    /// A read model is read again after a batch only when owner code may have changed rows
    /// after they were returned: a user trigger that is not disabled, or a rule — not the
    /// internal triggers of a foreign key.
    #[pg_test]
    fn rows_are_read_again_only_for_owner_triggers_and_rules() {
        let may_rewrite = || {
            let relid = Spi::get_one::<pg_sys::Oid>("select 'rm.t'::regclass::oid")
                .expect("spi")
                .expect("the table");
            super::owner_code_may_rewrite(relid)
        };
        Spi::run(
            "create schema rm;
             create table rm.parent (id int primary key);
             create table rm.t (k text primary key, p int references rm.parent);
             create function rm.touch() returns trigger language plpgsql as $$ begin return null; end $$;",
        )
        .expect("spi");
        assert!(!may_rewrite(), "a foreign key's internal triggers counted");
        Spi::run("create trigger touch after update on rm.t for each row execute function rm.touch()")
            .expect("spi");
        assert!(may_rewrite(), "a user trigger not counted");
        Spi::run("alter table rm.t disable trigger touch").expect("spi");
        assert!(!may_rewrite(), "a disabled trigger counted");
        Spi::run("create rule keep as on update to rm.t do also notify rm_t").expect("spi");
        assert!(may_rewrite(), "a rule not counted");
    }
}
