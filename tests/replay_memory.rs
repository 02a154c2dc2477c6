//! What a request's retention for its replay keeps alive, counted by the allocator: the
//! replay limit is documented as the most a body costs per in-flight request ("a larger
//! limit costs up to that much memory per in-flight request"). One test in this binary:
//! the counting allocator sees every thread's allocations.

mod support;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    pin::Pin,
    sync::atomic::{AtomicIsize, Ordering},
    task::{Context, Poll},
};

use bytes::Bytes;
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::BodyExt;
use support::TestSource;
use tower::{Layer, ServiceExt};
use tower_client_auth::{AuthLayer, NotReplayed, ReplayBody};
use tower_test::mock;

/// Bytes allocated and not yet freed, by every thread.
static LIVE: AtomicIsize = AtomicIsize::new(0);
/// Bytes ever allocated, by every thread (a grown allocation counts what it grew by).
static TOTAL: AtomicIsize = AtomicIsize::new(0);

struct Counting;

// SAFETY: every call is passed on to `System` as it came; only the sizes are counted.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let p = unsafe { System.alloc(layout) };
        if !p.is_null() {
            LIVE.fetch_add(layout.size() as isize, Ordering::Relaxed);
            TOTAL.fetch_add(layout.size() as isize, Ordering::Relaxed);
        }
        p
    }

    unsafe fn dealloc(&self, p: *mut u8, layout: Layout) {
        unsafe { System.dealloc(p, layout) };
        LIVE.fetch_sub(layout.size() as isize, Ordering::Relaxed);
    }

    unsafe fn realloc(&self, p: *mut u8, layout: Layout, new: usize) -> *mut u8 {
        let q = unsafe { System.realloc(p, layout, new) };
        if !q.is_null() {
            let grown = new as isize - layout.size() as isize;
            LIVE.fetch_add(grown, Ordering::Relaxed);
            TOTAL.fetch_add(grown.max(0), Ordering::Relaxed);
        }
        q
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

static ONE: [u8; 1] = [7];

/// A body of `left` data frames, each made by `make` when it is polled (so that the
/// body itself holds nothing), its length unknown in advance.
struct Frames {
    left: usize,
    make: fn(usize) -> Bytes,
}

impl Body for Frames {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if self.left == 0 {
            return Poll::Ready(None);
        }
        self.left -= 1;
        let n = self.left;
        Poll::Ready(Some(Ok(Frame::data((self.make)(n)))))
    }
}

/// One-byte frames of static bytes: no allocation of their own.
fn static_byte(_: usize) -> Bytes {
    Bytes::from_static(&ONE)
}

/// 16-byte frames, each a slice of its own 4 KiB buffer (a parser handing out slices of
/// the reads it made).
fn slice_of_a_read(n: usize) -> Bytes {
    Bytes::from(vec![n as u8; 4096]).slice(0..16)
}

/// Sends a body of `frames` frames made by `make` (`payload` bytes in all, within the
/// limit) through the layer over a mock API, which reads it to its end, frame by frame,
/// dropping each; returns the bytes still allocated then, over what was allocated
/// before the request, and checks the 401 is then replayed whole, byte for byte.
async fn kept_alive(frames: usize, make: fn(usize) -> Bytes, payload: usize) -> isize {
    kept_alive_limit(frames, make, payload, payload).await.0
}

/// An FNV-1a hash, fed chunk by chunk: compares the replay with the first attempt
/// without keeping either.
struct Fnv(u64);

impl Fnv {
    fn new() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }

    fn feed(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = (self.0 ^ u64::from(b)).wrapping_mul(0x100_0000_01b3);
        }
    }
}

