//! Audit trail metrics: the chain head, its signed checkpoints, the
//! daemon's own periodic verification, and the live sinks.

use prometheus::{IntCounter, IntCounterVec, IntGauge, Opts, Registry};

pub struct AuditMetrics {
    /// Sequence number of the newest event.
    pub head_sequence: IntGauge,
    /// Sequence number the newest signed checkpoint covers.
    pub checkpoint_sequence: IntGauge,
    /// Unix time the newest checkpoint was signed.
    pub last_checkpoint: IntGauge,
    /// Checkpoints that could not be signed or stored.
    pub checkpoint_failures: IntCounter,
    /// Unix time the daemon last verified the chain's tail successfully.
    pub last_verified: IntGauge,
    /// Periodic verifications that found the chain broken (or could not run).
    pub verify_failures: IntCounter,
    /// Events waiting in a `buffer`-policy sink's memory.
    pub sink_buffered: IntGauge,
    /// Writes to a sink that failed, by sink (`file`, `syslog`).
    pub sink_failures: IntCounterVec,
}

impl AuditMetrics {
    pub fn register(registry: &Registry) -> Result<Self, prometheus::Error> {
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let sink_failures = IntCounterVec::new(
            Opts::new(
                "audit_sink_failures_total",
                "Audit sink writes that failed, by sink",
            ),
            &["sink"],
        )?;
        registry.register(Box::new(sink_failures.clone()))?;
        // Both sink kinds exist from the start, so alerts see a 0.
        for sink in ["file", "syslog"] {
            sink_failures.with_label_values(&[sink]);
        }
        Ok(Self {
            head_sequence: gauge(
                "audit_head_sequence",
                "Sequence number of the newest audit event",
            )?,
            checkpoint_sequence: gauge(
                "audit_checkpoint_sequence",
                "Sequence number covered by the newest HSM-signed audit checkpoint",
            )?,
            last_checkpoint: gauge(
                "audit_last_checkpoint_timestamp_seconds",
                "Unix time the newest audit checkpoint was signed",
            )?,
            checkpoint_failures: counter(
                "audit_checkpoint_failures_total",
                "Audit checkpoints that could not be signed or stored",
            )?,
            last_verified: gauge(
                "audit_last_verified_timestamp_seconds",
                "Unix time this daemon last verified the audit chain's tail against its checkpoints",
            )?,
            verify_failures: counter(
                "audit_verify_failures_total",
                "Periodic audit chain verifications that found a break or could not run",
            )?,
            sink_buffered: gauge(
                "audit_sink_buffered",
                "Audit events held in memory by a buffer-policy sink, not yet written",
            )?,
            sink_failures,
        })
    }
}
