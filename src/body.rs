//! [`ReplayBody`]: streams a request body through while retaining it for one replay.
//!
//! The inner service sees a `ReplayBody`. It forwards every frame as it arrives (no
//! collecting before sending, no added latency) and keeps a `Bytes` clone of each data
//! chunk (a reference count, never a copy) until the retained total would pass the
//! limit. Past the limit it frees what it kept at once and keeps nothing more; the body
//! is then not replayable, and a 401 reaches the caller as it came.
//!
//! A body is replayable when it was read to its end within the limit, or was empty to
//! begin with. A body the inner service had not finished reading when the response came
//! (the server answered early) is not replayed: its unread rest is still with the first
//! attempt.

use std::{
    fmt,
    pin::Pin,
    sync::{
        Arc, Mutex, MutexGuard, PoisonError,
        atomic::{AtomicBool, Ordering},
    },
    task::{Context, Poll, ready},
};

use bytes::{Buf, Bytes};
use http::HeaderMap;
use http_body::{Body, Frame, SizeHint};
use pin_project_lite::pin_project;

/// Default most bytes of a request body retained for a replay: 64 KiB.
///
/// API requests that carry a credential are mostly small JSON; a larger limit costs up to
/// that much memory per in-flight request. Raise it with
/// [`AuthLayer::replay_limit`](crate::AuthLayer::replay_limit).
pub const DEFAULT_REPLAY_LIMIT: usize = 64 * 1024;

pin_project! {
    /// The request body the inner service receives. See the [module docs](self).
    pub struct ReplayBody<B> {
        #[pin]
        kind: Kind<B>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<B> {
        // Forwarded untouched: passthrough requests, over-limit bodies.
        Forward { #[pin] body: B },
        // Forwarded and recorded for a replay.
        Record { #[pin] body: B, recording: Recording },
        // Played back from what was recorded.
        // Trailers are rare: boxed, so that every request that carries this body (moved
        // a few times on the hot path) is 96 bytes smaller.
        Replay { chunks: std::vec::IntoIter<Bytes>, remaining: u64, trailers: Option<Box<HeaderMap>> },
    }
}

impl<B> fmt::Debug for ReplayBody<B> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let kind = match &self.kind {
            Kind::Forward { .. } => "forward",
            Kind::Record { .. } => "record",
            Kind::Replay { .. } => "replay",
        };
        f.debug_struct("ReplayBody").field("kind", &kind).finish()
    }
}

/// Why a request was not replayed after a rejection. Inserted as an extension into the
/// rejected response that reaches the caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum NotReplayed {
    /// The body was larger than the replay limit.
    BodyTooLarge,
    /// The response came before the inner service had read the whole body.
    BodyIncomplete,
    /// Reading the body failed.
    BodyFailed,
    /// The request opted out with [`NoReplay`](crate::NoReplay), or the layer does not
    /// replay ([`AuthLayer::without_replay`](crate::AuthLayer::without_replay)).
    OptedOut,
    /// This response already answers the replay: never more than one per request.
    AlreadyReplayed,
    /// The credential source never changes its credential
    /// ([`RefreshMode::Never`](crate::RefreshMode::Never), e.g. a
    /// [`StaticCredential`](crate::StaticCredential) of anything but a DPoP token): a
    /// replay would carry the same credential, so nothing was refetched or replayed.
    FixedCredential,
    /// The source handed back the very credential the API had just rejected (a revoked
    /// token not yet rotated, an endpoint re-issuing the same token): a replay would
    /// carry it into the same rejection, so the rejected response is returned as is.
    SameCredential,
    /// The API rejects credentials right after they are issued (a wrong audience or
    /// scope, clock skew at the API): no new credential is fetched before the backoff
    /// allows it, so a server cannot turn every call into a token request. The rejected
    /// response is returned as is.
    FreshCredentialRejected,
    /// The request head could not be kept for a replay (a header name over 64 KiB or a
    /// value over 4 GiB).
    HeadUnavailable,
    /// The API answered that the credential lacks a scope
    /// ([`Verdict::InsufficientScope`](crate::rejection::Verdict::InsufficientScope)),
    /// which a refresh cannot fix; the layer does not step up
    /// ([`AuthLayer::step_up`](crate::AuthLayer::step_up)), or its step-up failed,
    /// brought back the same credential, or is backing off. The response also carries an
    /// [`InsufficientScope`](crate::rejection::InsufficientScope) extension. (With
    /// step-up on, a request that cannot be replayed is marked with why, as after a
    /// rejection, and the step-up still runs for the requests after it.)
    InsufficientScope,
    /// The API asked for a DPoP nonce (`use_dpop_nonce`, RFC 9449 §9) without giving a
    /// usable one in `DPoP-Nonce`: a resend could not carry it, so none was sent, and
    /// the credential, which the answer does not fault, is kept.
    NoNonce,
}

