//! The TLS listener with stock tools: `curl --cacert`, `openssl s_client`,
//! certificates made by `openssl` (files mode) and by keyward itself
//! (`issue = true`, key in SoftHSM2), client authentication with device
//! certificates, start-up refusals that name their config key.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::Env;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::Arc;

fn run(cmd: &mut Command) -> Output {
    cmd.output().unwrap()
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

fn openssl(dir: &Path, args: &[&str]) {
    let o = run(Command::new("openssl").current_dir(dir).args(args));
    assert!(o.status.success(), "openssl {args:?}: {}", text(&o));
}

fn chmod(path: &Path, mode: u32) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
}

/// A throw-away CA made with openssl, and leaf certificates it signs.
struct OpensslCa {
    dir: PathBuf,
}

impl OpensslCa {
    fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        openssl(
            dir,
            &[
                "req",
                "-x509",
                "-new",
                "-nodes",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=test TLS CA",
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ],
        );
        Self {
            dir: dir.to_path_buf(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// `NAME.pem` + `NAME.key` (PKCS#8, 0600), signed by this CA.
    fn leaf(&self, name: &str, eku: &str, san: &str) {
        let ext = format!(
            "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage={eku}\nsubjectAltName={san}\n"
        );
        std::fs::write(self.path(&format!("{name}.ext")), ext).unwrap();
        openssl(
            &self.dir,
            &[
                "req",
                "-new",
                "-nodes",
                "-newkey",
                "ec",
                "-pkeyopt",
                "ec_paramgen_curve:P-256",
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
                "-subj",
                &format!("/CN={name}"),
            ],
        );
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "1",
                "-out",
                &format!("{name}.pem"),
                "-extfile",
                &format!("{name}.ext"),
            ],
        );
        chmod(&self.path(&format!("{name}.key")), 0o600);
    }
}

/// SHA-256 of a PEM certificate's DER, lowercase hex, by openssl.
fn fingerprint(pem: &Path) -> String {
    let o = run(Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(pem));
    let t = String::from_utf8_lossy(&o.stdout).to_string();
    t.trim()
        .rsplit('=')
        .next()
        .unwrap()
        .replace(':', "")
        .to_ascii_lowercase()
}

/// `curl -sS` with extra arguments; returns (success, body or error).
fn curl(args: &[&str], url: &str) -> (bool, String) {
    let o = run(Command::new("curl")
        .args(["-sS", "--max-time", "20"])
        .args(args)
        .arg(url));
    (o.status.success(), text(&o))
}

/// `openssl s_client` sending `GET /healthz`; returns (exit success, output).
fn s_client(addr: &str, extra: &[&str]) -> (bool, String) {
    s_client_get(addr, "/healthz", extra)
}

/// `openssl s_client` sending `GET path`; returns (exit success, output).
fn s_client_get(addr: &str, path: &str, extra: &[&str]) -> (bool, String) {
    let mut child = Command::new("openssl")
        .args([
            "s_client",
            "-connect",
            addr,
            "-verify_return_error",
            "-ign_eof",
        ])
        .args(extra)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    (o.status.success(), text(&o))
}

fn host_port(url: &str) -> String {
    url.split("://")
        .nth(1)
        .unwrap()
        .trim_end_matches('/')
        .to_string()
}

fn set_server_tls(env: &Env, tls_toml: &str) {
    env.append_config(&format!("[server.tls]\n{tls_toml}"));
}

// ---------------------------------------------------------------------------
// The listener in-process, with a route that echoes what the handler sees.

mod in_process {
    use super::*;
    use axum::Extension;
    use axum::extract::ConnectInfo;
    use axum::routing::get;
    use keyward::tls::client_auth::FingerprintDenyList;
    use keyward::tls::listener::{HandshakeLimits, serve};
    use keyward::tls::{ClientAuth, ClientAuthSettings, PeerCertificate, ServerCertResolver};

    async fn whoami(
        peer: Option<Extension<PeerCertificate>>,
        ConnectInfo(addr): ConnectInfo<SocketAddr>,
    ) -> String {
        let fp = peer
            .map(|Extension(p)| hex::encode(ring::digest::digest(&ring::digest::SHA256, &p.0)))
            .unwrap_or_else(|| "none".into());
        format!("peer={fp} from={}", addr.ip())
    }

