//! An order service behind `IdempotencyService`, to try with curl.
//!
//! ```text
//! cargo run --release --example server -- [--addr 127.0.0.1:3000] [--store memory]
//!     [--on-conflict wait|reject] [--ttl-secs N] [--wait-timeout-ms N] [--lease-ms N] [--max-entries N]
//!     [--scope-header NAME] [--require-key] [--bare]
//! ```
//!
//! - `POST /orders[?delay_ms=N][&status=CODE]` sleeps N ms, counts an execution and answers CODE
//!   (default 201) with `{"id": .., "executions": .., "request": ..}` and a `Location` header.
//! - `PATCH /orders/ID` does the same and answers 200.
//! - `GET /stats` answers `{"executions": N}`.
//!
//! `--max-entries N` bounds the memory store (default a million records).
//! `--store` takes `memory` (the default), or with the `redis` feature `redis://HOST:PORT` and
//! `redis+cluster://HOST:PORT[,HOST:PORT...]` (a password as `redis://:PASSWORD@HOST:PORT`; a
//! cluster's first node's serves the others). `--bare` serves the same handlers without the
//! idempotency layer, as a baseline for benchmarks, and takes no other flag but `--addr`.
//! Ctrl-C or SIGTERM stops it: it takes no more requests, and waits (30 s at most) for the
//! orders whose clients left to finish.
//!
//! ```text
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: order-1' -d '{"sku":"tea"}'
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: order-1' -d '{"sku":"tea"}'   # replayed
//! curl -i -X POST localhost:3000/orders -H 'Idempotency-Key: order-1' -d '{"sku":"milk"}'  # 422
//! ```

use std::{
    collections::HashMap,
    io::IsTerminal,
    process::ExitCode,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use axum::{
    Json, Router, ServiceExt,
    body::{Body, Bytes},
    extract::{Path, Query, Request, State},
    http::{HeaderName, StatusCode, header},
    response::{IntoResponse, Response},
    routing::{get, patch, post},
};
use serde_json::{Value, json};
use tower::ServiceBuilder;
use tower_idempotency::{
    IdempotencyServiceLayer,
    server::{OnConflict, ResponseBody},
    store::{KeyStore, MemoryStore},
};

const USAGE: &str = "usage: server [--addr 127.0.0.1:3000] [--store memory|redis://HOST:PORT|redis+cluster://HOST:PORT[,HOST:PORT...]]
              [--on-conflict wait|reject] [--ttl-secs N] [--wait-timeout-ms N] [--lease-ms N] [--max-entries N]
              [--scope-header NAME] [--require-key] [--bare]

  POST /orders[?delay_ms=N][&status=CODE]   sleeps N ms, runs once per key, answers CODE (201)
  PATCH /orders/ID                          the same, answering 200
  GET /stats                                how many times the handlers ran

  A Redis password goes in the URL: redis://:PASSWORD@HOST:PORT (a cluster's first node's
  serves the others). --bare serves the handlers without idempotency, with no other flag.";

