//! Command-side statistics: what `cqrs.append` answered, per command type — accepted,
//! duplicate (a replay), expected-seq conflict (40001), invalid (the command itself is wrong:
//! SQLSTATE class 22, 54000 limits, 42704 unregistered type) and any other error — and how long
//! each call took (a histogram), kept in shared memory across all backends as
//! pg_stat_statements does, read with `cqrs.stats()` / `cqrs.append_latency()`.
//!
//! Shared memory is only there when the library is in `shared_preload_libraries`; without it,
//! appends are not counted and the functions say so (55000). Counters start at zero with the
//! server, and again after a crash restart (PostgreSQL reinitialises shared memory then, as it
//! discards its own statistics). A call is counted when `cqrs.append` answers (or raises), not
//! when its transaction commits: an accepted append whose transaction rolls back stays counted,
//! as pg_stat_statements counts calls.
//!
//! Counting takes no lock: the counters are atomics, and a command type's slot, once published,
//! never changes. A new type claims the next free slot with one atomic increment; two backends
//! that meet a new type at once may claim one slot each, and the reader sums slots by name.
//! Past [`MAX_TYPES`] types, the rest are counted together as [`OTHER_TYPES`].

use std::cell::{RefCell, UnsafeCell};
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, AtomicUsize, Ordering};
use std::time::Duration;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::{pg_shmem_init, PGRXSharedMemory, PgAtomic};

use crate::errors::error;

/// Command types counted apart; the rest share the last slot.
pub(crate) const MAX_TYPES: usize = 128;
/// What the types past [`MAX_TYPES`], and calls without a usable type, are counted as.
pub(crate) const OTHER_TYPES: &str = "(other)";
/// Longest command type (append.rs refuses longer ones).
const NAME_BYTES: usize = 128;

/// What an append answered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Outcome {
    Accepted,
    Duplicate,
    ExpectedSeqConflict,
    Invalid,
    Error,
}

impl Outcome {
    const ALL: [Outcome; 5] = [
        Outcome::Accepted,
        Outcome::Duplicate,
        Outcome::ExpectedSeqConflict,
        Outcome::Invalid,
        Outcome::Error,
    ];

    /// The outcome of an append that raised `code`.
    pub(crate) fn of_error(code: PgSqlErrorCode) -> Self {
        use PgSqlErrorCode::*;
        match code {
            ERRCODE_T_R_SERIALIZATION_FAILURE => Outcome::ExpectedSeqConflict,
            ERRCODE_PROGRAM_LIMIT_EXCEEDED | ERRCODE_UNDEFINED_OBJECT => Outcome::Invalid,
            // class 22: data exception (a payload that breaks its schema, a bad argument)
            other if sqlstate(other).starts_with("22") => Outcome::Invalid,
            _ => Outcome::Error,
        }
    }
}

/// The five characters of a SQLSTATE, decoded from PostgreSQL's packing of them (MAKE_SQLSTATE:
/// six bits per character, the first in the lowest bits).
fn sqlstate(code: PgSqlErrorCode) -> String {
    let packed = code as u32;
    (0..5)
        .map(|i| char::from((((packed >> (6 * i)) & 0x3f) as u8).wrapping_add(b'0')))
        .collect()
}

/// Upper bounds of the latency buckets, in microseconds (the last bucket is +Inf).
const BUCKETS_US: [u64; 12] = [
    100, 250, 500, 1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 1_000_000,
];
const BUCKETS: usize = BUCKETS_US.len() + 1;

/// Slot states.
const EMPTY: u8 = 0;
const READY: u8 = 2;

/// One command type's counters.
struct TypeStats {
    state: AtomicU8,
    name_len: AtomicU32,
    /// written once by the backend that claimed the slot, before `state` is READY
    name: UnsafeCell<[u8; NAME_BYTES]>,
    outcomes: [AtomicU64; Outcome::ALL.len()],
    buckets: [AtomicU64; BUCKETS],
    total_us: AtomicU64,
}

impl TypeStats {
    const fn new() -> Self {
        Self {
            state: AtomicU8::new(EMPTY),
            name_len: AtomicU32::new(0),
            name: UnsafeCell::new([0; NAME_BYTES]),
            outcomes: [const { AtomicU64::new(0) }; Outcome::ALL.len()],
            buckets: [const { AtomicU64::new(0) }; BUCKETS],
            total_us: AtomicU64::new(0),
        }
    }

    fn name(&self) -> Option<Vec<u8>> {
        if self.state.load(Ordering::Acquire) != READY {
            return None;
        }
        let len = (self.name_len.load(Ordering::Relaxed) as usize).min(NAME_BYTES);
        // SAFETY: the name was written before `state` was published READY (Release), and is
        // never written again; the Acquire load above orders this read after that write.
        Some(unsafe { (&*self.name.get())[..len].to_vec() })
    }

