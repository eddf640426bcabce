//! The Redis store: many processes share claims and responses through Redis, Redis Cluster or
//! Valkey (feature `redis`).

use std::{
    collections::HashMap,
    fmt,
    future::Future,
    sync::{
        Arc, Mutex, MutexGuard, Weak,
        atomic::{AtomicBool, AtomicU32, AtomicUsize, Ordering},
    },
    time::Duration,
};

use async_trait::async_trait;
use bytes::{BufMut, Bytes, BytesMut};
use redis::{
    Client, Cmd, ErrorKind, ExistenceCheck, PushInfo, PushKind, RedisError, RedisFuture, Script,
    SetExpiry, SetOptions, Value,
    aio::{ConnectionLike, ConnectionManager, ConnectionManagerConfig},
    cluster::ClusterClientBuilder,
    cluster_async::ClusterConnection,
    cluster_routing::{Route, RoutingInfo, SingleNodeRoutingInfo, SlotAddr},
};
use tokio::{
    sync::{Notify, mpsc, watch},
    task::JoinHandle,
    time::Instant,
};

use crate::clock::{self, Backoff};

use super::{
    Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, Record, StoreError, StoreKey,
};

const DEFAULT_PREFIX: &str = "idem:";
const DEFAULT_CONNECTION_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_RESPONSE_TIMEOUT: Duration = Duration::from_secs(2);
const DEFAULT_POLL_INTERVAL: Duration = Duration::from_millis(250);
/// How many poll intervals a waiter whose key's channel is listened to waits at most between
/// two looks at its key.
const MAX_POLL_BACKOFF: u32 = 8;
const DEFAULT_WATCHDOG_INTERVAL: Duration = Duration::from_secs(1);
/// Claims left unanswered that are being given back at once, at most.
const MAX_GIVING_BACK: usize = 10_000;

/// The first byte of every value this store writes.
const VALUE_VERSION: u8 = 1;
const STATE_IN_FLIGHT: u8 = 0;
const STATE_COMPLETED: u8 = 1;
/// Version, state, token, fingerprint; a completed value continues with the encoded record.
const HEADER_LEN: usize = 1 + 1 + 16 + 32;

// The scripts check the value's header byte by byte (Lua strings are 1-indexed): byte 1 the
// version, byte 2 the state, bytes 3..=18 the fencing token. They return -1 for a value they do
// not recognise, 0 when the token does not own the key, 1 when they did their work.
//
// The notification is sent with `pcall`: a waiter that misses it finds the key by polling, so
// a refused publish (a user without the channel) must not fail the step whose write is done.
//
// Each starts with a shebang, which declares it a script that writes (the read, `no-writes`;
// the release and the renewal, which free memory or keep it, `allow-oom`): a cluster node that
// is a replica now (a failover demoted it) answers MOVED to such a script, and the client
// follows the slot to its new master. Without one, a demoted master the client still held for
// the slot ran the script itself, and refused its first write with READONLY, for as long as
// nothing else refreshed the client's map of the slots.

/// A script that starts by reading the key's value into `v`: a missing key returns 0, a value
/// shorter than the header or of another version -1 (the literals are `HEADER_LEN` and
/// `VALUE_VERSION`).
macro_rules! script {
    ($($line:literal)*) => {
        concat!(
            // They only delete or shorten: Redis out of memory may still run them.
            "#!lua flags=allow-oom\n",
            "local v = redis.call('GET', KEYS[1])\n",
            "if not v then return 0 end\n",
            "if #v < 50 or string.byte(v, 1) ~= 1 then return -1 end\n",
            $($line, "\n",)*
        )
    };
}

// The scripts spell the header's length and version as literals.
const _: () = assert!(HEADER_LEN == 50 && VALUE_VERSION == 1);

/// KEYS: the key. ARGV: token, the completed value, retention in ms, the key's channel.
///
/// The channel is not declared a key: it never exists as one, and while its slot moves, a
/// script declaring a missing key beside another is refused (TRYAGAIN) until the move ends.
///
/// Unlike the others, it goes on where the key is missing: the claim lapsed (or Redis lost it)
/// and no other run took the key over, so the run's record overwrites nothing.
const COMPLETE_SCRIPT: &str = concat!(
    "#!lua\n",
    "local v = redis.call('GET', KEYS[1])\n",
    "if v then\n",
    "if #v < 50 or string.byte(v, 1) ~= 1 then return -1 end\n",
    "if string.sub(v, 3, 18) ~= ARGV[1] then return 0 end\n",
    "if string.byte(v, 2) == 1 then return 1 end\n",
    "end\n",
    "redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])\n",
    "redis.pcall('SPUBLISH', ARGV[4], 'completed')\n",
    "return 1\n",
);

/// KEYS: the key. ARGV: token, the key's channel (not a key: see the completion's).
const RELEASE_SCRIPT: &str = script!(
    "if string.sub(v, 3, 18) ~= ARGV[1] or string.byte(v, 2) ~= 0 then return 0 end"
    "redis.call('DEL', KEYS[1])"
    "redis.pcall('SPUBLISH', ARGV[2], 'released')"
    "return 1"
);

/// KEYS: the key. ARGV: token, lease in ms.
const EXTEND_SCRIPT: &str = script!(
    "if string.sub(v, 3, 18) ~= ARGV[1] or string.byte(v, 2) ~= 0 then return 0 end"
    "redis.call('PEXPIRE', KEYS[1], ARGV[2])"
    "return 1"
);

/// KEYS: the key. The key's value and its time to live in ms, in one command: a pipeline of
/// the two is not followed to another node when a cluster's slot moves, a single command is.
const READ_SCRIPT: &str = concat!(
    "#!lua flags=no-writes\n",
    "return {redis.call('GET', KEYS[1]), redis.call('PTTL', KEYS[1])}\n",
);

/// One of the store's scripts. It is run by its digest (`EVALSHA`), and by its source (`EVAL`)
/// on a node that does not hold it yet, which then keeps it for the next call: a miss costs one
/// round trip more, it cannot miss twice (as a load sent to one node and a run sent to another
/// could, while a cluster's slot moves), and no `SCRIPT` command is needed (a user allowed to
/// run scripts but not to manage them, or a server whose `SCRIPT` is renamed away, runs them
/// all the same).
struct Lua {
    source: &'static str,
    sha: String,
}

impl Lua {
    fn new(source: &'static str) -> Self {
        Self {
            source,
            sha: Script::new(source).get_hash().to_owned(),
        }
    }

    /// The command that runs the script on `keys`, then `args` (which adds the arguments).
    fn cmd(&self, by_source: bool, keys: &[&str], args: &impl Fn(&mut Cmd)) -> Cmd {
        let (command, script) = if by_source {
            ("EVAL", self.source)
        } else {
            ("EVALSHA", self.sha.as_str())
        };
        let mut cmd = redis::cmd(command);
        cmd.arg(script).arg(keys.len()).arg(keys);
        args(&mut cmd);
        cmd
    }
}

