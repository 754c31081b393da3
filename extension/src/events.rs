//! Command-log rows as the projector reads them — from a batch argument, from the log, from
//! `cqrs.parked` and `cqrs.dead_letter`. JSON text is split by
//! [`cqrs_projection::event::Event::parse`], never decoded as a whole `serde_json::Value`; rows
//! read from the log come as columns and each document is decoded from its jsonb
//! ([`from_log_rows`]). Either way an event whose payload no parser here can read (nested too
//! deep, too large) makes only itself unreadable, a poison event for the projections that handle
//! it, instead of failing every batch that holds it.
//!
//! Memory outside PostgreSQL's accounting stays bounded: each document is decoded only up to
//! [`limits`], and the log is read in chunks bounded in bytes as well as in rows.

use cqrs_projection::command_time;
use cqrs_projection::event::{Event, Limits};
use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::PgMemoryContexts;

use crate::errors::{column, error, spi_error};
use crate::payload_value;
use crate::prepared;
use crate::settings;

/// Bytes of log (as stored) read at a time by catch-up and rebuild, beyond which a chunk ends
/// early (it always holds at least one command).
pub(crate) const CHUNK_BYTES: i64 = 64 * 1024 * 1024;

/// How large a document the projector decodes: a generous multiple of what `cqrs.append`
/// accepts (JSON text can be larger than jsonb; older commands may predate a lowered limit).
pub(crate) fn limits() -> Limits {
    let largest = settings::MAX_PAYLOAD_BYTES
        .get()
        .max(settings::MAX_METADATA_BYTES.get());
    Limits {
        max_document_bytes: usize::try_from(largest).unwrap_or(usize::MAX).saturating_mul(8),
    }
}

/// Where a batch says an event of the log is: all of a batch's element that the projector uses
/// (the log's row at that position, not the batch's copy of it, is what is projected).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Sent {
    pub(crate) position: i64,
    pub(crate) command_id: String,
    pub(crate) stream: String,
    pub(crate) seq: i64,
}

impl From<&Event> for Sent {
    fn from(event: &Event) -> Self {
        Sent {
            position: event.position,
            command_id: event.command_id.clone(),
            stream: event.stream.clone(),
            seq: event.seq,
        }
    }
}

/// The events of a `jsonb` batch argument, as far as the projector reads them.
///
/// A well-formed batch is read from the jsonb's binary form, each element's fields looked up by
/// key ([`sent_from_jsonb`]): printing the whole batch and parsing it again cost about a tenth
/// of `project_batch` (perf, 1,000 events a batch), most of it in payloads nobody reads. Anything
/// that path does not accept goes through the JSON text and [`Event::parse_batch`], whose rules
/// and messages (22023) decide, unchanged.
///
/// # Safety
/// `datum` must be a non-null jsonb Datum of the current call.
pub(crate) unsafe fn batch(datum: pg_sys::Datum) -> Result<Vec<Sent>, ErrorReport> {
    // SAFETY: per the contract; the detoasted copy (or the datum itself) lives until the call ends.
    let datum = unsafe { pg_sys::Datum::from(pg_sys::pg_detoast_datum(datum.cast_mut_ptr())) };
    // SAFETY: a detoasted jsonb of this call.
    match unsafe { sent_from_jsonb(datum) } {
        Some(sent) => Ok(sent),
        // SAFETY: as above.
        None => unsafe { sent_from_text(datum) },
    }
}

/// [`batch`] through the JSON text.
///
/// # Safety
/// `datum` must be a detoasted, non-null jsonb Datum valid for this call.
unsafe fn sent_from_text(datum: pg_sys::Datum) -> Result<Vec<Sent>, ErrorReport> {
    // SAFETY: per the contract; jsonb_out returns a palloc'd C string in the current context, which lives
    // until the call ends (the text is accounted to PostgreSQL, not to us).
    let text = unsafe {
        let Some(cstring) = pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)]) else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                "jsonb_out returned null",
            ));
        };
        std::ffi::CStr::from_ptr(cstring.cast_mut_ptr::<std::ffi::c_char>())
    };
    let text = text.to_str().map_err(|_| {
        error(
            PgSqlErrorCode::ERRCODE_CHARACTER_NOT_IN_REPERTOIRE,
            "events is not valid UTF-8",
        )
    })?;
    Event::parse_batch(text, limits())
        .map(|events| events.iter().map(Sent::from).collect())
        .map_err(|err| error(PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE, err.to_string()))
}

