//! Failed admin logins, counted per source and window in bounded memory until audited.
//!
//! Invariant 2 wants admin login failures audited; one audit row per wrong
//! token would let anyone grow the audit trail (and the disk) at line rate.
//! So failures are counted per source in fixed windows aligned to the epoch
//! (`[k·w, (k+1)·w)`), and each closed window becomes one
//! `admin.login_failed` event with the count and the reasons. The flusher job
//! writes closed windows; on clean shutdown it writes the open ones too.
//!
//! Memory is bounded by `max_sources` windows: failures from further sources
//! in the same window are counted in one overflow window per time window, so
//! counts stay exact while distinct sources beyond the bound are not named.

use crate::audit::{AuditDraft, Outcome};
use crate::clock::{from_unix, rfc3339};
use serde_json::json;
use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use time::OffsetDateTime;

/// Why a login failed, as counted in the event's `reasons`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum FailureReason {
    /// A token that matches no admin.
    UnknownToken,
    /// The token of a disabled admin.
    AccountDisabled,
    /// Refused unchecked: the source was over its failure limit.
    RateLimited,
    /// An invitation redeemed with a wrong, used, denied or expired code.
    InvalidInvitation,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::UnknownToken => "unknown_token",
            Self::AccountDisabled => "account_disabled",
            Self::RateLimited => "rate_limited",
            Self::InvalidInvitation => "invalid_invitation",
        }
    }
}

/// The source name of the overflow window.
pub const OVERFLOW_SOURCE: &str = "other";

/// One source's failures in one window.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailureWindow {
    /// The client address (or /64), or [`OVERFLOW_SOURCE`].
    pub source: String,
    /// Unix seconds, inclusive.
    pub start: i64,
    /// Unix seconds, exclusive; earlier than the nominal end when flushed at shutdown.
    pub end: i64,
    pub count: u64,
    pub reasons: BTreeMap<FailureReason, u64>,
}

impl FailureWindow {
    /// The audit event for this window.
    pub fn audit(&self) -> AuditDraft {
        let overflow = self.source == OVERFLOW_SOURCE;
        let reasons: serde_json::Map<String, serde_json::Value> = self
            .reasons
            .iter()
            .map(|(r, n)| (r.as_str().to_string(), json!(n)))
            .collect();
        AuditDraft::new(
            "anonymous",
            "admin.login_failed",
            format!("source:{}", self.source),
        )
        .outcome(Outcome::Denied)
        .details(json!({
            "source": self.source,
            "count": self.count,
            "window_start": rfc3339(from_unix(self.start)),
            "window_end": rfc3339(from_unix(self.end)),
            "reasons": reasons,
            "overflow": overflow,
        }))
        .source((!overflow).then_some(self.source.as_str()))
    }

    fn merge(&mut self, other: &FailureWindow) {
        self.count += other.count;
        for (r, n) in &other.reasons {
            *self.reasons.entry(*r).or_default() += n;
        }
        self.end = self.end.max(other.end);
    }
}

#[derive(Default)]
struct Windows {
    /// (source, window start) → window.
    by_source: HashMap<(String, i64), FailureWindow>,
    /// window start → failures of sources beyond the bound.
    overflow: BTreeMap<i64, FailureWindow>,
}

/// The aggregator: [`Self::record`] on each failure, [`Self::take_closed`]
/// from the flusher, [`Self::take_all`] at shutdown.
pub struct LoginFailureLog {
    window_secs: i64,
    max_sources: usize,
    windows: Mutex<Windows>,
}

impl LoginFailureLog {
    pub fn new(window_secs: u64, max_sources: usize) -> Self {
        Self {
            window_secs: i64::try_from(window_secs).unwrap_or(i64::MAX).max(1),
            max_sources: max_sources.max(1),
            windows: Mutex::new(Windows::default()),
        }
    }

