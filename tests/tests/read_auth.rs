//! The read API lets in only who belongs, against a real sidecar, PostgreSQL and Redis: API
//! keys (and their revocation by editing the keys file), JWTs (HS256, RS256 and ES256 from a
//! JWKS file; expired, not yet valid, wrong audience or issuer, wrong key, `alg: none`, HS/RS
//! confusion, a tampered payload), projections not exposed or not listed for the caller
//! answering exactly like unknown ones, row ownership from the cache and from PostgreSQL, TLS
//! with a certificate replaced while it runs, and load shedding past capacity.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::eventually;
use cqrs_e2e::orders::{self, seed_commands, Command as OrderCommand};
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_harness::read_tokens::{self, now, AUDIENCE};
use cqrs_harness::Certificates;
use cqrs_sidecar::metrics;
use cqrs_sidecar::read::auth::keys::{key_line, KEY_PREFIX};
use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

const ISSUER: &str = "https://id.example";

fn openssl(dir: &Path, args: &[&str]) -> Result<Vec<u8>> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl")?;
    ensure!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out.stdout)
}

fn base64_url(bytes: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

/// Everything a sidecar and its callers need: keys file, HS256 secret, an RSA and an EC key
/// (their public halves in a JWKS file), and a second RSA key that is in no JWKS.
struct Credentials {
    dir: PathBuf,
    keys_file: PathBuf,
    secret_file: PathBuf,
    secret: Vec<u8>,
    jwks: PathBuf,
    rsa: Vec<u8>,
    rsa_public: Vec<u8>,
    ec: Vec<u8>,
    stranger_rsa: Vec<u8>,
    billing_key: String,
    reporting_key: String,
}

impl Credentials {
    fn new() -> Result<Self> {
        let dir = cqrs_harness::postgres::tempdir("pg_cqrs-read-auth")?;
        let (secret_file, secret) = read_tokens::write_hs256_secret(&dir)?;
        for (name, args) in [
            (
                "rsa.pem",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    "rsa.pem",
                ][..],
            ),
            (
                "stranger.pem",
                &[
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                    "stranger.pem",
                ][..],
            ),
            (
                "ec.pem",
                &[
                    "genpkey",
                    "-algorithm",
                    "EC",
                    "-pkeyopt",
                    "ec_paramgen_curve:P-256",
                    "-out",
                    "ec.pem",
                ][..],
            ),
        ] {
            openssl(&dir, args).with_context(|| format!("making {name}"))?;
        }
        let modulus = String::from_utf8(openssl(&dir, &["rsa", "-in", "rsa.pem", "-noout", "-modulus"])?)?;
        let modulus = modulus.trim().trim_start_matches("Modulus=");
        let ec_der = openssl(&dir, &["pkey", "-in", "ec.pem", "-pubout", "-outform", "DER"])?;
        // the DER of a P-256 public key ends with the uncompressed point 04 || x || y
        let point = &ec_der[ec_der.len() - 65..];
        ensure!(point[0] == 4, "not an uncompressed P-256 point");
        let jwks = json!({"keys": [
            {"kty": "RSA", "kid": "rsa-1", "use": "sig", "alg": "RS256",
             "n": base64_url(&hex::decode(modulus)?), "e": "AQAB"},
            {"kty": "EC", "kid": "ec-1", "use": "sig", "alg": "ES256", "crv": "P-256",
             "x": base64_url(&point[1..33]), "y": base64_url(&point[33..65])},
        ]});
        let jwks_path = dir.join("jwks.json");
        std::fs::write(&jwks_path, jwks.to_string())?;
        let rsa_public = openssl(&dir, &["rsa", "-in", "rsa.pem", "-pubout"])?;
        let random_key = || format!("{KEY_PREFIX}{}", hex::encode(rand::random::<[u8; 32]>()));
        let (billing_key, reporting_key) = (random_key(), random_key());
        let keys_file = dir.join("keys");
        std::fs::write(
            &keys_file,
            format!(
                "# services\n{}\n{}\n",
                key_line("billing", &billing_key, "order_summary"),
                key_line("reporting", &reporting_key, "*")
            ),
        )?;
        Ok(Self {
            rsa: std::fs::read(dir.join("rsa.pem"))?,
            ec: std::fs::read(dir.join("ec.pem"))?,
            stranger_rsa: std::fs::read(dir.join("stranger.pem"))?,
            dir,
            keys_file,
            secret_file,
            secret,
            jwks: jwks_path,
            rsa_public,
            billing_key,
            reporting_key,
        })
    }

    fn settings(&self) -> Vec<(String, String)> {
        [
            (
                "CQRS_EXPOSE",
                "order_summary,user_order_stats:user_id=sub".to_owned(),
            ),
            ("CQRS_READ_AUTH", "keys,jwt".to_owned()),
            ("CQRS_READ_KEYS_FILE", self.keys_file.display().to_string()),
            (
                "CQRS_JWT_HS256_SECRET_FILE",
                self.secret_file.display().to_string(),
            ),
            ("CQRS_JWT_JWKS_FILE", self.jwks.display().to_string()),
            ("CQRS_JWT_ISSUER", ISSUER.to_owned()),
            ("CQRS_JWT_AUDIENCE", AUDIENCE.to_owned()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v))
        .collect()
    }

    /// Claims of a user that may read both example projections, valid now.
    fn claims(sub: &str) -> Value {
        json!({"sub": sub, "iss": ISSUER, "aud": AUDIENCE, "exp": now() + 600,
               "cqrs_projections": ["order_summary", "user_order_stats"]})
    }

    fn hs256(&self, claims: &Value) -> Result<String> {
        read_tokens::sign_hs256(&self.secret, claims)
    }

    fn signed(&self, algorithm: Algorithm, kid: &str, pem: &[u8], claims: &Value) -> Result<String> {
        let key = match algorithm {
            Algorithm::ES256 => EncodingKey::from_ec_pem(pem)?,
            _ => EncodingKey::from_rsa_pem(pem)?,
        };
        let mut header = Header::new(algorithm);
        header.kid = Some(kid.to_owned());
        Ok(encode(&header, claims, &key)?)
    }
}

