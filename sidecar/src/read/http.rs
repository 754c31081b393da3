//! The read API's HTTP handler: `GET /v1/projections/{name}/{key}[?after=stream:seq&timeout_ms=n]`,
//! a read-model row as JSON, with its revision as the ETag and where it came from in
//! `X-Cqrs-Source`.
//!
//! 200 the row; 304 when `If-None-Match` names the current revision; 400 bad input; 401 no or
//! bad credentials (with `WWW-Authenticate: Bearer`); 404 no such row (`"error": "not_found"`),
//! or a row the caller does not own, or no such projection (`"error": "unknown_projection"`),
//! or one that is not exposed or not the caller's — all answered alike; 429 the caller holds as
//! many read-your-writes waits as it may; 503 neither Redis nor PostgreSQL could answer, the API
//! is at capacity, or the projection is halted (with `Retry-After`); 504 `after` was not applied
//! within the timeout. No body says anything of rows or streams the caller may not read, nor
//! carries a database error's text (which can hold command values).
//!
//! Order of checks: the request's shape, the credentials, the projection (exposed, and listed
//! for the caller) — all before anything is read or waited for — then the row's owner.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::extract::rejection::{PathRejection, QueryRejection};
use axum::extract::{Path, Query, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use serde_json::json;

use super::access::{self, Ownership};
use super::auth::{Caller, Denial};
use super::cache_aside::{Found, ReadError, Source};
use super::shedding::{self, Shedding};
use super::waits::{Outcome, Refused};
use super::ReadState;
use crate::metrics::label;
use crate::traces;
use opentelemetry::trace::TraceContextExt;
use tracing::Instrument;
use tracing_opentelemetry::OpenTelemetrySpanExt;

/// Longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 1024;
/// Default and largest read-your-writes wait.
const DEFAULT_WAIT: Duration = Duration::from_millis(2_000);
const MAX_WAIT: Duration = Duration::from_secs(30);

/// Header naming where the answer came from: `cache`, `postgres` or `postgres_cache_down`.
pub const SOURCE_HEADER: &str = "x-cqrs-source";

#[derive(Debug, serde::Deserialize)]
pub struct ReadQuery {
    after: Option<String>,
    timeout_ms: Option<String>,
}

/// What a request asks for, validated.
#[derive(Debug, PartialEq)]
struct Request {
    projection: String,
    key: String,
    after: Option<(String, i64)>,
    timeout: Duration,
}

fn validate(projection: String, key: String, query: ReadQuery) -> Result<Request, String> {
    if !cqrs_projection::name::is_valid(&projection) {
        return Err(format!("a projection name has {}", cqrs_projection::name::RULE));
    }
    if key.is_empty() || key.len() > MAX_KEY_BYTES {
        return Err(format!("a key has 1 to {MAX_KEY_BYTES} bytes"));
    }
    if key.contains('\0') || projection.contains('\0') {
        return Err("keys and names cannot contain NUL".into());
    }
    let after = match query.after {
        None => None,
        Some(after) => {
            // the stream may itself contain ':'; the seq is after the last one
            let (stream, seq) = after
                .rsplit_once(':')
                .ok_or_else(|| format!("after must be stream:seq, not {after:?}"))?;
            let seq: i64 = seq
                .parse()
                .ok()
                .filter(|seq| *seq > 0)
                .ok_or_else(|| format!("the seq in after={after:?} must be a positive integer"))?;
            if stream.is_empty() || stream.len() > 256 || stream.contains('\0') {
                return Err("the stream in after must have 1 to 256 bytes".into());
            }
            Some((stream.to_owned(), seq))
        }
    };
    let timeout = match query.timeout_ms {
        None => DEFAULT_WAIT,
        Some(ms) => {
            let ms: u64 = ms
                .parse()
                .map_err(|_| format!("timeout_ms must be a whole number of milliseconds, not {ms:?}"))?;
            let timeout = Duration::from_millis(ms);
            if timeout > MAX_WAIT {
                return Err(format!("timeout_ms is at most {}", MAX_WAIT.as_millis()));
            }
            timeout
        }
    };
    Ok(Request {
        projection,
        key,
        after,
        timeout,
    })
}

fn error(status: StatusCode, code: &str, message: String) -> Response {
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        json!({"error": code, "message": message}).to_string(),
    )
        .into_response()
}

fn etag(rev: i64) -> String {
    format!("\"{rev}\"")
}

