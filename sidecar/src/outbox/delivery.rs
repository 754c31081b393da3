//! Events on their way to a sink: a projected batch, or a chunk read from the log by a sink that
//! catches up, split into the command-log objects the sidecar sends (each kept as its JSON text:
//! that is the message) with what routing and bookkeeping need.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::value::RawValue;

/// The W3C Trace Context header names a message carries the application's trace under (the
/// names OpenTelemetry's Kafka and NATS instrumentations read).
pub const TRACEPARENT_HEADER: &str = "traceparent";
pub const TRACESTATE_HEADER: &str = "tracestate";

/// One command-log row.
#[derive(Debug, Clone)]
pub struct Event {
    pub position: i64,
    pub command_id: String,
    pub stream: String,
    pub seq: i64,
    pub command_type: String,
    /// the application's W3C trace context from the command's metadata (checked by
    /// `cqrs.append`), passed on as the message's `traceparent` / `tracestate` headers so that a
    /// consumer continues the application's trace
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
    /// the object as JSON: the message's body
    pub json: String,
}

#[derive(Deserialize)]
struct Fields {
    position: i64,
    command_id: String,
    stream: String,
    seq: i64,
    command_type: String,
    #[serde(default)]
    metadata: TraceKeys,
}

/// The trace context keys of the metadata; the rest of it is skipped.
#[derive(Deserialize, Default)]
struct TraceKeys {
    traceparent: Option<String>,
    tracestate: Option<String>,
}

impl Event {
    pub fn parse(json: &str) -> Result<Self, serde_json::Error> {
        let fields: Fields = serde_json::from_str(json)?;
        Ok(Self {
            position: fields.position,
            command_id: fields.command_id,
            stream: fields.stream,
            seq: fields.seq,
            command_type: fields.command_type,
            traceparent: fields.metadata.traceparent,
            tracestate: fields.metadata.tracestate,
            json: json.to_owned(),
        })
    }
}

/// Events in commit order, from one projected batch (`number`, `commit_lsn`) or a catch-up chunk.
#[derive(Debug)]
pub struct Delivery {
    /// the projected batch's number (none for a catch-up chunk)
    pub number: Option<u64>,
    /// the LSN the batch ends at, when it ends a transaction
    pub commit_lsn: Option<u64>,
    pub events: Vec<Event>,
    /// the projected batch's span, when traces are exported: the sink's publish links to it
    pub batch_span: Option<opentelemetry::trace::SpanContext>,
}

impl Delivery {
    /// A projected batch: `json` is the array `cqrs.project_batch` was given.
    pub fn of_batch(number: u64, commit_lsn: Option<u64>, json: &str) -> Result<Self, serde_json::Error> {
        let raw: Vec<&RawValue> = serde_json::from_str(json)?;
        let events = raw
            .into_iter()
            .map(|e| Event::parse(e.get()))
            .collect::<Result<_, _>>()?;
        Ok(Self {
            number: Some(number),
            commit_lsn,
            events,
            batch_span: None,
        })
    }

    /// Each stream's highest seq in the delivery (what the sink has passed once it is done).
    pub fn heads(&self) -> BTreeMap<&str, i64> {
        let mut heads = BTreeMap::new();
        for event in &self.events {
            let head = heads.entry(event.stream.as_str()).or_insert(event.seq);
            *head = (*head).max(event.seq);
        }
        heads
    }

    pub fn max_position(&self) -> Option<i64> {
        self.events.iter().map(|e| e.position).max()
    }
}

/// `events` in waves: the first wave holds each stream's first event, the second each stream's
/// second, …; a wave is published whole (pipelined) and acknowledged before the next, so a
/// stream's events reach the broker in order even when a publish is retried.
pub fn waves<'e>(events: &[&'e Event]) -> Vec<Vec<&'e Event>> {
    let mut waves: Vec<Vec<&Event>> = Vec::new();
    let mut depth: BTreeMap<&str, usize> = BTreeMap::new();
    for &event in events {
        let at = depth.entry(event.stream.as_str()).or_insert(0);
        if waves.len() <= *at {
            waves.push(Vec::new());
        }
        waves[*at].push(event);
        *at += 1;
    }
    waves
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(position: i64, stream: &str, seq: i64) -> String {
        format!(
            r#"{{"position":{position},"command_id":"c{position}","stream":"{stream}","seq":{seq},"command_type":"T","payload":{{"a":[1,2]}},"metadata":{{}},"created_at":"2026-12-05 12:00:00+00"}}"#
        )
    }

    #[test]
    fn a_batch_splits_into_its_events_and_each_streams_events_stay_in_order() {
        let json = format!(
            "[{},{},{},{}]",
            event(7, "a", 1),
            event(8, "b", 4),
            event(9, "a", 2),
            event(10, "a", 3)
        );
        let delivery = Delivery::of_batch(3, Some(99), &json).expect("a batch");
        assert_eq!(delivery.events.len(), 4);
        assert_eq!(delivery.events[1].json, event(8, "b", 4));
        assert_eq!(delivery.heads().get("a"), Some(&3));
        assert_eq!(delivery.max_position(), Some(10));
        let all: Vec<&Event> = delivery.events.iter().collect();
        let waves = waves(&all);
        let seqs: Vec<Vec<(String, i64)>> = waves
            .iter()
            .map(|w| w.iter().map(|e| (e.stream.clone(), e.seq)).collect())
            .collect();
        assert_eq!(
            seqs,
            vec![
                vec![("a".to_owned(), 1), ("b".to_owned(), 4)],
                vec![("a".to_owned(), 2)],
                vec![("a".to_owned(), 3)]
            ]
        );
        assert!(Delivery::of_batch(1, None, "[{\"position\":1}]").is_err());
    }
}
