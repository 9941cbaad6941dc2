//! Sockets to the source, for the replication and the SQL connections alike.
//!
//! Owns how a connection string's hosts are tried (in order, each within the connect timeout),
//! the TCP settings of every socket (no delay, keepalives and user timeout, the receive buffer of
//! [`super::coalesce`]), and [`Answering`]: a request the server does not start to answer within
//! `source.receive_timeout_s` is an error. That is what ends a SQL query over a path that stopped
//! delivering without closing (a stuck middlebox; keepalives are answered by the middlebox), which
//! would otherwise wait forever; the replication stream has its own, finer watch
//! ([`super::liveness`]).

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpStream, UnixStream};
use tokio::time::Sleep;

use super::coalesce::TcpTuning;
use super::SourceError;

/// A socket to one host, before TLS.
pub enum Raw {
    Tcp(TcpStream, TcpTuning),
    Unix(UnixStream),
}

/// A socket to the first host of the connection string that answered.
pub struct Opened {
    pub stream: Raw,
    /// The host name (for TLS), when it is TCP.
    pub host: Option<String>,
    /// Where it goes, for messages.
    pub addr: String,
}

/// Connects to the first host of `config` that answers within its connect timeout.
pub async fn open(
    config: &tokio_postgres::Config,
    receive_buffer: Option<u32>,
) -> Result<Opened, SourceError> {
    use tokio_postgres::config::Host;
    let timeout = config
        .get_connect_timeout()
        .copied()
        .unwrap_or(Duration::from_secs(10));
    let ports = config.get_ports();
    let targets: Vec<(String, Option<String>)> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| {
            let port = ports.get(i).or(ports.first()).copied().unwrap_or(5432);
            match host {
                Host::Tcp(h) => (format!("{h}:{port}"), Some(h.clone())),
                Host::Unix(dir) => (
                    dir.join(format!(".s.PGSQL.{port}")).display().to_string(),
                    None,
                ),
            }
        })
        .collect();
    let mut last_err = None;
    for (addr, name) in targets {
        let connecting = connect_one(&addr, name.is_some(), config, receive_buffer);
        match tokio::time::timeout(timeout, connecting).await {
            Ok(Ok(stream)) => {
                return Ok(Opened {
                    stream,
                    host: name,
                    addr,
                })
            }
            Ok(Err(e)) => last_err = Some(e),
            Err(_) => last_err = Some(SourceError::ConnectTimeout(addr)),
        }
    }
    Err(last_err.unwrap_or_else(|| SourceError::BadUrl("source.url names no host".into())))
}

/// Connects to `addr` (a TCP `host:port`, or a Unix socket's path).
async fn connect_one(
    addr: &str,
    tcp: bool,
    config: &tokio_postgres::Config,
    receive_buffer: Option<u32>,
) -> Result<Raw, SourceError> {
    let lost = |source| SourceError::Connect {
        addr: addr.to_string(),
        source,
    };
    if !tcp {
        return Ok(Raw::Unix(UnixStream::connect(addr).await.map_err(lost)?));
    }
    let (s, receive_buffer) = connect_tcp(addr, receive_buffer).await.map_err(lost)?;
    s.set_nodelay(true).map_err(lost)?;
    super::liveness::set_keepalive(&s, config).map_err(lost)?;
    let fd = std::os::fd::AsRawFd::as_raw_fd(&s);
    Ok(Raw::Tcp(s, TcpTuning { fd, receive_buffer }))
}