/// The batch's elements when every one is what [`Event::parse`] accepts without a second look:
/// an object with a positive integer `seq`, an integer `position`, non-empty strings
/// `command_id`, `stream`, `command_type` and `created_at`, an object `payload` and an object,
/// null or missing `metadata`. `None` otherwise (not an array, an element that breaks a rule or
/// is written another way, such as an integer as a string): the caller then parses the text.
///
/// # Safety
/// `datum` must be a detoasted, non-null jsonb Datum valid for this call.
unsafe fn sent_from_jsonb(datum: pg_sys::Datum) -> Option<Vec<Sent>> {
    // SAFETY: per the contract; each element and member is looked up in the jsonb itself and
    // read as the type its tag says, strings pointing into the jsonb (copied before it is left).
    unsafe {
        let root = &mut (*datum.cast_mut_ptr::<pg_sys::Jsonb>()).root;
        let header = root.header;
        if header & pg_sys::JB_FARRAY == 0 || header & pg_sys::JB_FSCALAR != 0 {
            return None;
        }
        let count = header & pg_sys::JB_CMASK;
        let mut sent = Vec::with_capacity(count as usize);
        for i in 0..count {
            let element = pg_sys::getIthJsonbValueFromContainer(root, i);
            if element.is_null() || (*element).type_ != pg_sys::jbvType::jbvBinary {
                return None;
            }
            let object = (*element).val.binary.data;
            if (*object).header & pg_sys::JB_FOBJECT == 0 {
                return None;
            }
            let seq = member_integer(object, "seq")?;
            if seq < 1
                || !member_is_object(object, "payload", false)
                || !member_is_object(object, "metadata", true)
            {
                return None;
            }
            member_string(object, "command_type")?;
            member_string(object, "created_at")?;
            sent.push(Sent {
                position: member_integer(object, "position")?,
                command_id: member_string(object, "command_id")?.to_owned(),
                stream: member_string(object, "stream")?.to_owned(),
                seq,
            });
            pg_sys::pfree(element.cast());
        }
        Some(sent)
    }
}

/// A non-empty UTF-8 string member, pointing into the jsonb.
///
/// # Safety
/// As [`payload_value::member`]; the string lives as long as the jsonb (this call).
unsafe fn member_string<'a>(object: *mut pg_sys::JsonbContainer, key: &str) -> Option<&'a str> {
    // SAFETY: per the contract; a jbvString's val/len point into the jsonb.
    unsafe {
        let value = payload_value::member(object, key)?;
        if value.type_ != pg_sys::jbvType::jbvString {
            return None;
        }
        let len = usize::try_from(value.val.string.len)
            .ok()
            .filter(|len| *len > 0)?;
        std::str::from_utf8(std::slice::from_raw_parts(value.val.string.val as *const u8, len)).ok()
    }
}

/// An integer member written as a number (what `numeric_out` prints parses as an i64; a
/// fraction, an exponent or a number past i64 does not).
///
/// # Safety
/// As [`payload_value::member`].
unsafe fn member_integer(object: *mut pg_sys::JsonbContainer, key: &str) -> Option<i64> {
    // SAFETY: per the contract; a jbvNumeric is a Numeric Datum inside the jsonb.
    unsafe {
        let value = payload_value::member(object, key)?;
        if value.type_ != pg_sys::jbvType::jbvNumeric {
            return None;
        }
        let printed = pgrx::direct_function_call_as_datum(
            pg_sys::numeric_out,
            &[Some(pg_sys::Datum::from(value.val.numeric))],
        )?;
        let number = std::ffi::CStr::from_ptr(printed.cast_mut_ptr::<std::ffi::c_char>())
            .to_str()
            .ok()?
            .parse()
            .ok();
        pg_sys::pfree(printed.cast_mut_ptr());
        number
    }
}

/// Whether member `key` is an object (or, where `or_null`, null or missing).
///
/// # Safety
/// As [`payload_value::member`].
unsafe fn member_is_object(object: *mut pg_sys::JsonbContainer, key: &str, or_null: bool) -> bool {
    // SAFETY: per the contract; a jbvBinary's data is a container inside the jsonb.
    unsafe {
        match payload_value::member(object, key) {
            None => or_null,
            Some(value) if value.type_ == pg_sys::jbvType::jbvNull => or_null,
            Some(value) if value.type_ == pg_sys::jbvType::jbvBinary => {
                (*value.val.binary.data).header & pg_sys::JB_FOBJECT != 0
            }
            Some(_) => false,
        }
    }
}

