//! The brokers a sink delivers to, behind one face: connect, and publish events so that each
//! stream's reach the broker in order, acknowledged before `publish` returns.

use super::delivery::Event;
use super::kafka::KafkaSink;
use super::nats::NatsSink;
use super::spec::{BrokerKind, SinkSpec};

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

/// A connected broker.
pub enum Broker {
    Nats(NatsSink),
    Kafka(KafkaSink),
}

impl Broker {
    pub async fn connect(spec: &SinkSpec) -> Result<Self, PublishFailure> {
        Ok(match spec.kind {
            BrokerKind::Nats { .. } => Broker::Nats(NatsSink::connect(spec).await?),
            BrokerKind::Kafka { .. } => Broker::Kafka(KafkaSink::connect(spec).await?),
        })
    }

    /// Publishes `events` (in commit order) and waits until the broker acknowledged all of
    /// them; returns how many the broker said it already had (JetStream's duplicate window;
    /// Kafka does not say).
    pub async fn publish(&self, events: &[&Event]) -> Result<u64, PublishFailure> {
        match self {
            Broker::Nats(nats) => nats.publish(events).await,
            Broker::Kafka(kafka) => kafka.publish(events).await,
        }
    }
}
