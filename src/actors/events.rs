//! EventsActor: publishes key events (`dek.created`, `kek.rolled`) on NATS and applies the
//! ones other replicas publish to the local keyring cache, so a rotation on one replica is used
//! by the next Encrypt on every other within a moment. With JetStream on, it keeps a stream over
//! the event subjects so that subscribers that were away can replay what they missed.
//!
//! Events are best effort: core NATS keeps none for a replica that is not listening. Whenever
//! listening starts again (the actor restarted, the subscription made again, the connection
//! back after a break) every cached keyring is marked to read LATEST again on its next use;
//! an event lost otherwise still leaves the cache's fresh/stale bounds.

use std::sync::Arc;
use std::time::Duration;

use async_nats::HeaderMap;
use futures::StreamExt as _;
use ractor::{Actor, ActorProcessingErr, ActorRef};
use tokio::task::JoinHandle;

use super::{ActorSlot, KeyringRegistry};
use crate::keyring::KeyEventSink;
use crate::protocol::{
    event_subject, store_event_subject, DekCause, DekCreated, KekRolled, DEK_CREATED,
    EVENT_VERSION, KEK_ROLLED, MSG_ID,
};

/// JetStream capture of the events.
#[derive(Debug, Clone)]
pub struct EventStream {
    /// Stream name.
    pub name: String,
    /// Retention by age.
    pub max_age: Duration,
    /// Retention by count.
    pub max_messages: i64,
}

/// What the events actor needs; cloned into each restart.
#[derive(Clone, Debug)]
pub struct EventsArgs {
    /// The NATS connection.
    pub nats: async_nats::Client,
    /// Subject prefix.
    pub prefix: String,
    /// This replica's id (events it published itself are not applied again).
    pub replica: String,
    /// Where events from other replicas are applied.
    pub registry: KeyringRegistry,
    /// The JetStream stream to keep, when enabled.
    pub stream: Option<EventStream>,
}

/// Messages of the [`EventsActor`].
pub enum EventsMsg {
    /// Publish `dek.created`.
    DekCreated(DekCreated),
}

/// The events actor.
pub struct EventsActor;

/// State of the [`EventsActor`].
pub struct EventsState {
    args: EventsArgs,
    listener: JoinHandle<()>,
}

impl Drop for EventsState {
    fn drop(&mut self) {
        self.listener.abort();
    }
}

/// Creates the stream over `<prefix>.events.>`, or brings an existing one's retention to the
/// configured values. Of an existing stream only the retention, the deduplication window and
/// (when none of its subjects covers them) the events' subjects change: its replicas, storage
/// and the rest are the operator's, and an update from defaults would reset them (or fail,
/// for the settings a stream cannot change).
pub async fn ensure_stream(
    nats: &async_nats::Client,
    prefix: &str,
    stream: &EventStream,
) -> Result<(), async_nats::Error> {
    use async_nats::jetstream::context::GetStreamErrorKind;
    use async_nats::jetstream::ErrorCode;

    let jetstream = async_nats::jetstream::new(nats.clone());
    let subject = format!("{prefix}.events.>");
    // At most the retention: nats-server refuses a window longer than the stream's max age.
    let duplicate_window = if stream.max_age.is_zero() {
        EVENTS_DUPLICATE_WINDOW
    } else {
        EVENTS_DUPLICATE_WINDOW.min(stream.max_age)
    };
    let mut config = match jetstream.get_stream(&stream.name).await {
        Ok(existing) => existing.cached_info().config.clone(),
        Err(error)
            if matches!(error.kind(), GetStreamErrorKind::JetStream(inner)
                if inner.error_code() == ErrorCode::STREAM_NOT_FOUND) =>
        {
            jetstream
                .create_stream(async_nats::jetstream::stream::Config {
                    name: stream.name.clone(),
                    subjects: vec![subject],
                    max_age: stream.max_age,
                    max_messages: stream.max_messages,
                    duplicate_window,
                    ..Default::default()
                })
                .await?;
            return Ok(());
        }
        Err(error) => return Err(error.into()),
    };
    // A stream over the request subjects would answer every request with its own
    // acknowledgement, and keep plaintexts and bearer tokens for its retention. (Audit records
    // and revocations are plain publishes with neither: an operator may keep them.)
    let request_subjects = crate::protocol::Method::ALL
        .iter()
        .map(|method| method.subject(prefix));
    for private in request_subjects {
        if let Some(pattern) = config
            .subjects
            .iter()
            .find(|pattern| subject_covers(pattern, &private))
        {
            return Err(format!(
                "jetstream stream {:?} captures {private} (its subject {pattern:?}): it would \
                 answer requests and keep their bodies; give it only {subject}",
                stream.name
            )
            .into());
        }
    }
    if !config
        .subjects
        .iter()
        .any(|pattern| subject_covers(pattern, &subject))
    {
        config.subjects.push(subject);
    }
    config.max_age = stream.max_age;
    config.max_messages = stream.max_messages;
    config.duplicate_window = duplicate_window;
    jetstream.update_stream(&config).await?;
    Ok(())
}

