//! Prometheus metrics (OpenMetrics text at `/metrics`). Metrics never carry
//! secrets or per-device labels (unbounded cardinality, and device ids are
//! sensitive details).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HttpLabels {
    pub method: String,
    pub route: String,
    pub status: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CaLabel {
    pub ca: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OutcomeLabel {
    pub outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OperationLabel {
    pub operation: String,
    pub result: String,
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: Family<HttpLabels, Counter>,
    pub certificates_issued: Family<CaLabel, Counter>,
    pub registrations: Family<OutcomeLabel, Counter>,
    pub hsm_operations: Family<OperationLabel, Counter>,
    pub hsm_sign_seconds: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_batch_size: Histogram,
    pub admin_auth_failures: Counter,
    pub hsm_up: Gauge,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("keyward");
        let http_requests = Family::<HttpLabels, Counter>::default();
        registry.register(
            "http_requests",
            "HTTP requests by route and status",
            http_requests.clone(),
        );
        let certificates_issued = Family::<CaLabel, Counter>::default();
        registry.register(
            "certificates_issued",
            "Certificates issued, by issuing CA",
            certificates_issued.clone(),
        );
        let registrations = Family::<OutcomeLabel, Counter>::default();
        registry.register(
            "registrations",
            "Registration events by outcome",
            registrations.clone(),
        );
        let hsm_operations = Family::<OperationLabel, Counter>::default();
        registry.register(
            "hsm_operations",
            "HSM operations by kind and result",
            hsm_operations.clone(),
        );
        let hsm_sign_seconds = Histogram::new(exponential_buckets(0.00005, 2.0, 16));
        registry.register(
            "hsm_sign_seconds",
            "Time to obtain one signature from the key store, queueing included",
            hsm_sign_seconds.clone(),
        );
        let store_commit_seconds = Histogram::new(exponential_buckets(0.0001, 2.0, 16));
        registry.register(
            "store_commit_seconds",
            "Time the store writer takes to apply and commit one batch (fsync included)",
            store_commit_seconds.clone(),
        );
        let store_batch_size = Histogram::new(exponential_buckets(1.0, 2.0, 12));
        registry.register(
            "store_batch_size",
            "Changes committed together in one transaction (group commit)",
            store_batch_size.clone(),
        );
        let admin_auth_failures = Counter::default();
        registry.register(
            "admin_auth_failures",
            "Admin API calls with a missing or wrong token",
            admin_auth_failures.clone(),
        );
        let hsm_up = Gauge::default();
        registry.register(
            "hsm_up",
            "1 if the last HSM health check succeeded",
            hsm_up.clone(),
        );
        Self {
            registry,
            http_requests,
            certificates_issued,
            registrations,
            hsm_operations,
            hsm_sign_seconds,
            store_commit_seconds,
            store_batch_size,
            admin_auth_failures,
            hsm_up,
        }
    }

    pub fn registration(&self, outcome: &str) {
        self.registrations
            .get_or_create(&OutcomeLabel {
                outcome: outcome.to_string(),
            })
            .inc();
    }

    pub fn issued(&self, ca: &str) {
        self.certificates_issued
            .get_or_create(&CaLabel { ca: ca.to_string() })
            .inc();
    }

    pub fn hsm(&self, operation: &str, ok: bool) {
        self.hsm_operations
            .get_or_create(&OperationLabel {
                operation: operation.to_string(),
                result: if ok { "ok" } else { "error" }.to_string(),
            })
            .inc();
    }

    /// OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if prometheus_client::encoding::text::encode(&mut out, &self.registry).is_err() {
            out.clear();
        }
        out
    }
}
