//! The in-process store.

use std::{
    collections::{VecDeque, hash_map::Entry},
    pin::Pin,
    sync::{Arc, Mutex, MutexGuard},
    time::Duration,
};

use async_trait::async_trait;
use bytes::Bytes;
use tokio::{
    sync::{Notify, futures::OwnedNotified},
    time::Instant,
};

use super::{
    Claim, Completion, FencingToken, Fingerprint, Holder, KeyMap, KeyStore, Record, StoreError,
    StoreKey,
};

/// Records kept by default before the oldest are evicted.
const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
/// Bytes of encoded records kept by default before the oldest are evicted.
const DEFAULT_MAX_BYTES: usize = 512 * 1024 * 1024;

/// A [`KeyStore`] in this process's memory: the embedded default.
///
/// - Sharded: each key lives in one of several independently locked shards, so requests for
///   different keys rarely wait on one another and no lock is held across an `await`.
/// - Leases and records expire on their own; expired entries are dropped as they are met, and
///   the oldest records are swept out as new ones come in.
/// - Bounded: once the stored records reach `max_entries` or `max_bytes`, the oldest are evicted,
///   so a flood of unique keys cannot exhaust memory. Claims in flight are never evicted (their
///   number is bounded by the requests being served).
/// - Waiters on a key in flight are woken the moment it completes or is released.
///
/// Cloning is cheap and gives another handle to the same entries. A `MemoryStore` serves one
/// process; several processes need a shared store such as `RedisStore`.
///
/// # Example
///
/// ```
/// use tower_idempotency::store::MemoryStore;
///
/// // At most 10,000 records or 64 MiB of them, whichever comes first.
/// let store = MemoryStore::with_limits(10_000, 64 * 1024 * 1024);
/// assert_eq!(store.len(), 0);
/// ```
#[derive(Clone)]
pub struct MemoryStore {
    inner: Arc<Inner>,
}

struct Inner {
    shards: Box<[Mutex<Shard>]>,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
}

#[derive(Default)]
struct Shard {
    map: KeyMap<Slot>,
    /// Completed records in the order they were stored: the front is the oldest, evicted first.
    /// An entry whose sequence number no longer matches its slot is stale and skipped.
    order: VecDeque<(StoreKey, u64, Instant)>,
    next_seq: u64,
    usage: Usage,
}

/// What the completed records of a shard hold.
#[derive(Default)]
struct Usage {
    completed: usize,
    bytes: usize,
}

impl Usage {
    /// Accounts for a slot that left the map, and wakes its waiters.
    fn forget(&mut self, slot: &Slot) {
        match slot {
            Slot::Completed { encoded, .. } => {
                self.completed -= 1;
                self.bytes -= encoded.len();
            }
            Slot::InFlight { waiters, .. } => {
                if let Some(waiters) = waiters {
                    waiters.notify_waiters();
                }
            }
        }
    }
}

enum Slot {
    InFlight {
        token: FencingToken,
        fingerprint: Fingerprint,
        lease_until: Instant,
        /// Created when the first waiter arrives.
        waiters: Option<Arc<Notify>>,
    },
    Completed {
        token: FencingToken,
        encoded: Bytes,
        expires: Instant,
        seq: u64,
    },
}

impl Default for MemoryStore {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for MemoryStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryStore")
            .field("shards", &self.inner.shards.len())
            .field("len", &self.len())
            .finish()
    }
}

impl MemoryStore {
    /// A store keeping up to a million records or 512 MiB of them.
    pub fn new() -> Self {
        Self::with_limits(DEFAULT_MAX_ENTRIES, DEFAULT_MAX_BYTES)
    }

    /// A store keeping at most `max_entries` records and `max_bytes` bytes of them (as encoded);
    /// past either, the oldest records are evicted. Each shard keeps its even share of both
    /// limits, so they hold to within the rounding of that share (a record larger than a
    /// shard's share of `max_bytes` is kept alone in its shard).
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Many small shards: besides less contention, a shard's map grows in small steps, so
        // no single resize stalls the requests behind it for long.
        let shards = (parallelism * 16).next_power_of_two().clamp(64, 1024);
        Self {
            inner: Arc::new(Inner {
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                max_entries_per_shard: max_entries.div_ceil(shards).max(1),
                max_bytes_per_shard: max_bytes.div_ceil(shards).max(1),
            }),
        }
    }

    /// How many keys the store holds, in flight or completed (expired ones not yet swept
    /// included).
    pub fn len(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).map.len()).sum()
    }

    /// Whether the store holds no keys.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of encoded records the store holds.
    pub fn stored_bytes(&self) -> usize {
        self.inner.shards.iter().map(|s| lock(s).usage.bytes).sum()
    }

    fn shard(&self, key: &StoreKey) -> MutexGuard<'_, Shard> {
        let b = key.as_bytes();
        let h = u64::from_le_bytes(b[8..16].try_into().expect("8 bytes"));
        lock(&self.inner.shards[h as usize & (self.inner.shards.len() - 1)])
    }
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    // A panic while holding a shard lock cannot leave it inconsistent in a way later calls trip
    // over (each step re-checks what it reads), so a poisoned lock is used as is.
    shard
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a slot shows a reader, taken out of the lock before any decoding.
enum Seen {
    Nothing,
    InFlight(Fingerprint),
    Completed(Bytes),
}

