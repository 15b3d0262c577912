//! The live audit sink (`[audit.sink]`): every event the daemon's store
//! writer commits is also written, as one JSON line, to a file or to
//! syslog (RFC 5424 over UDP or a unix datagram socket).
//!
//! Two policies:
//! - `fail-closed`: the writer hands the batch's events to the sink after
//!   every change is applied and before the transaction commits; the sink
//!   writes them (a file is fsynced) or the whole batch is rolled back and
//!   every change in it fails with `audit_sink_failed`. The sink is thus
//!   write-ahead: an event it holds may, rarely, belong to a commit that
//!   then failed; its `seq` and `hash` tell a SIEM which events the chain
//!   really holds.
//! - `buffer`: the batch commits whatever the sink does; its events queue in
//!   memory (at most `buffer_max`; on overflow the oldest are dropped and
//!   counted) and a background thread writes them, retrying with backoff.
//!   Metrics: `audit_sink_buffered`, `audit_sink_failures_total{sink}`.
//!
//! Only events committed by this process's store writer reach the sink
//! (`keyward init` and the local break-glass path write through their own).

use super::AuditEvent;
use std::collections::VecDeque;
use std::io::Write as _;
use std::path::PathBuf;
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

/// Where events go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkTarget {
    /// JSON lines appended to a file (created 0600 if absent).
    File(PathBuf),
    /// RFC 5424 messages, one datagram per event, over UDP to `host:port`.
    SyslogUdp(String),
    /// RFC 5424 messages to a unix datagram socket (`/dev/log`).
    SyslogUnix(PathBuf),
}

impl SinkTarget {
    /// The `sink` label of `audit_sink_failures_total`.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::File(_) => "file",
            Self::SyslogUdp(_) | Self::SyslogUnix(_) => "syslog",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SinkPolicy {
    FailClosed,
    Buffer,
}

impl SinkPolicy {
    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "fail-closed" => Some(Self::FailClosed),
            "buffer" => Some(Self::Buffer),
            _ => None,
        }
    }
}

/// `[audit.sink]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SinkConfig {
    pub target: SinkTarget,
    pub policy: SinkPolicy,
    /// `buffer` policy: events held in memory at most (1..=10,000,000).
    pub buffer_max: usize,
}

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("cannot write the audit sink {target}: {source}")]
    Io {
        target: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot encode an audit event for the sink: {0}")]
    Encode(#[from] serde_json::Error),
}

impl SinkError {
    pub fn code(&self) -> &'static str {
        "audit_sink_failed"
    }
}

/// Counters the sink reports to (the daemon's `audit_sink_*` metrics).
#[derive(Clone)]
pub struct SinkMetrics {
    pub buffered: prometheus::IntGauge,
    pub failures: prometheus::IntCounter,
}

impl SinkMetrics {
    pub fn from_audit(m: &crate::metrics::audit::AuditMetrics, target: &SinkTarget) -> Self {
        Self {
            buffered: m.sink_buffered.clone(),
            failures: m.sink_failures.with_label_values(&[target.kind()]),
        }
    }
}

/// Writes events to one target: a file is opened for each write (so log
/// rotation by renaming works), a socket is kept and reopened after a failure.
struct Writer {
    target: SinkTarget,
    udp: Option<std::net::UdpSocket>,
    unix: Option<std::os::unix::net::UnixDatagram>,
    hostname: String,
}

impl Writer {
    fn new(target: SinkTarget) -> Self {
        let hostname = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .ok()
            .map(|h| h.trim().to_string())
            .filter(|h| !h.is_empty() && h.is_ascii() && !h.contains(' '))
            .unwrap_or_else(|| "-".to_string());
        Self {
            target,
            udp: None,
            unix: None,
            hostname,
        }
    }

    fn err(&self, source: std::io::Error) -> SinkError {
        let target = match &self.target {
            SinkTarget::File(p) => format!("file {}", p.display()),
            SinkTarget::SyslogUdp(a) => format!("syslog udp {a}"),
            SinkTarget::SyslogUnix(p) => format!("syslog unix {}", p.display()),
        };
        SinkError::Io { target, source }
    }