    fn record(&self, outcome: Outcome, took: Duration) {
        self.outcomes[outcome as usize].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        let bucket = BUCKETS_US.iter().position(|&le| us <= le).unwrap_or(BUCKETS - 1);
        self.buckets[bucket].fetch_add(1, Ordering::Relaxed);
        self.total_us.fetch_add(us, Ordering::Relaxed);
    }
}

/// The shared counters: [`MAX_TYPES`] named slots and the one of [`OTHER_TYPES`].
pub(crate) struct AppendStats {
    claimed: AtomicUsize,
    types: [TypeStats; MAX_TYPES],
    other: TypeStats,
}

impl Default for AppendStats {
    fn default() -> Self {
        Self {
            claimed: AtomicUsize::new(0),
            types: [const { TypeStats::new() }; MAX_TYPES],
            other: TypeStats::new(),
        }
    }
}

// SAFETY: the struct holds only atomics and byte arrays (no pointers), so it means the same in
// every process that maps the segment; the names' UnsafeCells are written once under the claim
// protocol above.
unsafe impl PGRXSharedMemory for AppendStats {}

// SAFETY: one name, used by this module only.
static STATS: PgAtomic<AppendStats> = unsafe { PgAtomic::new(c"pg_cqrs_append_stats") };

/// Whether this process has the shared counters: set in the postmaster when the library is
/// preloaded, inherited by every backend it forks.
static SHARED: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// This backend's memo of each type's slot (slots never move).
    static SLOTS: RefCell<HashMap<Vec<u8>, usize>> = RefCell::new(HashMap::new());
}

/// Asks for the shared memory; called from `_PG_init`, which only counts when preloaded.
// pg_shmem_init! names the pg13/pg14 features, which this crate does not have
#[allow(unexpected_cfgs)]
pub(crate) fn init() {
    // SAFETY: reads a flag PostgreSQL sets while it loads shared_preload_libraries.
    if unsafe { pg_sys::process_shared_preload_libraries_in_progress } {
        pg_shmem_init!(STATS);
        SHARED.store(true, Ordering::Relaxed);
    }
}

/// Whether appends are counted in this process (the library was preloaded).
pub(crate) fn counting() -> bool {
    SHARED.load(Ordering::Relaxed)
}

fn shared() -> Option<&'static AppendStats> {
    counting().then(|| STATS.get())
}

/// The slot of `command_type` (`None`: not a usable type name).
fn slot<'s>(stats: &'s AppendStats, command_type: Option<&[u8]>) -> &'s TypeStats {
    let Some(name) = command_type.filter(|n| !n.is_empty() && n.len() <= NAME_BYTES) else {
        return &stats.other;
    };
    if let Some(index) = SLOTS.with_borrow(|slots| slots.get(name).copied()) {
        return &stats.types[index];
    }
    let claimed = stats.claimed.load(Ordering::Acquire).min(MAX_TYPES);
    let found = (0..claimed).find(|&i| stats.types[i].name().as_deref() == Some(name));
    let index = match found {
        Some(index) => index,
        None => {
            let index = stats.claimed.fetch_add(1, Ordering::AcqRel);
            if index >= MAX_TYPES {
                return &stats.other;
            }
            let slot = &stats.types[index];
            // SAFETY: fetch_add gave this backend slot `index` alone; nobody reads its name
            // before the READY store below.
            unsafe { (&mut *slot.name.get())[..name.len()].copy_from_slice(name) };
            slot.name_len.store(name.len() as u32, Ordering::Relaxed);
            slot.state.store(READY, Ordering::Release);
            index
        }
    };
    SLOTS.with_borrow_mut(|slots| slots.insert(name.to_vec(), index));
    &stats.types[index]
}

/// Counts one append of `command_type` that ended in `outcome` after `took`.
pub(crate) fn record(command_type: Option<&[u8]>, outcome: Outcome, took: Duration) {
    if let Some(stats) = shared() {
        slot(stats, command_type).record(outcome, took);
    }
}

/// One command type's figures, slots of the same name summed.
#[derive(Default)]
struct Figures {
    outcomes: [u64; Outcome::ALL.len()],
    buckets: [u64; BUCKETS],
    total_us: u64,
}

