//! The portable edition's JSON Schema validator (PL/pgSQL, a subset of draft 2020-12) agrees with
//! the extension's (the jsonschema crate): random schemas within the subset and random payloads,
//! half of them shaped to fit, through `cqrs.append` in both editions — the same verdict every
//! time, and where there is exactly one violation, the same JSON pointer and message. Three in
//! ten schemas are bundled (the schema under test sits in an embedded resource with an `$id` of
//! its own, reached by relative URIs) and two in ten extensible (reached by a `$dynamicRef`
//! whose outermost anchor is the root's).
//!
//! `CQRS_SCHEMA_SEED` replays a run; `CQRS_SCHEMA_CASES` sets how many schemas (each tried with
//! several payloads).

use anyhow::{bail, Result};
use cqrs_e2e::connect;
use cqrs_e2e::edition::{cluster, Edition};
use cqrs_harness::ClusterOptions;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};
use tokio_postgres::Client;

const NAMES: &[&str] = &["a", "b", "c", "x_1", "id"];
const STRINGS: &[&str] = &["", "a", "ab", "abc", "xyz", "Z", "hello world"];
const EMAILS_VALID: &[&str] = &[
    "user@example.com",
    "a.b@c.org",
    "\"quoted local\"@example.com",
    "a@[10.0.0.1]",
    "a@[IPv6:::1]",
];
const EMAILS_INVALID: &[&str] = &["plain", "@example.com", "a@", "a b@c.org", "a@-bad.com", "a@b..c"];
const DATES: &[&str] = &[
    "2024-02-29",
    "2023-02-29",
    "2024-13-01",
    "24-01-01",
    "2024-04-31",
    "2025-12-31",
];
const DATE_TIMES: &[&str] = &[
    "2024-02-29T23:59:59Z",
    "2024-01-01T00:00:00.5+01:00",
    "2024-01-01T25:00:00Z",
    "2024-01-01T00:00:00",
    "2023-02-29T10:00:00Z",
    "2024-06-01t08:30:00z",
    "1998-12-31T23:59:60Z",
    "1998-12-31T15:59:60-08:00",
    "1998-12-31T23:58:60Z",
];
const UUIDS: &[&str] = &[
    "a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11",
    "A0EEBC99-9C0B-4EF8-BB6D-6BB9BD380A11",
    "a0eebc999c0b4ef8bb6d6bb9bd380a11",
    "nope",
];
const IPV4S: &[&str] = &["10.0.0.1", "255.255.255.255", "256.1.1.1", "01.2.3.4", "1.2.3"];
const IPV6S: &[&str] = &[
    "::1",
    "2001:db8::8a2e:370:7334",
    "::ffff:10.0.0.1",
    "1::2::3",
    "12345::",
    "fe80::1%eth0",
];
const HOSTNAMES: &[&str] = &[
    "example.com",
    "a-b.c",
    "-ab.c",
    "ab-.c",
    "a..b",
    "xn--bcher-kva.example",
    "ab--cd.ef",
];
const TIMES: &[&str] = &[
    "08:30:06Z",
    "23:59:60Z",
    "23:59:60+01:00",
    "00:59:60+01:00",
    "08:30:06",
    "24:00:00Z",
    "08:30:06.25-05:30",
];
const DURATIONS: &[&str] = &[
    "P1D",
    "PT1H30M",
    "P1W",
    "P1W2D",
    "P",
    "PT",
    "P1Y2M3DT4H5M6S",
    "P1DT",
];
const URIS: &[&str] = &[
    "http://example.com/a?b=c#d",
    "http://[::1]:80/x",
    "http://[zz]/",
    "//host/path",
    "1a:b",
    "/relative/path",
    "http://exa mple.com",
    "http://\u{192}\u{f8}\u{f8}.com/\u{3c0}",
    "mailto:a@b.c",
    "http://a%zz",
    "http://u@h:12a",
];
const TEMPLATES: &[&str] = &[
    "http://example.com/{id}",
    "{+a,b:3}",
    "{",
    "a}",
    "{a.b*}",
    "{a b}",
    "x%41y",
    "{:1}",
];
const FORMATS: &[&str] = &[
    "date-time",
    "date",
    "email",
    "uuid",
    "ipv4",
    "ipv6",
    "hostname",
    "time",
    "duration",
    "uri",
    "uri-reference",
    "iri",
    "iri-reference",
    "uri-template",
];
const PATTERNS: &[&str] = &["^a", "b$", "^[a-c]+$", "^[0-9]*$", "x"];
const TYPES: &[&str] = &[
    "null", "boolean", "object", "array", "number", "integer", "string",
];

