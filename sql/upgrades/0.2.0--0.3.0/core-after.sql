
-- The log's partitions ahead, its bounds recorded, pg_dump told to keep their rows, and every
-- publication of the 0.2.0 table moved to the partitioned one, published through it (the
-- sidecar decodes cqrs.command_log by name, and the slot goes on).
do $$ begin perform cqrs._make_log_partitions(); end $$;
-- one call a statement: each updates the extension's row (the edition without extensions
-- drops the call's line, leaving the loop empty)
do $$
declare
    p regclass;
begin
    for p in select l.partition from cqrs.log_partitions() l where l.partition <> 'cqrs.command_log_start'::regclass loop
        perform pg_catalog.pg_extension_config_dump(p, '');
    end loop;
end
$$;
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