fn figures() -> Result<Vec<(String, Figures)>, ErrorReport> {
    let stats = shared().ok_or_else(|| {
        error(
            PgSqlErrorCode::ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE,
            "pg_cqrs counts appends only when it is loaded with the server: it is not in shared_preload_libraries",
        )
        .set_hint("Add pg_cqrs to shared_preload_libraries (postgresql.conf, or ALTER SYSTEM) and restart PostgreSQL; appends are counted from then on.")
    })?;
    let mut by_name: Vec<(String, Figures)> = Vec::new();
    let claimed = stats.claimed.load(Ordering::Acquire).min(MAX_TYPES);
    let named = stats.types[..claimed].iter().filter_map(|slot| {
        slot.name()
            .map(|name| (String::from_utf8_lossy(&name).into_owned(), slot))
    });
    for (name, slot) in named.chain(std::iter::once((OTHER_TYPES.to_owned(), &stats.other))) {
        let index = match by_name.iter().position(|(n, _)| *n == name) {
            Some(index) => index,
            None => {
                by_name.push((name, Figures::default()));
                by_name.len() - 1
            }
        };
        let figures = &mut by_name[index].1;
        for (sum, counter) in figures.outcomes.iter_mut().zip(&slot.outcomes) {
            *sum += counter.load(Ordering::Relaxed);
        }
        for (sum, counter) in figures.buckets.iter_mut().zip(&slot.buckets) {
            *sum += counter.load(Ordering::Relaxed);
        }
        figures.total_us += slot.total_us.load(Ordering::Relaxed);
    }
    by_name.retain(|(name, figures)| name != OTHER_TYPES || figures.outcomes.iter().any(|&n| n > 0));
    by_name.sort_by(|a, b| a.0.cmp(&b.0));
    Ok(by_name)
}

fn to_i64(n: u64) -> i64 {
    i64::try_from(n).unwrap_or(i64::MAX)
}

/// `cqrs.stats()`: per command type, what `cqrs.append` answered since the server started.
#[pg_extern(sql = false, name = "stats")]
#[allow(clippy::type_complexity)]
fn stats() -> Result<
    TableIterator<
        'static,
        (
            name!(command_type, String),
            name!(accepted, i64),
            name!(duplicate, i64),
            name!(expected_seq_conflict, i64),
            name!(invalid, i64),
            name!(error, i64),
            name!(calls, i64),
            name!(total_seconds, f64),
        ),
    >,
    ErrorReport,
> {
    let rows: Vec<_> = figures()?
        .into_iter()
        .map(|(name, f)| {
            let [accepted, duplicate, conflict, invalid, failed] = f.outcomes;
            let calls = f.outcomes.iter().sum::<u64>();
            (
                name,
                to_i64(accepted),
                to_i64(duplicate),
                to_i64(conflict),
                to_i64(invalid),
                to_i64(failed),
                to_i64(calls),
                f.total_us as f64 / 1e6,
            )
        })
        .collect();
    Ok(TableIterator::new(rows))
}

/// `cqrs.append_latency()`: per command type, the cumulative count of calls that took at most
/// `le` seconds (the last bucket's `le` is infinity), as a Prometheus histogram has them.
#[pg_extern(sql = false, name = "append_latency")]
fn append_latency() -> Result<
    TableIterator<'static, (name!(command_type, String), name!(le, f64), name!(calls, i64))>,
    ErrorReport,
> {
    let mut rows = Vec::new();
    for (name, f) in figures()? {
        let mut cumulative = 0u64;
        for (i, count) in f.buckets.iter().enumerate() {
            cumulative += count;
            let le = BUCKETS_US.get(i).map_or(f64::INFINITY, |&us| us as f64 / 1e6);
            rows.push((name.clone(), le, to_i64(cumulative)));
        }
    }
    Ok(TableIterator::new(rows))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sqlstates_decode() {
        assert_eq!(
            sqlstate(PgSqlErrorCode::ERRCODE_T_R_SERIALIZATION_FAILURE),
            "40001"
        );
        assert_eq!(
            sqlstate(PgSqlErrorCode::ERRCODE_INVALID_TEXT_REPRESENTATION),
            "22P02"
        );
    }

    #[test]
    fn outcomes_follow_the_sqlstate_class() {
        use PgSqlErrorCode::*;
        assert_eq!(
            Outcome::of_error(ERRCODE_T_R_SERIALIZATION_FAILURE),
            Outcome::ExpectedSeqConflict
        );
        assert_eq!(
            Outcome::of_error(ERRCODE_INVALID_PARAMETER_VALUE),
            Outcome::Invalid
        );
        assert_eq!(
            Outcome::of_error(ERRCODE_STRING_DATA_RIGHT_TRUNCATION),
            Outcome::Invalid
        );
        assert_eq!(
            Outcome::of_error(ERRCODE_PROGRAM_LIMIT_EXCEEDED),
            Outcome::Invalid
        );
        assert_eq!(Outcome::of_error(ERRCODE_UNDEFINED_OBJECT), Outcome::Invalid);
        assert_eq!(Outcome::of_error(ERRCODE_UNIQUE_VIOLATION), Outcome::Error);
        assert_eq!(Outcome::of_error(ERRCODE_QUERY_CANCELED), Outcome::Error);
        assert_eq!(
            Outcome::of_error(ERRCODE_OBJECT_NOT_IN_PREREQUISITE_STATE),
            Outcome::Error
        );
    }
}