/// A [`KeyStore`] in Redis, Redis Cluster or Valkey, shared by every process that points at it.
///
/// - **One Redis key per scoped key**: `{prefix}{<hex digest>}`. The digest sits in a hash tag,
///   so the key and its notification channel `{prefix}{<hex digest>}:done` share a cluster slot.
///   No user-controlled bytes reach a key name. The value holds the state (in flight or
///   completed), the fencing token, the fingerprint and then the encoded [`Record`].
/// - **Round trips**: a claim is one `SET key value NX PX lease GET`, which either claims the key
///   or returns what holds it, so a replay is one round trip too. Completing, releasing and
///   extending are one script each (`EVALSHA`, or `EVAL` on a node that does not hold it yet)
///   that checks the fencing token and, for the first two, publishes on the key's channel. Each
///   step is safe to send twice.
/// - **Waiting across processes**: sharded pub/sub (`SSUBSCRIBE`, Redis 7 or later, or Valkey)
///   on one subscriber connection per store, shared by every local waiter of a key. The
///   subscriptions asked for meanwhile go out together, so many keys waited on at once cost a
///   few round trips, not one each. A waiter subscribes first, then reads the key, and also
///   polls every 250 ms (with jitter) and at the lease's end, so a lost message only delays it.
///   A watchdog pings the subscriber connection every second, so that a restarted Redis is
///   noticed and the subscriptions are renewed.
/// - **Failures**: every call fails within the connection timeout plus the response timeout,
///   with [`StoreError::Timeout`] or [`StoreError::Backend`]; the connections reconnect by
///   themselves once Redis is back. A claim that got no answer (its reply timed out, its
///   connection broke, or its caller stopped waiting for it) may have run, or may still run (a
///   stalled Redis runs what it was sent when it goes on): a task gives it back, so the key is
///   not held for its lease (up to 10,000 such tasks at once). A value that does not decode is [`StoreError::Corrupt`].
///
/// It needs Redis 7.0 or later (for `SET ... NX GET` and sharded pub/sub), or Valkey.
///
/// There is no connection pool: one multiplexed connection pipelines every concurrent request.
/// Cloning a `RedisStore` is cheap and shares its connections.
///
/// # Production notes
///
/// Use `maxmemory-policy noeviction`: an evicted claim lets a duplicate run a second time (the
/// store warns at connect of any other policy). Persistence (`appendonly yes`) keeps the
/// records through a restart. Give each application sharing a Redis a prefix of its own: two
/// with the same prefix answer each other's keys.
///
/// A Redis user with access control needs the commands `GET`, `SET`, `EVAL`, `EVALSHA`,
/// `SSUBSCRIBE`, `SUNSUBSCRIBE` and `PING` (and `CLUSTER|SLOTS` on a cluster), and in the
/// scripts `DEL`, `PEXPIRE`, `PTTL` and `SPUBLISH`; the keys `~<prefix>*` and the channels
/// `&<prefix>*`; on a cluster, on every node. For the prefix `idem:`:
///
/// ```text
/// ACL SETUSER app on >secret ~idem:* &idem:* +get +set +eval +evalsha +ssubscribe +sunsubscribe +ping +del +pexpire +pttl +spublish +cluster|slots
/// ```
///
/// Connecting runs each step once on a key of its own (a claim, a renewal, a read, a release
/// and a completion kept for a millisecond): a user or server that cannot run them (a missing
/// permission, a replica, a renamed command) is refused there, with what is missing, rather
/// than found out by the first request, which could then run and fail to store its response.
/// A user without the channels is let through with a warning: waiters in other processes
/// then find a finished run by polling. On a cluster every primary is checked, at once.
///
/// While a key's slot moves to another node, its completion is announced on the new node and
/// a waiter may still listen on the old one: it finds the answer by polling (within a few
/// poll intervals), or when the move ends.
///
/// # Example
///
/// ```no_run
/// use std::time::Duration;
/// use tower_idempotency::store::{KeyStore, RedisStore};
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), tower_idempotency::store::StoreError> {
/// // One Redis server (or Valkey).
/// let store = RedisStore::builder()
///     .prefix("orders:")
///     .response_timeout(Duration::from_millis(500))
///     .connect("redis://127.0.0.1:6379")
///     .await?;
///
/// // A Redis Cluster: any of its nodes will do.
/// let cluster = RedisStore::connect_cluster(["redis://10.0.0.1:7000", "redis://10.0.0.2:7000"]).await?;
/// # let _ = (store, cluster);
/// # Ok(())
/// # }
/// ```
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone)]
pub struct RedisStore {
    inner: Arc<Inner>,
}

struct Inner {
    conn: Conn,
    prefix: String,
    /// The bound on every call: connection timeout plus response timeout.
    call_timeout: Duration,
    poll_interval: Duration,
    subscriptions: Arc<Subscriptions>,
    watchdog: JoinHandle<()>,
    complete: Lua,
    release: Lua,
    extend: Lua,
    read: Lua,
    /// Claims left unanswered being given back (see [`RedisStore::give_back`]).
    giving_back: Arc<AtomicUsize>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.watchdog.abort();
    }
}

impl fmt::Debug for RedisStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("RedisStore")
            .field("prefix", &self.inner.prefix)
            .field("cluster", &self.is_cluster())
            .field("call_timeout", &self.inner.call_timeout)
            .finish_non_exhaustive()
    }
}

/// Settings for a [`RedisStore`], from [`RedisStore::builder`].
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
#[derive(Clone, Debug)]
pub struct RedisStoreBuilder {
    prefix: String,
    connection_timeout: Duration,
    response_timeout: Duration,
    poll_interval: Duration,
    watchdog_interval: Duration,
}

impl Default for RedisStoreBuilder {
    fn default() -> Self {
        Self {
            prefix: DEFAULT_PREFIX.to_owned(),
            connection_timeout: DEFAULT_CONNECTION_TIMEOUT,
            response_timeout: DEFAULT_RESPONSE_TIMEOUT,
            poll_interval: DEFAULT_POLL_INTERVAL,
            watchdog_interval: DEFAULT_WATCHDOG_INTERVAL,
        }
    }
}

impl RedisStoreBuilder {
    /// The prefix of every Redis key and channel the store uses (default `idem:`), so that
    /// several services can share one Redis.
    pub fn prefix(mut self, prefix: impl Into<String>) -> Self {
        self.prefix = prefix.into();
        self
    }

    /// How long connecting to Redis may take (default 1 s).
    pub fn connection_timeout(mut self, timeout: Duration) -> Self {
        self.connection_timeout = timeout;
        self
    }

    /// How long Redis may take to answer a command (default 2 s).
    pub fn response_timeout(mut self, timeout: Duration) -> Self {
        self.response_timeout = timeout;
        self
    }

    /// How often a waiter looks at its key when no notification came (default 250 ms, with up
    /// to 25% jitter either way). While the key's channel is subscribed to, so that no
    /// notification is lost, the pause doubles after each look, up to 8 times this; it also
    /// always looks when the lease lapses.
    pub fn poll_interval(mut self, interval: Duration) -> Self {
        self.poll_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// How often the subscriber connection is pinged, so that a Redis restart is noticed and
    /// the subscriptions are renewed (default 1 s).
    pub fn watchdog_interval(mut self, interval: Duration) -> Self {
        self.watchdog_interval = interval.max(Duration::from_millis(1));
        self
    }

    /// Connects to one Redis or Valkey server, such as `redis://127.0.0.1:6379` or
    /// `redis://user:password@host/2`. Both connections (commands and notifications) reconnect
    /// by themselves after a failure. TLS (`rediss://`) needs one of the `redis` crate's TLS
    /// features, turned on in your own `Cargo.toml` (such as `tokio-rustls-comp` with
    /// `tls-rustls-webpki-roots`); without one, such a URL is refused.
    ///
    /// Connecting needs Redis to answer now, and runs each of the store's steps once (see
    /// "Production notes" on [`RedisStore`]): it fails, within the connection and response
    /// timeouts, when Redis cannot be reached or cannot run them. A service that should start
    /// before its Redis does can try again after a pause until it connects.
    pub async fn connect(self, url: &str) -> Result<RedisStore, StoreError> {
        self.check_prefix()?;
        let client = Client::open(url).map_err(|err| unusable_url(url, err))?;
        // RESP3, so that notifications arrive as pushes on a connection that still runs commands.
        let info = client.get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let info = info.set_redis_settings(settings);
        let client = Client::open(info).map_err(StoreError::backend)?;
        let config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(self.connection_timeout))
            .set_response_timeout(Some(self.response_timeout))
            .set_number_of_retries(3)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(Duration::from_millis(500));
        let (subscriptions, requests) = Subscriptions::new();
        let bound = self.call_timeout();
        let conn = bounded(
            bound,
            ConnectionManager::new_with_config(client.clone(), config.clone()),
        )
        .await?;
        let push = push_handler(&subscriptions);
        let subscriber = bounded(
            bound,
            ConnectionManager::new_with_config(client, config.set_push_sender(push)),
        )
        .await?;
        let store = self.build(
            Conn::Standalone(conn),
            Conn::Standalone(subscriber),
            subscriptions,
            requests,
        );
        store.check().await?;
        Ok(store)
    }

