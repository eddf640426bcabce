//! The Redis store against real `redis-server` processes: the conformance kit on a server and on
//! a cluster, faults, two stores sharing keys as two processes would, and round trips.

mod support;

use std::{sync::Arc, time::Duration};

use bytes::Bytes;
use http::{HeaderMap, StatusCode};
use tokio::time::Instant;
use tower_idempotency::{
    IdempotencyKey,
    store::{
        Claim, Completion, Fingerprint, Holder, KeyStore, Record, RedisStore, StoreError, StoreKey,
    },
};

use support::{Monitor, RedisServer, bounded_store, command, median, proxy::CuttingProxy};

tower_idempotency::key_store_conformance!(
    standalone_conformance,
    RedisStore::connect(&support::shared_server().url())
        .await
        .expect("connect to redis-server")
);

tower_idempotency::key_store_conformance!(
    cluster_conformance,
    RedisStore::connect_cluster(support::cluster().urls())
        .await
        .expect("connect to the cluster")
);

const LEASE: Duration = Duration::from_secs(30);
const RETENTION: Duration = Duration::from_secs(3600);

fn fresh_key() -> StoreKey {
    StoreKey::new(b"redis-tests", &IdempotencyKey::auto())
}

fn fp(n: u8) -> Fingerprint {
    Fingerprint::from_bytes([n; 32])
}

fn record(body: &'static str) -> Record {
    Record::response(
        fp(1),
        StatusCode::CREATED,
        HeaderMap::new(),
        Bytes::from_static(body.as_bytes()),
        None,
    )
}

async fn claim(store: &RedisStore, key: &StoreKey, lease: Duration) -> Claim {
    store.claim(key, &fp(1), lease).await.expect("claim")
}

async fn claimed(
    store: &RedisStore,
    key: &StoreKey,
    lease: Duration,
) -> tower_idempotency::store::FencingToken {
    match claim(store, key, lease).await {
        Claim::Claimed(token) => token,
        other => panic!("a free key was not claimable: {other:?}"),
    }
}