/// An event stored by pg_cqrs (`what` names it in errors), from its JSON text.
pub(crate) fn stored(index: usize, text: &str, what: &str, limits: Limits) -> Result<Event, ErrorReport> {
    Event::parse(index, text, limits).map_err(|err| {
        error(
            PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
            format!("{what} is malformed: {err}"),
        )
    })
}

/// Events from rows whose first column is an event's JSON text (`what` names them in errors).
pub(crate) fn from_rows(rows: pgrx::spi::SpiTupleTable<'_>, what: &str) -> Result<Vec<Event>, ErrorReport> {
    let limits = limits();
    let mut events = Vec::with_capacity(rows.len());
    for (i, row) in rows.enumerate() {
        if let Some(text) = column(row.get::<&str>(1), what)? {
            events.push(stored(i, text, what, limits)?);
        }
    }
    Ok(events)
}

/// The events of rows of the log's columns (position, command_id, stream, seq, command_type,
/// payload, metadata, created_at: what [`chunk_of!`] returns), each document decoded from its
/// jsonb without printing it (payload_value.rs). A row that does not fit that way (a document
/// past the projector's [`limits`], too deep, not UTF-8) is printed as the JSON text of the row and
/// read by [`stored`] like any stored event, so what becomes unreadable, and why, is unchanged.
pub(crate) fn from_log_rows(rows: pgrx::spi::SpiTupleTable<'_>) -> Result<Vec<Event>, ErrorReport> {
    let mut events = Vec::with_capacity(rows.len());
    for event in log_rows(rows)? {
        events.push(event.ok_or_else(|| {
            error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("{LOG_ROW} has a null position"),
            )
        })?);
    }
    Ok(events)
}

/// What a row of the log is called in errors.
const LOG_ROW: &str = "a command-log row";

/// [`from_log_rows`], with `None` for a row whose position is null (a lookup that found none).
fn log_rows(rows: pgrx::spi::SpiTupleTable<'_>) -> Result<Vec<Option<Event>>, ErrorReport> {
    let limits = limits();
    let budget = payload_value::Budget {
        max_text_bytes: limits.max_document_bytes,
        max_depth: payload_value::Budget::UNBOUNDED.max_depth,
    };
    let table = LogRows::of(&rows)?;
    let mut events = Vec::with_capacity(rows.len());
    // detoasted documents and printed times go into a context freed after each row: a rebuild
    // reads millions of rows inside one SPI connection
    let mut scratch = PgMemoryContexts::new("pg_cqrs log rows");
    for index in 0..table.len {
        // SAFETY: index is within the table, which `rows` keeps alive.
        let [position, command_id, stream, seq, command_type, payload, metadata, created_at] =
            unsafe { table.row(index) };
        let Some(position) = position.map(|d| d.value() as i64) else {
            events.push(None);
            continue;
        };
        let (
            Some(command_id),
            Some(stream),
            Some(seq),
            Some(command_type),
            Some(payload),
            Some(metadata),
            Some(created_at),
        ) = (
            command_id,
            stream,
            seq,
            command_type,
            payload,
            metadata,
            created_at,
        )
        else {
            return Err(error(
                PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                format!("{LOG_ROW} at position {position} has a null column"),
            ));
        };
        let seq = seq.value() as i64;
        // SAFETY: non-null uuid, text, jsonb and timestamptz columns of the current row
        // (LogRows::of checked the types), valid while the SPI tuple table is; everything
        // allocated here lives in `scratch`, reset below after the strings and values were copied
        // out.
        let decoded = unsafe {
            scratch.switch_to(|_| {
                let command_id = pgrx::Uuid::from_datum(command_id, false)
                    .map(|id| uuid::Uuid::from_bytes(*id.as_bytes()).to_string())
                    .unwrap_or_default();
                let stream = String::from_datum(stream, false).unwrap_or_default();
                let command_type = String::from_datum(command_type, false).unwrap_or_default();
                let payload = pg_sys::Datum::from(pg_sys::pg_detoast_datum(payload.cast_mut_ptr()));
                let metadata = pg_sys::Datum::from(pg_sys::pg_detoast_datum(metadata.cast_mut_ptr()));
                let created_at = json_time(created_at);
                let documents = match (
                    payload_value::from_jsonb(payload, budget),
                    payload_value::from_jsonb(metadata, budget),
                ) {
                    (
                        Some(payload @ serde_json::Value::Object(_)),
                        Some(metadata @ serde_json::Value::Object(_)),
                    ) => Ok((payload, metadata)),
                    _ => Err(row_text(
                        position,
                        &command_id,
                        &stream,
                        seq,
                        &command_type,
                        payload,
                        metadata,
                        &created_at,
                    )),
                };
                (documents, command_id, stream, command_type, created_at)
            })
        };
        // SAFETY: nothing allocated in scratch is used after this: the values above are Rust's.
        unsafe { scratch.reset() };
        let event = match decoded {
            (Ok((payload, metadata)), command_id, stream, command_type, created_at) => {
                if seq < 1 || stream.is_empty() || command_type.is_empty() {
                    return Err(error(
                        PgSqlErrorCode::ERRCODE_DATA_CORRUPTED,
                        format!("{LOG_ROW} at position {position} is malformed"),
                    ));
                }
                let mut event = Event::default();
                event.position = position;
                event.command_id = command_id;
                event.stream = stream;
                event.seq = seq;
                event.command_type = command_type;
                event.payload = payload;
                event.metadata = metadata;
                event.created_at = created_at;
                event
            }
            (Err(text), ..) => stored(index, &text, LOG_ROW, limits)?,
        };
        events.push(Some(event));
    }
    Ok(events)
}

