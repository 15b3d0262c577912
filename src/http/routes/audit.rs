//! Audit reports and signed exports (`/v1/admin/audit`), role auditor or
//! above.
//!
//! Reports: filtered, keyset-paginated by sequence number, newest first by
//! default. Auditors see sealed details decrypted
//! ([`AuditService::reveal`]); other roles see them redacted. An event
//! that cannot be revealed is returned redacted with `reveal_error`.
//!
//! Exports: JSON lines, oldest first, one event each exactly as stored
//! (sealed details stay ciphertext, so every line's chain hash can be
//! recomputed), then one line signed in the HSM by the audit key
//! ([`crate::audit::checkpoint::ExportCheckpoint`]).

use crate::audit::AuditEvent;
use crate::audit::service::{AuditError, AuditService};
use crate::auth::Role;
use crate::http::AppState;
use crate::http::error::ApiError;
use crate::http::extract::{Admin, ApiQuery};
use crate::store::{AuditFilter, Order};
use axum::Json;
use axum::body::{Body, Bytes};
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde::{Deserialize, Serialize};

impl From<AuditError> for ApiError {
    fn from(e: AuditError) -> Self {
        match e {
            AuditError::Store(s) => s.into(),
            AuditError::KeyStore(k) => k.into(),
            AuditError::NoKey => {
                Self::new(StatusCode::SERVICE_UNAVAILABLE, e.code(), e.to_string())
            }
            other => {
                tracing::error!(code = other.code(), error = %other, "audit service error");
                Self::new(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    other.code(),
                    other.to_string(),
                )
            }
        }
    }
}

/// Events per store read while exporting.
const EXPORT_PAGE: u32 = 1000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReportQuery {
    since: Option<String>,
    until: Option<String>,
    actor: Option<String>,
    action: Option<String>,
    target: Option<String>,
    after: Option<String>,
    limit: Option<u32>,
    order: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    since: Option<String>,
    until: Option<String>,
}

/// A report item: the event, and why its sealed details stayed hidden
/// from an auditor, if they did.
#[derive(Serialize)]
pub struct EventView {
    #[serde(flatten)]
    event: AuditEvent,
    /// When the event was recorded (RFC 3339), beside `at_ms`.
    at: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    reveal_error: Option<RevealError>,
}

#[derive(Serialize)]
pub struct RevealError {
    code: &'static str,
    message: String,
}

#[derive(Serialize)]
pub struct ReportPage {
    items: Vec<EventView>,
    /// Pass as `after` for the next page; absent on the last page.
    #[serde(skip_serializing_if = "Option::is_none")]
    next_cursor: Option<String>,
}

fn invalid(message: impl Into<String>) -> ApiError {
    ApiError::bad_request("invalid_query", message)
}

/// A time bound: Unix seconds (an integer) or RFC 3339; returns Unix ms.
fn parse_time(name: &str, v: &str) -> Result<i64, ApiError> {
    if let Ok(secs) = v.parse::<i64>() {
        return secs
            .checked_mul(1000)
            .ok_or_else(|| invalid(format!("`{name}` is out of range")));
    }
    let t = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
        .map_err(|_| {
            invalid(format!(
                "`{name}` is neither Unix seconds nor an RFC 3339 time (2026-01-31T12:00:00Z)"
            ))
        })?;
    i64::try_from(t.unix_timestamp_nanos() / 1_000_000)
        .map_err(|_| invalid(format!("`{name}` is out of range")))
}

fn bounds(
    since: Option<&str>,
    until: Option<&str>,
) -> Result<(Option<i64>, Option<i64>), ApiError> {
    let since = since
        .filter(|s| !s.is_empty())
        .map(|s| parse_time("since", s))
        .transpose()?;
    let until = until
        .filter(|s| !s.is_empty())
        .map(|s| parse_time("until", s))
        .transpose()?;
    if let (Some(s), Some(u)) = (since, until)
        && s >= u
    {
        return Err(invalid("`since` must be before `until`"));
    }
    Ok((since, until))
}

fn text_filter(name: &str, v: Option<String>) -> Result<Option<String>, ApiError> {
    match v {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) if s.len() > 512 => Err(invalid(format!("`{name}` is longer than 512 bytes"))),
        Some(s) => Ok(Some(s)),
    }
}