    /// Connects to a Redis Cluster (or Valkey cluster) through any of its nodes, such as
    /// `redis://10.0.0.1:7000`. The connection follows the cluster's topology and reconnects
    /// by itself.
    pub async fn connect_cluster<I, S>(self, nodes: I) -> Result<RedisStore, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        self.check_prefix()?;
        let nodes: Vec<String> = nodes.into_iter().map(|n| n.as_ref().to_owned()).collect();
        if nodes.is_empty() {
            return Err(StoreError::backend(
                "no cluster node to connect through; give the URL of at least one, such as redis://10.0.0.1:7000",
            ));
        }
        if let Some(Err((node, err))) = nodes
            .iter()
            .map(|node| Client::open(node.as_str()).map_err(|err| (node, err)))
            .find(Result::is_err)
        {
            return Err(unusable_url(node, err));
        }
        let builder = || {
            ClusterClientBuilder::new(nodes.clone())
                .use_protocol(redis::ProtocolVersion::RESP3)
                .connection_timeout(self.connection_timeout)
                .response_timeout(self.response_timeout)
                .retries(2)
                .min_retry_wait(20)
                .max_retry_wait(500)
        };
        let (subscriptions, requests) = Subscriptions::new();
        let bound = self.call_timeout();
        let client = builder().build().map_err(StoreError::backend)?;
        let conn = bounded(bound, client.get_async_connection()).await?;
        let client = builder()
            .push_sender(push_handler(&subscriptions))
            .build()
            .map_err(StoreError::backend)?;
        let subscriber = bounded(bound, client.get_async_connection()).await?;
        let store = self.build(
            Conn::Cluster(conn),
            Conn::Cluster(subscriber),
            subscriptions,
            requests,
        );
        store.check().await?;
        Ok(store)
    }

    /// A brace in the prefix would make a cluster take the wrong part of the key for its hash
    /// tag: the key and its channel in different slots, or every key in one.
    fn check_prefix(&self) -> Result<(), StoreError> {
        if self.prefix.contains(['{', '}']) {
            return Err(StoreError::backend(format!(
                "the prefix {:?} has a brace: Redis Cluster would read the key's hash tag from it, and put keys and their channels in different slots, or every key in one; use a prefix without braces, such as \"orders:\"",
                self.prefix
            )));
        }
        Ok(())
    }

    fn call_timeout(&self) -> Duration {
        self.connection_timeout + self.response_timeout
    }

    fn build(
        self,
        conn: Conn,
        subscriber: Conn,
        subscriptions: Arc<Subscriptions>,
        requests: mpsc::UnboundedReceiver<Request>,
    ) -> RedisStore {
        let call_timeout = self.call_timeout();
        let watchdog = tokio::spawn(run_subscriber(
            subscriber,
            subscriptions.clone(),
            requests,
            self.watchdog_interval,
            call_timeout,
        ));
        RedisStore {
            inner: Arc::new(Inner {
                conn,
                prefix: self.prefix,
                call_timeout,
                poll_interval: self.poll_interval,
                subscriptions,
                watchdog,
                complete: Lua::new(COMPLETE_SCRIPT),
                release: Lua::new(RELEASE_SCRIPT),
                extend: Lua::new(EXTEND_SCRIPT),
                read: Lua::new(READ_SCRIPT),
                giving_back: Arc::default(),
            }),
        }
    }
}

impl RedisStore {
    /// Settings for a store; finish with [`connect`](RedisStoreBuilder::connect) or
    /// [`connect_cluster`](RedisStoreBuilder::connect_cluster).
    pub fn builder() -> RedisStoreBuilder {
        RedisStoreBuilder::default()
    }

    /// Connects to one Redis or Valkey server with the default settings.
    pub async fn connect(url: &str) -> Result<Self, StoreError> {
        Self::builder().connect(url).await
    }

    /// Connects to a Redis Cluster through any of its nodes with the default settings.
    pub async fn connect_cluster<I, S>(nodes: I) -> Result<Self, StoreError>
    where
        I: IntoIterator<Item = S>,
        S: AsRef<str>,
    {
        Self::builder().connect_cluster(nodes).await
    }

    fn is_cluster(&self) -> bool {
        matches!(self.inner.conn, Conn::Cluster(_))
    }

    /// Runs each of the store's steps once on a key of its own, and reads Redis's eviction
    /// policy: see "Production notes" on [`RedisStore`]. On a cluster it does so on every
    /// primary at once, since access control is set node by node and a node left out would
    /// refuse only the keys of its slots. A step refused for good (a missing permission, a
    /// replica, an unknown command) is an error; one that failed for the moment (a timeout,
    /// Redis out of memory or loading) is logged and the store is given out all the same, as
    /// it would be had Redis gone down just after.
    async fn check(&self) -> Result<(), StoreError> {
        // A replica that takes writes (`replica-read-only no`) would pass the steps, and keep
        // its claims from the processes on its master. Where the user may not ask, go on.
        if !self.is_cluster() {
            let cmd = redis::cmd("ROLE");
            if let Ok(role) = self.query::<Vec<Value>>("read the role", &cmd).await
                && let Some(Ok(role)) = role.first().map(redis::from_redis_value_ref::<String>)
                && role != "master"
            {
                return Err(StoreError::backend(format!(
                    "Redis is a {role}: the store needs a primary, whose claims every process sees; connect to the primary"
                )));
            }
        }
        let targets = self.check_targets().await;
        let outcomes = futures_util::future::join_all(
            targets.iter().map(|target| self.check_steps(target.key)),
        )
        .await;
        for (target, outcome) in targets.iter().zip(&outcomes) {
            let Err(err) = outcome else { continue };
            // A plain `ERR` is a refusal for good (an unknown command, a command a script's
            // user may not run), but for a node that has all the clients it takes.
            let for_good = match err {
                StoreError::Backend(err) => err.downcast_ref::<RedisError>().is_some_and(|err| {
                    matches!(
                        err.kind(),
                        ErrorKind::Server(
                            redis::ServerErrorKind::NoPerm
                                | redis::ServerErrorKind::ReadOnly
                                | redis::ServerErrorKind::CrossSlot
                                | redis::ServerErrorKind::ResponseError
                        )
                    ) && !err.to_string().contains("max number of clients")
                }),
                StoreError::Corrupt(_) => true,
                StoreError::Timeout(_) => false,
            };
            if for_good {
                return Err(StoreError::backend(format!(
                    "Redis{node} refused a step of the idempotency store ({err}). The store needs a primary (not a replica), and a user allowed the commands GET, SET, EVAL, EVALSHA, SSUBSCRIBE, SUNSUBSCRIBE and PING (and CLUSTER|SLOTS on a cluster), and in its scripts DEL, PEXPIRE, PTTL and SPUBLISH, on the keys ~{prefix}* and the channels &{prefix}* (on every node of a cluster)",
                    node = target.node,
                    prefix = self.inner.prefix,
                )));
            }
        }
        for (target, outcome) in targets.iter().zip(&outcomes) {
            if let Err(err) = outcome {
                tracing::warn!(error = %err, "idempotency store: connected, but a first step against Redis{} failed; keyed requests on it cannot be checked until it answers", target.node);
                continue;
            }
            let mut cmd = redis::cmd("CONFIG");
            cmd.arg("GET").arg("maxmemory-policy");
            let policy = match (&self.inner.conn, target.slot) {
                (Conn::Cluster(conn), Some(slot)) => {
                    let to = Route::new(slot, SlotAddr::Master);
                    let routing = RoutingInfo::SingleNode(SingleNodeRoutingInfo::SpecificNode(to));
                    conn.clone()
                        .route_command(cmd, routing)
                        .await
                        .and_then(|value| Ok(redis::from_redis_value(value)?))
                }
                _ => cmd.query_async(&mut self.inner.conn.clone()).await,
            };
            let policy: HashMap<String, String> = match policy {
                Ok(policy) => policy,
                Err(err) => {
                    tracing::debug!(error = %err, "idempotency store: could not read the maxmemory-policy of Redis{}", target.node);
                    continue;
                }
            };
            if let Some(policy) = policy.get("maxmemory-policy")
                && policy != "noeviction"
            {
                tracing::warn!(
                    "idempotency store: Redis{} evicts keys when full (maxmemory-policy {policy}): an evicted claim or response lets a request run twice; set maxmemory-policy noeviction, or give the store a Redis of its own",
                    target.node
                );
            }
        }
        Ok(())
    }

    /// Where [`check`](Self::check) runs: one key of its own, or on a cluster one in the slots
    /// of each primary (one key when the cluster's map cannot be read).
    async fn check_targets(&self) -> Vec<CheckTarget> {
        let fresh = || StoreKey::new(b"", &crate::IdempotencyKey::auto());
        let anywhere = || {
            vec![CheckTarget {
                key: fresh(),
                slot: None,
                node: String::new(),
            }]
        };
        if !self.is_cluster() {
            return anywhere();
        }
        // Each entry: first slot, last slot, then the primary (address, port, id), replicas.
        let mut cmd = redis::cmd("CLUSTER");
        cmd.arg("SLOTS");
        let Ok(slots) = self
            .query::<Vec<Vec<Value>>>("read the cluster's slots", &cmd)
            .await
        else {
            return anywhere();
        };
        let mut primaries: Vec<(String, Vec<(u16, u16)>)> = Vec::new();
        for entry in slots {
            let [first, last, primary, ..] = &entry[..] else {
                continue;
            };
            let (Ok(first), Ok(last), Some((host, port))) = (
                redis::from_redis_value_ref::<u16>(first),
                redis::from_redis_value_ref::<u16>(last),
                node_address(primary),
            ) else {
                continue;
            };
            let node = format!(" {host}:{port}");
            match primaries.iter_mut().find(|(n, _)| *n == node) {
                Some((_, ranges)) => ranges.push((first, last)),
                None => primaries.push((node, vec![(first, last)])),
            }
        }
        let mut targets = Vec::new();
        for (node, ranges) in primaries {
            // Slots are computed here, as the cluster does: a primary with a share of the
            // slots takes a few tries, one with a single slot some thousands, at no round trip.
            let found = (0..1_000_000).find_map(|_| {
                let key = fresh();
                let slot = key_slot(&key);
                ranges
                    .iter()
                    .any(|&(first, last)| (first..=last).contains(&slot))
                    .then_some((key, slot))
            });
            match found {
                Some((key, slot)) => targets.push(CheckTarget {
                    key,
                    slot: Some(slot),
                    node,
                }),
                None => tracing::warn!(
                    "idempotency store: found no key of its own for Redis{node} to check it with"
                ),
            }
        }
        if targets.is_empty() {
            return anywhere();
        }
        targets
    }

