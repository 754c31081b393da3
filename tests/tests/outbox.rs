//! The outbox against a real NATS JetStream (Debian's nats-server, started on loopback): real
//! PostgreSQL, Redis and sidecar processes, the broker and the leaders killed with SIGKILL, an
//! event the broker refuses. Every test ends with what a subscriber reads back from JetStream:
//! every logged command exactly once, each stream's commands in seq order.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::sinks::{delivered, halted_at};
use cqrs_e2e::{fault_seed, lag};
use cqrs_harness::edition::Edition;
use cqrs_harness::outbox_check::{check, received};
use cqrs_harness::{ClusterOptions, NatsServer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// The JetStream stream the sinks of these tests publish to (the sidecar's default).
const JS_STREAM: &str = "CQRS_EVENTS";

/// A rig whose sidecars deliver to sink `events` on `nats`, with one sidecar leading: its index.
async fn rig_with_sink(nats: &NatsServer, edition: Edition) -> Result<(Rig, usize)> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.set("CQRS_SINKS", &format!("events={}", nats.url()));
    rig.add_sidecar()?;
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    Ok((rig, leader))
}

/// 50,000 commands from four writers while the leader is killed three times and nats-server
/// once (SIGKILL, restarted on its store): every command reaches JetStream once, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_commands_reach_nats_once_each_in_stream_order() -> Result<()> {
    commands_reach_nats_on(Edition::Extension, 50_000).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_reach_nats_once_each_in_stream_order_portable() -> Result<()> {
    commands_reach_nats_on(Edition::Portable, 10_000).await
}

async fn commands_reach_nats_on(edition: Edition, commands: usize) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let mut nats = NatsServer::start()?;
    let (mut rig, _) = rig_with_sink(&nats, edition).await?;
    rig.add_sidecar()?;
    let started = Instant::now();
    let traffic = rig.start_order_traffic(&mut rng, commands, 4, None).await?;
    for kill in 0..4 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
        if kill == 2 {
            nats.kill();
            tokio::time::sleep(Duration::from_secs(2)).await;
            nats.restart()?;
            continue;
        }
        let leader = rig.wait_for_leader(Duration::from_secs(10))?;
        rig.sidecars[leader].kill();
        rig.wait_for_leader(Duration::from_secs(10))?;
        rig.add_sidecar()?;
    }
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(120)).await?;
    let client = rig.client().await?;
    delivered(&client, "events", Duration::from_secs(120))
        .await
        .with_context(|| rig.logs())?;
    let took = started.elapsed();
    let messages = received(&nats.url(), JS_STREAM).await?;
    let count = check(&client, &messages, "").await?;
    eprintln!("{appended} commands appended, {count} received once each in stream order, {took:.1?} after the first append");
    Ok(())
}

/// An event larger than one broker takes halts that broker's sink on it, and only that one: the
/// other sink and the projections go on. Once the broker takes it, cqrs.resume_sink delivers the
/// rest, still in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_a_broker_refuses_halts_only_its_sink() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let big = NatsServer::start()?;
    let mut small = NatsServer::start_with_max_payload(4_096)?;
    let mut rig = Rig::start_edition(Edition::Extension, ClusterOptions::default()).await?;
    rig.set("CQRS_SINKS", &format!("all={} small={}", big.url(), small.url()));
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    let traffic = rig.start_order_traffic(&mut rng, 2_000, 2, Some(1_000.0)).await?;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let poison: i64 = client
        .query_one(
            "select position from cqrs.append(cqrs.uuid_v7(), 'note-1', 'NOTE', jsonb_build_object('text', repeat('x', 8000)))",
            &[],
        )
        .await?
        .get(0);
    traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    delivered(&client, "all", Duration::from_secs(60))
        .await
        .with_context(|| rig.logs())?;
    halted_at(&client, "small", poison, Duration::from_secs(30)).await?;
    let metric = rig.sidecars[0].metric("cqrs_sink_halted")?;
    ensure!(metric == 1.0, "cqrs_sink_halted is {metric}");
    check(&client, &received(&big.url(), JS_STREAM).await?, "").await?;

    // the broker takes it now: resumed, the small sink delivers the rest
    small.kill();
    small.set_max_payload(None);
    small.restart()?;
    let resumed: bool = client
        .query_one("select cqrs.resume_sink('small')", &[])
        .await?
        .get(0);
    ensure!(resumed, "cqrs.resume_sink said the sink was not halted");
    delivered(&client, "small", Duration::from_secs(60))
        .await
        .with_context(|| rig.logs())?;
    check(&client, &received(&small.url(), JS_STREAM).await?, "").await?;
    Ok(())
}

