//! What a stray session, a careless operator or a curious user could do to a running deployment
//! — and why it now does nothing: leadership only the projector role can hold, waiters that no
//! lock can hang, readiness that tells when nobody leads, secrets that never print.

use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cqrs_e2e::orders::{self, random_log, seed_commands};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::traffic::Traffic;
use cqrs_e2e::{connect, eventually};
use cqrs_harness::sidecar::sidecar_binary;
use cqrs_sidecar::metrics;
use rand::rngs::StdRng;
use rand::SeedableRng;
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// A session of a role that may log in and nothing else, sitting on every lock it can take —
/// the 0.1.0 leader lock and the wait_for class among them — cannot stop projection, hang a
/// waiter or take leadership; /readyz stays honest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stray_session_cannot_freeze_projection() -> Result<()> {
    let _serial = serial().await;
    let mut rig = Rig::start().await?;
    let admin = rig.client().await?;
    admin
        .batch_execute("create role stray login; grant usage on schema cqrs to stray;")
        .await?;
    let stray = connect(&format!(
        "postgres://stray@127.0.0.1:{}/{}",
        rig.pg.port(),
        rig.pg.database()
    ))
    .await?;
    // the leader lock of 0.1.0 sidecars (advisory class "CQRL", key hashtext(slot)) and the
    // wait_for class ("CQRS") for the example projections, all held exclusively, forever
    stray
        .batch_execute(
            "select pg_advisory_lock(x'4351524c'::int, hashtext('cqrs_sidecar'));
             select pg_advisory_lock(x'43515253'::int, hashtext('order_summary'));
             select pg_advisory_lock(x'43515253'::int, hashtext('user_order_stats'));",
        )
        .await?;
    let refused = stray
        .query("select cqrs.try_lead('stray')", &[])
        .await
        .err()
        .and_then(|e| e.code().map(|c| c.code().to_owned()));
    ensure!(
        refused.as_deref() == Some("42501"),
        "a stray role took the lease: {refused:?}"
    );

    rig.add_sidecar()?;
    rig.add_sidecar()?;
    let leader = rig
        .wait_for_leader(Duration::from_secs(30))
        .with_context(|| rig.logs())?;
    let standby = 1 - leader;
    eventually(Duration::from_secs(10), "the standby is ready", || async {
        ensure!(rig.sidecars[standby].readiness() == Some(200), "not yet");
        Ok(())
    })
    .await?;
    let client = rig.client().await?;
    orders::append_all(&client, &seed_commands(20), 20).await?;
    let mut rng = StdRng::seed_from_u64(11);
    let traffic = Traffic::start(
        &rig.pg.url(),
        random_log(&mut rng, 2_000, 100, 20),
        2,
        Some(500.0),
    );
    // read-your-writes from SQL does not hang behind the stray lock: it polls instead
    let row = client
        .query_one(
            "select a.seq from cqrs.append(cqrs.uuid_v7(), 'seed-0', 'SHIP_ORDER', '{\"user_id\": \"user-0\", \"carrier\": \"dhl\"}') a",
            &[],
        )
        .await?;
    let seq: i64 = row.get(0);
    let started = Instant::now();
    let seen: bool = client
        .query_one(
            "select cqrs.wait_for('seed-0', $1, 'order_summary', '5 s')",
            &[&seq],
        )
        .await?
        .get(0);
    ensure!(seen, "wait_for timed out behind a stray session's lock");
    ensure!(
        started.elapsed() < Duration::from_secs(2),
        "wait_for took {:?} behind a stray session's lock",
        started.elapsed()
    );
    traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    ensure!(rig.leaders() == vec![leader], "leadership moved without a fault");
    Ok(())
}

/// When no sidecar can lead, every sidecar says so: /readyz 503 and cqrs_leader_present 0; and
/// it leads again by itself once it can.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_and_a_metric_show_when_no_sidecar_leads() -> Result<()> {
    let _serial = serial().await;
    let mut rig = Rig::start().await?;
    let admin = rig.client().await?;
    admin
        .batch_execute("create role sidecar login replication in role cqrs_projector")
        .await?;
    let url = format!(
        "postgres://sidecar@127.0.0.1:{}/{}",
        rig.pg.port(),
        rig.pg.database()
    );
    let sidecar = rig.add_sidecar_at(&url)?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    // the metric follows the status poll, which may have run before the lease was taken
    eventually(
        Duration::from_secs(10),
        "the metric says someone leads",
        || async {
            ensure!(
                rig.sidecars[sidecar].metric(metrics::LEADER_PRESENT)? == 1.0,
                "not yet"
            );
            Ok(())
        },
    )
    .await?;

    // the lease cannot be taken or renewed any more (an operator's mistake)
    admin
        .batch_execute("revoke execute on function cqrs.try_lead(text, interval, text) from cqrs_projector")
        .await?;
    eventually(Duration::from_secs(20), "/readyz says nobody leads", || async {
        ensure!(rig.sidecars[sidecar].readiness() == Some(503), "still ready");
        ensure!(
            rig.sidecars[sidecar].metric(metrics::LEADER_PRESENT)? == 0.0,
            "metric still 1"
        );
        Ok(())
    })
    .await
    .with_context(|| rig.logs())?;
    let (_, body) = cqrs_harness::http_get(
        rig.sidecars[sidecar].admin_port(),
        "/readyz",
        Duration::from_secs(2),
    )?;
    ensure!(
        body.contains("no sidecar leads") || body.contains("PostgreSQL unreachable"),
        "/readyz says: {body}"
    );

    admin
        .batch_execute("grant execute on function cqrs.try_lead(text, interval, text) to cqrs_projector")
        .await?;
    rig.wait_for_leader(Duration::from_secs(20))
        .with_context(|| rig.logs())?;
    eventually(
        Duration::from_secs(10),
        "the metric says someone leads",
        || async {
            ensure!(
                rig.sidecars[sidecar].metric(metrics::LEADER_PRESENT)? == 1.0,
                "not yet"
            );
            Ok(())
        },
    )
    .await?;
    Ok(())
}

/// `--help` prints the flags and their environment variables, never a password given in them.
#[test]
fn help_never_prints_a_password_from_the_environment() -> Result<()> {
    let out = Command::new(sidecar_binary()?)
        .arg("--help")
        .env("CQRS_DATABASE_URL", "postgres://app:pg-s3cret@db/shop")
        .env("CQRS_REDIS_URL", "redis://:redis-s3cret@cache/")
        .output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    ensure!(out.status.success(), "--help failed: {help}");
    ensure!(
        help.contains("CQRS_DATABASE_URL"),
        "--help does not name the variable:\n{help}"
    );
    ensure!(
        !help.contains("s3cret"),
        "--help prints a password from the environment:\n{help}"
    );
    Ok(())
}
