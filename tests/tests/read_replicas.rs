//! Cache misses served by a streaming replica (`--read-replica-urls`): a real hot standby made
//! with `pg_basebackup -R`, its replay paused with `pg_wal_replay_pause()` while writes go on.
//! A read-your-writes read (`?after=`) never answers older than the awaited write; a plain miss
//! is read from the replica only while it is within the staleness bound; the primary answers
//! otherwise, and the replica's lag is a metric.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::orders::{self, seed_commands, Command};
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_e2e::{connect, eventually};
use cqrs_harness::{http_get, ClusterOptions, PgCluster};
use cqrs_sidecar::metrics;
use serde_json::{json, Value};

static ONE_AT_A_TIME: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn replica_queries(rig: &Rig, replica: &PgCluster) -> f64 {
    let name = format!(
        "{}{{replica=\"127.0.0.1:{}/{}\"}}",
        metrics::READ_REPLICA_QUERIES_TOTAL,
        replica.port(),
        replica.database()
    );
    rig.sidecars[0].metric(&name).unwrap_or(0.0)
}

/// The order's row as the primary has it, as JSON.
async fn primary_row(rig: &Rig, order: &str) -> Result<Value> {
    let row = rig
        .client()
        .await?
        .query_one(
            "select row_to_json(o)::text from shop.order_summary o where order_id = $1",
            &[&order],
        )
        .await?;
    Ok(serde_json::from_str(&row.get::<_, String>(0))?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_come_from_a_replica_only_when_it_has_replayed_far_enough() -> Result<()> {
    misses_come_from_a_replica_on(Edition::Extension).await
}

/// The same on the portable edition, the sidecar reading the replica as the role a managed
/// service gives it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn misses_come_from_a_replica_only_when_it_has_replayed_far_enough_portable() -> Result<()> {
    misses_come_from_a_replica_on(Edition::Portable).await
}

async fn misses_come_from_a_replica_on(edition: Edition) -> Result<()> {
    let _serial = ONE_AT_A_TIME.lock().await;
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let replica = rig.pg.start_replica()?;
    // the sidecar's own role, on the replica's port
    let replica_url = rig
        .sidecar_url
        .replace(&format!(":{}/", rig.pg.port()), &format!(":{}/", replica.port()));
    ensure!(replica_url != rig.sidecar_url, "no port in {}", rig.sidecar_url);
    rig.set("CQRS_READ_REPLICA_URLS", &replica_url);
    rig.set("CQRS_READ_REPLICA_MAX_STALENESS", "1s");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    let mut commands = seed_commands(2);
    for o in 0..20 {
        commands.push(Command {
            stream: format!("order-{o}"),
            command_type: "CREATE_ORDER",
            payload: json!({"user_id": "user-1", "currency": "EUR"}),
        });
    }
    orders::append_all(&client, &commands, 100).await?;
    rig.assert_consistent(Duration::from_secs(30)).await?;
    let port = rig.sidecars[0].http_port();
    let timeout = Duration::from_secs(10);

    // a miss while the replica keeps up: the replica answers
    let replica_client = connect(&replica.url()).await?;
    eventually(
        Duration::from_secs(10),
        "a miss answered by the replica",
        || async {
            rig.redis
                .cli(&["DEL", &format!("{PREFIX}:order_summary:order-1")])?;
            let (status, body) = http_get(port, "/v1/projections/order_summary/order-1", timeout)?;
            ensure!(status == 200, "{status} {body}");
            ensure!(
                replica_queries(&rig, &replica) >= 1.0,
                "the primary answered; the sidecar's replica metrics: {:?}",
                rig.sidecars[0]
                    .metrics()?
                    .lines()
                    .filter(|l| l.starts_with("cqrs_read_replica"))
                    .collect::<Vec<_>>()
            );
            Ok(())
        },
    )
    .await?;

    // replay paused: writes go on, read-your-writes reads must see each one
    replica_client
        .execute("select pg_catalog.pg_wal_replay_pause()", &[])
        .await?;
    let before_pause = replica_queries(&rig, &replica);
    for i in 0..10 {
        let order = format!("order-{}", i % 5);
        let seq: i64 = client
            .query_one(
                "select seq from cqrs.append(cqrs.uuid_v7(), $1, 'ADD_ITEM', '{\"user_id\": \"user-1\", \"sku\": \"s\", \"qty\": 1, \"price\": 2, \"amount\": 2}')",
                &[&order],
            )
            .await?
            .get(0);
        // drop the entry so that the read is a miss, not the projector's fresh write
        rig.redis
            .cli(&["DEL", &format!("{PREFIX}:order_summary:{order}")])?;
        let (status, body) = http_get(
            port,
            &format!("/v1/projections/order_summary/{order}?after={order}:{seq}"),
            timeout,
        )?;
        ensure!(status == 200, "after={order}:{seq}: {status} {body}");
        let answered: Value = serde_json::from_str(&body).with_context(|| body.clone())?;
        let primary = primary_row(&rig, &order).await?;
        ensure!(
            answered == primary,
            "after={order}:{seq} answered {answered} while the primary has {primary}"
        );
    }
    ensure!(
        replica_queries(&rig, &replica) == before_pause,
        "the paused replica answered a read-your-writes read"
    );
    // the replica is now behind by more than the bound: plain misses go to the primary too
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    rig.redis
        .cli(&["DEL", &format!("{PREFIX}:order_summary:order-2")])?;
    let (status, body) = http_get(port, "/v1/projections/order_summary/order-2", timeout)?;
    ensure!(status == 200);
    ensure!(serde_json::from_str::<Value>(&body)? == primary_row(&rig, "order-2").await?);
    ensure!(
        replica_queries(&rig, &replica) == before_pause,
        "a replica past the staleness bound answered"
    );
    let lag = rig.sidecars[0].metric(&format!(
        "{}{{replica=\"127.0.0.1:{}/{}\"}}",
        metrics::READ_REPLICA_LAG_SECONDS,
        replica.port(),
        replica.database()
    ))?;
    ensure!(lag > 1.0, "the paused replica's lag reads {lag}");

    // replay resumed: the replica catches up and answers again
    replica_client
        .execute("select pg_catalog.pg_wal_replay_resume()", &[])
        .await?;
    eventually(Duration::from_secs(10), "the replica answers again", || async {
        rig.redis
            .cli(&["DEL", &format!("{PREFIX}:order_summary:order-3")])?;
        let (status, body) = http_get(port, "/v1/projections/order_summary/order-3", timeout)?;
        ensure!(status == 200);
        ensure!(serde_json::from_str::<Value>(&body)? == primary_row(&rig, "order-3").await?);
        ensure!(
            replica_queries(&rig, &replica) > before_pause,
            "the primary answered"
        );
        Ok(())
    })
    .await?;
    rig.assert_consistent(Duration::from_secs(30)).await
}
