//! What operators see tells the truth and keeps secrets, in both editions.
//!
//! A command whose value a read model's CHECK constraint refuses halts one projection and is
//! dead-lettered by another. Its payload holds a marker; afterwards the marker is in no log —
//! the sidecar's, the server's — in no read API response and in no error or status text a
//! reader or the sidecar gets, and it is kept whole where only the installer (and the
//! projector, which reads the log anyway) can read it. `/readyz` stays 200 while a projection is
//! halted (it names it; alerting pages on `cqrs_projection_halted`) and turns 503 while the read
//! pool refuses every cache miss; every connection the sidecar opens is named.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::{self, Edition};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::{connect, eventually};
use cqrs_harness::ClusterOptions;
use cqrs_sidecar::metrics;

const MEMOS: &str = "
create table public.memos (memo_id text primary key, memo text not null check (length(memo) <= 40), rev bigint not null default 0);
create table public.memo_archive (memo_id text primary key, memo text not null check (length(memo) <= 40), rev bigint not null default 0);
select cqrs.create_projection('memos', 'public.memos', 'memo_id', '{\"MEMO\": {\"action\": \"upsert\", \"set\": {\"memo\": \"$.memo\"}}}');
select cqrs.create_projection('memo_archive', 'public.memo_archive', 'memo_id', '{\"MEMO\": {\"action\": \"upsert\", \"set\": {\"memo\": \"$.memo\"}}}', on_error => 'dead_letter');
grant select on public.memos, public.memo_archive to cqrs_reader;
";

