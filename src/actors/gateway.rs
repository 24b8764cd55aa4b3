//! Gateway: the NATS-facing actor. It queue-subscribes to one subject per method (replicas
//! in the queue group share the load), answers the NATS micro discovery subjects
//! (`$SRV.PING|INFO|STATS`, as async-nats' service API would), and runs each request in its
//! own task, at most `max_inflight` at once.
//!
//! It manages its subscriptions itself rather than through async-nats' service endpoints so
//! that shutdown can *drain* them: stop-and-discard would drop requests the server had already
//! routed to this replica but the client had not read yet; a drain reads them first.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::HeaderMap;
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::AuthHandle;
use crate::error::{Error, Result};
use crate::protocol::{
    decode, encode, ErrorBody, Format, LivenessResponse, Method, AUTHORIZATION, CONTENT_TYPE,
    JSON_CONTENT_TYPE, REQUEST_ID, SERVICE_ERROR, SERVICE_ERROR_CODE,
};
use crate::rpc::Vault;

/// How long a drain waits for the subscriptions to hand over what they had buffered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The service name of the micro discovery protocol.
const SERVICE_NAME: &str = "ringvault";

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
    nats: async_nats::Client,
    draining: watch::Sender<bool>,
    request_loops: Vec<JoinHandle<()>>,
    discovery_loops: Vec<JoinHandle<()>>,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
}

impl Drop for GatewayState {
    fn drop(&mut self) {
        // A gateway that failed leaves nothing serving behind it.
        for task in self.request_loops.iter().chain(&self.discovery_loops) {
            task.abort();
        }
    }
}

/// Counters of one endpoint, as `$SRV.STATS` reports them.
#[derive(Default)]
struct EndpointStats {
    requests: AtomicU64,
    errors: AtomicU64,
    processing_nanos: AtomicU64,
    last_error: Mutex<String>,
}

impl EndpointStats {
    fn record(&self, elapsed: Duration, error: Option<&Error>) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(elapsed.as_nanos()).unwrap_or(u64::MAX);
        self.processing_nanos.fetch_add(nanos, Ordering::Relaxed);
        if let Some(error) = error {
            self.errors.fetch_add(1, Ordering::Relaxed);
            let mut last = self.last_error.lock().unwrap_or_else(|e| e.into_inner());
            *last = format!("{}:{}", error.kind().status(), error.message());
        }
    }
}

/// What every request task shares.
struct RequestContext {
    auth: AuthHandle,
    vault: Vault,
    nats: async_nats::Client,
    stats: Vec<EndpointStats>,
}

/// The identity and endpoints reported by discovery.
struct Discovery {
    id: String,
    started: SystemTime,
    prefix: String,
    queue_group: String,
}

impl Discovery {
    fn endpoints(&self) -> impl Iterator<Item = (Method, String)> + '_ {
        Method::ALL
            .into_iter()
            .map(|method| (method, method.subject(&self.prefix)))
    }

    fn answer(&self, kind: &str, context: &RequestContext) -> serde_json::Value {
        let version = env!("CARGO_PKG_VERSION");
        match kind {
            "PING" => json!({
                "type": "io.nats.micro.v1.ping_response",
                "name": SERVICE_NAME, "id": self.id, "version": version, "metadata": {},
            }),
            "INFO" => json!({
                "type": "io.nats.micro.v1.info_response",
                "name": SERVICE_NAME, "id": self.id, "version": version, "metadata": {},
                "description": "ringvault envelope encryption (vault.v1)",
                "endpoints": self.endpoints().map(|(method, subject)| json!({
                    "name": method.name(), "subject": subject,
                    "queue_group": self.queue_group, "metadata": {},
                })).collect::<Vec<_>>(),
            }),
            _ => json!({
                "type": "io.nats.micro.v1.stats_response",
                "name": SERVICE_NAME, "id": self.id, "version": version,
                "started": humantime::format_rfc3339_nanos(self.started).to_string(),
                "endpoints": self.endpoints().zip(&context.stats).map(|((method, subject), stats)| {
                    let requests = stats.requests.load(Ordering::Relaxed);
                    let nanos = stats.processing_nanos.load(Ordering::Relaxed);
                    let last_error = stats.last_error.lock().map(|e| e.clone()).unwrap_or_default();
                    json!({
                        "name": method.name(), "subject": subject,
                        "queue_group": self.queue_group,
                        "num_requests": requests,
                        "num_errors": stats.errors.load(Ordering::Relaxed),
                        "processing_time": nanos,
                        "average_processing_time": nanos.checked_div(requests).unwrap_or(0),
                        "last_error": last_error,
                    })
                }).collect::<Vec<_>>(),
            }),
        }
    }
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
        let context = Arc::new(RequestContext {
            auth: args.auth.clone(),
            vault: args.vault.clone(),
            nats: args.nats.clone(),
            stats: Method::ALL
                .iter()
                .map(|_| EndpointStats::default())
                .collect(),
        });
        let inflight = Arc::new(Semaphore::new(args.max_inflight));
        let (draining, drain_signal) = watch::channel(false);
        let mut request_loops = Vec::with_capacity(Method::ALL.len());
        for (index, method) in Method::ALL.into_iter().enumerate() {
            let subscriber = args
                .nats
                .queue_subscribe(method.subject(&args.prefix), args.queue_group.clone())
                .await?;
            request_loops.push(tokio::spawn(serve_method(
                method,
                index,
                subscriber,
                context.clone(),
                inflight.clone(),
                drain_signal.clone(),
            )));
        }
        let discovery = Arc::new(Discovery {
            id: hex::encode(rand::random::<[u8; 11]>()),
            started: SystemTime::now(),
            prefix: args.prefix.clone(),
            queue_group: args.queue_group.clone(),
        });
        let mut discovery_loops = Vec::new();
        for kind in ["PING", "INFO", "STATS"] {
            for subject in [
                format!("$SRV.{kind}"),
                format!("$SRV.{kind}.{SERVICE_NAME}"),
                format!("$SRV.{kind}.{SERVICE_NAME}.{}", discovery.id),
            ] {
                let subscriber = args.nats.subscribe(subject).await?;
                discovery_loops.push(tokio::spawn(serve_discovery(
                    kind,
                    subscriber,
                    discovery.clone(),
                    context.clone(),
                )));
            }
        }
        args.nats.flush().await?;
        tracing::info!(
            prefix = args.prefix,
            queue_group = args.queue_group,
            max_inflight = args.max_inflight,
            "serving the vault api on nats"
        );
        Ok(GatewayState {
            nats: args.nats,
            draining,
            request_loops,
            discovery_loops,
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
    state.draining.send_replace(true);
    let loops = std::mem::take(&mut state.request_loops);
    let finished = tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(loops)).await;
    if finished.is_err() {
        tracing::warn!("subscriptions did not drain within the drain timeout");
    }
    let all = u32::try_from(state.max_inflight).unwrap_or(u32::MAX);
    match tokio::time::timeout(DRAIN_TIMEOUT, state.inflight.acquire_many(all)).await {
        Ok(Ok(permits)) => permits.forget(),
        _ => tracing::warn!("requests still in flight after the drain timeout"),
    }
    for task in state.discovery_loops.drain(..) {
        task.abort();
    }
    if let Err(error) = state.nats.flush().await {
        tracing::warn!(%error, "flushing the last replies failed");
    }
    tracing::info!("gateway drained: no request in flight");
}

