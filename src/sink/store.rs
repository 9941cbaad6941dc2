//! Where the warehouse lives: which URL schemes reach which object store, which storage options
//! walden refuses, and the startup check that the store gives the one guarantee Delta commits
//! rely on.
//!
//! A Delta version is committed by creating `_delta_log/{version}.json` *only if it does not
//! exist yet* (put-if-absent). Two writers racing for one version must not both succeed, or one
//! commit (and the LSN it records) is silently lost. Every store walden writes to gives this with
//! a conditional request: S3 and S3-compatible stores `If-None-Match: *` (AWS since 2024, MinIO,
//! R2), Azure Blob `If-None-Match: *`, GCS `x-goog-if-generation-match: 0`, a local directory
//! an atomic hard link. Options that switch it off (`aws_conditional_put = "disabled"`,
//! `aws_s3_allow_unsafe_rename`, the DynamoDB lock that delta-rs no longer supports) are refused,
//! and [`check_put_if_absent`] proves at startup that the store really refuses a second create,
//! so a store that ignores the header is refused before it can lose a commit.

use std::collections::HashMap;
use std::sync::Once;

use object_store::path::Path;
use object_store::{ObjectStoreExt, PutMode, PutOptions, PutPayload};
use url::Url;

use super::SinkError;

/// URL schemes walden can write to (besides a plain local path).
pub const SCHEMES: &[&str] = &[
    "file", "s3", "s3a", "gs", "az", "azure", "abfs", "abfss", "adl",
];

/// Teaches `deltalake` the cloud schemes (once per process).
pub fn register_backends() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The HTTPS clients of the stores use the process's one TLS provider.
        crate::tls::provider();
        deltalake::aws::register_handlers(None);
        deltalake::azure::register_handlers(None);
        deltalake::gcp::register_handlers(None);
        super::counted::count_requests();
    });
}

/// Refuses a scheme no backend serves and options that would make commits unsafe.
pub fn check_location(root: &Url, options: &HashMap<String, String>) -> Result<(), SinkError> {
    let scheme = root.scheme();
    if !SCHEMES.contains(&scheme) {
        return Err(SinkError::BadLocation {
            url: root.to_string(),
            reason: format!(
                "walden cannot write to {scheme}:// URLs; use a local directory or one of {}",
                SCHEMES.join("://, ") + "://"
            ),
        });
    }
    if root.host_str().unwrap_or("").is_empty() && scheme != "file" {
        return Err(SinkError::BadLocation {
            url: root.to_string(),
            reason: format!("no bucket or container: write {scheme}://BUCKET/PREFIX"),
        });
    }
    let unsafe_store = |reason: String| SinkError::UnsafeStore {
        url: root.to_string(),
        reason,
    };
    for (key, value) in options {
        let key = key.to_ascii_lowercase();
        let on = !matches!(
            value.trim().to_ascii_lowercase().as_str(),
            "" | "false" | "0"
        );
        match key.as_str() {
            "aws_conditional_put" | "conditional_put"
                if value.trim().eq_ignore_ascii_case("disabled") =>
            {
                return Err(unsafe_store(format!(
                    "storage option {key} = \"disabled\" turns off the conditional put that keeps \
                     two commits of one version apart; remove it"
                )));
            }
            "aws_s3_allow_unsafe_rename" if on => {
                return Err(unsafe_store(
                    "storage option aws_s3_allow_unsafe_rename lets a racing writer overwrite a \
                     commit; remove it (S3 and S3-compatible stores give conditional put)"
                        .into(),
                ));
            }
            "aws_s3_locking_provider" => {
                return Err(unsafe_store(
                    "storage option aws_s3_locking_provider: the DynamoDB lock is no longer \
                     supported by delta-rs and is not needed (S3 gives conditional put); remove it"
                        .into(),
                ));
            }
            _ => {}
        }
    }
    Ok(())
}

