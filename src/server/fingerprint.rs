//! What makes two requests "the same".

use std::sync::LazyLock;

use http::{HeaderName, request::Parts};

use crate::{digest, store::Fingerprint};

/// A BLAKE3 digest of the method, the path and query, the values of `headers` (in the order
/// given) and the body. Every field is length-prefixed, so no two different requests can
/// run together into the same input.
pub(crate) fn fingerprint(parts: &Parts, headers: &[HeaderName], body: &[u8]) -> Fingerprint {
    static KEY: LazyLock<[u8; 32]> =
        LazyLock::new(|| digest::purpose_key("tower-idempotency 2026 request fingerprint"));
    Fingerprint::from_bytes(digest::keyed_digest(&KEY, |sink| {
        let mut field = |bytes: &[u8]| {
            sink(&(bytes.len() as u64).to_le_bytes());
            sink(bytes);
        };
        field(parts.method.as_str().as_bytes());
        field(
            parts
                .uri
                .path_and_query()
                .map_or("/", |pq| pq.as_str())
                .as_bytes(),
        );
        for name in headers {
            field(name.as_str().as_bytes());
            let values = parts.headers.get_all(name);
            field(&(values.iter().count() as u64).to_le_bytes());
            for value in values {
                field(value.as_bytes());
            }
        }
        field(body);
    }))
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
        fingerprint(&parts, extra, body)
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
}
