//! Cache behaviour under a paused clock, single-flight creation, eviction.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::crypto::{Kek, MasterKeys};
use crate::storage::{Faults, FaultyStorage, ObjectStoreBackend, Storage, StoragePolicy};
use crate::Kind;

const HOUR: Duration = Duration::from_secs(3600);

fn keyrings_with(policy: CachePolicy) -> (Keyrings, Arc<Faults>) {
    let (faulty, faults) = FaultyStorage::new(Arc::new(ObjectStoreBackend::in_memory()));
    let storage = Storage::new(
        Arc::new(faulty),
        StoragePolicy {
            timeout: Duration::from_millis(200),
            initial_backoff: Duration::from_millis(10),
        },
    );
    let master_keys = Arc::new(MasterKeys::new(Kek::generate(), []).unwrap());
    (
        Keyrings::new(KeyringStore::new(storage, master_keys), policy),
        faults,
    )
}

fn calls(faults: &Faults) -> usize {
    faults.calls.load(Ordering::SeqCst)
}

/// Lets spawned background work run to completion under the paused clock.
async fn settle() {
    for _ in 0..10 {
        tokio::task::yield_now().await;
    }
}

#[tokio::test(start_paused = true)]
async fn fresh_latest_is_served_from_cache() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    let after_create = calls(&faults);
    tokio::time::advance(HOUR - Duration::from_secs(1)).await;
    let again = keyrings.latest("ws_1").await.unwrap();
    assert_eq!(first.id(), again.id());
    settle().await;
    assert_eq!(
        calls(&faults),
        after_create,
        "a fresh hit must not touch storage"
    );
}

/// Caches `name`'s LATEST in `keyrings`, then rotates it as another replica would, behind
/// their back: the key cached, and the rotation.
async fn rotated_behind_the_cache(keyrings: &Keyrings, name: &str) -> (Arc<Dek>, Rotation) {
    let first = keyrings.latest(name).await.unwrap();
    let other = Keyrings::new(keyrings.store().clone(), CachePolicy::default());
    let rotated = other.rotate(name).await.unwrap();
    assert_ne!(rotated.dek.id(), first.id());
    (first, rotated)
}

#[tokio::test(start_paused = true)]
async fn stale_latest_is_served_and_refreshed_in_background() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let (first, rotated) = rotated_behind_the_cache(&keyrings, "ws_1").await;

    tokio::time::advance(HOUR + Duration::from_secs(1)).await;
    let before = calls(&faults);
    let served = keyrings.latest("ws_1").await.unwrap();
    assert_eq!(served.id(), first.id(), "stale value is served at once");
    settle().await;
    assert!(calls(&faults) > before, "a refresh went to storage");
    let refreshed = keyrings.latest("ws_1").await.unwrap();
    assert_eq!(
        refreshed.id(),
        rotated.dek.id(),
        "the refresh installed the new LATEST"
    );
}

#[tokio::test(start_paused = true)]
async fn a_fresh_latest_marked_for_refresh_is_read_again_on_its_next_use() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let (first, rotated) = rotated_behind_the_cache(&keyrings, "ws_1").await;
    assert_eq!(keyrings.refresh_all_on_next_use(), 1);
    let before = calls(&faults);
    assert_eq!(
        keyrings.latest("ws_1").await.unwrap().id(),
        first.id(),
        "the cached key is served at once"
    );
    settle().await;
    assert!(calls(&faults) > before, "a refresh went to storage");
    assert_eq!(
        keyrings.latest("ws_1").await.unwrap().id(),
        rotated.dek.id()
    );
    // Done once: fresh again, the next uses stay in the cache.
    let after_refresh = calls(&faults);
    keyrings.latest("ws_1").await.unwrap();
    settle().await;
    assert_eq!(calls(&faults), after_refresh);
}

#[tokio::test(start_paused = true)]
async fn a_reload_for_a_key_event_that_fails_is_tried_again_on_next_use() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let (first, rotated) = rotated_behind_the_cache(&keyrings, "ws_1").await;
    faults.set_down(true);
    let error = keyrings
        .apply_new_latest("ws_1", rotated.dek.id())
        .await
        .unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    faults.set_down(false);
    assert_eq!(keyrings.latest("ws_1").await.unwrap().id(), first.id());
    settle().await;
    assert_eq!(
        keyrings.latest("ws_1").await.unwrap().id(),
        rotated.dek.id(),
        "the use after the failed reload read storage again"
    );
}

