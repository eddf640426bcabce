//! A stored response and its versioned binary encoding.

use bytes::{BufMut, Bytes, BytesMut};
use http::{HeaderMap, HeaderName, HeaderValue, StatusCode};

use super::{Fingerprint, StoreError};

/// The first byte of every encoded record.
const VERSION: u8 = 1;
const FLAG_REPLAYABLE: u8 = 1;
const FLAG_TRAILERS: u8 = 2;

/// What the first run of a key answered, as kept in a store.
///
/// A record is either a whole response (status, headers, body, trailers) that is replayed to
/// later requests, or, when the response was larger than the storable limit, only its status:
/// the key is then done but cannot be replayed, and duplicates are told so.
#[derive(Clone, Debug, PartialEq)]
#[non_exhaustive]
pub struct Record {
    /// The fingerprint of the request that produced the response.
    pub fingerprint: Fingerprint,
    /// The response status.
    pub status: StatusCode,
    /// The response headers, without those the service never replays.
    pub headers: HeaderMap,
    /// The whole response body.
    pub body: Bytes,
    /// The response trailers (gRPC status, for example), if there were any.
    pub trailers: Option<HeaderMap>,
    /// `false` when the response was too large to keep: only the status is stored.
    pub replayable: bool,
}

impl Record {
    /// A replayable record of a whole response.
    pub fn response(
        fingerprint: Fingerprint,
        status: StatusCode,
        headers: HeaderMap,
        body: Bytes,
        trailers: Option<HeaderMap>,
    ) -> Self {
        Self {
            fingerprint,
            status,
            headers,
            body,
            trailers,
            replayable: true,
        }
    }

    /// A record of a response that was delivered but is too large to replay.
    pub fn not_replayable(fingerprint: Fingerprint, status: StatusCode) -> Self {
        Self {
            fingerprint,
            status,
            headers: HeaderMap::new(),
            body: Bytes::new(),
            trailers: None,
            replayable: false,
        }
    }

    /// The compact binary form: a version byte, flags, the fingerprint, the status, then
    /// length-prefixed headers, body and trailers.
    pub fn encode(&self) -> Bytes {
        let mut buf = BytesMut::with_capacity(self.encoded_len());
        self.encode_into(&mut buf);
        buf.freeze()
    }

    /// Appends the binary form to `buf`.
    pub fn encode_into(&self, buf: &mut BytesMut) {
        buf.reserve(self.encoded_len());
        self.put(buf);
    }

    /// Appends the binary form to `buf`, which grows as it must.
    pub(crate) fn put(&self, buf: &mut BytesMut) {
        self.view().put(buf);
    }

    /// The exact length of [`encode`](Self::encode)'s output.
    pub fn encoded_len(&self) -> usize {
        self.view().encoded_len()
    }

    /// The record's parts, borrowed.
    pub(crate) fn view(&self) -> RecordView<'_> {
        RecordView {
            fingerprint: &self.fingerprint,
            status: self.status,
            headers: &self.headers,
            body: &self.body,
            trailers: self.trailers.as_ref(),
            replayable: self.replayable,
        }
    }

    /// Reads a record back. The body and header values share `bytes`' memory; nothing is copied
    /// but the header names. A value that does not decode is [`StoreError::Corrupt`].
    pub fn decode(bytes: Bytes) -> Result<Self, StoreError> {
        let mut r = Reader { bytes, pos: 0 };
        let version = r.u8()?;
        if version != VERSION {
            return Err(corrupt(format!("unknown record version {version}")));
        }
        let flags = r.u8()?;
        if flags & !(FLAG_REPLAYABLE | FLAG_TRAILERS) != 0 {
            return Err(corrupt(format!("unknown record flags {flags:#04x}")));
        }
        let fingerprint = Fingerprint::from_bytes(
            r.take(32)?
                .as_ref()
                .try_into()
                .expect("take(32) gives 32 bytes"),
        );
        let status = r.u16()?;
        let status = StatusCode::from_u16(status)
            .map_err(|_| corrupt(format!("invalid status code {status}")))?;
        let headers = r.headers()?;
        let body_len = r.len()?;
        let body = r.take(body_len)?;
        let trailers = if flags & FLAG_TRAILERS != 0 {
            Some(r.headers()?)
        } else {
            None
        };
        if r.pos != r.bytes.len() {
            return Err(corrupt(format!(
                "{} bytes after the end of the record",
                r.bytes.len() - r.pos
            )));
        }
        Ok(Self {
            fingerprint,
            status,
            headers,
            body,
            trailers,
            replayable: flags & FLAG_REPLAYABLE != 0,
        })
    }
}

