//! cqrs-sidecar end to end: real PostgreSQL, real redis-server, real sidecar processes, and the
//! faults the sidecar claims to survive. Every test ends with the same verdict: the projections
//! have applied the whole log, the read models equal an independent fold of it (so nothing was
//! lost or applied twice), and every cached row equals its read-model row and revision.
//!
//! The tests run one at a time (they kill processes on a timetable; two at once on two cores
//! would measure the scheduler).

use std::process::Command as Process;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::orders::{random_log, seed_commands, Command};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::traffic::Traffic;
use cqrs_e2e::{eventually, orders};
use cqrs_harness::{ClusterOptions, RedisServer};
use cqrs_sidecar::metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

fn seed() -> u64 {
    cqrs_e2e::fault_seed()
}

/// Seed commands for every user, then `commands` random order commands over `streams` orders.
fn workload(rng: &mut StdRng, commands: usize, streams: usize, users: usize) -> (Vec<Command>, Vec<Command>) {
    (seed_commands(users), random_log(rng, commands, streams, users))
}

async fn start_traffic(
    rig: &Rig,
    rng: &mut StdRng,
    commands: usize,
    clients: usize,
    rate: Option<f64>,
) -> Result<Traffic> {
    rig.start_order_traffic(rng, commands, clients, rate).await
}

/// `promtool check metrics` on the sidecar's /metrics output.
fn promtool_check(metrics: &str) -> Result<()> {
    use std::io::Write;
    let mut child = Process::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .context("running promtool (apt-get install prometheus)")?;
    child
        .stdin
        .take()
        .context("promtool stdin")?
        .write_all(metrics.as_bytes())?;
    let out = child.wait_with_output()?;
    ensure!(
        out.status.success(),
        "promtool check metrics failed:\n{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// 50,000 commands across 1,000 streams from 4 writers while a leader and a standby run.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_commands_become_read_models_and_cache_entries() -> Result<()> {
    fifty_thousand_commands_become_read_models_and_cache_entries_on(Edition::Extension).await
}

/// The same on the portable edition, installed by a database owner who is not a superuser, the
/// sidecars connecting as a role with only REPLICATION and cqrs_projector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_commands_become_read_models_and_cache_entries_portable() -> Result<()> {
    fifty_thousand_commands_become_read_models_and_cache_entries_on(Edition::Portable).await
}

async fn fifty_thousand_commands_become_read_models_and_cache_entries_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.add_sidecar()?;
    rig.add_sidecar()?;
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 50_000, 4, None).await?;
    let started = Instant::now();
    let appended = traffic.finish().await?;
    eprintln!("appended {appended} commands in {:.1?}", started.elapsed());
    rig.assert_consistent(Duration::from_secs(60)).await?;
    eprintln!(
        "projected and cached everything {:.1?} after the first append",
        started.elapsed()
    );

    let standby = 1 - leader;
    ensure!(
        rig.leaders() == vec![leader],
        "the leader changed without a fault"
    );
    ensure!(
        rig.sidecars[standby].readiness() == Some(200),
        "the standby is not ready"
    );
    let metrics = rig.sidecars[leader].metrics()?;
    promtool_check(&metrics)?;
    promtool_check(&rig.sidecars[standby].metrics()?)?;
    ensure!(rig.sidecars[leader].metric(metrics::EVENTS_PROJECTED_TOTAL)? >= appended as f64);
    ensure!(rig.sidecars[standby].metric(metrics::EVENTS_PROJECTED_TOTAL)? == 0.0);
    let flushes = format!("{}_count", metrics::BATCH_FLUSH_DURATION_SECONDS);
    for name in [
        metrics::PROJECTION_LAG_SECONDS,
        flushes.as_str(),
        metrics::SLOT_RETAINED_BYTES,
    ] {
        ensure!(metrics.contains(name), "{name} missing from /metrics");
    }
    Ok(())
}

