//! Issue 12 modes of the issuance benchmark (`--wrk`, `--scale`, `--idle-rss`).
//!
//! - `--wrk`: the denominator is a tight `C_Sign` loop through `cryptoki`
//!   directly (2 threads, one session each, ECDSA P-256, `CKM_ECDSA` over a
//!   fixed 32-byte digest), not keyward's `KeyStore`; the numerator is
//!   end-to-end issuance driven by `wrk` (C, a Lua script cycling through
//!   pre-made request bodies) at concurrency 16 against the release
//!   `keyward serve`. Both, and the through-`KeyStore` rate, are measured in
//!   alternating rounds of the same run; every round reports its own ratio,
//!   the load average, and the CPU seconds each party used (this process
//!   for the tight loop, the daemon and wrk for issuance), so a bound set
//!   by the machine's 2 cores shows as a CPU split rather than a guess.
//! - `--scale`: 1,000,000 devices (each with a certificate) bulk-inserted
//!   with SQL into a copy of the installation's real store; device list
//!   pages through the API (filtered by status, by group, both, none;
//!   first and next page) timed on that copy; issuance against the empty
//!   and the big store in alternating rounds (daemon restarted per round).
//! - `--idle-rss`: VmRSS of `keyward serve` (release) after start and 10 s
//!   idle, with the default and with trimmed settings.
use super::*;
use cryptoki::mechanism::Mechanism;
use cryptoki::object::{Attribute, KeyType, ObjectClass};
use cryptoki::session::UserType;

/// CPU seconds (user + system) of a process from `/proc/PID/stat`.
/// `children` adds the waited-for children's (fields 16 and 17).
fn cpu_secs(pid: &str, children: bool) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses and may hold spaces.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let f: Vec<f64> = rest
        .split_whitespace()
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    // rest[0] is field 3 (state): utime = field 14 -> index 11.
    let ticks = 100.0; // USER_HZ on Linux
    let own = f.get(11).copied().unwrap_or(0.0) + f.get(12).copied().unwrap_or(0.0);
    let kids = f.get(13).copied().unwrap_or(0.0) + f.get(14).copied().unwrap_or(0.0);
    (own + if children { kids } else { 0.0 }) / ticks
}

/// CPU seconds per thread name of a process (threads of one name summed).
fn thread_cpu(pid: u32) -> std::collections::BTreeMap<String, f64> {
    let mut out = std::collections::BTreeMap::new();
    if let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) {
        for t in tasks.flatten() {
            let tid = t.file_name().to_string_lossy().to_string();
            let comm = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/comm"))
                .unwrap_or_default()
                .trim()
                .to_string();
            *out.entry(comm).or_insert(0.0) += cpu_secs(&format!("{pid}/task/{tid}"), false);
        }
    }
    out
}

/// Busy and total jiffies of the whole machine (`/proc/stat`, first line).
fn machine_jiffies() -> (f64, f64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let v: Vec<f64> = stat
        .lines()
        .next()
        .unwrap_or("")
        .split_whitespace()
        .skip(1)
        .map(|x| x.parse().unwrap_or(0.0))
        .collect();
    let total: f64 = v.iter().sum();
    let idle = v.get(3).copied().unwrap_or(0.0) + v.get(4).copied().unwrap_or(0.0);
    (total - idle, total)
}

fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .unwrap_or_default()
        .split_whitespace()
        .take(3)
        .collect::<Vec<_>>()
        .join(" ")
}

/// What one timed step used: wall seconds, CPU seconds of the parties,
/// the machine's busy share and the load average at its end.
#[derive(Clone, Default)]
struct Usage {
    daemon_cpu: f64,
    client_cpu: f64,
    machine_busy: f64,
    load: String,
}