fn scalar(rng: &mut StdRng) -> Value {
    match rng.random_range(0..8) {
        0 => Value::Null,
        1 => json!(rng.random_bool(0.5)),
        2 | 3 => json!(rng.random_range(-5..10)),
        4 => json!(rng.random_range(-10..20) as f64 / 2.0),
        _ => json!(STRINGS.choose(rng).copied().unwrap_or("a")),
    }
}

fn format_string(rng: &mut StdRng, format: &str) -> Value {
    let pool: Vec<&str> = match format {
        "email" => EMAILS_VALID.iter().chain(EMAILS_INVALID).copied().collect(),
        "date" => DATES.to_vec(),
        "date-time" => DATE_TIMES.to_vec(),
        "ipv4" => IPV4S.to_vec(),
        "ipv6" => IPV6S.to_vec(),
        "hostname" => HOSTNAMES.to_vec(),
        "time" => TIMES.to_vec(),
        "duration" => DURATIONS.to_vec(),
        "uri" | "uri-reference" | "iri" | "iri-reference" => URIS.to_vec(),
        "uri-template" => TEMPLATES.to_vec(),
        _ => UUIDS.to_vec(),
    };
    json!(pool.choose(rng).copied().unwrap_or(""))
}

/// A schema within the portable subset (no fractional multipleOf, simple patterns, formats whose
/// edge cases both validators read alike).
fn schema(rng: &mut StdRng, depth: u32) -> Value {
    let mut s = Map::new();
    let keywords = rng.random_range(1..=3);
    for _ in 0..keywords {
        match rng.random_range(0..14) {
            0 => {
                if rng.random_bool(0.7) {
                    s.insert(
                        "type".into(),
                        json!(TYPES.choose(rng).copied().unwrap_or("string")),
                    );
                } else {
                    let mut types: Vec<&str> = TYPES.choose_multiple(rng, 2).copied().collect();
                    types.sort();
                    types.dedup();
                    s.insert("type".into(), json!(types));
                }
            }
            1 => {
                let options: Vec<Value> = (0..rng.random_range(1..6)).map(|_| scalar(rng)).collect();
                s.insert("enum".into(), Value::Array(options));
            }
            2 => {
                s.insert("const".into(), scalar(rng));
            }
            3 if depth > 0 => {
                let mut properties = Map::new();
                let count = rng.random_range(1..3);
                for name in NAMES.choose_multiple(rng, count) {
                    properties.insert((*name).into(), schema(rng, depth - 1));
                }
                s.insert("type".into(), json!("object"));
                s.insert("properties".into(), Value::Object(properties));
                if rng.random_bool(0.5) {
                    let count = rng.random_range(1..3);
                    let required: Vec<&str> = NAMES.choose_multiple(rng, count).copied().collect();
                    s.insert("required".into(), json!(required));
                }
                if rng.random_bool(0.4) {
                    s.insert(
                        "additionalProperties".into(),
                        if rng.random_bool(0.5) {
                            json!(false)
                        } else {
                            schema(rng, depth - 1)
                        },
                    );
                }
                if rng.random_bool(0.3) {
                    s.insert("patternProperties".into(), json!({"^x": schema(rng, depth - 1)}));
                }
            }
            4 if depth > 0 => {
                s.insert("type".into(), json!("array"));
                if rng.random_bool(0.5) {
                    s.insert("items".into(), schema(rng, depth - 1));
                }
                if rng.random_bool(0.3) {
                    s.insert("prefixItems".into(), json!([schema(rng, depth - 1)]));
                }
                if rng.random_bool(0.4) {
                    s.insert("minItems".into(), json!(rng.random_range(0..3)));
                }
                if rng.random_bool(0.4) {
                    s.insert("maxItems".into(), json!(rng.random_range(1..4)));
                }
                if rng.random_bool(0.3) {
                    s.insert("uniqueItems".into(), json!(true));
                }
            }
            5 => {
                s.insert("minLength".into(), json!(rng.random_range(0..3)));
                s.insert("maxLength".into(), json!(rng.random_range(1..5)));
            }
            6 => {
                s.insert(
                    "pattern".into(),
                    json!(PATTERNS.choose(rng).copied().unwrap_or("x")),
                );
            }
            7 => {
                let limit = rng.random_range(-3..6);
                let keyword = ["minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum"]
                    .choose(rng)
                    .copied()
                    .unwrap_or("minimum");
                s.insert(keyword.into(), json!(limit));
            }
            8 => {
                s.insert(
                    "multipleOf".into(),
                    json!([2, 3, 5].choose(rng).copied().unwrap_or(2)),
                );
            }
            9 => {
                s.insert("minProperties".into(), json!(rng.random_range(0..3)));
                s.insert("maxProperties".into(), json!(rng.random_range(1..4)));
            }
            10 if depth > 0 => {
                let keyword = ["allOf", "anyOf", "oneOf"]
                    .choose(rng)
                    .copied()
                    .unwrap_or("allOf");
                let subs: Vec<Value> = (0..rng.random_range(1..3))
                    .map(|_| schema(rng, depth - 1))
                    .collect();
                s.insert(keyword.into(), Value::Array(subs));
            }
            11 if depth > 0 => {
                s.insert("not".into(), schema(rng, depth - 1));
            }
            12 => {
                let format = FORMATS.choose(rng).copied().unwrap_or("uuid");
                s.insert("type".into(), json!("string"));
                s.insert("format".into(), json!(format));
            }
            _ => {
                s.insert(
                    "type".into(),
                    json!(TYPES.choose(rng).copied().unwrap_or("string")),
                );
            }
        }
    }
    Value::Object(s)
}