/// Proves that the store refuses to create an object that exists: creates a probe object, tries
/// to create it again (which must fail), then removes it.
pub async fn check_put_if_absent(
    store: &deltalake::logstore::ObjectStoreRef,
    root: &Url,
) -> Result<(), SinkError> {
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let probe = Path::from(format!("commit-probe/{}-{stamp}", std::process::id()));
    let create = || PutOptions {
        mode: PutMode::Create,
        ..Default::default()
    };
    let refused = |e: object_store::Error| store_refused(root, e);
    store
        .put_opts(&probe, PutPayload::from_static(b"1"), create())
        .await
        .map_err(|e| match e {
            object_store::Error::NotImplemented { .. } => SinkError::UnsafeStore {
                url: root.to_string(),
                reason: "the store does not offer conditional put".into(),
            },
            e => refused(e),
        })?;
    let second = store
        .put_opts(&probe, PutPayload::from_static(b"2"), create())
        .await;
    let removed = store.delete(&probe).await;
    match second {
        Err(object_store::Error::AlreadyExists { .. }) => {}
        Ok(_) => {
            return Err(SinkError::UnsafeStore {
                url: root.to_string(),
                reason: "the store accepted a second create of an object that exists (it \
                         ignores If-None-Match); use a store that honours conditional requests \
                         (AWS S3, MinIO, R2, Azure Blob, GCS)"
                    .into(),
            })
        }
        Err(e) => return Err(refused(e)),
    }
    removed.map_err(refused)
}

/// A store error met while checking the warehouse, with what the operator should do about it.
fn store_refused(root: &Url, e: object_store::Error) -> SinkError {
    let hint = match &e {
        object_store::Error::NotFound { .. } => {
            "the bucket or container does not exist: create it, or fix warehouse.url"
        }
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => {
            "the store refused the credentials: check warehouse.storage_options (or the \
             provider's environment variables / instance role) and that they may read, write, \
             list and delete under this prefix"
        }
        _ => "the store could not be reached or refused the request",
    };
    SinkError::StoreCheck {
        url: root.to_string(),
        hint,
        source: Box::new(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn url(s: &str) -> Url {
        Url::parse(s).unwrap()
    }

    #[test]
    fn options_that_make_commits_unsafe_are_refused() {
        let s3 = url("s3://bucket/wh/");
        for bad in [
            opts(&[("aws_conditional_put", "disabled")]),
            opts(&[("AWS_S3_ALLOW_UNSAFE_RENAME", "true")]),
            opts(&[("aws_s3_locking_provider", "dynamodb")]),
        ] {
            let e = check_location(&s3, &bad).unwrap_err();
            assert!(matches!(e, SinkError::UnsafeStore { .. }), "{e}");
            assert!(e.to_string().contains("remove it"), "{e}");
        }
        let fine = opts(&[
            ("aws_conditional_put", "etag"),
            ("aws_s3_allow_unsafe_rename", "false"),
            ("aws_endpoint", "http://127.0.0.1:9000"),
        ]);
        check_location(&s3, &fine).unwrap();
    }

    #[test]
    fn unknown_schemes_and_missing_buckets_are_refused_with_the_supported_list() {
        let e = check_location(&url("hdfs://nn/wh/"), &HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("s3://"), "{e}");
        let e = check_location(&url("s3:///wh/"), &HashMap::new()).unwrap_err();
        assert!(e.to_string().contains("BUCKET"), "{e}");
        for ok in [
            "gs://b/wh/",
            "az://c/wh/",
            "abfss://c@acct.dfs.core.windows.net/wh/",
        ] {
            check_location(&url(ok), &HashMap::new()).unwrap();
        }
    }

    /// GCS has no emulator here: a `gs://` warehouse is served by the GCS backend and takes its
    /// options (base URL, anonymous access for public test buckets) without touching the network.
    #[test]
    fn gcs_is_built_in_and_configured_from_storage_options() {
        register_backends();
        let options = opts(&[
            ("google_skip_signature", "true"),
            ("google_base_url", "http://127.0.0.1:1"),
        ]);
        deltalake::logstore::store_for(&url("gs://bucket/wh/"), options).unwrap();
        // The options reach the GCS builder: a key that is not one is refused.
        let bad = opts(&[("google_service_account_key", "not json")]);
        assert!(deltalake::logstore::store_for(&url("gs://bucket/wh/"), bad).is_err());
        // A scheme without a backend is not served at all.
        assert!(deltalake::logstore::store_for(&url("hdfs://nn/wh/"), opts(&[])).is_err());
    }
}
