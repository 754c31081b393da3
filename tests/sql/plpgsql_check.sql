-- Static checks of every PL/pgSQL function of the portable edition (plpgsql_check, Debian's
-- postgresql-15-plpgsql-check): no errors and no warnings. Results of dynamic SQL cannot be
-- checked statically; that one notice is left out.
select p.oid::regprocedure::text as function, r.level, r.message, r.lineno, r.statement
  from pg_proc p join pg_language l on l.oid = p.prolang
 cross join lateral plpgsql_check_function_tb(p.oid, fatal_errors => false, extra_warnings => false, performance_warnings => false) r
 where p.pronamespace in ('cqrs'::regnamespace, 'cqrs_portable'::regnamespace) and l.lanname = 'plpgsql'
   and p.prorettype <> 'trigger'::regtype and r.message <> 'cannot determinate a result of dynamic SQL'
 order by 1, r.lineno;
