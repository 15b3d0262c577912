//! `keyward devices ...` and `keyward certs ...`: listings, revocation,
//! suspension, holds, early-renewal allowances.

use super::client::{Api, admin_token, list_path, next_page_hint, print, s};
use super::{CertsCommand, ClientArgs, DevicesCommand};
use crate::model::RevocationReason;
use anyhow::Context;
use serde_json::{Value, json};
use std::process::ExitCode;

/// Accepts `key-compromise` and `keyCompromise`.
fn reason(s: &str) -> anyhow::Result<&'static str> {
    RevocationReason::parse(s)
        .map(|r| r.as_str())
        .with_context(|| {
            format!(
                "unknown reason `{s}` ({})",
                RevocationReason::ALL.map(|r| r.as_str()).join(", ")
            )
        })
}

fn cert_line(c: &Value) {
    println!(
        "{}  {:<10}  {:<20}  {}  {}",
        s(&c["serial"]),
        s(&c["status"]),
        c["revocation_reason"].as_str().unwrap_or(""),
        s(&c["not_after"]),
        s(&c["device_id"]),
    );
}

fn device_line(d: &Value) {
    println!(
        "{}  {:<9}  {:<10}  {}",
        s(&d["id"]),
        s(&d["status"]),
        s(&d["group"]),
        s(&d["name"])
    );
}

pub async fn devices(args: &ClientArgs, command: DevicesCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    let post = |id: &str, verb: &str, body: Value| {
        let path = format!("/v1/admin/devices/{id}/{verb}");
        let api = &api;
        async move {
            api.call(reqwest::Method::POST, &path, Some(&body), None)
                .await
        }
    };
    let changed = |v: &Value| {
        device_line(v);
        for serial in v["certificates"].as_array().into_iter().flatten() {
            println!("    certificate {}", s(serial));
        }
    };
    match command {
        DevicesCommand::List {
            status,
            group,
            page,
        } => {
            let path = list_path(
                "/v1/admin/devices",
                &[("status", status.as_deref()), ("group", group.as_deref())],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                let rows = v["items"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!("no devices");
                }
                rows.iter().for_each(device_line);
                next_page_hint(v);
            });
        }
        DevicesCommand::Show { id } => {
            let (_, v) = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/admin/devices/{id}"),
                    None,
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                for key in [
                    "id",
                    "status",
                    "name",
                    "group",
                    "device_type",
                    "location",
                    "firmware",
                    "created_at",
                    "updated_at",
                ] {
                    println!("{key:<12} {}", v[key].as_str().unwrap_or("-"));
                }
                if let Some(a) = v["renewal_allowance"].as_object() {
                    println!(
                        "early renewal allowed until {}",
                        a["expires_at"].as_str().unwrap_or("-")
                    );
                }
                v["certificates"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .for_each(cert_line);
            });
        }
        DevicesCommand::Revoke {
            id,
            reason: r,
            comment,
        } => {
            let (_, v) = post(
                &id,
                "revoke",
                json!({ "reason": reason(&r)?, "comment": comment }),
            )
            .await?;
            print(args.output, &v, changed);
        }
        DevicesCommand::Suspend { id, comment } => {
            let (_, v) = post(&id, "suspend", json!({ "comment": comment })).await?;
            print(args.output, &v, changed);
        }
        DevicesCommand::Resume { id, comment } => {
            let (_, v) = post(&id, "resume", json!({ "comment": comment })).await?;
            print(args.output, &v, changed);
        }
        DevicesCommand::AllowRenewal { id, hours, comment } => {
            let (_, v) = post(
                &id,
                "allow-renewal",
                json!({ "valid_for_hours": hours, "comment": comment }),
            )
            .await?;
            print(args.output, &v, |v| {
                println!(
                    "{} may renew once until {}",
                    s(&v["device_id"]),
                    s(&v["expires_at"])
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn certs(args: &ClientArgs, command: CertsCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    let detail = |v: &Value| {
        for key in [
            "serial",
            "status",
            "revocation_reason",
            "revoked_at",
            "device_id",
            "issuer",
            "not_before",
            "not_after",
            "fingerprint_sha256",
            "superseded_by",
        ] {
            println!("{key:<19} {}", v[key].as_str().unwrap_or("-"));
        }
    };
    match command {
        CertsCommand::List {
            device,
            status,
            issuer,
            page,
        } => {
            let path = list_path(
                "/v1/admin/certs",
                &[
                    ("device", device.as_deref()),
                    ("status", status.as_deref()),
                    ("issuer", issuer.as_deref()),
                ],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                let rows = v["items"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!("no certificates");
                }
                rows.iter().for_each(cert_line);
                next_page_hint(v);
            });
        }
        CertsCommand::Expiring {
            within,
            limit,
            cursor,
            json,
        } => {
            let page = super::PageArgs {
                limit,
                cursor,
                order: None,
            };
            let path = list_path(
                "/v1/admin/certs/expiring",
                &[("within", Some(within.as_str()))],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            let output = if json {
                super::Output::Json
            } else {
                args.output
            };
            print(output, &v, |v| {
                let rows = v["items"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!("no device certificates expire within {within}");
                }
                for c in &rows {
                    let state = if c["renewal_due"] == true {
                        "due"
                    } else {
                        "not-yet"
                    };
                    println!(
                        "{}  {}  {:<7}  {}  {:<10}  {}",
                        s(&c["serial"]),
                        s(&c["not_after"]),
                        state,
                        s(&c["device_id"]),
                        s(&c["group"]),
                        s(&c["device_name"]),
                    );
                }
                next_page_hint(v);
            });
        }
        CertsCommand::Show { serial } => {
            let (_, v) = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/admin/certs/{serial}"),
                    None,
                    None,
                )
                .await?;
            print(args.output, &v, detail);
        }
        CertsCommand::Revoke {
            serial,
            reason: r,
            comment,
        } => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/admin/certs/{serial}/revoke"),
                    Some(&json!({ "reason": reason(&r)?, "comment": comment })),
                    None,
                )
                .await?;
            print(args.output, &v, detail);
        }
        CertsCommand::ReleaseHold { serial, comment } => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/admin/certs/{serial}/release-hold"),
                    Some(&json!({ "comment": comment })),
                    None,
                )
                .await?;
            print(args.output, &v, detail);
        }
    }
    Ok(ExitCode::SUCCESS)
}
