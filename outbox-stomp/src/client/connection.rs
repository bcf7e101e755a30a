//! One connection to the broker: the framed socket, the record of when a
//! write last moved bytes, and the writes themselves. A write fails when it
//! moves no byte for the stall limit, so a broker that stopped reading ends
//! the connection instead of holding up the client; a trickling write on a
//! slow link goes on.

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;
use tokio_util::codec::Framed;

use super::Reply;
use crate::codec::{Command, Frame, Received, StompCodec, Version};
use crate::error::{CodecError, Error};
use crate::session::LAST_WORDS;

/// A byte stream the client can run STOMP over.
pub(crate) trait Transport: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Transport for T {}

/// When a write to the socket last moved bytes.
#[derive(Debug)]
pub(crate) struct Progress {
    origin: Instant,
    nanos: AtomicU64,
}

impl Progress {
    pub(crate) fn new() -> Progress {
        Progress {
            origin: Instant::now(),
            nanos: AtomicU64::new(0),
        }
    }

    /// Records progress if a write moved bytes; passes its result on.
    fn after(&self, polled: Poll<io::Result<usize>>) -> Poll<io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = polled
            && n > 0
        {
            let nanos = self.origin.elapsed().as_nanos() as u64;
            self.nanos.store(nanos, Ordering::Relaxed);
        }
        polled
    }

    /// The last time bytes were written.
    pub(crate) fn last(&self) -> Instant {
        self.origin + Duration::from_nanos(self.nanos.load(Ordering::Relaxed))
    }
}

/// The socket with a record of write progress, so a stalled write can be told
/// from a slow one.
pub(crate) struct Tracked {
    io: Box<dyn Transport>,
    progress: Arc<Progress>,
}

