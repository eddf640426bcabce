//! The idempotency key: parsing, validation and the header names.
//!
//! A key is 1 to 255 characters of visible ASCII. On the wire it is either a bare token
//! (`Idempotency-Key: order-42`) or, as the IETF draft "The Idempotency-Key HTTP Header Field"
//! writes it, a structured-field string (`Idempotency-Key: "order-42"`). Both name the same key,
//! and a quoted string may also contain spaces.
//!
//! # Example
//!
//! ```
//! use http::HeaderValue;
//! use tower_idempotency::{IdempotencyKey, InvalidKey};
//!
//! let bare = IdempotencyKey::new("deploy-v1")?;
//! let quoted = IdempotencyKey::from_header_value(&HeaderValue::from_static("\"deploy-v1\""))?;
//! assert_eq!(bare, quoted);
//! assert_eq!(quoted.as_str(), "deploy-v1");
//!
//! // `auto()` gives a fresh UUID v4 each time it is called.
//! let auto = IdempotencyKey::auto();
//! assert_eq!(auto.as_str().len(), 36);
//! assert_ne!(IdempotencyKey::auto(), auto);
//!
//! // `auto` itself is the placeholder that asks for a fresh key, not a key: made once and
//! // reused, it would be one key for every operation. (A server refuses it too.)
//! assert_eq!(IdempotencyKey::new("auto"), Err(InvalidKey::Placeholder));
//!
//! // Bad keys say what is wrong with them.
//! let err = IdempotencyKey::new("").unwrap_err();
//! assert_eq!(err.to_string(), "the idempotency key is empty; send 1 to 255 visible ASCII characters");
//! # Ok::<(), tower_idempotency::InvalidKey>(())
//! ```

use std::{borrow::Cow, fmt, str::FromStr, sync::Arc};

use http::{HeaderMap, HeaderName, HeaderValue};

/// The `Idempotency-Key` request header.
pub const IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");

/// The `Idempotent-Replayed` response header, set to `true` on a replayed response.
pub const IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// The longest key accepted, in characters.
pub const MAX_KEY_LEN: usize = 255;

/// An idempotency key: 1 to 255 characters of visible ASCII (and spaces, which only the quoted
/// form can carry).
///
/// Cloning is cheap. On the client, put one in a request's extensions to have
/// [`IdempotencyLayer`](crate::client::IdempotencyLayer) send it.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IdempotencyKey(Arc<str>);

impl IdempotencyKey {
    /// Checks `key` and wraps it: 1 to 255 characters of visible ASCII or spaces. The value is
    /// taken as it is, not unquoted.
    ///
    /// The value `auto` (in any case) is refused with [`InvalidKey::Placeholder`]. In the SDKs
    /// that use it, it asks for a fresh key on each call; a key made of it here would be one
    /// value, and every operation that reused it would be answered with the first one's
    /// response. Call [`auto()`](Self::auto) for each operation instead (or leave the key to
    /// [`IdempotencyLayer`](crate::client::IdempotencyLayer), which puts a fresh one in place
    /// of a header `auto` on each call).
    pub fn new(key: impl AsRef<str>) -> Result<Self, InvalidKey> {
        let key = key.as_ref();
        if is_auto(key.as_bytes()) {
            return Err(InvalidKey::Placeholder);
        }
        validate(key.as_bytes(), true)?;
        Ok(Self(Arc::from(key)))
    }

    /// A fresh random key, a UUID v4 in its hyphenated form.
    pub fn auto() -> Self {
        let mut buf = uuid::Uuid::encode_buffer();
        let s = uuid::Uuid::new_v4().hyphenated().encode_lower(&mut buf);
        Self(Arc::from(&*s))
    }

    /// The key itself, without quotes.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses one header value, in the bare form or as a structured-field string. Like
    /// [`new`](Self::new), it refuses `auto`, the placeholder for a fresh key.
    pub fn from_header_value(value: &HeaderValue) -> Result<Self, InvalidKey> {
        let key = parse(value)?;
        if is_auto(&key) {
            return Err(InvalidKey::Placeholder);
        }
        Ok(Self(Arc::from(
            std::str::from_utf8(&key).expect("parse admits only ASCII"),
        )))
    }

