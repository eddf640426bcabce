//! The in-process store.

use std::{
    collections::{
        VecDeque,
        hash_map::{Entry, OccupiedEntry},
    },
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use tokio::{
    sync::{Notify, futures::OwnedNotified},
    time::Instant,
};

use crate::clock;

mod index;

use index::{Index, index_key};

use super::{
    Claim, Completion, FencingToken, Fingerprint, Holder, KeyMap, KeyStore, Record, RecordView,
    StoreError, StoreKey,
};

/// Records are written one after another into buffers of this size (a record over a quarter
/// of it gets one of its own), so storing a record allocates nothing and evicting one frees
/// nothing until its whole buffer is done with.
const SEGMENT: usize = 64 * 1024;

/// A [`KeyStore`] in this process's memory: the embedded default.
///
/// - Sharded: each key lives in one of several independently locked shards, so requests for
///   different keys rarely wait on one another and no lock is held across an `await`.
/// - Leases and records expire on their own; expired entries are dropped as they are met, and
///   the oldest records are swept out as new ones come in.
/// - Bounded: once the stored records reach `max_entries` or `max_bytes`, those that would
///   expire first are evicted (the oldest, where all are kept for the same time), so a flood of
///   unique keys cannot exhaust memory. Claims in flight are never evicted (their number is
///   bounded by the requests being served). One store may serve services that keep records for
///   different times: each record expires in its own time.
/// - Waiters on a key in flight are woken the moment it completes or is released.
///
/// Cloning is cheap and gives another handle to the same entries. A `MemoryStore` serves one
/// process; several processes need a shared store such as `RedisStore`.
///
/// **What it forgets**: its records live as long as the process. A retry that arrives after a
/// restart or a deploy, or after its record was evicted to keep within the bounds, runs the
/// operation again. A store that evicts records before their retention ends logs a warning
/// (at most once a minute) to say it is too small. Where retries must survive restarts, use a
/// store outside the process, such as `RedisStore` with persistence.
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
    /// Where records are written: a buffer per thread (threads beyond their number share
    /// them). Each thread writes its records one after another, so the memory it writes next
    /// lies beside the memory it just wrote.
    segments: Box<[Mutex<BytesMut>]>,
    max_entries_per_shard: usize,
    max_bytes_per_shard: usize,
    /// Picks a key's shard. Seeded at random: a store key is a digest anyone can compute for
    /// keys of their choosing, and each shard keeps its own share of the bounds, so a shard
    /// known from the key would let a caller fill the shard of another's record with a few
    /// requests, and evict it.
    sharding: foldhash::fast::RandomState,
    /// The warning that the store evicts live records.
    evicting_live: clock::OncePerMinute,
}

/// One shard. Claims in flight and completed records are kept apart, so that the work on a
/// fresh key touches as little cold memory as it can: the claim lives in `in_flight`, a small
/// map that stays in cache; the record is appended to a queue in the order records were stored;
/// and `index` maps a key to its record's place in the queues. Evicting the oldest record pops
/// a queue's front and leaves its index entry behind, stale (its position is below the queue's
/// first): a lookup treats it as absent, and the index sweeps stale entries out a few buckets
/// at a time as keys come in, so an eviction costs no lookup.
///
/// Records are queued by retention, one queue for each (a store shared by services that keep
/// records for different times has a few), so that in each queue records expire front first:
/// an expired record is never stuck behind one that lives on, and what is evicted for room is
/// the record that would have expired first.
#[derive(Default)]
struct Shard {
    in_flight: KeyMap<InFlight>,
    /// A key's place: its queue in the low [`QUEUE_BITS`], its position in that queue above.
    index: Index,
    /// The first queue, where a store with one retention keeps all of its records.
    queue: Queue,
    /// Queues for other retentions, at most [`MAX_QUEUES`] in all.
    others: Vec<Queue>,
    usage: Usage,
}

/// The bits of an index entry that name its queue.
const QUEUE_BITS: u32 = 3;
/// The most queues a shard keeps; a record of yet another retention joins the queue whose
/// retention is nearest its own.
const MAX_QUEUES: usize = 1 << QUEUE_BITS;

/// Records of one retention, in the order they were stored.
#[derive(Default)]
struct Queue {
    retention: Duration,
    records: VecDeque<Stored>,
    /// The position of the queue's front: positions only grow.
    first: u64,
}

impl Queue {
    /// Pops the records at the front that died (replaced, or expired when read) or expired by
    /// `now`, taking the live ones off `usage`.
    fn drop_expired(&mut self, now: Instant, usage: &mut Usage) {
        while let Some(front) = self.records.front() {
            if let Some(encoded) = &front.encoded {
                if front.expires > now {
                    return;
                }
                usage.remove(encoded);
            }
            self.pop();
        }
    }

