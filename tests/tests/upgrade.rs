//! `ALTER EXTENSION pg_cqrs UPDATE` from every earlier release: the upgraded schema equals a fresh
//! install of the current version (any difference is named), every row survives and still
//! behaves, and a sidecar streaming while the upgrade runs loses and doubles nothing.
//!
//! The earlier release is installed from its frozen install script (sql/releases/), which the
//! install step copies next to the current one; its sidecar is built from the release's commit
//! by scripts/release-sidecar.sh (scripts/test.sh does it before these tests).

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::orders::{random_log, seed_commands};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::traffic::Traffic;
use cqrs_e2e::{catalog, catalog_differences, connect, eventually, orders, repo_root};
use cqrs_harness::{ClusterOptions, PgCluster};
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{Mutex, MutexGuard};
use tokio_postgres::Client;

/// The releases an upgrade is tested from (each has sql/releases/pg_cqrs--<v>.sql).
const EARLIER_RELEASES: &[&str] = &["0.1.0", "0.2.0"];

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// Objects of schema cqrs that are not members of the extension, and the tables pg_dump is told
/// to dump (`pg_extension_config_dump`).
async fn extension_facts(client: &Client) -> Result<(Vec<String>, Vec<String>)> {
    let strays = client
        .query(
            "select pg_catalog.pg_describe_object(classid, objid, 0)
               from (select 'pg_catalog.pg_class'::regclass as classid, c.oid as objid
                       from pg_catalog.pg_class c
                      where c.relnamespace = 'cqrs'::regnamespace and c.relkind in ('r', 'S', 'v', 'm')
                        -- the log's partitions are no members, by design: pg_dump dumps them whole
                        and not exists (select from pg_catalog.pg_inherits i
                                         where i.inhrelid = c.oid and i.inhparent = 'cqrs.command_log'::regclass)
                     union all
                     select 'pg_catalog.pg_proc'::regclass, p.oid
                       from pg_catalog.pg_proc p where p.pronamespace = 'cqrs'::regnamespace) o
              where not exists (select from pg_catalog.pg_depend d
                                 where d.classid = o.classid and d.objid = o.objid and d.deptype = 'e'
                                   and d.refobjid = (select oid from pg_catalog.pg_extension where extname = 'pg_cqrs'))
              order by 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let dumped = client
        .query(
            // the log's partitions once each, named as tests/sql/catalog.sql names them
            "select distinct pg_catalog.regexp_replace(c.oid::regclass::text, 'command_log_[0-9]{8}(_[0-9]{2})?', 'command_log_<day>')
               from pg_catalog.pg_extension e, unnest(e.extconfig) as c(oid)
              where e.extname = 'pg_cqrs' order by 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    Ok((strays, dumped))
}

/// Fills a database of an earlier release with what an upgrade must carry over: commands in many
/// streams, a registered command type, three projections — one halted on a poison event, one
/// that dead-lettered it — with parked events waiting for a gap, and a projector lease.
const FILL: &str = r#"
select cqrs.register_command_type('PAY', '{"type": "object", "required": ["amount"]}');
create table public.rm_count (stream text primary key, n integer not null default 0, rev bigint not null default 0);
create table public.rm_total (stream text primary key, total integer not null default 0, rev bigint not null default 0);
create table public.rm_strict (stream text primary key, total integer not null default 0, rev bigint not null default 0);
select cqrs.create_projection('count', 'public.rm_count', 'stream', '{"PAY": {"action": "upsert", "add": {"n": {"const": 1}}}}');
select cqrs.create_projection('total', 'public.rm_total', 'stream', '{"PAY": {"action": "upsert", "add": {"total": "$.amount"}}}', on_error => 'dead_letter');
select cqrs.create_projection('strict', 'public.rm_strict', 'stream', '{"PAY": {"action": "upsert", "add": {"total": "$.amount"}}}');
select count(*) from (
    select cqrs.append(('00000000-0000-4000-8000-' || lpad(to_hex(s * 10 + k), 12, '0'))::uuid,
                       's-' || s, 'PAY', jsonb_build_object('amount', s + k))
      from generate_series(1, 200) s, generate_series(1, 3) k
     order by s, k) appended;
select cqrs.append('00000000-0000-4000-8000-ffffffffffff', 'poison', 'PAY', '{"amount": "lots"}');
-- a time-ordered id (of today): after 0.3.0 partitions the log by the time in the ids, its retry
-- must still find it, in the partition the old table became
select cqrs.append(cqrs.uuid_v7(), 'v7-1', 'PAY', '{"amount": 5}');
select cqrs.acquire_lease('sidecar of the earlier release');
-- every command but the first of s-7 and of s-8: their later commands park behind the gap
select count(*) from cqrs.project_batch(
    (select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l
      where not (l.stream in ('s-7', 's-8') and l.seq = 1)), '0/1000', 1);
"#;

/// What must read the same before and after: every table's rows (in the columns 0.1.0 had) and
/// what cqrs.status() says, without the clock.
const SNAPSHOT: &[(&str, &str)] = &[
    ("command_log", "select position, command_id, stream, seq, command_type, payload, metadata, created_at from cqrs.command_log order by position"),
    ("stream", "select stream, last_seq from cqrs.stream order by stream"),
    ("command_type", "select command_type, json_schema, version, registered_at from cqrs.command_type order by 1"),
    ("projection", "select name, target, key_column, rev_column, handlers, on_error, definition_version, created_at from cqrs.projection order by name"),
    // the whole error: last_error before 0.3.0, last_error_detail since (last_error is its summary)
    ("projection_state", "select name, halted, coalesce(to_jsonb(s) ->> 'last_error_detail', s.last_error) as last_error, last_error_sqlstate, last_error_at, last_error_event, checkpoint_lsn, checkpoint_position, checkpoint_at, revision, applied, duplicates, dead_lettered, parked, generation from cqrs.projection_state s order by name"),
    ("projection_stream", "select projection, stream, last_seq from cqrs.projection_stream order by 1, 2"),
    ("parked", "select projection, stream, seq, event, parked_at from cqrs.parked order by 1, 2, 3"),
    ("dead_letter", "select id, projection, stream, seq, command_id, command_type, event, coalesce(to_jsonb(d) ->> 'error_detail', d.error) as error, sqlstate, failed_at, retries from cqrs.dead_letter d order by id"),
    ("projector_lease", "select token, holder, acquired_at from cqrs.projector_lease"),
    ("read models", "select 'count', stream, n, rev from public.rm_count union all select 'total', stream, total, rev from public.rm_total union all select 'strict', stream, total, rev from public.rm_strict order by 1, 2"),
    ("status", "select projection, halted, last_error_sqlstate, checkpoint_lsn, checkpoint_position, checkpoint_at, events_behind, parked, gap_alert, dead_letters, applied, duplicates, revision, generation from cqrs.status() order by 1"),
];

async fn snapshot(client: &Client) -> Result<Vec<(String, String)>> {
    let mut out = Vec::new();
    for (name, query) in SNAPSHOT {
        let text = client
            .query_one(
                &format!("select coalesce(string_agg(to_jsonb(t)::text, E'\\n'), '') from ({query}) t"),
                &[],
            )
            .await
            .with_context(|| format!("reading {name}"))?
            .get(0);
        out.push(((*name).to_owned(), text));
    }
    Ok(out)
}

/// After the upgrade to 0.3.0 the errors recorded before it are whole in the detail columns
/// (the snapshot compares those) and only their SQLSTATE is where readers look.
async fn errors_are_summarized(client: &Client) -> Result<()> {
    let summaries: String = scalar(
        client,
        "select concat_ws(' | ', (select string_agg(last_error, ', ') from cqrs.projection_state where halted),
                                 (select string_agg(error, ', ') from cqrs.dead_letter))",
    )
    .await?;
    ensure!(
        summaries == "SQLSTATE 22P02 | SQLSTATE 22P02",
        "the errors of the earlier release are not summarized: {summaries}"
    );
    Ok(())
}

async fn scalar<T>(client: &Client, sql: &str) -> Result<T>
where
    T: for<'a> tokio_postgres::types::FromSql<'a>,
{
    Ok(client
        .query_one(sql, &[])
        .await
        .with_context(|| sql.to_owned())?
        .get(0))
}

async fn current_version(client: &Client) -> Result<String> {
    scalar(
        client,
        "select default_version::text from pg_catalog.pg_available_extensions where name = 'pg_cqrs'",
    )
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgraded_install_equals_a_fresh_one_and_keeps_every_row() -> Result<()> {
    let _serial = serial().await;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    let fresh_db = "fresh";
    pg.psql_in("postgres", &format!("create database {fresh_db}"))?;
    // with its partitions (CREATE EXTENSION makes none; the first append or cqrs.maintain() does)
    pg.psql_in(
        fresh_db,
        "create extension pg_cqrs; select count(*) from cqrs.maintain()",
    )?;
    let fresh = connect(&pg.url_for(fresh_db)).await?;
    let expected = catalog(&fresh, true).await?;
    let expected_facts = extension_facts(&fresh).await?;
    ensure!(
        expected_facts.0.is_empty(),
        "a fresh install has objects outside the extension: {:?}",
        expected_facts.0
    );
    let current = current_version(&fresh).await?;

    for release in EARLIER_RELEASES {
        let db = format!("from_{}", release.replace('.', "_"));
        pg.psql_in("postgres", &format!("create database {db}"))?;
        pg.psql_in(&db, &format!("create extension pg_cqrs version '{release}'"))
            .with_context(|| {
                format!("installing release {release} (is sql/releases/pg_cqrs--{release}.sql installed?)")
            })?;
        let client = connect(&pg.url_for(&db)).await?;
        client
            .batch_execute(FILL)
            .await
            .context("filling the earlier release")?;
        // the fill left what the upgrade must carry: parked events, a dead letter, a halt
        let parked: i64 = scalar(&client, "select count(*) from cqrs.parked").await?;
        let dead: i64 = scalar(&client, "select count(*) from cqrs.dead_letter").await?;
        let halted: i64 = scalar(&client, "select count(*) from cqrs.projection_state where halted").await?;
        ensure!(
            parked == 8 && dead == 1 && halted == 1,
            "fill: {parked} parked, {dead} dead letters, {halted} halted"
        );
        let before = snapshot(&client).await?;

        let started = Instant::now();
        client.batch_execute("alter extension pg_cqrs update").await?;
        eprintln!(
            "{release} → {current}: ALTER EXTENSION took {:?} with {} commands",
            started.elapsed(),
            scalar::<i64>(&client, "select count(*) from cqrs.command_log").await?
        );
        let version: String = scalar(
            &client,
            "select extversion::text from pg_catalog.pg_extension where extname = 'pg_cqrs'",
        )
        .await?;
        ensure!(
            version == current,
            "after the update pg_cqrs is {version}, not {current}"
        );

        let diff = catalog_differences(
            ("after the upgrade", &catalog(&client, true).await?),
            ("in a fresh install", &expected),
        );
        if !diff.is_empty() {
            bail!(
                "the catalog after upgrading from {release} differs from a fresh {current} install in {} places \
                 (does sql/releases/pg_cqrs--{release}--{current}.sql carry every schema change?):\n{}",
                diff.len(),
                diff.join("\n")
            );
        }
        let facts = extension_facts(&client).await?;
        ensure!(
            facts.0.is_empty(),
            "after the upgrade these objects do not belong to the extension: {:?}",
            facts.0
        );
        ensure!(
            facts.1 == expected_facts.1,
            "pg_dump config tables differ: {:?} vs {:?}",
            facts.1,
            expected_facts.1
        );

        let after = snapshot(&client).await?;
        for ((name, was), (_, is)) in before.iter().zip(&after) {
            ensure!(
                was == is,
                "{name} changed in the upgrade from {release}:\nbefore:\n{was}\nafter:\n{is}"
            );
        }
        errors_are_summarized(&client).await?;
        still_behaves(&client)
            .await
            .with_context(|| format!("after upgrading from {release}"))?;
    }
    Ok(())
}

/// The portable edition's own helpers (schema cqrs_portable, apart from the read models' writers
/// and readers, the registered schemas' compiled validators and the projections' compiled statements) as comparable lines: every function with its attributes, body and grants, and
/// every table's columns.
const PORTABLE_HELPERS: &str = "
select pg_catalog.format('function %s | %s', p.oid::pg_catalog.regprocedure,
           pg_catalog.regexp_replace(pg_catalog.pg_get_functiondef(p.oid), '\\s+', ' ', 'g'))
  from pg_catalog.pg_proc p
 where p.pronamespace = 'cqrs_portable'::pg_catalog.regnamespace and p.proname !~ '^_(write|read|v|fold)_[0-9a-f]{32}$'
union all
select pg_catalog.format('grant %s | %s | %s', p.oid::pg_catalog.regprocedure, a.grantee::pg_catalog.regrole, a.privilege_type)
  from pg_catalog.pg_proc p, pg_catalog.aclexplode(p.proacl) a
 where p.pronamespace = 'cqrs_portable'::pg_catalog.regnamespace and p.proname !~ '^_(write|read|v|fold)_[0-9a-f]{32}$'
union all
select pg_catalog.format('column %s.%s | %s', c.relname, a.attname, pg_catalog.format_type(a.atttypid, a.atttypmod))
  from pg_catalog.pg_class c join pg_catalog.pg_attribute a on a.attrelid = c.oid and a.attnum > 0 and not a.attisdropped
 where c.relnamespace = 'cqrs_portable'::pg_catalog.regnamespace and c.relkind = 'r'
order by 1";

async fn portable_helpers(client: &Client) -> Result<std::collections::BTreeSet<String>> {
    Ok(client
        .query(PORTABLE_HELPERS, &[])
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect())
}

/// A cluster without the extension, the portable edition built, and `databases` owned by
/// [`ADMIN`](cqrs_e2e::edition::ADMIN) (a non-superuser, as on a managed service).
fn portable_cluster(databases: &[&str]) -> Result<PgCluster> {
    use cqrs_e2e::edition::{build_portable, ADMIN};
    build_portable()?;
    let pg = PgCluster::start(ClusterOptions {
        with_extension: false,
        ..ClusterOptions::default()
    })?;
    pg.psql_in("postgres", &format!("create role {ADMIN} login createrole"))?;
    for db in databases {
        pg.psql_in("postgres", &format!("create database {db} owner {ADMIN}"))?;
    }
    Ok(pg)
}

/// Installs the portable edition's frozen `release` into `database` as its owner.
fn install_portable_release(pg: &PgCluster, release: &str, database: &str) -> Result<()> {
    let frozen = format!("sql/portable/releases/pg_cqrs--{release}.sql");
    let (ok, output) = cqrs_e2e::edition::psql_file(pg, cqrs_e2e::edition::ADMIN, database, &frozen)?;
    ensure!(ok, "installing {frozen} failed:\n{output}");
    Ok(())
}

/// Runs this release's portable upgrade script from `release` on `database` as its owner
/// (`psql -1 -f`, as its users do); its output, and how long it took.
fn upgrade_portable(pg: &PgCluster, release: &str, database: &str) -> Result<(String, Duration)> {
    let upgrade = format!(
        "target/portable/pg_cqrs--{release}--{}.sql",
        env!("CARGO_PKG_VERSION")
    );
    let started = Instant::now();
    let (ok, output) = cqrs_e2e::edition::psql_file(pg, cqrs_e2e::edition::ADMIN, database, &upgrade)?;
    ensure!(ok, "{upgrade} failed:\n{output}");
    Ok((output, started.elapsed()))
}

/// A portable install of 0.2.0 (its frozen psql script, by the non-superuser database owner)
/// upgraded with this release's psql upgrade script equals a fresh install — schema cqrs and its
/// own helpers, bodies included — keeps every row, and each of its read models now has a writer
/// and a reader owned by the table's owner, the projecting role no longer writing them itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portable_install_upgraded_with_psql_equals_a_fresh_one_and_keeps_every_row() -> Result<()> {
    use cqrs_e2e::edition::{psql_file, ADMIN};
    let _serial = serial().await;
    let release = "0.2.0";
    let pg = portable_cluster(&["fresh", "upgraded"])?;
    let admin_url = |db: &str| format!("postgres://{ADMIN}@127.0.0.1:{}/{db}", pg.port());
    let (ok, output) = psql_file(&pg, ADMIN, "fresh", "target/portable/pg_cqrs.sql")?;
    ensure!(ok, "a fresh install failed:\n{output}");
    install_portable_release(&pg, release, "upgraded")?;
    let fresh = connect(&admin_url("fresh")).await?;
    // with its partitions (the install makes none; the first append or cqrs.maintain() does)
    fresh
        .batch_execute("select count(*) from cqrs.maintain()")
        .await?;
    let client = connect(&admin_url("upgraded")).await?;
    client
        .batch_execute(FILL)
        .await
        .context("filling the earlier release")?;
    let before = snapshot(&client).await?;

    let (output, took) = upgrade_portable(&pg, release, "upgraded")?;
    eprintln!(
        "portable {release} → {}: the upgrade script took {took:?}",
        env!("CARGO_PKG_VERSION")
    );
    ensure!(!output.contains("WARNING"), "the upgrade warned:\n{output}");

    let diff = catalog_differences(
        ("after the upgrade", &catalog(&client, true).await?),
        ("in a fresh install", &catalog(&fresh, true).await?),
    );
    let helpers = catalog_differences(
        ("after the upgrade", &portable_helpers(&client).await?),
        ("in a fresh install", &portable_helpers(&fresh).await?),
    );
    if !diff.is_empty() || !helpers.is_empty() {
        bail!(
            "the portable edition upgraded from {release} differs from a fresh install in {} places \
             (does sql/upgrades/{release}--{}/ carry every schema change?):\n{}",
            diff.len() + helpers.len(),
            env!("CARGO_PKG_VERSION"),
            diff.iter()
                .chain(&helpers)
                .cloned()
                .collect::<Vec<_>>()
                .join("\n")
        );
    }
    let after = snapshot(&client).await?;
    for ((name, was), (_, is)) in before.iter().zip(&after) {
        ensure!(
            was == is,
            "{name} changed in the upgrade:\nbefore:\n{was}\nafter:\n{is}"
        );
    }
    errors_are_summarized(&client).await?;
    // the schema registered before the upgrade is compiled, and appends go through it
    let compiled: i64 = scalar(
        &client,
        "select count(*) from cqrs.command_type t join cqrs_portable.validator v using (command_type, version)
           join pg_catalog.pg_proc f on f.proname = v.function and f.pronamespace = 'cqrs_portable'::regnamespace",
    )
    .await?;
    ensure!(
        compiled == 1,
        "{compiled} compiled validators for 1 registered schema"
    );
    let refused = client
        .query("select cqrs.append(gen_random_uuid(), 'pay-x', 'PAY', '{}')", &[])
        .await;
    ensure!(
        refused.as_ref().err().and_then(|e| e.code())
            == Some(&tokio_postgres::error::SqlState::INVALID_PARAMETER_VALUE),
        "a payload without amount was not refused with 22023: {refused:?}"
    );
    // every read model has its writer and reader, owned by its table's owner
    let writers: i64 = scalar(
        &client,
        "select count(*) from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target
           join pg_catalog.pg_proc f on f.proname in ('_write_' || md5(p.name), '_read_' || md5(p.name))
                                    and f.pronamespace = 'cqrs_portable'::regnamespace
          where f.proowner = c.relowner and f.prosecdef",
    )
    .await?;
    ensure!(
        writers == 6,
        "{writers} writer and reader functions for 3 projections, not 6"
    );
    let may_write: bool = scalar(
        &client,
        "select bool_or(has_table_privilege('cqrs_projector', p.target, 'insert,update,delete')) from cqrs.projection p",
    )
    .await?;
    ensure!(
        !may_write,
        "the projecting role may still write a read model itself"
    );
    still_behaves(&client)
        .await
        .context("after the portable upgrade")?;
    // 0.2.0 ran each compiled statement with EXECUTE; after the upgrade each has its function
    // (cqrs_portable._make_fold), the installer's, run with the caller's rights, only the
    // table's owner may run it, and its kept plan reaches the read model only by its key's index
    let folds_wrong: Vec<String> = client
        .query(
            "select p.name || ': ' || coalesce(f.proowner::regrole::text || case when f.prosecdef then ' definer' else '' end
                    || ' ' || coalesce(f.proacl::text, 'public'), 'none')
               from cqrs.projection p join pg_catalog.pg_class c on c.oid = p.target
               join cqrs_portable.compiled k on k.projection = p.name
               left join pg_catalog.pg_proc f on f.oid = pg_catalog.to_regprocedure(
                   'cqrs_portable._fold_' || md5(k.sql) || '(jsonb, bigint, boolean, integer, integer)')
              where f.oid is null or f.prosecdef or f.proowner <> (select nspowner from pg_catalog.pg_namespace where nspname = 'cqrs_portable')
                 or not pg_catalog.has_function_privilege(c.relowner, f.oid, 'execute')
                 or pg_catalog.has_function_privilege('cqrs_projector', f.oid, 'execute')
                 or not f.proconfig @> array['enable_seqscan=off', 'enable_hashjoin=off', 'enable_mergejoin=off', 'jit=off']",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    ensure!(
        folds_wrong.is_empty(),
        "compiled statements without their function, or with the wrong owner, grants or planner settings: {folds_wrong:?}"
    );
    Ok(())
}

