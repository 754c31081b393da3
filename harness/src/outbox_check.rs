//! What a subscriber of an outbox sink received, read back from the JetStream stream with an
//! ordered consumer (in the order JetStream stored it), and the verdict on it: every command of
//! the log exactly once (by its message id), and each stream's commands in seq order. For the
//! tests and the demo.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use async_nats::jetstream::{self, consumer::pull};
use futures_util::StreamExt;
use tokio_postgres::Client;

/// One stored message, by its headers.
#[derive(Debug, Clone)]
pub struct Received {
    pub id: String,
    pub stream: String,
    pub seq: i64,
    pub body: String,
    /// the W3C trace context headers, when the command carried them
    pub traceparent: Option<String>,
    pub tracestate: Option<String>,
}

/// Every message of JetStream stream `js_stream` on the server at `url`, in stored order.
pub async fn received(url: &str, js_stream: &str) -> Result<Vec<Received>> {
    let client = async_nats::connect(url).await.context("connecting to NATS")?;
    let context = jetstream::new(client);
    let mut stream = context
        .get_stream(js_stream)
        .await
        .context("the JetStream stream")?;
    let total = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(pull::OrderedConfig::default())
        .await
        .context("an ordered consumer")?;
    let mut messages = consumer.messages().await?;
    let mut out = Vec::with_capacity(total as usize);
    while (out.len() as u64) < total {
        let Some(message) = tokio::time::timeout(Duration::from_secs(10), messages.next())
            .await
            .context("waiting for a stored message")?
        else {
            bail!("the consumer ended after {} of {total} messages", out.len());
        };
        let message = message.map_err(|e| anyhow::anyhow!("reading a message: {e}"))?;
        let header = |name: &str| {
            message
                .headers
                .as_ref()
                .and_then(|h| h.get(name))
                .map(|v| v.as_str().to_owned())
                .with_context(|| format!("a message without {name}"))
        };
        out.push(Received {
            id: header("Nats-Msg-Id")?,
            stream: header("Cqrs-Stream")?,
            seq: header("Cqrs-Seq")?.parse()?,
            body: String::from_utf8(message.payload.to_vec())?,
            traceparent: header("traceparent").ok(),
            tracestate: header("tracestate").ok(),
        });
    }
    Ok(out)
}

/// Every command of the log whose stream starts with `prefix` was received exactly once, and
/// each stream's in seq order; returns how many were received.
pub async fn check(pg: &Client, received: &[Received], prefix: &str) -> Result<usize> {
    let mut seen = HashSet::new();
    let mut duplicates = Vec::new();
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    let mut disorder = Vec::new();
    for message in received {
        if !seen.insert(message.id.as_str()) {
            duplicates.push(message.id.clone());
        }
        let before = last.insert(message.stream.as_str(), message.seq).unwrap_or(0);
        if message.seq <= before {
            disorder.push(format!("{}#{} after #{before}", message.stream, message.seq));
        }
    }
    ensure!(
        duplicates.is_empty(),
        "{} messages received twice, e.g. {:?}",
        duplicates.len(),
        duplicates.first()
    );
    ensure!(
        disorder.is_empty(),
        "{} out of stream order, e.g. {:?}",
        disorder.len(),
        disorder.first()
    );
    let logged: Vec<String> = pg
        .query(
            "select command_id::text from cqrs.command_log where starts_with(stream, $1)",
            &[&prefix],
        )
        .await?
        .iter()
        .map(|row| row.get(0))
        .collect();
    let missing: Vec<&String> = logged.iter().filter(|id| !seen.contains(id.as_str())).collect();
    ensure!(
        missing.is_empty(),
        "{} of {} logged commands never arrived, e.g. {:?}",
        missing.len(),
        logged.len(),
        missing.first()
    );
    ensure!(
        seen.len() == logged.len(),
        "{} messages for {} logged commands",
        seen.len(),
        logged.len()
    );
    Ok(seen.len())
}

/// The verdict for an at-least-once sink (Kafka): a consumer that skips what it has seen of a
/// stream (a seq not above the stream's last) reads every logged command of the streams starting
/// with `prefix` exactly once, each stream from seq 1 without a gap; every message it skips
/// repeats the command id of the message with that seq. Returns (commands, resent messages).
pub async fn check_at_least_once(pg: &Client, received: &[Received], prefix: &str) -> Result<(usize, usize)> {
    let mut ids: HashMap<(&str, i64), &str> = HashMap::new();
    let mut last: BTreeMap<&str, i64> = BTreeMap::new();
    let mut resent = 0;
    for message in received {
        let key = (message.stream.as_str(), message.seq);
        let before = last.get(message.stream.as_str()).copied().unwrap_or(0);
        if message.seq <= before {
            resent += 1;
            ensure!(
                ids.get(&key) == Some(&message.id.as_str()),
                "{}#{} came again with another command id ({} then {:?})",
                message.stream,
                message.seq,
                message.id,
                ids.get(&key)
            );
            continue;
        }
        ensure!(
            message.seq == before + 1,
            "{}#{} follows #{before}: a gap",
            message.stream,
            message.seq
        );
        ids.insert(key, message.id.as_str());
        last.insert(message.stream.as_str(), message.seq);
    }
    let logged: Vec<(String, i64)> = pg
        .query(
            "select stream, seq from cqrs.command_log where starts_with(stream, $1)",
            &[&prefix],
        )
        .await?
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let missing = logged
        .iter()
        .filter(|(stream, seq)| !ids.contains_key(&(stream.as_str(), *seq)))
        .count();
    ensure!(
        missing == 0 && ids.len() == logged.len(),
        "{missing} of {} logged commands never arrived; {} distinct received",
        logged.len(),
        ids.len()
    );
    Ok((ids.len(), resent))
}