    fn pop(&mut self) {
        self.records.pop_front();
        self.first += 1;
    }

    /// The queued record at `position`, if it is still in the queue.
    fn get_mut(&mut self, position: u64) -> Option<&mut Stored> {
        let at = usize::try_from(position.checked_sub(self.first)?).ok()?;
        self.records.get_mut(at)
    }
}

/// What the live records of a shard hold.
#[derive(Default)]
struct Usage {
    records: usize,
    bytes: usize,
}

impl Usage {
    fn remove(&mut self, encoded: &Bytes) {
        self.records -= 1;
        self.bytes -= encoded.len();
    }
}

struct InFlight {
    token: FencingToken,
    fingerprint: Fingerprint,
    lease_until: Instant,
    /// Created when the first waiter arrives.
    waiters: Option<Arc<Notify>>,
}

impl InFlight {
    /// Whether its lease still holds at `now`.
    fn holds(&self, now: Instant) -> bool {
        self.lease_until > now
    }

    /// Wakes the waiters of a claim that ended.
    fn end(self) {
        if let Some(waiters) = self.waiters {
            waiters.notify_waiters();
        }
    }
}

/// A completed record in the queue; `encoded` is `None` once it died before reaching the
/// queue's front (its retention ran out, or it was replaced).
struct Stored {
    encoded: Option<Bytes>,
    token: FencingToken,
    expires: Instant,
}

impl Stored {
    /// What a reader sees of a live record.
    fn seen(&self) -> Seen {
        Seen::Completed(self.encoded.clone().expect("a live record"))
    }
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
    /// The records [`new`](Self::new) keeps before the oldest are evicted: a million.
    pub const DEFAULT_MAX_ENTRIES: usize = 1_000_000;
    /// The bytes of encoded records [`new`](Self::new) keeps before the oldest are evicted:
    /// 512 MiB.
    pub const DEFAULT_MAX_BYTES: usize = 512 * 1024 * 1024;

    /// A store keeping up to a million records or 512 MiB of them.
    ///
    /// Filled to its byte bound, it takes about 650 MiB of memory (records are held at about
    /// 1.3 bytes per byte; see [`with_limits`](Self::with_limits)). In a container with less
    /// to spare, give it bounds that fit with `with_limits`.
    pub fn new() -> Self {
        Self::with_limits(Self::DEFAULT_MAX_ENTRIES, Self::DEFAULT_MAX_BYTES)
    }

    /// A store keeping at most `max_entries` records and `max_bytes` bytes of them (as encoded);
    /// past either, the records that would expire first (the oldest, where all are kept for
    /// the same time) are evicted. Each shard keeps its even share of both limits, so they hold
    /// to within the rounding of that share. A shard has at least 256 records' and 8 MiB's
    /// worth of share (a small store has fewer shards, down to one), so that the share of
    /// records is filled about evenly, and a large response (the service stores up to 1 MiB by
    /// default) takes a small part of it; a record larger than a shard's share of `max_bytes`
    /// is kept alone in its shard. Records are written side by side into 64 KiB buffers, and a
    /// buffer is freed once all of its records are gone, so the memory held can pass
    /// `max_bytes` by the buffers still partly in use (measured: 1.27 bytes of memory per byte
    /// of response body, for 100,000 records of 1 KiB).
    ///
    /// # Panics
    ///
    /// When either bound is zero: a store that keeps nothing replays nothing.
    pub fn with_limits(max_entries: usize, max_bytes: usize) -> Self {
        assert!(
            max_entries > 0 && max_bytes > 0,
            "a memory store must keep at least one record and one byte (a store that keeps nothing replays nothing), not {max_entries} records and {max_bytes} bytes"
        );
        let parallelism = std::thread::available_parallelism().map_or(4, |n| n.get());
        // Many small shards: besides less contention, a shard's map grows in small steps, so
        // no single resize stalls the requests behind it for long. But none with a share
        // smaller than 256 records or 8 MiB, rounded down to a power of two: a smaller share
        // fills unevenly (with 150 records a shard, the first shard fills at 80% of the bound),
        // and a 1 MiB response would evict much of it while the store is nearly empty.
        let by_bounds = (max_entries / 256).min(max_bytes / (8 << 20)).max(1);
        let by_bounds = 1 << by_bounds.ilog2();
        let shards = (parallelism * 16)
            .next_power_of_two()
            .clamp(64, 1024)
            .min(by_bounds);
        Self {
            inner: Arc::new(Inner {
                shards: (0..shards).map(|_| Mutex::default()).collect(),
                segments: (0..parallelism.next_power_of_two())
                    .map(|_| Mutex::default())
                    .collect(),
                max_entries_per_shard: max_entries.div_ceil(shards).max(1),
                max_bytes_per_shard: max_bytes.div_ceil(shards).max(1),
                sharding: foldhash::fast::RandomState::default(),
                evicting_live: clock::OncePerMinute::new(),
            }),
        }
    }

