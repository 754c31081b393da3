//! What `--sink NAME=URL` says: the sink's name, its broker, which events it takes and where
//! they go. `nats://host:port/?stream=CQRS&subject=cqrs.{type}&types=A,B&stream_prefix=order-`.

use std::fmt;

use cqrs_projection::name::group;

/// The subject every event goes to unless the URL names another: `{type}` is the command type.
pub const DEFAULT_SUBJECT: &str = "cqrs.events.{type}";
/// The JetStream stream unless the URL names another.
pub const DEFAULT_JS_STREAM: &str = "CQRS_EVENTS";

/// One configured sink.
#[derive(Clone, PartialEq, Eq)]
pub struct SinkSpec {
    pub name: String,
    /// the broker's address, without the options below (credentials stay in it)
    pub url: String,
    /// the subject template (`{type}`: the command type)
    pub subject: String,
    /// the JetStream stream the subjects belong to (created when missing)
    pub js_stream: String,
    /// only these command types (all when empty)
    pub types: Vec<String>,
    /// only streams starting with this
    pub stream_prefix: Option<String>,
}

impl fmt::Debug for SinkSpec {
    // the URL may carry credentials: only its host part is shown
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkSpec")
            .field("name", &self.name)
            .field("broker", &self.broker())
            .field("subject", &self.subject)
            .field("js_stream", &self.js_stream)
            .field("types", &self.types)
            .field("stream_prefix", &self.stream_prefix)
            .finish()
    }
}

impl SinkSpec {
    /// `host:port` of the broker, for logs (no credentials).
    pub fn broker(&self) -> String {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        host.trim_end_matches('/').to_owned()
    }

    /// Whether the sink takes an event of `stream` and `command_type`.
    pub fn takes(&self, stream: &str, command_type: &str) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t == command_type))
            && self
                .stream_prefix
                .as_deref()
                .is_none_or(|p| stream.starts_with(p))
    }

    /// The subject of an event of `command_type`: the template with `{type}` replaced by the
    /// type, each character a subject token may not hold (`.`, `*`, `>`, whitespace) as `_`.
    pub fn subject_of(&self, command_type: &str) -> String {
        let token: String = command_type
            .chars()
            .map(|c| {
                if c == '.' || c == '*' || c == '>' || c.is_whitespace() {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        self.subject.replace("{type}", &token)
    }

    /// The subjects the JetStream stream must hold: the template's part before `{type}`, with `>`.
    pub fn js_subjects(&self) -> String {
        match self.subject.split_once("{type}") {
            Some((head, _)) => format!("{head}>"),
            None => self.subject.clone(),
        }
    }
}

/// Parses `NAME=URL`.
pub fn parse(text: &str) -> Result<SinkSpec, String> {
    let (name, url) = text
        .split_once('=')
        .ok_or_else(|| format!("a sink is NAME=URL (nats://host:port/?…), not {text:?}"))?;
    if !group::is_valid(name) {
        return Err(format!("{name:?} cannot name a sink: {}", group::RULE));
    }
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| format!("sink {name}: {url:?} is not a URL"))?;
    match scheme {
        "nats" | "tls" => {}
        "kafka" => {
            return Err(format!(
                "sink {name}: Kafka sinks are not built yet (only nats:// and tls:// JetStream sinks are)"
            ))
        }
        other => {
            return Err(format!(
                "sink {name}: unknown broker scheme {other:?} (nats:// or tls://)"
            ))
        }
    }
    let (address, query) = url.split_once('?').unwrap_or((url, ""));
    let mut spec = SinkSpec {
        name: name.to_owned(),
        url: address.to_owned(),
        subject: DEFAULT_SUBJECT.to_owned(),
        js_stream: DEFAULT_JS_STREAM.to_owned(),
        types: Vec::new(),
        stream_prefix: None,
    };
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("sink {name}: {key} is not UTF-8"))?
            .into_owned();
        match key {
            "subject" if !value.is_empty() => spec.subject = value,
            "stream" if !value.is_empty() => spec.js_stream = value,
            "types" => {
                spec.types = value
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            "stream_prefix" if !value.is_empty() => spec.stream_prefix = Some(value),
            _ => {
                return Err(format!(
                    "sink {name}: unknown or empty option {key:?} (subject, stream, types, stream_prefix)"
                ))
            }
        }
    }
    if spec.subject.contains(['*', '>', ' ']) || spec.subject.starts_with('.') || spec.subject.ends_with('.')
    {
        return Err(format!(
            "sink {name}: subject {:?} is not a subject template",
            spec.subject
        ));
    }
    Ok(spec)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sink_url_names_its_broker_subject_and_filter() {
        let spec = parse("orders=nats://app:s3cret@127.0.0.1:4222/?subject=shop.{type}&types=CREATE_ORDER,SHIP_ORDER&stream_prefix=order-&stream=SHOP")
            .expect("a sink");
        assert_eq!(spec.name, "orders");
        assert_eq!(spec.broker(), "127.0.0.1:4222");
        assert!(!format!("{spec:?}").contains("s3cret"));
        assert_eq!(spec.subject_of("CREATE_ORDER"), "shop.CREATE_ORDER");
        assert_eq!(spec.subject_of("a.b c"), "shop.a_b_c");
        assert_eq!(spec.js_subjects(), "shop.>");
        assert_eq!(spec.js_stream, "SHOP");
        assert!(spec.takes("order-1", "SHIP_ORDER"));
        assert!(!spec.takes("order-1", "ADD_ITEM"));
        assert!(!spec.takes("user-1", "SHIP_ORDER"));
        let all = parse("all=nats://127.0.0.1:4222").expect("defaults");
        assert_eq!(all.subject_of("X"), "cqrs.events.X");
        assert!(all.takes("any", "X"));
        for bad in [
            "nats://x",
            "Bad=nats://x",
            "k=kafka://x:9092",
            "s=http://x",
            "s=nats://x/?colour=red",
            "s=nats://x/?subject=a.*",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }
}
