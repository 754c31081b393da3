//! A private `nats-server` with JetStream (Debian's `nats-server` package) on a free loopback
//! port, its store in a directory of its own (so a restart keeps the streams), killed when dropped.

use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use anyhow::{Context, Result};

use crate::postgres::free_port;
use crate::process::{wait_for_port, ChildGuard};

pub struct NatsServer {
    port: u16,
    dir: PathBuf,
    max_payload: Option<usize>,
    child: Option<ChildGuard>,
}

impl NatsServer {
    /// A server with the default limits.
    pub fn start() -> Result<Self> {
        Self::start_with(None)
    }

    /// A server whose `max_payload` is `bytes` (a message larger is refused by the client).
    pub fn start_with_max_payload(bytes: usize) -> Result<Self> {
        Self::start_with(Some(bytes))
    }

    fn start_with(max_payload: Option<usize>) -> Result<Self> {
        let port = free_port()?;
        let dir = std::env::temp_dir().join(format!("pg_cqrs-nats-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let mut server = Self {
            port,
            dir,
            max_payload,
            child: None,
        };
        server.restart()?;
        Ok(server)
    }

    /// Starts it (again) on the same port and store.
    pub fn restart(&mut self) -> Result<()> {
        let config = self.dir.join("nats.conf");
        let mut text = format!(
            "listen: \"127.0.0.1:{}\"\njetstream {{ store_dir: \"{}\" }}\n",
            self.port,
            self.dir.join("store").display()
        );
        if let Some(bytes) = self.max_payload {
            text.push_str(&format!("max_payload: {bytes}\n"));
        }
        std::fs::write(&config, text)?;
        let log = std::fs::File::create(self.dir.join("nats.log"))?;
        let child = Command::new("nats-server")
            .arg("-c")
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            // its own process group, so that Ctrl-C reaches only the program that started it
            .process_group(0)
            .spawn()
            .context("starting nats-server (apt-get install nats-server)")?;
        self.child = Some(ChildGuard::new("nats-server", child));
        wait_for_port("nats-server", self.port, Duration::from_secs(10), || self.log())
    }

    /// The `max_payload` of its next start (`None`: the server's default).
    pub fn set_max_payload(&mut self, bytes: Option<usize>) {
        self.max_payload = bytes;
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    /// Its log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("nats.log")).unwrap_or_default()
    }

    /// SIGKILL; [`NatsServer::restart`] brings it back with what it had stored.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            child.kill();
        }
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
