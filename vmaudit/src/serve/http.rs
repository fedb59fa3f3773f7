//! The HTTP endpoints of `--serve` (axum):
//!
//! - `/`: the dashboard (with `/dashboard.js`, `/dashboard.css`), embedded in the binary.
//! - `/metrics`: Prometheus metrics, OpenMetrics text.
//! - `/api/state`: a JSON snapshot (VMs or processes, fd tables, recent verdicts, totals, the
//!   history) with the sequence number of the last event it includes.
//! - `/events`: server-sent events, one JSON object each (`type`: `vm`, `fd`, `claim`,
//!   `verdict`, `gap`, `decision`); an event named `resync` tells a client that fell behind to
//!   read the state again.

use std::{convert::Infallible, sync::Arc};

use axum::{
    Router,
    extract::State,
    http::header,
    response::{
        Html, IntoResponse,
        sse::{Event, KeepAlive, Sse},
    },
    routing::get,
};
use futures::Stream;
use tokio::sync::broadcast::error::RecvError;

use super::Hub;

const INDEX: &str = include_str!("dashboard/index.html");
const JS: &str = include_str!("dashboard/dashboard.js");
const CSS: &str = include_str!("dashboard/dashboard.css");

/// Content type of prometheus-client's text encoding.
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

pub fn router(hub: Arc<Hub>) -> Router {
    Router::new()
        .route("/", get(|| async { Html(INDEX) }))
        .route(
            "/dashboard.js",
            get(|| async {
                (
                    [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
                    JS,
                )
            }),
        )
        .route(
            "/dashboard.css",
            get(|| async { ([(header::CONTENT_TYPE, "text/css; charset=utf-8")], CSS) }),
        )
        .route("/metrics", get(metrics))
        .route("/api/state", get(state))
        .route("/events", get(events))
        .with_state(hub)
}

async fn metrics(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, OPENMETRICS)], hub.metrics_text())
}

async fn state(State(hub): State<Arc<Hub>>) -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "application/json")],
        hub.state_json(),
    )
}

async fn events(State(hub): State<Arc<Hub>>) -> Sse<impl Stream<Item = Result<Event, Infallible>>> {
    let rx = hub.subscribe();
    let stream = futures::stream::unfold(rx, |mut rx| async move {
        let ev = match rx.recv().await {
            Ok(json) => Event::default().data(&*json),
            Err(RecvError::Lagged(_)) => Event::default().event("resync").data("{}"),
            Err(RecvError::Closed) => return None,
        };
        Some((Ok(ev), rx))
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
