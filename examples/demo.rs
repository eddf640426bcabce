//! The whole story in one run: `cargo run --example demo`.
//!
//! An order service sits behind `IdempotencyService` on a real socket, with a faulty proxy in
//! front of it that loses responses. A client creates orders through the proxy and retries
//! with the same key; it then fires a storm of concurrent duplicates, gives up on a slow attempt
//! (the run goes on, and the retry gets its answer), and reuses a key with another body. Last,
//! the demo counts how many times the handler ran for each key.
//!
//! With `REDIS_URL` set (and the `redis` feature) the service keeps its keys in Redis.

use std::{
    collections::{BTreeMap, VecDeque},
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Bytes,
    extract::State,
    http::{HeaderMap, StatusCode},
    routing::post,
};
use http_body_util::{BodyExt, Full};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::TokioExecutor,
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};
use tower::{Layer, ServiceExt};
use tower_idempotency::{
    IdempotencyKey, IdempotencyServiceLayer,
    client::{IdempotentClient, IdempotentClientLayer, RetryPolicy},
    store::{KeyStore, MemoryStore},
};
use tracing::instrument::WithSubscriber;

/// How many times the handler ran, per idempotency key.
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<BTreeMap<String, usize>>>);

impl Ledger {
    /// How many times the handler ran for `key`.
    fn runs(&self, key: &str) -> usize {
        self.0.lock().unwrap().get(key).copied().unwrap_or(0)
    }
}

async fn create_order(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
    body: Bytes,
) -> (StatusCode, String) {
    // The work a create does: here, a little time.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let key = headers
        .get("idempotency-key")
        .map_or("-", |v| v.to_str().unwrap_or("?"))
        .trim_matches('"')
        .to_owned();
    let runs = {
        let mut ledger = ledger.0.lock().unwrap();
        let runs = ledger.entry(key).or_default();
        *runs += 1;
        *runs
    };
    let order = uuid::Uuid::new_v4();
    (
        StatusCode::CREATED,
        format!(
            "{{\"order\":\"{order}\",\"run\":{runs},\"request\":{}}}",
            String::from_utf8_lossy(&body)
        ),
    )
}

/// What the proxy does to the next connection.
#[derive(Clone, Copy, Debug)]
enum Fault {
    /// Forward the request, then close the connection instead of relaying the response.
    LoseResponse,
    /// Answer 503 itself; the server never sees the request.
    Unavailable,
}

/// A TCP proxy in front of the server that applies queued faults, one per connection.
async fn faulty_proxy(upstream: SocketAddr, faults: Arc<Mutex<VecDeque<Fault>>>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut client, _) = listener.accept().await.unwrap();
            let fault = faults.lock().unwrap().pop_front();
            tokio::spawn(async move {
                let mut server = TcpStream::connect(upstream).await.unwrap();
                match fault {
                    None => {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut server).await;
                    }
                    Some(Fault::Unavailable) => {
                        let mut buf = vec![0; 64 * 1024];
                        let _ = client.read(&mut buf).await;
                        let _ = client
                            .write_all(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
                            .await;
                        println!("   [proxy] answers 503 Service Unavailable without forwarding");
                    }
                    Some(Fault::LoseResponse) => {
                        // Relay the request, wait for the answer, and throw it away.
                        let mut buf = vec![0; 64 * 1024];
                        let n = client.read(&mut buf).await.unwrap_or(0);
                        let _ = server.write_all(&buf[..n]).await;
                        let _ = server.read(&mut buf).await;
                        println!(
                            "   [proxy] the server answered, but the proxy drops the response"
                        );
                    }
                }
            });
        }
    });
    addr
}

