//! OCSP responder metrics: responses by status, cache hits and misses, and
//! each delegated signer's expiry. Counters are resolved once, so counting
//! on the cached path is one atomic add.

use prometheus::{IntCounter, IntCounterVec, IntGaugeVec, Opts, Registry};

/// The `status` label values of `keyward_ocsp_responses_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OcspOutcome {
    Good,
    Revoked,
    Unknown,
    Unauthorized,
    Malformed,
    TryLater,
    Internal,
}

impl OcspOutcome {
    pub const ALL: [Self; 7] = [
        Self::Good,
        Self::Revoked,
        Self::Unknown,
        Self::Unauthorized,
        Self::Malformed,
        Self::TryLater,
        Self::Internal,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Good => "good",
            Self::Revoked => "revoked",
            Self::Unknown => "unknown",
            Self::Unauthorized => "unauthorized",
            Self::Malformed => "malformed",
            Self::TryLater => "try_later",
            Self::Internal => "internal",
        }
    }
}

/// How a response was obtained (`keyward_ocsp_cache_total{result}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheResult {
    /// Served from memory, no store or HSM.
    Hit,
    /// Signed now and cached.
    Miss,
    /// Past its refresh time but still valid, served while another request re-signs it.
    Stale,
    /// Signed fresh because the request carried a nonce or several CertIDs.
    Fresh,
    /// A nonce over the per-source limit: answered from the cache without the nonce.
    NonceIgnored,
}

pub struct OcspMetrics {
    responses: Vec<IntCounter>,
    cache: [IntCounter; 5],
    /// Unix time the active delegated signer of each CA expires.
    pub signer_not_after: IntGaugeVec,
}

impl OcspMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let responses = IntCounterVec::new(
            Opts::new(
                "ocsp_responses_total",
                "OCSP answers by status (good/revoked/unknown per CertID; error statuses per request)",
            ),
            &["status"],
        )?;
        registry.register(Box::new(responses.clone()))?;
        let cache = IntCounterVec::new(
            Opts::new(
                "ocsp_cache_total",
                "OCSP responses by how they were obtained: hit, miss (signed and cached), stale (served while re-signing), fresh (nonce or several CertIDs), nonce_ignored (over the per-source limit)",
            ),
            &["result"],
        )?;
        registry.register(Box::new(cache.clone()))?;
        let signer_not_after = IntGaugeVec::new(
            Opts::new(
                "ocsp_signer_not_after_timestamp_seconds",
                "Unix time the active delegated OCSP signing certificate of each CA expires",
            ),
            &["ca"],
        )?;
        registry.register(Box::new(signer_not_after.clone()))?;
        let c = |l: &str| cache.with_label_values(&[l]);
        Ok(Self {
            responses: OcspOutcome::ALL
                .iter()
                .map(|o| responses.with_label_values(&[o.as_str()]))
                .collect(),
            cache: [
                c("hit"),
                c("miss"),
                c("stale"),
                c("fresh"),
                c("nonce_ignored"),
            ],
            signer_not_after,
        })
    }

    pub fn response(&self, outcome: OcspOutcome) {
        if let Some(c) = OcspOutcome::ALL
            .iter()
            .position(|o| *o == outcome)
            .and_then(|i| self.responses.get(i))
        {
            c.inc();
        }
    }

    pub fn cache(&self, result: CacheResult) {
        self.cache[result as usize].inc();
    }
}