/// `kept_alive` under a replay limit of `limit` bytes; also returns the bytes allocated
/// from the call until the first attempt's body was read (the body's own frames
/// included).
async fn kept_alive_limit(
    frames: usize,
    make: fn(usize) -> Bytes,
    payload: usize,
    limit: usize,
) -> (isize, isize) {
    let layer = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .replay_limit(limit);
    layer.warm_up().await.unwrap();
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Frames>>, Response<&'static str>>();
    let svc = layer.layer(inner);
    let req = Request::put("https://api.test/upload")
        .body(Frames { left: frames, make })
        .unwrap();
    let before = LIVE.load(Ordering::SeqCst);
    let total_before = TOTAL.load(Ordering::SeqCst);
    let call = tokio::spawn(svc.oneshot(req));
    let (mut first, reply) = api.next_request().await.unwrap();
    let mut read = 0;
    let mut sent = Fnv::new();
    while let Some(frame) = first.body_mut().frame().await {
        let data = frame.unwrap().into_data().unwrap();
        read += data.len();
        sent.feed(&data);
    }
    assert_eq!(read, payload);
    let kept = LIVE.load(Ordering::SeqCst) - before;
    let allocated = TOTAL.load(Ordering::SeqCst) - total_before;
    drop(first);
    reply.send_response(Response::builder().status(401).body("").unwrap());
    let (mut second, reply) = api.next_request().await.unwrap();
    let (mut replayed, mut again) = (0, Fnv::new());
    while let Some(frame) = second.body_mut().frame().await {
        let data = frame.unwrap().into_data().unwrap();
        replayed += data.len();
        again.feed(&data);
    }
    assert_eq!(replayed, payload, "the replay carries the body whole");
    assert_eq!(again.0, sent.0, "the replay carries the body byte for byte");
    reply.send_response(Response::builder().status(200).body("").unwrap());
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.extensions().get::<NotReplayed>().is_none());
    (kept, allocated)
}

/// A body of four bytes and then trailers made by `make` when they are polled (so that
/// the body itself holds nothing), its length unknown in advance; with `wait`, the
/// trailers are not ready at the first look (streamed, recorded as they pass).
struct Trailed {
    data: bool,
    wait: bool,
    make: Option<fn() -> http::HeaderMap>,
}

impl Body for Trailed {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        if !self.data {
            self.data = true;
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(b"abcd")))));
        }
        if std::mem::take(&mut self.wait) {
            _cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        Poll::Ready(self.make.take().map(|make| Ok(Frame::trailers(make()))))
    }
}

/// What trailers count against the limit: as HTTP/2 counts a header list (name, value
/// and 32 bytes an entry), as the crate documents it.
fn counted(trailers: &http::HeaderMap) -> usize {
    trailers
        .iter()
        .map(|(n, v)| n.as_str().len() + v.len() + 32)
        .sum()
}

/// Distinct short names with empty values, as many as fit a 64 KiB limit with the body's
/// four bytes (a signing proxy's per-field digests, a metrics trailer per series).
fn many_names() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    let mut i = 0;
    loop {
        let name = http::HeaderName::from_bytes(format!("x{i}").as_bytes()).unwrap();
        if 4 + counted(&t) + name.as_str().len() + 32 > 64 * 1024 {
            return t;
        }
        t.insert(name, http::HeaderValue::from_static(""));
        i += 1;
    }
}

/// One short name with as many empty values as fit a 64 KiB limit with the body's four
/// bytes.
fn many_values() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    while 4 + counted(&t) + 1 + 32 <= 64 * 1024 {
        t.append("a", http::HeaderValue::from_static(""));
    }
    t
}

/// One entry whose value fills a 64 KiB limit with the body's four bytes (the control:
/// the same count in one entry).
fn one_long_value() -> http::HeaderMap {
    let mut t = http::HeaderMap::new();
    let value = "s".repeat(64 * 1024 - 4 - "x-signature".len() - 32);
    t.insert("x-signature", value.parse().unwrap());
    t
}

