//! Errors of the source layer, each classed transient (retry) or definite (stop and tell the operator).

/// A Postgres ErrorResponse, fields kept as the server sent them.
#[derive(Debug, Clone, Default)]
pub struct ServerError {
    pub severity: String,
    pub code: String,
    pub message: String,
    pub detail: Option<String>,
    pub hint: Option<String>,
}

impl std::fmt::Display for ServerError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)?;
        if let Some(d) = &self.detail {
            write!(f, " (detail: {d})")?;
        }
        if let Some(h) = &self.hint {
            write!(f, " (hint: {h})")?;
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    #[error("invalid source.url: {0}")]
    BadUrl(String),
    #[error(
        "cannot reach Postgres at {addr}: {source}. Is the server running and is source.url right?"
    )]
    Connect {
        addr: String,
        #[source]
        source: std::io::Error,
    },
    #[error("timed out connecting to Postgres at {0}")]
    ConnectTimeout(String),
    #[error("TLS settings of source.url: {0}")]
    TlsSetup(String),
    #[error(
        "TLS with Postgres at {addr} failed: {reason}. Check sslmode, sslrootcert (the CA that \
        signed the server's certificate) and the host name in source.url; verify-full needs the \
        certificate to name that host"
    )]
    Tls { addr: String, reason: String },
    #[error(
        "Postgres at {0} does not offer TLS, and source.url's sslmode requires it. Enable ssl on \
        the server, or lower sslmode to prefer"
    )]
    TlsRefused(String),
    #[error("authentication failed for user {user:?}: {message}. Check the user and password in source.url")]
    Auth { user: String, message: String },
    #[error("replication slot {slot:?} is in use by another process{pid}, and it did not let go \
        within source.slot_wait_s. Stop the other consumer, or give walden its own slot. When the \
        holder is a consumer that died without closing its connection (a pod on a lost node), end it \
        (`SELECT pg_terminate_backend(pid)`), or set slot.terminate_holder = true so walden does")]
    SlotInUse { slot: String, pid: String },
    #[error("replication slot {slot:?} was invalidated by the server (wal_status = lost: it held back \
        more WAL than max_slot_wal_keep_size allows), so the changes since walden last confirmed \
        are gone from the server and cannot be replicated. To start over: \
        `SELECT pg_drop_replication_slot('{slot}')`, then start walden with snapshot.enabled = true: \
        it creates the slot again and copies every table anew (the changelog will not have the \
        changes in between); or set slot.on_invalidated = \"recreate\" (with snapshots enabled) \
        to have walden do this by itself. To keep it from happening again, raise max_slot_wal_keep_size or keep \
        walden running")]
    SlotInvalidated { slot: String },
    #[error("Postgres refused: {0}")]
    Server(ServerError),
    #[error("connection to Postgres lost: {0}")]
    Io(#[from] std::io::Error),
    #[error("SQL connection error: {0}")]
    Sql(tokio_postgres::Error),
    #[error("replication protocol error: {0}")]
    Protocol(String),
    #[error("{0}")]
    Setup(String),
    /// A table was dropped (and perhaps created again) between reading the publication and
    /// reading the table: the next attempt reads both again.
    #[error("table {0} changed while walden read it (dropped, or dropped and created again); reading it again")]
    Changed(String),
}

impl SourceError {
    /// True when retrying later may succeed without anyone changing anything.
    pub fn is_transient(&self) -> bool {
        match self {
            SourceError::Connect { .. }
            | SourceError::ConnectTimeout(_)
            | SourceError::Io(_)
            | SourceError::Changed(_) => true,
            SourceError::Server(e) => {
                // connection exceptions, operator intervention (shutdown), insufficient resources
                e.code.starts_with("08") || e.code.starts_with("57P") || e.code.starts_with("53")
            }
            SourceError::Sql(e) => e.is_closed() || e.as_db_error().is_none(),
            _ => false,
        }
    }
}

impl SourceError {
    /// A copy of this error of the same class, for the replication I/O task to hand its
    /// consumer (`std::io::Error` is not `Clone`): a lost connection stays transient.
    pub fn relay(&self) -> SourceError {
        match self {
            SourceError::Server(s) => SourceError::Server(s.clone()),
            SourceError::Io(e) => SourceError::Io(std::io::Error::new(e.kind(), e.to_string())),
            SourceError::Protocol(s) => SourceError::Protocol(s.clone()),
            other if other.is_transient() => {
                SourceError::Io(std::io::Error::other(other.to_string()))
            }
            other => SourceError::Protocol(other.to_string()),
        }
    }
}

impl From<tokio_postgres::Error> for SourceError {
    /// Server errors keep their SQLSTATE, message, detail and hint (tokio-postgres' own Display
    /// says only "db error").
    fn from(e: tokio_postgres::Error) -> Self {
        match e.as_db_error() {
            Some(db) => SourceError::Server(ServerError {
                severity: db.severity().to_string(),
                code: db.code().code().to_string(),
                message: db.message().to_string(),
                detail: db.detail().map(str::to_string),
                hint: db.hint().map(str::to_string),
            }),
            None => SourceError::Sql(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn relayed_errors_keep_their_class() {
        let lost = SourceError::Io(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            "server closed the replication connection",
        ));
        let shutdown = SourceError::Server(ServerError {
            code: "57P01".into(),
            ..ServerError::default()
        });
        let refused = SourceError::Server(ServerError {
            code: "42704".into(),
            ..ServerError::default()
        });
        for e in [lost, shutdown, SourceError::ConnectTimeout("h:1".into())] {
            assert!(e.relay().is_transient(), "{e}");
        }
        for e in [refused, SourceError::Protocol("bad frame".into())] {
            assert!(!e.relay().is_transient(), "{e}");
        }
        assert!(SourceError::Io(std::io::Error::other("x"))
            .relay()
            .to_string()
            .contains("connection to Postgres lost"));
    }
}
