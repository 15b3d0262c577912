//! Client commands: talk to a running daemon over its REST API.

use super::{AdminsCommand, CaCommand, ClientArgs, Output, PageArgs, RegistrationsCommand};
use anyhow::{Context, bail};
use serde_json::{Value, json};
use std::process::ExitCode;
use zeroize::Zeroizing;

/// A thin REST client carrying the admin token.
pub struct Api {
    http: reqwest::Client,
    base: String,
    token: Option<Zeroizing<String>>,
}

/// Reads the admin token from `--token-file` or `KEYWARD_TOKEN`.
pub(super) fn admin_token(args: &ClientArgs) -> anyhow::Result<Zeroizing<String>> {
    code_from(args.token_file.as_deref(), "KEYWARD_TOKEN")?
        .context("no admin token: set KEYWARD_TOKEN or pass --token-file FILE")
}

impl Api {
    /// `ca_cert` (`--ca-cert` / `KEYWARD_CA_CERT`): a PEM file with the CA
    /// certificate(s) that sign the daemon's HTTPS certificate (with
    /// `issue = true`, keyward's root). When given, only these are trusted.
    pub fn new(
        base: &str,
        token: Option<Zeroizing<String>>,
        ca_cert: Option<&std::path::Path>,
    ) -> anyhow::Result<Self> {
        let mut builder = reqwest::Client::builder().timeout(std::time::Duration::from_secs(60));
        if let Some(path) = ca_cert {
            let pem = std::fs::read(path).with_context(|| {
                format!(
                    "--ca-cert / KEYWARD_CA_CERT: cannot read {}",
                    path.display()
                )
            })?;
            let certs = reqwest::Certificate::from_pem_bundle(&pem).with_context(|| {
                format!("--ca-cert / KEYWARD_CA_CERT: {} is not PEM", path.display())
            })?;
            if certs.is_empty() {
                bail!(
                    "--ca-cert / KEYWARD_CA_CERT: {} holds no certificate",
                    path.display()
                );
            }
            builder = builder.tls_certs_only(certs);
        }
        let http = builder.build().context("building the HTTP client")?;
        Ok(Self {
            http,
            base: base.trim_end_matches('/').to_string(),
            token,
        })
    }

    fn authed(&self, rb: reqwest::RequestBuilder, bearer: Option<&str>) -> reqwest::RequestBuilder {
        match bearer.or(self.token.as_deref().map(String::as_str)) {
            Some(t) => rb.bearer_auth(t),
            None => rb,
        }
    }

    /// Sends a request and returns the JSON body, turning API errors into
    /// `code: message` errors.
    pub async fn call(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&Value>,
        bearer: Option<&str>,
    ) -> anyhow::Result<(reqwest::StatusCode, Value)> {
        let url = format!("{}{}", self.base, path);
        let mut rb = self.authed(self.http.request(method, &url), bearer);
        if let Some(b) = body {
            rb = rb.json(b);
        }
        let resp = rb
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        if status.is_success() {
            return Ok((status, value));
        }
        let code = value["error"]["code"].as_str().unwrap_or("http_error");
        let message = value["error"]["message"].as_str().unwrap_or("");
        bail!(ApiFailure {
            status,
            code: code.to_string(),
            message: message.to_string()
        })
    }
}

impl Api {
    /// Sends a GET and returns the response unread (for streamed bodies),
    /// turning an error answer into [`ApiFailure`].
    pub async fn get_raw(&self, path: &str) -> anyhow::Result<reqwest::Response> {
        let url = format!("{}{}", self.base, path);
        let resp = self
            .authed(self.http.get(&url), None)
            .timeout(std::time::Duration::from_secs(3600))
            .send()
            .await
            .with_context(|| format!("cannot reach {url}"))?;
        let status = resp.status();
        if status.is_success() {
            return Ok(resp);
        }
        let text = resp.text().await.unwrap_or_default();
        let value: Value = serde_json::from_str(&text).unwrap_or(Value::String(text));
        bail!(ApiFailure {
            status,
            code: value["error"]["code"]
                .as_str()
                .unwrap_or("http_error")
                .to_string(),
            message: value["error"]["message"].as_str().unwrap_or("").to_string(),
        })
    }
}

/// An error answer from the daemon.
#[derive(Debug, thiserror::Error)]
#[error("{status}: {code}: {message}")]
pub struct ApiFailure {
    pub status: reqwest::StatusCode,
    pub code: String,
    pub message: String,
}

