//! What makes two requests "the same".

use std::sync::LazyLock;

use http::{HeaderName, HeaderValue, header, request::Parts};

use super::problem::Dialect;
use crate::{digest, store::Fingerprint};

/// A BLAKE3 digest of the method, the path and query, the `Content-Type`, the values of
/// `headers` (in the order given) and the body. Every field but the body, which comes last, is
/// prefixed with its length (32 bits: a path or a header value is far shorter), so no two
/// different requests can run together into the same input; a small request stays within one
/// BLAKE3 block.
///
/// The `Content-Type` always counts: the same bytes as JSON and as a form are different
/// requests, and a retry that corrects a wrong one is not the request that was answered 415.
/// A named header's values count as one list, however they were split over lines and whatever
/// the spaces around their commas (RFC 9110, section 5.3: a proxy may fold them); empty
/// elements are left out, and a comma or a space inside a quoted string is part of it. A
/// header that is absent differs from one that is present but empty.
///
/// Also says, from the same `Content-Type`, how the service answers the request itself.
pub(crate) fn fingerprint(
    parts: &Parts,
    headers: &[HeaderName],
    body: &[u8],
) -> (Fingerprint, Dialect) {
    static KEY: LazyLock<[u8; 32]> =
        LazyLock::new(|| digest::purpose_key("tower-idempotency 2026 request fingerprint"));
    let path = parts.uri.path_and_query().map_or("/", |pq| pq.as_str());
    let mut content_types = parts.headers.get_all(header::CONTENT_TYPE).iter();
    let first_type = content_types.next().map_or(&[][..], HeaderValue::as_bytes);
    // Given on more than one line (which it should not be), every line counts.
    let all_types = content_types.next().map(|_| {
        let lines: Vec<&[u8]> = parts
            .headers
            .get_all(header::CONTENT_TYPE)
            .iter()
            .map(HeaderValue::as_bytes)
            .collect();
        lines.join(&b"\n"[..])
    });
    let dialect = Dialect::of_content_type(first_type);
    let content_type = match all_types.as_deref().unwrap_or(first_type) {
        // gRPC's default message format, named or not: the same call either way.
        b"application/grpc+proto" => b"application/grpc",
        content_type => content_type,
    };
    let digest = digest::keyed_digest(&KEY, |sink| {
        let mut field = |bytes: &[u8]| {
            sink(&(bytes.len() as u32).to_le_bytes());
            sink(bytes);
        };
        field(parts.method.as_str().as_bytes());
        field(path.as_bytes());
        field(content_type);
        for name in headers {
            field(name.as_str().as_bytes());
            let values = parts.headers.get_all(name);
            let listed = || values.iter().flat_map(|value| elements(value.as_bytes()));
            let count = match values.iter().next() {
                None => u32::MAX,
                Some(_) => listed().count() as u32,
            };
            field(&count.to_le_bytes());
            for element in listed() {
                field(element);
            }
        }
        sink(body);
    });
    (Fingerprint::from_bytes(digest), dialect)
}

/// The elements of a list header's value: split at the commas outside quoted strings, trimmed
/// of the spaces around them, the empty ones left out.
fn elements(value: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut rest = Some(value);
    std::iter::from_fn(move || {
        let value = rest?;
        let (mut quoted, mut escaped) = (false, false);
        let end = value.iter().position(|&b| {
            match b {
                _ if escaped => escaped = false,
                b'\\' if quoted => escaped = true,
                b'"' => quoted = !quoted,
                b',' if !quoted => return true,
                _ => {}
            }
            false
        });
        let (element, next) = match end {
            Some(at) => (&value[..at], Some(&value[at + 1..])),
            None => (value, None),
        };
        rest = next;
        Some(element.trim_ascii())
    })
    .filter(|element| !element.is_empty())
}

#[cfg(test)]
mod tests {
    use http::{Method, Request};

    use super::*;

