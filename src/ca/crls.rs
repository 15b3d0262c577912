//! The CRL publisher: numbers, signs (in the HSM), checks and stores each
//! CA's CRL, and keeps the current one per CA in memory so that serving it
//! touches neither the store nor the HSM.
//!
//! Publishing one CRL (`publish`), under a per-CA lock so that one daemon
//! never races itself:
//! 1. read the CA's latest CRL number and its unexpired revoked
//!    certificates from the store;
//! 2. encode the TBSCertList (number + 1, thisUpdate now, nextUpdate from
//!    `[revocation] crl_validity_hours`, clamped to the CA certificate's
//!    notAfter) and sign it with the CA key through its KeyStore;
//! 3. check the signature against the CA certificate: a CRL that does not
//!    verify is neither stored nor served;
//! 4. commit `PublishCrl` with its `crl.publish` audit event. The store
//!    refuses a number that is not the highest + 1; then another daemon
//!    published first, and steps 1-4 run again (bounded).
//!
//! Nothing needs undoing: until step 4 commits, nothing was written, and a
//! signed CRL that was never stored was never served.
//!
//! Revocations mark their CA dirty ([`RevocationObserver`]); the CRL job
//! (`jobs::crl`) publishes dirty CAs once `crl_debounce_ms` has passed since
//! the first mark, so a burst of revocations shares one CRL.

use super::crl::{self, CrlParams};
use super::serial::Serial;
use super::{CaError, CaService, Issuer, RevocationObserver, x509};
use crate::audit::AuditDraft;
use crate::clock::Clock;
use crate::metrics::Metrics;
use crate::policy::RevocationPolicy;
use crate::store::{Change, Conflict, CrlRecord, Store, StoreError, Write};
use bytes::Bytes;
use serde_json::json;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, RwLock};
use time::OffsetDateTime;
use tokio::sync::Notify;

/// Publications attempted per call when other daemons keep publishing first.
const MAX_ATTEMPTS: u32 = 3;

/// After a failed publication of a dirty CA, the next try waits at least this long.
const RETRY_AFTER_MS: i64 = 5_000;

/// A signed, stored CRL as it is served.
#[derive(Debug, Clone)]
pub struct PublishedCrl {
    pub ca: String,
    /// The CA key that signed it.
    pub key_id: uuid::Uuid,
    /// The cRLNumber.
    pub number: i64,
    pub this_update: i64,
    pub next_update: i64,
    pub entries: usize,
    pub der: Bytes,
    /// `-----BEGIN X509 CRL-----`, as Mosquitto's `crlfile` and `openssl crl` read it.
    pub pem: Bytes,
}

impl PublishedCrl {
    fn from_record(r: &CrlRecord) -> Result<Self, CaError> {
        Ok(Self {
            ca: r.issuer_ca.clone(),
            key_id: r.issuer_key_id,
            number: r.number,
            this_update: r.this_update,
            next_update: r.next_update,
            entries: usize::try_from(r.entries).unwrap_or(0),
            pem: Bytes::from(crl::to_pem(&r.der)?),
            der: Bytes::from(r.der.clone()),
        })
    }
}

pub struct CrlPublisher {
    ca: Arc<CaService>,
    store: Arc<dyn Store>,
    clock: Arc<dyn Clock>,
    policy: RevocationPolicy,
    metrics: Arc<Metrics>,
    /// The newest CRL of each (CA, signing key).
    current: RwLock<BTreeMap<(String, uuid::Uuid), Arc<PublishedCrl>>>,
    /// One lock per CA: publications of one CA in this process run one at a time.
    locks: Mutex<BTreeMap<String, Arc<tokio::sync::Mutex<()>>>>,
    /// Dirty CAs and when (clock milliseconds) their new CRL is due.
    dirty: Mutex<BTreeMap<String, i64>>,
    wake: Notify,
}

fn ms(t: OffsetDateTime) -> i64 {
    (t.unix_timestamp_nanos() / 1_000_000) as i64
}