pub(super) fn print(output: Output, value: &Value, text: impl FnOnce(&Value)) {
    match output {
        Output::Json => println!(
            "{}",
            serde_json::to_string_pretty(value).unwrap_or_default()
        ),
        Output::Text => text(value),
    }
}

pub(super) fn s(v: &Value) -> &str {
    v.as_str().unwrap_or("-")
}

/// `base?k=v&...` with the page parameters, values percent-encoded.
pub(super) fn list_path(base: &str, filters: &[(&str, Option<&str>)], page: &PageArgs) -> String {
    let limit = page.limit.to_string();
    let params: Vec<String> = filters
        .iter()
        .copied()
        .chain([
            ("limit", Some(limit.as_str())),
            ("cursor", page.cursor.as_deref()),
            ("order", page.order.as_deref()),
        ])
        .filter_map(|(k, v)| v.map(|v| format!("{k}={}", query_escape(v))))
        .collect();
    format!("{base}?{}", params.join("&"))
}

pub(super) fn query_escape(v: &str) -> String {
    v.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            other => format!("%{other:02X}"),
        })
        .collect()
}

/// Tells how to get the next page, on stderr so that stdout stays the list.
pub(super) fn next_page_hint(v: &Value) {
    if let Some(c) = v["next_cursor"].as_str() {
        eprintln!("more: repeat with --cursor {c}");
    }
}

fn registration_line(r: &Value) {
    println!(
        "{}  {:<8}  {:<10}  {:<24}  {}",
        s(&r["id"]),
        s(&r["status"]),
        s(&r["group"]),
        s(&r["name"]),
        s(&r["submitted_at"])
    );
    if let Some(from) = r["client_addr"].as_str() {
        println!("    submitted from {from}");
    }
}

pub async fn registrations(
    args: &ClientArgs,
    command: RegistrationsCommand,
) -> anyhow::Result<ExitCode> {
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    match command {
        RegistrationsCommand::List {
            status,
            group,
            page,
        } => {
            let path = list_path(
                "/v1/admin/registrations",
                &[("status", status.as_deref()), ("group", group.as_deref())],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                let empty = Vec::new();
                let rows = v["items"].as_array().unwrap_or(&empty);
                if rows.is_empty() {
                    println!("no registrations");
                }
                for r in rows {
                    registration_line(r);
                }
                next_page_hint(v);
            });
        }
        RegistrationsCommand::Show { id } => {
            let (_, v) = api
                .call(
                    reqwest::Method::GET,
                    &format!("/v1/admin/registrations/{id}"),
                    None,
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                for key in [
                    "id",
                    "status",
                    "device_id",
                    "group",
                    "name",
                    "device_type",
                    "location",
                    "firmware",
                    "key_algorithm",
                    "submitted_by",
                    "submitted_at",
                    "expires_at",
                    "decided_at",
                    "certificate_serial",
                    "client_addr",
                ] {
                    println!("{key:<19} {}", v[key].as_str().unwrap_or("-"));
                }
                for a in v["approvals"].as_array().into_iter().flatten() {
                    println!(
                        "decision           {} by admin {} at {}{}",
                        s(&a["decision"]),
                        s(&a["admin_id"]),
                        s(&a["decided_at"]),
                        a["comment"]
                            .as_str()
                            .map(|c| format!(" ({c})"))
                            .unwrap_or_default()
                    );
                }
            });
        }
        RegistrationsCommand::Approve { id, comment } => {
            decide(&api, args.output, &id, "approve", comment).await?
        }
        RegistrationsCommand::Deny { id, comment } => {
            decide(&api, args.output, &id, "deny", comment).await?
        }
    }
    Ok(ExitCode::SUCCESS)
}

async fn decide(
    api: &Api,
    output: Output,
    id: &str,
    verb: &str,
    comment: Option<String>,
) -> anyhow::Result<()> {
    let (_, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/admin/registrations/{id}/{verb}"),
            Some(&json!({ "comment": comment })),
            None,
        )
        .await?;
    print(output, &v, |v| {
        println!(
            "registration {} is {} ({} of {} approval(s))",
            s(&v["id"]),
            s(&v["status"]),
            v["approvals"],
            v["approvals_required"]
        );
    });
    Ok(())
}

