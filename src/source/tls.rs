//! TLS to Postgres as libpq does it, with rustls, for the replication and the SQL connections.
//!
//! Owns libpq's TLS parameters: `sslmode` (disable, allow, prefer, require, verify-ca,
//! verify-full), `sslrootcert` (a PEM file of CA certificates, or `system` for the operating
//! system's roots), `sslcert` + `sslkey` (a client certificate), from the connection string or the
//! `PGSSLMODE`, `PGSSLROOTCERT`, `PGSSLCERT`, `PGSSLKEY` environment variables (the string wins),
//! with libpq's defaults: `prefer`, and `~/.postgresql/root.crt`, `postgresql.crt`, `postgresql.key`
//! when present. They are taken out of the string before tokio-postgres parses the rest.
//!
//! Modes, as in libpq: `prefer` and `allow` use TLS when the server offers it and check nothing
//! (walden tries TLS first in both); `require` insists on TLS and checks the certificate against
//! `sslrootcert` only when one is given; `verify-ca` checks that a trusted CA signed it;
//! `verify-full` also that it names the host connected to.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::WebPkiServerVerifier;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};

use bytes::BytesMut;
use postgres_protocol::message::frontend;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;

use super::SourceError;

/// A connection's byte stream, plain or encrypted.
pub trait Stream: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Stream for T {}

/// A negotiated connection: its stream, and whether that is encrypted.
pub type Negotiated = (Box<dyn Stream>, bool);

/// Asks the server at `addr` for TLS on a fresh `tcp` connection (Postgres's SSLRequest) and
/// makes the handshake as `tls` says; a server that declines is used in the clear only when the
/// mode allows it.
pub async fn negotiate(
    mut tcp: TcpStream,
    tls: &Tls,
    host: &str,
    addr: &str,
) -> Result<Negotiated, SourceError> {
    if !tls.mode.attempted() {
        return Ok((Box::new(tcp), false));
    }
    let lost = |source| SourceError::Connect {
        addr: addr.to_string(),
        source,
    };
    let mut request = BytesMut::new();
    frontend::ssl_request(&mut request);
    tcp.write_all(&request).await.map_err(lost)?;
    let mut answer = [0u8];
    tcp.read_exact(&mut answer).await.map_err(lost)?;
    match answer[0] {
        b'S' => {}
        b'N' if tls.mode.required() => return Err(SourceError::TlsRefused(addr.to_string())),
        b'N' => return Ok((Box::new(tcp), false)),
        other => {
            return Err(SourceError::Protocol(format!(
                "unexpected answer {other:#04x} to the TLS request"
            )))
        }
    }
    let connector = tokio_rustls::TlsConnector::from(tls.client_config());
    match connector.connect(server_name(host)?, tcp).await {
        Ok(s) => Ok((Box::new(s), true)),
        Err(e) => match tls_failure(&e) {
            Some(reason) => Err(SourceError::Tls {
                addr: addr.to_string(),
                reason,
            }),
            None => Err(lost(e)),
        },
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    Disable,
    Allow,
    Prefer,
    Require,
    VerifyCa,
    VerifyFull,
}

impl SslMode {
    fn parse(s: &str) -> Result<Self, SourceError> {
        Ok(match s {
            "disable" => SslMode::Disable,
            "allow" => SslMode::Allow,
            "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(SourceError::BadUrl(format!(
                    "sslmode={other} is not one of disable, allow, prefer, require, verify-ca, \
                     verify-full"
                )))
            }
        })
    }

    /// The server must speak TLS.
    pub fn required(self) -> bool {
        matches!(
            self,
            SslMode::Require | SslMode::VerifyCa | SslMode::VerifyFull
        )
    }

    /// Ask the server for TLS at all.
    pub fn attempted(self) -> bool {
        self != SslMode::Disable
    }
}

/// Where trusted CA certificates come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Roots {
    File(PathBuf),
    System,
}

/// The TLS settings of one connection string, and the rustls configuration they make.
#[derive(Clone)]
pub struct Tls {
    pub mode: SslMode,
    config: Arc<ClientConfig>,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls").field("mode", &self.mode).finish()
    }
}