fn corrupt(why: String) -> StoreError {
    StoreError::Corrupt(why)
}

/// A record's parts, borrowed from wherever they are (a response on its way out, say): what
/// encoding a record takes, without moving a response's headers and body into one.
#[derive(Clone, Copy)]
pub(crate) struct RecordView<'a> {
    pub(crate) fingerprint: &'a Fingerprint,
    pub(crate) status: StatusCode,
    pub(crate) headers: &'a HeaderMap,
    pub(crate) body: &'a Bytes,
    pub(crate) trailers: Option<&'a HeaderMap>,
    pub(crate) replayable: bool,
}

impl RecordView<'_> {
    /// Appends the binary form to `buf`, which grows as it must.
    pub(crate) fn put(&self, buf: &mut BytesMut) {
        let mut flags = 0;
        if self.replayable {
            flags |= FLAG_REPLAYABLE;
        }
        if self.trailers.is_some() {
            flags |= FLAG_TRAILERS;
        }
        buf.put_u8(VERSION);
        buf.put_u8(flags);
        buf.put_slice(self.fingerprint.as_bytes());
        buf.put_u16(self.status.as_u16());
        put_headers(buf, self.headers);
        put_varint(buf, self.body.len() as u64);
        buf.put_slice(self.body);
        if let Some(trailers) = self.trailers {
            put_headers(buf, trailers);
        }
    }

    /// The exact length of [`put`](Self::put)'s output.
    pub(crate) fn encoded_len(&self) -> usize {
        2 + 32
            + 2
            + headers_len(self.headers)
            + varint_len(self.body.len() as u64)
            + self.body.len()
            + self.trailers.map_or(0, headers_len)
    }

    /// An owned copy (its header values and body share their bytes).
    pub(crate) fn to_record(self) -> Record {
        Record {
            fingerprint: *self.fingerprint,
            status: self.status,
            headers: self.headers.clone(),
            body: self.body.clone(),
            trailers: self.trailers.cloned(),
            replayable: self.replayable,
        }
    }
}

fn headers_len(headers: &HeaderMap) -> usize {
    varint_len(headers.len() as u64)
        + headers
            .iter()
            .map(|(n, v)| {
                let (n, v) = (n.as_str().len(), v.as_bytes().len());
                varint_len(n as u64) + n + varint_len(v as u64) + v
            })
            .sum::<usize>()
}

fn put_headers(buf: &mut BytesMut, headers: &HeaderMap) {
    put_varint(buf, headers.len() as u64);
    for (name, value) in headers {
        put_varint(buf, name.as_str().len() as u64);
        buf.put_slice(name.as_str().as_bytes());
        put_varint(buf, value.as_bytes().len() as u64);
        buf.put_slice(value.as_bytes());
    }
}

fn varint_len(mut v: u64) -> usize {
    let mut n = 1;
    while v >= 0x80 {
        v >>= 7;
        n += 1;
    }
    n
}

fn put_varint(buf: &mut BytesMut, mut v: u64) {
    while v >= 0x80 {
        buf.put_u8((v as u8) | 0x80);
        v >>= 7;
    }
    buf.put_u8(v as u8);
}

struct Reader {
    bytes: Bytes,
    pos: usize,
}

impl Reader {
    fn take(&mut self, n: usize) -> Result<Bytes, StoreError> {
        let end = self
            .pos
            .checked_add(n)
            .filter(|&end| end <= self.bytes.len())
            .ok_or_else(|| {
                corrupt(format!(
                    "record ends early: wanted {n} bytes at offset {}",
                    self.pos
                ))
            })?;
        let out = self.bytes.slice(self.pos..end);
        self.pos = end;
        Ok(out)
    }

    fn u8(&mut self) -> Result<u8, StoreError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<u16, StoreError> {
        let b = self.take(2)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    fn varint(&mut self) -> Result<u64, StoreError> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let b = self.u8()?;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        Err(corrupt("length prefix is longer than 64 bits".into()))
    }

    fn len(&mut self) -> Result<usize, StoreError> {
        let v = self.varint()?;
        usize::try_from(v)
            .ok()
            .filter(|&n| n <= self.bytes.len() - self.pos)
            .ok_or_else(|| corrupt(format!("length {v} runs past the end of the record")))
    }