    pub fn window_secs(&self) -> i64 {
        self.window_secs
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Windows> {
        match self.windows.lock() {
            Ok(g) => g,
            Err(p) => p.into_inner(),
        }
    }

    fn window_start(&self, t: i64) -> i64 {
        t.div_euclid(self.window_secs) * self.window_secs
    }

    /// Counts one failure from `source` at `now`.
    pub fn record(&self, source: &str, reason: FailureReason, now: OffsetDateTime) {
        let start = self.window_start(now.unix_timestamp());
        let end = start.saturating_add(self.window_secs);
        let mut w = self.lock();
        let key = (source.to_string(), start);
        let known = w.by_source.contains_key(&key);
        let window = if !known && w.by_source.len() >= self.max_sources {
            w.overflow.entry(start).or_insert_with(|| FailureWindow {
                source: OVERFLOW_SOURCE.to_string(),
                start,
                end,
                count: 0,
                reasons: BTreeMap::new(),
            })
        } else {
            w.by_source.entry(key).or_insert_with(|| FailureWindow {
                source: source.to_string(),
                start,
                end,
                count: 0,
                reasons: BTreeMap::new(),
            })
        };
        window.count += 1;
        *window.reasons.entry(reason).or_default() += 1;
    }

    /// Removes and returns the windows that closed by `now`, oldest first.
    pub fn take_closed(&self, now: OffsetDateTime) -> Vec<FailureWindow> {
        let now = now.unix_timestamp();
        let mut w = self.lock();
        let mut out: Vec<FailureWindow> = Vec::new();
        let closed: Vec<(String, i64)> = w
            .by_source
            .iter()
            .filter(|(_, win)| win.end <= now)
            .map(|(k, _)| k.clone())
            .collect();
        for k in closed {
            if let Some(win) = w.by_source.remove(&k) {
                out.push(win);
            }
        }
        let still_open = w.overflow.split_off(&(self.window_start(now)));
        out.extend(std::mem::replace(&mut w.overflow, still_open).into_values());
        out.sort_by(|a, b| (a.start, &a.source).cmp(&(b.start, &b.source)));
        out
    }

    /// Removes and returns every window, open ones cut at `now` (shutdown).
    pub fn take_all(&self, now: OffsetDateTime) -> Vec<FailureWindow> {
        let now = now.unix_timestamp();
        let mut w = self.lock();
        let mut out: Vec<FailureWindow> = w.by_source.drain().map(|(_, v)| v).collect();
        out.extend(std::mem::take(&mut w.overflow).into_values());
        for win in &mut out {
            // An open window ends now; never before it started.
            win.end = win.end.min(now.max(win.start));
        }
        out.sort_by(|a, b| (a.start, &a.source).cmp(&(b.start, &b.source)));
        out
    }

    /// Puts windows back after a failed write, so that the next flush
    /// retries them. May exceed the bound by what was taken out.
    pub fn restore(&self, windows: Vec<FailureWindow>) {
        let mut w = self.lock();
        for win in windows {
            if win.source == OVERFLOW_SOURCE {
                match w.overflow.get_mut(&win.start) {
                    Some(existing) => existing.merge(&win),
                    None => {
                        w.overflow.insert(win.start, win);
                    }
                }
            } else {
                let key = (win.source.clone(), win.start);
                match w.by_source.get_mut(&key) {
                    Some(existing) => existing.merge(&win),
                    None => {
                        w.by_source.insert(key, win);
                    }
                }
            }
        }
    }

    /// Failures counted and not yet taken.
    pub fn pending(&self) -> u64 {
        let w = self.lock();
        w.by_source.values().map(|x| x.count).sum::<u64>()
            + w.overflow.values().map(|x| x.count).sum::<u64>()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::datetime;

    const T0: OffsetDateTime = datetime!(2030-01-01 00:00 UTC);

    fn secs(s: i64) -> time::Duration {
        time::Duration::seconds(s)
    }

    #[test]
    fn one_window_per_source_with_exact_counts_and_reasons() {
        let log = LoginFailureLog::new(60, 100);
        for i in 0..1000 {
            let reason = if i < 10 {
                FailureReason::UnknownToken
            } else {
                FailureReason::RateLimited
            };
            log.record(
                "192.0.2.1",
                reason,
                T0 + time::Duration::milliseconds(i * 10),
            );
        }
        log.record("192.0.2.2", FailureReason::AccountDisabled, T0 + secs(5));
        // Nothing closed while the window is open.
        assert!(log.take_closed(T0 + secs(59)).is_empty());
        assert_eq!(log.pending(), 1001);
        let closed = log.take_closed(T0 + secs(60));
        assert_eq!(closed.len(), 2);
        let a = &closed[0];
        assert_eq!(a.source, "192.0.2.1");
        assert_eq!(a.count, 1000);
        assert_eq!(a.reasons[&FailureReason::UnknownToken], 10);
        assert_eq!(a.reasons[&FailureReason::RateLimited], 990);
        assert_eq!(
            (a.start, a.end),
            (T0.unix_timestamp(), T0.unix_timestamp() + 60)
        );
        let draft = a.audit();
        assert_eq!(draft.action, "admin.login_failed");
        assert_eq!(draft.outcome, Outcome::Denied);
        assert_eq!(draft.source.as_deref(), Some("192.0.2.1"));
        assert_eq!(draft.details["count"], 1000);
        assert_eq!(draft.details["reasons"]["rate_limited"], 990);
        assert_eq!(draft.details["window_start"], "2030-01-01T00:00:00Z");
        assert_eq!(draft.details["window_end"], "2030-01-01T00:01:00Z");
        assert_eq!(log.pending(), 0);
        assert!(log.take_closed(T0 + secs(3600)).is_empty());
    }

    #[test]
    fn windows_are_fixed_and_a_new_one_starts_after_the_boundary() {
        let log = LoginFailureLog::new(60, 100);
        log.record("s", FailureReason::UnknownToken, T0 + secs(59));
        log.record("s", FailureReason::UnknownToken, T0 + secs(60));
        let closed = log.take_closed(T0 + secs(61));
        assert_eq!(closed.len(), 1);
        assert_eq!(closed[0].count, 1);
        // The second window is still open; at shutdown it is cut at `now`.
        let rest = log.take_all(T0 + secs(70));
        assert_eq!(rest.len(), 1);
        assert_eq!(rest[0].start, T0.unix_timestamp() + 60);
        assert_eq!(rest[0].end, T0.unix_timestamp() + 70);
    }

    #[test]
    fn memory_is_bounded_and_overflow_keeps_the_count() {
        let log = LoginFailureLog::new(60, 10);
        for i in 0..5000 {
            log.record(
                &format!("10.0.{}.{}", i / 256, i % 256),
                FailureReason::UnknownToken,
                T0,
            );
        }
        {
            let w = log.lock();
            assert_eq!(w.by_source.len(), 10);
            assert_eq!(w.overflow.len(), 1);
        }
        let closed = log.take_closed(T0 + secs(60));
        assert_eq!(closed.len(), 11);
        assert_eq!(closed.iter().map(|w| w.count).sum::<u64>(), 5000);
        let overflow = closed.iter().find(|w| w.source == OVERFLOW_SOURCE).unwrap();
        assert_eq!(overflow.count, 4990);
        let draft = overflow.audit();
        assert_eq!(draft.source, None);
        assert_eq!(draft.details["overflow"], true);
    }

    #[test]
    fn restored_windows_are_retried_and_merged() {
        let log = LoginFailureLog::new(60, 10);
        log.record("s", FailureReason::UnknownToken, T0);
        let taken = log.take_closed(T0 + secs(60));
        assert_eq!(taken.len(), 1);
        log.restore(taken);
        // A late failure of the same window (recorded before the flush retried).
        log.record("s", FailureReason::UnknownToken, T0 + secs(1));
        let again = log.take_closed(T0 + secs(120));
        assert_eq!(again.len(), 1);
        assert_eq!(again[0].count, 2);
    }
}
