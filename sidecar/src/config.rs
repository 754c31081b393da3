//! Command-line flags, each with a `CQRS_*` environment fallback and, where one exists, a sane
//! default.

use std::net::SocketAddr;
use std::time::Duration;

use clap::Parser;
use cqrs_projection::name;

fn parse_duration(text: &str) -> Result<Duration, String> {
    let text = text.trim();
    let (number, unit) = text
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map(|at| text.split_at(at))
        .unwrap_or((text, "ms"));
    let value: f64 = number
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (e.g. 250ms, 5s, 1m)"))?;
    let seconds = match unit.trim() {
        "ms" => value / 1000.0,
        "s" => value,
        "m" | "min" => value * 60.0,
        "h" => value * 3600.0,
        other => return Err(format!("unknown unit {other:?} in {text:?} (ms, s, m, h)")),
    };
    if !seconds.is_finite() || seconds < 0.0 {
        return Err(format!("{text:?} is not a valid duration"));
    }
    Ok(Duration::from_secs_f64(seconds))
}

/// A connection URL that may hold a password: printed (`Debug`, logs) without it, and `--help`
/// does not show the value it was given in the environment.
#[derive(Clone, PartialEq, Eq)]
pub struct SecretUrl(String);

impl SecretUrl {
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***` (`user:pw@host`, `password=…`).
    pub fn redacted(&self) -> String {
        let mut out = self.0.clone();
        if let Some(scheme_end) = out.find("://") {
            let rest_start = scheme_end + 3;
            let authority_end = out[rest_start..]
                .find(['/', '?', '#'])
                .map_or(out.len(), |at| rest_start + at);
            if let Some(at) = out[rest_start..authority_end].rfind('@') {
                let userinfo = &out[rest_start..rest_start + at];
                if let Some(colon) = userinfo.find(':') {
                    out.replace_range(rest_start + colon + 1..rest_start + at, "***");
                }
            }
        }
        let mut redacted = String::with_capacity(out.len());
        let mut rest = out.as_str();
        while let Some(at) = rest.find("password=") {
            let (before, after) = rest.split_at(at + "password=".len());
            redacted.push_str(before);
            redacted.push_str("***");
            rest = &after[after.find(['&', ' ']).unwrap_or(after.len())..];
        }
        redacted.push_str(rest);
        redacted
    }
}

impl std::str::FromStr for SecretUrl {
    type Err = std::convert::Infallible;
    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Ok(Self(text.to_owned()))
    }
}

impl std::fmt::Debug for SecretUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// What else the binary does besides running the sidecar.
#[derive(clap::Subcommand, Debug, Clone)]
pub enum Command {
    /// GET a URL of the admin port and exit 0 on a 200 (a container healthcheck without curl):
    /// `cqrs-sidecar probe http://127.0.0.1:9188/readyz`.
    Probe {
        url: String,
        /// How long to wait for the answer.
        #[arg(long, default_value = "2s", value_parser = parse_duration)]
        timeout: Duration,
    },
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "cqrs-sidecar",
    version,
    about = "Streams the pg_cqrs command log from a logical replication slot into projections and Redis",
    long_about = "Streams the pg_cqrs command log from a logical replication slot (pgoutput), applies it to \
                  every projection with cqrs.project_batch in adaptive batches, and keeps a Redis cache of the \
                  read models in step. Run two or more: one leads (the projector lease, cqrs.try_lead), the \
                  others stand by and take over when it dies."
)]
pub struct Config {
    #[command(subcommand)]
    pub command: Option<Command>,

