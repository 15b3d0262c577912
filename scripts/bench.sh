#!/usr/bin/env bash
# Issuance benchmark: raw SoftHSM2 signing through the KeyStore, then
# end-to-end issuance through the HTTP API of a real `keyward serve`
# (release build) at concurrency 1/16/64. Appends results to BENCHMARKS.md.
#   scripts/bench.sh [SECONDS_PER_STEP]   (default 10)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
seconds="${1:-10}"

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages softhsm2 openssl pkg-config libpcsclite-dev

echo "==> building (release)"
cargo build --release --bin keyward
cargo bench --bench issuance --no-run

work="$(mktemp -d)"
daemon_pid=""
cleanup() {
  [[ -n "$daemon_pid" ]] && kill "$daemon_pid" 2>/dev/null && wait "$daemon_pid" 2>/dev/null
  rm -rf "$work"
}
trap cleanup EXIT

module=""
for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/x86_64-linux-gnu/softhsm/libsofthsm2.so; do
  [[ -e "$m" ]] && module="$m" && break
done
mkdir -p "$work/tokens" "$work/policies"
cat > "$work/softhsm2.conf" <<CONF
directories.tokendir = $work/tokens
objectstore.backend = file
log.level = ERROR
slots.removable = false
CONF
export SOFTHSM2_CONF="$work/softhsm2.conf"
head -c 18 /dev/urandom | base64 | tr -d '/+=' > "$work/hsm.pin"
head -c 24 /dev/urandom | base64 > "$work/pepper"
chmod 600 "$work/hsm.pin" "$work/pepper"
softhsm2-util --init-token --free --label keyward-bench --so-pin "bench-so-$RANDOM" --pin "$(cat "$work/hsm.pin")" >/dev/null

cp policies/ca.toml "$work/policies/ca.toml"
cp policies/enrollment.toml "$work/policies/enrollment.toml"
cat >> "$work/policies/enrollment.toml" <<'POLICY'

# Benchmark only: issues to anyone who asks.
[[group]]
name = "bench"
profile = "device"
approvals_required = 0
POLICY

cat > "$work/keyward.toml" <<CONF
[server]
listen = "127.0.0.1:0"
[store]
type = "sqlite"
path = "keyward.db"
[keystore]
type = "pkcs11"
module = "$module"
token_label = "keyward-bench"
pin_file = "hsm.pin"
sessions = 2
[auth]
token_pepper_file = "pepper"
[log]
level = "warn"
CONF

target/release/keyward init --config "$work/keyward.toml" --token-out "$work/admin.token" >/dev/null
target/release/keyward serve --config "$work/keyward.toml" > "$work/serve.out" 2> "$work/serve.err" &
daemon_pid=$!
url=""
for _ in $(seq 1 100); do
  url="$(sed -n 's/^keyward listening on //p' "$work/serve.out")"
  [[ -n "$url" ]] && break
  sleep 0.1
done
[[ -n "$url" ]] || { cat "$work/serve.err"; echo "daemon did not start" >&2; exit 1; }
echo "==> daemon at $url (pid $daemon_pid)"

cargo bench --bench issuance -- \
  --url "$url" --module "$module" --label keyward-bench --pin-file "$work/hsm.pin" \
  --seconds "$seconds" --out "$PWD/BENCHMARKS.md"

echo "==> audit chain after the run"
target/release/keyward audit verify --config "$work/keyward.toml"
