//! CRL benchmark, run by `scripts/bench.sh` (or `cargo bench --bench
//! revocation -- [--entries N] [--runs N] [--out BENCHMARKS.md]`).
//!
//! Sets up its own installation in a temp dir: a SoftHSM2 token
//! (`keyward::softhsm`), the shipped policies, `keyward init`, then the
//! application in-process (`App::build`, as `keyward serve` wires it). It
//! stores 100,000 revoked, unexpired certificates of the `devices` CA and
//! times `CrlPublisher::publish`: the store read of the revoked entries,
//! the TBSCertList encoding, the HSM signature (SoftHSM2, ECDSA P-256), the
//! signature check against the CA certificate, PEM, and the commit of the
//! CRL with its audit event. `openssl crl -verify` checks the last CRL.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, so the binary prepares the token
//! directory and re-executes itself with `SOFTHSM2_CONF` set.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::app::App;
use keyward::audit::AuditDraft;
use keyward::config::Config;
use keyward::model::RevocationReason;
use keyward::softhsm::SoftHsm;
use keyward::store::{CertificateRecord, CertificateStatus, Change, Write};
use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::time::{Duration, Instant};

/// Set (to the work directory) in the re-executed child.
const WORK_DIR: &str = "KEYWARD_BENCH_DIR";
const LABEL: &str = "keyward-bench-crl";
/// Certificates inserted per store change while filling the store.
const FILL_BATCH: usize = 2_000;

struct Args {
    entries: usize,
    runs: usize,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        entries: 100_000,
        runs: 5,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--entries" => a.entries = it.next().unwrap().parse().unwrap(),
            "--runs" => a.runs = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.runs >= 1, "--runs must be at least 1");
    a
}

fn random_text(bytes: usize) -> String {
    hex::encode(keyward::auth::random_bytes(bytes).unwrap())
}