/// Tight `C_Sign` loop: `threads` OS threads, each with its own logged-in
/// session, signing a fixed SHA-256-sized digest with `CKM_ECDSA` under one
/// P-256 session key (not kept in the token) for `secs`. Returns signatures/s
/// and this process's CPU seconds per signature.
fn tight_rate(module: &Path, pin: &SecretString, threads: usize, secs: f64) -> (f64, f64) {
    let ctx = keyward::keystore::pkcs11::context(module).unwrap();
    let slot = ctx
        .get_slots_with_token()
        .unwrap()
        .into_iter()
        .find(|s| {
            ctx.get_token_info(*s)
                .map(|i| i.label().trim() == LABEL)
                .unwrap_or(false)
        })
        .unwrap();
    let first = ctx.open_rw_session(slot).unwrap();
    match first.login(UserType::User, Some(pin)) {
        Ok(()) => {}
        Err(cryptoki::error::Error::Pkcs11(cryptoki::error::RvError::UserAlreadyLoggedIn, _)) => {}
        Err(e) => panic!("login: {e}"),
    }
    let p256 = der::Encode::to_der(&const_oid::db::rfc5912::SECP_256_R_1).unwrap();
    let (_, key) = first
        .generate_key_pair(
            &Mechanism::EccKeyPairGen,
            &[
                Attribute::Token(false),
                Attribute::Verify(true),
                Attribute::EcParams(p256),
            ],
            &[
                Attribute::Token(false),
                Attribute::Private(true),
                Attribute::Sensitive(true),
                Attribute::Sign(true),
                Attribute::Class(ObjectClass::PRIVATE_KEY),
                Attribute::KeyType(KeyType::EC),
            ],
        )
        .unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let count = Arc::new(AtomicUsize::new(0));
    let cpu0 = cpu_secs("self", false);
    let start = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..threads {
            let (ctx, stop, count) = (ctx.clone(), stop.clone(), count.clone());
            s.spawn(move || {
                let session = ctx.open_rw_session(slot).unwrap();
                let digest = [0x5au8; 32];
                let mut n = 0;
                while !stop.load(Ordering::Relaxed) {
                    std::hint::black_box(session.sign(&Mechanism::Ecdsa, key, &digest).unwrap());
                    n += 1;
                }
                count.fetch_add(n, Ordering::Relaxed);
            });
        }
        std::thread::sleep(Duration::from_secs_f64(secs));
        stop.store(true, Ordering::Relaxed);
    });
    let elapsed = start.elapsed().as_secs_f64();
    let cpu = cpu_secs("self", false) - cpu0;
    let n = count.load(Ordering::Relaxed) as f64;
    first.destroy_object(key).ok();
    (n / elapsed, cpu / n.max(1.0))
}

/// The Lua script: request bodies from the file named by the first script
/// argument, pre-formatted once per wrk thread, cycled from a per-thread
/// offset; `done` prints one parseable line.
const LUA: &str = r#"
local reqs = {}
local i = 0
function init(args)
  for line in io.lines(args[1]) do
    reqs[#reqs + 1] = wrk.format("POST", "/v1/registrations",
      { ["Content-Type"] = "application/json" }, line)
  end
  i = math.random(#reqs)
end
function request()
  i = i % #reqs + 1
  return reqs[i]
end
function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "KEYWARD-WRK requests=%d duration_us=%d status_errors=%d socket_errors=%d p50_us=%d p90_us=%d p99_us=%d max_us=%d\n",
    summary.requests, summary.duration, e.status, e.connect + e.read + e.write + e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"#;

struct WrkRun {
    rate: f64,
    p50_ms: f64,
    p99_ms: f64,
    requests: u64,
    /// Certificates the store gained during the run.
    issued: i64,
    usage: Usage,
}

fn certificate_count(db: &Path) -> i64 {
    rusqlite::Connection::open(db)
        .unwrap()
        .query_row("SELECT COUNT(*) FROM certificates", [], |r| r.get(0))
        .unwrap()
}

/// `wrk -t2 -c16` for `secs` against `daemon`; every response must be a 2xx.
fn run_wrk(daemon: &Daemon, dir: &Path, db: &Path, concurrency: usize, secs: u64) -> WrkRun {
    let script = dir.join("issue.lua");
    if !script.exists() {
        std::fs::write(&script, LUA).unwrap();
    }
    let before = certificate_count(db);
    let pid = daemon.child.id().to_string();
    let (d0, c0, m0) = (
        cpu_secs(&pid, false),
        cpu_secs("self", true),
        machine_jiffies(),
    );
    let out = Command::new("wrk")
        .args([
            "-t2",
            &format!("-c{concurrency}"),
            &format!("-d{secs}s"),
            "--latency",
            "--timeout",
            "10s",
            "-s",
        ])
        .arg(&script)
        .arg(&daemon.url)
        .arg("--")
        .arg(dir.join("bodies.jsonl"))
        .output()
        .expect("wrk (Debian package `wrk`; scripts/bench.sh installs it)");
    let (d1, c1, m1) = (
        cpu_secs(&pid, false),
        cpu_secs("self", true),
        machine_jiffies(),
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "wrk failed: {text}");
    let line = text
        .lines()
        .find(|l| l.starts_with("KEYWARD-WRK"))
        .unwrap_or_else(|| panic!("no result line from wrk: {text}"));
    let field = |k: &str| -> f64 {
        line.split_whitespace()
            .find_map(|kv| kv.strip_prefix(&format!("{k}=")))
            .unwrap()
            .parse()
            .unwrap()
    };
    assert_eq!(field("status_errors"), 0.0, "non-2xx responses: {text}");
    assert_eq!(field("socket_errors"), 0.0, "socket errors: {text}");
    let requests = field("requests") as u64;
    let issued = certificate_count(db) - before;
    // wrk stops with requests in flight: the store may hold a few more.
    assert!(
        issued >= requests as i64,
        "wrk counted {requests} answers, the store gained {issued} certificates"
    );
    WrkRun {
        rate: requests as f64 / (field("duration_us") / 1e6),
        p50_ms: field("p50_us") / 1000.0,
        p99_ms: field("p99_us") / 1000.0,
        requests,
        issued,
        usage: Usage {
            daemon_cpu: d1 - d0,
            client_cpu: c1 - c0,
            machine_busy: (m1.0 - m0.0) / (m1.1 - m0.1).max(1.0),
            load: loadavg(),
        },
    }
}

/// Request bodies for wrk, one JSON object a line (PEM newlines escaped).
fn write_bodies(dir: &Path, n: usize) {
    let lines: Vec<String> = csrs(n)
        .into_iter()
        .map(|c| {
            serde_json::json!({ "csr": c, "name": "bench-device", "group": "bench" }).to_string()
        })
        .collect();
    std::fs::write(dir.join("bodies.jsonl"), lines.join("\n") + "\n").unwrap();
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    if v.is_empty() { 0.0 } else { v[v.len() / 2] }
}

fn append(out: &Option<String>, md: &str) {
    if let Some(out) = out {
        let mut existing = std::fs::read_to_string(out).unwrap_or_default();
        existing.push_str(md);
        std::fs::write(out, existing).unwrap();
    }
}

fn now() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap()
}

