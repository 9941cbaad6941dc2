//! Counts every request walden (and deltalake on its behalf) makes to the warehouse's object
//! store, and every failure, for `walden_object_store_requests_total` and
//! `walden_object_store_errors_total`. Each store deltalake builds comes from a factory of its
//! registry; [`count_requests`] wraps every registered factory so that each store it builds is a
//! [`Counted`] one.

use std::ops::Range;
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use deltalake::logstore::{
    object_store_factories, ObjectStoreFactory, ObjectStoreRef, StorageConfig,
};
use deltalake::DeltaResult;
use futures::stream::{BoxStream, StreamExt as _};
use object_store::path::Path;
use object_store::{
    CopyOptions, GetOptions, GetResult, ListResult, MultipartUpload, ObjectMeta, ObjectStore,
    PutMultipartOptions, PutOptions, PutPayload, PutResult, RenameOptions, Result,
};
use url::Url;

use crate::telemetry::METRICS;

/// Wraps every factory registered so far (call after the backends are registered, once).
pub fn count_requests() {
    let registry = object_store_factories();
    let schemes: Vec<Url> = registry.iter().map(|e| e.key().clone()).collect();
    for scheme in schemes {
        if let Some(inner) = registry.get(&scheme).map(|e| e.value().clone()) {
            registry.insert(scheme, Arc::new(Counting(inner)));
        }
    }
}

struct Counting(Arc<dyn ObjectStoreFactory>);

impl ObjectStoreFactory for Counting {
    fn parse_url_opts(
        &self,
        url: &Url,
        config: &StorageConfig,
    ) -> DeltaResult<(ObjectStoreRef, Path)> {
        let (store, path) = self.0.parse_url_opts(url, config)?;
        Ok((Arc::new(Counted(store)), path))
    }
}

/// An object store whose requests and failures are counted by operation.
#[derive(Debug)]
pub struct Counted(ObjectStoreRef);

impl std::fmt::Display for Counted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.0.fmt(f)
    }
}

/// Counts one request of kind `op` and its outcome. A missing object or a lost race for a
/// conditional create are answers, not failures.
fn counted<T>(op: &str, result: Result<T>) -> Result<T> {
    METRICS
        .object_store_requests_total
        .with_label_values(&[op])
        .inc();
    if let Err(e) = &result {
        if !matches!(
            e,
            object_store::Error::NotFound { .. }
                | object_store::Error::AlreadyExists { .. }
                | object_store::Error::Precondition { .. }
                | object_store::Error::NotModified { .. }
        ) {
            METRICS
                .object_store_errors_total
                .with_label_values(&[op])
                .inc();
        }
    }
    result
}

#[async_trait]
impl ObjectStore for Counted {
    async fn put_opts(
        &self,
        location: &Path,
        payload: PutPayload,
        opts: PutOptions,
    ) -> Result<PutResult> {
        counted("put", self.0.put_opts(location, payload, opts).await)
    }

    async fn put_multipart_opts(
        &self,
        location: &Path,
        opts: PutMultipartOptions,
    ) -> Result<Box<dyn MultipartUpload>> {
        counted("put", self.0.put_multipart_opts(location, opts).await)
    }

    async fn get_opts(&self, location: &Path, options: GetOptions) -> Result<GetResult> {
        let op = if options.head { "head" } else { "get" };
        counted(op, self.0.get_opts(location, options).await)
    }

    async fn get_ranges(&self, location: &Path, ranges: &[Range<u64>]) -> Result<Vec<Bytes>> {
        counted("get", self.0.get_ranges(location, ranges).await)
    }

    fn delete_stream(
        &self,
        locations: BoxStream<'static, Result<Path>>,
    ) -> BoxStream<'static, Result<Path>> {
        self.0
            .delete_stream(locations)
            .map(|r| counted("delete", r))
            .boxed()
    }

    fn list(&self, prefix: Option<&Path>) -> BoxStream<'static, Result<ObjectMeta>> {
        METRICS
            .object_store_requests_total
            .with_label_values(&["list"])
            .inc();
        self.0.list(prefix).map(list_item).boxed()
    }

    fn list_with_offset(
        &self,
        prefix: Option<&Path>,
        offset: &Path,
    ) -> BoxStream<'static, Result<ObjectMeta>> {
        METRICS
            .object_store_requests_total
            .with_label_values(&["list"])
            .inc();
        self.0
            .list_with_offset(prefix, offset)
            .map(list_item)
            .boxed()
    }

    async fn list_with_delimiter(&self, prefix: Option<&Path>) -> Result<ListResult> {
        counted("list", self.0.list_with_delimiter(prefix).await)
    }

    async fn copy_opts(&self, from: &Path, to: &Path, options: CopyOptions) -> Result<()> {
        counted("copy", self.0.copy_opts(from, to, options).await)
    }

    async fn rename_opts(&self, from: &Path, to: &Path, options: RenameOptions) -> Result<()> {
        counted("copy", self.0.rename_opts(from, to, options).await)
    }
}

/// A listing is counted once when it starts; a failure while it runs, once per failure.
fn list_item(r: Result<ObjectMeta>) -> Result<ObjectMeta> {
    if r.is_err() {
        METRICS
            .object_store_errors_total
            .with_label_values(&["list"])
            .inc();
    }
    r
}