impl Tls {
    pub fn client_config(&self) -> Arc<ClientConfig> {
        Arc::clone(&self.config)
    }
}

/// The parameters as written, before files are read.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct TlsParams {
    pub mode: Option<String>,
    pub root_cert: Option<String>,
    pub cert: Option<String>,
    pub key: Option<String>,
}

/// Parameters walden takes out of the string and ignores, because rustls decides them (protocol
/// versions, SNI, compression), and those it refuses with the fix.
const IGNORED: &[&str] = &[
    "sslsni",
    "sslcompression",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
];
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "sslpassword",
        "decrypt the key first (openssl pkey -in KEY -out KEY.plain)",
    ),
    ("sslcrl", "revocation lists are not checked; remove it"),
    ("sslcrldir", "revocation lists are not checked; remove it"),
    (
        "sslnegotiation",
        "walden negotiates TLS the classic way; remove it",
    ),
];

/// Splits libpq's TLS parameters off `url` (a `postgres://` URL or a `key=value` string).
pub fn split(url: &str) -> Result<(String, TlsParams), SourceError> {
    let mut params = TlsParams::default();
    let mut take = |k: &str, v: String| -> Result<bool, SourceError> {
        if let Some((_, fix)) = UNSUPPORTED.iter().find(|(u, _)| *u == k) {
            return Err(SourceError::BadUrl(format!(
                "walden does not support the connection parameter {k}: {fix}"
            )));
        }
        let slot = match k {
            "sslmode" => &mut params.mode,
            "sslrootcert" => &mut params.root_cert,
            "sslcert" => &mut params.cert,
            "sslkey" => &mut params.key,
            k => return Ok(IGNORED.contains(&k)),
        };
        *slot = Some(v);
        Ok(true)
    };
    let rest = if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_string(), params));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            let v = url::form_urlencoded::parse(format!("v={v}").as_bytes())
                .next()
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            if !take(k, v)? {
                kept.push(pair);
            }
        }
        if kept.is_empty() {
            base.to_string()
        } else {
            format!("{base}?{}", kept.join("&"))
        }
    } else {
        let mut kept = Vec::new();
        for (k, v, raw) in key_values(url)? {
            if !take(&k, v)? {
                kept.push(raw);
            }
        }
        kept.join(" ")
    };
    Ok((rest, params))
}

