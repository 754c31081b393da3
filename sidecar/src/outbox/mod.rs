//! The outbox: the command log delivered to message brokers (`--sink NAME=nats://…` or
//! `kafka://…`), by the leader of a projection group, from the group's slot.
//!
//! Each sink is a task of its own while its group is led. It starts by catching up from
//! `cqrs.command_log` (per stream, after what it delivered: `cqrs._sink_behind`), then asks to be
//! *attached*: from the next projected batch on, the flusher hands it every batch it committed,
//! and the slot is confirmed only past batches every attached sink acknowledged. A sink that
//! falls behind by more than its queue (the broker down or slow) is detached at once — the slot
//! and the projections go on without it — and catches up from the log again; one that the broker
//! refuses an event for good (too large) halts on it (`cqrs._sink_halt`) until
//! `cqrs.resume_sink`. A sink that must catch up from the log while the group's projections are
//! catching up on the slot waits for them first (at most `--sink-yield`): both at once read the
//! same backlog twice on the same cores, and the read models are what users wait for. Nothing is
//! lost: what a sink delivered is recorded per stream, fenced by
//! the group's lease (`cqrs._sink_delivered`), only after the broker acknowledged it, and a
//! sink skips what that record says it delivered. Duplicates are made harmless: a crash between
//! the broker's acknowledgement and the record sends an event again with the same message id,
//! which JetStream drops within its duplicate window; a Kafka consumer skips a stream's seq it
//! has seen (the headers carry both).

mod broker;
pub mod delivery;
mod kafka;
mod nats;
pub mod spec;

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::leading::{backoff, Context};
use crate::postgres::ConnectionPurpose;
use crate::traces;
use broker::{Broker, PublishFailure};
use delivery::{Delivery, Event};
use spec::SinkSpec;
use tracing::Instrument;

/// Projected batches a sink may have waiting before it is detached (and catches up from the log).
const QUEUE_BATCHES: usize = 256;
/// Command-log rows per chunk of a catch-up.
const CATCH_UP_CHUNK: i32 = 2_000;
/// How often a halted sink looks whether it was resumed, and an idle one catches up.
const LOOK_AGAIN: Duration = Duration::from_secs(1);
/// How long a sink's first catch-up waits to hear whether the projections are catching up.
const FIRST_WORD: Duration = Duration::from_secs(5);

/// What the flusher and the streamer see of one sink.
struct Shared {
    /// the flusher hands it batches
    attached: AtomicBool,
    /// it caught up and wants batches from the next one on
    wants_attaching: AtomicBool,
    /// every batch up to this number is delivered (meaningful while attached)
    acked: AtomicU64,
}

struct Handle {
    name: String,
    shared: Arc<Shared>,
    queue: mpsc::Sender<Arc<Delivery>>,
    task: JoinHandle<()>,
}

/// The sinks of one leadership.
pub struct Outbox {
    sinks: Vec<Handle>,
    /// bumped whenever a sink acknowledges a batch (the streamer confirms the slot again)
    acked_tx: watch::Sender<u64>,
    /// true while the group's projections are catching up on the slot, false once they are not;
    /// none until the streamer has read its first transaction or been told it is at the end
    projections_behind: watch::Sender<Option<bool>>,
}

impl Outbox {
    /// Starts a task per configured sink for the leadership of `token`; none configured, none.
    pub fn start(ctx: &Context, token: i64) -> Option<Arc<Self>> {
        if ctx.config.sinks.is_empty() {
            return None;
        }
        let (acked_tx, _) = watch::channel(0u64);
        let (projections_behind, _) = watch::channel(None);
        let sinks = ctx
            .config
            .sinks
            .iter()
            .map(|spec| {
                let shared = Arc::new(Shared {
                    attached: AtomicBool::new(false),
                    wants_attaching: AtomicBool::new(false),
                    acked: AtomicU64::new(0),
                });
                let (queue, batches) = mpsc::channel(QUEUE_BATCHES);
                let sink = Sink {
                    ctx: ctx.clone(),
                    spec: spec.clone(),
                    token,
                    shared: Arc::clone(&shared),
                    batches,
                    acked_tx: acked_tx.clone(),
                    projections_behind: projections_behind.subscribe(),
                };
                Handle {
                    name: spec.name.clone(),
                    shared,
                    queue,
                    task: tokio::spawn(sink.run()),
                }
            })
            .collect();
        Some(Arc::new(Self {
            sinks,
            acked_tx,
            projections_behind,
        }))
    }

