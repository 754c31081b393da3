//! What this sidecar is doing, for `/readyz` and `/healthz` (see [`crate::admin`]).

use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Starting = 0,
    Standby = 1,
    Leader = 2,
}

/// What `/readyz` answers from.
#[derive(Debug, Default)]
pub struct Health {
    role: AtomicU8,
    /// The leader's replication stream is up and batches go through.
    pub streaming: AtomicBool,
    /// The last attempt to reach PostgreSQL worked.
    pub pg_reachable: AtomicBool,
    /// The last status poll found a live projector lease (some sidecar leads).
    pub leader_live: AtomicBool,
}

impl Health {
    pub fn set_role(&self, role: Role) {
        self.role.store(role as u8, Ordering::Relaxed);
    }

    pub fn role(&self) -> Role {
        match self.role.load(Ordering::Relaxed) {
            2 => Role::Leader,
            1 => Role::Standby,
            _ => Role::Starting,
        }
    }

    /// Ready, and why (or why not).
    pub fn readiness(&self) -> (bool, &'static str) {
        match self.role() {
            Role::Leader if self.streaming.load(Ordering::Relaxed) => (true, "leader, streaming"),
            Role::Leader => (false, "leader, not streaming (connecting or retrying)"),
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
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readiness_follows_role_and_connections() {
        let health = Health::default();
        assert!(!health.readiness().0);
        health.set_role(Role::Standby);
        assert!(!health.readiness().0);
        health.pg_reachable.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (false, "standby, and no sidecar leads"));
        health.leader_live.store(true, Ordering::Relaxed);
        assert!(health.readiness().0);
        health.set_role(Role::Leader);
        assert!(!health.readiness().0);
        health.streaming.store(true, Ordering::Relaxed);
        assert_eq!(health.readiness(), (true, "leader, streaming"));
    }
}
