//! Integration tests: one binary, one Postgres cluster per process, one database per test.

mod adopt;
mod crash;
mod deletion;
mod deploy;
mod differential;
mod errors;
mod faults;
mod fixtures;
mod identity;
mod large;
mod maintain;
mod operations;
mod ops;
mod pg;
mod privacy;
mod publication;
mod python;
mod readers;
mod schema;
mod snapshot;
mod storage;
mod stream;
mod tls;
mod types;
mod warehouse;

/// A file of this checkout, `rel` from its root. Cargo sets `CARGO_MANIFEST_DIR` when it runs the
/// tests too; that value wins over the compile-time one, which is stale when a shared target
/// directory was built from another checkout (as CI's cache is).
pub fn project_file(rel: &str) -> std::path::PathBuf {
    let root =
        std::env::var("CARGO_MANIFEST_DIR").unwrap_or_else(|_| env!("CARGO_MANIFEST_DIR").into());
    std::path::Path::new(&root).join(rel)
}

/// What a child process (spawned with a piped stderr) wrote to stderr, once it has ended; empty
/// when its stderr went elsewhere.
pub fn stderr_of(child: &mut std::process::Child) -> String {
    use std::io::Read;
    let mut err = String::new();
    if let Some(mut e) = child.stderr.take() {
        let _ = e.read_to_string(&mut err);
    }
    err
}
