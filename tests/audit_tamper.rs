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
use keyward::clock::Clock;
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

/// An installation whose daemon signed checkpoints every 3 events or 2 s
/// (also appended to `checkpoints.jsonl`), over a few rounds of admin
/// invitations; stopped cleanly so that the shutdown signs the head.
async fn signed_chain() -> Env {
    let env = Env::new();
    env.append_config(
        "[audit]\ncheckpoint_every_events = 3\ncheckpoint_interval_secs = 2\n\
         checkpoint_file = \"checkpoints.jsonl\"\n",
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
    // Replaced by an event hashed over a made-up predecessor: it is named,
    // not the intact event before it.
    let c = Case::new(&env, "relinked-self");
    let mut e = events(&c.db).await.remove((t - 1) as usize);
    e.actor = "admin:mallory".into();
    e.prev_hash = vec![0x5a; 32];
    e.hash = e.expected_hash();
    rusqlite::Connection::open(&c.db)
        .unwrap()
        .execute(
            "UPDATE audit_events SET actor = ?1, prev_hash = ?2, hash = ?3 WHERE seq = ?4",
            rusqlite::params![e.actor, e.prev_hash, e.hash, t],
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

    // The checkpoint file deleted as well: once the store holds
    // checkpoints, a configured file that is gone is "could not verify"
    // (exit 2), never "no external checkpoints".
    let text = std::fs::read_to_string(&c.config)
        .unwrap()
        .replace("checkpoints.jsonl", "deleted-checkpoints.jsonl");
    let gone = write(env.dir.path(), "case-file-gone.toml", &text);
    let (code, v) = verify(&env, &gone, &[]);
    assert_eq!(code, 2, "{v}");
    assert!(
        v["error"]
            .as_str()
            .is_some_and(|e| e.contains("deleted-checkpoints.jsonl")),
        "{v}"
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
    let msg_text = msg.clone();
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

    // The procedure exactly as docs/audit.md prints it (jq, xxd, openssl),
    // run in the directory holding checkpoints.jsonl and audit.pub.pem.
    let doc = common::repo_file("docs/audit.md");
    let script = doc
        .split("```sh\n")
        .skip(1)
        .map(|b| b.split("```").next().unwrap())
        .find(|b| b.contains("openssl dgst"))
        .expect("docs/audit.md: the openssl procedure");
    let out = Command::new("bash")
        .args(["-euo", "pipefail", "-c", script])
        .current_dir(env.dir.path())
        .output()
        .expect("bash");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success() && text.contains("Verified OK"),
        "{script}\n{text}"
    );
    assert_eq!(
        std::fs::read_to_string(env.path("msg.txt")).unwrap(),
        msg_text
    );
}

// ---------------------------------------------------------------------------
// Fail closed: a change whose audit event cannot be written is refused.

async fn registration_status(url: &str, token: &str, id: &str) -> String {
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/registrations/{id}"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["status"].as_str().unwrap().to_string()
}

async fn device_status(url: &str, token: &str, id: &str) -> String {
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/devices/{id}"),
        Some(token),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    v["status"].as_str().unwrap().to_string()
}

#[tokio::test]
async fn a_change_whose_audit_event_cannot_be_written_is_refused() {
    let env = Env::new();
    let token = env.init();
    let daemon = env.serve();
    let url = daemon.url.clone();
    let device = issue_device(&url, &token, &env.path("dev-a"), "dev-a").await;
    let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
    let (s, sub) = call(
        reqwest::Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "dev-b", "group": "default" })),
    )
    .await;
    assert_eq!(s, 201, "{sub}");
    let reg = sub["id"].as_str().unwrap().to_string();

    // The store fails every audit insert (the daemon keeps running).
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .execute_batch(
            "CREATE TRIGGER test_audit_down BEFORE INSERT ON audit_events \
             BEGIN SELECT RAISE(ABORT, 'audit store down'); END;",
        )
        .unwrap();
    let before = env.counts();
    let approve_url = format!("{url}/v1/admin/registrations/{reg}/approve");
    let approve = || {
        call(
            reqwest::Method::POST,
            &approve_url,
            Some(&token),
            Some(json!({ "comment": "looks fine" })),
        )
    };
    let revoke_url = format!("{url}/v1/admin/devices/{}/revoke", device.device_id);
    let revoke = || {
        call(
            reqwest::Method::POST,
            &revoke_url,
            Some(&token),
            Some(json!({ "reason": "key-compromise" })),
        )
    };
    let (s, v) = approve().await;
    assert!(s >= 500, "approve without an audit event: {s} {v}");
    assert!(v["error"]["code"].as_str().is_some(), "{v}");
    let (s, v) = revoke().await;
    assert!(s >= 500, "revoke without an audit event: {s} {v}");
    assert!(v["error"]["code"].as_str().is_some(), "{v}");
    // Nothing changed: no row anywhere, the registration still pending,
    // the device still active.
    assert_eq!(env.counts(), before);
    assert_eq!(registration_status(&url, &token, &reg).await, "pending");
    assert_eq!(
        device_status(&url, &token, &device.device_id).await,
        "active"
    );
    let (s, v) = call(
        reqwest::Method::GET,
        &format!("{url}/v1/admin/certs/{}", device.serial),
        Some(&token),
        None,
    )
    .await;
    assert_eq!((s, v["status"].as_str()), (200, Some("valid")), "{v}");

    // The audit store is back: the same actions go through, audited.
    rusqlite::Connection::open(&env.db)
        .unwrap()
        .execute_batch("DROP TRIGGER test_audit_down;")
        .unwrap();
    let seq = head(&env.db);
    let (s, v) = approve().await;
    assert_eq!((s, v["status"].as_str()), (200, Some("issued")), "{v}");
    let (s, v) = revoke().await;
    assert_eq!(s, 200, "{v}");
    assert_eq!(
        device_status(&url, &token, &device.device_id).await,
        "revoked"
    );
    let actions: Vec<String> = env.audit_after(seq).into_iter().map(|e| e.1).collect();
    for a in ["registration.approve", "certificate.issue"] {
        assert!(actions.iter().any(|x| x == a), "{a} not in {actions:?}");
    }
    assert!(actions.iter().any(|x| x.contains("revoke")), "{actions:?}");
    drop(daemon);
    assert_intact(&env, &env.config, &[]);
}

