#!/usr/bin/env bash
# Runs ringpen's tests on a fresh Debian machine: installs what they need when
# it is missing (Debian's pen and penctl, mariadb-server and galera-4),
# then runs `cargo test` with any arguments given. As root, or through sudo.
#
#   tests/run.sh                  every test
#   tests/run.sh --test control   one test file (any `cargo test` arguments)
set -euo pipefail

cd "$(dirname "$0")/.."

step() {
    echo
    echo "==> $*"
}

if ! command -v cargo >/dev/null; then
    echo "tests/run.sh: cargo is not installed; a Rust toolchain (1.85 or later) is needed" >&2
    exit 1
fi

if ((EUID != 0)) && command -v sudo >/dev/null; then
    as_root() { sudo "$@"; }
else
    as_root() { "$@"; }
fi

apt_updated=false
apt_install() {
    if ! $apt_updated; then
        step "apt-get update"
        as_root env DEBIAN_FRONTEND=noninteractive apt-get update
        apt_updated=true
    fi
    step "apt-get install -y $*"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y "$@"
}

# The black-box tests compare ringpen with Debian's pen 0.34.1 and penctl.
if command -v pen >/dev/null && command -v penctl >/dev/null; then
    step "pen and penctl are installed: $(command -v pen), $(command -v penctl)"
else
    apt_install pen
fi

# --- MariaDB and Galera, for tests/health.rs ---------------------------------
# The health-check tests start their own mariadbd (private datadir, port and
# socket; a one-node Galera cluster too) and never use the system service, so
# the packages are installed with service start-up blocked when nothing else
# blocks it already.
deb_installed() {
    dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"
}
mariadb_missing=()
deb_installed mariadb-server || mariadb_missing+=(mariadb-server)
deb_installed galera-4 || mariadb_missing+=(galera-4)
if ((${#mariadb_missing[@]})); then
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        # Removed however this script ends: left behind, it would keep every
        # service installed later from starting.
        trap 'as_root rm -f /usr/sbin/policy-rc.d' EXIT
        printf '#!/bin/sh\nexit 101\n' | as_root tee /usr/sbin/policy-rc.d >/dev/null
        as_root chmod 755 /usr/sbin/policy-rc.d
    fi
    apt_install "${mariadb_missing[@]}"
else
    step "mariadb-server and galera-4 are installed: $(/usr/sbin/mariadbd --version)"
fi
# ------------------------------------------------------------------------------

step "cargo test $*"
cargo test "$@"
