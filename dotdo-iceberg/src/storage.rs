//! iceberg's [`Storage`] over any [`ObjectStore`], so a warehouse can live on local disk, in
//! memory, on S3 / R2 / MinIO, GCS or Azure.
//!
//! iceberg-rust 0.10.1 ships only local-file and in-memory storage; everything else goes through
//! its `Storage` / `StorageFactory` traits, which this module implements over one
//! `Arc<dyn ObjectStore>` rooted at a URL prefix (`file://`, `memory://`, `s3://bucket`, …).
//! A path handed to the storage is the warehouse URL's scheme and authority followed by the
//! object key, e.g. `s3://bucket/wh/ns/t/data/x.parquet` → key `wh/ns/t/data/x.parquet`.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use bytes::Bytes;
use futures::stream::BoxStream;
use futures::{StreamExt, TryStreamExt};
use iceberg::io::{FileMetadata, FileRead, FileWrite, InputFile, OutputFile, Storage, StorageConfig, StorageFactory};
use object_store::path::Path;
use object_store::ObjectStore;
use url::Url;

use dotdo_core::{Error, Result};

/// An object store and the URL prefix (`scheme://authority`) that maps to its root. Its `Debug`
/// shows the store's `Display` only (object_store's own `Debug` of Azure and GCS stores prints
/// their credentials).
#[derive(Clone)]
pub struct StoreRoot {
    /// The store.
    pub store: Arc<dyn ObjectStore>,
    /// The URL prefix of the store root, without a trailing `/` (`file://`, `s3://bucket`).
    pub root: String,
    /// The warehouse location as a URL without a trailing `/` (`s3://bucket/wh`).
    pub warehouse: String,
    /// Whether the store is a local file system that dotdo opened itself (`file://`), whose
    /// files it can fsync.
    local_files: bool,
    /// How many directory levels `open` created for a local warehouse (0: it existed): their
    /// entries are synced with the first file written (see [`SyncState::above`]).
    created_dirs: usize,
    /// For a local warehouse whose path a URL escapes (`my lake`): the decoded directory `open`
    /// created for the default catalog (`my lake/wh`, while data goes under `my%20lake/wh`) and
    /// how many levels of it `open` created, synced with the factory that syncs (see
    /// [`sync_catalog_dirs`](Self::sync_catalog_dirs)).
    catalog_dirs: Option<(std::path::PathBuf, usize)>,
    /// The bucket's location prefix of a path-style S3 URL over http(s) (see [`bucket_prefix`]).
    bucket: Option<String>,
}

impl std::fmt::Debug for StoreRoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreRoot")
            .field("store", &format_args!("{}", self.store))
            .field("root", &self.root)
            .field("warehouse", &self.warehouse)
            .field("local_files", &self.local_files)
            .finish()
    }
}

impl StoreRoot {
    /// The local file system path of `key` when this root is a local file system dotdo opened
    /// itself (`file://`), else `None`.
    pub(crate) fn local_path_of(&self, key: &Path) -> Option<std::path::PathBuf> {
        if !self.local_files {
            return None;
        }
        local_path(key).ok()
    }

    /// Open the object store for a warehouse URL with `object_store` options (for S3:
    /// `aws_endpoint`, `aws_access_key_id`, `aws_secret_access_key`, `aws_region`,
    /// `aws_allow_http`, …; see `object_store`'s builders).
    ///
    /// A bare path is taken as a `file://` URL (a relative one from the working directory at
    /// open, as the hot stores take theirs). Local warehouse directories are
    /// created if missing. `memory://name` opens a fresh in-memory store (each call a new one).
    /// An option the scheme's store does not know (a typo would otherwise be dropped silently),
    /// or any option for `file://` and `memory://`, is `InvalidInput`.
    pub fn open<I, K, V>(warehouse: &str, options: I) -> Result<Self>
    where
        I: IntoIterator<Item = (K, V)>,
        K: AsRef<str>,
        V: Into<String>,
    {
        let url = parse_warehouse_url(warehouse)?;
        let options: Vec<(String, String)> =
            options.into_iter().map(|(k, v)| (k.as_ref().to_string(), v.into())).collect();
        check_options(&url, &options)?;
        let mut created_dirs = 0;
        let mut catalog_dirs = None;
        if url.scheme() == "file" {
            let dir = url
                .to_file_path()
                .map_err(|()| Error::invalid(format!("warehouse {warehouse} is not a valid local path")))?;
            // Counted on the directory the local store writes data to, which keeps a path's
            // percent-encoding (`my%20lake/wh`), not on the decoded one created here for the
            // catalog (`my lake/wh`): an existing `my lake/wh` made it 0, and the first write's
            // new `my%20lake` was never synced in its parent.
            let stored = key_of("file://", url.as_str()).and_then(|key| local_path(&key)).unwrap_or(dir.clone());
            created_dirs = stored.ancestors().position(|a| a.exists()).unwrap_or(0);
            let decoded_created = dir.ancestors().position(|a| a.exists()).unwrap_or(0);
            if stored != dir && decoded_created > 0 {
                catalog_dirs = Some((dir.clone(), decoded_created));
            }
            std::fs::create_dir_all(&dir).map_err(|e| warehouse_dir_error(&dir, e))?;
        }
        if url.scheme() == "memory" {
            return Ok(Self::with_store(Arc::new(object_store::memory::InMemory::new()), &url));
        }
        let local_files = url.scheme() == "file";
        // With no options, a cloud store is configured as its SDKs are, from the environment;
        // with options, from them alone (mixing the two key by key would sign requests with,
        // say, the keys given and a session token left in the shell).
        let from_env = if options.is_empty() { cloud_store_from_env(&url) } else { None };
        let opened = match from_env {
            Some(opened) => opened,
            None => object_store::parse_url_opts(&url, options.clone()).map(|(store, _path)| store),
        };
        let store = opened.map_err(|e| {
            // object_store may quote an option's value (a service-account key passed where a
            // file name goes, or taken from the environment): none is shown, and its error is
            // not kept as the source (its Debug would show it).
            // (`vars_os`: `vars` panics on a variable that is not UTF-8.)
            let env = std::env::vars_os()
                .filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?)))
                .filter(|(k, _)| secret_env_var(k));
            let values: Vec<String> =
                options.iter().cloned().chain(env).map(|(_, v)| v).filter(|v| v.len() >= 4).collect();
            let shown = crate::error::redact(&e.to_string(), &values);
            Error::invalid(format!(
                "cannot open warehouse {warehouse}: {shown} (is the scheme's cargo feature enabled?)"
            ))
        })?;
        Ok(StoreRoot { local_files, created_dirs, catalog_dirs, ..Self::with_store(Arc::from(store), &url) })
    }

    /// Use an existing object store whose root corresponds to the scheme and authority of
    /// `warehouse` (for example a fault-injecting wrapper around a local store).
    pub fn from_store(store: Arc<dyn ObjectStore>, warehouse: &str) -> Result<Self> {
        let url = parse_warehouse_url(warehouse)?;
        Ok(Self::with_store(store, &url))
    }

    fn with_store(store: Arc<dyn ObjectStore>, url: &Url) -> Self {
        // The root is the scheme and authority: `s3://bucket`, `az://container`, `gs://bucket`,
        // `abfss://container@account…` (user part and port included: without them such URLs
        // mapped no location at all). A path-style `https://` URL keeps its bucket in the key,
        // as it always has: changing that would move every existing table's files. Use
        // `s3://bucket/wh` with `aws_endpoint` instead; docs/iceberg-cold-store.md.
        let root = url[..url::Position::BeforePath].to_string();
        let warehouse = url.as_str().trim_end_matches('/').to_string();
        StoreRoot {
            store,
            root,
            warehouse,
            local_files: false,
            created_dirs: 0,
            catalog_dirs: None,
            bucket: bucket_prefix(url),
        }
    }

    /// The object key of a full location under this root.
    pub fn key(&self, location: &str) -> Result<Path> {
        key_in(&self.root, self.bucket.as_deref(), location).map_err(Error::invalid)
    }

    /// [`key`](Self::key) of a file the table's metadata names (`what`: a data file, a
    /// checkpoint): one outside this warehouse (another bucket or scheme, which another engine
    /// may add) is `Corrupt` naming it, not the caller's bad input: this store never reads it.
    pub(crate) fn table_file_key(&self, location: &str, what: &str) -> Result<Path> {
        self.key(location).map_err(|e| {
            Error::corrupt(format!("{what} {location:?} is no location in this warehouse: {}", e.message()))
        })
    }

    /// Whether `location` is under this root (its scheme, authority and bucket), whether or not
    /// its path is a valid object path: a location elsewhere (another bucket or scheme) names no
    /// object this store lists.
    pub(crate) fn holds(&self, location: &str) -> bool {
        self.bucket.as_deref().is_none_or(|b| in_bucket(b, location))
            && root_rest(&self.root, &with_root_scheme(&self.root, location)).is_some()
    }

    /// The iceberg storage factory for this store.
    pub fn factory(&self) -> Arc<dyn StorageFactory> {
        self.factory_with(None)
    }

    fn factory_with(&self, sync: Option<Arc<SyncState>>) -> Arc<dyn StorageFactory> {
        Arc::new(ObjectStoreStorageFactory(ObjectStoreStorage {
            store: self.store.clone(),
            root: self.root.clone(),
            warehouse: self.warehouse.clone(),
            bucket: self.bucket.clone(),
            sync,
        }))
    }

    /// Fsync the entries of the decoded directories `open` created for the default catalog of
    /// a warehouse whose path a URL escapes (see `catalog_dirs`): the data files' syncs walk the
    /// escaped tree only, and SQLite syncs the catalog file's own directory alone, so a power
    /// loss could drop the whole new catalog directory, acknowledged commits with it. Returns
    /// the directories synced (none for other warehouses).
    pub(crate) fn sync_catalog_dirs(&self) -> Result<Vec<std::path::PathBuf>> {
        let Some((dir, created)) = &self.catalog_dirs else { return Ok(Vec::new()) };
        let mut synced = Vec::new();
        for parent in dir.ancestors().skip(1).take(*created) {
            sync_dir(parent).map_err(|(what, e)| {
                Error::unavailable(format!("cannot fsync {what} (the warehouse's catalog directory): {e}"))
                    .with_source(e)
            })?;
            synced.push(parent.to_path_buf());
        }
        Ok(synced)
    }

    /// The iceberg storage factory for this store; with `synced`, on a local file system that
    /// [`open`](Self::open) opened, every file written is fsynced (with its directory) before the
    /// write reports success, and counted in `synced`. Other stores ignore `synced`.
    pub(crate) fn factory_syncing(&self, synced: Option<Arc<AtomicU64>>) -> Result<Arc<dyn StorageFactory>> {
        let sync = match synced.filter(|_| self.local_files) {
            Some(count) => {
                self.sync_catalog_dirs()?;
                // The warehouse directory as the local store names it (percent-encoding kept).
                let warehouse = key_of(&self.root, &self.warehouse)
                    .and_then(|key| local_path(&key))
                    .map_err(|e| Error::invalid(format!("warehouse {} has no local directory: {e}", self.warehouse)))?;
                Some(Arc::new(SyncState {
                    count,
                    warehouse,
                    above: self.created_dirs,
                    synced_dirs: parking_lot::Mutex::default(),
                }))
            }
            None => None,
        };
        Ok(self.factory_with(sync))
    }
}