/// Sends a `Trailed` body through the layer under `limit` over a mock API, which reads it
/// to its end; returns the bytes still allocated then, over what was allocated before
/// the request, and checks the 401 is then replayed with the same trailers.
async fn kept_alive_trailers(
    make: fn() -> http::HeaderMap,
    wait: bool,
    limit: usize,
) -> (isize, isize) {
    let layer = AuthLayer::new(TestSource::new())
        .any_https_origin()
        .replay_limit(limit);
    layer.warm_up().await.unwrap();
    let (inner, mut api) = mock::pair::<Request<ReplayBody<Trailed>>, Response<&'static str>>();
    let svc = layer.layer(inner);
    let req = Request::put("https://api.test/upload")
        .body(Trailed {
            data: false,
            wait,
            make: Some(make),
        })
        .unwrap();
    let before = LIVE.load(Ordering::SeqCst);
    let call = tokio::spawn(svc.oneshot(req));
    let (mut first, reply) = api.next_request().await.unwrap();
    let mut sent = None;
    while let Some(frame) = first.body_mut().frame().await {
        if let Ok(t) = frame.unwrap().into_trailers() {
            sent = Some((t.len(), counted(&t)));
        }
    }
    let kept = LIVE.load(Ordering::SeqCst) - before;
    drop(first);
    reply.send_response(Response::builder().status(401).body("").unwrap());
    let (mut second, reply) = api.next_request().await.unwrap();
    // The replay is in flight, its trailers not yet given: what the request holds for it.
    let replaying = LIVE.load(Ordering::SeqCst) - before;
    let mut again = None;
    while let Some(frame) = second.body_mut().frame().await {
        if let Ok(t) = frame.unwrap().into_trailers() {
            again = Some((t.len(), counted(&t)));
        }
    }
    assert!(sent.is_some());
    assert_eq!(again, sent, "the replay carries the trailers whole");
    reply.send_response(Response::builder().status(200).body("").unwrap());
    let res = call.await.unwrap().unwrap();
    assert_eq!(res.status(), 200);
    assert!(res.extensions().get::<NotReplayed>().is_none());
    (kept, replaying)
}

/// 16 KiB frames, each a slice of its own 1 MiB buffer (a `ReaderStream` with a 1 MiB
/// capacity over a pipe or a socket, whose reads return 16 KiB: each frozen chunk
/// shares the read buffer it came from).
fn slice_of_a_large_read(n: usize) -> Bytes {
    Bytes::from(vec![n as u8; 1 << 20]).slice(0..16 * 1024)
}

/// One 64-byte frame, a slice of a 1 MiB buffer (a message cut out of a larger batch
/// that was read whole), the body's only chunk, ready in full.
fn small_slice_of_a_batch(_: usize) -> Bytes {
    Bytes::from(vec![1u8; 1 << 20]).slice(0..64)
}

/// 16 KiB frames, each a buffer of its own that holds nothing else (a file read into
/// exact buffers, a `Vec` per message).
fn own_buffer(n: usize) -> Bytes {
    Bytes::from(vec![n as u8; 16 * 1024])
}

/// 64 KiB frames, each a buffer of its own.
fn own_large_buffer(n: usize) -> Bytes {
    Bytes::from(vec![n as u8; 64 * 1024])
}

/// 16 KiB frames, each alone in a buffer with room for 1 MiB (a `Vec` made with a large
/// capacity and filled in part): held by nobody else, but larger than the frame.
fn own_buffer_with_room(n: usize) -> Bytes {
    let mut buffer = Vec::with_capacity(1 << 20);
    buffer.resize(16 * 1024, n as u8);
    Bytes::from(buffer)
}

/// 16 KiB frames, each the end of a 1 MiB buffer that nothing else holds any more.
fn end_of_a_large_buffer(n: usize) -> Bytes {
    Bytes::from(vec![n as u8; 1 << 20]).slice((1 << 20) - 16 * 1024..)
}

/// Buffers of their own of 16 KiB and one-byte static frames, in turn.
fn own_buffers_and_bytes(n: usize) -> Bytes {
    if n % 2 == 0 {
        own_buffer(n)
    } else {
        static_byte(n)
    }
}

static LARGE: [u8; 32767] = [b'a'; 32767];
static SIXTEEN_KIB: [u8; 16 * 1024] = [b'c'; 16 * 1024];

