//! The leader's work: stream the command log from the slot, project it in adaptive batches,
//! write the changed rows to the cache, and confirm to the slot only what is done.
//!
//! Two tasks: the streamer decodes pgoutput into batches of command-log rows; the flusher
//! projects one batch at a time (`cqrs.project_batch`, with the lease token and the batch's
//! commit LSN), writes the changed rows to Redis (or remembers them for repair), and only then
//! reports the batch's commit LSN as confirmed. Between them is a channel of one batch: while the
//! flusher is busy and a batch waits, the streamer stops reading the stream, so memory stays
//! bounded and PostgreSQL holds the rest.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use backon::{BackoffBuilder, ExponentialBuilder};
use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio_postgres::Client;

use crate::assembly::{Assembler, Batch, Confirmations};
use crate::batching::BatchPolicy;
use crate::cache::{Cache, Entry, Write};
use crate::config::Config;
use crate::http::{Health, Role};
use crate::leader::Leadership;
use crate::metrics::Metrics;
use crate::postgres::Database;
use crate::repair::Repairs;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;

/// How the leader's work ended.
#[derive(Debug)]
pub enum Ending {
    /// Asked to stop: the batch in flight was finished and confirmed.
    Shutdown,
    /// The lease could not be renewed: someone else may lead now.
    LostLeadership,
    /// A newer leader holds the lease.
    Deposed,
    /// Something failed; lead again after a pause.
    Failed(anyhow::Error),
}

/// What the leader needs.
#[derive(Clone)]
pub struct Context {
    pub config: Arc<Config>,
    pub pg: Database,
    pub cache: Arc<Cache>,
    pub repairs: Arc<Mutex<Repairs>>,
    pub metrics: Arc<Metrics>,
    pub health: Arc<Health>,
}

/// Retry delays: exponential from 100 ms, doubling, at most 5 s, with jitter.
fn backoff() -> impl Iterator<Item = Duration> {
    ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_factor(2.0)
        .with_max_delay(Duration::from_secs(5))
        .with_jitter()
        .without_max_times()
        .build()
}

/// Writes changed rows to the cache and raises the synced mark of each projection whose cache
/// has nothing else pending; rows that could not be written are remembered for repair.
pub async fn write_to_cache(ctx: &Context, writes: Vec<Write>) {
    if writes.is_empty() {
        return;
    }
    let mut highest: HashMap<&str, i64> = HashMap::new();
    for write in &writes {
        let rev = highest.entry(write.projection.as_str()).or_insert(write.rev);
        *rev = (*rev).max(write.rev);
    }
    let synced: Vec<(String, i64)> = match ctx.repairs.lock() {
        Ok(repairs) => highest
            .into_iter()
            .filter(|(projection, _)| !repairs.is_pending(projection))
            .map(|(projection, rev)| (projection.to_owned(), rev))
            .collect(),
        Err(_) => Vec::new(),
    };
    match ctx.cache.write_all(&writes, &synced).await {
        Ok(applied) => {
            ctx.metrics
                .cache_writes
                .with_label_values(&["applied"])
                .inc_by(applied as u64);
            ctx.metrics
                .cache_writes
                .with_label_values(&["stale"])
                .inc_by((writes.len() - applied) as u64);
        }
        Err(err) => {
            tracing::warn!(error = %err, rows = writes.len(), "cache write failed; the rows will be repaired when Redis answers");
            ctx.metrics
                .cache_writes
                .with_label_values(&["failed"])
                .inc_by(writes.len() as u64);
            if let Ok(mut repairs) = ctx.repairs.lock() {
                for write in &writes {
                    repairs.remember(&write.projection, &write.key);
                }
                ctx.metrics
                    .cache_repair_pending
                    .set(repairs.pending_keys() as i64);
            }
        }
    }
}

/// Marks for a resync every projection whose cache may be behind its read model: its synced
/// mark is below the projection's revision (the last leader died between a commit and its cache
/// writes) or missing (a cold or emptied Redis). Unknown when Redis is down: resync then too.
pub async fn resync_behind(ctx: &Context, sql: &Client) -> anyhow::Result<()> {
    let rows = sql
        .query(
            "select name, revision from cqrs.projection_state order by name",
            &[],
        )
        .await?;
    for row in rows {
        let (projection, revision): (String, i64) = (row.get(0), row.get(1));
        let behind = match ctx.cache.synced(&projection).await {
            Ok(Some(mark)) => mark < revision,
            // nothing was ever projected: there is nothing the cache could miss
            Ok(None) if revision == 0 => ctx.cache.establish_synced(&projection, 0).await.is_err(),
            Ok(None) => true,
            Err(_) => true,
        };
        if behind {
            if let Ok(mut repairs) = ctx.repairs.lock() {
                if !repairs.is_pending(&projection) {
                    tracing::info!(%projection, revision, "the cache may be behind the read model; resyncing it");
                    repairs.refresh_all(&projection);
                }
            }
        }
    }
    Ok(())
}

