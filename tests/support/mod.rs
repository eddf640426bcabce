//! Real `redis-server` processes for the Redis tests: one per test that needs to kill or restart
//! it, one shared standalone server and one 3-master cluster per test binary.

#![allow(dead_code, unreachable_pub)]

pub mod app;
pub mod proxy;

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{
        OnceLock,
        atomic::{AtomicUsize, Ordering},
    },
    thread,
    time::{Duration, Instant},
};

const INSTALL_HINT: &str = "the Redis tests need `redis-server` and `redis-cli` (Redis 7 or later) on PATH; \
     on Debian or Ubuntu run `apt-get install redis-server redis-tools` (as root)";

/// A `redis-server` on a free port of 127.0.0.1, with its own directory and log file. Dropping
/// it kills the server; if the test is failing, the server's log is printed first.
pub struct RedisServer {
    port: u16,
    dir: PathBuf,
    extra_args: Vec<String>,
    child: Option<Child>,
}

impl RedisServer {
    /// Starts a standalone server.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// Starts a server with extra `redis-server` arguments.
    pub fn start_with(extra_args: &[&str]) -> Self {
        const ATTEMPTS: usize = 5;
        for attempt in 1..=ATTEMPTS {
            let port = free_port();
            let mut server = Self {
                port,
                dir: temp_dir(port),
                extra_args: extra_args.iter().map(|s| s.to_string()).collect(),
                child: None,
            };
            match server.try_spawn() {
                Ok(()) => return server,
                // Another test process may have taken the port (or a cluster node's bus port,
                // 10000 above it) between our probe and the server's bind: try another.
                Err(exited) if attempt < ATTEMPTS => {
                    eprintln!("{exited}; trying another port");
                }
                Err(exited) => panic!("{exited}"),
            }
        }
        unreachable!("the last attempt returns or panics")
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// `redis://127.0.0.1:PORT`.
    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("redis.log")).unwrap_or_default()
    }

    /// Kills the server at once (SIGKILL), as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Freezes the server (SIGSTOP): it keeps its connections but answers nothing.
    pub fn pause(&self) {
        self.signal("-STOP");
    }

    /// Lets a paused server run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = self.child.as_ref().expect("the server is running").id();
        let status = Command::new("kill")
            .args([signal, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {signal} {pid} failed");
    }

    /// Starts the server again on the same port, with an empty dataset.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    fn spawn(&mut self) {
        if let Err(exited) = self.try_spawn() {
            panic!("{exited}");
        }
    }

    /// Starts the server and waits for it to answer; `Err` with its log when it exits first.
    fn try_spawn(&mut self) -> Result<(), String> {
        std::fs::create_dir_all(&self.dir).expect("create the server's directory");
        let mut cmd = Command::new("redis-server");
        cmd.args([
            "--port",
            &self.port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .arg("--dir")
        .arg(&self.dir)
        .arg("--logfile")
        .arg(self.dir.join("redis.log"))
        .args(&self.extra_args)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
        let child = match cmd.spawn() {
            Ok(child) => child,
            Err(err) if err.kind() == std::io::ErrorKind::NotFound => {
                panic!("{INSTALL_HINT} ({err})")
            }
            Err(err) => panic!("could not start redis-server: {err}"),
        };
        reap_with_this_process(child.id());
        self.child = Some(child);
        let started = Instant::now();
        while !ping(self.port) {
            if let Some(status) = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten())
            {
                self.child = None;
                return Err(format!(
                    "redis-server on port {} exited at start ({status}); its log:\n{}",
                    self.port,
                    self.log()
                ));
            }
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "redis-server did not answer PING; its log:\n{}",
                self.log()
            );
            thread::sleep(Duration::from_millis(10));
        }
        Ok(())
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        if thread::panicking() {
            eprintln!(
                "--- log of redis-server on port {} ---\n{}--- end of log ---",
                self.port,
                self.log()
            );
        }
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A standalone server shared by the tests of this binary (keys in tests are random, so they do
/// not collide).
pub fn shared_server() -> &'static RedisServer {
    static SERVER: OnceLock<RedisServer> = OnceLock::new();
    SERVER.get_or_init(RedisServer::start)
}

/// A 3-master Redis Cluster, created once per test binary.
pub struct Cluster {
    nodes: Vec<RedisServer>,
}

impl Cluster {
    /// The nodes' URLs.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// The nodes' ports, in the order of [`urls`](Self::urls).
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(RedisServer::port).collect()
    }

    /// Starts moving the slot that holds `redis_key` to another node, as resharding does: the
    /// key goes to its new node, and the old one redirects to it (`ASK`) until
    /// [`SlotMove::finish`] hands the slot over.
    pub fn move_slot_of(&self, redis_key: &str) -> SlotMove<'_> {
        let any = self.nodes[0].port();
        let reply = command(any, &format!("CLUSTER KEYSLOT {redis_key}"));
        let slot: u16 = reply.trim().trim_start_matches(':').parse().unwrap();
        // `<id> <ip:port@cport> <flags> <master> <ping> <pong> <epoch> <state> <slots>...`
        let nodes = command(any, "CLUSTER NODES");
        let owns = |line: &str| owns_slot(line, slot);
        let node = |line: &str| {
            let mut fields = line.split_whitespace();
            let id = fields.next().unwrap().to_owned();
            let address = fields.next().unwrap();
            let port = address.split(['@', ':']).nth(1).unwrap().parse().unwrap();
            (id, port)
        };
        // Masters by their own account: another node's view lags behind a failover.
        let lines: Vec<&str> = nodes
            .lines()
            .filter(|l| {
                l.contains("master")
                    && command(node(l).1, "INFO replication").contains("role:master")
            })
            .collect();
        let (from_id, from): (String, u16) = node(lines.iter().find(|l| owns(l)).unwrap());
        let (to_id, to) = node(lines.iter().find(|l| !owns(l)).unwrap());
        ok(command(
            to,
            &format!("CLUSTER SETSLOT {slot} IMPORTING {from_id}"),
        ));
        ok(command(
            from,
            &format!("CLUSTER SETSLOT {slot} MIGRATING {to_id}"),
        ));
        ok(command(
            from,
            &format!("MIGRATE 127.0.0.1 {to} {redis_key} 0 5000"),
        ));
        SlotMove {
            cluster: self,
            slot,
            to_id,
        }
    }

    /// Every node's log, for a failing test's message.
    pub fn logs(&self) -> String {
        self.nodes
            .iter()
            .map(|n| format!("--- node {} ---\n{}", n.port(), n.log()))
            .collect()
    }
}

