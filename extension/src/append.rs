//! `cqrs.append()`: idempotent, sequenced, validated append of one command.
//!
//! This is the hottest path of the product, so it is a C-language function over one kept SPI
//! plan rather than PL/pgSQL: the happy path is a single statement that bumps the stream's
//! `last_seq` (taking its row lock) and inserts the command with
//! `on conflict do nothing`. Arguments stay raw Datums (the payload is never
//! converted to a Rust value unless its type has a schema to check).
//!
//! Idempotency without a lookup first: when the insert reports a conflict, another transaction
//! already holds this `command_id`; we give back the seq we took (we still hold the stream's row
//! lock, so no one has taken a later one) and compare the stored command with ours.

use std::cell::RefCell;
use std::panic::AssertUnwindSafe;
use std::time::Instant;

use pgrx::datum::DatumWithOid;
use pgrx::pg_sys::panic::{CaughtError, ErrorReport};
use pgrx::pg_sys::PgTryBuilder;
use pgrx::prelude::*;
use pgrx::spi::{OwnedPreparedStatement, SpiClient};

use cqrs_projection::command_time;

use crate::append_stats;
use crate::command_limits::{self, Document};
use crate::command_registry;
use crate::command_trace;
use crate::errors::{column, error, null_argument, spi_error};
use crate::fmgr;
use crate::log_shape;
use crate::payload_schema;
use crate::settings;

/// Longest stream name, in bytes.
pub(crate) const MAX_STREAM_BYTES: usize = 256;
/// Longest command type, in bytes.
pub(crate) const MAX_COMMAND_TYPE_BYTES: usize = 128;

// The stream's bump both statements of the partitioned log begin with (a macro: concat! takes
// literals only).
macro_rules! bump_stream {
    () => {
        "\
with bumped as (
    update cqrs.stream s
       set last_seq = s.last_seq + 1,
           min_id_time = least(s.min_id_time, $6),
           max_id_time = greatest(s.max_id_time, $6)
     where s.stream = $2
    returning s.last_seq
)
"
    };
}

// One statement on the happy path. It returns no row when the stream has no row yet (nothing
// was bumped) or when command_id already exists (the bump happened, the insert did not). $6 is
// cqrs.command_time($1), computed here (cqrs_projection::command_time): in SQL it cost more
// than the partitioning itself (measured). The
// conflict has no target: every unique index of the command's partition arbitrates, and only
// command_id's can conflict (position comes from the identity, seq from the stream's row lock);
// in a log partitioned by an upgrade, the first partition has its own command_id index.
// Through the log's tuple routing: an append takes it only when no partition holds the id's
// time, to be refused as PostgreSQL refuses it (23514, append_within_log), or when that
// partition lacks command_id's index (every unique index arbitrates then, as before); otherwise
// it inserts into the partition (BUMP_AND_INSERT_INTO_PARTITION).
const BUMP_AND_INSERT: &str = concat!(
    bump_stream!(),
    "\
insert into cqrs.command_log (command_id, stream, seq, command_type, payload, metadata, id_time)
select $1, $2, b.last_seq, $3, $4, $5, $6 from bumped b
on conflict do nothing
returning position, seq"
);

// Every lookup by command_id names its partition (id_time), so it reads one partition's index;
// -infinity is the id_time of the rows a log partitioned by the 0.3.0 upgrade already held.
const COMMAND_EXISTS: &str = "\
select exists (select from cqrs.command_log l
                where l.command_id = $1 and l.id_time in (cqrs.command_time($1), '-infinity'))";

const EXISTING: &str = "\
select l.position, l.seq, l.stream, l.command_type, l.payload = $2
  from cqrs.command_log l
 where l.command_id = $1 and l.id_time in (cqrs.command_time($1), '-infinity')";

