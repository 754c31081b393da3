//! PostgreSQL connections: regular ones (tokio-postgres) and the replication one
//! (pgwire-replication), both from the one configured URL, and the start-up checks.

use std::time::Duration;
use tokio_postgres::error::SqlState;

use pgwire_replication::ReplicationConfig;
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{TlsError, TlsSettings};

/// The oldest pg_cqrs this sidecar works with: the first whose SQL API and guarantees it relies on
/// throughout (0.3.0: read models read as their owner, batches fenced and checked against the
/// log). Older ones are refused at start, naming the upgrade to run.
pub const OLDEST_SUPPORTED: Version = Version(0, 3, 0);
/// The newest pg_cqrs this sidecar knows: the one it was built with. Newer ones start with a
/// warning (upgrade scripts only add to the SQL API, so a sidecar keeps working while the
/// database is upgraded first and the sidecars after).
pub const NEWEST_KNOWN: Version = Version(0, 3, 0);

/// A `major.minor.patch` version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Version(pub u32, pub u32, pub u32);

impl Version {
    /// `None` unless `text` is `a.b.c` (or `a.b`) with numbers.
    pub fn parse(text: &str) -> Option<Self> {
        let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
        let major = parts.next()??;
        let minor = parts.next()??;
        let patch = parts.next().unwrap_or(Some(0))?;
        if parts.next().is_some() {
            return None;
        }
        Some(Self(major, minor, patch))
    }
}

impl std::fmt::Display for Version {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// Which pg_cqrs a database has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Installed {
    pub version: String,
    /// `extension` (the compiled one) or `portable` (SQL and PL/pgSQL, for managed PostgreSQL).
    pub edition: String,
}

impl Installed {
    /// How to move this install to a newer version.
    fn upgrade_hint(&self) -> &'static str {
        if self.edition == "portable" {
            "run the portable upgrade scripts pg_cqrs--<from>--<to>.sql (scripts/portable.sh writes them) \
             with psql -1 -f, or with pg_tle: alter extension pg_cqrs update"
        } else {
            "alter extension pg_cqrs update"
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartupError {
    #[error("the database URL is not valid: {0}")]
    BadUrl(String),
    #[error("cannot connect to PostgreSQL at {target}: {reason}")]
    Connect { target: String, reason: String },
    #[error("{0}")]
    Tls(#[from] TlsError),
    #[error("PostgreSQL at {target} refused the connection: {reason} (check the user, password, database and sslmode in the database URL, and pg_hba.conf)")]
    Refused { target: String, reason: String },
    #[error("the TLS handshake with PostgreSQL at {target} failed: {reason} (check sslmode and sslrootcert in the database URL)")]
    TlsRefused { target: String, reason: String },
    #[error("wal_level is {0}, not logical: set wal_level = logical and restart PostgreSQL (on RDS: rds.logical_replication = 1)")]
    WalLevel(String),
    #[error("role {0} may not stream replication: alter role {0} replication (on RDS: grant rds_replication to {0})")]
    NoReplication(String),
    #[error("extension pg_cqrs is not installed in database {0}: create extension pg_cqrs")]
    NoExtension(String),
    #[error(
        "pg_cqrs {} ({} edition) is older than this sidecar supports ({OLDEST_SUPPORTED} to {NEWEST_KNOWN}): {}",
        .0.version, .0.edition, .0.upgrade_hint()
    )]
    OldExtension(Installed),
    #[error("role {0} cannot run cqrs.project_batch: grant cqrs_projector to {0}")]
    NoProjector(String),
    #[error(
        "replication slot {slot} belongs to database {owner}, not {database}: slots are the cluster's, so the \
         sidecars of each database need their own (--slot / CQRS_SLOT)"
    )]
    SlotOfAnotherDatabase {
        slot: String,
        owner: String,
        database: String,
    },
    #[error(
        "PostgreSQL at {target} did not authenticate with SCRAM channel binding, which this sidecar requires before \
         it sends a password over a connection whose server certificate it does not verify (an on-path attacker \
         could ask for the password in cleartext): use sslmode=verify-full with sslrootcert, or add \
         channel_binding=disable to the database URL to accept that risk ({reason})"
    )]
    ChannelBinding { target: String, reason: String },
    #[error(
        "the database URL has a password but does not verify the server (sslmode=verify-full or verify-ca with \
         sslrootcert): the replication connection cannot bind its password to TLS (pgwire-replication has no SCRAM \
         channel binding), so an on-path attacker could ask it for the password in cleartext. Use \
         sslmode=verify-full&sslrootcert=<CA file>, a Unix socket, or add channel_binding=disable to accept that risk"
    )]
    ReplicationUnverified,
    #[error("checking PostgreSQL failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl StartupError {
    /// Misconfiguration (fix and restart) rather than something that may pass by itself.
    pub fn is_misconfiguration(&self) -> bool {
        !matches!(self, StartupError::Connect { .. } | StartupError::Query(_))
    }
}