/// Kills the leader with SIGKILL `kills` times at random moments, checking that a standby takes
/// over within 5 s each time and starting a new standby after each kill; returns the takeovers.
async fn kill_the_leader(rig: &mut Rig, rng: &mut StdRng, kills: usize) -> Result<Vec<Duration>> {
    let mut takeovers = Vec::new();
    for kill in 0..kills {
        tokio::time::sleep(Duration::from_millis(rng.random_range(500..2_500))).await;
        let leader = rig.wait_for_leader(Duration::from_secs(10))?;
        rig.sidecars[leader].kill();
        let killed = Instant::now();
        let next = rig.wait_for_leader(Duration::from_secs(10))?;
        let took = killed.elapsed();
        ensure!(next != leader, "kill {kill}: the killed sidecar still leads");
        ensure!(
            took < Duration::from_secs(5),
            "kill {kill}: takeover took {took:?}\n{}",
            rig.logs()
        );
        takeovers.push(took);
        rig.add_sidecar()?; // a new standby replaces the dead one
    }
    takeovers.sort();
    Ok(takeovers)
}

/// The leader is killed with SIGKILL ten times at random moments while commands keep coming; a
/// standby takes over within 5 s each time, and in the end nothing is lost, doubled or stale.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_ten_times_loses_and_doubles_nothing() -> Result<()> {
    killing_the_leader_ten_times_loses_and_doubles_nothing_on(Edition::Extension).await
}

/// The same on the portable edition, installed by a database owner who is not a superuser, the
/// sidecars connecting as a role with only REPLICATION and cqrs_projector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_ten_times_loses_and_doubles_nothing_portable() -> Result<()> {
    killing_the_leader_ten_times_loses_and_doubles_nothing_on(Edition::Portable).await
}

async fn killing_the_leader_ten_times_loses_and_doubles_nothing_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    // small batches: more of them in flight, more moments to be killed in
    rig.set("CQRS_BATCH_MAX_EVENTS", "200");
    rig.add_sidecar()?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 40_000, 2, Some(1_200.0)).await?;
    let takeovers = kill_the_leader(&mut rig, &mut rng, 10).await?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    let resyncs = rig.logs().matches("the cache may be behind").count();
    eprintln!(
        "{appended} commands, 10 kills; takeover median {:?}, max {:?}; {resyncs} takeovers found the cache behind",
        takeovers[5], takeovers[9]
    );
    Ok(())
}

/// The same with transactions of 40 commands and batches aiming at 10–20 events: every
/// transaction is cut across batches, and the parts that do not end it go without an LSN fence
/// — killed at random moments, nothing may be lost or doubled.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_leader_while_transactions_are_cut_loses_nothing() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    rig.set("CQRS_BATCH_MIN_EVENTS", "10");
    rig.set("CQRS_BATCH_MAX_EVENTS", "20");
    rig.add_sidecar()?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let (seeds, log) = workload(&mut rng, 16_000, 500, 50);
    orders::append_all(&rig.client().await?, &seeds, 50).await?;
    let traffic = Traffic::start_batched(&rig.pg.url(), log, 2, Some(1_500.0), 40);
    let takeovers = kill_the_leader(&mut rig, &mut rng, 5).await?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    eprintln!(
        "{appended} commands in transactions of 40, 5 kills; takeover max {:?}",
        takeovers[4]
    );
    Ok(())
}

/// The takeover the kill test hits by chance, made certain: a leader projected and checkpointed
/// commands but died before the slot heard it confirm them, so the next leader streams them
/// again, and the batch that straddles the dead leader's checkpoint also holds the first command
/// it never saw. With batches of two single-command transactions, every batch is cut inside its
/// second transaction; fenced with its first commit's LSN, the straddling batch would be skipped
/// whole and that command lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_replaying_below_the_checkpoint_loses_nothing() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    let client = rig.client().await?;
    // two statements: a slot cannot be created in a transaction that wrote
    client
        .execute("select cqrs.ensure_publication('cqrs_command_log')", &[])
        .await?;
    client
        .execute(
            "select pg_catalog.pg_create_logical_replication_slot('cqrs_sidecar', 'pgoutput')",
            &[],
        )
        .await?;
    let (seeds, log) = workload(&mut rng, 400, 40, 10);
    let mut commands: Vec<Command> = seeds.into_iter().chain(log).collect();
    let later = commands.split_off(commands.len() - 150);
    // an odd count: the batches [1, 2], [3, 4], ... leave the last projected command first in
    // the batch that straddles the checkpoint
    if commands.len().is_multiple_of(2) {
        commands.pop();
    }
    let append = async |commands: &[Command]| -> Result<()> {
        for command in commands {
            client
                .execute(
                    "select cqrs.append(cqrs.uuid_v7(), $1, $2, $3)",
                    &[&command.stream, &command.command_type, &command.payload],
                )
                .await?;
        }
        Ok(())
    };
    append(&commands).await?;
    // the dead leader: projected everything so far and checkpointed it, never confirmed it
    client
        .batch_execute(
            "select cqrs.acquire_lease('dead leader');
             select count(*) from cqrs.catch_up();
             update cqrs.projection_state set checkpoint_lsn = pg_catalog.pg_current_wal_lsn();",
        )
        .await?;
    cqrs_e2e::caught_up(&client).await?;
    append(&later).await?;
    rig.set("CQRS_BATCH_MIN_EVENTS", "2");
    rig.set("CQRS_BATCH_MAX_EVENTS", "2");
    // batches are taken full, never by age, so their boundaries are the ones above
    rig.set("CQRS_BATCH_MAX_WAIT", "5s");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    Ok(())
}

