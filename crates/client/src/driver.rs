//! The thin tokio driver: one [`Session`] over one stream. It reads whole packets into the
//! session, writes everything the session queued in one write, sleeps until the session's
//! next timeout and hands the session's events to the caller.

use std::future::poll_fn;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::{Instant, Sleep, sleep_until};

use crate::{End, Event, Session};

/// How long the last bytes (a DISCONNECT) may take to leave when a connection ends.
const FAREWELL_TIMEOUT: Duration = Duration::from_secs(2);

/// The first read buffer: small, because thousands of idle connections (the bench's
/// simulated agents) each keep one; it doubles while reads fill it, up to the largest.
const FIRST_READ: usize = 256;
const LARGEST_READ: usize = 64 * 1024;

/// A session driven over a stream (TCP, TLS, WebSocket: what `beckon-net`'s ladder returns).
pub struct Connection<S> {
    stream: S,
    session: Session,
    read_buf: BytesMut,
    /// How much room a read gets; grows while the peer sends more than fits.
    read_chunk: usize,
    write_buf: BytesMut,
    needs_flush: bool,
    timer: Pin<Box<Sleep>>,
}

/// What one wait on the stream and the clock brought.
enum Step {
    Progress,
    Eof,
    Failed(std::io::Error),
    Timeout,
}

impl<S: AsyncRead + AsyncWrite + Unpin> Connection<S> {
    /// Starts a connection: the session queues CONNECT (see [`Session::connect`]); queue
    /// subscriptions next, then wait for [`Event::Connected`].
    pub fn start(stream: S, mut session: Session) -> Self {
        session.connect(now_std());
        Self {
            stream,
            session,
            read_buf: BytesMut::new(),
            read_chunk: FIRST_READ,
            write_buf: BytesMut::new(),
            needs_flush: false,
            timer: Box::pin(sleep_until(Instant::now())),
        }
    }

    /// The session, to read.
    pub fn session(&self) -> &Session {
        &self.session
    }

    /// The session, to publish, subscribe or acknowledge; what it queues goes out on the
    /// next [`next_event`](Self::next_event) or [`flush`](Self::flush).
    pub fn session_mut(&mut self) -> &mut Session {
        &mut self.session
    }

    /// The stream and the session, for the next connection.
    pub fn into_parts(self) -> (S, Session) {
        (self.stream, self.session)
    }

    /// The session's next event; `Err` with the reason once the connection is over (after
    /// its last events). Events waiting are handed over before anything is written, so that
    /// what the caller queues in answer to a burst of events leaves in one write; call
    /// [`flush`](Self::flush) to write at once. Cancel safe: nothing read or written is lost
    /// when another branch of a `select!` wins.
    pub async fn next_event(&mut self) -> Result<Event, End> {
        loop {
            if let Some(event) = self.session.poll_event() {
                return Ok(event);
            }
            if let Some(end) = self.session.end() {
                let end = end.clone();
                self.farewell().await;
                return Err(end);
            }
            self.step().await;
        }
    }

    /// Writes everything the session queued and flushes the stream.
    pub async fn flush(&mut self) -> Result<(), End> {
        loop {
            self.gather();
            if self.write_buf.is_empty() && !self.needs_flush {
                return Ok(());
            }
            if let Some(end) = self.session.end() {
                return Err(end.clone());
            }
            self.step().await;
        }
    }

    /// Sends DISCONNECT (the server keeps the session for its expiry) and shuts the stream.
    pub async fn disconnect(&mut self) {
        self.session.disconnect(now_std());
        self.farewell().await;
    }

    /// Writes what is left (a DISCONNECT) and shuts the stream, within a short time.
    async fn farewell(&mut self) {
        let stream = &mut self.stream;
        let write_buf = &mut self.write_buf;
        write_buf.unsplit(self.session.take_transmit());
        let _ = tokio::time::timeout(FAREWELL_TIMEOUT, async {
            if !write_buf.is_empty() {
                stream.write_all_buf(write_buf).await?;
            }
            stream.flush().await?;
            stream.shutdown().await
        })
        .await;
        write_buf.clear();
        self.needs_flush = false;
    }

    /// Moves the session's queued bytes behind what is not written yet.
    fn gather(&mut self) {
        if self.session.has_transmit() {
            self.write_buf.unsplit(self.session.take_transmit());
        }
    }

    /// One wait: writes, reads or the timer, whichever is ready, fed to the session.
    async fn step(&mut self) {
        self.gather();
        let deadline = self.session.poll_timeout();
        if let Some(deadline) = deadline {
            self.timer.as_mut().reset(Instant::from_std(deadline));
        }
        let Self {
            stream,
            read_buf,
            read_chunk,
            write_buf,
            needs_flush,
            timer,
            ..
        } = self;
        let step = poll_fn(|cx| {
            if !write_buf.is_empty() {
                match Pin::new(&mut *stream).poll_write(cx, write_buf) {
                    Poll::Ready(Ok(0)) => return Poll::Ready(Step::Eof),
                    Poll::Ready(Ok(n)) => {
                        write_buf.advance(n);
                        *needs_flush = true;
                        return Poll::Ready(Step::Progress);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Step::Failed(e)),
                    Poll::Pending => {}
                }
            } else if *needs_flush {
                match Pin::new(&mut *stream).poll_flush(cx) {
                    Poll::Ready(Ok(())) => {
                        *needs_flush = false;
                        return Poll::Ready(Step::Progress);
                    }
                    Poll::Ready(Err(e)) => return Poll::Ready(Step::Failed(e)),
                    Poll::Pending => {}
                }
            }
            if read_buf.capacity() - read_buf.len() < *read_chunk / 4 {
                read_buf.reserve(*read_chunk);
            }
            let room = read_buf.capacity() - read_buf.len();
            match tokio_util::io::poll_read_buf(Pin::new(&mut *stream), cx, read_buf) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Step::Eof),
                Poll::Ready(Ok(n)) => {
                    if n == room {
                        *read_chunk = (*read_chunk * 2).min(LARGEST_READ);
                    }
                    return Poll::Ready(Step::Progress);
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Step::Failed(e)),
                Poll::Pending => {}
            }
            if deadline.is_some() && timer.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Step::Timeout);
            }
            Poll::Pending
        })
        .await;
        let now = now_std();
        match step {
            Step::Progress => {
                if !self.read_buf.is_empty() {
                    self.session.receive(&mut self.read_buf, now);
                }
            }
            Step::Eof => {
                // Packets that came with the close (a DISCONNECT) still count.
                self.session.receive(&mut self.read_buf, now);
                self.session.connection_lost(End::Closed);
            }
            Step::Failed(e) => {
                self.session.receive(&mut self.read_buf, now);
                self.session.connection_lost(End::Io(e.into()));
            }
            Step::Timeout => self.session.handle_timeout(now),
        }
    }
}

/// The tokio clock as a `std` instant, so that a paused test clock drives the session too.
fn now_std() -> std::time::Instant {
    Instant::now().into_std()
}
