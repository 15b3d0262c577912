//! The operational catalogue added with issue 11 (see `docs/metrics.md`):
//! request and HSM latency, session pool and YubiKey queue, renewals,
//! revocations, approvals, the approval queue, certificates by time to
//! expiry, key maximum age and CRL thisUpdate.
//!
//! Every label value comes from a bounded set (route templates, configured
//! key store and CA names, fixed enums); nothing here is per device. Series
//! an alert reads are created at registration (value 0), so that an alert
//! sees 0 rather than no data before the first event.

use prometheus::{
    HistogramOpts, HistogramVec, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
};

/// The `within_days` bounds of `keyward_certificates_by_expiry`, in days;
/// `inf` (every active certificate) is added after them.
pub const EXPIRY_BOUNDS_DAYS: [i64; 4] = [1, 7, 30, 90];

/// The `decision` label values of `keyward_approvals_total`.
pub const DECISIONS: [&str; 2] = ["approve", "deny"];

/// The `reason` label values of `keyward_certificates_revoked_total` (the
/// RFC 5280 reason names keyward accepts, as the API and audit trail spell them).
pub const REVOCATION_REASONS: [&str; 9] = [
    "unspecified",
    "key-compromise",
    "ca-compromise",
    "affiliation-changed",
    "superseded",
    "cessation-of-operation",
    "certificate-hold",
    "privilege-withdrawn",
    "aa-compromise",
];

pub struct OpsMetrics {
    /// Request latency by method and route template (never a raw path).
    pub http_request_duration: HistogramVec,
    /// Key store call latency by key store and operation, queueing included.
    pub hsm_operation_duration: HistogramVec,
    /// PKCS#11 sessions busy and the pool's size, per key store (set on scrape).
    pub hsm_sessions_in_use: IntGaugeVec,
    pub hsm_sessions_max: IntGaugeVec,
    /// Operations waiting for a YubiKey, per key store (set on scrape).
    pub yubikey_queue_depth: IntGaugeVec,
    /// Device certificates renewed, by issuing CA (after the commit).
    pub certificate_renewals: IntCounterVec,
    /// Certificates revoked (a hold included), by reason (after the commit).
    pub certificates_revoked: IntCounterVec,
    /// Approval decisions recorded, by decision (after the commit).
    pub approvals: IntCounterVec,
    /// Registrations waiting for a decision, and the age of the oldest (0 when none).
    pub registrations_pending: IntGauge,
    pub registrations_pending_oldest_age: IntGauge,
    /// Active device certificates expiring within N days (cumulative).
    pub certificates_by_expiry: IntGaugeVec,
    /// The rotation policy's max_age_days of each active key, in seconds (0: none).
    pub key_max_age: IntGaugeVec,
    /// thisUpdate of the CRL each CA serves.
    pub crl_this_update: IntGaugeVec,
    /// Device access tokens handed out, by `via` (`signed` in the HSM, `cached`).
    pub auth_tokens_issued: IntCounterVec,
    /// Token requests refused, by reason (`auth::tokens::DENIAL_REASONS`).
    pub auth_token_denials: IntCounterVec,
    /// Introspection answers, by `result` (`active`, `inactive`).
    pub auth_introspections: IntCounterVec,
}

