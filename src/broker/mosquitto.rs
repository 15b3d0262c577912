//! Mosquitto's dynamic-security plugin, driven over MQTT: commands go to
//! `$CONTROL/dynamic-security/v1`, answers come back on
//! `$CONTROL/dynamic-security/v1/response` (matched by `correlationData`).
//!
//! Per device: one dynsec client named by the device id (no password: the
//! broker takes the username from the certificate, `use_identity_as_username`)
//! holding exactly one role, `keyward-device-<id>`, whose ACLs are exactly the
//! group's rendered rules (`publish` → `publishClientSend`, `subscribe` →
//! `subscribePattern`). Each call opens its own short connection as the
//! dynsec admin user, sends one batch of commands and waits for its answers.

use super::{BrokerError, BrokerProvisioner};
use crate::config::MosquittoConfig;
use crate::model::BrokerAclRule;
use async_trait::async_trait;
use rumqttc::{
    AsyncClient, Event, MqttOptions, Packet, QoS, SubscribeReasonCode, TlsConfiguration, Transport,
};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use serde_json::{Value, json};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;
use uuid::Uuid;

pub const CONTROL_TOPIC: &str = "$CONTROL/dynamic-security/v1";
pub const RESPONSE_TOPIC: &str = "$CONTROL/dynamic-security/v1/response";

/// The dynsec role holding a device's ACLs.
pub fn role_name(device_id: Uuid) -> String {
    format!("keyward-device-{device_id}")
}

pub struct MosquittoProvisioner {
    host: String,
    port: u16,
    tls: Option<Arc<rustls::ClientConfig>>,
    username: String,
    password: SecretString,
    timeout: Duration,
}

impl std::fmt::Debug for MosquittoProvisioner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MosquittoProvisioner")
            .field("host", &self.host)
            .field("port", &self.port)
            .field("tls", &self.tls.is_some())
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