/// Requests this replica still takes after a drain starts. A drain is an auto-unsubscribe
/// after this many more messages, so that the server and the client agree on exactly which
/// messages are ours: none that the server routed before it saw the unsubscribe is dropped
/// (a plain unsubscribe discards those the client had not read yet). Other replicas in the
/// queue group take the rest.
const DRAIN_ALLOWANCE: u64 = 256;
/// A draining subscription with nothing more to read for this long is closed.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Serves one method until drained.
async fn serve_method(
    method: Method,
    index: usize,
    mut subscriber: async_nats::Subscriber,
    context: Arc<RequestContext>,
    inflight: Arc<Semaphore>,
    mut drain_signal: watch::Receiver<bool>,
) {
    let mut received: u64 = 0;
    let mut draining = false;
    loop {
        let message = if draining {
            match tokio::time::timeout(DRAIN_QUIET, subscriber.next()).await {
                Ok(message) => message,
                Err(_) => {
                    // Quiet: the server has seen the auto-unsubscribe (we flushed after it)
                    // and routes nothing more; close for good.
                    let _ = subscriber.unsubscribe().await;
                    return;
                }
            }
        } else {
            tokio::select! {
                message = subscriber.next() => message,
                _ = async { drain_signal.wait_for(|drain| *drain).await.map(|_| ()) } => {
                    draining = true;
                    let limit = received + DRAIN_ALLOWANCE;
                    if let Err(error) = subscriber.unsubscribe_after(limit).await {
                        tracing::warn!(method = method.name(), %error, "could not drain the subscription");
                        return;
                    }
                    if let Err(error) = context.nats.flush().await {
                        tracing::warn!(method = method.name(), %error, "flush during drain failed");
                    }
                    continue;
                }
            }
        };
        let Some(message) = message else {
            return;
        };
        received += 1;
        let Ok(permit) = inflight.clone().acquire_owned().await else {
            return;
        };
        let context = context.clone();
        tokio::spawn(async move {
            handle_request(&context, method, index, message).await;
            drop(permit);
        });
    }
}

async fn serve_discovery(
    kind: &'static str,
    mut subscriber: async_nats::Subscriber,
    discovery: Arc<Discovery>,
    context: Arc<RequestContext>,
) {
    while let Some(message) = subscriber.next().await {
        let Some(reply) = message.reply else {
            continue;
        };
        let body = discovery.answer(kind, &context).to_string();
        if let Err(error) = context.nats.publish(reply, body.into()).await {
            tracing::debug!(%error, "discovery reply not sent");
        }
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
    index: usize,
    request: async_nats::Message,
) {
    let started = Instant::now();
    let Some(reply_subject) = request.reply.clone() else {
        tracing::debug!(
            method = method.name(),
            "ignoring a message without a reply subject"
        );
        return;
    };
    let headers = request.headers.as_ref();
    let request_id = header(headers, REQUEST_ID)
        .filter(|id| usable_request_id(id))
        .map(str::to_owned)
        .unwrap_or_else(new_request_id);
    let format = Format::from_content_type(header(headers, CONTENT_TYPE));
    let outcome = AssertUnwindSafe(dispatch(context, method, format, headers, &request.payload))
        .catch_unwind()
        .await
        .unwrap_or_else(|_| Err(Error::internal("the request handler failed unexpectedly")));

    let mut reply_headers = HeaderMap::new();
    reply_headers.insert(REQUEST_ID, request_id.as_str());
    let elapsed = started.elapsed();
    context.stats[index].record(elapsed, outcome.as_ref().err());
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
        .record(elapsed.as_secs_f64());
    let sent = context
        .nats
        .publish_with_headers(reply_subject, reply_headers, body)
        .await;
    if let Err(error) = sent {
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
