//! The OCSP responder (RFC 6960): matches CertIDs to keyward's issuing CAs,
//! reads certificate statuses from the store, and signs answers with each
//! CA's delegated signer ([`super::ocsp_signer`]).
//!
//! Load on the responder must not become load on the HSM:
//! - a request for one CertID without a nonce is answered from a bounded
//!   in-memory cache of pre-signed responses, each signed once and served
//!   until `nextUpdate - ocsp_refresh_before_minutes` (a cache hit touches
//!   neither the store nor the HSM); concurrent misses for one CertID sign
//!   once (a per-key in-flight guard), and a response past its refresh time
//!   but still valid is served while one request re-signs it;
//! - a nonce (RFC 8954) or several CertIDs need a fresh signature: those
//!   take one event from the requesting source's `ocsp_fresh` bucket. Over
//!   it, a single-CertID request gets the cached response without the nonce
//!   (RFC 8954 §2.1 lets a responder ignore the nonce), a multi-CertID
//!   request `tryLater`;
//! - misses for serials keyward never issued (a flood of made-up serials)
//!   take from the same bucket, since nothing useful can be cached for them.
//!
//! The cache forgets a serial when [`RevocationObserver::revocation_changed`]
//! reports it, and everything when a signer is replaced. An epoch counter,
//! read before the store and checked before caching, keeps a response
//! signed from a status read before an invalidation out of the cache.
//!
//! With `[redis]`, a second, shared level sits behind the in-memory one
//! ([`Responder::with_shared`]): a response one daemon signed is served by
//! every daemon without another HSM signature. Other daemons learn of a
//! status change through the invalidation bus ([`Responder::forget`],
//! [`Responder::forget_all`]); the shared entries are guarded by a marker
//! per serial (`ocsp-gen:<serial>`, rewritten by every status change):
//! an entry records the marker it saw before its status was read, and is
//! served only while the marker is unchanged — read in the same `MGET` —
//! so a response signed from a status read before a revocation can never
//! be served after it, however the daemons interleave. The in-memory level
//! is unchanged: a hit costs no Redis round trip.

use super::ocsp::{
    self, CertId, CertStatus, HashAlgorithm, IssuerId, OcspError, OcspRequest, RequestLimits,
    ResponseData, SingleResponse,
};
use super::ocsp_signer::OcspSigner;
use super::serial::Serial;
use super::{CaError, CaService, RevocationObserver};
use crate::cache::Cache as SharedCache;
use crate::clock::Clock;
use crate::metrics::ocsp::{CacheResult, OcspOutcome};
use crate::metrics::{CacheLookup, Metrics};
use crate::ratelimit::{Limit, RateLimiter, key as limit_key, source_of};
use crate::store::{CertificateStatus, Store};
use bytes::Bytes;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

/// Largest request accepted (DER; the GET form is bounded by its encoding of this).
pub const MAX_REQUEST_BYTES: usize = 4096;
/// Most CertIDs in one request.
pub const MAX_CERT_IDS: usize = 10;

/// What the responder is configured with.
#[derive(Debug, Clone, Copy)]
pub struct ResponderSettings {
    /// Most cached responses (one per CertID hash algorithm and serial).
    pub cache_entries: usize,
    /// Freshly signed responses (nonce, several CertIDs, unknown serials) per source.
    pub fresh_per_source: Limit,
}

/// Why a request got no signed answer, as the HTTP layer needs to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Not a valid request (`malformedRequest`).
    Malformed,
    /// Over [`MAX_REQUEST_BYTES`] (`malformedRequest`).
    TooLarge,
    /// A CertID of an issuer this responder does not answer for (`unauthorized`).
    Unauthorized,
    /// Over the per-source limit on fresh signatures (`tryLater`).
    RateLimited { retry_after: Duration },
    /// No signer, or the HSM or store is unavailable (`tryLater`).
    TryLater,
    /// A bug or an encoding failure (`internalError`).
    Internal,
}