/// The same three statements for the unpartitioned log of an install not updated to 0.3.0 yet
/// (log_shape.rs).
mod unpartitioned {
    pub(super) const BUMP_AND_INSERT: &str = "\
with bumped as (
    update cqrs.stream s
       set last_seq = s.last_seq + 1
     where s.stream = $2
    returning s.last_seq
)
insert into cqrs.command_log (command_id, stream, seq, command_type, payload, metadata)
select $1, $2, b.last_seq, $3, $4, $5 from bumped b
on conflict on constraint command_log_command_id_key do nothing
returning position, seq";

    pub(super) const COMMAND_EXISTS: &str =
        "select exists (select from cqrs.command_log l where l.command_id = $1)";

    pub(super) const EXISTING: &str = "\
select l.position, l.seq, l.stream, l.command_type, l.payload = $2
  from cqrs.command_log l
 where l.command_id = $1";
}

/// The lookups by command id for the installed log: (COMMAND_EXISTS, EXISTING).
fn lookups() -> (&'static str, &'static str) {
    if log_shape::partitioned() {
        (COMMAND_EXISTS, EXISTING)
    } else {
        (unpartitioned::COMMAND_EXISTS, unpartitioned::EXISTING)
    }
}

const CREATE_STREAM: &str = "\
insert into cqrs.stream (stream, last_seq) values ($1, 0)
on conflict on constraint stream_pkey do nothing";

// Undoes our bump, if there was one. Whether the first statement bumped cannot be told from its
// empty result, and the stream row may have appeared since, so compare with the log: under the
// row lock, last_seq is one ahead of the stream's highest logged seq exactly when we bumped it.
// (Without a bump the UPDATE waits for whoever holds the lock and then finds nothing to undo.)
const GIVE_BACK_SEQ: &str = "\
update cqrs.stream s set last_seq = s.last_seq - 1
 where s.stream = $1
   and s.last_seq > (select coalesce(max(l.seq), 0) from cqrs.command_log l where l.stream = $1)";

// BUMP_AND_INSERT into one partition of the log, named in place of {partition}: the partition
// the command id's time belongs to (log_shape::partition_for), so that the executor does not set
// tuple routing up on every append, and with command_id's index as the only arbiter, where the
// log's insert has every unique index of the partition checked before it inserts (three
// probes, not one: a sixth of an append's time in a profile). Only command_id's can conflict
// (see BUMP_AND_INSERT). The position comes from the log's identity sequence, {sequence}, as an
// insert into the log takes it (OVERRIDING SYSTEM VALUE: on PostgreSQL 17 and later a partition
// shares the log's identity column).
const BUMP_AND_INSERT_INTO_PARTITION: &str = concat!(
    bump_stream!(),
    "\
insert into {partition} (\"position\", command_id, stream, seq, command_type, payload, metadata, id_time)
overriding system value
select pg_catalog.nextval({sequence}::pg_catalog.regclass), $1, $2, b.last_seq, $3, $4, $5, $6 from bumped b
on conflict (command_id) do nothing
returning \"position\", seq"
);

// The names BUMP_AND_INSERT_INTO_PARTITION is made with, quoted for SQL, and whether the
// partition has the unique index on command_id it needs (a partition pg_partman made without
// pg_cqrs's template lacks it until cqrs.maintain() adds it: appends to it go through the log,
// BUMP_AND_INSERT, until then).
const PARTITION_NAMES: &str = "\
select pg_catalog.format('%I.%I', n.nspname, c.relname),
       pg_catalog.quote_literal(pg_catalog.pg_get_serial_sequence('cqrs.command_log', 'position')),
       exists (select from pg_catalog.pg_index i
                 join pg_catalog.pg_attribute a on a.attrelid = i.indrelid and a.attnum = i.indkey[0]
                where i.indrelid = c.oid and i.indisunique and i.indisvalid and i.indimmediate
                  and i.indnkeyatts = 1 and i.indexprs is null and i.indpred is null
                  and a.attname = 'command_id')
  from pg_catalog.pg_class c join pg_catalog.pg_namespace n on n.oid = c.relnamespace
 where c.oid = $1";

/// How many partitions' plans a backend keeps: an append goes to the current partition (UUIDv7
/// ids) or the first one (other ids), and a backend that appended to more starts afresh.
const KEPT_PARTITION_PLANS: usize = 8;