async fn open_store() -> (Arc<dyn KeyStore>, String) {
    match std::env::var("REDIS_URL") {
        #[cfg(feature = "redis")]
        Ok(url) => match tower_idempotency::store::RedisStore::connect(&url).await {
            // The URL may hold a password: it is not printed.
            Ok(store) => (Arc::new(store), "RedisStore at REDIS_URL".to_owned()),
            Err(err) => {
                eprintln!("cannot connect to the Redis at REDIS_URL: {err}");
                std::process::exit(1);
            }
        },
        #[cfg(not(feature = "redis"))]
        Ok(_) => {
            eprintln!(
                "REDIS_URL is set, but this build has no Redis store: run with --features redis"
            );
            std::process::exit(2);
        }
        Err(_) => (Arc::new(MemoryStore::new()), "MemoryStore".to_owned()),
    }
}

/// The hyper client behind `IdempotentClientLayer`: the key is fixed before the retry, and
/// each attempt has its own timeout.
type HttpClient = IdempotentClient<Client<HttpConnector, Full<Bytes>>>;

/// The client: IdempotencyLayer + RetryPolicy + `attempt_timeout` per attempt, over hyper.
/// Each request opens a fresh connection, so each of the proxy's faults hits exactly one
/// attempt.
fn http_client(attempt_timeout: Duration) -> HttpClient {
    let hyper = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .build_http();
    IdempotentClientLayer::new()
        .retry(
            RetryPolicy::new()
                .max_attempts(5)
                .backoff(Duration::from_millis(50), Duration::from_millis(500)),
        )
        .attempt_timeout(attempt_timeout)
        .layer(hyper)
}

struct Reply {
    status: StatusCode,
    replayed: bool,
    body: String,
}

async fn send(
    client: &HttpClient,
    url: &str,
    key: &IdempotencyKey,
    body: &str,
) -> Result<Reply, String> {
    let mut request = http::Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from(body.to_owned())))
        .unwrap();
    request.extensions_mut().insert(key.clone());
    let response = client
        .clone()
        .oneshot(request)
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    let replayed = response.headers().contains_key("idempotent-replayed");
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok(Reply {
        status,
        replayed,
        body: String::from_utf8_lossy(&body).into_owned(),
    })
}

