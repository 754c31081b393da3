//! The projection engine against a real PostgreSQL: read models equal an independent fold of
//! the log however the log is delivered; wait_for wakes promptly; a rebuild loses nothing
//! committed while it runs.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use cqrs_e2e::{connect, repo_root};
use cqrs_harness::{ClusterOptions, PgCluster};
use rand::rngs::StdRng;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio_postgres::Client;
use uuid::Uuid;

async fn with_examples(cluster: &PgCluster) -> anyhow::Result<Client> {
    let client = connect(&cluster.url()).await?;
    client
        .batch_execute(&std::fs::read_to_string(
            repo_root().join("sql/examples/orders.sql"),
        )?)
        .await?;
    Ok(client)
}

/// One command as the test generates it.
#[derive(Clone, Debug)]
struct Command {
    stream: String,
    command_type: &'static str,
    payload: Value,
}

/// Random order commands, including out-of-lifecycle ones (items added to an order that was
/// never created, a second cancellation) that exercise update-of-a-missing-row semantics.
fn random_log(rng: &mut StdRng, commands: usize, orders: usize, users: usize) -> Vec<Command> {
    let mut log = Vec::with_capacity(commands);
    for _ in 0..commands {
        let order = rng.random_range(0..orders);
        let user = format!("user-{}", order % users);
        let stream = format!("order-{order}");
        let (command_type, payload) = match rng.random_range(0..10) {
            0..=1 => {
                let currency = ["EUR", "USD"][rng.random_range(0..2)];
                ("CREATE_ORDER", json!({"user_id": user, "currency": currency}))
            }
            2..=6 => {
                let qty = rng.random_range(1..=5);
                let cents = rng.random_range(1..5000);
                (
                    "ADD_ITEM",
                    json!({"user_id": user, "sku": "s", "qty": qty, "price": cents as f64 / 100.0,
                                    "amount": format!("{}.{:02}", cents * qty / 100, cents * qty % 100)}),
                )
            }
            7..=8 => {
                let carrier = ["dhl", "ups"][rng.random_range(0..2)];
                ("SHIP_ORDER", json!({"user_id": user, "carrier": carrier}))
            }
            _ => ("CANCEL_ORDER", json!({"user_id": user})),
        };
        log.push(Command {
            stream,
            command_type,
            payload,
        });
    }
    log
}

#[derive(Debug, Default, PartialEq, Clone)]
struct Order {
    user_id: String,
    currency: String,
    status: String,
    item_count: i64,
    total_cents: i64,
    carrier: Option<String>,
}

#[derive(Debug, Default, PartialEq, Clone)]
struct UserStats {
    orders: i64,
    open_orders: i64,
    shipped_orders: i64,
    cancelled_orders: i64,
    items: i64,
    spent_cents: i64,
}

fn cents(amount: &Value) -> i64 {
    let text = amount
        .as_str()
        .map(str::to_owned)
        .unwrap_or_else(|| amount.to_string());
    let (whole, fraction) = text.split_once('.').unwrap_or((&text, "0"));
    whole.parse::<i64>().unwrap_or(0) * 100 + format!("{fraction:0<2}")[..2].parse::<i64>().unwrap_or(0)
}

