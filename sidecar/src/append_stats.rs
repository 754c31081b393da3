//! The command side's figures as Prometheus metrics: what `cqrs.append` answered, per command
//! type and outcome (`cqrs_appends_total`), and how long it took (`cqrs_append_duration_seconds`),
//! as the database counts them in shared memory (`cqrs.stats()`, `cqrs.append_latency()`:
//! extension edition with pg_cqrs in `shared_preload_libraries`). They are exported as the
//! database has them — a collector over the last poll, not counters of the sidecar's own — so
//! every sidecar shows the same figures, and they start again from zero when PostgreSQL restarts
//! (Prometheus' `rate()` and `increase()` take that as a counter reset).
//!
//! Where the database cannot count (the portable edition: 0A000; the library not preloaded:
//! 55000; a pg_cqrs before 0.3.0: no such function), nothing is exported and the sidecar says
//! why once.

use std::sync::Mutex;

use prometheus::core::{Collector, Desc};
use prometheus::proto::{Bucket, Counter, Histogram, LabelPair, Metric, MetricFamily, MetricType};
use tokio_postgres::error::SqlState;
use tokio_postgres::Client;

pub use crate::metrics::{APPENDS_TOTAL, APPEND_DURATION_SECONDS};

pub const COMMAND_TYPE_LABEL: &str = "command_type";
pub const OUTCOME_LABEL: &str = "outcome";

/// `cqrs_appends_total{outcome}`, the columns of `cqrs.stats()` of the same names.
pub mod outcome {
    pub const ACCEPTED: &str = "accepted";
    pub const DUPLICATE: &str = "duplicate";
    pub const EXPECTED_SEQ_CONFLICT: &str = "expected_seq_conflict";
    pub const INVALID: &str = "invalid";
    pub const ERROR: &str = "error";
    pub const ALL: [&str; 5] = [ACCEPTED, DUPLICATE, EXPECTED_SEQ_CONFLICT, INVALID, ERROR];
}

/// One command type's figures at the last poll.
#[derive(Debug, Clone, Default, PartialEq)]
struct TypeFigures {
    command_type: String,
    outcomes: [u64; 5],
    total_seconds: f64,
    /// cumulative (upper bound, calls); the last bound is +Inf
    buckets: Vec<(f64, u64)>,
}

/// Why the database has no figures to give.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Unavailable {
    NotPreloaded,
    PortableEdition,
    OlderRelease,
}

impl Unavailable {
    fn of(err: &tokio_postgres::Error) -> Option<Self> {
        match err.code() {
            Some(code) if *code == SqlState::OBJECT_NOT_IN_PREREQUISITE_STATE => Some(Self::NotPreloaded),
            Some(code) if *code == SqlState::FEATURE_NOT_SUPPORTED => Some(Self::PortableEdition),
            Some(code) if *code == SqlState::UNDEFINED_FUNCTION => Some(Self::OlderRelease),
            _ => None,
        }
    }

    fn explain(self) -> &'static str {
        match self {
            Self::NotPreloaded => "pg_cqrs is not in shared_preload_libraries: appends are not counted (add it and restart PostgreSQL)",
            Self::PortableEdition => "the portable edition cannot count appends; cqrs_commands_total counts the committed ones from the slot",
            Self::OlderRelease => "this pg_cqrs has no cqrs.stats() (before 0.3.0)",
        }
    }
}

#[derive(Default)]
struct State {
    figures: Vec<TypeFigures>,
    /// what was said about the figures being unavailable (said again only when it changes)
    said: Option<Unavailable>,
}

/// The collector; [`AppendStats::poll`] refreshes it.
pub struct AppendStats {
    appends: Desc,
    duration: Desc,
    state: Mutex<State>,
}

impl AppendStats {
    pub fn new() -> Result<Self, prometheus::Error> {
        Ok(Self {
            appends: Desc::new(
                APPENDS_TOTAL.to_owned(),
                "Calls of cqrs.append by command type and what they answered (accepted, duplicate, expected_seq_conflict, invalid, error), counted by the database since it started (cqrs.stats()).".to_owned(),
                vec![COMMAND_TYPE_LABEL.to_owned(), OUTCOME_LABEL.to_owned()],
                Default::default(),
            )?,
            duration: Desc::new(
                APPEND_DURATION_SECONDS.to_owned(),
                "Time cqrs.append took inside the database, by command type (cqrs.append_latency()).".to_owned(),
                vec![COMMAND_TYPE_LABEL.to_owned()],
                Default::default(),
            )?,
            state: Mutex::new(State::default()),
        })
    }

    /// Reads the database's figures; an error that means "not available here" is said once
    /// and is not an error of the poll.
    pub async fn poll(&self, pg: &Client) -> Result<(), tokio_postgres::Error> {
        match read(pg).await {
            Ok(figures) => {
                if let Ok(mut state) = self.state.lock() {
                    state.figures = figures;
                    state.said = None;
                }
                Ok(())
            }
            Err(err) => match Unavailable::of(&err) {
                Some(why) => {
                    if let Ok(mut state) = self.state.lock() {
                        state.figures.clear();
                        if state.said != Some(why) {
                            tracing::info!("{}", why.explain());
                            state.said = Some(why);
                        }
                    }
                    Ok(())
                }
                None => Err(err),
            },
        }
    }
}