    /// PostgreSQL URL of the database where `CREATE EXTENSION pg_cqrs` ran. The role needs the
    /// REPLICATION attribute (or rds_replication) and membership in cqrs_projector. TLS as in
    /// libpq: `?sslmode=disable|prefer|require|verify-ca|verify-full&sslrootcert=<CA file>|system`
    /// (default prefer), for every connection including the replication stream.
    #[arg(
        long,
        env = "CQRS_DATABASE_URL",
        hide_env_values = true,
        default_value = "postgres://postgres@127.0.0.1:5432/postgres"
    )]
    pub database_url: SecretUrl,

    /// File holding the database password (a container secret such as
    /// /run/secrets/db_password), for a --database-url without one; a trailing newline is not
    /// part of the password. The same TLS rules apply as to a password in the URL.
    #[arg(long, env = "CQRS_DATABASE_PASSWORD_FILE")]
    pub database_password_file: Option<std::path::PathBuf>,

    /// Logical replication slot (pgoutput) to stream from; created when missing.
    #[arg(long, env = "CQRS_SLOT", default_value = "cqrs_sidecar")]
    pub slot: String,

    /// The projection group this sidecar projects (cqrs.move_projection assigns projections to
    /// groups): the sidecars of one group elect one leader (the group's lease), and groups
    /// project in parallel, each from its own slot — the --slot name, with `_<group>` appended
    /// for any group but `default`. 1 to 40 characters of a-z 0-9 _, starting with a letter.
    #[arg(long, env = "CQRS_PROJECTION_GROUP", default_value = name::group::DEFAULT, value_parser = parse_group)]
    pub projection_group: String,

    /// An outbox sink: the command log delivered to a broker. `NAME=nats://host:4222/?…` (NATS
    /// JetStream; options `subject` (template, `{type}` the command type; default
    /// cqrs.events.{type}), `stream` (the JetStream stream, created when missing; default
    /// CQRS_EVENTS)) or `NAME=kafka://host:9092,host2:9092/?…` (options `topic` (template;
    /// default cqrs.events), `partitions` (of a topic created when missing; default 6),
    /// `transactional`); both take `types` (comma-separated command types; default all) and
    /// `stream_prefix`. Repeatable; in the environment, separated by spaces. Delivered by the
    /// leader of this sidecar's projection group, in stream order, each event once per command id.
    #[arg(long = "sink", env = "CQRS_SINKS", value_delimiter = ' ', value_parser = crate::outbox::spec::parse)]
    pub sinks: Vec<crate::outbox::spec::SinkSpec>,

    /// Longest a sink that is behind waits for the projections of its group, while they are
    /// catching up on the slot (more than 2 s behind its commits), before it catches up from
    /// the log itself; 0 never waits. Read models come first where the cores are few: a sink
    /// catching up beside them reads the log again and takes the cores they need.
    #[arg(long, env = "CQRS_SINK_YIELD", default_value = "5m", value_parser = parse_duration)]
    pub sink_yield: Duration,

    /// Publication on cqrs.command_log; created when missing.
    #[arg(long, env = "CQRS_PUBLICATION", default_value = "cqrs_command_log")]
    pub publication: String,

    /// Redis URL for the read-model cache: redis:// or rediss:// (TLS, the server verified
    /// against the built-in roots or --redis-ca-file; `rediss://host/#insecure` skips the
    /// verification). Redis being down at start is a warning, not a failure: projecting goes on
    /// and the cache is repaired when it returns.
    #[arg(
        long,
        env = "CQRS_REDIS_URL",
        hide_env_values = true,
        default_value = "redis://127.0.0.1:6379/"
    )]
    pub redis_url: SecretUrl,

    /// A Redis Cluster for the cache instead of one server: comma-separated seed nodes
    /// (`host:port`; the rest of the cluster is found from them). Each seed takes the scheme
    /// (redis:// or rediss://), the user and password and `#insecure` of --redis-url; a seed may
    /// also be a whole URL.
    #[arg(long, env = "CQRS_REDIS_CLUSTER_NODES")]
    pub redis_cluster_nodes: Option<String>,

    /// PEM file of the CA certificates a rediss:// server is verified against.
    #[arg(long, env = "CQRS_REDIS_CA_FILE")]
    pub redis_ca_file: Option<std::path::PathBuf>,

    /// Prefix of cache keys: `{prefix}:{projection}:{key}`.
    #[arg(long, env = "CQRS_REDIS_PREFIX", default_value = "cqrs")]
    pub redis_prefix: String,

    /// Time to live of cached rows (randomly shortened by up to 10% so entries do not expire
    /// together).
    #[arg(long, env = "CQRS_CACHE_TTL", default_value = "1h", value_parser = parse_duration)]
    pub cache_ttl: Duration,

    /// How long the marker of a deleted row stays in the cache (it stops a slow reader from
    /// bringing the row back).
    #[arg(long, env = "CQRS_TOMBSTONE_TTL", default_value = "60s", value_parser = parse_duration)]
    pub tombstone_ttl: Duration,

    /// Largest batch, in events.
    #[arg(long, env = "CQRS_BATCH_MAX_EVENTS", default_value_t = 5000)]
    pub batch_max_events: usize,

    /// Smallest batch the adaptive sizing shrinks to, in events.
    #[arg(long, env = "CQRS_BATCH_MIN_EVENTS", default_value_t = 50)]
    pub batch_min_events: usize,

    /// Largest batch, in bytes of event JSON.
    #[arg(long, env = "CQRS_BATCH_MAX_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub batch_max_bytes: usize,

    /// Longest an event waits for its batch to fill. Under load batches also grow while the
    /// previous one is being flushed, so a short wait costs little.
    #[arg(long, env = "CQRS_BATCH_MAX_WAIT", default_value = "10ms", value_parser = parse_duration)]
    pub batch_max_wait: Duration,

    /// A flush slower than this shrinks the next batch; faster ones grow it.
    #[arg(long, env = "CQRS_BATCH_TARGET_LATENCY", default_value = "250ms", value_parser = parse_duration)]
    pub batch_target_latency: Duration,

    /// Events decoded but not yet projected before the sidecar stops reading the stream
    /// (bounds memory when PostgreSQL is slow).
    #[arg(long, env = "CQRS_MAX_PENDING_EVENTS", default_value_t = 20000)]
    pub max_pending_events: usize,

    /// Cache keys remembered for repair while Redis is unreachable; past this, the projection's
    /// whole prefix is refreshed instead.
    #[arg(long, env = "CQRS_MAX_REPAIR_KEYS", default_value_t = 100_000)]
    pub max_repair_keys: usize,

    /// Time to live of "no such row" entries cached by the read API (the projector replaces
    /// one at once when it writes the key).
    #[arg(long, env = "CQRS_NEGATIVE_TTL", default_value = "2s", value_parser = parse_duration)]
    pub negative_ttl: Duration,

    /// PostgreSQL connections of the read API's cache misses (read-your-writes waits use one
    /// connection of their own, whatever their number).
    #[arg(long, env = "CQRS_READ_POOL_SIZE", default_value_t = 8)]
    pub read_pool_size: usize,

    /// Streaming replicas of the database (comma-separated PostgreSQL URLs, the same rules as
    /// --database-url; --database-password-file serves a URL without a password) that answer
    /// the read API's cache misses when they have replayed far enough: a read-your-writes read
    /// (`?after=`) waits for nothing more than the awaited write, any other for at most
    /// --read-replica-max-staleness. The primary answers when none qualifies. Each gets a pool of
    /// --read-pool-size connections.
    #[arg(
        long,
        env = "CQRS_READ_REPLICA_URLS",
        hide_env_values = true,
        value_delimiter = ','
    )]
    pub read_replica_urls: Vec<SecretUrl>,

    /// How far behind the primary a replica may be to answer a cache miss that is not a
    /// read-your-writes read.
    #[arg(long, env = "CQRS_READ_REPLICA_MAX_STALENESS", default_value = "1s", value_parser = parse_duration)]
    pub read_replica_max_staleness: Duration,

    /// Deadline of a Redis call on the read path; past it the read goes to PostgreSQL.
    #[arg(long, env = "CQRS_READ_REDIS_TIMEOUT", default_value = "250ms", value_parser = parse_duration)]
    pub read_redis_timeout: Duration,

    /// Deadline of a PostgreSQL call on the read path; past it the read answers 503.
    #[arg(long, env = "CQRS_READ_PG_TIMEOUT", default_value = "2s", value_parser = parse_duration)]
    pub read_pg_timeout: Duration,

    /// How long a read that misses the cache may wait for a PostgreSQL connection of the read
    /// pool before it answers 503 (misses are limited apart, so cache hits never wait behind them).
    #[arg(long, env = "CQRS_READ_PG_QUEUE_TIMEOUT", default_value = "100ms", value_parser = parse_duration)]
    pub read_pg_queue_timeout: Duration,

    /// Address of the read API (/v1/projections/…), the only thing on it.
    #[arg(long, env = "CQRS_HTTP_ADDR", default_value = "0.0.0.0:9187")]
    pub http_addr: SocketAddr,

    /// Address of /metrics, /healthz and /readyz (keep it off the public network).
    #[arg(long, env = "CQRS_ADMIN_ADDR", default_value = "127.0.0.1:9188")]
    pub admin_addr: SocketAddr,

    /// The projections the read API serves: names separated by commas, each optionally with a
    /// row rule `name:column=claim` (a JWT caller reads only rows whose column equals its claim),
    /// or `*` for all (development). Nothing is served when empty.
    #[arg(long, env = "CQRS_EXPOSE", default_value = "")]
    pub expose: String,

    /// How read API callers authenticate: `keys`, `jwt` or `keys,jwt`; `none` serves anyone
    /// (logged as a warning). Required when --expose names anything.
    #[arg(long, env = "CQRS_READ_AUTH")]
    pub read_auth: Option<String>,

    /// API keys file: `<name> sha256:<hex of the key's SHA-256> <projections>` per line; read
    /// again when it changes or on SIGHUP.
    #[arg(long, env = "CQRS_READ_KEYS_FILE")]
    pub read_keys_file: Option<std::path::PathBuf>,

    /// File holding the HS256 secret of JWTs.
    #[arg(long, env = "CQRS_JWT_HS256_SECRET_FILE")]
    pub jwt_hs256_secret_file: Option<std::path::PathBuf>,

    /// JWKS file with the RS256 / ES256 public keys of JWTs.
    #[arg(long, env = "CQRS_JWT_JWKS_FILE")]
    pub jwt_jwks_file: Option<std::path::PathBuf>,

    /// Required `iss` of JWTs.
    #[arg(long, env = "CQRS_JWT_ISSUER")]
    pub jwt_issuer: Option<String>,

    /// Required `aud` of JWTs.
    #[arg(long, env = "CQRS_JWT_AUDIENCE")]
    pub jwt_audience: Option<String>,

    /// The JWT claim listing the projections a token may read (`"*"` or an array of names).
    #[arg(long, env = "CQRS_JWT_PROJECTIONS_CLAIM", default_value = "cqrs_projections")]
    pub jwt_projections_claim: String,

    /// PEM certificate chain of the read API: serve it over TLS (reloaded when the file changes).
    #[arg(long, env = "CQRS_READ_TLS_CERT", requires = "read_tls_key")]
    pub read_tls_cert: Option<std::path::PathBuf>,

    /// PEM private key of the read API's certificate.
    #[arg(long, env = "CQRS_READ_TLS_KEY", requires = "read_tls_cert")]
    pub read_tls_key: Option<std::path::PathBuf>,

    /// Connections to the read API open at once at most (HTTP/1.1 keep-alive and HTTP/2 both);
    /// past it a new connection is answered 503 with Retry-After before any HTTP is parsed
    /// (over TLS: closed), which keeps the CPU for the admitted requests under overload.
    #[arg(long, env = "CQRS_READ_MAX_CONNECTIONS", default_value_t = 512, value_parser = clap::value_parser!(u32).range(1..))]
    pub read_max_connections: u32,

    /// Read requests in flight at most; past it requests wait at most --read-queue-timeout.
    #[arg(long, env = "CQRS_READ_MAX_CONCURRENCY", default_value_t = 256)]
    pub read_max_concurrency: usize,

    /// How long a read request may wait to start before it is shed with 503 and Retry-After.
    #[arg(long, env = "CQRS_READ_QUEUE_TIMEOUT", default_value = "20ms", value_parser = parse_duration)]
    pub read_queue_timeout: Duration,

    /// How often pending read-your-writes waits (`?after=`) look whether their commands are
    /// applied (one query for all of them, only while some are pending).
    #[arg(long, env = "CQRS_READ_WAIT_POLL", default_value = "2ms", value_parser = parse_duration)]
    pub read_wait_poll: Duration,

    /// Read-your-writes waits held at once; past it a wait answers 503 at once.
    #[arg(long, env = "CQRS_READ_MAX_WAITS", default_value_t = 1024)]
    pub read_max_waits: usize,

    /// Read-your-writes waits one caller (API key, or token subject) holds at once; past it a
    /// wait answers 429 at once.
    #[arg(long, env = "CQRS_READ_MAX_WAITS_PER_CALLER", default_value_t = 32)]
    pub read_max_waits_per_caller: usize,

    /// How often cqrs.progress() and the slot are polled for metrics.
    #[arg(long, env = "CQRS_STATUS_INTERVAL", default_value = "5s", value_parser = parse_duration)]
    pub status_interval: Duration,

    /// How often cqrs.maintain() runs: it makes the command log's partitions ahead and removes
    /// those older than cqrs.retention.keep (README, Retention); 0 never (then run it yourself,
    /// e.g. from pg_cron, at least daily).
    #[arg(long, env = "CQRS_MAINTAIN_INTERVAL", default_value = "1h", value_parser = parse_duration)]
    pub maintain_interval: Duration,

    /// Where traces go: a collector's OTLP/HTTP base URL (e.g. http://otel-collector:4318; the
    /// traces are sent to its /v1/traces). Off unless this or OTEL_EXPORTER_OTLP_ENDPOINT /
    /// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set (README, Observability).
    #[arg(long, env = "CQRS_OTLP_ENDPOINT")]
    pub otlp_endpoint: Option<String>,

    /// Share (0 to 1) of the sidecar's own traces sampled: batches without a traced command and
    /// reads without a traceparent; a command's or request's own sampling decision is followed.
    /// Unset: OTEL_TRACES_SAMPLER / OTEL_TRACES_SAMPLER_ARG (default parentbased_always_on).
    #[arg(long, env = "CQRS_TRACE_SAMPLE_RATIO", value_parser = parse_ratio)]
    pub trace_sample_ratio: Option<f64>,

    /// Log format: text or json.
    #[arg(long, env = "CQRS_LOG_FORMAT", default_value = "text", value_parser = ["text", "json"])]
    pub log_format: String,

    /// Threads of the async runtime that runs everything (streaming, projection, the cache, both
    /// HTTP servers). Two by default; one where the sidecar is given a fraction of a core (a
    /// container CPU limit below 1): two threads time-sharing one quota spend it switching
    /// between each other.
    #[arg(long, env = "CQRS_WORKER_THREADS", default_value_t = 2, value_parser = clap::value_parser!(u16).range(1..=256))]
    pub worker_threads: u16,

    /// Log filter (tracing's EnvFilter syntax), e.g. info or cqrs_sidecar=debug. The Redis
    /// client's own messages are kept to errors by default: during a cluster failover it warns
    /// on every reconnection attempt, while the sidecar says once what happened.
    #[arg(long, env = "CQRS_LOG", default_value = "info,redis=error")]
    pub log: String,
}

