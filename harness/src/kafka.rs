//! A private Kafka-protocol broker — tansu (`scripts/kafka-broker.sh` installs it; Apache Kafka
//! needs a JVM and a Maven repository this project cannot reach) on a free loopback port, its
//! log in an SQLite file of its own (so a restart keeps the topics), killed when dropped; and
//! what a consumer reads back from it.

use std::collections::HashMap;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Headers, Message};

use crate::outbox_check::Received;
use crate::postgres::free_port;
use crate::process::{wait_for_port, ChildGuard};

/// The broker program: `$TANSU`, else `tansu` on the PATH, else cargo's bin directory.
fn program() -> PathBuf {
    if let Some(path) = std::env::var_os("TANSU") {
        return PathBuf::from(path);
    }
    let cargo_bin = std::env::var_os("CARGO_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cargo")))
        .map(|home| home.join("bin").join("tansu"));
    match cargo_bin {
        Some(path) if path.exists() => path,
        _ => PathBuf::from("tansu"),
    }
}

pub struct KafkaBroker {
    port: u16,
    dir: PathBuf,
    child: Option<ChildGuard>,
}

impl KafkaBroker {
    pub fn start() -> Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("pg_cqrs-kafka-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut broker = Self {
            port,
            dir,
            child: None,
        };
        broker.restart()?;
        broker.index_headers()?;
        Ok(broker)
    }

    /// tansu 0.6.0's SQLite schema has no index on its header table, and a fetch looks up each
    /// record's headers: every message carries five, so reading 50,000 messages back scans the
    /// table 50,000 times (17 ms a record measured here; a consumer's fetch times out). The
    /// index tansu lacks, added to its database once it made its tables (they are
    /// `create … if not exists`, so it stays across restarts); the sidecar is untouched.
    fn index_headers(&self) -> Result<()> {
        let out = Command::new("sqlite3")
            .arg(self.dir.join("tansu.db"))
            .arg(".timeout 10000")
            .arg("create index if not exists pg_cqrs_header_by_record on header (topition, offset_id)")
            .output()
            .context("running sqlite3 (apt-get install sqlite3)")?;
        if !out.status.success() {
            bail!(
                "indexing tansu's header table: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        Ok(())
    }

    /// Starts it (again) on the same port and log.
    pub fn restart(&mut self) -> Result<()> {
        let log = std::fs::File::create(self.dir.join("tansu.log"))?;
        let listener = format!("tcp://127.0.0.1:{}", self.port);
        let child = Command::new(program())
            .arg("broker")
            .args(["--listener-url", &listener])
            .args(["--advertised-listener-url", &listener])
            // tansu takes the SQLite path relative to its working directory
            .args(["--storage-engine", "sqlite://tansu.db"])
            .current_dir(&self.dir)
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // its own process group, so that Ctrl-C reaches only the program that started it
            .process_group(0)
            .spawn()
            .context("starting tansu (scripts/kafka-broker.sh installs it)")?;
        self.child = Some(ChildGuard::new("tansu", child));
        wait_for_port("tansu", self.port, Duration::from_secs(20), || self.log())
    }

    /// `host:port`, what `kafka://` and `bootstrap.servers` take.
    pub fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self) -> String {
        format!("kafka://{}", self.bootstrap())
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("tansu.log")).unwrap_or_default()
    }

    /// SIGKILL; [`KafkaBroker::restart`] brings it back with what it had stored.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

impl Drop for KafkaBroker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn uuid_like() -> String {
    use rand::Rng;
    format!("{:032x}", rand::rng().random::<u128>())
}

/// Every message of `topic`, each partition from its beginning, partitions one after another
/// (each in its own order, which is what Kafka orders). Reads until at least `at_least`
/// arrived and nothing more came for two seconds. `read_committed`: what a consumer of a
/// transactional sink should read (no aborted or open transaction's messages).
pub async fn received(
    bootstrap: &str,
    topic: &str,
    read_committed: bool,
    at_least: usize,
) -> Result<Vec<Received>> {
    let (bootstrap, topic) = (bootstrap.to_owned(), topic.to_owned());
    tokio::task::spawn_blocking(move || read_all(&bootstrap, &topic, read_committed, at_least))
        .await
        .context("the reading thread")?
}

fn read_all(bootstrap: &str, topic: &str, read_committed: bool, at_least: usize) -> Result<Vec<Received>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        // a group of its own each time: everything from the beginning
        .set("group.id", format!("pg_cqrs-check-{}", uuid_like()))
        .set("auto.offset.reset", "earliest")
        .set("enable.auto.commit", "false")
        .set(
            "isolation.level",
            if read_committed {
                "read_committed"
            } else {
                "read_uncommitted"
            },
        )
        .create()
        .context("a Kafka consumer")?;
    consumer.subscribe(&[topic]).context("subscribing")?;
    let mut by_partition: HashMap<i32, Vec<Received>> = HashMap::new();
    let (mut count, deadline) = (0usize, Instant::now() + Duration::from_secs(120));
    let mut quiet_since = Instant::now();
    loop {
        match consumer.poll(Duration::from_millis(200)) {
            Some(message) => {
                let message = message.context("reading a message")?;
                let headers = message.headers().context("a message without headers")?;
                let header = |name: &str| -> Result<String> {
                    headers
                        .iter()
                        .find(|h| h.key == name)
                        .and_then(|h| h.value)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                        .with_context(|| format!("a message without {name}"))
                };
                let received = Received {
                    id: header("Cqrs-Command-Id")?,
                    stream: header("Cqrs-Stream")?,
                    seq: header("Cqrs-Seq")?.parse()?,
                    body: message
                        .payload_view::<str>()
                        .transpose()
                        .context("a body that is not UTF-8")?
                        .unwrap_or_default()
                        .to_owned(),
                    traceparent: header("traceparent").ok(),
                    tracestate: header("tracestate").ok(),
                };
                let key = message.key().map(|k| String::from_utf8_lossy(k).into_owned());
                if key.as_deref() != Some(received.stream.as_str()) {
                    bail!("a message keyed {key:?} for stream {}", received.stream);
                }
                by_partition
                    .entry(message.partition())
                    .or_default()
                    .push(received);
                count += 1;
                quiet_since = Instant::now();
            }
            None if count >= at_least && quiet_since.elapsed() > Duration::from_secs(2) => break,
            None if Instant::now() > deadline => {
                bail!("{count} of at least {at_least} messages of {topic} after 120 s")
            }
            None => {}
        }
    }
    let mut partitions: Vec<_> = by_partition.into_iter().collect();
    partitions.sort_by_key(|(p, _)| *p);
    Ok(partitions.into_iter().flat_map(|(_, m)| m).collect())
}