/// An S3, GCS or Azure store configured as its SDKs are, from the environment (`AWS_*`:
/// region, endpoint, keys, web identity for EKS; `GOOGLE_*` and `SERVICE_ACCOUNT`; `AZURE_*`),
/// then the URL. `None` for other schemes (and those whose feature is off). Used only when no
/// options are given (object_store's `parse_url_opts` ignores the environment).
fn cloud_store_from_env(url: &Url) -> Option<std::result::Result<Box<dyn ObjectStore>, object_store::Error>> {
    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    use object_store::ObjectStoreScheme as S;
    let scheme = object_store::ObjectStoreScheme::parse(url).ok()?.0;
    match scheme {
        #[cfg(feature = "s3")]
        S::AmazonS3 => Some(
            object_store::aws::AmazonS3Builder::from_env()
                .with_url(url.as_str())
                .build()
                .map(|s| Box::new(s) as Box<dyn ObjectStore>),
        ),
        #[cfg(feature = "gcs")]
        S::GoogleCloudStorage => Some(
            object_store::gcp::GoogleCloudStorageBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map(|s| Box::new(s) as Box<dyn ObjectStore>),
        ),
        #[cfg(feature = "azure")]
        S::MicrosoftAzure => Some(
            object_store::azure::MicrosoftAzureBuilder::from_env()
                .with_url(url.as_str())
                .build()
                .map(|s| Box::new(s) as Box<dyn ObjectStore>),
        ),
        _ => None,
    }
}

/// Whether the environment variable `name` is one a cloud store reads its configuration from
/// (object_store's `from_env`: `AWS_*`, `GOOGLE_*`, `AZURE_*`, and GCS's `SERVICE_ACCOUNT`), whose
/// value an error must not show.
fn secret_env_var(name: &str) -> bool {
    name == "SERVICE_ACCOUNT" || ["AWS_", "GOOGLE_", "AZURE_"].iter().any(|p| name.starts_with(p))
}

/// Refuse options the warehouse's store would ignore: `object_store` drops keys it cannot parse,
/// so a misspelt `aws_endpoint` would quietly send requests to AWS; and the bucket (container)
/// options, which the warehouse URL names and overrides (`s3://staging/wh` with
/// `aws_bucket=prod` wrote to `staging`).
fn check_options(url: &Url, options: &[(String, String)]) -> Result<()> {
    use object_store::ObjectStoreScheme as S;
    let Some((first, _)) = options.first() else { return Ok(()) };
    let unknown = |key: &str, store: &str| {
        Error::invalid(format!("warehouse {url}: {store} has no option {key:?} (see object_store's config keys)"))
    };
    #[cfg(any(feature = "s3", feature = "gcs", feature = "azure"))]
    let named_by_url = |key: &str| {
        Error::invalid(format!(
            "warehouse {url}: option {key:?} names the bucket or container, which the warehouse URL names (the URL's wins): leave it out"
        ))
    };
    match object_store::ObjectStoreScheme::parse(url) {
        Ok((S::Local | S::Memory, _)) => return Err(unknown(first, "a local or in-memory warehouse")),
        #[cfg(feature = "s3")]
        Ok((S::AmazonS3, _)) => {
            for (key, _) in options {
                let parsed = key.parse::<object_store::aws::AmazonS3ConfigKey>().map_err(|_| unknown(key, "S3"))?;
                if parsed == object_store::aws::AmazonS3ConfigKey::Bucket {
                    return Err(named_by_url(key));
                }
            }
        }
        #[cfg(feature = "gcs")]
        Ok((S::GoogleCloudStorage, _)) => {
            for (key, _) in options {
                let parsed = key.parse::<object_store::gcp::GoogleConfigKey>().map_err(|_| unknown(key, "GCS"))?;
                if parsed == object_store::gcp::GoogleConfigKey::Bucket {
                    return Err(named_by_url(key));
                }
            }
        }
        #[cfg(feature = "azure")]
        Ok((S::MicrosoftAzure, _)) => {
            for (key, _) in options {
                let parsed = key.parse::<object_store::azure::AzureConfigKey>().map_err(|_| unknown(key, "Azure"))?;
                if parsed == object_store::azure::AzureConfigKey::ContainerName {
                    return Err(named_by_url(key));
                }
            }
        }
        // `memory://name` (a host) and schemes whose store is not compiled in: opening fails
        // (or ignores options) on its own terms.
        _ if url.scheme() == "memory" => return Err(unknown(first, "an in-memory warehouse")),
        _ => {}
    }
    Ok(())
}

fn parse_warehouse_url(warehouse: &str) -> Result<Url> {
    let trimmed = warehouse.trim_end_matches('/');
    let local = |path: &std::path::Path| {
        Url::from_directory_path(normalized(path))
            .map_err(|()| Error::invalid(format!("warehouse path {warehouse} is not absolute")))
    };
    if trimmed.starts_with('/') {
        return local(std::path::Path::new(trimmed));
    }
    // A relative local path (`warehouse`, `./data/wh`): from the working directory, as the hot
    // stores take theirs. A URL names its scheme (`s3://`, `file:`).
    // A scheme (two characters or more: `C:` starts a Windows path) followed by `/` (`s3:/b`,
    // `memory://`, `file:///x`), or `file:` (`file:lake`, refused below); a colon elsewhere is
    // part of a directory's name (`wh-2024-06-01T12:00:00`, `lake:v2`).
    let scheme_then_slash = warehouse.split_once(':').is_some_and(|(s, rest)| {
        s.len() >= 2
            && s.starts_with(|c: char| c.is_ascii_alphabetic())
            && s.chars().all(|c| c.is_ascii_alphanumeric() || "+.-".contains(c))
            && rest.starts_with('/')
    });
    let is_url = scheme_then_slash
        || trimmed.contains("://")
        || trimmed.get(..5).is_some_and(|s| s.eq_ignore_ascii_case("file:"));
    if !is_url && !trimmed.is_empty() {
        // An object store's scheme without `//` (`s3:bucket/wh`, `memory:x`): a typo, not a
        // local directory named `s3:bucket`.
        const STORES: [&str; 11] = ["s3", "s3a", "s3n", "gs", "az", "adl", "azure", "abfs", "abfss", "memory", "https"];
        if let Some((scheme, _)) =
            trimmed.split_once(':').filter(|(s, _)| STORES.iter().any(|k| s.eq_ignore_ascii_case(k)))
        {
            return Err(Error::invalid(format!(
                "warehouse {warehouse}: a {scheme} warehouse is a URL ({scheme}://bucket/path)"
            )));
        }
        let cwd = std::env::current_dir().map_err(|e| {
            Error::invalid(format!("warehouse path {warehouse} is relative and the working directory is unknown: {e}"))
        })?;
        return local(&cwd.join(trimmed));
    }
    // A password in it is not shown (what does not parse may hold one the parser could not take
    // apart), nor a query: see `shown_warehouse`.
    let url = Url::parse(trimmed)
        .map_err(|e| Error::invalid(format!("warehouse {} is not a URL: {e}", shown_warehouse(trimmed))))?;
    // A query or fragment would become part of every table location (`s3://b/wh?x=1/ns/t/…`),
    // and a password part of every message naming the warehouse; credentials go in options.
    if url.query().is_some() || url.fragment().is_some() || url.password().is_some() {
        let mut shown = url.clone();
        shown.set_query(None);
        shown.set_fragment(None);
        let shown = crate::catalog::without_password(shown.as_str());
        return Err(Error::invalid(format!(
            "warehouse {shown}: a warehouse URL has no query, fragment or password (give credentials as store options)"
        )));
    }
    // `memory://`, `s3://` and `s3:/b/wh` name no store or bucket (they were taken for a
    // relative local directory named `memory:` or `s3:`).
    if url.scheme() != "file" && url.host_str().is_none_or(str::is_empty) {
        return Err(Error::invalid(format!(
            "warehouse {warehouse} names no bucket or store (`s3://bucket/path`, `memory://name`)"
        )));
    }
    if url.scheme() == "file" {
        // `file:lake`, `file:./wh` and `file:C:/wh` parse as `/lake`, `/wh` and `/C:/wh`: a
        // relative path would be taken from the root. And `file://host/…` names no local path.
        let absolute = trimmed.get(..6).is_some_and(|s| s.eq_ignore_ascii_case("file:/"));
        if !absolute || url.to_file_path().is_err() {
            return Err(Error::invalid(format!(
                "warehouse {warehouse}: a file: warehouse URL names an absolute local path (file:///abs/path), or \
                 give the path itself"
            )));
        }
    }
    match url.to_file_path() {
        // `file:///a//b`: the same directory as `/a/b` (object paths have no empty segments).
        Ok(path) if url.scheme() == "file" && url.path().contains("//") => local(&path),
        // `s3://bkt//lake` (a prefix joined with a leading `/`): object paths have no empty
        // segments, and the keys always dropped them (`lake/…`); the warehouse is read as
        // `s3://bkt/lake`, so that new tables' locations name their objects as other engines
        // read them (they read `//lake` literally, as `/lake/…`), and opening with options
        // parses it too (it failed there as an unknown scheme). Tables created before keep their
        // stored `//` locations, which map to the same keys as ever.
        _ if url.scheme() != "file" && url.path().contains("//") => {
            let mut url = url;
            let path: Vec<&str> = url.path().split('/').filter(|p| !p.is_empty()).collect();
            let path = format!("/{}", path.join("/"));
            url.set_path(&path);
            Ok(url)
        }
        _ => Ok(url),
    }
}