    async fn check_steps(&self, key: StoreKey) -> Result<(), StoreError> {
        let fingerprint = Fingerprint::from_bytes([0; 32]);
        let lease = Duration::from_secs(10);
        let Claim::Claimed(token) = self.claim(&key, &fingerprint, lease).await? else {
            return Err(StoreError::Corrupt("a fresh key was held".into()));
        };
        let renewed = self.extend(&key, token, lease).await?;
        let (held, _) = self.read_with_ttl(&key).await?;
        let released = self.release(&key, token).await?;
        let Claim::Claimed(token) = self.claim(&key, &fingerprint, lease).await? else {
            return Err(StoreError::Corrupt("a released key was held".into()));
        };
        let record = Record::not_replayable(fingerprint, http::StatusCode::OK);
        let stored = self
            .complete(&key, token, &record, Duration::from_millis(1))
            .await?;
        if !(renewed && held.is_some() && released && stored == Completion::Stored) {
            return Err(StoreError::Corrupt(
                "a step on a key of its own did not do its work".into(),
            ));
        }
        // The notifications: refused, they leave waiters to poll.
        let mut publish = redis::cmd("SPUBLISH");
        publish.arg(channel_of(&self.redis_key(&key))).arg("check");
        if let Err(err) = self.query::<i64>("publish", &publish).await {
            tracing::warn!(error = %err, "idempotency store: Redis refuses the store's notifications; a duplicate waiting in another process finds the run done only by polling (allow the user the channels &{}*)", self.inner.prefix);
        }
        Ok(())
    }

    /// The Redis key that holds `key`: the prefix, then the hex digest in a hash tag.
    pub fn redis_key(&self, key: &StoreKey) -> String {
        format!("{}{{{}}}", self.inner.prefix, key.to_hex())
    }

    /// The sharded pub/sub channel on which `key`'s completion or release is announced; in the
    /// key's cluster slot.
    pub fn channel(&self, key: &StoreKey) -> String {
        channel_of(&self.redis_key(key))
    }

    /// Gives back, from a task of its own, a claim left unanswered: releases `token`'s claim on
    /// `key` if there is one, trying until Redis answers or the lease would have lapsed anyway
    /// (five minutes at most, as the service's own tries).
    /// Releasing is token-checked, so a claim that never ran, or found the key held, leaves the
    /// key alone. Sent on the same connection after the claim, the release runs after it.
    ///
    /// At most [`MAX_GIVING_BACK`] such tasks run at once (a Redis that hangs for long would
    /// otherwise gather one for every keyed request); past that, a claim lapses with its lease.
    /// They do not keep the store alive.
    fn give_back(&self, key: StoreKey, token: FencingToken, lease: Duration) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let count = self.inner.giving_back.clone();
        if count.fetch_add(1, Ordering::Relaxed) >= MAX_GIVING_BACK {
            count.fetch_sub(1, Ordering::Relaxed);
            tracing::debug!(
                "idempotency store: too many claims to give back; this one lapses with its lease"
            );
            return;
        }
        let inner = Arc::downgrade(&self.inner);
        let mut backoff = Backoff::new(lease, Duration::ZERO, DEFAULT_POLL_INTERVAL);
        runtime.spawn(async move {
            loop {
                let last = backoff.wait().await;
                let Some(inner) = inner.upgrade() else { break };
                match (RedisStore { inner }).release(&key, token).await {
                    Ok(released) => {
                        if released {
                            tracing::debug!("idempotency store: a claim left unanswered was given back");
                        }
                        break;
                    }
                    Err(err) if last => {
                        tracing::debug!(error = %err, "idempotency store: giving back a claim left unanswered failed; it lapses with its lease");
                        break;
                    }
                    Err(err) => {
                        tracing::debug!(error = %err, "idempotency store: giving back a claim left unanswered failed; trying again");
                    }
                }
            }
            count.fetch_sub(1, Ordering::Relaxed);
        });
    }

    /// Runs one of the token-checked scripts: `true` when it did its work, `false` when the token
    /// does not own the key, an error for a value the script does not recognise.
    async fn owned_step(
        &self,
        what: &str,
        key: &StoreKey,
        script: &Lua,
        keys: &[&str],
        args: impl Fn(&mut Cmd),
    ) -> Result<bool, StoreError> {
        let outcome: i64 = self.invoke(what, script, keys, args).await?;
        match outcome {
            1 => Ok(true),
            0 => Ok(false),
            _ => Err(self.corrupt_in_script(key)),
        }
    }

    /// Runs a script on `keys`, then `args`, as one step (see [`call`](Self::call)): by its
    /// digest, or by its source where the node does not hold it (see [`Lua`]).
    async fn invoke<T: redis::FromRedisValue>(
        &self,
        what: &str,
        script: &Lua,
        keys: &[&str],
        args: impl Fn(&mut Cmd),
    ) -> Result<T, StoreError> {
        let args = &args;
        self.call(what, |mut conn| async move {
            match script.cmd(false, keys, args).query_async(&mut conn).await {
                Err(err) if err.kind() == ErrorKind::Server(redis::ServerErrorKind::NoScript) => {
                    tracing::debug!("idempotency store: the node does not hold the {what} script yet; sending its source");
                    script.cmd(true, keys, args).query_async(&mut conn).await
                }
                result => result,
            }
        })
        .await
    }

    /// Sends `cmd` as one step (see [`call`](Self::call)).
    async fn query<T: redis::FromRedisValue>(
        &self,
        what: &str,
        cmd: &Cmd,
    ) -> Result<T, StoreError> {
        self.call(
            what,
            |mut conn| async move { cmd.query_async(&mut conn).await },
        )
        .await
    }

    /// Runs one step against Redis, bounded by the call timeout. A step that met a broken
    /// connection is sent once more: the connection has begun to reconnect by then (the error
    /// may be left over from before Redis came back), and every step is safe to run twice.
    async fn call<T, F, Fut>(&self, what: &str, step: F) -> Result<T, StoreError>
    where
        F: Fn(Conn) -> Fut,
        Fut: Future<Output = redis::RedisResult<T>>,
    {
        let attempts = async {
            match step(self.inner.conn.clone()).await {
                // A reply that timed out is not a broken connection: the step may still run,
                // and sending it again would only double the load on a slow Redis.
                Err(err)
                    if !err.is_timeout()
                        && (err.is_io_error()
                            || err.is_connection_refusal()
                            || err.is_connection_dropped()) =>
                {
                    tracing::debug!(error = %err, "idempotency store: {what} met a broken connection; sending it again");
                    step(self.inner.conn.clone()).await
                }
                result => result,
            }
        };
        bounded(self.inner.call_timeout, attempts)
            .await
            .inspect_err(|err| {
                tracing::debug!(error = %err, "idempotency store: {what} failed");
            })
    }

    /// What holds `key` and for how long, in one round trip.
    async fn read_with_ttl(
        &self,
        key: &StoreKey,
    ) -> Result<(Option<Holder>, Option<Duration>), StoreError> {
        let redis_key = self.redis_key(key);
        let (value, pttl): (Option<Vec<u8>>, i64) = self
            .invoke("read", &self.inner.read, &[&redis_key], |_| {})
            .await?;
        let ttl = u64::try_from(pttl).ok().map(Duration::from_millis);
        match value {
            None => Ok((None, None)),
            Some(value) => Ok((Some(self.decode(key, value)?.into_holder()?), ttl)),
        }
    }

    fn decode(&self, key: &StoreKey, value: Vec<u8>) -> Result<Stored, StoreError> {
        Stored::decode(Bytes::from(value)).inspect_err(|err| {
            tracing::error!(key = %self.redis_key(key), error = %err, "idempotency store: a stored value does not decode");
        })
    }

    fn corrupt_in_script(&self, key: &StoreKey) -> StoreError {
        let err =
            StoreError::Corrupt("the stored value's header is not one this store writes".into());
        tracing::error!(key = %self.redis_key(key), error = %err, "idempotency store: a stored value does not decode");
        err
    }
}

/// `pause`, give or take up to 25%, so that waiters in many processes do not poll in step.
fn jittered(pause: Duration) -> Duration {
    let spread = (pause.as_micros() / 2).max(1) as u64;
    let offset = (uuid::Uuid::new_v4().as_u128() as u64) % spread;
    pause - pause / 4 + Duration::from_micros(offset)
}