thread_local! {
    /// The kept plan of the happy path, and the log table it was prepared for: prepared again
    /// when an upgrade replaced the table (log_shape.rs).
    static BUMP_PLAN: RefCell<Option<(pg_sys::Oid, OwnedPreparedStatement)>> = const { RefCell::new(None) };
    /// The kept plans of BUMP_AND_INSERT_INTO_PARTITION, by partition.
    static PARTITION_PLANS: RefCell<Vec<(pg_sys::Oid, OwnedPreparedStatement)>> = const { RefCell::new(Vec::new()) };
}

/// A `text` argument: the Datum handed to SPI and its bytes for the checks.
#[derive(Clone, Copy)]
struct Text<'a> {
    datum: pg_sys::Datum,
    bytes: &'a [u8],
}

impl Text<'_> {
    fn lossy(&self) -> String {
        String::from_utf8_lossy(self.bytes).into_owned()
    }
}

/// Arguments of one append, validated.
pub(crate) struct Command<'a> {
    command_id: pg_sys::Datum,
    stream: Text<'a>,
    command_type: Text<'a>,
    payload: pg_sys::Datum,
    expected_seq: Option<i64>,
    metadata: pg_sys::Datum,
}

/// What an append did.
pub(crate) struct Appended {
    pub(crate) position: i64,
    pub(crate) seq: i64,
    pub(crate) duplicate: bool,
}

/// # Safety
/// `datum` must be a non-null `text` Datum valid for `'a` (the rest of the current call).
unsafe fn text_arg<'a>(datum: pg_sys::Datum) -> Text<'a> {
    // SAFETY: per the contract, datum is a text varlena; detoasting returns a palloc'd copy (or
    // the same pointer) that lives in the call's memory context until the call returns.
    unsafe {
        let varlena = pg_sys::pg_detoast_datum_packed(datum.cast_mut_ptr());
        let len = pgrx::varlena::varsize_any_exhdr(varlena);
        let data = pgrx::varlena::vardata_any(varlena) as *const u8;
        Text {
            datum: pg_sys::Datum::from(varlena),
            bytes: std::slice::from_raw_parts(data, len),
        }
    }
}

/// The JSON type of a jsonb Datum's root: "object", "array", "string", …
///
/// # Safety
/// `datum` must be a non-null `jsonb` Datum.
unsafe fn jsonb_kind(datum: pg_sys::Datum) -> (bool, pg_sys::Datum) {
    // SAFETY: per the contract datum is a jsonb varlena; pg_detoast_datum returns it with a
    // 4-byte header, after which comes the root container's header word.
    unsafe {
        let varlena = pg_sys::pg_detoast_datum(datum.cast_mut_ptr());
        let root = (varlena as *const u8).add(pg_sys::VARHDRSZ) as *const u32;
        let header = std::ptr::read_unaligned(root);
        (header & pg_sys::JB_FOBJECT != 0, pg_sys::Datum::from(varlena))
    }
}

fn jsonb_typeof(datum: pg_sys::Datum) -> String {
    // SAFETY: jsonb_typeof takes one non-null jsonb argument, which datum is.
    unsafe { pgrx::direct_function_call::<String>(pg_sys::jsonb_typeof, &[Some(datum)]) }
        .unwrap_or_else(|| "unknown".to_owned())
}

fn check_name<'a>(what: &str, value: Option<Text<'a>>, max_bytes: usize) -> Result<Text<'a>, ErrorReport> {
    let Some(text) = value else {
        return Err(null_argument(what));
    };
    if text.bytes.is_empty() {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{what} must not be empty"),
        ));
    }
    if text.bytes.len() > max_bytes {
        return Err(error(
            PgSqlErrorCode::ERRCODE_STRING_DATA_RIGHT_TRUNCATION,
            format!(
                "{what} is {} bytes long; the limit is {max_bytes} bytes",
                text.bytes.len()
            ),
        ));
    }
    Ok(text)
}

