//! The flusher: projects the streamer's batches one at a time with `cqrs.project_batch` (the
//! lease token and the batch's fence LSN with each), retrying a batch until it commits, writes
//! the changed rows to the cache, and only then reports the batch done, so that the streamer
//! may confirm its LSN to the slot. A batch's cache write runs while the next batch is
//! projected (one at a time, in batch order): in a catch-up the projecting backend would
//! otherwise wait for Redis after every batch.
//!
//! What happens after a failed attempt is decided by the failure's kind, never by its text: a
//! deposed leader (SQLSTATE [`FENCED_SQLSTATE`]) stops at once, anything else is retried with
//! backoff, on a new connection when the old one broke.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use cqrs_projection::FENCED_SQLSTATE;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::{Client, Row, Statement};

use crate::assembly::Batch;
use crate::batching::BatchPolicy;
use crate::cache_sync::{write_to_cache, writes_from};
use crate::leading::{backoff, Context};
use crate::outbox::Outbox;
use crate::postgres::{ConnectionPurpose, StartupError};
use crate::traces::{self, BatchSpans};
use tracing::Instrument;

/// How the flusher stopped before its channel closed.
#[derive(Debug)]
pub(crate) enum FlushError {
    /// A newer leader holds the lease.
    Deposed,
    /// Asked to stop while a batch was being retried; it did not commit.
    Stopped,
}

impl FlushError {
    fn as_str(&self) -> &'static str {
        match self {
            FlushError::Deposed => "deposed: a newer leader holds the lease",
            FlushError::Stopped => "stopped before the batch committed",
        }
    }
}

/// Why one attempt at a batch did not commit.
#[derive(Debug, thiserror::Error)]
enum AttemptError {
    /// `project_batch` refused the lease token: a newer leader holds the lease.
    #[error("a newer leader holds the projector lease")]
    Deposed,
    /// The connection broke: connect again, then retry.
    #[error("connection: {0}")]
    Connection(tokio_postgres::Error),
    /// Connecting again failed: retry.
    #[error("{0}")]
    Connect(#[from] StartupError),
    /// The database failed the batch (a lock timeout, a restart in progress, …): retry. Shown
    /// by its SQLSTATE alone: the message can hold a command's values.
    #[error("the database failed the batch with SQLSTATE {}", sqlstate_of(.0))]
    Database(tokio_postgres::Error),
}

fn sqlstate_of(err: &tokio_postgres::Error) -> &str {
    err.code().map_or("(none)", |code| code.code())
}

impl From<tokio_postgres::Error> for AttemptError {
    fn from(err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) if db.code().code() == FENCED_SQLSTATE => AttemptError::Deposed,
            Some(_) if !err.is_closed() => AttemptError::Database(err),
            _ => AttemptError::Connection(err),
        }
    }
}

const PROJECT: &str = "select projection, key, rev, doc::text, deleted \
                       from cqrs.project_batch($1::text::jsonb, $2::text::pg_lsn, $3, $4)";

struct Flusher {
    ctx: Context,
    sql: Client,
    /// `PROJECT`, prepared on `sql`; none after the connection broke
    statement: Option<Statement>,
    token: i64,
    policy: Arc<Mutex<BatchPolicy>>,
    shutdown: watch::Receiver<bool>,
}

/// What the flusher takes batches from and reports them done to.
pub(crate) struct Handoff {
    pub(crate) batches: mpsc::Receiver<Batch>,
    /// each batch's number once it committed and its rows went to the cache (or were
    /// remembered for repair)
    pub(crate) completed: watch::Sender<u64>,
    /// the sinks that deliver each committed batch
    pub(crate) outbox: Option<Arc<Outbox>>,
}

/// Projects batches until the channel closes.
pub(crate) async fn run(
    ctx: Context,
    sql: Client,
    token: i64,
    handoff: Handoff,
    policy: Arc<Mutex<BatchPolicy>>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), FlushError> {
    let Handoff {
        mut batches,
        completed,
        outbox,
    } = handoff;
    let statement = sql.prepare(PROJECT).await.ok();
    let mut flusher = Flusher {
        ctx,
        sql,
        statement,
        token,
        policy,
        shutdown,
    };
    // The cache write of the batch committed last, running while the next batch is projected:
    // Redis and PostgreSQL work at once instead of in turn. One at a time, in batch order, and
    // each batch is reported done only after its own write (see Committed).
    let mut caching: Option<CacheWrite> = None;
    let ended = loop {
        let Some(batch) = batches.recv().await else {
            break Ok(());
        };
        let spans = BatchSpans::open(
            batch.number,
            batch.events,
            &flusher.ctx.config.projection_group,
            &batch.traced,
            batch.decoded,
        );
        let started = Instant::now();
        let rows = match flusher
            .project(&batch, started)
            .instrument(tracing::info_span!(parent: &spans.batch, traces::PROJECT_BATCH, otel.kind = "client", db.system.name = "postgresql"))
            .await
        {
            Ok(rows) => rows,
            Err(err) => {
                spans.failed(err.as_str());
                break Err(err);
            }
        };
        flusher.record_success(&batch, started.elapsed());
        if let Some(previous) = caching.take() {
            previous.done().await;
        }
        let committed = Committed { batch, rows, spans };
        caching = Some(CacheWrite(tokio::spawn(committed.finish(
            flusher.ctx.clone(),
            outbox.clone(),
            completed.clone(),
        ))));
    };
    // what committed is cached and reported done before the flusher ends, whatever ended it:
    // its rows are the read models' (a deposed leader's last commit was still valid)
    if let Some(previous) = caching.take() {
        previous.done().await;
    }
    ended
}

