//! Tampering with the audit trail, as an attacker with write access to the
//! database would: a real `keyward serve` on a real SoftHSM2 token signs
//! checkpoints of the chain head, then each case edits a copy of the
//! database with SQLite (append-only triggers dropped first) and the real
//! `keyward audit verify --output json` must name the kind and the first
//! sequence that broke. Also: `--from-checkpoint`, `--public-key`, one
//! checkpoint checked with openssl alone, fail-closed writes (an audit
//! insert that fails refuses the change), the daemon's own periodic
//! verification, and a walk over the write paths asserting each is audited.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use common::{Env, call, issue_device, write};
use keyward::audit::{AuditDraft, AuditEvent, Checkpoint};
use keyward::store::{AuditQuery, Store};
use serde_json::{Value, json};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

const TRIGGERS: &str = "DROP TRIGGER audit_events_no_update; DROP TRIGGER audit_events_no_delete;
     DROP TRIGGER audit_checkpoints_no_update; DROP TRIGGER audit_checkpoints_no_delete;";

fn sql_i64(db: &Path, q: &str) -> i64 {
    let c = rusqlite::Connection::open(db).unwrap();
    c.query_row(q, [], |r| r.get::<_, Option<i64>>(0))
        .unwrap()
        .unwrap_or(0)
}

fn head(db: &Path) -> i64 {
    sql_i64(db, "SELECT MAX(seq) FROM audit_events")
}

fn checkpoint_seqs(db: &Path) -> Vec<i64> {
    let c = rusqlite::Connection::open(db).unwrap();
    let mut st = c
        .prepare("SELECT seq FROM audit_checkpoints ORDER BY seq")
        .unwrap();
    st.query_map([], |r| r.get(0))
        .unwrap()
        .map(Result::unwrap)
        .collect()
}

