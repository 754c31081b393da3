//! Two databases of one cluster — one with the extension, one with the portable edition, the
//! same projection in each — and their sidecars on one Redis. With the same key prefix the second
//! sidecar refuses to start (exit 2, naming the other database): the prefix is claimed for the
//! database that first used it, so that no sidecar ever reads another database's entries or
//! marks. With a prefix (and a slot) of its own, each serves its own rows, and Redis holds both.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::connect;
use cqrs_e2e::edition::{self, Edition, ADMIN};
use cqrs_e2e::rig::Rig;
use cqrs_harness::{ClusterOptions, Sidecar};

const LOANS: &str = "
create table public.loans (book text primary key, due_on text not null, rev bigint not null default 0);
select cqrs.create_projection('loans', 'public.loans', 'book', '{\"BORROW_BOOK\": {\"action\": \"upsert\", \"set\": {\"due_on\": \"$.due_on\"}}}');
";

async fn borrow(url: &str, times: usize, due_on: &str) -> Result<()> {
    let client = connect(url).await?;
    for _ in 0..times {
        client
            .execute(
                "select cqrs.append(cqrs.uuid_v7(), 'book-1', 'BORROW_BOOK', jsonb_build_object('due_on', $1::text))",
                &[&due_on],
            )
            .await?;
    }
    Ok(())
}

/// The row the sidecar serves for book-1, once it is at `rev`.
async fn served(sidecar: &Sidecar, rev: i64) -> Result<serde_json::Value> {
    let url = format!(
        "{}/v1/projections/loans/book-1?after=book-1:{rev}&timeout_ms=10000",
        sidecar.base_url()
    );
    let response = reqwest::get(&url).await?;
    let status = response.status().as_u16();
    let body = response.text().await?;
    ensure!(status == 200, "GET {url}: {status} {body}");
    Ok(serde_json::from_str(&body)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_databases_on_one_redis_never_read_each_others_rows() -> Result<()> {
    let mut rig = Rig::start_edition(Edition::Extension, ClusterOptions::default()).await?;
    let first_url = rig.pg.url();
    connect(&first_url).await?.batch_execute(LOANS).await?;
    // the second database, in the same cluster, with the portable edition installed by its owner
    rig.pg
        .psql_in("postgres", &format!("create role {ADMIN} login createrole"))?;
    rig.pg
        .psql_in("postgres", &format!("create database second owner {ADMIN}"))?;
    edition::install_portable(&rig.pg, ADMIN, "second")?;
    let second_admin = format!("postgres://{ADMIN}@127.0.0.1:{}/second", rig.pg.port());
    connect(&second_admin).await?.batch_execute(LOANS).await?;
    let second_url = rig.pg.url_for("second");

    // the same book, a different history in each
    borrow(&first_url, 12, "2030-01-01").await?;
    borrow(&second_admin, 3, "2024-06-21").await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let first = served(&rig.sidecars[0], 12).await?;
    ensure!(first["due_on"] == "2030-01-01", "first database: {first}");

    // the second database's sidecar, with the default prefix (and its own slot): refused
    let redis = rig.redis.url();
    let mut refused = Sidecar::start(
        "second-same-prefix",
        &second_url,
        &redis,
        &[("CQRS_SLOT", "cqrs_second")],
    )?;
    let code = refused.wait_exit(Duration::from_secs(30))?;
    let log = refused.log();
    ensure!(
        code == Some(2),
        "a sidecar on a prefix of another database exited with {code:?}:\n{log}"
    );
    ensure!(
        log.contains("holds the cache of another database")
            && log.contains("/second")
            && log.contains("/cqrs"),
        "the refusal does not name both databases:\n{log}"
    );

    // …and with the first database's slot: refused too, naming the slot's database
    let mut wrong_slot = Sidecar::start(
        "second-wrong-slot",
        &second_url,
        &redis,
        &[("CQRS_REDIS_PREFIX", "second")],
    )?;
    let code = wrong_slot.wait_exit(Duration::from_secs(30))?;
    let log = wrong_slot.log();
    ensure!(
        code == Some(2) && log.contains("replication slot cqrs_sidecar belongs to database"),
        "a sidecar on another database's slot exited with {code:?}:\n{log}"
    );

    // with a prefix and a slot of its own, each serves its own row
    let mut second = Sidecar::start(
        "second",
        &second_url,
        &redis,
        &[("CQRS_REDIS_PREFIX", "second"), ("CQRS_SLOT", "cqrs_second")],
    )?;
    second
        .wait_ready(Duration::from_secs(30))
        .with_context(|| second.log())?;
    let row = served(&second, 3).await?;
    ensure!(row["due_on"] == "2024-06-21", "second database: {row}");
    borrow(&first_url, 1, "2031-01-01").await?;
    borrow(&second_admin, 1, "2025-01-01").await?;
    let first = served(&rig.sidecars[0], 13).await?;
    let row = served(&second, 4).await?;
    ensure!(
        first["due_on"] == "2031-01-01" && row["due_on"] == "2025-01-01",
        "after more commands: first {first}, second {row}"
    );
    // both caches are in Redis, each under its own claimed prefix
    let claims = rig.redis.cli(&["mget", "cqrs!database", "second!database"])?;
    ensure!(
        claims.contains("/cqrs") && claims.contains("/second"),
        "the prefixes are not claimed for their databases: {claims}"
    );
    Ok(())
}