/// `url`, refused by the Redis client with `err`, and what it should look like.
fn unusable_url(url: &str, err: RedisError) -> StoreError {
    let hint = if url.starts_with("rediss://") && err.kind() == ErrorKind::InvalidClientConfig {
        "TLS needs one of the redis crate's TLS features, turned on in your own Cargo.toml \
         (such as tokio-rustls-comp with tls-rustls-webpki-roots)"
    } else {
        "expected redis://[[USER]:PASSWORD@]HOST[:PORT][/DB], rediss://... for TLS, or \
         redis+unix:///PATH"
    };
    StoreError::backend(format!("{err}; {hint}"))
}

/// Waits for `fut` up to `limit`, turning Redis errors into store errors.
async fn bounded<T>(
    limit: Duration,
    fut: impl Future<Output = redis::RedisResult<T>>,
) -> Result<T, StoreError> {
    let started = Instant::now();
    match tokio::time::timeout(limit, fut).await {
        Err(_) => Err(StoreError::Timeout(limit)),
        // The connection's own response timeout: say how long it waited.
        Ok(Err(err)) if err.is_timeout() => Err(StoreError::Timeout(Duration::from_millis(
            started.elapsed().as_millis() as u64,
        ))),
        Ok(Err(err)) => Err(StoreError::backend(err)),
        Ok(Ok(value)) => Ok(value),
    }
}

/// A value as this store writes it.
struct Stored {
    state: u8,
    token: FencingToken,
    fingerprint: Fingerprint,
    /// The encoded record, for a completed key.
    record: Bytes,
}

impl Stored {
    fn in_flight(token: FencingToken, fingerprint: &Fingerprint) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER_LEN);
        put_header(&mut buf, STATE_IN_FLIGHT, token, fingerprint);
        buf.freeze()
    }

    fn completed(token: FencingToken, record: &Record) -> Bytes {
        let mut buf = BytesMut::with_capacity(HEADER_LEN + record.encoded_len());
        put_header(&mut buf, STATE_COMPLETED, token, &record.fingerprint);
        record.encode_into(&mut buf);
        buf.freeze()
    }

    fn decode(value: Bytes) -> Result<Self, StoreError> {
        if value.len() < HEADER_LEN {
            return Err(StoreError::Corrupt(format!(
                "a {}-byte value is shorter than its header",
                value.len()
            )));
        }
        if value[0] != VALUE_VERSION {
            return Err(StoreError::Corrupt(format!(
                "unknown value version {}",
                value[0]
            )));
        }
        let state = value[1];
        let token = FencingToken::from_u128(u128::from_be_bytes(
            value[2..18].try_into().expect("16 bytes"),
        ));
        let fingerprint = Fingerprint::from_bytes(value[18..50].try_into().expect("32 bytes"));
        match state {
            STATE_IN_FLIGHT if value.len() == HEADER_LEN => {}
            STATE_IN_FLIGHT => {
                return Err(StoreError::Corrupt(
                    "an in-flight value carries a record".into(),
                ));
            }
            STATE_COMPLETED => {}
            other => return Err(StoreError::Corrupt(format!("unknown state {other}"))),
        }
        Ok(Self {
            state,
            token,
            fingerprint,
            record: value.slice(HEADER_LEN..),
        })
    }

    fn into_holder(self) -> Result<Holder, StoreError> {
        Ok(if self.state == STATE_IN_FLIGHT {
            Holder::InFlight {
                fingerprint: self.fingerprint,
            }
        } else {
            Holder::Completed(Record::decode(self.record)?)
        })
    }
}

fn put_header(buf: &mut BytesMut, state: u8, token: FencingToken, fingerprint: &Fingerprint) {
    buf.put_u8(VALUE_VERSION);
    buf.put_u8(state);
    buf.put_u128(token.as_u128());
    buf.put_slice(fingerprint.as_bytes());
}

fn token_arg(token: FencingToken) -> [u8; 16] {
    token.as_u128().to_be_bytes()
}

/// A key the connect check runs the steps on, the slot it is in (on a cluster), and the node
/// that serves it, for messages (` host:port`, or nothing).
struct CheckTarget {
    key: StoreKey,
    slot: Option<u16>,
    node: String,
}

/// The cluster slot of the Redis key that holds `key`: CRC16 (XMODEM) of its hash tag, the
/// hex digest, as Redis Cluster computes it.
fn key_slot(key: &StoreKey) -> u16 {
    slot_of_tag(key.to_hex().as_bytes())
}

fn slot_of_tag(tag: &[u8]) -> u16 {
    crc16::State::<crc16::XMODEM>::calculate(tag) % 16384
}

/// The sharded pub/sub channel of the Redis key `redis_key`: in the key's cluster slot, since the
/// key's hash tag is in it.
fn channel_of(redis_key: &str) -> String {
    format!("{redis_key}:done")
}

/// A claim sent to Redis and not yet answered; dropped so, it gives the claim back.
struct Unanswered<'a> {
    store: &'a RedisStore,
    key: StoreKey,
    token: FencingToken,
    lease: Duration,
    answered: bool,
}

impl Drop for Unanswered<'_> {
    fn drop(&mut self) {
        if !self.answered {
            self.store.give_back(self.key, self.token, self.lease);
        }
    }
}

fn millis(d: Duration) -> u64 {
    // Cut to a century: Redis refuses an expiry past the end of its clock.
    u64::try_from(d.min(clock::FOREVER).as_millis())
        .unwrap_or(u64::MAX)
        .max(1)
}

