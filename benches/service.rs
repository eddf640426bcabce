#![allow(missing_docs)]
//! In-process cost of `IdempotencyService` per request, beside the same handler without it.
//!
//! ```text
//! cargo bench --bench service
//! ```
//!
//! Every workload sends the same request to both services, through `ServiceExt::oneshot`, on
//! a current-thread runtime: the difference between the `bare` and `idempotent` lines is what
//! the middleware adds on one core. The handler is trivial (a small `Full<Bytes>`, body not
//! read), so the ratio is the worst case; a real handler dilutes it.

mod common;

use std::{
    convert::Infallible,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use bytes::Bytes;
use common::{handler, request, runtime, send, yielding};
use criterion::{
    BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main, measurement::WallTime,
};
use http::{Request, Response};
use http_body_util::Full;
use tower::{Layer, service_fn};
use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};

fn group<'a>(c: &'a mut Criterion, name: &str) -> BenchmarkGroup<'a, WallTime> {
    let mut group = c.benchmark_group(name);
    group
        .sample_size(30)
        .warm_up_time(Duration::from_millis(500))
        .measurement_time(Duration::from_secs(3));
    group
}

/// One request at a time: no key (pass-through), a key never seen before, a replay.
fn per_request(c: &mut Criterion) {
    let rt = runtime();
    let bare = service_fn(handler);
    let idempotent = IdempotencyServiceLayer::new(MemoryStore::new()).layer(service_fn(handler));
    let mut group = group(c, "request");
    group.throughput(Throughput::Elements(1));

    group.bench_function("no_key/bare", |b| {
        b.to_async(&rt).iter(|| send(&bare, request(None)))
    });
    group.bench_function("no_key/idempotent", |b| {
        b.to_async(&rt).iter(|| send(&idempotent, request(None)))
    });

    // The key is built for both services, so that only the middleware's work differs.
    let counter = AtomicU64::new(0);
    let fresh_key = || format!("fresh-{}", counter.fetch_add(1, Ordering::Relaxed));
    group.bench_function("fresh_key/bare", |b| {
        b.to_async(&rt)
            .iter(|| send(&bare, request(Some(&fresh_key()))))
    });
    group.bench_function("fresh_key/idempotent", |b| {
        b.to_async(&rt)
            .iter(|| send(&idempotent, request(Some(&fresh_key()))))
    });

    rt.block_on(send(&idempotent, request(Some("replayed"))));
    group.bench_function("replay/bare", |b| {
        b.to_async(&rt)
            .iter(|| send(&bare, request(Some("replayed"))))
    });
    group.bench_function("replay/idempotent", |b| {
        b.to_async(&rt)
            .iter(|| send(&idempotent, request(Some("replayed"))))
    });
    group.finish();
}

type SlowAnswer =
    std::pin::Pin<Box<dyn Future<Output = Result<Response<Full<Bytes>>, Infallible>> + Send>>;

/// A handler that yields twice before answering, so that every duplicate spawned with the first
/// request has joined it before it finishes; it counts its runs.
fn slow_handler<B: Send + 'static>(
    runs: Arc<AtomicU64>,
) -> impl Fn(Request<B>) -> SlowAnswer + Clone {
    move |req| {
        let runs = runs.clone();
        Box::pin(async move {
            let answer = yielding(req).await;
            runs.fetch_add(1, Ordering::Relaxed);
            answer
        })
    }
}

/// 100 requests spawned at once. With the middleware they share one key: one runs the handler,
/// 99 wait for it in this process and replay its answer. Bare, the handler runs 100 times.
fn coalesced(c: &mut Criterion) {
    const DUPLICATES: u64 = 100;
    let rt = runtime();
    let runs = Arc::new(AtomicU64::new(0));
    let bare = service_fn(slow_handler(runs.clone()));
    let idempotent = IdempotencyServiceLayer::new(MemoryStore::new())
        .layer(service_fn(slow_handler(runs.clone())));
    let counter = Arc::new(AtomicU64::new(0));
    let batches = Arc::new(AtomicU64::new(0));

    let mut group = group(c, "coalesced_100");
    group.throughput(Throughput::Elements(DUPLICATES));
    group.bench_function("bare", |b| {
        b.to_async(&rt).iter(|| async {
            let tasks: Vec<_> = (0..DUPLICATES)
                .map(|_| {
                    tokio::spawn({
                        let bare = bare.clone();
                        async move { send(&bare, request(None)).await }
                    })
                })
                .collect();
            for task in tasks {
                task.await.expect("no panic");
            }
        })
    });
    runs.store(0, Ordering::Relaxed);
    group.bench_function("idempotent", |b| {
        b.to_async(&rt).iter(|| async {
            batches.fetch_add(1, Ordering::Relaxed);
            let key = format!("dup-{}", counter.fetch_add(1, Ordering::Relaxed));
            let tasks: Vec<_> = (0..DUPLICATES)
                .map(|_| {
                    let idempotent = idempotent.clone();
                    let key = key.clone();
                    tokio::spawn(async move { send(&idempotent, request(Some(&key))).await })
                })
                .collect();
            for task in tasks {
                task.await.expect("no panic");
            }
        })
    });
    group.finish();
    assert_eq!(
        runs.load(Ordering::Relaxed),
        batches.load(Ordering::Relaxed),
        "one handler run per batch of duplicates"
    );
}

criterion_group!(benches, per_request, coalesced);
criterion_main!(benches);
