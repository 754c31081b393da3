//! What `--sink NAME=URL` says: the sink's name, its broker, which events it takes and where
//! they go. `nats://host:4222/?stream=CQRS&subject=cqrs.{type}&types=A,B&stream_prefix=order-`
//! or `kafka://host:9092,host2:9092/?topic=cqrs.events&transactional=true&partitions=6`.

use std::fmt;

use cqrs_projection::name::group;

/// The NATS subject every event goes to unless the URL names another: `{type}` is the command type.
pub const DEFAULT_SUBJECT: &str = "cqrs.events.{type}";
/// The JetStream stream unless the URL names another.
pub const DEFAULT_JS_STREAM: &str = "CQRS_EVENTS";
/// The Kafka topic unless the URL names another. One topic keyed by stream keeps each stream's
/// events in one partition, in order; a `{type}` in the template orders them per type only.
pub const DEFAULT_TOPIC: &str = "cqrs.events";
/// Partitions of a topic the sink creates.
pub const DEFAULT_PARTITIONS: i32 = 6;
/// Kafka's longest topic name.
const TOPIC_MAX_LEN: usize = 249;

/// Which broker a sink delivers to, with what only that broker has.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BrokerKind {
    /// NATS JetStream; `js_stream` holds the sink's subjects (created when missing).
    Nats { js_stream: String },
    /// Kafka (any broker speaking its protocol). `transactional`: each delivery is one Kafka
    /// transaction under the `transactional.id` `cqrs-<sink>`, so read_committed consumers never
    /// see part of one and a deposed leader's producer is fenced by the broker too.
    Kafka { transactional: bool, partitions: i32 },
}

/// One configured sink.
#[derive(Clone, PartialEq, Eq)]
pub struct SinkSpec {
    pub name: String,
    /// the broker's address, without the options below (NATS credentials stay in it)
    pub url: String,
    pub kind: BrokerKind,
    /// the subject (NATS) or topic (Kafka) template; `{type}`: the command type
    pub destination: String,
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
            .field("kind", &self.kind)
            .field("destination", &self.destination)
            .field("types", &self.types)
            .field("stream_prefix", &self.stream_prefix)
            .finish()
    }
}

impl SinkSpec {
    /// `host:port` of the broker (Kafka: the bootstrap list), for logs and for connecting to
    /// Kafka; never credentials.
    pub fn broker(&self) -> String {
        let rest = self.url.split_once("://").map_or(self.url.as_str(), |(_, r)| r);
        let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
        host.trim_end_matches('/').to_owned()
    }

    /// The broker as OpenTelemetry's `messaging.system` names it.
    pub fn messaging_system(&self) -> &'static str {
        match self.kind {
            BrokerKind::Nats { .. } => "nats",
            BrokerKind::Kafka { .. } => "kafka",
        }
    }

    /// Whether the sink takes an event of `stream` and `command_type`.
    pub fn takes(&self, stream: &str, command_type: &str) -> bool {
        (self.types.is_empty() || self.types.iter().any(|t| t == command_type))
            && self
                .stream_prefix
                .as_deref()
                .is_none_or(|p| stream.starts_with(p))
    }

    /// The subject or topic of an event of `command_type`: the template with `{type}` replaced
    /// by the type, each character the broker does not allow there as `_` (NATS: `.`, `*`, `>`,
    /// whitespace; Kafka: anything but ASCII letters, digits, `.`, `_`, `-`).
    pub fn destination_of(&self, command_type: &str) -> String {
        let kafka = matches!(self.kind, BrokerKind::Kafka { .. });
        let token: String = command_type
            .chars()
            .map(|c| {
                let refused = if kafka {
                    !(c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
                } else {
                    c == '.' || c == '*' || c == '>' || c.is_whitespace()
                };
                if refused {
                    '_'
                } else {
                    c
                }
            })
            .collect();
        let mut destination = self.destination.replace("{type}", &token);
        if kafka {
            destination.truncate(TOPIC_MAX_LEN);
        }
        destination
    }

    /// The subjects the JetStream stream must hold: the template's part before `{type}`, with `>`.
    pub fn js_subjects(&self) -> String {
        match self.destination.split_once("{type}") {
            Some((head, _)) => format!("{head}>"),
            None => self.destination.clone(),
        }
    }
}

