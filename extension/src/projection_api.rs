//! The SQL functions of the projection side: create_projection, project_batch, catch_up,
//! rebuild, resume, retry_dead_letters.
//!
//! The functions that return changed rows are C functions returning a materialised set, so the
//! row documents stay the jsonb Datums the writes returned instead of being converted to Rust
//! values and back.

use std::time::Instant;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::SpiClient;
use pgrx::JsonB;

use crate::errors::{column, error, null_argument, spi_error, unknown_projection};
use crate::events;
use crate::fence;
use crate::fmgr::{self, arg, raise, text_arg};
use crate::owner_rights;
use crate::prepared;
use crate::projection_catalog::{self, NewProjection};
use crate::projector::{self, ChangedRow, Changes, Options, Skip, Which};
use crate::subtransaction;
use crate::subtransaction::Failure;

/// Default number of commands read from the log at a time by catch-up and rebuild.
const DEFAULT_CHUNK: i64 = 10_000;

/// Returns `rows` as the function's result set, or raises the error.
///
/// # Safety
/// As [`return_rows`].
unsafe fn answer_rows(
    fcinfo: pg_sys::FunctionCallInfo,
    rows: Result<Vec<ChangedRow>, ErrorReport>,
) -> pg_sys::Datum {
    match rows {
        // SAFETY: per the contract.
        Ok(rows) => unsafe { return_rows(fcinfo, rows) },
        Err(report) => raise(report),
    }
}

/// Returns `rows` as the function's result set `(projection, key, rev, doc, deleted)`.
///
/// # Safety
/// `fcinfo` must be the call info of a set-returning function declared with those columns.
unsafe fn return_rows(fcinfo: pg_sys::FunctionCallInfo, rows: Vec<ChangedRow>) -> pg_sys::Datum {
    let null = pg_sys::Datum::from(0);
    // SAFETY: per the contract; the Datums are text, text, bigint, json and boolean.
    unsafe {
        fmgr::return_set(fcinfo, rows, |row| {
            (
                [
                    row.projection.as_ref().into_datum().unwrap_or(null),
                    row.key.as_str().into_datum().unwrap_or(null),
                    pg_sys::Datum::from(row.rev),
                    row.doc.unwrap_or(null),
                    pg_sys::Datum::from(row.deleted),
                ],
                [false, false, false, row.doc.is_none(), false],
            )
        })
    }
}

/// The next chunk of the log (at most `chunk` commands and about [`events::CHUNK_BYTES`]):
/// `query` is [`events::behind`] (after projection `from`'s progress, up to position `upto`),
/// [`events::WALK`] (the same, after position `after`) or [`events::LOG_AFTER`] (after position
/// `from`; `upto` unused).
fn read_log(
    client: &mut SpiClient<'_>,
    query: &'static str,
    from_type: PgBuiltInOids,
    from: pgrx::datum::DatumWithOid<'_>,
    chunk: i64,
    upto: Option<i64>,
    after: Option<i64>,
) -> Result<Vec<cqrs_projection::event::Event>, ErrorReport> {
    let mut types = vec![
        from_type.into(),
        PgBuiltInOids::INT8OID.into(),
        PgBuiltInOids::INT8OID.into(),
        PgBuiltInOids::INT8OID.into(),
    ];
    let mut args = vec![from, chunk.into(), events::CHUNK_BYTES.into(), upto.into()];
    if let Some(after) = after {
        types.push(PgBuiltInOids::INT8OID.into());
        args.push(after.into());
    }
    let plan = prepared::statement(client, query, &types)?;
    let rows = prepared::index_plans(|| client.update(&*plan, None, &args))
        .map_err(|e| spi_error("reading the log", e))?;
    events::from_log_rows(rows)
}