impl<B> ReplayBody<B>
where
    B: Body,
    B::Data: Into<Bytes>,
{
    /// Wraps `body` for recording, with what the response future needs to replay it.
    pub(crate) fn record(body: B, limit: usize) -> (Self, ReplayHandle) {
        if body.is_end_stream() {
            return (ReplayBody::forward(body), ReplayHandle::Empty);
        }
        let hint = body.size_hint();
        if hint.lower() > limit as u64 {
            return (ReplayBody::forward(body), ReplayHandle::TooLarge);
        }
        let recorder = Arc::new(Recorder {
            abandoned: AtomicBool::new(false),
            state: Mutex::new(Recorded::default()),
        });
        let kind = Kind::Record {
            body,
            recording: Recording {
                recorder: recorder.clone(),
                limit,
                chunks: Vec::new(),
                len: 0,
                trailers: None,
                done: false,
            },
        };
        (ReplayBody { kind }, ReplayHandle::Recorded(recorder))
    }
}

/// An empty body that is not recorded, for middleware that make a body from nothing
/// (tower-http's `FollowRedirect` below the layer, on a redirect that drops the body).
impl<B: Default> Default for ReplayBody<B> {
    fn default() -> Self {
        Self::forward(B::default())
    }
}

impl<B> ReplayBody<B> {
    /// Wraps `body` to pass it through as it is: nothing recorded, nothing replayed.
    ///
    /// For sending requests that do not go through the layer (unauthenticated calls)
    /// through the same client, typed for `ReplayBody<B>`:
    ///
    /// ```
    /// use bytes::Bytes;
    /// use http_body_util::Full;
    /// use tower_client_auth::ReplayBody;
    ///
    /// let req = http::Request::get("https://status.example.com/health")
    ///     .body(ReplayBody::new(Full::<Bytes>::default()))
    ///     .unwrap();
    /// # let _ = req;
    /// ```
    pub fn new(body: B) -> Self {
        Self::forward(body)
    }

    /// Forwards `body` without recording it.
    pub(crate) fn forward(body: B) -> Self {
        ReplayBody {
            kind: Kind::Forward { body },
        }
    }

    fn replay(chunks: Vec<Bytes>, trailers: Option<Box<HeaderMap>>) -> Self {
        let remaining = chunks.iter().map(|c| c.len() as u64).sum();
        ReplayBody {
            kind: Kind::Replay {
                chunks: chunks.into_iter(),
                remaining,
                trailers,
            },
        }
    }
}