fn check_object(
    what: &str,
    datum: Option<pg_sys::Datum>,
    hint: Option<&str>,
) -> Result<pg_sys::Datum, ErrorReport> {
    let Some(datum) = datum else {
        let report = null_argument(what);
        return Err(match hint {
            Some(hint) => report.set_hint(hint),
            None => report,
        });
    };
    // SAFETY: datum is a non-null jsonb argument of the current call.
    let (is_object, detoasted) = unsafe { jsonb_kind(datum) };
    if !is_object {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("{what} must be a JSON object, not {}", jsonb_typeof(detoasted)),
        ));
    }
    Ok(detoasted)
}

impl Command<'_> {
    /// Reads and checks the six arguments of cqrs.append().
    ///
    /// # Safety
    /// `fcinfo` must be the call info of `cqrs.append(uuid, text, text, jsonb, bigint, jsonb)`,
    /// and the returned command must not outlive the call.
    unsafe fn from_fcinfo(fcinfo: pg_sys::FunctionCallInfo) -> Result<Self, ErrorReport> {
        // SAFETY: the caller guarantees the argument list; each argument is read only when it is
        // not null, and text/jsonb arguments are the types text_arg/check_object expect.
        unsafe {
            let arg = |n: usize| fmgr::arg(fcinfo, n);
            let Some(command_id) = arg(0) else {
                return Err(null_argument("command_id"));
            };
            let stream = check_name("stream", arg(1).map(|d| text_arg(d)), MAX_STREAM_BYTES)?;
            let command_type = check_name(
                "command_type",
                arg(2).map(|d| text_arg(d)),
                MAX_COMMAND_TYPE_BYTES,
            )?;
            let payload = check_object("payload", arg(3), None)?;
            command_limits::check(Document::Payload, payload)?;
            let expected_seq = arg(4).map(|d| d.value() as i64);
            if let Some(expected) = expected_seq {
                if expected < 0 {
                    return Err(error(
                        PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                        format!(
                            "expected_seq must be null, 0 (new stream) or a positive seq, not {expected}"
                        ),
                    ));
                }
            }
            let metadata = check_object("metadata", arg(5), Some("Omit metadata or pass '{}'."))?;
            command_limits::check(Document::Metadata, metadata)?;
            command_trace::check(metadata)?;
            Ok(Self {
                command_id,
                stream,
                command_type,
                payload,
                expected_seq,
                metadata,
            })
        }
    }
}

fn datum_arg(datum: pg_sys::Datum, oid: pg_sys::Oid) -> DatumWithOid<'static> {
    // SAFETY: every Datum passed here is a non-null value of type `oid` that outlives the SPI
    // call it is an argument of.
    unsafe { DatumWithOid::new(datum, oid) }
}

/// `(position, seq)` of the inserted command, or `None` (see BUMP_AND_INSERT). `log` is
/// [`log_shape::current`], read once per call.
fn bump_and_insert(
    client: &mut SpiClient<'_>,
    command: &Command<'_>,
    log: Option<(pg_sys::Oid, bool)>,
) -> Result<Option<(i64, i64)>, ErrorReport> {
    let mut args = vec![
        datum_arg(command.command_id, pg_sys::UUIDOID),
        datum_arg(command.stream.datum, pg_sys::TEXTOID),
        datum_arg(command.command_type.datum, pg_sys::TEXTOID),
        datum_arg(command.payload, pg_sys::JSONBOID),
        datum_arg(command.metadata, pg_sys::JSONBOID),
    ];
    if let Some((table, true)) = log {
        // SAFETY: command_id is a non-null uuid Datum of the current call.
        let id = unsafe { pgrx::Uuid::from_datum(command.command_id, false) }
            .map(|uuid| *uuid.as_bytes())
            .unwrap_or_default();
        let id_time = command_time::timestamptz(id);
        args.push(datum_arg(pg_sys::Datum::from(id_time), pg_sys::TIMESTAMPTZOID));
        // no partition holds that time: the insert into the log refuses it (23514, see
        // append_within_log)
        if let Some(partition) = log_shape::partition_for(table, id_time) {
            if let Some(inserted) = insert_into_partition(client, partition, &args)? {
                return Ok(inserted);
            }
        }
    }
    BUMP_PLAN.with_borrow_mut(|plan| {
        if plan.as_ref().map(|(table, _)| *table) != log.map(|(table, _)| table) {
            let (text, with_id_time) = match log {
                Some((_, false)) => (unpartitioned::BUMP_AND_INSERT, false),
                _ => (BUMP_AND_INSERT, true),
            };
            let prepared = client
                .prepare_mut(text, &arg_types(with_id_time))
                .map_err(|err| spi_error("preparing the append statement", err))?;
            *plan = log.map(|(table, _)| (table, prepared.keep()));
        }
        let Some((_, plan)) = plan.as_ref() else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "append plan missing",
            ));
        };
        inserted(client, plan, &args)
    })
}