    /// Handlers see the verified client leaf next to ConnectInfo; a denied
    /// certificate is refused at the handshake; the served certificate is
    /// swapped without a restart; shutdown drains and returns.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn handlers_see_the_peer_certificate_and_the_certificate_swaps_live() {
        let tmp = tempfile::tempdir().unwrap();
        let ca = OpensslCa::new(tmp.path());
        ca.leaf("server", "serverAuth", "IP:127.0.0.1");
        ca.leaf("server2", "serverAuth", "IP:127.0.0.1");
        ca.leaf(
            "device",
            "clientAuth",
            "URI:urn:uuid:00000000-0000-0000-0000-000000000001",
        );
        ca.leaf(
            "revoked",
            "clientAuth",
            "URI:urn:uuid:00000000-0000-0000-0000-000000000002",
        );
        let provider = keyward::tls::provider();
        let key =
            keyward::tls::files::load(&ca.path("server.pem"), &ca.path("server.key"), &provider)
                .unwrap();
        let resolver = Arc::new(ServerCertResolver::new(Arc::new(key)));
        let deny = Arc::new(FingerprintDenyList::default());
        deny.deny(&fingerprint(&ca.path("revoked.pem")));
        let ca_der = {
            let pem = std::fs::read_to_string(ca.path("ca.pem")).unwrap();
            der::pem::decode_vec(pem.as_bytes()).unwrap().1
        };
        let config = keyward::tls::server_config(
            resolver.clone(),
            ClientAuthSettings {
                mode: ClientAuth::Optional,
                trust_anchors: vec![ca_der],
                check: Some(deny.clone()),
            },
        )
        .unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let router = axum::Router::new().route("/whoami", get(whoami));
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(serve(
            listener,
            config,
            Some(deny.clone()),
            HandshakeLimits {
                timeout: std::time::Duration::from_secs(5),
                max_in_progress: 4,
            },
            router,
            async move {
                let _ = stop_rx.await;
            },
        ));
        let url = format!("https://{addr}/whoami");
        let cacert = ca.path("ca.pem");
        let cacert = cacert.to_str().unwrap();
        let (cert, key) = (ca.path("device.pem"), ca.path("device.key"));

        let out = tokio::task::spawn_blocking({
            let url = url.clone();
            let cacert = cacert.to_string();
            let (cert, key) = (cert.clone(), key.clone());
            move || {
                (
                    curl(
                        &[
                            "--cacert",
                            &cacert,
                            "--cert",
                            cert.to_str().unwrap(),
                            "--key",
                            key.to_str().unwrap(),
                        ],
                        &url,
                    ),
                    curl(&["--cacert", &cacert], &url),
                    curl(&[], &url),
                )
            }
        })
        .await
        .unwrap();
        let (with_cert, without_cert, untrusted) = out;
        println!("echo with a device certificate: {}", with_cert.1);
        assert!(with_cert.0, "{}", with_cert.1);
        assert_eq!(
            with_cert.1,
            format!(
                "peer={} from=127.0.0.1",
                fingerprint(&ca.path("device.pem"))
            )
        );
        assert!(without_cert.0, "{}", without_cert.1);
        assert_eq!(without_cert.1, "peer=none from=127.0.0.1");
        assert!(
            !untrusted.0,
            "curl without --cacert must not trust the server: {}",
            untrusted.1
        );

        // Denied by the revocation hook: refused during the handshake.
        let denied = tokio::task::spawn_blocking({
            let url = url.clone();
            let cacert = cacert.to_string();
            let (cert, key) = (ca.path("revoked.pem"), ca.path("revoked.key"));
            move || {
                curl(
                    &[
                        "--cacert",
                        &cacert,
                        "--cert",
                        cert.to_str().unwrap(),
                        "--key",
                        key.to_str().unwrap(),
                    ],
                    &url,
                )
            }
        })
        .await
        .unwrap();
        assert!(!denied.0, "a denied certificate got through: {}", denied.1);
        assert!(!denied.1.contains("peer="), "{}", denied.1);
        assert!(
            denied.1.contains("certificate revoked"),
            "not the revocation alert: {}",
            denied.1
        );

        // A session resumed after the certificate was denied is closed: TLS
        // skips certificate verification on resumption, the listener does not.
        let resumed = tokio::task::spawn_blocking({
            let addr = addr.to_string();
            let cacert = cacert.to_string();
            let (cert, key) = (cert.clone(), key.clone());
            let sess = tmp.path().join("session.pem");
            let deny = deny.clone();
            let device_fp = fingerprint(&ca.path("device.pem"));
            move || {
                let args = |io: &str| {
                    vec![
                        "-CAfile".to_string(),
                        cacert.clone(),
                        "-cert".to_string(),
                        cert.to_str().unwrap().to_string(),
                        "-key".to_string(),
                        key.to_str().unwrap().to_string(),
                        io.to_string(),
                        sess.to_str().unwrap().to_string(),
                    ]
                };
                let first = args("-sess_out");
                let first: Vec<&str> = first.iter().map(String::as_str).collect();
                let (ok, out) = s_client_get(&addr, "/whoami", &first);
                assert!(ok && out.contains(&format!("peer={device_fp}")), "{out}");
                deny.deny(&device_fp);
                let again = args("-sess_in");
                let again: Vec<&str> = again.iter().map(String::as_str).collect();
                s_client_get(&addr, "/whoami", &again).1
            }
        })
        .await
        .unwrap();
        assert!(
            resumed.contains("Reused"),
            "the session was not resumed: {resumed}"
        );
        assert!(
            !resumed.contains("peer="),
            "a denied certificate came back on a resumed session: {resumed}"
        );

