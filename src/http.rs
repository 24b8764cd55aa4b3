//! HTTP on its own port (axum): `/health/live` for probes, without auth; `/health` with the
//! role `runtime.health:read`; `/metrics` (Prometheus text) with `runtime.health:read` and
//! `runtime.metrics:read`. Role tokens are HS256 tokens with a `roles` claim, minted by
//! `ringvault token issue --http`, signed with `http.token_secret`. Missing or invalid token →
//! 401; valid token without the role → 403.

use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::extract::State;
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use serde_json::json;

use crate::auth::{bearer_token, Revocations, SignedTokens};
use crate::error::Kind;

/// Role that reads `/health`.
pub const HEALTH_ROLE: &str = "runtime.health:read";
/// Role that, with [`HEALTH_ROLE`], reads `/metrics`.
pub const METRICS_ROLE: &str = "runtime.metrics:read";

/// How often histogram samples are folded into their buckets.
const METRICS_UPKEEP_PERIOD: Duration = Duration::from_secs(5);

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let seconds = [
                0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05,
                0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
            ];
            let builder = PrometheusBuilder::new()
                .set_buckets(&seconds)
                .expect("static bucket list is not empty");
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Histogram samples pile up in the recorder until upkeep folds them into the
            // buckets: without it, memory grows by every sample of every request between
            // scrapes (forever, when nobody scrapes).
            let upkeep = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || loop {
                    std::thread::sleep(METRICS_UPKEEP_PERIOD);
                    upkeep.run_upkeep();
                });
            if let Err(error) = spawned {
                tracing::warn!(%error, "cannot start the metrics upkeep thread");
            }
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!(
                    "a metrics recorder was installed already; /metrics shows none of ringvault's"
                );
            }
            handle
        })
        .clone()
}

/// What `/health` reports, gathered on each call.
pub trait HealthSource: Send + Sync + 'static {
    /// A JSON report and whether everything is up.
    fn report(&self) -> (serde_json::Value, bool);
    /// Sets gauges that are read rather than counted, just before a scrape.
    fn update_gauges(&self) {}
}

#[derive(Clone)]
struct HttpState {
    tokens: Arc<SignedTokens>,
    /// The service's revocations: `ringvault token revoke` reaches role tokens too.
    revocations: Arc<Revocations>,
    health: Arc<dyn HealthSource>,
    metrics: PrometheusHandle,
}

/// The router of the health and metrics endpoints.
pub fn router(
    tokens: SignedTokens,
    revocations: Arc<Revocations>,
    health: Arc<dyn HealthSource>,
) -> Router {
    let state = HttpState {
        tokens: Arc::new(tokens),
        revocations,
        health,
        metrics: metrics_handle(),
    };
    Router::new()
        .route("/health/live", get(live))
        .route("/health", get(health_report))
        .route("/metrics", get(metrics_text))
        .with_state(state)
}

/// Bounds on the connections of the HTTP port, which is open to whoever can reach it
/// (`/health/live` needs no token). Without them, connections that send nothing, or a byte
/// now and then, would each hold a file descriptor and a task for good, until the process ran
/// out of descriptors and NATS, storage and the file store failed with it.
#[derive(Debug, Clone, Copy)]
pub struct ConnectionLimits {
    /// Connections served at once; further ones wait to be accepted.
    pub max_connections: usize,
    /// Connections served at once from one address; further ones are closed as they come, so
    /// that one client cannot take every slot and keep the probes out.
    pub max_per_peer: usize,
    /// How long a request's headers may take to arrive, counted from when the connection
    /// starts waiting for them (so an idle kept-alive connection is closed after it too).
    pub header_read_timeout: Duration,
}

impl Default for ConnectionLimits {
    fn default() -> Self {
        Self {
            max_connections: 64,
            max_per_peer: 8,
            header_read_timeout: Duration::from_secs(10),
        }
    }
}

/// Requests' headers are read into a buffer of at most this size (hyper's floor is 8 KiB).
const MAX_READ_BUFFER: usize = 16 * 1024;

/// Serves `router` on `listener` until `shutdown` completes, within the default
/// [`ConnectionLimits`].
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    serve_within(listener, router, ConnectionLimits::default(), shutdown).await
}

