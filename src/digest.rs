//! The keyed BLAKE3 digests behind store keys and request fingerprints.

/// Inputs up to this length are hashed in one call from a stack buffer: one BLAKE3 chunk.
const INLINE: usize = 1024;
/// Most keys and requests fit a buffer this small, which is cheaper to clear.
const SMALL: usize = 128;

/// A BLAKE3 key for one purpose, derived from a context string so that digests made for
/// different purposes never coincide.
pub(crate) fn purpose_key(context: &str) -> [u8; 32] {
    blake3::derive_key(context, b"")
}

/// The keyed BLAKE3 digest of the bytes `feed` hands to its sink, in order.
///
/// `feed` runs twice: once to measure the input, once to hash it. A short input is gathered
/// into one buffer and hashed in a single call, which for the few dozen bytes of a typical key
/// or request costs a fraction of a streaming hasher; a long one streams. Both give the same
/// digest, which depends only on the bytes, not on how they were split.
pub(crate) fn keyed_digest(key: &[u8; 32], feed: impl Fn(&mut dyn FnMut(&[u8]))) -> [u8; 32] {
    let mut total = 0;
    feed(&mut |bytes| total += bytes.len());
    if total <= SMALL {
        inline::<SMALL>(key, feed)
    } else if total <= INLINE {
        inline::<INLINE>(key, feed)
    } else {
        let mut hasher = blake3::Hasher::new_keyed(key);
        feed(&mut |bytes| {
            hasher.update(bytes);
        });
        *hasher.finalize().as_bytes()
    }
}

/// [`keyed_digest`] of an input of at most `N` bytes, gathered into a buffer of `N`.
fn inline<const N: usize>(key: &[u8; 32], feed: impl Fn(&mut dyn FnMut(&[u8]))) -> [u8; 32] {
    let mut buf = [0u8; N];
    let mut len = 0;
    feed(&mut |bytes| {
        buf[len..len + bytes.len()].copy_from_slice(bytes);
        len += bytes.len();
    });
    *blake3::keyed_hash(key, &buf[..len]).as_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_and_long_inputs_hash_the_bytes_however_they_are_split() {
        let key = purpose_key("tower-idempotency tests");
        for len in [
            0,
            1,
            63,
            64,
            65,
            SMALL,
            SMALL + 1,
            INLINE - 1,
            INLINE,
            INLINE + 1,
            5 * INLINE + 7,
        ] {
            let data: Vec<u8> = (0..len).map(|i| (i * 7 + 3) as u8).collect();
            let expected = *blake3::keyed_hash(&key, &data).as_bytes();
            let whole = keyed_digest(&key, |sink| sink(&data));
            let split = keyed_digest(&key, |sink| {
                for piece in data.chunks(5) {
                    sink(piece);
                    sink(b"");
                }
            });
            assert_eq!(whole, expected, "{len} bytes in one piece");
            assert_eq!(split, expected, "{len} bytes in pieces");
        }
        assert_ne!(
            keyed_digest(&key, |sink| sink(b"a")),
            keyed_digest(&purpose_key("another purpose"), |sink| sink(b"a")),
            "keys for different purposes give different digests"
        );
    }
}