        // Renewal without restart: the next handshake gets the new certificate.
        let before = served_fingerprint(addr, cacert).await;
        assert_eq!(before, fingerprint(&ca.path("server.pem")));
        let key2 =
            keyward::tls::files::load(&ca.path("server2.pem"), &ca.path("server2.key"), &provider)
                .unwrap();
        resolver.swap(Arc::new(key2));
        let after = served_fingerprint(addr, cacert).await;
        assert_eq!(after, fingerprint(&ca.path("server2.pem")));

        stop_tx.send(()).unwrap();
        tokio::time::timeout(std::time::Duration::from_secs(10), server)
            .await
            .expect("serve did not return after shutdown")
            .unwrap();
        assert!(
            tokio::net::TcpStream::connect(addr).await.is_err(),
            "still accepting"
        );
    }

    /// The fingerprint of the certificate the server presents, by s_client.
    async fn served_fingerprint(addr: SocketAddr, cacert: &str) -> String {
        let cacert = cacert.to_string();
        tokio::task::spawn_blocking(move || {
            let dir = tempfile::tempdir().unwrap();
            let (ok, out) = s_client(&addr.to_string(), &["-CAfile", &cacert, "-showcerts"]);
            assert!(ok, "{out}");
            let pem_start = out.find("-----BEGIN CERTIFICATE-----").unwrap();
            let pem_end = out.find("-----END CERTIFICATE-----").unwrap() + 25;
            let p = dir.path().join("served.pem");
            std::fs::write(&p, format!("{}\n", &out[pem_start..pem_end])).unwrap();
            fingerprint(&p)
        })
        .await
        .unwrap()
    }
}

// ---------------------------------------------------------------------------
// The daemon.

