//! `GET /metrics`: the daemon's Prometheus endpoint. A scrape reads the
//! kernel's counters for the plan in force (held through the published
//! handle, never copied) and encodes the metrics; it takes no lock the
//! reconcile loop holds.

use std::{sync::Arc, time::Duration};

use tokio::sync::watch;

use super::{metrics::Metrics, Enforced};
use crate::paths::InstancePaths;

/// What a scrape reads.
#[derive(Clone)]
pub(super) struct Scrape {
    pub(super) paths: InstancePaths,
    pub(super) metrics: Arc<Metrics>,
    pub(super) published: watch::Receiver<Arc<Enforced>>,
}

impl Scrape {
    fn body(&self) -> String {
        let enforced = self.published.borrow().clone();
        if let Some(plan) = &enforced.plan {
            let layers = crate::engine::layers();
            self.metrics
                .refresh(&layers, &self.paths, plan, &enforced.packet_base);
        }
        self.metrics.encode()
    }
}

/// Scrapes served at once; a connection beyond them is closed at once (a
/// flood of idle connections cannot take the daemon's file descriptors,
/// and a real scrape gets through as soon as one is free).
const METRICS_CONNECTIONS: usize = 16;
/// A whole request (headers in, response out) gets this long.
const METRICS_DEADLINE: Duration = Duration::from_secs(5);

pub(super) async fn serve(listener: tokio::net::TcpListener, scrape: Scrape) {
    use hyper_util::rt::{TokioIo, TokioTimer};
    let permits = Arc::new(tokio::sync::Semaphore::new(METRICS_CONNECTIONS));
    loop {
        let conn = match listener.accept().await {
            Ok((conn, _)) => conn,
            Err(e) => {
                // Out of file descriptors (or another transient error):
                // back off instead of spinning on accept.
                log::warn!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
        };
        let Ok(permit) = permits.clone().try_acquire_owned() else {
            drop(conn);
            continue;
        };
        let scrape = scrape.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let service = hyper::service::service_fn(move |req| {
                let response = metrics_response(&scrape, &req);
                async move { Ok::<_, std::convert::Infallible>(response) }
            });
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(METRICS_DEADLINE)
                .keep_alive(false)
                .max_buf_size(16 * 1024)
                .serve_connection(TokioIo::new(conn), service);
            // A slow or idle client loses its connection at the deadline.
            let _ = tokio::time::timeout(METRICS_DEADLINE, served).await;
        });
    }
}

/// `GET /metrics`: OpenMetrics text; anything else 404 (405 for another
/// method on /metrics).
fn metrics_response(
    scrape: &Scrape,
    req: &hyper::Request<hyper::body::Incoming>,
) -> hyper::Response<http_body_util::Full<hyper::body::Bytes>> {
    use hyper::{header, Method, Response, StatusCode};
    let empty = |status: StatusCode| {
        let mut r = Response::new(http_body_util::Full::default());
        *r.status_mut() = status;
        r
    };
    if req.uri().path() != "/metrics" {
        return empty(StatusCode::NOT_FOUND);
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        return empty(StatusCode::METHOD_NOT_ALLOWED);
    }
    let body = scrape.body();
    let mut r = Response::new(http_body_util::Full::new(hyper::body::Bytes::from(body)));
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        header::HeaderValue::from_static(
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        ),
    );
    r
}