/// Reads a one-time code from a file or an environment variable.
fn code_from(
    file: Option<&std::path::Path>,
    env: &str,
) -> anyhow::Result<Option<Zeroizing<String>>> {
    if let Some(path) = file {
        let t = Zeroizing::new(
            std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?,
        );
        return Ok(Some(Zeroizing::new(t.trim().to_string())));
    }
    Ok(std::env::var(env)
        .ok()
        .map(|v| v.trim().to_string())
        .filter(|v| !v.is_empty())
        .map(Zeroizing::new))
}

fn request_line(r: &Value) {
    println!(
        "{}  {:<8}  {:<9}  {:<20}  {:<8}  requested by {}",
        s(&r["id"]),
        s(&r["kind"]),
        s(&r["status"]),
        s(&r["name"]),
        s(&r["role"]),
        s(&r["requested_by"])
    );
}

async fn decide_request(api: &Api, output: Output, id: &str, verb: &str) -> anyhow::Result<()> {
    let (_, v) = api
        .call(
            reqwest::Method::POST,
            &format!("/v1/admin/requests/{id}/{verb}"),
            None,
            None,
        )
        .await?;
    print(output, &v, |v| {
        request_line(v);
        if let Some(code) = v["approval_code"].as_str() {
            println!("Approval code, shown once — give it to the invitee only:");
            println!("{code}");
        }
    });
    Ok(())
}

