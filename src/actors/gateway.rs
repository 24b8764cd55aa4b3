//! Gateway: the NATS-facing actor. It queue-subscribes to one subject per method (replicas
//! in the queue group share the load), answers the NATS micro discovery subjects
//! (`$SRV.PING|INFO|STATS`, as async-nats' service API would), and runs requests inside the
//! subscription tasks (per method, one per two cores, at least one), at most `max_inflight` at
//! once.
//!
//! It manages its subscriptions itself rather than through async-nats' service endpoints so
//! that shutdown can *drain* them: stop-and-discard would drop requests the server had already
//! routed to this replica but the client had not read yet; a drain reads them first.

use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use async_nats::header::HeaderValue;
use async_nats::{HeaderMap, PublishErrorKind};
use bytes::Bytes;
use futures::{FutureExt as _, StreamExt as _};
use ractor::{Actor, ActorProcessingErr, ActorRef, RpcReplyPort};
use serde::de::DeserializeOwned;
use serde_json::json;
use tokio::sync::{watch, Semaphore};
use tokio::task::JoinHandle;

use super::in_flight::InFlight;
use super::AuthHandle;
use crate::auth::{AuditRecord, Policies, Principal, RateLimiter};
use crate::error::{Error, Kind, Result};
use crate::protocol::{
    borrow_keyring_and_text, decode, encode, encode_decrypt_response, encode_encrypt_response,
    request_keyring, DecryptBulkRequest, DecryptBulkResponse, DecryptRequest,
    DescribeKeyringRequest, DescribeKeyringResponse, EncryptBulkRequest, EncryptBulkResponse,
    EncryptRequest, ErrorBody, Format, LivenessResponse, Method, ReEncryptRequest,
    ReEncryptResponse, RotateKeyringRequest, RotateKeyringResponse, AUTHORIZATION, CONTENT_TYPE,
    CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE, REQUEST_ID, REQUEST_ID_HEADER, SERVICE_ERROR,
    SERVICE_ERROR_CODE,
};
use crate::rpc::{Decrypted, Sealed, Vault};
use crate::storage::validate_keyring;

/// How long the gateway's start waits for NATS to confirm its subscriptions.
const SUBSCRIBE_FLUSH_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a drain waits for the subscriptions to hand over what they had buffered.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a drain waits for the nats-server to confirm (a flush): longer means it is
/// unreachable, and nothing more will arrive or leave.
const DRAIN_FLUSH_TIMEOUT: Duration = Duration::from_secs(2);
/// The service name of the micro discovery protocol.
const SERVICE_NAME: &str = "ringvault";
/// The header an admin names the workspace it acts for with.
const TENANT_ID: &str = "X-Tenant-ID";
/// The header of a `rate_limited` reply: whole seconds until a retry can pass.
const RETRY_AFTER: &str = "Retry-After";
/// How often idle rate-limit buckets are forgotten, and after how long idle.
const RATE_LIMIT_SWEEP: Duration = Duration::from_secs(60);
/// The longest keyring name an audit record repeats (longer ones are invalid anyway).
const AUDIT_KEYRING_MAX: usize = 256;

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
    /// Queue subscriptions per method (0: one per two cores, at least one).
    pub subscriptions_per_method: usize,
    /// Authentication.
    pub auth: AuthHandle,
    /// The policies, applied again to a principal acting for another workspace.
    pub policies: Arc<Policies>,
    /// The operations.
    pub vault: Vault,
    /// Per-workspace rate limits, when `[auth.rate_limit]` is enabled.
    pub rate_limiter: Option<Arc<RateLimiter>>,
    /// Test fault switches.
    pub hooks: super::Hooks,
}

/// Messages of the [`Gateway`].
pub enum GatewayMsg {
    /// Stop taking requests and answer the ones in flight; replies when done.
    Drain(RpcReplyPort<()>),
    /// A request loop ended without a drain (its subscription closed, or it panicked): the
    /// gateway fails, and the supervisor starts it again with all its subscriptions.
    LoopEnded(Method),
}

/// The NATS-facing actor.
pub struct Gateway;

/// State of the [`Gateway`].
pub struct GatewayState {
    nats: async_nats::Client,
    draining: watch::Sender<bool>,
    /// Aborted with the state: a gateway that failed leaves nothing serving behind it.
    request_loops: OwnedTasks,
    discovery_loops: OwnedTasks,
    inflight: Arc<Semaphore>,
    max_inflight: usize,
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
            // The code only: `$SRV.STATS` answers anyone on the nats account, and messages
            // name subjects, keyrings and what callers sent.
            let mut last = crate::lock_ignoring_poison(&self.last_error);
            *last = format!("{}:{}", error.kind().status(), error.kind().code());
        }
    }
}

/// What every request task shares.
struct RequestContext {
    auth: AuthHandle,
    policies: Arc<Policies>,
    vault: Vault,
    nats: async_nats::Client,
    stats: Vec<EndpointStats>,
    rate_limiter: Option<Arc<RateLimiter>>,
    /// `<prefix>.audit`.
    audit_subject: String,
    /// Per method (by index): the metrics every request records, registered once.
    request_metrics: Vec<RequestMetrics>,
    /// Test fault switches.
    #[cfg_attr(not(feature = "test-hooks"), allow(dead_code))]
    hooks: super::Hooks,
}