    /// Reads the key from `headers[name]`: `Ok(None)` when the header is absent, an error when it
    /// is invalid or given more than once.
    pub fn from_headers(
        headers: &HeaderMap,
        name: &HeaderName,
    ) -> Result<Option<Self>, InvalidKey> {
        single_value(headers, name)?
            .map(Self::from_header_value)
            .transpose()
    }

    /// The key as a header value: the bare form, or a quoted string when the key has a space or
    /// starts with a quote.
    pub fn to_header_value(&self) -> HeaderValue {
        if self.0.contains(' ') || self.0.starts_with('"') {
            let mut quoted = String::with_capacity(self.0.len() + 2);
            quoted.push('"');
            for c in self.0.chars() {
                if c == '"' || c == '\\' {
                    quoted.push('\\');
                }
                quoted.push(c);
            }
            quoted.push('"');
            HeaderValue::try_from(quoted).expect("a validated key is a valid header value")
        } else {
            HeaderValue::from_str(&self.0).expect("a validated key is a valid header value")
        }
    }
}

/// Whether a key is the special value `auto`, which asks for a fresh one.
pub(crate) fn is_auto(key: &[u8]) -> bool {
    key.eq_ignore_ascii_case(b"auto")
}

/// The value of `headers[name]`: `None` when the header is absent, an error when it is given
/// more than once.
pub(crate) fn single_value<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
) -> Result<Option<&'h HeaderValue>, InvalidKey> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(InvalidKey::Repeated);
    }
    Ok(first)
}

/// The key a header value holds, in the bare form or as a structured-field string; borrowed
/// from the value unless it had escapes to undo. Its bytes are checked to be visible ASCII (and
/// spaces, when quoted), so they are UTF-8 too; the service hashes them as they are.
pub(crate) fn parse(value: &HeaderValue) -> Result<Cow<'_, [u8]>, InvalidKey> {
    let raw = trim_ows(value.as_bytes());
    let key = match raw {
        [b'"', inner @ ..] => {
            let Some(inner) = inner.strip_suffix(b"\"") else {
                return Err(InvalidKey::UnterminatedQuote);
            };
            let unescaped = unescape(inner)?;
            validate(&unescaped, true)?;
            Cow::Owned(unescaped)
        }
        _ => {
            validate(raw, false)?;
            Cow::Borrowed(raw)
        }
    };
    Ok(key)
}

impl fmt::Debug for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&*self.0, f)
    }
}

impl fmt::Display for IdempotencyKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl FromStr for IdempotencyKey {
    type Err = InvalidKey;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::new(s)
    }
}

impl AsRef<str> for IdempotencyKey {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// Why a key was refused. The message says what a valid key looks like.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum InvalidKey {
    /// The key has no characters.
    Empty,
    /// The key is longer than [`MAX_KEY_LEN`].
    TooLong {
        /// Its length in bytes.
        len: usize,
    },
    /// The key holds a byte that is not visible ASCII (a control character, non-ASCII, or a
    /// space outside a quoted string), or an unescaped quote inside a quoted string.
    InvalidCharacter {
        /// Where it is, counted in bytes from the start of the key.
        position: usize,
    },
    /// A quoted key does not end with its closing quote.
    UnterminatedQuote,
    /// A quoted key has a backslash that escapes neither `"` nor `\`.
    InvalidEscape,
    /// The header was given more than once.
    Repeated,
    /// The key is `auto` (in any case): the placeholder that asks a client library for a fresh
    /// key, where a key belongs. A server that took it as a key would share it among every
    /// client that sent it, and answer each with the first one's response; a client that made
    /// one key of it would send that one key for every operation.
    Placeholder,
}

