//! A NATS JetStream sink (the `async-nats` crate): every event is published with its command id
//! as `Nats-Msg-Id`, so JetStream's duplicate window drops a republished event, and with
//! `Cqrs-Stream`, `Cqrs-Seq`, `Cqrs-Command-Type` and `Cqrs-Position` headers.

use std::time::Duration;

use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;

use super::broker::PublishFailure;
use super::delivery::{waves, Event, TRACEPARENT_HEADER, TRACESTATE_HEADER};
use super::spec::{BrokerKind, SinkSpec};

/// How long a publish may wait for JetStream's acknowledgement.
const ACK_TIMEOUT: Duration = Duration::from_secs(5);

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
        let js_stream = match &spec.kind {
            BrokerKind::Nats { js_stream } => js_stream.clone(),
            BrokerKind::Kafka { .. } => {
                return Err(PublishFailure::Transient(format!(
                    "sink {} is not a NATS sink",
                    spec.name
                )))
            }
        };
        context
            .get_or_create_stream(stream::Config {
                name: js_stream.clone(),
                subjects: vec![spec.js_subjects()],
                storage: stream::StorageType::File,
                ..Default::default()
            })
            .await
            .map_err(|e| PublishFailure::Transient(format!("the JetStream stream {js_stream}: {e}")))?;
        Ok(Self {
            context,
            spec: spec.clone(),
        })
    }

    /// Publishes `events` wave after wave (see `waves`): JetStream acknowledges each publish on
    /// its own, so a stream's next event waits for its previous one's acknowledgement; returns
    /// how many JetStream dropped as duplicates.
    pub async fn publish(&self, events: &[&Event]) -> Result<u64, PublishFailure> {
        let mut duplicates = 0;
        for wave in waves(events) {
            duplicates += self.publish_wave(&wave).await?;
        }
        Ok(duplicates)
    }

    /// One wave (at most one event per stream) pipelined, every acknowledgement awaited.
    async fn publish_wave(&self, wave: &[&Event]) -> Result<u64, PublishFailure> {
        let mut pending = Vec::with_capacity(wave.len());
        for event in wave {
            let mut headers = HeaderMap::new();
            headers.insert("Nats-Msg-Id", event.command_id.as_str());
            headers.insert("Cqrs-Stream", event.stream.as_str());
            headers.insert("Cqrs-Seq", event.seq.to_string().as_str());
            headers.insert("Cqrs-Command-Type", event.command_type.as_str());
            headers.insert("Cqrs-Position", event.position.to_string().as_str());
            if let Some(traceparent) = &event.traceparent {
                headers.insert(TRACEPARENT_HEADER, traceparent.as_str());
                if let Some(tracestate) = &event.tracestate {
                    headers.insert(TRACESTATE_HEADER, tracestate.as_str());
                }
            }
            let ack = self
                .context
                .publish_with_headers(
                    self.spec.destination_of(&event.command_type),
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
