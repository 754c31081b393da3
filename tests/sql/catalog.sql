-- The catalog of schema cqrs as comparable lines (object, what, value), one per fact: what the
-- upgrade test compares between an upgraded and a fresh install, and the conformance suite
-- between the two editions (all but the 'definition' of functions, which is their body).
-- Grants are listed per role and privilege, so that neither the
-- grantor nor the order of an ACL matters; function bodies are compared with everything else
-- pg_get_functiondef prints (arguments, defaults, volatility, strictness, SECURITY DEFINER,
-- search_path), whitespace-normalised.
with ns as (
    select oid from pg_catalog.pg_namespace where nspname = 'cqrs'
), rels as (
    select c.oid, c.relname, c.relkind, c.reloptions, c.relacl
      from pg_catalog.pg_class c
     where c.relnamespace = (select oid from ns) and c.relkind in ('r', 'p', 'v', 'm', 'S', 'i')
), procs as (
    select p.oid, p.oid::pg_catalog.regprocedure::text as signature, p.proacl
      from pg_catalog.pg_proc p
     where p.pronamespace = (select oid from ns)
), acl as (
    select 'schema cqrs' as object, a.grantee, a.privilege_type
      from pg_catalog.pg_namespace n, pg_catalog.aclexplode(n.nspacl) a
     where n.oid = (select oid from ns)
    union all
    select pg_catalog.format('relation %s', r.relname), a.grantee, a.privilege_type
      from rels r, pg_catalog.aclexplode(r.relacl) a
    union all
    select pg_catalog.format('function %s', p.signature), a.grantee, a.privilege_type
      from procs p, pg_catalog.aclexplode(coalesce(p.proacl, pg_catalog.acldefault('f', (select proowner from pg_catalog.pg_proc where oid = p.oid)))) a
    union all
    select pg_catalog.format('column %s.%s', r.relname, att.attname), a.grantee, a.privilege_type
      from rels r
      join pg_catalog.pg_attribute att on att.attrelid = r.oid and att.attnum > 0 and not att.attisdropped
      cross join pg_catalog.aclexplode(att.attacl) a
), facts as (
    select pg_catalog.format('relation %s', r.relname) as object, 'kind' as what,
           r.relkind::text || coalesce(' ' || r.reloptions::text, '') as value
      from rels r where r.relkind <> 'i'
    union all
    select pg_catalog.format('relation %s', r.relname), 'comment', pg_catalog.obj_description(r.oid, 'pg_class')
      from rels r where pg_catalog.obj_description(r.oid, 'pg_class') is not null
    union all
    select pg_catalog.format('column %s.%s', r.relname, a.attname), 'definition',
           pg_catalog.concat_ws(' ',
               pg_catalog.format('#%s', pg_catalog.row_number() over (partition by r.oid order by a.attnum)),
               pg_catalog.format_type(a.atttypid, a.atttypmod),
               case when a.attnotnull then 'not null' end,
               case when a.attidentity <> '' then 'identity ' || a.attidentity::text end,
               case when a.attgenerated <> '' then 'generated ' || a.attgenerated::text end,
               'default ' || pg_catalog.pg_get_expr(d.adbin, d.adrelid),
               case when a.attcollation <> 0 and a.attcollation <> 100 then 'collate ' || a.attcollation::regcollation::text end)
      from rels r
      join pg_catalog.pg_attribute a on a.attrelid = r.oid and a.attnum > 0 and not a.attisdropped
      left join pg_catalog.pg_attrdef d on d.adrelid = r.oid and d.adnum = a.attnum
     where r.relkind in ('r', 'p', 'v', 'm')
    union all
    select pg_catalog.format('column %s.%s', r.relname, a.attname), 'comment', pg_catalog.col_description(r.oid, a.attnum)
      from rels r
      join pg_catalog.pg_attribute a on a.attrelid = r.oid and a.attnum > 0 and not a.attisdropped
     where pg_catalog.col_description(r.oid, a.attnum) is not null
    union all
    select pg_catalog.format('constraint %s.%s', r.relname, c.conname), 'definition', pg_catalog.pg_get_constraintdef(c.oid)
      from pg_catalog.pg_constraint c join rels r on r.oid = c.conrelid
    union all
    select pg_catalog.format('index %s', r.relname), 'definition', pg_catalog.pg_get_indexdef(r.oid)
      from rels r where r.relkind = 'i'
    union all
    select pg_catalog.format('sequence %s', r.relname), 'definition',
           pg_catalog.concat_ws(' ', s.seqtypid::regtype::text, s.seqstart, s.seqincrement, s.seqmax, s.seqmin, s.seqcache, s.seqcycle,
               'owned by ' || (select pg_catalog.format('%s.%s', oc.relname, oa.attname)
                                 from pg_catalog.pg_depend dep
                                 join pg_catalog.pg_class oc on oc.oid = dep.refobjid
                                 join pg_catalog.pg_attribute oa on oa.attrelid = dep.refobjid and oa.attnum = dep.refobjsubid
                                where dep.classid = 'pg_catalog.pg_class'::regclass and dep.objid = r.oid
                                  and dep.deptype in ('a', 'i') and dep.refobjsubid > 0))
      from rels r join pg_catalog.pg_sequence s on s.seqrelid = r.oid
    union all
    select pg_catalog.format('trigger %s.%s', r.relname, t.tgname), 'definition', pg_catalog.pg_get_triggerdef(t.oid)
      from pg_catalog.pg_trigger t join rels r on r.oid = t.tgrelid
     where not t.tgisinternal
    union all
    select pg_catalog.format('function %s', p.signature), 'returns',
           pg_catalog.pg_get_function_arguments(p.oid) || ' -> ' || pg_catalog.pg_get_function_result(p.oid)
      from procs p
    union all
    -- what callers can tell: volatility, strictness, parallel safety, security, settings
    select pg_catalog.format('function %s', p.signature), 'attributes',
           pg_catalog.concat_ws(' ', f.provolatile, case when f.proisstrict then 'strict' end, 'parallel ' || f.proparallel::text,
                                case when f.prosecdef then 'security definer' end, f.proconfig::text, f.prokind)
      from procs p join pg_catalog.pg_proc f on f.oid = p.oid
    union all
    -- the body and language: what the two editions implement differently
    select pg_catalog.format('function %s', p.signature), 'definition',
           pg_catalog.regexp_replace(pg_catalog.pg_get_functiondef(p.oid), '\s+', ' ', 'g')
      from procs p
    union all
    select pg_catalog.format('function %s', p.signature), 'comment', pg_catalog.obj_description(p.oid, 'pg_proc')
      from procs p where pg_catalog.obj_description(p.oid, 'pg_proc') is not null
    union all
    select pg_catalog.format('type %s', t.typname), 'definition', t.typtype::text
      from pg_catalog.pg_type t
     where t.typnamespace = (select oid from ns) and t.typtype not in ('c', 'b') and t.typrelid = 0
    union all
    select a.object, 'grant', pg_catalog.format('%s %s',
               case when a.grantee = 0 then 'public' else a.grantee::regrole::text end, a.privilege_type)
      from acl a
     where a.grantee = 0 or a.grantee::regrole::text in ('cqrs_writer', 'cqrs_reader', 'cqrs_projector')
)
-- The log's partitions are named by the day they start (sql/core/retention.sql), which differs
-- between installs made on different days and between a fresh install and an upgraded one (whose
-- first partition reaches further): each is listed once, as command_log_<day>.
select distinct pg_catalog.regexp_replace(object, 'command_log_[0-9]{8}(_[0-9]{2})?', 'command_log_<day>', 'g') as object, what,
       pg_catalog.regexp_replace(coalesce(value, ''), 'command_log_[0-9]{8}(_[0-9]{2})?', 'command_log_<day>', 'g') as value
  from facts order by 1, 2, 3;