/// Changed rows as returned by project_batch / catch_up, as cache writes.
fn writes_from(rows: &[tokio_postgres::Row]) -> Vec<Write> {
    rows.iter()
        .map(|row| {
            let deleted: bool = row.get(4);
            let doc: Option<String> = row.get(3);
            Write {
                projection: row.get(0),
                key: row.get(1),
                rev: row.get(2),
                entry: match (deleted, doc) {
                    (false, Some(doc)) => Entry::Row(doc),
                    _ => Entry::Deleted,
                },
            }
        })
        .collect()
}

/// Creates the publication and the slot when missing; a slot that is gone or lost is recreated
/// and the projections catch up from the log (per-stream sequencing makes the overlap with what
/// the new slot streams harmless).
async fn prepare_slot(ctx: &Context, sql: &Client) -> anyhow::Result<()> {
    let config = &ctx.config;
    let created: bool = sql
        .query_one("select cqrs.ensure_publication($1)", &[&config.publication])
        .await?
        .get(0);
    if created {
        tracing::info!(publication = %config.publication, "created the publication of cqrs.command_log");
    }
    let slot = sql
        .query_opt(
            "select plugin::text, coalesce(wal_status, 'unknown') from pg_catalog.pg_replication_slots where slot_name = $1",
            &[&config.slot],
        )
        .await?;
    let recreate = match slot {
        None => true,
        Some(row) => {
            let (plugin, wal_status): (String, String) = (row.get(0), row.get(1));
            if plugin != "pgoutput" {
                anyhow::bail!(
                    "slot {} uses the {plugin} plugin, not pgoutput: drop it or choose another --slot",
                    config.slot
                );
            }
            if wal_status == "lost" {
                tracing::error!(slot = %config.slot, "the replication slot is lost (its WAL was removed); dropping and recreating it");
                sql.execute("select pg_catalog.pg_drop_replication_slot($1)", &[&config.slot])
                    .await?;
                true
            } else {
                false
            }
        }
    };
    if !recreate {
        return Ok(());
    }
    sql.execute(
        "select pg_catalog.pg_create_logical_replication_slot($1, 'pgoutput')",
        &[&config.slot],
    )
    .await?;
    // projections that have a checkpoint were fed by a slot before: this one was lost
    let fed_before: bool = sql
        .query_one(
            "select exists (select from cqrs.projection_state where checkpoint_lsn is not null)",
            &[],
        )
        .await?
        .get(0);
    let rows = sql
        .query(
            "select projection, key, rev, doc::text, deleted from cqrs.catch_up()",
            &[],
        )
        .await?;
    if fed_before {
        ctx.metrics.slot_recreated.inc();
        tracing::error!(
            slot = %config.slot,
            changed_rows = rows.len(),
            "the replication slot was missing; created a new one and caught the projections up from cqrs.command_log"
        );
    } else {
        tracing::info!(slot = %config.slot, changed_rows = rows.len(), "created the replication slot");
    }
    write_to_cache(ctx, writes_from(&rows)).await;
    Ok(())
}

enum FlushError {
    Deposed,
    Stopped,
}

const PROJECT: &str = "select projection, key, rev, doc::text, deleted \
                       from cqrs.project_batch($1::text::jsonb, $2::text::pg_lsn, $3)";

