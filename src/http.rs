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

/// Serves `router` on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    router: Router,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    axum::serve(listener, router)
        .with_graceful_shutdown(shutdown)
        .await
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
