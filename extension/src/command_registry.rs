//! Which command types are registered, and at which schema version, cached per backend.
//!
//! Every append needs this answer; asking the table each time costs an index probe and a plan
//! execution per command. Instead each backend keeps a map and drops it when the table changes:
//! a statement trigger on `cqrs.command_type` sends a relcache invalidation for the table, which
//! Postgres delivers to every backend (the registering one at its next command, the others at
//! their next transaction start), and our relcache callback bumps a generation counter.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;

use pgrx::pg_sys::panic::ErrorReport;
use pgrx::prelude::*;
use pgrx::spi::OwnedPreparedStatement;

use crate::errors::{column, spi_error};

/// Bound on cached names: unregistered types are cached too (as "not registered"), and an
/// application inventing type names must not grow a backend without limit.
const CAPACITY: usize = 10_000;

thread_local! {
    // Bumped by the relcache callback; entries loaded under an older generation are stale.
    static GENERATION: Cell<u64> = const { Cell::new(0) };
    // OID of cqrs.command_type once known; until then every relcache invalidation counts.
    static TABLE_OID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    static CACHE: RefCell<Cache> = RefCell::new(Cache::default());
    static LOOKUP: RefCell<Option<OwnedPreparedStatement>> = const { RefCell::new(None) };
}

#[derive(Default)]
struct Cache {
    generation: u64,
    versions: HashMap<String, Option<i64>>,
}

/// Registers the relcache callback; called once from `_PG_init`.
pub(crate) fn register_invalidation_callback() {
    // SAFETY: called once per backend from _PG_init; the callback is a plain function that
    // cannot raise errors (it only touches thread-local Cells).
    unsafe {
        pg_sys::CacheRegisterRelcacheCallback(Some(on_relcache_invalidation), pg_sys::Datum::from(0));
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let table = TABLE_OID.get();
    // InvalidOid means "everything" (e.g. after a cache reset); an unknown table OID means we
    // cannot filter, so any invalidation counts.
    if relid == pg_sys::InvalidOid || table == pg_sys::InvalidOid || relid == table {
        GENERATION.set(GENERATION.get().wrapping_add(1));
        if relid == pg_sys::InvalidOid {
            TABLE_OID.set(pg_sys::InvalidOid);
        }
    }
}

/// Statement trigger on cqrs.command_type: makes every backend forget its cached versions.
#[pg_trigger(sql = false)]
fn _command_type_changed<'a>(
    trigger: &'a pgrx::PgTrigger<'a>,
) -> Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let relid = trigger.relation()?.oid();
    // SAFETY: relid is the OID of the relation the trigger fired on, which is open and locked.
    unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    Ok(None)
}

/// The schema version registered for `command_type`, `None` when it is not registered.
pub(crate) fn version_of(command_type: &str) -> Result<Option<i64>, ErrorReport> {
    let generation = GENERATION.get();
    let cached = CACHE.with_borrow_mut(|cache| {
        if cache.generation != generation {
            cache.versions.clear();
            cache.generation = generation;
        }
        cache.versions.get(command_type).copied()
    });
    if let Some(version) = cached {
        return Ok(version);
    }

    let version = load(command_type)?;
    // If an invalidation arrived while we were reading, what we read may already be stale;
    // answer with it (it was current when read) but do not cache it.
    if GENERATION.get() == generation {
        CACHE.with_borrow_mut(|cache| {
            if cache.versions.len() >= CAPACITY {
                cache.versions.clear();
            }
            cache.versions.insert(command_type.to_owned(), version);
        });
    }
    Ok(version)
}

fn load(command_type: &str) -> Result<Option<i64>, ErrorReport> {
    Spi::connect(|client| {
        LOOKUP.with_borrow_mut(|plan| {
            if plan.is_none() {
                let prepared = client
                    .prepare(
                        "select t.version, t.tableoid from cqrs.command_type t where t.command_type = $1",
                        &[PgBuiltInOids::TEXTOID.into()],
                    )
                    .map_err(|err| spi_error("preparing the command type lookup", err))?;
                *plan = Some(prepared.keep());
            }
            let Some(plan) = plan.as_ref() else {
                return Ok(None);
            };
            let rows = client
                .select(plan, Some(1), &[command_type.into()])
                .map_err(|err| spi_error("looking up the command type", err))?;
            let mut version = None;
            for row in rows {
                version = column(row.get::<i64>(1), "the version")?;
                if let Some(oid) = column(row.get::<pg_sys::Oid>(2), "tableoid")? {
                    TABLE_OID.set(oid);
                }
            }
            if TABLE_OID.get() == pg_sys::InvalidOid {
                // learn the table's OID even when the type is not registered, so that later
                // invalidations of unrelated tables leave the cache alone
                let oid = client
                    .select("select 'cqrs.command_type'::regclass::oid", Some(1), &[])
                    .and_then(|rows| rows.first().get_one::<pg_sys::Oid>())
                    .map_err(|err| spi_error("resolving cqrs.command_type", err))?;
                if let Some(oid) = oid {
                    TABLE_OID.set(oid);
                }
            }
            Ok(version)
        })
    })
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[pg_test]
    fn registration_in_the_same_transaction_is_seen() {
        assert_eq!(super::version_of("X").expect("lookup"), None);
        let version = Spi::get_one::<i64>("select cqrs.register_command_type('X', '{}')")
            .expect("spi")
            .expect("version");
        // the trigger's invalidation is processed at the next command boundary
        Spi::run("select 1").expect("spi");
        assert_eq!(super::version_of("X").expect("lookup"), Some(version));
        Spi::run("select cqrs.unregister_command_type('X')").expect("spi");
        Spi::run("select 1").expect("spi");
        assert_eq!(super::version_of("X").expect("lookup"), None);
    }

    #[pg_test]
    fn unrelated_invalidations_keep_the_cache() {
        super::version_of("Y").expect("lookup");
        let generation = super::GENERATION.get();
        Spi::run("create table unrelated (id int); alter table unrelated add column x int").expect("spi");
        assert_eq!(super::GENERATION.get(), generation);
    }
}
