//! `cqrs-bench`: the pg_cqrs demo, benchmarks and load tool.

use clap::{Parser, Subcommand};

mod append_bench;
mod demo;
mod projection_bench;
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
    /// cqrs.project_batch vs a hand-rolled set-based projector, and cqrs.rebuild of a large log.
    Project(projection_bench::ProjectArgs),
    /// cqrs.append throughput vs a plain INSERT … ON CONFLICT baseline (pgbench, fsync on).
    Append(append_bench::AppendArgs),
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    match cli.command {
        Commands::Demo(args) => runtime.block_on(demo::run(args)),
        Commands::Append(args) => append_bench::run(args),
        Commands::Project(args) => runtime.block_on(projection_bench::run(args)),
    }
}

/// A file of this repository (examples, SQL), wherever the binary is run from.
pub(crate) fn repo_file(relative: &str) -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("..")
        .join(relative)
}
