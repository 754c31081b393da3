//! The docker/ deployment cannot be built here (no Docker engine), so its checkable parts are
//! checked: Prometheus config and alert rules with promtool (including the rules' unit tests),
//! and every metric the alerts and the Grafana dashboard use exists in the sidecar.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

fn repo(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(relative)
}

fn promtool(args: &[&str]) -> Result<()> {
    let out = Command::new("promtool")
        .args(args)
        .current_dir(repo("docker/prometheus"))
        .output()
        .context("running promtool (apt-get install prometheus)")?;
    if !out.status.success() {
        bail!(
            "promtool {args:?} failed:\n{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `cqrs_…` names in a text, without histogram suffixes.
fn metric_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut i = 0;
    while let Some(found) = text[i..].find("cqrs_") {
        let start = i + found;
        let boundary = start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        let end = text[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(text.len(), |n| start + n);
        if boundary {
            let name = &text[start..end];
            let name = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|suffix| name.strip_suffix(suffix))
                .unwrap_or(name);
            names.insert(name.to_owned());
        }
        i = end;
    }
    names
}

/// The metric names the sidecar defines (the constants of sidecar/src/metrics.rs).
fn sidecar_metrics() -> Result<BTreeSet<String>> {
    let source = std::fs::read_to_string(repo("sidecar/src/metrics.rs"))?;
    let names: BTreeSet<String> = source
        .lines()
        .filter_map(|line| line.trim().strip_prefix("pub const "))
        .filter_map(|rest| rest.split_once("&str = \"").map(|(_, v)| v))
        .filter_map(|v| v.split_once('"').map(|(name, _)| name.to_owned()))
        .collect();
    if names.len() < 10 {
        bail!(
            "found only {} metric constants in sidecar/src/metrics.rs",
            names.len()
        );
    }
    Ok(names)
}

#[test]
fn prometheus_config_and_alert_rules_pass_promtool() -> Result<()> {
    promtool(&["check", "config", "prometheus.yml"])?;
    promtool(&["check", "rules", "alerts.yml"])?;
    promtool(&["test", "rules", "alerts_test.yml"])
}

#[test]
fn alerts_and_dashboard_use_only_metrics_the_sidecar_exports() -> Result<()> {
    let known = sidecar_metrics()?;
    for file in [
        "docker/prometheus/alerts.yml",
        "docker/grafana/dashboards/pg_cqrs.json",
    ] {
        let used = metric_names(&std::fs::read_to_string(repo(file))?);
        if used.is_empty() {
            bail!("{file} uses no cqrs_ metric");
        }
        let unknown: Vec<&String> = used.difference(&known).collect();
        if !unknown.is_empty() {
            bail!("{file} uses metrics the sidecar does not export: {unknown:?}");
        }
    }
    Ok(())
}

#[test]
fn metric_names_are_found_with_their_histogram_suffixes_removed() {
    let names = metric_names("rate(cqrs_read_duration_seconds_bucket[5m]) + my_cqrs_x + cqrs_leader");
    assert_eq!(
        names.into_iter().collect::<Vec<_>>(),
        vec!["cqrs_leader".to_owned(), "cqrs_read_duration_seconds".to_owned()]
    );
}

/// The development stack publishes nothing on every interface: its Redis has no password, and
/// the database, the read API and the dashboards are for this machine.
#[test]
fn the_compose_stack_publishes_ports_on_loopback_only() -> Result<()> {
    let compose = std::fs::read_to_string(repo("docker/compose.yaml"))?;
    let mut published = 0;
    for line in compose.lines().map(str::trim).filter(|l| l.starts_with("ports:")) {
        for mapping in line.split('"').skip(1).step_by(2) {
            published += 1;
            if !mapping.starts_with("127.0.0.1:") {
                bail!("docker/compose.yaml publishes {mapping} on every interface; bind it to 127.0.0.1");
            }
        }
    }
    if published == 0 {
        bail!("found no published port in docker/compose.yaml: has its format changed?");
    }
    Ok(())
}