/// Where a catch-up of projection `name` walks the log from in position order, or `None` to read
/// it stream by stream: whichever reads less (cqrs._catch_up_from). An install not updated to
/// 0.3.0 has no such function, and reads stream by stream.
fn walk_from(
    client: &mut SpiClient<'_>,
    name: &str,
    chunk: i64,
    reach: Reach,
) -> Result<Option<i64>, ErrorReport> {
    if !crate::log_shape::partitioned() {
        return Ok(None);
    }
    client
        .select(
            "select cqrs._catch_up_from($1, $2, $3::integer)",
            None,
            &[name.into(), reach.upto().into(), chunk.into()],
        )
        .and_then(|rows| rows.first().get_one::<i64>())
        .map_err(|e| spi_error("choosing how to read the log", e))
}

/// How a catch-up ended.
pub(crate) struct CaughtUp {
    pub(crate) events: u64,
    /// The error and where, when the projection halted on the way.
    pub(crate) halted: Option<String>,
}

/// How far a catch-up goes.
#[derive(Clone, Copy)]
pub(crate) enum Reach {
    /// Up to the end of the log as it was when the catch-up started (log position at most
    /// this): under a steady stream of commands it ends, and what commits later is the sidecar's.
    LogEndAtStart(i64),
    /// Until nothing is left, commands committed meanwhile included (create_projection's
    /// backfill, which no lease fences against the sidecar's batches).
    Everything,
}

impl Reach {
    /// The end of the log now.
    pub(crate) fn log_end(client: &mut SpiClient<'_>) -> Result<Self, ErrorReport> {
        let end = client
            .select(
                "select coalesce(max(position), 0) from cqrs.command_log",
                None,
                &[],
            )
            .and_then(|rows| rows.first().get_one::<i64>())
            .map_err(|e| spi_error("reading the end of the log", e))?
            .unwrap_or(0);
        Ok(Self::LogEndAtStart(end))
    }

    fn upto(self) -> Option<i64> {
        match self {
            Self::LogEndAtStart(end) => Some(end),
            Self::Everything => None,
        }
    }
}

/// Applies every command projection `name` has not applied yet (within `reach`), `chunk` at a
/// time.
pub(crate) fn catch_up_one(
    client: &mut SpiClient<'_>,
    name: &str,
    chunk: i64,
    with_docs: bool,
    skip: Option<&Skip>,
    reach: Reach,
    changes: &mut Changes,
) -> Result<CaughtUp, ErrorReport> {
    let mut total = 0u64;
    // Some(after): walking the log in position order after it; None: stream by stream
    let mut walk = walk_from(client, name, chunk, reach)?;
    let mut looked_again = false;
    loop {
        // the walk's query ($5: where it is) or the stream-by-stream one
        let query = if walk.is_some() {
            events::WALK
        } else {
            events::behind()
        };
        let events = read_log(
            client,
            query,
            PgBuiltInOids::TEXTOID,
            name.into(),
            chunk,
            reach.upto(),
            walk,
        )?;
        if events.is_empty() {
            // A walk passes a command that commits after it went by (its position was taken
            // earlier). Up to the log's end at the start, that is the next call's, as stream by
            // stream; a catch-up of everything looks once more.
            if walk.is_some() && !looked_again && matches!(reach, Reach::Everything) {
                looked_again = true;
                walk = walk_from(client, name, chunk, reach)?;
                continue;
            }
            return Ok(CaughtUp {
                events: total,
                halted: None,
            });
        }
        looked_again = false;
        if let (Some(_), Some(last)) = (walk, events.last()) {
            walk = Some(last.position);
        }
        let reports = projector::project(
            client,
            &events,
            &Options {
                commit_lsn: None,
                which: Which::One(name),
                with_docs,
                skip,
            },
            changes,
        )?;
        let Some(report) = reports.get(name) else {
            // halted before we started
            return Ok(CaughtUp {
                events: total,
                halted: Some("the projection is halted".to_owned()),
            });
        };
        if let Some((failure, event)) = &report.halted {
            let at = event
                .as_ref()
                .map(|e| format!(" at {}#{}", e.stream, e.seq))
                .unwrap_or_default();
            return Ok(CaughtUp {
                events: total,
                halted: Some(format!("{}{at}", failure.summary())),
            });
        }
        let progressed = report.applied + report.dead_lettered;
        total += progressed;
        if progressed == 0 {
            // nothing applicable (only parked events): stop rather than loop
            return Ok(CaughtUp {
                events: total,
                halted: None,
            });
        }
    }
}