/// What the upgraded rows must still do.
async fn still_behaves(client: &Client) -> Result<()> {
    // a replayed command is still a duplicate, answered with its original position and seq
    let row = client
        .query_one(
            "select a.position, a.seq, a.duplicate, l.position
               from cqrs.append('00000000-0000-4000-8000-00000000000b', 's-1', 'PAY', '{\"amount\": 2}') a,
                    cqrs.command_log l where l.command_id = '00000000-0000-4000-8000-00000000000b'",
            &[],
        )
        .await?;
    let (position, seq, duplicate, original): (i64, i64, bool, i64) =
        (row.get(0), row.get(1), row.get(2), row.get(3));
    ensure!(
        duplicate && position == original && seq == 1,
        "replay answered ({position}, {seq}, {duplicate})"
    );
    // so is a replayed command whose id is a UUIDv7 (0.3.0 files it under its id's time)
    let row = client
        .query_one(
            "select a.position, a.duplicate, l.position
               from cqrs.command_log l, cqrs.append(l.command_id, l.stream, l.command_type, l.payload) a
              where l.stream = 'v7-1'",
            &[],
        )
        .await?;
    let (position, duplicate, original): (i64, bool, i64) = (row.get(0), row.get(1), row.get(2));
    ensure!(
        duplicate && position == original,
        "the replay of a UUIDv7 command answered ({position}, {duplicate}), not its position {original}"
    );
    // sequences go on without a gap, and the schema still validates
    let seq: i64 = scalar(
        client,
        "select seq from cqrs.append(cqrs.uuid_v7(), 's-1', 'PAY', '{\"amount\": 1}')",
    )
    .await?;
    ensure!(seq == 4, "s-1 went on at seq {seq}, not 4");
    let refused = client
        .query("select cqrs.append(cqrs.uuid_v7(), 's-1', 'PAY', '{}')", &[])
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        refused.as_deref() == Some("22023"),
        "a payload without amount: {refused:?}"
    );
    // the lease goes on from the token it had
    let token: i64 = scalar(client, "select cqrs.acquire_lease('after the upgrade')").await?;
    ensure!(token == 2, "the next lease token is {token}, not 2");
    // the gaps fill: the parked events are released, in order
    let changed: i64 = scalar(
        client,
        "select count(*) from cqrs.project_batch(
             (select jsonb_agg(to_jsonb(l) order by l.position) from cqrs.command_log l
               where l.stream in ('s-7', 's-8') and l.seq = 1), '0/2000', 2)",
    )
    .await?;
    ensure!(changed > 0, "filling the gaps changed nothing");
    let parked: i64 = scalar(client, "select count(*) from cqrs.parked").await?;
    ensure!(
        parked == 0,
        "{parked} events still parked after their gaps filled"
    );
    let totals: String = scalar(
        client,
        "select string_agg(stream || '=' || total, ',' order by stream) from public.rm_total where stream in ('s-7', 's-8')",
    )
    .await?;
    ensure!(
        totals == "s-7=27,s-8=30",
        "released events applied wrongly: {totals}"
    );
    // the halted projection is still halted on its poison event; the dead letter is still there
    let halted: String = scalar(
        client,
        "select last_error_event ->> 'stream' from cqrs.projection_state where halted",
    )
    .await?;
    ensure!(halted == "poison", "halted on {halted}");
    let dead: String = scalar(client, "select stream from cqrs.dead_letter").await?;
    ensure!(dead == "poison", "dead letter of {dead}");
    Ok(())
}