    /// The streamer's word on whether the projections are catching up on the slot (it says
    /// only what changed).
    pub fn set_projections_catching_up(&self, catching_up: bool) {
        self.projections_behind.send_replace(Some(catching_up));
    }

    /// Changes whenever a sink acknowledged a batch.
    pub fn acked(&self) -> watch::Receiver<u64> {
        self.acked_tx.subscribe()
    }

    /// Hands a committed batch to every attached sink (and attaches those that asked); a sink
    /// whose queue is full is detached.
    pub fn dispatch(
        &self,
        number: u64,
        commit_lsn: Option<u64>,
        json: &str,
        batch_span: Option<&opentelemetry::trace::SpanContext>,
    ) {
        let mut delivery = None;
        for sink in &self.sinks {
            if !sink.shared.attached.load(Ordering::Acquire)
                && sink.shared.wants_attaching.swap(false, Ordering::AcqRel)
            {
                sink.shared
                    .acked
                    .store(number.saturating_sub(1), Ordering::Release);
                sink.shared.attached.store(true, Ordering::Release);
            }
            if !sink.shared.attached.load(Ordering::Acquire) {
                continue;
            }
            let batch = match &delivery {
                Some(batch) => Arc::clone(batch),
                None => match Delivery::of_batch(number, commit_lsn, json) {
                    Ok(mut batch) => {
                        batch.batch_span = batch_span.cloned();
                        Arc::clone(delivery.insert(Arc::new(batch)))
                    }
                    Err(err) => {
                        // cannot happen for what project_batch took; the sinks catch up instead
                        tracing::error!(error = %err, "a projected batch could not be split into events; the sinks catch up from the log");
                        self.detach_all();
                        return;
                    }
                },
            };
            if sink.queue.try_send(batch).is_err() {
                sink.shared.attached.store(false, Ordering::Release);
                tracing::warn!(sink = %sink.name, queued = QUEUE_BATCHES, "the sink fell behind the projections; it catches up from the log, the slot goes on without it");
            }
        }
    }

    fn detach_all(&self) {
        for sink in &self.sinks {
            sink.shared.attached.store(false, Ordering::Release);
        }
    }

    /// The highest batch number every attached sink has delivered, at most `done`.
    pub fn floor(&self, done: u64) -> u64 {
        self.sinks
            .iter()
            .filter(|s| s.shared.attached.load(Ordering::Acquire))
            .map(|s| s.shared.acked.load(Ordering::Acquire))
            .fold(done, u64::min)
    }
}

impl Drop for Outbox {
    fn drop(&mut self) {
        // the leadership ended: a deposed leader's sinks stop with it
        for sink in &self.sinks {
            sink.task.abort();
        }
    }
}

