//! A repository in an object store (S3 and S3-compatible servers, Google Cloud Storage,
//! Azure Blob Storage) through the Apache Arrow `object_store` crate, behind the same
//! blocking [`Repository`] trait as a directory.
//!
//! Atomicity: an object is written by one PUT when it fits in one part, or by a multipart
//! upload completed last; until it is completed the store shows nothing under the key, and
//! an upload that fails is aborted. So a reader never sees a partial object, which is what
//! the directory repository gets from its rename.
//!
//! The repository's calls block: they run on one process-wide runtime of their own (two
//! worker threads) and the caller waits on a channel, so they work from any thread, the
//! agent's loop thread excepted (which hands repository work to `spawn_blocking`).

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::path::Path;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::StreamExt;
use object_store::path::Path as ObjectPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use pgherd_config::{BackupConfig, ObjectStoreKind};

use super::repo::{read_private, Entry, RepoError, Repository};

/// Objects up to this size are written with one PUT; larger ones in parts of this size
/// at first (S3 wants at least 5 MiB per part but the last).
const FIRST_PART: usize = 8 << 20;
/// Parts double in size after every this many, so that S3's limit of 10 000 parts holds
/// an object of its largest size (5 TiB) while small objects still go in small parts: the
/// last part, sent after the data ends, stays short.
const PARTS_PER_SIZE: usize = 1000;
/// S3's largest part.
const LARGEST_PART: usize = 5 << 30;

/// The size of part `index` (from 0) of a multipart upload.
fn part_size(index: usize) -> usize {
    let doublings = (index / PARTS_PER_SIZE).min(20) as u32;
    FIRST_PART.saturating_mul(1 << doublings).min(LARGEST_PART)
}
/// Parts of one object uploaded at the same time.
const PARTS_IN_FLIGHT: usize = 4;
/// Chunks of a download buffered ahead of the reader.
const READ_AHEAD: usize = 8;

/// The runtime every object-store call runs on. Never dropped (dropping a runtime from
/// inside another one panics).
fn runtime() -> &'static tokio::runtime::Runtime {
    static RT: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    RT.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .thread_name("pgherd-objstore")
            .enable_all()
            .build()
            .expect("cannot start the object store runtime")
    })
}

/// Runs `fut` on the object-store runtime and waits for it.
fn block<T: Send + 'static>(fut: impl std::future::Future<Output = T> + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::sync_channel(1);
    runtime().spawn(async move {
        let _ = tx.send(fut.await);
    });
    rx.recv()
        .expect("an object store task ended without an answer")
}

pub struct ObjectRepository {
    store: Arc<dyn ObjectStore>,
    /// `<prefix><cluster>/`: every key of this repository lives under it.
    root: String,
    /// `s3://bucket/<root>`, for messages.
    url: String,
}

/// What a credentials file holds (YAML); which fields count depends on the store.
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct CredentialsFile {
    #[serde(default)]
    access_key_id: Option<String>,
    #[serde(default)]
    secret_access_key: Option<String>,
    #[serde(default)]
    session_token: Option<String>,
    /// Azure's storage account key.
    #[serde(default)]
    access_key: Option<String>,
}

fn credentials(path: &std::path::Path, key: &str) -> Result<CredentialsFile, String> {
    let text = read_private(path, key, "credentials")?;
    serde_yaml::from_str(&text).map_err(|e| {
        // serde_yaml's messages quote no values for these fields, only names and places.
        format!("{key}: {} is not a credentials file: {e}", path.display())
    })
}

