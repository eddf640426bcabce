//! In-process coalescing for a store in another process: one request per key leads, and
//! duplicates in this process follow it rather than each asking the store. A store in this
//! process does without it, so that a key with no duplicates (nearly every key) skips the
//! map: duplicates wait on the store's own claim, and each decodes the stored record rather
//! than being handed the leader's copy.

use std::{
    collections::hash_map::Entry,
    sync::{Arc, Mutex},
};

use tokio::{sync::watch, time::Instant};

use super::problem::Problem;
use crate::store::{Fingerprint, KeyMap, Record, StoreKey};

/// How a flight ended, as its followers learn it.
#[derive(Clone, Debug)]
pub(crate) enum Outcome {
    /// The response was stored (or found stored): replay it.
    Completed(Arc<Record>),
    /// The claim was given up (the handler failed, or its answer is not stored): try again.
    Released,
    /// The request leading ended before the store told it what the key holds (its caller went
    /// away, or its wait ran out): ask the store.
    Unanswered,
    /// Every request with this key and fingerprint gets this answer.
    Respond(Problem),
}

type Slot = Option<Outcome>;
/// The channel of a flight is made when its first follower joins: most keys never have one, and
/// making, filling and dropping a channel for each of them costs more than the rest of the flight.
type Shard = KeyMap<(Fingerprint, Option<watch::Sender<Slot>>)>;

/// The requests being led in this process, one per key, in independently locked shards.
#[derive(Debug)]
pub(crate) struct Flights {
    shards: Box<[Mutex<Shard>]>,
}

pub(crate) enum Join {
    /// No request with this key runs here: the caller leads.
    Lead(Lead),
    /// One does, with the same fingerprint: wait for its outcome.
    Follow(watch::Receiver<Slot>),
    /// One does, with another fingerprint: which of the two reused the key is for the store
    /// to say.
    Mismatch,
}

/// What the leading request holds: its flight, until the flight ends (none at all for a lead
/// outside the map). Dropping it without [`finish`](Lead::finish) tells the followers it ended
/// unanswered ([`Outcome::Unanswered`]): they ask the store.
#[derive(Debug)]
pub(crate) struct Lead(Option<(Arc<Flights>, StoreKey)>);

impl Flights {
    pub(crate) fn new() -> Self {
        let shards = std::thread::available_parallelism().map_or(4, |n| n.get()) * 4;
        Self {
            shards: (0..shards.next_power_of_two())
                .map(|_| Mutex::default())
                .collect(),
        }
    }

    fn shard(&self, key: &StoreKey) -> std::sync::MutexGuard<'_, Shard> {
        let b = key.as_bytes();
        let i = u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")) as usize
            & (self.shards.len() - 1);
        self.shards[i].lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn join(self: &Arc<Self>, key: StoreKey, fingerprint: Fingerprint) -> Join {
        match self.shard(&key).entry(key) {
            Entry::Occupied(e) if e.get().0 != fingerprint => Join::Mismatch,
            Entry::Occupied(mut e) => Join::Follow(
                e.get_mut()
                    .1
                    .get_or_insert_with(|| watch::Sender::new(None))
                    .subscribe(),
            ),
            Entry::Vacant(e) => {
                e.insert((fingerprint, None));
                Join::Lead(Lead(Some((self.clone(), key))))
            }
        }
    }

    /// How many keys are being led now.
    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.shards.iter().map(|s| s.lock().unwrap().len()).sum()
    }
}

impl Lead {
    /// A lead outside any flight, for a store in this process: the store's own claim is
    /// what duplicates wait on.
    pub(crate) fn alone() -> Self {
        Self(None)
    }

    /// Tells the followers `outcome` while the flight goes on: those there now, and those that
    /// join before it ends.
    pub(crate) fn announce(&mut self, outcome: Outcome) {
        let Some((flights, key)) = &self.0 else {
            return;
        };
        if let Some((_, sender)) = flights.shard(key).get_mut(key) {
            sender
                .get_or_insert_with(|| watch::Sender::new(None))
                .send_replace(Some(outcome));
        }
    }

    /// Ends the flight and tells every follower how.
    pub(crate) fn finish(self, outcome: Outcome) {
        self.finish_with(|| outcome);
    }

    /// Ends the flight; `outcome` is only made when a follower is there to be told.
    pub(crate) fn finish_with(mut self, outcome: impl FnOnce() -> Outcome) {
        self.end(outcome);
    }

    fn end(&mut self, outcome: impl FnOnce() -> Outcome) {
        let Some((flights, key)) = self.0.take() else {
            return;
        };
        let removed = flights.shard(&key).remove(&key);
        if let Some((_, Some(sender))) = removed {
            sender.send_replace(Some(outcome()));
        }
    }
}

impl Drop for Lead {
    fn drop(&mut self) {
        self.end(|| Outcome::Unanswered);
    }
}

/// Waits for the flight a follower joined to end, until `deadline`; `None` when it passes.
pub(crate) async fn follow(
    mut receiver: watch::Receiver<Slot>,
    deadline: Instant,
) -> Option<Outcome> {
    match tokio::time::timeout_at(deadline, receiver.wait_for(Option::is_some)).await {
        Ok(Ok(slot)) => slot.clone(),
        // The leader vanished without a word.
        Ok(Err(_)) => Some(Outcome::Unanswered),
        Err(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::IdempotencyKey;

    #[tokio::test]
    async fn every_way_a_flight_ends_removes_it_and_wakes_its_followers() {
        let flights = Arc::new(Flights::new());
        let key = StoreKey::new(b"", &IdempotencyKey::new("k").unwrap());
        let fp = Fingerprint::from_bytes([1; 32]);
        let deadline = Instant::now() + std::time::Duration::from_secs(5);

        let Join::Lead(lead) = flights.join(key, fp) else {
            panic!("the first request leads")
        };
        let Join::Follow(follower) = flights.join(key, fp) else {
            panic!("a duplicate follows")
        };
        assert!(matches!(
            flights.join(key, Fingerprint::from_bytes([2; 32])),
            Join::Mismatch
        ));
        lead.finish(Outcome::Respond(Problem::InFlight));
        assert!(matches!(
            follow(follower, deadline).await,
            Some(Outcome::Respond(Problem::InFlight))
        ));
        assert_eq!(flights.len(), 0);

        let Join::Lead(lead) = flights.join(key, fp) else {
            panic!("a finished flight frees the key")
        };
        let Join::Follow(follower) = flights.join(key, fp) else {
            panic!()
        };
        drop(lead);
        assert!(matches!(
            follow(follower, deadline).await,
            Some(Outcome::Unanswered)
        ));
        assert_eq!(flights.len(), 0);

        let Join::Lead(_lead) = flights.join(key, fp) else {
            panic!()
        };
        let Join::Follow(follower) = flights.join(key, fp) else {
            panic!()
        };
        let soon = Instant::now() + std::time::Duration::from_millis(50);
        assert!(
            follow(follower, soon).await.is_none(),
            "a follower gives up at its deadline"
        );
    }
}
