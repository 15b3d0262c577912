//! A real Mosquitto broker as a relying party: started by the test on a free
//! loopback port with a TLS listener that requires a client certificate
//! chaining to keyward's CAs, and optionally checks keyward's CRL file.
//! Clients are the stock `mosquitto_pub`.
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

impl Broker {
    /// Starts mosquitto in `dir` trusting `client_cafile` (keyward's issuing
    /// CA and root, PEM) for device certificates, with `crlfile` if given.
    pub fn start(dir: &Path, client_cafile: &Path, crlfile: Option<&Path>) -> Self {
        std::fs::create_dir_all(dir).unwrap();
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
