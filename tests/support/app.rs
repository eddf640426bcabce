//! The order app the end-to-end tests serve, and a hyper client that drives it.

use std::{
    collections::HashMap,
    net::SocketAddr,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::Duration,
};

use axum::{
    Router,
    body::Bytes,
    extract::{Query, State},
    http::{HeaderMap, Method, Request, StatusCode, header},
    response::{IntoResponse, Response},
    routing::post,
};
use http_body_util::{BodyExt, Full};
use hyper_util::{client::legacy::Client, rt::TokioExecutor};
use rand::Rng;
use tower_idempotency::IdempotencyServiceLayer;

#[derive(Clone, Default)]
pub struct Counter(Arc<AtomicUsize>);

impl Counter {
    pub fn runs(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Counts one more run; how many there have been, this one included.
    pub fn count(&self) -> usize {
        self.0.fetch_add(1, Ordering::SeqCst) + 1
    }
}

/// `POST /orders?delay_ms=N&status=CODE&size=BYTES&panic=1`: sleeps, counts a run, answers
/// `run=N body=...` (or `size` bytes), with a `Location`, a `Set-Cookie` and a custom header.
pub async fn orders(
    State(runs): State<Counter>,
    Query(q): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    if let Some(ms) = q.get("delay_ms") {
        tokio::time::sleep(Duration::from_millis(ms.parse().unwrap())).await;
    }
    if q.contains_key("panic") {
        runs.count();
        panic!("the handler panicked on purpose");
    }
    let run = runs.count();
    let status = q.get("status").map_or(StatusCode::CREATED, |s| {
        StatusCode::from_u16(s.parse().unwrap()).unwrap()
    });
    let body = match q.get("size") {
        Some(size) => vec![b'x'; size.parse().unwrap()],
        None => format!("run={run} body={}", String::from_utf8_lossy(&body)).into_bytes(),
    };
    (
        status,
        [
            (header::LOCATION, format!("/orders/{run}")),
            (header::SET_COOKIE, "session=secret".to_string()),
            (
                header::HeaderName::from_static("x-order-run"),
                run.to_string(),
            ),
        ],
        body,
    )
        .into_response()
}

pub fn app(runs: Counter) -> Router {
    Router::new()
        .route("/orders", post(orders).get(orders))
        .with_state(runs)
}

pub struct TestServer {
    pub addr: SocketAddr,
    pub runs: Counter,
    pub client: Client<hyper_util::client::legacy::connect::HttpConnector, Full<Bytes>>,
}

pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Answer {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn replayed(&self) -> bool {
        self.headers
            .get("idempotent-replayed")
            .is_some_and(|v| v == "true")
    }

    pub fn problem(&self) -> serde_json::Value {
        assert_eq!(
            self.headers[header::CONTENT_TYPE],
            "application/problem+json",
            "{}",
            self.text()
        );
        let json: serde_json::Value = serde_json::from_slice(&self.body).unwrap();
        assert_eq!(json["status"], self.status.as_u16(), "{json}");
        for field in ["type", "title", "detail"] {
            assert!(
                json[field].as_str().is_some_and(|s| !s.is_empty()),
                "problem without {field}: {json}"
            );
        }
        json
    }
}

pub async fn serve(router: Router, runs: Counter) -> TestServer {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, router).await.unwrap() });
    let client = Client::builder(TokioExecutor::new()).build_http();
    TestServer { addr, runs, client }
}

pub async fn server(layer: IdempotencyServiceLayer) -> TestServer {
    let runs = Counter::default();
    serve(app(runs.clone()).layer(layer), runs).await
}

/// Two servers, each behind its own layer (their own in-process coalescing, as two processes
/// have), counting their handler runs together.
pub async fn two_servers(
    a: IdempotencyServiceLayer,
    b: IdempotencyServiceLayer,
) -> [Arc<TestServer>; 2] {
    let runs = Counter::default();
    [
        Arc::new(serve(app(runs.clone()).layer(a), runs.clone()).await),
        Arc::new(serve(app(runs.clone()).layer(b), runs).await),
    ]
}