/// A warehouse URL as messages and `Debug` show it: without a password (see
/// `without_password`) and without any query or fragment, which may carry a credential
/// (`?X-Amz-Signature=…`; a warehouse with one is refused, its message not showing it).
pub(crate) fn shown_warehouse(warehouse: &str) -> String {
    match Url::parse(warehouse) {
        Ok(mut u) => {
            let cut = u.query().is_some() || u.fragment().is_some();
            u.set_query(None);
            u.set_fragment(None);
            let shown = crate::catalog::without_password(u.as_str());
            if cut {
                format!("{shown}?…")
            } else {
                shown
            }
        }
        // What does not parse may hold a password the parser could not take apart (a `#` or
        // `?` inside it): `without_password` shows the scheme alone then.
        Err(_) if warehouse.contains('@') => crate::catalog::without_password(warehouse),
        Err(_) => match warehouse.find(['?', '#']) {
            Some(i) => format!("{}?…", &warehouse[..i]),
            None => warehouse.to_string(),
        },
    }
}

/// `path` with `.`, `..` and empty components resolved lexically (`/a/b/../c` is `/a/c`), as a
/// URL parser resolves them in a `file://` URL: the two spellings of a local warehouse name the
/// same files (object paths may not contain `..`).
fn normalized(path: &std::path::Path) -> std::path::PathBuf {
    use std::path::Component;
    let mut out = std::path::PathBuf::new();
    for c in path.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                out.pop();
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// `location` spelled with the scheme `root` uses, where another engine wrote an alias that
/// object_store opens as the same store (`s3a://`, `s3n://` for `s3://`; `abfs://` / `abfss://`;
/// `file://localhost/` for `file:///`).
fn with_root_scheme<'a>(root: &str, location: &'a str) -> std::borrow::Cow<'a, str> {
    let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let (Some(want), Some(have)) = (scheme(root), scheme(location)) else { return location.into() };
    let family = |s: &str| {
        match s {
            "s3" | "s3a" | "s3n" => "s3",
            "abfs" | "abfss" => "abfs",
            other => other,
        }
        .to_string()
    };
    if let Some(rest) = location.strip_prefix("file://localhost/").filter(|_| want == "file") {
        return format!("file:///{rest}").into();
    }
    if want != have && family(&want) == family(&have) {
        let rest = &location[have.len()..];
        return format!("{want}{rest}").into();
    }
    location.into()
}

/// For an http(s) URL whose first path segment names the bucket or container
/// (`https://acct.r2.cloudflarestorage.com/bkt/wh`, `https://s3.<region>.amazonaws.com/bkt/wh`,
/// `https://acct.blob.core.windows.net/container/wh`: object_store takes it off the path and
/// binds the store to it), the location prefix of that bucket
/// (`https://acct.r2.cloudflarestorage.com/bkt`): a location in another bucket of the same
/// host names no object of this store (it was read and written as a key of this bucket). Not
/// for a virtual-hosted URL (`https://bkt.s3.<region>.amazonaws.com/wh`: the bucket is the
/// host) nor a plain HTTP store.
fn bucket_prefix(url: &Url) -> Option<String> {
    if url.scheme() != "https" {
        return None;
    }
    // As object_store's builders take them (`AmazonS3Builder`: `s3.<region>.amazonaws.com` is
    // path-style, `<bucket>.s3.<region>.amazonaws.com` virtual-hosted, also for a bucket named
    // `s3-…`; R2 and Azure's https hosts keep the bucket or container in the path).
    let host = url.host_str()?;
    let path_style = (host.ends_with(".amazonaws.com") && host.split('.').next() == Some("s3"))
        || host.ends_with(".r2.cloudflarestorage.com")
        || ["dfs.core.windows.net", "blob.core.windows.net", "dfs.fabric.microsoft.com", "blob.fabric.microsoft.com"]
            .iter()
            .any(|h| host.ends_with(h));
    if !path_style {
        return None;
    }
    let bucket = url.path_segments()?.next().filter(|s| !s.is_empty())?;
    Some(format!("{}/{bucket}", &url[..url::Position::BeforePath]))
}

/// Whether `location` is in the bucket whose location prefix is `bucket`.
fn in_bucket(bucket: &str, location: &str) -> bool {
    location.strip_prefix(bucket).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

/// [`key_of`], refusing a location outside `bucket` (see [`bucket_prefix`]).
fn key_in(root: &str, bucket: Option<&str>, location: &str) -> std::result::Result<Path, String> {
    if let Some(b) = bucket {
        if !in_bucket(b, location) {
            return Err(format!("location {location} is not in the warehouse's bucket {b}"));
        }
    }
    key_of(root, location)
}

/// The path part of `location` (spelled with the root's scheme) if it is under `root`.
fn root_rest<'a>(root: &str, location: &'a str) -> Option<&'a str> {
    if root == "file://" {
        // Local paths, absolute only: `file:///abs`, `file:/abs`, `/abs`. A relative path, one
        // with a host (`file://server/share`) or a drive (`C:/x`) names no file of this store
        // (it was mapped to `/wh/x`, `/server/share`, `/C:/x`).
        let path = location.strip_prefix("file://").or_else(|| location.strip_prefix("file:")).unwrap_or(location);
        Some(path).filter(|p| p.starts_with('/'))
    } else {
        location
            .strip_prefix(root)
            // Whole path segments only: root `s3://b` must not take `s3://bb/x` as its `b/x`.
            .filter(|rest| root.ends_with('/') || rest.is_empty() || rest.starts_with('/'))
    }
}

fn key_of(root: &str, location: &str) -> std::result::Result<Path, String> {
    let spelled = with_root_scheme(root, location);
    let location = spelled.as_ref();
    let rest =
        root_rest(root, location).ok_or_else(|| format!("location {location} is not under the store root {root}"))?;
    // (`s3://b//x` is key `x`, as it always was: the locations of tables created under a
    // warehouse written `s3://b//wh` keep mapping to the objects they were written as.)
    Path::parse(rest.trim_start_matches('/'))
        .map_err(|e| format!("location {location} is not a valid object path: {e}"))
}

/// A ranged read must answer the whole range: object_store answers a range that ends past the
/// end of the object with what there is (a file cut short by a crash, or replaced by a shorter
/// one), and decoders then fail on their own terms, or panic. `Corrupt` naming the file.
pub(crate) fn check_range_read(path: &Path, range: &Range<u64>, bytes: &Bytes) -> Result<()> {
    let want = range.end.saturating_sub(range.start);
    if bytes.len() as u64 != want {
        return Err(Error::corrupt(format!(
            "{path}: bytes {range:?} asked, {} read: the file is shorter than its reader expects (cut short or \
             replaced)",
            bytes.len()
        )));
    }
    Ok(())
}

/// Above this many bytes, [`Storage::write`] uploads in parts (the streamed writer's part size:
/// a payload up to it is one PUT there too).
const LARGE_WRITE: usize = PART_BYTES;

/// The part size of a streamed writer's multipart upload (S3 needs 5 MiB or more for every part
/// but the last; `object_store`'s `BufWriter` uses 10 MiB). A file of at most this many bytes is
/// one PUT (a written file: larger ones are sent in parts of exactly this size, then the rest).
const PART_BYTES: usize = 10 * 1024 * 1024;

/// Parts of one multipart upload in flight at once (as `BufWriter`'s default).
const PARTS_IN_FLIGHT: usize = 8;

fn os_err(e: object_store::Error) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("object store: {e}")).with_source(e)
}

/// A location this storage cannot map to a key (a catalog handing out locations in another
/// bucket or scheme): a configuration mistake, `InvalidInput` once classified.
fn path_err(msg: String) -> iceberg::Error {
    iceberg::Error::new(iceberg::ErrorKind::Unexpected, msg.clone()).with_source(Error::invalid(msg))
}

/// iceberg `Storage` over an [`ObjectStore`]. Not deserializable (a live store cannot be). Its
/// `Debug` shows the store's `Display` only (no credentials).
#[derive(Clone, serde::Serialize)]
pub struct ObjectStoreStorage {
    #[serde(skip)]
    store: Arc<dyn ObjectStore>,
    root: String,
    /// The warehouse location (the root plus the warehouse's path, if any).
    warehouse: String,
    /// The bucket's location prefix of a path-style S3 URL over http(s).
    #[serde(skip)]
    bucket: Option<String>,
    /// Set when written files are fsynced.
    #[serde(skip)]
    sync: Option<Arc<SyncState>>,
}

