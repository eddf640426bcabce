//! Where claims and stored responses live: the [`KeyStore`] trait and its backends.
//!
//! The service talks to a store through six steps: [`claim`](KeyStore::claim) a key (atomically:
//! either the caller now owns it, or it learns what holds it), [`complete`](KeyStore::complete) a
//! claim with a [`Record`] if its [`FencingToken`] still owns it, [`release`](KeyStore::release) a
//! claim, [`extend`](KeyStore::extend) a claim's lease, [`read`](KeyStore::read) a key, and
//! [`wait`](KeyStore::wait) for a key in flight.
//!
//! [`MemoryStore`] keeps everything in this process. With the `redis` feature, `RedisStore`
//! shares keys between processes through Redis, Redis Cluster or Valkey. Any other backend can
//! implement [`KeyStore`]; the `test-util` feature exports the conformance suite that every
//! backend here passes, so a new one can be checked the same way.
//!
//! # Example
//!
//! ```
//! use std::time::Duration;
//! use http::StatusCode;
//! use tower_idempotency::{IdempotencyKey, store::{Claim, Completion, Fingerprint, KeyStore, MemoryStore, Record, StoreKey, Holder}};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), tower_idempotency::store::StoreError> {
//! let store = MemoryStore::new();
//! let key = StoreKey::new(b"tenant-1", &IdempotencyKey::new("order-42").unwrap());
//! let fingerprint = Fingerprint::from_bytes([7; 32]);
//!
//! // The first claim wins; the store hands back a fencing token.
//! let Claim::Claimed(token) = store.claim(&key, &fingerprint, Duration::from_secs(60)).await? else {
//!     unreachable!("nothing holds a new key")
//! };
//! // A second claim learns that the key is in flight.
//! assert!(matches!(
//!     store.claim(&key, &fingerprint, Duration::from_secs(60)).await?,
//!     Claim::Held(Holder::InFlight { .. })
//! ));
//!
//! // Completing stores the response; later claims get it back.
//! let record = Record::response(fingerprint, StatusCode::CREATED, Default::default(), "done".into(), None);
//! assert_eq!(store.complete(&key, token, &record, Duration::from_secs(3600)).await?, Completion::Stored);
//! let Claim::Held(Holder::Completed(stored)) = store.claim(&key, &fingerprint, Duration::from_secs(60)).await? else {
//!     unreachable!()
//! };
//! assert_eq!(stored.body, "done");
//! # Ok(())
//! # }
//! ```

use std::{
    any::Any,
    fmt,
    future::Future,
    pin::Pin,
    sync::{Arc, LazyLock},
    time::Duration,
};

/// The attribute a [`KeyStore`] implementation is written with (see the example there), so that
/// a backend needs no dependency of its own for it.
pub use async_trait::async_trait;

use crate::{IdempotencyKey, digest};

mod memory;
mod record;
#[cfg(feature = "redis")]
mod redis;

#[cfg(any(test, feature = "test-util"))]
#[cfg_attr(docsrs, doc(cfg(feature = "test-util")))]
pub mod conformance;

pub use memory::MemoryStore;
pub use record::Record;
pub(crate) use record::RecordView;
#[cfg(feature = "redis")]
#[cfg_attr(docsrs, doc(cfg(feature = "redis")))]
pub use redis::{RedisStore, RedisStoreBuilder};

/// A boxed error from a store's backend.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// What a store knows of a scoped key: a 32-byte BLAKE3 digest of the scope and the key.
///
/// Stores never see the key itself, so no user-controlled bytes reach a backend's key names,
/// and two scopes can never share an entry.
#[derive(Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct StoreKey([u8; 32]);

impl std::hash::Hash for StoreKey {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The digest is uniformly random already: eight of its bytes make a good hash.
        state.write_u64(u64::from_le_bytes(self.0[..8].try_into().expect("8 bytes")));
    }
}