impl CrlPublisher {
    pub fn new(
        ca: Arc<CaService>,
        store: Arc<dyn Store>,
        clock: Arc<dyn Clock>,
        metrics: Arc<Metrics>,
    ) -> Self {
        let policy = ca.policies().revocation.clone();
        Self {
            ca,
            store,
            clock,
            policy,
            metrics,
            current: RwLock::new(BTreeMap::new()),
            locks: Mutex::new(BTreeMap::new()),
            dirty: Mutex::new(BTreeMap::new()),
            wake: Notify::new(),
        }
    }

    /// The CA service it publishes for.
    pub fn ca(&self) -> &Arc<CaService> {
        &self.ca
    }

    /// The publisher's clock time (what a CRL's remaining lifetime is measured against).
    pub fn now(&self) -> OffsetDateTime {
        self.clock.now()
    }

    pub fn policy(&self) -> &RevocationPolicy {
        &self.policy
    }

    /// The CRL served for `ca`, from memory. `UnknownCa` for a name that is
    /// not a CA, `CrlUnavailable` while none could be published yet.
    pub fn current(&self, ca: &str) -> Result<Arc<PublishedCrl>, CaError> {
        let issuer = self.ca.issuer(ca)?;
        self.of_key(ca, issuer.key_id)
            .ok_or_else(|| CaError::CrlUnavailable(ca.to_string()))
    }

    /// The CRL of each key of `ca` that still signs (the active key first,
    /// then retired ones): during a rotation, relying parties need all of
    /// them. `CrlUnavailable` if one is missing.
    pub fn all_current(&self, ca: &str) -> Result<Vec<Arc<PublishedCrl>>, CaError> {
        self.ca
            .signing_generations(ca)?
            .iter()
            .map(|g| {
                self.of_key(ca, g.key_id)
                    .ok_or_else(|| CaError::CrlUnavailable(ca.to_string()))
            })
            .collect()
    }

    fn of_key(&self, ca: &str, key_id: uuid::Uuid) -> Option<Arc<PublishedCrl>> {
        self.current
            .read()
            .ok()
            .and_then(|g| g.get(&(ca.to_string(), key_id)).cloned())
    }

    /// Loads the latest stored CRL of every signing key of every CA into
    /// memory (start-up, and after a rotation changed the keys).
    pub async fn load(&self) -> Result<(), CaError> {
        for issuer in self.ca.issuers() {
            for g in self.ca.signing_generations(&issuer.name)? {
                if let Some(record) = self.store.latest_crl_of_key(&g.name, g.key_id).await? {
                    self.install(Arc::new(PublishedCrl::from_record(&record)?));
                }
            }
        }
        Ok(())
    }

    /// Start-up: loads the stored CRLs, then publishes for every CA without
    /// one or whose CRL is due. A CA whose publication fails is logged and
    /// counted; the job tries again.
    pub async fn start(&self, now: OffsetDateTime) -> Result<(), CaError> {
        self.load().await?;
        self.publish_due(now).await;
        Ok(())
    }

    /// Whether `ca`'s CRL must be replaced as of `now` (none yet, or within
    /// `crl_refresh_before_hours` of its nextUpdate).
    pub fn is_due(&self, ca: &str, now: OffsetDateTime) -> bool {
        let refresh = i64::from(self.policy.crl_refresh_before_hours) * 3600;
        let Ok(generations) = self.ca.signing_generations(ca) else {
            return false;
        };
        generations.iter().any(|g| match self.of_key(ca, g.key_id) {
            Some(c) => now.unix_timestamp() >= c.next_update - refresh,
            None => true,
        })
    }

    /// Publishes every CA whose CRL is due, and every dirty CA whose
    /// debounce window has passed. Returns the CAs that failed.
    pub async fn publish_due(&self, now: OffsetDateTime) -> Vec<(String, CaError)> {
        let now_ms = ms(now);
        let mut todo: Vec<String> = {
            let mut dirty = self.dirty.lock().unwrap_or_else(|p| p.into_inner());
            let ready: Vec<String> = dirty
                .iter()
                .filter(|(_, due)| **due <= now_ms)
                .map(|(ca, _)| ca.clone())
                .collect();
            // Cleared before the store is read: a revocation committed after
            // this point marks the CA again and gets its own CRL.
            for ca in &ready {
                dirty.remove(ca);
            }
            ready
        };
        for issuer in self.ca.issuers() {
            if !todo.contains(&issuer.name) && self.is_due(&issuer.name, now) {
                todo.push(issuer.name.clone());
            }
        }
        let mut failed = Vec::new();
        for ca in todo {
            if let Err(e) = self.publish(&ca, "system").await {
                tracing::error!(ca = %ca, code = e.code(), error = %e, "CRL publication failed");
                if let Ok(mut dirty) = self.dirty.lock() {
                    let retry = now_ms + RETRY_AFTER_MS.max(i64::from(self.policy.crl_debounce_ms));
                    dirty.entry(ca.clone()).or_insert(retry);
                }
                failed.push((ca, e));
            }
        }
        failed
    }