#[tokio::main]
async fn main() {
    // Print the client's log line for each attempt.
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| "tower_idempotency::client=debug".into()),
        )
        .with_target(false)
        .with_level(false)
        .without_time()
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stdout()))
        .init();
    let (store, store_name) = open_store().await;
    let ledger = Ledger::default();
    let app = Router::new()
        .route("/orders", post(create_order))
        .with_state(ledger.clone())
        .layer(IdempotencyServiceLayer::with_shared_store(store));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let server = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
    let faults = Arc::new(Mutex::new(VecDeque::new()));
    let proxy = faulty_proxy(server, faults.clone()).await;
    let url = format!("http://{proxy}/orders");

    println!("tower-idempotency demo");
    println!("An order service runs behind IdempotencyService ({store_name}) on {server}.");
    println!(
        "Clients reach it through a proxy on {proxy} that loses responses and answers 503 on cue.\n"
    );

    let client = http_client(Duration::from_secs(5));

    // 1. A lost response and an outage, and retries with the same key.
    let key =
        IdempotencyKey::new(format!("order-{}", &uuid::Uuid::new_v4().to_string()[..8])).unwrap();
    println!("1. Create an order with Idempotency-Key: {key}. The proxy loses the first response");
    println!("   and answers 503 to the second attempt; the client retries with the same key.");
    faults
        .lock()
        .unwrap()
        .extend([Fault::LoseResponse, Fault::Unavailable]);
    let first = send(&client, &url, &key, r#"{"sku":"tea","qty":2}"#)
        .await
        .expect("an answer after retries");
    println!(
        "   => {} {}{}",
        first.status,
        first.body,
        if first.replayed {
            "\n      replayed from the store (Idempotent-Replayed: true)"
        } else {
            ""
        }
    );
    let runs = ledger.runs(key.as_str());
    println!(
        "   The handler ran {runs} time{} for this key{}.\n",
        if runs == 1 { "" } else { "s" },
        if first.replayed {
            "; the last attempt got the first run's answer"
        } else {
            ""
        }
    );

    // 2. A storm of concurrent duplicates.
    let storm =
        IdempotencyKey::new(format!("storm-{}", &uuid::Uuid::new_v4().to_string()[..8])).unwrap();
    println!(
        "2. 100 concurrent requests with one new key ({storm}), while the handler takes 200 ms."
    );
    let started = Instant::now();
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            let (client, url, storm) = (client.clone(), url.clone(), storm.clone());
            // One log line per attempt would be 100 lines here: keep this step quiet.
            let quiet = tracing::subscriber::NoSubscriber::default();
            tokio::spawn(
                async move { send(&client, &url, &storm, r#"{"sku":"coffee"}"#).await }
                    .with_subscriber(quiet),
            )
        })
        .collect();
    let mut statuses = BTreeMap::new();
    let mut bodies = std::collections::BTreeSet::new();
    let mut replayed = 0;
    for task in tasks {
        match task.await.unwrap() {
            Ok(reply) => {
                *statuses.entry(reply.status.to_string()).or_insert(0) += 1;
                replayed += usize::from(reply.replayed);
                bodies.insert(reply.body);
            }
            Err(err) => *statuses.entry(format!("error: {err}")).or_insert(0) += 1,
        }
    }
    println!(
        "   answers: {statuses:?} in {} ms, {replayed} of them marked Idempotent-Replayed",
        started.elapsed().as_millis()
    );
    println!(
        "   distinct bodies: {}, handler runs: {} ({})\n",
        bodies.len(),
        ledger.runs(storm.as_str()),
        if bodies.len() == 1 {
            "every duplicate waited for the first and got its answer"
        } else {
            "the duplicates did not all get one answer"
        },
    );

    // 3. A client that gives up on a slow attempt: the run goes on without it.
    let impatient = http_client(Duration::from_millis(150));
    let slow =
        IdempotencyKey::new(format!("slow-{}", &uuid::Uuid::new_v4().to_string()[..8])).unwrap();
    println!(
        "3. Create an order with {slow} from a client that waits 150 ms an attempt, while the"
    );
    println!("   handler takes 200 ms: the first attempt times out and its connection closes.");
    let gave_up = send(&impatient, &url, &slow, r#"{"sku":"cake"}"#)
        .await
        .expect("an answer after retries");
    println!(
        "   => {} {}{}",
        gave_up.status,
        gave_up.body,
        if gave_up.replayed {
            "\n      replayed from the store (Idempotent-Replayed: true)"
        } else {
            ""
        }
    );
    println!(
        "   The run the client left went on and was stored; the handler ran {} time for this key.\n",
        ledger.runs(slow.as_str())
    );

    // 4. The same key with a different body.
    println!("4. Reuse {key} with a different body.");
    let reused = send(&client, &url, &key, r#"{"sku":"tea","qty":200}"#)
        .await
        .expect("an answer");
    println!("   {} {}\n", reused.status, reused.body);

    println!("Handler runs per key:");
    let ledger = ledger.0.lock().unwrap();
    for (key, runs) in ledger.iter() {
        println!("   {key}: {runs}");
    }
    let total: usize = ledger.values().sum();
    println!("{total} handler runs for {} keys.", ledger.len());

    // What the demo shows, checked: it fails loudly rather than print a wrong story.
    let storm_ok = statuses.len() == 1 && statuses.get("201 Created") == Some(&100);
    let checks = [
        (
            first.status == StatusCode::CREATED && first.replayed,
            "the retried order was replayed with 201",
        ),
        (
            storm_ok && bodies.len() == 1 && replayed == 99,
            "the storm got one answer, 99 times replayed",
        ),
        (
            gave_up.status == StatusCode::CREATED && gave_up.replayed,
            "the order whose first attempt timed out was replayed with 201",
        ),
        (
            reused.status == StatusCode::UNPROCESSABLE_ENTITY,
            "the reused key got 422",
        ),
        (total == ledger.len(), "every key ran exactly once"),
    ];
    for (held, what) in checks {
        assert!(held, "the demo went wrong: expected that {what}");
    }
}