/// Connects to the first address of `addr` that answers, with the receive buffer chosen by
/// [`TcpTuning::receive_buffer_for`] (see [`super::coalesce`]).
async fn connect_tcp(addr: &str, configured: Option<u32>) -> io::Result<(TcpStream, Option<u32>)> {
    let mut last = None;
    for sa in tokio::net::lookup_host(addr).await? {
        let sock = if sa.is_ipv4() {
            tokio::net::TcpSocket::new_v4()?
        } else {
            tokio::net::TcpSocket::new_v6()?
        };
        let receive_buffer = TcpTuning::receive_buffer_for(configured, sa.ip().is_loopback());
        if let Some(n) = receive_buffer {
            sock.set_recv_buffer_size(n)?;
        }
        match sock.connect(sa).await {
            Ok(s) => return Ok((s, receive_buffer)),
            Err(e) => last = Some(e),
        }
    }
    Err(last
        .unwrap_or_else(|| io::Error::new(io::ErrorKind::NotFound, "the host name has no address")))
}

/// A stream on which a request must start to be answered within `limit`: after bytes are
/// written, the first byte read must come within `limit`, or reading fails with `TimedOut`. An
/// idle connection (everything written has been answered) never times out. A response that
/// stops halfway is not caught (the next request is).
pub struct Answering<S> {
    inner: S,
    limit: Option<Duration>,
    /// Set by the first write after the last read.
    deadline: Option<Pin<Box<Sleep>>>,
}

impl<S> Answering<S> {
    /// `limit`: `None` watches nothing.
    pub fn new(inner: S, limit: Option<Duration>) -> Self {
        Answering {
            inner,
            limit,
            deadline: None,
        }
    }

    /// The stream, no longer watched.
    pub fn into_inner(self) -> S {
        self.inner
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Answering<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        match Pin::new(&mut self.inner).poll_read(cx, buf) {
            Poll::Ready(Ok(())) => {
                if buf.filled().len() > before {
                    self.deadline = None;
                }
                Poll::Ready(Ok(()))
            }
            Poll::Pending => {
                let expired = self
                    .deadline
                    .as_mut()
                    .is_some_and(|d| d.as_mut().poll(cx).is_ready());
                if expired {
                    return Poll::Ready(Err(io::Error::new(
                        io::ErrorKind::TimedOut,
                        "the server did not answer within source.receive_timeout_s",
                    )));
                }
                Poll::Pending
            }
            other => other,
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Answering<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = Pin::new(&mut self.inner).poll_write(cx, data);
        if let (Poll::Ready(Ok(n)), None, Some(limit)) = (&written, &self.deadline, self.limit) {
            if *n > 0 {
                let mut deadline = Box::pin(tokio::time::sleep(limit));
                // Registers this task's waker: when the deadline passes, the task is polled
                // again, and its read then fails (the reader may not poll before that).
                let _ = deadline.as_mut().poll(cx);
                self.deadline = Some(deadline);
            }
        }
        written
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_request_times_out_an_idle_connection_does_not() {
        let (client, mut server) = tokio::io::duplex(64);
        let mut watched = Answering::new(client, Some(Duration::from_secs(5)));
        let mut byte = [0u8; 1];
        // Idle: nothing written, nothing expected.
        let idle = tokio::time::timeout(Duration::from_secs(60), watched.read(&mut byte)).await;
        assert!(idle.is_err(), "an idle connection must not time out");
        // Answered within the limit.
        watched.write_all(b"q").await.unwrap();
        server.read_exact(&mut byte).await.unwrap();
        tokio::time::sleep(Duration::from_secs(4)).await;
        server.write_all(b"a").await.unwrap();
        watched.read_exact(&mut byte).await.unwrap();
        // Answered, then idle again: still fine.
        let idle = tokio::time::timeout(Duration::from_secs(60), watched.read(&mut byte)).await;
        assert!(idle.is_err());
        // Not answered.
        watched.write_all(b"q").await.unwrap();
        let e = watched.read(&mut byte).await.unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut);
        // No limit: waits.
        let (client, _server) = tokio::io::duplex(64);
        let mut unwatched = Answering::new(client, None);
        unwatched.write_all(b"q").await.unwrap();
        let waited =
            tokio::time::timeout(Duration::from_secs(600), unwatched.read(&mut byte)).await;
        assert!(waited.is_err());
    }
}
