//! Keyrings: the DEK lifecycle and the DEK cache.
//!
//! [`Keyrings`] is the process-wide set of keyrings. Each [`Keyring`] caches its LATEST DEK
//! and the DEKs looked up by id. The cache is read without locks or actor hops on the hot path;
//! loads, creation and rotation of one keyring are single-flight through its `load_lock`.
//!
//! Freshness of LATEST (measured from the last successful storage read):
//! - younger than `fresh_for` (1 h): served from cache;
//! - older, but younger than `max_stale` (24 h): served, and refreshed in the background;
//! - older than `max_stale`: never served without a successful storage read.
//!
//! A LATEST marked *due for a refresh* is treated as past `fresh_for`: served, and read again
//! on its next use. Marked are every keyring when key events may have been missed (the events
//! subscription was made again, the NATS connection came back), and a keyring whose reload
//! for a key event, background refresh or rotation failed (a failed refresh after a pause
//! that grows with each failure in a row).
//!
//! DEKs by id are immutable and stay until evicted. The cache holds at most `max_entries`
//! DEKs; the least recently used go first.

mod roll;
mod store;

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwapOption;
use dashmap::DashMap;
use tokio::time::Instant;

pub use roll::{roll_deks, RollReport};
pub use store::{KeyringStore, LatestRead, Rotated};

use crate::crypto::Dek;
use crate::error::{Error, Result};
use crate::lock_ignoring_poison;
use crate::protocol::DekCause;
use crate::storage::{validate_key_id, validate_keyring};

/// The least time between two reloads of one keyring's LATEST for key events. Anyone who may
/// publish on the events subject can send them, each naming a new key id; without a bound each
/// would be a storage read holding the keyring's load lock.
pub const EVENT_RELOAD_INTERVAL: Duration = Duration::from_millis(100);
/// How long past its start time a scheduled reload for key events may still not have started
/// before it counts as lost.
pub const EVENT_RELOAD_LOST_AFTER: Duration = Duration::from_secs(5);
/// Reloads for key events across all keyrings, at most, per second once a burst of as many is
/// spent: the per-keyring bound alone would let a flood of events naming every cached keyring
/// send a storage read per keyring every [`EVENT_RELOAD_INTERVAL`]. Over it, reloads wait
/// their turn (still one per keyring, covering every event meanwhile); real rotations are rare.
pub const EVENT_RELOADS_PER_SEC: u32 = 100;

/// The pause after the `failures`-th background refresh of one keyring's LATEST to fail in a
/// row: one second, doubling, at most a minute.
fn refresh_retry_pause(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(6);
    (Duration::from_secs(1) * (1 << doublings)).min(Duration::from_secs(60))
}

/// How often a manual rotation writes a new LATEST when each write loses to a rewrite of the
/// key it meant to replace.
const MANUAL_ROTATION_ATTEMPTS: usize = 3;

/// How long cached keys live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CachePolicy {
    /// LATEST is served from cache without a refresh while younger than this.
    pub fresh_for: Duration,
    /// LATEST is never served older than this without a successful storage read.
    pub max_stale: Duration,
    /// At most this many DEKs are cached; the least recently used are evicted.
    pub max_entries: usize,
}

impl Default for CachePolicy {
    fn default() -> Self {
        Self {
            fresh_for: Duration::from_secs(3600),
            max_stale: Duration::from_secs(24 * 3600),
            max_entries: 10_000,
        }
    }
}

/// When keyrings are rotated on schedule: a default age and per-keyring ages by pattern (the
/// first matching pattern wins). `None` means never.
#[derive(Debug, Clone, Default)]
pub struct RotationPolicy {
    /// Age of LATEST after which a keyring is rotated, unless a pattern says otherwise.
    pub default: Option<Duration>,
    /// Patterns and their ages.
    pub by_pattern: Vec<(String, Option<Duration>)>,
}