/// Why delivering stopped.
#[derive(Debug, thiserror::Error)]
enum SinkError {
    #[error("PostgreSQL: {}", crate::postgres::describe_error(.0))]
    Database(#[from] tokio_postgres::Error),
    #[error("connecting to PostgreSQL: {0}")]
    Connect(#[from] crate::postgres::StartupError),
    #[error("{0}")]
    Publish(#[from] PublishFailure),
    #[error("a command-log row: {0}")]
    Row(#[from] serde_json::Error),
    #[error("the group's lease was taken over")]
    Deposed,
    #[error("the sink is halted")]
    Halted,
    #[error("detached: it fell behind")]
    Detached,
    #[error("a projected batch holds a stream's command whose predecessor the sink has not delivered")]
    Gap,
}

impl SinkError {
    fn from_db(err: tokio_postgres::Error) -> Self {
        match err.as_db_error() {
            Some(db) if db.code().code() == cqrs_projection::FENCED_SQLSTATE => SinkError::Deposed,
            _ => SinkError::Database(err),
        }
    }
}

/// One sink's task.
struct Sink {
    ctx: Context,
    spec: SinkSpec,
    token: i64,
    shared: Arc<Shared>,
    batches: mpsc::Receiver<Arc<Delivery>>,
    acked_tx: watch::Sender<u64>,
    projections_behind: watch::Receiver<Option<bool>>,
}

impl Sink {
    async fn run(mut self) {
        let name = self.spec.name.clone();
        let mut delays = backoff();
        loop {
            match self.deliver().await {
                Err(SinkError::Deposed) => {
                    tracing::error!(sink = %name, "the group's lease was taken over; the sink stops with the leadership");
                    return;
                }
                Err(SinkError::Halted) => {
                    self.metric_halted(true);
                    tokio::time::sleep(LOOK_AGAIN).await;
                }
                Err(SinkError::Detached) => {
                    delays = backoff();
                }
                Err(SinkError::Gap) => {
                    tracing::warn!(sink = %name, "a projected batch skips a command the sink has not delivered; it catches up from the log");
                    delays = backoff();
                }
                Err(err) => {
                    let delay = delays.next().unwrap_or(Duration::from_secs(5));
                    self.ctx
                        .metrics
                        .sink_failures
                        .with_label_values(&[name.as_str()])
                        .inc();
                    tracing::warn!(sink = %name, broker = %self.spec.broker(), error = %err, retry_in = ?delay, "delivering to the sink failed; retrying");
                    tokio::time::sleep(delay).await;
                }
                Ok(()) => return,
            }
            self.shared.attached.store(false, Ordering::Release);
            self.shared.wants_attaching.store(false, Ordering::Release);
            self.metric_attached(false);
            // what was queued is delivered by the next catch-up
            while self.batches.try_recv().is_ok() {}
        }
    }

    /// Catch up, attach, catch up once more (what was projected before the attachment), then
    /// deliver the batches handed over, until something stops it.
    async fn deliver(&mut self) -> Result<(), SinkError> {
        let sql = self
            .ctx
            .pg
            .connect_for(ConnectionPurpose::Sink, Duration::from_secs(5))
            .await?;
        sql.execute(
            "select cqrs._ensure_sink($1, $2)",
            &[&self.spec.name, &self.ctx.config.projection_group],
        )
        .await
        .map_err(SinkError::from_db)?;
        self.check_halted(&sql).await?;
        self.metric_halted(false);
        let broker = Broker::connect(&self.spec).await?;
        self.catch_up(&sql, &broker).await?;
        self.shared.wants_attaching.store(true, Ordering::Release);
        while !self.shared.attached.load(Ordering::Acquire) {
            // no batch came to attach it (nothing is written): keep up from the log meanwhile
            tokio::time::sleep(Duration::from_millis(50)).await;
            if !self.shared.attached.load(Ordering::Acquire) {
                tokio::time::sleep(LOOK_AGAIN).await;
                self.catch_up(&sql, &broker).await?;
            }
        }
        self.catch_up(&sql, &broker).await?;
        self.metric_attached(true);
        tracing::info!(sink = %self.spec.name, broker = %self.spec.broker(), "the sink caught up with the log and delivers as the projections go");
        loop {
            let Some(batch) = self.batches.recv().await else {
                return Ok(());
            };
            if !self.shared.attached.load(Ordering::Acquire) {
                return Err(SinkError::Detached);
            }
            self.send(&sql, &broker, &batch).await?;
            if let Some(number) = batch.number {
                self.shared.acked.store(number, Ordering::Release);
                self.acked_tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Delivers what the sink has not delivered, walking the log by position from the oldest
    /// such command (`cqrs._sink_behind_start`) chunk after chunk (`cqrs._sink_behind`). A walk
    /// that left something behind (a command that committed after the walk passed its position)
    /// is followed by another from there; what commits ahead of the walk once it ended is the
    /// next catch-up's or, attached, the projected batches'.
    async fn catch_up(&mut self, sql: &Client, broker: &Broker) -> Result<(), SinkError> {
        let mut walked_to: Option<i64> = None;
        let mut yield_until = None;
        loop {
            self.yield_to_projections(&mut yield_until).await;
            // one statement, one snapshot: where to start, and where the log ends in it
            let row = sql
                .query_one(
                    "select cqrs._sink_behind_start($1), (select max(l.position) from cqrs.command_log l),
                            (select s.checkpoint_position from cqrs.sink s where s.name = $1)",
                    &[&self.spec.name],
                )
                .await
                .map_err(SinkError::from_db)?;
            let (start, log_end, checkpoint): (Option<i64>, Option<i64>, Option<i64>) =
                (row.get(0), row.get(1), row.get(2));
            let Some(start) = start else {
                // Everything this snapshot holds is delivered. A walk whose last chunk had a gap
                // left the checkpoint below the log's end, and nothing else would move it there
                // before the next write: say it, or the sink looks behind for good.
                if let Some(end) = log_end.filter(|end| checkpoint.is_none_or(|c| c < *end)) {
                    self.delivered_to(sql, end).await?;
                }
                return Ok(());
            };
            if walked_to.is_some_and(|end| start > end) {
                return Ok(());
            }
            let mut after = start - 1;
            let walk_began = after;
            loop {
                self.yield_to_projections(&mut yield_until).await;
                let rows = sql
                    .query(
                        "select event_position, event from cqrs._sink_behind($1, $2, $3)",
                        &[&self.spec.name, &after, &CATCH_UP_CHUNK],
                    )
                    .await
                    .map_err(SinkError::from_db)?;
                let Some(last) = rows.last() else {
                    break;
                };
                after = last.get(0);
                walked_to = Some(after);
                let events = rows
                    .iter()
                    .map(|row| Event::parse(row.get::<_, &str>(1)))
                    .collect::<Result<Vec<_>, _>>()?;
                let chunk = Delivery {
                    number: None,
                    commit_lsn: None,
                    events,
                    batch_span: None,
                };
                self.send(sql, broker, &chunk).await?;
            }
            if after == walk_began {
                // nothing after the start: only another writer of this sink's progress could
                // have done it; the next catch-up looks again
                return Ok(());
            }
        }
    }

    /// Moves the checkpoint position to `end` (never back): everything up to it is delivered.
    async fn delivered_to(&self, sql: &Client, end: i64) -> Result<(), SinkError> {
        let none: [&str; 0] = [];
        let no_seqs: [i64; 0] = [];
        sql.execute(
            "select cqrs._sink_delivered($1, $2, $3, $4, null, $5, 0)",
            &[&self.spec.name, &self.token, &&none[..], &&no_seqs[..], &end],
        )
        .await
        .map_err(SinkError::from_db)?;
        Ok(())
    }

    /// Waits while the group's projections are catching up on the slot, until `--sink-yield`
    /// after the first wait of this catch-up (`until`); past that the sink goes on beside them.
    async fn yield_to_projections(&mut self, until: &mut Option<Instant>) {
        let limit = self.ctx.config.sink_yield;
        if limit.is_zero() {
            return;
        }
        if self.projections_behind.borrow().is_none() {
            // a leadership's first moments: the streamer has not read anything yet
            let _ = tokio::time::timeout(FIRST_WORD, self.projections_behind.wait_for(Option::is_some)).await;
        }
        if *self.projections_behind.borrow() != Some(true) {
            return;
        }
        let until = *until.get_or_insert_with(|| Instant::now() + limit);
        let Some(left) = until.checked_duration_since(Instant::now()) else {
            return;
        };
        tracing::info!(sink = %self.spec.name, at_most = ?left, "the projections are catching up on the slot; the sink waits for them before it catches up from the log");
        let yielding = self
            .ctx
            .metrics
            .sink_yielding
            .with_label_values(&[self.spec.name.as_str()]);
        yielding.set(1);
        let waited = Instant::now();
        let caught_up = tokio::time::timeout(
            left,
            self.projections_behind.wait_for(|behind| *behind != Some(true)),
        )
        .await;
        yielding.set(0);
        match caught_up {
            Ok(_) => {
                tracing::info!(sink = %self.spec.name, waited = ?waited.elapsed(), "the projections caught up; the sink catches up from the log")
            }
            Err(_) => {
                tracing::warn!(sink = %self.spec.name, waited = ?waited.elapsed(), "the projections are still catching up; the sink catches up beside them (--sink-yield)")
            }
        }
    }

    /// Publishes what of `delivery` the sink takes and has not delivered yet, then records it.
    /// Each stream's events are taken only as a run from its next seq on: an event after a gap
    /// (its predecessor committed after a catch-up walked past it) is left to the next walk, and
    /// a projected batch with a gap detaches the sink to catch up from the log.
    async fn send(&self, sql: &Client, broker: &Broker, delivery: &Delivery) -> Result<(), SinkError> {
        let streams: Vec<&str> = delivery.heads().into_keys().collect();
        let mut next: HashMap<String, i64> = sql
            .query(
                "select stream, last_seq from cqrs._sink_progress($1, $2)",
                &[&self.spec.name, &streams],
            )
            .await
            .map_err(SinkError::from_db)?
            .iter()
            .map(|row| (row.get::<_, String>(0), row.get::<_, i64>(1) + 1))
            .collect();
        let mut heads: BTreeMap<&str, i64> = BTreeMap::new();
        let mut gap = false;
        let mut fresh: Vec<&Event> = Vec::with_capacity(delivery.events.len());
        for event in &delivery.events {
            let Some(expected) = next.get_mut(event.stream.as_str()) else {
                continue;
            };
            if event.seq < *expected {
                continue;
            }
            if event.seq > *expected {
                gap = true;
                continue;
            }
            *expected += 1;
            heads.insert(event.stream.as_str(), event.seq);
            if self.spec.takes(&event.stream, &event.command_type) {
                fresh.push(event);
            }
        }
        if gap && delivery.number.is_some() {
            return Err(SinkError::Gap);
        }
        let duplicates = self
            .publish(sql, broker, &fresh)
            .instrument(traces::sink_publish_span(
                &self.spec.name,
                self.spec.messaging_system(),
                fresh.len(),
                delivery.batch_span.as_ref(),
            ))
            .await?;
        let (streams, seqs): (Vec<&str>, Vec<i64>) = heads.into_iter().unzip();
        let lsn = delivery.commit_lsn.map(cqrs_projection::lsn::format);
        // the checkpoint position stays where it is while a gap is behind it
        let max_position = if gap { None } else { delivery.max_position() };
        sql.execute(
            "select cqrs._sink_delivered($1, $2, $3, $4, $5::text::pg_lsn, $6, $7)",
            &[
                &self.spec.name,
                &self.token,
                &streams,
                &seqs,
                &lsn,
                &max_position,
                &(fresh.len() as i64),
            ],
        )
        .await
        .map_err(SinkError::from_db)?;
        let label = [self.spec.name.as_str()];
        self.ctx
            .metrics
            .sink_delivered
            .with_label_values(&label)
            .inc_by(fresh.len() as u64);
        self.ctx
            .metrics
            .sink_duplicates
            .with_label_values(&label)
            .inc_by(duplicates);
        Ok(())
    }

    /// Publishes `events`; an event the broker refuses halts the sink. Any other failure ends the
    /// delivery: the sink is detached (the slot goes on without it), and once the broker answers
    /// again it catches up from the log, which holds whatever was not recorded as delivered.
    async fn publish(&self, sql: &Client, broker: &Broker, events: &[&Event]) -> Result<u64, SinkError> {
        match broker.publish(events).await {
            Ok(duplicates) => Ok(duplicates),
            Err(PublishFailure::Refused { position, reason }) => {
                tracing::error!(sink = %self.spec.name, position, %reason, "the broker refuses an event for good; the sink halts on it (select cqrs.resume_sink(name) once the cause is fixed)");
                sql.execute(
                    "select cqrs._sink_halt($1, $2, $3, $4)",
                    &[&self.spec.name, &self.token, &reason, &position],
                )
                .await
                .map_err(SinkError::from_db)?;
                Err(SinkError::Halted)
            }
            Err(transient) => Err(SinkError::Publish(transient)),
        }
    }

    async fn check_halted(&self, sql: &Client) -> Result<(), SinkError> {
        let halted: bool = sql
            .query_one("select halted from cqrs.sink where name = $1", &[&self.spec.name])
            .await
            .map_err(SinkError::from_db)?
            .get(0);
        if halted {
            return Err(SinkError::Halted);
        }
        Ok(())
    }

    fn metric_halted(&self, halted: bool) {
        self.ctx
            .metrics
            .sink_halted
            .with_label_values(&[self.spec.name.as_str()])
            .set(i64::from(halted));
    }

    fn metric_attached(&self, attached: bool) {
        self.ctx
            .metrics
            .sink_attached
            .with_label_values(&[self.spec.name.as_str()])
            .set(i64::from(attached));
    }
}