#[derive(Debug)]
struct Options {
    addr: String,
    store: String,
    on_conflict: OnConflict,
    ttl: Option<Duration>,
    wait_timeout: Option<Duration>,
    lease: Option<Duration>,
    max_entries: Option<usize>,
    scope_header: Option<HeaderName>,
    require_key: bool,
    bare: bool,
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<Options, String> {
    let mut opts = Options {
        addr: "127.0.0.1:3000".into(),
        store: "memory".into(),
        on_conflict: OnConflict::Wait,
        ttl: None,
        wait_timeout: None,
        lease: None,
        max_entries: None,
        scope_header: None,
        require_key: false,
        bare: false,
    };
    // The flags that set the idempotency layer, which --bare leaves out.
    let mut layer_flags = Vec::new();
    while let Some(arg) = args.next() {
        if !["--addr", "--bare", "-h", "--help"].contains(&arg.as_str()) {
            layer_flags.push(arg.clone());
        }
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        let number = |v: String| {
            v.parse::<u64>()
                .map_err(|_| format!("{arg} takes a whole number, not {v:?}"))
        };
        let positive = |v: String| match number(v)? {
            0 => Err(format!("{arg} takes a number above 0")),
            n => Ok(n),
        };
        match arg.as_str() {
            "--addr" => opts.addr = value()?,
            "--store" => opts.store = value()?,
            "--on-conflict" => {
                opts.on_conflict = match value()?.as_str() {
                    "wait" => OnConflict::Wait,
                    "reject" => OnConflict::Reject,
                    other => {
                        return Err(format!("--on-conflict takes wait or reject, not {other:?}"));
                    }
                }
            }
            "--ttl-secs" => opts.ttl = Some(Duration::from_secs(positive(value()?)?)),
            "--wait-timeout-ms" => {
                opts.wait_timeout = Some(Duration::from_millis(number(value()?)?))
            }
            "--lease-ms" => opts.lease = Some(Duration::from_millis(positive(value()?)?)),
            "--max-entries" => opts.max_entries = Some(positive(value()?)? as usize),
            "--scope-header" => {
                let name = value()?;
                opts.scope_header = Some(
                    HeaderName::try_from(name.as_str())
                        .map_err(|_| format!("{name:?} is not a header name"))?,
                );
            }
            "--require-key" => opts.require_key = true,
            "--bare" => opts.bare = true,
            "-h" | "--help" => return Err(String::new()),
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    if opts.bare && !layer_flags.is_empty() {
        return Err(format!(
            "{} set the idempotency layer, which --bare leaves out",
            layer_flags.join(", ")
        ));
    }
    if opts.max_entries.is_some() && opts.store != "memory" {
        return Err("--max-entries bounds the memory store; bound Redis with its maxmemory".into());
    }
    Ok(opts)
}

/// `url` with the passwords in it, if any, left out: it is printed. Everything before the last
/// `@` is taken for credentials (of each node, in a cluster's list), whatever else the URL holds:
/// a password may hold a `/` or a `,`, and a URL given by mistake may be malformed. Only a user
/// name before a `:` is kept.
fn redacted(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").map_or(("", url), |(s, r)| (s, r));
    let nodes: Vec<&str> = match scheme {
        "redis+cluster" => rest.split(',').collect(),
        _ => vec![rest],
    };
    let nodes: Vec<String> = nodes
        .into_iter()
        .map(|node| match node.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => format!("***@{host}"),
            },
            None => node.to_owned(),
        })
        .collect();
    let nodes = nodes.join(",");
    if scheme.is_empty() {
        nodes
    } else {
        format!("{scheme}://{nodes}")
    }
}

/// What to check when a Redis store cannot be reached.
#[cfg(feature = "redis")]
const REDIS_HINT: &str = "is Redis (7 or later, or Valkey) listening there? A password goes in \
                          the URL: redis://:PASSWORD@HOST:PORT";

async fn open_store(url: &str, max_entries: Option<usize>) -> Result<Arc<dyn KeyStore>, String> {
    match url {
        "memory" => Ok(Arc::new(MemoryStore::with_limits(
            max_entries.unwrap_or(MemoryStore::DEFAULT_MAX_ENTRIES),
            MemoryStore::DEFAULT_MAX_BYTES,
        ))),
        #[cfg(feature = "redis")]
        url if url.starts_with("redis+cluster://") => {
            let mut nodes: Vec<&str> = url["redis+cluster://".len()..].split(',').collect();
            // The first node's credentials serve the others that give none.
            let credentials = nodes[0].rsplit_once('@').map(|(userinfo, _)| userinfo);
            let nodes = nodes.drain(..).map(|node| match credentials {
                Some(userinfo) if !node.contains('@') => format!("redis://{userinfo}@{node}"),
                _ => format!("redis://{node}"),
            });
            let store = tower_idempotency::store::RedisStore::connect_cluster(nodes)
                .await
                .map_err(|e| {
                    format!(
                        "cannot connect to the cluster {}: {e}\n{REDIS_HINT}",
                        redacted(url)
                    )
                })?;
            Ok(Arc::new(store))
        }
        #[cfg(feature = "redis")]
        url if url.starts_with("redis://") || url.starts_with("rediss://") => {
            let store = tower_idempotency::store::RedisStore::connect(url)
                .await
                .map_err(|e| format!("cannot connect to {}: {e}\n{REDIS_HINT}", redacted(url)))?;
            Ok(Arc::new(store))
        }
        #[cfg(not(feature = "redis"))]
        url if url.starts_with("redis") => Err(format!(
            "{}: this build has no Redis store; run with --features redis",
            redacted(url)
        )),
        other => Err(format!(
            "unknown store {:?}: use memory, redis://HOST:PORT or redis+cluster://HOST:PORT,...",
            redacted(other)
        )),
    }
}

/// The idempotency layer over `store`, as the options set it.
fn layer(store: Arc<dyn KeyStore>, opts: &Options) -> IdempotencyServiceLayer {
    let mut layer = IdempotencyServiceLayer::with_shared_store(store)
        .on_conflict(opts.on_conflict)
        .require_key(opts.require_key);
    if let Some(ttl) = opts.ttl {
        layer = layer.retention(ttl);
    }
    if let Some(timeout) = opts.wait_timeout {
        layer = layer.wait_timeout(timeout);
    }
    if let Some(lease) = opts.lease {
        layer = layer.lease(lease);
    }
    if let Some(name) = opts.scope_header.clone() {
        layer = layer.scope_by_header(name);
    }
    layer
}

#[derive(Clone, Default)]
struct AppState {
    executions: Arc<AtomicU64>,
}

/// The order handlers, without idempotency.
fn app(state: AppState) -> Router {
    Router::new()
        .route("/orders", post(create_order))
        .route("/orders/{id}", patch(update_order))
        .route("/stats", get(stats))
        .with_state(state)
}

async fn create_order(
    State(state): State<AppState>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let status = match query.get("status").map(|s| {
        s.parse::<u16>()
            .ok()
            .and_then(|c| StatusCode::from_u16(c).ok())
    }) {
        None => StatusCode::CREATED,
        Some(Some(status)) => status,
        Some(None) => {
            return (
                StatusCode::BAD_REQUEST,
                "status must be an HTTP status code\n",
            )
                .into_response();
        }
    };
    execute(
        &state,
        &query,
        status,
        uuid::Uuid::new_v4().to_string(),
        &body,
    )
    .await
}

async fn update_order(
    State(state): State<AppState>,
    Path(id): Path<String>,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    execute(&state, &query, StatusCode::OK, id, &body).await
}

async fn execute(
    state: &AppState,
    query: &HashMap<String, String>,
    status: StatusCode,
    id: String,
    body: &[u8],
) -> Response {
    if let Some(delay) = query.get("delay_ms") {
        let Ok(ms) = delay.parse::<u64>() else {
            return (StatusCode::BAD_REQUEST, "delay_ms must be a whole number\n").into_response();
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
    }
    let executions = state.executions.fetch_add(1, Ordering::SeqCst) + 1;
    let request = serde_json::from_slice::<Value>(body)
        .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(body).into()));
    let location = format!("/orders/{id}");
    (
        status,
        [(header::LOCATION, location)],
        Json(json!({ "id": id, "executions": executions, "request": request })),
    )
        .into_response()
}