/// The answer to one request: the OCSPResponse DER and how to send it.
#[derive(Debug, Clone)]
pub struct OcspAnswer {
    pub body: Bytes,
    /// `None` for a signed response; else why not, with its stable code.
    pub refused: Option<(Refusal, &'static str)>,
    /// Seconds until the response's nextUpdate, for a response without a
    /// nonce that any client may be given (`Cache-Control: max-age`).
    pub max_age: Option<u64>,
}

/// A request as it arrived.
#[derive(Debug, Clone, Copy)]
pub enum RequestForm<'a> {
    /// The POST body.
    Der(&'a [u8]),
    /// The GET path segment (URL-encoded base64).
    Get(&'a str),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
struct CacheKey {
    issuer: u32,
    hash: HashAlgorithm,
    serial: Serial,
}

#[derive(Debug, Clone)]
struct Cached {
    body: Bytes,
    /// Re-sign from this time on.
    refresh_at: i64,
    next_update: i64,
    outcome: OcspOutcome,
}

const SHARDS: usize = 32;

/// Bounded, sharded map of pre-signed responses.
struct Cache {
    shards: Vec<RwLock<HashMap<CacheKey, Cached>>>,
    per_shard: usize,
    hasher: RandomState,
}

impl Cache {
    fn new(entries: usize) -> Self {
        Self {
            shards: (0..SHARDS).map(|_| RwLock::new(HashMap::new())).collect(),
            per_shard: entries.div_ceil(SHARDS).max(1),
            hasher: RandomState::new(),
        }
    }

    fn shard(&self, k: &CacheKey) -> &RwLock<HashMap<CacheKey, Cached>> {
        &self.shards[(self.hasher.hash_one(k) as usize) % SHARDS]
    }

    fn get(&self, k: &CacheKey) -> Option<Cached> {
        let g = self.shard(k).read().unwrap_or_else(|p| p.into_inner());
        g.get(k).cloned()
    }

    /// Inserts unless `still_valid` (checked under the shard lock, so an
    /// invalidation either sees the entry or stops it) says no.
    fn insert_if(&self, k: CacheKey, v: Cached, now: i64, still_valid: impl FnOnce() -> bool) {
        let mut g = self.shard(&k).write().unwrap_or_else(|p| p.into_inner());
        if !still_valid() {
            return;
        }
        if !g.contains_key(&k) && g.len() >= self.per_shard {
            // Expired ones first; if none, any one (the next request for it
            // is a miss, nothing worse).
            g.retain(|_, c| c.next_update > now);
            if g.len() >= self.per_shard
                && let Some(victim) = g.keys().next().copied()
            {
                g.remove(&victim);
            }
        }
        g.insert(k, v);
    }

    fn remove(&self, k: &CacheKey) {
        let mut g = self.shard(k).write().unwrap_or_else(|p| p.into_inner());
        g.remove(k);
    }

    fn clear(&self) {
        for s in &self.shards {
            s.write().unwrap_or_else(|p| p.into_inner()).clear();
        }
    }

    fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.read().unwrap_or_else(|p| p.into_inner()).len())
            .sum()
    }
}

/// One key of an issuing CA the responder answers for: the active key
/// (answered by its delegated signer), or a retired key after a rotation
/// (answered by that key itself, for the certificates it issued).
struct Slot {
    name: String,
    /// The CA key whose certificates this slot answers for.
    key_id: uuid::Uuid,
    signer: Arc<OcspSigner>,
}

/// The CAs answered for, by the issuer ids a CertID can carry.
#[derive(Default)]
struct Table {
    ids: HashMap<IssuerId, u32>,
    slots: Vec<Slot>,
}

pub struct Responder {
    ca: Arc<CaService>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    limiter: Arc<dyn RateLimiter>,
    metrics: Arc<Metrics>,
    settings: ResponderSettings,
    limits: RequestLimits,
    table: RwLock<Arc<Table>>,
    cache: Cache,
    inflight: Mutex<HashMap<CacheKey, Arc<tokio::sync::Mutex<()>>>>,
    epoch: AtomicU64,
    /// One signer refresh at a time.
    refreshing: tokio::sync::Mutex<()>,
    /// The shared level (`[redis]`); `None`: in memory only.
    shared: Option<Arc<dyn SharedCache>>,
}

/// Outcome of one signing attempt, before it becomes an answer.
type Signed = Result<(Bytes, OcspOutcome, i64), OcspError>;

fn outcome_of(status: CertStatus) -> OcspOutcome {
    match status {
        CertStatus::Good => OcspOutcome::Good,
        CertStatus::Revoked { .. } => OcspOutcome::Revoked,
        CertStatus::Unknown => OcspOutcome::Unknown,
    }
}

fn refusal_of(e: &OcspError) -> Refusal {
    match e {
        OcspError::TooLarge { .. } => Refusal::TooLarge,
        OcspError::Unauthorized => Refusal::Unauthorized,
        OcspError::TryLater => Refusal::TryLater,
        OcspError::Internal => Refusal::Internal,
        _ => Refusal::Malformed,
    }
}

impl Responder {
    /// A responder with no signers yet; [`Responder::refresh_signers`] loads
    /// or makes them.
    pub fn new(
        ca: Arc<CaService>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        limiter: Arc<dyn RateLimiter>,
        metrics: Arc<Metrics>,
        settings: ResponderSettings,
    ) -> Self {
        Self {
            ca,
            store,
            clock,
            limiter,
            metrics,
            cache: Cache::new(settings.cache_entries),
            settings,
            limits: RequestLimits {
                max_bytes: MAX_REQUEST_BYTES,
                max_cert_ids: MAX_CERT_IDS,
            },
            table: RwLock::new(Arc::new(Table::default())),
            inflight: Mutex::new(HashMap::new()),
            epoch: AtomicU64::new(0),
            refreshing: tokio::sync::Mutex::new(()),
            shared: None,
        }
    }

