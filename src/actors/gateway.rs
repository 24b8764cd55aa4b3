//! Gateway: the NATS service. It registers one endpoint per method through async-nats' service
//! API (queue group shared by replicas; `$SRV.PING/INFO/STATS` discovery for free) and runs
//! each request in its own task, at most `max_inflight` at once.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::service::{Service, ServiceExt as _};
use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use super::AuthHandle;
use crate::error::{Error, Result};
use crate::protocol::{
    decode, encode, ErrorBody, Format, LivenessResponse, Method, AUTHORIZATION, CONTENT_TYPE,
    JSON_CONTENT_TYPE, REQUEST_ID, SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use crate::rpc::Vault;

/// How long a drain waits for the endpoints to hand over what they had buffered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);

/// What the gateway needs; cloned into each restart.
#[derive(Clone, Debug)]
pub struct GatewayArgs {
    /// The NATS connection.
    pub nats: async_nats::Client,
    /// Subject prefix.
    pub prefix: String,
    /// Queue group.
    pub queue_group: String,
    /// Requests handled at once.
    pub max_inflight: usize,
    /// Authentication.
    pub auth: AuthHandle,
    /// The operations.
    pub vault: Vault,
}

/// Messages of the [`Gateway`].
pub enum GatewayMsg {
    /// Stop taking requests and answer the ones in flight; replies when done.
    Drain(RpcReplyPort<()>),
}

/// The NATS-facing actor.
pub struct Gateway;

/// State of the [`Gateway`].
pub struct GatewayState {
    service: Option<Service>,
    endpoint_loops: Vec<JoinHandle<()>>,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
}

impl Drop for GatewayState {
    fn drop(&mut self) {
        // A gateway that failed leaves no endpoint serving behind it.
        for endpoint_loop in &self.endpoint_loops {
            endpoint_loop.abort();
        }
    }
}

struct RequestContext {
    auth: AuthHandle,
    vault: Vault,
}

impl Actor for Gateway {
    type Msg = GatewayMsg;
    type State = GatewayState;
    type Arguments = GatewayArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let service = args
            .nats
            .service_builder()
            .description("ringvault envelope encryption (vault.v1)")
            .queue_group(&args.queue_group)
            .start("ringvault", env!("CARGO_PKG_VERSION"))
            .await?;
        let group = service.group(&args.prefix);
        let context = Arc::new(RequestContext {
            auth: args.auth.clone(),
            vault: args.vault.clone(),
        });
        let inflight = Arc::new(Semaphore::new(args.max_inflight));
        let mut endpoint_loops = Vec::with_capacity(Method::ALL.len());
        for method in Method::ALL {
            let endpoint = group
                .endpoint_builder()
                .name(method.name())
                .add(method.name())
                .await?;
            endpoint_loops.push(tokio::spawn(serve_endpoint(
                method,
                endpoint,
                context.clone(),
                inflight.clone(),
            )));
        }
        tracing::info!(
            prefix = args.prefix,
            queue_group = args.queue_group,
            max_inflight = args.max_inflight,
            "serving the vault api on nats"
        );
        Ok(GatewayState {
            service: Some(service),
            endpoint_loops,
            inflight,
            max_inflight: args.max_inflight,
        })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            GatewayMsg::Drain(reply) => {
                drain(state).await;
                let _ = reply.send(());
            }
        }
        Ok(())
    }
}

async fn drain(state: &mut GatewayState) {
    if let Some(service) = state.service.take() {
        if let Err(error) = service.stop().await {
            tracing::warn!(%error, "stopping the nats service failed");
        }
    }
    let loops = std::mem::take(&mut state.endpoint_loops);
    let finished = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(loops)).await;
    if finished.is_err() {
        tracing::warn!("endpoints did not finish within the drain timeout");
    }
    let all = u32::try_from(state.max_inflight).unwrap_or(u32::MAX);
    match tokio::time::timeout(DRAIN_TIMEOUT, state.inflight.acquire_many(all)).await {
        Ok(Ok(permits)) => permits.forget(),
        _ => tracing::warn!("requests still in flight after the drain timeout"),
    }
    tracing::info!("gateway drained: no request in flight");
}

async fn serve_endpoint(
    method: Method,
    mut endpoint: async_nats::service::endpoint::Endpoint,
    context: Arc<RequestContext>,
    inflight: Arc<Semaphore>,
) {
    while let Some(request) = endpoint.next().await {
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let context = context.clone();
        tokio::spawn(async move {
            handle_request(&context, method, request).await;
            drop(permit);
        });
    }
}

fn header<'a>(headers: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    headers?.get(name).map(|value| value.as_str())
}