/// What a connection is for, named in its `application_name` so that `pg_stat_activity` and
/// `pg_stat_statements` tell the sidecar's connections apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionPurpose {
    /// the checks at start
    Checks,
    /// the projector lease (renewed every 400 ms)
    Lease,
    /// `cqrs.project_batch` and the slot's bookkeeping, while leading
    Flush,
    /// the replication stream
    Replication,
    /// the read API's pool (cache misses)
    Read,
    /// the read API's read-your-writes waits
    Waits,
    /// the metrics poller
    Status,
    /// the cache repairer
    Repair,
    /// an outbox sink's bookkeeping (its progress, catch-up from the log), while leading
    Sink,
}

impl ConnectionPurpose {
    pub const ALL: [ConnectionPurpose; 9] = [
        ConnectionPurpose::Checks,
        ConnectionPurpose::Lease,
        ConnectionPurpose::Flush,
        ConnectionPurpose::Replication,
        ConnectionPurpose::Read,
        ConnectionPurpose::Waits,
        ConnectionPurpose::Status,
        ConnectionPurpose::Repair,
        ConnectionPurpose::Sink,
    ];

    pub fn application_name(self) -> &'static str {
        match self {
            ConnectionPurpose::Checks => "cqrs-sidecar/checks",
            ConnectionPurpose::Lease => "cqrs-sidecar/lease",
            ConnectionPurpose::Flush => "cqrs-sidecar/flush",
            ConnectionPurpose::Replication => "cqrs-sidecar/replication",
            ConnectionPurpose::Read => "cqrs-sidecar/read",
            ConnectionPurpose::Waits => "cqrs-sidecar/waits",
            ConnectionPurpose::Status => "cqrs-sidecar/status",
            ConnectionPurpose::Repair => "cqrs-sidecar/repair",
            ConnectionPurpose::Sink => "cqrs-sidecar/sink",
        }
    }
}

/// Where and how to reach PostgreSQL: the parsed URL and its TLS settings, for every
/// connection the sidecar opens.
#[derive(Clone)]
pub struct Database {
    pub config: tokio_postgres::Config,
    pub tls: TlsSettings,
    connector: MakeRustlsConnect,
}

/// The password in a file (a container secret), without the trailing newline an editor or
/// `echo` adds.
pub fn read_password_file(path: &std::path::Path) -> Result<String, StartupError> {
    let text = std::fs::read_to_string(path).map_err(|err| {
        StartupError::BadUrl(format!("reading the password file {}: {err}", path.display()))
    })?;
    let password = text.trim_end_matches(['\n', '\r']);
    if password.is_empty() {
        return Err(StartupError::BadUrl(format!(
            "the password file {} is empty",
            path.display()
        )));
    }
    Ok(password.to_owned())
}