    /// Adds the shared level behind the in-memory cache (see the module doc).
    pub fn with_shared(mut self, cache: Arc<dyn SharedCache>) -> Self {
        self.shared = Some(cache);
        self
    }

    /// Another daemon changed `serial`'s status (the invalidation bus): the
    /// in-memory answers for it, under any CA and hash, are dropped.
    pub fn forget(&self, serial_hex: &str) {
        let Ok(serial) = Serial::from_hex(serial_hex) else {
            return;
        };
        let slots = self.table().slots.len();
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for issuer in 0..slots {
            for hash in [HashAlgorithm::Sha1, HashAlgorithm::Sha256] {
                self.cache.remove(&CacheKey {
                    issuer: issuer as u32,
                    hash,
                    serial,
                });
            }
        }
    }

    /// Invalidations may have been missed (the bus reconnected): every
    /// in-memory answer is dropped. The shared level needs nothing: its
    /// markers are in Redis with the entries.
    pub fn forget_all(&self) {
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.cache.clear();
    }

    /// The shared-level key of an answer: by CA name and key, which are
    /// the same on every daemon (slot numbers are not).
    fn shared_key(slot: &Slot, key: &CacheKey) -> String {
        let hash = match key.hash {
            HashAlgorithm::Sha1 => "sha1",
            HashAlgorithm::Sha256 => "sha256",
        };
        format!(
            "ocsp:{}:{}:{hash}:{}",
            slot.name,
            slot.key_id.simple(),
            key.serial.to_hex()
        )
    }

    fn marker_key(serial_hex: &str) -> String {
        format!("ocsp-gen:{serial_hex}")
    }

    /// The shared level's answer and the serial's marker, read together.
    /// `Err`: no shared level, or it failed (then nothing is written to it).
    async fn shared_lookup(
        &self,
        slot: &Slot,
        key: &CacheKey,
        now: i64,
    ) -> Result<(Option<Cached>, Vec<u8>), ()> {
        let shared = self.shared.as_ref().ok_or(())?;
        let entry_key = Self::shared_key(slot, key);
        let marker_key = Self::marker_key(&key.serial.to_hex());
        let got = match shared.get_many(&[&entry_key, &marker_key]).await {
            Ok(g) => g,
            Err(e) => {
                tracing::debug!(error = %e, "shared OCSP cache unavailable");
                self.metrics.cache_request("ocsp", CacheLookup::Error);
                return Err(());
            }
        };
        let mut got = got.into_iter();
        let (entry, marker) = (
            got.next().flatten(),
            got.next().flatten().unwrap_or_default(),
        );
        let hit = entry
            .and_then(|raw| decode_shared(&raw))
            .filter(|(seen, c)| *seen == marker && now < c.refresh_at)
            .map(|(_, c)| c);
        self.metrics.cache_request(
            "ocsp",
            if hit.is_some() {
                CacheLookup::Hit
            } else {
                CacheLookup::Miss
            },
        );
        Ok((hit, marker))
    }

    fn table(&self) -> Arc<Table> {
        self.table
            .read()
            .map(|g| g.clone())
            .unwrap_or_else(|p| p.into_inner().clone())
    }

    /// The active signer of each CA (serial), for operators and tests.
    pub fn signers(&self) -> Vec<Arc<OcspSigner>> {
        self.table()
            .slots
            .iter()
            .map(|s| s.signer.clone())
            .collect()
    }

    /// Cached responses held now.
    pub fn cached_entries(&self) -> usize {
        self.cache.len()
    }

    /// Loads the active signer of every issuing CA from the store, makes the
    /// missing ones, and replaces those policy says are due at `now`. Any
    /// change swaps the signer table and empties the cache. Returns the
    /// names of the CAs whose signer changed.
    ///
    /// Several daemons may share the store: before making or replacing a
    /// signer, the store's active one is read, and used if it is not due
    /// (another daemon made or replaced it); the making itself runs under a
    /// store lease per CA ([`CaService::create_ocsp_signer_once`]), so
    /// daemons starting together make one signer between them; if another
    /// daemon retires the due signer first (our replacement's commit
    /// conflicts), its successor is used.
    pub async fn refresh_signers(&self, actor: &str) -> Result<Vec<String>, CaError> {
        self.refresh(actor, false).await
    }