fn new_request_id() -> String {
    hex::encode(rand::random::<[u8; 16]>())
}

/// A request id from the caller is echoed only when it is a sane token.
fn usable_request_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|byte| byte.is_ascii_graphic() && byte != b':')
}

/// Header values must not carry line breaks or other control characters.
fn header_safe(text: &str) -> String {
    text.chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect()
}

async fn handle_request(
    context: &RequestContext,
    method: Method,
    request: async_nats::service::Request,
) {
    let started = Instant::now();
    let headers = request.message.headers.as_ref();
    let request_id = header(headers, REQUEST_ID)
        .filter(|id| usable_request_id(id))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let format = Format::from_content_type(header(headers, CONTENT_TYPE));
    let outcome = AssertUnwindSafe(dispatch(
        context,
        method,
        format,
        headers,
        &request.message.payload,
    ))
    .catch_unwind()
    .await
    .unwrap_or_else(|_| Err(Error::internal("the request handler failed unexpectedly")));

    let mut reply_headers = HeaderMap::new();
    reply_headers.insert(REQUEST_ID, request_id.as_str());
    let (body, code) = match outcome {
        Ok(body) => {
            if format == Format::Json {
                reply_headers.insert(CONTENT_TYPE, JSON_CONTENT_TYPE);
            }
            (body, "ok")
        }
        Err(error) => {
            let status = error.kind().status().to_string();
            reply_headers.insert(SERVICE_ERROR_CODE, status.as_str());
            reply_headers.insert(SERVICE_ERROR, header_safe(error.message()).as_str());
            reply_headers.insert(CONTENT_TYPE, JSON_CONTENT_TYPE);
            if matches!(
                error.kind(),
                crate::Kind::AuthenticationRequired
                    | crate::Kind::InvalidToken
                    | crate::Kind::TokenExpired
                    | crate::Kind::AccessDenied
            ) {
                metrics::counter!("ringvault_auth_failures_total", "code" => error.kind().code())
                    .increment(1);
            }
            if error.kind() == crate::Kind::Internal {
                tracing::error!(method = method.name(), request_id, %error, "request failed");
            }
            (
                ErrorBody::from_error(&error).to_bytes(),
                error.kind().code(),
            )
        }
    };
    metrics::counter!("ringvault_requests_total", "method" => method.name(), "code" => code)
        .increment(1);
    metrics::histogram!("ringvault_request_duration_seconds", "method" => method.name())
        .record(started.elapsed().as_secs_f64());
    if let Err(error) = request.respond_with_headers(Ok(body), reply_headers).await {
        tracing::debug!(method = method.name(), request_id, %error, "reply not sent");
    }
    tracing::debug!(
        method = method.name(),
        request_id,
        code,
        micros = started.elapsed().as_micros() as u64,
        "request handled"
    );
}

async fn dispatch(
    context: &RequestContext,
    method: Method,
    format: Format,
    headers: Option<&HeaderMap>,
    payload: &[u8],
) -> Result<Bytes> {
    if method == Method::Liveness {
        let response = LivenessResponse {
            status: "ok".to_owned(),
        };
        return Ok(encode(format, &response));
    }
    let principal = context
        .auth
        .authenticate(header(headers, AUTHORIZATION))
        .await?;
    let vault = &context.vault;
    match method {
        Method::Liveness => Err(Error::internal(
            "liveness is answered before authentication",
        )),
        Method::Encrypt => run(format, payload, |r| vault.encrypt(&principal, r)).await,
        Method::Decrypt => run(format, payload, |r| vault.decrypt(&principal, r)).await,
        Method::ReEncrypt => run(format, payload, |r| vault.reencrypt(&principal, r)).await,
        Method::EncryptBulk => run(format, payload, |r| vault.encrypt_bulk(&principal, r)).await,
        Method::DecryptBulk => run(format, payload, |r| vault.decrypt_bulk(&principal, r)).await,
        Method::RotateKeyring => run(format, payload, |r| vault.rotate(&principal, r)).await,
        Method::DescribeKeyring => run(format, payload, |r| vault.describe(&principal, r)).await,
    }
}

/// Decodes the request, runs the operation, encodes the reply in the request's format.
async fn run<Req, Resp, Fut>(
    format: Format,
    payload: &[u8],
    operation: impl FnOnce(Req) -> Fut,
) -> Result<Bytes>
where
    Req: prost::Message + Default + DeserializeOwned,
    Resp: prost::Message + Serialize,
    Fut: std::future::Future<Output = Result<Resp>>,
{
    let request = decode(format, payload)?;
    let response = operation(request).await?;
    Ok(encode(format, &response))
}