impl Drop for Credentials {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

struct Reply {
    status: u16,
    body: String,
    source: Option<String>,
    challenge: Option<String>,
}

async fn get(http: &reqwest::Client, url: &str, bearer: Option<&str>) -> Result<Reply> {
    let mut request = http.get(url);
    if let Some(token) = bearer {
        request = request.header("authorization", format!("Bearer {token}"));
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    };
    let (status, source, challenge) = (
        response.status().as_u16(),
        header("x-cqrs-source"),
        header("www-authenticate"),
    );
    Ok(Reply {
        status,
        source,
        challenge,
        body: response.text().await?,
    })
}

fn body(reply: &Reply) -> Value {
    serde_json::from_str(&reply.body).unwrap_or(Value::Null)
}

/// The order projections with a few orders of users user-0 … user-2, one sidecar with
/// `settings`, and a projection `audit` that exists but is exposed to nobody.
async fn rig(settings: &[(String, String)]) -> Result<Rig> {
    let mut rig = Rig::start().await?;
    for (key, value) in settings {
        rig.set(key, value);
    }
    let client = rig.client().await?;
    client
        .batch_execute(
            "create table public.audit (order_id text primary key, rev bigint not null default 0);
             select cqrs.create_projection('audit', 'public.audit', 'order_id',
                 '{\"CREATE_ORDER\": {\"action\": \"upsert\"}}');",
        )
        .await?;
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let mut commands = seed_commands(3);
    for o in 0..12 {
        let user = format!("user-{}", o % 3);
        commands.push(OrderCommand {
            stream: format!("order-{o}"),
            command_type: "CREATE_ORDER",
            payload: json!({"user_id": user, "currency": "EUR"}),
        });
    }
    orders::append_all(&client, &commands, 100).await?;
    rig.assert_consistent(Duration::from_secs(30)).await?;
    Ok(rig)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_valid_credentials_read_and_only_what_they_list() -> Result<()> {
    let _serial = serial().await;
    let creds = Credentials::new()?;
    let rig = rig(&creds.settings()).await?;
    let http = reqwest::Client::new();
    let base = format!("{}/v1/projections", rig.http(0));
    let order = format!("{base}/order_summary/order-3");

    // no credentials, or not a bearer token: 401 with the challenge
    for bearer in [None, Some("")] {
        let reply = get(&http, &order, bearer).await?;
        ensure!(
            reply.status == 401,
            "anonymous read: {} {}",
            reply.status,
            reply.body
        );
        ensure!(
            reply
                .challenge
                .as_deref()
                .is_some_and(|c| c.starts_with("Bearer realm=")),
            "no Bearer challenge: {:?}",
            reply.challenge
        );
    }

    // API keys: the one listed for order_summary reads it; an unknown key is 401
    ensure!(get(&http, &order, Some(&creds.billing_key)).await?.status == 200);
    let unknown = format!("{KEY_PREFIX}{}", "0".repeat(64));
    ensure!(get(&http, &order, Some(&unknown)).await?.status == 401);

    // JWTs that hold: HS256, RS256 and ES256 (the JWKS keys)
    let claims = Credentials::claims("user-0");
    for (what, token) in [
        ("HS256", creds.hs256(&claims)?),
        (
            "RS256",
            creds.signed(Algorithm::RS256, "rsa-1", &creds.rsa, &claims)?,
        ),
        (
            "ES256",
            creds.signed(Algorithm::ES256, "ec-1", &creds.ec, &claims)?,
        ),
    ] {
        let reply = get(&http, &order, Some(&token)).await?;
        ensure!(
            reply.status == 200,
            "a valid {what} token: {} {}",
            reply.status,
            reply.body
        );
    }

    // JWTs that do not
    let with = |patch: Value| {
        let mut claims = Credentials::claims("user-0");
        for (k, v) in patch.as_object().into_iter().flatten() {
            claims[k] = v.clone();
        }
        claims
    };
    let token = creds.hs256(&claims)?;
    let mut tampered: Vec<String> = token.split('.').map(str::to_owned).collect();
    tampered[1] = base64_url(with(json!({"sub": "user-1"})).to_string().as_bytes());
    let alg_none = format!(
        "{}.{}.",
        base64_url(br#"{"alg":"none","typ":"JWT"}"#),
        base64_url(claims.to_string().as_bytes())
    );
    let confusion = encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(&creds.rsa_public),
    )?;
    let refused = [
        ("expired", creds.hs256(&with(json!({"exp": now() - 120})))?),
        ("not yet valid", creds.hs256(&with(json!({"nbf": now() + 600})))?),
        (
            "wrong audience",
            creds.hs256(&with(json!({"aud": "someone-else"})))?,
        ),
        (
            "wrong issuer",
            creds.hs256(&with(json!({"iss": "https://evil.example"})))?,
        ),
        (
            "wrong HS256 secret",
            read_tokens::sign_hs256(b"not the secret, but long enough to be one", &claims)?,
        ),
        (
            "RS256 key in no JWKS",
            creds.signed(Algorithm::RS256, "rsa-1", &creds.stranger_rsa, &claims)?,
        ),
        ("alg none", alg_none),
        ("HS256 signed with the RSA public key", confusion),
        ("tampered payload", tampered.join(".")),
        ("not a token", "abc.def".to_owned()),
    ];
    for (what, token) in &refused {
        let reply = get(&http, &order, Some(token)).await?;
        ensure!(reply.status == 401, "{what}: {} {}", reply.status, reply.body);
        ensure!(
            reply
                .challenge
                .as_deref()
                .is_some_and(|c| c.contains("invalid_token")),
            "{what}: challenge {:?}",
            reply.challenge
        );
    }

    // not exposed, not listed for the caller, or unknown: the same answer
    let unknown_projection = |reply: &Reply, name: &str| {
        reply.status == 404
            && body(reply)["error"] == "unknown_projection"
            && body(reply)["message"] == format!("there is no projection named {name:?}")
    };
    let only_orders = creds.hs256(&with(json!({"cqrs_projections": ["order_summary"]})))?;
    let all = creds.hs256(&with(json!({"cqrs_projections": "*"})))?;
    for (what, url, token, name) in [
        (
            "a projection that does not exist",
            format!("{base}/nope/x"),
            creds.reporting_key.clone(),
            "nope",
        ),
        (
            "a projection nobody exposed",
            format!("{base}/audit/order-3"),
            creds.reporting_key.clone(),
            "audit",
        ),
        (
            "a projection not exposed, with a token for every projection",
            format!("{base}/audit/order-3"),
            all.clone(),
            "audit",
        ),
        (
            "a projection the key does not list",
            format!("{base}/user_order_stats/user-0"),
            creds.billing_key.clone(),
            "user_order_stats",
        ),
        (
            "a projection the token does not list",
            format!("{base}/user_order_stats/user-0"),
            only_orders.clone(),
            "user_order_stats",
        ),
    ] {
        let reply = get(&http, &url, Some(&token)).await?;
        ensure!(
            unknown_projection(&reply, name),
            "{what}: {} {}",
            reply.status,
            reply.body
        );
    }

    // the refusals are counted by reason, and no token or key is in the log
    let metrics = rig.sidecars[0].metrics()?;
    for reason in [
        "missing_credentials",
        "unknown_key",
        "expired",
        "not_yet_valid",
        "wrong_audience",
        "wrong_issuer",
        "bad_signature",
        "projection_not_allowed",
    ] {
        ensure!(
            metrics
                .lines()
                .any(|l| l.starts_with("cqrs_read_denied_total{")
                    && l.contains(&format!("reason=\"{reason}\""))),
            "no cqrs_read_denied_total for {reason}"
        );
    }
    // …and each reason is logged, saying why (at most once per period: the unit tests of
    // read::denials show that)
    let log = rig.sidecars[0].log();
    for reason in [
        "missing_credentials",
        "unknown_key",
        "expired",
        "wrong_issuer",
        "projection_not_allowed",
    ] {
        let lines = log
            .lines()
            .filter(|l| l.contains("read request refused") && l.contains(&format!("reason=\"{reason}\"")))
            .count();
        ensure!(lines >= 1, "no log line for refusals by {reason}:\n{log}");
    }
    for secret in [&creds.billing_key, &creds.reporting_key, &token] {
        ensure!(
            !log.contains(secret.as_str()),
            "a credential is in the sidecar's log"
        );
        ensure!(
            !metrics.contains(secret.as_str()),
            "a credential is in the metrics"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_key_is_refused_once_the_keys_file_changes() -> Result<()> {
    let _serial = serial().await;
    let creds = Credentials::new()?;
    let rig = rig(&creds.settings()).await?;
    let http = reqwest::Client::new();
    let order = format!("{}/v1/projections/order_summary/order-3", rig.http(0));
    ensure!(get(&http, &order, Some(&creds.billing_key)).await?.status == 200);
    // billing's line removed; reporting stays
    std::fs::write(
        &creds.keys_file,
        format!("{}\n", key_line("reporting", &creds.reporting_key, "*")),
    )?;
    let revoked_at = Instant::now();
    eventually(Duration::from_secs(10), "the removed key is refused", || async {
        let status = get(&http, &order, Some(&creds.billing_key)).await?.status;
        ensure!(status == 401, "still {status}");
        Ok(())
    })
    .await
    .with_context(|| rig.logs())?;
    eprintln!("revoked in {:?}", revoked_at.elapsed());
    ensure!(get(&http, &order, Some(&creds.reporting_key)).await?.status == 200);
    // a file that does not parse keeps the keys as they were
    std::fs::write(&creds.keys_file, "reporting sha256:nothex *\n")?;
    tokio::time::sleep(Duration::from_secs(2)).await;
    ensure!(get(&http, &order, Some(&creds.reporting_key)).await?.status == 200);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_reads_only_their_own_rows_from_the_cache_and_from_postgres() -> Result<()> {
    let _serial = serial().await;
    let creds = Credentials::new()?;
    let rig = rig(&creds.settings()).await?;
    let http = reqwest::Client::new();
    let stats = |user: &str| format!("{}/v1/projections/user_order_stats/{user}", rig.http(0));
    let alice = creds.hs256(&Credentials::claims("user-0"))?;

    // from the cache (the projector wrote every row through)
    let own = get(&http, &stats("user-0"), Some(&alice)).await?;
    ensure!(
        own.status == 200 && own.source.as_deref() == Some("cache"),
        "own row: {} {:?} {}",
        own.status,
        own.source,
        own.body
    );
    let other = get(&http, &stats("user-1"), Some(&alice)).await?;
    let missing = get(&http, &stats("user-999"), Some(&alice)).await?;
    for (what, reply) in [("another user's row", &other), ("no row", &missing)] {
        ensure!(
            reply.status == 404 && body(reply)["error"] == "not_found",
            "{what}: {} {}",
            reply.status,
            reply.body
        );
        ensure!(
            reply.source.is_none(),
            "{what} says where it came from: {:?}",
            reply.source
        );
    }
    ensure!(
        body(&other)["message"].as_str().map(|m| m.replace("user-1", "K"))
            == body(&missing)["message"]
                .as_str()
                .map(|m| m.replace("user-999", "K")),
        "another user's row and no row read differently: {} / {}",
        other.body,
        missing.body
    );

    // from PostgreSQL: the cache entry gone, the miss is checked the same way
    rig.redis
        .cli(&["DEL", &format!("{PREFIX}:user_order_stats:user-1")])?;
    let other = get(&http, &stats("user-1"), Some(&alice)).await?;
    ensure!(
        other.status == 404,
        "another user's row, read from PostgreSQL: {} {}",
        other.status,
        other.body
    );
    let bob = creds.hs256(&Credentials::claims("user-1"))?;
    let theirs = get(&http, &stats("user-1"), Some(&bob)).await?;
    ensure!(
        theirs.status == 200,
        "the owner, after the miss: {} {}",
        theirs.status,
        theirs.body
    );
    let cached = get(&http, &stats("user-1"), Some(&alice)).await?;
    ensure!(
        cached.status == 404,
        "another user's row, cached again: {}",
        cached.status
    );

    // a service key reads every row of the projections it lists
    ensure!(
        get(&http, &stats("user-1"), Some(&creds.reporting_key))
            .await?
            .status
            == 200
    );
    // a token without the owning claim owns nothing
    let mut anonymous = Credentials::claims("user-0");
    anonymous.as_object_mut().map(|c| c.remove("sub"));
    ensure!(
        get(&http, &stats("user-0"), Some(&creds.hs256(&anonymous)?))
            .await?
            .status
            == 404
    );
    let denied = rig.sidecars[0].metric(metrics::READ_DENIED_TOTAL)?;
    ensure!(denied >= 3.0, "row refusals not counted: {denied}");
    Ok(())
}

fn curl(url: &str, ca: &Path) -> Result<(bool, String)> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "5",
            "-o",
            "-",
            "-w",
            "\n%{http_code}",
            "--cacert",
        ])
        .arg(ca)
        .arg(url)
        .output()?;
    Ok(cqrs_harness::process::success_and_output(&out))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_serves_https_and_picks_up_a_new_certificate() -> Result<()> {
    let _serial = serial().await;
    let first = Certificates::generate()?;
    let second = Certificates::generate()?;
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-read-tls")?;
    let (cert, key) = (dir.join("read.crt"), dir.join("read.key"));
    std::fs::copy(first.server_cert(), &cert)?;
    std::fs::copy(first.server_key(), &key)?;
    let settings: Vec<(String, String)> = [
        ("CQRS_EXPOSE", "order_summary"),
        ("CQRS_READ_AUTH", "none"),
        ("CQRS_READ_TLS_CERT", &cert.display().to_string()),
        ("CQRS_READ_TLS_KEY", &key.display().to_string()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let rig = rig(&settings).await?;
    let port = rig.sidecars[0].http_port();
    let https = format!("https://localhost:{port}/v1/projections/order_summary/order-3");

    let (ok, output) = curl(&https, &first.ca())?;
    ensure!(ok && output.ends_with("200"), "HTTPS with the right CA: {output}");
    // HTTP/2 over TLS, chosen by ALPN
    let out = Command::new("curl")
        .args([
            "-sS",
            "--http2",
            "--max-time",
            "5",
            "-o",
            "/dev/null",
            "-w",
            "%{http_version} %{http_code}",
            "--cacert",
        ])
        .arg(first.ca())
        .arg(&https)
        .output()?;
    let (ok, output) = cqrs_harness::process::success_and_output(&out);
    ensure!(ok && output.trim() == "2 200", "HTTP/2 over TLS: {output}");
    let (ok, output) = curl(&https, &second.ca())?;
    ensure!(!ok, "a client trusting another CA connected: {output}");
    let (ok, output) = curl(&https.replace("https://", "http://"), &first.ca())?;
    ensure!(
        !ok || !output.ends_with("200"),
        "plain HTTP was answered: {output}"
    );

    // the certificate is renewed (here: from another CA) while the sidecar runs
    std::fs::copy(second.server_key(), &key)?;
    std::fs::copy(second.server_cert(), &cert)?;
    eventually(
        Duration::from_secs(15),
        "the new certificate is served",
        || async {
            let (ok, output) = curl(&https, &second.ca())?;
            ensure!(ok && output.ends_with("200"), "{output}");
            Ok(())
        },
    )
    .await
    .with_context(|| rig.logs())?;
    let (ok, _) = curl(&https, &first.ca())?;
    ensure!(!ok, "the old certificate is still served");
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_capacity_requests_are_shed_at_once_with_retry_after() -> Result<()> {
    let _serial = serial().await;
    let settings: Vec<(String, String)> = [
        ("CQRS_EXPOSE", "order_summary"),
        ("CQRS_READ_AUTH", "none"),
        ("CQRS_READ_MAX_CONCURRENCY", "4"),
        ("CQRS_READ_QUEUE_TIMEOUT", "20ms"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let rig = rig(&settings).await?;
    let http = reqwest::Client::new();
    // requests that hold their slot for a second: read-your-writes of a command never appended
    let slow = format!(
        "{}/v1/projections/order_summary/order-3?after=order-3:1000&timeout_ms=1000",
        rig.http(0)
    );
    let started = Instant::now();
    let replies = futures_util::future::join_all((0..40).map(|_| {
        let (http, slow) = (http.clone(), slow.clone());
        async move {
            let sent = Instant::now();
            let response = http.get(&slow).send().await?;
            let retry_after = response.headers().get("retry-after").is_some();
            Ok::<_, anyhow::Error>((response.status().as_u16(), retry_after, sent.elapsed()))
        }
    }))
    .await;
    let mut admitted = 0;
    let mut shed = Vec::new();
    for reply in replies {
        match reply? {
            (504, _, _) => admitted += 1,
            (503, true, took) => shed.push(took),
            other => bail!("unexpected reply {other:?}"),
        }
    }
    ensure!(
        (1..=8).contains(&admitted),
        "{admitted} of 40 admitted with a limit of 4"
    );
    let slowest_shed = shed.iter().max().copied().unwrap_or_default();
    ensure!(
        slowest_shed < Duration::from_millis(500),
        "shedding took {slowest_shed:?}: requests were queued, not shed"
    );
    ensure!(rig.sidecars[0].metric(metrics::READ_SHED_TOTAL)? >= shed.len() as f64);
    // and once the load is gone, reads are answered again
    let after = format!("{}/v1/projections/order_summary/order-3", rig.http(0));
    ensure!(http.get(&after).send().await?.status().as_u16() == 200);
    eprintln!(
        "{admitted} admitted, {} shed (slowest answer {slowest_shed:?}) in {:?}",
        shed.len(),
        started.elapsed()
    );
    Ok(())
}

/// The read API speaks HTTP/2 beside HTTP/1.1 on one port, and past `--read-max-connections`
/// a new connection is answered 503 with `Retry-After` before a byte of HTTP is read from it —
/// a connection that has sent nothing at all gets it — while the admin server stays reachable.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_read_api_speaks_http2_and_refuses_connections_past_its_limit_before_any_http() -> Result<()> {
    use tokio::io::AsyncReadExt;
    let _serial = serial().await;
    let settings: Vec<(String, String)> = [
        ("CQRS_EXPOSE", "order_summary"),
        ("CQRS_READ_AUTH", "none"),
        ("CQRS_READ_MAX_CONNECTIONS", "2"),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.to_owned()))
    .collect();
    let rig = rig(&settings).await?;
    let url = format!("{}/v1/projections/order_summary/order-3", rig.http(0));

    // HTTP/2 (prior knowledge, as a service mesh or gRPC-era client speaks it) and HTTP/1.1
    // answer the same row; each client's connection is closed when the client is dropped
    let mut bodies = Vec::new();
    for http2 in [true, false] {
        let builder = reqwest::Client::builder().pool_max_idle_per_host(0);
        let http = if http2 {
            builder.http2_prior_knowledge()
        } else {
            builder
        }
        .build()?;
        let response = http.get(&url).send().await?;
        let expected = if http2 {
            reqwest::Version::HTTP_2
        } else {
            reqwest::Version::HTTP_11
        };
        ensure!(
            response.version() == expected,
            "answered over {:?}",
            response.version()
        );
        ensure!(response.status().as_u16() == 200, "status {}", response.status());
        bodies.push(response.text().await?);
    }
    ensure!(
        bodies[0] == bodies[1],
        "HTTP/2 and HTTP/1.1 answer differently: {bodies:?}"
    );

    // the clients' connections are gone before the slots are taken (the sidecar may see a
    // dropped client's close after the next connect: that one would be refused for it)
    let sidecar = &rig.sidecars[0];
    let connections_open = |wanted: f64, what: &'static str| {
        eventually(Duration::from_secs(10), what, move || async move {
            let open = sidecar.metric(metrics::READ_CONNECTIONS)?;
            ensure!(open == wanted, "{open} connections open");
            Ok(())
        })
    };
    connections_open(0.0, "the clients' connections are closed").await?;
    // two connections that say nothing take both slots …
    let addr = url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .context("the read API's address")?
        .to_owned();
    let held = [
        tokio::net::TcpStream::connect(&addr).await?,
        tokio::net::TcpStream::connect(&addr).await?,
    ];
    connections_open(2.0, "both connections are counted").await?;
    // … so a third that has sent nothing either is answered at once and closed
    let mut third = tokio::net::TcpStream::connect(&addr).await?;
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), third.read_to_end(&mut answer))
        .await
        .context("a connection past the limit was not answered within 5 s")??;
    let answer = String::from_utf8_lossy(&answer).to_lowercase();
    ensure!(
        answer.starts_with("http/1.1 503 ")
            && answer.contains("\r\nretry-after: 1\r\n")
            && answer.contains("\r\nconnection: close\r\n")
            && answer.contains(r#""error":"overloaded""#),
        "past the limit: {answer}"
    );
    // and an HTTP client's request on a new connection gets the 503 it can act on
    let http = reqwest::Client::new();
    let response = http.get(&url).send().await?;
    ensure!(
        response.status().as_u16() == 503 && response.headers().get("retry-after").is_some(),
        "a request past the connection limit: {}",
        response.status()
    );
    ensure!(rig.sidecars[0].metric(metrics::READ_CONNECTIONS_REFUSED_TOTAL)? >= 2.0);

    // a slot freed is a connection served again
    drop(held);
    eventually(Duration::from_secs(10), "reads are answered again", || async {
        let status = reqwest::Client::new().get(&url).send().await?.status().as_u16();
        ensure!(status == 200, "status {status}");
        Ok(())
    })
    .await?;
    Ok(())
}