impl std::fmt::Debug for ObjectStoreStorage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ObjectStoreStorage")
            .field("store", &format_args!("{}", self.store))
            .field("root", &self.root)
            .field("warehouse", &self.warehouse)
            .field("sync", &self.sync.is_some())
            .finish()
    }
}

/// What a syncing storage needs: the count of files synced, the warehouse directory (ancestors
/// above its parent are not its to sync) and the directories whose own entry in their parent is
/// already durable (a new partition directory's entry needs one sync of its parent; a new file's
/// entry in its directory needs one every time).
#[derive(Debug)]
struct SyncState {
    count: Arc<AtomicU64>,
    warehouse: std::path::PathBuf,
    /// How many directory levels above the warehouse directory are its to sync: those `open`
    /// created (their entries in their parents are new), at least its parent's (its own entry).
    above: usize,
    synced_dirs: parking_lot::Mutex<std::collections::HashSet<std::path::PathBuf>>,
}

/// The local file system path of object `key` exactly as `object_store`'s `LocalFileSystem`
/// (rooted at `/`, as `parse_url` opens it) writes it.
fn local_path(key: &Path) -> std::result::Result<std::path::PathBuf, String> {
    object_store::local::LocalFileSystem::new().path_to_filesystem(key).map_err(|e| e.to_string())
}

impl<'de> serde::Deserialize<'de> for ObjectStoreStorage {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(serde::de::Error::custom("ObjectStoreStorage holds a live object store and cannot be deserialized"))
    }
}

impl ObjectStoreStorage {
    fn key(&self, p: &str) -> iceberg::Result<Path> {
        key_in(&self.root, self.bucket.as_deref(), p).map_err(path_err)
    }

    /// The key of a file read: as [`key`](Self::key), but a location outside the warehouse of a
    /// file a table's metadata names (a manifest list, manifest or data file another engine
    /// added from another bucket or scheme) is `Corrupt` naming it, as dotdo's own reads of
    /// those files answer; only a table metadata file (`*.metadata.json`, whose location a
    /// catalog hands over: a catalog pointing elsewhere is configuration) stays `InvalidInput`.
    fn read_key(&self, p: &str) -> iceberg::Result<Path> {
        key_in(&self.root, self.bucket.as_deref(), p).map_err(|msg| {
            if p.ends_with(".metadata.json") {
                return path_err(msg);
            }
            let e = Error::corrupt(format!(
                "file {p:?}, named by the table's metadata, is no location in this warehouse: {msg}"
            ));
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()).with_source(e)
        })
    }

    /// After a write: fsync the file `key` (at `location`), its directory (for its new entry),
    /// and once each the directories between that one and the warehouse's parent (any may be
    /// new), so that the file's content and its name survive a power loss; if this storage syncs.
    async fn synced(&self, key: &Path, location: &str) -> iceberg::Result<()> {
        let Some(sync) = self.sync.clone() else { return Ok(()) };
        let path = local_path(key)
            .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("cannot sync {location}: {e}")))?;
        let done = tokio::task::spawn_blocking(move || {
            sync_local_file(&sync, &path)?;
            sync.count.fetch_add(1, Ordering::Relaxed);
            Ok(())
        })
        .await
        .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("fsync task failed: {e}")))?;
        done.map_err(|(what, e): (String, std::io::Error)| {
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, format!("cannot fsync {what} of {location}: {e}"))
                .with_source(e)
        })
    }
}

/// A failure to create the local warehouse directory at open: as a write's I/O error is
/// classified later, a path through a file, a full or read-only disk, an exhausted quota and
/// missing permissions are for the operator (not retryable); anything else may pass (a network
/// file system whose server restarted: `ESTALE`, `EIO`, `ENOTCONN`) and is a retryable
/// `Unavailable`, as the same error is in an append (it was a permanent `Backend` at open).
fn warehouse_dir_error(dir: &std::path::Path, e: std::io::Error) -> Error {
    let msg = format!("cannot create warehouse directory {}: {e}", dir.display());
    // (`AlreadyExists`: the path, or a directory on it, is a file.)
    use std::io::ErrorKind as K;
    if crate::error::io_refused(e.kind()) || matches!(e.kind(), K::PermissionDenied | K::AlreadyExists) {
        Error::new(dotdo_core::ErrorKind::Backend, msg).with_retryable(false).with_source(e)
    } else {
        Error::unavailable(msg).with_source(e)
    }
}

/// fsync `path` and its directory, then each ancestor up to the warehouse directory's parent,
/// or up to the first directory above it that existed before `open` created the others
/// ([`SyncState::above`]), that no earlier call synced (blocking).
fn sync_local_file(sync: &SyncState, path: &std::path::Path) -> std::result::Result<(), (String, std::io::Error)> {
    std::fs::File::open(path).and_then(|f| f.sync_all()).map_err(|e| ("the file".to_string(), e))?;
    let Some(parent) = path.parent() else { return Ok(()) };
    sync_dir(parent)?;
    // (Directories `open` created above the warehouse have new entries too: a power loss could
    // drop the whole warehouse with them, acknowledged commits and catalog included.)
    let within = sync.warehouse.ancestors().nth(sync.above.max(1)).unwrap_or(&sync.warehouse);
    // A file outside the warehouse (a table at a namespace's own location, or placed by another
    // engine): every ancestor up to the file system's root, any may be new.
    let stop = Some(within).filter(|w| parent.starts_with(w));
    // A directory in `synced_dirs` has its own entry (in its parent) durable already.
    let mut dir = parent;
    while Some(dir) != stop {
        let Some(up) = dir.parent() else { break };
        if !sync.synced_dirs.lock().contains(dir) {
            // The warehouse's own entry in its parent, when the warehouse was there before
            // `open` (`above` 0): not an entry this process made either.
            let not_ours = stop.is_none() || (sync.above == 0 && dir == sync.warehouse);
            match sync_dir(up) {
                // Outside the warehouse, an ancestor this process may not open (`chmod 711`,
                // another user's) is not one it made an entry in: the walk ends there (it failed
                // every write for a warehouse in such a directory).
                Err((_, e)) if not_ours && e.kind() == std::io::ErrorKind::PermissionDenied => break,
                r => r?,
            }
            sync.synced_dirs.lock().insert(dir.to_path_buf());
        }
        dir = up;
    }
    Ok(())
}

/// fsync a directory (its entries). Where directories cannot be opened for syncing (Windows),
/// this does nothing.
fn sync_dir(dir: &std::path::Path) -> std::result::Result<(), (String, std::io::Error)> {
    if cfg!(unix) {
        let fail = |e| (format!("the directory {}", dir.display()), e);
        std::fs::File::open(dir).and_then(|d| d.sync_all()).map_err(fail)?;
    }
    Ok(())
}

#[async_trait]
#[typetag::serde(name = "DotdoObjectStoreStorage")]
impl Storage for ObjectStoreStorage {
    async fn exists(&self, path: &str) -> iceberg::Result<bool> {
        match self.store.head(&self.read_key(path)?).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn metadata(&self, path: &str) -> iceberg::Result<FileMetadata> {
        Ok(FileMetadata { size: self.store.head(&self.read_key(path)?).await.map_err(os_err)?.size })
    }

    async fn read(&self, path: &str) -> iceberg::Result<Bytes> {
        self.store.get(&self.read_key(path)?).await.map_err(os_err)?.bytes().await.map_err(os_err)
    }

    async fn reader(&self, path: &str) -> iceberg::Result<Box<dyn FileRead>> {
        Ok(Box::new(OsRead { store: self.store.clone(), path: self.read_key(path)? }))
    }

    async fn write(&self, path: &str, bs: Bytes) -> iceberg::Result<()> {
        // A large payload (a watermark checkpoint of millions of objects: tens to hundreds of
        // MB) goes up in parts, as the streamed writer's files do: in one PUT it must finish
        // within the HTTP client's whole-request timeout (object_store's default is 30 s), and
        // on a slow link failed on every attempt (S3 also refuses a PUT over 5 GiB).
        if bs.len() > LARGE_WRITE {
            let mut w = self.writer(path).await?;
            w.write(bs).await?;
            return w.close().await;
        }
        let key = self.key(path)?;
        self.store.put(&key, bs.into()).await.map(|_| ()).map_err(os_err)?;
        self.synced(&key, path).await
    }

    async fn writer(&self, path: &str) -> iceberg::Result<Box<dyn FileWrite>> {
        let key = self.key(path)?;
        let sync = self.sync.is_some().then(|| (self.clone(), key.clone(), path.to_string()));
        Ok(Box::new(OsWrite {
            store: self.store.clone(),
            key,
            pending: std::collections::VecDeque::new(),
            pending_len: 0,
            total: 0,
            upload: None,
            parts: tokio::task::JoinSet::new(),
            closed: false,
            sync,
        }))
    }

    async fn delete(&self, path: &str) -> iceberg::Result<()> {
        match self.store.delete(&self.key(path)?).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(e) => Err(os_err(e)),
        }
    }

