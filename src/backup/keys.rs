//! age recipients and identities, read from files (never from argv).
//!
//! Recipients files hold one recipient per line: `age1…` (X25519),
//! `ssh-ed25519 …` or `ssh-rsa …`; blank lines and `#` comments are
//! skipped. Identity files are age identity files (`AGE-SECRET-KEY-1…`)
//! or unencrypted OpenSSH private keys.

use super::BackupError;
use std::path::Path;
use std::str::FromStr;

pub type Recipients = Vec<Box<dyn age::Recipient + Send + Sync>>;
pub type Identities = Vec<Box<dyn age::Identity + Send + Sync>>;

/// Reads every recipient of every file; a line that is none is an error
/// naming the file and line, and so is a file without any.
pub fn read_recipients(files: &[std::path::PathBuf]) -> Result<Recipients, BackupError> {
    read_recipients_except(files, None)
}

/// The public key (`age1…`) of the verification identity, an age X25519
/// identity file: the daemon keeps it online, so the one-time key that
/// wraps the CA keys is never sealed to it (see [`kek_recipients`]).
pub fn verify_recipient(identity_file: &Path) -> Result<String, BackupError> {
    let bad = |reason: &str| BackupError::KeyFile {
        path: identity_file.to_path_buf(),
        reason: reason.to_string(),
    };
    let text = zeroize::Zeroizing::new(
        std::fs::read_to_string(identity_file).map_err(|e| bad(&e.to_string()))?,
    );
    let line = text
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("AGE-SECRET-KEY-"))
        .ok_or_else(|| {
            bad("the verification identity must be an age X25519 identity (`age-keygen`), not an SSH key")
        })?;
    let id = age::x25519::Identity::from_str(line).map_err(|_| bad("a bad AGE-SECRET-KEY line"))?;
    Ok(id.to_public().to_string())
}

/// The recipients the one-time wrapping key of the CA keys is sealed to:
/// every recipient but the daemon's own verification identity. That
/// identity sits on the daemon's disk to decrypt archives for checking;
/// were the wrapping key sealed to it too, that file plus an archive
/// would give the CA keys in plaintext. Refused when nothing else is left.
pub fn kek_recipients(
    files: &[std::path::PathBuf],
    verify_identity: Option<&Path>,
) -> Result<Recipients, BackupError> {
    let except = verify_identity.map(verify_recipient).transpose()?;
    let out = read_recipients_except(files, except.as_deref())?;
    if out.is_empty() {
        return Err(BackupError::KeyFile {
            path: verify_identity.map(Path::to_path_buf).unwrap_or_default(),
            reason: "the verification identity is the only backup recipient: add a recipient whose identity is kept offline (the CA keys' wrapping key is never sealed to the daemon's own verification identity)".into(),
        });
    }
    Ok(out)
}

fn read_recipients_except(
    files: &[std::path::PathBuf],
    except: Option<&str>,
) -> Result<Recipients, BackupError> {
    let mut out: Recipients = Vec::new();
    let mut skipped = 0usize;
    for path in files {
        let text = std::fs::read_to_string(path).map_err(|source| BackupError::KeyFile {
            path: path.clone(),
            reason: source.to_string(),
        })?;
        let before = out.len();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            if except == Some(line) {
                skipped += 1;
                continue;
            }
            if let Ok(r) = age::x25519::Recipient::from_str(line) {
                out.push(Box::new(r));
            } else if let Ok(r) = age::ssh::Recipient::from_str(line) {
                out.push(Box::new(r));
            } else {
                return Err(BackupError::KeyFile {
                    path: path.clone(),
                    reason: format!(
                        "line {} is not an age recipient (`age1…`, `ssh-ed25519 …` or `ssh-rsa …`)",
                        i + 1
                    ),
                });
            }
        }
        if out.len() == before && skipped == 0 {
            return Err(BackupError::KeyFile {
                path: path.clone(),
                reason: "holds no recipient".into(),
            });
        }
    }
    if out.is_empty() && except.is_none() {
        return Err(BackupError::NoRecipients);
    }
    Ok(out)
}

/// Reads the identities of `path`: an age identity file, or an
/// unencrypted OpenSSH private key (ed25519 or RSA).
pub fn read_identities(path: &Path) -> Result<Identities, BackupError> {
    let bad = |reason: String| BackupError::KeyFile {
        path: path.to_path_buf(),
        reason,
    };
    let bytes = zeroize::Zeroizing::new(std::fs::read(path).map_err(|e| bad(e.to_string()))?);
    let text = std::str::from_utf8(&bytes).map_err(|_| bad("is not text".into()))?;
    if text.contains("-----BEGIN") {
        let identity = age::ssh::Identity::from_buffer(text.as_bytes(), None)
            .map_err(|e| bad(format!("not a usable OpenSSH private key: {e}")))?;
        return match identity {
            age::ssh::Identity::Unencrypted(_) => Ok(vec![Box::new(identity)]),
            age::ssh::Identity::Encrypted(_) => Err(bad(
                "the SSH key is passphrase-protected; keyward cannot prompt: decrypt it into a protected file first".into(),
            )),
            age::ssh::Identity::Unsupported(k) => {
                Err(bad(format!("unsupported SSH key type: {k:?}")))
            }
        };
    }
    let mut out: Identities = Vec::new();
    for line in text.lines().map(str::trim) {
        if line.starts_with("AGE-SECRET-KEY-") {
            let id = age::x25519::Identity::from_str(line)
                .map_err(|e| bad(format!("a bad AGE-SECRET-KEY line: {e}")))?;
            out.push(Box::new(id));
        } else if line.starts_with("AGE-PLUGIN-") {
            return Err(bad("age plugin identities are not supported".into()));
        }
    }
    if out.is_empty() {
        return Err(bad("holds no identity".into()));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shipped example: refused as it is (its placeholders are
    /// commented out), and its placeholder lines are valid recipients.
    #[test]
    fn the_example_recipients_file_is_refused_as_shipped_and_its_lines_parse() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("backup/recipients.example.txt");
        let e = read_recipients(std::slice::from_ref(&example))
            .err()
            .expect("the example as shipped was accepted");
        assert!(e.to_string().contains("holds no recipient"), "{e}");

        let text = std::fs::read_to_string(&example).unwrap();
        let placeholders: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# "))
            .filter(|l| l.starts_with("age1") || l.starts_with("ssh-"))
            .collect();
        assert_eq!(placeholders.len(), 3, "{placeholders:?}");
        let dir = tempfile::tempdir().unwrap();
        let enabled = dir.path().join("recipients.txt");
        std::fs::write(&enabled, placeholders.join("\n")).unwrap();
        assert_eq!(read_recipients(&[enabled]).unwrap().len(), 3);
    }
}
