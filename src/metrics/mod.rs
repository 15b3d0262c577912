//! Prometheus metrics (classic text exposition at `/metrics`, the format
//! `promtool check metrics` lints). Metrics never carry secrets or
//! per-device labels (unbounded cardinality, and device ids are sensitive).

pub mod audit;
pub mod ocsp;
pub mod ops;

use prometheus::{
    Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, IntGaugeVec, Opts, Registry,
    TextEncoder,
};

/// The `route` label of requests that matched no route.
pub const UNMATCHED_ROUTE: &str = "unmatched";

/// The `method` label: the standard HTTP methods as they are, anything else
/// `other` (a client can send any token as a method).
pub fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "GET",
        "HEAD" => "HEAD",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "PATCH" => "PATCH",
        "OPTIONS" => "OPTIONS",
        "CONNECT" => "CONNECT",
        "TRACE" => "TRACE",
        _ => "other",
    }
}

/// The `status` label: a status the server can send, or `other` (axum
/// only produces valid codes; this keeps the bound explicit).
fn status_label(status: u16) -> std::borrow::Cow<'static, str> {
    if (100..=599).contains(&status) {
        status.to_string().into()
    } else {
        "other".into()
    }
}

pub struct Metrics {
    registry: Registry,
    pub http_requests: IntCounterVec,
    pub certificates_issued: IntCounterVec,
    pub registrations: IntCounterVec,
    pub hsm_operations: IntCounterVec,
    pub hsm_sign_seconds: Histogram,
    pub store_commit_seconds: Histogram,
    pub store_batch_size: Histogram,
    pub admin_auth_failures: IntCounter,
    pub hsm_up: IntGaugeVec,
    /// Requests refused by a rate limit, by limit (`registrations`, `admin_login_failures`).
    pub rate_limited: IntCounterVec,
    /// Keys the in-process rate limiter remembers (bounded by `limits.tracked_sources`).
    pub rate_limiter_keys: IntGauge,
    /// Failed admin logins counted and not yet written to the audit trail.
    pub login_failures_unaudited: IntGauge,
    /// Background job runs by job and result (`ok`, `error`).
    pub job_runs: IntCounterVec,
    /// Unix time of each job's last successful run: alert when it stops moving.
    pub job_last_success: IntGaugeVec,
    /// 1 when the cached readiness says ready.
    pub ready: IntGauge,
    /// The CRL each CA serves: its cRLNumber, nextUpdate and entry count.
    pub crl_number: IntGaugeVec,
    pub crl_next_update: IntGaugeVec,
    pub crl_entries: IntGaugeVec,
    /// CRL publications that failed (HSM, store, signature check), by CA.
    pub crl_publish_failures: IntCounterVec,
    pub ocsp: ocsp::OcspMetrics,
    /// The audit chain, its checkpoints and sinks.
    pub audit: audit::AuditMetrics,
    /// Broker updates queued in the store's outbox (due or backing off).
    pub broker_outbox_pending: IntGauge,
    /// Attempts to apply a broker update, by op (`grant`, `revoke`) and result (`ok`, `error`).
    pub broker_updates: IntCounterVec,
    /// Notifications by backend (`log`, `webhook`, `smtp`) and result
    /// (`delivered`, `failed`, `dropped`; `retried` for smtp, one per retry).
    pub notifications: IntCounterVec,
    /// `device.renewal_due` notices raised (certificates marked notified).
    pub renewal_notices: IntCounter,
    /// When the active key of each (purpose, target) was created: its age
    /// is `time() - this`.
    pub key_created: IntGaugeVec,
    /// When policy next rotates the active key of each (purpose, target)
    /// (0: never automatically, e.g. a root).
    pub key_next_rotation: IntGaugeVec,
    /// Rotations by purpose and outcome (`completed`, `failed` step
    /// attempts, `needs_operator`).
    pub rotations: IntCounterVec,
    /// 1 while this daemon holds the scheduler lease (runs the leader-only jobs).
    pub scheduler_leader: IntGauge,
    /// Backup creations by result (`ok`, `error`).
    pub backups: IntCounterVec,
    /// When the newest backup was stored (and its checksum read back), by
    /// location (`spool` for the local directory it is written to first).
    pub backup_last_success: IntGaugeVec,
    /// When the newest backup last passed verification, by location.
    pub backup_last_verified: IntGaugeVec,
    /// Replica uploads and verifications that failed, by location and stage.
    pub backup_failures: IntCounterVec,
    /// Replicas waiting for a retry (failed, not yet stored), all locations.
    pub backup_replicas_pending: IntGauge,
    /// Size in bytes of the newest backup archive.
    pub backup_size_bytes: IntGauge,
    /// 1 while Redis answers (`[redis]`; always 0 without it).
    pub redis_up: IntGauge,
    /// Redis commands that failed or timed out, by op (`get`, `put`,
    /// `delete`, `publish`, `subscribe`, `ratelimit`, `lock`, `ping`).
    pub redis_errors: IntCounterVec,
    /// Shared-cache lookups by cache (`ocsp`, `session`) and result (`hit`,
    /// `miss`, `error`).
    pub cache_requests: IntCounterVec,
    /// The issue 11 catalogue: latency, pool and queue, renewals,
    /// revocations, approvals, queue and expiry gauges ([`ops`]).
    pub ops: ops::OpsMetrics,
}

