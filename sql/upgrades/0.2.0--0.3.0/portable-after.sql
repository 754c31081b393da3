
-- Every read model gets its writer and reader, owned by its table's owner (the owner's code ran
-- as the projecting role), and the projecting role no longer writes read models itself. The
-- upgrader must be a member of each table's owner, as at create_projection; where it is not,
-- that projection halts at its next batch with a message naming cqrs_portable.rebind.
do $owners$
declare
    v_projection record;
    v_message text;
begin
    for v_projection in select p.name, p.target from cqrs.projection p order by p.name loop
        begin
            perform cqrs_portable._make_owner_functions(v_projection.name, v_projection.target);
        exception when others then
            get stacked diagnostics v_message = message_text;
            raise warning '%', pg_catalog.format('projection %s: its writer and reader could not be made for the owner of %s (%s); it halts at its next batch until a member of that role runs select cqrs_portable.rebind(%L);',
                                                 v_projection.name, v_projection.target, v_message, v_projection.name);
        end;
        begin
            execute pg_catalog.format('revoke insert, update, delete on %s from cqrs_projector', v_projection.target);
        exception when others then
            get stacked diagnostics v_message = message_text;
            raise warning '%', pg_catalog.format('projection %s: could not revoke insert, update, delete on %s from cqrs_projector (%s); its owner should',
                                                 v_projection.name, v_projection.target, v_message);
        end;
    end loop;
end
$owners$;

-- The schemas registered before the upgrade get their compiled validators (the interpreter
-- validates any that cannot be compiled).
select cqrs_portable._compile_validators();

-- a restore of a pg_tle install replaces the settings' one row instead of failing on it
create trigger settings_restored before insert on cqrs_portable.settings
    for each row execute function cqrs_portable._settings_restored();
