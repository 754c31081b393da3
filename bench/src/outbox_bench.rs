//! `cqrs-bench outbox`: delivery of a backlog to NATS JetStream and to Kafka (tansu) by an outbox
//! sink, against each broker's ceiling on this machine, and what delivery costs the projections.
//!
//! Per broker:
//! 1. A stack with the backlog (PostgreSQL with fsync, Redis, the broker on loopback): a slot
//!    retains it while it is appended.
//! 2. The broker's ceiling: a minimal publisher in this tool sends the same messages (the same
//!    bodies, keys and headers) straight to the same broker (another stream or topic), as fast
//!    as it takes them: JetStream with 256 acknowledgements in flight, Kafka through the same
//!    idempotent producer settings as the sink with everything in flight.
//! 3. A sidecar with a sink starts on the backlog: timed until the projections are at the end of
//!    the log, and until the sink is — as configured by default (the sink waits for the
//!    projections to catch up on the slot before it catches up from the log), then on a fresh
//!    stack with `--sink-yield 0` (the sink catches up beside them).
//!
//! Then the same backlog on a fresh stack without a sink: the projections' catch-up alone.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use async_nats::jetstream::{self, stream};
use async_nats::HeaderMap;
use tokio_postgres::Client;

use crate::report::Table;
use crate::sidecar_bench::{append_backlog, events_behind, retain_slot, Backlog};
use crate::stack::Stack;
use cqrs_harness::{KafkaBroker, NatsServer};

#[derive(clap::Args, Debug)]
pub struct OutboxArgs {
    #[command(flatten)]
    backlog: Backlog,
    /// Which brokers to deliver to.
    #[arg(long, value_enum, default_value = "both")]
    broker: Which,
}

#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
enum Which {
    Nats,
    Kafka,
    Both,
}

/// One broker's figures.
struct Measured {
    name: &'static str,
    ceiling: f64,
    /// the sink as configured by default: it waits for the projections
    yielding: Run,
    /// with --sink-yield 0: it catches up beside them
    beside: Run,
}

/// Seconds from a sidecar's start until the projections, and the sink, were at the end of the log.
struct Run {
    projected: f64,
    delivered: f64,
}

const SINK: &str = "bench";
/// Acknowledgements the minimal publisher keeps in flight.
const IN_FLIGHT: usize = 256;

