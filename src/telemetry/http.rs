//! The HTTP endpoint: `GET /metrics` (Prometheus text format), `/healthz` (the process
//! answers), `/readyz` (200 while snapshotting or streaming, 503 otherwise). A minimal HTTP/1.1
//! server (one request per connection) is all scrapers and probes need.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt as _, AsyncWriteExt as _};
use tokio::net::{TcpListener, TcpStream};

use super::{render, HEALTH};

/// A request must arrive whole within this; a slow or stuck client is dropped.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest request head read; scrapers and probes send a few hundred bytes.
const MAX_HEAD: usize = 16 * 1024;

/// Listens on `addr` (an error when the address is taken or invalid: the caller stops) and
/// answers in the background. Returns the bound address.
pub async fn serve(addr: &str) -> std::io::Result<SocketAddr> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    tracing::info!(address = %local, "serving /metrics, /healthz and /readyz");
    tokio::spawn(async move {
        loop {
            match listener.accept().await {
                Ok((stream, _)) => {
                    tokio::spawn(answer(stream));
                }
                Err(e) => {
                    tracing::warn!(error = %e, "metrics endpoint: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        }
    });
    Ok(local)
}

async fn answer(mut stream: TcpStream) {
    let _ = tokio::time::timeout(REQUEST_TIMEOUT, async {
        let mut head = Vec::with_capacity(1024);
        let mut buf = [0u8; 4096];
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            let n = stream.read(&mut buf).await?;
            if n == 0 || head.len() + n > MAX_HEAD {
                return Ok(());
            }
            head.extend_from_slice(&buf[..n]);
        }
        let line = head.split(|b| *b == b'\r').next().unwrap_or_default();
        let line = String::from_utf8_lossy(line);
        let mut parts = line.split_whitespace();
        let (method, target) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
        let (status, content_type, body) = route(method, target);
        let reason = match status {
            200 => "OK",
            404 => "Not Found",
            405 => "Method Not Allowed",
            _ => "Service Unavailable",
        };
        let mut out = format!(
            "HTTP/1.1 {status} {reason}\r\nContent-Type: {content_type}\r\n\
             Content-Length: {}\r\nConnection: close\r\n\r\n",
            body.len()
        )
        .into_bytes();
        if method != "HEAD" {
            out.extend_from_slice(body.as_bytes());
        }
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

/// Status, content type and body for a request.
fn route(method: &str, target: &str) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
    if method != "GET" && method != "HEAD" {
        return (405, TEXT, "only GET and HEAD\n".into());
    }
    let path = target.split('?').next().unwrap_or("");
    match path {
        "/metrics" => (200, "text/plain; version=0.0.4; charset=utf-8", render()),
        "/healthz" => (200, TEXT, "ok\n".into()),
        "/readyz" => {
            let phase = HEALTH.phase();
            let status = if phase.is_ready() { 200 } else { 503 };
            (status, TEXT, format!("{}\n", phase.name()))
        }
        _ => (404, TEXT, "not found: /metrics, /healthz, /readyz\n".into()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routes() {
        assert_eq!(route("GET", "/healthz").0, 200);
        assert_eq!(route("GET", "/metrics?x=1").0, 200);
        assert!(route("GET", "/metrics").2.contains("walden_build_info"));
        assert_eq!(route("POST", "/metrics").0, 405);
        assert_eq!(route("GET", "/nope").0, 404);
    }

    #[tokio::test]
    async fn answers_over_tcp() {
        let addr = serve("127.0.0.1:0").await.unwrap();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut answer = String::new();
        s.read_to_string(&mut answer).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
        assert!(answer.ends_with("\r\n\r\nok\n"), "{answer}");
    }
}
