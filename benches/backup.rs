//! Backup and restore benchmark at fleet scale (issue 10), run by
//! `scripts/bench.sh` (or `cargo bench --bench backup -- [--devices N]
//! [--out BENCHMARKS.md]`).
//!
//! Sets up its own installation in a temp dir: a SoftHSM2 token
//! (`keyward::softhsm`), the shipped policies plus an auto-approving `bench`
//! group, `keyward init` (real root and issuing CAs; the issuing key is
//! extractable by wrap only, so the backup wraps it). One device is then
//! enrolled in-process through `RegistryService::submit` (CSR verified,
//! certificate signed in SoftHSM2, registration + device + certificate +
//! audit events committed), and its rows are the template for the rest:
//! N-1 more devices, each with its registration, certificate (the template's
//! DER, ~600 bytes, with a distinct serial, fingerprint and SPKI hash in the
//! row) and the same audit events as a real enrollment, re-chained so that
//! `keyward audit verify` passes. The fill is direct SQL in one transaction
//! (not timed).
//!
//! Timed, each in its own process (SoftHSM2 is loaded once per process, and
//! each phase's peak RSS is its own):
//! - backup: `backup::create::create_archive` (store snapshot in one read
//!   transaction, JSON lines, tar, age to one X25519 recipient, the issuing
//!   key wrapped in the HSM, fsync); then, for the breakdown, the snapshot
//!   export alone into a sink that drops the bytes;
//! - restore: `backup::restore::restore` into a fresh token and a new
//!   database path: the checking pass (decrypt, hash every member), key
//!   unwrap, the import pass (decrypt again, parse, insert in one
//!   transaction), foreign key check, migration, the `backup.restore`
//!   event; then, for the breakdown, the checking pass alone.
//!
//! Afterwards: row counts of every table equal (the audit table one more, the
//! restore's own event) and `keyward audit verify` over the restored chain.
//!
//! SoftHSM2 reads `SOFTHSM2_CONF` once, so the binary prepares the token
//! directory and re-executes itself with `SOFTHSM2_CONF` set; the timed
//! phases re-execute it again with `KEYWARD_BENCH_PHASE`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::app::App;
use keyward::audit::{AuditDraft, AuditEvent, Outcome};
use keyward::backup::create::{Sources, create_archive};
use keyward::backup::restore::{RestoreOptions, restore};
use keyward::config::Config;
use keyward::registry::{Evidence, Submission};
use keyward::softhsm::SoftHsm;
use keyward::store::snapshot::SnapshotSink;
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, KeyPair};
use rusqlite::types::Value;
use rusqlite::{Connection, params_from_iter};
use secrecy::{ExposeSecret, SecretString};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::Arc;
use std::time::Instant;

/// Set (to the work directory) in the re-executed child.
const WORK_DIR: &str = "KEYWARD_BENCH_DIR";
/// Set to `backup` or `restore` in the timed phases' processes.
const PHASE: &str = "KEYWARD_BENCH_PHASE";
const LABEL_SRC: &str = "keyward-bench-backup";
const LABEL_DST: &str = "keyward-bench-restored";
/// A phase prints its result as one line starting with this.
const RESULT: &str = "BENCH-RESULT ";

struct Args {
    devices: usize,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        devices: 1_000_000,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--devices" => a.devices = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.devices >= 1, "--devices must be at least 1");
    a
}

fn random_text(bytes: usize) -> String {
    hex::encode(keyward::auth::random_bytes(bytes).unwrap())
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
}

/// The shipped policies plus an auto-approving open `bench` group.
fn policies(dir: &Path) {
    std::fs::create_dir_all(dir).unwrap();
    let repo = Path::new(env!("CARGO_MANIFEST_DIR")).join("policies");
    for f in ["ca.toml", "rotation.toml"] {
        std::fs::copy(repo.join(f), dir.join(f)).unwrap();
    }
    let enrollment = std::fs::read_to_string(repo.join("enrollment.toml")).unwrap();
    std::fs::write(
        dir.join("enrollment.toml"),
        format!(
            "{enrollment}\n# Benchmark only: issues to anyone who asks.\n[[group]]\nname = \"bench\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\n"
        ),
    )
    .unwrap();
}

