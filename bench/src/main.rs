//! `cqrs-bench`: the pg_cqrs demo, benchmarks and load tool.

use clap::{Parser, Subcommand};

mod append_bench;
mod demo;
mod report;
mod workload;

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
    /// The local demo: private Postgres + pg_cqrs + a concurrent order workload, then a summary.
    Demo(demo::DemoArgs),
    /// cqrs.append throughput vs a plain INSERT … ON CONFLICT baseline (pgbench, fsync on).
    Append(append_bench::AppendArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Commands::Demo(args) => runtime.block_on(demo::run(args)),
        Commands::Append(args) => append_bench::run(args),
    }
}
