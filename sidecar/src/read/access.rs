//! What the read API lets each caller see.
//!
//! **Exposure** is a setting of the sidecar (`--expose`), not a property of the projection in
//! the catalog: which read models a public HTTP API serves is a decision about that deployment
//! (two sidecars may serve different audiences), made by whoever runs it, and it needs no schema
//! change or DBA. A projection that is not exposed, or that the caller's credentials do not list,
//! answers exactly like one that does not exist.
//!
//! **Row ownership**, per exposed projection: `user_order_stats:user_id=sub` serves an end user
//! (a JWT) only the rows whose `user_id` equals the token's `sub`; another user's row answers
//! exactly like a missing one. It is checked on the row as served, so cache hits and database
//! reads alike. Services (API keys) read every row of the projections their key lists.

use std::borrow::Cow;
use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Arc;

use serde::de::{DeserializeSeed, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde_json::Value;

use super::auth::Caller;

/// The projections a caller may read: what its API key lists, or its JWT's projections claim.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Projections {
    All,
    /// shared: a caller's list is cloned on every request
    Only(Arc<BTreeSet<String>>),
}

impl Projections {
    pub fn allows(&self, projection: &str) -> bool {
        match self {
            Projections::All => true,
            Projections::Only(names) => names.contains(projection),
        }
    }

    /// `*`, or names separated by commas.
    pub fn parse(list: &str) -> Self {
        if list.trim() == "*" {
            return Projections::All;
        }
        Projections::Only(
            list.split(',')
                .map(str::trim)
                .filter(|name| !name.is_empty())
                .map(str::to_owned)
                .collect::<BTreeSet<_>>()
                .into(),
        )
    }

    /// From a JWT claim: `"*"`, or an array of names (anything else allows nothing).
    pub fn from_claim(claim: Option<&Value>) -> Self {
        match claim {
            Some(Value::String(all)) if all == "*" => Projections::All,
            Some(Value::Array(names)) => Projections::Only(
                names
                    .iter()
                    .filter_map(Value::as_str)
                    .map(str::to_owned)
                    .collect::<BTreeSet<_>>()
                    .into(),
            ),
            _ => Projections::Only(Arc::default()),
        }
    }
}

/// "Column C of the row must equal claim K of the token."
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ownership {
    pub column: String,
    pub claim: String,
}

/// The projections the read API serves.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Exposure {
    /// `*`: every projection, without ownership rules (for development)
    all: bool,
    projections: HashMap<String, Option<Ownership>>,
}

impl Exposure {
    /// `--expose`: entries separated by commas, each `name` or `name:column=claim`, or `*`.
    pub fn parse(spec: &str) -> Result<Self, String> {
        let mut exposure = Exposure::default();
        for entry in spec.split(',').map(str::trim).filter(|e| !e.is_empty()) {
            if entry == "*" {
                exposure.all = true;
                continue;
            }
            let (name, ownership) = match entry.split_once(':') {
                None => (entry, None),
                Some((name, rule)) => {
                    let (column, claim) = rule
                        .split_once('=')
                        .filter(|(c, k)| !c.trim().is_empty() && !k.trim().is_empty())
                        .ok_or_else(|| {
                            format!(
                                "{entry:?}: a row rule is column=claim, e.g. user_order_stats:user_id=sub"
                            )
                        })?;
                    (
                        name,
                        Some(Ownership {
                            column: column.trim().to_owned(),
                            claim: claim.trim().to_owned(),
                        }),
                    )
                }
            };
            let name = name.trim();
            if !cqrs_projection::name::is_valid(name) {
                return Err(format!(
                    "{entry:?}: a projection name has {}",
                    cqrs_projection::name::RULE
                ));
            }
            exposure.projections.insert(name.to_owned(), ownership);
        }
        Ok(exposure)
    }

    pub fn is_empty(&self) -> bool {
        !self.all && self.projections.is_empty()
    }

    pub fn has_ownership_rules(&self) -> bool {
        self.projections.values().any(Option::is_some)
    }

    /// The projections exposed by name (not through `*`).
    pub fn named(&self) -> Vec<String> {
        let mut names: Vec<String> = self.projections.keys().cloned().collect();
        names.sort();
        names
    }

    /// The exposed projections by name, `*` for all (logged at start).
    pub fn names(&self) -> Vec<String> {
        let mut names = self.named();
        if self.all {
            names.insert(0, "*".to_owned());
        }
        names
    }

    /// Whether `caller` may read `projection`, and under which row rule; `None`: it may not
    /// (answered as an unknown projection).
    pub fn may_read(&self, caller: &Caller, projection: &str) -> Option<Option<&Ownership>> {
        let rule = match self.projections.get(projection) {
            Some(rule) => rule.as_ref(),
            None if self.all => None,
            None => return None,
        };
        caller.projections().allows(projection).then_some(rule)
    }
}

