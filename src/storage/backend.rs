//! [`ObjectStorage`] over any `object_store` implementation: in memory, a local directory
//! (object key `K` at `<root>/K`, written atomically through a staging file and a rename), or S3.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures::stream::BoxStream;
use futures::StreamExt as _;
use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{
    ClientOptions, GetOptions, ObjectStore, ObjectStoreExt as _, PutMode, PutOptions, RetryConfig,
    UpdateVersion,
};

use super::{ObjectStorage, PutCondition, StorageError, Stored, Version};

/// Where and how to reach an S3-compatible bucket.
#[derive(Clone, Default, PartialEq, Eq)]
pub struct S3Settings {
    /// Endpoint URL (`https://s3.eu-west-1.amazonaws.com`, `http://127.0.0.1:9000`); empty for AWS.
    pub endpoint: String,
    /// Region (`us-east-1` for most non-AWS stores).
    pub region: String,
    /// Bucket name.
    pub bucket: String,
    /// Access key id.
    pub access_key_id: String,
    /// Secret access key.
    pub secret_access_key: String,
    /// Session token of temporary (STS) credentials.
    pub session_token: String,
    /// Whether the store enforces `If-None-Match`/`If-Match` on PUT.
    pub conditional_writes: bool,
}

impl std::fmt::Debug for S3Settings {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("S3Settings")
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("bucket", &self.bucket)
            .field("access_key_id", &self.access_key_id)
            .field("conditional_writes", &self.conditional_writes)
            .finish_non_exhaustive()
    }
}

/// An `object_store` backend.
pub struct ObjectStoreBackend {
    store: Arc<dyn ObjectStore>,
    description: String,
    conditional_writes: bool,
    /// For a local directory: the lock file that makes replace-if-unchanged atomic between
    /// every ringvault writing to it (`object_store`'s local store cannot compare versions).
    update_lock: Option<std::path::PathBuf>,
}

/// The lock file of a local store, beside the `keyring/` tree (never listed with it).
const LOCAL_UPDATE_LOCK: &str = ".ringvault-update.lock";

impl ObjectStoreBackend {
    /// An empty in-memory store (conditional writes enforced).
    pub fn in_memory() -> Self {
        Self {
            store: Arc::new(InMemory::new()),
            description: "memory".to_owned(),
            conditional_writes: true,
            update_lock: None,
        }
    }

    /// A local directory, created when missing. Create-if-absent is enforced by the file
    /// system; replace-if-unchanged by comparing versions under an exclusive lock on
    /// `<root>/.ringvault-update.lock`, which every process writing there takes.
    pub fn local(root: &std::path::Path) -> Result<Self, StorageError> {
        std::fs::create_dir_all(root).map_err(|error| StorageError::Unavailable {
            operation: "open",
            key: root.display().to_string(),
            detail: error.to_string(),
        })?;
        // fsync of each written file and its directory before a write returns: a key handed
        // out must survive a power cut (object_store's default is not to sync).
        let store = LocalFileSystem::new_with_prefix(root)
            .map_err(|error| StorageError::Unavailable {
                operation: "open",
                key: root.display().to_string(),
                detail: error.to_string(),
            })?
            .with_fsync(true);
        Ok(Self {
            store: Arc::new(store),
            description: format!("local:{}", root.display()),
            conditional_writes: true,
            update_lock: Some(root.join(LOCAL_UPDATE_LOCK)),
        })
    }

    /// An S3-compatible bucket with path-style addressing. Credentials not in `settings` come
    /// from the process's standard `AWS_*` variables, then from the usual AWS chain (web
    /// identity, container role, instance profile).
    pub fn s3(settings: &S3Settings, request_timeout: Duration) -> Result<Self, StorageError> {
        // Only variables that are UTF-8 (`std::env::vars` panics on any other).
        let environment = std::env::vars_os().filter_map(|(name, value)| {
            Some((name.into_string().ok()?, value.into_string().ok()?))
        });
        let store = s3_builder(settings, environment, request_timeout)
            .build()
            .map_err(|error| StorageError::Unavailable {
                operation: "open",
                key: settings.bucket.clone(),
                detail: error.to_string(),
            })?;
        Ok(Self {
            store: Arc::new(store),
            description: format!("s3:{}", settings.bucket),
            conditional_writes: settings.conditional_writes,
            update_lock: None,
        })
    }