/// Whether `If-None-Match` names `tag` (or is `*`).
fn not_modified(headers: &HeaderMap, tag: &str) -> bool {
    headers
        .get_all(header::IF_NONE_MATCH)
        .iter()
        .filter_map(|value| value.to_str().ok())
        .flat_map(|value| value.split(','))
        .map(|candidate| candidate.trim().trim_start_matches("W/"))
        .any(|candidate| candidate == tag || candidate == "*")
}

fn respond(found: Found, request: &Request, headers: &HeaderMap) -> (Response, &'static str) {
    let source = HeaderValue::from_static(found.source.label());
    let Some(doc) = found.doc else {
        let mut response = error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("{} has no row with key {:?}", request.projection, request.key),
        );
        response.headers_mut().insert(SOURCE_HEADER, source);
        return (response, label::READ_NOT_FOUND);
    };
    let tag = etag(found.rev);
    let tag_value = HeaderValue::from_str(&tag).unwrap_or_else(|_| HeaderValue::from_static("\"0\""));
    let mut response = if not_modified(headers, &tag) {
        StatusCode::NOT_MODIFIED.into_response()
    } else {
        ([(header::CONTENT_TYPE, "application/json")], doc).into_response()
    };
    let outcome = if response.status() == StatusCode::NOT_MODIFIED {
        label::READ_NOT_MODIFIED
    } else {
        label::READ_OK
    };
    let headers = response.headers_mut();
    headers.insert(header::ETAG, tag_value);
    headers.insert(SOURCE_HEADER, source);
    if found.source == Source::PostgresCacheDown {
        headers.insert("x-cqrs-cache", HeaderValue::from_static("unavailable"));
    }
    (response, outcome)
}

/// A projection that does not exist; also what an unexposed one, or one the caller may not
/// read, answers (no way to probe which exist).
fn unknown_projection(name: &str) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "unknown_projection",
        format!("there is no projection named {name:?}"),
    )
}

/// 401 with the Bearer challenge; the body says what to send, never which check failed.
fn unauthorized(denial: Denial) -> Response {
    let mut response = error(
        StatusCode::UNAUTHORIZED,
        "unauthorized",
        "send Authorization: Bearer <API key or JWT>".to_owned(),
    );
    let challenge = match denial.challenge() {
        "" => "Bearer realm=\"cqrs-read\"".to_owned(),
        code => format!("Bearer realm=\"cqrs-read\", error=\"{code}\""),
    };
    if let Ok(value) = HeaderValue::from_str(&challenge) {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, value);
    }
    response
}

/// A response that asks the client to come back in a second.
fn retry_later(status: StatusCode, code: &str, message: String) -> Response {
    let mut response = error(status, code, message);
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

fn failure(err: ReadError) -> (Response, &'static str) {
    match err {
        ReadError::UnknownProjection(name) => (unknown_projection(&name), label::READ_UNKNOWN_PROJECTION),
        ReadError::BadRequest(message) => (
            error(StatusCode::BAD_REQUEST, "bad_request", message),
            label::READ_BAD_REQUEST,
        ),
        ReadError::Unavailable(message) => (
            retry_later(StatusCode::SERVICE_UNAVAILABLE, "unavailable", message),
            label::READ_UNAVAILABLE,
        ),
    }
}

/// How a read-your-writes wait that did not end in the command being applied is answered.
fn wait_failure(
    outcome: Outcome,
    request: &Request,
    seconds_behind: Option<f64>,
) -> (Response, &'static str) {
    match outcome {
        Outcome::Halted => (
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "projection_halted",
                format!(
                    "projection {} is halted: it applies nothing until an operator resumes it",
                    request.projection
                ),
            ),
            label::READ_HALTED,
        ),
        Outcome::UnknownProjection => (
            unknown_projection(&request.projection),
            label::READ_UNKNOWN_PROJECTION,
        ),
        Outcome::Unavailable => (
            retry_later(
                StatusCode::SERVICE_UNAVAILABLE,
                "unavailable",
                "PostgreSQL could not be asked whether the command is applied".to_owned(),
            ),
            label::READ_UNAVAILABLE,
        ),
        Outcome::TimedOut | Outcome::Applied(_) => {
            let (stream, seq) = request.after.clone().unwrap_or_default();
            // nothing of the stream's progress: the caller may not read every row of it
            let body = json!({
                "error": "timeout",
                "message": format!(
                    "{} had not applied {stream}:{seq} after {} ms",
                    request.projection, request.timeout.as_millis()
                ),
                "projection": request.projection,
                "stream": stream,
                "seq": seq,
                "seconds_behind": seconds_behind,
            });
            (
                (
                    StatusCode::GATEWAY_TIMEOUT,
                    [(header::CONTENT_TYPE, "application/json")],
                    body.to_string(),
                )
                    .into_response(),
                label::READ_TIMEOUT,
            )
        }
    }
}

