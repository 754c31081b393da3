//! `cqrs-bench traces`: what observability costs (issue 25: "overhead of tracing on (sampled
//! 100 % and 1 %) vs off on the sidecar's catch-up and on append, in one run; goal < 5 % at 1 %").
//!
//! - **Counting appends** (`cqrs.stats()`): the same appends in a second cluster whose pg_cqrs is
//!   not in `shared_preload_libraries` (nothing counted) against the stack's (preloaded, as the
//!   README installs it), rounds interleaved.
//! - **Append**: one session appends `--appends` commands with `metadata = '{}'` and the same
//!   number carrying a `traceparent` (which `cqrs.append` checks), rounds interleaved, with
//!   `synchronous_commit = off` so that the check's cost is not lost in the WAL flush.
//! - **Catch-up**: every command of the backlog carries a `traceparent`, as an application
//!   tracing its requests writes it. Per run, `--backlog` new commands are appended while the
//!   sidecar is stopped (its slot retains them), then a release sidecar is started and timed
//!   until every projection has applied them: traces off; on at 1 % (the application sampled one
//!   command in a hundred, the sidecar samples 1 % of its own traces: `--trace-sample-ratio
//!   0.01`; a batch carrying a sampled command is kept); and on at 100 % (every command sampled,
//!   ratio 1), sending to a real OTLP/HTTP receiver in this process. Modes interleaved (each round starting with
//!   another), after one uncounted catch-up; `--rounds` rounds, medians.

use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use cqrs_harness::connect;
use cqrs_harness::edition::Edition;
use cqrs_harness::otlp::OtlpReceiver;
use serde_json::{json, Value};

use crate::report::{median, Table};
use crate::sidecar_bench::{events_behind, retain_slot};
use crate::stack::Stack;
use crate::workload::OrderGenerator;

#[derive(clap::Args, Debug)]
pub struct TracesArgs {
    /// Commands appended and caught up on per catch-up run.
    #[arg(long, default_value_t = 50_000)]
    backlog: u64,
    /// Commands appended per append run.
    #[arg(long, default_value_t = 20_000)]
    appends: u64,
    /// Interleaved rounds; the median is reported.
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    Off,
    OnePercent,
    Everything,
}

impl Mode {
    const ALL: [Mode; 3] = [Mode::Off, Mode::OnePercent, Mode::Everything];

    fn name(self) -> &'static str {
        match self {
            Mode::Off => "traces off",
            Mode::OnePercent => "traces on, 1 % sampled",
            Mode::Everything => "traces on, 100 % sampled",
        }
    }

    fn settings(self, endpoint: &str) -> Vec<(&'static str, String)> {
        match self {
            Mode::Off => Vec::new(),
            Mode::OnePercent => vec![
                ("CQRS_OTLP_ENDPOINT", endpoint.to_owned()),
                ("CQRS_TRACE_SAMPLE_RATIO", "0.01".to_owned()),
            ],
            Mode::Everything => vec![
                ("CQRS_OTLP_ENDPOINT", endpoint.to_owned()),
                ("CQRS_TRACE_SAMPLE_RATIO", "1".to_owned()),
            ],
        }
    }

    /// The share of the backlog's commands the application sampled (their traceparent's flag).
    fn sampled(self) -> f64 {
        match self {
            Mode::OnePercent => 0.01,
            Mode::Off | Mode::Everything => 1.0,
        }
    }
}

fn traceparent(sampled: bool) -> String {
    let trace: [u8; 16] = rand::random();
    let span: [u8; 8] = rand::random();
    // never all zero: W3C forbids it and cqrs.append refuses it
    format!(
        "00-{}-{}-{}",
        hex::encode(trace.map(|b| b | 1)),
        hex::encode(span.map(|b| b | 1)),
        if sampled { "01" } else { "00" }
    )
}

