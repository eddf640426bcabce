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

#[derive(Default)]
struct Plan {
    /// Cut the connection that next sends a command containing these bytes, then refuse
    /// connections for this long.
    cut: Option<(Vec<u8>, Duration)>,
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
        self.plan.lock().unwrap().cut = Some((pattern.to_vec(), down));
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
            match &plan.cut {
                Some((pattern, down))
                    if buf[..n].windows(pattern.len()).any(|w| w == &pattern[..]) =>
                {
                    plan.refuse_until = Some(Instant::now() + *down);
                    plan.cut = None;
                    plan.cuts += 1;
                    true
                }
                _ => false,
            }
        };
        if cut {
            // No reply reaches the client from here on; the command still reaches Redis.
            replies.abort();
            let _ = to_server.write_all(&buf[..n]).await;
            tokio::time::sleep(Duration::from_millis(50)).await;
            return;
        }
        if to_server.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    replies.abort();
}