/// The broker down for 60 s under 250 commands/s: the projections keep their normal lag and
/// the slot goes on (the sink does not hold it), and once the broker is back the sink catches up
/// from the log — every command once, in stream order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_down_for_a_minute_holds_back_only_its_sink() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let mut nats = NatsServer::start()?;
    let (rig, _) = rig_with_sink(&nats, Edition::Extension).await?;
    let client = rig.client().await?;
    let traffic = rig.start_order_traffic(&mut rng, 20_000, 2, Some(250.0)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let normal = lag::samples(&client, "order_summary", Duration::from_secs(8)).await?;
    nats.kill();
    let down = Instant::now();
    tokio::time::sleep(Duration::from_secs(5)).await;
    let slot_before = cqrs_e2e::slot_confirmed(&client).await?;
    let outage = lag::samples(&client, "order_summary", Duration::from_secs(50)).await?;
    let slot_after = cqrs_e2e::slot_confirmed(&client).await?;
    let behind: i64 = client
        .query_one(
            "select events_behind from cqrs.sink_status() where sink = 'events'",
            &[],
        )
        .await?
        .get(0);
    tokio::time::sleep(Duration::from_secs(60).saturating_sub(down.elapsed())).await;
    nats.restart()?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    delivered(&client, "events", Duration::from_secs(120))
        .await
        .with_context(|| rig.logs())?;
    let count = check(&client, &received(&nats.url(), JS_STREAM).await?, "").await?;
    let (normal_p99, outage_p99) = (lag::p99(&normal), lag::p99(&outage));
    eprintln!(
        "{appended} commands; order_summary lag p99 {normal_p99:.3} s normal, {outage_p99:.3} s with the broker down; \
         the sink was {behind} behind after 55 s down; {count} received once each"
    );
    ensure!(
        behind > 1_000,
        "the sink was only {behind} behind with its broker down: did the test stop the broker?"
    );
    ensure!(
        slot_after > slot_before,
        "the slot did not move while the broker was down"
    );
    let bound = lag::normal_bound(normal_p99);
    ensure!(
        outage_p99 <= bound,
        "projection lag p99 {outage_p99:.3} s with the broker down (normal {normal_p99:.3} s)"
    );
    Ok(())
}

