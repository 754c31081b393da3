//! The official JSON-Schema-Test-Suite (drafts 2020-12, 2019-09 and 07), tried as a new user
//! would: each group's schema registered as a command type in both editions, each case whose
//! data is an object (a command payload) appended. Cases whose data is not an object are tried
//! too, wrapped: the payload `{"v": data}` under `{"properties": {"v": schema}}` (the schema's
//! local `$ref`s moved along), for the schemas that can be moved so. Wherever the extension (the
//! jsonschema crate) gives the suite's verdict and the portable edition accepts the schema, the
//! portable edition must give that verdict too: 0 disagreements. A schema the portable edition cannot check must
//! be refused with 0A000 (or 22023 when it is malformed), never with a raw error. And the portable
//! edition's compiled validator must give what its interpreter gives, violation for violation.
//!
//! The suite ships in the `jsonschema` source distribution on PyPI (MIT, see its `json/LICENSE`);
//! `scripts/setup.sh` unpacks it into `target/json-schema-test-suite` (or set
//! `CQRS_JSON_SCHEMA_SUITE` to a `tests/` folder of the suite).

use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use cqrs_e2e::edition::{cluster, Edition};
use cqrs_e2e::{connect, repo_root};
use cqrs_harness::ClusterOptions;
use serde_json::Value;
use tokio_postgres::Client;

/// The drafts tried, with the `$schema` a user of that draft writes (the suite's draft-07 and
/// 2019-09 schemas rarely declare it; a validator without it reads 2020-12).
const DRAFTS: &[(&str, &str)] = &[
    ("draft2020-12", "https://json-schema.org/draft/2020-12/schema"),
    ("draft2019-09", "https://json-schema.org/draft/2019-09/schema"),
    ("draft7", "http://json-schema.org/draft-07/schema#"),
];

/// SQLSTATEs a refused schema may carry: unsupported, or malformed.
const REFUSALS: &[&str] = &["0A000", "22023"];

/// `schema` moved under `/properties/v` of an object schema of draft `declared`, its local
/// `$ref`s pointing where they pointed; `None` where moving could change its meaning (a dynamic
/// or remote reference, an `$id` below a root that has none). A schema with an absolute `$id` of
/// its own is a schema resource wherever it stands: it moves as it is, an embedded resource of
/// the wrapper, its references still read against that `$id` and its dynamic scope the same (the
/// wrapper has no dynamic anchors) — not in draft-07 when the root has a `$ref`: there the
/// `$ref`'s siblings, the `$id` too, are ignored.
fn wrapped(schema: &Value, declared: &str) -> Option<Value> {
    fn movable(value: &Value, resource: bool) -> bool {
        match value {
            Value::Object(members) => members.iter().all(|(key, member)| {
                let dynamic = !resource
                    && matches!(
                        key.as_str(),
                        "$dynamicRef" | "$recursiveRef" | "$dynamicAnchor" | "$recursiveAnchor"
                    );
                let relative = !resource
                    && (key == "$id"
                        || (key == "$ref" && member.as_str().is_some_and(|r| !r.starts_with('#'))));
                !dynamic && !relative && movable(member, resource)
            }),
            Value::Array(items) => items.iter().all(|item| movable(item, resource)),
            _ => true,
        }
    }
    fn moved(value: &mut Value) {
        match value {
            Value::Object(members) => {
                for (key, member) in members.iter_mut() {
                    match (key.as_str(), member.as_str()) {
                        ("$ref", Some("#")) => *member = Value::from("#/properties/v"),
                        ("$ref", Some(r)) if r.starts_with("#/") => {
                            *member = Value::from(format!("#/properties/v{}", &r[1..]));
                        }
                        _ => moved(member),
                    }
                }
            }
            Value::Array(items) => items.iter_mut().for_each(moved),
            _ => {}
        }
    }
    let draft = schema.get("$schema").and_then(Value::as_str).unwrap_or(declared);
    let resource = schema
        .get("$id")
        .and_then(Value::as_str)
        .is_some_and(|id| id.contains("://") || id.starts_with("urn:"))
        && !(draft.contains("draft-07") && schema.get("$ref").is_some());
    if !movable(schema, resource) {
        return None;
    }
    let mut inner = schema.clone();
    if let Some(members) = inner.as_object_mut() {
        members.remove("$schema");
    }
    if !resource {
        moved(&mut inner);
    }
    Some(serde_json::json!({
        "$schema": schema.get("$schema").cloned().unwrap_or_else(|| Value::from(declared)),
        "type": "object",
        "required": ["v"],
        "properties": {"v": inner}
    }))
}

