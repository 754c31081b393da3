//! A read model's owner gains nothing and leaves nothing behind, in both editions, whatever path
//! runs its code. Every kind of owner code — a trigger, a column default, a domain's check, a
//! check constraint, an index expression, a row-level security policy and a function handler —
//! reports whose rights it runs with (`pg_notify`, which works even from an index expression's
//! immutable function), tries to use them (become superuser, switch role, move the projector
//! lease, write the log) and changes settings the caller's next statement would run with. It runs
//! through cqrs.create_projection, the sidecar's flusher, the read API (a cache miss and a
//! read-your-writes read), catch_up, rebuild, resume and retry_dead_letters; afterwards it must
//! have seen only its owner, gained nothing, and no session — the installer's, the sidecar's —
//! may hold anything it set.

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::{self, Edition};
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_e2e::{connect, eventually};
use cqrs_harness::ClusterOptions;
use futures_util::StreamExt;
use serde_json::Value;
use tokio::sync::mpsc;
use tokio_postgres::{AsyncMessage, Client, NoTls};

/// The owner's code, created as the owner (the role is made by the test, as a DBA would).
const OWNER_CODE: &str = r#"
create schema owned authorization rm_owner;
set role rm_owner;
create function owned.report(code text) returns void language plpgsql as $$
begin
    perform pg_catalog.pg_notify('owner_code', pg_catalog.json_build_object(
        'code', code, 'user', current_user, 'super', (select r.rolsuper from pg_catalog.pg_roles r where r.rolname = current_user))::text);
    perform pg_catalog.set_config('application_name', 'owned by ' || code, false);
    perform pg_catalog.set_config('statement_timeout', '1', false);
    perform pg_catalog.set_config('search_path', 'owned, pg_catalog', false);
    perform pg_catalog.set_config('work_mem', '77kB', true);
end
$$;
-- what owner code tries with whatever rights it runs with; a success is reported
create function owned.tamper(code text) returns boolean language plpgsql as $$
declare
    v_try text;
begin
    perform owned.report(code);
    foreach v_try in array array['alter role rm_owner superuser', 'set role postgres',
                                 'update cqrs.projector_lease set token = 9223372036854775807',
                                 'insert into cqrs.command_log (command_id, stream, seq, command_type, payload) values (gen_random_uuid(), ''forged'', 1, ''T'', ''{}'')',
                                 'grant cqrs_projector to rm_owner']
    loop
        begin
            execute v_try;
            perform pg_catalog.pg_notify('owner_code', pg_catalog.json_build_object('code', 'escalated', 'user', current_user, 'what', v_try)::text);
        exception when others then
            null;
        end;
    end loop;
    return true;
end
$$;
create function owned.tamper_text(code text) returns text language plpgsql as $$
begin
    perform owned.tamper(code);
    return code;
end
$$;
-- an index expression must be immutable: it may report and set, not write
create function owned.tamper_index(value text) returns text language plpgsql immutable as $$
begin
    perform owned.report('index');
    return value;
end
$$;
create function owned.handler(event jsonb) returns setof text language plpgsql as $$
begin
    perform owned.tamper('handler');
    update owned.rm set n = n + 100 where stream = event ->> 'stream';
    return next event ->> 'stream';
end
$$;
create domain owned.status as text check (owned.tamper('domain'));
create table owned.rm (
    stream text primary key,
    status owned.status,
    made_by text default owned.tamper_text('default'),
    n integer not null default 0,
    rev bigint not null default 0,
    check (owned.tamper('check')));
create index rm_expression on owned.rm (owned.tamper_index(stream));
create function owned.rm_trigger() returns trigger language plpgsql as $$
begin
    perform owned.tamper('trigger');
    return case when tg_op = 'DELETE' then old else new end;
end
$$;
create trigger tamper before insert or update or delete on owned.rm for each row execute function owned.rm_trigger();
alter table owned.rm enable row level security;
alter table owned.rm force row level security;
create policy reads on owned.rm for select using (owned.tamper('policy'));
create policy inserts on owned.rm for insert with check (true);
create policy updates on owned.rm for update using (true) with check (true);
create policy deletes on owned.rm for delete using (true);
reset role;
"#;

