# pcsc-test-env.sh: sourceable helper that owns bringing pcscd + vsmartcard-vpcd up and down for the PIV emulator tests.
# shellcheck shell=bash
#
#   source scripts/pcsc-test-env.sh
#   pcsc_env_up   || exit 1     # installs missing packages, starts pcscd with the vpcd reader
#   ...                          # start tools/piv-emulator, run tests
#   pcsc_env_down                # stops pcscd, only if pcsc_env_up started it
#
# There is one pcscd per machine. If one is already running, pcsc_env_up reuses it when it
# shows the vpcd reader ("Yubico YubiKey OTP+FIDO+CCID 00 00", ports 35963/35964) and fails
# otherwise. Set PCSC_APDU_LOG=1 to make pcscd log every APDU (PINs and keys included) to
# $PCSC_ENV_DIR/pcscd.log. Safe under `set -euo pipefail`.

PCSC_ENV_PACKAGES=(pcscd vsmartcard-vpcd libpcsclite-dev yubico-piv-tool ykcs11 opensc)
PCSC_ENV_READER_NAME="Yubico YubiKey OTP+FIDO+CCID"

_pcsc_env_log() { printf 'pcsc-test-env: %s\n' "$*" >&2; }

_pcsc_env_missing_packages() {
    local p status
    for p in "${PCSC_ENV_PACKAGES[@]}"; do
        status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
        [[ $status == *"install ok installed"* ]] || printf '%s\n' "$p"
    done
}

_pcsc_env_reader_visible() {
    local out
    out=$(timeout 5 opensc-tool -l 2>/dev/null || true)
    [[ $out == *"$PCSC_ENV_READER_NAME"* ]]
}

pcsc_env_up() {
    local missing sudo=""
    mapfile -t missing < <(_pcsc_env_missing_packages)
    if ((${#missing[@]} > 0)); then
        if [[ $(id -u) -ne 0 ]]; then
            if command -v sudo >/dev/null 2>&1; then
                sudo="sudo"
            else
                _pcsc_env_log "missing packages ${missing[*]} and not root (no sudo)"
                return 1
            fi
        fi
        _pcsc_env_log "installing ${missing[*]}"
        $sudo apt-get update -qq >/dev/null || { _pcsc_env_log "apt-get update failed"; return 1; }
        DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || { _pcsc_env_log "apt-get install failed"; return 1; }
    fi

    PCSC_ENV_DIR=$(mktemp -d /tmp/pcsc-test-env.XXXXXX)
    mkdir -p "$PCSC_ENV_DIR/reader.conf.d"
    cat >"$PCSC_ENV_DIR/reader.conf.d/vpcd" <<CONF
FRIENDLYNAME "$PCSC_ENV_READER_NAME"
DEVICENAME   /dev/null:0x8C7B
LIBPATH      /usr/lib/pcsc/drivers/serial/libifdvpcd.so
CHANNELID    0x8C7B
CONF

    PCSCD_STARTED_BY_US=0
    PCSCD_PID=""
    local running
    # Live pcscd processes only: a zombie (state Z) left by a dead parent is not a daemon.
    running=$(ps -C pcscd -o pid=,stat= 2>/dev/null | awk '$2 !~ /^Z/ {print $1; exit}' || true)
    if [[ -n $running ]]; then
        PCSCD_PID=$running
        if _pcsc_env_reader_visible; then
            _pcsc_env_log "reusing running pcscd (pid $PCSCD_PID) that has the vpcd reader"
            export PCSC_ENV_DIR PCSCD_PID PCSCD_STARTED_BY_US
            return 0
        fi
        _pcsc_env_log "a pcscd (pid $PCSCD_PID) not started here is running without the vpcd reader;" \
            "stop it (e.g. systemctl stop pcscd.socket pcscd) and retry"
        return 1
    fi

    local args=(-f -c "$PCSC_ENV_DIR/reader.conf.d")
    [[ ${PCSC_APDU_LOG:-0} == 1 ]] && args+=(-a -d)
    if [[ $(id -u) -eq 0 ]]; then
        mkdir -p /run/pcscd
    fi
    pcscd "${args[@]}" >"$PCSC_ENV_DIR/pcscd.log" 2>&1 &
    PCSCD_PID=$!
    PCSCD_STARTED_BY_US=1
    export PCSC_ENV_DIR PCSCD_PID PCSCD_STARTED_BY_US

    local i
    for ((i = 0; i < 100; i++)); do
        if ! kill -0 "$PCSCD_PID" 2>/dev/null; then
            _pcsc_env_log "pcscd exited; log follows"
            cat "$PCSC_ENV_DIR/pcscd.log" >&2 || true
            PCSCD_STARTED_BY_US=0
            PCSCD_PID=""
            return 1
        fi
        if _pcsc_env_reader_visible; then
            _pcsc_env_log "pcscd (pid $PCSCD_PID) is up with the vpcd reader"
            return 0
        fi
        sleep 0.2
    done
    _pcsc_env_log "vpcd reader did not appear within 20 s; pcscd log follows"
    cat "$PCSC_ENV_DIR/pcscd.log" >&2 || true
    pcsc_env_down
    return 1
}

pcsc_env_down() {
    if [[ ${PCSCD_STARTED_BY_US:-0} == 1 && -n ${PCSCD_PID:-} ]]; then
        kill "$PCSCD_PID" 2>/dev/null || true
        local i
        for ((i = 0; i < 50; i++)); do
            kill -0 "$PCSCD_PID" 2>/dev/null || break
            sleep 0.1
        done
        kill -9 "$PCSCD_PID" 2>/dev/null || true
        wait "$PCSCD_PID" 2>/dev/null || true
        _pcsc_env_log "stopped pcscd (pid $PCSCD_PID)"
    fi
    if [[ -n ${PCSC_ENV_DIR:-} && -d ${PCSC_ENV_DIR:-} && ${PCSC_ENV_KEEP_DIR:-0} != 1 ]]; then
        rm -rf "$PCSC_ENV_DIR"
    fi
    PCSCD_PID=""
    PCSCD_STARTED_BY_US=0
    PCSC_ENV_DIR=""
    return 0
}
