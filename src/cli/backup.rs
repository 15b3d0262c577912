//! `keyward backup …`: `create`, `list`, `show`, `verify` go through the
//! admin API (the daemon holds the HSM sessions and the store); `restore`
//! and `fetch` run locally with the daemon stopped (a restore replaces the
//! store and fills the token), reading the config for the store, the key
//! stores and the locations.

use super::client::{Api, ApiFailure, print, s};
use super::{ClientArgs, Output};
use crate::backup::location::Location;
use crate::backup::restore::{RestoreOptions, restore as run_restore};
use crate::config::Config;
use anyhow::{Context, bail};
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

/// How long `create` waits for the daemon to finish the archive.
const WAIT_LIMIT: Duration = Duration::from_secs(3600);

fn api(args: &ClientArgs) -> anyhow::Result<Api> {
    Api::new(
        &args.url,
        Some(super::client::admin_token(args)?),
        args.ca_cert.as_deref(),
    )
}

fn backup_line(b: &Value) {
    let replicas: Vec<String> = b["replicas"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|r| format!("{}={}", s(&r["location"]), s(&r["state"])))
                .collect()
        })
        .unwrap_or_default();
    println!(
        "{}  {}  {:>12}  {}  {}",
        s(&b["id"]),
        s(&b["created_at"]),
        b["size_bytes"].as_i64().unwrap_or(0),
        s(&b["status"]),
        replicas.join(" ")
    );
}