impl ObjectRepository {
    /// The repository of `cluster` at `bucket/prefix` in the store `kind`, configured by
    /// `backup`. Checks the configuration, not the connection (the first call does).
    pub fn new(
        backup: &BackupConfig,
        kind: ObjectStoreKind,
        bucket: &str,
        prefix: &str,
        cluster: &str,
    ) -> Result<ObjectRepository, String> {
        let retry = object_store::RetryConfig {
            max_retries: 3,
            retry_timeout: Duration::from_secs(60),
            ..Default::default()
        };
        let store: Arc<dyn ObjectStore> = match kind {
            ObjectStoreKind::S3 => {
                let s3 = backup.s3.clone().unwrap_or_default();
                let mut b = object_store::aws::AmazonS3Builder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                if let Some(file) = &s3.ca_file {
                    // Set before `with_allow_http`, which changes these options.
                    b = b.with_client_options(trusting(file, "backup.s3.ca_file")?);
                }
                if let Some(region) = &s3.region {
                    b = b.with_region(region);
                }
                if let Some(endpoint) = &s3.endpoint {
                    b = b
                        .with_endpoint(endpoint)
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if s3.force_path_style {
                    b = b.with_virtual_hosted_style_request(false);
                }
                if let Some(file) = &s3.credentials_file {
                    let c = credentials(file, "backup.s3.credentials_file")?;
                    let (Some(id), Some(secret)) = (c.access_key_id, c.secret_access_key) else {
                        return Err(format!(
                            "backup.s3.credentials_file: {} needs access_key_id and secret_access_key",
                            file.display()
                        ));
                    };
                    b = b.with_access_key_id(id).with_secret_access_key(secret);
                    if let Some(t) = c.session_token {
                        b = b.with_token(t);
                    }
                }
                Arc::new(b.build().map_err(|e| format!("backup.s3: {e}"))?)
            }
            ObjectStoreKind::Gcs => {
                let gcs = backup.gcs.clone().unwrap_or_default();
                let mut b = object_store::gcp::GoogleCloudStorageBuilder::from_env()
                    .with_bucket_name(bucket)
                    .with_retry(retry);
                if let Some(file) = &gcs.credentials_file {
                    read_private(file, "backup.gcs.credentials_file", "credentials")?;
                    b = b.with_service_account_path(file.display().to_string());
                }
                Arc::new(b.build().map_err(|e| format!("backup.gcs: {e}"))?)
            }
            ObjectStoreKind::Azure => {
                let az = backup.azure.clone().unwrap_or_default();
                let mut b = object_store::azure::MicrosoftAzureBuilder::from_env()
                    .with_container_name(bucket)
                    .with_retry(retry);
                if let Some(account) = &az.account {
                    b = b.with_account(account);
                }
                if let Some(endpoint) = &az.endpoint {
                    b = b
                        .with_endpoint(endpoint.clone())
                        .with_allow_http(endpoint.starts_with("http://"));
                }
                if let Some(file) = &az.credentials_file {
                    let c = credentials(file, "backup.azure.credentials_file")?;
                    let Some(key) = c.access_key else {
                        return Err(format!(
                            "backup.azure.credentials_file: {} needs access_key",
                            file.display()
                        ));
                    };
                    b = b.with_access_key(key);
                }
                Arc::new(b.build().map_err(|e| format!("backup.azure: {e}"))?)
            }
        };
        let root = format!("{prefix}{cluster}/");
        Ok(ObjectRepository {
            url: format!("{}://{bucket}/{root}", kind.scheme()),
            store,
            root,
        })
    }

    fn path(&self, key: &str) -> Result<ObjectPath, RepoError> {
        check_key(key)?;
        Ok(ObjectPath::from(format!("{}{key}", self.root)))
    }

    fn err(&self, key: &str, e: object_store::Error) -> RepoError {
        match e {
            object_store::Error::NotFound { .. } => RepoError::NotFound(self.describe(key)),
            e => RepoError::io(self.describe(key), std::io::Error::other(with_causes(&e))),
        }
    }

    /// The objects and "folders" right under `prefix`.
    fn list_level(&self, prefix: &str) -> Result<object_store::ListResult, RepoError> {
        if !prefix.is_empty() {
            check_key(prefix)?;
        }
        let store = self.store.clone();
        let path = ObjectPath::from(format!("{}{prefix}", self.root));
        block(async move { store.list_with_delimiter(Some(&path)).await })
            .map_err(|e| self.err(prefix, e))
    }

    /// The key of a stored object below this repository's root.
    fn key_of(&self, location: &ObjectPath) -> Option<String> {
        location
            .as_ref()
            .strip_prefix(self.root.as_str())
            .map(str::to_string)
    }
}

/// The same rule as the directory repository's: plain names separated by '/', nothing
/// that could climb out of the root.
fn check_key(key: &str) -> Result<(), RepoError> {
    let trimmed = key.strip_suffix('/').unwrap_or(key);
    let bad = trimmed.is_empty()
        || trimmed.split('/').any(|p| {
            p.is_empty() || p == "." || p == ".." || p.chars().any(|c| c.is_control() || c == '\\')
        });
    if bad {
        return Err(RepoError::BadKey(key.to_string()));
    }
    Ok(())
}

/// A writer that uploads what it is given: kept in memory up to one part, then sent as a
/// multipart upload with a few parts in flight. `finish` makes the object appear;
/// dropping it unfinished aborts the upload.
struct Upload {
    store: Arc<dyn ObjectStore>,
    path: ObjectPath,
    buf: Vec<u8>,
    multipart: Option<Box<dyn object_store::MultipartUpload>>,
    in_flight: VecDeque<tokio::task::JoinHandle<object_store::Result<()>>>,
    /// Parts sent so far.
    parts: usize,
    count: u64,
}

impl Upload {
    fn send_part(&mut self) -> std::io::Result<()> {
        if self.multipart.is_none() {
            let (store, path) = (self.store.clone(), self.path.clone());
            let upload = block(async move { store.put_multipart(&path).await })
                .map_err(|e| std::io::Error::other(with_causes(&e)))?;
            self.multipart = Some(upload);
        }
        self.parts += 1;
        let part = std::mem::replace(&mut self.buf, Vec::with_capacity(part_size(self.parts)));
        let fut = self
            .multipart
            .as_mut()
            .expect("started above")
            .put_part(PutPayload::from(Bytes::from(part)));
        self.in_flight.push_back(runtime().spawn(fut));
        while self.in_flight.len() >= PARTS_IN_FLIGHT {
            self.wait_oldest()?;
        }
        Ok(())
    }

