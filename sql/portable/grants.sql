-- pg_cqrs, portable edition: what it grants on its helpers (schema cqrs_portable), run after
-- every install and upgrade, once every function exists (scripts/portable.sh and
-- scripts/upgrade-scripts.sh append it whole: it is not a list of functions): each helper to
-- pg_cqrs's three roles — except the installer's own (making a read model's functions) and the
-- read models' writers, readers and compiled statements, which pg_cqrs grants as it makes them.
revoke all on schema cqrs_portable from public;
grant usage on schema cqrs_portable to cqrs_writer, cqrs_reader, cqrs_projector;
revoke all on all tables in schema cqrs_portable from public;
grant select on cqrs_portable.settings to cqrs_writer, cqrs_reader, cqrs_projector;
do $grants$
declare
    v_function regprocedure;
begin
    for v_function in
        select p.oid::regprocedure from pg_catalog.pg_proc p
         where p.pronamespace = 'cqrs_portable'::regnamespace
           and p.proname !~ '^_(write|read|v|fold)_[0-9a-f]{32}$'
           and p.proname not in ('_make_owner_functions', '_drop_owner_functions', 'rebind', '_make_fold')
    loop
        execute pg_catalog.format('revoke execute on function %s from public', v_function);
        execute pg_catalog.format('grant execute on function %s to cqrs_writer, cqrs_reader, cqrs_projector', v_function);
    end loop;
end
$grants$;
revoke execute on function cqrs_portable._make_owner_functions(text, regclass), cqrs_portable._drop_owner_functions(text),
    cqrs_portable.rebind(text), cqrs_portable._make_fold(text, text) from public;