fn too_many_waits(refused: Refused) -> (Response, &'static str) {
    let status = match refused {
        Refused::CallerFull => StatusCode::TOO_MANY_REQUESTS,
        Refused::Full => StatusCode::SERVICE_UNAVAILABLE,
    };
    (
        retry_later(status, "too_many_waits", refused.to_string()),
        label::READ_TOO_MANY_WAITS,
    )
}

/// Why a request is refused before anything is read.
enum Refusal {
    Unauthorized(Denial),
    /// not exposed, or not the caller's: answered as an unknown projection
    Hidden,
}

impl Refusal {
    fn response(self, projection: &str) -> (Response, &'static str) {
        match self {
            Refusal::Unauthorized(denial) => (unauthorized(denial), label::READ_UNAUTHORIZED),
            Refusal::Hidden => (unknown_projection(projection), label::READ_UNKNOWN_PROJECTION),
        }
    }
}

/// The caller, if its credentials hold and it may read `projection`, with the projection's row
/// rule.
fn authorize<'a>(
    state: &'a ReadState,
    projection: &str,
    headers: &HeaderMap,
) -> Result<(Caller, Option<&'a Ownership>), Refusal> {
    let caller = match &state.auth {
        None => Caller::Anyone,
        Some(auth) => {
            let authorization = headers
                .get(header::AUTHORIZATION)
                .and_then(|value| value.to_str().ok());
            auth.authenticate(authorization).map_err(|denial| {
                state.denials.unauthorized(denial, projection);
                Refusal::Unauthorized(denial)
            })?
        }
    };
    match state.exposure.may_read(&caller, projection) {
        Some(rule) => Ok((caller, rule)),
        None => {
            state.denials.projection_not_allowed(projection);
            Err(Refusal::Hidden)
        }
    }
}

/// The row, after waiting for `after` when the request has one.
async fn fetch(
    state: &ReadState,
    request: &Request,
    caller: &Caller,
) -> Result<Found, (Response, &'static str)> {
    let Some((stream, seq)) = &request.after else {
        return state
            .reader
            .get(&request.projection, &request.key)
            .await
            .map_err(failure);
    };
    let traced_wait = if traces::enabled() {
        tracing::info_span!(traces::READ_WAIT, seq = *seq)
    } else {
        tracing::Span::none()
    };
    let outcome = state
        .waits
        .wait(
            &caller.identity(),
            &request.projection,
            stream,
            *seq,
            request.timeout,
        )
        .instrument(traced_wait)
        .await
        .map_err(too_many_waits)?;
    let Outcome::Applied(position) = outcome else {
        let behind = if outcome == Outcome::TimedOut {
            state.reader.seconds_behind(&request.projection).await
        } else {
            None
        };
        return Err(wait_failure(outcome, request, behind));
    };
    // applied: read it from PostgreSQL — a replica that has replayed as far, or the primary —
    // (the cache may not have it yet) and fill the cache
    state
        .reader
        .get_fresh(&request.projection, &request.key, position)
        .await
        .map_err(failure)
}

/// Serves one read (see the module's documentation), in a span that continues the caller's
/// `traceparent` when traces are exported.
async fn get_row(
    state: State<ReadState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    if !traces::enabled() {
        return serve(state, path, query, headers).await;
    }
    let span = tracing::info_span!(
        traces::READ,
        otel.kind = "server",
        http.request.method = "GET",
        http.route = ROUTE,
        http.response.status_code = tracing::field::Empty,
        cqrs.read.outcome = tracing::field::Empty,
        cqrs.read.source = tracing::field::Empty,
    );
    let traceparent = headers.get(TRACEPARENT).and_then(|value| value.to_str().ok());
    let tracestate = headers.get(TRACESTATE).and_then(|value| value.to_str().ok());
    if let Some(caller) = traceparent.and_then(|parent| traces::remote_context(parent, tracestate)) {
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(caller));
    }
    let response = serve(state, path, query, headers).instrument(span.clone()).await;
    span.record("http.response.status_code", response.status().as_u16());
    response
}

