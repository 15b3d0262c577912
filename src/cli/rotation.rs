//! `keyward ca rotate`, `keyward ca rotations`, `keyward keys rotate`:
//! start a rotation through the admin API (the daemon's rotation job
//! carries it out), optionally waiting for the new key to be active.

use super::ClientArgs;
use super::client::{Api, ApiFailure, print, s};
use anyhow::bail;
use serde_json::{Value, json};
use std::process::ExitCode;
use std::time::Duration;

/// How long `--wait` waits for the new key to become active.
const WAIT_LIMIT: Duration = Duration::from_secs(300);

/// `POST /v1/admin/rotations`: the started rotation, or the plan for `dry_run`.
async fn start(
    api: &Api,
    purpose: &str,
    target: &str,
    dry_run: bool,
    reason: Option<String>,
) -> anyhow::Result<Value> {
    let mut body = json!({ "purpose": purpose, "target": target, "dry_run": dry_run });
    if let Some(r) = reason {
        body["reason"] = Value::String(r);
    }
    let (_, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/admin/rotations",
            Some(&body),
            None,
        )
        .await?;
    Ok(v)
}

pub async fn rotate(
    args: &ClientArgs,
    purpose: &str,
    target: &str,
    dry_run: bool,
    wait: bool,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let api = Api::new(
        &args.url,
        Some(super::client::admin_token(args)?),
        args.ca_cert.as_deref(),
    )?;
    let v = start(&api, purpose, target, dry_run, reason).await?;
    if dry_run {
        print(args.output, &v, |v| {
            println!(
                "would rotate {} `{}` (key {})",
                s(&v["purpose"]),
                s(&v["target"]),
                s(&v["old_key_id"])
            );
            let steps: Vec<&str> = v["steps"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            println!("steps: {}", steps.join(" -> "));
            if v["needs_root_card"].as_bool() == Some(true) {
                println!("needs the root card: certification waits for an operator");
            }
        });
        return Ok(ExitCode::SUCCESS);
    }
    let id = s(&v["id"]).to_string();
    if !wait {
        print(args.output, &v, |v| {
            println!("rotation {} started ({})", s(&v["id"]), s(&v["step"]));
        });
        return Ok(ExitCode::SUCCESS);
    }
    wait_active(args, &api, &id).await
}

/// Polls rotation `id` until its new key is active; fails when a step failed.
async fn wait_active(args: &ClientArgs, api: &Api, id: &str) -> anyhow::Result<ExitCode> {
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let (_, r) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/admin/rotations/{id}"),
                None,
                None,
            )
            .await?;
        let step = s(&r["step"]);
        if matches!(step, "activated" | "retired" | "destroyed") {
            print(args.output, &r, |r| {
                println!(
                    "rotation {} done: new key {} active (step {})",
                    s(&r["id"]),
                    s(&r["new_key_id"]),
                    s(&r["step"])
                );
            });
            return Ok(ExitCode::SUCCESS);
        }
        if r["attempts"].as_i64().unwrap_or(0) > 0 {
            bail!(ApiFailure {
                status: reqwest::StatusCode::OK,
                code: "rotation_step_failed".into(),
                message: format!(
                    "rotation {id} is stuck after `{step}`: {} (the daemon retries with backoff)",
                    s(&r["last_error"])
                ),
            });
        }
        if tokio::time::Instant::now() > deadline {
            bail!("rotation {id} is still at `{step}` after {WAIT_LIMIT:?}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub async fn list(args: &ClientArgs, open: bool) -> anyhow::Result<ExitCode> {
    let api = Api::new(
        &args.url,
        Some(super::client::admin_token(args)?),
        args.ca_cert.as_deref(),
    )?;
    let (_, v) = api
        .call(
            reqwest::Method::GET,
            &format!("/v1/admin/rotations?open={open}"),
            None,
            None,
        )
        .await?;
    print(args.output, &v, |v| {
        for r in v.as_array().into_iter().flatten() {
            println!(
                "{}  {:<13} {:<12} {:<14} attempts={} {}",
                s(&r["id"]),
                s(&r["purpose"]),
                s(&r["target"]),
                s(&r["step"]),
                r["attempts"],
                r["last_error"].as_str().unwrap_or("")
            );
        }
    });
    Ok(ExitCode::SUCCESS)
}

/// `keyward ca rotate NAME --with-root-card`: starts the rotation (or takes
/// the one waiting for the card), waits until its new key is generated, and
/// has the daemon certify it with the card-held parent key now.
pub async fn rotate_with_root_card(
    args: &ClientArgs,
    target: &str,
    wait: bool,
    reason: Option<String>,
) -> anyhow::Result<ExitCode> {
    let api = Api::new(
        &args.url,
        Some(super::client::admin_token(args)?),
        args.ca_cert.as_deref(),
    )?;
    let (_, open) = api
        .call(
            reqwest::Method::GET,
            "/v1/admin/rotations?open=true",
            None,
            None,
        )
        .await?;
    let running =
        open.as_array().into_iter().flatten().find(|r| {
            r["purpose"] == "issuing-ca" && r["target"] == target && r["running"] == true
        });
    let id = match running {
        Some(r) => s(&r["id"]).to_string(),
        None => s(&start(&api, "issuing-ca", target, false, reason).await?["id"]).to_string(),
    };
    let deadline = tokio::time::Instant::now() + WAIT_LIMIT;
    loop {
        let (_, r) = api
            .call(
                reqwest::Method::GET,
                &format!("/v1/admin/rotations/{id}"),
                None,
                None,
            )
            .await?;
        match s(&r["step"]) {
            "planned" => {}
            "key-generated" => break,
            other => bail!("rotation {id} is at `{other}`: it does not wait for the root card"),
        }
        if tokio::time::Instant::now() > deadline {
            bail!(
                "rotation {id}: no new key after {WAIT_LIMIT:?} ({})",
                s(&r["last_error"])
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, r) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/admin/rotations/{id}/certify-with-root-card"),
            None,
            None,
        )
        .await?;
    eprintln!(
        "rotation {id}: new key certified with the root card ({})",
        s(&r["step"])
    );
    if wait {
        return wait_active(args, &api, &id).await;
    }
    print(args.output, &r, |r| {
        println!("rotation {} at {}", s(&r["id"]), s(&r["step"]));
    });
    Ok(ExitCode::SUCCESS)
}
