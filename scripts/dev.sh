#!/usr/bin/env bash
# Builds keyward and runs `keyward dev`: a SoftHSM2 token, a SQLite database,
# a config, PIN, pepper and policies under ./.keyward-dev (or --dir), then the
# daemon on 127.0.0.1:8080. Arguments are passed to `keyward dev`, e.g.
#   scripts/dev.sh --listen 127.0.0.1:9090
# Demo use only: the PIN and the bootstrap admin token sit in files there.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
ensure_packages softhsm2 opensc openssl sqlite3 pkg-config libpcsclite-dev

if ! command -v cargo >/dev/null 2>&1; then
  echo "dev.sh: cargo not found; install a Rust toolchain (see rust-version in Cargo.toml)" >&2
  exit 1
fi

locked=()
[[ -f Cargo.lock ]] && locked=(--locked)
echo "==> cargo build --release ${locked[*]}"
cargo build --release "${locked[@]}"

target_dir=${CARGO_TARGET_DIR:-target}
echo "==> ${target_dir}/release/keyward dev $*"
exec "${target_dir}/release/keyward" dev "$@"
