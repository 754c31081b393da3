//! Which command log is installed: the partitioned one of 0.3.0 and later (sql/core/retention.sql:
//! every row has an id_time, lookups by command id name its partition) or the plain table of an
//! install not updated yet. One library serves every release's install until `ALTER EXTENSION
//! pg_cqrs UPDATE` runs (see installed_schema.rs), and the update replaces the table by another,
//! so the hot path asks the catalog caches — two lookups, no query — on every call.

use pgrx::prelude::*;

/// The log's table and whether it is the partitioned log; `None` when there is no cqrs.command_log.
pub(crate) fn current() -> Option<(pg_sys::Oid, bool)> {
    // SAFETY: syscache lookups by name; both return InvalidOid when nothing has the name (the
    // namespace lookup is told not to raise), and get_rel_relkind of a valid relation OID is a
    // plain cache read.
    unsafe {
        let namespace = pg_sys::get_namespace_oid(c"cqrs".as_ptr(), true);
        if namespace == pg_sys::InvalidOid {
            return None;
        }
        let relation = pg_sys::get_relname_relid(c"command_log".as_ptr(), namespace);
        if relation == pg_sys::InvalidOid {
            return None;
        }
        let partitioned = pg_sys::get_rel_relkind(relation) as u8 == pg_sys::RELKIND_PARTITIONED_TABLE;
        Some((relation, partitioned))
    }
}

/// Whether the installed log is the partitioned one.
pub(crate) fn partitioned() -> bool {
    current().is_some_and(|(_, partitioned)| partitioned)
}

/// Whether the partitioned log `relation` has no partition yet: CREATE EXTENSION makes none (a
/// restore from pg_dump brings its own; sql/core/retention.sql), so the first append makes them.
/// `pg_class.relhassubclass` from the catalog cache — no query on the hot path; it is set by the
/// first attach and cleared only by an ANALYZE that finds no partition (then the next append
/// makes them again, as it should).
pub(crate) fn without_partitions(relation: pg_sys::Oid) -> bool {
    // SAFETY: a syscache lookup by OID; a null tuple (no such relation) is checked before its
    // struct is read, and the tuple is released after the one field is copied out.
    unsafe {
        let tuple = pg_sys::SearchSysCache1(
            pg_sys::SysCacheIdentifier::RELOID as i32,
            pg_sys::Datum::from(relation),
        );
        if tuple.is_null() {
            return false;
        }
        let has_partitions =
            (*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_class>(tuple)).relhassubclass;
        pg_sys::ReleaseSysCache(tuple);
        !has_partitions
    }
}