/// A sink that starts behind while the projections catch up on the slot waits for them (they
/// come first where the cores are few: `--sink-yield`), then delivers everything.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sink_behind_waits_while_the_projections_catch_up() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let nats = NatsServer::start()?;
    let (mut rig, first) = rig_with_sink(&nats, Edition::Extension).await?;
    let client = rig.client().await?;
    delivered(&client, "events", Duration::from_secs(30)).await?;
    let before: i64 = client
        .query_one("select delivered from cqrs.sink where name = 'events'", &[])
        .await?
        .get(0);
    // the slot and the sink exist; with nobody leading, a backlog builds up in the slot, and
    // the projections take a while over it (a trigger sleeping 2 ms a row)
    rig.sidecars[first].kill();
    let owner = cqrs_e2e::connect(&cqrs_harness::edition::owner_url(&rig.pg, rig.edition)).await?;
    cqrs_e2e::orders::slow_down_order_summary(&owner, 0.002).await?;
    let appended = rig
        .start_order_traffic(&mut rng, 4_000, 2, None)
        .await?
        .finish()
        .await?;
    // older than the 2 s that make the projections catching up when the new leader reads them
    tokio::time::sleep(Duration::from_secs(5)).await;

    let second = rig.add_sidecar()?;
    let started = Instant::now();
    let (mut samples, mut early, mut yielding_seen) = (0, Vec::new(), false);
    loop {
        let row = client
            .query_one(
                "select (select max(position) from cqrs.command_log)
                        - (select checkpoint_position from cqrs.projection_state where name = 'order_summary'),
                        (select delivered from cqrs.sink where name = 'events')",
                &[],
            )
            .await?;
        let (projections_behind, sink_delivered): (Option<i64>, i64) = (row.get(0), row.get(1));
        let projections_behind = projections_behind.unwrap_or(i64::MAX);
        if projections_behind == 0 {
            break;
        }
        samples += 1;
        if sink_delivered > before {
            early.push((projections_behind, sink_delivered));
        }
        yielding_seen |= rig.sidecars[second].metric("cqrs_sink_yielding").unwrap_or(0.0) == 1.0;
        ensure!(
            started.elapsed() < Duration::from_secs(120),
            "the projections did not catch up in 2 minutes:\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let projected = started.elapsed();
    delivered(&client, "events", Duration::from_secs(60))
        .await
        .with_context(|| rig.logs())?;
    let count = check(&client, &received(&nats.url(), JS_STREAM).await?, "").await?;
    eprintln!(
        "{appended} commands appended; projections caught up in {projected:.1?} ({samples} samples), \
         the sink delivered {count} after them ({:.1?})",
        started.elapsed()
    );
    ensure!(
        samples >= 10,
        "the projections caught up in {samples} samples: too fast to show the sink waiting"
    );
    ensure!(
        early.is_empty(),
        "the sink delivered while the projections were catching up (behind, delivered): {early:?}\n{}",
        rig.logs()
    );
    ensure!(yielding_seen, "cqrs_sink_yielding never read 1");
    Ok(())
}

/// A catch-up that finds nothing left to deliver moves the sink's checkpoint to the log's end.
/// A walk whose last chunk stopped at a gap (a command that committed behind the walk) leaves
/// the checkpoint below the end, and with no more writes nothing else moves it: the sink would
/// look behind for good (`cqrs.sink_status()`, `cqrs_sink_events_behind`, the lag alert). Staged
/// by lowering the checkpoint as such a walk leaves it, then a new leader with nothing to write.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_catch_up_with_nothing_left_moves_the_checkpoint_to_the_end() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let nats = NatsServer::start()?;
    let (mut rig, first) = rig_with_sink(&nats, Edition::Extension).await?;
    let client = rig.client().await?;
    rig.start_order_traffic(&mut rng, 1_000, 2, None)
        .await?
        .finish()
        .await?;
    delivered(&client, "events", Duration::from_secs(60))
        .await
        .with_context(|| rig.logs())?;
    // the slot confirmed past everything, so the next leader streams nothing again (a batch it
    // streamed would move the checkpoint itself)
    cqrs_e2e::eventually(Duration::from_secs(30), "the slot confirmed the end of the WAL", || async {
        let row = client
            .query_one(
                "select confirmed_flush_lsn >= pg_catalog.pg_current_wal_lsn() from pg_catalog.pg_replication_slots where slot_name = 'cqrs_sidecar'",
                &[],
            )
            .await?;
        ensure!(row.get::<_, bool>(0), "not yet");
        Ok(())
    })
    .await?;
    rig.sidecars[first].kill();
    client
        .batch_execute(
            "update cqrs.sink set checkpoint_position = checkpoint_position - 100 where name = 'events'",
        )
        .await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    delivered(&client, "events", Duration::from_secs(30))
        .await
        .with_context(|| rig.logs())?;
    check(&client, &received(&nats.url(), JS_STREAM).await?, "").await?;
    Ok(())
}
