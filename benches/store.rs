#![allow(missing_docs)]
//! The store steps of a first-seen key (claim, complete) and of a replay (read), from several
//! tasks at once on a multi-threaded runtime.
//!
//! ```text
//! cargo bench --bench store
//! ```
//!
//! Each backend gets the same workloads through [`store_steps`]: `MemoryStore`, and with
//! `--features redis` a `RedisStore` on a `redis-server` started for the run.

use std::{
    sync::atomic::{AtomicU64, Ordering},
    time::{Duration, Instant},
};

use bytes::Bytes;
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, StatusCode, header};
use tokio::runtime::Runtime;
use tower_idempotency::{
    IdempotencyKey,
    store::{Claim, Fingerprint, Holder, KeyStore, MemoryStore, Record, StoreKey},
};

/// Tasks hammering the store at once.
const TASKS: u64 = 8;
const LEASE: Duration = Duration::from_secs(60);
const RETENTION: Duration = Duration::from_secs(3600);

fn runtime() -> Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime")
}

fn record() -> Record {
    let mut headers = HeaderMap::new();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::LOCATION, HeaderValue::from_static("/orders/42"));
    Record::response(
        Fingerprint::from_bytes([7; 32]),
        StatusCode::CREATED,
        headers,
        Bytes::from(vec![b'x'; 256]),
        None,
    )
}

fn key(name: &str) -> StoreKey {
    StoreKey::new(b"", &IdempotencyKey::new(name).expect("a valid key"))
}

/// Runs `iters` rounds of `step` split over [`TASKS`] tasks and returns the wall time.
async fn contended<S, F, Fut>(store: &S, iters: u64, step: F) -> Duration
where
    S: KeyStore + Clone,
    F: Fn(S, u64) -> Fut + Clone + Send + 'static,
    Fut: Future<Output = ()> + Send,
{
    let start = Instant::now();
    let tasks: Vec<_> = (0..TASKS)
        .map(|t| {
            let (store, step) = (store.clone(), step.clone());
            tokio::spawn(async move {
                for i in (t..iters).step_by(TASKS as usize) {
                    step(store.clone(), i).await;
                }
            })
        })
        .collect();
    for task in tasks {
        task.await.expect("no panic");
    }
    start.elapsed()
}

/// The workloads every backend runs: a fresh key claimed and completed, and a stored key read,
/// each by several tasks at once.
fn store_steps<S: KeyStore + Clone>(c: &mut Criterion, rt: &Runtime, name: &str, store: S) {
    let mut group = c.benchmark_group(format!("store/{name}"));
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3))
        .throughput(Throughput::Elements(1));
    let record = std::sync::Arc::new(record());
    let fingerprint = record.fingerprint;

    // Distinct per run of the bench, so that a persistent backend starts from fresh keys.
    let run = uuid::Uuid::new_v4();
    let counter = std::sync::Arc::new(AtomicU64::new(0));
    group.bench_function("claim+complete", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (store, record, counter) = (store.clone(), record.clone(), counter.clone());
            async move {
                contended(&store, iters, move |store: S, _| {
                    let record = record.clone();
                    let n = counter.fetch_add(1, Ordering::Relaxed);
                    async move {
                        let key = key(&format!("{run}-{n}"));
                        let Ok(Claim::Claimed(token)) =
                            store.claim(&key, &fingerprint, LEASE).await
                        else {
                            panic!("a fresh key is claimable")
                        };
                        store
                            .complete(&key, token, &record, RETENTION)
                            .await
                            .expect("stored");
                    }
                })
                .await
            }
        })
    });

    // Every task reads the same handful of keys: the hot replay case.
    let stored: Vec<StoreKey> = (0..TASKS)
        .map(|t| key(&format!("{run}-read-{t}")))
        .collect();
    rt.block_on(async {
        for key in &stored {
            let Ok(Claim::Claimed(token)) = store.claim(key, &fingerprint, LEASE).await else {
                panic!("a fresh key is claimable")
            };
            store
                .complete(key, token, &record, RETENTION)
                .await
                .expect("stored");
        }
    });
    let stored = std::sync::Arc::new(stored);
    group.bench_function("read", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let (store, stored) = (store.clone(), stored.clone());
            async move {
                contended(&store, iters, move |store: S, i| {
                    let stored = stored.clone();
                    async move {
                        let found = store.read(&stored[i as usize % stored.len()]).await;
                        assert!(matches!(found, Ok(Some(Holder::Completed(_)))));
                    }
                })
                .await
            }
        })
    });

    // Every task claims the same key: one wins per round, the others see it in flight.
    group.bench_function("claim_same_key", |b| {
        b.to_async(rt).iter_custom(|iters| {
            let store = store.clone();
            let round = key(&format!("{run}-same-{}", uuid::Uuid::new_v4()));
            async move {
                contended(&store, iters, move |store: S, _| async move {
                    let claimed = store.claim(&round, &fingerprint, LEASE).await;
                    assert!(claimed.is_ok());
                })
                .await
            }
        })
    });
    group.finish();
}