fn read(path: &Path) -> Result<Vec<u8>, BrokerError> {
    std::fs::read(path).map_err(|source| BrokerError::File {
        path: path.to_path_buf(),
        source,
    })
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, BrokerError> {
    let pem = read(path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .unwrap_or_default();
    if certs.is_empty() {
        return Err(BrokerError::NoPem {
            path: path.to_path_buf(),
            what: "PEM certificate",
        });
    }
    Ok(certs)
}

/// The rustls client configuration for `mqtts://` (ring provider, the
/// configured CA as the only trust anchors, optional client certificate).
pub fn client_tls_config(
    ca_file: &Path,
    client_cert: Option<(&Path, &Path)>,
) -> Result<Arc<rustls::ClientConfig>, BrokerError> {
    let mut roots = rustls::RootCertStore::empty();
    for cert in certificates(ca_file)? {
        roots.add(cert).map_err(BrokerError::Tls)?;
    }
    let builder = rustls::ClientConfig::builder_with_provider(crate::tls::provider())
        .with_safe_default_protocol_versions()
        .map_err(BrokerError::Tls)?
        .with_root_certificates(roots);
    let config = match client_cert {
        Some((cert, key)) => {
            let chain = certificates(cert)?;
            let pem = zeroize::Zeroizing::new(read(key)?);
            let key_der = PrivateKeyDer::from_pem_slice(&pem).map_err(|_| BrokerError::NoPem {
                path: key.to_path_buf(),
                what: "PEM private key",
            })?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(BrokerError::Tls)?
        }
        None => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

/// One command's answer.
#[derive(Debug, Deserialize)]
struct Response {
    command: String,
    #[serde(default)]
    error: Option<String>,
    #[serde(default, rename = "correlationData")]
    correlation_data: Option<String>,
}

#[derive(Debug, Deserialize)]
struct Responses {
    responses: Vec<Response>,
}

/// One command of a batch, and the error answers that still mean success
/// (`Client already exists` for a create that is followed by a modify).
struct Command {
    body: Value,
    tolerated: &'static [&'static str],
}

fn command(body: Value) -> Command {
    Command {
        body,
        tolerated: &[],
    }
}

/// The dynsec ACL entries for `rules`, without duplicates.
pub fn acls(rules: &[BrokerAclRule]) -> Vec<Value> {
    let mut out: Vec<Value> = Vec::new();
    let mut push = |acltype: &str, topic: &str| {
        let acl = json!({"acltype": acltype, "topic": topic, "allow": true, "priority": 0});
        if !out.contains(&acl) {
            out.push(acl);
        }
    };
    for r in rules {
        if r.access.publish() {
            push("publishClientSend", &r.topic);
        }
        if r.access.subscribe() {
            push("subscribePattern", &r.topic);
        }
    }
    out
}

impl MosquittoProvisioner {
    /// Reads the password and the TLS files now, so a bad setting stops
    /// start-up (and `keyward config check`).
    pub fn from_config(c: &MosquittoConfig) -> Result<Self, BrokerError> {
        let tls = match &c.tls {
            Some(t) => Some(client_tls_config(
                &t.ca_file,
                t.client_cert
                    .as_ref()
                    .map(|(c, k)| (c.as_path(), k.as_path())),
            )?),
            None => None,
        };
        Ok(Self {
            host: c.host.clone(),
            port: c.port,
            tls,
            username: c.username.clone(),
            password: c.password.read()?,
            timeout: c.timeout,
        })
    }

    /// Sends `commands` as one control message and checks every answer.
    async fn run(&self, commands: Vec<Command>) -> Result<(), BrokerError> {
        match tokio::time::timeout(self.timeout, self.exchange(commands)).await {
            Ok(r) => r,
            Err(_) => Err(BrokerError::Timeout(self.timeout)),
        }
    }

    async fn exchange(&self, commands: Vec<Command>) -> Result<(), BrokerError> {
        let nonce = Uuid::new_v4().simple().to_string();
        let mut options = MqttOptions::new(format!("keyward-{nonce}"), &self.host, self.port);
        options
            .set_keep_alive(Duration::from_secs(30))
            .set_clean_session(true)
            .set_max_packet_size(1024 * 1024, 1024 * 1024)
            .set_credentials(self.username.clone(), self.password.expose_secret());
        if let Some(tls) = &self.tls {
            options.set_transport(Transport::tls_with_config(TlsConfiguration::Rustls(
                tls.clone(),
            )));
        }
        let (client, mut events) = AsyncClient::new(options, 16);
        let mut tolerated = std::collections::HashMap::new();
        let mut batch = Vec::with_capacity(commands.len());
        for (i, mut c) in commands.into_iter().enumerate() {
            let id = format!("{nonce}-{i}");
            if let Value::Object(m) = &mut c.body {
                m.insert("correlationData".into(), Value::String(id.clone()));
            }
            tolerated.insert(id, c.tolerated);
            batch.push(c.body);
        }
        let payload =
            serde_json::to_vec(&json!({ "commands": batch })).map_err(BrokerError::BadResponse)?;
        client
            .subscribe(RESPONSE_TOPIC, QoS::AtLeastOnce)
            .await
            .map_err(BrokerError::Client)?;
        let result = async {
            loop {
                match events
                    .poll()
                    .await
                    .map_err(|e| BrokerError::Connection(Box::new(e)))?
                {
                    Event::Incoming(Packet::SubAck(ack)) => {
                        if ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, SubscribeReasonCode::Failure))
                        {
                            return Err(BrokerError::SubscribeRefused {
                                topic: RESPONSE_TOPIC,
                            });
                        }
                        // Subscribed before sending: the answer cannot be missed.
                        client
                            .publish(CONTROL_TOPIC, QoS::AtLeastOnce, false, payload.clone())
                            .await
                            .map_err(BrokerError::Client)?;
                    }
                    Event::Incoming(Packet::Publish(p)) if p.topic == RESPONSE_TOPIC => {
                        let answers: Responses =
                            serde_json::from_slice(&p.payload).map_err(BrokerError::BadResponse)?;
                        let ours: Vec<&Response> = answers
                            .responses
                            .iter()
                            .filter(|r| {
                                r.correlation_data
                                    .as_ref()
                                    .is_some_and(|c| tolerated.contains_key(c))
                            })
                            .collect();
                        // Answers to another admin's commands: not ours.
                        if ours.is_empty() {
                            continue;
                        }
                        for r in &ours {
                            if let Some(err) = &r.error {
                                let ok = r
                                    .correlation_data
                                    .as_ref()
                                    .and_then(|c| tolerated.get(c))
                                    .is_some_and(|t| t.contains(&err.as_str()));
                                if !ok {
                                    return Err(BrokerError::Refused {
                                        command: r.command.clone(),
                                        error: err.clone(),
                                    });
                                }
                            }
                        }
                        if ours.len() < tolerated.len() {
                            return Err(BrokerError::Refused {
                                command: "batch".into(),
                                error: format!(
                                    "{} of {} commands answered",
                                    ours.len(),
                                    tolerated.len()
                                ),
                            });
                        }
                        return Ok(());
                    }
                    _ => {}
                }
            }
        }
        .await;
        // Best effort: a clean DISCONNECT, then drive the loop until it is sent.
        if client.disconnect().await.is_ok() {
            let _ = tokio::time::timeout(Duration::from_secs(1), async {
                while let Ok(ev) = events.poll().await {
                    if matches!(ev, Event::Outgoing(rumqttc::Outgoing::Disconnect)) {
                        break;
                    }
                }
            })
            .await;
        }
        result
    }
}

#[async_trait]
impl BrokerProvisioner for MosquittoProvisioner {
    async fn grant(&self, device_id: Uuid, rules: &[BrokerAclRule]) -> Result<(), BrokerError> {
        let role = role_name(device_id);
        let user = device_id.to_string();
        let acls = acls(rules);
        let roles = json!([{ "rolename": role }]);
        // Create-or-replace, in one message the broker applies in order: the
        // role with exactly these ACLs, the client with exactly this role
        // and no groups, enabled.
        self.run(vec![
            Command {
                body: json!({"command": "createRole", "rolename": role, "acls": acls}),
                tolerated: &["Role already exists"],
            },
            command(json!({"command": "modifyRole", "rolename": role, "acls": acls})),
            Command {
                body: json!({"command": "createClient", "username": user, "roles": roles}),
                tolerated: &["Client already exists"],
            },
            command(json!({
                "command": "modifyClient", "username": user, "roles": roles, "groups": []
            })),
            command(json!({"command": "enableClient", "username": user})),
        ])
        .await
    }

    async fn revoke(&self, device_id: Uuid) -> Result<(), BrokerError> {
        // Deleting the client also disconnects a device connected with it.
        self.run(vec![
            Command {
                body: json!({"command": "deleteClient", "username": device_id.to_string()}),
                tolerated: &["Client not found"],
            },
            Command {
                body: json!({"command": "deleteRole", "rolename": role_name(device_id)}),
                tolerated: &["Role not found"],
            },
        ])
        .await
    }

    fn name(&self) -> &'static str {
        "mosquitto"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::BrokerAccess;

    #[test]
    fn rules_map_to_dynsec_acl_types_once() {
        let rules = [
            BrokerAclRule {
                topic: "dt/v1/x/#".into(),
                access: BrokerAccess::Publish,
            },
            BrokerAclRule {
                topic: "cmd/v1/x/req".into(),
                access: BrokerAccess::PublishSubscribe,
            },
            BrokerAclRule {
                topic: "dt/v1/x/#".into(),
                access: BrokerAccess::Publish,
            },
        ];
        let a = acls(&rules);
        let pairs: Vec<(&str, &str)> = a
            .iter()
            .map(|v| (v["acltype"].as_str().unwrap(), v["topic"].as_str().unwrap()))
            .collect();
        assert_eq!(
            pairs,
            [
                ("publishClientSend", "dt/v1/x/#"),
                ("publishClientSend", "cmd/v1/x/req"),
                ("subscribePattern", "cmd/v1/x/req"),
            ]
        );
        assert!(a.iter().all(|v| v["allow"] == true));
    }
}
