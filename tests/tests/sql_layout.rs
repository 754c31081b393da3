//! The SQL files keep the rule sql/README.md states: a function's comment and grants sit beside
//! its definition, in the file that defines it, except for the functions both editions implement
//! their own way (in sql/extension/functions.sql and in sql/portable/), whose comment and grants
//! are in sql/core/api.sql. And the extension's version literal is the crate's.

use std::collections::{BTreeMap, BTreeSet};

use anyhow::{ensure, Context, Result};
use cqrs_e2e::repo_root;

const API: &str = "sql/core/api.sql";
const EXTENSION_FUNCTIONS: &str = "sql/extension/functions.sql";

/// The `cqrs.` functions a file defines, comments and grants (or revokes) execute on; each
/// statement starts at column 0 (function bodies are indented, or are not such statements).
#[derive(Default)]
struct Facts {
    defined: BTreeSet<String>,
    commented: BTreeSet<String>,
    granted: BTreeSet<String>,
}

/// The `cqrs.<name>` right before each `(` in `text`.
fn functions_named(text: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = text;
    while let Some(at) = rest.find("cqrs.") {
        let tail = &rest[at + "cqrs.".len()..];
        let name: String = tail
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if tail[name.len()..].starts_with('(') && !name.is_empty() {
            names.push(format!("cqrs.{name}"));
        }
        rest = tail;
    }
    names
}

fn facts(text: &str) -> Facts {
    let mut facts = Facts::default();
    let mut statement: Option<String> = None;
    for line in text.lines() {
        if let Some(open) = statement.as_mut() {
            open.push_str(line);
            open.push('\n');
        } else if line.starts_with("grant execute on function")
            || line.starts_with("revoke execute on function")
        {
            statement = Some(format!("{line}\n"));
        } else if let Some(rest) = line.strip_prefix("create function ") {
            facts.defined.extend(functions_named(rest).into_iter().take(1));
        } else if let Some(rest) = line.strip_prefix("comment on function ") {
            facts.commented.extend(functions_named(rest).into_iter().take(1));
        }
        if statement.as_ref().is_some_and(|s| s.trim_end().ends_with(';')) {
            if let Some(done) = statement.take() {
                facts.granted.extend(functions_named(&done));
            }
        }
    }
    facts
}

#[test]
fn comments_and_grants_sit_where_the_rule_says() -> Result<()> {
    let root = repo_root();
    let mut files = vec![
        "sql/core/command.sql".to_owned(),
        "sql/core/projection.sql".to_owned(),
        "sql/core/outbox.sql".to_owned(),
        EXTENSION_FUNCTIONS.to_owned(),
        API.to_owned(),
    ];
    let mut portable: Vec<String> = std::fs::read_dir(root.join("sql/portable"))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "sql"))
        .map(|p| {
            format!(
                "sql/portable/{}",
                p.file_name().unwrap_or_default().to_string_lossy()
            )
        })
        .collect();
    portable.sort();
    files.extend(portable);
    let mut by_file = BTreeMap::new();
    for file in &files {
        let text = std::fs::read_to_string(root.join(file)).with_context(|| file.clone())?;
        by_file.insert(file.clone(), facts(&text));
    }
    let mut defined_in: BTreeMap<&String, Vec<&String>> = BTreeMap::new();
    for (file, facts) in &by_file {
        for name in &facts.defined {
            defined_in.entry(name).or_default().push(file);
        }
    }
    // the parser must see the files as they are: a layout it cannot read finds nothing to check
    for twin in ["cqrs.append", "cqrs.create_projection", "cqrs.wait_for"] {
        ensure!(
            defined_in.get(&twin.to_owned()).map(Vec::len) == Some(2),
            "{twin} is not defined once per edition: has the layout changed?"
        );
    }
    ensure!(
        defined_in.len() >= 30,
        "found only {} functions: has the layout changed?",
        defined_in.len()
    );
    let mut broken = Vec::new();
    for (name, files) in &defined_in {
        let twins = files.iter().any(|f| f.as_str() == EXTENSION_FUNCTIONS)
            && files.iter().any(|f| f.starts_with("sql/portable/"));
        if files.len() > 1 && !twins {
            broken.push(format!("{name} is defined in {files:?}"));
            continue;
        }
        let home = if twins { API } else { files[0].as_str() };
        let commented: Vec<&String> = by_file
            .iter()
            .filter(|(_, f)| f.commented.contains(*name))
            .map(|(file, _)| file)
            .collect();
        if commented != [home] {
            broken.push(format!(
                "{name}: commented in {commented:?}, not (only) in {home}"
            ));
        }
        let granted: Vec<&String> = by_file
            .iter()
            .filter(|(_, f)| f.granted.contains(*name))
            .map(|(file, _)| file)
            .collect();
        if !granted.is_empty() && granted != [home] {
            broken.push(format!(
                "{name}: granted or revoked in {granted:?}, not (only) in {home}"
            ));
        }
    }
    ensure!(
        broken.is_empty(),
        "sql/README.md's rule is broken:\n{}",
        broken.join("\n")
    );
    Ok(())
}

#[test]
fn the_extension_declares_the_crate_version() -> Result<()> {
    let text = std::fs::read_to_string(repo_root().join(EXTENSION_FUNCTIONS))?;
    let literal = format!(
        "as $$ select '{}'::text, 'extension'::text $$;",
        env!("CARGO_PKG_VERSION")
    );
    ensure!(
        text.contains(&literal),
        "{EXTENSION_FUNCTIONS}: cqrs.version() does not return {} (Cargo.toml's version)",
        env!("CARGO_PKG_VERSION")
    );
    Ok(())
}
