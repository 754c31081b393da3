//! The cache on a Redis Cluster: a real six-node cluster (three masters, a replica each) on
//! loopback, real PostgreSQL and sidecar processes, and the faults a cluster has — a master
//! killed with SIGKILL while the projector writes (its replica promoted, writes it had not
//! copied lost), slots resharded under writes, the whole cluster down. Every test ends with the
//! verdict of the single-Redis tests: the read models equal the fold of the log and every cached
//! entry equals its row (nothing stale, nothing missing).

use std::time::{Duration, Instant};

use anyhow::{ensure, Result};
use cqrs_e2e::rig::Rig;
use cqrs_e2e::{eventually, fault_seed};
use cqrs_harness::redis_cluster::NODE_TIMEOUT;
use cqrs_harness::{http_get, ClusterOptions, RedisCluster};
use cqrs_sidecar::metrics;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

/// A rig caching in a fresh six-node cluster, with `sidecars` sidecars and a leader among them.
async fn rig_on_a_cluster(sidecars: usize) -> Result<(Rig, usize)> {
    let mut rig = Rig::start_with_options(ClusterOptions::default()).await?;
    rig.use_redis_cluster(RedisCluster::start()?);
    // a failover is found by the status poller: look often
    rig.set("CQRS_STATUS_INTERVAL", "1s");
    for _ in 0..sidecars {
        rig.add_sidecar()?;
    }
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    Ok((rig, leader))
}

fn cluster(rig: &mut Rig) -> &mut RedisCluster {
    rig.redis_cluster.as_mut().expect("the rig caches in a cluster")
}

/// 50,000 commands across 1,000 streams from 4 writers, a leader and a standby, the cache a
/// cluster; then the read API: hits, a miss filled, a negative entry — all against the cluster.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_thousand_commands_are_cached_in_a_redis_cluster() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let (rig, leader) = rig_on_a_cluster(2).await?;
    let started = Instant::now();
    let traffic = rig.start_order_traffic(&mut rng, 50_000, 4, None).await?;
    let appended = traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(90)).await?;
    eprintln!(
        "{appended} commands projected and cached in the cluster {:.1?} after the first append",
        started.elapsed()
    );
    let masters = rig
        .redis_cluster
        .as_ref()
        .map(RedisCluster::masters)
        .unwrap_or_default();
    let spread: Vec<String> = masters
        .iter()
        .map(|m| {
            let cluster = rig.redis_cluster.as_ref().expect("cluster");
            cluster.cli(*m, &["DBSIZE"]).unwrap_or_default()
        })
        .collect();
    ensure!(
        spread.iter().all(|keys| keys.parse::<u64>().unwrap_or(0) > 200),
        "the entries are not spread over the masters: {spread:?}"
    );

    let port = rig.sidecars[leader].http_port();
    let timeout = Duration::from_secs(5);
    let (status, body) = http_get(port, "/v1/projections/order_summary/order-7", timeout)?;
    ensure!(
        status == 200 && body.contains("order-7"),
        "a hit: {status} {body}"
    );
    let cluster = rig.redis_cluster.as_ref().expect("cluster");
    ensure!(cluster.cli_for_key(&["DEL", "cqrs:order_summary:order-8"])? == "1");
    let (status, body) = http_get(port, "/v1/projections/order_summary/order-8", timeout)?;
    ensure!(
        status == 200 && body.contains("order-8"),
        "a miss: {status} {body}"
    );
    let (status, _) = http_get(port, "/v1/projections/order_summary/no-such-order", timeout)?;
    ensure!(status == 404, "an absent row: {status}");
    rig.assert_consistent(Duration::from_secs(30)).await?;
    ensure!(rig.sidecars[leader].metric(metrics::EVENTS_PROJECTED_TOTAL)? >= appended as f64);
    Ok(())
}

/// A master is killed with SIGKILL while the projector writes (twice, a different one each
/// time): its replica takes over, possibly without the last writes it acknowledged; the sidecar
/// notices the new master and resyncs, and the killed node comes back as a replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_while_projecting_leaves_nothing_stale_or_missing() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let (mut rig, leader) = rig_on_a_cluster(1).await?;
    let traffic = rig
        .start_order_traffic(&mut rng, 30_000, 2, Some(1_000.0))
        .await?;
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_millis(rng.random_range(2_000..5_000))).await;
        let masters = cluster(&mut rig).masters();
        let victim = masters[rng.random_range(0..masters.len())];
        cluster(&mut rig).kill_node(victim);
        // the failover: the node timeout, then an election
        tokio::time::sleep(NODE_TIMEOUT * 2).await;
        cluster(&mut rig).wait_healthy(Duration::from_secs(30))?;
        cluster(&mut rig).start_node(victim)?;
    }
    let appended = traffic.finish().await?;
    cluster(&mut rig).wait_healthy(Duration::from_secs(30))?;
    rig.assert_consistent(Duration::from_secs(90)).await?;
    ensure!(
        rig.sidecars[leader].readiness() == Some(200),
        "projecting stopped while a master failed over"
    );
    eprintln!(
        "{appended} commands; {} failed cache writes",
        rig.sidecars[leader]
            .metric("cqrs_cache_writes_total{result=\"failed\"}")
            .unwrap_or(0.0)
    );
    Ok(())
}

/// A third of the slots move from one master to another (`redis-cli --cluster reshard`, keys and
/// all) while commands are projected: the client follows ASK and MOVED, nothing is lost.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reshard_during_writes_loses_nothing() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let (mut rig, _) = rig_on_a_cluster(1).await?;
    let traffic = rig
        .start_order_traffic(&mut rng, 20_000, 2, Some(1_000.0))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let masters = cluster(&mut rig).masters();
    let started = Instant::now();
    cluster(&mut rig).reshard(masters[0], masters[1], 2_000)?;
    eprintln!("resharded 2,000 slots in {:.1?} during writes", started.elapsed());
    traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    Ok(())
}

/// Every node of the cluster is killed for 10 s (no persistence: everything is lost) while
/// commands keep being projected; when the nodes are back on their ports the sidecar repairs
/// what it missed and resyncs the rest.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_whole_cluster_down_ten_seconds_is_repaired() -> Result<()> {
    let _serial = serial().await;
    let mut rng = StdRng::seed_from_u64(fault_seed());
    let (mut rig, leader) = rig_on_a_cluster(1).await?;
    let traffic = rig
        .start_order_traffic(&mut rng, 20_000, 2, Some(1_000.0))
        .await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    for node in 0..6 {
        cluster(&mut rig).kill_node(node);
    }
    tokio::time::sleep(Duration::from_secs(10)).await;
    ensure!(
        rig.sidecars[leader].readiness() == Some(200),
        "projecting stopped while the cluster was down"
    );
    for node in 0..6 {
        cluster(&mut rig).start_node(node)?;
    }
    cluster(&mut rig).wait_healthy(Duration::from_secs(60))?;
    traffic.finish().await?;
    rig.assert_consistent(Duration::from_secs(90)).await?;
    eventually(Duration::from_secs(10), "no repair pending", || async {
        let pending = rig.sidecars[leader].metric(metrics::CACHE_REPAIR_PENDING_KEYS)?;
        ensure!(pending == 0.0, "{pending} keys still to repair");
        Ok(())
    })
    .await
}