/// [`serve`] within `limits`. On `shutdown` it stops accepting, lets requests in progress
/// finish and closes idle connections.
pub async fn serve_within(
    listener: tokio::net::TcpListener,
    router: Router,
    limits: ConnectionLimits,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    let slots = Arc::new(tokio::sync::Semaphore::new(limits.max_connections.max(1)));
    let peers = Arc::new(PeerCounts::default());
    let (closing, closing_seen) = tokio::sync::watch::channel(false);
    let mut connections = tokio::task::JoinSet::new();
    tokio::pin!(shutdown);
    'serving: loop {
        // A slot first: at the cap, connections wait in the listen backlog, not in a task.
        let slot = tokio::select! {
            () = &mut shutdown => break,
            slot = slots.clone().acquire_owned() => match slot {
                Ok(slot) => slot,
                Err(_) => break,
            },
        };
        let (stream, peer) = loop {
            tokio::select! {
                () = &mut shutdown => break 'serving,
                accepted = listener.accept() => match accepted {
                    Ok((stream, address)) => {
                        match PeerCounts::enter(&peers, address.ip(), limits.max_per_peer) {
                            Some(peer) => break (stream, peer),
                            // Closed at once, and the slot kept for the next one.
                            None => drop(stream),
                        }
                    }
                    Err(error) => {
                        // Out of descriptors, or a connection reset before it was taken:
                        // neither ends the server; a pause keeps a persistent one from
                        // spinning.
                        tracing::warn!(%error, "http: cannot accept a connection");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                },
            }
        };
        while connections.try_join_next().is_some() {}
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        let mut closing_seen = closing_seen.clone();
        connections.spawn(async move {
            let _slot = slot;
            let _peer = peer;
            let connection = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(limits.header_read_timeout)
                .max_buf_size(MAX_READ_BUFFER)
                .serve_connection(hyper_util::rt::TokioIo::new(stream), service);
            tokio::pin!(connection);
            tokio::select! {
                _ = connection.as_mut() => return,
                _ = closing_seen.wait_for(|closing| *closing) => {
                    connection.as_mut().graceful_shutdown();
                }
            }
            let _ = connection.await;
        });
    }
    // Refused from here on, rather than left waiting in the backlog through the shutdown.
    drop(listener);
    let _ = closing.send(true);
    while connections.join_next().await.is_some() {}
    Ok(())
}

/// Connections open per peer address.
#[derive(Default)]
struct PeerCounts(std::sync::Mutex<std::collections::HashMap<std::net::IpAddr, usize>>);

impl PeerCounts {
    /// Counts a connection from `address` unless it has `limit` open already; the guard
    /// counts it out when dropped.
    fn enter(counts: &Arc<Self>, address: std::net::IpAddr, limit: usize) -> Option<PeerGuard> {
        let mut open = crate::lock_ignoring_poison(&counts.0);
        let count = open.entry(address).or_insert(0);
        if *count >= limit.max(1) {
            return None;
        }
        *count += 1;
        Some(PeerGuard {
            counts: counts.clone(),
            address,
        })
    }
}

/// One counted connection of a peer.
struct PeerGuard {
    counts: Arc<PeerCounts>,
    address: std::net::IpAddr,
}

impl Drop for PeerGuard {
    fn drop(&mut self) {
        let mut open = crate::lock_ignoring_poison(&self.counts.0);
        if let Some(count) = open.get_mut(&self.address) {
            *count -= 1;
            if *count == 0 {
                open.remove(&self.address);
            }
        }
    }
}

async fn live() -> &'static str {
    "ok"
}

/// Why a request was refused: the status and the error body.
struct Refusal {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        let body = json!({ "code": self.code, "message": self.message });
        (self.status, Json(body)).into_response()
    }
}

fn refusal(status: StatusCode, code: &'static str, message: String) -> Refusal {
    Refusal {
        status,
        code,
        message,
    }
}

/// Checks the bearer token for every one of `roles`.
fn authorize(state: &HttpState, headers: &HeaderMap, roles: &[&str]) -> Result<(), Refusal> {
    let authorization = headers
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok());
    let claims = bearer_token(authorization)
        .and_then(|token| {
            let claims = state.tokens.verify(token)?;
            state
                .revocations
                .refuse_if_revoked(token, claims.jti.as_deref())?;
            Ok(claims)
        })
        .map_err(|error| {
            // `unavailable` (the stored revocations not loaded yet) is the service's state,
            // not the caller's failure: 503, as a probe should see it.
            if error.kind() != Kind::Unavailable {
                metrics::counter!("ringvault_auth_failures_total", "code" => error.kind().code())
                    .increment(1);
            }
            refusal(
                StatusCode::from_u16(error.kind().status()).unwrap_or(StatusCode::UNAUTHORIZED),
                error.kind().code(),
                error.message().to_owned(),
            )
        })?;
    if let Some(missing) = roles
        .iter()
        .find(|role| !claims.roles.iter().any(|held| held == *role))
    {
        metrics::counter!("ringvault_auth_failures_total", "code" => Kind::AccessDenied.code())
            .increment(1);
        return Err(refusal(
            StatusCode::FORBIDDEN,
            Kind::AccessDenied.code(),
            format!("{} lacks the role {missing}", claims.sub),
        ));
    }
    Ok(())
}

async fn health_report(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers, &[HEALTH_ROLE]) {
        return refused.into_response();
    }
    let (report, healthy) = state.health.report();
    let status = if healthy {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (status, Json(report)).into_response()
}