/// The metric handles of one method's requests.
struct RequestMetrics {
    ok: metrics::Counter,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    fn new(method: Method) -> Self {
        Self {
            ok: metrics::counter!("ringvault_requests_total", "method" => method.name(), "code" => "ok"),
            duration: metrics::histogram!("ringvault_request_duration_seconds", "method" => method.name()),
        }
    }
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
        myself: ActorRef<Self::Msg>,
        args: GatewayArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        let context = Arc::new(RequestContext {
            auth: args.auth.clone(),
            policies: args.policies.clone(),
            vault: args.vault.clone(),
            nats: args.nats.clone(),
            stats: Method::ALL
                .iter()
                .map(|_| EndpointStats::default())
                .collect(),
            rate_limiter: args.rate_limiter.clone(),
            audit_subject: format!("{}.audit", args.prefix),
            hooks: args.hooks.clone(),
            request_metrics: Method::ALL.into_iter().map(RequestMetrics::new).collect(),
        });
        let inflight = Arc::new(Semaphore::new(args.max_inflight));
        let (draining, drain_signal) = watch::channel(false);
        let subscriptions = subscriptions_per_method(args.subscriptions_per_method);
        // Aborted if this start fails after spawning them: a failed start must leave nothing
        // serving outside supervision (async-nats would even re-create their subscriptions
        // when it reconnects).
        let mut request_loops = OwnedTasks::default();
        for (index, method) in Method::ALL.into_iter().enumerate() {
            for _ in 0..subscriptions {
                let subscriber = args
                    .nats
                    .queue_subscribe(method.subject(&args.prefix), args.queue_group.clone())
                    .await?;
                let watch = LoopWatch {
                    method,
                    gateway: myself.clone(),
                    drain_signal: drain_signal.clone(),
                };
                request_loops.push(tokio::spawn(serve_method(
                    method,
                    index,
                    subscriber,
                    context.clone(),
                    inflight.clone(),
                    drain_signal.clone(),
                    watch,
                )));
            }
        }
        let discovery = Arc::new(Discovery {
            id: hex::encode(rand::random::<[u8; 11]>()),
            started: SystemTime::now(),
            prefix: args.prefix.clone(),
            queue_group: args.queue_group.clone(),
        });
        let mut discovery_loops = OwnedTasks::default();
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
        if let Some(limiter) = args.rate_limiter.clone() {
            // Buckets idle for a while are full again anyway; forgetting them bounds memory.
            discovery_loops.push(tokio::spawn(async move {
                let mut tick = tokio::time::interval(RATE_LIMIT_SWEEP);
                loop {
                    tick.tick().await;
                    limiter.sweep(RATE_LIMIT_SWEEP);
                }
            }));
        }
        #[cfg(feature = "test-hooks")]
        if args.hooks.faults.take_gateway_start_failure() {
            return Err("gateway start failed (test fault)".into());
        }
        // Bounded: while NATS is away a flush waits for the reconnection, and a gateway
        // restarting then would hold its supervisor with it.
        tokio::time::timeout(SUBSCRIBE_FLUSH_TIMEOUT, args.nats.flush())
            .await
            .map_err(|_| "nats did not confirm the subscriptions within 10 s")??;
        tracing::info!(
            prefix = args.prefix,
            queue_group = args.queue_group,
            max_inflight = args.max_inflight,
            subscriptions_per_method = subscriptions,
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
            GatewayMsg::LoopEnded(method) => {
                if *state.draining.borrow() {
                    return Ok(());
                }
                tracing::error!(
                    method = method.name(),
                    "a request loop ended without a drain; draining the others, then restarting"
                );
                // The other loops hold requests they have taken; failing now would abort them
                // unanswered, and their callers would wait out their own timeouts.
                drain(state).await;
                return Err(format!(
                    "the request loop of {} ended without a drain",
                    method.name()
                )
                .into());
            }
        }
        Ok(())
    }
}

async fn drain(state: &mut GatewayState) {
    state.draining.send_replace(true);
    let mut loops = std::mem::take(&mut state.request_loops);
    let finished =
        tokio::time::timeout(DRAIN_TIMEOUT, futures::future::join_all(loops.0.iter_mut())).await;
    if finished.is_err() {
        tracing::warn!("subscriptions did not drain within the drain timeout; stopping them");
    }
    // Dropped, so any still running are stopped, not left taking requests after the keyring
    // actors and storage have stopped.
    drop(loops);
    let all = u32::try_from(state.max_inflight).unwrap_or(u32::MAX);
    match tokio::time::timeout(DRAIN_TIMEOUT, state.inflight.acquire_many(all)).await {
        Ok(Ok(permits)) => permits.forget(),
        _ => tracing::warn!("requests still in flight after the drain timeout"),
    }
    drop(std::mem::take(&mut state.discovery_loops));
    if let Err(reason) = flush_while_draining(&state.nats).await {
        tracing::warn!(reason, "the last replies may not have left");
    }
    tracing::info!("gateway drained: no request in flight");
}

/// Flushes, waiting at most [`DRAIN_FLUSH_TIMEOUT`]: a drain must not wait for a nats-server
/// that is gone. The error says why the flush was not confirmed.
async fn flush_while_draining(nats: &async_nats::Client) -> std::result::Result<(), String> {
    match tokio::time::timeout(DRAIN_FLUSH_TIMEOUT, nats.flush()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(format!("nats flush failed: {error}")),
        Err(_) => Err(format!(
            "nats did not confirm a flush within {DRAIN_FLUSH_TIMEOUT:?}"
        )),
    }
}