impl fmt::Display for InvalidKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const HINT: &str = "send 1 to 255 visible ASCII characters";
        match self {
            Self::Empty => write!(f, "the idempotency key is empty; {HINT}"),
            Self::TooLong { len } => write!(
                f,
                "the idempotency key is {len} bytes long, more than {MAX_KEY_LEN}; {HINT}"
            ),
            Self::InvalidCharacter { position } => write!(
                f,
                "the idempotency key has a control, non-ASCII or space character, or an unescaped \
                 quote, at byte {position} of the key (counting from 0, once the spaces around it, \
                 its quotes and their escapes are taken off); {HINT} (spaces only inside a quoted \
                 key)"
            ),
            Self::UnterminatedQuote => {
                write!(
                    f,
                    "the quoted idempotency key does not end with its closing quote (nothing may follow it); send \"key\" or key"
                )
            }
            Self::InvalidEscape => write!(
                f,
                "the quoted idempotency key has a backslash that escapes neither '\"' nor '\\'; \
                 write \\\" for a quote and \\\\ for a backslash, or send the key unquoted"
            ),
            Self::Repeated => write!(
                f,
                "the idempotency key header was given more than once; send it exactly once"
            ),
            Self::Placeholder => write!(
                f,
                "the idempotency key is \"auto\", the placeholder that asks for a fresh key, not \
                 a key; put a fresh key of your own in its place for each operation (a UUID v4 \
                 works), the same on every retry of that operation"
            ),
        }
    }
}

impl std::error::Error for InvalidKey {}