/// `key=value` pairs of a libpq connection string, each with its text as written.
fn key_values(s: &str) -> Result<Vec<(String, String, String)>, SourceError> {
    let bad = |why: &str| SourceError::BadUrl(format!("connection string: {why}"));
    let mut out = Vec::new();
    let mut chars = s.char_indices().peekable();
    loop {
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let Some(&(start, _)) = chars.peek() else {
            return Ok(out);
        };
        let mut key = String::new();
        while let Some((_, c)) = chars.next_if(|(_, c)| *c != '=' && !c.is_whitespace()) {
            key.push(c);
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        if chars.next().map(|(_, c)| c) != Some('=') {
            return Err(bad(&format!("{key} has no value")));
        }
        while chars.next_if(|(_, c)| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if(|(_, c)| *c == '\'').is_some() {
            loop {
                match chars.next() {
                    Some((_, '\'')) => break,
                    Some((_, '\\')) => value.extend(chars.next().map(|(_, c)| c)),
                    Some((_, c)) => value.push(c),
                    None => return Err(bad("unterminated quoted value")),
                }
            }
        } else {
            while let Some((_, c)) = chars.next_if(|(_, c)| !c.is_whitespace()) {
                if c == '\\' {
                    value.extend(chars.next().map(|(_, c)| c));
                } else {
                    value.push(c);
                }
            }
        }
        let end = chars.peek().map(|&(i, _)| i).unwrap_or(s.len());
        out.push((key, value, s[start..end].trim_end().to_string()));
    }
}

impl TlsParams {
    /// Fills what the string left out from `PGSSL*` variables (`env` looks one up).
    pub fn with_env(mut self, env: impl Fn(&str) -> Option<String>) -> Self {
        self.mode = self.mode.or_else(|| env("PGSSLMODE"));
        self.root_cert = self.root_cert.or_else(|| env("PGSSLROOTCERT"));
        self.cert = self.cert.or_else(|| env("PGSSLCERT"));
        self.key = self.key.or_else(|| env("PGSSLKEY"));
        self
    }

    /// Reads the certificate files and makes the rustls configuration. `home` is where libpq's
    /// default files live (`~/.postgresql`).
    pub fn build(self, home: Option<&Path>) -> Result<Tls, SourceError> {
        let mode = SslMode::parse(self.mode.as_deref().unwrap_or("prefer"))?;
        let default = |name: &str| {
            home.map(|h| h.join(name))
                .filter(|p| p.exists())
                .map(|p| p.display().to_string())
        };
        let verify = matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull);
        let roots = match self.root_cert.or_else(|| default("root.crt")) {
            Some(s) if s == "system" => Some(Roots::System),
            Some(s) => Some(Roots::File(PathBuf::from(s))),
            None if verify => {
                return Err(tls_setup(format!(
                    "sslmode={} needs the CA to trust: set sslrootcert to a PEM file of CA \
                     certificates, or sslrootcert=system for the operating system's roots",
                    self.mode.as_deref().unwrap_or_default()
                )))
            }
            None => None,
        };
        let provider = crate::tls::provider();
        let builder = ClientConfig::builder_with_provider(Arc::clone(&provider))
            .with_safe_default_protocol_versions()
            .map_err(|e| tls_setup(e.to_string()))?;
        let verifier: Arc<dyn ServerCertVerifier> = match (&roots, mode) {
            // libpq: `require` with a root certificate checks the chain like verify-ca.
            (Some(roots), SslMode::Require | SslMode::VerifyCa) => {
                Arc::new(ChainOnly(webpki_verifier(roots, &provider)?))
            }
            (Some(roots), SslMode::VerifyFull) => webpki_verifier(roots, &provider)?,
            _ => Arc::new(AnyCertificate(provider.clone())),
        };
        let builder = builder
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let cert = self.cert.or_else(|| default("postgresql.crt"));
        let key = self.key.or_else(|| default("postgresql.key"));
        let config = match (cert, key) {
            (Some(cert), Some(key)) => {
                let chain = CertificateDer::pem_file_iter(&cert)
                    .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                    .map_err(|e| tls_setup(format!("sslcert {cert}: {e}")))?;
                let key = PrivateKeyDer::from_pem_file(&key)
                    .map_err(|e| tls_setup(format!("sslkey {key}: {e}")))?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| tls_setup(format!("client certificate: {e}")))?
            }
            (Some(_), None) | (None, Some(_)) => {
                return Err(tls_setup(
                    "sslcert and sslkey go together: set both or neither".into(),
                ))
            }
            (None, None) => builder.with_no_client_auth(),
        };
        Ok(Tls {
            mode,
            config: Arc::new(config),
        })
    }
}

fn tls_setup(reason: String) -> SourceError {
    SourceError::TlsSetup(reason)
}

fn webpki_verifier(
    roots: &Roots,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<WebPkiServerVerifier>, SourceError> {
    let mut store = RootCertStore::empty();
    match roots {
        Roots::System => {
            let found = rustls_native_certs::load_native_certs();
            store.add_parsable_certificates(found.certs);
        }
        Roots::File(path) => {
            let certs = CertificateDer::pem_file_iter(path)
                .and_then(|i| i.collect::<Result<Vec<_>, _>>())
                .map_err(|e| tls_setup(format!("sslrootcert {}: {e}", path.display())))?;
            store.add_parsable_certificates(certs);
        }
    }
    if store.is_empty() {
        return Err(tls_setup(format!(
            "sslrootcert {roots:?} holds no usable CA certificate"
        )));
    }
    WebPkiServerVerifier::builder_with_provider(Arc::new(store), Arc::clone(provider))
        .build()
        .map_err(|e| tls_setup(e.to_string()))
}

/// `verify-ca`: the chain must lead to a trusted CA; the name in the certificate is not checked.
#[derive(Debug)]
struct ChainOnly(Arc<WebPkiServerVerifier>);

impl ServerCertVerifier for ChainOnly {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self
            .0
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
        {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.0.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.supported_verify_schemes()
    }
}

/// `prefer`/`require` without a root certificate: encryption without authentication, as libpq.
/// The handshake's signatures are still checked (the peer holds the certificate's key).
#[derive(Debug)]
struct AnyCertificate(Arc<CryptoProvider>);

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// The name the server's certificate must carry for `host` (a DNS name or an IP address).
pub fn server_name(host: &str) -> Result<ServerName<'static>, SourceError> {
    ServerName::try_from(host.to_string()).map_err(|e| {
        tls_setup(format!(
            "host {host:?} cannot be checked against a certificate: {e}"
        ))
    })
}

