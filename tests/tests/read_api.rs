//! The read API (`GET /v1/projections/{name}/{key}`) against real PostgreSQL, redis-server and
//! sidecar processes: cache hits and fills, singleflight, negative caching, read-your-writes,
//! the race between a slow reader and the projector, and both backends failing.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use cqrs_e2e::edition::Edition;
use cqrs_e2e::orders::{self, seed_commands, Command};
use cqrs_e2e::rig::{Rig, PREFIX};
use cqrs_e2e::{connect, eventually};
use cqrs_harness::read_tokens;
use cqrs_harness::{ClusterOptions, RedisServer};
use cqrs_sidecar::cache::{Cache, Entry, Ttls};
use cqrs_sidecar::metrics::{self, Metrics};
use cqrs_sidecar::read::cache_aside::{ReadSettings, Reader};
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::sync::{Mutex, MutexGuard};

static ONE_AT_A_TIME: Mutex<()> = Mutex::const_new(());

async fn serial() -> MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().await
}

struct Reply {
    status: u16,
    source: String,
    etag: String,
    body: String,
}

impl Reply {
    fn json(&self) -> Result<Value> {
        serde_json::from_str(&self.body).with_context(|| format!("not JSON: {}", self.body))
    }
}

async fn get(http: &reqwest::Client, url: &str, headers: &[(&str, &str)]) -> Result<Reply> {
    let mut request = http.get(url);
    for (name, value) in headers {
        request = request.header(*name, *value);
    }
    let response = request.send().await.with_context(|| format!("GET {url}"))?;
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned()
    };
    let (status, source, etag) = (
        response.status().as_u16(),
        header("x-cqrs-source"),
        header("etag"),
    );
    Ok(Reply {
        status,
        source,
        etag,
        body: response.text().await?,
    })
}

fn order(stream: &str, command_type: &'static str, payload: Value) -> Command {
    Command {
        stream: stream.to_owned(),
        command_type,
        payload,
    }
}

/// A rig with the order projections fed by one sidecar, and a few orders in them.
async fn rig_with_orders(extra: &[(&str, &str)]) -> Result<Rig> {
    rig_with_orders_on(Edition::Extension, extra).await
}

async fn rig_with_orders_on(edition: Edition, extra: &[(&str, &str)]) -> Result<Rig> {
    let mut rig = Rig::start_edition(
        edition,
        ClusterOptions {
            settings: vec!["track_functions = 'all'".to_owned()],
            ..ClusterOptions::default()
        },
    )
    .await?;
    for (key, value) in extra {
        rig.set(key, value);
    }
    rig.add_sidecar()?;
    rig.wait_for_leader(Duration::from_secs(30))?;
    let client = rig.client().await?;
    let mut commands = seed_commands(3);
    for o in 0..20 {
        let user = format!("user-{}", o % 3);
        commands.push(order(
            &format!("order-{o}"),
            "CREATE_ORDER",
            json!({"user_id": user, "currency": "EUR"}),
        ));
        commands.push(order(
            &format!("order-{o}"),
            "ADD_ITEM",
            json!({"user_id": user, "sku": "s", "qty": 2, "price": 1.5, "amount": 3.0}),
        ));
    }
    orders::append_all(&client, &commands, 100).await?;
    rig.assert_consistent(Duration::from_secs(30)).await?;
    Ok(rig)
}

/// JWT authentication on the read API, as the README configures it: the settings, and the
/// `authorization` header of a user that may read order_summary.
fn jwt_auth() -> Result<(Vec<(String, String)>, String)> {
    let dir = cqrs_harness::postgres::tempdir("pg_cqrs-read-jwt")?;
    let (secret_file, secret) = read_tokens::write_hs256_secret(&dir)?;
    let token = read_tokens::hs256_token(&secret, "user-1", &["order_summary"])?;
    let settings = [
        (
            "CQRS_EXPOSE",
            "order_summary,user_order_stats:user_id=sub".to_owned(),
        ),
        ("CQRS_READ_AUTH", "jwt".to_owned()),
        ("CQRS_JWT_HS256_SECRET_FILE", secret_file.display().to_string()),
        ("CQRS_JWT_AUDIENCE", read_tokens::AUDIENCE.to_owned()),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v))
    .collect();
    Ok((settings, format!("Bearer {token}")))
}