/// The task writing a committed batch to the cache. Aborted with the flusher (a lost
/// leadership aborts it): as before the writes overlapped, an aborted flusher neither caches nor
/// hands its sinks anything more — the next leader resyncs the cache and streams the batch again.
struct CacheWrite(JoinHandle<()>);

impl CacheWrite {
    async fn done(mut self) {
        let _ = (&mut self.0).await;
    }
}

impl Drop for CacheWrite {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A batch that committed, on its way out: its changed rows written to the cache, the outbox's
/// sinks given it, then reported done — so the streamer confirms its LSN to the slot only after
/// PostgreSQL committed it and Redis answered.
struct Committed {
    batch: Batch,
    rows: Vec<Row>,
    spans: BatchSpans,
}

impl Committed {
    async fn finish(self, ctx: Context, outbox: Option<Arc<Outbox>>, completed: watch::Sender<u64>) {
        let Committed { batch, rows, spans } = self;
        write_to_cache(&ctx, writes_from(&rows))
            .instrument(tracing::info_span!(parent: &spans.batch, traces::CACHE_WRITE, rows = rows.len()))
            .await;
        // committed: the outbox's sinks deliver it (the slot is confirmed past it once they did)
        if let Some(outbox) = &outbox {
            let _dispatch = tracing::info_span!(parent: &spans.batch, traces::OUTBOX_DISPATCH).entered();
            outbox.dispatch(batch.number, batch.fence(), &batch.json, spans.context.as_ref());
        }
        completed.send_replace(batch.number);
    }
}

impl Flusher {
    /// One batch, retried until it commits, the leader is deposed or asked to stop.
    async fn project(&mut self, batch: &Batch, started: Instant) -> Result<Vec<Row>, FlushError> {
        let fence = batch.fence().map(cqrs_projection::lsn::format);
        let mut delays = backoff();
        loop {
            let failure = match self.attempt(batch, &fence).await {
                Ok(rows) => return Ok(rows),
                Err(AttemptError::Deposed) => {
                    tracing::error!(
                        projection_group = %self.ctx.config.projection_group,
                        "a newer leader holds the group's lease; this sidecar stops projecting"
                    );
                    return Err(FlushError::Deposed);
                }
                Err(failure) => failure,
            };
            self.ctx.metrics.batch_failures.inc();
            self.ctx.health.streaming.store(false, Ordering::Relaxed);
            if let Ok(mut policy) = self.policy.lock() {
                policy.record(batch.events, started.elapsed(), false);
            }
            if matches!(failure, AttemptError::Connection(_) | AttemptError::Connect(_))
                || self.sql.is_closed()
            {
                self.statement = None;
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(5));
            tracing::warn!(error = %failure, events = batch.events, retry_in = ?delay, "projecting a batch failed; retrying");
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = self.shutdown.wait_for(|stop| *stop) => {
                    tracing::warn!("stopping with a batch that did not commit; it will be streamed again");
                    return Err(FlushError::Stopped);
                }
            }
        }
    }

    async fn attempt(&mut self, batch: &Batch, fence: &Option<String>) -> Result<Vec<Row>, AttemptError> {
        let statement = match &self.statement {
            Some(statement) => statement.clone(),
            None => {
                self.sql = self
                    .ctx
                    .pg
                    .connect_for(ConnectionPurpose::Flush, Duration::from_secs(5))
                    .await?;
                let statement = self.sql.prepare(PROJECT).await?;
                self.statement = Some(statement.clone());
                statement
            }
        };
        Ok(self
            .sql
            .query(
                &statement,
                &[&batch.json, fence, &self.token, &self.ctx.config.projection_group],
            )
            .await?)
    }

    fn record_success(&self, batch: &Batch, took: Duration) {
        let metrics = &self.ctx.metrics;
        self.ctx.health.streaming.store(true, Ordering::Relaxed);
        metrics.flush_duration.observe(took.as_secs_f64());
        metrics.batch_events.observe(batch.events as f64);
        metrics.events_projected.inc_by(batch.events as u64);
        for (command_type, count) in &batch.types {
            metrics.count_commands(command_type, *count);
        }
        if let Some(oldest) = batch.oldest_commit {
            if let Ok(delay) = SystemTime::now().duration_since(oldest) {
                metrics.event_delay.observe(delay.as_secs_f64());
            }
        }
        if let Ok(mut policy) = self.policy.lock() {
            policy.record(batch.events, took, true);
            metrics.batch_target.set(policy.target() as i64);
        }
    }
}
