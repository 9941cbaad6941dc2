//! The one TLS crypto provider of the process (rustls with *ring*), used by the Postgres
//! connections and installed as the process default for the object-store clients, so every TLS
//! connection walden makes uses the same algorithms.

use std::sync::{Arc, OnceLock};

use rustls::crypto::CryptoProvider;

/// The provider, installed as rustls's process default on first use.
pub fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    Arc::clone(PROVIDER.get_or_init(|| {
        // Another part of the process may have installed one first; either serves.
        let _ = rustls::crypto::ring::default_provider().install_default();
        Arc::new(rustls::crypto::ring::default_provider())
    }))
}