/// How long JetStream remembers a `Nats-Msg-Id` to drop a repeated event.
const EVENTS_DUPLICATE_WINDOW: Duration = Duration::from_secs(120);

/// Whether the NATS subject pattern `pattern` matches every subject `subject` (itself a
/// pattern) matches: token by token, `*` covering any one token and a final `>` any rest.
fn subject_covers(pattern: &str, subject: &str) -> bool {
    let mut wanted = subject.split('.');
    for token in pattern.split('.') {
        if token == ">" {
            return wanted.next().is_some();
        }
        match wanted.next() {
            Some(">") | None => return false,
            Some(other) if token == "*" || token == other => {}
            Some(_) => return false,
        }
    }
    wanted.next().is_none()
}

/// The subjects of every keyring's `dek.created`.
fn dek_created_subjects(prefix: &str) -> String {
    format!("{prefix}.events.*.{DEK_CREATED}")
}

/// How long the listener waits before it subscribes again after a subscription ended.
const RESUBSCRIBE_PAUSE: Duration = Duration::from_millis(200);

/// How often the listener looks whether the NATS connection was made again.
const RECONNECT_CHECK: Duration = Duration::from_secs(1);

/// Applies other replicas' `dek.created` events from `subscriber`, then from new subscriptions
/// should it end, until aborted. Each time listening (re)starts — this subscription, a new
/// one, the connection made again — what was published meanwhile is lost, so every cached
/// keyring reads LATEST again on its next use.
async fn listen(mut subscriber: async_nats::Subscriber, args: EventsArgs) {
    let statistics = args.nats.statistics();
    let connects = || {
        statistics
            .connects
            .load(std::sync::atomic::Ordering::Relaxed)
    };
    let mut seen_connects = connects();
    let mut why = "subscribed";
    loop {
        missed_events_possible(&args.registry, why);
        let mut reconnect_check = tokio::time::interval(RECONNECT_CHECK);
        reconnect_check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                message = subscriber.next() => match message {
                    Some(message) => apply_event(&args, &message).await,
                    None => break,
                },
                _ = reconnect_check.tick() => {
                    let now = connects();
                    if now != seen_connects {
                        seen_connects = now;
                        missed_events_possible(&args.registry, "reconnected");
                    }
                }
            }
        }
        tracing::warn!("key events: the subscription ended; subscribing again");
        // A pause even when subscribing works at once: a subscription that kept ending would
        // otherwise spin here, marking every keyring each time.
        tokio::time::sleep(RESUBSCRIBE_PAUSE).await;
        subscriber = subscribe_again(&args).await;
        why = "subscribed again";
    }
}