/// A flood of key events naming every cached keyring costs storage reads at a bounded rate
/// overall, not one per keyring per [`EVENT_RELOAD_INTERVAL`]; each keyring still gets one
/// reload, covering every event for it until it starts.
#[tokio::test(start_paused = true)]
async fn reloads_for_key_events_across_keyrings_are_paced_after_a_burst() {
    let (keyrings, _faults) = keyrings_with(CachePolicy::default());
    let per_sec = EVENT_RELOADS_PER_SEC as usize;
    let count = per_sec * 8;
    let name = |index: usize| format!("ws_{index}");
    for index in 0..count {
        keyrings.latest(&name(index)).await.unwrap();
    }
    let waits: Vec<Duration> = (0..count)
        .map(|index| keyrings.schedule_event_reload(&name(index)).unwrap())
        .collect();
    let spacing = Duration::from_secs(1) / EVENT_RELOADS_PER_SEC;
    assert!(
        waits[..per_sec].iter().all(Duration::is_zero),
        "a second's worth at once"
    );
    for (later, wait) in waits[per_sec..].iter().enumerate() {
        assert_eq!(*wait, spacing * (later as u32 + 1), "then one slot each");
    }
    let last = name(count - 1);
    let last_wait = waits[count - 1];
    assert!(last_wait > EVENT_RELOAD_LOST_AFTER);
    // Waiting its turn, a reload is not lost, however long the turn: it covers new events.
    tokio::time::advance(last_wait - Duration::from_millis(1)).await;
    assert_eq!(keyrings.schedule_event_reload(&last), None);
    // Never started long after its turn (its message lost): no longer holds events back.
    tokio::time::advance(EVENT_RELOAD_LOST_AFTER + Duration::from_millis(2)).await;
    assert!(keyrings.schedule_event_reload(&last).is_some());
}

/// A rotation whose LATEST write landed but whose answer, and every retry, failed leaves the
/// caller an error; the cached LATEST is then read again on its next use rather than kept for
/// `fresh_for` while storage holds the new key.
#[tokio::test]
async fn a_failed_rotation_whose_latest_landed_is_read_on_next_use() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    faults.down_after_lost_answer.store(true, Ordering::SeqCst);
    faults.lose_next_latest_answer.store(true, Ordering::SeqCst);
    keyrings.rotate("ws_1").await.unwrap_err();
    faults.set_down(false);
    let stored = keyrings.store().read_latest("ws_1").await.unwrap().unwrap();
    assert_ne!(stored.dek.id(), first.id(), "the rotation's LATEST landed");
    assert_eq!(keyrings.latest("ws_1").await.unwrap().id(), first.id());
    settle().await;
    assert!(
        eventually_latest(&keyrings, "ws_1", stored.dek.id()).await,
        "the next use read the landed LATEST"
    );
}