/// The rows of the SPI result a [`log_rows`] call reads: each deformed once, straight from the
/// tuple table (pgrx's iterator deforms every row for its own use, then once per column read).
struct LogRows {
    table: *mut pg_sys::SPITupleTable,
    len: usize,
}

impl LogRows {
    /// The column types every read of the log returns, in order.
    const TYPES: [pg_sys::Oid; 8] = [
        pg_sys::INT8OID,
        pg_sys::UUIDOID,
        pg_sys::TEXTOID,
        pg_sys::INT8OID,
        pg_sys::TEXTOID,
        pg_sys::JSONBOID,
        pg_sys::JSONBOID,
        pg_sys::TIMESTAMPTZOID,
    ];

    /// The table behind `rows`, the result of the SPI statement just run, checked to have the
    /// log's columns.
    fn of(rows: &pgrx::spi::SpiTupleTable<'_>) -> Result<Self, ErrorReport> {
        // SAFETY: SPI_tuptable and SPI_processed describe the last SPI statement's result, which
        // `rows` is (no SPI call ran since); SPI_gettypeid reads attributes 1..=natts of its
        // tuple descriptor.
        unsafe {
            let table = pg_sys::SPI_tuptable;
            if table.is_null() || pg_sys::SPI_processed as usize != rows.len() {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "the log's rows are not the last SPI result",
                ));
            }
            let tupdesc = (*table).tupdesc;
            let natts = (*tupdesc).natts;
            let types: Vec<pg_sys::Oid> = (1..=natts).map(|n| pg_sys::SPI_gettypeid(tupdesc, n)).collect();
            if types != Self::TYPES {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INTERNAL_ERROR,
                    "a read of the log returned other columns than the log's",
                ));
            }
            Ok(Self {
                table,
                len: rows.len(),
            })
        }
    }

    /// Row `index`'s columns, `None` where null.
    ///
    /// # Safety
    /// `index < self.len`, and the table is still the live SPI result.
    unsafe fn row(&self, index: usize) -> [Option<pg_sys::Datum>; 8] {
        let mut values = [pg_sys::Datum::from(0usize); 8];
        let mut nulls = [true; 8];
        // SAFETY: per the contract; heap_deform_tuple fills natts (8) values and nulls.
        unsafe {
            let tuple = *(*self.table).vals.add(index);
            pg_sys::heap_deform_tuple(
                tuple,
                (*self.table).tupdesc,
                values.as_mut_ptr(),
                nulls.as_mut_ptr(),
            );
        }
        std::array::from_fn(|i| (!nulls[i]).then_some(values[i]))
    }
}

/// A timestamptz as `json_build_object` writes it (ISO 8601, the session's time zone).
///
/// # Safety
/// `datum` must be a non-null timestamptz Datum.
unsafe fn json_time(datum: pg_sys::Datum) -> String {
    // SAFETY: JsonEncodeDateTime with no buffer pallocs its answer, a C string, in the current
    // memory context; a timestamptz needs no time zone offset argument.
    unsafe {
        let text = pg_sys::JsonEncodeDateTime(
            std::ptr::null_mut(),
            datum,
            pg_sys::TIMESTAMPTZOID,
            std::ptr::null(),
        );
        std::ffi::CStr::from_ptr(text).to_string_lossy().into_owned()
    }
}