fn backends(c: &mut Criterion) {
    let rt = runtime();
    store_steps(c, &rt, "memory", MemoryStore::new());
    redis_steps(c, &rt);
}

/// The same steps on `RedisStore` against a `redis-server` started here on a free port.
#[cfg(feature = "redis")]
fn redis_steps(c: &mut Criterion, rt: &Runtime) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port");
    let server = std::process::Command::new("redis-server")
        .args([
            "--port",
            &port.to_string(),
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .stdout(std::process::Stdio::null())
        .spawn();
    let mut server = match server {
        Ok(server) => server,
        Err(err) => {
            println!(
                "store/redis: skipped, redis-server could not be started ({err}); install redis-server"
            );
            return;
        }
    };
    let url = format!("redis://127.0.0.1:{port}");
    let store = rt.block_on(async {
        for _ in 0..50 {
            if let Ok(store) = tower_idempotency::store::RedisStore::connect(&url).await {
                return Some(store);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        None
    });
    match store {
        Some(store) => {
            store_steps(c, rt, "redis", store.clone());
            redis_waits(c, rt, &url, store);
        }
        None => println!("store/redis: skipped, redis-server on port {port} did not answer"),
    }
    let _ = server.kill();
    let _ = server.wait();
}

/// Waiters on many distinct keys at once, each subscribing to its key's channel before it
/// reads: how long until every one of them has its answer, beside the same number of plain
/// reads. The keys are completed first, so the difference is the subscriptions.
#[cfg(feature = "redis")]
fn redis_waits(
    c: &mut Criterion,
    rt: &Runtime,
    url: &str,
    store: tower_idempotency::store::RedisStore,
) {
    const WAITERS: usize = 1000;
    let waiting = rt
        .block_on(tower_idempotency::store::RedisStore::connect(url))
        .expect("a second store");
    let record = record();
    let fingerprint = record.fingerprint;
    let mut group = c.benchmark_group("store/redis");
    group
        .sample_size(10)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(WAITERS as u64));
    // The same keys read at once, without waiting: the baseline.
    for (name, wait) in [
        ("read_distinct_keys_1000", false),
        ("wait_distinct_keys_1000", true),
    ] {
        group.bench_function(name, |b| {
            b.to_async(rt).iter_custom(|iters| {
                let (store, waiting, record) = (store.clone(), waiting.clone(), record.clone());
                async move {
                    let mut total = Duration::ZERO;
                    for _ in 0..iters {
                        let keys: Vec<StoreKey> = (0..WAITERS)
                            .map(|_| key(&uuid::Uuid::new_v4().to_string()))
                            .collect();
                        for key in &keys {
                            let Ok(Claim::Claimed(token)) =
                                store.claim(key, &fingerprint, LEASE).await
                            else {
                                panic!("a fresh key is claimable")
                            };
                            store
                                .complete(key, token, &record, RETENTION)
                                .await
                                .expect("stored");
                        }
                        let start = Instant::now();
                        let tasks: Vec<_> = keys
                            .into_iter()
                            .map(|key| {
                                let waiting = waiting.clone();
                                tokio::spawn(async move {
                                    let seen = if wait {
                                        waiting.wait(&key, Duration::from_secs(30)).await
                                    } else {
                                        waiting.read(&key).await
                                    };
                                    assert!(matches!(seen, Ok(Some(Holder::Completed(_)))));
                                })
                            })
                            .collect();
                        for task in tasks {
                            task.await.expect("no panic");
                        }
                        total += start.elapsed();
                    }
                    total
                }
            })
        });
    }
    group.finish();
}

#[cfg(not(feature = "redis"))]
fn redis_steps(_: &mut Criterion, _: &Runtime) {
    println!(
        "store/redis: skipped, built without the redis feature (cargo bench --features redis)"
    );
}

criterion_group!(benches, backends);
criterion_main!(benches);