impl RotationPolicy {
    /// The rotation age of `keyring`, if it is rotated on schedule at all.
    pub fn rotate_after(&self, keyring: &str) -> Option<Duration> {
        self.by_pattern
            .iter()
            .find(|(pattern, _)| crate::pattern::matches(pattern, keyring))
            .map_or(self.default, |(_, age)| *age)
    }

    /// Whether any keyring is rotated on schedule.
    pub fn is_enabled(&self) -> bool {
        self.default.is_some() || self.by_pattern.iter().any(|(_, age)| age.is_some())
    }
}

/// The result of a rotation.
#[derive(Debug, Clone)]
pub struct Rotation {
    /// The DEK that is LATEST now.
    pub dek: Arc<Dek>,
    /// The DEK it replaced, if any.
    pub previous_key_id: Option<String>,
    /// False when another writer rotated first and its DEK is LATEST.
    pub won: bool,
}

/// LATEST as cached.
struct CachedLatest {
    dek: Arc<Dek>,
    /// The last use of the same key in the keyring's `deks`, shared so that the hot path
    /// stamps it without a second lookup.
    last_used: Arc<AtomicU64>,
    /// When the read (or the rotation) that found it finished.
    read_at: Instant,
    /// When that read started: the key is at least as new as LATEST was then.
    read_started: Instant,
}

/// A cached DEK and when it was last used, for LRU eviction: a value of the cache's clock,
/// which moves only when a key is inserted (by two: the new key takes the value between, so
/// that a key used after it ranks above it). A use stamps the clock's current value and writes
/// only when that moved, so that the requests of every core using one key do not each write
/// the same cache line, nor one clock per use. The order among keys used between two inserts
/// is not kept: they tie, all used since the last insert, and eviction happens on insert.
struct CachedDek {
    dek: Arc<Dek>,
    last_used: Arc<AtomicU64>,
}

/// One keyring's cache.
pub struct Keyring {
    name: String,
    latest: ArcSwapOption<CachedLatest>,
    deks: DashMap<String, CachedDek>,
    load_lock: tokio::sync::Mutex<()>,
    refreshing: AtomicBool,
    /// LATEST is to be read again on its next use, however fresh (see the module doc).
    refresh_due: AtomicBool,
    /// Background refreshes of LATEST that failed in a row.
    refresh_failures: std::sync::atomic::AtomicU32,
    /// The reloads for key events: scheduled, and last started.
    event_reload: std::sync::Mutex<EventReload>,
}

/// When a keyring's reload for key events is to start (scheduled, not started reading yet),
/// and when the last one started.
#[derive(Debug, Default, Clone, Copy)]
struct EventReload {
    scheduled: Option<Instant>,
    last_started: Option<Instant>,
}

impl std::fmt::Debug for Keyring {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyring")
            .field("name", &self.name)
            .field("cached_keys", &self.deks.len())
            .finish_non_exhaustive()
    }
}

impl Keyring {
    fn new(name: String) -> Self {
        Self {
            name,
            latest: ArcSwapOption::empty(),
            // A keyring holds a few keys: two shards, not DashMap's default of 4 × cores
            // cache-padded ones (1 KiB per keyring here, 32 KiB on a 64-core machine).
            deks: DashMap::with_shard_amount(2),
            load_lock: tokio::sync::Mutex::new(()),
            refreshing: AtomicBool::new(false),
            refresh_due: AtomicBool::new(false),
            refresh_failures: std::sync::atomic::AtomicU32::new(0),
            event_reload: std::sync::Mutex::new(EventReload::default()),
        }
    }

    /// Has LATEST read again on its next use, however fresh (see the module doc).
    fn mark_refresh_due(&self) {
        self.refresh_due.store(true, Ordering::Release);
    }

    /// The keyring's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The id of the cached LATEST, if any.
    pub fn cached_latest_id(&self) -> Option<String> {
        self.latest
            .load()
            .as_ref()
            .map(|latest| latest.dek.id().to_owned())
    }

    /// How many DEKs this keyring has cached.
    pub fn cached_keys(&self) -> usize {
        self.deks.len()
    }
}