fn names(client: &mut SpiClient<'_>, only: Option<&str>) -> Result<Vec<String>, ErrorReport> {
    let rows = client
        .select(
            "select s.name from cqrs.projection_state s where ($1::text is null or s.name = $1) and not s.halted order by s.name",
            None,
            &[only.into()],
        )
        .map_err(|e| spi_error("listing projections", e))?;
    let mut names = Vec::new();
    for row in rows {
        if let Some(name) = column(row.get::<String>(1), "a name")? {
            names.push(name);
        }
    }
    Ok(names)
}

fn bump_generation(client: &mut SpiClient<'_>, name: &str) -> Result<(), ErrorReport> {
    for_projection(
        client,
        "update cqrs.projection_state set generation = generation + 1 where name = $1",
        name,
        "bumping the generation",
    )?;
    Ok(())
}

fn chunk_arg(chunk: Option<i64>) -> Result<i64, ErrorReport> {
    match chunk {
        None => Ok(DEFAULT_CHUNK),
        Some(n) if (1..=1_000_000).contains(&n) => Ok(n),
        Some(n) => Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("chunk must be between 1 and 1000000, not {n}"),
        )),
    }
}

// ---- project_batch ----

fmgr::v1_function!(pg_finfo_cqrs_project_batch);

/// `cqrs._project_batch(events jsonb, commit_lsn pg_lsn, fencing_token bigint, projection_group
/// text)`, the work of
/// `cqrs.project_batch`: the fence first ([`fence`], so that its QC001 reaches the caller as is),
/// then the batch.
///
/// Not `#[pg_guard]`: an ERROR from the fence jumps over this frame, which therefore holds only
/// plain values when it checks the fence; the work is done in the guarded function after it.
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_project_batch(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: guarded; it only reads the catalog.
    let fence = if unsafe { fence::installed() } {
        // SAFETY: argument 1 is pg_lsn and argument 2 bigint (64-bit values passed by value),
        // argument 3 text (the fence installed means the function has it); the fence is called
        // with nothing alive in this frame that needs dropping.
        let checked = unsafe {
            let commit_lsn = arg(fcinfo, 1).map(|d| d.value() as u64);
            let fencing_token = arg(fcinfo, 2).map(|d| d.value() as i64);
            fence::check(fencing_token, commit_lsn, arg(fcinfo, 3))
        };
        if checked.is_ok() {
            Fence::Checked
        } else {
            Fence::Unchecked
        }
    } else {
        Fence::Legacy
    };
    // SAFETY: the call info of this function, passed on.
    unsafe { project_batch_work(fcinfo, fence) }
}

/// How the fence of a batch was checked.
#[repr(u8)]
#[derive(Clone, Copy, PartialEq, Eq)]
enum Fence {
    /// by `cqrs._fence`
    Checked,
    /// it could not be asked (SPI failed)
    Unchecked,
    /// the installed SQL is older than `cqrs._fence` (this library serves a database of an
    /// earlier release until it is upgraded): the lease token is checked as that release did
    Legacy,
}

/// The fence of releases before 0.3.0, for a database not upgraded yet.
fn check_lease_legacy(client: &mut SpiClient<'_>, token: i64) -> Result<(), ErrorReport> {
    let current = client
        .update(
            "select coalesce((select l.token from cqrs.projector_lease l for share), 0)",
            None,
            &[],
        )
        .and_then(|rows| rows.first().get_one::<i64>())
        .map_err(|e| spi_error("reading the projector lease", e))?
        .unwrap_or(0);
    if token < current {
        return Err(error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("this projector's lease (token {token}) was taken over by a newer one (token {current})"),
        )
        .set_hint("Another sidecar leads now; this one must stop projecting."));
    }
    Ok(())
}

