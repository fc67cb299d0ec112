//! The object store recordings live in, chosen by URL: `s3://bucket/prefix`,
//! `gs://…`, `az://…` or `file:///absolute/dir`, with the store's options
//! (`aws_endpoint`, `aws_region`, `aws_access_key_id`, …) as object_store
//! names them. A directory path without a scheme is a local store.

use std::collections::BTreeMap;
use std::sync::Arc;

use object_store::ObjectStore;
use object_store::prefix::PrefixStore;

/// Where recordings are stored. `Debug` never prints option values (they
/// hold credentials).
#[derive(Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    pub url: String,
    #[serde(default)]
    pub options: BTreeMap<String, String>,
}

impl std::fmt::Debug for StoreConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StoreConfig")
            .field("url", &self.url)
            .field("options", &self.options.keys().collect::<Vec<_>>())
            .finish()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("recordings store URL {url:?}: {message}")]
    Url { url: String, message: String },
    #[error("recordings store: {0}")]
    Store(#[from] object_store::Error),
    #[error("recordings directory {0}: {1}")]
    Dir(String, std::io::Error),
}

/// Opens the store; a local directory is created when missing.
pub fn open(cfg: &StoreConfig) -> Result<Arc<dyn ObjectStore>, StoreError> {
    let url_err = |message: String| StoreError::Url {
        url: cfg.url.clone(),
        message,
    };
    let url = match url::Url::parse(&cfg.url) {
        Ok(u) => u,
        Err(url::ParseError::RelativeUrlWithoutBase) => {
            let dir =
                std::path::absolute(&cfg.url).map_err(|e| StoreError::Dir(cfg.url.clone(), e))?;
            url::Url::from_directory_path(&dir)
                .map_err(|_| url_err("not an absolute path".into()))?
        }
        Err(e) => return Err(url_err(e.to_string())),
    };
    if url.scheme() == "file" {
        let dir = url
            .to_file_path()
            .map_err(|_| url_err("not a local path".into()))?;
        std::fs::create_dir_all(&dir).map_err(|e| StoreError::Dir(dir.display().to_string(), e))?;
        let fs = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
        return Ok(Arc::new(fs));
    }
    let (store, prefix) = object_store::parse_url_opts(&url, cfg.options.iter())?;
    if prefix.as_ref().is_empty() {
        return Ok(Arc::from(store));
    }
    Ok(Arc::new(PrefixStore::new(store, prefix)))
}
