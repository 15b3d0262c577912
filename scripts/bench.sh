#!/usr/bin/env bash
# Issuance benchmark: raw SoftHSM2 signing through the KeyStore, end-to-end
# issuance through the HTTP API of a real `keyward serve` (release build) at
# concurrency 1/16/64, and the cost of the signature check on every issued
# certificate. The benchmark sets up its own token, config and daemon in a
# temp dir (benches/issuance.rs). Then the CRL case: 100,000 revoked
# certificates in the store, one CRL published (read, encode, HSM sign,
# verify, commit) several times (benches/revocation.rs). Then the OCSP
# responder: responses/s from the pre-signed cache and with a nonce (signed
# in SoftHSM2) at concurrency 16, p50/p99, against its own daemon
# (benches/ocsp.rs). Then rotation planning: which of 1,000,000 device
# certificates are in their renewal window, and the key plan, in memory
# (benches/rotation_plan.rs). Then backup and restore of a store with
# 1,000,000 devices and certificates (benches/backup.rs; needs ~12 GB of
# free disk in the temp dir while it runs). Then the audit trail: append
# through the store's group commit, `audit verify` over 1,000,000 and
# 10,000,000 events (benches/audit.rs; ~4 GB in the temp dir), and what
# signing checkpoints costs issuance (benches/issuance.rs
# --checkpoint-cost). Appends results to BENCHMARKS.md.
#   scripts/bench.sh [SECONDS_PER_STEP]           (default 10)
#   scripts/bench.sh --audit [SECONDS_PER_STEP]   the audit part only
# Issue 12 modes (benches/issuance/wrk.rs; each appends its own section):
#   scripts/bench.sh --wrk [SECONDS_PER_STEP]      issuance driven by `wrk` (c16) against
#       a release `keyward serve`, divided by a tight cryptoki C_Sign loop (2 threads)
#       measured in alternating rounds of the same run; CPU per request of daemon and wrk
#   scripts/bench.sh --levers [SECONDS_PER_STEP]   the same, plus each lever that is a
#       setting (signer_threads, batch_max) on a restarted daemon, interleaved
#   scripts/bench.sh --scale [SECONDS_PER_STEP]    1,000,000 devices: device list pages
#       (< 50 ms) and issuance against the big store vs the empty one
#   scripts/bench.sh --idle-rss                    VmRSS of an idle `keyward serve`
#   scripts/bench.sh --issue12 [SECONDS_PER_STEP]  --levers, --scale and --idle-rss
# ROUNDS (environment, default 3) sets the alternating rounds of --wrk/--levers/--scale.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
audit_only=false
issue12=()
case "${1:-}" in
  --audit) audit_only=true; shift ;;
  --wrk|--levers|--scale|--idle-rss) issue12=("$1"); shift ;;
  --issue12) issue12=(--levers --scale --idle-rss); shift ;;
esac
seconds="${1:-10}"
rounds="${ROUNDS:-3}"

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages softhsm2 openssl pkg-config libpcsclite-dev

audit() {
  echo "==> audit trail: append, verify (1,000,000 and 10,000,000 events)"
  cargo bench --bench audit -- --seconds "$seconds" --events 1000000 --big-events 10000000 --out "$PWD/BENCHMARKS.md"
  echo "==> audit checkpoint cost on issuance"
  cargo bench --bench issuance -- --checkpoint-cost --seconds "$seconds" --out "$PWD/BENCHMARKS.md"
}

if ((${#issue12[@]})); then
  ensure_packages softhsm2 openssl pkg-config libpcsclite-dev wrk
  echo "==> building (release)"
  cargo bench --bench issuance --no-run
  for mode in "${issue12[@]}"; do
    echo "==> issuance benchmark ${mode}"
    cargo bench --bench issuance -- "$mode" --seconds "$seconds" --rounds "$rounds" --out "$PWD/BENCHMARKS.md"
  done
  exit 0
fi

if $audit_only; then
  echo "==> building (release)"
  cargo bench --bench audit --bench issuance --no-run
  audit
  exit 0
fi

echo "==> building (release)"
cargo bench --bench issuance --bench revocation --bench ocsp --bench rotation_plan --bench backup --bench audit --no-run

cargo bench --bench issuance -- --seconds "$seconds" --out "$PWD/BENCHMARKS.md"

echo "==> CRL with 100,000 entries"
cargo bench --bench revocation -- --entries 100000 --runs 5 --out "$PWD/BENCHMARKS.md"

echo "==> OCSP responder"
cargo bench --bench ocsp -- --seconds "$seconds" --out "$PWD/BENCHMARKS.md"

echo "==> rotation planning over 1,000,000 device certificates"
cargo bench --bench rotation_plan -- --certs 1000000 --runs 5 --out "$PWD/BENCHMARKS.md"

echo "==> backup and restore of 1,000,000 devices"
cargo bench --bench backup -- --devices 1000000 --out "$PWD/BENCHMARKS.md"

audit
