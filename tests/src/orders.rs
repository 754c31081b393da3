//! The example order read models (sql/examples/orders.sql): random command logs, and the read
//! models computed independently of pg_cqrs by folding a log one command at a time.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::Rng;
use serde_json::{json, Value};
use tokio_postgres::Client;

/// One command as the test generates it.
#[derive(Clone, Debug)]
pub struct Command {
    pub stream: String,
    pub command_type: &'static str,
    pub payload: Value,
}

/// Random order commands, including out-of-lifecycle ones (items added to an order that was
/// never created, a second cancellation) that exercise update-of-a-missing-row semantics.
pub fn random_log(rng: &mut StdRng, commands: usize, orders: usize, users: usize) -> Vec<Command> {
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
pub struct Order {
    pub user_id: String,
    pub currency: String,
    pub status: String,
    pub item_count: i64,
    pub total_cents: i64,
    pub carrier: Option<String>,
}

#[derive(Debug, Default, PartialEq, Clone)]
pub struct UserStats {
    pub orders: i64,
    pub open_orders: i64,
    pub shipped_orders: i64,
    pub cancelled_orders: i64,
    pub items: i64,
    pub spent_cents: i64,
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
pub fn fold(log: &[(String, &'static str, Value)]) -> (BTreeMap<String, Order>, BTreeMap<String, UserStats>) {
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

pub async fn read_models(
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

/// One `CREATE_ORDER` per user, so that every user's stats row exists before anything else
/// touches it (after which all that touches it adds up, in any order).
pub fn seed_commands(users: usize) -> Vec<Command> {
    (0..users)
        .map(|u| Command {
            stream: format!("seed-{u}"),
            command_type: "CREATE_ORDER",
            payload: json!({"user_id": format!("user-{u}"), "currency": "EUR"}),
        })
        .collect()
}

/// The log as stored, in log order.
pub async fn log_from_db(client: &Client) -> anyhow::Result<Vec<(String, &'static str, Value)>> {
    let rows = client
        .query(
            "select stream, command_type, payload from cqrs.command_log order by position",
            &[],
        )
        .await?;
    Ok(rows
        .iter()
        .map(|r| {
            let command_type: String = r.get(1);
            let command_type: &'static str = match command_type.as_str() {
                "CREATE_ORDER" => "CREATE_ORDER",
                "ADD_ITEM" => "ADD_ITEM",
                "SHIP_ORDER" => "SHIP_ORDER",
                "CANCEL_ORDER" => "CANCEL_ORDER",
                _ => "OTHER",
            };
            (r.get(0), command_type, r.get(2))
        })
        .collect())
}

/// Appends `commands` in batches of `per_call` through cqrs.append_batch.
pub async fn append_all(client: &Client, commands: &[Command], per_call: usize) -> anyhow::Result<()> {
    for chunk in commands.chunks(per_call.max(1)) {
        let batch: Vec<Value> = chunk
            .iter()
            .map(|c| json!({"command_id": uuid::Uuid::now_v7().to_string(), "stream": c.stream, "command_type": c.command_type, "payload": c.payload}))
            .collect();
        client
            .query("select 1 from cqrs.append_batch($1)", &[&Value::Array(batch)])
            .await?;
    }
    Ok(())
}

/// The read models equal the fold of the log in the database.
pub async fn assert_read_models_match_the_log(client: &Client) -> anyhow::Result<()> {
    let expected = fold(&log_from_db(client).await?);
    let actual = read_models(client).await?;
    if actual.0 != expected.0 {
        let differing: Vec<&String> = expected
            .0
            .keys()
            .filter(|k| actual.0.get(*k) != expected.0.get(*k))
            .take(5)
            .collect();
        anyhow::bail!(
            "order_summary differs from the fold of the log ({} vs {} rows; e.g. {differing:?})",
            actual.0.len(),
            expected.0.len()
        );
    }
    if actual.1 != expected.1 {
        anyhow::bail!(
            "user_order_stats differs from the fold of the log: {:?} vs {:?}",
            actual.1,
            expected.1
        );
    }
    Ok(())
}

/// Makes every write to `shop.order_summary` sleep `seconds` (a trigger of the table's owner, so
/// `owner` must be that owner's connection): a projection that falls behind on purpose.
pub async fn slow_down_order_summary(owner: &Client, seconds: f64) -> anyhow::Result<()> {
    owner
        .batch_execute(&format!(
            "create function shop.slowly() returns trigger language plpgsql as
                 $$ begin perform pg_catalog.pg_sleep({seconds}); return new; end $$;
             create trigger slowly before insert or update on shop.order_summary
                 for each row execute function shop.slowly();"
        ))
        .await?;
    Ok(())
}
