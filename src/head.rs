//! [`Head`]: a request's head kept for a replay, as one flat buffer.
//!
//! A replay needs the method, URI, version, headers and extensions after the inner
//! service has consumed the request. Cloning them the obvious way costs, per request, two
//! allocations for the `HeaderMap` and one more for each `Bytes` inside a freshly built
//! `Uri` and header value (a clone promotes it to shared storage), then as many frees.
//! Copying the same bytes into one buffer costs a single allocation; the parsing back
//! happens only on the rare replay path. See BENCHMARKS.md for the measured difference.

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

pub(crate) struct Head {
    method: Method,
    version: Version,
    extensions: Extensions,
    /// Scheme, authority and path-and-query, each length-prefixed (`NONE` when absent),
    /// then each header: name length (u16), name, sensitive flag, value length (u32), value.
    buf: Vec<u8>,
}

const NONE: u32 = u32::MAX;

impl Head {
    /// Snapshots `req`'s head. `None` for a head too unusual to snapshot (a header name
    /// over 64 KiB, a value over 4 GiB): such a request is simply not replayed.
    pub(crate) fn of<B>(req: &Request<B>) -> Option<Self> {
        let uri = req.uri();
        let (scheme, authority) = (uri.scheme_str(), uri.authority().map(|a| a.as_str()));
        let path = uri.path_and_query().map(|p| p.as_str());
        let headers = req.headers();
        let mut len = 12
            + scheme.map_or(0, str::len)
            + authority.map_or(0, str::len)
            + path.map_or(0, str::len);
        for (name, value) in headers {
            len += 7 + name.as_str().len() + value.len();
        }
        let mut buf = Vec::with_capacity(len);
        for part in [scheme, authority, path] {
            put_str(&mut buf, part)?;
        }
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            buf.extend_from_slice(&u16::try_from(name.len()).ok()?.to_le_bytes());
            buf.extend_from_slice(name);
            buf.push(u8::from(value.is_sensitive()));
            buf.extend_from_slice(&u32::try_from(value.len()).ok()?.to_le_bytes());
            buf.extend_from_slice(value.as_bytes());
        }
        Some(Head {
            method: req.method().clone(),
            version: req.version(),
            extensions: req.extensions().clone(),
            buf,
        })
    }

    /// Rebuilds the request around `body`. `None` only if the snapshot no longer parses,
    /// which values that parsed once cannot do.
    pub(crate) fn into_request<B>(self, body: B) -> Option<Request<B>> {
        let mut r = Reader(&self.buf);
        let (scheme, authority, path) = (r.opt_str()?, r.opt_str()?, r.opt_str()?);
        let mut uri = Uri::builder();
        if let Some(scheme) = scheme {
            uri = uri.scheme(scheme);
        }
        if let Some(authority) = authority {
            uri = uri.authority(authority);
        }
        if let Some(path) = path {
            uri = uri.path_and_query(path);
        }
        let mut headers = HeaderMap::new();
        while !r.0.is_empty() {
            let name_len = usize::from(u16::from_le_bytes(r.take(2)?.try_into().ok()?));
            let name = HeaderName::from_bytes(r.take(name_len)?).ok()?;
            let sensitive = r.take(1)?[0] == 1;
            let value_len = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
            let mut value = HeaderValue::from_bytes(r.take(value_len)?).ok()?;
            value.set_sensitive(sensitive);
            headers.append(name, value);
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method;
        *req.uri_mut() = uri.build().ok()?;
        *req.version_mut() = self.version;
        *req.headers_mut() = headers;
        *req.extensions_mut() = self.extensions;
        Some(req)
    }
}

fn put_str(buf: &mut Vec<u8>, part: Option<&str>) -> Option<()> {
    match part {
        None => buf.extend_from_slice(&NONE.to_le_bytes()),
        Some(s) => {
            let len = u32::try_from(s.len()).ok().filter(|l| *l != NONE)?;
            buf.extend_from_slice(&len.to_le_bytes());
            buf.extend_from_slice(s.as_bytes());
        }
    }
    Some(())
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }

    fn opt_str(&mut self) -> Option<Option<&'a str>> {
        let len = u32::from_le_bytes(self.take(4)?.try_into().ok()?);
        if len == NONE {
            return Some(None);
        }
        std::str::from_utf8(self.take(len as usize)?).ok().map(Some)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Everything a replay needs survives the round trip: method, absolute and relative
    /// URIs with queries, version, repeated headers in order, non-ASCII value bytes,
    /// sensitivity, extensions.
    #[test]
    fn round_trip() {
        #[derive(Clone, Debug, PartialEq)]
        struct Tag(u8);
        for uri in [
            "https://api.example.com:8443/v1/orders?x=1&y=%20",
            "/pkg.Svc/Method",
            "http://[::1]/",
        ] {
            let mut req = Request::builder()
                .method("PATCH")
                .uri(uri)
                .version(Version::HTTP_2)
                .header("x-multi", "a")
                .header("x-multi", "b")
                .header("x-bytes", HeaderValue::from_bytes(b"caf\xe9").unwrap())
                .body(())
                .unwrap();
            let mut secret = HeaderValue::from_static("Bearer t");
            secret.set_sensitive(true);
            req.headers_mut().insert("authorization", secret);
            req.extensions_mut().insert(Tag(7));
            let back = Head::of(&req).unwrap().into_request(()).unwrap();
            assert_eq!(back.method(), "PATCH");
            assert_eq!(back.uri(), req.uri());
            assert_eq!(back.version(), Version::HTTP_2);
            assert_eq!(back.headers(), req.headers());
            let multi: Vec<_> = back.headers().get_all("x-multi").iter().collect();
            assert_eq!(multi, ["a", "b"]);
            assert!(back.headers()["authorization"].is_sensitive());
            assert_eq!(back.extensions().get::<Tag>(), Some(&Tag(7)));
        }
    }

    /// A truncated buffer is `None`, not a panic.
    #[test]
    fn truncated_snapshot_is_none() {
        let req = Request::get("https://a.test/")
            .header("x", "y")
            .body(())
            .unwrap();
        let mut head = Head::of(&req).unwrap();
        head.buf.truncate(head.buf.len() - 1);
        assert!(head.into_request(()).is_none());
    }
}