/// The JSON text of a log row, as `json_build_object` of its columns makes it, for [`stored`] to
/// read.
///
/// # Safety
/// `payload` and `metadata` must be detoasted, non-null jsonb Datums.
#[allow(clippy::too_many_arguments)]
unsafe fn row_text(
    position: i64,
    command_id: &str,
    stream: &str,
    seq: i64,
    command_type: &str,
    payload: pg_sys::Datum,
    metadata: pg_sys::Datum,
    created_at: &str,
) -> String {
    // SAFETY: jsonb_out of a non-null jsonb returns a palloc'd C string.
    let print = |datum: pg_sys::Datum| unsafe {
        pgrx::direct_function_call_as_datum(pg_sys::jsonb_out, &[Some(datum)])
            .map(|text| {
                std::ffi::CStr::from_ptr(text.cast_mut_ptr::<std::ffi::c_char>())
                    .to_string_lossy()
                    .into_owned()
            })
            .unwrap_or_else(|| "null".to_owned())
    };
    let quoted = |text: &str| serde_json::Value::from(text).to_string();
    format!(
        "{{\"position\" : {position}, \"command_id\" : {}, \"stream\" : {}, \"seq\" : {seq}, \"command_type\" : {}, \"payload\" : {}, \"metadata\" : {}, \"created_at\" : {}}}",
        quoted(command_id),
        quoted(stream),
        quoted(command_type),
        print(payload),
        print(metadata),
        quoted(created_at),
    )
}

/// The events of a batch as the log holds them: each event is looked up by its position and must
/// be that row — same command id, stream and seq — or the batch is refused (22023), so a caller
/// cannot make a projection apply a command that was never appended, nor skip the real one as a
/// duplicate later. What is projected is the log's row, whatever else the batch says.
pub(crate) fn from_log(
    client: &mut pgrx::spi::SpiClient<'_>,
    batch: &[Sent],
) -> Result<Vec<Event>, ErrorReport> {
    if batch.is_empty() {
        return Ok(Vec::new());
    }
    let positions: Vec<i64> = batch.iter().map(|e| e.position).collect();
    // the partition of each row (an id that is no UUID finds none, and the batch is refused below)
    let ids: Vec<pgrx::Uuid> = batch
        .iter()
        .map(|e| {
            pgrx::Uuid::from_bytes(
                *uuid::Uuid::parse_str(&e.command_id)
                    .unwrap_or_default()
                    .as_bytes(),
            )
        })
        .collect();
    let mut logged = at_positions(client, &positions, &ids)?;
    // A commit reaches the WAL, and so the slot, a moment before other sessions' snapshots see
    // it (PostgreSQL flushes the commit record first, then marks the transaction finished): a
    // batch streamed at once may name rows this snapshot does not see yet. Look again, each
    // query with a new snapshot, for about a second before calling the batch forged.
    let mut pause_us: i64 = 1_000;
    while pause_us < 500_000 && logged.iter().any(Option::is_none) {
        // SAFETY: pg_usleep only sleeps; interrupts are checked right after.
        unsafe { pg_sys::pg_usleep(pause_us as std::ffi::c_long) };
        pgrx::check_for_interrupts!();
        pause_us *= 2;
        logged = at_positions(client, &positions, &ids)?;
    }
    let mut events = Vec::with_capacity(batch.len());
    for (i, (logged, sent)) in logged.into_iter().zip(batch).enumerate() {
        match logged {
            Some(event)
                if event.command_id.eq_ignore_ascii_case(&sent.command_id)
                    && event.stream == sent.stream
                    && event.seq == sent.seq =>
            {
                events.push(event)
            }
            _ => {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
                    format!(
                        "events[{i}] is not in cqrs.command_log: no command {} of stream {:?} seq {} at position {}",
                        sent.command_id, sent.stream, sent.seq, sent.position
                    ),
                )
                .set_hint("A batch carries rows of cqrs.command_log as they are (the sidecar sends them from the slot)."))
            }
        }
    }
    Ok(events)
}