/// In turn: a 32,767-byte static frame, a one-byte one, and a 16 KiB static one (all
/// copied): 49,152 bytes a cycle.
fn cycle_copied(n: usize) -> Bytes {
    match n % 3 {
        2 => Bytes::from_static(&LARGE),
        1 => Bytes::from_static(&ONE),
        _ => Bytes::from_static(&SIXTEEN_KIB),
    }
}

/// `cycle_copied` with the 16 KiB frame a buffer of its own (kept shared).
fn cycle_shared(n: usize) -> Bytes {
    match n % 3 {
        0 => Bytes::from(vec![b'c'; 16 * 1024]),
        _ => cycle_copied(n),
    }
}

/// World: uploads within the default replay limit of 64 KiB, each read by the API to its
/// end before it answers 401: streamed as many small frames (a gRPC client stream of
/// small messages, a line-by-line export, a parser handing out 16-byte slices of its
/// 4 KiB reads), as 16 KiB slices of 1 MiB reads (a reader with a 1 MiB buffer over a
/// pipe), and a 64-byte body ready in full that is a slice of a 1 MiB batch.
/// Proves: what the request keeps alive for its replay stays within twice the limit
/// whatever the framing, as `DEFAULT_REPLAY_LIMIT`'s docs promise ("a larger limit
/// costs up to that much memory per in-flight request"). Review 81 saw 2.1 MB and 17 MB
/// for the small frames, review 83 4.2 MB and 1.05 MB for the shared slices.
#[tokio::test(flavor = "current_thread")]
async fn retention_for_a_replay_stays_within_the_limit_whatever_the_framing() {
    let limit = 64 * 1024;
    // Warms up what the first request through a runtime allocates once.
    let _ = kept_alive(4, static_byte, 4).await;
    let tiny = kept_alive(limit, static_byte, limit).await;
    let sliced = kept_alive(limit / 16, slice_of_a_read, limit).await;
    let large = kept_alive(4, slice_of_a_large_read, limit).await;
    let single = kept_alive_limit(1, small_slice_of_a_batch, 64, limit)
        .await
        .0;
    let own = kept_alive(4, own_buffer, limit).await;
    let roomy = kept_alive(4, own_buffer_with_room, limit).await;
    let ends = kept_alive(4, end_of_a_large_buffer, limit).await;
    let mixed = kept_alive(6, own_buffers_and_bytes, 3 * 16 * 1024 + 3).await;
    eprintln!(
        "limit {limit} B; kept alive: 1-byte static frames {tiny} B, 16-byte slices of 4 KiB reads {sliced} B, 16 KiB slices of 1 MiB reads {large} B, one 64 B slice of a 1 MiB batch {single} B, 16 KiB buffers of their own {own} B, 16 KiB in 1 MiB buffers {roomy} B, 16 KiB ends of 1 MiB buffers {ends} B, own buffers and bytes in turn {mixed} B"
    );
    for (what, kept) in [
        ("1-byte frames", tiny),
        ("16-byte slices of 4 KiB reads", sliced),
        ("16 KiB slices of 1 MiB reads", large),
        ("a 64 B body sliced from a 1 MiB batch", single),
        ("16 KiB buffers of their own", own),
        ("16 KiB frames alone in 1 MiB buffers", roomy),
        ("16 KiB ends of 1 MiB buffers", ends),
        ("buffers of their own and bytes in turn", mixed),
    ] {
        assert!(
            kept <= 2 * limit as isize,
            "a {limit} B replay limit kept {kept} B alive for {what}"
        );
    }

    // World (review 90): 21 cycles of a 32,767-byte frame, a one-byte frame and a 16 KiB
    // frame, under a 1 MiB limit, the 16 KiB frames copied or buffers of their own.
    // Proves: a chunk kept shared costs no more than its copy would ("at no more than a
    // copy's cost"): the copied bytes before each shared chunk are not kept in a buffer
    // with room to spare (review 90 saw 1,724,816 B kept against 1,050,592 B copied).
    let limit = 1 << 20;
    let payload = 21 * 49_152;
    let copied = kept_alive_limit(63, cycle_copied, payload, limit).await.0;
    let shared = kept_alive_limit(63, cycle_shared, payload, limit).await.0;
    eprintln!(
        "{payload} B in cycles under a {limit} B limit: {copied} B kept copied, {shared} B with the 16 KiB frames shared"
    );
    assert!(
        shared <= copied + 64 * 1024 && shared <= limit as isize + 64 * 1024,
        "sharing the own buffers kept {shared} B alive, copying them {copied} B (limit {limit} B)"
    );

    // World: a 1 MiB upload read into 64 KiB buffers of its own (taken ahead in part,
    // then streamed), under a 1 MiB limit. Proves: the replay keeps those buffers shared
    // rather than copying them (what the request allocates is the body's own buffers and
    // little more; a copy would double it), and still replays them byte for byte.
    let payload = 1 << 20;
    let (kept, allocated) = kept_alive_limit(16, own_large_buffer, payload, payload).await;
    eprintln!("1 MiB in 64 KiB buffers of its own: {allocated} B allocated, {kept} B kept alive");
    assert!(
        allocated < payload as isize + payload as isize / 8,
        "a 1 MiB body in buffers of its own allocated {allocated} B: its replay copied it"
    );
    assert!(
        kept <= 2 * payload as isize,
        "{kept} B kept alive for 1 MiB"
    );

    // World (review 91): a body of 4 bytes whose trailers fill the default 64 KiB limit as
    // the crate counts them (name, value and 32 bytes an entry): many short distinct
    // names, or one name with many values, all empty. Proves: trailers cost what they
    // count, as data does ("a larger limit costs up to that much memory per in-flight
    // request"; the data above is held to twice the limit): the copy kept for the replay
    // stays within twice the limit.
    let limit = 64 * 1024;
    let (names, names_replaying) = kept_alive_trailers(many_names, false, limit).await;
    let (values, values_replaying) = kept_alive_trailers(many_values, false, limit).await;
    let (streamed, streamed_replaying) = kept_alive_trailers(many_names, true, limit).await;
    let (control, control_replaying) = kept_alive_trailers(one_long_value, false, limit).await;
    let (n, v) = (many_names(), many_values());
    eprintln!(
        "trailers under a {limit} B limit: {} names ({} B counted) kept {names} B alive; {} values of one name ({} B counted) kept {values} B alive; the names streamed kept {streamed} B alive; one long value ({} B counted) kept {control} B alive",
        n.keys_len(),
        counted(&n),
        v.len(),
        counted(&v),
        counted(&one_long_value())
    );
    for (what, kept) in [
        ("distinct names", names),
        ("values of one name", values),
        ("distinct names, streamed", streamed),
        ("one long value (control)", control),
    ] {
        assert!(
            kept <= 2 * limit as isize,
            "a {limit} B replay limit kept {kept} B alive for trailers of {what}"
        );
    }

    // World (review 92): the same trailers, while their replay is in flight (sent, its
    // trailers not yet given: a replay upload streaming its data first). Proves: the
    // replay costs what it counts too: the map made again for it is not the 5.3x
    // `HeaderMap` review 91 took out of the kept copy ("a larger limit costs up to that
    // much memory per in-flight request").
    eprintln!(
        "while the replay is in flight: names {names_replaying} B, values {values_replaying} B, names streamed {streamed_replaying} B, one long value {control_replaying} B"
    );
    for (what, replaying) in [
        ("distinct names", names_replaying),
        ("values of one name", values_replaying),
        ("distinct names, streamed", streamed_replaying),
        ("one long value (control)", control_replaying),
    ] {
        assert!(
            replaying <= 2 * limit as isize,
            "a {limit} B replay limit held {replaying} B for the replay in flight, trailers of {what}"
        );
    }
}
