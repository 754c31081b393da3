//! The leader's work: stream the command log from the slot, project it in adaptive batches,
//! write the changed rows to the cache, and confirm to the slot only what is done.
//!
//! Two tasks: the streamer decodes pgoutput into batches of command-log rows; the flusher
//! projects one batch at a time (`cqrs.project_batch`, with the lease token and the batch's
//! commit LSN), writes the changed rows to Redis (or remembers them for repair), and only then
//! reports the batch's commit LSN as confirmed. Between them is a channel of one batch: while the
//! flusher is busy and a batch waits, the streamer stops reading the stream, so memory stays
//! bounded and PostgreSQL holds the rest.

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, UNIX_EPOCH};

use pgwire_replication::{Lsn, ReplicationClient, ReplicationEvent};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_postgres::Client;

use crate::assembly::{Assembler, Batch, Confirmations};
use crate::batching::BatchPolicy;
use crate::cache_sync::{resync_behind, write_to_cache, writes_from};
use crate::flusher::{self, FlushError};
use crate::leader::Leadership;
use crate::leading::Context;
use crate::outbox::Outbox;
use crate::postgres::ConnectionPurpose;
use crate::traces;
use tracing::Instrument;

/// Microseconds between the Unix epoch and PostgreSQL's (2000-01-01).
const PG_EPOCH_OFFSET_MICROS: i64 = 946_684_800_000_000;
/// Transactions read this long after they committed: the projections are catching up on the
/// slot (the sinks that are behind wait for them: see `outbox`).
const CATCHING_UP_MICROS: i64 = 2_000_000;

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
    Failed(StreamError),
}

