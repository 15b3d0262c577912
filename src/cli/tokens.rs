//! `keyward tokens ...`: bootstrap tokens and reclaim codes, and
//! `keyward policies reload`.

use super::client::{Api, admin_token, list_path, next_page_hint, print, s};
use super::{ClientArgs, PoliciesCommand, TokensCommand};
use anyhow::Context;
use serde_json::{Value, json};
use std::process::ExitCode;

/// `90s`, `30m`, `24h`, `7d` (a bare number is seconds).
pub fn parse_ttl(text: &str) -> anyhow::Result<i64> {
    let t = text.trim();
    let (num, unit) = match t.find(|c: char| !c.is_ascii_digit()) {
        Some(i) => (&t[..i], &t[i..]),
        None => (t, "s"),
    };
    let n: i64 = num
        .parse()
        .with_context(|| format!("`{text}` is not a duration such as 90s, 30m, 24h or 7d"))?;
    let mult = match unit {
        "s" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        _ => anyhow::bail!("`{text}`: unit must be s, m, h or d"),
    };
    n.checked_mul(mult)
        .filter(|v| *v > 0)
        .with_context(|| format!("`{text}` is out of range"))
}

fn token_line(t: &Value) {
    let state = if !t["revoked_at"].is_null() {
        "revoked".to_string()
    } else {
        format!("{}/{} used", t["uses"], t["uses_allowed"])
    };
    println!(
        "{}  {:<9}  {:<12}  {:<14}  expires {}  {}",
        s(&t["id"]),
        s(&t["kind"]),
        t["group"].as_str().unwrap_or("-"),
        state,
        s(&t["expires_at"]),
        t["device_id"]
            .as_str()
            .or(t["device_name"].as_str())
            .unwrap_or(""),
    );
}

pub async fn tokens(args: &ClientArgs, command: TokensCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    match command {
        TokensCommand::Create {
            group,
            uses,
            ttl,
            device_name,
            reclaim,
        } => {
            let ttl_seconds = parse_ttl(&ttl)?;
            let body = match reclaim {
                Some(device) => {
                    if group.is_some() || uses.is_some() || device_name.is_some() {
                        anyhow::bail!(
                            "--reclaim DEVICE mints a one-time reclaim code: --group, --uses and --device-name do not apply"
                        );
                    }
                    json!({ "kind": "reclaim", "device_id": device, "ttl_seconds": ttl_seconds })
                }
                None => json!({
                    "kind": "bootstrap",
                    "group": group.context("--group is required (or --reclaim DEVICE)")?,
                    "uses": uses.unwrap_or(1),
                    "ttl_seconds": ttl_seconds,
                    "device_name": device_name,
                }),
            };
            let (_, v) = api
                .call(reqwest::Method::POST, "/v1/admin/tokens", Some(&body), None)
                .await?;
            print(args.output, &v, |v| {
                token_line(v);
                println!("secret (shown once): {}", s(&v["secret"]));
            });
        }
        TokensCommand::List {
            kind,
            group,
            device,
            page,
        } => {
            let path = list_path(
                "/v1/admin/tokens",
                &[
                    ("kind", kind.as_deref()),
                    ("group", group.as_deref()),
                    ("device_id", device.as_deref()),
                ],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                let rows = v["items"].as_array().cloned().unwrap_or_default();
                if rows.is_empty() {
                    println!("no tokens");
                }
                rows.iter().for_each(token_line);
                next_page_hint(v);
            });
        }
        TokensCommand::Revoke { id } => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/admin/tokens/{id}/revoke"),
                    Some(&json!({})),
                    None,
                )
                .await?;
            print(args.output, &v, token_line);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn policies(args: &ClientArgs, command: PoliciesCommand) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    match command {
        PoliciesCommand::Reload => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    "/v1/admin/policies/reload",
                    Some(&json!({})),
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                println!(
                    "policies reloaded ({}): enrollment {} -> {}",
                    if v["changed"].as_bool() == Some(true) {
                        "changed"
                    } else {
                        "unchanged"
                    },
                    s(&v["old"]["enrollment"]),
                    s(&v["new"]["enrollment"]),
                );
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_ttl;

    #[test]
    fn ttls_parse_with_units() {
        assert_eq!(parse_ttl("24h").unwrap(), 86_400);
        assert_eq!(parse_ttl("90").unwrap(), 90);
        assert_eq!(parse_ttl("7d").unwrap(), 604_800);
        assert!(parse_ttl("0h").is_err());
        assert!(parse_ttl("1w").is_err());
        assert!(parse_ttl("h").is_err());
        assert!(parse_ttl("99999999999999999d").is_err());
    }
}