async fn raw_connection(url: &str) -> redis::aio::MultiplexedConnection {
    redis::Client::open(url)
        .unwrap()
        .get_multiplexed_async_connection()
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_value_that_does_not_decode_is_an_error_not_a_panic() {
    let server = support::shared_server();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let mut raw = raw_connection(&server.url()).await;

    let garbage = fresh_key();
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(&garbage))
        .arg("not a value of ours")
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&garbage, &fp(1), LEASE).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.read(&garbage).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.wait(&garbage, Duration::from_secs(1)).await,
        Err(StoreError::Corrupt(_))
    ));
    let stranger = tower_idempotency::store::FencingToken::random();
    assert!(matches!(
        store
            .complete(&garbage, stranger, &record("x"), RETENTION)
            .await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.release(&garbage, stranger).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.extend(&garbage, stranger, LEASE).await,
        Err(StoreError::Corrupt(_))
    ));

    // A completed value whose record was cut short: the header is fine, the record is not.
    let truncated = fresh_key();
    let token = claimed(&store, &truncated, LEASE).await;
    store
        .complete(
            &truncated,
            token,
            &record("a body that will be cut"),
            RETENTION,
        )
        .await
        .unwrap();
    let value: Vec<u8> = redis::cmd("GET")
        .arg(store.redis_key(&truncated))
        .query_async(&mut raw)
        .await
        .unwrap();
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(&truncated))
        .arg(&value[..value.len() - 5])
        .query_async(&mut raw)
        .await
        .unwrap();
    assert!(matches!(
        store.claim(&truncated, &fp(1), LEASE).await,
        Err(StoreError::Corrupt(_))
    ));
    assert!(matches!(
        store.read(&truncated).await,
        Err(StoreError::Corrupt(_))
    ));

    // The store is not poisoned by them.
    let fine = fresh_key();
    claimed(&store, &fine, LEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_redis_gives_prompt_errors_and_the_store_recovers_after_a_restart() {
    let mut server = RedisServer::start();
    let timeouts = || {
        RedisStore::builder()
            .connection_timeout(Duration::from_millis(500))
            .response_timeout(Duration::from_millis(500))
            .watchdog_interval(Duration::from_millis(200))
    };
    let store = timeouts().connect(&server.url()).await.unwrap();
    // This store's waiters poll once a minute: only the watchdog can get them out after a restart.
    let waiting_store = timeouts()
        .poll_interval(Duration::from_secs(60))
        .connect(&server.url())
        .await
        .unwrap();
    let held = fresh_key();
    claimed(&store, &held, LEASE).await;
    let waiter = {
        let waiting_store = waiting_store.clone();
        tokio::spawn(async move { waiting_store.wait(&held, Duration::from_secs(120)).await })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;

    server.kill();
    let mut slowest = Duration::ZERO;
    for _ in 0..5 {
        let started = Instant::now();
        let result = store.claim(&fresh_key(), &fp(1), LEASE).await;
        let took = started.elapsed();
        assert!(
            matches!(result, Err(StoreError::Backend(_) | StoreError::Timeout(_))),
            "a claim with Redis down gave {result:?}"
        );
        assert!(
            took < Duration::from_secs(3),
            "a claim with Redis down took {took:?} to fail"
        );
        slowest = slowest.max(took);
    }
    println!("with Redis down, claims failed within {slowest:?}");

    server.restart();
    let restarted = Instant::now();
    let key = fresh_key();
    loop {
        match store.claim(&key, &fp(1), LEASE).await {
            Ok(Claim::Claimed(_)) => break,
            Ok(other) => panic!("a fresh key after the restart was {other:?}"),
            Err(err) => {
                assert!(
                    restarted.elapsed() < Duration::from_secs(10),
                    "the store did not recover within 10 s: {err}"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let recovery = restarted.elapsed();
    println!("the store served claims again {recovery:?} after Redis restarted");

    // The restart lost the claim; the waiter hears of it well before its next poll.
    let woken = tokio::time::timeout(Duration::from_secs(10), waiter)
        .await
        .expect("a waiter was stranded by the restart")
        .unwrap();
    assert_eq!(woken.unwrap(), None);
    println!(
        "a waiter across the restart was answered {:?} after it",
        restarted.elapsed()
    );

    // Notifications flow again between the two stores.
    cross_store_wake_up(store, waiting_store, "after a restart").await;
}

/// A store on `server` that bounds connecting and each reply by `bound`.
async fn store_bounded_by(server: &RedisServer, bound: Duration) -> RedisStore {
    bounded_store(&server.url(), bound).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hung_redis_gives_timeouts_and_the_store_carries_on_when_it_answers_again() {
    let server = RedisServer::start();
    let store = store_bounded_by(&server, Duration::from_millis(300)).await;
    let key = fresh_key();
    server.pause();
    let started = Instant::now();
    let result = store.claim(&key, &fp(1), LEASE).await;
    let took = started.elapsed();
    server.resume();
    assert!(
        matches!(result, Err(StoreError::Timeout(_))),
        "a claim on a hung Redis gave {result:?}"
    );
    assert!(
        took < Duration::from_secs(2),
        "a claim on a hung Redis took {took:?} to fail"
    );
    // The timed-out claim may or may not have reached Redis; the store answers either way.
    let started = Instant::now();
    loop {
        match store.claim(&key, &fp(1), LEASE).await {
            Ok(Claim::Claimed(_) | Claim::Held(Holder::InFlight { .. })) => break,
            other => assert!(
                started.elapsed() < Duration::from_secs(10),
                "no recovery: {other:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_answer_timed_out_is_given_back_once_redis_goes_on() {
    // Redis stalls past the reply timeout and then goes on, running the claim it was sent: that
    // claim is given back, so the key is free long before its 30 s lease lapses.
    let server = RedisServer::start();
    let store = store_bounded_by(&server, Duration::from_millis(300)).await;
    let other = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key();
    server.pause();
    let result = store.claim(&key, &fp(1), LEASE).await;
    assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
    tokio::time::sleep(Duration::from_millis(200)).await;
    server.resume();
    claimable_soon(&other, &key, "the timed-out claim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_its_caller_stopped_waiting_for_is_given_back_once_redis_goes_on() {
    // The caller gives up before the store's own reply timeout (a service's store timeout
    // shorter than the connection's): the claim, run when Redis goes on, is given back too.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let other = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key();
    server.pause();
    let waited =
        tokio::time::timeout(Duration::from_millis(300), store.claim(&key, &fp(1), LEASE)).await;
    assert!(
        waited.is_err(),
        "a claim on a stalled Redis answered: {waited:?}"
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.resume();
    claimable_soon(&other, &key, "the abandoned claim").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_whose_connection_was_cut_after_it_reached_redis_is_given_back() {
    // The claim reaches Redis, and the connection breaks before its reply comes back (a
    // proxy or a load balancer resetting it); for a second, no connection can be made, so
    // resending the claim fails too. The claim ran, and is given back once Redis can be reached.
    let server = RedisServer::start();
    let proxy = CuttingProxy::start(server.port()).await;
    let store = bounded_store(&proxy.url(), Duration::from_millis(300)).await;
    let other = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key();
    proxy.cut_after(b"NX", Duration::from_secs(1));
    let result = store.claim(&key, &fp(1), LEASE).await;
    assert_eq!(proxy.cuts(), 1, "the claim's connection was not cut");
    assert!(result.is_err(), "the cut claim answered: {result:?}");
    assert!(
        matches!(
            other.read(&key).await.unwrap(),
            Some(Holder::InFlight { .. })
        ),
        "the claim never reached Redis, so nothing was tested"
    );
    claimable_soon(&other, &key, "the claim whose connection was cut").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_ran_then_was_refused_when_sent_again_is_given_back() {
    // The claim reaches Redis and runs; its connection is cut before the reply, and for 300 ms
    // no connection can be made. Meanwhile Redis runs out of memory, so the claim sent again
    // is refused (OOM). That refusal is the second send's: the first one ran, and is given
    // back once Redis takes writes again.
    let server = RedisServer::start();
    let proxy = CuttingProxy::start(server.port()).await;
    let store = RedisStore::connect(&proxy.url()).await.unwrap();
    let other = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key();
    proxy.cut_after(b"NX", Duration::from_millis(300));
    // A clone claims: the give-back lives only as long as the store does.
    let claiming = store.clone();
    let claim = tokio::spawn(async move { claiming.claim(&key, &fp(1), LEASE).await });
    let started = Instant::now();
    while proxy.cuts() == 0 {
        assert!(started.elapsed() < Duration::from_secs(5), "no cut");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 1").trim(),
        "+OK"
    );
    assert!(
        matches!(
            other.read(&key).await.unwrap(),
            Some(Holder::InFlight { .. })
        ),
        "the claim never reached Redis, so nothing was tested"
    );
    let refused = claim.await.unwrap();
    assert!(
        matches!(&refused, Err(StoreError::Backend(err)) if err.to_string().contains("OOM")),
        "the claim sent again was not refused, so nothing was tested: {refused:?}"
    );
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 0").trim(),
        "+OK"
    );
    claimable_soon(&other, &key, "the claim that ran before it was refused").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_is_renewed_completed_and_released_while_its_slot_moves() {
    // The completion and the release declared the key's channel as a second key: a key that
    // never exists, so while the slot moved the new node refused them (TRYAGAIN), and a run
    // across a resharding stored nothing and ran again on the retry.
    let cluster = support::cluster();
    let store = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let completed = fresh_key();
    let token = claimed(&store, &completed, LEASE).await;
    let moving = cluster.move_slot_of(&store.redis_key(&completed));
    assert!(store.extend(&completed, token, LEASE).await.unwrap());
    let done = store
        .complete(&completed, token, &record("moved"), RETENTION)
        .await;
    assert!(matches!(done, Ok(Completion::Stored)), "{done:?}");
    assert_eq!(
        claim(&store, &completed, LEASE).await,
        Claim::Held(Holder::Completed(record("moved")))
    );
    moving.finish();

    let released = fresh_key();
    let token = claimed(&store, &released, LEASE).await;
    let moving = cluster.move_slot_of(&store.redis_key(&released));
    let release = store.release(&released, token).await;
    assert!(matches!(release, Ok(true)), "{release:?}");
    moving.finish();
    claimed(&store, &released, LEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_follows_its_key_to_the_node_it_moved_to() {
    // A cluster is resharded while a key is claimed: a store that knew the key's old node is
    // redirected, and reads and waits on the key as before, rather than failing.
    let cluster = support::cluster();
    let claimer = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let reader = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let key = fresh_key();
    assert!(matches!(
        claimer.claim(&key, &fp(1), LEASE).await.unwrap(),
        Claim::Claimed(_)
    ));
    // Both know where the key is.
    assert!(matches!(
        reader.read(&key).await.unwrap(),
        Some(Holder::InFlight { .. })
    ));
    let in_flight = async |when: &str| {
        let read = reader.read(&key).await;
        assert!(
            matches!(read, Ok(Some(Holder::InFlight { .. }))),
            "{when}: {read:?}"
        );
        let waited = reader.wait(&key, Duration::from_millis(50)).await;
        assert!(
            matches!(waited, Ok(Some(Holder::InFlight { .. }))),
            "{when}: {waited:?}"
        );
    };
    let moving = cluster.move_slot_of(&reader.redis_key(&key));
    in_flight("while the slot moves (the old node answers ASK)").await;
    moving.finish();
    in_flight("once it moved (the old node answers MOVED)").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_redis_refused_is_not_given_back() {
    // Redis answers the claim with an error (out of memory): the claim did not run, and
    // sending a release after it would only add to the load of a Redis already in trouble.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 1").trim(),
        "+OK"
    );
    let mut monitor = Monitor::start(server.port());
    for _ in 0..5 {
        let refused = store.claim(&fresh_key(), &fp(1), LEASE).await;
        assert!(
            matches!(&refused, Err(StoreError::Backend(err)) if err.to_string().contains("OOM")),
            "{refused:?}"
        );
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let commands = monitor.commands_since_last_call();
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 0").trim(),
        "+OK"
    );
    // (Redis does not show the refused claims to a monitor.)
    let releases = commands.iter().filter(|c| c.contains("EVAL")).count();
    assert_eq!(releases, 0, "{commands:#?}");
}

/// Waits until `store` can claim `key`, within 5 s: long before the 30 s lease of a claim
/// `what` made and nobody gave back would lapse.
async fn claimable_soon(store: &RedisStore, key: &StoreKey, what: &str) {
    let started = Instant::now();
    loop {
        match store.claim(key, &fp(2), LEASE).await.unwrap() {
            Claim::Claimed(_) => return,
            held => assert!(
                started.elapsed() < Duration::from_secs(5),
                "{what} still holds the key: {held:?}"
            ),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_that_timed_out_on_a_held_key_leaves_the_holder_alone() {
    let server = RedisServer::start();
    let store = store_bounded_by(&server, Duration::from_millis(300)).await;
    let holder = RedisStore::connect(&server.url()).await.unwrap();
    let key = fresh_key();
    let token = claimed(&holder, &key, LEASE).await;
    server.pause();
    let result = store.claim(&key, &fp(1), LEASE).await;
    assert!(matches!(result, Err(StoreError::Timeout(_))), "{result:?}");
    server.resume();
    // Time for the give-back to run, and find the key not its own.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    assert_eq!(
        claim(&store, &key, LEASE).await,
        Claim::Held(Holder::InFlight { fingerprint: fp(1) }),
        "the holder's claim was given back by a stranger"
    );
    assert_eq!(
        holder
            .complete(&key, token, &record("held"), RETENTION)
            .await
            .unwrap(),
        Completion::Stored
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_crashed_holder_keeps_the_key_until_its_lease_lapses() {
    let url = support::shared_server().url();
    let lease = Duration::from_millis(1500);
    let key = fresh_key();
    let crashed = RedisStore::connect(&url).await.unwrap();
    let claimed_at = Instant::now();
    claimed(&crashed, &key, lease).await;
    drop(crashed);

    let survivor = RedisStore::connect(&url).await.unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(
        survivor.claim(&key, &fp(2), lease).await.unwrap(),
        Claim::Held(Holder::InFlight { fingerprint: fp(1) }),
        "the dropped store's claim must hold until its lease lapses"
    );
    assert_eq!(
        survivor.wait(&key, Duration::from_secs(10)).await.unwrap(),
        None
    );
    assert!(
        claimed_at.elapsed() >= lease - Duration::from_millis(50),
        "the waiter took the key before the lease lapsed"
    );
    let token = claimed(&survivor, &key, LEASE).await;
    assert_eq!(
        survivor
            .complete(&key, token, &record("second"), RETENTION)
            .await
            .unwrap(),
        Completion::Stored
    );
}

async fn two_stores_claim_each_key_once(a: RedisStore, b: RedisStore) {
    let keys: Vec<StoreKey> = (0..200).map(|_| fresh_key()).collect();
    let mut tasks = Vec::new();
    for key in &keys {
        for attempt in 0..4 {
            let store = if attempt % 2 == 0 {
                a.clone()
            } else {
                b.clone()
            };
            let key = *key;
            tasks.push(tokio::spawn(async move {
                (key, store.claim(&key, &fp(1), LEASE).await.unwrap())
            }));
        }
    }
    let mut wins = std::collections::HashMap::new();
    for task in tasks {
        let (key, claim) = task.await.unwrap();
        match claim {
            Claim::Claimed(_) => *wins.entry(key).or_insert(0) += 1,
            Claim::Held(Holder::InFlight { .. }) => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(wins.len(), keys.len(), "some keys were claimed by nobody");
    assert!(
        wins.values().all(|&n| n == 1),
        "a key was claimed more than once"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_stores_claim_each_key_exactly_once() {
    let url = support::shared_server().url();
    two_stores_claim_each_key_once(
        RedisStore::connect(&url).await.unwrap(),
        RedisStore::connect(&url).await.unwrap(),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_independent_stores_on_a_cluster_claim_each_key_exactly_once() {
    let urls = support::cluster().urls();
    two_stores_claim_each_key_once(
        RedisStore::connect_cluster(&urls).await.unwrap(),
        RedisStore::connect_cluster(&urls).await.unwrap(),
    )
    .await;
}

/// A waiter on store B is woken by a completion on store A, through pub/sub: B polls only every
/// 5 s, so a wake-up within a second can only be the notification.
async fn cross_store_wake_up(a: RedisStore, b: RedisStore, setup: &str) {
    let mut latencies = Vec::new();
    for _ in 0..7 {
        let key = fresh_key();
        let token = claimed(&a, &key, LEASE).await;
        let waiter = {
            let b = b.clone();
            tokio::spawn(async move {
                let seen = b.wait(&key, Duration::from_secs(20)).await.unwrap();
                (seen, Instant::now())
            })
        };
        tokio::time::sleep(Duration::from_millis(100)).await;
        let completing = Instant::now();
        assert_eq!(
            a.complete(&key, token, &record("for B"), RETENTION)
                .await
                .unwrap(),
            Completion::Stored
        );
        let (seen, woken) = waiter.await.unwrap();
        assert_eq!(seen, Some(Holder::Completed(record("for B"))));
        latencies.push(woken.saturating_duration_since(completing));
    }
    let median = median(latencies.clone());
    println!(
        "{setup}: a waiter on another store was woken {median:?} (median) after the completion; all: {latencies:?}"
    );
    assert!(
        median < Duration::from_secs(1),
        "{setup}: the median wake-up took {median:?}: {latencies:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_store_is_woken_by_pub_sub() {
    let url = support::shared_server().url();
    let a = RedisStore::connect(&url).await.unwrap();
    let b = RedisStore::builder()
        .poll_interval(Duration::from_secs(5))
        .connect(&url)
        .await
        .unwrap();
    cross_store_wake_up(a, b, "standalone").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_on_another_store_is_woken_by_pub_sub_on_a_cluster() {
    let urls = support::cluster().urls();
    let a = RedisStore::connect_cluster(&urls).await.unwrap();
    let b = RedisStore::builder()
        .poll_interval(Duration::from_secs(5))
        .connect_cluster(&urls)
        .await
        .unwrap();
    cross_store_wake_up(a, b, "cluster").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn claim_complete_and_replay_take_one_command_each() {
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .watchdog_interval(Duration::from_secs(3600))
        .connect(&server.url())
        .await
        .unwrap();
    // Load the scripts once, as any long-running store has.
    let warm = fresh_key();
    let token = claimed(&store, &warm, LEASE).await;
    store
        .complete(&warm, token, &record("warm"), RETENTION)
        .await
        .unwrap();

    let mut monitor = Monitor::start(server.port());
    let key = fresh_key();
    let token = claimed(&store, &key, LEASE).await;
    let claim_commands = monitor.commands_since_last_call();
    store
        .complete(&key, token, &record("once"), RETENTION)
        .await
        .unwrap();
    let complete_commands = monitor.commands_since_last_call();
    assert_eq!(
        claim(&store, &key, LEASE).await,
        Claim::Held(Holder::Completed(record("once")))
    );
    let replay_commands = monitor.commands_since_last_call();
    println!(
        "commands: claim {}, complete {}, replay {}",
        claim_commands.len(),
        complete_commands.len(),
        replay_commands.len()
    );
    assert_eq!(claim_commands.len(), 1, "claim: {claim_commands:#?}");
    assert_eq!(
        complete_commands.len(),
        1,
        "complete: {complete_commands:#?}"
    );
    assert_eq!(replay_commands.len(), 1, "replay: {replay_commands:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_waiters_on_one_key_share_one_subscription() {
    let server = RedisServer::start();
    let a = RedisStore::connect(&server.url()).await.unwrap();
    let b = Arc::new(
        RedisStore::builder()
            .poll_interval(Duration::from_secs(5))
            .connect(&server.url())
            .await
            .unwrap(),
    );
    let key = fresh_key();
    let token = claimed(&a, &key, LEASE).await;
    let waiters: Vec<_> = (0..20)
        .map(|_| {
            let b = b.clone();
            tokio::spawn(async move { b.wait(&key, Duration::from_secs(20)).await.unwrap() })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(200)).await;
    let mut raw = raw_connection(&server.url()).await;
    let channel = b.channel(&key);
    let mut subscribers = async || -> Vec<(String, i64)> {
        redis::cmd("PUBSUB")
            .arg("SHARDNUMSUB")
            .arg(&channel)
            .query_async(&mut raw)
            .await
            .unwrap()
    };
    assert_eq!(
        subscribers().await,
        vec![(channel.clone(), 1)],
        "20 waiters in one store must share one subscription"
    );
    a.complete(&key, token, &record("shared"), RETENTION)
        .await
        .unwrap();
    for waiter in waiters {
        assert_eq!(
            waiter.await.unwrap(),
            Some(Holder::Completed(record("shared")))
        );
    }
    // The last waiter gone, the subscription goes too.
    let started = Instant::now();
    loop {
        let now = subscribers().await;
        if now == vec![(channel.clone(), 0)] {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(5),
            "the subscription outlived its waiters: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_whose_reply_timed_out_is_not_sent_again() {
    // Redis stops for a moment: the read's reply times out. The read went out once, and is
    // not sent a second time on top of a Redis that is already slow.
    let server = RedisServer::start();
    let store = store_bounded_by(&server, Duration::from_millis(300)).await;
    let key = fresh_key();
    assert!(store.read(&key).await.unwrap().is_none());
    let mut monitor = Monitor::start(server.port());
    monitor.commands_since_last_call();
    server.pause();
    let read = store.read(&key).await;
    server.resume();
    assert!(read.is_err(), "the read answered while Redis was stopped");
    let commands = monitor.commands_since_last_call();
    let gets = commands.iter().filter(|c| c.contains("\"GET\"")).count();
    assert_eq!(gets, 1, "{commands:#?}");
}

/// Waiters on B for many keys at once, arriving at random moments, one in six giving up early
/// (and seeing the key still in flight): every one that stays is answered by pub/sub (B polls
/// only every 30 s), and once all have left, no subscription is left behind on any node.
async fn many_keys_waited_on_at_once(a: RedisStore, b: RedisStore, nodes: &[String], setup: &str) {
    use rand::Rng;
    const KEYS: usize = 300;
    let keys: Vec<StoreKey> = (0..KEYS).map(|_| fresh_key()).collect();
    let mut tokens = Vec::new();
    for key in &keys {
        tokens.push(claimed(&a, key, LEASE).await);
    }
    let started = Instant::now();
    let mut waiters = Vec::new();
    for (i, key) in keys.iter().enumerate() {
        for n in 0..3 {
            let (b, key) = (b.clone(), *key);
            let delay = Duration::from_millis(rand::rng().random_range(0..50));
            let gives_up = n == 0 && i % 2 == 0;
            waiters.push(tokio::spawn(async move {
                tokio::time::sleep(delay).await;
                let timeout = if gives_up {
                    delay
                } else {
                    Duration::from_secs(30)
                };
                (gives_up, b.wait(&key, timeout).await.unwrap())
            }));
        }
    }
    // Completed once those giving up have long gone.
    tokio::time::sleep(Duration::from_millis(1000)).await;
    for (key, token) in keys.iter().zip(tokens) {
        assert_eq!(
            a.complete(key, token, &record("many"), RETENTION)
                .await
                .unwrap(),
            Completion::Stored
        );
    }
    for waiter in waiters {
        let (gave_up, seen) = waiter.await.unwrap();
        let expected = if gave_up {
            Some(Holder::InFlight { fingerprint: fp(1) })
        } else {
            Some(Holder::Completed(record("many")))
        };
        assert_eq!(seen, expected, "{setup}, gave up: {gave_up}");
    }
    let elapsed = started.elapsed();
    println!(
        "{setup}: {} waiters on {KEYS} keys answered after {elapsed:?}",
        KEYS * 3
    );
    assert!(
        elapsed < Duration::from_secs(8),
        "{setup}: the waiters were answered by polling, not by notifications ({elapsed:?})"
    );
    let channels: Vec<String> = keys.iter().map(|key| b.channel(key)).collect();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut left = 0;
        for node in nodes {
            let mut raw = raw_connection(node).await;
            let counts: Vec<(String, i64)> = redis::cmd("PUBSUB")
                .arg("SHARDNUMSUB")
                .arg(&channels)
                .query_async(&mut raw)
                .await
                .unwrap();
            left += counts.iter().map(|(_, n)| n).sum::<i64>();
        }
        if left == 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{setup}: {left} subscriptions outlived their waiters"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn slow_poller() -> tower_idempotency::store::RedisStoreBuilder {
    RedisStore::builder().poll_interval(Duration::from_secs(30))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_waited_on_at_once_are_all_woken_and_unsubscribed() {
    let server = RedisServer::start();
    let url = server.url();
    many_keys_waited_on_at_once(
        RedisStore::connect(&url).await.unwrap(),
        slow_poller().connect(&url).await.unwrap(),
        &[url],
        "standalone",
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_keys_waited_on_at_once_on_a_cluster_are_all_woken_and_unsubscribed() {
    let urls = support::cluster().urls();
    many_keys_waited_on_at_once(
        RedisStore::connect_cluster(&urls).await.unwrap(),
        slow_poller().connect_cluster(&urls).await.unwrap(),
        &urls,
        "cluster",
    )
    .await;
}

/// A store on `server` whose waiters look at their keys every `interval` when no notification
/// came.
async fn polling_every(server: &RedisServer, interval: Duration) -> RedisStore {
    RedisStore::builder()
        .poll_interval(interval)
        .connect(&server.url())
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_key_s_channel_is_listened_to_polls_less_and_less() {
    // Polling every 50 ms, a 1.5 s wait on a key that stays in flight would read it some 30
    // times; with its notifications coming, the pauses double up to 400 ms.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let waiting = polling_every(&server, Duration::from_millis(50)).await;
    let key = fresh_key();
    claimed(&store, &key, LEASE).await;
    let reads = || {
        let stats = command(server.port(), "INFO commandstats");
        stats
            .lines()
            .find_map(|line| line.strip_prefix("cmdstat_evalsha:calls="))
            .and_then(|rest| rest.split(',').next()?.parse::<u32>().ok())
            .unwrap_or(0)
    };
    let before = reads();
    let seen = waiting
        .wait(&key, Duration::from_millis(1500))
        .await
        .unwrap();
    assert!(matches!(seen, Some(Holder::InFlight { .. })), "{seen:?}");
    let reads = reads() - before;
    assert!((3..=12).contains(&reads), "{reads} reads in 1.5 s");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiter_whose_notification_never_comes_finds_the_record_by_polling() {
    // The record lands with no message on its channel (as when a message is lost): the waiter
    // polls, every 200 ms here, and finds it.
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let waiting = polling_every(&server, Duration::from_millis(200)).await;
    let done = fresh_key();
    let token = claimed(&store, &done, LEASE).await;
    store
        .complete(&done, token, &record("done elsewhere"), RETENTION)
        .await
        .unwrap();
    let key = fresh_key();
    claimed(&store, &key, LEASE).await;
    let waiter = tokio::spawn({
        let waiting = waiting.clone();
        async move { waiting.wait(&key, Duration::from_secs(20)).await.unwrap() }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A completed value written straight over the claim: no script, so no message.
    let mut raw = raw_connection(&server.url()).await;
    let value: Vec<u8> = redis::cmd("GET")
        .arg(store.redis_key(&done))
        .query_async(&mut raw)
        .await
        .unwrap();
    let written = Instant::now();
    let _: () = redis::cmd("SET")
        .arg(store.redis_key(&key))
        .arg(value)
        .query_async(&mut raw)
        .await
        .unwrap();
    let seen = waiter.await.unwrap();
    assert_eq!(seen, Some(Holder::Completed(record("done elsewhere"))));
    assert!(
        written.elapsed() < Duration::from_secs(5),
        "the waiter did not poll: it found the record after {:?}",
        written.elapsed()
    );
}

#[tokio::test]
async fn an_address_redis_cannot_use_is_refused_with_what_would_do() {
    let refused = |result: Result<RedisStore, StoreError>| match result {
        Ok(_) => panic!("connected"),
        Err(err) => err.to_string(),
    };
    let not_redis = refused(RedisStore::connect("http://127.0.0.1:6379").await);
    assert!(not_redis.contains("expected redis://"), "{not_redis}");
    let tls = refused(RedisStore::connect("rediss://127.0.0.1:6379").await);
    assert!(tls.contains("TLS features"), "{tls}");
    let no_nodes = refused(RedisStore::connect_cluster(Vec::<String>::new()).await);
    assert!(no_nodes.contains("at least one"), "{no_nodes}");
    let bad_node = refused(RedisStore::connect_cluster(["redis://127.0.0.1:1", "not a url"]).await);
    assert!(bad_node.contains("expected redis://"), "{bad_node}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_dropped_while_it_subscribes_leaves_no_subscription_behind() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let waiting = bounded_store(&server.url(), Duration::from_secs(3)).await;
    let key = fresh_key();
    claimed(&store, &key, LEASE).await;
    let channels = || command(server.port(), "PUBSUB SHARDCHANNELS");
    let none = channels();
    // Redis stalls while the waiter subscribes, and its caller leaves meanwhile.
    server.pause();
    let wait = tokio::spawn({
        let waiting = waiting.clone();
        async move { waiting.wait(&key, Duration::from_secs(10)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    wait.abort();
    let _ = wait.await;
    server.resume();
    // The subscription made when Redis came back is taken back.
    let left = Instant::now();
    while channels() != none {
        assert!(
            left.elapsed() < Duration::from_secs(5),
            "the waiter that left is still subscribed: {}",
            channels()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_whose_reads_all_fail_ends_at_its_deadline_with_the_error() {
    let mut server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let waiting = bounded_store(&server.url(), Duration::from_millis(300)).await;
    let key = fresh_key();
    claimed(&store, &key, LEASE).await;
    server.kill();
    let started = Instant::now();
    let waited = waiting.wait(&key, Duration::from_millis(1500)).await;
    let took = started.elapsed();
    assert!(waited.is_err(), "{waited:?}");
    assert!(
        (Duration::from_millis(1400)..Duration::from_millis(1700)).contains(&took),
        "the wait ended after {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_out_of_memory_still_releases_and_renews_claims_but_stores_nothing() {
    let server = RedisServer::start();
    let store = RedisStore::connect(&server.url()).await.unwrap();
    let (kept, given_back) = (fresh_key(), fresh_key());
    let kept_token = claimed(&store, &kept, LEASE).await;
    let given_back_token = claimed(&store, &given_back, LEASE).await;
    let set = |limit: &str| command(server.port(), &format!("CONFIG SET maxmemory {limit}"));
    assert_eq!(set("1").trim(), "+OK");
    let refused = store
        .complete(&kept, kept_token, &record("done"), RETENTION)
        .await;
    assert!(
        matches!(&refused, Err(StoreError::Backend(err)) if err.to_string().contains("OOM")),
        "{refused:?}"
    );
    assert!(store.extend(&kept, kept_token, LEASE).await.unwrap());
    assert!(store.release(&given_back, given_back_token).await.unwrap());
    assert_eq!(set("0").trim(), "+OK");
    assert_eq!(
        store
            .complete(&kept, kept_token, &record("done"), RETENTION)
            .await
            .unwrap(),
        Completion::Stored
    );
}

/// Gives `server` a user `app` (password `pw`) with `rules`, and the URL that logs in as it.
fn redis_user(server: &RedisServer, rules: &str) -> String {
    user_on(server.port(), "app", rules)
}

/// Gives the server on `port` a user `user` (password `pw`) with `rules`, and the URL that
/// logs in as it.
fn user_on(port: u16, user: &str, rules: &str) -> String {
    let reply = support::command(port, &format!("ACL SETUSER {user} on >pw {rules}"));
    assert!(reply.starts_with("+OK"), "ACL SETUSER: {reply}");
    format!("redis://{user}:pw@127.0.0.1:{port}")
}

/// A completion, a release and a replay, through `store`.
async fn steps_work(store: &RedisStore) {
    let key = fresh_key();
    let token = claimed(store, &key, LEASE).await;
    let done = store.complete(&key, token, &record("ok"), RETENTION).await;
    assert!(matches!(done, Ok(Completion::Stored)), "{done:?}");
    assert_eq!(
        claim(store, &key, LEASE).await,
        Claim::Held(Holder::Completed(record("ok")))
    );
    let key = fresh_key();
    let token = claimed(store, &key, LEASE).await;
    assert!(matches!(store.release(&key, token).await, Ok(true)));
    claimed(store, &key, LEASE).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_that_cannot_run_the_store_s_steps_is_refused_at_connect_with_what_it_needs() {
    // A user without scripts connected, then ran every first request and stored nothing: a
    // retry after the lease ran it again.
    let refused = async |url: &str| {
        let err = RedisStore::connect(url).await.expect_err("refused");
        err.to_string()
    };
    let server = RedisServer::start();
    let message = refused(&redis_user(&server, "~* &* +@all -@scripting")).await;
    assert!(
        message.contains("EVALSHA") && message.contains("~idem:*") && message.contains("NoPerm"),
        "{message}"
    );
    // Nor keys outside the prefix...
    let message = refused(&redis_user(&server, "resetkeys ~other:* &* +@all")).await;
    assert!(message.contains("~idem:*"), "{message}");
    // ...nor a command used inside the scripts.
    let message = refused(&redis_user(&server, "resetkeys ~idem:* &* +@all -pexpire")).await;
    assert!(message.contains("PEXPIRE"), "{message}");

    // A replica cannot take writes; one that does would keep its claims from the processes
    // on its master.
    let replica =
        RedisServer::start_with(&["--replicaof", "127.0.0.1", &server.port().to_string()]);
    let message = refused(&replica.url()).await;
    assert!(message.contains("primary"), "{message}");
    let writable = RedisServer::start_with(&[
        "--replicaof",
        "127.0.0.1",
        &server.port().to_string(),
        "--replica-read-only",
        "no",
    ]);
    let message = refused(&writable.url()).await;
    assert!(message.contains("is a slave"), "{message}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_that_cannot_run_the_steps_is_found_at_connect() {
    // Access control is set node by node. The check tried one key, on one node: a node left
    // without scripting was found one connect in three, and refused the keys of its slots.
    let ports = support::cluster().ports();
    let user = format!("split{}", rand::random::<u32>());
    let nodes: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let scripting = if i == ports.len() - 1 {
                "-@scripting"
            } else {
                ""
            };
            user_on(*port, &user, &format!("~* &* +@all {scripting}"))
        })
        .collect();
    for _ in 0..5 {
        let err = RedisStore::connect_cluster(nodes.clone())
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("NoPerm"), "{err}");
    }

    // The least a user needs on a cluster, as the docs list it, on every node.
    let least = format!("least{}", rand::random::<u32>());
    let rules = "~idem:* &idem:* +get +set +eval +evalsha +ssubscribe +sunsubscribe +ping +del +pexpire +pttl +spublish +cluster|slots";
    let nodes: Vec<String> = ports
        .iter()
        .map(|port| user_on(*port, &least, rules))
        .collect();
    let store = RedisStore::connect_cluster(nodes).await.expect("connect");
    steps_work(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_primary_that_cannot_answer_for_now_does_not_keep_another_from_being_checked() {
    // The check stopped at the first primary that failed for the moment, and let a primary
    // that refuses for good through.
    let cluster = support::Cluster::start(0);
    let ports = cluster.ports();
    let nodes: Vec<String> = ports
        .iter()
        .enumerate()
        .map(|(i, port)| {
            let scripting = if i == 2 { "-@scripting" } else { "" };
            user_on(*port, "app", &format!("~* &* +@all {scripting}"))
        })
        .collect();
    assert!(command(ports[0], "CLIENT PAUSE 3000 WRITE").starts_with("+OK"));
    let err = RedisStore::builder()
        .response_timeout(Duration::from_millis(500))
        .connect_cluster(nodes)
        .await
        .expect_err("refused");
    let message = err.to_string();
    assert!(
        message.contains("NoPerm") && message.contains(&format!(":{}", ports[2])),
        "{message}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_scripts_run_for_a_user_or_server_without_the_script_command() {
    // The least a user needs, as the docs list it: no SCRIPT.
    let server = RedisServer::start();
    let url = redis_user(
        &server,
        "~idem:* &idem:* +get +set +eval +evalsha +ssubscribe +sunsubscribe +ping +del +pexpire +pttl +spublish",
    );
    let store = RedisStore::connect(&url).await.expect("connect");
    steps_work(&store).await;
    // Scripts Redis forgot are sent again by their source.
    assert!(support::command(server.port(), "SCRIPT FLUSH").starts_with("+OK"));
    steps_work(&store).await;

    let renamed = RedisServer::start_with(&["--rename-command", "SCRIPT", ""]);
    let store = RedisStore::connect(&renamed.url()).await.expect("connect");
    steps_work(&store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_without_the_channels_completes_and_releases_all_the_same() {
    // Redis 7 gives a new user no channels: the publish after a completion's or a release's
    // write is refused. The step did its work, and says so.
    let server = RedisServer::start();
    let url = redis_user(&server, "~idem:* +@all");
    let store = RedisStore::connect(&url)
        .await
        .expect("connect, with a warning");
    steps_work(&store).await;
}

#[tokio::test]
async fn a_prefix_with_a_brace_is_refused() {
    // On a cluster, the brace made the key and its channel hash to different slots (every
    // completion refused with CROSSSLOT), or every key to one slot.
    let server = support::shared_server();
    for prefix in ["svc{}:", "{orders}:", "a}"] {
        let err = RedisStore::builder()
            .prefix(prefix)
            .connect(&server.url())
            .await
            .expect_err("refused");
        assert!(err.to_string().contains("brace"), "{err}");
    }
    let err = RedisStore::builder()
        .prefix("{orders}:")
        .connect_cluster(["redis://127.0.0.1:1"])
        .await
        .expect_err("refused");
    assert!(err.to_string().contains("brace"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_channel_waited_on_across_a_failover_is_left_on_every_node() {
    // A failover drops the demoted node's subscriptions; the store subscribed again through
    // its stale map of the slots (the demoted node, now a replica, took it), then the client
    // renewed its subscriptions on the new master once its map was refreshed. The waiter's
    // unsubscribe reached the new master only, and the replica kept the channel for as long
    // as the connection lived.
    let cluster = Arc::new(support::Cluster::start(1));
    let claimer = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let waiter = RedisStore::connect_cluster(cluster.urls()).await.unwrap();
    let first = fresh_key();
    claimed(&claimer, &first, LEASE).await;
    let waiting = tokio::spawn({
        let waiter = waiter.clone();
        async move { waiter.wait(&first, Duration::from_secs(3)).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let failing_over = waiter.redis_key(&first);
    tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        move || cluster.fail_over_slot_of(&failing_over)
    })
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    // A key whose slot moved: waiting on it meets MOVED, and the client refreshes its map.
    let second = fresh_key();
    claimed(&claimer, &second, LEASE).await;
    let moved = waiter.redis_key(&second);
    tokio::task::spawn_blocking({
        let cluster = cluster.clone();
        move || cluster.move_slot_of(&moved).finish()
    })
    .await
    .unwrap();
    let _ = waiter.wait(&second, Duration::from_millis(500)).await;
    let _ = waiting.await.unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    for port in cluster.ports() {
        let channels = command(port, "PUBSUB SHARDCHANNELS *");
        assert!(channels.starts_with("*0"), "node {port}: {channels}");
    }
}
