//! Traces from the application's append to the read model, the cache and a read, received by a
//! real OTLP/HTTP receiver (harness/src/otlp.rs decodes the protocol's protobuf) from a
//! real sidecar process.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::eventually;
use cqrs_e2e::rig::Rig;
use cqrs_harness::otlp::{OtlpReceiver, ReceivedSpan};
use cqrs_harness::{outbox_check, ClusterOptions, NatsServer};
use cqrs_sidecar::traces::{self, attribute};
use serde_json::json;

fn random_hex(bytes: usize) -> String {
    let raw: Vec<u8> = (0..bytes).map(|_| rand::random::<u8>() | 1).collect();
    hex::encode(raw)
}

/// An application span: its trace id and span id, as its `traceparent` names them.
struct AppSpan {
    trace_id: String,
    span_id: String,
}

impl AppSpan {
    fn new() -> Self {
        Self {
            trace_id: random_hex(16),
            span_id: random_hex(8),
        }
    }

    fn traceparent(&self, sampled: bool) -> String {
        format!(
            "00-{}-{}-{}",
            self.trace_id,
            self.span_id,
            if sampled { "01" } else { "00" }
        )
    }
}

fn named<'a>(spans: &'a [ReceivedSpan], name: &str, trace_id: &str) -> Vec<&'a ReceivedSpan> {
    spans
        .iter()
        .filter(|s| s.name == name && s.trace_id == trace_id)
        .collect()
}

async fn append(
    client: &tokio_postgres::Client,
    stream: &str,
    command_type: &str,
    payload: serde_json::Value,
    metadata: serde_json::Value,
) -> Result<(uuid::Uuid, i64)> {
    let id = uuid::Uuid::now_v7();
    let row = client
        .query_one(
            "select seq from cqrs.append($1, $2, $3, $4, metadata => $5)",
            &[&id, &stream, &command_type, &payload, &metadata],
        )
        .await?;
    Ok((id, row.get(0)))
}

