#![allow(missing_docs)]
//! Sends requests of one kind through `IdempotencyService` in process, one after another, and
//! prints the time per request: a program to count instructions per request with callgrind, or
//! to time fresh keys into a store that is already full.
//!
//! ```text
//! cargo bench --bench requests -- MODE N [PREFILL] [--small-store | --max-entries=M] [--latencies]
//! ```
//!
//! MODE is `bare` (the handler alone, with a key), `nokey`, `fresh` (a new key each time),
//! `replay`, or `coalesced` (100 duplicates of a key at once, N in all). PREFILL fresh keys are
//! sent first, untimed, to fill the store. `--small-store` keeps it to 1,000 records, so that it
//! evicts from the start and stays in cache; `--max-entries=M` keeps it to M (under cachegrind,
//! a store larger than the simulated cache then fills in less time than a million records take).
//! `--latencies` times each request apart and prints their distribution, and how many took
//! over 50 µs: the pauses a request can meet, such as a store's map growing. Instructions per request: run the executable (`cargo bench --bench requests --no-run` names
//! it) under `valgrind --tool=callgrind` with N and with 2N, and divide the difference by N.

mod common;

use std::time::Instant;

use common::{handler, request, runtime, send, yielding};
use tower::{Layer, service_fn};
use tower_idempotency::{IdempotencyServiceLayer, store::MemoryStore};

const USAGE: &str = "usage: requests bare|nokey|fresh|replay|coalesced N [PREFILL] [--small-store | --max-entries=M] [--latencies]";

fn main() {
    // `cargo bench` adds `--bench`.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let small = args.iter().any(|a| a == "--small-store");
    let mut latencies = Latencies::new(args.iter().any(|a| a == "--latencies"));
    let mut words = args.iter().filter(|a| !a.starts_with("--"));
    let (Some(mode), Some(n)) = (words.next(), words.next().and_then(|n| n.parse().ok())) else {
        eprintln!("{USAGE}");
        std::process::exit(2);
    };
    let n: u64 = n;
    let prefill: u64 = words.next().and_then(|p| p.parse().ok()).unwrap_or(0);
    let max_entries = args
        .iter()
        .find_map(|a| a.strip_prefix("--max-entries="))
        .map(|n| n.parse().expect("--max-entries=N takes a whole number"));
    let store = match (small, max_entries) {
        (true, _) => MemoryStore::with_limits(1_000, usize::MAX),
        (false, Some(max_entries)) => MemoryStore::with_limits(max_entries, usize::MAX),
        (false, None) => MemoryStore::new(),
    };
    let idempotent = IdempotencyServiceLayer::new(store.clone()).layer(service_fn(handler));
    let bare = service_fn(handler);
    runtime().block_on(async {
        for i in 0..prefill {
            send(&idempotent, request(Some(&format!("prefill-{i}")))).await;
        }
        send(&idempotent, request(Some("replayed"))).await;
        // Made in every mode, though only `fresh` sends them: under callgrind each mode then
        // counts their making alike (about 1,300 instructions a request), and the difference
        // between two modes is the middleware's alone.
        let keys: Vec<String> = (0..n).map(|i| format!("fresh-{i:012}")).collect();
        let start = Instant::now();
        match mode.as_str() {
            "bare" => {
                for _ in 0..n {
                    latencies.time(send(&bare, request(Some("k")))).await;
                }
            }
            "nokey" => {
                for _ in 0..n {
                    latencies.time(send(&idempotent, request(None))).await;
                }
            }
            "fresh" => {
                for key in &keys {
                    latencies.time(send(&idempotent, request(Some(key)))).await;
                }
            }
            "replay" => {
                for _ in 0..n {
                    latencies
                        .time(send(&idempotent, request(Some("replayed"))))
                        .await;
                }
            }
            "coalesced" => {
                // 100 duplicates of one key at a time: one runs the handler, which yields
                // twice, and the other 99 arrive while it runs and wait for its answer.
                let slow = IdempotencyServiceLayer::new(store.clone()).layer(service_fn(yielding));
                for batch in 0..n.div_ceil(100) {
                    let key = format!("coalesced-{batch}");
                    let tasks: Vec<_> = (0..100)
                        .map(|_| {
                            let (slow, key) = (slow.clone(), key.clone());
                            tokio::spawn(async move { send(&slow, request(Some(&key))).await })
                        })
                        .collect();
                    for task in tasks {
                        task.await.expect("no panic");
                    }
                }
            }
            _ => {
                eprintln!("{USAGE}");
                std::process::exit(2);
            }
        }
        let per_request = start.elapsed().as_nanos() as f64 / n.max(1) as f64;
        println!("REQUESTS mode={mode} n={n} prefill={prefill} ns_per_request={per_request:.0}");
        latencies.report();
    });
}

/// The time of each request, when asked for.
struct Latencies {
    on: bool,
    ns: Vec<u64>,
}

impl Latencies {
    fn new(on: bool) -> Self {
        Self { on, ns: Vec::new() }
    }

    async fn time<F: std::future::Future>(&mut self, request: F) -> F::Output {
        if !self.on {
            return request.await;
        }
        let start = Instant::now();
        let out = request.await;
        self.ns.push(start.elapsed().as_nanos() as u64);
        out
    }

    fn report(&mut self) {
        if self.ns.is_empty() {
            return;
        }
        let slow: Vec<u64> = self.ns.iter().copied().filter(|&ns| ns > 50_000).collect();
        self.ns.sort_unstable();
        let at = |q: f64| self.ns[((self.ns.len() - 1) as f64 * q) as usize] as f64 / 1e3;
        println!(
            "LATENCIES_US p50={:.1} p99={:.1} p99.9={:.1} p99.99={:.1} max={:.1} over_50us={} their_total_ms={:.1}",
            at(0.5),
            at(0.99),
            at(0.999),
            at(0.9999),
            at(1.0),
            slow.len(),
            slow.iter().sum::<u64>() as f64 / 1e6,
        );
    }
}