    /// Marks `ca` for a new CRL after the debounce window and wakes the job.
    /// Later marks inside the window do not move it.
    pub fn mark_dirty(&self, ca: &str) {
        if self.ca.issuer(ca).is_err() {
            return;
        }
        let due = ms(self.clock.now()) + i64::from(self.policy.crl_debounce_ms);
        if let Ok(mut dirty) = self.dirty.lock() {
            dirty.entry(ca.to_string()).or_insert(due);
        }
        self.wake.notify_one();
    }

    /// When (clock milliseconds) the earliest dirty CA is due, if any.
    pub fn next_dirty_deadline(&self) -> Option<i64> {
        self.dirty
            .lock()
            .ok()
            .and_then(|d| d.values().min().copied())
    }

    /// Resolves once a dirty CA's debounce window has passed (for the job's
    /// early wake-up). Cancel-safe: a mark made meanwhile is not lost.
    pub async fn dirty_due(&self) {
        loop {
            match self.next_dirty_deadline() {
                None => self.wake.notified().await,
                Some(deadline) => {
                    let left = deadline - ms(self.clock.now());
                    if left <= 0 {
                        return;
                    }
                    let left = std::time::Duration::from_millis(left.unsigned_abs());
                    tokio::select! {
                        () = tokio::time::sleep(left) => return,
                        () = self.wake.notified() => {}
                    }
                }
            }
        }
    }

    fn lock_for(&self, ca: &str) -> Arc<tokio::sync::Mutex<()>> {
        let mut locks = self.locks.lock().unwrap_or_else(|p| p.into_inner());
        locks.entry(ca.to_string()).or_default().clone()
    }

    fn install(&self, crl: Arc<PublishedCrl>) {
        let m = &self.metrics;
        if let Ok(mut g) = self.current.write() {
            let key = (crl.ca.clone(), crl.key_id);
            if g.get(&key).is_some_and(|c| c.number >= crl.number) {
                return;
            }
            g.insert(key, crl.clone());
        }
        // The gauges describe the CA's active key's CRL.
        if self.ca.issuer(&crl.ca).map(|i| i.key_id).ok() != Some(crl.key_id) {
            return;
        }
        m.crl_number.with_label_values(&[&crl.ca]).set(crl.number);
        m.crl_next_update
            .with_label_values(&[&crl.ca])
            .set(crl.next_update);
        m.ops
            .crl_this_update
            .with_label_values(&[&crl.ca])
            .set(crl.this_update);
        m.crl_entries
            .with_label_values(&[&crl.ca])
            .set(i64::try_from(crl.entries).unwrap_or(i64::MAX));
    }

    /// Publishes a new CRL of `ca` now (see the module comment for the steps).
    pub async fn publish(&self, ca: &str, actor: &str) -> Result<Arc<PublishedCrl>, CaError> {
        let result = self.publish_inner(ca, actor).await;
        if result.is_err() && self.ca.issuer(ca).is_ok() {
            self.metrics
                .crl_publish_failures
                .with_label_values(&[ca])
                .inc();
        }
        result
    }

    /// Publishes a new CRL for every key of `ca` that still signs (the
    /// active one and the retired ones); returns the active key's.
    async fn publish_inner(&self, ca: &str, actor: &str) -> Result<Arc<PublishedCrl>, CaError> {
        let generations = self.ca.signing_generations(ca)?;
        let lock = self.lock_for(ca);
        let _guard = lock.lock().await;
        // Keys that stopped signing (destroyed) leave memory.
        if let Ok(mut g) = self.current.write() {
            g.retain(|(c, k), _| c != ca || generations.iter().any(|x| x.key_id == *k));
        }
        let mut active = None;
        for issuer in &generations {
            let crl = self.publish_key(issuer, actor).await?;
            active.get_or_insert(crl);
        }
        active.ok_or_else(|| CaError::CrlUnavailable(ca.to_string()))
    }