/// Projects batches one at a time, retrying each until it commits; confirms what is done.
async fn flusher(
    ctx: Context,
    mut sql: Client,
    token: i64,
    mut batches: mpsc::Receiver<Batch>,
    completed: watch::Sender<u64>,
    policy: Arc<Mutex<BatchPolicy>>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), FlushError> {
    let mut statement = sql.prepare(PROJECT).await.ok();
    while let Some(batch) = batches.recv().await {
        let started = Instant::now();
        let lsn = batch.fence().map(cqrs_lsn);
        // the LSN is confirmed by the streamer once this batch is reported done
        let mut delays = backoff();
        let rows = loop {
            let attempt = async {
                if statement.is_none() || sql.is_closed() {
                    sql = ctx
                        .pg
                        .connect(Duration::from_secs(5))
                        .await
                        .map_err(|e| e.to_string())?;
                    statement = Some(sql.prepare(PROJECT).await.map_err(|e| e.to_string())?);
                }
                let Some(statement) = statement.as_ref() else {
                    return Err("no statement".to_owned());
                };
                sql.query(statement, &[&batch.json, &lsn, &token])
                    .await
                    .map_err(|err| match err.as_db_error() {
                        Some(db) if db.code().code() == "55000" && db.message().contains("lease") => {
                            "deposed".to_owned()
                        }
                        _ => err.to_string(),
                    })
            };
            match attempt.await {
                Ok(rows) => break rows,
                Err(reason) if reason == "deposed" => {
                    tracing::error!(
                        "a newer leader holds the projector lease; this sidecar stops projecting"
                    );
                    return Err(FlushError::Deposed);
                }
                Err(reason) => {
                    ctx.metrics.batch_failures.inc();
                    ctx.health.streaming.store(false, Ordering::Relaxed);
                    if let Ok(mut policy) = policy.lock() {
                        policy.record(batch.events, started.elapsed(), false);
                    }
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    tracing::warn!(error = %reason, events = batch.events, retry_in = ?delay, "projecting a batch failed; retrying");
                    if sql.is_closed() {
                        statement = None;
                    }
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = shutdown.wait_for(|stop| *stop) => {
                            tracing::warn!("stopping with a batch that did not commit; it will be streamed again");
                            return Err(FlushError::Stopped);
                        }
                    }
                }
            }
        };
        write_to_cache(&ctx, writes_from(&rows)).await;
        let took = started.elapsed();
        ctx.health.streaming.store(true, Ordering::Relaxed);
        ctx.metrics.flush_duration.observe(took.as_secs_f64());
        ctx.metrics.batch_events.observe(batch.events as f64);
        ctx.metrics.events_projected.inc_by(batch.events as u64);
        if let Some(oldest) = batch.oldest_commit {
            if let Ok(delay) = SystemTime::now().duration_since(oldest) {
                ctx.metrics.event_delay.observe(delay.as_secs_f64());
            }
        }
        if let Ok(mut policy) = policy.lock() {
            policy.record(batch.events, took, true);
            ctx.metrics.batch_target.set(policy.target() as i64);
        }
        completed.send_replace(batch.number);
    }
    Ok(())
}

fn cqrs_lsn(lsn: u64) -> String {
    cqrs_projection::lsn::format(lsn)
}

/// Takes the batch being filled; its last complete commit may be confirmed once it is done.
fn take(assembler: &mut Assembler, confirmations: &mut Confirmations) -> Batch {
    let batch = assembler.take();
    if let Some(lsn) = batch.commit_lsn {
        confirmations.defer(batch.number, lsn);
    }
    batch
}