/// The types of the append statements' arguments; `$6`, the id time, only in the partitioned log.
fn arg_types(with_id_time: bool) -> Vec<PgOid> {
    let mut types: Vec<PgOid> = vec![
        PgBuiltInOids::UUIDOID.into(),
        PgBuiltInOids::TEXTOID.into(),
        PgBuiltInOids::TEXTOID.into(),
        PgBuiltInOids::JSONBOID.into(),
        PgBuiltInOids::JSONBOID.into(),
    ];
    if with_id_time {
        types.push(PgBuiltInOids::TIMESTAMPTZOID.into());
    }
    types
}

/// BUMP_AND_INSERT_INTO_PARTITION into `partition`, with its kept plan (prepared on its first use
/// in this backend); `None` when the partition lacks command_id's unique index (PARTITION_NAMES).
fn insert_into_partition(
    client: &mut SpiClient<'_>,
    partition: pg_sys::Oid,
    args: &[DatumWithOid<'static>],
) -> Result<Option<Option<(i64, i64)>>, ErrorReport> {
    PARTITION_PLANS.with_borrow_mut(|plans| {
        let kept = match plans.iter().position(|(oid, _)| *oid == partition) {
            Some(kept) => kept,
            None => {
                let rows = client
                    .select(
                        PARTITION_NAMES,
                        Some(1),
                        &[datum_arg(pg_sys::Datum::from(partition), pg_sys::OIDOID)],
                    )
                    .map_err(|err| spi_error("naming the command log's partition", err))?;
                let row = rows.first();
                let table = column(row.get::<String>(1), "partition")?;
                let sequence = column(row.get::<String>(2), "sequence")?;
                let keyed = column(row.get::<bool>(3), "keyed")?;
                let (Some(table), Some(sequence)) = (table, sequence) else {
                    return Err(error(
                        PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                        "the command log's partition or its position sequence has no name",
                    ));
                };
                if keyed != Some(true) {
                    return Ok(None);
                }
                let text = BUMP_AND_INSERT_INTO_PARTITION
                    .replace("{partition}", &table)
                    .replace("{sequence}", &sequence);
                let prepared = client
                    .prepare_mut(&text, &arg_types(true))
                    .map_err(|err| spi_error("preparing the append statement", err))?;
                if plans.len() >= KEPT_PARTITION_PLANS {
                    plans.clear();
                }
                plans.push((partition, prepared.keep()));
                plans.len() - 1
            }
        };
        inserted(client, &plans[kept].1, args).map(Some)
    })
}

/// Runs an append statement; its `(position, seq)`, or `None` when it inserted nothing.
fn inserted(
    client: &mut SpiClient<'_>,
    plan: &OwnedPreparedStatement,
    args: &[DatumWithOid<'static>],
) -> Result<Option<(i64, i64)>, ErrorReport> {
    let rows = client
        .update(plan, None, args)
        .map_err(|err| spi_error("appending the command", err))?;
    if rows.is_empty() {
        return Ok(None);
    }
    match rows.first().get_two::<i64, i64>() {
        Ok((Some(position), Some(seq))) => Ok(Some((position, seq))),
        Ok(_) => Err(error(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "append returned a null position",
        )),
        Err(err) => Err(spi_error("reading the appended position", err)),
    }
}

/// The insert met an existing command_id: gives back the seq this call took (the stream's row
/// lock is still ours, so no later seq was handed out) and answers as a replay or a conflict.
fn give_back_and_replay(client: &mut SpiClient<'_>, command: &Command<'_>) -> Result<Appended, ErrorReport> {
    client
        .update(
            GIVE_BACK_SEQ,
            None,
            &[datum_arg(command.stream.datum, pg_sys::TEXTOID)],
        )
        .map_err(|err| spi_error("releasing the unused seq", err))?;
    replay(client, command)
}

/// Compares the stored command with `command`: a replay answers with the original position and
/// seq, anything else is a conflict on the key (23505).
fn replay(client: &mut SpiClient<'_>, command: &Command<'_>) -> Result<Appended, ErrorReport> {
    let rows = client
        .select(
            lookups().1,
            Some(1),
            &[
                datum_arg(command.command_id, pg_sys::UUIDOID),
                datum_arg(command.payload, pg_sys::JSONBOID),
            ],
        )
        .map_err(|err| spi_error("reading the existing command", err))?;
    let row = rows.first();
    let position = column(row.get::<i64>(1), "position")?;
    let seq = column(row.get::<i64>(2), "seq")?;
    let stream = column(row.get::<String>(3), "stream")?;
    let command_type = column(row.get::<String>(4), "command_type")?;
    let same_payload = row
        .get::<bool>(5)
        .map_err(|err| spi_error("comparing payloads", err))?;
    let (Some(position), Some(seq), Some(stream), Some(command_type)) = (position, seq, stream, command_type)
    else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
            "the conflicting command vanished while being compared",
        ));
    };
    let mut differs = Vec::new();
    if stream.as_bytes() != command.stream.bytes {
        differs.push(format!("stream {:?} (was {stream:?})", command.stream.lossy()));
    }
    if command_type.as_bytes() != command.command_type.bytes {
        differs.push(format!(
            "command_type {:?} (was {command_type:?})",
            command.command_type.lossy()
        ));
    }
    if same_payload != Some(true) {
        differs.push("payload".to_owned());
    }
    if differs.is_empty() {
        return Ok(Appended {
            position,
            seq,
            duplicate: true,
        });
    }
    // SAFETY: command_id is a non-null uuid Datum of the current call.
    let id = unsafe { pgrx::Uuid::from_datum(command.command_id, false) }
        .map(|uuid| uuid.to_string())
        .unwrap_or_default();
    let what: Vec<&str> = differs
        .iter()
        .map(|d| d.split(' ').next().unwrap_or(""))
        .collect();
    Err(error(
        PgSqlErrorCode::ERRCODE_UNIQUE_VIOLATION,
        format!("command_id {id} was already appended with a different {}", what.join(", ")),
    )
    .set_detail(format!(
        "Key (command_id)=({id}) already exists at position {position} (stream {stream:?}, seq {seq}); differs in: {}.",
        differs.join("; ")
    ))
    .set_hint("Reuse a command_id only to retry the very same command; give a new command a new id (cqrs.uuid_v7())."))
}