const HANDLERS: &str = r#"{"T": {"action": "upsert", "set": {"status": {"const": "open"}}, "add": {"n": {"const": 1}}},
                          "H": {"function": "owned.handler"}}"#;

/// The settings a session must still have after the owner's code ran in it.
const SETTINGS: &str =
    "select current_setting('application_name') || '|' || current_setting('statement_timeout') || '|' \
                        || current_setting('search_path') || '|' || current_setting('work_mem')";

/// A connection that LISTENs to `owner_code`, its notifications sent to the receiver.
async fn listen(url: &str) -> Result<(Client, mpsc::UnboundedReceiver<Value>)> {
    let (client, mut connection) = tokio_postgres::connect(url, NoTls).await?;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message {
                if let Ok(value) = serde_json::from_str(n.payload()) {
                    let _ = tx.send(value);
                }
            }
        }
    });
    client.batch_execute("listen owner_code").await?;
    Ok((client, rx))
}

/// Runs `sql` on a fresh connection of `url` and checks that the session's settings are what
/// they were before it.
async fn untouched_by(url: &str, sql: &str) -> Result<()> {
    let client = connect(url).await?;
    let before: String = client.query_one(SETTINGS, &[]).await?.get(0);
    client
        .batch_execute(sql)
        .await
        .with_context(|| format!("running {sql}"))?;
    let after: String = client.query_one(SETTINGS, &[]).await?.get(0);
    ensure!(before == after, "{sql} left settings behind: {before} → {after}");
    Ok(())
}