/// Path of the sidecar binary of an earlier release.
fn release_sidecar(version: &str) -> Result<PathBuf> {
    let path = repo_root()
        .join("target/releases")
        .join(version)
        .join("cqrs-sidecar");
    ensure!(
        path.exists(),
        "{} is missing: run scripts/release-sidecar.sh {version} (scripts/test.sh does)",
        path.display()
    );
    Ok(path)
}

/// The sidecar of the earlier release streams while the database is upgraded under it: it may
/// pause while the upgrade holds its locks, and goes on by itself. Then the sidecars are
/// replaced one by one by the current one (a rolling upgrade). Nothing is lost or doubled, and
/// Redis equals the read models.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_streaming_through_an_upgrade_loses_and_doubles_nothing() -> Result<()> {
    let _serial = serial().await;
    let release = EARLIER_RELEASES[EARLIER_RELEASES.len() - 1];
    let old_sidecar = release_sidecar(release)?;
    let mut rig = Rig::start_with_options(ClusterOptions {
        extension_version: Some(release.to_owned()),
        ..ClusterOptions::default()
    })
    .await?;
    // the current sidecar refuses the earlier release at start, naming the upgrade
    let refused = rig.add_sidecar()?;
    let code = rig.sidecars[refused].wait_exit(Duration::from_secs(30))?;
    let log = rig.sidecars[refused].log();
    ensure!(
        code == Some(2)
            && log.contains(&format!(
                "pg_cqrs {release} (extension edition) is older than this sidecar supports"
            ))
            && log.contains("alter extension pg_cqrs update"),
        "the current sidecar on {release}: exit {code:?}, log:\n{log}"
    );
    rig.sidecars.clear();

    rig.add_sidecar_binary(&old_sidecar, release)?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    let mut rng = StdRng::seed_from_u64(7);
    orders::append_all(&client, &seed_commands(50), 50).await?;
    let traffic = Traffic::start(
        &rig.pg.url(),
        random_log(&mut rng, 24_000, 1_000, 50),
        2,
        Some(1_200.0),
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    let projected_before: i64 = scalar(
        &client,
        "select coalesce(sum(applied), 0)::bigint from cqrs.projection_state",
    )
    .await?;
    let started = Instant::now();
    // its own connection, as a DBA would: the upgrade waits for the batch in flight
    connect(&rig.pg.url())
        .await?
        .batch_execute("alter extension pg_cqrs update")
        .await?;
    let took = started.elapsed();
    eprintln!("ALTER EXTENSION pg_cqrs UPDATE under load took {took:?}");

    // the old sidecar goes on by itself
    eventually(
        Duration::from_secs(30),
        "the earlier release's sidecar projects after the upgrade",
        || async {
            let now: i64 = scalar(
                &client,
                "select coalesce(sum(applied), 0)::bigint from cqrs.projection_state",
            )
            .await?;
            ensure!(
                now > projected_before + 1_000,
                "projected {now}, {projected_before} before the upgrade"
            );
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;
    ensure!(
        rig.sidecars[0].is_running(),
        "the earlier release's sidecar died:\n{}",
        rig.logs()
    );

    // an earlier release's sidecar that restarts before it is replaced still starts: the
    // functions it checks at start and calls keep their signatures
    let restarted = rig.add_sidecar_binary(&old_sidecar, release)?;
    eventually(
        Duration::from_secs(30),
        "a restarted sidecar of the earlier release stands by",
        || async {
            let log = rig.sidecars[restarted].log();
            ensure!(
                log.contains("start-up checks passed")
                    && log.contains("another sidecar holds the projector lease; standing by"),
                "not yet"
            );
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;
    let exit = rig.sidecars[restarted].terminate(Duration::from_secs(15))?;
    eprintln!("the restarted sidecar of the earlier release stopped with {exit:?}");

    // rolling: a current sidecar joins, the old one is stopped, the current one leads
    let current = rig.add_sidecar()?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let exit = rig.sidecars[0].terminate(Duration::from_secs(15))?;
    eprintln!("the earlier release's sidecar stopped with {exit:?}");
    eventually(Duration::from_secs(30), "the current sidecar leads", || async {
        ensure!(
            rig.sidecars[current].is_leader() && rig.sidecars[current].readiness() == Some(200),
            "not yet"
        );
        Ok(())
    })
    .await
    .with_context(|| rig.logs())?;

    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(90)).await?;
    eprintln!("{appended} commands through an upgrade from {release} and a rolling sidecar replacement");
    Ok(())
}

/// What a writer saw while the log was partitioned under it: appends made, the longest one,
/// retries asked for (40001), and anything else.
#[derive(Default)]
struct WriterLog {
    appended: u64,
    longest: Duration,
    retries: u64,
    errors: Vec<String>,
}

/// Appends one command at a time until `stop`, timing each.
async fn write_until(client: Client, writer: usize, stop: tokio::sync::watch::Receiver<bool>) -> WriterLog {
    let mut log = WriterLog::default();
    let mut n = 0_u64;
    while !*stop.borrow() {
        n += 1;
        let started = Instant::now();
        let result = client
            .query(
                "select cqrs.append(cqrs.uuid_v7(), $1, 'LIVE', '{}')",
                &[&format!("live-{writer}-{}", n % 100)],
            )
            .await;
        log.longest = log.longest.max(started.elapsed());
        match result {
            Ok(_) => log.appended += 1,
            Err(err) if err.code().is_some_and(|c| c.code() == "40001") => log.retries += 1,
            Err(err) => log.errors.push(err.to_string()),
        }
    }
    log
}

/// 0.2.0 → current on a log of 1,000,000 commands (half with UUIDv4 ids, half UUIDv7) while two
/// writers append: the old table becomes the first partition as it is (same file: no rewrite),
/// every command is still there and still a duplicate when retried, and the appends wait for the
/// upgrade — how long is printed (README, Retention) — and then go on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_command_log_is_partitioned_in_place_while_appends_wait() -> Result<()> {
    let _serial = serial().await;
    let pg = PgCluster::start(ClusterOptions {
        extension_version: Some("0.2.0".to_owned()),
        ..ClusterOptions::default()
    })?;
    let client = connect(&pg.url()).await?;
    let started = Instant::now();
    client
        .batch_execute(
            "insert into cqrs.command_log (command_id, stream, seq, command_type, payload)
             select case when g % 2 = 0 then gen_random_uuid() else cqrs.uuid_v7() end,
                    's-' || (g % 10000), g / 10000 + 1, 'T', jsonb_build_object('n', g)
               from generate_series(0, 999999) g;
             insert into cqrs.stream (stream, last_seq) select 's-' || g, 100 from generate_series(0, 9999) g;
             checkpoint;",
        )
        .await?;
    eprintln!("filled 1,000,000 commands in {:?}", started.elapsed());
    let file_before: i64 = scalar(&client, "select pg_relation_filenode('cqrs.command_log')::bigint").await?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for writer in 0..2 {
        let connection = connect(&pg.url()).await?;
        writers.push(tokio::spawn(write_until(connection, writer, stopped.clone())));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let started = Instant::now();
    connect(&pg.url())
        .await?
        .batch_execute("alter extension pg_cqrs update")
        .await?;
    let took = started.elapsed();
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let mut longest = Duration::ZERO;
    let (mut appended, mut retries) = (0, 0);
    for writer in writers {
        let log = writer.await?;
        ensure!(log.errors.is_empty(), "a writer failed: {:?}", log.errors);
        longest = longest.max(log.longest);
        appended += log.appended;
        retries += log.retries;
    }
    eprintln!(
        "0.2.0 → current with 1,000,000 commands: ALTER EXTENSION took {took:?}; two writers appended \
         {appended} commands around it, the longest append took {longest:?}, {retries} asked for a retry (40001)"
    );
    ensure!(appended > 0, "the writers appended nothing");

    // the same file: the table was attached, not rewritten
    let file_after: i64 = scalar(
        &client,
        "select pg_relation_filenode('cqrs.command_log_start')::bigint",
    )
    .await?;
    ensure!(
        file_before == file_after,
        "the log was rewritten (file {file_before} → {file_after})"
    );
    let old: i64 = scalar(
        &client,
        "select count(*) from cqrs.command_log where stream like 's-%'",
    )
    .await?;
    ensure!(old == 1_000_000, "{old} of the 1,000,000 commands are left");
    let live: i64 = scalar(
        &client,
        "select count(*) from cqrs.command_log where stream like 'live-%'",
    )
    .await?;
    ensure!(
        live as u64 == appended,
        "{live} live commands in the log, {appended} appended"
    );
    // retries of old commands of both kinds of id are duplicates
    let duplicates: i64 = scalar(
        &client,
        "select count(*) filter (where a.duplicate)
           from (select * from cqrs.command_log where stream like 's-%' order by position desc limit 500) l,
                cqrs.append(l.command_id, l.stream, l.command_type, l.payload) a",
    )
    .await?;
    ensure!(
        duplicates == 500,
        "{duplicates} of 500 retried old commands were duplicates"
    );
    Ok(())
}

/// Appends one command at a time until `stop`; an append that fails is remembered (its id and
/// stream, and its SQLSTATE) to be retried with the same id after the upgrade, as a retry layer
/// would.
async fn write_remembering(
    client: Client,
    writer: usize,
    stop: tokio::sync::watch::Receiver<bool>,
) -> (u64, Vec<(uuid::Uuid, String, String)>) {
    let (mut appended, mut failed) = (0, Vec::new());
    let mut n = 0_u64;
    while !*stop.borrow() {
        n += 1;
        let id = uuid::Uuid::now_v7();
        let stream = format!("live-{writer}-{}", n % 100);
        match client
            .query("select cqrs.append($1, $2, 'LIVE', '{}')", &[&id, &stream])
            .await
        {
            Ok(_) => appended += 1,
            Err(err) => failed.push((
                id,
                stream,
                err.code()
                    .map(|c| c.code().to_owned())
                    .unwrap_or_else(|| err.to_string()),
            )),
        }
    }
    (appended, failed)
}

/// The portable edition's upgrade script from 0.2.0 (`psql -1 -f`, as its users run it) while two
/// writers append to a log of 200,000 commands: every append that returned is in the log once;
/// one that failed while it waited for the upgrade fails with an error (printed, with its
/// SQLSTATE: README, Retention) and, retried with the same id afterwards, is appended once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_portable_upgrade_under_appends_loses_and_doubles_nothing() -> Result<()> {
    use cqrs_e2e::edition::ADMIN;
    let _serial = serial().await;
    let release = "0.2.0";
    let pg = portable_cluster(&["live"])?;
    let url = format!("postgres://{ADMIN}@127.0.0.1:{}/live", pg.port());
    install_portable_release(&pg, release, "live")?;
    let client = connect(&url).await?;
    client
        .batch_execute(
            "insert into cqrs.command_log (command_id, stream, seq, command_type, payload)
             select gen_random_uuid(), 's-' || (g % 2000), g / 2000 + 1, 'T', jsonb_build_object('n', g)
               from generate_series(0, 199999) g;
             insert into cqrs.stream (stream, last_seq) select 's-' || g, 100 from generate_series(0, 1999) g;",
        )
        .await?;

    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut writers = Vec::new();
    for writer in 0..2 {
        let connection = connect(&url).await?;
        writers.push(tokio::spawn(write_remembering(
            connection,
            writer,
            stopped.clone(),
        )));
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    let (_, took) = upgrade_portable(&pg, release, "live")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let _ = stop.send(true);
    let (mut appended, mut failed) = (0, Vec::new());
    for writer in writers {
        let (made, missed) = writer.await?;
        appended += made;
        failed.extend(missed);
    }
    let mut codes: Vec<&str> = failed.iter().map(|f| f.2.as_str()).collect();
    codes.sort_unstable();
    codes.dedup();
    eprintln!(
        "portable {release} → {} under two writers: the upgrade script took {took:?}; {appended} appends \
         returned, {} failed around it (SQLSTATE {codes:?})",
        env!("CARGO_PKG_VERSION"),
        failed.len()
    );
    ensure!(appended > 0, "the writers appended nothing");
    // retried with the same ids, the failed ones are appended once
    for (id, stream, _) in &failed {
        let row = client
            .query_one(
                "select duplicate from cqrs.append($1, $2, 'LIVE', '{}')",
                &[id, stream],
            )
            .await
            .with_context(|| format!("retrying {id} after the upgrade"))?;
        ensure!(
            !row.get::<_, bool>(0),
            "a failed append of {id} had been appended after all"
        );
    }
    let live: i64 = scalar(
        &client,
        "select count(*) from cqrs.command_log where stream like 'live-%'",
    )
    .await?;
    ensure!(
        live as u64 == appended + failed.len() as u64,
        "{live} live commands in the log, {appended} appended and {} retried",
        failed.len()
    );
    let old: i64 = scalar(
        &client,
        "select count(*) from cqrs.command_log where stream like 's-%'",
    )
    .await?;
    ensure!(old == 200_000, "{old} of the 200,000 commands are left");
    // each live stream's sequence has no gap and no double
    let gaps: i64 = scalar(
        &client,
        "select count(*) from (select l.seq - lag(l.seq) over (partition by l.stream order by l.seq) as step
                                 from cqrs.command_log l where l.stream like 'live-%') s
          where s.step <> 1",
    )
    .await?;
    ensure!(gaps == 0, "{gaps} gaps in the live streams");
    Ok(())
}
