//! The conformance suite every [`KeyStore`] must pass (feature `test-util`).
//!
//! Each function checks one promise of the trait against a store and panics, like an
//! `assert!`, when it is broken. Keys are fresh random ones, so the suite can run against a
//! shared backend. [`key_store_conformance!`](crate::key_store_conformance) writes one
//! `#[tokio::test]` per function for a store of yours:
//!
//! ```
//! # mod wrapper {
//! use tower_idempotency::store::MemoryStore;
//!
//! // In `tests/my_store.rs`; the expression may `.await`.
//! tower_idempotency::key_store_conformance!(memory_store, MemoryStore::new());
//! # }
//! ```
//!
//! The suite sleeps through short leases (hundreds of milliseconds), so a backend must honour
//! leases and retention with millisecond precision.

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, HeaderValue, StatusCode};
use tokio::time::Instant;

use super::{Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, Record, StoreKey};
use crate::IdempotencyKey;

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);
/// Long enough that a waiter woken by an event is told apart from one woken by its deadline.
const LONG_WAIT: Duration = Duration::from_secs(10);

fn fresh_key() -> StoreKey {
    StoreKey::new(b"conformance", &IdempotencyKey::auto())
}

fn fingerprint(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn record(fp: Fingerprint, body: &'static str) -> Record {
    let mut headers = HeaderMap::new();
    headers.insert("content-type", HeaderValue::from_static("application/json"));
    headers.append("x-repeated", HeaderValue::from_static("one"));
    headers.append("x-repeated", HeaderValue::from_static("two"));
    let mut trailers = HeaderMap::new();
    trailers.insert("grpc-status", HeaderValue::from_static("0"));
    Record::response(
        fp,
        StatusCode::CREATED,
        headers,
        Bytes::from_static(body.as_bytes()),
        Some(trailers),
    )
}

async fn claimed(
    store: &dyn KeyStore,
    key: &StoreKey,
    fp: Fingerprint,
    lease: Duration,
) -> FencingToken {
    match store.claim(key, &fp, lease).await.expect("claim") {
        Claim::Claimed(token) => token,
        other => panic!("a free key was not claimable: {other:?}"),
    }
}

/// Of many concurrent claims of one key, exactly one wins; the rest see it in flight with the
/// winner's fingerprint.
pub async fn claim_is_exclusive_under_a_race(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let tasks: Vec<_> = (0..64u8)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                (
                    i,
                    store
                        .claim(&key, &fingerprint(i), LEASE)
                        .await
                        .expect("claim"),
                )
            })
        })
        .collect();
    let mut winners = Vec::new();
    let mut held = Vec::new();
    for task in tasks {
        match task.await.expect("task") {
            (i, Claim::Claimed(_)) => winners.push(i),
            (_, Claim::Held(Holder::InFlight { fingerprint })) => held.push(fingerprint),
            (_, other) => panic!("unexpected claim answer {other:?}"),
        }
    }
    assert_eq!(winners.len(), 1, "exactly one of 64 racing claims must win");
    assert!(
        held.iter().all(|fp| *fp == fingerprint(winners[0])),
        "losers must see the winner's fingerprint"
    );
}

/// A completed record comes back whole from `claim` and `read`, and a stranger's token cannot
/// complete a claim it does not own.
pub async fn completion_is_fenced_and_round_trips(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let stranger = FencingToken::random();
    assert_eq!(
        store
            .complete(&key, stranger, &record(fingerprint(9), "stolen"), RETENTION)
            .await
            .unwrap(),
        Completion::Fenced
    );
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::InFlight {
            fingerprint: fingerprint(1)
        }),
        "a fenced completion must not change the key"
    );
    let rec = record(fingerprint(1), "{\"id\":1}");
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    // Re-sending the same completion (a retried command) is harmless.
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store
            .complete(&key, stranger, &record(fingerprint(9), "late"), RETENTION)
            .await
            .unwrap(),
        Completion::Fenced
    );
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec.clone()))
    );
    assert_eq!(
        store.claim(&key, &fingerprint(2), LEASE).await.unwrap(),
        Claim::Held(Holder::Completed(rec)),
        "a claim of a completed key returns the record, whatever its fingerprint"
    );
    let small = fresh_key();
    let token = claimed(&*store, &small, fingerprint(3), LEASE).await;
    let too_large = Record::not_replayable(fingerprint(3), StatusCode::OK);
    assert_eq!(
        store
            .complete(&small, token, &too_large, RETENTION)
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store.read(&small).await.unwrap(),
        Some(Holder::Completed(too_large))
    );
}