fn validate(command: &Command<'_>, seq: i64) -> Result<(), ErrorReport> {
    if let Some(expected) = command.expected_seq {
        if expected != seq - 1 {
            return Err(error(
                PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                format!(
                    "stream {} is at seq {}, expected {expected}",
                    command.stream.lossy(),
                    seq - 1
                ),
            )
            .set_hint(
                "Reload the stream and retry, or pass expected_seq => null to append unconditionally.",
            ));
        }
    }
    // borrowed, not copied, whenever the bytes are UTF-8 (always, in a UTF-8 database)
    let command_type = String::from_utf8_lossy(command.command_type.bytes);
    match command_registry::version_of(&command_type)? {
        Some(version) => payload_schema::validate_datum(&command_type, version, command.payload),
        None if settings::REQUIRE_REGISTERED_TYPES.get() => Err(error(
            PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT,
            format!("command type {command_type:?} is not registered"),
        )
        .set_hint(
            "Register it with cqrs.register_command_type(), or turn off cqrs.require_registered_types.",
        )),
        None => Ok(()),
    }
}

fn command_exists(client: &mut SpiClient<'_>, command: &Command<'_>) -> Result<bool, ErrorReport> {
    client
        .select(
            lookups().0,
            Some(1),
            &[datum_arg(command.command_id, pg_sys::UUIDOID)],
        )
        .and_then(|rows| rows.first().get_one::<bool>())
        .map(|exists| exists == Some(true))
        .map_err(|err| spi_error("looking up the command id", err))
}