// ---------------------------------------------------------------------------
// The daemon's periodic verification (AuditVerifyJob), driven by a manual
// clock in-process on the real token and store.

const CHILD: &str = "KEYWARD_TEST_AUDIT_TAMPER_CONFIG";

#[test]
fn the_periodic_verification_flags_tampering_in_the_tail() {
    use keyward::jobs::Job;
    let Some(cfg) = std::env::var_os(CHILD).map(PathBuf::from) else {
        let env = Env::new();
        env.init();
        let status = Command::new(std::env::current_exe().unwrap())
            .args([
                "the_periodic_verification_flags_tampering_in_the_tail",
                "--exact",
                "--nocapture",
            ])
            .env("SOFTHSM2_CONF", &env.softhsm_conf)
            .env(CHILD, &env.config)
            .status()
            .unwrap();
        assert!(status.success(), "failed in its child process");
        return;
    };
    let db = cfg.parent().unwrap().join("keyward.db");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let t0 = time::OffsetDateTime::now_utc()
            .replace_nanosecond(0)
            .unwrap();
        let clock = std::sync::Arc::new(keyward::clock::ManualClock::new(t0));
        let config = keyward::config::Config::load(&cfg).unwrap();
        let every = time::Duration::try_from(config.audit.verify_interval).unwrap();
        let app = keyward::app::App::build_with_clock(config, clock.clone())
            .await
            .unwrap();
        app.prepare_audit().await.unwrap();
        let s = &app.state;
        let admin = s.store.admin_by_name("bootstrap").await.unwrap().unwrap();
        let invite = |name: &'static str| {
            let admin = admin.clone();
            let admins = s.admins.clone();
            async move {
                admins
                    .invite(&admin, name, keyward::model::Role::Approver, None)
                    .await
                    .unwrap();
            }
        };
        let job = keyward::jobs::audit::AuditVerifyJob::new(s.audit.clone());
        let m = &s.metrics.audit;

        // Intact: the first run verifies from the start.
        job.tick(clock.now()).await.unwrap();
        assert_eq!(m.last_verified.get(), t0.unix_timestamp());
        assert_eq!(m.verify_failures.get(), 0);

        // New events, intact: the next run (one interval later) moves the
        // timestamp; a tick before the interval does not verify again.
        invite("periodic-1").await;
        clock.advance(time::Duration::seconds(1));
        job.tick(clock.now()).await.unwrap();
        assert_eq!(m.last_verified.get(), t0.unix_timestamp());
        clock.advance(every);
        job.tick(clock.now()).await.unwrap();
        let verified_at = clock.now().unix_timestamp();
        assert_eq!(m.last_verified.get(), verified_at);

        // A new event, then tampered with: the next run fails and counts.
        invite("periodic-2").await;
        invite("periodic-3").await;
        let h = head(&db);
        rusqlite::Connection::open(&db)
            .unwrap()
            .execute_batch(&format!(
                "DROP TRIGGER audit_events_no_update;
                 UPDATE audit_events SET actor = 'admin:mallory' WHERE seq = {}",
                h - 1
            ))
            .unwrap();
        clock.advance(every);
        let err = job.tick(clock.now()).await.unwrap_err();
        let text = err.to_string();
        assert!(
            text.contains(&format!("sequence {}", h - 1)) && text.contains("edited"),
            "{text}"
        );
        assert_eq!(m.verify_failures.get(), 1);
        assert_eq!(m.last_verified.get(), verified_at);
        // It keeps failing on every run until someone looks.
        clock.advance(every);
        job.tick(clock.now()).await.unwrap_err();
        assert_eq!(m.verify_failures.get(), 2);
        let metrics = s.metrics.render();
        assert!(
            metrics.contains("keyward_audit_verify_failures_total 2"),
            "{metrics}"
        );
    });
}