    fn fp(
        method: Method,
        uri: &str,
        tenant: Option<&str>,
        extra: &[HeaderName],
        body: &[u8],
    ) -> Fingerprint {
        let mut req = Request::builder().method(method).uri(uri);
        if let Some(t) = tenant {
            req = req.header("x-tenant", t);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        fingerprint(&parts, extra, body).0
    }

    #[test]
    fn every_part_of_the_request_counts() {
        let tenant = [HeaderName::from_static("x-tenant")];
        let base = fp(Method::POST, "/orders?a=1", Some("t"), &tenant, b"{}");
        assert_eq!(
            base,
            fp(Method::POST, "/orders?a=1", Some("t"), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fp(Method::PATCH, "/orders?a=1", Some("t"), &tenant, b"{}")
        );
        assert_ne!(
            base,
            fp(Method::POST, "/orders?a=2", Some("t"), &tenant, b"{}")
        );
        assert_ne!(base, fp(Method::POST, "/orders", Some("t"), &tenant, b"{}"));
        assert_ne!(
            base,
            fp(Method::POST, "/orders?a=1", Some("u"), &tenant, b"{}")
        );
        assert_ne!(base, fp(Method::POST, "/orders?a=1", None, &tenant, b"{}"));
        assert_ne!(
            base,
            fp(Method::POST, "/orders?a=1", Some("t"), &tenant, b"{ }")
        );
        // Headers not named do not count.
        assert_eq!(
            fp(Method::POST, "/o", Some("t"), &[], b""),
            fp(Method::POST, "/o", Some("u"), &[], b"")
        );
    }

    fn with_headers(headers: &[(&str, &str)], named: &[HeaderName]) -> Fingerprint {
        let mut req = Request::builder().method(Method::POST).uri("/orders");
        for (name, value) in headers {
            req = req.header(*name, *value);
        }
        let (parts, ()) = req.body(()).unwrap().into_parts();
        fingerprint(&parts, named, b"tea").0
    }

    #[test]
    fn the_content_type_counts_without_being_named() {
        let json = with_headers(&[("content-type", "application/json")], &[]);
        assert_eq!(
            json,
            with_headers(&[("content-type", "application/json")], &[])
        );
        assert_ne!(json, with_headers(&[("content-type", "text/plain")], &[]));
        assert_ne!(json, with_headers(&[], &[]));
        assert_ne!(
            json,
            with_headers(&[("content-type", "application/json; charset=utf-8")], &[])
        );
        // Absent is no media type, as is empty.
        assert_eq!(
            with_headers(&[], &[]),
            with_headers(&[("content-type", "")], &[])
        );
        // A gRPC call's messages are protobuf whether the type says so or not.
        assert_eq!(
            with_headers(&[("content-type", "application/grpc")], &[]),
            with_headers(&[("content-type", "application/grpc+proto")], &[])
        );
        assert_ne!(
            with_headers(&[("content-type", "application/grpc")], &[]),
            with_headers(&[("content-type", "application/grpc+json")], &[])
        );
        // Every line counts, should there be more than one.
        let two = [
            ("content-type", "application/json"),
            ("content-type", "text/plain"),
        ];
        assert_ne!(json, with_headers(&two, &[]));
    }

    #[test]
    fn a_list_counts_the_same_however_it_is_split_over_lines() {
        let named = [HeaderName::from_static("accept-language")];
        let two_lines = with_headers(
            &[("accept-language", "en"), ("accept-language", "fr")],
            &named,
        );
        for folded in ["en, fr", "en,fr", " en ,fr ", "en,,fr"] {
            assert_eq!(
                two_lines,
                with_headers(&[("accept-language", folded)], &named),
                "{folded:?}"
            );
        }
        assert_ne!(
            two_lines,
            with_headers(&[("accept-language", "fr, en")], &named),
            "the order of a list counts"
        );
        assert_ne!(
            two_lines,
            with_headers(&[("accept-language", "en fr")], &named)
        );
        assert_ne!(
            two_lines,
            with_headers(&[("accept-language", "en")], &named)
        );
    }

    #[test]
    fn a_quoted_string_is_one_element_with_its_commas_and_spaces() {
        let named = [HeaderName::from_static("x-filter")];
        let fp = |value: &str| with_headers(&[("x-filter", value)], &named);
        assert_ne!(fp(r#"name="a, b""#), fp(r#"name="a,b""#));
        assert_ne!(fp(r#"name="a, b""#), fp(r#"name="a", b"#));
        assert_eq!(fp(r#"name="a, b", c"#), fp(r#"name="a, b",c"#));
        assert_ne!(fp(r#""a\", b", c"#), fp(r#""a\"", b, c"#));
        assert_eq!(
            elements(br#"a, "b, \"c\"", d"#).collect::<Vec<_>>(),
            [&b"a"[..], br#""b, \"c\"""#, b"d"]
        );
    }

    #[test]
    fn a_named_header_present_but_empty_is_not_an_absent_one() {
        let named = [HeaderName::from_static("x-filter")];
        let absent = with_headers(&[], &named);
        assert_ne!(absent, with_headers(&[("x-filter", "")], &named));
        assert_ne!(absent, with_headers(&[("x-filter", ",")], &named));
        assert_eq!(
            with_headers(&[("x-filter", "")], &named),
            with_headers(&[("x-filter", ", ")], &named)
        );
    }
}
