//! How a connection to the source notices that its peer or the path to it is gone: TCP
//! keepalives and a user timeout on the socket (a dead peer, lost packets), and on the
//! replication stream a receive timeout with a reply request at its half (a path that still
//! acknowledges but delivers nothing).

use std::time::Duration;

/// When the I/O task talks to the server unasked, and how long it listens to silence.
#[derive(Debug, Clone, Copy)]
pub struct StreamTiming {
    /// A standby status update goes out at least this often.
    pub status_interval: Duration,
    /// With nothing from the server for half of this, a status update asks it for a reply (a
    /// keepalive); with nothing for all of it, the connection counts as lost (transient): the
    /// server or the path to it stopped without closing the connection. `None`: never.
    pub receive_timeout: Option<Duration>,
}

impl StreamTiming {
    /// How often the I/O task looks at the clock: often enough to ask in time and to send
    /// status updates on schedule.
    pub(super) fn tick(&self) -> Duration {
        match self.receive_timeout {
            Some(t) => self
                .status_interval
                .min(t / 4)
                .max(Duration::from_millis(50)),
            None => self.status_interval,
        }
    }

    /// What silence since `heard` (the server's last message) calls for.
    pub(super) fn silence(&self, heard: tokio::time::Instant) -> Silence {
        match self.receive_timeout {
            Some(t) if heard.elapsed() >= t => Silence::Lost(t),
            Some(t) if heard.elapsed() >= t / 2 => Silence::Ask,
            _ => Silence::Fine,
        }
    }
}

pub(super) enum Silence {
    Fine,
    /// Ask the server for a reply.
    Ask,
    /// The connection counts as lost after this long.
    Lost(Duration),
}

/// Keepalive probes and the user timeout `config` asks for, on a TCP socket.
pub(super) fn set_keepalive(
    s: &tokio::net::TcpStream,
    config: &tokio_postgres::Config,
) -> std::io::Result<()> {
    if !config.get_keepalives() {
        return Ok(());
    }
    let mut ka = socket2::TcpKeepalive::new().with_time(config.get_keepalives_idle());
    if let Some(i) = config.get_keepalives_interval() {
        ka = ka.with_interval(i);
    }
    if let Some(n) = config.get_keepalives_retries() {
        ka = ka.with_retries(n);
    }
    let sock = socket2::SockRef::from(s);
    sock.set_tcp_keepalive(&ka)?;
    sock.set_tcp_user_timeout(config.get_tcp_user_timeout().copied())
}