async fn redeem(
    args: &ClientArgs,
    invitation_file: Option<&std::path::Path>,
    approval_file: Option<&std::path::Path>,
    token_out: Option<&std::path::Path>,
) -> anyhow::Result<ExitCode> {
    let invitation = code_from(invitation_file, "KEYWARD_INVITATION_CODE")?
        .context("no invitation code: set KEYWARD_INVITATION_CODE or pass --invitation-file")?;
    let approval = code_from(approval_file, "KEYWARD_APPROVAL_CODE")?;
    let api = Api::new(&args.url, None, args.ca_cert.as_deref())?;
    let (_, v) = api
        .call(
            reqwest::Method::POST,
            "/v1/invitations/redeem",
            Some(&json!({
                "invitation_code": invitation.as_str(),
                "approval_code": approval.as_ref().map(|a| a.as_str()),
            })),
            None,
        )
        .await?;
    let token = Zeroizing::new(s(&v["token"]).to_string());
    if let Some(path) = token_out {
        super::local::write_private(path, format!("{}\n", token.as_str()).as_bytes())?;
        eprintln!(
            "admin `{}` (role {}) created; token written to {}",
            s(&v["name"]),
            s(&v["role"]),
            path.display()
        );
    } else {
        print(args.output, &v, |v| {
            println!(
                "admin `{}` (role {}) created. Your token, shown once:",
                s(&v["name"]),
                s(&v["role"])
            );
            println!("{}", token.as_str());
        });
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn admins(args: &ClientArgs, command: AdminsCommand) -> anyhow::Result<ExitCode> {
    if let AdminsCommand::Redeem {
        invitation_file,
        approval_file,
        token_out,
    } = &command
    {
        return redeem(
            args,
            invitation_file.as_deref(),
            approval_file.as_deref(),
            token_out.as_deref(),
        )
        .await;
    }
    let api = Api::new(&args.url, Some(admin_token(args)?), args.ca_cert.as_deref())?;
    match command {
        AdminsCommand::Redeem { .. } | AdminsCommand::BreakGlass { .. } => {}
        AdminsCommand::Add { name, role } => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    "/v1/admin/invitations",
                    Some(&json!({ "name": name, "role": role })),
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                println!(
                    "invitation for `{}` (role {}) created, request {}, expires {}.",
                    s(&v["name"]),
                    s(&v["role"]),
                    s(&v["id"]),
                    s(&v["expires_at"])
                );
                println!("Invitation code, shown once — give it to the invitee only:");
                println!("{}", s(&v["invitation_code"]));
                if v["second_admin_required"].as_bool() == Some(true) {
                    println!(
                        "Another admin must approve it (keyward admins approve {}) and give the invitee the approval code.",
                        s(&v["id"])
                    );
                }
                println!("The invitee runs `keyward admins redeem` and alone receives its token.");
            });
        }
        AdminsCommand::SetRole { admin, role } => {
            let (status, v) = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/admin/admins/{admin}/role"),
                    Some(&json!({ "role": role })),
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                if status == reqwest::StatusCode::ACCEPTED {
                    println!(
                        "role change requested ({}); another admin must approve it",
                        s(&v["request"]["id"])
                    );
                } else {
                    println!(
                        "admin `{}` now has role {}",
                        s(&v["admin"]["name"]),
                        s(&v["admin"]["role"])
                    );
                }
            });
        }
        AdminsCommand::Requests { status, page } => {
            let path = list_path(
                "/v1/admin/requests",
                &[("status", status.as_deref())],
                &page,
            );
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                let empty = Vec::new();
                let rows = v["items"].as_array().unwrap_or(&empty);
                if rows.is_empty() {
                    println!("no admin requests");
                }
                rows.iter().for_each(request_line);
                next_page_hint(v);
            });
        }
        AdminsCommand::Approve { request } => {
            decide_request(&api, args.output, &request, "approve").await?
        }
        AdminsCommand::Deny { request } => {
            decide_request(&api, args.output, &request, "deny").await?
        }
        AdminsCommand::Disable { admin } => {
            let (_, v) = api
                .call(
                    reqwest::Method::POST,
                    &format!("/v1/admin/admins/{admin}/disable"),
                    None,
                    None,
                )
                .await?;
            print(args.output, &v, |v| {
                println!("admin `{}` ({}) disabled", s(&v["name"]), s(&v["id"]));
            });
        }
        AdminsCommand::List { page } => {
            let path = list_path("/v1/admin/admins", &[], &page);
            let (_, v) = api.call(reqwest::Method::GET, &path, None, None).await?;
            print(args.output, &v, |v| {
                next_page_hint(v);
                for a in v["items"].as_array().into_iter().flatten() {
                    println!(
                        "{}  {:<20}  {:<8}  {}{}",
                        s(&a["id"]),
                        s(&a["name"]),
                        s(&a["role"]),
                        s(&a["created_at"]),
                        if a["disabled"].as_bool() == Some(true) {
                            "  (disabled)"
                        } else {
                            ""
                        }
                    );
                }
            });
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `keyward ca crl NAME [--out FILE] [--pem] [--publish]`.
pub async fn ca(args: &ClientArgs, command: CaCommand) -> anyhow::Result<ExitCode> {
    let CaCommand::Crl {
        name,
        out,
        pem,
        publish,
    } = command
    else {
        bail!("not a CRL command");
    };
    let segment = query_escape(&name);
    let token = if publish {
        Some(admin_token(args)?)
    } else {
        None
    };
    let api = Api::new(&args.url, token, args.ca_cert.as_deref())?;
    if publish {
        let (_, v) = api
            .call(
                reqwest::Method::POST,
                &format!("/v1/admin/cas/{segment}/crl"),
                None,
                None,
            )
            .await?;
        // Stdout may carry the CRL itself: the report goes to stderr.
        eprintln!(
            "published CRL {} of CA {}: {} entries, next update {}",
            v["number"],
            s(&v["ca"]),
            v["entries"],
            s(&v["next_update"])
        );
    }
    let url = format!("{}/v1/ca/{segment}/crl", api.base);
    let accept = if pem {
        "application/x-pem-file"
    } else {
        "application/pkix-crl"
    };
    let resp = api
        .http
        .get(&url)
        .header(reqwest::header::ACCEPT, accept)
        .send()
        .await
        .with_context(|| format!("cannot reach {url}"))?;
    let status = resp.status();
    let body = resp.bytes().await.context("reading the CRL")?;
    if !status.is_success() {
        let v: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
        bail!(ApiFailure {
            status,
            code: v["error"]["code"]
                .as_str()
                .unwrap_or("http_error")
                .to_string(),
            message: v["error"]["message"].as_str().unwrap_or("").to_string(),
        });
    }
    match out {
        Some(path) => {
            write_replacing(&path, &body)?;
            eprintln!("wrote {} ({} bytes)", path.display(), body.len());
        }
        None => {
            use std::io::Write;
            let mut stdout = std::io::stdout().lock();
            stdout.write_all(&body)?;
            stdout.flush()?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Writes `bytes` beside `path` and renames it over `path`: a reader sees
/// the old file or the new one, never a partial one.
fn write_replacing(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    let file_name = path
        .file_name()
        .with_context(|| format!("{} is not a file path", path.display()))?;
    let mut tmp_name = std::ffi::OsString::from(".");
    tmp_name.push(file_name);
    tmp_name.push(format!(".{}.tmp", std::process::id()));
    let tmp = path.with_file_name(tmp_name);
    std::fs::write(&tmp, bytes).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| {
        let _ = std::fs::remove_file(&tmp);
        format!("replacing {}", path.display())
    })
}