#[pg_guard]
unsafe extern "C-unwind" fn project_batch_work(
    fcinfo: pg_sys::FunctionCallInfo,
    fence: Fence,
) -> pg_sys::Datum {
    if fence == Fence::Unchecked {
        raise(crate::errors::internal(
            "the fence of the batch (cqrs._fence) could not be checked: SPI failed",
        ));
    }
    // SAFETY: argument 2 is bigint (passed by value).
    let legacy_token = unsafe { arg(fcinfo, 2).map(|d| d.value() as i64) }.filter(|_| fence == Fence::Legacy);
    // SAFETY: argument 0 is jsonb and argument 1 pg_lsn (passed by value); argument 3 is text
    // where the fence is checked (a database of a release before projection groups has no
    // argument 3: every projection is its one group).
    let (events, commit_lsn) = unsafe { (arg(fcinfo, 0), arg(fcinfo, 1).map(|d| d.value() as u64)) };
    let group = match fence {
        // SAFETY: see above; the fence refused a null group
        Fence::Checked => unsafe { text_arg(fcinfo, 3) },
        Fence::Unchecked | Fence::Legacy => None,
    };
    let Some(events) = events else {
        raise(null_argument("events"));
    };
    // SAFETY: a non-null jsonb Datum of this call.
    let events = match unsafe { events::batch(events) } {
        Ok(events) => events,
        Err(report) => raise(report),
    };
    let rows = Spi::connect_mut(|client| {
        if let Some(token) = legacy_token {
            check_lease_legacy(client, token)?;
        }
        let events = events::from_log(client, &events)?;
        let mut changes = Changes::default();
        projector::project(
            client,
            &events,
            &Options {
                commit_lsn,
                which: group.as_deref().map_or(Which::All, Which::Group),
                with_docs: true,
                skip: None,
            },
            &mut changes,
        )?;
        Ok::<_, ErrorReport>(changes.into_rows())
    });
    // SAFETY: fcinfo is the call info of this set-returning function.
    unsafe { answer_rows(fcinfo, rows) }
}

// ---- catch_up ----

fmgr::v1_function!(pg_finfo_cqrs_catch_up);

/// `cqrs.catch_up(name text default null, chunk integer default 10000)`.
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_catch_up(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: argument 0 is text, argument 1 integer.
    let (name, chunk) = unsafe {
        (
            text_arg(fcinfo, 0),
            arg(fcinfo, 1).map(|d| i64::from(d.value() as i32)),
        )
    };
    let rows = chunk_arg(chunk).and_then(|chunk| {
        Spi::connect_mut(|client| {
            let mut changes = Changes::default();
            // a catch-up under a steady stream of commands would chase the log's end (and hold
            // the projection's state row, and a move both groups' leases) for as long as it lasts
            let reach = Reach::log_end(client)?;
            for name in names(client, name.as_deref())? {
                let caught = catch_up_one(client, &name, chunk, true, None, reach, &mut changes)?;
                if let Some(why) = caught.halted {
                    pgrx::warning!("catch-up of {name} stopped: {why}");
                }
            }
            Ok(changes.into_rows())
        })
    });
    // SAFETY: fcinfo is the call info of this set-returning function.
    unsafe { answer_rows(fcinfo, rows) }
}

// ---- resume ----

fmgr::v1_function!(pg_finfo_cqrs_resume);

/// `cqrs.resume(name text, skip boolean default false)`: clears a halt and catches the projection
/// up with the log; with `skip` the event it halted on goes to the dead letters first.
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_resume(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: argument 0 is text; argument 1 (boolean, by value) exists from 0.2.0 on — a 0.1.0
    // declaration that has not been upgraded yet calls this symbol with one argument.
    let (name, skip) = unsafe {
        let skip = if (*fcinfo).nargs > 1 {
            arg(fcinfo, 1).map(|d| d.value() != 0)
        } else {
            Some(false)
        };
        (text_arg(fcinfo, 0), skip)
    };
    let Some(name) = name else {
        raise(null_argument("name"));
    };
    let Some(skip) = skip else {
        raise(null_argument("skip"));
    };
    let rows = Spi::connect_mut(|client| {
        let skip = if skip {
            Some(failed_event(client, &name)?)
        } else {
            None
        };
        clear_halt(client, &name, Counts::Keep)?;
        let mut changes = Changes::default();
        let reach = Reach::log_end(client)?;
        let caught = catch_up_one(
            client,
            &name,
            DEFAULT_CHUNK,
            true,
            skip.as_ref(),
            reach,
            &mut changes,
        )?;
        if let Some(skipped) = &skip {
            pgrx::notice!(
                "projection {name}: skipped {}#{} into cqrs.dead_letter; cqrs.retry_dead_letters('{name}') applies it once the cause is fixed",
                skipped.stream,
                skipped.seq
            );
        }
        if let Some(why) = caught.halted {
            pgrx::warning!("projection {name} halted again: {why}");
        }
        Ok(changes.into_rows())
    });
    // SAFETY: fcinfo is the call info of this set-returning function.
    unsafe { answer_rows(fcinfo, rows) }
}

