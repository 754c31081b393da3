//! A real OTLP/HTTP trace receiver for the tests and the demo: it accepts `POST /v1/traces` with
//! the binary protobuf body OTLP exporters send, decodes it with the protocol's own generated
//! messages (`opentelemetry-proto`, not anything of the sidecar's) and keeps every span it
//! received. Started with an upstream, it also passes every request it accepted, as received, to
//! that collector (Jaeger, Tempo, an OpenTelemetry Collector), so the demo can print a trace and
//! the operator can still look at it in their own tool. It can send spans of its own too (the
//! demo's application spans), encoded with the same messages.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result};
use axum::body::Bytes;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use axum::Router;
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use prost::Message;

/// Attributes as (key, value as text).
pub type Attributes = Vec<(String, String)>;

/// A link as received: (trace id, span id, attributes).
pub type Link = (String, String, Attributes);

/// A span as received, with the service that sent it.
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub service: String,
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    pub start_unix_nano: u64,
    pub end_unix_nano: u64,
    pub attributes: Attributes,
    pub links: Vec<Link>,
    /// the status code (0 unset, 1 ok, 2 error)
    pub status: i32,
}

impl ReceivedSpan {
    pub fn attribute(&self, key: &str) -> Option<&str> {
        self.attributes
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn millis(&self) -> f64 {
        self.end_unix_nano.saturating_sub(self.start_unix_nano) as f64 / 1e6
    }
}

fn text(value: Option<&opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match value.and_then(|v| v.value.as_ref()) {
        Some(AnyValue::StringValue(s)) => s.clone(),
        Some(AnyValue::IntValue(i)) => i.to_string(),
        Some(AnyValue::BoolValue(b)) => b.to_string(),
        Some(AnyValue::DoubleValue(d)) => d.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

fn pairs(attributes: &[KeyValue]) -> Attributes {
    attributes
        .iter()
        .map(|kv| (kv.key.clone(), text(kv.value.as_ref())))
        .collect()
}

/// The collector every accepted request is passed on to, and how that went.
struct Upstream {
    url: String,
    client: reqwest::Client,
    accepted: AtomicU64,
    refused: AtomicU64,
    last_refusal: Mutex<Option<String>>,
}

impl Upstream {
    async fn forward(&self, body: Bytes) {
        let answer = self
            .client
            .post(&self.url)
            .header(reqwest::header::CONTENT_TYPE, PROTOBUF)
            .body(body)
            .send()
            .await;
        let refusal = match answer {
            Ok(response) if response.status().is_success() => None,
            Ok(response) => Some(format!("HTTP {}", response.status().as_u16())),
            // the error's kind, not its text with the URL again
            Err(err) if err.is_connect() => Some("cannot connect".to_owned()),
            Err(err) if err.is_timeout() => Some("timed out".to_owned()),
            Err(_) => Some("request failed".to_owned()),
        };
        match refusal {
            None => self.accepted.fetch_add(1, Ordering::Relaxed),
            Some(why) => {
                if let Ok(mut last) = self.last_refusal.lock() {
                    *last = Some(why);
                }
                self.refused.fetch_add(1, Ordering::Relaxed)
            }
        };
    }
}

/// What was forwarded upstream: requests the collector accepted, requests it refused or that
/// never reached it, and why the last one failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub accepted: u64,
    pub refused: u64,
    pub last_refusal: Option<String>,
}

const PROTOBUF: &str = "application/x-protobuf";
const TRACES_PATH: &str = "/v1/traces";

/// OTLP/HTTP's rule for a base endpoint (`OTEL_EXPORTER_OTLP_ENDPOINT`): the signal's path is
/// appended; a URL that already names it is used as it is.
fn traces_url(endpoint: &str) -> String {
    let endpoint = endpoint.trim_end_matches('/');
    if endpoint.ends_with(TRACES_PATH) {
        endpoint.to_owned()
    } else {
        format!("{endpoint}{TRACES_PATH}")
    }
}

#[derive(Clone)]
struct Shared {
    spans: Arc<Mutex<Vec<ReceivedSpan>>>,
    upstream: Option<Arc<Upstream>>,
}

async fn receive(State(shared): State<Shared>, body: Bytes) -> (StatusCode, Vec<u8>) {
    let Ok(request) = ExportTraceServiceRequest::decode(body.clone()) else {
        return (StatusCode::BAD_REQUEST, Vec::new());
    };
    // passed on before it is answered, so what this receiver holds has been offered upstream
    if let Some(upstream) = &shared.upstream {
        upstream.forward(body).await;
    }
    let mut received = Vec::new();
    for resource_spans in request.resource_spans {
        let service = resource_spans
            .resource
            .as_ref()
            .and_then(|r| r.attributes.iter().find(|kv| kv.key == "service.name"))
            .map(|kv| text(kv.value.as_ref()))
            .unwrap_or_default();
        for scope in resource_spans.scope_spans {
            for span in scope.spans {
                received.push(ReceivedSpan {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent_span_id: hex::encode(&span.parent_span_id),
                    start_unix_nano: span.start_time_unix_nano,
                    end_unix_nano: span.end_time_unix_nano,
                    attributes: pairs(&span.attributes),
                    links: span
                        .links
                        .iter()
                        .map(|l| {
                            (
                                hex::encode(&l.trace_id),
                                hex::encode(&l.span_id),
                                pairs(&l.attributes),
                            )
                        })
                        .collect(),
                    status: span.status.map_or(0, |s| s.code),
                });
            }
        }
    }
    if let Ok(mut spans) = shared.spans.lock() {
        spans.extend(received);
    }
    (
        StatusCode::OK,
        ExportTraceServiceResponse::default().encode_to_vec(),
    )
}

/// The running receiver (it stops with the runtime).
pub struct OtlpReceiver {
    port: u16,
    shared: Shared,
}

impl OtlpReceiver {
    pub async fn start() -> Result<Self> {
        Self::serve(None).await
    }

    /// A receiver that passes every request it accepts on to `endpoint` (a collector's OTLP/HTTP
    /// base URL such as `http://localhost:4318`, or its full `…/v1/traces` URL).
    pub async fn start_forwarding(endpoint: &str) -> Result<Self> {
        let url = traces_url(endpoint);
        reqwest::Url::parse(&url).with_context(|| format!("the OTLP endpoint {endpoint:?}"))?;
        let client = reqwest::Client::builder()
            .timeout(std::time::Duration::from_secs(10))
            .build()
            .context("building the HTTP client that forwards spans")?;
        Self::serve(Some(Arc::new(Upstream {
            url,
            client,
            accepted: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            last_refusal: Mutex::new(None),
        })))
        .await
    }

    async fn serve(upstream: Option<Arc<Upstream>>) -> Result<Self> {
        let shared = Shared {
            spans: Arc::default(),
            upstream,
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .context("binding the OTLP receiver")?;
        let port = listener.local_addr()?.port();
        let app = Router::new()
            .route(TRACES_PATH, post(receive))
            .with_state(shared.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Ok(Self { port, shared })
    }

    /// Where this receiver forwards to (the full `/v1/traces` URL), if anywhere.
    pub fn upstream(&self) -> Option<&str> {
        self.shared.upstream.as_ref().map(|u| u.url.as_str())
    }

    /// How forwarding went so far (all zero without an upstream).
    pub fn forwarded(&self) -> Forwarded {
        self.shared
            .upstream
            .as_ref()
            .map(|u| Forwarded {
                accepted: u.accepted.load(Ordering::Relaxed),
                refused: u.refused.load(Ordering::Relaxed),
                last_refusal: u.last_refusal.lock().ok().and_then(|l| l.clone()),
            })
            .unwrap_or_default()
    }

    /// Sends `spans` as `service` to this receiver over OTLP/HTTP, as an exporter would: they are
    /// kept (and forwarded) like the sidecar's.
    pub async fn export(&self, service: &str, spans: &[OutgoingSpan]) -> Result<()> {
        let response = reqwest::Client::new()
            .post(format!("{}{TRACES_PATH}", self.endpoint()))
            .header(reqwest::header::CONTENT_TYPE, PROTOBUF)
            .body(encode(service, spans))
            .send()
            .await
            .context("exporting spans to the OTLP receiver")?;
        anyhow::ensure!(
            response.status().is_success(),
            "the OTLP receiver answered {}",
            response.status()
        );
        Ok(())
    }

    /// The base URL to give an exporter (`--otlp-endpoint`).
    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn spans(&self) -> Vec<ReceivedSpan> {
        self.shared.spans.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// A span of the application's own (the demo's), to be exported.
#[derive(Debug, Clone)]
pub struct OutgoingSpan {
    pub trace_id: [u8; 16],
    pub span_id: [u8; 8],
    pub parent_span_id: Option<[u8; 8]>,
    pub name: String,
    pub kind: SpanKind,
    pub start: SystemTime,
    pub end: SystemTime,
    pub attributes: Vec<(String, String)>,
}

pub use opentelemetry_proto::tonic::trace::v1::span::SpanKind;

fn unix_nanos(at: SystemTime) -> u64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn key_values(pairs: &[(String, String)]) -> Vec<KeyValue> {
    pairs
        .iter()
        .map(|(key, value)| KeyValue {
            key: key.clone(),
            value: Some(opentelemetry_proto::tonic::common::v1::AnyValue {
                value: Some(AnyValue::StringValue(value.clone())),
            }),
            ..Default::default()
        })
        .collect()
}

/// One export request (`ExportTraceServiceRequest`, protobuf) holding `spans` of `service`.
fn encode(service: &str, spans: &[OutgoingSpan]) -> Vec<u8> {
    use opentelemetry_proto::tonic::resource::v1::Resource;
    use opentelemetry_proto::tonic::trace::v1::{ResourceSpans, ScopeSpans, Span};
    let spans = spans
        .iter()
        .map(|span| Span {
            trace_id: span.trace_id.to_vec(),
            span_id: span.span_id.to_vec(),
            parent_span_id: span.parent_span_id.map(|p| p.to_vec()).unwrap_or_default(),
            name: span.name.clone(),
            kind: span.kind as i32,
            start_time_unix_nano: unix_nanos(span.start),
            end_time_unix_nano: unix_nanos(span.end),
            attributes: key_values(&span.attributes),
            ..Default::default()
        })
        .collect();
    ExportTraceServiceRequest {
        resource_spans: vec![ResourceSpans {
            resource: Some(Resource {
                attributes: key_values(&[("service.name".to_owned(), service.to_owned())]),
                ..Default::default()
            }),
            scope_spans: vec![ScopeSpans {
                spans,
                ..Default::default()
            }],
            ..Default::default()
        }],
    }
    .encode_to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_base_endpoint_gets_the_traces_path_and_a_full_one_is_kept() {
        assert_eq!(traces_url("http://c:4318"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/"), "http://c:4318/v1/traces");
        assert_eq!(traces_url("http://c:4318/v1/traces"), "http://c:4318/v1/traces");
    }

    /// Spans sent through one receiver that forwards to another arrive at both, as sent; a
    /// collector that is not there is counted as refused, with why.
    #[tokio::test]
    async fn what_a_forwarding_receiver_accepts_reaches_its_upstream() -> Result<()> {
        let collector = OtlpReceiver::start().await?;
        let demo = OtlpReceiver::start_forwarding(&collector.endpoint()).await?;
        let now = SystemTime::now();
        let span = OutgoingSpan {
            trace_id: [7; 16],
            span_id: [8; 8],
            parent_span_id: Some([9; 8]),
            name: "place order".to_owned(),
            kind: SpanKind::Client,
            start: now,
            end: now + std::time::Duration::from_millis(3),
            attributes: vec![("order".to_owned(), "o-1".to_owned())],
        };
        demo.export("demo", std::slice::from_ref(&span)).await?;
        for receiver in [&demo, &collector] {
            let spans = receiver.spans();
            assert_eq!(spans.len(), 1);
            let got = &spans[0];
            assert_eq!(got.service, "demo");
            assert_eq!(got.name, "place order");
            assert_eq!(got.trace_id, hex::encode([7u8; 16]));
            assert_eq!(got.parent_span_id, hex::encode([9u8; 8]));
            assert_eq!(got.attribute("order"), Some("o-1"));
            assert!((got.millis() - 3.0).abs() < 0.01, "{}", got.millis());
        }
        assert_eq!(
            demo.forwarded(),
            Forwarded {
                accepted: 1,
                refused: 0,
                last_refusal: None
            }
        );
        assert_eq!(collector.forwarded(), Forwarded::default());

        // a port nobody listens on (bound, then let go)
        let gone = tokio::net::TcpListener::bind("127.0.0.1:0").await?.local_addr()?;
        let lonely = OtlpReceiver::start_forwarding(&format!("http://{gone}")).await?;
        lonely.export("demo", &[span]).await?;
        assert_eq!(lonely.spans().len(), 1);
        let forwarded = lonely.forwarded();
        assert_eq!((forwarded.accepted, forwarded.refused), (0, 1));
        assert_eq!(forwarded.last_refusal.as_deref(), Some("cannot connect"));
        Ok(())
    }
}