    /// Like [`Self::refresh_signers`], re-reading every signer from the
    /// store instead of keeping the loaded ones (after a rotation replaced
    /// one outside this responder).
    pub async fn reload_signers(&self, actor: &str) -> Result<Vec<String>, CaError> {
        self.refresh(actor, true).await
    }

    async fn refresh(&self, actor: &str, reload: bool) -> Result<Vec<String>, CaError> {
        let _one = self.refreshing.lock().await;
        let now = self.clock.now().unix_timestamp();
        let renew_before = self.ca.policies().revocation.ocsp_signer_renew_before_days;
        let current = self.table();
        let mut changed = Vec::new();
        let mut slots = Vec::new();
        let mut ids = HashMap::new();
        for issuer in self.ca.ocsp_issuers() {
            // A signer certified by a key the CA no longer has active (a
            // rotation happened) is not reused.
            let mut signer = current
                .slots
                .iter()
                .find(|s| !reload && s.name == issuer.name && s.key_id == issuer.key_id)
                .map(|s| s.signer.clone());
            if signer.as_ref().is_none_or(|s| s.due(now, renew_before))
                && let Some(stored) = self.ca.load_ocsp_signer(&issuer).await?
                && signer.as_ref().is_none_or(|s| s.serial != stored.serial)
            {
                signer = Some(Arc::new(stored));
                changed.push(issuer.name.clone());
            }
            let signer = match signer {
                Some(s) if !s.due(now, renew_before) => s,
                old => {
                    let new = match self
                        .ca
                        .create_ocsp_signer_once(actor, &issuer, old.as_deref(), renew_before)
                        .await
                    {
                        Ok(new) => new,
                        // Another daemon retired `old` first: use its successor.
                        Err(e @ CaError::Store(crate::store::StoreError::Conflict(_))) => {
                            match self.ca.load_ocsp_signer(&issuer).await? {
                                Some(s) if !s.due(now, renew_before) => {
                                    tracing::info!(ca = %issuer.name, serial = %s.serial, "OCSP signer replaced by another daemon; using it");
                                    s
                                }
                                _ => return Err(e),
                            }
                        }
                        Err(e) => return Err(e),
                    };
                    tracing::info!(ca = %issuer.name, serial = %new.serial, replaced = ?old.as_ref().map(|o| o.serial.clone()), "new OCSP signer");
                    if !changed.contains(&issuer.name) {
                        changed.push(issuer.name.clone());
                    }
                    Arc::new(new)
                }
            };
            self.metrics
                .ocsp
                .signer_not_after
                .with_label_values(&[issuer.name.as_str()])
                .set(signer.not_after);
            let summary = super::x509::summarize(&issuer.cert_der)?;
            let index = slots.len() as u32;
            for id in IssuerId::for_issuer(&issuer.subject_der, &summary.spki_der)? {
                ids.insert(id, index);
            }
            slots.push(Slot {
                name: issuer.name.clone(),
                key_id: issuer.key_id,
                signer,
            });
            for retired in self
                .ca
                .signing_generations(&issuer.name)?
                .into_iter()
                .skip(1)
            {
                let summary = super::x509::summarize(&retired.cert_der)?;
                let index = slots.len() as u32;
                for id in IssuerId::for_issuer(&retired.subject_der, &summary.spki_der)? {
                    ids.insert(id, index);
                }
                if !current.slots.iter().any(|s| s.key_id == retired.key_id) {
                    changed.push(issuer.name.clone());
                }
                slots.push(Slot {
                    name: issuer.name.clone(),
                    key_id: retired.key_id,
                    signer: Arc::new(OcspSigner {
                        issuer_ca: retired.name.clone(),
                        serial: summary.serial_hex.clone(),
                        key_id: retired.key_id,
                        keystore: retired.keystore.clone(),
                        handle: retired.handle.clone(),
                        algorithm: retired.algorithm,
                        cert_der: retired.cert_der.clone(),
                        key_hash: super::ocsp::responder_key_hash(&summary.spki_der)?,
                        not_before: summary.not_before,
                        not_after: summary.not_after,
                    }),
                });
            }
        }
        let same_keys = slots.len() == current.slots.len()
            && slots
                .iter()
                .zip(current.slots.iter())
                .all(|(a, b)| a.key_id == b.key_id);
        if !changed.is_empty() || !same_keys {
            let table = Arc::new(Table { ids, slots });
            match self.table.write() {
                Ok(mut g) => *g = table,
                Err(p) => *p.into_inner() = table,
            }
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.cache.clear();
        }
        Ok(changed)
    }