/// Parses `NAME=URL`.
pub fn parse(text: &str) -> Result<SinkSpec, String> {
    let (name, url) = text.split_once('=').ok_or_else(|| {
        format!("a sink is NAME=URL (nats://host:4222/?… or kafka://host:9092/?…), not {text:?}")
    })?;
    if !group::is_valid(name) {
        return Err(format!("{name:?} cannot name a sink: {}", group::RULE));
    }
    let (scheme, _) = url
        .split_once("://")
        .ok_or_else(|| format!("sink {name}: {url:?} is not a URL"))?;
    let (address, query) = url.split_once('?').unwrap_or((url, ""));
    let mut spec = SinkSpec {
        name: name.to_owned(),
        url: address.to_owned(),
        kind: match scheme {
            "nats" | "tls" => BrokerKind::Nats {
                js_stream: DEFAULT_JS_STREAM.to_owned(),
            },
            "kafka" => BrokerKind::Kafka {
                transactional: false,
                partitions: DEFAULT_PARTITIONS,
            },
            other => {
                return Err(format!(
                    "sink {name}: unknown broker scheme {other:?} (nats://, tls:// or kafka://)"
                ))
            }
        },
        destination: String::new(),
        types: Vec::new(),
        stream_prefix: None,
    };
    spec.destination = match spec.kind {
        BrokerKind::Nats { .. } => DEFAULT_SUBJECT,
        BrokerKind::Kafka { .. } => DEFAULT_TOPIC,
    }
    .to_owned();
    if matches!(spec.kind, BrokerKind::Kafka { .. }) && address.contains('@') {
        return Err(format!(
            "sink {name}: Kafka credentials (SASL) are not supported yet; use a listener without authentication on a private network"
        ));
    }
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        let value = percent_encoding::percent_decode_str(value)
            .decode_utf8()
            .map_err(|_| format!("sink {name}: {key} is not UTF-8"))?
            .into_owned();
        match (key, &mut spec.kind) {
            ("types", _) => {
                spec.types = value
                    .split(',')
                    .filter(|t| !t.is_empty())
                    .map(str::to_owned)
                    .collect()
            }
            ("stream_prefix", _) if !value.is_empty() => spec.stream_prefix = Some(value),
            ("subject", BrokerKind::Nats { .. }) | ("topic", BrokerKind::Kafka { .. })
                if !value.is_empty() =>
            {
                spec.destination = value
            }
            ("stream", BrokerKind::Nats { js_stream }) if !value.is_empty() => *js_stream = value,
            ("transactional", BrokerKind::Kafka { transactional, .. }) => {
                *transactional = match value.as_str() {
                    "true" => true,
                    "false" => false,
                    _ => return Err(format!("sink {name}: transactional is true or false, not {value:?}")),
                }
            }
            ("partitions", BrokerKind::Kafka { partitions, .. }) => {
                *partitions = value
                    .parse()
                    .ok()
                    .filter(|p| (1..=10_000).contains(p))
                    .ok_or_else(|| format!("sink {name}: partitions is 1 to 10000, not {value:?}"))?
            }
            (_, BrokerKind::Nats { .. }) => {
                return Err(format!(
                    "sink {name}: unknown or empty option {key:?} (subject, stream, types, stream_prefix)"
                ))
            }
            (_, BrokerKind::Kafka { .. }) => {
                return Err(format!(
                    "sink {name}: unknown or empty option {key:?} (topic, transactional, partitions, types, stream_prefix)"
                ))
            }
        }
    }
    let template_ok = match spec.kind {
        BrokerKind::Nats { .. } => {
            !(spec.destination.contains(['*', '>', ' '])
                || spec.destination.starts_with('.')
                || spec.destination.ends_with('.'))
        }
        BrokerKind::Kafka { .. } => {
            let literal = spec.destination.replace("{type}", "");
            !literal.is_empty()
                && spec.destination.len() <= TOPIC_MAX_LEN
                && literal
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '_' || c == '-')
        }
    };
    if !template_ok {
        return Err(format!(
            "sink {name}: {:?} is not a {} template",
            spec.destination,
            match spec.kind {
                BrokerKind::Nats { .. } => "subject",
                BrokerKind::Kafka { .. } => "topic",
            }
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
        assert_eq!(spec.destination_of("CREATE_ORDER"), "shop.CREATE_ORDER");
        assert_eq!(spec.destination_of("a.b c"), "shop.a_b_c");
        assert_eq!(spec.js_subjects(), "shop.>");
        assert_eq!(
            spec.kind,
            BrokerKind::Nats {
                js_stream: "SHOP".to_owned()
            }
        );
        assert!(spec.takes("order-1", "SHIP_ORDER"));
        assert!(!spec.takes("order-1", "ADD_ITEM"));
        assert!(!spec.takes("user-1", "SHIP_ORDER"));
        let all = parse("all=nats://127.0.0.1:4222").expect("defaults");
        assert_eq!(all.destination_of("X"), "cqrs.events.X");
        assert!(all.takes("any", "X"));
        for bad in [
            "nats://x",
            "Bad=nats://x",
            "k=kafka://user:pw@x:9092",
            "k=kafka://x:9092/?subject=a",
            "k=kafka://x:9092/?topic=a/b",
            "k=kafka://x:9092/?transactional=yes",
            "k=kafka://x:9092/?partitions=0",
            "s=http://x",
            "s=nats://x/?colour=red",
            "s=nats://x/?subject=a.*",
        ] {
            assert!(parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_kafka_sink_url_names_its_bootstrap_servers_topic_and_mode() {
        let spec = parse("shop=kafka://10.0.0.1:9092,10.0.0.2:9092/?topic=shop.{type}.v1&transactional=true&partitions=12&types=SHIP_ORDER")
            .expect("a Kafka sink");
        assert_eq!(spec.broker(), "10.0.0.1:9092,10.0.0.2:9092");
        assert_eq!(
            spec.kind,
            BrokerKind::Kafka {
                transactional: true,
                partitions: 12
            }
        );
        assert_eq!(spec.destination_of("SHIP_ORDER"), "shop.SHIP_ORDER.v1");
        assert_eq!(spec.destination_of("a b/ü"), "shop.a_b__.v1");
        assert!(spec.takes("x", "SHIP_ORDER") && !spec.takes("x", "ADD_ITEM"));
        let plain = parse("k=kafka://127.0.0.1:9092").expect("defaults");
        assert_eq!(plain.destination_of("ANY"), DEFAULT_TOPIC);
        assert_eq!(
            plain.kind,
            BrokerKind::Kafka {
                transactional: false,
                partitions: DEFAULT_PARTITIONS
            }
        );
    }
}