impl Tracked {
    /// `io`, whose writes record their progress in `progress`.
    pub(crate) fn new(io: Box<dyn Transport>, progress: Arc<Progress>) -> Tracked {
        Tracked { io, progress }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        self.progress.after(polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.progress.after(polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// A framed connection to the broker.
pub(crate) type Conn = Framed<Box<dyn Transport>, StompCodec>;

/// Why a guarded write did not finish.
#[derive(Debug)]
pub(crate) enum WriteFailure {
    /// No byte moved for the stall limit.
    Stalled,
    /// The socket or the encoder failed.
    Codec(CodecError),
}

/// Runs `write`, failing it once no byte moved for `stall`. A write that
/// trickles (slow link) goes on; one into full buffers (the broker stopped
/// reading) fails.
pub(crate) async fn guarded<F>(
    write: F,
    progress: &Progress,
    stall: Duration,
) -> Result<(), WriteFailure>
where
    F: std::future::Future<Output = Result<(), CodecError>>,
{
    let mut write = std::pin::pin!(write);
    // Most writes complete at once; only a blocked one needs a timer.
    let first = std::future::poll_fn(|cx| Poll::Ready(write.as_mut().poll(cx))).await;
    if let Poll::Ready(done) = first {
        return done.map_err(WriteFailure::Codec);
    }
    let blocked = Instant::now();
    loop {
        let limit = progress.last().max(blocked) + stall;
        tokio::select! {
            done = write.as_mut() => return done.map_err(WriteFailure::Codec),
            _ = tokio::time::sleep_until(limit) => {
                if progress.last().max(blocked) + stall <= Instant::now() {
                    return Err(WriteFailure::Stalled);
                }
            }
        }
    }
}

/// A live connection: where the event loop writes, and what it reads.
pub(crate) struct Connection {
    framed: Conn,
    progress: Arc<Progress>,
    /// How long a write may move no byte.
    stall: Duration,
    /// The broker's address, for errors.
    addr: String,
    /// Callers waiting until their frames are flushed.
    written: Vec<Reply>,
}

impl Connection {
    pub(crate) fn new(
        framed: Conn,
        progress: Arc<Progress>,
        addr: String,
        stall: Duration,
    ) -> Connection {
        Connection {
            framed,
            progress,
            stall,
            addr,
            written: Vec::new(),
        }
    }

    /// The broker's address.
    pub(crate) fn addr(&self) -> &str {
        &self.addr
    }

    /// The STOMP version the connection speaks.
    pub(crate) fn version(&self) -> Version {
        self.framed.codec().version()
    }

    /// The next frame or heart-beat from the broker; `None` once it closed.
    pub(crate) async fn next(&mut self) -> Option<Result<Received, CodecError>> {
        self.framed.next().await
    }

    /// Waits until the write buffer takes another frame.
    pub(crate) async fn ready(&mut self) -> Result<(), WriteFailure> {
        let framed = &mut self.framed;
        let ready = std::future::poll_fn(|cx| {
            futures_util::Sink::<Frame>::poll_ready(Pin::new(&mut *framed), cx)
        });
        guarded(ready, &self.progress, self.stall).await
    }

    /// Writes `frame` into the buffer (and the buffer to the socket when full).
    pub(crate) async fn feed(&mut self, frame: Frame) -> Result<(), WriteFailure> {
        guarded(self.framed.feed(frame), &self.progress, self.stall).await
    }

    /// Answers `reply` once what was written so far is flushed.
    pub(crate) fn answer_when_flushed(&mut self, reply: Reply) {
        self.written.push(reply);
    }

    /// Flushes what was written, then answers the callers waiting for it:
    /// `Ok`, or [`Error::ConnectionLost`] when the flush failed.
    pub(crate) async fn flush(&mut self) -> Result<(), WriteFailure> {
        let flushed = guarded(
            SinkExt::<Frame>::flush(&mut self.framed),
            &self.progress,
            self.stall,
        )
        .await;
        for reply in self.written.drain(..) {
            let answer = match flushed {
                Ok(()) => Ok(()),
                Err(_) => Err(Error::ConnectionLost),
            };
            let _ = reply.send(answer);
        }
        flushed
    }

    /// The connection is over: callers still waiting for a flush learn that
    /// it is lost.
    pub(crate) fn forget_written(&mut self) {
        self.written.clear();
    }

    /// Writes a heart-beat (an end of line) straight to the socket.
    pub(crate) async fn heart_beat(&mut self) -> Result<(), WriteFailure> {
        let io = self.framed.get_mut();
        let beat = async {
            tokio::io::AsyncWriteExt::write_all(io, b"\n")
                .await
                .map_err(CodecError::Io)
        };
        guarded(beat, &self.progress, self.stall).await
    }

    /// The error a failed write ends the connection with.
    pub(crate) fn error(&self, failure: WriteFailure) -> Error {
        match failure {
            WriteFailure::Stalled => Error::WriteStalled {
                addr: self.addr.clone(),
                after: self.stall,
            },
            WriteFailure::Codec(CodecError::Io(source)) => Error::Write {
                addr: self.addr.clone(),
                source,
            },
            WriteFailure::Codec(other) => Error::Codec(other),
        }
    }

    /// Reads what the broker sent before it closed, for at most
    /// [`LAST_WORDS`]: each RECEIPT and ERROR goes to `take`, until it
    /// returns true. Messages are left to redelivery.
    pub(crate) async fn last_words(&mut self, mut take: impl FnMut(Frame) -> bool) {
        let read = async {
            while let Some(Ok(item)) = self.framed.next().await {
                let Received::Frame(frame) = item else {
                    continue;
                };
                if matches!(frame.command(), Command::Receipt | Command::Error) && take(frame) {
                    return;
                }
            }
        };
        let _ = tokio::time::timeout(LAST_WORDS, read).await;
    }

    /// DISCONNECT with a receipt, waiting for it at most `wait_for`, then
    /// shuts the socket down.
    pub(crate) async fn goodbye(&mut self, wait_for: Duration) {
        let frame = Frame::disconnect().with_header("receipt", "disconnect");
        if guarded(self.framed.send(frame), &self.progress, self.stall)
            .await
            .is_ok()
        {
            let wait = async {
                while let Some(Ok(item)) = self.framed.next().await {
                    if let Received::Frame(f) = item
                        && f.command() == Command::Receipt
                        && f.header("receipt-id") == Some("disconnect")
                    {
                        break;
                    }
                }
            };
            let _ = tokio::time::timeout(wait_for, wait).await;
        }
        let shutdown = tokio::io::AsyncWriteExt::shutdown(self.framed.get_mut());
        let _ = tokio::time::timeout(wait_for, shutdown).await;
    }
}
