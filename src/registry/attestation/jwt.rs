//! JWT attestation (`method = "jwt"`, issue 8): verifies a device's signed
//! JWT against one enrollment group's issuer, audience, algorithm allow-list
//! and JWKS (a file, or a URL cached and refreshed).
//!
//! Pure verification. Replay protection (`jti`) and choosing the group are
//! the caller's: [`JwtVerifier::peek_issuer_audience`] gives the unverified
//! `iss`/`aud` to pick a group by, and [`VerifiedJwt`] carries `jti` and
//! `exp` for the replay store.
//!
//! Algorithm confusion is ruled out by construction:
//! - `none` and the HMAC family are refused before any key is looked at, and
//!   there is no HMAC code path at all; JWKS members of `kty = "oct"` are
//!   never loaded;
//! - the header `alg` must be in the group's allow-list AND fit the selected
//!   JWK (EC curve, RSA, OKP Ed25519) AND equal the JWK's own `alg` when it
//!   has one;
//! - keys come only from the group's JWKS: `jwk`, `jku`, `x5u` and `x5c`
//!   headers are ignored, `crit` headers are refused (no extension is
//!   understood, RFC 7515 §4.1.11).
//!
//! Header and claims objects with duplicate members are refused (parsers
//! disagree on which one wins), and a token is at most [`MAX_TOKEN_BYTES`].

use crate::model::valid_display_text;
use crate::policy::JwtAttestation;
use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ring::signature as sig;
use serde::de::{Deserializer, Error as _, MapAccess, Visitor};
use serde_json::{Map, Value};
use std::path::PathBuf;
use std::sync::{Arc, RwLock};
use std::time::Duration;

/// Longest token accepted (compact serialization, bytes).
pub const MAX_TOKEN_BYTES: usize = 8 * 1024;
/// Largest JWKS document accepted (file or URL).
pub const MAX_JWKS_BYTES: usize = 256 * 1024;
/// Longest `jti` and device-claim value, in characters.
pub const MAX_CLAIM_CHARS: usize = 128;
/// A JWKS URL is fetched at most this often outside its schedule (a token
/// with an unknown `kid`, or a retry after a failed fetch), so tokens naming
/// random key ids cannot turn keyward into a request amplifier.
pub const UNSCHEDULED_FETCH_INTERVAL_SECS: i64 = 60;
/// Time limit of one JWKS request.
pub const JWKS_FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest `kid` looked up.
const MAX_KID_CHARS: usize = 256;

/// The JWS algorithms keyward verifies (the same names as
/// [`crate::policy::JWT_ALGORITHMS`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JwsAlgorithm {
    Es256,
    Es384,
    Rs256,
    Rs384,
    Rs512,
    Ps256,
    EdDsa,
}

impl JwsAlgorithm {
    const ALL: [Self; 7] = [
        Self::Es256,
        Self::Es384,
        Self::Rs256,
        Self::Rs384,
        Self::Rs512,
        Self::Ps256,
        Self::EdDsa,
    ];

    /// The JOSE name (`"ES256"`, …, `"EdDSA"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Es256 => "ES256",
            Self::Es384 => "ES384",
            Self::Rs256 => "RS256",
            Self::Rs384 => "RS384",
            Self::Rs512 => "RS512",
            Self::Ps256 => "PS256",
            Self::EdDsa => "EdDSA",
        }
    }

    /// Exact, case-sensitive match of a JOSE name (RFC 7515 §4.1.1).
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|a| a.as_str() == name)
    }
}

impl std::fmt::Display for JwsAlgorithm {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a valid token proved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VerifiedJwt {
    pub issuer: String,
    /// For the caller's replay store, until `expires_at`.
    pub jti: String,
    /// `exp` (Unix seconds), as claimed; the leeway is not added.
    pub expires_at: i64,
    /// Value of the group's `device_claim`; integers are stringified.
    pub device_claim: String,
    /// `kid` of the header, when it had one.
    pub kid: Option<String>,
    /// JOSE name of the algorithm that verified.
    pub algorithm: String,
}

/// Why a token was refused, or why a verifier could not be built.
///
/// Every variant but [`JwtError::Setup`] is the client's fault (4xx).
/// Display texts never repeat attacker-chosen header or claim values.
#[derive(Debug, thiserror::Error)]
pub enum JwtError {
    #[error("the JWT is malformed: {0}")]
    Malformed(&'static str),
    #[error("the JWT's algorithm is refused: {0}")]
    AlgorithmRefused(&'static str),
    #[error("the JWT's signature does not verify")]
    SignatureInvalid,
    #[error("the JWT has expired")]
    Expired,
    #[error("the JWT is not valid yet (`nbf` or `iat` lies in the future)")]
    NotYetValid,
    #[error("the JWT's issuer is not this enrollment group's")]
    WrongIssuer,
    #[error("the JWT is not addressed to this audience")]
    WrongAudience,
    #[error("the JWT lacks the `{0}` claim")]
    ClaimMissing(String),
    #[error(
        "the JWT's `{0}` claim must be 1-128 printable characters (a string; an integer for the device claim)"
    )]
    ClaimInvalid(String),
    #[error("no key of the issuer's JWKS matches the JWT's key id")]
    UnknownKey,
    /// The JWKS URL could not be fetched and no earlier copy is cached.
    /// Same client code as [`JwtError::UnknownKey`] (the device cannot tell
    /// the two apart either); the source says what failed, for the log.
    #[error("the issuer's keys are unavailable")]
    KeysUnavailable(#[source] JwksError),
    /// The group's policy cannot be served (JWKS file missing or unusable,
    /// URL refused, unknown algorithm): a configuration error, not a 4xx.
    #[error("JWT attestation policy: {0}")]
    Setup(#[source] SetupError),
}

impl JwtError {
    /// Stable machine-readable code.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "jwt_malformed",
            Self::AlgorithmRefused(_) => "jwt_algorithm_refused",
            Self::SignatureInvalid => "jwt_signature_invalid",
            Self::Expired => "jwt_expired",
            Self::NotYetValid => "jwt_not_yet_valid",
            Self::WrongIssuer => "jwt_wrong_issuer",
            Self::WrongAudience => "jwt_wrong_audience",
            Self::ClaimMissing(_) => "jwt_claim_missing",
            Self::ClaimInvalid(_) => "jwt_claim_invalid",
            Self::UnknownKey | Self::KeysUnavailable(_) => "jwt_unknown_key",
            Self::Setup(_) => "jwt_policy_invalid",
        }
    }

    /// False only for [`JwtError::Setup`] (an operator's problem).
    pub fn is_client_error(&self) -> bool {
        !matches!(self, Self::Setup(_))
    }
}

/// A group's JWT policy that cannot be put to work.
#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error("algorithm `{0}` is not supported")]
    UnknownAlgorithm(String),
    #[error("no JWKS source: pass the resolved jwks_file, or set jwks_url")]
    NoJwksSource,
    #[error("jwks_url is refused: {0}")]
    BadUrl(&'static str),
    #[error("JWKS file {path}: {source}")]
    JwksFile {
        path: PathBuf,
        #[source]
        source: JwksError,
    },
}

/// Reading, fetching or parsing a JWKS.
#[derive(Debug, thiserror::Error)]
pub enum JwksError {
    #[error("cannot read it: {0}")]
    Read(#[source] std::io::Error),
    #[error("larger than {MAX_JWKS_BYTES} bytes")]
    TooLarge,
    #[error("not a JWKS JSON document: {0}")]
    Json(#[source] serde_json::Error),
    #[error("no `keys` array")]
    NoKeysArray,
    #[error(
        "no usable signature key (EC P-256/P-384, RSA 2048-8192 bits, OKP Ed25519; `use` = sig)"
    )]
    NoUsableKey,
    #[error("request failed: {0}")]
    Http(#[source] reqwest::Error),
    #[error("the server answered HTTP {0}")]
    Status(u16),
    #[error("redirected to a refused URL: {0}")]
    Redirected(&'static str),
    #[error("the last fetch failed less than a minute ago")]
    Backoff,
}

/// Checks a `jwks_url`: `https`, or `http` to a loopback IP literal only
/// (a name such as `localhost` could resolve anywhere). No credentials in
/// the URL. Also for `keyward config check`.
pub fn check_jwks_url(url: &str) -> Result<reqwest::Url, SetupError> {
    let parsed = reqwest::Url::parse(url).map_err(|_| SetupError::BadUrl("not a URL"))?;
    check_url(&parsed).map_err(SetupError::BadUrl)?;
    Ok(parsed)
}

fn check_url(url: &reqwest::Url) -> Result<(), &'static str> {
    if !url.username().is_empty() || url.password().is_some() {
        return Err("credentials in the URL are not allowed");
    }
    match url.scheme() {
        "https" if url.host().is_some() => Ok(()),
        "http" => {
            let host = url.host_str().unwrap_or_default();
            let ip = host.trim_start_matches('[').trim_end_matches(']');
            match ip.parse::<std::net::IpAddr>() {
                Ok(ip) if ip.is_loopback() => Ok(()),
                _ => Err(
                    "http is allowed only to a loopback IP address (127.0.0.0/8, [::1]); use https",
                ),
            }
        }
        _ => Err("the scheme must be https (or http to a loopback IP address)"),
    }
}

// ---------------------------------------------------------------------------
// Keys

#[derive(Debug, Clone, PartialEq, Eq)]
enum PublicKey {
    /// Uncompressed SEC1 point `04‖x‖y`, validated at load.
    P256(Vec<u8>),
    P384(Vec<u8>),
    /// Big-endian, no leading zeros (ring refuses them).
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    Ed25519(Vec<u8>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    /// The JWK's own `alg`, when it names one we know.
    alg: Option<JwsAlgorithm>,
    key: PublicKey,
}

impl Jwk {
    /// Whether a token signed with `alg` may be checked with this key.
    fn fits(&self, alg: JwsAlgorithm) -> bool {
        use JwsAlgorithm as A;
        let kind = matches!(
            (alg, &self.key),
            (A::Es256, PublicKey::P256(_))
                | (A::Es384, PublicKey::P384(_))
                | (
                    A::Rs256 | A::Rs384 | A::Rs512 | A::Ps256,
                    PublicKey::Rsa { .. }
                )
                | (A::EdDsa, PublicKey::Ed25519(_))
        );
        kind && self.alg.is_none_or(|a| a == alg)
    }

