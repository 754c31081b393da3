//! The projection-name rule is written once per language — `cqrs._is_projection_name` in SQL
//! (sql/core/projection.sql), `cqrs_projection::name::is_valid` in Rust — and the two agree on
//! every name below, edge cases and random ones; so do the two projection-group rules
//! (`cqrs._is_projection_group`, `cqrs_projection::name::group::is_valid`).

use anyhow::{ensure, Result};
use cqrs_harness::{ClusterOptions, PgCluster};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sql_and_rust_agree_on_what_a_projection_may_be_called() -> Result<()> {
    let pg = PgCluster::start(ClusterOptions::default())?;
    let client = cqrs_e2e::connect(&pg.url()).await?;
    let mut names: Vec<String> = [
        "order_summary",
        "v2.orders-by-user",
        "A",
        "0",
        "_",
        "-",
        ".",
        "",
        "with space",
        "a:b",
        "a/b",
        "ä",
        "{x}",
        "a*",
        "a\nb",
        "ÿ",
        "Ω",
        "a'b",
        "a\"b",
        "a\\b",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    names.push("x".repeat(63));
    names.push("x".repeat(64));
    names.push("é".repeat(31));
    let mut rng = StdRng::seed_from_u64(22);
    let alphabet: Vec<char> = "abcXYZ019_.-: /*é\tΩ".chars().collect();
    for _ in 0..2_000 {
        let len = rng.random_range(0..70);
        names.push(
            (0..len)
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect(),
        );
    }
    names.extend(["default", "Default", "a", "a1", "1a", "_a", "g_2"].map(str::to_owned));
    names.push("g".repeat(40));
    names.push("g".repeat(41));
    let group_alphabet: Vec<char> = "abz09_A".chars().collect();
    for _ in 0..500 {
        let len = rng.random_range(0..45);
        names.push(
            (0..len)
                .map(|_| group_alphabet[rng.random_range(0..group_alphabet.len())])
                .collect(),
        );
    }
    let rows = client
        .query(
            "select n, cqrs._is_projection_name(n), cqrs._is_projection_group(n) from unnest($1::text[]) as u(n)",
            &[&names],
        )
        .await?;
    let mut disagreements = Vec::new();
    let mut groups = 0;
    for row in rows {
        let (name, sql, group): (String, bool, bool) = (row.get(0), row.get(1), row.get(2));
        if sql != cqrs_projection::name::is_valid(&name) {
            disagreements.push(format!("{name:?}: SQL {sql}"));
        }
        if group != cqrs_projection::name::group::is_valid(&name) {
            disagreements.push(format!("{name:?} as a group: SQL {group}"));
        }
        groups += usize::from(group);
    }
    // the random names must also hold valid group names, or the group rule is barely tested
    ensure!(groups > 20, "only {groups} valid group names were tried");
    ensure!(
        disagreements.is_empty(),
        "SQL and Rust disagree: {disagreements:?}"
    );
    Ok(())
}
