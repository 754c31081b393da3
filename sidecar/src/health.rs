//! What this sidecar is doing, for `/readyz` (see [`crate::admin`]).
//!
//! **Readiness is "send me read traffic"**, what a load balancer or Kubernetes asks: the sidecar
//! can answer reads — it leads and streams, or stands by while some sidecar leads — and its read
//! pool is not exhausted (a sidecar whose cache misses are all refused for want of a connection
//! should not receive reads). **A halted projection does not make a sidecar unready**: every
//! sidecar sees the same halt, so taking them out of the balancer would turn one projection's
//! trouble into an outage of all; reads of the others go on and the halted one's rows are served
//! as they were. A halt is what alerting pages on (`cqrs_projection_halted`, alert
//! `CqrsProjectionHalted`); `/readyz` names halted projections in its body, still answering 200.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::leader::LeaseExpiry;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting = 0,
    Standby = 1,
    Leader = 2,
}

/// How long the read pool must refuse every cache miss before the sidecar is unready: long
/// enough that a burst does not take it out of the balancer, short enough that a stuck pool does.
pub const READ_POOL_UNREADY_AFTER: Duration = Duration::from_secs(1);

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    role: AtomicU8,
    /// The lease this sidecar leads by, while its role is [`Role::Leader`].
    lease: Mutex<Option<LeaseExpiry>>,
    /// The leader's replication stream is up and batches go through.
    pub streaming: AtomicBool,
    /// The last attempt to reach PostgreSQL worked.
    pub pg_reachable: AtomicBool,
    /// The last status poll found a live projector lease (some sidecar leads).
    pub leader_live: AtomicBool,
    /// Since when (ms since the epoch) every cache miss found no read pool connection; 0: not.
    read_pool_starved_since: AtomicU64,
    /// The projections the last status poll found halted.
    halted: Mutex<Vec<String>>,
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

impl Health {
    /// Starting or standing by (see [`Health::set_leading`] for leading).
    pub fn set_role(&self, role: Role) {
        *self.lease.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = None;
        self.role.store(role as u8, Ordering::Relaxed);
    }

    /// Leading by `lease`: said so while that lease has not run out (see [`Health::readiness`]).
    pub fn set_leading(&self, lease: LeaseExpiry) {
        *self.lease.lock().unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(lease);
        self.role.store(Role::Leader as u8, Ordering::Relaxed);
    }