impl Seen {
    fn into_holder(self) -> Result<Option<Holder>, StoreError> {
        Ok(match self {
            Seen::Nothing => None,
            Seen::InFlight(fingerprint) => Some(Holder::InFlight { fingerprint }),
            Seen::Completed(encoded) => Some(Holder::Completed(Record::decode(encoded)?)),
        })
    }
}

impl Slot {
    fn expired(&self, now: Instant) -> bool {
        match self {
            Slot::InFlight { lease_until, .. } => *lease_until <= now,
            Slot::Completed { expires, .. } => *expires <= now,
        }
    }
}

impl Shard {
    /// The slot of `key`, dropping it first if its lease or retention has run out.
    fn live(&mut self, key: &StoreKey, now: Instant) -> Option<&mut Slot> {
        match self.map.entry(*key) {
            Entry::Vacant(_) => None,
            Entry::Occupied(entry) if entry.get().expired(now) => {
                let slot = entry.remove();
                self.usage.forget(&slot);
                None
            }
            Entry::Occupied(entry) => Some(entry.into_mut()),
        }
    }

    fn seen(&mut self, key: &StoreKey, now: Instant) -> Seen {
        match self.live(key, now) {
            None => Seen::Nothing,
            Some(Slot::InFlight { fingerprint, .. }) => Seen::InFlight(*fingerprint),
            Some(Slot::Completed { encoded, .. }) => Seen::Completed(encoded.clone()),
        }
    }

    fn remove(&mut self, key: &StoreKey) -> Option<Slot> {
        let slot = self.map.remove(key)?;
        self.usage.forget(&slot);
        Some(slot)
    }

    /// Whether `token` holds the live claim on `key`.
    fn owns(&mut self, key: &StoreKey, token: FencingToken, now: Instant) -> bool {
        matches!(self.live(key, now), Some(Slot::InFlight { token: t, .. }) if *t == token)
    }

    /// Drops expired records from the front, then the oldest until `incoming` more bytes fit.
    /// The queue carries each record's expiry, so the map is only touched to evict.
    fn make_room(&mut self, now: Instant, incoming: usize, max_entries: usize, max_bytes: usize) {
        while let Some(&(key, seq, expires)) = self.order.front() {
            let over = expires <= now
                || self.usage.completed >= max_entries
                || self.usage.bytes + incoming > max_bytes;
            if !over {
                break;
            }
            self.order.pop_front();
            // Evict only the record this entry was made for; a stale entry's is gone already.
            if matches!(self.map.get(&key), Some(Slot::Completed { seq: s, .. }) if *s == seq) {
                self.remove(&key);
            }
        }
    }
}

