//! `cqrs-bench`: the pg_cqrs demo, benchmarks and load tool.

use clap::{Parser, Subcommand};

mod append_bench;
mod cpu;
mod demo;
mod groups_bench;
mod lag;
mod load;
mod outbox_bench;
mod projection_bench;
mod read_bench;
mod report;
mod retention_bench;
mod scale_bench;
mod sidecar_bench;
mod stack;
mod traces_bench;
mod workload;
mod writers;

#[derive(Parser)]
#[command(
    name = "cqrs-bench",
    version,
    about = "pg_cqrs demo, benchmarks and load tool"
)]
struct Cli {
    #[command(subcommand)]
    command: Commands,
}

#[derive(Subcommand)]
enum Commands {
    /// The local demo: private PostgreSQL + pg_cqrs + Redis + two sidecars and an order workload.
    Demo(demo::DemoArgs),
    /// cqrs.project_batch vs a hand-rolled set-based projector, and cqrs.rebuild of a large log.
    Project(projection_bench::ProjectArgs),
    /// cqrs.append throughput vs a plain INSERT … ON CONFLICT baseline (pgbench, fsync on).
    Append(append_bench::AppendArgs),
    /// cqrs-sidecar catch-up vs cqrs.project_batch called directly, and live projection lag.
    Sidecar(sidecar_bench::SidecarArgs),
    /// The load test: writes through cqrs.append and Zipf reads through the read API.
    Load(load::LoadArgs),
    /// The read API: JWT + row ownership vs no authentication, and load shedding at 2× capacity.
    Read(read_bench::ReadArgs),
    /// Scaling out: reads and cache writes on a Redis Cluster vs one Redis, misses on a replica.
    Scale(scale_bench::ScaleArgs),
    /// Projection groups: catch-up of a backlog with four projections in 1 vs 2 vs 4 groups.
    Groups(groups_bench::GroupsArgs),
    /// The outbox: a backlog delivered to NATS JetStream vs a minimal publisher, and what it
    /// costs the projections' catch-up.
    Outbox(outbox_bench::OutboxArgs),
    /// Retention: appends and catch-up on a year of daily log partitions vs one partition.
    Retention(retention_bench::RetentionArgs),
    /// Tracing: append and sidecar catch-up with traces off, on at 1 % and at 100 %.
    Traces(traces_bench::TracesArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Commands::Demo(args) => runtime.block_on(demo::run(args)),
        Commands::Append(args) => append_bench::run(args),
        Commands::Project(args) => runtime.block_on(projection_bench::run(args)),
        Commands::Sidecar(args) => runtime.block_on(sidecar_bench::run(args)),
        Commands::Load(args) => runtime.block_on(load::run(args)),
        Commands::Read(args) => runtime.block_on(read_bench::run(args)),
        Commands::Scale(args) => runtime.block_on(scale_bench::run(args)),
        Commands::Groups(args) => runtime.block_on(groups_bench::run(args)),
        Commands::Outbox(args) => runtime.block_on(outbox_bench::run(args)),
        Commands::Retention(args) => retention_bench::run(args),
        Commands::Traces(args) => runtime.block_on(traces_bench::run(args)),
    }
}

/// A file of this repository (examples, SQL), wherever the binary is run from.
pub(crate) fn repo_file(relative: &str) -> std::path::PathBuf {
    cqrs_harness::repo_root().join(relative)
}