/// Appends `count` order commands in transactions of 50 through `cqrs.append_batch`, each with
/// a `traceparent` in its metadata.
async fn append_traced(url: &str, generator: &mut OrderGenerator, count: u64, sampled: f64) -> Result<()> {
    let client = connect(url).await?;
    let statement = client
        .prepare("select count(*) from cqrs.append_batch($1)")
        .await?;
    let mut left = count;
    while left > 0 {
        let n = left.min(50);
        let batch: Vec<Value> = (0..n)
            .map(|_| {
                let c = generator.next_command();
                json!({"command_id": uuid::Uuid::now_v7().to_string(), "stream": c.stream,
                       "command_type": c.command_type, "payload": c.payload,
                       "metadata": {"traceparent": traceparent(rand::random::<f64>() < sampled)}})
            })
            .collect();
        client.query_one(&statement, &[&Value::Array(batch)]).await?;
        left -= n;
    }
    Ok(())
}

/// Seconds one session takes to append `count` commands, with or without a traceparent each.
/// Commits do not wait for the WAL flush here: with it, one session measures the disk's flush
/// time, not what the check costs.
async fn append_seconds(url: &str, count: u64, traced: bool, stream_base: u64) -> Result<f64> {
    let client = connect(url).await?;
    client.batch_execute("set synchronous_commit = off").await?;
    let statement = client
        .prepare("select seq from cqrs.append($1, $2, 'CREATE_ORDER', $3, metadata => $4)")
        .await?;
    let payload = json!({"user_id": "user-1", "currency": "EUR"});
    let metadata: Vec<Value> = (0..count)
        .map(|_| {
            if traced {
                json!({"traceparent": traceparent(true)})
            } else {
                json!({})
            }
        })
        .collect();
    let started = Instant::now();
    for (i, metadata) in metadata.iter().enumerate() {
        let stream = format!("append-{}", stream_base + i as u64);
        client
            .query_one(&statement, &[&uuid::Uuid::now_v7(), &stream, &payload, metadata])
            .await?;
    }
    Ok(started.elapsed().as_secs_f64())
}

/// Seconds a fresh sidecar in `mode` takes to apply what is behind.
async fn catch_up_seconds(stack: &mut Stack, mode: Mode, endpoint: &str) -> Result<f64> {
    for key in [
        "CQRS_OTLP_ENDPOINT",
        "OTEL_TRACES_SAMPLER",
        "OTEL_TRACES_SAMPLER_ARG",
    ] {
        stack.unset(key);
    }
    for (key, value) in mode.settings(endpoint) {
        stack.set(key, &value);
    }
    let client = stack.client().await?;
    let started = Instant::now();
    let sidecar = stack.add_sidecar()?;
    loop {
        tokio::time::sleep(Duration::from_millis(50)).await;
        if events_behind(&client).await? <= 0 {
            break;
        }
        if started.elapsed() > Duration::from_secs(600) || !stack.sidecars[sidecar].is_running() {
            bail!(
                "the sidecar did not catch up; log:\n{}",
                stack.sidecars[sidecar].log()
            );
        }
    }
    let seconds = started.elapsed().as_secs_f64();
    stack.stop_sidecars();
    Ok(seconds)
}

