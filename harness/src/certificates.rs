//! Throw-away certificates for TLS tests, made with the `openssl` command line: a CA and a
//! server certificate it signed for `localhost` and `127.0.0.1`, and a second CA that signed
//! nothing (for the "wrong root certificate" case).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use anyhow::{bail, Context, Result};

use crate::postgres::tempdir;
use crate::process::{chown_to_postgres, running_as_root};

pub struct Certificates {
    dir: PathBuf,
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .stdin(Stdio::null())
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.first().copied().unwrap_or_default(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

/// `openssl req` with a new P-256 key written to `{name}.key`; `rest` says what to make.
fn request_with_new_key(dir: &Path, name: &str, rest: &[&str]) -> Result<()> {
    let key = format!("{name}.key");
    let mut args = vec![
        "req",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-keyout",
        &key,
    ];
    args.extend_from_slice(rest);
    openssl(dir, &args)
}

/// A self-signed CA certificate and its key.
fn make_ca(dir: &Path, name: &str) -> Result<()> {
    let (cert, subject) = (format!("{name}.crt"), format!("/CN=pg_cqrs test {name}"));
    request_with_new_key(
        dir,
        name,
        &[
            "-x509",
            "-out",
            &cert,
            "-days",
            "2",
            "-subj",
            &subject,
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,keyCertSign,cRLSign",
        ],
    )
}

impl Certificates {
    pub fn generate() -> Result<Self> {
        let dir = tempdir("pg_cqrs-certs")?;
        make_ca(&dir, "ca")?;
        make_ca(&dir, "other-ca")?;
        std::fs::write(
            dir.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        request_with_new_key(&dir, "server", &["-out", "server.csr", "-subj", "/CN=localhost"])?;
        openssl(
            &dir,
            &[
                "x509",
                "-req",
                "-in",
                "server.csr",
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                "server.crt",
                "-days",
                "2",
                "-extfile",
                "server.ext",
            ],
        )?;
        // PostgreSQL refuses a key others can read, and runs as postgres
        let key = dir.join("server.key");
        std::fs::set_permissions(&key, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
        if running_as_root() {
            for file in ["server.key", "server.crt", "ca.crt", "other-ca.crt"] {
                chown_to_postgres(&dir.join(file))?;
            }
        }
        Ok(Self { dir })
    }

    /// The CA that signed the server certificate.
    pub fn ca(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }

    pub fn server_cert(&self) -> PathBuf {
        self.dir.join("server.crt")
    }

    pub fn server_key(&self) -> PathBuf {
        self.dir.join("server.key")
    }

    /// A CA that signed nothing the server has.
    pub fn other_ca(&self) -> PathBuf {
        self.dir.join("other-ca.crt")
    }

    /// `postgresql.conf` lines that turn TLS on with the server certificate.
    pub fn server_settings(&self) -> Vec<String> {
        vec![
            "ssl = on".to_owned(),
            format!("ssl_cert_file = '{}'", self.server_cert().display()),
            format!("ssl_key_file = '{}'", self.server_key().display()),
        ]
    }
}

impl Drop for Certificates {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