    fn write(&mut self, events: &[AuditEvent]) -> Result<(), SinkError> {
        let r = self.write_inner(events);
        if r.is_err() {
            self.udp = None;
            self.unix = None;
        }
        r
    }

    fn write_inner(&mut self, events: &[AuditEvent]) -> Result<(), SinkError> {
        if events.is_empty() {
            return Ok(());
        }
        match self.target.clone() {
            SinkTarget::File(path) => {
                let mut buf = Vec::with_capacity(events.len() * 256);
                for e in events {
                    serde_json::to_writer(&mut buf, e)?;
                    buf.push(b'\n');
                }
                // Opened per write: a rotated (renamed) file is left alone
                // and the next batch starts a new one at `path`.
                use std::os::unix::fs::OpenOptionsExt as _;
                let mut f = std::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .mode(0o600)
                    .open(&path)
                    .map_err(|e| self.err(e))?;
                f.write_all(&buf)
                    .and_then(|()| f.sync_data())
                    .map_err(|e| self.err(e))
            }
            SinkTarget::SyslogUdp(addr) => {
                if self.udp.is_none() {
                    let bind = if addr.starts_with('[') {
                        "[::]:0"
                    } else {
                        "0.0.0.0:0"
                    };
                    let s = std::net::UdpSocket::bind(bind).map_err(|e| self.err(e))?;
                    s.connect(addr.as_str()).map_err(|e| self.err(e))?;
                    self.udp = Some(s);
                }
                for e in events {
                    let msg = syslog_message(e, &self.hostname)?;
                    let r = match &self.udp {
                        Some(s) => s.send(&msg).map(|_| ()),
                        None => Ok(()),
                    };
                    r.map_err(|e| self.err(e))?;
                }
                Ok(())
            }
            SinkTarget::SyslogUnix(path) => {
                if self.unix.is_none() {
                    let s = std::os::unix::net::UnixDatagram::unbound().map_err(|e| self.err(e))?;
                    s.connect(&path).map_err(|e| self.err(e))?;
                    self.unix = Some(s);
                }
                for e in events {
                    let msg = syslog_message(e, &self.hostname)?;
                    let r = match &self.unix {
                        Some(s) => s.send(&msg).map(|_| ()),
                        None => Ok(()),
                    };
                    r.map_err(|e| self.err(e))?;
                }
                Ok(())
            }
        }
    }
}

/// One RFC 5424 message: facility 13 (log audit), severity informational
/// for `success`, notice otherwise; `APP-NAME` keyward, `MSGID` the action,
/// no structured data, the event's JSON as the message.
pub fn syslog_message(e: &AuditEvent, hostname: &str) -> Result<Vec<u8>, SinkError> {
    let severity = match e.outcome {
        super::Outcome::Success => 6,
        _ => 5,
    };
    let pri = 13 * 8 + severity;
    let ts = crate::clock::rfc3339_ms(e.at_ms);
    // MSGID: 1..32 printable US-ASCII characters.
    let msgid: String = e
        .action
        .chars()
        .filter(|c| c.is_ascii_graphic())
        .take(32)
        .collect();
    let msgid = if msgid.is_empty() {
        "-".to_string()
    } else {
        msgid
    };
    let json = serde_json::to_string(e)?;
    Ok(format!(
        "<{pri}>1 {ts} {hostname} keyward {} {msgid} - {json}",
        std::process::id()
    )
    .into_bytes())
}

struct Queue {
    events: VecDeque<AuditEvent>,
    closed: bool,
}

/// The sink the store writer calls (see the module documentation).
pub struct AuditSink {
    policy: SinkPolicy,
    buffer_max: usize,
    metrics: SinkMetrics,
    /// `fail-closed`: written on the writer thread.
    direct: Mutex<Writer>,
    /// `buffer`: the queue the background thread drains.
    queue: Arc<(Mutex<Queue>, Condvar)>,
    dropped: std::sync::atomic::AtomicU64,
}

/// First retry delay of a `buffer` sink; doubles up to [`RETRY_MAX`].
pub const RETRY_MIN: Duration = Duration::from_millis(100);
pub const RETRY_MAX: Duration = Duration::from_secs(30);

