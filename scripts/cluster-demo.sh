#!/usr/bin/env bash
# cluster-demo.sh: two keyward daemons, one deployment, on this machine.
#
# Uses the PostgreSQL and Redis already running here (127.0.0.1:5432 with
# trust authentication for PGUSER, default "postgres"; 127.0.0.1:6379) and
# touches nothing of theirs but what it makes:
#   - a fresh database keyward_demo_<random>, dropped on exit;
#   - Redis keys and channels under a unique prefix keyward-demo-<random>:,
#     deleted on exit;
#   - one SoftHSM2 token in a temp dir, shared by both daemons
#     (SOFTHSM2_CONF), initialised once (`keyward init`), served twice.
# Then it shows: a registration submitted on daemon A and approved on
# daemon B, the device fetching its certificate from B (checked by
# `openssl verify`), which daemon leads the scheduler, and the other taking
# over after the leader is killed (SIGKILL). Everything it started is
# stopped by PID on exit (trap), even on failure or Ctrl-C.
#
# Usage: scripts/cluster-demo.sh [--no-build]
#   KEYWARD_BIN=path     use this binary instead of building target/release/keyward
#   PGHOST/PGPORT/PGUSER PostgreSQL to use (default 127.0.0.1, 5432, postgres)
#   REDIS_HOST/REDIS_PORT Redis to use (default 127.0.0.1, 6379)
# Demo only: the PIN, the pepper and the admin token sit in the temp dir.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."
repo=$PWD

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages softhsm2 opensc openssl postgresql-client redis-tools curl jq

build=1
for arg in "$@"; do
  case $arg in
    --no-build) build=0 ;;
    -h | --help)
      sed -n '2,22p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *)
      echo "cluster-demo.sh: unknown argument $arg" >&2
      exit 2
      ;;
  esac
done

export PGHOST=${PGHOST:-127.0.0.1} PGPORT=${PGPORT:-5432} PGUSER=${PGUSER:-postgres}
REDIS_HOST=${REDIS_HOST:-127.0.0.1}
REDIS_PORT=${REDIS_PORT:-6379}
LEASE_SECONDS=3

step() { printf '\n==> %s\n' "$*"; }
die() {
  echo "cluster-demo.sh: $*" >&2
  exit 1
}

# --- prerequisites ----------------------------------------------------------
pg_isready -q -h "$PGHOST" -p "$PGPORT" ||
  die "no PostgreSQL on $PGHOST:$PGPORT (start it, or set PGHOST/PGPORT)"