/// Requests this replica still takes once a drain starts. The drain is first an
/// auto-unsubscribe after this many more messages, so that the server and the client agree on
/// which messages are ours (a plain unsubscribe makes the client discard those the server had
/// routed but the client had not read yet); other replicas in the queue group take the rest.
/// It also covers what the connection delivers between the count and the unsubscribe (up to a
/// socket read of small requests).
const DRAIN_ALLOWANCE: u64 = 1024;
/// Once nothing more arrives for this long, the subscription is closed for good.
const DRAIN_QUIET: Duration = Duration::from_millis(200);

/// Where a subscription is in its drain.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Drain {
    /// Serving.
    No,
    /// Auto-unsubscribe sent; serving what the server still routes to us.
    Counted,
    /// Unsubscribed; reading what was already sent.
    Closing,
}

/// Tasks the gateway owns: aborted when dropped, whether by a start that failed after
/// spawning them or with the state of a gateway that stopped or failed.
#[derive(Default)]
struct OwnedTasks(Vec<JoinHandle<()>>);

impl OwnedTasks {
    fn push(&mut self, task: JoinHandle<()>) {
        self.0.push(task);
    }
}

impl Drop for OwnedTasks {
    fn drop(&mut self) {
        for task in &self.0 {
            task.abort();
        }
    }
}

/// Tells the gateway when a request loop ends, however it ends (returned, panicked, aborted):
/// outside a drain, that method has lost a subscription and nothing would say so.
struct LoopWatch {
    method: Method,
    gateway: ActorRef<GatewayMsg>,
    drain_signal: watch::Receiver<bool>,
}

impl Drop for LoopWatch {
    fn drop(&mut self) {
        if !*self.drain_signal.borrow() {
            // A gateway already gone (stopped or failed) has nothing left to restart.
            let _ = self
                .gateway
                .send_message(GatewayMsg::LoopEnded(self.method));
        }
    }
}

/// Serves one subscription of a method until drained.
///
/// Requests run *inside* this task, each polled as it is taken ([`InFlight`]), rather than each
/// in a spawned task: most requests complete in their first poll (cached principal, cached
/// key, AES-GCM), so running them here spares a spawn and a cross-thread wake-up per request,
/// and the replies of a burst reach the connection together and leave in one write. A request
/// that has to wait (storage, an actor) stays pending beside the subscription while the loop
/// goes on.
/// Parallelism across cores comes from several such subscriptions per method in the queue
/// group ([`subscriptions_per_method`]).
async fn serve_method(
    method: Method,
    index: usize,
    mut subscriber: async_nats::Subscriber,
    context: Arc<RequestContext>,
    inflight: Arc<Semaphore>,
    mut drain_signal: watch::Receiver<bool>,
    _watch: LoopWatch,
) {
    let mut requests = InFlight::new();
    let mut audit_records: Vec<AuditRecord> = Vec::new();
    let mut received: u64 = 0;
    let mut draining = Drain::No;
    // Requests the client library already held when the drain began, taken before the rest.
    let mut backlog: std::collections::VecDeque<async_nats::Message> =
        std::collections::VecDeque::new();
    // Nothing more can arrive (the drain could not be arranged): answer the backlog and stop.
    let mut stop_taking = false;
    let quiet = tokio::time::sleep(DRAIN_QUIET);
    tokio::pin!(quiet);
    // Made once: a fresh wait per pass of the loop below would register with the watch (its
    // lock, a waker clone) and deregister again for every request.
    let drain_requested = async move {
        let _ = drain_signal.wait_for(|drain| *drain).await;
    };
    tokio::pin!(drain_requested);
    loop {
        let message = if let Some(message) = backlog.pop_front() {
            Some(message)
        } else if stop_taking {
            break;
        } else {
            tokio::select! {
                // In this order: finished requests, the drain, new requests; and only when none of
                // them is ready, the audit records gathered meanwhile. The drain comes before new
                // requests because under a backlog a new request is always ready, and a drain
                // behind it would never be seen.
                biased;
                Some(record) = requests.next_finished() => {
                    gather_audit(&context, &mut audit_records, record).await;
                    continue;
                }
                () = &mut drain_requested, if draining == Drain::No => {
                    draining = Drain::Counted;
                    quiet.as_mut().reset(tokio::time::Instant::now() + DRAIN_QUIET);
                    // The allowance counts from what the client library has delivered to this
                    // subscription, read or not: what it holds is taken now, or a limit below it
                    // would end the subscription at once and drop what the server still sends.
                    // Unconstrained: tokio's cooperative budget would report an empty queue
                    // after 128 reads, and the count would fall short of what was delivered.
                    while let Some(Some(message)) =
                        tokio::task::coop::unconstrained(subscriber.next()).now_or_never()
                    {
                        backlog.push_back(message);
                    }
                    let delivered = received + backlog.len() as u64;
                    if let Err(error) = subscriber.unsubscribe_after(delivered + DRAIN_ALLOWANCE).await {
                        tracing::warn!(method = method.name(), %error, "could not drain the subscription");
                        stop_taking = true;
                        continue;
                    }
                    // Unconfirmed (nats unreachable): no more requests can come, and waiting for
                    // the connection would hold the shutdown; finish what is in flight and stop.
                    // A connection that is up but slow to confirm (replies queued ahead of the
                    // flush) still brings what the server routes here: keep taking it.
                    if let Err(reason) = flush_while_draining(&context.nats).await {
                        if context.nats.connection_state()
                            != async_nats::connection::State::Connected
                        {
                            tracing::warn!(method = method.name(), reason, "not waiting for more requests");
                            stop_taking = true;
                        }
                    }
                    continue;
                }
                message = subscriber.next() => message,
                () = &mut quiet, if draining == Drain::Counted => {
                    // Quiet: close for good, still reading what the server sent before.
                    draining = Drain::Closing;
                    if subscriber.drain().await.is_err() {
                        break;
                    }
                    continue;
                }
                () = std::future::ready(()), if !audit_records.is_empty() => {
                    publish_audit(&context, &mut audit_records).await;
                    continue;
                }
            }
        };
        let Some(message) = message else {
            break;
        };
        #[cfg(feature = "test-hooks")]
        if context.hooks.faults.take_request_loop_end(method) {
            break;
        }
        received += 1;
        if draining == Drain::Counted {
            quiet
                .as_mut()
                .reset(tokio::time::Instant::now() + DRAIN_QUIET);
        }
        // Borrowed, not cloned: `requests` ends before this function's arguments, and an `Arc`
        // clone per request is two atomic writes on a line every core shares.
        let permit = loop {
            match inflight.try_acquire() {
                Ok(permit) => break Some(permit),
                Err(tokio::sync::TryAcquireError::Closed) => break None,
                // At the limit: let this subscription's own requests finish meanwhile.
                Err(tokio::sync::TryAcquireError::NoPermits) => tokio::select! {
                    Some(record) = requests.next_finished() => {
                        gather_audit(&context, &mut audit_records, record).await;
                    }
                    permit = inflight.acquire() => break permit.ok(),
                },
            }
        };
        let Some(permit) = permit else {
            break;
        };
        let context = &*context;
        let request = async move {
            let record = handle_request(context, method, index, message).await;
            drop(permit);
            record
        };
        if let Some(record) = requests.start(request).await {
            gather_audit(context, &mut audit_records, record).await;
        }
    }
    // Answer what was taken before stopping.
    while let Some(record) = requests.next_finished().await {
        audit_records.extend(record);
    }
    publish_audit(&context, &mut audit_records).await;
}