/// Appends `command` in the current transaction to `log` ([`log_shape::current`]).
fn append(command: &Command<'_>, log: Option<(pg_sys::Oid, bool)>) -> Result<Appended, ErrorReport> {
    Spi::connect_mut(|client| {
        let mut inserted = bump_and_insert(client, command, log)?;
        if inserted.is_none() {
            if command_exists(client, command)? {
                return give_back_and_replay(client, command);
            }
            // First command of this stream: create its row (a concurrent creator is fine) and retry.
            client
                .update(
                    CREATE_STREAM,
                    None,
                    &[datum_arg(command.stream.datum, pg_sys::TEXTOID)],
                )
                .map_err(|err| spi_error("creating the stream", err))?;
            inserted = bump_and_insert(client, command, log)?;
            if inserted.is_none() {
                if !command_exists(client, command)? {
                    // only possible when our snapshot cannot see a stream row created concurrently
                    return Err(error(
                        PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
                        format!(
                            "stream {} was created concurrently; retry the transaction",
                            command.stream.lossy()
                        ),
                    ));
                }
                // a concurrent transaction appended this command_id to this new stream meanwhile
                return give_back_and_replay(client, command);
            }
        }
        let Some((position, seq)) = inserted else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "append produced no row",
            ));
        };
        // Checked after the insert on purpose: a replay of an accepted command must answer
        // `duplicate` even if its expected_seq is stale now or its schema changed since. Raising
        // here rolls back the bump and the insert with the statement.
        validate(command, seq)?;
        Ok(Appended {
            position,
            seq,
            duplicate: false,
        })
    })
}

/// [`append`], with the log's refusal put in words: the insert fails with 23514 ("no partition of
/// relation found for row") when the command id's time (cqrs.command_time) is before the log's
/// oldest partition — older than the idempotency horizon — or after its newest. Catching costs
/// nothing on the happy path, and an error is raised again at once (no subtransaction needed).
///
/// An append that began on an unpartitioned log (0.2.0's) and waited for the upgrade that
/// partitioned it meets the new table with the old statement (no id_time, no such constraint):
/// that is a retryable 40001, not an error in the command.
pub(crate) fn append_within_log(command: &Command<'_>) -> Result<Appended, ErrorReport> {
    let described = log_shape::described();
    if described.as_ref().is_some_and(|log| log.without_partitions) {
        // the first append: the log's partitions, as cqrs.maintain() makes them (this runs as
        // the installer, a SECURITY DEFINER function's owner)
        Spi::run("select from cqrs._make_log_partitions()")
            .map_err(|err| spi_error("making the command log's first partitions", err))?;
    }
    let log = described.map(|log| (log.relation, log.partitioned));
    let try_append = PgTryBuilder::new(std::panic::AssertUnwindSafe(|| append(command, log)));
    if log.is_some_and(|(_, partitioned)| partitioned) {
        return try_append
            .catch_when(PgSqlErrorCode::ERRCODE_CHECK_VIOLATION, |_| {
                Err(outside_log(command))
            })
            .execute();
    }
    let partitioned_meanwhile = |_| {
        Err(error(
            PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE,
            "cqrs.command_log was partitioned (ALTER EXTENSION pg_cqrs UPDATE) while this command was appended; retry the transaction",
        ))
    };
    try_append
        .catch_when(PgSqlErrorCode::ERRCODE_UNDEFINED_OBJECT, partitioned_meanwhile)
        .catch_when(PgSqlErrorCode::ERRCODE_CHECK_VIOLATION, partitioned_meanwhile)
        .catch_when(PgSqlErrorCode::ERRCODE_NOT_NULL_VIOLATION, partitioned_meanwhile)
        .execute()
}