/// Token, secrets, the shipped policies, config, `keyward init`.
fn install(dir: &Path, hsm: &SoftHsm) -> PathBuf {
    let pin = SecretString::from(random_text(12));
    hsm.create_token(LABEL, &SecretString::from(random_text(12)), &pin)
        .unwrap();
    std::fs::write(dir.join("hsm.pin"), pin.expose_secret()).unwrap();
    std::fs::write(dir.join("pepper"), random_text(24)).unwrap();
    let policies = dir.join("policies");
    std::fs::create_dir_all(&policies).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["ca.toml", "enrollment.toml", "rotation.toml"] {
        std::fs::copy(repo.join(f), policies.join(f)).unwrap();
    }
    let config = dir.join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\
             [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{LABEL}\"\npin_file = \"hsm.pin\"\nsessions = 2\n\
             [auth]\ntoken_pepper_file = \"pepper\"\n\
             [log]\nlevel = \"warn\"\n",
            hsm.module().display()
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_keyward"))
        .env("SOFTHSM2_CONF", hsm.conf())
        .arg("init")
        .arg("--config")
        .arg(&config)
        .arg("--token-out")
        .arg(dir.join("admin.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyward init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    config
}

fn machine() -> String {
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|c| {
            c.lines()
                .find(|l| l.starts_with("model name"))
                .map(|l| l.split(':').nth(1).unwrap_or("").trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(0);
    let softhsm = Command::new("softhsm2-util")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}; SoftHSM {softhsm}")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() -> ExitCode {
    let Some(dir) = std::env::var_os(WORK_DIR) else {
        let dir = tempfile::tempdir().unwrap();
        let hsm = SoftHsm::prepare(dir.path()).unwrap();
        let status = Command::new(std::env::current_exe().unwrap())
            .args(std::env::args_os().skip(1))
            .env("SOFTHSM2_CONF", hsm.conf())
            .env(WORK_DIR, dir.path())
            .status()
            .unwrap();
        return ExitCode::from(status.code().unwrap_or(1) as u8);
    };
    let dir = PathBuf::from(dir);
    let hsm = SoftHsm::prepare(&dir).unwrap();
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    let config = install(&dir, &hsm);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(run(&a, &config, &dir));
    ExitCode::SUCCESS
}

async fn run(a: &Args, config: &Path, dir: &Path) {
    let app = App::build(Config::load(config).unwrap()).await.unwrap();
    let s = &app.state;
    let issuer = s.ca.issuer("devices").unwrap();
    let now = time::OffsetDateTime::now_utc().unix_timestamp();

    // 100,000 revoked, unexpired device certificates of `devices`.
    let fill = Instant::now();
    let reasons = [
        RevocationReason::KeyCompromise,
        RevocationReason::Superseded,
        RevocationReason::CessationOfOperation,
        RevocationReason::Unspecified,
        RevocationReason::CertificateHold,
    ];
    let fake_der = vec![0x30u8; 400];
    let mut done = 0;
    while done < a.entries {
        let n = FILL_BATCH.min(a.entries - done);
        let mut change = Change::new().audit(AuditDraft::new(
            "bench",
            "bench.fill",
            format!("certificates:{done}"),
        ));
        for i in done..done + n {
            // Like keyward's serials: a millisecond timestamp, then random bits.
            let mut serial = [0u8; 16];
            serial[..6].copy_from_slice(&(now * 1000 + i as i64).to_be_bytes()[2..]);
            serial[6..].copy_from_slice(&keyward::auth::random_bytes(10).unwrap());
            let serial = hex::encode_upper(serial);
            change = change.write(Write::InsertCertificate(CertificateRecord {
                serial: serial.clone(),
                device_id: None,
                issuer_ca: issuer.name.clone(),
                issuer_key_id: issuer.key_id,
                subject: format!("bench-{i}"),
                not_before: now - 86_400,
                not_after: now + 365 * 86_400,
                fingerprint_sha256: serial,
                der: fake_der.clone(),
                status: CertificateStatus::Revoked,
                revoked_at: Some(now - (i % 86_400) as i64),
                revocation_reason: Some(reasons[i % reasons.len()]),
                created_at: now - 86_400,
                superseded_by: None,
                spki_sha256: None,
            }));
        }
        s.store.commit(change).await.unwrap();
        done += n;
    }
    println!(
        "==> stored {} revoked certificates in {:.1} s",
        a.entries,
        fill.elapsed().as_secs_f64()
    );

    // The read alone, for the breakdown.
    let t = Instant::now();
    let read = s
        .store
        .revoked_certificates("devices", now)
        .await
        .unwrap()
        .len();
    let read_ms = ms(t.elapsed());
    assert_eq!(read, a.entries);

    // Warm-up (the first CRL also fills caches), then the timed runs.
    s.crls.publish("devices", "bench").await.unwrap();
    let mut times = Vec::new();
    let mut last = None;
    for _ in 0..a.runs {
        let t = Instant::now();
        let crl = s.crls.publish("devices", "bench").await.unwrap();
        times.push(t.elapsed());
        assert_eq!(crl.entries, a.entries);
        last = Some(crl);
    }
    let crl = last.unwrap();
    times.sort();
    let (min, med, max) = (
        ms(times[0]),
        ms(times[times.len() / 2]),
        ms(times[times.len() - 1]),
    );
    println!(
        "publish a CRL of {} entries ({} bytes DER): median {med:.0} ms, min {min:.0} ms, max {max:.0} ms over {} runs (target < 1000 ms); store read alone {read_ms:.0} ms",
        crl.entries,
        crl.der.len(),
        a.runs
    );

    // The last CRL, checked by openssl against the CA chain.
    std::fs::write(dir.join("bench.crl"), &crl.pem).unwrap();
    std::fs::write(dir.join("chain.pem"), issuer.chain_pem.as_bytes()).unwrap();
    let out = Command::new("openssl")
        .args(["crl", "-in", "bench.crl", "-CAfile", "chain.pem", "-noout"])
        .current_dir(dir)
        .output()
        .unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("verify OK"),
        "openssl crl: {text}"
    );
    println!("==> openssl crl -verify: OK");

    if let Some(out) = &a.out {
        let md = format!(
            "\n## CRL publication — {}\n\nMachine: {}. In-process `CrlPublisher::publish` (release) on the `devices` CA (ECDSA P-256 in SoftHSM2), SQLite (WAL, synchronous=FULL), {} revoked unexpired certificates in the store; one warm-up, then {} runs. Each run: store read of the revoked entries, TBSCertList encoding, HSM signature, signature check against the CA certificate, PEM, commit of the CRL (DER kept in the store) with its audit event. `openssl crl -verify` accepted the result.\n\n\
             | measurement | result |\n|---|---|\n\
             | CRL size | {} entries, {} bytes DER |\n\
             | publish, median of {} (target < 1 s) | {med:.0} ms |\n\
             | publish, min / max | {min:.0} ms / {max:.0} ms |\n\
             | of which: store read of the revoked entries | {read_ms:.0} ms |\n",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            machine(),
            a.entries,
            a.runs,
            crl.entries,
            crl.der.len(),
            a.runs,
        );
        let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
            "# keyward benchmarks\n\nProduced by `scripts/bench.sh`; newest run last. Numbers from one machine on one day: compare runs on the same machine only.\n".to_string()
        });
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}