impl StoreKey {
    /// The store key of `key` in `scope`.
    pub fn new(scope: &[u8], key: &IdempotencyKey) -> Self {
        Self::of(scope, key.as_str().as_bytes())
    }

    pub(crate) fn of(scope: &[u8], key: &[u8]) -> Self {
        static KEY: LazyLock<[u8; 32]> =
            LazyLock::new(|| digest::purpose_key("tower-idempotency 2026 store key"));
        Self(digest::keyed_digest(&KEY, |field| {
            field(&(scope.len() as u64).to_le_bytes());
            field(scope);
            field(key);
        }))
    }

    /// Wraps a digest computed elsewhere, such as one a store read back. Its bytes must be as
    /// evenly spread as a digest's: stores take parts of them as they are, to hash, to pick a
    /// shard, and (the memory store) to tell keys apart by a 128-bit fold.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// The digest as 64 lowercase hexadecimal characters, for backends that name keys with text.
    pub fn to_hex(&self) -> String {
        to_hex(&self.0)
    }
}

impl fmt::Debug for StoreKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StoreKey({})", &self.to_hex()[..16])
    }
}

/// A map keyed by [`StoreKey`], for the in-process tables. A store key is a digest anyone can
/// compute for a key of their choosing, so the table is hashed with a per-process random seed
/// (foldhash): cheap for a key that is already uniformly random, and no client can aim many
/// keys at one bucket.
pub(crate) type KeyMap<V> = std::collections::HashMap<StoreKey, V, foldhash::fast::RandomState>;

/// A digest of what makes two requests "the same": method, path and query, `Content-Type`,
/// chosen headers and body. A key reused with a different fingerprint is answered 422.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct Fingerprint([u8; 32]);

impl Fingerprint {
    /// Wraps a digest.
    pub const fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(bytes)
    }

    /// The digest.
    pub const fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }
}

impl fmt::Debug for Fingerprint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Fingerprint({})", &to_hex(&self.0)[..16])
    }
}

fn to_hex(bytes: &[u8]) -> String {
    const DIGITS: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        s.push(DIGITS[usize::from(b >> 4)] as char);
        s.push(DIGITS[usize::from(b & 0xf)] as char);
    }
    s
}

/// A random token naming one claim. Completing, releasing or extending a claim needs the token
/// it was granted with, so a run whose lease lapsed cannot touch the key that another run now
/// owns.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Debug)]
pub struct FencingToken(u128);

impl FencingToken {
    /// A fresh random token.
    pub fn random() -> Self {
        Self(uuid::Uuid::new_v4().as_u128())
    }

    /// Wraps a token read back from a backend.
    pub const fn from_u128(token: u128) -> Self {
        Self(token)
    }

    /// The token's value.
    pub const fn as_u128(&self) -> u128 {
        self.0
    }
}

/// What holds a key that could not be claimed.
// A record is returned by value once per call; boxing it would cost an allocation per replay.
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub enum Holder {
    /// Another request is running under this key.
    InFlight {
        /// The fingerprint of the request that holds the claim.
        fingerprint: Fingerprint,
    },
    /// A request with this key already completed; here is what it answered.
    Completed(Record),
}

/// The answer to [`KeyStore::claim`].
#[allow(clippy::large_enum_variant)]
#[derive(Clone, Debug, PartialEq)]
pub enum Claim {
    /// The caller owns the key until its lease lapses; use the token to complete, release or
    /// extend the claim.
    Claimed(FencingToken),
    /// Something already holds the key.
    Held(Holder),
}

/// The answer to [`KeyStore::complete`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum Completion {
    /// The record is stored (or was already stored under the same token).
    Stored,
    /// Another run holds the key: its claim, or its record. Nothing was written.
    ///
    /// A token whose claim lapsed (or was released) while nothing else took the key still
    /// stores its record: the run happened, and the record overwrites nothing.
    Fenced,
}