fn parse_ratio(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(ratio) if (0.0..=1.0).contains(&ratio) => Ok(ratio),
        _ => Err(format!(
            "{text:?} is not a share between 0 and 1 (e.g. 0.01 for 1 %)"
        )),
    }
}

fn parse_group(text: &str) -> Result<String, String> {
    if name::group::is_valid(text) {
        Ok(text.to_owned())
    } else {
        Err(format!(
            "{text:?} cannot name a projection group: {}",
            name::group::RULE
        ))
    }
}

/// PostgreSQL's longest replication slot name, in bytes.
const MAX_SLOT_BYTES: usize = 63;

impl Config {
    /// The slot this sidecar streams: --slot for the default group, `<slot>_<group>` for any
    /// other (each group decodes the log from its own slot); an error when that is no slot name.
    pub fn group_slot(&self) -> Result<String, String> {
        let slot = if self.projection_group == name::group::DEFAULT {
            self.slot.clone()
        } else {
            format!("{}_{}", self.slot, self.projection_group)
        };
        let valid = !slot.is_empty()
            && slot.len() <= MAX_SLOT_BYTES
            && slot
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_');
        if valid {
            Ok(slot)
        } else {
            Err(format!(
                "{slot:?} is not a replication slot name (at most {MAX_SLOT_BYTES} characters of a-z 0-9 _): shorten --slot or --projection-group"
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_group_streams_its_own_slot() {
        let parse = |args: &[&str]| {
            Config::try_parse_from(
                ["cqrs-sidecar", "--database-url", "postgres://db/x"]
                    .iter()
                    .chain(args),
            )
        };
        let config = parse(&[]).expect("the defaults");
        assert_eq!(config.projection_group, "default");
        assert_eq!(config.group_slot().as_deref(), Ok("cqrs_sidecar"));
        let config = parse(&["--projection-group", "billing"]).expect("a group");
        assert_eq!(config.group_slot().as_deref(), Ok("cqrs_sidecar_billing"));
        let config = parse(&["--projection-group", "billing", "--slot", &"s".repeat(60)]).expect("a group");
        assert!(config.group_slot().is_err());
        assert!(parse(&["--projection-group", "Billing"]).is_err());
        assert!(parse(&["--projection-group", ""]).is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("5s"), Ok(Duration::from_secs(5)));
        assert_eq!(parse_duration("1m"), Ok(Duration::from_secs(60)));
        assert_eq!(parse_duration("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse_duration("20"), Ok(Duration::from_millis(20)));
        assert!(parse_duration("soon").is_err());
        assert!(parse_duration("5 parsecs").is_err());
    }

    #[test]
    fn passwords_never_print() {
        let url: SecretUrl = "postgres://app:s3cret@db:5432/shop?sslmode=require"
            .parse()
            .expect("a url");
        assert_eq!(url.redacted(), "postgres://app:***@db:5432/shop?sslmode=require");
        let key_value: SecretUrl = "host=db user=app password=s3cret dbname=x".parse().expect("text");
        assert_eq!(key_value.redacted(), "host=db user=app password=*** dbname=x");
        let redis: SecretUrl = "rediss://:s3cret@cache:6380/0".parse().expect("a url");
        assert_eq!(redis.redacted(), "rediss://:***@cache:6380/0");
        let query: SecretUrl = "postgres://db/x?password=s3cret&sslmode=disable"
            .parse()
            .expect("a url");
        assert_eq!(query.redacted(), "postgres://db/x?password=***&sslmode=disable");

        let config = Config::parse_from([
            "cqrs-sidecar",
            "--database-url",
            "postgres://app:s3cret@db/shop",
            "--redis-url",
            "redis://:s3cret@cache/",
        ]);
        let printed = format!("{config:?}");
        assert!(!printed.contains("s3cret"), "{printed}");
        assert!(printed.contains("postgres://app:***@db/shop"), "{printed}");
    }

    #[test]
    fn help_does_not_show_secret_environment_values() {
        use clap::CommandFactory;
        for id in ["database_url", "redis_url"] {
            let command = Config::command();
            let arg = command
                .get_arguments()
                .find(|a| a.get_id().as_str() == id)
                .expect("the argument");
            assert!(
                arg.is_hide_env_values_set(),
                "--{id} shows its environment value in --help"
            );
        }
    }

    #[test]
    fn every_flag_has_an_environment_fallback() {
        use clap::CommandFactory;
        for arg in Config::command().get_arguments() {
            let id = arg.get_id().as_str();
            if id == "help" || id == "version" {
                continue;
            }
            let env = arg.get_env().and_then(|e| e.to_str()).unwrap_or_default();
            assert!(
                env.starts_with("CQRS_"),
                "--{id} has no CQRS_* environment fallback"
            );
        }
    }
}
