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

/// The leaf partition of the partitioned log `log` that holds the id time `id_time`, found as the
/// executor's tuple routing finds it — the same partition descriptor (partitions being detached
/// left out unless the transaction's snapshot is older than their detach), the same bound
/// search — or `None` when no partition holds that time (older than the idempotency horizon,
/// later than the newest partition) or the one that does is itself partitioned.
///
/// Why: an insert into the partitioned table sets its routing up again on every execution (the
/// partition opened, its indexes and its ON CONFLICT arbiters found), which cost appends about
/// 5 % at 32 clients (README, Benchmarks); an insert into the partition itself does not.
///
/// Takes ROW EXCLUSIVE on the log until the transaction ends, as the routed insert does: a
/// DETACH (ACCESS EXCLUSIVE on the log) waits for this transaction, and a DETACH CONCURRENTLY's
/// second phase waits for it too, so a row inserted into the partition found here is in the
/// log when it commits, or the detach counts it as late (sql/core/retention.sql, archive_before).
pub(crate) fn partition_for(log: pg_sys::Oid, id_time: pg_sys::TimestampTz) -> Option<pg_sys::Oid> {
    // SAFETY: the log is locked before its relcache entry is read, so the entry is current (the
    // lock accepts pending invalidations) and stays valid until RelationClose; the partition
    // descriptor and its bound info belong to that entry and are only read, within the bounds
    // their own counts give, before it is closed. A timestamptz bound is a by-value Datum.
    unsafe {
        pg_sys::LockRelationOid(log, pg_sys::RowExclusiveLock as pg_sys::LOCKMODE);
        let relation = pg_sys::RelationIdGetRelation(log);
        if relation.is_null() {
            return None;
        }
        let found = (|| {
            if (*(*relation).rd_rel).relkind as u8 != pg_sys::RELKIND_PARTITIONED_TABLE {
                return None;
            }
            // execPartition.c's partition directory: !IsolationUsesXactSnapshot()
            let omit_detached = pg_sys::XactIsoLevel < pg_sys::XACT_REPEATABLE_READ as i32;
            let descriptor = pg_sys::RelationGetPartitionDesc(relation, omit_detached);
            if descriptor.is_null() || (*descriptor).boundinfo.is_null() {
                return None;
            }
            let bounds = &*(*descriptor).boundinfo;
            // PARTITION_STRATEGY_RANGE: 'r' in every release (a #define in 15, an enum since 16)
            if bounds.strategy as u8 != b'r' || bounds.kind.is_null() {
                return None;
            }
            let count = usize::try_from(bounds.ndatums).ok()?;
            let datums = std::slice::from_raw_parts(bounds.datums, count);
            let kinds = std::slice::from_raw_parts(bounds.kind, count);
            let bound = |i: usize| -> Bound {
                match *kinds[i] {
                    pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MINVALUE => Bound::Min,
                    pg_sys::PartitionRangeDatumKind::PARTITION_RANGE_DATUM_MAXVALUE => Bound::Max,
                    _ => Bound::At((*datums[i]).value() as i64),
                }
            };
            let offset = greatest_bound_at_or_below(count, bound, id_time);
            // indexes has ndatums + 1 entries: the partition whose upper bound is datums[i] is
            // indexes[i], so a time at or above datums[offset] is in indexes[offset + 1]
            let index = *bounds.indexes.add(offset.map_or(0, |o| o + 1));
            let index = usize::try_from(index).ok()?;
            if index >= usize::try_from((*descriptor).nparts).ok()? || !*(*descriptor).is_leaf.add(index) {
                return None;
            }
            Some(*(*descriptor).oids.add(index))
        })();
        pg_sys::RelationClose(relation);
        found
    }
}

/// A range partition bound of the log (its key is one timestamptz).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Bound {
    Min,
    At(i64),
    Max,
}

/// The greatest `i < count` whose bound is at or below `value` (bounds ascend), as
/// partbounds.c's partition_range_datum_bsearch answers; `None` when every bound is above it.
fn greatest_bound_at_or_below(count: usize, bound: impl Fn(usize) -> Bound, value: i64) -> Option<usize> {
    let at_or_below = |b: Bound| match b {
        Bound::Min => true,
        Bound::At(t) => t <= value,
        Bound::Max => false,
    };
    // the first bound above value; every one before it is at or below
    let (mut low, mut high) = (0, count);
    while low < high {
        let middle = low + (high - low) / 2;
        if at_or_below(bound(middle)) {
            low = middle + 1;
        } else {
            high = middle;
        }
    }
    low.checked_sub(1)
}