    fn headers(&mut self) -> Result<HeaderMap, StoreError> {
        let count = self.len()?;
        // With room for one more: a replay adds `Idempotent-Replayed`. The count is of values,
        // and a map holds any number of values under one name but only so many names: the
        // room made up front is capped, and the map grows past it as names come. A record with
        // more names than a map can hold is an error, never a panic.
        const ROOM: usize = 1024;
        let too_many = |_| corrupt(format!("{count} headers are more than a response can hold"));
        let mut headers =
            HeaderMap::try_with_capacity(count.saturating_add(1).min(ROOM)).map_err(too_many)?;
        for _ in 0..count {
            let n = self.len()?;
            let name = self.take(n)?;
            let name =
                HeaderName::from_bytes(&name).map_err(|_| corrupt("invalid header name".into()))?;
            let n = self.len()?;
            let value = HeaderValue::from_maybe_shared(self.take(n)?)
                .map_err(|_| corrupt(format!("invalid value for header {name}")))?;
            headers.try_append(name, value).map_err(too_many)?;
        }
        Ok(headers)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Record {
        let mut headers = HeaderMap::new();
        headers.insert("content-type", HeaderValue::from_static("application/json"));
        headers.append("x-multi", HeaderValue::from_static("a"));
        headers.append("x-multi", HeaderValue::from_static("b"));
        let mut trailers = HeaderMap::new();
        trailers.insert("grpc-status", HeaderValue::from_static("0"));
        Record::response(
            Fingerprint::from_bytes([9; 32]),
            StatusCode::CREATED,
            headers,
            Bytes::from(vec![42u8; 300]),
            Some(trailers),
        )
    }

    #[test]
    fn round_trips_every_field() {
        let record = sample();
        let encoded = record.encode();
        assert_eq!(encoded.len(), record.encoded_len());
        assert_eq!(Record::decode(encoded).unwrap(), record);

        let small = Record::not_replayable(Fingerprint::from_bytes([1; 32]), StatusCode::OK);
        assert_eq!(Record::decode(small.encode()).unwrap(), small);
    }

    #[test]
    fn truncations_and_garbage_are_errors_and_flipped_bytes_never_panic() {
        let encoded = sample().encode();
        for len in 0..encoded.len() {
            assert!(
                matches!(
                    Record::decode(encoded.slice(..len)),
                    Err(StoreError::Corrupt(_))
                ),
                "len {len}"
            );
        }
        let mut extra = encoded.to_vec();
        extra.push(0);
        assert!(Record::decode(extra.into()).is_err());
        let mut wrong_version = encoded.to_vec();
        wrong_version[0] = 99;
        assert!(Record::decode(wrong_version.into()).is_err());
        // Flip every byte in turn: decoding may succeed with other values, but never panics.
        for i in 0..encoded.len() {
            let mut flipped = encoded.to_vec();
            flipped[i] ^= 0xff;
            let _ = Record::decode(flipped.into());
        }
        assert!(Record::decode(Bytes::from_static(b"not a record at all")).is_err());
    }

    #[test]
    fn a_header_count_no_map_can_hold_is_an_error_not_a_panic() {
        // A valid start, then 40,000 headers of as many names: more names than a map holds.
        let mut encoded = BytesMut::new();
        encoded.put_u8(VERSION);
        encoded.put_u8(FLAG_REPLAYABLE);
        encoded.put_slice(&[0; 32]);
        encoded.put_u16(200);
        put_varint(&mut encoded, 40_000);
        for i in 0..40_000 {
            let name = format!("x{i}");
            put_varint(&mut encoded, name.len() as u64);
            encoded.put_slice(name.as_bytes());
            put_varint(&mut encoded, 0);
        }
        let err = Record::decode(encoded.freeze()).unwrap_err();
        assert!(matches!(err, StoreError::Corrupt(_)), "{err}");
    }

    #[test]
    fn many_values_of_one_header_round_trip() {
        // A map holds any number of values under one name, so a record of them decodes.
        let mut headers = HeaderMap::new();
        for i in 0..30_000_u32 {
            headers.append("x-item", HeaderValue::from(i));
        }
        let record = Record::response(
            Fingerprint::from_bytes([3; 32]),
            StatusCode::OK,
            headers,
            Bytes::new(),
            None,
        );
        assert_eq!(Record::decode(record.encode()).unwrap(), record);
    }
}
