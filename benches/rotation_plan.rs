//! Rotation planning benchmark, run by `scripts/bench.sh` (or `cargo bench
//! --bench rotation_plan -- [--certs N] [--runs N] [--out BENCHMARKS.md]`).
//!
//! Pure computation, no daemon, no HSM: 1,000,000 `DeviceCertView`s with
//! deterministic pseudo-random notAfter (from 30 days ago to 400 days
//! ahead, renewal windows of 7, 30 or 60 days, half already notified) and a
//! small key set (a root, issuing CAs, their OCSP signers, the TLS key, with
//! running and retired rotations). Times `plan_devices` (which certificates
//! are in their renewal window, which still need a notification) and `plan`
//! over the keys: the median of `--runs` runs each, after one warm-up.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use keyward::model::{KeyPurpose, KeyState, RotationStep};
use keyward::policy::RotationPolicy;
use keyward::rotation::plan::{
    DeviceCertView, KeyView, PlanInput, RotationView, plan, plan_devices,
};
use std::hint::black_box;
use std::process::Command;
use std::time::{Duration, Instant};
use uuid::Uuid;

const DAY: i64 = 86_400;

struct Args {
    certs: usize,
    runs: usize,
    out: Option<String>,
}

fn args() -> Args {
    let mut a = Args {
        certs: 1_000_000,
        runs: 5,
        out: None,
    };
    let mut it = std::env::args().skip(1);
    while let Some(k) = it.next() {
        match k.as_str() {
            "--certs" => a.certs = it.next().unwrap().parse().unwrap(),
            "--runs" => a.runs = it.next().unwrap().parse().unwrap(),
            "--out" => a.out = Some(it.next().unwrap()),
            _ => {} // cargo bench passes --bench
        }
    }
    assert!(a.runs >= 1, "--runs must be at least 1");
    a
}

/// xorshift64*: deterministic, so every run plans the same certificates.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
}

fn certificates(n: usize, now: i64) -> Vec<DeviceCertView> {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let windows = [7u32, 30, 60];
    (0..n)
        .map(|_| {
            let r = rng.next();
            let offset = (r % (430 * DAY as u64)) as i64 - 30 * DAY;
            DeviceCertView {
                not_after: now + offset,
                renewal_window_days: windows[((r >> 40) % 3) as usize],
                notified: (r >> 50) & 1 == 1,
            }
        })
        .collect()
}

fn keys(now: i64) -> (Vec<KeyView>, Vec<RotationView>) {
    let mut n = 0u128;
    let mut id = || {
        n += 1;
        Uuid::from_u128(n)
    };
    let key = |id: Uuid, purpose, target: &str, age_days: i64| KeyView {
        key_id: id,
        purpose,
        target: target.into(),
        state: KeyState::Active,
        activated_at: now - age_days * DAY,
        cert_not_after: Some(now - age_days * DAY + 1825 * DAY),
        parent_on_card: false,
    };
    let mut keys = vec![key(id(), KeyPurpose::RootCa, "root", 3000)];
    for (i, ca) in ["devices", "sensors", "gateways", "lab"].iter().enumerate() {
        let mut k = key(id(), KeyPurpose::IssuingCa, ca, 400 * i as i64);
        k.parent_on_card = i == 3;
        keys.push(k);
        keys.push(key(id(), KeyPurpose::OcspSigning, ca, 10 * i as i64));
    }
    keys.push(key(id(), KeyPurpose::TlsServer, "server", 80));
    let rotation = |id, purpose, target: &str, step, destroy_after| RotationView {
        id,
        purpose,
        target: target.into(),
        step,
        destroy_after,
        next_attempt_at: now,
        old_key_id: None,
    };
    let rotations = vec![
        rotation(
            id(),
            KeyPurpose::IssuingCa,
            "sensors",
            RotationStep::Published,
            None,
        ),
        rotation(
            id(),
            KeyPurpose::OcspSigning,
            "devices",
            RotationStep::Retired,
            Some(now - DAY),
        ),
        rotation(
            id(),
            KeyPurpose::TlsServer,
            "server",
            RotationStep::Destroyed,
            Some(now - 90 * DAY),
        ),
    ];
    (keys, rotations)
}

