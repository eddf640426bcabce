//! The client stack end to end, over real sockets: a hyper-util client behind
//! `IdempotentClientLayer`, a faulty front that answers 503/502/504 or drops a response after
//! the handler ran, and an axum app that counts how many times its handler ran per key.
//! The app runs behind the crate's own server, `IdempotencyService` on `MemoryStore`.

use std::{
    collections::{BTreeMap, VecDeque},
    convert::Infallible,
    io,
    net::SocketAddr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use axum::{
    Router,
    body::Body,
    extract::State,
    http::{HeaderMap, HeaderValue, Method, Request, Response, StatusCode},
    response::IntoResponse,
    routing::get,
};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{body::Incoming, server::conn::http1, service::service_fn};
use hyper_util::{
    client::legacy::{Client, connect::HttpConnector},
    rt::{TokioExecutor, TokioIo},
};
use tokio::net::TcpListener;
use tower::{Service, ServiceExt};
use tower_idempotency::{
    IdempotencyKey, IdempotencyServiceLayer,
    client::{IdempotencyLayer, IdempotentClient, IdempotentClientLayer, RetryPolicy},
    store::MemoryStore,
};
use tower_layer::Layer;

const PATH: &str = "/api/v1/deployments";

// ---- the app ----------------------------------------------------------------------------

/// What the app did: handler runs per key (`-` for none).
#[derive(Clone, Default)]
struct Ledger(Arc<Mutex<BTreeMap<String, usize>>>);

impl Ledger {
    fn runs(&self) -> BTreeMap<String, usize> {
        self.0.lock().unwrap().clone()
    }

    fn total(&self) -> usize {
        self.runs().values().sum()
    }
}

fn key_of(headers: &HeaderMap) -> String {
    headers
        .get("idempotency-key")
        .map_or("-", |v| v.to_str().unwrap())
        .to_owned()
}

/// `POST /api/v1/deployments`: creates a deployment, numbered by how many the app created.
async fn create_deployment(
    State(ledger): State<Ledger>,
    headers: HeaderMap,
    body: Bytes,
) -> Response<Body> {
    let created = {
        let mut runs = ledger.0.lock().unwrap();
        *runs.entry(key_of(&headers)).or_default() += 1;
        runs.values().sum::<usize>()
    };
    let body = format!(
        "deployment={created} request={}",
        String::from_utf8_lossy(&body)
    );
    (StatusCode::CREATED, body).into_response()
}

/// `GET /api/v1/deployments`: lists them; not counted.
async fn list_deployments() -> &'static str {
    "[]"
}

fn app(ledger: Ledger) -> Router {
    Router::new()
        .route(PATH, get(list_deployments).post(create_deployment))
        .with_state(ledger)
        .layer(IdempotencyServiceLayer::new(MemoryStore::new()))
}

// ---- the faulty front ----------------------------------------------------------------------

/// What the front does with one attempt, in turn; once the script is spent, it passes.
#[derive(Clone, Debug)]
enum Fault {
    /// Answers this status itself; the app never sees the request.
    Status(u16),
    /// Answers 503 with this `Retry-After`.
    RetryAfter(&'static str),
    /// Passes the request to the app, which runs it, then closes the connection without
    /// sending the response.
    DropResponse,
    /// Passes the request to the app, then holds the response back this long.
    Delay(Duration),
}

/// One attempt the front received.
#[derive(Clone, Debug)]
struct Attempt {
    method: Method,
    key: Option<String>,
    at: Instant,
}

struct Server {
    addr: SocketAddr,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    ledger: Ledger,
}

impl Server {
    async fn start(script: Vec<Fault>) -> Self {
        let ledger = Ledger::default();
        let app = app(ledger.clone());
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let script = Arc::new(Mutex::new(VecDeque::from(script)));
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let front = {
            let attempts = attempts.clone();
            move |req: Request<Incoming>| {
                let (app, script, attempts) = (app.clone(), script.clone(), attempts.clone());
                async move { front(app, script, attempts, req).await }
            }
        };
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                let front = front.clone();
                tokio::spawn(async move {
                    // A dropped response ends the connection with an error, as intended.
                    let _ = http1::Builder::new()
                        .serve_connection(TokioIo::new(stream), service_fn(front))
                        .await;
                });
            }
        });
        Self {
            addr,
            attempts,
            ledger,
        }
    }

    fn url(&self) -> String {
        format!("http://{}{PATH}", self.addr)
    }

    fn attempts(&self) -> Vec<Attempt> {
        self.attempts.lock().unwrap().clone()
    }

    fn keys(&self) -> Vec<Option<String>> {
        self.attempts().into_iter().map(|a| a.key).collect()
    }
}