/// Whether `keyrings` caches `key_id` as `name`'s LATEST within a second of real time.
async fn eventually_latest(keyrings: &Keyrings, name: &str, key_id: &str) -> bool {
    for _ in 0..100 {
        if keyrings
            .peek_latest(name)
            .is_some_and(|dek| dek.id() == key_id)
        {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    false
}

/// A refresh that keeps failing is tried again after a pause that grows, not on every use: an
/// error storage does not retry would otherwise cost a storage read per request.
#[tokio::test(start_paused = true)]
async fn a_refresh_that_keeps_failing_waits_longer_each_time() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let (first, rotated) = rotated_behind_the_cache(&keyrings, "ws_1").await;
    keyrings.refresh_all_on_next_use();
    faults.set_down(true);
    let use_and_wait = |wait: Duration| {
        let keyrings = keyrings.clone();
        let first = first.clone();
        async move {
            assert_eq!(keyrings.latest("ws_1").await.unwrap().id(), first.id());
            // In steps: a retry's sleep is only armed once the one before it has fired.
            for _ in 0..wait.as_millis() / 10 {
                tokio::time::advance(Duration::from_millis(10)).await;
                settle().await;
            }
        }
    };
    // The first refresh starts with the first use and fails within the storage budget.
    use_and_wait(Duration::from_millis(500)).await;
    let after_first = calls(&faults);
    assert!(after_first > 0);
    for _ in 0..5 {
        use_and_wait(Duration::from_millis(10)).await;
    }
    assert_eq!(
        calls(&faults),
        after_first,
        "uses during the pause read nothing"
    );
    // After the first pause (1 s from the failure), a use tries again, and fails again.
    use_and_wait(Duration::from_millis(800)).await;
    use_and_wait(Duration::from_millis(500)).await;
    let after_second = calls(&faults);
    assert!(after_second > after_first, "tried again after the pause");
    // The second pause is 2 s: 1.2 s on, a use still reads nothing.
    use_and_wait(Duration::from_millis(1200)).await;
    use_and_wait(Duration::from_millis(10)).await;
    assert_eq!(calls(&faults), after_second, "the second pause is longer");
    faults.set_down(false);
    use_and_wait(Duration::from_secs(1)).await;
    use_and_wait(Duration::from_millis(500)).await;
    assert_eq!(
        keyrings.peek_latest("ws_1").unwrap().id(),
        rotated.dek.id(),
        "storage back: the next try read the new LATEST"
    );
}

#[tokio::test(start_paused = true)]
async fn stale_latest_survives_a_failing_refresh_until_max_stale() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    faults.set_down(true);
    tokio::time::advance(Duration::from_secs(23 * 3600)).await;
    assert_eq!(keyrings.latest("ws_1").await.unwrap().id(), first.id());
    tokio::time::advance(Duration::from_secs(2 * 3600)).await;
    let error = keyrings.latest("ws_1").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    // Storage back: served again after a successful read, same key, nothing created.
    faults.set_down(false);
    assert_eq!(keyrings.latest("ws_1").await.unwrap().id(), first.id());
}

#[tokio::test(start_paused = true)]
async fn unknown_keyring_with_storage_down_is_unavailable_and_creates_nothing() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    faults.set_down(true);
    let error = keyrings.latest("ws_new").await.unwrap_err();
    assert_eq!(error.kind(), Kind::Unavailable, "{error}");
    faults.set_down(false);
    let puts_before = faults.puts.load(Ordering::SeqCst);
    keyrings.latest("ws_new").await.unwrap();
    assert_eq!(
        faults.puts.load(Ordering::SeqCst) - puts_before,
        2,
        "one DEK object and one LATEST"
    );
}

#[tokio::test(start_paused = true)]
async fn cached_deks_by_id_survive_storage_outage() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let dek = keyrings.latest("ws_1").await.unwrap();
    let sealed = dek.seal(b"payload");
    faults.set_down(true);
    tokio::time::advance(Duration::from_secs(48 * 3600)).await;
    let opened = keyrings
        .dek("ws_1", &sealed.encryption_key_id)
        .await
        .unwrap()
        .open(sealed.clone())
        .unwrap();
    assert_eq!(opened, b"payload");
}

#[tokio::test(start_paused = true)]
async fn capacity_evicts_least_recently_used() {
    let policy = CachePolicy {
        max_entries: 64,
        ..CachePolicy::default()
    };
    let (keyrings, faults) = keyrings_with(policy);
    let mut ids = Vec::new();
    for index in 0..64 {
        let dek = keyrings.latest(&format!("ws_{index}")).await.unwrap();
        ids.push(dek.id().to_owned());
    }
    assert_eq!(keyrings.cached_keys(), 64);
    // Touch ws_0 so that ws_1 is the least recently used.
    keyrings.dek("ws_0", &ids[0]).await.unwrap();
    keyrings.latest("ws_64").await.unwrap();
    assert!(keyrings.cached_keys() <= 64, "{}", keyrings.cached_keys());
    let before = calls(&faults);
    keyrings.dek("ws_0", &ids[0]).await.unwrap();
    assert_eq!(calls(&faults), before, "recently used key stayed cached");
    keyrings.dek("ws_1", &ids[1]).await.unwrap();
    assert!(
        calls(&faults) > before,
        "least recently used key was evicted"
    );
}