    /// Replace-if-unchanged on a local directory: under the store's lock, the object's current
    /// version is compared with `expected` before the (atomic) overwrite. It runs as a task of
    /// its own, which a caller that gives up (a storage timeout drops its future) does not
    /// cancel: the lock must be held until the write it guards has landed, or another writer
    /// could pass the same check meanwhile and both writes land.
    async fn put_if_unchanged_locally(
        &self,
        lock_path: &std::path::Path,
        key: &str,
        bytes: Bytes,
        expected: Version,
    ) -> Result<(), StorageError> {
        let store = self.store.clone();
        let lock_path = lock_path.to_owned();
        let key = key.to_owned();
        let task_key = key.clone();
        tokio::spawn(async move {
            Self::put_if_unchanged_under_lock(store, &lock_path, &task_key, bytes, expected).await
        })
        .await
        .map_err(|error| StorageError::Unavailable {
            operation: "put",
            key,
            detail: format!("the conditional write's task failed: {error}"),
        })?
    }

    async fn put_if_unchanged_under_lock(
        store: Arc<dyn ObjectStore>,
        lock_path: &std::path::Path,
        key: &str,
        bytes: Bytes,
        expected: Version,
    ) -> Result<(), StorageError> {
        let locked = |error: std::io::Error| StorageError::Unavailable {
            operation: "lock",
            key: lock_path.display().to_string(),
            detail: error.to_string(),
        };
        let lock_path_owned = lock_path.to_owned();
        // Held until this function returns; closing the file releases the lock.
        let _lock = tokio::task::spawn_blocking(move || {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&lock_path_owned)?;
            file.lock()?;
            Ok(file)
        })
        .await
        .map_err(|error| locked(std::io::Error::other(error)))?
        .map_err(locked)?;
        let path = object_path(key);
        let current = match store.head(&path).await {
            Ok(meta) => Some(Version {
                e_tag: meta.e_tag,
                version: meta.version,
            }),
            // Gone is changed too.
            Err(object_store::Error::NotFound { .. }) => None,
            Err(error) => return Err(store_error("put", key, error)),
        };
        if current.as_ref() != Some(&expected) {
            return Err(StorageError::Changed {
                key: key.to_owned(),
            });
        }
        store
            .put_opts(&path, bytes.into(), PutOptions::default())
            .await
            .map(|_| ())
            .map_err(|error| store_error("put", key, error))
    }
}

/// The object at `key`, taken as written: a key the store listed (from a bucket another
/// program filled) is addressed as listed. `Path::from` would percent-encode characters such as
/// `#` or a space a second time and miss the object; ringvault's own keys read the same either
/// way, and a key that is not a valid path as written is encoded as before.
fn object_path(key: &str) -> Path {
    Path::parse(key).unwrap_or_else(|_| Path::from(key))
}

/// A failed call as ringvault tells failures apart: refused for good (credentials,
/// permissions) or unavailable (worth retrying within the budget).
fn store_error(operation: &'static str, key: &str, error: object_store::Error) -> StorageError {
    let key = key.to_owned();
    let detail = error.to_string();
    let refused = match &error {
        object_store::Error::PermissionDenied { .. }
        | object_store::Error::Unauthenticated { .. } => true,
        object_store::Error::Generic { .. } => refused_by_status(&error),
        _ => false,
    };
    if refused {
        return StorageError::Refused {
            operation,
            key,
            detail,
        };
    }
    StorageError::Unavailable {
        operation,
        key,
        detail,
    }
}