impl TestServer {
    pub async fn send(
        &self,
        method: Method,
        path: &str,
        keys: &[&[u8]],
        headers: &[(&str, &str)],
        body: &str,
    ) -> Answer {
        let mut req = Request::builder()
            .method(method)
            .uri(format!("http://{}{path}", self.addr));
        for key in keys {
            req = req.header(
                "idempotency-key",
                axum::http::HeaderValue::from_bytes(key).unwrap(),
            );
        }
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let response = self
            .client
            .request(req.body(Full::new(Bytes::from(body.to_owned()))).unwrap())
            .await
            .unwrap();
        let (parts, body) = response.into_parts();
        Answer {
            status: parts.status,
            headers: parts.headers,
            body: body.collect().await.unwrap().to_bytes(),
        }
    }

    /// `POST /orders` with body `tea`, the key `key` and one more header.
    pub async fn post_with(&self, key: &str, header: (&str, &str)) -> Answer {
        self.send(Method::POST, "/orders", &[key.as_bytes()], &[header], "tea")
            .await
    }

    /// Sends a keyed POST from a task of its own, to overlap with other requests.
    pub fn spawn_post(
        self: &Arc<Self>,
        path: &str,
        key: &str,
        body: &str,
    ) -> tokio::task::JoinHandle<Answer> {
        let (server, path, key, body) = (
            self.clone(),
            path.to_owned(),
            key.to_owned(),
            body.to_owned(),
        );
        tokio::spawn(async move { server.post(&path, &key, &body).await })
    }

    pub async fn post(&self, path: &str, key: &str, body: &str) -> Answer {
        self.send(Method::POST, path, &[key.as_bytes()], &[], body)
            .await
    }
}

/// Fires `count` copies of one request at `servers` in turn, each after a random delay of up to
/// `max_delay_ms`, and returns every answer.
pub async fn storm(
    servers: &[Arc<TestServer>],
    count: usize,
    path: &str,
    key: &str,
    max_delay_ms: u64,
) -> Vec<Answer> {
    let tasks: Vec<_> = (0..count)
        .map(|i| {
            let server = servers[i % servers.len()].clone();
            let (path, key) = (path.to_owned(), key.to_owned());
            let delay = rand::rng().random_range(0..=max_delay_ms);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                server.post(&path, &key, "tea").await
            })
        })
        .collect();
    let mut answers = Vec::with_capacity(count);
    for task in tasks {
        answers.push(task.await.unwrap());
    }
    answers
}

/// Asserts that every answer is a 201 with one and the same body.
pub fn assert_one_answer(answers: &[Answer]) {
    for answer in answers {
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
        assert_eq!(
            answer.body, answers[0].body,
            "every duplicate gets the first answer"
        );
    }
}

/// `keys` distinct keys, each sent `copies` times at once across `servers`: every copy of a
/// key gets the same 201.
pub async fn many_keys(servers: &[Arc<TestServer>], keys: usize, copies: usize) {
    let run = rand::rng().random::<u64>();
    let tasks: Vec<_> = (0..keys)
        .flat_map(|k| (0..copies).map(move |c| (k, c)))
        .map(|(k, c)| {
            let server = servers[(k + c) % servers.len()].clone();
            let delay = rand::rng().random_range(0..20);
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(delay)).await;
                (
                    k,
                    server
                        .post("/orders", &format!("key-{run}-{k}"), &k.to_string())
                        .await,
                )
            })
        })
        .collect();
    let mut bodies: HashMap<usize, Bytes> = HashMap::new();
    for task in tasks {
        let (k, answer) = task.await.unwrap();
        assert_eq!(answer.status, StatusCode::CREATED, "{}", answer.text());
        assert!(answer.text().ends_with(&format!("body={k}")));
        let first = bodies.entry(k).or_insert_with(|| answer.body.clone());
        assert_eq!(
            *first, answer.body,
            "every copy of key {k} gets the same answer"
        );
    }
}
