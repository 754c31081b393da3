//! Transport security of the PostgreSQL connections, configured as libpq is: `sslmode` and
//! `sslrootcert` in the database URL. tokio-postgres knows neither `verify-ca`/`verify-full`
//! nor `sslrootcert`, so both are taken out of the URL here and applied to every connection
//! the sidecar opens — queries, the leader lock, the read pool (rustls through
//! tokio-postgres-rustls) and the replication stream (pgwire-replication's own rustls).

use std::path::PathBuf;
use std::sync::Arc;

use percent_encoding::percent_decode_str;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::{verify_tls12_signature, verify_tls13_signature, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use tokio_postgres_rustls::MakeRustlsConnect;

/// libpq's `sslmode` values (`allow` is not supported: it only differs from `prefer` when the
/// server refuses TLS, and is never what an operator wants).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SslMode {
    Disable,
    /// TLS when the server offers it, unverified (libpq's default).
    #[default]
    Prefer,
    /// TLS, unverified — or verified against `sslrootcert` when one is given, as libpq does.
    Require,
    /// TLS, the certificate chain verified against `sslrootcert`; any host name.
    VerifyCa,
    /// TLS, the chain and the host name verified.
    VerifyFull,
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    File(PathBuf),
    /// `sslrootcert=system`: the Mozilla roots compiled in (webpki-roots).
    System,
}

#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TlsSettings {
    pub mode: SslMode,
    pub root_cert: Option<RootCert>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum TlsError {
    #[error("sslmode={0} is not supported: use disable, prefer, require, verify-ca or verify-full")]
    UnknownMode(String),
    #[error("sslmode={0} verifies the server's certificate and needs sslrootcert=<CA file> (or sslrootcert=system)")]
    NoRootCert(&'static str),
    #[error("{0} is not supported by cqrs-sidecar (client certificates are not implemented)")]
    Unsupported(String),
    #[error("cannot read sslrootcert {path}: {reason}")]
    RootCert { path: String, reason: String },
    #[error("TLS set-up failed: {0}")]
    Setup(String),
}

const TLS_KEYS: [&str; 2] = ["sslmode", "sslrootcert"];
const UNSUPPORTED_KEYS: [&str; 4] = ["sslcert", "sslkey", "sslpassword", "sslcrl"];

impl TlsSettings {
    /// Takes the TLS settings out of a connection string (URL or `key=value` form); returns
    /// the rest for tokio-postgres.
    pub fn split(url: &str) -> Result<(String, Self), TlsError> {
        let mut settings = Self::default();
        let mut take = |key: &str, value: String| -> Result<bool, TlsError> {
            if UNSUPPORTED_KEYS.contains(&key) {
                return Err(TlsError::Unsupported(key.to_owned()));
            }
            if !TLS_KEYS.contains(&key) {
                return Ok(false);
            }
            match key {
                "sslmode" => settings.mode = parse_mode(&value)?,
                _ => {
                    settings.root_cert = Some(match value.as_str() {
                        "system" => RootCert::System,
                        _ => RootCert::File(PathBuf::from(value)),
                    })
                }
            }
            Ok(true)
        };
        let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            match url.split_once('?') {
                None => url.to_owned(),
                Some((base, query)) => {
                    let mut kept = Vec::new();
                    for pair in query.split('&').filter(|p| !p.is_empty()) {
                        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
                        let value = percent_decode_str(value).decode_utf8_lossy().into_owned();
                        if !take(key, value)? {
                            kept.push(pair);
                        }
                    }
                    if kept.is_empty() {
                        base.to_owned()
                    } else {
                        format!("{base}?{}", kept.join("&"))
                    }
                }
            }
        } else {
            let mut kept = Vec::new();
            for token in url.split_whitespace() {
                let taken = match token.split_once('=') {
                    Some((key, value)) => take(key.trim(), value.trim_matches('\'').to_owned())?,
                    None => false,
                };
                if !taken {
                    kept.push(token);
                }
            }
            kept.join(" ")
        };
        if settings.root_cert.is_none() {
            match settings.mode {
                SslMode::VerifyCa => return Err(TlsError::NoRootCert("verify-ca")),
                SslMode::VerifyFull => return Err(TlsError::NoRootCert("verify-full")),
                _ => {}
            }
        }
        Ok((rest, settings))
    }

    /// The mode tokio-postgres negotiates with (verification is the connector's business).
    pub fn negotiation(&self) -> tokio_postgres::config::SslMode {
        match self.mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        }
    }

    /// Whether the server's certificate is verified (so nobody on the path can stand in for it).
    pub fn verifies_server(&self) -> bool {
        self.verification() != Verification::None
    }

    /// What is verified: libpq verifies the chain under `require` too once a root cert is given.
    fn verification(&self) -> Verification {
        match (self.mode, &self.root_cert) {
            (SslMode::VerifyFull, _) => Verification::ChainAndName,
            (SslMode::VerifyCa, _) | (SslMode::Require, Some(_)) => Verification::Chain,
            _ => Verification::None,
        }
    }

    fn roots(&self) -> Result<RootCertStore, TlsError> {
        let mut roots = RootCertStore::empty();
        match &self.root_cert {
            None => {}
            Some(RootCert::System) => roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned()),
            Some(RootCert::File(path)) => {
                let failed = |reason: String| TlsError::RootCert {
                    path: path.display().to_string(),
                    reason,
                };
                let certs = CertificateDer::pem_file_iter(path)
                    .map_err(|err| failed(err.to_string()))?
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|err| failed(err.to_string()))?;
                if certs.is_empty() {
                    return Err(failed("no PEM certificate in it".into()));
                }
                for cert in certs {
                    roots.add(cert).map_err(|err| failed(err.to_string()))?;
                }
            }
        }
        Ok(roots)
    }

    /// The connector for tokio-postgres connections (also used, unused, under `disable`).
    pub fn connector(&self) -> Result<MakeRustlsConnect, TlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|err| TlsError::Setup(err.to_string()))?;
        let verification = self.verification();
        let verifier: Arc<dyn ServerCertVerifier> = match verification {
            Verification::None => Arc::new(Lenient {
                chain: None,
                provider,
            }),
            Verification::Chain | Verification::ChainAndName => {
                let webpki = WebPkiServerVerifier::builder_with_provider(
                    Arc::new(self.roots()?),
                    Arc::clone(&provider),
                )
                .build()
                .map_err(|err| TlsError::Setup(err.to_string()))?;
                if verification == Verification::Chain {
                    Arc::new(Lenient {
                        chain: Some(webpki),
                        provider,
                    })
                } else {
                    webpki
                }
            }
        };
        let config = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_no_client_auth();
        Ok(MakeRustlsConnect::new(config))
    }

    /// The same settings for the replication connection.
    pub fn replication(&self) -> pgwire_replication::TlsConfig {
        use pgwire_replication::TlsConfig;
        let ca = match &self.root_cert {
            Some(RootCert::File(path)) => Some(path.clone()),
            // pgwire-replication falls back to webpki-roots without a CA file
            _ => None,
        };
        match (self.mode, self.verification()) {
            (SslMode::Disable, _) => TlsConfig::disabled(),
            (_, Verification::ChainAndName) => TlsConfig::verify_full(ca),
            (_, Verification::Chain) => TlsConfig::verify_ca(ca),
            (SslMode::Prefer, _) => TlsConfig {
                mode: pgwire_replication::SslMode::Prefer,
                ..TlsConfig::require()
            },
            _ => TlsConfig::require(),
        }
    }
}