/// `GET /v1/admin/audit?since=&until=&actor=&action=&target=&after=&limit=&order=`.
pub async fn report(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ReportQuery>,
) -> Result<Json<ReportPage>, ApiError> {
    let me = admin.require(Role::Auditor)?;
    let (since_ms, until_ms) = bounds(q.since.as_deref(), q.until.as_deref())?;
    let action = text_filter("action", q.action)?;
    if let Some(a) = &action {
        crate::store::audit_action_filter(a).map_err(|e| match e {
            crate::store::StoreError::InvalidArgument(m) => invalid(format!("`action`: {m}")),
            other => invalid(other.to_string()),
        })?;
    }
    let after = match q.after.as_deref() {
        None | Some("") => None,
        Some(a) => Some(
            a.parse::<i64>()
                .ok()
                .filter(|n| *n >= 0)
                .ok_or_else(|| invalid("`after` is not a cursor this server issued"))?,
        ),
    };
    let limit = q.limit.unwrap_or(crate::http::page::DEFAULT_LIMIT);
    if !(1..=crate::http::page::MAX_LIMIT).contains(&limit) {
        return Err(invalid(format!(
            "`limit` must be 1-{}",
            crate::http::page::MAX_LIMIT
        )));
    }
    let order = match q.order.as_deref() {
        None | Some("") | Some("newest") => Order::NewestFirst,
        Some("oldest") => Order::OldestFirst,
        Some(o) => return Err(invalid(format!("unknown order `{o}` (newest, oldest)"))),
    };
    let page = state
        .store
        .audit_report(AuditFilter {
            since_ms,
            until_ms,
            actor: text_filter("actor", q.actor)?,
            action,
            target: text_filter("target", q.target)?,
            after,
            limit,
            order,
        })
        .await?;
    let auditor = me.role == Role::Auditor;
    let mut items = Vec::with_capacity(page.items.len());
    for mut event in page.items {
        let mut reveal_error = None;
        if auditor {
            if let Err(e) = state.audit.reveal(&mut event).await {
                tracing::warn!(seq = event.seq, code = e.code(), error = %e, "audit report: sealed details not revealed");
                reveal_error = Some(RevealError {
                    code: e.code(),
                    message: e.to_string(),
                });
                AuditService::redact(&mut event);
            }
        } else {
            AuditService::redact(&mut event);
        }
        items.push(EventView {
            at: crate::clock::rfc3339_ms(event.at_ms),
            event,
            reveal_error,
        });
    }
    Ok(Json(ReportPage {
        items,
        next_cursor: page.next.map(|n| n.to_string()),
    }))
}

/// `GET /v1/admin/audit/export?since=&until=`: JSON lines, streamed; the
/// last line is the signed export checkpoint. A failure after the first
/// byte aborts the response, so the checkpoint line is missing and the
/// export does not verify.
pub async fn export(
    State(state): State<AppState>,
    admin: Admin,
    ApiQuery(q): ApiQuery<ExportQuery>,
) -> Result<Response, ApiError> {
    admin.require(Role::Auditor)?;
    let (since_ms, until_ms) = bounds(q.since.as_deref(), q.until.as_deref())?;
    if state.audit.key().await.is_none() {
        return Err(AuditError::NoKey.into());
    }
    let (tx, rx) = futures::channel::mpsc::channel::<Result<Bytes, std::io::Error>>(4);
    tokio::spawn(produce(state, since_ms, until_ms, tx));
    Ok((
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/x-ndjson")],
        Body::from_stream(rx),
    )
        .into_response())
}

async fn produce(
    state: AppState,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    mut tx: futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>,
) {
    use futures::SinkExt as _;
    let r = export_lines(&state, since_ms, until_ms, &mut tx).await;
    if let Err(e) = r {
        tracing::error!(code = e.code(), error = %e, "audit export aborted");
        let _ = tx.send(Err(std::io::Error::other(e.to_string()))).await;
    }
}

async fn export_lines(
    state: &AppState,
    since_ms: Option<i64>,
    until_ms: Option<i64>,
    tx: &mut futures::channel::mpsc::Sender<Result<Bytes, std::io::Error>>,
) -> Result<(), AuditError> {
    use futures::SinkExt as _;
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut after = None;
    let (mut from_seq, mut to_seq, mut count) = (0i64, 0i64, 0u64);
    let mut head_hash = hex::encode(crate::audit::GENESIS_HASH);
    loop {
        let page = state
            .store
            .audit_report(AuditFilter {
                since_ms,
                until_ms,
                after,
                limit: EXPORT_PAGE,
                order: Order::OldestFirst,
                ..AuditFilter::default()
            })
            .await?;
        let mut buf = Vec::with_capacity(page.items.len() * 300);
        for e in &page.items {
            if count == 0 {
                from_seq = e.seq;
            }
            count += 1;
            to_seq = e.seq;
            head_hash = hex::encode(&e.hash);
            serde_json::to_writer(&mut buf, e)
                .map_err(|x| AuditError::Store(crate::store::StoreError::Corrupt(x.to_string())))?;
            buf.push(b'\n');
        }
        digest.update(&buf);
        if !buf.is_empty() && tx.send(Ok(Bytes::from(buf))).await.is_err() {
            // The client went away.
            return Ok(());
        }
        match page.next {
            Some(n) => after = Some(n),
            None => break,
        }
    }
    let lines_sha256 = hex::encode(digest.finish().as_ref());
    // A trail that fails verification is never signed: the response ends
    // without its signed line, which the CLI and the documented check
    // treat as a failed export.
    state
        .audit
        .check_export_range(from_seq, to_seq, &head_hash)
        .await?;
    let cp = state
        .audit
        .sign_export(
            from_seq,
            to_seq,
            count,
            &head_hash,
            &lines_sha256,
            since_ms,
            until_ms,
        )
        .await?;
    let mut line = serde_json::to_vec(&cp)
        .map_err(|x| AuditError::Store(crate::store::StoreError::Corrupt(x.to_string())))?;
    line.push(b'\n');
    let _ = tx.send(Ok(Bytes::from(line))).await;
    Ok(())
}