#[cfg(any(test, feature = "pg_test"))]
#[pg_schema]
mod tests {
    use pgrx::prelude::*;

    #[cfg(test)]
    use super::{greatest_bound_at_or_below, Bound};

    /// partition_for answers what PostgreSQL's tuple routing answers, at every bound of the log's
    /// partitions, a microsecond either side, -infinity (ids without a time) and past the
    /// newest (none) — with a gap left by a dropped partition.
    #[pg_test]
    fn the_partition_found_is_the_one_routing_picks() {
        Spi::run(
            "select count(*) from cqrs.maintain();
             -- a gap: the third partition goes
             select cqrs._disown_log_partition(p.partition) from cqrs.log_partitions() p offset 2 limit 1;
             do $$ begin execute format('drop table %s', (select p.partition from cqrs.log_partitions() p offset 2 limit 1)); end $$;",
        )
        .expect("spi");
        let log = super::current().expect("the log").0;
        let times: Vec<(pgrx::datum::TimestampWithTimeZone, Option<String>)> = Spi::connect_mut(|client| {
            let times = client.select(
                "select t, exists (select from cqrs.log_partitions() p where t >= p.lower_bound and t < p.upper_bound)
                   from (select t from (select p.lower_bound as b from cqrs.log_partitions() p
                                        union select p.upper_bound from cqrs.log_partitions() p) bounds,
                                       lateral (values (b - interval '1 microsecond'), (b), (b + interval '1 microsecond')) v(t)
                          where t not in ('infinity', '-infinity')
                         union all select '-infinity'::timestamptz
                         union all select 'infinity'::timestamptz) times",
                None,
                &[],
            )?;
            let mut routed = Vec::new();
            for row in times {
                let t = row.get::<pgrx::datum::TimestampWithTimeZone>(1)?.expect("a time");
                if row.get::<bool>(2)? != Some(true) {
                    // no partition holds it: the insert would fail, and so must the search
                    routed.push((t, None));
                    continue;
                }
                // where PostgreSQL puts a row of that id time
                let table = client
                    .update(
                        "insert into cqrs.command_log (command_id, stream, seq, command_type, payload, id_time)
                         values (gen_random_uuid(), gen_random_uuid()::text, 1, 'T', '{}', $1)
                         returning tableoid::regclass::text",
                        None,
                        &[t.into()],
                    )?
                    .first()
                    .get_one::<String>()?;
                routed.push((t, table));
            }
            Ok::<_, pgrx::spi::Error>(routed)
        })
        .expect("spi");
        assert!(times.len() > 20, "{} times", times.len());
        for (t, routed) in times {
            let found = super::partition_for(log, t.into_inner()).map(|oid| {
                Spi::get_one_with_args::<String>("select $1::regclass::text", &[oid.into()])
                    .expect("spi")
                    .expect("a name")
            });
            assert_eq!(found, routed, "id time {t}");
        }
    }

    #[cfg(test)]
    fn search(bounds: &[Bound], value: i64) -> Option<usize> {
        greatest_bound_at_or_below(bounds.len(), |i| bounds[i], value)
    }

    #[test]
    fn a_time_falls_at_the_greatest_bound_not_above_it() {
        // MINVALUE | 10 | 20 | 30: partitions [min, 10), [10, 20), [20, 30)
        let bounds = [Bound::Min, Bound::At(10), Bound::At(20), Bound::At(30)];
        assert_eq!(search(&bounds, i64::MIN), Some(0));
        assert_eq!(search(&bounds, 9), Some(0));
        assert_eq!(search(&bounds, 10), Some(1));
        assert_eq!(search(&bounds, 19), Some(1));
        assert_eq!(search(&bounds, 20), Some(2));
        assert_eq!(search(&bounds, 30), Some(3));
        assert_eq!(search(&bounds, i64::MAX), Some(3));
    }

    #[test]
    fn a_time_below_every_bound_has_none() {
        let bounds = [Bound::At(10), Bound::At(20), Bound::Max];
        assert_eq!(search(&bounds, 9), None);
        assert_eq!(search(&bounds, 10), Some(0));
        assert_eq!(search(&bounds, i64::MAX), Some(1));
        assert_eq!(search(&[], 5), None);
    }
}