fn redis_del(rig: &Rig, key: &str) -> Result<()> {
    rig.redis
        .cli(&["DEL", &format!("{PREFIX}:order_summary:{key}")])?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hits_misses_negative_entries_and_bad_input() -> Result<()> {
    let _serial = serial().await;
    let rig = rig_with_orders(&[]).await?;
    let client = rig.client().await?;
    let http = reqwest::Client::new();
    let base = format!("{}/v1/projections", rig.http(0));

    // a hit: the projector wrote it; the ETag is the revision
    let hit = get(&http, &format!("{base}/order_summary/order-3"), &[]).await?;
    let (rev, doc): (i64, String) = {
        let row = client
            .query_one(
                "select rev, row_to_json(o)::text from shop.order_summary o where order_id = 'order-3'",
                &[],
            )
            .await?;
        (row.get(0), row.get(1))
    };
    ensure!(
        hit.status == 200 && hit.source == "cache",
        "{} from {}",
        hit.status,
        hit.source
    );
    ensure!(
        hit.etag == format!("\"{rev}\""),
        "etag {} for rev {rev}",
        hit.etag
    );
    ensure!(hit.json()? == serde_json::from_str::<Value>(&doc)?);
    let unchanged = get(
        &http,
        &format!("{base}/order_summary/order-3"),
        &[("if-none-match", &hit.etag)],
    )
    .await?;
    ensure!(unchanged.status == 304, "If-None-Match: {}", unchanged.status);

    // a miss is read from PostgreSQL and fills the cache
    redis_del(&rig, "order-4")?;
    let miss = get(&http, &format!("{base}/order_summary/order-4"), &[]).await?;
    ensure!(
        miss.status == 200 && miss.source == "postgres",
        "{} from {}",
        miss.status,
        miss.source
    );
    let again = get(&http, &format!("{base}/order_summary/order-4"), &[]).await?;
    ensure!(again.source == "cache" && again.body == miss.body);

    // an unknown key: 404, cached for 2 s, then asked again
    let absent = get(&http, &format!("{base}/order_summary/order-404"), &[]).await?;
    ensure!(absent.status == 404 && absent.json()?["error"] == "not_found" && absent.source == "postgres");
    let cached_absent = get(&http, &format!("{base}/order_summary/order-404"), &[]).await?;
    ensure!(
        cached_absent.status == 404 && cached_absent.source == "cache",
        "the negative entry is not cached"
    );
    tokio::time::sleep(Duration::from_millis(2_300)).await;
    let expired = get(&http, &format!("{base}/order_summary/order-404"), &[]).await?;
    ensure!(
        expired.status == 404 && expired.source == "postgres",
        "the negative entry outlived its 2 s"
    );

    // the projector replaces a negative entry at once when it writes the key
    let fresh = get(&http, &format!("{base}/order_summary/order-new"), &[]).await?;
    ensure!(fresh.status == 404);
    let row = client
        .query_one(
            "select seq from cqrs.append(cqrs.uuid_v7(), 'order-new', 'CREATE_ORDER', '{\"user_id\": \"user-1\", \"currency\": \"USD\"}')",
            &[],
        )
        .await?;
    let seq: i64 = row.get(0);
    let waited: bool = client
        .query_one(
            "select cqrs.wait_for('order-new', $1, 'order_summary', '5 s')",
            &[&seq],
        )
        .await?
        .get(0);
    ensure!(waited);
    eventually(
        Duration::from_secs(1),
        "the projector's write replaces the negative entry",
        || async {
            let now = get(&http, &format!("{base}/order_summary/order-new"), &[]).await?;
            ensure!(
                now.status == 200 && now.source == "cache",
                "{} from {}",
                now.status,
                now.source
            );
            Ok(())
        },
    )
    .await?;

    // an unknown projection is a different 404; bad input is 400
    let unknown = get(&http, &format!("{base}/no_such_projection/x"), &[]).await?;
    ensure!(
        unknown.status == 404 && unknown.json()?["error"] == "unknown_projection",
        "{}",
        unknown.body
    );
    let long_key = "k".repeat(2_000);
    for (path, why) in [
        (format!("{base}/order_summary/{long_key}"), "oversized key"),
        (format!("{base}/order_summary/%FF%FE"), "not UTF-8"),
        (
            format!("{base}/order_summary/order-3?after=order-3"),
            "after without seq",
        ),
        (
            format!("{base}/order_summary/order-3?after=order-3:x"),
            "after with a bad seq",
        ),
        (
            format!("{base}/order_summary/order-3?after=order-3:1&timeout_ms=-5"),
            "negative timeout",
        ),
    ] {
        let reply = get(&http, &path, &[]).await?;
        ensure!(
            reply.status == 400 && reply.json()?["error"] == "bad_request",
            "{why}: {} {}",
            reply.status,
            reply.body
        );
    }
    // a key that cannot be cast to the key column's type
    client
        .batch_execute(
            "create table public.things (id uuid primary key, name text, rev bigint not null default 0);
             select cqrs.create_projection('things', 'public.things', 'id', '{\"NAME\": {\"action\": \"upsert\", \"key\": \"$.id\", \"set\": {\"name\": \"$.name\"}}}');",
        )
        .await?;
    let reply = get(&http, &format!("{base}/things/not-a-uuid"), &[]).await?;
    ensure!(
        reply.status == 400,
        "uncastable key: {} {}",
        reply.status,
        reply.body
    );

    let metrics = rig.sidecars[0].metrics()?;
    let buckets = format!("{}_bucket", metrics::READ_DURATION_SECONDS);
    for name in [
        metrics::CACHE_HIT_RATIO,
        metrics::READ_REQUESTS_TOTAL,
        buckets.as_str(),
    ] {
        ensure!(metrics.contains(name), "{name} missing");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eight_hundred_concurrent_cold_reads_make_one_query() -> Result<()> {
    let _serial = serial().await;
    // with authentication on, and room for 800 requests in flight on 800 connections
    let (mut settings, authorization) = jwt_auth()?;
    settings.push(("CQRS_READ_MAX_CONCURRENCY".to_owned(), "1000".to_owned()));
    settings.push(("CQRS_READ_MAX_CONNECTIONS".to_owned(), "1000".to_owned()));
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let rig = rig_with_orders(&settings).await?;
    let client = rig.client().await?;
    let calls = || async {
        // counted by PostgreSQL itself (track_functions = all), flushed at transaction ends
        client.execute("select pg_stat_clear_snapshot()", &[]).await?;
        let n: i64 = client
            .query_one(
                "select coalesce(sum(calls), 0)::bigint from pg_stat_user_functions where schemaname = 'cqrs' and funcname = 'read_many'",
                &[],
            )
            .await?
            .get(0);
        Ok::<_, anyhow::Error>(n)
    };
    let sidecar = &rig.sidecars[0];
    for attempt in 0..3 {
        redis_del(&rig, "order-7")?;
        tokio::time::sleep(Duration::from_millis(1_200)).await; // let statistics settle
        let (before_metric, before_calls) = (
            sidecar.metric(metrics::READ_BACKEND_QUERIES_TOTAL)?,
            calls().await?,
        );
        let http = reqwest::Client::builder().pool_max_idle_per_host(800).build()?;
        let url = format!("{}/v1/projections/order_summary/order-7", rig.http(0));
        // the read model is locked while the requests arrive, so that they all miss together
        // and wait on the one query; without singleflight each would query
        let locker = rig.client().await?;
        locker
            .batch_execute("begin; lock table shop.order_summary in access exclusive mode")
            .await?;
        let start = Arc::new(tokio::sync::Barrier::new(800));
        let requests: Vec<_> = (0..800)
            .map(|_| {
                let (http, url, start) = (http.clone(), url.clone(), Arc::clone(&start));
                let authorization = authorization.clone();
                tokio::spawn(async move {
                    start.wait().await;
                    get(&http, &url, &[("authorization", authorization.as_str())]).await
                })
            })
            .collect();
        tokio::time::sleep(Duration::from_millis(900)).await;
        locker.batch_execute("commit").await?;
        let mut bodies = std::collections::HashSet::new();
        let mut from_postgres = 0;
        for request in requests {
            let reply = request.await??;
            ensure!(reply.status == 200, "{} {}", reply.status, reply.body);
            from_postgres += usize::from(reply.source == "postgres");
            bodies.insert(reply.body);
        }
        ensure!(bodies.len() == 1, "{} different answers", bodies.len());
        let queries = sidecar.metric(metrics::READ_BACKEND_QUERIES_TOTAL)? - before_metric;
        ensure!(
            queries == 1.0,
            "attempt {attempt}: {queries} read-API queries for one cold key"
        );
        // a backend reports its statistics within 10 s of going idle
        eventually(Duration::from_secs(15), "PostgreSQL counted the call", || async {
            let counted = calls().await? - before_calls;
            ensure!(
                counted == 1,
                "attempt {attempt}: PostgreSQL counted {counted} calls of cqrs.read_many"
            );
            Ok(())
        })
        .await?;
        ensure!(
            from_postgres > 400,
            "only {from_postgres} of 800 requests shared the query: they did not overlap"
        );
        eprintln!("attempt {attempt}: 800 requests, 1 query, {from_postgres} answered from the shared query");
    }
    Ok(())
}

/// A reader that read an older row fills the cache after the projector wrote a newer one (or
/// races it): whatever the interleaving, the newer revision stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_slow_reader_never_replaces_a_newer_projected_row() -> Result<()> {
    let _serial = serial().await;
    let rig = rig_with_orders(&[]).await?;
    let client = rig.client().await?;
    let pg = cqrs_sidecar::postgres::Database::parse(&rig.pg.url(), None)?;
    let ttls = Ttls {
        row: Duration::from_secs(3600),
        tombstone: Duration::from_secs(60),
        missing: Duration::from_secs(2),
    };
    let cache = Arc::new(Cache::new(&rig.redis.url(), PREFIX, ttls)?);
    let settings = ReadSettings {
        redis_timeout: Duration::from_secs(1),
        postgres_timeout: Duration::from_secs(5),
        postgres_queue_timeout: Duration::from_secs(5),
        pool_size: 2,
        replica_max_staleness: Duration::from_secs(1),
    };
    let reader = Reader::new(
        pg,
        Arc::clone(&cache),
        Arc::new(Metrics::new()?),
        Arc::new(cqrs_sidecar::health::Health::default()),
        settings,
    )?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(rand::random());
    let (mut late, mut racing) = (0, 0);
    for round in 0..60 {
        let key = format!("order-{}", round % 20);
        let old = reader.fetch("order_summary", &key).await?;
        let seq: i64 = client
            .query_one(
                "select seq from cqrs.append(cqrs.uuid_v7(), $1, 'ADD_ITEM', '{\"user_id\": \"user-0\", \"sku\": \"s\", \"qty\": 1, \"price\": 1, \"amount\": 1}')",
                &[&key],
            )
            .await?
            .get(0);
        if rng.random_bool(0.5) {
            // the slow reader arrives after the projector wrote the newer row
            late += 1;
            client
                .query_one(
                    "select cqrs.wait_for($1, $2, 'order_summary', '5 s')",
                    &[&key, &seq],
                )
                .await?;
            eventually(
                Duration::from_secs(5),
                "the projector cached the newer row",
                || async {
                    let cached = cache.get("order_summary", &key).await?.context("not cached")?;
                    ensure!(cached.rev > old.rev);
                    Ok(())
                },
            )
            .await?;
            reader.fill("order_summary", &old).await;
            let cached = cache.get("order_summary", &key).await?.context("not cached")?;
            ensure!(
                cached.rev > old.rev,
                "round {round}: the slow reader's rev {} replaced a newer one",
                old.rev
            );
        } else {
            // the slow reader races the projector
            racing += 1;
            tokio::time::sleep(Duration::from_millis(rng.random_range(0..30))).await;
            reader.fill("order_summary", &old).await;
            client
                .query_one(
                    "select cqrs.wait_for($1, $2, 'order_summary', '5 s')",
                    &[&key, &seq],
                )
                .await?;
        }
        let (rev, doc): (i64, String) = {
            let row = client
                .query_one(
                    "select rev, row_to_json(o)::text from shop.order_summary o where order_id = $1",
                    &[&key],
                )
                .await?;
            (row.get(0), row.get(1))
        };
        eventually(
            Duration::from_secs(5),
            "the cache holds the newest row",
            || async {
                let cached = cache.get("order_summary", &key).await?.context("not cached")?;
                ensure!(
                    cached.rev == rev && cached.entry == Entry::Row(doc.clone()),
                    "round {round}: cached rev {} vs {rev}",
                    cached.rev
                );
                Ok(())
            },
        )
        .await?;
    }
    eprintln!("{late} late fills, {racing} racing fills: the newer revision won every time");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_waits_for_a_slowed_projector() -> Result<()> {
    read_your_writes(Edition::Extension).await
}

/// The same on the portable edition (its wait_for polls instead of sleeping on a latch).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn read_your_writes_waits_for_a_slowed_projector_portable() -> Result<()> {
    read_your_writes(Edition::Portable).await
}

async fn read_your_writes(edition: Edition) -> Result<()> {
    let _serial = serial().await;
    // every batch waits 400 ms for more events: the projector lags on purpose; and the read
    // API wants a JWT
    let (mut settings, authorization) = jwt_auth()?;
    for (key, value) in [
        ("CQRS_BATCH_MAX_WAIT", "400ms"),
        ("CQRS_BATCH_MIN_EVENTS", "100000"),
        ("CQRS_BATCH_MAX_EVENTS", "100000"),
    ] {
        settings.push((key.to_owned(), value.to_owned()));
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let rig = rig_with_orders_on(edition, &settings).await?;
    let auth = [("authorization", authorization.as_str())];
    let client = rig.client().await?;
    let http = reqwest::Client::new();
    let base = format!("{}/v1/projections/order_summary", rig.http(0));
    let append_item = |key: &'static str| {
        let client = &client;
        async move {
            let row = client
                .query_one(
                    "select seq from cqrs.append(cqrs.uuid_v7(), $1, 'ADD_ITEM', '{\"user_id\": \"user-1\", \"sku\": \"s\", \"qty\": 1, \"price\": 2, \"amount\": 2}')",
                    &[&key],
                )
                .await?;
            Ok::<i64, anyhow::Error>(row.get(0))
        }
    };
    let before = get(&http, &format!("{base}/order-1"), &auth).await?.json()?;
    let mut waits = Vec::new();
    for _ in 0..5 {
        let seq = append_item("order-1").await?;
        let started = Instant::now();
        let stale = get(&http, &format!("{base}/order-1"), &auth).await?.json()?;
        let fresh = get(&http, &format!("{base}/order-1?after=order-1:{seq}"), &auth).await?;
        waits.push(started.elapsed());
        ensure!(fresh.status == 200, "{} {}", fresh.status, fresh.body);
        let fresh = fresh.json()?;
        ensure!(
            fresh["item_count"].as_i64() == stale["item_count"].as_i64().map(|n| n + 1),
            "after=… returned {fresh} while the cache had {stale}"
        );
    }
    ensure!(
        waits.iter().any(|w| *w > Duration::from_millis(100)),
        "the projector was not slow: {waits:?}"
    );
    let total = get(&http, &format!("{base}/order-1"), &auth).await?.json()?;
    ensure!(total["item_count"].as_i64() == before["item_count"].as_i64().map(|n| n + 5));

    // a timeout says how far the projection is behind the log, and nothing of the stream's
    // progress (the caller's row rules may hide some of its rows)
    let seq = append_item("order-1").await?;
    let timeout = get(
        &http,
        &format!("{base}/order-1?after=order-1:{seq}&timeout_ms=50"),
        &auth,
    )
    .await?;
    ensure!(timeout.status == 504, "{} {}", timeout.status, timeout.body);
    let body = timeout.json()?;
    ensure!(
        body["seq"].as_i64() == Some(seq)
            && body.get("applied_seq").is_none()
            && body["seconds_behind"].is_number(),
        "{body}"
    );
    let unknown = get(
        &http,
        &format!("{}/v1/projections/nope/order-1?after=order-1:1", rig.http(0)),
        &auth,
    )
    .await?;
    ensure!(
        unknown.status == 404 && unknown.json()?["error"] == "unknown_projection",
        "{}",
        unknown.body
    );
    eprintln!("read-your-writes waits: {waits:?}");
    Ok(())
}

/// Read-your-writes waits hold no connection of the read pool: with two pooled connections, a
/// caller's slow waits (up to its limit; the rest refused at once with 429) leave every cache
/// miss answered; the waits answer 504 in their own time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waits_starve_no_cache_miss_and_are_bounded_per_caller() -> Result<()> {
    let _serial = serial().await;
    let (mut settings, authorization) = jwt_auth()?;
    for (key, value) in [
        ("CQRS_READ_POOL_SIZE", "2"),
        ("CQRS_READ_MAX_WAITS_PER_CALLER", "8"),
    ] {
        settings.push((key.to_owned(), value.to_owned()));
    }
    let settings: Vec<(&str, &str)> = settings.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let rig = rig_with_orders_on(Edition::Extension, &settings).await?;
    let http = reqwest::Client::new();
    let base = format!("{}/v1/projections/order_summary", rig.http(0));
    let auth = [("authorization", authorization.as_str())];
    // twenty waits for a command that never comes, all at once
    let waits: Vec<_> = (0..20)
        .map(|_| {
            let (http, url, auth) = (
                http.clone(),
                format!("{base}/order-1?after=order-1:999999&timeout_ms=3000"),
                auth[0].1.to_owned(),
            );
            tokio::spawn(async move { get(&http, &url, &[("authorization", auth.as_str())]).await })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    // meanwhile, cache misses (absent orders) are answered from PostgreSQL, none shed
    let mut misses = Vec::new();
    for n in 0..30 {
        let reply = get(&http, &format!("{base}/absent-{n}"), &auth).await?;
        misses.push(reply.status);
    }
    ensure!(
        misses.iter().all(|s| *s == 404),
        "cache misses during the waits: {misses:?}"
    );
    let mut statuses = Vec::new();
    for wait in waits {
        let reply = wait.await??;
        if reply.status == 429 {
            ensure!(reply.json()?["error"] == "too_many_waits", "{}", reply.body);
        }
        statuses.push(reply.status);
    }
    statuses.sort_unstable();
    let waited = statuses.iter().filter(|s| **s == 504).count();
    let refused = statuses.iter().filter(|s| **s == 429).count();
    ensure!(waited == 8 && refused == 12, "waits answered {statuses:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn backends_down_degrade_without_hanging() -> Result<()> {
    let _serial = serial().await;
    let mut rig = rig_with_orders(&[("CQRS_READ_PG_TIMEOUT", "1s")]).await?;
    let http = reqwest::Client::builder()
        .timeout(Duration::from_secs(10))
        .build()?;
    let base = format!("{}/v1/projections/order_summary", rig.http(0));
    let timed = |path: String| {
        let http = &http;
        async move {
            let started = Instant::now();
            let reply = get(http, &path, &[]).await?;
            Ok::<_, anyhow::Error>((reply, started.elapsed()))
        }
    };

    // Redis killed mid-test: reads come from PostgreSQL and say so
    let port = rig.redis.port();
    rig.redis.kill();
    let (reply, took) = timed(format!("{base}/order-2")).await?;
    ensure!(
        reply.status == 200 && reply.source == "postgres_cache_down",
        "{} from {}",
        reply.status,
        reply.source
    );
    ensure!(took < Duration::from_secs(2), "took {took:?} with Redis down");
    let metric =
        rig.sidecars[0].metric("cqrs_read_requests_total{outcome=\"ok\",source=\"postgres_cache_down\"}")?;
    ensure!(metric >= 1.0, "the degraded read is not counted");
    rig.redis = RedisServer::start_on(port)?;
    // warm two keys again (the new Redis is empty)
    for key in ["order-2", "order-5"] {
        eventually(Duration::from_secs(10), "Redis answers again", || async {
            let _ = timed(format!("{base}/{key}")).await?;
            let (reply, _) = timed(format!("{base}/{key}")).await?;
            ensure!(reply.source == "cache", "{key} from {}", reply.source);
            Ok(())
        })
        .await?;
    }

    // PostgreSQL stopped: cached keys are still served, others fail fast with 503
    rig.pg.stop_mode("fast")?;
    for key in ["order-2", "order-5"] {
        let (reply, took) = timed(format!("{base}/{key}")).await?;
        ensure!(
            reply.status == 200 && reply.source == "cache",
            "{key}: {} from {}",
            reply.status,
            reply.source
        );
        ensure!(took < Duration::from_millis(500), "{key} took {took:?}");
    }
    let (reply, took) = timed(format!("{base}/order-9")).await?;
    ensure!(
        reply.status == 503 && reply.json()?["error"] == "unavailable",
        "{} {}",
        reply.status,
        reply.body
    );
    ensure!(
        took < Duration::from_secs(4),
        "a miss with PostgreSQL down took {took:?}"
    );

    // both down: 503, still without hanging
    rig.redis.kill();
    let (reply, took) = timed(format!("{base}/order-2")).await?;
    ensure!(reply.status == 503, "{} {}", reply.status, reply.body);
    ensure!(took < Duration::from_secs(4), "took {took:?} with both down");
    rig.redis = RedisServer::start_on(port)?;
    rig.pg.start_again()?;
    let client = connect(&rig.pg.url()).await?;
    drop(client);
    eventually(Duration::from_secs(30), "reads work again", || async {
        let (reply, _) = timed(format!("{base}/order-9")).await?;
        ensure!(reply.status == 200, "{} {}", reply.status, reply.body);
        Ok(())
    })
    .await?;
    Ok(())
}