#[async_trait]
impl KeyStore for RedisStore {
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError> {
        let token = FencingToken::random();
        let cmd = Cmd::set_options(
            self.redis_key(key),
            &Stored::in_flight(token, fingerprint)[..],
            SetOptions::default()
                .conditional_set(ExistenceCheck::NX)
                .with_expiration(SetExpiry::PX(millis(lease)))
                .get(true),
        );
        // Until its answer comes, the claim may yet run (a stalled Redis runs what it was sent
        // once it goes on), or may have run already (a connection cut after the claim went
        // out), and nobody would give it back: the key would stay claimed for its lease. So a
        // claim that got no answer, whether its reply timed out, its connection broke, or its
        // caller stopped waiting for it, is given back. Releasing is token-checked: where the
        // claim never ran, it changes nothing. An error Redis answered with (OOM, READONLY and
        // the like) says that the claim did not run, and giving it back would only add to the
        // load of a Redis already in trouble; but only of a claim sent once. A claim sent
        // again after a broken connection may have run the first time, and a cluster's client
        // sends commands again on its own, unseen.
        let mut unanswered = Unanswered {
            store: self,
            key: *key,
            token,
            lease,
            answered: false,
        };
        let sends = AtomicU32::new(0);
        let result: Result<Option<Vec<u8>>, StoreError> = self
            .call("claim", |mut conn| {
                sends.fetch_add(1, Ordering::Relaxed);
                let cmd = &cmd;
                async move { cmd.query_async(&mut conn).await }
            })
            .await;
        let sent_once = sends.load(Ordering::Relaxed) == 1 && !self.is_cluster();
        unanswered.answered = match &result {
            Ok(_) => true,
            Err(StoreError::Backend(err)) => {
                sent_once
                    && err
                        .downcast_ref::<redis::RedisError>()
                        .is_some_and(|err| err.code().is_some())
            }
            Err(_) => false,
        };
        let Some(previous) = result? else {
            return Ok(Claim::Claimed(token));
        };
        let stored = self.decode(key, previous)?;
        if stored.token == token && stored.state == STATE_IN_FLIGHT {
            // Our own claim, answered to a re-sent command.
            return Ok(Claim::Claimed(token));
        }
        Ok(Claim::Held(stored.into_holder()?))
    }

    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: &Record,
        retention: Duration,
    ) -> Result<Completion, StoreError> {
        let value = Stored::completed(token, record);
        let redis_key = self.redis_key(key);
        let channel = channel_of(&redis_key);
        let args = |cmd: &mut Cmd| {
            cmd.arg(&token_arg(token)[..])
                .arg(&value[..])
                .arg(millis(retention))
                .arg(&channel);
        };
        let script = &self.inner.complete;
        Ok(
            if self
                .owned_step("complete", key, script, &[&redis_key], args)
                .await?
            {
                Completion::Stored
            } else {
                Completion::Fenced
            },
        )
    }

    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        let channel = channel_of(&redis_key);
        let args = |cmd: &mut Cmd| {
            cmd.arg(&token_arg(token)[..]).arg(&channel);
        };
        let script = &self.inner.release;
        self.owned_step("release", key, script, &[&redis_key], args)
            .await
    }

    async fn extend(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError> {
        let redis_key = self.redis_key(key);
        let args = |cmd: &mut Cmd| {
            cmd.arg(&token_arg(token)[..]).arg(millis(lease));
        };
        let script = &self.inner.extend;
        self.owned_step("extend", key, script, &[&redis_key], args)
            .await
    }

    async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError> {
        let cmd = Cmd::get(self.redis_key(key));
        let value: Option<Vec<u8>> = self.query("read", &cmd).await?;
        value
            .map(|v| self.decode(key, v)?.into_holder())
            .transpose()
    }

    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<Option<Holder>, StoreError> {
        let deadline = clock::after(Instant::now(), timeout);
        // Subscribe first, then read, so that a completion in between is not missed.
        let watch = self
            .inner
            .subscriptions
            .watch(
                self.channel(key).into_bytes(),
                self.inner.call_timeout.min(timeout),
            )
            .await;
        // The last answer that the key is in flight: what a wait that cannot read the key
        // any more ends with at its deadline; and the last failed read's error.
        let mut in_flight = None;
        let mut failed = None;
        let mut pause = self.inner.poll_interval;
        loop {
            let notified = watch.notify.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();
            let read = self.read_with_ttl(key);
            // The first look runs its course, however short the wait: the service bounds the
            // wait from outside. A later one that hangs past the deadline ends the wait there,
            // with what the look before it said.
            let read = match (&in_flight, failed.take()) {
                (None, None) => read.await,
                (Some(_), _) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(read) => read,
                    Err(_) => return Ok(in_flight),
                },
                (None, Some(err)) => match tokio::time::timeout_at(deadline, read).await {
                    Ok(read) => read,
                    Err(_) => return Err(err),
                },
            };
            let now = Instant::now();
            let ttl = match read {
                Ok((holder @ Some(Holder::InFlight { .. }), ttl)) => {
                    in_flight = holder;
                    ttl
                }
                Ok((holder, _)) => return Ok(holder),
                Err(err @ StoreError::Corrupt(_)) => return Err(err),
                // Never seen, past the deadline: the store could not say.
                Err(err) if now >= deadline && in_flight.is_none() => return Err(err),
                // A key in flight is waited on through a store that fails for a while: the
                // deadline ends the wait, not one failed read.
                Err(err) => {
                    tracing::debug!(error = %err, "idempotency store: a waiter could not read its key; looking again");
                    failed = Some(err);
                    None
                }
            };
            if now >= deadline {
                // Seen in flight, as the arms above leave it.
                return Ok(in_flight);
            }
            // Polling is the fallback for a notification that does not come. While the key's
            // channel is listened to, none is lost (one lost with the connection wakes every
            // waiter once the subscriptions are renewed), so the pause doubles after each
            // look, up to `MAX_POLL_BACKOFF` intervals.
            if !watch.listening() {
                pause = self.inner.poll_interval;
            }
            let mut wake_at = (now + jittered(pause)).min(deadline);
            if let Some(ttl) = ttl {
                // Look again the moment the lease lapses (Redis drops the key then).
                wake_at = wake_at.min(now + ttl + Duration::from_millis(2));
            }
            pause = (pause * 2).min(self.inner.poll_interval * MAX_POLL_BACKOFF);
            let _ = tokio::time::timeout_at(wake_at, notified).await;
        }
    }
}

/// The local waiters of every channel this store is subscribed to.
struct Subscriptions {
    channels: Mutex<HashMap<Vec<u8>, Channel>>,
    /// Subscribe and unsubscribe requests, in the order the map changed, for the subscriber task.
    requests: mpsc::UnboundedSender<Request>,
    /// Set when the subscriber connection may have lost its subscriptions.
    stale: AtomicBool,
    /// Wakes the subscriber task to check its connection now.
    check_now: Notify,
    /// Failed subscriptions are tried again every watchdog interval, and warned of once a minute.
    failing: clock::OncePerMinute,
    /// Channels the server dropped while waited on (their slot moved, or failed over). The
    /// store subscribes again through the map of the slots it has, which may send the
    /// subscription to the demoted node, now a replica that takes it; the cluster client
    /// renews it on the new master once its map is refreshed. Leaving such a channel goes to
    /// every node.
    moved: Mutex<std::collections::HashSet<Vec<u8>>>,
}

struct Channel {
    waiters: usize,
    notify: Arc<Notify>,
    /// `true` once the first subscribe attempt for the channel is over.
    subscribed: watch::Sender<bool>,
}

enum Request {
    /// Subscribe to a channel for the waiters of one entry of the map, named by its `notify`:
    /// the reply marks that entry subscribed, not one made for the channel since.
    Subscribe(Vec<u8>, Arc<Notify>),
    Unsubscribe(Vec<u8>),
}

impl Subscriptions {
    /// The waiters' map, and the requests it makes for the subscriber task to carry out.
    fn new() -> (Arc<Self>, mpsc::UnboundedReceiver<Request>) {
        let (requests, rx) = mpsc::unbounded_channel();
        let subscriptions = Arc::new(Self {
            channels: Mutex::default(),
            requests,
            stale: AtomicBool::new(false),
            check_now: Notify::new(),
            failing: clock::OncePerMinute::new(),
            moved: Mutex::default(),
        });
        (subscriptions, rx)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<Vec<u8>, Channel>> {
        // Every critical section leaves the map consistent, so a poisoned lock is used as is.
        self.channels
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Joins the waiters of `channel`, subscribing to it if this is the first, and waits (up to
    /// `limit`) for the subscription to be in place. A failed subscription leaves the waiter to
    /// polling.
    async fn watch(self: &Arc<Self>, channel: Vec<u8>, limit: Duration) -> Watch {
        let (notify, subscribed) = {
            let mut channels = self.lock();
            let entry = channels.entry(channel.clone()).or_insert_with(|| {
                let notify = Arc::<Notify>::default();
                let _ = self
                    .requests
                    .send(Request::Subscribe(channel.clone(), notify.clone()));
                Channel {
                    waiters: 0,
                    notify,
                    subscribed: watch::Sender::new(false),
                }
            });
            entry.waiters += 1;
            (entry.notify.clone(), entry.subscribed.subscribe())
        };
        // Made before the wait: a waiter dropped during it leaves the channel as it goes.
        let mut watch = Watch {
            subscriptions: self.clone(),
            channel,
            notify,
            subscribed,
        };
        let _ = tokio::time::timeout(limit, watch.subscribed.wait_for(|done| *done)).await;
        watch
    }

    fn wake(&self, channel: &[u8]) {
        if let Some(entry) = self.lock().get(channel) {
            entry.notify.notify_waiters();
        }
    }

    fn wake_all(&self) {
        for entry in self.lock().values() {
            entry.notify.notify_waiters();
        }
    }

    /// Marks the entry of `channel` that `for_entry` names subscribed. An entry made for the
    /// channel after that one left (its subscription is still to come, behind an unsubscribe)
    /// is left as it is.
    fn mark_subscribed(&self, channel: &[u8], for_entry: &Arc<Notify>) {
        if let Some(entry) = self.lock().get(channel)
            && Arc::ptr_eq(&entry.notify, for_entry)
        {
            entry.subscribed.send_replace(true);
        }
    }

    /// The server says it subscribed to `channel`: one that no waiter listens to any more is
    /// left again.
    fn subscribed_to(&self, channel: &[u8]) {
        if !self.lock().contains_key(channel) {
            let _ = self.requests.send(Request::Unsubscribe(channel.to_vec()));
        }
    }

    /// The server dropped its subscription to `channel` by itself (a cluster does when the
    /// channel's slot moves to another node): if waiters still listen on it, subscribe again,
    /// and have them look at their keys now, in case a notification was missed meanwhile.
    fn dropped(&self, channel: &[u8]) {
        if let Some(entry) = self.lock().get(channel) {
            self.moved
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .insert(channel.to_vec());
            // Until it is subscribed again, its waiters poll at the interval.
            entry.subscribed.send_replace(false);
            let _ = self
                .requests
                .send(Request::Subscribe(channel.to_vec(), entry.notify.clone()));
            entry.notify.notify_waiters();
        }
    }
}

/// One waiter's membership of a channel; leaving the last one unsubscribes.
struct Watch {
    subscriptions: Arc<Subscriptions>,
    channel: Vec<u8>,
    notify: Arc<Notify>,
    subscribed: watch::Receiver<bool>,
}

impl Watch {
    /// Whether the channel's notifications reach this store: its subscription is in place,
    /// over a connection not lost since.
    fn listening(&self) -> bool {
        *self.subscribed.borrow() && !self.subscriptions.stale.load(Ordering::SeqCst)
    }
}

impl Drop for Watch {
    fn drop(&mut self) {
        let mut channels = self.subscriptions.lock();
        if let Some(entry) = channels.get_mut(&self.channel) {
            entry.waiters -= 1;
            if entry.waiters == 0 {
                channels.remove(&self.channel);
                let _ = self
                    .subscriptions
                    .requests
                    .send(Request::Unsubscribe(std::mem::take(&mut self.channel)));
            }
        }
    }
}

/// Hands each notification straight to the channel's waiters, on the connection's own task.
fn push_handler(
    subscriptions: &Arc<Subscriptions>,
) -> impl Fn(PushInfo) -> Result<(), ()> + Send + Sync + 'static {
    let subscriptions: Weak<Subscriptions> = Arc::downgrade(subscriptions);
    move |push: PushInfo| {
        let Some(subscriptions) = subscriptions.upgrade() else {
            return Ok(());
        };
        match push.kind {
            PushKind::SMessage | PushKind::Message => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    subscriptions.wake(channel);
                }
            }
            // Also the echo of the store's own unsubscribe, when the channel has left the map.
            PushKind::SUnsubscribe | PushKind::Unsubscribe => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    subscriptions.dropped(channel);
                }
            }
            // Also a subscription the cluster client renewed by itself after a reconnect: it
            // keeps those whose unsubscribe never got its reply (it timed out), and would keep
            // a channel nobody listens to subscribed for good.
            PushKind::SSubscribe | PushKind::Subscribe => {
                if let Some(Value::BulkString(channel)) = push.data.first() {
                    subscriptions.subscribed_to(channel);
                }
            }
            PushKind::Disconnection => {
                subscriptions.stale.store(true, Ordering::SeqCst);
                subscriptions.check_now.notify_one();
            }
            _ => {}
        }
        Ok(())
    }
}