/// A store failure. The service answers it with 503 (or runs the request without idempotency,
/// when configured to fail open); it never panics.
#[derive(Debug)]
#[non_exhaustive]
pub enum StoreError {
    /// The backend failed or could not be reached.
    Backend(BoxError),
    /// The backend did not answer in time.
    Timeout(Duration),
    /// A stored value could not be decoded. It is reported, never replayed.
    Corrupt(String),
}

impl StoreError {
    /// Wraps a backend error.
    pub fn backend(err: impl Into<BoxError>) -> Self {
        Self::Backend(err.into())
    }
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Backend(e) => write!(f, "idempotency store failed: {e}"),
            Self::Timeout(d) => write!(f, "idempotency store did not answer within {d:?}"),
            Self::Corrupt(why) => write!(
                f,
                "idempotency store holds a value that does not decode: {why}"
            ),
        }
    }
}

impl std::error::Error for StoreError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            Self::Backend(e) => Some(&**e),
            _ => None,
        }
    }
}

/// A place to claim keys and keep responses. Object safe: the service holds an
/// `Arc<dyn KeyStore>`.
///
/// Every step must be atomic with respect to every other process sharing the backend, and safe
/// to retry: a claim answered with the caller's own token counts as claimed, and completing twice
/// with the same token stores once. A lapsed lease is the same as no claim: the next
/// [`claim`](Self::claim) takes the key over, and the old token is fenced. A completion that
/// finds nothing holding the key (its lease lapsed, and no other run took the key) stores its
/// record: it overwrites nothing, and refusing it would only make a retry run the operation
/// again.
///
/// # Implementing
///
/// Write the implementation with [`async_trait`](macro@async_trait), as the trait is. With
/// the `test-util` feature, the `key_store_conformance!` macro (`store::conformance`) checks a
/// backend against everything above. A store that counts claims before handing each step to
/// a [`MemoryStore`]:
///
/// ```
/// use std::{sync::atomic::{AtomicU64, Ordering}, time::Duration};
///
/// use tower_idempotency::store::{
///     Claim, Completion, FencingToken, Fingerprint, Holder, KeyStore, MemoryStore, Record,
///     StoreError, StoreKey, async_trait,
/// };
///
/// #[derive(Debug, Default)]
/// struct Counted {
///     claims: AtomicU64,
///     inner: MemoryStore,
/// }
///
/// #[async_trait]
/// impl KeyStore for Counted {
///     async fn claim(&self, key: &StoreKey, fingerprint: &Fingerprint, lease: Duration)
///         -> Result<Claim, StoreError> {
///         self.claims.fetch_add(1, Ordering::Relaxed);
///         self.inner.claim(key, fingerprint, lease).await
///     }
///     async fn complete(&self, key: &StoreKey, token: FencingToken, record: &Record,
///         retention: Duration) -> Result<Completion, StoreError> {
///         self.inner.complete(key, token, record, retention).await
///     }
///     async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError> {
///         self.inner.release(key, token).await
///     }
///     async fn extend(&self, key: &StoreKey, token: FencingToken, lease: Duration)
///         -> Result<bool, StoreError> {
///         self.inner.extend(key, token, lease).await
///     }
///     async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError> {
///         self.inner.read(key).await
///     }
///     async fn wait(&self, key: &StoreKey, timeout: Duration)
///         -> Result<Option<Holder>, StoreError> {
///         self.inner.wait(key, timeout).await
///     }
/// }
///
/// # #[tokio::main(flavor = "current_thread")]
/// # async fn main() -> Result<(), StoreError> {
/// let store = Counted::default();
/// let key = StoreKey::new(b"", &tower_idempotency::IdempotencyKey::new("order-42").unwrap());
/// let claimed = store.claim(&key, &Fingerprint::from_bytes([0; 32]), Duration::from_secs(60)).await?;
/// assert!(matches!(claimed, Claim::Claimed(_)));
/// assert_eq!(store.claims.load(Ordering::Relaxed), 1);
/// # Ok(())
/// # }
/// ```
#[async_trait]
pub trait KeyStore: Any + Send + Sync + fmt::Debug {
    /// Claims `key` for a run of a request with `fingerprint`, for `lease`; or reports what
    /// holds the key.
    async fn claim(
        &self,
        key: &StoreKey,
        fingerprint: &Fingerprint,
        lease: Duration,
    ) -> Result<Claim, StoreError>;

