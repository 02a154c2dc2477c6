//! [`Head`]: a request's head kept for a replay, as one flat buffer.
//!
//! A replay needs the method, URI, version, headers and extensions after the inner
//! service has consumed the request. Cloning them the obvious way costs, per request, two
//! allocations for the `HeaderMap` and one more for each `Bytes` inside a freshly built
//! `Uri` and header value (a clone promotes it to shared storage), then as many frees.
//! Copying the same bytes into one buffer costs a single allocation; the parsing back
//! happens only on the rare replay path. BENCHMARKS.md's "Hot-path machinery" table has
//! the measured difference (an inline buffer inside the response future measured worse,
//! too: every move of the future copies it). A spent buffer is kept for the thread's
//! next snapshot, which saves even that allocation; cloning the URI instead of copying
//! it measured worse (a parsed URI's path is often not shared yet, and a clone
//! allocates to share it).

use http::{Extensions, HeaderMap, HeaderName, HeaderValue, Method, Request, Uri, Version};

pub(crate) struct Head {
    method: Method,
    version: Version,
    extensions: Extensions,
    /// The three lengths of scheme, authority and path-and-query (u16 each, `NONE` when
    /// absent) and those parts, then each header: name length (u16), sensitive flag,
    /// value length (u32), name, value.
    buf: Vec<u8>,
}

const NONE: u16 = u16::MAX;

/// Room guessed per header before the buffer is allocated, so that the headers are
/// walked once: a typical API header with its framing fits; a bigger one grows the buffer.
const PER_HEADER: usize = 48;