/// A slot on its way from one node of a cluster to another.
pub struct SlotMove<'a> {
    cluster: &'a Cluster,
    slot: u16,
    to_id: String,
}

impl SlotMove<'_> {
    /// Hands the slot to its new node, on every master (replicas follow theirs).
    pub fn finish(self) {
        for node in &self.cluster.nodes {
            if command(node.port(), "INFO replication").contains("role:slave") {
                continue;
            }
            let line = format!("CLUSTER SETSLOT {} NODE {}", self.slot, self.to_id);
            ok(command(node.port(), &line));
        }
    }
}

fn ok(reply: String) {
    assert!(reply.starts_with("+OK"), "{reply}");
}

/// The cluster of this test binary, created on first use.
pub fn cluster() -> &'static Cluster {
    static CLUSTER: OnceLock<Cluster> = OnceLock::new();
    CLUSTER.get_or_init(|| Cluster::start(0))
}

impl Cluster {
    /// A cluster of 3 masters with `replicas` replicas each, of its own.
    pub fn start(replicas: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "5000",
                ])
            })
            .collect();
        let cluster = Cluster { nodes };
        let addresses: Vec<String> = cluster
            .nodes
            .iter()
            .map(|n| format!("127.0.0.1:{}", n.port()))
            .collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas.to_string(), "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .unwrap_or_else(|err| panic!("{INSTALL_HINT} ({err})"));
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed:\n{}{}\n{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr),
            cluster.logs()
        );
        let settled = |n: &RedisServer| {
            command(n.port(), "CLUSTER INFO").contains("cluster_state:ok")
                && !command(n.port(), "INFO replication").contains("master_link_status:down")
        };
        let started = Instant::now();
        while !cluster.nodes.iter().all(settled) {
            assert!(
                started.elapsed() < Duration::from_secs(30),
                "the cluster did not settle:\n{}",
                cluster.logs()
            );
            thread::sleep(Duration::from_millis(50));
        }
        cluster
    }

    /// Hands the slot of `redis_key` from its master to that master's replica, as a planned
    /// failover does (`CLUSTER FAILOVER` on the replica), and waits until the old master
    /// follows the new one.
    pub fn fail_over_slot_of(&self, redis_key: &str) {
        let any = self.nodes[0].port();
        let slot = command(any, &format!("CLUSTER KEYSLOT {redis_key}"));
        let slot = slot.trim().trim_start_matches(':');
        let master = self
            .nodes
            .iter()
            .find(|n| {
                command(n.port(), "CLUSTER NODES").lines().any(|line| {
                    line.contains("myself,master") && owns_slot(line, slot.parse().unwrap())
                })
            })
            .expect("the slot's master");
        let replica = self
            .nodes
            .iter()
            .find(|n| {
                let info = command(n.port(), "INFO replication");
                info.contains("role:slave")
                    && info.contains(&format!("master_port:{}", master.port()))
            })
            .expect("a replica of the slot's master");
        ok(command(replica.port(), "CLUSTER FAILOVER"));
        let started = Instant::now();
        while !command(master.port(), "INFO replication").contains("role:slave") {
            assert!(
                started.elapsed() < Duration::from_secs(10),
                "the failover did not happen:\n{}",
                self.logs()
            );
            thread::sleep(Duration::from_millis(20));
        }
    }
}