/// Subscribes to the events, retrying with a backoff until it can.
async fn subscribe_again(args: &EventsArgs) -> async_nats::Subscriber {
    let mut backoff = Duration::from_millis(200);
    loop {
        match args
            .nats
            .subscribe(dek_created_subjects(&args.prefix))
            .await
        {
            Ok(subscriber) => return subscriber,
            Err(error) => {
                tracing::warn!(%error, "key events: cannot subscribe; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
        }
    }
}

/// Marks every cached keyring to read LATEST again on its next use.
fn missed_events_possible(registry: &KeyringRegistry, why: &'static str) {
    let marked = registry.keyrings().refresh_all_on_next_use();
    if marked > 0 {
        tracing::info!(
            keyrings = marked,
            why,
            "key events may have been missed: cached keyrings read latest again on next use"
        );
    }
}

/// What a replica reads of another's `dek.created`. The rest (cause, previous key, time) is for
/// subscribers: in a rolling upgrade, a cause or field a newer replica adds must not make the
/// older ones drop its events as malformed.
#[derive(serde::Deserialize)]
struct AppliedDekCreated {
    keyring: String,
    key_id: String,
    replica: String,
}

/// Applies one `dek.created` from another replica: storage is read again for its keyring.
async fn apply_event(args: &EventsArgs, message: &async_nats::Message) {
    let event: AppliedDekCreated = match serde_json::from_slice(&message.payload) {
        Ok(event) => event,
        Err(error) => {
            tracing::warn!(subject = %message.subject, %error, "ignoring a malformed key event");
            return;
        }
    };
    if event.replica == args.replica {
        return;
    }
    // NATS permissions are per subject: a publisher allowed one keyring's subject must not
    // reach another keyring by naming it in the payload.
    if message.subject.as_str() != event_subject(&args.prefix, &event.keyring, DEK_CREATED) {
        tracing::warn!(
            subject = %message.subject,
            keyring = event.keyring,
            "ignoring a key event whose subject is not its keyring's"
        );
        return;
    }
    tracing::debug!(
        keyring = event.keyring,
        key_id = event.key_id,
        "applying a new latest key from another replica"
    );
    metrics::counter!("ringvault_events_applied_total").increment(1);
    args.registry
        .apply_latest(&event.keyring, &event.key_id)
        .await;
}

async fn publish(
    nats: &async_nats::Client,
    subject: String,
    msg_id: String,
    payload: Vec<u8>,
) -> Result<(), async_nats::Error> {
    let mut headers = HeaderMap::new();
    headers.insert(MSG_ID, msg_id.as_str());
    nats.publish_with_headers(subject, headers, payload.into())
        .await?;
    Ok(())
}

/// Publishes `kek.rolled` (roll-deks calls it after a roll).
pub async fn publish_kek_rolled(
    nats: &async_nats::Client,
    prefix: &str,
    event: &KekRolled,
) -> Result<(), async_nats::Error> {
    let payload = serde_json::to_vec(event)?;
    publish(
        nats,
        store_event_subject(prefix, KEK_ROLLED),
        event.msg_id(),
        payload,
    )
    .await?;
    nats.flush().await?;
    Ok(())
}

impl Actor for EventsActor {
    type Msg = EventsMsg;
    type State = EventsState;
    type Arguments = EventsArgs;

    async fn pre_start(
        &self,
        _myself: ActorRef<Self::Msg>,
        args: EventsArgs,
    ) -> Result<Self::State, ActorProcessingErr> {
        if let Some(stream) = &args.stream {
            ensure_stream(&args.nats, &args.prefix, stream).await?;
            tracing::info!(stream = stream.name, "key events are captured by jetstream");
        }
        // Subscribed here, so that a start that cannot subscribe fails (and is retried by the
        // supervisor); later subscriptions are the listener's.
        let subscriber = args
            .nats
            .subscribe(dek_created_subjects(&args.prefix))
            .await?;
        let listener = tokio::spawn(listen(subscriber, args.clone()));
        Ok(EventsState { args, listener })
    }

    async fn handle(
        &self,
        _myself: ActorRef<Self::Msg>,
        message: Self::Msg,
        state: &mut Self::State,
    ) -> Result<(), ActorProcessingErr> {
        match message {
            EventsMsg::DekCreated(event) => {
                let subject = event_subject(&state.args.prefix, &event.keyring, DEK_CREATED);
                let payload = serde_json::to_vec(&event)?;
                match publish(&state.args.nats, subject, event.msg_id(), payload).await {
                    Ok(()) => metrics::counter!("ringvault_events_published_total").increment(1),
                    Err(error) => {
                        tracing::warn!(keyring = event.keyring, %error, "could not publish a key event")
                    }
                }
            }
        }
        Ok(())
    }
}

/// The [`KeyEventSink`] of the service: hands events to the live events actor.
pub struct EventsHandle {
    actor: Arc<ActorSlot<EventsMsg>>,
    replica: String,
}

impl EventsHandle {
    /// A sink over the actor in `actor`, stamping events with `replica`.
    pub fn new(actor: Arc<ActorSlot<EventsMsg>>, replica: String) -> Self {
        Self { actor, replica }
    }
}

impl KeyEventSink for EventsHandle {
    fn dek_created(
        &self,
        keyring: &str,
        key_id: &str,
        previous_key_id: Option<&str>,
        cause: DekCause,
    ) {
        metrics::counter!("ringvault_rotations_total", "cause" => cause_name(cause)).increment(1);
        let event = DekCreated {
            version: EVENT_VERSION,
            keyring: keyring.to_owned(),
            key_id: key_id.to_owned(),
            previous_key_id: previous_key_id.map(str::to_owned),
            cause,
            time: crate::crypto::now_ms(),
            replica: self.replica.clone(),
        };
        let sent = self
            .actor
            .get()
            .map(|actor| actor.send_message(EventsMsg::DekCreated(event)).is_ok());
        if sent != Some(true) {
            tracing::warn!(
                keyring,
                key_id,
                "events actor unavailable: dek.created not published"
            );
        }
    }
}

fn cause_name(cause: DekCause) -> &'static str {
    match cause {
        DekCause::FirstUse => "first_use",
        DekCause::Manual => "manual",
        DekCause::Scheduled => "scheduled",
    }
}

#[cfg(test)]
mod tests {
    use super::subject_covers;

    #[test]
    fn subject_patterns_cover_as_nats_matches_them() {
        for (pattern, subject) in [
            ("vault.v1.events.>", "vault.v1.events.>"),
            ("vault.>", "vault.v1.events.>"),
            (">", "vault.v1.events.>"),
            ("vault.*.events.>", "vault.v1.events.>"),
        ] {
            assert!(
                subject_covers(pattern, subject),
                "{pattern} covers {subject}"
            );
        }
        for (pattern, subject) in [
            ("vault.v1.events.*", "vault.v1.events.>"),
            ("vault.v1.events", "vault.v1.events.>"),
            ("vault.v2.>", "vault.v1.events.>"),
            ("other.>", "vault.v1.events.>"),
        ] {
            assert!(
                !subject_covers(pattern, subject),
                "{pattern} does not cover {subject}"
            );
        }
    }
}