/// Files mode: an openssl-made certificate and key; curl and s_client
/// reach the daemon with the CA, and not without it.
#[test]
fn files_mode_serves_https_that_curl_and_s_client_trust_with_the_ca() {
    let env = Env::new();
    let ca = OpensslCa::new(&env.path("tls"));
    ca.leaf("server", "serverAuth", "IP:127.0.0.1,DNS:localhost");
    set_server_tls(
        &env,
        "certificate_file = \"tls/server.pem\"\nkey_file = \"tls/server.key\"\n",
    );
    env.init();
    let daemon = env.serve();
    assert!(
        daemon.url.starts_with("https://127.0.0.1:"),
        "{}",
        daemon.url
    );
    let cacert = ca.path("ca.pem");
    let (ok, body) = curl(
        &["--cacert", cacert.to_str().unwrap()],
        &format!("{}/healthz", daemon.url),
    );
    assert!(ok, "{body}");
    let (ok, body) = curl(&[], &format!("{}/healthz", daemon.url));
    assert!(!ok, "curl trusted an unknown CA: {body}");
    let (ok, out) = s_client(
        &host_port(&daemon.url),
        &["-CAfile", cacert.to_str().unwrap()],
    );
    assert!(ok, "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("HTTP/1.1 200"), "{out}");
    // Plain HTTP on the TLS port gets nothing useful.
    let (ok, _) = curl(&[], &format!("http://{}/healthz", host_port(&daemon.url)));
    assert!(!ok);
}

/// Start-up refusals, each naming its key: plain HTTP off loopback, both
/// files and issue, a missing file, a key that is not the certificate's, a
/// key readable by others.
#[test]
fn bad_tls_configs_are_refused_naming_the_key() {
    let env = Env::new();
    let ca = OpensslCa::new(&env.path("tls"));
    ca.leaf("server", "serverAuth", "IP:127.0.0.1");
    ca.leaf("other", "serverAuth", "IP:127.0.0.1");
    env.init();
    let base = std::fs::read_to_string(&env.config).unwrap();
    let attempt = |config: &str| -> String {
        std::fs::write(&env.config, config).unwrap();
        let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
        assert!(!out.status.success(), "accepted: {config}");
        text(&out)
    };
    let serve = |config: &str| -> String {
        std::fs::write(&env.config, config).unwrap();
        let out = Command::new(common::keyward_bin())
            .env("SOFTHSM2_CONF", &env.softhsm_conf)
            .args(["serve", "--config", env.config.to_str().unwrap()])
            .output()
            .unwrap();
        assert!(!out.status.success(), "served: {config}");
        text(&out)
    };
    let files =
        "[server.tls]\ncertificate_file = \"tls/server.pem\"\nkey_file = \"tls/server.key\"\n";

    let e = serve(&base.replace("127.0.0.1:0", "0.0.0.0:0"));
    assert!(e.contains("`server.tls`") && e.contains("loopback"), "{e}");

    let e = attempt(&format!("{base}{files}issue = true\n"));
    assert!(e.contains("server.tls.issue"), "{e}");

    let e = attempt(&format!(
        "{base}{}",
        files.replace("server.pem", "absent.pem")
    ));
    assert!(
        e.contains("server.tls.certificate_file") && e.contains("absent.pem"),
        "{e}"
    );

    let e = attempt(&format!(
        "{base}{}",
        files.replace("server.key", "other.key")
    ));
    assert!(
        e.contains("server.tls.key_file") && e.contains("does not match"),
        "{e}"
    );
    let e = serve(&format!(
        "{base}{}",
        files.replace("server.key", "other.key")
    ));
    assert!(
        e.contains("server.tls.key_file") && e.contains("does not match"),
        "{e}"
    );

    chmod(&ca.path("server.key"), 0o644);
    let e = attempt(&format!("{base}{files}"));
    assert!(
        e.contains("server.tls.key_file") && e.contains("chmod 600"),
        "{e}"
    );
    chmod(&ca.path("server.key"), 0o600);

    // issue = true with a CA that is not an issuing CA: config check and serve.
    let root_issuer = format!(
        "{base}[server.tls]\n{}",
        ISSUE.replace("\"devices\"", "\"root\"")
    );
    let e = attempt(&root_issuer);
    assert!(
        e.contains("server.tls.issuer") && e.contains("`root`"),
        "{e}"
    );
    let e = serve(&root_issuer);
    assert!(
        e.contains("server.tls.issuer") && e.contains("not an issuing CA"),
        "{e}"
    );
    let e = serve(&root_issuer.replace("\"root\"", "\"nope\""));
    assert!(
        e.contains("server.tls.issuer") && e.contains("`nope` does not exist"),
        "{e}"
    );
    // Nothing was issued by the refused starts.
    assert_eq!(
        sql::<i64>(
            &env,
            "SELECT COUNT(*) FROM service_certificates WHERE purpose = 'tls-server'"
        ),
        0
    );
    assert_eq!(
        sql::<i64>(
            &env,
            "SELECT COUNT(*) FROM keys WHERE purpose = 'tls-server'"
        ),
        0
    );

    std::fs::write(&env.config, format!("{base}{files}")).unwrap();
    let out = env.run(&["config", "check", "--config", env.config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", text(&out));
}

// ---------------------------------------------------------------------------
// issue = true: the server key in SoftHSM2, the certificate from keyward's CA.

const ISSUE: &str = "issue = true\nissuer = \"devices\"\ndns_names = [\"localhost\"]\nip_addresses = [\"127.0.0.1\"]\n";

/// keyward's root certificate, read from the database, written as PEM.
fn root_pem(env: &Env) -> PathBuf {
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let der: Vec<u8> = c
        .query_row("SELECT certificate FROM cas WHERE kind = 'root'", [], |r| {
            r.get(0)
        })
        .unwrap();
    let pem = der::pem::encode_string("CERTIFICATE", der::pem::LineEnding::LF, &der).unwrap();
    common::write(env.dir.path(), "root.pem", &pem)
}

/// A scalar from the database.
fn sql<T: rusqlite::types::FromSql>(env: &Env, query: &str) -> T {
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .query_row(query, [], |r| r.get(0))
        .unwrap()
}

/// A reqwest client that trusts only keyward's root.
fn https_client(root: &Path) -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let certs = reqwest::Certificate::from_pem_bundle(&std::fs::read(root).unwrap()).unwrap();
    reqwest::Client::builder()
        .tls_certs_only(certs)
        .build()
        .unwrap()
}

async fn https_call(
    http: &reqwest::Client,
    method: reqwest::Method,
    url: &str,
    token: Option<&str>,
    body: Option<serde_json::Value>,
) -> (u16, serde_json::Value) {
    let mut rb = http.request(method, url);
    if let Some(t) = token {
        rb = rb.bearer_auth(t);
    }
    if let Some(b) = body {
        rb = rb.json(&b);
    }
    let resp = rb.send().await.unwrap();
    let status = resp.status().as_u16();
    let t = resp.text().await.unwrap();
    (
        status,
        serde_json::from_str(&t).unwrap_or(serde_json::Value::String(t)),
    )
}

/// The certificate the daemon serves, as `openssl x509 -text`.
fn served_text(addr: &str, root: &Path) -> String {
    served_text_at(addr, root, &[])
}

/// Like [`served_text`], with extra s_client arguments (e.g. `-attime`).
fn served_text_at(addr: &str, root: &Path, extra: &[&str]) -> String {
    let mut args = vec!["-CAfile", root.to_str().unwrap()];
    args.extend_from_slice(extra);
    let (ok, out) = s_client(addr, &args);
    assert!(ok, "{out}");
    let start = out.find("-----BEGIN CERTIFICATE-----").unwrap();
    let end = out.find("-----END CERTIFICATE-----").unwrap() + 25;
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("served.pem");
    std::fs::write(&p, format!("{}\n", &out[start..end])).unwrap();
    let o = run(Command::new("openssl")
        .args(["x509", "-noout", "-text", "-fingerprint", "-sha256", "-in"])
        .arg(&p));
    text(&o)
}

/// keyward issues itself a server certificate (key in the HSM), curl and
/// s_client trust it with the root and not without, the CLI reaches the
/// daemon with KEYWARD_CA_CERT / --ca-cert, and a restart keeps the
/// certificate instead of issuing another.
#[test]
fn issue_mode_serves_a_certificate_from_keywards_ca_with_the_key_in_the_hsm() {
    let env = Env::new();
    set_server_tls(&env, ISSUE);
    let token = env.init();
    let mut daemon = env.serve();
    let root = root_pem(&env);
    let addr = host_port(&daemon.url);
    let healthz = format!("{}/healthz", daemon.url);
    let (ok, body) = curl(&["--cacert", root.to_str().unwrap()], &healthz);
    assert!(ok, "{body}");
    let (ok, body) = curl(&[], &healthz);
    assert!(!ok, "curl trusted keyward's root without --cacert: {body}");
    let (ok, out) = s_client(&addr, &["-CAfile", root.to_str().unwrap()]);
    assert!(ok && out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("HTTP/1.1 200"), "{out}");

    let served = served_text(&addr, &root);
    assert!(served.contains("TLS Web Server Authentication"), "{served}");
    assert!(served.contains("IP Address:127.0.0.1"), "{served}");
    assert!(served.contains("DNS:localhost"), "{served}");
    assert!(served.contains("CA:FALSE"), "{served}");
    assert!(served.contains("Digital Signature"), "{served}");
    assert!(
        served.contains("Issuer: O = keyward, CN = keyward Device Issuing CA"),
        "{served}"
    );

    // The key is an active tls-server key in the PKCS#11 token; the
    // certificate is its service certificate; all of it audited.
    assert_eq!(
        sql::<i64>(
            &env,
            "SELECT COUNT(*) FROM keys WHERE purpose = 'tls-server' AND state = 'active' AND backend = 'pkcs11'"
        ),
        1
    );
    assert_eq!(
        sql::<i64>(
            &env,
            "SELECT COUNT(*) FROM service_certificates WHERE purpose = 'tls-server' AND retired_at IS NULL"
        ),
        1
    );
    let serial: String = sql(
        &env,
        "SELECT serial FROM service_certificates WHERE purpose = 'tls-server'",
    );
    let fp: String = sql(
        &env,
        &format!("SELECT fingerprint FROM certificates WHERE serial = '{serial}'"),
    );
    assert!(
        served.to_ascii_lowercase().replace(':', "").contains(&fp),
        "the served certificate is not the stored one"
    );
    let actions: Vec<String> = env.audit_after(0).into_iter().map(|(_, a, _)| a).collect();
    assert!(
        actions.contains(&"tls.server_certificate_issue".to_string()),
        "{actions:?}"
    );
    assert!(actions.contains(&"key.generate".to_string()), "{actions:?}");

    // The CLI over HTTPS: with the root (env or flag) it works, without it not.
    let list = |vars: &[(&str, &str)], args: &[&str]| {
        let mut c = env.keyward();
        c.env("KEYWARD_URL", &daemon.url)
            .env("KEYWARD_TOKEN", &token);
        for (k, v) in vars {
            c.env(k, v);
        }
        run(c.args(["registrations", "list"]).args(args))
    };
    let o = list(&[("KEYWARD_CA_CERT", root.to_str().unwrap())], &[]);
    assert!(o.status.success(), "{}", text(&o));
    let o = list(&[], &["--ca-cert", root.to_str().unwrap()]);
    assert!(o.status.success(), "{}", text(&o));
    let o = list(&[], &[]);
    assert!(
        !o.status.success(),
        "the CLI trusted keyward's root unasked"
    );
    let o = list(&[("KEYWARD_CA_CERT", "/nonexistent/root.pem")], &[]);
    assert!(!o.status.success());
    assert!(text(&o).contains("KEYWARD_CA_CERT"), "{}", text(&o));

    // A restart serves the same certificate.
    daemon.stop();
    let daemon = env.serve();
    let again = served_text(&host_port(&daemon.url), &root);
    assert!(again.to_ascii_lowercase().replace(':', "").contains(&fp));
    assert_eq!(
        sql::<i64>(
            &env,
            "SELECT COUNT(*) FROM service_certificates WHERE purpose = 'tls-server'"
        ),
        1
    );
}

/// mTLS with device certificates issued by keyward: with client_auth =
/// "required" a client without a certificate is refused and an enrolled
/// device gets in; then (client_auth "optional", so the admin CLI can reach
/// it) `keyward devices suspend` refuses the device at the handshake and
/// `resume` lets it back, a renewal authenticated by the TLS client
/// certificate alone succeeds, and after `keyward devices revoke` neither
/// the renewed nor the superseded certificate gets in.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_auth_admits_keyward_devices_and_refuses_others_at_the_handshake() {
    let env = Env::new();
    set_server_tls(&env, &format!("{ISSUE}client_auth = \"optional\"\n"));
    let bootstrap = env.init();
    let mut daemon = env.serve();
    let root = root_pem(&env);
    let url = daemon.url.clone();
    let http = https_client(&root);

    // Enroll over HTTPS with the reference client and KEYWARD_CA_CERT.
    let out_dir = env.path("device");
    let mut enroll = env
        .keyward()
        .env("KEYWARD_CA_CERT", &root)
        .args(["enroll", "--url", &url, "--name", "sensor-tls", "--out"])
        .arg(&out_dir)
        .args(["--poll-interval", "1", "--timeout", "60"])
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut id = String::new();
    for _ in 0..100 {
        let (_, list) = https_call(
            &http,
            reqwest::Method::GET,
            &format!("{url}/v1/admin/registrations?status=pending"),
            Some(&bootstrap),
            None,
        )
        .await;
        if let Some(r) = list["items"].as_array().and_then(|a| a.first()) {
            id = r["id"].as_str().unwrap().to_string();
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(!id.is_empty(), "registration never appeared");
    let (status, v) = https_call(
        &http,
        reqwest::Method::POST,
        &format!("{url}/v1/admin/invitations"),
        Some(&bootstrap),
        Some(serde_json::json!({ "name": "alice", "role": "approver" })),
    )
    .await;
    assert_eq!(status, 201, "{v}");
    let (status, redeemed) = https_call(
        &http,
        reqwest::Method::POST,
        &format!("{url}/v1/invitations/redeem"),
        None,
        Some(serde_json::json!({ "invitation_code": v["invitation_code"], "approval_code": null })),
    )
    .await;
    assert_eq!(status, 201, "{redeemed}");
    let (status, v) = https_call(
        &http,
        reqwest::Method::POST,
        &format!("{url}/v1/admin/registrations/{id}/approve"),
        Some(redeemed["token"].as_str().unwrap()),
        Some(serde_json::json!({ "comment": "tls test" })),
    )
    .await;
    assert_eq!(status, 200, "{v}");
    assert!(enroll.wait().unwrap().success());
    let (cert, key) = (out_dir.join("cert.pem"), out_dir.join("key.pem"));
    let device_args = [
        "-CAfile",
        root.to_str().unwrap(),
        "-cert",
        cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ];

    // Required: no certificate, no entry; the device's certificate, entry.
    daemon.stop();
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("client_auth = \"optional\"", "client_auth = \"required\""),
    )
    .unwrap();
    let daemon = env.serve();
    let addr = host_port(&daemon.url);
    let (_, out) = s_client(&addr, &["-CAfile", root.to_str().unwrap()]);
    assert!(
        !out.contains("HTTP/1.1 200"),
        "admitted without a certificate: {out}"
    );
    assert!(out.contains("alert"), "{out}");
    let (ok, out) = s_client(&addr, &device_args);
    println!("s_client with the device certificate:\n{out}");
    assert!(ok && out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(
        out.contains("HTTP/1.1 200"),
        "the device was not admitted: {out}"
    );
    // A certificate from another CA is refused too.
    let other = OpensslCa::new(&env.path("other-ca"));
    other.leaf(
        "stranger",
        "clientAuth",
        "URI:urn:uuid:00000000-0000-0000-0000-000000000009",
    );
    let (_, out) = s_client(
        &addr,
        &[
            "-CAfile",
            root.to_str().unwrap(),
            "-cert",
            other.path("stranger.pem").to_str().unwrap(),
            "-key",
            other.path("stranger.key").to_str().unwrap(),
        ],
    );
    assert!(
        !out.contains("HTTP/1.1 200"),
        "a foreign certificate got in: {out}"
    );

    // Revocation state is checked at each handshake, changed the way an
    // operator changes it: the CLI over HTTPS. Admins authenticate by token,
    // not certificate, so the operator runs client authentication
    // `optional`: a certificate, when presented, must still pass.
    drop(daemon);
    let config = std::fs::read_to_string(&env.config).unwrap();
    std::fs::write(
        &env.config,
        config.replace("client_auth = \"required\"", "client_auth = \"optional\""),
    )
    .unwrap();
    let daemon = env.serve();
    let addr = host_port(&daemon.url);
    let (_, reg) = https_call(
        &http,
        reqwest::Method::GET,
        &format!("{}/v1/admin/registrations/{id}", daemon.url),
        Some(&bootstrap),
        None,
    )
    .await;
    let device_id = reg["device_id"].as_str().unwrap().to_string();
    let cli = |args: &[&str]| {
        let out = env
            .keyward()
            .env("KEYWARD_URL", &daemon.url)
            .env("KEYWARD_TOKEN", &bootstrap)
            .env("KEYWARD_CA_CERT", &root)
            .args(args)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", text(&out));
    };
    cli(&["devices", "suspend", &device_id]);
    let (_, out) = s_client(&addr, &device_args);
    assert!(!out.contains("HTTP/1.1 200"), "suspended: admitted: {out}");
    assert!(out.contains("certificate revoked"), "suspended: {out}");
    cli(&["devices", "resume", &device_id]);
    let (ok, out) = s_client(&addr, &device_args);
    assert!(
        ok && out.contains("HTTP/1.1 200"),
        "resumed: refused: {out}"
    );

    // Renewal authenticated by the TLS client certificate alone (no nonce):
    // early, so an admin allows it first; curl is the device.
    cli(&["devices", "allow-renewal", &device_id]);
    let csr = env.path("renew.csr");
    openssl(
        env.dir.path(),
        &[
            "req",
            "-new",
            "-key",
            key.to_str().unwrap(),
            "-subj",
            &format!("/CN={device_id}"),
            "-out",
            csr.to_str().unwrap(),
        ],
    );
    let body = serde_json::json!({ "csr": std::fs::read_to_string(&csr).unwrap() }).to_string();
    let renew_url = format!("{}/v1/devices/{device_id}/renew", daemon.url);
    let (ok, answer) = curl(
        &[
            "--cacert",
            root.to_str().unwrap(),
            "--cert",
            cert.to_str().unwrap(),
            "--key",
            key.to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "-X",
            "POST",
            "-d",
            &body,
        ],
        &renew_url,
    );
    assert!(ok, "{answer}");
    let renewed: serde_json::Value =
        serde_json::from_str(&answer).unwrap_or_else(|_| panic!("{answer}"));
    assert_eq!(renewed["forced"], true, "{renewed}");
    assert_eq!(renewed["rekey"], false, "{renewed}");
    let new_cert = common::write(
        env.dir.path(),
        "renewed.pem",
        renewed["certificate_pem"].as_str().unwrap(),
    );
    let new_args = [
        "-CAfile",
        root.to_str().unwrap(),
        "-cert",
        new_cert.to_str().unwrap(),
        "-key",
        key.to_str().unwrap(),
    ];
    let (ok, out) = s_client(&addr, &new_args);
    assert!(
        ok && out.contains("HTTP/1.1 200"),
        "renewed certificate refused: {out}"
    );
    // Without a client certificate and without a nonce: no proof.
    let (ok, answer) = curl(
        &[
            "--cacert",
            root.to_str().unwrap(),
            "-H",
            "content-type: application/json",
            "-X",
            "POST",
            "-d",
            &body,
        ],
        &renew_url,
    );
    assert!(ok && answer.contains("proof_required"), "{answer}");

    // Revoked: neither the new certificate nor the superseded one gets in.
    cli(&[
        "devices",
        "revoke",
        &device_id,
        "--reason",
        "key-compromise",
    ]);
    for (name, args) in [("renewed", &new_args), ("superseded", &device_args)] {
        let (_, out) = s_client(&addr, args);
        assert!(!out.contains("HTTP/1.1 200"), "{name}: admitted: {out}");
        assert!(out.contains("certificate revoked"), "{name}: {out}");
    }
}

// ---------------------------------------------------------------------------
// Renewal with a manual clock, in-process. SoftHSM2 reads SOFTHSM2_CONF once,
// at C_Initialize, so the test re-runs itself in a child process with the
// variable set (as tests/jobs_clock.rs does).

const CHILD: &str = "KEYWARD_TEST_TLS_INPROCESS_CONFIG";

fn child_config(test: &str, setup: impl FnOnce(&Env)) -> Option<PathBuf> {
    if let Some(cfg) = std::env::var_os(CHILD) {
        return Some(PathBuf::from(cfg));
    }
    let env = Env::new();
    setup(&env);
    env.init();
    let status = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture"])
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .env(CHILD, &env.config)
        .status()
        .unwrap();
    assert!(status.success(), "{test} failed in its child process");
    None
}

/// The renewal job does nothing before `renew_before_days`, then issues a
/// new certificate with a new HSM key, retires the old key and service
/// certificate, supersedes the old certificate, and the listener serves
/// the new one (signed in the HSM) without a restart.
#[test]
fn the_renewal_job_renews_before_expiry_and_the_listener_serves_the_new_certificate() {
    use keyward::clock::{Clock, ManualClock};
    use keyward::jobs::Job;
    use keyward::store::{CertificateStatus, KeyPurpose, KeyState};
    let Some(config) = child_config(
        "the_renewal_job_renews_before_expiry_and_the_listener_serves_the_new_certificate",
        |env| {
            set_server_tls(
                env,
                &format!("{ISSUE}validity_days = 10\nrenew_before_days = 3\n"),
            )
        },
    ) else {
        return;
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _ = rustls::crypto::ring::default_provider().install_default();
        let t0 = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let clock = Arc::new(ManualClock::new(t0));
        let config = keyward::config::Config::load(&config).unwrap();
        let mut app = keyward::app::App::build_with_clock(config, clock.clone())
            .await
            .unwrap();
        app.prepare_tls().await.unwrap();
        let tls = app.tls.as_ref().unwrap();
        let resolver = tls.resolver.clone();
        let job = tls.renewal.clone().unwrap();
        let store = app.state.store.clone();
        let (serial0, end0) = job.current().unwrap();
        assert_eq!(end0, (t0 + time::Duration::days(10)).unix_timestamp());
        let key0 = store
            .service_certificates(KeyPurpose::TlsServer)
            .await
            .unwrap()[0]
            .key_id;

        clock.set(t0 + time::Duration::days(7) - time::Duration::seconds(1));
        assert!(
            !job.renew_if_due(clock.now()).await.unwrap(),
            "renewed early"
        );
        assert_eq!(job.current().unwrap().0, serial0);

        clock.set(t0 + time::Duration::days(7));
        job.tick(clock.now()).await.unwrap();
        let (serial1, end1) = job.current().unwrap();
        assert_ne!(serial1, serial0);
        assert_eq!(end1, (t0 + time::Duration::days(17)).unix_timestamp());
        let served = resolver.current();
        let served_serial = {
            use der::Decode;
            let c = x509_cert::Certificate::from_der(served.end_entity_cert().unwrap()).unwrap();
            hex::encode_upper(c.tbs_certificate().serial_number().as_bytes())
        };
        assert_eq!(
            served_serial, serial1,
            "the resolver still serves the old certificate"
        );

        let in_service = store
            .service_certificates(KeyPurpose::TlsServer)
            .await
            .unwrap();
        assert_eq!(in_service.len(), 1);
        assert_eq!(in_service[0].serial, serial1);
        assert_ne!(in_service[0].key_id, key0, "renewal must use a new key");
        let old = store.get_certificate(&serial0).await.unwrap().unwrap();
        assert_eq!(old.status, CertificateStatus::Superseded);
        assert_eq!(old.superseded_by.as_deref(), Some(serial1.as_str()));
        assert_eq!(
            store.get_key(key0).await.unwrap().unwrap().state,
            KeyState::Retired
        );
        assert_eq!(
            store
                .get_key(in_service[0].key_id)
                .await
                .unwrap()
                .unwrap()
                .state,
            KeyState::Active
        );

        // The listener, still the same process, serves the renewed certificate;
        // s_client completing the handshake proves the new HSM key signs.
        let root = {
            let cas = store.list_cas().await.unwrap();
            let root = cas
                .iter()
                .find(|c| c.kind == keyward::model::CaKind::Root)
                .unwrap();
            let dir = tempfile::tempdir().unwrap().keep();
            let pem = der::pem::encode_string(
                "CERTIFICATE",
                der::pem::LineEnding::LF,
                &root.certificate_der,
            )
            .unwrap();
            common::write(&dir, "root.pem", &pem)
        };
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(app.serve_on(listener, async move {
            let _ = stop_rx.await;
        }));
        // Verified at the manual clock's time (the certificate starts in a week).
        let at = (clock.now() + time::Duration::minutes(1))
            .unix_timestamp()
            .to_string();
        let out = tokio::task::spawn_blocking(move || {
            served_text_at(&addr.to_string(), &root, &["-attime", &at])
        })
        .await
        .unwrap();
        let serial_line = out
            .lines()
            .find(|l| l.trim_start().starts_with("Serial Number"))
            .unwrap_or_default()
            .to_string();
        let printed: String = out
            .lines()
            .skip_while(|l| !l.trim_start().starts_with("Serial Number"))
            .take(2)
            .collect::<Vec<_>>()
            .join("")
            .replace(['\n', ' ', ':'], "")
            .replace("SerialNumber", "")
            .to_ascii_uppercase();
        assert!(
            printed.contains(&serial1) || serial_line.to_ascii_uppercase().contains(&serial1),
            "served serial is not {serial1}: {out}"
        );
        stop_tx.send(()).unwrap();
        server.await.unwrap().unwrap();
    });
}