/// A batch whose rows reach the cache while its projection is being resynced may not raise the
/// synced mark (the cache may still miss older rows then); once the resync is done the mark must
/// reach the batch's revision all the same, or the next leader resyncs for nothing and the cache
/// reads as behind while nothing is. Certain here: the batch is projected, and its rows cached,
/// while the resync is still rewriting the 60,000 cached keys planted for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_batch_cached_during_a_resync_still_gets_the_synced_mark() -> Result<()> {
    const GHOSTS: usize = 60_000;
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    let client = rig.client().await?;
    let (seeds, mut log) = workload(&mut rng, 300, 30, 10);
    let later = log.split_off(log.len() - 4);
    orders::append_all(&client, &seeds, 50).await?;
    orders::append_all(&client, &log, 50).await?;
    let first = rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    rig.sidecars[first].kill();

    // the cache as a leader that died between a commit and its cache writes leaves it (the mark
    // below the revision), holding many keys for the resync to check: rows that do not exist
    let mut redis = redis::Client::open(rig.redis.url())?.get_connection()?;
    let ghost = |i: usize| format!("{}:order_summary:ghost-{i:06}", cqrs_e2e::rig::PREFIX);
    for chunk in (0..GHOSTS).collect::<Vec<_>>().chunks(5_000) {
        let mut pipe = redis::pipe();
        for &i in chunk {
            pipe.cmd("HSET")
                .arg(ghost(i))
                .arg("r")
                .arg(1)
                .arg("k")
                .arg("v")
                .arg("d")
                .arg("{}")
                .ignore();
        }
        pipe.query::<()>(&mut redis)?;
    }
    redis::cmd("HSET")
        .arg(format!("{}!synced", cqrs_e2e::rig::PREFIX))
        .arg("order_summary")
        .arg(0)
        .query::<()>(&mut redis)?;
    // how many of a sample of the planted keys the resync has rewritten (a row cached as such)
    let sample: Vec<String> = (0..GHOSTS).step_by(GHOSTS / 1_000).map(ghost).collect();
    let mut rewritten = move || -> Result<usize> {
        let mut pipe = redis::pipe();
        for key in &sample {
            pipe.cmd("HGET").arg(key).arg("k");
        }
        let kinds: Vec<Option<String>> = pipe.query(&mut redis)?;
        Ok(kinds.iter().filter(|k| k.as_deref() != Some("v")).count())
    };

    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    eventually(
        Duration::from_secs(30),
        "the resync rewrites the planted keys",
        || {
            let done = rewritten();
            async move {
                ensure!(done? > 0, "not yet");
                Ok(())
            }
        },
    )
    .await
    .with_context(|| rig.logs())?;
    let before: i64 = client
        .query_one(
            "select revision from cqrs.projection_state where name = 'order_summary'",
            &[],
        )
        .await?
        .get(0);
    orders::append_all(&client, &later, 50).await?;
    let url = rig.redis.url();
    eventually(Duration::from_secs(30), "the batch's rows are cached", || {
        let (client, url) = (&client, url.clone());
        async move {
            let rows = client
                .query(
                    "select key, rev from cqrs.changed_since('order_summary', $1)",
                    &[&before],
                )
                .await?;
            ensure!(!rows.is_empty(), "not projected yet");
            let mut redis = redis::Client::open(url)?.get_connection()?;
            for row in rows {
                let (key, rev): (String, i64) = (row.get(0), row.get(1));
                let cached: Option<i64> = redis::cmd("HGET")
                    .arg(format!("{}:order_summary:{key}", cqrs_e2e::rig::PREFIX))
                    .arg("r")
                    .query(&mut redis)?;
                ensure!(
                    cached == Some(rev),
                    "{key}: cached at {cached:?}, projected at {rev}"
                );
            }
            Ok(())
        }
    })
    .await
    .with_context(|| rig.logs())?;
    let done = rewritten()?;
    ensure!(
        done < 1_000,
        "the resync had ended before the batch was cached: nothing was tested (plant more keys)"
    );
    rig.assert_consistent(Duration::from_secs(30)).await?;
    eprintln!("the batch was cached with {done} of 1,000 sampled planted keys rewritten");
    Ok(())
}