/// The log's rows at `positions` with command ids `ids`, in that order; `None` where this
/// snapshot sees none.
fn at_positions(
    client: &mut pgrx::spi::SpiClient<'_>,
    positions: &[i64],
    ids: &[pgrx::Uuid],
) -> Result<Vec<Option<Event>>, ErrorReport> {
    // an install not updated to 0.3.0 has no id_time to name the partition with (log_shape.rs)
    if !crate::log_shape::partitioned() {
        let plan = prepared::statement(
            client,
            AT_POSITIONS_UNPARTITIONED,
            &[
                PgBuiltInOids::INT8ARRAYOID.into(),
                PgBuiltInOids::UUIDARRAYOID.into(),
            ],
        )?;
        let rows = prepared::index_plans(|| {
            client.update(&*plan, None, &[positions.to_vec().into(), ids.to_vec().into()])
        })
        .map_err(|e| spi_error("reading the batch's commands from the log", e))?;
        return log_rows(rows);
    }
    // each id's time computed here, as append does: cqrs.command_time in SQL cost more than
    // the lookup itself (1.99 s against 0.91 s for 120,000 ids, measured)
    let times: Vec<pgrx::datum::TimestampWithTimeZone> = ids
        .iter()
        .map(|id| {
            pgrx::datum::TimestampWithTimeZone::try_from(command_time::timestamptz(*id.as_bytes()))
                .unwrap_or_else(|_| pgrx::datum::TimestampWithTimeZone::negative_infinity())
        })
        .collect();
    // the batch's range of id times, for AT_POSITIONS's partition pruning (-infinity when no id
    // has a time)
    let finite = times.iter().filter(|t| !t.is_neg_infinity());
    let earliest = finite.clone().min().copied();
    let latest = finite.max().copied();
    let none = pgrx::datum::TimestampWithTimeZone::negative_infinity();
    let plan = prepared::statement(
        client,
        AT_POSITIONS,
        &[
            PgBuiltInOids::INT8ARRAYOID.into(),
            PgBuiltInOids::UUIDARRAYOID.into(),
            PgBuiltInOids::TIMESTAMPTZARRAYOID.into(),
            PgBuiltInOids::TIMESTAMPTZOID.into(),
            PgBuiltInOids::TIMESTAMPTZOID.into(),
        ],
    )?;
    let rows = prepared::index_plans(|| {
        client.update(
            &*plan,
            None,
            &[
                positions.to_vec().into(),
                ids.to_vec().into(),
                times.into(),
                earliest.unwrap_or(none).into(),
                latest.unwrap_or(none).into(),
            ],
        )
    })
    .map_err(|e| spi_error("reading the batch's commands from the log", e))?;
    log_rows(rows)
}

/// The command-log rows at positions `$1` with command ids `$2`, in that order; null where there
/// is none. The id's time (`$3`, cqrs.command_time of each) names the row's partition, so each
/// lookup reads one partition (and the first, where the 0.3.0 upgrade's rows are). The batch's
/// range of id times (`$4`, `$5`) prunes the other partitions once, when the statement starts:
/// PostgreSQL re-arms every partition left in the plan for each lookup, and a year of daily
/// partitions made project_batch 0.51x of 0.2.0's log (measured; one lookup in 365 partitions
/// took twice as long without the range).
const AT_POSITIONS: &str = "\
select l.position, l.command_id, l.stream, l.seq, l.command_type, l.payload, l.metadata, l.created_at
  from unnest($1::bigint[], $2::uuid[], $3::timestamptz[]) with ordinality as u(position, command_id, id_time, n)
  left join lateral (
        select l.* from cqrs.command_log l
         where l.position = u.position and l.id_time in (u.id_time, '-infinity')
           and (l.id_time = '-infinity' or l.id_time between $4 and $5) and l.command_id = u.command_id) l on true
 order by u.n";

/// [`AT_POSITIONS`] in a log that is not partitioned (`$2` is not used).
const AT_POSITIONS_UNPARTITIONED: &str = "\
select l.position, l.command_id, l.stream, l.seq, l.command_type, l.payload, l.metadata, l.created_at
  from unnest($1::bigint[], $2::uuid[]) with ordinality as u(position, command_id, n)
  left join lateral (
        select l.* from cqrs.command_log l where l.position = u.position and l.command_id = u.command_id) l on true
 order by u.n";

/// The rows `$rows` (a query of command-log rows, in log order, at most `$2`), cut at about `$3`
/// bytes (at least one): the chunk every read of the log returns, as the columns
/// [`from_log_rows`] reads. Ordered by position, the window's own order, which the planner knows
/// it has (ordered by the row number, it sorted every chunk again: 40 % of reading one).
macro_rules! chunk_of {
    ($($rows:expr),+ $(,)?) => {
        concat!(
            "select c.position, c.command_id, c.stream, c.seq, c.command_type, c.payload, c.metadata, c.created_at from (
    select l.position, l.command_id, l.stream, l.seq, l.command_type, l.payload, l.metadata, l.created_at,
           pg_catalog.row_number() over w as n,
           pg_catalog.sum(pg_catalog.pg_column_size(l.payload) + pg_catalog.pg_column_size(l.metadata)) over w as bytes
      from (",
            $($rows),+,
            ") l
    window w as (order by l.position rows unbounded preceding)) c
 where c.n = 1 or c.bytes <= $3
 order by c.position"
        )
    };
}