impl Head {
    /// Snapshots `req`'s head. `None` for a head too unusual to snapshot (a URI part of
    /// 64 KiB or more, a header value of 4 GiB or more): such a request is not replayed.
    pub(crate) fn of<B>(req: &Request<B>) -> Option<Self> {
        let uri = req.uri();
        let scheme = uri.scheme_str();
        let authority = uri.authority().map(|a| a.as_str());
        let path = uri.path_and_query().map(|p| p.as_str());
        let headers = req.headers();
        let len = |part: Option<&str>| part.map_or(0, str::len);
        let mut buf =
            spare_buffer(6 + len(scheme) + len(authority) + len(path) + headers.len() * PER_HEADER);
        let [[s0, s1], [a0, a1], [p0, p1]] =
            [part_len(scheme)?, part_len(authority)?, part_len(path)?];
        buf.extend_from_slice(&[s0, s1, a0, a1, p0, p1]);
        buf.extend_from_slice(scheme.unwrap_or_default().as_bytes());
        buf.extend_from_slice(authority.unwrap_or_default().as_bytes());
        buf.extend_from_slice(path.unwrap_or_default().as_bytes());
        for (name, value) in headers {
            let name = name.as_str().as_bytes();
            let [n0, n1] = u16::try_from(name.len()).ok()?.to_le_bytes();
            let [v0, v1, v2, v3] = u32::try_from(value.len()).ok()?.to_le_bytes();
            let sensitive = u8::from(value.is_sensitive());
            buf.extend_from_slice(&[n0, n1, sensitive, v0, v1, v2, v3]);
            buf.extend_from_slice(name);
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
    pub(crate) fn into_request<B>(mut self, body: B) -> Option<Request<B>> {
        let buf = std::mem::take(&mut self.buf);
        let mut r = Reader(&buf);
        let lens = [r.u16()?, r.u16()?, r.u16()?];
        let [scheme, authority, path] = lens.map(|len| (len != NONE).then_some(len));
        let (scheme, authority, path) =
            (r.opt_str(scheme)?, r.opt_str(authority)?, r.opt_str(path)?);
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
            let name_len = usize::from(r.u16()?);
            let sensitive = r.take(1)?[0] == 1;
            let value_len = u32::from_le_bytes(r.take(4)?.try_into().ok()?) as usize;
            let name = HeaderName::from_bytes(r.take(name_len)?).ok()?;
            let mut value = HeaderValue::from_bytes(r.take(value_len)?).ok()?;
            value.set_sensitive(sensitive);
            headers.append(name, value);
        }
        let mut req = Request::new(body);
        *req.method_mut() = self.method.clone();
        *req.uri_mut() = uri.build().ok()?;
        *req.version_mut() = self.version;
        *req.headers_mut() = headers;
        *req.extensions_mut() = std::mem::take(&mut self.extensions);
        Some(req)
    }
}

thread_local! {
    /// One spent snapshot buffer per thread, for the next snapshot taken on it: a
    /// request's snapshot lives until its answer, so without it every request allocates
    /// and frees one buffer (BENCHMARKS.md has what that costs).
    static SPARE: std::cell::Cell<Vec<u8>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Most bytes a buffer may hold to be kept for the next snapshot: an unusually big head
/// is not kept alive on its thread.
const SPARE_MAX: usize = 4096;

/// An empty buffer with room for `capacity` bytes: this thread's spare (grown if need
/// be), if it has one.
#[inline]
fn spare_buffer(capacity: usize) -> Vec<u8> {
    match SPARE.try_with(std::cell::Cell::take) {
        Ok(mut spare) if spare.capacity() != 0 => {
            spare.reserve_exact(capacity);
            spare
        }
        _ => Vec::with_capacity(capacity),
    }
}

impl Drop for Head {
    fn drop(&mut self) {
        let mut buf = std::mem::take(&mut self.buf);
        if buf.capacity() != 0 && buf.capacity() <= SPARE_MAX {
            buf.clear();
            // A thread being torn down keeps nothing; a spare already there is freed.
            let _ = SPARE.try_with(|spare| spare.replace(buf));
        }
    }
}

/// A URI part's length frame: `NONE` when absent, `None` when too long to frame.
#[inline]
fn part_len(part: Option<&str>) -> Option<[u8; 2]> {
    match part {
        None => Some(NONE.to_le_bytes()),
        Some(part) => u16::try_from(part.len())
            .ok()
            .filter(|l| *l != NONE)
            .map(u16::to_le_bytes),
    }
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

    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }

    fn opt_str(&mut self, len: Option<u16>) -> Option<Option<&'a str>> {
        match len {
            None => Some(None),
            Some(len) => std::str::from_utf8(self.take(usize::from(len))?)
                .ok()
                .map(Some),
        }
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

    /// Headers far bigger than the buffer's first guess grow it and round-trip; a URI
    /// without scheme and authority keeps them absent.
    #[test]
    fn big_heads_round_trip() {
        let mut req = Request::get("/only/a/path?q").body(()).unwrap();
        for (i, len) in [0, 47, 48, 49, 70_000].into_iter().enumerate() {
            let value = HeaderValue::from_str(&"v".repeat(len)).unwrap();
            req.headers_mut()
                .insert(format!("x-pad-{i}").parse::<HeaderName>().unwrap(), value);
        }
        let back = Head::of(&req).unwrap().into_request(()).unwrap();
        assert_eq!(back.headers(), req.headers());
        assert_eq!(back.uri(), req.uri());
        assert!(back.uri().scheme().is_none() && back.uri().authority().is_none());
    }

    /// A spent snapshot's buffer serves the next snapshot on the thread, emptied first
    /// (what it held never shows in the next one); a buffer bigger than `SPARE_MAX` is
    /// not kept.
    #[test]
    fn a_spent_buffer_serves_the_next_snapshot_and_a_big_one_is_freed() {
        let mut small = Request::get("https://a.test/x?q=1")
            .header("x-one", "1")
            .body(())
            .unwrap();
        small
            .headers_mut()
            .append("x-one", HeaderValue::from_static("11"));
        let other = Request::get("/y").header("x-two", "22").body(()).unwrap();
        let first = Head::of(&small).unwrap();
        let spent = first.buf.as_ptr();
        drop(first);
        let second = Head::of(&other).unwrap();
        assert_eq!(second.buf.as_ptr(), spent, "the spare buffer is reused");
        let back = second.into_request(()).unwrap();
        assert_eq!(back.uri(), other.uri());
        assert_eq!(back.headers(), other.headers());

        let mut big = Request::get("/z").body(()).unwrap();
        let value = HeaderValue::from_str(&"v".repeat(SPARE_MAX)).unwrap();
        big.headers_mut().insert("x-big", value);
        drop(Head::of(&big).unwrap());
        let kept = SPARE.with(|spare| {
            let buf = spare.take();
            let capacity = buf.capacity();
            spare.set(buf);
            capacity
        });
        assert!(kept <= SPARE_MAX, "kept {kept} bytes");
        let back = Head::of(&small).unwrap().into_request(()).unwrap();
        assert_eq!(back.headers(), small.headers());
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
