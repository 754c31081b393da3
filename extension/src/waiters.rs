//! `cqrs.wait_for()`: read-your-writes on top of eventually consistent projections.
//!
//! A waiter sleeps on its process latch, not in a polling loop. To be found, it holds a shared
//! transaction-level advisory lock in a class of its own; a transaction that moved a projection
//! forward looks those locks up right after it commits and sets the waiters' latches. A waiter
//! takes the lock *before* it first checks, so a commit either happens before that check (the
//! check sees it) or after the lock is visible (the committer wakes it): no lost wake-ups. A
//! one-second re-check remains as a backstop (e.g. for two-phase commits, finished elsewhere).

use std::cell::Cell;
use std::time::{Duration, Instant};

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;

use crate::errors::{column, error, spi_error, unknown_projection};
use crate::prepared;

/// The advisory lock class ("CQRS") that marks waiting backends.
const WAIT_LOCK_CLASS: i32 = 0x4351_5253;

/// Longest single sleep between checks when no wake-up arrives.
const RECHECK_AFTER: Duration = Duration::from_secs(1);

thread_local! {
    static WAKE_PENDING: Cell<bool> = const { Cell::new(false) };
}

/// Marks the current transaction as one that moves a projection: waiters are woken at commit.
pub(crate) fn wake_at_commit() {
    WAKE_PENDING.set(true);
}

/// Registers the commit hook; called once from `_PG_init`.
pub(crate) fn register_commit_hook() {
    // SAFETY: called once per backend from _PG_init; the callback is a plain function.
    unsafe { pg_sys::RegisterXactCallback(Some(on_transaction_end), std::ptr::null_mut()) };
}

#[pg_guard]
unsafe extern "C-unwind" fn on_transaction_end(event: pg_sys::XactEvent::Type, _arg: *mut std::ffi::c_void) {
    match event {
        // SAFETY: runs after commit in a regular backend; wake_waiters only reads the lock
        // table and sets latches.
        pg_sys::XactEvent::XACT_EVENT_COMMIT if WAKE_PENDING.replace(false) => unsafe { wake_waiters() },
        pg_sys::XactEvent::XACT_EVENT_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PARALLEL_ABORT
        | pg_sys::XactEvent::XACT_EVENT_PREPARE => WAKE_PENDING.set(false),
        _ => {}
    }
}

/// Sets the latch of every backend of this database holding a wait lock.
///
/// # Safety
/// Must run in a backend attached to shared memory (any regular backend).
unsafe fn wake_waiters() {
    // SAFETY: GetLockStatusData returns a palloc'd snapshot of the lock table with nelements
    // entries; BackendPidGetProc returns null for pids that are gone.
    unsafe {
        let data = pg_sys::GetLockStatusData();
        if data.is_null() {
            return;
        }
        let locks = std::slice::from_raw_parts((*data).locks, (*data).nelements as usize);
        for lock in locks {
            let tag = &lock.locktag;
            let is_wait_lock = u32::from(tag.locktag_type) == pg_sys::LockTagType::LOCKTAG_ADVISORY
                && tag.locktag_field1 == pg_sys::MyDatabaseId.to_u32()
                && tag.locktag_field2 == WAIT_LOCK_CLASS as u32
                && tag.locktag_field4 == 2;
            if is_wait_lock && lock.pid != pg_sys::MyProcPid {
                let proc_ = pg_sys::BackendPidGetProc(lock.pid);
                if !proc_.is_null() {
                    pg_sys::SetLatch(&mut (*proc_).procLatch);
                }
            }
        }
    }
}

// try, never wait: any session may take advisory locks, and one holding this key exclusively
// must not make waiters hang (they fall back to polling, below)
const REGISTER_WAITER: &str =
    "select pg_catalog.pg_try_advisory_xact_lock_shared($1::int4, pg_catalog.hashtext($2))";

const APPLIED: &str = "\
select coalesce((select ps.last_seq >= $3 from cqrs.projection_stream ps
                  where ps.projection = $1 and ps.stream = $2), false),
       s.halted, s.last_error
  from cqrs.projection_state s
 where s.name = $1";