    async fn publish_key(
        &self,
        issuer: &Issuer,
        actor: &str,
    ) -> Result<Arc<PublishedCrl>, CaError> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            match self.sign_and_store(issuer, actor).await {
                Err(CaError::Store(StoreError::Conflict(Conflict::StateChanged { .. })))
                    if attempt < MAX_ATTEMPTS =>
                {
                    tracing::info!(
                        ca = %issuer.name,
                        attempt,
                        "another CRL of this CA was published first; retrying"
                    );
                }
                Ok(crl) => {
                    let crl = Arc::new(crl);
                    self.install(crl.clone());
                    return Ok(crl);
                }
                Err(e) => return Err(e),
            }
        }
    }

    async fn sign_and_store(&self, issuer: &Issuer, actor: &str) -> Result<PublishedCrl, CaError> {
        let now = self.clock.now().unix_timestamp();
        if issuer.not_after <= now {
            return Err(CaError::Expired(issuer.name.clone()));
        }
        let next_update =
            (now + i64::from(self.policy.crl_validity_hours) * 3600).min(issuer.not_after);
        let number = self
            .store
            .latest_crl(&issuer.name)
            .await?
            .map_or(1, |c| c.number + 1);
        let revoked = self
            .store
            .revoked_certificates_by_key(issuer.key_id, now)
            .await?
            .into_iter()
            .map(|e| {
                Ok(crl::RevokedEntry {
                    serial: Serial::from_hex(&e.serial).map_err(|source| CaError::CrlSerial {
                        serial: e.serial.clone(),
                        source,
                    })?,
                    revoked_at: e.revoked_at,
                    reason: e.reason,
                })
            })
            .collect::<Result<Vec<_>, CaError>>()?;
        let tbs = crl::encode_tbs(&CrlParams {
            signer: issuer.algorithm,
            issuer_name_der: &issuer.subject_der,
            issuer_key_id: &issuer.ski,
            crl_number: u64::try_from(number).unwrap_or(0),
            this_update: now,
            next_update,
            revoked: &revoked,
        })?;
        let signature = issuer
            .keystore
            .sign(&issuer.handle, issuer.algorithm, &tbs)
            .await?;
        let der = crl::assemble(&tbs, issuer.algorithm, &signature)?;
        drop(tbs);
        // As for device certificates: what the HSM signed must verify
        // against the CA certificate before anyone can be served it.
        if !x509::verify_issued_by(&der, &issuer.cert_der) {
            tracing::error!(
                ca = %issuer.name,
                number,
                "the HSM signed a CRL that does not verify against the CA certificate; nothing published"
            );
            return Err(CaError::CrlSignatureInvalid(issuer.name.clone()));
        }
        let entries = revoked.len();
        let pem = crl::to_pem(&der)?;
        let record = CrlRecord {
            issuer_ca: issuer.name.clone(),
            issuer_key_id: issuer.key_id,
            number,
            this_update: now,
            next_update,
            entries: i64::try_from(entries).unwrap_or(i64::MAX),
            der,
            created_at: now,
        };
        let der = Bytes::from(record.der.clone());
        let change = Change::new()
            .write(Write::PublishCrl {
                record,
                keep: self.policy.crls_kept,
            })
            .audit(
                AuditDraft::new(actor, "crl.publish", format!("ca:{}", issuer.name)).details(
                    json!({
                        "ca": issuer.name,
                        "number": number,
                        "key": issuer.key_id,
                        "entries": entries,
                        "next_update": next_update,
                    }),
                ),
            );
        self.store.commit(change).await?;
        Ok(PublishedCrl {
            ca: issuer.name.clone(),
            key_id: issuer.key_id,
            number,
            this_update: now,
            next_update,
            entries,
            der,
            pem: Bytes::from(pem),
        })
    }
}

impl RevocationObserver for CrlPublisher {
    fn revocation_changed(&self, issuer_ca: &str, _serials: &[String]) {
        self.mark_dirty(issuer_ca);
    }
}