/// Releasing frees the key at once, and only the owner's token can release.
pub async fn release_frees_the_key(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    assert!(
        !store.release(&key, FencingToken::random()).await.unwrap(),
        "a stranger released the claim"
    );
    assert!(matches!(
        store.read(&key).await.unwrap(),
        Some(Holder::InFlight { .. })
    ));
    assert!(store.release(&key, token).await.unwrap());
    assert_eq!(store.read(&key).await.unwrap(), None);
    let second = claimed(&*store, &key, fingerprint(2), LEASE).await;
    assert_ne!(second, token);
    assert!(
        !store.release(&key, token).await.unwrap(),
        "an old token released a new claim"
    );
    assert_eq!(
        store
            .complete(&key, token, &record(fingerprint(1), "old"), RETENTION)
            .await
            .unwrap(),
        Completion::Fenced
    );
}

/// A lapsed lease lets the next claim in, and fences everything the old token tries after.
pub async fn lapsed_lease_is_taken_over_and_fenced(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let first = claimed(&*store, &key, fingerprint(1), Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let second = claimed(&*store, &key, fingerprint(1), LEASE).await;
    assert_ne!(first, second);
    assert!(
        !store.extend(&key, first, LEASE).await.unwrap(),
        "a lapsed token extended a new claim"
    );
    assert!(
        !store.release(&key, first).await.unwrap(),
        "a lapsed token released a new claim"
    );
    assert_eq!(
        store
            .complete(&key, first, &record(fingerprint(1), "stale"), RETENTION)
            .await
            .unwrap(),
        Completion::Fenced
    );
    let rec = record(fingerprint(1), "fresh");
    assert_eq!(
        store.complete(&key, second, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec))
    );
}

/// A lease that lapsed with no one taking over is the same as no claim: the key reads as
/// free, and the lapsed token extends and releases nothing. Its completion, finding nothing
/// holding the key, stores the record: the run happened, and nothing is overwritten.
pub async fn a_lapsed_claim_is_no_claim(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), Duration::from_millis(150)).await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    assert_eq!(
        store.read(&key).await.unwrap(),
        None,
        "a lapsed claim still reads as in flight"
    );
    assert!(
        !store.extend(&key, token, LEASE).await.unwrap(),
        "a lapsed token revived its claim"
    );
    assert!(
        !store.release(&key, token).await.unwrap(),
        "a lapsed token released something"
    );
    assert_eq!(store.read(&key).await.unwrap(), None);
    claimed(&*store, &key, fingerprint(2), LEASE).await;
}

/// A run whose lease lapsed while nobody took the key over (a store that stalled past it, or
/// lost the claim) still stores its record: refusing it would make every retry run the
/// operation again.
pub async fn a_completion_after_a_lapse_nobody_took_over_is_stored(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), Duration::from_secs(1)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let rec = record(fingerprint(1), "late but whole");
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored,
        "a run nobody else took over was refused its record"
    );
    assert_eq!(
        store.claim(&key, &fingerprint(1), LEASE).await.unwrap(),
        Claim::Held(Holder::Completed(rec.clone()))
    );
    // Completing again, as a retried command would, changes nothing.
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    assert!(
        !store.release(&key, token).await.unwrap(),
        "a completed key was released"
    );
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec))
    );
}

/// A record is kept for its retention, however short the lease of the claim it completed.
pub async fn a_record_outlives_the_lease_of_its_claim(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    // The lease also covers the way from claim to completion, however slow the backend.
    let token = claimed(&*store, &key, fingerprint(1), Duration::from_secs(1)).await;
    let rec = record(fingerprint(1), "kept");
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        store.claim(&key, &fingerprint(1), LEASE).await.unwrap(),
        Claim::Held(Holder::Completed(rec)),
        "the record went with the claim's lease, not its retention"
    );
}

/// Bodies of any bytes and sizes come back as they went in: empty, not UTF-8, and 1 MiB.
pub async fn bodies_of_any_bytes_round_trip(store: Arc<dyn KeyStore>) {
    let binary: Vec<u8> = (0..=255u8).cycle().take(1 << 20).collect();
    for body in [
        Bytes::new(),
        Bytes::from_static(b"\xff\xfe\0 not utf-8 \xc3"),
        binary.into(),
    ] {
        let key = fresh_key();
        let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
        let mut rec = record(fingerprint(1), "");
        rec.body = body.clone();
        assert_eq!(
            store.complete(&key, token, &rec, RETENTION).await.unwrap(),
            Completion::Stored
        );
        let Some(Holder::Completed(read)) = store.read(&key).await.unwrap() else {
            panic!("a body of {} bytes was not stored", body.len())
        };
        assert!(
            read == rec,
            "a body of {} bytes changed on its way",
            body.len()
        );
    }
}