    fn wait_oldest(&mut self) -> std::io::Result<()> {
        if let Some(h) = self.in_flight.pop_front() {
            block(h)
                .map_err(|e| std::io::Error::other(format!("an upload task died: {e}")))?
                .map_err(|e| std::io::Error::other(with_causes(&e)))?;
        }
        Ok(())
    }

    fn finish(mut self) -> std::io::Result<u64> {
        match self.multipart.take() {
            None => {
                let (store, path) = (self.store.clone(), self.path.clone());
                let body = PutPayload::from(Bytes::from(std::mem::take(&mut self.buf)));
                block(async move { store.put(&path, body).await })
                    .map_err(|e| std::io::Error::other(with_causes(&e)))?;
            }
            Some(upload) => {
                // Put it back so that an error below aborts it (Drop).
                self.multipart = Some(upload);
                if !self.buf.is_empty() {
                    self.send_part()?;
                }
                while !self.in_flight.is_empty() {
                    self.wait_oldest()?;
                }
                let mut upload = self.multipart.take().expect("put back above");
                block(async move { upload.complete().await })
                    .map_err(|e| std::io::Error::other(with_causes(&e)))?;
            }
        }
        Ok(self.count)
    }
}

impl Write for Upload {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let size = part_size(self.parts);
        let n = data.len().min(size - self.buf.len());
        self.buf.extend_from_slice(&data[..n]);
        self.count += n as u64;
        if self.buf.len() == size {
            self.send_part()?;
        }
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Drop for Upload {
    fn drop(&mut self) {
        if let Some(mut upload) = self.multipart.take() {
            for h in self.in_flight.drain(..) {
                h.abort();
            }
            // Best effort: a store keeps an aborted or forgotten upload's parts invisible
            // either way (and S3 lifecycle rules remove them).
            let _ = block(async move { upload.abort().await });
        }
    }
}

/// A download read as a stream of chunks fetched ahead by a task.
struct Download {
    chunks: std::sync::mpsc::Receiver<std::io::Result<Bytes>>,
    current: Bytes,
}

impl Read for Download {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.current.is_empty() {
            match self.chunks.recv() {
                Ok(chunk) => self.current = chunk?,
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.current.len());
        out[..n].copy_from_slice(&self.current[..n]);
        self.current = self.current.slice(n..);
        Ok(n)
    }
}

impl Repository for ObjectRepository {
    fn put(
        &self,
        key: &str,
        source: &mut dyn FnMut(&mut dyn Write) -> std::io::Result<()>,
    ) -> Result<u64, RepoError> {
        let path = self.path(key)?;
        if key.ends_with('/') {
            return Err(RepoError::BadKey(key.to_string()));
        }
        let mut upload = Upload {
            store: self.store.clone(),
            path,
            buf: Vec::new(),
            multipart: None,
            in_flight: VecDeque::new(),
            parts: 0,
            count: 0,
        };
        source(&mut upload).map_err(|e| RepoError::io(self.describe(key), e))?;
        upload
            .finish()
            .map_err(|e| RepoError::io(self.describe(key), e))
    }

    fn open(&self, key: &str) -> Result<Box<dyn Read + Send>, RepoError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        let got = block(async move { store.get(&path).await }).map_err(|e| self.err(key, e))?;
        let (tx, rx) = std::sync::mpsc::sync_channel(READ_AHEAD);
        runtime().spawn(async move {
            let mut stream = got.into_stream();
            while let Some(chunk) = stream.next().await {
                let failed = chunk.is_err();
                let chunk = chunk.map_err(|e| std::io::Error::other(with_causes(&e)));
                // The reader went away, or the stream failed: stop.
                let tx = tx.clone();
                let sent = tokio::task::spawn_blocking(move || tx.send(chunk).is_ok())
                    .await
                    .unwrap_or(false);
                if !sent || failed {
                    return;
                }
            }
        });
        Ok(Box::new(Download {
            chunks: rx,
            current: Bytes::new(),
        }))
    }

    fn list(&self, prefix: &str) -> Result<Vec<Entry>, RepoError> {
        let mut out: Vec<Entry> = self
            .list_level(prefix)?
            .objects
            .into_iter()
            .filter_map(|m| {
                Some(Entry {
                    key: self.key_of(&m.location)?,
                    size: m.size,
                    modified: SystemTime::from(m.last_modified),
                })
            })
            .collect();
        out.sort_by(|a, b| a.key.cmp(&b.key));
        Ok(out)
    }