/// `own_ratio`: the share of the sidecar's own traces it samples (`0`: only what the
/// application sampled, and the batches carrying it, are exported).
async fn one_trace_from_append_to_read(edition: Edition, own_ratio: &str) -> Result<()> {
    // the sidecar exports to a receiver that passes everything on to another (the demo's
    // --otlp-endpoint: what the demo prints is what the operator's collector got)
    let collector = OtlpReceiver::start().await?;
    let receiver = OtlpReceiver::start_forwarding(&collector.endpoint()).await?;
    let nats = NatsServer::start()?;
    let mut rig = Rig::start_edition(edition, ClusterOptions::default()).await?;
    rig.set("CQRS_SINKS", &format!("events={}", nats.url()));
    rig.set("CQRS_OTLP_ENDPOINT", &receiver.endpoint());
    rig.set("CQRS_TRACE_SAMPLE_RATIO", own_ratio);
    // export every 100 ms, not every 5 s
    rig.set("OTEL_BSP_SCHEDULE_DELAY", "100");
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    // the sink delivers the projected batches (not a catch-up from the log) once a batch
    // attached it: commands of another stream until one did, then the test's
    let attached = || async {
        anyhow::Ok(
            rig.sidecars[0]
                .metrics()?
                .contains("cqrs_sink_attached{sink=\"events\"} 1"),
        )
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while !attached().await? {
        ensure!(
            std::time::Instant::now() < deadline,
            "the sink did not attach: {}",
            rig.logs()
        );
        append(
            &client,
            "order-warm-up",
            "CREATE_ORDER",
            json!({"user_id": "user-1", "currency": "EUR"}),
            json!({}),
        )
        .await?;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // an order placed in the application's span, one appended unsampled, one without a trace
    let placing = AppSpan::new();
    let stream = "order-traced";
    let (placed, placed_seq) = append(
        &client,
        stream,
        "CREATE_ORDER",
        json!({"user_id": "user-1", "currency": "EUR"}),
        json!({"traceparent": placing.traceparent(true), "tracestate": "app=1", "user": "u1"}),
    )
    .await?;
    let unsampled = AppSpan::new();
    append(
        &client,
        "order-unsampled",
        "CREATE_ORDER",
        json!({"user_id": "user-1", "currency": "EUR"}),
        json!({"traceparent": unsampled.traceparent(false)}),
    )
    .await?;
    append(
        &client,
        "order-untraced",
        "CREATE_ORDER",
        json!({"user_id": "user-1", "currency": "EUR"}),
        json!({}),
    )
    .await?;
    // the application's read, in a later span of the same trace, waiting for its own write
    let reading = AppSpan {
        trace_id: placing.trace_id.clone(),
        span_id: random_hex(8),
    };
    let url = format!(
        "{}/v1/projections/order_summary/{stream}?after={stream}:{placed_seq}&timeout_ms=10000",
        rig.http(0)
    );
    let response = reqwest::Client::new()
        .get(&url)
        .header("traceparent", reading.traceparent(true))
        .send()
        .await?;
    ensure!(response.status().as_u16() == 200, "read: {}", response.status());
    // a read that misses the cache: its backend query runs in a task of its own (one per key
    // however many ask), still in the trace of the request that started it
    let missing = AppSpan {
        trace_id: placing.trace_id.clone(),
        span_id: random_hex(8),
    };
    let response = reqwest::Client::new()
        .get(format!(
            "{}/v1/projections/order_summary/order-never-placed",
            rig.http(0)
        ))
        .header("traceparent", missing.traceparent(true))
        .send()
        .await?;
    ensure!(response.status().as_u16() == 404, "miss: {}", response.status());

    let mut spans = Vec::new();
    eventually(Duration::from_secs(20), "the spans of the order's trace", || {
        spans = receiver.spans();
        let missing: Vec<&str> = [
            (
                traces::PROJECT_COMMAND,
                !named(&spans, traces::PROJECT_COMMAND, &placing.trace_id).is_empty(),
            ),
            (
                traces::READ,
                !named(&spans, traces::READ, &placing.trace_id).is_empty(),
            ),
            (
                "the miss's read",
                spans
                    .iter()
                    .any(|s| s.name == traces::READ && s.parent_span_id == missing.span_id),
            ),
            (
                traces::SINK_PUBLISH,
                spans.iter().any(|s| s.name == traces::SINK_PUBLISH),
            ),
        ]
        .into_iter()
        .filter(|(_, found)| !found)
        .map(|(name, _)| name)
        .collect();
        let received: Vec<String> = spans.iter().map(|s| s.name.clone()).collect();
        async move {
            ensure!(missing.is_empty(), "missing {missing:?}; received {received:?}");
            Ok(())
        }
    })
    .await
    .with_context(|| rig.logs())?;
    let describe = || format!("{spans:#?}");

    // the command's span is the application span's child, in its trace, and names the command
    let project = named(&spans, traces::PROJECT_COMMAND, &placing.trace_id);
    ensure!(
        project.len() == 1,
        "one project span for the command: {}",
        describe()
    );
    let project = project[0];
    ensure!(project.service == "cqrs-sidecar", "service {}", project.service);
    ensure!(project.parent_span_id == placing.span_id, "parent: {project:#?}");
    ensure!(
        project.attribute(attribute::COMMAND_ID) == Some(placed.to_string().as_str()),
        "{project:#?}"
    );
    ensure!(
        project.attribute(attribute::STREAM) == Some(stream),
        "{project:#?}"
    );
    ensure!(
        project.attribute(attribute::SEQ) == Some(placed_seq.to_string().as_str()),
        "{project:#?}"
    );
    ensure!(
        project.attribute(attribute::COMMAND_TYPE) == Some("CREATE_ORDER"),
        "{project:#?}"
    );
    // it links to the batch that projected it, and the batch links back to the command
    ensure!(project.links.len() == 1, "{project:#?}");
    let (batch_trace, batch_span, _) = &project.links[0];
    let batch = spans
        .iter()
        .find(|s| s.name == traces::BATCH && &s.trace_id == batch_trace && &s.span_id == batch_span)
        .with_context(describe)?;
    let back = batch
        .links
        .iter()
        .find(|(trace, span, _)| trace == &placing.trace_id && span == &placing.span_id)
        .with_context(|| format!("the batch does not link the command: {batch:#?}"))?;
    ensure!(
        back.2
            .iter()
            .any(|(k, v)| k == attribute::COMMAND_ID && v == &placed.to_string()),
        "{batch:#?}"
    );
    ensure!(batch.attribute(attribute::BATCH_NUMBER).is_some(), "{batch:#?}");
    // the batch's steps are its children
    for step in [traces::PROJECT_BATCH, traces::CACHE_WRITE] {
        let child = spans
            .iter()
            .find(|s| s.name == step && s.parent_span_id == batch.span_id)
            .with_context(|| format!("no {step} under the batch: {}", describe()))?;
        ensure!(child.trace_id == batch.trace_id, "{child:#?}");
    }
    // the batch's decode is its child too: the slot's messages read into the batch before it
    // was projected (it began before the batch span, which opens when the batch is taken)
    let decode = spans
        .iter()
        .find(|s| s.name == traces::DECODE && s.parent_span_id == batch.span_id)
        .with_context(|| format!("no decode under the batch: {}", describe()))?;
    let projected = spans
        .iter()
        .find(|s| s.name == traces::PROJECT_BATCH && s.parent_span_id == batch.span_id)
        .with_context(describe)?;
    ensure!(
        decode.trace_id == batch.trace_id
            && decode.start_unix_nano <= decode.end_unix_nano
            && decode.end_unix_nano <= projected.start_unix_nano
            && decode.attribute("events").is_some()
            && decode.attribute("events") == batch.attribute("events"),
        "{decode:#?} {batch:#?} {projected:#?}"
    );
    // the command's span covers the batch's projection (it ends after the cache write)
    ensure!(
        project.end_unix_nano >= batch.start_unix_nano,
        "{project:#?} {batch:#?}"
    );

    // the read continues the caller's trace, says what it did, and shows its wait
    let read: Vec<_> = named(&spans, traces::READ, &placing.trace_id)
        .into_iter()
        .filter(|s| s.parent_span_id == reading.span_id)
        .collect();
    ensure!(read.len() == 1, "{}", describe());
    let read = read[0];
    ensure!(read.parent_span_id == reading.span_id, "{read:#?}");
    ensure!(
        read.attribute("http.response.status_code") == Some("200"),
        "{read:#?}"
    );
    ensure!(read.attribute("cqrs.read.outcome").is_some(), "{read:#?}");
    ensure!(read.attribute("cqrs.read.source").is_some(), "{read:#?}");
    let child = |name: &str, parent: &str| {
        spans
            .iter()
            .find(|s| s.name == name && s.parent_span_id == parent)
            .with_context(|| format!("no {name} under {parent}: {}", describe()))
    };
    child(traces::READ_WAIT, &read.span_id)?;
    // the miss's query, under its own read
    let missed = child(traces::READ, &missing.span_id)?;
    child(traces::READ_BACKEND, &missed.span_id)?;
    // and the PostgreSQL query that read the applied row (the cache may not have it yet)
    let backend = child(traces::READ_BACKEND, &read.span_id)?;
    ensure!(
        backend.attribute("cqrs.read.server") == Some("primary")
            && backend.attribute("db.system.name") == Some("postgresql"),
        "{backend:#?}"
    );

    // the sink's publish is linked to the batch it delivered, and says where it went
    let publish = spans
        .iter()
        .find(|s| {
            s.name == traces::SINK_PUBLISH
                && s.links
                    .iter()
                    .any(|(t, sp, _)| t == &batch.trace_id && sp == &batch.span_id)
        })
        .with_context(|| format!("no publish linked to the batch: {}", describe()))?;
    ensure!(
        publish.attribute(attribute::SINK) == Some("events"),
        "{publish:#?}"
    );
    ensure!(
        publish.attribute(attribute::MESSAGING_SYSTEM) == Some("nats"),
        "{publish:#?}"
    );
    // the messages carry the application's trace context as W3C headers, the others none
    let messages = {
        let url = nats.url();
        let deadline = std::time::Instant::now() + Duration::from_secs(20);
        loop {
            let messages = outbox_check::received(&url, "CQRS_EVENTS")
                .await
                .unwrap_or_default();
            let streams = ["order-traced", "order-unsampled", "order-untraced"];
            if streams.iter().all(|s| messages.iter().any(|m| &m.stream == s))
                || std::time::Instant::now() > deadline
            {
                break messages;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    };
    ensure!(
        messages.iter().any(|m| m.stream == "order-untraced"),
        "{messages:#?}"
    );
    for message in &messages {
        let expected = if message.stream == stream {
            (Some(placing.traceparent(true)), Some("app=1".to_owned()))
        } else if message.stream == "order-unsampled" {
            (Some(unsampled.traceparent(false)), None)
        } else {
            (None, None)
        };
        ensure!(
            (message.traceparent.clone(), message.tracestate.clone()) == expected,
            "{message:#?}"
        );
    }

    if own_ratio == "0" {
        // a batch is exported only for the sampled commands it carries (the warm-up's are not)
        for exported in spans.iter().filter(|s| s.name == traces::BATCH) {
            ensure!(
                !exported.links.is_empty(),
                "a batch without a traced command was exported: {exported:#?}"
            );
        }
    } else {
        // the catch-up from the log when the sidecar made its slot, with its cache write
        let catch_up = spans
            .iter()
            .find(|s| s.name == traces::CATCH_UP)
            .with_context(|| format!("no catch-up span: {}", describe()))?;
        ensure!(
            catch_up.attribute(attribute::PROJECTION_GROUP) == Some("default"),
            "{catch_up:#?}"
        );
        ensure!(catch_up.attribute("changed_rows").is_some(), "{catch_up:#?}");
        ensure!(
            spans
                .iter()
                .any(|s| s.name == traces::CACHE_WRITE && s.parent_span_id == catch_up.span_id),
            "no cache write under the catch-up: {}",
            describe()
        );
    }

    // an unsampled command gets no span of its own; the batch may still link it
    ensure!(
        named(&spans, traces::PROJECT_COMMAND, &unsampled.trace_id).is_empty(),
        "an unsampled command was traced: {}",
        describe()
    );

    // the collector behind the receiver got every span the receiver did, as sent (the receiver
    // passes a request on before it keeps it, so read first it holds no more than the collector;
    // the sidecar may export more in between)
    let ids = |spans: Vec<ReceivedSpan>| {
        let mut ids: Vec<(String, String, String)> = spans
            .into_iter()
            .map(|s| (s.trace_id, s.span_id, s.parent_span_id))
            .collect();
        ids.sort();
        ids
    };
    let (held, forwarded) = (ids(receiver.spans()), ids(collector.spans()));
    ensure!(
        !held.is_empty() && held.iter().all(|id| forwarded.binary_search(id).is_ok()),
        "{} spans received, {} forwarded ({:?})",
        held.len(),
        forwarded.len(),
        receiver.forwarded()
    );
    ensure!(receiver.forwarded().refused == 0, "{:?}", receiver.forwarded());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_one_trace_from_the_application_through_the_sidecar_to_a_read() -> Result<()> {
    // the sidecar samples none of its own traces
    one_trace_from_append_to_read(Edition::Extension, "0").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_command_is_one_trace_from_the_application_through_the_sidecar_to_a_read_portable() -> Result<()> {
    // the sidecar samples all of its own traces
    one_trace_from_append_to_read(Edition::Portable, "1").await
}
