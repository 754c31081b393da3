//! Load shedding for the read API: at most a fixed number of requests in flight, and a request
//! that cannot start within a short queue deadline is answered at once with 503 and
//! `Retry-After`, instead of waiting in a queue that only grows under overload. The requests
//! admitted keep their latency; the excess is shed, not queued.
//!
//! Misses have their own, smaller limit: the PostgreSQL pool of the read path, whose wait
//! deadline (`--read-pg-queue-timeout`) is short too, so reads answered from Redis never wait
//! behind misses.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{header, HeaderValue, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tokio::sync::Semaphore;

use crate::metrics::Metrics;

pub struct Shedding {
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
    metrics: Arc<Metrics>,
}

impl Shedding {
    pub fn new(max_concurrent: usize, queue_timeout: Duration, metrics: Arc<Metrics>) -> Self {
        Self {
            permits: Arc::new(Semaphore::new(max_concurrent.max(1))),
            queue_timeout,
            metrics,
        }
    }
}

/// The body of every 503 for want of capacity: a shed request's, and a connection's refused at
/// accept (`crate::server`).
pub const OVERLOADED_BODY: &str =
    r#"{"error":"overloaded","message":"the read API is at capacity; retry shortly"}"#;

/// The 503 of a shed request.
pub fn overloaded() -> Response {
    let mut response = (
        StatusCode::SERVICE_UNAVAILABLE,
        [(header::CONTENT_TYPE, "application/json")],
        OVERLOADED_BODY,
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    response
}

/// The middleware: lets the request in, or sheds it at once.
pub async fn shed(State(shedding): State<Arc<Shedding>>, request: Request, next: Next) -> Response {
    // a free slot is taken without arming a timer: under load the deadline is only paid by the
    // requests that have to wait
    let permit = match Arc::clone(&shedding.permits).try_acquire_owned() {
        Ok(permit) => permit,
        Err(_) if shedding.queue_timeout.is_zero() => return shed_one(&shedding),
        Err(_) => {
            let waiting = tokio::time::timeout(
                shedding.queue_timeout,
                Arc::clone(&shedding.permits).acquire_owned(),
            );
            match waiting.await {
                Ok(Ok(permit)) => permit,
                _ => return shed_one(&shedding),
            }
        }
    };
    let response = next.run(request).await;
    drop(permit);
    response
}

fn shed_one(shedding: &Shedding) -> Response {
    shedding.metrics.read_shed.inc();
    overloaded()
}