    async fn delete_prefix(&self, path: &str) -> iceberg::Result<()> {
        let prefix = self.key(path)?;
        // Only a table's prefix or one under it (at least a namespace and a table below the
        // warehouse): the store's root, the warehouse's own location, a namespace, or anything
        // above or beside the warehouse (`s3://b/a` of warehouse `s3://b/a/wh`) would delete
        // tables, or other data, wholesale.
        let warehouse = self.key(&self.warehouse).map_err(|e| {
            iceberg::Error::new(iceberg::ErrorKind::DataInvalid, format!("the warehouse's own location: {e}"))
        })?;
        let below = prefix.prefix_match(&warehouse).map_or(0, |parts| parts.count());
        if below < 2 {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                format!(
                    "refusing to delete everything under {path}: only a table's prefix under the warehouse {} is \
                     deleted whole",
                    self.warehouse
                ),
            ));
        }
        // A table's prefix holds no other table: one whose metadata lies below a directory under
        // the prefix (`<prefix>/<t>/metadata/…` of a multi-level namespace `<prefix>`) is refused
        // (its depth alone cannot tell `ns/t` from the namespace `a/b`). One listing to look,
        // another to delete (streamed: a table may hold millions of files).
        let nested_table = |loc: &object_store::path::Path| {
            let parts: Vec<_> = loc.prefix_match(&prefix).map(Iterator::collect).unwrap_or_default();
            parts.len() >= 3
                && parts[parts.len() - 2].as_ref() == "metadata"
                && parts[parts.len() - 1].as_ref().ends_with(".metadata.json")
        };
        let mut listing = self.store.list(Some(&prefix));
        let mut nested = None;
        while let Some(meta) = listing.next().await {
            let loc = meta.map_err(os_err)?.location;
            if nested_table(&loc) {
                nested = Some(loc);
                break;
            }
        }
        drop(listing);
        if let Some(loc) = nested {
            return Err(iceberg::Error::new(
                iceberg::ErrorKind::DataInvalid,
                format!(
                    "refusing to delete everything under {path}: it holds another table's metadata ({loc}), so it \
                     is a namespace, not a table's prefix"
                ),
            ));
        }
        // Checked again as it is deleted: a table created under the prefix between the two
        // listings stops the deletion before its metadata.
        let locs = self
            .store
            .list(Some(&prefix))
            .map_ok(|m| m.location)
            .and_then(move |loc| {
                let nested = nested_table(&loc);
                futures::future::ready(if nested {
                    Err(object_store::Error::Generic {
                        store: "dotdo",
                        source: format!("{loc}: another table's metadata appeared under the prefix being deleted")
                            .into(),
                    })
                } else {
                    Ok(loc)
                })
            })
            .boxed();
        let mut s = self.store.delete_stream(locs);
        while let Some(r) = s.next().await {
            match r {
                Ok(_) | Err(object_store::Error::NotFound { .. }) => {}
                Err(e) => return Err(os_err(e)),
            }
        }
        Ok(())
    }

    async fn delete_stream(&self, mut paths: BoxStream<'static, String>) -> iceberg::Result<()> {
        while let Some(p) = paths.next().await {
            self.delete(&p).await?;
        }
        Ok(())
    }

    fn new_input(&self, path: &str) -> iceberg::Result<InputFile> {
        Ok(InputFile::new(Arc::new(self.clone()), path.to_string()))
    }

    fn new_output(&self, path: &str) -> iceberg::Result<OutputFile> {
        Ok(OutputFile::new(Arc::new(self.clone()), path.to_string()))
    }
}

struct OsRead {
    store: Arc<dyn ObjectStore>,
    path: Path,
}

#[async_trait]
impl FileRead for OsRead {
    async fn read(&self, range: Range<u64>) -> iceberg::Result<Bytes> {
        // The store's own error may not name the object (a range past its end does not).
        let bytes = self.store.get_range(&self.path, range.clone()).await.map_err(|e| {
            let shown = format!("reading bytes {range:?} of {}: {e}", self.path);
            iceberg::Error::new(iceberg::ErrorKind::Unexpected, shown).with_source(e)
        })?;
        check_range_read(&self.path, &range, &bytes)
            .map_err(|e| iceberg::Error::new(iceberg::ErrorKind::DataInvalid, e.to_string()).with_source(e))?;
        Ok(bytes)
    }
}

/// Streams a file to the store: one PUT when it comes to at most [`PART_BYTES`], else a
/// multipart upload whose parts go up on tasks of their own, at most [`PARTS_IN_FLIGHT`] at once;
/// with `sync`, fsyncs it once complete. Written here rather than with `object_store`'s
/// `BufWriter`, which cannot abort an upload once its shutdown began: a part that failed (most
/// surface only then) or a close given up midway left the upload's parts on the store (billed on
/// S3 and GCS until a lifecycle rule removes them). Here every failure, and a writer dropped
/// unfinished, aborts the upload (after stopping the parts in flight).
struct OsWrite {
    store: Arc<dyn ObjectStore>,
    key: Path,
    /// Bytes written and not yet sent.
    pending: std::collections::VecDeque<Bytes>,
    pending_len: usize,
    /// Bytes written in all.
    total: u64,
    /// The multipart upload, once the file outgrew one part, until it completed or was aborted.
    upload: Option<Box<dyn object_store::MultipartUpload>>,
    /// Part uploads in flight.
    parts: tokio::task::JoinSet<object_store::Result<()>>,
    /// Closed, or abandoned after a failure.
    closed: bool,
    sync: Option<(ObjectStoreStorage, Path, String)>,
}

impl OsWrite {
    fn closed_error() -> iceberg::Error {
        iceberg::Error::new(iceberg::ErrorKind::Unexpected, "writer closed")
    }

    /// The first `n` pending bytes (all of them if fewer).
    fn take_pending(&mut self, n: usize) -> object_store::PutPayload {
        let mut chunks = Vec::new();
        let mut left = n;
        while left > 0 {
            let Some(mut chunk) = self.pending.pop_front() else { break };
            if chunk.len() > left {
                self.pending.push_front(chunk.split_off(left));
            }
            left -= chunk.len();
            self.pending_len -= chunk.len();
            chunks.push(chunk);
        }
        chunks.into_iter().collect()
    }

    /// Start the upload of one part (beginning the multipart upload with the first), after
    /// waiting for room among the parts in flight.
    async fn send_part(&mut self, part: object_store::PutPayload) -> object_store::Result<()> {
        while let Some(done) = self.parts.try_join_next() {
            part_result(&self.key, done)?;
        }
        while self.parts.len() >= PARTS_IN_FLIGHT {
            match self.parts.join_next().await {
                Some(done) => part_result(&self.key, done)?,
                None => break,
            }
        }
        if self.upload.is_none() {
            self.upload = Some(self.store.put_multipart(&self.key).await?);
        }
        if let Some(upload) = self.upload.as_mut() {
            self.parts.spawn(upload.put_part(part));
        }
        Ok(())
    }

    /// Send what is pending and complete the upload (one PUT if no upload began).
    async fn finish(&mut self) -> object_store::Result<()> {
        if self.upload.is_none() {
            let payload = self.take_pending(self.pending_len);
            self.store.put(&self.key, payload).await?;
            return Ok(());
        }
        if self.pending_len > 0 {
            let part = self.take_pending(self.pending_len);
            self.send_part(part).await?;
        }
        while let Some(done) = self.parts.join_next().await {
            part_result(&self.key, done)?;
        }
        if let Some(upload) = self.upload.as_mut() {
            if let Err(e) = upload.complete().await {
                completed_anyway(&self.store, &self.key, self.total, e).await?;
            }
        }
        // Complete: nothing left to abort.
        self.upload = None;
        Ok(())
    }

    /// Give the file up after a failure: stop the parts in flight and abort the upload.
    async fn abandon(&mut self) {
        self.closed = true;
        // The parts in flight are stopped before the abort (one landing after it would stay).
        self.parts.shutdown().await;
        self.pending.clear();
        self.pending_len = 0;
        // Cleared only once aborted: given up on during the abort (a caller's timeout), the
        // writer still holds the upload and its `Drop` aborts it.
        if let Some(upload) = self.upload.as_mut() {
            let _ = upload.abort().await;
        }
        self.upload = None;
    }
}

/// After the completion of the multipart upload of `key` (`total` bytes written) failed with
/// `e`: `Ok` if it is a `NotFound` and the file is there as written. An S3-compatible store
/// answers `NoSuchUpload` (object_store's `NotFound`) to a completion object_store sent again
/// after the first one completed the upload and its reply was lost (a completion is retried as
/// idempotent). Any other `NotFound` is a retryable failure, not a missing file (the upload is
/// gone; writing again mends it).
async fn completed_anyway(
    store: &Arc<dyn ObjectStore>,
    key: &Path,
    total: u64,
    e: object_store::Error,
) -> object_store::Result<()> {
    if !matches!(e, object_store::Error::NotFound { .. }) {
        return Err(e);
    }
    match store.head(key).await {
        Ok(meta) if meta.size == total => {
            tracing::debug!(key = %key, error = %e, "dotdo iceberg: a multipart completion answered NotFound; the file is there, complete");
            Ok(())
        }
        found => {
            // The store's answers are logged, not carried: their text ("status code: 404")
            // would class the failure as a refused request.
            let (there, head) = match found {
                Ok(meta) => (format!("{} bytes of the {} written", meta.size, total), String::new()),
                Err(h @ object_store::Error::NotFound { .. }) => ("absent".to_string(), h.to_string()),
                Err(h) => ("it could not be checked".to_string(), h.to_string()),
            };
            tracing::warn!(key = %key, error = %e, head = %head, "dotdo iceberg: a multipart completion answered NotFound");
            Err(object_store::Error::Generic {
                store: "multipart upload",
                source: format!(
                    "completing the multipart upload of {} was answered NotFound (the upload is gone) and \
                     the object is not there as written ({there}): write the file again",
                    key
                )
                .into(),
            })
        }
    }
}