    fn verifies(&self, alg: JwsAlgorithm, message: &[u8], signature: &[u8]) -> bool {
        use JwsAlgorithm as A;
        let rsa = |n: &[u8], e: &[u8], params: &sig::RsaParameters| {
            sig::RsaPublicKeyComponents { n, e }
                .verify(params, message, signature)
                .is_ok()
        };
        let unparsed = |algorithm: &'static dyn sig::VerificationAlgorithm, key: &[u8]| {
            sig::UnparsedPublicKey::new(algorithm, key)
                .verify(message, signature)
                .is_ok()
        };
        match (alg, &self.key) {
            (A::Es256, PublicKey::P256(p)) => unparsed(&sig::ECDSA_P256_SHA256_FIXED, p),
            (A::Es384, PublicKey::P384(p)) => unparsed(&sig::ECDSA_P384_SHA384_FIXED, p),
            (A::Rs256, PublicKey::Rsa { n, e }) => rsa(n, e, &sig::RSA_PKCS1_2048_8192_SHA256),
            (A::Rs384, PublicKey::Rsa { n, e }) => rsa(n, e, &sig::RSA_PKCS1_2048_8192_SHA384),
            (A::Rs512, PublicKey::Rsa { n, e }) => rsa(n, e, &sig::RSA_PKCS1_2048_8192_SHA512),
            (A::Ps256, PublicKey::Rsa { n, e }) => rsa(n, e, &sig::RSA_PSS_2048_8192_SHA256),
            (A::EdDsa, PublicKey::Ed25519(x)) => unparsed(&sig::ED25519, x),
            _ => false,
        }
    }
}

/// The usable keys of one JWKS document.
#[derive(Debug, Clone, PartialEq, Eq)]
struct KeySet {
    keys: Vec<Jwk>,
}

/// How a token's `kid` found its keys.
enum Pick<'a> {
    Keys(Vec<&'a Jwk>),
    /// No key with this `kid` (or no `kid` and not exactly one key).
    Unknown,
    /// Keys with this `kid` exist but none fits the token's algorithm.
    WrongType,
}

impl KeySet {
    fn pick(&self, kid: Option<&str>, alg: JwsAlgorithm) -> Pick<'_> {
        let named: Vec<&Jwk> = match kid {
            Some(kid) => self
                .keys
                .iter()
                .filter(|k| k.kid.as_deref() == Some(kid))
                .collect(),
            None if self.keys.len() == 1 => self.keys.iter().collect(),
            None => Vec::new(),
        };
        if named.is_empty() {
            return Pick::Unknown;
        }
        let fitting: Vec<&Jwk> = named.into_iter().filter(|k| k.fits(alg)).collect();
        if fitting.is_empty() {
            Pick::WrongType
        } else {
            Pick::Keys(fitting)
        }
    }
}

/// Parses a JWKS document, keeping the keys keyward can verify with and
/// skipping the others (RFC 7517 §5: unsupported members are ignored).
fn parse_jwks(bytes: &[u8]) -> Result<KeySet, JwksError> {
    if bytes.len() > MAX_JWKS_BYTES {
        return Err(JwksError::TooLarge);
    }
    let doc: Value = serde_json::from_slice(bytes).map_err(JwksError::Json)?;
    let Some(entries) = doc.get("keys").and_then(Value::as_array) else {
        return Err(JwksError::NoKeysArray);
    };
    let keys: Vec<Jwk> = entries.iter().filter_map(parse_jwk).collect();
    if keys.is_empty() {
        return Err(JwksError::NoUsableKey);
    }
    Ok(KeySet { keys })
}

fn parse_jwk(v: &Value) -> Option<Jwk> {
    let obj = v.as_object()?;
    let text = |name: &str| -> Result<Option<&str>, ()> {
        match obj.get(name) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(()),
        }
    };
    let b64 = |name: &str| -> Option<Vec<u8>> { URL_SAFE_NO_PAD.decode(text(name).ok()??).ok() };
    // Encryption keys and keys not allowed to verify are not ours to use.
    if text("use").ok()?.is_some_and(|u| u != "sig") {
        return None;
    }
    if let Some(ops) = obj.get("key_ops") {
        let ops = ops.as_array()?;
        if !ops.iter().any(|o| o.as_str() == Some("verify")) {
            return None;
        }
    }
    let kid = text("kid").ok()?.map(str::to_string);
    // A JWK `alg` we do not verify (e.g. HS256, PS512) makes the key unusable.
    let alg = match text("alg").ok()? {
        Some(name) => Some(JwsAlgorithm::parse(name)?),
        None => None,
    };
    let key = match (text("kty").ok()??, text("crv").ok()?) {
        ("EC", Some(crv @ ("P-256" | "P-384"))) => {
            let (x, y) = (b64("x")?, b64("y")?);
            let len = if crv == "P-256" { 32 } else { 48 };
            if x.len() != len || y.len() != len {
                return None;
            }
            let point = [&[0x04][..], &x, &y].concat();
            if crv == "P-256" {
                valid_ec_point(&ring::agreement::ECDH_P256, &point)?;
                PublicKey::P256(point)
            } else {
                valid_ec_point(&ring::agreement::ECDH_P384, &point)?;
                PublicKey::P384(point)
            }
        }
        ("RSA", _) => {
            let n = strip_leading_zeros(b64("n")?);
            let e = strip_leading_zeros(b64("e")?);
            // ring's limits: 2048-8192-bit modulus, odd exponent 3 ≤ e < 2^33.
            let bits = n
                .first()
                .map_or(0, |b| n.len() * 8 - b.leading_zeros() as usize);
            if !(2048..=8192).contains(&bits) || e.is_empty() || e.len() > 5 {
                return None;
            }
            let e_value = e.iter().fold(0u64, |acc, b| (acc << 8) | u64::from(*b));
            if e_value < 3 || e_value % 2 == 0 || e_value >= 1 << 33 {
                return None;
            }
            PublicKey::Rsa { n, e }
        }
        ("OKP", Some("Ed25519")) => {
            let x = b64("x")?;
            if x.len() != 32 {
                return None;
            }
            PublicKey::Ed25519(x)
        }
        // `oct` (HMAC secrets) and everything else: never loaded.
        _ => return None,
    };
    let jwk = Jwk { kid, alg, key };
    // A JWK whose own `alg` contradicts its key type fits no token.
    if jwk.alg.is_some_and(|a| !jwk.fits(a)) {
        return None;
    }
    Some(jwk)
}

/// ring has no public-key validation call for ECDSA, but an ECDH agreement
/// with an ephemeral key fully validates the peer point (on the curve, not
/// the identity): done once per key at load.
fn valid_ec_point(curve: &'static ring::agreement::Algorithm, point: &[u8]) -> Option<()> {
    let rng = ring::rand::SystemRandom::new();
    let ephemeral = ring::agreement::EphemeralPrivateKey::generate(curve, &rng).ok()?;
    let peer = ring::agreement::UnparsedPublicKey::new(curve, point);
    ring::agreement::agree_ephemeral(ephemeral, &peer, |_| ()).ok()
}

fn strip_leading_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros);
    v
}

// ---------------------------------------------------------------------------
// JWKS from a URL

struct RemoteJwks {
    url: reqwest::Url,
    http: reqwest::Client,
    refresh_secs: i64,
    state: RwLock<RemoteState>,
    /// One fetch at a time; a scheduled refresh does not hold up requests
    /// that can go on with the cached keys.
    fetching: tokio::sync::Mutex<()>,
}

#[derive(Clone, Default)]
struct RemoteState {
    keys: Option<Arc<KeySet>>,
    /// Clock time of the last successful fetch.
    fetched_at: i64,
    /// Clock time of the last attempt, successful or not.
    attempted_at: Option<i64>,
}

impl RemoteState {
    /// An unscheduled fetch (kid miss, retry after failure) is allowed.
    fn may_attempt(&self, now: i64) -> bool {
        self.attempted_at
            .is_none_or(|t| now.abs_diff(t) >= UNSCHEDULED_FETCH_INTERVAL_SECS.unsigned_abs())
    }

    fn refresh_due(&self, now: i64, refresh_secs: i64) -> bool {
        now.abs_diff(self.fetched_at) >= refresh_secs.unsigned_abs() && self.may_attempt(now)
    }
}