/// The way out of a halt on an event that cannot be applied as it is (a value that overflows
/// its column, say): the event a halted projection failed on, to be set aside by the catch-up
/// that resumes it — into `cqrs.dead_letter` with its error, so that nothing is lost silently
/// and `cqrs.retry_dead_letters` applies it once the cause is fixed.
fn failed_event(client: &mut SpiClient<'_>, name: &str) -> Result<Skip, ErrorReport> {
    let query = if crate::installed_schema::keeps_error_details(client)? {
        "select s.halted, s.last_error_event::text, s.last_error, s.last_error_sqlstate, s.last_error_detail
           from cqrs.projection_state s where s.name = $1 for update"
    } else {
        "select s.halted, s.last_error_event::text, s.last_error, s.last_error_sqlstate, null::text
           from cqrs.projection_state s where s.name = $1 for update"
    };
    let state = client
        .update(query, Some(1), &[name.into()])
        .map_err(|e| spi_error("locking the projection", e))?;
    if state.is_empty() {
        return Err(unknown_projection(name));
    }
    let row = state.first();
    let halted = column(row.get::<bool>(1), "halted")?.unwrap_or(false);
    let event = column(row.get::<String>(2), "last_error_event")?;
    let summary = column(row.get::<String>(3), "last_error")?.unwrap_or_default();
    let sqlstate = column(row.get::<String>(4), "last_error_sqlstate")?.unwrap_or_else(|| "XX000".to_owned());
    let full = column(row.get::<String>(5), "last_error_detail")?.unwrap_or_else(|| summary.clone());
    if !halted {
        return Err(error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("projection {name:?} is not halted: there is no failed event to skip"),
        ));
    }
    let Some(text) = event else {
        return Err(error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!("projection {name:?} halted without a known failing event: nothing to skip"),
        )
        .set_hint("See cqrs.status() for the error; fix it, then call cqrs.resume(name)."));
    };
    let event = events::stored(0, &text, "the failed event", events::limits())?;
    Ok(Skip {
        stream: event.stream,
        seq: event.seq,
        // recorded as the halt recorded it: its summary, and the whole error
        failure: Failure {
            sqlstate,
            message: full,
            detail: None,
            recorded_summary: Some(summary),
        },
    })
}

// ---- retry_dead_letters ----

fmgr::v1_function!(pg_finfo_cqrs_retry_dead_letters);