/// Extending a lease keeps the claim past its first lease; only the owner can extend.
pub async fn extend_keeps_the_claim(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let lease = Duration::from_secs(1);
    let token = claimed(&*store, &key, fingerprint(1), lease).await;
    assert!(
        !store
            .extend(&key, FencingToken::random(), lease)
            .await
            .unwrap()
    );
    // 1.5 s in all, past the first lease, with 750 ms to spare at each renewal.
    for _ in 0..6 {
        tokio::time::sleep(Duration::from_millis(250)).await;
        assert!(
            store.extend(&key, token, lease).await.unwrap(),
            "the owner could not extend"
        );
    }
    assert_eq!(
        store.claim(&key, &fingerprint(2), lease).await.unwrap(),
        Claim::Held(Holder::InFlight {
            fingerprint: fingerprint(1)
        }),
        "the extended claim was lost"
    );
    assert!(store.release(&key, token).await.unwrap());
}

/// A completed record expires after its retention; then the key is free again.
pub async fn records_expire_after_retention(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let rec = record(fingerprint(1), "short-lived");
    store
        .complete(&key, token, &rec, Duration::from_secs(1))
        .await
        .unwrap();
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec))
    );
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(store.read(&key).await.unwrap(), None);
    claimed(&*store, &key, fingerprint(2), LEASE).await;
}

/// `read` reports nothing, a claim in flight, and a completed record.
pub async fn read_reports_each_state(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    assert_eq!(store.read(&key).await.unwrap(), None);
    let token = claimed(&*store, &key, fingerprint(4), LEASE).await;
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::InFlight {
            fingerprint: fingerprint(4)
        })
    );
    let rec = record(fingerprint(4), "done");
    store.complete(&key, token, &rec, RETENTION).await.unwrap();
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec))
    );
}

/// Waiters on a key in flight are woken by its completion, promptly, and all get the record.
pub async fn wait_wakes_on_completion(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let started = Instant::now();
    let waiters: Vec<_> = (0..8)
        .map(|_| {
            let store = store.clone();
            tokio::spawn(async move { store.wait(&key, LONG_WAIT).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(100)).await;
    let rec = record(fingerprint(1), "for the waiters");
    store.complete(&key, token, &rec, RETENTION).await.unwrap();
    for waiter in waiters {
        assert_eq!(waiter.await.unwrap(), Some(Holder::Completed(rec.clone())));
    }
    assert!(
        started.elapsed() < LONG_WAIT / 2,
        "waiters slept to their deadline instead of being woken"
    );
}

/// Waiters are woken by a release and told the key is free.
pub async fn wait_wakes_on_release(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let started = Instant::now();
    let waiter = {
        let store = store.clone();
        tokio::spawn(async move { store.wait(&key, LONG_WAIT).await.unwrap() })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert!(store.release(&key, token).await.unwrap());
    assert_eq!(waiter.await.unwrap(), None);
    assert!(
        started.elapsed() < LONG_WAIT / 2,
        "the waiter slept to its deadline instead of being woken"
    );
}

/// A waiter gives up at its timeout, still seeing the key in flight; so does one whose
/// timeout is over before it could look at the key.
pub async fn wait_times_out_while_in_flight(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(5), LEASE).await;
    let in_flight = Some(Holder::InFlight {
        fingerprint: fingerprint(5),
    });
    let started = Instant::now();
    let seen = store.wait(&key, Duration::from_millis(300)).await.unwrap();
    assert_eq!(seen, in_flight);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the waiter gave up early"
    );
    assert!(
        started.elapsed() < LONG_WAIT / 2,
        "the waiter overslept its timeout"
    );
    for timeout in [Duration::ZERO, Duration::from_millis(1)] {
        let seen = store.wait(&key, timeout).await;
        assert_eq!(seen.unwrap(), in_flight, "a short wait is no failure");
    }
    store.release(&key, token).await.unwrap();
}

/// A waiter learns that a claim's lease lapsed, without waiting out its own timeout.
pub async fn wait_ends_when_the_lease_lapses(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    // Timed from before the claim, so that the lease can only lapse after `started`.
    let started = Instant::now();
    claimed(&*store, &key, fingerprint(1), Duration::from_millis(300)).await;
    assert_eq!(store.wait(&key, LONG_WAIT).await.unwrap(), None);
    assert!(
        started.elapsed() >= Duration::from_millis(300),
        "the waiter left before the lease lapsed"
    );
    assert!(
        started.elapsed() < LONG_WAIT / 2,
        "the waiter slept to its deadline past the lease"
    );
}

/// Waiting on a free or completed key returns at once.
pub async fn wait_on_a_settled_key_returns_at_once(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let started = Instant::now();
    assert_eq!(store.wait(&key, LONG_WAIT).await.unwrap(), None);
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let rec = record(fingerprint(1), "settled");
    store.complete(&key, token, &rec, RETENTION).await.unwrap();
    assert_eq!(
        store.wait(&key, LONG_WAIT).await.unwrap(),
        Some(Holder::Completed(rec))
    );
    assert!(started.elapsed() < LONG_WAIT / 2);
}

/// Many keys at once stay independent: each gets its own claim and its own record.
pub async fn many_keys_stay_independent(store: Arc<dyn KeyStore>) {
    let tasks: Vec<_> = (0..200u32)
        .map(|i| {
            let store = store.clone();
            tokio::spawn(async move {
                let key = fresh_key();
                let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
                let body = Bytes::from(i.to_string());
                let rec =
                    Record::response(fingerprint(1), StatusCode::OK, HeaderMap::new(), body, None);
                assert_eq!(
                    store.complete(&key, token, &rec, RETENTION).await.unwrap(),
                    Completion::Stored
                );
                (key, rec)
            })
        })
        .collect();
    for task in tasks {
        let (key, rec) = task.await.unwrap();
        assert_eq!(
            store.read(&key).await.unwrap(),
            Some(Holder::Completed(rec))
        );
    }
}

/// A completed key is no longer claimed: releasing or extending it with the token that
/// completed it answers `false`, and the record stays as it is.
pub async fn a_completed_key_is_neither_released_nor_extended(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), LEASE).await;
    let rec = record(fingerprint(1), "done");
    assert_eq!(
        store.complete(&key, token, &rec, RETENTION).await.unwrap(),
        Completion::Stored
    );
    assert!(!store.release(&key, token).await.unwrap());
    assert!(!store.extend(&key, token, LEASE).await.unwrap());
    assert_eq!(
        store.read(&key).await.unwrap(),
        Some(Holder::Completed(rec))
    );
}