    /// How many keys the store holds, in flight or completed (expired ones not yet swept
    /// included).
    pub fn len(&self) -> usize {
        self.inner
            .shards
            .iter()
            .map(|s| {
                let shard = lock(s);
                shard.in_flight.len() + shard.usage.records
            })
            .sum()
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
        let h = std::hash::BuildHasher::hash_one(&self.inner.sharding, index_key(key));
        lock(&self.inner.shards[h as usize & (self.inner.shards.len() - 1)])
    }
}

impl Inner {
    /// Says, at most once a minute, that the store evicted records whose retention had not
    /// ended: a retry of their keys will run again.
    fn evicted_live(&self) {
        if self.evicting_live.now() {
            tracing::warn!(
                "idempotency: the memory store is full and evicts records before their retention \
                 ends; a retry of an evicted key runs again. Raise its bounds \
                 (MemoryStore::with_limits) or use a store outside the process"
            );
        }
    }

    /// Writes `record` (`len` bytes encoded) into this thread's segment.
    fn encode(&self, record: RecordView<'_>, len: usize) -> Bytes {
        if len > SEGMENT / 4 {
            let mut own = BytesMut::with_capacity(len);
            record.put(&mut own);
            return own.freeze();
        }
        thread_local! {
            static THREAD: usize = {
                static NEXT: AtomicUsize = AtomicUsize::new(0);
                NEXT.fetch_add(1, Ordering::Relaxed)
            };
        }
        let slot = THREAD.with(|thread| *thread) & (self.segments.len() - 1);
        let mut segment = lock(&self.segments[slot]);
        // Empty but for what a panic part way through a write may have left.
        segment.clear();
        if segment.capacity() < len {
            *segment = BytesMut::with_capacity(SEGMENT);
        }
        record.put(&mut segment);
        segment.split().freeze()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lock cannot leave a shard or a segment inconsistent in a way
    // later calls trip over (each step re-checks what it reads, and a segment is emptied before
    // each write), so a poisoned lock is used as is.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a reader sees of a key, taken out of the lock before any decoding.
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

impl Shard {
    /// The live claim on `key`, dropping it first (and waking its waiters) if its lease ran out.
    fn claim_of(&mut self, key: &StoreKey, now: Instant) -> Option<&mut InFlight> {
        self.live_claim(key, now).map(OccupiedEntry::into_mut)
    }

    /// [`claim_of`](Self::claim_of), as the map's entry.
    fn live_claim(
        &mut self,
        key: &StoreKey,
        now: Instant,
    ) -> Option<OccupiedEntry<'_, StoreKey, InFlight>> {
        match self.in_flight.entry(*key) {
            Entry::Vacant(_) => None,
            Entry::Occupied(entry) if !entry.get().holds(now) => {
                entry.remove().end();
                None
            }
            Entry::Occupied(entry) => Some(entry),
        }
    }

    /// The live record of `key`, marking it dead first if its retention ran out.
    fn record_of(&mut self, key: &StoreKey, now: Instant) -> Option<&Stored> {
        let place = self.index.get(index_key(key))?;
        let (queue, position) = unpack(place);
        let stored = nth(&mut self.queue, &mut self.others, queue)?.get_mut(position)?;
        let encoded = stored.encoded.as_ref()?;
        if stored.expires <= now {
            self.usage.remove(encoded);
            stored.encoded = None;
            return None;
        }
        Some(stored)
    }

    fn queue_mut(&mut self, queue: usize) -> Option<&mut Queue> {
        nth(&mut self.queue, &mut self.others, queue)
    }

    fn queues_mut(&mut self) -> impl Iterator<Item = &mut Queue> {
        every(&mut self.queue, &mut self.others)
    }

    /// The queue for records kept for `retention`: its own, or a new one, or (a shard has
    /// [`MAX_QUEUES`] already) the one whose retention is nearest.
    fn queue_for(&mut self, retention: Duration) -> usize {
        let retentions = || std::iter::once(&self.queue).chain(&self.others);
        if let Some(found) = retentions().position(|q| q.retention == retention) {
            return found;
        }
        // An empty queue takes the new retention: positions stay as they were.
        if let Some(empty) = retentions().position(|q| q.records.is_empty()) {
            self.queue_mut(empty).expect("a queue").retention = retention;
            return empty;
        }
        if self.others.len() + 1 < MAX_QUEUES {
            self.others.push(Queue {
                retention,
                ..Queue::default()
            });
            return self.others.len();
        }
        let distance = |q: &Queue| q.retention.abs_diff(retention);
        retentions()
            .enumerate()
            .min_by_key(|(_, q)| distance(q))
            .map_or(0, |(i, _)| i)
    }

    fn seen(&mut self, key: &StoreKey, now: Instant) -> Seen {
        if let Some(claim) = self.claim_of(key, now) {
            return Seen::InFlight(claim.fingerprint);
        }
        match self.record_of(key, now) {
            Some(stored) => stored.seen(),
            None => Seen::Nothing,
        }
    }

    /// Takes the claim on `key` if `token` holds it and its lease has not run out.
    fn take_claim(
        &mut self,
        key: &StoreKey,
        token: FencingToken,
        now: Instant,
    ) -> Option<InFlight> {
        match self.live_claim(key, now) {
            Some(claim) if claim.get().token == token => Some(claim.remove()),
            _ => None,
        }
    }

    /// Drops expired records from the queues' fronts, then the records that would expire
    /// first until `incoming` more bytes fit. Nothing but the queues is touched: the index
    /// entries of the records dropped go stale.
    ///
    /// A full shard evicts a batch, making room for a 64th of either bound (at most 63 more
    /// records), rather than one record for each one stored: a queue's front is cold memory,
    /// and reading it in runs lets the processor fetch it ahead.
    ///
    /// Returns whether it evicted a record before its retention ended.
    #[must_use]
    fn make_room(
        &mut self,
        now: Instant,
        incoming: usize,
        max_entries: usize,
        max_bytes: usize,
    ) -> bool {
        let Shard {
            queue,
            others,
            usage,
            ..
        } = self;
        // Expired records go first, whatever the bounds; then every front lives.
        for q in every(queue, others) {
            q.drop_expired(now, usage);
        }
        if usage.records < max_entries && usage.bytes + incoming <= max_bytes {
            return false;
        }
        let slack_records = (max_entries / 64).min(63);
        let slack_bytes = max_bytes / 64;
        let mut evicted = false;
        while usage.records + slack_records >= max_entries
            || usage.bytes + incoming + slack_bytes > max_bytes
        {
            let Some(soonest) = every(queue, others)
                .filter(|q| !q.records.is_empty())
                .min_by_key(|q| q.records.front().map(|front| front.expires))
            else {
                break;
            };
            if let Some(encoded) = soonest.records.front().and_then(|f| f.encoded.as_ref()) {
                usage.remove(encoded);
                evicted = true;
            }
            soonest.pop();
            soonest.drop_expired(now, usage);
        }
        evicted
    }

    /// Appends a record for `key`, kept for `retention`, pointing the index at it.
    fn append(&mut self, key: &StoreKey, stored: Stored, retention: Duration) {
        let bytes = stored.encoded.as_ref().map_or(0, Bytes::len);
        let queue = self.queue_for(retention);
        let q = self.queue_mut(queue).expect("a queue");
        let position = q.first + q.records.len() as u64;
        q.records.push_back(stored);
        self.usage.records += 1;
        self.usage.bytes += bytes;
        if let Some(previous) = self.index.insert(index_key(key), pack(queue, position)) {
            // A record replaced before it reached the front: it is no longer reachable.
            let (queue, position) = unpack(previous);
            if let Some(old) = self.queue_mut(queue).and_then(|q| q.get_mut(position))
                && let Some(encoded) = old.encoded.take()
            {
                self.usage.remove(&encoded);
            }
        }
        // The entries of records gone from the queues are swept a few at a time. An entry
        // stays while its position is in its queue, so the sweep reads the index alone (reading
        // each record to see whether it still lives would be a cache miss an entry); the entry
        // of a record that died in a queue (its retention ran out) goes once the record leaves
        // the front. The sweep waits until the index holds more entries than the queues hold
        // records: below that, the stale entries are no more than the queues' dead records.
        if self.index.len() > self.queued() {
            let mut firsts = [u64::MAX; MAX_QUEUES];
            for (first, q) in firsts.iter_mut().zip(self.queues_mut()) {
                *first = q.first;
            }
            self.index.sweep(|place| {
                let (queue, position) = unpack(place);
                position < firsts[queue]
            });
        }
    }

    /// The records in the queues, dead ones not yet popped included.
    fn queued(&self) -> usize {
        self.queue.records.len() + self.others.iter().map(|q| q.records.len()).sum::<usize>()
    }
}

/// A shard's first queue and its others, in turn.
fn every<'a>(first: &'a mut Queue, others: &'a mut [Queue]) -> impl Iterator<Item = &'a mut Queue> {
    std::iter::once(first).chain(others)
}

/// Queue `n` of a shard's first queue and its others.
fn nth<'a>(first: &'a mut Queue, others: &'a mut [Queue], n: usize) -> Option<&'a mut Queue> {
    match n {
        0 => Some(first),
        n => others.get_mut(n - 1),
    }
}

fn pack(queue: usize, position: u64) -> u64 {
    position << QUEUE_BITS | queue as u64
}

fn unpack(place: u64) -> (usize, u64) {
    (
        (place & (MAX_QUEUES as u64 - 1)) as usize,
        place >> QUEUE_BITS,
    )
}

/// The steps, answered at once: the service calls these directly when its store is a
/// `MemoryStore`, without a boxed future for each.
impl MemoryStore {
    pub(crate) fn claim_now(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let now = Instant::now();
        let seen = {
            let mut shard = self.shard(key);
            // A key has a live record or a live claim, never both (a claim is granted only
            // where no record lives, and ends as the record is stored), so the record is looked
            // for first: the claim is then one lookup in the claims, whether it finds one or
            // makes one.
            match shard.record_of(key, now) {
                Some(stored) => stored.seen(),
                None => match shard.in_flight.entry(*key) {
                    Entry::Occupied(claim) if claim.get().holds(now) => {
                        Seen::InFlight(claim.get().fingerprint)
                    }
                    entry => {
                        let token = FencingToken::random();
                        let claim = InFlight {
                            token,
                            fingerprint: *fingerprint,
                            lease_until: clock::after(now, lease),
                            waiters: None,
                        };
                        match entry {
                            // Its lease ran out: its waiters wake to find this claim.
                            Entry::Occupied(mut lapsed) => lapsed.insert(claim).end(),
                            Entry::Vacant(slot) => {
                                slot.insert(claim);
                            }
                        }
                        return Ok(Claim::Claimed(token));
                    }
                },
            }
        };
        Ok(Claim::Held(seen.into_holder()?.expect("seen something")))
    }