/// A daemon configuration measured by `--wrk`: a name and how it changes
/// the installation's config text.
type Variant = (&'static str, fn(&str) -> String);

/// `--wrk` measures the configuration as installed; `--levers` adds the
/// issue 12 levers that are settings, each on a restarted daemon.
fn variants(levers: bool) -> Vec<Variant> {
    let mut v: Vec<Variant> = vec![("as installed (spawn_blocking, batch_max 256)", |c| {
        c.to_string()
    })];
    if levers {
        v.push(("signer_threads = true", |c| {
            c.replace("sessions = 2\n", "sessions = 2\nsigner_threads = true\n")
        }));
        v.push(("batch_max = 16", |c| {
            c.replace(
                "path = \"keyward.db\"\n",
                "path = \"keyward.db\"\nbatch_max = 16\n",
            )
        }));
        v.push(("batch_max = 1024", |c| {
            c.replace(
                "path = \"keyward.db\"\n",
                "path = \"keyward.db\"\nbatch_max = 1024\n",
            )
        }));
    }
    v
}

/// `perf record -g` of a daemon started on `config` for one wrk run.
fn profile(a: &Args, hsm: &SoftHsm, config: &Path, dir: &Path, db: &Path, name: &str, file: &str) {
    let daemon = start(hsm, config);
    let _ = run_wrk(&daemon, dir, db, 16, 2);
    let mut perf = Command::new("perf")
        .args(["record", "-F", "499", "-g", "-o", file, "-p"])
        .arg(daemon.child.id().to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("perf");
    let w = run_wrk(&daemon, dir, db, 16, a.seconds);
    let _ = Command::new("kill")
        .arg("-INT")
        .arg(perf.id().to_string())
        .status();
    let _ = perf.wait();
    println!(
        "==> perf profile of [{name}] at {:.0} req/s: {file}",
        w.rate
    );
    stop_gracefully(daemon);
}

/// `--wrk`: see the module documentation.
pub(super) fn wrk_mode(
    a: &Args,
    daemon: Daemon,
    hsm: &SoftHsm,
    config: &Path,
    pin: SecretString,
    dir: &Path,
) {
    let module = hsm.module();
    let db = dir.join("keyward.db");
    write_bodies(dir, 4096);
    stop_gracefully(daemon);
    let base = std::fs::read_to_string(config).unwrap();
    let variants = variants(a.levers);
    for (name, change) in &variants {
        assert!(
            *name == variants[0].0 || change(&base) != base,
            "{name} changed nothing"
        );
    }
    let raw_secs = (a.seconds as f64 / 2.0).clamp(2.0, 5.0);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let ks: Arc<dyn KeyStore> = rt.block_on(async {
        Arc::new(
            Pkcs11KeyStore::open(Pkcs11Settings {
                module: module.to_path_buf(),
                selector: TokenSelector::Label(LABEL.to_string()),
                pin: pin.clone(),
                sessions: 2,
            })
            .await
            .unwrap(),
        )
    });
    let mut md = format!(
        "\n## Issue 12: wrk against `keyward serve`, tight C_Sign denominator — {}\n\nMachine: {}. Daemon: release `keyward serve`, SQLite (WAL, synchronous=FULL, group commit), 2 PKCS#11 sessions, `bench` group (`approval = \"auto\"`, open enrollment): `POST /v1/registrations` verifies the CSR (ring), signs in SoftHSM2, checks the signature, commits registration + device + certificate + 3 audit events before answering. Load: `wrk -t2 -c16 -d{}s --latency` with a Lua script cycling through 4096 pre-made CSR bodies, after a 2 s warm-up on a freshly started daemon. Tight raw: 2 OS threads, one session each, `C_Sign` (`CKM_ECDSA`, fixed digest, session key) through `cryptoki` in the benchmark process; through-KeyStore: 2 tasks signing via `Pkcs11KeyStore::sign` (spawn_blocking). {} rounds; each round measures tight ({:.0} s), KeyStore ({:.0} s), then every configuration in turn. CPU columns: CPU time per operation of the party named (tight: the benchmark process, SoftHSM2 included; e2e: the daemon / wrk); \"busy\" is the machine's non-idle share during the wrk run (other work on the machine included).\n\n| round | configuration | tight raw sig/s | via KeyStore sig/s | e2e req/s | p50 ms | p99 ms | e2e / tight | e2e / KeyStore | tight CPU µs/sig | daemon CPU µs/req | wrk CPU µs/req | machine busy | load avg |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n",
        now(),
        machine(),
        a.seconds,
        a.rounds,
        raw_secs,
        raw_secs,
    );
    #[derive(Default)]
    struct Acc {
        ratios: Vec<f64>,
        ks_ratios: Vec<f64>,
        rates: Vec<f64>,
        p99s: Vec<f64>,
        dcpu: Vec<f64>,
        ccpu: Vec<f64>,
        split: String,
    }
    let mut acc: Vec<Acc> = variants.iter().map(|_| Acc::default()).collect();
    let (mut tights, mut tcpu) = (vec![], vec![]);
    for round in 1..=a.rounds {
        let (tight, tight_cpu) = tight_rate(module, &pin, 2, raw_secs);
        let via_ks = rt.block_on(raw_rate(ks.clone(), 2, raw_secs as u64));
        tights.push(tight);
        tcpu.push(tight_cpu * 1e6);
        for (i, (name, change)) in variants.iter().enumerate() {
            std::fs::write(config, change(&base)).unwrap();
            let daemon = start(hsm, config);
            let _ = run_wrk(&daemon, dir, &db, 16, 2); // warm-up
            let w = run_wrk(&daemon, dir, &db, 16, a.seconds);
            let threads = thread_cpu(daemon.child.id());
            stop_gracefully(daemon);
            let total: f64 = threads.values().sum();
            acc[i].split = threads
                .iter()
                .filter(|(_, c)| **c > 0.01 * total)
                .map(|(n, c)| format!("{n} {:.0}%", c / total * 100.0))
                .collect::<Vec<_>>()
                .join(", ");
            let ratio = w.rate / tight;
            let per = |cpu: f64| cpu / w.requests.max(1) as f64 * 1e6;
            println!(
                "round {round} [{name}]: tight {tight:.0} sig/s ({:.1} us CPU each), KeyStore {via_ks:.0} sig/s; wrk {:.0} req/s p50 {:.2} ms p99 {:.2} ms ({} answers, {} certificates); ratio {ratio:.3} (KeyStore {:.3}); daemon {:.0} us/req, wrk {:.0} us/req CPU; machine {:.0}% busy; load {}",
                tight_cpu * 1e6,
                w.rate,
                w.p50_ms,
                w.p99_ms,
                w.requests,
                w.issued,
                w.rate / via_ks,
                per(w.usage.daemon_cpu),
                per(w.usage.client_cpu),
                w.usage.machine_busy * 100.0,
                w.usage.load
            );
            md.push_str(&format!(
                "| {round} | {name} | {tight:.0} | {via_ks:.0} | {:.0} | {:.2} | {:.2} | {ratio:.3} | {:.3} | {:.1} | {:.0} | {:.0} | {:.0}% | {} |\n",
                w.rate,
                w.p50_ms,
                w.p99_ms,
                w.rate / via_ks,
                tight_cpu * 1e6,
                per(w.usage.daemon_cpu),
                per(w.usage.client_cpu),
                w.usage.machine_busy * 100.0,
                w.usage.load
            ));
            let a = &mut acc[i];
            a.ratios.push(ratio);
            a.ks_ratios.push(w.rate / via_ks);
            a.rates.push(w.rate);
            a.p99s.push(w.p99_ms);
            a.dcpu.push(per(w.usage.daemon_cpu));
            a.ccpu.push(per(w.usage.client_cpu));
        }
    }
    std::fs::write(config, &base).unwrap();
    // Optional profile of the daemon under the same load (not part of the
    // numbers): KEYWARD_BENCH_PERF=FILE records `perf record -g` of the
    // daemon for every configuration, FILE.N for the Nth.
    if let Some(out) = std::env::var_os("KEYWARD_BENCH_PERF") {
        for (i, (name, change)) in variants.iter().enumerate() {
            std::fs::write(config, change(&base)).unwrap();
            let file = format!("{}.{i}", out.to_string_lossy());
            profile(a, hsm, config, dir, &db, name, &file);
        }
        std::fs::write(config, &base).unwrap();
    }
    let (t, tc) = (median(&mut tights), median(&mut tcpu));
    md.push_str(&format!(
        "\nMedians over the rounds (tight raw {t:.0} sig/s, {tc:.1} µs of CPU per signature). Target: ≥ 0.30 × tight with p99 ≤ 20 ms. \"2-core bound\": 2 cores ÷ (daemon + wrk CPU per request), what the machine allows if nothing else ran.\n\n| configuration | e2e req/s | p99 ms | e2e / tight | e2e / KeyStore | daemon CPU µs/req | wrk CPU µs/req | 2-core bound req/s (× tight) | daemon CPU by thread (last round) |\n|---|---|---|---|---|---|---|---|---|\n"
    ));
    for ((name, _), x) in variants.iter().zip(acc.iter_mut()) {
        let (r, k, e, p) = (
            median(&mut x.ratios),
            median(&mut x.ks_ratios),
            median(&mut x.rates),
            median(&mut x.p99s),
        );
        let (dc, cc) = (median(&mut x.dcpu), median(&mut x.ccpu));
        let bound = 2e6 / (dc + cc);
        println!(
            "median [{name}]: e2e {e:.0} req/s, tight {t:.0} sig/s, ratio {r:.3} (target >= 0.30), vs KeyStore {k:.3}; p99 {p:.2} ms (target <= 20); CPU/req daemon {dc:.0} us + wrk {cc:.0} us -> 2-core bound {bound:.0} req/s = {:.3} x tight; daemon threads: {}",
            bound / t,
            x.split
        );
        md.push_str(&format!(
            "| {name} | {e:.0} | {p:.2} | **{r:.3}** | {k:.3} | {dc:.0} | {cc:.0} | {bound:.0} ({:.3}) | {} |\n",
            bound / t,
            x.split
        ));
    }
    rt.block_on(async { ks.close().await.unwrap() });
    append(&a.out, &md);
}

/// The `devices` columns of the bulk rows as SQL over the recursive
/// counter `i`: UUIDv7-shaped ids (older than any real device), 100 groups,
/// 1% revoked, 2% suspended, the rest active.
const DEVICE_ID: &str = "printf('%08x-%04x-7%03x-%04x-%012x', (?1 + i) >> 16, (?1 + i) & 65535, i & 4095, 32768 | ((i >> 12) & 16383), i)";

/// Bulk-inserts `n` devices, each with a certificate cloned from the
/// store's newest device certificate (new serial, device, fingerprint),
/// in one transaction. Returns the seconds it took.
fn fill_devices(db: &Path, n: usize) -> f64 {
    let t = Instant::now();
    let mut c = rusqlite::Connection::open(db).unwrap();
    c.execute_batch("PRAGMA synchronous = OFF; PRAGMA cache_size = -262144;")
        .unwrap();
    let (serial, base_ms): (String, i64) = c
        .query_row(
            "SELECT serial, created_at FROM certificates WHERE device_id IS NOT NULL ORDER BY created_at DESC LIMIT 1",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .unwrap();
    // created_at is seconds; ids/serials start ~2 * n ms before it.
    let start_ms = base_ms * 1000 - 2 * n as i64;
    let cols: Vec<String> = {
        let mut s = c.prepare("PRAGMA table_info(certificates)").unwrap();
        s.query_map([], |r| r.get::<_, String>(1))
            .unwrap()
            .map(Result::unwrap)
            .collect()
    };
    let select: Vec<String> = cols
        .iter()
        .map(|col| match col.as_str() {
            "serial" => "printf('%012X%020X', ?1 + i, i)".to_string(),
            "device_id" => DEVICE_ID.to_string(),
            "fingerprint" => "printf('%064x', i)".to_string(),
            "spki_sha256" => "printf('%064x', i + 1)".to_string(),
            other => format!("t.{other}"),
        })
        .collect();
    let tx = c.transaction().unwrap();
    tx.execute(
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
             INSERT INTO devices (id, name, device_type, location, firmware, group_name, status, created_at, updated_at)
             SELECT {DEVICE_ID}, 'fleet-' || i, 'sensor', NULL, '1.0', 'fleet-' || (i % 100),
                    CASE WHEN i % 100 = 7 THEN 'revoked' WHEN i % 50 = 3 THEN 'suspended' ELSE 'active' END,
                    (?1 + i) / 1000, (?1 + i) / 1000
             FROM n"
        ),
        rusqlite::params![start_ms, n as i64],
    )
    .unwrap();
    tx.execute(
        &format!(
            "WITH RECURSIVE n(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM n WHERE i < ?2)
             INSERT INTO certificates ({}) SELECT {} FROM n, (SELECT * FROM certificates WHERE serial = ?3) AS t",
            cols.join(", "),
            select.join(", ")
        ),
        rusqlite::params![start_ms, n as i64, serial],
    )
    .unwrap();
    tx.commit().unwrap();
    // No ANALYZE: the daemon never runs it, so the plans are the ones a
    // real store gets.
    t.elapsed().as_secs_f64()
}

/// `GET /v1/admin/devices?{query}` `reps` times (first page, then the page
/// after it via the returned cursor): per-request milliseconds, sorted.
async fn time_list(
    client: &reqwest::Client,
    url: &str,
    admin: &str,
    query: &str,
    reps: usize,
) -> (Vec<f64>, Vec<f64>, usize) {
    let (mut first, mut next, mut items) = (Vec::new(), Vec::new(), 0);
    for _ in 0..reps {
        let t = Instant::now();
        let page: serde_json::Value = client
            .get(format!("{url}/v1/admin/devices?{query}"))
            .bearer_auth(admin)
            .send()
            .await
            .unwrap()
            .error_for_status()
            .unwrap()
            .json()
            .await
            .unwrap();
        first.push(t.elapsed().as_secs_f64() * 1000.0);
        items = page["items"].as_array().map(Vec::len).unwrap_or(0);
        if let Some(cursor) = page["next_cursor"].as_str() {
            let t = Instant::now();
            client
                .get(format!("{url}/v1/admin/devices?{query}&cursor={cursor}"))
                .bearer_auth(admin)
                .send()
                .await
                .unwrap()
                .error_for_status()
                .unwrap()
                .bytes()
                .await
                .unwrap();
            next.push(t.elapsed().as_secs_f64() * 1000.0);
        }
    }
    first.sort_by(|a, b| a.total_cmp(b));
    next.sort_by(|a, b| a.total_cmp(b));
    (first, next, items)
}

/// The same filter straight in SQLite, with and without the three schema-13
/// indexes (dropped inside a transaction that is rolled back): ms per page.
fn sql_page_ms(db: &Path, filter: &str, with_indexes: bool) -> f64 {
    let mut c = rusqlite::Connection::open(db).unwrap();
    let tx = c.transaction().unwrap();
    if !with_indexes {
        tx.execute_batch(
            "DROP INDEX devices_status_id; DROP INDEX devices_group_id; DROP INDEX devices_group_status_id;",
        )
        .unwrap();
    }
    let sql = format!(
        "SELECT id, name, device_type, location, firmware, group_name, status, created_at, updated_at FROM devices{} ORDER BY id DESC LIMIT 51",
        if filter.is_empty() {
            String::new()
        } else {
            format!(" WHERE {filter}")
        }
    );
    let t = Instant::now();
    let reps = 5;
    for _ in 0..reps {
        let mut s = tx.prepare(&sql).unwrap();
        let n = s.query_map([], |_| Ok(())).unwrap().count();
        std::hint::black_box(n);
    }
    let ms = t.elapsed().as_secs_f64() * 1000.0 / reps as f64;
    tx.rollback().unwrap();
    ms
}

/// `--scale`: see the module documentation.
pub(super) fn scale_mode(a: &Args, daemon: Daemon, hsm: &SoftHsm, config: &Path, dir: &Path) {
    let _ = rustls::crypto::ring::default_provider().install_default();
    write_bodies(dir, 4096);
    // A first issuance so that the store has a device certificate to clone.
    let _ = run_wrk(&daemon, dir, &dir.join("keyward.db"), 16, 1);
    stop_gracefully(daemon);
    let big_dir = dir.join("big");
    std::fs::create_dir_all(&big_dir).unwrap();
    let big_db = big_dir.join("keyward.db");
    std::fs::copy(dir.join("keyward.db"), &big_db).unwrap();
    let n = a.devices;
    let fill_secs = fill_devices(&big_db, n);
    let size = std::fs::metadata(&big_db).map(|m| m.len()).unwrap_or(0);
    println!(
        "==> {n} devices + certificates inserted in {fill_secs:.1} s ({:.0} MB)",
        size as f64 / 1e6
    );
    let base = std::fs::read_to_string(config).unwrap();
    let big_config = dir.join("keyward-big.toml");
    std::fs::write(
        &big_config,
        base.replace(
            "path = \"keyward.db\"",
            &format!("path = \"{}\"", big_db.display()),
        ),
    )
    .unwrap();
    assert_ne!(base, std::fs::read_to_string(&big_config).unwrap());
    let admin = std::fs::read_to_string(dir.join("admin.token")).unwrap();
    let admin = admin.trim();

    // Device list pages on the big store.
    let daemon = start(hsm, &big_config);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let client = http_client(None, 4, true);
    let queries = [
        ("no filter", "limit=50", ""),
        (
            "status=active",
            "status=active&limit=50",
            "status = 'active'",
        ),
        (
            "status=revoked (1%)",
            "status=revoked&limit=50",
            "status = 'revoked'",
        ),
        (
            "status=suspended (2%)",
            "status=suspended&limit=50",
            "status = 'suspended'",
        ),
        (
            "group=fleet-42 (1%)",
            "group=fleet-42&limit=50",
            "group_name = 'fleet-42'",
        ),
        (
            "group=fleet-42 & status=revoked (none)",
            "group=fleet-42&status=revoked&limit=50",
            "group_name = 'fleet-42' AND status = 'revoked'",
        ),
        (
            "group=fleet-7 & status=revoked (1%)",
            "group=fleet-7&status=revoked&limit=50",
            "group_name = 'fleet-7' AND status = 'revoked'",
        ),
        (
            "oldest first, status=suspended",
            "status=suspended&order=oldest&limit=50",
            "",
        ),
    ];
    let mut md = format!(
        "\n## Issue 12: 1,000,000 devices — {}\n\nMachine: {}. The installation's real store copied after a first issuance, then {n} devices (100 groups `fleet-N`; 1% revoked, 2% suspended) each with a certificate (cloned row, new serial/device/fingerprint) bulk-inserted with SQL in {fill_secs:.1} s; {:.0} MB. Device list pages through `GET /v1/admin/devices` (release `keyward serve`, admin token, keep-alive, 50 a page), 20 requests each: first page and the page after it (cursor). SQL column: the page's query (newest first) straight in SQLite with / without the schema-13 indexes (`devices_status_id`, `devices_group_id`, `devices_group_status_id`; dropped in a rolled-back transaction); no ANALYZE, as in a real store. Target < 50 ms.\n\n| listing | first page p50 / max ms | next page p50 / max ms | items | SQL ms with / without indexes |\n|---|---|---|---|---|\n",
        now(),
        machine(),
        size as f64 / 1e6
    );
    let mut worst: f64 = 0.0;
    for (name, query, filter) in queries {
        let (first, next, items) = rt.block_on(time_list(&client, &daemon.url, admin, query, 20));
        let sql = if filter.is_empty() && name != "no filter" {
            "—".to_string()
        } else {
            format!(
                "{:.2} / {:.2}",
                sql_page_ms(&big_db, filter, true),
                sql_page_ms(&big_db, filter, false)
            )
        };
        let p = |v: &[f64], q: f64| {
            v.get(((v.len() as f64 * q) as usize).min(v.len().saturating_sub(1)))
                .copied()
                .unwrap_or(0.0)
        };
        worst = worst.max(p(&first, 1.0)).max(p(&next, 1.0));
        println!(
            "{name:<40} first p50 {:.2} max {:.2} ms; next p50 {:.2} max {:.2} ms; {items} items; SQL {sql}",
            p(&first, 0.5),
            p(&first, 1.0),
            p(&next, 0.5),
            p(&next, 1.0)
        );
        md.push_str(&format!(
            "| {name} | {:.2} / {:.2} | {:.2} / {:.2} | {items} | {sql} |\n",
            p(&first, 0.5),
            p(&first, 1.0),
            p(&next, 0.5),
            p(&next, 1.0)
        ));
    }
    md.push_str(&format!(
        "\nSlowest page: {worst:.2} ms (target < 50 ms).\n\n"
    ));
    stop_gracefully(daemon);

    // Issuance, empty vs big store, alternating; each its own daemon start.
    md.push_str(&format!(
        "Issuance against the empty store (the installation's own) and the 1M-device copy, alternating, daemon restarted per run, `wrk -t2 -c16 -d{}s` after a 2 s warm-up; CPU: the daemon's CPU time per request:\n\n| round | empty store req/s (p99 ms; CPU µs/req) | 1M devices req/s (p99 ms; CPU µs/req) | 1M / empty (rate; CPU per request) |\n|---|---|---|---|\n",
        a.seconds
    ));
    let (mut empty_rates, mut big_rates) = (vec![], vec![]);
    let (mut ratios, mut cpu_ratios) = (vec![], vec![]);
    for round in 1..=a.rounds {
        let mut pair = vec![];
        for (cfg, db) in [
            (config, dir.join("keyward.db")),
            (big_config.as_path(), big_db.clone()),
        ] {
            let d = start(hsm, cfg);
            let _ = run_wrk(&d, dir, &db, 16, 2);
            let w = run_wrk(&d, dir, &db, 16, a.seconds);
            stop_gracefully(d);
            pair.push(w);
        }
        let cpu = |w: &WrkRun| w.usage.daemon_cpu / w.requests.max(1) as f64 * 1e6;
        println!(
            "round {round}: empty {:.0}/s (p99 {:.2} ms, {:.0} us CPU/req), 1M {:.0}/s (p99 {:.2} ms, {:.0} us CPU/req), ratio {:.3}, CPU ratio {:.3}; load {}",
            pair[0].rate,
            pair[0].p99_ms,
            cpu(&pair[0]),
            pair[1].rate,
            pair[1].p99_ms,
            cpu(&pair[1]),
            pair[1].rate / pair[0].rate,
            cpu(&pair[1]) / cpu(&pair[0]),
            loadavg()
        );
        md.push_str(&format!(
            "| {round} | {:.0} ({:.2}; {:.0}) | {:.0} ({:.2}; {:.0}) | {:.3}; {:.3} |\n",
            pair[0].rate,
            pair[0].p99_ms,
            cpu(&pair[0]),
            pair[1].rate,
            pair[1].p99_ms,
            cpu(&pair[1]),
            pair[1].rate / pair[0].rate,
            cpu(&pair[1]) / cpu(&pair[0])
        ));
        empty_rates.push(pair[0].rate);
        big_rates.push(pair[1].rate);
        ratios.push(pair[1].rate / pair[0].rate);
        cpu_ratios.push(cpu(&pair[1]) / cpu(&pair[0]));
    }
    // Optional profiles (KEYWARD_BENCH_PERF=FILE): FILE.empty and FILE.1m.
    if let Some(out) = std::env::var_os("KEYWARD_BENCH_PERF") {
        let out = out.to_string_lossy();
        profile(
            a,
            hsm,
            config,
            dir,
            &dir.join("keyward.db"),
            "empty store",
            &format!("{out}.empty"),
        );
        profile(
            a,
            hsm,
            &big_config,
            dir,
            &big_db,
            "1M devices",
            &format!("{out}.1m"),
        );
    }
    let (e, b) = (median(&mut empty_rates), median(&mut big_rates));
    let (r, c) = (median(&mut ratios), median(&mut cpu_ratios));
    println!(
        "median: empty {e:.0}/s, 1M {b:.0}/s; median of the rounds' ratios {r:.3} (target >= 0.90), CPU per request 1M/empty {c:.3}"
    );
    md.push_str(&format!(
        "| **median** | {e:.0} | {b:.0} | **{r:.3}** (median of the rounds' ratios; target ≥ 0.90); CPU {c:.3} |\n"
    ));
    append(&a.out, &md);
}

/// VmRSS of a process in kB.
fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next().map(|n| n.parse().unwrap_or(0)))
        .unwrap_or(0)
}

