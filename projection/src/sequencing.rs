//! Per-(projection, stream) sequence validation.
//!
//! Given how far a projection has applied each stream, a batch, and the events parked earlier
//! for the batch's streams, decide for every event: seq ≤ last applied → duplicate (skipped and
//! counted); seq = last + 1 → applied (and the stream moves on, releasing parked successors);
//! seq > last + 1 → parked until the gap fills.
//!
//! Applicable events — released parked ones included — are applied in log-position order, which
//! within a stream is seq order (a stream's positions are assigned under its row lock). Between
//! streams a batch is commit order, and where position order differs from it the commands were
//! concurrent, so either is a valid serial order; position order makes the result independent of
//! how a batch happens to be ordered.

use std::collections::{BTreeMap, HashMap};

use crate::event::Event;

/// What to do with one batch for one projection.
#[derive(Debug, Default)]
pub struct Plan<'a> {
    /// Events to apply, in order.
    pub apply: Vec<&'a Event>,
    /// Batch events skipped because the projection already applied them.
    pub duplicates: u64,
    /// Batch events to park (not parked yet).
    pub park: Vec<&'a Event>,
    /// Parked events to remove: applied now, or duplicates of what was applied.
    pub unpark: Vec<(String, i64)>,
    /// New last applied seq of every stream that moved.
    pub progress: BTreeMap<String, i64>,
}

#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Origin {
    // batch copies sort before parked copies of the same seq, so the batch copy is used
    Batch,
    Parked,
}

struct Candidate<'a> {
    event: &'a Event,
    origin: Origin,
}