/// PostgreSQL is restarted (fast shutdown) while commands are streamed; the sidecar reconnects,
/// leads again and resumes from its confirmed position.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_loses_nothing() -> Result<()> {
    a_postgres_restart_mid_stream_loses_nothing_on(Edition::Extension).await
}

/// The same on the portable edition, installed by a database owner who is not a superuser, the
/// sidecars connecting as a role with only REPLICATION and cqrs_projector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_postgres_restart_mid_stream_loses_nothing_portable() -> Result<()> {
    a_postgres_restart_mid_stream_loses_nothing_on(Edition::Portable).await
}

async fn a_postgres_restart_mid_stream_loses_nothing_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 15_000, 2, Some(1_000.0)).await?;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let before = traffic.appended();
    rig.pg.restart()?;
    eprintln!("restarted PostgreSQL after {before} commands");
    rig.wait_for_leader(Duration::from_secs(30))?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    ensure!(
        before > 0 && before < appended,
        "the restart was not mid-stream ({before} of {appended})"
    );
    Ok(())
}

/// redis-server is killed for 10 s (losing everything: no persistence) while commands keep
/// being projected; when it is back on its port the sidecar repairs what it missed and warms
/// the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn redis_down_for_ten_seconds_is_repaired() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    rig.add_sidecar()?;
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 20_000, 2, Some(1_000.0)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let port = rig.redis.port();
    rig.redis.kill();
    tokio::time::sleep(Duration::from_secs(10)).await;
    let failed = rig.sidecars[leader]
        .metric("cqrs_cache_writes_total{result=\"failed\"}")
        .unwrap_or(0.0);
    let projected_while_down = rig.pg.psql("select count(*) from cqrs.command_log")?;
    ensure!(
        rig.sidecars[leader].readiness() == Some(200),
        "projecting stopped while Redis was down"
    );
    rig.redis = RedisServer::start_on(port)?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    eprintln!("{appended} commands; {projected_while_down} in the log when Redis came back; {failed} failed cache writes");
    Ok(())
}

/// Sends `name` (`-STOP`, `-CONT`, …) to process `pid` with kill(1).
fn signal(name: &str, pid: &str) -> Result<()> {
    let status = Process::new("kill").args([name, pid]).status()?;
    ensure!(status.success(), "kill {name} {pid}: {status}");
    Ok(())
}

/// The one bigint `sql` answers.
async fn bigint(client: &tokio_postgres::Client, sql: &str) -> Result<i64> {
    Ok(client.query_one(sql, &[]).await?.get(0))
}