fn parse_mode(value: &str) -> Result<SslMode, TlsError> {
    Ok(match value {
        "disable" => SslMode::Disable,
        "prefer" => SslMode::Prefer,
        "require" => SslMode::Require,
        "verify-ca" => SslMode::VerifyCa,
        "verify-full" => SslMode::VerifyFull,
        other => return Err(TlsError::UnknownMode(other.to_owned())),
    })
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Verification {
    None,
    Chain,
    ChainAndName,
}

/// The certificate check of `prefer` / `require` without a root certificate (none: encrypted,
/// the server not authenticated, as libpq does) and of `verify-ca` (the chain must lead to a
/// trusted root; the name in it may be anything). Handshake signatures are always checked.
#[derive(Debug)]
struct Lenient {
    chain: Option<Arc<WebPkiServerVerifier>>,
    provider: Arc<CryptoProvider>,
}

impl ServerCertVerifier for Lenient {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let Some(chain) = &self.chain else {
            return Ok(ServerCertVerified::assertion());
        };
        match chain.verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_the_tls_keys_out_of_a_url() {
        let (rest, tls) = TlsSettings::split(
            "postgres://app@db:5432/shop?application_name=x&sslmode=verify-full&sslrootcert=%2Fetc%2Frds%20ca.pem",
        )
        .unwrap();
        assert_eq!(rest, "postgres://app@db:5432/shop?application_name=x");
        assert_eq!(tls.mode, SslMode::VerifyFull);
        assert_eq!(tls.root_cert, Some(RootCert::File("/etc/rds ca.pem".into())));
        let (rest, tls) = TlsSettings::split("postgresql://db/shop?sslmode=require").unwrap();
        assert_eq!(
            (rest.as_str(), tls.mode),
            ("postgresql://db/shop", SslMode::Require)
        );
        let (rest, tls) = TlsSettings::split("postgres://db/shop").unwrap();
        assert_eq!(
            (rest.as_str(), tls),
            ("postgres://db/shop", TlsSettings::default())
        );
    }

    #[test]
    fn takes_the_tls_keys_out_of_key_value_form() {
        let (rest, tls) =
            TlsSettings::split("host=db dbname=shop sslmode=verify-ca sslrootcert=system").unwrap();
        assert_eq!(rest, "host=db dbname=shop");
        assert_eq!(tls.mode, SslMode::VerifyCa);
        assert_eq!(tls.root_cert, Some(RootCert::System));
    }

    #[test]
    fn refuses_what_it_cannot_honour() {
        assert_eq!(
            TlsSettings::split("postgres://db/x?sslmode=allow"),
            Err(TlsError::UnknownMode("allow".into()))
        );
        assert_eq!(
            TlsSettings::split("postgres://db/x?sslmode=verify-full"),
            Err(TlsError::NoRootCert("verify-full"))
        );
        assert_eq!(
            TlsSettings::split("host=db sslcert=/c.pem"),
            Err(TlsError::Unsupported("sslcert".into()))
        );
        let missing = TlsSettings {
            mode: SslMode::VerifyCa,
            root_cert: Some(RootCert::File("/nonexistent/ca.pem".into())),
        };
        assert!(matches!(missing.connector(), Err(TlsError::RootCert { .. })));
    }

    #[test]
    fn require_with_a_root_cert_verifies_the_chain_as_libpq_does() {
        let require = |root_cert| TlsSettings {
            mode: SslMode::Require,
            root_cert,
        };
        assert_eq!(require(None).verification(), Verification::None);
        assert_eq!(
            require(Some(RootCert::System)).verification(),
            Verification::Chain
        );
        assert_eq!(
            require(Some(RootCert::System)).replication().mode,
            pgwire_replication::SslMode::VerifyCa
        );
        assert!(require(Some(RootCert::System)).connector().is_ok());
        assert_eq!(
            TlsSettings::default().replication().mode,
            pgwire_replication::SslMode::Prefer
        );
    }
}
