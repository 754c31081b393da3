//! cqrs-sidecar over TLS, against a PostgreSQL whose pg_hba.conf rejects the sidecar's role on
//! plain TCP: every connection the sidecar opens (queries, leader lock, read pool, replication
//! stream) must be encrypted, verified as the database URL's `sslmode` says, or refused with a
//! message that names the fix. Redis is reached through its TLS port only (the test checks the
//! cache through the plain one), verified against the test CA.

use std::time::Duration;

use anyhow::{ensure, Context, Result};
use cqrs_e2e::orders::{self, random_log, seed_commands};
use cqrs_e2e::rig::Rig;
use cqrs_harness::{http_get, Certificates, ClusterOptions, RedisServer};
use rand::SeedableRng;

const ROLE: &str = "sidecar_tls";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_sidecar_streams_and_reads_over_verified_tls_and_refuses_a_wrong_ca() -> Result<()> {
    let certs = Certificates::generate()?;
    let mut rig = Rig::start_with_options(ClusterOptions {
        settings: certs.server_settings(),
        hba: vec![
            format!("hostnossl all {ROLE} 127.0.0.1/32 reject"),
            format!("hostnossl replication {ROLE} 127.0.0.1/32 reject"),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    let redis = RedisServer::start_with_tls(&certs)?;
    let redis_tls = redis.tls_url().context("no TLS port")?;
    rig.use_redis(redis);
    rig.set("CQRS_REDIS_URL", &redis_tls);
    rig.set("CQRS_REDIS_CA_FILE", &certs.ca().display().to_string());
    let client = rig.client().await?;
    client
        .batch_execute(&format!("create role {ROLE} login superuser"))
        .await?;
    let base = format!(
        "postgres://{ROLE}@127.0.0.1:{}/{}",
        rig.pg.port(),
        rig.pg.database()
    );
    let url = |query: &str| format!("{base}?{query}");

    // the server's own CA, host name checked: streams, projects, reads
    let verified = url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.ca().display()
    ));
    rig.add_sidecar_at(&verified)?;
    let leader = rig.wait_for_leader(Duration::from_secs(30))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    orders::append_all(&client, &seed_commands(10), 10).await?;
    orders::append_all(&client, &random_log(&mut rng, 300, 30, 10), 1).await?;
    rig.assert_consistent(Duration::from_secs(60)).await?;
    let (plain, walsenders): (i64, i64) = {
        let row = client
            .query_one(
                "select count(*) filter (where not s.ssl), count(*) filter (where a.backend_type = 'walsender' and s.ssl)
                   from pg_catalog.pg_stat_activity a join pg_catalog.pg_stat_ssl s using (pid)
                  where a.usename = $1",
                &[&ROLE],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(
        plain == 0,
        "{plain} of the sidecar's connections are not encrypted"
    );
    ensure!(
        walsenders == 1,
        "the replication stream is not encrypted ({walsenders} TLS walsenders)"
    );
    // a key nobody has: only PostgreSQL (through the read pool) can say 404
    let (status, body) = http_get(
        rig.sidecars[leader].http_port(),
        "/v1/projections/order_summary/no-such-order",
        Duration::from_secs(5),
    )?;
    ensure!(status == 404, "read API over TLS: {status} {body}");

    // encrypted without verification (libpq's require): connects, stands by ready
    let unverified = rig.add_sidecar_at(&url("sslmode=require"))?;
    rig.sidecars[unverified].wait_ready(Duration::from_secs(30))?;

    // a CA that did not sign the server's certificate: refused at start, exit code 2, and the
    // log says what to check
    let wrong = url(&format!(
        "sslmode=verify-full&sslrootcert={}",
        certs.other_ca().display()
    ));
    let refused = rig.add_sidecar_at(&wrong)?;
    let code = rig.sidecars[refused].wait_exit(Duration::from_secs(20))?;
    let log = rig.sidecars[refused].log();
    ensure!(code == Some(2), "a wrong CA: exit code {code:?}\n{log}");
    ensure!(
        log.contains("TLS handshake") && log.contains("sslrootcert"),
        "the refusal does not say what to check:\n{log}"
    );

    // plain TCP for this role is rejected by pg_hba.conf (without it this test would pass
    // without TLS): refused at once too, not retried
    let plain = rig.add_sidecar_at(&url("sslmode=disable"))?;
    let code = rig.sidecars[plain].wait_exit(Duration::from_secs(20))?;
    let log = rig.sidecars[plain].log();
    ensure!(code == Some(2), "sslmode=disable: exit code {code:?}\n{log}");
    ensure!(
        log.contains("pg_hba.conf"),
        "the refusal does not name pg_hba.conf:\n{log}"
    );
    Ok(())
}

/// Passwords leave only where nobody on the path can take them: a password goes only to a server
/// whose certificate the sidecar verifies — over an unverified connection the queries could bind
/// SCRAM to the channel, but the replication connection cannot, so such a URL is refused at
/// start, as is any password over plain TCP — unless the URL says channel_binding=disable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passwords_go_only_through_channel_binding_unless_the_server_is_verified() -> Result<()> {
    let certs = Certificates::generate()?;
    let mut rig = Rig::start_with_options(ClusterOptions {
        settings: certs.server_settings(),
        hba: vec![
            "host all pw_md5 127.0.0.1/32 md5".to_owned(),
            "host replication pw_md5 127.0.0.1/32 md5".to_owned(),
            "host all pw_scram 127.0.0.1/32 scram-sha-256".to_owned(),
            "host replication pw_scram 127.0.0.1/32 scram-sha-256".to_owned(),
        ],
        ..ClusterOptions::default()
    })
    .await?;
    let client = rig.client().await?;
    client
        .batch_execute(
            "set password_encryption = 'md5';
             create role pw_md5 login replication password 'md5-secret' in role cqrs_projector;
             set password_encryption = 'scram-sha-256';
             create role pw_scram login replication password 'scram-secret' in role cqrs_projector;",
        )
        .await?;
    let (port, database) = (rig.pg.port(), rig.pg.database().to_owned());
    let url = |user: &str, password: &str, query: &str| {
        format!("postgres://{user}:{password}@127.0.0.1:{port}/{database}?{query}")
    };
    let refused = |rig: &mut Rig, at: String, what: &str| -> Result<()> {
        let sidecar = rig.add_sidecar_at(&at)?;
        let code = rig.sidecars[sidecar].wait_exit(Duration::from_secs(20))?;
        let log = rig.sidecars[sidecar].log();
        ensure!(code == Some(2), "{what}: exit code {code:?}\n{log}");
        ensure!(
            log.contains("channel binding") && log.contains("channel_binding=disable"),
            "{what}: the refusal does not say why and how:\n{log}"
        );
        ensure!(
            !log.contains("secret"),
            "{what}: the log holds the password:\n{log}"
        );
        Ok(())
    };
    // md5 asked for over TLS the sidecar does not verify: refused, nothing sent
    refused(
        &mut rig,
        url("pw_md5", "md5-secret", "sslmode=require"),
        "md5 over unverified TLS",
    )?;
    // a password over plain TCP: refused, even for SCRAM
    refused(
        &mut rig,
        url("pw_scram", "scram-secret", "sslmode=disable"),
        "scram without TLS",
    )?;
    // SCRAM over TLS the sidecar does not verify: its queries could bind the password to the
    // channel, its replication connection could not (pgwire-replication has no channel binding),
    // so an on-path attacker could ask that one for the password in cleartext: refused too
    refused(
        &mut rig,
        url("pw_scram", "scram-secret", "sslmode=require"),
        "scram over unverified TLS",
    )?;
    let log = rig.sidecars.last().map(|s| s.log()).unwrap_or_default();
    ensure!(
        log.contains("replication connection"),
        "the refusal does not say which connection:\n{log}"
    );
    // a verified server may ask for md5: the sidecar knows whom it talks to
    let verified = rig.add_sidecar_at(&url(
        "pw_md5",
        "md5-secret",
        &format!("sslmode=verify-full&sslrootcert={}", certs.ca().display()),
    ))?;
    rig.sidecars[verified].wait_ready(Duration::from_secs(30))?;
    // the operator's explicit choice
    let accepted = rig.add_sidecar_at(&url(
        "pw_md5",
        "md5-secret",
        "sslmode=disable&channel_binding=disable",
    ))?;
    rig.sidecars[accepted].wait_ready(Duration::from_secs(30))?;
    Ok(())
}
