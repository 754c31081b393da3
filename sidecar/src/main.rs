use clap::Parser;

fn main() -> anyhow::Result<()> {
    let config = cqrs_sidecar::config::Config::parse();
    tracing_subscriber::fmt().with_target(false).init();
    tracing::info!(slot = %config.slot, publication = %config.publication, "configuration parsed; streaming is not implemented yet");
    Ok(())
}
