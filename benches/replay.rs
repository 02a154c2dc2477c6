//! Body replay cost: a 16 MiB body streamed in 64 KiB chunks through `AuthLayer` with
//! replay enabled (limit 32 MiB), against the same body sent to the bare inner service.
//! The inner service reads every frame, as an HTTP client writing it out would.
//!
//! The chunks are clones of one buffer, so the layer copies what it keeps; a second run
//! reads the same body in buffers of its own (a file read into exact buffers), which the
//! layer keeps shared.
//!
//! Criterion measures throughput; after it, a plain run prints what criterion cannot:
//! when the first chunk reaches the inner service, and how many bytes the request
//! allocated (a counting global allocator): the copy of the body the layer keeps for
//! its replay.

mod common;

use std::{
    alloc::{GlobalAlloc, Layout, System},
    convert::Infallible,
    hint::black_box,
    sync::atomic::{AtomicUsize, Ordering::Relaxed},
    time::{Duration, Instant},
};

use bytes::Bytes;
use common::{expiring_source, paired};
use criterion::{Criterion, Throughput, criterion_group, criterion_main};
use http::{Request, Response};
use http_body::{Body, Frame};
use http_body_util::{BodyExt, StreamBody};
use tower::{Layer, Service, ServiceExt};
use tower_client_auth::AuthLayer;

/// Counts every byte allocated, so a run can report what one request allocated.
struct Counting;

static ALLOCATED: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards every call to the system allocator unchanged; only counts sizes.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        ALLOCATED.fetch_add(layout.size(), Relaxed);
        // SAFETY: same contract as the caller's.
        unsafe { System.alloc(layout) }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: same contract as the caller's.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const CHUNK: usize = 64 * 1024;
const CHUNKS: usize = 256; // 16 MiB

type Chunks =
    StreamBody<futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>>;

fn body(chunk: &Bytes) -> Chunks {
    let frames: Vec<_> = (0..CHUNKS)
        .map(|_| Ok(Frame::data(chunk.clone())))
        .collect();
    StreamBody::new(futures_util::stream::iter(frames))
}

fn request(chunk: &Bytes) -> Request<Chunks> {
    Request::put("https://api.example.com/v1/blobs/1")
        .body(body(chunk))
        .unwrap()
}

/// The same body read into buffers of its own (a file read into exact buffers): each
/// chunk's buffer is held by nothing else, so the layer keeps it shared, not copied.
fn own_buffers_request() -> Request<Chunks> {
    let frames: Vec<_> = (0..CHUNKS)
        .map(|i| Ok(Frame::data(Bytes::from(vec![i as u8; CHUNK]))))
        .collect();
    Request::put("https://api.example.com/v1/blobs/1")
        .body(StreamBody::new(futures_util::stream::iter(frames)))
        .unwrap()
}

/// `common::paired` for requests made before each timed call (untimed): time(b) /
/// time(a) per round, its quartiles.
fn paired_made(
    rounds: usize,
    make: impl Fn() -> Request<Chunks>,
    mut a: impl FnMut(Request<Chunks>),
    mut b: impl FnMut(Request<Chunks>),
) -> [f64; 3] {
    let mut ratios: Vec<f64> = (0..rounds)
        .map(|round| {
            let (ra, rb) = (make(), make());
            let time = |f: &mut dyn FnMut(Request<Chunks>), r| {
                let start = Instant::now();
                f(r);
                start.elapsed().as_secs_f64()
            };
            let (ta, tb) = if round % 2 == 0 {
                let ta = time(&mut a, ra);
                (ta, time(&mut b, rb))
            } else {
                let tb = time(&mut b, rb);
                (time(&mut a, ra), tb)
            };
            tb / ta
        })
        .collect();
    ratios.sort_by(f64::total_cmp);
    let at = |q: usize| ratios[(ratios.len() - 1) * q / 4];
    [at(1), at(2), at(3)]
}

/// Reads the whole body; notes when the first frame arrived. With `copy`, every byte is
/// copied once into a buffer, as writing it to a socket would; without, frames are
/// dropped untouched (the worst case for the layer: only per-chunk overhead is left).
#[derive(Clone, Copy)]
struct Sink {
    copy: bool,
}

impl<B> Service<Request<B>> for Sink
where
    B: Body + Send + 'static,
    B::Data: Send,
    B::Error: std::fmt::Debug,
{
    type Response = Response<Option<Instant>>;
    type Error = Infallible;
    type Future = std::pin::Pin<
        Box<dyn std::future::Future<Output = Result<Self::Response, Infallible>> + Send>,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Infallible>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        let copy = self.copy;
        Box::pin(async move {
            let mut body = std::pin::pin!(req.into_body());
            let mut first = None;
            let mut out = Vec::with_capacity(if copy { CHUNK } else { 0 });
            while let Some(frame) = body.frame().await {
                first.get_or_insert_with(Instant::now);
                let frame = frame.unwrap();
                if let (true, Some(data)) = (copy, frame.data_ref()) {
                    out.clear();
                    out.extend_from_slice(bytes::Buf::chunk(data));
                    black_box(&out);
                }
                black_box(frame);
            }
            Ok(Response::new(first))
        })
    }
}