/// A key used after the last insert ranks above the key that insert brought: with room for
/// two, A, B, a use of A, then C evicts B.
#[tokio::test(start_paused = true)]
async fn a_use_after_an_insert_ranks_above_the_inserted_key() {
    let policy = CachePolicy {
        max_entries: 2,
        ..CachePolicy::default()
    };
    let (keyrings, faults) = keyrings_with(policy);
    let a = keyrings.latest("ws_a").await.unwrap().id().to_owned();
    let b = keyrings.latest("ws_b").await.unwrap().id().to_owned();
    keyrings.dek("ws_a", &a).await.unwrap();
    keyrings.latest("ws_c").await.unwrap();
    let before = calls(&faults);
    keyrings.dek("ws_a", &a).await.unwrap();
    assert_eq!(calls(&faults), before, "ws_a, used after ws_b came, stayed");
    keyrings.dek("ws_b", &b).await.unwrap();
    assert!(calls(&faults) > before, "ws_b went");
}

/// A use of LATEST from the cache (the hot path, which stamps the use without looking the key
/// up by id) keeps the key from eviction as a lookup by id does.
#[tokio::test(start_paused = true)]
async fn a_cached_latest_use_counts_for_eviction() {
    let policy = CachePolicy {
        max_entries: 4,
        ..CachePolicy::default()
    };
    let (keyrings, faults) = keyrings_with(policy);
    let mut ids = Vec::new();
    for name in ["ws_a", "ws_b", "ws_c", "ws_d"] {
        ids.push(keyrings.latest(name).await.unwrap().id().to_owned());
    }
    let before = calls(&faults);
    keyrings.latest("ws_a").await.unwrap();
    assert_eq!(calls(&faults), before, "served from the cache");
    keyrings.latest("ws_e").await.unwrap();
    let before = calls(&faults);
    keyrings.dek("ws_a", &ids[0]).await.unwrap();
    assert_eq!(
        calls(&faults),
        before,
        "ws_a's key, just used, stayed cached"
    );
    keyrings.dek("ws_b", &ids[1]).await.unwrap();
    assert!(
        calls(&faults) > before,
        "ws_b's key, the least recently used, went"
    );
}

#[tokio::test]
async fn concurrent_first_use_creates_exactly_one_dek() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let tasks: Vec<_> = (0..64)
        .map(|_| {
            let keyrings = keyrings.clone();
            tokio::spawn(async move { keyrings.latest("ws_race").await.unwrap().id().to_owned() })
        })
        .collect();
    let mut ids = std::collections::HashSet::new();
    for task in tasks {
        ids.insert(task.await.unwrap());
    }
    assert_eq!(ids.len(), 1);
    assert_eq!(faults.puts.load(Ordering::SeqCst), 2);
    let stored: Vec<String> =
        futures::TryStreamExt::try_collect(keyrings.store().storage().list("keyring/ws_race/"))
            .await
            .unwrap();
    assert_eq!(stored.len(), 2, "{stored:?}");
}

#[tokio::test]
async fn unknown_key_id_and_invalid_names_are_errors() {
    let (keyrings, _) = keyrings_with(CachePolicy::default());
    keyrings.latest("ws_1").await.unwrap();
    let error = keyrings.dek("ws_1", "dek_nope").await.unwrap_err();
    assert_eq!(error.kind(), Kind::NotFound);
    let error = keyrings.dek("ws_1", "../../x").await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument);
    let error = keyrings.latest("a//b").await.unwrap_err();
    assert_eq!(error.kind(), Kind::InvalidArgument);
}

#[tokio::test]
async fn rotation_makes_a_new_latest_and_keeps_old_keys() {
    let (keyrings, _) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    let sealed = first.seal(b"old");
    let rotation = keyrings.rotate("ws_1").await.unwrap();
    assert!(rotation.won);
    assert_eq!(rotation.previous_key_id.as_deref(), Some(first.id()));
    assert_eq!(
        keyrings.latest("ws_1").await.unwrap().id(),
        rotation.dek.id()
    );
    let fresh = Keyrings::new(keyrings.store().clone(), CachePolicy::default());
    assert_eq!(fresh.latest("ws_1").await.unwrap().id(), rotation.dek.id());
    let opened = fresh
        .dek("ws_1", first.id())
        .await
        .unwrap()
        .open(sealed.clone())
        .unwrap();
    assert_eq!(opened, b"old");
}