/// Where key changes are announced (the events actor in the service).
pub trait KeyEventSink: Send + Sync + 'static {
    /// `key_id` became the keyring's LATEST, written by this process.
    fn dek_created(
        &self,
        keyring: &str,
        key_id: &str,
        previous_key_id: Option<&str>,
        cause: DekCause,
    );
}

struct Shared {
    store: KeyringStore,
    events: std::sync::OnceLock<Arc<dyn KeyEventSink>>,
    policy: CachePolicy,
    rings: DashMap<String, Arc<Keyring>>,
    entries: AtomicUsize,
    clock: AtomicU64,
    /// The start of the next free slot for a reload for key events, across all keyrings
    /// ([`EVENT_RELOADS_PER_SEC`]); `None` until the first.
    next_event_reload: std::sync::Mutex<Option<Instant>>,
}

/// The keyrings of this process and their cache. Cheap to clone.
///
/// ```
/// # #[tokio::main] async fn main() -> ringvault::Result<()> {
/// use std::sync::Arc;
/// use ringvault::crypto::{Kek, MasterKeys};
/// use ringvault::keyring::{CachePolicy, KeyringStore, Keyrings};
/// use ringvault::storage::Storage;
///
/// let master_keys = Arc::new(MasterKeys::new(Kek::generate(), [])?);
/// let keyrings = Keyrings::new(KeyringStore::new(Storage::in_memory(), master_keys), CachePolicy::default());
/// let dek = keyrings.latest("ws_42").await?;
/// let sealed = dek.seal(b"hello");
/// let opened = keyrings.dek("ws_42", &sealed.encryption_key_id).await?.open(sealed)?;
/// assert_eq!(opened, b"hello");
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Keyrings {
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Keyrings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Keyrings")
            .field("keyrings", &self.shared.rings.len())
            .field("cached_keys", &self.cached_keys())
            .field("policy", &self.shared.policy)
            .finish()
    }
}

impl Keyrings {
    /// An empty cache over `store`.
    pub fn new(store: KeyringStore, policy: CachePolicy) -> Self {
        Self {
            shared: Arc::new(Shared {
                store,
                events: std::sync::OnceLock::new(),
                policy,
                rings: DashMap::new(),
                entries: AtomicUsize::new(0),
                clock: AtomicU64::new(0),
                next_event_reload: std::sync::Mutex::new(None),
            }),
        }
    }

    /// Announces key changes to `sink` from now on (set once).
    pub fn set_event_sink(&self, sink: Arc<dyn KeyEventSink>) {
        let _ = self.shared.events.set(sink);
    }

    fn announce(
        &self,
        keyring: &str,
        key_id: &str,
        previous_key_id: Option<&str>,
        cause: DekCause,
    ) {
        if let Some(sink) = self.shared.events.get() {
            sink.dek_created(keyring, key_id, previous_key_id, cause);
        }
    }

    /// The names of the keyrings this process caches.
    pub fn cached_names(&self) -> Vec<String> {
        self.shared
            .rings
            .iter()
            .map(|ring| ring.key().clone())
            .collect()
    }

    /// Marks every cached keyring's LATEST due for a refresh: each is read again from storage
    /// on its next use, in the background, as a LATEST past `fresh_for` is. For when key
    /// events may have been missed; reading only the keyrings in use spreads the reads over
    /// their traffic instead of sending one per cached keyring at once. Returns how many were
    /// marked.
    pub fn refresh_all_on_next_use(&self) -> usize {
        let mut marked = 0;
        for ring in self.shared.rings.iter() {
            ring.mark_refresh_due();
            marked += 1;
        }
        marked
    }

    /// Marks keyring `name`'s LATEST due for a refresh, if it is cached.
    pub fn refresh_on_next_use(&self, name: &str) {
        if let Some(ring) = self.shared.rings.get(name) {
            ring.mark_refresh_due();
        }
    }