pub async fn run(args: OutboxArgs) -> Result<()> {
    let backlog = &args.backlog;
    let mut measured = Vec::new();
    if args.broker != Which::Kafka {
        let nats = tokio::task::spawn_blocking(NatsServer::start).await??;
        println!(
            "▶ with a NATS sink: PostgreSQL 15 (fsync on), redis-server, nats-server -js at {} …",
            nats.url()
        );
        let url = nats.url();
        measured.push(
            with_sink(backlog, "NATS JetStream", &nats.url(), |pg| async move {
                minimal_publisher(&pg, &url).await
            })
            .await?,
        );
    }
    if args.broker != Which::Nats {
        let kafka = tokio::task::spawn_blocking(KafkaBroker::start).await??;
        println!(
            "▶ with a Kafka sink: PostgreSQL 15 (fsync on), redis-server, tansu at {} …",
            kafka.bootstrap()
        );
        let bootstrap = kafka.bootstrap();
        measured.push(
            with_sink(backlog, "Kafka (tansu)", &kafka.url(), |pg| async move {
                minimal_kafka_producer(&pg, &bootstrap).await
            })
            .await?,
        );
    }

    println!("▶ without a sink: a fresh stack with the same backlog …");
    let mut stack = prepared_stack(backlog).await?;
    let (projected_without, _) = catch_up(&mut stack, false).await?;
    drop(stack);

    let events = backlog.backlog as f64;
    for m in &measured {
        println!(
            "\n▶ delivery of a backlog of {} commands to {}",
            backlog.backlog, m.name
        );
        let mut table = Table::new(&["path", "seconds", "events/s", "ratio"]);
        table.row(vec![
            "minimal publisher straight to the broker (the broker's ceiling)".into(),
            format!("{:.1}", m.ceiling),
            format!("{:.0}", events / m.ceiling),
            "1.00x".into(),
        ]);
        table.row(vec![
            "sink beside the projections' catch-up (--sink-yield 0): log → broker, recorded per stream"
                .into(),
            format!("{:.1}", m.beside.delivered),
            format!("{:.0}", events / m.beside.delivered),
            format!("{:.2}x", m.ceiling / m.beside.delivered),
        ]);
        let own = m.yielding.delivered - m.yielding.projected;
        table.row(vec![
            format!(
                "sink by default: waits for the projections ({:.1} s), then delivers in {own:.1} s",
                m.yielding.projected
            ),
            format!("{:.1}", m.yielding.delivered),
            format!("{:.0}", events / m.yielding.delivered),
            format!("{:.2}x", m.ceiling / m.yielding.delivered),
        ]);
        table.print();
    }
    println!("\n▶ projection catch-up of the same backlog");
    let mut table = Table::new(&["sidecar", "seconds", "events/s", "ratio"]);
    table.row(vec![
        "without a sink".into(),
        format!("{projected_without:.1}"),
        format!("{:.0}", events / projected_without),
        "1.00x".into(),
    ]);
    for m in &measured {
        for (how, run) in [
            ("by default (it waits)", &m.yielding),
            ("beside them (--sink-yield 0)", &m.beside),
        ] {
            table.row(vec![
                format!("with a {} sink {how}", m.name),
                format!("{:.1}", run.projected),
                format!("{:.0}", events / run.projected),
                format!("{:.2}x", projected_without / run.projected),
            ]);
        }
    }
    table.print();
    println!(
        "PostgreSQL, Redis, the broker, the sidecar and this tool share the machine's {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}

/// On a stack with the backlog: the broker's ceiling (`ceiling`, given a connection to read the
/// log with), then a sidecar with a sink to `sink_url` catching up on it; then the same on a
/// fresh stack with a sink that does not wait for the projections.
async fn with_sink<F, Fut>(
    backlog: &Backlog,
    name: &'static str,
    sink_url: &str,
    ceiling: F,
) -> Result<Measured>
where
    F: FnOnce(Client) -> Fut,
    Fut: std::future::Future<Output = Result<f64>>,
{
    let mut stack = prepared_stack(backlog).await?;
    let ceiling = ceiling(stack.client().await?).await?;
    stack.set("CQRS_SINKS", &format!("{SINK}={sink_url}"));
    let yielding = sink_run(&mut stack).await?;
    drop(stack);
    println!("  again on a fresh stack, the sink beside the projections (--sink-yield 0) …");
    let mut stack = prepared_stack(backlog).await?;
    stack.set("CQRS_SINKS", &format!("{SINK}={sink_url}"));
    stack.set("CQRS_SINK_YIELD", "0");
    let beside = sink_run(&mut stack).await?;
    Ok(Measured {
        name,
        ceiling,
        yielding,
        beside,
    })
}

async fn sink_run(stack: &mut Stack) -> Result<Run> {
    let (projected, delivered) = catch_up(stack, true).await?;
    Ok(Run {
        projected,
        delivered: delivered.context("the sink's time")?,
    })
}

/// A stack whose slot retains a backlog appended after it was made.
async fn prepared_stack(backlog: &Backlog) -> Result<Stack> {
    let stack = Stack::start(backlog.edition, true).await?;
    let client = stack.client().await?;
    retain_slot(&client).await?;
    println!("  appending a backlog of {} commands …", backlog.backlog);
    append_backlog(&stack.owner_url, backlog.backlog, backlog.per_transaction).await?;
    client.batch_execute("checkpoint").await?;
    Ok(stack)
}

/// The log as the sinks send it: command id, stream, seq, type, position, body.
async fn log_rows(pg: &Client) -> Result<Vec<tokio_postgres::Row>> {
    Ok(pg
        .query(
            "select l.command_id::text, l.stream, l.seq, l.command_type, l.position,
                    pg_catalog.json_build_object('position', l.position, 'command_id', l.command_id, 'stream', l.stream,
                        'seq', l.seq, 'command_type', l.command_type, 'payload', l.payload,
                        'metadata', l.metadata, 'created_at', l.created_at::text)::text
               from cqrs.command_log l order by l.position",
            &[],
        )
        .await?)
}

/// The same messages as the Kafka sink's (key, headers, body), produced straight to topic
/// `bench.raw` by an idempotent producer, everything in flight: seconds taken.
async fn minimal_kafka_producer(pg: &Client, bootstrap: &str) -> Result<f64> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::client::DefaultClientContext;
    use rdkafka::config::ClientConfig;
    use rdkafka::error::{KafkaError, RDKafkaErrorCode};
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{FutureProducer, FutureRecord};

    println!("  the minimal producer: reading the log, then producing it …");
    let rows = log_rows(pg).await?;
    let admin: AdminClient<DefaultClientContext> =
        ClientConfig::new().set("bootstrap.servers", bootstrap).create()?;
    admin
        .create_topics(
            &[NewTopic::new("bench.raw", 6, TopicReplication::Fixed(-1))],
            &AdminOptions::new(),
        )
        .await?;
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("acks", "all")
        .set("linger.ms", "2")
        .create()?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(rows.len());
    for row in &rows {
        let (seq, position) = (row.get::<_, i64>(2).to_string(), row.get::<_, i64>(4).to_string());
        let headers = OwnedHeaders::new_with_capacity(5)
            .insert(Header {
                key: "Cqrs-Command-Id",
                value: Some(row.get::<_, &str>(0)),
            })
            .insert(Header {
                key: "Cqrs-Stream",
                value: Some(row.get::<_, &str>(1)),
            })
            .insert(Header {
                key: "Cqrs-Seq",
                value: Some(seq.as_str()),
            })
            .insert(Header {
                key: "Cqrs-Command-Type",
                value: Some(row.get::<_, &str>(3)),
            })
            .insert(Header {
                key: "Cqrs-Position",
                value: Some(position.as_str()),
            });
        let key: &str = row.get(1);
        let body: &str = row.get(5);
        let mut record = FutureRecord::to("bench.raw")
            .key(key)
            .payload(body)
            .headers(headers);
        loop {
            match producer.send_result(record) {
                Ok(delivery) => {
                    pending.push_back(delivery);
                    break;
                }
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                    record = back;
                    if let Some(oldest) = pending.pop_front() {
                        oldest.await?.map_err(|(e, _)| e)?;
                    }
                }
                Err((err, _)) => return Err(err.into()),
            }
        }
    }
    for delivery in pending {
        delivery.await?.map_err(|(e, _)| e)?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("  {} messages in {seconds:.1} s", rows.len());
    Ok(seconds)
}

/// The same messages as the sink's, published straight to stream `BENCH_RAW`: seconds taken.
async fn minimal_publisher(pg: &Client, url: &str) -> Result<f64> {
    println!("  the minimal publisher: reading the log, then publishing it …");
    let rows = log_rows(pg).await?;
    let client = async_nats::connect(url).await?;
    let context = jetstream::new(client);
    context
        .get_or_create_stream(stream::Config {
            name: "BENCH_RAW".into(),
            subjects: vec!["bench.raw.>".into()],
            storage: stream::StorageType::File,
            ..Default::default()
        })
        .await?;
    let started = Instant::now();
    let mut pending = std::collections::VecDeque::with_capacity(IN_FLIGHT);
    for row in &rows {
        let mut headers = HeaderMap::new();
        headers.insert("Nats-Msg-Id", row.get::<_, &str>(0));
        headers.insert("Cqrs-Stream", row.get::<_, &str>(1));
        headers.insert("Cqrs-Seq", row.get::<_, i64>(2).to_string().as_str());
        headers.insert("Cqrs-Command-Type", row.get::<_, &str>(3));
        headers.insert("Cqrs-Position", row.get::<_, i64>(4).to_string().as_str());
        let subject = format!("bench.raw.{}", row.get::<_, &str>(3));
        let body: String = row.get(5);
        pending.push_back(
            context
                .publish_with_headers(subject, headers, body.into())
                .await?,
        );
        if pending.len() >= IN_FLIGHT {
            if let Some(ack) = pending.pop_front() {
                ack.await?;
            }
        }
    }
    for ack in pending {
        ack.await?;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("  {} messages in {seconds:.1} s", rows.len());
    Ok(seconds)
}

/// Starts a sidecar on the backlog: seconds until the projections are at the end of the log, and
/// (with a sink) until the sink is.
async fn catch_up(stack: &mut Stack, with_sink: bool) -> Result<(f64, Option<f64>)> {
    let client = stack.client().await?;
    let started = Instant::now();
    stack.add_sidecar()?;
    let mut projected = None;
    let mut delivered = None;
    loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if projected.is_none() && events_behind(&client).await? <= 0 {
            projected = Some(started.elapsed().as_secs_f64());
        }
        if with_sink && delivered.is_none() && sink_behind(&client).await? == Some(0) {
            delivered = Some(started.elapsed().as_secs_f64());
        }
        if let Some(projected) = projected {
            if !with_sink || delivered.is_some() {
                println!(
                    "  projected in {projected:.1} s{}",
                    delivered
                        .map(|d| format!(", delivered in {d:.1} s"))
                        .unwrap_or_default()
                );
                return Ok((projected, delivered));
            }
        }
        if started.elapsed() > Duration::from_secs(900) {
            bail!(
                "not caught up after 15 minutes; log:\n{}",
                stack.sidecars[0].log()
            );
        }
    }
}

/// Commands after the sink's checkpoint, read cheaply: `cqrs.sink_status()` counts them, which
/// over a backlog of this size costs the machine more than a poll every 100 ms should.
async fn sink_behind(client: &Client) -> Result<Option<i64>> {
    Ok(client
        .query_opt(
            "select coalesce((select max(position) from cqrs.command_log), 0) - coalesce(s.checkpoint_position, 0)
               from cqrs.sink s where s.name = $1",
            &[&SINK],
        )
        .await?
        .map(|row| row.get::<_, i64>(0).max(0)))
}