impl Metrics {
    /// Builds and registers every metric. Fails only if a name or label set
    /// is invalid, which the unit test below rules out.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new_custom(Some("keyward".into()), None)?;
        let counter_vec =
            |name: &str, help: &str, labels: &[&str]| -> Result<IntCounterVec, prometheus::Error> {
                let c = IntCounterVec::new(Opts::new(name, help), labels)?;
                registry.register(Box::new(c.clone()))?;
                Ok(c)
            };
        let histogram =
            |name: &str, help: &str, buckets: Vec<f64>| -> Result<Histogram, prometheus::Error> {
                let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets))?;
                registry.register(Box::new(h.clone()))?;
                Ok(h)
            };
        let http_requests = counter_vec(
            "http_requests_total",
            "HTTP requests by route template and status",
            &["method", "route", "status"],
        )?;
        let certificates_issued = counter_vec(
            "certificates_issued_total",
            "Certificates issued, by issuing CA",
            &["ca"],
        )?;
        let registrations = counter_vec(
            "registrations_total",
            "Registration events by outcome",
            &["outcome"],
        )?;
        let hsm_operations = counter_vec(
            "hsm_operations_total",
            "Key store operations by key store, kind and result",
            &["keystore", "operation", "result"],
        )?;
        let hsm_sign_seconds = histogram(
            "hsm_sign_seconds",
            "Time to obtain one signature from a key store, queueing included",
            prometheus::exponential_buckets(0.00005, 2.0, 16)?,
        )?;
        let store_commit_seconds = histogram(
            "store_commit_seconds",
            "Time the store writer takes to apply and commit one batch (fsync included)",
            prometheus::exponential_buckets(0.0001, 2.0, 16)?,
        )?;
        let store_batch_size = histogram(
            "store_batch_size",
            "Changes committed together in one transaction (group commit)",
            prometheus::exponential_buckets(1.0, 2.0, 12)?,
        )?;
        let admin_auth_failures = IntCounter::new(
            "admin_auth_failures_total",
            "Admin API calls with a missing or wrong token",
        )?;
        registry.register(Box::new(admin_auth_failures.clone()))?;
        let hsm_up = IntGaugeVec::new(
            Opts::new(
                "hsm_up",
                "1 if the key store's last health check succeeded, by key store",
            ),
            &["keystore"],
        )?;
        registry.register(Box::new(hsm_up.clone()))?;
        let rate_limited = counter_vec(
            "rate_limited_total",
            "Requests refused by a per-source rate limit, by limit",
            &["limit"],
        )?;
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let rate_limiter_keys = gauge(
            "rate_limiter_keys",
            "Keys (limit and source) the in-process rate limiter remembers",
        )?;
        let login_failures_unaudited = gauge(
            "login_failures_unaudited",
            "Failed admin logins counted but not yet written to the audit trail (aggregated per window)",
        )?;
        let job_runs = counter_vec(
            "job_runs_total",
            "Background job runs by job and result",
            &["job", "result"],
        )?;
        let job_last_success = IntGaugeVec::new(
            Opts::new(
                "job_last_success_timestamp_seconds",
                "Unix time of the last successful run, by job",
            ),
            &["job"],
        )?;
        registry.register(Box::new(job_last_success.clone()))?;
        let ready = gauge(
            "ready",
            "1 if the last background readiness check found the store and the issuing key stores healthy and is recent",
        )?;
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let g = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(g.clone()))?;
            Ok::<_, prometheus::Error>(g)
        };
        let crl_number = gauge_vec("crl_number", "cRLNumber of the CRL served, by CA", &["ca"])?;
        let crl_next_update = gauge_vec(
            "crl_next_update_timestamp_seconds",
            "Unix time of the nextUpdate of the CRL served, by CA: alert well before it passes",
            &["ca"],
        )?;
        let crl_entries = gauge_vec(
            "crl_entries",
            "Revoked certificates listed in the CRL served, by CA",
            &["ca"],
        )?;
        let crl_publish_failures = counter_vec(
            "crl_publish_failures_total",
            "CRL publications that failed (HSM, store or signature check), by CA",
            &["ca"],
        )?;
        let ocsp = ocsp::OcspMetrics::register(&registry)?;
        let audit = audit::AuditMetrics::register(&registry)?;
        let broker_outbox_pending = gauge(
            "broker_outbox_pending",
            "Broker ACL updates queued and not yet applied (alert when it stays above 0)",
        )?;
        let broker_updates = counter_vec(
            "broker_updates_total",
            "Attempts to apply a broker ACL update, by op and result",
            &["op", "result"],
        )?;
        for op in ["grant", "revoke"] {
            for result in ["ok", "error"] {
                broker_updates.with_label_values(&[op, result]);
            }
        }
        let notifications = counter_vec(
            "notifications_total",
            "Notifications by backend and result (delivered, failed after retries, dropped from a full queue or at shutdown; retried: one per retry, smtp)",
            &["backend", "result"],
        )?;
        let renewal_notices = IntCounter::new(
            "renewal_notices_total",
            "device.renewal_due notifications raised: device certificates whose renewal window opened (once per certificate)",
        )?;
        registry.register(Box::new(renewal_notices.clone()))?;
        let key_created = gauge_vec(
            "key_created_timestamp_seconds",
            "When the active key of each purpose and target (CA name, or server) was created; its age is time() minus this",
            &["purpose", "target"],
        )?;
        let key_next_rotation = gauge_vec(
            "key_next_rotation_timestamp_seconds",
            "When the rotation policy next rotates the active key of each purpose and target (0: never automatically)",
            &["purpose", "target"],
        )?;
        let rotations = counter_vec(
            "rotations_total",
            "Key rotations by purpose and outcome (completed, failed step attempts, needs_operator)",
            &["purpose", "outcome"],
        )?;
        let backups = counter_vec(
            "backups_total",
            "Backup archives made, by result (ok, error)",
            &["result"],
        )?;
        let backup_last_success = gauge_vec(
            "backup_last_success_timestamp_seconds",
            "When the newest backup was stored and its checksum read back, by location (spool: the local directory archives are written to)",
            &["location"],
        )?;
        let backup_last_verified = gauge_vec(
            "backup_last_verified_timestamp_seconds",
            "When the newest backup last passed verification (downloaded, checksum, decrypted and every member hash checked), by location",
            &["location"],
        )?;
        let backup_failures = counter_vec(
            "backup_failures_total",
            "Backup replica uploads and verifications that failed, by location and stage (replicate, verify)",
            &["location", "stage"],
        )?;
        let backup_replicas_pending = gauge(
            "backup_replicas_pending",
            "Backup replicas not stored yet (pending or failed, waiting for a retry), all locations",
        )?;
        let backup_size_bytes = gauge(
            "backup_size_bytes",
            "Size of the newest backup archive in bytes",
        )?;
        let ops = ops::OpsMetrics::register(&registry)?;
        let scheduler_leader = gauge(
            "scheduler_leader",
            "1 while this daemon holds the scheduler lease and runs the leader-only jobs (exactly one daemon per store should)",
        )?;
        let redis_up = gauge(
            "redis_up",
            "1 while Redis answers (always 0 without a [redis] section)",
        )?;
        let redis_errors = counter_vec(
            "redis_errors_total",
            "Redis commands that failed or timed out (each one degraded to the in-process path), by op",
            &["op"],
        )?;
        let cache_requests = counter_vec(
            "cache_requests_total",
            "Lookups in the shared cache, by cache and result",
            &["cache", "result"],
        )?;
        Ok(Self {
            redis_up,
            redis_errors,
            cache_requests,
            ops,
            backups,
            backup_last_success,
            backup_last_verified,
            backup_failures,
            backup_replicas_pending,
            backup_size_bytes,
            key_created,
            key_next_rotation,
            rotations,
            renewal_notices,
            scheduler_leader,
            broker_outbox_pending,
            broker_updates,
            notifications,
            ocsp,
            audit,
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
            rate_limited,
            rate_limiter_keys,
            login_failures_unaudited,
            job_runs,
            job_last_success,
            ready,
            crl_number,
            crl_next_update,
            crl_entries,
            crl_publish_failures,
        })
    }

    /// `method` and `route` must come from bounded sets: [`method_label`],
    /// a route template or [`UNMATCHED_ROUTE`].
    pub fn http(&self, method: &'static str, route: &str, status: u16) {
        self.http_requests
            .with_label_values(&[method, route, &status_label(status)])
            .inc();
    }

    pub fn registration(&self, outcome: &str) {
        self.registrations.with_label_values(&[outcome]).inc();
    }

    pub fn issued(&self, ca: &str) {
        self.certificates_issued.with_label_values(&[ca]).inc();
    }

    /// One key store operation of the key store named `keystore`.
    pub fn hsm(&self, keystore: &str, operation: &str, ok: bool) {
        self.hsm_operations
            .with_label_values(&[keystore, operation, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// One lookup in the shared cache `cache` (`ocsp`, `session`).
    pub fn cache_request(&self, cache: &'static str, result: CacheLookup) {
        self.cache_requests
            .with_label_values(&[cache, result.as_str()])
            .inc();
    }

    pub fn rate_limited(&self, limit: &'static str) {
        self.rate_limited.with_label_values(&[limit]).inc();
    }

    /// One attempt to apply a broker update; `op` is `grant` or `revoke`.
    pub fn broker_update(&self, op: &'static str, ok: bool) {
        self.broker_updates
            .with_label_values(&[op, if ok { "ok" } else { "error" }])
            .inc();
    }

    /// One run of a background job; `at` is the job's clock time.
    pub fn job_run(&self, job: &'static str, ok: bool, at: i64) {
        self.job_runs
            .with_label_values(&[job, if ok { "ok" } else { "error" }])
            .inc();
        if ok {
            self.job_last_success.with_label_values(&[job]).set(at);
        }
    }

    /// Prometheus text exposition (format 0.0.4).
    pub fn render(&self) -> String {
        TextEncoder::new()
            .encode_to_string(&self.registry.gather())
            .unwrap_or_default()
    }
}

/// The `result` label of `keyward_cache_requests_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheLookup {
    Hit,
    Miss,
    /// The cache backend failed; the caller went to the store/HSM.
    Error,
}

impl CacheLookup {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Hit => "hit",
            Self::Miss => "miss",
            Self::Error => "error",
        }
    }
}

