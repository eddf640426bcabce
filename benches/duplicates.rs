//! A storm of concurrent duplicates against a running example server: how long after the first
//! request's start every duplicate was answered, and how many times the handler ran.
//!
//! ```text
//! cargo run --release --example server -- --addr 127.0.0.1:3000 &
//! cargo bench --bench duplicates -- --addr 127.0.0.1:3000 [--requests 1000] [--delay-ms 100] [--spin | --block]
//! ```
//!
//! `scripts/bench duplicates` does both, against the bare server too, on separate cores. All
//! connections are opened first; the clock starts when the first request is written, and every
//! request is written straight onto its socket after that, so that the client's own work per
//! request stays small beside the server's.
//!
//! The answers are read by tasks that sleep until their socket has data (`--block`, the
//! default), or by one thread that polls every socket without ever sleeping (`--spin`). Over
//! loopback the sender's core delivers each answer into the reader's socket and, when the
//! reader sleeps, wakes it: with a sleeping reader the server's core pays for waking it once an
//! answer, which a client on another machine would not cost it.

#![allow(missing_docs)]

use std::{
    process::ExitCode,
    time::{Duration, Instant},
};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::TcpStream,
};

struct Options {
    addr: Option<String>,
    requests: usize,
    delay_ms: u64,
    spin: bool,
}

fn parse_args() -> Result<Options, String> {
    let mut opts = Options {
        addr: None,
        requests: 1000,
        delay_ms: 100,
        spin: false,
    };
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = || args.next().ok_or_else(|| format!("{arg} needs a value"));
        match arg.as_str() {
            "--addr" => opts.addr = Some(value()?),
            "--requests" => opts.requests = value()?.parse().map_err(|e| format!("{e}"))?,
            "--delay-ms" => opts.delay_ms = value()?.parse().map_err(|e| format!("{e}"))?,
            "--spin" => opts.spin = true,
            "--block" => opts.spin = false,
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            other => return Err(format!("unknown argument {other:?}")),
        }
    }
    Ok(opts)
}

type Client = SendRequest<Full<Bytes>>;

async fn open(addr: &str) -> Result<TcpStream, String> {
    let stream = TcpStream::connect(addr)
        .await
        .map_err(|e| format!("connect {addr}: {e}"))?;
    stream.set_nodelay(true).map_err(|e| e.to_string())?;
    Ok(stream)
}

async fn connect(addr: &str) -> Result<Client, String> {
    let stream = open(addr).await?;
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    tokio::spawn(conn);
    Ok(sender)
}

async fn executions(addr: &str) -> Result<u64, String> {
    let mut client = connect(addr).await?;
    let req = Request::get("/stats")
        .header("host", addr)
        .body(Full::default())
        .expect("a valid request");
    let response = client.send_request(req).await.map_err(|e| e.to_string())?;
    let body = response
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    let stats: serde_json::Value = serde_json::from_slice(&body).map_err(|e| e.to_string())?;
    stats["executions"]
        .as_u64()
        .ok_or_else(|| format!("unexpected /stats answer {stats}"))
}

/// What one duplicate saw.
struct Answer {
    status: u16,
    replayed: bool,
    done: Instant,
}

/// Reads one HTTP/1.1 response with a `content-length` from `stream`.
async fn read_answer(stream: &mut TcpStream) -> Result<Answer, String> {
    let mut buf = Vec::with_capacity(1024);
    loop {
        if stream.read_buf(&mut buf).await.map_err(|e| e.to_string())? == 0 {
            return Err("the server closed a connection before answering".into());
        }
        if let Some((status, replayed)) = parse_answer(&buf)? {
            return Ok(Answer {
                status,
                replayed,
                done: Instant::now(),
            });
        }
    }
}