/// Whether a generic error is the server answering 401 or 403. object_store classifies the
/// status of gets and puts, but its S3 list request reaches us as `Generic` around a retry
/// error whose type is private to object_store, so the status is read from the cause's text
/// (`Server returned non-2xx status code: 403 Forbidden: …`); `s3_storage`'s test of refused
/// credentials pins that text for the object_store version in Cargo.lock.
fn refused_by_status(error: &object_store::Error) -> bool {
    let mut cause: Option<&(dyn std::error::Error + 'static)> = Some(error);
    while let Some(current) = cause {
        let text = current.to_string();
        if let Some((_, after)) = text.split_once("non-2xx status code: ") {
            return after.starts_with("401") || after.starts_with("403");
        }
        cause = current.source();
    }
    false
}

#[async_trait::async_trait]
impl ObjectStorage for ObjectStoreBackend {
    async fn get(&self, key: &str) -> Result<Option<Stored>, StorageError> {
        let path = object_path(key);
        let result = match self.store.get_opts(&path, GetOptions::default()).await {
            Ok(result) => result,
            Err(object_store::Error::NotFound { .. }) => return Ok(None),
            Err(error) => return Err(store_error("get", key, error)),
        };
        let version = Version {
            e_tag: result.meta.e_tag.clone(),
            version: result.meta.version.clone(),
        };
        let bytes = result
            .bytes()
            .await
            .map_err(|error| store_error("get", key, error))?;
        Ok(Some(Stored { bytes, version }))
    }

    async fn put(
        &self,
        key: &str,
        bytes: Bytes,
        condition: PutCondition,
    ) -> Result<(), StorageError> {
        if let (PutCondition::IfUnchanged(expected), Some(lock_path)) =
            (&condition, &self.update_lock)
        {
            return self
                .put_if_unchanged_locally(lock_path, key, bytes, expected.clone())
                .await;
        }
        let mode = match condition {
            PutCondition::Overwrite => PutMode::Overwrite,
            PutCondition::IfAbsent => PutMode::Create,
            PutCondition::IfUnchanged(version) => PutMode::Update(UpdateVersion {
                e_tag: version.e_tag,
                version: version.version,
            }),
        };
        let options = PutOptions {
            mode,
            ..PutOptions::default()
        };
        match self
            .store
            .put_opts(&object_path(key), bytes.into(), options)
            .await
        {
            Ok(_) => Ok(()),
            Err(object_store::Error::AlreadyExists { .. }) => Err(StorageError::AlreadyExists {
                key: key.to_owned(),
            }),
            Err(object_store::Error::Precondition { .. }) => Err(StorageError::Changed {
                key: key.to_owned(),
            }),
            Err(
                error @ (object_store::Error::NotImplemented { .. }
                | object_store::Error::NotSupported { .. }),
            ) => Err(StorageError::ConditionalUnsupported {
                detail: error.to_string(),
            }),
            Err(error) => Err(store_error("put", key, error)),
        }
    }

    fn list(&self, prefix: &str) -> BoxStream<'static, Result<String, StorageError>> {
        let owned_prefix = prefix.to_owned();
        self.store
            .list(Some(&Path::from(prefix)))
            .map(move |item| {
                item.map(|meta| meta.location.to_string())
                    .map_err(|error| store_error("list", &owned_prefix, error))
            })
            .boxed()
    }

    async fn delete(&self, key: &str) -> Result<(), StorageError> {
        match self.store.delete(&object_path(key)).await {
            Ok(()) | Err(object_store::Error::NotFound { .. }) => Ok(()),
            Err(error) => Err(store_error("delete", key, error)),
        }
    }

    fn supports_conditional_writes(&self) -> bool {
        self.conditional_writes
    }

    fn describe(&self) -> String {
        self.description.clone()
    }
}