async fn secrets_stay_out_of_logs_and_responses(edition: Edition) -> Result<()> {
    // PostgreSQL shortens a failing row in its error detail: the first characters find it
    let marker = format!("MARKER-{}", &uuid::Uuid::new_v4().simple().to_string()[..8]);
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let installer = connect(&edition::owner_url(&rig.pg, edition)).await?;
    installer.batch_execute(MEMOS).await?;
    rig.set("CQRS_EXPOSE", "memos,memo_archive");
    rig.set("CQRS_READ_AUTH", "none");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let superuser = rig.client().await?;
    superuser
        .batch_execute("create role memo_reader login in role cqrs_reader")
        .await?;
    installer
        .batch_execute(&format!(
            "select cqrs.append(cqrs.uuid_v7(), 'memo-1', 'MEMO', '{{\"memo\": \"fine\"}}');
             select cqrs.append(cqrs.uuid_v7(), 'memo-2', 'MEMO', '{{\"memo\": \"private: card 4111 1111 1111 1111 {marker}\"}}');"
        ))
        .await?;
    eventually(
        Duration::from_secs(20),
        "memos halts and memo_archive dead-letters",
        || async {
            let row = superuser
                .query_one(
                    "select (select halted from cqrs.projection_state where name = 'memos'),
                        (select count(*) from cqrs.dead_letter where projection = 'memo_archive')",
                    &[],
                )
                .await?;
            ensure!(row.get::<_, bool>(0) && row.get::<_, i64>(1) == 1, "not yet");
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;

    // what the read API answers about the halted projection
    let http = reqwest::Client::new();
    let base = rig.http(0);
    let mut bodies = Vec::new();
    for path in [
        "/v1/projections/memos/memo-2?after=memo-2:1&timeout_ms=500",
        "/v1/projections/memos/memo-1?after=memo-1:1&timeout_ms=500",
        "/v1/projections/memos/memo-2",
        "/v1/projections/memo_archive/memo-2?after=memo-2:1&timeout_ms=500",
    ] {
        let response = http.get(format!("{base}{path}")).send().await?;
        let status = response.status().as_u16();
        bodies.push((path, status, response.text().await?));
    }
    ensure!(
        bodies[0].1 == 503 && bodies[0].2.contains("projection_halted"),
        "a wait on the halted projection: {:?}",
        bodies[0]
    );
    // what SQL tells a reader and the sidecar's role
    let reader = connect(&edition::url_as(&rig.pg, "memo_reader")).await?;
    let waited = reader
        .query("select cqrs.wait_for('memo-2', 1, 'memos', '100 ms')", &[])
        .await
        .err()
        .and_then(|e| {
            e.as_db_error()
                .map(|db| format!("{} {:?} {:?}", db.message(), db.detail(), db.hint()))
        })
        .context("wait_for on a halted projection did not fail")?;
    let status: String = reader
        .query_one(
            "select string_agg(concat_ws(' ', projection, last_error, last_error_sqlstate), '; ') from cqrs.status()",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        status.contains("23514") && status.contains("memos_memo_check"),
        "cqrs.status() does not say why memos halted: {status}"
    );
    let projector = connect(&rig.sidecar_url).await?;
    let dead: String = projector
        .query_one("select string_agg(error, '; ') from cqrs.dead_letter", &[])
        .await?
        .get(0);
    // resumed: it halts again, and says so
    installer
        .batch_execute("select count(*) from cqrs.resume('memos')")
        .await?;

    // nothing the operators, the readers and the logs see holds the value…
    let server_log = std::fs::read_to_string(rig.pg.log_path()).unwrap_or_default();
    let sidecar_log = rig.logs();
    for (what, text) in [
        ("the server's log", server_log.as_str()),
        ("the sidecar's log", sidecar_log.as_str()),
        ("wait_for's error", waited.as_str()),
        ("cqrs.status()", status.as_str()),
        ("the dead letter's error", dead.as_str()),
    ]
    .into_iter()
    .chain(bodies.iter().map(|(path, _, body)| (*path, body.as_str())))
    {
        ensure!(
            !text.contains(&marker),
            "{what} holds the command's value:\n{text}"
        );
    }
    ensure!(
        sidecar_log.contains("projection memos halted") && sidecar_log.contains("WARN"),
        "the sidecar did not log the halt as a warning:\n{sidecar_log}"
    );
    // …and it is kept whole where the installer looks
    let kept: String = superuser
        .query_one(
            "select (select last_error_detail from cqrs.projection_state where name = 'memos')
                    || (select error_detail from cqrs.dead_letter where projection = 'memo_archive')",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        kept.matches(marker.as_str()).count() == 2,
        "the whole error is lost: {kept}"
    );
    let denied = reader
        .query("select last_error_detail from cqrs.projection_state", &[])
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        denied.as_deref() == Some("42501"),
        "a reader read the whole error: {denied:?}"
    );

    // a halt does not make the sidecar unready: /readyz names it, the metric pages
    let sidecar = &rig.sidecars[0];
    eventually(
        Duration::from_secs(10),
        "the metric and /readyz show the halt",
        || async {
            let (status, body) =
                cqrs_harness::sidecar::http_get(sidecar.admin_port(), "/readyz", Duration::from_secs(2))?;
            let halted = sidecar.metrics()?;
            ensure!(
                status == 200
                    && body.contains("memos")
                    && halted.contains(&format!(
                        "{}{{projection=\"memos\"}} 1",
                        metrics::PROJECTION_HALTED
                    )),
                "/readyz {status} {body}"
            );
            Ok(())
        },
    )
    .await?;

    // every connection the sidecar opened is named for what it is for
    let names: Vec<String> = superuser
        .query(
            "select distinct application_name from pg_stat_activity
              where usename = (select rolname from pg_roles where oid = (select usesysid from pg_stat_activity
                                                                         where application_name = 'cqrs-sidecar/flush' limit 1))
                and application_name <> '' order by 1",
            &[],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    for purpose in ["flush", "lease", "read", "replication", "status", "waits"] {
        ensure!(
            names.contains(&format!("cqrs-sidecar/{purpose}")),
            "no connection named cqrs-sidecar/{purpose}: {names:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_values_stay_out_of_logs_and_responses() -> Result<()> {
    secrets_stay_out_of_logs_and_responses(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn command_values_stay_out_of_logs_and_responses_portable() -> Result<()> {
    secrets_stay_out_of_logs_and_responses(Edition::Portable).await
}

/// A sidecar whose read pool refuses every cache miss for a second is not ready — a load
/// balancer should send its reads elsewhere — and is ready again once misses are served.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_exhausted_read_pool_makes_the_sidecar_unready() -> Result<()> {
    let mut rig = Rig::start_edition(Edition::Extension, ClusterOptions::default()).await?;
    rig.set("CQRS_READ_POOL_SIZE", "1");
    rig.set("CQRS_READ_PG_QUEUE_TIMEOUT", "20ms");
    rig.set("CQRS_READ_PG_TIMEOUT", "10s");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let admin = rig.sidecars[0].admin_port();
    let base = format!("{}/v1/projections/order_summary", rig.http(0));
    // the one pooled connection waits behind a lock on the read model
    let locker = rig.client().await?;
    locker
        .batch_execute("begin; lock table shop.order_summary in access exclusive mode")
        .await?;
    let http = reqwest::Client::new();
    let stuck = tokio::spawn({
        let (http, url) = (http.clone(), format!("{base}/absent-0"));
        async move { http.get(url).send().await.map(|r| r.status().as_u16()) }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut refused = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut unready = None;
    while std::time::Instant::now() < deadline {
        if http
            .get(format!("{base}/absent-{refused}x"))
            .send()
            .await?
            .status()
            == 503
        {
            refused += 1;
        }
        let (status, body) = cqrs_harness::sidecar::http_get(admin, "/readyz", Duration::from_secs(2))?;
        if status == 503 {
            unready = Some(body);
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let why = unready.context("/readyz stayed 200 while every cache miss was refused")?;
    ensure!(why.contains("read pool"), "/readyz says {why}");
    ensure!(refused > 0, "no cache miss was refused");
    locker.batch_execute("rollback").await?;
    ensure!(stuck.await?? == 404, "the waiting read did not finish");
    http.get(format!("{base}/absent-after")).send().await?;
    let (status, body) = cqrs_harness::sidecar::http_get(admin, "/readyz", Duration::from_secs(2))?;
    ensure!(status == 200, "/readyz after the lock: {status} {body}");
    Ok(())
}