async fn front(
    app: Router,
    script: Arc<Mutex<VecDeque<Fault>>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
    req: Request<Incoming>,
) -> Result<Response<Body>, io::Error> {
    attempts.lock().unwrap().push(Attempt {
        method: req.method().clone(),
        key: req
            .headers()
            .get("idempotency-key")
            .map(|v| v.to_str().unwrap().to_owned()),
        at: Instant::now(),
    });
    let fault = script.lock().unwrap().pop_front();
    let pass = |req: Request<Incoming>| app.oneshot(req.map(Body::new));
    match fault {
        Some(Fault::Status(code)) => Ok(Response::builder()
            .status(code)
            .body(Body::from(format!("fault {code}")))
            .unwrap()),
        Some(Fault::RetryAfter(after)) => Ok(Response::builder()
            .status(StatusCode::SERVICE_UNAVAILABLE)
            .header("retry-after", after)
            .body(Body::empty())
            .unwrap()),
        Some(Fault::DropResponse) => {
            let res = pass(req).await.unwrap();
            // Let the app finish the response, then lose it.
            res.into_body().collect().await.unwrap();
            Err(io::Error::other("the front dropped the response"))
        }
        Some(Fault::Delay(delay)) => {
            let res = pass(req).await.unwrap();
            tokio::time::sleep(delay).await;
            Ok(res)
        }
        None => Ok(pass(req).await.unwrap_or_else(|e: Infallible| match e {})),
    }
}

// ---- the client ----------------------------------------------------------------------------

type Hyper = Client<HttpConnector, Full<Bytes>>;

fn client(
    keys: IdempotencyLayer,
    policy: RetryPolicy,
    attempt_timeout: Duration,
) -> IdempotentClient<Hyper> {
    let hyper = Client::builder(TokioExecutor::new()).build_http();
    IdempotentClientLayer::new()
        .keys(keys)
        .retry(policy)
        .attempt_timeout(attempt_timeout)
        .layer(hyper)
}

/// Short backoffs, 6 attempts.
fn policy() -> RetryPolicy {
    RetryPolicy::new()
        .max_attempts(6)
        .backoff(Duration::from_millis(10), Duration::from_millis(100))
}

fn default_client() -> IdempotentClient<Hyper> {
    client(IdempotencyLayer::new(), policy(), Duration::from_secs(5))
}

fn post(url: &str, key: Option<IdempotencyKey>) -> Request<Full<Bytes>> {
    let mut req = Request::post(url)
        .header("content-type", "application/json")
        .body(Full::new(Bytes::from_static(
            b"{\"name\":\"my-deployment\"}",
        )))
        .unwrap();
    if let Some(key) = key {
        req.extensions_mut().insert(key);
    }
    req
}

struct Answer {
    status: StatusCode,
    headers: HeaderMap,
    key: Option<IdempotencyKey>,
    body: String,
}

async fn send(
    client: &mut IdempotentClient<Hyper>,
    req: Request<Full<Bytes>>,
) -> Result<Answer, tower::BoxError> {
    let res = client.ready().await?.call(req).await?;
    let (parts, body) = res.into_parts();
    Ok(Answer {
        status: parts.status,
        key: parts.extensions.get::<IdempotencyKey>().cloned(),
        headers: parts.headers,
        body: String::from_utf8(body.collect().await?.to_bytes().to_vec())?,
    })
}

fn key(s: &str) -> Option<IdempotencyKey> {
    Some(IdempotencyKey::new(s).unwrap())
}

fn is_uuid_v4(s: &str) -> bool {
    uuid::Uuid::parse_str(s).is_ok_and(|u| u.get_version_num() == 4) && s.len() == 36
}

// ---- capturing the debug log ------------------------------------------------------------------

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<u8>>>);

