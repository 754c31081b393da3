//! A Kafka sink (the `rdkafka` crate, librdkafka): each event is produced keyed by its stream —
//! one stream, one partition, in order — by an idempotent producer (the broker drops what a
//! retry inside the producer sends twice), with the command id as the `Cqrs-Command-Id` header
//! (a consumer's identity for what a crash between the broker's acknowledgement and the
//! database's record sends again) and `Cqrs-Stream`, `Cqrs-Seq`, `Cqrs-Command-Type`,
//! `Cqrs-Position`. With `transactional=true` each delivery is one Kafka transaction.

use std::collections::HashSet;
use std::sync::Mutex;
use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};

use super::broker::PublishFailure;
use super::delivery::{Event, TRACEPARENT_HEADER, TRACESTATE_HEADER};
use super::spec::{BrokerKind, SinkSpec};

/// How long a produced event may wait for the broker before the delivery fails and is tried
/// again (the sink detaches from the slot meanwhile).
const MESSAGE_TIMEOUT: Duration = Duration::from_secs(10);
/// Transactions: how long init/commit/abort may take, and how long the broker keeps an open one.
const TRANSACTION_CALL_TIMEOUT: Duration = Duration::from_secs(15);
const TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);
/// A topic created by the sink: the broker's default replication factor (KIP-464).
const BROKER_DEFAULT_REPLICATION: i32 = -1;

pub struct KafkaSink {
    producer: FutureProducer,
    admin: AdminClient<DefaultClientContext>,
    spec: SinkSpec,
    transactional: bool,
    partitions: i32,
    /// topics known to exist (created or found)
    topics: Mutex<HashSet<String>>,
}

impl KafkaSink {
    pub async fn connect(spec: &SinkSpec) -> Result<Self, PublishFailure> {
        let BrokerKind::Kafka {
            transactional,
            partitions,
        } = spec.kind
        else {
            return Err(PublishFailure::Transient(format!(
                "sink {} is not a Kafka sink",
                spec.name
            )));
        };
        let mut config = ClientConfig::new();
        config
            .set("bootstrap.servers", spec.broker())
            .set("client.id", format!("cqrs-sidecar-sink-{}", spec.name))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("linger.ms", "2")
            .set("message.timeout.ms", MESSAGE_TIMEOUT.as_millis().to_string());
        if transactional {
            config.set("transactional.id", format!("cqrs-{}", spec.name)).set(
                "transaction.timeout.ms",
                TRANSACTION_TIMEOUT.as_millis().to_string(),
            );
        }
        let producer: FutureProducer = config.create().map_err(transient("creating the producer"))?;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", spec.broker())
            .create()
            .map_err(transient("creating the admin client"))?;
        if transactional {
            // fences any earlier producer of this transactional.id (a deposed leader's) and
            // aborts what it left open
            let fencing = producer.clone();
            blocking(move || fencing.init_transactions(TRANSACTION_CALL_TIMEOUT))
                .await
                .map_err(transient("initialising transactions"))?;
        }
        Ok(Self {
            producer,
            admin,
            spec: spec.clone(),
            transactional,
            partitions,
            topics: Mutex::new(HashSet::new()),
        })
    }

    /// Produces `events` (each keyed by its stream; librdkafka keeps a partition's order, the
    /// idempotent producer keeps it across its own retries) and waits for every acknowledgement.
    /// Kafka does not say which were duplicates: 0.
    pub async fn publish(&self, events: &[&Event]) -> Result<u64, PublishFailure> {
        if events.is_empty() {
            return Ok(0);
        }
        let destinations: Vec<String> = events
            .iter()
            .map(|e| self.spec.destination_of(&e.command_type))
            .collect();
        self.ensure_topics(&destinations).await?;
        if self.transactional {
            self.producer
                .begin_transaction()
                .map_err(transient("beginning a transaction"))?;
        }
        match self.produce_all(events, &destinations).await {
            Ok(()) if self.transactional => {
                let committing = self.producer.clone();
                match blocking(move || committing.commit_transaction(TRANSACTION_CALL_TIMEOUT)).await {
                    Ok(()) => Ok(0),
                    Err(err) => {
                        self.abort().await;
                        Err(transient("committing the transaction")(err))
                    }
                }
            }
            Ok(()) => Ok(0),
            Err(failure) => {
                if self.transactional {
                    self.abort().await;
                }
                Err(failure)
            }
        }
    }

