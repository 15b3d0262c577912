//! Randomness from the OS CSPRNG, and bearer secrets built from it.

use base64::Engine;
use ring::rand::SecureRandom;
use secrecy::SecretString;

#[derive(Debug, thiserror::Error)]
#[error("the system random generator failed")]
pub struct RandomError;

/// Fills `n` bytes from the OS CSPRNG.
pub fn random_bytes(n: usize) -> Result<Vec<u8>, RandomError> {
    let mut buf = vec![0u8; n];
    ring::rand::SystemRandom::new()
        .fill(&mut buf)
        .map_err(|_| RandomError)?;
    Ok(buf)
}

/// A new bearer secret with a recognisable prefix (`kwa_` admin, `kwr_`
/// registration), so leaked tokens can be found by secret scanners.
pub fn new_secret(prefix: &str) -> Result<SecretString, RandomError> {
    let bytes = zeroize::Zeroizing::new(random_bytes(32)?);
    let body = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes.as_slice());
    Ok(SecretString::from(format!("{prefix}{body}")))
}