    pub(crate) fn complete_now(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: RecordView<'_>,
        retention: Duration,
    ) -> Result<Completion, StoreError> {
        let len = record.encoded_len();
        let encoded = self.inner.encode(record, len);
        let now = Instant::now();
        let mut shard = self.shard(key);
        let claim = shard.take_claim(key, token, now);
        if claim.is_none() {
            if shard.claim_of(key, now).is_some() {
                return Ok(Completion::Fenced);
            }
            if let Some(stored) = shard.record_of(key, now) {
                // Completing again with the token that completed the key is a success.
                return Ok(if stored.token == token {
                    Completion::Stored
                } else {
                    Completion::Fenced
                });
            }
            // Nothing holds the key: the claim lapsed and no other run took the key over. The
            // run happened, and its record overwrites nothing.
        }
        let evicted = shard.make_room(
            now,
            len,
            self.inner.max_entries_per_shard,
            self.inner.max_bytes_per_shard,
        );
        shard.append(
            key,
            Stored {
                encoded: Some(encoded),
                token,
                expires: clock::after(now, retention),
            },
            retention,
        );
        drop(shard);
        // Wakes this claim's waiters once the record is in place.
        if let Some(claim) = claim {
            claim.end();
        }
        if evicted {
            self.inner.evicted_live();
        }
        Ok(Completion::Stored)
    }