async fn serve(
    State(state): State<ReadState>,
    path: Result<Path<(String, String)>, PathRejection>,
    query: Result<Query<ReadQuery>, QueryRejection>,
    headers: HeaderMap,
) -> Response {
    let started = Instant::now();
    let request = match (path, query) {
        (Ok(Path((projection, key))), Ok(Query(query))) => validate(projection, key, query),
        (Err(rejection), _) => Err(format!("bad path: {}", rejection.body_text())),
        (_, Err(rejection)) => Err(format!("bad query: {}", rejection.body_text())),
    };
    let (response, outcome, source) = match request {
        Err(message) => (
            error(StatusCode::BAD_REQUEST, "bad_request", message),
            label::READ_BAD_REQUEST,
            label::SOURCE_NONE,
        ),
        Ok(request) => match authorize(&state, &request.projection, &headers) {
            Err(refusal) => {
                let (response, outcome) = refusal.response(&request.projection);
                (response, outcome, label::SOURCE_NONE)
            }
            Ok((caller, rule)) => {
                let rule = rule.cloned();
                match fetch(&state, &request, &caller).await {
                    Ok(mut found) => {
                        let source = found.source.label();
                        // another subject's row answers like no row, from the cache or not
                        if let Some(doc) = &found.doc {
                            if !access::owns(&caller, rule.as_ref(), doc) {
                                state.denials.row_not_owned(&request.projection);
                                found.doc = None;
                            }
                        }
                        let (mut response, outcome) = respond(found, &request, &headers);
                        // under a row rule, a 404 does not say where it came from: a row in
                        // the cache that is someone else's would otherwise differ from no row
                        if rule.is_some() && response.status() == StatusCode::NOT_FOUND {
                            response.headers_mut().remove(SOURCE_HEADER);
                        }
                        (response, outcome, source)
                    }
                    Err((response, outcome)) => (response, outcome, label::SOURCE_NONE),
                }
            }
        },
    };
    let span = tracing::Span::current();
    span.record("cqrs.read.outcome", outcome);
    span.record("cqrs.read.source", source);
    state
        .metrics
        .read_requests
        .with_label_values(&[outcome, source])
        .inc();
    state
        .metrics
        .read_duration
        .with_label_values(&[source])
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The read API's one route.
const ROUTE: &str = "/v1/projections/{name}/{key}";
/// W3C Trace Context's request headers.
const TRACEPARENT: &str = "traceparent";
const TRACESTATE: &str = "tracestate";

/// The read API: `GET /v1/projections/{name}/{key}`, behind `shedding`.
pub fn router(state: ReadState, shedding: Arc<Shedding>) -> Router {
    Router::new()
        .route(ROUTE, get(get_row))
        .with_state(state)
        .layer(axum::middleware::from_fn_with_state(shedding, shedding::shed))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn query(after: Option<&str>, timeout_ms: Option<&str>) -> ReadQuery {
        ReadQuery {
            after: after.map(str::to_owned),
            timeout_ms: timeout_ms.map(str::to_owned),
        }
    }

    #[test]
    fn requests_are_validated() {
        let ok = validate(
            "orders".into(),
            "order-1".into(),
            query(Some("order:1:7"), Some("150")),
        )
        .unwrap();
        assert_eq!(ok.after, Some(("order:1".to_owned(), 7)));
        assert_eq!(ok.timeout, Duration::from_millis(150));
        assert_eq!(
            validate("o".into(), "k".into(), query(None, None))
                .unwrap()
                .timeout,
            DEFAULT_WAIT
        );
        for (name, key, q) in [
            ("o", "k".repeat(MAX_KEY_BYTES + 1), query(None, None)),
            ("o", String::new(), query(None, None)),
            ("o", "a\0b".into(), query(None, None)),
            ("o", "k".into(), query(Some("no-seq"), None)),
            ("o", "k".into(), query(Some("s:0"), None)),
            ("o", "k".into(), query(Some("s:-1"), None)),
            ("o", "k".into(), query(Some(":1"), None)),
            ("o", "k".into(), query(None, Some("soon"))),
            ("o", "k".into(), query(None, Some("600000"))),
        ] {
            assert!(validate(name.into(), key.clone(), q).is_err(), "{key:?} accepted");
        }
        assert!(validate("x".repeat(64), "k".into(), query(None, None)).is_err());
    }

    #[test]
    fn if_none_match() {
        let mut headers = HeaderMap::new();
        assert!(!not_modified(&headers, "\"3\""));
        headers.insert(header::IF_NONE_MATCH, HeaderValue::from_static("\"2\", W/\"3\""));
        assert!(not_modified(&headers, "\"3\""));
        assert!(!not_modified(&headers, "\"4\""));
    }
}
