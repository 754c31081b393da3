
-- The log's partitions ahead and its bounds recorded; no partition a member of the extension (the
-- 0.2.0 table, now the first one, leaves it, and pg_dump's list of tables whose rows it keeps),
-- so that pg_dump dumps each whole, as in a fresh install; and every publication of the 0.2.0
-- table moved to the partitioned one, published through it (the sidecar decodes
-- cqrs.command_log by name, and the slot goes on).
do $$
declare
    p regclass;
begin
    perform cqrs._make_log_partitions();
    for p in select l.partition from cqrs.log_partitions() l loop
        perform cqrs._disown_log_partition(p);
    end loop;
end
$$;
create trigger retention_restored before insert on cqrs.retention
    for each row execute function cqrs._retention_restored();
do $publications$
declare
    v_name name;
begin
    for v_name in select p.pubname from pg_catalog.pg_publication p
                    join pg_catalog.pg_publication_rel r on r.prpubid = p.oid
                   where r.prrelid = 'cqrs.command_log_start'::regclass loop
        execute pg_catalog.format('alter publication %I drop table cqrs.command_log_start', v_name);
        execute pg_catalog.format('alter publication %I add table cqrs.command_log', v_name);
        execute pg_catalog.format('alter publication %I set (publish_via_partition_root = true)', v_name);
    end loop;
end
$publications$;