/// Why the leader's streaming failed (it leads again after a pause).
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("{0}")]
    Database(#[from] tokio_postgres::Error),
    #[error("{0}")]
    Connect(#[from] crate::postgres::StartupError),
    #[error("replication: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    #[error("{0}")]
    Decode(#[from] crate::assembly::StreamDecodeError),
    #[error("slot {slot} uses the {plugin} plugin, not pgoutput: drop it or choose another --slot")]
    ForeignSlot { slot: String, plugin: String },
    /// The replication stream or the flusher ended without an error of its own.
    #[error("{0}")]
    Ended(&'static str),
    #[error("the flusher failed: {0}")]
    Flusher(String),
}

/// Creates the publication and the slot when missing; a slot that is gone or lost is recreated
/// and the projections catch up from the log (per-stream sequencing makes the overlap with what
/// the new slot streams harmless).
async fn prepare_slot(ctx: &Context, sql: &Client) -> Result<(), StreamError> {
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
                return Err(StreamError::ForeignSlot {
                    slot: config.slot.clone(),
                    plugin,
                });
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
    // projections of the group that have a checkpoint were fed by a slot before: this one was
    // lost (or the projection moved here from another group, whose slot fed it)
    let group = &config.projection_group;
    let fed_before: bool = sql
        .query_one(
            "select exists (select from cqrs.projection_state s join cqrs.projection p on p.name = s.name
                             where s.checkpoint_lsn is not null and p.projection_group = $1)",
            &[group],
        )
        .await?
        .get(0);
    // the group's projections only: another group's leader feeds the others from its own slot
    let span = traces::catch_up_span(group);
    let rows = sql
        .query(
            "select c.projection, c.key, c.rev, c.doc::text, c.deleted
               from cqrs.projection p cross join lateral cqrs.catch_up(p.name) c
              where p.projection_group = $1",
            &[group],
        )
        .instrument(span.clone())
        .await?;
    span.record("changed_rows", rows.len());
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
    write_to_cache(ctx, writes_from(&rows))
        .instrument(tracing::info_span!(parent: &span, traces::CACHE_WRITE, rows = rows.len()))
        .await;
    Ok(())
}

fn cqrs_lsn(lsn: u64) -> String {
    cqrs_projection::lsn::format(lsn)
}

/// Leads until shutdown, loss of the lease, deposition or failure.
pub async fn lead(ctx: &Context, leadership: &Leadership, shutdown: watch::Receiver<bool>) -> Ending {
    ctx.health.set_leading(leadership.expiry());
    ctx.metrics.set_leading(Some(leadership.expiry()));
    tracing::info!(
        token = leadership.token(),
        slot = %ctx.config.slot,
        projection_group = %ctx.config.projection_group,
        "leading: took the group's lease"
    );
    // The lease can be lost while the stream is being set up (a slot being created waits for
    // every running transaction): stop leading then, so that this sidecar does not go on saying
    // it leads (cqrs_leader) beside the one that took the lease over.
    let mut lost = leadership.lost();
    let started = tokio::select! {
        started = Streaming::start(ctx, leadership.token(), shutdown.clone()) => started,
        _ = lost.wait_for(|lost| *lost) => {
            ctx.metrics.set_leading(None);
            return Ending::LostLeadership;
        }
    };
    let ending = match started {
        Ok(mut streaming) => {
            let ending = streaming.stream(leadership.lost(), shutdown).await;
            ctx.health.streaming.store(false, Ordering::Relaxed);
            ctx.metrics.set_leading(None);
            streaming.finish(ending).await
        }
        Err(err) => Ending::Failed(err),
    };
    ctx.health.streaming.store(false, Ordering::Relaxed);
    ctx.metrics.set_leading(None);
    ending
}

/// What the streamer waits for next.
enum Step {
    End(Ending),
    /// The flusher finished a batch.
    Completed,
    /// The flusher can take the batch that waits.
    SendWaiting(mpsc::OwnedPermit<Batch>),
    /// The batch being filled is due by age and the flusher can take it.
    SendDue(mpsc::OwnedPermit<Batch>),
    Received(ReplicationEvent),
}

/// The streamer's state while it leads: the replication stream, the batch being filled, the
/// batch waiting for the flusher, and what may be confirmed once which batch is done.
struct Streaming {
    ctx: Context,
    repl: ReplicationClient,
    policy: Arc<Mutex<BatchPolicy>>,
    assembler: Assembler,
    /// a full batch waiting for the flusher; while it waits the stream is not read
    waiting: Option<Batch>,
    confirmations: Confirmations,
    batches: mpsc::Sender<Batch>,
    completed: watch::Receiver<u64>,
    flusher: JoinHandle<Result<(), FlushError>>,
    /// the sinks of this leadership; the slot is confirmed only past what they delivered
    outbox: Option<Arc<Outbox>>,
    /// changes when a sink acknowledged a batch
    outbox_acked: watch::Receiver<u64>,
    /// the commit time of the transaction being read (server clock, µs since 2000)
    commit_time_micros: i64,
    /// the server's WAL flush position when streaming began
    wal_end_at_start: u64,
    /// caught up with the stream while the projections were catching up: they are at the end
    /// once this batch (the last one taken then) is done
    end_in_batch: Option<u64>,
    /// what the sinks were last told (only a change is sent: this is checked per message)
    catching_up: Option<bool>,
}

impl Streaming {
    /// Slot and publication ready, the cache resynced where it may be behind, the replication
    /// stream open and the flusher running.
    async fn start(ctx: &Context, token: i64, shutdown: watch::Receiver<bool>) -> Result<Self, StreamError> {
        let config = &ctx.config;
        let sql = ctx
            .pg
            .connect_for(ConnectionPurpose::Flush, Duration::from_secs(5))
            .await?;
        prepare_slot(ctx, &sql).await?;
        resync_behind(ctx, &sql).await?;
        // where the server's WAL ended as this leadership began: until the stream has passed
        // it, a keepalive with nothing to read does not mean the projections are at the end
        let wal_end_at_start: i64 = sql
            .query_one(
                "select pg_catalog.pg_wal_lsn_diff(pg_catalog.pg_current_wal_flush_lsn(), '0/0')::bigint",
                &[],
            )
            .await?
            .get(0);
        let wal_end_at_start = u64::try_from(wal_end_at_start).unwrap_or(0);
        let repl = ReplicationClient::connect(
            ctx.pg
                .replication_config(&config.slot, &config.publication)
                .with_status_interval(Duration::from_millis(250)),
        )
        .await?;
        let policy = Arc::new(Mutex::new(BatchPolicy::new(
            config.batch_min_events,
            config.batch_max_events,
            config.batch_max_bytes,
            config.batch_max_wait,
            config.batch_target_latency,
        )));
        let (batches, batches_rx) = mpsc::channel::<Batch>(1);
        let (completed_tx, completed) = watch::channel(0u64);
        let outbox = Outbox::start(ctx, token);
        let outbox_acked = outbox
            .as_ref()
            .map_or_else(|| watch::channel(0u64).1, |o| o.acked());
        let flusher = tokio::spawn(flusher::run(
            ctx.clone(),
            sql,
            token,
            flusher::Handoff {
                batches: batches_rx,
                completed: completed_tx,
                outbox: outbox.clone(),
            },
            Arc::clone(&policy),
            shutdown,
        ));
        Ok(Self {
            ctx: ctx.clone(),
            repl,
            policy,
            assembler: Assembler::default(),
            waiting: None,
            confirmations: Confirmations::default(),
            batches,
            completed,
            flusher,
            outbox,
            outbox_acked,
            commit_time_micros: 0,
            wal_end_at_start,
            end_in_batch: None,
            catching_up: None,
        })
    }

    /// Reads the stream into batches and hands them to the flusher until something ends it.
    async fn stream(
        &mut self,
        mut lost: watch::Receiver<bool>,
        mut shutdown: watch::Receiver<bool>,
    ) -> Ending {
        loop {
            let step = self.next_step(&mut lost, &mut shutdown).await;
            match step {
                Step::End(ending) => return ending,
                Step::Completed => {
                    let done = *self.completed.borrow_and_update();
                    self.outbox_acked.borrow_and_update();
                    self.confirm(done);
                    self.settle_end(done);
                }
                Step::SendWaiting(permit) => match self.waiting.take() {
                    Some(batch) => {
                        permit.send(batch);
                    }
                    None => return Ending::Failed(StreamError::Ended("no batch was waiting")),
                },
                Step::SendDue(permit) => {
                    let batch = self.take();
                    permit.send(batch);
                }
                Step::Received(event) => {
                    if let Err(err) = self.receive(event) {
                        return Ending::Failed(err);
                    }
                }
            }
        }
    }

    /// Waits for whatever happens first. Only waits here; what to do about it is done by the
    /// caller, with the waiting futures gone.
    async fn next_step(
        &mut self,
        lost: &mut watch::Receiver<bool>,
        shutdown: &mut watch::Receiver<bool>,
    ) -> Step {
        let due = self.assembler.filling().started
            + self
                .policy
                .lock()
                .map(|p| p.max_wait())
                .unwrap_or(Duration::from_millis(20));
        let gone = || Step::End(Ending::Failed(StreamError::Ended("the flusher went away")));
        tokio::select! {
            biased;
            _ = lost.wait_for(|lost| *lost) => Step::End(Ending::LostLeadership),
            _ = shutdown.wait_for(|stop| *stop) => Step::End(Ending::Shutdown),
            finished = &mut self.flusher => Step::End(match finished {
                Ok(Err(FlushError::Deposed)) => Ending::Deposed,
                Ok(Err(FlushError::Stopped)) => Ending::Shutdown,
                Ok(Ok(())) => Ending::Failed(StreamError::Ended("the flusher stopped")),
                Err(err) => Ending::Failed(StreamError::Flusher(err.to_string())),
            }),
            _ = self.completed.changed() => Step::Completed,
            Ok(()) = self.outbox_acked.changed() => Step::Completed,
            permit = self.batches.clone().reserve_owned(), if self.waiting.is_some() => {
                permit.map_or_else(|_| gone(), Step::SendWaiting)
            }
            // Due by age, the batch goes out only once the flusher can take it: until then it
            // keeps growing, so under load batches grow to what arrives during one flush and the
            // per-batch cost is spread (a full batch still stops the reading below).
            permit = async {
                tokio::time::sleep_until(due.into()).await;
                self.batches.clone().reserve_owned().await
            }, if self.waiting.is_none() && !self.assembler.filling().is_empty() => {
                permit.map_or_else(|_| gone(), Step::SendDue)
            }
            event = self.repl.recv(), if self.waiting.is_none() => match event {
                Ok(Some(event)) => Step::Received(event),
                Ok(None) => Step::End(Ending::Failed(StreamError::Ended("the replication stream ended"))),
                Err(err) => Step::End(Ending::Failed(StreamError::Replication(err))),
            },
        }
    }

    /// One message of the replication stream.
    fn receive(&mut self, event: ReplicationEvent) -> Result<(), StreamError> {
        self.ctx.health.streaming.store(true, Ordering::Relaxed);
        match event {
            ReplicationEvent::Begin {
                commit_time_micros, ..
            } => {
                let unix = commit_time_micros.saturating_add(PG_EPOCH_OFFSET_MICROS).max(0) as u64;
                self.assembler.begin(UNIX_EPOCH + Duration::from_micros(unix));
                self.commit_time_micros = commit_time_micros;
            }
            ReplicationEvent::XLogData {
                data,
                server_time_micros,
                ..
            } => {
                // both times are the server's clock: no skew between hosts
                if server_time_micros.saturating_sub(self.commit_time_micros) > CATCHING_UP_MICROS {
                    self.end_in_batch = None;
                    self.tell_sinks(true);
                } else {
                    self.reached_end();
                }
                self.assembler.data(&data)?;
                // a transaction too large for one batch is cut; the part carries no fence
                let (events, bytes) = self.assembler.filling().size();
                if self
                    .policy
                    .lock()
                    .map(|p| p.must_cut(events, bytes))
                    .unwrap_or(false)
                {
                    self.waiting = Some(self.take());
                }
            }
            ReplicationEvent::Commit { end_lsn, .. } => {
                if !self.assembler.commit(end_lsn.as_u64()) {
                    // its events (if any) went out in batches already taken: confirm it once
                    // they are done
                    self.confirmations.defer(self.assembler.taken(), end_lsn.as_u64());
                    let done = *self.completed.borrow();
                    self.confirm(done);
                }
                let (events, bytes) = self.assembler.filling().size();
                if self
                    .policy
                    .lock()
                    .map(|p| p.is_full(events, bytes))
                    .unwrap_or(false)
                {
                    self.waiting = Some(self.take());
                }
            }
            ReplicationEvent::KeepAlive { wal_end, .. } => {
                // nothing open: everything up to wal_end is done once the batches taken are
                if !self.assembler.in_transaction() && self.assembler.filling().is_empty() {
                    if wal_end.as_u64() >= self.wal_end_at_start {
                        self.reached_end();
                    }
                    self.confirmations.defer(self.assembler.taken(), wal_end.as_u64());
                    let done = *self.completed.borrow();
                    self.confirm(done);
                }
            }
            ReplicationEvent::Message { .. } | ReplicationEvent::StoppedAt { .. } => {}
        }
        Ok(())
    }

    /// The stream is read up to (nearly) the server's end: once what was taken so far is
    /// projected, the projections are not catching up (what the sinks wait for).
    fn reached_end(&mut self) {
        if self.outbox.is_some() && self.catching_up != Some(false) && self.end_in_batch.is_none() {
            self.end_in_batch = Some(self.assembler.taken());
            let done = *self.completed.borrow();
            self.settle_end(done);
        }
    }

    fn settle_end(&mut self, done: u64) {
        if self.end_in_batch.is_some_and(|last| done >= last) {
            self.end_in_batch = None;
            self.tell_sinks(false);
        }
    }

    /// Tells the sinks whether the projections are catching up, when that changed.
    fn tell_sinks(&mut self, catching_up: bool) {
        if self.catching_up == Some(catching_up) {
            return;
        }
        self.catching_up = Some(catching_up);
        if let Some(outbox) = &self.outbox {
            outbox.set_projections_catching_up(catching_up);
        }
    }

    /// Takes the batch being filled; its last complete commit may be confirmed once it is done.
    fn take(&mut self) -> Batch {
        let batch = self.assembler.take();
        if let Some(lsn) = batch.commit_lsn {
            self.confirmations.defer(batch.number, lsn);
        }
        batch
    }

    /// Confirms to the slot what the batches done so far allow (projected, and delivered by
    /// every sink that delivers as the projections go).
    fn confirm(&mut self, done: u64) {
        let done = self.outbox.as_ref().map_or(done, |o| o.floor(done));
        if let Some(lsn) = self.confirmations.advance(done) {
            self.repl.update_applied_lsn(Lsn::from_u64(lsn));
        }
    }

    /// On shutdown: hands over what was read, lets the flusher finish, confirms, stops. On
    /// anything else: stops at once (another leader may be streaming already).
    async fn finish(mut self, ending: Ending) -> Ending {
        if !matches!(ending, Ending::Shutdown) {
            self.flusher.abort();
            self.repl.abort();
            return ending;
        }
        let deadline = tokio::time::Instant::now() + Duration::from_secs(7);
        let mut remaining = vec![];
        remaining.extend(self.waiting.take());
        if !self.assembler.filling().is_empty() {
            remaining.push(self.take());
        }
        for batch in remaining {
            if tokio::time::timeout_at(deadline, self.batches.send(batch))
                .await
                .is_err()
            {
                break;
            }
        }
        let Streaming {
            mut repl,
            mut flusher,
            mut confirmations,
            completed,
            batches,
            ..
        } = self;
        drop(batches);
        if tokio::time::timeout_at(deadline, &mut flusher).await.is_err() {
            tracing::warn!("the last batch did not finish in time; it will be streamed again");
            flusher.abort();
        }
        if let Some(lsn) = confirmations.advance(*completed.borrow()) {
            repl.update_applied_lsn(Lsn::from_u64(lsn));
        }
        // the status update goes out on the stream's status interval
        tokio::time::sleep(Duration::from_millis(300)).await;
        repl.stop();
        let _ = tokio::time::timeout(Duration::from_secs(1), repl.shutdown()).await;
        tracing::info!(confirmed = %cqrs_lsn(confirmations.confirmed), "stopped streaming");
        Ending::Shutdown
    }
}
