//! PostgreSQL connections: regular ones (tokio-postgres) and the replication one
//! (pgwire-replication), both from the one configured URL, and the start-up checks.

use std::time::Duration;

use pgwire_replication::ReplicationConfig;
use tokio_postgres::config::Host;
use tokio_postgres::Client;
use tokio_postgres_rustls::MakeRustlsConnect;

use crate::tls::{TlsError, TlsSettings};

/// The pg_cqrs version this sidecar needs at least.
pub const REQUIRED_EXTENSION_VERSION: (u32, u32, u32) = (0, 1, 0);

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
        "pg_cqrs {found} is older than {required} which this sidecar needs: alter extension pg_cqrs update"
    )]
    OldExtension { found: String, required: String },
    #[error("role {0} cannot run cqrs.project_batch: grant cqrs_projector to {0}")]
    NoProjector(String),
    #[error("checking PostgreSQL failed: {0}")]
    Query(#[from] tokio_postgres::Error),
}

impl StartupError {
    /// Misconfiguration (fix and restart) rather than something that may pass by itself.
    pub fn is_misconfiguration(&self) -> bool {
        !matches!(self, StartupError::Connect { .. } | StartupError::Query(_))
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

impl Database {
    pub fn parse(url: &str) -> Result<Self, StartupError> {
        let (url, tls) = TlsSettings::split(url)?;
        let mut config = url
            .parse::<tokio_postgres::Config>()
            .map_err(|err| StartupError::BadUrl(err.to_string()))?;
        config.ssl_mode(tls.negotiation());
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

    /// A connection, its driver task spawned; gives up after `timeout`.
    pub async fn connect(&self, timeout: Duration) -> Result<Client, StartupError> {
        let target = self.describe();
        let connecting = self.config.connect(self.connector());
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
                match err.as_db_error() {
                    // class 28 (pg_hba.conf, password) and an unknown database: waiting won't help
                    Some(db) if db.code().code().starts_with("28") || db.code().code() == "3D000" => {
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
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "PostgreSQL connection ended");
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
        .with_application_name("cqrs-sidecar")
    }
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

fn version(text: &str) -> (u32, u32, u32) {
    let mut parts = text.split('.').map(|p| p.parse::<u32>().unwrap_or(0));
    (
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
        parts.next().unwrap_or(0),
    )
}

/// Everything that must be right before streaming; each failure says how to fix it.
pub async fn check(client: &Client, database: &str) -> Result<(), StartupError> {
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
    let installed: Option<String> = client
        .query_opt(
            "select extversion from pg_catalog.pg_extension where extname = 'pg_cqrs'",
            &[],
        )
        .await?
        .map(|r| r.get(0));
    let Some(installed) = installed else {
        return Err(StartupError::NoExtension(database.to_owned()));
    };
    if version(&installed) < REQUIRED_EXTENSION_VERSION {
        let (a, b, c) = REQUIRED_EXTENSION_VERSION;
        return Err(StartupError::OldExtension {
            found: installed,
            required: format!("{a}.{b}.{c}"),
        });
    }
    let may_project: bool = client
        .query_one(
            "select pg_catalog.has_function_privilege('cqrs.project_batch(jsonb, pg_lsn, bigint)', 'execute')",
            &[],
        )
        .await?
        .get(0);
    if !may_project {
        return Err(StartupError::NoProjector(user));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare() {
        assert!(version("0.1.0") >= REQUIRED_EXTENSION_VERSION);
        assert!(version("0.0.9") < REQUIRED_EXTENSION_VERSION);
        assert!(version("1.0") > REQUIRED_EXTENSION_VERSION);
    }

    #[test]
    fn describes_without_the_password() {
        let db =
            Database::parse("postgres://app:secret@db.example:6543/shop?sslmode=require").expect("valid");
        assert_eq!(db.describe(), "db.example:6543/shop");
        let replication = db.replication_config("s", "p");
        assert_eq!((replication.port, replication.database.as_str()), (6543, "shop"));
        assert_eq!(replication.tls.mode, pgwire_replication::SslMode::Require);
        assert_eq!(db.config.get_ssl_mode(), tokio_postgres::config::SslMode::Require);
        assert!(matches!(
            Database::parse("not a url ://"),
            Err(StartupError::BadUrl(_))
        ));
        let by_ip =
            Database::parse("postgres://10.0.0.5/x?sslmode=verify-full&sslrootcert=system").expect("valid");
        assert_eq!(
            by_ip.replication_config("s", "p").tls.sni_hostname.as_deref(),
            Some("10.0.0.5")
        );
        assert!(matches!(
            Database::parse("postgres://db/x?sslmode=verify-full"),
            Err(StartupError::Tls(_))
        ));
    }
}