/// `--idle-rss`: see the module documentation.
pub(super) fn idle_rss_mode(a: &Args, daemon: Daemon, hsm: &SoftHsm, config: &Path) {
    let idle = Duration::from_secs(10);
    let mut md = format!(
        "\n## Issue 12: idle RSS of `keyward serve` — {}\n\nMachine: {}. Release build, the benchmark's installation (SoftHSM2 token, SQLite), no requests; VmRSS from /proc/PID/status right after the listening line and after {} s idle. Target < 40 MB.\n\n| configuration | RSS at start | RSS after {} s idle |\n|---|---|---|\n",
        now(),
        machine(),
        idle.as_secs(),
        idle.as_secs()
    );
    stop_gracefully(daemon);
    // The installation as configured: defaults but for 2 PKCS#11 sessions.
    let name = "as installed (defaults, 2 PKCS#11 sessions)";
    let d = start(hsm, config);
    let at_start = rss_kb(d.child.id());
    std::thread::sleep(idle);
    let after = rss_kb(d.child.id());
    println!(
        "{name}: RSS {:.1} MB at start, {:.1} MB after {} s idle (target < 40 MB)",
        at_start as f64 / 1024.0,
        after as f64 / 1024.0,
        idle.as_secs()
    );
    md.push_str(&format!(
        "| {name} | {:.1} MB | {:.1} MB |\n",
        at_start as f64 / 1024.0,
        after as f64 / 1024.0
    ));
    stop_gracefully(d);
    append(&a.out, &md);
}