    /// Answers one request. `source` is the client address (after trusted
    /// proxies), used only when the request needs a fresh signature.
    pub async fn respond(&self, form: RequestForm<'_>, source: Option<IpAddr>) -> OcspAnswer {
        let parsed = match form {
            RequestForm::Der(der) => ocsp::parse_request(der, &self.limits),
            RequestForm::Get(seg) => ocsp::parse_get(seg, &self.limits),
        };
        let req = match parsed {
            Ok(r) => r,
            Err(e) => return self.refuse(&e),
        };
        let table = self.table();
        // Every CertID must name one CA: a BasicOCSPResponse has one signer,
        // and a delegated signer speaks only for its own CA.
        let mut slot = None;
        for id in &req.cert_ids {
            match (table.ids.get(&id.issuer), slot) {
                (Some(i), None) => slot = Some(*i),
                (Some(i), Some(s)) if *i == s => {}
                _ => return self.refuse(&OcspError::Unauthorized),
            }
        }
        let Some(slot) = slot else {
            return self.refuse(&OcspError::NoCertIds);
        };
        let now = self.clock.now().unix_timestamp();
        if req.nonce.is_none() && req.cert_ids.len() == 1 {
            return self
                .cached(&table, slot, &req.cert_ids[0], now, source)
                .await;
        }
        match self.take_fresh(source).await {
            Ok(()) => {
                self.metrics.ocsp.cache(CacheResult::Fresh);
                let signed = self.sign_fresh(&table, slot, &req, now).await;
                self.answer(signed, None)
            }
            Err(retry_after) if req.cert_ids.len() == 1 => {
                // RFC 8954 §2.1: a responder may ignore the nonce.
                self.metrics.ocsp.cache(CacheResult::NonceIgnored);
                let _ = retry_after;
                self.cached(&table, slot, &req.cert_ids[0], now, source)
                    .await
            }
            Err(retry_after) => self.rate_limited(retry_after),
        }
    }

    /// The answer to a body that was cut off at the size limit (never parsed).
    pub fn too_large(&self, size: usize) -> OcspAnswer {
        self.refuse(&OcspError::TooLarge {
            size,
            limit: MAX_REQUEST_BYTES,
        })
    }

    fn rate_limited(&self, retry_after: Duration) -> OcspAnswer {
        self.metrics.ocsp.response(OcspOutcome::TryLater);
        OcspAnswer {
            body: Bytes::from(ocsp::status_response(ocsp::ResponseStatus::TryLater)),
            refused: Some((Refusal::RateLimited { retry_after }, "ocsp_rate_limited")),
            max_age: None,
        }
    }

    fn refuse(&self, e: &OcspError) -> OcspAnswer {
        let refusal = refusal_of(e);
        self.metrics.ocsp.response(match refusal {
            Refusal::Malformed | Refusal::TooLarge => OcspOutcome::Malformed,
            Refusal::Unauthorized => OcspOutcome::Unauthorized,
            Refusal::RateLimited { .. } | Refusal::TryLater => OcspOutcome::TryLater,
            Refusal::Internal => OcspOutcome::Internal,
        });
        OcspAnswer {
            body: Bytes::from(e.to_response()),
            refused: Some((refusal, e.code())),
            max_age: None,
        }
    }

    fn answer(&self, signed: Signed, max_age_from: Option<i64>) -> OcspAnswer {
        match signed {
            Ok((body, outcome, next_update)) => {
                self.metrics.ocsp.response(outcome);
                OcspAnswer {
                    body,
                    refused: None,
                    max_age: max_age_from.map(|now| (next_update - now).max(0) as u64),
                }
            }
            Err(e) => self.refuse(&e),
        }
    }

    /// Takes one event from the source's `ocsp_fresh` bucket; `Err` with the
    /// wait when over it. A failing limiter backend refuses (fail closed).
    async fn take_fresh(&self, source: Option<IpAddr>) -> Result<(), Duration> {
        let key = limit_key(crate::ratelimit::LimitKind::OcspFresh, &source_of(source));
        match self
            .limiter
            .check(&key, self.settings.fresh_per_source)
            .await
        {
            Ok(d) if d.allowed => Ok(()),
            Ok(d) => {
                self.metrics
                    .rate_limited(crate::ratelimit::LimitKind::OcspFresh.as_str());
                Err(d.retry_after)
            }
            Err(e) => {
                tracing::error!(error = %e, "rate limiter unavailable; OCSP fresh signature refused");
                Err(Duration::from_secs(1))
            }
        }
    }