/// Whether a `CLUSTER NODES` line lists `slot` among its node's.
fn owns_slot(line: &str, slot: u16) -> bool {
    line.split_whitespace().skip(8).any(|range| {
        let (first, last) = range.split_once('-').unwrap_or((range, range));
        first.parse().is_ok_and(|first: u16| first <= slot)
            && last.parse().is_ok_and(|last: u16| slot <= last)
    })
}

fn free_port() -> u16 {
    // Ports handed out in this process are remembered, so two servers started at once never
    // race for the same one.
    static TAKEN: OnceLock<std::sync::Mutex<Vec<u16>>> = OnceLock::new();
    let taken = TAKEN.get_or_init(Default::default);
    loop {
        let port = TcpListener::bind("127.0.0.1:0")
            .expect("bind a free port")
            .local_addr()
            .unwrap()
            .port();
        // A cluster node also listens on port + 10000.
        if port > 55_535 {
            continue;
        }
        let mut taken = taken.lock().unwrap();
        if !taken.contains(&port) {
            taken.push(port);
            return port;
        }
    }
}

fn temp_dir(port: u16) -> PathBuf {
    static N: AtomicUsize = AtomicUsize::new(0);
    std::env::temp_dir().join(format!(
        "tower-idempotency-redis-{}-{}-{port}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    ))
}

/// Servers in statics are never dropped: a watcher kills the server once this test process is
/// gone.
fn reap_with_this_process(server_pid: u32) {
    let script = format!(
        "while kill -0 {} 2>/dev/null && kill -0 {server_pid} 2>/dev/null; do sleep 0.5; done; kill -9 {server_pid} 2>/dev/null",
        std::process::id()
    );
    let _ = Command::new("sh")
        .args(["-c", &script])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn();
}

fn ping(port: u16) -> bool {
    command(port, "PING").starts_with("+PONG")
}

/// The middle of `samples`, sorted.
pub fn median(mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    samples[samples.len() / 2]
}

/// Sends one inline command and returns the raw reply ("" when the server cannot be reached).
pub fn command(port: u16, line: &str) -> String {
    let Ok(mut stream) =
        TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), Duration::from_millis(200))
    else {
        return String::new();
    };
    let _ = stream.set_read_timeout(Some(Duration::from_millis(500)));
    if stream.write_all(format!("{line}\r\n").as_bytes()).is_err() {
        return String::new();
    }
    let mut reply = Vec::new();
    let mut buf = [0; 4096];
    // One read answers PING and the short replies used here.
    if let Ok(n) = stream.read(&mut buf) {
        reply.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&reply).into_owned()
}

/// Every command a server runs, as `redis-cli monitor` prints them.
pub struct Monitor {
    child: Child,
    port: u16,
    lines: std::sync::mpsc::Receiver<String>,
    marks: usize,
}

impl Monitor {
    /// Starts monitoring the server on `port`.
    pub fn start(port: u16) -> Self {
        let mut child = Command::new("redis-cli")
            .args(["-p", &port.to_string(), "monitor"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|err| panic!("{INSTALL_HINT} ({err})"));
        let stdout = child.stdout.take().unwrap();
        let (tx, lines) = std::sync::mpsc::channel();
        thread::spawn(move || {
            use std::io::BufRead;
            for line in std::io::BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                if tx.send(line).is_err() {
                    return;
                }
            }
        });
        let mut monitor = Self {
            child,
            port,
            lines,
            marks: 0,
        };
        monitor.commands_since_last_call();
        monitor
    }

    /// The commands clients sent since the last call (or since monitoring began), without the
    /// commands scripts ran and without the watchdog's PINGs.
    pub fn commands_since_last_call(&mut self) -> Vec<String> {
        self.marks += 1;
        let mark = format!("monitor-mark-{}", self.marks);
        let deadline = Instant::now() + Duration::from_secs(10);
        let mut commands = Vec::new();
        loop {
            // Repeat the mark until it shows up: the monitor may not be attached yet.
            let _ = command(self.port, &format!("ECHO {mark}"));
            while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(100)) {
                if line.contains(&mark) {
                    return commands;
                }
                let by_script = line.contains(" lua]");
                let watchdog = line.ends_with("\"PING\"");
                let earlier_mark = line.contains("monitor-mark-");
                if line.contains('[') && !by_script && !watchdog && !earlier_mark {
                    commands.push(line);
                }
            }
            assert!(Instant::now() < deadline, "the monitor never showed {mark}");
        }
    }
}

impl Drop for Monitor {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A store on the Redis at `url` that bounds connecting and each reply by `bound`.
#[cfg(feature = "redis")]
pub async fn bounded_store(url: &str, bound: Duration) -> tower_idempotency::store::RedisStore {
    tower_idempotency::store::RedisStore::builder()
        .connection_timeout(bound)
        .response_timeout(bound)
        .connect(url)
        .await
        .unwrap()
}
