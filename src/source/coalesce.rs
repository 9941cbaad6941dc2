//! Fewer wake-ups of the replication reader while the stream is busy (`SO_RCVLOWAT`).
//!
//! pgoutput sends one message per change and the walsender pushes each one to the socket at
//! once, so a reader waiting on the socket is woken for every few changes; on the same host the
//! cost of each wake-up is paid inside the walsender's send path, and the walsender is what limits
//! the stream's rate. While data keeps arriving, the kernel is asked to signal readability only
//! once [`LOWAT`] bytes are queued. When no read happened for [`QUIET`] (the flow slowed or
//! stopped), the reader takes what is queued with a direct non-blocking read and the threshold
//! returns to one byte: no message waits longer than [`QUIET`], keepalives included.
//!
//! On a loopback connection (walden beside Postgres) the receive buffer is also kept small
//! ([`LOOPBACK_RCVBUF`]; no bandwidth-delay product to cover there; `source.receive_buffer_bytes`
//! overrides it). The receive window is then closed most of the time, so the walsender's
//! per-change sends only queue data in its socket and the kernel moves it in large segments when
//! walden reads, instead of running the whole TCP path once per change. Measured: the walsender needs ~35% less CPU for the same WAL
//! (`bench/RESULTS.md`); a remote connection keeps the kernel's autotuned buffer.
//!
//! Plain TCP only: [`Coalescer::quiet`] reads the socket directly, which under TLS would bypass
//! the TLS layer (and corrupt its records), so an encrypted connection gets no [`TcpTuning`]: it
//! keeps the receive buffer chosen at connect time and is read through the TLS stream alone.

use std::io::Read;
use std::os::fd::{FromRawFd, RawFd};
use std::time::Duration;

use bytes::BytesMut;
use tokio::time::Instant;

/// Bytes that must be queued before the kernel wakes the reader while the stream is busy.
const LOWAT: i32 = 16 * 1024;
/// The same with a small receive buffer (such as [`LOOPBACK_RCVBUF`]): at most this, at most half
/// the buffer.
const LOWAT_SMALL_BUFFER: i32 = 8 * 1024;
/// Receive buffer asked for on a loopback connection (the kernel doubles it for bookkeeping).
pub const LOOPBACK_RCVBUF: u32 = 16 * 1024;

/// The replication connection's TCP socket.
#[derive(Debug, Clone, Copy)]
pub struct TcpTuning {
    pub fd: RawFd,
    /// The receive buffer asked for (None: the kernel's autotuned one).
    pub receive_buffer: Option<u32>,
}

impl TcpTuning {
    /// The receive buffer to ask for: `configured` (0 = the kernel's), or by default
    /// [`LOOPBACK_RCVBUF`] on a loopback address (walden beside Postgres, e.g. a sidecar; there is
    /// no bandwidth-delay product to cover) and the kernel's otherwise.
    pub fn receive_buffer_for(configured: Option<u32>, loopback: bool) -> Option<u32> {
        match configured {
            Some(0) => None,
            Some(n) => Some(n),
            None => loopback.then_some(LOOPBACK_RCVBUF),
        }
    }
}

/// Reads closer together than this mean the stream is busy.
const BUSY: Duration = Duration::from_millis(1);
/// Without a read for this long, the threshold goes back to one byte.
pub const QUIET: Duration = Duration::from_millis(3);

pub struct Coalescer {
    fd: Option<RawFd>,
    lowat: i32,
    raised: bool,
    last_read: Instant,
}

impl Coalescer {
    /// `tcp`: the TCP socket (None for a Unix socket: nothing is tuned).
    pub fn new(tcp: Option<TcpTuning>) -> Self {
        Coalescer {
            fd: tcp.map(|t| t.fd),
            lowat: match tcp.and_then(|t| t.receive_buffer) {
                Some(n) => LOWAT_SMALL_BUFFER
                    .min(i32::try_from(n / 2).unwrap_or(i32::MAX))
                    .max(1),
                None => LOWAT,
            },
            raised: false,
            last_read: Instant::now(),
        }
    }

    /// Call after every read that returned data.
    pub fn on_read(&mut self) {
        let now = Instant::now();
        if !self.raised && now.duration_since(self.last_read) < BUSY {
            if let Some(fd) = self.fd {
                self.raised = set_rcvlowat(fd, self.lowat).is_ok();
            }
        }
        self.last_read = now;
    }

    /// When [`Coalescer::quiet`] is due, if the threshold is raised.
    pub fn deadline(&self) -> Option<Instant> {
        self.raised.then(|| self.last_read + QUIET)
    }

    /// The stream went quiet: appends what is queued (less than the threshold) to `buf` and lowers
    /// the threshold. Returns the bytes read; an error when the server closed the connection.
    pub fn quiet(&mut self, buf: &mut BytesMut) -> std::io::Result<usize> {
        let Some(fd) = self.fd else { return Ok(0) };
        self.raised = false;
        set_rcvlowat(fd, 1)?;
        // SAFETY: `fd` is the open socket owned by the connection for as long as this reader
        // runs; ManuallyDrop keeps this temporary handle from closing it.
        let mut sock = std::mem::ManuallyDrop::new(unsafe { std::net::TcpStream::from_raw_fd(fd) });
        let mut chunk = [0u8; 16 * 1024];
        let mut total = 0;
        loop {
            match sock.read(&mut chunk) {
                Ok(0) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        "server closed the replication connection",
                    ))
                }
                Ok(n) => {
                    buf.extend_from_slice(&chunk[..n]);
                    total += n;
                }
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            }
        }
        if total > 0 {
            self.last_read = Instant::now();
        }
        Ok(total)
    }
}

fn set_rcvlowat(fd: RawFd, bytes: i32) -> std::io::Result<()> {
    // SAFETY: setsockopt reads `size_of::<c_int>()` bytes from a valid c_int.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            &bytes as *const i32 as *const libc::c_void,
            std::mem::size_of::<i32>() as libc::socklen_t,
        )
    };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn receive_buffer_choice() {
        assert_eq!(
            TcpTuning::receive_buffer_for(None, true),
            Some(LOOPBACK_RCVBUF)
        );
        assert_eq!(TcpTuning::receive_buffer_for(None, false), None);
        assert_eq!(TcpTuning::receive_buffer_for(Some(0), true), None);
        assert_eq!(
            TcpTuning::receive_buffer_for(Some(65536), false),
            Some(65536)
        );
    }

    #[tokio::test]
    async fn data_below_the_threshold_is_read_when_quiet() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, _) = listener.accept().unwrap();
        server.set_nonblocking(true).unwrap();
        let fd = std::os::fd::AsRawFd::as_raw_fd(&server);
        let mut c = Coalescer::new(Some(TcpTuning {
            fd,
            receive_buffer: Some(LOOPBACK_RCVBUF),
        }));
        c.on_read();
        c.on_read();
        assert!(
            c.deadline().is_some(),
            "two quick reads raise the threshold"
        );
        client.write_all(b"keepalive").unwrap();
        std::thread::sleep(Duration::from_millis(20));
        let mut buf = BytesMut::new();
        assert_eq!(c.quiet(&mut buf).unwrap(), 9);
        assert_eq!(&buf[..], b"keepalive");
        assert!(c.deadline().is_none(), "threshold lowered");
        drop(client);
        std::thread::sleep(Duration::from_millis(20));
        c.raised = true;
        assert!(
            c.quiet(&mut buf).is_err(),
            "a closed connection is an error"
        );
    }
}