impl OpsMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let histogram_vec = |name: &str, help: &str, labels: &[&str], buckets: Vec<f64>| {
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let c = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(c.clone()))?;
            Ok::<_, prometheus::Error>(c)
        };
        let gauge = |name: &str, help: &str| {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let http_request_duration = histogram_vec(
            "http_request_duration_seconds",
            "Time from receiving a request to its response, by method and route template",
            &["method", "route"],
            vec![
                0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
            ],
        )?;
        let hsm_operation_duration = histogram_vec(
            "hsm_operation_duration_seconds",
            "Time one key store operation takes, queueing for a session or the card included, by key store and operation",
            &["keystore", "operation"],
            prometheus::exponential_buckets(0.00005, 2.0, 20)?,
        )?;
        let hsm_sessions_in_use = gauge_vec(
            "hsm_sessions_in_use",
            "PKCS#11 sessions of the key store's pool busy with an operation now",
            &["keystore"],
        )?;
        let hsm_sessions_max = gauge_vec(
            "hsm_sessions_max",
            "Size of the key store's PKCS#11 session pool (keystore.sessions)",
            &["keystore"],
        )?;
        let yubikey_queue_depth = gauge_vec(
            "yubikey_queue_depth",
            "Operations waiting for the YubiKey (it works on one at a time), by key store",
            &["keystore"],
        )?;
        let certificate_renewals = counter_vec(
            "certificate_renewals_total",
            "Device certificates renewed (committed), by issuing CA",
            &["ca"],
        )?;
        let certificates_revoked = counter_vec(
            "certificates_revoked_total",
            "Certificates revoked or put on hold (committed), by reason",
            &["reason"],
        )?;
        for r in REVOCATION_REASONS {
            certificates_revoked.with_label_values(&[r]);
        }
        let approvals = counter_vec(
            "approvals_total",
            "Approval decisions on registrations (committed), by decision",
            &["decision"],
        )?;
        for d in DECISIONS {
            approvals.with_label_values(&[d]);
        }
        let registrations_pending = gauge(
            "registrations_pending",
            "Registrations waiting for an approval decision",
        )?;
        let registrations_pending_oldest_age = gauge(
            "registrations_pending_oldest_age_seconds",
            "Age of the oldest registration waiting for a decision (0 when none waits)",
        )?;
        let certificates_by_expiry = gauge_vec(
            "certificates_by_expiry",
            "Active (not revoked, superseded or expired) device certificates whose notAfter is within the given number of days; cumulative, inf counts all",
            &["within_days"],
        )?;
        for b in EXPIRY_BOUNDS_DAYS {
            certificates_by_expiry.with_label_values(&[&b.to_string()]);
        }
        certificates_by_expiry.with_label_values(&["inf"]);
        let key_max_age = gauge_vec(
            "key_max_age_seconds",
            "The rotation policy's maximum age (max_age_days) of the active key of each purpose and target, in seconds (0: no maximum)",
            &["purpose", "target"],
        )?;
        let crl_this_update = gauge_vec(
            "crl_this_update_timestamp_seconds",
            "Unix time of the thisUpdate of the CRL served, by CA: the CRL's age is time() minus this",
            &["ca"],
        )?;
        let auth_tokens_issued = counter_vec(
            "auth_tokens_issued_total",
            "Device access tokens handed out, by how: signed (a new session, one HSM signature) or cached (the same certificate within token_reuse_seconds, no HSM)",
            &["via"],
        )?;
        for v in ["signed", "cached"] {
            auth_tokens_issued.with_label_values(&[v]);
        }
        let auth_token_denials = counter_vec(
            "auth_token_denials_total",
            "Device access token requests refused, by reason",
            &["reason"],
        )?;
        for r in crate::auth::tokens::DENIAL_REASONS {
            auth_token_denials.with_label_values(&[r]);
        }
        let auth_introspections = counter_vec(
            "auth_introspections_total",
            "Token introspection answers, by result (active, inactive)",
            &["result"],
        )?;
        for r in ["active", "inactive"] {
            auth_introspections.with_label_values(&[r]);
        }
        Ok(Self {
            auth_tokens_issued,
            auth_token_denials,
            auth_introspections,
            http_request_duration,
            hsm_operation_duration,
            hsm_sessions_in_use,
            hsm_sessions_max,
            yubikey_queue_depth,
            certificate_renewals,
            certificates_revoked,
            approvals,
            registrations_pending,
            registrations_pending_oldest_age,
            certificates_by_expiry,
            key_max_age,
            crl_this_update,
        })
    }

    /// One decision; `decision` is one of [`DECISIONS`].
    pub fn approval(&self, decision: &'static str) {
        self.approvals.with_label_values(&[decision]).inc();
    }

    /// `n` certificates revoked with `reason` (one of [`REVOCATION_REASONS`]).
    pub fn revoked(&self, reason: &'static str, n: u64) {
        if n > 0 {
            self.certificates_revoked
                .with_label_values(&[reason])
                .inc_by(n);
        }
    }

    /// Sets the expiry gauges: `within[i]` counts the certificates expiring
    /// within [`EXPIRY_BOUNDS_DAYS`]`[i]` days, `active` all of them.
    pub fn set_expiry_counts(&self, within: &[i64], active: i64) {
        for (b, n) in EXPIRY_BOUNDS_DAYS.iter().zip(within) {
            self.certificates_by_expiry
                .with_label_values(&[&b.to_string()])
                .set(*n);
        }
        self.certificates_by_expiry
            .with_label_values(&["inf"])
            .set(active);
    }
}
