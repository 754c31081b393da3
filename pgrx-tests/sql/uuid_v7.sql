-- cqrs.uuid_v7(): RFC 9562 version 7, time-ordered.
begin;
\ir install.sql
select substr(id::text, 15, 1) as version, substr(id::text, 20, 1) in ('8', '9', 'a', 'b') as rfc_variant
  from (select cqrs.uuid_v7() as id) s;
-- the leading 48 bits are Unix milliseconds
select abs(('x' || lpad(replace(substr(cqrs.uuid_v7()::text, 1, 13), '-', ''), 16, '0'))::bit(64)::bigint
           - (extract(epoch from clock_timestamp()) * 1000)::bigint) < 5000 as carries_the_time;
-- ids generated in sequence sort in sequence
with ids as (select g, cqrs.uuid_v7() as id from generate_series(1, 1000) g)
select bool_and(ordered) as monotonic from (
  select id > lag(id) over (order by g) as ordered from ids offset 1) s;
select count(distinct cqrs.uuid_v7()) as distinct_ids from generate_series(1, 10000);
rollback;