    fn list_dirs(&self, prefix: &str) -> Result<Vec<String>, RepoError> {
        let mut out: Vec<String> = self
            .list_level(prefix)?
            .common_prefixes
            .iter()
            .filter_map(|p| self.key_of(p))
            .filter(|k| check_key(k).is_ok())
            .map(|k| format!("{k}/"))
            .collect();
        out.sort();
        Ok(out)
    }

    fn delete(&self, key: &str) -> Result<(), RepoError> {
        let path = self.path(key)?;
        let store = self.store.clone();
        match block(async move { store.delete(&path).await }) {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(self.err(key, e)),
        }
    }

    /// An object store has no folders: a backup's id is reserved by its first object,
    /// `started`, and is free while nothing lies under it.
    fn create_folder(&self, key: &str) -> Result<bool, RepoError> {
        let folder = format!("{}/", key.trim_end_matches('/'));
        if !self.list(&folder)?.is_empty() || !self.list_dirs(&folder)?.is_empty() {
            return Ok(false);
        }
        self.put(&format!("{folder}started"), &mut |w| {
            w.write_all(crate::now_rfc3339().as_bytes())
        })?;
        Ok(true)
    }

    fn describe(&self, key: &str) -> String {
        format!("{}{key}", self.url)
    }

    /// An object the store lists is durable: a PUT or a completed upload answers only
    /// once it is stored.
    fn make_durable(&self, _key: &str) -> Result<(), RepoError> {
        Ok(())
    }
}

/// An object store error with its causes: a certificate or connection failure is only said
/// by them ("error sending request" alone tells an operator nothing).
fn with_causes(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut cause = e.source();
    while let Some(c) = cause {
        let said = c.to_string();
        if !out.contains(&said) {
            out.push_str(": ");
            out.push_str(&said);
        }
        cause = c.source();
    }
    out
}

/// Client options that trust the PEM certificates in `file` besides the system's roots.
fn trusting(file: &Path, key: &str) -> Result<object_store::ClientOptions, String> {
    let pem =
        std::fs::read(file).map_err(|e| format!("{key}: cannot read {}: {e}", file.display()))?;
    let certs = object_store::Certificate::from_pem_bundle(&pem).map_err(|e| {
        format!(
            "{key}: {} holds no usable PEM certificate: {e}",
            file.display()
        )
    })?;
    if certs.is_empty() {
        return Err(format!(
            "{key}: {} holds no PEM certificate",
            file.display()
        ));
    }
    Ok(certs
        .into_iter()
        .fold(object_store::ClientOptions::new(), |o, c| {
            o.with_root_certificate(c)
        }))
}

#[cfg(test)]
mod tests {
    use super::{check_key, part_size, trusting};

    #[test]
    fn parts_grow_so_that_ten_thousand_hold_the_largest_s3_object() {
        let mut total: u64 = 0;
        for i in 0..10_000 {
            let size = part_size(i);
            assert!(size >= 5 << 20, "part {i} is under S3's 5 MiB");
            assert!(size <= 5 << 30, "part {i} is over S3's 5 GiB");
            if i > 0 {
                assert!(size >= part_size(i - 1), "parts shrink at {i}");
            }
            total += size as u64;
        }
        assert!(
            total >= 5 << 40,
            "10 000 parts hold {total} bytes, under 5 TiB"
        );
        // Small objects keep small parts.
        assert_eq!(part_size(0), 8 << 20);
        assert_eq!(part_size(999), 8 << 20);
    }

    #[test]
    fn a_ca_file_that_is_missing_or_holds_no_certificate_is_refused_naming_the_key() {
        let t = tempfile::tempdir().unwrap();
        let missing = t.path().join("missing.pem");
        let e = trusting(&missing, "backup.s3.ca_file").unwrap_err();
        assert!(e.starts_with("backup.s3.ca_file: cannot read"), "{e}");
        let junk = t.path().join("junk.pem");
        std::fs::write(&junk, "not a certificate\n").unwrap();
        let e = trusting(&junk, "backup.s3.ca_file").unwrap_err();
        assert!(
            e.starts_with("backup.s3.ca_file:") && e.contains("junk.pem"),
            "{e}"
        );
    }

    #[test]
    fn keys_that_could_leave_the_root_are_refused() {
        for bad in [
            "", "/", "/a", "a//b", "a/../b", "..", "a/./b", "a\\b", "a\nb",
        ] {
            assert!(check_key(bad).is_err(), "{bad:?} was accepted");
        }
        for good in [
            "wal/",
            "wal/000000010000000000000001-ab.zst",
            "backups/x/backup.json",
        ] {
            assert!(check_key(good).is_ok(), "{good:?} was refused");
        }
    }
}