/// redis-server stopped (SIGSTOP: its connections stay open and nothing answers) while two
/// commands are projected one after the other. The second is projected while the first's cache
/// write still waits for Redis — the flusher does not wait for the cache before it projects the
/// next batch — and the slot is not confirmed past the first while that write has not answered:
/// a batch is done only once PostgreSQL committed it and Redis answered (or the write failed and
/// its keys were remembered for repair). Redis running again, everything is consistent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_next_batch_is_projected_while_redis_has_not_answered_the_last() -> Result<()> {
    let _serial = serial().await;
    let mut rig = Rig::start().await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    orders::append_all(&client, &seed_commands(1), 1).await?;
    eventually(Duration::from_secs(30), "the seed projected", || {
        cqrs_e2e::caught_up(&client)
    })
    .await?;
    let pid = rig.redis.pid().context("redis-server has no pid")?.to_string();
    let signal = |name: &str| signal(name, &pid);
    let wal_now = || {
        bigint(
            &client,
            "select pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_lsn(), '0/0')::bigint",
        )
    };
    let append_and_wait = |stream: &'static str| {
        let client = &client;
        async move {
            client
                .query(
                    "select from cqrs.append(cqrs.uuid_v7(), $1, 'CREATE_ORDER', $2)",
                    &[&stream, &json!({"user_id": "user-0", "currency": "EUR"})],
                )
                .await?;
            let started = Instant::now();
            let projected: bool = client
                .query_one("select cqrs.wait_for($1, 1, 'order_summary', '1 s')", &[&stream])
                .await?
                .get(0);
            Ok::<(bool, Duration), anyhow::Error>((projected, started.elapsed()))
        }
    };

    signal("-STOP")?;
    let stalled = async {
        let (first, first_took) = append_and_wait("order-stalled-1").await?;
        let after_first = wal_now().await?;
        ensure!(first, "the first command was not projected within 1 s of its append");
        // the first batch's cache write now waits for Redis (up to its 2 s response timeout)
        let (second, second_took) = append_and_wait("order-stalled-2").await?;
        ensure!(
            second,
            "the second command was not projected within 1 s: the flusher waited for the first batch's cache write"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let confirmed_then = cqrs_e2e::slot_confirmed(&client).await?;
        ensure!(
            confirmed_then < after_first,
            "the slot was confirmed to {confirmed_then}, past the first command (WAL at {after_first} after it) while Redis had not answered its cache write"
        );
        eprintln!("projected in {first_took:?} and {second_took:?} with Redis stopped; slot confirmed to {confirmed_then} < {after_first}");
        Ok::<i64, anyhow::Error>(after_first)
    }
    .await;
    signal("-CONT")?;
    let after_first = stalled?;
    eventually(
        Duration::from_secs(30),
        "the slot confirmed past both commands",
        || async {
            let now = cqrs_e2e::slot_confirmed(&client).await?;
            ensure!(
                now >= after_first,
                "slot confirmed to {now}, not yet past {after_first}"
            );
            Ok(())
        },
    )
    .await?;
    rig.assert_consistent(Duration::from_secs(60)).await
}

/// The slot is dropped by hand (its walsender terminated first) while commands keep coming: the
/// sidecar recreates it, catches up from the log, and counts it in a metric.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_by_hand_is_recreated_and_caught_up() -> Result<()> {
    a_slot_dropped_by_hand_is_recreated_and_caught_up_on(Edition::Extension).await
}

/// The same on the portable edition, installed by a database owner who is not a superuser, the
/// sidecars connecting as a role with only REPLICATION and cqrs_projector.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slot_dropped_by_hand_is_recreated_and_caught_up_portable() -> Result<()> {
    a_slot_dropped_by_hand_is_recreated_and_caught_up_on(Edition::Portable).await
}

async fn a_slot_dropped_by_hand_is_recreated_and_caught_up_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.add_sidecar()?;
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 15_000, 2, Some(1_000.0)).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let client = rig.client().await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        // the walsender holds the slot: end it, then drop the slot before the sidecar is back
        client
            .execute(
                "select pg_terminate_backend(active_pid) from pg_replication_slots where slot_name = 'cqrs_sidecar' and active_pid is not null",
                &[],
            )
            .await?;
        match client
            .execute("select pg_drop_replication_slot('cqrs_sidecar')", &[])
            .await
        {
            Ok(_) => break,
            Err(_) if Instant::now() < deadline => continue,
            Err(err) => bail!("could not drop the slot: {err}"),
        }
    }
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    let sidecar = &rig.sidecars[leader];
    eventually(Duration::from_secs(10), "the slot is back", || async {
        let slots: i64 = client
            .query_one(
                "select count(*) from pg_replication_slots where slot_name = 'cqrs_sidecar'",
                &[],
            )
            .await?
            .get(0);
        ensure!(slots == 1, "{slots} slots");
        Ok(())
    })
    .await?;
    ensure!(
        sidecar.metric(metrics::SLOT_RECREATED_TOTAL)? == 1.0,
        "cqrs_slot_recreated_total is not 1\n{}",
        rig.logs()
    );
    ensure!(
        sidecar.log().contains("the replication slot was missing"),
        "the loss was not logged loudly"
    );
    eprintln!("{appended} commands, slot dropped once");
    Ok(())
}