fn suite_dir() -> Result<PathBuf> {
    let dir = std::env::var_os("CQRS_JSON_SCHEMA_SUITE")
        .map(PathBuf::from)
        .unwrap_or_else(|| repo_root().join("target/json-schema-test-suite/tests"));
    if !dir.join("draft2020-12").is_dir() {
        bail!(
            "the JSON-Schema-Test-Suite is not at {} (scripts/setup.sh fetches it)",
            dir.display()
        );
    }
    Ok(dir)
}

/// The suite's files of one draft, the optional ones included, in a stable order.
fn files(dir: &Path) -> Result<Vec<PathBuf>> {
    let mut out = Vec::new();
    for sub in [
        dir.to_path_buf(),
        dir.join("optional"),
        dir.join("optional/format"),
    ] {
        let Ok(entries) = std::fs::read_dir(&sub) else {
            continue;
        };
        for entry in entries {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "json") {
                out.push(path);
            }
        }
    }
    out.sort();
    Ok(out)
}

/// What an edition says of a registration or an append: accepted, or its SQLSTATE and message.
type Outcome = std::result::Result<(), (String, String)>;

fn outcome(result: std::result::Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>) -> Outcome {
    result.map(|_| ()).map_err(|err| {
        (
            err.code().map(|c| c.code().to_owned()).unwrap_or_default(),
            err.as_db_error()
                .map(|d| d.message().to_owned())
                .unwrap_or_else(|| err.to_string()),
        )
    })
}

/// Registers `schema` and appends each payload, each in a savepoint: the registration's outcome
/// and each payload's (valid or not) when it registered.
async fn verdicts(client: &Client, schema: &Value, payloads: &[&Value]) -> Result<(Outcome, Vec<bool>)> {
    client.batch_execute("begin").await?;
    let registered = outcome(
        client
            .query("select cqrs.register_command_type('T', $1)", &[schema])
            .await,
    );
    let mut valid = Vec::new();
    if registered.is_ok() {
        for payload in payloads {
            client.batch_execute("savepoint one").await?;
            let appended = outcome(
                client
                    .query(
                        "select cqrs.append(gen_random_uuid(), 's', 'T', $1::jsonb)",
                        &[payload],
                    )
                    .await,
            );
            client.batch_execute("rollback to savepoint one").await?;
            match appended {
                Ok(()) => valid.push(true),
                Err((code, _)) if code == "22023" => valid.push(false),
                Err((code, message)) => bail!("append failed with {code}: {message}"),
            }
        }
    }
    client.batch_execute("rollback").await?;
    Ok((registered, valid))
}

/// The portable edition's compiled validator of `schema` against its interpreter, on every
/// payload: the payloads on which their violations differ (appends run the compiled one; the
/// interpreter judges what it does not write out, and when it is missing).
async fn compiled_against_interpreter(
    client: &Client,
    schema: &Value,
    payloads: &[&Value],
) -> Result<Vec<String>> {
    client.batch_execute("begin").await?;
    let mut differences = Vec::new();
    if client
        .query("select cqrs.register_command_type('T', $1)", &[schema])
        .await
        .is_ok()
    {
        let function: String = client
            .query_one(
                "select v.function::text from cqrs_portable.validator v where v.command_type = 'T'",
                &[],
            )
            .await
            .context("no compiled validator")?
            .get(0);
        // a name the compiler made ('_v_' and an md5), written into the query
        ensure!(
            function.len() == 35
                && function.starts_with("_v_")
                && function[3..].bytes().all(|b| b.is_ascii_hexdigit()),
            "unexpected validator name {function}"
        );
        let query = format!(
            "select cqrs_portable.{function}($1, $2, 6), cqrs_portable._schema_violations($2, $1, 6)"
        );
        for payload in payloads {
            let row = client.query_one(query.as_str(), &[payload, schema]).await?;
            let (compiled, interpreted): (Vec<String>, Vec<String>) = (row.get(0), row.get(1));
            if compiled != interpreted {
                differences.push(format!(
                    "payload {payload}: compiled {compiled:?}, interpreted {interpreted:?}"
                ));
            }
        }
    }
    client.batch_execute("rollback").await?;
    Ok(differences)
}