/// How often a waiter that could not register for wake-ups checks.
const POLL_EVERY: Duration = Duration::from_millis(20);

/// True once command `seq` of `stream` is applied to `projection`; false after `timeout`.
// One piece: the argument checks, the registration with the waker and the loop of check and
// latch wait (or polling, when it could not register) share one deadline.
#[pg_extern(sql = false)]
fn wait_for(
    stream: &str,
    seq: i64,
    projection: &str,
    timeout: default!(Interval, "'5 s'"),
) -> Result<bool, ErrorReport> {
    if seq < 1 {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            format!("seq must be positive, not {seq}"),
        ));
    }
    let micros = timeout.as_micros();
    if micros < 0 {
        return Err(error(
            PgSqlErrorCode::ERRCODE_INVALID_PARAMETER_VALUE,
            "timeout must not be negative",
        ));
    }
    // SAFETY: reading a backend-local global.
    if unsafe { pg_sys::XactIsoLevel } >= pg_sys::XACT_REPEATABLE_READ as i32 {
        return Err(error(
            PgSqlErrorCode::ERRCODE_FEATURE_NOT_SUPPORTED,
            "cqrs.wait_for needs READ COMMITTED: under REPEATABLE READ or SERIALIZABLE the transaction's snapshot never shows the projection moving",
        )
        .set_hint("Call it in its own READ COMMITTED transaction, before the one that reads."));
    }
    let deadline = Instant::now() + Duration::from_micros(micros.min(i128::from(u32::MAX) * 1000) as u64);
    Spi::connect_mut(|client| {
        let lock = prepared::statement(
            client,
            REGISTER_WAITER,
            &[PgBuiltInOids::INT4OID.into(), PgBuiltInOids::TEXTOID.into()],
        )?;
        let registered = prepared::index_plans(|| {
            client.update(&*lock, None, &[WAIT_LOCK_CLASS.into(), projection.into()])
        })
        .and_then(|rows| rows.first().get_one::<bool>())
        .map_err(|err| spi_error("registering as a waiter", err))?
            == Some(true);
        let recheck_after = if registered { RECHECK_AFTER } else { POLL_EVERY };
        let check = prepared::statement(
            client,
            APPLIED,
            &[
                PgBuiltInOids::TEXTOID.into(),
                PgBuiltInOids::TEXTOID.into(),
                PgBuiltInOids::INT8OID.into(),
            ],
        )?;
        loop {
            // SAFETY: MyLatch is this backend's latch.
            unsafe { pg_sys::ResetLatch(pg_sys::MyLatch) };
            // update(): not read-only, so each check takes a fresh snapshot
            let rows = prepared::index_plans(|| {
                client.update(&*check, Some(1), &[projection.into(), stream.into(), seq.into()])
            })
            .map_err(|err| spi_error("checking the projection", err))?;
            if rows.is_empty() {
                return Err(unknown_projection(projection));
            }
            let row = rows.first();
            if column(row.get::<bool>(1), "progress")? == Some(true) {
                return Ok(true);
            }
            if column(row.get::<bool>(2), "halted")? == Some(true) {
                // the summary: SQLSTATE and, where safe, what it names — never a command's values
                let last_error = column(row.get::<String>(3), "last_error")?.unwrap_or_default();
                return Err(error(
                    PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
                    format!(
                        "projection {projection:?} is halted and will not apply {stream}#{seq}: {last_error}"
                    ),
                )
                .set_hint("See cqrs.status(); fix the cause and call cqrs.resume()."));
            }
            let now = Instant::now();
            if now >= deadline {
                return Ok(false);
            }
            let sleep = (deadline - now).min(recheck_after);
            // SAFETY: waiting on our own latch with a timeout; interrupts are checked right after.
            unsafe {
                pg_sys::WaitLatch(
                    pg_sys::MyLatch,
                    (pg_sys::WL_LATCH_SET | pg_sys::WL_TIMEOUT | pg_sys::WL_EXIT_ON_PM_DEATH) as i32,
                    sleep.as_millis().max(1) as std::ffi::c_long,
                    pg_sys::PG_WAIT_EXTENSION,
                );
            }
            check_for_interrupts!();
        }
    })
}