/// Commands after `$1` in log order, at most `$2` of them and about `$3` bytes (at least one).
pub(crate) const LOG_AFTER: &str =
    chunk_of!("select * from cqrs.command_log l where l.position > $1 order by l.position limit $2");

/// Commands projection `$1` has not applied, in log order, at most `$2` of them and about `$3`
/// bytes: per stream, those after its progress, up to position `$4` (all when null). Exact
/// whatever the order commands committed in. `$in_range` narrows each stream's lookup to the
/// log partitions its commands can be in (cqrs.stream's id-time range).
macro_rules! behind {
    ($in_range:literal) => {
        chunk_of!(
            "select l.*
              from cqrs.stream s
              left join cqrs.projection_stream ps on ps.projection = $1 and ps.stream = s.stream
              cross join lateral (
                    select * from cqrs.command_log l
                     where l.stream = s.stream and l.seq > coalesce(ps.last_seq, 0)",
            $in_range,
            "
                       and ($4::int8 is null or l.position <= $4::int8)
                     order by l.seq
                     limit $2) l
             where s.last_seq > coalesce(ps.last_seq, 0)
             order by l.position
             limit $2"
        )
    };
}

/// Commands projection `$1` has not applied after position `$5`, in log order, at most `$2` of
/// them and about `$3` bytes, up to position `$4` (all when null): a catch-up's walk of the log
/// (cqrs._catch_up_from says when it reads less than [`behind`]). Each stream's commands come in
/// seq order (a stream's positions grow with its seq), those it has applied are passed over —
/// its progress looked up per command (a join would read all of the projection's progress per
/// chunk, and once per command when the plan was made with little of it: measured).
pub(crate) const WALK: &str = chunk_of!(
    "select l.*
              from cqrs.command_log l
             where l.position > $5 and ($4::int8 is null or l.position <= $4::int8)
               and l.seq > coalesce((select ps.last_seq from cqrs.projection_stream ps
                                      where ps.projection = $1 and ps.stream = l.stream), 0)
             order by l.position
             limit $2"
);

/// [`behind!`] in the partitioned log.
const BEHIND: &str = behind!(
    "
                       and l.id_time between s.min_id_time and s.max_id_time"
);

/// [`behind!`] in the unpartitioned log of an install not updated to 0.3.0 (log_shape.rs).
const BEHIND_UNPARTITIONED: &str = behind!("");