pub async fn create(args: &ClientArgs, wait: bool) -> anyhow::Result<ExitCode> {
    let api = api(args)?;
    let (_, v) = api
        .call(reqwest::Method::POST, "/v1/admin/backups", None, None)
        .await?;
    let id = s(&v["id"]).to_string();
    if !wait {
        print(args.output, &v, |_| println!("backup {id} started"));
        return Ok(ExitCode::SUCCESS);
    }
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let (_, b) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/admin/backups/{id}"),
                None,
                None,
            )
            .await?;
        match s(&b["status"]) {
            "running" => {}
            "failed" => bail!(ApiFailure {
                status: reqwest::StatusCode::OK,
                code: s(&b["code"]).to_string(),
                message: s(&b["error"]).to_string(),
            }),
            _ => {
                // The archive exists; a replica that failed (retried by the
                // daemon with backoff) still makes the command fail, so that
                // scripts notice.
                let failed = b["replicas"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|r| r["state"] == "failed");
                print(args.output, &b, |b| {
                    println!(
                        "backup {} made: {} ({} bytes, sha256 {})",
                        s(&b["id"]),
                        s(&b["file_name"]),
                        b["size_bytes"].as_i64().unwrap_or(0),
                        s(&b["sha256"])
                    );
                    for r in b["replicas"].as_array().into_iter().flatten() {
                        let err = r["last_error"].as_str().map(|e| format!(": {e}"));
                        println!(
                            "  {:<16} {}{}",
                            s(&r["location"]),
                            s(&r["state"]),
                            err.unwrap_or_default()
                        );
                    }
                });
                if failed {
                    eprintln!(
                        "error: backup_replica_failed: the backup was made but not stored in every location; the daemon retries (keyward backup show {id})"
                    );
                    return Ok(ExitCode::FAILURE);
                }
                return Ok(ExitCode::SUCCESS);
            }
        }
        if tokio::time::Instant::now() > deadline {
            bail!("backup {id} is still running after {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

pub async fn list(args: &ClientArgs, all: bool) -> anyhow::Result<ExitCode> {
    let (_, v) = api(args)?
        .call(
            reqwest::Method::GET,
            &format!("/v1/admin/backups?include_pruned={all}"),
            None,
            None,
        )
        .await?;
    print(args.output, &v, |v| {
        for b in v.as_array().into_iter().flatten() {
            backup_line(b);
        }
    });
    Ok(ExitCode::SUCCESS)
}

pub async fn show(args: &ClientArgs, id: &str) -> anyhow::Result<ExitCode> {
    let (_, v) = api(args)?
        .call(
            reqwest::Method::GET,
            &format!("/v1/admin/backups/{id}"),
            None,
            None,
        )
        .await?;
    print(args.output, &v, |v| {
        println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    });
    Ok(ExitCode::SUCCESS)
}

/// Exit status 1 when any location failed.
pub async fn verify(args: &ClientArgs, id: Option<&str>) -> anyhow::Result<ExitCode> {
    let id = id.unwrap_or("latest");
    let (_, v) = api(args)?
        .call(
            reqwest::Method::POST,
            &format!("/v1/admin/backups/{id}/verify"),
            None,
            None,
        )
        .await?;
    let results = v["results"].as_array().cloned().unwrap_or_default();
    let ok = !results.is_empty() && results.iter().all(|r| r["ok"].as_bool() == Some(true));
    print(args.output, &v, |v| {
        println!("backup {} ({})", s(&v["backup_id"]), s(&v["file_name"]));
        for r in &results {
            println!(
                "  {:<16} {:<5} {:<8} {}",
                s(&r["location"]),
                if r["ok"].as_bool() == Some(true) {
                    "ok"
                } else {
                    "FAIL"
                },
                s(&r["depth"]),
                r["error"].as_str().unwrap_or("")
            );
        }
    });
    Ok(if ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

pub async fn restore(
    config_path: &Path,
    output: Output,
    archive: PathBuf,
    identity_files: Vec<PathBuf>,
    force: bool,
    dry_run: bool,
    pins: (Option<String>, Option<String>),
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let metrics = std::sync::Arc::new(crate::metrics::Metrics::new()?);
    let keystores = crate::app::open_keystores(&config, &metrics).await?;
    let opts = RestoreOptions {
        archive,
        identity_files,
        force,
        dry_run,
        actor: "cli:restore".into(),
        expect_sha256: pins.0,
        expect_root_sha256: pins.1,
    };
    let report = run_restore(&config, &keystores, &opts, time::OffsetDateTime::now_utc()).await;
    for (_, ks) in keystores.iter() {
        let _ = ks.close().await;
    }
    // The stable code first, as the API clients print theirs: scripts match on it.
    let report = report.map_err(|e| anyhow::anyhow!("{}: {e}", e.code()))?;
    let v = serde_json::to_value(&report)?;
    print(output, &v, |_| {
        let verb = if report.dry_run {
            "would restore"
        } else {
            "restored"
        };
        println!(
            "{verb} backup {} made {} by keyward {} (schema v{})",
            report.backup_id, report.created_at, report.keyward_version, report.schema_version
        );
        let rows: u64 = report.rows.values().sum();
        println!("  store: {rows} rows in {} tables", report.rows.len());
        for k in &report.keys {
            println!(
                "  key {:<36} {:<14} {:<18} {}",
                k.label, k.purpose, k.outcome, k.detail
            );
        }
        let missing: Vec<&str> = report
            .keys
            .iter()
            .filter(|k| k.outcome == "missing")
            .map(|k| k.label.as_str())
            .collect();
        if !missing.is_empty() {
            println!(
                "  needs the original hardware: {} (the daemon serves without them; see docs/operations.md)",
                missing.join(", ")
            );
        }
        if let Some(seq) = report.audit_seq {
            println!("  audit: backup.restore recorded as event {seq}; run `keyward audit verify`");
        }
        if let Some(p) = &report.replaced {
            println!("  the previous database was moved to {}", p.display());
        }
        for p in &report.policies_written {
            println!("  policy {p} written from the backup");
        }
        for p in &report.policies_failed {
            println!("  policy {p}: not written; extract it from the archive (policies/)");
        }
        for p in &report.policies_differ {
            println!("  policy {p} differs from the backup's (kept yours)");
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// Downloads an archive from a configured location (the newest, or
/// `file_name`) into `out`, for a restore on a machine that lost its own.
pub async fn fetch(
    config_path: &Path,
    location: &str,
    file_name: Option<&str>,
    out: &Path,
) -> anyhow::Result<ExitCode> {
    let config = Config::load(config_path)?;
    let backup = config
        .backup
        .as_ref()
        .context("the config has no [backup] section")?;
    let cfg = backup
        .locations
        .iter()
        .find(|l| l.name == location)
        .with_context(|| format!("no backup location `{location}` in the config"))?;
    let loc = Location::from_config(cfg)?;
    let name = match file_name {
        Some(n) => n.to_string(),
        None => {
            let mut all = loc.list().await?;
            all.sort_by(|a, b| a.file_name.cmp(&b.file_name));
            all.pop()
                .with_context(|| format!("location `{location}` holds no backup"))?
                .file_name
        }
    };
    let got = loc.download_to(&name, out).await?;
    println!(
        "{name}: {} bytes, sha256 {} -> {}",
        got.size,
        got.sha256_hex,
        out.display()
    );
    Ok(ExitCode::SUCCESS)
}