/// Requests taken from the queue at once, sent as one batch.
const BATCH: usize = 512;

/// Owns the subscriber connection: subscribes and unsubscribes in order, pings it as a
/// watchdog, and renews every subscription after it reconnected.
///
/// Requests waiting in the queue go out together: each channel's last request is the one that
/// counts, and the commands for distinct channels are sent at once on the multiplexed
/// connection, so a thousand new waiters cost a few round trips rather than a thousand.
async fn run_subscriber(
    mut conn: Conn,
    subscriptions: Arc<Subscriptions>,
    mut requests: mpsc::UnboundedReceiver<Request>,
    every: Duration,
    limit: Duration,
) {
    let mut ticker = tokio::time::interval(every);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut batch = Vec::with_capacity(BATCH);
    loop {
        tokio::select! {
            taken = requests.recv_many(&mut batch, BATCH) => {
                if taken == 0 {
                    return;
                }
                carry_out(&conn, &subscriptions, batch.drain(..), limit).await;
            }
            _ = ticker.tick() => check_subscriber(&mut conn, &subscriptions, limit).await,
            () = subscriptions.check_now.notified() => check_subscriber(&mut conn, &subscriptions, limit).await,
        }
    }
}

/// What a batch of requests comes to, channel by channel in the order first asked for: its
/// last request, a subscription (for the map entries named since its last unsubscribe, which
/// the reply marks subscribed) or an unsubscription (`None`).
type Batch = Vec<(Vec<u8>, Option<Vec<Arc<Notify>>>)>;

fn last_per_channel(requests: impl Iterator<Item = Request>) -> Batch {
    let mut last: Batch = Vec::new();
    let mut position: HashMap<Vec<u8>, usize> = HashMap::new();
    for request in requests {
        let (channel, entry) = match request {
            Request::Subscribe(channel, entry) => (channel, Some(entry)),
            Request::Unsubscribe(channel) => (channel, None),
        };
        let at = *position.entry(channel.clone()).or_insert_with(|| {
            last.push((channel, None));
            last.len() - 1
        });
        let wanted = &mut last[at].1;
        match entry {
            Some(entry) => wanted.get_or_insert_with(Vec::new).push(entry),
            None => *wanted = None,
        }
    }
    last
}

/// Carries out a batch of requests: for each channel, the last of its requests, all channels
/// at once.
async fn carry_out(
    conn: &Conn,
    subscriptions: &Subscriptions,
    batch: impl Iterator<Item = Request>,
    limit: Duration,
) {
    let last = last_per_channel(batch);
    let sent = send_all(
        conn,
        last.iter().map(|(channel, entries)| {
            let command = if entries.is_some() {
                "SSUBSCRIBE"
            } else {
                "SUNSUBSCRIBE"
            };
            channel_command(command, channel)
        }),
        limit,
    )
    .await;
    for ((channel, entries), result) in last.iter().zip(sent) {
        // A failed unsubscribe leaves a subscription nobody listens to; it dies with the
        // connection.
        let Some(entries) = entries else {
            let moved = subscriptions
                .moved
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
                .remove(channel);
            if let (true, Conn::Cluster(conn)) = (moved, conn) {
                leave_everywhere(conn, channel, limit).await;
            }
            continue;
        };
        if let Err(err) = result {
            if subscriptions.failing.now() {
                tracing::warn!(error = %err, "idempotency store: subscribing failed; waiters poll until it is renewed");
            } else {
                tracing::debug!(error = %err, "idempotency store: subscribing failed again");
            }
            subscriptions.stale.store(true, Ordering::SeqCst);
        }
        for entry in entries {
            subscriptions.mark_subscribed(channel, entry);
        }
    }
}

/// The address of a node in an entry of `CLUSTER SLOTS`: `[host, port, id, ...]`.
fn node_address(node: &Value) -> Option<(String, u16)> {
    let node = redis::from_redis_value_ref::<Vec<Value>>(node).ok()?;
    let [host, port, ..] = &node[..] else {
        return None;
    };
    Some((
        redis::from_redis_value_ref(host).ok()?,
        redis::from_redis_value_ref(port).ok()?,
    ))
}

/// Unsubscribes from `channel` on every node of the cluster, replicas included, each by its
/// address, so on the connection to it that holds the subscription.
async fn leave_everywhere(conn: &ClusterConnection, channel: &[u8], limit: Duration) {
    let mut conn = conn.clone();
    let mut cmd = redis::cmd("CLUSTER");
    cmd.arg("SLOTS");
    // Each entry: first slot, last slot, then every node serving them (address, port, id).
    let Ok(Ok(slots)) =
        tokio::time::timeout(limit, cmd.query_async::<Vec<Vec<Value>>>(&mut conn)).await
    else {
        return;
    };
    let mut nodes: Vec<(String, u16)> = slots
        .iter()
        .flat_map(|entry| entry.iter().skip(2))
        .filter_map(node_address)
        .collect();
    nodes.sort_unstable();
    nodes.dedup();
    for (host, port) in nodes {
        let to = RoutingInfo::SingleNode(SingleNodeRoutingInfo::ByAddress { host, port });
        let left = conn.route_command(channel_command("SUNSUBSCRIBE", channel), to);
        if let Err(err) = bounded(limit, left).await {
            tracing::debug!(error = %err, "idempotency store: leaving a moved channel on one node failed");
        }
    }
}

/// `command` (a sharded subscribe or unsubscribe) for one channel.
fn channel_command(command: &str, channel: &[u8]) -> Cmd {
    let mut cmd = redis::cmd(command);
    cmd.arg(channel);
    cmd
}

/// Sends `commands` at once on the multiplexed connection, each bounded by `limit`, and gives
/// their results in the same order.
async fn send_all(
    conn: &Conn,
    commands: impl Iterator<Item = Cmd>,
    limit: Duration,
) -> Vec<Result<(), StoreError>> {
    futures_util::future::join_all(commands.map(|cmd| {
        let mut conn = conn.clone();
        async move { bounded(limit, cmd.exec_async(&mut conn)).await }
    }))
    .await
}

async fn check_subscriber(conn: &mut Conn, subscriptions: &Subscriptions, limit: Duration) {
    // An idle subscribed connection only notices a Redis restart when it sends something.
    if let Err(err) = bounded(limit, redis::cmd("PING").exec_async(conn)).await {
        tracing::debug!(error = %err, "idempotency store: the subscriber connection is down");
        subscriptions.stale.store(true, Ordering::SeqCst);
        return;
    }
    if !subscriptions.stale.swap(false, Ordering::SeqCst) {
        return;
    }
    let channels: Vec<Vec<u8>> = subscriptions.lock().keys().cloned().collect();
    for chunk in channels.chunks(BATCH) {
        let renewed = send_all(
            conn,
            chunk
                .iter()
                .map(|channel| channel_command("SSUBSCRIBE", channel)),
            limit,
        )
        .await;
        if let Some(Err(err)) = renewed.into_iter().find(Result::is_err) {
            tracing::debug!(error = %err, "idempotency store: renewing a subscription failed");
            subscriptions.stale.store(true, Ordering::SeqCst);
            return;
        }
    }
    if !channels.is_empty() {
        tracing::info!(
            channels = channels.len(),
            "idempotency store: subscriptions renewed after a reconnect"
        );
    }
    // Notifications sent while the connection was down are lost: every waiter looks again.
    subscriptions.wake_all();
}

