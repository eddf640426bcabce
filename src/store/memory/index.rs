//! A shard's index: where each key's record lies in the shard's queues.

use hashbrown::{HashTable, hash_table::Entry};

use crate::store::StoreKey;

/// What the index knows a key by: its digest's two halves folded into one, the second turned
/// first so that a digest padded with zeros on either side keeps its value. Two keys in a shard
/// share it only by a 128-bit coincidence of a keyed BLAKE3 digest: about once in 10^27 for a
/// million keys, and out of reach of anyone choosing keys on purpose (some 2^64 digests to find
/// one pair, and then only among their own keys). A 128-bit key makes an index entry 24 bytes
/// instead of 40, so a million-record index is that much smaller and a probe that much likelier
/// to find its line in cache.
pub(super) type IndexKey = u128;

pub(super) fn index_key(key: &StoreKey) -> IndexKey {
    let (low, high) = key.as_bytes().split_at(16);
    let half = |bytes: &[u8]| u128::from_le_bytes(bytes.try_into().expect("16 bytes"));
    half(low) ^ half(high).rotate_left(64)
}

/// The buckets the sweep looks at for each entry inserted.
const SWEEP_STEP: usize = 4;

/// Each key's place (a number the shard packs its queue and position into).
///
/// Evicting a record leaves its entry behind, stale, so that an eviction costs no lookup; the
/// shard tells a stale entry by its place alone. Each insert looks at the next
/// [`SWEEP_STEP`] buckets and removes the stale entries there, so the sweep goes round the
/// table once every quarter of its buckets' worth of inserts. (Sweeping the whole table at
/// once, when stale entries had piled up, held the shard for most of a millisecond every
/// 15,000 or so inserts into a shard of the default store.) A stale entry lives until the
/// sweep next passes it: the index holds the live entries and at most a quarter of its
/// buckets' worth of stale ones, plus a batch of evictions.
///
/// Where the table is crowded, a removal may leave a tombstone that only a rehash clears: the
/// table grows until its load is low enough that they build up slowly (for the default
/// store, 65,536 buckets a shard, for about 15,600 records), and from then on rehashes in
/// place now and then, a pass over the table as long as the old sweep's, about once in
/// 700,000 inserts into the shard rather than once in 15,000.
#[derive(Default)]
pub(super) struct Index {
    table: HashTable<(IndexKey, u64)>,
    /// Seeded apart for each index: keys are digests anyone can compute, and must not be
    /// chosen to pile into one run of buckets.
    hasher: foldhash::fast::RandomState,
    /// The next bucket the sweep looks at.
    cursor: usize,
}

impl Index {
    fn hash(&self, key: IndexKey) -> u64 {
        std::hash::BuildHasher::hash_one(&self.hasher, key)
    }

    pub(super) fn get(&self, key: IndexKey) -> Option<u64> {
        self.table
            .find(self.hash(key), |&(k, _)| k == key)
            .map(|&(_, place)| place)
    }

    /// Points `key` at `place`, returning the place it pointed at before.
    pub(super) fn insert(&mut self, key: IndexKey, place: u64) -> Option<u64> {
        let hasher = &self.hasher;
        let rehash = |&(k, _): &(IndexKey, u64)| std::hash::BuildHasher::hash_one(hasher, k);
        match self.table.entry(self.hash(key), |&(k, _)| k == key, rehash) {
            Entry::Occupied(mut entry) => Some(std::mem::replace(&mut entry.get_mut().1, place)),
            Entry::Vacant(entry) => {
                entry.insert((key, place));
                None
            }
        }
    }

    /// Removes the stale entries among the next [`SWEEP_STEP`] buckets.
    pub(super) fn sweep(&mut self, stale: impl Fn(u64) -> bool) {
        let buckets = self.table.num_buckets();
        if buckets == 0 {
            return;
        }
        for _ in 0..SWEEP_STEP {
            // The table may have grown or shrunk since the sweep last looked: it starts over.
            if self.cursor >= buckets {
                self.cursor = 0;
            }
            if let Ok(entry) = self.table.get_bucket_entry(self.cursor)
                && stale(entry.get().1)
            {
                entry.remove();
            }
            self.cursor += 1;
        }
    }

    pub(super) fn len(&self) -> usize {
        self.table.len()
    }

    #[cfg(test)]
    pub(super) fn buckets(&self) -> usize {
        self.table.num_buckets()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_entry_is_found_replaced_and_missed() {
        let mut index = Index::default();
        assert_eq!(index.insert(1, 10), None);
        assert_eq!(index.insert(2, 20), None);
        assert_eq!(index.get(1), Some(10));
        assert_eq!(index.insert(1, 11), Some(10));
        assert_eq!(index.get(1), Some(11));
        assert_eq!(index.get(3), None);
        assert_eq!(index.len(), 2);
    }

    #[test]
    fn a_round_of_the_sweep_removes_every_stale_entry_a_few_at_a_time() {
        let mut index = Index::default();
        for key in 0..10_000u128 {
            index.insert(key, key as u64);
        }
        let buckets = index.buckets();
        // Places under 6,000 are stale.
        let stale = |place: u64| place < 6_000;
        let mut left = index.len();
        for _ in 0..buckets.div_ceil(SWEEP_STEP) {
            index.sweep(stale);
            assert!(
                left - index.len() <= SWEEP_STEP,
                "one sweep removed {} entries",
                left - index.len()
            );
            left = index.len();
        }
        assert_eq!(index.len(), 4_000);
        assert_eq!(index.get(5_999), None);
        assert_eq!(index.get(6_000), Some(6_000));
        assert_eq!(index.get(9_999), Some(9_999));
    }

    #[test]
    fn the_sweep_goes_on_after_the_table_grows() {
        let mut index = Index::default();
        // Every entry is stale by the time a few more are in: the index stays small, whatever
        // size its table had when the sweep began its round.
        for key in 0..100_000u64 {
            index.insert(u128::from(key), key);
            let oldest_live = key.saturating_sub(100);
            index.sweep(|place| place < oldest_live);
        }
        assert!(
            index.len() <= 100 + index.buckets() / SWEEP_STEP + 1,
            "{} entries in {} buckets",
            index.len(),
            index.buckets()
        );
        assert!(index.buckets() <= 1024, "{} buckets", index.buckets());
    }
}