/// Adds a finished request's audit record, if it left one, to those gathered; publishes them
/// once there are [`MAX_AUDIT_BATCH`].
async fn gather_audit(
    context: &RequestContext,
    records: &mut Vec<AuditRecord>,
    record: Option<AuditRecord>,
) {
    records.extend(record);
    if records.len() >= MAX_AUDIT_BATCH {
        publish_audit(context, records).await;
    }
}

/// Publishes the gathered audit records as JSON lines, in one message or as few as the
/// server's `max_payload` allows: a request alone leaves its record at once, after its reply;
/// under load, the records of a burst share a message, so auditing does not double the
/// messages the nats-server routes per request.
async fn publish_audit(context: &RequestContext, records: &mut Vec<AuditRecord>) {
    if records.is_empty() {
        return;
    }
    // Split by the server's max_payload: one message over it would be refused, and with it
    // every record of the batch (records run to ~2 KB with a long, escaped keyring).
    let messages = AuditRecord::to_json_messages(records, context.nats.max_payload());
    records.clear();
    for payload in messages {
        let bytes = payload.len();
        if let Err(error) = context
            .nats
            .publish(context.audit_subject.clone(), payload)
            .await
        {
            tracing::warn!(bytes, %error, "audit records not published");
        }
    }
}

/// The most audit records in one message (a record is a few hundred bytes).
const MAX_AUDIT_BATCH: usize = 256;

/// How many queue subscriptions each method has on one connection: `configured`, or with 0
/// one per two cores the runtime can use (at least one), so that large requests of one method
/// run in parallel (each subscription serves its requests in its own task).
///
/// Not one per core: the connection task hands each message to its subscription's task, and
/// when a method's messages alternate between subscriptions, tokio wakes another worker for
/// them. On the 2-core machine of BENCHMARKS.md that cost 1.7 µs of CPU per request, a fifth
/// of the service's, and a second subscription gained nothing measurable even at 64 KiB,
/// where the nats-server and the callers were the bound. Larger machines keep subscriptions
/// to spread large payloads' sealing over.
fn subscriptions_per_method(configured: usize) -> usize {
    if configured > 0 {
        return configured.min(MAX_SUBSCRIPTIONS_PER_METHOD);
    }
    std::thread::available_parallelism().map_or(1, |cores| {
        (cores.get() / 2).clamp(1, MAX_SUBSCRIPTIONS_PER_METHOD)
    })
}

/// The most subscriptions per method, whatever the core count.
const MAX_SUBSCRIPTIONS_PER_METHOD: usize = 32;

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

/// The request headers the gateway reads (the first value of each), found in one pass: a
/// lookup by name hashes the name every time, and a request carries only a few headers.
///
/// No `Debug`: it holds the bearer token.
#[derive(Default)]
struct RequestHeaders<'a> {
    request_id: Option<&'a str>,
    content_type: Option<&'a str>,
    authorization: Option<&'a str>,
    tenant_id: Option<&'a str>,
    /// A header sent under two spellings (`Authorization` and `authorization`): the request is
    /// refused, since which one came first is not kept.
    conflict: Option<&'static str>,
}