/// `cqrs.retry_dead_letters(name text)`: applies the projection's dead letters again (as they
/// are, out of their original order); those that now succeed leave `cqrs.dead_letter`.
///
/// # Safety
/// Called by the function manager with the call info of that function.
#[pg_guard]
#[unsafe(no_mangle)]
pub unsafe extern "C-unwind" fn cqrs_retry_dead_letters(fcinfo: pg_sys::FunctionCallInfo) -> pg_sys::Datum {
    // SAFETY: argument 0 is text.
    let Some(name) = (unsafe { text_arg(fcinfo, 0) }) else {
        raise(null_argument("name"));
    };
    let rows = Spi::connect_mut(|client| {
        let state = client
            .update(
                "select revision from cqrs.projection_state where name = $1 for update",
                Some(1),
                &[name.as_str().into()],
            )
            .map_err(|e| spi_error("locking the projection", e))?;
        if state.is_empty() {
            return Err(unknown_projection(&name));
        }
        let revision = column(state.first().get::<i64>(1), "revision")?.unwrap_or(0) + 1;
        let def = projection_catalog::load(client, &name, None)?;
        let letters = client
            .update(
                "select d.event::text, d.id from cqrs.dead_letter d where d.projection = $1 order by d.id for update",
                None,
                &[name.as_str().into()],
            )
            .map_err(|e| spi_error("reading dead letters", e))?;
        let limits = events::limits();
        let mut pending = Vec::with_capacity(letters.len());
        for (i, row) in letters.enumerate() {
            let text = column(row.get::<&str>(1), "a dead letter")?.unwrap_or_default();
            let id = column(row.get::<i64>(2), "id")?.unwrap_or(0);
            pending.push((id, events::stored(i, text, &format!("dead letter {id}"), limits)?));
        }
        let mut changes = Changes::default();
        for (id, event) in &pending {
            match projector::apply_one(client, &def, event, revision, &mut changes) {
                Ok(()) => {
                    client
                        .update(
                            "delete from cqrs.dead_letter where id = $1",
                            None,
                            &[(*id).into()],
                        )
                        .map_err(|e| spi_error("removing a dead letter", e))?;
                }
                Err(failure) => {
                    let update = if crate::installed_schema::keeps_error_details(client)? {
                        "update cqrs.dead_letter set retries = retries + 1, error = $2, sqlstate = $3, error_detail = $4,
                                failed_at = now() where id = $1"
                    } else {
                        // ($4, the whole error, has no column before 0.3.0)
                        "update cqrs.dead_letter set retries = retries + 1, error = $2, sqlstate = $3,
                                failed_at = now() where id = $1"
                    };
                    client
                        .update(
                            update,
                            None,
                            &[
                                (*id).into(),
                                failure.summary().into(),
                                failure.sqlstate.clone().into(),
                                failure.describe().into(),
                            ],
                        )
                        .map_err(|e| spi_error("updating a dead letter", e))?;
                }
            }
        }
        client
            .update(
                "update cqrs.projection_state set revision = greatest(revision, $2), generation = generation + 1 where name = $1",
                None,
                &[name.as_str().into(), revision.into()],
            )
            .map_err(|e| spi_error("saving the revision", e))?;
        Ok(changes.into_rows())
    });
    // SAFETY: fcinfo is the call info of this set-returning function.
    unsafe { answer_rows(fcinfo, rows) }
}

// ---- create_projection, rebuild ----

/// Refuses (`55000`, from `cqrs._check_log_whole`) what must read the log from its first command
/// once retention removed some; it also takes the log's lock first, so that no removal can
/// commit while the caller reads. A log not partitioned yet (an install not updated to 0.3.0)
/// is always whole.
fn check_log_whole(what: &str, backfill: bool) -> Result<(), ErrorReport> {
    if !crate::log_shape::partitioned() {
        return Ok(());
    }
    Spi::connect_mut(|client| {
        client
            .update(
                "select cqrs._check_log_whole($1, $2)",
                None,
                &[what.into(), backfill.into()],
            )
            .map(|_| ())
            .map_err(|err| spi_error("checking that the log is whole", err))
    })
}