pub async fn run(args: TracesArgs) -> Result<()> {
    println!("▶ starting PostgreSQL 15 (fsync on), redis-server, the example order projections, an OTLP receiver …");
    let receiver = OtlpReceiver::start().await?;
    let endpoint = receiver.endpoint();
    let mut stack = Stack::start(Edition::Extension, true).await?;
    retain_slot(&stack.client().await?).await?;
    let mut generator = OrderGenerator::new(25, 1, 20_000, 1000);

    // a cluster like the stack's but without the preload: appends there are not counted
    let uncounted = tokio::task::spawn_blocking(|| {
        cqrs_harness::edition::cluster(Edition::Extension, cqrs_harness::ClusterOptions::default())
    })
    .await??;
    crate::stack::register_command_types(&connect(&uncounted.url()).await?).await?;
    let mut append_uncounted = Vec::new();
    let mut append_off = Vec::new();
    let mut append_on = Vec::new();
    let mut catch_up: Vec<Vec<f64>> = vec![Vec::new(); Mode::ALL.len()];
    let mut received = vec![0usize; Mode::ALL.len()];
    let mut stream_base = 0;
    // a first catch-up, not counted: the first sidecar run warms the caches and plans
    append_traced(&stack.owner_url, &mut generator, args.backlog / 5, 1.0).await?;
    catch_up_seconds(&mut stack, Mode::Off, &endpoint).await?;
    for round in 1..=args.rounds {
        println!("▶ round {round} of {}", args.rounds);
        let seconds = append_seconds(&uncounted.url(), args.appends, false, stream_base).await?;
        println!("  append, not counted (no preload): {seconds:.2} s");
        append_uncounted.push(seconds);
        for traced in [false, true] {
            let seconds = append_seconds(&stack.owner_url, args.appends, traced, stream_base).await?;
            stream_base += args.appends;
            println!(
                "  append, {}: {seconds:.2} s",
                if traced { "with traceparent" } else { "without" }
            );
            if traced { &mut append_on } else { &mut append_off }.push(seconds);
        }
        // the appends above went into the stack's log too: projected now, uncounted, so that
        // every counted catch-up applies its own backlog only; and the vacuum and checkpoint
        // work they left behind is done now, not during the first catch-up of the round
        catch_up_seconds(&mut stack, Mode::Off, &endpoint).await?;
        let client = stack.client().await?;
        client.batch_execute("vacuum analyze").await?;
        client.batch_execute("checkpoint").await?;
        // each round starts with another mode, so that none is always first after the appends
        for k in 0..Mode::ALL.len() {
            let i = (k + round as usize) % Mode::ALL.len();
            let mode = &Mode::ALL[i];
            append_traced(&stack.owner_url, &mut generator, args.backlog, mode.sampled()).await?;
            stack.client().await?.batch_execute("checkpoint").await?;
            let before = receiver.spans().len();
            let seconds = catch_up_seconds(&mut stack, *mode, &endpoint)
                .await
                .with_context(|| format!("catch-up, {}", mode.name()))?;
            received[i] += receiver.spans().len() - before;
            println!("  catch-up, {}: {seconds:.2} s", mode.name());
            catch_up[i].push(seconds);
        }
    }

    println!(
        "\n▶ append, one session, {} commands per run (medians of {} rounds)",
        args.appends, args.rounds
    );
    let mut table = Table::new(&[
        "appends",
        "s",
        "speed vs not counted",
        "speed vs no trace context",
    ]);
    let uncounted_s = median(&append_uncounted);
    let off = median(&append_off);
    let on = median(&append_on);
    table.row(vec![
        "not counted (pg_cqrs not preloaded), metadata {}".into(),
        format!("{uncounted_s:.2}"),
        "1.00x".into(),
        "-".into(),
    ]);
    table.row(vec![
        "counted (cqrs.stats()), metadata {}".into(),
        format!("{off:.2}"),
        format!("{:.2}x", uncounted_s / off),
        "1.00x".into(),
    ]);
    table.row(vec![
        "counted, metadata {\"traceparent\": …} (checked)".into(),
        format!("{on:.2}"),
        format!("{:.2}x", uncounted_s / on),
        format!("{:.2}x", off / on),
    ]);
    table.print();
    println!(
        "\n▶ sidecar catch-up of {} traced commands per run (medians of {} rounds; spans received over all rounds)",
        args.backlog, args.rounds
    );
    let mut table = Table::new(&["sidecar", "s", "events/s", "speed vs off", "spans received"]);
    let base = median(&catch_up[0]);
    for (i, mode) in Mode::ALL.iter().enumerate() {
        let seconds = median(&catch_up[i]);
        table.row(vec![
            mode.name().into(),
            format!("{seconds:.2}"),
            format!("{:.0}", args.backlog as f64 / seconds),
            format!("{:.2}x", base / seconds),
            received[i].to_string(),
        ]);
    }
    table.print();
    println!(
        "PostgreSQL, Redis, the sidecar, the receiver and this client share the machine's {} cores.",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );
    Ok(())
}
