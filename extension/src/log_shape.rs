//! Which command log is installed: the partitioned one of 0.3.0 and later (sql/core/retention.sql:
//! every row has an id_time, lookups by command id name its partition) or the plain table of an
//! install not updated yet. One library serves every release's install until `ALTER EXTENSION
//! pg_cqrs UPDATE` runs (see installed_schema.rs), and the update replaces the table by another,
//! so the hot path asks the catalog caches — three lookups, no query — on every call.

use pgrx::prelude::*;

/// The installed log: its table, whether it is the partitioned one, and whether it has any
/// partition yet (CREATE EXTENSION makes none — a restore from pg_dump brings its own,
/// sql/core/retention.sql — so the first append makes them).
pub(crate) struct Log {
    pub(crate) relation: pg_sys::Oid,
    pub(crate) partitioned: bool,
    pub(crate) without_partitions: bool,
}

/// The log's table and whether it is the partitioned log; `None` when there is no cqrs.command_log.
pub(crate) fn current() -> Option<(pg_sys::Oid, bool)> {
    described().map(|log| (log.relation, log.partitioned))
}

/// [`current`], and whether the partitioned log has no partition yet: both from one
/// catalog-cache read of its `pg_class` row (`relhassubclass` is set by the first attach and
/// cleared only by an ANALYZE that finds no partition — then the next append makes them again).
pub(crate) fn described() -> Option<Log> {
    // SAFETY: syscache lookups by name return InvalidOid when nothing has the name (the namespace
    // lookup is told not to raise); the pg_class tuple is checked for null before its struct is
    // read, and released after its two fields are copied out.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"cqrs".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let relation = pg_sys::get_relname_relid(c"command_log".as_ptr(), namespace);
        if relation == pg_sys::InvalidOid {
            return None;
        }
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relation),
        );
        if tuple.is_null() {
            return None;
        }
        let class = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple);
        let partitioned = class.relkind as u8 == pg_sys::RELKIND_PARTITIONED_TABLE;
        let has_subclass = class.relhassubclass;
        pg_sys::ReleaseSysCache(tuple);
        Some(Log {
            relation,
            partitioned,
            without_partitions: partitioned && !has_subclass,
        })
    }
}

/// Whether the installed log is the partitioned one.
pub(crate) fn partitioned() -> bool {
    current().is_some_and(|(_, partitioned)| partitioned)
}