/// Registers a read model: `target` is your table, keyed by a uniquely indexed `key_column`,
/// with a bigint `rev_column`; `handlers` says what each command type does to it. With
/// `backfill` (the default) the commands already in the log are projected at once; without,
/// the projection starts at the log's current end.
#[pg_extern(sql = false)]
fn create_projection(
    name: Option<&str>,
    target: Option<pg_sys::Oid>,
    key_column: Option<&str>,
    handlers: Option<JsonB>,
    on_error: Option<&str>,
    rev_column: Option<&str>,
    backfill: Option<bool>,
) -> Result<(), ErrorReport> {
    let name = name.ok_or_else(|| null_argument("name"))?;
    let target = target.ok_or_else(|| null_argument("target"))?;
    let key_column = key_column.ok_or_else(|| null_argument("key_column"))?;
    let handlers = handlers.ok_or_else(|| null_argument("handlers"))?;
    let on_error = on_error.ok_or_else(|| null_argument("on_error"))?;
    let rev_column = rev_column.ok_or_else(|| null_argument("rev_column"))?;
    let backfill = backfill.ok_or_else(|| null_argument("backfill"))?;
    projection_catalog::register(&NewProjection {
        name,
        target,
        key_column,
        handlers: &handlers.0,
        on_error,
        rev_column,
    })?;
    // (after the registration's checks of who may make the table a read model; its error
    // undoes the registration)
    if backfill {
        check_log_whole(&format!("the backfill of projection {name}"), true)?;
    }
    Spi::connect_mut(|client| {
        if backfill {
            let mut changes = Changes::default();
            let caught = catch_up_one(
                client,
                name,
                DEFAULT_CHUNK,
                false,
                None,
                Reach::Everything,
                &mut changes,
            )?;
            if let Some(why) = caught.halted {
                return Err(error(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!("backfilling projection {name:?} failed: {why}"),
                )
                .set_hint("Nothing was registered. Fix the handlers (or use on_error => 'dead_letter') and try again."));
            }
        } else {
            for_projection(client, "insert into cqrs.projection_stream (projection, stream, last_seq) select $1, s.stream, s.last_seq from cqrs.stream s", name, "starting the projection at the end of the log")?;
            // the checkpoint too, so that cqrs.progress() does not count the log it skipped
            for_projection(client, "update cqrs.projection_state set checkpoint_position = (select max(position) from cqrs.command_log) where name = $1", name, "starting the projection at the end of the log")?;
        }
        Ok(())
    })
}

/// Runs `sql`, whose one parameter is the projection's name; `doing` names the work in errors.
fn for_projection(client: &mut SpiClient<'_>, sql: &str, name: &str, doing: &str) -> Result<(), ErrorReport> {
    client
        .update(sql, None, &[name.into()])
        .map(|_| ())
        .map_err(|e| spi_error(doing, e))
}

/// What [`clear_halt`] does to a projection's counters.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Counts {
    Keep,
    /// a rebuild counts from zero
    Reset,
}

/// Clears a projection's halt and last error (resume, rebuild); on resume it bumps the generation
/// (its read model is about to change outside project_batch; a rebuild bumps it when done).
/// 42704 when there is no such projection.
fn clear_halt(client: &mut SpiClient<'_>, name: &str, counts: Counts) -> Result<(), ErrorReport> {
    let details = if crate::installed_schema::keeps_error_details(client)? {
        ", last_error_detail = null"
    } else {
        ""
    };
    let cleared = client
        .update(
            &format!(
                "update cqrs.projection_state
                set halted = false, last_error = null, last_error_sqlstate = null, last_error_at = null,
                    last_error_event = null{details}, generation = generation + case when $2 then 0 else 1 end,
                    applied = case when $2 then 0 else applied end,
                    duplicates = case when $2 then 0 else duplicates end,
                    dead_lettered = case when $2 then 0 else dead_lettered end
              where name = $1 returning 1"
            ),
            None,
            &[name.into(), (counts == Counts::Reset).into()],
        )
        .map_err(|e| spi_error("clearing the projection's halt", e))?;
    if cleared.is_empty() {
        return Err(unknown_projection(name));
    }
    Ok(())
}

/// Empties the read model and replays the whole log into it, `chunk` commands at a time, in one
/// transaction: readers keep seeing the old rows until it commits. Commands committed while it
/// runs are caught at its end (or by the next batch).
#[pg_extern(sql = false)]
fn rebuild(
    name: &str,
    chunk: default!(i32, 10000),
) -> Result<
    TableIterator<
        'static,
        (
            name!(events, i64),
            name!(seconds, f64),
            name!(events_per_second, f64),
        ),
    >,
    ErrorReport,