/// A part upload's outcome (a task that panicked or was cancelled is a failed part).
fn part_result(
    key: &Path,
    done: std::result::Result<object_store::Result<()>, tokio::task::JoinError>,
) -> object_store::Result<()> {
    done.unwrap_or_else(|e| {
        Err(object_store::Error::Generic {
            store: "multipart upload",
            source: format!("a part upload ended: {e}").into(),
        })
    })
    .map_err(|e| match crate::error::object_store_cause(&e) {
        // A part answered `NotFound` (S3's `NoSuchUpload`: the upload expired, or an
        // S3-compatible server lost it): not a missing file (`Corrupt`), a retryable failure that
        // writing the file again mends, as at completion (`completed_anyway`). A missing bucket
        // stays configuration.
        crate::error::Cause::Missing(_) => {
            tracing::warn!(key = %key, error = %e, "dotdo iceberg: a multipart part upload answered NotFound");
            object_store::Error::Generic {
                store: "multipart upload",
                source: format!(
                    "a part of the multipart upload of {key} was answered NotFound (the upload is gone): \
                     write the file again"
                )
                .into(),
            }
        }
        _ => e,
    })
}

#[async_trait]
impl FileWrite for OsWrite {
    async fn write(&mut self, bs: Bytes) -> iceberg::Result<()> {
        if self.closed {
            return Err(Self::closed_error());
        }
        self.pending_len += bs.len();
        self.total = self.total.saturating_add(bs.len() as u64);
        self.pending.push_back(bs);
        // Marked closed while parts are taken and sent: a write dropped midway (its part taken
        // from `pending`, perhaps never sent) leaves a writer that refuses to go on (and aborts
        // its upload when dropped), never one that would complete a file without that part.
        self.closed = true;
        while self.pending_len > PART_BYTES {
            let part = self.take_pending(PART_BYTES);
            if let Err(e) = self.send_part(part).await {
                self.abandon().await;
                return Err(os_err(e));
            }
        }
        self.closed = false;
        Ok(())
    }

    async fn close(&mut self) -> iceberg::Result<()> {
        if self.closed {
            return Err(Self::closed_error());
        }
        // Dropped midway (a caller's timeout), the writer still holds the upload: its `Drop`
        // aborts it (and, closed, it refuses to be closed again).
        self.closed = true;
        if let Err(e) = self.finish().await {
            self.abandon().await;
            return Err(os_err(e));
        }
        match &self.sync {
            Some((storage, key, path)) => storage.synced(key, path).await,
            None => Ok(()),
        }
    }
}

/// A writer dropped unfinished (its caller gave up, a failed sibling's task was aborted) aborts
/// its multipart upload, if it began one, on the runtime it ran on (the parts in flight are
/// stopped as their `JoinSet` drops).
impl Drop for OsWrite {
    fn drop(&mut self) {
        if let (Some(mut upload), Ok(rt)) = (self.upload.take(), tokio::runtime::Handle::try_current()) {
            let mut parts = std::mem::take(&mut self.parts);
            drop(rt.spawn(async move {
                parts.shutdown().await;
                let _ = upload.abort().await;
            }));
        }
    }
}

/// The factory handed to iceberg catalogs; it always returns the same storage.
#[derive(Clone, Debug, serde::Serialize)]
pub struct ObjectStoreStorageFactory(ObjectStoreStorage);

impl<'de> serde::Deserialize<'de> for ObjectStoreStorageFactory {
    fn deserialize<D: serde::Deserializer<'de>>(_: D) -> std::result::Result<Self, D::Error> {
        Err(serde::de::Error::custom("ObjectStoreStorageFactory holds a live object store and cannot be deserialized"))
    }
}