/// A connection to a single server or to a cluster.
#[derive(Clone)]
enum Conn {
    Standalone(ConnectionManager),
    Cluster(ClusterConnection),
}

impl ConnectionLike for Conn {
    fn req_packed_command<'a>(&'a mut self, cmd: &'a Cmd) -> RedisFuture<'a, Value> {
        match self {
            Conn::Standalone(conn) => conn.req_packed_command(cmd),
            Conn::Cluster(conn) => conn.req_packed_command(cmd),
        }
    }

    fn req_packed_commands<'a>(
        &'a mut self,
        cmd: &'a redis::Pipeline,
        offset: usize,
        count: usize,
    ) -> RedisFuture<'a, Vec<Value>> {
        match self {
            Conn::Standalone(conn) => conn.req_packed_commands(cmd, offset, count),
            Conn::Cluster(conn) => conn.req_packed_commands(cmd, offset, count),
        }
    }

    fn get_db(&self) -> i64 {
        match self {
            Conn::Standalone(conn) => conn.get_db(),
            Conn::Cluster(conn) => conn.get_db(),
        }
    }
}

#[cfg(test)]
mod tests {
    use http::StatusCode;

    use super::*;

    #[test]
    fn slots_are_computed_as_redis_cluster_computes_them() {
        // The example of the Redis Cluster specification: CRC16 of "123456789" is 0x31C3.
        assert_eq!(slot_of_tag(b"123456789"), 0x31C3);
        // `CLUSTER KEYSLOT` of these keys, read from a Redis 7.0 server.
        assert_eq!(slot_of_tag(b"foo"), 12182);
        assert_eq!(slot_of_tag(b"user1000"), 3443);
    }

    #[tokio::test]
    async fn a_subscription_reply_marks_only_the_entry_it_was_made_for() {
        let (subscriptions, mut requests) = Subscriptions::new();
        let channel = b"idem:{ab}:done".to_vec();
        // A waiter comes and goes before its subscription is made; another comes after.
        drop(subscriptions.watch(channel.clone(), Duration::ZERO).await);
        let second = subscriptions.watch(channel.clone(), Duration::ZERO).await;
        let Some(Request::Subscribe(_, for_first)) = requests.recv().await else {
            panic!("the first waiter's subscription was not asked for")
        };
        assert!(matches!(
            requests.recv().await,
            Some(Request::Unsubscribe(_))
        ));
        let Some(Request::Subscribe(_, for_second)) = requests.recv().await else {
            panic!("the second waiter's subscription was not asked for")
        };
        let subscribed =
            |subscriptions: &Subscriptions| *subscriptions.lock()[&channel].subscribed.borrow();
        // The first subscription's reply (it comes before the unsubscribe's) does not count
        // for the second waiter, whose own subscription is still to come.
        subscriptions.mark_subscribed(&channel, &for_first);
        assert!(!subscribed(&subscriptions));
        subscriptions.mark_subscribed(&channel, &for_second);
        assert!(subscribed(&subscriptions));
        drop(second);
    }

    #[test]
    fn a_batch_comes_to_the_last_request_of_each_channel() {
        let (a, b, c) = (b"a".to_vec(), b"b".to_vec(), b"c".to_vec());
        let entries: Vec<Arc<Notify>> = (0..4).map(|_| Arc::default()).collect();
        let batch = last_per_channel(
            [
                Request::Subscribe(a.clone(), entries[0].clone()),
                Request::Subscribe(b.clone(), entries[1].clone()),
                Request::Unsubscribe(a.clone()),
                Request::Unsubscribe(c.clone()),
                Request::Subscribe(a.clone(), entries[2].clone()),
                Request::Unsubscribe(b.clone()),
                Request::Subscribe(a.clone(), entries[3].clone()),
            ]
            .into_iter(),
        );
        let named = |wanted: &Option<Vec<Arc<Notify>>>| {
            wanted.as_ref().map(|list| {
                list.iter()
                    .map(|entry| entries.iter().position(|e| Arc::ptr_eq(e, entry)).unwrap())
                    .collect::<Vec<_>>()
            })
        };
        let seen: Vec<_> = batch
            .iter()
            .map(|(ch, wanted)| (ch.clone(), named(wanted)))
            .collect();
        assert_eq!(
            seen,
            vec![(a, Some(vec![2, 3])), (b, None), (c, None)],
            "a: subscribed for the entries made after its unsubscribe; b and c: unsubscribed"
        );
    }

    #[tokio::test]
    async fn a_subscription_the_server_dropped_is_made_again_while_waiters_listen() {
        let (subscriptions, mut requests) = Subscriptions::new();
        let handler = push_handler(&subscriptions);
        let channel = b"idem:{cd}:done".to_vec();
        let dropped = || PushInfo {
            kind: PushKind::SUnsubscribe,
            data: vec![Value::BulkString(channel.clone()), Value::Int(0)],
        };
        let watch = subscriptions.watch(channel.clone(), Duration::ZERO).await;
        let Ok(Request::Subscribe(_, entry)) = requests.try_recv() else {
            panic!("the first waiter subscribes")
        };
        subscriptions.mark_subscribed(&channel, &entry);
        assert!(watch.listening());
        let notify = watch.notify.clone();
        let notified = notify.notified();
        tokio::pin!(notified);
        notified.as_mut().enable();

        // The server drops the subscription (a cluster moved the channel's slot).
        handler(dropped()).unwrap();
        assert!(
            matches!(requests.try_recv(), Ok(Request::Subscribe(again, _)) if again == channel),
            "the subscription is made again"
        );
        assert!(
            tokio::time::timeout(Duration::from_millis(10), notified)
                .await
                .is_ok(),
            "the waiters look at their keys again"
        );
        assert!(!watch.listening(), "and poll until it is made");
        subscriptions.mark_subscribed(&channel, &entry);
        assert!(watch.listening());

        // Once the last waiter left, the echo of its own unsubscribe subscribes nothing.
        drop(watch);
        assert!(matches!(requests.try_recv(), Ok(Request::Unsubscribe(_))));
        handler(dropped()).unwrap();
        assert!(requests.try_recv().is_err());

        // A subscription made again with no waiter left (the cluster client renews those
        // whose unsubscribe timed out) is left again; one a waiter listens on is kept.
        let renewed = || PushInfo {
            kind: PushKind::SSubscribe,
            data: vec![Value::BulkString(channel.clone()), Value::Int(1)],
        };
        handler(renewed()).unwrap();
        assert!(
            matches!(requests.try_recv(), Ok(Request::Unsubscribe(left)) if left == channel),
            "a channel nobody listens on is left"
        );
        let watch = subscriptions.watch(channel.clone(), Duration::ZERO).await;
        assert!(matches!(requests.try_recv(), Ok(Request::Subscribe(..))));
        handler(renewed()).unwrap();
        assert!(
            requests.try_recv().is_err(),
            "a channel listened on is kept"
        );
        drop(watch);
    }

    #[test]
    fn values_round_trip_and_garbage_is_corrupt() {
        let token = FencingToken::random();
        let fp = Fingerprint::from_bytes([3; 32]);
        let stored = Stored::decode(Stored::in_flight(token, &fp)).unwrap();
        assert_eq!((stored.state, stored.token), (STATE_IN_FLIGHT, token));
        assert_eq!(
            stored.into_holder().unwrap(),
            Holder::InFlight { fingerprint: fp }
        );

        let record = Record::response(
            fp,
            StatusCode::CREATED,
            Default::default(),
            Bytes::from_static(b"hi"),
            None,
        );
        let stored = Stored::decode(Stored::completed(token, &record)).unwrap();
        assert_eq!(stored.token, token);
        assert_eq!(stored.into_holder().unwrap(), Holder::Completed(record));

        let mut unknown_state = Stored::in_flight(token, &fp).to_vec();
        unknown_state[1] = 7;
        let mut in_flight_with_tail = Stored::in_flight(token, &fp).to_vec();
        in_flight_with_tail.push(0);
        for garbage in [
            b"".to_vec(),
            b"hello".to_vec(),
            vec![9; 60],
            unknown_state,
            in_flight_with_tail,
        ] {
            assert!(matches!(
                Stored::decode(Bytes::from(garbage)),
                Err(StoreError::Corrupt(_))
            ));
        }
        let mut truncated =
            Stored::completed(token, &Record::not_replayable(fp, StatusCode::OK)).to_vec();
        truncated.pop();
        let stored = Stored::decode(Bytes::from(truncated)).unwrap();
        assert!(matches!(stored.into_holder(), Err(StoreError::Corrupt(_))));
    }
}
