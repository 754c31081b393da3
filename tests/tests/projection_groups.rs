//! Projection groups: projections spread over groups, each projected by its own sidecars (one
//! leader per group, each from its own slot), with real PostgreSQL, Redis and sidecar processes.
//! Leaders of both groups are killed with SIGKILL while 50,000 commands arrive; a slow and then
//! a halted projection in one group leaves the other group's lag where it was; projections move
//! between groups under load. Every test ends with the read models equal to the fold of the log
//! and every cache entry equal to its row — nothing lost, doubled or stale.

use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::{eventually, fault_seed, lag};
use cqrs_harness::edition::Edition;
use cqrs_harness::ClusterOptions;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// The example's second projection, moved to its own group in these tests.
const STATS: &str = "user_order_stats";
const STATS_GROUP: &str = "users";
const SUMMARY: &str = "order_summary";

/// A rig whose `user_order_stats` is in group `users` and `order_summary` in `default`, with
/// `per_group` sidecars in each and a leader streaming in each.
async fn rig_with_two_groups(edition: Edition, per_group: usize) -> Result<Rig> {
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.set("CQRS_STATUS_INTERVAL", "1s");
    move_projection(&rig, STATS, STATS_GROUP).await?;
    for _ in 0..per_group {
        rig.add_sidecar()?;
        rig.add_sidecar_in_group(STATS_GROUP)?;
    }
    rig.wait_for_group_leader("default", Duration::from_secs(30))?;
    rig.wait_for_group_leader(STATS_GROUP, Duration::from_secs(30))?;
    Ok(rig)
}

/// `cqrs.move_projection`, as the role the sidecars use (cqrs_projector may move projections).
async fn move_projection(rig: &Rig, projection: &str, group: &str) -> Result<u64> {
    let client = cqrs_e2e::connect(&rig.sidecar_url).await?;
    let rows = client
        .query(
            "select count(*) from cqrs.move_projection($1, $2)",
            &[&projection, &group],
        )
        .await?;
    Ok(rows.first().map(|r| r.get::<_, i64>(0) as u64).unwrap_or(0))
}

/// Both groups lead at once, each with its own holder and token.
async fn assert_two_leaders(rig: &Rig) -> Result<()> {
    let client = rig.client().await?;
    let rows = client
        .query(
            "select projection_group, projections, holder, token, live from cqrs.projection_groups()",
            &[],
        )
        .await?;
    let mut holders = Vec::new();
    for row in &rows {
        let (group, projections, live): (String, Vec<String>, bool) = (row.get(0), row.get(1), row.get(4));
        ensure!(live, "group {group} has no live leader");
        let expected = if group == STATS_GROUP { STATS } else { SUMMARY };
        ensure!(projections == [expected], "group {group} holds {projections:?}");
        holders.push((row.get::<_, Option<String>>(2), row.get::<_, Option<i64>>(3)));
    }
    ensure!(rows.len() == 2, "{} groups", rows.len());
    ensure!(
        holders[0].0 != holders[1].0 && holders[0].1 != holders[1].1,
        "the groups share a holder or a token: {holders:?}"
    );
    Ok(())
}

/// Two groups, two sidecars each, 50,000 commands from four writers; the leader of each group
/// is killed with SIGKILL three times, alternately, and a new standby of its group replaces it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_groups_survive_their_leaders_being_killed() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let mut rig = rig_with_two_groups(Edition::Extension, 2).await?;
    assert_two_leaders(&rig).await?;
    let started = Instant::now();
    let traffic = rig.start_order_traffic(&mut rng, 50_000, 4, None).await?;
    let mut takeovers = Vec::new();
    for kill in 0..6 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_000))).await;
        let group = if kill % 2 == 0 { "default" } else { STATS_GROUP };
        let leader = rig.wait_for_group_leader(group, Duration::from_secs(10))?;
        rig.sidecars[leader].kill();
        let killed = Instant::now();
        let next = rig.wait_for_group_leader(group, Duration::from_secs(10))?;
        ensure!(
            next != leader,
            "kill {kill}: the killed sidecar still leads {group}"
        );
        takeovers.push((group, killed.elapsed()));
        rig.add_sidecar_in_group(group)?;
    }
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(120)).await?;
    assert_two_leaders(&rig).await?;
    eprintln!(
        "{appended} commands in two groups projected and cached {:.1?} after the first append; takeovers {takeovers:?}",
        started.elapsed()
    );
    Ok(())
}