    /// The cached LATEST of keyring `name` with its creation time, without touching storage.
    pub fn peek_latest(&self, name: &str) -> Option<Arc<Dek>> {
        let ring = self.shared.rings.get(name)?;
        let guard = ring.latest.load();
        guard.as_ref().map(|latest| latest.dek.clone())
    }

    /// The storage side.
    pub fn store(&self) -> &KeyringStore {
        &self.shared.store
    }

    /// The cache policy.
    pub fn policy(&self) -> CachePolicy {
        self.shared.policy
    }

    /// How many DEKs are cached in all.
    pub fn cached_keys(&self) -> usize {
        self.shared.entries.load(Ordering::Relaxed)
    }

    /// How many keyrings are cached.
    pub fn cached_keyrings(&self) -> usize {
        self.shared.rings.len()
    }

    /// The keyring `name`, validated, from the cache or new. Private: only
    /// [`Keyrings::with_keyring`] calls it, which forgets the entry again if it stays empty.
    fn keyring(&self, name: &str) -> Result<Arc<Keyring>> {
        if let Some(ring) = self.shared.rings.get(name) {
            return Ok(ring.clone());
        }
        validate_keyring(name)?;
        Ok(self
            .shared
            .rings
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(Keyring::new(name.to_owned())))
            .clone())
    }

    /// The keyring's current DEK, for sealing: from cache while fresh, refreshed in the
    /// background once stale, read from storage past max-stale, and created on first use
    /// (only when storage says LATEST does not exist).
    pub async fn latest(&self, name: &str) -> Result<Arc<Dek>> {
        if let Some(dek) = self.cached_latest(name) {
            return Ok(dek);
        }
        self.with_keyring(
            name,
            |ring| async move { self.load_latest(&ring, false).await },
        )
        .await
    }

    /// Runs `operation` on keyring `name` (validated, from the cache or new), then forgets the
    /// keyring if it is left holding no key and no other request holds it: a lookup that found
    /// nothing (an unknown key id, a storage error) must not leave an entry behind, or requests
    /// naming ever new keyrings would grow the cache without bound.
    async fn with_keyring<T, F, Fut>(&self, name: &str, operation: F) -> Result<T>
    where
        F: FnOnce(Arc<Keyring>) -> Fut,
        Fut: std::future::Future<Output = Result<T>>,
    {
        let ring = self.keyring(name)?;
        let result = operation(ring).await;
        self.shared.rings.remove_if(name, |_, ring| {
            ring.deks.is_empty() && Arc::strong_count(ring) == 1
        });
        result
    }

    /// The hot path of [`Keyrings::latest`]: the cached LATEST if it may be served (fresh, or
    /// stale within max-stale, which starts a background refresh), without touching storage.
    pub fn cached_latest(&self, name: &str) -> Option<Arc<Dek>> {
        let ring = self.shared.rings.get(name)?;
        let guard = ring.latest.load();
        let latest = guard.as_ref()?;
        let age = latest.read_at.elapsed();
        if age >= self.shared.policy.max_stale {
            return None;
        }
        if age >= self.shared.policy.fresh_for || ring.refresh_due.load(Ordering::Acquire) {
            self.refresh_in_background(&ring);
        }
        self.touch(&latest.last_used);
        Some(latest.dek.clone())
    }

    /// The hot path of [`Keyrings::dek`]: the DEK if cached.
    pub fn cached_dek_of(&self, name: &str, key_id: &str) -> Option<Arc<Dek>> {
        let ring = self.shared.rings.get(name)?;
        self.cached_dek(&ring, key_id)
    }

    /// Whether this process caches anything of keyring `name`.
    pub fn is_cached(&self, name: &str) -> bool {
        self.shared.rings.contains_key(name)
    }

    /// The keyring's current DEK read from storage now, whatever the cache holds. Other
    /// keyrings' caches are untouched.
    pub async fn latest_from_storage(&self, name: &str) -> Result<Arc<Dek>> {
        self.with_keyring(
            name,
            |ring| async move { self.load_latest(&ring, true).await },
        )
        .await
    }

    /// The DEK `key_id` of the keyring, for opening. Unknown ids are `not_found`.
    pub async fn dek(&self, name: &str, key_id: &str) -> Result<Arc<Dek>> {
        if let Some(dek) = self.cached_dek_of(name, key_id) {
            return Ok(dek);
        }
        self.with_keyring(name, |ring| async move {
            validate_key_id(key_id)?;
            let _single_flight = ring.load_lock.lock().await;
            if let Some(dek) = self.cached_dek(&ring, key_id) {
                return Ok(dek);
            }
            let dek = self
                .shared
                .store
                .read_dek(name, key_id)
                .await?
                .ok_or_else(|| {
                    Error::not_found(format!("key {key_id:?} not found in keyring {name:?}"))
                })?;
            Ok(self.insert_dek(&ring, dek).0)
        })
        .await
    }

    /// Makes a new DEK the keyring's LATEST: ours, or a concurrent writer's that also replaced
    /// the key this call found. Never answers with the key it found.
    pub async fn rotate(&self, name: &str) -> Result<Rotation> {
        self.with_keyring(name, |ring| async move {
            let _single_flight = ring.load_lock.lock().await;
            for _ in 0..MANUAL_ROTATION_ATTEMPTS {
                let current = self.shared.store.read_latest(name).await?;
                let rotation = self.rotate_locked(&ring, current, DekCause::Manual).await?;
                // A lost write whose winner still holds the old key replaced nothing: LATEST
                // got a new version of the same key (`roll-deks` resealing it). Whoever asks
                // for a rotation wants the old key retired, so that is no answer.
                if rotation.won || rotation.previous_key_id.as_deref() != Some(rotation.dek.id()) {
                    return Ok(rotation);
                }
                tracing::info!(
                    keyring = name,
                    key_id = rotation.dek.id(),
                    "latest was rewritten with the same key during the rotation; rotating again"
                );
            }
            Err(Error::unavailable(format!(
                "keyring {name:?}: latest kept being rewritten during the rotation; try again"
            )))
        })
        .await
    }

    /// Rotates the keyring if the LATEST that storage holds now is at least `max_age` old
    /// (by its creation time); otherwise refreshes the cached LATEST. Two replicas noticing
    /// the same age rotate once: the second sees the first's fresh LATEST, or loses the
    /// conditional write.
    pub async fn rotate_if_older(&self, name: &str, max_age: Duration) -> Result<Option<Rotation>> {
        self.with_keyring(name, |ring| async move {
            let _single_flight = ring.load_lock.lock().await;
            let read_started = Instant::now();
            let Some(current) = self.shared.store.read_latest(name).await? else {
                return Ok(None);
            };
            let age_ms = crate::crypto::now_ms().saturating_sub(current.dek.created_at());
            if u128::try_from(age_ms).unwrap_or(0) < max_age.as_millis() {
                self.install_latest(&ring, current.dek, read_started);
                return Ok(None);
            }
            self.rotate_locked(&ring, Some(current), DekCause::Scheduled)
                .await
                .map(Some)
        })
        .await
    }

    async fn rotate_locked(
        &self,
        ring: &Arc<Keyring>,
        current: Option<LatestRead>,
        cause: DekCause,
    ) -> Result<Rotation> {
        // What the rotation installs is at least as new as LATEST now: ours replaces `current`,
        // which a conditional write proves still LATEST; a lost race re-reads after this.
        let read_started = Instant::now();
        let rotated = match self.shared.store.rotate(&ring.name, current.as_ref()).await {
            Ok(rotated) => rotated,
            Err(error) => {
                // Its LATEST write may have landed all the same (the answer lost, or late past
                // the timeout): the cached LATEST is read again on its next use, not kept for
                // `fresh_for` while storage says otherwise.
                ring.mark_refresh_due();
                return Err(error);
            }
        };
        let dek = self.install_latest(ring, rotated.dek, read_started);
        if rotated.won {
            self.announce(
                &ring.name,
                dek.id(),
                rotated.previous_key_id.as_deref(),
                cause,
            );
        }
        Ok(Rotation {
            dek,
            previous_key_id: rotated.previous_key_id,
            won: rotated.won,
        })
    }

    /// Schedules one reload of a cached keyring's LATEST for a key event: the wait before it
    /// may start (at most one per [`EVENT_RELOAD_INTERVAL`] per keyring, and
    /// [`EVENT_RELOADS_PER_SEC`] in all), or `None` when the keyring is not cached or a reload
    /// is scheduled already (it reads storage after this event arrived, so it covers this
    /// event too). [`Keyrings::apply_new_latest`] is that reload;
    /// [`Keyrings::cancel_event_reload`] gives the turn back if it cannot run. A scheduled
    /// reload still not started [`EVENT_RELOAD_LOST_AFTER`] past its start time (its message
    /// lost with a failed actor) no longer holds events back.
    pub fn schedule_event_reload(&self, name: &str) -> Option<Duration> {
        let ring = self.shared.rings.get(name)?;
        let mut reload = lock_ignoring_poison(&ring.event_reload);
        let now = Instant::now();
        if reload
            .scheduled
            .is_some_and(|due| now.saturating_duration_since(due) < EVENT_RELOAD_LOST_AFTER)
        {
            return None;
        }
        let keyring_turn = reload.last_started.map_or(Duration::ZERO, |last| {
            EVENT_RELOAD_INTERVAL.saturating_sub(now.saturating_duration_since(last))
        });
        let wait = keyring_turn.max(self.reserve_event_reload(now));
        reload.scheduled = Some(now + wait);
        Some(wait)
    }

    /// Takes the next free slot for a reload for key events across all keyrings: how long
    /// until it. A quiet spell leaves at most a second's worth of slots free at once.
    fn reserve_event_reload(&self, now: Instant) -> Duration {
        let spacing = Duration::from_secs(1) / EVENT_RELOADS_PER_SEC;
        let mut next = lock_ignoring_poison(&self.shared.next_event_reload);
        // The slots from here to now, now included, are a second's worth.
        let burst_start = now
            .checked_sub(spacing * (EVENT_RELOADS_PER_SEC - 1))
            .unwrap_or(now);
        let slot = next.map_or(burst_start, |next| next.max(burst_start));
        *next = Some(slot + spacing);
        slot.saturating_duration_since(now)
    }

    /// A scheduled reload for key events that could not be delivered: the next event
    /// schedules one again. Returns whether one was scheduled.
    pub fn cancel_event_reload(&self, name: &str) -> bool {
        self.shared.rings.get(name).is_some_and(|ring| {
            lock_ignoring_poison(&ring.event_reload)
                .scheduled
                .take()
                .is_some()
        })
    }

    /// Reloads LATEST for key events, another replica having announced `key_id` as the
    /// keyring's LATEST. The announcement is only a hint: anyone allowed to publish on the
    /// subject could send one (naming an older key, to roll the keyring back), so LATEST is
    /// read again from storage, which alone decides. It is read even when `key_id` is cached
    /// as LATEST already: events coalesced into this reload may have named a newer key.
    /// Does nothing for keyrings this process never used.
    pub async fn apply_new_latest(&self, name: &str, key_id: &str) -> Result<()> {
        let Some(ring) = self.shared.rings.get(name).map(|ring| ring.clone()) else {
            return Ok(());
        };
        // From here on, storage is read after any event that arrives: such an event needs a
        // reload of its own.
        *lock_ignoring_poison(&ring.event_reload) = EventReload {
            scheduled: None,
            last_started: Some(Instant::now()),
        };
        if let Err(error) = self.reload_latest(&ring).await {
            // Another replica's key would otherwise wait for `fresh_for`: the next use tries.
            ring.mark_refresh_due();
            return Err(error);
        }
        if !key_id.is_empty() && ring.cached_latest_id().as_deref() != Some(key_id) {
            tracing::debug!(
                keyring = name,
                key_id,
                "a key event named a key that storage does not have as latest; storage wins"
            );
        }
        Ok(())
    }

    /// Reads LATEST from storage and caches it; if it has disappeared, the cached key stays
    /// (until max-stale).
    async fn reload_latest(&self, ring: &Arc<Keyring>) -> Result<()> {
        let _single_flight = ring.load_lock.lock().await;
        let read_started = Instant::now();
        match self.shared.store.read_latest(&ring.name).await? {
            Some(read) => {
                self.install_latest(ring, read.dek, read_started);
            }
            None => tracing::warn!(
                keyring = ring.name,
                "latest disappeared from storage; serving the cached key until max-stale"
            ),
        }
        Ok(())
    }

    fn cached_dek(&self, ring: &Keyring, key_id: &str) -> Option<Arc<Dek>> {
        let cached = ring.deks.get(key_id)?;
        self.touch(&cached.last_used);
        Some(cached.dek.clone())
    }

    /// Stamps a use of a cached key (see [`CachedDek`]). Never backwards: a use that read the
    /// clock before an insert moved it must not undo a later use's stamp.
    fn touch(&self, last_used: &AtomicU64) {
        let now = self.shared.clock.load(Ordering::Relaxed);
        if last_used.load(Ordering::Relaxed) < now {
            last_used.fetch_max(now, Ordering::Relaxed);
        }
    }

    /// Reads LATEST (creating the first DEK on an explicit not-found), single-flight per
    /// keyring. Unless `force`, a load that finished while we waited, or a fresh one, is
    /// reused; with `force`, one that *started* while we waited is (it saw what storage held
    /// after we asked), so that a burst of forced reads of one keyring costs a few storage
    /// reads, not one each behind the keyring's lock.
    async fn load_latest(&self, ring: &Arc<Keyring>, force: bool) -> Result<Arc<Dek>> {
        let waited_since = Instant::now();
        let _single_flight = ring.load_lock.lock().await;
        if let Some(latest) = ring.latest.load().as_ref() {
            let reusable = if force {
                latest.read_started >= waited_since
            } else {
                latest.read_at >= waited_since
                    || latest.read_at.elapsed() < self.shared.policy.fresh_for
            };
            if reusable {
                return Ok(latest.dek.clone());
            }
        }
        let store = &self.shared.store;
        let read_started = Instant::now();
        if let Some(read) = store.read_latest(&ring.name).await? {
            return Ok(self.install_latest(ring, read.dek, read_started));
        }
        let created = store.create_first(&ring.name).await?;
        let dek = self.install_latest(ring, created.dek, read_started);
        if created.won {
            self.announce(&ring.name, dek.id(), None, DekCause::FirstUse);
        }
        Ok(dek)
    }

    fn refresh_in_background(&self, ring: &Arc<Keyring>) {
        if ring.refreshing.swap(true, Ordering::AcqRel) {
            return;
        }
        // Cleared before the read: a mark made while it runs asks for another read after it.
        ring.refresh_due.store(false, Ordering::Release);
        let keyrings = self.clone();
        let ring = ring.clone();
        tokio::spawn(async move {
            match keyrings.reload_latest(&ring).await {
                Ok(()) => ring.refresh_failures.store(0, Ordering::Relaxed),
                Err(error) => {
                    let failures = ring.refresh_failures.fetch_add(1, Ordering::Relaxed) + 1;
                    let pause = refresh_retry_pause(failures);
                    tracing::warn!(
                        keyring = ring.name,
                        %error,
                        retry_in_ms = u64::try_from(pause.as_millis()).unwrap_or(u64::MAX),
                        "background refresh of latest failed"
                    );
                    // Still `refreshing` through the pause, so no use starts another read: an
                    // error storage does not retry (a revoked credential) would otherwise cost
                    // a read per request. A marked keyring is not past `fresh_for`: without the
                    // mark after it, no use would try again.
                    tokio::time::sleep(pause).await;
                    ring.mark_refresh_due();
                }
            }
            ring.refreshing.store(false, Ordering::Release);
        });
    }

    /// Caches `dek` as the keyring's LATEST, read from storage now.
    fn install_latest(&self, ring: &Arc<Keyring>, dek: Dek, read_started: Instant) -> Arc<Dek> {
        // Should eviction take this key between the two lines, LATEST keeps a stamp no entry
        // shares: its uses then go unstamped until the key is cached again and LATEST with it
        // (a refresh), and a lookup by id of the re-cached key stamps that entry as usual.
        let (dek, last_used) = self.insert_dek(ring, dek);
        ring.latest.store(Some(Arc::new(CachedLatest {
            dek: dek.clone(),
            last_used,
            read_at: Instant::now(),
            read_started,
        })));
        dek
    }

    /// Caches `dek` by id, reusing an equal cached one, and keeps the cache within capacity.
    /// Returns the cached key and its last-use stamp.
    fn insert_dek(&self, ring: &Arc<Keyring>, dek: Dek) -> (Arc<Dek>, Arc<AtomicU64>) {
        let mut inserted = false;
        // In a block of its own: the entry holds its shard's lock, which eviction below takes.
        let cached = {
            let entry = ring.deks.entry(dek.id().to_owned()).or_insert_with(|| {
                inserted = true;
                let stamp = self.shared.clock.fetch_add(2, Ordering::Relaxed) + 1;
                CachedDek {
                    dek: Arc::new(dek),
                    last_used: Arc::new(AtomicU64::new(stamp)),
                }
            });
            if !inserted {
                self.touch(&entry.last_used);
            }
            (entry.dek.clone(), entry.last_used.clone())
        };
        if inserted {
            let entries = self.shared.entries.fetch_add(1, Ordering::AcqRel) + 1;
            if entries > self.shared.policy.max_entries {
                self.evict_least_recently_used();
            }
        }
        cached
    }

    /// Evicts the least recently used DEKs until the cache is within capacity, with a little
    /// slack so that a full cache does not scan on every insert.
    fn evict_least_recently_used(&self) {
        let max_entries = self.shared.policy.max_entries;
        let entries = self.shared.entries.load(Ordering::Acquire);
        if entries <= max_entries {
            return;
        }
        let slack = (max_entries / 64).max(1).min(max_entries);
        let to_evict = entries - max_entries + slack - 1;
        let mut candidates: Vec<(u64, Arc<Keyring>, String)> = Vec::with_capacity(entries);
        for ring in self.shared.rings.iter() {
            for cached in ring.deks.iter() {
                candidates.push((
                    cached.last_used.load(Ordering::Relaxed),
                    ring.value().clone(),
                    cached.key().clone(),
                ));
            }
        }
        let to_evict = to_evict.min(candidates.len());
        if to_evict == 0 {
            return;
        }
        if to_evict < candidates.len() {
            candidates.select_nth_unstable_by_key(to_evict - 1, |(last_used, _, _)| *last_used);
        }
        candidates.truncate(to_evict);
        let mut emptied = Vec::new();
        for (_, ring, key_id) in candidates.drain(..) {
            if ring.deks.remove(&key_id).is_some() {
                self.shared.entries.fetch_sub(1, Ordering::AcqRel);
            }
            if ring.cached_latest_id().as_deref() == Some(key_id.as_str()) {
                ring.latest.store(None);
            }
            if ring.deks.is_empty() {
                emptied.push(ring.name.clone());
            }
        }
        // Forget keyrings left empty that no request holds (the map's is the only Arc).
        for name in emptied {
            self.shared.rings.remove_if(&name, |_, ring| {
                ring.deks.is_empty() && Arc::strong_count(ring) == 1
            });
        }
        tracing::debug!(evicted = to_evict, "evicted least recently used keys");
    }
}

#[cfg(test)]
mod tests;