/// Why no partition of the log can hold `command`: the same three messages as the portable
/// edition's (sql/portable/command.sql).
fn outside_log(command: &Command<'_>) -> ErrorReport {
    // SAFETY: command_id is a non-null uuid Datum of the current call.
    let id = unsafe { pgrx::Uuid::from_datum(command.command_id, false) }
        .map(|uuid| *uuid.as_bytes())
        .unwrap_or_default();
    let text = uuid::Uuid::from_bytes(id).to_string();
    // SAFETY: reads the current transaction's start time, which every transaction has.
    let now_us = unsafe { pg_sys::GetCurrentTransactionStartTimestamp() };
    match command_time::unix_millis(id) {
        None => error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("command_id {text} is not a UUIDv7, and retention removed the partition of cqrs.command_log that holds such ids"),
        )
        .set_hint("Only the time in a UUIDv7 tells a retry older than the idempotency horizon from a new command: give commands UUIDv7 ids (cqrs.uuid_v7())."),
        Some(millis) if millis < command_time::unix_millis_of_timestamptz(now_us) => error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("command_id {text} is older than the idempotency horizon: cqrs.command_log no longer keeps commands that old"),
        )
        .set_hint("A retry of a command older than cqrs.idempotency_horizon() is refused rather than appended twice; a new command needs a new id (cqrs.uuid_v7())."),
        Some(_) => error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("command_id {text} is later than the newest partition of cqrs.command_log"),
        )
        .set_hint("cqrs.maintain() (the sidecar runs it) makes partitions ahead (cqrs.retention.premake); check the clock of whoever made this id."),
    }
}

fmgr::v1_function!(pg_finfo_cqrs_append);

/// The C entry point of `cqrs.append()`.
///
/// # Safety
/// Called by the function manager with the call info of
/// `cqrs.append(uuid, text, text, jsonb, bigint, jsonb)`, declared to return a composite.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_append(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    let call = || {
        // SAFETY: fcinfo is the call info of cqrs.append (see the function's contract).
        let appended =
            unsafe { Command::from_fcinfo(fcinfo) }.and_then(|command| append_within_log(&command));
        fmgr::or_raise(appended)
    };
    let appended = if append_stats::counting() {
        // SAFETY: argument 2 of cqrs.append is its command_type text, read when not null.
        let command_type = unsafe { fmgr::arg(fcinfo, 2) }.map(|datum| unsafe { text_arg(datum) });
        let command_type = command_type.map(|text| text.bytes);
        let started = Instant::now();
        let appended = PgTryBuilder::new(AssertUnwindSafe(call))
            .catch_others(|caught| {
                let (CaughtError::PostgresError(report)
                | CaughtError::ErrorReport(report)
                | CaughtError::RustPanic { ereport: report, .. }) = &caught;
                let outcome = append_stats::Outcome::of_error(report.sql_error_code());
                append_stats::record(command_type, outcome, started.elapsed());
                caught.rethrow()
            })
            .execute();
        let outcome = if appended.duplicate {
            append_stats::Outcome::Duplicate
        } else {
            append_stats::Outcome::Accepted
        };
        append_stats::record(command_type, outcome, started.elapsed());
        appended
    } else {
        call()
    };
    // SAFETY: same fcinfo; cqrs.append is declared with three OUT parameters of these types.
    unsafe {
        fmgr::return_record(
            fcinfo,
            "cqrs.append",
            [
                pg_sys::Datum::from(appended.position),
                pg_sys::Datum::from(appended.seq),
                pg_sys::Datum::from(appended.duplicate),
            ],
            [false; 3],
        )
    }
}