#[typetag::serde(name = "DotdoObjectStoreStorageFactory")]
impl StorageFactory for ObjectStoreStorageFactory {
    fn build(&self, _config: &StorageConfig) -> iceberg::Result<Arc<dyn Storage>> {
        Ok(Arc::new(self.0.clone()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A warehouse directory that cannot be created for a passing reason (a network file
    /// system's `ESTALE`/`EIO`/`ENOTCONN`) is a retryable `Unavailable`, as in an append; a full
    /// or read-only disk and missing permissions stay for the operator.
    #[cfg(target_os = "linux")]
    #[test]
    fn a_warehouse_directory_failure_that_may_pass_is_retryable() {
        let dir = std::path::Path::new("/srv/wh");
        for (errno, retryable) in
            [(116, true), (5, true), (107, true), (28, false), (30, false), (13, false), (17, false)]
        {
            let e = warehouse_dir_error(dir, std::io::Error::from_raw_os_error(errno));
            assert_eq!(e.is_retryable(), retryable, "errno {errno}: {e}");
            let kind = if retryable { dotdo_core::ErrorKind::Unavailable } else { dotdo_core::ErrorKind::Backend };
            assert_eq!(e.kind(), &kind, "errno {errno}: {e}");
            assert!(e.to_string().contains("/srv/wh"), "{e}");
        }
    }

    /// An S3 warehouse opened without options takes its configuration from the environment as
    /// AWS's SDKs do (it was ignored: region, endpoint and EKS web identity fell back to
    /// defaults); one opened with options takes them alone. (The only test of this binary that
    /// sets a variable; the previous value is put back.)
    #[cfg(feature = "s3")]
    #[test]
    fn s3_configuration_comes_from_the_environment_or_the_options() {
        let before = std::env::var_os("AWS_REGION");
        std::env::set_var("AWS_REGION", "eu-dotdo-7");
        let root = StoreRoot::open("s3://bucket/wh", Vec::<(String, String)>::new()).expect("open");
        let from_env = format!("{:?}", root.store);
        let root = StoreRoot::open("s3://bucket/wh", [("aws_region", "us-dotdo-2")]).expect("open");
        let overridden = format!("{:?}", root.store);
        match before {
            Some(v) => std::env::set_var("AWS_REGION", v),
            None => std::env::remove_var("AWS_REGION"),
        }
        assert!(from_env.contains("eu-dotdo-7"), "{from_env}");
        assert!(overridden.contains("us-dotdo-2") && !overridden.contains("eu-dotdo-7"), "{overridden}");
    }

    #[test]
    fn keys_strip_the_store_root() {
        assert_eq!(key_of("s3://b", "s3://b/wh/t/x.parquet").expect("key").as_ref(), "wh/t/x.parquet");
        assert_eq!(key_of("file://", "file:///tmp/wh/x").expect("key").as_ref(), "tmp/wh/x");
        assert_eq!(key_of("file://", "/tmp/wh/x").expect("key").as_ref(), "tmp/wh/x");
        assert!(key_of("s3://b", "s3://other/x").is_err());
        assert!(key_of("s3://b", "s3://bb/x").is_err(), "a bucket whose name starts with the root's");
        assert_eq!(key_of("s3://b/", "s3://b/x").expect("key").as_ref(), "x");
        // `s3://b//x` is key `x`, as it always was (tables created under `s3://b//wh`).
        assert_eq!(key_of("s3://b", "s3://b//x").expect("key").as_ref(), "x");
        assert_eq!(key_of("file://", "file:////tmp/x").expect("//tmp is /tmp").as_ref(), "tmp/x");
        // Spellings of one local warehouse name the same directory.
        for spelled in ["/tmp/x/a/../wh", "/tmp/x/./wh/", "file:///tmp/x//wh", "file:///tmp/x/a/../wh"] {
            let url = parse_warehouse_url(spelled).expect(spelled);
            assert_eq!(url.as_str().trim_end_matches('/'), "file:///tmp/x/wh", "{spelled}");
        }
        // Locations other engines write with a scheme alias of the same store.
        assert_eq!(key_of("s3://b", "s3a://b/wh/x").expect("s3a").as_ref(), "wh/x");
        assert_eq!(key_of("s3://b", "S3N://b/wh/x").expect("s3n").as_ref(), "wh/x");
        assert_eq!(
            key_of("abfss://c@a.dfs.core.windows.net", "abfs://c@a.dfs.core.windows.net/x").expect("abfs").as_ref(),
            "x"
        );
        assert_eq!(key_of("file://", "file://localhost/tmp/x").expect("localhost").as_ref(), "tmp/x");
        assert_eq!(key_of("file://", "file:/tmp/x").expect("file:/abs").as_ref(), "tmp/x");
        // Relative, host-qualified and drive-letter locations name no local file of this store.
        for other in ["wh/x", "file://server/share/x", "C:/wh/x", "file:wh/x"] {
            assert!(key_of("file://", other).is_err(), "{other}");
        }
        assert!(key_of("s3://b", "s3a://other/x").is_err(), "another bucket stays another bucket");
        assert!(key_of("s3://b", "gs://b/x").is_err(), "another store stays another store");
    }

    #[test]
    fn warehouse_urls_are_normalised() {
        let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), "memory://wh/").expect("root");
        assert_eq!((r.root.as_str(), r.warehouse.as_str()), ("memory://wh", "memory://wh"));
        let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), "/tmp/lake").expect("root");
        assert_eq!((r.root.as_str(), r.warehouse.as_str()), ("file://", "file:///tmp/lake"));
        // A relative path is a local directory under the working directory, as the hot stores'.
        let cwd = std::env::current_dir().expect("cwd");
        for relative in ["lake", "./data/../lake", "lake/"] {
            let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), relative).expect(relative);
            assert_eq!(r.warehouse, format!("file://{}/lake", cwd.display()), "{relative}");
        }
        assert!(StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), "").is_err());
        // No store or bucket named: refused (they were a relative local directory `memory:` or
        // `s3:`, created under the working directory).
        for bad in ["memory://", "memory:///", "s3://", "gs://", "s3:/b/wh", "az:///c"] {
            let e = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), bad).expect_err(bad);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        // An object store's scheme without `//` is a typo, refused.
        for typo in ["s3:bucket/wh", "gs:bkt/wh", "memory:x"] {
            let e = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), typo).expect_err(typo);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{typo}: {e}");
        }
        // A colon not followed by `/` is part of a relative directory's name.
        for relative in ["wh-2024-06-01T12:00:00", "lake:v2"] {
            let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), relative).expect(relative);
            assert_eq!(r.warehouse, format!("file://{}/{relative}", cwd.display()), "{relative}");
        }
        // A query or fragment would become part of every table location, a password part of
        // every message naming the warehouse: refused, the password not shown.
        for bad in [
            "s3://b/wh?x=1",
            "memory://wh#frag",
            "https://user:s3cr3t@host/wh",
            // A pasted presigned URL, a key as a query parameter, a URL that does not parse.
            "s3://b/wh?X-Amz-Credential=AKIA&X-Amz-Signature=s3cr3t",
            "s3://b/wh?secret_access_key=s3cr3t",
            "https://u:s3cr3t@host:99999/wh",
            // Not a URL (the port), a secret in its query: the message showed it whole.
            "s3://b:99999/wh?secret_access_key=s3cr3t",
        ] {
            let e = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), bad).expect_err(bad);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{bad}: {e}");
            assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        }
        // The builder's `Debug` shows no query either (nor option values, nor a password).
        let b = crate::IcebergColdStore::builder("s3://u:pw-s3cr3t@b/wh?X-Amz-Signature=s3cr3t")
            .option("aws_secret_access_key", "s3cr3t");
        let shown = format!("{b:?}");
        assert!(!shown.contains("s3cr3t") && shown.contains("s3://u:redacted@b/wh?…"), "{shown}");
        // A password with a `#` in it (the URL does not parse as meant), or a `/` (it parses as
        // a host and a path holding the secret): the scheme alone.
        for odd in ["s3://AKIA:se#cr3t@bucket/wh", "s3://AKIA:/wJcr3t@bucket/wh"] {
            let shown = format!("{:?}", crate::IcebergColdStore::builder(odd));
            assert!(!shown.contains("AKIA") && !shown.contains("cr3t") && shown.contains("s3://…"), "{shown}");
        }
        // An empty path segment (a prefix joined with a leading `/`) is read without it: new
        // tables' locations name their objects as other engines read them.
        for (given, read) in [("s3://bkt//lake", "s3://bkt/lake"), ("gs://bkt/a//b/", "gs://bkt/a/b")] {
            let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), given).expect(given);
            assert_eq!(r.warehouse, read);
        }
        // A file: URL with a relative path (taken from the root) or a host (no local path).
        for bad in ["file:lake", "file:./data/wh", "file:../wh", "file:C:/wh", "file://nas/lake"] {
            let e = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), bad).expect_err(bad);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{bad}: {e}");
        }
        for good in ["file:///tmp/lake", "file:/tmp/lake", "FILE:///tmp/lake", "file://localhost/tmp/lake"] {
            let r = StoreRoot::from_store(Arc::new(object_store::memory::InMemory::new()), good).expect(good);
            assert_eq!(r.warehouse, "file:///tmp/lake", "{good}");
        }
    }

    /// Deleting the warehouse root's whole prefix (through iceberg's `FileIO`, which may ask to
    /// delete a table's prefix) is refused: it listed and deleted every object of the store.
    #[tokio::test]
    async fn the_root_prefix_is_never_deleted() {
        use object_store::ObjectStore;
        let mem = Arc::new(object_store::memory::InMemory::new());
        let root = StoreRoot::from_store(mem.clone(), "memory://wh").expect("root");
        mem.put(&Path::from("ns/t/a"), bytes::Bytes::from_static(b"x").into()).await.expect("put");
        let storage = root.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
        storage.delete_prefix("memory://wh").await.expect_err("the whole warehouse");
        storage.delete_prefix("memory://wh/").await.expect_err("the whole warehouse");
        assert!(mem.head(&Path::from("ns/t/a")).await.is_ok(), "nothing was deleted");
        storage.delete_prefix("memory://wh/ns/t").await.expect("a table's prefix");
        assert!(mem.head(&Path::from("ns/t/a")).await.is_err(), "the table's files are gone");
        // A warehouse with a path: that path is every table too.
        let root = StoreRoot::from_store(mem.clone(), "memory://bucket/lake").expect("root");
        mem.put(&Path::from("lake/ns/t/a"), bytes::Bytes::from_static(b"x").into()).await.expect("put");
        let storage = root.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
        for whole in ["memory://bucket/lake", "memory://bucket/lake/", "memory://bucket"] {
            storage.delete_prefix(whole).await.expect_err(whole);
        }
        // Above or beside the warehouse, or a whole namespace: refused too.
        let nested = StoreRoot::from_store(mem.clone(), "memory://bucket/a/wh").expect("root");
        let nested = nested.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
        for key in ["a/wh/ns/t/x", "a/other/y", "b/z"] {
            mem.put(&Path::from(key), bytes::Bytes::from_static(b"x").into()).await.expect("put");
        }
        for refused in ["memory://bucket/a", "memory://bucket/a/", "memory://bucket/b", "memory://bucket/a/wh/ns"] {
            nested.delete_prefix(refused).await.expect_err(refused);
        }
        for key in ["a/wh/ns/t/x", "a/other/y", "b/z"] {
            assert!(mem.head(&Path::from(key)).await.is_ok(), "{key} was deleted");
        }
        assert!(mem.head(&Path::from("lake/ns/t/a")).await.is_ok(), "nothing was deleted");
        storage.delete_prefix("memory://bucket/lake/ns/t").await.expect("a table's prefix");
        assert!(mem.head(&Path::from("lake/ns/t/a")).await.is_err(), "the table's files are gone");
        // A multi-level namespace is as deep as a table: told by the tables below it.
        for key in ["lake/a/b/t1/metadata/00001-x.metadata.json", "lake/a/b/t2/data/y.parquet"] {
            mem.put(&Path::from(key), bytes::Bytes::from_static(b"x").into()).await.expect("put");
        }
        storage.delete_prefix("memory://bucket/lake/a/b").await.expect_err("a namespace holding a table");
        assert!(mem.head(&Path::from("lake/a/b/t2/data/y.parquet")).await.is_ok(), "nothing was deleted");
        storage.delete_prefix("memory://bucket/lake/a/b/t1").await.expect("the table's own prefix");
        assert!(mem.head(&Path::from("lake/a/b/t1/metadata/00001-x.metadata.json")).await.is_err());
    }

    /// A file written outside the warehouse (a table at a namespace's own location) has every
    /// new directory on its path synced, up to the file system's root: they were left unsynced
    /// (the loop stopped at once), and a power loss could drop the file's directory entries
    /// under a commit the catalog had made durable.
    #[test]
    fn files_outside_the_warehouse_have_their_directories_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let warehouse = dir.path().join("lake/wh");
        let table = dir.path().join("elsewhere/ns/t");
        std::fs::create_dir_all(&warehouse).expect("warehouse");
        std::fs::create_dir_all(table.join("data")).expect("table");
        let file = table.join("data/f.parquet");
        std::fs::write(&file, b"x").expect("file");
        let sync = SyncState { count: Arc::default(), warehouse, above: 0, synced_dirs: parking_lot::Mutex::default() };
        sync_local_file(&sync, &file).expect("sync");
        let synced = sync.synced_dirs.lock().clone();
        for d in [table.join("data"), table.clone(), dir.path().join("elsewhere"), dir.path().to_path_buf()] {
            assert!(synced.contains(&d), "{} not synced: {synced:?}", d.display());
        }
        // Inside the warehouse: up to its parent, not above.
        let inside = dir.path().join("wh/ns/t/data");
        std::fs::create_dir_all(&inside).expect("inside");
        std::fs::write(inside.join("g.parquet"), b"x").expect("file");
        let sync = SyncState {
            count: Arc::default(),
            warehouse: dir.path().join("wh"),
            above: 0,
            synced_dirs: Default::default(),
        };
        sync_local_file(&sync, &inside.join("g.parquet")).expect("sync");
        let synced = sync.synced_dirs.lock().clone();
        assert!(synced.contains(&dir.path().join("wh")), "{synced:?}");
        assert!(!synced.contains(dir.path()), "above the warehouse's parent: {synced:?}");
    }

    /// A warehouse path with characters a URL escapes: the local store writes under the escaped
    /// directory, which `open` counts (the decoded one it creates existed: 0, and the escaped
    /// chain's first new directory was not synced in its parent).
    #[test]
    fn the_directories_counted_are_those_the_store_writes_to() {
        let dir = tempfile::tempdir().expect("tempdir");
        let decoded = dir.path().join("my lake/wh");
        std::fs::create_dir_all(&decoded).expect("the decoded warehouse exists");
        let root = StoreRoot::open(decoded.to_str().expect("utf-8"), Vec::<(String, String)>::new()).expect("open");
        assert!(!dir.path().join("my%20lake").exists());
        assert_eq!(root.created_dirs, 2, "my%20lake and wh are new where data goes");
        // The decoded directory (the default catalog's) existed: nothing of it to sync.
        assert!(root.sync_catalog_dirs().expect("sync").is_empty());
        // A new one: its entries in the directories above, up to the first that existed.
        let new = dir.path().join("new lake/wh");
        let root = StoreRoot::open(new.to_str().expect("utf-8"), Vec::<(String, String)>::new()).expect("open");
        let synced = root.sync_catalog_dirs().expect("sync");
        assert_eq!(synced, [dir.path().join("new lake"), dir.path().to_path_buf()]);
    }

    /// A warehouse whose parent directories `open` created has their entries synced with the
    /// first file written, up to the directory that existed: the walk stopped at the warehouse's
    /// parent, and a power loss could drop the whole new directory chain (on a file system that
    /// does not order directory updates), acknowledged commits and catalog included.
    #[test]
    fn the_directories_open_created_above_the_warehouse_are_synced() {
        let dir = tempfile::tempdir().expect("tempdir");
        let warehouse = dir.path().join("srv/dotdo/lake/wh");
        let root = StoreRoot::open(&format!("file://{}", warehouse.display()), Vec::<(String, String)>::new())
            .expect("open creates the chain");
        assert_eq!(root.created_dirs, 4, "srv, dotdo, lake and wh were created");
        let inside = warehouse.join("ns/t/data");
        std::fs::create_dir_all(&inside).expect("inside");
        std::fs::write(inside.join("g.parquet"), b"x").expect("file");
        let sync = SyncState {
            count: Arc::default(),
            warehouse: warehouse.clone(),
            above: root.created_dirs,
            synced_dirs: Default::default(),
        };
        sync_local_file(&sync, &inside.join("g.parquet")).expect("sync");
        let synced = sync.synced_dirs.lock().clone();
        for d in ["srv", "srv/dotdo", "srv/dotdo/lake", "srv/dotdo/lake/wh"] {
            assert!(synced.contains(&dir.path().join(d)), "{d}'s entry not synced: {synced:?}");
        }
        assert!(!synced.contains(dir.path()), "the directory that existed is not the warehouse's: {synced:?}");
    }

    /// A ranged read that ends past the end of a file (cut short by a crash, or replaced by a
    /// shorter one) is `Corrupt` naming the file; it answered the bytes there were.
    #[tokio::test]
    async fn a_read_past_the_end_of_a_file_is_corrupt() {
        use object_store::ObjectStore;
        let mem = Arc::new(object_store::memory::InMemory::new());
        let root = StoreRoot::from_store(mem.clone(), "memory://wh").expect("root");
        mem.put(&Path::from("ns/t/f"), bytes::Bytes::from_static(b"0123456789").into()).await.expect("put");
        let storage = root.factory().build(&iceberg::io::StorageConfig::new()).expect("storage");
        let reader = storage.reader("memory://wh/ns/t/f").await.expect("reader");
        assert_eq!(&reader.read(2..5).await.expect("within")[..], b"234");
        let e = crate::error::classify(reader.read(5..20).await.expect_err("past the end"), "read");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::Corrupt, "{e}");
        assert!(e.to_string().contains("ns/t/f"), "{e}");
    }

    #[test]
    fn the_root_is_the_scheme_and_authority() {
        // Pinned: a change here moves every existing table's files.
        let mem = || -> Arc<dyn ObjectStore> { Arc::new(object_store::memory::InMemory::new()) };
        let cases = [
            ("s3://bkt/wh", "s3://bkt", "wh/x"),
            ("az://container/lake/wh", "az://container", "lake/wh/x"),
            ("gs://bkt/wh", "gs://bkt", "wh/x"),
            ("abfss://c@acct.dfs.core.windows.net/wh", "abfss://c@acct.dfs.core.windows.net", "wh/x"),
            ("http://localhost:9000/bkt/wh", "http://localhost:9000", "bkt/wh/x"),
            ("https://acct.r2.cloudflarestorage.com/bkt/wh", "https://acct.r2.cloudflarestorage.com", "bkt/wh/x"),
            // Local keys keep the URL's percent-encoding; the local store decodes it.
            ("file:///tmp/my%20lake", "file://", "tmp/my%20lake/x"),
        ];
        for (warehouse, root, key) in cases {
            let r = StoreRoot::from_store(mem(), warehouse).expect("root");
            assert_eq!(r.root, root, "{warehouse}");
            assert_eq!(r.key(&format!("{}/x", r.warehouse)).expect("key").as_ref(), key, "{warehouse}");
        }
        // A path-style S3 URL's store is bound to its bucket: a location in another bucket of
        // the host is refused (it was read and written as a key of this bucket).
        let r = StoreRoot::from_store(mem(), "https://acct.r2.cloudflarestorage.com/bkt/wh").expect("root");
        for other in ["https://acct.r2.cloudflarestorage.com/other/x", "https://acct.r2.cloudflarestorage.com/bktx/x"] {
            let e = r.key(other).expect_err(other);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{other}: {e}");
        }
        assert_eq!(
            r.key("https://acct.r2.cloudflarestorage.com/bkt/other/x").expect("same bucket").as_ref(),
            "bkt/other/x"
        );
        // So does an Azure container in an https URL's path.
        let r = StoreRoot::from_store(mem(), "https://acct.blob.core.windows.net/container/wh").expect("root");
        assert!(r.key("https://acct.blob.core.windows.net/other/x").is_err());
        assert!(r.key("https://acct.blob.core.windows.net/container/x").is_ok());
        // A plain HTTP store (no bucket), or a virtual-hosted S3 URL (the bucket is the host,
        // also one named `s3-…`), takes any path of its host.
        let r = StoreRoot::from_store(mem(), "https://s3-logs.s3.us-east-1.amazonaws.com/wh").expect("root");
        assert!(r.key("https://s3-logs.s3.us-east-1.amazonaws.com/lake/x").is_ok());
        let r = StoreRoot::from_store(mem(), "https://s3.us-east-1.amazonaws.com/bkt/wh").expect("root");
        assert!(r.key("https://s3.us-east-1.amazonaws.com/other/x").is_err(), "path-style: another bucket");
        let r = StoreRoot::from_store(mem(), "http://localhost:9000/dav/wh").expect("root");
        assert_eq!(r.key("http://localhost:9000/other/x").expect("another path").as_ref(), "other/x");
        let r = StoreRoot::from_store(mem(), "https://bkt.s3.us-east-1.amazonaws.com/wh").expect("root");
        let other = r.key("https://bkt.s3.us-east-1.amazonaws.com/lake/ns/t/x").expect("elsewhere in the bucket");
        assert_eq!(other.as_ref(), "lake/ns/t/x");
    }

    #[test]
    fn unknown_options_are_refused() {
        let e = StoreRoot::open("s3://b/wh", [("aws_region", "us-east-1"), ("aws_endpont", "http://localhost:9000")])
            .expect_err("a misspelt key");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput);
        assert!(e.to_string().contains("aws_endpont"), "{e}");
        StoreRoot::open("s3://b/wh", [("aws_region", "us-east-1"), ("aws_allow_http", "true")]).expect("known keys");
        // object_store quotes a value it cannot use (a GCS service-account key given where a
        // file name goes is quoted so): no option's value is shown, nor kept in a source.
        let e = StoreRoot::open("s3://b/wh", [("aws_allow_http", "not-a-bool-s3cr3t")]).expect_err("not a boolean");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput);
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        assert!(e.to_string().contains("<redacted>"), "{e}");
        // The bucket is the URL's: an option naming another one is refused, in any spelling.
        for key in ["aws_bucket", "aws_bucket_name", "bucket", "bucket_name"] {
            let e = StoreRoot::open("s3://staging/wh", [(key, "prod")]).expect_err(key);
            assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{key}: {e}");
            assert!(e.to_string().contains("names the bucket"), "{key}: {e}");
        }
        let e = StoreRoot::open("memory://wh", [("aws_region", "x")]).expect_err("memory takes none");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput);
        let dir = tempfile::tempdir().expect("tempdir");
        let e = StoreRoot::open(dir.path().to_str().expect("utf-8"), [("k", "v")]).expect_err("local takes none");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput);
    }

    #[test]
    fn cloud_configuration_variables_are_secret() {
        for name in
            ["AWS_SECRET_ACCESS_KEY", "GOOGLE_SERVICE_ACCOUNT_KEY", "AZURE_STORAGE_ACCOUNT_KEY", "SERVICE_ACCOUNT"]
        {
            assert!(secret_env_var(name), "{name}");
        }
        assert!(!secret_env_var("HOME") && !secret_env_var("SERVICE_ACCOUNTS"));
    }

    /// GCS reads `SERVICE_ACCOUNT` as a key file's path; a key pasted there is quoted by the
    /// error of a file that cannot be opened: never shown. (The only test here that touches
    /// the variable.)
    #[cfg(feature = "gcs")]
    #[test]
    fn a_gcs_key_in_service_account_is_not_shown() {
        std::env::set_var("SERVICE_ACCOUNT", r#"{"private_key": "s3cr3t-key"}"#);
        let e = StoreRoot::open("gs://bkt/wh", std::iter::empty::<(&str, String)>()).expect_err("no such key file");
        std::env::remove_var("SERVICE_ACCOUNT");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
        assert!(!format!("{e} {e:?}").contains("s3cr3t"), "{e:?}");
        // The other stores' bucket options are refused as S3's are.
        let e = StoreRoot::open("gs://bkt/wh", [("google_bucket", "other")]).expect_err("bucket option");
        assert!(e.to_string().contains("names the bucket"), "{e}");
    }

    #[cfg(feature = "azure")]
    #[test]
    fn an_azure_container_option_is_refused() {
        let e =
            StoreRoot::open("az://ctr/wh", [("azure_storage_account_name", "acct"), ("azure_container_name", "other")])
                .expect_err("container option");
        assert_eq!(e.kind(), &dotdo_core::ErrorKind::InvalidInput, "{e}");
        assert!(e.to_string().contains("names the bucket or container"), "{e}");
    }

    #[test]
    fn a_warehouse_under_a_file_is_not_retryable() {
        let file = tempfile::NamedTempFile::new().expect("file");
        let wh = format!("{}/wh", file.path().display());
        let e = StoreRoot::open(&wh, std::iter::empty::<(&str, String)>()).expect_err("not a directory");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Backend, false), "{e}");
        // The warehouse path itself a file (`AlreadyExists`).
        let wh = file.path().display().to_string();
        let e = StoreRoot::open(&wh, std::iter::empty::<(&str, String)>()).expect_err("a file");
        assert_eq!((e.kind(), e.is_retryable()), (&dotdo_core::ErrorKind::Backend, false), "{e}");
    }
}