async fn read(pg: &Client) -> Result<Vec<TypeFigures>, tokio_postgres::Error> {
    let mut figures: Vec<TypeFigures> = pg
        .query(
            "select command_type, accepted, duplicate, expected_seq_conflict, invalid, error, total_seconds
               from cqrs.stats()",
            &[],
        )
        .await?
        .iter()
        .map(|row| TypeFigures {
            command_type: row.get(0),
            outcomes: [1, 2, 3, 4, 5].map(|i| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0)),
            total_seconds: row.get(6),
            buckets: Vec::new(),
        })
        .collect();
    for row in pg
        .query("select command_type, le, calls from cqrs.append_latency()", &[])
        .await?
    {
        let command_type: String = row.get(0);
        if let Some(f) = figures.iter_mut().find(|f| f.command_type == command_type) {
            f.buckets
                .push((row.get(1), u64::try_from(row.get::<_, i64>(2)).unwrap_or(0)));
        }
    }
    Ok(figures)
}

fn label(name: &str, value: &str) -> LabelPair {
    let mut pair = LabelPair::default();
    pair.set_name(name.to_owned());
    pair.set_value(value.to_owned());
    pair
}

impl Collector for AppendStats {
    fn desc(&self) -> Vec<&Desc> {
        vec![&self.appends, &self.duration]
    }

    fn collect(&self) -> Vec<MetricFamily> {
        let Ok(state) = self.state.lock() else {
            return Vec::new();
        };
        if state.figures.is_empty() {
            return Vec::new();
        }
        let mut appends = MetricFamily::default();
        appends.set_name(APPENDS_TOTAL.to_owned());
        appends.set_help(self.appends.help.clone());
        appends.set_field_type(MetricType::COUNTER);
        let mut duration = MetricFamily::default();
        duration.set_name(APPEND_DURATION_SECONDS.to_owned());
        duration.set_help(self.duration.help.clone());
        duration.set_field_type(MetricType::HISTOGRAM);
        for f in &state.figures {
            for (outcome, count) in outcome::ALL.iter().zip(f.outcomes) {
                let mut counter = Counter::default();
                counter.set_value(count as f64);
                let mut metric = Metric::default();
                metric.set_label(vec![
                    label(COMMAND_TYPE_LABEL, &f.command_type),
                    label(OUTCOME_LABEL, outcome),
                ]);
                metric.set_counter(counter);
                appends.mut_metric().push(metric);
            }
            let mut histogram = Histogram::default();
            // the +Inf bucket is implied by the sample count
            histogram.set_bucket(
                f.buckets
                    .iter()
                    .filter(|(le, _)| le.is_finite())
                    .map(|&(le, count)| {
                        let mut bucket = Bucket::default();
                        bucket.set_upper_bound(le);
                        bucket.set_cumulative_count(count);
                        bucket
                    })
                    .collect(),
            );
            histogram.set_sample_count(f.outcomes.iter().sum());
            histogram.set_sample_sum(f.total_seconds);
            let mut metric = Metric::default();
            metric.set_label(vec![label(COMMAND_TYPE_LABEL, &f.command_type)]);
            metric.set_histogram(histogram);
            duration.mut_metric().push(metric);
        }
        vec![appends, duration]
    }
}

/// The collector as the registry holds it, shared with the poller.
pub struct Registered(pub std::sync::Arc<AppendStats>);

impl Collector for Registered {
    fn desc(&self) -> Vec<&Desc> {
        self.0.desc()
    }

    fn collect(&self) -> Vec<MetricFamily> {
        self.0.collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use prometheus::{Encoder, Registry, TextEncoder};

    #[test]
    fn the_figures_read_as_a_counter_and_a_histogram() {
        let stats = AppendStats::new().unwrap();
        stats.state.lock().unwrap().figures = vec![TypeFigures {
            command_type: "CREATE_ORDER".into(),
            outcomes: [7, 2, 1, 3, 0],
            total_seconds: 0.5,
            buckets: vec![(0.0001, 4), (0.001, 12), (f64::INFINITY, 13)],
        }];
        let registry = Registry::new();
        registry.register(Box::new(stats)).unwrap();
        let mut text = Vec::new();
        TextEncoder::new().encode(&registry.gather(), &mut text).unwrap();
        let text = String::from_utf8(text).unwrap();
        for line in [
            "# TYPE cqrs_appends_total counter",
            r#"cqrs_appends_total{command_type="CREATE_ORDER",outcome="accepted"} 7"#,
            r#"cqrs_appends_total{command_type="CREATE_ORDER",outcome="expected_seq_conflict"} 1"#,
            r#"cqrs_appends_total{command_type="CREATE_ORDER",outcome="error"} 0"#,
            "# TYPE cqrs_append_duration_seconds histogram",
            r#"cqrs_append_duration_seconds_bucket{command_type="CREATE_ORDER",le="0.001"} 12"#,
            r#"cqrs_append_duration_seconds_bucket{command_type="CREATE_ORDER",le="+Inf"} 13"#,
            r#"cqrs_append_duration_seconds_count{command_type="CREATE_ORDER"} 13"#,
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
    }
}