// ---------------------------------------------------------------------------
// Every state change is covered: each write path reachable over HTTP and
// the CLI leaves its audit event, naming its target.

/// The audit events since the last look: (action, target, outcome).
struct Trail<'a> {
    env: &'a Env,
    seq: i64,
    missing: Vec<String>,
    seen: Vec<(String, String, String)>,
}

impl<'a> Trail<'a> {
    fn new(env: &'a Env) -> Self {
        Self {
            env,
            seq: head(&env.db),
            missing: Vec::new(),
            seen: Vec::new(),
        }
    }

    fn since(&mut self) -> Vec<(String, String, String)> {
        let c = rusqlite::Connection::open(&self.env.db).unwrap();
        let mut st = c
            .prepare(
                "SELECT seq, action, target, outcome FROM audit_events WHERE seq > ?1 ORDER BY seq",
            )
            .unwrap();
        let rows: Vec<(i64, String, String, String)> = st
            .query_map([self.seq], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?))
            })
            .unwrap()
            .map(Result::unwrap)
            .collect();
        if let Some(last) = rows.last() {
            self.seq = last.0;
        }
        let out: Vec<_> = rows.into_iter().map(|(_, a, t, o)| (a, t, o)).collect();
        self.seen.extend(out.iter().cloned());
        out
    }

    /// After step `step`: an event `action` whose target contains `target`
    /// (polled for up to `wait`, for background work).
    async fn expect(&mut self, step: &str, wants: &[(&str, &str)], wait: Duration) {
        let mut got = Vec::new();
        let deadline = std::time::Instant::now() + wait;
        loop {
            got.extend(self.since());
            let missing: Vec<_> = wants
                .iter()
                .filter(|(a, t)| !got.iter().any(|(ga, gt, _)| ga == a && gt.contains(t)))
                .collect();
            if missing.is_empty() {
                return;
            }
            if std::time::Instant::now() >= deadline {
                self.missing
                    .push(format!("{step}: missing {missing:?} in {got:?}"));
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

#[tokio::test]
async fn every_write_path_leaves_its_audit_event() {
    use reqwest::Method;
    let keys = tempfile::tempdir().unwrap();
    let identity = keys.path().join("identity.txt");
    let out = Command::new("age-keygen")
        .arg("-o")
        .arg(&identity)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let recipient = Command::new("age-keygen")
        .arg("-y")
        .arg(&identity)
        .output()
        .unwrap();
    let recipients = write(
        keys.path(),
        "recipients.txt",
        &String::from_utf8(recipient.stdout).unwrap(),
    );
    let env = Env::with_extra_group(
        "[[group]]\nname = \"auto\"\nprofile = \"device\"\napproval = \"auto\"\nopen_enrollment = true\napprover_role = \"approver\"\n\n\
         [[group]]\nname = \"plant\"\nprofile = \"device\"\nattestation = { method = \"bootstrap-token\" }\napproval = \"quorum\"\napprovals_required = 1\n",
    );
    env.append_config(&format!(
        "[backup]\ndir = \"backups\"\nrecipients_files = [\"{}\"]\n\n[[backup.locations]]\nname = \"nas\"\ntype = \"dir\"\npath = \"{}\"\n",
        recipients.display(),
        keys.path().join("nas").display()
    ));
    let token = env.init();
    let mut daemon = env.serve();
    let url = daemon.url.clone();
    let mut trail = Trail::new(&env);
    let now = Duration::from_secs(0);
    let api = |m: Method, path: &str, body: Option<Value>| {
        let url = format!("{url}{path}");
        let token = token.clone();
        async move { call(m, &url, Some(&token), body).await }
    };

    // Registration: submit, approve (issues), credentials, deny.
    let (csr, _) = common::openssl_csr(env.dir.path(), "ec");
    let (s, sub) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "walk-a", "group": "default" })),
    )
    .await;
    assert_eq!(s, 201, "{sub}");
    let reg = sub["id"].as_str().unwrap().to_string();
    trail
        .expect("submit", &[("registration.submit", &reg)], now)
        .await;
    let (s, v) = api(
        Method::POST,
        &format!("/v1/admin/registrations/{reg}/approve"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    let (_, r) = api(Method::GET, &format!("/v1/admin/registrations/{reg}"), None).await;
    let device = r["device_id"].as_str().unwrap().to_string();
    let serial = r["certificate_serial"].as_str().unwrap().to_string();
    trail
        .expect(
            "approve",
            &[
                ("registration.approve", &reg),
                ("certificate.issue", &serial),
            ],
            now,
        )
        .await;
    let (s, v) = call(
        Method::GET,
        &format!("{url}/v1/registrations/{reg}/credentials"),
        Some(sub["secret"].as_str().unwrap()),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    trail
        .expect(
            "credentials",
            &[("registration.credentials_delivered", &reg)],
            now,
        )
        .await;
    let (s, sub2) = call(
        Method::POST,
        &format!("{url}/v1/registrations"),
        None,
        Some(json!({ "csr": csr, "name": "walk-b", "group": "default" })),
    )
    .await;
    assert_eq!(s, 201, "{sub2}");
    let reg2 = sub2["id"].as_str().unwrap().to_string();
    let (s, v) = api(
        Method::POST,
        &format!("/v1/admin/registrations/{reg2}/deny"),
        Some(json!({ "comment": "unknown device" })),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    trail
        .expect("deny", &[("registration.deny", &reg2)], now)
        .await;

    // Device lifecycle: suspend, resume, revoke; a CRL published.
    for (verb, body) in [
        ("suspend", json!({})),
        ("resume", json!({})),
        ("revoke", json!({ "reason": "key-compromise" })),
    ] {
        let (s, v) = api(
            Method::POST,
            &format!("/v1/admin/devices/{device}/{verb}"),
            Some(body),
        )
        .await;
        assert_eq!(s, 200, "{verb}: {v}");
        trail
            .expect(verb, &[(&format!("device.{verb}"), &device)], now)
            .await;
    }
    let (s, v) = api(Method::POST, "/v1/admin/cas/devices/crl", None).await;
    assert!(s == 200 || s == 201, "{v}");
    trail
        .expect("crl", &[("crl.publish", "devices")], now)
        .await;

    // Renewal through the reference client: enroll (auto group), an early
    // renewal allowed by an admin, `keyward renew --dir`.
    let dir = env.path("walk-c");
    let out = env.run(&[
        "enroll",
        "--url",
        &url,
        "--name",
        "walk-c",
        "--out",
        dir.to_str().unwrap(),
        "--group",
        "auto",
        "--timeout",
        "30",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (_, list) = api(Method::GET, "/v1/admin/devices?limit=100", None).await;
    let walk_c = list["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["name"] == "walk-c")
        .unwrap_or_else(|| panic!("{list}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    let (s, v) = api(
        Method::POST,
        &format!("/v1/admin/devices/{walk_c}/allow-renewal"),
        Some(json!({})),
    )
    .await;
    assert_eq!(s, 200, "{v}");
    trail
        .expect("allow-renewal", &[("device.allow_renewal", &walk_c)], now)
        .await;
    let out = env.run(&["renew", "--dir", dir.to_str().unwrap()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let new_serial = String::from_utf8(out.stdout).unwrap().trim().to_string();
    assert!(!new_serial.is_empty());
    trail
        .expect(
            "renew",
            &[("certificate.renew", &format!("certificate:{new_serial}"))],
            now,
        )
        .await;

    // Admins: add (invite, redeem), disable.
    let bob = common::add_admin(&url, &token, "bob", "approver").await;
    let (_, me) = call(
        Method::GET,
        &format!("{url}/v1/admin/admins"),
        Some(&token),
        None,
    )
    .await;
    let bob_id = me["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["name"] == "bob")
        .unwrap_or_else(|| panic!("{me}"))["id"]
        .as_str()
        .unwrap()
        .to_string();
    trail
        .expect(
            "add admin",
            &[
                ("admin.invite", "admin-request:"),
                ("admin.create", &bob_id),
            ],
            now,
        )
        .await;
    let (s, v) = api(
        Method::POST,
        &format!("/v1/admin/admins/{bob_id}/disable"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    trail
        .expect("disable admin", &[("admin.disable", &bob_id)], now)
        .await;
    drop(bob);

    // Enrollment tokens: create, revoke.
    let (s, t) = api(
        Method::POST,
        "/v1/admin/tokens",
        Some(json!({ "group": "plant" })),
    )
    .await;
    assert_eq!(s, 201, "{t}");
    let tid = t["id"].as_str().unwrap().to_string();
    let (s, v) = api(
        Method::POST,
        &format!("/v1/admin/tokens/{tid}/revoke"),
        None,
    )
    .await;
    assert_eq!(s, 200, "{v}");
    trail
        .expect(
            "tokens",
            &[
                ("enrollment_token.create", &tid),
                ("enrollment_token.revoke", &tid),
            ],
            now,
        )
        .await;

    // Policy reload by SIGHUP (to this test's own daemon, by PID).
    let pid = daemon.child.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-HUP", &pid])
            .status()
            .unwrap()
            .success()
    );
    trail
        .expect(
            "SIGHUP",
            &[("policy.reload", "policies")],
            Duration::from_secs(10),
        )
        .await;

    // Backup (runs in the background), rotation start.
    let (s, b) = api(Method::POST, "/v1/admin/backups", None).await;
    assert_eq!(s, 202, "{b}");
    let bid = b["id"].as_str().unwrap().to_string();
    trail
        .expect(
            "backup",
            &[("backup.create", &bid)],
            Duration::from_secs(60),
        )
        .await;
    let (s, r) = api(
        Method::POST,
        "/v1/admin/rotations",
        Some(json!({ "purpose": "issuing-ca", "target": "devices" })),
    )
    .await;
    assert!(s == 201 || s == 202, "{r}");
    let rid = r["id"].as_str().unwrap().to_string();
    trail
        .expect(
            "rotation",
            &[("rotation.start", &rid)],
            Duration::from_secs(10),
        )
        .await;

    // Failed logins, audited aggregated when the window closes or, as
    // here, on clean shutdown.
    for _ in 0..3 {
        let (s, _) = call(
            Method::GET,
            &format!("{url}/v1/admin/registrations"),
            Some("kw_not-a-token"),
            None,
        )
        .await;
        assert_eq!(s, 401);
    }
    assert!(daemon.stop().success());
    trail
        .expect(
            "failed logins",
            &[("admin.login_failed", "source:127.0.0.1")],
            now,
        )
        .await;

    if std::env::var_os("KEYWARD_TEST_PRINT_WALK").is_some() {
        eprintln!("{:#?}", trail.seen);
    }
    assert!(
        trail.missing.is_empty(),
        "write paths without their audit event:\n{}\nall events seen: {:#?}",
        trail.missing.join("\n"),
        trail.seen
    );
    // The whole walk verifies, signed up to the head by the shutdown.
    let v = assert_intact(&env, &env.config, &[]);
    assert_eq!(v["unsigned_events"], 0, "{v}");

    // And the store refuses a change with writes but no audit event:
    // nothing is written.
    let before = env.counts();
    let store = keyward::store::sqlite::SqliteStore::open(
        &env.db,
        8,
        std::sync::Arc::new(keyward::clock::SystemClock),
    )
    .unwrap();
    let key = store.list_keys().await.unwrap().remove(0);
    let err = store
        .commit(
            keyward::store::Change::new().write(keyward::store::Write::SetKeyState {
                id: key.id,
                from: key.state,
                to: keyward::model::KeyState::Retired,
                at: 0,
            }),
        )
        .await
        .unwrap_err();
    assert_eq!(err.code(), "change_unaudited", "{err}");
    drop(store);
    assert_eq!(env.counts(), before);
    let store = keyward::store::sqlite::SqliteStore::open_read_only(&env.db).unwrap();
    assert_eq!(
        store.get_key(key.id).await.unwrap().unwrap().state,
        key.state
    );
}

/// Which token objects are audit keys is the token's say (the
/// `keyward-audit` label), not the store's: a row planted in the store that
/// names another key the token holds (here the issuing CA's, as an
/// escrowed device key could be) does not make that key's signatures
/// count, even over the true head and with a signature that verifies.
#[test]
fn a_store_row_cannot_make_another_token_key_an_audit_key() {
    let env = Env::new();
    env.init();
    let c = rusqlite::Connection::open(&env.db).unwrap();
    let (handle, spki): (String, Vec<u8>) = c
        .query_row(
            "SELECT handle, public_key FROM keys WHERE purpose = 'issuing-ca' AND state = 'active'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    let planted = uuid::Uuid::now_v7();
    c.execute(
        "INSERT INTO keys (id, label, purpose, algorithm, backend, handle, public_key, state, ca_name, created_at, updated_at, keystore)
         VALUES (?1, 'keyward-audit', 'audit', 'ecdsa-p256', 'pkcs11', ?2, ?3, 'active', NULL, 1, 1, 'default')",
        rusqlite::params![planted.to_string(), handle, spki],
    )
    .unwrap();
    let (seq, hash): (i64, Vec<u8>) = c
        .query_row(
            "SELECT seq, hash FROM audit_events ORDER BY seq DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // A genuine signature by the CA key over a checkpoint of the true head.
    let at_ms = 1_800_000_000_000;
    let msg = write(
        env.dir.path(),
        "cp.txt",
        std::str::from_utf8(&Checkpoint::message(seq, &hash, at_ms, planted)).unwrap(),
    );
    let id_hex: String = handle
        .split("id=")
        .nth(1)
        .unwrap()
        .split(';')
        .next()
        .unwrap()
        .replace('%', "");
    // SoftHSM2 signs a digest (CKM_ECDSA): hash the message first.
    let digest = env.path("cp.sha256");
    std::fs::write(
        &digest,
        ring::digest::digest(&ring::digest::SHA256, &std::fs::read(&msg).unwrap()),
    )
    .unwrap();
    let sig = env.path("cp.sig");
    let out = Command::new("pkcs11-tool")
        .env("SOFTHSM2_CONF", &env.softhsm_conf)
        .arg("--module")
        .arg(common::softhsm_module())
        .args(["--token-label", &env.label, "--login", "--pin", common::PIN])
        .args([
            "--sign",
            "--mechanism",
            "ECDSA",
            "--signature-format",
            "openssl",
        ])
        .args(["--id", &id_hex, "--input-file"])
        .arg(&digest)
        .arg("--output-file")
        .arg(&sig)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The signature is real: openssl verifies it under the CA's public key.
    let spki_der = env.path("ca.spki.der");
    std::fs::write(&spki_der, &spki).unwrap();
    let ca_pem = env.path("ca.pub.pem");
    let (ok, o) = openssl(&[
        "pkey",
        "-pubin",
        "-inform",
        "DER",
        "-in",
        spki_der.to_str().unwrap(),
        "-out",
        ca_pem.to_str().unwrap(),
    ]);
    assert!(ok, "{o}");
    let (ok, o) = openssl(&[
        "dgst",
        "-sha256",
        "-verify",
        ca_pem.to_str().unwrap(),
        "-signature",
        sig.to_str().unwrap(),
        msg.to_str().unwrap(),
    ]);
    assert!(ok && o.contains("Verified OK"), "{o}");
    c.execute(
        "INSERT INTO audit_checkpoints (seq, hash, at_ms, key_id, signature) VALUES (?1, ?2, ?3, ?4, ?5)",
        rusqlite::params![seq, hash, at_ms, planted.to_string(), std::fs::read(&sig).unwrap()],
    )
    .unwrap();
    drop(c);

    assert_broken(&env, &env.config, &[], "forged-checkpoint", seq);
    // Only the real audit key is published.
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
    assert_eq!(pem.matches("BEGIN PUBLIC KEY").count(), 1, "{pem}");
    assert!(!pem.contains(&ca_pem_body(&ca_pem)), "{pem}");
}

/// The base64 body of a PEM file (its lines between the armour).
fn ca_pem_body(pem: &Path) -> String {
    std::fs::read_to_string(pem)
        .unwrap()
        .lines()
        .filter(|l| !l.starts_with("-----"))
        .collect()
}