/// The TLS failure (a refused certificate or handshake) in an error chain, if any: retrying does
/// not fix it. (`std::io::Error` hides the error it wraps from `source()`.)
pub fn tls_failure(e: &(dyn std::error::Error + 'static)) -> Option<String> {
    let mut cur = Some(e);
    while let Some(e) = cur {
        if let Some(tls) = e.downcast_ref::<rustls::Error>() {
            return Some(tls.to_string());
        }
        let inner = e
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref());
        if let Some(tls) = inner.and_then(|i| i.downcast_ref::<rustls::Error>()) {
            return Some(tls.to_string());
        }
        cur = e.source();
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tls_parameters_come_out_of_urls_and_key_value_strings() {
        let (rest, p) = split(
            "postgres://u:p@h:5/db?sslmode=verify-full&application_name=x&sslrootcert=%2Fa%20b.pem&sslsni=1",
        )
        .unwrap();
        assert_eq!(rest, "postgres://u:p@h:5/db?application_name=x");
        assert_eq!(p.mode.as_deref(), Some("verify-full"));
        assert_eq!(p.root_cert.as_deref(), Some("/a b.pem"));
        let (rest, p) =
            split("host=h  sslmode=require dbname='my db' sslcert = '/c\\'s.pem' sslkey=/k")
                .unwrap();
        assert_eq!(rest, "host=h dbname='my db'");
        assert_eq!(p.mode.as_deref(), Some("require"));
        assert_eq!(p.cert.as_deref(), Some("/c's.pem"));
        assert_eq!(p.key.as_deref(), Some("/k"));
        let (rest, p) = split("postgres://h/db").unwrap();
        assert_eq!(
            (rest.as_str(), p),
            ("postgres://h/db", TlsParams::default())
        );
        let e = split("postgres://h/db?sslpassword=x").unwrap_err();
        assert!(e.to_string().contains("openssl pkey"), "{e}");
        assert!(split("host=h dbname='open").is_err());
    }

    #[test]
    fn the_string_wins_over_pgssl_variables_and_modes_are_checked() {
        let env = |k: &str| match k {
            "PGSSLMODE" => Some("verify-full".to_string()),
            "PGSSLROOTCERT" => Some("system".to_string()),
            _ => None,
        };
        let p = TlsParams {
            mode: Some("require".into()),
            ..Default::default()
        }
        .with_env(env);
        assert_eq!(p.mode.as_deref(), Some("require"));
        assert_eq!(p.root_cert.as_deref(), Some("system"));
        let refused = |p: TlsParams| p.build(None).unwrap_err().to_string();
        let mode = |m: &str| TlsParams {
            mode: Some(m.into()),
            ..Default::default()
        };
        let e = refused(mode("verify-full"));
        assert!(e.contains("sslrootcert"), "{e}");
        let e = refused(mode("strict"));
        assert!(e.contains("verify-full"), "{e}");
        let e = refused(TlsParams {
            cert: Some("/c".into()),
            ..Default::default()
        });
        assert!(e.contains("together"), "{e}");
        let t = TlsParams::default().build(None).unwrap();
        assert_eq!(t.mode, SslMode::Prefer);
    }
}
