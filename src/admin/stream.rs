//! `GET /events`: the event bus as Server-Sent Events. A reply whose body
//! is the listener's missed events, then its queue, with a comment every
//! [`KEEP_ALIVE`] while nothing happens so that proxies keep it open.
//!
//! The stream ends when the bus closes (shutdown, or a new process took
//! over), when the admin API stops, and, for a client that fell
//! [`CLIENT_QUEUE`](crate::events::CLIENT_QUEUE) events behind, by its
//! connection being cut (`cut`): hyper would otherwise wait on the full
//! socket forever, holding an admin connection slot.

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use hyper::body::{Body, Bytes, Frame};
use hyper::header::{self, HeaderValue};
use hyper::{Response, StatusCode};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, WaitForCancellationFutureOwned};

use crate::events::Bus;

/// How long a quiet stream waits before a comment line.
pub const KEEP_ALIVE: Duration = Duration::from_secs(15);

/// The first bytes: a comment, so the reply starts at once, and how long
/// a browser's `EventSource` waits before it reconnects.
const PREAMBLE: &[u8] = b": sluice events\nretry: 1000\n\n";

/// The body of an event stream.
pub struct Stream {
    replay: std::vec::IntoIter<Bytes>,
    queue: mpsc::Receiver<Bytes>,
    stop: Pin<Box<WaitForCancellationFutureOwned>>,
    keep_alive: Pin<Box<tokio::time::Sleep>>,
}

/// The reply to `GET /events`: subscribes now, so nothing published from
/// here on is missed. `stop` ends the stream; the bus cuts the connection
/// through `cut` when the client falls behind.
pub fn reply(
    bus: &Bus,
    last_event_id: Option<u64>,
    stop: &CancellationToken,
    cut: &CancellationToken,
) -> Response<Stream> {
    let sub = bus.subscribe(last_event_id, cut.clone());
    let mut replay = vec![Bytes::from_static(PREAMBLE)];
    replay.extend(sub.replay);
    let body = Stream {
        replay: replay.into_iter(),
        queue: sub.queue,
        stop: Box::pin(stop.clone().cancelled_owned()),
        keep_alive: Box::pin(tokio::time::sleep(KEEP_ALIVE)),
    };
    let mut r = Response::new(body);
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    // nginx would buffer the stream otherwise.
    h.insert("x-accel-buffering", HeaderValue::from_static("no"));
    r
}

impl Stream {
    fn rearm(&mut self) {
        let at = tokio::time::Instant::now() + KEEP_ALIVE;
        self.keep_alive.as_mut().reset(at);
    }
}

impl Body for Stream {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        let this = &mut *self;
        if let Some(b) = this.replay.next() {
            return Poll::Ready(Some(Ok(Frame::data(b))));
        }
        // What is queued first: the bus closes before the admin API stops,
        // so the last events (`shutdown`) still go out.
        match this.queue.poll_recv(cx) {
            Poll::Ready(Some(b)) => {
                this.rearm();
                return Poll::Ready(Some(Ok(Frame::data(b))));
            }
            // The bus closed, or cut this listener off.
            Poll::Ready(None) => return Poll::Ready(None),
            Poll::Pending => {}
        }
        if this.stop.as_mut().poll(cx).is_ready() {
            return Poll::Ready(None);
        }
        if this.keep_alive.as_mut().poll(cx).is_ready() {
            this.rearm();
            return Poll::Ready(Some(Ok(Frame::data(Bytes::from_static(
                b": keep-alive\n\n",
            )))));
        }
        Poll::Pending
    }
}
