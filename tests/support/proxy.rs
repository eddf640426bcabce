//! A TCP proxy in front of a Redis server that can cut a connection the way a network does:
//! after a command went through, before its reply came back.

use std::{
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
};

struct Cut {
    pattern: Vec<u8>,
    pass_on: bool,
    down: Duration,
}

#[derive(Default)]
struct Plan {
    /// Cut the connection that next sends a command containing these bytes (after passing
    /// it on to Redis, or before), then refuse connections for this long.
    cut: Option<Cut>,
    /// Refuse connections until then.
    refuse_until: Option<Instant>,
    /// Connections cut so far.
    cuts: usize,
}

/// Forwards every connection to `127.0.0.1:upstream`, until told to cut one.
pub struct CuttingProxy {
    port: u16,
    plan: Arc<Mutex<Plan>>,
}

impl CuttingProxy {
    pub async fn start(upstream: u16) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let plan = Arc::new(Mutex::new(Plan::default()));
        let shared = plan.clone();
        tokio::spawn(async move {
            while let Ok((client, _)) = listener.accept().await {
                let refused = shared
                    .lock()
                    .unwrap()
                    .refuse_until
                    .is_some_and(|until| Instant::now() < until);
                if !refused {
                    tokio::spawn(forward(client, upstream, shared.clone()));
                }
            }
        });
        Self { port, plan }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The next command containing `pattern` reaches Redis, but its connection is cut before
    /// the reply comes back, and new connections are refused for `down` after that.
    pub fn cut_after(&self, pattern: &[u8], down: Duration) {
        self.cut(pattern, true, down);
    }

    /// The next command containing `pattern` never reaches Redis: its connection is cut, and
    /// new connections are refused for `down`.
    pub fn cut_before(&self, pattern: &[u8], down: Duration) {
        self.cut(pattern, false, down);
    }

    fn cut(&self, pattern: &[u8], pass_on: bool, down: Duration) {
        self.plan.lock().unwrap().cut = Some(Cut {
            pattern: pattern.to_vec(),
            pass_on,
            down,
        });
    }

    /// How many connections were cut.
    pub fn cuts(&self) -> usize {
        self.plan.lock().unwrap().cuts
    }
}

async fn forward(client: TcpStream, upstream: u16, plan: Arc<Mutex<Plan>>) {
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)).await else {
        return;
    };
    let (mut from_client, mut to_client) = client.into_split();
    let (mut from_server, mut to_server) = server.into_split();
    let replies = tokio::spawn(async move {
        let _ = tokio::io::copy(&mut from_server, &mut to_client).await;
    });
    let mut buf = vec![0; 64 * 1024];
    while let Ok(n) = from_client.read(&mut buf).await {
        if n == 0 {
            break;
        }
        let cut = {
            let mut plan = plan.lock().unwrap();
            match plan.cut.take() {
                Some(cut)
                    if buf[..n]
                        .windows(cut.pattern.len())
                        .any(|w| w == cut.pattern) =>
                {
                    plan.refuse_until = Some(Instant::now() + cut.down);
                    plan.cuts += 1;
                    Some(cut.pass_on)
                }
                unmatched => {
                    plan.cut = unmatched;
                    None
                }
            }
        };
        if let Some(pass_on) = cut {
            // No reply reaches the client from here on.
            replies.abort();
            if pass_on {
                let _ = to_server.write_all(&buf[..n]).await;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            return;
        }
        if to_server.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    replies.abort();
}