async fn stats(State(state): State<AppState>) -> Json<Value> {
    Json(json!({ "executions": state.executions.load(Ordering::SeqCst) }))
}

#[tokio::main]
async fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "warn".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let opts = match parse_args(std::env::args().skip(1)) {
        Ok(opts) => opts,
        // `--help`: the usage alone, and success.
        Err(err) if err.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(err) => {
            eprintln!("error: {err}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    // The bare server has no store to open.
    let layer = match opts.bare {
        true => None,
        false => match open_store(&opts.store, opts.max_entries).await {
            Ok(store) => Some(layer(store, &opts)),
            Err(err) => {
                eprintln!("error: {err}");
                return ExitCode::FAILURE;
            }
        },
    };
    let app = app(AppState::default());

    let listener = match tokio::net::TcpListener::bind(&opts.addr).await {
        Ok(listener) => listener,
        Err(err) => {
            eprintln!("error: cannot listen on {}: {err}", opts.addr);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener
        .local_addr()
        .expect("a bound listener has an address");
    let served = match layer {
        None => {
            println!("listening on {addr} (bare: no idempotency)");
            axum::serve(listener, app)
                .with_graceful_shutdown(stop_asked())
                .await
        }
        Some(layer) => {
            let in_process = match opts.store.as_str() {
                "memory" => ", in this process: its records are gone when it stops",
                _ => "",
            };
            println!(
                "listening on {addr} (store: {}{in_process})",
                redacted(&opts.store)
            );
            // The layer wraps the whole router rather than each route (`Router::layer`): a
            // replay is answered before routing, and no request pays for a clone and a box of
            // the layer per route. axum serves its own response type, so the body is mapped
            // back to it.
            let background = layer.background();
            let service = ServiceBuilder::new()
                .map_response(|response: Response<ResponseBody<Body>>| {
                    response.map(|body| body.into_inner().unwrap_or_else(Body::new))
                })
                .layer(layer)
                .service(app);
            let served = axum::serve(listener, ServiceExt::<Request>::into_make_service(service))
                .with_graceful_shutdown(stop_asked())
                .await;
            // Orders whose clients left go on until they are done, and are stored for the
            // retry: wait for them before the process exits.
            if !background.is_empty() {
                eprintln!("finishing {} runs whose clients left", background.len());
            }
            if tokio::time::timeout(Duration::from_secs(30), background.wait())
                .await
                .is_err()
            {
                eprintln!(
                    "error: {} runs did not finish within 30 s",
                    background.len()
                );
            }
            served
        }
    };
    if let Err(err) = served {
        eprintln!("error: {err}");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

/// Ends when the process is asked to stop: Ctrl-C, or SIGTERM.
async fn stop_asked() {
    let terminate = async {
        #[cfg(unix)]
        {
            use tokio::signal::unix::{SignalKind, signal};
            if let Ok(mut terminate) = signal(SignalKind::terminate()) {
                terminate.recv().await;
                return;
            }
        }
        std::future::pending::<()>().await
    };
    tokio::select! {
        Ok(()) = tokio::signal::ctrl_c() => {}
        () = terminate => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_password_is_printed_however_the_url_is_written() {
        for url in [
            "redis://:s3cret@127.0.0.1:6379",
            "redis://default:s3cret@127.0.0.1:6379/0",
            "redis://:s3cret/with@signs@127.0.0.1:6379",
            "redis://:s3cret,with,commas@127.0.0.1:6379",
            "redis:/:s3cret@127.0.0.1:6379",
            "redis+cluster://:s3cret@127.0.0.1:1,:s3cret@127.0.0.1:2",
            "s3cret@127.0.0.1",
        ] {
            let shown = redacted(url);
            assert!(!shown.contains("s3cret"), "{url} shown as {shown}");
            assert!(shown.contains("127.0.0.1"), "{url} shown as {shown}");
        }
        assert_eq!(
            redacted("redis://default:s3cret@h:1/0"),
            "redis://default:***@h:1/0"
        );
        assert_eq!(redacted("redis://h:1"), "redis://h:1");
    }

    #[test]
    fn flags_that_would_be_ignored_are_refused() {
        let parse = |args: &[&str]| parse_args(args.iter().map(|a| (*a).to_owned()));
        assert!(parse(&["--bare", "--addr", "127.0.0.1:0"]).is_ok());
        let err = parse(&["--bare", "--require-key"]).err().unwrap();
        assert!(err.contains("--require-key"), "{err}");
        let err = parse(&["--store", "redis://h:1", "--max-entries", "5"])
            .err()
            .unwrap();
        assert!(err.contains("maxmemory"), "{err}");
        assert!(parse(&["--max-entries", "0"]).is_err());
    }
}
