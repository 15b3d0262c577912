//! `keyward audit report` and `keyward audit export`: client commands over
//! the admin API (`/v1/admin/audit`, `/v1/admin/audit/export`).

use super::client::{Api, print, query_escape, s};
use super::{ClientArgs, Output};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::io::Write as _;
use std::path::Path;
use std::process::ExitCode;

/// Events per request while following pages.
const PAGE: u32 = 1000;

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// From this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    since: Option<String>,
    /// Before this time (RFC 3339 or Unix seconds).
    #[arg(long)]
    until: Option<String>,
    /// Exact actor (`admin:<id>`, `system`, `cli:init`).
    #[arg(long)]
    actor: Option<String>,
    /// Exact action (`registration.approve`) or a prefix (`key.*`).
    #[arg(long)]
    action: Option<String>,
    /// Exact target (a device, registration, key or CA id or name).
    #[arg(long)]
    target: Option<String>,
    /// Print at most this many events (following pages).
    #[arg(long, default_value_t = 1000)]
    limit: u64,
    /// Start after this cursor (printed on stderr when more remain).
    #[arg(long)]
    after: Option<String>,
    /// Oldest first instead of newest first.
    #[arg(long)]
    oldest_first: bool,
}

fn api(args: &ClientArgs) -> anyhow::Result<Api> {
    Api::new(
        &args.url,
        Some(super::client::admin_token(args)?),
        args.ca_cert.as_deref(),
    )
}

fn query(pairs: &[(&str, Option<&str>)]) -> String {
    pairs
        .iter()
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", query_escape(v))))
        .collect::<Vec<_>>()
        .join("&")
}

fn event_line(e: &Value) {
    let details = if e["details"].as_object().is_some_and(|m| !m.is_empty()) {
        e["details"].to_string()
    } else {
        String::new()
    };
    let sealed = match e["sealed"].as_str() {
        Some(_) if e["reveal_error"].is_object() => {
            format!("  [sealed: {}]", s(&e["reveal_error"]["code"]))
        }
        Some(_) => "  [sealed]".to_string(),
        None => String::new(),
    };
    println!(
        "{:>8}  {}  {:<8}  {:<28}  {:<24}  {}{}{}",
        e["seq"].as_i64().unwrap_or(0),
        s(&e["at"]),
        s(&e["outcome"]),
        s(&e["action"]),
        s(&e["actor"]),
        s(&e["target"]),
        if details.is_empty() { "" } else { "  " },
        details + &sealed
    );
}

pub async fn report(args: &ClientArgs, f: ReportArgs) -> anyhow::Result<ExitCode> {
    if f.limit == 0 {
        bail!("--limit must be at least 1");
    }
    let api = api(args)?;
    let order = if f.oldest_first { "oldest" } else { "newest" };
    let mut after = f.after.clone();
    let mut items: Vec<Value> = Vec::new();
    let mut next: Option<String>;
    loop {
        let want = (f.limit - items.len() as u64)
            .min(u64::from(PAGE))
            .to_string();
        let q = query(&[
            ("since", f.since.as_deref()),
            ("until", f.until.as_deref()),
            ("actor", f.actor.as_deref()),
            ("action", f.action.as_deref()),
            ("target", f.target.as_deref()),
            ("after", after.as_deref()),
            ("limit", Some(want.as_str())),
            ("order", Some(order)),
        ]);
        let (_, v) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/admin/audit?{q}"),
                None,
                None,
            )
            .await?;
        if let Some(page) = v["items"].as_array() {
            items.extend(page.iter().cloned());
        }
        next = v["next_cursor"].as_str().map(str::to_string);
        if next.is_none() || items.len() as u64 >= f.limit {
            break;
        }
        after = next.clone();
    }
    let out = json!({ "items": items, "next_cursor": next });
    print(args.output, &out, |v| {
        for e in v["items"].as_array().into_iter().flatten() {
            event_line(e);
        }
    });
    if let Some(c) = &next
        && args.output == Output::Text
    {
        eprintln!("more: repeat with --after {c}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn export(
    args: &ClientArgs,
    since: Option<String>,
    until: Option<String>,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let api = api(args)?;
    let q = query(&[("since", since.as_deref()), ("until", until.as_deref())]);
    let resp = api.get_raw(&format!("/v1/admin/audit/export?{q}")).await?;
    let file =
        std::fs::File::create(out).with_context(|| format!("cannot create {}", out.display()))?;
    match receive(resp, file, out).await {
        Ok(last) => {
            print(args.output, &last, |v| {
                println!(
                    "exported {} events (seq {}..{}) to {}; signed by audit key {}",
                    v["events"].as_u64().unwrap_or(0),
                    v["from_seq"].as_i64().unwrap_or(0),
                    v["to_seq"].as_i64().unwrap_or(0),
                    out.display(),
                    s(&v["key_id"])
                );
            });
            Ok(ExitCode::SUCCESS)
        }
        Err(e) => {
            // An export without its signed line must not be mistaken for one.
            let _ = std::fs::remove_file(out);
            Err(e)
        }
    }
}

/// Writes the stream to `file`, checks the last line against the digest
/// of every byte before it, and returns that line.
async fn receive(
    mut resp: reqwest::Response,
    mut file: std::fs::File,
    out: &Path,
) -> anyhow::Result<Value> {
    // Everything before the last line, hashed as written, and the last line.
    let mut digest = ring::digest::Context::new(&ring::digest::SHA256);
    let mut pending: Vec<u8> = Vec::new();
    while let Some(chunk) = resp.chunk().await.context(
        "the export stopped before its signed last line (daemon error or connection lost)",
    )? {
        file.write_all(&chunk)
            .with_context(|| format!("cannot write {}", out.display()))?;
        pending.extend_from_slice(&chunk);
        // Hash every complete line but the newest one seen.
        if let Some(cut) = pending[..pending.len().saturating_sub(1)]
            .iter()
            .rposition(|b| *b == b'\n')
        {
            digest.update(&pending[..=cut]);
            pending.drain(..=cut);
        }
    }
    file.sync_all()
        .with_context(|| format!("cannot write {}", out.display()))?;
    let last: Value = serde_json::from_slice(&pending).unwrap_or(Value::Null);
    if last["type"] != "export-checkpoint" {
        bail!(
            "{} is incomplete: it does not end with the signed export checkpoint",
            out.display()
        );
    }
    let sha = hex::encode(digest.finish().as_ref());
    if last["lines_sha256"].as_str() != Some(sha.as_str()) {
        bail!(
            "{}: the lines received do not match the daemon's signed SHA-256 ({} here, {} signed)",
            out.display(),
            sha,
            s(&last["lines_sha256"])
        );
    }
    Ok(last)
}