    pub(crate) fn release_now(&self, key: &StoreKey, token: FencingToken) -> bool {
        let claim = self.shard(key).take_claim(key, token, Instant::now());
        claim.map(InFlight::end).is_some()
    }

    pub(crate) fn extend_now(&self, key: &StoreKey, token: FencingToken, lease: Duration) -> bool {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.claim_of(key, now) {
            Some(claim) if claim.token == token => {
                let until = clock::after(now, lease);
                // Waiters wake at the lease's end as it stood when they began: told of an
                // earlier one, they look again, rather than sleeping past it.
                if until < claim.lease_until
                    && let Some(waiters) = &claim.waiters
                {
                    waiters.notify_waiters();
                }
                claim.lease_until = until;
                true
            }
            _ => false,
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
        self.claim_now(key, fingerprint, lease)
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: &Record,
        retention: Duration,
    ) -> Result<Completion, StoreError> {
        self.complete_now(key, token, record.view(), retention)
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError> {
        Ok(self.release_now(key, token))
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        Ok(self.extend_now(key, token, lease))
    }

    async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError> {
        let seen = self.shard(key).seen(key, Instant::now());
        seen.into_holder()
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<Option<Holder>, StoreError> {
        self.wait_now(key, timeout).await
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
    /// [`KeyStore::wait`], without the box the trait's future takes: the service calls it
    /// directly when its store is a `MemoryStore`.
    pub(crate) async fn wait_now(
        &self,
        key: &StoreKey,
        timeout: Duration,
    ) -> Result<Option<Holder>, StoreError> {
        let deadline = clock::after(Instant::now(), timeout);
        loop {
            let (notified, wake_at) = match self.watch(key, deadline) {
                Watch::Settled(seen) => return seen.into_holder(),
                Watch::InFlight { notified, wake_at } => (notified, wake_at),
            };
            // Woken by a completion or release, or at the lease's end or the deadline: look again.
            let _ = tokio::time::timeout_at(wake_at, notified).await;
        }
    }

    /// Looks at `key` for a waiter: what settled it, or a wake-up registered while the shard is
    /// locked, so that a completion cannot slip in unnoticed.
    fn watch(&self, key: &StoreKey, deadline: Instant) -> Watch {
        let now = Instant::now();
        let mut shard = self.shard(key);
        match shard.claim_of(key, now) {
            Some(claim) if now < deadline => {
                let wake_at = claim.lease_until.min(deadline);
                let mut notified = Box::pin(
                    claim
                        .waiters
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

    /// A stored 200 with `body`, for the fingerprint the tests use.
    fn response(body: impl Into<Bytes>) -> Record {
        let fp = Fingerprint::from_bytes([0; 32]);
        Record::response(fp, StatusCode::OK, Default::default(), body.into(), None)
    }

    /// Claims the fresh key `i` and completes it with `record`.
    async fn store_fresh(store: &MemoryStore, i: usize, record: &Record) -> Completion {
        store_for(store, i, record, Duration::from_secs(3600)).await
    }

    /// Claims the fresh key `i` and completes it with `record`, kept for `retention`.
    async fn store_for(
        store: &MemoryStore,
        i: usize,
        record: &Record,
        retention: Duration,
    ) -> Completion {
        let fp = Fingerprint::from_bytes([0; 32]);
        let Claim::Claimed(token) = store
            .claim(&key(i), &fp, Duration::from_secs(60))
            .await
            .unwrap()
        else {
            panic!("fresh key {i} was not claimable")
        };
        store
            .complete(&key(i), token, record, retention)
            .await
            .unwrap()
    }

    #[tokio::test]
    async fn keys_that_share_half_their_bytes_stay_apart() {
        // Digests from elsewhere, zero in one half or the other: each keeps its own record.
        let store = MemoryStore::new();
        let fp = Fingerprint::from_bytes([0; 32]);
        let mut keys = Vec::new();
        for i in 1..=4u8 {
            let mut low = [0; 32];
            low[0] = i;
            let mut high = [0; 32];
            high[16] = i;
            keys.extend([StoreKey::from_bytes(low), StoreKey::from_bytes(high)]);
        }
        for (i, key) in keys.iter().enumerate() {
            let Claim::Claimed(token) = store
                .claim(key, &fp, Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!("key {i} was taken by another")
            };
            let record = response(format!("answer {i}"));
            let completed = store.complete(key, token, &record, Duration::from_secs(60));
            assert_eq!(completed.await.unwrap(), Completion::Stored);
        }
        for (i, key) in keys.iter().enumerate() {
            let Some(Holder::Completed(record)) = store.read(key).await.unwrap() else {
                panic!("key {i} lost its record")
            };
            assert_eq!(record.body, format!("answer {i}"));
        }
    }

    #[test]
    #[should_panic(expected = "a memory store must keep at least one record")]
    fn a_store_that_keeps_nothing_is_refused() {
        let _ = MemoryStore::with_limits(0, usize::MAX);
    }

    #[tokio::test]
    async fn keys_aimed_at_the_shard_of_another_s_record_do_not_evict_it() {
        // 64 shards of 256 records. Keys are digests a caller can pick: 400 whose bytes all
        // agree with the victim's where a shard could be read from them do not land together.
        let store = MemoryStore::with_limits(64 * 256, usize::MAX);
        assert_eq!(store.inner.shards.len(), 64);
        let fp = Fingerprint::from_bytes([0; 32]);
        let victim = key(0);
        let record = response("x");
        let aimed = (1..=400u32).map(|i| {
            let mut bytes = *victim.as_bytes();
            bytes[28..].copy_from_slice(&i.to_le_bytes());
            StoreKey::from_bytes(bytes)
        });
        for key in std::iter::once(victim).chain(aimed) {
            let Claim::Claimed(token) = store
                .claim(&key, &fp, Duration::from_secs(60))
                .await
                .unwrap()
            else {
                panic!("a fresh key was taken")
            };
            let completed = store.complete(&key, token, &record, Duration::from_secs(60));
            assert_eq!(completed.await.unwrap(), Completion::Stored);
        }
        assert!(
            matches!(
                store.read(&victim).await.unwrap(),
                Some(Holder::Completed(_))
            ),
            "the victim's record was evicted"
        );
    }

    #[tokio::test]
    async fn a_flood_of_unique_keys_stays_within_the_bound() {
        let store = MemoryStore::with_limits(10_000, usize::MAX);
        let record = response("x");
        for i in 0..60_000 {
            assert_eq!(store_fresh(&store, i, &record).await, Completion::Stored);
        }
        let shards = store.inner.shards.len();
        assert_eq!(
            shards, 32,
            "one shard for every 256 records the bound allows, rounded down to a power of two"
        );
        assert!(
            store.len() <= 10_000 + shards,
            "{} entries kept",
            store.len()
        );
        assert!(
            store.len() >= 9_000,
            "{} entries kept: evicting far too much",
            store.len()
        );
        // The newest record survives; the oldest were evicted.
        assert!(matches!(
            store.read(&key(59_999)).await.unwrap(),
            Some(Holder::Completed(_))
        ));
        assert!(store.read(&key(0)).await.unwrap().is_none());
        // The index forgets the evicted keys: about 1,900 went through each of the 32 shards,
        // which keep 313 records each.
        assert_stale_index_entries_swept(&store);
    }

    /// Each shard's index holds an entry for each queued record and no more stale ones than
    /// the sweep passes over in a round (a quarter of its buckets) and a batch of evictions;
    /// and its table stays within several times the records it holds.
    fn assert_stale_index_entries_swept(store: &MemoryStore) {
        for shard in store.inner.shards.iter() {
            let shard = lock(shard);
            let (entries, buckets, queued) =
                (shard.index.len(), shard.index.buckets(), shard.queued());
            assert!(
                entries <= queued + buckets / 4 + 64,
                "{entries} index entries for {queued} records in {buckets} buckets"
            );
            // The table grows while the sweep's tombstones fill it at a high load, and settles
            // where the load is low enough that they no longer build up.
            assert!(
                buckets <= 8 * (store.inner.max_entries_per_shard + 64),
                "{buckets} buckets for {queued} records"
            );
        }
    }

    #[tokio::test]
    async fn a_small_bound_holds_closely_and_keeps_the_newest() {
        let store = MemoryStore::with_limits(10, usize::MAX);
        let record = response("x");
        for i in 0..100 {
            assert_eq!(store_fresh(&store, i, &record).await, Completion::Stored);
        }
        assert!(store.len() <= 10, "{} records kept", store.len());
        for i in 90..100 {
            assert!(
                store.read(&key(i)).await.unwrap().is_some(),
                "key {i}, among the newest ten, was evicted"
            );
        }
        assert!(store.read(&key(89)).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn evicted_keys_can_be_claimed_again_and_stale_index_entries_are_swept() {
        let store = MemoryStore::with_limits(640, usize::MAX);
        for round in 0..3 {
            for i in 0..5_000 {
                let record = response(format!("answer {i}"));
                assert_eq!(
                    store_fresh(&store, i, &record).await,
                    Completion::Stored,
                    "round {round}, key {i}"
                );
            }
        }
        // The newest records are the last round's, and they replay.
        let Some(Holder::Completed(record)) = store.read(&key(4_999)).await.unwrap() else {
            panic!("the newest record was evicted")
        };
        assert_eq!(record.body, "answer 4999");
        assert!(store.read(&key(0)).await.unwrap().is_none());
        // 15,000 records went through a store that keeps 640, and its index forgot the evicted.
        for shard in store.inner.shards.iter() {
            assert!(lock(shard).usage.records <= store.inner.max_entries_per_shard);
        }
        assert_stale_index_entries_swept(&store);
    }

    #[tokio::test(start_paused = true)]
    async fn records_kept_for_different_times_expire_each_in_its_time() {
        // One store shared by a service that keeps records a day and a busy one that keeps
        // them a second.
        let day = Duration::from_secs(24 * 3600);
        let store = MemoryStore::with_limits(10, usize::MAX);
        let record = response("x");
        assert_eq!(store_for(&store, 0, &record, day).await, Completion::Stored);
        for i in 1..10 {
            assert_eq!(
                store_for(&store, i, &record, Duration::from_secs(1)).await,
                Completion::Stored
            );
        }
        tokio::time::advance(Duration::from_secs(5)).await;
        // The short-lived records have expired: room is made from them, not from the record
        // kept for a day, which is older.
        assert_eq!(
            store_for(&store, 10, &record, Duration::from_secs(1)).await,
            Completion::Stored
        );
        assert!(
            store.read(&key(0)).await.unwrap().is_some(),
            "the record kept for a day was evicted while expired ones stayed"
        );
        // A key of the busy service reused every two seconds, 40,000 times, with the day's
        // record at the front: the queues hold what is live, not every record ever expired.
        for round in 0..40_000 {
            assert_eq!(
                store_for(&store, 11, &record, Duration::from_secs(1)).await,
                Completion::Stored
            );
            assert!(
                store.read(&key(11)).await.unwrap().is_some(),
                "round {round}"
            );
            tokio::time::advance(Duration::from_secs(2)).await;
            assert!(
                store.read(&key(11)).await.unwrap().is_none(),
                "round {round}"
            );
        }
        let queued = lock(&store.inner.shards[0]).queued();
        assert!(queued <= 4, "{queued} records queued");
        assert!(store.read(&key(0)).await.unwrap().is_some());
        // Full, the store evicts what would expire first: the second's records, not the day's.
        for i in 100..120 {
            assert_eq!(
                store_for(&store, i, &record, Duration::from_secs(1)).await,
                Completion::Stored
            );
        }
        assert!(store.read(&key(0)).await.unwrap().is_some());
        assert!(store.read(&key(119)).await.unwrap().is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn a_store_that_evicts_live_records_warns_once_a_minute() {
        let (logged, _guard) = crate::logged::capture();
        let warnings = || logged.text().matches("evicts records before").count();
        let store = MemoryStore::with_limits(10, usize::MAX);
        let record = response("x");
        // Records that expire make room without a warning.
        for i in 0..30 {
            assert_eq!(
                store_for(&store, i, &record, Duration::from_secs(1)).await,
                Completion::Stored
            );
            tokio::time::advance(Duration::from_secs(2)).await;
        }
        assert_eq!(warnings(), 0);
        // Live records evicted: one warning, however many go.
        for i in 100..200 {
            store_fresh(&store, i, &record).await;
        }
        assert_eq!(warnings(), 1);
        tokio::time::advance(Duration::from_secs(30)).await;
        for i in 200..300 {
            store_fresh(&store, i, &record).await;
        }
        assert_eq!(warnings(), 1, "warned again within the minute");
        tokio::time::advance(Duration::from_secs(31)).await;
        for i in 300..400 {
            store_fresh(&store, i, &record).await;
        }
        assert_eq!(warnings(), 2, "no warning a minute later");
    }

    #[tokio::test]
    async fn a_large_response_evicts_nothing_from_a_store_with_room() {
        // The bounds of the type's own example, 1,000 small records, then a 1 MiB response.
        let store = MemoryStore::with_limits(10_000, 64 * 1024 * 1024);
        let small = response(vec![b'x'; 1000]);
        for i in 0..1_000 {
            assert_eq!(store_fresh(&store, i, &small).await, Completion::Stored);
        }
        let large = response(vec![b'y'; 1 << 20]);
        assert_eq!(store_fresh(&store, 5_000, &large).await, Completion::Stored);
        let kept = records_kept(&store, 0..1_000).await;
        assert_eq!(
            kept,
            1_000,
            "a 1 MiB response evicted {} records",
            1_000 - kept
        );
        // Large responses beyond the bytes bound: the bound holds within a shard's largest.
        let store = MemoryStore::with_limits(usize::MAX, 64 * 1024 * 1024);
        for i in 0..200 {
            assert_eq!(store_fresh(&store, i, &large).await, Completion::Stored);
        }
        let held = store.stored_bytes();
        assert!(
            (48 << 20..=(64 << 20) + (1 << 20) * store.inner.shards.len()).contains(&held),
            "{} MiB held for a bound of 64 MiB",
            held >> 20
        );
    }

    /// How many of the keys `keys` still have their records.
    async fn records_kept(store: &MemoryStore, keys: std::ops::Range<usize>) -> usize {
        let mut kept = 0;
        for i in keys {
            if store.read(&key(i)).await.unwrap().is_some() {
                kept += 1;
            }
        }
        kept
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
        let record = response(vec![0; 1024]);
        for i in 0..5_000 {
            store_fresh(&store, i, &record).await;
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