impl AuditSink {
    /// Opens nothing yet (the first write does); with the `buffer` policy,
    /// starts the thread that drains the queue.
    pub fn start(config: &SinkConfig, metrics: SinkMetrics) -> Result<Arc<Self>, std::io::Error> {
        let sink = Arc::new(Self {
            policy: config.policy,
            buffer_max: config.buffer_max.max(1),
            metrics,
            direct: Mutex::new(Writer::new(config.target.clone())),
            queue: Arc::new((
                Mutex::new(Queue {
                    events: VecDeque::new(),
                    closed: false,
                }),
                Condvar::new(),
            )),
            dropped: std::sync::atomic::AtomicU64::new(0),
        });
        if config.policy == SinkPolicy::Buffer {
            let queue = sink.queue.clone();
            let writer = Writer::new(config.target.clone());
            let metrics = sink.metrics.clone();
            std::thread::Builder::new()
                .name("keyward-audit-sink".into())
                .spawn(move || drain(queue, writer, metrics))?;
        }
        Ok(sink)
    }

    pub fn policy(&self) -> SinkPolicy {
        self.policy
    }

    /// Events dropped by a full `buffer` queue since start.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Called by the store writer with the events of a batch, before it
    /// commits. `fail-closed`: written now, or an error (the batch rolls
    /// back). `buffer`: nothing yet (see [`AuditSink::committed`]).
    pub fn deliver(&self, events: &[AuditEvent]) -> Result<(), SinkError> {
        if events.is_empty() || self.policy == SinkPolicy::Buffer {
            return Ok(());
        }
        self.write_or_queue(events)
    }

    /// Called by the store writer once the batch committed. `buffer`:
    /// queued now, so that a batch whose commit failed never reaches the
    /// sink (its sequence numbers are reused by the next batch).
    pub fn committed(&self, events: &[AuditEvent]) {
        if events.is_empty() || self.policy != SinkPolicy::Buffer {
            return;
        }
        let _ = self.write_or_queue(events);
    }

    fn write_or_queue(&self, events: &[AuditEvent]) -> Result<(), SinkError> {
        match self.policy {
            SinkPolicy::FailClosed => {
                let mut w = self.direct.lock().unwrap_or_else(|p| p.into_inner());
                let r = w.write(events);
                if let Err(e) = &r {
                    self.metrics.failures.inc();
                    tracing::error!(error = %e, events = events.len(), "audit sink failed: the batch is refused (fail-closed)");
                }
                r
            }
            SinkPolicy::Buffer => {
                let (lock, cv) = &*self.queue;
                let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                q.events.extend(events.iter().cloned());
                let mut dropped = 0u64;
                while q.events.len() > self.buffer_max {
                    q.events.pop_front();
                    dropped += 1;
                }
                if dropped > 0 {
                    self.dropped
                        .fetch_add(dropped, std::sync::atomic::Ordering::Relaxed);
                    tracing::error!(
                        dropped,
                        buffer_max = self.buffer_max,
                        "audit sink buffer full: the oldest events were dropped (the store still holds them)"
                    );
                }
                self.metrics.buffered.set(q.events.len() as i64);
                cv.notify_one();
                Ok(())
            }
        }
    }

    /// Stops the background thread after it has tried the queue once more.
    pub fn close(&self) {
        let (lock, cv) = &*self.queue;
        lock.lock().unwrap_or_else(|p| p.into_inner()).closed = true;
        cv.notify_all();
    }
}

impl Drop for AuditSink {
    fn drop(&mut self) {
        self.close();
    }
}