/// A backend whose calls yield to the scheduler before running, so concurrent callers interleave.
struct Yielding(Arc<dyn crate::storage::ObjectStorage>);

#[async_trait::async_trait]
impl crate::storage::ObjectStorage for Yielding {
    async fn get(
        &self,
        key: &str,
    ) -> std::result::Result<Option<crate::storage::Stored>, crate::storage::StorageError> {
        tokio::task::yield_now().await;
        self.0.get(key).await
    }

    async fn put(
        &self,
        key: &str,
        bytes: bytes::Bytes,
        condition: crate::storage::PutCondition,
    ) -> std::result::Result<(), crate::storage::StorageError> {
        tokio::task::yield_now().await;
        self.0.put(key, bytes, condition).await
    }

    fn list(
        &self,
        prefix: &str,
    ) -> futures::stream::BoxStream<
        'static,
        std::result::Result<String, crate::storage::StorageError>,
    > {
        self.0.list(prefix)
    }

    async fn delete(&self, key: &str) -> std::result::Result<(), crate::storage::StorageError> {
        tokio::task::yield_now().await;
        self.0.delete(key).await
    }

    fn supports_conditional_writes(&self) -> bool {
        self.0.supports_conditional_writes()
    }

    fn describe(&self) -> String {
        format!("yielding {}", self.0.describe())
    }
}

#[tokio::test]
async fn two_instances_racing_first_use_agree_and_keep_every_dek_object() {
    // The in-memory store enforces create-if-absent atomically: one writer wins LATEST, and
    // the loser uses the winner's key but keeps the DEK object it wrote first (a "lost" write
    // may be a retry meeting its own landed write, which others may have read). Every call
    // yields first, so that the two instances really interleave (both miss LATEST, both write
    // a DEK, one wins LATEST).
    let storage = Storage::new(
        Arc::new(Yielding(Arc::new(ObjectStoreBackend::in_memory()))),
        StoragePolicy::default(),
    );
    let store = KeyringStore::new(
        storage,
        Arc::new(MasterKeys::new(Kek::generate(), []).unwrap()),
    );
    let one = Keyrings::new(store.clone(), CachePolicy::default());
    let two = Keyrings::new(store.clone(), CachePolicy::default());
    let rings: Vec<String> = (0..20).map(|index| format!("ws_race_{index:02}")).collect();
    let raced = futures::future::join_all(rings.iter().map(|ring| {
        let (one, two) = (&one, &two);
        async move {
            let (a, b) = tokio::join!(one.latest(ring), two.latest(ring));
            (ring.clone(), a.unwrap(), b.unwrap())
        }
    }))
    .await;
    let mut lost = 0;
    for (ring, a, b) in &raced {
        assert_eq!(
            a.id(),
            b.id(),
            "{ring}: both instances use the winner's key"
        );
        let prefix = format!("{}{ring}/", crate::storage::KEYRING_ROOT);
        let keys: Vec<String> =
            futures::StreamExt::collect::<Vec<_>>(store.storage().list(&prefix))
                .await
                .into_iter()
                .map(|key| key.unwrap())
                .collect();
        let deks: Vec<&String> = keys
            .iter()
            .filter(|key| key.as_str() != crate::storage::latest_key(ring))
            .collect();
        assert!((1..=2).contains(&deks.len()), "{ring}: {keys:?}");
        assert!(
            deks.contains(&&crate::storage::dek_key(ring, a.id())),
            "{ring}: {keys:?}"
        );
        if deks.len() == 2 {
            lost += 1;
        }
    }
    assert!(lost > 0, "no keyring where the two instances really raced");
}