/// The read models by the rules of sql/examples/orders.sql, applied one command at a time.
fn fold(log: &[(String, &'static str, Value)]) -> (BTreeMap<String, Order>, BTreeMap<String, UserStats>) {
    let mut orders: BTreeMap<String, Order> = BTreeMap::new();
    let mut users: BTreeMap<String, UserStats> = BTreeMap::new();
    for (stream, command_type, payload) in log {
        let user = payload["user_id"].as_str().unwrap_or_default().to_owned();
        match *command_type {
            "CREATE_ORDER" => {
                let order = orders.entry(stream.clone()).or_default();
                order.user_id = user.clone();
                order.currency = payload["currency"].as_str().unwrap_or_default().to_owned();
                order.status = "open".into();
                let stats = users.entry(user).or_default();
                stats.orders += 1;
                stats.open_orders += 1;
            }
            "ADD_ITEM" => {
                if let Some(order) = orders.get_mut(stream) {
                    order.item_count += payload["qty"].as_i64().unwrap_or(0);
                    order.total_cents += cents(&payload["amount"]);
                }
                if let Some(stats) = users.get_mut(&user) {
                    stats.items += payload["qty"].as_i64().unwrap_or(0);
                    stats.spent_cents += cents(&payload["amount"]);
                }
            }
            "SHIP_ORDER" | "CANCEL_ORDER" => {
                let shipped = *command_type == "SHIP_ORDER";
                if let Some(order) = orders.get_mut(stream) {
                    order.status = if shipped { "shipped" } else { "cancelled" }.into();
                    if shipped {
                        order.carrier = payload["carrier"].as_str().map(str::to_owned);
                    }
                }
                if let Some(stats) = users.get_mut(&user) {
                    stats.open_orders -= 1;
                    if shipped {
                        stats.shipped_orders += 1;
                    } else {
                        stats.cancelled_orders += 1;
                    }
                }
            }
            _ => {}
        }
    }
    (orders, users)
}

async fn read_models(
    client: &Client,
) -> anyhow::Result<(BTreeMap<String, Order>, BTreeMap<String, UserStats>)> {
    let mut orders = BTreeMap::new();
    for row in client
        .query("select order_id, user_id, currency, status, item_count, (total * 100)::bigint, carrier from shop.order_summary", &[])
        .await?
    {
        orders.insert(
            row.get::<_, String>(0),
            Order {
                user_id: row.get(1),
                currency: row.get(2),
                status: row.get(3),
                item_count: i64::from(row.get::<_, i32>(4)),
                total_cents: row.get(5),
                carrier: row.get(6),
            },
        );
    }
    let mut users = BTreeMap::new();
    for row in client
        .query(
            "select user_id, orders, open_orders, shipped_orders, cancelled_orders, items, (spent * 100)::bigint from shop.user_order_stats",
            &[],
        )
        .await?
    {
        users.insert(
            row.get::<_, String>(0),
            UserStats {
                orders: i64::from(row.get::<_, i32>(1)),
                open_orders: i64::from(row.get::<_, i32>(2)),
                shipped_orders: i64::from(row.get::<_, i32>(3)),
                cancelled_orders: i64::from(row.get::<_, i32>(4)),
                items: i64::from(row.get::<_, i32>(5)),
                spent_cents: row.get(6),
            },
        );
    }
    Ok((orders, users))
}

/// Random logs, delivered in random batches — some twice, some shuffled, some held back and
/// delivered later (so streams have gaps that must park and release) — project to exactly the
/// read models an independent one-by-one fold of the log gives.
///
/// Only the order within a stream is guaranteed across batches, so the comparison must not
/// depend on the order between streams: per-order rows are fed by one stream, and every user's
/// stats row is created first (its own stream, delivered first), after which all that touches
/// it adds up, whatever the order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_models_equal_the_fold_of_the_log_however_it_is_delivered() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let client = with_examples(&cluster).await?;
    let seed: u64 = std::env::var("CQRS_PROPERTY_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: u64 = std::env::var("CQRS_PROPERTY_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(12);
    for case in 0..cases {
        let mut rng = StdRng::seed_from_u64(seed.wrapping_add(case));
        client
            .batch_execute(
                "truncate shop.order_summary, shop.user_order_stats, cqrs.command_log, cqrs.stream, cqrs.projection_stream, cqrs.parked;
                 update cqrs.projection_state set checkpoint_lsn = null, parked = 0;",
            )
            .await?;
        let commands = rng.random_range(1..400);
        let (orders, users) = (rng.random_range(1..40), rng.random_range(1..10));
        let mut log: Vec<Command> = (0..users)
            .map(|u| Command {
                stream: format!("seed-{u}"),
                command_type: "CREATE_ORDER",
                payload: json!({"user_id": format!("user-{u}"), "currency": "EUR"}),
            })
            .collect();
        log.extend(random_log(&mut rng, commands, orders, users));
        let append = client.prepare("select cqrs.append($1, $2, $3, $4)").await?;
        for command in &log {
            client
                .execute(
                    &append,
                    &[
                        &Uuid::now_v7(),
                        &command.stream,
                        &command.command_type,
                        &command.payload,
                    ],
                )
                .await?;
        }
        let rows: Vec<Value> = client
            .query(
                "select to_jsonb(l) from cqrs.command_log l order by l.position",
                &[],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();

        // the seed commands first, then the rest cut, duplicated, shuffled, held back
        let mut batches: Vec<Vec<Value>> = Vec::new();
        let project = client
            .prepare("select count(*) from cqrs.project_batch($1)")
            .await?;
        client
            .query_one(&project, &[&Value::Array(rows[..users].to_vec())])
            .await?;
        let mut start = users;
        while start < rows.len() {
            let end = (start + rng.random_range(1..60)).min(rows.len());
            batches.push(rows[start..end].to_vec());
            start = end;
        }
        let mut deliveries: Vec<Vec<Value>> = Vec::new();
        let mut held: Vec<Vec<Value>> = Vec::new();
        for mut batch in batches {
            if rng.random_bool(0.3) {
                batch.shuffle(&mut rng);
            }
            if rng.random_bool(0.15) {
                held.push(batch);
                continue;
            }
            if rng.random_bool(0.2) {
                deliveries.push(batch.clone());
            }
            deliveries.push(batch);
            if !held.is_empty() && rng.random_bool(0.3) {
                deliveries.push(held.remove(0));
            }
        }
        deliveries.extend(held);
        for batch in &deliveries {
            client
                .query_one(&project, &[&Value::Array(batch.clone())])
                .await?;
        }

        // appended one at a time by one session: the log order is the order of `log`
        let ordered: Vec<(String, &'static str, Value)> = log
            .iter()
            .map(|c| (c.stream.clone(), c.command_type, c.payload.clone()))
            .collect();
        let expected = fold(&ordered);
        let actual = read_models(&client).await?;
        assert_eq!(
            actual.0,
            expected.0,
            "order_summary differs (seed {seed}, case {case}, {} deliveries)",
            deliveries.len()
        );
        assert_eq!(
            actual.1, expected.1,
            "user_order_stats differs (seed {seed}, case {case})"
        );
        let status = client
            .query(
                "select projection, events_behind, parked, halted from cqrs.status()",
                &[],
            )
            .await?;
        for row in status {
            let (name, behind, parked, halted): (String, i64, i64, bool) =
                (row.get(0), row.get(1), row.get(2), row.get(3));
            assert_eq!(
                (behind, parked, halted),
                (0, 0, false),
                "{name} not caught up (seed {seed}, case {case})"
            );
        }
    }
    Ok(())
}

/// A session waiting in cqrs.wait_for wakes within 50 ms of the commit that projects its
/// command (it sleeps on its latch; the committing projector sets it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_for_wakes_within_50_ms_of_the_projecting_commit() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let projector = with_examples(&cluster).await?;
    let waiter = connect(&cluster.url()).await?;
    let mut worst = Duration::ZERO;
    for round in 1..=8i64 {
        let stream = format!("order-w{round}");
        projector
            .execute("select cqrs.append(cqrs.uuid_v7(), $1, 'CREATE_ORDER', '{\"user_id\": \"u\", \"currency\": \"EUR\"}')", &[&stream])
            .await?;
        let wait = {
            let stream = stream.clone();
            let waiter = &waiter;
            async move {
                let row = waiter
                    .query_one("select cqrs.wait_for($1, 1, 'order_summary', '5 s')", &[&stream])
                    .await?;
                anyhow::Ok((row.get::<_, bool>(0), Instant::now()))
            }
        };
        let project = async {
            // let the waiter block first
            tokio::time::sleep(Duration::from_millis(150)).await;
            projector
                .query("select * from cqrs.project_batch((select jsonb_agg(to_jsonb(l)) from cqrs.command_log l where l.stream = $1))", &[&stream])
                .await?;
            anyhow::Ok(Instant::now())
        };
        let (waited, committed) = tokio::join!(wait, project);
        let ((applied, woke), committed) = (waited?, committed?);
        assert!(applied, "wait_for must answer true once the command is projected");
        let delay = woke.saturating_duration_since(committed);
        worst = worst.max(delay);
        assert!(
            delay < Duration::from_millis(50),
            "round {round}: woke {delay:?} after the commit"
        );
    }
    eprintln!("wait_for woke at worst {worst:?} after the projecting commit");
    Ok(())
}

/// Commands appended while a rebuild runs are all in the read model once the rebuild and the
/// next catch-up are done: nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rebuild_loses_nothing_committed_while_it_runs() -> anyhow::Result<()> {
    let cluster = PgCluster::start(ClusterOptions::default())?;
    let client = with_examples(&cluster).await?;
    let mut rng = StdRng::seed_from_u64(7);
    let log = random_log(&mut rng, 3000, 300, 40);
    let append = client.prepare("select cqrs.append($1, $2, $3, $4)").await?;
    for command in &log[..2000] {
        client
            .execute(
                &append,
                &[
                    &Uuid::now_v7(),
                    &command.stream,
                    &command.command_type,
                    &command.payload,
                ],
            )
            .await?;
    }
    let writer = connect(&cluster.url()).await?;
    let late = log[2000..].to_vec();
    let appending = tokio::spawn(async move {
        let append = writer.prepare("select cqrs.append($1, $2, $3, $4)").await?;
        for command in &late {
            writer
                .execute(
                    &append,
                    &[
                        &Uuid::now_v7(),
                        &command.stream,
                        &command.command_type,
                        &command.payload,
                    ],
                )
                .await?;
        }
        anyhow::Ok(())
    });
    let rebuilder = connect(&cluster.url()).await?;
    // small chunks so that the rebuild takes a while and overlaps the appends
    rebuilder
        .query("select * from cqrs.rebuild('order_summary', chunk => 50)", &[])
        .await?;
    rebuilder
        .query("select * from cqrs.rebuild('user_order_stats', chunk => 50)", &[])
        .await?;
    appending.await??;
    client.query("select * from cqrs.catch_up()", &[]).await?;

    let rows = client
        .query(
            "select stream, command_type, payload from cqrs.command_log order by position",
            &[],
        )
        .await?;
    let ordered: Vec<(String, &'static str, Value)> = rows
        .iter()
        .map(|r| {
            let command_type: String = r.get(1);
            let command_type: &'static str = match command_type.as_str() {
                "CREATE_ORDER" => "CREATE_ORDER",
                "ADD_ITEM" => "ADD_ITEM",
                "SHIP_ORDER" => "SHIP_ORDER",
                _ => "CANCEL_ORDER",
            };
            (r.get(0), command_type, r.get(2))
        })
        .collect();
    assert_eq!(ordered.len(), 3000);
    let expected = fold(&ordered);
    let actual = read_models(&client).await?;
    assert_eq!(actual.0, expected.0, "order_summary after rebuild + catch-up");
    assert_eq!(actual.1, expected.1, "user_order_stats after rebuild + catch-up");
    Ok(())
}