/// Group `default`'s projection is made slow (its table's trigger sleeps 20 ms a row), then
/// halted (the trigger raises); group `users`' lag stays within its normal p99 throughout,
/// while the slow projection's own lag grows — the part a single group would share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_or_halted_projection_stalls_only_its_group() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let rig = rig_with_two_groups(Edition::Extension, 1).await?;
    let owner = cqrs_e2e::connect(&cqrs_harness::edition::owner_url(&rig.pg, rig.edition)).await?;
    let watcher = rig.client().await?;
    let traffic = rig.start_order_traffic(&mut rng, 9_000, 2, Some(250.0)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let normal = lag::samples(&watcher, STATS, Duration::from_secs(8)).await?;

    cqrs_e2e::orders::slow_down_order_summary(&owner, 0.02).await?;
    let slow = lag::samples(&watcher, STATS, Duration::from_secs(8)).await?;
    let summary_behind = lag::samples(&watcher, SUMMARY, Duration::from_millis(300)).await?;

    owner
        .batch_execute(
            "create function shop.refuse() returns trigger language plpgsql as
                 $$ begin raise exception using errcode = 'P0001', message = 'refused for the test'; end $$;
             create trigger refuse before insert or update on shop.order_summary
                 for each row execute function shop.refuse();",
        )
        .await?;
    eventually(Duration::from_secs(60), "order_summary halted", || async {
        let halted: bool = watcher
            .query_one(
                "select halted from cqrs.progress() where projection = $1",
                &[&SUMMARY],
            )
            .await?
            .get(0);
        ensure!(halted, "not halted yet");
        Ok(())
    })
    .await?;
    let halted = lag::samples(&watcher, STATS, Duration::from_secs(6)).await?;
    let appended = traffic.finish().await?;

    let (normal_p99, slow_p99, halted_p99) = (lag::p99(&normal), lag::p99(&slow), lag::p99(&halted));
    eprintln!(
        "{appended} commands; users' lag p99: normal {normal_p99:.3} s, default slow {slow_p99:.3} s, default halted {halted_p99:.3} s; \
         order_summary's own lag after 8 s slow {:.3} s",
        lag::p99(&summary_behind)
    );
    // the slowness took effect where it was put
    ensure!(
        lag::p99(&summary_behind) > 1.0,
        "order_summary did not fall behind ({:.3} s): the test proves nothing",
        lag::p99(&summary_behind)
    );
    let bound = lag::normal_bound(normal_p99);
    ensure!(
        slow_p99 <= bound,
        "users' lag p99 {slow_p99:.3} s while default was slow (normal {normal_p99:.3} s)"
    );
    ensure!(
        halted_p99 <= bound,
        "users' lag p99 {halted_p99:.3} s while default was halted (normal {normal_p99:.3} s)"
    );

    owner
        .batch_execute(
            "drop trigger refuse on shop.order_summary; drop trigger slowly on shop.order_summary;
             drop function shop.refuse(); drop function shop.slowly();",
        )
        .await?;
    rig.client()
        .await?
        .query("select count(*) from cqrs.resume($1)", &[&SUMMARY])
        .await
        .context("resuming order_summary")?;
    rig.assert_consistent(Duration::from_secs(90)).await
}

/// `user_order_stats` moves between groups four times while 10,000 commands arrive and both
/// groups' leaders project — first to a group nobody leads, where it falls behind: every move is
/// one transaction that catches the projection up, so nothing is lost or counted twice (its
/// counters would show it) and its cache is resynced.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_projection_under_load_loses_and_doubles_nothing() -> Result<()> {
    moving_a_projection_under_load_on(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn moving_a_projection_under_load_loses_and_doubles_nothing_portable() -> Result<()> {
    moving_a_projection_under_load_on(Edition::Portable).await
}

async fn moving_a_projection_under_load_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.set("CQRS_STATUS_INTERVAL", "1s");
    rig.add_sidecar()?;
    let users = rig.add_sidecar_in_group(STATS_GROUP)?;
    rig.wait_for_group_leader("default", Duration::from_secs(30))?;
    rig.wait_for_group_leader(STATS_GROUP, Duration::from_secs(30))?;
    // a group nobody is in yet is said so, not led in silence
    eventually(Duration::from_secs(10), "the empty-group warning", || async {
        ensure!(
            rig.sidecars[users]
                .log()
                .contains("no projection is in this sidecar's group yet"),
            "not logged"
        );
        Ok(())
    })
    .await?;

    let traffic = rig.start_order_traffic(&mut rng, 10_000, 2, Some(500.0)).await?;
    let mut moved = Vec::new();
    // first to a group no sidecar leads: it falls seconds behind, and the move to `users` after
    // it must catch up what the users slot streamed meanwhile (without the catch-up, lost)
    for (n, group) in ["idle", STATS_GROUP, "default", STATS_GROUP].iter().enumerate() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..4_000))).await;
        let started = Instant::now();
        let caught_up = move_projection(&rig, STATS, group).await?;
        let took = started.elapsed();
        // a move holds both groups' leases: it must end while commands keep coming (a catch-up
        // chasing the log's end would hold them until the writers stop)
        ensure!(took < Duration::from_secs(3), "move {n} to {group} took {took:?}");
        moved.push((n, *group, caught_up, took));
    }
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(90)).await?;
    let group: String = rig
        .client()
        .await?
        .query_one(
            "select projection_group from cqrs.projection where name = $1",
            &[&STATS],
        )
        .await?
        .get(0);
    ensure!(group == STATS_GROUP, "{STATS} is in {group}");
    eprintln!("{appended} commands; moves (n, to, rows caught up, took): {moved:?}");
    Ok(())
}