/// A fresh token `label`, its PIN file, the policies and a config in `dir`.
fn installation(dir: &Path, hsm: &SoftHsm, label: &str, pepper: &str) -> PathBuf {
    std::fs::create_dir_all(dir).unwrap();
    let pin = SecretString::from(random_text(12));
    hsm.create_token(label, &SecretString::from(random_text(12)), &pin)
        .unwrap();
    write_private(&dir.join("hsm.pin"), pin.expose_secret());
    write_private(&dir.join("pepper"), pepper);
    policies(&dir.join("policies"));
    let config = dir.join("keyward.toml");
    std::fs::write(
        &config,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\n\
             [store]\ntype = \"sqlite\"\npath = \"keyward.db\"\n\
             [keystore]\ntype = \"pkcs11\"\nmodule = \"{}\"\ntoken_label = \"{label}\"\npin_file = \"hsm.pin\"\nsessions = 2\n\
             [auth]\ntoken_pepper_file = \"pepper\"\n\
             [log]\nlevel = \"warn\"\n",
            hsm.module().display()
        ),
    )
    .unwrap();
    config
}

fn keyward(hsm: &SoftHsm) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_keyward"));
    c.env("SOFTHSM2_CONF", hsm.conf());
    c
}

fn init(hsm: &SoftHsm, config: &Path, dir: &Path) {
    let out = keyward(hsm)
        .arg("init")
        .arg("--config")
        .arg(config)
        .arg("--token-out")
        .arg(dir.join("admin.token"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "keyward init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// An age X25519 identity file and its recipients file.
fn backup_keys(dir: &Path) -> (PathBuf, PathBuf) {
    let identity = age::x25519::Identity::generate();
    let id_file = dir.join("backup-identity.txt");
    write_private(
        &id_file,
        &format!("{}\n", identity.to_string().expose_secret()),
    );
    let recipients = dir.join("backup-recipients.txt");
    std::fs::write(&recipients, format!("# bench\n{}\n", identity.to_public())).unwrap();
    (id_file, recipients)
}

fn csr_pem() -> Vec<u8> {
    use der::Encode;
    let rng = ring::rand::SystemRandom::new();
    let pkcs8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &rng).unwrap();
    let key =
        EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, pkcs8.as_ref(), &rng).unwrap();
    let info = x509_cert::request::CertReqInfo {
        version: x509_cert::request::Version::V1,
        subject: der::Decode::from_der(&keyward::ca::x509::name_cn("bench-device").unwrap())
            .unwrap(),
        public_key: spki::SubjectPublicKeyInfoOwned {
            algorithm: spki::AlgorithmIdentifierOwned {
                oid: const_oid::db::rfc5912::ID_EC_PUBLIC_KEY,
                parameters: Some(const_oid::db::rfc5912::SECP_256_R_1.into()),
            },
            subject_public_key: der::asn1::BitString::from_bytes(key.public_key().as_ref())
                .unwrap(),
        },
        attributes: Default::default(),
    };
    let sig = key.sign(&rng, &info.to_der().unwrap()).unwrap();
    let req = x509_cert::request::CertReq {
        info,
        algorithm: spki::AlgorithmIdentifierOwned {
            oid: const_oid::db::rfc5912::ECDSA_WITH_SHA_256,
            parameters: None,
        },
        signature: der::asn1::BitString::from_bytes(sig.as_ref()).unwrap(),
    };
    der::pem::encode_string(
        "CERTIFICATE REQUEST",
        der::pem::LineEnding::LF,
        &req.to_der().unwrap(),
    )
    .unwrap()
    .into_bytes()
}

/// One real enrollment through the registry (auto-approved, issued):
/// returns (registration id, device id, certificate serial, audit seq
/// before it).
async fn enroll_template(config: &Path, db: &Path) -> (String, String, String, i64) {
    let app = App::build(Config::load(config).unwrap()).await.unwrap();
    let head: i64 = Connection::open(db)
        .unwrap()
        .query_row("SELECT COALESCE(MAX(seq), 0) FROM audit_events", [], |r| {
            r.get(0)
        })
        .unwrap();
    let submitted = app
        .state
        .registry
        .submit(
            Submission {
                csr: Some(csr_pem()),
                name: "bench-device-0000001".into(),
                device_type: Some("meter".into()),
                location: Some("plant-7/hall-2".into()),
                firmware: Some("4.2.1".into()),
                group: Some("bench".into()),
                evidence: Evidence::None,
                age_recipient: None,
                client_addr: Some("127.0.0.1".into()),
            },
            None,
        )
        .await
        .unwrap();
    let reg = submitted.registration;
    let serial = reg
        .certificate_serial
        .clone()
        .expect("the bench group issues at once");
    for (_, ks) in app.state.ca.keystores().iter() {
        let _ = ks.close().await;
    }
    drop(app);
    (reg.id.to_string(), reg.device_id.to_string(), serial, head)
}

/// Every column of the rows `sql` selects.
fn rows_of(c: &Connection, sql: &str, key: &str) -> (Vec<String>, Vec<Vec<Value>>) {
    let mut stmt = c.prepare(sql).unwrap();
    let cols: Vec<String> = stmt.column_names().iter().map(|s| s.to_string()).collect();
    let n = cols.len();
    let rows = stmt
        .query_map([key], |r| {
            (0..n)
                .map(|i| r.get::<_, Value>(i))
                .collect::<Result<Vec<_>, _>>()
        })
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    (cols, rows)
}

fn insert_sql(table: &str, cols: &[String]) -> String {
    let marks: Vec<String> = (1..=cols.len()).map(|i| format!("?{i}")).collect();
    format!(
        "INSERT INTO {table} ({}) VALUES ({})",
        cols.join(", "),
        marks.join(", ")
    )
}

fn col(cols: &[String], name: &str) -> usize {
    cols.iter().position(|c| c == name).unwrap()
}

/// A template row with every text mentioning a template id rewritten.
fn substituted(row: &[Value], subs: &[(&str, &str)]) -> Vec<Value> {
    row.iter()
        .map(|v| match v {
            Value::Text(t) if subs.iter().any(|(from, _)| t.contains(from)) => {
                let mut t = t.clone();
                for (from, to) in subs {
                    if t.contains(from) {
                        t = t.replace(from, to);
                    }
                }
                Value::Text(t)
            }
            v => v.clone(),
        })
        .collect()
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for p in parts {
        ctx.update(p);
    }
    hex::encode(ctx.finish())
}

/// Clones the template enrollment until the store holds `devices` devices,
/// in one transaction. Returns the seconds it took and the audit events
/// per enrollment.
fn fill(db: &Path, devices: usize, tpl: &(String, String, String, i64)) -> (f64, usize) {
    let started = Instant::now();
    let (reg_id, dev_id, serial, head_before) = tpl;
    let mut c = Connection::open(db).unwrap();
    // A rollback journal for the fill: a WAL would hold the whole
    // multi-GB transaction a second time on disk.
    let mode: String = c
        .query_row("PRAGMA journal_mode = DELETE", [], |r| r.get(0))
        .unwrap();
    println!("    fill journal mode: {mode}");
    c.execute_batch(
        "PRAGMA synchronous = OFF; PRAGMA cache_size = -524288; PRAGMA foreign_keys = ON;",
    )
    .unwrap();
    let (dcols, drows) = rows_of(&c, "SELECT * FROM devices WHERE id = ?1", dev_id);
    let (rcols, rrows) = rows_of(&c, "SELECT * FROM registrations WHERE id = ?1", reg_id);
    let (ccols, crows) = rows_of(&c, "SELECT * FROM certificates WHERE serial = ?1", serial);
    let (acols, arows) = rows_of(
        &c,
        "SELECT * FROM audit_events WHERE seq > CAST(?1 AS INTEGER) ORDER BY seq",
        &head_before.to_string(),
    );
    // The enrollment's own events (anything else the daemon wrote meanwhile is not cloned).
    let mentions = |row: &Vec<Value>| {
        row.iter().any(|v| {
            matches!(v, Value::Text(t) if t.contains(dev_id.as_str()) || t.contains(reg_id.as_str()) || t.contains(serial.as_str()))
        })
    };
    let arows: Vec<Vec<Value>> = arows.into_iter().filter(mentions).collect();
    assert_eq!((drows.len(), rrows.len(), crows.len()), (1, 1, 1));
    assert!(!arows.is_empty(), "the enrollment wrote no audit events");
    let (drow, rrow, crow) = (&drows[0], &rrows[0], &crows[0]);
    let Value::Blob(der) = &crow[col(&ccols, "der")] else {
        panic!("certificate DER is not a blob")
    };
    let der = der.clone();
    let tpl_name = match &drow[col(&dcols, "name")] {
        Value::Text(t) => t.clone(),
        v => panic!("device name {v:?}"),
    };
    let tpl_fp = match &crow[col(&ccols, "fingerprint")] {
        Value::Text(t) => t.clone(),
        v => panic!("fingerprint {v:?}"),
    };
    let tpl_spki = match &crow[col(&ccols, "spki_sha256")] {
        Value::Text(t) => t.clone(),
        v => panic!("spki_sha256 {v:?}"),
    };
    let serial_ms = i64::from_str_radix(&serial[..12], 16).unwrap();
    let (seq_i, at_i, actor_i, action_i, target_i, outcome_i, details_i, source_i, version_i) = (
        col(&acols, "seq"),
        col(&acols, "at_ms"),
        col(&acols, "actor"),
        col(&acols, "action"),
        col(&acols, "target"),
        col(&acols, "outcome"),
        col(&acols, "details"),
        col(&acols, "source"),
        col(&acols, "version"),
    );
    let text = |v: &Value| match v {
        Value::Text(t) => t.clone(),
        v => panic!("expected text, found {v:?}"),
    };
    // The chain goes on from the store's head.
    let (mut seq, mut prev, mut at_ms): (i64, Vec<u8>, i64) = c
        .query_row(
            "SELECT seq, hash, at_ms FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
        )
        .unwrap();

    let tx = c.transaction().unwrap();
    {
        let mut ins_d = tx.prepare(&insert_sql("devices", &dcols)).unwrap();
        let mut ins_r = tx.prepare(&insert_sql("registrations", &rcols)).unwrap();
        let mut ins_c = tx.prepare(&insert_sql("certificates", &ccols)).unwrap();
        let mut ins_a = tx.prepare(&insert_sql("audit_events", &acols)).unwrap();
        let mut rand_state: u64 = 0x9E37_79B9_7F4A_7C15;
        for i in 2..=devices {
            let new_dev = uuid::Uuid::now_v7().to_string();
            let new_reg = uuid::Uuid::now_v7().to_string();
            // Like keyward's serials: 48-bit ms timestamp, then 80 bits.
            rand_state ^= rand_state << 13;
            rand_state ^= rand_state >> 7;
            rand_state ^= rand_state << 17;
            let new_serial = format!(
                "{:012X}{:016X}{:04X}",
                serial_ms + i as i64,
                rand_state,
                i % 0x10000
            );
            let new_fp = sha256_hex(&[&der, new_serial.as_bytes()]);
            let new_spki = sha256_hex(&[new_serial.as_bytes()]);
            let new_name = format!("bench-device-{i:07}");
            let subs = [
                (dev_id.as_str(), new_dev.as_str()),
                (reg_id.as_str(), new_reg.as_str()),
                (serial.as_str(), new_serial.as_str()),
                (tpl_fp.as_str(), new_fp.as_str()),
                (tpl_spki.as_str(), new_spki.as_str()),
                (tpl_name.as_str(), new_name.as_str()),
            ];
            ins_d
                .execute(params_from_iter(substituted(drow, &subs)))
                .unwrap();
            ins_r
                .execute(params_from_iter(substituted(rrow, &subs)))
                .unwrap();
            ins_c
                .execute(params_from_iter(substituted(crow, &subs)))
                .unwrap();
            at_ms += 1;
            for a in &arows {
                let a = substituted(a, &subs);
                let details: serde_json::Value =
                    serde_json::from_str(&text(&a[details_i])).unwrap();
                let mut draft =
                    AuditDraft::new(text(&a[actor_i]), &text(&a[action_i]), text(&a[target_i]))
                        .details(details)
                        .outcome(Outcome::parse(&text(&a[outcome_i])).unwrap());
                if let Value::Text(s) = &a[source_i] {
                    draft = draft.source(Some(s.as_str()));
                }
                seq += 1;
                let mut e = AuditEvent::chain(draft, seq, at_ms, prev);
                if let Value::Integer(v) = a[version_i] {
                    e.version = v as u32;
                    e.hash = e.expected_hash();
                }
                let mut row = a.clone();
                row[seq_i] = Value::Integer(seq);
                row[at_i] = Value::Integer(at_ms);
                row[details_i] = Value::Text(serde_json::to_string(&e.details).unwrap());
                row[col(&acols, "prev_hash")] = Value::Blob(e.prev_hash.clone());
                row[col(&acols, "hash")] = Value::Blob(e.hash.clone());
                ins_a.execute(params_from_iter(row)).unwrap();
                prev = e.hash;
            }
            if i % 100_000 == 0 {
                println!("    {i} devices ({:.0} s)", started.elapsed().as_secs_f64());
            }
        }
    }
    tx.commit().unwrap();
    let _: String = c
        .query_row("PRAGMA journal_mode = WAL", [], |r| r.get(0))
        .unwrap();
    (started.elapsed().as_secs_f64(), arows.len())
}

/// Rows per table (the snapshot's tables: all but `leases`).
fn counts(db: &Path) -> BTreeMap<String, i64> {
    let c = Connection::open(db).unwrap();
    let names: Vec<String> = c
        .prepare("SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'")
        .unwrap()
        .query_map([], |r| r.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    names
        .into_iter()
        .filter(|n| !keyward::store::snapshot::NOT_SNAPSHOTTED.contains(&n.as_str()))
        .map(|n| {
            let k: i64 = c
                .query_row(&format!("SELECT COUNT(*) FROM \"{n}\""), [], |r| r.get(0))
                .unwrap();
            (n, k)
        })
        .collect()
}

/// Peak resident set size of this process so far, in MiB.
fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map(|kb| kb / 1024.0)
        .unwrap_or(0.0)
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// Drops the snapshot's bytes: the export alone, for the breakdown.
struct NullSink;

impl SnapshotSink for NullSink {
    fn table(&mut self, _table: &str, _columns: &[String]) -> std::io::Result<()> {
        Ok(())
    }
    fn rows(&mut self, _table: &str, _jsonl: Vec<u8>, _rows: u64) -> std::io::Result<()> {
        Ok(())
    }
}

/// The timed backup, in its own process.
async fn phase_backup(dir: &Path) -> serde_json::Value {
    let config = Config::load(&dir.join("src/keyward.toml")).unwrap();
    let metrics = Arc::new(keyward::metrics::Metrics::new().unwrap());
    let keystores = keyward::app::open_keystores(&config, &metrics)
        .await
        .unwrap();
    let store = keyward::app::open_store(
        &config,
        Arc::new(keyward::clock::SystemClock),
        metrics.clone(),
    )
    .await
    .unwrap();
    let src = Sources {
        config: &config,
        store: store.as_ref(),
        keystores: &keystores,
    };
    let t = Instant::now();
    let written = create_archive(
        &src,
        &dir.join("spool"),
        &[dir.join("backup-recipients.txt")],
        uuid::Uuid::now_v7(),
        time::OffsetDateTime::now_utc(),
    )
    .await
    .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    let peak = peak_rss_mib();
    let wrapped = written
        .manifest
        .keys
        .iter()
        .filter(|k| {
            matches!(
                k.backup,
                keyward::backup::archive::KeyDisposition::Wrapped { .. }
            )
        })
        .count();
    // The breakdown: the snapshot export (SQL read + JSON lines) alone.
    let t = Instant::now();
    let info = store.export_snapshot(Box::new(NullSink)).await.unwrap();
    let export_seconds = t.elapsed().as_secs_f64();
    let snapshot_rows: u64 = info.tables.iter().map(|t| t.rows).sum();
    let members = written.manifest.members.len();
    let json_bytes: u64 = written
        .manifest
        .members
        .iter()
        .filter(|(n, _)| n.starts_with("store/"))
        .map(|(_, m)| m.size)
        .sum();
    for (_, ks) in keystores.iter() {
        let _ = ks.close().await;
    }
    serde_json::json!({
        "seconds": seconds,
        "export_seconds": export_seconds,
        "path": written.path,
        "size": written.size,
        "members": members,
        "json_bytes": json_bytes,
        "rows": snapshot_rows,
        "wrapped_keys": wrapped,
        "peak_rss_mib": peak,
    })
}

/// The timed restore, in its own process.
async fn phase_restore(dir: &Path) -> serde_json::Value {
    let archive = PathBuf::from(std::env::var("KEYWARD_BENCH_ARCHIVE").unwrap());
    let identity = dir.join("backup-identity.txt");
    let config = Config::load(&dir.join("dst/keyward.toml")).unwrap();
    let metrics = Arc::new(keyward::metrics::Metrics::new().unwrap());
    let t = Instant::now();
    let keystores = keyward::app::open_keystores(&config, &metrics)
        .await
        .unwrap();
    let opts = RestoreOptions {
        archive: archive.clone(),
        identity_files: vec![identity.clone()],
        force: false,
        dry_run: false,
        actor: "bench".into(),
        expect_sha256: None,
        expect_root_sha256: None,
    };
    let report = restore(&config, &keystores, &opts, time::OffsetDateTime::now_utc())
        .await
        .unwrap();
    let seconds = t.elapsed().as_secs_f64();
    let peak = peak_rss_mib();
    for (_, ks) in keystores.iter() {
        let _ = ks.close().await;
    }
    // The breakdown: one checking pass (decrypt + hash every member) alone.
    let ids = Arc::new(keyward::backup::keys::read_identities(&identity).unwrap());
    let t = Instant::now();
    keyward::backup::restore::check_archive(&archive, ids)
        .await
        .unwrap();
    let check_seconds = t.elapsed().as_secs_f64();
    let unwrapped: Vec<String> = report
        .keys
        .iter()
        .filter(|k| k.outcome == "unwrapped")
        .map(|k| k.label.clone())
        .collect();
    serde_json::json!({
        "seconds": seconds,
        "check_seconds": check_seconds,
        "audit_seq": report.audit_seq,
        "unwrapped": unwrapped,
        "peak_rss_mib": peak,
    })
}

/// Runs a timed phase in a child process and returns its result line.
fn run_phase(dir: &Path, phase: &str, archive: Option<&Path>) -> serde_json::Value {
    let mut c = Command::new(std::env::current_exe().unwrap());
    c.env(PHASE, phase)
        .env(WORK_DIR, dir)
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit());
    if let Some(a) = archive {
        c.env("KEYWARD_BENCH_ARCHIVE", a);
    }
    let out = c.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "phase {phase} failed: {text}");
    let line = text
        .lines()
        .find_map(|l| l.strip_prefix(RESULT))
        .unwrap_or_else(|| panic!("phase {phase} printed no result: {text}"));
    serde_json::from_str(line).unwrap()
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

fn f(v: &serde_json::Value) -> f64 {
    v.as_f64().unwrap()
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
    match std::env::var(PHASE).as_deref() {
        Ok("backup") => {
            let r = runtime().block_on(phase_backup(&dir));
            println!("{RESULT}{r}");
            return ExitCode::SUCCESS;
        }
        Ok("template") => {
            let (reg, dev, serial, head) = runtime().block_on(enroll_template(
                &dir.join("src/keyward.toml"),
                &dir.join("src/keyward.db"),
            ));
            println!(
                "{RESULT}{}",
                serde_json::json!({ "registration": reg, "device": dev, "serial": serial, "head": head })
            );
            return ExitCode::SUCCESS;
        }
        Ok("restore") => {
            // The import's own breakdown (insert, commit, foreign key check,
            // migration, sync), logged at debug by the store.
            tracing_subscriber::fmt()
                .with_env_filter(tracing_subscriber::EnvFilter::new(
                    "warn,keyward::store::sqlite::snapshot=debug",
                ))
                .with_writer(std::io::stderr)
                .with_ansi(false)
                .init();
            let r = runtime().block_on(phase_restore(&dir));
            println!("{RESULT}{r}");
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    let hsm = SoftHsm::prepare(&dir).unwrap();
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    run(&a, &dir, &hsm);
    ExitCode::SUCCESS
}

fn run(a: &Args, dir: &Path, hsm: &SoftHsm) {
    let pepper = random_text(24);
    let src_dir = dir.join("src");
    let config = installation(&src_dir, hsm, LABEL_SRC, &pepper);
    init(hsm, &config, &src_dir);
    let db = src_dir.join("keyward.db");
    backup_keys(dir);

    // One real enrollment, then its clones (not timed).
    // In its own process: the daemon's store connections are gone before the fill.
    let t = run_phase(dir, "template", None);
    let tpl = (
        t["registration"].as_str().unwrap().to_string(),
        t["device"].as_str().unwrap().to_string(),
        t["serial"].as_str().unwrap().to_string(),
        t["head"].as_i64().unwrap(),
    );
    println!("==> filling the store with {} devices", a.devices);
    let (fill_seconds, events_per_device) = fill(&db, a.devices, &tpl);
    let before = counts(&db);
    let db_bytes = std::fs::metadata(&db).unwrap().len();
    println!(
        "==> filled in {fill_seconds:.1} s: {before:?}, database {:.2} GB",
        db_bytes as f64 / 1e9
    );
    assert_eq!(before["devices"], a.devices as i64);
    let device_certs: i64 = Connection::open(&db)
        .unwrap()
        .query_row(
            "SELECT COUNT(*) FROM certificates WHERE device_id IS NOT NULL",
            [],
            |r| r.get(0),
        )
        .unwrap();
    assert_eq!(device_certs, a.devices as i64);

    // Backup.
    println!("==> backup");
    let b = run_phase(dir, "backup", None);
    println!("    {b}");
    let archive = PathBuf::from(b["path"].as_str().unwrap());
    assert!(
        b["wrapped_keys"].as_u64().unwrap() >= 1,
        "no key wrapped: {b}"
    );

    // Restore into a fresh token and an empty store.
    let dst_dir = dir.join("dst");
    installation(&dst_dir, hsm, LABEL_DST, &pepper);
    println!("==> restore");
    let r = run_phase(dir, "restore", Some(&archive));
    println!("    {r}");
    assert!(
        r["unwrapped"]
            .as_array()
            .unwrap()
            .iter()
            .any(|l| l.as_str().unwrap().contains("keyward-ca-devices-")),
        "the issuing key was not restored: {r}"
    );

    // Correctness: the same rows, the restore's own audit event, an intact chain.
    let after = counts(&dst_dir.join("keyward.db"));
    for (table, n) in &before {
        let want = if table == "audit_events" { n + 1 } else { *n };
        assert_eq!(after.get(table), Some(&want), "table {table}");
    }
    assert_eq!(after.len(), before.len(), "{after:?}");
    let out = keyward(hsm)
        .args(["audit", "verify", "--output", "json", "--config"])
        .arg(dst_dir.join("keyward.toml"))
        .output()
        .unwrap();
    let verdict: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "keyward audit verify: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    assert!(
        out.status.success() && verdict["intact"] == true,
        "{verdict}"
    );
    assert_eq!(verdict["events"].as_i64(), Some(after["audit_events"]));
    println!("==> restored: row counts equal, audit chain intact ({verdict})");

    let rows: i64 = before.values().sum();
    let size = b["size"].as_u64().unwrap();
    let (bs, rs) = (f(&b["seconds"]), f(&r["seconds"]));
    let per_device = size as f64 / a.devices as f64;
    let summary = format!(
        "backup {bs:.1} s, restore {rs:.1} s (target < 60 s each); archive {:.2} GB, {per_device:.0} bytes per device",
        size as f64 / 1e9
    );
    println!("{summary}");
    if let Some(out) = &a.out {
        let table_rows: Vec<String> = before
            .iter()
            .filter(|(_, n)| **n > 0)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        let md = format!(
            "\n## Backup and restore — {}\n\nMachine: {}. In-process `backup::create::create_archive` and `backup::restore::restore` (release), each in its own process; SQLite store filled from one real enrollment (auto-approved, certificate signed in SoftHSM2) cloned to {} devices, each with its registration, certificate ({} bytes DER) and the enrollment's {} audit events, re-chained (fill: {fill_seconds:.0} s, not timed; database {:.2} GB). Rows: {}. Archive: age to one X25519 recipient, issuing CA key wrapped in the HSM. Restore into a fresh SoftHSM2 token and a new database path, both passes (check, then import) and the key unwrap; afterwards every table's row count matched (audit one more: the restore's event) and `keyward audit verify` passed over {} events.\n\n\
             {summary}\n\n\
             | measurement | result |\n|---|---|\n\
             | backup, `create_archive` (target < 60 s) | {bs:.1} s, {:.0} rows/s, peak RSS {:.0} MiB |\n\
             | of which alone: snapshot export (SQL read + JSON lines, no tar/age) | {:.1} s |\n\
             | archive size | {size} bytes ({:.2} GB; {} members; JSON lines {} bytes) |\n\
             | archive bytes per device | {per_device:.0} |\n\
             | restore, `restore` end to end (target < 60 s) | {rs:.1} s, {:.0} rows/s, peak RSS {:.0} MiB |\n\
             | of which alone: one checking pass (decrypt + hash every member) | {:.1} s |\n",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            machine(),
            a.devices,
            tpl_der_len(&db),
            events_per_device,
            db_bytes as f64 / 1e9,
            table_rows.join(", "),
            verdict["events"],
            rows as f64 / bs,
            f(&b["peak_rss_mib"]),
            f(&b["export_seconds"]),
            size as f64 / 1e9,
            b["members"],
            b["json_bytes"],
            rows as f64 / rs,
            f(&r["peak_rss_mib"]),
            f(&r["check_seconds"]),
        );
        let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
            "# keyward benchmarks\n\nProduced by `scripts/bench.sh`; newest run last. Numbers from one machine on one day: compare runs on the same machine only.\n".to_string()
        });
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}

fn tpl_der_len(db: &Path) -> i64 {
    Connection::open(db)
        .unwrap()
        .query_row(
            "SELECT length(der) FROM certificates WHERE device_id IS NOT NULL LIMIT 1",
            [],
            |r| r.get(0),
        )
        .unwrap()
}