fn median(mut times: Vec<Duration>) -> (f64, f64, f64) {
    times.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    (
        ms(times[times.len() / 2]),
        ms(times[0]),
        ms(times[times.len() - 1]),
    )
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
    let rustc = Command::new("rustc")
        .arg("--version")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    format!("{cores} cores, {cpu}; {rustc}")
}

fn main() {
    let a = args();
    if cfg!(debug_assertions) {
        println!("==> debug build: a smoke run, the numbers mean nothing");
        assert!(a.out.is_none(), "--out needs a release build (cargo bench)");
    }
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let build = Instant::now();
    let certs = certificates(a.certs, now);
    let build_ms = build.elapsed().as_secs_f64() * 1000.0;
    let (keys, rotations) = keys(now);
    let policy = RotationPolicy::default();

    // plan_devices: one warm-up, then the timed runs.
    let reference = plan_devices(&certs, now);
    let mut times = Vec::new();
    for _ in 0..a.runs {
        let t = Instant::now();
        let p = plan_devices(black_box(&certs), black_box(now));
        times.push(t.elapsed());
        assert_eq!(p, reference);
    }
    let (dev_med, dev_min, dev_max) = median(times);
    // An independent count of the window rule, so the plan is checked.
    let expect_due = certs
        .iter()
        .filter(|c| {
            now < c.not_after && c.not_after - i64::from(c.renewal_window_days) * DAY <= now
        })
        .count();
    assert_eq!(reference.due.len(), expect_due);
    assert!(reference.to_notify.len() < reference.due.len());

    // plan over the keys.
    let input = PlanInput {
        keys: &keys,
        rotations: &rotations,
    };
    let key_plan = plan(&input, &policy, now);
    let mut times = Vec::new();
    for _ in 0..a.runs {
        let t = Instant::now();
        let p = plan(black_box(&input), &policy, black_box(now));
        times.push(t.elapsed());
        assert_eq!(p, key_plan);
    }
    let (key_med, _, _) = median(times);
    let kinds: Vec<&str> = key_plan.items.iter().map(|i| i.action.kind()).collect();

    println!(
        "Rotation planning: {} device certificates in {dev_med:.1} ms (median of {}; min {dev_min:.1}, max {dev_max:.1}; target < 2000 ms): {} in their renewal window, {} to notify",
        a.certs,
        a.runs,
        reference.due.len(),
        reference.to_notify.len()
    );
    println!(
        "key plan: {} keys, {} rotations -> {} items ({}) in {:.3} ms; building the views {build_ms:.0} ms",
        keys.len(),
        rotations.len(),
        key_plan.items.len(),
        kinds.join(", "),
        key_med
    );

    if let Some(out) = &a.out {
        let millions = a.certs as f64 / 1_000_000.0;
        let md = format!(
            "\n## Rotation planning — {}\n\nMachine: {}. In-process, release, one thread. Pure planning (`keyward::rotation::plan`): {} `DeviceCertView`s built in memory (deterministic pseudo-random notAfter from 30 days ago to 400 days ahead; renewal windows 7/30/60 days; half already notified), and {} keys with {} rotation records for `plan` under the default rotation policy. One warm-up, then the median of {} runs; each result checked against the first.\n\n\
             Rotation planning: {millions}M device certificates in {dev_med:.1} ms\n\n\
             | measurement | result |\n|---|---|\n\
             | `plan_devices` over {} certificates, median (target < 2 s) | {dev_med:.1} ms |\n\
             | `plan_devices`, min / max | {dev_min:.1} ms / {dev_max:.1} ms |\n\
             | of which in their renewal window / to notify | {} / {} |\n\
             | `plan` over {} keys, {} rotations ({} items), median | {key_med:.3} ms |\n",
            time::OffsetDateTime::now_utc()
                .format(&time::format_description::well_known::Rfc3339)
                .unwrap(),
            machine(),
            a.certs,
            keys.len(),
            rotations.len(),
            a.runs,
            a.certs,
            reference.due.len(),
            reference.to_notify.len(),
            keys.len(),
            rotations.len(),
            key_plan.items.len(),
        );
        let mut existing = std::fs::read_to_string(out).unwrap_or_else(|_| {
            "# keyward benchmarks\n\nProduced by `scripts/bench.sh`; newest run last. Numbers from one machine on one day: compare runs on the same machine only.\n".to_string()
        });
        existing.push_str(&md);
        std::fs::write(out, existing).unwrap();
    }
}