#[tokio::test]
async fn a_key_event_naming_an_older_key_does_not_roll_latest_back() {
    let (keyrings, _faults) = keyrings_with(CachePolicy::default());
    let older = keyrings.latest("ws_1").await.unwrap();
    let rotation = keyrings.rotate("ws_1").await.unwrap();
    assert_ne!(rotation.dek.id(), older.id());
    // A forged (or very late) event: the older key exists in storage, but is not LATEST there.
    keyrings.apply_new_latest("ws_1", older.id()).await.unwrap();
    assert_eq!(
        keyrings.peek_latest("ws_1").unwrap().id(),
        rotation.dek.id(),
        "storage decides what LATEST is"
    );
    // An event for a key that does not exist at all changes nothing either.
    keyrings
        .apply_new_latest("ws_1", "dek_unknown")
        .await
        .unwrap();
    assert_eq!(
        keyrings.peek_latest("ws_1").unwrap().id(),
        rotation.dek.id()
    );
}

/// Lookups that find nothing leave no cached keyring behind: an unknown key id, an invalid
/// one, a storage outage, a keyring with no LATEST asked to rotate by age. A keyring that
/// holds a key stays.
#[tokio::test]
async fn lookups_that_find_nothing_cache_no_keyring() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    for index in 0..100 {
        let name = format!("ws_1/random-{index}");
        let error = keyrings.dek(&name, "dek_nope").await.unwrap_err();
        assert_eq!(error.kind(), Kind::NotFound, "{error}");
        let error = keyrings.dek(&name, "../x").await.unwrap_err();
        assert_eq!(error.kind(), Kind::InvalidArgument, "{error}");
        assert!(keyrings
            .rotate_if_older(&name, HOUR)
            .await
            .unwrap()
            .is_none());
    }
    assert_eq!(keyrings.cached_keyrings(), 0);

    faults.down.store(true, Ordering::SeqCst);
    assert!(keyrings.latest("ws_1/down").await.is_err());
    assert!(keyrings.rotate("ws_1/down").await.is_err());
    assert_eq!(keyrings.cached_keyrings(), 0);

    faults.down.store(false, Ordering::SeqCst);
    let dek = keyrings.latest("ws_1/used").await.unwrap();
    assert!(keyrings.dek("ws_1/used", "dek_nope").await.is_err());
    assert_eq!(keyrings.cached_keyrings(), 1);
    assert_eq!(
        keyrings.dek("ws_1/used", dek.id()).await.unwrap().id(),
        dek.id()
    );
}

/// A conditional write of LATEST that landed but whose answer was lost is retried, and the
/// retry finds LATEST taken — by our own key. That is a win: the key is used, and announced.
#[tokio::test]
async fn a_retry_that_meets_its_own_landed_latest_is_a_win() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    faults.lose_next_latest_answer.store(true, Ordering::SeqCst);
    let rotation = keyrings.rotate("ws_1").await.unwrap();
    assert!(rotation.won, "a rotation whose write landed is a win");
    assert_ne!(rotation.dek.id(), first.id());
    assert_eq!(
        keyrings
            .store()
            .read_latest("ws_1")
            .await
            .unwrap()
            .unwrap()
            .dek
            .id(),
        rotation.dek.id()
    );
    assert!(!faults.lose_next_latest_answer.load(Ordering::SeqCst));
}

/// `roll-deks` resealing LATEST (same key, new version) between a rotation's read and its
/// conditional write makes the write lose, to the very key being replaced. A rotation asked
/// for retires the old key all the same: it writes again, and never answers with the old key.
#[tokio::test]
async fn a_rotation_that_loses_to_a_reseal_of_the_old_key_rotates_again() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    faults
        .reseal_latest_before_next_put
        .store(true, Ordering::SeqCst);
    let rotation = keyrings.rotate("ws_1").await.unwrap();
    assert!(!faults.reseal_latest_before_next_put.load(Ordering::SeqCst));
    assert!(rotation.won);
    assert_ne!(rotation.dek.id(), first.id());
    assert_eq!(rotation.previous_key_id.as_deref(), Some(first.id()));
    let stored = keyrings.store().read_latest("ws_1").await.unwrap().unwrap();
    assert_eq!(stored.dek.id(), rotation.dek.id());
}

