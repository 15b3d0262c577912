//! Secrets: read from a file or an environment variable, never from argv,
//! held in `secrecy` types so that `Debug` and logs cannot print them.

use secrecy::SecretString;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
    #[error("{key}: set exactly one of `{key}_file` or `{key}_env`")]
    Ambiguous { key: String },
    #[error(
        "{key}: missing; set `{key}_file` (a path) or `{key}_env` (an environment variable name)"
    )]
    Missing { key: String },
    #[error("{key}: cannot read secret file {path}")]
    File {
        key: String,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{key}: environment variable `{var}` is not set or not valid UTF-8")]
    Env { key: String, var: String },
    #[error("{key}: the secret is empty")]
    Empty { key: String },
}

/// Where a secret comes from, as written in the config (`<key>_file` or `<key>_env`).
#[derive(Debug, Clone, Default)]
pub struct SecretSource {
    pub key: String,
    pub file: Option<PathBuf>,
    pub env: Option<String>,
}

impl SecretSource {
    pub fn new(key: &str, file: Option<&Path>, env: Option<&str>) -> Self {
        Self {
            key: key.to_string(),
            file: file.map(Path::to_path_buf),
            env: env.map(str::to_string),
        }
    }

    /// Whether either source is configured.
    pub fn is_set(&self) -> bool {
        self.file.is_some() || self.env.is_some()
    }

    /// Reads the secret. Trailing newlines in files are dropped (editors add them).
    pub fn load(&self) -> Result<SecretString, SecretError> {
        let key = self.key.clone();
        let raw = match (&self.file, &self.env) {
            (Some(_), Some(_)) => return Err(SecretError::Ambiguous { key }),
            (None, None) => return Err(SecretError::Missing { key }),
            (Some(path), None) => {
                let text = std::fs::read_to_string(path).map_err(|source| SecretError::File {
                    key: key.clone(),
                    path: path.clone(),
                    source,
                })?;
                zeroize::Zeroizing::new(text)
            }
            (None, Some(var)) => {
                zeroize::Zeroizing::new(std::env::var(var).map_err(|_| SecretError::Env {
                    key: key.clone(),
                    var: var.clone(),
                })?)
            }
        };
        let trimmed = raw.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(SecretError::Empty { key });
        }
        Ok(SecretString::from(trimmed.to_string()))
    }
}
