//! Adaptive batch sizing: flush on size, bytes or age; shrink after a slow or failed flush,
//! grow after fast full ones.

use std::time::Duration;

/// The limits a batch is flushed at, and the size the next batches aim for.
#[derive(Debug, Clone)]
pub struct BatchPolicy {
    min_events: usize,
    max_events: usize,
    max_bytes: usize,
    max_wait: Duration,
    target_latency: Duration,
    target: usize,
}

impl BatchPolicy {
    pub fn new(
        min_events: usize,
        max_events: usize,
        max_bytes: usize,
        max_wait: Duration,
        target_latency: Duration,
    ) -> Self {
        let min_events = min_events.clamp(1, max_events.max(1));
        let max_events = max_events.max(min_events);
        // start in the middle: a cold start is usually a backlog
        let target = ((min_events + max_events) / 2).max(min_events);
        Self {
            min_events,
            max_events,
            max_bytes: max_bytes.max(1),
            max_wait,
            target_latency,
            target,
        }
    }

    /// Events the next batch aims for.
    pub fn target(&self) -> usize {
        self.target
    }

    /// Whether a batch of `events` / `bytes` that ends at a transaction boundary must be
    /// flushed now.
    pub fn is_full(&self, events: usize, bytes: usize) -> bool {
        events >= self.target || bytes >= self.max_bytes
    }

    /// Whether a batch that ends inside a transaction must be cut there all the same. A batch
    /// cut inside a transaction cannot carry an LSN fence (see `assembly`), so only a
    /// transaction too large for one batch (twice the target, or the byte limit) is split.
    pub fn must_cut(&self, events: usize, bytes: usize) -> bool {
        events >= self.target.saturating_mul(2) || bytes >= self.max_bytes
    }

    /// Whether a batch whose oldest event has waited `age` must be flushed now.
    pub fn is_due(&self, age: Duration) -> bool {
        age >= self.max_wait
    }

    pub fn max_wait(&self) -> Duration {
        self.max_wait
    }

    /// Adjusts the target after flushing `events` in `took`; `ok` false for a failed flush.
    pub fn record(&mut self, events: usize, took: Duration, ok: bool) {
        let target = if !ok {
            self.target / 2
        } else if took > self.target_latency {
            self.target * 3 / 4
        } else if took < self.target_latency / 2 && events >= self.target {
            // only a full batch that was fast says a bigger one would be fine
            self.target + self.target / 4 + 1
        } else {
            self.target
        };
        self.target = target.clamp(self.min_events, self.max_events);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy() -> BatchPolicy {
        BatchPolicy::new(
            10,
            1000,
            1 << 20,
            Duration::from_millis(20),
            Duration::from_millis(100),
        )
    }

    #[test]
    fn flushes_on_size_bytes_or_age() {
        let p = policy();
        assert!(!p.is_full(p.target() - 1, 10));
        assert!(p.is_full(p.target(), 10));
        assert!(p.is_full(1, 1 << 20));
        assert!(
            !p.must_cut(p.target(), 10),
            "inside a transaction, the target is no limit"
        );
        assert!(p.must_cut(2 * p.target(), 10));
        assert!(p.must_cut(1, 1 << 20), "the byte limit is");
        assert!(!p.is_due(Duration::from_millis(19)));
        assert!(p.is_due(Duration::from_millis(20)));
    }

    #[test]
    fn shrinks_when_slow_or_failing_and_grows_when_fast_and_full() {
        let mut p = policy();
        let start = p.target();
        p.record(start, Duration::from_millis(300), true);
        assert!(p.target() < start, "slow flush shrinks");
        let after_slow = p.target();
        p.record(after_slow, Duration::from_millis(10), false);
        assert_eq!(p.target(), after_slow / 2, "failure halves");
        let low = p.target();
        p.record(low, Duration::from_millis(10), true);
        assert!(p.target() > low, "fast full flush grows");
        let grown = p.target();
        p.record(1, Duration::from_millis(10), true);
        assert_eq!(p.target(), grown, "a fast but small batch says nothing");
        for _ in 0..100 {
            let t = p.target();
            p.record(t, Duration::from_millis(1), true);
        }
        assert_eq!(p.target(), 1000, "bounded above");
        for _ in 0..100 {
            p.record(1, Duration::from_secs(1), false);
        }
        assert_eq!(p.target(), 10, "bounded below");
    }
}
