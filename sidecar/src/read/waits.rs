//! Read-your-writes waits (`?after=stream:seq`): until a command is applied to a projection.
//!
//! A wait holds no PostgreSQL connection of the read pool — eight slow waits used to make every
//! cache miss answer 503. One task per sidecar ([`watch`]) looks at every pending wait at once,
//! on a connection of its own, with one query each look: every [`WaitSettings::poll`] while some
//! wait is pending, at once when a new one arrives, never while none is. A waiter is woken when
//! its command is applied (or its projection halts, or does not exist). The number of waits is
//! bounded, in all and per caller (API key or token subject): past either, a wait is refused at
//! once instead of queued.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::sync::{oneshot, watch as shutdown_watch, Notify};

use crate::postgres::{ConnectionPurpose, Database};

/// How a wait ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Applied; the primary's WAL position when it was seen so (the projection's commit is at
    /// or below it: a replica that has replayed it has the row)
    Applied(u64),
    /// the projection is halted and will not apply the command until resumed
    Halted,
    UnknownProjection,
    TimedOut,
    /// PostgreSQL could not be asked
    Unavailable,
}

/// Why a wait was not even started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    #[error("this sidecar holds as many read-your-writes waits as it may")]
    Full,
    #[error("this caller holds as many read-your-writes waits as it may")]
    CallerFull,
}

#[derive(Debug, Clone, Copy)]
pub struct WaitSettings {
    /// How often pending waits are looked at.
    pub poll: Duration,
    /// Waits held at once, in all.
    pub max: usize,
    /// Waits held at once by one caller.
    pub max_per_caller: usize,
}

struct Pending {
    projection: String,
    stream: String,
    seq: i64,
    deadline: Instant,
    done: oneshot::Sender<Outcome>,
}

pub struct Waits {
    settings: WaitSettings,
    pending: Mutex<Vec<Pending>>,
    held: Mutex<HashMap<String, usize>>,
    arrived: Notify,
}

/// One caller's claim on a wait; given back when dropped.
struct Claim<'a> {
    waits: &'a Waits,
    caller: String,
}

impl Drop for Claim<'_> {
    fn drop(&mut self) {
        let mut held = self.waits.held.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(count) = held.get_mut(&self.caller) {
            *count -= 1;
            if *count == 0 {
                held.remove(&self.caller);
            }
        }
    }
}

impl Waits {
    pub fn new(settings: WaitSettings) -> Arc<Self> {
        Arc::new(Self {
            settings,
            pending: Mutex::new(Vec::new()),
            held: Mutex::new(HashMap::new()),
            arrived: Notify::new(),
        })
    }

    fn claim(&self, caller: &str) -> Result<Claim<'_>, Refused> {
        let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        if held.values().sum::<usize>() >= self.settings.max {
            return Err(Refused::Full);
        }
        let count = held.entry(caller.to_owned()).or_default();
        if *count >= self.settings.max_per_caller {
            return Err(Refused::CallerFull);
        }
        *count += 1;
        Ok(Claim {
            waits: self,
            caller: caller.to_owned(),
        })
    }

    /// Waits at most `timeout` until command `seq` of `stream` is applied to `projection`.
    pub async fn wait(
        &self,
        caller: &str,
        projection: &str,
        stream: &str,
        seq: i64,
        timeout: Duration,
    ) -> Result<Outcome, Refused> {
        let _claim = self.claim(caller)?;
        let (done, outcome) = oneshot::channel();
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(Pending {
                projection: projection.to_owned(),
                stream: stream.to_owned(),
                seq,
                deadline: Instant::now() + timeout,
                done,
            });
        self.arrived.notify_one();
        // the watcher answers by the deadline; this one only guards against a lost watcher
        Ok(
            match tokio::time::timeout(timeout + Duration::from_secs(1), outcome).await {
                Ok(Ok(outcome)) => outcome,
                _ => Outcome::TimedOut,
            },
        )
    }

    /// The pending waits still wanted, past-deadline ones answered.
    fn due(&self) -> Vec<Pending> {
        let now = Instant::now();
        let mut pending = self.pending.lock().unwrap_or_else(|p| p.into_inner());
        let mut keep = Vec::with_capacity(pending.len());
        for wait in pending.drain(..) {
            if wait.done.is_closed() {
                continue;
            }
            if wait.deadline <= now {
                let _ = wait.done.send(Outcome::TimedOut);
                continue;
            }
            keep.push(wait);
        }
        keep
    }

    fn put_back(&self, waits: Vec<Pending>) {
        self.pending
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(waits);
    }

    fn is_idle(&self) -> bool {
        self.pending.lock().unwrap_or_else(|p| p.into_inner()).is_empty()
    }
}