> {
    let chunk = chunk_arg(Some(i64::from(chunk)))?;
    let started = Instant::now();
    // a log that retention cut no longer holds the first commands: refused, not half rebuilt
    check_log_whole(&format!("a rebuild of {name}"), false)?;
    let events = Spi::connect_mut(|client| {
        start_over(client, name)?;
        let replayed = replay_log(client, name, chunk, started)?;
        // commands committed while we ran, below our cursor
        let mut changes = Changes::default();
        let caught = catch_up_one(client, name, chunk, false, None, Reach::Everything, &mut changes)?;
        if let Some(why) = caught.halted {
            return Err(error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("rebuild of {name} stopped: {why}"),
            ));
        }
        bump_generation(client, name)?;
        Ok(replayed + caught.events as i64)
    })?;
    let seconds = started.elapsed().as_secs_f64();
    pgrx::notice!("rebuild {name}: done, {events} events in {seconds:.1} s");
    Ok(TableIterator::once((
        events,
        seconds,
        events as f64 / seconds.max(1e-9),
    )))
}

/// Rebuild, phase 1: the projection as if just created — no halt, counters at zero, its read
/// model emptied (as the table's owner, like every write of it: its delete triggers fire), no
/// progress and nothing parked.
fn start_over(client: &mut SpiClient<'_>, name: &str) -> Result<(), ErrorReport> {
    clear_halt(client, name, Counts::Reset)?;
    let def = projection_catalog::load(client, name, None)?;
    subtransaction::run(|| {
        owner_rights::as_owner(def.owner, || {
            client
                .update(&def.target.clear_sql(), None, &[])
                .map(|_| ())
                .map_err(|e| spi_error("emptying the read model", e))
        })
    })
    .map_err(|failure| {
        error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            format!(
                "rebuild of {name} could not empty its read model: {}",
                failure.summary()
            ),
        )
    })?;
    for_projection(
        client,
        "delete from cqrs.projection_stream where projection = $1",
        name,
        "resetting progress",
    )?;
    for_projection(
        client,
        "delete from cqrs.parked where projection = $1",
        name,
        "clearing parked events",
    )?;
    Ok(())
}

/// Rebuild, phase 2: the whole log through the projector, `chunk` commands at a time, with a
/// NOTICE of the progress every second; returns the events replayed. A halt stops the rebuild
/// (its transaction rolls back, leaving the read model as it was).
fn replay_log(
    client: &mut SpiClient<'_>,
    name: &str,
    chunk: i64,
    started: Instant,
) -> Result<i64, ErrorReport> {
    let total = client
        .select("select count(*) from cqrs.command_log", Some(1), &[])
        .and_then(|rows| rows.first().get_one::<i64>())
        .map_err(|e| spi_error("counting the log", e))?
        .unwrap_or(0);
    let mut done = 0i64;
    let mut cursor = 0i64;
    let mut last_notice = Instant::now();
    loop {
        let events = read_log(
            client,
            events::LOG_AFTER,
            PgBuiltInOids::INT8OID,
            cursor.into(),
            chunk,
            None,
            None,
        )?;
        let Some(last) = events.last() else {
            return Ok(done);
        };
        cursor = last.position;
        // the changed rows are not returned (rebuild returns figures), so not kept either
        let mut changes = Changes::default();
        let reports = projector::project(
            client,
            &events,
            &Options {
                commit_lsn: None,
                which: Which::One(name),
                with_docs: false,
                skip: None,
            },
            &mut changes,
        )?;
        if let Some((failure, event)) = reports.get(name).and_then(|r| r.halted.as_ref()) {
            let at = event
                .as_ref()
                .map(|e| format!(" at {}#{} (position {})", e.stream, e.seq, e.position))
                .unwrap_or_default();
            return Err(error(
                PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                format!("rebuild of {name} stopped{at}: {}", failure.summary()),
            )
            .set_hint("The rebuild was rolled back and the read model left as it was. Fix the handlers or the data (or use on_error => 'dead_letter')."));
        }
        done += events.len() as i64;
        if last_notice.elapsed().as_secs_f64() >= 1.0 {
            let seconds = started.elapsed().as_secs_f64();
            pgrx::notice!(
                "rebuild {name}: {done}/{total} events ({:.0}%), {:.0} events/s",
                100.0 * done as f64 / total.max(1) as f64,
                done as f64 / seconds.max(1e-9)
            );
            last_notice = Instant::now();
        }
    }
}