/// DescribeKeyring reads a keyring's objects several at a time and still answers every key,
/// oldest first, with the one LATEST names; a deeper keyring's objects are not its own.
#[tokio::test]
async fn describe_lists_every_key_of_a_long_rotated_keyring_in_order() {
    let (keyrings, _) = keyrings_with(CachePolicy::default());
    let mut ids = vec![keyrings.latest("ws_1").await.unwrap().id().to_owned()];
    for _ in 0..40 {
        ids.push(keyrings.rotate("ws_1").await.unwrap().dek.id().to_owned());
    }
    keyrings.latest("ws_1/deeper").await.unwrap();
    let (keys, latest) = keyrings.store().describe("ws_1").await.unwrap();
    assert_eq!(latest.as_deref(), ids.last().map(String::as_str));
    let mut described: Vec<String> = keys.iter().map(|(id, _)| id.clone()).collect();
    assert!(
        keys.windows(2).all(|pair| pair[0].1 <= pair[1].1),
        "oldest first"
    );
    described.sort();
    ids.sort();
    assert_eq!(described, ids);
}

/// Events coalesced into one scheduled reload may name a newer key than the one it was
/// scheduled for, even when that one got cached meanwhile (a refresh): the reload reads storage
/// all the same, and the newest key is what ends up cached.
#[tokio::test(start_paused = true)]
async fn a_coalesced_reload_reads_storage_even_when_its_own_key_is_cached() {
    let (keyrings, _) = keyrings_with(CachePolicy::default());
    keyrings.latest("ws_1").await.unwrap();
    let other = Keyrings::new(keyrings.store().clone(), CachePolicy::default());
    // A reload just ran, so the next one waits its turn.
    keyrings.apply_new_latest("ws_1", "dek_any").await.unwrap();
    let first = other.rotate("ws_1").await.unwrap().dek;
    assert!(keyrings.schedule_event_reload("ws_1").unwrap() > Duration::ZERO);
    // Meanwhile a refresh caches that key, and a second rotation's event is coalesced.
    keyrings.latest_from_storage("ws_1").await.unwrap();
    let second = other.rotate("ws_1").await.unwrap().dek;
    assert_eq!(keyrings.schedule_event_reload("ws_1"), None, "coalesced");
    // The scheduled reload, for the first event's key.
    keyrings.apply_new_latest("ws_1", first.id()).await.unwrap();
    assert_eq!(keyrings.peek_latest("ws_1").unwrap().id(), second.id());
}

/// A scheduled reload whose message was lost (its actor failed) holds later events back only
/// for a while.
#[tokio::test(start_paused = true)]
async fn a_reload_scheduled_but_never_started_stops_holding_events_back() {
    let (keyrings, _) = keyrings_with(CachePolicy::default());
    keyrings.latest("ws_1").await.unwrap();
    assert_eq!(keyrings.schedule_event_reload("ws_1"), Some(Duration::ZERO));
    assert_eq!(keyrings.schedule_event_reload("ws_1"), None);
    tokio::time::advance(EVENT_RELOAD_LOST_AFTER).await;
    assert_eq!(keyrings.schedule_event_reload("ws_1"), Some(Duration::ZERO));
}

/// ReEncrypt reads LATEST from storage each time; a burst of such reads on one keyring shares
/// reads that started after it asked, instead of queueing one storage read each behind the
/// keyring's lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_burst_of_forced_reads_shares_storage_reads() {
    let (keyrings, faults) = keyrings_with(CachePolicy::default());
    let first = keyrings.latest("ws_1").await.unwrap();
    let other = Keyrings::new(keyrings.store().clone(), CachePolicy::default());
    let rotated = other.rotate("ws_1").await.unwrap().dek;
    faults
        .get_delay_ms
        .store(20, std::sync::atomic::Ordering::SeqCst);
    let calls_before = faults.calls.load(std::sync::atomic::Ordering::SeqCst);
    let reads =
        futures::future::join_all((0..50).map(|_| keyrings.latest_from_storage("ws_1"))).await;
    for read in reads {
        assert_eq!(read.unwrap().id(), rotated.id(), "each sees the rotation");
    }
    let calls = faults.calls.load(std::sync::atomic::Ordering::SeqCst) - calls_before;
    assert!(calls <= 4, "50 forced reads cost {calls} storage calls");
    assert_ne!(first.id(), rotated.id());
}