    /// A single nonce-less CertID: from the cache, or signed once and cached.
    async fn cached(
        &self,
        table: &Table,
        slot: u32,
        id: &CertId,
        now: i64,
        source: Option<IpAddr>,
    ) -> OcspAnswer {
        let key = CacheKey {
            issuer: slot,
            hash: id.issuer.hash,
            serial: id.serial,
        };
        let stale = match self.cache.get(&key) {
            Some(c) if now < c.refresh_at => {
                self.metrics.ocsp.cache(CacheResult::Hit);
                return self.answer(Ok((c.body, c.outcome, c.next_update)), Some(now));
            }
            Some(c) if now < c.next_update => Some(c),
            _ => None,
        };
        let guard = {
            let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            g.entry(key).or_default().clone()
        };
        // Someone is re-signing a response that is still valid: serve it.
        let lock = match (&stale, guard.try_lock()) {
            (_, Ok(l)) => l,
            (Some(c), Err(_)) => {
                self.metrics.ocsp.cache(CacheResult::Stale);
                return self.answer(Ok((c.body.clone(), c.outcome, c.next_update)), Some(now));
            }
            (None, Err(_)) => guard.lock().await,
        };
        let result = self.sign_and_cache(table, key, id, now, source).await;
        drop(lock);
        {
            let mut g = self.inflight.lock().unwrap_or_else(|p| p.into_inner());
            if g.get(&key).is_some_and(|m| Arc::ptr_eq(m, &guard)) {
                g.remove(&key);
            }
        }
        match result {
            Ok(c) => self.answer(Ok((c.body, c.outcome, c.next_update)), Some(now)),
            Err(e) => match stale {
                // Better a valid older answer than none.
                Some(c) => self.answer(Ok((c.body, c.outcome, c.next_update)), Some(now)),
                None => match e {
                    Fresh::Limited(d) => self.rate_limited(d),
                    Fresh::Error(e) => self.refuse(&e),
                },
            },
        }
    }

    /// Under the in-flight guard: a hit if another request signed it
    /// meanwhile, else sign, and cache unless an invalidation happened since
    /// the status was read.
    async fn sign_and_cache(
        &self,
        table: &Table,
        key: CacheKey,
        id: &CertId,
        now: i64,
        source: Option<IpAddr>,
    ) -> Result<Cached, Fresh> {
        if let Some(c) = self.cache.get(&key).filter(|c| now < c.refresh_at) {
            self.metrics.ocsp.cache(CacheResult::Hit);
            return Ok(c);
        }
        let epoch = self.epoch.load(Ordering::SeqCst);
        let slot = table
            .slots
            .get(key.issuer as usize)
            .ok_or(Fresh::Error(OcspError::Unauthorized))?;
        // The marker is read before the status: see the module doc.
        let marker = match self.shared_lookup(slot, &key, now).await {
            // Redis is not trusted with a status: a shared answer (signed by
            // a daemon of this deployment, but stored where anyone with
            // Redis access could swap or replay one) is served only if it
            // says what the store says now, one primary-key read; the
            // saving is the HSM signature. Its refresh time never passes
            // its nextUpdate.
            Ok((Some(mut c), _))
                if outcome_of(self.status_of(&slot.name, slot.key_id, &id.serial).await?)
                    == c.outcome
                    && now < c.next_update =>
            {
                c.refresh_at = c.refresh_at.min(c.next_update);
                self.metrics.ocsp.cache(CacheResult::Hit);
                self.cache.insert_if(key, c.clone(), now, || {
                    self.epoch.load(Ordering::SeqCst) == epoch
                });
                return Ok(c);
            }
            Ok((Some(_), marker)) => {
                tracing::warn!(
                    "a shared OCSP answer disagrees with the store; signing a fresh one"
                );
                Some(marker)
            }
            Ok((None, marker)) => Some(marker),
            Err(()) => None,
        };
        let status = self.status_of(&slot.name, slot.key_id, &id.serial).await?;
        if status == CertStatus::Unknown {
            self.take_fresh(source).await.map_err(Fresh::Limited)?;
        }
        let policy = &self.ca.policies().revocation;
        let next_update = now + i64::from(policy.ocsp_validity_minutes) * 60;
        let single = SingleResponse {
            cert_id: id,
            status,
            this_update: now,
            next_update: Some(next_update),
        };
        let signer = &slot.signer;
        let body = ocsp::presign(
            &signer.key_hash,
            now,
            single,
            signer.algorithm,
            &[&signer.cert_der],
            async |tbs| {
                signer
                    .keystore
                    .sign(&signer.handle, signer.algorithm, &tbs)
                    .await
            },
        )
        .await
        .map_err(|e| Fresh::Error(sign_error(&e)))?;
        let cached = Cached {
            body: Bytes::from(body),
            refresh_at: next_update - i64::from(policy.ocsp_refresh_before_minutes) * 60,
            next_update,
            outcome: outcome_of(status),
        };
        self.metrics.ocsp.cache(CacheResult::Miss);
        self.cache.insert_if(key, cached.clone(), now, || {
            self.epoch.load(Ordering::SeqCst) == epoch
        });
        if let (Some(shared), Some(marker)) = (&self.shared, marker) {
            let ttl = Duration::from_secs(u64::try_from(next_update - now).unwrap_or(0).max(1));
            if let Err(e) = shared
                .put(
                    &Self::shared_key(slot, &key),
                    &encode_shared(&marker, &cached),
                    ttl,
                )
                .await
            {
                tracing::debug!(error = %e, "could not share an OCSP response");
            }
        }
        Ok(cached)
    }