impl RemoteJwks {
    fn snapshot(&self) -> RemoteState {
        self.state
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Where the URL is logged: no query string (it may carry a key).
    fn log_url(&self) -> String {
        format!(
            "{}{}",
            self.url.origin().ascii_serialization(),
            self.url.path()
        )
    }

    /// The keys to verify with at `now`, fetching when none are cached or
    /// the schedule says so.
    async fn current(&self, now: i64) -> Result<Arc<KeySet>, JwtError> {
        let s = self.snapshot();
        match s.keys {
            Some(keys) if !s.refresh_due(now, self.refresh_secs) => Ok(keys),
            Some(keys) => {
                // Whoever gets the lock refreshes; the others use the cache.
                if let Ok(_guard) = self.fetching.try_lock()
                    && self.snapshot().refresh_due(now, self.refresh_secs)
                    && let Ok(fresh) = self.fetch_and_store(now).await
                {
                    return Ok(fresh);
                }
                Ok(self.snapshot().keys.unwrap_or(keys))
            }
            None => {
                let _guard = self.fetching.lock().await;
                let s = self.snapshot();
                if let Some(keys) = s.keys {
                    return Ok(keys);
                }
                if !s.may_attempt(now) {
                    return Err(JwtError::KeysUnavailable(JwksError::Backoff));
                }
                self.fetch_and_store(now)
                    .await
                    .map_err(JwtError::KeysUnavailable)
            }
        }
    }

    /// After a `kid` miss on `seen`: newer keys, if another task fetched
    /// meanwhile or a fetch is allowed now and succeeds.
    async fn refresh_on_miss(&self, now: i64, seen: &Arc<KeySet>) -> Option<Arc<KeySet>> {
        let _guard = self.fetching.lock().await;
        let s = self.snapshot();
        if let Some(keys) = &s.keys
            && !Arc::ptr_eq(keys, seen)
        {
            return Some(keys.clone());
        }
        if !s.may_attempt(now) {
            return None;
        }
        self.fetch_and_store(now).await.ok()
    }

    /// Fetches and records the outcome; a failure keeps the old keys.
    /// Caller holds `fetching`.
    async fn fetch_and_store(&self, now: i64) -> Result<Arc<KeySet>, JwksError> {
        let outcome = self.fetch().await.map(Arc::new);
        let mut state = self
            .state
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        state.attempted_at = Some(now);
        match &outcome {
            Ok(keys) => {
                state.keys = Some(keys.clone());
                state.fetched_at = now;
                tracing::info!(url = %self.log_url(), keys = keys.keys.len(), "JWKS fetched");
            }
            Err(e) => {
                tracing::warn!(
                    url = %self.log_url(),
                    error = %e,
                    cached = state.keys.is_some(),
                    "JWKS fetch failed; keeping the previously fetched keys, if any"
                );
            }
        }
        outcome
    }

    async fn fetch(&self) -> Result<KeySet, JwksError> {
        let mut response = self
            .http
            .get(self.url.clone())
            .header(reqwest::header::ACCEPT, "application/json")
            .timeout(JWKS_FETCH_TIMEOUT)
            .send()
            .await
            // The URL (and its query) is logged separately, trimmed.
            .map_err(|e| JwksError::Http(e.without_url()))?;
        // A redirect must not lead somewhere the policy could not name.
        check_url(response.url()).map_err(JwksError::Redirected)?;
        if !response.status().is_success() {
            return Err(JwksError::Status(response.status().as_u16()));
        }
        if response
            .content_length()
            .is_some_and(|l| l > MAX_JWKS_BYTES as u64)
        {
            return Err(JwksError::TooLarge);
        }
        let mut body = Vec::new();
        while let Some(chunk) = response
            .chunk()
            .await
            .map_err(|e| JwksError::Http(e.without_url()))?
        {
            if body.len() + chunk.len() > MAX_JWKS_BYTES {
                return Err(JwksError::TooLarge);
            }
            body.extend_from_slice(&chunk);
        }
        parse_jwks(&body)
    }
}

enum Keys {
    Fixed(Arc<KeySet>),
    Remote(RemoteJwks),
}

// ---------------------------------------------------------------------------
// The verifier

/// Verifies JWTs for one `jwt` enrollment group. Cheap to share (`Arc`);
/// verification does not block (ring, cached keys).
pub struct JwtVerifier {
    issuer: String,
    audience: String,
    algorithms: Vec<JwsAlgorithm>,
    device_claim: String,
    leeway: i64,
    keys: Keys,
}

impl std::fmt::Debug for JwtVerifier {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtVerifier")
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("algorithms", &self.algorithms)
            .finish_non_exhaustive()
    }
}

/// The three parts of a compact JWS, decoded.
struct Parts<'a> {
    signing_input: &'a [u8],
    header: Map<String, Value>,
    payload: Vec<u8>,
    signature: Vec<u8>,
}

fn split(token: &str) -> Result<Parts<'_>, JwtError> {
    if token.len() > MAX_TOKEN_BYTES {
        return Err(JwtError::Malformed("longer than 8 KiB"));
    }
    let token = token.trim();
    let mut it = token.split('.');
    let (Some(h), Some(p), Some(s), None) = (it.next(), it.next(), it.next(), it.next()) else {
        return Err(JwtError::Malformed(
            "not a compact JWS (three base64url parts separated by dots)",
        ));
    };
    let decode = |part: &str, what: &'static str| {
        URL_SAFE_NO_PAD
            .decode(part)
            .map_err(|_| JwtError::Malformed(what))
    };
    let header = decode(h, "header is not base64url")?;
    let payload = decode(p, "payload is not base64url")?;
    let signature = decode(s, "signature is not base64url")?;
    let header = strict_object(&header).ok_or(JwtError::Malformed(
        "header is not a JSON object with unique members",
    ))?;
    Ok(Parts {
        signing_input: &token.as_bytes()[..h.len() + 1 + p.len()],
        header,
        payload,
        signature,
    })
}

fn claims_of(payload: &[u8]) -> Result<Map<String, Value>, JwtError> {
    strict_object(payload).ok_or(JwtError::Malformed(
        "claims are not a JSON object with unique members",
    ))
}

/// `iss` and the audiences of a claims object (unverified).
fn issuer_audience(claims: &Map<String, Value>) -> Result<(String, Vec<String>), JwtError> {
    let issuer = match claims.get("iss") {
        Some(Value::String(s)) => s.clone(),
        Some(_) => return Err(JwtError::Malformed("`iss` is not a string")),
        None => return Err(JwtError::ClaimMissing("iss".into())),
    };
    let audience = match claims.get("aud") {
        None => Vec::new(),
        Some(Value::String(s)) => vec![s.clone()],
        Some(Value::Array(a)) => a
            .iter()
            .map(|v| v.as_str().map(str::to_string))
            .collect::<Option<Vec<_>>>()
            .ok_or(JwtError::Malformed(
                "`aud` is not a string or an array of strings",
            ))?,
        Some(_) => {
            return Err(JwtError::Malformed(
                "`aud` is not a string or an array of strings",
            ));
        }
    };
    Ok((issuer, audience))
}

/// A NumericDate (RFC 7519 §2): integer or fractional seconds, floored.
fn numeric_date(claims: &Map<String, Value>, name: &'static str) -> Result<Option<i64>, JwtError> {
    let bad = JwtError::Malformed("`exp`, `nbf` and `iat` must be numbers");
    match claims.get(name) {
        None => Ok(None),
        Some(Value::Number(n)) => {
            if let Some(i) = n.as_i64() {
                Ok(Some(i))
            } else if n.as_u64().is_some() {
                Ok(Some(i64::MAX))
            } else {
                match n.as_f64() {
                    // `as` saturates: ±huge become i64::MIN/MAX.
                    Some(f) if f.is_finite() => Ok(Some(f.floor() as i64)),
                    _ => Err(bad),
                }
            }
        }
        Some(_) => Err(bad),
    }
}

fn display_claim(value: &str) -> bool {
    valid_display_text(value, MAX_CLAIM_CHARS, false)
}