/// The `buffer` policy's thread: writes what is queued, oldest first, in
/// chunks; on failure keeps the events and retries with backoff.
fn drain(queue: Arc<(Mutex<Queue>, Condvar)>, mut writer: Writer, metrics: SinkMetrics) {
    const CHUNK: usize = 512;
    let (lock, cv) = &*queue;
    let mut delay = RETRY_MIN;
    loop {
        let chunk: Vec<AuditEvent> = {
            let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
            while q.events.is_empty() && !q.closed {
                q = cv.wait(q).unwrap_or_else(|p| p.into_inner());
            }
            if q.events.is_empty() && q.closed {
                return;
            }
            q.events.iter().take(CHUNK).cloned().collect()
        };
        match writer.write(&chunk) {
            Ok(()) => {
                delay = RETRY_MIN;
                let mut q = lock.lock().unwrap_or_else(|p| p.into_inner());
                // Only what was written leaves the queue: the producer may
                // have dropped some of it meanwhile (overflow), so match by seq.
                let last = chunk.last().map_or(i64::MIN, |e| e.seq);
                while q.events.front().is_some_and(|e| e.seq <= last) {
                    q.events.pop_front();
                }
                metrics.buffered.set(q.events.len() as i64);
            }
            Err(e) => {
                metrics.failures.inc();
                tracing::warn!(error = %e, retry_in_ms = delay.as_millis() as u64, "audit sink write failed; events stay buffered");
                let q = lock.lock().unwrap_or_else(|p| p.into_inner());
                if q.closed {
                    return;
                }
                let _ = cv.wait_timeout(q, delay);
                delay = (delay * 2).min(RETRY_MAX);
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn event(seq: i64) -> AuditEvent {
        AuditEvent::chain(
            crate::audit::AuditDraft::new("system", "key.generate", "k1"),
            seq,
            1_767_225_600_123,
            vec![0; 32],
        )
    }

    fn metrics() -> SinkMetrics {
        SinkMetrics {
            buffered: prometheus::IntGauge::new("b", "b").unwrap(),
            failures: prometheus::IntCounter::new("f", "f").unwrap(),
        }
    }

    #[test]
    fn syslog_message_is_rfc5424() {
        let m = String::from_utf8(syslog_message(&event(7), "host1").unwrap()).unwrap();
        let prefix = format!(
            "<110>1 2026-01-01T00:00:00.123Z host1 keyward {} key.generate - {{",
            std::process::id()
        );
        assert!(m.starts_with(&prefix), "{m}");
        let json = m.split_once(" - ").unwrap().1;
        let back: AuditEvent = serde_json::from_str(json).unwrap();
        assert_eq!(back, event(7));
        let mut denied = event(8);
        denied.outcome = crate::audit::Outcome::Denied;
        assert!(
            syslog_message(&denied, "h")
                .unwrap()
                .starts_with(b"<109>1 ")
        );
    }

    #[test]
    fn buffer_drops_the_oldest_beyond_its_bound_and_never_fails() {
        let dir = tempfile::tempdir().unwrap();
        let m = metrics();
        let sink = AuditSink::start(
            &SinkConfig {
                target: SinkTarget::File(dir.path().join("missing/sink.jsonl")),
                policy: SinkPolicy::Buffer,
                buffer_max: 2,
            },
            m.clone(),
        )
        .unwrap();
        let events: Vec<_> = (1..=5).map(event).collect();
        // Nothing is queued before the batch commits (a failed commit must
        // never reach the sink), everything once it has.
        sink.deliver(&events).unwrap();
        assert_eq!(m.buffered.get(), 0);
        sink.committed(&events);
        assert_eq!(sink.dropped(), 3);
        assert!(m.buffered.get() <= 2);
        // The directory appears: the two newest are written, in order.
        std::fs::create_dir(dir.path().join("missing")).unwrap();
        let path = dir.path().join("missing/sink.jsonl");
        for _ in 0..600 {
            let text = std::fs::read_to_string(&path).unwrap_or_default();
            if text.lines().count() == 2 {
                let seqs: Vec<i64> = text
                    .lines()
                    .map(|l| serde_json::from_str::<AuditEvent>(l).unwrap().seq)
                    .collect();
                assert_eq!(seqs, [4, 5]);
                return;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!("the buffered events were not written");
    }

    #[test]
    fn fail_closed_reports_the_error_and_counts_it() {
        let m = metrics();
        let sink = AuditSink::start(
            &SinkConfig {
                target: SinkTarget::File("/dev/full".into()),
                policy: SinkPolicy::FailClosed,
                buffer_max: 1,
            },
            m.clone(),
        )
        .unwrap();
        let e = sink.deliver(&[event(1)]).unwrap_err();
        assert_eq!(e.code(), "audit_sink_failed");
        assert!(e.to_string().contains("/dev/full"), "{e}");
        assert_eq!(m.failures.get(), 1);
        // Nothing to write is never an error.
        sink.deliver(&[]).unwrap();
    }
}