async fn metrics_text(State(state): State<HttpState>, headers: HeaderMap) -> Response {
    if let Err(refused) = authorize(&state, &headers, &[HEALTH_ROLE, METRICS_ROLE]) {
        return refused.into_response();
    }
    state.health.update_gauges();
    (
        [(header::CONTENT_TYPE, "text/plain; version=0.0.4")],
        state.metrics.render(),
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
    use tokio::net::TcpStream;

    /// `/health/live` served within `limits` on a free loopback port until `shutdown`: its
    /// address, and the server's task.
    async fn serve_live(
        limits: ConnectionLimits,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> (
        std::net::SocketAddr,
        tokio::task::JoinHandle<std::io::Result<()>>,
    ) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let router = Router::new().route("/health/live", get(live));
        let server = tokio::spawn(serve_within(listener, router, limits, shutdown));
        (address, server)
    }

    /// Reads until the peer closes; `None` if it stays open for `within`.
    async fn closed_within(stream: &mut TcpStream, within: Duration) -> Option<Vec<u8>> {
        let mut received = Vec::new();
        tokio::time::timeout(within, stream.read_to_end(&mut received))
            .await
            .ok()
            .map(|_| received)
    }

    #[tokio::test]
    async fn request_headers_over_the_read_buffer_are_refused() {
        let (address, _server) =
            serve_live(ConnectionLimits::default(), std::future::pending()).await;
        let mut stream = TcpStream::connect(address).await.unwrap();
        let filler = "a".repeat(MAX_READ_BUFFER + 1024);
        let request = format!("GET /health/live HTTP/1.1\r\nHost: x\r\nX-Filler: {filler}\r\n\r\n");
        // The server may answer and close before it has read all of it.
        let _ = stream.write_all(request.as_bytes()).await;
        let answer = closed_within(&mut stream, Duration::from_secs(5))
            .await
            .expect("answered and closed");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer}");
    }

    /// One address gets `max_per_peer` connections at once; more are closed as they come,
    /// leaving the other slots to other clients (the probes).
    #[tokio::test]
    async fn one_peer_cannot_take_every_slot() {
        let limits = ConnectionLimits {
            max_connections: 8,
            max_per_peer: 2,
            header_read_timeout: Duration::from_secs(30),
        };
        let (address, _server) = serve_live(limits, std::future::pending()).await;
        let mut held = Vec::new();
        for _ in 0..2 {
            let mut stream = TcpStream::connect(address).await.unwrap();
            stream
                .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                .await
                .unwrap();
            let mut first_byte = [0u8; 1];
            // Answered (kept alive): the connection is counted.
            tokio::time::timeout(Duration::from_secs(5), stream.peek(&mut first_byte))
                .await
                .expect("answered")
                .unwrap();
            held.push(stream);
        }
        let mut third = TcpStream::connect(address).await.unwrap();
        let closed = closed_within(&mut third, Duration::from_secs(5)).await;
        assert_eq!(
            closed,
            Some(Vec::new()),
            "a third connection from one peer was served"
        );
        // One closes: once the server has seen it, the peer may connect again.
        drop(held.pop());
        let mut answered = false;
        for _ in 0..50 {
            let mut again = TcpStream::connect(address).await.unwrap();
            again
                .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
                .await
                .unwrap();
            let answer = closed_within(&mut again, Duration::from_secs(5)).await;
            if answer.is_some_and(|answer| answer.starts_with(b"HTTP/1.1 200")) {
                answered = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(answered, "the peer's slot was not given back");
    }

    /// Connections that send nothing are closed after the header-read timeout, and while they
    /// fill every slot, a new connection waits for one instead of being served beside them.
    #[tokio::test]
    async fn silent_connections_are_closed_and_counted_against_the_cap() {
        let limits = ConnectionLimits {
            max_connections: 2,
            max_per_peer: 3,
            header_read_timeout: Duration::from_millis(400),
        };
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let (address, server) = serve_live(limits, async move {
            let _ = stopped.await;
        })
        .await;
        let mut silent = Vec::new();
        for _ in 0..2 {
            silent.push(TcpStream::connect(address).await.unwrap());
        }
        let mut probe = TcpStream::connect(address).await.unwrap();
        probe
            .write_all(b"GET /health/live HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .unwrap();
        // Both slots are taken for the whole timeout: nothing answers the probe before it.
        let mut first_byte = [0u8; 1];
        let early = tokio::time::timeout(Duration::from_millis(150), probe.peek(&mut first_byte));
        assert!(early.await.is_err(), "served beyond the connection cap");
        for stream in &mut silent {
            let closed = closed_within(stream, Duration::from_secs(5)).await;
            assert_eq!(closed, Some(Vec::new()), "a silent connection stayed open");
        }
        let answer = closed_within(&mut probe, Duration::from_secs(5))
            .await
            .expect("the probe is answered once a slot is free");
        let answer = String::from_utf8_lossy(&answer);
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("ok"), "{answer}");
        let _ = stop.send(());
        tokio::time::timeout(Duration::from_secs(5), server)
            .await
            .expect("the server stops")
            .unwrap()
            .unwrap();
    }
}