/// A poison event halts the projection with on_error = 'halt' (the others go on), and is set
/// aside by the one with 'dead_letter'; fixing the read model and resuming catches up, and the
/// cache follows.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn poison_events_halt_or_dead_letter_only_their_projection() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    let client = rig.client().await?;
    client
        .batch_execute(
            "create schema pay;
             create table pay.strict (stream text primary key, amount integer not null, rev bigint not null default 0);
             create table pay.lenient (stream text primary key, amount integer not null, rev bigint not null default 0);
             select cqrs.create_projection('strict', 'pay.strict', 'stream', '{\"PAY\": {\"action\": \"upsert\", \"set\": {\"amount\": \"$.amount\"}}}');
             select cqrs.create_projection('lenient', 'pay.lenient', 'stream', '{\"PAY\": {\"action\": \"upsert\", \"set\": {\"amount\": \"$.amount\"}}}', on_error => 'dead_letter');",
        )
        .await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let (seeds, mut log) = workload(&mut rng, 6_000, 1_000, 50);
    let payments: Vec<Command> = (0..200)
        .map(|i| Command {
            stream: format!("pay-{i}"),
            command_type: "PAY",
            // one poison amount: text where the read model has an integer
            payload: if i == 77 {
                json!({"amount": "lots"})
            } else {
                json!({"amount": i})
            },
        })
        .collect();
    for (i, payment) in payments.into_iter().enumerate() {
        log.insert(i * 30, payment);
    }
    orders::append_all(&client, &seeds, 50).await?;
    Traffic::start(&rig.pg.url(), log, 2, Some(1_500.0))
        .finish()
        .await?;

    let behind = |name: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "select halted, events_behind, dead_letters from cqrs.status() where projection = $1",
                    &[&name],
                )
                .await?;
            Ok::<_, anyhow::Error>((row.get::<_, bool>(0), row.get::<_, i64>(1), row.get::<_, i64>(2)))
        }
    };
    eventually(
        Duration::from_secs(60),
        "the healthy projections caught up",
        || async {
            for name in ["order_summary", "user_order_stats", "lenient"] {
                let (halted, events_behind, _) = behind(name).await?;
                ensure!(
                    !halted && events_behind == 0,
                    "{name}: halted {halted}, {events_behind} behind"
                );
            }
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;
    let (halted, events_behind, _) = behind("strict").await?;
    ensure!(
        halted && events_behind > 0,
        "strict: halted {halted}, {events_behind} behind"
    );
    let (_, _, dead) = behind("lenient").await?;
    ensure!(dead == 1, "lenient has {dead} dead letters");
    let poison: String = client
        .query_one(
            "select last_error_event ->> 'stream' from cqrs.projection_state where name = 'strict'",
            &[],
        )
        .await?
        .get(0);
    ensure!(poison == "pay-77", "strict halted on {poison}");
    eventually(Duration::from_secs(10), "the halt is counted", || async {
        ensure!(
            rig.sidecars[0].metric("cqrs_command_errors_total{kind=\"halt\",projection=\"strict\"}")? == 1.0
        );
        Ok(())
    })
    .await
    .with_context(|| rig.sidecars[0].metrics().unwrap_or_default())?;

    // the operator's fix: the amount may be text; resume and retry; the sidecar refreshes the cache
    client
        .batch_execute(
            "alter table pay.strict alter column amount type text;
             alter table pay.lenient alter column amount type text;
             select count(*) from cqrs.resume('strict');
             select count(*) from cqrs.retry_dead_letters('lenient');",
        )
        .await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    let rows: i64 = client
        .query_one(
            "select count(*) from pay.strict s join pay.lenient l using (stream, amount)",
            &[],
        )
        .await?
        .get(0);
    ensure!(
        rows == 200,
        "{rows} of 200 payments agree between the two read models"
    );
    Ok(())
}

/// SIGTERM while a large batch is being projected: exit 0 within 10 s, and a restarted sidecar
/// resumes without loss or double application.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_during_a_large_batch_exits_cleanly_within_ten_seconds() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start().await?;
    let client = rig.client().await?;
    // the backlog is in the log before the slot exists: the sidecar's catch-up projects it, and
    // the slot streams the second part in large batches
    rig.set("CQRS_BATCH_MAX_EVENTS", "20000");
    rig.set("CQRS_BATCH_MIN_EVENTS", "20000");
    rig.set("CQRS_BATCH_MAX_WAIT", "2s");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let (seeds, log) = workload(&mut rng, 100_000, 1_000, 50);
    orders::append_all(&client, &seeds, 50).await?;
    orders::append_all(&client, &log, 1_000).await?;
    // wait until a batch is being projected, then stop
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let active: i64 = client
            .query_one(
                "select count(*) from pg_stat_activity where state = 'active' and query like '%cqrs.project_batch%' and pid <> pg_backend_pid()",
                &[],
            )
            .await?
            .get(0);
        if active > 0 {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "no batch was ever in flight\n{}",
            rig.logs()
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let stopping = Instant::now();
    let code = rig.sidecars[0].terminate(Duration::from_secs(15))?;
    let took = stopping.elapsed();
    ensure!(code == Some(0), "exit code {code:?}\n{}", rig.logs());
    ensure!(took < Duration::from_secs(10), "stopping took {took:?}");
    let locks: i64 = client
        .query_one("select count(*) from pg_locks where locktype = 'advisory'", &[])
        .await?
        .get(0);
    ensure!(locks == 0, "the leader lock is still held");
    eprintln!("stopped in {took:?} with a batch in flight");
    rig.add_sidecar()?;
    rig.assert_consistent(Duration::from_secs(120)).await?;
    Ok(())
}

/// Three sidecars started at the same moment: exactly one leads, at every sample, and when it
/// stops another one leads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_started_together_elect_exactly_one_leader() -> Result<()> {
    let _serial = serial().await;
    let mut rig = Rig::start().await?;
    for _ in 0..3 {
        rig.add_sidecar()?;
    }
    let client = rig.client().await?;
    // leadership is the projector lease: exactly one live holder, and it is the one that says
    // it leads
    let lease_holders = || async {
        let row = client
            .query_one(
                "select count(*) filter (where l.live), (select count(*) from cqrs.projector_lease) from cqrs.leader() l",
                &[],
            )
            .await?;
        Ok::<_, anyhow::Error>((row.get::<_, i64>(0), row.get::<_, i64>(1)))
    };
    rig.wait_for_leader(Duration::from_secs(30))?;
    let until = Instant::now() + Duration::from_secs(5);
    let mut samples = 0;
    while Instant::now() < until {
        let leaders = rig.leaders();
        ensure!(leaders.len() == 1, "leaders at one moment: {leaders:?}");
        ensure!(
            lease_holders().await? == (1, 1),
            "the projector lease is not held by exactly one live holder"
        );
        samples += 1;
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let leader = rig.leaders()[0];
    ensure!(rig.sidecars[leader].terminate(Duration::from_secs(10))? == Some(0));
    let next = rig.wait_for_leader(Duration::from_secs(10))?;
    ensure!(next != leader);
    eprintln!("{samples} samples with exactly one leader");
    Ok(())
}

/// A leader stopped past its lease's time to live (a stalled process): the standby takes the
/// lease over, and when the stalled sidecar runs again its `cqrs_leader` says 0 and its `/readyz`
/// no longer "leader, streaming" (still ready: it can answer reads) from their first answers — requests sent while it was still stopped, answered before its
/// renewal can have told it the lease is gone — so two sidecars are never shown leading at once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_stalled_past_its_lease_is_not_shown_leading_beside_the_new_one() -> Result<()> {
    let _serial = serial().await;
    let mut rig = Rig::start().await?;
    let stalled = rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let standby = rig.add_sidecar()?;
    eventually(
        Duration::from_secs(30),
        "the second sidecar stands by",
        || async {
            ensure!(rig.sidecars[standby].metric("cqrs_leader")? == 0.0, "it leads");
            ensure!(rig.sidecars[standby].readiness().is_some(), "not answering yet");
            Ok(())
        },
    )
    .await?;
    let pid = rig.sidecars[stalled]
        .pid()
        .context("the leader's pid")?
        .to_string();
    let signal = |name: &str| signal(name, &pid);
    let client = rig.client().await?;
    let token = || {
        bigint(
            &client,
            "select token from cqrs.projector_lease where projection_group = 'default'",
        )
    };
    let stalled_token = token().await?;
    signal("-STOP")?;
    let stopped = Instant::now();
    // taken over: a newer token (the standby's gauge may say so only for moments, since it
    // cannot stream while the stalled sidecar's walsender holds the slot)
    let taken_over = eventually(
        Duration::from_secs(20),
        "the standby takes the lease over",
        || async {
            ensure!(
                token().await? != stalled_token,
                "the stalled sidecar's token is still the lease's"
            );
            Ok(())
        },
    )
    .await;
    if let Err(err) = taken_over {
        signal("-CONT")?;
        return Err(err);
    }
    let took = stopped.elapsed();
    // the kernel queues the connection and the request while the process is stopped
    let port = rig.sidecars[stalled].admin_port();
    let ask = |path: &'static str| {
        std::thread::spawn(move || cqrs_harness::http_get(port, path, Duration::from_secs(20)))
    };
    let (scrape, readiness) = (ask("/metrics"), ask("/readyz"));
    std::thread::sleep(Duration::from_millis(300));
    signal("-CONT")?;
    let answer = |asked: std::thread::JoinHandle<Result<(u16, String)>>| {
        asked
            .join()
            .map_err(|_| anyhow::anyhow!("the request panicked"))?
    };
    let (status, body) = answer(scrape)?;
    ensure!(status == 200, "/metrics answered {status}");
    let (ready_status, ready_body) = answer(readiness)?;
    ensure!(
        ready_status == 200 && !ready_body.contains("leader, streaming"),
        "the stalled sidecar's first /readyz after the takeover: {ready_status} {ready_body}"
    );
    let shown = body
        .lines()
        .find(|line| line.starts_with("cqrs_leader{"))
        .context("no cqrs_leader in /metrics")?
        .to_owned();
    ensure!(
        shown.ends_with(" 0"),
        "the stalled sidecar's first answer after the takeover says it leads: {shown}"
    );
    // what happens next is the ordinary hand-over (the new leader cannot stream until the stalled
    // one's walsender lets the slot go, gives the lease back, and either may take it): some
    // sidecar leads again
    rig.wait_for_leader(Duration::from_secs(30))?;
    eprintln!(
        "the standby took the lease {took:?} after the leader stopped; the stalled one answered: {shown}; /readyz {ready_status} {ready_body}"
    );
    Ok(())
}