#[async_trait]
impl KeyStore for MemoryStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let token = FencingToken::random();
        let now = Instant::now();
        let claim = Slot::InFlight {
            token,
            fingerprint: *fingerprint,
            lease_until: now + lease,
            waiters: None,
        };
        let seen = {
            let mut shard = self.shard(key);
            match shard.map.entry(*key) {
                Entry::Vacant(entry) => {
                    entry.insert(claim);
                    return Ok(Claim::Claimed(token));
                }
                Entry::Occupied(entry) if entry.get().expired(now) => {
                    let lapsed = std::mem::replace(entry.into_mut(), claim);
                    shard.usage.forget(&lapsed);
                    return Ok(Claim::Claimed(token));
                }
                Entry::Occupied(entry) => match entry.get() {
                    Slot::InFlight { fingerprint, .. } => Seen::InFlight(*fingerprint),
                    Slot::Completed { encoded, .. } => Seen::Completed(encoded.clone()),
                },
            }
        };
        Ok(Claim::Held(seen.into_holder()?.expect("seen something")))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: &Record,
        retention: Duration,
    ) -> Result<Completion, StoreError> {
        let encoded = record.encode();
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.live(key, now) {
            Some(Slot::Completed { token: t, .. }) => {
                return Ok(if *t == token {
                    Completion::Stored
                } else {
                    Completion::Fenced
                });
            }
            Some(Slot::InFlight { token: t, .. }) if *t == token => {}
            _ => return Ok(Completion::Fenced),
        }
        // Eviction takes only completed records, never this claim.
        shard.make_room(
            now,
            encoded.len(),
            self.inner.max_entries_per_shard,
            self.inner.max_bytes_per_shard,
        );
        let seq = shard.next_seq;
        let expires = now + retention;
        shard.next_seq += 1;
        shard.usage.completed += 1;
        shard.usage.bytes += encoded.len();
        shard.order.push_back((*key, seq, expires));
        let slot = shard.map.get_mut(key).expect("the claim checked above");
        // Wakes this claim's waiters once the record is in place.
        let Slot::InFlight { waiters, .. } = std::mem::replace(
            slot,
            Slot::Completed {
                token,
                encoded,
                expires,
                seq,
            },
        ) else {
            unreachable!("the claim checked above")
        };
        drop(shard);
        if let Some(waiters) = waiters {
            waiters.notify_waiters();
        }
        Ok(Completion::Stored)
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError> {
        let mut shard = self.shard(key);
        if !shard.owns(key, token, Instant::now()) {
            return Ok(false);
        }
        shard.remove(key);
        Ok(true)
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.live(key, now) {
            Some(Slot::InFlight {
                token: t,
                lease_until,
                ..
            }) if *t == token => {
                *lease_until = now + lease;
                Ok(true)
            }
            _ => Ok(false),
        }
    }

    async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError> {
        let seen = self.shard(key).seen(key, Instant::now());
        seen.into_holder()
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<Option<Holder>, StoreError> {
        let deadline = Instant::now() + timeout;
        loop {
            let (notified, wake_at) = match self.watch(key, deadline) {
                Watch::Settled(seen) => return seen.into_holder(),
                Watch::InFlight { notified, wake_at } => (notified, wake_at),
            };
            // Woken by a completion or release, or at the lease's end or the deadline: look again.
            let _ = tokio::time::timeout_at(wake_at, notified).await;
        }
    }
}

enum Watch {
    Settled(Seen),
    InFlight {
        notified: Pin<Box<OwnedNotified>>,
        wake_at: Instant,
    },
}

impl MemoryStore {
    /// Looks at `key` for a waiter: what settled it, or a wake-up registered while the shard is
    /// locked, so that a completion cannot slip in unnoticed.
    fn watch(&self, key: &StoreKey, deadline: Instant) -> Watch {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.live(key, now) {
            Some(Slot::InFlight {
                waiters,
                lease_until,
                ..
            }) if now < deadline => {
                let wake_at = (*lease_until).min(deadline);
                let mut notified = Box::pin(
                    waiters
                        .get_or_insert_with(Default::default)
                        .clone()
                        .notified_owned(),
                );
                notified.as_mut().enable();
                Watch::InFlight { notified, wake_at }
            }
            _ => Watch::Settled(shard.seen(key, now)),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;
    use crate::IdempotencyKey;

    crate::key_store_conformance!(memory_conformance, MemoryStore::new());

    fn key(i: usize) -> StoreKey {
        StoreKey::new(b"", &IdempotencyKey::new(format!("k{i}")).unwrap())
    }

    #[tokio::test]
    async fn a_flood_of_unique_keys_stays_within_the_bound() {
        let store = MemoryStore::with_limits(1_000, usize::MAX);
        let fp = Fingerprint::from_bytes([0; 32]);
        let record = Record::response(
            fp,
            StatusCode::OK,
            Default::default(),
            Bytes::from_static(b"x"),
            None,
        );
        for i in 0..20_000 {
            let Claim::Claimed(token) = store
                .claim(&key(i), &fp, Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!("fresh key {i} was not claimable")
            };
            store
                .complete(&key(i), token, &record, Duration::from_secs(3600))
                .await
                .unwrap();
        }
        let shards = store.inner.shards.len();
        assert!(
            store.len() <= 1_000 + shards,
            "{} entries kept",
            store.len()
        );
        assert!(
            store.len() >= 900,
            "{} entries kept: evicting far too much",
            store.len()
        );
        // The newest record survives; the oldest were evicted.
        assert!(matches!(
            store.read(&key(19_999)).await.unwrap(),
            Some(Holder::Completed(_))
        ));
        assert!(store.read(&key(0)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn the_byte_bound_holds_and_claims_in_flight_are_never_evicted() {
        let store = MemoryStore::with_limits(usize::MAX, 1024 * 1024);
        let fp = Fingerprint::from_bytes([0; 32]);
        let Claim::Claimed(held) = store
            .claim(&key(usize::MAX), &fp, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!()
        };
        let record = Record::response(
            fp,
            StatusCode::OK,
            Default::default(),
            Bytes::from(vec![0; 1024]),
            None,
        );
        for i in 0..5_000 {
            let Claim::Claimed(token) = store
                .claim(&key(i), &fp, Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!()
            };
            store
                .complete(&key(i), token, &record, Duration::from_secs(3600))
                .await
                .unwrap();
        }
        let kept = store.stored_bytes();
        assert!(
            (512 * 1024..=1024 * 1024).contains(&kept),
            "{kept} bytes kept"
        );
        assert_eq!(
            store
                .complete(&key(usize::MAX), held, &record, Duration::from_secs(60))
                .await
                .unwrap(),
            Completion::Stored,
            "the claim in flight survived the evictions"
        );
    }
}
