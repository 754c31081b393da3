//! A NATS JetStream sink (the `async-nats` crate): every event is published with its command id
//! as `Nats-Msg-Id`, so JetStream's duplicate window drops a republished event, and with
//! `Cqrs-Stream`, `Cqrs-Seq`, `Cqrs-Command-Type` and `Cqrs-Position` headers.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;

use super::delivery::Event;
use super::spec::SinkSpec;

/// How long a publish may wait for JetStream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a publish failed.
#[derive(Debug, thiserror::Error)]
pub enum PublishFailure {
    /// The broker will never take this event as it is (too large): the sink halts on it.
    #[error("the broker refuses the event at position {position}: {reason}")]
    Refused { position: i64, reason: String },
    /// Anything else (the broker down, a timeout): tried again.
    #[error("{0}")]
    Transient(String),
}

pub struct NatsSink {
    context: jetstream::Context,
    spec: SinkSpec,
}

impl NatsSink {
    /// Connects and makes sure the JetStream stream exists (created with the subjects of the
    /// sink's template, file storage, the default two-minute duplicate window).
    pub async fn connect(spec: &SinkSpec) -> Result<Self, PublishFailure> {
        let client = async_nats::ConnectOptions::new()
            .name(format!("cqrs-sidecar/sink/{}", spec.name))
            .connection_timeout(Duration::from_secs(5))
            .connect(spec.url.as_str())
            .await
            .map_err(|e| PublishFailure::Transient(format!("connecting to {}: {e}", spec.broker())))?;
        let mut context = jetstream::new(client);
        context.set_timeout(ACK_TIMEOUT);
        context
            .get_or_create_stream(stream::Config {
                name: spec.js_stream.clone(),
                subjects: vec![spec.js_subjects()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| {
                PublishFailure::Transient(format!("the JetStream stream {}: {e}", spec.js_stream))
            })?;
        Ok(Self {
            context,
            spec: spec.clone(),
        })
    }

    /// Publishes one wave (at most one event per stream) pipelined, and waits for every
    /// acknowledgement; returns how many JetStream dropped as duplicates.
    pub async fn publish_wave(&self, wave: &[&Event]) -> Result<u64, PublishFailure> {
        let mut pending = Vec::with_capacity(wave.len());
        for event in wave {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.command_id.as_str());
            headers.insert("Cqrs-Stream", event.stream.as_str());
            headers.insert("Cqrs-Seq", event.seq.to_string().as_str());
            headers.insert("Cqrs-Command-Type", event.command_type.as_str());
            headers.insert("Cqrs-Position", event.position.to_string().as_str());
            let ack = self
                .context
                .publish_with_headers(
                    self.spec.subject_of(&event.command_type),
                    headers,
                    event.json.clone().into(),
                )
                .await
                .map_err(|e| failure(event, e))?;
            pending.push((event, ack));
        }
        let mut duplicates = 0;
        for (event, ack) in pending {
            let ack = ack.await.map_err(|e| failure(event, e))?;
            duplicates += u64::from(ack.duplicate);
        }
        Ok(duplicates)
    }
}

/// Decided on the error's kind: only a message larger than the server takes is refused for good.
fn failure(event: &Event, err: jetstream::context::PublishError) -> PublishFailure {
    match err.kind() {
        PublishErrorKind::MaxPayloadExceeded => PublishFailure::Refused {
            position: event.position,
            reason: err.to_string(),
        },
        _ => PublishFailure::Transient(err.to_string()),
    }
}