impl<'a> RequestHeaders<'a> {
    /// Header names match whatever their case, as in HTTP: NATS keeps names as sent, and
    /// clients differ (`authorization`, Go's canonical `X-Request-Id`).
    fn read(headers: Option<&'a HeaderMap>) -> Self {
        let mut found = Self::default();
        for (name, values) in headers.into_iter().flat_map(HeaderMap::iter) {
            let name: &str = name.as_ref();
            let (slot, canonical) = if name.eq_ignore_ascii_case(REQUEST_ID) {
                (&mut found.request_id, REQUEST_ID)
            } else if name.eq_ignore_ascii_case(CONTENT_TYPE) {
                (&mut found.content_type, CONTENT_TYPE)
            } else if name.eq_ignore_ascii_case(AUTHORIZATION) {
                (&mut found.authorization, AUTHORIZATION)
            } else if name.eq_ignore_ascii_case(TENANT_ID) {
                (&mut found.tenant_id, TENANT_ID)
            } else {
                continue;
            };
            // The map keeps one entry per spelling, in no fixed order: a second entry for the
            // same header is another spelling, and taking either would be a coin toss.
            if slot.is_some() {
                found.conflict.get_or_insert(canonical);
            }
            *slot = values.first().map(HeaderValue::as_str);
        }
        found
    }
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

/// Answers one request; returns its audit record, if it leaves one, for the subscription to
/// publish.
async fn handle_request(
    context: &RequestContext,
    method: Method,
    index: usize,
    mut request: async_nats::Message,
) -> Option<AuditRecord> {
    let started = Instant::now();
    let Some(reply_subject) = request.reply.take() else {
        tracing::debug!(
            method = method.name(),
            "ignoring a message without a reply subject"
        );
        return None;
    };
    let headers = RequestHeaders::read(request.headers.as_ref());
    // Borrowed from the request when the caller's is usable: a copy per request would only be
    // copied again into the reply's header and the audit record.
    let request_id: std::borrow::Cow<'_, str> = match headers.request_id {
        Some(id) if headers.conflict.is_none() && usable_request_id(id) => id.into(),
        _ => new_request_id().into(),
    };
    let request_id = &*request_id;
    let format = Format::from_content_type(headers.content_type);
    #[cfg(feature = "test-hooks")]
    if let Some(delay) = context.hooks.faults.take_request_delay(method) {
        tokio::time::sleep(delay).await;
    }
    let (outcome, record) = AssertUnwindSafe(dispatch(
        context,
        method,
        format,
        &headers,
        &request.payload,
        request_id,
    ))
    .catch_unwind()
    .await
    .unwrap_or_else(|_| (Err(Error::internal(HANDLER_PANICKED).into()), None));

    let mut reply_headers = HeaderMap::new();
    reply_headers.insert(REQUEST_ID_HEADER, request_id);
    let elapsed = started.elapsed();
    let (body, mut failure) = match outcome {
        Ok(body) => {
            if format == Format::Json {
                reply_headers.insert(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE);
            }
            (body, None)
        }
        Err(Failure { error, retry_after }) => {
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
                error_body(&mut reply_headers, &error, retry_after),
                Some(error),
            )
        }
    };
    let body_len = body.len();
    // Kept for an error reply only where this reply could exceed the server's max_payload:
    // cloning the subject costs an allocation. (A reconnection to a server with a smaller
    // max_payload between here and the publish leaves that reply unsent.)
    let error_reply_subject = (body_len + REPLY_HEADERS_MARGIN >= context.nats.max_payload())
        .then(|| reply_subject.clone());
    let sent = context
        .nats
        .publish_with_headers(reply_subject, reply_headers, body)
        .await;
    let mut record = record;
    match sent {
        Ok(()) => {}
        Err(error) if error.kind() == PublishErrorKind::MaxPayloadExceeded => {
            // The caller would otherwise wait for its timeout (a bulk call of many small
            // items, a JSON plaintext of escaped characters): it gets a small error reply.
            let too_large = Error::new(
                Kind::PayloadTooLarge,
                format!(
                    "the reply would be {body_len} bytes, more than the nats server's \
                     max_payload; send less per request"
                ),
            );
            record = record.map(|record| record.failed(too_large.kind()));
            match error_reply_subject {
                Some(reply_subject) => {
                    let mut headers = HeaderMap::new();
                    headers.insert(REQUEST_ID_HEADER, request_id);
                    let body = error_body(&mut headers, &too_large, None);
                    if let Err(error) = context
                        .nats
                        .publish_with_headers(reply_subject, headers, body)
                        .await
                    {
                        tracing::debug!(method = method.name(), request_id, %error, "error reply not sent");
                    }
                }
                None => {
                    tracing::debug!(method = method.name(), request_id, %error, "reply not sent")
                }
            }
            failure = Some(too_large);
        }
        Err(error) => {
            tracing::debug!(method = method.name(), request_id, %error, "reply not sent");
        }
    }
    if let Some(record) = &record {
        log_audit(record);
    }
    // Counted once the reply's fate is known, so a reply refused as too large counts as that
    // error and not also as ok.
    context.stats[index].record(elapsed, failure.as_ref());
    let request_metrics = &context.request_metrics[index];
    let code = failure.as_ref().map_or("ok", |error| error.kind().code());
    if failure.is_none() {
        request_metrics.ok.increment(1);
    } else {
        metrics::counter!("ringvault_requests_total", "method" => method.name(), "code" => code)
            .increment(1);
    }
    request_metrics.duration.record(elapsed.as_secs_f64());
    tracing::debug!(
        method = method.name(),
        request_id,
        code,
        micros = started.elapsed().as_micros() as u64,
        "request handled"
    );
    record
}

/// More than the headers of any reply take on the wire (the request id, the error headers with
/// their message cut to 512 characters).
const REPLY_HEADERS_MARGIN: usize = 4096;