async fn owner_code_gains_nothing(edition: Edition) -> Result<()> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let superuser = rig.client().await?;
    superuser.batch_execute("create role rm_owner").await?;
    superuser
        .batch_execute(&format!(
            "grant create on database {} to rm_owner",
            rig.pg.database()
        ))
        .await?;
    if edition == Edition::Portable {
        // the installer makes the read model, as a member of its owner (create_projection checks)
        superuser
            .batch_execute(&format!("grant rm_owner to {}", edition::ADMIN))
            .await?;
    }
    superuser.batch_execute(OWNER_CODE).await?;
    let (_listener, mut reports) = listen(&rig.pg.url()).await?;
    let installer = edition::owner_url(&rig.pg, edition);
    let writer = connect(&installer).await?;
    let append = |stream: &'static str, command_type: &'static str| {
        let writer = &writer;
        async move {
            writer
                .query_one(
                    "select seq from cqrs.append(cqrs.uuid_v7(), $1, $2, '{}')",
                    &[&stream, &command_type],
                )
                .await
                .map(|row| row.get::<_, i64>(0))
        }
    };
    append("a", "T").await?;
    append("b", "H").await?;

    // created (and backfilled) by the installer
    untouched_by(
        &installer,
        &format!("select cqrs.create_projection('owned', 'owned.rm', 'stream', '{HANDLERS}', on_error => 'dead_letter')"),
    )
    .await?;

    // projected by the sidecar's flusher, read through the read API
    rig.set("CQRS_EXPOSE", "owned");
    rig.set("CQRS_READ_AUTH", "none");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    append("a", "T").await?;
    append("c", "T").await?;
    let seq = append("c", "H").await?;
    let http = reqwest::Client::new();
    let base = format!("{}/v1/projections/owned", rig.http(0));
    let fresh = http
        .get(format!("{base}/c?after=c:{seq}&timeout_ms=5000"))
        .send()
        .await?;
    ensure!(fresh.status() == 200, "read-your-writes: {}", fresh.status());
    rig.redis.cli(&["DEL", &format!("{PREFIX}:owned:a")])?;
    let miss = http.get(format!("{base}/a")).send().await?;
    ensure!(
        miss.status() == 200
            && miss
                .headers()
                .get("x-cqrs-source")
                .is_some_and(|s| s == "postgres"),
        "a cache miss: {} {:?}",
        miss.status(),
        miss.headers().get("x-cqrs-source")
    );

    // catch-up, rebuild, resume and retries by the sidecar's role
    let projector = rig.sidecar_url.clone();
    superuser
        .batch_execute(
            "insert into cqrs.dead_letter (projection, stream, seq, command_id, command_type, event, error, sqlstate)
             select 'owned', l.stream, l.seq, l.command_id, l.command_type, to_jsonb(l), 'test', 'XX000'
               from cqrs.command_log l where l.stream = 'b'",
        )
        .await?;
    for sql in [
        "select count(*) from cqrs.catch_up('owned')",
        "select * from cqrs.rebuild('owned')",
        "select count(*) from cqrs.retry_dead_letters('owned')",
    ] {
        untouched_by(&projector, sql).await?;
    }
    superuser
        .batch_execute("update cqrs.projection_state set halted = true where name = 'owned'")
        .await?;
    untouched_by(&projector, "select count(*) from cqrs.resume('owned')").await?;

    // the sidecar still projects (no statement_timeout of 1 ms held its connections), its
    // connections still carry its own names, and its log holds nothing the owner set
    let last = append("d", "T").await?;
    eventually(Duration::from_secs(20), "the sidecar projects d", || async {
        let applied: bool = superuser
            .query_one(
                "select coalesce((select last_seq >= $1 from cqrs.projection_stream where projection = 'owned' and stream = 'd'), false)",
                &[&last],
            )
            .await?
            .get(0);
        ensure!(applied, "not yet");
        Ok(())
    })
    .await
    .with_context(|| rig.logs())?;
    // a session in the middle of a read shows the owner's name while the owner's code runs (the
    // portable edition puts settings back when it returns): what matters is that every session
    // sheds it, so the names are sampled until none has it (a name left behind stays for good)
    eventually(Duration::from_secs(10), "no session keeps the owner's name", || async {
        let names: BTreeSet<String> = superuser
            .query(
                "select distinct application_name from pg_stat_activity where backend_type in ('client backend', 'walsender')",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        ensure!(
            !names.iter().any(|n| n.starts_with("owned by"))
                && ["flush", "lease", "read", "replication"]
                    .iter()
                    .all(|purpose| names.contains(&format!("cqrs-sidecar/{purpose}"))),
            "the sessions are named {names:?}"
        );
        Ok(())
    })
    .await?;
    let log = rig.logs();
    ensure!(
        !log.contains("owned by"),
        "a sidecar log holds what the owner's code set:\n{log}"
    );

    // every piece of owner code reported, always as the owner, who gained nothing
    let mut seen = BTreeSet::new();
    while let Ok(report) = reports.try_recv() {
        let code = report["code"].as_str().unwrap_or_default().to_owned();
        ensure!(code != "escalated", "the owner's code gained rights: {report}");
        ensure!(
            report["user"] == "rm_owner" && report["super"] == false,
            "owner code ran as someone else: {report}"
        );
        seen.insert(code);
    }
    let expected: BTreeSet<String> = [
        "check", "default", "domain", "handler", "index", "policy", "trigger",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    ensure!(seen == expected, "the owner's code that ran: {seen:?}");
    let (superuser_now, memberships): (bool, i64) = {
        let row = superuser
            .query_one(
                "select r.rolsuper, (select count(*) from pg_auth_members m where m.member = r.oid)
                   from pg_roles r where r.rolname = 'rm_owner'",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(
        !superuser_now && memberships == 0,
        "rm_owner: superuser {superuser_now}, member of {memberships} roles"
    );
    let forged: i64 = superuser
        .query_one(
            "select count(*) from cqrs.command_log where stream = 'forged'",
            &[],
        )
        .await?
        .get(0);
    ensure!(forged == 0, "the owner's code wrote the log");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_code_gains_nothing_and_leaves_nothing_behind() -> Result<()> {
    owner_code_gains_nothing(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn owner_code_gains_nothing_and_leaves_nothing_behind_portable() -> Result<()> {
    owner_code_gains_nothing(Edition::Portable).await
}