    /// Stores `record` under `key`, kept for `retention`, if `token` still owns the claim or
    /// nothing holds the key; [`Completion::Fenced`] when another claim or record holds it.
    async fn complete(
        &self,
        key: &StoreKey,
        token: FencingToken,
        record: &Record,
        retention: Duration,
    ) -> Result<Completion, StoreError>;

    /// Gives up the claim so the next request can run; `false` when `token` no longer owns it.
    ///
    /// A key that `token` completed is no longer claimed: releasing it must leave its record
    /// as it is and answer `false`. The service may release with a token whose completion
    /// landed while its answer was lost (to a timeout, or a caller that went away).
    async fn release(&self, key: &StoreKey, token: FencingToken) -> Result<bool, StoreError>;

    /// Renews the claim's lease to `lease` from now; `false` when `token` no longer owns it
    /// (a completed key included, whose record it must leave as it is).
    async fn extend(
        &self,
        key: &StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> Result<bool, StoreError>;

    /// What holds `key` now, if anything.
    async fn read(&self, key: &StoreKey) -> Result<Option<Holder>, StoreError>;

    /// Waits, up to `timeout`, until `key` is no longer in flight, and returns what holds it
    /// then: `None` when the claim was released or its lease lapsed (claim it again),
    /// the record when it completed, or [`Holder::InFlight`] when `timeout` passed first.
    async fn wait(&self, key: &StoreKey, timeout: Duration) -> Result<Option<Holder>, StoreError>;
}

/// The future of a [`KeyStore`] method, as `async_trait` makes it.
type StoreFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, StoreError>> + Send + 'a>>;

// Each method hands back the inner store's future as it is, rather than boxing it again.
impl<T: KeyStore + ?Sized> KeyStore for Arc<T> {
    fn claim<'s, 'k, 'f, 'a>(
        &'s self,
        key: &'k StoreKey,
        fingerprint: &'f Fingerprint,
        lease: Duration,
    ) -> StoreFuture<'a, Claim>
    where
        's: 'a,
        'k: 'a,
        'f: 'a,
        Self: 'a,
    {
        (**self).claim(key, fingerprint, lease)
    }

    fn complete<'s, 'k, 'r, 'a>(
        &'s self,
        key: &'k StoreKey,
        token: FencingToken,
        record: &'r Record,
        retention: Duration,
    ) -> StoreFuture<'a, Completion>
    where
        's: 'a,
        'k: 'a,
        'r: 'a,
        Self: 'a,
    {
        (**self).complete(key, token, record, retention)
    }

    fn release<'s, 'k, 'a>(
        &'s self,
        key: &'k StoreKey,
        token: FencingToken,
    ) -> StoreFuture<'a, bool>
    where
        's: 'a,
        'k: 'a,
        Self: 'a,
    {
        (**self).release(key, token)
    }

    fn extend<'s, 'k, 'a>(
        &'s self,
        key: &'k StoreKey,
        token: FencingToken,
        lease: Duration,
    ) -> StoreFuture<'a, bool>
    where
        's: 'a,
        'k: 'a,
        Self: 'a,
    {
        (**self).extend(key, token, lease)
    }

    fn read<'s, 'k, 'a>(&'s self, key: &'k StoreKey) -> StoreFuture<'a, Option<Holder>>
    where
        's: 'a,
        'k: 'a,
        Self: 'a,
    {
        (**self).read(key)
    }

    fn wait<'s, 'k, 'a>(
        &'s self,
        key: &'k StoreKey,
        timeout: Duration,
    ) -> StoreFuture<'a, Option<Holder>>
    where
        's: 'a,
        'k: 'a,
        Self: 'a,
    {
        (**self).wait(key, timeout)
    }
}