/// Plans `batch` (in batch order) given the projection's `progress` (last applied seq per
/// stream; absent = 0) and the `parked` events of the batch's streams.
// One piece: the per-stream walk keeps the run, the gap and the parked events together.
pub fn plan<'a>(progress: &HashMap<String, i64>, batch: &'a [Event], parked: &'a [Event]) -> Plan<'a> {
    let mut by_stream: HashMap<&str, Vec<Candidate<'a>>> = HashMap::new();
    for event in parked {
        by_stream
            .entry(event.stream.as_str())
            .or_default()
            .push(Candidate {
                event,
                origin: Origin::Parked,
            });
    }
    for event in batch {
        by_stream
            .entry(event.stream.as_str())
            .or_default()
            .push(Candidate {
                event,
                origin: Origin::Batch,
            });
    }

    let mut result = Plan::default();
    for (stream, mut candidates) in by_stream {
        candidates.sort_by_key(|c| (c.event.seq, c.origin));
        let last = progress.get(stream).copied().unwrap_or(0);
        let mut next = last + 1;
        let mut gap = false;
        let mut previous_seq = None;
        for candidate in candidates {
            let seq = candidate.event.seq;
            let repeat = previous_seq == Some(seq);
            previous_seq = Some(seq);
            let is_parked = candidate.origin == Origin::Parked;
            if repeat || seq < next {
                // already applied, or a second copy of the seq just handled
                match candidate.origin {
                    Origin::Batch => result.duplicates += 1,
                    Origin::Parked if seq < next || !gap => result.unpark.push((stream.to_owned(), seq)),
                    // a parked copy of a batch event that is being parked: it stays parked
                    Origin::Parked => {}
                }
                continue;
            }
            if !gap && seq == next {
                result.apply.push(candidate.event);
                if is_parked {
                    result.unpark.push((stream.to_owned(), seq));
                }
                next += 1;
                continue;
            }
            gap = true;
            if !is_parked {
                result.park.push(candidate.event);
            }
        }
        // a batch event parked while its parked copy already exists needs no new row
        // (it was delivered again while held: a duplicate)
        if !result.park.is_empty() {
            let already: Vec<i64> = parked
                .iter()
                .filter(|p| p.stream == stream)
                .map(|p| p.seq)
                .collect();
            let before = result.park.len();
            result
                .park
                .retain(|e| e.stream != stream || !already.contains(&e.seq));
            result.duplicates += (before - result.park.len()) as u64;
        }
        if next - 1 > last {
            result.progress.insert(stream.to_owned(), next - 1);
        }
    }
    result
        .apply
        .sort_by(|a, b| (a.position, &a.stream, a.seq).cmp(&(b.position, &b.stream, b.seq)));
    result.park.sort_by_key(|e| (e.stream.clone(), e.seq));
    result.unpark.sort();
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    fn event(stream: &str, seq: i64, position: i64) -> Event {
        Event {
            position,
            command_id: format!("{stream}-{seq}"),
            stream: stream.to_owned(),
            seq,
            command_type: "T".to_owned(),
            payload: json!({}),
            metadata: json!({}),
            created_at: "2026-01-01 00:00:00+00".to_owned(),
            ..Event::default()
        }
    }

    fn ids(events: &[&Event]) -> Vec<String> {
        events.iter().map(|e| e.command_id.clone()).collect()
    }

    #[test]
    fn applies_in_order_skips_duplicates_and_parks_gaps() {
        let batch = vec![
            event("a", 2, 2),
            event("b", 1, 3),
            event("a", 1, 1),
            event("a", 4, 5),
            event("b", 1, 3),
        ];
        let plan = plan(&HashMap::new(), &batch, &[]);
        // log-position order, whatever the batch order
        assert_eq!(ids(&plan.apply), vec!["a-1", "a-2", "b-1"]);
        assert_eq!(plan.duplicates, 1);
        assert_eq!(ids(&plan.park), vec!["a-4"]);
        assert_eq!(plan.progress, BTreeMap::from([("a".into(), 2), ("b".into(), 1)]));
    }

    #[test]
    fn a_filled_gap_releases_parked_events() {
        let parked = vec![event("a", 4, 5), event("a", 5, 6)];
        let progress = HashMap::from([("a".to_owned(), 2)]);
        let batch = vec![event("a", 3, 4)];
        let plan = plan(&progress, &batch, &parked);
        assert_eq!(ids(&plan.apply), vec!["a-3", "a-4", "a-5"]);
        assert_eq!(plan.unpark, vec![("a".to_owned(), 4), ("a".to_owned(), 5)]);
        assert!(plan.park.is_empty());
        assert_eq!(plan.progress["a"], 5);
    }

    #[test]
    fn a_redelivered_parked_event_is_not_parked_twice() {
        let parked = vec![event("a", 3, 3)];
        let progress = HashMap::from([("a".to_owned(), 1)]);
        let batch = vec![event("a", 3, 3)];
        let plan = plan(&progress, &batch, &parked);
        assert!(plan.apply.is_empty());
        assert!(plan.park.is_empty(), "{:?}", plan.park);
        assert!(plan.unpark.is_empty());
        assert_eq!(plan.duplicates, 1);
    }

    #[test]
    fn stale_parked_events_are_unparked() {
        let parked = vec![event("a", 2, 2)];
        let progress = HashMap::from([("a".to_owned(), 5)]);
        let batch = vec![event("a", 6, 6)];
        let plan = plan(&progress, &batch, &parked);
        assert_eq!(ids(&plan.apply), vec!["a-6"]);
        assert_eq!(plan.unpark, vec![("a".to_owned(), 2)]);
    }

    /// A log of `streams` streams with `per_stream` events each, in a commit order that
    /// interleaves streams but keeps each stream's seqs increasing.
    fn log(order: &[usize], streams: usize) -> Vec<Event> {
        let mut next = vec![1i64; streams];
        order
            .iter()
            .enumerate()
            .map(|(position, &s)| {
                let stream = s % streams;
                let seq = next[stream];
                next[stream] += 1;
                event(&format!("s{stream}"), seq, position as i64 + 1)
            })
            .collect()
    }

    proptest! {
        /// Deliver the log in batches cut at random points, each batch possibly delivered twice,
        /// reordered within, or with events of later batches leaking in early: every event is
        /// applied exactly once, each stream in seq order, and once everything has been
        /// delivered nothing remains parked.
        #[test]
        fn every_event_is_applied_exactly_once_in_stream_order(
            order in proptest::collection::vec(0usize..6, 1..120),
            cuts in proptest::collection::vec(1usize..15, 1..40),
            redeliver in proptest::collection::vec(any::<bool>(), 40),
            shuffle_seed in any::<u64>(),
        ) {
            let log = log(&order, 6);
            let mut batches: Vec<Vec<Event>> = Vec::new();
            let mut start = 0;
            let mut cut_iter = cuts.iter().cycle();
            while start < log.len() {
                let end = (start + cut_iter.next().copied().unwrap_or(5)).min(log.len());
                batches.push(log[start..end].to_vec());
                start = end;
            }
            let mut rng = shuffle_seed;
            let mut delivered: Vec<Vec<Event>> = Vec::new();
            for (i, batch) in batches.iter().enumerate() {
                let mut b = batch.clone();
                // deterministic shuffle within the batch
                for j in (1..b.len()).rev() {
                    rng = rng.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                    b.swap(j, (rng >> 33) as usize % (j + 1));
                }
                delivered.push(b.clone());
                if redeliver[i % redeliver.len()] {
                    delivered.push(b);
                }
            }

            let mut progress: HashMap<String, i64> = HashMap::new();
            let mut parked: Vec<Event> = Vec::new();
            let mut applied: Vec<Event> = Vec::new();
            for batch in &delivered {
                let streams: Vec<&str> = batch.iter().map(|e| e.stream.as_str()).collect();
                let relevant: Vec<Event> = parked.iter().filter(|p| streams.contains(&p.stream.as_str())).cloned().collect();
                let plan = plan(&progress, batch, &relevant);
                applied.extend(plan.apply.iter().map(|e| (*e).clone()));
                for (stream, last) in &plan.progress {
                    prop_assert!(progress.get(stream).copied().unwrap_or(0) < *last);
                    progress.insert(stream.clone(), *last);
                }
                parked.retain(|p| !plan.unpark.contains(&(p.stream.clone(), p.seq)));
                parked.extend(plan.park.iter().map(|e| (*e).clone()));
            }
            prop_assert_eq!(applied.len(), log.len(), "applied exactly once");
            let mut seen: HashMap<String, i64> = HashMap::new();
            for e in &applied {
                let last = seen.entry(e.stream.clone()).or_insert(0);
                prop_assert_eq!(e.seq, *last + 1, "stream {} out of order", e.stream);
                *last = e.seq;
            }
            prop_assert!(parked.is_empty(), "left parked: {:?}", parked.iter().map(|p| (&p.stream, p.seq)).collect::<Vec<_>>());
        }
    }
}