fn replay(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let chunk = Bytes::from(vec![0x5a; CHUNK]);
    // A credential that can change: a `StaticCredential` is never replayed (a replay would
    // repeat its 401), so its requests are not recorded at all.
    let layer = AuthLayer::new(expiring_source())
        .any_https_origin()
        .replay_limit(32 << 20);

    for (group, copy) in [
        ("replay_16mib_zero_copy_sink", false),
        ("replay_16mib_copying_sink", true),
    ] {
        let sink = Sink { copy };
        let auth = layer.clone().layer(sink);
        rt.block_on(async { auth.cache().credential().await.unwrap() });
        let mut g = c.benchmark_group(group);
        g.throughput(Throughput::Bytes((CHUNK * CHUNKS) as u64))
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(3));
        g.bench_function("bare_inner", |b| {
            b.to_async(&rt).iter(|| sink.oneshot(request(&chunk)))
        });
        g.bench_function("auth_layer_replay", |b| {
            b.to_async(&rt)
                .iter(|| auth.clone().oneshot(request(&chunk)))
        });
        g.finish();
    }

    // The same ratios measured in pairs: bare and layer alternate request by request, so
    // load that comes and goes on a shared machine hits both sides of each ratio.
    for (label, copy) in [("copying sink", true), ("zero-copy sink", false)] {
        let sink = Sink { copy };
        let auth = layer.clone().layer(sink);
        let [p25, median, p75] = paired(
            200,
            || drop(rt.block_on(sink.oneshot(request(&chunk))).unwrap()),
            || drop(rt.block_on(auth.clone().oneshot(request(&chunk))).unwrap()),
        );
        // paired() gives time(layer) / time(bare); throughput is its inverse.
        println!(
            "replay_16mib/{label}: throughput x bare, 200 interleaved pairs: median {:.3} (quartiles {:.3}-{:.3})",
            1.0 / median,
            1.0 / p75,
            1.0 / p25
        );
    }

    // The body in buffers of its own, kept shared: made before each timed call.
    for (label, copy) in [("copying sink", true), ("zero-copy sink", false)] {
        let sink = Sink { copy };
        let auth = layer.clone().layer(sink);
        let [p25, median, p75] = paired_made(
            200,
            own_buffers_request,
            |r| drop(rt.block_on(sink.oneshot(r)).unwrap()),
            |r| drop(rt.block_on(auth.clone().oneshot(r)).unwrap()),
        );
        println!(
            "replay_16mib_own_buffers/{label}: throughput x bare, 200 interleaved pairs: median {:.3} (quartiles {:.3}-{:.3})",
            1.0 / median,
            1.0 / p75,
            1.0 / p25
        );
    }

    // What criterion does not show: first-chunk latency and bytes allocated per request.
    let sink = Sink { copy: false };
    let auth = layer.layer(sink);
    let report = |name: &str, run: &mut dyn FnMut() -> (Duration, usize)| -> usize {
        let runs: Vec<_> = (0..50).map(|_| run()).collect();
        let mut first: Vec<_> = runs.iter().map(|r| r.0).collect();
        first.sort();
        let allocated = runs.iter().map(|r| r.1).min().unwrap();
        println!(
            "replay_16mib/{name}: first chunk after {:.2} µs (median of 50), {} bytes allocated per request ({:.3}% of the body)",
            first[25].as_secs_f64() * 1e6,
            allocated,
            allocated as f64 * 100.0 / (CHUNK * CHUNKS) as f64
        );
        allocated
    };
    let shared_chunks = || request(&chunk);
    let measure =
        |make: &dyn Fn() -> Request<Chunks>,
         svc: &mut dyn FnMut(Request<Chunks>) -> Response<Option<Instant>>| {
            let req = make();
            let before = ALLOCATED.load(Relaxed);
            let start = Instant::now();
            let res = svc(req);
            let allocated = ALLOCATED.load(Relaxed) - before;
            (res.into_body().unwrap() - start, allocated)
        };
    let bare = report("bare_inner", &mut || {
        measure(&shared_chunks, &mut |r| {
            rt.block_on(sink.oneshot(r)).unwrap()
        })
    });
    let recorded = report("auth_layer_replay", &mut || {
        measure(&shared_chunks, &mut |r| {
            rt.block_on(auth.clone().oneshot(r)).unwrap()
        })
    });
    let own_bare = report("own_buffers/bare_inner", &mut || {
        measure(&own_buffers_request, &mut |r| {
            rt.block_on(sink.oneshot(r)).unwrap()
        })
    });
    let own_recorded = report("own_buffers/auth_layer_replay", &mut || {
        measure(&own_buffers_request, &mut |r| {
            rt.block_on(auth.clone().oneshot(r)).unwrap()
        })
    });
    // Buffers of their own are kept shared, each in a slot of the recording: with no
    // slot per chunk, the body was not recorded and the second run measured nothing.
    assert!(
        own_recorded >= own_bare + CHUNKS * std::mem::size_of::<Bytes>(),
        "the layer did not record the body in buffers of its own: {own_recorded} bytes allocated vs {own_bare} bare"
    );
    // The layer keeps a copy of the body: if it kept less, it did not record the body
    // and this benchmark measured nothing.
    assert!(
        recorded >= bare + CHUNKS * std::mem::size_of::<Bytes>(),
        "the layer did not record the body: {recorded} bytes allocated vs {bare} bare"
    );
}

criterion_group!(benches, replay);
criterion_main!(benches);
