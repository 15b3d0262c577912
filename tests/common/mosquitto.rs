//! A real Mosquitto broker as a relying party: started by the test on a free
//! loopback port with a TLS listener that requires a client certificate
//! chaining to keyward's CAs, and optionally checks keyward's CRL file.
//! Clients are the stock `mosquitto_pub`.
//!
//! [`DynsecBroker`] is the same broker with the dynamic-security plugin, the
//! ACLs keyward provisions (a second, password-authenticated TLS listener for
//! the dynsec admin), stoppable and restartable on the same ports.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

pub struct Broker {
    child: Child,
    pub port: u16,
    /// The broker's own CA (clients verify the broker with it).
    pub server_ca: PathBuf,
    pub log: PathBuf,
    pub crlfile: Option<PathBuf>,
}

impl Drop for Broker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl missing");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The broker's server certificate (for 127.0.0.1) from a throwaway CA of
/// its own, in `dir`: `server-ca.pem`, `server.pem`, `server.key`.
fn server_certificate(dir: &Path) {
    // The broker's server certificate comes from a throwaway CA of its own:
    // the broker is a relying party of keyward, not one of its devices.
    openssl(
        dir,
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server-ca.key",
            "-out",
            "server-ca.pem",
            "-subj",
            "/CN=broker test CA",
            "-days",
            "2",
        ],
    );
    openssl(
        dir,
        &[
            "req",
            "-new",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.csr",
            "-subj",
            "/CN=127.0.0.1",
        ],
    );
    std::fs::write(dir.join("server.ext"), "subjectAltName=IP:127.0.0.1\n").unwrap();
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            "server.csr",
            "-CA",
            "server-ca.pem",
            "-CAkey",
            "server-ca.key",
            "-CAcreateserial",
            "-out",
            "server.pem",
            "-days",
            "2",
            "-extfile",
            "server.ext",
        ],
    );
}

impl Broker {
    /// Starts mosquitto in `dir` trusting `client_cafile` (keyward's issuing
    /// CA and root, PEM) for device certificates, with `crlfile` if given.
    pub fn start(dir: &Path, client_cafile: &Path, crlfile: Option<&Path>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        server_certificate(dir);
        let port = free_port();
        let mut conf = format!(
            "user root\n\
             per_listener_settings true\n\
             listener {port} 127.0.0.1\n\
             cafile {}\n\
             certfile {}\n\
             keyfile {}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             allow_anonymous false\n\
             log_dest file {}\n\
             log_type all\n",
            client_cafile.display(),
            dir.join("server.pem").display(),
            dir.join("server.key").display(),
            dir.join("mosquitto.log").display(),
        );
        if let Some(crl) = crlfile {
            conf.push_str(&format!("crlfile {}\n", crl.display()));
        }
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let log = dir.join("mosquitto.log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto missing (scripts/test.sh installs it)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen on {port}: {}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Self {
            child,
            port,
            server_ca: dir.join("server-ca.pem"),
            log,
            crlfile: crlfile.map(Path::to_path_buf),
        }
    }

