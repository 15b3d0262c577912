//! Secrets: read from a file or an environment variable, never from argv,
//! held in `secrecy` types so that `Debug` and logs cannot print them.
//!
//! The config says *where* a secret is ([`SecretRef`], checked at load:
//! exactly one source per secret); [`SecretSetting::read`] is the one
//! function that reads one, when it is needed.

use secrecy::SecretString;
use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum SecretError {
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

impl SecretError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::File { .. } => "secret_file_unreadable",
            Self::Env { .. } => "secret_env_missing",
            Self::Empty { .. } => "secret_empty",
        }
    }
}

/// Where a secret is read from (`<key>_file` or `<key>_env` in the config).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SecretRef {
    /// A file holding only the secret; trailing newlines are dropped.
    File(PathBuf),
    /// The name of an environment variable holding the secret.
    Env(String),
}

/// A secret named in the config: the key that names it (for errors, e.g.
/// `keystore.pin`) and where it is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SecretSetting {
    pub key: String,
    pub from: SecretRef,
}

impl SecretSetting {
    /// Reads the secret. Trailing newlines in files are dropped (editors add them).
    pub fn read(&self) -> Result<SecretString, SecretError> {
        let key = || self.key.clone();
        let raw = match &self.from {
            SecretRef::File(path) => {
                zeroize::Zeroizing::new(std::fs::read_to_string(path).map_err(|source| {
                    SecretError::File {
                        key: key(),
                        path: path.clone(),
                        source,
                    }
                })?)
            }
            SecretRef::Env(var) => {
                zeroize::Zeroizing::new(std::env::var(var).map_err(|_| SecretError::Env {
                    key: key(),
                    var: var.clone(),
                })?)
            }
        };
        let trimmed = raw.trim_end_matches(['\n', '\r']);
        if trimmed.is_empty() {
            return Err(SecretError::Empty { key: key() });
        }
        Ok(SecretString::from(trimmed.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use secrecy::ExposeSecret;

    fn setting(from: SecretRef) -> SecretSetting {
        SecretSetting {
            key: "keystore.pin".into(),
            from,
        }
    }

    #[test]
    fn files_are_read_without_trailing_newlines() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "1234\r\n\n").unwrap();
        let s = setting(SecretRef::File(p)).read().unwrap();
        assert_eq!(s.expose_secret(), "1234");
    }

    #[test]
    fn missing_empty_and_unset_secrets_name_their_key() {
        let dir = tempfile::tempdir().unwrap();
        let missing = setting(SecretRef::File(dir.path().join("absent")))
            .read()
            .unwrap_err();
        assert_eq!(missing.code(), "secret_file_unreadable");
        assert!(
            missing.to_string().starts_with("keystore.pin:"),
            "{missing}"
        );
        let p = dir.path().join("empty");
        std::fs::write(&p, "\n").unwrap();
        let empty = setting(SecretRef::File(p)).read().unwrap_err();
        assert_eq!(empty.code(), "secret_empty");
        let unset = setting(SecretRef::Env("KEYWARD_TEST_SURELY_UNSET_VAR".into()))
            .read()
            .unwrap_err();
        assert_eq!(unset.code(), "secret_env_missing");
        assert!(unset.to_string().contains("KEYWARD_TEST_SURELY_UNSET_VAR"));
    }

    #[test]
    fn debug_shows_where_not_what() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pin");
        std::fs::write(&p, "s3cret-pin").unwrap();
        let s = setting(SecretRef::File(p));
        let value = s.read().unwrap();
        assert!(!format!("{s:?}{value:?}").contains("s3cret-pin"));
    }
}