    /// Several CertIDs or a nonce: signed now, not cached.
    async fn sign_fresh(&self, table: &Table, slot: u32, req: &OcspRequest, now: i64) -> Signed {
        let slot = table
            .slots
            .get(slot as usize)
            .ok_or(OcspError::Unauthorized)?;
        let next_update = now + i64::from(self.ca.policies().revocation.ocsp_validity_minutes) * 60;
        let mut singles = Vec::with_capacity(req.cert_ids.len());
        for id in &req.cert_ids {
            let status = self
                .status_of(&slot.name, slot.key_id, &id.serial)
                .await
                .map_err(|e| match e {
                    Fresh::Error(e) => e,
                    Fresh::Limited(_) => OcspError::TryLater,
                })?;
            singles.push(SingleResponse {
                cert_id: id,
                status,
                this_update: now,
                next_update: Some(next_update),
            });
        }
        // Counted per CertID below; the response as a whole by its first.
        for s in singles.iter().skip(1) {
            self.metrics.ocsp.response(outcome_of(s.status));
        }
        let outcome = singles
            .first()
            .map(|s| outcome_of(s.status))
            .unwrap_or(OcspOutcome::Unknown);
        let signer = &slot.signer;
        let data = ResponseData {
            responder_key_hash: &signer.key_hash,
            produced_at: now,
            responses: &singles,
            nonce: req.nonce.as_ref(),
        };
        let body = ocsp::sign(&data, signer.algorithm, &[&signer.cert_der], async |tbs| {
            signer
                .keystore
                .sign(&signer.handle, signer.algorithm, &tbs)
                .await
        })
        .await
        .map_err(|e| sign_error(&e))?;
        Ok((Bytes::from(body), outcome, next_update))
    }

