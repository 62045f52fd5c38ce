#!/usr/bin/env bash
# Installs what a fresh Debian 12 machine lacks to build, test and demo crmpay.
# Quick when everything is already there: it only calls apt-get for missing packages.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  postgresql-15                # the server the extension runs in
  postgresql-server-dev-15     # PGXS, headers, pg_regress
  postgresql-15-cron           # pg_cron, for scheduling reconciliation
  libcurl4-openssl-dev         # libcurl (OpenSSL flavour) for gateway HTTP
  libssl-dev                   # OpenSSL libcrypto for AES-GCM, HMAC, RSA
  openssl                      # CLI: the tests make a throwaway CA with it
  gcc clang make               # both compilers must build warning-free
  libclang-rt-14-dev           # libFuzzer and sanitizer runtimes (make fuzz, corpus replay)
  python3-pytest python3-psycopg python3-aiosmtpd   # integration tests (Debian's /usr/bin/python3)
  ca-certificates
)

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done

# The official gateway SDKs used as test oracles (npm registry), pinned in
# tests/node/package-lock.json; reinstalled only when the lock file changes.
install_oracles() {
  local lock=tests/node/package-lock.json stamp=tests/node/node_modules/.crmpay-lock
  command -v npm >/dev/null 2>&1 || { echo "deps: npm not found: SDK oracle tests will be skipped"; return 0; }
  if [ -f "$stamp" ] && cmp -s "$lock" "$stamp"; then return 0; fi
  echo "deps: installing the SDK test oracles (npm ci)"
  bash tests/node/install.sh && cp "$lock" "$stamp"
}

if [ ${#missing[@]} -eq 0 ]; then
  echo "deps: all present"
  install_oracles
  exit 0
fi

if [ "$(id -u)" -ne 0 ]; then
  echo "deps: missing packages: ${missing[*]}; run 'make deps' as root" >&2
  exit 1
fi
echo "deps: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
install_oracles
echo "deps: done"