/// Sets the error headers of a reply (and `Retry-After` when given) and returns its JSON body.
fn error_body(headers: &mut HeaderMap, error: &Error, retry_after: Option<Duration>) -> Bytes {
    if let Some(wait) = retry_after {
        headers.insert(RETRY_AFTER, retry_after_secs(wait).to_string().as_str());
    }
    let body = ErrorBody::from_error(error);
    let status = error.kind().status().to_string();
    headers.insert(SERVICE_ERROR_CODE, status.as_str());
    headers.insert(SERVICE_ERROR, header_safe(&body.message).as_str());
    headers.insert(CONTENT_TYPE_HEADER, JSON_CONTENT_TYPE);
    body.to_bytes()
}

/// A failed request: the error, and for `rate_limited` how long until a retry can pass (the
/// reply's `Retry-After`).
struct Failure {
    error: Error,
    retry_after: Option<Duration>,
}

impl From<Error> for Failure {
    fn from(error: Error) -> Self {
        Failure {
            error,
            retry_after: None,
        }
    }
}

/// Whole seconds, rounded up, at least 1.
fn retry_after_secs(wait: Duration) -> u64 {
    let secs = wait.as_secs() + u64::from(wait.subsec_nanos() > 0);
    secs.max(1)
}

async fn dispatch(
    context: &RequestContext,
    method: Method,
    format: Format,
    headers: &RequestHeaders<'_>,
    payload: &[u8],
    request_id: &str,
) -> (std::result::Result<Bytes, Failure>, Option<AuditRecord>) {
    if method == Method::Liveness {
        let response = LivenessResponse {
            status: "ok".to_owned(),
        };
        return (Ok(encode(format, &response)), None);
    }
    if let Some(name) = headers.conflict {
        let error = Error::invalid_argument(format!(
            "the {name} header is sent under two spellings; send it once"
        ));
        return (Err(error.into()), None);
    }
    // Verifying a credential is not an audit event: a request that fails here leaves none.
    let principal = match context
        .auth
        .authenticate(headers.authorization, request_id)
        .await
    {
        Ok(principal) => principal,
        Err(error) => return (Err(error.into()), None),
    };
    let mut facts = AuditFacts::default();
    // Caught here as well as around the whole request, so that a defect after authentication
    // still leaves the request's audit record: it may have done work (a rotation) by then.
    let outcome = AssertUnwindSafe(serve(
        context, method, format, headers, payload, &principal, &mut facts,
    ))
    .catch_unwind()
    .await
    .unwrap_or_else(|_| {
        // It may have panicked before reading the body: the record still names the keyring.
        if facts.keyring.is_empty() {
            facts.keyring = request_keyring(format, payload);
        }
        Err(Error::internal(HANDLER_PANICKED).into())
    });
    let record = audit(
        request_id,
        &principal,
        method,
        facts,
        outcome.as_ref().err(),
    );
    (outcome, Some(record))
}

/// The error a caller gets when its request's handler panicked (a defect, logged).
const HANDLER_PANICKED: &str = "the request handler failed unexpectedly";

/// An authenticated request: the workspace it acts in, the rate limit, then the operation.
async fn serve(
    context: &RequestContext,
    method: Method,
    format: Format,
    headers: &RequestHeaders<'_>,
    payload: &[u8],
    principal: &Principal,
    facts: &mut AuditFacts,
) -> std::result::Result<Bytes, Failure> {
    let bound_to = principal.workspace.as_deref();
    // Refusals before the body is decoded still name the keyring in their audit record.
    let refused_before_decoding = |facts: &mut AuditFacts| {
        facts.keyring = request_keyring(format, payload);
    };
    #[cfg(feature = "test-hooks")]
    if context.hooks.faults.take_request_panic(method) {
        panic!("test hook: the {} handler panics", method.name());
    }
    let principal = match acting_principal(principal, headers.tenant_id, &context.policies, facts) {
        Ok(principal) => principal,
        Err(error) => {
            refused_before_decoding(facts);
            return Err(error.into());
        }
    };
    if let Some(limiter) = &context.rate_limiter {
        // One bucket per workspace: the principal's own when it is bound to one (acting for a
        // workspace below it does not give it a fresh bucket each), else the one it acts for;
        // a principal bound to none and acting for none has its own bucket keyed by its
        // subject (`*` cannot occur in a workspace name, so no workspace collides).
        let workspace = bound_to.or(principal.workspace.as_deref());
        let key: std::borrow::Cow<'_, str> = match workspace {
            Some(workspace) => workspace.into(),
            None => format!("*{}", principal.subject).into(),
        };
        if let Err(wait) = limiter.check(&key) {
            refused_before_decoding(facts);
            // Named only for a refusal: most requests pass.
            let named = match workspace {
                Some(workspace) => format!("workspace {workspace:?}"),
                None => format!("{:?} (bound to no workspace)", principal.subject),
            };
            return Err(Failure {
                error: Error::new(
                    Kind::RateLimited,
                    format!(
                        "{named} is over its rate limit; retry in {} s",
                        retry_after_secs(wait)
                    ),
                ),
                retry_after: Some(wait),
            });
        }
    }
    let vault = &context.vault;
    let principal = &*principal;
    let body = match method {
        Method::Liveness => Err(Error::internal(
            "liveness is answered before authentication",
        )),
        // Protobuf bodies of the plain layout are read in place, not copied into a request.
        Method::Encrypt => match borrowed_fields(format, payload) {
            Some((keyring, data)) => {
                let operation = vault.encrypt_text(principal, keyring, data);
                run_borrowed(format, keyring, facts, operation).await
            }
            None => run(format, payload, facts, |r| vault.encrypt(principal, r)).await,
        },
        Method::Decrypt => match borrowed_fields(format, payload) {
            Some((keyring, encrypted)) => {
                let operation = vault.decrypt_text(principal, keyring, encrypted);
                run_borrowed(format, keyring, facts, operation).await
            }
            None => run(format, payload, facts, |r| vault.decrypt(principal, r)).await,
        },
        // Boxed: every request's future is as large as the largest method's, and these are
        // neither the common ones nor cheap next to an allocation.
        Method::ReEncrypt => {
            Box::pin(run(format, payload, facts, |r| {
                vault.reencrypt(principal, r)
            }))
            .await
        }
        Method::EncryptBulk => {
            Box::pin(run(format, payload, facts, |r| {
                vault.encrypt_bulk(principal, r)
            }))
            .await
        }
        Method::DecryptBulk => {
            Box::pin(run(format, payload, facts, |r| {
                vault.decrypt_bulk(principal, r)
            }))
            .await
        }
        Method::RotateKeyring => {
            Box::pin(run(format, payload, facts, |r| vault.rotate(principal, r))).await
        }
        Method::DescribeKeyring => {
            Box::pin(run(format, payload, facts, |r| {
                vault.describe(principal, r)
            }))
            .await
        }
    };
    Ok(body?)
}