/// A newer leader takes the lease while the sidecar streams: from then on not one batch of the
/// deposed sidecar applies (`project_batch` refuses its token with QC001, and its lease renewal
/// fails), it stops streaming, and once the lease is free again it leads anew and loses and
/// doubles nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_stops_and_nothing_applies_twice() -> Result<()> {
    a_deposed_leader_stops_and_nothing_applies_twice_on(Edition::Extension).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deposed_leader_stops_and_nothing_applies_twice_portable() -> Result<()> {
    a_deposed_leader_stops_and_nothing_applies_twice_on(Edition::Portable).await
}

async fn a_deposed_leader_stops_and_nothing_applies_twice_on(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(seed());
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    let leader = rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let traffic = start_traffic(&rig, &mut rng, 4_000, 2, Some(500.0)).await?;
    tokio::time::sleep(Duration::from_secs(2)).await;

    // the usurper: a live session holding a newer token for an hour. Like every takeover
    // (cqrs.try_lead, cqrs.acquire_lease) it locks the lease row for update first, which waits
    // for the batch in flight (it holds a key share lock, see cqrs._fence); a bare update of the
    // token would not, and that batch could still commit after it.
    let usurper = rig.client().await?;
    usurper
        .batch_execute(
            "begin;
             select from cqrs.projector_lease for update;
             update cqrs.projector_lease
                set token = token + 1, holder = 'usurper', holder_pid = pg_backend_pid(),
                    expires_at = clock_timestamp() + interval '1 hour';
             commit",
        )
        .await?;
    let checkpoint = || {
        bigint(
            &usurper,
            "select coalesce(sum(checkpoint_position), 0)::bigint from cqrs.projection_state",
        )
    };
    let at_takeover = checkpoint().await?;
    eventually(
        Duration::from_secs(10),
        "the deposed sidecar stops leading",
        || async {
            ensure!(!rig.sidecars[leader].is_leader(), "it still says it leads");
            Ok(())
        },
    )
    .await?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let later = checkpoint().await?;
    ensure!(
        later == at_takeover,
        "a deposed leader's batches applied: checkpoints moved from {at_takeover} to {later}"
    );

    // the usurper goes: the lease is free, the sidecar leads again
    drop(usurper);
    rig.wait_for_leader(Duration::from_secs(30))?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    eprintln!(
        "{appended} commands; deposed at checkpoint {at_takeover}, nothing applied until the lease was free"
    );
    Ok(())
}