impl Database {
    /// The database of `url`, with `password` (from --database-password-file) when the URL has
    /// none.
    pub fn parse(url: &str, password: Option<String>) -> Result<Self, StartupError> {
        let (url, tls) = TlsSettings::split(url)?;
        let mut config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|err| StartupError::BadUrl(err.to_string()))?;
        if let Some(password) = password {
            if config.get_password().is_some() {
                return Err(StartupError::BadUrl(
                    "the URL has a password and --database-password-file gives another: keep one".into(),
                ));
            }
            config.password(password);
        }
        config.ssl_mode(tls.negotiation());
        // Under sslmode=prefer (the default) or an unverified require, an on-path attacker can
        // strip TLS or stand in for the server and ask for the password in cleartext or as md5.
        // Unless the server is verified, send a password only through SCRAM with channel
        // binding, which such an attacker cannot relay. channel_binding in the URL decides
        // otherwise (disable: accept the risk).
        // (a Unix socket has no path to stand on: the rule is for TCP)
        let over_tcp = config.get_hosts().iter().all(|h| matches!(h, Host::Tcp(_)));
        let opted_out = config.get_channel_binding() == tokio_postgres::config::ChannelBinding::Disable
            && url.contains("channel_binding=");
        if config.get_password().is_some()
            && !tls.verifies_server()
            && over_tcp
            && !url.contains("channel_binding=")
        {
            config.channel_binding(tokio_postgres::config::ChannelBinding::Require);
        }
        // The same rule for the replication connection, whose library (pgwire-replication)
        // answers a cleartext or md5 request and cannot bind SCRAM to the channel: a password
        // goes over it only to a verified server, through a Unix socket, or by the operator's
        // explicit channel_binding=disable.
        if config.get_password().is_some() && !tls.verifies_server() && over_tcp && !opted_out {
            return Err(StartupError::ReplicationUnverified);
        }
        let connector = tls.connector()?;
        Ok(Self {
            config,
            tls,
            connector,
        })
    }

    /// The connector every tokio-postgres connection is made with (plain under `disable`).
    pub fn connector(&self) -> MakeRustlsConnect {
        self.connector.clone()
    }

    pub fn dbname(&self) -> &str {
        self.config.get_dbname().unwrap_or("postgres")
    }

    /// `host:port/db`, for messages (never the password).
    pub fn describe(&self) -> String {
        let host = self
            .config
            .get_hosts()
            .first()
            .map(|h| match h {
                Host::Tcp(name) => name.clone(),
                Host::Unix(path) => path.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = self.config.get_ports().first().copied().unwrap_or(5432);
        format!("{host}:{port}/{}", self.dbname())
    }

    /// The settings of a connection for `purpose` (named in its `application_name`).
    pub fn config_for(&self, purpose: ConnectionPurpose) -> tokio_postgres::Config {
        let mut config = self.config.clone();
        config.application_name(purpose.application_name());
        config
    }

    /// A connection for `purpose`, its driver task spawned; gives up after `timeout`.
    pub async fn connect_for(
        &self,
        purpose: ConnectionPurpose,
        timeout: Duration,
    ) -> Result<Client, StartupError> {
        let target = self.describe();
        let config = self.config_for(purpose);
        let connecting = config.connect(self.connector());
        let (client, connection) = tokio::time::timeout(timeout, connecting)
            .await
            .map_err(|_| StartupError::Connect {
                target: target.clone(),
                reason: format!("no answer within {timeout:?}"),
            })?
            .map_err(|err| {
                if let Some(reason) = tls_refusal(&err) {
                    return StartupError::TlsRefused {
                        target: target.clone(),
                        reason,
                    };
                }
                if self.config.get_channel_binding() == tokio_postgres::config::ChannelBinding::Require
                    && err.as_db_error().is_none()
                    && !has_io_cause(&err)
                {
                    // refused by the client before any password left: not a network fault
                    let cause = std::error::Error::source(&err)
                        .map(|c| c.to_string())
                        .unwrap_or_default();
                    return StartupError::ChannelBinding {
                        target: target.clone(),
                        reason: format!("{err}: {cause}"),
                    };
                }
                match err.as_db_error() {
                    // class 28 (pg_hba.conf, password) and an unknown database: waiting won't help
                    Some(db)
                        if db.code().code().starts_with("28")
                            || *db.code() == SqlState::INVALID_CATALOG_NAME =>
                    {
                        StartupError::Refused {
                            target: target.clone(),
                            reason: db.message().to_owned(),
                        }
                    }
                    _ => StartupError::Connect {
                        target: target.clone(),
                        reason: err.to_string(),
                    },
                }
            })?;
        tokio::spawn(async move {
            if let Err(err) = drive(connection, purpose).await {
                tracing::debug!(connection = purpose.application_name(), error = %err, "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }

    /// The replication connection's configuration, from the same URL.
    pub fn replication_config(&self, slot: &str, publication: &str) -> ReplicationConfig {
        let config = &self.config;
        let host = match config.get_hosts().first() {
            Some(Host::Tcp(name)) => name.clone(),
            Some(Host::Unix(path)) => path.display().to_string(),
            None => "localhost".into(),
        };
        let password = config
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        let mut tls = self.tls.replication();
        // pgwire-replication refuses verify-full for an IP literal unless a name is given for
        // it; given the IP itself, rustls checks it against the certificate's IP addresses,
        // which is what libpq does
        if tls.mode == pgwire_replication::SslMode::VerifyFull && host.parse::<std::net::IpAddr>().is_ok() {
            tls.sni_hostname = Some(host.clone());
        }
        ReplicationConfig::new(
            host,
            config.get_user().unwrap_or("postgres"),
            password,
            self.dbname(),
            slot,
            publication,
        )
        .with_port(config.get_ports().first().copied().unwrap_or(5432))
        .with_tls(tls)
        .with_status_interval(Duration::from_secs(1))
        .with_wakeup_interval(Duration::from_secs(1))
        .with_buffer_size(1024)
        .with_application_name(ConnectionPurpose::Replication.application_name())
    }
}

/// Drives a connection until it ends, logging each notice PostgreSQL sends at its own severity
/// (tokio-postgres, left to itself, logs every notice at INFO, a WARNING too). The notices are
/// pg_cqrs's own — a projection halted, a catch-up stopped — and carry no command values: the
/// code of a read model's owner runs with client_min_messages = error, so its messages stay in
/// the server's log.
pub async fn drive<S, T>(
    mut connection: tokio_postgres::Connection<S, T>,
    purpose: ConnectionPurpose,
) -> Result<(), tokio_postgres::Error>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt;
    let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
    while let Some(message) = messages.next().await {
        if let tokio_postgres::AsyncMessage::Notice(notice) = message? {
            log_notice(purpose, &notice);
        }
    }
    Ok(())
}

fn log_notice(purpose: ConnectionPurpose, notice: &tokio_postgres::error::DbError) {
    let (connection, sqlstate, message) =
        (purpose.application_name(), notice.code().code(), notice.message());
    match notice.severity() {
        "WARNING" => tracing::warn!(connection, sqlstate, "PostgreSQL: {message}"),
        "NOTICE" | "INFO" => tracing::info!(connection, sqlstate, "PostgreSQL: {message}"),
        _ => tracing::debug!(connection, sqlstate, "PostgreSQL: {message}"),
    }
}

/// Whether an I/O error (a network fault, which may pass) is among the causes of `err`.
fn has_io_cause(err: &tokio_postgres::Error) -> bool {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = next {
        if current.is::<std::io::Error>() {
            return true;
        }
        next = current.source();
    }
    false
}

/// The TLS handshake's refusal (untrusted or misnamed certificate …), found in the error's
/// chain: a misconfiguration that retrying will not mend. The TLS error sits inside an
/// `io::Error`, whose `source()` skips it, hence `get_ref`.
fn tls_refusal(err: &tokio_postgres::Error) -> Option<String> {
    let mut next: Option<&(dyn std::error::Error + 'static)> = Some(err);
    while let Some(current) = next {
        if let Some(tls) = current.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        if let Some(tls) = current
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
            .and_then(|inner| inner.downcast_ref::<rustls::Error>())
        {
            return Some(tls.to_string());
        }
        next = current.source();
    }
    None
}

/// The pg_cqrs in the database: `cqrs.version()` (0.2.0 on, both editions); before it, the
/// extension's catalog row (a portable install has none). `None` when there is no pg_cqrs.
pub async fn installed(client: &Client) -> Result<Option<Installed>, tokio_postgres::Error> {
    let row = client
        .query_one(
            "select pg_catalog.to_regprocedure('cqrs.version()') is not null,
                    (select e.extversion::text from pg_catalog.pg_extension e where e.extname = 'pg_cqrs')",
            &[],
        )
        .await?;
    let (has_version, extension_version): (bool, Option<String>) = (row.get(0), row.get(1));
    if has_version {
        let row = client
            .query_one("select v.version, v.edition from cqrs.version() v", &[])
            .await?;
        return Ok(Some(Installed {
            version: row.get(0),
            edition: row.get(1),
        }));
    }
    Ok(extension_version.map(|version| Installed {
        version,
        edition: "extension".to_owned(),
    }))
}

/// Which database this is, for the cache's claim on its Redis prefix: the cluster's system
/// identifier, the database's oid and name (`7715…/16384/app`). A managed service that does not
/// let a role call pg_control_system() (42501), or has none (42883), gets the oid and name alone.
pub async fn database_identity(client: &Client) -> Result<String, tokio_postgres::Error> {
    const OF_DATABASE: &str =
        "d.oid::text || '/' || d.datname from pg_catalog.pg_database d where d.datname = current_database()";
    match client
        .query_one(
            &format!("select (select system_identifier::text from pg_catalog.pg_control_system()) || '/' || {OF_DATABASE}"),
            &[],
        )
        .await
    {
        Ok(row) => Ok(row.get(0)),
        Err(err)
            if err.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE)
                || err.code() == Some(&SqlState::UNDEFINED_FUNCTION) =>
        {
            Ok(client.query_one(&format!("select {OF_DATABASE}"), &[]).await?.get(0))
        }
        Err(err) => Err(err),
    }
}

/// Whether this sidecar works with `installed`: `Ok(true)` when it knows the version,
/// `Ok(false)` when it is newer than any it knows (it still starts, with a warning).
pub fn supports(installed: &Installed) -> Result<bool, StartupError> {
    match Version::parse(&installed.version) {
        Some(version) if version < OLDEST_SUPPORTED => Err(StartupError::OldExtension(installed.clone())),
        Some(version) => Ok(version <= NEWEST_KNOWN),
        None => Err(StartupError::OldExtension(installed.clone())),
    }
}

/// Everything that must be right before streaming; each failure says how to fix it. Returns
/// the pg_cqrs it found.
pub async fn check(client: &Client, database: &str, slot: &str) -> Result<Installed, StartupError> {
    let wal_level: String = client.query_one("show wal_level", &[]).await?.get(0);
    if wal_level != "logical" {
        return Err(StartupError::WalLevel(wal_level));
    }
    let row = client
        .query_one(
            "select current_user::text,
                    (select r.rolsuper or r.rolreplication from pg_catalog.pg_roles r where r.rolname = current_user)
                    or (exists (select from pg_catalog.pg_roles where rolname = 'rds_replication')
                        and pg_catalog.pg_has_role(current_user, 'rds_replication', 'member'))",
            &[],
        )
        .await?;
    let (user, may_replicate): (String, bool) = (row.get(0), row.get::<_, Option<bool>>(1).unwrap_or(false));
    if !may_replicate {
        return Err(StartupError::NoReplication(user));
    }
    let Some(installed) = installed(client).await? else {
        return Err(StartupError::NoExtension(database.to_owned()));
    };
    if !supports(&installed)? {
        tracing::warn!(
            version = %installed.version,
            edition = %installed.edition,
            newest_known = %NEWEST_KNOWN,
            "pg_cqrs is newer than this sidecar knows; it should work (upgrades only add), but upgrade the sidecar"
        );
    }
    let may_project: bool = client
        .query_one(
            "select pg_catalog.has_function_privilege('cqrs.project_batch(jsonb, pg_lsn, bigint, text)', 'execute')",
            &[],
        )
        .await?
        .get(0);
    if !may_project {
        return Err(StartupError::NoProjector(user));
    }
    // a slot of another database would be refused by START_REPLICATION at every attempt
    let owner: Option<String> = client
        .query_opt(
            "select s.database::text from pg_catalog.pg_replication_slots s
              where s.slot_name = $1 and s.database is distinct from current_database()",
            &[&slot],
        )
        .await?
        .map(|row| {
            row.get::<_, Option<String>>(0)
                .unwrap_or_else(|| "(none: a physical slot)".to_owned())
        });
    if let Some(owner) = owner {
        return Err(StartupError::SlotOfAnotherDatabase {
            slot: slot.to_owned(),
            owner,
            database: database.to_owned(),
        });
    }
    Ok(installed)
}

/// An error of a PostgreSQL call for a log line: its SQLSTATE, not its message (a message can
/// quote a command's values).
pub fn describe_error(err: &tokio_postgres::Error) -> String {
    match err.as_db_error() {
        Some(db) => format!("SQLSTATE {}", db.code().code()),
        None => err.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert_eq!(Version::parse("0.2.0"), Some(Version(0, 2, 0)));
        assert_eq!(Version::parse("1.0"), Some(Version(1, 0, 0)));
        assert_eq!(Version::parse("0.2.0-beta"), None);
        assert!(Version(0, 1, 9) < Version(0, 2, 0));
        // the newest version this sidecar knows is the one it is built with
        assert_eq!(Version::parse(env!("CARGO_PKG_VERSION")), Some(NEWEST_KNOWN));
    }

    #[test]
    fn older_releases_are_refused_with_the_upgrade_to_run() {
        let installed = |version: &str, edition: &str| Installed {
            version: version.to_owned(),
            edition: edition.to_owned(),
        };
        let err = supports(&installed("0.1.0", "extension")).expect_err("0.1.0 is too old");
        assert_eq!(
            err.to_string(),
            "pg_cqrs 0.1.0 (extension edition) is older than this sidecar supports (0.3.0 to 0.3.0): alter extension pg_cqrs update"
        );
        assert!(err.is_misconfiguration());
        assert!(supports(&installed("0.1.5", "portable"))
            .expect_err("too old")
            .to_string()
            .contains("psql -1 -f"));
        assert!(supports(&installed("0.2.0", "portable")).is_err());
        assert_eq!(supports(&installed("0.3.0", "extension")).ok(), Some(true));
        assert_eq!(supports(&installed("0.4.0", "extension")).ok(), Some(false));
    }

    #[test]
    fn describes_without_the_password() {
        let db = Database::parse(
            "postgres://app:secret@db.example:6543/shop?sslmode=require&channel_binding=disable",
            None,
        )
        .expect("valid");
        assert_eq!(db.describe(), "db.example:6543/shop");
        let replication = db.replication_config("s", "p");
        assert_eq!((replication.port, replication.database.as_str()), (6543, "shop"));
        assert_eq!(replication.tls.mode, pgwire_replication::SslMode::Require);
        assert_eq!(
            replication.application_name.as_deref(),
            Some("cqrs-sidecar/replication")
        );
        assert_eq!(db.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        use tokio_postgres::config::ChannelBinding;
        // a password over an unverified connection: the replication connection cannot bind it
        // to the channel, so it is refused unless the operator accepts the risk
        assert!(matches!(
            Database::parse("postgres://app:secret@db.example/shop?sslmode=require", None),
            Err(StartupError::ReplicationUnverified)
        ));
        assert!(matches!(
            Database::parse("postgres://app:secret@db.example/shop", None),
            Err(StartupError::ReplicationUnverified)
        ));
        assert!(Database::parse("postgres://app:secret@%2Frun%2Fpostgresql/shop", None).is_ok());
        assert!(Database::parse("host=/run/postgresql user=app password=secret dbname=shop", None).is_ok());
        let verified = Database::parse(
            "postgres://app:secret@db/x?sslmode=verify-full&sslrootcert=system",
            None,
        )
        .expect("valid");
        assert_eq!(verified.config.get_channel_binding(), ChannelBinding::Prefer);
        let opted_out = Database::parse(
            "postgres://app:secret@db/x?sslmode=disable&channel_binding=disable",
            None,
        )
        .expect("valid");
        assert_eq!(opted_out.config.get_channel_binding(), ChannelBinding::Disable);
        let no_password = Database::parse("postgres://app@db/x", None).expect("valid");
        assert_eq!(no_password.config.get_channel_binding(), ChannelBinding::Prefer);
        assert!(matches!(
            Database::parse("not a url ://", None),
            Err(StartupError::BadUrl(_))
        ));
        let by_ip = Database::parse(
            "postgres://10.0.0.5/x?sslmode=verify-full&sslrootcert=system",
            None,
        )
        .expect("valid");
        assert_eq!(
            by_ip.replication_config("s", "p").tls.sni_hostname.as_deref(),
            Some("10.0.0.5")
        );
        assert!(matches!(
            Database::parse("postgres://db/x?sslmode=verify-full", None),
            Err(StartupError::Tls(_))
        ));
        // a password from a file is a password: the same rules
        assert!(matches!(
            Database::parse("postgres://app@db.example/shop", Some("secret".into())),
            Err(StartupError::ReplicationUnverified)
        ));
        let from_file = Database::parse("postgres://app@/shop?host=/run/postgresql", Some("secret".into()))
            .expect("valid");
        assert_eq!(from_file.config.get_password(), Some(&b"secret"[..]));
        assert!(matches!(
            Database::parse(
                "postgres://app:one@/shop?host=/run/postgresql",
                Some("two".into())
            ),
            Err(StartupError::BadUrl(_))
        ));
    }

    #[test]
    fn a_password_file_loses_its_trailing_newline_and_must_not_be_empty() {
        let dir = std::env::temp_dir().join(format!("cqrs-password-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("db_password");
        std::fs::write(&file, "s3cret\n").unwrap();
        assert_eq!(read_password_file(&file).unwrap(), "s3cret");
        std::fs::write(&file, "\n").unwrap();
        assert!(read_password_file(&file).is_err());
        assert!(read_password_file(&dir.join("missing")).is_err());
        let _ = std::fs::remove_dir_all(&dir);
    }
}