/// The principal a request acts as: the authenticated one, or — with `X-Tenant-ID` naming
/// another workspace — a copy bound to that workspace, which only a principal holding `admin`
/// and reaching that workspace gets (recorded as `acting_for`), limited by that workspace's
/// `policies` as well as its own. Naming its own workspace changes nothing.
fn acting_principal<'a>(
    principal: &'a Principal,
    tenant: Option<&str>,
    policies: &Policies,
    facts: &mut AuditFacts,
) -> Result<std::borrow::Cow<'a, Principal>> {
    let Some(tenant) = tenant.map(str::trim).filter(|tenant| !tenant.is_empty()) else {
        return Ok(std::borrow::Cow::Borrowed(principal));
    };
    if principal.workspace.as_deref() == Some(tenant) {
        return Ok(std::borrow::Cow::Borrowed(principal));
    }
    validate_keyring(tenant).map_err(|error| error.context(TENANT_ID))?;
    facts.acting_for = Some(tenant.to_owned());
    if !principal.may_act_for(tenant) {
        return Err(Error::new(
            Kind::AccessDenied,
            format!(
                "{} may not act for workspace {tenant:?}: {TENANT_ID} needs the admin \
                 permission and a principal bound to no workspace, or to one that {tenant:?} \
                 is in",
                principal.subject
            ),
        ));
    }
    let mut acting = principal.clone();
    acting.workspace = Some(tenant.to_owned());
    Ok(std::borrow::Cow::Owned(policies.apply(acting)))
}

/// What an audit record says about the request beyond the principal, gathered as it runs.
#[derive(Default)]
struct AuditFacts {
    acting_for: Option<String>,
    keyring: String,
    key_id: Option<String>,
    item_count: u64,
}

/// The audit action of a method.
fn audit_action(method: Method) -> &'static str {
    match method {
        Method::Liveness => "liveness",
        Method::Encrypt => "encrypt",
        Method::Decrypt => "decrypt",
        Method::ReEncrypt => "reencrypt",
        Method::EncryptBulk => "encrypt_bulk",
        Method::DecryptBulk => "decrypt_bulk",
        Method::RotateKeyring => "rotate",
        Method::DescribeKeyring => "describe",
    }
}

/// The request's audit record; [`handle_request`] logs it once the reply's fate is known, and the
/// subscription publishes it. It names keyrings and key ids, never data, envelopes or tokens.
fn audit(
    request_id: &str,
    principal: &Principal,
    method: Method,
    facts: AuditFacts,
    failure: Option<&Failure>,
) -> AuditRecord {
    let mut keyring = facts.keyring;
    let kept = crate::error::first_chars(&keyring, AUDIT_KEYRING_MAX).len();
    if kept < keyring.len() {
        // An oversized name must not stay allocated in the batch of records.
        keyring.truncate(kept);
        keyring.shrink_to_fit();
    }
    let mut record = AuditRecord::new(request_id, principal, audit_action(method), keyring)
        .with_item_count(facts.item_count);
    if let Some(key_id) = facts.key_id {
        record = record.with_key_id(key_id);
    }
    if let Some(workspace) = facts.acting_for {
        record = record.acting_for(workspace);
    }
    if let Some(failure) = failure {
        record = record.failed(failure.error.kind());
    }
    record
}

/// Logs a request's audit record (target `ringvault::audit`) once its outcome is final, that is
/// once its reply has been handed to the connection: a reply refused as too large fails the
/// record, and the log must say what the audit subject says.
fn log_audit(record: &AuditRecord) {
    tracing::info!(
        target: "ringvault::audit",
        request_id = record.request_id,
        subject = record.subject,
        workspace = record.workspace.as_deref(),
        acting_for = record.acting_for.as_deref(),
        credential_source = &*record.credential_source,
        action = &*record.action,
        keyring = record.keyring,
        key_id = record.key_id.as_deref(),
        item_count = record.item_count,
        outcome = match record.outcome {
            crate::auth::Outcome::Ok => "ok",
            crate::auth::Outcome::Error => "error",
        },
        error_code = record.error_code.as_deref(),
        "audit"
    );
}