    /// Whether the lease this sidecar leads by may have passed to another sidecar.
    fn lease_passed(&self) -> bool {
        self.lease
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .as_ref()
            .is_none_or(LeaseExpiry::passed)
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            2 => Role::Leader,
            1 => Role::Standby,
            _ => Role::Starting,
        }
    }

    /// A cache miss got no read pool connection in time.
    pub fn read_pool_refused(&self) {
        let _ =
            self.read_pool_starved_since
                .compare_exchange(0, now_ms(), Ordering::Relaxed, Ordering::Relaxed);
    }

    /// A cache miss got a read pool connection.
    pub fn read_pool_served(&self) {
        self.read_pool_starved_since.store(0, Ordering::Relaxed);
    }

    /// Whether every cache miss has been refused for at least [`READ_POOL_UNREADY_AFTER`].
    pub fn read_pool_exhausted(&self) -> bool {
        match self.read_pool_starved_since.load(Ordering::Relaxed) {
            0 => false,
            since => now_ms().saturating_sub(since) >= READ_POOL_UNREADY_AFTER.as_millis() as u64,
        }
    }

    pub fn set_halted(&self, halted: Vec<String>) {
        if let Ok(mut current) = self.halted.lock() {
            *current = halted;
        }
    }

    /// Ready, and why (or why not).
    pub fn readiness(&self) -> (bool, String) {
        let (ready, why) = match self.role() {
            Role::Leader if !self.streaming.load(Ordering::Relaxed) => {
                (false, "leader, not streaming (connecting or retrying)")
            }
            // a leader stalled past its lease (a stopped process, starved cores) learns that
            // another sidecar took it over only when its next renewal answers: until then it must
            // not say "leader, streaming" beside the new leader. It can still answer reads (as a
            // standby does), so it stays ready rather than leave the balancer for a moment.
            Role::Leader if self.lease_passed() => (
                true,
                "leader whose lease may have passed to another sidecar (it stalled past it); \
                 serving reads, stepping down when its renewal answers",
            ),
            Role::Leader => (true, "leader, streaming"),
            Role::Standby if !self.pg_reachable.load(Ordering::Relaxed) => {
                (false, "standby, PostgreSQL unreachable")
            }
            // a standby asks for the lease every 200 ms and would have taken a free one: no live
            // leader for a whole status poll means no sidecar can lead
            Role::Standby if !self.leader_live.load(Ordering::Relaxed) => {
                (false, "standby, and no sidecar leads")
            }
            Role::Standby => (true, "standby"),
            Role::Starting => (false, "starting"),
        };
        if ready && self.read_pool_exhausted() {
            return (
                false,
                format!("{why}, but the read pool is exhausted: cache misses are refused"),
            );
        }
        let halted = self.halted.lock().map(|h| h.join(", ")).unwrap_or_default();
        if halted.is_empty() {
            (ready, why.to_owned())
        } else {
            (
                ready,
                format!("{why}; halted, serving their rows as they were: {halted} (see cqrs.status())"),
            )
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;

    #[test]
    fn readiness_follows_role_and_connections() {
        let health = Health::default();
        assert!(!health.readiness().0);
        health.set_role(Role::Standby);
        assert!(!health.readiness().0);
        health.pg_reachable.store(true, Ordering::Relaxed);
        assert_eq!(
            health.readiness(),
            (false, "standby, and no sidecar leads".to_owned())
        );
        health.leader_live.store(true, Ordering::Relaxed);
        assert!(health.readiness().0);
        health.set_leading(LeaseExpiry::until(Instant::now() + Duration::from_secs(60)));
        assert!(!health.readiness().0);
        health.streaming.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (true, "leader, streaming".to_owned()));
    }

    #[test]
    fn a_leader_whose_lease_ran_out_does_not_say_it_leads() {
        let health = Health::default();
        health.streaming.store(true, Ordering::Relaxed);
        let lease = LeaseExpiry::until(Instant::now() + Duration::from_millis(200));
        health.set_leading(lease.clone());
        assert_eq!(health.readiness(), (true, "leader, streaming".to_owned()));
        // nothing renews it, nothing says it was lost: it runs out while leading
        std::thread::sleep(Duration::from_millis(250));
        let (ready, why) = health.readiness();
        assert!(ready && why.contains("lease may have passed"), "{why}");
        // a leader that stopped streaming (its leadership ended) says so, lease or not
        health.streaming.store(false, Ordering::Relaxed);
        assert!(!health.readiness().0);
        health.streaming.store(true, Ordering::Relaxed);
        // a renewal of the same lease makes it the leader again
        lease.renewed(Instant::now());
        assert_eq!(health.readiness(), (true, "leader, streaming".to_owned()));
        // standing by forgets the lease
        health.set_role(Role::Standby);
        health.pg_reachable.store(true, Ordering::Relaxed);
        health.leader_live.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (true, "standby".to_owned()));
    }

    #[test]
    fn a_halt_is_named_but_an_exhausted_pool_makes_it_unready() {
        let health = Health::default();
        health.set_leading(LeaseExpiry::until(Instant::now() + Duration::from_secs(60)));
        health.streaming.store(true, Ordering::Relaxed);
        health.set_halted(vec!["memos".into()]);
        let (ready, why) = health.readiness();
        assert!(ready && why.contains("memos"), "{why}");
        health.read_pool_refused();
        assert!(
            health.readiness().0,
            "one refused miss is a burst, not exhaustion"
        );
        health
            .read_pool_starved_since
            .store(now_ms() - 1_500, Ordering::Relaxed);
        let (ready, why) = health.readiness();
        assert!(!ready && why.contains("read pool"), "{why}");
        health.read_pool_served();
        assert!(health.readiness().0);
    }
}