    /// The status of `serial` as issued by `ca`. A serial of another CA is unknown.
    async fn status_of(
        &self,
        ca: &str,
        key_id: uuid::Uuid,
        serial: &Serial,
    ) -> Result<CertStatus, Fresh> {
        let record = self
            .store
            .get_certificate(&serial.to_hex())
            .await
            .map_err(|e| {
                tracing::error!(error = %e, "OCSP status lookup failed");
                Fresh::Error(OcspError::TryLater)
            })?;
        Ok(match record {
            Some(c) if c.issuer_ca == ca && c.issuer_key_id == key_id => match c.status {
                CertificateStatus::Revoked => CertStatus::Revoked {
                    time: c.revoked_at.unwrap_or(c.created_at),
                    reason: c
                        .revocation_reason
                        .unwrap_or(crate::model::RevocationReason::Unspecified),
                },
                _ => CertStatus::Good,
            },
            _ => CertStatus::Unknown,
        })
    }
}

/// Why a cacheable response could not be produced.
enum Fresh {
    Limited(Duration),
    Error(OcspError),
}

impl From<OcspError> for Fresh {
    fn from(e: OcspError) -> Self {
        Self::Error(e)
    }
}

fn sign_error(e: &ocsp::SignError<crate::keystore::KeyStoreError>) -> OcspError {
    match e {
        ocsp::SignError::Signer(k) => {
            tracing::error!(error = %k, "OCSP response signing failed");
            OcspError::TryLater
        }
        ocsp::SignError::Encoding(d) => {
            tracing::error!(error = %d, "OCSP response encoding failed");
            OcspError::Internal
        }
    }
}

/// Shared-level value: refresh_at, next_update (i64 BE), outcome (1 byte),
/// marker length (1 byte) and marker, then the DER response.
fn encode_shared(marker: &[u8], c: &Cached) -> Vec<u8> {
    let marker = &marker[..marker.len().min(255)];
    let mut out = Vec::with_capacity(18 + marker.len() + c.body.len());
    out.extend_from_slice(&c.refresh_at.to_be_bytes());
    out.extend_from_slice(&c.next_update.to_be_bytes());
    out.push(match c.outcome {
        OcspOutcome::Good => 0,
        OcspOutcome::Revoked => 1,
        _ => 2,
    });
    out.push(marker.len() as u8);
    out.extend_from_slice(marker);
    out.extend_from_slice(&c.body);
    out
}

/// The marker an entry saw and the entry; `None` for anything malformed
/// (treated as a miss).
fn decode_shared(raw: &[u8]) -> Option<(Vec<u8>, Cached)> {
    let refresh_at = i64::from_be_bytes(raw.get(0..8)?.try_into().ok()?);
    let next_update = i64::from_be_bytes(raw.get(8..16)?.try_into().ok()?);
    let outcome = match raw.get(16)? {
        0 => OcspOutcome::Good,
        1 => OcspOutcome::Revoked,
        2 => OcspOutcome::Unknown,
        _ => return None,
    };
    let len = usize::from(*raw.get(17)?);
    let marker = raw.get(18..18 + len)?.to_vec();
    let body = raw.get(18 + len..)?;
    if body.is_empty() {
        return None;
    }
    Some((
        marker,
        Cached {
            body: Bytes::copy_from_slice(body),
            refresh_at,
            next_update,
            outcome,
        },
    ))
}

impl Responder {
    /// Rewrites the shared markers of `serials`, so that no daemon serves a
    /// shared answer signed before the change. Kept for as long as any
    /// answer lives (the OCSP validity), plus a margin.
    fn bump_markers(&self, serials: &[String]) {
        let Some(shared) = self.shared.clone() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let validity = i64::from(self.ca.policies().revocation.ocsp_validity_minutes) * 60;
        let ttl = Duration::from_secs(u64::try_from(validity).unwrap_or(0) + 3600);
        let serials = serials.to_vec();
        // Retried (every second, for as long as an answer can live) while
        // Redis is unreachable: a stale shared answer must not outlive an
        // outage seen only by this daemon.
        let give_up = tokio::time::Instant::now() + ttl;
        rt.spawn(async move {
            for hex in serials {
                let marker = uuid::Uuid::new_v4().simple().to_string();
                loop {
                    match shared
                        .put(&Self::marker_key(&hex), marker.as_bytes(), ttl)
                        .await
                    {
                        Ok(()) => break,
                        Err(e) if tokio::time::Instant::now() >= give_up => {
                            tracing::error!(error = %e, "could not invalidate a shared OCSP answer; giving up");
                            break;
                        }
                        Err(_) => tokio::time::sleep(Duration::from_secs(1)).await,
                    }
                }
            }
        });
    }
}

impl RevocationObserver for Responder {
    fn revocation_changed(&self, issuer_ca: &str, serials: &[String]) {
        self.bump_markers(serials);
        let table = self.table();
        let Some(index) = table.slots.iter().position(|s| s.name == issuer_ca) else {
            return;
        };
        self.epoch.fetch_add(1, Ordering::SeqCst);
        for hex in serials {
            let Ok(serial) = Serial::from_hex(hex) else {
                continue;
            };
            for hash in [HashAlgorithm::Sha1, HashAlgorithm::Sha256] {
                self.cache.remove(&CacheKey {
                    issuer: index as u32,
                    hash,
                    serial,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(i: u32) -> CacheKey {
        CacheKey {
            issuer: 0,
            hash: HashAlgorithm::Sha1,
            serial: Serial::from_bytes(&i.to_be_bytes()).unwrap(),
        }
    }

    fn entry(next_update: i64) -> Cached {
        Cached {
            body: Bytes::from_static(b"r"),
            refresh_at: next_update - 1,
            next_update,
            outcome: OcspOutcome::Good,
        }
    }

    #[test]
    fn the_cache_stays_bounded_and_drops_expired_entries_first() {
        let cache = Cache::new(64 * SHARDS);
        let cap = cache.per_shard * SHARDS;
        for i in 0..10_000 {
            cache.insert_if(key(i), entry(100), 0, || true);
        }
        assert!(cache.len() <= cap, "{} > {cap}", cache.len());
        // At time 200 every entry has expired: a full shard drops them all
        // rather than one live entry.
        for i in 20_000..20_064 {
            cache.insert_if(key(i), entry(1_000), 200, || true);
        }
        assert!((20_000..20_064).all(|i| cache.get(&key(i)).is_some()));
        // An invalidation between the status read and the insert wins.
        cache.insert_if(key(7), entry(1_000), 0, || false);
        cache.remove(&key(7));
        cache.insert_if(key(7), entry(1_000), 0, || false);
        assert!(cache.get(&key(7)).is_none());
        cache.clear();
        assert_eq!(cache.len(), 0);
    }
}