/// What a request tells the audit record: its keyring and how many items.
trait AuditedRequest {
    fn keyring(&self) -> &str;
    fn item_count(&self) -> u64 {
        1
    }
}

/// What an operation returns: the reply body, and the key it used or created when it names one
/// (an envelope's key id for Decrypt; not a secret), handed over rather than copied.
trait AuditedResponse {
    fn into_parts(self, format: Format) -> (Bytes, Option<String>);
}

fn count(len: usize) -> u64 {
    u64::try_from(len).unwrap_or(u64::MAX)
}

impl AuditedRequest for EncryptRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
}

impl AuditedRequest for DecryptRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
}

impl AuditedRequest for ReEncryptRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
}

impl AuditedRequest for EncryptBulkRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
    fn item_count(&self) -> u64 {
        count(self.items.len())
    }
}

impl AuditedRequest for DecryptBulkRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
    fn item_count(&self) -> u64 {
        count(self.items.len())
    }
}

impl AuditedRequest for RotateKeyringRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
}

impl AuditedRequest for DescribeKeyringRequest {
    fn keyring(&self) -> &str {
        &self.keyring
    }
}

/// `AuditedResponse` for responses that are themselves the message to encode.
macro_rules! response_is_message {
    ($($response:ty => |$this:ident| $key_id:expr;)*) => {$(
        impl AuditedResponse for $response {
            fn into_parts(self, format: Format) -> (Bytes, Option<String>) {
                let $this = &self;
                let key_id: Option<&str> = $key_id;
                let key_id = key_id.map(str::to_owned);
                (encode(format, &self), key_id)
            }
        }
    )*};
}

response_is_message! {
    ReEncryptResponse => |this| Some(&this.key_id);
    // Every item is sealed with the same key.
    EncryptBulkResponse => |this| this.items.values().next().map(|item| item.key_id.as_str());
    DecryptBulkResponse => |_this| None;
    RotateKeyringResponse => |this| Some(&this.key_id);
    DescribeKeyringResponse => |this| Some(&this.latest_key_id);
}

impl AuditedResponse for Sealed {
    fn into_parts(self, format: Format) -> (Bytes, Option<String>) {
        let body = encode_encrypt_response(format, &self.envelope, &self.key_id);
        (body, Some(self.key_id))
    }
}

impl AuditedResponse for Decrypted {
    fn into_parts(self, format: Format) -> (Bytes, Option<String>) {
        (
            encode_decrypt_response(format, &self.response),
            Some(self.key_id),
        )
    }
}

/// The keyring and the text of an Encrypt or Decrypt request, borrowed from a protobuf body of
/// the plain layout ([`borrow_keyring_and_text`]).
fn borrowed_fields(format: Format, payload: &[u8]) -> Option<(&str, &str)> {
    match format {
        Format::Protobuf => borrow_keyring_and_text(payload),
        Format::Json => None,
    }
}

/// [`run`] for a request read in place: one keyring, one item.
async fn run_borrowed<Resp: AuditedResponse>(
    format: Format,
    keyring: &str,
    facts: &mut AuditFacts,
    operation: impl std::future::Future<Output = Result<Resp>>,
) -> Result<Bytes> {
    facts.keyring = keyring.to_owned();
    facts.item_count = 1;
    respond(format, facts, operation).await
}

/// Runs the operation and encodes its reply in `format`, noting the key it names.
async fn respond<Resp: AuditedResponse>(
    format: Format,
    facts: &mut AuditFacts,
    operation: impl std::future::Future<Output = Result<Resp>>,
) -> Result<Bytes> {
    let (body, key_id) = operation.await?.into_parts(format);
    facts.key_id = key_id.filter(|id| !id.is_empty());
    Ok(body)
}

/// Decodes the request, runs the operation, encodes the reply in the request's format; notes
/// what the audit record needs on the way.
async fn run<Req, Resp, Fut>(
    format: Format,
    payload: &[u8],
    facts: &mut AuditFacts,
    operation: impl FnOnce(Req) -> Fut,
) -> Result<Bytes>
where
    Req: prost::Message + Default + DeserializeOwned + AuditedRequest,
    Resp: AuditedResponse,
    Fut: std::future::Future<Output = Result<Resp>>,
{
    let request: Req = decode(format, payload)?;
    facts.keyring = request.keyring().to_owned();
    facts.item_count = request.item_count();
    respond(format, facts, operation(request)).await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_headers_take_the_first_value_of_each_name_read() {
        let mut map = HeaderMap::new();
        map.append(AUTHORIZATION, "Bearer first");
        map.append(AUTHORIZATION, "Bearer second");
        map.insert(REQUEST_ID, "req-1");
        map.insert(TENANT_ID, "ws_2");
        map.insert("X-Other", "ignored");
        let headers = RequestHeaders::read(Some(&map));
        assert_eq!(headers.authorization, Some("Bearer first"));
        assert_eq!(headers.request_id, Some("req-1"));
        assert_eq!(headers.tenant_id, Some("ws_2"));
        assert_eq!(headers.content_type, None);
        // The same answers as looking each name up.
        assert_eq!(
            headers.authorization,
            map.get(AUTHORIZATION).map(HeaderValue::as_str)
        );

        let none = RequestHeaders::read(None);
        assert!(none.authorization.is_none() && none.request_id.is_none());
    }
}