/// The longest settings (`Duration::MAX` for a lease, a retention and a wait) are taken as "as
/// long as can be": no panic, no error.
pub async fn the_longest_durations_are_accepted(store: Arc<dyn KeyStore>) {
    let key = fresh_key();
    let token = claimed(&*store, &key, fingerprint(1), Duration::MAX).await;
    assert!(store.extend(&key, token, Duration::MAX).await.unwrap());
    let rec = record(fingerprint(1), "kept");
    assert_eq!(
        store
            .complete(&key, token, &rec, Duration::MAX)
            .await
            .unwrap(),
        Completion::Stored
    );
    assert_eq!(
        store.wait(&key, Duration::MAX).await.unwrap(),
        Some(Holder::Completed(rec))
    );
}

/// Writes one `#[tokio::test]` per conformance check, in a module named `$name`, for the store
/// that `$make` builds (an expression, evaluated in an `async fn`, so it may `.await`).
///
/// The calling crate needs `tokio` with the `macros` and `rt-multi-thread` features.
#[macro_export]
macro_rules! key_store_conformance {
    ($name:ident, $make:expr) => {
        mod $name {
            #[allow(unused_imports)]
            use super::*;

            async fn store() -> ::std::sync::Arc<dyn $crate::store::KeyStore> {
                ::std::sync::Arc::new($make)
            }

            $crate::key_store_conformance!(@tests
                claim_is_exclusive_under_a_race,
                completion_is_fenced_and_round_trips,
                release_frees_the_key,
                lapsed_lease_is_taken_over_and_fenced,
                extend_keeps_the_claim,
                records_expire_after_retention,
                read_reports_each_state,
                wait_wakes_on_completion,
                wait_wakes_on_release,
                wait_times_out_while_in_flight,
                wait_ends_when_the_lease_lapses,
                wait_on_a_settled_key_returns_at_once,
                many_keys_stay_independent,
                the_longest_durations_are_accepted,
                a_completed_key_is_neither_released_nor_extended,
                a_lapsed_claim_is_no_claim,
                a_completion_after_a_lapse_nobody_took_over_is_stored,
                a_record_outlives_the_lease_of_its_claim,
                bodies_of_any_bytes_round_trip,
            );
        }
    };
    (@tests $($check:ident),* $(,)?) => {
        $(
            #[::tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $check() {
                $crate::store::conformance::$check(store().await).await;
            }
        )*
    };
}
