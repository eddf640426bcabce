//! `IdempotencyService` on `RedisStore`, end to end: several services (and processes) sharing one
//! Redis or Redis Cluster, each with its own connections, as replicas behind a load balancer
//! would be. The tests start their own `redis-server` processes (the cluster test uses the
//! cluster the tests of this binary share).

mod support;

use std::{
    io::{BufRead, BufReader},
    process::{Child, Command, Stdio},
    sync::Arc,
    time::{Duration, Instant},
};

use axum::http::{StatusCode, header};
use support::{
    Monitor, RedisServer,
    app::{Counter, TestServer, app, assert_one_answer, many_keys, serve, storm, two_servers},
    bounded_store, cluster, command,
    proxy::CuttingProxy,
};
use tower_idempotency::{
    IdempotencyKey, IdempotencyServiceLayer, server::OnStoreError, store::RedisStore,
    store::StoreKey,
};

async fn standalone_store(url: &str) -> RedisStore {
    bounded_store(url, Duration::from_millis(500)).await
}

/// [`two_services`] on two standalone stores connected to `server`.
async fn two_services_on(server: &RedisServer) -> [Arc<TestServer>; 2] {
    two_services(
        standalone_store(&server.url()).await,
        standalone_store(&server.url()).await,
    )
    .await
}

/// Two services, each on a store of its own (separate connections) to the same Redis, counting
/// handler runs together.
async fn two_services(a: RedisStore, b: RedisStore) -> [Arc<TestServer>; 2] {
    two_servers(
        IdempotencyServiceLayer::new(a),
        IdempotencyServiceLayer::new(b),
    )
    .await
}