/// A payload: sometimes built from the schema's own properties and formats, often not.
fn payload(rng: &mut StdRng, schema: &Value, depth: u32) -> Value {
    let object = schema.as_object();
    let fitted = rng.random_bool(0.6);
    if let (true, Some(format)) = (
        fitted,
        object.and_then(|o| o.get("format")).and_then(Value::as_str),
    ) {
        return format_string(rng, format);
    }
    if let (true, Some(options)) = (
        fitted,
        object.and_then(|o| o.get("enum")).and_then(Value::as_array),
    ) {
        return options.choose(rng).cloned().unwrap_or(Value::Null);
    }
    let wants = object
        .and_then(|o| o.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("");
    let kind = if fitted && !wants.is_empty() {
        wants
    } else {
        TYPES.choose(rng).copied().unwrap_or("object")
    };
    match kind {
        "object" if depth > 0 => {
            let mut out = Map::new();
            let properties = object
                .and_then(|o| o.get("properties"))
                .and_then(Value::as_object);
            let count = rng.random_range(0..4);
            for name in NAMES.choose_multiple(rng, count) {
                let sub = properties
                    .and_then(|p| p.get(*name))
                    .cloned()
                    .unwrap_or(json!({}));
                out.insert((*name).into(), payload(rng, &sub, depth - 1));
            }
            Value::Object(out)
        }
        "array" if depth > 0 => {
            let items = object.and_then(|o| o.get("items")).cloned().unwrap_or(json!({}));
            Value::Array(
                (0..rng.random_range(0..4))
                    .map(|_| payload(rng, &items, depth - 1))
                    .collect(),
            )
        }
        "string" => {
            if rng.random_bool(0.3) {
                let format = FORMATS.choose(rng).copied().unwrap_or("uuid");
                format_string(rng, format)
            } else {
                json!(STRINGS.choose(rng).copied().unwrap_or("a"))
            }
        }
        "integer" => json!(rng.random_range(-6..12)),
        "number" => json!(rng.random_range(-12..24) as f64 / 2.0),
        "boolean" => json!(rng.random_bool(0.5)),
        "null" => Value::Null,
        _ => scalar(rng),
    }
}

/// What an edition says of `payload` under `schema`: accepted, or (SQLSTATE, message, detail).
async fn verdict(
    client: &Client,
    schema: &Value,
    payload: &Value,
) -> Result<Option<(String, String, String)>> {
    client.batch_execute("begin").await?;
    let registered = client
        .query("select cqrs.register_command_type('T', $1)", &[schema])
        .await;
    let result = match registered {
        Err(err) => Some((
            err.code().map(|c| c.code().to_owned()).unwrap_or_default(),
            format!(
                "registration: {}",
                err.as_db_error()
                    .map(|d| d.message().to_owned())
                    .unwrap_or_default()
            ),
            String::new(),
        )),
        Ok(_) => {
            // the payload is wrapped: cqrs.append takes objects only
            match client
                .query(
                    "select cqrs.append(gen_random_uuid(), 's', 'T', jsonb_build_object('v', $1::jsonb))",
                    &[payload],
                )
                .await
            {
                Ok(_) => None,
                Err(err) => {
                    let db = err.as_db_error();
                    Some((
                        err.code().map(|c| c.code().to_owned()).unwrap_or_default(),
                        db.map(|d| d.message().to_owned())
                            .unwrap_or_else(|| err.to_string()),
                        db.and_then(|d| d.detail()).unwrap_or_default().to_owned(),
                    ))
                }
            }
        }
    };
    client.batch_execute("rollback").await?;
    Ok(result)
}

/// `inner` as a bundled schema would hold it: "v" refers to an embedded schema resource by a
/// relative URI, and that resource's `#/$defs/body` is `inner` — the root's own `$defs/body`,
/// `decoy`, is what a validator that read the `$ref` against the root would take instead.
fn bundled(inner: &Value, decoy: Value) -> Value {
    json!({
        "$id": "https://example.com/commands/root.json",
        "type": "object",
        "properties": {"v": {"$ref": "parts/v.json"}},
        "$defs": {
            "v": {"$id": "parts/v.json", "$ref": "#/$defs/body", "$defs": {"body": inner}},
            "body": decoy
        }
    })
}

/// `inner` reached by a `$dynamicRef`: the embedded resource that "v" refers to asks for its
/// dynamic anchor "body", which it defines itself as `decoy` — but the root, the outermost
/// resource in the dynamic scope, defines it too, as `inner`, and that one is meant. A validator
/// that read the `$dynamicRef` as a `$ref` would take `decoy`.
fn extensible(inner: &Value, decoy: Value) -> Value {
    let anchored = |schema: &Value| {
        let mut schema = schema.clone();
        if let Some(members) = schema.as_object_mut() {
            members.insert("$dynamicAnchor".into(), json!("body"));
        }
        schema
    };
    json!({
        "$id": "https://example.com/commands/root.json",
        "type": "object",
        "properties": {"v": {"$ref": "parts/v.json"}},
        "$defs": {
            "body": anchored(inner),
            "v": {"$id": "parts/v.json", "$dynamicRef": "#body", "$defs": {"body": anchored(&decoy)}}
        }
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn both_editions_give_the_same_verdicts() -> Result<()> {
    let seed: u64 = std::env::var("CQRS_SCHEMA_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(rand::random);
    let cases: usize = std::env::var("CQRS_SCHEMA_CASES")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(150);
    eprintln!("CQRS_SCHEMA_SEED={seed}");
    let extension_pg = cluster(Edition::Extension, ClusterOptions::default())?;
    let portable_pg = cluster(Edition::Portable, ClusterOptions::default())?;
    let (extension, portable) = (
        connect(&extension_pg.url()).await?,
        connect(&portable_pg.url()).await?,
    );
    let mut rng = StdRng::seed_from_u64(seed);
    let (mut accepted, mut refused, mut compared) = (0, 0, 0);
    let mut disagreements = Vec::new();
    for _ in 0..cases {
        // wrapped the way the payload is: the schema describes "v"
        let inner = schema(&mut rng, 2);
        let schema = match rng.random_range(0..10) {
            0..=2 => bundled(&inner, schema(&mut rng, 1)),
            3..=4 => extensible(&inner, schema(&mut rng, 1)),
            _ => json!({"type": "object", "properties": {"v": inner}}),
        };
        for _ in 0..4 {
            let value = payload(&mut rng, &inner, 2);
            let (a, b) = (
                verdict(&extension, &schema, &value).await?,
                verdict(&portable, &schema, &value).await?,
            );
            match (&a, &b) {
                (None, None) => accepted += 1,
                (Some((ca, ma, da)), Some((cb, mb, db))) if ca == cb => {
                    refused += 1;
                    // one violation: the pointer and the message are the same too
                    if ca == "22023" && !da.contains("; ") {
                        compared += 1;
                        if ma != mb || da != db {
                            disagreements.push(format!("schema {schema}\npayload {value}\n  extension: {ma} [{da}]\n  portable:  {mb} [{db}]"));
                        }
                    }
                }
                _ => disagreements.push(format!(
                    "schema {schema}\npayload {value}\n  extension: {a:?}\n  portable:  {b:?}"
                )),
            }
        }
    }
    eprintln!("{accepted} accepted by both, {refused} refused by both ({compared} single violations compared word for word)");
    if !disagreements.is_empty() {
        bail!(
            "the editions disagree {} times (seed {seed}):\n{}",
            disagreements.len(),
            disagreements.join("\n\n")
        );
    }
    if accepted < cases / 5 || refused < cases / 5 {
        bail!("the generator is lopsided: {accepted} accepted, {refused} refused");
    }
    Ok(())
}