async fn run(opts: &Options, addr: &str) -> Result<(), String> {
    let before = executions(addr).await?;
    let mut streams = Vec::with_capacity(opts.requests);
    // In batches, so that the listener's backlog never overflows.
    for batch in (0..opts.requests).collect::<Vec<_>>().chunks(100) {
        let connecting: Vec<_> = batch
            .iter()
            .map(|_| {
                let addr = addr.to_owned();
                async move { open(&addr).await }
            })
            .collect();
        for stream in futures_join(connecting).await {
            streams.push(stream?);
        }
    }

    let key = format!("storm-{}", uuid::Uuid::new_v4());
    let body = r#"{"sku":"tea","qty":1}"#;
    let request = format!(
        "POST /orders?delay_ms={delay} HTTP/1.1\r\nhost: {addr}\r\ncontent-type: application/json\r\n\
         idempotency-key: {key}\r\ncontent-length: {len}\r\n\r\n{body}",
        delay = opts.delay_ms,
        len = body.len(),
    );
    // Every request is written before any answer is read: a loopback socket takes a request
    // this size at once, so the last is on its way a few milliseconds after the first. The
    // client does as little per request as it can, so that the figure is the server's.
    let start = Instant::now();
    for stream in &mut streams {
        stream
            .write_all(request.as_bytes())
            .await
            .map_err(|e| e.to_string())?;
    }
    let sent = Instant::now();
    let answers = if opts.spin {
        spin_answers(streams)?
    } else {
        let tasks: Vec<_> = streams
            .into_iter()
            .map(|mut stream| tokio::spawn(async move { read_answer(&mut stream).await }))
            .collect();
        let mut answers = Vec::with_capacity(tasks.len());
        for task in tasks {
            answers.push(task.await.map_err(|e| e.to_string())??);
        }
        answers
    };
    let after = executions(addr).await?;

    let last = answers.iter().map(|a| a.done).max().unwrap_or(start);
    let first = answers.iter().map(|a| a.done).min().unwrap_or(start);
    let ok = answers
        .iter()
        .filter(|a| (200..300).contains(&a.status))
        .count();
    let replayed = answers.iter().filter(|a| a.replayed).count();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!(
        "DUPLICATES requests={} delay_ms={} all_answered_ms={:.1} first_answered_ms={:.1} all_sent_ms={:.1} ok={} replayed={} handler_runs={}",
        opts.requests,
        opts.delay_ms,
        ms(last - start),
        ms(first - start),
        ms(sent - start),
        ok,
        replayed,
        after - before,
    );
    Ok(())
}

/// What an answer read so far tells.
fn parse_answer(buf: &[u8]) -> Result<Option<(u16, bool)>, String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut response = httparse::Response::new(&mut headers);
    let httparse::Status::Complete(head) = response.parse(buf).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let header = |name: &str| {
        response
            .headers
            .iter()
            .find(|h| h.name.eq_ignore_ascii_case(name))
    };
    let length: usize = header("content-length")
        .and_then(|h| std::str::from_utf8(h.value).ok()?.parse().ok())
        .ok_or("a response without a content-length")?;
    if buf.len() < head + length {
        return Ok(None);
    }
    Ok(Some((
        response.code.unwrap_or_default(),
        header("idempotent-replayed").is_some(),
    )))
}

/// Reads every answer on this thread, polling the sockets without ever sleeping, so that the
/// server's sends never have to wake a reader.
fn spin_answers(streams: Vec<TcpStream>) -> Result<Vec<Answer>, String> {
    use std::io::Read;
    let mut poll = mio::Poll::new().map_err(|e| e.to_string())?;
    let mut socks = Vec::with_capacity(streams.len());
    for (i, stream) in streams.into_iter().enumerate() {
        let std = stream.into_std().map_err(|e| e.to_string())?;
        let mut sock = mio::net::TcpStream::from_std(std);
        poll.registry()
            .register(&mut sock, mio::Token(i), mio::Interest::READABLE)
            .map_err(|e| e.to_string())?;
        socks.push((sock, Vec::with_capacity(1024), None::<Answer>));
    }
    let mut left = socks.len();
    let mut events = mio::Events::with_capacity(1024);
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut chunk = [0u8; 4096];
    while left > 0 {
        if Instant::now() > deadline {
            return Err(format!("{left} answers still missing after 30 s"));
        }
        poll.poll(&mut events, Some(Duration::ZERO))
            .map_err(|e| e.to_string())?;
        for event in &events {
            let (sock, buf, answer) = &mut socks[event.token().0];
            if answer.is_some() {
                continue;
            }
            let mut closed = false;
            loop {
                match sock.read(&mut chunk) {
                    Ok(0) => {
                        closed = true;
                        break;
                    }
                    Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.to_string()),
                }
            }
            let parsed = parse_answer(buf)?;
            if parsed.is_none() && closed {
                return Err("the server closed a connection before answering".into());
            }
            if let Some((status, replayed)) = parsed {
                *answer = Some(Answer {
                    status,
                    replayed,
                    done: Instant::now(),
                });
                left -= 1;
            }
        }
    }
    Ok(socks.into_iter().filter_map(|(_, _, a)| a).collect())
}

/// Awaits every future, concurrently, in order.
async fn futures_join<F>(futures: Vec<F>) -> Vec<F::Output>
where
    F: Future + Send + 'static,
    F::Output: Send + 'static,
{
    let handles: Vec<_> = futures.into_iter().map(tokio::spawn).collect();
    let mut out = Vec::with_capacity(handles.len());
    for handle in handles {
        out.push(handle.await.expect("no panic"));
    }
    out
}

fn main() -> ExitCode {
    let opts = match parse_args() {
        Ok(opts) => opts,
        Err(err) => {
            eprintln!("error: {err}");
            return ExitCode::from(2);
        }
    };
    let Some(addr) = opts.addr.clone() else {
        println!(
            "duplicates: skipped, no server to drive; run scripts/bench duplicates, or pass --addr HOST:PORT of a running example server"
        );
        return ExitCode::SUCCESS;
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a runtime");
    match rt.block_on(run(&opts, &addr)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