/// Leads until shutdown, loss of the lock, deposition or failure.
pub async fn lead(ctx: &Context, leadership: &Leadership, mut shutdown: watch::Receiver<bool>) -> Ending {
    let config = Arc::clone(&ctx.config);
    ctx.health.set_role(Role::Leader);
    ctx.metrics.leader.set(1);
    let sql = match ctx.pg.connect(Duration::from_secs(5)).await {
        Ok(sql) => sql,
        Err(err) => return Ending::Failed(err.into()),
    };
    let token = leadership.token();
    tracing::info!(token, slot = %config.slot, "leading: took the projector lease");
    if let Err(err) = prepare_slot(ctx, &sql).await {
        return Ending::Failed(err);
    }
    if let Err(err) = resync_behind(ctx, &sql).await {
        return Ending::Failed(err);
    }
    let mut repl = match ReplicationClient::connect(
        ctx.pg
            .replication_config(&config.slot, &config.publication)
            .with_status_interval(Duration::from_millis(250)),
    )
    .await
    {
        Ok(repl) => repl,
        Err(err) => return Ending::Failed(err.into()),
    };

    let policy = Arc::new(Mutex::new(BatchPolicy::new(
        config.batch_min_events,
        config.batch_max_events,
        config.batch_max_bytes,
        config.batch_max_wait,
        config.batch_target_latency,
    )));
    let (batches_tx, batches_rx) = mpsc::channel::<Batch>(1);
    let (completed_tx, mut completed_rx) = watch::channel(0u64);
    let mut flusher = tokio::spawn(flusher(
        ctx.clone(),
        sql,
        token,
        batches_rx,
        completed_tx,
        Arc::clone(&policy),
        shutdown.clone(),
    ));

    let mut lost = leadership.lost();
    let mut assembler = Assembler::default();
    // a full batch waiting for the flusher; while it waits the stream is not read
    let mut waiting: Option<Batch> = None;
    let mut confirmations = Confirmations::default();
    let confirm = |repl: &ReplicationClient, confirmations: &mut Confirmations, done: u64| {
        if let Some(lsn) = confirmations.advance(done) {
            repl.update_applied_lsn(Lsn::from_u64(lsn));
        }
    };

    let ending = loop {
        let due = assembler.batch.started
            + policy
                .lock()
                .map(|p| p.max_wait())
                .unwrap_or(Duration::from_millis(20));
        tokio::select! {
            biased;
            _ = lost.wait_for(|lost| *lost) => break Ending::LostLeadership,
            _ = shutdown.wait_for(|stop| *stop) => break Ending::Shutdown,
            finished = &mut flusher => {
                break match finished {
                    Ok(Err(FlushError::Deposed)) => Ending::Deposed,
                    Ok(Err(FlushError::Stopped)) => Ending::Shutdown,
                    Ok(Ok(())) => Ending::Failed(anyhow::anyhow!("the flusher stopped")),
                    Err(err) => Ending::Failed(anyhow::anyhow!("the flusher failed: {err}")),
                };
            }
            _ = completed_rx.changed() => {
                let done = *completed_rx.borrow_and_update();
                confirm(&repl, &mut confirmations, done);
            }
            permit = batches_tx.reserve(), if waiting.is_some() => {
                match (permit, waiting.take()) {
                    (Ok(permit), Some(batch)) => permit.send(batch),
                    _ => break Ending::Failed(anyhow::anyhow!("the flusher went away")),
                }
            }
            // Due by age, the batch goes out only once the flusher can take it: until then it
            // keeps growing, so under load batches grow to what arrives during one flush and the
            // per-batch cost is spread (a full batch still stops the reading below).
            permit = async {
                tokio::time::sleep_until(due.into()).await;
                batches_tx.reserve().await
            }, if waiting.is_none() && !assembler.batch.is_empty() => {
                let Ok(permit) = permit else {
                    break Ending::Failed(anyhow::anyhow!("the flusher went away"));
                };
                permit.send(take(&mut assembler, &mut confirmations));
            }
            event = repl.recv(), if waiting.is_none() => {
                let event = match event {
                    Ok(Some(event)) => event,
                    Ok(None) => break Ending::Failed(anyhow::anyhow!("the replication stream ended")),
                    Err(err) => break Ending::Failed(anyhow::anyhow!("replication: {err}")),
                };
                ctx.health.streaming.store(true, Ordering::Relaxed);
                match event {
                    ReplicationEvent::Begin { commit_time_micros, .. } => {
                        let unix = commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS).max(0) as u64;
                        assembler.begin(UNIX_EPOCH + Duration::from_micros(unix));
                    }
                    ReplicationEvent::XLogData { data, .. } => {
                        if let Err(err) = assembler.data(&data) {
                            break Ending::Failed(err);
                        }
                        // a transaction too large for one batch is cut; the part carries no fence
                        let cut = policy.lock().map(|p| p.must_cut(assembler.batch.events, assembler.batch.json.len())).unwrap_or(false);
                        if cut {
                            waiting = Some(take(&mut assembler, &mut confirmations));
                        }
                    }
                    ReplicationEvent::Commit { end_lsn, .. } => {
                        if !assembler.commit(end_lsn.as_u64()) {
                            // its events (if any) went out in batches already taken: confirm it
                            // once they are done
                            confirmations.defer(assembler.taken, end_lsn.as_u64());
                            confirm(&repl, &mut confirmations, *completed_rx.borrow());
                        }
                        let full = policy.lock().map(|p| p.is_full(assembler.batch.events, assembler.batch.json.len())).unwrap_or(false);
                        if full {
                            waiting = Some(take(&mut assembler, &mut confirmations));
                        }
                    }
                    ReplicationEvent::KeepAlive { wal_end, .. } => {
                        // nothing open: everything up to wal_end is done once the batches taken are
                        if !assembler.in_transaction() && assembler.batch.is_empty() {
                            confirmations.defer(assembler.taken, wal_end.as_u64());
                            confirm(&repl, &mut confirmations, *completed_rx.borrow());
                        }
                    }
                    ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
                }
            }
        }
    };

    ctx.health.streaming.store(false, Ordering::Relaxed);
    ctx.metrics.leader.set(0);
    match ending {
        Ending::Shutdown => {
            // finish: hand over what was read, let the flusher finish, confirm, stop
            let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
            let mut remaining = vec![];
            remaining.extend(waiting.take());
            if !assembler.batch.is_empty() {
                remaining.push(take(&mut assembler, &mut confirmations));
            }
            for batch in remaining {
                if tokio::time::timeout_at(deadline, batches_tx.send(batch))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            drop(batches_tx);
            if tokio::time::timeout_at(deadline, &mut flusher).await.is_err() {
                tracing::warn!("the last batch did not finish in time; it will be streamed again");
                flusher.abort();
            }
            let done = *completed_rx.borrow();
            confirm(&repl, &mut confirmations, done);
            // the status update goes out on the stream's status interval
            tokio::time::sleep(Duration::from_millis(300)).await;
            repl.stop();
            let _ = tokio::time::timeout(Duration::from_secs(1), repl.shutdown()).await;
            tracing::info!(confirmed = %cqrs_lsn(confirmations.confirmed), "stopped streaming");
            Ending::Shutdown
        }
        other => {
            // stop at once: another leader may be streaming already
            flusher.abort();
            repl.abort();
            other
        }
    }
}