/// Where each wait is: its projection exists, has applied the command, is halted.
const LOOK: &str = "\
select w.n::bigint, st.name is not null, coalesce(ps.last_seq, 0) >= w.seq, coalesce(st.halted, false),
       pg_catalog.pg_current_wal_lsn()
  from unnest($1::text[], $2::text[], $3::bigint[]) with ordinality as w(projection, stream, seq, n)
  left join cqrs.projection_state st on st.name = w.projection
  left join cqrs.projection_stream ps on ps.projection = w.projection and ps.stream = w.stream";

/// Answers pending waits until shutdown (see the module's documentation).
pub async fn watch(waits: Arc<Waits>, pg: Database, mut shutdown: shutdown_watch::Receiver<bool>) {
    let mut client: Option<tokio_postgres::Client> = None;
    loop {
        if waits.is_idle() {
            tokio::select! {
                _ = waits.arrived.notified() => {}
                _ = shutdown.wait_for(|stop| *stop) => return,
            }
        }
        let due = waits.due();
        if due.is_empty() {
            continue;
        }
        if client.as_ref().is_none_or(|c| c.is_closed()) {
            client = pg
                .connect_for(ConnectionPurpose::Waits, Duration::from_secs(2))
                .await
                .map_err(
                    |err| tracing::warn!(error = %err, "read-your-writes waits: cannot reach PostgreSQL"),
                )
                .ok();
        }
        let Some(connected) = &client else {
            for wait in due {
                let _ = wait.done.send(Outcome::Unavailable);
            }
            continue;
        };
        let projections: Vec<&str> = due.iter().map(|w| w.projection.as_str()).collect();
        let streams: Vec<&str> = due.iter().map(|w| w.stream.as_str()).collect();
        let seqs: Vec<i64> = due.iter().map(|w| w.seq).collect();
        let looked = tokio::time::timeout(
            Duration::from_secs(2),
            connected.query(LOOK, &[&projections, &streams, &seqs]),
        )
        .await;
        let rows = match looked {
            Ok(Ok(rows)) => rows,
            Ok(Err(err)) => {
                tracing::warn!(error = %err, "read-your-writes waits: the look failed");
                client = None;
                for wait in due {
                    let _ = wait.done.send(Outcome::Unavailable);
                }
                continue;
            }
            Err(_) => {
                client = None;
                for wait in due {
                    let _ = wait.done.send(Outcome::Unavailable);
                }
                continue;
            }
        };
        let mut verdicts = vec![None; due.len()];
        for row in rows {
            let n: i64 = row.get(0);
            let (exists, applied, halted): (bool, bool, bool) = (row.get(1), row.get(2), row.get(3));
            let position: tokio_postgres::types::PgLsn = row.get(4);
            let outcome = if !exists {
                Some(Outcome::UnknownProjection)
            } else if applied {
                Some(Outcome::Applied(u64::from(position)))
            } else if halted {
                Some(Outcome::Halted)
            } else {
                None
            };
            if let Some(slot) = usize::try_from(n - 1).ok().and_then(|i| verdicts.get_mut(i)) {
                *slot = outcome;
            }
        }
        let mut still = Vec::new();
        for (wait, verdict) in due.into_iter().zip(verdicts) {
            match verdict {
                Some(outcome) => {
                    let _ = wait.done.send(outcome);
                }
                None => still.push(wait),
            }
        }
        if still.is_empty() {
            continue;
        }
        waits.put_back(still);
        tokio::select! {
            _ = tokio::time::sleep(waits.settings.poll) => {}
            _ = waits.arrived.notified() => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn waits(max: usize, max_per_caller: usize) -> Arc<Waits> {
        Waits::new(WaitSettings {
            poll: Duration::from_millis(1),
            max,
            max_per_caller,
        })
    }

    #[test]
    fn waits_are_bounded_in_all_and_per_caller() {
        let waits = waits(3, 2);
        let a1 = waits.claim("a").unwrap();
        let _a2 = waits.claim("a").unwrap();
        assert_eq!(waits.claim("a").err(), Some(Refused::CallerFull));
        let _b1 = waits.claim("b").unwrap();
        assert_eq!(waits.claim("c").err(), Some(Refused::Full));
        drop(a1);
        assert!(waits.claim("c").is_ok());
    }

    #[tokio::test]
    async fn a_wait_past_its_deadline_times_out_and_a_dropped_one_is_forgotten() {
        let waits = waits(10, 10);
        let (done, outcome) = oneshot::channel();
        waits.put_back(vec![Pending {
            projection: "p".into(),
            stream: "s".into(),
            seq: 1,
            deadline: Instant::now(),
            done,
        }]);
        let (gone, dropped) = oneshot::channel();
        drop(dropped);
        waits.put_back(vec![Pending {
            projection: "p".into(),
            stream: "s".into(),
            seq: 2,
            deadline: Instant::now() + Duration::from_secs(60),
            done: gone,
        }]);
        assert!(waits.due().is_empty());
        assert_eq!(outcome.await.ok(), Some(Outcome::TimedOut));
    }
}
