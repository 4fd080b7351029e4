//! Connection ageing, as gRPC's `MaxConnectionAge` and
//! `MaxConnectionAgeGrace` do it.
//!
//! gRPC clients keep one HTTP/2 connection for ever, so after a scale-up
//! or a rollout new pods get no traffic. After the maximum age the server
//! sends GOAWAY (tonic's `max_connection_age`, given no grace: it then
//! shuts the connection down gracefully), clients open a new connection
//! for new calls, and the calls in flight may finish. After the grace, the
//! connection is closed whatever is still open (a watch stream, a stalled
//! call): that is this wrapper, which ends the connection's I/O once the
//! age and the grace have passed. (Tonic's own grace, when set, skips the
//! GOAWAY and only closes the connection; hence this.)

use std::{
    future::Future,
    io,
    pin::Pin,
    task::{Context, Poll},
    time::Duration,
};

use tokio::{
    io::{AsyncRead, AsyncWrite, ReadBuf},
    time::{Instant, Sleep},
};
use tonic::transport::server::Connected;

/// A connection that stops working at a deadline.
pub struct Aged<IO> {
    io: IO,
    end: Pin<Box<Sleep>>,
}

impl<IO> Aged<IO> {
    pub fn new(io: IO, age: Duration, grace: Duration) -> Self {
        Self {
            io,
            end: Box::pin(tokio::time::sleep_until(Instant::now() + age + grace)),
        }
    }

    fn ended(&mut self, cx: &mut Context<'_>) -> bool {
        self.end.as_mut().poll(cx).is_ready()
    }
}

fn closed() -> io::Error {
    io::Error::new(
        io::ErrorKind::ConnectionAborted,
        "connection past its maximum age and grace",
    )
}

impl<IO: AsyncRead + Unpin> AsyncRead for Aged<IO> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        if self.ended(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<IO: AsyncWrite + Unpin> AsyncWrite for Aged<IO> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, data: &[u8]) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        if self.ended(cx) {
            return Poll::Ready(Err(closed()));
        }
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

impl<IO: Connected> Connected for Aged<IO> {
    type ConnectInfo = IO::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.io.connect_info()
    }
}