#[derive(Default)]
struct Tally {
    groups: usize,
    extension_accepts: usize,
    portable_accepts: usize,
    cases: usize,
    extension_right: usize,
    compared: usize,
    interpreted: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_portable_edition_gives_the_suites_verdicts_where_the_extension_does() -> Result<()> {
    let suite = suite_dir()?;
    let extension_pg = cluster(Edition::Extension, ClusterOptions::default())?;
    let portable_pg = cluster(Edition::Portable, ClusterOptions::default())?;
    let (extension, portable) = (
        connect(&extension_pg.url()).await?,
        connect(&portable_pg.url()).await?,
    );
    let mut failures = Vec::new();
    let mut refused_by_portable: std::collections::BTreeMap<String, usize> = Default::default();
    for (draft, declared) in DRAFTS {
        let (mut objects_tally, mut wrapped_tally) = (Tally::default(), Tally::default());
        for file in files(&suite.join(draft))? {
            let name = file.strip_prefix(&suite).unwrap_or(&file).display().to_string();
            let groups: Vec<Value> =
                serde_json::from_str(&std::fs::read_to_string(&file)?).with_context(|| name.clone())?;
            for group in &groups {
                let mut schema = group["schema"].clone();
                if let Some(members) = schema.as_object_mut() {
                    members.entry("$schema").or_insert_with(|| Value::from(*declared));
                }
                let what = format!("{name}: {}", group["description"].as_str().unwrap_or_default());
                let all: Vec<&Value> = group["tests"]
                    .as_array()
                    .map(|t| t.iter().collect())
                    .unwrap_or_default();
                let objects: Vec<(&Value, Value)> = all
                    .iter()
                    .filter(|c| c["data"].is_object())
                    .map(|c| (*c, c["data"].clone()))
                    .collect();
                let others: Vec<(&Value, Value)> = all
                    .iter()
                    .filter(|c| !c["data"].is_object())
                    .map(|c| (*c, serde_json::json!({"v": c["data"]})))
                    .collect();
                let mut tries = vec![(schema.clone(), objects, &mut objects_tally)];
                if let Some(outer) = wrapped(&schema, declared) {
                    tries.push((outer, others, &mut wrapped_tally));
                }
                for (schema, cases, tally) in tries {
                    if cases.is_empty() {
                        continue;
                    }
                    tally.groups += 1;
                    let payloads: Vec<&Value> = cases.iter().map(|(_, p)| p).collect();
                    let (ext_registered, ext_valid) = verdicts(&extension, &schema, &payloads).await?;
                    let (por_registered, por_valid) = verdicts(&portable, &schema, &payloads).await?;
                    if por_registered.is_ok() {
                        tally.interpreted += payloads.len();
                        for difference in compiled_against_interpreter(&portable, &schema, &payloads).await? {
                            failures.push(format!(
                                "{what}: the compiled validator and the interpreter differ: {difference}"
                            ));
                        }
                    }
                    if let Err((code, message)) = &por_registered {
                        // a raw error of the validator (one PostgreSQL's jsonb raises for both
                        // editions, such as \u0000 in a string, is not the validator's)
                        let same_as_extension = ext_registered.as_ref().err().is_some_and(|(c, _)| c == code);
                        if !REFUSALS.contains(&code.as_str()) && !same_as_extension {
                            failures.push(format!("{what}: registration raised {code}: {message}"));
                        }
                        *refused_by_portable
                            .entry(message.chars().take(110).collect())
                            .or_default() += 1;
                    }
                    tally.extension_accepts += usize::from(ext_registered.is_ok());
                    tally.portable_accepts += usize::from(por_registered.is_ok());
                    for (i, (case, payload)) in cases.iter().enumerate() {
                        tally.cases += 1;
                        let expected = case["valid"].as_bool().unwrap_or(false);
                        let Some(&ext) = ext_valid.get(i) else {
                            continue;
                        };
                        if ext != expected {
                            continue;
                        }
                        tally.extension_right += 1;
                        let Some(&por) = por_valid.get(i) else {
                            continue;
                        };
                        tally.compared += 1;
                        if por != expected {
                            failures.push(format!(
                                "{what} / {}: the suite and the extension say {}, the portable edition {}\n  schema {schema}\n  payload {payload}",
                                case["description"].as_str().unwrap_or_default(),
                                if expected { "valid" } else { "invalid" },
                                if por { "valid" } else { "invalid" },
                            ));
                        }
                    }
                }
            }
        }
        for (kind, tally) in [
            ("object payloads", &objects_tally),
            ("other payloads, wrapped", &wrapped_tally),
        ] {
            eprintln!(
                "{draft}, {kind}: {} groups; schemas accepted: extension {}, portable {}; \
                 {} cases, the extension right on {}, compared with the portable edition {}; \
                 the compiled validator compared with the interpreter on {}",
                tally.groups,
                tally.extension_accepts,
                tally.portable_accepts,
                tally.cases,
                tally.extension_right,
                tally.compared,
                tally.interpreted
            );
        }
    }
    for (message, count) in &refused_by_portable {
        eprintln!("  portable refuses {count}×: {message}");
    }
    if !failures.is_empty() {
        bail!(
            "{} disagreements with the suite:\n{}",
            failures.len(),
            failures.join("\n")
        );
    }
    Ok(())
}