/// The S3 client's builder: the standard AWS credential variables of `environment` first
/// (keys, session token, web identity and role, container and instance credentials; nothing
/// else of `AWS_*`, so an `AWS_ENDPOINT` meant for another program cannot redirect the store),
/// then `settings` over them. A key pair configured in ringvault does not take the
/// environment's session token, which belongs to the environment's keys; with no keys at
/// all, none are set, so that object_store falls back to the role-based providers instead of
/// signing with empty static keys.
fn s3_builder(
    settings: &S3Settings,
    environment: impl IntoIterator<Item = (String, String)>,
    request_timeout: Duration,
) -> AmazonS3Builder {
    use AmazonS3ConfigKey as Key;

    let keys_configured = !settings.access_key_id.is_empty();
    let mut builder = AmazonS3Builder::new();
    for (name, value) in environment {
        if !name.starts_with("AWS_") {
            continue;
        }
        let Ok(key) = name.to_ascii_lowercase().parse::<Key>() else {
            continue;
        };
        let credential = matches!(
            key,
            Key::AccessKeyId
                | Key::SecretAccessKey
                | Key::Token
                | Key::WebIdentityTokenFile
                | Key::RoleArn
                | Key::RoleSessionName
                | Key::StsEndpoint
                | Key::ContainerCredentialsRelativeUri
                | Key::ContainerCredentialsFullUri
                | Key::ContainerAuthorizationTokenFile
                | Key::MetadataEndpoint
                | Key::ImdsV1Fallback
        );
        if !credential || (keys_configured && key == Key::Token) {
            continue;
        }
        builder = builder.with_config(key, value);
    }
    for (key, value) in [
        (Key::AccessKeyId, &settings.access_key_id),
        (Key::SecretAccessKey, &settings.secret_access_key),
        (Key::Token, &settings.session_token),
        (Key::Endpoint, &settings.endpoint),
    ] {
        if !value.is_empty() {
            builder = builder.with_config(key, value);
        }
    }
    builder
        .with_bucket_name(&settings.bucket)
        .with_region(&settings.region)
        .with_virtual_hosted_style_request(false)
        .with_conditional_put(if settings.conditional_writes {
            S3ConditionalPut::ETagMatch
        } else {
            S3ConditionalPut::Disabled
        })
        // ringvault retries inside its own time budget; the client's own retries are kept
        // short so one slow attempt cannot eat the whole budget.
        .with_retry(RetryConfig {
            max_retries: 1,
            retry_timeout: request_timeout,
            ..RetryConfig::default()
        })
        .with_client_options(
            ClientOptions::new()
                .with_timeout(request_timeout)
                .with_connect_timeout(request_timeout.min(Duration::from_secs(2)))
                .with_allow_http(settings.endpoint.starts_with("http://")),
        )
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::TryStreamExt as _;

    fn s3_config(
        settings: &S3Settings,
        environment: &[(&str, &str)],
    ) -> impl Fn(AmazonS3ConfigKey) -> Option<String> {
        let environment = environment
            .iter()
            .map(|(name, value)| (name.to_string(), value.to_string()));
        let builder = s3_builder(settings, environment, Duration::from_secs(5));
        move |key| builder.get_config_value(&key)
    }

    #[test]
    fn s3_credentials_come_from_the_environment_with_their_session_token() {
        let settings = S3Settings {
            bucket: "vault".into(),
            region: "eu-west-1".into(),
            ..S3Settings::default()
        };
        let value = s3_config(
            &settings,
            &[
                ("AWS_ACCESS_KEY_ID", "ASIAENV"),
                ("AWS_SECRET_ACCESS_KEY", "env-secret"),
                ("AWS_SESSION_TOKEN", "env-session"),
                ("AWS_ROLE_ARN", "arn:aws:iam::1:role/vault"),
                ("AWS_ENDPOINT", "http://elsewhere:9000"),
                ("HOME", "/root"),
            ],
        );
        assert_eq!(
            value(AmazonS3ConfigKey::Endpoint),
            None,
            "only credentials come from the environment"
        );
        assert_eq!(
            value(AmazonS3ConfigKey::AccessKeyId).as_deref(),
            Some("ASIAENV")
        );
        assert_eq!(
            value(AmazonS3ConfigKey::SecretAccessKey).as_deref(),
            Some("env-secret")
        );
        assert_eq!(
            value(AmazonS3ConfigKey::Token).as_deref(),
            Some("env-session")
        );
        assert_eq!(
            value(AmazonS3ConfigKey::RoleArn).as_deref(),
            Some("arn:aws:iam::1:role/vault")
        );
        assert_eq!(value(AmazonS3ConfigKey::Bucket).as_deref(), Some("vault"));
        assert_eq!(
            value(AmazonS3ConfigKey::Region).as_deref(),
            Some("eu-west-1")
        );
    }

    #[test]
    fn s3_without_any_keys_sets_none_so_the_role_providers_apply() {
        let value = s3_config(&S3Settings::default(), &[]);
        assert_eq!(value(AmazonS3ConfigKey::AccessKeyId), None);
        assert_eq!(value(AmazonS3ConfigKey::SecretAccessKey), None);
        assert_eq!(value(AmazonS3ConfigKey::Token), None);
    }

    #[test]
    fn configured_s3_keys_replace_the_environment_s_and_drop_its_session_token() {
        let settings = S3Settings {
            endpoint: "http://127.0.0.1:9000".into(),
            access_key_id: "configured".into(),
            secret_access_key: "configured-secret".into(),
            ..S3Settings::default()
        };
        let environment = [
            ("AWS_ACCESS_KEY_ID", "ASIAENV"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_SESSION_TOKEN", "env-session"),
        ];
        let value = s3_config(&settings, &environment);
        assert_eq!(
            value(AmazonS3ConfigKey::AccessKeyId).as_deref(),
            Some("configured")
        );
        assert_eq!(
            value(AmazonS3ConfigKey::SecretAccessKey).as_deref(),
            Some("configured-secret")
        );
        assert_eq!(value(AmazonS3ConfigKey::Token), None);
        assert_eq!(
            value(AmazonS3ConfigKey::Endpoint).as_deref(),
            Some("http://127.0.0.1:9000")
        );

        let with_token = S3Settings {
            session_token: "configured-session".into(),
            ..settings
        };
        let value = s3_config(&with_token, &environment);
        assert_eq!(
            value(AmazonS3ConfigKey::Token).as_deref(),
            Some("configured-session")
        );
    }

    async fn exercise(backend: &ObjectStoreBackend) {
        assert!(backend.get("keyring/a/LATEST").await.unwrap().is_none());
        backend
            .put(
                "keyring/a/LATEST",
                Bytes::from_static(b"one"),
                PutCondition::IfAbsent,
            )
            .await
            .unwrap();
        let error = backend
            .put(
                "keyring/a/LATEST",
                Bytes::from_static(b"two"),
                PutCondition::IfAbsent,
            )
            .await
            .unwrap_err();
        assert!(
            matches!(error, StorageError::AlreadyExists { .. }),
            "{error}"
        );
        let stored = backend.get("keyring/a/LATEST").await.unwrap().unwrap();
        assert_eq!(&stored.bytes[..], b"one");
        backend
            .put(
                "keyring/a.b/c:d/dek_1",
                Bytes::from_static(b"x"),
                PutCondition::Overwrite,
            )
            .await
            .unwrap();
        let mut keys: Vec<String> = backend.list("keyring/").try_collect().await.unwrap();
        keys.sort();
        assert_eq!(keys, ["keyring/a.b/c:d/dek_1", "keyring/a/LATEST"]);
    }

    /// After [`exercise`]: `LATEST` is replaced with its current version, not with an old one,
    /// and an absent object is never "unchanged".
    async fn replace_if_unchanged(backend: &ObjectStoreBackend) {
        let stored = backend.get("keyring/a/LATEST").await.unwrap().unwrap();
        backend
            .put(
                "keyring/a/LATEST",
                Bytes::from_static(b"three"),
                PutCondition::IfUnchanged(stored.version.clone()),
            )
            .await
            .unwrap();
        for key in ["keyring/a/LATEST", "keyring/gone/LATEST"] {
            let error = backend
                .put(
                    key,
                    Bytes::from_static(b"four"),
                    PutCondition::IfUnchanged(stored.version.clone()),
                )
                .await
                .unwrap_err();
            assert!(
                matches!(error, StorageError::Changed { .. }),
                "{key}: {error}"
            );
        }
        let now = backend.get("keyring/a/LATEST").await.unwrap().unwrap();
        assert_eq!(&now.bytes[..], b"three");
    }

    #[tokio::test]
    async fn memory_backend() {
        let backend = ObjectStoreBackend::in_memory();
        exercise(&backend).await;
        replace_if_unchanged(&backend).await;
    }

    #[tokio::test]
    async fn local_backend_replaces_only_an_unchanged_object() {
        let dir = tempfile::tempdir().unwrap();
        let backend = ObjectStoreBackend::local(dir.path()).unwrap();
        exercise(&backend).await;
        replace_if_unchanged(&backend).await;
        let now = backend.get("keyring/a/LATEST").await.unwrap().unwrap();
        // Two stores on one directory (two replicas on one machine), racing one version: one wins.
        let other = ObjectStoreBackend::local(dir.path()).unwrap();
        let (first, second) = tokio::join!(
            backend.put(
                "keyring/a/LATEST",
                Bytes::from_static(b"six"),
                PutCondition::IfUnchanged(now.version.clone()),
            ),
            other.put(
                "keyring/a/LATEST",
                Bytes::from_static(b"seven"),
                PutCondition::IfUnchanged(now.version.clone()),
            ),
        );
        assert!(first.is_ok() != second.is_ok(), "{first:?} {second:?}");
        let keys: Vec<String> = backend.list("keyring/").try_collect().await.unwrap();
        assert!(
            keys.iter().all(|key| !key.contains(LOCAL_UPDATE_LOCK)),
            "{keys:?}"
        );
    }

    #[tokio::test]
    async fn local_backend_lays_objects_out_as_files() {
        let dir = tempfile::tempdir().unwrap();
        let backend = ObjectStoreBackend::local(dir.path()).unwrap();
        exercise(&backend).await;
        let on_disk = std::fs::read(dir.path().join("keyring/a.b/c:d/dek_1")).unwrap();
        assert_eq!(on_disk, b"x");
        // A file placed by hand (as a synced Vault bucket would be) is read back.
        std::fs::create_dir_all(dir.path().join("keyring/synced")).unwrap();
        std::fs::write(dir.path().join("keyring/synced/LATEST"), b"vault").unwrap();
        let stored = backend.get("keyring/synced/LATEST").await.unwrap().unwrap();
        assert_eq!(&stored.bytes[..], b"vault");
    }
}
