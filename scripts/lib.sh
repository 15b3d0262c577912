# lib.sh: helpers shared by the scripts in this directory. Source it.
# shellcheck shell=bash

# ensure_packages PKG...: installs the Debian packages that are missing
# (apt-get update once, only when something is missing; sudo unless root).
# On a system without dpkg it only warns: install the equivalents yourself.
ensure_packages() {
  if ! command -v dpkg >/dev/null 2>&1; then
    echo "warning: not a Debian system; make sure these are installed: $*" >&2
    return 0
  fi
  local missing=() pkg
  for pkg in "$@"; do
    dpkg -s "$pkg" >/dev/null 2>&1 || missing+=("$pkg")
  done
  ((${#missing[@]})) || return 0
  local sudo=()
  [[ $(id -u) -eq 0 ]] || sudo=(sudo)
  echo "==> installing ${missing[*]}"
  "${sudo[@]}" apt-get update
  "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
    apt-get install -y --no-install-recommends "${missing[@]}"
}