fn trim_ows(mut b: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = b {
        b = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = b {
        b = rest;
    }
    b
}

fn unescape(inner: &[u8]) -> Result<Vec<u8>, InvalidKey> {
    let mut out = Vec::with_capacity(inner.len());
    let mut bytes = inner.iter().copied();
    while let Some(b) = bytes.next() {
        match b {
            b'\\' => match bytes.next() {
                Some(e @ (b'"' | b'\\')) => out.push(e),
                _ => return Err(InvalidKey::InvalidEscape),
            },
            // An unescaped quote inside the string ends it early: the value is malformed.
            b'"' => {
                return Err(InvalidKey::InvalidCharacter {
                    position: out.len(),
                });
            }
            b => out.push(b),
        }
    }
    Ok(out)
}

fn validate(key: &[u8], spaces_allowed: bool) -> Result<(), InvalidKey> {
    if key.is_empty() {
        return Err(InvalidKey::Empty);
    }
    if key.len() > MAX_KEY_LEN {
        return Err(InvalidKey::TooLong { len: key.len() });
    }
    match key
        .iter()
        .position(|&b| !(b.is_ascii_graphic() || (spaces_allowed && b == b' ')))
    {
        Some(position) => Err(InvalidKey::InvalidCharacter { position }),
        None => Ok(()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(raw: &[u8]) -> Result<IdempotencyKey, InvalidKey> {
        IdempotencyKey::from_header_value(&HeaderValue::from_bytes(raw).unwrap())
    }

    #[test]
    fn bare_and_quoted_forms_name_the_same_key() {
        assert_eq!(parse(b"abc").unwrap(), parse(b"\"abc\"").unwrap());
        assert_eq!(parse(b"\"abc\"").unwrap().as_str(), "abc");
        assert_eq!(parse(b"  abc\t").unwrap().as_str(), "abc");
    }

    #[test]
    fn quoted_form_allows_spaces_and_escapes() {
        assert_eq!(parse(b"\"a b\"").unwrap().as_str(), "a b");
        assert_eq!(parse(br#""a\"b\\c""#).unwrap().as_str(), r#"a"b\c"#);
        assert_eq!(parse(br#""a\nb""#), Err(InvalidKey::InvalidEscape));
        assert_eq!(parse(b"\"abc"), Err(InvalidKey::UnterminatedQuote));
        assert_eq!(parse(b"\"\""), Err(InvalidKey::Empty));
        assert!(matches!(
            parse(b"\"a\"b\""),
            Err(InvalidKey::InvalidCharacter { .. })
        ));
    }

    #[test]
    fn bare_form_rejects_spaces() {
        assert_eq!(
            parse(b"a b"),
            Err(InvalidKey::InvalidCharacter { position: 1 })
        );
        // A key with a space is still a key; it travels quoted.
        let spaced = IdempotencyKey::new("a b").unwrap();
        assert_eq!(spaced.to_header_value(), "\"a b\"");
    }

    #[test]
    fn length_boundary_is_255() {
        let ok = "k".repeat(255);
        assert_eq!(parse(ok.as_bytes()).unwrap().as_str(), ok);
        assert_eq!(parse(format!("\"{ok}\"").as_bytes()).unwrap().as_str(), ok);
        let long = "k".repeat(256);
        assert_eq!(
            parse(long.as_bytes()),
            Err(InvalidKey::TooLong { len: 256 })
        );
        assert_eq!(
            parse(format!("\"{long}\"").as_bytes()),
            Err(InvalidKey::TooLong { len: 256 })
        );
        assert_eq!(parse(b""), Err(InvalidKey::Empty));
    }

    #[test]
    fn control_characters_and_non_ascii_are_refused() {
        // DEL and NUL cannot even form a header value; keys built in code are checked too.
        assert!(HeaderValue::from_bytes(b"ab\x7fc").is_err());
        assert_eq!(
            IdempotencyKey::new("ab\x7fc"),
            Err(InvalidKey::InvalidCharacter { position: 2 })
        );
        assert_eq!(
            IdempotencyKey::new("\0"),
            Err(InvalidKey::InvalidCharacter { position: 0 })
        );
        assert_eq!(
            parse("clé".as_bytes()),
            Err(InvalidKey::InvalidCharacter { position: 2 })
        );
        assert_eq!(
            parse("\"clé\"".as_bytes()),
            Err(InvalidKey::InvalidCharacter { position: 2 })
        );
        assert_eq!(
            IdempotencyKey::new("a\tb"),
            Err(InvalidKey::InvalidCharacter { position: 1 })
        );
        assert_eq!(
            IdempotencyKey::new("a\nb"),
            Err(InvalidKey::InvalidCharacter { position: 1 })
        );
    }

    #[test]
    fn header_given_twice_is_refused() {
        let mut headers = HeaderMap::new();
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY),
            Ok(None)
        );
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY)
                .unwrap()
                .unwrap()
                .as_str(),
            "a"
        );
        headers.append(IDEMPOTENCY_KEY, HeaderValue::from_static("a"));
        assert_eq!(
            IdempotencyKey::from_headers(&headers, &IDEMPOTENCY_KEY),
            Err(InvalidKey::Repeated)
        );
    }

    #[test]
    fn auto_keys_are_uuid_v4() {
        let a = IdempotencyKey::auto();
        let b = IdempotencyKey::auto();
        assert_ne!(a, b);
        let uuid = uuid::Uuid::parse_str(a.as_str()).unwrap();
        assert_eq!(uuid.get_version_num(), 4);
    }

    #[test]
    fn the_placeholder_auto_is_not_a_key() {
        // Made once and cloned onto every request, it would be one key for them all.
        for placeholder in ["auto", "AUTO", "Auto"] {
            assert_eq!(
                IdempotencyKey::new(placeholder),
                Err(InvalidKey::Placeholder)
            );
            assert_eq!(
                placeholder.parse::<IdempotencyKey>(),
                Err(InvalidKey::Placeholder)
            );
            for sent in [placeholder.to_owned(), format!("\"{placeholder}\"")] {
                let value = HeaderValue::from_str(&sent).unwrap();
                assert_eq!(
                    IdempotencyKey::from_header_value(&value),
                    Err(InvalidKey::Placeholder)
                );
            }
        }
        assert!(
            InvalidKey::Placeholder
                .to_string()
                .contains("a fresh key of your own in its place for each operation")
        );
        assert_eq!(IdempotencyKey::new("autos").unwrap().as_str(), "autos");
    }

    #[test]
    fn header_value_round_trips() {
        for key in [
            "plain",
            "with space",
            r#"q"uo\te d"#,
            " padded ",
            r#""starts-quoted"#,
        ] {
            let key = IdempotencyKey::new(key).unwrap();
            assert_eq!(
                IdempotencyKey::from_header_value(&key.to_header_value()).unwrap(),
                key
            );
        }
    }
}