[[ $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" ping 2>/dev/null) == PONG ]] ||
  die "no Redis on $REDIS_HOST:$REDIS_PORT (start it, or set REDIS_HOST/REDIS_PORT)"
psql -X -q -d postgres -c 'SELECT 1' >/dev/null ||
  die "cannot connect to PostgreSQL as $PGUSER without a password (trust): set PGUSER"

if [[ -n ${KEYWARD_BIN:-} ]]; then
  bin=$KEYWARD_BIN
else
  bin=${CARGO_TARGET_DIR:-$repo/target}/release/keyward
  if ((build)); then
    locked=()
    [[ -f Cargo.lock ]] && locked=(--locked)
    step "cargo build --release ${locked[*]}"
    cargo build --release "${locked[@]}"
  fi
fi
[[ -x $bin ]] || die "$bin not found (build it, or set KEYWARD_BIN)"

# --- what this run owns, and its cleanup -------------------------------------
suffix=$(od -An -N6 -tx1 /dev/urandom | tr -d ' \n')
db=keyward_demo_$suffix
prefix="keyward-demo-$suffix:"
work=$(mktemp -d "${TMPDIR:-/tmp}/keyward-cluster-demo.XXXXXX")
declare -A pids=()
db_created=0

cleanup() {
  local rc=$?
  set +e
  for name in "${!pids[@]}"; do
    if kill -0 "${pids[$name]}" 2>/dev/null; then
      kill -TERM "${pids[$name]}" 2>/dev/null
      for _ in $(seq 100); do kill -0 "${pids[$name]}" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "${pids[$name]}" 2>/dev/null
      wait "${pids[$name]}" 2>/dev/null
    fi
  done
  if ((db_created)); then
    psql -X -q -d postgres -c "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null &&
      echo "dropped database $db"
  fi
  # Only this run's keys: SCAN by the unique prefix, never FLUSHDB.
  local n
  n=$(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" --scan --pattern "${prefix}*" |
    xargs -r -n 100 redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" DEL | awk '{s+=$1} END {print s+0}')
  echo "deleted $n Redis key(s) under $prefix"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

free_port() {
  python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

# --- one installation: token, secrets, policies, two configs -----------------
step "token, secrets and policies in $work"
export SOFTHSM2_CONF=$work/softhsm2.conf
mkdir -p "$work/tokens" "$work/policies"
cat >"$SOFTHSM2_CONF" <<EOF
directories.tokendir = $work/tokens/
objectstore.backend = file
log.level = ERROR
slots.removable = false
EOF
module=$(for m in /usr/lib/softhsm/libsofthsm2.so /usr/lib/*/softhsm/libsofthsm2.so; do
  [[ -f $m ]] && echo "$m" && break
done)
[[ -n $module ]] || die "libsofthsm2.so not found"
umask 077
pin=$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')
printf '%s' "$pin" >"$work/hsm.pin"
od -An -N24 -tx1 /dev/urandom | tr -d ' \n' >"$work/pepper"
softhsm2-util --init-token --free --label "keyward-demo" \
  --so-pin "$(od -An -N12 -tx1 /dev/urandom | tr -d ' \n')" --pin "$pin" >/dev/null
cp policies/ca.toml policies/rotation.toml "$work/policies/"
{
  echo "# DEMO COPY: the default group needs one approver here (shipped: two)."
  sed '0,/approvals_required = 2/s//approvals_required = 1/' policies/enrollment.toml
} >"$work/policies/enrollment.toml"

step "database $db on $PGHOST:$PGPORT, Redis prefix $prefix"
psql -X -q -d postgres -c "CREATE DATABASE $db" >/dev/null
db_created=1

port_a=$(free_port)
port_b=$(free_port)
while [[ $port_b == "$port_a" ]]; do port_b=$(free_port); done
for name in a b; do
  port_var=port_$name
  cat >"$work/$name.toml" <<EOF
# Daemon $name of the demo deployment (see docs/deployment.md).
[server]
listen = "127.0.0.1:${!port_var}"

[store]
type = "postgres"
url = "postgres://$PGUSER@$PGHOST:$PGPORT/$db"
pool_size = 4

[redis]
url = "redis://$REDIS_HOST:$REDIS_PORT/0"
key_prefix = "$prefix"

[keystore]
type = "pkcs11"
module = "$module"
token_label = "keyward-demo"
pin_file = "hsm.pin"
sessions = 2

[auth]
token_pepper_file = "pepper"

[scheduler]
lease_seconds = $LEASE_SECONDS

[limits]
readiness_max_age_secs = 3

[policies]
dir = "policies"

[log]
level = "warn"
EOF
done

step "keyward init (once, through daemon a's config)"
"$bin" init --config "$work/a.toml" --token-out "$work/admin.token" | sed 's/^/    /'
admin=$(cat "$work/admin.token")

serve() {
  local name=$1
  "$bin" serve --config "$work/$name.toml" >"$work/$name.log" 2>&1 &
  pids[$name]=$!
}
wait_ready() {
  local name=$1 port=$2
  for _ in $(seq 300); do
    if curl -fsS "http://127.0.0.1:$port/readyz" >/dev/null 2>&1; then return 0; fi
    kill -0 "${pids[$name]}" 2>/dev/null || { cat "$work/$name.log" >&2; die "daemon $name exited"; }
    sleep 0.1
  done
  cat "$work/$name.log" >&2
  die "daemon $name not ready after 30 s"
}
leader_gauge() {
  curl -fsS "http://127.0.0.1:$1/metrics" 2>/dev/null |
    awk '$1 == "keyward_scheduler_leader" {print $2}'
}

step "two daemons on one token, one database, one Redis"
serve a
wait_ready a "$port_a"
serve b
wait_ready b "$port_b"
A=http://127.0.0.1:$port_a
B=http://127.0.0.1:$port_b
echo "    a: $A (pid ${pids[a]})"
echo "    b: $B (pid ${pids[b]})"

step "a device registers on daemon a"
openssl req -new -nodes -subj /CN=demo-device -newkey ec -pkeyopt ec_paramgen_curve:P-256 \
  -keyout "$work/device.key" -out "$work/device.csr" 2>/dev/null
sub=$(jq -n --rawfile csr "$work/device.csr" '{csr: $csr, name: "demo-device", group: "default"}' |
  curl -fsS -H 'content-type: application/json' --data-binary @- "$A/v1/registrations")
reg=$(jq -r .id <<<"$sub")
secret=$(jq -r .secret <<<"$sub")
echo "    registration $reg: $(jq -r .status <<<"$sub")"

step "an admin approves it on daemon b"
curl -fsS -H "authorization: Bearer $admin" -H 'content-type: application/json' \
  -d '{"comment":"approved on daemon b"}' "$B/v1/admin/registrations/$reg/approve" |
  jq -r '"    status: \(.status)"'

step "the device polls daemon b and fetches its certificate there"
curl -fsS -H "authorization: Bearer $secret" "$B/v1/registrations/$reg" | jq -r '"    status on b: \(.status)"'
creds=$(curl -fsS -H "authorization: Bearer $secret" "$B/v1/registrations/$reg/credentials")
jq -r .certificate_pem <<<"$creds" >"$work/device.pem"
jq -r .chain_pem <<<"$creds" >"$work/chain.pem"
awk '/BEGIN/{n++} n==2' "$work/chain.pem" >"$work/root.pem"
openssl verify -CAfile "$work/root.pem" -untrusted "$work/chain.pem" "$work/device.pem" | sed 's/^/    /'
openssl x509 -in "$work/device.pem" -noout -serial -subject | sed 's/^/    /'

step "the scheduler leader (keyward_scheduler_leader on each /metrics)"
ga=$(leader_gauge "$port_a")
gb=$(leader_gauge "$port_b")
echo "    a: ${ga:-?}   b: ${gb:-?}"
if [[ $ga == 1 && $gb == 0 ]]; then
  leader=a follower=b
elif [[ $ga == 0 && $gb == 1 ]]; then
  leader=b follower=a
else
  die "expected exactly one leader, got a=$ga b=$gb"
fi
follower_port_var=port_$follower
echo "    Redis lock ${prefix}lock:scheduler = $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" GET "${prefix}lock:scheduler")"
echo "    ({hostname}:{pid}:{random}; daemon $leader is pid ${pids[$leader]})"
step "kill -9 the leader ($leader, pid ${pids[$leader]}): $follower takes over within ~${LEASE_SECONDS}s x 1.25"
kill -KILL "${pids[$leader]}"
wait "${pids[$leader]}" 2>/dev/null || true
unset "pids[$leader]"
start=$EPOCHREALTIME
for _ in $(seq 200); do
  [[ $(leader_gauge "${!follower_port_var}") == 1 ]] && break
  sleep 0.1
done
[[ $(leader_gauge "${!follower_port_var}") == 1 ]] || die "$follower did not take over"
printf '    %s is leader after %s s\n' "$follower" "$(awk -v a="$start" -v b="$EPOCHREALTIME" 'BEGIN {printf "%.1f", b - a}')"

echo "    Redis lock ${prefix}lock:scheduler = $(redis-cli -h "$REDIS_HOST" -p "$REDIS_PORT" GET "${prefix}lock:scheduler")"
echo "    scheduler.leader audit events (psql):"
psql -X -q -A -t -d "$db" -c \
  "SELECT seq, details FROM audit_events WHERE action = 'scheduler.leader' ORDER BY seq" | sed 's/^/      /'

step "the audit chain (both daemons wrote to it) verifies"
"$bin" audit verify --config "$work/$follower.toml" | sed 's/^/    /'

step "done; stopping everything this demo started"