/// The query of what a projection has not applied, for the installed log.
pub(crate) fn behind() -> &'static str {
    if crate::log_shape::partitioned() {
        BEHIND
    } else {
        BEHIND_UNPARTITIONED
    }
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    /// A batch read from its jsonb gives what its JSON text gives: the same elements, or the
    /// same refusal (the binary path leaves whatever it does not accept to the text's rules).
    #[pg_test]
    fn a_batch_read_from_its_jsonb_is_what_its_text_gives() {
        let ok = r#"{"position": 7, "command_id": "0190a5d2-0000-7000-8000-000000000001", "stream": "s", "seq": 2, "command_type": "T", "payload": {"a": [1]}, "metadata": {}, "created_at": "2026-12-06 10:00:00+00"}"#;
        let with = |key: &str, value: &str| {
            let mut element: serde_json::Value = serde_json::from_str(ok).expect("json");
            match value {
                "<absent>" => element.as_object_mut().expect("object").remove(key),
                _ => element
                    .as_object_mut()
                    .expect("object")
                    .insert(key.into(), serde_json::from_str(value).expect("json")),
            };
            format!("[{element}]")
        };
        let mut batches = vec![
            "[]".to_owned(),
            format!("[{ok}, {ok}]"),
            "{}".to_owned(),
            "\"text\"".to_owned(),
            "[1]".to_owned(),
            "[[]]".to_owned(),
        ];
        for (key, values) in [
            (
                "seq",
                &[
                    "\"3\"",
                    "0",
                    "-1",
                    "2.5",
                    "1e3",
                    "99999999999999999999",
                    "null",
                    "<absent>",
                    "[2]",
                ][..],
            ),
            ("position", &["\"12\"", "1.0", "-4", "null", "{}"][..]),
            ("command_id", &["\"\"", "5", "null", "<absent>"][..]),
            ("stream", &["\"\"", "\"é ☃\"", "true"][..]),
            ("command_type", &["\"\"", "<absent>"][..]),
            ("created_at", &["1", "<absent>"][..]),
            ("payload", &["null", "[]", "\"x\"", "<absent>", "{}"][..]),
            ("metadata", &["null", "<absent>", "[]", "3", "{\"k\": {}}"][..]),
        ] {
            for value in values {
                batches.push(with(key, value));
            }
        }
        for batch in batches {
            let jsonb =
                Spi::get_one::<pgrx::JsonB>(&format!("select '{}'::jsonb", batch.replace('\'', "''")))
                    .expect("spi")
                    .expect("a batch");
            let datum = jsonb.into_datum().expect("a datum");
            // SAFETY: a jsonb made just now in this context.
            let (read, binary, text) = unsafe {
                let detoasted = pg_sys::Datum::from(pg_sys::pg_detoast_datum(datum.cast_mut_ptr()));
                (
                    super::batch(datum),
                    super::sent_from_jsonb(detoasted),
                    super::sent_from_text(detoasted),
                )
            };
            // the well-formed ones are read from the binary form, not left to the text
            if batch == format!("[{ok}, {ok}]") || batch == with("metadata", "null") {
                assert_eq!(
                    binary.map(|sent| sent.len()),
                    Some(batch.matches("seq").count()),
                    "{batch}"
                );
            }
            match (read, text) {
                (Ok(read), Ok(text)) => assert_eq!(read, text, "{batch}"),
                (Err(read), Err(text)) => assert_eq!(read.message(), text.message(), "{batch}"),
                (read, text) => panic!("{batch}: {read:?} against {text:?}"),
            }
        }
    }

    /// One command-log row `l` as the JSON text of an event.
    macro_rules! log_row_json {
        () => {
            "pg_catalog.json_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
             'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload, 'metadata', l.metadata,
             'created_at', l.created_at)::text"
        };
    }

    /// The log's rows after position 0 as the JSON text every read of the log returned before
    /// rows came as columns.
    const AS_TEXT: &str = concat!(
        "select ",
        log_row_json!(),
        " from cqrs.command_log l where l.position > $1 order by l.position"
    );

    #[pg_test]
    fn rows_read_as_columns_are_the_events_their_json_text_gives() {
        Spi::run(
            "set timezone = 'America/New_York';
             set cqrs.max_payload_bytes = 1024;
             set cqrs.max_metadata_bytes = 1024;
             select cqrs.append(cqrs.uuid_v7(), 'ev-1', 'T', '{\"a\": 1, \"n\": [0, -0, 1.50, 1e21, 12345678901234567890, 0.1], \"s\": \"é ☃ 😀 \\u0001 \\\"q\\\"\"}');
             select cqrs.append(cqrs.uuid_v7(), 'ev-1', 'T', '{}', metadata => '{\"trace\": {\"id\": \"x\"}}');
             select cqrs.append(gen_random_uuid(), 'ev-2', 'U', '{\"z\": null, \"a\": [[], {}], \"aa\": true}');
             -- past what append accepts, as a superuser's insert (or an older release) can leave:
             -- nested past serde's 128 levels, and larger than the projector reads (8 x 1,024)
             insert into cqrs.command_log (command_id, stream, seq, command_type, payload, id_time)
             select id, 'ev-3', n, 'V', doc::jsonb, cqrs.command_time(id)
               from (select n, doc, cqrs.uuid_v7() as id
                       from (values (1, '{\"d\": ' || repeat('[', 150) || '1' || repeat(']', 150) || '}'),
                                    (2, '{\"big\": \"' || repeat('x', 9000) || '\"}')) d(n, doc)) i;",
        )
        .expect("spi");
        let (columns, text) = Spi::connect_mut(|client| {
            let rows = client
                .update(
                    super::LOG_AFTER,
                    None,
                    &[0i64.into(), 100i64.into(), super::CHUNK_BYTES.into()],
                )
                .expect("the log as columns");
            let columns = super::from_log_rows(rows).expect("events from columns");
            let rows = client
                .select(AS_TEXT, None, &[0i64.into()])
                .expect("the log as text");
            let text = super::from_rows(rows, "a command-log row").expect("events from text");
            // project_batch's lookup of a batch's events by position reads the same columns
            let sent: Vec<super::Sent> = text.iter().map(super::Sent::from).collect();
            let looked_up = super::from_log(client, &sent).expect("the batch's rows");
            assert_eq!(looked_up, text);
            (columns, text)
        });
        assert_eq!(columns.len(), 5);
        assert_eq!(columns, text);
        assert!(
            columns[0].created_at.ends_with("-05:00"),
            "{}",
            columns[0].created_at
        );
        assert_eq!(
            columns.iter().map(|e| e.unreadable.is_some()).collect::<Vec<_>>(),
            [false, false, false, true, true]
        );
    }
}