impl<B> Body for ReplayBody<B>
where
    B: Body,
    B::Data: Into<Bytes>,
{
    type Data = Bytes;
    type Error = B::Error;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, B::Error>>> {
        match self.project().kind.project() {
            KindProj::Forward { body } => body
                .poll_frame(cx)
                .map(|f| f.map(|f| f.map(|f| f.map_data(Into::into)))),
            KindProj::Record {
                mut body,
                recording,
            } => {
                let frame = ready!(body.as_mut().poll_frame(cx));
                let ended = body.is_end_stream();
                let frame = frame.map(|f| f.map(|f| f.map_data(Into::into)));
                recording.observe(frame.as_ref(), ended);
                Poll::Ready(frame)
            }
            KindProj::Replay {
                chunks,
                remaining,
                trailers,
            } => {
                if let Some(chunk) = chunks.next() {
                    *remaining -= chunk.len() as u64;
                    return Poll::Ready(Some(Ok(Frame::data(chunk))));
                }
                Poll::Ready(trailers.take().map(|t| Ok(Frame::trailers(*t))))
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match &self.kind {
            Kind::Forward { body } | Kind::Record { body, .. } => body.is_end_stream(),
            Kind::Replay {
                remaining,
                trailers,
                ..
            } => *remaining == 0 && trailers.is_none(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.kind {
            Kind::Forward { body } | Kind::Record { body, .. } => body.size_hint(),
            Kind::Replay { remaining, .. } => SizeHint::with_exact(*remaining),
        }
    }
}

/// What the body records, held by the body itself while it streams (no lock per chunk)
/// and handed to the [`Recorder`] once, when the body ends or fails or passes the limit.
struct Recording {
    recorder: Arc<Recorder>,
    limit: usize,
    chunks: Vec<Bytes>,
    len: usize,
    trailers: Option<Box<HeaderMap>>,
    done: bool,
}

impl Recording {
    fn observe<E>(&mut self, frame: Option<&Result<Frame<Bytes>, E>>, ended: bool) {
        if self.done {
            return;
        }
        if self.recorder.abandoned.load(Ordering::Relaxed) {
            // Nobody will replay any more: stop keeping chunks, free what was kept.
            return self.finish(Status::Abandoned);
        }
        match frame {
            None => self.finish(Status::Complete),
            Some(Err(_)) => self.finish(Status::Failed),
            Some(Ok(frame)) => {
                if let Some(data) = frame.data_ref() {
                    let len = data.remaining();
                    if self.len + len > self.limit {
                        // Free what was kept at once; keep nothing more.
                        return self.finish(Status::TooLarge);
                    }
                    self.len += len;
                    if len > 0 {
                        self.chunks.push(data.clone());
                    }
                } else if let Some(trailers) = frame.trailers_ref() {
                    self.trailers = Some(Box::new(trailers.clone()));
                }
                if ended {
                    self.finish(Status::Complete);
                }
            }
        }
    }

    /// Publishes the outcome; only a complete recording keeps its chunks.
    fn finish(&mut self, status: Status) {
        self.done = true;
        let chunks = std::mem::take(&mut self.chunks);
        let trailers = self.trailers.take();
        let mut rec = self.recorder.lock();
        if rec.status == Status::Abandoned {
            return;
        }
        rec.status = status;
        if status == Status::Complete {
            rec.chunks = chunks;
            rec.trailers = trailers;
        }
    }

    #[cfg(test)]
    fn retained(&self) -> usize {
        self.chunks.iter().map(Bytes::len).sum::<usize>() + self.recorder.retained()
    }
}

/// Shared between the recording body and the response future.
pub(crate) struct Recorder {
    /// Set when the response future no longer needs a replay.
    abandoned: AtomicBool,
    state: Mutex<Recorded>,
}

#[derive(Default)]
struct Recorded {
    chunks: Vec<Bytes>,
    trailers: Option<Box<HeaderMap>>,
    status: Status,
}

#[derive(Default, Clone, Copy, PartialEq, Eq)]
enum Status {
    /// The body has not ended yet (its chunks are still with the body).
    #[default]
    Recording,
    Complete,
    TooLarge,
    Failed,
    /// Nobody will replay any more: keep nothing.
    Abandoned,
}

impl Recorder {
    fn lock(&self) -> MutexGuard<'_, Recorded> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Marks the recording as unwanted and frees what was published.
    fn abandon(&self) -> Recorded {
        self.abandoned.store(true, Ordering::Relaxed);
        std::mem::replace(
            &mut *self.lock(),
            Recorded {
                status: Status::Abandoned,
                ..Recorded::default()
            },
        )
    }

    #[cfg(test)]
    pub(crate) fn retained(&self) -> usize {
        self.lock().chunks.iter().map(Bytes::len).sum()
    }
}

#[cfg(test)]
impl<B> ReplayBody<B> {
    /// Bytes retained for a replay, wherever they are held now.
    fn retained(&self) -> usize {
        match &self.kind {
            Kind::Record { recording, .. } => recording.retained(),
            _ => 0,
        }
    }
}

/// What the response future keeps to replay the request body.
pub(crate) enum ReplayHandle {
    /// The body was empty: replay an empty body.
    Empty,
    /// The body was known to be over the limit from its size hint.
    TooLarge,
    Recorded(Arc<Recorder>),
}

impl ReplayHandle {
    /// The body for the replay, taking the recorded chunks (there is only one replay).
    pub(crate) fn take<B>(&mut self) -> Result<ReplayBody<B>, NotReplayed> {
        match self {
            ReplayHandle::Empty => Ok(ReplayBody::replay(Vec::new(), None)),
            ReplayHandle::TooLarge => Err(NotReplayed::BodyTooLarge),
            ReplayHandle::Recorded(recorder) => {
                let recorded = recorder.abandon();
                match recorded.status {
                    Status::Complete => Ok(ReplayBody::replay(recorded.chunks, recorded.trailers)),
                    Status::TooLarge => Err(NotReplayed::BodyTooLarge),
                    Status::Failed => Err(NotReplayed::BodyFailed),
                    Status::Recording | Status::Abandoned => Err(NotReplayed::BodyIncomplete),
                }
            }
        }
    }

    #[cfg(test)]
    pub(crate) fn recorder(&self) -> Option<&Arc<Recorder>> {
        match self {
            ReplayHandle::Recorded(r) => Some(r),
            _ => None,
        }
    }
}

impl Drop for ReplayHandle {
    /// Once the response is settled nobody can replay: release the retained chunks now
    /// instead of when the inner service drops the body.
    fn drop(&mut self) {
        if let ReplayHandle::Recorded(recorder) = self {
            drop(recorder.abandon());
        }
    }
}

impl fmt::Debug for ReplayHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("ReplayHandle")
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;

    use http_body_util::{BodyExt, Full, StreamBody};

    use super::*;

    type Chunks = StreamBody<
        futures_util::stream::Iter<std::vec::IntoIter<Result<Frame<Bytes>, Infallible>>>,
    >;

    fn stream(chunks: &[&'static [u8]], trailers: bool) -> Chunks {
        let mut frames: Vec<_> = chunks
            .iter()
            .map(|c| Ok(Frame::data(Bytes::from_static(c))))
            .collect();
        if trailers {
            let mut t = HeaderMap::new();
            t.insert("x-checksum", "abc".parse().unwrap());
            frames.push(Ok(Frame::trailers(t)));
        }
        StreamBody::new(futures_util::stream::iter(frames))
    }

    async fn frames<B>(body: ReplayBody<B>) -> (Vec<u8>, Option<HeaderMap>)
    where
        B: Body,
        B::Data: Into<Bytes>,
        B::Error: std::fmt::Debug,
    {
        let collected = body.collect().await.unwrap();
        let trailers = collected.trailers().cloned();
        (collected.to_bytes().to_vec(), trailers)
    }

    /// A streamed body within the limit passes through unchanged and replays byte for
    /// byte, trailers included; the replay shares the original chunks (no copy).
    #[tokio::test]
    async fn streamed_body_replays_byte_for_byte() {
        let (body, mut handle) =
            ReplayBody::record(stream(&[b"hello ", b"wor", b"ld"], true), 1024);
        let first = frames(body).await;
        assert_eq!(first.0, b"hello world");
        assert_eq!(handle.recorder().unwrap().retained(), 11);
        let replay: ReplayBody<Chunks> = handle.take().unwrap();
        assert_eq!(replay.size_hint().exact(), Some(11));
        let second = frames(replay).await;
        assert_eq!(second, first);
        assert_eq!(second.1.unwrap()["x-checksum"], "abc");
    }

    /// Chunks are retained as `Bytes` clones of the very same buffers.
    #[tokio::test]
    async fn retained_chunks_are_shared_not_copied() {
        let original = Bytes::from(vec![7u8; 4096]);
        let ptr = original.as_ptr();
        let (body, mut handle) = ReplayBody::record(Full::new(original), 8192);
        frames(body).await;
        let mut replay: ReplayBody<Full<Bytes>> = handle.take().unwrap();
        let frame = std::future::poll_fn(|cx| Pin::new(&mut replay).poll_frame(cx))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(frame.data_ref().unwrap().as_ptr(), ptr);
    }

    /// A full body is complete as soon as it reports its end, without another poll.
    #[tokio::test]
    async fn full_body_is_complete_after_its_one_frame() {
        let (mut body, mut handle) = ReplayBody::record(Full::new(Bytes::from_static(b"{}")), 1024);
        let _ = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(body.is_end_stream());
        let replay: ReplayBody<Full<Bytes>> = handle.take().unwrap();
        assert_eq!(frames(replay).await.0, b"{}");
    }

    /// Past the limit the recording is freed at once and nothing more is kept; the
    /// caller's body still streams through whole.
    #[tokio::test]
    async fn over_limit_frees_and_refuses_replay() {
        let (mut body, mut handle) =
            ReplayBody::record(stream(&[b"12345", b"67890", b"abc"], false), 8);
        let first = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert!(first.is_some());
        assert_eq!(body.retained(), 5);
        let _ = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(body.retained(), 0, "freed at the limit");
        let rest = frames(body).await;
        assert_eq!(rest.0, b"abc");
        assert_eq!(
            handle.recorder().unwrap().retained(),
            0,
            "nothing kept past the limit"
        );
        assert_eq!(
            handle.take::<Chunks>().unwrap_err(),
            NotReplayed::BodyTooLarge
        );
    }

    /// A body whose size hint is over the limit is never recorded at all.
    #[tokio::test]
    async fn size_hint_over_limit_is_not_recorded() {
        let (_body, mut handle) = ReplayBody::record(Full::new(Bytes::from(vec![0; 100])), 99);
        assert!(handle.recorder().is_none());
        assert_eq!(
            handle.take::<Full<Bytes>>().unwrap_err(),
            NotReplayed::BodyTooLarge
        );
    }

    /// An empty body is always replayable, even with a zero limit.
    #[tokio::test]
    async fn empty_body_always_replays() {
        let (body, mut handle) = ReplayBody::record(Full::new(Bytes::new()), 0);
        assert!(body.is_end_stream());
        let replay: ReplayBody<Full<Bytes>> = handle.take().unwrap();
        assert!(replay.is_end_stream());
        assert_eq!(frames(replay).await.0, b"");
    }

    /// A body not read to its end (the server answered early) is not replayed, and
    /// whatever was kept is released.
    #[tokio::test]
    async fn partially_read_body_is_not_replayed() {
        let (mut body, mut handle) = ReplayBody::record(stream(&[b"ab", b"cd"], false), 1024);
        let _ = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(body.retained(), 2);
        assert_eq!(
            handle.take::<Chunks>().unwrap_err(),
            NotReplayed::BodyIncomplete
        );
        // The first attempt keeps streaming, but what was kept is freed at its next chunk
        // and nothing more is retained.
        let _ = std::future::poll_fn(|cx| Pin::new(&mut body).poll_frame(cx)).await;
        assert_eq!(body.retained(), 0);
        let _ = frames(body).await;
        assert_eq!(handle.recorder().unwrap().retained(), 0);
    }

    /// Dropping the handle (the response was not a rejection) frees the recording even
    /// while the inner service still holds the body.
    #[tokio::test]
    async fn dropping_the_handle_frees_the_recording() {
        let (body, handle) = ReplayBody::record(stream(&[b"abc"], false), 1024);
        let recorder = handle.recorder().unwrap().clone();
        let _ = frames(body).await;
        assert_eq!(recorder.retained(), 3);
        drop(handle);
        assert_eq!(recorder.retained(), 0);
    }
}