impl JwtVerifier {
    /// Builds the verifier of one group. `jwks_file` is the policy's
    /// `jwks_file` resolved against the policies directory
    /// (`Policies::resolve`); it is read now and must hold at least one
    /// usable key. Otherwise `policy.jwks_url` is checked now and fetched on
    /// first use. `http` needs a rustls crypto provider installed for
    /// `https` URLs.
    pub fn new(
        policy: &JwtAttestation,
        jwks_file: Option<PathBuf>,
        http: reqwest::Client,
    ) -> Result<Self, JwtError> {
        let algorithms = policy
            .algorithms
            .iter()
            .map(|a| {
                JwsAlgorithm::parse(a)
                    .ok_or_else(|| JwtError::Setup(SetupError::UnknownAlgorithm(a.clone())))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let keys = match (jwks_file, &policy.jwks_url) {
            (Some(path), _) => {
                let loaded = std::fs::read(&path)
                    .map_err(JwksError::Read)
                    .and_then(|bytes| parse_jwks(&bytes))
                    .map_err(|source| {
                        JwtError::Setup(SetupError::JwksFile {
                            path: path.clone(),
                            source,
                        })
                    })?;
                Keys::Fixed(Arc::new(loaded))
            }
            (None, Some(url)) => Keys::Remote(RemoteJwks {
                url: check_jwks_url(url).map_err(JwtError::Setup)?,
                http,
                refresh_secs: i64::from(policy.jwks_refresh_minutes.max(1)) * 60,
                state: RwLock::new(RemoteState::default()),
                fetching: tokio::sync::Mutex::new(()),
            }),
            (None, None) => return Err(JwtError::Setup(SetupError::NoJwksSource)),
        };
        Ok(Self {
            issuer: policy.issuer.clone(),
            audience: policy.audience.clone(),
            algorithms,
            device_claim: policy.device_claim.clone(),
            leeway: i64::from(policy.leeway_seconds),
            keys,
        })
    }

    /// The token's `iss` and `aud` as claimed, NOT verified: only for
    /// choosing the group whose verifier then checks everything.
    pub fn peek_issuer_audience(token: &str) -> Result<(String, Vec<String>), JwtError> {
        let parts = split(token)?;
        issuer_audience(&claims_of(&parts.payload)?)
    }

    /// Verifies signature and claims at `now` (Unix seconds, from the
    /// `Clock`). Checks run in this order, so the first failure names the
    /// error: structure, algorithm, key, signature, then claims (`iss`,
    /// `aud`, `exp`, `nbf`, `iat`, `jti`, device claim).
    pub async fn verify(&self, token: &str, now: i64) -> Result<VerifiedJwt, JwtError> {
        let parts = split(token)?;
        let (alg, kid) = self.check_header(&parts.header)?;
        self.check_signature(&parts, alg, kid.as_deref(), now)
            .await?;
        let claims = claims_of(&parts.payload)?;
        let (issuer, jti, expires_at, device_claim) = self.check_claims(&claims, now)?;
        Ok(VerifiedJwt {
            issuer,
            jti,
            expires_at,
            device_claim,
            kid,
            algorithm: alg.as_str().to_string(),
        })
    }

    fn check_header(
        &self,
        header: &Map<String, Value>,
    ) -> Result<(JwsAlgorithm, Option<String>), JwtError> {
        let Some(Value::String(name)) = header.get("alg") else {
            return Err(JwtError::Malformed("header has no string `alg`"));
        };
        if name.eq_ignore_ascii_case("none") {
            return Err(JwtError::AlgorithmRefused(
                "`none` (unsigned) is never accepted",
            ));
        }
        if name
            .as_bytes()
            .get(..2)
            .is_some_and(|p| p.eq_ignore_ascii_case(b"HS"))
        {
            return Err(JwtError::AlgorithmRefused(
                "HMAC is never accepted (keys are public)",
            ));
        }
        let alg = JwsAlgorithm::parse(name)
            .filter(|a| self.algorithms.contains(a))
            .ok_or(JwtError::AlgorithmRefused(
                "not in this enrollment group's algorithm list",
            ))?;
        if header.contains_key("crit") {
            return Err(JwtError::Malformed(
                "`crit` header: no JWS extension is supported",
            ));
        }
        let kid = match header.get("kid") {
            None => None,
            Some(Value::String(k)) if !k.is_empty() && k.chars().count() <= MAX_KID_CHARS => {
                Some(k.clone())
            }
            Some(_) => {
                return Err(JwtError::Malformed(
                    "`kid` must be a string of 1-256 characters",
                ));
            }
        };
        Ok((alg, kid))
    }

    async fn check_signature(
        &self,
        parts: &Parts<'_>,
        alg: JwsAlgorithm,
        kid: Option<&str>,
        now: i64,
    ) -> Result<(), JwtError> {
        let check = |set: &KeySet| -> Result<(), JwtError> {
            match set.pick(kid, alg) {
                Pick::Unknown => Err(JwtError::UnknownKey),
                Pick::WrongType => Err(JwtError::AlgorithmRefused(
                    "does not fit the key (type, curve, or the key's own `alg`)",
                )),
                Pick::Keys(keys) => {
                    if keys
                        .iter()
                        .any(|k| k.verifies(alg, parts.signing_input, &parts.signature))
                    {
                        Ok(())
                    } else {
                        Err(JwtError::SignatureInvalid)
                    }
                }
            }
        };
        match &self.keys {
            Keys::Fixed(set) => check(set),
            Keys::Remote(remote) => {
                let set = remote.current(now).await?;
                match check(&set) {
                    // A new signing key may have been published: look
                    // again (rate-limited). Without a kid there is no key
                    // to look for.
                    Err(JwtError::UnknownKey) if kid.is_some() => {
                        match remote.refresh_on_miss(now, &set).await {
                            Some(fresh) => check(&fresh),
                            None => Err(JwtError::UnknownKey),
                        }
                    }
                    other => other,
                }
            }
        }
    }

    fn check_claims(
        &self,
        claims: &Map<String, Value>,
        now: i64,
    ) -> Result<(String, String, i64, String), JwtError> {
        let (issuer, audience) = match issuer_audience(claims) {
            Err(JwtError::ClaimMissing(_)) => return Err(JwtError::WrongIssuer),
            other => other?,
        };
        if issuer != self.issuer {
            return Err(JwtError::WrongIssuer);
        }
        if !audience.contains(&self.audience) {
            return Err(JwtError::WrongAudience);
        }
        let exp = numeric_date(claims, "exp")?.ok_or(JwtError::ClaimMissing("exp".into()))?;
        if exp.saturating_add(self.leeway) <= now {
            return Err(JwtError::Expired);
        }
        let latest_start = now.saturating_add(self.leeway);
        for name in ["nbf", "iat"] {
            if numeric_date(claims, name)?.is_some_and(|t| t > latest_start) {
                return Err(JwtError::NotYetValid);
            }
        }
        let jti = match claims.get("jti") {
            None => return Err(JwtError::ClaimMissing("jti".into())),
            Some(Value::String(s)) if s.is_empty() => {
                return Err(JwtError::ClaimMissing("jti".into()));
            }
            Some(Value::String(s)) if display_claim(s) => s.clone(),
            Some(_) => return Err(JwtError::ClaimInvalid("jti".into())),
        };
        let device = match claims.get(&self.device_claim) {
            None | Some(Value::Null) => {
                return Err(JwtError::ClaimMissing(self.device_claim.clone()));
            }
            Some(Value::String(s)) if s.is_empty() => {
                return Err(JwtError::ClaimMissing(self.device_claim.clone()));
            }
            Some(Value::String(s)) if display_claim(s) => s.clone(),
            Some(Value::Number(n)) if n.is_i64() || n.is_u64() => n.to_string(),
            Some(_) => return Err(JwtError::ClaimInvalid(self.device_claim.clone())),
        };
        Ok((issuer, jti, exp, device))
    }
}

/// Parses a JSON object, refusing duplicate top-level members.
fn strict_object(bytes: &[u8]) -> Option<Map<String, Value>> {
    struct StrictObject(Map<String, Value>);
    struct V;
    impl<'de> Visitor<'de> for V {
        type Value = StrictObject;
        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a JSON object with unique member names")
        }
        fn visit_map<A: MapAccess<'de>>(self, mut access: A) -> Result<StrictObject, A::Error> {
            let mut map = Map::new();
            while let Some((k, v)) = access.next_entry::<String, Value>()? {
                if map.insert(k, v).is_some() {
                    return Err(A::Error::custom("duplicate member"));
                }
            }
            Ok(StrictObject(map))
        }
    }
    impl<'de> serde::Deserialize<'de> for StrictObject {
        fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
            d.deserialize_map(V)
        }
    }
    serde_json::from_slice::<StrictObject>(bytes)
        .ok()
        .map(|o| o.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::rand::SystemRandom;
    use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
    use serde_json::json;
    use std::sync::OnceLock;

    const NOW: i64 = 1_800_000_000;
    const ISS: &str = "https://endorse.example/v1";
    const AUD: &str = "keyward-fleet";
    const ALL: &[&str] = &[
        "ES256", "ES384", "RS256", "RS384", "RS512", "PS256", "EdDSA",
    ];

    fn b64(b: &[u8]) -> String {
        URL_SAFE_NO_PAD.encode(b)
    }

    enum Signer {
        Ec(EcdsaKeyPair, &'static str),
        Ed(Ed25519KeyPair),
        Rsa(RsaKeyPair),
    }

    /// A signing key of the test "issuer" (or of an attacker).
    struct TestKey {
        kid: String,
        signer: Signer,
        /// PKCS#8 (EC, Ed25519) or PKCS#1 (RSA) DER, for jsonwebtoken.
        der: Vec<u8>,
    }

    /// One 2048-bit RSA key per test process, made by `openssl genpkey`
    /// (ring cannot generate RSA keys), as PKCS#1 DER.
    fn rsa_der() -> Vec<u8> {
        static DER: OnceLock<Vec<u8>> = OnceLock::new();
        DER.get_or_init(|| {
            let dir = tempfile::tempdir().unwrap();
            let pem = dir.path().join("rsa.pem");
            let der = dir.path().join("rsa.der");
            let ok = std::process::Command::new("openssl")
                .args([
                    "genpkey",
                    "-algorithm",
                    "RSA",
                    "-pkeyopt",
                    "rsa_keygen_bits:2048",
                    "-out",
                ])
                .arg(&pem)
                .status()
                .unwrap()
                .success()
                && std::process::Command::new("openssl")
                    .args(["pkey", "-traditional", "-outform", "DER", "-in"])
                    .arg(&pem)
                    .arg("-out")
                    .arg(&der)
                    .status()
                    .unwrap()
                    .success();
            assert!(ok, "openssl could not make the test RSA key");
            std::fs::read(der).unwrap()
        })
        .clone()
    }

    impl TestKey {
        fn ec(kid: &str, curve: &'static str) -> Self {
            let rng = SystemRandom::new();
            let alg = if curve == "P-256" {
                &sig::ECDSA_P256_SHA256_FIXED_SIGNING
            } else {
                &sig::ECDSA_P384_SHA384_FIXED_SIGNING
            };
            let der = EcdsaKeyPair::generate_pkcs8(alg, &rng)
                .unwrap()
                .as_ref()
                .to_vec();
            let pair = EcdsaKeyPair::from_pkcs8(alg, &der, &rng).unwrap();
            Self {
                kid: kid.into(),
                signer: Signer::Ec(pair, curve),
                der,
            }
        }
        fn p256(kid: &str) -> Self {
            Self::ec(kid, "P-256")
        }
        fn p384(kid: &str) -> Self {
            Self::ec(kid, "P-384")
        }
        fn ed25519(kid: &str) -> Self {
            let der = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new())
                .unwrap()
                .as_ref()
                .to_vec();
            let pair = Ed25519KeyPair::from_pkcs8(&der).unwrap();
            Self {
                kid: kid.into(),
                signer: Signer::Ed(pair),
                der,
            }
        }
        fn rsa(kid: &str) -> Self {
            let der = rsa_der();
            let pair = RsaKeyPair::from_der(&der).unwrap();
            Self {
                kid: kid.into(),
                signer: Signer::Rsa(pair),
                der,
            }
        }

        /// The public JWK, with `kid`.
        fn jwk(&self) -> Value {
            match &self.signer {
                Signer::Ec(pair, crv) => {
                    let p = pair.public_key().as_ref();
                    let half = (p.len() - 1) / 2;
                    json!({"kty": "EC", "crv": crv, "kid": self.kid,
                           "x": b64(&p[1..1 + half]), "y": b64(&p[1 + half..])})
                }
                Signer::Ed(pair) => {
                    json!({"kty": "OKP", "crv": "Ed25519", "kid": self.kid,
                           "x": b64(pair.public_key().as_ref())})
                }
                Signer::Rsa(pair) => {
                    let c: ring::rsa::PublicKeyComponents<Vec<u8>> = pair.public().into();
                    json!({"kty": "RSA", "kid": self.kid, "n": b64(&c.n), "e": b64(&c.e)})
                }
            }
        }

        /// Signs `input` as `alg` says (the RSA padding follows `alg`).
        fn sign(&self, alg: &str, input: &[u8]) -> Vec<u8> {
            let rng = SystemRandom::new();
            match &self.signer {
                Signer::Ec(pair, _) => pair.sign(&rng, input).unwrap().as_ref().to_vec(),
                Signer::Ed(pair) => pair.sign(input).as_ref().to_vec(),
                Signer::Rsa(pair) => {
                    let padding: &'static dyn sig::RsaEncoding = match alg {
                        "RS384" => &sig::RSA_PKCS1_SHA384,
                        "RS512" => &sig::RSA_PKCS1_SHA512,
                        "PS256" => &sig::RSA_PSS_SHA256,
                        _ => &sig::RSA_PKCS1_SHA256,
                    };
                    let mut out = vec![0; pair.public().modulus_len()];
                    pair.sign(padding, &rng, input, &mut out).unwrap();
                    out
                }
            }
        }

        /// A compact JWS of exactly these header and payload bytes.
        fn mint_raw(&self, header: &str, payload: &str) -> String {
            let input = format!("{}.{}", b64(header.as_bytes()), b64(payload.as_bytes()));
            let alg = serde_json::from_str::<Value>(header)
                .ok()
                .and_then(|h| h["alg"].as_str().map(str::to_string))
                .unwrap_or_default();
            format!("{input}.{}", b64(&self.sign(&alg, input.as_bytes())))
        }

        fn mint_with(&self, header: Value, claims: &Value) -> String {
            self.mint_raw(&header.to_string(), &claims.to_string())
        }

        /// The usual token: this key's kid, `alg`, the usual claims.
        fn mint(&self, alg: &str, claims: &Value) -> String {
            self.mint_with(json!({"alg": alg, "typ": "JWT", "kid": self.kid}), claims)
        }
    }

    fn claims() -> Value {
        json!({"iss": ISS, "aud": AUD, "exp": NOW + 300, "iat": NOW - 5,
               "jti": "8d0f7c1e-jti", "imsi": "440103123456789"})
    }

    fn claims_with(edit: impl FnOnce(&mut Map<String, Value>)) -> Value {
        let mut c = claims();
        edit(c.as_object_mut().unwrap());
        c
    }

    /// reqwest is built without a default crypto provider (the daemon
    /// installs ring's at start).
    fn client() -> reqwest::Client {
        let _ = rustls::crypto::ring::default_provider().install_default();
        reqwest::Client::new()
    }

    fn policy(algs: &[&str]) -> JwtAttestation {
        JwtAttestation {
            issuer: ISS.into(),
            audience: AUD.into(),
            jwks_file: None,
            jwks_url: None,
            algorithms: algs.iter().map(|a| a.to_string()).collect(),
            device_claim: "imsi".into(),
            leeway_seconds: 60,
            jwks_refresh_minutes: 60,
        }
    }

    fn jwks(keys: &[&TestKey]) -> Value {
        json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()})
    }

    /// A verifier reading a JWKS file with these keys.
    fn file_verifier(algs: &[&str], doc: &Value) -> JwtVerifier {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("jwks.json");
        std::fs::write(&path, doc.to_string()).unwrap();
        JwtVerifier::new(&policy(algs), Some(path), client()).unwrap()
    }

    async fn code_at(v: &JwtVerifier, token: &str, now: i64) -> &'static str {
        match v.verify(token, now).await {
            Ok(ok) => panic!("accepted: {ok:?}"),
            Err(e) => e.code(),
        }
    }

    async fn code(v: &JwtVerifier, token: &str) -> &'static str {
        code_at(v, token, NOW).await
    }

    #[tokio::test]
    async fn every_algorithm_verifies_with_its_key_type() {
        let (p256, p384, rsa, ed) = (
            TestKey::p256("ec256"),
            TestKey::p384("ec384"),
            TestKey::rsa("rsa"),
            TestKey::ed25519("ed"),
        );
        let v = file_verifier(ALL, &jwks(&[&p256, &p384, &rsa, &ed]));
        for (alg, key) in [
            ("ES256", &p256),
            ("ES384", &p384),
            ("RS256", &rsa),
            ("RS384", &rsa),
            ("RS512", &rsa),
            ("PS256", &rsa),
            ("EdDSA", &ed),
        ] {
            let got = v.verify(&key.mint(alg, &claims()), NOW).await.unwrap();
            assert_eq!(
                got,
                VerifiedJwt {
                    issuer: ISS.into(),
                    jti: "8d0f7c1e-jti".into(),
                    expires_at: NOW + 300,
                    device_claim: "440103123456789".into(),
                    kid: Some(key.kid.clone()),
                    algorithm: alg.into(),
                },
                "{alg}"
            );
        }
        // The RSA padding is part of the algorithm: a PKCS#1 v1.5 signature
        // presented as PS256 (or the other way round) does not verify.
        let pkcs1 = rsa.mint("RS256", &claims());
        let (input, sig_part) = pkcs1.rsplit_once('.').unwrap();
        let (_, payload) = input.split_once('.').unwrap();
        let as_pss = format!(
            "{}.{payload}.{sig_part}",
            b64(json!({"alg": "PS256", "kid": "rsa"}).to_string().as_bytes())
        );
        assert_eq!(code(&v, &as_pss).await, "jwt_signature_invalid");
    }

    #[tokio::test]
    async fn tokens_minted_by_jsonwebtoken_verify() {
        use jsonwebtoken::{Algorithm, EncodingKey, Header, encode};
        let (p256, p384, rsa, ed) = (
            TestKey::p256("a"),
            TestKey::p384("b"),
            TestKey::rsa("c"),
            TestKey::ed25519("d"),
        );
        let v = file_verifier(ALL, &jwks(&[&p256, &p384, &rsa, &ed]));
        for (alg, key, enc) in [
            (Algorithm::ES256, &p256, EncodingKey::from_ec_der(&p256.der)),
            (Algorithm::ES384, &p384, EncodingKey::from_ec_der(&p384.der)),
            (Algorithm::RS256, &rsa, EncodingKey::from_rsa_der(&rsa.der)),
            (Algorithm::RS512, &rsa, EncodingKey::from_rsa_der(&rsa.der)),
            (Algorithm::PS256, &rsa, EncodingKey::from_rsa_der(&rsa.der)),
            (Algorithm::EdDSA, &ed, EncodingKey::from_ed_der(&ed.der)),
        ] {
            let mut header = Header::new(alg);
            header.kid = Some(key.kid.clone());
            let token = encode(&header, &claims(), &enc).unwrap();
            let got = v.verify(&token, NOW).await.unwrap();
            assert_eq!(
                (got.algorithm.as_str(), got.device_claim.as_str()),
                (format!("{alg:?}").as_str(), "440103123456789")
            );
            // One flipped claim byte breaks it.
            let (h, rest) = token.split_once('.').unwrap();
            let (p, s) = rest.split_once('.').unwrap();
            let forged_payload = String::from_utf8(URL_SAFE_NO_PAD.decode(p).unwrap())
                .unwrap()
                .replace("440103123456789", "440103123456780");
            let forged = format!("{h}.{}.{s}", b64(forged_payload.as_bytes()));
            assert_eq!(code(&v, &forged).await, "jwt_signature_invalid", "{alg:?}");
        }
    }

    #[tokio::test]
    async fn alg_none_and_hmac_with_the_public_key_are_refused() {
        let key = TestKey::p256("k1");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        let body = b64(claims().to_string().as_bytes());
        for none in ["none", "None", "NONE"] {
            let h = b64(json!({"alg": none, "kid": "k1"}).to_string().as_bytes());
            assert_eq!(
                code(&v, &format!("{h}.{body}.")).await,
                "jwt_algorithm_refused"
            );
            assert_eq!(
                code(&v, &format!("{h}.{body}.c2ln")).await,
                "jwt_algorithm_refused"
            );
        }
        // The classic confusion: HS256 "signed" with the issuer's public key
        // material as the HMAC secret, in every form an attacker can find.
        let jwk = key.jwk();
        let point = match &key.signer {
            Signer::Ec(pair, _) => pair.public_key().as_ref().to_vec(),
            _ => unreachable!(),
        };
        let secrets: [Vec<u8>; 3] = [
            point,
            jwk.to_string().into_bytes(),
            jwk["x"].as_str().unwrap().as_bytes().to_vec(),
        ];
        for alg in ["HS256", "HS384", "HS512", "hs256"] {
            for secret in &secrets {
                let h = b64(json!({"alg": alg, "kid": "k1", "typ": "JWT"})
                    .to_string()
                    .as_bytes());
                let input = format!("{h}.{body}");
                let hkey = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
                let tag = ring::hmac::sign(&hkey, input.as_bytes());
                let token = format!("{input}.{}", b64(tag.as_ref()));
                assert_eq!(code(&v, &token).await, "jwt_algorithm_refused", "{alg}");
            }
        }
        // Even a JWKS that offers an HMAC (`oct`) key cannot enable it: such
        // keys are never loaded.
        let mut doc = jwks(&[&key]);
        doc["keys"]
            .as_array_mut()
            .unwrap()
            .push(json!({"kty": "oct", "kid": "shared", "k": b64(b"secret"), "alg": "HS256"}));
        let v = file_verifier(&["ES256"], &doc);
        let h = b64(json!({"alg": "HS256", "kid": "shared"})
            .to_string()
            .as_bytes());
        let input = format!("{h}.{body}");
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"secret"),
            input.as_bytes(),
        );
        assert_eq!(
            code(&v, &format!("{input}.{}", b64(tag.as_ref()))).await,
            "jwt_algorithm_refused"
        );
        // And a policy cannot list HMAC (belt and braces: policy load refuses it too).
        let e = JwtVerifier::new(&policy(&["HS256"]), None, client()).unwrap_err();
        assert_eq!(e.code(), "jwt_policy_invalid");
        assert!(!e.is_client_error());
    }

    #[tokio::test]
    async fn algorithm_must_be_allowed_and_fit_the_key() {
        let (p256, p384, ed) = (
            TestKey::p256("ec256"),
            TestKey::p384("ec384"),
            TestKey::ed25519("ed"),
        );
        let rsa = TestKey::rsa("rsa");
        let mut rsa_jwk = rsa.jwk();
        rsa_jwk["alg"] = json!("RS256");
        let doc = json!({"keys": [p256.jwk(), p384.jwk(), ed.jwk(), rsa_jwk]});

        // Not in the group's list, though the key would fit.
        let v = file_verifier(&["ES256"], &doc);
        assert_eq!(
            code(&v, &p384.mint("ES384", &claims())).await,
            "jwt_algorithm_refused"
        );
        assert_eq!(
            code(&v, &rsa.mint("RS256", &claims())).await,
            "jwt_algorithm_refused"
        );
        // Names are case-sensitive and unknown names are refused.
        assert_eq!(
            code(&v, &p256.mint("es256", &claims())).await,
            "jwt_algorithm_refused"
        );
        assert_eq!(
            code(&v, &p256.mint("ES512", &claims())).await,
            "jwt_algorithm_refused"
        );
        for odd in ["", "H", "é", "€S256", "HŠ256"] {
            let token = p256.mint_with(json!({"alg": odd, "kid": "ec256"}), &claims());
            assert_eq!(code(&v, &token).await, "jwt_algorithm_refused", "{odd:?}");
        }

        let v = file_verifier(ALL, &doc);
        // Allowed, but the named key is of another type or curve.
        let header = |alg: &str, kid: &str| json!({"alg": alg, "kid": kid});
        for (alg, kid, signer) in [
            ("ES384", "ec256", &p384),
            ("ES256", "ec384", &p256),
            ("EdDSA", "ec256", &ed),
            ("ES256", "ed", &p256),
            ("RS256", "ec256", &rsa),
            // The JWK says RS256: PS256 with the same RSA key is refused.
            ("PS256", "rsa", &rsa),
        ] {
            let token = signer.mint_with(header(alg, kid), &claims());
            assert_eq!(
                code(&v, &token).await,
                "jwt_algorithm_refused",
                "{alg} with {kid}"
            );
        }
        assert!(v.verify(&rsa.mint("RS256", &claims()), NOW).await.is_ok());
        // Header `alg` must be a string.
        let token = p256.mint_with(json!({"alg": ["ES256"], "kid": "ec256"}), &claims());
        assert_eq!(code(&v, &token).await, "jwt_malformed");
    }

    #[tokio::test]
    async fn forged_signatures_are_refused() {
        let key = TestKey::p256("k1");
        let attacker = TestKey::p256("k1");
        let v = file_verifier(&["ES256", "EdDSA"], &jwks(&[&key]));
        // Another key, claiming the issuer's kid.
        assert_eq!(
            code(&v, &attacker.mint("ES256", &claims())).await,
            "jwt_signature_invalid"
        );
        // A genuine signature over other claims.
        let genuine = key.mint("ES256", &claims());
        let other = key.mint(
            "ES256",
            &claims_with(|c| {
                c.insert("imsi".into(), json!("999999999999999"));
            }),
        );
        let (g_input, g_sig) = genuine.rsplit_once('.').unwrap();
        let (o_input, _) = other.rsplit_once('.').unwrap();
        assert_eq!(
            code(&v, &format!("{o_input}.{g_sig}")).await,
            "jwt_signature_invalid"
        );
        // Truncated, empty, DER-encoded-size and doubled signatures.
        let raw = URL_SAFE_NO_PAD.decode(g_sig).unwrap();
        for bad in [
            &raw[..63],
            &[][..],
            &[raw.clone(), raw.clone()].concat()[..],
        ] {
            assert_eq!(
                code(&v, &format!("{g_input}.{}", b64(bad))).await,
                "jwt_signature_invalid"
            );
        }
        assert!(v.verify(&genuine, NOW).await.is_ok());
    }

    #[tokio::test]
    async fn keys_in_the_token_header_are_never_trusted() {
        let key = TestKey::p256("k1");
        let attacker = TestKey::p256("evil");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        for (kid, want) in [("k1", "jwt_signature_invalid"), ("evil", "jwt_unknown_key")] {
            let token = attacker.mint_with(
                json!({"alg": "ES256", "kid": kid, "jwk": attacker.jwk(),
                       "jku": "http://127.0.0.1:1/jwks.json", "x5u": "http://127.0.0.1:1/c.pem"}),
                &claims(),
            );
            assert_eq!(code(&v, &token).await, want, "{kid}");
        }
    }

    #[tokio::test]
    async fn time_claims_allow_the_configured_leeway() {
        let key = TestKey::p256("k1");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        let with = |name: &str, value: Value| {
            key.mint(
                "ES256",
                &claims_with(|c| {
                    c.insert(name.into(), value);
                }),
            )
        };
        // exp + leeway must lie after now (leeway 60).
        assert_eq!(code(&v, &with("exp", json!(NOW - 60))).await, "jwt_expired");
        assert_eq!(
            code(&v, &with("exp", json!(NOW - 3600))).await,
            "jwt_expired"
        );
        assert!(v.verify(&with("exp", json!(NOW - 59)), NOW).await.is_ok());
        assert!(
            v.verify(&with("exp", json!(NOW as f64 + 0.5)), NOW)
                .await
                .is_ok()
        );
        // The same token, later, on the verifier's clock.
        let token = with("exp", json!(NOW + 300));
        assert!(v.verify(&token, NOW + 359).await.is_ok());
        assert_eq!(code_at(&v, &token, NOW + 360).await, "jwt_expired");
        // nbf / iat no later than now + leeway.
        for name in ["nbf", "iat"] {
            assert_eq!(
                code(&v, &with(name, json!(NOW + 61))).await,
                "jwt_not_yet_valid",
                "{name}"
            );
            assert!(
                v.verify(&with(name, json!(NOW + 60)), NOW).await.is_ok(),
                "{name}"
            );
        }
        // Not numbers.
        assert_eq!(
            code(&v, &with("exp", json!("1800000300"))).await,
            "jwt_malformed"
        );
        assert_eq!(code(&v, &with("nbf", json!(null))).await, "jwt_malformed");
        // Extreme values do not overflow.
        assert!(v.verify(&with("exp", json!(u64::MAX)), NOW).await.is_ok());
        assert_eq!(code(&v, &with("exp", json!(i64::MIN))).await, "jwt_expired");
        assert_eq!(
            code(&v, &with("nbf", json!(1e300))).await,
            "jwt_not_yet_valid"
        );
    }

    #[tokio::test]
    async fn issuer_and_audience_must_match_the_group() {
        let key = TestKey::p256("k1");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        let with = |edit: &dyn Fn(&mut Map<String, Value>)| key.mint("ES256", &claims_with(edit));
        for (edit, want) in [
            (
                &(|c: &mut Map<String, Value>| {
                    c.insert("iss".into(), json!("https://other.example/v1"));
                }) as &dyn Fn(&mut Map<String, Value>),
                "jwt_wrong_issuer",
            ),
            (
                &|c| {
                    c.remove("iss");
                },
                "jwt_wrong_issuer",
            ),
            (
                &|c| {
                    c.insert("aud".into(), json!("someone-else"));
                },
                "jwt_wrong_audience",
            ),
            (
                &|c| {
                    c.insert("aud".into(), json!(["a", "b"]));
                },
                "jwt_wrong_audience",
            ),
            (
                &|c| {
                    c.insert("aud".into(), json!([]));
                },
                "jwt_wrong_audience",
            ),
            (
                &|c| {
                    c.remove("aud");
                },
                "jwt_wrong_audience",
            ),
            (
                &|c| {
                    c.insert("aud".into(), json!(["a", 7]));
                },
                "jwt_malformed",
            ),
        ] {
            assert_eq!(code(&v, &with(edit)).await, want);
        }
        let many = with(&|c| {
            c.insert("aud".into(), json!(["other", AUD]));
        });
        assert!(v.verify(&many, NOW).await.is_ok());
    }

    #[tokio::test]
    async fn jti_exp_and_the_device_claim_are_required() {
        let key = TestKey::p256("k1");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        let with = |name: &str, value: Option<Value>| {
            key.mint(
                "ES256",
                &claims_with(|c| {
                    match value {
                        Some(value) => c.insert(name.into(), value),
                        None => c.remove(name),
                    };
                }),
            )
        };
        for (name, value, want) in [
            ("jti", None, "jwt_claim_missing"),
            ("jti", Some(json!("")), "jwt_claim_missing"),
            ("exp", None, "jwt_claim_missing"),
            ("imsi", None, "jwt_claim_missing"),
            ("imsi", Some(json!(null)), "jwt_claim_missing"),
            ("imsi", Some(json!("")), "jwt_claim_missing"),
            ("jti", Some(json!("x".repeat(129))), "jwt_claim_invalid"),
            ("jti", Some(json!(42)), "jwt_claim_invalid"),
            ("jti", Some(json!("a\nb")), "jwt_claim_invalid"),
            ("imsi", Some(json!("4401\u{202E}03")), "jwt_claim_invalid"),
            ("imsi", Some(json!("9".repeat(129))), "jwt_claim_invalid"),
            ("imsi", Some(json!(4.401e14)), "jwt_claim_invalid"),
            ("imsi", Some(json!({"v": "4401"})), "jwt_claim_invalid"),
            ("imsi", Some(json!(true)), "jwt_claim_invalid"),
        ] {
            assert_eq!(
                code(&v, &with(name, value.clone())).await,
                want,
                "{name}={value:?}"
            );
        }
        // Integers are stringified; 128 characters are fine.
        let got = v
            .verify(&with("imsi", Some(json!(440103123456789u64))), NOW)
            .await
            .unwrap();
        assert_eq!(got.device_claim, "440103123456789");
        let got = v
            .verify(&with("jti", Some(json!("j".repeat(128)))), NOW)
            .await
            .unwrap();
        assert_eq!(got.jti.len(), 128);
        // The claim name comes from the policy.
        let mut p = policy(&["ES256"]);
        p.device_claim = "sub".into();
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("k.json"), jwks(&[&key]).to_string()).unwrap();
        let v = JwtVerifier::new(&p, Some(dir.path().join("k.json")), client()).unwrap();
        let e = v
            .verify(&key.mint("ES256", &claims()), NOW)
            .await
            .unwrap_err();
        assert!(matches!(&e, JwtError::ClaimMissing(c) if c == "sub"), "{e}");
        let got = v
            .verify(&with("sub", Some(json!("dev-1"))), NOW)
            .await
            .unwrap();
        assert_eq!(got.device_claim, "dev-1");
    }

    #[tokio::test]
    async fn keys_are_selected_by_kid() {
        let (k1, k2) = (TestKey::p256("k1"), TestKey::p256("k2"));
        let two = file_verifier(&["ES256"], &jwks(&[&k1, &k2]));
        assert!(two.verify(&k2.mint("ES256", &claims()), NOW).await.is_ok());
        let unknown = k1.mint_with(json!({"alg": "ES256", "kid": "k3"}), &claims());
        assert_eq!(code(&two, &unknown).await, "jwt_unknown_key");
        // No kid: only a JWKS with exactly one usable key decides.
        let no_kid = k1.mint_with(json!({"alg": "ES256"}), &claims());
        assert_eq!(code(&two, &no_kid).await, "jwt_unknown_key");
        let one = file_verifier(&["ES256"], &jwks(&[&k1]));
        let got = one.verify(&no_kid, NOW).await.unwrap();
        assert_eq!(got.kid, None);
        // A JWK without kid is not found by a token that names one.
        let mut anonymous = k1.jwk();
        anonymous.as_object_mut().unwrap().remove("kid");
        let v = file_verifier(&["ES256"], &json!({"keys": [anonymous]}));
        assert_eq!(
            code(&v, &k1.mint("ES256", &claims())).await,
            "jwt_unknown_key"
        );
        assert!(v.verify(&no_kid, NOW).await.is_ok());
        // kid must be a non-empty string.
        for kid in [json!(""), json!(7), json!("k".repeat(257))] {
            let t = k1.mint_with(json!({"alg": "ES256", "kid": kid}), &claims());
            assert_eq!(code(&one, &t).await, "jwt_malformed");
        }
    }

    #[tokio::test]
    async fn malformed_tokens_are_refused() {
        let key = TestKey::p256("k1");
        let v = file_verifier(&["ES256"], &jwks(&[&key]));
        let good = key.mint("ES256", &claims());
        let (h, rest) = good.split_once('.').unwrap();
        let (p, s) = rest.split_once('.').unwrap();
        let too_long = key.mint(
            "ES256",
            &claims_with(|c| {
                c.insert("pad".into(), json!("x".repeat(MAX_TOKEN_BYTES)));
            }),
        );
        for bad in [
            String::new(),
            "abc".into(),
            format!("{h}.{p}"),
            format!("{h}.{p}.{s}.{s}.{s}"),
            format!("{h}.{p}.{s}="),
            format!("{h}=.{p}.{s}"),
            format!("{h}.{p}!.{s}"),
            format!("{}.{p}.{s}", b64(b"[\"ES256\"]")),
            format!("{}.{p}.{s}", b64(b"{\"alg\":\"ES256\"")),
            too_long,
            // Duplicate members: which `alg` would another parser pick?
            key.mint_raw(
                r#"{"alg":"ES256","kid":"k1","alg":"none"}"#,
                &claims().to_string(),
            ),
            // Critical extensions are not understood.
            key.mint_with(
                json!({"alg": "ES256", "kid": "k1", "crit": ["b64"], "b64": false}),
                &claims(),
            ),
            // A correctly signed payload that is not a claims object, or
            // has duplicate claims.
            key.mint_raw(r#"{"alg":"ES256","kid":"k1"}"#, "[1,2]"),
            key.mint_raw(
                r#"{"alg":"ES256","kid":"k1"}"#,
                &format!(
                    r#"{{"iss":"{ISS}","aud":"{AUD}","exp":{},"jti":"a","imsi":"1","imsi":"2"}}"#,
                    NOW + 60
                ),
            ),
        ] {
            assert_eq!(code(&v, &bad).await, "jwt_malformed", "{bad:.80}");
        }
        // Whitespace around the token (a file with a newline) is fine.
        assert!(v.verify(&format!(" {good}\n"), NOW).await.is_ok());
    }

    #[test]
    fn peek_gives_the_unverified_issuer_and_audiences() {
        let key = TestKey::p256("k1");
        assert_eq!(
            JwtVerifier::peek_issuer_audience(&key.mint("ES256", &claims())).unwrap(),
            (ISS.to_string(), vec![AUD.to_string()])
        );
        let t = key.mint(
            "ES256",
            &claims_with(|c| {
                c.insert("aud".into(), json!(["x", "y"]));
            }),
        );
        assert_eq!(
            JwtVerifier::peek_issuer_audience(&t).unwrap().1,
            vec!["x".to_string(), "y".to_string()]
        );
        let t = key.mint(
            "ES256",
            &claims_with(|c| {
                c.remove("aud");
                c.remove("iss");
            }),
        );
        assert_eq!(
            JwtVerifier::peek_issuer_audience(&t).unwrap_err().code(),
            "jwt_claim_missing"
        );
        assert_eq!(
            JwtVerifier::peek_issuer_audience("x.y.z")
                .unwrap_err()
                .code(),
            "jwt_malformed"
        );
    }

    #[test]
    fn jwks_parsing_keeps_only_usable_signature_keys() {
        let (k1, ed) = (TestKey::p256("k1"), TestKey::ed25519("ed"));
        let rsa = TestKey::rsa("rsa");
        let mut enc = k1.jwk();
        enc["use"] = json!("enc");
        enc["kid"] = json!("enc");
        let mut sig_use = ed.jwk();
        sig_use["use"] = json!("sig");
        sig_use["key_ops"] = json!(["verify"]);
        let mut sign_only = k1.jwk();
        sign_only["key_ops"] = json!(["sign"]);
        let mut wrong_alg = k1.jwk();
        wrong_alg["alg"] = json!("RS256");
        let mut unknown_alg = k1.jwk();
        unknown_alg["alg"] = json!("ES512");
        let mut off_curve = k1.jwk();
        off_curve["y"] = json!(b64(&[7u8; 32]));
        let mut small_rsa = rsa.jwk();
        small_rsa["n"] = json!(b64(&[0xC5; 128]));
        let mut padded_rsa = rsa.jwk();
        let n = URL_SAFE_NO_PAD
            .decode(padded_rsa["n"].as_str().unwrap())
            .unwrap();
        padded_rsa["n"] = json!(b64(&[&[0u8][..], &n].concat()));
        let doc = json!({"keys": [
            enc, sig_use, sign_only, wrong_alg, unknown_alg, off_curve, small_rsa, padded_rsa,
            {"kty": "oct", "k": "c2VjcmV0"},
            {"kty": "RSA", "n": "AAAA", "e": "AQAB"},
            {"kty": "RSA", "n": rsa.jwk()["n"], "e": "AAAA"},
            {"kty": "RSA", "n": rsa.jwk()["n"], "e": "AQAA"},
            {"kty": "EC", "crv": "P-521", "x": "AA", "y": "AA"},
            {"kty": "OKP", "crv": "Ed448", "x": "AA"},
            {"kty": "EC", "crv": "P-256", "x": 1, "y": 2},
            "not an object",
        ]});
        let set = parse_jwks(doc.to_string().as_bytes()).unwrap();
        let kinds: Vec<_> = set
            .keys
            .iter()
            .map(|k| (k.kid.clone(), k.key.clone()))
            .collect();
        assert_eq!(kinds.len(), 2, "{kinds:?}");
        assert_eq!(kinds[0].0.as_deref(), Some("ed"));
        assert!(
            matches!(&kinds[1], (Some(kid), PublicKey::Rsa { n: got, .. }) if kid == "rsa" && *got == n)
        );
    }

    #[test]
    fn unusable_policies_are_setup_errors() {
        let dir = tempfile::tempdir().unwrap();
        let write = |name: &str, text: &str| {
            let p = dir.path().join(name);
            std::fs::write(&p, text).unwrap();
            Some(p)
        };
        let only_secret =
            json!({"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "s"}]}).to_string();
        let huge = format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(MAX_JWKS_BYTES));
        for (file, what) in [
            (Some(dir.path().join("missing.json")), "cannot read"),
            (write("a.json", "not json"), "not a JWKS JSON"),
            (write("b.json", "{\"kty\": \"EC\"}"), "no `keys` array"),
            (write("c.json", &only_secret), "no usable signature key"),
            (write("d.json", &huge), "larger than"),
        ] {
            let e = JwtVerifier::new(&policy(&["ES256"]), file, client()).unwrap_err();
            assert_eq!(
                (e.code(), e.is_client_error()),
                ("jwt_policy_invalid", false)
            );
            let chain = format!(
                "{e}: {}",
                std::error::Error::source(&e)
                    .map(|s| s.to_string())
                    .unwrap_or_default()
            );
            assert!(chain.contains(what), "{chain}");
        }
        let e = JwtVerifier::new(&policy(&["ES256"]), None, client()).unwrap_err();
        assert!(
            matches!(e, JwtError::Setup(SetupError::NoJwksSource)),
            "{e}"
        );
        let e = JwtVerifier::new(
            &policy(&["ES256", "PS512"]),
            write("e.json", "{}"),
            client(),
        )
        .unwrap_err();
        assert!(matches!(e, JwtError::Setup(SetupError::UnknownAlgorithm(a)) if a == "PS512"));
    }

    #[test]
    fn jwks_urls_must_be_https_or_loopback_http() {
        for ok in [
            "https://endorse.example/.well-known/jwks.json",
            "https://203.0.113.9:8443/jwks",
            "http://127.0.0.1:8080/jwks.json",
            "http://127.9.9.9/jwks.json",
            "http://[::1]:9000/jwks",
        ] {
            assert!(check_jwks_url(ok).is_ok(), "{ok}");
            let mut p = policy(&["ES256"]);
            p.jwks_url = Some(ok.into());
            assert!(JwtVerifier::new(&p, None, client()).is_ok(), "{ok}");
        }
        for bad in [
            "http://endorse.example/jwks.json",
            "http://localhost/jwks.json",
            "http://10.0.0.1/jwks.json",
            "http://[::ffff:10.0.0.1]/jwks",
            "ftp://127.0.0.1/jwks.json",
            "file:///etc/keyward/jwks.json",
            "https://user:pw@endorse.example/jwks",
            "/relative/jwks.json",
        ] {
            let mut p = policy(&["ES256"]);
            p.jwks_url = Some(bad.into());
            let e = JwtVerifier::new(&p, None, client()).unwrap_err();
            assert!(
                matches!(e, JwtError::Setup(SetupError::BadUrl(_))),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn the_verifier_is_shareable_across_tasks() {
        fn send_sync<T: Send + Sync>() {}
        fn send<T: Send>(_: &T) {}
        send_sync::<JwtVerifier>();
        let v = file_verifier(&["ES256"], &jwks(&[&TestKey::p256("k")]));
        send(&v.verify("x", NOW));
    }

    /// A JWKS endpoint on a real loopback socket whose answer the test sets,
    /// counting requests.
    struct JwksServer {
        url: String,
        answer: Arc<std::sync::Mutex<(u16, String)>>,
        hits: Arc<std::sync::atomic::AtomicUsize>,
        task: tokio::task::JoinHandle<()>,
    }

    impl JwksServer {
        async fn start(status: u16, body: String) -> Self {
            use axum::{Router, extract::State, http::StatusCode, routing::get};
            type Shared = (
                Arc<std::sync::Mutex<(u16, String)>>,
                Arc<std::sync::atomic::AtomicUsize>,
            );
            let answer = Arc::new(std::sync::Mutex::new((status, body)));
            let hits = Arc::new(std::sync::atomic::AtomicUsize::new(0));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let url = format!("http://{addr}/jwks.json");
            // A redirect to the same document, but by a URL the policy
            // could not name (credentials in it).
            let moved = format!("http://user:pw@{addr}/jwks.json");
            let app = Router::new()
                .route(
                    "/moved",
                    get(move || async move {
                        (StatusCode::FOUND, [(axum::http::header::LOCATION, moved)])
                    }),
                )
                .route(
                    "/jwks.json",
                    get(|State((answer, hits)): State<Shared>| async move {
                        hits.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                        let (status, body) = answer.lock().unwrap().clone();
                        (StatusCode::from_u16(status).unwrap(), body)
                    }),
                )
                .with_state((answer.clone(), hits.clone()));
            let task = tokio::spawn(async move {
                axum::serve(listener, app).await.unwrap();
            });
            Self {
                url,
                answer,
                hits,
                task,
            }
        }
        fn set(&self, status: u16, body: String) {
            *self.answer.lock().unwrap() = (status, body);
        }
        fn hits(&self) -> usize {
            self.hits.load(std::sync::atomic::Ordering::SeqCst)
        }
    }

    impl Drop for JwksServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    fn url_verifier(url: &str) -> JwtVerifier {
        let mut p = policy(&["ES256"]);
        p.jwks_url = Some(url.into());
        p.jwks_refresh_minutes = 60;
        JwtVerifier::new(&p, None, client()).unwrap()
    }

    #[tokio::test]
    async fn jwks_url_is_fetched_lazily_cached_and_refreshed() {
        let (k1, k2, k3, k9) = (
            TestKey::p256("k1"),
            TestKey::p256("k2"),
            TestKey::p256("k3"),
            TestKey::p256("k9"),
        );
        let long = claims_with(|c| {
            c.insert("exp".into(), json!(NOW + 100_000));
        });
        let t = |k: &TestKey| k.mint("ES256", &long);
        let server = JwksServer::start(200, jwks(&[&k1]).to_string()).await;
        let v = url_verifier(&server.url);
        assert_eq!(server.hits(), 0, "fetched before first use");
        // Refused algorithms never cause a fetch.
        let h = b64(json!({"alg": "none", "kid": "k1"}).to_string().as_bytes());
        assert_eq!(
            code(&v, &format!("{h}.{}.", b64(long.to_string().as_bytes()))).await,
            "jwt_algorithm_refused"
        );
        assert_eq!(server.hits(), 0);

        assert!(v.verify(&t(&k1), NOW).await.is_ok());
        assert!(v.verify(&t(&k1), NOW + 1).await.is_ok());
        assert_eq!(server.hits(), 1, "cached");

        // The issuer publishes k2: a token naming it triggers a refresh, but
        // not within a minute of the last fetch.
        server.set(200, jwks(&[&k1, &k2]).to_string());
        assert_eq!(code_at(&v, &t(&k2), NOW + 30).await, "jwt_unknown_key");
        assert_eq!(server.hits(), 1);
        assert!(v.verify(&t(&k2), NOW + 60).await.is_ok());
        assert_eq!(server.hits(), 2, "kid miss refreshed");
        // Random kids cannot make it fetch more than once a minute.
        for dt in [70, 80, 119] {
            assert_eq!(code_at(&v, &t(&k9), NOW + dt).await, "jwt_unknown_key");
        }
        assert_eq!(server.hits(), 2);
        assert_eq!(code_at(&v, &t(&k9), NOW + 120).await, "jwt_unknown_key");
        assert_eq!(server.hits(), 3);
        // Tokens without kid do not trigger a refresh either.
        let no_kid = k1.mint_with(json!({"alg": "ES256"}), &long);
        assert_eq!(code_at(&v, &no_kid, NOW + 200).await, "jwt_unknown_key");
        assert_eq!(server.hits(), 3);

        // The scheduled refresh (60 min after the last fetch) fails: the
        // cached keys keep working, and the failure is not retried at once.
        let last = NOW + 120;
        server.set(500, "oops".into());
        assert!(v.verify(&t(&k1), last + 3600).await.is_ok());
        assert_eq!(server.hits(), 4);
        assert!(v.verify(&t(&k2), last + 3630).await.is_ok());
        assert_eq!(server.hits(), 4);
        // A minute later it is retried; an unusable document is a failure too.
        server.set(
            200,
            json!({"keys": [{"kty": "oct", "k": "AA"}]}).to_string(),
        );
        assert!(v.verify(&t(&k1), last + 3660).await.is_ok());
        assert_eq!(server.hits(), 5);
        // Then the issuer rotates to k3 only: the next refresh drops k1, k2.
        server.set(200, jwks(&[&k3]).to_string());
        assert!(v.verify(&t(&k3), last + 3720).await.is_ok());
        assert_eq!(server.hits(), 6);
        assert_eq!(code_at(&v, &t(&k1), last + 3730).await, "jwt_unknown_key");
        assert_eq!(server.hits(), 6);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn concurrent_first_use_fetches_once() {
        let k1 = TestKey::p256("k1");
        let server = JwksServer::start(200, jwks(&[&k1]).to_string()).await;
        let v = Arc::new(url_verifier(&server.url));
        let token = Arc::new(k1.mint("ES256", &claims()));
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (v, token) = (v.clone(), token.clone());
                tokio::spawn(async move { v.verify(&token, NOW).await.map(|j| j.jti) })
            })
            .collect();
        for t in tasks {
            assert_eq!(t.await.unwrap().unwrap(), "8d0f7c1e-jti");
        }
        assert_eq!(server.hits(), 1);
    }

    #[tokio::test]
    async fn unreachable_or_bad_jwks_url_refuses_tokens() {
        let k1 = TestKey::p256("k1");
        let token = k1.mint("ES256", &claims());
        // Nothing listens on this port any more.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let v = url_verifier(&format!("http://127.0.0.1:{port}/jwks.json"));
        let e = v.verify(&token, NOW).await.unwrap_err();
        assert!(
            matches!(e, JwtError::KeysUnavailable(JwksError::Http(_))),
            "{e:?}"
        );
        assert_eq!(e.code(), "jwt_unknown_key");
        // Not retried within the minute.
        let e = v.verify(&token, NOW + 59).await.unwrap_err();
        assert!(
            matches!(e, JwtError::KeysUnavailable(JwksError::Backoff)),
            "{e:?}"
        );

        let server = JwksServer::start(404, "no".into()).await;
        let v = url_verifier(&server.url);
        let e = v.verify(&token, NOW).await.unwrap_err();
        assert!(
            matches!(e, JwtError::KeysUnavailable(JwksError::Status(404))),
            "{e:?}"
        );
        server.set(
            200,
            format!("{{\"keys\":[],\"pad\":\"{}\"}}", "x".repeat(MAX_JWKS_BYTES)),
        );
        let e = v.verify(&token, NOW + 60).await.unwrap_err();
        assert!(
            matches!(e, JwtError::KeysUnavailable(JwksError::TooLarge)),
            "{e:?}"
        );
        // Once the JWKS is served, the next attempt succeeds.
        server.set(200, jwks(&[&k1]).to_string());
        assert!(v.verify(&token, NOW + 120).await.is_ok());
        assert_eq!(server.hits(), 3);
        // A redirect is checked like the configured URL.
        let v = url_verifier(&server.url.replace("/jwks.json", "/moved"));
        let e = v.verify(&token, NOW).await.unwrap_err();
        assert!(
            matches!(e, JwtError::KeysUnavailable(JwksError::Redirected(_))),
            "{e:?}"
        );
    }
}