    async fn produce_all(&self, events: &[&Event], destinations: &[String]) -> Result<(), PublishFailure> {
        let mut pending: Vec<(&Event, DeliveryFuture)> = Vec::with_capacity(events.len());
        for (event, topic) in events.iter().zip(destinations) {
            let seq = event.seq.to_string();
            let position = event.position.to_string();
            let mut headers = OwnedHeaders::new_with_capacity(7)
                .insert(header("Cqrs-Command-Id", &event.command_id))
                .insert(header("Cqrs-Stream", &event.stream))
                .insert(header("Cqrs-Seq", &seq))
                .insert(header("Cqrs-Command-Type", &event.command_type))
                .insert(header("Cqrs-Position", &position));
            if let Some(traceparent) = &event.traceparent {
                headers = headers.insert(header(TRACEPARENT_HEADER, traceparent));
                if let Some(tracestate) = &event.tracestate {
                    headers = headers.insert(header(TRACESTATE_HEADER, tracestate));
                }
            }
            let mut record = FutureRecord::to(topic)
                .key(event.stream.as_str())
                .payload(event.json.as_str())
                .headers(headers);
            loop {
                match self.producer.send_result(record) {
                    Ok(delivery) => {
                        pending.push((event, delivery));
                        break;
                    }
                    Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                        // librdkafka's queue is full: wait for what is in flight, then go on
                        record = back;
                        for (sent, delivery) in pending.drain(..) {
                            acknowledged(sent, delivery).await?;
                        }
                        tokio::time::sleep(Duration::from_millis(1)).await;
                    }
                    Err((err, _)) => return Err(failure(event, err)),
                }
            }
        }
        for (event, delivery) in pending {
            acknowledged(event, delivery).await?;
        }
        Ok(())
    }

    /// Creates the topics not known yet (with the sink's partition count); one that exists is
    /// left as it is.
    async fn ensure_topics(&self, destinations: &[String]) -> Result<(), PublishFailure> {
        let missing: Vec<String> = {
            let known = self.topics.lock().unwrap_or_else(|p| p.into_inner());
            let mut missing: Vec<String> = destinations
                .iter()
                .filter(|t| !known.contains(*t))
                .cloned()
                .collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing.is_empty() {
            return Ok(());
        }
        let new: Vec<NewTopic<'_>> = missing
            .iter()
            .map(|t| {
                NewTopic::new(
                    t,
                    self.partitions,
                    TopicReplication::Fixed(BROKER_DEFAULT_REPLICATION),
                )
            })
            .collect();
        let results = self
            .admin
            .create_topics(
                &new,
                &AdminOptions::new().operation_timeout(Some(Duration::from_secs(10))),
            )
            .await
            .map_err(transient("creating topics"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    return Err(PublishFailure::Transient(format!(
                        "creating the topic {topic}: {code}"
                    )))
                }
            }
        }
        self.topics
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(missing);
        Ok(())
    }

    async fn abort(&self) {
        let aborting = self.producer.clone();
        if let Err(err) = blocking(move || aborting.abort_transaction(TRANSACTION_CALL_TIMEOUT)).await {
            // the producer is renewed with the next attempt (a new connect), which aborts it
            tracing::warn!(sink = %self.spec.name, error = %err, "aborting the Kafka transaction failed");
        }
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}

async fn acknowledged(event: &Event, delivery: DeliveryFuture) -> Result<(), PublishFailure> {
    match delivery.await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((err, _))) => Err(failure(event, err)),
        Err(_) => Err(PublishFailure::Transient(
            "the producer went away before the broker answered".to_owned(),
        )),
    }
}

/// Decided on the error's code: only an event larger than the broker or the producer takes is
/// refused for good.
fn failure(event: &Event, err: KafkaError) -> PublishFailure {
    match err.rdkafka_error_code() {
        Some(RDKafkaErrorCode::MessageSizeTooLarge) => PublishFailure::Refused {
            position: event.position,
            reason: err.to_string(),
        },
        _ => PublishFailure::Transient(err.to_string()),
    }
}

fn transient(doing: &'static str) -> impl Fn(KafkaError) -> PublishFailure {
    move |err| PublishFailure::Transient(format!("{doing}: {err}"))
}

/// librdkafka's transaction calls block: run them off the async workers.
async fn blocking<F>(call: F) -> Result<(), KafkaError>
where
    F: FnOnce() -> Result<(), KafkaError> + Send + 'static,
{
    tokio::task::spawn_blocking(call)
        .await
        .unwrap_or_else(|_| Err(KafkaError::Canceled))
}