/// Waits (polling the store) until a signed checkpoint covers the head.
fn wait_for_checkpoint_at_head(db: &Path) {
    for _ in 0..200 {
        let h = head(db);
        if checkpoint_seqs(db).last() == Some(&h) {
            return;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    panic!(
        "no checkpoint at head {} after 20 s: {:?}",
        head(db),
        checkpoint_seqs(db)
    );
}

/// Every event of the database at `db`, read through the store.
async fn events(db: &Path) -> Vec<AuditEvent> {
    let store = keyward::store::sqlite::SqliteStore::open_read_only(db).unwrap();
    store
        .audit_events(AuditQuery {
            from_seq: 1,
            limit: 100_000,
        })
        .await
        .unwrap()
}

/// The installation's config and database, copied for one tamper case.
struct Case {
    db: PathBuf,
    config: PathBuf,
    /// The same, without `[audit] checkpoint_file`.
    config_no_file: PathBuf,
}

impl Case {
    fn new(env: &Env, name: &str) -> Self {
        let db = env.path(&format!("case-{name}.db"));
        let c = rusqlite::Connection::open(&env.db).unwrap();
        c.execute("VACUUM INTO ?1", [db.to_str().unwrap()]).unwrap();
        let text = std::fs::read_to_string(&env.config).unwrap().replace(
            "path = \"keyward.db\"",
            &format!("path = \"case-{name}.db\""),
        );
        let config = write(env.dir.path(), &format!("case-{name}.toml"), &text);
        let no_file = text.replace("checkpoint_file = \"checkpoints.jsonl\"\n", "");
        assert_ne!(text, no_file);
        let config_no_file = write(env.dir.path(), &format!("case-{name}-nf.toml"), &no_file);
        let case = Self {
            db,
            config,
            config_no_file,
        };
        case.sql(TRIGGERS);
        case
    }

    /// Changes one byte of the store's signature of checkpoint `seq`.
    fn flip_signature_byte(&self, seq: i64) {
        let c = rusqlite::Connection::open(&self.db).unwrap();
        let mut sig: Vec<u8> = c
            .query_row(
                "SELECT signature FROM audit_checkpoints WHERE seq = ?1",
                [seq],
                |r| r.get(0),
            )
            .unwrap();
        let i = sig.len() - 5;
        sig[i] ^= 0x01;
        c.execute(
            "UPDATE audit_checkpoints SET signature = ?1 WHERE seq = ?2",
            rusqlite::params![sig, seq],
        )
        .unwrap();
    }

    fn sql(&self, batch: &str) {
        rusqlite::Connection::open(&self.db)
            .unwrap()
            .execute_batch(batch)
            .unwrap();
    }

    /// Rewrites events `from..` of the chain as `edit` leaves them,
    /// re-hashing each (and its successors' links) as if the chain were
    /// written that way: self-consistent, without the audit key.
    async fn rechain(&self, from: i64, edit: impl Fn(&mut AuditEvent)) {
        let mut evs = events(&self.db).await;
        let c = rusqlite::Connection::open(&self.db).unwrap();
        let mut prev = evs[(from - 2) as usize].hash.clone();
        for e in evs.iter_mut().filter(|e| e.seq >= from) {
            if e.seq == from {
                edit(e);
            }
            e.prev_hash = prev;
            e.hash = e.expected_hash();
            prev = e.hash.clone();
            c.execute(
                "UPDATE audit_events SET actor = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
                rusqlite::params![e.actor, e.prev_hash, e.hash, e.seq],
            )
            .unwrap();
        }
    }
}

/// `keyward audit verify --output json` (+ `extra`): (exit code, JSON).
fn verify(env: &Env, config: &Path, extra: &[&str]) -> (i32, Value) {
    let out = env
        .keyward()
        .args(["audit", "verify", "--output", "json", "--config"])
        .arg(config)
        .args(extra)
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|_| {
        panic!(
            "not JSON: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.code().unwrap(), v)
}

/// Asserts `audit verify` exits 1 naming `kind` at `seq`; returns the break.
fn assert_broken(env: &Env, config: &Path, extra: &[&str], kind: &str, seq: i64) -> Value {
    let (code, v) = verify(env, config, extra);
    assert_eq!(code, 1, "{kind}: {v}");
    assert_eq!(v["intact"], false, "{v}");
    assert_eq!(v["broken"]["kind"], kind, "{v}");
    assert_eq!(v["broken"]["seq"], seq, "{kind}: {v}");
    assert_eq!(v["first_broken_seq"], seq, "{v}");
    assert!(
        v["broken"]["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{v}"
    );
    v["broken"].clone()
}

fn assert_intact(env: &Env, config: &Path, extra: &[&str]) -> Value {
    let (code, v) = verify(env, config, extra);
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["intact"], true, "{v}");
    v
}

fn openssl(args: &[&str]) -> (bool, String) {
    let out = Command::new("openssl").args(args).output().unwrap();
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// An installation whose daemon signed checkpoints every 3 events (also
/// appended to `checkpoints.jsonl`), over a few rounds of admin
/// invitations; stopped cleanly so that the shutdown signs the head.
async fn signed_chain() -> Env {
    let env = Env::new();
    env.append_config(
        "[audit]\ncheckpoint_every_events = 3\ncheckpoint_file = \"checkpoints.jsonl\"\n",
    );
    let token = env.init();
    let mut daemon = env.serve();
    wait_for_checkpoint_at_head(&env.db);
    for round in 0..4 {
        for i in 0..4 {
            let (s, v) = call(
                reqwest::Method::POST,
                &format!("{}/v1/admin/invitations", daemon.url),
                Some(&token),
                Some(json!({ "name": format!("invitee-{round}-{i}"), "role": "approver" })),
            )
            .await;
            assert_eq!(s, 201, "{v}");
        }
        if round < 3 {
            wait_for_checkpoint_at_head(&env.db);
        }
    }
    // The last round is signed by the clean shutdown.
    assert!(daemon.stop().success());
    assert_eq!(checkpoint_seqs(&env.db).last(), Some(&head(&env.db)));
    env
}

#[tokio::test]
async fn every_tamper_case_is_named_with_its_first_sequence() {
    let env = signed_chain().await;
    let cps = checkpoint_seqs(&env.db);
    let h = head(&env.db);
    assert!(cps.len() >= 4, "{cps:?}");
    // Two checkpoints (a, b) with room for a case between them: t and t+1
    // are events no checkpoint names, and a is not the first checkpoint.
    let (a, b) = cps
        .windows(2)
        .skip(1)
        .map(|w| (w[0], w[1]))
        .find(|(a, b)| b - a >= 3)
        .unwrap_or_else(|| panic!("no gap of 3 between checkpoints {cps:?}"));
    let t = a + 1;
    let last = cps[cps.len() - 1];
    let before_last = cps[cps.len() - 2];

    // Intact: every checkpoint (store and file, which hold the same ones)
    // verifies and nothing is left unsigned.
    let v = assert_intact(&env, &env.config, &[]);
    assert_eq!(v["head_seq"], h);
    assert_eq!(v["last_checkpoint"], last);
    assert_eq!(v["unsigned_events"], 0);
    assert!(v["checkpoints_verified"].as_u64().unwrap() >= cps.len() as u64);
    let file_lines = std::fs::read_to_string(env.path("checkpoints.jsonl")).unwrap();
    assert_eq!(file_lines.lines().count(), cps.len());

    // Edited.
    let c = Case::new(&env, "edited");
    c.sql(&format!(
        "UPDATE audit_events SET actor = 'admin:mallory' WHERE seq = {t}"
    ));
    assert_broken(&env, &c.config, &[], "edited", t);

    // Deleted, leaving a gap.
    let c = Case::new(&env, "deleted");
    c.sql(&format!("DELETE FROM audit_events WHERE seq = {t}"));
    assert_broken(&env, &c.config, &[], "deleted", t);

    // Deleted, and the later events renumbered down to close the gap.
    let c = Case::new(&env, "deleted-renumbered");
    c.sql(&format!(
        "DELETE FROM audit_events WHERE seq = {t};
         UPDATE audit_events SET seq = -seq WHERE seq > {t};
         UPDATE audit_events SET seq = -seq - 1 WHERE seq < 0;"
    ));
    assert_broken(&env, &c.config, &[], "deleted", t);

    // Inserted: a forged event, correctly chained to its predecessor, and
    // the later events renumbered up to make room.
    let c = Case::new(&env, "inserted");
    let evs = events(&c.db).await;
    let forged = AuditEvent::chain(
        AuditDraft::new("admin:mallory", "admin.invite", "admin:ghost"),
        t,
        evs[(t - 1) as usize].at_ms,
        evs[(t - 2) as usize].hash.clone(),
    );
    c.sql(&format!(
        "UPDATE audit_events SET seq = -seq WHERE seq >= {t};
         UPDATE audit_events SET seq = -seq + 1 WHERE seq < 0;"
    ));
    rusqlite::Connection::open(&c.db)
        .unwrap()
        .execute(
            "INSERT INTO audit_events (seq, at_ms, actor, action, target, outcome, details, prev_hash, hash, version)
             VALUES (?1, ?2, ?3, ?4, ?5, 'success', '{}', ?6, ?7, ?8)",
            rusqlite::params![
                forged.seq,
                forged.at_ms,
                forged.actor,
                forged.action,
                forged.target,
                forged.prev_hash,
                forged.hash,
                forged.version
            ],
        )
        .unwrap();
    assert_broken(&env, &c.config, &[], "inserted", t);

    // Reordered: two adjacent events swap places.
    let c = Case::new(&env, "reordered");
    c.sql(&format!(
        "UPDATE audit_events SET seq = -1 WHERE seq = {t};
         UPDATE audit_events SET seq = {t} WHERE seq = {t} + 1;
         UPDATE audit_events SET seq = {t} + 1 WHERE seq = -1;"
    ));
    assert_broken(&env, &c.config, &[], "reordered", t);

    // Relinked: one event edited and re-hashed, its successor not.
    let c = Case::new(&env, "relinked");
    let mut e = events(&c.db).await.remove((t - 1) as usize);
    e.actor = "admin:mallory".into();
    e.hash = e.expected_hash();
    rusqlite::Connection::open(&c.db)
        .unwrap()
        .execute(
            "UPDATE audit_events SET actor = ?1, hash = ?2 WHERE seq = ?3",
            rusqlite::params![e.actor, e.hash, t],
        )
        .unwrap();
    assert_broken(&env, &c.config, &[], "relinked", t);

    // Re-chained without the key: one event edited and every later hash
    // recomputed. The chain is self-consistent; only the checkpoint at b
    // (the first one after the edit) disagrees.
    let c = Case::new(&env, "rechained");
    c.rechain(t, |e| e.actor = "admin:mallory".into()).await;
    let brk = assert_broken(&env, &c.config, &[], "rechained", b);
    assert_eq!(brk["after_checkpoint"], a, "{brk}");
    // Without any checkpoint it would pass: the chain alone cannot tell.
    let c2 = Case::new(&env, "rechained-nocp");
    c2.rechain(t, |e| e.actor = "admin:mallory".into()).await;
    c2.sql("DELETE FROM audit_checkpoints;");
    let v = assert_intact(&env, &c2.config_no_file, &[]);
    assert_eq!(v["checkpoints_verified"], 0, "{v}");
    assert!(v["last_checkpoint"].is_null(), "{v}");

    // ...and re-signing the checkpoints with a key of one's own is a forgery.
    let attacker = ring::signature::EcdsaKeyPair::from_pkcs8(
        &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
        ring::signature::EcdsaKeyPair::generate_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &ring::rand::SystemRandom::new(),
        )
        .unwrap()
        .as_ref(),
        &ring::rand::SystemRandom::new(),
    )
    .unwrap();
    let c = Case::new(&env, "resigned");
    c.rechain(t, |e| e.actor = "admin:mallory".into()).await;
    {
        let store = keyward::store::sqlite::SqliteStore::open_read_only(&c.db).unwrap();
        let evs = store
            .audit_events(AuditQuery {
                from_seq: 1,
                limit: 100_000,
            })
            .await
            .unwrap();
        let cs = store.audit_checkpoints(b, 1000).await.unwrap();
        let conn = rusqlite::Connection::open(&c.db).unwrap();
        for cp in cs {
            let hash = evs[(cp.seq - 1) as usize].hash.clone();
            let msg = Checkpoint::message(cp.seq, &hash, cp.at_ms, cp.key_id);
            let sig = attacker
                .sign(&ring::rand::SystemRandom::new(), &msg)
                .unwrap();
            conn.execute(
                "UPDATE audit_checkpoints SET hash = ?1, signature = ?2 WHERE seq = ?3",
                rusqlite::params![hash, sig.as_ref().to_vec(), cp.seq],
            )
            .unwrap();
        }
    }
    assert_broken(&env, &c.config_no_file, &[], "forged-checkpoint", b);

    // Forged: one checkpoint's signature changed (one byte).
    let c = Case::new(&env, "forged");
    c.flip_signature_byte(b);
    assert_broken(&env, &c.config, &[], "forged-checkpoint", b);
    // A checkpoint naming a key that is not an audit key on the token.
    let c = Case::new(&env, "forged-key");
    c.sql(&format!(
        "UPDATE audit_checkpoints SET key_id = '{}' WHERE seq = {b}",
        uuid::Uuid::new_v4()
    ));
    let brk = assert_broken(&env, &c.config, &[], "forged-checkpoint", b);
    assert!(
        brk["reason"].as_str().unwrap().contains("not an audit key"),
        "{brk}"
    );

    // Truncated: the events after the second-to-last checkpoint are cut off;
    // the last checkpoint still names the head they reached.
    let c = Case::new(&env, "truncated");
    c.sql(&format!(
        "DELETE FROM audit_events WHERE seq > {before_last}"
    ));
    let brk = assert_broken(&env, &c.config_no_file, &[], "truncated", before_last + 1);
    assert_eq!(brk["after_checkpoint"], before_last, "{brk}");

    // Truncated together with the store's checkpoints: the store alone looks
    // intact, the external checkpoint file (from the config, or given with
    // --checkpoints) still names the lost head.
    let c = Case::new(&env, "truncated-all");
    c.sql(&format!(
        "DELETE FROM audit_events WHERE seq > {before_last};
         DELETE FROM audit_checkpoints WHERE seq > {before_last};"
    ));
    let v = assert_intact(&env, &c.config_no_file, &[]);
    assert_eq!(v["head_seq"], before_last, "{v}");
    assert_broken(&env, &c.config, &[], "truncated", before_last + 1);
    let file = env.path("checkpoints.jsonl");
    assert_broken(
        &env,
        &c.config_no_file,
        &["--checkpoints", file.to_str().unwrap()],
        "truncated",
        before_last + 1,
    );

    from_checkpoint_cases(&env, a, b, t, &cps).await;
    public_key_cases(&env, &cps).await;
}

/// `--from-checkpoint SEQ`: the events up to SEQ are trusted; tampering
/// before it is not reported, after it is; SEQ must name a checkpoint whose
/// signature verifies (exit 2 otherwise).
async fn from_checkpoint_cases(env: &Env, a: i64, b: i64, t: i64, cps: &[i64]) {
    let c = Case::new(env, "from-cp");
    c.sql(&format!(
        "UPDATE audit_events SET actor = 'admin:mallory' WHERE seq = {t}"
    ));
    let bs = b.to_string();
    let v = assert_intact(env, &c.config, &["--from-checkpoint", &bs]);
    assert_eq!(v["events"], head(&c.db) - b, "{v}");
    let a_s = a.to_string();
    assert_broken(env, &c.config, &["--from-checkpoint", &a_s], "edited", t);

    // A forged checkpoint before SEQ is not reported either.
    let c = Case::new(env, "from-cp-forged-before");
    c.flip_signature_byte(cps[0]);
    assert_broken(env, &c.config, &[], "forged-checkpoint", cps[0]);
    assert_intact(env, &c.config, &["--from-checkpoint", &bs]);

    // No checkpoint at SEQ.
    let (code, v) = verify(env, &env.config, &["--from-checkpoint", &t.to_string()]);
    assert_eq!(code, 2, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains(&format!("no checkpoint at sequence {t}")),
        "{err}"
    );

    // A forged checkpoint at SEQ.
    let c = Case::new(env, "from-cp-forged");
    c.flip_signature_byte(b);
    let (code, v) = verify(env, &c.config_no_file, &["--from-checkpoint", &bs]);
    assert_eq!(code, 2, "{v}");
    let err = v["error"].as_str().unwrap();
    assert!(
        err.contains("forged-checkpoint") && err.contains("does not verify"),
        "{err}"
    );
    // A start event that was changed after the checkpoint signed it.
    let c = Case::new(env, "from-cp-start-edited");
    c.sql(&format!(
        "UPDATE audit_events SET hash = zeroblob(32) WHERE seq = {b}"
    ));
    assert_broken(env, &c.config, &["--from-checkpoint", &bs], "rechained", b);
}

/// `--public-key`: the PEM from `keyward audit public-key` verifies without
/// the token; another key makes every checkpoint a forgery; one checkpoint
/// checked with openssl alone.
async fn public_key_cases(env: &Env, cps: &[i64]) {
    let out = env
        .keyward()
        .args(["audit", "public-key", "--config"])
        .arg(&env.config)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pem = String::from_utf8(out.stdout).unwrap();
    assert!(pem.starts_with("-----BEGIN PUBLIC KEY-----"), "{pem}");
    let pub_pem = write(env.dir.path(), "audit.pub.pem", &pem);

    // A config whose key store cannot be opened: the token is not needed.
    let text = std::fs::read_to_string(&env.config).unwrap().replace(
        common::softhsm_module().to_str().unwrap(),
        "/nonexistent/libpkcs11.so",
    );
    let no_token = write(env.dir.path(), "no-token.toml", &text);
    let (code, v) = verify(env, &no_token, &[]);
    assert_eq!(code, 2, "without the token and without a key: {v}");
    let v = assert_intact(env, &no_token, &["--public-key", pub_pem.to_str().unwrap()]);
    assert!(v["checkpoints_verified"].as_u64().unwrap() >= cps.len() as u64);

    // Another P-256 key (made by openssl): every checkpoint is a forgery,
    // the first one is named.
    let other_key = env.path("other.key");
    let other_pub = env.path("other.pub.pem");
    let (ok, o) = openssl(&[
        "ecparam",
        "-name",
        "prime256v1",
        "-genkey",
        "-noout",
        "-out",
        other_key.to_str().unwrap(),
    ]);
    assert!(ok, "{o}");
    let (ok, o) = openssl(&[
        "ec",
        "-in",
        other_key.to_str().unwrap(),
        "-pubout",
        "-out",
        other_pub.to_str().unwrap(),
    ]);
    assert!(ok, "{o}");
    assert_broken(
        env,
        &no_token,
        &["--public-key", other_pub.to_str().unwrap()],
        "forged-checkpoint",
        cps[0],
    );
    // Not a public key at all: could not verify.
    let (code, v) = verify(
        env,
        &no_token,
        &["--public-key", other_key.to_str().unwrap()],
    );
    assert_eq!(code, 2, "{v}");
    assert!(v["error"].as_str().unwrap().contains("PUBLIC KEY"), "{v}");

    // One checkpoint with openssl alone, from a line of the checkpoint
    // file, as docs/audit.md describes.
    let line = std::fs::read_to_string(env.path("checkpoints.jsonl")).unwrap();
    let cp: Value = serde_json::from_str(line.lines().next().unwrap()).unwrap();
    let msg = format!(
        "keyward-audit-checkpoint-v1\nseq={}\nhash={}\nat_ms={}\nkey={}\n",
        cp["seq"],
        cp["hash"].as_str().unwrap(),
        cp["at_ms"],
        cp["key_id"].as_str().unwrap()
    );
    let parsed: Checkpoint = serde_json::from_value(cp.clone()).unwrap();
    assert_eq!(msg.as_bytes(), parsed.signed_message().as_slice());
    let msg_file = write(env.dir.path(), "msg.txt", &msg);
    let sig_file = env.path("sig.der");
    std::fs::write(
        &sig_file,
        hex::decode(cp["signature"].as_str().unwrap()).unwrap(),
    )
    .unwrap();
    let dgst = |pubkey: &Path, msg: &Path| {
        openssl(&[
            "dgst",
            "-sha256",
            "-verify",
            pubkey.to_str().unwrap(),
            "-signature",
            sig_file.to_str().unwrap(),
            msg.to_str().unwrap(),
        ])
    };
    let (ok, o) = dgst(&pub_pem, &msg_file);
    assert!(ok && o.contains("Verified OK"), "{o}");
    let (ok, o) = dgst(&other_pub, &msg_file);
    assert!(!ok && o.contains("Verification failure"), "{o}");
    let mut flipped = msg.into_bytes();
    let i = flipped.len() - 3;
    flipped[i] ^= 0x01;
    let flipped_file = env.path("msg-flipped.txt");
    std::fs::write(&flipped_file, flipped).unwrap();
    let (ok, o) = dgst(&pub_pem, &flipped_file);
    assert!(!ok && o.contains("Verification failure"), "{o}");
}