/// A JSON scalar as the text it is compared by (strings as they are, numbers and booleans as
/// JSON prints them); `None` for null, arrays and objects, which own nothing.
fn scalar_text(value: &Value) -> Option<String> {
    match value {
        Value::String(text) => Some(text.clone()),
        Value::Number(number) => Some(number.to_string()),
        Value::Bool(flag) => Some(flag.to_string()),
        _ => None,
    }
}

/// Whether `caller` may see the row `doc` (JSON text) of a projection with `rule`.
///
/// The row's column and the token's claim are compared as the text of JSON scalars: a claim
/// `"7"` owns a row whose column is the number `7` (identity providers send subjects as strings,
/// tables often key users by number); `7.0` and `7` are not equal, nor is anything to null, an
/// array or an object.
pub fn owns(caller: &Caller, rule: Option<&Ownership>, doc: &str) -> bool {
    let Some(rule) = rule else { return true };
    match caller {
        // a service key lists whole projections
        Caller::Service { .. } => true,
        // refused at start: a rule without JWTs has no claim to compare with
        Caller::Anyone => false,
        Caller::User { claims, .. } => {
            let Some(claimed) = claims.get(&rule.claim).and_then(scalar_text) else {
                return false;
            };
            let mut reader = serde_json::Deserializer::from_str(doc);
            OneColumn(&rule.column)
                .deserialize(&mut reader)
                .ok()
                .flatten()
                .and_then(|owner| scalar_text(&owner))
                .is_some_and(|owner| owner == claimed)
        }
    }
}

/// Reads one column of a row's JSON and skips the rest unbuilt: the check runs on every read, and
/// building the whole document as a `Value` was most of what row ownership cost.
struct OneColumn<'a>(&'a str);

impl<'de> DeserializeSeed<'de> for OneColumn<'_> {
    type Value = Option<Value>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_map(self)
    }
}

impl<'de> Visitor<'de> for OneColumn<'_> {
    type Value = Option<Value>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("a row as a JSON object")
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        let mut found = None;
        while let Some(key) = map.next_key::<Cow<'de, str>>()? {
            if found.is_none() && key == self.0 {
                found = Some(map.next_value::<Value>()?);
            } else {
                map.next_value::<IgnoredAny>()?;
            }
        }
        Ok(found)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn user(sub: Value, projections: &str) -> Caller {
        Caller::User {
            claims: std::sync::Arc::new(json!({ "sub": sub }).as_object().cloned().unwrap_or_default()),
            projections: Projections::parse(projections),
        }
    }

    #[test]
    fn exposure_and_rules() {
        let exposure = Exposure::parse("order_summary, user_order_stats:user_id=sub").unwrap();
        let alice = user(json!("u-1"), "*");
        assert_eq!(exposure.may_read(&alice, "order_summary"), Some(None));
        let rule = exposure.may_read(&alice, "user_order_stats").flatten().cloned();
        assert_eq!(rule.as_ref().map(|r| r.column.as_str()), Some("user_id"));
        assert_eq!(exposure.may_read(&alice, "secret_ledger"), None);
        let limited = user(json!("u-1"), "order_summary");
        assert_eq!(exposure.may_read(&limited, "user_order_stats"), None);
        assert!(Exposure::parse("x:nocolumn").is_err());
        assert!(Exposure::parse("").unwrap().is_empty());
        assert_eq!(
            Exposure::parse("*").unwrap().may_read(&Caller::Anyone, "any"),
            Some(None)
        );

        let rule = rule.as_ref();
        assert!(owns(&alice, rule, r#"{"user_id": "u-1", "orders": 3}"#));
        assert!(!owns(&alice, rule, r#"{"user_id": "u-2", "orders": 3}"#));
        assert!(!owns(&alice, rule, r#"{"orders": 3}"#));
        assert!(owns(&user(json!(7), "*"), rule, r#"{"user_id": 7}"#));
        assert!(!owns(&user(json!(null), "*"), rule, r#"{"user_id": null}"#));
        // the column is found after nested values and under an escaped name; other shapes fail
        let nested = r#"{"items": [{"user_id": "u-2"}], "meta": {"user_id": "u-2"}, "user\u005fid": "u-1"}"#;
        assert!(owns(&alice, rule, nested));
        assert!(!owns(&alice, rule, r#"["u-1"]"#));
        assert!(!owns(&alice, rule, r#"{"user_id": "u-1""#));
        let service = Caller::Service {
            name: "billing".into(),
            projections: Projections::All,
        };
        assert!(owns(&service, rule, r#"{"user_id": "u-2"}"#));
    }
}