    /// SIGHUP: mosquitto reloads its configuration, CRL file included.
    pub fn reload(&self) {
        let ok = Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok, "SIGHUP to mosquitto failed");
        // Give it a moment to reload; publishes retry anyway.
        std::thread::sleep(Duration::from_millis(300));
    }

    /// `mosquitto_pub` with a device certificate and key.
    pub fn publish(&self, cert: &Path, key: &Path, topic: &str, message: &str) -> Output {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .arg("--cafile")
            .arg(&self.server_ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-t", topic, "-m", message, "-q", "1", "-d"])
            .output()
            .expect("mosquitto_pub missing (scripts/test.sh installs mosquitto-clients)")
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

/// Mosquitto with the dynamic-security plugin: a device listener (TLS,
/// client certificate required, the certificate's CN is the username) and
/// an admin listener (TLS, username and password of the dynsec admin).
/// Created stopped: the certificates, the admin password file and the
/// plugin's initial configuration exist before keyward is configured.
pub struct DynsecBroker {
    child: Option<Child>,
    pub dir: PathBuf,
    pub device_port: u16,
    pub admin_port: u16,
    /// The broker's own CA (keyward and clients verify the broker with it).
    pub server_ca: PathBuf,
    pub admin_user: &'static str,
    /// The dynsec admin password, alone in a file (keyward's `password_file`).
    pub admin_password_file: PathBuf,
    pub log: PathBuf,
}

impl Drop for DynsecBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

impl DynsecBroker {
    pub fn new(dir: &Path) -> Self {
        std::fs::create_dir_all(dir).unwrap();
        server_certificate(dir);
        let password = uuid::Uuid::new_v4().simple().to_string();
        let admin_password_file = dir.join("admin.password");
        std::fs::write(&admin_password_file, format!("{password}\n")).unwrap();
        // `mosquitto_ctrl dynsec init` reads the password twice from stdin,
        // not from argv.
        let mut init = Command::new("mosquitto_ctrl")
            .arg("dynsec")
            .arg("init")
            .arg(dir.join("dynsec.json"))
            .arg("kw-admin")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_ctrl missing (scripts/test.sh installs mosquitto)");
        std::io::Write::write_all(
            init.stdin.as_mut().unwrap(),
            format!("{password}\n{password}\n").as_bytes(),
        )
        .unwrap();
        let out = init.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "mosquitto_ctrl dynsec init: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        // The stock clients acting as the admin read their options (the
        // password among them) from $XDG_CONFIG_HOME/<tool>, not from argv.
        let (device_port, admin_port) = (free_port(), free_port());
        let options = format!(
            "-h 127.0.0.1\n-p {admin_port}\n--cafile {}\n-u kw-admin\n-P {password}\n",
            dir.join("server-ca.pem").display()
        );
        std::fs::create_dir_all(dir.join("xdg")).unwrap();
        for tool in ["mosquitto_ctrl", "mosquitto_sub"] {
            std::fs::write(dir.join("xdg").join(tool), &options).unwrap();
        }
        Self {
            child: None,
            dir: dir.to_path_buf(),
            device_port,
            admin_port,
            server_ca: dir.join("server-ca.pem"),
            admin_user: "kw-admin",
            admin_password_file,
            log: dir.join("mosquitto.log"),
        }
    }

    /// Starts (or restarts) the broker trusting `client_cafile` (keyward's
    /// issuing CA and root) for devices. The plugin keeps its state in
    /// `dynsec.json` across restarts.
    pub fn start(&mut self, client_cafile: &Path) {
        assert!(self.child.is_none(), "already running");
        let dir = &self.dir;
        let conf = format!(
            "user root\n\
             per_listener_settings false\n\
             allow_anonymous false\n\
             plugin {plugin}\n\
             plugin_opt_config_file {dynsec}\n\
             log_dest file {log}\n\
             log_type all\n\
             listener {device} 127.0.0.1\n\
             cafile {cafile}\n\
             certfile {cert}\n\
             keyfile {key}\n\
             require_certificate true\n\
             use_identity_as_username true\n\
             listener {admin} 127.0.0.1\n\
             certfile {cert}\n\
             keyfile {key}\n",
            plugin = dynsec_plugin().display(),
            dynsec = dir.join("dynsec.json").display(),
            log = self.log.display(),
            device = self.device_port,
            cafile = client_cafile.display(),
            cert = dir.join("server.pem").display(),
            key = dir.join("server.key").display(),
            admin = self.admin_port,
        );
        std::fs::write(dir.join("mosquitto.conf"), conf).unwrap();
        let child = Command::new(mosquitto_bin())
            .arg("-c")
            .arg(dir.join("mosquitto.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto missing (scripts/test.sh installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(10);
        for port in [self.device_port, self.admin_port] {
            while TcpStream::connect(("127.0.0.1", port)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "mosquitto did not listen on {port}: {}",
                    self.log_text()
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Stops the broker (SIGKILL to its own PID) and waits for it.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `mosquitto_pub` (MQTT v5, QoS 1) with a device certificate and key:
    /// a publish the ACLs refuse is answered with PUBACK reason code 135
    /// (not authorized), which `mosquitto_pub` reports on stderr.
    pub fn publish(&self, cert: &Path, key: &Path, topic: &str, message: &str) -> Output {
        Command::new("mosquitto_pub")
            .args(["-h", "127.0.0.1", "-p", &self.device_port.to_string()])
            .arg("--cafile")
            .arg(&self.server_ca)
            .arg("--cert")
            .arg(cert)
            .arg("--key")
            .arg(key)
            .args(["-V", "5", "-t", topic, "-m", message, "-q", "1", "-d"])
            .output()
            .expect("mosquitto_pub missing (scripts/test.sh installs mosquitto-clients)")
    }

    /// `mosquitto_sub` as the admin (which may read every topic) on
    /// `filter`, printing `topic payload` lines until it is stopped or
    /// `seconds` pass.
    pub fn observe(&self, filter: &str, seconds: u32) -> Child {
        let child = Command::new("mosquitto_sub")
            .env("XDG_CONFIG_HOME", self.dir.join("xdg"))
            .args(["-t", filter, "-v", "-W", &seconds.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("mosquitto_sub missing");
        // Let it connect and subscribe before anything is published.
        std::thread::sleep(Duration::from_millis(500));
        child
    }

    /// `mosquitto_ctrl dynsec ARGS` as the admin; returns (success, stdout +
    /// stderr). Mosquitto 2.0's `mosquitto_ctrl` exits 0 even on an error
    /// answer (`getClient: Error: Client not found`): read the text.
    pub fn dynsec(&self, args: &[&str]) -> (bool, String) {
        let out = Command::new("mosquitto_ctrl")
            .env("XDG_CONFIG_HOME", self.dir.join("xdg"))
            .arg("dynsec")
            .args(args)
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn mosquitto_bin() -> &'static str {
    "mosquitto"
}

/// The dynamic-security plugin of Debian's `mosquitto` package, under the
/// multiarch library directory (`/usr/lib/<triplet>/`).
fn dynsec_plugin() -> PathBuf {
    let name = "mosquitto_dynamic_security.so";
    std::fs::read_dir("/usr/lib")
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path().join(name))
        .chain([PathBuf::from("/usr/lib").join(name)])
        .find(|p| p.exists())
        .expect("mosquitto's dynamic-security plugin missing (scripts/test.sh installs mosquitto)")
}