async fn storms_run_once(servers: [Arc<TestServer>; 2]) {
    let key = IdempotencyKey::auto();
    let answers = storm(&servers, 200, "/orders?delay_ms=100", key.as_str(), 100).await;
    assert_one_answer(&answers);
    let replayed = answers.iter().filter(|a| a.replayed()).count();
    println!(
        "200 duplicates across two services: {} handler run(s), {replayed} replayed",
        servers[0].runs.runs()
    );
    assert_eq!(
        servers[0].runs.runs(),
        1,
        "200 duplicates across two services ran once"
    );
    assert_eq!(replayed, 199);

    many_keys(&servers, 400, 4).await;
    println!(
        "400 keys x 4 duplicates: {} handler runs",
        servers[0].runs.runs() - 1
    );
    assert_eq!(
        servers[0].runs.runs(),
        1 + 400,
        "400 keys x 4 duplicates ran 400 times"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_across_two_services_on_one_redis_run_once() {
    let server = RedisServer::start();
    storms_run_once(two_services_on(&server).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_across_two_services_on_a_cluster_run_once() {
    let nodes = cluster().urls();
    let a = RedisStore::connect_cluster(nodes.clone()).await.unwrap();
    let b = RedisStore::connect_cluster(nodes).await.unwrap();
    storms_run_once(two_services(a, b).await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_waiter_in_another_service_gets_the_answer_as_soon_as_it_is_stored() {
    let server = RedisServer::start();
    // B polls only every 10 s: an answer within a second is the notification's.
    let slow_poller = RedisStore::builder()
        .poll_interval(Duration::from_secs(10))
        .connect(&server.url())
        .await
        .unwrap();
    let [a, b] = two_services(standalone_store(&server.url()).await, slow_poller).await;
    let mut lags = Vec::new();
    for _ in 0..5 {
        let key = IdempotencyKey::auto();
        let first = tokio::spawn({
            let (a, key) = (a.clone(), key.clone());
            async move {
                let answer = a.post("/orders?delay_ms=300", key.as_str(), "tea").await;
                (answer, Instant::now())
            }
        });
        tokio::time::sleep(Duration::from_millis(100)).await;
        let duplicate = b.post("/orders?delay_ms=300", key.as_str(), "tea").await;
        let answered = Instant::now();
        let (first, first_answered) = first.await.unwrap();
        assert!(duplicate.replayed());
        assert_eq!(duplicate.body, first.body);
        lags.push(answered.saturating_duration_since(first_answered));
    }
    let median = support::median(lags.clone());
    println!("cross-service wake-up after completion: median {median:?}, all {lags:?}");
    assert!(
        median < Duration::from_secs(1),
        "the waiter was not woken by the completion: {lags:?}"
    );
    assert_eq!(a.runs.runs(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_response_refused_for_want_of_memory_is_stored_once_memory_returns() {
    // Redis at its memory limit refuses the completion's write (but would still allow the
    // claim's deletion). The first caller gets its answer, the claim is kept, and the record
    // is stored once memory is back: the retry is a replay, and the handler ran once.
    let server = RedisServer::start();
    let [a, b] = two_services_on(&server).await;
    let first = tokio::spawn({
        let a = a.clone();
        async move { a.post("/orders?delay_ms=300", "k-oom", "tea").await }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 1").trim(),
        "+OK"
    );
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    assert_eq!(first.text(), "run=1 body=tea");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let errors = command(server.port(), "INFO errorstats");
    assert!(
        errors.contains("errorstat_OOM"),
        "Redis never refused a write, so nothing was tested: {errors}"
    );
    assert_eq!(
        command(server.port(), "CONFIG SET maxmemory 0").trim(),
        "+OK"
    );
    let retry = b.post("/orders?delay_ms=300", "k-oom", "tea").await;
    assert!(retry.replayed(), "the retry ran again: {}", retry.text());
    assert_eq!(retry.text(), "run=1 body=tea");
    assert_eq!(a.runs.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn duplicates_in_the_process_of_a_run_whose_lease_lapsed_get_its_answer() {
    // A run outlives its lease (as it would through a Redis stall longer than the lease), and
    // no other process takes the key: its response is stored, and the duplicates that followed
    // it in its process are answered with it instead of running the handler again.
    let server = RedisServer::start();
    let runs = Counter::default();
    let layer = IdempotencyServiceLayer::new(standalone_store(&server.url()).await)
        .lease(Duration::from_millis(300))
        .keep_lease_alive(false);
    let s = Arc::new(serve(app(runs.clone()).layer(layer), runs).await);
    let first = s.spawn_post("/orders?delay_ms=800", "k-lapsed", "tea");
    tokio::time::sleep(Duration::from_millis(100)).await;
    let duplicates: Vec<_> = (0..5)
        .map(|_| s.spawn_post("/orders?delay_ms=800", "k-lapsed", "tea"))
        .collect();
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED);
    for duplicate in duplicates {
        let duplicate = duplicate.await.unwrap();
        assert_eq!(duplicate.status, StatusCode::CREATED);
        assert_eq!(duplicate.body, first.body, "{}", duplicate.text());
    }
    let retry = s.post("/orders?delay_ms=800", "k-lapsed", "tea").await;
    assert!(retry.replayed(), "the retry ran again: {}", retry.text());
    assert_eq!(s.runs.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_release_that_met_a_broken_connection_is_made_again() {
    // The handler answers 500, so its claim is released for a retry to run; the release meets
    // a cut connection, and for a second no other can be made. It is made again once one can:
    // a retry in another service runs within seconds, not at the end of the 60 s lease.
    let server = RedisServer::start();
    let proxy = CuttingProxy::start(server.port()).await;
    let [a, b] = two_services(
        standalone_store(&proxy.url()).await,
        standalone_store(&server.url()).await,
    )
    .await;
    proxy.cut_before(b"EVALSHA", Duration::from_secs(1));
    let failed = a.post("/orders?status=500", "k-release", "tea").await;
    assert_eq!(failed.status, StatusCode::INTERNAL_SERVER_ERROR);
    assert_eq!(proxy.cuts(), 1, "the release's connection was not cut");
    let started = Instant::now();
    let retry = b.post("/orders?status=500", "k-release", "tea").await;
    // It ran again (a 500 is not stored), rather than waiting for the first claim's lease.
    assert_eq!(
        retry.status,
        StatusCode::INTERNAL_SERVER_ERROR,
        "{}",
        retry.text()
    );
    assert!(!retry.replayed());
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "the retry waited {:?} for the claim to be released",
        started.elapsed()
    );
    assert_eq!(a.runs.runs(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_is_answered_409_at_its_wait_timeout_while_redis_hangs() {
    // Redis stops answering while a duplicate waits on another service's run; the store's
    // calls would hang for 3 s. The duplicate still gets its 409 at its 1 s wait timeout, as
    // it would from a store that answered.
    let server = RedisServer::start();
    let url = server.url();
    let slow_store = || bounded_store(&url, Duration::from_secs(3));
    let [a, b] = two_servers(
        IdempotencyServiceLayer::new(slow_store().await),
        IdempotencyServiceLayer::new(slow_store().await)
            .wait_timeout(Duration::from_secs(1))
            .store_timeout(Duration::from_secs(3)),
    )
    .await;
    let first = a.spawn_post("/orders?delay_ms=1500", "k-hang", "tea");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let started = Instant::now();
    let duplicate = b.spawn_post("/orders?delay_ms=1500", "k-hang", "tea");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.pause();
    let duplicate = duplicate.await.unwrap();
    let took = started.elapsed();
    server.resume();
    assert_eq!(
        duplicate.status,
        StatusCode::CONFLICT,
        "{}",
        duplicate.text()
    );
    assert!(duplicate.headers.contains_key(header::RETRY_AFTER));
    assert!(
        took < Duration::from_millis(1800),
        "the 409 came after {took:?}, past the 1 s wait timeout"
    );
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_duplicate_waiting_in_another_service_rides_out_a_redis_stall() {
    // Redis stops answering for 1.2 s while a duplicate waits on another service's run: its
    // reads of the key fail (each bounded to 300 ms), and the run ends after Redis is back.
    // The wait goes on to the answer. The duplicate's service fails open, where a wait that
    // one failed read ended ran the handler a second time, beside the first run.
    let server = RedisServer::start();
    let url = server.url();
    let store = || bounded_store(&url, Duration::from_millis(300));
    let [a, b] = two_servers(
        IdempotencyServiceLayer::new(store().await),
        IdempotencyServiceLayer::new(store().await).on_store_error(OnStoreError::FailOpen),
    )
    .await;
    let first = a.spawn_post("/orders?delay_ms=2500", "k-stall", "tea");
    tokio::time::sleep(Duration::from_millis(200)).await;
    let duplicate = b.spawn_post("/orders?delay_ms=2500", "k-stall", "tea");
    tokio::time::sleep(Duration::from_millis(300)).await;
    server.pause();
    tokio::time::sleep(Duration::from_millis(1200)).await;
    server.resume();
    assert_eq!(first.await.unwrap().status, StatusCode::CREATED);
    let duplicate = duplicate.await.unwrap();
    assert!(duplicate.replayed(), "{}", duplicate.text());
    assert_eq!(duplicate.text(), "run=1 body=tea");
    assert_eq!(a.runs.runs(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_run_across_a_planned_failover_is_stored_and_replayed_by_another_service() {
    // The key's master hands its slots to its replica while the handler runs; the demoted
    // master refuses writes. The run's lease renewals and completion follow the slot to the
    // new master, and the retry in another service is a replay.
    let cluster = support::Cluster::start(1);
    let connect = || async {
        let store = RedisStore::builder()
            .connect_cluster(cluster.urls())
            .await
            .unwrap();
        IdempotencyServiceLayer::new(store).lease(Duration::from_secs(3))
    };
    let [a, b] = two_servers(connect().await, connect().await).await;
    // Both services know the cluster's slots and hold its scripts.
    assert_eq!(
        a.post("/orders", "k-warm", "tea").await.status,
        StatusCode::CREATED
    );
    assert!(b.post("/orders", "k-warm", "tea").await.replayed());
    let first = a.spawn_post("/orders?delay_ms=1500", "k-failover", "tea");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let redis_key = RedisStore::builder()
        .connect_cluster(cluster.urls())
        .await
        .unwrap()
        .redis_key(&StoreKey::new(
            b"",
            &IdempotencyKey::new("k-failover").unwrap(),
        ));
    cluster.fail_over_slot_of(&redis_key);
    let first = first.await.unwrap();
    assert_eq!(first.status, StatusCode::CREATED, "{}", first.text());
    // A completion refused on the way is tried again in the background: give it a moment.
    tokio::time::sleep(Duration::from_secs(1)).await;
    let retry = b.post("/orders?delay_ms=1500", "k-failover", "tea").await;
    assert!(retry.replayed(), "the retry ran again: {}", retry.text());
    assert_eq!(retry.text(), first.text());
    assert_eq!(a.runs.runs(), 2, "one run for each key");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_first_seen_key_costs_two_commands_and_a_replay_one() {
    let server = RedisServer::start();
    let store = RedisStore::builder()
        .watchdog_interval(Duration::from_secs(3600))
        .connect(&server.url())
        .await
        .unwrap();
    let s = support::app::server(IdempotencyServiceLayer::new(store)).await;
    // Load the scripts once, as any long-running service has.
    s.post("/orders", "warm-up", "tea").await;

    let mut monitor = Monitor::start(server.port());
    let first = s.post("/orders", "order-1", "tea").await;
    let first_commands = monitor.commands_since_last_call();
    let replay = s.post("/orders", "order-1", "tea").await;
    let replay_commands = monitor.commands_since_last_call();
    let unkeyed = s
        .send(axum::http::Method::POST, "/orders", &[], &[], "tea")
        .await;
    let unkeyed_commands = monitor.commands_since_last_call();
    println!(
        "Redis commands: first-seen key {}, replay {}, no key {}",
        first_commands.len(),
        replay_commands.len(),
        unkeyed_commands.len()
    );
    assert_eq!(first.status, StatusCode::CREATED);
    assert!(replay.replayed());
    assert_eq!(unkeyed.status, StatusCode::CREATED);
    assert_eq!(
        first_commands.len(),
        2,
        "first-seen key: {first_commands:#?}"
    );
    assert_eq!(replay_commands.len(), 1, "replay: {replay_commands:#?}");
    assert_eq!(unkeyed_commands.len(), 0, "no key: {unkeyed_commands:#?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_dead_redis_fails_closed_and_the_service_recovers_when_it_returns() {
    let mut server = RedisServer::start();
    let store = standalone_store(&server.url()).await;
    let s = Arc::new(support::app::server(IdempotencyServiceLayer::new(store)).await);
    assert_eq!(
        s.post("/orders", "before", "tea").await.status,
        StatusCode::CREATED
    );

    // Traffic keeps flowing while Redis dies.
    let traffic = tokio::spawn({
        let s = s.clone();
        async move {
            let mut statuses = Vec::new();
            for i in 0..20 {
                statuses.push(
                    s.post("/orders", &format!("during-{i}"), "tea")
                        .await
                        .status,
                );
                tokio::time::sleep(Duration::from_millis(25)).await;
            }
            statuses
        }
    });
    tokio::time::sleep(Duration::from_millis(100)).await;
    server.kill();
    let runs_at_kill = s.runs.runs();
    let statuses = traffic.await.unwrap();
    assert!(
        statuses.contains(&StatusCode::SERVICE_UNAVAILABLE),
        "{statuses:?}"
    );
    assert!(
        statuses
            .iter()
            .all(|s| [StatusCode::CREATED, StatusCode::SERVICE_UNAVAILABLE].contains(s)),
        "{statuses:?}"
    );

    let down = s.post("/orders", "while-down", "tea").await;
    assert_eq!(down.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(down.headers[header::RETRY_AFTER], "1");
    down.problem();
    assert!(
        s.runs.runs() <= runs_at_kill + 1,
        "requests ran while Redis was down"
    );
    let runs_while_down = s.runs.runs();

    server.restart();
    let restarted = Instant::now();
    let recovered = loop {
        let answer = s.post("/orders", "after", "tea").await;
        if answer.status == StatusCode::CREATED {
            break restarted.elapsed();
        }
        assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            restarted.elapsed() < Duration::from_secs(10),
            "no recovery within 10 s of the restart"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("the service answered from Redis again {recovered:?} after the restart");
    assert_eq!(s.runs.runs(), runs_while_down + 1);
    assert!(s.post("/orders", "after", "tea").await.replayed());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_corrupted_value_is_an_error_response_not_a_panic() {
    let server = RedisServer::start();
    let store = standalone_store(&server.url()).await;
    let key = IdempotencyKey::new("corrupted").unwrap();
    let redis_key = store.redis_key(&StoreKey::new(b"", &key));
    let s = support::app::server(IdempotencyServiceLayer::new(store)).await;
    assert!(command(server.port(), &format!("SET {redis_key} not-a-record")).starts_with("+OK"));
    let answer = s.post("/orders", key.as_str(), "tea").await;
    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    answer.problem();
    assert_eq!(s.runs.runs(), 0);
    // Other keys are unaffected.
    assert_eq!(
        s.post("/orders", "healthy", "tea").await.status,
        StatusCode::CREATED
    );
}

/// The Rust files under `dir`.
fn sources(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.is_dir() {
            files.extend(sources(&path));
        } else if path.extension().is_some_and(|e| e == "rs") {
            files.push(path);
        }
    }
    files
}

/// An `examples/server` process, killed on drop.
struct ServerProcess {
    child: Child,
    url: String,
}

impl ServerProcess {
    fn start(store: &str) -> Self {
        let exe = std::env::current_exe().unwrap();
        let path = exe
            .parent()
            .unwrap()
            .parent()
            .unwrap()
            .join("examples")
            .join("server");
        assert!(
            path.exists(),
            "{} is missing: build it with `cargo build --all-features --examples`",
            path.display()
        );
        // A binary older than the code it is built from would test yesterday's server.
        let built = std::fs::metadata(&path).unwrap().modified().unwrap();
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
        let newer: Vec<_> = sources(&root.join("src"))
            .into_iter()
            .chain([root.join("examples").join("server.rs")])
            .filter(|file| std::fs::metadata(file).unwrap().modified().unwrap() > built)
            .collect();
        assert!(
            newer.is_empty(),
            "{} is older than {newer:?}: rebuild it with `cargo build --all-features --examples`",
            path.display()
        );
        let mut child = Command::new(&path)
            .args(["--addr", "127.0.0.1:0", "--store", store])
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let addr = line
            .split_whitespace()
            .nth(2)
            .unwrap_or_else(|| panic!("unexpected first line {line:?}"));
        Self {
            child,
            url: format!("http://{addr}"),
        }
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_server_processes_on_one_redis_run_each_key_once() {
    let redis = RedisServer::start();
    let processes = [
        ServerProcess::start(&redis.url()),
        ServerProcess::start(&redis.url()),
    ];
    let client = hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
        .build_http();
    let post = |base: &str, path: &str, key: String| {
        let request = axum::http::Request::post(format!("{base}{path}"))
            .header("idempotency-key", key)
            .body(http_body_util::Full::new(axum::body::Bytes::from_static(
                b"{\"sku\":\"tea\"}",
            )))
            .unwrap();
        let client = client.clone();
        async move {
            use http_body_util::BodyExt;
            let response = client.request(request).await.unwrap();
            let status = response.status();
            (
                status,
                response.into_body().collect().await.unwrap().to_bytes(),
            )
        }
    };
    // 100 duplicates of one key and 50 keys sent twice, alternating between the processes.
    let storm_key = IdempotencyKey::auto().to_string();
    let mut tasks = Vec::new();
    for i in 0..100 {
        let base = processes[i % 2].url.clone();
        tasks.push(tokio::spawn(post(
            &base,
            "/orders?delay_ms=100",
            storm_key.clone(),
        )));
    }
    for i in 0..100 {
        let base = processes[i % 2].url.clone();
        tasks.push(tokio::spawn(post(
            &base,
            "/orders",
            format!("pair-{}-{}", i / 2, storm_key),
        )));
    }
    let mut storm_bodies = std::collections::HashSet::new();
    for (i, task) in tasks.into_iter().enumerate() {
        let (status, body) = task.await.unwrap();
        assert_eq!(status, StatusCode::CREATED);
        if i < 100 {
            storm_bodies.insert(body);
        }
    }
    assert_eq!(storm_bodies.len(), 1, "every duplicate got the same order");

    let mut executions = 0;
    for process in &processes {
        let response = client
            .get(format!("{}/stats", process.url).parse().unwrap())
            .await
            .unwrap();
        use http_body_util::BodyExt;
        let stats: serde_json::Value =
            serde_json::from_slice(&response.into_body().collect().await.unwrap().to_bytes())
                .unwrap();
        executions += stats["executions"].as_u64().unwrap();
    }
    println!("two processes, 100 duplicates + 50 keys x 2: {executions} executions");
    assert_eq!(executions, 1 + 50);
}

#[test]
fn a_claim_left_by_a_crashed_process_blocks_duplicates_until_its_lease_lapses_then_runs_once() {
    let server = RedisServer::start();
    let lease = Duration::from_millis(1500);
    let handler = Duration::from_millis(2000);
    let path = format!("/orders?delay_ms={}", handler.as_millis());
    let runs = Counter::default();

    // Process A: its own runtime, store and service. It claims the key, starts a slow handler,
    // and dies without releasing anything.
    let process_a = tokio::runtime::Runtime::new().unwrap();
    let a = process_a.block_on(async {
        let store = standalone_store(&server.url()).await;
        let layer = IdempotencyServiceLayer::new(store).lease(lease);
        Arc::new(serve(app(runs.clone()).layer(layer), runs.clone()).await)
    });
    let orphan = process_a.spawn({
        let (a, path) = (a.clone(), path.clone());
        async move { a.post(&path, "crash", "tea").await }
    });
    std::thread::sleep(Duration::from_millis(300));
    process_a.shutdown_background();
    drop(orphan);
    let crashed = Instant::now();

    // Process B: a duplicate neither runs nor is answered before the lease lapses.
    let process_b = tokio::runtime::Runtime::new().unwrap();
    process_b.block_on(async {
        let b = serve(
            app(runs.clone()).layer(IdempotencyServiceLayer::new(standalone_store(&server.url()).await)),
            runs.clone(),
        )
        .await;
        let answer = b.post(&path, "crash", "tea").await;
        let waited = crashed.elapsed();
        println!("the duplicate was answered {waited:?} after the crash (lease {lease:?}, handler {handler:?})");
        // The claim was taken about 300 ms before the crash: had the duplicate run before the
        // lease lapsed, it would have been answered about `handler` after the crash.
        assert!(
            waited >= lease + handler - Duration::from_millis(600),
            "the duplicate ran before the lease lapsed: answered {waited:?} after the crash"
        );
        assert_eq!(answer.status, StatusCode::CREATED);
        assert!(!answer.replayed(), "the duplicate ran the request itself");
        assert_eq!(runs.runs(), 1, "the crashed run never finished; the duplicate ran once");
        assert!(b.post(&path, "crash", "tea").await.replayed());
        assert_eq!(runs.runs(), 1);
    });
}
