//! The example order workload: each order is a stream `order-<n>` whose commands follow the
//! lifecycle CREATE_ORDER → ADD_ITEM × k → SHIP_ORDER | CANCEL_ORDER. Used by the demo, the
//! benchmarks and the load tool.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

/// JSON Schemas of the example command types (also in `sql/examples/orders.sql`).
/// sql/examples/order_commands.sql: the order commands' JSON Schemas, one source for users,
/// the demo and the benchmarks.
const ORDER_COMMANDS_SQL: &str = include_str!("../../sql/examples/order_commands.sql");

/// The (command type, JSON Schema) pairs registered by sql/examples/order_commands.sql.
pub fn command_types() -> Vec<(&'static str, &'static str)> {
    ORDER_COMMANDS_SQL
        .split("select cqrs.register_command_type('")
        .skip(1)
        .filter_map(|part| {
            let (name, rest) = part.split_once("', $schema$")?;
            let (schema, _) = rest.split_once("$schema$")?;
            Some((name, schema.trim()))
        })
        .collect()
}

/// One command to append.
#[derive(Clone, Debug)]
pub struct OrderCommand {
    pub stream: String,
    pub command_type: &'static str,
    pub payload: Value,
}

/// Where one order is in its lifecycle.
#[derive(Clone, Debug)]
struct Order {
    stream: String,
    user_id: String,
    items_left: u32,
    done: bool,
}

/// Generates order commands for many concurrent orders, in a valid per-stream order.
pub struct OrderGenerator {
    rng: StdRng,
    next_order: u64,
    open: Vec<Order>,
    users: u64,
    open_target: usize,
}

const SKUS: &[&str] = &[
    "apple", "bread", "coffee", "dates", "eggs", "flour", "grapes", "honey",
];
const CARRIERS: &[&str] = &["dhl", "ups", "postnl"];

impl OrderGenerator {
    /// `first_order` keeps streams of several generators apart; `open_target` is how many orders
    /// are in progress at once (how interleaved the streams are).
    pub fn new(seed: u64, first_order: u64, users: u64, open_target: usize) -> Self {
        Self {
            rng: StdRng::seed_from_u64(seed),
            next_order: first_order,
            open: Vec::new(),
            users,
            open_target,
        }
    }

    /// A user id with a skewed distribution: a few users place many orders.
    fn user(&mut self) -> String {
        let u: f64 = self.rng.random();
        let id = ((self.users as f64).powf(u) as u64).clamp(1, self.users);
        format!("user-{id}")
    }

    pub fn next_command(&mut self) -> OrderCommand {
        if self.open.len() < self.open_target {
            let user_id = self.user();
            let stream = format!("order-{}", self.next_order);
            self.next_order += 1;
            let items_left = self.rng.random_range(1..=5);
            let currency = ["EUR", "USD", "GBP"][self.rng.random_range(0..3)];
            self.open.push(Order {
                stream: stream.clone(),
                user_id: user_id.clone(),
                items_left,
                done: false,
            });
            return OrderCommand {
                stream,
                command_type: "CREATE_ORDER",
                payload: json!({"user_id": user_id, "currency": currency}),
            };
        }
        let index = self.rng.random_range(0..self.open.len());
        let sku = SKUS[self.rng.random_range(0..SKUS.len())];
        let qty = self.rng.random_range(1..=4);
        let cents = self.rng.random_range(100..10_000);
        let price = f64::from(cents) / 100.0;
        // the line amount, computed in cents so that it is exact
        let amount = f64::from(cents * qty) / 100.0;
        let cancel = self.rng.random_bool(0.2);
        let carrier = CARRIERS[self.rng.random_range(0..CARRIERS.len())];
        let order = &mut self.open[index];
        let command = if order.items_left > 0 {
            order.items_left -= 1;
            OrderCommand {
                stream: order.stream.clone(),
                command_type: "ADD_ITEM",
                payload: json!({"user_id": order.user_id, "sku": sku, "qty": qty, "price": price, "amount": amount}),
            }
        } else {
            order.done = true;
            if cancel {
                OrderCommand {
                    stream: order.stream.clone(),
                    command_type: "CANCEL_ORDER",
                    payload: json!({"user_id": order.user_id, "reason": "changed mind"}),
                }
            } else {
                OrderCommand {
                    stream: order.stream.clone(),
                    command_type: "SHIP_ORDER",
                    payload: json!({"user_id": order.user_id, "carrier": carrier}),
                }
            }
        };
        if self.open[index].done {
            self.open.swap_remove(index);
        }
        command
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn every_order_follows_its_lifecycle() {
        let mut generator = OrderGenerator::new(7, 1, 100, 20);
        let mut seen: HashMap<String, Vec<&'static str>> = HashMap::new();
        for _ in 0..5_000 {
            let command = generator.next_command();
            seen.entry(command.stream).or_default().push(command.command_type);
        }
        assert!(seen.len() > 100);
        for (stream, types) in seen {
            assert_eq!(types[0], "CREATE_ORDER", "{stream}: {types:?}");
            let ends = types
                .iter()
                .filter(|t| **t == "SHIP_ORDER" || **t == "CANCEL_ORDER")
                .count();
            assert!(ends <= 1, "{stream}: {types:?}");
            if ends == 1 {
                assert!(
                    matches!(types.last(), Some(&"SHIP_ORDER") | Some(&"CANCEL_ORDER")),
                    "{stream}: {types:?}"
                );
            }
            assert!(
                types[1..].iter().all(|t| *t != "CREATE_ORDER"),
                "{stream}: {types:?}"
            );
        }
    }

    #[test]
    fn generated_payloads_match_the_registered_schemas() {
        let types = command_types();
        assert_eq!(
            types.len(),
            4,
            "sql/examples/order_commands.sql has four command types"
        );
        let validators: HashMap<&str, jsonschema::Validator> = types
            .iter()
            .map(|(name, schema)| {
                let schema: Value = serde_json::from_str(schema).expect("schema parses");
                (
                    *name,
                    jsonschema::validator_for(&schema).expect("schema compiles"),
                )
            })
            .collect();
        let mut generator = OrderGenerator::new(3, 1, 50, 10);
        for _ in 0..2_000 {
            let command = generator.next_command();
            let validator = &validators[command.command_type];
            assert!(validator.is_valid(&command.payload), "{command:?}");
        }
    }
}