/// The metric names of `docs/metrics.md` and their types: each catalogue
/// row is `| `keyward_…` | type | …`. Shared with the daemon test, which
/// checks a real `/metrics` the same way.
pub fn documented_metrics(doc: &str) -> std::collections::BTreeMap<String, String> {
    doc.lines()
        .filter_map(|l| {
            let mut cells = l.strip_prefix('|')?.split('|').map(str::trim);
            let name = cells.next()?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = cells.next()?;
            name.starts_with("keyward_")
                .then(|| (name.to_string(), kind.to_string()))
        })
        .collect()
}

/// `# TYPE name type` of a text exposition.
pub fn rendered_types(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|l| {
            let mut w = l.strip_prefix("# TYPE ")?.split_whitespace();
            Some((w.next()?.to_string(), w.next()?.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn label_values_come_from_bounded_sets() {
        assert_eq!(method_label("GET"), "GET");
        assert_eq!(method_label("PATCH"), "PATCH");
        for m in ["get", "XFOO", "BREW", ""] {
            assert_eq!(method_label(m), "other", "{m}");
        }
        assert_eq!(status_label(404), "404");
        assert_eq!(status_label(999), "other");
    }

    /// Every metric with at least one series (label vectors touched once).
    fn populated() -> Metrics {
        let m = Metrics::new().unwrap();
        m.http("GET", "/healthz", 200);
        m.issued("devices");
        m.registration("submitted");
        m.hsm("default", "sign", true);
        m.admin_auth_failures.inc();
        m.hsm_up.with_label_values(&["default"]).set(1);
        m.hsm_sign_seconds.observe(0.001);
        m.store_commit_seconds.observe(0.001);
        m.store_batch_size.observe(3.0);
        m.rate_limited("registrations");
        m.rate_limiter_keys.set(3);
        m.redis_up.set(1);
        m.redis_errors.with_label_values(&["get"]).inc();
        m.cache_request("ocsp", CacheLookup::Hit);
        m.login_failures_unaudited.set(2);
        m.job_run("sweeper", true, 1_900_000_000);
        m.ready.set(1);
        m.crl_number.with_label_values(&["devices"]).set(7);
        m.crl_next_update
            .with_label_values(&["devices"])
            .set(1_900_086_400);
        m.crl_entries.with_label_values(&["devices"]).set(2);
        m.crl_publish_failures.with_label_values(&["root"]).inc();
        m.broker_outbox_pending.set(4);
        m.broker_update("revoke", false);
        m.ocsp.response(ocsp::OcspOutcome::Revoked);
        m.ocsp.cache(ocsp::CacheResult::NonceIgnored);
        m.ocsp
            .signer_not_after
            .with_label_values(&["devices"])
            .set(7);
        m.notifications
            .with_label_values(&["webhook", "dropped"])
            .inc();
        m.renewal_notices.inc_by(2);
        m.key_created
            .with_label_values(&["issuing-ca", "devices"])
            .set(1_800_000_000);
        m.key_next_rotation
            .with_label_values(&["issuing-ca", "devices"])
            .set(1_900_000_000);
        m.rotations
            .with_label_values(&["issuing-ca", "completed"])
            .inc();
        m.scheduler_leader.set(1);
        m.backups.with_label_values(&["ok"]).inc();
        m.backup_last_success
            .with_label_values(&["spool"])
            .set(1_900_000_000);
        m.backup_last_verified
            .with_label_values(&["spool"])
            .set(1_900_000_000);
        m.backup_failures.with_label_values(&["s3", "verify"]).inc();
        m.backup_replicas_pending.set(1);
        m.backup_size_bytes.set(4096);
        m.ops
            .http_request_duration
            .with_label_values(&["GET", "/healthz"])
            .observe(0.002);
        m.ops
            .hsm_operation_duration
            .with_label_values(&["default", "sign"])
            .observe(0.004);
        m.ops
            .hsm_sessions_in_use
            .with_label_values(&["default"])
            .set(1);
        m.ops
            .hsm_sessions_max
            .with_label_values(&["default"])
            .set(4);
        m.ops
            .yubikey_queue_depth
            .with_label_values(&["root-card"])
            .set(2);
        m.ops
            .certificate_renewals
            .with_label_values(&["devices"])
            .inc();
        m.ops.revoked("key-compromise", 2);
        m.ops.revoked("superseded", 0);
        m.ops.approval("approve");
        m.ops.registrations_pending.set(3);
        m.ops.registrations_pending_oldest_age.set(120);
        m.ops.set_expiry_counts(&[1, 2, 3, 4], 10);
        m.ops
            .key_max_age
            .with_label_values(&["issuing-ca", "devices"])
            .set(94_608_000);
        m.ops
            .crl_this_update
            .with_label_values(&["devices"])
            .set(1_900_000_000);
        m
    }

    #[test]
    fn every_metric_is_registered_and_rendered() {
        let m = populated();
        let text = m.render();
        for name in [
            "keyward_http_requests_total",
            "keyward_certificates_issued_total",
            "keyward_registrations_total",
            "keyward_hsm_operations_total",
            "keyward_hsm_sign_seconds_bucket",
            "keyward_store_commit_seconds_bucket",
            "keyward_store_batch_size_bucket",
            "keyward_admin_auth_failures_total 1",
            "keyward_hsm_up{keystore=\"default\"} 1",
            "keyward_rate_limited_total{limit=\"registrations\"} 1",
            "keyward_rate_limiter_keys 3",
            "keyward_redis_up 1",
            "keyward_redis_errors_total{op=\"get\"} 1",
            "keyward_cache_requests_total{cache=\"ocsp\",result=\"hit\"} 1",
            "keyward_login_failures_unaudited 2",
            "keyward_job_runs_total{job=\"sweeper\",result=\"ok\"} 1",
            "keyward_job_last_success_timestamp_seconds{job=\"sweeper\"} 1900000000",
            "keyward_ready 1",
            "keyward_crl_number{ca=\"devices\"} 7",
            "keyward_crl_next_update_timestamp_seconds{ca=\"devices\"} 1900086400",
            "keyward_crl_entries{ca=\"devices\"} 2",
            "keyward_crl_publish_failures_total{ca=\"root\"} 1",
            "keyward_ocsp_responses_total{status=\"revoked\"} 1",
            "keyward_broker_outbox_pending 4",
            "keyward_broker_updates_total{op=\"revoke\",result=\"error\"} 1",
            "keyward_broker_updates_total{op=\"grant\",result=\"ok\"} 0",
            "keyward_ocsp_responses_total{status=\"good\"} 0",
            "keyward_ocsp_cache_total{result=\"nonce_ignored\"} 1",
            "keyward_ocsp_signer_not_after_timestamp_seconds{ca=\"devices\"} 7",
            "keyward_notifications_total{backend=\"webhook\",result=\"dropped\"} 1",
            "keyward_renewal_notices_total 2",
            "keyward_key_created_timestamp_seconds{purpose=\"issuing-ca\",target=\"devices\"} 1800000000",
            "keyward_key_next_rotation_timestamp_seconds{purpose=\"issuing-ca\",target=\"devices\"} 1900000000",
            "keyward_rotations_total{outcome=\"completed\",purpose=\"issuing-ca\"} 1",
            "keyward_scheduler_leader 1",
            "keyward_hsm_operations_total{keystore=\"default\",operation=\"sign\",result=\"ok\"} 1",
            "keyward_http_request_duration_seconds_bucket{method=\"GET\",route=\"/healthz\",le=\"0.0025\"} 1",
            "keyward_hsm_operation_duration_seconds_count{keystore=\"default\",operation=\"sign\"} 1",
            "keyward_hsm_sessions_in_use{keystore=\"default\"} 1",
            "keyward_hsm_sessions_max{keystore=\"default\"} 4",
            "keyward_yubikey_queue_depth{keystore=\"root-card\"} 2",
            "keyward_certificate_renewals_total{ca=\"devices\"} 1",
            "keyward_certificates_revoked_total{reason=\"key-compromise\"} 2",
            "keyward_certificates_revoked_total{reason=\"superseded\"} 0",
            "keyward_certificates_revoked_total{reason=\"certificate-hold\"} 0",
            "keyward_approvals_total{decision=\"approve\"} 1",
            "keyward_approvals_total{decision=\"deny\"} 0",
            "keyward_registrations_pending 3",
            "keyward_registrations_pending_oldest_age_seconds 120",
            "keyward_certificates_by_expiry{within_days=\"1\"} 1",
            "keyward_certificates_by_expiry{within_days=\"90\"} 4",
            "keyward_certificates_by_expiry{within_days=\"inf\"} 10",
            "keyward_key_max_age_seconds{purpose=\"issuing-ca\",target=\"devices\"} 94608000",
            "keyward_crl_this_update_timestamp_seconds{ca=\"devices\"} 1900000000",
            "keyward_backup_size_bytes 4096",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }

    /// `docs/metrics.md` documents every metric this build renders, with
    /// its type, and documents nothing it does not render: the catalogue
    /// cannot drift from the code.
    #[test]
    fn the_catalogue_documents_every_metric() {
        let doc = include_str!("../../docs/metrics.md");
        let documented = documented_metrics(doc);
        let rendered = rendered_types(&populated().render());
        assert!(rendered.len() >= 45, "{} metrics", rendered.len());
        for (name, kind) in &rendered {
            assert_eq!(
                documented.get(name).map(String::as_str),
                Some(kind.as_str()),
                "docs/metrics.md: `{name}` ({kind}) missing or with another type"
            );
        }
        for name in documented.keys() {
            assert!(
                rendered.contains_key(name),
                "docs/metrics.md documents `{name}`, which is not rendered"
            );
        }
    }

    #[test]
    fn label_bounds_match_the_model() {
        let reasons: Vec<&str> = crate::model::RevocationReason::ALL
            .iter()
            .map(|r| r.as_str())
            .collect();
        assert_eq!(reasons, ops::REVOCATION_REASONS);
        assert_eq!(
            [
                crate::model::Decision::Approve.as_str(),
                crate::model::Decision::Deny.as_str()
            ],
            ops::DECISIONS
        );
    }
}
