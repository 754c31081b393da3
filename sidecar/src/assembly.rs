//! Turning the decoded stream into batches for `cqrs.project_batch`, and knowing which LSNs
//! may be confirmed to the slot once which batches are done.
//!
//! A batch passes `project_batch` a commit LSN that fences it: a batch at or below a
//! projection's checkpoint is skipped whole, as already applied. That is only true when every
//! event of the batch belongs to a transaction that committed at or below that LSN. A batch
//! cut inside a transaction also holds events of a later commit, so it is sent without a
//! fence: per-stream sequencing alone makes its redelivery harmless. (Sent with the previous
//! commit's LSN, a takeover that replays it below the dead leader's checkpoint would skip the
//! cut transaction's events for good, and the slot would then confirm past them.)

use std::collections::{HashMap, VecDeque};
use std::time::{Instant, SystemTime};

use crate::log_row::LogColumns;
use crate::pgoutput::{Change, Decoder};
use crate::traces::CommandTrace;

/// The schema and name of the relation the slot publishes the log's inserts as.
const LOG_SCHEMA: &str = "cqrs";
const LOG_TABLE: &str = "command_log";

/// A replication message the sidecar cannot turn into command-log rows.
#[derive(Debug, thiserror::Error)]
pub enum StreamDecodeError {
    #[error("decoding a pgoutput message: {0}")]
    Message(#[from] crate::pgoutput::DecodeError),
    #[error("a cqrs.command_log row: {0}")]
    Row(#[from] crate::log_row::RowError),
}

/// Command-log rows on their way to `cqrs.project_batch`.
pub struct Batch {
    /// Batches are numbered in the order they are taken; the flusher reports the numbers done.
    pub number: u64,
    pub json: String,
    pub events: usize,
    /// End LSN of the last transaction that is complete in this batch.
    pub commit_lsn: Option<u64>,
    /// The batch was cut inside a transaction and holds some of its events.
    pub cut: bool,
    /// Commit time of the oldest event, for the delay metric.
    pub oldest_commit: Option<SystemTime>,
    pub started: Instant,
    /// When its first event was decoded and when it was sealed (only while traces are
    /// exported: the batch's decode span).
    pub decoded: Option<(SystemTime, SystemTime)>,
    /// The batch's commands that carry their application's trace (only while traces are
    /// exported).
    pub traced: Vec<CommandTrace>,
    /// commands per command type (a batch holds few types: a short list beats a map)
    pub types: Vec<(String, u64)>,
}

impl Batch {
    fn new() -> Self {
        Self {
            number: 0,
            json: String::from("["),
            events: 0,
            commit_lsn: None,
            cut: false,
            oldest_commit: None,
            started: Instant::now(),
            decoded: None,
            traced: Vec::new(),
            types: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Events, and bytes of their JSON.
    pub fn size(&self) -> (usize, usize) {
        (self.events, self.json.len())
    }

    /// The LSN `project_batch` may skip this batch at: none when it was cut inside a
    /// transaction (see the module comment).
    pub fn fence(&self) -> Option<u64> {
        if self.cut {
            None
        } else {
            self.commit_lsn
        }
    }
}

/// Decodes the stream into batches.
pub struct Assembler {
    decoder: Decoder,
    /// number of the last batch taken
    taken: u64,
    /// relation id → how to read it, when it is the command log
    log: HashMap<u32, Option<LogColumns>>,
    batch: Batch,
    in_transaction: bool,
    /// the batch being filled holds events of the open transaction
    holds_open: bool,
    transaction_commit: Option<SystemTime>,
    /// traces are exported: note each command's trace context
    traces: bool,
}

impl Default for Assembler {
    fn default() -> Self {
        Self {
            decoder: Decoder::new(),
            taken: 0,
            log: HashMap::new(),
            batch: Batch::new(),
            in_transaction: false,
            holds_open: false,
            transaction_commit: None,
            traces: crate::traces::enabled(),
        }
    }
}

impl Assembler {
    /// The batch being filled.
    pub fn filling(&self) -> &Batch {
        &self.batch
    }

    /// The number of the last batch taken.
    pub fn taken(&self) -> u64 {
        self.taken
    }

    pub fn in_transaction(&self) -> bool {
        self.in_transaction
    }

    /// Takes the batch being filled (and numbers it); a new one starts.
    pub fn take(&mut self) -> Batch {
        self.taken += 1;
        let mut batch = std::mem::replace(&mut self.batch, Batch::new());
        batch.json.push(']');
        batch.number = self.taken;
        batch.cut = self.in_transaction && self.holds_open;
        if let Some((_, sealed)) = &mut batch.decoded {
            *sealed = SystemTime::now();
        }
        self.holds_open = false;
        batch
    }

    pub fn begin(&mut self, commit_time: SystemTime) {
        self.in_transaction = true;
        self.holds_open = false;
        self.transaction_commit = Some(commit_time);
    }

    /// A transaction ended at `end_lsn`. Returns false when the batch being filled is empty:
    /// the transaction's events (if any) went out in batches already taken.
    pub fn commit(&mut self, end_lsn: u64) -> bool {
        self.in_transaction = false;
        self.holds_open = false;
        if self.batch.is_empty() {
            return false;
        }
        self.batch.commit_lsn = Some(end_lsn);
        true
    }

    pub fn data(&mut self, data: &bytes::Bytes) -> Result<(), StreamDecodeError> {
        match self.decoder.decode(data)? {
            Change::Relation(relation) => {
                let columns = if relation.namespace == LOG_SCHEMA && relation.name == LOG_TABLE {
                    Some(LogColumns::resolve(&relation)?)
                } else if relation.namespace == LOG_SCHEMA {
                    // pgoutput describes the leaf partition an insert went to after the root it
                    // publishes the insert as (publish_via_partition_root): expected, and its
                    // inserts arrive under the root's relation id.
                    tracing::debug!(relation = %format!("{}.{}", relation.namespace, relation.name), "a relation of the cqrs schema described by the slot; its changes are not the log's");
                    None
                } else {
                    tracing::warn!(relation = %format!("{}.{}", relation.namespace, relation.name), "ignoring a table that is not the command log");
                    None
                };
                self.log.insert(relation.id, columns);
            }
            Change::Insert { relation, values } => {
                if let Some(Some(columns)) = self.log.get(&relation.id) {
                    if self.batch.events > 0 {
                        self.batch.json.push(',');
                    } else {
                        // a batch's wait starts with its first event
                        self.batch.started = Instant::now();
                        if self.traces {
                            let now = SystemTime::now();
                            self.batch.decoded = Some((now, now));
                        }
                    }
                    columns.append_json(&values, &mut self.batch.json)?;
                    if self.traces {
                        self.batch.traced.extend(columns.command_trace(&values));
                    }
                    if let Some(command_type) = columns.command_type(&values) {
                        match self.batch.types.iter_mut().find(|(t, _)| t == command_type) {
                            Some((_, n)) => *n += 1,
                            None => self.batch.types.push((command_type.to_owned(), 1)),
                        }
                    }
                    self.batch.events += 1;
                    self.holds_open = self.in_transaction;
                    if self.batch.oldest_commit.is_none() {
                        self.batch.oldest_commit = self.transaction_commit;
                    }
                }
            }
            Change::Update { relation } | Change::Delete { relation } => {
                if matches!(self.log.get(&relation.id), Some(Some(_))) {
                    tracing::error!("cqrs.command_log was updated or deleted from: it is append-only; the change is ignored");
                }
            }
            Change::Truncate { .. } => {
                tracing::error!(
                    "a table of the publication was truncated; projections are not changed by it"
                );
            }
            Change::Ignored(_) => {}
        }
        Ok(())
    }
}

/// LSNs to confirm once the batches taken before them are done: `(batch number, lsn)`, in order.
#[derive(Default)]
pub struct Confirmations {
    queue: VecDeque<(u64, u64)>,
    done: u64,
    pub confirmed: u64,
}

impl Confirmations {
    /// `lsn` may be confirmed once batch `after` is done.
    pub fn defer(&mut self, after: u64, lsn: u64) {
        match self.queue.back_mut() {
            Some((number, last)) if *number == after => *last = (*last).max(lsn),
            _ => self.queue.push_back((after, lsn)),
        }
    }

    /// Batches up to `done` are done; returns the LSN to confirm if it moved.
    pub fn advance(&mut self, done: u64) -> Option<u64> {
        self.done = self.done.max(done);
        let mut moved = None;
        while let Some(&(number, lsn)) = self.queue.front() {
            if number > self.done {
                break;
            }
            self.queue.pop_front();
            if lsn > self.confirmed {
                self.confirmed = lsn;
                moved = Some(lsn);
            }
        }
        moved
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::log_row::tests::COLUMNS;
    use crate::pgoutput::tests::{insert_message, relation_message};

    fn event(assembler: &mut Assembler, position: u64) {
        let position = position.to_string();
        let message = insert_message(
            7,
            &[
                Some(&position),
                Some("0190a5c8-0000-7000-8000-000000000001"),
                Some("order-1"),
                Some(&position),
                Some("ADD_ITEM"),
                Some("{}"),
                Some("{}"),
                Some("2026-11-22 20:29:53+00"),
            ],
        );
        assembler.data(&message).unwrap();
    }

    fn assembler() -> Assembler {
        let mut a = Assembler::default();
        a.data(&relation_message(7, "cqrs", "command_log", COLUMNS))
            .unwrap();
        a
    }

    /// The decode span's times: from the batch's first event to its sealing, kept only while
    /// traces are exported.
    #[test]
    fn a_batch_knows_when_its_decode_began_and_ended_only_while_traced() {
        let mut traced = Assembler {
            traces: true,
            ..assembler()
        };
        traced.begin(SystemTime::now());
        let before = SystemTime::now();
        event(&mut traced, 1);
        std::thread::sleep(std::time::Duration::from_millis(20));
        event(&mut traced, 2);
        assert!(traced.commit(100));
        let batch = traced.take();
        let (first, sealed) = batch.decoded.expect("traced");
        assert!(first >= before);
        assert!(
            sealed.duration_since(first).unwrap() >= std::time::Duration::from_millis(20),
            "{first:?} {sealed:?}"
        );
        // the next batch starts its own decode at its own first event
        traced.begin(SystemTime::now());
        event(&mut traced, 3);
        assert!(traced.filling().decoded.unwrap().0 >= sealed);

        let mut untraced = Assembler {
            traces: false,
            ..assembler()
        };
        untraced.begin(SystemTime::now());
        event(&mut untraced, 1);
        assert!(untraced.commit(100));
        assert_eq!(untraced.take().decoded, None);
    }

    #[test]
    fn a_batch_cut_inside_a_transaction_carries_no_fence() {
        let mut a = assembler();
        a.begin(SystemTime::now());
        event(&mut a, 1);
        assert!(a.commit(100));
        a.begin(SystemTime::now());
        event(&mut a, 2);
        // cut here, as a full batch or an old one would be: event 2 commits after LSN 100
        let cut = a.take();
        assert_eq!((cut.events, cut.commit_lsn), (2, Some(100)));
        assert!(cut.cut);
        assert_eq!(cut.fence(), None, "LSN 100 must not fence event 2");
        event(&mut a, 3);
        assert!(a.commit(200));
        let rest = a.take();
        assert_eq!((rest.events, rest.fence()), (1, Some(200)));
    }

    #[test]
    fn a_batch_taken_between_transactions_is_fenced_by_its_last_commit() {
        let mut a = assembler();
        a.begin(SystemTime::now());
        event(&mut a, 1);
        assert!(a.commit(100));
        a.begin(SystemTime::now());
        // the open transaction has no event in the batch yet
        let batch = a.take();
        assert_eq!(batch.fence(), Some(100));
        assert!(!a.commit(150), "the batch being filled is empty");
        assert_eq!(batch.number, 1);
        let parsed: serde_json::Value = serde_json::from_str(&batch.json).unwrap();
        assert_eq!(parsed[0]["position"], 1);
    }

    #[test]
    fn a_partition_described_after_the_log_leaves_its_inserts_to_the_log() {
        let mut a = assembler();
        // what pgoutput sends before the first insert into a new partition: the root (again),
        // then the leaf, then the insert under the root's id
        a.data(&relation_message(7, "cqrs", "command_log", COLUMNS))
            .unwrap();
        a.data(&relation_message(8, "cqrs", "command_log_20261206", COLUMNS))
            .unwrap();
        a.begin(SystemTime::now());
        event(&mut a, 1);
        assert!(a.commit(100));
        assert_eq!(a.take().events, 1);
    }

    #[test]
    fn an_lsn_is_confirmed_only_after_the_batches_before_it() {
        let mut c = Confirmations::default();
        // batch 1 holds a transaction that ends (commit 100) after batch 1 was taken
        c.defer(1, 100);
        assert_eq!(c.advance(0), None, "batch 1 is not done");
        c.defer(2, 150);
        c.defer(2, 140);
        assert_eq!(c.advance(1), Some(100));
        assert_eq!(c.advance(1), None);
        assert_eq!(c.advance(2), Some(150), "coalesced, the highest wins");
        c.defer(2, 120);
        assert_eq!(c.advance(2), None, "never backwards");
        c.defer(2, 200);
        assert_eq!(c.advance(2), Some(200), "nothing in flight: at once");
    }
}