impl io::Write for Log {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.0.lock().unwrap().extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Log {
    /// Captures the client's debug events on this thread until the guard drops.
    fn capture() -> (Self, tracing::subscriber::DefaultGuard) {
        let log = Log::default();
        let writer = log.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_env_filter("tower_idempotency::client=debug")
            .with_writer(move || writer.clone())
            .with_ansi(false)
            .without_time()
            .finish();
        (log, tracing::subscriber::set_default(subscriber))
    }

    fn text(&self) -> String {
        String::from_utf8(self.0.lock().unwrap().clone()).unwrap()
    }

    fn attempt_lines(&self) -> Vec<String> {
        self.text()
            .lines()
            .filter(|l| l.contains("Request: "))
            .map(str::to_owned)
            .collect()
    }
}

// ---- the tests -----------------------------------------------------------------------------

#[tokio::test]
async fn keyed_post_survives_a_dropped_response_and_503_502_504_and_runs_once() {
    let server = Server::start(vec![
        Fault::DropResponse,
        Fault::Status(503),
        Fault::Status(502),
        Fault::Status(504),
    ])
    .await;
    let (log, _guard) = Log::capture();
    let answer = send(&mut default_client(), post(&server.url(), key("deploy-v1")))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    // The stored response of the one run, replayed.
    assert_eq!(
        answer.body,
        "deployment=1 request={\"name\":\"my-deployment\"}"
    );
    assert_eq!(answer.headers["idempotent-replayed"], "true");
    assert_eq!(server.keys(), vec![Some("deploy-v1".to_owned()); 5]);
    assert_eq!(
        server.ledger.runs(),
        BTreeMap::from([("deploy-v1".to_owned(), 1)])
    );
    assert_eq!(log.attempt_lines().len(), 5, "{}", log.text());
}

#[tokio::test]
async fn auto_keys_are_uuid_v4_and_the_same_on_every_attempt() {
    let generated = client(
        IdempotencyLayer::new().generate_keys(),
        policy(),
        Duration::from_secs(5),
    );
    for (mut client, key) in [
        (default_client(), Some(IdempotencyKey::auto())),
        (generated, None),
    ] {
        let server = Server::start(vec![
            Fault::Status(503),
            Fault::DropResponse,
            Fault::Status(504),
        ])
        .await;
        let answer = send(&mut client, post(&server.url(), key.clone()))
            .await
            .unwrap();

        assert_eq!(answer.status, StatusCode::CREATED);
        let sent = answer
            .key
            .expect("the key sent, in the response's extensions");
        assert!(is_uuid_v4(sent.as_str()), "{sent}");
        if let Some(key) = key {
            assert_eq!(sent, key);
        }
        assert_eq!(server.keys(), vec![Some(sent.to_string()); 4]);
        assert_eq!(
            server.ledger.runs(),
            BTreeMap::from([(sent.to_string(), 1)])
        );
        assert_eq!(
            answer.body,
            "deployment=1 request={\"name\":\"my-deployment\"}"
        );
    }
}

#[tokio::test]
async fn unkeyed_post_is_not_retried_after_a_dropped_response() {
    let server = Server::start(vec![Fault::DropResponse]).await;
    let err = send(&mut default_client(), post(&server.url(), None))
        .await
        .err()
        .expect("an error");

    assert!(err.is::<hyper_util::client::legacy::Error>(), "{err:?}");
    assert_eq!(server.keys(), vec![None]);
    assert_eq!(server.ledger.runs(), BTreeMap::from([("-".to_owned(), 1)]));
}

#[tokio::test]
async fn keyed_post_is_retried_after_a_dropped_response() {
    let server = Server::start(vec![Fault::DropResponse]).await;
    let answer = send(&mut default_client(), post(&server.url(), key("deploy-v1")))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(server.keys(), vec![Some("deploy-v1".to_owned()); 2]);
    assert_eq!(
        server.ledger.runs(),
        BTreeMap::from([("deploy-v1".to_owned(), 1)])
    );
}

#[tokio::test]
async fn keyed_post_to_a_closed_port_is_tried_max_attempts_times() {
    // Bind, then close: nothing listens there any more.
    let addr = TcpListener::bind("127.0.0.1:0")
        .await
        .unwrap()
        .local_addr()
        .unwrap();
    let (log, _guard) = Log::capture();
    let mut client = client(
        IdempotencyLayer::new(),
        policy().max_attempts(3),
        Duration::from_secs(5),
    );
    let err = send(
        &mut client,
        post(&format!("http://{addr}{PATH}"), key("deploy-v1")),
    )
    .await
    .err()
    .expect("an error");

    let err = err.downcast::<hyper_util::client::legacy::Error>().unwrap();
    assert!(err.is_connect(), "{err:?}");
    let lines = log.attempt_lines();
    assert_eq!(lines.len(), 3, "{}", log.text());
    assert!(
        lines[2].ends_with("idempotency_key=deploy-v1 attempt=3"),
        "{}",
        lines[2]
    );
}

#[tokio::test]
async fn retry_after_is_honoured() {
    let server = Server::start(vec![Fault::RetryAfter("1")]).await;
    let answer = send(&mut default_client(), post(&server.url(), key("deploy-v1")))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    let attempts = server.attempts();
    assert_eq!(attempts.len(), 2);
    let waited = attempts[1].at - attempts[0].at;
    assert!(waited >= Duration::from_secs(1), "retried after {waited:?}");
    assert_eq!(server.ledger.total(), 1);
}

#[tokio::test]
async fn attempts_are_bounded() {
    let server = Server::start(vec![Fault::Status(503); 10]).await;
    let mut client = client(
        IdempotencyLayer::new(),
        policy().max_attempts(3),
        Duration::from_secs(5),
    );
    let answer = send(&mut client, post(&server.url(), key("deploy-v1")))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(answer.body, "fault 503");
    assert_eq!(server.attempts().len(), 3);
    assert_eq!(server.ledger.total(), 0);
}

#[tokio::test]
async fn timed_out_attempt_is_retried() {
    let server = Server::start(vec![Fault::Delay(Duration::from_secs(3))]).await;
    let mut client = client(IdempotencyLayer::new(), policy(), Duration::from_secs(1));
    let answer = send(&mut client, post(&server.url(), key("deploy-v1")))
        .await
        .unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    assert_eq!(answer.headers["idempotent-replayed"], "true");
    assert_eq!(server.keys(), vec![Some("deploy-v1".to_owned()); 2]);
    assert_eq!(
        server.ledger.runs(),
        BTreeMap::from([("deploy-v1".to_owned(), 1)])
    );
}

#[tokio::test]
async fn get_is_never_given_a_key() {
    let server = Server::start(vec![Fault::Status(503)]).await;
    let mut client = client(
        IdempotencyLayer::new().generate_keys(),
        policy(),
        Duration::from_secs(5),
    );
    let get = Request::get(server.url()).body(Full::default()).unwrap();
    let answer = send(&mut client, get).await.unwrap();
    // The same client gives a POST a key.
    let created = send(&mut client, post(&server.url(), None)).await.unwrap();

    assert_eq!(answer.status, StatusCode::OK);
    assert_eq!(answer.body, "[]");
    assert!(answer.key.is_none());
    assert_eq!(created.status, StatusCode::CREATED);
    let attempts = server.attempts();
    let methods: Vec<&Method> = attempts.iter().map(|a| &a.method).collect();
    assert_eq!(methods, [&Method::GET, &Method::GET, &Method::POST]);
    assert_eq!(attempts[0].key, None);
    assert_eq!(attempts[1].key, None);
    assert!(is_uuid_v4(attempts[2].key.as_deref().unwrap()));
}

#[tokio::test]
async fn debug_log_names_the_key_on_every_attempt() {
    let server = Server::start(vec![Fault::Status(502)]).await;
    let (log, _guard) = Log::capture();
    let mut req = post(&server.url(), key("deploy-v1"));
    req.headers_mut()
        .insert("x-request-id", HeaderValue::from_static("abc123"));
    let answer = send(&mut default_client(), req).await.unwrap();

    assert_eq!(answer.status, StatusCode::CREATED);
    let lines = log.attempt_lines();
    assert_eq!(lines.len(), 2, "{}", log.text());
    for (line, attempt) in lines.iter().zip(1..) {
        assert!(line.contains("tower_idempotency::client"), "{line}");
        assert!(
            line.ends_with(&format!(
                "Request: POST /api/v1/deployments request_id=abc123 idempotency_key=deploy-v1 attempt={attempt}"
            )),
            "{line}"
        );
    }
}
